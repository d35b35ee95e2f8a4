//! `VolumeManager`: the volume lifecycle on one node. See the module docs of
//! [`crate::control`] for the locking rules.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, Mutex, OwnedMutexGuard};
use tokio::task::JoinHandle;

use super::cluster::{Cluster, NodeView};
use super::placement::{self, DiskLoad, NodeCandidate, Rules};
use super::repair::{self, RepairDone};
use super::settings::{self, Settings};
use super::store::{RecordState, ReplicaRecord, Store, VolumeRecord, RECORD_FORMAT};
use super::{ControlError, NodeConfig};
use crate::disks::{disk_fits, NodeDisks};
use crate::engine::intent::{IntentLog, Leftover};
use crate::engine::{
    EngineEvent, EventSink, QueueLayout, RebuildProgress, RemoteReplica, RemoteTarget,
    ReplicaHandle, ReplicaIo, ReplicaState, VolumeHealth, VolumeIo, MAX_REPLICAS,
};
use crate::frontend::{ublk_available, FrontendOptions, UblkDevice};
use crate::metrics::VolumeSample;
use crate::replica::{Claim, OwnerTerm, BLOCK_SIZE};
use crate::transport::{
    ClusterSecret, Op, PeerError, ReplicaPlace, ReplicaReport, ReplicaServer, VolumePlacement,
};

/// How often attached volumes' replica files are health-checked.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Write-intent chunks quiet for this many checks are flushed and cleared.
const SETTLE_EVERY: u64 = 5;

/// Message on a replica the operator failed.
pub(super) const OPERATOR_FAILED: &str = "failed by operator";

/// What a volume is doing, as `cairnctl` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeState {
    Detached,
    Healthy,
    Degraded,
    Faulted,
    /// Another engine claimed the volume's replicas: every I/O fails here
    /// until it is detached.
    Fenced,
}

impl VolumeState {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Detached => "detached",
            VolumeState::Healthy => "healthy",
            VolumeState::Degraded => "degraded",
            VolumeState::Fenced => "fenced",
            VolumeState::Faulted => "faulted",
        }
    }
}

impl fmt::Display for VolumeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A volume as reported: the record, overlaid with the live engine's view
/// while attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub state: VolumeState,
    pub size: u64,
    /// `/dev/ublkbN` while attached.
    pub device: Option<PathBuf>,
    pub revision: u64,
    pub queues: u16,
    pub queue_depth: u16,
    /// Why the volume is not in the state the operator asked for, if it isn't.
    pub message: String,
    pub replicas: Vec<ReplicaInfo>,
    pub standby: bool,
    pub from_backup: String,
    pub last_restored: String,
    pub recurring_jobs: String,
    pub last_backup: String,
    /// A restore into this volume in progress.
    pub restore: Option<RebuildInfo>,
    /// The node holding the record (this one).
    pub owner: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaInfo {
    pub name: String,
    pub node: String,
    /// Replica server address; empty for a replica on this node.
    pub addr: String,
    pub disk: PathBuf,
    pub dir: PathBuf,
    pub state: ReplicaState,
    pub message: String,
    pub rebuild: Option<RebuildInfo>,
    pub last_rebuild: Option<super::store::LastRebuild>,
}

/// A rebuild in progress, as `volume get` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildInfo {
    pub percent: u32,
    pub done: u64,
    pub total: u64,
    /// Bytes per second.
    pub rate: u64,
    /// Copying only what the replica missed (else everything).
    pub incremental: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub disks: Vec<DiskInfo>,
    /// `None` when the ublk driver is loaded; otherwise how to load it.
    pub ublk_status: Option<String>,
    /// The running kernel (`uname -r`) and what its ublk driver offers.
    pub kernel: crate::frontend::KernelFeatures,
    /// Whether new replicas may go to this node and which disks refuse them.
    pub scheduling: crate::disks::Scheduling,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    pub path: PathBuf,
    /// Filesystem size and space available to cairnd (0 if unknown).
    pub size: u64,
    pub available: u64,
    pub replicas: u32,
    /// Volume bytes the replicas on this disk promise.
    pub allocated: u64,
    pub schedulable: bool,
}

/// Where [`VolumeManager::set_scheduling`] keeps the rule.
const SCHEDULING_FILE: &str = "scheduling.json";

/// The scheduling rule persisted under `data_dir` (every node and disk
/// takes replicas when there is none). An unreadable file is logged and
/// read as "this node takes no new replicas": a rule the operator set is
/// never silently dropped.
fn load_scheduling(data_dir: &Path) -> crate::disks::Scheduling {
    use crate::disks::Scheduling;
    let path = data_dir.join(SCHEDULING_FILE);
    let unusable = |e: &dyn std::fmt::Display| {
        tracing::error!(path = %path.display(), error = %e, "unusable scheduling rule: this node takes no new replicas until it is set again (`cairnctl node scheduling`)");
        Scheduling::none()
    };
    match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Scheduling::default(),
        Err(e) => unusable(&e),
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| unusable(&e)),
    }
}

/// The node's volumes and their lifecycle. Create with [`VolumeManager::open`]
/// inside a tokio runtime; call [`VolumeManager::shutdown`] before dropping
/// it so attached devices are removed cleanly.
pub struct VolumeManager {
    pub(super) inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
    /// Serves this node's replicas to peers (cluster mode).
    pub(super) server: Option<ReplicaServer>,
}

pub(super) struct Inner {
    pub(super) node_id: String,
    pub(super) data_dir: PathBuf,
    pub(super) disks: Arc<NodeDisks>,
    pub(super) frontend: FrontendOptions,
    pub(super) store: Store,
    pub(super) state: Arc<Mutex<State>>,
    /// Cloned into each attached volume's engine event sink.
    events: mpsc::UnboundedSender<(String, EngineEvent)>,
    /// Read by the metrics scrape, which is synchronous; refreshed after
    /// every change under `state`.
    view: std::sync::Mutex<Vec<ViewEntry>>,
    pub(super) settings: Arc<Settings>,
    pub(super) cluster: Arc<Cluster>,
    /// Rebuilds running now, by volume.
    pub(super) rebuilds: std::sync::Mutex<HashMap<String, Vec<RunningRebuild>>>,
    pub(super) repair_done: mpsc::UnboundedSender<RepairDone>,
    /// The clock recurring jobs run on, and their schedule.
    pub(super) clock: Arc<dyn crate::jobs::Clock>,
    pub(super) scheduler: std::sync::Mutex<crate::jobs::Scheduler>,
    /// Backups running on this node.
    pub(super) backups: std::sync::Mutex<Vec<super::backups::RunningBackup>>,
    /// Restores running now (into new or DR volumes), by volume.
    pub(super) restores: std::sync::Mutex<HashMap<String, Arc<crate::backupstore::Progress>>>,
    /// Records handed over to another node, until it confirms.
    pub(super) handing: std::sync::Mutex<BTreeMap<String, super::handover::Handing>>,
    /// One lock per volume name (see [`Inner::volume_lock`]).
    locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Snapshots being copied into new volumes: (volume, snapshot).
    copying: std::sync::Mutex<Vec<(String, String)>>,
}

pub(super) struct RunningRebuild {
    pub slot: usize,
    pub node: String,
    pub progress: Arc<RebuildProgress>,
    pub cancel: Arc<AtomicBool>,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) volumes: BTreeMap<String, Volume>,
}

pub(super) struct Volume {
    pub(super) record: VolumeRecord,
    pub(super) live: Option<Live>,
    /// Why the volume is detached although the record wants it attached, or
    /// what went wrong at its last detach. Not persisted.
    pub(super) message: String,
}

/// An attached volume.
pub(super) struct Live {
    pub(super) io: Arc<VolumeIo>,
    device: UblkDevice,
}

impl Live {
    pub(super) fn device_path(&self) -> PathBuf {
        self.device.path()
    }

    pub(super) fn dev_id(&self) -> u32 {
        self.device.dev_id()
    }
}

struct ViewEntry {
    name: String,
    placement: VolumePlacement,
    size: u64,
    replicas: u32,
    healthy_in_record: u32,
    revision: u64,
    io: Option<Arc<VolumeIo>>,
}

