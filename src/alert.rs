//! Alerts: the [`AlertEvent`]s metering raises (spend and allowance thresholds, caps, low
//! balance, top-ups), the pure helpers that decide when a threshold is crossed, and the
//! [`Alerter`] that delivers events as signed webhooks off the request path.
//!
//! The request path only calls [`Alerter::send`], which never blocks and never fails: the
//! event goes into a bounded channel and a background task POSTs it to every target with
//! retries. When the channel is full the event is dropped, counted in [`Alerter::dropped`] and
//! logged at error level — an alert is never worth slowing or failing a request.
//!
//! # Webhook signature
//!
//! Every delivery carries:
//!
//! | header | value |
//! |---|---|
//! | `content-type` | `application/json` |
//! | `x-tollgate-event-id` | the event's UUIDv7 `id`: the idempotency key (retries repeat it) |
//! | `x-tollgate-timestamp` | Unix seconds when this attempt was signed |
//! | `x-tollgate-signature` | `sha256=` + lowercase hex HMAC-SHA256(secret, `"{timestamp}.{body}"`) |
//!
//! `body` is the raw request body bytes, exactly as received (verify before parsing). A
//! receiver recomputes the HMAC with the shared secret and compares it in constant time
//! ([`verify`] does both), rejects timestamps more than [`SIGNATURE_TOLERANCE_SECS`] from its
//! own clock (replay protection; each retry is signed afresh), and dedups on the event id,
//! since a delivery whose 2xx was lost is sent again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use http_body_util::Full;
use rand::Rng;
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, Semaphore, mpsc};
use uuid::Uuid;

use crate::config::Secret;

/// Default capacity of the channel between [`Alerter::send`] and the delivery task, events.
pub const DEFAULT_ALERT_CHANNEL_CAPACITY: usize = 4_096;
/// Default attempts per (event, target) before giving up, the first one included.
pub const DEFAULT_ALERT_MAX_ATTEMPTS: u32 = 8;
/// Default backoff ceiling before the second attempt; it doubles per attempt.
pub const DEFAULT_ALERT_INITIAL_BACKOFF_MS: u64 = 200;
/// Default upper bound on the backoff ceiling.
pub const DEFAULT_ALERT_MAX_BACKOFF_MS: u64 = 30_000;
/// Default time allowed for one attempt: connect, send, and the response status.
pub const DEFAULT_ALERT_REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Default deliveries in flight at once; past it the delivery task stops taking events off
/// the channel, so a slow receiver fills the channel and further alerts are dropped (counted)
/// instead of piling up tasks without bound.
pub const DEFAULT_ALERT_MAX_CONCURRENT_DELIVERIES: usize = 256;
/// How far from its own clock a receiver should accept `x-tollgate-timestamp`, seconds.
pub const SIGNATURE_TOLERANCE_SECS: i64 = 300;

/// Prefix of the `x-tollgate-signature` value, naming the MAC.
const SIGNATURE_PREFIX: &str = "sha256=";
/// HMAC-SHA256 block size, bytes (RFC 2104 `B`).
const HMAC_SHA256_BLOCK_BYTES: usize = 64;
/// Idle pooled connections kept per receiver host.
const POOL_MAX_IDLE_PER_HOST: usize = 8;

/// What an alert reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// Spend in the period reached a fraction (`threshold`) of the hard cap (`limit`).
    SpendThreshold,
    /// Use of the period's included allowance reached a fraction (`threshold`) of it.
    AllowanceThreshold,
    /// Spend passed the soft cap: requests still flow.
    SoftCap,
    /// The prepaid balance fell through the configured low-balance level (`limit`).
    LowBalance,
    /// An automatic top-up grant was added to the balance; for the payment system to charge.
    AutoTopUp,
    /// Spend reached the hard cap: further requests are refused until the period ends.
    HardCapReached,
}

