//! `volume expand`: growing a detached volume (every replica, then the
//! record). Online expansion (resizing a live `/dev/ublkbN` with
//! `UBLK_CMD_UPDATE_SIZE`, Linux 6.16+) is not built: an attached volume is
//! refused, changing nothing. The refusal depends on the running kernel,
//! read at run time ([`KernelFeatures`]): without `UBLK_F_UPDATE_SIZE` it
//! says which Linux is needed ([`ControlError::OnlineExpandUnsupported`]);
//! with it, that online expansion is not built yet. Both say to detach.
//!
//! Every replica is checked first (reachable, not open, its disk takes the
//! growth under the placement rules); only then does any grow, so a refusal
//! changes nothing. Growing is idempotent per replica: if one fails midway
//! (a node dies between the check and the growth), running the command
//! again completes it, and the record keeps the old size until every
//! replica has the new one.

use super::store::ReplicaRecord;
use super::{ControlError, VolumeInfo, VolumeManager};
use crate::disks::disk_fits;
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
        if v.live.is_some() {
            // One control command to the ublk driver (and uname).
            let kernel = tokio::task::spawn_blocking(KernelFeatures::detect).await?;
            return Err(online_refusal(name, &kernel));
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
        tokio::task::spawn_blocking(move || {
            // Every replica must take it before any grows.
            for r in &replicas {
                inner.expand_replica(&volume, r, size, true)?;
            }
            for r in &replicas {
                inner.expand_replica(&volume, r, size, false)?;
            }
            Ok::<(), ControlError>(())
        })
        .await??;
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

/// Why attached volume `name` cannot grow on this kernel: it lacks
/// `UBLK_F_UPDATE_SIZE`, or it has it and online expansion is not built.
fn online_refusal(name: &str, kernel: &KernelFeatures) -> ControlError {
    if kernel.online_resize() {
        ControlError::MustDetach {
            name: name.to_string(),
            what: "expand it (online expansion is not built yet, also on kernels with UBLK_F_UPDATE_SIZE like this one)",
        }
    } else {
        ControlError::OnlineExpandUnsupported {
            name: name.to_string(),
            release: kernel.release.clone(),
        }
    }
}

impl super::manager::Inner {
    /// Grows (or with `check_only` checks) one replica, here or on its node.
    fn expand_replica(
        &self,
        volume: &str,
        r: &ReplicaRecord,
        size: u64,
        check_only: bool,
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
            self.disks.forget(&r.name);
            return self
                .disks
                .expand(&r.name, size, check_only, |d, by| {
                    disk_fits(d, by, rules.over_provisioning, rules.min_available)
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
            check_only,
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
    fn refusal_follows_the_kernel() {
        let k = |ublk| KernelFeatures {
            release: "6.12.57+deb12-amd64".to_string(),
            ublk,
        };
        let no_resize = (libublk::sys::UBLK_F_USER_RECOVERY
            | libublk::sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
        for kernel in [k(None), k(Some(no_resize))] {
            let e = online_refusal("v1", &kernel);
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
        assert!(matches!(e, ControlError::MustDetach { .. }));
        let msg = e.to_string();
        assert!(msg.contains("detach it before you expand it"), "{msg}");
        assert!(msg.contains("not built yet"), "{msg}");
    }
}
