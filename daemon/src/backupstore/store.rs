//! Backupstore operations over an `object_store`: back a snapshot up
//! (deduplicated blocks, incremental block maps), restore a backup (every
//! block's hash checked), delete a backup and collect the blocks no backup
//! references, list, and Longhorn's lock files that keep a deletion from
//! running beside a backup or restore of the same volume.
//!
//! The caller reads and writes the volume through the blocking
//! [`BlockSource`] / [`BlockSink`] seams; this module runs them on tokio's
//! blocking pool and keeps `concurrency` blocks in flight.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::format::{
    self, BackupCfg, BlockMapping, Compression, FormatError, VolumeCfg, VolumePaths,
};
use super::progress::Progress;

/// Blocking reads of the data being backed up (a snapshot of a volume).
pub trait BlockSource: Send + Sync {
    fn size(&self) -> u64;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// Blocking writes into the volume being restored.
pub trait BlockSink: Send + Sync {
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
}

#[derive(Debug, thiserror::Error)]
pub enum BackupStoreError {
    #[error("backup target: {op} {path}: {source}")]
    Store {
        op: &'static str,
        path: String,
        source: Box<object_store::Error>,
    },
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(
        "backup volume {volume:?} not found in the backup target (see `cairnctl backup list`)"
    )]
    VolumeNotFound { volume: String },
    #[error(
        "backup {backup:?} of volume {volume:?} not found (see `cairnctl backup list {volume}`)"
    )]
    BackupNotFound { volume: String, backup: String },
    #[error("backup {backup} of volume {volume} is still in progress: it cannot be restored until it completes")]
    InProgress { volume: String, backup: String },
    #[error("restore of backup {backup} of volume {volume}: block {checksum} (offset {offset}) is missing from the backup target at {path}")]
    MissingBlock {
        volume: String,
        backup: String,
        checksum: String,
        offset: u64,
        path: String,
    },
    #[error("restore of backup {backup} of volume {volume}: block {checksum} (offset {offset}) at {path} is corrupt: {reason}")]
    CorruptBlock {
        volume: String,
        backup: String,
        checksum: String,
        offset: u64,
        path: String,
        reason: String,
    },
    #[error("backup of volume {volume}: reading the snapshot at offset {offset}: {source}")]
    Read {
        volume: String,
        offset: u64,
        source: io::Error,
    },
    #[error("restore into the volume at offset {offset}: {source}")]
    Write { offset: u64, source: io::Error },
    #[error("backup volume {volume}: could not take the {kind} lock within {secs} s: a {other} of this volume is running; try again when it is done")]
    Locked {
        volume: String,
        kind: &'static str,
        other: &'static str,
        secs: u64,
    },
    #[error("backup {backup} of volume {volume}: {reason}")]
    Invalid {
        volume: String,
        backup: String,
        reason: String,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl BackupStoreError {
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            BackupStoreError::VolumeNotFound { .. } | BackupStoreError::BackupNotFound { .. }
        )
    }
}

type Result<T> = std::result::Result<T, BackupStoreError>;

/// What to back up.
#[derive(Debug, Clone)]
pub enum BackupPlan {
    /// Byte ranges `(offset, len)` that may hold data; the rest is zeros.
    Full { ranges: Vec<(u64, u64)> },
    /// Byte ranges changed since backup `base_backup`'s snapshot; blocks
    /// outside them keep the base's mapping (nothing is read there).
    Incremental {
        base_backup: String,
        changed: Vec<(u64, u64)>,
    },
}

