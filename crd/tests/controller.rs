//! The controller's reconciles against a mocked Kubernetes API server
//! (`tower-test`, as kube-rs's controller-rs tests) and a **real** `cairnd`
//! on a Unix socket: what the controller asks of the API is recorded and
//! checked, and what it does to storage is read back from `cairnd`.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_api::pb;
use cairn_crd::controller::{metrics::Metrics, node, setting, volume, Cairnd, Context, Error};
use cairn_crd::resources::*;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{json, Value};

const NS: &str = "cairn-system";
const MIB: u64 = 1 << 20;

fn cairnd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CAIRND_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("cairnd");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (`cargo build --release --workspace`) or set CAIRND_BIN",
        bin.display()
    );
    bin
}

/// A cairnd child process; stopped when dropped.
struct Cairnd_ {
    child: Child,
    socket: PathBuf,
    replica_addr: Option<String>,
}

impl Drop for Cairnd_ {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_cairnd(root: &Path, node: &str, cluster: bool) -> Cairnd_ {
    let dir = root.join(node);
    std::fs::create_dir_all(dir.join("disk")).unwrap();
    let socket = dir.join("cairnd.sock");
    let mut cmd = Command::new(cairnd_bin());
    cmd.arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--socket")
        .arg(&socket)
        .arg("--disk")
        .arg(dir.join("disk"))
        .args(["--node-id", node, "--queues", "1", "--log-level", "warn"]);
    let mut replica_addr = None;
    if cluster {
        let secret = root.join("secret");
        std::fs::write(&secret, "a-test-cluster-secret-of-32-bytes").unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        cmd.arg("--replica-listen")
            .arg(&addr)
            .arg("--cluster-secret")
            .arg(&secret);
        replica_addr = Some(addr);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = cairn_api::connect(&socket).await {
            c.set_setting(pb::SetSettingRequest {
                name: "storage-minimal-available-percentage".into(),
                value: "0".into(),
            })
            .await
            .unwrap();
            break;
        }
        assert!(Instant::now() < deadline, "cairnd did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Cairnd_ {
        child,
        socket,
        replica_addr,
    }
}

/// One request the controller made of the API server.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    query: String,
    body: Value,
}

type Route = dyn Fn(&Seen) -> (u16, Value) + Send + Sync;

/// A mocked API server: answers each request with `route` and records it.
struct MockApi {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl MockApi {
    fn start(route: Arc<Route>) -> (kube::Client, MockApi) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect().await.unwrap().to_bytes();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let s = Seen {
                    method: parts.method.clone(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().unwrap_or_default().to_string(),
                    body,
                };
                let (code, answer) = route(&s);
                log.lock().unwrap().push(s);
                send.send_response(
                    Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
            }
        });
        (kube::Client::new(svc, NS), MockApi { seen })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }

    /// Bodies of the status patches of `kind`s named `name`.
    fn statuses(&self, plural: &str, name: &str) -> Vec<Value> {
        let path = format!("/apis/cairn.io/v1alpha1/namespaces/{NS}/{plural}/{name}/status");
        self.seen()
            .into_iter()
            .filter(|s| s.method == Method::PATCH && s.path == path)
            .map(|s| s.body)
            .collect()
    }

