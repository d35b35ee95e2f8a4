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
use crate::control::backups::{BackupInfo, BackupState};
use crate::control::forward::{ForwardError, Owner, PeerRef};
use crate::control::snapshots::SnapshotInfo;
use crate::control::{ControlError, NodeInfo, ReplicaInfo, VolumeInfo, VolumeManager, VolumeState};
use crate::disks::DiskError;
use crate::engine::{EngineError, ReplicaState};
use crate::frontend::FrontendError;
use crate::transport::PeerControl;
use prost::Message;

/// The one mapping from control-plane errors to gRPC statuses. The message is
/// the error's display text: it is what `cairnctl` prints.
pub fn status(e: ControlError) -> Status {
    use ControlError as E;
    let code = match &e {
        E::InvalidName(_)
        | E::ZeroSize
        | E::UnalignedSize { .. }
        | E::ZeroReplicas { .. }
        | E::TooManyReplicas { .. }
        | E::BadLabel { .. }
        | E::HandleNeedsBackup { .. }
        | E::Jobs(_)
        | E::Cron(_)
        | E::BackupHandle(_)
        | E::Credentials(_)
        | E::RestoreTooSmall { .. } => Code::InvalidArgument,
        E::NoBackupYet { .. } => Code::NotFound,
        E::BackupTarget(_) => Code::FailedPrecondition,
        E::BackupStore(e) if e.is_not_found() => Code::NotFound,
        E::BackupStore(_) => Code::FailedPrecondition,
        E::UnknownSnapshot { .. } => Code::NotFound,
        // No room: no disk or node can take the replicas.
        E::NotEnoughDisks { .. }
        | E::NotEnoughSchedulableDisks { .. }
        | E::NotEnoughNodes { .. }
        | E::Disk(DiskError::NoSpace { .. } | DiskError::NoRoomToGrow { .. })
        | E::CannotGrow { no_room: true, .. } => Code::ResourceExhausted,
        E::CannotGrow { .. } => Code::FailedPrecondition,
        E::NotLarger { .. } => Code::InvalidArgument,
        // Another operation on the volume is running: retry after it.
        E::Restoring { .. }
        | E::BackupInProgress { .. }
        | E::SnapshotBusy { .. }
        | E::Engine(EngineError::Rebuilding { .. }) => Code::Aborted,
        E::Standby { .. }
        | E::NotStandby { .. }
        | E::MustDetach { .. }
        | E::OnlineExpandUnsupported { .. }
        | E::NoHealthyReplicaFor { .. } => Code::FailedPrecondition,
        E::SnapshotRead(_) => Code::Unavailable,
        E::Disk(DiskError::Exists { .. }) => Code::AlreadyExists,
        E::Disk(DiskError::UnknownReplica { .. }) => Code::NotFound,
        E::Disk(DiskError::InUse { .. }) => Code::FailedPrecondition,
        E::AlreadyExists { .. } | E::SnapshotExists { .. } => Code::AlreadyExists,
        E::NotFound { .. } | E::UnknownReplica { .. } => Code::NotFound,
        E::TakenOver { .. } | E::InUse { .. } => Code::FailedPrecondition,
        E::OwnerUnreachable { .. } | E::NodeUnreachable { .. } => Code::Unavailable,
        E::BadCloneSource(_) | E::CloneTooSmall { .. } | E::UnknownDisk { .. } => {
            Code::InvalidArgument
        }
        E::Unfinished { .. } => Code::FailedPrecondition,
        E::Peer { code, .. } => Code::from_i32(*code),
        E::AlreadyAttached { .. }
        | E::Attached { .. }
        | E::LastHealthyReplica { .. }
        | E::NoHealthyReplica { .. } => Code::FailedPrecondition,
        E::Frontend(FrontendError::DriverMissing) => Code::Unavailable,
        E::Engine(EngineError::UnknownReplica { .. }) => Code::NotFound,
        E::Engine(EngineError::LastHealthyReplica { .. } | EngineError::Faulted { .. }) => {
            Code::FailedPrecondition
        }
        E::BadDisk { .. } | E::DuplicateDisk { .. } | E::NodeInUse { .. } | E::Secret(_) => {
            Code::FailedPrecondition
        }
        E::Setting(crate::control::settings::SettingError::Unknown(_))
        | E::NothingToAdopt { .. } => Code::NotFound,
        E::Setting(crate::control::settings::SettingError::Invalid { .. }) => Code::InvalidArgument,
        E::Cluster(crate::control::cluster::ClusterError::BadAddr { .. }) => Code::InvalidArgument,
        E::Cluster(crate::control::cluster::ClusterError::UnknownNode(_)) => Code::NotFound,
        E::Cluster(crate::control::cluster::ClusterError::Standalone) => Code::FailedPrecondition,
        E::Cluster(_) => Code::Unavailable,
        E::Disk(_) | E::Setting(_) => Code::Internal,
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
    PeerApi::install(&manager);
    // Clients get DRAIN after the signal: an idle connection left open (a
    // CSI driver's, a tool's) must not keep cairnd from stopping its devices.
    cairn_api::shutdown::serve_draining(
        |stop| {
            tonic::transport::Server::builder()
                .add_service(CairnServer::new(CairnService::new(manager)))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop)
        },
        shutdown,
        cairn_api::shutdown::DRAIN,
    )
    .await?;
    Ok(())
}

