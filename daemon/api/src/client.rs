//! Connecting to cairnd's Unix socket with the generated gRPC client.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use crate::pb::cairn_client::CairnClient;

/// Where cairnd listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/cairn/cairnd.sock";

/// Nothing answers on the socket.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach cairnd at {}: is it running? (start it with cairnd, or pass --socket)", path.display())]
pub struct ConnectError {
    pub path: PathBuf,
}

/// Connects to cairnd on `socket`. Fails at once, with a message saying what
/// to check, when nothing answers there.
pub async fn connect(socket: &Path) -> Result<CairnClient<Channel>, ConnectError> {
    let path: PathBuf = socket.to_path_buf();
    let unreachable = || ConnectError { path: path.clone() };
    // The URI is required by the HTTP/2 layer but never resolved: the
    // connector below ignores it and dials the socket.
    let endpoint = Endpoint::try_from("http://[::]:50051").map_err(|_| unreachable())?;
    let dial = path.clone();
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let dial = dial.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(dial).await?)) }
        }))
        .await
        .map_err(|_| unreachable())?;
    Ok(CairnClient::new(channel))
}