    /// The reasons of the Events recorded.
    fn events(&self) -> Vec<(String, String)> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == Method::POST && s.path.ends_with("/events"))
            .map(|s| {
                (
                    s.body["reason"].as_str().unwrap_or_default().to_string(),
                    s.body["note"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }
}

/// Echoes an object back: PATCH/POST answer with what was sent, merged
/// into `base` for patches.
fn echo(base: Value) -> Arc<Route> {
    Arc::new(move |s: &Seen| {
        if s.method == Method::POST {
            return (201, s.body.clone());
        }
        let mut obj = base.clone();
        if let Some(st) = s.body.get("status") {
            obj["status"] = st.clone();
        }
        (200, obj)
    })
}

fn ctx(client: kube::Client, socket: &Path, node: &str) -> Arc<Context> {
    let mut c = Context::new(
        client,
        Cairnd {
            socket: socket.to_path_buf(),
        },
        node,
        NS,
        Arc::new(Metrics::default()),
    );
    c.credentials_dir = socket.parent().unwrap().join("creds");
    Arc::new(c)
}

fn volume_obj(name: &str, size: &str, finalized: bool, deleting: bool) -> Volume {
    let mut v = Volume::new(
        name,
        VolumeSpec {
            size: size.into(),
            number_of_replicas: Some(1),
            stale_replica_timeout: None,
            from_backup: None,
            standby: false,
            data_locality: DataLocality::Disabled,
            node: None,
            recurring_jobs: Vec::new(),
        },
    );
    v.metadata.namespace = Some(NS.into());
    v.metadata.uid = Some(format!("uid-{name}"));
    v.metadata.generation = Some(1);
    v.metadata.resource_version = Some("1".into());
    if finalized {
        v.metadata.finalizers = Some(vec![VOLUME_FINALIZER.into()]);
    }
    if deleting {
        v.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
    }
    v
}

async fn cairn_volume(socket: &Path, name: &str) -> Option<pb::Volume> {
    let mut c = cairn_api::connect(socket).await.unwrap();
    match c.get_volume(pb::VolumeRef { name: name.into() }).await {
        Ok(v) => Some(v.into_inner()),
        Err(s) if s.code() == tonic::Code::NotFound => None,
        Err(s) => panic!("{s}"),
    }
}

/// Volume: the finalizer is added first; then created in cairnd with the
/// spec, status written back (server-side apply, this node's manager);
/// `spec.size` raised grows it; lowered is refused with an Event; deleting
/// the object deletes the volume and then drops the finalizer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_objects_create_grow_and_delete_volumes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = start_cairnd(tmp.path(), "node-a", false).await;

    // No finalizer yet: the first reconcile adds it and nothing else.
    let fresh = volume_obj("db", "64Mi", false, false);
    let (client, api) = MockApi::start(echo(serde_json::to_value(&fresh).unwrap()));
    let c = ctx(client, &d.socket, "node-a");
    volume::reconcile(Arc::new(fresh), c.clone()).await.unwrap();
    let seen = api.take();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, Method::PATCH);
    assert_eq!(
        seen[0].path,
        format!("/apis/cairn.io/v1alpha1/namespaces/{NS}/volumes/db")
    );
    assert!(
        seen[0].body.to_string().contains(VOLUME_FINALIZER),
        "{:?}",
        seen[0].body
    );
    assert!(
        cairn_volume(&d.socket, "db").await.is_none(),
        "created before the finalizer"
    );

    // With it: created, status written.
    let v = volume_obj("db", "64Mi", true, false);
    volume::reconcile(Arc::new(v), c.clone()).await.unwrap();
    let made = cairn_volume(&d.socket, "db")
        .await
        .expect("volume made in cairnd");
    assert_eq!((made.size, made.replicas.len()), (64 * MIB, 1));
    let st = api.statuses("volumes", "db");
    let last = st.last().expect("status written");
    assert_eq!(last["status"]["state"], "detached");
    assert_eq!(last["status"]["robustness"], "unknown");
    assert_eq!(last["status"]["sizeBytes"], 64 * MIB);
    assert_eq!(last["status"]["ownerNode"], "node-a");
    assert_eq!(last["status"]["replicas"][0]["node"], "node-a");
    let patch = api
        .seen()
        .into_iter()
        .find(|s| s.path.ends_with("/volumes/db/status"))
        .unwrap();
    assert!(
        patch.query.contains("fieldManager=cairn-controller-node-a"),
        "{}",
        patch.query
    );
    assert!(patch.query.contains("force=true"), "{}", patch.query);
    assert!(
        api.events().iter().any(|(r, _)| r == "Created"),
        "{:?}",
        api.events()
    );
    api.take();

    // Grown.
    let v = volume_obj("db", "128Mi", true, false);
    volume::reconcile(Arc::new(v), c.clone()).await.unwrap();
    assert_eq!(cairn_volume(&d.socket, "db").await.unwrap().size, 128 * MIB);
    assert!(
        api.events().iter().any(|(r, _)| r == "Expanded"),
        "{:?}",
        api.events()
    );
    assert_eq!(
        api.statuses("volumes", "db").last().unwrap()["status"]["sizeBytes"],
        128 * MIB
    );
    api.take();

    // Shrinking is refused, and changes nothing.
    let v = volume_obj("db", "64Mi", true, false);
    volume::reconcile(Arc::new(v), c.clone()).await.unwrap();
    assert_eq!(cairn_volume(&d.socket, "db").await.unwrap().size, 128 * MIB);
    let msg = api.statuses("volumes", "db").last().unwrap()["status"]["message"].clone();
    assert!(msg.as_str().unwrap().contains("never shrink"), "{msg}");
    assert!(api.events().iter().any(|(r, _)| r == "ShrinkRefused"));
    api.take();

    // Deleted: the volume goes, then the finalizer (a JSON patch removing it).
    let v = volume_obj("db", "128Mi", true, true);
    volume::reconcile(Arc::new(v), c.clone()).await.unwrap();
    assert!(
        cairn_volume(&d.socket, "db").await.is_none(),
        "volume not deleted"
    );
    let seen = api.take();
    let fin = seen
        .iter()
        .find(|s| s.method == Method::PATCH && s.path.ends_with("/volumes/db"))
        .expect("finalizer patch");
    assert!(fin.body.to_string().contains("remove"), "{:?}", fin.body);
    // Deleting again (already gone) is fine.
    let v = volume_obj("db", "128Mi", true, true);
    volume::reconcile(Arc::new(v), c.clone()).await.unwrap();
}

