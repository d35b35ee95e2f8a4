//! Self-healing of attached volumes: every [`REPAIR_INTERVAL`], for each
//! attached volume,
//!
//! * faulted (every replica failed) and `auto-salvage` on: reconnect to the
//!   replicas and recover from those with the highest revision;
//! * each failed replica, if no rebuild of it runs and the node's rebuild
//!   limit allows:
//!   - its node answers and the replica opens at the revision it left at,
//!     with this engine's dirty map: rebuild it in place, copying only the
//!     blocks written while it was away;
//!   - its node answers but the replica is gone, broken or stale without a
//!     dirty map: replace it with a fresh replica (same placement rules)
//!     and copy everything;
//!   - its node is down: wait; after `stale-replica-timeout` minutes,
//!     replace it elsewhere (the old one is deleted if its node returns).
//!
//! Rebuilds run on their own threads ([`crate::engine::rebuild`]); their
//! outcome comes back on a channel and is written to the record.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::mpsc;

use super::cluster::{Cluster, POLL_INTERVAL};
use super::manager::{unix_now, Inner, OpenError, RunningRebuild, OPERATOR_FAILED};
use super::settings;
use super::store::{LastRebuild, RecordState, ReplicaRecord};
use crate::engine::{
    rebuild, RebuildProgress, RebuildReport, ReplicaIo, ReplicaState, VolumeHealth, VolumeIo,
};

pub const REPAIR_INTERVAL: Duration = Duration::from_secs(2);

/// A finished rebuild, for the record.
pub struct RepairDone {
    pub volume: String,
    pub slot: usize,
    pub io: Arc<VolumeIo>,
    /// The replica rebuilt (a replacement has a new name).
    pub replica: ReplicaRecord,
    /// The record entry it replaced, to delete (replacements only).
    pub replaced: Option<ReplicaRecord>,
    pub result: Result<RebuildReport, String>,
}

pub async fn poll_loop(cluster: Arc<Cluster>) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let c = cluster.clone();
        let _ = tokio::task::spawn_blocking(move || c.poll()).await;
    }
}

/// What the repair pass decided for one failed slot.
enum Plan {
    /// Reconnect the same replica and copy what it missed.
    Resume { io: ReplicaIo },
    /// A fresh replica (already created) replaces the slot's.
    Replace {
        io: ReplicaIo,
        record: ReplicaRecord,
    },
}

pub async fn repair_loop(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(REPAIR_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        // Snapshot the attached volumes; the blocking work runs unlocked.
        let live: Vec<(String, Arc<VolumeIo>, Vec<ReplicaRecord>)> = {
            let st = inner.state.lock().await;
            st.volumes
                .values()
                .filter_map(|v| {
                    v.live.as_ref().map(|l| {
                        (
                            v.record.name.clone(),
                            l.io.clone(),
                            v.record.replicas.clone(),
                        )
                    })
                })
                .collect()
        };
        for (name, io, records) in live {
            let i = inner.clone();
            // The engine's size, not the record's: an online growth updates
            // the record last, and a replacement must match the engine.
            let size = io.size();
            let _ =
                tokio::task::spawn_blocking(move || repair_volume(&i, &name, &io, &records, size))
                    .await;
        }
    }
}

