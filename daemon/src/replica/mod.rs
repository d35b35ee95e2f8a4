//! The replica format: a directory holding a chain of sparse image layers.
//!
//! Owns everything on a replica's disk directory and the read-path maps over
//! it:
//! - `volume.meta` names the writable head layer (`volume-head-NNN.img`) and
//!   holds the volume size and the replica-set revision;
//! - each layer file has a `<file>.meta` naming its parent; following parents
//!   from the head reaches the base layer (empty parent);
//! - snapshot layers (`volume-snap-<name>.img`) are read-only.
//!
//! Reads resolve each block to the newest layer holding it ([`extent`]);
//! writes go to the head only, and the I/O threads record them with
//! [`Replica::mark_written`]. Metadata changes use [`crate::fsutil::atomic_write`]
//! and `volume.meta` is always written last: it is the commit point.

mod blocking;
mod chain_ops;
pub mod extent;
pub mod fence;
pub mod meta;
mod view;

pub use chain_ops::{ChainChange, ChainOutcome, Removal};
pub use fence::{Claim, FenceError, OwnerTerm, Session};
pub(crate) use view::merge_bytes;
pub use view::SnapshotView;

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::{ArcSwap, Guard};

use crate::fsutil;
use crate::name::NameError;
use extent::{HeadBitmap, Lookup, LowerMap};
use meta::{LayerMeta, LayerName, MetaError, VolumeMeta};

/// Granularity of extent tracking and of every I/O the engine issues.
pub const BLOCK_SIZE: u64 = 4096;

/// Why a replica operation failed. Messages name the replica directory and
/// the file involved.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("replica {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("replica {dir}: no volume.meta: not a replica directory (create it first)")]
    NotAReplica { dir: String },
    #[error("replica {dir}: already holds a volume.meta: open it, or delete the directory to start over")]
    AlreadyExists { dir: String },
    #[error("replica size {size} must be a nonzero multiple of {BLOCK_SIZE} bytes")]
    InvalidSize { size: u64 },
    #[error("replica {dir} holds {size} bytes: it can grow, not shrink to {wanted}")]
    Shrink { dir: String, size: u64, wanted: u64 },
    #[error("{0}")]
    InvalidName(#[from] NameError),
    #[error("replica {dir}: {file} is not valid metadata: {reason}")]
    BadJson {
        dir: String,
        file: String,
        reason: String,
    },
    #[error(
        "replica {dir}: {file} has format version {found}; this build reads version {}: upgrade cairn",
        meta::FORMAT_VERSION
    )]
    UnsupportedFormat {
        dir: String,
        file: String,
        found: u64,
    },
    #[error("replica {dir}: {file}: {reason}")]
    InvalidMeta {
        dir: String,
        file: String,
        reason: String,
    },
    #[error("replica {dir}: {referrer} names {kind} {file} which does not exist")]
    MissingLayer {
        dir: String,
        referrer: String,
        kind: &'static str,
        file: String,
    },
    #[error("replica {dir}: layer {file} has no metadata file {file}.meta")]
    MissingLayerMeta { dir: String, file: String },
    #[error("replica {dir}: {meta_file} describes layer {found}, expected {file}")]
    MisplacedLayerMeta {
        dir: String,
        meta_file: String,
        file: String,
        found: String,
    },
    #[error("replica {dir}: layer chain has a cycle: {file} is its own ancestor")]
    ChainCycle { dir: String, file: String },
    #[error("replica {dir}: layer {file} is {len} bytes, expected the volume size {expected}")]
    LayerSizeMismatch {
        dir: String,
        file: String,
        len: u64,
        expected: u64,
    },
    #[error("replica {dir}: head file {file} was deleted")]
    HeadDeleted { dir: String, file: String },
    #[error("replica {dir}: head file {file} was replaced by another file (inode changed)")]
    HeadReplaced { dir: String, file: String },
    #[error("replica {dir}: head file {file} was truncated to {len} bytes, expected {expected}")]
    HeadTruncated {
        dir: String,
        file: String,
        len: u64,
        expected: u64,
    },
    #[error("replica {dir}: volume.meta now names head {found}, but {file} is open")]
    HeadSwitched {
        dir: String,
        file: String,
        found: String,
    },
    #[error("replica {dir}: snapshot {name} already exists: choose another name")]
    SnapshotExists { dir: String, name: String },
    #[error("replica {dir}: no snapshot {name} (list them with `cairnctl snapshot list`)")]
    SnapshotNotFound { dir: String, name: String },
    #[error(transparent)]
    Fence(#[from] FenceError),
    #[error("replica {dir}: the filesystem tracks allocation in units coarser than 4 KiB (a 4 KiB block written at {at} shows data from {data} to {hole}); Cairn's extent maps need 4 KiB: put disks on ext4 without bigalloc, xfs or tmpfs")]
    CoarseExtents {
        dir: String,
        data: u64,
        hole: u64,
        at: u64,
    },
}

