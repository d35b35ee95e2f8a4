//! A snapshot of a replica read layer by layer, locally or over the wire:
//! what a rebuild copies from and what a backup reads when the volume has
//! no healthy replica on this node.
//!
//! [`LayerReader`] reads one layer file's own bytes (`ListExtents` /
//! `ReadLayer` for a remote replica). [`LayeredView`] stacks the layers up to
//! one snapshot into the volume as it was then, like `replica::SnapshotView`
//! does with open descriptors. Snapshot layers never change in place; if one
//! below the snapshot is coalesced away while the view is read, reading that
//! layer fails (its file is gone), so a backup fails rather than mixing data.

use std::io;
use std::sync::{Arc, Mutex};

use super::rebuild::{list_layer, peer_io};
use super::replica_io::ReplicaIo;
use crate::replica::extent::LowerMap;
use crate::replica::{merge_bytes, LayerInfo, Replica, BLOCK_SIZE};
use crate::transport::{Op, PeerConn};

/// Largest `ReadLayer` asked for in one request.
const READ_PIECE: usize = 4 << 20;

/// Reads single layer files of a replica.
pub(crate) enum LayerReader {
    Local(Arc<Replica>),
    Remote { conn: PeerConn, data: Vec<u8> },
}

impl LayerReader {
    pub(crate) fn open(io: &ReplicaIo) -> io::Result<LayerReader> {
        Ok(match io {
            ReplicaIo::Local(r) => LayerReader::Local(r.clone()),
            ReplicaIo::Remote(r) => LayerReader::Remote {
                conn: r.open_stream().map_err(peer_io)?,
                data: Vec::new(),
            },
        })
    }

    /// Byte ranges `(offset, len)` holding data in layer file `layer`.
    pub(crate) fn ranges(&mut self, layer: &str) -> io::Result<Vec<(u64, u64)>> {
        match self {
            LayerReader::Local(r) => r.layer_data(layer).map_err(io::Error::other),
            LayerReader::Remote { conn, .. } => list_layer(conn, layer),
        }
    }

    pub(crate) fn read(&mut self, layer: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self {
            LayerReader::Local(r) => r.read_layer(layer, offset, buf),
            LayerReader::Remote { conn, data } => {
                // One frame carries at most MAX_PAYLOAD bytes (a 16 MiB
                // backup block is read in pieces).
                let mut at = offset;
                for part in buf.chunks_mut(READ_PIECE) {
                    let op = Op::ReadLayer {
                        layer: layer.to_string(),
                        offset: at,
                        len: part.len() as u32,
                    };
                    match conn.call_data(op, &[], data).map_err(peer_io)? {
                        Op::Data if data.len() == part.len() => part.copy_from_slice(data),
                        other => {
                            return Err(io::Error::other(format!(
                                "unexpected answer {other:?} to ReadLayer"
                            )))
                        }
                    }
                    at += part.len() as u64;
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayeredViewError {
    #[error("replica {replica}: no snapshot {snapshot:?} in its chain")]
    NoSnapshot { replica: String, snapshot: String },
    #[error("replica {replica}: {what}: {source}")]
    Io {
        replica: String,
        what: &'static str,
        source: io::Error,
    },
}

/// The volume as it was at one snapshot, read through `LayerReader`s.
/// Reads may run from several threads: each takes a reader (a connection
/// for a remote replica) from a small pool and puts it back.
pub struct LayeredView {
    io: ReplicaIo,
    size: u64,
    /// Layer files bottom-up, up to and including the snapshot.
    files: Vec<String>,
    /// Per layer, its data ranges in bytes (for `changed_since`).
    ranges: Vec<Vec<(u64, u64)>>,
    /// Snapshot name of each layer in `files`.
    snapshots: Vec<Option<String>>,
    map: LowerMap,
    readers: Mutex<Vec<LayerReader>>,
}

impl LayeredView {
    /// Opens snapshot `snapshot` of the replica behind `io`. Blocking.
    pub fn open(io: ReplicaIo, snapshot: &str) -> Result<LayeredView, LayeredViewError> {
        let replica = io.describe();
        let ioerr = |what| {
            let replica = replica.clone();
            move |source| LayeredViewError::Io {
                replica,
                what,
                source,
            }
        };
        let chain: Vec<LayerInfo> = io
            .chain()
            .map_err(|e| ioerr("listing layers")(io::Error::other(e)))?;
        let Some(idx) = chain
            .iter()
            .position(|l| !l.is_head && l.snapshot.as_deref() == Some(snapshot))
        else {
            return Err(LayeredViewError::NoSnapshot {
                replica,
                snapshot: snapshot.to_string(),
            });
        };
        let mut reader = LayerReader::open(&io).map_err(ioerr("connecting"))?;
        let mut ranges = Vec::with_capacity(idx + 1);
        for l in &chain[..=idx] {
            ranges.push(reader.ranges(&l.file).map_err(ioerr("listing extents"))?);
        }
        let blocks: Vec<Vec<(u64, u64)>> = ranges
            .iter()
            .map(|rs| {
                rs.iter()
                    .map(|&(o, n)| (o / BLOCK_SIZE, (o + n).div_ceil(BLOCK_SIZE)))
                    .collect()
            })
            .collect();
        Ok(LayeredView {
            size: io.size(),
            files: chain[..=idx].iter().map(|l| l.file.clone()).collect(),
            snapshots: chain[..=idx].iter().map(|l| l.snapshot.clone()).collect(),
            map: LowerMap::build(&blocks),
            ranges,
            readers: Mutex::new(vec![reader]),
            io,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Byte ranges where the snapshot holds data, sorted.
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        self.map.data_bytes()
    }

    /// Byte ranges written after snapshot `older` up to this view's
    /// snapshot; `None` when `older` is not below it in the chain.
    pub fn changed_since(&self, older: &str) -> Option<Vec<(u64, u64)>> {
        let below = &self.snapshots[..self.snapshots.len().saturating_sub(1)];
        let from = below.iter().position(|s| s.as_deref() == Some(older))?;
        let blocks = self.ranges[from + 1..]
            .iter()
            .flatten()
            .map(|&(o, n)| (o / BLOCK_SIZE, (o + n).div_ceil(BLOCK_SIZE)))
            .collect();
        Some(merge_bytes(blocks))
    }

    /// Reads `buf.len()` bytes at `offset` (zeros where no layer has data).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut reader = match self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            Some(r) => r,
            None => LayerReader::open(&self.io)?,
        };
        let r = self
            .map
            .read_runs(self.size, offset, buf, |layer, off, dst| {
                match layer.and_then(|l| self.files.get(l as usize)) {
                    Some(file) => reader.read(file, off, dst),
                    None => {
                        dst.fill(0);
                        Ok(())
                    }
                }
            });
        // A reader whose read failed may have a broken connection: drop it.
        if r.is_ok() {
            self.readers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(reader);
        }
        r
    }
}
