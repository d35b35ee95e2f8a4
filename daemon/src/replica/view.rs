//! Read-only views of one snapshot: what a backup reads. A view holds its
//! own descriptors of the layers up to the snapshot, so a chain change on
//! the live replica (a newer snapshot, the head moving on) does not disturb
//! a backup in progress; removing the snapshot itself while it is being
//! backed up is refused by the control plane.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use super::blocking::pread_full;
use super::extent::{data_blocks, LowerMap};
use super::{disp, meta, Replica, ReplicaError, BLOCK_SIZE};

/// The volume as it was when a snapshot was taken.
#[derive(Debug)]
pub struct SnapshotView {
    size: u64,
    files: Vec<File>,
    map: LowerMap,
}

impl SnapshotView {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads `buf.len()` bytes at `offset` (zeros where no layer has data).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.map
            .read_runs(self.size, offset, buf, |layer, off, dst| {
                match layer.and_then(|l| self.files.get(l as usize)) {
                    Some(f) => pread_full(f.as_raw_fd(), dst, off),
                    None => {
                        dst.fill(0);
                        Ok(())
                    }
                }
            })
    }

    /// Byte ranges `(offset, len)` where the snapshot holds data, sorted.
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        self.map.data_bytes()
    }
}

/// Sorted block ranges, merged, as byte `(offset, len)` pairs.
pub(crate) fn merge_bytes(mut blocks: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    blocks.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(blocks.len());
    for (s, e) in blocks {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter()
        .map(|(s, e)| (s * BLOCK_SIZE, (e - s) * BLOCK_SIZE))
        .collect()
}

impl Replica {
    /// A view of snapshot `name`.
    pub fn snapshot_view(&self, name: &str) -> Result<SnapshotView, ReplicaError> {
        let idx = self.snapshot_index(name)?;
        let c = self.chain_now();
        let mut files = Vec::with_capacity(idx + 1);
        let mut per_layer = Vec::with_capacity(idx + 1);
        for l in &c.layers[..=idx] {
            let path = self.dir.join(&l.file);
            let f = l.fd.try_clone().map_err(|source| ReplicaError::Io {
                path: disp(&path),
                source,
            })?;
            per_layer.push(data_blocks(f.as_raw_fd(), self.size()).map_err(|source| {
                ReplicaError::Io {
                    path: disp(&path),
                    source,
                }
            })?);
            files.push(f);
        }
        Ok(SnapshotView {
            size: self.size(),
            files,
            map: LowerMap::build(&per_layer),
        })
    }

    /// Byte ranges written between snapshot `from` and snapshot `to` (the
    /// data of the layers after `from` up to `to`): what an incremental
    /// backup must read. `None` when `from` is not an older snapshot of
    /// this chain (removed, or never taken here): back up in full.
    pub fn changed_between(
        &self,
        from: &str,
        to: &str,
    ) -> Result<Option<Vec<(u64, u64)>>, ReplicaError> {
        let to_idx = self.snapshot_index(to)?;
        let from_file = meta::snapshot_file_name(from);
        let c = self.chain_now();
        let Some(from_idx) = c.layers[..to_idx].iter().position(|l| l.file == from_file) else {
            return Ok(None);
        };
        let mut blocks = Vec::new();
        for l in &c.layers[from_idx + 1..=to_idx] {
            let path = self.dir.join(&l.file);
            blocks.extend(
                data_blocks(l.fd.as_raw_fd(), self.size()).map_err(|source| ReplicaError::Io {
                    path: disp(&path),
                    source,
                })?,
            );
        }
        Ok(Some(merge_bytes(blocks)))
    }

    /// True when the head holds data written since the last snapshot (the
    /// recurring snapshot job's "new data" rule).
    pub fn head_has_data(&self) -> bool {
        self.chain_now().head_bits.count() > 0
    }
}

impl Replica {
    fn layer_file(&self, file: &str) -> Result<std::fs::File, ReplicaError> {
        let c = self.chain_now();
        let layer = if file.is_empty() {
            Some(c.head())
        } else {
            c.layers.iter().find(|l| l.file == file)
        };
        let l = layer.ok_or_else(|| ReplicaError::SnapshotNotFound {
            dir: disp(&self.dir),
            name: file.to_string(),
        })?;
        l.fd.try_clone().map_err(|source| ReplicaError::Io {
            path: disp(&self.dir.join(&l.file)),
            source,
        })
    }

    /// Byte ranges `(offset, len)` holding data in one layer file (`""` =
    /// the head): what a rebuild copies layer by layer.
    pub fn layer_data(&self, file: &str) -> Result<Vec<(u64, u64)>, ReplicaError> {
        let f = self.layer_file(file)?;
        let blocks =
            data_blocks(f.as_raw_fd(), self.size()).map_err(|source| ReplicaError::Io {
                path: disp(&self.dir.join(file)),
                source,
            })?;
        Ok(merge_bytes(blocks))
    }

    /// Reads one layer file's own bytes (holes read as zeros).
    pub fn read_layer(&self, file: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.size()) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let f = self.layer_file(file).map_err(io::Error::other)?;
        pread_full(f.as_raw_fd(), buf, offset)
    }
}
