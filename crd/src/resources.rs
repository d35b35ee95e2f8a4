//! The custom resources of group `cairn.io`, version [`VERSION`]; all
//! namespaced (the install namespace), each with a `status` subresource and
//! printer columns. `crdgen` writes their CRDs to
//! `deploy/helm/cairn/crds/cairn.io.yaml`; a test fails when that file
//! drifts from these types.
//!
//! What the OpenAPI schema can refuse at admission it refuses (sizes,
//! replica counts, tasks, URL schemes, cron field counts); the rest is
//! checked by `cairnd` and reported in `status`.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group.
pub const GROUP: &str = "cairn.io";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
/// The finalizer of a `Volume`: the volume is deleted before the object.
pub const VOLUME_FINALIZER: &str = "cairn.io/volume";
/// The finalizer of a `Backup`: the backup is deleted from the target.
pub const BACKUP_FINALIZER: &str = "cairn.io/backup";
/// A volume joins the recurring job `NAME` with the label
/// `recurring-job.cairn.io/NAME: enabled` (Longhorn's convention).
pub const JOB_LABEL_PREFIX: &str = "recurring-job.cairn.io/";
/// A volume joins every recurring job of group `G` with the label
/// `recurring-job-group.cairn.io/G: enabled`.
pub const GROUP_LABEL_PREFIX: &str = "recurring-job-group.cairn.io/";

/// A condition, as Kubernetes objects carry them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// E.g. `Ready`, `Scheduled`, `Restored`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_transition_time: String,
}

// ---------------------------------------------------------------- Volume

/// Where a volume's replicas go relative to the node that uses it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DataLocality {
    #[default]
    Disabled,
    /// Made on `spec.node` (its owner), with a replica there when one fits.
    BestEffort,
}

/// A replicated block volume. Creating the object creates the volume;
/// raising `spec.size` grows it (online where the kernel allows); deleting
/// the object deletes the volume (refused while it is attached).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cairn.io",
    version = "v1alpha1",
    kind = "Volume",
    namespaced,
    status = "VolumeStatus",
    shortname = "cvol",
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Robustness","type":"string","jsonPath":".status.robustness"}"#,
    printcolumn = r#"{"name":"Size","type":"string","jsonPath":".spec.size"}"#,
    printcolumn = r#"{"name":"Owner","type":"string","jsonPath":".status.ownerNode"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSpec {
    /// Bytes, or a number with a binary unit (`Ki`, `Mi`, `Gi`, `Ti`, or
    /// `KiB`…); a multiple of 4 KiB. Raise it to grow the volume; it never
    /// shrinks.
    #[schemars(regex(pattern = r"^[0-9]+(Ki|Mi|Gi|Ti|KiB|MiB|GiB|TiB)?$"))]
    pub size: String,
    /// Replicas, each on a different node (hard anti-affinity by default).
    /// Unset: cairnd's default (3, fewer on a smaller cluster). Fixed at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 8))]
    pub number_of_replicas: Option<u32>,
    /// Minutes; accepted for Longhorn manifests. Cairn applies the
    /// cluster-wide `stale-replica-timeout` setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub stale_replica_timeout: Option<u32>,
    /// `bak://VOLUME/BACKUP`: the volume is made as a restore of that
    /// backup; with `standby`, `bak://VOLUME`: a DR volume following it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(bak|bs)://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[-A-Za-z0-9_.]+)?$"))]
    pub from_backup: Option<String>,
    /// A DR volume: follows `fromBackup`'s backup volume until activated.
    #[serde(default)]
    pub standby: bool,
    #[serde(default)]
    pub data_locality: DataLocality,
    /// The node to make the volume on (its first owner). With
    /// `dataLocality: best-effort` a replica goes there when one fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Recurring jobs of this volume alone (Longhorn's StorageClass
    /// `recurringJobs` list), besides the `RecurringJob` objects it joins by
    /// label.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recurring_jobs: Vec<InlineRecurringJob>,
}

/// The state of a volume, as `kubectl get` shows it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeState {
    /// Not made yet (or the spec is refused: see `message`).
    Pending,
    Detached,
    Attached,
    /// Another node's engine took the replicas over; detach it here.
    Fenced,
    Deleting,
}

/// Whether a volume's data is safe.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Robustness {
    /// Every replica in the I/O set.
    Healthy,
    /// Serving with fewer replicas than it has (some rebuild).
    Degraded,
    /// No healthy replica: I/O fails.
    Faulted,
    /// Detached: not known until attached.
    Unknown,
}

