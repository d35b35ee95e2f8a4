//! The `Cairn` gRPC service on top of [`VolumeManager`], and the Unix-socket
//! listener it is served on.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Code, Request, Response, Status};

use super::pb;
use super::pb::cairn_server::{Cairn, CairnServer};
use super::ApiError;
use crate::control::{ControlError, NodeInfo, ReplicaInfo, VolumeInfo, VolumeManager};
use crate::engine::{EngineError, ReplicaState};
use crate::frontend::FrontendError;

/// The one mapping from control-plane errors to gRPC statuses. The message is
/// the error's display text: it is what `cairnctl` prints.
pub fn status(e: ControlError) -> Status {
    use ControlError as E;
    let code = match &e {
        E::InvalidName(_)
        | E::ZeroSize
        | E::UnalignedSize { .. }
        | E::NotEnoughDisks { .. }
        | E::ZeroReplicas { .. }
        | E::TooManyReplicas { .. } => Code::InvalidArgument,
        E::AlreadyExists { .. } => Code::AlreadyExists,
        E::NotFound { .. } | E::UnknownReplica { .. } => Code::NotFound,
        E::AlreadyAttached { .. }
        | E::Attached { .. }
        | E::LastHealthyReplica { .. }
        | E::NoHealthyReplica { .. } => Code::FailedPrecondition,
        E::Frontend(FrontendError::DriverMissing) => Code::Unavailable,
        E::Engine(EngineError::UnknownReplica { .. }) => Code::NotFound,
        E::Engine(EngineError::LastHealthyReplica { .. } | EngineError::Faulted { .. }) => {
            Code::FailedPrecondition
        }
        E::BadDisk { .. } | E::DuplicateDisk { .. } => Code::FailedPrecondition,
        E::Frontend(_) | E::Engine(_) | E::Replica(_) | E::Io { .. } | E::Internal(_) => {
            Code::Internal
        }
    };
    if code == Code::Internal {
        // Logged here, where it is handled; the caller sees the same text.
        tracing::error!(error = %e, "request failed");
    }
    Status::new(code, e.to_string())
}

/// The gRPC service.
pub struct CairnService {
    manager: Arc<VolumeManager>,
}

impl CairnService {
    pub fn new(manager: Arc<VolumeManager>) -> CairnService {
        CairnService { manager }
    }
}

/// Binds cairnd's socket: makes the parent directory, replaces a stale socket
/// file left by an earlier run, and makes the socket owner-only (the API can
/// create and delete volumes).
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let err = |source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Serves the API on `listener` until `shutdown` completes; in-flight calls
/// finish first.
pub async fn serve(
    listener: UnixListener,
    manager: Arc<VolumeManager>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ApiError> {
    tonic::transport::Server::builder()
        .add_service(CairnServer::new(CairnService::new(manager)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

#[tonic::async_trait]
impl Cairn for CairnService {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        // proto3 has no "unset": 0 replicas means the node's default.
        let replicas = (r.replicas != 0).then_some(r.replicas);
        let v = self
            .manager
            .create(&r.name, r.size, replicas)
            .await
            .map_err(status)?;
        Ok(Response::new(volume(v)))
    }

    async fn list_volumes(
        &self,
        _req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let volumes = self.manager.list().await.into_iter().map(volume).collect();
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    async fn get_volume(
        &self,
        req: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::Volume>, Status> {
        let v = self
            .manager
            .get(&req.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(volume(v)))
    }

    async fn attach_volume(
        &self,
        req: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::Volume>, Status> {
        let v = self
            .manager
            .attach(&req.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(volume(v)))
    }

    async fn detach_volume(
        &self,
        req: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::Volume>, Status> {
        let v = self
            .manager
            .detach(&req.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(volume(v)))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        self.manager
            .delete(&r.name, r.force)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn fail_replica(
        &self,
        req: Request<pb::FailReplicaRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let v = self
            .manager
            .fail_replica(&r.volume, &r.replica)
            .await
            .map_err(status)?;
        Ok(Response::new(volume(v)))
    }

    async fn get_node(
        &self,
        _req: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        Ok(Response::new(node(self.manager.node().await)))
    }
}

fn volume(v: VolumeInfo) -> pb::Volume {
    pb::Volume {
        name: v.name,
        state: v.state.as_str().to_string(),
        size: v.size,
        device: v
            .device
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        replicas: v.replicas.into_iter().map(replica).collect(),
        revision: v.revision,
        queues: v.queues.into(),
        queue_depth: v.queue_depth.into(),
        message: v.message,
    }
}

fn replica(r: ReplicaInfo) -> pb::Replica {
    pb::Replica {
        name: r.name,
        node: r.node,
        disk: r.disk.display().to_string(),
        state: match r.state {
            ReplicaState::Healthy => "healthy",
            ReplicaState::Failed => "failed",
        }
        .to_string(),
        message: r.message,
    }
}

fn node(n: NodeInfo) -> pb::Node {
    pb::Node {
        name: n.name,
        disks: n
            .disks
            .into_iter()
            .map(|d| pb::Disk {
                path: d.path.display().to_string(),
                size: d.size,
                available: d.available,
                replicas: d.replicas,
            })
            .collect(),
        ublk_status: n.ublk_status.unwrap_or_default(),
    }
}
