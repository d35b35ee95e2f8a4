//! Backups, restores and DR standby volumes of the control plane: opens the
//! backup target from the settings, backs a snapshot up from a healthy
//! replica on this node (incrementally against the volume's last backup,
//! from the layer chain's extent maps), restores a backup into a new
//! volume's replicas (every block's hash checked; a failed restore leaves
//! no volume behind), and keeps standby volumes following their backup
//! volume. The store format and its rules live in [`crate::backupstore`].

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::manager::{unix_now, Inner, VolumeManager};
use super::settings;
use super::snapshots::{generated_name, validate_labels};
use super::{ControlError, RebuildInfo, VolumeInfo};
use crate::backupstore::credentials::Credentials;
use crate::backupstore::format::{BackupCfg, BackupHandle, Compression};
use crate::backupstore::store::{
    new_backup_name, BackupPlan, BackupRequest, BackupStore, BlockSink, BlockSource,
};
use crate::backupstore::target::{check_target, open_target, unmount_target, BackupTarget};
use crate::backupstore::Progress;
use crate::engine::rebuild::{store_for, BlockStore};
use crate::engine::{LayeredView, ReplicaIo};
use crate::replica::{Claim, Replica, SnapshotView};

/// Label Cairn puts on the snapshot it takes for a backup.
pub const BACKUP_SNAPSHOT_LABEL: &str = "cairn.io/backup";

/// A backup as `cairnctl backup list/get` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    pub name: String,
    pub volume: String,
    pub snapshot: String,
    pub snapshot_created: String,
    /// Empty while in progress.
    pub created: String,
    /// Bytes of data in the backup's block map.
    pub size: u64,
    /// The volume's size in the backup target (`volume.cfg`): the least a
    /// restore of this backup needs. 0 when the target cannot say.
    pub volume_size: u64,
    pub labels: BTreeMap<String, String>,
    pub state: BackupState,
    pub progress: Option<RebuildInfo>,
    pub message: String,
    pub incremental: bool,
    pub compression: String,
    pub uploaded_blocks: u64,
    pub existing_blocks: u64,
    pub total_blocks: u64,
    pub uploaded_bytes: u64,
}

/// Where a backup stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupState {
    /// Uploading (its config has no creation time yet).
    InProgress,
    Completed,
    /// The upload failed; the message says why.
    Error,
}

impl BackupState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupState::InProgress => "in-progress",
            BackupState::Completed => "completed",
            BackupState::Error => "error",
        }
    }
}

impl std::fmt::Display for BackupState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl BackupInfo {
    pub fn handle(&self) -> String {
        format!("bak://{}/{}", self.volume, self.name)
    }
}

/// A backup started on this node: running, or failed (kept so `backup
/// get` can say why; the newest [`FAILED_KEPT`] per node, until restart).
pub(super) struct RunningBackup {
    pub volume: String,
    pub name: String,
    pub snapshot: String,
    pub snapshot_created: String,
    pub size: u64,
    pub labels: BTreeMap<String, String>,
    pub incremental: bool,
    pub compression: String,
    pub progress: Arc<Progress>,
    /// Why the upload failed; `None` while it runs.
    pub failed: Option<String>,
}

/// Failed backups remembered for `backup get`/`list`.
const FAILED_KEPT: usize = 16;

impl RunningBackup {
    fn info(&self) -> BackupInfo {
        BackupInfo {
            name: self.name.clone(),
            volume: self.volume.clone(),
            snapshot: self.snapshot.clone(),
            snapshot_created: self.snapshot_created.clone(),
            created: String::new(),
            size: 0,
            volume_size: self.size,
            labels: self.labels.clone(),
            state: if self.failed.is_some() {
                BackupState::Error
            } else {
                BackupState::InProgress
            },
            progress: self.failed.is_none().then(|| progress_info(&self.progress)),
            message: self.failed.clone().unwrap_or_default(),
            incremental: self.incremental,
            compression: self.compression.clone(),
            uploaded_blocks: 0,
            existing_blocks: 0,
            total_blocks: 0,
            uploaded_bytes: 0,
        }
    }
}

