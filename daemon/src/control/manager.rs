//! `VolumeManager`: the volume lifecycle on one node. See the module docs of
//! [`crate::control`] for the locking rules.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, Mutex, OwnedMutexGuard};
use tokio::task::JoinHandle;

use super::placement::{self, DiskLoad};
use super::store::{RecordState, ReplicaRecord, Store, VolumeRecord, RECORD_FORMAT};
use super::{ControlError, NodeConfig};
use crate::engine::{
    EngineEvent, EventSink, ReplicaHandle, ReplicaIo, ReplicaState, VolumeHealth, VolumeIo,
    MAX_REPLICAS,
};
use crate::frontend::{ublk_available, FrontendOptions, UblkDevice};
use crate::metrics::VolumeSample;
use crate::replica::{Replica, ReplicaSpec, BLOCK_SIZE};

/// How often attached volumes' replica files are health-checked.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Message on a replica the operator failed.
const OPERATOR_FAILED: &str = "failed by operator";

/// What a volume is doing, as `cairnctl` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeState {
    Detached,
    Healthy,
    Degraded,
    Faulted,
}

impl VolumeState {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Detached => "detached",
            VolumeState::Healthy => "healthy",
            VolumeState::Degraded => "degraded",
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaInfo {
    pub name: String,
    pub node: String,
    pub disk: PathBuf,
    pub dir: PathBuf,
    pub state: ReplicaState,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub disks: Vec<DiskInfo>,
    /// `None` when the ublk driver is loaded; otherwise how to load it.
    pub ublk_status: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    pub path: PathBuf,
    /// Filesystem size and space available to cairnd (0 if unknown).
    pub size: u64,
    pub available: u64,
    pub replicas: u32,
}

/// The node's volumes and their lifecycle. Create with [`VolumeManager::open`]
/// inside a tokio runtime; call [`VolumeManager::shutdown`] before dropping
/// it so attached devices are removed cleanly.
pub struct VolumeManager {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

struct Inner {
    node_id: String,
    disks: Vec<PathBuf>,
    frontend: FrontendOptions,
    store: Store,
    state: Arc<Mutex<State>>,
    /// Cloned into each attached volume's engine event sink.
    events: mpsc::UnboundedSender<(String, EngineEvent)>,
    /// Read by the metrics scrape, which is synchronous; refreshed after
    /// every change under `state`.
    view: std::sync::Mutex<Vec<ViewEntry>>,
}

#[derive(Default)]
struct State {
    volumes: BTreeMap<String, Volume>,
}

struct Volume {
    record: VolumeRecord,
    live: Option<Live>,
    /// Why the volume is detached although the record wants it attached, or
    /// what went wrong at its last detach. Not persisted.
    message: String,
}

/// An attached volume.
struct Live {
    io: Arc<VolumeIo>,
    device: UblkDevice,
}

struct ViewEntry {
    name: String,
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
        let disks = prepare_disks(&config)?;
        let store = Store::open(&data_dir)?;
        let (records, corrupt) = store.load_all()?;
        for c in &corrupt {
            tracing::error!(path = %c.path.display(), reason = %c.reason, "skipping unreadable volume record; fix or remove the file");
        }
        for d in &disks {
            tracing::info!(disk = %d.display(), "disk");
        }
        let mut state = State::default();
        for record in records {
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
        let inner = Arc::new(Inner {
            node_id: config.node_id.clone(),
            disks,
            frontend: config.frontend,
            store,
            state: Arc::new(Mutex::new(state)),
            events: tx,
            view: std::sync::Mutex::new(Vec::new()),
        });
        // Taken before any API call can be served, so nothing sees the
        // volumes before the restore below has had its turn.
        let guard = inner.state.clone().lock_owned().await;
        inner.publish(&guard);
        let tasks = vec![
            tokio::spawn(restore(inner.clone(), guard)),
            tokio::spawn(event_loop(Arc::downgrade(&inner), rx)),
            tokio::spawn(check_loop(Arc::downgrade(&inner))),
        ];
        Ok(VolumeManager { inner, tasks })
    }