/// One alert, as delivered in the webhook body (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertEvent {
    /// UUIDv7; also the idempotency key receivers dedup on (retries repeat it).
    pub id: Uuid,
    pub kind: AlertKind,
    pub account: String,
    /// The key (`keys[].id`) the alert concerns, when it concerns one key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Start of the budget period the alert belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_start: Option<DateTime<Utc>>,
    /// The fraction crossed, as a decimal string (`"0.75"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<String>,
    /// The amount now (spend, use, balance, grant), as a decimal string in `unit`.
    pub value: String,
    /// The cap, allowance or level `value` is measured against, as a decimal string in `unit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    /// `USD`, `credits`, …
    pub unit: String,
    /// When the alert was raised.
    pub timestamp: DateTime<Utc>,
    /// A human-readable sentence.
    pub message: String,
}

impl AlertEvent {
    /// An event with a fresh UUIDv7 id, stamped now; the optional fields start empty.
    pub fn new(
        kind: AlertKind,
        account: impl Into<String>,
        value: impl Into<String>,
        unit: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            kind,
            account: account.into(),
            key_id: None,
            period_start: None,
            threshold: None,
            value: value.into(),
            limit: None,
            unit: unit.into(),
            timestamp: Utc::now(),
            message: message.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// When to alert.
// ---------------------------------------------------------------------------------------------

/// The fractions `f` of `fractions` whose level `f × limit` lies in `(before, after]`, in the
/// order given. Amounts are fixed-point integers (money in minor units); the level is computed
/// exactly in decimal and rounded up to an integer, so "reached 75%" means `after ≥ ⌈0.75 ×
/// limit⌉`. Reaching a level exactly counts. A non-positive `limit`, an empty interval
/// (`after <= before`) and a fraction whose level does not fit an `i64` yield nothing.
///
/// # Exactly once per period, without shared state
///
/// Pass `before` and `after` from an atomic `fetch_add` on the period's monotonic counter:
/// `before = counter.fetch_add(amount)`, `after = before + amount`. The atomic orders all
/// updates, so the intervals `(before, after]` the callers see are disjoint and together tile
/// `(0, total]`. Every integer level up to the total lies in exactly one of them, so exactly
/// one caller reports each crossing — no lock, no "already alerted" flag, no lost or doubled
/// alert under any interleaving. A fresh counter per period re-arms the thresholds.
///
/// This relies on monotonicity: a counter that also goes down (refunds) can re-cross a level
/// and re-report it. Keep refunds out of the counter, or dedup downstream.
pub fn crossed_thresholds(
    before: i64,
    after: i64,
    limit: i64,
    fractions: &[Decimal],
) -> Vec<Decimal> {
    if limit <= 0 || after <= before {
        return Vec::new();
    }
    fractions
        .iter()
        .copied()
        .filter(|&f| match threshold_level(f, limit) {
            Some(level) => before < level && level <= after,
            None => false,
        })
        .collect()
}

/// `⌈f × limit⌉`, when it is representable.
///
/// Runs on every settlement of a capped account, once per alert fraction, so it works on
/// the fraction's integer mantissa (`f = m / 10^scale`) instead of multiplying decimals:
/// one 128-bit multiply and divide, exact. That is also exact where a decimal product would
/// not be: past 28 significant digits `Decimal` rounds before the ceiling is taken
/// (0.8888888888888888888888888889 × 9 is 8.0000000000000000000000000001, level 9, which the
/// decimal product rounds to 8). Only a product past 128 bits (a mantissa with about 19 or
/// more digits, trailing zeros included, against a limit near `i64::MAX` nano-units) takes
/// the decimal arithmetic, rounding included.
fn threshold_level(fraction: Decimal, limit: i64) -> Option<i64> {
    let divisor = 10i128.checked_pow(fraction.scale())?;
    match fraction.mantissa().checked_mul(i128::from(limit)) {
        Some(product) => {
            let floor = product.div_euclid(divisor);
            let level = floor + i128::from(product.rem_euclid(divisor) != 0);
            i64::try_from(level).ok()
        }
        None => decimal_level(fraction, limit),
    }
}

/// `⌈f × limit⌉` in decimal arithmetic.
fn decimal_level(fraction: Decimal, limit: i64) -> Option<i64> {
    fraction.checked_mul(Decimal::from(limit))?.ceil().to_i64()
}

/// Whether a balance moving from `before` to `after` fell through `threshold`: `before >
/// threshold >= after`. With `before`/`after` from an atomic `fetch_sub` on the balance, one
/// caller sees each fall; a balance topped back up above the level re-arms it.
pub fn crossed_below(before: i64, after: i64, threshold: i64) -> bool {
    before > threshold && threshold >= after
}

// ---------------------------------------------------------------------------------------------
// Signatures.
// ---------------------------------------------------------------------------------------------

/// The `x-tollgate-signature` value for a body sent at `timestamp` (Unix seconds):
/// `sha256=` + lowercase hex HMAC-SHA256(`secret`, `"{timestamp}.{body}"`).
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = signing_mac(secret, timestamp, body).finalize().into_bytes();
    format!("{SIGNATURE_PREFIX}{}", hex::encode(tag))
}

/// Whether `signature` (an `x-tollgate-signature` value) is [`sign`]'s for these inputs. The
/// MAC is compared in constant time. It does not check the timestamp's age: receivers should
/// also reject timestamps more than [`SIGNATURE_TOLERANCE_SECS`] from their clock.
pub fn verify(secret: &str, timestamp: i64, body: &[u8], signature: &str) -> bool {
    let Some(hex_tag) = signature.trim().strip_prefix(SIGNATURE_PREFIX) else {
        return false;
    };
    let Ok(tag) = hex::decode(hex_tag) else {
        return false;
    };
    signing_mac(secret, timestamp, body)
        .verify_slice(&tag)
        .is_ok()
}

fn signing_mac(secret: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = hmac_sha256(secret.as_bytes());
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// HMAC-SHA256 keyed with `key` of any length. The key is brought to the block size as RFC
/// 2104 says (hashed when longer, zero-padded), which makes construction infallible.
fn hmac_sha256(key: &[u8]) -> Hmac<Sha256> {
    let mut block = hmac::digest::Key::<Hmac<Sha256>>::default();
    if key.len() > HMAC_SHA256_BLOCK_BYTES {
        let digest = Sha256::digest(key);
        block[..digest.len()].copy_from_slice(&digest);
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    <Hmac<Sha256> as Mac>::new(&block)
}

// ---------------------------------------------------------------------------------------------
// Delivery.
// ---------------------------------------------------------------------------------------------

/// Settings of an [`Alerter`].
#[derive(Clone, Debug)]
pub struct AlerterConfig {
    /// Shared secret for the `x-tollgate-signature` HMAC.
    pub signing_secret: Secret,
    /// Events buffered between [`Alerter::send`] and delivery; past it events are dropped.
    pub channel_capacity: usize,
    /// Attempts per (event, target), the first included, before giving up.
    pub max_attempts: u32,
    /// Backoff ceiling before the second attempt; it doubles per attempt up to `max_backoff`,
    /// and the actual pause is drawn uniformly from `[0, ceiling]` (full jitter).
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Time allowed for one attempt, connecting included.
    pub request_timeout: Duration,
    /// Deliveries in flight at once.
    pub max_concurrent_deliveries: usize,
}

impl AlerterConfig {
    /// The defaults (`DEFAULT_ALERT_*`) with this signing secret.
    pub fn new(signing_secret: Secret) -> Self {
        Self {
            signing_secret,
            channel_capacity: DEFAULT_ALERT_CHANNEL_CAPACITY,
            max_attempts: DEFAULT_ALERT_MAX_ATTEMPTS,
            initial_backoff: Duration::from_millis(DEFAULT_ALERT_INITIAL_BACKOFF_MS),
            max_backoff: Duration::from_millis(DEFAULT_ALERT_MAX_BACKOFF_MS),
            request_timeout: Duration::from_millis(DEFAULT_ALERT_REQUEST_TIMEOUT_MS),
            max_concurrent_deliveries: DEFAULT_ALERT_MAX_CONCURRENT_DELIVERIES,
        }
    }
}

type WebhookClient = crate::http_client::HttpsClient;

/// The HTTP(S) client for webhook receivers.
fn build_client(request_timeout: Duration) -> Result<WebhookClient, String> {
    crate::http_client::build(&crate::http_client::ClientOptions {
        ca_file: None,
        connect_timeout: request_timeout,
        pool_max_idle_per_host: POOL_MAX_IDLE_PER_HOST,
    })
}

/// One [`Alerter::send`] call on its way to the delivery task.
struct Job {
    event: AlertEvent,
    targets: Vec<String>,
    _pending: PendingGuard,
}

/// State shared by the handle, the delivery task and the delivery attempts.
struct Shared {
    config: AlerterConfig,
    /// The client, or why it could not be built (every delivery then fails, logged).
    client: Result<WebhookClient, String>,
    delivered: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    /// Jobs queued or being dispatched, plus deliveries in flight.
    pending: AtomicUsize,
    idle: Notify,
}

/// Counts one unit of pending work while alive.
struct PendingGuard(Arc<Shared>);

impl PendingGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.pending.fetch_add(1, Ordering::AcqRel);
        Self(shared.clone())
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if self.0.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Delivers [`AlertEvent`]s to webhook targets in the background. See the module docs for the
/// wire format and signature.
pub struct Alerter {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

impl Alerter {
    /// Starts the delivery task on the current Tokio runtime. A `channel_capacity`,
    /// `max_attempts` or `max_concurrent_deliveries` of 0 is taken as 1.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, as [`tokio::spawn`] does.
    pub fn start(mut config: AlerterConfig) -> Arc<Alerter> {
        config.channel_capacity = config.channel_capacity.max(1);
        config.max_attempts = config.max_attempts.max(1);
        config.max_concurrent_deliveries = config.max_concurrent_deliveries.max(1);
        let (tx, rx) = mpsc::channel(config.channel_capacity);
        let slots = Arc::new(Semaphore::new(config.max_concurrent_deliveries));
        let shared = Arc::new(Shared {
            client: build_client(config.request_timeout),
            config,
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            idle: Notify::new(),
        });
        if let Err(e) = &shared.client {
            tracing::error!(error = %e, "alert webhooks: TLS setup failed; every delivery will fail");
        }
        tokio::spawn(dispatch(rx, shared.clone(), slots));
        Arc::new(Alerter { tx, shared })
    }

    /// Queues `event` for delivery to every URL in `targets` (`http://` or `https://`). Never
    /// blocks and never fails the caller: when the channel is full (or the delivery task is
    /// gone) the event is dropped, counted in [`Alerter::dropped`], and logged at error level.
    pub fn send(&self, event: AlertEvent, targets: Vec<String>) {
        if targets.is_empty() {
            return;
        }
        let job = Job {
            event,
            targets,
            _pending: PendingGuard::new(&self.shared),
        };
        let (reason, job) = match self.tx.try_send(job) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(job)) => ("alert channel is full", job),
            Err(mpsc::error::TrySendError::Closed(job)) => ("alert delivery task is gone", job),
        };
        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            event_id = %job.event.id,
            kind = ?job.event.kind,
            account = %job.event.account,
            dropped_total = self.dropped(),
            "alert dropped: {reason}"
        );
    }

    /// Waits until every event sent so far is delivered or given up on, or `timeout` passes;
    /// returns whether everything finished. Deliveries still running at the timeout go on.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let idle = async {
            loop {
                let notified = self.shared.idle.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.shared.pending.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, idle).await.is_ok()
    }

