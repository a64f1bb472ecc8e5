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

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{LedgerEntry, UsageRecord};

/// Magic at the start of every segment (format version 1).
pub const SEGMENT_MAGIC: &[u8; 8] = b"TGJRNL01";
const FRAME_HEADER: usize = 16;
/// Largest payload accepted when reading; a longer length field is corruption.
const MAX_FRAME_PAYLOAD: u32 = 16 * 1024 * 1024;
const SEGMENT_SUFFIX: &str = ".seg";

/// When the writer fsyncs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    Always,
    Interval(std::time::Duration),
    Never,
}

/// Where the ledger puts entries. Called under the ledger's lock.
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
    /// Every readable entry, in order, with its sequence number.
    pub entries: Vec<(u64, LedgerEntry)>,
    /// Bytes cut from a torn tail.
    pub truncated_bytes: u64,
    /// Frames (or segment rests) moved to `quarantine/`.
    pub quarantined: usize,
}

/// The segment journal.
pub struct SegmentJournal {
    dir: PathBuf,
    out: BufWriter<File>,
    segment_size: u64,
    segment_max_bytes: u64,
    /// Bytes of closed segments.
    closed_bytes: u64,
    next_seq: u64,
    scratch: Vec<u8>,
}

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
    /// Opens (creating) the journal in `dir`, recovering what is there.
    pub fn open(dir: &Path, segment_max_bytes: u64) -> io::Result<(SegmentJournal, Recovery)> {
        fs::create_dir_all(dir)?;
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
                let (end, problem) = scan(
                    &buf,
                    offset,
                    |seq, payload| match serde_json::from_slice::<LedgerEntry>(payload) {
                        Ok(entry) if seq > last_seq => {
                            last_seq = seq;
                            recovery.entries.push((seq, entry));
                        }
                        Ok(_) => tracing::error!(seq, "journal entry out of sequence; ignored"),
                        Err(e) => {
                            tracing::error!(seq, error = %e, "journal entry does not parse; ignored")
                        }
                    },
                );
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
        let next_seq = last_seq + 1;
        // Append to the newest segment, or start one.
        let (path, size) = match segments(dir)?.last() {
            Some((_, p)) => {
                let size = fs::metadata(p)?.len();
                (p.clone(), size)
            }
            None => (dir.join(segment_name(next_seq)), 0),
        };
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = if size == 0 {
            file.write_all(SEGMENT_MAGIC)?;
            file.sync_data()?;
            sync_dir(dir)?;
            SEGMENT_MAGIC.len() as u64
        } else {
            size
        };
        file.seek(SeekFrom::End(0))?;
        Ok((
            SegmentJournal {
                dir: dir.to_path_buf(),
                out: BufWriter::with_capacity(256 * 1024, file),
                segment_size: size,
                segment_max_bytes: segment_max_bytes.max(4096),
                closed_bytes,
                next_seq,
                scratch: Vec::with_capacity(1024),
            },
            recovery,
        ))
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()?;
        let path = self.dir.join(segment_name(self.next_seq));
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        file.write_all(SEGMENT_MAGIC)?;
        sync_dir(&self.dir)?;
        self.closed_bytes += self.segment_size;
        self.out = BufWriter::with_capacity(256 * 1024, file);
        self.segment_size = SEGMENT_MAGIC.len() as u64;
        Ok(())
    }

    /// Frames `entry` into the current segment.
    fn append_one(&mut self, entry: &LedgerEntry) -> io::Result<()> {
        self.scratch.clear();
        self.scratch.extend_from_slice(&[0u8; FRAME_HEADER]);
        entry.write_json(&mut self.scratch)?;
        let len = u32::try_from(self.scratch.len() - FRAME_HEADER)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "entry too large"))?;
        self.scratch[0..4].copy_from_slice(&len.to_le_bytes());
        self.scratch[8..16].copy_from_slice(&self.next_seq.to_le_bytes());
        let crc = crc32c::crc32c(&self.scratch[8..]);
        self.scratch[4..8].copy_from_slice(&crc.to_le_bytes());
        self.out.write_all(&self.scratch)?;
        self.segment_size += self.scratch.len() as u64;
        self.next_seq += 1;
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Journal for SegmentJournal {
    fn append(&mut self, batch: &[LedgerEntry]) -> io::Result<()> {
        for entry in batch {
            if self.wants_rotation() {
                self.rotate()?;
            }
            self.append_one(entry)?;
        }
        Ok(())
    }

    fn append_within_segment(&mut self, batch: &[LedgerEntry]) -> io::Result<usize> {
        for (appended, entry) in batch.iter().enumerate() {
            if self.wants_rotation() {
                return Ok(appended);
            }
            self.append_one(entry)?;
        }
        Ok(batch.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn sync(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()
    }

    fn sync_handle(&mut self) -> io::Result<File> {
        self.out.flush()?;
        self.out.get_ref().try_clone()
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
        let (mut j, rec) = SegmentJournal::open(dir.path(), 4096).unwrap();
        assert_eq!(rec.entries.len(), 50);
        assert_eq!(j.last_seq(), 50);
        j.append(&[grant(51)]).unwrap();
        j.sync().unwrap();
        let all = ids(dir.path());
        assert_eq!(all.len(), 51);
        assert_eq!(all[50], "g51");
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
        let (mut j, rec) = SegmentJournal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(rec.entries.len(), 4);
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
