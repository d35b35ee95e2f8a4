//! What the lease holder keeps in step with `cairnd`, every
//! [`MIRROR_INTERVAL`] (or the backup target's poll interval, when set):
//!
//! * **Volumes made elsewhere** (by the CSI driver, or `cairnctl`) get a
//!   `Volume` object labelled [`ADOPTED_LABEL`], so every volume is
//!   visible and manageable as an object; the PersistentVolume (and claim)
//!   that names a volume in its `csi.volumeHandle` is written into
//!   `status.kubernetesStatus`. An adopted object whose volume is gone
//!   (deleted through the CSI driver) is deleted too — never recreated.
//! * **The backup target**: one `BackupVolume` per volume found there and
//!   one `Backup` per backup (read-only mirrors, labelled with their
//!   volume); mirrors of backups no longer in the target are deleted.
//!
//! `Backup` objects themselves ([`reconcile_backup`]): one made by a user
//! with `spec.volume` takes a backup (recorded by its handle in status);
//! deleting any `Backup` deletes the backup from the target (finalizer).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_api::pb;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::ResourceExt;
use serde_json::json;
use tonic::Code;

use super::{Context, Error};
use crate::resources::{
    Backup, BackupState, BackupStatus, BackupVolume, KubernetesStatus, Volume, BACKUP_FINALIZER,
};

pub const MIRROR_INTERVAL: Duration = Duration::from_secs(60);
/// On `Volume` objects the mirror made for volumes created elsewhere.
pub const ADOPTED_LABEL: &str = "cairn.io/adopted";
/// On `Backup` objects: the volume backed up.
pub const BACKUP_VOLUME_LABEL: &str = "cairn.io/backup-volume";
/// The CSI driver's name (PersistentVolumes of other drivers are ignored).
pub const CSI_DRIVER: &str = "csi.cairn.io";
const MIRROR_MANAGER: &str = "cairn-controller-mirror";

/// One pass over volumes and the backup target.
pub async fn pass(ctx: &Context) -> Result<(), Error> {
    let started = Instant::now();
    let result = async {
        volumes(ctx).await?;
        backups(ctx).await
    }
    .await;
    ctx.metrics
        .reconciled("mirror", started.elapsed(), result.as_ref().err());
    result
}

async fn volumes(ctx: &Context) -> Result<(), Error> {
    let mut c = ctx.cairnd.client().await?;
    let live = c
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .map_err(Error::cairnd("volume list"))?
        .into_inner()
        .volumes;
    let api: Api<Volume> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let objects = api.list(&ListParams::default()).await?.items;
    let have: BTreeSet<String> = objects.iter().map(|o| o.name_any()).collect();
    let pp = PatchParams::apply(MIRROR_MANAGER).force();
    for v in live.iter().filter(|v| !have.contains(&v.name)) {
        let obj = json!({
            "apiVersion": "cairn.io/v1alpha1",
            "kind": "Volume",
            "metadata": { "name": v.name, "labels": { ADOPTED_LABEL: "true" } },
            "spec": {
                "size": v.size.to_string(),
                "numberOfReplicas": v.replicas.len(),
                "standby": v.standby,
            },
        });
        api.patch(&v.name, &pp, &Patch::Apply(&obj)).await?;
        tracing::info!(volume = %v.name, "volume made outside Kubernetes objects: Volume object added");
    }
    let names: BTreeSet<&str> = live.iter().map(|v| v.name.as_str()).collect();
    for o in &objects {
        let adopted = o.labels().get(ADOPTED_LABEL).is_some_and(|v| v == "true");
        let creating = o.status.is_none();
        if adopted
            && !creating
            && !names.contains(o.name_any().as_str())
            && o.metadata.deletion_timestamp.is_none()
        {
            api.delete(&o.name_any(), &DeleteParams::default()).await?;
            tracing::info!(volume = %o.name_any(), "adopted volume gone from cairnd: Volume object deleted");
        }
    }
    // Which PersistentVolume serves each volume.
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let served = served_by(&pvs.list(&ListParams::default()).await?.items);
    for o in &objects {
        let want = served.get(&o.name_any()).cloned();
        let have = o.status.as_ref().and_then(|s| s.kubernetes_status.clone());
        if want.is_some() && want != have {
            api.patch_status(
                &o.name_any(),
                &pp,
                &Patch::Apply(&json!({
                    "apiVersion": "cairn.io/v1alpha1",
                    "kind": "Volume",
                    "status": { "kubernetesStatus": want },
                })),
            )
            .await?;
        }
    }
    Ok(())
}

/// Volume name → the PV (and claim) whose CSI volume handle it is.
pub fn served_by(pvs: &[PersistentVolume]) -> BTreeMap<String, KubernetesStatus> {
    let mut out = BTreeMap::new();
    for pv in pvs {
        let Some(csi) = pv.spec.as_ref().and_then(|s| s.csi.as_ref()) else {
            continue;
        };
        if csi.driver != CSI_DRIVER {
            continue;
        }
        let claim = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
        out.insert(
            csi.volume_handle.clone(),
            KubernetesStatus {
                pv_name: pv.name_any(),
                pvc_name: claim.and_then(|c| c.name.clone()).unwrap_or_default(),
                namespace: claim.and_then(|c| c.namespace.clone()).unwrap_or_default(),
            },
        );
    }
    out
}