fn progress_info(p: &Progress) -> RebuildInfo {
    RebuildInfo {
        percent: p.percent(),
        done: p.done(),
        total: p.total(),
        rate: p.rate(),
        incremental: false,
    }
}

// What a backup reads: a snapshot of a local replica, or of one elsewhere.
impl BlockSource for SnapshotView {
    fn size(&self) -> u64 {
        SnapshotView::size(self)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        SnapshotView::read_at(self, offset, buf)
    }
}

impl BlockSource for LayeredView {
    fn size(&self) -> u64 {
        LayeredView::size(self)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        LayeredView::read_at(self, offset, buf)
    }
}

/// Every replica of a volume being restored into, written alike.
pub(super) struct ReplicaSink {
    stores: Vec<Mutex<Box<dyn BlockStore>>>,
}

impl BlockSink for ReplicaSink {
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        for s in &self.stores {
            s.lock()
                .unwrap_or_else(|p| p.into_inner())
                .write(offset, data)?;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        for s in &self.stores {
            s.lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_zeroes(offset, len)?;
        }
        Ok(())
    }
}

impl ReplicaSink {
    pub(super) fn flush(&self) -> io::Result<()> {
        for s in &self.stores {
            s.lock().unwrap_or_else(|p| p.into_inner()).flush()?;
        }
        Ok(())
    }
}

impl Inner {
    /// The backup target as the settings name it (empty: the local default
    /// `file://<data-dir>/backups`).
    pub(super) async fn backup_store(&self) -> Result<BackupStore, ControlError> {
        let mut url = self.settings.get(settings::BACKUP_TARGET)?;
        if url.is_empty() {
            url = format!("file://{}/backups", self.data_dir.display());
        }
        let target = BackupTarget::parse(&url)?;
        let cred = self.settings.get(settings::BACKUP_CREDENTIAL)?;
        let creds = if cred.is_empty() {
            Credentials::from_env()?
        } else {
            Credentials::from_file(std::path::Path::new(&cred))?
        };
        let mounts = self.data_dir.join("backup-mounts");
        // A cheap probe first: wrong keys, a missing bucket, an unreachable
        // endpoint or a TLS failure become one clear error here.
        check_target(&target, &creds, &mounts).await?;
        let (store, prefix) = open_target(&target, &creds, &mounts).await?;
        Ok(BackupStore::new(store, prefix))
    }

    /// Unmounts backup target `url` if it is an nfs export this daemon
    /// mounted (after the setting changed, or at shutdown), off the async
    /// runtime: `umount` may take up to `MOUNT_TIMEOUT` twice. Failures are
    /// logged: the new target does not depend on the old mount.
    pub(super) async fn release_backup_target(&self, url: &str) {
        let Ok(target) = BackupTarget::parse(url) else {
            return;
        };
        if !matches!(target, BackupTarget::Nfs { .. }) {
            return;
        }
        let mounts = self.data_dir.join("backup-mounts");
        let t = target.clone();
        match tokio::task::spawn_blocking(move || unmount_target(&t, &mounts)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(target = %target, error = %e, "cannot unmount the old backup target")
            }
            Err(e) => tracing::warn!(target = %target, error = %e, "unmount task failed"),
        }
    }

    fn running_backups(&self) -> std::sync::MutexGuard<'_, Vec<RunningBackup>> {
        self.backups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A healthy replica of `volume` to read a backup from: one on this node
    /// when there is one (read through open descriptors, no network), else
    /// a healthy replica on another node, read over the wire.
    pub(super) async fn backup_reader(
        self: &Arc<Self>,
        volume: &str,
    ) -> Result<BackupReader, ControlError> {
        let st = self.state.lock().await;
        let v = st.volume(volume)?;
        let info = v.info(self);
        let healthy: Vec<(String, String)> = info
            .replicas
            .iter()
            .filter(|r| r.state == crate::engine::ReplicaState::Healthy)
            .map(|r| (r.name.clone(), r.addr.clone()))
            .collect();
        drop(st);
        if let Some((name, _)) = healthy.iter().find(|(_, addr)| addr.is_empty()) {
            return Ok(BackupReader::Local(self.disks.open(volume, name)?));
        }
        let me = self.clone();
        let vname = volume.to_string();
        tokio::task::spawn_blocking(move || {
            let mut why = Vec::new();
            for (name, addr) in healthy {
                match me.open_replica(&vname, &name, &addr, Claim::Observe) {
                    Ok(io) => return Ok(BackupReader::Layers(io)),
                    Err(e) => why.push(format!("{name} at {addr}: {e}")),
                }
            }
            Err(ControlError::NoHealthyReplicaFor {
                volume: vname,
                reason: if why.is_empty() {
                    "no healthy replica".into()
                } else {
                    why.join("; ")
                },
            })
        })
        .await?
    }
}

