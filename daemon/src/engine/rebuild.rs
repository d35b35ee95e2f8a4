//! Rebuild: brings a failed or new replica up to date while the volume
//! keeps serving I/O.
//!
//! 1. The replica joins the write set as *rebuilding*: every new write goes
//!    to it, but reads never do.
//! 2. Work list: for a replica coming back at the revision it left at, the
//!    dirty map of blocks written while it was away; for a new replica,
//!    every range the source holds data in (from its extent maps, not by
//!    reading). Writes that were already in flight when it joined and did
//!    not go to it mark the map too, so the copy runs in passes until a
//!    pass finds the map empty after every region has been seen idle.
//! 3. Each chunk (within one 1 MiB region) is read from a healthy replica
//!    and written to the target. The copy counts as done only if no write
//!    to that region was in flight before and none started during the copy
//!    (per-region counters kept by the queue engines); otherwise it is
//!    redone. So a stale copy never overwrites a newer write on the target.
//! 4. The target is flushed, takes the volume's current revision and
//!    becomes healthy. If anything fails, the target is failed again and
//!    the blocks taken off the map are put back, so a retry loses nothing.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::layered_view::LayerReader;
use super::replica_io::ReplicaIo;
use super::volume::{healthy_of, Region, REGION_SHIFT};
use super::{EngineError, VolumeIo};
use crate::replica::extent::HeadBitmap;
use crate::replica::{ChainChange, LayerInfo, Replica, BLOCK_SIZE};
use crate::transport::{Op, PeerConn, PeerError};

/// Largest chunk copied at once (one region).
const CHUNK: u64 = 1 << REGION_SHIFT;
/// Chunks in flight to the target at once (a remote target gets them
/// pipelined on one connection instead of one round trip each).
const WINDOW: usize = 8;
/// How long a region may stay busy before the rebuild gives up on it.
const QUIET_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("rebuild of {replica}: {what} {store}: {source}")]
    Io {
        replica: String,
        what: &'static str,
        store: String,
        source: io::Error,
    },
    #[error("rebuild of {replica}: no healthy replica to copy from")]
    NoSource { replica: String },
    #[error("rebuild of {replica}: region {region} stayed busy for {QUIET_TIMEOUT:?}")]
    Busy { replica: String, region: usize },
    #[error("rebuild of {replica}: cancelled")]
    Cancelled { replica: String },
    #[error("rebuild of {replica}: the snapshot chain changed while its layers were copied; retrying later")]
    ChainChanged { replica: String },
}

/// Blocking access to a replica's data: what a rebuild reads from and
/// writes to, on this node or another.
pub trait BlockStore: Send {
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Several writes; a store over the network keeps them all in flight.
    fn write_many(&mut self, chunks: &[(u64, &[u8])]) -> io::Result<()> {
        chunks
            .iter()
            .try_for_each(|(off, data)| self.write(*off, data))
    }
    fn flush(&mut self) -> io::Result<()>;
    /// Zeros `[offset, offset+len)` (a hole where the replica can punch one).
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Byte ranges `(offset, len)` where any layer holds data.
    fn allocated(&mut self) -> io::Result<Vec<(u64, u64)>>;
    /// Byte ranges where the head alone holds data (a rebuild that copied
    /// the snapshot layers first copies only these).
    fn head_allocated(&mut self) -> io::Result<Vec<(u64, u64)>>;
    fn describe(&self) -> String;
}

struct LocalStore(Arc<Replica>);

impl BlockStore for LocalStore {
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_at(offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_at(offset, data, false)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.0.write_zeroes(offset, len)
    }
    fn allocated(&mut self) -> io::Result<Vec<(u64, u64)>> {
        Ok(self.0.allocated_ranges())
    }
    fn head_allocated(&mut self) -> io::Result<Vec<(u64, u64)>> {
        self.0.layer_data("").map_err(io::Error::other)
    }
    fn describe(&self) -> String {
        self.0.dir().display().to_string()
    }
}

struct RemoteStore {
    conn: PeerConn,
    data: Vec<u8>,
}

pub(super) fn peer_io(e: PeerError) -> io::Error {
    io::Error::other(e.to_string())
}