fn repair_volume(
    inner: &Arc<Inner>,
    volume: &str,
    io: &Arc<VolumeIo>,
    records: &[ReplicaRecord],
    size: u64,
) {
    if io.is_fenced() {
        // Another engine owns the volume now: nothing here is ours to repair.
        return;
    }
    if let Some(node) = inner.newer_owner(volume, io.owner_term()) {
        // A peer reports owning the volume at a later term: proof it moved.
        // Stop serving it here rather than rebuild or replace anything.
        io.mark_fenced(&format!(
            "{node} took the volume over at a later owner term"
        ));
        return;
    }
    if io.health() == VolumeHealth::Faulted {
        if inner.settings.bool(settings::AUTO_SALVAGE) {
            salvage(inner, volume, io, records);
        }
        return;
    }
    let limit = inner.settings.u64(settings::REBUILD_LIMIT) as usize;
    let stale_after =
        Duration::from_secs_f64(inner.settings.f64(settings::STALE_REPLICA_TIMEOUT) * 60.0);
    if limit == 0 {
        // Rebuilds paused: failed replicas wait (and nothing is created).
        return;
    }
    let states = io.replicas();
    for (slot, rec) in records.iter().enumerate() {
        // The engine's slot may carry another name: a replacement whose
        // rebuild failed. The record's replica is still the one to repair.
        let Some(state) = states.get(slot) else {
            continue;
        };
        if state.state != ReplicaState::Failed {
            continue;
        }
        if inner.rebuild_running(volume, slot) {
            continue;
        }
        if !rec.addr.is_empty()
            && inner.rebuilds_on(&rec.node) >= limit
            && inner.cluster.is_up(&rec.node)
        {
            continue;
        }
        let failed_for =
            Duration::from_secs(unix_now().saturating_sub(rec.failed_at.unwrap_or_else(unix_now)));
        let stale = || {
            if failed_for >= stale_after {
                tracing::warn!(volume, replica = %rec.name, node = %rec.node, "stale replica: away past stale-replica-timeout; replacing it");
                replace(inner, volume, io, records, slot, size)
            } else {
                None
            }
        };
        let reachable = rec.addr.is_empty() || inner.cluster.is_up(&rec.node);
        let plan = if rec.message == OPERATOR_FAILED || state.message == OPERATOR_FAILED {
            // The operator took it out: never trust it again.
            replace(inner, volume, io, records, slot, size)
        } else if reachable && !io.may_resume(slot, &rec.name) {
            // Nothing tracks what it missed: it is replaced whatever it
            // holds. (Opening it first would renew its owner session at
            // every tick while no node has room for the replacement.)
            replace(inner, volume, io, records, slot, size)
        } else {
            if rec.addr.is_empty() {
                // Read the files again: the open object may be the one whose
                // files were deleted or truncated under it.
                inner.disks.forget(&rec.name);
            }
            let opened =
                inner.open_replica(volume, &rec.name, &rec.addr, io.claim_for(slot, &rec.name));
            if let Ok(r) = &opened {
                io.note_claimed(slot, &rec.name, r);
            }
            match opened {
                Ok(r) if io.would_resume(slot, &rec.name, &r) => Some(Plan::Resume { io: r }),
                // Refused our renewal: another owner took it, or our own
                // earlier claim's answer was lost. Not proof either way (a
                // peer reporting a later term is, checked above each tick;
                // a takeover also shows on the data path as ESTALE). Treat
                // it as away: replaced after stale-replica-timeout.
                Err(OpenError::Fenced(reason)) => {
                    tracing::warn!(volume, replica = %rec.name, %reason, "replica refused our session renewal");
                    stale()
                }
                Ok(_) | Err(OpenError::Broken(_)) => {
                    replace(inner, volume, io, records, slot, size)
                }
                Err(OpenError::Unreachable(_)) => stale(),
            }
        };
        let Some(plan) = plan else { continue };
        let target_node = match &plan {
            Plan::Resume { .. } => rec.node.clone(),
            Plan::Replace { record, .. } => record.node.clone(),
        };
        if inner.rebuilds_on(&target_node) >= limit {
            tracing::info!(volume, node = %target_node, limit, "rebuild waits: node at its concurrent rebuild limit");
            if let Plan::Replace { record, .. } = &plan {
                inner.delete_replica(&record.name, &record.addr);
            }
            continue;
        }
        start_rebuild(inner, volume, io, slot, rec, plan, target_node);
    }
}

/// Makes a fresh replica for `slot`, placed away from the volume's other
/// replicas' nodes.
fn replace(
    inner: &Arc<Inner>,
    volume: &str,
    io: &Arc<VolumeIo>,
    records: &[ReplicaRecord],
    slot: usize,
    size: u64,
) -> Option<Plan> {
    let taken: Vec<String> = records
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != slot)
        .map(|(_, r)| r.node.clone())
        .collect();
    let made = if inner.cluster.enabled() {
        inner.create_replicas(volume, 1, size, &taken, Some(&records[slot].name))
    } else {
        // Standalone: any disk not holding another replica of the volume.
        let used: Vec<_> = records
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != slot)
            .map(|(_, r)| r.disk.clone())
            .collect();
        super::manager::random_replica_name(volume).and_then(|rname| {
            inner
                .disks
                .create(volume, &rname, size, Some(&records[slot].name), |d| {
                    d.schedulable && !used.iter().any(|u| u.as_os_str() == d.path.as_str())
                })
                .map_err(Into::into)
                .map(|(disk, dir)| {
                    vec![ReplicaRecord::new(
                        rname,
                        inner.node_id.clone(),
                        String::new(),
                        disk,
                        dir,
                    )]
                })
        })
    };
    let record = match made {
        Ok(mut v) if !v.is_empty() => v.remove(0),
        Ok(_) => return None,
        Err(e) => {
            tracing::warn!(volume, slot, error = %e, "cannot place a replacement replica yet");
            return None;
        }
    };
    match inner.open_replica(volume, &record.name, &record.addr, io.takeover()) {
        Ok(io) => Some(Plan::Replace { io, record }),
        Err(e) => {
            tracing::warn!(volume, replica = %record.name, error = %e, "cannot open the new replica");
            inner.delete_replica(&record.name, &record.addr);
            None
        }
    }
}