impl VolumeManager {
    /// Loads the records under `config.data_dir` and starts the background
    /// tasks. Volumes recorded as attached are attached again in the
    /// background; API calls wait until that is done.
    pub async fn open(config: NodeConfig) -> Result<VolumeManager, ControlError> {
        config.frontend.validate()?;
        let data_dir = config.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(ControlError::io(&data_dir))?;
        let disk_paths = prepare_disks(&config)?;
        let store = Store::open(&data_dir)?;
        let settings = Arc::new(Settings::open(&data_dir)?);
        let secret = match &config.cluster_secret {
            Some(path) => {
                Some(ClusterSecret::load(path).map_err(|e| ControlError::Secret(e.to_string()))?)
            }
            None => None,
        };
        if config.replica_listen.is_some() != secret.is_some() {
            return Err(ControlError::Secret(
                "--replica-listen and --cluster-secret go together: give both to join a cluster, or neither".into(),
            ));
        }
        let advertise = config
            .advertise
            .clone()
            .or_else(|| config.replica_listen.map(|a| a.to_string()));
        let cluster = Arc::new(Cluster::open(
            &config.node_id,
            advertise,
            secret.clone(),
            &data_dir,
            &config.peers,
        )?);
        let (records, corrupt) = store.load_all()?;
        for c in &corrupt {
            tracing::error!(path = %c.path.display(), reason = %c.reason, "skipping unreadable volume record; fix or remove the file");
        }
        for d in &disk_paths {
            tracing::info!(disk = %d.display(), "disk");
        }
        let disks = Arc::new(NodeDisks::new(&config.node_id, disk_paths));
        disks
            .set_scheduling(load_scheduling(&data_dir), |_| Ok::<(), ()>(()))
            .ok();
        let server = match (config.replica_listen, secret) {
            (Some(addr), Some(secret)) => Some(
                ReplicaServer::start(addr, secret, disks.clone()).map_err(|e| {
                    ControlError::Io {
                        path: PathBuf::from(format!("replica listen {addr}")),
                        source: e,
                    }
                })?,
            ),
            _ => None,
        };
        let mut state = State::default();
        let mut handing = BTreeMap::new();
        for record in records {
            if let Some(to) = &record.handed_to {
                tracing::info!(volume = %record.name, %to, "volume handed over; waiting for the new owner to confirm");
                handing.insert(
                    record.name.clone(),
                    super::handover::Handing {
                        record,
                        since: std::time::Instant::now(),
                    },
                );
                continue;
            }
            tracing::info!(
                volume = %record.name,
                size = %crate::size::HumanSize(record.size),
                replicas = record.replicas.len(),
                attached = record.attached,
                "volume restored"
            );
            state.volumes.insert(
                record.name.clone(),
                Volume {
                    record,
                    live: None,
                    message: String::new(),
                },
            );
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (repair_tx, repair_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            node_id: config.node_id.clone(),
            data_dir: data_dir.clone(),
            disks,
            frontend: config.frontend,
            store,
            state: Arc::new(Mutex::new(state)),
            events: tx,
            view: std::sync::Mutex::new(Vec::new()),
            settings,
            cluster,
            rebuilds: std::sync::Mutex::new(HashMap::new()),
            repair_done: repair_tx,
            restores: std::sync::Mutex::new(HashMap::new()),
            handing: std::sync::Mutex::new(handing),
            locks: std::sync::Mutex::new(HashMap::new()),
            copying: std::sync::Mutex::new(Vec::new()),
            clock: config
                .clock
                .clone()
                .map(|c| c.0)
                .unwrap_or_else(|| Arc::new(crate::jobs::SystemClock)),
            scheduler: std::sync::Mutex::new(crate::jobs::Scheduler::new()),
            backups: std::sync::Mutex::new(Vec::new()),
        });
        if let Ok(st) = inner.state.try_lock() {
            // Recurring jobs from the records (validated when they were set).
            for v in st.volumes.values() {
                inner.schedule_jobs(&v.record);
            }
        }
        // The first poll, before restore, so remote replicas' nodes are known.
        if inner.cluster.enabled() {
            let c = inner.cluster.clone();
            let _ = tokio::task::spawn_blocking(move || c.poll()).await;
        }
        // The locks of the volumes to attach again are taken before any API
        // call can be served, so calls on them wait for the restore below;
        // calls on other volumes do not.
        let restoring: Vec<(String, OwnedMutexGuard<()>)> = {
            let st = inner.state.lock().await;
            inner.publish(&st);
            st.volumes
                .values()
                .filter(|v| v.record.attached)
                .filter_map(|v| {
                    let name = v.record.name.clone();
                    inner.try_volume_lock(&name).map(|g| (name, g))
                })
                .collect()
        };
        let mut tasks = vec![
            tokio::spawn(restore(inner.clone(), restoring)),
            tokio::spawn(event_loop(Arc::downgrade(&inner), rx)),
            tokio::spawn(check_loop(Arc::downgrade(&inner))),
            tokio::spawn(repair::repair_loop(Arc::downgrade(&inner))),
            tokio::spawn(repair::done_loop(Arc::downgrade(&inner), repair_rx)),
            tokio::spawn(super::backups::dr_loop(Arc::downgrade(&inner))),
            tokio::spawn(super::recurring::jobs_loop(Arc::downgrade(&inner))),
        ];
        if inner.cluster.enabled() {
            tasks.push(tokio::spawn(repair::poll_loop(inner.cluster.clone())));
        }
        Ok(VolumeManager {
            inner,
            tasks,
            server,
        })
    }

    /// A handle on the same node state without its own tasks (for the
    /// background loops that call manager operations).
    pub(super) fn handle(inner: Arc<Inner>) -> VolumeManager {
        VolumeManager {
            inner,
            tasks: Vec::new(),
            server: None,
        }
    }

    /// The replica server's address (cluster mode).
    pub fn replica_addr(&self) -> Option<std::net::SocketAddr> {
        self.server.as_ref().map(ReplicaServer::local_addr)
    }

