//! `Volume` objects ⇄ Cairn volumes.
//!
//! * Apply (behind the [`VOLUME_FINALIZER`]): no such volume → create it
//!   from the spec; `spec.size` above the volume's → grow it; below → a
//!   Warning (volumes never shrink); the recurring jobs it carries are set
//!   to its inline list plus the `RecurringJob`s it joins by label; status
//!   is written back by server-side apply. Requeued every
//!   [`STATUS_REFRESH`] so rebuild progress and robustness stay current.
//! * Cleanup: an attached volume is not deleted — a Warning Event says
//!   where it is attached, and the finalizer stays until it is detached.
//!   Otherwise the volume is deleted (already gone is fine).
//!
//! A spec `cairnd` refuses (bad size, name, backup handle) is reported in
//! `status.message` and a Warning Event, and retried only when the object
//! changes or after [`INVALID_RETRY`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_api::pb;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::ResourceExt;
use serde_json::json;
use tonic::Code;

use super::{manager_name, Context, Error};
use crate::resources::{
    DataLocality, InlineRecurringJob, JobSchedule, RecurringJob, ReplicaMode, ReplicaStatus,
    Robustness, Volume, VolumeState, VolumeStatus, GROUP_LABEL_PREFIX, JOB_LABEL_PREFIX,
    VOLUME_FINALIZER,
};

pub const STATUS_REFRESH: Duration = Duration::from_secs(15);
pub const INVALID_RETRY: Duration = Duration::from_secs(300);

/// The controller's entry point for one `Volume`.
pub async fn reconcile(v: Arc<Volume>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let api: Api<Volume> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let result = finalizer(&api, VOLUME_FINALIZER, v, |event| async {
        match event {
            Finalizer::Apply(v) => apply(&v, &ctx).await,
            Finalizer::Cleanup(v) => cleanup(&v, &ctx).await,
        }
    })
    .await
    .map_err(Error::from);
    ctx.metrics
        .reconciled("volume", started.elapsed(), result.as_ref().err());
    result
}

/// Backoff after a failed reconcile: a spec to fix waits long, the rest
/// is retried soon.
pub fn error_policy(_v: Arc<Volume>, e: &Error, _ctx: Arc<Context>) -> Action {
    match e {
        Error::Invalid(_) => Action::requeue(INVALID_RETRY),
        _ => Action::requeue(Duration::from_secs(10)),
    }
}

/// Bytes of `spec.size` (`10Gi`, `512MiB`, `1073741824`).
pub fn spec_bytes(size: &str) -> Result<u64, Error> {
    let bytes =
        cairn_api::size::parse_size(size).map_err(|e| Error::Invalid(format!("spec.size: {e}")))?;
    if bytes == 0 || bytes % 4096 != 0 {
        return Err(Error::Invalid(format!(
            "spec.size {size:?} is {bytes} bytes: give a positive multiple of 4 KiB (e.g. 1Gi)"
        )));
    }
    Ok(bytes)
}

