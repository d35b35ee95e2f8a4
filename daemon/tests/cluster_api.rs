//! Cluster-wide volume operations through the real API: two nodes in
//! process (each a `VolumeManager` with its replica server on loopback and
//! its gRPC server on a Unix socket). A call on the node that does not own
//! the volume is carried out by the owner and answers the same.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cairn::api::pb::cairn_client::CairnClient;
use cairn::api::pb::{self, CreateVolumeRequest, VolumeRef};
use cairn::api::{client, server};
use cairn::control::{NodeConfig, VolumeManager};
use tonic::transport::Channel;
use tonic::Code;

struct Node {
    manager: Arc<VolumeManager>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
    socket: PathBuf,
}

impl Node {
    async fn start(root: &Path, name: &str, port: u16, peers: &[String]) -> Node {
        let secret = root.join("secret");
        std::fs::write(&secret, "a-test-cluster-secret-of-32-bytes").unwrap();
        let mut c = NodeConfig::new(root.join(name));
        c.node_id = name.into();
        c.replica_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
        c.cluster_secret = Some(secret);
        c.peers = peers.to_vec();
        let manager = Arc::new(VolumeManager::open(c).await.unwrap());
        // The test's disks share the host's filesystem, whose free space is
        // not this test's business.
        manager
            .set_setting("storage-minimal-available-percentage", "0")
            .await
            .unwrap();
        let socket = root.join(format!("{name}.sock"));
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
        Node {
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
        drop(self.manager);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn vref(name: &str) -> VolumeRef {
    VolumeRef { name: name.into() }
}

fn create(name: &str) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        size: 8 << 20,
        replicas: 1,
        ..Default::default()
    }
}

async fn wait_until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    for _ in 0..150 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_volume_command_works_from_every_node() {
    let tmp = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port()];
    let peers: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let n0 = Node::start(tmp.path(), "n0", ports[0], &peers).await;
    let n1 = Node::start(tmp.path(), "n1", ports[1], &peers).await;
    let (mut c0, mut c1) = (n0.client().await, n1.client().await);
    wait_until("both nodes up", async || {
        n0.manager.nodes().await.iter().filter(|n| n.up).count() == 2
            && n1.manager.nodes().await.iter().filter(|n| n.up).count() == 2
    })
    .await;

    let made = c0.create_volume(create("db")).await.unwrap().into_inner();
    assert_eq!(made.owner, "n0");

    // list and get on the other node: the owner's view.
    let listed = c1
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .unwrap()
        .into_inner()
        .volumes;
    let db = listed.iter().find(|v| v.name == "db").expect("n1 lists db");
    assert_eq!(db.owner, "n0");
    let here = c0.get_volume(vref("db")).await.unwrap().into_inner();
    let there = c1.get_volume(vref("db")).await.unwrap().into_inner();
    assert_eq!(here, there, "get on a non-owner answers as on the owner");

    // Names are unique across the cluster; the refusal names the owner and
    // creates nothing.
    let e = c1.create_volume(create("db")).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(
        e.message().contains("already exists (owner n0)"),
        "{}",
        e.message()
    );
    assert!(n1.manager.owned_volumes().is_empty(), "n1 made a record");

    // Snapshots from the non-owner land on the owner.
    c1.create_snapshot(pb::CreateSnapshotRequest {
        volume: "db".into(),
        name: "s1".into(),
        labels: Default::default(),
    })
    .await
    .unwrap();
    let snaps = c0.list_snapshots(vref("db")).await.unwrap().into_inner();
    assert!(snaps.snapshots.iter().any(|s| s.name == "s1"));
    let snaps1 = c1.list_snapshots(vref("db")).await.unwrap().into_inner();
    assert_eq!(snaps, snaps1);

    // Errors from the owner come back with their code and text.
    let fail = |c: &mut CairnClient<Channel>| {
        let mut c = c.clone();
        async move {
            c.fail_replica(pb::FailReplicaRequest {
                volume: "db".into(),
                replica: "nope".into(),
            })
            .await
            .unwrap_err()
        }
    };
    let (e0, e1) = (fail(&mut c0).await, fail(&mut c1).await);
    assert_eq!((e1.code(), e1.message()), (e0.code(), e0.message()));
    assert_eq!(e1.code(), Code::NotFound);

    // Attach stays on the owner until volumes can move.
    let e = c1.attach_volume(vref("db")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("owned by n0"), "{}", e.message());

    // Expand from the non-owner: the owner grows both replicas, one of them
    // on n1 over the peer protocol.
    let mut two = create("wide");
    two.replicas = 2;
    c0.create_volume(two).await.unwrap();
    let grown = c1
        .expand_volume(pb::ExpandVolumeRequest {
            name: "wide".into(),
            size: 16 << 20,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.size, 16 << 20);
    assert_eq!(grown.replicas.len(), 2);
    for r in &grown.replicas {
        let rep = cairn::replica::Replica::open(Path::new(&r.dir)).unwrap();
        assert_eq!(
            rep.size(),
            16 << 20,
            "replica {} on {} grew",
            r.name,
            r.node
        );
    }
    c1.delete_volume(pb::DeleteVolumeRequest {
        name: "wide".into(),
        force: false,
    })
    .await
    .unwrap();

    // Detach and delete from the non-owner.
    c1.detach_volume(vref("db")).await.unwrap();
    c1.delete_volume(pb::DeleteVolumeRequest {
        name: "db".into(),
        force: false,
    })
    .await
    .unwrap();
    let e = c0.get_volume(vref("db")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // An owner that is gone: the other node says so and changes nothing.
    c0.create_volume(create("gone")).await.unwrap();
    wait_until("n1 learns n0 owns gone", async || {
        n1.manager.nodes().await.iter().any(|n| {
            n.report
                .as_ref()
                .is_some_and(|r| r.volumes.iter().any(|v| v == "gone"))
        })
    })
    .await;
    n0.stop().await;
    wait_until("n1 sees n0 down", async || {
        n1.manager
            .nodes()
            .await
            .iter()
            .any(|n| n.name == "n0" && !n.up)
    })
    .await;
    let e = c1.get_volume(vref("gone")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("owner n0 unreachable"),
        "{}",
        e.message()
    );
    let e = c1.create_volume(create("gone")).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let listed = c1
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .unwrap()
        .into_inner()
        .volumes;
    let gone = listed
        .iter()
        .find(|v| v.name == "gone")
        .expect("listed while away");
    assert!(
        gone.message.contains("owner n0 unreachable"),
        "{}",
        gone.message
    );
    n1.stop().await;
}
