//! The embedded control plane: what volumes exist on this node, where their
//! replicas live, and their lifecycle (create, attach, detach, delete, fail a
//! replica), kept across restarts.
//!
//! ```text
//!  api::server ──▶ VolumeManager ──(a lock per volume: its ops run one at a time)
//!                   │   │   └─ store: <data-dir>/volumes/<name>.json (atomic writes)
//!                   │   └─ placement: replicas on distinct disks
//!                   ▼
//!   attach: Replica::open ─▶ VolumeIo::new ─▶ begin_epoch ─▶ UblkDevice::start
//!                   ▲
//!   engine events (I/O threads, unbounded channel) ─▶ event task ─▶ record
//!   1 s ticker ─▶ VolumeIo::check_replicas on every attached volume
//!   2 s repair ─▶ reconnect / replace failed replicas, rebuild, salvage
//!   2 s poll   ─▶ cluster: each peer's NodeStatus (name, disks, up)
//! ```
//!
//! In a cluster (`--replica-listen`, `--cluster-secret`, `--peer`), the node
//! that creates a volume owns it: it runs the engine and keeps the record;
//! replicas live on peers (placement) and are created, opened and deleted
//! through their replica servers. Attach on another node moves the
//! ownership there (`handover`).
//!
//! Concurrency rules: every operation on a volume holds that volume's lock
//! (`Inner::volume_lock`) for its whole duration, including the blocking
//! replica connections and ublk start/stop (run on `spawn_blocking`), so two
//! operations on one volume never interleave while operations on different
//! volumes never wait for each other. The state mutex (the map of records)
//! is held only for short sections that do not block. This is the rare
//! path; the I/O path never touches either. Engine events are sent from I/O
//! threads on an unbounded channel and applied by a task that takes the
//! state mutex, so an I/O thread never waits for the control plane.

pub mod backups;
pub mod clone;
pub mod cluster;
mod error;
mod expand;
pub mod forward;
mod handover;
mod manager;
pub mod placement;
pub mod recurring;
mod repair;
pub mod settings;
pub mod snapshots;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use error::ControlError;
pub(crate) use handover::{HandoverRequest, FORGET_METHOD, RECLAIM_METHOD, RELEASE_METHOD};
pub use manager::{
    DiskInfo, NodeInfo, RebuildInfo, ReplicaInfo, VolumeInfo, VolumeManager, VolumeState,
};

use crate::frontend::FrontendOptions;

/// How this node runs. Built by `cairnd` from its flags.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Name recorded as each replica's node (default: the host name).
    pub node_id: String,
    /// Holds `volumes/` (records) and, without `disks`, the default disk.
    pub data_dir: PathBuf,
    /// Directories that hold replicas (`<disk>/replicas/<replica>/`). Empty
    /// means one disk, `<data-dir>/disks/default`.
    pub disks: Vec<PathBuf>,
    /// Queue layout of the ublk devices of volumes created from now on.
    pub frontend: FrontendOptions,
    /// Where the replica server listens (`--replica-listen`); `None` runs
    /// the node standalone.
    pub replica_listen: Option<SocketAddr>,
    /// Address peers use to reach this node's replica server, when it
    /// differs from `replica_listen` (e.g. listening on 0.0.0.0).
    pub advertise: Option<String>,
    /// The cluster secret file (`--cluster-secret`).
    pub cluster_secret: Option<PathBuf>,
    /// Peers' replica addresses (`--peer`).
    pub peers: Vec<String>,
    /// The clock recurring jobs run on; `None` = the system clock. Tests
    /// pass a `jobs::ManualClock`.
    pub clock: Option<ClockHandle>,
}

/// A shared clock (a newtype so `NodeConfig` stays `Debug`).
#[derive(Clone)]
pub struct ClockHandle(pub std::sync::Arc<dyn crate::jobs::Clock>);

impl std::fmt::Debug for ClockHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClockHandle({})", self.0.now())
    }
}

impl NodeConfig {
    /// Defaults for everything but the data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> NodeConfig {
        NodeConfig {
            node_id: hostname(),
            data_dir: data_dir.into(),
            disks: Vec::new(),
            frontend: FrontendOptions::default(),
            replica_listen: None,
            advertise: None,
            cluster_secret: None,
            peers: Vec::new(),
            clock: None,
        }
    }

    /// The disks as configured, or the default disk.
    pub fn disk_paths(&self) -> Vec<PathBuf> {
        if self.disks.is_empty() {
            vec![self.data_dir.join("disks").join("default")]
        } else {
            self.disks.clone()
        }
    }
}

/// This host's name, or `localhost` when the kernel does not say.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}
