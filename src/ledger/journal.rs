//! The local journal: append-only segment files in a data directory, written by the ledger's
//! writer thread before an entry counts as recorded, and read back by recovery and by the
//! flusher that ships entries to the sinks.
//!
//! Format. A segment is named after its first sequence number (`00000000000000000001.seg`)
//! and starts with the 8-byte magic `TGJRNL01`. Each entry is one frame:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | payload length, u32 little-endian |
//! | 4 | CRC32C of the next 8 + length bytes, u32 little-endian |
//! | 8 | sequence number, u64 little-endian (strictly increasing) |
//! | length | the entry as JSON ([`LedgerEntry`]) |
//!
//! Durability. `fsync = "always"` syncs every batch before the writer takes the next, so an
//! entry counted as written is on disk; `"interval"` (group commit) syncs at most every
//! `fsync_interval_ms`, bounding what a power loss can take to that window (a process crash
//! loses nothing the writer handed to the kernel); `"never"` leaves it to the OS.
//!
//! Recovery. Opening the journal scans every segment. A torn tail (an incomplete or
//! checksum-failing frame at the end of the newest segment — a write cut short by a crash) is
//! truncated, with a log line giving the bytes dropped. A checksum failure with a sound
//! length and a valid frame after it (a flipped byte) skips that one frame and copies its
//! bytes to `quarantine/` for inspection; anything else unreadable ends the segment there,
//! its rest quarantined. Nothing is dropped silently.
//!
//! Failed writes. Appends are framed into a buffer and handed to the OS at each flush. When a
//! write fails part-way (a full disk, an I/O error), the segment is cut back to where the
//! last successful flush left it and the sequence numbers with it, so the journal holds
//! exactly the entries up to [`Journal::last_seq`] and a retry writes the rest once, under the
//! same numbers (byte for byte what a reader may already have seen before the cut).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{LedgerEntry, UsageRecord};

/// Magic at the start of every segment (format version 1).
pub const SEGMENT_MAGIC: &[u8; 8] = b"TGJRNL01";
const FRAME_HEADER: usize = 16;
/// Largest payload accepted when reading; a longer length field is corruption.
const MAX_FRAME_PAYLOAD: u32 = 16 * 1024 * 1024;
const SEGMENT_SUFFIX: &str = ".seg";
/// A segment being created has its final name plus this (see `rotate`).
const CREATING_SUFFIX: &str = ".new";

/// When the writer fsyncs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    Always,
    Interval(std::time::Duration),
    Never,
}

/// Where the ledger puts entries. Called under the ledger's lock.
///
/// After an error from `append`, `append_within_segment`, `flush` or a sync, the journal
/// holds exactly the entries up to `last_seq()` (some of a failed batch may have been kept,
/// e.g. those before a segment rotation): the caller retries the entries after it.
pub trait Journal: Send {
    /// Appends a batch, in order, starting new segments as they fill.
    fn append(&mut self, batch: &[LedgerEntry]) -> io::Result<()>;
    /// Appends the batch's entries, in order, until one would start a new segment (a
    /// rotation syncs, which the ledger leaves to its writer thread); returns how many were
    /// appended.
    fn append_within_segment(&mut self, batch: &[LedgerEntry]) -> io::Result<usize>;
    /// Hands buffered bytes to the operating system.
    fn flush(&mut self) -> io::Result<()>;
    /// Makes everything appended so far durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Hands buffered bytes to the operating system and returns a handle on the file to
    /// fsync for everything appended so far, so the fsync can run without the lock. (Files
    /// closed by a rotation were synced when they were closed.)
    fn sync_handle(&mut self) -> io::Result<File>;
    /// Whether the next append starts a new segment (which fsyncs: the ledger leaves it to
    /// its writer thread).
    fn wants_rotation(&self) -> bool;
    /// Sequence number of the last entry appended (0 when none).
    fn last_seq(&self) -> u64;
    /// Bytes the journal occupies on disk.
    fn size_bytes(&self) -> u64;
}

/// What opening the journal found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Entries handed to the replay (those after its sequence number).
    pub replayed: u64,
    /// Bytes cut from a torn tail.
    pub truncated_bytes: u64,
    /// Frames (or segment rests) moved to `quarantine/`.
    pub quarantined: usize,
}