    /// Replicas a volume gets when the request does not say: 1 on a one-disk
    /// node, else 2 (replicas must sit on distinct disks, and 2 survives one
    /// disk failure without needing a third disk).
    pub fn default_replicas(&self) -> u32 {
        if self.inner.disks.len() == 1 {
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
    ) -> Result<VolumeInfo, ControlError> {
        crate::name::validate_volume_name(name)?;
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
        let mut st = inner.state.lock().await;
        if st.volumes.contains_key(name) {
            return Err(ControlError::AlreadyExists {
                name: name.to_string(),
            });
        }
        let loads: Vec<DiskLoad> = inner
            .disks
            .iter()
            .map(|d| DiskLoad {
                path: d.clone(),
                replicas: st.replicas_on(d),
            })
            .collect();
        let chosen = placement::place(name, count, &loads)?;

        let mut replicas = Vec::with_capacity(chosen.len());
        for disk in chosen {
            let rname = unique_replica_name(name, &disk)?;
            let dir = disk.join("replicas").join(&rname);
            replicas.push(ReplicaRecord {
                name: rname,
                node: inner.node_id.clone(),
                disk,
                dir,
                state: RecordState::Healthy,
                message: String::new(),
            });
        }
        let specs: Vec<(PathBuf, ReplicaSpec)> = replicas
            .iter()
            .map(|r| {
                (
                    r.dir.clone(),
                    ReplicaSpec {
                        volume: name.to_string(),
                        replica: r.name.clone(),
                        size,
                    },
                )
            })
            .collect();
        let dirs: Vec<PathBuf> = replicas.iter().map(|r| r.dir.clone()).collect();
        tokio::task::spawn_blocking(move || -> Result<(), ControlError> {
            for (dir, spec) in &specs {
                if let Err(e) = Replica::create(dir, spec) {
                    // Each name was fresh, so every one of these directories is ours.
                    remove_dirs(specs.iter().map(|(d, _)| d.as_path()));
                    return Err(e.into());
                }
            }
            Ok(())
        })
        .await??;

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
        };
        if let Err(e) = inner.store.save(&record) {
            remove_dirs(dirs.iter().map(PathBuf::as_path));
            return Err(e);
        }
        tracing::info!(volume = name, size = %crate::size::HumanSize(size), replicas = count, "volume created");
        let v = Volume {
            record,
            live: None,
            message: String::new(),
        };
        let info = v.info();
        st.volumes.insert(name.to_string(), v);
        inner.publish(&st);
        Ok(info)
    }

    /// Every volume, sorted by name.
    pub async fn list(&self) -> Vec<VolumeInfo> {
        let st = self.inner.state.lock().await;
        st.volumes.values().map(Volume::info).collect()
    }

    pub async fn get(&self, name: &str) -> Result<VolumeInfo, ControlError> {
        let st = self.inner.state.lock().await;
        Ok(st.volume(name)?.info())
    }

    /// Attaches a volume as `/dev/ublkbN` (the returned info's `device`).
    pub async fn attach(&self, name: &str) -> Result<VolumeInfo, ControlError> {
        let mut st = self.inner.state.lock().await;
        let v = st.volume(name)?;
        if let Some(live) = &v.live {
            return Err(ControlError::AlreadyAttached {
                name: name.to_string(),
                device: live.device.path().display().to_string(),
            });
        }
        let result = self.inner.attach_locked(&mut st, name).await;
        self.inner.publish(&st);
        result?;
        Ok(st.volume(name)?.info())
    }

    /// Removes the device, flushes the replicas, and records that the volume
    /// should stay detached. Detaching a detached volume is not an error.
    pub async fn detach(&self, name: &str) -> Result<VolumeInfo, ControlError> {
        let mut st = self.inner.state.lock().await;
        st.volume(name)?;
        let result = self.inner.detach_locked(&mut st, name, false).await;
        self.inner.publish(&st);
        result?;
        Ok(st.volume(name)?.info())
    }