async fn apply(v: &Volume, ctx: &Context) -> Result<Action, Error> {
    let name = v.name_any();
    let desired = match checked(v) {
        Ok(d) => d,
        Err(e) => return refuse(v, ctx, e).await,
    };
    let jobs = desired_jobs(v, ctx).await?;
    let mut c = ctx.cairnd.client().await?;
    let current = match c.get_volume(pb::VolumeRef { name: name.clone() }).await {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == Code::NotFound && adopted(v) => {
            // Made outside these objects and deleted there (a CSI
            // DeleteVolume): never recreated; the mirror drops the object.
            return Ok(Action::requeue(STATUS_REFRESH));
        }
        Err(s) if s.code() == Code::NotFound => {
            let made = c
                .create_volume(pb::CreateVolumeRequest {
                    name: name.clone(),
                    size: desired,
                    replicas: v.spec.number_of_replicas.unwrap_or(0),
                    from_backup: v.spec.from_backup.clone().unwrap_or_default(),
                    standby: v.spec.standby,
                    recurring_jobs: jobs.clone(),
                    node: v.spec.node.clone().unwrap_or_default(),
                    ..Default::default()
                })
                .await;
            match made {
                Ok(r) => {
                    let made = r.into_inner();
                    ctx.event(
                        v,
                        false,
                        "Created",
                        format!(
                            "volume {name} created on {} with {} replicas",
                            made.owner,
                            made.replicas.len()
                        ),
                    )
                    .await;
                    made
                }
                Err(s)
                    if matches!(
                        s.code(),
                        Code::InvalidArgument | Code::NotFound | Code::OutOfRange
                    ) =>
                {
                    return refuse(
                        v,
                        ctx,
                        Error::Invalid(format!("creating volume {name}: {}", s.message())),
                    )
                    .await
                }
                Err(s) => return Err(Error::cairnd(format!("creating volume {name}"))(s)),
            }
        }
        Err(s) => return Err(Error::cairnd(format!("volume {name}"))(s)),
    };
    let mut current = current;
    let mut message = String::new();
    if desired > current.size {
        match c
            .expand_volume(pb::ExpandVolumeRequest {
                name: name.clone(),
                size: desired,
            })
            .await
        {
            Ok(r) => {
                ctx.event(
                    v,
                    false,
                    "Expanded",
                    format!(
                        "volume {name} grown from {} to {desired} bytes",
                        current.size
                    ),
                )
                .await;
                current = r.into_inner();
            }
            Err(s) => {
                // E.g. attached on a kernel without live resize: stays
                // asked until it is detached.
                message = format!("growing to {desired} bytes: {}", s.message());
                ctx.event(v, true, "ExpandFailed", message.clone()).await;
            }
        }
    } else if desired < current.size {
        message = format!(
            "spec.size {} is below the volume's {} bytes: volumes never shrink; set it back",
            v.spec.size, current.size
        );
        ctx.event(v, true, "ShrinkRefused", message.clone()).await;
    }
    if same_jobs(&jobs, &current.recurring_jobs) == Some(false) {
        current = c
            .set_recurring_jobs(pb::SetRecurringJobsRequest {
                volume: name.clone(),
                jobs: jobs.clone(),
            })
            .await
            .map_err(Error::cairnd(format!("recurring jobs of {name}")))?
            .into_inner();
    }
    let mut status = status_of(&current);
    for (reason, note) in rebuild_events(v.status.as_ref(), &status) {
        ctx.event(v, false, reason, note).await;
    }
    status.message = if message.is_empty() {
        current.message.clone()
    } else {
        message
    };
    status.observed_generation = v.metadata.generation;
    write_status(v, ctx, &status).await?;
    Ok(Action::requeue(STATUS_REFRESH))
}

/// Whether the mirror made this object for a volume made elsewhere.
fn adopted(v: &Volume) -> bool {
    v.labels()
        .get(super::mirror::ADOPTED_LABEL)
        .is_some_and(|l| l == "true")
}

/// The spec's size, after the checks a schema cannot make.
fn checked(v: &Volume) -> Result<u64, Error> {
    let name = v.name_any();
    cairn_api::name::validate_volume_name(&name)
        .map_err(|e| Error::Invalid(format!("metadata.name: {e}")))?;
    if v.spec.data_locality == DataLocality::BestEffort && v.spec.node.is_none() {
        tracing::debug!(volume = %name, "dataLocality best-effort without spec.node: placed as usual");
    }
    spec_bytes(&v.spec.size)
}

/// Reports a spec that cannot be applied: status and a Warning Event.
async fn refuse(v: &Volume, ctx: &Context, e: Error) -> Result<Action, Error> {
    let message = e.to_string();
    ctx.event(v, true, "InvalidSpec", message.clone()).await;
    let status = VolumeStatus {
        state: VolumeState::Pending,
        robustness: Robustness::Unknown,
        size_bytes: 0,
        owner_node: String::new(),
        device: String::new(),
        replicas: Vec::new(),
        last_backup: String::new(),
        message,
        kubernetes_status: None,
        conditions: Vec::new(),
        observed_generation: v.metadata.generation,
    };
    write_status(v, ctx, &status).await?;
    Err(e)
}

async fn cleanup(v: &Volume, ctx: &Context) -> Result<Action, Error> {
    let name = v.name_any();
    let mut c = ctx.cairnd.client().await?;
    let current = match c.get_volume(pb::VolumeRef { name: name.clone() }).await {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == Code::NotFound => return Ok(Action::await_change()),
        Err(s) => return Err(Error::cairnd(format!("volume {name}"))(s)),
    };
    if !current.device.is_empty() {
        let why = format!(
            "volume {name} is attached on {} ({}): not deleted; detach it (stop the pod using it) and the deletion goes on",
            current.owner, current.device
        );
        ctx.event(v, true, "DeleteRefused", why.clone()).await;
        return Err(Error::Refused(why));
    }
    match c
        .delete_volume(pb::DeleteVolumeRequest {
            name: name.clone(),
            force: false,
        })
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == Code::NotFound => {}
        Err(s) => {
            ctx.event(v, true, "DeleteFailed", s.message().to_string())
                .await;
            return Err(Error::cairnd(format!("deleting volume {name}"))(s));
        }
    }
    ctx.event(v, false, "Deleted", format!("volume {name} deleted"))
        .await;
    Ok(Action::await_change())
}