    /// (event, target) pairs a receiver accepted with a 2xx.
    pub fn delivered(&self) -> u64 {
        self.shared.delivered.load(Ordering::Relaxed)
    }

    /// (event, target) pairs given up on after `max_attempts`, or at once for a malformed URL.
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Events dropped by [`Alerter::send`] because the channel was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Alerter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerter")
            .field("delivered", &self.delivered())
            .field("failed", &self.failed())
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

/// Takes jobs off the channel and starts one delivery per (event, target), holding a
/// concurrency slot for each.
async fn dispatch(mut rx: mpsc::Receiver<Job>, shared: Arc<Shared>, slots: Arc<Semaphore>) {
    while let Some(job) = rx.recv().await {
        let body = match serde_json::to_vec(&job.event) {
            Ok(body) => Bytes::from(body),
            Err(e) => {
                let n = u64::try_from(job.targets.len()).unwrap_or(u64::MAX);
                shared.failed.fetch_add(n, Ordering::Relaxed);
                tracing::error!(event_id = %job.event.id, error = %e, "alert could not be serialised");
                continue;
            }
        };
        for target in job.targets {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                // The semaphore is never closed.
                return;
            };
            let pending = PendingGuard::new(&shared);
            let shared = shared.clone();
            let body = body.clone();
            let id = job.event.id;
            tokio::spawn(async move {
                deliver(&shared, id, &target, body).await;
                drop(slot);
                drop(pending);
            });
        }
    }
}

