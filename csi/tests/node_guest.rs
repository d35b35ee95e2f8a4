//! The CSI conformance suite, guest part: the Node calls for real — a
//! volume attached as /dev/ublkbN, formatted, mounted, bind-mounted, read
//! back after a detach, snapshotted, cloned and grown. Needs the ublk
//! driver and root, so every test is `#[ignore]` on the host; the guest
//! suite runs them (`scripts/e2e/22-csi.sh` runs this binary with
//! `--ignored`).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use cairn_csi::pb::controller_client::ControllerClient;
use cairn_csi::pb::node_client::NodeClient;
use cairn_csi::pb::volume_capability::access_mode::Mode;
use cairn_csi::pb::*;
use common::*;
use tonic::transport::Channel;
use tonic::Code;

const GUEST: &str = "needs /dev/ublkbN and root: run in the guest by scripts/e2e/22-csi.sh";

/// A volume as a pod on this node uses it.
struct Pod<'a> {
    c: &'a mut ControllerClient<Channel>,
    n: &'a mut NodeClient<Channel>,
    id: String,
    cap: VolumeCapability,
    staging: PathBuf,
    target: PathBuf,
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

impl Pod<'_> {
    fn is_block(&self) -> bool {
        matches!(
            self.cap.access_type,
            Some(volume_capability::AccessType::Block(_))
        )
    }

    /// ControllerPublish, NodeStage, NodePublish: each twice.
    async fn up(&mut self, readonly: bool) -> String {
        let mut device = String::new();
        for _ in 0..2 {
            let r = self
                .c
                .controller_publish_volume(ControllerPublishVolumeRequest {
                    volume_id: self.id.clone(),
                    node_id: "node-a".into(),
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
    async fn down(&mut self) {
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
                    node_id: "node-a".into(),
                    secrets: HashMap::new(),
                })
                .await
                .unwrap();
        }
    }

    fn write(&self, data: &[u8]) {
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

    fn read(&self, len: usize) -> Vec<u8> {
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

    async fn stats(&mut self) -> Vec<VolumeUsage> {
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

fn dirs(root: &Path, name: &str, block: bool) -> (PathBuf, PathBuf) {
    let staging = root.join("plugins/staging").join(name);
    let target = root
        .join("pods")
        .join(name)
        .join(if block { "dev" } else { "mount" });
    (staging, target)
}

async fn create(
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

async fn delete(c: &mut ControllerClient<Channel>, id: &str) {
    for _ in 0..2 {
        c.delete_volume(DeleteVolumeRequest {
            volume_id: id.into(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
    }
}

/// The whole flow for ext4 and xfs mount volumes and a block volume: every
/// call twice, data written through the pod's path, stats, a read-only
/// second publish refusing writes, and the data read back after a detach.
/// Prints the CreateVolume → NodePublish time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs /dev/ublkbN and root: run in the guest by scripts/e2e/22-csi.sh"]
async fn mount_and_block_volumes_through_the_node_calls() {
    let _ = GUEST;
    let env = Env::start().await;
    let root = env._tmp.path().to_path_buf();
    let (mut c, mut n) = (env.controller().await, env.node().await);
    let data = pattern(7, 1 << 20);
    for kind in ["ext4", "xfs", "block"] {
        let name = format!("pvc-{kind}");
        let t0 = Instant::now();
        // mkfs.xfs wants more than 300 MB.
        let mib = if kind == "xfs" { 320 } else { 64 };
        let id = create(&mut c, &name, mib, None).await;
        let cap = if kind == "block" {
            block_cap()
        } else {
            mount_cap(kind, Mode::SingleNodeWriter)
        };
        let (staging, target) = dirs(&root, &name, kind == "block");
        let mut pod = Pod {
            c: &mut c,
            n: &mut n,
            id: id.clone(),
            cap,
            staging,
            target,
        };
        let device = pod.up(false).await;
        println!("[22-csi] {kind}: CreateVolume -> NodePublishVolume (every call twice) {:.2}s on {device}", t0.elapsed().as_secs_f64());
        pod.write(&data);
        let usage = pod.stats().await;
        if kind == "block" {
            assert_eq!(usage[0].total, 64 * MIB);
        } else {
            assert_eq!(usage.len(), 2, "bytes and inodes");
            assert!(
                usage[0].used >= 1 << 20 && usage[0].total > 32 * MIB,
                "{usage:?}"
            );
            assert!(usage[1].total > 0);
        }
        // A read-only second publish of the same staged volume.
        if kind != "block" {
            let ro = pod.target.with_file_name("ro");
            pod.n
                .node_publish_volume(NodePublishVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: pod.staging.display().to_string(),
                    target_path: ro.display().to_string(),
                    volume_capability: Some(pod.cap.clone()),
                    readonly: true,
                    ..Default::default()
                })
                .await
                .unwrap();
            assert_eq!(std::fs::read(ro.join("data")).unwrap(), data);
            let e = std::fs::File::create(ro.join("other")).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
            pod.n
                .node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: ro.display().to_string(),
                })
                .await
                .unwrap();
            assert!(!ro.exists());
        }
        pod.down().await;
        // Detached and back: the data is there (the filesystem is not
        // formatted again).
        pod.up(false).await;
        assert_eq!(pod.read(data.len()), data, "{kind}: data after a detach");
        pod.down().await;
        delete(&mut c, &id).await;
        println!("[22-csi] {kind}: written, stats, read-only publish, detach, read back: ok");
    }
    assert!(env.volume_names().await.is_empty());
}

/// A volume from a `snap` snapshot and a clone, both larger than their
/// source (the filesystem grows at staging), equal data; an offline
/// ControllerExpandVolume then NodeStage grows the filesystem;
/// NodeExpandVolume on a staged volume; staging an xfs volume as ext4 is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs /dev/ublkbN and root: run in the guest by scripts/e2e/22-csi.sh"]
async fn snapshots_clones_and_growth_through_the_node_calls() {
    let env = Env::start().await;
    let root = env._tmp.path().to_path_buf();
    let (mut c, mut n) = (env.controller().await, env.node().await);
    let data = pattern(9, 3 << 20);
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let src = create(&mut c, "src", 64, None).await;
    let (staging, target) = dirs(&root, "src", false);
    let mut pod = Pod {
        c: &mut c,
        n: &mut n,
        id: src.clone(),
        cap: cap.clone(),
        staging,
        target,
    };
    pod.up(false).await;
    pod.write(&data);
    pod.down().await;
    let snap = c
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: src.clone(),
            name: "snapshot-src-1".into(),
            parameters: HashMap::from([("type".into(), "snap".into())]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    use volume_content_source::{SnapshotSource, Type, VolumeSource};
    let restored = create(
        &mut c,
        "restored",
        96,
        Some(Type::Snapshot(SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    )
    .await;
    let cloned = create(
        &mut c,
        "cloned",
        96,
        Some(Type::Volume(VolumeSource {
            volume_id: src.clone(),
        })),
    )
    .await;
    for id in [&restored, &cloned] {
        let (staging, target) = dirs(&root, id, false);
        let mut pod = Pod {
            c: &mut c,
            n: &mut n,
            id: id.clone(),
            cap: cap.clone(),
            staging,
            target,
        };
        pod.up(false).await;
        assert_eq!(
            pod.read(data.len()),
            data,
            "{id}: data differs from the source"
        );
        let total = pod.stats().await[0].total;
        assert!(
            total > 80 * MIB,
            "{id}: filesystem not grown to the 96 MiB device ({total} bytes)"
        );
        pod.down().await;
        println!(
            "[22-csi] {id}: equal to its source, filesystem grown to {} MiB",
            total >> 20
        );
    }

    // Offline expansion, then staging grows the filesystem.
    let r = c
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: src.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 128 * MIB);
    assert!(r.node_expansion_required);
    let (staging, target) = dirs(&root, "src", false);
    let mut pod = Pod {
        c: &mut c,
        n: &mut n,
        id: src.clone(),
        cap: cap.clone(),
        staging: staging.clone(),
        target,
    };
    pod.up(false).await;
    let total = pod.stats().await[0].total;
    assert!(
        total > 100 * MIB,
        "filesystem not grown after the expansion ({total} bytes)"
    );
    let grown = pod
        .n
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: src.clone(),
            volume_path: staging.display().to_string(),
            capacity_range: Some(CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 128 * MIB);
    assert_eq!(pod.read(data.len()), data);
    pod.down().await;
    println!(
        "[22-csi] offline expansion 64 -> 128 MiB: filesystem {} MiB after staging, data intact",
        total >> 20
    );

    // The source holds ext4: staging it as xfs is refused, nothing mounted.
    let xfs = mount_cap("xfs", Mode::SingleNodeWriter);
    let (staging, target) = dirs(&root, "wrongfs", false);
    let mut pod = Pod {
        c: &mut c,
        n: &mut n,
        id: src.clone(),
        cap: xfs,
        staging: staging.clone(),
        target,
    };
    pod.c
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: src.clone(),
            node_id: "node-a".into(),
            volume_capability: Some(pod.cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let e = pod
        .n
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: src.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(pod.cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("ext4"), "{}", e.message());
    pod.down().await;

    for id in [&restored, &cloned, &src] {
        delete(&mut c, id).await;
    }
    assert!(env.volume_names().await.is_empty());
}
