//! The real gRPC server, in-process on a temporary Unix socket, driven with
//! the real generated client. Attaching needs the ublk driver, which hosts
//! running this suite lack; the attach path is covered by the guest e2e suite
//! (`scripts/e2e/`), and here only its refusal without the driver.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn::api::pb::cairn_client::CairnClient;
use cairn::api::pb::{
    self, CreateVolumeRequest, DeleteVolumeRequest, FailReplicaRequest, VolumeRef,
};
use cairn::api::{client, server};
use cairn::control::{NodeConfig, VolumeManager};
use tonic::transport::Channel;
use tonic::Code;

struct Daemon {
    manager: Arc<VolumeManager>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    socket: PathBuf,
}

impl Daemon {
    async fn start(root: &Path) -> Daemon {
        let mut config = NodeConfig::new(root.join("data"));
        config.node_id = "node-a".into();
        for d in ["d1", "d2"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
            config.disks.push(root.join(d));
        }
        let manager = Arc::new(VolumeManager::open(config).await.unwrap());
        // The test's disks share the host's filesystem, whose free space is
        // not this test's business (a shared CI pool may sit below the 25 %
        // storage-minimal-available rule, which refuses every expansion).
        manager
            .set_setting("storage-minimal-available-percentage", "0")
            .await
            .unwrap();
        let socket = root.join("run/cairnd.sock");
        let listener = server::bind(&socket).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let m = manager.clone();
        let served = tokio::spawn(async move {
            server::serve(listener, m, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Daemon {
            manager,
            stop: Some(tx),
            served: Some(served),
            socket,
        }
    }

    async fn client(&self) -> CairnClient<Channel> {
        client::connect(&self.socket).await.unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.served.take().unwrap().await.unwrap();
        self.manager.shutdown().await;
    }
}

fn create(name: &str, size: u64, replicas: u32) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        size,
        replicas,
        ..Default::default()
    }
}

fn vref(name: &str) -> VolumeRef {
    VolumeRef { name: name.into() }
}

fn attach_req(name: &str) -> cairn::api::pb::AttachVolumeRequest {
    cairn::api::pb::AttachVolumeRequest {
        name: name.into(),
        ..Default::default()
    }
}

/// Every path under `root` with file contents.
fn snapshot(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        if p.extension().is_some_and(|e| e == "sock") {
            continue;
        }
        if p.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            out.push((p, Vec::new()));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_lifecycle() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path()).await;
    let mut c = d.client().await;

