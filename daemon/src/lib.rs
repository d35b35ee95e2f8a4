//! Cairn's node daemon as a library: everything `cairnd` and `cairnctl` run.
//!
//! ```text
//!  cairnctl ──gRPC/unix──▶ api ──▶ control (volume specs, placement, lifecycle)
//!                                      │ attach
//!                                      ▼
//!  /dev/ublkbN ◀──ublk──▶ frontend (one io_uring per queue)
//!                                      │ QueueEngine (per queue)
//!                                      ▼
//!                           engine (replica set, fan-out, failure)
//!                                      │ ReplicaIo seam
//!                                      ▼
//!                           replica (layer chain files on disks)
//! ```
//! See `docs/ARCHITECTURE.md` for the write path in detail.

pub mod api;
pub mod backupstore;
pub mod control;
pub mod disks;
pub mod engine;
pub mod frontend;
pub mod fsutil;
pub mod jobs;
pub mod metrics;
pub mod replica;
pub mod transport;

pub use cairn_api::{name, size};