async fn backups(ctx: &Context) -> Result<(), Error> {
    let mut c = ctx.cairnd.client().await?;
    let list = match c.list_backups(pb::ListBackupsRequest::default()).await {
        Ok(r) => r.into_inner().backups,
        // No target set: nothing to mirror.
        Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::NotFound) => return Ok(()),
        Err(s) => return Err(Error::cairnd("backup list")(s)),
    };
    let pp = PatchParams::apply(MIRROR_MANAGER).force();
    let bv: Api<BackupVolume> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let mut per_volume: BTreeMap<&str, Vec<&pb::Backup>> = BTreeMap::new();
    for b in &list {
        per_volume.entry(b.volume.as_str()).or_default().push(b);
    }
    for (volume, bs) in &per_volume {
        let last = bs
            .iter()
            .filter(|b| !b.created.is_empty())
            .max_by(|a, b| a.created.cmp(&b.created));
        bv.patch(
            volume,
            &pp,
            &Patch::Apply(&json!({
                "apiVersion": "cairn.io/v1alpha1", "kind": "BackupVolume",
                "metadata": { "name": volume }, "spec": {},
            })),
        )
        .await?;
        bv.patch_status(
            volume,
            &pp,
            &Patch::Apply(&json!({
                "apiVersion": "cairn.io/v1alpha1", "kind": "BackupVolume",
                "status": {
                    "lastBackupName": last.map(|b| b.name.clone()).unwrap_or_default(),
                    "lastBackupAt": last.map(|b| b.created.clone()).unwrap_or_default(),
                    "backupCount": bs.len(),
                    "volumeSizeBytes": bs.iter().map(|b| b.volume_size).max().unwrap_or(0),
                },
            })),
        )
        .await?;
    }
    for o in bv.list(&ListParams::default()).await?.items {
        if !per_volume.contains_key(o.name_any().as_str()) {
            bv.delete(&o.name_any(), &DeleteParams::default()).await?;
        }
    }

    let api: Api<Backup> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let objects = api.list(&ListParams::default()).await?.items;
    let known: BTreeSet<String> = objects
        .iter()
        .filter_map(|o| o.status.as_ref().map(|s| s.handle.clone()))
        .filter(|h| !h.is_empty())
        .collect();
    for b in list.iter().filter(|b| !known.contains(&b.handle)) {
        api.patch(
            &b.name,
            &pp,
            &Patch::Apply(&json!({
                "apiVersion": "cairn.io/v1alpha1", "kind": "Backup",
                "metadata": { "name": b.name, "labels": { BACKUP_VOLUME_LABEL: b.volume } },
                "spec": { "volume": b.volume, "snapshot": b.snapshot },
            })),
        )
        .await?;
        api.patch_status(
            &b.name,
            &pp,
            &Patch::Apply(&json!({
                "apiVersion": "cairn.io/v1alpha1", "kind": "Backup",
                "status": backup_status(b),
            })),
        )
        .await?;
    }
    let handles: BTreeSet<&str> = list.iter().map(|b| b.handle.as_str()).collect();
    for o in &objects {
        let Some(s) = &o.status else { continue };
        if s.state == BackupState::Completed
            && !handles.contains(s.handle.as_str())
            && o.metadata.deletion_timestamp.is_none()
        {
            // Gone from the target (deleted elsewhere): the mirror goes.
            api.delete(&o.name_any(), &DeleteParams::default()).await?;
        }
    }
    Ok(())
}

pub fn backup_status(b: &pb::Backup) -> BackupStatus {
    use pb::BackupState as S;
    BackupStatus {
        state: match S::try_from(b.state).unwrap_or(S::Unspecified) {
            S::Completed => BackupState::Completed,
            S::Error => BackupState::Error,
            S::InProgress | S::Unspecified => BackupState::InProgress,
        },
        handle: b.handle.clone(),
        snapshot: b.snapshot.clone(),
        created: b.created.clone(),
        size_bytes: b.size,
        volume_size_bytes: b.volume_size,
        progress: b.progress.as_ref().map(|p| p.percent).unwrap_or(0),
        message: b.message.clone(),
    }
}

/// A `Backup` object: takes the backup a user asked for, follows it to
/// completed or error, and deletes the backup with the object.
pub async fn reconcile_backup(b: Arc<Backup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let api: Api<Backup> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let result = finalizer(&api, BACKUP_FINALIZER, b, |event| async {
        match event {
            Finalizer::Apply(b) => apply_backup(&b, &ctx).await,
            Finalizer::Cleanup(b) => cleanup_backup(&b, &ctx).await,
        }
    })
    .await
    .map_err(Error::from);
    ctx.metrics
        .reconciled("backup", started.elapsed(), result.as_ref().err());
    result
}