/// A spec cairnd cannot take is reported in status and an Event, creates
/// nothing, and is an `Invalid` error (retried late, not in a loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_volume_spec_is_reported_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = start_cairnd(tmp.path(), "node-a", false).await;
    for (name, size, want) in [
        ("odd", "1000", "spec.size"),
        ("Bad_Name", "64Mi", "metadata.name"),
    ] {
        let v = volume_obj(name, size, true, false);
        let (client, api) = MockApi::start(echo(serde_json::to_value(&v).unwrap()));
        let c = ctx(client, &d.socket, "node-a");
        let e = volume::reconcile(Arc::new(v), c).await.unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        let st = api.statuses("volumes", name);
        let last = st.last().expect("status written");
        assert_eq!(last["status"]["state"], "pending");
        assert!(
            last["status"]["message"].as_str().unwrap().contains(want),
            "{last}"
        );
        assert!(api
            .events()
            .iter()
            .any(|(r, n)| r == "InvalidSpec" && n.contains(want)));
    }
    // From a backup that does not exist (no target set): refused by cairnd.
    let mut v = volume_obj("restore", "64Mi", true, false);
    v.spec.from_backup = Some("bak://nope/backup-1".into());
    let (client, api) = MockApi::start(echo(serde_json::to_value(&v).unwrap()));
    let e = volume::reconcile(Arc::new(v), ctx(client, &d.socket, "node-a"))
        .await
        .unwrap_err();
    assert!(
        !api.statuses("volumes", "restore").is_empty() || matches!(e, Error::Cairnd { .. }),
        "{e}"
    );
    let mut c = cairn_api::connect(&d.socket).await.unwrap();
    let list = c
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .unwrap()
        .into_inner()
        .volumes;
    assert!(list.is_empty(), "a refused spec made {list:?}");
}

/// Settings are applied to this node's cairnd; a bad value is refused by
/// cairnd, changes nothing, and the node's status entry says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_are_pushed_and_a_bad_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = start_cairnd(tmp.path(), "node-a", false).await;
    let good = Setting::new("stale-replica-timeout", SettingSpec { value: "7".into() });
    let (client, api) = MockApi::start(echo(serde_json::to_value(&good).unwrap()));
    let c = ctx(client, &d.socket, "node-a");
    setting::reconcile_setting(Arc::new(good), c.clone())
        .await
        .unwrap();
    let mut cd = cairn_api::connect(&d.socket).await.unwrap();
    let get = |name: &str| pb::SettingRef { name: name.into() };
    assert_eq!(
        cd.get_setting(get("stale-replica-timeout"))
            .await
            .unwrap()
            .into_inner()
            .value,
        "7"
    );
    let st = api.statuses("settings", "stale-replica-timeout");
    assert_eq!(
        st[0]["status"]["nodes"],
        json!([{"node": "node-a", "applied": true}])
    );

    let before = cd
        .get_setting(get("concurrent-replica-rebuild-per-node-limit"))
        .await
        .unwrap()
        .into_inner()
        .value;
    let bad = Setting::new(
        "concurrent-replica-rebuild-per-node-limit",
        SettingSpec {
            value: "many".into(),
        },
    );
    setting::reconcile_setting(Arc::new(bad), c.clone())
        .await
        .unwrap();
    let after = cd
        .get_setting(get("concurrent-replica-rebuild-per-node-limit"))
        .await
        .unwrap()
        .into_inner()
        .value;
    assert_eq!(before, after, "a refused value changed the setting");
    let st = api.statuses("settings", "concurrent-replica-rebuild-per-node-limit");
    let entry = &st[0]["status"]["nodes"][0];
    assert_eq!(entry["applied"], false);
    assert!(
        entry["message"].as_str().unwrap().contains("many"),
        "{entry}"
    );
    assert!(api.events().iter().any(|(r, _)| r == "SettingRefused"));

    let unknown = Setting::new("no-such-setting", SettingSpec { value: "1".into() });
    setting::reconcile_setting(Arc::new(unknown), c)
        .await
        .unwrap();
    let st = api.statuses("settings", "no-such-setting");
    assert_eq!(st[0]["status"]["nodes"][0]["applied"], false);
}