/// Events for replicas whose rebuild started or finished since `before`.
pub fn rebuild_events(
    before: Option<&VolumeStatus>,
    now: &VolumeStatus,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for r in &now.replicas {
        let was = before.and_then(|b| {
            b.replicas.iter().find(|p| {
                p.name == r.name || (p.node == r.node && p.mode == ReplicaMode::Rebuilding)
            })
        });
        let was_mode = was.map(|p| p.mode);
        match (was_mode, r.mode) {
            (Some(ReplicaMode::Rebuilding), ReplicaMode::Healthy) => out.push((
                "RebuildFinished",
                format!(
                    "replica {} on {} rebuilt and back in the I/O set",
                    r.name, r.node
                ),
            )),
            (Some(m), ReplicaMode::Rebuilding) if m != ReplicaMode::Rebuilding => out.push((
                "RebuildStarted",
                format!("rebuilding replica {} on {}", r.name, r.node),
            )),
            (None, ReplicaMode::Rebuilding) if before.is_some() => out.push((
                "RebuildStarted",
                format!("rebuilding replica {} on {}", r.name, r.node),
            )),
            (Some(m), ReplicaMode::Failed) if m != ReplicaMode::Failed => out.push((
                "ReplicaFailed",
                format!("replica {} on {} failed: {}", r.name, r.node, r.message),
            )),
            _ => {}
        }
    }
    out
}

/// The status of a volume as `cairnd` reports it.
pub fn status_of(v: &pb::Volume) -> VolumeStatus {
    use pb::VolumeState as S;
    let (state, robustness) = match S::try_from(v.state).unwrap_or(S::Unspecified) {
        S::Detached => (VolumeState::Detached, Robustness::Unknown),
        S::Healthy => (VolumeState::Attached, Robustness::Healthy),
        S::Degraded => (VolumeState::Attached, Robustness::Degraded),
        S::Faulted => (VolumeState::Attached, Robustness::Faulted),
        S::Fenced => (VolumeState::Fenced, Robustness::Unknown),
        S::Unspecified => (VolumeState::Pending, Robustness::Unknown),
    };
    let replicas = v
        .replicas
        .iter()
        .map(|r| {
            use pb::ReplicaState as R;
            ReplicaStatus {
                name: r.name.clone(),
                node: r.node.clone(),
                mode: match R::try_from(r.state).unwrap_or(R::Unspecified) {
                    R::Healthy => ReplicaMode::Healthy,
                    R::Rebuilding => ReplicaMode::Rebuilding,
                    R::Failed => ReplicaMode::Failed,
                    R::Unspecified => ReplicaMode::Unknown,
                },
                rebuild_progress: r.rebuild.as_ref().map(|p| p.percent),
                message: r.message.clone(),
            }
        })
        .collect();
    VolumeStatus {
        state,
        robustness,
        size_bytes: v.size,
        owner_node: v.owner.clone(),
        device: v.device.clone(),
        replicas,
        last_backup: v.last_backup.clone(),
        message: v.message.clone(),
        kubernetes_status: None,
        conditions: Vec::new(),
        observed_generation: None,
    }
}