async fn apply_backup(b: &Backup, ctx: &Context) -> Result<Action, Error> {
    let name = b.name_any();
    let mut c = ctx.cairnd.client().await?;
    let handle = b
        .status
        .as_ref()
        .map(|s| s.handle.clone())
        .unwrap_or_default();
    let current = if handle.is_empty() {
        let made = c
            .create_backup(pb::CreateBackupRequest {
                volume: b.spec.volume.clone(),
                snapshot: b.spec.snapshot.clone().unwrap_or_default(),
                labels: b.spec.labels.clone().into_iter().collect(),
                no_wait: true,
            })
            .await;
        match made {
            Ok(r) => {
                let r = r.into_inner();
                ctx.event(
                    b,
                    false,
                    "BackupStarted",
                    format!("backup {} of volume {} started", r.handle, b.spec.volume),
                )
                .await;
                r
            }
            Err(s) => {
                let why = format!("backing up volume {}: {}", b.spec.volume, s.message());
                ctx.event(b, true, "BackupFailed", why.clone()).await;
                write_backup_status(
                    &api_of(ctx),
                    &name,
                    &BackupStatus {
                        state: BackupState::Error,
                        handle: String::new(),
                        snapshot: String::new(),
                        created: String::new(),
                        size_bytes: 0,
                        volume_size_bytes: 0,
                        progress: 0,
                        message: why.clone(),
                    },
                )
                .await?;
                return Err(Error::Invalid(why));
            }
        }
    } else {
        match c
            .get_backup(pb::BackupRef {
                handle: handle.clone(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::NotFound => return Ok(Action::requeue(MIRROR_INTERVAL)),
            Err(s) => return Err(Error::cairnd(format!("backup {handle}"))(s)),
        }
    };
    let status = backup_status(&current);
    let was = b.status.as_ref().map(|s| s.state);
    if status.state == BackupState::Error && was != Some(BackupState::Error) {
        ctx.event(
            b,
            true,
            "BackupFailed",
            format!("backup {}: {}", status.handle, status.message),
        )
        .await;
    }
    if status.state == BackupState::Completed && was == Some(BackupState::InProgress) {
        ctx.event(
            b,
            false,
            "BackupCompleted",
            format!("backup {} completed", status.handle),
        )
        .await;
    }
    let done = status.state != BackupState::InProgress;
    write_backup_status(&api_of(ctx), &name, &status).await?;
    Ok(Action::requeue(if done {
        MIRROR_INTERVAL
    } else {
        Duration::from_secs(2)
    }))
}

fn api_of(ctx: &Context) -> Api<Backup> {
    Api::namespaced(ctx.client.clone(), &ctx.namespace)
}

async fn write_backup_status(api: &Api<Backup>, name: &str, s: &BackupStatus) -> Result<(), Error> {
    api.patch_status(
        name,
        &PatchParams::apply(MIRROR_MANAGER).force(),
        &Patch::Apply(&json!({
            "apiVersion": "cairn.io/v1alpha1", "kind": "Backup", "status": s,
        })),
    )
    .await?;
    Ok(())
}

async fn cleanup_backup(b: &Backup, ctx: &Context) -> Result<Action, Error> {
    let handle = b
        .status
        .as_ref()
        .map(|s| s.handle.clone())
        .unwrap_or_default();
    if handle.is_empty() {
        return Ok(Action::await_change());
    }
    let mut c = ctx.cairnd.client().await?;
    match c
        .delete_backup(pb::BackupRef {
            handle: handle.clone(),
        })
        .await
    {
        Ok(_) => {
            ctx.event(
                b,
                false,
                "BackupDeleted",
                format!("backup {handle} deleted from the target"),
            )
            .await;
            Ok(Action::await_change())
        }
        Err(s) if s.code() == Code::NotFound => Ok(Action::await_change()),
        Err(s) => {
            ctx.event(b, true, "BackupDeleteFailed", s.message().to_string())
                .await;
            Err(Error::cairnd(format!("deleting backup {handle}"))(s))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        CSIPersistentVolumeSource, ObjectReference, PersistentVolumeSpec,
    };

    #[test]
    fn persistent_volumes_of_the_driver_name_their_volume() {
        let pv = |name: &str, driver: &str, handle: &str| PersistentVolume {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeSpec {
                csi: Some(CSIPersistentVolumeSource {
                    driver: driver.into(),
                    volume_handle: handle.into(),
                    ..Default::default()
                }),
                claim_ref: Some(ObjectReference {
                    name: Some("data-db-0".into()),
                    namespace: Some("prod".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: None,
        };
        let m = served_by(&[
            pv("pv-1", CSI_DRIVER, "pvc-1"),
            pv("pv-2", "other.csi", "pvc-2"),
        ]);
        assert_eq!(m.len(), 1);
        assert_eq!(m["pvc-1"].pv_name, "pv-1");
        assert_eq!(
            (m["pvc-1"].pvc_name.as_str(), m["pvc-1"].namespace.as_str()),
            ("data-db-0", "prod")
        );
    }
}