/// What a new replica is made of.
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    pub volume: String,
    pub replica: String,
    pub size: u64,
}

/// One piece of a read: from a layer file, or zeros where no layer has data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadSegment {
    pub fd: Option<RawFd>,
    pub file_offset: u64,
    pub buf_offset: u64,
    pub len: u64,
}

/// One layer of the chain as shown to the control plane, and as it crosses
/// the replica wire protocol (hence the bincode derives).
#[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct LayerInfo {
    /// File name in the replica directory.
    pub file: String,
    /// `name` from the layer's meta: by convention equal to `file`.
    pub name: String,
    /// Snapshot name (`<name>` of `volume-snap-<name>.img`); `None` for the head.
    pub snapshot: Option<String>,
    pub parent: String,
    pub created: String,
    pub user_created: bool,
    pub removed: bool,
    pub labels: BTreeMap<String, String>,
    /// Bytes this layer holds data for (allocated blocks × [`BLOCK_SIZE`]).
    pub allocated: u64,
    pub is_head: bool,
}

/// An open layer file.
#[derive(Debug)]
struct Layer {
    file: String,
    meta: LayerMeta,
    /// Read-write for the head, read-only for snapshots. Owned for the
    /// replica's lifetime so the raw fds handed out stay valid.
    fd: File,
    /// Allocated bytes at open (snapshots never change after open).
    allocated: u64,
}

/// The open layer chain and its read maps: replaced whole when a snapshot
/// operation changes the chain, so every holder of the replica sees the new
/// chain at once.
#[derive(Debug)]
struct Chain {
    /// Oldest first; the head is last (there is always at least the head).
    layers: Vec<Layer>,
    /// Raw fd of every layer, same order, for allocation-free lookups.
    fds: Vec<RawFd>,
    lower: LowerMap,
    head_bits: HeadBitmap,
}

impl Chain {
    fn head(&self) -> &Layer {
        // `load_chain` never builds a chain without a head.
        &self.layers[self.layers.len() - 1]
    }
}

/// An open replica. `Send + Sync`: the I/O threads share it through an `Arc`.
///
/// Chain changes (snapshot, coalesce, revert) swap `Chain` atomically. The
/// raw fds the I/O path takes from the old chain stay valid only while that
/// chain is alive, so the caller must quiesce I/O on the replica around a
/// chain change (the engine does, see `VolumeIo::quiesce`).
#[derive(Debug)]
pub struct Replica {
    dir: PathBuf,
    volume: String,
    replica: String,
    /// Volume size in bytes; grows under the chain-ops lock ([`Self::grow`]).
    size: AtomicU64,
    /// Current `volume.meta`; the lock serializes rewrites (`set_revision`).
    meta: Mutex<VolumeMeta>,
    chain: ArcSwap<Chain>,
    /// Serializes chain changes.
    chain_ops: Mutex<()>,
    /// Live owner sessions (see [`fence`]); claims serialize on its lock.
    sessions: fence::Sessions,
}

/// What a new snapshot layer records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotSpec {
    pub name: String,
    /// Creation time to record; `None` = now. A rebuild copying a chain
    /// passes the source's.
    pub created: Option<String>,
    pub user_created: bool,
    pub labels: BTreeMap<String, String>,
}

/// Files written alongside the layers that open() must not treat as orphans.
fn is_layer_related(name: &str) -> bool {
    let file = name.strip_suffix(meta::LAYER_META_SUFFIX).unwrap_or(name);
    meta::parse_layer_file_name(file).is_some()
}

fn disp(p: &Path) -> String {
    p.display().to_string()
}

impl Replica {
    /// Creates a new replica in `dir` (made if missing) and opens it.
    ///
    /// Order: head image, head meta, then `volume.meta` last. A crash before
    /// `volume.meta` is written leaves a directory `open` rejects as "not a
    /// replica" and `create` can be retried on.
    pub fn create(dir: &Path, spec: &ReplicaSpec) -> Result<Self, ReplicaError> {
        if spec.size == 0 || spec.size % BLOCK_SIZE != 0 {
            return Err(ReplicaError::InvalidSize { size: spec.size });
        }
        crate::name::validate_volume_name(&spec.volume)?;
        crate::name::validate_label("replica", &spec.replica, 63)?;
        let io_err = |path: &Path| {
            let path = disp(path);
            move |source| ReplicaError::Io { path, source }
        };
        let vm_path = dir.join(meta::VOLUME_META);
        match std::fs::symlink_metadata(&vm_path) {
            Ok(_) => return Err(ReplicaError::AlreadyExists { dir: disp(dir) }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&vm_path)(e)),
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        // The new directory entry itself must be durable too.
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsutil::fsync_dir(parent).map_err(io_err(parent))?;
        }

