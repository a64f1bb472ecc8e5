//! Checkpoints: what lets old journal segments go.
//!
//! Balances are rebuilt at start by replaying the journal, so a segment can only be deleted
//! once its effect on balances is saved elsewhere. The checkpointer keeps a shadow copy of
//! the balances built purely from the journal (the same replay as at start, never the live
//! atomics, which include reservations and charges not yet journaled), and periodically:
//! applies the entries written since, and — when whole segments lie behind both the shadow
//! and every sink's cursor — writes `checkpoint.json` (the shadow state and the sequence
//! number it covers; temporary file, fsync, rename) and then deletes those segments. Start-up
//! loads the checkpoint and replays only the entries after it.
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

use super::WriterShared;
use super::flusher::SinkProgress;
use super::journal::{JournalReader, segments};
use crate::balance::{AccountPolicy, AccountSnapshot, Balances};

const CHECKPOINT_FILE: &str = "checkpoint.json";

/// Entries applied per step when catching up.
const CATCH_UP_BATCH: usize = 4096;

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

/// Starts the checkpointer. `shadow` must hold exactly the state of entries `..=seq`.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    dir: &Path,
    shadow: Balances,
    seq: u64,
    policies: PolicySource,
    sinks: Vec<Arc<SinkProgress>>,
    writer: Arc<WriterShared>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let dir = dir.to_path_buf();
    tokio::spawn(async move {
        let mut state = Some((shadow, JournalReader::new(&dir, seq), seq));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            let Some(current) = state.take() else { return };
            let dir2 = dir.clone();
            let policies = policies.clone();
            let sinks = sinks.clone();
            let writer = writer.clone();
            match tokio::task::spawn_blocking(move || {
                step(&dir2, current, &*policies, &sinks, &writer)
            })
            .await
            {
                Ok(next) => state = Some(next),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => return,
            }
        }
    })
}

/// Catches the shadow up, then checkpoints and deletes what it can.
fn step(
    dir: &Path,
    (shadow, mut reader, mut seq): (Balances, JournalReader, u64),
    policies: &(dyn Fn(&str) -> Arc<AccountPolicy> + Send + Sync),
    sinks: &[Arc<SinkProgress>],
    writer: &WriterShared,
) -> (Balances, JournalReader, u64) {
    let now = Utc::now();
    let written = writer.last_seq();
    while seq < written {
        match reader.read(CATCH_UP_BATCH) {
            Ok(batch) if batch.is_empty() => break,
            Ok(batch) => {
                for (s, entry) in &batch {
                    shadow.apply_entry(entry, policies, now);
                    seq = *s;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "checkpointer cannot read the journal");
                return (shadow, reader, seq);
            }
        }
    }
    let safe = sinks
        .iter()
        .map(|p| p.cursor.load(Ordering::Acquire))
        .min()
        .unwrap_or(seq)
        .min(seq);
    let segs = match segments(dir) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "checkpointer cannot list the journal");
            return (shadow, reader, seq);
        }
    };
    // A segment ends just before the next one starts; the newest is never deleted.
    let deletable: Vec<&Path> = segs
        .windows(2)
        .filter(|w| w[1].0.saturating_sub(1) <= safe)
        .map(|w| w[0].1.as_path())
        .collect();
    if deletable.is_empty() {
        return (shadow, reader, seq);
    }
    let checkpoint = Checkpoint {
        seq,
        taken_at: now,
        accounts: shadow.export(),
    };
    if let Err(e) = store(dir, &checkpoint) {
        tracing::error!(error = %e, "cannot write the journal checkpoint; segments kept");
        return (shadow, reader, seq);
    }
    let mut freed = 0u64;
    for path in &deletable {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        match std::fs::remove_file(path) {
            Ok(()) => freed += size,
            Err(e) => {
                tracing::error!(segment = %path.display(), error = %e, "cannot delete a journal segment")
            }
        }
    }
    writer.note_freed(freed);
    tracing::info!(
        checkpoint_seq = seq,
        segments = deletable.len(),
        bytes = freed,
        "journal checkpointed; delivered segments deleted"
    );
    (shadow, reader, seq)
}