/// A handle that must name one backup (`bak://VOLUME/BACKUP`), with the
/// backup's name.
fn one_backup(handle: &str) -> Result<(BackupHandle, String), ControlError> {
    let h = BackupHandle::parse(handle)?;
    match h.backup.clone() {
        Some(backup) => Ok((h, backup)),
        None => Err(ControlError::HandleNeedsBackup {
            handle: handle.to_string(),
        }),
    }
}

/// Where a backup reads the snapshot from.
pub(super) enum BackupReader {
    Local(Arc<Replica>),
    /// A replica on another node (or one not opened here), read layer by layer.
    Layers(ReplicaIo),
}

/// Snapshot `snapshot` as `reader` reads it, and its data ranges (what a
/// copy into a new volume reads). Blocking.
pub(super) fn open_snapshot_source(
    reader: BackupReader,
    snapshot: &str,
) -> Result<(Arc<dyn BlockSource>, Vec<(u64, u64)>), ControlError> {
    open_backup_source(reader, snapshot, None).map(|(s, r, _)| (s, r))
}

/// The snapshot a backup reads, its data ranges and, for an incremental
/// backup, the ranges changed since snapshot `since`. Blocking.
fn open_backup_source(
    reader: BackupReader,
    snapshot: &str,
    since: Option<&str>,
) -> Result<
    (
        Arc<dyn BlockSource>,
        Vec<(u64, u64)>,
        Option<Vec<(u64, u64)>>,
    ),
    ControlError,
> {
    match reader {
        BackupReader::Local(r) => {
            let view = r.snapshot_view(snapshot)?;
            let changed = match since {
                Some(s) => r.changed_between(s, snapshot)?,
                None => None,
            };
            let ranges = view.data_ranges();
            Ok((Arc::new(view), ranges, changed))
        }
        BackupReader::Layers(io) => {
            let view = LayeredView::open(io, snapshot)?;
            let changed = since.and_then(|s| view.changed_since(s));
            let ranges = view.data_ranges();
            Ok((Arc::new(view), ranges, changed))
        }
    }
}