        check_extent_granularity(dir)?;
        let head = meta::head_file_name(0);
        let head_path = dir.join(&head);
        create_sparse(&head_path, spec.size).map_err(io_err(&head_path))?;
        let lm = LayerMeta {
            name: head.clone(),
            parent: String::new(),
            created: meta::now_created(),
            user_created: false,
            removed: false,
            labels: BTreeMap::new(),
        };
        write_layer_meta(dir, &lm)?;
        let vm = VolumeMeta {
            format: meta::FORMAT_VERSION,
            volume: spec.volume.clone(),
            replica: spec.replica.clone(),
            size: spec.size,
            sector_size: BLOCK_SIZE,
            head,
            revision: 0,
            owner_generation: 0,
            owner_term: 0,
            owner_node: String::new(),
        };
        write_volume_meta(dir, &vm)?; // Commit point.
        Self::open(dir)
    }

    /// Opens the replica in `dir`: validates the chain, opens every layer and
    /// builds the extent maps. Removes crash leftovers: `*.tmp` files and
    /// layer files no longer reachable from the head (an interrupted
    /// snapshot).
    pub fn open(dir: &Path) -> Result<Self, ReplicaError> {
        let d = disp(dir);
        let vm_path = dir.join(meta::VOLUME_META);
        let vm = match std::fs::read(&vm_path) {
            Ok(b) => parse_meta(&d, meta::VOLUME_META, &b, meta::parse_volume_meta)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ReplicaError::NotAReplica { dir: d })
            }
            Err(e) => {
                return Err(ReplicaError::Io {
                    path: disp(&vm_path),
                    source: e,
                })
            }
        };

        let chain = load_chain(dir, &vm)?;
        Ok(Replica {
            dir: dir.to_path_buf(),
            volume: vm.volume.clone(),
            replica: vm.replica.clone(),
            size: AtomicU64::new(vm.size),
            meta: Mutex::new(vm),
            chain: ArcSwap::from_pointee(chain),
            chain_ops: Mutex::new(()),
            sessions: fence::Sessions::default(),
        })
    }

    /// Re-reads `volume.meta` and the chain after a committed chain change
    /// and swaps them in.
    fn reload(&self) -> Result<(), ReplicaError> {
        let d = disp(&self.dir);
        let vm_path = self.dir.join(meta::VOLUME_META);
        let bytes = std::fs::read(&vm_path).map_err(|source| ReplicaError::Io {
            path: disp(&vm_path),
            source,
        })?;
        let vm = parse_meta(&d, meta::VOLUME_META, &bytes, meta::parse_volume_meta)?;
        let chain = load_chain(&self.dir, &vm)?;
        *self.lock_meta() = vm;
        self.chain.store(Arc::new(chain));
        Ok(())
    }

    #[inline]
    fn chain_now(&self) -> Guard<Arc<Chain>> {
        self.chain.load()
    }

    fn lock_ops(&self) -> MutexGuard<'_, ()> {
        self.chain_ops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Grows this open replica to `new_size` bytes: every layer file is
    /// extended (the new range reads as zeros) and synced, `volume.meta`
    /// commits the size, then the chain is reloaded at it. The caller
    /// quiesces I/O around it, as for any chain change (the engine does,
    /// through `ChainChange::Grow`). A crash before the commit leaves layers
    /// longer than the size, which [`Replica::open`] accepts. The current
    /// size is a no-op (a retry after a lost answer); shrinking is refused.
    pub fn grow(&self, new_size: u64) -> Result<(), ReplicaError> {
        let _ops = self.lock_ops();
        let size = self.size();
        if new_size == size {
            return Ok(());
        }
        if new_size == 0 || new_size % BLOCK_SIZE != 0 {
            return Err(ReplicaError::InvalidSize { size: new_size });
        }
        if new_size < size {
            return Err(ReplicaError::Shrink {
                dir: disp(&self.dir),
                size,
                wanted: new_size,
            });
        }
        fail::fail_point!("replica::grow::before_layers", |_| Err(ReplicaError::Io {
            path: disp(&self.dir),
            source: io::Error::other("failpoint replica::grow::before_layers"),
        }));
        for l in &self.chain_now().layers {
            extend_layer(&self.dir.join(&l.file), new_size)?;
        }
        {
            let mut m = self.lock_meta();
            let mut next = m.clone();
            next.size = new_size;
            write_volume_meta(&self.dir, &next)?;
            *m = next;
        }
        self.size.store(new_size, Ordering::Release);
        self.reload()
    }

    /// Replica-set revision stored in `volume.meta`.
    pub fn revision(&self) -> u64 {
        self.lock_meta().revision
    }

    /// Grows the replica in `dir`, open nowhere, to `new_size` bytes. Every
    /// layer file is extended (sparse: the new range reads as zeros) and
    /// synced, then `volume.meta` commits the new size. A crash before the
    /// commit leaves layers longer than the size, which [`Replica::open`]
    /// accepts (the tail is past the volume's end); the next expansion
    /// completes it. The current size is a no-op; shrinking is refused.
    pub fn expand(dir: &Path, new_size: u64) -> Result<(), ReplicaError> {
        Replica::open(dir)?.grow(new_size)
    }

    /// Persists a new revision (atomic rewrite of `volume.meta`).
    pub fn set_revision(&self, rev: u64) -> Result<(), ReplicaError> {
        let mut m = self.lock_meta();
        let mut next = m.clone();
        next.revision = rev;
        write_volume_meta(&self.dir, &next)?;
        *m = next;
        Ok(())
    }

    /// The owner generation stored in `volume.meta`.
    pub fn owner_generation(&self) -> u64 {
        self.lock_meta().owner_generation
    }

    /// The ownership of the last takeover claim stored in `volume.meta`.
    pub fn owner_term(&self) -> OwnerTerm {
        let m = self.lock_meta();
        OwnerTerm::new(m.owner_term, &m.owner_node)
    }

    /// Starts or joins an owner session (see [`fence`]). A new session
    /// (`Takeover`, `Renew`) fences every older one, waits for what they
    /// admitted to finish, and persists the new generation before it is
    /// returned; `Join` only attaches to the current generation.
    pub fn claim(&self, claim: Claim) -> Result<Arc<Session>, ReplicaError> {
        let mut live = self.sessions.lock();
        let stored = self.owner_generation();
        let owned_by = self.owner_term();
        let fenced = |asked| FenceError::Fenced {
            replica: self.replica.clone(),
            asked,
            current: stored,
        };
        let generation = match claim {
            Claim::Join { generation } if generation == stored => {
                return Ok(fence::Sessions::add(&mut live, generation));
            }
            Claim::Join { generation } => return Err(fenced(generation).into()),
            Claim::Observe => return Ok(fence::Session::observer(stored)),
            Claim::Renew { expect } if expect != stored => return Err(fenced(expect).into()),
            Claim::Takeover { ref owner } if !owner.may_take_over(&owned_by) => {
                return Err(FenceError::TakenOver {
                    replica: self.replica.clone(),
                    asked: owner.clone(),
                    stored: owned_by,
                }
                .into());
            }
            Claim::Renew { .. } | Claim::Takeover { .. } => stored + 1,
        };
        fail::fail_point!("replica::claim::before_fence");
        fence::Sessions::fence_older(&mut live, generation, &self.replica)?;
        {
            let mut m = self.lock_meta();
            let mut next = m.clone();
            next.owner_generation = generation;
            if let Claim::Takeover { owner } = &claim {
                next.owner_term = owner.term;
                next.owner_node = owner.node.clone();
            }
            write_volume_meta(&self.dir, &next)?;
            *m = next;
        }
        tracing::info!(replica = %self.replica, generation, ?claim, "owner session started");
        Ok(fence::Sessions::add(&mut live, generation))
    }

    fn lock_meta(&self) -> MutexGuard<'_, VolumeMeta> {
        // A panic while holding the lock cannot leave the struct half
        // updated (it is replaced whole), so a poisoned lock is still good.
        self.meta.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The head file, open read-write.
    #[inline]
    pub fn head_fd(&self) -> RawFd {
        self.chain_now().head().fd.as_raw_fd()
    }

    /// True when the head has a parent snapshot, i.e. reads need the maps.
    #[inline]
    pub fn has_lower_layers(&self) -> bool {
        self.chain_now().layers.len() > 1
    }

    /// Records that `[offset, offset+len)` of the head now holds data
    /// (rounded outward to blocks). Lock-free and allocation-free; call after
    /// the write to the head completed and before acknowledging it.
    #[inline]
    pub fn mark_written(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = offset.saturating_add(len);
        self.chain_now()
            .head_bits
            .set_range(offset / BLOCK_SIZE, end.div_ceil(BLOCK_SIZE));
    }

    /// Splits a read of `[offset, offset+len)` into runs served by one
    /// source each, in order, calling `f` for each; adjacent blocks from the
    /// same source are one segment. `fd: None` means "fill with zeros".
    /// No allocation.
    pub fn resolve_read(&self, offset: u64, len: u64, mut f: impl FnMut(ReadSegment)) {
        if len == 0 {
            return;
        }
        let c = self.chain_now();
        resolve_in(
            &c.head_bits,
            &c.lower,
            &c.fds,
            c.head().fd.as_raw_fd(),
            offset,
            len,
            &mut f,
        );
    }
    /// Health check: the head file is still the open inode at full size and
    /// `volume.meta` still parses and names it.
    pub fn check_files(&self) -> Result<(), ReplicaError> {
        let d = disp(&self.dir);
        let c = self.chain_now();
        let head = c.head();
        let path = self.dir.join(&head.file);
        let on_disk = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ReplicaError::HeadDeleted {
                    dir: d,
                    file: head.file.clone(),
                })
            }
            Err(source) => {
                return Err(ReplicaError::Io {
                    path: disp(&path),
                    source,
                })
            }
        };
        let open = head.fd.metadata().map_err(|source| ReplicaError::Io {
            path: disp(&path),
            source,
        })?;
        if on_disk.dev() != open.dev() || on_disk.ino() != open.ino() {
            return Err(ReplicaError::HeadReplaced {
                dir: d,
                file: head.file.clone(),
            });
        }
        // Longer is an expansion interrupted before its commit.
        if open.len() < self.size() {
            return Err(ReplicaError::HeadTruncated {
                dir: d,
                file: head.file.clone(),
                len: open.len(),
                expected: self.size(),
            });
        }
        let vm_path = self.dir.join(meta::VOLUME_META);
        let bytes = std::fs::read(&vm_path).map_err(|source| ReplicaError::Io {
            path: disp(&vm_path),
            source,
        })?;
        let vm = parse_meta(&d, meta::VOLUME_META, &bytes, meta::parse_volume_meta)?;
        if vm.head != head.file {
            return Err(ReplicaError::HeadSwitched {
                dir: d,
                file: head.file.clone(),
                found: vm.head,
            });
        }
        Ok(())
    }

    /// Takes snapshot `name` of the head: the head becomes read-only layer
    /// `volume-snap-<name>.img` and a new empty head is stacked on it.
    /// I/O on the replica must be quiesced (see [`Replica`]).
    ///
    /// Crash safety. `volume.meta`'s `head` field is the commit point; every
    /// step before it only adds files `open` does not reach from the old
    /// head (and removes as leftovers), every step after it only removes
    /// files the new chain does not reach:
    /// 1. fsync the head's data;
    /// 2. write `volume-snap-<name>.img.meta` (parent = old head's parent);
    /// 3. hard-link the head to `volume-snap-<name>.img` (same inode: no copy,
    ///    and the old head name stays valid for the old `volume.meta`);
    /// 4. create the empty head `volume-head-(NNN+1).img` and its meta
    ///    (parent = the snapshot);
    /// 5. COMMIT: rewrite `volume.meta` with the new head;
    /// 6. unlink the old head name and its meta;
    /// 7. reopen: new fds (snapshot read-only) and maps.
    ///
    /// A failure before step 5 undoes steps 2-4 (best effort; `open` cleans
    /// whatever remains) and leaves `self` unchanged. A failure of step 7
    /// means the snapshot is committed on disk but `self` still holds the
    /// old chain: drop it and [`Replica::open`] the directory again.
    pub fn snapshot(
        &self,
        name: &str,
        user_created: bool,
        labels: BTreeMap<String, String>,
    ) -> Result<(), ReplicaError> {
        self.snapshot_with(&SnapshotSpec {
            name: name.to_string(),
            created: None,
            user_created,
            labels,
        })
    }

    /// [`Replica::snapshot`] with every field of the new layer given.
    pub fn snapshot_with(&self, spec: &SnapshotSpec) -> Result<(), ReplicaError> {
        let _ops = self.lock_ops();
        let name = spec.name.as_str();
        crate::name::validate_label("snapshot", name, 63)?;
        let c = self.chain_now();
        let d = disp(&self.dir);
        let snap = meta::snapshot_file_name(name);
        let snap_path = self.dir.join(&snap);
        if c.layers.iter().any(|l| l.file == snap) || snap_path.exists() {
            return Err(ReplicaError::SnapshotExists {
                dir: d,
                name: name.to_string(),
            });
        }
        let old_head = c.head().file.clone();
        let old_path = self.dir.join(&old_head);
        let new_head = next_head_name(&d, &old_head)?;
        let new_path = self.dir.join(&new_head);
        let io_err = |path: &Path| {
            let path = disp(path);
            move |source| ReplicaError::Io { path, source }
        };

        // 1.
        c.head().fd.sync_all().map_err(io_err(&old_path))?;
        let snap_meta = LayerMeta {
            name: snap.clone(),
            parent: c.head().meta.parent.clone(),
            created: spec.created.clone().unwrap_or_else(meta::now_created),
            user_created: spec.user_created,
            removed: false,
            labels: spec.labels.clone(),
        };
        let head_meta = LayerMeta {
            name: new_head.clone(),
            parent: snap.clone(),
            created: meta::now_created(),
            user_created: false,
            removed: false,
            labels: BTreeMap::new(),
        };
        let mut next_vm = self.lock_meta().clone();
        next_vm.head = new_head.clone();

        let prepare = || -> Result<(), ReplicaError> {
            write_layer_meta(&self.dir, &snap_meta)?; // 2.
            std::fs::hard_link(&old_path, &snap_path).map_err(io_err(&snap_path))?; // 3.
                                                                                    // 4. A leftover new-head file can only be an orphan (the chain has
                                                                                    // one head); start from an empty file regardless.
            create_sparse(&new_path, self.size()).map_err(io_err(&new_path))?;
            write_layer_meta(&self.dir, &head_meta)?;
            Ok(())
        };
        let committed = prepare().and_then(|()| write_volume_meta(&self.dir, &next_vm)); // 5.
        if let Err(e) = committed {
            for f in [&snap, &new_head] {
                let _ = std::fs::remove_file(self.dir.join(f));
                let _ = std::fs::remove_file(self.dir.join(meta::layer_meta_file_name(f)));
            }
            let _ = fsutil::fsync_dir(&self.dir);
            return Err(e);
        }
        *self.lock_meta() = next_vm;

        // 6. Past the commit point: failures here leave orphans `open` removes.
        let _ = std::fs::remove_file(&old_path);
        let _ = std::fs::remove_file(self.dir.join(meta::layer_meta_file_name(&old_head)));
        let _ = fsutil::fsync_dir(&self.dir);

        // 7.
        drop(c);
        self.reload()
    }

    /// The chain, oldest first, head last.
    pub fn chain(&self) -> Vec<LayerInfo> {
        let c = self.chain_now();
        let last = c.layers.len().saturating_sub(1);
        c.layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let is_head = i == last;
                LayerInfo {
                    file: l.file.clone(),
                    name: l.meta.name.clone(),
                    snapshot: match meta::parse_layer_file_name(&l.file) {
                        Some(LayerName::Snapshot(s)) => Some(s.to_string()),
                        _ => None,
                    },
                    parent: l.meta.parent.clone(),
                    created: l.meta.created.clone(),
                    user_created: l.meta.user_created,
                    removed: l.meta.removed,
                    labels: l.meta.labels.clone(),
                    // The head grows as writes land: count the live bitmap.
                    allocated: if is_head {
                        c.head_bits.count() * BLOCK_SIZE
                    } else {
                        l.allocated
                    },
                    is_head,
                }
            })
            .collect()
    }

    /// The replica directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn volume_name(&self) -> &str {
        &self.volume
    }

    pub fn replica_name(&self) -> &str {
        &self.replica
    }

    /// Head blocks recorded as written, as sorted block ranges (tests and
    /// diagnostics).
    pub fn head_block_ranges(&self) -> Vec<(u64, u64)> {
        self.chain_now().head_bits.ranges()
    }

    /// The merged snapshot-layer map (tests and diagnostics).
    pub fn lower_extents(&self) -> Vec<extent::Extent> {
        self.chain_now().lower.extents().to_vec()
    }
}