async fn write_status(v: &Volume, ctx: &Context, status: &VolumeStatus) -> Result<(), Error> {
    let api: Api<Volume> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let patch = json!({
        "apiVersion": "cairn.io/v1alpha1",
        "kind": "Volume",
        "status": status,
    });
    api.patch_status(
        &v.name_any(),
        &PatchParams::apply(&manager_name(&ctx.node)).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// The recurring jobs a volume carries, as the JSON `cairnd` takes: its
/// inline list, then every `RecurringJob` it joins by label (by name or by
/// one of the job's groups), sorted by name; an inline job wins a name
/// clash.
async fn desired_jobs(v: &Volume, ctx: &Context) -> Result<String, Error> {
    let labels = v.labels();
    let joins = labels.iter().any(|(k, val)| {
        val == "enabled" && (k.starts_with(JOB_LABEL_PREFIX) || k.starts_with(GROUP_LABEL_PREFIX))
    });
    let listed = if joins {
        let api: Api<RecurringJob> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
        api.list(&ListParams::default()).await?.items
    } else {
        Vec::new()
    };
    jobs_json(&v.spec.recurring_jobs, labels, &listed)
}

/// The recurring jobs of a volume without the API: the jobs `labels` select among `jobs`, and the inline ones.
pub fn jobs_json(
    inline: &[InlineRecurringJob],
    labels: &BTreeMap<String, String>,
    jobs: &[RecurringJob],
) -> Result<String, Error> {
    let enabled = |key: String| labels.get(&key).is_some_and(|v| v == "enabled");
    let mut out: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for j in jobs {
        let name = j.name_any();
        let selected = enabled(format!("{JOB_LABEL_PREFIX}{name}"))
            || j.spec
                .groups
                .iter()
                .any(|g| enabled(format!("{GROUP_LABEL_PREFIX}{g}")));
        if selected {
            out.insert(
                name.clone(),
                job_value(&name, &j.spec.schedule, &j.spec.groups)?,
            );
        }
    }
    for j in inline {
        out.insert(j.name.clone(), job_value(&j.name, &j.schedule, &[])?);
    }
    if out.is_empty() {
        return Ok(String::new());
    }
    Ok(serde_json::to_string(
        &out.into_values().collect::<Vec<_>>(),
    )?)
}

fn job_value(name: &str, s: &JobSchedule, groups: &[String]) -> Result<serde_json::Value, Error> {
    let mut v = serde_json::to_value(s)?;
    v["name"] = json!(name);
    if !groups.is_empty() {
        v["groups"] = json!(groups);
    }
    Ok(v)
}

/// Whether two job lists (JSON) are the same jobs; `None` when `current`
/// cannot be read (then it is set again).
fn same_jobs(want: &str, current: &str) -> Option<bool> {
    let parse = |s: &str| -> Option<Vec<serde_json::Value>> {
        if s.trim().is_empty() {
            return Some(Vec::new());
        }
        let mut v: Vec<serde_json::Value> = serde_json::from_str(s).ok()?;
        for j in &mut v {
            // cairnd writes defaults out; compare what both name.
            if let Some(o) = j.as_object_mut() {
                o.retain(|_, val| !(val.is_null() || val == &json!([]) || val == &json!({})));
            }
        }
        v.sort_by_key(|j| j["name"].as_str().unwrap_or_default().to_string());
        Some(v)
    };
    match (parse(want), parse(current)) {
        (Some(a), Some(b)) => Some(a == b),
        _ => Some(false),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::resources::{JobTask, RecurringJobSpec};

    #[test]
    fn sizes_are_bytes_or_binary_units_in_4k_steps() {
        assert_eq!(spec_bytes("1Gi").unwrap(), 1 << 30);
        assert_eq!(spec_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(spec_bytes("8192").unwrap(), 8192);
        for bad in ["0", "1000", "1Gx", "", "-1Gi"] {
            let e = spec_bytes(bad).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{bad}");
            assert!(e.to_string().contains("spec.size"), "{e}");
        }
    }

    fn job(name: &str, groups: &[&str]) -> RecurringJob {
        RecurringJob::new(
            name,
            RecurringJobSpec {
                schedule: JobSchedule {
                    task: JobTask::Snapshot,
                    cron: "0 * * * *".into(),
                    retain: 3,
                    concurrency: 1,
                    labels: BTreeMap::new(),
                },
                groups: groups.iter().map(|g| g.to_string()).collect(),
            },
        )
    }

    #[test]
    fn volumes_join_jobs_by_name_or_group_label() {
        let jobs = [
            job("hourly", &[]),
            job("nightly", &["default"]),
            job("other", &[]),
        ];
        let labels = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let names = |json: String| -> Vec<String> {
            if json.is_empty() {
                return Vec::new();
            }
            let v: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
            v.iter()
                .map(|j| j["name"].as_str().unwrap().to_string())
                .collect()
        };
        let none = jobs_json(&[], &labels(&[]), &jobs).unwrap();
        assert!(none.is_empty());
        let by_name = jobs_json(
            &[],
            &labels(&[("recurring-job.cairn.io/hourly", "enabled")]),
            &jobs,
        )
        .unwrap();
        assert_eq!(names(by_name.clone()), ["hourly"]);
        let v: Vec<serde_json::Value> = serde_json::from_str(&by_name).unwrap();
        assert_eq!(v[0]["task"], "snapshot");
        assert_eq!(v[0]["cron"], "0 * * * *");
        assert_eq!(v[0]["retain"], 3);
        let by_group = jobs_json(
            &[],
            &labels(&[
                ("recurring-job-group.cairn.io/default", "enabled"),
                ("recurring-job.cairn.io/other", "disabled"),
            ]),
            &jobs,
        )
        .unwrap();
        assert_eq!(names(by_group), ["nightly"]);
        let inline = [InlineRecurringJob {
            name: "hourly".into(),
            schedule: JobSchedule {
                task: JobTask::Backup,
                cron: "5 * * * *".into(),
                retain: 1,
                concurrency: 2,
                labels: BTreeMap::new(),
            },
        }];
        let both = jobs_json(
            &inline,
            &labels(&[("recurring-job.cairn.io/hourly", "enabled")]),
            &jobs,
        )
        .unwrap();
        let v: Vec<serde_json::Value> = serde_json::from_str(&both).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0]["task"], "backup", "the inline job wins");
        assert_eq!(same_jobs(&both, &both), Some(true));
        assert_eq!(same_jobs(&both, ""), Some(false));
        assert_eq!(same_jobs("", ""), Some(true));
    }

    #[test]
    fn rebuilds_starting_and_finishing_are_events() {
        let replica = |name: &str, node: &str, mode| ReplicaStatus {
            name: name.into(),
            node: node.into(),
            mode,
            rebuild_progress: None,
            message: String::new(),
        };
        let status = |replicas| VolumeStatus {
            state: VolumeState::Attached,
            robustness: Robustness::Degraded,
            size_bytes: 0,
            owner_node: "n1".into(),
            device: String::new(),
            replicas,
            last_backup: String::new(),
            message: String::new(),
            kubernetes_status: None,
            conditions: Vec::new(),
            observed_generation: None,
        };
        let healthy = status(vec![
            replica("r1", "n1", ReplicaMode::Healthy),
            replica("r2", "n2", ReplicaMode::Healthy),
        ]);
        let failed = status(vec![
            replica("r1", "n1", ReplicaMode::Healthy),
            replica("r2", "n2", ReplicaMode::Failed),
        ]);
        // A replacement on n3 (a new name) rebuilding.
        let rebuilding = status(vec![
            replica("r1", "n1", ReplicaMode::Healthy),
            replica("r3", "n3", ReplicaMode::Rebuilding),
        ]);
        let rebuilt = status(vec![
            replica("r1", "n1", ReplicaMode::Healthy),
            replica("r3", "n3", ReplicaMode::Healthy),
        ]);
        let reasons = |a: Option<&VolumeStatus>, b: &VolumeStatus| -> Vec<&'static str> {
            rebuild_events(a, b).into_iter().map(|(r, _)| r).collect()
        };
        assert!(reasons(None, &healthy).is_empty());
        assert_eq!(reasons(Some(&healthy), &failed), ["ReplicaFailed"]);
        assert_eq!(reasons(Some(&failed), &rebuilding), ["RebuildStarted"]);
        assert!(reasons(Some(&rebuilding), &rebuilding).is_empty());
        assert_eq!(reasons(Some(&rebuilding), &rebuilt), ["RebuildFinished"]);
        assert!(reasons(Some(&rebuilt), &rebuilt).is_empty());
    }

    #[test]
    fn status_maps_cairnd_states() {
        let v = pb::Volume {
            name: "v".into(),
            state: pb::VolumeState::Degraded as i32,
            size: 1 << 20,
            owner: "n2".into(),
            device: "/dev/ublkb0".into(),
            replicas: vec![pb::Replica {
                name: "v-r1".into(),
                node: "n1".into(),
                state: pb::ReplicaState::Rebuilding as i32,
                rebuild: Some(pb::Rebuild {
                    percent: 42,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let s = status_of(&v);
        assert_eq!(
            (s.state, s.robustness),
            (VolumeState::Attached, Robustness::Degraded)
        );
        assert_eq!(s.owner_node, "n2");
        assert_eq!(s.replicas[0].mode, ReplicaMode::Rebuilding);
        assert_eq!(s.replicas[0].rebuild_progress, Some(42));
    }
}