    /// Replicas a volume gets when the request does not say: 1 on a one-disk
    /// node, else 2 (replicas must sit on distinct disks, and 2 survives one
    /// disk failure without needing a third disk).
    pub fn default_replicas(&self) -> u32 {
        if self.inner.cluster.enabled() {
            // Longhorn's default: 3, fewer when the cluster is smaller.
            let nodes = 1 + self.inner.cluster.nodes().iter().filter(|n| n.up).count();
            return nodes.clamp(1, 3) as u32;
        }
        if self.inner.disks.disks().len() == 1 {
            1
        } else {
            2
        }
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// Creates a volume: validates everything first (nothing changes on bad
    /// input), then makes the replica directories, then the record.
    pub async fn create(
        &self,
        name: &str,
        size: u64,
        replicas: Option<u32>,
        recurring_jobs: &str,
    ) -> Result<VolumeInfo, ControlError> {
        // The name's lock, not the state's: creating replicas on peers may
        // take a while and other volumes' operations go on meanwhile.
        let _op = self.inner.volume_lock(name).await;
        self.create_locked(name, size, replicas, recurring_jobs)
            .await
    }

    /// [`VolumeManager::create`] with the name's volume lock held.
    pub(super) async fn create_locked(
        &self,
        name: &str,
        size: u64,
        replicas: Option<u32>,
        recurring_jobs: &str,
    ) -> Result<VolumeInfo, ControlError> {
        crate::name::validate_volume_name(name)?;
        let jobs = if recurring_jobs.trim().is_empty() {
            Vec::new()
        } else {
            crate::jobs::parse_jobs(recurring_jobs)?
        };
        if size == 0 {
            return Err(ControlError::ZeroSize);
        }
        if size % BLOCK_SIZE != 0 {
            return Err(ControlError::UnalignedSize { size });
        }
        let count = replicas.unwrap_or_else(|| self.default_replicas());
        if count == 0 {
            return Err(ControlError::ZeroReplicas {
                volume: name.to_string(),
            });
        }
        if count as usize > MAX_REPLICAS {
            return Err(ControlError::TooManyReplicas {
                volume: name.to_string(),
                wanted: count,
                max: MAX_REPLICAS,
            });
        }
        let inner = &self.inner;
        let st = inner.state.lock().await;
        if st.volumes.contains_key(name) {
            return Err(ControlError::AlreadyExists {
                name: name.to_string(),
            });
        }
        let rule = inner.disks.scheduling();
        let loads: Vec<DiskLoad> = inner
            .disks
            .disks()
            .iter()
            .filter(|d| rule.allows(d))
            .map(|d| DiskLoad {
                path: d.clone(),
                replicas: st.replicas_on(d),
            })
            .collect();
        drop(st);
        let replicas = if inner.cluster.enabled() {
            let i = self.inner.clone();
            let vname = name.to_string();
            tokio::task::spawn_blocking(move || i.create_replicas(&vname, count, size, &[], None))
                .await??
        } else {
            // More than the node has, or than its schedulable disks: say
            // which (placement below only sees the schedulable ones).
            let all = inner.disks.disks().len();
            if count as usize > all {
                return Err(ControlError::NotEnoughDisks {
                    volume: name.to_string(),
                    wanted: count,
                    disks: all,
                });
            }
            if count as usize > loads.len() {
                return Err(ControlError::NotEnoughSchedulableDisks {
                    volume: name.to_string(),
                    wanted: count,
                    schedulable: loads.len(),
                    disks: all,
                });
            }
            let chosen = placement::place(name, count, &loads)?;
            let disks = inner.disks.clone();
            let vname = name.to_string();
            let node = inner.node_id.clone();
            tokio::task::spawn_blocking(move || -> Result<Vec<ReplicaRecord>, ControlError> {
                let mut made: Vec<ReplicaRecord> = Vec::new();
                for disk in chosen {
                    let rname = random_replica_name(&vname)?;
                    let want = disk.clone();
                    match disks.create(&vname, &rname, size, None, |d| {
                        d.schedulable && Path::new(&d.path) == want
                    }) {
                        Ok((disk, dir)) => made.push(ReplicaRecord::new(
                            rname,
                            node.clone(),
                            String::new(),
                            disk,
                            dir,
                        )),
                        Err(e) => {
                            for r in &made {
                                let _ = disks.delete(&r.name);
                            }
                            return Err(e.into());
                        }
                    }
                }
                Ok(made)
            })
            .await??
        };
        let dirs: Vec<(String, String)> = replicas
            .iter()
            .map(|r| (r.name.clone(), r.addr.clone()))
            .collect();

        let record = VolumeRecord {
            format: RECORD_FORMAT,
            name: name.to_string(),
            size,
            replica_count: count,
            queues: inner.frontend.queues,
            queue_depth: inner.frontend.queue_depth,
            attached: false,
            dev_id: None,
            revision: 0,
            replicas,
            standby: false,
            from_backup: String::new(),
            last_restored: String::new(),
            restoring: None,
            recurring_jobs: if jobs.is_empty() {
                String::new()
            } else {
                serde_json::to_string(&jobs).map_err(|e| ControlError::Internal(e.to_string()))?
            },
            last_backup: String::new(),
            last_backup_snapshot: String::new(),
            owner_term: 1,
            handed_to: None,
        };
        if let Err(e) = inner.store.save(&record) {
            let i = self.inner.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for (name, addr) in dirs {
                    i.delete_replica(&name, &addr);
                }
            })
            .await;
            return Err(e);
        }
        if !jobs.is_empty() {
            let now = inner.clock.now();
            if let Err(e) = inner
                .scheduler
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_jobs(name, &jobs, now)
            {
                tracing::error!(volume = name, error = %e, "recurring jobs not scheduled");
            }
        }
        tracing::info!(volume = name, size = %crate::size::HumanSize(size), replicas = count, "volume created");
        let mut st = inner.state.lock().await;
        let v = Volume {
            record,
            live: None,
            message: String::new(),
        };
        let info = v.info(&self.inner);
        st.volumes.insert(name.to_string(), v);
        inner.publish(&st);
        Ok(info)
    }

    /// Every volume, sorted by name.
    pub async fn list(&self) -> Vec<VolumeInfo> {
        let st = self.inner.state.lock().await;
        st.volumes.values().map(|v| v.info(&self.inner)).collect()
    }

    pub async fn get(&self, name: &str) -> Result<VolumeInfo, ControlError> {
        let st = self.inner.state.lock().await;
        Ok(st.volume(name)?.info(&self.inner))
    }

    /// Attaches a volume as `/dev/ublkbN` (the returned info's `device`).
    pub async fn attach(&self, name: &str) -> Result<VolumeInfo, ControlError> {
        let _op = self.inner.volume_lock(name).await;
        let st = self.inner.state.lock().await;
        let v = st.volume(name)?;
        if v.record.standby {
            return Err(ControlError::Standby {
                name: name.to_string(),
                what: "be attached",
            });
        }
        if self.inner.restore_info(name).is_some() {
            return Err(ControlError::Restoring {
                name: name.to_string(),
            });
        }
        if let Some(what) = &v.record.restoring {
            // A copy or restore into it was cut short: its data is partial.
            return Err(ControlError::Unfinished {
                name: name.to_string(),
                what: if what.starts_with("copy of ") {
                    what.clone()
                } else {
                    format!("the restore of backup {what}")
                },
            });
        }
        if let Some(live) = &v.live {
            return Err(ControlError::AlreadyAttached {
                name: name.to_string(),
                device: live.device.path().display().to_string(),
            });
        }
        drop(st);
        let result = self.inner.attach_volume(name).await;
        let mut st = self.inner.state.lock().await;
        if let Err(ControlError::TakenOver { reason, .. }) = &result {
            self.inner.retire(&mut st, name, reason);
        }
        self.inner.publish(&st);
        result?;
        Ok(st.volume(name)?.info(&self.inner))
    }

    /// Removes the device, flushes the replicas, and records that the volume
    /// should stay detached. Detaching a detached volume is not an error.
    pub async fn detach(&self, name: &str) -> Result<VolumeInfo, ControlError> {
        let _op = self.inner.volume_lock(name).await;
        self.inner.state.lock().await.volume(name)?;
        // A fenced volume's stale record is dropped by the check loop once
        // it is detached (`settle_ownership`).
        let result = self.inner.detach_volume(name, false).await;
        let st = self.inner.state.lock().await;
        self.inner.publish(&st);
        result?;
        Ok(st.volume(name)?.info(&self.inner))
    }

    /// Deletes a volume and its replicas. An attached volume needs `force`,
    /// which detaches it first.
    pub async fn delete(&self, name: &str, force: bool) -> Result<(), ControlError> {
        let inner = &self.inner;
        let _op = inner.volume_lock(name).await;
        let attached = inner.state.lock().await.volume(name)?.live.is_some();
        if attached {
            if !force {
                return Err(ControlError::Attached {
                    name: name.to_string(),
                });
            }
            let r = inner.detach_volume(name, false).await;
            inner.publish(&*inner.state.lock().await);
            r?;
        }
        let replicas: Vec<(String, String)> = inner
            .state
            .lock()
            .await
            .volume(name)?
            .record
            .replicas
            .iter()
            .map(|r| (r.name.clone(), r.addr.clone()))
            .collect();
        // Replicas first, record last: a crash in between leaves a record
        // whose replicas are gone, and deleting again finishes the job. A
        // replica on a node that is down now is left there (logged).
        let i = self.inner.clone();
        tokio::task::spawn_blocking(move || -> Result<(), ControlError> {
            for (rname, addr) in &replicas {
                if addr.is_empty() {
                    i.disks.delete(rname)?;
                } else {
                    i.delete_replica(rname, addr);
                }
            }
            Ok(())
        })
        .await??;
        let mut st = inner.state.lock().await;
        inner.store.remove(name)?;
        inner.unschedule(name);
        st.volumes.remove(name);
        inner.publish(&st);
        tracing::info!(volume = name, "volume deleted");
        Ok(())
    }

    /// Takes a replica out of service. Refuses the last healthy replica.
    pub async fn fail_replica(
        &self,
        volume: &str,
        replica: &str,
    ) -> Result<VolumeInfo, ControlError> {
        let inner = &self.inner;
        let mut st = inner.state.lock().await;
        let v = st.volume_mut(volume)?;
        let Some(rec) = v.record.replicas.iter().find(|r| r.name == replica) else {
            return Err(ControlError::UnknownReplica {
                volume: volume.to_string(),
                replica: replica.to_string(),
            });
        };
        if rec.state == RecordState::Failed {
            return Ok(v.info(&self.inner));
        }
        if let Some(live) = &v.live {
            let io = live.io.clone();
            let r = replica.to_string();
            // Persists the survivors' revision: file I/O, so off the runtime.
            tokio::task::spawn_blocking(move || io.fail_replica(&r, OPERATOR_FAILED)).await??;
            let io = live.io.clone();
            v.record.sync_from(&io);
        } else {
            let healthy = v
                .record
                .replicas
                .iter()
                .filter(|r| r.state == RecordState::Healthy)
                .count();
            if healthy <= 1 {
                return Err(ControlError::LastHealthyReplica {
                    volume: volume.to_string(),
                    replica: replica.to_string(),
                });
            }
            v.record.set_failed(replica, OPERATOR_FAILED);
        }
        inner.store.save(&v.record)?;
        tracing::warn!(volume, replica, "replica failed by operator");
        let info = v.info(&self.inner);
        inner.publish(&st);
        Ok(info)
    }

    /// This node's name, disks and whether ublk can be used.
    pub async fn node(&self) -> NodeInfo {
        let disks = self.inner.disks.clone();
        let report = tokio::task::spawn_blocking(move || disks.report())
            .await
            .unwrap_or_else(|_| crate::transport::NodeReport {
                node: String::new(),
                disks: Vec::new(),
                placements: Vec::new(),
            });
        // uname and one control command to the ublk driver.
        let kernel = tokio::task::spawn_blocking(crate::frontend::KernelFeatures::detect)
            .await
            .unwrap_or_else(|_| crate::frontend::KernelFeatures {
                release: String::new(),
                ublk: None,
            });
        NodeInfo {
            name: self.inner.node_id.clone(),
            disks: report
                .disks
                .into_iter()
                .map(|d| DiskInfo {
                    path: PathBuf::from(d.path),
                    size: d.size,
                    available: d.available,
                    replicas: d.replicas,
                    allocated: d.allocated,
                    schedulable: d.schedulable,
                })
                .collect(),
            ublk_status: ublk_available().err().map(|e| e.to_string()),
            kernel,
            scheduling: self.inner.disks.scheduling(),
        }
    }

    /// Sets whether new replicas may be placed on this node and which of
    /// its disks refuse them (persisted in `<data-dir>/scheduling.json`).
    /// Replicas already there stay. An unknown disk changes nothing.
    pub async fn set_scheduling(
        &self,
        allow: bool,
        unschedulable_disks: &[String],
    ) -> Result<crate::disks::Scheduling, ControlError> {
        let known = self.inner.disks.disks();
        let mut disks: Vec<PathBuf> = Vec::new();
        for d in unschedulable_disks {
            // Path equality ignores a trailing '/'.
            let p = Path::new(d);
            if !known.iter().any(|k| k == p) {
                return Err(ControlError::UnknownDisk {
                    path: d.clone(),
                    disks: known.iter().map(|k| k.display().to_string()).collect(),
                });
            }
            if !disks.iter().any(|x| x == p) {
                disks.push(p.components().collect());
            }
        }
        let rule = crate::disks::Scheduling {
            allow,
            unschedulable_disks: disks,
        };
        let path = self.inner.data_dir.join(SCHEDULING_FILE);
        let json =
            serde_json::to_vec_pretty(&rule).map_err(|e| ControlError::Internal(e.to_string()))?;
        self.inner
            .disks
            .set_scheduling(rule.clone(), |_| crate::fsutil::atomic_write(&path, &json))
            .map_err(ControlError::io(&path))?;
        tracing::info!(allow, disks = ?rule.unschedulable_disks, "scheduling of new replicas changed");
        Ok(rule)
    }

    /// Every node of the cluster (this one first) with its disks; each disk
    /// says whether a replica of `probe_size` bytes could be scheduled there
    /// now (1 GiB when 0).
    pub async fn nodes(&self) -> Vec<NodeView> {
        let i = self.inner.clone();
        tokio::task::spawn_blocking(move || i.cluster.nodes_with(i.disks.report()))
            .await
            .unwrap_or_default()
    }

    /// The placement settings now.
    pub fn rules(&self) -> Rules {
        self.inner.rules()
    }

    /// Adds a peer (by its replica address) and returns what it reports.
    pub async fn node_add(&self, addr: &str) -> Result<NodeView, ControlError> {
        let c = self.inner.cluster.clone();
        let addr = addr.to_string();
        Ok(tokio::task::spawn_blocking(move || c.add(&addr)).await??)
    }

    /// Removes a peer by node name or address. Refused while volumes of this
    /// node keep replicas there (fail and replace them first).
    pub async fn node_remove(&self, which: &str) -> Result<(), ControlError> {
        let st = self.inner.state.lock().await;
        let addr_match =
            |r: &ReplicaRecord| r.node == which || (!r.addr.is_empty() && r.addr == which);
        if let Some(v) = st
            .volumes
            .values()
            .find(|v| v.record.replicas.iter().any(addr_match))
        {
            return Err(ControlError::NodeInUse {
                node: which.to_string(),
                volume: v.record.name.clone(),
            });
        }
        drop(st);
        Ok(self.inner.cluster.remove(which)?)
    }

    /// Every setting and its value.
    pub fn settings(&self) -> Vec<(&'static settings::Definition, String)> {
        self.inner.settings.list()
    }

    pub fn setting(&self, name: &str) -> Result<String, ControlError> {
        Ok(self.inner.settings.get(name)?)
    }

    pub async fn set_setting(&self, name: &str, value: &str) -> Result<String, ControlError> {
        let before = self.inner.settings.get(name)?;
        let now = self.inner.settings.set(name, value)?;
        if name == settings::BACKUP_TARGET && before != now {
            // An nfs export the daemon mounted is not left behind.
            self.inner.release_backup_target(&before).await;
        }
        Ok(now)
    }

    /// Rebuilds the record of volume `name` from its replicas on this node
    /// and every reachable peer (after the owner's record was lost): a
    /// forced takeover without an old owner (see `control::handover`). The
    /// replicas at the highest revision are healthy; older ones are failed
    /// and get rebuilt once the volume is attached.
    pub async fn adopt(&self, name: &str) -> Result<VolumeInfo, ControlError> {
        self.take_over(name, None).await
    }

    /// Removes every device and flushes its replicas, but keeps each volume's
    /// wish to be attached, so the next cairnd attaches them again.
    pub async fn shutdown(&self) {
        let names: Vec<String> = self
            .inner
            .state
            .lock()
            .await
            .volumes
            .iter()
            .filter(|(_, v)| v.live.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let _op = self.inner.volume_lock(&name).await;
            if let Err(e) = self.inner.detach_volume(&name, true).await {
                tracing::error!(volume = %name, error = %e, "stopping volume at shutdown");
            }
        }
        self.inner.publish(&*self.inner.state.lock().await);
        if let Ok(target) = self.inner.settings.get(settings::BACKUP_TARGET) {
            self.inner.release_backup_target(&target).await;
        }
    }

    /// Per-volume metrics; synchronous, for the Prometheus scrape.
    pub fn samples(&self) -> Vec<VolumeSample> {
        let view = self.inner.view.lock().unwrap_or_else(|p| p.into_inner());
        view.iter()
            .map(|e| match &e.io {
                Some(io) => {
                    let rebuilds = self.inner.rebuild_infos(&e.name);
                    VolumeSample {
                        name: e.name.clone(),
                        size: e.size,
                        health: Some(io.health()),
                        replicas: e.replicas,
                        healthy_replicas: io
                            .replicas()
                            .iter()
                            .filter(|r| r.state == ReplicaState::Healthy)
                            .count() as u32,
                        revision: io.revision(),
                        io: io.stats(),
                        rebuild_done: rebuilds.iter().map(|(_, r)| r.done).sum(),
                        rebuild_total: rebuilds.iter().map(|(_, r)| r.total).sum(),
                        rebuilding_replicas: rebuilds.len() as u32,
                    }
                }
                None => VolumeSample {
                    name: e.name.clone(),
                    size: e.size,
                    health: None,
                    replicas: e.replicas,
                    healthy_replicas: e.healthy_in_record,
                    revision: e.revision,
                    io: Default::default(),
                    rebuild_done: 0,
                    rebuild_total: 0,
                    rebuilding_replicas: 0,
                },
            })
            .collect()
    }
}