/// Why one attempt did not deliver.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("receiver answered {0}")]
    Status(http::StatusCode),
    #[error("{0}")]
    Transport(String),
    #[error("no answer within {0} ms")]
    Timeout(u128),
}

/// Delivers one body to one target, retrying with capped exponential backoff and full jitter.
async fn deliver(shared: &Shared, id: Uuid, target: &str, body: Bytes) {
    let config = &shared.config;
    let uri = match parse_target(target) {
        Ok(uri) => uri,
        Err(reason) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(event_id = %id, target = %redact(target), "alert target is not usable: {reason}");
            return;
        }
    };
    let shown = origin(&uri);
    for attempt in 1..=config.max_attempts {
        let result = attempt_once(shared, id, &uri, body.clone()).await;
        match result {
            Ok(()) => {
                shared.delivered.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(event_id = %id, target = %shown, attempt, "alert delivered");
                return;
            }
            Err(e) if attempt < config.max_attempts => {
                let pause = backoff(config.initial_backoff, config.max_backoff, attempt);
                tracing::warn!(
                    event_id = %id, target = %shown, attempt, error = %e,
                    retry_in_ms = pause.as_millis(),
                    "alert delivery failed; retrying"
                );
                tokio::time::sleep(pause).await;
            }
            Err(e) => {
                shared.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    event_id = %id, target = %shown, attempts = attempt, error = %e,
                    "alert delivery failed; giving up"
                );
            }
        }
    }
}