impl BlockStore for RemoteStore {
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len() as u32;
        match self
            .conn
            .call_data(Op::Read { offset, len }, &[], &mut self.data)
            .map_err(peer_io)?
        {
            Op::Data if self.data.len() == buf.len() => {
                buf.copy_from_slice(&self.data);
                Ok(())
            }
            other => Err(io::Error::other(format!(
                "unexpected answer {other:?} to a read"
            ))),
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut none = Vec::new();
        match self
            .conn
            .call_data(Op::Write { offset, fua: false }, data, &mut none)
            .map_err(peer_io)?
        {
            Op::Ok => Ok(()),
            other => Err(io::Error::other(format!(
                "unexpected answer {other:?} to a write"
            ))),
        }
    }
    fn write_many(&mut self, chunks: &[(u64, &[u8])]) -> io::Result<()> {
        self.conn.write_many(chunks).map_err(peer_io)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.conn.call_ok(Op::Flush).map_err(peer_io)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        // The op carries a u32 length: large ranges go in pieces.
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(1 << 30);
            self.conn
                .call_ok(Op::WriteZeroes {
                    offset: pos,
                    len: n as u32,
                })
                .map_err(peer_io)?;
            pos += n;
        }
        Ok(())
    }
    fn allocated(&mut self) -> io::Result<Vec<(u64, u64)>> {
        match self.conn.call(Op::ListAllocated).map_err(peer_io)? {
            Op::Extents { extents } => Ok(extents),
            other => Err(io::Error::other(format!(
                "unexpected answer {other:?} to ListAllocated"
            ))),
        }
    }
    fn head_allocated(&mut self) -> io::Result<Vec<(u64, u64)>> {
        list_layer(&mut self.conn, "")
    }
    fn describe(&self) -> String {
        self.conn.addr().to_string()
    }
}

pub(super) fn list_layer(conn: &mut PeerConn, layer: &str) -> io::Result<Vec<(u64, u64)>> {
    match conn
        .call(Op::ListExtents {
            layer: layer.to_string(),
        })
        .map_err(peer_io)?
    {
        Op::Extents { extents } => Ok(extents),
        other => Err(io::Error::other(format!(
            "unexpected answer {other:?} to ListExtents"
        ))),
    }
}

/// What must match between source and target chains: the snapshots, in
/// order, with their removed marks.
fn chain_signature(chain: &[LayerInfo]) -> Vec<(String, bool)> {
    chain
        .iter()
        .filter(|l| !l.is_head)
        .map(|l| (l.file.clone(), l.removed))
        .collect()
}

/// Gives a fresh target the source's snapshot layers before it joins the
/// write set: each layer's own data is written to the target's head, which
/// is then snapshotted with the layer's name, time, labels and marks. The
/// layers are immutable while a rebuild runs (chain changes are refused),
/// and the caller checks after joining that no change slipped in before.
fn copy_layers(
    volume: &VolumeIo,
    name: &str,
    target_io: &ReplicaIo,
    target: &mut dyn BlockStore,
    progress: &RebuildProgress,
    cancel: &AtomicBool,
) -> Result<Vec<(String, bool)>, RebuildError> {
    let err = |what: &'static str, store: String| {
        let replica = name.to_string();
        move |source| RebuildError::Io {
            replica,
            what,
            store,
            source,
        }
    };
    let source = pick_source(volume, usize::MAX).ok_or_else(|| RebuildError::NoSource {
        replica: name.to_string(),
    })?;
    let chain = source
        .chain()
        .map_err(|e| err("listing layers of", source.describe())(io::Error::other(e)))?;
    let mut reader =
        LayerReader::open(&source).map_err(err("opening source", source.describe()))?;
    let mut buf = vec![0u8; CHUNK as usize];
    for l in chain.iter().filter(|l| !l.is_head) {
        let Some(snap) = l.snapshot.clone() else {
            continue;
        };
        let ranges = reader
            .ranges(&l.file)
            .map_err(err("listing extents of", source.describe()))?;
        progress
            .total
            .fetch_add(ranges.iter().map(|r| r.1).sum::<u64>(), Ordering::Relaxed);
        for (off, len) in ranges {
            let mut pos = off;
            while pos < off + len {
                if cancel.load(Ordering::Relaxed) {
                    return Err(RebuildError::Cancelled {
                        replica: name.to_string(),
                    });
                }
                let n = (off + len - pos).min(CHUNK) as usize;
                reader
                    .read(&l.file, pos, &mut buf[..n])
                    .map_err(err("reading a layer of", source.describe()))?;
                target
                    .write(pos, &buf[..n])
                    .map_err(err("writing", target.describe()))?;
                progress.done.fetch_add(n as u64, Ordering::Relaxed);
                pos += n as u64;
            }
        }
        target.flush().map_err(err("flushing", target.describe()))?;
        let mk = ChainChange::Snapshot {
            name: snap.clone(),
            created: l.created.clone(),
            user_created: l.user_created,
            labels: l.labels.clone(),
        };
        target_io
            .change_chain(&mk)
            .map_err(|e| err("snapshotting", target.describe())(io::Error::other(e)))?;
        if l.removed {
            target_io
                .change_chain(&ChainChange::Remove { name: snap })
                .map_err(|e| {
                    err("marking a snapshot removed on", target.describe())(io::Error::other(e))
                })?;
        }
    }
    Ok(chain_signature(&chain))
}

