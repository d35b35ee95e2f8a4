//! `ControlError`: every way a control-plane request can fail. The API maps it
//! to a gRPC status in one place (`api::server`); messages are what the
//! operator reads on one line, so each says what to do next.

use std::path::PathBuf;

use crate::engine::EngineError;
use crate::frontend::FrontendError;
use crate::name::NameError;
use crate::replica::{ReplicaError, BLOCK_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error("size is zero: give a size such as 1GiB")]
    ZeroSize,
    #[error("size {size} is not a multiple of {BLOCK_SIZE} bytes: round it to e.g. 4KiB/1MiB")]
    UnalignedSize { size: u64 },
    #[error("volume {volume:?} wants {wanted} replicas but this node has {disks} disk{}: lower --replicas or start cairnd with more --disk", if *.disks == 1 { "" } else { "s" })]
    NotEnoughDisks {
        volume: String,
        wanted: u32,
        disks: usize,
    },
    #[error("volume {volume:?} wants {wanted} replicas but only {schedulable} of this node's {disks} disks take new replicas: lower --replicas or allow scheduling again (`cairnctl node scheduling`)")]
    NotEnoughSchedulableDisks {
        volume: String,
        wanted: u32,
        schedulable: usize,
        disks: usize,
    },
    #[error("volume {volume:?} wants {wanted} replicas but only {eligible} nodes can take one{}{}{}",
        if *.soft { " (soft anti-affinity: one per fitting disk)" } else { " (hard anti-affinity: one per node)" },
        if *.no_room > 0 { format!("; {no_room} up node(s) have no disk with room for {size} more bytes (see free space in `cairnctl node list`, settings storage-over-provisioning-percentage and storage-minimal-available-percentage)") } else { String::new() },
        if *.down > 0 { format!("; {down} node(s) are down") } else { String::new() })]
    NotEnoughNodes {
        volume: String,
        wanted: u32,
        eligible: usize,
        soft: bool,
        /// Bytes each new replica needs.
        size: u64,
        /// Nodes without a replica of the volume that are up but have no
        /// disk passing the scheduling rule.
        no_room: usize,
        /// Nodes without a replica of the volume that are down.
        down: usize,
    },
    #[error(transparent)]
    Setting(#[from] super::settings::SettingError),
    #[error("cluster secret: {0}")]
    Secret(String),
    #[error("node {node} still holds replicas of volume {volume:?}: move them first (fail them and let them be replaced)")]
    NodeInUse { node: String, volume: String },
    #[error("{path:?} is not a disk of this node ({}): name one of them", disks.join(", "))]
    UnknownDisk { path: String, disks: Vec<String> },
    #[error("no replica of volume {volume:?} found on this node or any reachable peer: check the name and that the nodes are up (`cairnctl node list`)")]
    NothingToAdopt { volume: String },
    #[error(transparent)]
    Cluster(#[from] super::cluster::ClusterError),
    #[error(transparent)]
    Disk(#[from] crate::disks::DiskError),
    #[error("volume {volume:?} needs at least 1 replica: pass --replicas 1 or more")]
    ZeroReplicas { volume: String },
    #[error(
        "volume {volume:?} wants {wanted} replicas, at most {max} are supported: lower --replicas"
    )]
    TooManyReplicas {
        volume: String,
        wanted: u32,
        max: usize,
    },
    #[error("volume {volume:?} was taken over by another node ({reason}); this node dropped its record of it: use the volume where it is now (`cairnctl volume list`); its replica here is rebuilt by the new owner")]
    TakenOver { volume: String, reason: String },
    #[error("volume {name:?} is attached on {node} and in use ({user}); detach it there first")]
    InUse {
        name: String,
        node: String,
        user: String,
    },
    #[error("owner {node} unreachable: {reason}; nothing was changed (retry when it is back, or `volume attach --force` to take the volume over from the replicas that answer: writes {node} acknowledged while cut off from them are lost)")]
    OwnerUnreachable { node: String, reason: String },
    #[error("{message}")]
    Peer { code: i32, message: String },
    #[error("{0}")]
    BadCloneSource(String),
    #[error("size {size} is smaller than the source volume {from:?} ({from_size} bytes): give at least that, or no size")]
    CloneTooSmall {
        size: u64,
        from: String,
        from_size: u64,
    },
    #[error("volume {name:?}: {what} did not finish (cairnd stopped during it); delete the volume and make it again")]
    Unfinished { name: String, what: String },
    #[error("node {node} unreachable: {reason}; nothing was changed (retry when it is back)")]
    NodeUnreachable { node: String, reason: String },
    #[error("volume {name:?} already exists: pick another name or delete it first")]
    AlreadyExists { name: String },
    #[error("volume {name:?} holds {current} bytes: expand grows a volume, give a size larger than that (not {size})")]
    NotLarger {
        name: String,
        size: u64,
        current: u64,
    },
    #[error("volume {volume:?}: replica {replica} on node {node} cannot grow: {reason}")]
    CannotGrow {
        volume: String,
        replica: String,
        node: String,
        reason: String,
        /// The replica's disk has no room (the node said ENOSPC).
        no_room: bool,
    },
    #[error("volume {name:?} not found: see `cairnctl volume list`")]
    NotFound { name: String },
    #[error("volume {name:?} is already attached at {device}: detach it first")]
    AlreadyAttached { name: String, device: String },
    #[error("volume {name:?} is attached: detach it first or pass --force")]
    Attached { name: String },
    #[error(
        "volume {volume:?} has no replica named {replica:?}: see `cairnctl volume get {volume}`"
    )]
    UnknownReplica { volume: String, replica: String },
    #[error("replica {replica} is the last healthy replica of volume {volume}: failing it would fault the volume")]
    LastHealthyReplica { volume: String, replica: String },
    #[error("volume {volume} has no healthy replica")]
    NoHealthyReplica { volume: String },
    #[error("disk {path} {reason}: create the directory or fix --disk")]
    BadDisk { path: PathBuf, reason: &'static str },
    #[error("disk {path} is given twice: give each --disk once")]
    DuplicateDisk { path: PathBuf },
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A blocking task died (panicked or was cancelled); a bug, not an input error.
    #[error("{what} label {label:?}: {reason}")]
    BadLabel {
        what: String,
        label: String,
        reason: String,
    },
    #[error("volume {name:?} is a DR standby volume: it cannot {what} until `cairnctl volume activate {name}`")]
    Standby { name: String, what: &'static str },
    #[error("volume {volume}: no healthy replica took the change: {reason}")]
    NoHealthyReplicaFor { volume: String, reason: String },
    #[error(
        "volume {volume}: snapshot {snapshot} is in use by a running backup: wait for it to finish"
    )]
    SnapshotBusy { volume: String, snapshot: String },
    #[error("volume {volume} has no snapshot {snapshot:?}: see `cairnctl snapshot list {volume}`")]
    UnknownSnapshot { volume: String, snapshot: String },
    #[error("volume {volume} already has a snapshot {snapshot:?}: choose another name")]
    SnapshotExists { volume: String, snapshot: String },
    #[error("volume {name:?} is attached: detach it before you {what}")]
    MustDetach { name: String, what: &'static str },
    /// An attached volume cannot grow: the kernel's ublk driver lacks
    /// `UBLK_F_UPDATE_SIZE` (`release` is `uname -r`).
    #[error("online expansion needs Linux 6.16 or newer (this kernel: {release}); detach the volume first")]
    OnlineExpandUnsupported { name: String, release: String },
    #[error("volume {name:?} is being restored from a backup: wait until `cairnctl volume get {name}` shows no restore")]
    Restoring { name: String },
    #[error("reading the snapshot to back up: {0}")]
    SnapshotRead(#[from] crate::engine::LayeredViewError),
    #[error("backup handle {handle:?} names no backup: use bak://VOLUME/BACKUP (see `cairnctl backup list`)")]
    HandleNeedsBackup { handle: String },
    #[error("backup volume {volume:?} has no completed backup yet: back it up first")]
    NoBackupYet { volume: String },
    #[error("backup {handle} is still in progress: wait for it to complete")]
    BackupInProgress { handle: String },
    #[error("size {size} is smaller than the backup's {backup} bytes: give at least the backup's size, or none")]
    RestoreTooSmall { size: u64, backup: u64 },
    #[error("volume {name:?} is not a DR standby volume: nothing to activate")]
    NotStandby { name: String },
    #[error(transparent)]
    Jobs(#[from] crate::jobs::JobSpecError),
    #[error(transparent)]
    Cron(#[from] crate::jobs::CronError),
    #[error(transparent)]
    BackupTarget(#[from] crate::backupstore::target::TargetError),
    #[error(transparent)]
    Credentials(#[from] crate::backupstore::credentials::CredentialsError),
    #[error(transparent)]
    BackupStore(#[from] crate::backupstore::store::BackupStoreError),
    #[error(transparent)]
    BackupHandle(#[from] crate::backupstore::format::HandleError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ControlError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ControlError {
        let path = path.into();
        move |source| ControlError::Io { path, source }
    }
}

impl From<tokio::task::JoinError> for ControlError {
    fn from(e: tokio::task::JoinError) -> Self {
        ControlError::Internal(format!("background task failed: {e}"))
    }
}
