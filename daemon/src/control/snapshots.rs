//! Snapshot operations of the control plane: create, list, delete
//! (mark + coalesce), purge and revert, on an attached volume (through its
//! engine, I/O quiesced, so every healthy replica changes at the same point
//! of the write stream) or a detached one (on each healthy replica
//! directly). A replica the change fails on, or that cannot be reached, is
//! failed and later rebuilt: healthy replicas always share one chain.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::manager::{unix_now, Inner, VolumeManager};
use super::ControlError;
use crate::engine::ReplicaIo;
use crate::replica::{ChainChange, ChainOutcome, Claim, LayerInfo};

/// How long a snapshot may wait for in-flight I/O to drain.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);

/// One entry of `snapshot list`: a snapshot, or the volume head (last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    /// The next older snapshot; empty for the first.
    pub parent: String,
    pub created: String,
    /// Bytes of data the layer itself holds.
    pub size: u64,
    pub user_created: bool,
    pub removed: bool,
    pub is_head: bool,
    pub labels: BTreeMap<String, String>,
}

impl SnapshotInfo {
    fn from_chain(chain: &[LayerInfo]) -> Vec<SnapshotInfo> {
        let name_of = |file: &str| -> String {
            chain
                .iter()
                .find(|l| l.file == file)
                .map(layer_name)
                .unwrap_or_default()
        };
        chain
            .iter()
            .map(|l| SnapshotInfo {
                name: layer_name(l),
                parent: if l.parent.is_empty() {
                    String::new()
                } else {
                    name_of(&l.parent)
                },
                created: l.created.clone(),
                size: l.allocated,
                user_created: l.user_created,
                removed: l.removed,
                is_head: l.is_head,
                labels: l.labels.clone(),
            })
            .collect()
    }
}

/// Name shown for the head.
pub const HEAD_NAME: &str = "volume-head";

fn layer_name(l: &LayerInfo) -> String {
    l.snapshot.clone().unwrap_or_else(|| HEAD_NAME.to_string())
}

/// A snapshot name for `snapshot create` without `--name`: unique enough
/// (seconds plus random bits) and a valid DNS label.
pub(super) fn generated_name(prefix: &str) -> String {
    let mut r = [0u8; 3];
    let rand = match std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut r))
    {
        Ok(()) => u32::from_le_bytes([r[0], r[1], r[2], 0]),
        Err(_) => std::process::id(),
    };
    format!("{prefix}-{}-{rand:06x}", unix_now())
}

/// Label keys and values as Kubernetes allows them, roughly: a key is a
/// non-empty name of at most 63 characters (an optional DNS prefix before
/// `/`), a value at most 63 characters without spaces.
pub(crate) fn validate_labels(
    what: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), ControlError> {
    for (k, v) in labels {
        let name = k.rsplit('/').next().unwrap_or(k);
        let ok_key = !name.is_empty()
            && k.len() <= 253
            && name.len() <= 63
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if !ok_key {
            return Err(ControlError::BadLabel { what: what.to_string(), label: k.clone(), reason: "keys are letters, digits, '-', '_', '.', with an optional prefix/ (name at most 63 characters)".into() });
        }
        if v.len() > 63
            || !v
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ControlError::BadLabel {
                what: what.to_string(),
                label: k.clone(),
                reason: format!("value {v:?} must be at most 63 letters, digits, '-', '_' or '.'"),
            });
        }
    }
    Ok(())
}