impl Drop for VolumeManager {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Inner {
    /// Attaches volume `name` (known to exist and be detached); the caller
    /// holds the volume's lock. The state lock is held only to read the
    /// record and to apply the outcome, not while replicas are opened and
    /// the device starts (up to minutes), so other volumes' operations go
    /// on meanwhile. On error the record keeps what was learned (replicas
    /// that would not open are failed) but the volume stays detached.
    pub(super) async fn attach_volume(self: &Arc<Self>, name: &str) -> Result<(), ControlError> {
        // Before touching any replica file: opening replicas and starting an
        // epoch change them, and without the driver attach must change nothing.
        ublk_available()?;
        let mut guard = self.state.lock().await;
        let st = &mut *guard;
        let used: HashSet<u32> = st
            .volumes
            .values()
            .filter_map(|v| v.live.as_ref())
            .map(|l| l.device.dev_id())
            .collect();
        let salvage = self.settings.bool(settings::AUTO_SALVAGE);
        let v = st.volume_mut(name)?;
        let none_healthy = v
            .record
            .replicas
            .iter()
            .all(|r| r.state == RecordState::Failed);
        if none_healthy && !salvage {
            return Err(ControlError::NoHealthyReplica {
                volume: name.to_string(),
            });
        }
        if none_healthy {
            // Auto-salvage: every replica is a candidate; the epoch keeps
            // those at the highest revision and fails the rest.
            tracing::warn!(
                volume = name,
                "every replica is failed: auto-salvage from the newest"
            );
        }
        let replicas: Vec<AttachReplica> = v
            .record
            .replicas
            .iter()
            .map(|r| AttachReplica {
                name: r.name.clone(),
                addr: r.addr.clone(),
                wanted: none_healthy || r.state == RecordState::Healthy,
            })
            .collect();
        // A recorded device id is only a crashed daemon's device if no volume
        // of ours has it now; the frontend removes a stale device of that id.
        let recover = v.record.dev_id.filter(|id| !used.contains(id));
        let tx = self.events.clone();
        let vol = name.to_string();
        let sink: EventSink = Box::new(move |ev| {
            // Unbounded: never blocks the I/O thread. Fails only when the
            // manager is gone, and then nobody is left to tell.
            let _ = tx.send((vol.clone(), ev));
        });
        let size = v.record.size;
        let opts = FrontendOptions {
            queues: v.record.queues,
            queue_depth: v.record.queue_depth,
        };
        // Salvaging at attach: the replicas that were healthy last hold at
        // least the record's revision - 1 (the commit that faulted the
        // volume persisted its revision nowhere). Older ones alone would
        // drop writes acknowledged while the newest were the whole set.
        // The epoch mark knows of failures the record may not have learned
        // before a crash; its revision is what the last healthy set held.
        let mark = self.store.load_epoch(name);
        let salvage_floor = none_healthy.then(|| {
            v.record
                .revision
                .saturating_sub(1)
                .max(mark.as_ref().map_or(0, |m| m.revision))
        });
        let check = AttachCheck {
            owner: self.ownership(&v.record),
            salvage_floor,
            mark: if none_healthy { None } else { mark },
        };
        let vname = name.to_string();
        let me = self.clone();
        drop(guard);
        let outcome = tokio::task::spawn_blocking(move || {
            attach_blocking(&me, &vname, size, replicas, sink, &opts, recover, check)
        })
        .await?;
        let mut guard = self.state.lock().await;
        let v = guard.volume_mut(name)?;
        for (replica, reason) in &outcome.open_failed {
            tracing::warn!(volume = name, %replica, %reason, "replica cannot be opened; marked failed");
            v.record.set_failed(replica, reason);
        }
        if let Some(rev) = outcome.revision {
            v.record.revision = rev;
        }
        match outcome.result {
            Ok((io, device)) => {
                if none_healthy {
                    // Salvaged: the record trusts what the epoch kept.
                    for (r, s) in v.record.replicas.iter_mut().zip(io.replicas()) {
                        if s.state == ReplicaState::Healthy {
                            r.state = RecordState::Healthy;
                            r.message.clear();
                            r.failed_at = None;
                        }
                    }
                }
                v.record.sync_from(&io);
                v.record.attached = true;
                v.record.dev_id = Some(device.dev_id());
                let path = device.path();
                if let Err(e) = self.store.save(&v.record) {
                    // Unrecorded, the device would not come back after a
                    // restart: better not to have it at all.
                    v.record.attached = false;
                    v.record.dev_id = None;
                    let _ = tokio::task::spawn_blocking(move || {
                        let _ = device.stop();
                        let _ = io.flush();
                    })
                    .await;
                    return Err(e);
                }
                tracing::info!(volume = name, device = %path.display(), revision = v.record.revision, "volume attached");
                v.message.clear();
                v.live = Some(Live { io, device });
                Ok(())
            }
            Err(e) => {
                if !outcome.open_failed.is_empty() || outcome.revision.is_some() {
                    self.store.save(&v.record)?;
                }
                Err(e)
            }
        }
    }