/// Extends one layer file to `size` bytes (sparse) and syncs it.
fn extend_layer(path: &Path, size: u64) -> Result<(), ReplicaError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(size).and_then(|()| f.sync_all()))
        .map_err(|source| ReplicaError::Io {
            path: disp(path),
            source,
        })
}

/// Opens the chain `vm` names (head -> base), validates it and builds the
/// maps. Removes crash leftovers: `*.tmp` files and layer files no longer
/// reachable from the head (an interrupted snapshot operation).
fn load_chain(dir: &Path, vm: &VolumeMeta) -> Result<Chain, ReplicaError> {
    let d = disp(dir);
    // Walk head -> base. Cycle check: every file may appear once.
    let mut layers: Vec<Layer> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut file = vm.head.clone();
    let mut referrer = meta::VOLUME_META.to_string();
    loop {
        if !seen.insert(file.clone()) {
            return Err(ReplicaError::ChainCycle { dir: d, file });
        }
        let is_head = layers.is_empty();
        let layer = open_layer(dir, &file, &referrer, is_head, vm.size)?;
        let parent = layer.meta.parent.clone();
        referrer = meta::layer_meta_file_name(&file);
        layers.push(layer);
        if parent.is_empty() {
            break;
        }
        file = parent;
    }
    layers.reverse();
    remove_leftovers(dir, &seen)?;

    let nblocks = vm.size / BLOCK_SIZE;
    let mut per_layer = Vec::with_capacity(layers.len());
    for l in &mut layers {
        let ranges =
            extent::data_blocks(l.fd.as_raw_fd(), vm.size).map_err(|source| ReplicaError::Io {
                path: disp(&dir.join(&l.file)),
                source,
            })?;
        l.allocated = ranges.iter().map(|(s, e)| e - s).sum::<u64>() * BLOCK_SIZE;
        per_layer.push(ranges);
    }
    let head_ranges = per_layer.pop().unwrap_or_default();
    let fds = layers.iter().map(|l| l.fd.as_raw_fd()).collect();
    Ok(Chain {
        layers,
        fds,
        lower: LowerMap::build(&per_layer),
        head_bits: HeadBitmap::from_ranges(nblocks, &head_ranges),
    })
}

