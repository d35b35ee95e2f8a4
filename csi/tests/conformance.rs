//! The CSI conformance suite, host part: the cases of kubernetes-csi's
//! `csi-sanity` for the Identity and Controller services (and the Node
//! calls that need no device), ported to Rust. A real `cairnd` child process
//! (the workspace's built binary) on a temporary socket and disks, the
//! driver served in process on its own socket, and a tonic client over that
//! socket — the path the sidecars take.
//!
//! Each test names the csi-sanity case(s) it ports in its doc comment.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cairn_csi::pb::identity_client::IdentityClient;
use cairn_csi::pb::volume_capability::access_mode::Mode;
use cairn_csi::pb::*;
use common::*;
use tonic::Code;

/// Identity: "GetPluginInfo: should return appropriate values", "Probe:
/// should return appropriate information", "GetPluginCapabilities: should
/// return appropriate capabilities"; and Probe failing once cairnd is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_info_capabilities_and_probe() {
    let mut env = Env::start().await;
    let mut id = IdentityClient::new(env.channel().await);
    let info = id
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.cairn.io");
    assert_eq!(info.vendor_version, cairn_csi::VERSION);
    let caps = id
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    use plugin_capability::{service::Type as S, Type};
    let services: Vec<i32> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert!(services.contains(&(S::ControllerService as i32)));
    assert!(services.contains(&(S::VolumeAccessibilityConstraints as i32)));
    // Expansion follows the node's kernel (online needs UBLK_F_UPDATE_SIZE).
    let online = env.online_expansion().await;
    use plugin_capability::volume_expansion::Type as X;
    let want = if online { X::Online } else { X::Offline };
    assert!(
        caps.iter().any(|c| matches!(&c.r#type,
            Some(Type::VolumeExpansion(e)) if e.r#type == want as i32)),
        "expansion capability is not {want:?}: {caps:?}"
    );
    let ready = id.probe(ProbeRequest {}).await.unwrap().into_inner().ready;
    assert_eq!(ready, Some(true));
    env.cairnd.kill().unwrap();
    env.cairnd.wait().unwrap();
    expect_err(
        id.probe(ProbeRequest {}).await,
        Code::FailedPrecondition,
        "cairnd",
    );
}

/// Node: "NodeGetInfo: should return appropriate values", "NodeGetCapabilities:
/// should return appropriate capabilities"; NodeStageVolume "should fail when
/// no volume id is provided", "should fail when no staging target path is
/// provided", "should fail when no volume capability is provided";
/// NodePublishVolume "should fail when no volume id is provided", "should
/// fail when no target path is provided", "should fail when no volume
/// capability is provided"; NodeUnpublishVolume "should fail when no volume
/// id is provided", "should fail when no target path is provided";
/// NodeGetVolumeStats "should fail when no volume id is provided", "should
/// fail when no volume path is provided", "should fail when volume is not
/// found", "should fail when volume does not exist on the specified path";
/// and staging a volume not attached here is FAILED_PRECONDITION. (Staging
/// for real mounts /dev/ublkbN: `tests/node_guest.rs`, in the guest.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_info_capabilities_and_argument_checks() {
    let env = Env::start().await;
    let mut node = env.node().await;
    let info = node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "node-a");
    let topo = info.accessible_topology.unwrap().segments;
    assert_eq!(
        topo.get("kubernetes.io/hostname").map(String::as_str),
        Some("node-a")
    );
    let caps = node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    use node_service_capability::{rpc::Type as R, Type};
    let rpcs: Vec<i32> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(Type::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect();
    for want in [
        R::StageUnstageVolume,
        R::GetVolumeStats,
        R::ExpandVolume,
        R::VolumeCondition,
    ] {
        assert!(
            rpcs.contains(&(want as i32)),
            "{want:?} missing from {rpcs:?}"
        );
    }

    env.controller()
        .await
        .create_volume(create_req("pvc-n", 8 * MIB))
        .await
        .unwrap();
    let tmp = env._tmp.path().to_path_buf();
    let staging = tmp.join("staging").display().to_string();
    let target = tmp.join("target").display().to_string();
    let stage = |vol: &str, path: &str, cap: Option<VolumeCapability>| NodeStageVolumeRequest {
        volume_id: vol.into(),
        staging_target_path: path.into(),
        volume_capability: cap,
        ..Default::default()
    };
    let mount = || Some(mount_cap("ext4", Mode::SingleNodeWriter));
    expect_err(
        node.node_stage_volume(stage("", &staging, mount())).await,
        Code::InvalidArgument,
        "volume_id",
    );
    expect_err(
        node.node_stage_volume(stage("pvc-n", "", mount())).await,
        Code::InvalidArgument,
        "staging_target_path",
    );
    expect_err(
        node.node_stage_volume(stage("pvc-n", &staging, None)).await,
        Code::InvalidArgument,
        "volume_capability",
    );
    expect_err(
        node.node_stage_volume(stage(
            "pvc-n",
            &staging,
            Some(mount_cap("btrfs", Mode::SingleNodeWriter)),
        ))
        .await,
        Code::InvalidArgument,
        "btrfs",
    );
    expect_err(
        node.node_stage_volume(stage("ghost", &staging, mount()))
            .await,
        Code::NotFound,
        "ghost",
    );
    expect_err(
        node.node_stage_volume(stage("pvc-n", &staging, mount()))
            .await,
        Code::FailedPrecondition,
        "not attached",
    );

    let publish =
        |vol: &str, target: &str, cap: Option<VolumeCapability>| NodePublishVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: staging.clone(),
            target_path: target.into(),
            volume_capability: cap,
            ..Default::default()
        };
    expect_err(
        node.node_publish_volume(publish("", &target, mount()))
            .await,
        Code::InvalidArgument,
        "volume_id",
    );
    expect_err(
        node.node_publish_volume(publish("pvc-n", "", mount()))
            .await,
        Code::InvalidArgument,
        "target_path",
    );
    expect_err(
        node.node_publish_volume(publish("pvc-n", &target, None))
            .await,
        Code::InvalidArgument,
        "volume_capability",
    );
    expect_err(
        node.node_publish_volume(publish("pvc-n", &target, mount()))
            .await,
        Code::FailedPrecondition,
        "not staged",
    );

    let unpublish = |vol: &str, target: &str| NodeUnpublishVolumeRequest {
        volume_id: vol.into(),
        target_path: target.into(),
    };
    expect_err(
        node.node_unpublish_volume(unpublish("", &target)).await,
        Code::InvalidArgument,
        "volume_id",
    );
    expect_err(
        node.node_unpublish_volume(unpublish("pvc-n", "")).await,
        Code::InvalidArgument,
        "target_path",
    );
    // Nothing there: already unpublished.
    node.node_unpublish_volume(unpublish("pvc-n", &target))
        .await
        .unwrap();
    node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: "pvc-n".into(),
        staging_target_path: staging.clone(),
    })
    .await
    .unwrap();

    let stats = |vol: &str, path: &str| NodeGetVolumeStatsRequest {
        volume_id: vol.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    };
    expect_err(
        node.node_get_volume_stats(stats("", &target)).await,
        Code::InvalidArgument,
        "volume_id",
    );
    expect_err(
        node.node_get_volume_stats(stats("pvc-n", "")).await,
        Code::InvalidArgument,
        "volume_path",
    );
    expect_err(
        node.node_get_volume_stats(stats("pvc-n", "/no/such/path"))
            .await,
        Code::NotFound,
        "/no/such/path",
    );
    std::fs::create_dir_all(&target).unwrap();
    expect_err(
        node.node_get_volume_stats(stats("ghost", &target)).await,
        Code::NotFound,
        "ghost",
    );
    expect_err(
        node.node_get_volume_stats(stats("pvc-n", &target)).await,
        Code::NotFound,
        "not mounted",
    );
}

