//! This node's disks and the replicas on them.
//!
//! Owns the directory layout `<disk>/replicas/<replica>/` and the one open
//! [`Replica`] per replica directory: the engine's local legs, the replica
//! server's connections and a rebuild all share that object (so its in-memory
//! extent map is the only one). Both the control plane (local replicas) and
//! the replica server (replicas a remote engine uses) go through here.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use crate::replica::meta::{self, VOLUME_META};
use crate::replica::{Replica, ReplicaError, ReplicaSpec};
use crate::transport::{DiskReport, NodeReport, ReplicaReport};

/// What [`NodeDisks::expand`] does with a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub enum GrowStep {
    /// Only whether its disk takes the growth; the replica must not be open
    /// (an offline expansion checks every replica before growing any).
    Check,
    /// Only whether its disk takes the growth, the replica open in a live
    /// volume (an online expansion: the owner's engine then grows it in
    /// place, under its owner session).
    CheckLive,
    /// Grow it; it must not be open.
    Grow,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("no replica named {replica} on node {node}")]
    UnknownReplica { node: String, replica: String },
    #[error("replica {replica} on node {node} belongs to volume {found}, not {volume}")]
    WrongVolume {
        node: String,
        replica: String,
        volume: String,
        found: String,
    },
    #[error("replica {replica} already exists on node {node}")]
    Exists { node: String, replica: String },
    #[error("replica {replica} on node {node} is in use: detach its volume first")]
    InUse { node: String, replica: String },
    #[error("node {node} has no disk with room for a {size}-byte replica that holds no other replica of the volume (see `cairnctl node list`)")]
    NoSpace { node: String, size: u64 },
    #[error("disk {disk} of node {node} has no room for replica {replica} to grow by {by} bytes (over-provisioning / minimal-available rules; see `cairnctl node list`)")]
    NoRoomToGrow {
        node: String,
        replica: String,
        disk: String,
        by: u64,
    },
    #[error("bad replica name {0:?}")]
    BadName(String),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl DiskError {
    /// The errno a remote engine sees for this error.
    pub fn errno(&self) -> i32 {
        match self {
            DiskError::UnknownReplica { .. } => libc::ENOENT,
            DiskError::Exists { .. } => libc::EEXIST,
            DiskError::InUse { .. } => libc::EBUSY,
            DiskError::NoSpace { .. } | DiskError::NoRoomToGrow { .. } => libc::ENOSPC,
            DiskError::BadName(_) | DiskError::WrongVolume { .. } => libc::EINVAL,
            DiskError::Replica(_) | DiskError::Io { .. } => libc::EIO,
        }
    }
}

/// One replica found on a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundReplica {
    pub disk: PathBuf,
    pub dir: PathBuf,
    pub name: String,
    /// From `volume.meta`, or why it could not be read.
    pub meta: Result<meta::VolumeMeta, String>,
}

/// The node's disks (absolute, existing directories) and open replicas.
pub struct NodeDisks {
    node: String,
    disks: Vec<PathBuf>,
    open: Mutex<HashMap<String, Weak<Replica>>>,
    scheduling: Mutex<Scheduling>,
}

/// Whether new replicas may be placed on this node and on which of its
/// disks (Longhorn's node and disk `allowScheduling`). Replicas already
/// there stay and keep serving.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Scheduling {
    pub allow: bool,
    /// Disks that take no new replicas, by path.
    #[serde(default)]
    pub unschedulable_disks: Vec<PathBuf>,
}

impl Default for Scheduling {
    fn default() -> Self {
        Scheduling {
            allow: true,
            unschedulable_disks: Vec::new(),
        }
    }
}

impl Scheduling {
    /// No new replicas anywhere on the node.
    pub fn none() -> Self {
        Scheduling {
            allow: false,
            unschedulable_disks: Vec::new(),
        }
    }

    /// Whether `disk` takes new replicas.
    pub fn allows(&self, disk: &Path) -> bool {
        self.allow && !self.unschedulable_disks.iter().any(|d| d == disk)
    }
}