/// Marks a request a peer forwarded to this node, its volume's owner: it
/// runs here, never forwarded again.
#[derive(Debug, Clone, Copy)]
struct Forwarded;

/// Carries a volume call to its owner when that is another node.
macro_rules! route {
    ($svc:expr, $req:ident, $name:expr, $method:literal) => {
        if let Some(to) = $svc.route(&$req, $name).await? {
            return $svc.forward(&to, $method, $req.into_inner()).await;
        }
    };
}

impl CairnService {
    /// The peer that owns volume `name`, when that is not this node and the
    /// request was not forwarded here already. An owner that does not
    /// answer is an error (`Unavailable`): nothing is changed.
    async fn route<T>(&self, req: &Request<T>, name: &str) -> Result<Option<PeerRef>, Status> {
        if req.extensions().get::<Forwarded>().is_some() {
            return Ok(None);
        }
        match self.manager.owner(name).await {
            Owner::Local | Owner::Unknown => Ok(None),
            Owner::Peer(p) => Ok(Some(p)),
            Owner::Away { node, reason } => Err(Status::unavailable(format!(
                "owner {node} unreachable: {reason}; nothing was changed (retry when it is back)"
            ))),
        }
    }

    /// The node other than this one that owns `name`, if any.
    async fn owner_elsewhere<T>(&self, req: &Request<T>, name: &str) -> Option<String> {
        if req.extensions().get::<Forwarded>().is_some() {
            return None;
        }
        match self.manager.owner(name).await {
            Owner::Peer(p) => Some(p.node),
            Owner::Away { node, .. } => Some(node),
            Owner::Local | Owner::Unknown => None,
        }
    }

    /// Runs `method` on peer `to` and answers exactly what it answered.
    async fn forward<Q: Message, R: Message + Default>(
        &self,
        to: &PeerRef,
        method: &str,
        msg: Q,
    ) -> Result<Response<R>, Status> {
        match self.manager.forward(to, method, msg.encode_to_vec()).await {
            Ok(body) => R::decode(body.as_slice()).map(Response::new).map_err(|e| {
                Status::internal(format!("owner {}: undecodable answer: {e}", to.node))
            }),
            Err(ForwardError::Refused { code, message }) => {
                Err(Status::new(Code::from_i32(code), message))
            }
            Err(e @ ForwardError::Unreachable { .. }) => Err(Status::unavailable(e.to_string())),
        }
    }