    /// Stops the device and flushes. `keep_wanted` (shutdown) keeps the
    /// record's wish to be attached; a clean stop always forgets the device
    /// id, since the device is gone and its id may be reused by anyone.
    ///
    /// The caller holds the volume's lock; the state lock is held only to
    /// take the device out and to record the result, not while the device
    /// stops and the replicas flush.
    pub(super) async fn detach_volume(
        &self,
        name: &str,
        keep_wanted: bool,
    ) -> Result<(), ControlError> {
        self.cancel_rebuilds(name);
        let live = {
            let mut st = self.state.lock().await;
            let live = st.volume_mut(name)?.live.take();
            if live.is_some() {
                self.publish(&st);
            }
            live
        };
        let was_live = live.is_some();
        let mut stop_err = None;
        let stopped_io = match live {
            Some(Live { io, device }) => {
                let io2 = io.clone();
                let (stopped, flushed) = tokio::task::spawn_blocking(move || {
                    let stopped = device.stop();
                    // Clean only if the device is gone: a request may still
                    // arrive otherwise, and the intent log must stay.
                    let flushed = if stopped.is_ok() {
                        io2.flush_and_close()
                    } else {
                        io2.flush()
                    };
                    (stopped, flushed)
                })
                .await?;
                Some((io, stopped, flushed))
            }
            None => None,
        };
        let mut st = self.state.lock().await;
        let v = st.volume_mut(name)?;
        if let Some((io, stopped, flushed)) = stopped_io {
            v.record.sync_from(&io);
            v.message.clear();
            if let Err(e) = flushed {
                tracing::error!(volume = name, error = %e, "flush at detach");
                v.message = format!("last flush failed: {e}");
            }
            stop_err = stopped.err();
        }
        if !keep_wanted && !was_live {
            // The operator asked for detached: a reason it is not attached is moot.
            v.message.clear();
        }
        let changed = was_live || v.record.attached != keep_wanted || v.record.dev_id.is_some();
        v.record.attached = keep_wanted && v.record.attached;
        v.record.dev_id = None;
        if changed || stop_err.is_some() {
            self.store.save(&v.record)?;
        }
        tracing::info!(volume = name, "volume detached");
        match stop_err {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Applies an engine event to the record.
    fn apply_event(&self, st: &mut State, volume: &str, ev: EngineEvent) {
        let (replica, reason) = match ev {
            EngineEvent::ReplicaFailed { replica, reason } => (replica, reason),
            EngineEvent::Fenced { reason } => {
                // The record is the new owner's business now; keep ours as it
                // is and tell the operator.
                if let Ok(v) = st.volume_mut(volume) {
                    v.message = format!(
                        "fenced: {reason}; another node owns this volume now, detach it here"
                    );
                }
                self.publish(st);
                return;
            }
        };
        let Ok(v) = st.volume_mut(volume) else { return };
        if !v.record.set_failed(&replica, &reason) {
            return;
        }
        if let Some(live) = &v.live {
            v.record.revision = live.io.revision();
        }
        if let Err(e) = self.store.save(&v.record) {
            tracing::error!(volume, %replica, error = %e, "cannot record replica failure");
        }
        self.publish(st);
    }

    /// Names of the volumes whose records are here (from the last publish),
    /// but for those another engine fenced: they are another node's now.
    pub(super) fn owned_names(&self) -> Vec<String> {
        self.placements().into_iter().map(|p| p.volume).collect()
    }

    /// Whether volume `name` has a record here (fenced or not).
    pub(super) fn has_record(&self, name: &str) -> bool {
        self.view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|e| e.name == name)
    }

    /// Where the replicas of the volumes in [`Inner::owned_names`] are.
    pub(super) fn placements(&self) -> Vec<VolumePlacement> {
        self.view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|e| !e.io.as_ref().is_some_and(|io| io.is_fenced()))
            .map(|e| e.placement.clone())
            .collect()
    }

    pub(super) fn publish(&self, st: &State) {
        let entries = st
            .volumes
            .values()
            .map(|v| ViewEntry {
                name: v.record.name.clone(),
                placement: VolumePlacement {
                    volume: v.record.name.clone(),
                    owner_term: v.record.owner_term,
                    size: v.record.size,
                    replicas: v
                        .record
                        .replicas
                        .iter()
                        .map(|r| ReplicaPlace {
                            replica: r.name.clone(),
                            node: r.node.clone(),
                        })
                        .collect(),
                },
                size: v.record.size,
                replicas: v.record.replicas.len() as u32,
                healthy_in_record: v
                    .record
                    .replicas
                    .iter()
                    .filter(|r| r.state == RecordState::Healthy)
                    .count() as u32,
                revision: v.record.revision,
                io: v.live.as_ref().map(|l| l.io.clone()),
            })
            .collect();
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = entries;
    }
}

impl State {
    pub(super) fn volume(&self, name: &str) -> Result<&Volume, ControlError> {
        self.volumes
            .get(name)
            .ok_or_else(|| ControlError::NotFound {
                name: name.to_string(),
            })
    }

    pub(super) fn volume_mut(&mut self, name: &str) -> Result<&mut Volume, ControlError> {
        self.volumes
            .get_mut(name)
            .ok_or_else(|| ControlError::NotFound {
                name: name.to_string(),
            })
    }

    fn replicas_on(&self, disk: &Path) -> usize {
        self.volumes
            .values()
            .flat_map(|v| &v.record.replicas)
            .filter(|r| r.disk == disk)
            .count()
    }
}

impl VolumeRecord {
    /// Marks `replica` failed; false if it was already failed or is unknown.
    pub(super) fn set_failed(&mut self, replica: &str, reason: &str) -> bool {
        match self.replicas.iter_mut().find(|r| r.name == replica) {
            Some(r) if r.state == RecordState::Healthy => {
                r.state = RecordState::Failed;
                r.message = reason.to_string();
                r.failed_at = Some(unix_now());
                true
            }
            _ => false,
        }
    }

    /// `(name, addr)` of the replicas the record calls healthy.
    pub(super) fn healthy_targets(&self) -> Vec<(String, String)> {
        self.replicas
            .iter()
            .filter(|r| r.state == RecordState::Healthy)
            .map(|r| (r.name.clone(), r.addr.clone()))
            .collect()
    }