/// A healthy replica to copy from, other than slot `skip`; local first.
fn pick_source(volume: &VolumeIo, skip: usize) -> Option<Arc<ReplicaIo>> {
    let healthy = healthy_of(volume.masks()) & !(1u32.checked_shl(skip as u32).unwrap_or(0));
    let candidates: Vec<Arc<ReplicaIo>> = (0..volume.replica_count())
        .filter(|i| healthy & (1 << i) != 0)
        .filter_map(|i| volume.replica(i))
        .collect();
    candidates
        .iter()
        .find(|io| matches!(***io, ReplicaIo::Local(_)))
        .or(candidates.first())
        .cloned()
}

/// A blocking store over the same replica an engine slot uses.
pub fn store_for(io: &ReplicaIo) -> io::Result<Box<dyn BlockStore>> {
    Ok(match io {
        ReplicaIo::Local(r) => Box::new(LocalStore(r.clone())),
        ReplicaIo::Remote(r) => Box::new(RemoteStore {
            conn: r.open_stream().map_err(peer_io)?,
            data: Vec::new(),
        }),
    })
}

/// Live progress of one rebuild, read by `cairnctl volume get`.
#[derive(Debug)]
pub struct RebuildProgress {
    pub replica: String,
    /// Bytes to copy as known so far (grows if later passes find more).
    pub total: AtomicU64,
    pub done: AtomicU64,
    pub incremental: AtomicBool,
    pub started: Instant,
}

impl RebuildProgress {
    pub fn new(replica: &str) -> RebuildProgress {
        RebuildProgress {
            replica: replica.to_string(),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            incremental: AtomicBool::new(false),
            started: Instant::now(),
        }
    }

    pub fn percent(&self) -> u32 {
        let total = self.total.load(Ordering::Relaxed);
        let done = self.done.load(Ordering::Relaxed);
        (done.min(total) * 100).checked_div(total).unwrap_or(0) as u32
    }

    /// Bytes per second since the rebuild started.
    pub fn rate(&self) -> u64 {
        let secs = self.started.elapsed().as_secs_f64();
        if secs <= 0.0 {
            0
        } else {
            (self.done.load(Ordering::Relaxed) as f64 / secs) as u64
        }
    }
}

/// What a finished rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildReport {
    pub incremental: bool,
    /// Bytes copied (chunks redone after a racing write count again).
    pub copied: u64,
    pub redone_chunks: u64,
    pub passes: u32,
    pub elapsed: Duration,
}

/// Rebuilds slot `idx` of `volume` onto `io` (replica `name`). Blocking;
/// run it on its own thread. `cancel` stops it between chunks.
pub fn rebuild(
    volume: &VolumeIo,
    idx: usize,
    name: &str,
    io: ReplicaIo,
    progress: &RebuildProgress,
    cancel: &AtomicBool,
) -> Result<RebuildReport, RebuildError> {
    let io_err = |what, store: String| {
        let replica = name.to_string();
        move |source| RebuildError::Io {
            replica,
            what,
            store,
            source,
        }
    };
    let desc = io.describe();
    let mut target = store_for(&io).map_err(io_err("opening", desc.clone()))?;
    // A full rebuild (a fresh replica) first gets the snapshot layers, so
    // every replica has the same chain; an incremental one already has it.
    let layered = if volume.would_resume(idx, name, &io) {
        None
    } else {
        Some(copy_layers(
            volume,
            name,
            &io,
            &mut *target,
            progress,
            cancel,
        )?)
    };
    let incremental = volume.start_rebuild(idx, name, io)?;
    if layered.is_none() && !incremental {
        // It looked resumable but no longer is: the layers were not copied.
        let e = RebuildError::ChainChanged {
            replica: name.to_string(),
        };
        volume.fail_index(idx, &e.to_string());
        volume.clear_slot(idx);
        return Err(e);
    }
    if let Some(sig) = &layered {
        // No chain change can start now (the target is rebuilding); check
        // that none happened while the layers were copied.
        let now = pick_source(volume, idx)
            .and_then(|s| s.chain().ok())
            .map(|c| chain_signature(&c));
        if now.as_ref() != Some(sig) {
            let e = RebuildError::ChainChanged {
                replica: name.to_string(),
            };
            volume.fail_index(idx, &e.to_string());
            volume.clear_slot(idx);
            return Err(e);
        }
    }
    progress.incremental.store(incremental, Ordering::Relaxed);
    let mut copier = Copier {
        volume,
        regions: volume.regions(),
        idx,
        name,
        target,
        progress,
        cancel,
        taken: Vec::new(),
        report: RebuildReport {
            incremental,
            copied: 0,
            redone_chunks: 0,
            passes: 0,
            elapsed: Duration::ZERO,
        },
    };
    match copier.run(incremental, layered.is_some()) {
        Ok(()) => {
            volume.finish_rebuild(idx)?;
            copier.report.elapsed = progress.started.elapsed();
            tracing::info!(volume = %volume.name(), replica = name, incremental, copied = copier.report.copied,
                elapsed_ms = copier.report.elapsed.as_millis() as u64, "rebuild complete");
            Ok(copier.report)
        }
        Err(e) => {
            // Whatever was taken off the map may not have reached the target.
            if let Some(map) = volume.dirty_map(idx) {
                for &(s, e) in &copier.taken {
                    map.set_range(s, e);
                }
            }
            volume.fail_index(idx, &e.to_string());
            // Close the target's connections so its node can delete it.
            volume.clear_slot(idx);
            Err(e)
        }
    }
}

