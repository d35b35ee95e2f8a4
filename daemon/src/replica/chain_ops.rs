//! Chain changes past snapshot creation: removing a snapshot (mark, then
//! coalesce its data into its child), purging, and reverting the head to a
//! snapshot. Each follows the replica's crash rule: every step before the
//! commit point only adds data a reader would have seen anyway, every step
//! after it only removes files the committed chain no longer reaches (which
//! `open` would also remove). I/O on the replica must be quiesced around a
//! call that changes the chain (see [`Replica`]).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use super::blocking::{pread_full, pwrite_full};
use super::extent::data_blocks;
use super::meta::{self, LayerMeta, LayerName};
use super::{disp, write_layer_meta, write_volume_meta, Replica, ReplicaError, BLOCK_SIZE};
use crate::fsutil;

/// What removing a snapshot did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Its data was merged into its child snapshot and its file deleted.
    Coalesced,
    /// Marked removed; its child is the head, which is written live, so the
    /// data stays until a later snapshot makes the child a snapshot (then
    /// `purge` merges it).
    Marked,
}

/// A layer-chain change, as the owner applies it to every replica (locally,
/// or over the replica protocol: hence the bincode derives).
#[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub enum ChainChange {
    /// `created` empty = now.
    Snapshot {
        name: String,
        created: String,
        user_created: bool,
        labels: BTreeMap<String, String>,
    },
    Remove {
        name: String,
    },
    Purge,
    Revert {
        name: String,
    },
    /// Grow the volume to `size` bytes (online expansion; see
    /// [`Replica::grow`]).
    Grow {
        size: u64,
    },
}

/// What a chain change did: snapshot names dropped or merged away, and
/// whether a removal merged the snapshot into its child.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainOutcome {
    pub names: Vec<String>,
    pub coalesced: bool,
}

/// Copy unit of a coalesce.
const COPY_CHUNK: u64 = 1 << 20;

/// Block ranges of `a` not covered by `b` (both sorted, merged, half-open).
pub(crate) fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(mut s, e) in a {
        while j < b.len() && b[j].1 <= s {
            j += 1;
        }
        let mut k = j;
        while s < e {
            match b.get(k) {
                Some(&(bs, be)) if bs < e => {
                    if bs > s {
                        out.push((s, bs));
                    }
                    s = s.max(be);
                    k += 1;
                }
                _ => {
                    out.push((s, e));
                    break;
                }
            }
        }
    }
    out
}

impl Replica {
    /// Applies `change` (see [`ChainChange`]).
    pub fn change_chain(&self, change: &ChainChange) -> Result<ChainOutcome, ReplicaError> {
        match change {
            ChainChange::Snapshot {
                name,
                created,
                user_created,
                labels,
            } => {
                let spec = super::SnapshotSpec {
                    name: name.clone(),
                    created: (!created.is_empty()).then(|| created.clone()),
                    user_created: *user_created,
                    labels: labels.clone(),
                };
                self.snapshot_with(&spec).map(|()| ChainOutcome::default())
            }
            ChainChange::Remove { name } => self.remove_snapshot(name).map(|r| ChainOutcome {
                names: vec![],
                coalesced: r == Removal::Coalesced,
            }),
            ChainChange::Purge => self.purge().map(|names| ChainOutcome {
                names,
                coalesced: false,
            }),
            ChainChange::Revert { name } => self.revert(name).map(|names| ChainOutcome {
                names,
                coalesced: false,
            }),
            ChainChange::Grow { size } => self.grow(*size).map(|()| ChainOutcome::default()),
        }
    }

    pub(super) fn snapshot_index(&self, name: &str) -> Result<usize, ReplicaError> {
        let file = meta::snapshot_file_name(name);
        let c = self.chain_now();
        let last = c.layers.len() - 1;
        c.layers[..last]
            .iter()
            .position(|l| l.file == file)
            .ok_or_else(|| ReplicaError::SnapshotNotFound {
                dir: disp(&self.dir),
                name: name.to_string(),
            })
    }

    /// Removes snapshot `name`: marks it removed (durably), then merges its
    /// data into its child when the child is a snapshot.
    pub fn remove_snapshot(&self, name: &str) -> Result<Removal, ReplicaError> {
        let _ops = self.lock_ops();
        let idx = self.snapshot_index(name)?;
        self.mark_removed(idx)?;
        self.try_coalesce(idx)
    }

    /// Merges every removed or system snapshot whose child is a snapshot
    /// into that child. Returns the names merged away.
    pub fn purge(&self) -> Result<Vec<String>, ReplicaError> {
        let _ops = self.lock_ops();
        let mut merged = Vec::new();
        loop {
            let candidate = {
                let c = self.chain_now();
                let last = c.layers.len() - 1;
                // Oldest first; the layer just below the head is never merged.
                c.layers[..last.saturating_sub(1)]
                    .iter()
                    .position(|l| l.meta.removed || !l.meta.user_created)
            };
            let Some(idx) = candidate else { break };
            let name = self.chain_now().layers[idx].file.clone();
            self.mark_removed(idx)?;
            if self.try_coalesce(idx)? == Removal::Coalesced {
                if let Some(LayerName::Snapshot(s)) = meta::parse_layer_file_name(&name) {
                    merged.push(s.to_string());
                }
            }
        }
        Ok(merged)
    }