    /// Copies the engine's failures and revision into the record.
    pub(super) fn sync_from(&mut self, io: &VolumeIo) {
        for s in io.replicas() {
            if s.state == ReplicaState::Failed {
                self.set_failed(&s.name, &s.message);
            }
        }
        self.revision = io.revision();
    }
}

impl Volume {
    pub(super) fn info(&self, inner: &Inner) -> VolumeInfo {
        let live = self.live.as_ref().map(|l| (l, l.io.replicas()));
        let rebuilds = inner.rebuild_infos(&self.record.name);
        let replicas: Vec<ReplicaInfo> = self
            .record
            .replicas
            .iter()
            .enumerate()
            .map(|(i, r)| {
                // The engine's slot i is record replica i (same order); a
                // slot being refilled by a replacement has the new name.
                let slot = live.as_ref().and_then(|(_, st)| st.get(i));
                let engine = slot.filter(|s| s.name == r.name);
                let replacing =
                    slot.filter(|s| s.name != r.name && s.state == ReplicaState::Rebuilding);
                let (state, message) = match (engine, replacing) {
                    (Some(s), _) => (s.state, s.message.clone()),
                    (None, Some(s)) => (
                        ReplicaState::Rebuilding,
                        format!("being replaced by {}", s.name),
                    ),
                    (None, None) => match r.state {
                        RecordState::Healthy => (ReplicaState::Healthy, r.message.clone()),
                        RecordState::Failed => (ReplicaState::Failed, r.message.clone()),
                    },
                };
                ReplicaInfo {
                    name: r.name.clone(),
                    node: r.node.clone(),
                    addr: r.addr.clone(),
                    disk: r.disk.clone(),
                    dir: r.dir.clone(),
                    state,
                    message,
                    rebuild: rebuilds
                        .iter()
                        .find(|(slot, _)| *slot == i)
                        .map(|(_, info)| info.clone()),
                    last_rebuild: r.last_rebuild.clone(),
                }
            })
            .collect();
        let (state, device, revision) = match &live {
            None => (VolumeState::Detached, None, self.record.revision),
            Some((l, _)) => {
                let state = if l.io.is_fenced() {
                    VolumeState::Fenced
                } else if l.io.health() == VolumeHealth::Faulted {
                    VolumeState::Faulted
                } else if replicas.iter().any(|r| r.state != ReplicaState::Healthy) {
                    VolumeState::Degraded
                } else {
                    VolumeState::Healthy
                };
                (state, Some(l.device.path()), l.io.revision())
            }
        };
        VolumeInfo {
            name: self.record.name.clone(),
            state,
            size: self.record.size,
            device,
            revision,
            queues: self.record.queues,
            queue_depth: self.record.queue_depth,
            message: self.message.clone(),
            replicas,
            standby: self.record.standby,
            from_backup: self.record.from_backup.clone(),
            last_restored: self.record.last_restored.clone(),
            recurring_jobs: self.record.recurring_jobs.clone(),
            last_backup: self.record.last_backup.clone(),
            owner: inner.node_id.clone(),
            restore: inner.restore_info(&self.record.name),
        }
    }
}

/// What the blocking half of attach found out.
struct AttachOutcome {
    /// Replicas that could not be opened, with why.
    open_failed: Vec<(String, String)>,
    /// Revision after the epoch started, if it did.
    revision: Option<u64>,
    result: Result<(Arc<VolumeIo>, UblkDevice), ControlError>,
}

/// A replica as attach needs it: where it is and whether the record trusts it.
pub(super) struct AttachReplica {
    pub name: String,
    pub addr: String,
    /// Healthy in the record (or a salvage candidate).
    pub wanted: bool,
}

/// What attach must check before it trusts the replicas it opened.
struct AttachCheck {
    /// Salvaging: the revision the last healthy set held.
    salvage_floor: Option<u64>,
    /// Not salvaging: the engine's last committed replica set.
    mark: Option<super::store::EpochMark>,
    /// The ownership the replicas are claimed with.
    owner: OwnerTerm,
}

// The blocking half of one call: every argument is a piece of that call.
#[allow(clippy::too_many_arguments)]
fn attach_blocking(
    inner: &Inner,
    name: &str,
    size: u64,
    replicas: Vec<AttachReplica>,
    sink: EventSink,
    opts: &FrontendOptions,
    recover: Option<u32>,
    check: AttachCheck,
) -> AttachOutcome {
    let salvage_floor = check.salvage_floor;
    let mut open_failed = Vec::new();
    let mut handles = Vec::new();
    for r in replicas {
        if !r.wanted {
            handles.push(ReplicaHandle {
                name: r.name,
                io: None,
            });
            continue;
        }
        let claim = Claim::Takeover {
            owner: check.owner.clone(),
        };
        match inner.open_replica(name, &r.name, &r.addr, claim) {
            // The volume moved: another node took it over at a later term.
            // Nothing here may claim any of its replicas again.
            Err(OpenError::Fenced(reason)) => {
                return fail_taken_over(open_failed, name, reason);
            }
            Ok(ReplicaIo::Local(l)) if !check.owner.may_take_over(&l.owner_term()) => {
                let reason = format!(
                    "local replica {} was taken over by {} (this node claims {})",
                    r.name,
                    l.owner_term(),
                    check.owner
                );
                return fail_taken_over(open_failed, name, reason);
            }
            Ok(io) if io.size() != size => {
                open_failed.push((
                    r.name.clone(),
                    format!("replica holds {} bytes, the volume has {size}", io.size()),
                ));
                handles.push(ReplicaHandle {
                    name: r.name,
                    io: None,
                });
            }
            Ok(io)
                if check
                    .mark
                    .as_ref()
                    .is_some_and(|m| !m.trusts(&r.name, io.revision())) =>
            {
                let rev = check.mark.as_ref().map_or(0, |m| m.revision);
                open_failed.push((
                    r.name.clone(),
                    format!("left the healthy set at revision {rev} (it is at {}): it missed acknowledged writes and is rebuilt once a trusted replica is back", io.revision()),
                ));
                handles.push(ReplicaHandle {
                    name: r.name,
                    io: None,
                });
            }
            Ok(io) => handles.push(ReplicaHandle {
                name: r.name,
                io: Some(io),
            }),
            Err(e) => {
                open_failed.push((r.name.clone(), e.to_string()));
                handles.push(ReplicaHandle {
                    name: r.name,
                    io: None,
                });
            }
        }
    }
    let fail = |open_failed, revision, e: ControlError| AttachOutcome {
        open_failed,
        revision,
        result: Err(e),
    };
    if handles.iter().all(|h| h.io.is_none()) {
        return fail(
            open_failed,
            None,
            ControlError::NoHealthyReplica {
                volume: name.to_string(),
            },
        );
    }
    if let Some(floor) = salvage_floor {
        let best = handles
            .iter()
            .filter_map(|h| h.io.as_ref().map(ReplicaIo::revision))
            .max()
            .unwrap_or(0);
        if super::repair::salvage_must_wait(best, floor, open_failed.is_empty()) {
            let missing: Vec<&str> = open_failed.iter().map(|(n, _)| n.as_str()).collect();
            return fail(
                open_failed.clone(),
                None,
                ControlError::NoHealthyReplicaFor {
                    volume: name.to_string(),
                    reason: format!(
                        "auto-salvage waits for a replica holding the newest writes: the reachable replicas are at revision {best}, the volume was at {floor}; bring back {} (or delete the volume)",
                        missing.join(", ")
                    ),
                },
            );
        }
    }
    let layout = QueueLayout {
        queues: opts.queues,
        depth: opts.queue_depth,
    };
    let io = match VolumeIo::new(name, size, handles, sink, layout) {
        Ok(io) => io,
        Err(e) => return fail(open_failed, None, e.into()),
    };
    io.set_owner(check.owner.clone());
    let mark_path = inner.store.epoch_path(name);
    io.set_epoch_log(Box::new(move |revision, healthy| {
        super::store::write_epoch(
            &mark_path,
            &super::store::EpochMark {
                revision,
                healthy: healthy.to_vec(),
            },
        )
    }));
    // What the last engine left: after an unclean stop the replicas may
    // differ in writes never acknowledged, so one serves while the others
    // resync. Read before the epoch, replaced only once the resync is
    // committed (a crash in between finds the old log again).
    let intent_path = inner.store.intent_path(name);
    let leftover = IntentLog::leftover(&intent_path, size);
    let epoch = io.begin_epoch().and_then(|r| match &leftover {
        Leftover::Clean => Ok(r),
        Leftover::Chunks(ranges) => io.resync_after_unclean_stop(Some(ranges)),
        Leftover::Unknown(why) => {
            tracing::warn!(volume = name, reason = %why, "the last stop was unclean and where the replicas may differ is unknown");
            io.resync_after_unclean_stop(None)
        }
    });
    let revision = match epoch {
        Ok(r) => r,
        Err(_) => {
            return fail(
                open_failed,
                Some(io.revision()),
                ControlError::NoHealthyReplica {
                    volume: name.to_string(),
                },
            )
        }
    };
    match IntentLog::create(&intent_path, size) {
        Ok(log) => io.set_intent_log(log),
        Err(e) => {
            return fail(
                open_failed,
                Some(revision),
                ControlError::Internal(format!("volume {name}: {e}")),
            )
        }
    }
    match UblkDevice::start(io.clone(), opts, recover) {
        Ok(dev) => AttachOutcome {
            open_failed,
            revision: Some(revision),
            result: Ok((io, dev)),
        },
        Err(e) => fail(open_failed, Some(revision), e.into()),
    }
}

fn fail_taken_over(
    open_failed: Vec<(String, String)>,
    volume: &str,
    reason: String,
) -> AttachOutcome {
    AttachOutcome {
        open_failed,
        revision: None,
        result: Err(ControlError::TakenOver {
            volume: volume.to_string(),
            reason,
        }),
    }
}

/// Startup: attaches every volume whose record wants it, one at a time,
/// each under its volume lock taken in `open` (API calls on it wait).
async fn restore(inner: Arc<Inner>, wanted: Vec<(String, OwnedMutexGuard<()>)>) {
    if wanted.is_empty() {
        return;
    }
    if let Err(e) = ublk_available() {
        // Once, not per volume: the cause is the node, not the volumes.
        tracing::error!(
            "{e}; {} volume(s) stay detached until cairnd restarts with the driver loaded",
            wanted.len()
        );
        let mut st = inner.state.lock().await;
        for (name, _) in &wanted {
            if let Ok(v) = st.volume_mut(name) {
                v.message = format!("not attached: {e}");
            }
        }
        inner.publish(&st);
        return;
    }
    for (name, _op) in wanted {
        let result = inner.attach_volume(&name).await;
        let mut st = inner.state.lock().await;
        match result {
            Ok(()) => {}
            Err(ControlError::TakenOver { reason, .. }) => inner.retire(&mut st, &name, &reason),
            Err(e) => {
                tracing::error!(volume = %name, error = %e, "cannot re-attach volume");
                if let Ok(v) = st.volume_mut(&name) {
                    v.message = format!("not attached: {e}");
                }
            }
        }
        inner.publish(&st);
    }
}

async fn event_loop(inner: Weak<Inner>, mut rx: mpsc::UnboundedReceiver<(String, EngineEvent)>) {
    while let Some((volume, ev)) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let state = inner.state.clone();
        let mut st = state.lock().await;
        inner.apply_event(&mut st, &volume, ev);
    }
}

async fn check_loop(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    let mut ticks = 0u64;
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = inner.upgrade().map(|i| i.state.clone()) else {
            return;
        };
        if let Some(i) = inner.upgrade() {
            if i.cluster.enabled() {
                i.settle_handovers().await;
                i.settle_ownership().await;
            }
        }
        let ios: Vec<Arc<VolumeIo>> = state
            .lock()
            .await
            .volumes
            .values()
            .filter_map(|v| v.live.as_ref().map(|l| l.io.clone()))
            .collect();
        if ios.is_empty() {
            continue;
        }
        ticks += 1;
        let settle = ticks % SETTLE_EVERY == 0;
        // Failures found here reach the record through the event channel.
        let _ = tokio::task::spawn_blocking(move || {
            for io in &ios {
                io.check_replicas();
                if settle {
                    io.settle_intent();
                }
            }
        })
        .await;
    }
}

