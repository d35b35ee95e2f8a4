//! The per-volume replication engine.
//!
//! The engine owns what happens to an I/O between the frontend and the
//! replicas: fan a write out to every healthy replica and acknowledge it only
//! when all of them completed it, send a read to one healthy replica (round
//! robin), make flush/FUA durable everywhere, take a replica that fails out of
//! the I/O set, and keep the revision counter that tells which replica is
//! newest.
//!
//! ```text
//!  frontend queue thread (one io_uring)
//!      │ submit(tag, IoRequest, buf)          complete(tag, replica, res)
//!      ▼                                            ▲
//!  QueueEngine ── per-tag TagState (preallocated) ──┘
//!      │ ReplicaIo::prep_*  → SQEs pushed into the queue's ring via SqeSink
//!      ▼
//!  VolumeIo (shared by all queues: replica slots, healthy mask, revision)
//! ```
//!
//! Concurrency rules: `VolumeIo` is shared by every queue thread through an
//! `Arc`; the hot path reads only atomics (the healthy mask). Membership
//! changes (a replica failing, an epoch starting) take `VolumeIo`'s mutex,
//! persist the new revision on the surviving replicas, and only then publish
//! the new healthy mask — so no write is acknowledged on a smaller replica set
//! before the survivors' revision says they are newer than the failed one.
//! Each `QueueEngine` is owned by exactly one queue thread.
//!
//! Remote replicas (`remote`) are legs too: a request on the queue's own TCP
//! connection to the replica's node, answered through the queue's
//! completion port. A failed replica is brought back by `rebuild`, which
//! copies only what it missed while the volume keeps serving I/O.

pub mod intent;
mod layered_view;
mod queue;
pub mod rebuild;
pub mod remote;
mod replica_io;
mod volume;

pub use layered_view::{LayeredView, LayeredViewError};
pub use queue::{IoOp, IoRequest, QueueEngine, SqeSink};
pub use rebuild::{rebuild, BlockStore, RebuildError, RebuildProgress, RebuildReport};
pub use remote::{CompletionPort, RemoteReplica, RemoteTarget};
pub use replica_io::ReplicaIo;
pub use volume::{
    EngineEvent, EpochLog, EventSink, IoStats, QueueLayout, ReplicaHandle, ReplicaState,
    ReplicaStatus, VolumeHealth, VolumeIo,
};

/// Most replicas one volume can have (bits of the healthy mask, slots in the
/// per-tag state).
pub const MAX_REPLICAS: usize = 8;

/// Engine failures outside the I/O path (those become errnos on the I/O).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("volume {volume} was fenced: another engine claimed its replicas (it was attached or adopted elsewhere); detach it here")]
    Fenced { volume: String },
    #[error("volume {volume}: no replicas given")]
    NoReplicas { volume: String },
    #[error("volume {volume}: {count} replicas given, at most {MAX_REPLICAS} are supported")]
    TooManyReplicas { volume: String, count: usize },
    #[error("volume {volume}: replica {replica} holds {size} bytes, the volume has {expected}")]
    SizeMismatch {
        volume: String,
        replica: String,
        size: u64,
        expected: u64,
    },
    #[error("volume {volume} has no replica named {replica}: see `cairnctl volume get {volume}`")]
    UnknownReplica { volume: String, replica: String },
    #[error("replica {replica} is the last healthy replica of volume {volume}: failing it would fault the volume")]
    LastHealthyReplica { volume: String, replica: String },
    #[error("volume {volume} has no healthy replica")]
    Faulted { volume: String },
    #[error("volume {volume}: {reason}")]
    Setup { volume: String, reason: String },
    #[error(
        "volume {volume}: replica {replica} is in service; only a failed replica can be rebuilt"
    )]
    InService { volume: String, replica: String },
    #[error("volume {volume}: rebuild of replica {replica} stopped: it failed while copying")]
    RebuildAborted { volume: String, replica: String },
    #[error("volume {volume}: a replica is rebuilding; snapshot operations wait until it is done (see `cairnctl volume get {volume}`)")]
    Rebuilding { volume: String },
    #[error("volume {volume}: {what} failed on every healthy replica: {reason}")]
    ChainChange {
        volume: String,
        what: String,
        reason: String,
    },
    #[error("volume {volume}: cannot grow from {current} to {size} bytes: {reason}")]
    Grow {
        volume: String,
        current: u64,
        size: u64,
        reason: String,
    },
}