async fn attempt_once(
    shared: &Shared,
    id: Uuid,
    uri: &http::Uri,
    body: Bytes,
) -> Result<(), AttemptError> {
    let timestamp = Utc::now().timestamp();
    let signature = sign(shared.config.signing_secret.expose(), timestamp, &body);
    let request = http::Request::post(uri.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("tollgate/", env!("CARGO_PKG_VERSION")),
        )
        .header("x-tollgate-event-id", id.to_string())
        .header("x-tollgate-timestamp", timestamp.to_string())
        .header("x-tollgate-signature", signature)
        .body(Full::new(body))
        .map_err(|e| AttemptError::Transport(e.to_string()))?;
    let client = shared
        .client
        .as_ref()
        .map_err(|e| AttemptError::Transport(format!("no HTTP client: {e}")))?;
    let timeout = shared.config.request_timeout;
    match tokio::time::timeout(timeout, client.request(request)).await {
        Err(_) => Err(AttemptError::Timeout(timeout.as_millis())),
        Ok(Err(e)) => Err(AttemptError::Transport(crate::http_client::error_chain(&e))),
        Ok(Ok(response)) if response.status().is_success() => Ok(()),
        Ok(Ok(response)) => Err(AttemptError::Status(response.status())),
    }
}

/// The pause after failed attempt `attempt` (1-based): uniform in `[0, min(max, initial ×
/// 2^(attempt-1))]`.
fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    let ceiling = initial.saturating_mul(factor).min(max);
    let ceiling_ns = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::rng().random_range(0..=ceiling_ns))
}