fn start_rebuild(
    inner: &Arc<Inner>,
    volume: &str,
    io: &Arc<VolumeIo>,
    slot: usize,
    old: &ReplicaRecord,
    plan: Plan,
    node: String,
) {
    let (rio, record, replaced) = match plan {
        Plan::Resume { io } => (io, old.clone(), None),
        Plan::Replace { io, record } => (io, record, Some(old.clone())),
    };
    let progress = Arc::new(RebuildProgress::new(&record.name));
    let cancel = Arc::new(AtomicBool::new(false));
    inner.add_rebuild(
        volume,
        RunningRebuild {
            slot,
            node,
            progress: progress.clone(),
            cancel: cancel.clone(),
        },
    );
    let (vname, vio, tx) = (volume.to_string(), io.clone(), inner.repair_done.clone());
    let weak = Arc::downgrade(inner);
    let spawned = std::thread::Builder::new()
        .name(format!("rebuild-{}", record.name))
        .spawn(move || {
            let span = tracing::info_span!("volume", volume = %vname);
            let _e = span.enter();
            let result = rebuild(&vio, slot, &record.name, rio, &progress, &cancel)
                .map_err(|e| e.to_string());
            if let Some(inner) = weak.upgrade() {
                inner.remove_rebuild(&vname, slot);
            }
            let _ = tx.send(RepairDone {
                volume: vname,
                slot,
                io: vio,
                replica: record,
                replaced,
                result,
            });
        });
    if let Err(e) = spawned {
        tracing::error!(volume, error = %e, "cannot start a rebuild thread");
        inner.remove_rebuild(volume, slot);
    }
}

/// Whether an auto-salvage (at runtime or at attach) must wait: the best
/// replica it could keep is older than `newest` (what the last healthy set
/// held) while some replica is still missing, which may be that newer one.
/// Salvaging now would drop every write acknowledged while it was alone.
pub(super) fn salvage_must_wait(best: u64, newest: u64, all_back: bool) -> bool {
    best < newest && !all_back
}

/// Every replica failed: reconnect to all and keep the newest.
fn salvage(inner: &Arc<Inner>, volume: &str, io: &Arc<VolumeIo>, records: &[ReplicaRecord]) {
    let found: Vec<(usize, String, ReplicaIo)> = records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let opened = inner
                .open_replica(volume, &r.name, &r.addr, io.claim_for(i, &r.name))
                .ok()?;
            // Renewed even if salvage waits: the next claim renews this one.
            io.note_claimed(i, &r.name, &opened);
            Some((i, r.name.clone(), opened))
        })
        .collect();
    if found.is_empty() {
        return;
    }
    // The replicas that were healthy last hold revision R-1 (the commit that
    // faulted the volume persisted R nowhere). Salvaging only older ones
    // while a newer one may still come back would drop acknowledged writes:
    // wait for it, unless every replica is back and none is that new.
    let newest = io.revision().saturating_sub(1);
    let best = found
        .iter()
        .map(|(_, _, r)| r.revision())
        .max()
        .unwrap_or(0);
    if salvage_must_wait(best, newest, found.len() == records.len()) {
        tracing::info!(
            volume,
            best,
            newest,
            "auto-salvage waits for a replica holding the newest writes"
        );
        return;
    }
    match io.salvage(found) {
        Ok(kept) if !kept.is_empty() => {
            let _ = inner.repair_done.send(RepairDone {
                volume: volume.to_string(),
                slot: usize::MAX,
                io: io.clone(),
                replica: ReplicaRecord {
                    name: kept.join(","),
                    ..records[0].clone()
                },
                replaced: None,
                result: Ok(RebuildReport {
                    incremental: false,
                    copied: 0,
                    redone_chunks: 0,
                    passes: 0,
                    elapsed: Duration::ZERO,
                }),
            });
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(volume, error = %e, "auto-salvage found no usable replica yet"),
    }
}

