//! Moving a volume between nodes: the cooperative handover and the forced
//! takeover (design: `docs/design/0007-volume-handover.md`).
//!
//! A volume's record lives on its owner. `volume attach NAME` on node N,
//! when another node O owns NAME:
//!
//! - **Handover** (O answers). O refuses if the device is in use (mounted,
//!   or open by any process). Otherwise it detaches cleanly (quiesce, flush,
//!   device removed, write-intent log removed), persists its record marked
//!   `handed_to: N`, stops reporting the volume and answers with the record.
//!   N persists the record as its own with the owner term one higher,
//!   reports it, tells O to forget it, and attaches: its claims carry the
//!   new term, so every replica refuses O from then on.
//! - **Forced takeover** (`--force`, O does not answer, or no node reports
//!   the volume). N builds the record from the replicas that answer and
//!   from O's last report of where the volume's replicas are, at a term
//!   above every replica's. Replicas on O are failed (O may have written to
//!   them alone while cut off) and rebuilt once O is back. Where the
//!   surviving replicas differ is unknown, so all but one resync whole.
//!
//! The replicas are the arbiter, not the nodes: a claim with an older term
//! is refused (`replica::OwnerTerm`), so an old owner that restarts, or
//! heals from a partition, cannot take back a replica the new owner holds;
//! when a replica refuses it that way, it drops its own record.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::forward::{ForwardError, Owner, PeerRef};
use super::manager::{unix_now, Inner, State, Volume};
use super::store::{RecordState, ReplicaRecord, VolumeRecord};
use super::{ControlError, VolumeInfo, VolumeManager};
use crate::engine::intent::IntentLog;

/// Internal peer methods (carried like forwarded API calls, never served
/// on the API socket).
pub(crate) const RELEASE_METHOD: &str = "cairn.internal.ReleaseVolume";
pub(crate) const FORGET_METHOD: &str = "cairn.internal.ForgetVolume";
pub(crate) const RECLAIM_METHOD: &str = "cairn.internal.ReclaimVolume";

/// How long a node that handed a volume over waits for the new owner to
/// report it before it takes the record back (the new owner failed to
/// store it). The new owner reports it within one poll (2 s) normally; a
/// late report is still safe, the owner terms decide.
const RECLAIM_AFTER: Duration = Duration::from_secs(60);

/// A record handed to another node that has not yet been confirmed.
pub(super) struct Handing {
    pub(super) record: VolumeRecord,
    pub(super) since: Instant,
}

/// The request of [`RELEASE_METHOD`], [`FORGET_METHOD`] and
/// [`RECLAIM_METHOD`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct HandoverRequest {
    pub(crate) volume: String,
    pub(crate) to: String,
}

impl VolumeManager {
    /// Makes this node the owner of volume `name` and attaches it here
    /// (see the module docs). `force` takes it over when its owner does not
    /// answer or nobody reports it.
    pub async fn attach_here(&self, name: &str, force: bool) -> Result<VolumeInfo, ControlError> {
        crate::name::validate_volume_name(name)?;
        if !force && self.owner_now(name).await == Owner::Unknown {
            return Err(ControlError::NotFound {
                name: name.to_string(),
            });
        }
        // Without the driver nothing could be attached here: the volume
        // must not move for nothing.
        crate::frontend::ublk_available()?;
        self.acquire(name, force).await?;
        self.attach(name).await
    }

    /// Makes this node the owner of volume `name` without attaching it: a
    /// handover from the owner that answers, or with `force` a takeover
    /// when it does not (or nobody reports the volume). Nothing to do when
    /// the volume is this node's already.
    pub async fn acquire(&self, name: &str, force: bool) -> Result<(), ControlError> {
        match self.owner_now(name).await {
            Owner::Local => {
                let st = self.inner.state.lock().await;
                st.volume(name).map(|_| ())
            }
            Owner::Peer(from) => self.hand_over_from(&from, name).await,
            Owner::Away { node, reason } if !force => {
                Err(ControlError::OwnerUnreachable { node, reason })
            }
            Owner::Away { node, reason } => {
                tracing::warn!(volume = name, owner = %node, %reason, "forced takeover from an unreachable owner");
                self.take_over(name, Some(&node)).await.map(|_| ())
            }
            Owner::Unknown if force => self.take_over(name, None).await.map(|_| ()),
            Owner::Unknown => Err(ControlError::NotFound {
                name: name.to_string(),
            }),
        }
    }

