//! A volume used the way a pod uses it: the Controller and Node calls
//! around it, each twice, and its data written and read through the pod's
//! path (a file in a mount volume, the device file of a block volume).
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use cairn_csi::pb::controller_client::ControllerClient;
use cairn_csi::pb::node_client::NodeClient;
use cairn_csi::pb::*;
use tonic::transport::Channel;

use super::{create_req, MIB};

/// A volume as a pod on one node uses it.
pub struct Pod<'a> {
    pub c: &'a mut ControllerClient<Channel>,
    pub n: &'a mut NodeClient<Channel>,
    /// The node the pod runs on (ControllerPublish's node_id).
    pub node: String,
    pub id: String,
    pub cap: VolumeCapability,
    pub staging: PathBuf,
    pub target: PathBuf,
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

impl Pod<'_> {
    pub fn is_block(&self) -> bool {
        matches!(
            self.cap.access_type,
            Some(volume_capability::AccessType::Block(_))
        )
    }

    /// ControllerPublish, NodeStage, NodePublish: each twice.
    pub async fn up(&mut self, readonly: bool) -> String {
        let mut device = String::new();
        for _ in 0..2 {
            let r = self
                .c
                .controller_publish_volume(ControllerPublishVolumeRequest {
                    volume_id: self.id.clone(),
                    node_id: self.node.clone(),
                    volume_capability: Some(self.cap.clone()),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            device = r.publish_context["devicePath"].clone();
            assert!(device.starts_with("/dev/ublkb"), "{device}");
        }
        for _ in 0..2 {
            self.n
                .node_stage_volume(NodeStageVolumeRequest {
                    volume_id: self.id.clone(),
                    publish_context: HashMap::from([("devicePath".into(), device.clone())]),
                    staging_target_path: self.staging.display().to_string(),
                    volume_capability: Some(self.cap.clone()),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        for _ in 0..2 {
            self.n
                .node_publish_volume(NodePublishVolumeRequest {
                    volume_id: self.id.clone(),
                    staging_target_path: self.staging.display().to_string(),
                    target_path: self.target.display().to_string(),
                    volume_capability: Some(self.cap.clone()),
                    readonly,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        device
    }

    /// NodeUnpublish, NodeUnstage, ControllerUnpublish: each twice; the
    /// target path is gone afterwards.
    pub async fn down(&mut self) {
        for _ in 0..2 {
            self.n
                .node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id: self.id.clone(),
                    target_path: self.target.display().to_string(),
                })
                .await
                .unwrap();
        }
        assert!(
            !self.target.exists(),
            "{} left behind",
            self.target.display()
        );
        for _ in 0..2 {
            self.n
                .node_unstage_volume(NodeUnstageVolumeRequest {
                    volume_id: self.id.clone(),
                    staging_target_path: self.staging.display().to_string(),
                })
                .await
                .unwrap();
        }
        for _ in 0..2 {
            self.c
                .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                    volume_id: self.id.clone(),
                    node_id: self.node.clone(),
                    secrets: HashMap::new(),
                })
                .await
                .unwrap();
        }
    }

    pub fn write(&self, data: &[u8]) {
        if self.is_block() {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.target)
                .unwrap();
            f.seek(SeekFrom::Start(0)).unwrap();
            f.write_all(data).unwrap();
            f.sync_all().unwrap();
        } else {
            let mut f = std::fs::File::create(self.target.join("data")).unwrap();
            f.write_all(data).unwrap();
            f.sync_all().unwrap();
        }
    }

    pub fn read(&self, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        if self.is_block() {
            std::fs::File::open(&self.target)
                .unwrap()
                .read_exact(&mut out)
                .unwrap();
        } else {
            out = std::fs::read(self.target.join("data")).unwrap();
        }
        out
    }

    /// NodeExpandVolume on `path` (the staging or the target path) to
    /// `bytes`; the capacity it answers.
    pub async fn node_expand(&mut self, path: &Path, bytes: i64) -> i64 {
        self.n
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: self.id.clone(),
                volume_path: path.display().to_string(),
                capacity_range: Some(CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capability: Some(self.cap.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .capacity_bytes
    }

    pub async fn stats(&mut self) -> Vec<VolumeUsage> {
        let r = self
            .n
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: self.id.clone(),
                volume_path: self.target.display().to_string(),
                staging_target_path: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!r.volume_condition.unwrap().abnormal);
        r.usage
    }
}

pub fn dirs(root: &Path, name: &str, block: bool) -> (PathBuf, PathBuf) {
    let staging = root.join("plugins/staging").join(name);
    let target = root
        .join("pods")
        .join(name)
        .join(if block { "dev" } else { "mount" });
    (staging, target)
}

pub async fn create(
    c: &mut ControllerClient<Channel>,
    name: &str,
    mib: i64,
    source: Option<volume_content_source::Type>,
) -> String {
    let mut req = create_req(name, mib * MIB);
    req.volume_content_source = source.map(|t| VolumeContentSource { r#type: Some(t) });
    let mut id = String::new();
    for _ in 0..2 {
        id = c
            .create_volume(req.clone())
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
    }
    id
}

pub async fn delete(c: &mut ControllerClient<Channel>, id: &str) {
    for _ in 0..2 {
        c.delete_volume(DeleteVolumeRequest {
            volume_id: id.into(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
    }
}
