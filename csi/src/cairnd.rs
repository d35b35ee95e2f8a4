//! The local cairnd, as the driver calls it: a client per call over its
//! Unix socket (a cairnd restart costs nothing), and its answers as CSI
//! statuses.

use std::path::{Path, PathBuf};

use cairn_api::pb::cairn_client::CairnClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Where the local cairnd listens.
#[derive(Debug, Clone)]
pub(crate) struct Cairnd {
    socket: PathBuf,
}

impl Cairnd {
    pub(crate) fn new(socket: &Path) -> Cairnd {
        Cairnd {
            socket: socket.to_path_buf(),
        }
    }

    /// A client, or `UNAVAILABLE` saying cairnd does not answer.
    pub(crate) async fn client(&self) -> Result<CairnClient<Channel>, Status> {
        cairn_api::connect(&self.socket)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))
    }
}

/// A cairnd answer as the CSI caller sees it: the same code (cairnd's codes
/// already follow gRPC's meaning) and message, prefixed with what was asked.
pub(crate) fn relay(what: &str, s: Status) -> Status {
    Status::new(s.code(), format!("{what}: {}", s.message()))
}

/// Whether a cairnd answer says the object does not exist.
pub(crate) fn is_not_found(s: &Status) -> bool {
    s.code() == Code::NotFound
}