    /// The handover, on the new owner: asks `from` for the record, stores
    /// it as this node's and tells `from` to forget it.
    async fn hand_over_from(&self, from: &PeerRef, name: &str) -> Result<(), ControlError> {
        let _op = self.inner.volume_lock(name).await;
        let started = Instant::now();
        let req = HandoverRequest {
            volume: name.to_string(),
            to: self.inner.node_id.clone(),
        };
        let body = self.peer_call(from, RELEASE_METHOD, &req).await?;
        let record: VolumeRecord = serde_json::from_slice(&body).map_err(|e| {
            ControlError::Internal(format!(
                "volume {name}: {} handed over an unreadable record: {e}",
                from.node
            ))
        })?;
        if let Err(e) = self.accept(record, from).await {
            // Give it back: the old owner keeps the volume.
            if let Err(back) = self.peer_call(from, RECLAIM_METHOD, &req).await {
                tracing::error!(volume = name, owner = %from.node, error = %back, "cannot give a handed-over volume back; it returns to its owner within a minute");
            }
            return Err(e);
        }
        if let Err(e) = self.peer_call(from, FORGET_METHOD, &req).await {
            // It forgets it once it sees this node report the volume.
            tracing::warn!(volume = name, owner = %from.node, error = %e, "the old owner did not confirm the handover yet");
        }
        tracing::info!(volume = name, from = %from.node, elapsed_ms = started.elapsed().as_millis() as u64, "volume handed over to this node");
        Ok(())
    }

    async fn peer_call(
        &self,
        to: &PeerRef,
        method: &str,
        req: &HandoverRequest,
    ) -> Result<Vec<u8>, ControlError> {
        let body = serde_json::to_vec(req).map_err(|e| ControlError::Internal(e.to_string()))?;
        self.forward(to, method, body).await.map_err(|e| match e {
            ForwardError::Unreachable { node, reason } => {
                ControlError::OwnerUnreachable { node, reason }
            }
            ForwardError::Refused { code, message } => ControlError::Peer { code, message },
        })
    }

    /// Stores `record`, handed over by `from`, as this node's.
    async fn accept(&self, mut record: VolumeRecord, from: &PeerRef) -> Result<(), ControlError> {
        let inner = &self.inner;
        let mut st = inner.state.lock().await;
        let name = record.name.clone();
        if st.volumes.contains_key(&name) {
            return Err(ControlError::AlreadyExists { name });
        }
        for r in &mut record.replicas {
            if r.node == inner.node_id {
                r.addr.clear();
            } else if r.addr.is_empty() {
                // It was local to the old owner: reached through its server.
                r.addr = from.addr.clone();
            }
        }
        record.owner_term += 1;
        record.handed_to = None;
        record.attached = false;
        record.dev_id = None;
        // Logs of an earlier stint here describe another ownership.
        let _ = std::fs::remove_file(inner.store.intent_path(&name));
        let _ = std::fs::remove_file(inner.store.epoch_path(&name));
        inner.store.save(&record)?;
        inner.schedule_jobs(&record);
        st.volumes.insert(
            name.clone(),
            Volume {
                record,
                live: None,
                message: String::new(),
            },
        );
        inner.publish(&st);
        Ok(())
    }

    /// The handover, on the old owner: detaches `name` if it is attached
    /// and not in use, and gives up its record to node `to`.
    pub(crate) async fn release(&self, req: &HandoverRequest) -> Result<Vec<u8>, ControlError> {
        let inner = &self.inner;
        let name = req.volume.as_str();
        let _op = inner.volume_lock(name).await;
        let st = inner.state.lock().await;
        let v = st.volume(name)?;
        if inner.restore_info(name).is_some() {
            return Err(ControlError::Restoring {
                name: name.to_string(),
            });
        }
        if inner.backup_running(name) {
            return Err(ControlError::BackupInProgress {
                handle: format!("of volume {name}"),
            });
        }
        if let Some(live) = &v.live {
            let path = live.device_path();
            drop(st);
            let p = path.clone();
            let user = tokio::task::spawn_blocking(move || device_user(&p)).await?;
            if let Some(user) = user {
                return Err(ControlError::InUse {
                    name: name.to_string(),
                    node: inner.node_id.clone(),
                    user,
                });
            }
            tracing::info!(volume = name, to = %req.to, device = %path.display(), "handing the volume over: detaching");
            inner.detach_volume(name, false).await?;
        } else {
            drop(st);
        }
        let mut st = inner.state.lock().await;
        let v = st.volume_mut(name)?;
        let mut record = v.record.clone();
        record.handed_to = Some(req.to.clone());
        record.attached = false;
        record.dev_id = None;
        inner.store.save(&record)?;
        let body =
            serde_json::to_vec(&record).map_err(|e| ControlError::Internal(e.to_string()))?;
        st.volumes.remove(name);
        inner.unschedule(name);
        inner.publish(&st);
        inner.handing().insert(
            name.to_string(),
            Handing {
                record,
                since: Instant::now(),
            },
        );
        tracing::info!(volume = name, to = %req.to, "volume record handed over");
        Ok(body)
    }

