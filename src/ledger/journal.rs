//! The journal seam and its first implementation: one JSON object per line, appended to a
//! file. Each batch is written with one `write` and flushed to the OS; a sync barrier
//! (`Ledger::sync`, shutdown) also fsyncs.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use super::UsageRecord;

/// Where the writer thread puts records. Implementations own their file handles; they are
/// only ever called from the writer thread.
pub trait Journal: Send {
    /// Appends a batch, in order.
    fn append(&mut self, batch: &[UsageRecord]) -> io::Result<()>;
    /// Hands buffered bytes to the operating system.
    fn flush(&mut self) -> io::Result<()>;
    /// Makes everything appended so far durable.
    fn sync(&mut self) -> io::Result<()>;
}

/// Appends records as JSON lines.
pub struct JsonLinesJournal {
    out: BufWriter<File>,
}

impl JsonLinesJournal {
    /// Opens (creating it and its directory if needed) the journal file for appending.
    pub fn open(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            out: BufWriter::with_capacity(256 * 1024, file),
        })
    }
}

impl Journal for JsonLinesJournal {
    fn append(&mut self, batch: &[UsageRecord]) -> io::Result<()> {
        for record in batch {
            serde_json::to_writer(&mut self.out, record)?;
            self.out.write_all(b"\n")?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn sync(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()
    }
}

/// Reads every record of a JSON-lines journal (tests, tools).
pub fn read_all(path: &Path) -> io::Result<Vec<UsageRecord>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)))
        .collect()
}
