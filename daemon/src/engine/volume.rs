//! `VolumeIo`: one volume's replica set as every queue thread sees it, and
//! the rare-path operations that change it (replica failure, epochs).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::queue::QueueStats;
use super::{EngineError, ReplicaIo, MAX_REPLICAS};

/// A replica handed to the engine at attach.
pub struct ReplicaHandle {
    pub name: String,
    pub io: ReplicaIo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    Healthy,
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
    ReplicaFailed { replica: String, reason: String },
}

/// Receives engine events. Called from I/O threads: it must not block.
pub type EventSink = Box<dyn Fn(EngineEvent) + Send + Sync>;

struct Slot {
    name: String,
    io: ReplicaIo,
}

/// The replica set of one attached volume.
pub struct VolumeIo {
    name: String,
    size: u64,
    slots: Vec<Slot>,
    /// Bit i set: slot i is in the I/O set. Read on every I/O.
    healthy: AtomicU32,
    revision: AtomicU64,
    /// Serializes membership changes; holds each slot's last failure reason.
    membership: Mutex<Vec<String>>,
    events: EventSink,
    /// One entry per queue engine, summed by [`VolumeIo::stats`].
    queues: Mutex<Vec<Arc<QueueStats>>>,
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
    /// A replica set with every replica healthy. Call [`VolumeIo::begin_epoch`]
    /// before serving I/O.
    pub fn new(
        name: &str,
        size: u64,
        replicas: Vec<ReplicaHandle>,
        events: EventSink,
    ) -> Result<Arc<VolumeIo>, EngineError> {
        if replicas.is_empty() {
            return Err(EngineError::NoReplicas { volume: name.to_string() });
        }
        if replicas.len() > MAX_REPLICAS {
            return Err(EngineError::TooManyReplicas { volume: name.to_string(), count: replicas.len() });
        }
        for r in &replicas {
            if r.io.size() != size {
                return Err(EngineError::SizeMismatch {
                    volume: name.to_string(),
                    replica: r.name.clone(),
                    size: r.io.size(),
                    expected: size,
                });
            }
        }
        let n = replicas.len();
        let revision = replicas.iter().map(|r| r.io.revision()).max().unwrap_or(0);
        Ok(Arc::new(VolumeIo {
            name: name.to_string(),
            size,
            slots: replicas.into_iter().map(|r| Slot { name: r.name, io: r.io }).collect(),
            healthy: AtomicU32::new((1u32 << n) - 1),
            revision: AtomicU64::new(revision),
            membership: Mutex::new(vec![String::new(); n]),
            events,
            queues: Mutex::new(Vec::new()),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Stats slot for a new queue engine (queue start, not per I/O).
    pub(crate) fn register_queue(&self) -> Arc<QueueStats> {
        let stats = Arc::new(QueueStats::default());
        self.queues.lock().unwrap_or_else(|p| p.into_inner()).push(stats.clone());
        stats
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

    #[inline]
    pub(crate) fn healthy_mask(&self) -> u32 {
        self.healthy.load(Ordering::Acquire)
    }

    #[inline]
    pub(crate) fn replica_io(&self, idx: usize) -> &ReplicaIo {
        &self.slots[idx].io
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

    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        let messages = self.lock();
        let mask = self.healthy_mask();
        self.slots
            .iter()
            .enumerate()
            .map(|(i, s)| ReplicaStatus {
                name: s.name.clone(),
                state: if mask & (1 << i) != 0 { ReplicaState::Healthy } else { ReplicaState::Failed },
                message: messages[i].clone(),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<String>> {
        // A panic while holding it cannot leave the Vec<String> inconsistent.
        self.membership.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a new epoch (attach): replicas whose revision is behind the
    /// newest are stale and leave the set; the survivors get revision
    /// newest+1, persisted before any I/O is served. Returns the new revision.
    pub fn begin_epoch(&self) -> Result<u64, EngineError> {
        let mut messages = self.lock();
        let mask = self.healthy_mask();
        let newest = self
            .slots
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, s)| s.io.revision())
            .max()
            .unwrap_or(0);
        let mut failed = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            let rev = s.io.revision();
            if mask & (1 << i) != 0 && rev < newest {
                failed.push((i, format!("stale: revision {rev} is behind the newest replica's {newest}")));
            }
        }
        let stale: u32 = failed.iter().fold(0, |m, (i, _)| m | 1 << i);
        self.commit(&mut messages, mask & !stale, newest + 1, failed)
    }

    /// Takes replica `idx` out of the I/O set (an I/O on it failed, or its
    /// files changed under it). Idempotent.
    pub(crate) fn fail_index(&self, idx: usize, reason: &str) {
        let mut messages = self.lock();
        let mask = self.healthy_mask();
        if mask & (1 << idx) == 0 {
            return;
        }
        let next = self.revision() + 1;
        // Errors were already turned into a failed replica inside commit.
        let _ = self.commit(&mut messages, mask & !(1 << idx), next, vec![(idx, reason.to_string())]);
    }

    /// Persists `revision` on every replica in `keep`, then publishes the new
    /// set. A replica that cannot take the revision fails too.
    fn commit(
        &self,
        messages: &mut [String],
        mut keep: u32,
        revision: u64,
        mut failed: Vec<(usize, String)>,
    ) -> Result<u64, EngineError> {
        for (i, s) in self.slots.iter().enumerate() {
            if keep & (1 << i) == 0 {
                continue;
            }
            if let Err(e) = s.io.set_revision(revision) {
                keep &= !(1 << i);
                failed.push((i, format!("cannot persist revision {revision}: {e}")));
            }
        }
        self.revision.store(revision, Ordering::Release);
        self.healthy.store(keep, Ordering::Release);
        for (i, reason) in failed {
            let replica = &self.slots[i].name;
            tracing::warn!(volume = %self.name, %replica, %reason, "replica failed, removed from the I/O set");
            messages[i] = reason.clone();
            (self.events)(EngineEvent::ReplicaFailed { replica: replica.clone(), reason });
        }
        if keep == 0 {
            tracing::error!(volume = %self.name, "volume faulted: no healthy replica left");
            return Err(EngineError::Faulted { volume: self.name.clone() });
        }
        Ok(revision)
    }

    /// Operator request to take a replica out of service. Refuses the last
    /// healthy replica; failing an already failed replica is a no-op.
    pub fn fail_replica(&self, name: &str, reason: &str) -> Result<(), EngineError> {
        let idx = self
            .slots
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| EngineError::UnknownReplica { volume: self.name.clone(), replica: name.to_string() })?;
        let mask = self.healthy_mask();
        if mask == 1 << idx {
            return Err(EngineError::LastHealthyReplica { volume: self.name.clone(), replica: name.to_string() });
        }
        self.fail_index(idx, reason);
        Ok(())
    }

    /// Health-checks every healthy replica's files; fails the broken ones.
    pub fn check_replicas(&self) {
        let mask = self.healthy_mask();
        for (i, s) in self.slots.iter().enumerate() {
            if mask & (1 << i) != 0 {
                if let Err(reason) = s.io.check() {
                    self.fail_index(i, &reason);
                }
            }
        }
    }

    /// Makes everything written so far durable on every healthy replica
    /// (blocking; detach and shutdown). A replica that cannot sync fails.
    pub fn flush(&self) -> Result<(), EngineError> {
        let mask = self.healthy_mask();
        for (i, s) in self.slots.iter().enumerate() {
            if mask & (1 << i) != 0 {
                if let Err(e) = s.io.sync() {
                    self.fail_index(i, &format!("sync failed: {e}"));
                }
            }
        }
        if self.healthy_mask() == 0 {
            return Err(EngineError::Faulted { volume: self.name.clone() });
        }
        Ok(())
    }
}
