//! The usage ledger: the [`UsageRecord`] every metered request produces, and the writer that
//! takes records off the request path through a bounded channel and appends them to the
//! journal on its own thread, so file I/O never runs on a runtime worker.
//!
//! The journal ([`journal::SegmentJournal`]) is append-only, checksummed and recovered at
//! start; the flusher ships it to the configured sinks (PostgreSQL, CloudEvents, files).

pub mod checkpoint;
pub mod cloudevents;
pub mod file_sink;
pub mod flusher;
pub mod journal;
pub mod postgres;
pub mod sink;
pub mod sinks;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::provider::{Endpoint, TokenUsage};

pub use journal::{FsyncPolicy, Journal, SegmentJournal};

/// Records written per journal append at most; bounds the latency of a sync barrier.
const MAX_BATCH: usize = 1024;
/// Pause before retrying a failed journal write. Records are never dropped.
const WRITE_RETRY_DELAY: Duration = Duration::from_millis(500);

/// How a metered request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The upstream answered and the whole response reached the client.
    Completed,
    /// The upstream answered with an error status.
    UpstreamError,
    /// The upstream could not be reached.
    UpstreamUnreachable,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The response body broke off, or the stream reported an error event.
    StreamError,
    /// The client went away before the response was complete.
    ClientDisconnected,
    /// tollgate ended the stream: the account could not afford more output.
    CutOff,
    /// An application-reported outcome (`POST /v1/outcomes`), priced per unit.
    Reported,
}

impl Outcome {
    /// Whether the call's usage is charged (upstream failures are not: providers do not bill
    /// them).
    pub fn is_billable(self) -> bool {
        match self {
            Outcome::Completed
            | Outcome::StreamError
            | Outcome::ClientDisconnected
            | Outcome::CutOff
            | Outcome::Reported => true,
            Outcome::UpstreamError | Outcome::UpstreamUnreachable | Outcome::UpstreamTimeout => {
                false
            }
        }
    }
}

/// Caller-supplied breakdown dimensions, taken from request headers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dimensions {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub feature: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub workflow: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub end_user: Option<String>,
}

/// One metered request. Never carries a client key or provider credential.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// UUIDv7: unique, and ordered by creation time.
    pub id: Uuid,
    /// When the request arrived.
    pub timestamp: DateTime<Utc>,
    /// The configured name of the client key (`keys[].id`).
    pub key_id: Arc<str>,
    pub account: Arc<str>,
    pub model: Option<String>,
    pub upstream: Arc<str>,
    pub endpoint: Endpoint,
    pub streamed: bool,
    /// HTTP status the upstream answered with, or the one tollgate answered for it
    /// (502, 504) when it could not.
    pub status: u16,
    pub outcome: Outcome,
    #[serde(flatten)]
    pub usage: TokenUsage,
    /// Some token figure was counted by tollgate's tokenizer, not reported by the provider.
    pub estimated: bool,
    /// Time from sending the request upstream to its response headers, microseconds.
    pub upstream_ttfb_us: Option<u64>,
    /// Time from sending the request upstream to the end of its response, microseconds.
    pub upstream_total_us: u64,
    #[serde(flatten)]
    pub dimensions: Dimensions,
    /// What the account was charged, in `unit`, after plan allowance and tiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<rust_decimal::Decimal>,
    /// The usage at price-book rates in `unit`, before allowance and tiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rated_cost: Option<rust_decimal::Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// For reported outcomes: the outcome's name (`ticket_resolved`) and count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<u64>,
}

/// Where a grant came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantSource {
    Admin,
    AutoTopUp,
}

/// A grant added at run time (admin top-up, automatic top-up): journaled so balances recover
/// and payment systems hear of it. Grants written in config are not journaled: config is
/// their record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GrantEntry {
    /// UUIDv7 of this journal entry.
    pub id: Uuid,
    pub timestamp: DateTime<Utc>,
    pub account: String,
    pub grant_id: String,
    pub amount: rust_decimal::Decimal,
    pub unit: String,
    pub kind: crate::balance::GrantKind,
    pub priority: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub expires_at_period_end: bool,
    pub source: GrantSource,
}

impl GrantEntry {
    /// The journal entry for a grant added at run time.
    pub fn new(
        account: &str,
        unit: &str,
        spec: &crate::balance::GrantSpec,
        source: GrantSource,
        at: DateTime<Utc>,
    ) -> GrantEntry {
        GrantEntry {
            id: Uuid::now_v7(),
            timestamp: at,
            account: account.to_string(),
            grant_id: spec.id.clone(),
            amount: crate::pricing::from_nanos(spec.amount),
            unit: unit.to_string(),
            kind: spec.kind,
            priority: spec.priority,
            expires_at: spec.expires_at,
            expires_at_period_end: spec.expires_at_period_end,
            source,
        }
    }
}

/// One journal entry.
// Usage records are nearly every entry; boxing them would add an allocation per request to
// shrink the rare grant.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LedgerEntry {
    Usage(UsageRecord),
    Grant(GrantEntry),
}