/// The `default` BackupTarget: URL, poll interval and the credential
/// Secret (written 0600 for cairnd) become cairnd's settings; a missing
/// Secret is reported and sets nothing; another name is not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_target_and_its_credentials_reach_cairnd() {
    let tmp = tempfile::tempdir().unwrap();
    let d = start_cairnd(tmp.path(), "node-a", false).await;
    let target_dir = tmp.path().join("backups");
    std::fs::create_dir_all(&target_dir).unwrap();
    let url = format!("file://{}", target_dir.display());
    let t = BackupTarget::new(
        "default",
        BackupTargetSpec {
            url: url.clone(),
            credential_secret: Some("s3-creds".into()),
            poll_interval: Some(60),
        },
    );
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "s3-creds", "namespace": NS},
        "data": {"AWS_ACCESS_KEY_ID": "QUtJQQ==", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"},
    });
    let base = serde_json::to_value(&t).unwrap();
    let with_secret = Arc::new(Mutex::new(true));
    let ws = with_secret.clone();
    let route: Arc<Route> = Arc::new(move |s: &Seen| {
        if s.path.ends_with("/secrets/s3-creds") {
            return if *ws.lock().unwrap() {
                (200, secret.clone())
            } else {
                (
                    404,
                    json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404,"message":"secrets \"s3-creds\" not found"}),
                )
            };
        }
        if s.method == Method::POST {
            return (201, s.body.clone());
        }
        let mut o = base.clone();
        if let Some(st) = s.body.get("status") {
            o["status"] = st.clone();
        }
        (200, o)
    });
    let (client, api) = MockApi::start(route);
    let c = ctx(client, &d.socket, "node-a");
    setting::reconcile_target(Arc::new(t.clone()), c.clone())
        .await
        .unwrap();
    let mut cd = cairn_api::connect(&d.socket).await.unwrap();
    let get = |name: &str| pb::SettingRef { name: name.into() };
    assert_eq!(
        cd.get_setting(get("backup-target"))
            .await
            .unwrap()
            .into_inner()
            .value,
        url
    );
    assert_eq!(
        cd.get_setting(get("backupstore-poll-interval"))
            .await
            .unwrap()
            .into_inner()
            .value,
        "60"
    );
    let cred = cd
        .get_setting(get("backup-target-credential-secret"))
        .await
        .unwrap()
        .into_inner()
        .value;
    let text = std::fs::read_to_string(&cred).unwrap();
    assert!(text.contains("AWS_ACCESS_KEY_ID=\"AKIA\""), "{text}");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&cred).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        api.statuses("backuptargets", "default").last().unwrap()["status"]["nodes"][0]["applied"],
        true
    );
    // The target works: a backup of a volume lands in the directory.
    cd.create_volume(pb::CreateVolumeRequest {
        name: "v".into(),
        size: 8 * MIB,
        replicas: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let b = cd
        .create_backup(pb::CreateBackupRequest {
            volume: "v".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(b.handle.starts_with("bak://v/"), "{b:?}");
    api.take();

    // The Secret gone: reported, nothing set.
    *with_secret.lock().unwrap() = false;
    let mut t2 = t.clone();
    t2.spec.url = "s3://bucket@us-east-1/".into();
    setting::reconcile_target(Arc::new(t2), c.clone())
        .await
        .unwrap();
    assert_eq!(
        cd.get_setting(get("backup-target"))
            .await
            .unwrap()
            .into_inner()
            .value,
        url
    );
    let st = api.statuses("backuptargets", "default");
    let entry = &st.last().unwrap()["status"]["nodes"][0];
    assert_eq!(entry["applied"], false);
    assert!(
        entry["message"].as_str().unwrap().contains("s3-creds"),
        "{entry}"
    );
    assert!(api.events().iter().any(|(r, _)| r == "CredentialMissing"));

    // Only `default` is applied.
    let other = BackupTarget::new("second", t.spec.clone());
    setting::reconcile_target(Arc::new(other), c).await.unwrap();
    let st = api.statuses("backuptargets", "second");
    assert!(st[0]["status"]["nodes"][0]["message"]
        .as_str()
        .unwrap()
        .contains("default"));
}

/// A node publishes its Node object (owned by the Kubernetes Node) with the
/// replica address and the disks cairnd reports, and cairnd's membership
/// follows the published Nodes: a peer published there joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_published_and_feed_cairnds_membership() {
    let tmp = tempfile::tempdir().unwrap();
    let a = start_cairnd(tmp.path(), "node-a", true).await;
    let b = start_cairnd(tmp.path(), "node-b", true).await;
    let (a_addr, b_addr) = (
        a.replica_addr.clone().unwrap(),
        b.replica_addr.clone().unwrap(),
    );
    let peer = json!({
        "apiVersion": "cairn.io/v1alpha1", "kind": "Node",
        "metadata": {"name": "node-b", "namespace": NS},
        "spec": {},
        "status": {"state": "up", "replicaAddress": b_addr},
    });
    let mine = json!({
        "apiVersion": "cairn.io/v1alpha1", "kind": "Node",
        "metadata": {"name": "node-a", "namespace": NS},
        "spec": {},
        "status": {"state": "up", "replicaAddress": a_addr},
    });
    let route: Arc<Route> = Arc::new(move |s: &Seen| {
        if s.path == "/api/v1/nodes/node-a" {
            return (
                200,
                json!({"apiVersion":"v1","kind":"Node","metadata":{"name":"node-a","uid":"k8s-uid-a"}}),
            );
        }
        if s.method == Method::GET && s.path.ends_with("/nodes") {
            return (
                200,
                json!({"apiVersion":"cairn.io/v1alpha1","kind":"NodeList","metadata":{"resourceVersion":"5"},"items":[mine, peer]}),
            );
        }
        (200, mine.clone())
    });
    let (client, api) = MockApi::start(route);
    let c = ctx(client, &a.socket, "node-a");
    node::pass(&c, &a_addr).await.unwrap();
    let seen = api.seen();
    let publish = seen
        .iter()
        .find(|s| s.method == Method::PATCH && s.path.ends_with("/nodes/node-a"))
        .expect("Node published");
    assert_eq!(
        publish.body["metadata"]["ownerReferences"][0]["uid"],
        "k8s-uid-a"
    );
    assert_eq!(
        publish.body["metadata"]["ownerReferences"][0]["kind"],
        "Node"
    );
    let st = api.statuses("nodes", "node-a");
    assert_eq!(st[0]["status"]["replicaAddress"], a_addr);
    assert_eq!(st[0]["status"]["state"], "up");
    assert!(
        st[0]["status"]["disks"][0]["path"]
            .as_str()
            .unwrap()
            .ends_with("disk"),
        "{}",
        st[0]
    );
    assert!(st[0]["status"]["kernel"]
        .as_str()
        .is_some_and(|k| !k.is_empty()));

    let mut ca = cairn_api::connect(&a.socket).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let nodes = ca
            .list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
        if nodes
            .iter()
            .any(|n| n.name == "node-b" && n.state == pb::NodeState::Up as i32)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-b never joined node-a's membership: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A second pass asks nothing more of cairnd's membership.
    node::pass(&c, &a_addr).await.unwrap();
    let nodes = ca
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 2, "{nodes:?}");
}

/// The Node object's spec is the node's scheduling rule: applied to cairnd
/// when it differs (no new replicas on the node, or on a disk), shown in
/// status; a disk cairnd does not have is refused, status says why, and the
/// rule in force stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_spec_sets_scheduling_and_a_bad_disk_is_refused_in_status() {
    let tmp = tempfile::tempdir().unwrap();
    let a = start_cairnd(tmp.path(), "node-a", true).await;
    let addr = a.replica_addr.clone().unwrap();
    let spec = Arc::new(Mutex::new(json!({})));
    let answer = {
        let spec = spec.clone();
        let addr = addr.clone();
        move || {
            json!({
                "apiVersion": "cairn.io/v1alpha1", "kind": "Node",
                "metadata": {"name": "node-a", "namespace": NS},
                "spec": spec.lock().unwrap().clone(),
                "status": {"state": "up", "replicaAddress": addr},
            })
        }
    };
    let route: Arc<Route> = Arc::new(move |s: &Seen| {
        if s.path == "/api/v1/nodes/node-a" {
            return (
                404,
                json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}),
            );
        }
        if s.method == Method::GET && s.path.ends_with("/nodes") {
            return (200, list("Node", vec![answer()]));
        }
        (200, answer())
    });
    let (client, api) = MockApi::start(route);
    let c = ctx(client, &a.socket, "node-a");
    let mut ca = cairn_api::connect(&a.socket).await.unwrap();
    let get = async |ca: &mut pb::cairn_client::CairnClient<tonic::transport::Channel>| {
        ca.get_node(pb::GetNodeRequest {})
            .await
            .unwrap()
            .into_inner()
    };
    let disk = get(&mut ca).await.disks[0].path.clone();

    // An empty spec on a default node: schedulable, nothing set.
    node::pass(&c, &addr).await.unwrap();
    let st = api.statuses("nodes", "node-a");
    assert_eq!(st.last().unwrap()["status"]["allowScheduling"], true);
    assert_eq!(
        st.last().unwrap()["status"]["disks"][0]["schedulable"],
        true
    );

    // allowScheduling: false reaches cairnd and shows in status.
    *spec.lock().unwrap() = json!({"allowScheduling": false});
    node::pass(&c, &addr).await.unwrap();
    let n = get(&mut ca).await;
    assert!(!n.allow_scheduling, "{n:?}");
    let st = api.statuses("nodes", "node-a");
    let last = &st.last().unwrap()["status"];
    assert_eq!(last["allowScheduling"], false, "{last}");
    assert_eq!(last["disks"][0]["schedulable"], false, "{last}");
    assert!(last.get("message").is_none(), "{last}");

    // A disk cairnd does not have: refused, said in status, rule kept.
    *spec.lock().unwrap() =
        json!({"allowScheduling": true, "unschedulableDisks": ["/no/such/disk"]});
    node::pass(&c, &addr).await.unwrap();
    let n = get(&mut ca).await;
    assert!(
        !n.allow_scheduling && n.unschedulable_disks.is_empty(),
        "{n:?}"
    );
    let st = api.statuses("nodes", "node-a");
    let last = &st.last().unwrap()["status"];
    let msg = last["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("/no/such/disk") && msg.contains(&disk),
        "{last}"
    );

    // The node's one disk unschedulable, the node allowed.
    *spec.lock().unwrap() = json!({"unschedulableDisks": [disk.clone()]});
    node::pass(&c, &addr).await.unwrap();
    let n = get(&mut ca).await;
    assert!(
        n.allow_scheduling && n.unschedulable_disks == [disk.clone()],
        "{n:?}"
    );
    assert!(!n.disks[0].schedulable);
    let st = api.statuses("nodes", "node-a");
    let last = &st.last().unwrap()["status"];
    assert_eq!(last["allowScheduling"], true, "{last}");
    assert_eq!(last["disks"][0]["schedulable"], false, "{last}");
    // Nothing more to apply: a further pass sets nothing (same rule).
    node::pass(&c, &addr).await.unwrap();
    assert_eq!(get(&mut ca).await, n);
}

