//! The node API: the gRPC service `cairn.v1.Cairn` (`proto/cairn.proto`)
//! served on cairnd's Unix socket, and the client side used by `cairnctl`.
//!
//! Owns the one mapping from [`crate::control::ControlError`] to
//! `tonic::Status` ([`server`]) and the Unix-socket connector ([`client`]).

pub mod client;
pub mod server;

/// Generated messages, client and server of `cairn.v1`.
pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("cairn.v1");
}

use std::path::PathBuf;

/// Serving or reaching the API failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("serving the API: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(
        "cannot reach cairnd at {path}: is it running? (start it with cairnd, or pass --socket)"
    )]
    Unreachable { path: PathBuf },
}
