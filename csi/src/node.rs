//! The CSI Node service: stages a volume attached on this node (formats a
//! blank device, mounts it, grows the filesystem to the device), publishes
//! it to pods (bind mounts), reports usage, grows filesystems, and says
//! who this node is.
//!
//! Paths: a mount volume is mounted at the staging path; a block volume is
//! bind-mounted onto the file `<staging>/<volume id>`. Publishing bind-mounts
//! those onto the target path (a directory for mounts, a file for block),
//! which unpublishing unmounts and removes. Every call checks its arguments
//! first and is idempotent; calls for one volume run one at a time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cairn_api::pb as cairn;
use tonic::{Request, Response, Status};

use crate::cairnd::{is_not_found, relay, Cairnd};
use crate::locks::KeyedLocks;
use crate::mounts::{self, Mount};
use crate::pb::node_server::Node;
use crate::pb::node_service_capability::{rpc, Rpc, Type as CapType};
use crate::pb::volume_capability::AccessType;
use crate::pb::*;

pub struct NodeService {
    node_id: String,
    cairnd: Cairnd,
    locks: KeyedLocks,
}

impl NodeService {
    /// The volume as cairnd reports it, or `NOT_FOUND`.
    async fn volume(&self, volume_id: &str) -> Result<cairn::Volume, Status> {
        let mut c = self.cairnd.client().await?;
        match c
            .get_volume(cairn::VolumeRef {
                name: volume_id.to_string(),
            })
            .await
        {
            Ok(v) => Ok(v.into_inner()),
            Err(s) if is_not_found(&s) => Err(Status::not_found(format!(
                "volume_id {volume_id:?}: no such volume"
            ))),
            Err(s) => Err(relay(&format!("volume {volume_id}"), s)),
        }
    }

    pub(crate) fn new(node_id: &str, cairnd: Cairnd) -> NodeService {
        NodeService {
            node_id: node_id.to_string(),
            cairnd,
            locks: KeyedLocks::default(),
        }
    }

    /// The volume's device here, or `FAILED_PRECONDITION` when it is not
    /// attached on this node (ControllerPublishVolume attaches it).
    async fn device(&self, volume_id: &str) -> Result<(String, cairn::Volume), Status> {
        let v = self.volume(volume_id).await?;
        if v.device.is_empty() || v.owner != self.node_id {
            let where_ = if v.device.is_empty() {
                "is not attached".to_string()
            } else {
                format!("is attached on {}", v.owner)
            };
            return Err(Status::failed_precondition(format!(
                "volume {volume_id} {where_}, not on this node {}: ControllerPublishVolume attaches it here",
                self.node_id
            )));
        }
        Ok((v.device.clone(), v))
    }
}

fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("{field} is missing"))
}

enum Kind<'a> {
    Block,
    Mount { fs: &'a str, flags: &'a [String] },
}

fn kind_of(cap: Option<&VolumeCapability>) -> Result<Kind<'_>, Status> {
    let cap = cap.ok_or_else(|| missing("volume_capability"))?;
    if cap.access_mode.is_none() {
        return Err(missing("volume_capability.access_mode"));
    }
    match &cap.access_type {
        Some(AccessType::Block(_)) => Ok(Kind::Block),
        Some(AccessType::Mount(m)) => {
            let fs = if m.fs_type.is_empty() {
                "ext4"
            } else {
                m.fs_type.as_str()
            };
            if !matches!(fs, "ext4" | "xfs") {
                return Err(Status::invalid_argument(format!(
                    "volume_capability.mount.fs_type {fs:?} is not supported: use ext4 or xfs"
                )));
            }
            Ok(Kind::Mount {
                fs,
                flags: &m.mount_flags,
            })
        }
        None => Err(missing("volume_capability.access_type")),
    }
}

