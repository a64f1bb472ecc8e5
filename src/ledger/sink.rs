//! Upstream ledger sinks: where journaled entries are shipped in batches by the flusher.
//! Delivery is at-least-once (each sink has a durable cursor in the journal directory); every
//! entry carries a unique id, so a sink that deduplicates on it makes delivery exactly-once in
//! effect.

use std::future::Future;
use std::pin::Pin;

use super::LedgerEntry;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a batch was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Worth retrying with backoff (sink down, timeout, 5xx).
    #[error("{0}")]
    Retryable(String),
    /// Retrying the same batch cannot help (e.g. the sink rejects the data); the flusher logs
    /// it loudly and keeps retrying slowly rather than dropping entries.
    #[error("{0}")]
    Rejected(String),
}

/// A destination for journaled entries.
pub trait Sink: Send + Sync {
    /// Stable name: names the sink's cursor file and its metrics.
    fn name(&self) -> &str;

    /// Delivers a batch, in journal order. `Ok` only once the sink has durably accepted every
    /// entry; entries already present (same id) must be accepted silently.
    fn deliver<'a>(&'a self, batch: &'a [LedgerEntry]) -> BoxFuture<'a, Result<(), SinkError>>;
}