impl Inner {
    /// Applies `change` to the volume's healthy replicas. Holds the
    /// volume's lock (no attach or detach of it meanwhile); the state lock
    /// only while reading and recording, not during the quiesce or the
    /// replicas' changes.
    pub(super) async fn apply_chain(
        self: &Arc<Self>,
        volume: &str,
        change: ChainChange,
        detached_only: bool,
    ) -> Result<ChainOutcome, ControlError> {
        let _op = self.volume_lock(volume).await;
        let mut st = self.state.lock().await;
        let v = st.volume_mut(volume)?;
        if v.record.standby {
            return Err(ControlError::Standby {
                name: volume.to_string(),
                what: "change its snapshots",
            });
        }
        if let Some(live) = &v.live {
            if detached_only {
                return Err(ControlError::MustDetach {
                    name: volume.to_string(),
                    what: "revert it to a snapshot",
                });
            }
            let io = live.io.clone();
            drop(st);
            let io2 = io.clone();
            let outcome =
                tokio::task::spawn_blocking(move || io2.change_chain(&change, QUIESCE_TIMEOUT))
                    .await??;
            let mut st = self.state.lock().await;
            let v = st.volume_mut(volume)?;
            v.record.sync_from(&io);
            self.store.save(&v.record)?;
            return Ok(outcome);
        }
        if self.has_rebuilds(volume) {
            return Err(crate::engine::EngineError::Rebuilding {
                volume: volume.to_string(),
            }
            .into());
        }
        let targets: Vec<(String, String)> = v.record.healthy_targets();
        // Each replica that takes the change moves to a revision above every
        // replica's, right after the change: a crash between two replicas
        // (or an adopt) finds the changed ones newer than the rest, never
        // two different chains at one revision.
        let next = v.record.revision + 1;
        let owner = self.ownership(&v.record);
        let me = self.clone();
        let vname = volume.to_string();
        drop(st);
        let results = tokio::task::spawn_blocking(move || {
            let opened: Vec<_> = targets
                .into_iter()
                .map(|(name, addr)| {
                    let io = me
                        .open_replica(
                            &vname,
                            &name,
                            &addr,
                            Claim::Takeover {
                                owner: owner.clone(),
                            },
                        )
                        .map_err(|e| e.to_string());
                    (name, io)
                })
                .collect();
            let next = opened
                .iter()
                .filter_map(|(_, io)| io.as_ref().ok().map(|io| io.revision() + 1))
                .fold(next, u64::max);
            let results: Vec<_> = opened
                .into_iter()
                .map(|(name, io)| {
                    let r = io.and_then(|io| {
                        let outcome = io.change_chain(&change)?;
                        fail::fail_point!("snapshots::detached::before_revision", |_| Err(
                            "failpoint snapshots::detached::before_revision".to_string()
                        ));
                        io.set_revision(next).map_err(|e| e.to_string())?;
                        Ok(outcome)
                    });
                    (name, r)
                })
                .collect::<Vec<_>>();
            (results, next)
        })
        .await?;
        let (results, next) = results;
        let mut st = self.state.lock().await;
        let v = st.volume_mut(volume)?;
        if results.iter().any(|(_, r)| r.is_ok()) {
            v.record.revision = next;
        }
        let outcome = results.iter().find_map(|(_, r)| r.as_ref().ok().cloned());
        let first_err = results.iter().find_map(|(_, r)| r.as_ref().err().cloned());
        if outcome.is_some() {
            // Replicas that missed a change others took would diverge.
            for (name, r) in &results {
                if let Err(e) = r {
                    tracing::warn!(volume, replica = %name, error = %e, "snapshot change failed on a replica; it will be rebuilt");
                    v.record
                        .set_failed(name, &format!("missed a snapshot change: {e}"));
                }
            }
        }
        self.store.save(&v.record)?;
        self.publish(&st);
        outcome.ok_or_else(|| ControlError::NoHealthyReplicaFor {
            volume: volume.to_string(),
            reason: first_err.unwrap_or_else(|| "no healthy replica".into()),
        })
    }

    /// The chain of one healthy replica (a local one when there is one).
    pub(super) async fn volume_chain(
        self: &Arc<Self>,
        volume: &str,
    ) -> Result<Vec<LayerInfo>, ControlError> {
        let st = self.state.lock().await;
        let v = st.volume(volume)?;
        if let Some(live) = &v.live {
            let io = live.io.clone();
            return tokio::task::spawn_blocking(move || {
                io.healthy_replicas()
                    .into_iter()
                    .map(|r| r.chain())
                    .find_map(Result::ok)
                    .ok_or_else(|| ControlError::NoHealthyReplica {
                        volume: io.name().to_string(),
                    })
            })
            .await?;
        }
        let mut targets: Vec<(String, String)> = v.record.healthy_targets();
        targets.sort_by_key(|(_, addr)| !addr.is_empty());
        drop(st);
        let me = self.clone();
        let vname = volume.to_string();
        tokio::task::spawn_blocking(move || {
            targets
                .into_iter()
                .find_map(|(name, addr)| {
                    me.open_replica(&vname, &name, &addr, Claim::Observe)
                        .ok()
                        .and_then(|io: ReplicaIo| io.chain().ok())
                })
                .ok_or(ControlError::NoHealthyReplica { volume: vname })
        })
        .await?
    }
}