    /// Runs a call a peer forwarded (`method` is the RPC name).
    async fn run_forwarded(&self, method: &str, body: &[u8]) -> Result<Vec<u8>, Status> {
        macro_rules! local {
            ($m:ident, $t:ty) => {{
                let msg = <$t>::decode(body).map_err(|e| {
                    Status::invalid_argument(format!("forwarded {method} request: {e}"))
                })?;
                let mut r = Request::new(msg);
                r.extensions_mut().insert(Forwarded);
                Ok(Cairn::$m(self, r).await?.into_inner().encode_to_vec())
            }};
        }
        match method {
            "ListVolumes" => local!(list_volumes, pb::ListVolumesRequest),
            "GetVolume" => local!(get_volume, pb::VolumeRef),
            "DetachVolume" => local!(detach_volume, pb::VolumeRef),
            "DeleteVolume" => local!(delete_volume, pb::DeleteVolumeRequest),
            "FailReplica" => local!(fail_replica, pb::FailReplicaRequest),
            "CreateSnapshot" => local!(create_snapshot, pb::CreateSnapshotRequest),
            "ListSnapshots" => local!(list_snapshots, pb::VolumeRef),
            "DeleteSnapshot" => local!(delete_snapshot, pb::SnapshotRef),
            "RevertSnapshot" => local!(revert_snapshot, pb::SnapshotRef),
            "PurgeSnapshots" => local!(purge_snapshots, pb::VolumeRef),
            "CreateBackup" => local!(create_backup, pb::CreateBackupRequest),
            "ActivateVolume" => local!(activate_volume, pb::VolumeRef),
            "SetRecurringJobs" => local!(set_recurring_jobs, pb::SetRecurringJobsRequest),
            "ExpandVolume" => local!(expand_volume, pb::ExpandVolumeRequest),
            "AttachVolume" => local!(attach_volume, pb::AttachVolumeRequest),
            "CreateVolume" => local!(create_volume, pb::CreateVolumeRequest),
            crate::control::RELEASE_METHOD
            | crate::control::FORGET_METHOD
            | crate::control::RECLAIM_METHOD => {
                let req: crate::control::HandoverRequest = serde_json::from_slice(body)
                    .map_err(|e| Status::invalid_argument(format!("{method} request: {e}")))?;
                match method {
                    crate::control::RELEASE_METHOD => self.manager.release(&req).await,
                    crate::control::FORGET_METHOD => {
                        self.manager.forget(&req).await.map(|()| Vec::new())
                    }
                    _ => self.manager.reclaim(&req).await.map(|()| Vec::new()),
                }
                .map_err(status)
            }
            other => Err(Status::unimplemented(format!(
                "{other} cannot be forwarded to a volume's owner"
            ))),
        }
    }
}

/// This node's side of the peer protocol's control calls: the volumes it
/// owns, and forwarded API calls run on its own service. Holds the manager
/// weakly (the manager's replica server holds this).
pub struct PeerApi {
    manager: std::sync::Weak<VolumeManager>,
    runtime: tokio::runtime::Handle,
}

impl PeerApi {
    /// Installs the peer side of `manager`'s API on its replica server.
    /// Call inside the runtime that serves the API.
    pub fn install(manager: &Arc<VolumeManager>) {
        manager.set_peer_control(Arc::new(PeerApi {
            manager: Arc::downgrade(manager),
            runtime: tokio::runtime::Handle::current(),
        }));
    }
}

impl PeerControl for PeerApi {
    fn placements(&self) -> Vec<crate::transport::VolumePlacement> {
        self.manager
            .upgrade()
            .map(|m| m.placements())
            .unwrap_or_default()
    }

    fn forward(&self, method: &str, request: &[u8]) -> (i32, String, Vec<u8>) {
        let Some(manager) = self.manager.upgrade() else {
            return (
                Code::Unavailable as i32,
                "the node is shutting down".into(),
                Vec::new(),
            );
        };
        let service = CairnService::new(manager);
        match self
            .runtime
            .block_on(service.run_forwarded(method, request))
        {
            Ok(body) => (0, String::new(), body),
            Err(s) => (s.code() as i32, s.message().to_string(), Vec::new()),
        }
    }
}