/// The file name of the head after `old_head` (generation + 1).
fn next_head_name(dir: &str, old_head: &str) -> Result<String, ReplicaError> {
    match meta::parse_layer_file_name(old_head) {
        Some(LayerName::Head(n)) => Ok(meta::head_file_name(n.saturating_add(1))),
        _ => Err(ReplicaError::InvalidMeta {
            dir: dir.to_string(),
            file: meta::VOLUME_META.into(),
            reason: format!("head {old_head:?} is not a head file name"),
        }),
    }
}

/// `Replica::resolve_read` over one chain (see there).
#[inline]
fn resolve_in(
    head_bits: &HeadBitmap,
    lower: &LowerMap,
    fds: &[RawFd],
    head_fd: RawFd,
    offset: u64,
    len: u64,
    f: &mut impl FnMut(ReadSegment),
) {
    if fds.len() <= 1 {
        // The head alone: its own holes already read as zeros.
        f(ReadSegment {
            fd: Some(head_fd),
            file_offset: offset,
            buf_offset: 0,
            len,
        });
        return;
    }
    let end = offset.saturating_add(len);
    let nblocks = head_bits.blocks();
    let end_block = end.div_ceil(BLOCK_SIZE).min(nblocks);
    let mut pending: Option<ReadSegment> = None;
    let mut pos = offset;
    while pos < end {
        let b = pos / BLOCK_SIZE;
        let (fd, run_end) = if b >= nblocks {
            (None, u64::MAX) // Past the volume end: zeros.
        } else if head_bits.get(b) {
            (Some(head_fd), head_bits.next_with(b + 1, end_block, false))
        } else {
            let head_next = head_bits.next_with(b + 1, end_block, true);
            match lower.lookup(b) {
                Lookup::In(x) => {
                    let fd = fds.get(x.layer as usize).copied();
                    (fd, x.end.min(head_next))
                }
                Lookup::Gap { next } => (None, next.min(head_next)),
            }
        };
        // Every branch ends its run at least one block past `b`, so the
        // loop always advances.
        let seg_end = run_end.saturating_mul(BLOCK_SIZE).min(end);
        match &mut pending {
            Some(p) if p.fd == fd && p.file_offset + p.len == pos => p.len += seg_end - pos,
            _ => {
                if let Some(p) = pending.take() {
                    f(p);
                }
                pending = Some(ReadSegment {
                    fd,
                    file_offset: pos,
                    buf_offset: pos - offset,
                    len: seg_end - pos,
                });
            }
        }
        pos = seg_end;
    }
    if let Some(p) = pending {
        f(p);
    }
}

