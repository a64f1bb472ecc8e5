//! The file sink: appends every entry as one JSON line (a [`LedgerEntry`], tagged `"type":
//! "usage" | "grant"`) to a file, and fsyncs once per batch. The simplest sink, for local use
//! and export (`jq`, DuckDB, a log shipper).
//!
//! # Duplicates
//!
//! Delivery is at-least-once: after a crash the flusher sends again what it had not recorded
//! as delivered, and those entries may already be in the file. The sink skips an entry whose
//! id is among the last [`FILE_SINK_DEDUP_WINDOW_ENTRIES`] it wrote; on open it rebuilds that
//! window from the file's last [`FILE_SINK_TAIL_SCAN_BYTES`]. Replays only ever concern the
//! most recent entries, so in practice the file holds each id once, but that is best-effort:
//! consumers that must be exact deduplicate on `id`.
//!
//! A batch lands whole or not at all as far as the sink can help it: after a failed write the
//! file is cut back to its length before the batch, and on open a torn last line (a crash
//! mid-write) is cut off. The sink owns the file while it runs; rotate it by stopping
//! tollgate or by pointing the sink elsewhere.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use uuid::Uuid;

use super::LedgerEntry;
use super::sink::{BoxFuture, Sink, SinkError};

/// How many of the most recently written ids a file sink remembers to skip replays.
pub const FILE_SINK_DEDUP_WINDOW_ENTRIES: usize = 16_384;
/// How much of the file's end is read on open to rebuild the dedup window, bytes.
pub const FILE_SINK_TAIL_SCAN_BYTES: u64 = 16 * 1024 * 1024;

/// Appends ledger entries to a JSON-lines file. See the module docs.
pub struct FileSink {
    name: String,
    path: PathBuf,
    state: Arc<Mutex<State>>,
}

struct State {
    /// The open file; `None` before the first delivery and after an error.
    file: Option<File>,
    recent: RecentIds,
}

impl FileSink {
    /// A sink writing to `path`; the file (and its directory) is created on first delivery.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            state: Arc::new(Mutex::new(State {
                file: None,
                recent: RecentIds::new(FILE_SINK_DEDUP_WINDOW_ENTRIES),
            })),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, batch: &'a [LedgerEntry]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            if batch.is_empty() {
                return Ok(());
            }
            let mut lines = Vec::with_capacity(batch.len());
            for entry in batch {
                let mut line = serde_json::to_vec(entry).map_err(|e| {
                    SinkError::Rejected(format!(
                        "file sink `{}`: cannot encode entry {}: {e}",
                        self.name,
                        entry.id()
                    ))
                })?;
                line.push(b'\n');
                lines.push((entry.id(), line));
            }
            let state = self.state.clone();
            let path = self.path.clone();
            let name = self.name.clone();
            tokio::task::spawn_blocking(move || {
                let mut state = crate::lock(&state);
                write_batch(&mut state, &path, &lines).map_err(|e| {
                    SinkError::Retryable(format!("file sink `{name}` ({}): {e}", path.display()))
                })
            })
            .await
            .map_err(|e| SinkError::Retryable(format!("file sink `{}`: {e}", self.name)))?
        })
    }
}

fn write_batch(state: &mut State, path: &Path, lines: &[(Uuid, Vec<u8>)]) -> std::io::Result<()> {
    if state.file.is_none() {
        state.file = Some(open(path, &mut state.recent)?);
    }
    let mut buffer = Vec::new();
    let mut ids = Vec::with_capacity(lines.len());
    let mut in_batch = HashSet::with_capacity(lines.len());
    for (id, line) in lines {
        if state.recent.contains(id) || !in_batch.insert(*id) {
            continue;
        }
        buffer.extend_from_slice(line);
        ids.push(*id);
    }
    if buffer.is_empty() {
        return Ok(());
    }
    let Some(file) = state.file.as_mut() else {
        return Err(std::io::Error::other("file not open"));
    };
    let before = file.metadata()?.len();
    let written = file.write_all(&buffer).and_then(|()| file.sync_data());
    if let Err(e) = written {
        // Leave no partial batch behind; if even that fails, reopening repairs a torn line
        // and re-reads the ids that did land.
        if let Err(cut) = file.set_len(before).and_then(|()| file.sync_data()) {
            tracing::warn!(path = %path.display(), error = %cut, "file sink: could not cut back a failed batch");
        }
        state.file = None;
        state.recent.clear();
        return Err(e);
    }
    for id in ids {
        state.recent.insert(id);
    }
    Ok(())
}

/// Opens (creating) the file for appending, cuts off a torn last line, and fills `recent`
/// with the ids at its end.
fn open(path: &Path, recent: &mut RecentIds) -> std::io::Result<File> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let existed = path.exists();
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?;
    if !existed {
        // Make the new directory entry durable too.
        File::open(parent)?.sync_all()?;
    }
    let len = file.metadata()?.len();
    let start = len.saturating_sub(FILE_SINK_TAIL_SCAN_BYTES);
    let mut tail = Vec::new();
    file.seek(SeekFrom::Start(start))?;
    (&mut file).take(len - start).read_to_end(&mut tail)?;

    if tail.last().is_some_and(|&b| b != b'\n') {
        match memchr::memrchr(b'\n', &tail) {
            Some(i) => {
                let keep = start + i as u64 + 1;
                tracing::warn!(path = %path.display(), cut_bytes = len - keep, "file sink: cutting off a torn last line");
                file.set_len(keep)?;
                tail.truncate(i + 1);
            }
            None if start == 0 => {
                tracing::warn!(path = %path.display(), cut_bytes = len, "file sink: cutting off a torn last line");
                file.set_len(0)?;
                tail.clear();
            }
            None => {
                // A line longer than the scan window: end it rather than guess where it began.
                tracing::warn!(path = %path.display(), "file sink: ending an overlong unterminated last line");
                file.write_all(b"\n")?;
                tail.push(b'\n');
            }
        }
        file.sync_data()?;
    }

    #[derive(Deserialize)]
    struct IdOnly {
        id: Uuid,
    }
    recent.clear();
    let mut lines = tail.split(|&b| b == b'\n');
    if start > 0 {
        // The window may begin mid-line.
        lines.next();
    }
    for line in lines.filter(|l| !l.is_empty()) {
        if let Ok(IdOnly { id }) = serde_json::from_slice(line) {
            recent.insert(id);
        }
    }
    Ok(file)
}

/// The last `capacity` ids inserted, with O(1) lookup.
struct RecentIds {
    order: VecDeque<Uuid>,
    set: HashSet<Uuid>,
    capacity: usize,
}

impl RecentIds {
    fn new(capacity: usize) -> Self {
        Self {
            order: VecDeque::new(),
            set: HashSet::new(),
            capacity: capacity.max(1),
        }
    }

    fn contains(&self, id: &Uuid) -> bool {
        self.set.contains(id)
    }

    fn insert(&mut self, id: Uuid) {
        if !self.set.insert(id) {
            return;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
    }

    fn clear(&mut self) {
        self.order.clear();
        self.set.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_ids_forget_the_oldest() {
        let mut r = RecentIds::new(2);
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        r.insert(a);
        r.insert(b);
        r.insert(b);
        assert!(r.contains(&a) && r.contains(&b));
        r.insert(c);
        assert!(!r.contains(&a) && r.contains(&b) && r.contains(&c));
    }
}
