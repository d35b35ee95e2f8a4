//! The gRPC server on the CSI endpoint (a Unix socket the sidecars and
//! kubelet dial).

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::cairnd::Cairnd;
use crate::controller::ControllerService;
use crate::identity::IdentityService;
use crate::node::NodeService;
use crate::pb::controller_server::ControllerServer;
use crate::pb::identity_server::IdentityServer;
use crate::pb::node_server::NodeServer;

/// Which CSI services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Identity and Controller (the provisioner/attacher/snapshotter pod).
    Controller,
    /// Identity and Node (the per-node DaemonSet pod).
    Node,
    /// All three.
    All,
}

/// What the driver needs to run.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// The CSI endpoint's socket path.
    pub endpoint: PathBuf,
    /// This node's name (the Kubernetes node name, which is the Cairn node
    /// name).
    pub node_id: String,
    pub cairnd_socket: PathBuf,
    pub mode: Mode,
    pub driver_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("--endpoint {0:?}: give unix:///path/to/csi.sock (or a path)")]
    Endpoint(String),
    #[error("CSI endpoint {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("--node-id is missing: give this node's name (the Kubernetes node name)")]
    NodeId,
    #[error("serving the CSI endpoint: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The socket path of a CSI endpoint: `unix:///p`, `unix://p` or a path.
pub fn endpoint_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let path = endpoint
        .strip_prefix("unix://")
        .unwrap_or(endpoint)
        .to_string();
    if path.is_empty() || endpoint.contains("://") && !endpoint.starts_with("unix://") {
        return Err(ServeError::Endpoint(endpoint.to_string()));
    }
    Ok(PathBuf::from(path))
}

/// Serves the CSI services of `config.mode` on `config.endpoint` until
/// `shutdown` completes. A stale socket left by an earlier run is replaced;
/// the new one is made 0600 (kubelet and the sidecars run as root).
pub async fn serve(
    config: DriverConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    if config.node_id.is_empty() {
        return Err(ServeError::NodeId);
    }
    let path = config.endpoint.clone();
    let io = |source| ServeError::Io {
        path: path.display().to_string(),
        source,
    };
    remove_stale_socket(&path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let listener = UnixListener::bind(&path).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    let cairnd = Cairnd::new(&config.cairnd_socket);
    let controller = matches!(config.mode, Mode::Controller | Mode::All);
    let node = matches!(config.mode, Mode::Node | Mode::All);
    tracing::info!(endpoint = %path.display(), node = %config.node_id, mode = ?config.mode,
        driver = %config.driver_name, "CSI driver serving");
    let served =
        cairn_api::shutdown::serve_draining(
            |stop| {
                tonic::transport::Server::builder()
                    .add_service(IdentityServer::new(IdentityService::new(
                        &config.driver_name,
                        cairnd.clone(),
                        controller,
                    )))
                    .add_optional_service(
                        controller
                            .then(|| ControllerServer::new(ControllerService::new(cairnd.clone()))),
                    )
                    .add_optional_service(node.then(|| {
                        NodeServer::new(NodeService::new(&config.node_id, cairnd.clone()))
                    }))
                    .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop)
            },
            shutdown,
            cairn_api::shutdown::DRAIN,
        )
        .await;
    let _ = std::fs::remove_file(&path);
    served.map_err(ServeError::from)
}

/// Removes `path` if it is a socket (an earlier run's); anything else there
/// is left alone (binding then fails and says so).
fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            endpoint_path("unix:///csi/csi.sock").ok(),
            Some(PathBuf::from("/csi/csi.sock"))
        );
        assert_eq!(
            endpoint_path("/csi/csi.sock").ok(),
            Some(PathBuf::from("/csi/csi.sock"))
        );
        for bad in ["", "unix://", "tcp://1.2.3.4:5"] {
            assert!(endpoint_path(bad).is_err(), "{bad}");
        }
    }
}