    fn mark_removed(&self, idx: usize) -> Result<(), ReplicaError> {
        let c = self.chain_now();
        let layer = &c.layers[idx];
        if layer.meta.removed {
            return Ok(());
        }
        let mut m = layer.meta.clone();
        m.removed = true;
        write_layer_meta(&self.dir, &m)?;
        drop(c);
        self.reload()
    }

    /// Merges layer `idx` into its child if the child is a snapshot.
    ///
    /// 1. copy the layer's blocks the child lacks into the child (the same
    ///    bytes readers got through the chain), fsync the child;
    /// 2. COMMIT: rewrite the child's meta with the layer's parent;
    /// 3. unlink the layer and its meta; reload.
    fn try_coalesce(&self, idx: usize) -> Result<Removal, ReplicaError> {
        let c = self.chain_now();
        if idx + 1 >= c.layers.len() - 1 {
            return Ok(Removal::Marked);
        }
        let (layer, child) = (&c.layers[idx], &c.layers[idx + 1]);
        let child_path = self.dir.join(&child.file);
        let io_err = |path: &std::path::Path| {
            let path = disp(path);
            move |source| ReplicaError::Io { path, source }
        };
        let parent_blocks = data_blocks(layer.fd.as_raw_fd(), self.size())
            .map_err(io_err(&self.dir.join(&layer.file)))?;
        let child_blocks =
            data_blocks(child.fd.as_raw_fd(), self.size()).map_err(io_err(&child_path))?;
        let missing = subtract(&parent_blocks, &child_blocks);
        // 1. The child is read-only in the chain; write through a new fd.
        let rw = OpenOptions::new()
            .write(true)
            .open(&child_path)
            .map_err(io_err(&child_path))?;
        let mut buf = vec![0u8; COPY_CHUNK as usize];
        for (s, e) in missing {
            let (mut pos, end) = (s * BLOCK_SIZE, e * BLOCK_SIZE);
            while pos < end {
                let n = (end - pos).min(COPY_CHUNK) as usize;
                pread_full(layer.fd.as_raw_fd(), &mut buf[..n], pos)
                    .map_err(io_err(&self.dir.join(&layer.file)))?;
                pwrite_full(rw.as_raw_fd(), &buf[..n], pos, 0).map_err(io_err(&child_path))?;
                pos += n as u64;
            }
        }
        rw.sync_all().map_err(io_err(&child_path))?;
        // 2.
        let mut child_meta: LayerMeta = child.meta.clone();
        child_meta.parent = layer.meta.parent.clone();
        write_layer_meta(&self.dir, &child_meta)?;
        // 3.
        let gone = layer.file.clone();
        drop(c);
        let _ = std::fs::remove_file(self.dir.join(&gone));
        let _ = std::fs::remove_file(self.dir.join(meta::layer_meta_file_name(&gone)));
        let _ = fsutil::fsync_dir(&self.dir);
        self.reload()?;
        Ok(Removal::Coalesced)
    }

    /// Reverts the volume to snapshot `name`: a new empty head on top of it.
    /// The chain is linear, so the snapshots newer than `name` are dropped;
    /// their names are returned. Only for a detached volume.
    ///
    /// 1. create `volume-head-(N+1).img` and its meta (parent = `name`);
    /// 2. COMMIT: rewrite `volume.meta` with the new head;
    /// 3. unlink the old head and the newer snapshots; reload.
    pub fn revert(&self, name: &str) -> Result<Vec<String>, ReplicaError> {
        let _ops = self.lock_ops();
        let idx = self.snapshot_index(name)?;
        let c = self.chain_now();
        let d = disp(&self.dir);
        let old_head = c.head().file.clone();
        let new_head = super::next_head_name(&d, &old_head)?;
        let new_path = self.dir.join(&new_head);
        super::create_sparse(&new_path, self.size()).map_err(|source| ReplicaError::Io {
            path: disp(&new_path),
            source,
        })?;
        write_layer_meta(
            &self.dir,
            &LayerMeta {
                name: new_head.clone(),
                parent: c.layers[idx].file.clone(),
                created: meta::now_created(),
                user_created: false,
                removed: false,
                labels: BTreeMap::new(),
            },
        )?;
        let mut vm = self.lock_meta().clone();
        vm.head = new_head;
        write_volume_meta(&self.dir, &vm)?;
        let mut dropped = Vec::new();
        for l in &c.layers[idx + 1..] {
            if let Some(LayerName::Snapshot(s)) = meta::parse_layer_file_name(&l.file) {
                dropped.push(s.to_string());
            }
            let _ = std::fs::remove_file(self.dir.join(&l.file));
            let _ = std::fs::remove_file(self.dir.join(meta::layer_meta_file_name(&l.file)));
        }
        let _ = fsutil::fsync_dir(&self.dir);
        drop(c);
        self.reload()?;
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::subtract;

    #[test]
    fn subtract_ranges() {
        assert_eq!(subtract(&[(0, 10)], &[]), vec![(0, 10)]);
        assert_eq!(
            subtract(&[(0, 10)], &[(2, 4), (6, 7)]),
            vec![(0, 2), (4, 6), (7, 10)]
        );
        assert_eq!(
            subtract(&[(0, 4), (8, 12)], &[(2, 9)]),
            vec![(0, 2), (9, 12)]
        );
        assert_eq!(subtract(&[(5, 6)], &[(0, 100)]), vec![]);
        assert_eq!(subtract(&[(0, 3), (5, 9)], &[(3, 5)]), vec![(0, 3), (5, 9)]);
    }
}