fn parse_target(target: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = target
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("the URL must start with http:// or https://".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    Ok(uri)
}

/// `scheme://host[:port]` of a target, for logs: webhook URLs often carry a token in the path
/// or query, and credentials in the authority.
fn origin(uri: &http::Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("?");
    let host = uri.host().unwrap_or("?");
    match uri.port_u16() {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    }
}

/// A loggable form of a target that did not parse.
fn redact(target: &str) -> String {
    target
        .parse::<http::Uri>()
        .map_or_else(|_| "<malformed URL>".to_string(), |u| origin(&u))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::str::FromStr;
    use std::sync::atomic::AtomicI64;

    use proptest::prelude::*;

    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn fractions() -> Vec<Decimal> {
        ["0.5", "0.75", "0.9", "1", "1.5"]
            .iter()
            .map(|s| d(s))
            .collect()
    }

    #[test]
    fn reaching_a_threshold_exactly_counts() {
        let f = fractions();
        assert_eq!(crossed_thresholds(0, 499, 1000, &f), Vec::<Decimal>::new());
        assert_eq!(crossed_thresholds(499, 500, 1000, &f), vec![d("0.5")]);
        assert_eq!(
            crossed_thresholds(500, 501, 1000, &f),
            Vec::<Decimal>::new()
        );
        assert_eq!(crossed_thresholds(999, 1000, 1000, &f), vec![d("1")]);
    }

    #[test]
    fn several_thresholds_in_one_jump_are_all_reported_in_order() {
        let f = fractions();
        assert_eq!(
            crossed_thresholds(100, 1000, 1000, &f),
            vec![d("0.5"), d("0.75"), d("0.9"), d("1")]
        );
        assert_eq!(crossed_thresholds(0, 10_000, 1000, &f), f);
    }

    #[test]
    fn levels_are_exact_where_a_decimal_product_would_round() {
        // 0.8888888888888888888888888889 × 9 = 8.0000000000000000000000000001: the level is
        // 9; the decimal product, rounded to 28 digits first, says 8.
        let f = d("0.8888888888888888888888888889");
        assert_eq!(threshold_level(f, 9), Some(9));
        assert_eq!(decimal_level(f, 9), Some(8));
        assert!(crossed_thresholds(0, 8, 9, &[f]).is_empty());
        assert_eq!(crossed_thresholds(8, 9, 9, &[f]), vec![f]);
    }

    #[test]
    fn levels_round_up_to_whole_units() {
        // 0.333 × 1000 = 333 exactly; 0.3333 × 1000 = 333.3 → 334.
        assert_eq!(
            crossed_thresholds(332, 333, 1000, &[d("0.333")]),
            vec![d("0.333")]
        );
        assert!(crossed_thresholds(332, 333, 1000, &[d("0.3333")]).is_empty());
        assert_eq!(
            crossed_thresholds(333, 334, 1000, &[d("0.3333")]),
            vec![d("0.3333")]
        );
    }

    proptest! {
        /// The integer shortcut gives the decimal product's ceiling, whatever the signs,
        /// scales and sizes, wherever the decimal product is exact (within 96 bits; beyond,
        /// the decimal rounds and the shortcut stays exact).
        #[test]
        fn the_integer_level_is_the_decimal_ceiling(
            mantissa in -(1i64 << 40)..(1i64 << 40),
            scale in 0u32..=12,
            limit in prop_oneof![-1000i64..1000, any::<i64>()],
        ) {
            let exact = i128::from(mantissa) * i128::from(limit);
            prop_assume!(exact.unsigned_abs() < 1u128 << 96);
            let fraction = Decimal::new(mantissa, scale);
            prop_assert_eq!(
                threshold_level(fraction, limit),
                decimal_level(fraction, limit),
                "{} x {}", fraction, limit
            );
        }
    }

    #[test]
    fn hovering_around_a_threshold_fires_once_on_a_monotonic_counter() {
        let f = [d("0.75")];
        let mut counter = 740i64;
        let mut fired = 0;
        // Tiny and zero increments around 750: only the one that reaches it reports.
        for amount in [3, 0, 5, 1, 0, 1, 1, 0, 2, 1] {
            let before = counter;
            counter += amount;
            fired += crossed_thresholds(before, counter, 1000, &f).len();
        }
        assert_eq!(counter, 754);
        assert_eq!(fired, 1);
    }

    #[test]
    fn degenerate_inputs_report_nothing() {
        let f = fractions();
        assert!(crossed_thresholds(0, 1000, 0, &f).is_empty());
        assert!(crossed_thresholds(0, 1000, -5, &f).is_empty());
        assert!(crossed_thresholds(600, 600, 1000, &f).is_empty());
        assert!(crossed_thresholds(900, 100, 1000, &f).is_empty());
        assert!(crossed_thresholds(0, i64::MAX, i64::MAX, &[d("2")]).is_empty());
        assert_eq!(
            crossed_thresholds(i64::MAX - 1, i64::MAX, i64::MAX, &[d("1")]),
            vec![d("1")]
        );
    }

    #[test]
    fn crossed_below_fires_when_the_balance_falls_through_the_level() {
        assert!(crossed_below(150, 100, 100));
        assert!(crossed_below(101, 50, 100));
        assert!(!crossed_below(100, 50, 100));
        assert!(!crossed_below(150, 101, 100));
        assert!(!crossed_below(50, 150, 100));
        assert!(!crossed_below(100, 100, 100));
    }

    proptest! {
        /// Any split of a monotonic total into consecutive intervals reports each reachable
        /// level exactly once.
        #[test]
        fn consecutive_intervals_report_each_level_once(
            limit in 1i64..1_000_000,
            amounts in proptest::collection::vec(0i64..50_000, 0..200),
        ) {
            let f = fractions();
            let mut counts: HashMap<Decimal, usize> = HashMap::new();
            let mut total = 0i64;
            for a in amounts {
                for x in crossed_thresholds(total, total + a, limit, &f) {
                    *counts.entry(x).or_default() += 1;
                }
                total += a;
            }
            for x in &f {
                let level = threshold_level(*x, limit).unwrap();
                let expected = usize::from(level <= total && level > 0);
                prop_assert_eq!(counts.get(x).copied().unwrap_or(0), expected);
            }
        }
    }

    /// Threads racing `fetch_add` on one counter report every threshold exactly once.
    #[test]
    fn concurrent_fetch_add_reports_each_threshold_exactly_once() {
        const THREADS: usize = 8;
        const LIMIT: i64 = 1_000_000;
        let f: Vec<Decimal> = [
            "0.1", "0.25", "0.5", "0.75", "0.9", "0.999", "1", "1.2", "2",
        ]
        .iter()
        .map(|s| d(s))
        .collect();
        for _round in 0..50 {
            let counter = AtomicI64::new(0);
            let reports: Vec<Vec<Decimal>> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..THREADS)
                    .map(|_| {
                        let counter = &counter;
                        let f = &f;
                        scope.spawn(move || {
                            let mut rng = rand::rng();
                            let mut seen = Vec::new();
                            loop {
                                let amount = rng.random_range(0..=300);
                                let before = counter.fetch_add(amount, Ordering::AcqRel);
                                if before >= 3 * LIMIT {
                                    break;
                                }
                                seen.extend(crossed_thresholds(before, before + amount, LIMIT, f));
                            }
                            seen
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let mut counts: HashMap<Decimal, usize> = HashMap::new();
            for x in reports.into_iter().flatten() {
                *counts.entry(x).or_default() += 1;
            }
            for x in &f {
                assert_eq!(counts.get(x), Some(&1), "threshold {x}");
            }
        }
    }

    /// RFC 4231 test cases 1, 2 and 6 (the last has a key longer than the block).
    #[test]
    fn hmac_matches_rfc_4231() {
        let cases: [(&[u8], &[u8], &str); 3] = [
            (
                &[0x0b; 20],
                b"Hi There",
                "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
            ),
            (
                b"Jefe",
                b"what do ya want for nothing?",
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
            (
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First",
                "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
            ),
        ];
        for (key, data, expected) in cases {
            let mut mac = hmac_sha256(key);
            mac.update(data);
            assert_eq!(hex::encode(mac.finalize().into_bytes()), expected);
        }
    }

    #[test]
    fn sign_and_verify() {
        let body = br#"{"id":"x"}"#;
        let sig = sign("whsec_test", 1_700_000_000, body);
        assert!(sig.starts_with("sha256="));
        assert_eq!(sig.len(), "sha256=".len() + 64);
        // The signed message is "<timestamp>.<body>".
        let mut mac = hmac_sha256(b"whsec_test");
        mac.update(br#"1700000000.{"id":"x"}"#);
        assert_eq!(
            sig,
            format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
        );

        assert!(verify("whsec_test", 1_700_000_000, body, &sig));
        assert!(!verify("whsec_other", 1_700_000_000, body, &sig));
        assert!(!verify("whsec_test", 1_700_000_001, body, &sig));
        assert!(!verify("whsec_test", 1_700_000_000, br#"{"id":"y"}"#, &sig));
        assert!(!verify("whsec_test", 1_700_000_000, body, &sig[7..]));
        assert!(!verify("whsec_test", 1_700_000_000, body, "sha256=zz"));
        assert!(!verify(
            "whsec_test",
            1_700_000_000,
            body,
            &sig[..sig.len() - 2]
        ));
        assert!(!verify("whsec_test", 1_700_000_000, body, ""));
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let initial = Duration::from_millis(200);
        let max = Duration::from_secs(30);
        for attempt in 1..40 {
            let ceiling = initial
                .saturating_mul(1u32.checked_shl(attempt - 1).unwrap_or(u32::MAX))
                .min(max);
            for _ in 0..20 {
                assert!(backoff(initial, max, attempt) <= ceiling);
            }
        }
        assert!(backoff(initial, max, 1) <= initial);
    }

    #[test]
    fn targets_are_checked_and_logged_without_path() {
        assert!(parse_target("https://hooks.example.com/a?b=c").is_ok());
        assert!(parse_target("http://127.0.0.1:9/x").is_ok());
        assert!(parse_target("ftp://example.com/").is_err());
        assert!(parse_target("/relative").is_err());
        assert!(parse_target("not a url").is_err());
        assert_eq!(
            redact("https://user:pw@hooks.example.com:8443/services/T0/B0/SECRET?x=1"),
            "https://hooks.example.com:8443"
        );
        assert_eq!(redact("::::"), "<malformed URL>");
    }

    #[test]
    fn events_serialise_with_snake_case_kinds_and_round_trip() {
        let mut e = AlertEvent::new(AlertKind::HardCapReached, "acme", "100.00", "USD", "cap");
        e.limit = Some("100.00".into());
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["kind"], "hard_cap_reached");
        assert!(json.get("key_id").is_none());
        let back: AlertEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, e);
        assert_eq!(e.id.get_version_num(), 7);
    }
}
