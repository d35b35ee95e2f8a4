//! The CSI Controller service: volumes and snapshots, each call carried out
//! by the local cairnd (which forwards to a volume's owner node itself).
//!
//! Ids: a volume id is the Cairn volume name ([`naming::volume_name`] of the
//! CSI name); a snapshot id is `snap://VOLUME/SNAPSHOT` (a Cairn snapshot)
//! or `bak://VOLUME/BACKUP` (a backup), see [`SnapshotHandle`].

use std::collections::HashMap;

use cairn_api::pb as cairn;
use cairn_api::pb::cairn_client::CairnClient;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::cairnd::{is_not_found, relay, Cairnd};
use crate::locks::KeyedLocks;
use crate::naming::{self, SnapshotHandle};
use crate::params::{self, DataLocality, SnapshotType, VolumeParams};
use crate::pb::controller_server::Controller;
use crate::pb::controller_service_capability::{rpc, Rpc, Type as CapType};
use crate::pb::volume_capability::access_mode::Mode as AccessMode;
use crate::pb::volume_capability::AccessType;
use crate::pb::volume_content_source::Type as SourceType;
use crate::pb::*;

/// Label on a backup made by `CreateSnapshot`: the Cairn form of the CSI
/// snapshot name ([`naming::snapshot_name`], a valid label value), so a
/// retried call finds it.
pub const SNAPSHOT_NAME_LABEL: &str = "csi.cairn.io/snapshot-name";
/// Key of a volume's mkfs options in its volume context.
pub const MKFS_PARAMS_CONTEXT: &str = "mkfsParams";

pub struct ControllerService {
    cairnd: Cairnd,
    /// Per volume id (and per snapshot name): concurrent calls for one
    /// object run one at a time.
    locks: KeyedLocks,
}

impl ControllerService {
    pub(crate) fn new(cairnd: Cairnd) -> ControllerService {
        ControllerService {
            cairnd,
            locks: KeyedLocks::default(),
        }
    }

    async fn client(&self) -> Result<CairnClient<Channel>, Status> {
        self.cairnd.client().await
    }
}

fn missing(field: &str, what: &str) -> Status {
    Status::invalid_argument(format!("{field} is missing: give {what}"))
}

/// Checks the requested capabilities; `Err` names the first unsupported one.
fn check_capabilities(caps: &[VolumeCapability]) -> Result<(), String> {
    for c in caps {
        match &c.access_type {
            None => {
                return Err("volume_capability.access_type is missing: give block or mount".into())
            }
            Some(AccessType::Mount(m)) => {
                if !matches!(m.fs_type.as_str(), "" | "ext4" | "xfs") {
                    return Err(format!(
                        "fs_type {:?} is not supported: use ext4 or xfs",
                        m.fs_type
                    ));
                }
            }
            Some(AccessType::Block(_)) => {}
        }
        let mode = c
            .access_mode
            .as_ref()
            .map(|m| m.mode)
            .ok_or_else(|| "volume_capability.access_mode is missing".to_string())?;
        let ok = [
            AccessMode::SingleNodeWriter,
            AccessMode::SingleNodeReaderOnly,
            AccessMode::SingleNodeSingleWriter,
            AccessMode::SingleNodeMultiWriter,
        ]
        .iter()
        .any(|m| *m as i32 == mode);
        if !ok {
            let name = AccessMode::try_from(mode)
                .map(|m| m.as_str_name().to_string())
                .unwrap_or_else(|_| mode.to_string());
            return Err(format!(
                "access mode {name} is not supported: a Cairn volume is attached on one node at a time (use a SINGLE_NODE_* mode)"
            ));
        }
    }
    Ok(())
}

fn is_mount(cap: Option<&VolumeCapability>) -> bool {
    matches!(
        cap.and_then(|c| c.access_type.as_ref()),
        Some(AccessType::Mount(_))
    )
}