struct Copier<'a> {
    volume: &'a VolumeIo,
    /// The volume's write counters (fixed for the rebuild: a growth waits
    /// until no rebuild runs).
    regions: Arc<Box<[Region]>>,
    idx: usize,
    name: &'a str,
    target: Box<dyn BlockStore>,
    progress: &'a RebuildProgress,
    cancel: &'a AtomicBool,
    /// Block ranges cleared from the dirty map by this attempt.
    taken: Vec<(u64, u64)>,
    report: RebuildReport,
}

impl Copier<'_> {
    fn source(&self) -> Result<Box<dyn BlockStore>, RebuildError> {
        let pick = pick_source(self.volume, self.idx).ok_or_else(|| RebuildError::NoSource {
            replica: self.name.to_string(),
        })?;
        store_for(&pick).map_err(|source| RebuildError::Io {
            replica: self.name.to_string(),
            what: "opening source",
            store: pick.describe(),
            source,
        })
    }

    fn io_err(&self, what: &'static str, store: String, source: io::Error) -> RebuildError {
        RebuildError::Io {
            replica: self.name.to_string(),
            what,
            store,
            source,
        }
    }

    fn run(&mut self, incremental: bool, layered: bool) -> Result<(), RebuildError> {
        let mut source = self.source()?;
        let map: Arc<HeadBitmap> =
            self.volume
                .dirty_map(self.idx)
                .ok_or_else(|| EngineError::RebuildAborted {
                    volume: self.volume.name().to_string(),
                    replica: self.name.to_string(),
                })?;
        if !incremental {
            // Writes that loaded the masks before the target joined did not
            // go to it and marked no map it has. Wait until each of them is
            // done (every region idle once; they counted themselves before
            // loading the masks), so the listing below includes their data.
            self.wait_quiet()?;
            fail::fail_point!("rebuild::before_listing");
            let ranges = if layered {
                source.head_allocated()
            } else {
                source.allocated()
            }
            .map_err(|e| self.io_err("listing extents of", source.describe(), e))?;
            for (off, len) in ranges {
                map.set_range(off / BLOCK_SIZE, (off + len).div_ceil(BLOCK_SIZE));
            }
            // Between the listing and the copy: writes landing now mark
            // the target's map (it is a write target already).
            fail::fail_point!("rebuild::after_listing");
        }
        let mut bufs: Vec<Vec<u8>> = (0..WINDOW).map(|_| vec![0u8; CHUNK as usize]).collect();
        let mut quiet_seen = false;
        loop {
            let ranges = map.ranges();
            if ranges.is_empty() {
                if quiet_seen {
                    break;
                }
                // Writes that started before the target joined may still
                // mark the map: wait until each region was idle once.
                self.wait_quiet()?;
                quiet_seen = true;
                continue;
            }
            quiet_seen = false;
            self.report.passes += 1;
            let bytes: u64 = ranges.iter().map(|(s, e)| (e - s) * BLOCK_SIZE).sum();
            self.progress.total.fetch_add(bytes, Ordering::Relaxed);
            let mut window: Vec<(u64, usize)> = Vec::with_capacity(WINDOW);
            for (s, e) in ranges {
                map.clear_range(s, e);
                self.taken.push((s, e));
                let (mut off, end) = (s * BLOCK_SIZE, e * BLOCK_SIZE);
                while off < end {
                    // Chunks never cross a region boundary.
                    let region_end = (off | (CHUNK - 1)) + 1;
                    let len = (end.min(region_end) - off) as usize;
                    window.push((off, len));
                    if window.len() == WINDOW {
                        self.copy_window(&mut *source, &window, &mut bufs)?;
                        window.clear();
                    }
                    off += len as u64;
                }
            }
            if !window.is_empty() {
                self.copy_window(&mut *source, &window, &mut bufs)?;
            }
        }
        self.target
            .flush()
            .map_err(|e| self.io_err("flushing", self.target.describe(), e))
    }

    /// Copies up to [`WINDOW`] chunks with their writes in flight together,
    /// then applies the race check to each; a chunk that raced with a write
    /// is copied again on its own.
    fn copy_window(
        &mut self,
        source: &mut dyn BlockStore,
        window: &[(u64, usize)],
        bufs: &mut [Vec<u8>],
    ) -> Result<(), RebuildError> {
        let mut started = [0u32; WINDOW];
        for (i, &(off, _)) in window.iter().enumerate() {
            started[i] = self.wait_idle((off >> REGION_SHIFT) as usize)?;
        }
        for (i, &(off, len)) in window.iter().enumerate() {
            source
                .read(off, &mut bufs[i][..len])
                .map_err(|e| self.io_err("reading", source.describe(), e))?;
        }
        let chunks: Vec<(u64, &[u8])> = window
            .iter()
            .zip(bufs.iter())
            .map(|(&(off, len), b)| (off, &b[..len]))
            .collect();
        self.target
            .write_many(&chunks)
            .map_err(|e| self.io_err("writing", self.target.describe(), e))?;
        for (i, &(off, len)) in window.iter().enumerate() {
            self.report.copied += len as u64;
            let Some(region) = self.regions.get((off >> REGION_SHIFT) as usize) else {
                continue;
            };
            if region.inflight.load(Ordering::SeqCst) != 0
                || region.started.load(Ordering::SeqCst) != started[i]
            {
                // A write raced with the copy: copy this chunk again.
                self.report.redone_chunks += 1;
                self.copy_chunk(source, off, &mut bufs[0][..len])?;
            }
            self.progress.done.fetch_add(len as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Waits until no write is in flight in region `idx`; returns its
    /// `started` count read before that check (see `copy_chunk`).
    fn wait_idle(&self, idx: usize) -> Result<u32, RebuildError> {
        let Some(region) = self.regions.get(idx) else {
            return Ok(0);
        };
        let since = Instant::now();
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(RebuildError::Cancelled {
                    replica: self.name.to_string(),
                });
            }
            if !self.volume.is_rebuilding(self.idx) {
                return Err(EngineError::RebuildAborted {
                    volume: self.volume.name().to_string(),
                    replica: self.name.to_string(),
                }
                .into());
            }
            let started = region.started.load(Ordering::SeqCst);
            if region.inflight.load(Ordering::SeqCst) == 0 {
                return Ok(started);
            }
            if since.elapsed() > QUIET_TIMEOUT {
                return Err(RebuildError::Busy {
                    replica: self.name.to_string(),
                    region: idx,
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Copies one chunk until it was copied with no write racing it.
    fn copy_chunk(
        &mut self,
        source: &mut dyn BlockStore,
        off: u64,
        buf: &mut [u8],
    ) -> Result<(), RebuildError> {
        let region_idx = (off >> REGION_SHIFT) as usize;
        let Some(region) = self.regions.get(region_idx) else {
            return Ok(());
        };
        loop {
            let started = self.wait_idle(region_idx)?;
            source
                .read(off, buf)
                .map_err(|e| self.io_err("reading", source.describe(), e))?;
            self.target
                .write(off, buf)
                .map_err(|e| self.io_err("writing", self.target.describe(), e))?;
            self.report.copied += buf.len() as u64;
            if region.inflight.load(Ordering::SeqCst) == 0
                && region.started.load(Ordering::SeqCst) == started
            {
                return Ok(());
            }
            // A write raced with the copy: the target may now hold older
            // data than that write. Copy the chunk again.
            self.report.redone_chunks += 1;
        }
    }

    fn wait_quiet(&self) -> Result<(), RebuildError> {
        for (i, region) in self.regions.iter().enumerate() {
            let since = Instant::now();
            while region.inflight.load(Ordering::SeqCst) != 0 {
                if since.elapsed() > QUIET_TIMEOUT {
                    return Err(RebuildError::Busy {
                        replica: self.name.to_string(),
                        region: i,
                    });
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Ok(())
    }
}
