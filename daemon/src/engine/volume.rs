//! `VolumeIo`: one volume's replica set as every queue thread sees it, and
//! the rare-path operations that change it (replica failure, epochs,
//! rebuild).
//!
//! The set lives in one atomic word read once per I/O:
//!
//! ```text
//!  bits 0..8    healthy     read and written
//!  bits 8..16   rebuilding  written (the copy fills in the rest), never read
//!  bits 16..24  tracking    not written: writes mark the replica's dirty map
//! ```
//!
//! A replica that fails keeps a dirty map (one bit per 4 KiB block) of every
//! write it misses, so when it comes back only those blocks are copied.
//! Writes also count, per 1 MiB region, how many are in flight and how many
//! ever started: a rebuild uses that to copy a region only when no write
//! raced with the copy (see `rebuild.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use arc_swap::{ArcSwap, ArcSwapOption, Guard};

use super::intent::{IntentLog, CHUNK_SHIFT};
use super::queue::QueueStats;
use super::remote::CompletionPort;
use super::replica_io::SetRevisionError;
use super::{EngineError, ReplicaIo, MAX_REPLICAS};
use crate::replica::extent::HeadBitmap;
use crate::replica::BLOCK_SIZE;
use crate::replica::{ChainChange, ChainOutcome, Claim, OwnerTerm, Session};

/// A replica handed to the engine at attach. `io: None` is a replica the
/// volume has but cannot reach now (failed, or its node is down): it holds
/// a slot so it can be rebuilt later.
pub struct ReplicaHandle {
    pub name: String,
    pub io: Option<ReplicaIo>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    Healthy,
    Rebuilding,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeHealth {
    /// Every replica is in the I/O set.
    Healthy,
    /// Serving I/O with fewer replicas than it has.
    Degraded,
    /// No healthy replica: every I/O fails.
    Faulted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub name: String,
    pub state: ReplicaState,
    pub message: String,
}

/// What the engine tells the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    ReplicaFailed {
        replica: String,
        reason: String,
    },
    /// A replica refused our owner session: another engine claimed the
    /// volume. Every I/O now fails; the volume must be detached here.
    Fenced {
        reason: String,
    },
}

/// Receives engine events. Called from I/O threads: it must not block.
pub type EventSink = Box<dyn Fn(EngineEvent) + Send + Sync>;

/// Persists a replica-set change synchronously: `(revision, healthy
/// replica names)`, called inside the commit before the new set is
/// published (so before the write that exposed a failure is acknowledged).
/// Rare path; it may block on an fsync.
pub type EpochLog = Box<dyn Fn(u64, &[String]) -> std::io::Result<()> + Send + Sync>;

/// Queue layout the volume is served with (the frontend's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    pub queues: u16,
    pub depth: u16,
}

/// Bytes per write-tracking region (a power of two).
pub(crate) const REGION_SHIFT: u32 = 20;

/// Write counters of one region.
#[derive(Default)]
pub(crate) struct Region {
    pub inflight: AtomicU32,
    pub started: AtomicU32,
}

struct Slot {
    name: Mutex<String>,
    io: ArcSwapOption<ReplicaIo>,
    /// Blocks written while this replica was out of the write set.
    dirty: ArcSwapOption<HeadBitmap>,
    /// The volume's revision when the replica left (a returning replica
    /// must still be at it for its dirty map to describe it).
    left_at: AtomicU64,
    /// The owner generation this engine holds on the slot's replica (0:
    /// none claimed yet), what a later claim renews.
    generation: AtomicU64,
    /// The serving node's boot when the replica was installed: a replica
    /// back from another boot may have lost unflushed writes, so its dirty
    /// map does not describe it.
    instance: Mutex<String>,
    /// A local replica's owner session (remote ones hold theirs on the
    /// server's connection).
    session: Mutex<Option<Arc<Session>>>,
}

#[inline]
pub(crate) fn healthy_of(m: u32) -> u32 {
    m & 0xff
}
#[inline]
pub(crate) fn rebuilding_of(m: u32) -> u32 {
    (m >> 8) & 0xff
}
#[inline]
pub(crate) fn tracking_of(m: u32) -> u32 {
    (m >> 16) & 0xff
}
#[inline]
fn pack(healthy: u32, rebuilding: u32, tracking: u32) -> u32 {
    (healthy & 0xff) | (rebuilding & 0xff) << 8 | (tracking & 0xff) << 16
}

/// The replica set of one attached volume.
pub struct VolumeIo {
    name: String,
    /// Bytes; grows only under quiesce ([`Self::grow`]).
    size: AtomicU64,
    slots: Box<[Slot]>,
    masks: AtomicU32,
    /// Bit i set: slot i's replica is on this node (reads prefer those).
    local: AtomicU32,
    revision: AtomicU64,
    /// Serializes membership changes; holds each slot's last failure reason.
    membership: Mutex<Vec<String>>,
    events: EventSink,
    /// One entry per queue engine, summed by [`VolumeIo::stats`].
    queues: Mutex<Vec<Arc<QueueStats>>>,
    layout: QueueLayout,
    ports: Box<[Arc<CompletionPort>]>,
    /// One per MiB of the volume; replaced (longer, counters carried over)
    /// only under quiesce by [`Self::grow`].
    regions: ArcSwap<Box<[Region]>>,
    /// Pause word: `epoch << 1 | paused`. Read once per request.
    pause: AtomicU64,
    /// Set while a [`Quiesced`] guard exists (one at a time).
    pausing: std::sync::atomic::AtomicBool,
    /// Another engine claimed a replica of this volume: no more I/O.
    fenced: AtomicBool,
    /// The volume's ownership this engine claims replicas with (set once by
    /// the control plane before the epoch; default: term 0, no check).
    owner: OnceLock<OwnerTerm>,
    /// Ourselves, for the fence hooks of local sessions.
    me: OnceLock<Weak<VolumeIo>>,
    /// Where replica-set changes are persisted (the control plane's epoch
    /// mark), if anywhere.
    epoch_log: OnceLock<EpochLog>,
    /// Chunks that may hold writes not yet on every healthy replica
    /// (replaced by a longer one, bits carried over, by [`Self::grow`]).
    intent: ArcSwapOption<IntentLog>,
    /// Per set intent chunk, the writes started in it at the last settle.
    settle_seen: Mutex<HashMap<u64, u64>>,
}

fn describe_change(c: &ChainChange) -> String {
    match c {
        ChainChange::Snapshot { name, .. } => format!("snapshot {name}"),
        ChainChange::Remove { name } => format!("removing snapshot {name}"),
        ChainChange::Purge => "snapshot purge".into(),
        ChainChange::Revert { name } => format!("revert to snapshot {name}"),
        ChainChange::Grow { size } => format!("growing to {size} bytes"),
    }
}

/// A quiesced volume: no request is in flight on any queue and new ones are
/// held back until this guard is dropped.
pub struct Quiesced {
    volume: Arc<VolumeIo>,
}