/// The CSI condition of a Cairn volume: abnormal unless healthy or detached.
pub(crate) fn condition(v: &cairn::Volume) -> VolumeCondition {
    use cairn::VolumeState as S;
    let state = S::try_from(v.state).unwrap_or(S::Unspecified);
    let (abnormal, what) = match state {
        S::Healthy => (false, "healthy"),
        S::Detached => (false, "detached"),
        S::Degraded => (
            true,
            "degraded: serving with fewer replicas while some rebuild",
        ),
        S::Faulted => (true, "faulted: no healthy replica, I/O fails"),
        S::Fenced => (
            true,
            "fenced: another node took the volume over; detach it here",
        ),
        S::Unspecified => (true, "state unknown (its owner does not answer)"),
    };
    let message = if v.message.is_empty() {
        what.to_string()
    } else {
        format!("{what}; {}", v.message)
    };
    VolumeCondition { abnormal, message }
}

fn published_nodes(v: &cairn::Volume) -> Vec<String> {
    if v.device.is_empty() || v.owner.is_empty() {
        Vec::new()
    } else {
        vec![v.owner.clone()]
    }
}

/// Every node of the cluster can reach every volume (replicas travel over
/// the network).
async fn topology(c: &mut CairnClient<Channel>) -> Result<Vec<Topology>, Status> {
    let nodes = c
        .list_nodes(cairn::ListNodesRequest {})
        .await
        .map_err(|s| relay("listing nodes", s))?
        .into_inner()
        .nodes;
    Ok(nodes
        .into_iter()
        .map(|n| Topology {
            segments: HashMap::from([(crate::TOPOLOGY_KEY.to_string(), n.name)]),
        })
        .collect())
}

/// The node a `WaitForFirstConsumer` claim's pod was scheduled on: the
/// first `preferred` topology (the external-provisioner puts the selected
/// node first), else the only `requisite` one.
fn first_consumer_node(req: Option<&TopologyRequirement>) -> Option<String> {
    let req = req?;
    let node = |t: &Topology| t.segments.get(crate::TOPOLOGY_KEY).cloned();
    match req.preferred.first() {
        Some(t) => node(t),
        None if req.requisite.len() == 1 => node(&req.requisite[0]),
        None => None,
    }
    .filter(|n| !n.is_empty())
}

async fn get_volume(
    c: &mut CairnClient<Channel>,
    id: &str,
) -> Result<Option<cairn::Volume>, Status> {
    match c
        .get_volume(cairn::VolumeRef {
            name: id.to_string(),
        })
        .await
    {
        Ok(v) => Ok(Some(v.into_inner())),
        Err(s) if is_not_found(&s) => Ok(None),
        Err(s) => Err(relay(&format!("volume {id}"), s)),
    }
}

fn csi_volume(
    v: &cairn::Volume,
    context: HashMap<String, String>,
    source: Option<VolumeContentSource>,
    topology: Vec<Topology>,
) -> Volume {
    Volume {
        capacity_bytes: v.size as i64,
        volume_id: v.name.clone(),
        volume_context: context,
        content_source: source,
        accessible_topology: topology,
    }
}

fn paging(max_entries: i32, token: &str, len: usize) -> Result<(usize, usize), Status> {
    if max_entries < 0 {
        return Err(Status::invalid_argument(format!(
            "max_entries {max_entries} is negative: give 0 (all) or more"
        )));
    }
    let start = if token.is_empty() {
        0
    } else {
        token
            .parse::<usize>()
            .ok()
            .filter(|s| *s <= len)
            .ok_or_else(|| {
                Status::aborted(format!(
                    "starting_token {token:?} is not one this driver gave (or the list shrank): list again from the start"
                ))
            })?
    };
    let end = if max_entries == 0 {
        len
    } else {
        (start + max_entries as usize).min(len)
    };
    Ok((start, end))
}

fn next_token(end: usize, len: usize) -> String {
    if end < len {
        end.to_string()
    } else {
        String::new()
    }
}

/// A creation time as Cairn writes it: Unix seconds (snapshots) or RFC 3339
/// (backups, as Longhorn writes them).
fn timestamp(created: &str) -> Option<prost_types::Timestamp> {
    if let Ok(secs) = created.parse::<i64>() {
        return Some(prost_types::Timestamp {
            seconds: secs,
            nanos: 0,
        });
    }
    created.parse::<prost_types::Timestamp>().ok()
}