    /// The old owner: the new owner holds `volume` now.
    pub(crate) async fn forget(&self, req: &HandoverRequest) -> Result<(), ControlError> {
        self.inner.forget_handed(&req.volume, &req.to)
    }

    /// The old owner: the new owner could not take `volume`; it stays here.
    pub(crate) async fn reclaim(&self, req: &HandoverRequest) -> Result<(), ControlError> {
        let mut st = self.inner.state.lock().await;
        self.inner
            .reclaim_handed(&mut st, &req.volume, "the new owner could not store it");
        Ok(())
    }

    /// Builds this node's record of `name` from the replicas that answer
    /// (and the last report of `from`, the unreachable owner), at an owner
    /// term above every replica's. Replicas on `from` are failed.
    pub async fn take_over(
        &self,
        name: &str,
        from: Option<&str>,
    ) -> Result<VolumeInfo, ControlError> {
        crate::name::validate_volume_name(name)?;
        let inner = &self.inner;
        let _op = inner.volume_lock(name).await;
        if inner.state.lock().await.volumes.contains_key(name) {
            return Err(ControlError::AlreadyExists {
                name: name.to_string(),
            });
        }
        let i = inner.clone();
        let found = tokio::task::spawn_blocking(move || i.find_replicas()).await?;
        let mine: Vec<_> = found
            .into_iter()
            .filter(|(_, r)| r.volume == name && r.error.is_empty())
            .collect();
        // Where the old owner said the replicas are: those it holds itself
        // (and any other node that does not answer) are not found above.
        let placement = from.and_then(|node| {
            inner.cluster.nodes().into_iter().find_map(|n| {
                let r = n.report?;
                if r.node != node {
                    return None;
                }
                r.placements.into_iter().find(|p| p.volume == name)
            })
        });
        let is_old_owner = |node: &str| from == Some(node);
        let Some(newest) = mine
            .iter()
            .filter(|(n, _)| !is_old_owner(&n.name))
            .map(|(_, r)| r.revision)
            .max()
        else {
            return Err(if mine.is_empty() {
                ControlError::NothingToAdopt {
                    volume: name.to_string(),
                }
            } else {
                ControlError::NoHealthyReplicaFor {
                    volume: name.to_string(),
                    reason: "every replica that answers is on the old owner; attach the volume there once it is back".into(),
                }
            });
        };
        let size = mine
            .iter()
            .find(|(n, r)| r.revision == newest && !is_old_owner(&n.name))
            .map(|(_, r)| r.size)
            .unwrap_or(0);
        let owner_term = mine
            .iter()
            .map(|(_, r)| r.owner_term)
            .chain(placement.as_ref().map(|p| p.owner_term))
            .max()
            .unwrap_or(0)
            + 1;
        let mut replicas: Vec<ReplicaRecord> = Vec::new();
        for (node, r) in &mine {
            let (state, message) = if is_old_owner(&node.name) {
                (
                    RecordState::Failed,
                    format!(
                        "on the old owner {} at the forced takeover: it may hold writes no other replica has",
                        node.name
                    ),
                )
            } else if r.revision == newest && r.size == size {
                (RecordState::Healthy, String::new())
            } else {
                (
                    RecordState::Failed,
                    format!(
                        "taken over behind the newest replica (revision {} < {newest})",
                        r.revision
                    ),
                )
            };
            let failed = state == RecordState::Failed;
            replicas.push(ReplicaRecord {
                name: r.replica.clone(),
                node: node.name.clone(),
                disk: PathBuf::from(&r.disk),
                dir: PathBuf::from(&r.dir),
                state,
                message,
                addr: if node.local {
                    String::new()
                } else {
                    node.addr.clone()
                },
                failed_at: failed.then(unix_now),
                last_rebuild: None,
            });
        }
        for p in placement.iter().flat_map(|p| p.replicas.iter()) {
            if replicas.iter().any(|r| r.name == p.replica) {
                continue;
            }
            let Some(addr) = inner.cluster.addr_of(&p.node) else {
                continue;
            };
            replicas.push(ReplicaRecord {
                name: p.replica.clone(),
                node: p.node.clone(),
                disk: PathBuf::new(),
                dir: PathBuf::new(),
                state: RecordState::Failed,
                message: format!(
                    "unreachable at the forced takeover (on {}); rebuilt when it is back",
                    p.node
                ),
                addr: if p.node == inner.node_id {
                    String::new()
                } else {
                    addr
                },
                failed_at: Some(unix_now()),
                last_rebuild: None,
            });
        }
        if replicas.len() > crate::engine::MAX_REPLICAS {
            return Err(ControlError::TooManyReplicas {
                volume: name.to_string(),
                wanted: replicas.len() as u32,
                max: crate::engine::MAX_REPLICAS,
            });
        }
        let record = VolumeRecord {
            format: super::store::RECORD_FORMAT,
            name: name.to_string(),
            size,
            replica_count: replicas.len() as u32,
            queues: inner.frontend.queues,
            queue_depth: inner.frontend.queue_depth,
            attached: false,
            dev_id: None,
            revision: newest,
            replicas,
            standby: false,
            from_backup: String::new(),
            last_restored: String::new(),
            restoring: None,
            recurring_jobs: String::new(),
            last_backup: String::new(),
            last_backup_snapshot: String::new(),
            owner_term,
            handed_to: None,
        };
        let mut st = inner.state.lock().await;
        if st.volumes.contains_key(name) {
            return Err(ControlError::AlreadyExists {
                name: name.to_string(),
            });
        }
        // The last owner's write-intent log is out of reach: where the
        // replicas may differ is unknown.
        let intent = inner.store.intent_path(name);
        IntentLog::write_unknown(&intent, size)
            .map_err(|e| ControlError::Internal(format!("volume {name}: {e}")))?;
        let _ = std::fs::remove_file(inner.store.epoch_path(name));
        inner.store.save(&record)?;
        tracing::warn!(
            volume = name,
            from = from.unwrap_or("(nobody reports it)"),
            replicas = record.replicas.len(),
            revision = newest,
            owner_term,
            "volume taken over"
        );
        let v = Volume {
            record,
            live: None,
            message: String::new(),
        };
        let info = v.info(inner);
        st.volumes.insert(name.to_string(), v);
        inner.publish(&st);
        Ok(info)
    }
}