impl LedgerEntry {
    /// The entry's unique id (sinks deduplicate on it).
    pub fn id(&self) -> Uuid {
        match self {
            LedgerEntry::Usage(r) => r.id,
            LedgerEntry::Grant(g) => g.id,
        }
    }

    /// The account (customer) the entry concerns.
    pub fn account(&self) -> &str {
        match self {
            LedgerEntry::Usage(r) => &r.account,
            LedgerEntry::Grant(g) => &g.account,
        }
    }

    pub fn timestamp(&self) -> DateTime<Utc> {
        match self {
            LedgerEntry::Usage(r) => r.timestamp,
            LedgerEntry::Grant(g) => g.timestamp,
        }
    }
}

impl From<UsageRecord> for LedgerEntry {
    fn from(r: UsageRecord) -> Self {
        LedgerEntry::Usage(r)
    }
}

impl From<GrantEntry> for LedgerEntry {
    fn from(g: GrantEntry) -> Self {
        LedgerEntry::Grant(g)
    }
}

enum Message {
    /// An entry, and who to tell once it is written.
    Record(Box<LedgerEntry>, Option<oneshot::Sender<()>>),
    Sync(oneshot::Sender<()>),
    /// Group-commit timer: fsync if anything is unsynced.
    Tick,
    /// Installs the checkpoint shadow: balances as of the last entry written, kept up to date
    /// by the writer as it appends (no re-reading, no re-parsing).
    Shadow(Box<Shadow>),
    /// Asks for the shadow's state and the sequence number it covers.
    Checkpoint(oneshot::Sender<Option<(u64, Vec<crate::balance::AccountSnapshot>)>>),
}

/// Balances built only from journaled entries, for checkpoints.
pub struct Shadow {
    pub balances: crate::balance::Balances,
    pub policies: checkpoint::PolicySource,
}

/// The request path's handle on the journal writer.
pub struct Ledger {
    tx: mpsc::Sender<Message>,
    submitted: AtomicU64,
    shared: Arc<WriterShared>,
}

/// What the writer thread publishes.
#[derive(Default)]
pub struct WriterShared {
    written: AtomicU64,
    /// Sequence number of the last entry written (handed to the OS).
    last_seq: AtomicU64,
    /// Journal size on disk, bytes.
    size_bytes: AtomicU64,
    /// Wakes the flusher when entries are written.
    pub appended: tokio::sync::Notify,
    /// Bytes of segments deleted after a checkpoint.
    freed_bytes: AtomicU64,
}

impl WriterShared {
    /// Sequence number of the last entry written.
    pub fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Acquire)
    }

    /// Records segments deleted after a checkpoint.
    pub fn note_freed(&self, bytes: u64) {
        self.freed_bytes.fetch_add(bytes, Ordering::AcqRel);
    }
}