/// A CSI snapshot of a Cairn snapshot.
fn snap_entry(volume: &cairn::Volume, s: &cairn::Snapshot) -> Snapshot {
    Snapshot {
        size_bytes: volume.size as i64,
        snapshot_id: SnapshotHandle::snap_id(&volume.name, &s.name),
        source_volume_id: volume.name.clone(),
        creation_time: timestamp(&s.created),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

/// A CSI snapshot of a backup.
fn bak_entry(b: &cairn::Backup) -> Snapshot {
    let ready = b.state == cairn::BackupState::Completed as i32;
    Snapshot {
        // What a restore needs (Velero sizes the new PVC from it).
        size_bytes: b.volume_size as i64,
        snapshot_id: b.handle.clone(),
        source_volume_id: b.volume.clone(),
        creation_time: timestamp(if b.created.is_empty() {
            &b.snapshot_created
        } else {
            &b.created
        }),
        ready_to_use: ready,
        group_snapshot_id: String::new(),
    }
}

/// Snapshots the driver lists: the user-made ones, which include those of
/// recurring jobs (restore points a pre-provisioned VolumeSnapshotContent
/// may name); not the volume head, not removed ones, not the ones clones
/// and rebuilds made for themselves.
fn listed(s: &cairn::Snapshot) -> bool {
    !s.is_head && !s.removed && s.user_created
}

impl ControllerService {
    /// The Cairn snapshot `name` on any volume: (volume, snapshot).
    async fn find_snap(
        &self,
        c: &mut CairnClient<Channel>,
        name: &str,
    ) -> Result<Option<(cairn::Volume, cairn::Snapshot)>, Status> {
        let volumes = c
            .list_volumes(cairn::ListVolumesRequest {})
            .await
            .map_err(|s| relay("listing volumes", s))?
            .into_inner()
            .volumes;
        for v in volumes {
            let snaps = match c
                .list_snapshots(cairn::VolumeRef {
                    name: v.name.clone(),
                })
                .await
            {
                Ok(s) => s.into_inner().snapshots,
                // An owner that does not answer: its snapshots cannot be
                // checked; say so rather than risk a second snapshot.
                Err(s) => return Err(relay(&format!("listing snapshots of {}", v.name), s)),
            };
            if let Some(s) = snaps.into_iter().find(|s| s.name == name && !s.is_head) {
                return Ok(Some((v, s)));
            }
        }
        Ok(None)
    }

    /// The backup made for CSI snapshot `name`, if any.
    async fn find_bak(
        &self,
        c: &mut CairnClient<Channel>,
        name: &str,
    ) -> Result<Option<cairn::Backup>, Status> {
        let list = c
            .list_backups(cairn::ListBackupsRequest {
                volume: String::new(),
            })
            .await
            .map_err(|s| relay("listing backups", s))?
            .into_inner()
            .backups;
        Ok(list
            .into_iter()
            .find(|b| b.labels.get(SNAPSHOT_NAME_LABEL).map(String::as_str) == Some(name)))
    }

    async fn snapshot_by_id(
        &self,
        c: &mut CairnClient<Channel>,
        id: &str,
    ) -> Result<Option<Snapshot>, Status> {
        match SnapshotHandle::parse(id) {
            None => Ok(None),
            Some(SnapshotHandle::Snap { volume, snapshot }) => {
                let Some(v) = get_volume(c, &volume).await? else {
                    return Ok(None);
                };
                let snaps = c
                    .list_snapshots(cairn::VolumeRef {
                        name: volume.clone(),
                    })
                    .await
                    .map_err(|s| relay(&format!("listing snapshots of {volume}"), s))?
                    .into_inner()
                    .snapshots;
                Ok(snaps
                    .iter()
                    .find(|s| s.name == snapshot && !s.is_head && !s.removed)
                    .map(|s| snap_entry(&v, s)))
            }
            Some(SnapshotHandle::Bak { handle, .. }) => {
                match c
                    .get_backup(cairn::BackupRef {
                        handle: handle.clone(),
                    })
                    .await
                {
                    Ok(b) => Ok(Some(bak_entry(&b.into_inner()))),
                    Err(s) if is_not_found(&s) => Ok(None),
                    Err(s) => Err(relay(&format!("backup {handle}"), s)),
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = naming::volume_name(&r.name)?;
        if r.volume_capabilities.is_empty() {
            return Err(missing("volume_capabilities", "at least one capability"));
        }
        check_capabilities(&r.volume_capabilities).map_err(Status::invalid_argument)?;
        let p = VolumeParams::parse(&r.parameters)?;
        let size = params::size_for(r.capacity_range.as_ref())?;
        let source = r
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.clone());
        let (from_snapshot, from_volume, mut from_backup) = match &source {
            None => (String::new(), String::new(), String::new()),
            Some(SourceType::Snapshot(s)) => match SnapshotHandle::parse(&s.snapshot_id) {
                Some(SnapshotHandle::Snap { volume, snapshot }) => {
                    (format!("{volume}/{snapshot}"), String::new(), String::new())
                }
                Some(SnapshotHandle::Bak { handle, .. }) => (String::new(), String::new(), handle),
                None => {
                    return Err(Status::not_found(format!(
                        "volume_content_source.snapshot.snapshot_id {:?}: no such snapshot (ids are snap://VOLUME/SNAPSHOT or bak://VOLUME/BACKUP)",
                        s.snapshot_id
                    )))
                }
            },
            Some(SourceType::Volume(v)) => {
                if v.volume_id.is_empty() {
                    return Err(missing("volume_content_source.volume.volume_id", "the volume to clone"));
                }
                (String::new(), v.volume_id.clone(), String::new())
            }
        };
        if let Some(b) = &p.from_backup {
            if !from_backup.is_empty() || !from_snapshot.is_empty() || !from_volume.is_empty() {
                return Err(Status::invalid_argument(
                    "StorageClass parameter fromBackup and volume_content_source both give the data: give one",
                ));
            }
            from_backup = b.clone();
        }
        let mut context = HashMap::new();
        if let Some(m) = &p.mkfs_params {
            context.insert(MKFS_PARAMS_CONTEXT.to_string(), m.clone());
        }
        let content_source = r.volume_content_source.clone();
        let _g = self.locks.lock(&id).await;
        let mut c = self.client().await?;
        let topo = topology(&mut c).await?;
        if let Some(v) = get_volume(&mut c, &id).await? {
            // A retry (same name): the same volume if its size fits.
            if params::fits(v.size, r.capacity_range.as_ref()) {
                return Ok(Response::new(CreateVolumeResponse {
                    volume: Some(csi_volume(&v, context, content_source, topo)),
                }));
            }
            return Err(Status::already_exists(format!(
                "volume {id} (for name {:?}) exists with {} bytes, not the {size} asked",
                r.name, v.size
            )));
        }
        if let Some(t) = p.stale_replica_timeout {
            tracing::info!(volume = %id, minutes = t, "staleReplicaTimeout is cluster-wide in Cairn (setting stale-replica-timeout); not applied per volume");
        }
        // Data locality: made on the node the scheduler chose for the first
        // consumer, whose placement keeps a replica there when one fits. A
        // copy (clone, snapshot) is made where its source is.
        let near = match p.data_locality {
            DataLocality::BestEffort if from_snapshot.is_empty() && from_volume.is_empty() => {
                first_consumer_node(r.accessibility_requirements.as_ref())
            }
            _ => None,
        };
        let mut ask = cairn::CreateVolumeRequest {
            name: id.clone(),
            size,
            replicas: p.replicas,
            from_backup,
            standby: false,
            recurring_jobs: p.recurring_jobs.clone().unwrap_or_default(),
            from_snapshot,
            from_volume,
            node: near.clone().unwrap_or_default(),
        };
        let made = match c.create_volume(ask.clone()).await {
            Err(s) if near.is_some() && matches!(s.code(), Code::NotFound | Code::Unavailable) => {
                // Best effort: that node is not a member or does not
                // answer; the volume is made here instead.
                tracing::info!(volume = %id, node = ?near, reason = %s.message(), "dataLocality best-effort: preferred node unusable; creating without it");
                ask.node.clear();
                c.create_volume(ask).await
            }
            other => other,
        }
        .map_err(|s| relay(&format!("creating volume {id}"), s))?
        .into_inner();
        tracing::info!(volume = %id, name = %r.name, size, node = ?near, "volume created");
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(csi_volume(&made, context, content_source, topo)),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let id = req.into_inner().volume_id;
        if id.is_empty() {
            return Err(missing("volume_id", "the volume to delete"));
        }
        let _g = self.locks.lock(&id).await;
        let mut c = self.client().await?;
        match c
            .delete_volume(cairn::DeleteVolumeRequest {
                name: id.clone(),
                force: false,
            })
            .await
        {
            Ok(_) => {
                tracing::info!(volume = %id, "volume deleted");
                Ok(Response::new(DeleteVolumeResponse {}))
            }
            Err(s) if is_not_found(&s) => Ok(Response::new(DeleteVolumeResponse {})),
            Err(s) => Err(relay(&format!("deleting volume {id}"), s)),
        }
    }

    async fn controller_publish_volume(
        &self,
        req: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(missing("volume_id", "the volume to attach"));
        }
        if r.node_id.is_empty() {
            return Err(missing("node_id", "the node to attach on"));
        }
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| missing("volume_capability", "how the volume is used"))?;
        check_capabilities(std::slice::from_ref(cap)).map_err(Status::invalid_argument)?;
        let _g = self.locks.lock(&r.volume_id).await;
        let mut c = self.client().await?;
        let nodes = c
            .list_nodes(cairn::ListNodesRequest {})
            .await
            .map_err(|s| relay("listing nodes", s))?
            .into_inner()
            .nodes;
        if !nodes.iter().any(|n| n.name == r.node_id) {
            return Err(Status::not_found(format!(
                "node_id {:?}: no such node in the Cairn cluster (see `cairnctl node list`)",
                r.node_id
            )));
        }
        let v = get_volume(&mut c, &r.volume_id).await?.ok_or_else(|| {
            Status::not_found(format!("volume_id {:?}: no such volume", r.volume_id))
        })?;
        let v = if !v.device.is_empty() && v.owner == r.node_id {
            v
        } else {
            c.attach_volume(cairn::AttachVolumeRequest {
                name: r.volume_id.clone(),
                node: r.node_id.clone(),
                force: false,
            })
            .await
            .map_err(|s| {
                relay(
                    &format!("attaching volume {} on {}", r.volume_id, r.node_id),
                    s,
                )
            })?
            .into_inner()
        };
        tracing::info!(volume = %r.volume_id, node = %r.node_id, device = %v.device, "volume published");
        Ok(Response::new(ControllerPublishVolumeResponse {
            publish_context: HashMap::from([("devicePath".to_string(), v.device.clone())]),
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(missing("volume_id", "the volume to detach"));
        }
        let _g = self.locks.lock(&r.volume_id).await;
        let mut c = self.client().await?;
        let Some(v) = get_volume(&mut c, &r.volume_id).await? else {
            return Ok(Response::new(ControllerUnpublishVolumeResponse {}));
        };
        // Attached elsewhere (it moved on) or not at all: nothing to undo.
        let here = r.node_id.is_empty() || v.owner == r.node_id;
        if !v.device.is_empty() && here {
            c.detach_volume(cairn::VolumeRef {
                name: r.volume_id.clone(),
            })
            .await
            .map_err(|s| relay(&format!("detaching volume {}", r.volume_id), s))?;
            tracing::info!(volume = %r.volume_id, node = %v.owner, "volume unpublished");
        }
        Ok(Response::new(ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(missing("volume_id", "the volume"));
        }
        if r.volume_capabilities.is_empty() {
            return Err(missing("volume_capabilities", "the capabilities to check"));
        }
        let mut c = self.client().await?;
        if get_volume(&mut c, &r.volume_id).await?.is_none() {
            return Err(Status::not_found(format!(
                "volume_id {:?}: no such volume",
                r.volume_id
            )));
        }
        Ok(Response::new(
            match check_capabilities(&r.volume_capabilities) {
                Ok(()) => ValidateVolumeCapabilitiesResponse {
                    confirmed: Some(validate_volume_capabilities_response::Confirmed {
                        volume_context: r.volume_context,
                        volume_capabilities: r.volume_capabilities,
                        parameters: r.parameters,
                        mutable_parameters: r.mutable_parameters,
                    }),
                    message: String::new(),
                },
                Err(why) => ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: why,
                },
            },
        ))
    }

    async fn list_volumes(
        &self,
        req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let r = req.into_inner();
        let mut c = self.client().await?;
        let mut volumes = c
            .list_volumes(cairn::ListVolumesRequest {})
            .await
            .map_err(|s| relay("listing volumes", s))?
            .into_inner()
            .volumes;
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        let (start, end) = paging(r.max_entries, &r.starting_token, volumes.len())?;
        let topo = topology(&mut c).await?;
        let entries = volumes[start..end]
            .iter()
            .map(|v| list_volumes_response::Entry {
                volume: Some(csi_volume(v, HashMap::new(), None, topo.clone())),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: published_nodes(v),
                    volume_condition: Some(condition(v)),
                }),
            })
            .collect();
        Ok(Response::new(ListVolumesResponse {
            entries,
            next_token: next_token(end, volumes.len()),
        }))
    }

    /// Bytes new replicas may still promise: on every schedulable disk of
    /// the nodes asked about (all without a topology), size × the
    /// over-provisioning percentage, less what its replicas hold.
    async fn get_capacity(
        &self,
        req: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let r = req.into_inner();
        check_capabilities(&r.volume_capabilities).map_err(Status::invalid_argument)?;
        VolumeParams::parse(&r.parameters)?;
        let mut c = self.client().await?;
        let percent = c
            .get_setting(cairn::SettingRef {
                name: "storage-over-provisioning-percentage".into(),
            })
            .await
            .map_err(|s| relay("reading storage-over-provisioning-percentage", s))?
            .into_inner()
            .value
            .parse::<u64>()
            .unwrap_or(100);
        let nodes = c
            .list_nodes(cairn::ListNodesRequest {})
            .await
            .map_err(|s| relay("listing nodes", s))?
            .into_inner()
            .nodes;
        let wanted = r
            .accessible_topology
            .as_ref()
            .and_then(|t| t.segments.get(crate::TOPOLOGY_KEY));
        let mut total: u64 = 0;
        let mut largest: u64 = 0;
        for n in nodes.iter().filter(|n| wanted.is_none_or(|w| *w == n.name)) {
            for d in n.disks.iter().filter(|d| d.schedulable) {
                let room =
                    (d.size as u128 * percent as u128 / 100).saturating_sub(d.allocated as u128);
                let room = room.min(u64::MAX as u128) as u64;
                total = total.saturating_add(room);
                largest = largest.max(room);
            }
        }
        Ok(Response::new(GetCapacityResponse {
            available_capacity: total.min(i64::MAX as u64) as i64,
            maximum_volume_size: Some(largest.min(i64::MAX as u64) as i64),
            minimum_volume_size: Some(params::SIZE_UNIT as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let rpcs = [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::PublishUnpublishVolume,
            rpc::Type::ListVolumes,
            rpc::Type::ListVolumesPublishedNodes,
            rpc::Type::GetCapacity,
            rpc::Type::CreateDeleteSnapshot,
            rpc::Type::ListSnapshots,
            rpc::Type::CloneVolume,
            rpc::Type::ExpandVolume,
            rpc::Type::GetVolume,
            rpc::Type::VolumeCondition,
            rpc::Type::SingleNodeMultiWriter,
        ];
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: rpcs
                .iter()
                .map(|t| ControllerServiceCapability {
                    r#type: Some(CapType::Rpc(Rpc { r#type: *t as i32 })),
                })
                .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.source_volume_id.is_empty() {
            return Err(missing("source_volume_id", "the volume to snapshot"));
        }
        let name = naming::snapshot_name(&r.name)?;
        let kind = SnapshotType::parse(&r.parameters)?;
        let _g = self.locks.lock(&format!("snapshot/{name}")).await;
        let mut c = self.client().await?;
        let volume = get_volume(&mut c, &r.source_volume_id)
            .await?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "source_volume_id {:?}: no such volume",
                    r.source_volume_id
                ))
            })?;
        let snapshot = match kind {
            SnapshotType::Snap => {
                if let Some((v, s)) = self.find_snap(&mut c, &name).await? {
                    if v.name != volume.name {
                        return Err(Status::already_exists(format!(
                            "snapshot name {:?} is taken by a snapshot of volume {}",
                            r.name, v.name
                        )));
                    }
                    snap_entry(&v, &s)
                } else {
                    let s = c
                        .create_snapshot(cairn::CreateSnapshotRequest {
                            volume: volume.name.clone(),
                            name: name.clone(),
                            labels: HashMap::new(),
                        })
                        .await
                        .map_err(|s| relay(&format!("snapshot of volume {}", volume.name), s))?
                        .into_inner();
                    tracing::info!(volume = %volume.name, snapshot = %s.name, "snapshot created");
                    snap_entry(&volume, &s)
                }
            }
            SnapshotType::Bak => {
                if let Some(b) = self.find_bak(&mut c, &name).await? {
                    if b.volume != volume.name {
                        return Err(Status::already_exists(format!(
                            "snapshot name {:?} is taken by a backup of volume {}",
                            r.name, b.volume
                        )));
                    }
                    if b.state == cairn::BackupState::Error as i32 {
                        return Err(Status::internal(format!(
                            "backup {} for snapshot {:?} failed: {}; delete the VolumeSnapshot and take it again",
                            b.handle, r.name, b.message
                        )));
                    }
                    bak_entry(&b)
                } else {
                    let b = c
                        .create_backup(cairn::CreateBackupRequest {
                            volume: volume.name.clone(),
                            snapshot: String::new(),
                            labels: HashMap::from([(
                                SNAPSHOT_NAME_LABEL.to_string(),
                                name.clone(),
                            )]),
                            no_wait: true,
                        })
                        .await
                        .map_err(|s| relay(&format!("backup of volume {}", volume.name), s))?
                        .into_inner();
                    tracing::info!(volume = %volume.name, backup = %b.handle, "backup started");
                    bak_entry(&b)
                }
            }
        };
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(Snapshot {
                size_bytes: volume.size as i64,
                ..snapshot
            }),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let id = req.into_inner().snapshot_id;
        if id.is_empty() {
            return Err(missing("snapshot_id", "the snapshot to delete"));
        }
        let _g = self.locks.lock(&id).await;
        let mut c = self.client().await?;
        let result = match SnapshotHandle::parse(&id) {
            // Not an id this driver makes: no such snapshot.
            None => Ok(()),
            Some(SnapshotHandle::Snap { volume, snapshot }) => c
                .delete_snapshot(cairn::SnapshotRef {
                    volume,
                    name: snapshot,
                })
                .await
                .map(drop),
            Some(SnapshotHandle::Bak { handle, .. }) => {
                c.delete_backup(cairn::BackupRef { handle }).await.map(drop)
            }
        };
        match result {
            Ok(()) => Ok(Response::new(DeleteSnapshotResponse {})),
            Err(s) if is_not_found(&s) => Ok(Response::new(DeleteSnapshotResponse {})),
            Err(s) => Err(relay(&format!("deleting snapshot {id}"), s)),
        }
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        let mut c = self.client().await?;
        let mut all: Vec<Snapshot> = Vec::new();
        if !r.snapshot_id.is_empty() {
            if let Some(s) = self.snapshot_by_id(&mut c, &r.snapshot_id).await? {
                if r.source_volume_id.is_empty() || s.source_volume_id == r.source_volume_id {
                    all.push(s);
                }
            }
        } else {
            let volumes = if r.source_volume_id.is_empty() {
                c.list_volumes(cairn::ListVolumesRequest {})
                    .await
                    .map_err(|s| relay("listing volumes", s))?
                    .into_inner()
                    .volumes
            } else {
                get_volume(&mut c, &r.source_volume_id)
                    .await?
                    .into_iter()
                    .collect()
            };
            for v in &volumes {
                let snaps = c
                    .list_snapshots(cairn::VolumeRef {
                        name: v.name.clone(),
                    })
                    .await
                    .map_err(|s| relay(&format!("listing snapshots of {}", v.name), s))?
                    .into_inner()
                    .snapshots;
                all.extend(snaps.iter().filter(|s| listed(s)).map(|s| snap_entry(v, s)));
            }
            // Backups, when a backup target is set (without one there are none).
            match c
                .list_backups(cairn::ListBackupsRequest {
                    volume: r.source_volume_id.clone(),
                })
                .await
            {
                Ok(list) => all.extend(list.into_inner().backups.iter().map(bak_entry)),
                Err(s) if s.code() == tonic::Code::FailedPrecondition || is_not_found(&s) => {}
                Err(s) => return Err(relay("listing backups", s)),
            }
        }
        all.sort_by(|a, b| a.snapshot_id.cmp(&b.snapshot_id));
        let (start, end) = paging(r.max_entries, &r.starting_token, all.len())?;
        let next = next_token(end, all.len());
        Ok(Response::new(ListSnapshotsResponse {
            entries: all
                .drain(start..end)
                .map(|s| list_snapshots_response::Entry { snapshot: Some(s) })
                .collect(),
            next_token: next,
        }))
    }

    async fn get_snapshot(
        &self,
        _: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        Err(Status::unimplemented(
            "GetSnapshot is not offered (capability GET_SNAPSHOT): use ListSnapshots with snapshot_id",
        ))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(missing("volume_id", "the volume to expand"));
        }
        if r.capacity_range.is_none() {
            return Err(missing("capacity_range", "the new size"));
        }
        let size = params::size_for(r.capacity_range.as_ref())?;
        let node_expansion_required = is_mount(r.volume_capability.as_ref());
        let _g = self.locks.lock(&r.volume_id).await;
        let mut c = self.client().await?;
        let v = get_volume(&mut c, &r.volume_id).await?.ok_or_else(|| {
            Status::not_found(format!("volume_id {:?}: no such volume", r.volume_id))
        })?;
        if v.size >= size {
            return Ok(Response::new(ControllerExpandVolumeResponse {
                capacity_bytes: v.size as i64,
                node_expansion_required,
            }));
        }
        let grown = c
            .expand_volume(cairn::ExpandVolumeRequest {
                name: r.volume_id.clone(),
                size,
            })
            .await
            .map_err(|s| relay(&format!("expanding volume {}", r.volume_id), s))?
            .into_inner();
        tracing::info!(volume = %r.volume_id, from = v.size, to = grown.size, "volume expanded");
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: grown.size as i64,
            node_expansion_required,
        }))
    }

    async fn controller_get_volume(
        &self,
        req: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let id = req.into_inner().volume_id;
        if id.is_empty() {
            return Err(missing("volume_id", "the volume"));
        }
        let mut c = self.client().await?;
        let v = get_volume(&mut c, &id)
            .await?
            .ok_or_else(|| Status::not_found(format!("volume_id {id:?}: no such volume")))?;
        let topo = topology(&mut c).await?;
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(csi_volume(&v, HashMap::new(), None, topo)),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: published_nodes(&v),
                volume_condition: Some(condition(&v)),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerModifyVolume is not offered (capability MODIFY_VOLUME)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(node: &str) -> Topology {
        Topology {
            segments: HashMap::from([(crate::TOPOLOGY_KEY.to_string(), node.to_string())]),
        }
    }

    #[test]
    fn the_first_consumer_node_is_the_first_preferred_topology() {
        let req = |requisite: Vec<Topology>, preferred: Vec<Topology>| TopologyRequirement {
            requisite,
            preferred,
        };
        assert_eq!(first_consumer_node(None), None);
        let both = req(vec![topo("n1"), topo("n2")], vec![topo("n2"), topo("n1")]);
        assert_eq!(first_consumer_node(Some(&both)).as_deref(), Some("n2"));
        // Immediate binding: every node is requisite, none is chosen.
        let any = req(vec![topo("n1"), topo("n2")], vec![]);
        assert_eq!(first_consumer_node(Some(&any)), None);
        let one = req(vec![topo("n3")], vec![]);
        assert_eq!(first_consumer_node(Some(&one)).as_deref(), Some("n3"));
        let other_key = req(
            vec![],
            vec![Topology {
                segments: HashMap::from([("zone".to_string(), "a".to_string())]),
            }],
        );
        assert_eq!(first_consumer_node(Some(&other_key)), None);
    }
}