/// The segment journal.
pub struct SegmentJournal {
    dir: PathBuf,
    /// The newest segment, positioned at its end.
    file: File,
    /// Frames appended since the last flush, not yet handed to the OS.
    pending: Vec<u8>,
    /// Size of the newest segment, `pending` included.
    segment_size: u64,
    segment_max_bytes: u64,
    /// Bytes of closed segments.
    closed_bytes: u64,
    next_seq: u64,
    /// `segment_size` and `next_seq` as of the last successful flush (or rotation, or open):
    /// where a failed write cuts back to.
    flushed: (u64, u64),
    /// A failed write could not be cut back (the truncate failed too); every operation tries
    /// again first.
    torn: bool,
    /// The newest segment was renamed into place but the directory sync after it failed:
    /// retried before anything is appended to it.
    dir_unsynced: bool,
    /// Unit tests make writes fail part-way through this.
    #[cfg(test)]
    faults: Option<std::sync::Arc<tests::WriteFaults>>,
}

/// `pending` is written out once it holds this much, within a batch.
const FLUSH_THRESHOLD: usize = 256 * 1024;

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

/// Segment files of `dir`, oldest first, with their first sequence numbers.
pub fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX)
            && let Ok(seq) = stem.parse::<u64>()
        {
            out.push((seq, path));
        }
    }
    out.sort_by_key(|(seq, _)| *seq);
    Ok(out)
}

/// One parsed frame, or why parsing stopped.
enum Frame<'a> {
    Entry {
        seq: u64,
        payload: &'a [u8],
        len: usize,
    },
    /// Fewer bytes than a frame needs: the end, or a torn write.
    Incomplete,
    /// The checksum does not match (length field plausible).
    BadChecksum { len: usize },
    /// The length field is impossible.
    BadLength,
}

fn parse_frame(buf: &[u8]) -> Frame<'_> {
    if buf.len() < FRAME_HEADER {
        return Frame::Incomplete;
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len > MAX_FRAME_PAYLOAD {
        return Frame::BadLength;
    }
    let len = len as usize;
    let total = FRAME_HEADER + len;
    if buf.len() < total {
        return Frame::Incomplete;
    }
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if crc32c::crc32c(&buf[8..total]) != crc {
        return Frame::BadChecksum { len: total };
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&buf[8..16]);
    Frame::Entry {
        seq: u64::from_le_bytes(seq),
        payload: &buf[16..total],
        len: total,
    }
}

fn quarantine(dir: &Path, segment: &Path, offset: usize, bytes: &[u8]) -> io::Result<()> {
    let qdir = dir.join("quarantine");
    fs::create_dir_all(&qdir)?;
    let name = format!(
        "{}-{offset}.bin",
        segment
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("segment")
    );
    fs::write(qdir.join(name), bytes)
}

/// Reads a segment's frames from `offset`; returns the entries, the offset after the last
/// good frame, and how parsing ended.
fn scan(
    buf: &[u8],
    mut offset: usize,
    mut on_entry: impl FnMut(u64, &[u8]),
) -> (usize, Option<&'static str>) {
    loop {
        match parse_frame(&buf[offset..]) {
            Frame::Entry { seq, payload, len } => {
                on_entry(seq, payload);
                offset += len;
            }
            Frame::Incomplete => {
                return (offset, (offset < buf.len()).then_some("incomplete frame"));
            }
            Frame::BadChecksum { .. } => return (offset, Some("checksum mismatch")),
            Frame::BadLength => return (offset, Some("impossible frame length")),
        }
    }
}

impl SegmentJournal {
    /// Opens (creating) the journal in `dir`, recovering what is there, without replaying it.
    pub fn open(dir: &Path, segment_max_bytes: u64) -> io::Result<(SegmentJournal, Recovery)> {
        Self::open_inner(dir, segment_max_bytes, None, |_, _| {})
    }

    /// Opens (creating) the journal in `dir`, recovering what is there, and hands each entry
    /// after sequence number `after` (the checkpoint's) to `replay`, in order, as it is read:
    /// one segment is in memory at a time, however long the journal (entries up to `after`
    /// are not parsed). New entries are numbered after `after` even if the journal ends
    /// before it (segments lost), so no number the checkpoint covers is handed out again.
    pub fn open_replaying(
        dir: &Path,
        segment_max_bytes: u64,
        after: u64,
        replay: impl FnMut(u64, LedgerEntry),
    ) -> io::Result<(SegmentJournal, Recovery)> {
        Self::open_inner(dir, segment_max_bytes, Some(after), replay)
    }