impl Ledger {
    /// Starts the writer thread over `journal`.
    pub fn start(
        journal: Box<dyn Journal>,
        channel_capacity: usize,
        fsync: FsyncPolicy,
    ) -> std::io::Result<Arc<Ledger>> {
        let (tx, rx) = mpsc::channel(channel_capacity.max(1));
        let shared = Arc::new(WriterShared::default());
        shared.last_seq.store(journal.last_seq(), Ordering::Release);
        shared
            .size_bytes
            .store(journal.size_bytes(), Ordering::Release);
        let writer_shared = shared.clone();
        std::thread::Builder::new()
            .name("tollgate-journal".into())
            .spawn(move || write_loop(journal, rx, &writer_shared, fsync))?;
        if let FsyncPolicy::Interval(every) = fsync {
            // The timer only holds a weak sender, so it ends once the ledger is gone.
            let ticks = tx.downgrade();
            std::thread::Builder::new()
                .name("tollgate-journal-tick".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(every);
                        let Some(tx) = ticks.upgrade() else { return };
                        let _ = tx.try_send(Message::Tick);
                    }
                })?;
        }
        Ok(Arc::new(Ledger {
            tx,
            submitted: AtomicU64::new(0),
            shared,
        }))
    }

    /// What the writer publishes (flusher, metrics).
    pub fn shared(&self) -> &Arc<WriterShared> {
        &self.shared
    }

    /// Journal size on disk, bytes.
    pub fn journal_bytes(&self) -> u64 {
        self.shared
            .size_bytes
            .load(Ordering::Acquire)
            .saturating_sub(self.shared.freed_bytes.load(Ordering::Acquire))
    }

    /// Sequence number of the last entry written.
    pub fn last_seq(&self) -> u64 {
        self.shared.last_seq.load(Ordering::Acquire)
    }

    /// Hands a record to the writer. Never blocks: when the channel is full the record waits
    /// in a task for room (back-pressure is counted, records are never dropped).
    pub fn submit(&self, entry: impl Into<LedgerEntry>) {
        self.send(Message::Record(Box::new(entry.into()), None));
    }

    /// Like [`Ledger::submit`], and the returned receiver completes once the entry is written
    /// to the journal (handed to the OS; with `fsync = "always"`, synced). The metered body
    /// holds the end of a response on it, so a response a client received is never lost to a
    /// crash of the process.
    pub fn submit_acked(&self, entry: impl Into<LedgerEntry>) -> oneshot::Receiver<()> {
        let (ack, written) = oneshot::channel();
        self.send(Message::Record(Box::new(entry.into()), Some(ack)));
        written
    }

    /// Like [`Ledger::submit_acked`], completing a sender the caller made.
    pub fn submit_notify(&self, entry: impl Into<LedgerEntry>, ack: oneshot::Sender<()>) {
        self.send(Message::Record(Box::new(entry.into()), Some(ack)));
    }

    fn send(&self, msg: Message) {
        self.submitted.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(msg)) => {
                let tx = self.tx.clone();
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn(async move {
                            if tx.send(msg).await.is_err() {
                                tracing::error!("usage record submitted after the journal closed");
                            }
                        });
                    }
                    Err(_) => {
                        if tx.blocking_send(msg).is_err() {
                            tracing::error!("usage record submitted after the journal closed");
                        }
                    }
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("usage record submitted after the journal closed");
            }
        }
    }

    /// Hands the writer the checkpoint shadow (balances as of the last entry written). Call
    /// before any entry is submitted.
    pub async fn install_shadow(&self, shadow: Shadow) {
        if self
            .tx
            .send(Message::Shadow(Box::new(shadow)))
            .await
            .is_err()
        {
            tracing::error!("journal writer is gone; checkpoints disabled");
        }
    }

    /// The shadow's state and the sequence number it covers (None without a shadow).
    pub async fn checkpoint_state(&self) -> Option<(u64, Vec<crate::balance::AccountSnapshot>)> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Message::Checkpoint(tx)).await.ok()?;
        rx.await.ok().flatten()
    }

    /// Records handed to the writer so far.
    pub fn submitted(&self) -> u64 {
        self.submitted.load(Ordering::Relaxed)
    }

    /// Records appended to the journal so far.
    pub fn written(&self) -> u64 {
        self.shared.written.load(Ordering::Acquire)
    }

    /// Returns once every record submitted before the call is written and synced to disk.
    pub async fn sync(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Sync(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Waits until at least `n` records were submitted and all of them are written, or
    /// `timeout` passes; returns whether they were. For tests and shutdown.
    pub async fn wait_written(&self, n: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.submitted() >= n {
                self.sync().await;
                if self.written() >= n {
                    return true;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Flushes and fsyncs everything submitted so far; used at shutdown.
    pub async fn close(&self) {
        self.sync().await;
    }
}

fn write_loop(
    mut journal: Box<dyn Journal>,
    mut rx: mpsc::Receiver<Message>,
    shared: &WriterShared,
    fsync: FsyncPolicy,
) {
    let mut batch: Vec<LedgerEntry> = Vec::with_capacity(MAX_BATCH);
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    let mut acks: Vec<oneshot::Sender<()>> = Vec::new();
    let mut unsynced = false;
    let mut last_sync = std::time::Instant::now();
    let mut shadow: Option<Box<Shadow>> = None;
    let mut checkpoint_requests = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut tick = false;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Message::Record(r, ack) => {
                    batch.push(*r);
                    acks.extend(ack);
                }
                Message::Sync(w) => waiters.push(w),
                Message::Tick => tick = true,
                Message::Shadow(s) => shadow = Some(s),
                Message::Checkpoint(reply) => checkpoint_requests.push(reply),
            }
            if batch.len() >= MAX_BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !batch.is_empty() {
            loop {
                match journal.append(&batch).and_then(|()| journal.flush()) {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::error!(error = %e, records = batch.len(), "journal write failed; retrying");
                        std::thread::sleep(WRITE_RETRY_DELAY);
                    }
                }
            }
            unsynced = true;
            if let Some(sh) = &shadow {
                let now = chrono::Utc::now();
                for entry in &batch {
                    sh.balances.apply_entry(entry, &*sh.policies, now);
                }
            }
        }
        let due = match fsync {
            FsyncPolicy::Always => unsynced,
            FsyncPolicy::Interval(every) => unsynced && (tick || last_sync.elapsed() >= every),
            FsyncPolicy::Never => false,
        };
        if (due || !waiters.is_empty()) && unsynced {
            loop {
                match journal.sync() {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "journal fsync failed; retrying");
                        std::thread::sleep(WRITE_RETRY_DELAY);
                    }
                }
            }
            unsynced = false;
            last_sync = std::time::Instant::now();
        }
        if !batch.is_empty() {
            shared
                .written
                .fetch_add(batch.len() as u64, Ordering::Release);
            shared.last_seq.store(journal.last_seq(), Ordering::Release);
            shared
                .size_bytes
                .store(journal.size_bytes(), Ordering::Release);
            shared.appended.notify_waiters();
            batch.clear();
        }
        for w in waiters.drain(..).chain(acks.drain(..)) {
            let _ = w.send(());
        }
        for reply in checkpoint_requests.drain(..) {
            let state = shadow
                .as_ref()
                .map(|sh| (journal.last_seq(), sh.balances.export()));
            let _ = reply.send(state);
        }
    }
    if let Err(e) = journal.sync() {
        tracing::error!(error = %e, "final journal sync failed");
    }
}