/// Checks the configured disks and returns them as absolute paths. The default
/// disk is created; a disk named with `--disk` must already exist, so a typo
/// does not quietly put replicas on the root filesystem.
fn prepare_disks(config: &NodeConfig) -> Result<Vec<PathBuf>, ControlError> {
    let create = config.disks.is_empty();
    let mut out: Vec<PathBuf> = Vec::new();
    for disk in config.disk_paths() {
        if create {
            std::fs::create_dir_all(&disk).map_err(ControlError::io(&disk))?;
        }
        match std::fs::metadata(&disk) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(ControlError::BadDisk {
                    path: disk,
                    reason: "is not a directory",
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ControlError::BadDisk {
                    path: disk,
                    reason: "does not exist",
                })
            }
            Err(e) => return Err(ControlError::io(&disk)(e)),
        }
        let abs = std::fs::canonicalize(&disk).map_err(ControlError::io(&disk))?;
        if out.contains(&abs) {
            return Err(ControlError::DuplicateDisk { path: disk });
        }
        let replicas = abs.join("replicas");
        std::fs::create_dir_all(&replicas).map_err(ControlError::io(&replicas))?;
        out.push(abs);
    }
    Ok(out)
}

/// Why a replica could not be opened.
#[derive(Debug)]
pub(super) enum OpenError {
    /// Its node did not answer (down, partitioned): it may come back.
    Unreachable(String),
    /// Its node answered, or it is local, and the replica is missing or
    /// unusable: it must be replaced.
    Broken(String),
    /// A newer owner session holds it: this engine lost the volume.
    Fenced(String),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Unreachable(s) | OpenError::Broken(s) | OpenError::Fenced(s) => {
                f.write_str(s)
            }
        }
    }
}