/// Creates (or truncates) a sparse file of `size` bytes and makes it durable.
/// Extent maps are built with `SEEK_DATA`/`SEEK_HOLE` and trusted at 4 KiB.
/// A filesystem that allocates in larger units (ext4 bigalloc, some CoW
/// filesystems) would report unwritten neighbours of a written block as
/// data, and a rebuild or backup would copy them as if written: refuse it.
/// Probes with one 4 KiB write in the middle of a sparse file.
fn check_extent_granularity(dir: &Path) -> Result<(), ReplicaError> {
    use std::os::unix::fs::FileExt;
    let probe = dir.join("extent-probe.tmp");
    let io_err = |source| ReplicaError::Io {
        path: disp(&probe),
        source,
    };
    let at = 256 * 1024u64;
    let found = (|| -> io::Result<(i64, i64)> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&probe)?;
        f.set_len(2 * at)?;
        f.write_all_at(&[0xa5u8; BLOCK_SIZE as usize], at)?;
        f.sync_all()?;
        // SAFETY: lseek on an fd owned by `f`, alive for the call.
        let data = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), at as i64, libc::SEEK_HOLE) };
        if data < 0 || hole < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((data, hole))
    })();
    let _ = std::fs::remove_file(&probe);
    let (data, hole) = found.map_err(io_err)?;
    if data as u64 != at || hole as u64 != at + BLOCK_SIZE {
        return Err(ReplicaError::CoarseExtents {
            dir: disp(dir),
            data: data as u64,
            hole: hole as u64,
            at,
        });
    }
    Ok(())
}

