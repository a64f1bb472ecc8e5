//! Checkpoints: what lets old journal segments go.
//!
//! Balances are rebuilt at start by replaying the journal, so a segment can only be deleted
//! once its effect on balances is saved elsewhere. The journal writer keeps a shadow copy of
//! the balances built purely from the entries it writes (the same replay as at start, never
//! the live atomics, which include reservations and charges not yet journaled). Periodically,
//! when whole segments lie behind every sink's cursor, the checkpointer asks the writer for
//! the shadow and the sequence number it covers, writes `checkpoint.json` (temporary file,
//! fsync, rename) and then deletes those segments. Start-up loads the checkpoint and replays
//! only the entries after it.
//!
//! A sink added later starts from the oldest segment still on disk.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Ledger;
use super::flusher::SinkProgress;
use super::journal::segments;
use crate::balance::{AccountPolicy, AccountSnapshot};

const CHECKPOINT_FILE: &str = "checkpoint.json";

/// The balances as of a journal sequence number.
#[derive(Debug, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Every entry up to and including this sequence number is reflected.
    pub seq: u64,
    pub taken_at: DateTime<Utc>,
    pub accounts: Vec<AccountSnapshot>,
}

/// The checkpoint in `dir`, if any.
pub fn load(dir: &Path) -> std::io::Result<Option<Checkpoint>> {
    match std::fs::read(dir.join(CHECKPOINT_FILE)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn store(dir: &Path, checkpoint: &Checkpoint) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = dir.join(format!("{CHECKPOINT_FILE}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        serde_json::to_writer(&mut f, checkpoint)?;
        f.flush()?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(CHECKPOINT_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// The account policies the replay uses (the current config's).
pub type PolicySource = Arc<dyn Fn(&str) -> Arc<AccountPolicy> + Send + Sync>;

/// Starts the checkpointer: every `every`, when whole segments lie behind every sink's
/// cursor, it asks the writer for its shadow balances, writes the checkpoint, and deletes
/// those segments.
pub fn spawn(
    dir: &Path,
    ledger: Arc<Ledger>,
    sinks: Vec<Arc<SinkProgress>>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let dir = dir.to_path_buf();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            if deletable(&dir, &sinks, ledger.last_seq()).is_empty() {
                continue;
            }
            let Some((seq, accounts)) = ledger.checkpoint_state().await else {
                continue;
            };
            let dir2 = dir.clone();
            let sinks2 = sinks.clone();
            let shared = ledger.shared().clone();
            let done = tokio::task::spawn_blocking(move || {
                let doomed = deletable(&dir2, &sinks2, seq);
                if doomed.is_empty() {
                    return;
                }
                let checkpoint = Checkpoint {
                    seq,
                    taken_at: Utc::now(),
                    accounts,
                };
                if let Err(e) = store(&dir2, &checkpoint) {
                    tracing::error!(error = %e, "cannot write the journal checkpoint; segments kept");
                    return;
                }
                let mut freed = 0u64;
                for path in &doomed {
                    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                    match std::fs::remove_file(path) {
                        Ok(()) => freed += size,
                        Err(e) => tracing::error!(segment = %path.display(), error = %e, "cannot delete a journal segment"),
                    }
                }
                shared.note_freed(freed);
                tracing::info!(
                    checkpoint_seq = seq,
                    segments = doomed.len(),
                    bytes = freed,
                    "journal checkpointed; delivered segments deleted"
                );
            })
            .await;
            if let Err(e) = done
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    })
}

/// Segments whose every entry is at or below `upto` and accepted by every sink; the newest
/// segment is never deleted (a segment ends just before the next one starts).
fn deletable(dir: &Path, sinks: &[Arc<SinkProgress>], upto: u64) -> Vec<std::path::PathBuf> {
    let safe = sinks
        .iter()
        .map(|p| p.cursor.load(Ordering::Acquire))
        .min()
        .unwrap_or(upto)
        .min(upto);
    match segments(dir) {
        Ok(segs) => segs
            .windows(2)
            .filter(|w| w[1].0.saturating_sub(1) <= safe)
            .map(|w| w[0].1.clone())
            .collect(),
        Err(e) => {
            tracing::error!(error = %e, "checkpointer cannot list the journal");
            Vec::new()
        }
    }
}
