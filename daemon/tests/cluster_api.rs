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

fn attach(name: &str, node: &str) -> pb::AttachVolumeRequest {
    pb::AttachVolumeRequest {
        name: name.into(),
        node: node.into(),
        force: false,
    }
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

    // Attach on a node moves the volume there, but not on a host without
    // the ublk driver: the refusal comes before anything moves.
    let e = c1.attach_volume(attach("db", "")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    let e = c0.attach_volume(attach("db", "n1")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert_eq!(n0.manager.owned_volumes(), vec!["db".to_string()]);
    assert!(n1.manager.owned_volumes().is_empty());
    let e = c0.attach_volume(attach("db", "n9")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());

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
        n1.manager
            .nodes()
            .await
            .iter()
            .any(|n| n.report.as_ref().is_some_and(|r| r.owns("gone")))
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

/// The record file of volume `name` on node `node` under `root`.
fn record_file(root: &Path, node: &str, name: &str) -> PathBuf {
    root.join(node).join("volumes").join(format!("{name}.json"))
}

fn record_json(root: &Path, node: &str, name: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(record_file(root, node, name)).unwrap()).unwrap()
}

/// Two nodes up, and n0 owning "db" with a replica on each.
async fn two_nodes_with_db() -> (tempfile::TempDir, [u16; 2], Vec<String>, Node, Node) {
    let tmp = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port()];
    let peers: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let n0 = Node::start(tmp.path(), "n0", ports[0], &peers).await;
    let n1 = Node::start(tmp.path(), "n1", ports[1], &peers).await;
    wait_until("both nodes up", async || {
        n0.manager.nodes().await.iter().filter(|n| n.up).count() == 2
            && n1.manager.nodes().await.iter().filter(|n| n.up).count() == 2
    })
    .await;
    let mut two = create("db");
    two.replicas = 2;
    n0.client().await.create_volume(two).await.unwrap();
    (tmp, ports, peers, n0, n1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_handed_over_moves_its_record_and_term_and_the_replicas_follow_the_new_owner() {
    let (tmp, _, _, n0, n1) = two_nodes_with_db().await;
    let mut c1 = n1.client().await;
    assert_eq!(record_json(tmp.path(), "n0", "db")["owner_term"], 1);

    n1.manager.acquire("db", false).await.unwrap();
    assert_eq!(n1.manager.owned_volumes(), vec!["db".to_string()]);
    assert!(n0.manager.owned_volumes().is_empty(), "n0 still reports db");
    assert!(
        !record_file(tmp.path(), "n0", "db").exists(),
        "the old owner forgot its record"
    );
    let rec = record_json(tmp.path(), "n1", "db");
    assert_eq!(rec["owner_term"], 2, "{rec}");
    for r in rec["replicas"].as_array().unwrap() {
        let local = r["addr"].as_str().unwrap().is_empty();
        assert_eq!(
            local,
            r["node"] == "n1",
            "addresses seen from the new owner: {r}"
        );
    }
    let v = c1.get_volume(vref("db")).await.unwrap().into_inner();
    assert_eq!(v.owner, "n1");
    assert!(v
        .replicas
        .iter()
        .all(|r| r.state == pb::ReplicaState::Healthy as i32));

    // The new owner claims the replicas at its term (a detached snapshot
    // claims the remote one; the local one is used directly); from then on
    // a claim at the old term is refused.
    c1.create_snapshot(pb::CreateSnapshotRequest {
        volume: "db".into(),
        name: "s1".into(),
        labels: Default::default(),
    })
    .await
    .unwrap();
    for r in v.replicas.iter().filter(|r| r.node == "n0") {
        let rep = cairn::replica::Replica::open(Path::new(&r.dir)).unwrap();
        assert_eq!(rep.owner_term(), cairn::replica::OwnerTerm::new(2, "n1"));
        let old = cairn::replica::Claim::Takeover {
            owner: cairn::replica::OwnerTerm::new(1, "n0"),
        };
        let e = rep.claim(old).unwrap_err().to_string();
        assert!(e.contains("taken over by node n1 at term 2"), "{e}");
    }

    // Moving back works the same way and goes one term up again.
    n0.manager.acquire("db", false).await.unwrap();
    assert_eq!(record_json(tmp.path(), "n0", "db")["owner_term"], 3);
    assert!(n1.manager.owned_volumes().is_empty());
    n0.stop().await;
    n1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_takeover_fails_the_old_owners_replica_and_the_old_owner_drops_its_record() {
    let (tmp, ports, peers, n0, n1) = two_nodes_with_db().await;
    let mut c1 = n1.client().await;
    wait_until("n1 knows where db's replicas are", async || {
        n1.manager.owner("db").await != cairn::control::forward::Owner::Unknown
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

    // Without --force: refused as unavailable, nothing changed.
    let e = c1.attach_volume(attach("db", "")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    let e = n1
        .manager
        .acquire("db", false)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("owner n0 unreachable"), "{e}");
    assert!(e.contains("--force"), "{e}");
    assert!(n1.manager.owned_volumes().is_empty());

    n1.manager.acquire("db", true).await.unwrap();
    let v = c1.get_volume(vref("db")).await.unwrap().into_inner();
    assert_eq!(v.owner, "n1");
    assert_eq!(
        v.replicas.len(),
        2,
        "the old owner's replica is known: {v:?}"
    );
    for r in &v.replicas {
        let want = if r.node == "n1" {
            pb::ReplicaState::Healthy
        } else {
            pb::ReplicaState::Failed
        };
        assert_eq!(r.state, want as i32, "{r:?}");
    }
    assert_eq!(record_json(tmp.path(), "n1", "db")["owner_term"], 2);

    // The old owner comes back with its record of term 1: it sees n1 own
    // the volume at term 2 and drops its record instead of claiming.
    let n0 = Node::start(tmp.path(), "n0", ports[0], &peers).await;
    wait_until("n0 drops its stale record", async || {
        n0.manager.owned_volumes().is_empty() && !record_file(tmp.path(), "n0", "db").exists()
    })
    .await;
    let v0 = n0
        .client()
        .await
        .get_volume(vref("db"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v0.owner, "n1");
    n0.stop().await;
    n1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_created_for_a_named_node_is_owned_there_with_a_replica_there() {
    let (tmp, _, _, n0, n1) = two_nodes_with_db().await;
    let mut c0 = n0.client().await;

    // Asked on n0 for n1: n1 makes it, owns it, and keeps its one replica.
    let mut near = create("near");
    near.node = "n1".into();
    let v = c0.create_volume(near).await.unwrap().into_inner();
    assert_eq!(v.owner, "n1");
    assert_eq!(v.replicas.len(), 1);
    assert_eq!(v.replicas[0].node, "n1", "{v:?}");
    assert!(record_file(tmp.path(), "n1", "near").exists());
    assert!(!record_file(tmp.path(), "n0", "near").exists());

    // For this node itself: made here, as without a node.
    let mut here = create("here");
    here.node = "n0".into();
    let v = c0.create_volume(here).await.unwrap().into_inner();
    assert_eq!(
        (v.owner.as_str(), v.replicas[0].node.as_str()),
        ("n0", "n0")
    );

    // Two replicas for n1: one on n1, the other on n0 (anti-affinity).
    let mut two = create("two");
    two.node = "n1".into();
    two.replicas = 2;
    let v = c0.create_volume(two).await.unwrap().into_inner();
    let mut nodes: Vec<_> = v.replicas.iter().map(|r| r.node.as_str()).collect();
    nodes.sort();
    assert_eq!((v.owner.as_str(), nodes), ("n1", vec!["n0", "n1"]));

    // A node that is not a member: NOT_FOUND, and nothing is made.
    let mut nowhere = create("nowhere");
    nowhere.node = "n9".into();
    let e = c0.create_volume(nowhere).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    assert!(e.message().contains("n9"), "{}", e.message());
    // A copy is made where its source is: a node with a source is refused.
    let mut copy = create("copy");
    copy.node = "n1".into();
    copy.from_volume = "db".into();
    let e = c0.create_volume(copy).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    let names = |m: &VolumeManager| {
        let mut v = m.owned_volumes();
        v.sort();
        v
    };
    assert_eq!(names(&n0.manager), vec!["db", "here"]);
    assert_eq!(names(&n1.manager), vec!["near", "two"]);
    n0.stop().await;
    n1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unschedulable_node_or_disk_takes_no_new_replicas_and_the_rule_survives_a_restart() {
    let (tmp, ports, peers, n0, n1) = two_nodes_with_db().await;
    let mut c0 = n0.client().await;
    let schedule = |allow: bool, disks: &[&str]| pb::SetNodeSchedulingRequest {
        allow_scheduling: allow,
        unschedulable_disks: disks.iter().map(|d| d.to_string()).collect(),
    };
    let node = c0
        .get_node(pb::GetNodeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(node.allow_scheduling && node.unschedulable_disks.is_empty());
    assert!(node.disks.iter().all(|d| d.schedulable), "{node:?}");
    let disk = node.disks[0].path.clone();

    // An unknown disk: refused with the disks there are, nothing changes.
    let e = c0
        .set_node_scheduling(schedule(false, &["/no/such/disk"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(
        e.message().contains("/no/such/disk") && e.message().contains(&disk),
        "{}",
        e.message()
    );
    let same = c0
        .get_node(pb::GetNodeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(same.allow_scheduling);

    // The disk unschedulable: said so, on this node and to its peer.
    let n = c0
        .set_node_scheduling(schedule(true, &[&disk]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.unschedulable_disks, std::slice::from_ref(&disk));
    assert!(n.disks.iter().all(|d| !d.schedulable), "{n:?}");
    let mut c1 = n1.client().await;
    wait_until("n1 sees n0's disk unschedulable", async || {
        let nodes = c1
            .list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
        nodes
            .iter()
            .find(|m| m.name == "n0")
            .is_some_and(|m| !m.disks.is_empty() && m.disks.iter().all(|d| !d.schedulable))
    })
    .await;

    // New replicas go elsewhere, from either node; none fit twice.
    for (c, name) in [(&mut c0, "from-n0"), (&mut c1, "from-n1")] {
        let v = c.create_volume(create(name)).await.unwrap().into_inner();
        assert_eq!(v.replicas.len(), 1);
        assert_eq!(v.replicas[0].node, "n1", "{v:?}");
    }
    let mut two = create("two");
    two.replicas = 2;
    let e = c0.create_volume(two).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(!record_file(tmp.path(), "n0", "two").exists());

    // The replicas there stay and may grow: db (one replica on n0) expands.
    let v = c0
        .expand_volume(pb::ExpandVolumeRequest {
            name: "db".into(),
            size: 16 << 20,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.size, 16 << 20);
    assert!(v.replicas.iter().any(|r| r.node == "n0"), "{v:?}");

    // The whole node off, then restarted: the rule is kept.
    c0.set_node_scheduling(schedule(false, &[])).await.unwrap();
    drop(c0);
    n0.stop().await;
    let n0 = Node::start(tmp.path(), "n0", ports[0], &peers).await;
    let mut c0 = n0.client().await;
    let n = c0
        .get_node(pb::GetNodeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!n.allow_scheduling, "the rule survived the restart: {n:?}");
    assert!(n.disks.iter().all(|d| !d.schedulable));

    // And scheduling allowed again: two replicas fit.
    c0.set_node_scheduling(schedule(true, &[])).await.unwrap();
    let mut two = create("two");
    two.replicas = 2;
    wait_until("n1 up again for n0", async || {
        n0.manager.nodes().await.iter().filter(|n| n.up).count() == 2
    })
    .await;
    let v = c0.create_volume(two).await.unwrap().into_inner();
    assert_eq!(v.replicas.len(), 2);
    drop(c0);
    drop(c1);
    n0.stop().await;
    n1.stop().await;
}