/// A replica's state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaMode {
    Healthy,
    Rebuilding,
    Failed,
    Unknown,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    pub name: String,
    pub node: String,
    pub mode: ReplicaMode,
    /// Percent copied while a rebuild onto it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild_progress: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// The PersistentVolume (and claim) a volume serves, when the CSI driver
/// made it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesStatus {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pv_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pvc_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    pub state: VolumeState,
    pub robustness: Robustness,
    /// The volume's size in bytes now (grows after `spec.size`).
    #[serde(default)]
    pub size_bytes: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner_node: String,
    /// `/dev/ublkbN` while attached.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub device: String,
    #[serde(default)]
    pub replicas: Vec<ReplicaStatus>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_backup: String,
    /// Why the spec is not (yet) applied, or the last state change.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_status: Option<KubernetesStatus>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

// ------------------------------------------------------------------ Node

/// A Cairn node: one per Kubernetes node running `cairnd`, published by
/// that node's controller (and removed with the Kubernetes node, whose
/// object owns it).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "cairn.io",
    version = "v1alpha1",
    kind = "Node",
    namespaced,
    status = "NodeStatus",
    shortname = "cnode",
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".status.replicaAddress"}"#,
    printcolumn = r#"{"name":"Schedulable","type":"boolean","jsonPath":".status.allowScheduling"}"#,
    printcolumn = r#"{"name":"Kernel","type":"string","jsonPath":".status.kernel"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    /// New replicas may be placed on this node (default true). Replicas
    /// already here stay and keep serving; evicting them is not built yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_scheduling: Option<bool>,
    /// Paths of this node's disks that take no new replicas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unschedulable_disks: Vec<String>,
}