fn create_sparse(path: &Path, size: u64) -> io::Result<()> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.set_len(size)?;
    f.sync_all()
}

fn parse_meta<T>(
    dir: &str,
    file: &str,
    bytes: &[u8],
    parse: fn(&[u8]) -> Result<T, MetaError>,
) -> Result<T, ReplicaError> {
    parse(bytes).map_err(|e| match e {
        MetaError::Json(reason) => ReplicaError::BadJson {
            dir: dir.into(),
            file: file.into(),
            reason,
        },
        MetaError::UnsupportedFormat { found } => ReplicaError::UnsupportedFormat {
            dir: dir.into(),
            file: file.into(),
            found,
        },
        MetaError::Invalid(reason) => ReplicaError::InvalidMeta {
            dir: dir.into(),
            file: file.into(),
            reason,
        },
    })
}

/// Opens and validates one layer named by `referrer`.
fn open_layer(
    dir: &Path,
    file: &str,
    referrer: &str,
    is_head: bool,
    size: u64,
) -> Result<Layer, ReplicaError> {
    let d = disp(dir);
    let path = dir.join(file);
    let fd = match OpenOptions::new().read(true).write(is_head).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ReplicaError::MissingLayer {
                dir: d,
                referrer: referrer.into(),
                kind: if is_head { "head" } else { "parent" },
                file: file.into(),
            })
        }
        Err(source) => {
            return Err(ReplicaError::Io {
                path: disp(&path),
                source,
            })
        }
    };
    let meta_file = meta::layer_meta_file_name(file);
    let meta_path = dir.join(&meta_file);
    let lm = match std::fs::read(&meta_path) {
        Ok(b) => parse_meta(&d, &meta_file, &b, meta::parse_layer_meta)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ReplicaError::MissingLayerMeta {
                dir: d,
                file: file.into(),
            })
        }
        Err(source) => {
            return Err(ReplicaError::Io {
                path: disp(&meta_path),
                source,
            })
        }
    };
    if lm.name != file {
        return Err(ReplicaError::MisplacedLayerMeta {
            dir: d,
            meta_file,
            file: file.into(),
            found: lm.name,
        });
    }
    let len = fd
        .metadata()
        .map_err(|source| ReplicaError::Io {
            path: disp(&path),
            source,
        })?
        .len();
    // Longer is an expansion interrupted before its commit: the tail is
    // past the volume's end and never read.
    if len < size {
        return Err(ReplicaError::LayerSizeMismatch {
            dir: d,
            file: file.into(),
            len,
            expected: size,
        });
    }
    Ok(Layer {
        file: file.into(),
        meta: lm,
        fd,
        allocated: 0,
    })
}

