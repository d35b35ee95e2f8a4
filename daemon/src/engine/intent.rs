//! The write-intent log: a persisted, coarse map of the chunks of a volume
//! that may hold writes not yet on every healthy replica.
//!
//! Replicas at one revision agree on every acknowledged write, but not on
//! writes in flight when the owner stopped uncleanly (a crash, a power
//! loss, a volume faulting with writes half issued): one replica may have a
//! block the other lacks. Reads would then flip between old and new data.
//! The log names the chunks where that can be, so the next engine serves
//! from one replica and resyncs only those chunks onto the others.
//!
//! Rules (the md write-intent bitmap's, at 16 MiB chunks):
//! * a write's chunk bit is persisted (pwrite + fdatasync) before any of its
//!   legs is issued; a bit already set costs one atomic load;
//! * a bit is cleared only when its chunk saw no write start for a whole
//!   settle interval, none is in flight, and a flush of the healthy set
//!   succeeded after that;
//! * a clean stop (device removed, flush succeeded) removes the file.
//!
//! Clearing races with writers without a lock on their side: a writer
//! counts itself in its region counters, then loads the bit; the settler
//! clears the bit, then loads the counters, and puts the bit back if a
//! writer started meanwhile (both sides `SeqCst`). Either the writer sees
//! the bit cleared and persists it again, or the settler sees the writer.
//!
//! File: a 32-byte header (`CRNINT01`, volume size, chunk shift, state)
//! then the bitmap as little-endian u64 words. A bit update rewrites words
//! in place (each word lies inside one sector, so it lands whole); the file
//! itself is created with write-new, fsync, rename, fsync dir.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::fsutil;

/// log2 of the chunk size: 16 MiB.
pub const CHUNK_SHIFT: u32 = 24;
const MAGIC: &[u8; 8] = b"CRNINT01";
const HEADER: usize = 32;
/// `state` word of the header: the bitmap names the chunks to resync.
const STATE_CHUNKS: u32 = 0;
/// `state` word: nothing is known (an adopted volume whose last owner's
/// log is on another node); every other replica is rebuilt whole.
const STATE_UNKNOWN: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum IntentError {
    #[error("write-intent log {path}: {source}; check the data directory's disk")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the last engine of a volume left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leftover {
    /// It stopped cleanly (or never ran): the replicas agree.
    Clean,
    /// It stopped uncleanly: these byte ranges may differ between replicas
    /// at the same revision.
    Chunks(Vec<(u64, u64)>),
    /// It stopped uncleanly and nobody knows where: every replica but one
    /// must be rebuilt whole. Carries why.
    Unknown(String),
}

/// A volume's write-intent log, open while the volume is attached.
pub struct IntentLog {
    path: PathBuf,
    size: u64,
    bits: Box<[AtomicU64]>,
    /// Serializes writers of the file (a writer's slow path, the settler).
    file: Mutex<File>,
    /// Set after the first failed update (logged once, then quiet).
    failed: AtomicBool,
}

fn chunks_of(size: u64) -> u64 {
    size.div_ceil(1 << CHUNK_SHIFT).max(1)
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> IntentError + '_ {
    move |source| IntentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Ascending chunk indexes as merged byte ranges of a `size`-byte volume.
fn byte_ranges(chunks: impl Iterator<Item = u64>, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for c in chunks {
        let (s, e) = (c << CHUNK_SHIFT, ((c + 1) << CHUNK_SHIFT).min(size));
        match out.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => out.push((s, e)),
        }
    }
    out
}

fn image(size: u64, state: u32, words: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + words.len() * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&CHUNK_SHIFT.to_le_bytes());
    out.extend_from_slice(&state.to_le_bytes());
    out.resize(HEADER, 0);
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

