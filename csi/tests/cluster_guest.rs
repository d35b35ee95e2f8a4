//! The CSI driver on a 3-node cluster, in the guest: ControllerPublish to
//! another node is the mobility handover (design 0007), and the data
//! follows the volume. `scripts/e2e/23-csi-cluster.sh` starts the three
//! cairnd (each in its network namespace, peers authenticated) and runs
//! this binary with `--ignored`, naming their sockets in
//! `CAIRN_CSI_CLUSTER=n1=SOCK,n2=SOCK,n3=SOCK`. One driver (mode `all`)
//! per node is served in this process, as the DaemonSet would run them;
//! the controller calls go to whichever node's driver the test picks, as
//! the controller Deployment may run on any node.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use cairn_csi::pb::controller_client::ControllerClient;
use cairn_csi::pb::node_client::NodeClient;
use cairn_csi::pb::volume_capability::access_mode::Mode;
use cairn_csi::pb::*;
use common::pod::*;
use common::*;
use tonic::transport::Channel;
use tonic::Code;

struct ClusterNode {
    name: String,
    cairnd_socket: PathBuf,
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn cluster(root: &std::path::Path) -> Vec<ClusterNode> {
    let spec = std::env::var("CAIRN_CSI_CLUSTER").expect(
        "CAIRN_CSI_CLUSTER=n1=SOCK,n2=SOCK,n3=SOCK (scripts/e2e/23-csi-cluster.sh sets it)",
    );
    let mut nodes = Vec::new();
    for entry in spec.split(',') {
        let (name, socket) = entry.split_once('=').expect("NAME=SOCKET");
        let cairnd_socket = PathBuf::from(socket);
        let csi_socket = root.join(format!("csi-{name}/csi.sock"));
        let stop = start_driver(&cairnd_socket, name, &csi_socket).await;
        let channel = csi_channel(&csi_socket).await;
        nodes.push(ClusterNode {
            name: name.into(),
            cairnd_socket,
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
            _stop: stop,
        });
    }
    assert_eq!(nodes.len(), 3, "three nodes expected: {spec}");
    nodes
}

async fn owner_of(node: &ClusterNode, volume: &str) -> String {
    cairn_api::connect(&node.cairnd_socket)
        .await
        .unwrap()
        .get_volume(cairn_api::pb::VolumeRef {
            name: volume.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .owner
}

/// ControllerPublish moves the volume: written through a pod on n1, staged
/// on n2 (published from n1's controller) with the same bytes; while it is
/// mounted on n2, publishing on n3 is FAILED_PRECONDITION and changes
/// nothing; an unknown node is NOT_FOUND; once unstaged on n2 it moves to
/// n3 (published from n3's own controller), data intact, and is written
/// there. NodeGetInfo names each node as cairnd does (the topology).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a 3-node cluster in the guest: run by scripts/e2e/23-csi-cluster.sh"]
async fn controller_publish_moves_the_volume_between_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let mut nodes = cluster(&root).await;
    for n in nodes.iter_mut() {
        let info = n
            .node
            .node_get_info(NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.node_id, n.name);
        let topo = info.accessible_topology.unwrap().segments;
        assert_eq!(topo["kubernetes.io/hostname"], n.name);
    }
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let mut req = create_req("pvc-moving", 64 * MIB);
    req.parameters.insert("numberOfReplicas".into(), "3".into());
    let id = nodes[0]
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let first = pattern(3, 4 << 20);
    let second = pattern(4, 1 << 20);

    let mut c1 = nodes[0].controller.clone();
    let (mut c3, mut n1, mut n2, mut n3) = (
        nodes[2].controller.clone(),
        nodes[0].node.clone(),
        nodes[1].node.clone(),
        nodes[2].node.clone(),
    );
    let (staging, target) = dirs(&root.join("n1"), &id, false);
    let mut pod = Pod {
        c: &mut c1,
        n: &mut n1,
        node: "n1".into(),
        id: id.clone(),
        cap: cap.clone(),
        staging,
        target,
    };
    pod.up(false).await;
    pod.write(&first);
    pod.down().await;
    println!(
        "[23-csi-cluster] written on n1 (owner {})",
        owner_of(&nodes[0], &id).await
    );

    let (staging, target) = dirs(&root.join("n2"), &id, false);
    let mut on_n2 = Pod {
        c: &mut c1,
        n: &mut n2,
        node: "n2".into(),
        id: id.clone(),
        cap: cap.clone(),
        staging,
        target,
    };
    let device = on_n2.up(false).await;
    assert_eq!(
        on_n2.read(first.len()),
        first,
        "the data did not follow the volume to n2"
    );
    assert_eq!(owner_of(&nodes[0], &id).await, "n2");
    println!("[23-csi-cluster] published on n2 from n1's controller: {device}, data equal");

    // Mounted on n2: n3 is refused, nothing moves.
    let e = on_n2
        .c
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "n3".into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("in use"), "{}", e.message());
    assert_eq!(owner_of(&nodes[2], &id).await, "n2");
    assert_eq!(on_n2.read(first.len()), first);
    println!(
        "[23-csi-cluster] publish on n3 while mounted on n2: {}",
        e.message()
    );
    let e = on_n2
        .c
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "n9".into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    on_n2.down().await;

    let (staging, target) = dirs(&root.join("n3"), &id, false);
    let mut on_n3 = Pod {
        c: &mut c3,
        n: &mut n3,
        node: "n3".into(),
        id: id.clone(),
        cap: cap.clone(),
        staging,
        target,
    };
    on_n3.up(false).await;
    assert_eq!(
        on_n3.read(first.len()),
        first,
        "the data did not follow the volume to n3"
    );
    on_n3.write(&second);
    on_n3.down().await;
    assert_eq!(owner_of(&nodes[1], &id).await, "n3");
    println!("[23-csi-cluster] published on n3 from n3's controller, data equal, written");

    // And back to n1, with n3's write.
    let (staging, target) = dirs(&root.join("n1b"), &id, false);
    let mut back = Pod {
        c: &mut c1,
        n: &mut n1,
        node: "n1".into(),
        id: id.clone(),
        cap,
        staging,
        target,
    };
    back.up(false).await;
    assert_eq!(back.read(second.len()), second, "n3's write is not on n1");
    back.down().await;
    for _ in 0..2 {
        nodes[1]
            .controller
            .delete_volume(DeleteVolumeRequest {
                volume_id: id.clone(),
                secrets: HashMap::new(),
            })
            .await
            .unwrap();
    }
    println!("[23-csi-cluster] back on n1 with n3's data; deleted from n2's controller");
}

/// StorageClass `dataLocality: best-effort` with the topology a
/// `WaitForFirstConsumer` claim carries (the pod's node first among the
/// preferred): the controller on n1 has the volume made on n3, which owns
/// it and holds one of its replicas, so the pod's reads there are local. A
/// pod on n3 then uses it without a handover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a 3-node cluster in the guest: run by scripts/e2e/23-csi-cluster.sh"]
async fn best_effort_locality_places_a_replica_on_the_first_consumers_node() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let mut nodes = cluster(&root).await;
    let topo = |n: &str| Topology {
        segments: HashMap::from([("kubernetes.io/hostname".to_string(), n.to_string())]),
    };
    let mut req = create_req("pvc-local", 32 * MIB);
    req.parameters.insert("numberOfReplicas".into(), "2".into());
    req.parameters
        .insert("dataLocality".into(), "best-effort".into());
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![topo("n1"), topo("n2"), topo("n3")],
        preferred: vec![topo("n3"), topo("n1"), topo("n2")],
    });
    let id = nodes[0]
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let v = cairn_api::connect(&nodes[0].cairnd_socket)
        .await
        .unwrap()
        .get_volume(cairn_api::pb::VolumeRef { name: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.owner, "n3", "{v:?}");
    assert_eq!(v.replicas.len(), 2);
    assert!(v.replicas.iter().any(|r| r.node == "n3"), "{v:?}");
    println!(
        "[23-csi-cluster] best-effort: made on n3 from n1's controller, replicas on {:?}",
        v.replicas
            .iter()
            .map(|r| r.node.as_str())
            .collect::<Vec<_>>()
    );

    let data = pattern(5, 1 << 20);
    let (mut c1, mut n3) = (nodes[0].controller.clone(), nodes[2].node.clone());
    let (staging, target) = dirs(&root.join("n3"), &id, false);
    let mut pod = Pod {
        c: &mut c1,
        n: &mut n3,
        node: "n3".into(),
        id: id.clone(),
        cap: mount_cap("ext4", Mode::SingleNodeWriter),
        staging,
        target,
    };
    pod.up(false).await;
    pod.write(&data);
    assert_eq!(pod.read(data.len()), data);
    pod.down().await;
    assert_eq!(owner_of(&nodes[0], &id).await, "n3");
    nodes[1]
        .controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: id,
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
    nodes.clear();
}