    /// Deletes a volume and its replicas. An attached volume needs `force`,
    /// which detaches it first.
    pub async fn delete(&self, name: &str, force: bool) -> Result<(), ControlError> {
        let inner = &self.inner;
        let mut st = inner.state.lock().await;
        let v = st.volume(name)?;
        if v.live.is_some() {
            if !force {
                return Err(ControlError::Attached {
                    name: name.to_string(),
                });
            }
            let r = inner.detach_locked(&mut st, name, false).await;
            inner.publish(&st);
            r?;
        }
        let v = st.volume(name)?;
        let dirs: Vec<PathBuf> = v.record.replicas.iter().map(|r| r.dir.clone()).collect();
        // Replicas first, record last: a crash in between leaves a record
        // whose replicas are gone, and deleting again finishes the job.
        tokio::task::spawn_blocking(move || -> Result<(), ControlError> {
            for dir in &dirs {
                match std::fs::remove_dir_all(dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(ControlError::io(dir)(e)),
                }
            }
            Ok(())
        })
        .await??;
        inner.store.remove(name)?;
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
            return Ok(v.info());
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
        let info = v.info();
        inner.publish(&st);
        Ok(info)
    }

    /// This node's name, disks and whether ublk can be used.
    pub async fn node(&self) -> NodeInfo {
        let st = self.inner.state.lock().await;
        let disks = self
            .inner
            .disks
            .iter()
            .map(|d| {
                let (size, available) = disk_space(d).unwrap_or((0, 0));
                DiskInfo {
                    path: d.clone(),
                    size,
                    available,
                    replicas: st.replicas_on(d) as u32,
                }
            })
            .collect();
        NodeInfo {
            name: self.inner.node_id.clone(),
            disks,
            ublk_status: ublk_available().err().map(|e| e.to_string()),
        }
    }

    /// Removes every device and flushes its replicas, but keeps each volume's
    /// wish to be attached, so the next cairnd attaches them again.
    pub async fn shutdown(&self) {
        let mut st = self.inner.state.lock().await;
        let names: Vec<String> = st
            .volumes
            .iter()
            .filter(|(_, v)| v.live.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            if let Err(e) = self.inner.detach_locked(&mut st, &name, true).await {
                tracing::error!(volume = %name, error = %e, "stopping volume at shutdown");
            }
        }
        self.inner.publish(&st);
    }