/// Deletes crash leftovers: `*.tmp` (half-done `atomic_write`s) and layer
/// files or metas not in the chain (`keep`), i.e. an uncommitted or
/// half-cleaned snapshot. Runs only after the chain validated.
fn remove_leftovers(dir: &Path, keep: &HashSet<String>) -> Result<(), ReplicaError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ReplicaError::Io {
        path: disp(dir),
        source,
    })?;
    let mut removed = false;
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let stale = if name.ends_with(fsutil::TMP_SUFFIX) {
            true
        } else if is_layer_related(&name) {
            let file = name.strip_suffix(meta::LAYER_META_SUFFIX).unwrap_or(&name);
            !keep.contains(file)
        } else {
            false
        };
        if stale && entry.file_type().is_ok_and(|t| t.is_file()) {
            let p = entry.path();
            std::fs::remove_file(&p).map_err(|source| ReplicaError::Io {
                path: disp(&p),
                source,
            })?;
            removed = true;
        }
    }
    if removed {
        fsutil::fsync_dir(dir).map_err(|source| ReplicaError::Io {
            path: disp(dir),
            source,
        })?;
    }
    Ok(())
}

fn write_layer_meta(dir: &Path, m: &LayerMeta) -> Result<(), ReplicaError> {
    let path = dir.join(meta::layer_meta_file_name(&m.name));
    meta::serialize_layer_meta(m)
        .and_then(|b| fsutil::atomic_write(&path, &b))
        .map_err(|source| ReplicaError::Io {
            path: disp(&path),
            source,
        })
}

fn write_volume_meta(dir: &Path, m: &VolumeMeta) -> Result<(), ReplicaError> {
    let path = dir.join(meta::VOLUME_META);
    meta::serialize_volume_meta(m)
        .and_then(|b| fsutil::atomic_write(&path, &b))
        .map_err(|source| ReplicaError::Io {
            path: disp(&path),
            source,
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
mod tests;
