//! The flusher: ships journaled entries to each sink in batches, each sink on its own task
//! with its own durable cursor (`cursors/<sink>` in the journal directory: the sequence number
//! of the last entry the sink accepted). Delivery is at-least-once — a crash between a
//! delivery and its cursor write resends that batch — and sinks deduplicate on entry ids, so
//! the effect is exactly-once. A sink that is down never blocks the request path: its cursor
//! simply stops while the journal keeps the entries; retries back off exponentially with full
//! jitter.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::journal::JournalReader;
use super::sink::{Sink, SinkError};
use super::{LedgerEntry, WriterShared};

/// Entries per delivery at most.
pub const FLUSH_BATCH: usize = 500;
/// How long an idle sink task waits for new entries before looking again.
const IDLE_POLL: Duration = Duration::from_millis(200);
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A sink's progress, for metrics and tests.
#[derive(Debug, Default)]
pub struct SinkProgress {
    pub name: String,
    /// Sequence number of the last entry the sink accepted.
    pub cursor: AtomicU64,
    /// Failed delivery attempts.
    pub failures: AtomicU64,
    /// Timestamp (unix ms) of the oldest entry not yet delivered, or 0 when caught up.
    pub oldest_pending_ms: AtomicI64,
}

/// The running flusher.
pub struct Flusher {
    pub progress: Vec<Arc<SinkProgress>>,
    tasks: Vec<JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

fn cursor_path(dir: &Path, sink: &str) -> PathBuf {
    dir.join("cursors").join(sink)
}

/// The sink's cursor as last written (0 when none).
pub fn read_cursor(dir: &Path, sink: &str) -> u64 {
    std::fs::read_to_string(cursor_path(dir, sink))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn write_cursor(dir: &Path, sink: &str, seq: u64) -> std::io::Result<()> {
    let path = cursor_path(dir, sink);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, seq.to_string())?;
    std::fs::rename(&tmp, &path)
}

impl Flusher {
    /// Starts one task per sink.
    pub fn start(dir: &Path, sinks: Vec<Arc<dyn Sink>>, writer: Arc<WriterShared>) -> Flusher {
        let (stop, stop_rx) = watch::channel(false);
        let mut progress = Vec::new();
        let mut tasks = Vec::new();
        for sink in sinks {
            let p = Arc::new(SinkProgress {
                name: sink.name().to_string(),
                ..SinkProgress::default()
            });
            let cursor = read_cursor(dir, sink.name());
            p.cursor.store(cursor, Ordering::Release);
            progress.push(p.clone());
            tasks.push(tokio::spawn(run_sink(
                dir.to_path_buf(),
                sink,
                p,
                writer.clone(),
                stop_rx.clone(),
            )));
        }
        Flusher {
            progress,
            tasks,
            stop,
        }
    }

    /// Asks every sink task to ship what is journaled, then stop; waits at most `grace`.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.stop.send(true);
        let all = futures_util::future::join_all(self.tasks);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                "sinks did not catch up within the shutdown grace; they resume from their cursors at the next start"
            );
        }
    }
}

async fn run_sink(
    dir: PathBuf,
    sink: Arc<dyn Sink>,
    progress: Arc<SinkProgress>,
    writer: Arc<WriterShared>,
    mut stop: watch::Receiver<bool>,
) {
    let name = sink.name().to_string();
    let mut reader = Some(JournalReader::new(
        &dir,
        progress.cursor.load(Ordering::Acquire),
    ));
    loop {
        let stopping = *stop.borrow();
        let Some(current) = reader.take() else { return };
        let Some((back, read)) = read_batch(current).await else {
            return;
        };
        reader = Some(back);
        let batch = match read {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(sink = %name, error = %e, "cannot read the journal");
                Vec::new()
            }
        };
        if batch.is_empty() {
            progress.oldest_pending_ms.store(0, Ordering::Release);
            if stopping {
                return;
            }
            let appended = writer.appended.notified();
            tokio::select! {
                _ = appended => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let last = batch.last().map_or(0, |(seq, _)| *seq);
        let entries: Vec<LedgerEntry> = batch.into_iter().map(|(_, e)| e).collect();
        if let Some(first) = entries.first() {
            progress
                .oldest_pending_ms
                .store(first.timestamp().timestamp_millis(), Ordering::Release);
        }
        let mut backoff = INITIAL_BACKOFF;
        loop {
            match sink.deliver(&entries).await {
                Ok(()) => break,
                Err(e) => {
                    progress.failures.fetch_add(1, Ordering::Relaxed);
                    match &e {
                        SinkError::Retryable(_) => {
                            tracing::warn!(sink = %name, error = %e, entries = entries.len(), "sink delivery failed; retrying")
                        }
                        SinkError::Rejected(_) => {
                            tracing::error!(sink = %name, error = %e, entries = entries.len(), "sink rejected a batch; retrying slowly — the entries stay in the journal")
                        }
                    }
                    if *stop.borrow() {
                        // Shutting down: the entries stay journaled and are resent at the
                        // next start from the cursor.
                        return;
                    }
                    let wait = jitter(backoff);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = match e {
                        SinkError::Retryable(_) => (backoff * 2).min(MAX_BACKOFF),
                        SinkError::Rejected(_) => MAX_BACKOFF,
                    };
                }
            }
        }
        if let Err(e) = write_cursor(&dir, &name, last) {
            tracing::error!(sink = %name, error = %e, "cannot save the sink cursor; the batch may be resent");
        }
        progress.cursor.store(last, Ordering::Release);
    }
}

/// Reads the next batch off the runtime threads (file I/O). `None` when the runtime is
/// shutting down.
async fn read_batch(
    mut reader: JournalReader,
) -> Option<(JournalReader, std::io::Result<Vec<(u64, LedgerEntry)>>)> {
    match tokio::task::spawn_blocking(move || {
        let batch = reader.read(FLUSH_BATCH);
        (reader, batch)
    })
    .await
    {
        Ok(done) => Some(done),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => None,
    }
}

/// Full jitter: uniformly random in `[0, ceiling]`.
fn jitter(ceiling: Duration) -> Duration {
    let ms = u64::try_from(ceiling.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    Duration::from_millis(rand::rng().random_range(0..=ms))
}