#[tonic::async_trait]
impl Cairn for CairnService {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        if let Some(owner) = self.owner_elsewhere(&req, &req.get_ref().name).await {
            return Err(Status::already_exists(format!(
                "volume {:?} already exists (owner {owner}): pick another name or delete it there first",
                req.get_ref().name
            )));
        }
        let from = crate::control::clone::CloneSource::parse(
            &req.get_ref().from_snapshot,
            &req.get_ref().from_volume,
        )
        .map_err(status)?;
        let on = req.get_ref().node.clone();
        if !on.is_empty() && on != self.manager.node_id() {
            if from.is_some() {
                return Err(Status::invalid_argument(format!(
                    "node {on:?} with a snapshot or volume source: a copy is made on its source's owner; create it without a node, then attach it where it is used"
                )));
            }
            if req.extensions().get::<Forwarded>().is_some() {
                return Err(Status::invalid_argument(format!(
                    "create forwarded to {} for node {on}: each node creates only on itself",
                    self.manager.node_id()
                )));
            }
            let to = self.manager.peer_named(&on).map_err(status)?;
            return self.forward(&to, "CreateVolume", req.into_inner()).await;
        }
        if let Some(src) = &from {
            if !req.get_ref().from_backup.is_empty() {
                return Err(Status::invalid_argument(
                    "give one source: --from-backup, --from-snapshot or --from-volume",
                ));
            }
            // The copy is made where the source is.
            route!(self, req, src.volume(), "CreateVolume");
        }
        let r = req.into_inner();
        // proto3 has no "unset": 0 replicas means the node's default.
        let replicas = (r.replicas != 0).then_some(r.replicas);
        let v = if let Some(src) = &from {
            self.manager
                .create_clone(&r.name, r.size, replicas, src)
                .await
        } else if r.from_backup.is_empty() {
            self.manager
                .create(&r.name, r.size, replicas, &r.recurring_jobs)
                .await
        } else {
            let size = (r.size != 0).then_some(r.size);
            self.manager
                .create_from_backup(
                    &r.name,
                    size,
                    replicas,
                    &r.from_backup,
                    r.standby,
                    &r.recurring_jobs,
                )
                .await
        }
        .map_err(status)?;
        Ok(Response::new(volume(v)))
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let mut volumes: Vec<pb::Volume> =
            self.manager.list().await.into_iter().map(volume).collect();
        if req.extensions().get::<Forwarded>().is_none() {
            // Every node's volumes: each peer's own list, and what peers
            // that do not answer last said they own.
            for peer in self.manager.peers_up() {
                let body = pb::ListVolumesRequest {}.encode_to_vec();
                match self.manager.forward(&peer, "ListVolumes", body).await {
                    Ok(b) => match pb::ListVolumesResponse::decode(b.as_slice()) {
                        Ok(l) => volumes.extend(l.volumes),
                        Err(e) => {
                            tracing::warn!(node = %peer.node, error = %e, "undecodable volume list")
                        }
                    },
                    Err(e) => {
                        tracing::warn!(node = %peer.node, error = %e, "cannot list a peer's volumes")
                    }
                }
            }
            for (node, names, reason) in self.manager.peers_away() {
                // A volume taken over from a node that is away is listed
                // once: where it is now.
                for name in names {
                    if volumes.iter().any(|v| v.name == name) {
                        continue;
                    }
                    volumes.push(pb::Volume {
                        name,
                        owner: node.clone(),
                        message: format!("owner {node} unreachable: {reason}"),
                        ..Default::default()
                    });
                }
            }
            volumes.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    async fn get_volume(
        &self,
        req: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::Volume>, Status> {
        route!(self, req, &req.get_ref().name, "GetVolume");
        let v = self
            .manager
            .get(&req.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(volume(v)))
    }

    async fn attach_volume(
        &self,
        req: Request<pb::AttachVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let forwarded = req.extensions().get::<Forwarded>().is_some();
        let r = req.into_inner();
        if !r.node.is_empty() && r.node != self.manager.node_id() {
            if forwarded {
                return Err(Status::invalid_argument(format!(
                    "attach forwarded to {} for node {}: each node attaches only on itself",
                    self.manager.node_id(),
                    r.node
                )));
            }
            let to = self.manager.peer_named(&r.node).map_err(status)?;
            return self.forward(&to, "AttachVolume", r).await;
        }
        let v = self
            .manager
            .attach_here(&r.name, r.force)
            .await
            .map_err(status)?;
        Ok(Response::new(volume(v)))
    }

    async fn expand_volume(
        &self,
        req: Request<pb::ExpandVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        route!(self, req, &req.get_ref().name, "ExpandVolume");
        let r = req.into_inner();
        let v = self.manager.expand(&r.name, r.size).await.map_err(status)?;
        Ok(Response::new(volume(v)))
    }

    async fn detach_volume(
        &self,
        req: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::Volume>, Status> {
        route!(self, req, &req.get_ref().name, "DetachVolume");
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
        route!(self, req, &req.get_ref().name, "DeleteVolume");
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
        route!(self, req, &req.get_ref().volume, "FailReplica");
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

    async fn set_node_scheduling(
        &self,
        req: Request<pb::SetNodeSchedulingRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let r = req.into_inner();
        self.manager
            .set_scheduling(r.allow_scheduling, &r.unschedulable_disks)
            .await
            .map_err(status)?;
        Ok(Response::new(node(self.manager.node().await)))
    }

    async fn list_nodes(
        &self,
        _req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let rules = self.manager.rules();
        let nodes = self
            .manager
            .nodes()
            .await
            .into_iter()
            .map(|n| cluster_node(n, rules))
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn add_node(
        &self,
        req: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::ClusterNode>, Status> {
        let rules = self.manager.rules();
        let n = self
            .manager
            .node_add(&req.into_inner().addr)
            .await
            .map_err(status)?;
        Ok(Response::new(cluster_node(n, rules)))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        self.manager
            .node_remove(&req.into_inner().node)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RemoveNodeResponse {}))
    }

    async fn adopt_volume(
        &self,
        req: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::Volume>, Status> {
        let name = req.into_inner().name;
        let v = match self.manager.owner_now(&name).await {
            Owner::Peer(p) => {
                return Err(Status::already_exists(format!(
                "volume {name:?} already exists (owner {}): `volume attach {name}` moves it here",
                p.node
            )))
            }
            // Its owner is gone: the same as `volume attach --force`
            // without the attach.
            Owner::Away { node, .. } => self.manager.take_over(&name, Some(&node)).await,
            Owner::Local | Owner::Unknown => self.manager.adopt(&name).await,
        };
        Ok(Response::new(volume(v.map_err(status)?)))
    }

    async fn list_settings(
        &self,
        _req: Request<pb::ListSettingsRequest>,
    ) -> Result<Response<pb::ListSettingsResponse>, Status> {
        let settings = self
            .manager
            .settings()
            .into_iter()
            .map(|(d, value)| pb::Setting {
                name: d.name.to_string(),
                value,
                default_value: d.default.to_string(),
                description: d.description.to_string(),
            })
            .collect();
        Ok(Response::new(pb::ListSettingsResponse { settings }))
    }

    async fn get_setting(
        &self,
        req: Request<pb::SettingRef>,
    ) -> Result<Response<pb::Setting>, Status> {
        let name = req.into_inner().name;
        let value = self.manager.setting(&name).map_err(status)?;
        Ok(Response::new(setting(&name, value)))
    }

    async fn set_setting(
        &self,
        req: Request<pb::SetSettingRequest>,
    ) -> Result<Response<pb::Setting>, Status> {
        let r = req.into_inner();
        let value = self
            .manager
            .set_setting(&r.name, &r.value)
            .await
            .map_err(status)?;
        Ok(Response::new(setting(&r.name, value)))
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        route!(self, req, &req.get_ref().volume, "CreateSnapshot");
        let r = req.into_inner();
        let name = (!r.name.is_empty()).then_some(r.name.as_str());
        let s = self
            .manager
            .snapshot_create(&r.volume, name, r.labels.into_iter().collect())
            .await
            .map_err(status)?;
        Ok(Response::new(snapshot(s)))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        route!(self, req, &req.get_ref().name, "ListSnapshots");
        let list = self
            .manager
            .snapshot_list(&req.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: list.into_iter().map(snapshot).collect(),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::SnapshotRef>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        route!(self, req, &req.get_ref().volume, "DeleteSnapshot");
        let r = req.into_inner();
        let coalesced = self
            .manager
            .snapshot_delete(&r.volume, &r.name)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteSnapshotResponse { coalesced }))
    }

    async fn revert_snapshot(
        &self,
        req: Request<pb::SnapshotRef>,
    ) -> Result<Response<pb::RevertSnapshotResponse>, Status> {
        route!(self, req, &req.get_ref().volume, "RevertSnapshot");
        let r = req.into_inner();
        let dropped = self
            .manager
            .snapshot_revert(&r.volume, &r.name)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RevertSnapshotResponse { dropped }))
    }

    async fn purge_snapshots(
        &self,
        req: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::PurgeSnapshotsResponse>, Status> {
        route!(self, req, &req.get_ref().name, "PurgeSnapshots");
        let merged = self
            .manager
            .snapshot_purge(&req.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::PurgeSnapshotsResponse { merged }))
    }

    async fn create_backup(
        &self,
        req: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<pb::Backup>, Status> {
        route!(self, req, &req.get_ref().volume, "CreateBackup");
        let r = req.into_inner();
        let snap = (!r.snapshot.is_empty()).then_some(r.snapshot.as_str());
        let labels = r.labels.into_iter().collect();
        let b = if r.no_wait {
            self.manager.backup_start(&r.volume, snap, labels).await
        } else {
            self.manager.backup_create(&r.volume, snap, labels).await
        }
        .map_err(status)?;
        Ok(Response::new(backup(b)))
    }

    async fn list_backups(
        &self,
        req: Request<pb::ListBackupsRequest>,
    ) -> Result<Response<pb::ListBackupsResponse>, Status> {
        let r = req.into_inner();
        let v = (!r.volume.is_empty()).then_some(r.volume.as_str());
        let list = self.manager.backup_list(v).await.map_err(status)?;
        Ok(Response::new(pb::ListBackupsResponse {
            backups: list.into_iter().map(backup).collect(),
        }))
    }

    async fn get_backup(
        &self,
        req: Request<pb::BackupRef>,
    ) -> Result<Response<pb::Backup>, Status> {
        let b = self
            .manager
            .backup_get(&req.into_inner().handle)
            .await
            .map_err(status)?;
        Ok(Response::new(backup(b)))
    }

    async fn delete_backup(
        &self,
        req: Request<pb::BackupRef>,
    ) -> Result<Response<pb::DeleteBackupResponse>, Status> {
        let (removed_blocks, kept_blocks) = self
            .manager
            .backup_delete(&req.into_inner().handle)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteBackupResponse {
            removed_blocks,
            kept_blocks,
        }))
    }

    async fn activate_volume(
        &self,
        req: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::Volume>, Status> {
        route!(self, req, &req.get_ref().name, "ActivateVolume");
        let v = self
            .manager
            .activate(&req.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(volume(v)))
    }

    async fn set_recurring_jobs(
        &self,
        req: Request<pb::SetRecurringJobsRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        route!(self, req, &req.get_ref().volume, "SetRecurringJobs");
        let r = req.into_inner();
        let v = self
            .manager
            .set_recurring_jobs(&r.volume, &r.jobs)
            .await
            .map_err(status)?;
        Ok(Response::new(volume(v)))
    }
}

fn setting(name: &str, value: String) -> pb::Setting {
    let d = crate::control::settings::DEFINITIONS
        .iter()
        .find(|d| d.name == name);
    pb::Setting {
        name: name.to_string(),
        value,
        default_value: d.map(|d| d.default.to_string()).unwrap_or_default(),
        description: d.map(|d| d.description.to_string()).unwrap_or_default(),
    }
}

fn cluster_node(
    n: crate::control::cluster::NodeView,
    rules: crate::control::placement::Rules,
) -> pb::ClusterNode {
    let up = n.up;
    pb::ClusterNode {
        name: n.name,
        addr: n.addr,
        local: n.local,
        state: if up {
            pb::NodeState::Up
        } else {
            pb::NodeState::Down
        } as i32,
        message: n.message,
        disks: n
            .report
            .map(|r| r.disks)
            .unwrap_or_default()
            .into_iter()
            .map(|d| pb::ClusterDisk {
                schedulable: up
                    && crate::disks::disk_fits(&d, 0, rules.over_provisioning, rules.min_available),
                path: d.path,
                size: d.size,
                available: d.available,
                allocated: d.allocated,
                replicas: d.replicas,
            })
            .collect(),
    }
}

fn volume_state(s: VolumeState) -> pb::VolumeState {
    match s {
        VolumeState::Detached => pb::VolumeState::Detached,
        VolumeState::Healthy => pb::VolumeState::Healthy,
        VolumeState::Degraded => pb::VolumeState::Degraded,
        VolumeState::Faulted => pb::VolumeState::Faulted,
        VolumeState::Fenced => pb::VolumeState::Fenced,
    }
}

fn volume(v: VolumeInfo) -> pb::Volume {
    pb::Volume {
        name: v.name,
        state: volume_state(v.state) as i32,
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
        standby: v.standby,
        from_backup: v.from_backup,
        last_restored: v.last_restored,
        recurring_jobs: v.recurring_jobs,
        restore: v.restore.map(|r| pb::Progress {
            percent: r.percent,
            done_bytes: r.done,
            total_bytes: r.total,
            bytes_per_second: r.rate,
        }),
        last_backup: v.last_backup,
        owner: v.owner,
    }
}

fn backup(b: BackupInfo) -> pb::Backup {
    pb::Backup {
        handle: b.handle(),
        name: b.name,
        volume: b.volume,
        snapshot: b.snapshot,
        snapshot_created: b.snapshot_created,
        created: b.created,
        size: b.size,
        volume_size: b.volume_size,
        labels: b.labels.into_iter().collect(),
        state: match b.state {
            BackupState::InProgress => pb::BackupState::InProgress,
            BackupState::Completed => pb::BackupState::Completed,
            BackupState::Error => pb::BackupState::Error,
        } as i32,
        progress: b.progress.map(|p| pb::Progress {
            percent: p.percent,
            done_bytes: p.done,
            total_bytes: p.total,
            bytes_per_second: p.rate,
        }),
        message: b.message,
        incremental: b.incremental,
        compression: b.compression,
        uploaded_blocks: b.uploaded_blocks,
        existing_blocks: b.existing_blocks,
        total_blocks: b.total_blocks,
        uploaded_bytes: b.uploaded_bytes,
    }
}

fn snapshot(s: SnapshotInfo) -> pb::Snapshot {
    pb::Snapshot {
        name: s.name,
        parent: s.parent,
        created: s.created,
        size: s.size,
        user_created: s.user_created,
        removed: s.removed,
        is_head: s.is_head,
        labels: s.labels.into_iter().collect(),
    }
}

fn replica(r: ReplicaInfo) -> pb::Replica {
    pb::Replica {
        name: r.name,
        node: r.node,
        disk: r.disk.display().to_string(),
        state: match r.state {
            ReplicaState::Healthy => pb::ReplicaState::Healthy,
            ReplicaState::Failed => pb::ReplicaState::Failed,
            ReplicaState::Rebuilding => pb::ReplicaState::Rebuilding,
        } as i32,
        message: r.message,
        addr: r.addr,
        dir: r.dir.display().to_string(),
        last_rebuild: r.last_rebuild.map(|l| pb::LastRebuild {
            incremental: l.incremental,
            copied_bytes: l.copied,
            millis: l.millis,
            finished_at: l.finished_at,
        }),
        rebuild: r.rebuild.map(|b| pb::Rebuild {
            percent: b.percent,
            done_bytes: b.done,
            total_bytes: b.total,
            bytes_per_second: b.rate,
            incremental: b.incremental,
        }),
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
                schedulable: d.schedulable,
            })
            .collect(),
        allow_scheduling: n.scheduling.allow,
        unschedulable_disks: n
            .scheduling
            .unschedulable_disks
            .iter()
            .map(|d| d.display().to_string())
            .collect(),
        ublk_status: n.ublk_status.unwrap_or_default(),
        kernel: n.kernel.release.clone(),
        online_expansion: n.kernel.online_resize(),
        ublk_features: n.kernel.ublk.unwrap_or(0),
    }
}