impl IntentLog {
    /// Reads what the last engine left at `path` for a volume of `size`
    /// bytes. A missing file is a clean stop; a file that cannot be read or
    /// does not parse is `Unknown` (never trusted as clean).
    pub fn leftover(path: &Path, size: u64) -> Leftover {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Leftover::Clean,
            Err(e) => return Leftover::Unknown(format!("{}: {e}", path.display())),
        };
        let words = chunks_of(size).div_ceil(64) as usize;
        let bad = |why: &str| Leftover::Unknown(format!("{}: {why}", path.display()));
        if bytes.len() != HEADER + words * 8 || &bytes[..8] != MAGIC {
            return bad("not a write-intent log of this volume (wrong length or magic)");
        }
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let mut half = [0u8; 4];
        half.copy_from_slice(&bytes[16..20]);
        let shift = u32::from_le_bytes(half);
        half.copy_from_slice(&bytes[20..24]);
        let state = u32::from_le_bytes(half);
        if word(8) != size || shift != CHUNK_SHIFT {
            return bad("written for another size or chunk size");
        }
        match state {
            STATE_CHUNKS => {}
            STATE_UNKNOWN => {
                return Leftover::Unknown(
                    "the volume was adopted: its last owner's write-intent log is elsewhere".into(),
                )
            }
            other => return bad(&format!("unknown state {other}")),
        }
        let set = (0..chunks_of(size))
            .filter(|&c| word(HEADER + (c / 64) as usize * 8) >> (c % 64) & 1 == 1);
        let ranges = byte_ranges(set, size);
        if ranges.is_empty() {
            Leftover::Clean
        } else {
            Leftover::Chunks(ranges)
        }
    }

    /// Records that nothing is known of the replicas' agreement (a volume
    /// adopted from replicas another engine wrote): the next attach
    /// rebuilds every replica but one.
    pub fn write_unknown(path: &Path, size: u64) -> Result<(), IntentError> {
        let words = vec![0u64; chunks_of(size).div_ceil(64) as usize];
        fsutil::atomic_write(path, &image(size, STATE_UNKNOWN, &words)).map_err(io_err(path))
    }

    /// Starts an empty log at `path` (replacing what was there): call it
    /// only once what the old one named is taken care of.
    pub fn create(path: &Path, size: u64) -> Result<IntentLog, IntentError> {
        let n = chunks_of(size).div_ceil(64) as usize;
        fsutil::atomic_write(path, &image(size, STATE_CHUNKS, &vec![0; n]))
            .map_err(io_err(path))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        Ok(IntentLog {
            path: path.to_path_buf(),
            size,
            bits: (0..n).map(|_| AtomicU64::new(0)).collect(),
            file: Mutex::new(file),
            failed: AtomicBool::new(false),
        })
    }

    /// The chunk indexes `[offset, offset+len)` touches.
    #[inline]
    fn chunk_range(offset: u64, len: u32) -> std::ops::RangeInclusive<u64> {
        let last = (offset + u64::from(len.max(1)) - 1) >> CHUNK_SHIFT;
        (offset >> CHUNK_SHIFT)..=last
    }

    #[inline]
    fn is_set(&self, chunk: u64) -> bool {
        self.bits
            .get((chunk / 64) as usize)
            .is_some_and(|w| w.load(Ordering::SeqCst) >> (chunk % 64) & 1 == 1)
    }

    /// A write on `[offset, offset+len)` is about to be issued: its chunks'
    /// bits are on disk when this returns. Call after the write is counted
    /// in its region counters. A failure to persist is logged once and the
    /// write goes on (only the resync after a crash loses precision).
    #[inline]
    pub fn mark(&self, offset: u64, len: u32) {
        let range = Self::chunk_range(offset, len);
        if range.clone().all(|c| self.is_set(c)) {
            return;
        }
        self.mark_slow(range);
    }

    #[cold]
    fn mark_slow(&self, range: std::ops::RangeInclusive<u64>) {
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let mut words: Vec<u64> = self.bits.iter().map(|w| w.load(Ordering::SeqCst)).collect();
        let mut changed = false;
        for c in range.clone() {
            if let Some(w) = words.get_mut((c / 64) as usize) {
                if *w >> (c % 64) & 1 == 0 {
                    *w |= 1 << (c % 64);
                    changed = true;
                }
            }
        }
        if !changed {
            return;
        }
        if let Err(e) = self.persist(&file, &words) {
            self.report(&e);
        }
        // Published only once on disk: a writer that sees a bit set may go.
        for c in range {
            if let Some(w) = self.bits.get((c / 64) as usize) {
                w.fetch_or(1 << (c % 64), Ordering::SeqCst);
            }
        }
    }

    fn persist(&self, file: &File, words: &[u64]) -> Result<(), IntentError> {
        let mut bytes = Vec::with_capacity(words.len() * 8);
        for w in words {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        file.write_all_at(&bytes, HEADER as u64)
            .and_then(|()| file.sync_data())
            .map_err(io_err(&self.path))
    }

    fn report(&self, e: &IntentError) {
        if !self.failed.swap(true, Ordering::SeqCst) {
            tracing::error!(error = %e, "cannot persist the write-intent log: a crash now resyncs less than it should");
        }
    }

    /// The chunks whose bits are set now.
    pub fn set_chunks(&self) -> Vec<u64> {
        (0..chunks_of(self.size))
            .filter(|&c| self.is_set(c))
            .collect()
    }

    /// The set chunks as byte ranges of the volume.
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        byte_ranges(self.set_chunks().into_iter(), self.size)
    }

    /// Clears the bits of `quiet` chunks — each with the count of writes
    /// ever started in it, seen before the flush that made it settled —
    /// unless `started(chunk)` shows a write began since. Persists the
    /// result. Returns how many bits were cleared.
    pub fn clear_settled(&self, quiet: &[(u64, u64)], started: impl Fn(u64) -> u64) -> usize {
        fail::fail_point!("intent::clear::before");
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let mut cleared = 0;
        for &(c, seen) in quiet {
            let Some(w) = self.bits.get((c / 64) as usize) else {
                continue;
            };
            let bit = 1u64 << (c % 64);
            w.fetch_and(!bit, Ordering::SeqCst);
            if started(c) != seen {
                w.fetch_or(bit, Ordering::SeqCst);
            } else {
                cleared += 1;
            }
        }
        if cleared > 0 {
            let words: Vec<u64> = self.bits.iter().map(|w| w.load(Ordering::SeqCst)).collect();
            if let Err(e) = self.persist(&file, &words) {
                self.report(&e);
            }
        }
        cleared
    }

    /// The log of this volume grown to `size` bytes: the same file
    /// rewritten (write-new, fsync, rename, fsync dir) with this log's set
    /// bits and clear ones for the new chunks. Call with I/O quiesced, then
    /// use only the returned log; a bit this one clears later stays set in
    /// it (a wider resync after a crash, never a narrower one).
    pub fn grown(&self, size: u64) -> Result<IntentLog, IntentError> {
        let _file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let n = chunks_of(size).div_ceil(64) as usize;
        let mut words: Vec<u64> = self.bits.iter().map(|w| w.load(Ordering::SeqCst)).collect();
        // Exactly the new size's words: a log put back at the old size after a
        // failed growth must read back at that size (no write reached past it).
        words.resize(n, 0);
        fsutil::atomic_write(&self.path, &image(size, STATE_CHUNKS, &words))
            .map_err(io_err(&self.path))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(io_err(&self.path))?;
        Ok(IntentLog {
            path: self.path.clone(),
            size,
            bits: words.into_iter().map(AtomicU64::new).collect(),
            file: Mutex::new(file),
            failed: AtomicBool::new(false),
        })
    }

    /// A clean stop: every write is on every healthy replica and flushed.
    pub fn remove(&self) -> Result<(), IntentError> {
        let _file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        std::fs::remove_file(&self.path).map_err(io_err(&self.path))?;
        fsutil::fsync_dir(fsutil::parent_dir(&self.path)).map_err(io_err(&self.path))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_grown_log_keeps_the_set_bits_and_covers_the_new_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.intent");
        let log = IntentLog::create(&path, 40 * MIB).unwrap();
        log.mark(17 * MIB, 4096);
        let grown = log.grown(2048 * MIB).unwrap();
        drop(log);
        // Chunk 1 is still set; the old size no longer reads back.
        assert!(matches!(
            IntentLog::leftover(&path, 40 * MIB),
            Leftover::Unknown(_)
        ));
        assert_eq!(
            IntentLog::leftover(&path, 2048 * MIB),
            Leftover::Chunks(vec![(16 * MIB, 32 * MIB)])
        );
        // A write past the old end (chunk 100, in the second word) is marked.
        grown.mark(1600 * MIB, 8192);
        assert_eq!(
            IntentLog::leftover(&path, 2048 * MIB),
            Leftover::Chunks(vec![(16 * MIB, 32 * MIB), (1600 * MIB, 1616 * MIB)])
        );
        // Put back at a smaller size (a growth no replica took): it reads
        // back at that size.
        let small = IntentLog::create(&path, 40 * MIB).unwrap();
        small.mark(17 * MIB, 4096);
        let back = small.grown(4096 * MIB).unwrap().grown(40 * MIB).unwrap();
        drop(back);
        assert_eq!(
            IntentLog::leftover(&path, 40 * MIB),
            Leftover::Chunks(vec![(16 * MIB, 32 * MIB)])
        );
    }

    #[test]
    fn a_marked_chunk_survives_a_crash_and_a_clean_stop_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.intent");
        let size = 100 * MIB;
        assert_eq!(IntentLog::leftover(&path, size), Leftover::Clean);
        let log = IntentLog::create(&path, size).unwrap();
        assert_eq!(IntentLog::leftover(&path, size), Leftover::Clean);
        // Straddles chunks 1 and 2; chunk 6 is the short last one.
        log.mark(32 * MIB - 4096, 8192);
        log.mark(99 * MIB, 4096);
        // "Crash": the file alone says where.
        assert_eq!(
            IntentLog::leftover(&path, size),
            Leftover::Chunks(vec![(16 * MIB, 48 * MIB), (96 * MIB, size)])
        );
        assert_eq!(
            log.dirty_ranges(),
            vec![(16 * MIB, 48 * MIB), (96 * MIB, size)]
        );
        log.remove().unwrap();
        assert_eq!(IntentLog::leftover(&path, size), Leftover::Clean);
    }

    #[test]
    fn a_settled_chunk_is_cleared_but_not_one_written_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.intent");
        let log = IntentLog::create(&path, 64 * MIB).unwrap();
        log.mark(0, 4096);
        log.mark(20 * MIB, 4096);
        // Chunk 0 saw 3 writes start, still 3; chunk 1 saw one more since.
        let cleared = log.clear_settled(&[(0, 3), (1, 5)], |c| if c == 0 { 3 } else { 6 });
        assert_eq!(cleared, 1);
        assert_eq!(log.set_chunks(), vec![1]);
        assert_eq!(
            IntentLog::leftover(&path, 64 * MIB),
            Leftover::Chunks(vec![(16 * MIB, 32 * MIB)])
        );
    }

    #[test]
    fn a_damaged_or_foreign_log_is_never_taken_for_a_clean_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.intent");
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            IntentLog::leftover(&path, 64 * MIB),
            Leftover::Unknown(_)
        ));
        let log = IntentLog::create(&path, 64 * MIB).unwrap();
        drop(log);
        assert!(
            matches!(IntentLog::leftover(&path, 128 * MIB), Leftover::Unknown(_)),
            "a log of another size"
        );
        IntentLog::write_unknown(&path, 64 * MIB).unwrap();
        assert!(matches!(
            IntentLog::leftover(&path, 64 * MIB),
            Leftover::Unknown(_)
        ));
    }
}