#[derive(Debug, Clone)]
pub struct BackupRequest {
    pub volume: String,
    pub volume_size: u64,
    pub backup_name: String,
    pub snapshot_name: String,
    pub snapshot_created: String,
    pub labels: BTreeMap<String, String>,
    /// For a new backup volume (an existing one keeps its own).
    pub compression: Compression,
    /// For a new backup volume (an existing one keeps its own).
    pub block_size: u64,
    pub plan: BackupPlan,
    pub concurrency: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupReport {
    pub uploaded_blocks: u64,
    /// Blocks read whose content the store already had.
    pub existing_blocks: u64,
    /// All-zero blocks (left out of the map).
    pub zero_blocks: u64,
    pub total_blocks: u64,
    /// Compressed bytes uploaded.
    pub uploaded_bytes: u64,
    pub read_bytes: u64,
    pub incremental: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    pub restored_blocks: u64,
    pub zeroed_blocks: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteReport {
    pub removed_blocks: u64,
    pub kept_blocks: u64,
    /// Block collection was skipped (a backup of the volume is in progress).
    pub gc_skipped: bool,
}

/// Lock types as Longhorn numbers them: backups and restores share one
/// type (they may run together); a deletion excludes both.
const BACKUP_LOCK: u8 = 1;
const DELETION_LOCK: u8 = 2;
/// Longhorn's lock timings.
const LOCK_DURATION: Duration = Duration::from_secs(150);
const LOCK_MAX_WAIT: Duration = Duration::from_secs(30);
const LOCK_REFRESH: Duration = Duration::from_secs(60);
const LOCK_CHECK_WAIT: Duration = Duration::from_secs(2);
const LOCK_RETRY: Duration = Duration::from_secs(1);

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LockFile {
    name: String,
    #[serde(rename = "Type")]
    ty: u8,
    acquired: bool,
}

/// A lock this process holds; release it with [`HeldLock::release`].
struct HeldLock {
    store: Arc<dyn ObjectStore>,
    path: ObjPath,
    refresh: tokio::task::JoinHandle<()>,
}

impl HeldLock {
    async fn release(self) {
        self.refresh.abort();
        if let Err(e) = self.store.delete(&self.path).await {
            tracing::warn!(lock = %self.path, error = %e, "cannot remove a backupstore lock; it expires in 150 s");
        }
    }
}

/// A backupstore in one target.
#[derive(Clone)]
pub struct BackupStore {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    /// How long a lock may be waited for (Longhorn: 30 s).
    lock_wait: Duration,
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = io::Read::read_exact(&mut f, &mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A new backup name in Longhorn's style: `backup-<16 hex>`.
pub fn new_backup_name() -> String {
    format!("backup-{}", random_hex(8))
}

impl BackupStore {
    pub fn new(store: Arc<dyn ObjectStore>, prefix: ObjPath) -> BackupStore {
        BackupStore {
            store,
            prefix: prefix.as_ref().trim_end_matches('/').to_string(),
            lock_wait: LOCK_MAX_WAIT,
        }
    }

    /// A shorter lock wait (tests).
    pub fn with_lock_wait(mut self, wait: Duration) -> BackupStore {
        self.lock_wait = wait;
        self
    }

    fn path(&self, rel: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(rel)
        } else {
            ObjPath::from(format!("{}/{rel}", self.prefix))
        }
    }

    fn err<'a>(
        op: &'static str,
        path: &'a ObjPath,
    ) -> impl FnOnce(object_store::Error) -> BackupStoreError + 'a {
        move |e| BackupStoreError::Store {
            op,
            path: path.to_string(),
            source: Box::new(e),
        }
    }

    async fn get_bytes(&self, rel: &str) -> Result<Option<bytes::Bytes>> {
        let p = self.path(rel);
        match self.store.get(&p).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(Self::err("reading", &p))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Self::err("reading", &p)(e)),
        }
    }

    async fn put_json<T: serde::Serialize>(&self, rel: &str, v: &T) -> Result<()> {
        let p = self.path(rel);
        let bytes = serde_json::to_vec(v).map_err(|e| BackupStoreError::Internal(e.to_string()))?;
        self.store
            .put(&p, PutPayload::from(bytes))
            .await
            .map_err(Self::err("writing", &p))?;
        Ok(())
    }

    /// Names under a directory (one level), as `(dirs, files)`.
    async fn list_dir(&self, rel: &str) -> Result<(Vec<String>, Vec<String>)> {
        let p = self.path(rel);
        let r = match self.store.list_with_delimiter(Some(&p)).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok((Vec::new(), Vec::new())),
            Err(e) => return Err(Self::err("listing", &p)(e)),
        };
        let name = |x: &ObjPath| x.filename().unwrap_or_default().to_string();
        Ok((
            r.common_prefixes.iter().map(name).collect(),
            r.objects.iter().map(|o| name(&o.location)).collect(),
        ))
    }

    /// Every backup volume's `volume.cfg`.
    pub async fn list_volumes(&self) -> Result<Vec<VolumeCfg>> {
        let root = VolumePaths::volumes_root();
        let mut out = Vec::new();
        for l1 in self.list_dir(&root).await?.0 {
            for l2 in self.list_dir(&format!("{root}/{l1}")).await?.0 {
                for v in self.list_dir(&format!("{root}/{l1}/{l2}")).await?.0 {
                    match self.get_volume(&v).await {
                        Ok(cfg) => out.push(cfg),
                        Err(e) => {
                            tracing::warn!(volume = %v, error = %e, "skipping an unreadable backup volume")
                        }
                    }
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub async fn get_volume(&self, volume: &str) -> Result<VolumeCfg> {
        let rel = VolumePaths::new(volume).volume_cfg();
        match self.get_bytes(&rel).await? {
            Some(b) => Ok(format::parse_volume_cfg(&rel, &b)?),
            None => Err(BackupStoreError::VolumeNotFound {
                volume: volume.to_string(),
            }),
        }
    }

    /// Every backup of `volume` (completed and in progress), oldest first.
    pub async fn list_backups(&self, volume: &str) -> Result<Vec<BackupCfg>> {
        let paths = VolumePaths::new(volume);
        let mut out = Vec::new();
        for f in self.list_dir(&paths.backups_dir()).await?.1 {
            if let Some(name) = format::backup_name_of(&f) {
                match self.get_backup(volume, name).await {
                    Ok(cfg) => out.push(cfg),
                    Err(e) => {
                        tracing::warn!(volume, backup = name, error = %e, "skipping an unreadable backup config")
                    }
                }
            }
        }
        out.sort_by(|a, b| {
            (a.in_progress(), &a.created_time, &a.name).cmp(&(
                b.in_progress(),
                &b.created_time,
                &b.name,
            ))
        });
        Ok(out)
    }

    pub async fn get_backup(&self, volume: &str, backup: &str) -> Result<BackupCfg> {
        let rel = VolumePaths::new(volume).backup_cfg(backup);
        match self.get_bytes(&rel).await? {
            Some(b) => {
                let mut cfg = format::parse_backup_cfg(&rel, &b)?;
                if cfg.name.is_empty() {
                    cfg.name = backup.to_string();
                }
                if cfg.volume_name.is_empty() {
                    cfg.volume_name = volume.to_string();
                }
                Ok(cfg)
            }
            None => Err(BackupStoreError::BackupNotFound {
                volume: volume.to_string(),
                backup: backup.to_string(),
            }),
        }
    }

    /// Takes Longhorn's lock of type `ty` on `volume`: writes our lock
    /// file, then waits (up to 30 s) until no unexpired lock of the other
    /// type has priority (acquired first, or older). With no other lock
    /// present at all it takes the lock at once rather than after
    /// Longhorn's 2 s settle time: a competitor writing later sees ours.
    async fn lock(&self, volume: &str, ty: u8) -> Result<HeldLock> {
        let paths = VolumePaths::new(volume);
        let name = format!("lock-{}", random_hex(8));
        let path = self.path(&paths.lock(&name));
        self.put_json(
            &paths.lock(&name),
            &LockFile {
                name: name.clone(),
                ty,
                acquired: false,
            },
        )
        .await?;
        let started = Instant::now();
        let mut settled = false;
        loop {
            let mine = self
                .store
                .head(&path)
                .await
                .map_err(Self::err("reading", &path))?
                .last_modified;
            let mut others = Vec::new();
            for f in self.list_dir(&paths.locks_dir()).await?.1 {
                let Some(other) = f.strip_suffix(".lck") else {
                    continue;
                };
                if other == name {
                    continue;
                }
                let op = self.path(&paths.lock(other));
                let (Ok(meta), Ok(Some(bytes))) = (
                    self.store.head(&op).await,
                    self.get_bytes(&paths.lock(other)).await,
                ) else {
                    continue;
                };
                let Ok(lf) = serde_json::from_slice::<LockFile>(&bytes) else {
                    continue;
                };
                others.push((lf, meta.last_modified));
            }
            let now = chrono::Utc::now();
            let blocked = others.iter().any(|(o, t)| {
                let expired = now
                    .signed_duration_since(*t)
                    .to_std()
                    .map(|d| d > LOCK_DURATION)
                    .unwrap_or(false);
                let priority = o.acquired || (*t, &o.name) < (mine, &name);
                o.ty != ty && priority && !expired
            });
            if !blocked && (others.is_empty() || settled) {
                break;
            }
            if started.elapsed() > self.lock_wait {
                let _ = self.store.delete(&path).await;
                let (kind, other) = if ty == DELETION_LOCK {
                    ("deletion", "backup or restore")
                } else {
                    ("backup/restore", "deletion")
                };
                return Err(BackupStoreError::Locked {
                    volume: volume.to_string(),
                    kind,
                    other,
                    secs: self.lock_wait.as_secs(),
                });
            }
            tokio::time::sleep(if settled { LOCK_RETRY } else { LOCK_CHECK_WAIT }).await;
            settled = true;
        }
        let held = LockFile {
            name: name.clone(),
            ty,
            acquired: true,
        };
        self.put_json(&paths.lock(&name), &held).await?;
        let (store, rel, me) = (self.clone(), paths.lock(&name), held);
        let refresh = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOCK_REFRESH).await;
                let _ = store.put_json(&rel, &me).await;
            }
        });
        Ok(HeldLock {
            store: self.store.clone(),
            path,
            refresh,
        })
    }

    /// Backs up `req` reading `source`. Writes the in-progress config first,
    /// uploads the blocks the store lacks, then the complete config and the
    /// updated `volume.cfg`.
    pub async fn create_backup(
        &self,
        req: BackupRequest,
        source: Arc<dyn BlockSource>,
        progress: Arc<Progress>,
    ) -> Result<BackupReport> {
        let lock = self.lock(&req.volume, BACKUP_LOCK).await?;
        let r = self.create_backup_locked(&req, source, &progress).await;
        if r.is_err() {
            // A failed backup leaves no config behind (its uploaded blocks
            // are collected by the next deletion).
            let p = self.path(&VolumePaths::new(&req.volume).backup_cfg(&req.backup_name));
            if let Ok(Some(b)) = self
                .get_bytes(&VolumePaths::new(&req.volume).backup_cfg(&req.backup_name))
                .await
            {
                if format::parse_backup_cfg("", &b).is_ok_and(|c| c.in_progress()) {
                    let _ = self.store.delete(&p).await;
                }
            }
        }
        lock.release().await;
        r
    }

    async fn create_backup_locked(
        &self,
        req: &BackupRequest,
        source: Arc<dyn BlockSource>,
        progress: &Progress,
    ) -> Result<BackupReport> {
        let paths = VolumePaths::new(&req.volume);
        let mut vol = match self.get_volume(&req.volume).await {
            Ok(v) => v,
            Err(BackupStoreError::VolumeNotFound { .. }) => {
                let v = VolumeCfg {
                    name: req.volume.clone(),
                    size: req.volume_size,
                    created_time: format::now(),
                    compression_method: req.compression.as_str().to_string(),
                    data_engine: "v1".into(),
                    ..VolumeCfg::default()
                };
                self.put_json(&paths.volume_cfg(), &v).await?;
                v
            }
            Err(e) => return Err(e),
        };
        // The volume keeps its compression (its blocks are shared between
        // its backups); an incremental backup keeps its base's block size.
        let compression =
            Compression::from_config(&vol.compression_method).unwrap_or(req.compression);
        let invalid = |reason: String| BackupStoreError::Invalid {
            volume: req.volume.clone(),
            backup: req.backup_name.clone(),
            reason,
        };
        let (mut map, ranges, incremental, block): (
            BTreeMap<u64, String>,
            &Vec<(u64, u64)>,
            bool,
            u64,
        ) = match &req.plan {
            BackupPlan::Full { ranges } => (BTreeMap::new(), ranges, false, req.block_size),
            BackupPlan::Incremental {
                base_backup,
                changed,
            } => {
                let base = self.get_backup(&req.volume, base_backup).await?;
                if base.in_progress() {
                    return Err(invalid(format!(
                        "base backup {base_backup} is not complete"
                    )));
                }
                let block = base.block_size().map_err(invalid)?;
                (
                    base.blocks
                        .into_iter()
                        .map(|b| (b.offset, b.block_checksum))
                        .collect(),
                    changed,
                    true,
                    block,
                )
            }
        };
        if block == 0 || block % 4096 != 0 {
            return Err(invalid(format!(
                "block size {block} is not a multiple of 4096"
            )));
        }
        // Blocks the ranges touch, in order, once each.
        let size = req.volume_size;
        let mut offsets: Vec<u64> = Vec::new();
        for &(off, len) in ranges {
            if len == 0 {
                continue;
            }
            let (first, last) = (
                off / block,
                (off + len - 1).min(size.saturating_sub(1)) / block,
            );
            for b in first..=last {
                if offsets.last() != Some(&(b * block)) {
                    offsets.push(b * block);
                }
            }
        }
        offsets.sort_unstable();
        offsets.dedup();
        // Blocks past the (possibly shrunk) volume end leave the map.
        map.retain(|off, _| *off < size);

        self.put_json(
            &paths.backup_cfg(&req.backup_name),
            &BackupCfg {
                name: req.backup_name.clone(),
                volume_name: req.volume.clone(),
                compression_method: compression.as_str().into(),
                ..BackupCfg::default()
            },
        )
        .await?;
        progress.set_total(offsets.len() as u64 * block);

        let claimed: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(HashSet::new()));
        let results: Vec<(u64, Option<String>, bool, u64)> =
            futures::stream::iter(offsets.iter().copied())
                .map(|off| {
                    let (src, claimed) = (source.clone(), claimed.clone());
                    let volume = req.volume.clone();
                    let paths = &paths;
                    async move {
                        let len = block.min(size - off) as usize;
                        // Read, zero check and hash off the async threads.
                        let (data, sum) = tokio::task::spawn_blocking(
                            move || -> Result<(Vec<u8>, Option<String>)> {
                                let mut buf = vec![0u8; block as usize];
                                src.read_at(off, &mut buf[..len]).map_err(|source| {
                                    BackupStoreError::Read {
                                        volume,
                                        offset: off,
                                        source,
                                    }
                                })?;
                                if buf.iter().all(|&b| b == 0) {
                                    return Ok((buf, None));
                                }
                                let sum = format::checksum(&buf);
                                Ok((buf, Some(sum)))
                            },
                        )
                        .await
                        .map_err(|e| BackupStoreError::Internal(e.to_string()))??;
                        progress.add_done(block);
                        fail::fail_point!("backupstore::backup::after_block", |_| Err(
                            BackupStoreError::Internal(
                                "failpoint backupstore::backup::after_block".into()
                            )
                        ));
                        let Some(sum) = sum else {
                            return Ok((off, None, false, 0));
                        };
                        // Same content elsewhere in this backup: uploaded once.
                        let first = claimed
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(sum.clone());
                        if !first {
                            return Ok((off, Some(sum), false, 0));
                        }
                        let rel = paths.block(&sum);
                        let p = self.path(&rel);
                        match self.store.head(&p).await {
                            Ok(_) => return Ok((off, Some(sum), false, 0)),
                            Err(object_store::Error::NotFound { .. }) => {}
                            Err(e) => return Err(Self::err("checking", &p)(e)),
                        }
                        let z = tokio::task::spawn_blocking(move || compression.compress(&data))
                            .await
                            .map_err(|e| BackupStoreError::Internal(e.to_string()))?
                            .map_err(|e| {
                                BackupStoreError::Internal(format!("compressing a block: {e}"))
                            })?;
                        let n = z.len() as u64;
                        self.store
                            .put(&p, PutPayload::from(z))
                            .await
                            .map_err(Self::err("uploading", &p))?;
                        Ok((off, Some(sum), true, n))
                    }
                })
                .buffer_unordered(req.concurrency.max(1))
                .try_collect()
                .await?;

        let mut report = BackupReport {
            incremental,
            ..BackupReport::default()
        };
        for (off, sum, uploaded, bytes) in results {
            report.read_bytes += block.min(size - off);
            match sum {
                None => {
                    report.zero_blocks += 1;
                    map.remove(&off);
                }
                Some(s) => {
                    if uploaded {
                        report.uploaded_blocks += 1;
                        report.uploaded_bytes += bytes;
                    } else {
                        report.existing_blocks += 1;
                    }
                    map.insert(off, s);
                }
            }
        }
        report.total_blocks = map.len() as u64;
        let cfg = BackupCfg {
            name: req.backup_name.clone(),
            volume_name: req.volume.clone(),
            snapshot_name: req.snapshot_name.clone(),
            snapshot_created_at: req.snapshot_created.clone(),
            created_time: format::now(),
            size: map.len() as u64 * block,
            labels: req.labels.clone(),
            parameters: BTreeMap::from([(
                format::BLOCK_SIZE_PARAMETER.to_string(),
                format::block_size_quantity(block),
            )]),
            is_incremental: incremental,
            compression_method: compression.as_str().into(),
            newly_uploaded_data_size: report.uploaded_bytes,
            re_uploaded_data_size: 0,
            blocks: map
                .into_iter()
                .map(|(offset, block_checksum)| BlockMapping {
                    offset,
                    block_checksum,
                })
                .collect(),
            extra: BTreeMap::new(),
        };
        self.put_json(&paths.backup_cfg(&req.backup_name), &cfg)
            .await?;
        // Re-read: another node may have changed it meanwhile.
        if let Ok(v) = self.get_volume(&req.volume).await {
            vol = v;
        }
        vol.last_backup_name = cfg.name.clone();
        vol.last_backup_at = cfg.snapshot_created_at.clone();
        vol.block_count += report.uploaded_blocks;
        vol.size = req.volume_size;
        vol.labels = req.labels.clone();
        self.put_json(&paths.volume_cfg(), &vol).await?;
        Ok(report)
    }

    /// Restores backup `backup` of `volume` into `sink`. With `base` (the
    /// backup last restored into the sink), only blocks whose checksum
    /// changed are fetched and blocks the new map lacks are zeroed.
    pub async fn restore(
        &self,
        volume: &str,
        backup: &str,
        sink: Arc<dyn BlockSink>,
        base: Option<&BackupCfg>,
        progress: Arc<Progress>,
        concurrency: usize,
    ) -> Result<RestoreReport> {
        let lock = self.lock(volume, BACKUP_LOCK).await?;
        let r = self
            .restore_locked(volume, backup, sink, base, &progress, concurrency)
            .await;
        lock.release().await;
        r
    }

    async fn restore_locked(
        &self,
        volume: &str,
        backup: &str,
        sink: Arc<dyn BlockSink>,
        base: Option<&BackupCfg>,
        progress: &Progress,
        concurrency: usize,
    ) -> Result<RestoreReport> {
        let vol = self.get_volume(volume).await?;
        let cfg = self.get_backup(volume, backup).await?;
        if cfg.in_progress() {
            return Err(BackupStoreError::InProgress {
                volume: volume.into(),
                backup: backup.into(),
            });
        }
        let block = cfg
            .block_size()
            .map_err(|reason| BackupStoreError::Invalid {
                volume: volume.into(),
                backup: backup.into(),
                reason,
            })?;
        let compression = Compression::from_config(&cfg.compression_method).unwrap_or_default();
        // (offset, checksum to fetch, or None to zero)
        let mut work: Vec<(u64, Option<String>)> = Vec::new();
        match base {
            None => work.extend(
                cfg.blocks
                    .iter()
                    .map(|b| (b.offset, Some(b.block_checksum.clone()))),
            ),
            Some(base) => {
                let old: BTreeMap<u64, &str> = base
                    .blocks
                    .iter()
                    .map(|b| (b.offset, b.block_checksum.as_str()))
                    .collect();
                let new: BTreeMap<u64, &str> = cfg
                    .blocks
                    .iter()
                    .map(|b| (b.offset, b.block_checksum.as_str()))
                    .collect();
                for (off, sum) in &new {
                    if old.get(off) != Some(sum) {
                        work.push((*off, Some(sum.to_string())));
                    }
                }
                for off in old.keys() {
                    if !new.contains_key(off) {
                        work.push((*off, None));
                    }
                }
            }
        }
        progress.set_total(work.len() as u64 * block);
        let paths = VolumePaths::new(volume);
        let size = vol.size;
        let reports: Vec<(bool, u64)> = futures::stream::iter(work)
            .map(|(off, sum)| {
                let sink = sink.clone();
                let paths = paths.clone();
                async move {
                    let len = if off >= size {
                        0
                    } else {
                        block.min(size - off)
                    };
                    let Some(sum) = sum else {
                        tokio::task::spawn_blocking(move || sink.write_zeroes(off, len))
                            .await
                            .map_err(|e| BackupStoreError::Internal(e.to_string()))?
                            .map_err(|source| BackupStoreError::Write {
                                offset: off,
                                source,
                            })?;
                        progress.add_done(block);
                        return Ok((false, len));
                    };
                    let rel = paths.block(&sum);
                    let p = self.path(&rel);
                    let missing = || BackupStoreError::MissingBlock {
                        volume: volume.into(),
                        backup: backup.into(),
                        checksum: sum.clone(),
                        offset: off,
                        path: p.to_string(),
                    };
                    let raw = match self.store.get(&p).await {
                        Ok(r) => r.bytes().await.map_err(Self::err("reading", &p))?,
                        Err(object_store::Error::NotFound { .. }) => return Err(missing()),
                        Err(e) => return Err(Self::err("reading", &p)(e)),
                    };
                    let (v, b, s, pth) = (
                        volume.to_string(),
                        backup.to_string(),
                        sum.clone(),
                        p.to_string(),
                    );
                    tokio::task::spawn_blocking(move || -> Result<()> {
                        let data = decompress_verified(&raw, compression, block, &s).map_err(
                            |reason| BackupStoreError::CorruptBlock {
                                volume: v,
                                backup: b,
                                checksum: s.clone(),
                                offset: off,
                                path: pth,
                                reason,
                            },
                        )?;
                        sink.write_at(off, &data[..len as usize]).map_err(|source| {
                            BackupStoreError::Write {
                                offset: off,
                                source,
                            }
                        })
                    })
                    .await
                    .map_err(|e| BackupStoreError::Internal(e.to_string()))??;
                    progress.add_done(block);
                    fail::fail_point!("backupstore::restore::after_block", |_| Err(
                        BackupStoreError::Internal(
                            "failpoint backupstore::restore::after_block".into()
                        )
                    ));
                    Ok((true, len))
                }
            })
            .buffer_unordered(concurrency.max(1))
            .try_collect()
            .await?;
        let mut r = RestoreReport::default();
        for (fetched, len) in reports {
            if fetched {
                r.restored_blocks += 1;
            } else {
                r.zeroed_blocks += 1;
            }
            r.bytes += len;
        }
        Ok(r)
    }

    /// Deletes backup `backup` of `volume`, then every block of the volume
    /// no remaining backup references. Holds the deletion lock, which a
    /// running backup or restore excludes.
    pub async fn delete_backup(&self, volume: &str, backup: &str) -> Result<DeleteReport> {
        let lock = self.lock(volume, DELETION_LOCK).await?;
        let r = self.delete_locked(volume, backup).await;
        lock.release().await;
        r
    }

    async fn delete_locked(&self, volume: &str, backup: &str) -> Result<DeleteReport> {
        let paths = VolumePaths::new(volume);
        self.get_backup(volume, backup).await?;
        let p = self.path(&paths.backup_cfg(backup));
        self.store
            .delete(&p)
            .await
            .map_err(Self::err("deleting", &p))?;
        let mut remaining = Vec::new();
        let mut unreadable = false;
        for f in self.list_dir(&paths.backups_dir()).await?.1 {
            if let Some(name) = format::backup_name_of(&f) {
                match self.get_backup(volume, name).await {
                    Ok(cfg) => remaining.push(cfg),
                    Err(BackupStoreError::BackupNotFound { .. }) => {}
                    Err(e) => {
                        tracing::warn!(volume, backup = name, error = %e, "unreadable backup config: block collection skipped");
                        unreadable = true;
                    }
                }
            }
        }
        let mut report = DeleteReport::default();
        if unreadable || remaining.iter().any(BackupCfg::in_progress) {
            // As Longhorn: a backup whose map is not written yet may use any
            // block; collect next time.
            tracing::info!(volume, "a backup of this volume is in progress or was interrupted: block collection skipped");
            report.gc_skipped = true;
            return Ok(report);
        }
        let referenced: HashSet<&str> = remaining
            .iter()
            .flat_map(|b| b.blocks.iter().map(|m| m.block_checksum.as_str()))
            .collect();
        let prefix = self.path(&paths.blocks_dir());
        let all: Vec<object_store::ObjectMeta> =
            match self.store.list(Some(&prefix)).try_collect().await {
                Ok(v) => v,
                Err(object_store::Error::NotFound { .. }) => Vec::new(),
                Err(e) => return Err(Self::err("listing", &prefix)(e)),
            };
        for o in all {
            let Some(sum) = o.location.filename().and_then(|f| f.strip_suffix(".blk")) else {
                continue;
            };
            if referenced.contains(sum) {
                report.kept_blocks += 1;
                continue;
            }
            self.store
                .delete(&o.location)
                .await
                .map_err(Self::err("deleting", &o.location))?;
            report.removed_blocks += 1;
        }
        if let Ok(mut vol) = self.get_volume(volume).await {
            vol.block_count = report.kept_blocks;
            if vol.last_backup_name == backup {
                let last = remaining
                    .iter()
                    .filter(|b| !b.in_progress())
                    .max_by(|a, b| a.created_time.cmp(&b.created_time));
                vol.last_backup_name = last.map(|b| b.name.clone()).unwrap_or_default();
                vol.last_backup_at = last
                    .map(|b| b.snapshot_created_at.clone())
                    .unwrap_or_default();
            }
            self.put_json(&paths.volume_cfg(), &vol).await?;
        }
        Ok(report)
    }
}

