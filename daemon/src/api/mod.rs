//! The node API: the gRPC service `cairn.v1.Cairn` (`proto/cairn.proto`)
//! served on cairnd's Unix socket, and the client side used by `cairnctl`.
//!
//! Owns the one mapping from [`crate::control::ControlError`] to
//! `tonic::Status` ([`server`]). The protocol itself and the client side
//! live in the `cairn-api` crate (`daemon/api`), which thin clients use
//! without linking the daemon.

pub mod server;

pub use cairn_api::{client, pb};

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
}
