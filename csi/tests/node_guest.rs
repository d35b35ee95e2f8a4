//! The CSI conformance suite, guest part: the Node calls for real — a
//! volume attached as /dev/ublkbN, formatted, mounted, bind-mounted, read
//! back after a detach, snapshotted, cloned and grown. Needs the ublk
//! driver and root, so every test is `#[ignore]` on the host; the guest
//! suite runs them (`scripts/e2e/22-csi.sh` runs this binary with
//! `--ignored`).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_csi::pb::volume_capability::access_mode::Mode;
use cairn_csi::pb::*;
use common::pod::*;
use common::*;
use tonic::Code;

const GUEST: &str = "needs /dev/ublkbN and root: run in the guest by scripts/e2e/22-csi.sh";

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
            node: "node-a".into(),
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
        node: "node-a".into(),
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
            node: "node-a".into(),
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
        node: "node-a".into(),
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
    assert_eq!(pod.node_expand(&staging, 128 * MIB).await, 128 * MIB);
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
        node: "node-a".into(),
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

/// s3s-fs on 127.0.0.1 (`CAIRN_S3S_FS`, or the one `scripts/s3-server.sh
/// install` puts under target/tools), killed on drop.
struct S3Server {
    child: Child,
    port: u16,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const S3_ACCESS: &str = "velero-access";
const S3_SECRET: &str = "velero-secret-key";

impl S3Server {
    fn start(root: &Path) -> S3Server {
        let bin = std::env::var_os("CAIRN_S3S_FS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/bin/s3s-fs")
            });
        assert!(
            bin.exists(),
            "{} not found: run scripts/s3-server.sh install (or set CAIRN_S3S_FS)",
            bin.display()
        );
        std::fs::create_dir_all(root.join("velero")).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_ACCESS, "--secret-key", S3_SECRET])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(child.try_wait().unwrap().is_none(), "s3s-fs exited");
            assert!(Instant::now() < deadline, "s3s-fs did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        S3Server { child, port }
    }
}