/// Decompresses a block (trying the other methods if the declared one
/// fails, as Longhorn does for old backups) and checks its checksum.
fn decompress_verified(
    raw: &[u8],
    declared: Compression,
    block: u64,
    want: &str,
) -> std::result::Result<Vec<u8>, String> {
    // The declared method first; the others as Longhorn falls back for
    // blocks of older backups. The error reports the declared attempt.
    let mut first: Option<String> = None;
    for c in [
        declared,
        Compression::Lz4,
        Compression::Gzip,
        Compression::None,
    ] {
        let outcome = match c.decompress(raw, block) {
            Ok(mut data) => {
                if (data.len() as u64) < block {
                    data.resize(block as usize, 0);
                }
                let got = format::checksum(&data);
                if got == want {
                    return Ok(data);
                }
                format!("decoded as {} it hashes to {got}", c.as_str())
            }
            Err(e) => format!("cannot decode it as {}: {e}", c.as_str()),
        };
        first.get_or_insert(outcome);
    }
    Err(first.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};

    use object_store::memory::InMemory;

    use super::*;

    const MIB: u64 = 1 << 20;

    /// A 16 MiB source whose reads past `gate` wait until it is opened.
    struct GatedSource {
        gate: u64,
        open: Mutex<bool>,
        cv: Condvar,
    }

    impl BlockSource for GatedSource {
        fn size(&self) -> u64 {
            16 * MIB
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            if offset >= self.gate {
                let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
                while !*open {
                    open = self.cv.wait(open).unwrap_or_else(|p| p.into_inner());
                }
            }
            // Distinct, non-zero blocks so none is skipped or deduplicated.
            buf.fill((offset / MIB) as u8 + 1);
            Ok(())
        }
    }

    /// Progress moves while a backup runs, and the backup is listed as in
    /// progress until it completes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn progress_is_visible_while_a_backup_runs() {
        let store = BackupStore::new(Arc::new(InMemory::new()), ObjPath::default());
        let source = Arc::new(GatedSource {
            gate: 8 * MIB,
            open: Mutex::new(false),
            cv: Condvar::new(),
        });
        let progress = Arc::new(Progress::new());
        let req = BackupRequest {
            volume: "v".into(),
            volume_size: 16 * MIB,
            backup_name: "backup-1".into(),
            snapshot_name: "s1".into(),
            snapshot_created: format::now(),
            labels: BTreeMap::new(),
            compression: Compression::Lz4,
            block_size: 2 * MIB,
            plan: BackupPlan::Full {
                ranges: vec![(0, 16 * MIB)],
            },
            concurrency: 2,
        };
        let (s2, src, p2) = (store.clone(), source.clone(), progress.clone());
        let task = tokio::spawn(async move { s2.create_backup(req, src, p2).await });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while progress.done() < 8 * MIB {
            assert!(
                std::time::Instant::now() < deadline,
                "no progress: {} of {}",
                progress.done(),
                progress.total()
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // Half the blocks are done and the rest wait at the gate.
        assert_eq!(progress.total(), 16 * MIB);
        assert_eq!(progress.done(), 8 * MIB);
        assert_eq!(progress.percent(), 50);
        let listed = store.list_backups("v").await.expect("list");
        assert!(
            listed
                .iter()
                .any(|b| b.name == "backup-1" && b.in_progress()),
            "{listed:?}"
        );
        *source.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
        source.cv.notify_all();
        let report = task.await.expect("join").expect("backup");
        assert_eq!((report.uploaded_blocks, report.total_blocks), (8, 8));
        assert_eq!(progress.percent(), 100);
        assert!(!store
            .get_backup("v", "backup-1")
            .await
            .expect("get")
            .in_progress());
    }
}