    let v = c
        .create_volume(create("db", 8 << 20, 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (v.name.as_str(), v.state(), v.size, v.device.as_str()),
        ("db", pb::VolumeState::Detached, 8 << 20, "")
    );
    assert_eq!(v.replicas.len(), 2);
    assert_ne!(
        v.replicas[0].disk, v.replicas[1].disk,
        "replicas share a disk"
    );
    for r in &v.replicas {
        assert_eq!(
            (r.node.as_str(), r.state()),
            ("node-a", pb::ReplicaState::Healthy)
        );
        assert!(Path::new(&r.disk)
            .join("replicas")
            .join(&r.name)
            .join("volume.meta")
            .is_file());
    }
    // 0 replicas = the default, which is 2 on a two-disk node.
    let w = c
        .create_volume(create("web", 4096, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.replicas.len(), 2);

    let list = c
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .unwrap()
        .into_inner()
        .volumes;
    assert_eq!(
        list.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["db", "web"]
    );
    assert_eq!(c.get_volume(vref("db")).await.unwrap().into_inner(), v);

    let node = c
        .get_node(pb::GetNodeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.name, "node-a");
    assert_eq!(
        node.disks.iter().map(|d| d.replicas).collect::<Vec<_>>(),
        [2, 2]
    );
    assert!(node.disks.iter().all(|d| d.size > 0));

    // Delete removes the replica directories and the record.
    let dirs: Vec<PathBuf> = w
        .replicas
        .iter()
        .map(|r| Path::new(&r.disk).join("replicas").join(&r.name))
        .collect();
    assert!(dirs.iter().all(|d| d.is_dir()));
    c.delete_volume(DeleteVolumeRequest {
        name: "web".into(),
        force: false,
    })
    .await
    .unwrap();
    assert!(dirs.iter().all(|d| !d.exists()), "replica dirs left behind");
    assert!(!tmp.path().join("data/volumes/web.json").exists());
    let e = c.get_volume(vref("web")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path()).await;
    let mut c = d.client().await;
    c.create_volume(create("db", 1 << 20, 2)).await.unwrap();
    let before = snapshot(tmp.path());

    let cases = [
        (create("db", 1 << 20, 1), Code::AlreadyExists, "volume \"db\" already exists: pick another name or delete it first"),
        (create("Bad_Name", 1 << 20, 1), Code::InvalidArgument, "is not a DNS-1123 label"),
        (create("z", 0, 1), Code::InvalidArgument, "size is zero"),
        (create("u", 1000, 1), Code::InvalidArgument, "size 1000 is not a multiple of 4096 bytes: round it to e.g. 4KiB/1MiB"),
        (
            create("many", 1 << 20, 3),
            Code::ResourceExhausted,
            "volume \"many\" wants 3 replicas but this node has 2 disks: lower --replicas or start cairnd with more --disk",
        ),
    ];
    for (req, code, msg) in cases {
        let name = req.name.clone();
        let e = c.create_volume(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{name}: {e:?}");
        assert!(e.message().contains(msg), "{name}: {}", e.message());
    }
    let not_found = "volume \"nope\" not found: see `cairnctl volume list`";
    let e = c.get_volume(vref("nope")).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::NotFound, not_found));
    let e = c.attach_volume(attach_req("nope")).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::NotFound, not_found));
    let e = c.detach_volume(vref("nope")).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::NotFound, not_found));
    let e = c
        .delete_volume(DeleteVolumeRequest {
            name: "nope".into(),
            force: true,
        })
        .await
        .unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::NotFound, not_found));
    let e = c
        .fail_replica(FailReplicaRequest {
            volume: "db".into(),
            replica: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        e.message().contains("has no replica named \"nope\""),
        "{}",
        e.message()
    );

    if Path::new("/dev/ublk-control").exists() {
        eprintln!("this host has ublk: the driver-missing refusal is not checked here");
    } else {
        let e = c.attach_volume(attach_req("db")).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert_eq!(
            e.message(),
            "ublk driver not available: load it with `modprobe ublk_drv`, kernel 6.0 or newer"
        );
        let v = c.get_volume(vref("db")).await.unwrap().into_inner();
        assert_eq!(
            (v.state(), v.device.as_str(), v.revision),
            (pb::VolumeState::Detached, "", 0)
        );
    }
    assert_eq!(
        snapshot(tmp.path()),
        before,
        "a refused request changed the data dir or disks"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_replica_and_records_survive_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path()).await;
    let mut c = d.client().await;
    let v = c
        .create_volume(create("db", 1 << 20, 2))
        .await
        .unwrap()
        .into_inner();
    let (r0, r1) = (v.replicas[0].name.clone(), v.replicas[1].name.clone());
    let v = c
        .fail_replica(FailReplicaRequest {
            volume: "db".into(),
            replica: r1.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.replicas[1].state(), pb::ReplicaState::Failed);
    assert_eq!(v.replicas[0].state(), pb::ReplicaState::Healthy);
    assert_eq!(v.state(), pb::VolumeState::Detached);
    let e = c
        .fail_replica(FailReplicaRequest {
            volume: "db".into(),
            replica: r0.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("last healthy replica"),
        "{}",
        e.message()
    );
    c.create_volume(create("logs", 4096, 1)).await.unwrap();
    let before = c
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .unwrap()
        .into_inner();
    drop(c);
    d.stop().await;

    let d = Daemon::start(tmp.path()).await;
    let mut c = d.client().await;
    let after = c
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after, before);
    assert_eq!(after.volumes[0].replicas[1].message, "failed by operator");
    d.stop().await;
}

#[tokio::test]
async fn unreachable_socket_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("absent.sock");
    let e = client::connect(&path).await.err().unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "cannot reach cairnd at {}: is it running? (start it with cairnd, or pass --socket)",
            path.display()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_volume_expands_and_bad_sizes_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path()).await;
    let mut c = d.client().await;
    c.create_volume(create("db", 8 << 20, 2)).await.unwrap();
    let before = snapshot(tmp.path());
    let expand = |size: u64| pb::ExpandVolumeRequest {
        name: "db".into(),
        size,
    };
    let cases = [
        (
            expand(4 << 20),
            Code::InvalidArgument,
            "expand grows a volume",
        ),
        (
            expand(8 << 20),
            Code::InvalidArgument,
            "give a size larger than that",
        ),
        (
            expand((16 << 20) + 1),
            Code::InvalidArgument,
            "not a multiple of 4096",
        ),
        (
            expand(1 << 60),
            Code::ResourceExhausted,
            "has no room for replica",
        ),
        (
            pb::ExpandVolumeRequest {
                name: "nope".into(),
                size: 16 << 20,
            },
            Code::NotFound,
            "not found",
        ),
    ];
    for (req, code, msg) in cases {
        let size = req.size;
        let e = c.expand_volume(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{size}: {e:?}");
        assert!(e.message().contains(msg), "{size}: {}", e.message());
    }
    assert_eq!(
        snapshot(tmp.path()),
        before,
        "a refused expand changed files"
    );

    let v = c
        .expand_volume(expand(16 << 20))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.size, 16 << 20);
    for r in &v.replicas {
        let rep = cairn::replica::Replica::open(Path::new(&r.dir)).unwrap();
        assert_eq!(rep.size(), 16 << 20, "replica {} grew", r.name);
    }
    let again = c.get_volume(vref("db")).await.unwrap().into_inner();
    assert_eq!(again.size, 16 << 20);
    d.stop().await;
}