/// Controller: "ControllerGetCapabilities: should return appropriate
/// capabilities"; CreateVolume "should fail when no name is provided",
/// "should fail when no volume capabilities are provided", "should return
/// appropriate values SingleNodeWriter NoCapacity", "should return
/// appropriate values SingleNodeWriter WithCapacity 1Gi", "should not fail
/// when requesting to create a volume with already existing name and same
/// capacity", "should fail when requesting to create a volume with already
/// existing name and different capacity", "should not fail when creating
/// volume with maximum-length name"; DeleteVolume "should fail when no
/// volume id is provided", "should succeed when an invalid volume id is
/// used", "should return appropriate values (no optional values added)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_and_delete_volumes() {
    let env = Env::start().await;
    let mut c = env.controller().await;
    let caps = c
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    assert!(caps.len() >= 10, "{caps:?}");

    expect_err(
        c.create_volume(create_req("", MIB)).await,
        Code::InvalidArgument,
        "name",
    );
    let mut no_caps = create_req("v", MIB);
    no_caps.volume_capabilities.clear();
    expect_err(
        c.create_volume(no_caps).await,
        Code::InvalidArgument,
        "volume_capabilities",
    );
    let mut multi = create_req("v", MIB);
    multi.volume_capabilities = vec![mount_cap("ext4", Mode::MultiNodeMultiWriter)];
    expect_err(
        c.create_volume(multi).await,
        Code::InvalidArgument,
        "MULTI_NODE_MULTI_WRITER",
    );
    let mut fs = create_req("v", MIB);
    fs.volume_capabilities = vec![mount_cap("btrfs", Mode::SingleNodeWriter)];
    expect_err(c.create_volume(fs).await, Code::InvalidArgument, "btrfs");
    let mut range = create_req("v", 10 * MIB);
    range.capacity_range.as_mut().unwrap().limit_bytes = 5 * MIB;
    expect_err(
        c.create_volume(range).await,
        Code::OutOfRange,
        "limit_bytes",
    );
    for (k, v) in [
        ("numberOfReplicas", "x"),
        ("dataLocality", "strict-local"),
        ("nope", "1"),
    ] {
        let mut bad = create_req("v", MIB);
        bad.parameters.insert(k.into(), v.into());
        expect_err(c.create_volume(bad).await, Code::InvalidArgument, k);
    }
    let mut jobs = create_req("v", MIB);
    jobs.parameters.insert(
        "recurringJobs".into(),
        r#"[{"name":"s","task":"snapshot","cron":"61 * * * *","retain":1}]"#.into(),
    );
    let e = c.create_volume(jobs).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(
        env.volume_names().await.is_empty(),
        "a refused create made a volume"
    );

    // No capacity: the default size.
    let mut none = create_req("pvc-default", 0);
    none.capacity_range = None;
    let v = c
        .create_volume(none)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, 1 << 30);
    assert_eq!(v.volume_id, "pvc-default");
    assert!(!v.accessible_topology.is_empty());

    let name = "pvc-3f2a8c1e-1b2c-4d5e-8f90-123456789abc";
    let v = c
        .create_volume(create_req(name, 5 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.volume_id, name);
    assert_eq!(v.capacity_bytes, 6 * MIB, "rounded up to whole 2 MiB");
    let again = c
        .create_volume(create_req(name, 5 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        (again.volume_id.as_str(), again.capacity_bytes),
        (name, 6 * MIB)
    );
    expect_err(
        c.create_volume(create_req(name, 20 * MIB)).await,
        Code::AlreadyExists,
        "exists",
    );

    // Maximum-length name (128), twice, and concurrently: one volume.
    let long = format!("Long_{}", "n".repeat(123));
    let (a, b) = tokio::join!(
        async {
            env.controller()
                .await
                .create_volume(create_req(&long, MIB))
                .await
        },
        async {
            env.controller()
                .await
                .create_volume(create_req(&long, MIB))
                .await
        },
    );
    let (a, b) = (
        a.unwrap().into_inner().volume.unwrap(),
        b.unwrap().into_inner().volume.unwrap(),
    );
    assert_eq!(a.volume_id, b.volume_id);
    assert!(
        a.volume_id.len() <= 52 && a.volume_id.starts_with("long-nnn"),
        "{}",
        a.volume_id
    );
    assert_eq!(env.volume_names().await.len(), 3);

    // dataLocality best-effort: made on the first consumer's node when it
    // is a member; an unknown node is only a preference, so the volume is
    // made anyway.
    for (pvc, node) in [("pvc-near", "node-a"), ("pvc-far", "node-x")] {
        let mut req = create_req(pvc, MIB);
        req.parameters
            .insert("dataLocality".into(), "best-effort".into());
        let topo = Topology {
            segments: HashMap::from([(cairn_csi::TOPOLOGY_KEY.to_string(), node.to_string())]),
        };
        req.accessibility_requirements = Some(TopologyRequirement {
            requisite: vec![topo.clone()],
            preferred: vec![topo],
        });
        let v = c
            .create_volume(req)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let got = env
            .cairn()
            .await
            .get_volume(cairn_api::pb::VolumeRef {
                name: v.volume_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.owner, "node-a", "{pvc}");
        assert!(got.replicas.iter().all(|r| r.node == "node-a"), "{got:?}");
        c.delete_volume(DeleteVolumeRequest {
            volume_id: v.volume_id,
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
    }
    assert_eq!(env.volume_names().await.len(), 3);

    expect_err(
        c.delete_volume(DeleteVolumeRequest::default()).await,
        Code::InvalidArgument,
        "volume_id",
    );
    for id in [
        name,
        name,
        "no-such-volume",
        a.volume_id.as_str(),
        "pvc-default",
    ] {
        c.delete_volume(DeleteVolumeRequest {
            volume_id: id.into(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
    }
    assert!(env.volume_names().await.is_empty());
}

/// ListVolumes "should return appropriate values (no optional values
/// added)", "pagination should detect volumes added between pages and
/// accept tokens when the last volume from a page is deleted", "should fail
/// when an invalid starting_token is passed"; GetCapacity "should return
/// capacity (no optional values added)"; ValidateVolumeCapabilities "should
/// fail when no volume id is provided", "should fail when no volume
/// capabilities are provided", "should return appropriate values (no
/// optional values added)", "should fail when the requested volume does not
/// exist"; ControllerGetVolume and its condition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_capacity_validate_and_get() {
    let env = Env::start().await;
    let mut c = env.controller().await;
    let cap_before = c
        .get_capacity(GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(cap_before.available_capacity > 0);
    for n in ["pvc-a", "pvc-b", "pvc-c"] {
        c.create_volume(create_req(n, 64 * MIB)).await.unwrap();
    }
    let cap_after = c
        .get_capacity(GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        cap_before.available_capacity - cap_after.available_capacity,
        3 * 2 * 64 * MIB,
        "three 2-replica 64 MiB volumes are promised"
    );

    let page = |max: i32, token: &str| ListVolumesRequest {
        max_entries: max,
        starting_token: token.into(),
    };
    let p1 = c.list_volumes(page(2, "")).await.unwrap().into_inner();
    let ids: Vec<_> = p1
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    assert_eq!(ids, ["pvc-a", "pvc-b"]);
    assert!(!p1.next_token.is_empty());
    let p2 = c
        .list_volumes(page(2, &p1.next_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.entries.len(), 1);
    assert!(p2.next_token.is_empty());
    let status = p2.entries[0].status.as_ref().unwrap();
    assert!(status.published_node_ids.is_empty());
    assert!(!status.volume_condition.as_ref().unwrap().abnormal);
    expect_err(
        c.list_volumes(page(0, "garbage")).await,
        Code::Aborted,
        "starting_token",
    );
    expect_err(
        c.list_volumes(page(-1, "")).await,
        Code::InvalidArgument,
        "max_entries",
    );

    let validate = |id: &str, caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    expect_err(
        c.validate_volume_capabilities(validate("", vec![block_cap()]))
            .await,
        Code::InvalidArgument,
        "volume_id",
    );
    expect_err(
        c.validate_volume_capabilities(validate("pvc-a", vec![]))
            .await,
        Code::InvalidArgument,
        "volume_capabilities",
    );
    expect_err(
        c.validate_volume_capabilities(validate("ghost", vec![block_cap()]))
            .await,
        Code::NotFound,
        "ghost",
    );
    let ok = c
        .validate_volume_capabilities(validate(
            "pvc-a",
            vec![block_cap(), mount_cap("xfs", Mode::SingleNodeMultiWriter)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some(), "{}", ok.message);
    let no = c
        .validate_volume_capabilities(validate(
            "pvc-a",
            vec![mount_cap("ext4", Mode::MultiNodeReaderOnly)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        no.confirmed.is_none() && no.message.contains("MULTI_NODE_READER_ONLY"),
        "{}",
        no.message
    );

    let got = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "pvc-b".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, 64 * MIB);
    let cond = got.status.unwrap().volume_condition.unwrap();
    assert!(
        !cond.abnormal && cond.message.contains("detached"),
        "{cond:?}"
    );
    expect_err(
        c.controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "ghost".into(),
        })
        .await,
        Code::NotFound,
        "ghost",
    );
}

/// ControllerPublishVolume "should fail when no volume id is provided",
/// "should fail when no node id is provided", "should fail when no volume
/// capability is provided", "should fail when publishing to a non-existent
/// node", "should fail when the volume does not exist";
/// ControllerUnpublishVolume "should fail when no volume id is provided",
/// and unpublishing an unknown or detached volume succeeds. (Publishing
/// itself attaches /dev/ublkbN: the guest suite proves it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_argument_checks() {
    let env = Env::start().await;
    let mut c = env.controller().await;
    c.create_volume(create_req("pvc-p", 8 * MIB)).await.unwrap();
    let publish =
        |vol: &str, node: &str, cap: Option<VolumeCapability>| ControllerPublishVolumeRequest {
            volume_id: vol.into(),
            node_id: node.into(),
            volume_capability: cap,
            ..Default::default()
        };
    expect_err(
        c.controller_publish_volume(publish("", "node-a", Some(block_cap())))
            .await,
        Code::InvalidArgument,
        "volume_id",
    );
    expect_err(
        c.controller_publish_volume(publish("pvc-p", "", Some(block_cap())))
            .await,
        Code::InvalidArgument,
        "node_id",
    );
    expect_err(
        c.controller_publish_volume(publish("pvc-p", "node-a", None))
            .await,
        Code::InvalidArgument,
        "volume_capability",
    );
    expect_err(
        c.controller_publish_volume(publish("pvc-p", "node-zz", Some(block_cap())))
            .await,
        Code::NotFound,
        "node-zz",
    );
    expect_err(
        c.controller_publish_volume(publish("ghost", "node-a", Some(block_cap())))
            .await,
        Code::NotFound,
        "ghost",
    );
    expect_err(
        c.controller_unpublish_volume(ControllerUnpublishVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        "volume_id",
    );
    for vol in ["ghost", "pvc-p"] {
        c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: vol.into(),
            node_id: "node-a".into(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
    }
}

fn snap_req(source: &str, name: &str, kind: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        parameters: HashMap::from([("type".into(), kind.into())]),
        ..Default::default()
    }
}

/// CreateSnapshot "should fail when no name is provided", "should fail when
/// no source volume id is provided", "should succeed when requesting to
/// create a snapshot with already existing name and same source volume ID",
/// "should fail when requesting to create a snapshot with already existing
/// name and different source volume ID", "should succeed when creating
/// snapshot with maximum-length name"; ListSnapshots "should return
/// appropriate values (no optional values added)", "should return snapshots
/// that match the specified snapshot id", "should return empty when the
/// specified snapshot id does not exist", "should return snapshots that
/// match the specified source volume id", "should return empty when the
/// specified source volume id does not exist", "should return next token
/// when a limited number of entries are requested"; DeleteSnapshot "should
/// fail when no snapshot id is provided", "should succeed when an invalid
/// snapshot id is used", "should return appropriate values (no optional
/// values added)"; CreateVolume from a snapshot and from a volume
/// ("should create volume from an existing source snapshot", "should fail
/// when the volume source snapshot is not found", "should create volume
/// from an existing source volume", "should fail when the volume source
/// volume is not found").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_volumes_from_them() {
    let env = Env::start().await;
    let mut c = env.controller().await;
    c.create_volume(create_req("src", 8 * MIB)).await.unwrap();
    c.create_volume(create_req("other", 8 * MIB)).await.unwrap();

    expect_err(
        c.create_snapshot(snap_req("src", "", "snap")).await,
        Code::InvalidArgument,
        "name",
    );
    expect_err(
        c.create_snapshot(snap_req("", "s1", "snap")).await,
        Code::InvalidArgument,
        "source_volume_id",
    );
    expect_err(
        c.create_snapshot(snap_req("src", "s1", "full")).await,
        Code::InvalidArgument,
        "type",
    );
    expect_err(
        c.create_snapshot(snap_req("ghost", "s1", "snap")).await,
        Code::NotFound,
        "ghost",
    );

    let s = c
        .create_snapshot(snap_req("src", "snapshot-1", "snap"))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(s.snapshot_id, "snap://src/snapshot-1");
    assert_eq!(s.source_volume_id, "src");
    assert_eq!(s.size_bytes, 8 * MIB);
    assert!(s.ready_to_use && s.creation_time.is_some());
    let again = c
        .create_snapshot(snap_req("src", "snapshot-1", "snap"))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again.snapshot_id, s.snapshot_id);
    expect_err(
        c.create_snapshot(snap_req("other", "snapshot-1", "snap"))
            .await,
        Code::AlreadyExists,
        "src",
    );
    let long = format!("Snapshot_{}", "x".repeat(119));
    let l = c
        .create_snapshot(snap_req("other", &long, "snap"))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(
        l.snapshot_id.starts_with("snap://other/snapshot-xxx"),
        "{}",
        l.snapshot_id
    );

    let list = |snapshot_id: &str, source: &str, max: i32, token: &str| ListSnapshotsRequest {
        snapshot_id: snapshot_id.into(),
        source_volume_id: source.into(),
        max_entries: max,
        starting_token: token.into(),
        ..Default::default()
    };
    let ids = |r: ListSnapshotsResponse| -> Vec<String> {
        r.entries
            .into_iter()
            .map(|e| e.snapshot.unwrap().snapshot_id)
            .collect()
    };
    let all = ids(c
        .list_snapshots(list("", "", 0, ""))
        .await
        .unwrap()
        .into_inner());
    assert_eq!(all, [l.snapshot_id.clone(), s.snapshot_id.clone()]);
    assert_eq!(
        ids(c
            .list_snapshots(list(&s.snapshot_id, "", 0, ""))
            .await
            .unwrap()
            .into_inner()),
        std::slice::from_ref(&s.snapshot_id)
    );
    assert!(ids(c
        .list_snapshots(list("snap://src/nope", "", 0, ""))
        .await
        .unwrap()
        .into_inner())
    .is_empty());
    assert!(ids(c
        .list_snapshots(list("garbage", "", 0, ""))
        .await
        .unwrap()
        .into_inner())
    .is_empty());
    assert_eq!(
        ids(c
            .list_snapshots(list("", "src", 0, ""))
            .await
            .unwrap()
            .into_inner()),
        std::slice::from_ref(&s.snapshot_id)
    );
    assert!(ids(c
        .list_snapshots(list("", "ghost", 0, ""))
        .await
        .unwrap()
        .into_inner())
    .is_empty());
    let p1 = c
        .list_snapshots(list("", "", 1, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p1.entries.len(), 1);
    assert_eq!(p1.next_token, "1");
    expect_err(
        c.list_snapshots(list("", "", 1, "9")).await,
        Code::Aborted,
        "starting_token",
    );

    // A volume from the snapshot, and a clone; missing sources are NOT_FOUND.
    let from = |name: &str, source: volume_content_source::Type| {
        let mut r = create_req(name, 8 * MIB);
        r.volume_content_source = Some(VolumeContentSource {
            r#type: Some(source),
        });
        r
    };
    use volume_content_source::{SnapshotSource, Type, VolumeSource};
    let snap_src = |id: &str| {
        Type::Snapshot(SnapshotSource {
            snapshot_id: id.into(),
        })
    };
    let vol_src = |id: &str| {
        Type::Volume(VolumeSource {
            volume_id: id.into(),
        })
    };
    let restored = c
        .create_volume(from("restored", snap_src(&s.snapshot_id)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(restored.capacity_bytes, 8 * MIB);
    assert!(restored.content_source.is_some());
    let cloned = c
        .create_volume(from("cloned", vol_src("src")))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(cloned.volume_id, "cloned");
    expect_err(
        c.create_volume(from("r2", snap_src("snap://src/nope")))
            .await,
        Code::NotFound,
        "nope",
    );
    expect_err(
        c.create_volume(from("r3", snap_src("garbage"))).await,
        Code::NotFound,
        "garbage",
    );
    expect_err(
        c.create_volume(from("r4", vol_src("ghost"))).await,
        Code::NotFound,
        "ghost",
    );
    let names = env.volume_names().await;
    assert_eq!(
        names,
        ["cloned", "other", "restored", "src"],
        "a refused create made a volume"
    );

    expect_err(
        c.delete_snapshot(DeleteSnapshotRequest::default()).await,
        Code::InvalidArgument,
        "snapshot_id",
    );
    for id in [
        s.snapshot_id.as_str(),
        s.snapshot_id.as_str(),
        "garbage",
        "snap://ghost/s",
        "bak://ghost/b",
    ] {
        c.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: id.into(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("delete {id}: {e}"));
    }
    assert!(ids(c
        .list_snapshots(list(&s.snapshot_id, "", 0, ""))
        .await
        .unwrap()
        .into_inner())
    .is_empty());
}

/// Backups as snapshots (`type: bak`, the default) to a file:// backup
/// target: ready_to_use once uploaded (the sidecar polls with CreateSnapshot
/// or ListSnapshots), the same id again, a volume from the backup (Velero's
/// restore), a hand-written `bak://` handle answers ListSnapshots (a
/// pre-provisioned VolumeSnapshotContent), DeleteSnapshot removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_as_snapshots() {
    let env = Env::start().await;
    let target = env._tmp.path().join("backups");
    std::fs::create_dir(&target).unwrap();
    env.cairn()
        .await
        .set_setting(cairn_api::pb::SetSettingRequest {
            name: "backup-target".into(),
            value: format!("file://{}", target.display()),
        })
        .await
        .unwrap();
    let mut c = env.controller().await;
    c.create_volume(create_req("db", 8 * MIB)).await.unwrap();
    let mut req = snap_req("db", "velero-1", "");
    req.parameters.clear();
    let first = c
        .create_snapshot(req.clone())
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(
        first.snapshot_id.starts_with("bak://db/"),
        "{}",
        first.snapshot_id
    );
    assert_eq!(first.size_bytes, 8 * MIB);
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = loop {
        let s = c
            .create_snapshot(req.clone())
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        assert_eq!(
            s.snapshot_id, first.snapshot_id,
            "a retry made another backup"
        );
        if s.ready_to_use {
            break s;
        }
        assert!(Instant::now() < deadline, "backup not ready within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let listed = snapshots_by_id(&mut c, &ready.snapshot_id).await;
    assert_eq!(listed.len(), 1);
    let entry = listed[0].snapshot.clone().unwrap();
    assert!(
        entry.ready_to_use && entry.size_bytes == 8 * MIB,
        "{entry:?}"
    );
    expect_err(
        c.create_snapshot(snap_req("ghost", "velero-1", "bak"))
            .await,
        Code::NotFound,
        "ghost",
    );

    let mut restore = create_req("db-restored", 8 * MIB);
    restore.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: ready.snapshot_id.clone(),
            },
        )),
    });
    let v = c
        .create_volume(restore)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, 8 * MIB);

    c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: ready.snapshot_id.clone(),
        secrets: HashMap::new(),
    })
    .await
    .unwrap();
    let gone = snapshots_by_id(&mut c, &ready.snapshot_id).await;
    assert!(gone.is_empty(), "{gone:?}");
}

/// ControllerExpandVolume "should fail if no volume id is given", "should
/// fail if no capacity range is given", "should work" (a detached volume;
/// mount volumes need the node to grow the filesystem).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expand_volumes() {
    let env = Env::start().await;
    let mut c = env.controller().await;
    c.create_volume(create_req("grow", 8 * MIB)).await.unwrap();
    let expand = |id: &str, bytes: Option<i64>| ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: bytes.map(|b| CapacityRange {
            required_bytes: b,
            limit_bytes: 0,
        }),
        volume_capability: Some(mount_cap("ext4", Mode::SingleNodeWriter)),
        ..Default::default()
    };
    expect_err(
        c.controller_expand_volume(expand("", Some(MIB))).await,
        Code::InvalidArgument,
        "volume_id",
    );
    expect_err(
        c.controller_expand_volume(expand("grow", None)).await,
        Code::InvalidArgument,
        "capacity_range",
    );
    expect_err(
        c.controller_expand_volume(expand("ghost", Some(16 * MIB)))
            .await,
        Code::NotFound,
        "ghost",
    );
    let r = c
        .controller_expand_volume(expand("grow", Some(15 * MIB)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 16 * MIB);
    assert!(r.node_expansion_required);
    // Smaller than now: the volume as it is.
    let r = c
        .controller_expand_volume(expand("grow", Some(4 * MIB)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 16 * MIB);
    let got = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "grow".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, 16 * MIB);
}

/// A StorageClass with `recurringJobs`: the volume CreateVolume makes runs
/// them on schedule. An every-minute snapshot job (with jobs allowed on
/// detached volumes, as the host has no ublk; `snapshot-force-create`, as
/// the `snapshot` task skips a volume without new data and the host cannot
/// write any) makes a snapshot labelled with the job within two minutes.
/// ListSnapshots lists it under its `snap://` handle (a restore point a
/// VolumeSnapshotContent can name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_class_recurring_jobs_run_on_schedule() {
    let env = Env::start().await;
    let mut cairn = env.cairn().await;
    cairn
        .set_setting(cairn_api::pb::SetSettingRequest {
            name: "allow-recurring-job-while-volume-detached".into(),
            value: "true".into(),
        })
        .await
        .unwrap();
    let mut c = env.controller().await;
    let mut req = create_req("pvc-jobs", 8 * MIB);
    req.parameters.insert(
        "recurringJobs".into(),
        r#"[{"name":"minutely","task":"snapshot-force-create","cron":"* * * * *","retain":2}]"#
            .into(),
    );
    let id = c
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let vol = cairn
        .get_volume(cairn_api::pb::VolumeRef { name: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(
        vol.recurring_jobs.contains("\"minutely\""),
        "the StorageClass jobs are not on the volume: {}",
        vol.recurring_jobs
    );
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(150);
    let made = loop {
        let snaps = cairn
            .list_snapshots(cairn_api::pb::VolumeRef { name: id.clone() })
            .await
            .unwrap()
            .into_inner()
            .snapshots;
        if let Some(s) = snaps.iter().find(|s| {
            !s.is_head && s.labels.get("RecurringJob").map(String::as_str) == Some("minutely")
        }) {
            break s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot from the every-minute job within 150 s: {snaps:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!(
        "recurring job snapshot {} after {:.1}s",
        made.name,
        t0.elapsed().as_secs_f64()
    );
    let listed = c
        .list_snapshots(ListSnapshotsRequest {
            source_volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let want = format!("snap://{id}/{}", made.name);
    assert!(
        listed.iter().any(|e| e
            .snapshot
            .as_ref()
            .is_some_and(|s| s.snapshot_id == want && s.ready_to_use)),
        "the job snapshot {want} is not listed: {listed:?}"
    );
}