impl Inner {
    pub(super) fn handing(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, Handing>> {
        self.handing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The old owner: `to` holds `volume` now; the record here goes.
    fn forget_handed(&self, volume: &str, to: &str) -> Result<(), ControlError> {
        let mut handing = self.handing();
        match handing.get(volume) {
            Some(h) if h.record.handed_to.as_deref() == Some(to) => {}
            _ => return Ok(()),
        }
        self.store.remove(volume)?;
        handing.remove(volume);
        tracing::info!(volume, to, "handover confirmed; record removed");
        Ok(())
    }

    /// The old owner takes a handed record back (the new owner never stored
    /// it): detached, with a message.
    fn reclaim_handed(&self, st: &mut State, volume: &str, why: &str) {
        let Some(h) = self.handing().remove(volume) else {
            return;
        };
        let mut record = h.record;
        let to = record.handed_to.take().unwrap_or_default();
        if let Err(e) = self.store.save(&record) {
            tracing::error!(volume, error = %e, "cannot take a handed-over record back");
            self.handing().insert(
                volume.to_string(),
                Handing {
                    record: VolumeRecord {
                        handed_to: Some(to),
                        ..record
                    },
                    since: h.since,
                },
            );
            return;
        }
        tracing::warn!(volume, to = %to, reason = why, "handover did not complete; the volume stays here");
        self.schedule_jobs(&record);
        st.volumes.insert(
            volume.to_string(),
            Volume {
                record,
                live: None,
                message: format!("handover to {to} did not complete: {why}"),
            },
        );
        self.publish(st);
    }

    /// The check loop: settles handovers whose new owner reported (or
    /// never did).
    pub(super) async fn settle_handovers(&self) {
        let pending: Vec<(String, String, Instant)> = self
            .handing()
            .iter()
            .map(|(n, h)| {
                (
                    n.clone(),
                    h.record.handed_to.clone().unwrap_or_default(),
                    h.since,
                )
            })
            .collect();
        for (volume, to, since) in pending {
            let view = self
                .cluster
                .nodes()
                .into_iter()
                .find(|n| n.report.as_ref().is_some_and(|r| r.node == to));
            let holds = view
                .as_ref()
                .is_some_and(|n| n.report.as_ref().is_some_and(|r| r.owns(&volume)));
            if holds {
                if let Err(e) = self.forget_handed(&volume, &to) {
                    tracing::error!(volume, error = %e, "cannot remove a handed-over record");
                }
            } else if view.is_some_and(|n| n.up) && since.elapsed() > RECLAIM_AFTER {
                let mut st = self.state.lock().await;
                self.reclaim_handed(&mut st, &volume, "the new owner does not report it");
            }
        }
    }

    /// This node's record of `name` belongs to an older owner term: another
    /// node took the volume over. Drops it (the replicas are the new
    /// owner's; the one here is rebuilt by it).
    pub(super) fn retire(&self, st: &mut State, name: &str, why: &str) {
        tracing::warn!(
            volume = name,
            reason = why,
            "volume taken over by another node: dropping this node's record of it"
        );
        // A crashed run's device, parked for a recovery that will not come.
        let used: Vec<u32> = st
            .volumes
            .values()
            .filter_map(|v| v.live.as_ref().map(|l| l.dev_id()))
            .collect();
        let leftover = st.volumes.get(name).and_then(|v| {
            (v.live.is_none())
                .then_some(v.record.dev_id)
                .flatten()
                .filter(|id| !used.contains(id))
        });
        if let Some(id) = leftover {
            crate::frontend::remove_leftover_device(name, id);
        }
        if let Err(e) = self.store.remove(name) {
            tracing::error!(volume = name, error = %e, "cannot remove the record of a volume taken over");
        }
        self.unschedule(name);
        st.volumes.remove(name);
        self.publish(st);
    }

    /// Drops the records of detached (or fenced) volumes that a peer
    /// reports owning at a later term: an old owner back after a takeover.
    pub(super) async fn settle_ownership(&self) {
        let mut st = self.state.lock().await;
        let stale: Vec<(String, String)> = st
            .volumes
            .values()
            .filter(|v| v.live.as_ref().is_none_or(|l| l.io.is_fenced()))
            .filter_map(|v| {
                let node = self.newer_owner(&v.record.name, v.record.owner_term)?;
                Some((v.record.name.clone(), node))
            })
            .collect();
        for (name, node) in stale {
            // An operation on it is running: next round.
            let Some(_op) = self.try_volume_lock(&name) else {
                continue;
            };
            if st.volume(&name).is_ok_and(|v| v.live.is_some()) {
                // Fenced: the device stays until the operator detaches it
                // (a mounted filesystem sees I/O errors, not a vanished disk).
                continue;
            }
            let why = format!("{node} owns it at a later term");
            self.retire(&mut st, &name, &why);
        }
    }

    /// The node that reports owning `name` at a later term than `term`.
    pub(super) fn newer_owner(&self, name: &str, term: u64) -> Option<String> {
        self.cluster.nodes().into_iter().find_map(|n| {
            let r = n.report?;
            r.placements
                .iter()
                .any(|p| p.volume == name && p.owner_term > term)
                .then_some(r.node)
        })
    }
}

/// Who uses block device `path`: mounted or held exclusively (an `O_EXCL`
/// open fails with `EBUSY`), or open by a process. `None` when nobody.
fn device_user(path: &Path) -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            return Some("mounted or held exclusively".into());
        }
        // Gone or unreadable: nobody can be using it through this path.
        Err(_) => return None,
    }
    let me = std::process::id().to_string();
    let procs = std::fs::read_dir("/proc").ok()?;
    for p in procs.flatten() {
        let pid = p.file_name();
        let Some(pid) = pid.to_str() else { continue };
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|t| t == path) {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                return Some(format!("open by process {pid} ({})", comm.trim()));
            }
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_file_nobody_holds_is_not_in_use_and_one_held_open_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        std::fs::write(&path, b"x").unwrap();
        // O_EXCL on a regular file without O_CREAT is ignored: only the
        // process scan can find a user, and this process is skipped.
        assert_eq!(device_user(&path), None);
        assert_eq!(device_user(&dir.path().join("missing")), None);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::fs::File::open(&path).unwrap())
            .spawn()
            .unwrap();
        let found = device_user(&path);
        child.kill().unwrap();
        let _ = child.wait();
        let found = found.expect("a process holding the file open");
        assert!(found.contains(&child.id().to_string()), "{found}");
    }
}