#[cfg(test)]
mod code_tests {
    //! One case per gRPC code a client must be able to act on: what it
    //! means, and an error that carries it.
    use super::*;
    use crate::control::cluster::ClusterError;
    use crate::disks::DiskError;

    fn code(e: ControlError) -> Code {
        status(e).code()
    }

    #[test]
    fn not_found_names_what_is_missing() {
        assert_eq!(
            code(ControlError::NotFound { name: "db".into() }),
            Code::NotFound
        );
    }

    #[test]
    fn already_exists_for_a_taken_name() {
        assert_eq!(
            code(ControlError::AlreadyExists { name: "db".into() }),
            Code::AlreadyExists
        );
    }

    #[test]
    fn invalid_argument_for_bad_input() {
        assert_eq!(code(ControlError::ZeroSize), Code::InvalidArgument);
        assert_eq!(
            code(ControlError::UnalignedSize { size: 1000 }),
            Code::InvalidArgument
        );
    }

    #[test]
    fn failed_precondition_when_the_volume_is_in_the_wrong_state() {
        assert_eq!(
            code(ControlError::Attached { name: "db".into() }),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(ControlError::MustDetach {
                name: "db".into(),
                what: "revert"
            }),
            Code::FailedPrecondition
        );
    }

    #[test]
    fn resource_exhausted_when_no_disk_or_node_has_room() {
        assert_eq!(
            code(ControlError::Disk(DiskError::NoSpace {
                node: "n1".into(),
                size: 1 << 30
            })),
            Code::ResourceExhausted
        );
        assert_eq!(
            code(ControlError::NotEnoughNodes {
                volume: "db".into(),
                wanted: 3,
                eligible: 2,
                soft: false,
                size: 1 << 30,
                no_room: 0,
                down: 1,
            }),
            Code::ResourceExhausted
        );
    }

    #[test]
    fn unavailable_when_a_peer_or_the_driver_is_away_retryable() {
        assert_eq!(
            code(ControlError::Frontend(FrontendError::DriverMissing)),
            Code::Unavailable
        );
        assert_eq!(
            code(ControlError::Cluster(ClusterError::Unreachable(
                "n2".into()
            ))),
            Code::Unavailable
        );
    }

    #[test]
    fn aborted_when_another_operation_on_the_volume_runs() {
        assert_eq!(
            code(ControlError::Restoring { name: "db".into() }),
            Code::Aborted
        );
        assert_eq!(
            code(ControlError::BackupInProgress {
                handle: "bak://db/b1".into()
            }),
            Code::Aborted
        );
    }
}