impl VolumeManager {
    /// Takes a user snapshot of the volume's current contents.
    pub async fn snapshot_create(
        &self,
        volume: &str,
        name: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<SnapshotInfo, ControlError> {
        self.snapshot_create_as(volume, name, labels, true).await
    }

    pub(super) async fn snapshot_create_as(
        &self,
        volume: &str,
        name: Option<&str>,
        labels: BTreeMap<String, String>,
        user_created: bool,
    ) -> Result<SnapshotInfo, ControlError> {
        let name = match name {
            Some(n) => n.to_string(),
            None => generated_name("snap"),
        };
        crate::name::validate_label("snapshot", &name, 63)?;
        validate_labels("snapshot", &labels)?;
        if name == HEAD_NAME
            || self
                .snapshot_list(volume)
                .await?
                .iter()
                .any(|s| s.name == name)
        {
            return Err(ControlError::SnapshotExists {
                volume: volume.to_string(),
                snapshot: name,
            });
        }
        let change = ChainChange::Snapshot {
            name: name.clone(),
            created: String::new(),
            user_created,
            labels,
        };
        self.inner.apply_chain(volume, change, false).await?;
        tracing::info!(volume, snapshot = %name, "snapshot taken");
        self.snapshot_list(volume)
            .await?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                ControlError::Internal(format!("snapshot {name} missing right after it was taken"))
            })
    }

    /// The chain, oldest first, the head last.
    pub async fn snapshot_list(&self, volume: &str) -> Result<Vec<SnapshotInfo>, ControlError> {
        Ok(SnapshotInfo::from_chain(
            &self.inner.volume_chain(volume).await?,
        ))
    }

    /// Marks a snapshot removed; its data is merged into its child when the
    /// child is a snapshot (otherwise when a later snapshot is purged).
    /// Returns whether it was merged.
    pub async fn snapshot_delete(&self, volume: &str, name: &str) -> Result<bool, ControlError> {
        self.check_snapshot(volume, name).await?;
        if self.inner.snapshot_in_use(volume, name) {
            return Err(ControlError::SnapshotBusy {
                volume: volume.to_string(),
                snapshot: name.to_string(),
            });
        }
        let o = self
            .inner
            .apply_chain(
                volume,
                ChainChange::Remove {
                    name: name.to_string(),
                },
                false,
            )
            .await?;
        tracing::info!(
            volume,
            snapshot = name,
            coalesced = o.coalesced,
            "snapshot removed"
        );
        Ok(o.coalesced)
    }

    /// Merges removed and system snapshots into their children.
    pub async fn snapshot_purge(&self, volume: &str) -> Result<Vec<String>, ControlError> {
        if self.inner.backup_running(volume) {
            return Err(ControlError::SnapshotBusy {
                volume: volume.to_string(),
                snapshot: "(a backup is running)".into(),
            });
        }
        let o = self
            .inner
            .apply_chain(volume, ChainChange::Purge, false)
            .await?;
        Ok(o.names)
    }

    /// Reverts a detached volume to a snapshot; returns the newer snapshots
    /// dropped with the head.
    pub async fn snapshot_revert(
        &self,
        volume: &str,
        name: &str,
    ) -> Result<Vec<String>, ControlError> {
        self.check_snapshot(volume, name).await?;
        let o = self
            .inner
            .apply_chain(
                volume,
                ChainChange::Revert {
                    name: name.to_string(),
                },
                true,
            )
            .await?;
        tracing::warn!(volume, snapshot = name, dropped = ?o.names, "volume reverted");
        Ok(o.names)
    }

    pub(super) async fn check_snapshot(
        &self,
        volume: &str,
        name: &str,
    ) -> Result<(), ControlError> {
        let list = self.snapshot_list(volume).await?;
        if !list.iter().any(|s| !s.is_head && s.name == name) {
            return Err(ControlError::UnknownSnapshot {
                volume: volume.to_string(),
                snapshot: name.to_string(),
            });
        }
        Ok(())
    }
}