impl NodeSpec {
    /// Whether the spec lets new replicas onto this node.
    pub fn allows_scheduling(&self) -> bool {
        self.allow_scheduling.unwrap_or(true)
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum NodeState {
    Up,
    Down,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskStatus {
    pub path: String,
    pub size_bytes: u64,
    pub available_bytes: u64,
    /// Volume bytes promised by its replicas.
    pub allocated_bytes: u64,
    pub replicas: u32,
    /// New replicas may go here (node and disk schedulable, space rules met).
    pub schedulable: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub state: NodeState,
    /// Where peers reach this node's replica server (HOST:PORT).
    pub replica_address: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kernel: String,
    /// Empty when the ublk driver is present; otherwise how to load it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ublk_status: String,
    /// The kernel resizes live ublk devices (Linux 6.16+).
    #[serde(default)]
    pub online_expansion: bool,
    /// `cairnd`'s scheduling rule now (`spec.allowScheduling` once applied).
    #[serde(default = "yes")]
    pub allow_scheduling: bool,
    #[serde(default)]
    pub disks: Vec<DiskStatus>,
    /// Why the spec could not be applied, when it could not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

fn yes() -> bool {
    true
}

// --------------------------------------------------------------- Setting

/// One `cairnd` setting (the README's table); `metadata.name` is the
/// setting's name. Every node's controller applies it to its `cairnd`; a
/// bad value is refused there, changes nothing, and `status` says why.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cairn.io",
    version = "v1alpha1",
    kind = "Setting",
    namespaced,
    status = "SettingStatus",
    shortname = "csetting",
    printcolumn = r#"{"name":"Value","type":"string","jsonPath":".spec.value"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SettingSpec {
    pub value: String,
}

/// How one node took a setting (or the backup target).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeApplied {
    pub node: String,
    pub applied: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SettingStatus {
    /// One entry per node, each written by that node's controller.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<NodeApplied>,
}

// ---------------------------------------------------------- BackupTarget

/// Where backups go: the object named `default` is applied to every node
/// (settings `backup-target`, `backup-target-credential-secret`,
/// `backupstore-poll-interval`).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cairn.io",
    version = "v1alpha1",
    kind = "BackupTarget",
    namespaced,
    status = "BackupTargetStatus",
    shortname = "cbt",
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".spec.url"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackupTargetSpec {
    /// `s3://BUCKET@REGION/PATH`, `nfs://HOST:/PATH` or `file:///PATH`.
    #[schemars(regex(pattern = r"^(s3://[^/@]+@[^/]+/.*|nfs://.+|file:///.*)$"))]
    pub url: String,
    /// A Secret in this namespace with the S3 keys (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINTS`, `AWS_CERT`, …, as Longhorn's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_secret: Option<String>,
    /// Seconds between polls of the target (DR volumes, `Backup` mirrors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub poll_interval: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupTargetStatus {
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<NodeApplied>,
}

// ------------------------------------------------- BackupVolume, Backup

/// A volume in the backup target: a read-only mirror, refreshed on the
/// poll interval.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "cairn.io",
    version = "v1alpha1",
    kind = "BackupVolume",
    namespaced,
    status = "BackupVolumeStatus",
    shortname = "cbv",
    printcolumn = r#"{"name":"Last Backup","type":"string","jsonPath":".status.lastBackupName"}"#,
    printcolumn = r#"{"name":"Backups","type":"integer","jsonPath":".status.backupCount"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackupVolumeSpec {}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupVolumeStatus {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_backup_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_backup_at: String,
    #[serde(default)]
    pub backup_count: u32,
    /// The volume's size in the target (the least a restore needs).
    #[serde(default)]
    pub volume_size_bytes: u64,
}

/// A backup in the target. Mirrors are made for every backup found there;
/// creating one with `spec.volume` takes a backup of that volume; deleting
/// one deletes the backup from the target.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cairn.io",
    version = "v1alpha1",
    kind = "Backup",
    namespaced,
    status = "BackupStatus",
    shortname = "cbak",
    printcolumn = r#"{"name":"Volume","type":"string","jsonPath":".spec.volume"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Size","type":"integer","jsonPath":".status.sizeBytes"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// The volume backed up.
    #[schemars(length(min = 1, max = 63))]
    pub volume: String,
    /// The snapshot to back up; unset: a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BackupState {
    InProgress,
    Completed,
    Error,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    pub state: BackupState,
    /// `bak://VOLUME/BACKUP`: what `fromBackup` and VolumeSnapshotContents
    /// name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub handle: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub snapshot: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub created: String,
    #[serde(default)]
    pub size_bytes: u64,
    #[serde(default)]
    pub volume_size_bytes: u64,
    #[serde(default)]
    pub progress: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

// ---------------------------------------------------------- RecurringJob

/// What a recurring job does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum JobTask {
    /// A snapshot, when the volume has new data.
    Snapshot,
    /// A snapshot even without new data.
    SnapshotForceCreate,
    /// A backup, when the volume has new data.
    Backup,
    BackupForceCreate,
}

/// A recurring job's schedule and retention (Longhorn's fields).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobSchedule {
    pub task: JobTask,
    /// Five cron fields (minute hour day-of-month month day-of-week), UTC.
    #[schemars(regex(pattern = r"^\s*\S+\s+\S+\s+\S+\s+\S+\s+\S+\s*$"))]
    pub cron: String,
    /// Snapshots or backups of this job kept per volume.
    #[schemars(range(min = 1, max = 250))]
    pub retain: u32,
    /// Volumes the job works on at once.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 100))]
    pub concurrency: u32,
    /// Labels put on each snapshot or backup made.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn one() -> u32 {
    1
}

/// A job listed in a `Volume`'s spec.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InlineRecurringJob {
    #[schemars(length(min = 1, max = 40))]
    pub name: String,
    #[serde(flatten)]
    pub schedule: JobSchedule,
}

/// A recurring job; `metadata.name` is its name. Volumes join it with the
/// label `recurring-job.cairn.io/NAME: enabled`, or through one of its
/// `groups` with `recurring-job-group.cairn.io/GROUP: enabled`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "cairn.io",
    version = "v1alpha1",
    kind = "RecurringJob",
    namespaced,
    status = "RecurringJobStatus",
    shortname = "crj",
    printcolumn = r#"{"name":"Task","type":"string","jsonPath":".spec.task"}"#,
    printcolumn = r#"{"name":"Cron","type":"string","jsonPath":".spec.cron"}"#,
    printcolumn = r#"{"name":"Retain","type":"integer","jsonPath":".spec.retain"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RecurringJobSpec {
    #[serde(flatten)]
    pub schedule: JobSchedule,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecurringJobStatus {
    /// The volumes that carry the job now.
    #[serde(default)]
    pub volumes: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// Every CRD, in the order `crdgen` writes them.
pub fn crds(
) -> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![
        Volume::crd(),
        Node::crd(),
        Setting::crd(),
        BackupTarget::crd(),
        BackupVolume::crd(),
        Backup::crd(),
        RecurringJob::crd(),
    ]
}

/// The CRDs as one YAML stream (what `crdgen` prints).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out =
        String::from("# Generated by `cargo run -p cairn-crd --bin crdgen`; do not edit.\n");
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
