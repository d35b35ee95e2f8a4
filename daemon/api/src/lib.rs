//! Cairn's node API for thin clients (`cairnctl`, the CSI driver, the CRD
//! controller): the `cairn.v1` gRPC protocol served by `cairnd` on its Unix
//! socket, the connector to that socket, and the two vocabularies every
//! client checks before it asks — sizes and object names.
//!
//! This crate links no storage code (no engine, `libublk`, `io-uring` or
//! `object_store`); `cargo tree -p cairn-api` shows it.

pub mod client;
pub mod name;
pub mod shutdown;
pub mod size;

/// Generated messages, client and server of `cairn.v1`.
pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("cairn.v1");
}

pub use client::{connect, ConnectError, DEFAULT_SOCKET};