    fn open_inner(
        dir: &Path,
        segment_max_bytes: u64,
        replay_after: Option<u64>,
        mut replay: impl FnMut(u64, LedgerEntry),
    ) -> io::Result<(SegmentJournal, Recovery)> {
        let after = replay_after.unwrap_or(u64::MAX);
        fs::create_dir_all(dir)?;
        // Segments whose creation was cut short (see `rotate`) never held an entry.
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_file()
                && path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(CREATING_SUFFIX))
                    .is_some_and(|n| n.ends_with(SEGMENT_SUFFIX))
            {
                fs::remove_file(&path)?;
            }
        }
        let mut recovery = Recovery::default();
        let segs = segments(dir)?;
        let mut last_seq = 0u64;
        let mut closed_bytes = 0u64;
        let count = segs.len();
        for (i, (_, path)) in segs.iter().enumerate() {
            let is_last = i + 1 == count;
            let mut buf = Vec::new();
            File::open(path)?.read_to_end(&mut buf)?;
            if buf.len() < SEGMENT_MAGIC.len() || &buf[..SEGMENT_MAGIC.len()] != SEGMENT_MAGIC {
                if is_last && buf.len() < SEGMENT_MAGIC.len() && SEGMENT_MAGIC.starts_with(&buf) {
                    // Created but never written: rewrite the magic.
                    let mut f = OpenOptions::new().write(true).truncate(true).open(path)?;
                    f.write_all(SEGMENT_MAGIC)?;
                    f.sync_data()?;
                    buf = SEGMENT_MAGIC.to_vec();
                } else {
                    tracing::error!(segment = %path.display(), "journal segment has no valid header; quarantined whole");
                    quarantine(dir, path, 0, &buf)?;
                    fs::remove_file(path)?;
                    recovery.quarantined += 1;
                    continue;
                }
            }
            let mut offset = SEGMENT_MAGIC.len();
            let mut skipped: Vec<std::ops::Range<usize>> = Vec::new();
            loop {
                let (end, problem) = scan(&buf, offset, |seq, payload| {
                    if seq <= last_seq {
                        tracing::error!(seq, "journal entry out of sequence; ignored");
                    } else if seq <= after {
                        last_seq = seq;
                    } else {
                        match serde_json::from_slice::<LedgerEntry>(payload) {
                            Ok(entry) => {
                                last_seq = seq;
                                recovery.replayed += 1;
                                replay(seq, entry);
                            }
                            Err(e) => {
                                tracing::error!(seq, error = %e, "journal entry does not parse; ignored")
                            }
                        }
                    }
                });
                offset = end;
                let Some(problem) = problem else { break };
                // A flipped byte: the length is sound and a good frame follows. Skip it.
                if let Frame::BadChecksum { len } = parse_frame(&buf[offset..])
                    && offset + len <= buf.len()
                    && (offset + len == buf.len()
                        || matches!(parse_frame(&buf[offset + len..]), Frame::Entry { .. }))
                    && !(is_last && offset + len == buf.len())
                {
                    tracing::error!(segment = %path.display(), offset, bytes = len, "journal frame fails its checksum; skipped and quarantined");
                    quarantine(dir, path, offset, &buf[offset..offset + len])?;
                    recovery.quarantined += 1;
                    skipped.push(offset..offset + len);
                    offset += len;
                    continue;
                }
                let dropped = (buf.len() - offset) as u64;
                if is_last {
                    tracing::warn!(segment = %path.display(), offset, bytes = dropped, reason = problem, "journal has a torn tail; truncated");
                    recovery.truncated_bytes += dropped;
                } else {
                    tracing::error!(segment = %path.display(), offset, bytes = dropped, reason = problem, "journal segment is corrupt from here; rest quarantined");
                    recovery.quarantined += 1;
                }
                quarantine(dir, path, offset, &buf[offset..])?;
                let f = OpenOptions::new().write(true).open(path)?;
                f.set_len(offset as u64)?;
                f.sync_data()?;
                buf.truncate(offset);
                break;
            }
            if !skipped.is_empty() {
                // Rewrite the segment without the quarantined frames, atomically.
                let mut clean = Vec::with_capacity(buf.len());
                let mut at = 0;
                for r in &skipped {
                    clean.extend_from_slice(&buf[at..r.start]);
                    at = r.end;
                }
                clean.extend_from_slice(&buf[at..]);
                let tmp = path.with_extension("seg.tmp");
                {
                    let mut f = File::create(&tmp)?;
                    f.write_all(&clean)?;
                    f.sync_all()?;
                }
                fs::rename(&tmp, path)?;
                sync_dir(dir)?;
                buf = clean;
            }
            if !is_last {
                closed_bytes += buf.len() as u64;
            }
        }
        if let Some(after) = replay_after
            && after > last_seq
        {
            tracing::error!(
                checkpoint_seq = after,
                journal_last_seq = last_seq,
                "the journal ends before its checkpoint (segments lost?); numbering continues after the checkpoint"
            );
            last_seq = after;
        }
        let next_seq = last_seq + 1;
        // Append to the newest segment, or start one.
        let (path, size) = match segments(dir)?.last() {
            Some((_, p)) => {
                let size = fs::metadata(p)?.len();
                (p.clone(), size)
            }
            None => (dir.join(segment_name(next_seq)), 0),
        };
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false) // the newest segment: appended to
            .open(&path)?;
        let size = if size == 0 {
            file.write_all(SEGMENT_MAGIC)?;
            file.sync_data()?;
            sync_dir(dir)?;
            SEGMENT_MAGIC.len() as u64
        } else {
            size
        };
        file.seek(SeekFrom::Start(size))?;
        Ok((
            SegmentJournal {
                dir: dir.to_path_buf(),
                file,
                pending: Vec::with_capacity(64 * 1024),
                segment_size: size,
                segment_max_bytes: segment_max_bytes.max(4096),
                closed_bytes,
                next_seq,
                flushed: (size, next_seq),
                torn: false,
                dir_unsynced: false,
                #[cfg(test)]
                faults: None,
            },
            recovery,
        ))
    }

    /// Closes the newest segment (synced) and starts the next. The next segment appears whole
    /// or not at all: it is written under a temporary name and renamed. A rotation failing
    /// part-way must not leave an empty next segment behind: a reader would move on to it
    /// and miss the entries the retry writes into this one, and a restart would append to a
    /// segment named after sequence numbers it does not hold.
    fn rotate(&mut self) -> io::Result<()> {
        self.write_pending()?;
        self.file.sync_data()?;
        let path = self.dir.join(segment_name(self.next_seq));
        let tmp = self
            .dir
            .join(format!("{}{CREATING_SUFFIX}", segment_name(self.next_seq)));
        let file = match self.create_segment(&tmp, &path) {
            Ok(file) => file,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        self.closed_bytes += self.segment_size;
        self.file = file;
        self.segment_size = SEGMENT_MAGIC.len() as u64;
        self.flushed = (self.segment_size, self.next_seq);
        // The segment exists from the rename on, but its name is durable only once the
        // directory is synced: until then nothing is appended to it (see `guarded`).
        self.dir_unsynced = true;
        sync_dir(&self.dir)?;
        self.dir_unsynced = false;
        Ok(())
    }

    /// Writes the magic to `tmp`, syncs it and renames it to `path`.
    fn create_segment(&self, tmp: &Path, path: &Path) -> io::Result<File> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(tmp)?;
        self.write_to(&file, SEGMENT_MAGIC)?;
        file.sync_data()?;
        fs::rename(tmp, path)?;
        Ok(file)
    }

    /// `file.write_all(buf)`; in unit tests, subject to the injected faults.
    fn write_to(&self, mut file: &File, buf: &[u8]) -> io::Result<()> {
        #[cfg(test)]
        if let Some(faults) = &self.faults {
            let allowed = faults.allow(buf.len());
            if allowed < buf.len() {
                file.write_all(&buf[..allowed])?;
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "injected: disk full",
                ));
            }
        }
        file.write_all(buf)
    }

    /// Frames `entry` into `pending`.
    fn append_one(&mut self, entry: &LedgerEntry) -> io::Result<()> {
        if self.pending.len() >= FLUSH_THRESHOLD {
            self.write_pending()?;
        }
        let start = self.pending.len();
        self.pending.extend_from_slice(&[0u8; FRAME_HEADER]);
        // What the reader would refuse as corrupt is not written.
        let framed = entry.write_json(&mut self.pending).and_then(|()| {
            u32::try_from(self.pending.len() - start - FRAME_HEADER)
                .ok()
                .filter(|&len| len <= MAX_FRAME_PAYLOAD)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, EntryTooLarge))
        });
        let len = match framed {
            Ok(len) => len,
            Err(e) => {
                self.pending.truncate(start);
                return Err(e);
            }
        };
        let frame = &mut self.pending[start..];
        frame[0..4].copy_from_slice(&len.to_le_bytes());
        frame[8..16].copy_from_slice(&self.next_seq.to_le_bytes());
        let crc = crc32c::crc32c(&frame[8..]);
        frame[4..8].copy_from_slice(&crc.to_le_bytes());
        self.segment_size += frame.len() as u64;
        self.next_seq += 1;
        Ok(())
    }

    /// Hands `pending` to the OS.
    fn write_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.write_to(&self.file, &self.pending)?;
        self.pending.clear();
        Ok(())
    }

    /// Runs one journal operation: first mends a cut that failed before, and if the
    /// operation fails, cuts the segment back to the last flush (see the module docs).
    fn guarded<T>(&mut self, op: impl FnOnce(&mut Self) -> io::Result<T>) -> io::Result<T> {
        if self.torn {
            self.cut_back()?;
        }
        if self.dir_unsynced {
            sync_dir(&self.dir)?;
            self.dir_unsynced = false;
        }
        let result = op(self);
        if result.is_err() {
            // The operation's error is the one to report; a failed cut is retried next time.
            let _ = self.cut_back();
        }
        result
    }

    /// Forgets what was appended since the last flush and truncates the segment to it.
    fn cut_back(&mut self) -> io::Result<()> {
        self.pending.clear();
        (self.segment_size, self.next_seq) = self.flushed;
        self.torn = true;
        self.file.set_len(self.segment_size)?;
        self.file.seek(SeekFrom::Start(self.segment_size))?;
        self.torn = false;
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Journal for SegmentJournal {
    fn append(&mut self, batch: &[LedgerEntry]) -> io::Result<()> {
        self.guarded(|j| {
            for entry in batch {
                if j.wants_rotation() {
                    j.rotate()?;
                }
                j.append_one(entry)?;
            }
            Ok(())
        })
    }

    fn append_within_segment(&mut self, batch: &[LedgerEntry]) -> io::Result<usize> {
        self.guarded(|j| {
            for (appended, entry) in batch.iter().enumerate() {
                if j.wants_rotation() {
                    return Ok(appended);
                }
                j.append_one(entry)?;
            }
            Ok(batch.len())
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        self.guarded(|j| {
            j.write_pending()?;
            j.flushed = (j.segment_size, j.next_seq);
            Ok(())
        })
    }

    fn sync(&mut self) -> io::Result<()> {
        self.flush()?;
        self.file.sync_data()
    }

    fn sync_handle(&mut self) -> io::Result<File> {
        self.flush()?;
        self.file.try_clone()
    }

    fn wants_rotation(&self) -> bool {
        self.segment_size >= self.segment_max_bytes
    }

    fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    fn size_bytes(&self) -> u64 {
        self.closed_bytes + self.segment_size
    }
}

/// Reads entries after a sequence number, across segments, tolerating a frame still being
/// written at the end (it is read next time). Used by the flusher.
pub struct JournalReader {
    dir: PathBuf,
    /// Segment being read and the byte offset after the last frame read from it.
    position: Option<(u64, PathBuf, u64)>,
    after_seq: u64,
}

impl JournalReader {
    /// A reader positioned after `after_seq`.
    pub fn new(dir: &Path, after_seq: u64) -> JournalReader {
        JournalReader {
            dir: dir.to_path_buf(),
            position: None,
            after_seq,
        }
    }

    /// Up to `max` entries after the last one returned.
    pub fn read(&mut self, max: usize) -> io::Result<Vec<(u64, LedgerEntry)>> {
        let mut out = Vec::new();
        let segs = segments(&self.dir)?;
        // Start in the last segment whose first seq is ≤ the next wanted one.
        let start = match &self.position {
            Some((first, _, _)) => segs.iter().position(|(s, _)| s == first).unwrap_or(0),
            None => segs
                .iter()
                .rposition(|(s, _)| *s <= self.after_seq + 1)
                .unwrap_or(0),
        };
        for (first, path) in segs.iter().skip(start) {
            let offset = match &self.position {
                Some((f, _, off)) if f == first => *off,
                _ => SEGMENT_MAGIC.len() as u64,
            };
            let mut file = match File::open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            file.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::new();
            file.read_to_end(&mut buf)?;
            let mut off = 0usize;
            while out.len() < max {
                // Stop at a frame still being written (or unreadable: recovery deals with
                // that at the next start).
                let Frame::Entry { seq, payload, len } = parse_frame(&buf[off..]) else {
                    break;
                };
                if seq > self.after_seq {
                    match serde_json::from_slice::<LedgerEntry>(payload) {
                        Ok(entry) => out.push((seq, entry)),
                        Err(e) => {
                            tracing::error!(seq, error = %e, "journal entry does not parse; skipped")
                        }
                    }
                    self.after_seq = seq;
                }
                off += len;
            }
            self.position = Some((*first, path.clone(), offset + off as u64));
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }
}

/// Every entry of a journal directory, in order (tests, tools).
pub fn read_entries(dir: &Path) -> io::Result<Vec<LedgerEntry>> {
    let mut reader = JournalReader::new(dir, 0);
    let mut out = Vec::new();
    loop {
        let batch = reader.read(4096)?;
        if batch.is_empty() {
            return Ok(out);
        }
        out.extend(batch.into_iter().map(|(_, e)| e));
    }
}

/// Why the journal refused an entry: its frame would be larger than the reader accepts, so
/// no retry can ever write it.
#[derive(Debug)]
struct EntryTooLarge;

impl std::fmt::Display for EntryTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "entry too large: its frame would exceed {MAX_FRAME_PAYLOAD} bytes"
        )
    }
}

impl std::error::Error for EntryTooLarge {}

/// Whether the journal refused an entry as too large (rather than failed to write it).
pub fn is_entry_too_large(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<EntryTooLarge>())
}