/// `<volume>-r-<8 random hex>`.
pub(super) fn random_replica_name(volume: &str) -> Result<String, ControlError> {
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(ControlError::io("/dev/urandom"))?;
    Ok(format!("{volume}-r-{:08x}", u32::from_le_bytes(b)))
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Inner {
    /// The placement settings now.
    /// Serializes the operations on volume `name` (attach, detach, delete,
    /// snapshot, expand, handover, ...): one at a time per volume, while
    /// operations on other volumes go on. The state lock is taken only for
    /// short sections inside; it is never held across replica connections
    /// or a device start or stop.
    pub(super) async fn volume_lock(&self, name: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            // Locks nobody holds or waits for are dropped.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            locks.entry(name.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// The volume lock of `name` if nobody holds it now.
    pub(super) fn try_volume_lock(&self, name: &str) -> Option<OwnedMutexGuard<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks
            .entry(name.to_string())
            .or_default()
            .clone()
            .try_lock_owned()
            .ok()
    }

    /// Schedules the recurring jobs in `record` (validated when they were
    /// set; an invalid one is logged and skipped).
    pub(super) fn schedule_jobs(&self, record: &VolumeRecord) {
        if record.recurring_jobs.is_empty() {
            return;
        }
        let now = self.clock.now();
        match crate::jobs::parse_jobs(&record.recurring_jobs) {
            Ok(jobs) => {
                if let Err(e) = self.scheduler().set_jobs(&record.name, &jobs, now) {
                    tracing::error!(volume = %record.name, error = %e, "recurring jobs not scheduled");
                }
            }
            Err(e) => {
                tracing::error!(volume = %record.name, error = %e, "recurring jobs in the record are invalid")
            }
        }
    }

    /// Stops the recurring jobs of volume `name`.
    pub(super) fn unschedule(&self, name: &str) {
        self.scheduler().remove_volume(name);
    }

    /// The ownership this node claims volume `record`'s replicas with.
    pub(super) fn ownership(&self, record: &VolumeRecord) -> OwnerTerm {
        OwnerTerm::new(record.owner_term, &self.node_id)
    }

    pub(super) fn rules(&self) -> Rules {
        Rules {
            soft_anti_affinity: self.settings.bool(settings::REPLICA_SOFT_ANTI_AFFINITY),
            over_provisioning: self.settings.u64(settings::OVER_PROVISIONING) as u32,
            min_available: self.settings.u64(settings::MIN_AVAILABLE) as u32,
        }
    }

    /// Places and creates `count` replicas of `volume` on the cluster's
    /// nodes, avoiding the nodes in `taken`. All or nothing. Blocking.
    pub(super) fn create_replicas(
        &self,
        volume: &str,
        count: u32,
        size: u64,
        taken: &[String],
        replaces: Option<&str>,
    ) -> Result<Vec<ReplicaRecord>, ControlError> {
        let rules = self.rules();
        let nodes = self.cluster.nodes_with(self.disks.report());
        let candidates: Vec<NodeCandidate> = nodes
            .iter()
            .map(|n| NodeCandidate {
                name: n.name.clone(),
                local: n.local,
                up: n.up,
                disks: n
                    .report
                    .as_ref()
                    .map(|r| r.disks.clone())
                    .unwrap_or_default(),
            })
            .collect();
        let chosen = placement::place_nodes(volume, count, size, &candidates, taken, rules)?;
        let mut made: Vec<ReplicaRecord> = Vec::new();
        for node in chosen {
            let Some(view) = nodes.iter().find(|n| n.name == node) else {
                continue;
            };
            let rname = random_replica_name(volume)?;
            let result = if view.local {
                self.disks
                    .create(volume, &rname, size, replaces, |d| {
                        disk_fits(d, size, rules.over_provisioning, rules.min_available)
                    })
                    .map_err(ControlError::from)
                    .map(|(disk, dir)| (disk, dir, String::new()))
            } else {
                let op = Op::CreateReplica {
                    volume: volume.to_string(),
                    replica: rname.clone(),
                    size,
                    over_provisioning: rules.over_provisioning,
                    min_available: rules.min_available,
                    replaces: replaces.unwrap_or_default().to_string(),
                };
                match self.cluster.call(&view.addr, op) {
                    Ok(Op::Created { disk, dir }) => {
                        Ok((PathBuf::from(disk), PathBuf::from(dir), view.addr.clone()))
                    }
                    Ok(other) => Err(ControlError::Internal(format!(
                        "node {node} answered {other:?} to CreateReplica"
                    ))),
                    Err(e) => Err(e.into()),
                }
            };
            match result {
                Ok((disk, dir, addr)) => {
                    made.push(ReplicaRecord::new(rname, node.clone(), addr, disk, dir))
                }
                Err(e) => {
                    for r in &made {
                        self.delete_replica(&r.name, &r.addr);
                    }
                    return Err(e);
                }
            }
        }
        Ok(made)
    }

    /// Deletes a replica here or on its node; a failure is logged (the
    /// replica stays behind as an orphan on that node).
    pub(super) fn delete_replica(&self, name: &str, addr: &str) {
        let result = if addr.is_empty() {
            self.disks.delete(name).map_err(|e| e.to_string())
        } else {
            match self.cluster.call(
                addr,
                Op::DeleteReplica {
                    replica: name.to_string(),
                },
            ) {
                Ok(Op::Ok) => Ok(()),
                Ok(other) => Err(format!("answered {other:?}")),
                Err(e) => Err(e.to_string()),
            }
        };
        if let Err(e) = result {
            tracing::warn!(replica = name, %addr, error = %e, "cannot delete replica; it stays behind on its node");
        }
    }

    /// Opens a replica for the engine: the shared local object, or a
    /// connection to its node. Blocking. Errors say whether the replica is
    /// unusable or only out of reach.
    /// Opens replica `name` of `volume` here or on its node. A remote one is
    /// bound to an owner session by `claim` (see `replica::fence`); a local
    /// one is claimed by the engine that installs it, or used directly by
    /// the control plane of a detached volume.
    pub(super) fn open_replica(
        &self,
        volume: &str,
        name: &str,
        addr: &str,
        claim: Claim,
    ) -> Result<ReplicaIo, OpenError> {
        if addr.is_empty() {
            return self
                .disks
                .open(volume, name)
                .map(ReplicaIo::Local)
                .map_err(|e| OpenError::Broken(e.to_string()));
        }
        let Some(secret) = self.cluster.secret() else {
            return Err(OpenError::Unreachable(
                "this node runs standalone and cannot reach remote replicas".into(),
            ));
        };
        let target = RemoteTarget {
            addr: addr.to_string(),
            volume: volume.to_string(),
            replica: name.to_string(),
            secret: secret.clone(),
            node: self.node_id.clone(),
            timeout: Duration::from_secs(self.settings.u64(settings::REPLICA_TIMEOUT).max(1)),
        };
        RemoteReplica::connect(target, claim)
            .map(|r| ReplicaIo::Remote(Arc::new(r)))
            .map_err(|e| match e {
                // A newer owner holds it: we must not take it back.
                _ if e.is_fenced() => OpenError::Fenced(e.to_string()),
                // The node answered: the replica itself is missing or unusable.
                PeerError::Remote { .. } => OpenError::Broken(e.to_string()),
                _ => OpenError::Unreachable(e.to_string()),
            })
    }

    /// Every replica on this node and on every reachable peer. Blocking.
    pub(super) fn find_replicas(&self) -> Vec<(NodeView, ReplicaReport)> {
        let mut out = Vec::new();
        for node in self.cluster.nodes_with(self.disks.report()) {
            let list = if node.local {
                self.disks.list()
            } else {
                match self.cluster.call(&node.addr, Op::ListReplicas) {
                    Ok(Op::Replicas { replicas }) => replicas,
                    _ => continue,
                }
            };
            out.extend(list.into_iter().map(|r| (node.clone(), r)));
        }
        out
    }

    /// Asks every rebuild of `volume` to stop (detach, delete).
    pub(super) fn restore_info(&self, volume: &str) -> Option<RebuildInfo> {
        let map = self.restores.lock().unwrap_or_else(|p| p.into_inner());
        let p = map.get(volume)?;
        Some(RebuildInfo {
            percent: p.percent(),
            done: p.done(),
            total: p.total(),
            rate: p.rate(),
            incremental: false,
        })
    }

    pub(super) fn has_rebuilds(&self, volume: &str) -> bool {
        self.rebuilds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume)
            .is_some_and(|v| !v.is_empty())
    }

    pub(super) fn copying(&self) -> std::sync::MutexGuard<'_, Vec<(String, String)>> {
        self.copying.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn snapshot_in_use(&self, volume: &str, snapshot: &str) -> bool {
        if self
            .copying()
            .iter()
            .any(|(v, s)| v == volume && s == snapshot)
        {
            return true;
        }
        self.backups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|b| b.failed.is_none() && b.volume == volume && b.snapshot == snapshot)
    }

    pub(super) fn backup_running(&self, volume: &str) -> bool {
        self.backups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|b| b.failed.is_none() && b.volume == volume)
    }

    pub(super) fn cancel_rebuilds(&self, volume: &str) {
        let rebuilds = self.rebuilds.lock().unwrap_or_else(|p| p.into_inner());
        for r in rebuilds.get(volume).into_iter().flatten() {
            r.cancel.store(true, Ordering::Relaxed);
        }
    }

    /// Progress of the rebuilds of `volume`, by slot.
    pub(super) fn rebuild_infos(&self, volume: &str) -> Vec<(usize, RebuildInfo)> {
        let rebuilds = self.rebuilds.lock().unwrap_or_else(|p| p.into_inner());
        rebuilds
            .get(volume)
            .map(|list| {
                list.iter()
                    .map(|r| {
                        let p = &r.progress;
                        (
                            r.slot,
                            RebuildInfo {
                                percent: p.percent(),
                                done: p.done.load(Ordering::Relaxed),
                                total: p.total.load(Ordering::Relaxed),
                                rate: p.rate(),
                                incremental: p.incremental.load(Ordering::Relaxed),
                            },
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_missing_scheduling_rule_allows_and_a_corrupt_one_allows_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            load_scheduling(tmp.path()),
            crate::disks::Scheduling::default()
        );
        let rule = crate::disks::Scheduling {
            allow: true,
            unschedulable_disks: vec![PathBuf::from("/d1")],
        };
        std::fs::write(
            tmp.path().join(SCHEDULING_FILE),
            serde_json::to_vec(&rule).unwrap(),
        )
        .unwrap();
        assert_eq!(load_scheduling(tmp.path()), rule);
        // Torn or garbled: the operator's rule is not dropped to "allow".
        std::fs::write(tmp.path().join(SCHEDULING_FILE), b"{\"allow\": tr").unwrap();
        let read = load_scheduling(tmp.path());
        assert!(!read.allow, "{read:?}");
    }

    /// Every path under `root` with the file contents: "changes nothing"
    /// means this is equal before and after.
    fn snapshot(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(p) = stack.pop() {
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                for e in std::fs::read_dir(&p).unwrap() {
                    stack.push(e.unwrap().path());
                }
                out.push((p, Vec::new()));
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
        out.sort();
        out
    }

    async fn manager(root: &Path, disks: usize) -> VolumeManager {
        let mut config = NodeConfig::new(root.join("data"));
        config.node_id = "n1".into();
        for i in 0..disks {
            let d = root.join(format!("disk{i}"));
            std::fs::create_dir_all(&d).unwrap();
            config.disks.push(d);
        }
        VolumeManager::open(config).await.unwrap()
    }

    #[tokio::test]
    async fn bad_input_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let m = manager(tmp.path(), 2).await;
        m.create("good", 1 << 20, Some(2), "").await.unwrap();
        let before = snapshot(tmp.path());
        let cases: Vec<(&str, u64, Option<u32>, &str)> = vec![
            ("Bad_Name", 1 << 20, None, "DNS-1123"),
            ("", 1 << 20, None, "empty"),
            ("z", 0, None, "size is zero"),
            (
                "u",
                1000,
                None,
                "size 1000 is not a multiple of 4096 bytes: round it to e.g. 4KiB/1MiB",
            ),
            (
                "good",
                1 << 20,
                None,
                "volume \"good\" already exists: pick another name or delete it first",
            ),
            (
                "many",
                1 << 20,
                Some(3),
                "wants 3 replicas but this node has 2 disks",
            ),
            ("zero", 1 << 20, Some(0), "needs at least 1 replica"),
        ];
        for (name, size, replicas, want) in cases {
            let e = m
                .create(name, size, replicas, "")
                .await
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(want),
                "create({name:?}, {size}, {replicas:?}): {e}"
            );
            assert_eq!(
                snapshot(tmp.path()),
                before,
                "create({name:?}) changed the data dir"
            );
        }
        let e = m.fail_replica("good", "nope").await.unwrap_err();
        assert!(matches!(e, ControlError::UnknownReplica { .. }), "{e}");
        let e = m.delete("nope", false).await.unwrap_err();
        assert!(matches!(e, ControlError::NotFound { .. }), "{e}");
        if !Path::new("/dev/ublk-control").exists() {
            let e = m.attach("good").await.unwrap_err().to_string();
            assert_eq!(
                e,
                "ublk driver not available: load it with `modprobe ublk_drv`, kernel 6.0 or newer"
            );
        }
        assert_eq!(snapshot(tmp.path()), before);
        assert_eq!(m.get("good").await.unwrap().state, VolumeState::Detached);
    }

    #[tokio::test]
    async fn default_replicas_and_placement_spread() {
        let tmp = tempfile::tempdir().unwrap();
        let one = manager(&tmp.path().join("one"), 0).await;
        assert_eq!(one.default_replicas(), 1);
        let v = one.create("a", 1 << 20, None, "").await.unwrap();
        assert_eq!(v.replicas.len(), 1);
        assert!(v.replicas[0]
            .dir
            .starts_with(tmp.path().join("one/data/disks/default/replicas")));

        let m = manager(&tmp.path().join("three"), 3).await;
        assert_eq!(m.default_replicas(), 2);
        let a = m.create("a", 1 << 20, None, "").await.unwrap();
        let b = m.create("b", 1 << 20, Some(1), "").await.unwrap();
        // `b` goes to the one disk `a` left empty.
        assert!(
            a.replicas.iter().all(|r| r.disk != b.replicas[0].disk),
            "{a:?} {b:?}"
        );
        for r in &a.replicas {
            assert!(
                r.name.starts_with("a-r-") && r.name.len() == "a-r-".len() + 8,
                "{}",
                r.name
            );
            assert!(r.dir.join("volume.meta").is_file());
            assert_eq!(r.node, "n1");
        }
    }

    #[tokio::test]
    async fn fail_detached_replica_persists_and_keeps_last() {
        let tmp = tempfile::tempdir().unwrap();
        let m = manager(tmp.path(), 2).await;
        let v = m.create("v", 1 << 20, Some(2), "").await.unwrap();
        let (r0, r1) = (v.replicas[0].name.clone(), v.replicas[1].name.clone());
        let v = m.fail_replica("v", &r1).await.unwrap();
        assert_eq!(v.replicas[1].state, ReplicaState::Failed);
        assert_eq!(v.replicas[1].message, OPERATOR_FAILED);
        // Idempotent on a failed replica; refuses the last healthy one.
        m.fail_replica("v", &r1).await.unwrap();
        let e = m.fail_replica("v", &r0).await.unwrap_err();
        assert!(matches!(e, ControlError::LastHealthyReplica { .. }), "{e}");
        m.shutdown().await;
        drop(m);
        let m = manager(tmp.path(), 2).await;
        let v = m.get("v").await.unwrap();
        assert_eq!(v.replicas[0].state, ReplicaState::Healthy);
        assert_eq!(v.replicas[1].state, ReplicaState::Failed);
    }

    #[tokio::test]
    async fn corrupt_record_is_skipped_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        let m = manager(tmp.path(), 1).await;
        m.create("ok", 1 << 20, None, "").await.unwrap();
        drop(m);
        std::fs::write(tmp.path().join("data/volumes/broken.json"), b"not json").unwrap();
        let m = manager(tmp.path(), 1).await;
        let names: Vec<String> = m.list().await.into_iter().map(|v| v.name).collect();
        assert_eq!(names, vec!["ok".to_string()]);
    }

    #[tokio::test]
    async fn bad_disks_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = NodeConfig::new(tmp.path().join("data"));
        c.disks = vec![tmp.path().join("missing")];
        let e = VolumeManager::open(c.clone()).await.err().unwrap();
        assert!(e.to_string().contains("does not exist"), "{e}");
        std::fs::create_dir(tmp.path().join("d")).unwrap();
        c.disks = vec![tmp.path().join("d"), tmp.path().join("d/../d")];
        let e = VolumeManager::open(c).await.err().unwrap();
        assert!(matches!(e, ControlError::DuplicateDisk { .. }), "{e}");
    }
}