impl VolumeManager {
    /// Backs up snapshot `snapshot` of `volume` (a new snapshot when
    /// `None`). Returns when the backup is complete.
    pub async fn backup_create(
        &self,
        volume: &str,
        snapshot: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<BackupInfo, ControlError> {
        let (_, upload) = self.backup_begin(volume, snapshot, labels).await?;
        upload.await
    }

    /// [`Self::backup_create`] without waiting: checks everything and takes
    /// the snapshot, then returns the backup in progress (its handle is
    /// final) while the upload goes on. `backup_get` follows it to
    /// `completed`, or to `error` with the reason.
    pub async fn backup_start(
        &self,
        volume: &str,
        snapshot: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<BackupInfo, ControlError> {
        let (info, upload) = self.backup_begin(volume, snapshot, labels).await?;
        // The upload records its own outcome (and logs it).
        tokio::spawn(async move {
            let _ = upload.await;
        });
        Ok(info)
    }

    /// Everything before the upload (checks, the snapshot, the plan), and
    /// the upload to run.
    async fn backup_begin(
        &self,
        volume: &str,
        snapshot: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<
        (
            BackupInfo,
            impl std::future::Future<Output = Result<BackupInfo, ControlError>> + Send + 'static,
        ),
        ControlError,
    > {
        validate_labels("backup", &labels)?;
        let inner = &self.inner;
        let store = inner.backup_store().await?;
        let (size, last_backup, last_snap) = {
            let st = inner.state.lock().await;
            let v = st.volume(volume)?;
            if v.record.standby {
                return Err(ControlError::Standby {
                    name: volume.to_string(),
                    what: "be backed up",
                });
            }
            (
                v.record.size,
                v.record.last_backup.clone(),
                v.record.last_backup_snapshot.clone(),
            )
        };
        let snap = match snapshot {
            Some(s) => {
                if !self
                    .snapshot_list(volume)
                    .await?
                    .iter()
                    .any(|x| !x.is_head && x.name == s)
                {
                    return Err(ControlError::UnknownSnapshot {
                        volume: volume.to_string(),
                        snapshot: s.to_string(),
                    });
                }
                s.to_string()
            }
            None => {
                let mut l = labels.clone();
                l.insert(BACKUP_SNAPSHOT_LABEL.into(), "true".into());
                self.snapshot_create_as(volume, Some(&generated_name("backup")), l, true)
                    .await?
                    .name
            }
        };
        let snap_info = self
            .snapshot_list(volume)
            .await?
            .into_iter()
            .find(|s| s.name == snap)
            .ok_or_else(|| ControlError::UnknownSnapshot {
                volume: volume.to_string(),
                snapshot: snap.clone(),
            })?;
        let reader = inner.backup_reader(volume).await?;

        // Incremental against the last backup when it is still in the store
        // and its snapshot still in the chain; otherwise full (dedup still
        // skips blocks the store has).
        let base = if last_backup.is_empty() {
            None
        } else {
            match store.get_backup(volume, &last_backup).await {
                Ok(cfg) if !cfg.created_time.is_empty() => Some(last_backup.clone()),
                _ => None,
            }
        };
        let since = (base.is_some() && !last_snap.is_empty()).then(|| last_snap.clone());
        let s2 = snap.clone();
        let (source, data_ranges, changed) =
            tokio::task::spawn_blocking(move || open_backup_source(reader, &s2, since.as_deref()))
                .await??;
        let plan = match (base, changed) {
            (Some(base_backup), Some(changed)) => BackupPlan::Incremental {
                base_backup,
                changed,
            },
            _ => BackupPlan::Full {
                ranges: data_ranges,
            },
        };
        let name = new_backup_name();
        let compression: Compression = inner
            .settings
            .get(settings::BACKUP_COMPRESSION)?
            .parse()
            .map_err(ControlError::Internal)?;
        let block_size = if inner.settings.get(settings::BACKUP_BLOCK_SIZE)? == "16MiB" {
            16 << 20
        } else {
            2 << 20
        };
        let incremental = matches!(plan, BackupPlan::Incremental { .. });
        let req = BackupRequest {
            volume: volume.to_string(),
            volume_size: size,
            backup_name: name.clone(),
            snapshot_name: snap.clone(),
            snapshot_created: snap_info.created.clone(),
            labels: labels.clone(),
            compression,
            block_size,
            plan,
            concurrency: inner.settings.u64(settings::BACKUP_CONCURRENCY).max(1) as usize,
        };
        let progress = Arc::new(Progress::new());
        let running = RunningBackup {
            volume: volume.into(),
            name: name.clone(),
            snapshot: snap.clone(),
            snapshot_created: snap_info.created.clone(),
            size,
            labels,
            incremental,
            compression: compression.as_str().to_string(),
            progress: progress.clone(),
            failed: None,
        };
        let started = running.info();
        inner.running_backups().push(running);
        tracing::info!(volume, backup = %name, snapshot = %snap, "backup started");
        let inner = inner.clone();
        let volume = volume.to_string();
        let upload = async move {
            let result = store.create_backup(req, source, progress).await;
            let report = match result {
                Ok(r) => {
                    inner
                        .running_backups()
                        .retain(|b| !(b.volume == volume && b.name == name));
                    r
                }
                Err(e) => {
                    tracing::error!(volume, backup = %name, error = %e, "backup failed");
                    let mut list = inner.running_backups();
                    if let Some(b) = list
                        .iter_mut()
                        .find(|b| b.volume == volume && b.name == name)
                    {
                        b.failed = Some(e.to_string());
                    }
                    let failed: Vec<usize> = (0..list.len())
                        .filter(|&i| list[i].failed.is_some())
                        .collect();
                    if failed.len() > FAILED_KEPT {
                        list.remove(failed[0]);
                    }
                    return Err(e.into());
                }
            };
            tracing::info!(volume, backup = %name, uploaded = report.uploaded_blocks, existing = report.existing_blocks,
                total = report.total_blocks, "backup complete");
            {
                let mut st = inner.state.lock().await;
                if let Ok(v) = st.volume_mut(&volume) {
                    v.record.last_backup = name.clone();
                    v.record.last_backup_snapshot = snap.clone();
                    inner.store.save(&v.record)?;
                }
            }
            let cfg = store.get_backup(&volume, &name).await?;
            let mut info = backup_info(&cfg, size);
            info.uploaded_blocks = report.uploaded_blocks;
            info.existing_blocks = report.existing_blocks;
            info.total_blocks = report.total_blocks;
            info.uploaded_bytes = report.uploaded_bytes;
            Ok(info)
        };
        Ok((started, upload))
    }

    /// Backups in the target (of one volume, or all), with those running
    /// here marked in progress.
    pub async fn backup_list(&self, volume: Option<&str>) -> Result<Vec<BackupInfo>, ControlError> {
        let store = self.inner.backup_store().await?;
        let volumes: Vec<String> = match volume {
            Some(v) => vec![v.to_string()],
            None => store
                .list_volumes()
                .await?
                .into_iter()
                .map(|v| v.name)
                .collect(),
        };
        let mut out = Vec::new();
        for v in &volumes {
            let volume_size = store.get_volume(v).await.map_or(0, |c| c.size);
            for cfg in store.list_backups(v).await? {
                out.push(self.with_progress(backup_info(&cfg, volume_size)));
            }
        }
        // Started here but not (or not yet) in the target: running before
        // its config is written, or failed.
        for b in self.inner.running_backups().iter() {
            let wanted = volume.is_none_or(|v| v == b.volume);
            if wanted && !out.iter().any(|i| i.volume == b.volume && i.name == b.name) {
                out.push(b.info());
            }
        }
        Ok(out)
    }

    pub async fn backup_get(&self, handle: &str) -> Result<BackupInfo, ControlError> {
        let (h, backup) = one_backup(handle)?;
        let store = self.inner.backup_store().await?;
        match store.get_backup(&h.volume, &backup).await {
            Ok(cfg) => {
                let volume_size = store.get_volume(&h.volume).await.map_or(0, |c| c.size);
                Ok(self.with_progress(backup_info(&cfg, volume_size)))
            }
            Err(e) => self
                .inner
                .running_backups()
                .iter()
                .find(|b| b.volume == h.volume && b.name == backup)
                .map(RunningBackup::info)
                .ok_or(e.into()),
        }
    }

    /// Deletes a backup and the blocks no other backup of its volume uses.
    pub async fn backup_delete(&self, handle: &str) -> Result<(u64, u64), ControlError> {
        let (h, backup) = one_backup(handle)?;
        let store = self.inner.backup_store().await?;
        let report = store.delete_backup(&h.volume, &backup).await?;
        tracing::info!(volume = %h.volume, backup = %backup, removed = report.removed_blocks, "backup deleted");
        Ok((report.removed_blocks, report.kept_blocks))
    }

    fn with_progress(&self, mut info: BackupInfo) -> BackupInfo {
        if let Some(b) = self
            .inner
            .running_backups()
            .iter()
            .find(|b| b.volume == info.volume && b.name == info.name)
        {
            let run = b.info();
            info.state = run.state;
            info.progress = run.progress;
            info.message = run.message;
        }
        info
    }

    /// Creates volume `name` holding backup `handle` (`bak://V/B`), or with
    /// `standby` a DR volume following backup volume `bak://V`.
    pub async fn create_from_backup(
        &self,
        name: &str,
        size: Option<u64>,
        replicas: Option<u32>,
        handle: &str,
        standby: bool,
        recurring_jobs: &str,
    ) -> Result<VolumeInfo, ControlError> {
        crate::name::validate_volume_name(name)?;
        let h = BackupHandle::parse(handle)?;
        let store = self.inner.backup_store().await?;
        let cfg = match &h.backup {
            Some(b) => store.get_backup(&h.volume, b).await?,
            None if standby => latest_backup(&store, &h.volume).await?.ok_or_else(|| {
                ControlError::NoBackupYet {
                    volume: h.volume.clone(),
                }
            })?,
            None => {
                return Err(ControlError::HandleNeedsBackup {
                    handle: handle.to_string(),
                })
            }
        };
        if cfg.created_time.is_empty() {
            return Err(ControlError::BackupInProgress {
                handle: handle.to_string(),
            });
        }
        let backup_size = store.get_volume(&h.volume).await?.size;
        let size = size.unwrap_or(backup_size);
        if size < backup_size {
            return Err(ControlError::RestoreTooSmall {
                size,
                backup: backup_size,
            });
        }
        self.create(name, size, replicas, recurring_jobs).await?;
        {
            let mut st = self.inner.state.lock().await;
            let v = st.volume_mut(name)?;
            v.record.standby = standby;
            v.record.from_backup = if standby {
                format!("bak://{}", h.volume)
            } else {
                format!("bak://{}/{}", h.volume, cfg.name)
            };
            self.inner.store.save(&v.record)?;
        }
        match self
            .inner
            .restore_into(name, &store, &h.volume, &cfg, None)
            .await
        {
            Ok(()) => self.get(name).await,
            Err(e) => {
                tracing::warn!(volume = name, error = %e, "restore failed; removing the new volume");
                // Block writers still finishing may hold the replicas open
                // for a moment after the first error.
                let mut last = None;
                for _ in 0..50 {
                    match self.delete(name, true).await {
                        Ok(()) => {
                            last = None;
                            break;
                        }
                        Err(d) => last = Some(d),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if let Some(d) = last {
                    tracing::error!(volume = name, error = %d, "cannot remove the half-restored volume");
                }
                Err(e)
            }
        }
    }

    /// Turns a standby volume into a normal one, after restoring the latest
    /// backup of the volume it follows.
    pub async fn activate(&self, name: &str) -> Result<VolumeInfo, ControlError> {
        let standby = { self.inner.state.lock().await.volume(name)?.record.standby };
        if !standby {
            return Err(ControlError::NotStandby {
                name: name.to_string(),
            });
        }
        self.inner.dr_sync(name).await?;
        let mut st = self.inner.state.lock().await;
        let v = st.volume_mut(name)?;
        v.record.standby = false;
        self.inner.store.save(&v.record)?;
        tracing::info!(volume = name, last = %v.record.last_restored, "DR volume activated");
        let info = v.info(&self.inner);
        self.inner.publish(&st);
        Ok(info)
    }
}

/// The backup volume's last backup: the one `volume.cfg` names (what
/// Longhorn's DR volumes follow), else the newest completed one.
async fn latest_backup(
    store: &BackupStore,
    volume: &str,
) -> Result<Option<BackupCfg>, ControlError> {
    let vol = store.get_volume(volume).await?;
    if !vol.last_backup_name.is_empty() {
        if let Ok(b) = store.get_backup(volume, &vol.last_backup_name).await {
            if !b.in_progress() {
                return Ok(Some(b));
            }
        }
    }
    let mut list: Vec<BackupCfg> = store
        .list_backups(volume)
        .await?
        .into_iter()
        .filter(|b| !b.created_time.is_empty())
        .collect();
    list.sort_by(|a, b| a.created_time.cmp(&b.created_time));
    Ok(list.pop())
}

fn backup_info(cfg: &BackupCfg, volume_size: u64) -> BackupInfo {
    BackupInfo {
        name: cfg.name.clone(),
        volume: cfg.volume_name.clone(),
        snapshot: cfg.snapshot_name.clone(),
        snapshot_created: cfg.snapshot_created_at.clone(),
        created: cfg.created_time.clone(),
        size: cfg.size,
        volume_size,
        labels: cfg.labels.clone(),
        state: if cfg.created_time.is_empty() {
            BackupState::InProgress
        } else {
            BackupState::Completed
        },
        progress: None,
        message: String::new(),
        incremental: cfg.is_incremental,
        compression: cfg.compression_method.clone(),
        uploaded_blocks: 0,
        existing_blocks: 0,
        total_blocks: cfg.blocks.len() as u64,
        uploaded_bytes: 0,
    }
}

impl Inner {
    /// Restores backup `cfg` of backup volume `source` into volume `name`'s
    /// replicas; with `base` (the backup restored there last), only what
    /// changed since.
    pub(super) async fn restore_into(
        self: &Arc<Self>,
        name: &str,
        store: &BackupStore,
        source: &str,
        cfg: &BackupCfg,
        base: Option<&BackupCfg>,
    ) -> Result<(), ControlError> {
        let (targets, owner): (Vec<(String, String)>, _) = {
            let mut st = self.state.lock().await;
            let v = st.volume_mut(name)?;
            if v.live.is_some() {
                return Err(ControlError::MustDetach {
                    name: name.to_string(),
                    what: "restore into it",
                });
            }
            // Recorded before the first block is written: a restore that
            // fails or is cut short leaves this behind.
            v.record.restoring = Some(cfg.name.clone());
            self.store.save(&v.record)?;
            (v.record.healthy_targets(), self.ownership(&v.record))
        };
        let sink = Arc::new(self.open_sink(name, targets, owner).await?);
        let progress = Arc::new(Progress::new());
        self.restores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), progress.clone());
        let concurrency = self.settings.u64(settings::RESTORE_CONCURRENCY).max(1) as usize;
        let result = store
            .restore(source, &cfg.name, sink.clone(), base, progress, concurrency)
            .await;
        self.restores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let report = result?;
        let s2 = sink.clone();
        tokio::task::spawn_blocking(move || s2.flush())
            .await?
            .map_err(|e| ControlError::Internal(format!("flushing restored replicas: {e}")))?;
        tracing::info!(volume = name, backup = %cfg.name, blocks = report.restored_blocks, "restore complete");
        let mut st = self.state.lock().await;
        let v = st.volume_mut(name)?;
        v.record.last_restored = cfg.name.clone();
        v.record.restoring = None;
        self.store.save(&v.record)?;
        self.publish(&st);
        Ok(())
    }

    /// Every healthy replica of volume `name`, to write into alike.
    pub(super) async fn replica_sink(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<ReplicaSink, ControlError> {
        let (targets, owner) = {
            let st = self.state.lock().await;
            let v = st.volume(name)?;
            (v.record.healthy_targets(), self.ownership(&v.record))
        };
        self.open_sink(name, targets, owner).await
    }

    async fn open_sink(
        self: &Arc<Self>,
        name: &str,
        targets: Vec<(String, String)>,
        owner: crate::replica::OwnerTerm,
    ) -> Result<ReplicaSink, ControlError> {
        let me = self.clone();
        let vname = name.to_string();
        tokio::task::spawn_blocking(move || -> Result<ReplicaSink, ControlError> {
            let mut stores = Vec::new();
            for (r, addr) in targets {
                let io = me
                    .open_replica(
                        &vname,
                        &r,
                        &addr,
                        Claim::Takeover {
                            owner: owner.clone(),
                        },
                    )
                    .map_err(|e| ControlError::Internal(format!("replica {r}: {e}")))?;
                stores
                    .push(Mutex::new(store_for(&io).map_err(|e| {
                        ControlError::Internal(format!("replica {r}: {e}"))
                    })?));
            }
            Ok(ReplicaSink { stores })
        })
        .await?
    }

    /// Brings standby volume `name` to the latest backup of the volume it
    /// follows (incrementally from the one restored last).
    pub(super) async fn dr_sync(self: &Arc<Self>, name: &str) -> Result<(), ControlError> {
        let (from, last, interrupted) = {
            let st = self.state.lock().await;
            let v = st.volume(name)?;
            (
                v.record.from_backup.clone(),
                v.record.last_restored.clone(),
                v.record.restoring.clone(),
            )
        };
        let h = BackupHandle::parse(&from)?;
        let store = self.backup_store().await?;
        let Some(latest) = latest_backup(&store, &h.volume).await? else {
            return Ok(());
        };
        if latest.name == last && interrupted.is_none() {
            return Ok(());
        }
        // After an interrupted restore the replicas match no backup: the
        // next one is restored whole, onto zeros.
        let base = if last.is_empty() || interrupted.is_some() {
            None
        } else {
            store.get_backup(&h.volume, &last).await.ok()
        };
        if let Some(b) = &interrupted {
            tracing::warn!(volume = name, backup = %b, "the last restore did not finish; restoring the next backup whole");
        }
        if base.is_none() && (!last.is_empty() || interrupted.is_some()) {
            // The base is gone from the store: start from zeros.
            let size = { self.state.lock().await.volume(name)?.record.size };
            self.zero_volume(name, size).await?;
        }
        tracing::info!(volume = name, backup = %latest.name, incremental = base.is_some(), "DR volume restoring a new backup");
        self.restore_into(name, &store, &h.volume, &latest, base.as_ref())
            .await
    }

    async fn zero_volume(self: &Arc<Self>, name: &str, size: u64) -> Result<(), ControlError> {
        let (targets, owner): (Vec<(String, String)>, _) = {
            let st = self.state.lock().await;
            let record = &st.volume(name)?.record;
            let owner = self.ownership(record);
            let targets = record
                .replicas
                .iter()
                .map(|r| (r.name.clone(), r.addr.clone()))
                .collect();
            (targets, owner)
        };
        let sink = self.open_sink(name, targets, owner).await?;
        tokio::task::spawn_blocking(move || -> Result<(), ControlError> {
            sink.write_zeroes(0, size)
                .and_then(|()| sink.flush())
                .map_err(|e| ControlError::Internal(format!("zeroing the replicas: {e}")))
        })
        .await?
    }
}

/// Polls the backup target for every standby volume every
/// `backupstore-poll-interval` seconds.
pub(super) async fn dr_loop(inner: std::sync::Weak<Inner>) {
    let mut last_poll = 0u64;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(inner) = inner.upgrade() else { return };
        let every = inner.settings.u64(settings::BACKUPSTORE_POLL_INTERVAL);
        let now = unix_now();
        if every == 0 || now < last_poll + every {
            continue;
        }
        last_poll = now;
        let standby: Vec<String> = {
            let st = inner.state.lock().await;
            st.volumes
                .values()
                .filter(|v| v.record.standby)
                .map(|v| v.record.name.clone())
                .collect()
        };
        for name in standby {
            if let Err(e) = inner.dr_sync(&name).await {
                tracing::warn!(volume = %name, error = %e, "DR volume could not follow its backup volume");
            }
        }
    }
}
