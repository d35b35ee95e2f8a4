//! `volume expand`: growing a volume, detached or attached.
//!
//! Detached (offline): every replica is checked first (reachable, not open,
//! its disk takes the growth under the placement rules); only then does any
//! grow, so a refusal changes nothing. Growing is idempotent per replica:
//! if one fails midway (a node dies between the check and the growth),
//! running the command again completes it, and the record keeps the old
//! size until every replica has the new one.
//!
//! Attached (online; design 0009): needs the ublk driver's
//! `UBLK_F_UPDATE_SIZE` (Linux 6.16+), read at run time
//! ([`KernelFeatures`]); without it the refusal names the kernel and says to
//! detach. Every replica's disk is checked first (the replicas are open:
//! `GrowStep::CheckLive`); then the owner's engine grows its healthy
//! replicas in place under quiesce (`VolumeIo::grow`), the kernel is told
//! the new size (`UBLK_U_CMD_UPDATE_SIZE`), and the record follows. A
//! replica out of the write set is replaced at the new size by repair.

use super::store::ReplicaRecord;
use super::{ControlError, VolumeInfo, VolumeManager};
use crate::disks::{disk_has_room, GrowStep};
use crate::frontend::KernelFeatures;
use crate::replica::BLOCK_SIZE;
use crate::transport::Op;

impl VolumeManager {
    /// Grows detached volume `name` to `size` bytes.
    pub async fn expand(&self, name: &str, size: u64) -> Result<VolumeInfo, ControlError> {
        let _op = self.inner.volume_lock(name).await;
        let st = self.inner.state.lock().await;
        let v = st.volume(name)?;
        if size == 0 {
            return Err(ControlError::ZeroSize);
        }
        if size % BLOCK_SIZE != 0 {
            return Err(ControlError::UnalignedSize { size });
        }
        let live = v.live.as_ref().map(|l| (l.io.clone(), l.dev_id()));
        if live.is_some() {
            // One control command to the ublk driver (and uname).
            let kernel = tokio::task::spawn_blocking(KernelFeatures::detect).await?;
            if let Some(e) = online_refusal(name, &kernel) {
                return Err(e);
            }
        }
        if v.record.standby {
            return Err(ControlError::Standby {
                name: name.to_string(),
                what: "be expanded",
            });
        }
        if v.record.restoring.is_some() {
            return Err(ControlError::Restoring {
                name: name.to_string(),
            });
        }
        if size <= v.record.size {
            return Err(ControlError::NotLarger {
                name: name.to_string(),
                size,
                current: v.record.size,
            });
        }
        let replicas = v.record.replicas.clone();
        let inner = self.inner.clone();
        let volume = name.to_string();
        drop(st);
        match live {
            None => {
                tokio::task::spawn_blocking(move || {
                    // Every replica must take it before any grows.
                    for r in &replicas {
                        inner.expand_replica(&volume, r, size, GrowStep::Check)?;
                    }
                    for r in &replicas {
                        inner.expand_replica(&volume, r, size, GrowStep::Grow)?;
                    }
                    Ok::<(), ControlError>(())
                })
                .await??;
            }
            Some((io, dev_id)) => {
                tokio::task::spawn_blocking(move || {
                    for r in &replicas {
                        inner.expand_replica(&volume, r, size, GrowStep::CheckLive)?;
                    }
                    io.grow(size, GROW_QUIESCE_TIMEOUT)?;
                    crate::frontend::resize_device(&volume, dev_id, size)?;
                    Ok::<(), ControlError>(())
                })
                .await??;
            }
        }
        let mut st = self.inner.state.lock().await;
        let v = st.volume_mut(name)?;
        let old = v.record.size;
        v.record.size = size;
        if let Err(e) = self.inner.store.save(&v.record) {
            v.record.size = old;
            return Err(e);
        }
        tracing::info!(volume = name, from = old, to = size, "volume expanded");
        let info = v.info(&self.inner);
        self.inner.publish(&st);
        Ok(info)
    }
}

/// Why attached volume `name` cannot grow on this kernel, if it cannot:
/// the ublk driver lacks `UBLK_F_UPDATE_SIZE`.
fn online_refusal(name: &str, kernel: &KernelFeatures) -> Option<ControlError> {
    (!kernel.online_resize()).then(|| ControlError::OnlineExpandUnsupported {
        name: name.to_string(),
        release: kernel.release.clone(),
    })
}

/// How long an online growth waits for in-flight I/O to drain.
const GROW_QUIESCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl super::manager::Inner {
    /// Grows or checks (`step`) one replica, here or on its node.
    fn expand_replica(
        &self,
        volume: &str,
        r: &ReplicaRecord,
        size: u64,
        step: GrowStep,
    ) -> Result<(), ControlError> {
        let rules = self.rules();
        let refused = |reason: String, no_room: bool| ControlError::CannotGrow {
            volume: volume.to_string(),
            replica: r.name.clone(),
            node: r.node.clone(),
            reason,
            no_room,
        };
        if r.addr.is_empty() {
            if step != GrowStep::CheckLive {
                self.disks.forget(&r.name);
            }
            return self
                .disks
                .expand(&r.name, size, step, |d, by| {
                    disk_has_room(d, by, rules.over_provisioning, rules.min_available)
                })
                .map_err(|e| {
                    let no_room = e.errno() == libc::ENOSPC;
                    refused(e.to_string(), no_room)
                });
        }
        let op = Op::ExpandReplica {
            replica: r.name.clone(),
            size,
            over_provisioning: rules.over_provisioning,
            min_available: rules.min_available,
            step,
        };
        match self.cluster.call(&r.addr, op) {
            Ok(Op::Ok) => Ok(()),
            Ok(other) => Err(refused(format!("answered {other:?}"), false)),
            Err(e) => {
                let no_room = matches!(
                    &e,
                    crate::control::cluster::ClusterError::Peer(
                        crate::transport::PeerError::Remote {
                            errno: libc::ENOSPC,
                            ..
                        }
                    )
                );
                Err(refused(e.to_string(), no_room))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn refusal_follows_the_kernel() {
        let k = |ublk| KernelFeatures {
            release: "6.12.57+deb12-amd64".to_string(),
            ublk,
        };
        let no_resize = (libublk::sys::UBLK_F_USER_RECOVERY
            | libublk::sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
        for kernel in [k(None), k(Some(no_resize))] {
            let e = online_refusal("v1", &kernel).unwrap();
            assert!(matches!(e, ControlError::OnlineExpandUnsupported { .. }));
            let msg = "online expansion needs Linux 6.16 or newer (this kernel: 6.12.57+deb12-amd64); detach the volume first";
            assert_eq!(e.to_string(), msg);
            let st = crate::api::server::status(e);
            assert_eq!(st.code(), tonic::Code::FailedPrecondition);
            assert_eq!(st.message(), msg);
        }
        let e = online_refusal(
            "v1",
            &k(Some(no_resize | libublk::sys::UBLK_F_UPDATE_SIZE as u64)),
        );
        assert!(e.is_none(), "refused on a kernel that resizes: {e:?}");
    }
}