impl NodeDisks {
    pub fn new(node: &str, disks: Vec<PathBuf>) -> NodeDisks {
        NodeDisks {
            node: node.to_string(),
            disks,
            open: Mutex::new(HashMap::new()),
            scheduling: Mutex::new(Scheduling::default()),
        }
    }

    /// The scheduling rule now.
    pub fn scheduling(&self) -> Scheduling {
        self.scheduling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the scheduling rule once `persist` has stored it, both
    /// under the rule's lock: two changes at once cannot leave the file
    /// holding one rule and the node applying the other. When `persist`
    /// fails nothing changes.
    pub fn set_scheduling<E>(
        &self,
        s: Scheduling,
        persist: impl FnOnce(&Scheduling) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut rule = self.scheduling.lock().unwrap_or_else(|p| p.into_inner());
        persist(&s)?;
        *rule = s;
        Ok(())
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn disks(&self) -> &[PathBuf] {
        &self.disks
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<Replica>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every replica directory on every disk.
    pub fn scan(&self) -> Vec<FoundReplica> {
        let mut out = Vec::new();
        for disk in &self.disks {
            let root = disk.join("replicas");
            let Ok(entries) = std::fs::read_dir(&root) else {
                continue;
            };
            for e in entries.flatten() {
                let dir = e.path();
                if !dir.is_dir() {
                    continue;
                }
                let name = e.file_name().to_string_lossy().into_owned();
                let meta = std::fs::read(dir.join(VOLUME_META))
                    .map_err(|e| e.to_string())
                    .and_then(|b| meta::parse_volume_meta(&b).map_err(|e| e.to_string()));
                out.push(FoundReplica {
                    disk: disk.clone(),
                    dir,
                    name,
                    meta,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn find(&self, replica: &str) -> Option<FoundReplica> {
        if crate::name::validate_label("replica", replica, 63).is_err() {
            return None;
        }
        self.disks.iter().find_map(|disk| {
            let dir = disk.join("replicas").join(replica);
            dir.is_dir().then(|| FoundReplica {
                disk: disk.clone(),
                dir,
                name: replica.to_string(),
                meta: Err(String::new()),
            })
        })
    }

    /// What this node reports to its peers: disks with size, free space and
    /// the volume bytes its replicas promise.
    pub fn report(&self) -> NodeReport {
        let found = self.scan();
        let rule = self.scheduling();
        let disks = self
            .disks
            .iter()
            .map(|d| {
                let (size, available) = disk_space(d).unwrap_or((0, 0));
                let mine: Vec<&FoundReplica> = found.iter().filter(|f| &f.disk == d).collect();
                DiskReport {
                    path: d.display().to_string(),
                    size,
                    available,
                    allocated: mine
                        .iter()
                        .filter_map(|f| f.meta.as_ref().ok())
                        .map(|m| m.size)
                        .sum(),
                    replicas: mine.len() as u32,
                    schedulable: rule.allows(d),
                }
            })
            .collect();
        NodeReport {
            node: self.node.clone(),
            disks,
            placements: Vec::new(),
        }
    }

    /// Every replica, as adoption needs them.
    pub fn list(&self) -> Vec<ReplicaReport> {
        self.scan()
            .into_iter()
            .map(|f| {
                let (volume, size, revision, owner_term, error) = match &f.meta {
                    Ok(m) => (
                        m.volume.clone(),
                        m.size,
                        m.revision,
                        m.owner_term,
                        String::new(),
                    ),
                    Err(e) => (String::new(), 0, 0, 0, e.clone()),
                };
                ReplicaReport {
                    volume,
                    replica: f.name,
                    size,
                    revision,
                    disk: f.disk.display().to_string(),
                    dir: f.dir.display().to_string(),
                    error,
                    owner_term,
                }
            })
            .collect()
    }

    /// Opens (or shares the already open) replica `replica` of `volume`.
    pub fn open(&self, volume: &str, replica: &str) -> Result<Arc<Replica>, DiskError> {
        let mut open = self.lock();
        if let Some(r) = open.get(replica).and_then(Weak::upgrade) {
            return self.check_volume(r, volume, replica);
        }
        let found = self
            .find(replica)
            .ok_or_else(|| DiskError::UnknownReplica {
                node: self.node.clone(),
                replica: replica.to_string(),
            })?;
        let r = Arc::new(Replica::open(&found.dir)?);
        open.insert(replica.to_string(), Arc::downgrade(&r));
        open.retain(|_, w| w.strong_count() > 0);
        self.check_volume(r, volume, replica)
    }

    fn check_volume(
        &self,
        r: Arc<Replica>,
        volume: &str,
        replica: &str,
    ) -> Result<Arc<Replica>, DiskError> {
        if r.volume_name() != volume {
            return Err(DiskError::WrongVolume {
                node: self.node.clone(),
                replica: replica.to_string(),
                volume: volume.to_string(),
                found: r.volume_name().to_string(),
            });
        }
        Ok(r)
    }

    /// Grows replica `replica` to `size` bytes if its disk `fits` the
    /// growth (the caller's placement rules, given the disk and the bytes
    /// added), or only checks it (see [`GrowStep`]).
    pub fn expand(
        &self,
        replica: &str,
        size: u64,
        step: GrowStep,
        fits: impl Fn(&DiskReport, u64) -> bool,
    ) -> Result<(), DiskError> {
        let mut open = self.lock();
        let live = open.get(replica).and_then(Weak::upgrade);
        if live.is_some() && step != GrowStep::CheckLive {
            return Err(DiskError::InUse {
                node: self.node.clone(),
                replica: replica.to_string(),
            });
        }
        if live.is_none() {
            open.remove(replica);
        }
        let found = self
            .find(replica)
            .ok_or_else(|| DiskError::UnknownReplica {
                node: self.node.clone(),
                replica: replica.to_string(),
            })?;
        let current = match &live {
            Some(r) => r.size(),
            None => Replica::open(&found.dir)?.size(),
        };
        if size > current {
            let disk = found.disk.display().to_string();
            let by = size - current;
            let report = self.report();
            let room = report
                .disks
                .iter()
                .find(|d| d.path == disk)
                .is_some_and(|d| fits(d, by));
            if !room {
                return Err(DiskError::NoRoomToGrow {
                    node: self.node.clone(),
                    replica: replica.to_string(),
                    disk,
                    by,
                });
            }
        }
        if step != GrowStep::Grow {
            return Ok(());
        }
        Replica::expand(&found.dir, size)?;
        tracing::info!(replica, size, dir = %found.dir.display(), "replica expanded");
        Ok(())
    }

    /// Forgets an open replica object so the next `open` reads the files
    /// again (after a rebuild replaced them, or a health check failed it).
    pub fn forget(&self, replica: &str) {
        self.lock().remove(replica);
    }

    /// Creates an empty replica on the disk with the least allocated bytes
    /// among those that `fits` accepts (the placement rules of the caller)
    /// and that hold no other replica of `volume` (two replicas of a volume
    /// on one disk would fail together).
    pub fn create(
        &self,
        volume: &str,
        replica: &str,
        size: u64,
        replaces: Option<&str>,
        fits: impl Fn(&DiskReport) -> bool,
    ) -> Result<(PathBuf, PathBuf), DiskError> {
        crate::name::validate_label("replica", replica, 63)
            .map_err(|_| DiskError::BadName(replica.to_string()))?;
        if self.find(replica).is_some() {
            return Err(DiskError::Exists {
                node: self.node.clone(),
                replica: replica.to_string(),
            });
        }
        let report = self.report();
        let holding: Vec<PathBuf> = self
            .scan()
            .into_iter()
            // The replica being replaced does not count: its successor may
            // take its disk.
            .filter(|f| {
                f.meta.as_ref().is_ok_and(|m| m.volume == volume)
                    && Some(f.name.as_str()) != replaces
            })
            .map(|f| f.disk)
            .collect();
        let disk = report
            .disks
            .iter()
            .filter(|d| fits(d) && !holding.iter().any(|h| h.as_os_str() == d.path.as_str()))
            .min_by_key(|d| d.allocated)
            .ok_or_else(|| DiskError::NoSpace {
                node: self.node.clone(),
                size,
            })?;
        let disk = PathBuf::from(&disk.path);
        let dir = disk.join("replicas").join(replica);
        let spec = ReplicaSpec {
            volume: volume.to_string(),
            replica: replica.to_string(),
            size,
        };
        if let Err(e) = Replica::create(&dir, &spec) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        tracing::info!(volume, replica, dir = %dir.display(), "replica created");
        Ok((disk, dir))
    }

    /// Deletes a replica's directory; refuses one that is open.
    pub fn delete(&self, replica: &str) -> Result<(), DiskError> {
        let mut open = self.lock();
        if open.get(replica).is_some_and(|w| w.strong_count() > 0) {
            return Err(DiskError::InUse {
                node: self.node.clone(),
                replica: replica.to_string(),
            });
        }
        open.remove(replica);
        let Some(found) = self.find(replica) else {
            return Ok(());
        };
        remove_dir(&found.dir)?;
        tracing::info!(replica, dir = %found.dir.display(), "replica deleted");
        Ok(())
    }
}

fn remove_dir(dir: &Path) -> Result<(), DiskError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DiskError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Longhorn's scheduling rule for one disk: after placing `size` more bytes,
/// the promised bytes stay within `over_provisioning`% of the disk's size,
/// and the free space is above `min_available`% of it.
/// A disk marked unschedulable takes no new replica.
pub fn disk_fits(d: &DiskReport, size: u64, over_provisioning: u32, min_available: u32) -> bool {
    d.schedulable && disk_has_room(d, size, over_provisioning, min_available)
}

/// [`disk_fits`]'s space rules alone: what a replica already on the disk
/// needs to grow by `size` (marking a disk unschedulable keeps new
/// replicas off it; it does not freeze the sizes of the ones there).
pub fn disk_has_room(
    d: &DiskReport,
    size: u64,
    over_provisioning: u32,
    min_available: u32,
) -> bool {
    let size_ok =
        (d.allocated as u128 + size as u128) * 100 <= d.size as u128 * over_provisioning as u128;
    let free_ok = d.available as u128 * 100 > d.size as u128 * min_available as u128;
    d.size > 0 && size_ok && free_ok
}

/// Filesystem size and bytes available to unprivileged users, of `path`.
pub fn disk_space(path: &Path) -> Option<(u64, u64)> {
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

    #[test]
    fn scheduling_rule() {
        let d = |size, available, allocated| DiskReport {
            path: "/d".into(),
            size,
            available,
            allocated,
            replicas: 0,
            schedulable: true,
        };
        // 100 GiB disk, 50 free, 60 promised; 100 % over-provisioning.
        let g = 1u64 << 30;
        assert!(disk_fits(&d(100 * g, 50 * g, 60 * g), 40 * g, 100, 25));
        assert!(
            !disk_fits(&d(100 * g, 50 * g, 60 * g), 41 * g, 100, 25),
            "over the promise limit"
        );
        assert!(
            disk_fits(&d(100 * g, 50 * g, 60 * g), 100 * g, 200, 25),
            "200 % allows more"
        );
        assert!(
            !disk_fits(&d(100 * g, 25 * g, 0), g, 100, 25),
            "free space at the minimum"
        );
        assert!(!disk_fits(&d(0, 0, 0), 1, 100, 0), "unknown size");
        let mut off = d(100 * g, 50 * g, 0);
        off.schedulable = false;
        assert!(!disk_fits(&off, g, 100, 25), "marked unschedulable");
        assert!(disk_has_room(&off, g, 100, 25), "but its replicas may grow");
    }

    #[test]
    fn unschedulable_nodes_and_disks_take_no_new_replicas() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let disks = NodeDisks::new("n1", vec![a.clone(), b.clone()]);
        let any = |_: &DiskReport| true;
        let fits = |d: &DiskReport| d.schedulable;
        let stored = |_: &Scheduling| Ok::<(), ()>(());
        disks
            .set_scheduling(
                Scheduling {
                    allow: true,
                    unschedulable_disks: vec![a.clone()],
                },
                stored,
            )
            .unwrap();
        let r = disks.report();
        assert_eq!(
            r.disks.iter().map(|d| d.schedulable).collect::<Vec<_>>(),
            [false, true]
        );
        let (disk, _) = disks.create("v", "v-r1", 1 << 20, None, fits).unwrap();
        assert_eq!(disk, b, "placed on the disk that takes replicas");
        // A rule that cannot be stored is not applied.
        assert!(disks
            .set_scheduling(Scheduling::none(), |_| Err(()))
            .is_err());
        assert!(disks.report().disks.iter().any(|d| d.schedulable));
        disks.set_scheduling(Scheduling::none(), stored).unwrap();
        assert!(disks.report().disks.iter().all(|d| !d.schedulable));
        assert!(disks.create("w", "w-r1", 1 << 20, None, fits).is_err());
        // What is there stays (and a caller that ignores the flag may place).
        assert!(disks.find("v-r1").is_some());
        assert!(disks.create("w", "w-r2", 1 << 20, None, any).is_ok());
    }

    #[test]
    fn create_open_share_list_delete() {
        let tmp = tempfile::tempdir().unwrap();
        let d0 = tmp.path().join("d0");
        let d1 = tmp.path().join("d1");
        for d in [&d0, &d1] {
            std::fs::create_dir_all(d.join("replicas")).unwrap();
        }
        let disks = NodeDisks::new("n1", vec![d0.clone(), d1.clone()]);
        let (disk, dir) = disks.create("v", "v-r-1", 1 << 20, None, |_| true).unwrap();
        assert!(dir.starts_with(&disk));
        // The second goes to the other disk: never two replicas of a volume on one disk.
        let (disk2, _) = disks.create("v", "v-r-2", 1 << 20, None, |_| true).unwrap();
        assert_ne!(disk, disk2);
        assert!(matches!(
            disks.create("v", "v-r-9", 4096, None, |_| true),
            Err(DiskError::NoSpace { .. })
        ));
        // A replacement may take the disk of the replica it replaces.
        let (d9, _) = disks
            .create("v", "v-r-9", 4096, Some("v-r-2"), |_| true)
            .unwrap();
        assert_eq!(d9, disk2);
        disks.delete("v-r-9").unwrap();
        // Another volume may share them.
        disks.create("w", "w-r-1", 4096, None, |_| true).unwrap();
        disks.delete("w-r-1").unwrap();
        assert!(matches!(
            disks.create("v", "v-r-1", 4096, None, |_| true),
            Err(DiskError::Exists { .. })
        ));
        assert!(matches!(
            disks.create("v", "v-r-3", 4096, None, |_| false),
            Err(DiskError::NoSpace { .. })
        ));
        let a = disks.open("v", "v-r-1").unwrap();
        let b = disks.open("v", "v-r-1").unwrap();
        assert!(Arc::ptr_eq(&a, &b), "one open object per replica");
        assert!(matches!(
            disks.open("w", "v-r-1"),
            Err(DiskError::WrongVolume { .. })
        ));
        assert!(matches!(
            disks.open("v", "nope"),
            Err(DiskError::UnknownReplica { .. })
        ));
        assert!(matches!(
            disks.open("v", "../x"),
            Err(DiskError::UnknownReplica { .. })
        ));
        let list = disks.list();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].volume, "v");
        assert_eq!(list[0].size, 1 << 20);
        let report = disks.report();
        assert_eq!(
            report.disks.iter().map(|d| d.allocated).sum::<u64>(),
            2 << 20
        );
        assert!(matches!(
            disks.delete("v-r-1"),
            Err(DiskError::InUse { .. })
        ));
        drop((a, b));
        disks.delete("v-r-1").unwrap();
        assert_eq!(disks.list().len(), 1);
        disks.delete("v-r-1").unwrap();
    }
}