/// Applies finished rebuilds (and salvages) to the records.
pub async fn done_loop(inner: Weak<Inner>, mut rx: mpsc::UnboundedReceiver<RepairDone>) {
    while let Some(done) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let state = inner.state.clone();
        let mut st = state.lock().await;
        let Ok(v) = st.volume_mut(&done.volume) else {
            continue;
        };
        // A volume detached (or re-attached) meanwhile has a new engine.
        let current = v
            .live
            .as_ref()
            .is_some_and(|l| Arc::ptr_eq(&l.io, &done.io));
        if done.slot == usize::MAX {
            if current {
                let kept: Vec<&str> = done.replica.name.split(',').collect();
                for r in v.record.replicas.iter_mut() {
                    if kept.contains(&r.name.as_str()) {
                        r.state = RecordState::Healthy;
                        r.message.clear();
                        r.failed_at = None;
                    }
                }
                v.record.sync_from(&done.io);
                let _ = inner.store.save(&v.record);
                inner.publish(&st);
            }
            continue;
        }
        match (&done.result, current) {
            (Ok(report), true) => {
                if let Some(slot) = v.record.replicas.get_mut(done.slot) {
                    *slot = ReplicaRecord {
                        state: RecordState::Healthy,
                        message: String::new(),
                        failed_at: None,
                        last_rebuild: Some(LastRebuild {
                            incremental: report.incremental,
                            copied: report.copied,
                            millis: report.elapsed.as_millis() as u64,
                            finished_at: unix_now(),
                        }),
                        ..done.replica.clone()
                    };
                }
                v.record.sync_from(&done.io);
                if let Err(e) = inner.store.save(&v.record) {
                    tracing::error!(volume = %done.volume, error = %e, "cannot record the rebuilt replica");
                }
                tracing::info!(
                    volume = %done.volume,
                    replica = %done.replica.name,
                    incremental = report.incremental,
                    copied = report.copied,
                    passes = report.passes,
                    redone_chunks = report.redone_chunks,
                    elapsed_ms = report.elapsed.as_millis() as u64,
                    "replica rebuilt"
                );
                inner.publish(&st);
                drop(st);
                if let Some(old) = done.replaced {
                    let i = inner.clone();
                    let _ =
                        tokio::task::spawn_blocking(move || i.delete_replica(&old.name, &old.addr))
                            .await;
                }
            }
            (Ok(_), false) | (Err(_), _) => {
                if let Err(e) = &done.result {
                    tracing::warn!(volume = %done.volume, replica = %done.replica.name, error = %e, "rebuild failed; will retry");
                }
                drop(st);
                if done.replaced.is_some() {
                    // The fresh replica never became the volume's: drop it.
                    let i = inner.clone();
                    let r = done.replica.clone();
                    let _ = tokio::task::spawn_blocking(move || i.delete_replica(&r.name, &r.addr))
                        .await;
                }
            }
        }
    }
}

impl Inner {
    pub(super) fn rebuild_running(&self, volume: &str, slot: usize) -> bool {
        let r = self.rebuilds.lock().unwrap_or_else(|p| p.into_inner());
        r.get(volume)
            .is_some_and(|l| l.iter().any(|x| x.slot == slot))
    }

    fn rebuilds_on(&self, node: &str) -> usize {
        let r = self.rebuilds.lock().unwrap_or_else(|p| p.into_inner());
        r.values().flatten().filter(|x| x.node == node).count()
    }

    fn add_rebuild(&self, volume: &str, r: RunningRebuild) {
        self.rebuilds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(volume.to_string())
            .or_default()
            .push(r);
    }

    fn remove_rebuild(&self, volume: &str, slot: usize) {
        let mut r = self.rebuilds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = r.get_mut(volume) {
            l.retain(|x| x.slot != slot);
            if l.is_empty() {
                r.remove(volume);
            }
        }
    }
}

#[cfg(test)]
mod salvage_tests {
    use super::salvage_must_wait;

    #[test]
    fn salvage_waits_only_for_a_missing_newer_replica() {
        assert!(
            salvage_must_wait(4, 5, false),
            "the newest may be the missing one"
        );
        assert!(
            !salvage_must_wait(4, 5, true),
            "every replica is back: keep the best"
        );
        assert!(!salvage_must_wait(5, 5, false), "the newest is here");
        assert!(!salvage_must_wait(6, 5, false));
    }
}