impl Drop for Quiesced {
    fn drop(&mut self) {
        let w = self.volume.pause.load(Ordering::Relaxed);
        self.volume.pause.store(w & !1, Ordering::Release);
        for p in self.volume.ports.iter() {
            p.wake();
        }
        self.volume.pausing.store(false, Ordering::Release);
    }
}

/// I/O totals of a volume since it was attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStats {
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub errors: u64,
}

impl VolumeIo {
    /// A replica set with every reachable replica healthy. Remote replicas
    /// get their per-queue connections here. Call [`VolumeIo::begin_epoch`]
    /// before serving I/O.
    pub fn new(
        name: &str,
        size: u64,
        replicas: Vec<ReplicaHandle>,
        events: EventSink,
        layout: QueueLayout,
    ) -> Result<Arc<VolumeIo>, EngineError> {
        if replicas.is_empty() {
            return Err(EngineError::NoReplicas {
                volume: name.to_string(),
            });
        }
        if replicas.len() > MAX_REPLICAS {
            return Err(EngineError::TooManyReplicas {
                volume: name.to_string(),
                count: replicas.len(),
            });
        }
        for r in &replicas {
            if let Some(io) = &r.io {
                if io.size() != size {
                    return Err(EngineError::SizeMismatch {
                        volume: name.to_string(),
                        replica: r.name.clone(),
                        size: io.size(),
                        expected: size,
                    });
                }
            }
        }
        let ports = (0..layout.queues.max(1))
            .map(|_| CompletionPort::new(layout.depth).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EngineError::Setup {
                volume: name.to_string(),
                reason: format!("eventfd: {e}"),
            })?;
        let n = replicas.len();
        let mut messages = vec![String::new(); n];
        let mut healthy = 0u32;
        let mut slots = Vec::with_capacity(n);
        for (i, r) in replicas.into_iter().enumerate() {
            let io = match r.io {
                Some(ReplicaIo::Remote(rem)) => {
                    match rem.start_queues(&ports, layout.depth, i as u8) {
                        Ok(()) => Some(Arc::new(ReplicaIo::Remote(rem))),
                        Err(e) => {
                            messages[i] = format!("cannot connect: {e}");
                            None
                        }
                    }
                }
                other => other.map(Arc::new),
            };
            if io.is_some() {
                healthy |= 1 << i;
            } else if messages[i].is_empty() {
                messages[i] = "not reachable at attach".to_string();
            }
            let generation = match io.as_deref() {
                Some(ReplicaIo::Remote(rem)) => rem.generation(),
                _ => 0,
            };
            let instance = io.as_deref().map(ReplicaIo::instance).unwrap_or_default();
            slots.push(Slot {
                name: Mutex::new(r.name),
                io: ArcSwapOption::new(io),
                dirty: ArcSwapOption::empty(),
                left_at: AtomicU64::new(0),
                generation: AtomicU64::new(generation),
                instance: Mutex::new(instance),
                session: Mutex::new(None),
            });
        }
        let revision = slots
            .iter()
            .filter_map(|s| s.io.load().as_ref().map(|io| io.revision()))
            .max()
            .unwrap_or(0);
        let local = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.io.load().as_deref(), Some(ReplicaIo::Local(_))))
            .fold(0u32, |m, (i, _)| m | 1 << i);
        let regions: Box<[Region]> = (0..size.div_ceil(1 << REGION_SHIFT))
            .map(|_| Region::default())
            .collect();
        let volume = Arc::new(VolumeIo {
            name: name.to_string(),
            size: AtomicU64::new(size),
            slots: slots.into_boxed_slice(),
            masks: AtomicU32::new(pack(healthy, 0, 0)),
            local: AtomicU32::new(local),
            revision: AtomicU64::new(revision),
            membership: Mutex::new(messages),
            events,
            queues: Mutex::new(Vec::new()),
            layout,
            ports: ports.into_boxed_slice(),
            regions: ArcSwap::from_pointee(regions),
            pause: AtomicU64::new(0),
            pausing: std::sync::atomic::AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            owner: OnceLock::new(),
            me: OnceLock::new(),
            epoch_log: OnceLock::new(),
            intent: ArcSwapOption::empty(),
            settle_seen: Mutex::new(HashMap::new()),
        });
        let _ = volume.me.set(Arc::downgrade(&volume));
        Ok(volume)
    }

    /// Sets where replica-set changes are persisted (once, before
    /// [`Self::begin_epoch`]).
    pub fn set_epoch_log(&self, log: EpochLog) {
        let _ = self.epoch_log.set(log);
    }

    /// Sets the write-intent log (once, before the device serves I/O):
    /// from then on every write persists its chunk's bit before its legs.
    pub fn set_intent_log(&self, log: IntentLog) {
        self.intent.store(Some(Arc::new(log)));
    }

    /// A clean stop (no request can arrive any more): flushes every healthy
    /// replica and, if that succeeded, removes the write-intent log, so the
    /// next attach knows the replicas agree.
    pub fn flush_and_close(&self) -> Result<(), EngineError> {
        self.flush()?;
        if let Some(log) = self.intent.load().as_ref() {
            log.remove().map_err(|e| EngineError::Setup {
                volume: self.name.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Writes started so far in intent chunk `chunk`, and whether one is in
    /// flight.
    fn chunk_writes(&self, chunk: u64) -> (u64, bool) {
        let per = 1usize << (CHUNK_SHIFT - REGION_SHIFT);
        let first = chunk as usize * per;
        let mut started = 0u64;
        let mut busy = false;
        for reg in self.regions.load().iter().skip(first).take(per) {
            started = started.wrapping_add(u64::from(reg.started.load(Ordering::SeqCst)));
            busy |= reg.inflight.load(Ordering::SeqCst) != 0;
        }
        (started, busy)
    }

    /// Clears the intent bits of chunks that settled: no write started
    /// there since the last call and none is in flight. Flushes the healthy
    /// set first (only then do its replicas agree there on disk). Called
    /// every few seconds off the I/O path; returns how many it cleared.
    pub fn settle_intent(&self) -> usize {
        let Some(log) = self.intent.load_full() else {
            return 0;
        };
        let mut seen = self.settle_seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut quiet = Vec::new();
        let mut next = HashMap::new();
        for chunk in log.set_chunks() {
            let (started, busy) = self.chunk_writes(chunk);
            if !busy && seen.get(&chunk) == Some(&started) {
                quiet.push((chunk, started));
            } else {
                next.insert(chunk, started);
            }
        }
        *seen = next;
        if quiet.is_empty() || self.is_fenced() || self.flush().is_err() {
            return 0;
        }
        log.clear_settled(&quiet, |c| self.chunk_writes(c).0)
    }

    /// The byte ranges the write-intent log names now (empty without one).
    pub fn intent_ranges(&self) -> Vec<(u64, u64)> {
        self.intent
            .load()
            .as_deref()
            .map(IntentLog::dirty_ranges)
            .unwrap_or_default()
    }

    /// After an unclean stop, the replicas of the new epoch may differ in
    /// writes never acknowledged. One stays in the set, a local one if any
    /// (the source); the others leave it. With `ranges` (from the last
    /// write-intent log) they track a dirty map of those ranges, so their
    /// resync copies only those; with `None` nothing is known and they are
    /// rebuilt whole. Call right after [`Self::begin_epoch`], before I/O.
    /// Returns the revision.
    pub fn resync_after_unclean_stop(
        &self,
        ranges: Option<&[(u64, u64)]>,
    ) -> Result<u64, EngineError> {
        let mut messages = self.lock();
        let m = self.masks();
        let healthy = healthy_of(m);
        let revision = self.revision();
        let local = healthy & self.local_mask();
        let pool = if local != 0 { local } else { healthy };
        if pool == 0 {
            return Err(EngineError::Faulted {
                volume: self.name.clone(),
            });
        }
        let source = 1u32 << pool.trailing_zeros();
        let others: Vec<usize> = (0..self.slots.len())
            .filter(|i| healthy & !source & (1 << i) != 0)
            .collect();
        if others.is_empty() {
            return Ok(revision);
        }
        let reason = match ranges {
            Some(_) => "resync after an unclean stop: may differ from the source in writes never acknowledged; the chunks written last are copied from it",
            None => "resync after an unclean stop: may differ from the source in writes never acknowledged, and where is unknown; rebuilt whole from it",
        };
        if let Some(ranges) = ranges {
            for &i in &others {
                self.seed_dirty(i, ranges, revision);
            }
        }
        let failed = others.iter().map(|&i| (i, reason.to_string())).collect();
        tracing::warn!(volume = %self.name, source = %self.slot_name(source.trailing_zeros() as usize), chunks = ?ranges, "unclean stop: serving from one replica while the others resync");
        self.commit(
            &mut messages,
            source,
            revision + 1,
            failed,
            ranges.is_some(),
        )
    }

    /// Gives slot `idx` (about to leave the set at `revision`) a dirty map
    /// holding `ranges` (bytes) and whatever it tracked already.
    fn seed_dirty(&self, idx: usize, ranges: &[(u64, u64)], revision: u64) {
        let slot = &self.slots[idx];
        let map = HeadBitmap::new(self.size().div_ceil(BLOCK_SIZE));
        if let Some(old) = slot.dirty.load_full() {
            if slot.left_at.load(Ordering::SeqCst) == revision {
                for (s, e) in old.ranges() {
                    map.set_range(s, e);
                }
            }
        }
        for &(s, e) in ranges {
            map.set_range(s / BLOCK_SIZE, e.div_ceil(BLOCK_SIZE));
        }
        slot.dirty.store(Some(Arc::new(map)));
        slot.left_at.store(revision, Ordering::SeqCst);
    }

    /// Persists `(revision, the replicas in mask)` through the epoch log.
    fn log_epoch(&self, revision: u64, mask: u32) {
        let Some(log) = self.epoch_log.get() else {
            return;
        };
        let names: Vec<String> = (0..self.slots.len())
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| self.slot_name(i))
            .collect();
        if let Err(e) = log(revision, &names) {
            // The replicas' revisions still order them; only the guard
            // against a crash before the record is saved is lost.
            tracing::error!(volume = %self.name, error = %e, "cannot persist the replica set");
        }
    }

    /// Whether another engine fenced this one (see [`EngineEvent::Fenced`]).
    #[inline]
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// This engine lost the volume: a replica refused its owner session.
    /// From now on every request fails with EIO; nothing is failed or
    /// rebuilt (the replicas are fine, they belong to someone else now).
    /// Does not wait: safe on a queue thread.
    pub(crate) fn mark_fenced(&self, reason: &str) {
        if !self.fenced.swap(true, Ordering::SeqCst) {
            tracing::error!(volume = %self.name, %reason, "volume fenced: another engine owns it now; failing all I/O");
            (self.events)(EngineEvent::Fenced {
                reason: reason.to_string(),
            });
        }
    }

    /// A newer owner claimed one of our local replicas: fence, then wait
    /// until no write admitted before the fence is still in flight (the
    /// claim answers only after this returns). Never on a queue thread.
    fn fence_and_drain(&self, reason: &str) {
        self.mark_fenced(reason);
        // Writes count themselves in the region counters before they check
        // the fence (`QueueEngine::submit`): once every region is idle, no
        // write that passed the check is in flight.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        for r in self.regions.load().iter() {
            while r.inflight.load(Ordering::SeqCst) != 0 {
                if std::time::Instant::now() > deadline {
                    tracing::error!(volume = %self.name, "fenced volume still has writes in flight after 60 s");
                    return;
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
    }

    /// The claim with which this engine (re)takes the replica `name` into
    /// slot `idx`: a renewal of the session it holds on it, or a takeover of
    /// a replica it never claimed (attach, adopt, a new replica).
    pub fn claim_for(&self, idx: usize, name: &str) -> Claim {
        let Some(slot) = self.slots.get(idx) else {
            return self.takeover();
        };
        let held = slot.generation.load(Ordering::SeqCst);
        if held != 0 && *slot.name.lock().unwrap_or_else(|p| p.into_inner()) == name {
            Claim::Renew { expect: held }
        } else {
            self.takeover()
        }
    }

    /// Sets the ownership this engine claims replicas with (see
    /// [`OwnerTerm`]); once, before the epoch begins.
    pub fn set_owner(&self, owner: OwnerTerm) {
        let _ = self.owner.set(owner);
    }

    /// The owner term this engine claims with (0 when never set).
    pub fn owner_term(&self) -> u64 {
        self.owner.get().map_or(0, |o| o.term)
    }

    /// The claim that takes a replica over for this engine's owner.
    pub fn takeover(&self) -> Claim {
        Claim::Takeover {
            owner: self.owner.get().cloned().unwrap_or_default(),
        }
    }

    /// Records that this engine now holds the session `io` was opened with
    /// on slot `idx`'s replica `name`, even if `io` is not installed (a
    /// salvage that keeps another one, a resume check that leads to a
    /// replacement): the next claim must renew that generation, not the
    /// older one, or it would be refused as if another owner held it.
    pub fn note_claimed(&self, idx: usize, name: &str, io: &ReplicaIo) {
        let (Some(slot), ReplicaIo::Remote(rem)) = (self.slots.get(idx), io) else {
            return;
        };
        if *slot.name.lock().unwrap_or_else(|p| p.into_inner()) == name {
            slot.generation.store(rem.generation(), Ordering::SeqCst);
        }
    }

    /// Claims an owner session of a local replica for slot `idx` (a remote
    /// one was claimed by its connection) and records the generation.
    fn claim_slot(&self, idx: usize, io: &ReplicaIo, claim: Claim) -> Result<(), String> {
        let slot = &self.slots[idx];
        match io {
            ReplicaIo::Local(r) => {
                // Our own earlier session on it ends without a hook: its
                // writes are ours, and the rebuild's race check covers them.
                if let Some(old) = slot
                    .session
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                {
                    old.release();
                }
                let session = r.claim(claim).map_err(|e| e.to_string())?;
                let me = self.me.get().cloned().unwrap_or_default();
                let replica = r.replica_name().to_string();
                session.set_on_fence(Box::new(move || {
                    if let Some(v) = me.upgrade() {
                        v.fence_and_drain(&format!(
                            "local replica {replica} was claimed by a newer owner"
                        ));
                    }
                }));
                slot.generation
                    .store(session.generation(), Ordering::SeqCst);
                *slot.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(session);
            }
            ReplicaIo::Remote(rem) => {
                slot.generation.store(rem.generation(), Ordering::SeqCst);
            }
        }
        *slot.instance.lock().unwrap_or_else(|p| p.into_inner()) = io.instance();
        Ok(())
    }

    /// Persists `rev` on slot `idx`'s replica inside our owner session: a
    /// local replica's write is admitted by the session (a newer claim waits
    /// for it, and refuses it once fenced); a remote one's server does that.
    fn set_revision_on(
        &self,
        idx: usize,
        io: &ReplicaIo,
        rev: u64,
    ) -> Result<(), SetRevisionError> {
        if self.is_fenced() {
            return Err(SetRevisionError::Fenced("this engine was fenced".into()));
        }
        self.in_session(idx, io, || io.set_revision(rev))
            .unwrap_or_else(|e| Err(SetRevisionError::Fenced(e)))
    }

    /// Runs `f` on slot `idx`'s replica: for a local replica admitted by our
    /// owner session (a newer claim waits for it, and refuses it once
    /// fenced); a remote one's server admits it itself. `Err` when the
    /// local session is gone or fenced.
    fn in_session<T>(
        &self,
        idx: usize,
        io: &ReplicaIo,
        f: impl FnOnce() -> T,
    ) -> Result<T, String> {
        if let ReplicaIo::Local(_) = io {
            let session = self.slots[idx]
                .session
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let Some(session) = session else {
                return Err("no owner session on this replica".into());
            };
            let Some(_admitted) = session.enter() else {
                return Err(format!("owner session {} was fenced", session.generation()));
            };
            return Ok(f());
        }
        Ok(f())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub fn layout(&self) -> QueueLayout {
        self.layout
    }

    #[inline]
    pub(crate) fn pause_word(&self) -> u64 {
        self.pause.load(Ordering::Acquire)
    }

    /// Stops new requests on every queue and waits until none is in flight,
    /// so the replicas' layer chains can change under no I/O (a snapshot is
    /// taken at one point of the write stream on every replica). Each queue
    /// acknowledges on its own thread (`QueueEngine::poll_pause`), woken
    /// through its completion port; the hot path pays one load per request.
    /// Fails after `timeout` (and resumes) if a queue does not go quiet.
    pub fn quiesce(
        self: &Arc<Self>,
        timeout: std::time::Duration,
    ) -> Result<Quiesced, EngineError> {
        if self.pausing.swap(true, Ordering::AcqRel) {
            return Err(EngineError::Setup {
                volume: self.name.clone(),
                reason: "another snapshot operation is pausing I/O; try again".into(),
            });
        }
        let word = ((self.pause.load(Ordering::Relaxed) >> 1) + 1) << 1 | 1;
        self.pause.store(word, Ordering::SeqCst);
        let guard = Quiesced {
            volume: self.clone(),
        };
        let deadline = std::time::Instant::now() + timeout;
        loop {
            for p in self.ports.iter() {
                p.wake();
            }
            let quiet = {
                let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                queues
                    .iter()
                    .all(|q| q.quiet_at.load(Ordering::Acquire) == word)
            };
            if quiet {
                return Ok(guard);
            }
            if std::time::Instant::now() >= deadline {
                return Err(EngineError::Setup {
                    volume: self.name.clone(),
                    reason: format!(
                        "I/O did not drain within {timeout:?} for a snapshot; try again"
                    ),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Applies a layer-chain change (snapshot, removal, purge) to every
    /// healthy replica at one point of the write stream: I/O is quiesced
    /// around it. A replica the change fails on is failed (and rebuilt):
    /// every healthy replica keeps the same chain. Replicas out of the
    /// write set lose their dirty maps, since a map cannot describe a chain
    /// change: they come back through a full rebuild. Refused while a
    /// rebuild runs (its target would miss the change).
    pub fn change_chain(
        self: &Arc<Self>,
        change: &ChainChange,
        timeout: std::time::Duration,
    ) -> Result<ChainOutcome, EngineError> {
        fail::fail_point!("engine::change_chain::before_quiesce");
        // One creation time for every replica's copy of a new snapshot (each
        // stamping its own clock would make their chains differ).
        let stamped;
        let change = match change {
            ChainChange::Snapshot {
                name,
                created,
                user_created,
                labels,
            } if created.is_empty() => {
                stamped = ChainChange::Snapshot {
                    name: name.clone(),
                    created: crate::replica::meta::now_created(),
                    user_created: *user_created,
                    labels: labels.clone(),
                };
                &stamped
            }
            other => other,
        };
        let _quiet = self.quiesce(timeout)?;
        // The membership lock is held from the rebuild check to the end, so
        // no rebuild can start in between (its target would miss the change
        // and its dirty map would be dropped below).
        let mut messages = self.lock();
        self.change_chain_quiesced(change, &mut messages)
    }

    /// [`Self::change_chain`] once I/O is quiesced and the membership lock
    /// is held.
    fn change_chain_quiesced(
        &self,
        change: &ChainChange,
        messages: &mut [String],
    ) -> Result<ChainOutcome, EngineError> {
        if rebuilding_of(self.masks()) != 0 {
            return Err(EngineError::Rebuilding {
                volume: self.name.clone(),
            });
        }
        if self.is_fenced() {
            return Err(EngineError::Fenced {
                volume: self.name.clone(),
            });
        }
        let healthy = healthy_of(self.masks());
        let mut outcome: Option<ChainOutcome> = None;
        let mut failures = Vec::new();
        for i in 0..self.slots.len() {
            if healthy & (1 << i) == 0 {
                continue;
            }
            let Some(io) = self.slots[i].io.load_full() else {
                continue;
            };
            fail::fail_point!("engine::change_chain::replica");
            match self.change_chain_on(i, &io, change) {
                Ok(o) => {
                    outcome.get_or_insert(o);
                }
                Err(e) => failures.push((i, e)),
            }
        }
        let Some(outcome) = outcome else {
            let reason = failures
                .first()
                .map(|f| f.1.clone())
                .unwrap_or_else(|| "no healthy replica".into());
            return Err(EngineError::ChainChange {
                volume: self.name.clone(),
                what: describe_change(change),
                reason,
            });
        };
        for (i, e) in failures {
            self.fail_locked(
                messages,
                i,
                &format!("{} failed on this replica: {e}", describe_change(change)),
            );
        }
        let still = healthy_of(self.masks());
        for (i, slot) in self.slots.iter().enumerate() {
            if still & (1 << i) == 0 {
                slot.dirty.store(None);
            }
        }
        Ok(outcome)
    }

    /// Grows the volume to `size` bytes while it serves (online expansion).
    /// Under quiesce and the membership lock: the write-intent log is
    /// rewritten for the new size (its set bits kept), every healthy
    /// replica grows (`ChainChange::Grow`, in our owner session; one that
    /// fails is failed, to be replaced at the new size), then the write
    /// counters and the size follow. Replicas out of the write set lose
    /// their dirty maps (they come back through a full rebuild, as after
    /// any chain change). Refused while a rebuild runs. The current size is
    /// a no-op. The caller resizes the device afterwards: until then the
    /// kernel sends nothing past the old end.
    pub fn grow(
        self: &Arc<Self>,
        size: u64,
        timeout: std::time::Duration,
    ) -> Result<(), EngineError> {
        let current = self.size();
        let refuse = |reason: String| EngineError::Grow {
            volume: self.name.clone(),
            current,
            size,
            reason,
        };
        if size == current {
            return Ok(());
        }
        if size < current || size % BLOCK_SIZE != 0 {
            return Err(refuse(format!(
                "the new size must be larger and a multiple of {BLOCK_SIZE}"
            )));
        }
        let _quiet = self.quiesce(timeout)?;
        let mut messages = self.lock();
        if rebuilding_of(self.masks()) != 0 {
            return Err(EngineError::Rebuilding {
                volume: self.name.clone(),
            });
        }
        let old_log = self.intent.load_full();
        let new_log = match &old_log {
            Some(log) => Some(
                log.grown(size)
                    .map_err(|e| refuse(format!("nothing changed: {e}")))?,
            ),
            None => None,
        };
        fail::fail_point!("engine::grow::after_intent");
        if let Err(e) = self.change_chain_quiesced(&ChainChange::Grow { size }, &mut messages) {
            // No replica grew: put the log back at the old size (the old
            // log object's file is gone, so the rewritten one serves).
            if let Some(log) = new_log {
                match log.grown(current) {
                    Ok(back) => self.intent.store(Some(Arc::new(back))),
                    Err(le) => {
                        tracing::error!(volume = %self.name, error = %le, "cannot restore the write-intent log after a failed growth");
                        self.intent.store(Some(Arc::new(log)));
                    }
                }
            }
            return Err(e);
        }
        let old = self.regions.load_full();
        let regions: Box<[Region]> = (0..size.div_ceil(1 << REGION_SHIFT) as usize)
            .map(|i| {
                let r = Region::default();
                if let Some(o) = old.get(i) {
                    r.started
                        .store(o.started.load(Ordering::SeqCst), Ordering::SeqCst);
                    r.inflight
                        .store(o.inflight.load(Ordering::SeqCst), Ordering::SeqCst);
                }
                r
            })
            .collect();
        self.regions.store(Arc::new(regions));
        if let Some(log) = new_log {
            self.intent.store(Some(Arc::new(log)));
        }
        self.size.store(size, Ordering::Release);
        tracing::info!(volume = %self.name, from = current, to = size, "volume grown online");
        Ok(())
    }

    /// Applies a chain change to slot `idx`'s replica inside our owner
    /// session (see [`Self::set_revision_on`]).
    fn change_chain_on(
        &self,
        idx: usize,
        io: &ReplicaIo,
        change: &ChainChange,
    ) -> Result<ChainOutcome, String> {
        self.in_session(idx, io, || io.change_chain(change))?
    }

    /// The healthy replicas, local ones first.
    pub fn healthy_replicas(&self) -> Vec<Arc<ReplicaIo>> {
        let h = healthy_of(self.masks());
        let local = self.local_mask();
        let mut v: Vec<(bool, Arc<ReplicaIo>)> = (0..self.slots.len())
            .filter(|i| h & (1 << i) != 0)
            .filter_map(|i| {
                self.slots[i]
                    .io
                    .load_full()
                    .map(|io| (local & (1 << i) == 0, io))
            })
            .collect();
        v.sort_by_key(|(remote, _)| *remote);
        v.into_iter().map(|(_, io)| io).collect()
    }

    /// Stats slot for a new queue engine (queue start, not per I/O).
    pub(crate) fn register_queue(&self) -> Arc<QueueStats> {
        let stats = Arc::new(QueueStats::default());
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(stats.clone());
        stats
    }

    /// The completion port of queue `qid` (remote answers land there).
    pub fn port(&self, qid: usize) -> Option<&Arc<CompletionPort>> {
        self.ports.get(qid)
    }

    /// I/O totals over every queue.
    pub fn stats(&self) -> IoStats {
        use std::sync::atomic::Ordering::Relaxed;
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.iter().fold(IoStats::default(), |t, q| IoStats {
            reads: t.reads + q.reads.load(Relaxed),
            writes: t.writes + q.writes.load(Relaxed),
            read_bytes: t.read_bytes + q.read_bytes.load(Relaxed),
            write_bytes: t.write_bytes + q.write_bytes.load(Relaxed),
            flushes: t.flushes + q.flushes.load(Relaxed),
            discards: t.discards + q.discards.load(Relaxed),
            errors: t.errors + q.errors.load(Relaxed),
        })
    }

    pub fn replica_count(&self) -> usize {
        self.slots.len()
    }

    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    /// The packed replica-set word (see the module docs).
    #[inline]
    pub(crate) fn masks(&self) -> u32 {
        self.masks.load(Ordering::SeqCst)
    }

    /// Slots whose replica is on this node.
    #[inline]
    pub(crate) fn local_mask(&self) -> u32 {
        self.local.load(Ordering::Relaxed)
    }

    /// Records whether slot `idx` now holds a local replica.
    fn set_local(&self, idx: usize, io: &ReplicaIo) {
        let bit = 1u32 << idx;
        if matches!(io, ReplicaIo::Local(_)) {
            self.local.fetch_or(bit, Ordering::Relaxed);
        } else {
            self.local.fetch_and(!bit, Ordering::Relaxed);
        }
    }

    #[inline]
    pub(crate) fn healthy_mask(&self) -> u32 {
        healthy_of(self.masks())
    }

    #[inline]
    pub(crate) fn replica_io(&self, idx: usize) -> Guard<Option<Arc<ReplicaIo>>> {
        self.slots[idx].io.load()
    }

    /// The I/O handle of slot `idx` (rebuild sources and targets).
    pub fn replica(&self, idx: usize) -> Option<Arc<ReplicaIo>> {
        self.slots.get(idx).and_then(|s| s.io.load_full())
    }

    /// The write counters, one per MiB (a rebuild holds them for its run;
    /// no growth happens during one).
    pub(crate) fn regions(&self) -> Arc<Box<[Region]>> {
        self.regions.load_full()
    }

    /// A write-class request on `[offset, offset+len)` starts: counted before
    /// its legs are issued (and before it marks dirty maps).
    #[inline]
    pub(crate) fn write_started(&self, offset: u64, len: u32) {
        let regions = self.regions.load();
        for r in self.region_range(offset, len) {
            if let Some(reg) = regions.get(r) {
                reg.inflight.fetch_add(1, Ordering::SeqCst);
                reg.started.fetch_add(1, Ordering::SeqCst);
            }
        }
        if let Some(log) = self.intent.load().as_ref() {
            log.mark(offset, len);
        }
    }

    /// The request counted by `write_started` finished (every leg done).
    #[inline]
    pub(crate) fn write_finished(&self, offset: u64, len: u32) {
        let regions = self.regions.load();
        for r in self.region_range(offset, len) {
            if let Some(reg) = regions.get(r) {
                reg.inflight.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    #[inline]
    fn region_range(&self, offset: u64, len: u32) -> std::ops::Range<usize> {
        let first = (offset >> REGION_SHIFT) as usize;
        let last = ((offset + (len.max(1) as u64) - 1) >> REGION_SHIFT) as usize;
        first..last + 1
    }

    /// Records that `[offset, offset+len)` changed while slot `idx` did not
    /// get the write.
    #[inline]
    pub(crate) fn mark_dirty(&self, idx: usize, offset: u64, len: u32) {
        if let Some(map) = self.slots[idx].dirty.load().as_ref() {
            let end = offset + len as u64;
            map.set_range(
                offset / BLOCK_SIZE,
                end.div_ceil(BLOCK_SIZE).min(map.blocks()),
            );
        }
    }

    /// The dirty map of slot `idx`, if it is tracking one.
    pub(crate) fn dirty_map(&self, idx: usize) -> Option<Arc<HeadBitmap>> {
        self.slots[idx].dirty.load_full()
    }

    pub fn health(&self) -> VolumeHealth {
        let healthy = self.healthy_mask().count_ones() as usize;
        if healthy == 0 {
            VolumeHealth::Faulted
        } else if healthy < self.slots.len() {
            VolumeHealth::Degraded
        } else {
            VolumeHealth::Healthy
        }
    }

    pub fn slot_name(&self, idx: usize) -> String {
        self.slots[idx]
            .name
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The slot holding replica `name`.
    pub fn slot_of(&self, name: &str) -> Option<usize> {
        (0..self.slots.len()).find(|&i| self.slot_name(i) == name)
    }

    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        let messages = self.lock();
        let m = self.masks();
        (0..self.slots.len())
            .map(|i| ReplicaStatus {
                name: self.slot_name(i),
                state: if healthy_of(m) & (1 << i) != 0 {
                    ReplicaState::Healthy
                } else if rebuilding_of(m) & (1 << i) != 0 {
                    ReplicaState::Rebuilding
                } else {
                    ReplicaState::Failed
                },
                message: messages[i].clone(),
            })
            .collect()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Vec<String>> {
        // A panic while holding it cannot leave the Vec<String> inconsistent.
        self.membership.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a new epoch (attach): replicas whose revision is behind the
    /// newest are stale and leave the set; the survivors get revision
    /// newest+1, persisted before any I/O is served. Returns the new revision.
    pub fn begin_epoch(&self) -> Result<u64, EngineError> {
        let mut messages = self.lock();
        let m = self.masks();
        let mut healthy = healthy_of(m);
        // A new owner session on every local replica (remote ones were
        // claimed when connected): whatever held them before is fenced.
        let mut unclaimed = Vec::new();
        for i in 0..self.slots.len() {
            if healthy & (1 << i) == 0 {
                continue;
            }
            if let Some(io) = self.slots[i].io.load_full() {
                if let Err(e) = self.claim_slot(i, &io, self.takeover()) {
                    healthy &= !(1 << i);
                    unclaimed.push((i, format!("cannot claim an owner session: {e}")));
                }
            }
        }
        let revs: Vec<Option<u64>> = self
            .slots
            .iter()
            .map(|s| s.io.load().as_ref().map(|io| io.revision()))
            .collect();
        let newest = revs
            .iter()
            .enumerate()
            .filter(|(i, _)| healthy & (1 << i) != 0)
            .filter_map(|(_, r)| *r)
            .max()
            .unwrap_or(0);
        let mut failed = Vec::new();
        for (i, rev) in revs.iter().enumerate() {
            if let Some(rev) = rev {
                if healthy & (1 << i) != 0 && *rev < newest {
                    failed.push((
                        i,
                        format!("stale: revision {rev} is behind the newest replica's {newest}"),
                    ));
                }
            }
        }
        let stale: u32 = failed.iter().fold(0, |m, (i, _)| m | 1 << i);
        failed.extend(unclaimed);
        // Stale replicas missed writes nobody recorded: no dirty tracking,
        // they need a full rebuild.
        self.commit(&mut messages, healthy & !stale, newest + 1, failed, false)
    }

    /// Takes replica `idx` out of the I/O set (an I/O on it failed, or its
    /// files changed under it, or its node stopped answering). Idempotent.
    pub(crate) fn fail_index(&self, idx: usize, reason: &str) {
        let mut messages = self.lock();
        self.fail_locked(&mut messages, idx, reason);
    }

    /// [`Self::fail_index`] with the membership lock held.
    fn fail_locked(&self, messages: &mut [String], idx: usize, reason: &str) {
        if self.is_fenced() {
            // Not a replica failure: the volume is someone else's now.
            return;
        }
        let m = self.masks();
        let bit = 1u32 << idx;
        if healthy_of(m) & bit != 0 {
            let next = self.revision() + 1;
            // Errors were already turned into a failed replica inside commit.
            let _ = self.commit(
                messages,
                healthy_of(m) & !bit,
                next,
                vec![(idx, reason.to_string())],
                true,
            );
        } else if rebuilding_of(m) & bit != 0 {
            // Not readable, so the revision need not move: the rebuild stops.
            self.start_tracking(idx);
            self.masks.store(
                pack(healthy_of(m), rebuilding_of(m) & !bit, tracking_of(m) | bit),
                Ordering::SeqCst,
            );
            self.report_failure(messages, idx, format!("rebuild stopped: {reason}"));
        }
    }

    /// Gives slot `idx` a dirty map (if it has none) before it stops
    /// getting writes. Called with the membership lock held.
    fn start_tracking(&self, idx: usize) {
        let slot = &self.slots[idx];
        if slot.dirty.load().is_none() {
            slot.dirty.store(Some(Arc::new(HeadBitmap::new(
                self.size().div_ceil(BLOCK_SIZE),
            ))));
            slot.left_at.store(self.revision(), Ordering::SeqCst);
        }
    }

    fn report_failure(&self, messages: &mut [String], idx: usize, reason: String) {
        let replica = self.slot_name(idx);
        tracing::warn!(volume = %self.name, %replica, %reason, "replica failed, removed from the I/O set");
        messages[idx] = reason.clone();
        (self.events)(EngineEvent::ReplicaFailed { replica, reason });
    }

    /// Persists `revision` on every replica in `keep`, then publishes the new
    /// set. A replica that cannot take the revision fails too. With `track`,
    /// replicas leaving the set keep a dirty map.
    fn commit(
        &self,
        messages: &mut [String],
        mut keep: u32,
        mut revision: u64,
        mut failed: Vec<(usize, String)>,
        track: bool,
    ) -> Result<u64, EngineError> {
        loop {
            let mut dropped = false;
            for i in 0..self.slots.len() {
                if keep & (1 << i) == 0 {
                    continue;
                }
                let Some(io) = self.slots[i].io.load_full() else {
                    continue;
                };
                match self.set_revision_on(i, &io, revision) {
                    Ok(()) => {}
                    Err(SetRevisionError::Fenced(reason)) => {
                        self.mark_fenced(&reason);
                        return Err(EngineError::Fenced {
                            volume: self.name.clone(),
                        });
                    }
                    Err(SetRevisionError::Failed(e)) => {
                        keep &= !(1 << i);
                        dropped = true;
                        failed.push((i, format!("cannot persist revision {revision}: {e}")));
                    }
                }
            }
            // A replica dropped here may hold `revision` all the same (the
            // answer was lost, or the directory sync after the rename
            // failed). The survivors move one higher, so no dropped replica
            // can ever look as new as they are.
            if !dropped || keep == 0 {
                break;
            }
            revision += 1;
        }
        if keep != 0 {
            self.log_epoch(revision, keep);
        }
        let m = self.masks();
        let mut tracking = tracking_of(m);
        if track {
            for (i, _) in &failed {
                self.start_tracking(*i);
                tracking |= 1 << i;
            }
        }
        self.revision.store(revision, Ordering::Release);
        self.masks
            .store(pack(keep, rebuilding_of(m), tracking), Ordering::SeqCst);
        for (i, reason) in failed {
            self.report_failure(messages, i, reason);
        }
        if keep == 0 {
            tracing::error!(volume = %self.name, "volume faulted: no healthy replica left");
            return Err(EngineError::Faulted {
                volume: self.name.clone(),
            });
        }
        Ok(revision)
    }

    /// Operator request to take a replica out of service. Refuses the last
    /// healthy replica; failing an already failed replica is a no-op.
    pub fn fail_replica(&self, name: &str, reason: &str) -> Result<(), EngineError> {
        let idx = self
            .slot_of(name)
            .ok_or_else(|| EngineError::UnknownReplica {
                volume: self.name.clone(),
                replica: name.to_string(),
            })?;
        let mask = self.healthy_mask();
        if mask == 1 << idx {
            return Err(EngineError::LastHealthyReplica {
                volume: self.name.clone(),
                replica: name.to_string(),
            });
        }
        self.fail_index(idx, reason);
        Ok(())
    }

    /// Health-checks every healthy or rebuilding replica; fails the broken
    /// ones.
    pub fn check_replicas(&self) {
        let m = self.masks();
        for i in 0..self.slots.len() {
            if (healthy_of(m) | rebuilding_of(m)) & (1 << i) == 0 {
                continue;
            }
            if let Some(io) = self.slots[i].io.load_full() {
                if let Err(reason) = io.check() {
                    self.fail_index(i, &reason);
                }
            }
        }
    }

    /// Makes everything written so far durable on every healthy replica
    /// (blocking; detach and shutdown). A replica that cannot sync fails.
    pub fn flush(&self) -> Result<(), EngineError> {
        let mask = self.healthy_mask();
        for i in 0..self.slots.len() {
            if mask & (1 << i) == 0 {
                continue;
            }
            if let Some(io) = self.slots[i].io.load_full() {
                if let Err(e) = io.sync() {
                    self.fail_index(i, &format!("sync failed: {e}"));
                }
            }
        }
        if self.healthy_mask() == 0 {
            return Err(EngineError::Faulted {
                volume: self.name.clone(),
            });
        }
        Ok(())
    }

    /// Whether `VolumeIo::start_rebuild` would resume (incremental) for
    /// this replica, as things stand.
    pub fn would_resume(&self, idx: usize, name: &str, io: &ReplicaIo) -> bool {
        self.may_resume(idx, name) && {
            let slot = &self.slots[idx];
            io.revision() == slot.left_at.load(Ordering::SeqCst)
                && *slot.instance.lock().unwrap_or_else(|p| p.into_inner()) == io.instance()
        }
    }

    /// Whether slot `idx` still tracks what replica `name` missed (a dirty
    /// map), so that replica could come back incrementally. When not, the
    /// replica is replaced whatever it holds: no need to reconnect to it
    /// (and renew its owner session) to find that out.
    pub fn may_resume(&self, idx: usize, name: &str) -> bool {
        let Some(slot) = self.slots.get(idx) else {
            return false;
        };
        *slot.name.lock().unwrap_or_else(|p| p.into_inner()) == name
            && tracking_of(self.masks()) & (1 << idx) != 0
            && slot.dirty.load().is_some()
    }

    /// Puts `io` (replica `name`) into failed slot `idx` and makes it a
    /// write target. Returns whether its dirty map describes it exactly (the
    /// same replica back at the revision it left at), so only the marked
    /// blocks need copying. Otherwise the slot tracks from an empty map and
    /// the caller copies everything the source holds.
    pub(crate) fn start_rebuild(
        &self,
        idx: usize,
        name: &str,
        io: ReplicaIo,
    ) -> Result<bool, EngineError> {
        let _messages = self.lock();
        let m = self.masks();
        let bit = 1u32 << idx;
        if idx >= self.slots.len() {
            return Err(EngineError::UnknownReplica {
                volume: self.name.clone(),
                replica: name.to_string(),
            });
        }
        if (healthy_of(m) | rebuilding_of(m)) & bit != 0 {
            return Err(EngineError::InService {
                volume: self.name.clone(),
                replica: self.slot_name(idx),
            });
        }
        if healthy_of(m) == 0 {
            return Err(EngineError::Faulted {
                volume: self.name.clone(),
            });
        }
        if io.size() != self.size() {
            return Err(EngineError::SizeMismatch {
                volume: self.name.clone(),
                replica: name.to_string(),
                size: io.size(),
                expected: self.size(),
            });
        }
        if let ReplicaIo::Remote(r) = &io {
            r.start_queues(&self.ports, self.layout.depth, idx as u8)
                .map_err(|e| EngineError::Setup {
                    volume: self.name.clone(),
                    reason: e.to_string(),
                })?;
        }
        let slot = &self.slots[idx];
        let same = *slot.name.lock().unwrap_or_else(|p| p.into_inner()) == name;
        // The same replica, back at the revision it left at, served by the
        // same boot of its node (a reboot or power loss may have dropped
        // writes it acknowledged before it left but never flushed).
        let incremental = same
            && tracking_of(m) & bit != 0
            && slot.dirty.load().is_some()
            && io.revision() == slot.left_at.load(Ordering::SeqCst)
            && *slot.instance.lock().unwrap_or_else(|p| p.into_inner()) == io.instance();
        // A new owner session on it; the old one (ours, or a stalled
        // connection's) is fenced and drained before this returns.
        let claim = self.claim_for(idx, name);
        if let ReplicaIo::Local(_) = &io {
            self.claim_slot(idx, &io, claim)
                .map_err(|reason| EngineError::Setup {
                    volume: self.name.clone(),
                    reason,
                })?;
        } else {
            let _ = self.claim_slot(idx, &io, claim);
        }
        if !incremental {
            slot.dirty.store(Some(Arc::new(HeadBitmap::new(
                self.size().div_ceil(BLOCK_SIZE),
            ))));
        }
        *slot.name.lock().unwrap_or_else(|p| p.into_inner()) = name.to_string();
        self.set_local(idx, &io);
        slot.io.store(Some(Arc::new(io)));
        self.masks.store(
            pack(healthy_of(m), rebuilding_of(m) | bit, tracking_of(m) | bit),
            Ordering::SeqCst,
        );
        tracing::info!(volume = %self.name, replica = name, incremental, "rebuild started");
        Ok(incremental)
    }

    /// The copy is complete: the replica takes the current revision and
    /// becomes readable. Fails if it left the write set meanwhile.
    pub(crate) fn finish_rebuild(&self, idx: usize) -> Result<u64, EngineError> {
        let mut messages = self.lock();
        let m = self.masks();
        let bit = 1u32 << idx;
        if rebuilding_of(m) & bit == 0 {
            return Err(EngineError::RebuildAborted {
                volume: self.name.clone(),
                replica: self.slot_name(idx),
            });
        }
        let revision = self.revision();
        let io = self.slots[idx].io.load_full();
        fail::fail_point!("engine::finish_rebuild::before_revision");
        if let Some(Err(e)) = io.map(|io| self.set_revision_on(idx, &io, revision)) {
            self.masks.store(
                pack(healthy_of(m), rebuilding_of(m) & !bit, tracking_of(m)),
                Ordering::SeqCst,
            );
            if let SetRevisionError::Fenced(reason) = &e {
                self.mark_fenced(reason);
                return Err(EngineError::Fenced {
                    volume: self.name.clone(),
                });
            }
            self.report_failure(
                &mut messages,
                idx,
                format!("cannot persist revision {revision}: {e}"),
            );
            // The target may hold `revision` all the same while it misses
            // every write from now on: the healthy set moves past it.
            let _ = self.commit(
                &mut messages,
                healthy_of(m),
                revision + 1,
                Vec::new(),
                false,
            );
            return Err(EngineError::RebuildAborted {
                volume: self.name.clone(),
                replica: self.slot_name(idx),
            });
        }
        self.log_epoch(revision, healthy_of(m) | bit);
        self.slots[idx].dirty.store(None);
        self.masks.store(
            pack(
                healthy_of(m) | bit,
                rebuilding_of(m) & !bit,
                tracking_of(m) & !bit,
            ),
            Ordering::SeqCst,
        );
        messages[idx].clear();
        Ok(revision)
    }

    /// Whether replica `revision` could come back into slot `idx` with only
    /// its dirty map copied (the same replica, back at the revision it left
    /// at, and this engine tracked it since).
    pub fn can_resume(&self, idx: usize, name: &str, revision: u64) -> bool {
        let Some(slot) = self.slots.get(idx) else {
            return false;
        };
        let m = self.masks();
        tracking_of(m) & (1 << idx) != 0
            && slot.dirty.load().is_some()
            && slot.left_at.load(Ordering::SeqCst) == revision
            && *slot.name.lock().unwrap_or_else(|p| p.into_inner()) == name
    }

    /// Auto-salvage of a faulted volume: of the replicas found, those with
    /// the highest revision become the healthy set (a new epoch starts on
    /// them); the rest stay failed and are rebuilt later. Returns the names
    /// of the replicas kept; does nothing unless the volume is faulted.
    pub fn salvage(
        &self,
        found: Vec<(usize, String, ReplicaIo)>,
    ) -> Result<Vec<String>, EngineError> {
        let mut messages = self.lock();
        let m = self.masks();
        if healthy_of(m) != 0 {
            return Ok(Vec::new());
        }
        let Some(newest) = found.iter().map(|(_, _, io)| io.revision()).max() else {
            return Err(EngineError::Faulted {
                volume: self.name.clone(),
            });
        };
        for (idx, name, io) in &found {
            self.note_claimed(*idx, name, io);
        }
        // Replicas at the top revision may still differ in writes never
        // acknowledged (in flight when the last ones failed): reads would
        // flip between them. One becomes the source, a local one if any; the
        // others track what may differ (the write-intent chunks, and what
        // either side missed since it left) and resync from it.
        let mut found: Vec<_> = found
            .into_iter()
            .filter(|(idx, _, io)| {
                *idx < self.slots.len() && io.revision() == newest && io.size() == self.size()
            })
            .collect();
        found.sort_by_key(|(_, _, io)| !matches!(io, ReplicaIo::Local(_)));
        let mut keep = 0u32;
        let mut kept = Vec::new();
        let mut resync = Vec::new();
        for (idx, name, io) in found {
            if keep != 0 {
                resync.push((idx, name));
                continue;
            }
            if let ReplicaIo::Remote(r) = &io {
                if let Err(e) = r.start_queues(&self.ports, self.layout.depth, idx as u8) {
                    tracing::warn!(volume = %self.name, replica = %name, error = %e, "salvage: cannot connect");
                    continue;
                }
            }
            if let Err(e) = self.claim_slot(idx, &io, self.claim_for(idx, &name)) {
                tracing::warn!(volume = %self.name, replica = %name, error = %e, "salvage: cannot claim");
                continue;
            }
            let slot = &self.slots[idx];
            *slot.name.lock().unwrap_or_else(|p| p.into_inner()) = name.clone();
            self.set_local(idx, &io);
            slot.io.store(Some(Arc::new(io)));
            messages[idx].clear();
            keep |= 1 << idx;
            kept.push(name);
        }
        if keep == 0 {
            return Err(EngineError::Faulted {
                volume: self.name.clone(),
            });
        }
        let source = keep.trailing_zeros() as usize;
        let mut differ = self.intent_ranges();
        if let Some(map) = self.slots[source].dirty.load_full() {
            if self.slots[source].left_at.load(Ordering::SeqCst) == newest {
                differ.extend(
                    map.ranges()
                        .into_iter()
                        .map(|(s, e)| (s * BLOCK_SIZE, (e * BLOCK_SIZE).min(self.size()))),
                );
            }
        }
        let mut tracking = tracking_of(m) & !keep;
        for (idx, name) in resync {
            *self.slots[idx]
                .name
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = name;
            self.seed_dirty(idx, &differ, newest);
            tracking |= 1 << idx;
            messages[idx] =
                "salvage: may differ from the source in writes never acknowledged; resyncs from it"
                    .into();
        }
        self.slots[source].dirty.store(None);
        self.masks.store(
            pack(0, rebuilding_of(m) & !keep, tracking),
            Ordering::SeqCst,
        );
        tracing::warn!(volume = %self.name, revision = newest, resync = ?differ, replicas = ?kept, "auto-salvage: recovering from the newest replica; the others at its revision resync from it");
        self.commit(&mut messages, keep, newest + 1, Vec::new(), false)?;
        Ok(kept)
    }

    /// Drops a failed slot's replica handle (after a failed rebuild).
    pub(crate) fn clear_slot(&self, idx: usize) {
        let _guard = self.lock();
        let m = self.masks();
        if let Some(slot) = self.slots.get(idx) {
            if (healthy_of(m) | rebuilding_of(m)) & (1 << idx) == 0 {
                slot.io.store(None);
            }
        }
    }

    /// Whether slot `idx` is being rebuilt.
    pub(crate) fn is_rebuilding(&self, idx: usize) -> bool {
        rebuilding_of(self.masks()) & (1 << idx) != 0
    }
}