/// Velero's CSI backup and a StatefulSet's static restore, through the CSI
/// calls alone, against a real S3 server (s3s-fs, SigV4): CreateSnapshot
/// with the default type (a backup) polled until `ready_to_use`, the source
/// volume deleted, CreateVolume from the snapshot with its `size_bytes`
/// (Velero's `restoreSize`) holding the same data; then static PVs: a
/// volume restored from the backup under a chosen name by cairnd and one
/// by the StorageClass parameter `fromBackup`, each staged by its
/// `volumeHandle` with the same data. DeleteSnapshot removes the backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs /dev/ublkbN and root: run in the guest by scripts/e2e/22-csi.sh"]
async fn velero_backup_and_static_restores_against_s3() {
    let env = Env::start().await;
    let root = env._tmp.path().to_path_buf();
    let s3 = S3Server::start(&root.join("s3"));
    let creds = root.join("s3-credentials.env");
    std::fs::write(
        &creds,
        format!(
            "AWS_ACCESS_KEY_ID={S3_ACCESS}\nAWS_SECRET_ACCESS_KEY={S3_SECRET}\nAWS_ENDPOINTS=http://127.0.0.1:{}\n",
            s3.port
        ),
    )
    .unwrap();
    let mut cairn = env.cairn().await;
    for (name, value) in [
        (
            "backup-target-credential-secret",
            creds.display().to_string(),
        ),
        ("backup-target", "s3://velero@us-east-1/cluster-a/".into()),
    ] {
        cairn
            .set_setting(cairn_api::pb::SetSettingRequest {
                name: name.into(),
                value,
            })
            .await
            .unwrap();
    }
    let (mut c, mut n) = (env.controller().await, env.node().await);
    let data = pattern(21, 2 << 20);
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let src = create(&mut c, "pvc-app", 64, None).await;
    let (staging, target) = dirs(&root, "pvc-app", false);
    let mut pod = Pod {
        c: &mut c,
        n: &mut n,
        node: "node-a".into(),
        id: src.clone(),
        cap: cap.clone(),
        staging,
        target,
    };
    pod.up(false).await;
    pod.write(&data);
    pod.down().await;

    // Velero: CreateSnapshot (VolumeSnapshotClass without `type`), then the
    // snapshotter calls again until the upload is done.
    let req = CreateSnapshotRequest {
        source_volume_id: src.clone(),
        name: "velero-pvc-app-x7k2p".into(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(120);
    let mut first_id = String::new();
    let snap = loop {
        let s = c
            .create_snapshot(req.clone())
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        if first_id.is_empty() {
            first_id = s.snapshot_id.clone();
            assert!(first_id.starts_with("bak://"), "{first_id}");
        }
        assert_eq!(s.snapshot_id, first_id, "a retry made another backup");
        if s.ready_to_use {
            break s;
        }
        assert!(Instant::now() < deadline, "backup not ready within 120 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(snap.size_bytes, 64 * MIB, "restoreSize");
    println!(
        "[22-csi] velero: backup {} ready after {:.2}s",
        snap.snapshot_id,
        t0.elapsed().as_secs_f64()
    );
    assert!(
        walk(&root.join("s3/velero/cluster-a/backupstore"))
            .iter()
            .any(|p| p.ends_with("volume.cfg")),
        "nothing was uploaded to the S3 bucket"
    );
    // The cluster is lost: the source volume goes.
    delete(&mut c, &src).await;

    // Velero's restore: a PVC from the VolumeSnapshot, sized restoreSize.
    use volume_content_source::{SnapshotSource, Type};
    let mut req = create_req("pvc-app-restored", snap.size_bytes);
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Type::Snapshot(SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    });
    let mut restored = String::new();
    for _ in 0..2 {
        let v = c
            .create_volume(req.clone())
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(v.capacity_bytes, 64 * MIB);
        restored = v.volume_id;
    }

    // Static PVs: one volume restored by cairnd under a chosen name, one by
    // a StorageClass with fromBackup.
    cairn
        .create_volume(cairn_api::pb::CreateVolumeRequest {
            name: "data-db-0".into(),
            from_backup: snap.snapshot_id.clone(),
            replicas: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut req = create_req("pvc-from-backup", 64 * MIB);
    req.parameters
        .insert("fromBackup".into(), snap.snapshot_id.clone());
    let from_param = c
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    for id in [&restored, &"data-db-0".to_string(), &from_param] {
        let (staging, target) = dirs(&root, id, false);
        let mut pod = Pod {
            c: &mut c,
            n: &mut n,
            node: "node-a".into(),
            id: id.clone(),
            cap: cap.clone(),
            staging,
            target,
        };
        pod.up(false).await;
        assert_eq!(
            pod.read(data.len()),
            data,
            "{id}: data differs from the backup"
        );
        pod.down().await;
        println!("[22-csi] velero: {id} restored from S3, data equal");
    }

    for _ in 0..2 {
        c.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
    }
    let left = snapshots_by_id(&mut c, &snap.snapshot_id).await;
    assert!(left.is_empty(), "the backup is still listed: {left:?}");
    for id in [&restored, &"data-db-0".to_string(), &from_param] {
        delete(&mut c, id).await;
    }
    assert!(env.volume_names().await.is_empty());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Online expansion through the CSI calls, on whichever kernel the guest
/// runs: with UBLK_F_UPDATE_SIZE (7.3) ControllerExpandVolume grows the
/// published, mounted volume (node expansion required), NodeExpandVolume on
/// the pod's path grows the mounted ext4, the data stays; without it (6.12)
/// ControllerExpandVolume is FAILED_PRECONDITION naming the kernel, and the
/// volume keeps its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs /dev/ublkbN and root: run in the guest by scripts/e2e/22-csi.sh"]
async fn online_expansion_through_the_csi_calls() {
    let env = Env::start().await;
    let root = env._tmp.path().to_path_buf();
    let online = env.online_expansion().await;
    let (mut c, mut n) = (env.controller().await, env.node().await);
    let data = pattern(33, 2 << 20);
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let id = create(&mut c, "pvc-grow-live", 64, None).await;
    let (staging, target) = dirs(&root, "pvc-grow-live", false);
    let mut pod = Pod {
        c: &mut c,
        n: &mut n,
        node: "node-a".into(),
        id: id.clone(),
        cap: cap.clone(),
        staging,
        target: target.clone(),
    };
    pod.up(false).await;
    pod.write(&data);
    let expand = ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: 160 * MIB,
            limit_bytes: 0,
        }),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    let t0 = Instant::now();
    let r = pod.c.controller_expand_volume(expand.clone()).await;
    if !online {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
        assert!(e.message().contains("6.16"), "{}", e.message());
        assert!(
            pod.stats().await[0].total <= 64 * MIB,
            "the refused growth changed the filesystem"
        );
        pod.down().await;
        delete(&mut c, &id).await;
        println!(
            "[22-csi] online expansion on this kernel: refused ({})",
            e.message()
        );
        return;
    }
    let r = r.unwrap().into_inner();
    assert_eq!(r.capacity_bytes, 160 * MIB);
    assert!(r.node_expansion_required, "a mounted filesystem must grow");
    // The external-resizer retries: the same answer.
    let again = pod
        .c
        .controller_expand_volume(expand)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.capacity_bytes, 160 * MIB);
    assert_eq!(pod.node_expand(&target, 160 * MIB).await, 160 * MIB);
    let took = t0.elapsed().as_secs_f64();
    let total = pod.stats().await[0].total;
    assert!(
        total > 130 * MIB,
        "the mounted filesystem did not grow ({total} bytes)"
    );
    assert_eq!(pod.read(data.len()), data, "data changed across the growth");
    pod.write(&pattern(34, 100 << 20));
    pod.down().await;
    pod.up(false).await;
    assert_eq!(pod.read(100 << 20), pattern(34, 100 << 20));
    pod.down().await;
    delete(&mut c, &id).await;
    println!(
        "[22-csi] online expansion 64 -> 160 MiB while mounted: ControllerExpand + NodeExpand {took:.2}s, ext4 {} MiB, 100 MiB written and read back after a re-attach",
        total >> 20
    );
}