/// Every usage record of a journal directory, in order (tests, tools).
pub fn read_all(dir: &Path) -> io::Result<Vec<UsageRecord>> {
    Ok(read_entries(dir)?
        .into_iter()
        .filter_map(|e| match e {
            LedgerEntry::Usage(r) => Some(r),
            LedgerEntry::Grant(_) => None,
        })
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ledger::{GrantEntry, GrantSource};

    /// A grant entry named `g<n>`.
    pub(crate) fn grant(n: u64) -> LedgerEntry {
        LedgerEntry::Grant(GrantEntry {
            id: uuid::Uuid::now_v7(),
            timestamp: chrono::Utc::now(),
            account: "acme".into(),
            grant_id: format!("g{n}"),
            amount: rust_decimal::Decimal::from(n),
            unit: "USD".into(),
            kind: crate::balance::GrantKind::Paid,
            priority: 0,
            expires_at: None,
            expires_at_period_end: false,
            source: GrantSource::Admin,
        })
    }

    /// Grant `g<n>` with a name so long that its frame exceeds what the reader accepts.
    pub(crate) fn too_large(n: u64) -> LedgerEntry {
        let mut entry = grant(n);
        if let LedgerEntry::Grant(g) = &mut entry {
            g.grant_id = "x".repeat(MAX_FRAME_PAYLOAD as usize + 1);
        }
        entry
    }

    /// Opens the journal and collects every entry (what the tests inspect).
    pub(crate) fn open_collecting(
        dir: &Path,
        segment_bytes: u64,
    ) -> (SegmentJournal, Recovery, Vec<(u64, LedgerEntry)>) {
        let mut entries = Vec::new();
        let (j, recovery) =
            SegmentJournal::open_replaying(dir, segment_bytes, 0, |seq, e| entries.push((seq, e)))
                .unwrap();
        (j, recovery, entries)
    }

    /// A byte budget for a journal's writes: past it, a write stores what fits and fails.
    pub(crate) struct WriteFaults {
        budget: std::sync::atomic::AtomicUsize,
    }

    impl WriteFaults {
        pub(crate) fn allow(&self, len: usize) -> usize {
            use std::sync::atomic::Ordering::Relaxed;
            let left = self.budget.load(Relaxed);
            let allowed = left.min(len);
            self.budget.store(left - allowed, Relaxed);
            allowed
        }
    }

    impl WriteFaults {
        /// Frees the disk: no more failures.
        pub(crate) fn unlimited(&self) {
            self.budget
                .store(usize::MAX, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Lets `j` write `bytes` more, then fail (until the budget is lifted).
    pub(crate) fn with_budget(j: &mut SegmentJournal, bytes: usize) -> std::sync::Arc<WriteFaults> {
        let faults = std::sync::Arc::new(WriteFaults {
            budget: bytes.into(),
        });
        j.faults = Some(faults.clone());
        faults
    }

    /// Appends `batch` as the ledger's writer does: on an error, what the journal kept counts
    /// as written and the rest is retried. Returns how many attempts failed.
    fn append_retrying(j: &mut SegmentJournal, batch: &[LedgerEntry], budget: usize) -> usize {
        with_budget(j, budget);
        let mut done = 0;
        let mut failures = 0;
        loop {
            let before = j.last_seq();
            match j.append(&batch[done..]).and_then(|()| j.flush()) {
                Ok(()) => return failures,
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::StorageFull);
                    failures += 1;
                    done += (j.last_seq() - before) as usize;
                    // The file holds exactly the frames up to last_seq.
                    let (_, path) = segments(&j.dir).unwrap().pop().unwrap();
                    assert_eq!(fs::metadata(&path).unwrap().len(), j.segment_size);
                    j.faults = None; // space freed
                }
            }
        }
    }

    #[test]
    fn an_entry_the_reader_would_refuse_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _, _) = open_collecting(dir.path(), 64 * 1024 * 1024);
        j.append(&[grant(1)]).unwrap();
        j.flush().unwrap();
        let e = j.append(&[too_large(2)]).unwrap_err();
        assert!(is_entry_too_large(&e), "{e}");
        // As after any failed append: the journal holds what it held before.
        assert_eq!(j.last_seq(), 1);
        j.append(&[grant(3)]).unwrap();
        j.flush().unwrap();
        drop(j);
        let (_, _, entries) = open_collecting(dir.path(), 64 * 1024 * 1024);
        let ids: Vec<(u64, String)> = entries
            .into_iter()
            .map(|(seq, e)| match e {
                LedgerEntry::Grant(g) => (seq, g.grant_id),
                LedgerEntry::Usage(_) => unreachable!(),
            })
            .collect();
        assert_eq!(ids, [(1, "g1".to_string()), (2, "g3".to_string())]);
    }

    #[test]
    fn a_write_failing_part_way_is_cut_back_and_written_once_on_retry() {
        // Budgets that fail in a frame's header, its payload, at a frame boundary, at a
        // rotation's flush, and not at all; 4 KiB segments, so batches rotate.
        for budget in [
            0,
            1,
            16,
            100,
            300,
            1000,
            4000,
            5000,
            9000,
            20_000,
            usize::MAX,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (mut j, _) = SegmentJournal::open(dir.path(), 4096).unwrap();
            let first: Vec<_> = (1..=10).map(grant).collect();
            j.append(&first).unwrap();
            j.flush().unwrap();
            let second: Vec<_> = (11..=60).map(grant).collect();
            let failures = append_retrying(&mut j, &second, budget);
            assert_eq!(failures > 0, budget < 20_000, "budget {budget}");
            let third: Vec<_> = (61..=70).map(grant).collect();
            append_retrying(&mut j, &third, usize::MAX);
            j.sync().unwrap();
            drop(j);

            let (j, recovery, entries) = open_collecting(dir.path(), 4096);
            let want: Vec<_> = (1..=70).map(|n| format!("g{n}")).collect();
            assert_eq!(ids(dir.path()), want, "budget {budget}");
            let seqs: Vec<_> = entries.iter().map(|(seq, _)| *seq).collect();
            assert_eq!(seqs, (1..=70).collect::<Vec<_>>(), "budget {budget}");
            assert_eq!((recovery.truncated_bytes, recovery.quarantined), (0, 0));
            assert_eq!(j.last_seq(), 70);
        }
    }

    #[test]
    fn a_rotation_failing_part_way_leaves_no_segment_for_readers_to_skip_to() {
        let early: Vec<_> = (1..=10).map(grant).collect();
        let batch: Vec<_> = (11..=40).map(grant).collect();
        let start = |dir: &Path| {
            let (mut j, _) = SegmentJournal::open(dir, 4096).unwrap();
            j.append(&early).unwrap();
            j.flush().unwrap();
            let (_, newest) = segments(dir).unwrap().pop().unwrap();
            (j, newest)
        };
        // What the batch's first rotation writes to the segment it closes, measured without
        // faults; a budget just past it fails in the next segment's magic.
        let closing_bytes = {
            let dir = tempfile::tempdir().unwrap();
            let (mut j, newest) = start(dir.path());
            let before = j.segment_size;
            j.append(&batch).unwrap();
            j.flush().unwrap();
            fs::metadata(newest).unwrap().len() - before
        };
        for extra in 0..=SEGMENT_MAGIC.len() {
            let dir = tempfile::tempdir().unwrap();
            let (mut j, _) = start(dir.path());
            let mut reader = JournalReader::new(dir.path(), 0);
            assert_eq!(reader.read(1000).unwrap().len(), 10);
            let faults = with_budget(&mut j, closing_bytes as usize + extra);
            let before = j.last_seq();
            assert!(j.append(&batch).and_then(|()| j.flush()).is_err());
            let kept = (j.last_seq() - before) as usize;
            // The flusher reads while the writer waits to retry; then the retry.
            let mut seen: Vec<u64> = reader.read(1000).unwrap().iter().map(|e| e.0).collect();
            faults.unlimited();
            j.append(&batch[kept..]).unwrap();
            j.flush().unwrap();
            seen.extend(reader.read(1000).unwrap().iter().map(|e| e.0));
            assert_eq!(seen, (11..=40).collect::<Vec<_>>(), "extra {extra}");
            drop(j);
            let (_, _, entries) = open_collecting(dir.path(), 4096);
            assert_eq!(entries.len(), 40, "extra {extra}");
            let names: Vec<_> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert!(names.iter().all(|n| n.ends_with(".seg")), "{names:?}");
        }
    }

    fn write(dir: &Path, n: u64, segment_bytes: u64) {
        let (mut j, _) = SegmentJournal::open(dir, segment_bytes).unwrap();
        let batch: Vec<_> = (1..=n).map(grant).collect();
        j.append(&batch).unwrap();
        j.sync().unwrap();
    }

    fn ids(dir: &Path) -> Vec<String> {
        read_entries(dir)
            .unwrap()
            .into_iter()
            .map(|e| match e {
                LedgerEntry::Grant(g) => g.grant_id,
                LedgerEntry::Usage(_) => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn appends_rotate_and_reopen_continues_the_sequence() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 50, 4096);
        assert!(segments(dir.path()).unwrap().len() > 1, "rotated");
        let (mut j, rec, entries) = open_collecting(dir.path(), 4096);
        assert_eq!(entries.len(), 50);
        assert_eq!(rec.replayed, 50);
        assert_eq!(j.last_seq(), 50);
        j.append(&[grant(51)]).unwrap();
        j.sync().unwrap();
        let all = ids(dir.path());
        assert_eq!(all.len(), 51);
        assert_eq!(all[50], "g51");
    }

    #[test]
    fn replay_hands_over_the_entries_after_a_sequence_number_in_order() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 50, 4096);
        let mut seen = Vec::new();
        let (j, rec) = SegmentJournal::open_replaying(dir.path(), 4096, 20, |seq, e| {
            let LedgerEntry::Grant(g) = e else {
                panic!("not a grant")
            };
            seen.push((seq, g.grant_id));
        })
        .unwrap();
        let want: Vec<_> = (21..=50).map(|n| (n, format!("g{n}"))).collect();
        assert_eq!(seen, want);
        assert_eq!(rec.replayed, 30);
        // The sequence continues after everything on disk, replayed or not.
        assert_eq!(j.last_seq(), 50);
        let (j, rec) = SegmentJournal::open(dir.path(), 4096).unwrap();
        assert_eq!((j.last_seq(), rec.replayed), (50, 0));
    }

    #[test]
    fn a_segment_left_half_created_is_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 5, 1 << 20);
        let half = dir
            .path()
            .join(format!("{}{CREATING_SUFFIX}", segment_name(6)));
        fs::write(&half, &SEGMENT_MAGIC[..3]).unwrap();
        let other = dir.path().join("notes.new");
        fs::write(&other, b"not ours").unwrap();
        let (j, _) = SegmentJournal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(j.last_seq(), 5);
        assert!(!half.exists());
        assert!(other.exists(), "only segments being created are removed");
    }

    #[test]
    fn numbering_continues_after_a_checkpoint_the_journal_falls_short_of() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 50, 1 << 20);
        // A checkpoint at 60: entries 51..=60 were lost with the disk's cache.
        let (mut j, _) =
            SegmentJournal::open_replaying(dir.path(), 1 << 20, 60, |_, _| {}).unwrap();
        assert_eq!(j.last_seq(), 60);
        j.append(&[grant(100)]).unwrap();
        j.sync().unwrap();
        drop(j);
        let mut seen = Vec::new();
        SegmentJournal::open_replaying(dir.path(), 1 << 20, 60, |seq, _| seen.push(seq)).unwrap();
        assert_eq!(seen, [61]);
    }

    #[test]
    fn torn_tail_is_truncated_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 5, 1 << 20);
        let (_, path) = segments(dir.path()).unwrap().pop().unwrap();
        let len = fs::metadata(&path).unwrap().len();
        // Cut the last frame in half, as a crash mid-write would.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 20)
            .unwrap();
        let (mut j, rec, entries) = open_collecting(dir.path(), 1 << 20);
        assert_eq!(entries.len(), 4);
        assert!(rec.truncated_bytes > 0);
        assert_eq!(j.last_seq(), 4);
        j.append(&[grant(99)]).unwrap();
        j.sync().unwrap();
        assert_eq!(ids(dir.path()), vec!["g1", "g2", "g3", "g4", "g99"]);
    }

    #[test]
    fn a_flipped_byte_skips_one_frame_into_quarantine() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 5, 1 << 20);
        let (_, path) = segments(dir.path()).unwrap().pop().unwrap();
        let mut bytes = fs::read(&path).unwrap();
        // Flip a byte inside the second frame's payload.
        let first_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        let second = 8 + FRAME_HEADER + first_len;
        bytes[second + FRAME_HEADER + 10] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let (_, rec) = SegmentJournal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.quarantined, 1);
        assert_eq!(rec.truncated_bytes, 0);
        assert_eq!(ids(dir.path()), vec!["g1", "g3", "g4", "g5"]);
        assert_eq!(
            fs::read_dir(dir.path().join("quarantine")).unwrap().count(),
            1
        );
    }

    #[test]
    fn reader_resumes_after_a_sequence_and_sees_new_frames() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = SegmentJournal::open(dir.path(), 4096).unwrap();
        j.append(&(1..=30).map(grant).collect::<Vec<_>>()).unwrap();
        j.flush().unwrap();
        let mut r = JournalReader::new(dir.path(), 10);
        let first = r.read(7).unwrap();
        assert_eq!(
            first.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            (11..=17).collect::<Vec<_>>()
        );
        let rest = r.read(1000).unwrap();
        assert_eq!(rest.first().unwrap().0, 18);
        assert_eq!(rest.last().unwrap().0, 30);
        assert!(r.read(10).unwrap().is_empty());
        j.append(&[grant(31)]).unwrap();
        j.flush().unwrap();
        assert_eq!(
            r.read(10)
                .unwrap()
                .iter()
                .map(|(s, _)| *s)
                .collect::<Vec<_>>(),
            vec![31]
        );
    }
}
