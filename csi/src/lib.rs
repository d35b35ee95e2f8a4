//! `cairn-csi`: the Container Storage Interface driver for Cairn.
//!
//! A thin shim: every call becomes one or a few calls of the local
//! `cairnd`'s `cairn.v1` API on its Unix socket. It holds no storage logic
//! and links no storage code (no engine, `libublk`, `io-uring` or
//! `object_store`); `cargo tree -p cairn-csi` shows it.
//!
//! - [`identity`]: plugin name, version, capabilities, probe.
//! - [`controller`]: volumes (create, delete, publish = attach on a node,
//!   expand, list, capacity), snapshots (`snap://` Cairn snapshots and
//!   `bak://` backups).
//! - [`node`]: staging (format, mount, grow), publishing (bind mounts),
//!   usage, filesystem growth, node identity and topology.
//! - [`mounts`]: mountinfo and the format/mount/grow tools.
//! - [`naming`]: CSI names to Cairn names, snapshot handles.
//! - [`params`]: StorageClass / VolumeSnapshotClass parameters and sizes.
//! - [`server`]: the gRPC server on the CSI endpoint.

pub mod controller;
pub mod identity;
pub mod locks;
pub mod mounts;
pub mod naming;
pub mod node;
pub mod params;
pub mod server;

mod cairnd;

pub use server::{serve, DriverConfig, Mode};

/// Generated messages and services of CSI `csi.v1` (spec v1.12.0).
pub mod pb {
    #![allow(clippy::all)]
    #![allow(rustdoc::all)]
    tonic::include_proto!("csi.v1");
}

/// The driver's default name (the StorageClass `provisioner`).
pub const DEFAULT_DRIVER_NAME: &str = "csi.cairn.io";
/// This build's version, reported by `GetPluginInfo`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The topology key every node reports (the Kubernetes node name).
pub const TOPOLOGY_KEY: &str = "kubernetes.io/hostname";