/// RecurringJob selection by label: a Volume labelled
/// `recurring-job.cairn.io/NAME: enabled` carries that job in cairnd, and
/// the job runs on schedule (a snapshot appears within its minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recurring_jobs_selected_by_label_make_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let d = start_cairnd(tmp.path(), "node-a", false).await;
    let mut cd = cairn_api::connect(&d.socket).await.unwrap();
    cd.set_setting(pb::SetSettingRequest {
        name: "allow-recurring-job-while-volume-detached".into(),
        value: "true".into(),
    })
    .await
    .unwrap();
    let job = RecurringJob::new(
        "every-minute",
        RecurringJobSpec {
            schedule: JobSchedule {
                task: JobTask::SnapshotForceCreate,
                cron: "* * * * *".into(),
                retain: 2,
                concurrency: 1,
                labels: Default::default(),
            },
            groups: vec!["default".into()],
        },
    );
    let other = RecurringJob::new(
        "unused",
        RecurringJobSpec {
            schedule: JobSchedule {
                task: JobTask::Backup,
                cron: "0 0 * * *".into(),
                retain: 1,
                concurrency: 1,
                labels: Default::default(),
            },
            groups: Vec::new(),
        },
    );
    let mut v = volume_obj("jobs", "16Mi", true, false);
    v.metadata.labels = Some(
        [(
            "recurring-job.cairn.io/every-minute".to_string(),
            "enabled".to_string(),
        )]
        .into(),
    );
    let list = json!({
        "apiVersion": "cairn.io/v1alpha1", "kind": "RecurringJobList",
        "metadata": {"resourceVersion": "3"},
        "items": [serde_json::to_value(&job).unwrap(), serde_json::to_value(&other).unwrap()],
    });
    let base = serde_json::to_value(&v).unwrap();
    let route: Arc<Route> = Arc::new(move |s: &Seen| {
        if s.method == Method::GET && s.path.ends_with("/recurringjobs") {
            return (200, list.clone());
        }
        if s.method == Method::POST {
            return (201, s.body.clone());
        }
        (200, base.clone())
    });
    let (client, _api) = MockApi::start(route);
    volume::reconcile(Arc::new(v), ctx(client, &d.socket, "node-a"))
        .await
        .unwrap();
    let got = cairn_volume(&d.socket, "jobs").await.unwrap();
    let jobs: Vec<Value> = serde_json::from_str(&got.recurring_jobs).unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["name"], "every-minute");
    assert_eq!(jobs[0]["task"], "snapshot-force-create");
    let deadline = Instant::now() + Duration::from_secs(75);
    loop {
        let snaps = cd
            .list_snapshots(pb::VolumeRef {
                name: "jobs".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .snapshots;
        if snaps.iter().any(|s| !s.is_head && !s.removed) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot from the selected job: {snaps:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A cairnd with a `file://` backup target and an 8 MiB volume `volume`.
async fn cairnd_with_target_and_volume(
    root: &Path,
    volume: &str,
) -> (
    Cairnd_,
    cairn_api::pb::cairn_client::CairnClient<tonic::transport::Channel>,
) {
    let d = start_cairnd(root, "node-a", false).await;
    let mut cd = cairn_api::connect(&d.socket).await.unwrap();
    let target = root.join("backups");
    std::fs::create_dir_all(&target).unwrap();
    cd.set_setting(pb::SetSettingRequest {
        name: "backup-target".into(),
        value: format!("file://{}", target.display()),
    })
    .await
    .unwrap();
    cd.create_volume(pb::CreateVolumeRequest {
        name: volume.into(),
        size: 8 * MIB,
        replicas: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    (d, cd)
}

/// Answers a PATCH with a minimal valid object of the kind in its path.
fn stock(path: &str) -> Value {
    let name = path
        .trim_end_matches("/status")
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let (kind, spec) = if path.contains("/backupvolumes/") {
        ("BackupVolume", json!({}))
    } else if path.contains("/backups/") {
        ("Backup", json!({"volume": "v"}))
    } else {
        ("Volume", json!({"size": "4096"}))
    };
    json!({"apiVersion": "cairn.io/v1alpha1", "kind": kind, "metadata": {"name": name, "namespace": NS}, "spec": spec})
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": format!("{kind}List"), "metadata": {"resourceVersion": "1"}, "items": items})
}

/// The lease holder's mirror: a volume made outside the objects (as the
/// CSI driver makes them) gets a `Volume` object labelled adopted, with the
/// PersistentVolume that serves it; the backup target's volumes and
/// backups get `BackupVolume` and `Backup` mirrors; an adopted object whose
/// volume is gone is deleted, and the Volume reconcile never recreates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_made_elsewhere_and_backups_are_mirrored() {
    use cairn_crd::controller::mirror;
    let tmp = tempfile::tempdir().unwrap();
    let (d, mut cd) = cairnd_with_target_and_volume(tmp.path(), "pvc-1234").await;
    let b = cd
        .create_backup(pb::CreateBackupRequest {
            volume: "pvc-1234".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let pv = json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": "pv-of-1234"},
        "spec": {"csi": {"driver": "csi.cairn.io", "volumeHandle": "pvc-1234"},
                 "claimRef": {"name": "data-db-0", "namespace": "prod"}},
    });
    let route: Arc<Route> = Arc::new(move |s: &Seen| {
        if s.method == Method::GET {
            if s.path == "/api/v1/persistentvolumes" {
                return (200, list("PersistentVolume", vec![pv.clone()]));
            }
            return (200, list("Thing", vec![]));
        }
        (200, stock(&s.path))
    });
    let (client, api) = MockApi::start(route);
    let c = ctx(client, &d.socket, "node-a");
    mirror::pass(&c).await.unwrap();
    let seen = api.take();
    let patched = |suffix: &str| -> Vec<Value> {
        seen.iter()
            .filter(|s| s.method == Method::PATCH && s.path.ends_with(suffix))
            .map(|s| s.body.clone())
            .collect()
    };
    let vol = patched("/volumes/pvc-1234");
    assert_eq!(vol.len(), 1, "{seen:?}");
    assert_eq!(vol[0]["metadata"]["labels"][mirror::ADOPTED_LABEL], "true");
    assert_eq!(vol[0]["spec"]["size"], (8 * MIB).to_string());
    assert_eq!(vol[0]["spec"]["numberOfReplicas"], 1);
    let bv = patched("/backupvolumes/pvc-1234/status");
    assert_eq!(bv[0]["status"]["backupCount"], 1);
    assert_eq!(bv[0]["status"]["lastBackupName"], b.name);
    let bk = patched(&format!("/backups/{}/status", b.name));
    assert_eq!(bk[0]["status"]["handle"], b.handle);
    assert_eq!(bk[0]["status"]["state"], "completed");
    let bk = patched(&format!("/backups/{}", b.name));
    assert_eq!(bk[0]["spec"]["volume"], "pvc-1234");
    // The PV is written into a Volume object's status once one exists.
    let obj = volume_obj("pvc-1234", "8Mi", true, false);
    let mut with_status = serde_json::to_value(&obj).unwrap();
    with_status["metadata"]["labels"] = json!({mirror::ADOPTED_LABEL: "true"});
    with_status["status"] = serde_json::to_value(volume::status_of(
        &cairn_volume(&d.socket, "pvc-1234").await.unwrap(),
    ))
    .unwrap();
    let listed = with_status.clone();
    let pv2 = json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": "pv-of-1234"},
        "spec": {"csi": {"driver": "csi.cairn.io", "volumeHandle": "pvc-1234"},
                 "claimRef": {"name": "data-db-0", "namespace": "prod"}},
    });
    let route: Arc<Route> = Arc::new(move |s: &Seen| {
        if s.method == Method::GET {
            if s.path == "/api/v1/persistentvolumes" {
                return (200, list("PersistentVolume", vec![pv2.clone()]));
            }
            if s.path.ends_with("/volumes") {
                return (200, list("Volume", vec![listed.clone()]));
            }
            return (200, list("Thing", vec![]));
        }
        if s.method == Method::DELETE {
            return (
                200,
                json!({"kind":"Status","apiVersion":"v1","status":"Success"}),
            );
        }
        (200, stock(&s.path))
    });
    let (client, api) = MockApi::start(route);
    let c = ctx(client, &d.socket, "node-a");
    mirror::pass(&c).await.unwrap();
    let st = api.statuses("volumes", "pvc-1234");
    assert_eq!(
        st[0]["status"]["kubernetesStatus"],
        json!({"pvName": "pv-of-1234", "pvcName": "data-db-0", "namespace": "prod"})
    );
    api.take();

    // Deleted through the CSI driver (straight in cairnd): the object goes,
    // and a Volume reconcile meanwhile does not bring the volume back.
    cd.delete_volume(pb::DeleteVolumeRequest {
        name: "pvc-1234".into(),
        force: false,
    })
    .await
    .unwrap();
    let adopted: Volume = serde_json::from_value(with_status.clone()).unwrap();
    volume::reconcile(Arc::new(adopted), c.clone())
        .await
        .unwrap();
    assert!(
        cairn_volume(&d.socket, "pvc-1234").await.is_none(),
        "an adopted volume was recreated"
    );
    mirror::pass(&c).await.unwrap();
    let deleted: Vec<Seen> = api
        .seen()
        .into_iter()
        .filter(|s| s.method == Method::DELETE)
        .collect();
    assert!(
        deleted
            .iter()
            .any(|s| s.path.ends_with("/volumes/pvc-1234")),
        "{deleted:?}"
    );
}

/// A `Backup` made with `spec.volume` takes a backup (its handle in
/// status, completed after polling); deleting the object deletes the
/// backup from the target; a backup of a volume that does not exist is
/// an Error status and a Warning Event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_objects_take_and_delete_backups() {
    use cairn_crd::controller::mirror;
    let tmp = tempfile::tempdir().unwrap();
    let (d, mut cd) = cairnd_with_target_and_volume(tmp.path(), "v").await;
    let spec = BackupSpec {
        volume: "v".into(),
        snapshot: None,
        labels: [("by".to_string(), "test".to_string())].into(),
    };
    let mut obj = Backup::new("nightly-v", spec.clone());
    obj.metadata.namespace = Some(NS.into());
    obj.metadata.finalizers = Some(vec![BACKUP_FINALIZER.into()]);
    obj.metadata.resource_version = Some("1".into());
    let base = serde_json::to_value(&obj).unwrap();
    let (client, api) = MockApi::start(echo(base));
    let c = ctx(client, &d.socket, "node-a");
    mirror::reconcile_backup(Arc::new(obj.clone()), c.clone())
        .await
        .unwrap();
    let st = api.statuses("backups", "nightly-v");
    let handle = st.last().unwrap()["status"]["handle"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(handle.starts_with("bak://v/"), "{st:?}");
    assert!(api.events().iter().any(|(r, _)| r == "BackupStarted"));
    // Followed until completed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut o = obj.clone();
        o.status = serde_json::from_value(
            api.statuses("backups", "nightly-v").last().unwrap()["status"].clone(),
        )
        .unwrap();
        mirror::reconcile_backup(Arc::new(o), c.clone())
            .await
            .unwrap();
        let last = api.statuses("backups", "nightly-v").last().unwrap()["status"].clone();
        if last["state"] == "completed" {
            break;
        }
        assert!(Instant::now() < deadline, "backup never completed: {last}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let listed = cd
        .list_backups(pb::ListBackupsRequest { volume: "v".into() })
        .await
        .unwrap()
        .into_inner()
        .backups;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].labels.get("by").map(String::as_str), Some("test"));

    // Deleted with the object.
    let mut gone = obj.clone();
    gone.status = serde_json::from_value(
        api.statuses("backups", "nightly-v").last().unwrap()["status"].clone(),
    )
    .unwrap();
    gone.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    mirror::reconcile_backup(Arc::new(gone), c.clone())
        .await
        .unwrap();
    let listed = cd
        .list_backups(pb::ListBackupsRequest { volume: "v".into() })
        .await
        .unwrap()
        .into_inner()
        .backups;
    assert!(listed.is_empty(), "backup not deleted: {listed:?}");
    assert!(api.events().iter().any(|(r, _)| r == "BackupDeleted"));

    // A volume that does not exist: Error status, Warning, nothing made.
    let mut bad = Backup::new(
        "of-nothing",
        BackupSpec {
            volume: "nope".into(),
            snapshot: None,
            labels: Default::default(),
        },
    );
    bad.metadata.finalizers = Some(vec![BACKUP_FINALIZER.into()]);
    let (client, api) = MockApi::start(echo(serde_json::to_value(&bad).unwrap()));
    let e = mirror::reconcile_backup(Arc::new(bad), ctx(client, &d.socket, "node-a"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
    let st = api.statuses("backups", "of-nothing");
    assert_eq!(st.last().unwrap()["status"]["state"], "error");
    assert!(api.events().iter().any(|(r, _)| r == "BackupFailed"));
}
