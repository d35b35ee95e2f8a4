//! The replica format: a directory holding a chain of sparse image layers.
//! (Interface fixed; implementation in progress.)

use std::os::fd::RawFd;
use std::path::Path;

/// Granularity of extent tracking and of every I/O the engine issues.
pub const BLOCK_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("replica {path}: {source}")]
    Io { path: String, source: std::io::Error },
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

pub struct Replica {}

impl Replica {
    pub fn create(_dir: &Path, _spec: &ReplicaSpec) -> Result<Self, ReplicaError> { todo!() }
    pub fn open(_dir: &Path) -> Result<Self, ReplicaError> { todo!() }
    pub fn size(&self) -> u64 { todo!() }
    pub fn revision(&self) -> u64 { todo!() }
    pub fn set_revision(&self, _rev: u64) -> Result<(), ReplicaError> { todo!() }
    pub fn head_fd(&self) -> RawFd { todo!() }
    pub fn has_lower_layers(&self) -> bool { todo!() }
    pub fn mark_written(&self, _offset: u64, _len: u64) { todo!() }
    pub fn resolve_read(&self, _offset: u64, _len: u64, _f: impl FnMut(ReadSegment)) { todo!() }
    pub fn check_files(&self) -> Result<(), ReplicaError> { todo!() }
}