    /// Per-volume metrics; synchronous, for the Prometheus scrape.
    pub fn samples(&self) -> Vec<VolumeSample> {
        let view = self.inner.view.lock().unwrap_or_else(|p| p.into_inner());
        view.iter()
            .map(|e| match &e.io {
                Some(io) => VolumeSample {
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
                },
                None => VolumeSample {
                    name: e.name.clone(),
                    size: e.size,
                    health: None,
                    replicas: e.replicas,
                    healthy_replicas: e.healthy_in_record,
                    revision: e.revision,
                    io: Default::default(),
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
    /// Attaches volume `name` (known to exist and be detached) with the state
    /// lock held. On error the record keeps what was learned (replicas that
    /// would not open are failed) but the volume stays detached.
    async fn attach_locked(&self, st: &mut State, name: &str) -> Result<(), ControlError> {
        // Before touching any replica file: opening replicas and starting an
        // epoch change them, and without the driver attach must change nothing.
        ublk_available()?;
        let used: HashSet<u32> = st
            .volumes
            .values()
            .filter_map(|v| v.live.as_ref())
            .map(|l| l.device.dev_id())
            .collect();
        let v = st.volume_mut(name)?;
        let healthy: Vec<(String, PathBuf)> = v
            .record
            .replicas
            .iter()
            .filter(|r| r.state == RecordState::Healthy)
            .map(|r| (r.name.clone(), r.dir.clone()))
            .collect();
        if healthy.is_empty() {
            return Err(ControlError::NoHealthyReplica {
                volume: name.to_string(),
            });
        }
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
        let vname = name.to_string();
        let outcome = tokio::task::spawn_blocking(move || {
            attach_blocking(&vname, size, healthy, sink, &opts, recover)
        })
        .await?;
        for (replica, reason) in &outcome.open_failed {
            tracing::warn!(volume = name, %replica, %reason, "replica cannot be opened; marked failed");
            v.record.set_failed(replica, reason);
        }
        if let Some(rev) = outcome.revision {
            v.record.revision = rev;
        }
        match outcome.result {
            Ok((io, device)) => {
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
    async fn detach_locked(
        &self,
        st: &mut State,
        name: &str,
        keep_wanted: bool,
    ) -> Result<(), ControlError> {
        let v = st.volume_mut(name)?;
        let live = v.live.take();
        let was_live = live.is_some();
        let mut stop_err = None;
        if let Some(Live { io, device }) = live {
            let io2 = io.clone();
            let (stopped, flushed) = tokio::task::spawn_blocking(move || {
                let stopped = device.stop();
                let flushed = io2.flush();
                (stopped, flushed)
            })
            .await?;
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
        let EngineEvent::ReplicaFailed { replica, reason } = ev;
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

    fn publish(&self, st: &State) {
        let entries = st
            .volumes
            .values()
            .map(|v| ViewEntry {
                name: v.record.name.clone(),
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
    fn volume(&self, name: &str) -> Result<&Volume, ControlError> {
        self.volumes
            .get(name)
            .ok_or_else(|| ControlError::NotFound {
                name: name.to_string(),
            })
    }

    fn volume_mut(&mut self, name: &str) -> Result<&mut Volume, ControlError> {
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
    fn set_failed(&mut self, replica: &str, reason: &str) -> bool {
        match self.replicas.iter_mut().find(|r| r.name == replica) {
            Some(r) if r.state == RecordState::Healthy => {
                r.state = RecordState::Failed;
                r.message = reason.to_string();
                true
            }
            _ => false,
        }
    }

    /// Copies the engine's failures and revision into the record.
    fn sync_from(&mut self, io: &VolumeIo) {
        for s in io.replicas() {
            if s.state == ReplicaState::Failed {
                self.set_failed(&s.name, &s.message);
            }
        }
        self.revision = io.revision();
    }
}

impl Volume {
    fn info(&self) -> VolumeInfo {
        let live = self.live.as_ref().map(|l| (l, l.io.replicas()));
        let replicas: Vec<ReplicaInfo> = self
            .record
            .replicas
            .iter()
            .map(|r| {
                // The engine knows only the replicas it was given at attach;
                // the rest were failed before and the record says so.
                let engine = live
                    .as_ref()
                    .and_then(|(_, st)| st.iter().find(|s| s.name == r.name));
                let (state, message) = match engine {
                    Some(s) => (s.state, s.message.clone()),
                    None => match r.state {
                        RecordState::Healthy => (ReplicaState::Healthy, r.message.clone()),
                        RecordState::Failed => (ReplicaState::Failed, r.message.clone()),
                    },
                };
                ReplicaInfo {
                    name: r.name.clone(),
                    node: r.node.clone(),
                    disk: r.disk.clone(),
                    dir: r.dir.clone(),
                    state,
                    message,
                }
            })
            .collect();
        let (state, device, revision) = match &live {
            None => (VolumeState::Detached, None, self.record.revision),
            Some((l, _)) => {
                let state = if l.io.health() == VolumeHealth::Faulted {
                    VolumeState::Faulted
                } else if replicas.iter().any(|r| r.state == ReplicaState::Failed) {
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

fn attach_blocking(
    name: &str,
    size: u64,
    replicas: Vec<(String, PathBuf)>,
    sink: EventSink,
    opts: &FrontendOptions,
    recover: Option<u32>,
) -> AttachOutcome {
    let mut open_failed = Vec::new();
    let mut handles = Vec::new();
    for (rname, dir) in replicas {
        match Replica::open(&dir) {
            Ok(r) if r.size() != size => {
                open_failed.push((
                    rname,
                    format!("replica holds {} bytes, the volume has {size}", r.size()),
                ));
            }
            Ok(r) if r.volume_name() != name || r.replica_name() != rname => open_failed.push((
                rname,
                format!(
                    "{} belongs to replica {} of volume {}",
                    dir.display(),
                    r.replica_name(),
                    r.volume_name()
                ),
            )),
            Ok(r) => handles.push(ReplicaHandle {
                name: rname,
                io: ReplicaIo::Local(Arc::new(r)),
            }),
            Err(e) => open_failed.push((rname, e.to_string())),
        }
    }
    let fail = |open_failed, revision, e: ControlError| AttachOutcome {
        open_failed,
        revision,
        result: Err(e),
    };
    if handles.is_empty() {
        return fail(
            open_failed,
            None,
            ControlError::NoHealthyReplica {
                volume: name.to_string(),
            },
        );
    }
    let io = match VolumeIo::new(name, size, handles, sink) {
        Ok(io) => io,
        Err(e) => return fail(open_failed, None, e.into()),
    };
    let revision = match io.begin_epoch() {
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
    match UblkDevice::start(io.clone(), opts, recover) {
        Ok(dev) => AttachOutcome {
            open_failed,
            revision: Some(revision),
            result: Ok((io, dev)),
        },
        Err(e) => fail(open_failed, Some(revision), e.into()),
    }
}

/// Startup: attaches every volume whose record wants it, holding the state
/// lock taken in `open` so API calls queue behind it.
async fn restore(inner: Arc<Inner>, mut st: OwnedMutexGuard<State>) {
    let wanted: Vec<String> = st
        .volumes
        .values()
        .filter(|v| v.record.attached)
        .map(|v| v.record.name.clone())
        .collect();
    if wanted.is_empty() {
        return;
    }
    if let Err(e) = ublk_available() {
        // Once, not per volume: the cause is the node, not the volumes.
        tracing::error!(
            "{e}; {} volume(s) stay detached until cairnd restarts with the driver loaded",
            wanted.len()
        );
        for name in &wanted {
            if let Ok(v) = st.volume_mut(name) {
                v.message = format!("not attached: {e}");
            }
        }
        inner.publish(&st);
        return;
    }
    for name in wanted {
        match inner.attach_locked(&mut st, &name).await {
            Ok(()) => {}
            Err(e) => {
                tracing::error!(volume = %name, error = %e, "cannot re-attach volume");
                if let Ok(v) = st.volume_mut(&name) {
                    v.message = format!("not attached: {e}");
                }
            }
        }
    }
    inner.publish(&st);
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
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = inner.upgrade().map(|i| i.state.clone()) else {
            return;
        };
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
        // Failures found here reach the record through the event channel.
        let _ = tokio::task::spawn_blocking(move || ios.iter().for_each(|io| io.check_replicas()))
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

/// `<volume>-r-<8 hex>`, not yet present on `disk`.
fn unique_replica_name(volume: &str, disk: &Path) -> Result<String, ControlError> {
    loop {
        let mut b = [0u8; 4];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .map_err(ControlError::io("/dev/urandom"))?;
        let name = format!("{volume}-r-{:08x}", u32::from_le_bytes(b));
        if !disk.join("replicas").join(&name).exists() {
            return Ok(name);
        }
    }
}

fn remove_dirs<'a>(dirs: impl Iterator<Item = &'a Path>) {
    for d in dirs {
        if let Err(e) = std::fs::remove_dir_all(d) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %d.display(), error = %e, "cleaning up a replica directory");
            }
        }
    }
}

/// Filesystem size and bytes available to unprivileged users, of `path`.
fn disk_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is NUL-terminated and outlives the call; `s` is a buffer of
    // the right type that statvfs fills on success.
    if unsafe { libc::statvfs(c.as_ptr(), s.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialized `s`.
    let s = unsafe { s.assume_init() };
    // The statvfs fields are u64 here but narrower on 32-bit targets.
    #[allow(clippy::unnecessary_cast)]
    let frsize = s.f_frsize as u64;
    #[allow(clippy::unnecessary_cast)]
    let (blocks, avail) = (s.f_blocks as u64, s.f_bavail as u64);
    Some((blocks * frsize, avail * frsize))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
        m.create("good", 1 << 20, Some(2)).await.unwrap();
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
                .create(name, size, replicas)
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
        let v = one.create("a", 1 << 20, None).await.unwrap();
        assert_eq!(v.replicas.len(), 1);
        assert!(v.replicas[0]
            .dir
            .starts_with(tmp.path().join("one/data/disks/default/replicas")));

        let m = manager(&tmp.path().join("three"), 3).await;
        assert_eq!(m.default_replicas(), 2);
        let a = m.create("a", 1 << 20, None).await.unwrap();
        let b = m.create("b", 1 << 20, Some(1)).await.unwrap();
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
        let v = m.create("v", 1 << 20, Some(2)).await.unwrap();
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
        m.create("ok", 1 << 20, None).await.unwrap();
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