/// The file a block volume is bind-mounted onto under its staging path.
fn block_file(staging: &Path, volume_id: &str) -> PathBuf {
    staging.join(volume_id)
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> Status {
    let (what, path) = (what.to_string(), path.display().to_string());
    move |e| Status::internal(format!("{what} {path}: {e}"))
}

/// Whether the mount at `m` shows `device` (a whole-device mount, or a bind
/// of the device node itself).
fn shows_device(m: &Mount, device: &str) -> bool {
    m.source == device || m.root.ends_with(device.trim_start_matches("/dev"))
}

async fn unmount_if_mounted(path: &Path) -> Result<(), Status> {
    while mounts::mount_at(path)?.is_some() {
        mounts::run("umount", &[&path.display().to_string()]).await?;
    }
    Ok(())
}

async fn bind(from: &str, to: &Path, readonly: bool, flags: &[String]) -> Result<(), Status> {
    let to_s = to.display().to_string();
    mounts::run("mount", &["--bind", from, &to_s]).await?;
    let mut opts: Vec<String> = vec!["remount".into(), "bind".into()];
    if readonly {
        opts.push("ro".into());
    }
    opts.extend(flags.iter().cloned());
    if opts.len() > 2 {
        if let Err(e) = mounts::run("mount", &["-o", &opts.join(","), &to_s]).await {
            let _ = mounts::run("umount", &[&to_s]).await;
            return Err(e);
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(missing("volume_id"));
        }
        if r.staging_target_path.is_empty() {
            return Err(missing("staging_target_path"));
        }
        let kind = kind_of(r.volume_capability.as_ref())?;
        let staging = PathBuf::from(&r.staging_target_path);
        let _g = self.locks.lock(&r.volume_id).await;
        let (device, _) = self.device(&r.volume_id).await?;
        std::fs::create_dir_all(&staging).map_err(io("creating", &staging))?;
        match kind {
            Kind::Block => {
                let file = block_file(&staging, &r.volume_id);
                if let Some(m) = mounts::mount_at(&file)? {
                    if shows_device(&m, &device) {
                        return Ok(Response::new(NodeStageVolumeResponse {}));
                    }
                    return Err(Status::already_exists(format!(
                        "{} is staged from {}, not {device}",
                        file.display(),
                        m.source
                    )));
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&file)
                    .map_err(io("creating", &file))?;
                bind(&device, &file, false, &[]).await?;
            }
            Kind::Mount { fs, flags } => {
                if let Some(m) = mounts::mount_at(&staging)? {
                    if m.source == device {
                        return Ok(Response::new(NodeStageVolumeResponse {}));
                    }
                    return Err(Status::already_exists(format!(
                        "staging_target_path {} has {} mounted, not {device}",
                        staging.display(),
                        m.source
                    )));
                }
                match mounts::filesystem_on(&device).await? {
                    None => {
                        let extra = r
                            .volume_context
                            .get(crate::controller::MKFS_PARAMS_CONTEXT)
                            .map(String::as_str)
                            .unwrap_or("");
                        mounts::format(&device, fs, extra).await?;
                        tracing::info!(volume = %r.volume_id, %device, fs, "formatted");
                    }
                    Some(found) if found == fs => {}
                    Some(found) => {
                        return Err(Status::failed_precondition(format!(
                            "volume {} holds a {found} filesystem; the capability asks for {fs}: use fs_type {found}",
                            r.volume_id
                        )))
                    }
                }
                let mut opts: Vec<String> = flags.to_vec();
                if fs == "xfs" {
                    // A clone and its source carry one UUID; both may be
                    // mounted on one node.
                    opts.push("nouuid".into());
                }
                let staging_s = staging.display().to_string();
                let mut args: Vec<&str> = vec!["-t", fs];
                let joined = opts.join(",");
                if !opts.is_empty() {
                    args.extend(["-o", &joined]);
                }
                args.extend([device.as_str(), &staging_s]);
                mounts::run("mount", &args).await?;
                // Restores and clones into larger volumes never get a
                // NodeExpandVolume: fill the device now.
                if let Err(e) = mounts::grow(fs, &device, &staging).await {
                    let _ = mounts::run("umount", &[&staging_s]).await;
                    return Err(e);
                }
            }
        }
        tracing::info!(volume = %r.volume_id, staging = %staging.display(), "staged");
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(missing("volume_id"));
        }
        if r.staging_target_path.is_empty() {
            return Err(missing("staging_target_path"));
        }
        let staging = PathBuf::from(&r.staging_target_path);
        let _g = self.locks.lock(&r.volume_id).await;
        let file = block_file(&staging, &r.volume_id);
        unmount_if_mounted(&file).await?;
        if file.exists() {
            std::fs::remove_file(&file).map_err(io("removing", &file))?;
        }
        unmount_if_mounted(&staging).await?;
        tracing::info!(volume = %r.volume_id, staging = %staging.display(), "unstaged");
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(missing("volume_id"));
        }
        if r.staging_target_path.is_empty() {
            return Err(missing("staging_target_path"));
        }
        if r.target_path.is_empty() {
            return Err(missing("target_path"));
        }
        let kind = kind_of(r.volume_capability.as_ref())?;
        let staging = PathBuf::from(&r.staging_target_path);
        let target = PathBuf::from(&r.target_path);
        let _g = self.locks.lock(&r.volume_id).await;
        if mounts::mount_at(&target)?.is_some() {
            return Ok(Response::new(NodePublishVolumeResponse {}));
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        match kind {
            Kind::Block => {
                let file = block_file(&staging, &r.volume_id);
                if mounts::mount_at(&file)?.is_none() {
                    return Err(Status::failed_precondition(format!(
                        "volume {} is not staged at {}: NodeStageVolume first",
                        r.volume_id,
                        staging.display()
                    )));
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&target)
                    .map_err(io("creating", &target))?;
                bind(&file.display().to_string(), &target, r.readonly, &[]).await?;
            }
            Kind::Mount { flags, .. } => {
                if mounts::mount_at(&staging)?.is_none() {
                    return Err(Status::failed_precondition(format!(
                        "volume {} is not staged at {}: NodeStageVolume first",
                        r.volume_id,
                        staging.display()
                    )));
                }
                std::fs::create_dir_all(&target).map_err(io("creating", &target))?;
                bind(&staging.display().to_string(), &target, r.readonly, flags).await?;
            }
        }
        tracing::info!(volume = %r.volume_id, target = %target.display(), readonly = r.readonly, "published");
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(missing("volume_id"));
        }
        if r.target_path.is_empty() {
            return Err(missing("target_path"));
        }
        let target = PathBuf::from(&r.target_path);
        let _g = self.locks.lock(&r.volume_id).await;
        unmount_if_mounted(&target).await?;
        match std::fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(&target).map_err(io("removing", &target))?,
            Ok(_) => std::fs::remove_file(&target).map_err(io("removing", &target))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("reading", &target)(e)),
        }
        tracing::info!(volume = %r.volume_id, target = %target.display(), "unpublished");
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(missing("volume_id"));
        }
        if r.volume_path.is_empty() {
            return Err(missing("volume_path"));
        }
        let path = PathBuf::from(&r.volume_path);
        let meta = std::fs::metadata(&path)
            .map_err(|e| Status::not_found(format!("volume_path {}: {e}", path.display())))?;
        let v = self.volume(&r.volume_id).await?;
        let usage = if meta.is_dir() {
            if mounts::mount_at(&path)?.is_none() {
                return Err(Status::not_found(format!(
                    "volume_path {}: volume {} is not mounted there",
                    path.display(),
                    r.volume_id
                )));
            }
            let u = mounts::fs_usage(&path)?;
            vec![
                VolumeUsage {
                    available: u.available as i64,
                    total: u.total as i64,
                    used: u.used as i64,
                    unit: volume_usage::Unit::Bytes as i32,
                },
                VolumeUsage {
                    available: u.inodes_free as i64,
                    total: u.inodes as i64,
                    used: u.inodes.saturating_sub(u.inodes_free) as i64,
                    unit: volume_usage::Unit::Inodes as i32,
                },
            ]
        } else {
            vec![VolumeUsage {
                available: 0,
                total: mounts::block_size_of(&path)? as i64,
                used: 0,
                unit: volume_usage::Unit::Bytes as i32,
            }]
        };
        Ok(Response::new(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(crate::controller::condition(&v)),
        }))
    }

    async fn node_expand_volume(
        &self,
        req: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(missing("volume_id"));
        }
        if r.volume_path.is_empty() {
            return Err(missing("volume_path"));
        }
        let path = PathBuf::from(&r.volume_path);
        let _g = self.locks.lock(&r.volume_id).await;
        let (device, _) = self.device(&r.volume_id).await?;
        let bytes = mounts::block_size_of(Path::new(&device))?;
        if matches!(kind_of(r.volume_capability.as_ref()), Ok(Kind::Block)) {
            return Ok(Response::new(NodeExpandVolumeResponse {
                capacity_bytes: bytes as i64,
            }));
        }
        let m = mounts::mount_at(&path)?.ok_or_else(|| {
            Status::not_found(format!(
                "volume_path {}: nothing is mounted there",
                path.display()
            ))
        })?;
        mounts::grow(&m.fstype, &device, &path).await?;
        tracing::info!(volume = %r.volume_id, bytes, "filesystem grown");
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: bytes as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let rpcs = [
            rpc::Type::StageUnstageVolume,
            rpc::Type::GetVolumeStats,
            rpc::Type::ExpandVolume,
            rpc::Type::VolumeCondition,
        ];
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: rpcs
                .iter()
                .map(|t| NodeServiceCapability {
                    r#type: Some(CapType::Rpc(Rpc { r#type: *t as i32 })),
                })
                .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(Topology {
                segments: HashMap::from([(crate::TOPOLOGY_KEY.to_string(), self.node_id.clone())]),
            }),
        }))
    }
}
