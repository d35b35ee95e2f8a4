//! Backup targets against real servers on 127.0.0.1: s3s-fs (SigV4, path and
//! virtual-hosted style) and moto over TLS with a test CA.
//!
//! Needs `scripts/s3-server.sh install` (s3s-fs; or `CAIRN_S3S_FS=path`) and
//! `scripts/s3-server.sh install-moto` (or `CAIRN_MOTO_SERVER=path`) and
//! `openssl`. A missing tool fails the test with that instruction.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn::backupstore::credentials::{CredentialSource, Credentials};
use cairn::backupstore::target::{check_target, open_target, BackupTarget, TargetError};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

const AK: &str = "cairnaccess";
const SK: &str = "cairn-secret-key-TOPSECRET";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tool(env: &str, default: &str, install: &str) -> PathBuf {
    let p = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(default));
    assert!(
        p.exists(),
        "{} not found: run `scripts/s3-server.sh {install}` (or set {env})",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_listening(port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("server exited early: {status}");
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("server did not listen on {port}");
}

/// A killed-on-drop server process.
struct Server {
    child: Child,
    port: u16,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s3s_fs() -> Server {
    let bin = tool("CAIRN_S3S_FS", "target/tools/bin/s3s-fs", "install");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("s3");
    std::fs::create_dir_all(&root).expect("mkdir");
    let port = free_port();
    let mut child = Command::new(bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", AK, "--secret-key", SK])
        // s3s matches the whole Host header, port included.
        .args(["--domain", &format!("localhost:{port}")])
        .arg(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn s3s-fs");
    wait_listening(port, &mut child);
    Server {
        child,
        port,
        root,
        _dir: dir,
    }
}

/// Writes a credentials file and loads it the way the daemon does.
fn creds_file(dir: &Path, text: &str) -> (Credentials, PathBuf) {
    let path = dir.join("backup-credentials.env");
    std::fs::write(&path, text).expect("write creds");
    (
        Credentials::load(Some(&path)).expect("valid credentials"),
        path,
    )
}

fn s3_creds(dir: &Path, endpoint: &str, secret: &str, extra: &str) -> (Credentials, PathBuf) {
    creds_file(
        dir,
        &format!(
            "# test\nAWS_ACCESS_KEY_ID={AK}\nAWS_SECRET_ACCESS_KEY=\"{secret}\"\nAWS_ENDPOINTS={endpoint}\n{extra}"
        ),
    )
}

async fn roundtrip(store: &Arc<dyn ObjectStore>, prefix: &ObjectPath) {
    let key = prefix
        .clone()
        .join("backupstore")
        .join("volumes")
        .join("v1")
        .join("volume.cfg");
    store
        .put(&key, PutPayload::from_static(b"{\"Name\":\"v1\"}"))
        .await
        .expect("put");
    let got = store
        .get(&key)
        .await
        .expect("get")
        .bytes()
        .await
        .expect("body");
    assert_eq!(&got[..], b"{\"Name\":\"v1\"}");
    let listed = store
        .list_with_delimiter(Some(&prefix.clone().join("backupstore").join("volumes")))
        .await
        .expect("list");
    assert_eq!(listed.common_prefixes.len(), 1, "{listed:?}");
}

#[tokio::test]
async fn s3_path_style_put_get_list() {
    let srv = s3s_fs();
    std::fs::create_dir(srv.root.join("backups")).expect("bucket");
    let tmp = tempfile::tempdir().expect("tempdir");
    let endpoint = format!("http://127.0.0.1:{}", srv.port);
    let (creds, _) = s3_creds(tmp.path(), &endpoint, SK, "VIRTUAL_HOSTED_STYLE=false\n");
    let target = BackupTarget::parse("s3://backups@us-east-1/cluster-a/").expect("url");
    check_target(&target, &creds, tmp.path())
        .await
        .expect("probe");
    let (store, prefix) = open_target(&target, &creds, tmp.path())
        .await
        .expect("open");
    assert_eq!(prefix.as_ref(), "cluster-a");
    roundtrip(&store, &prefix).await;
    // Longhorn's layout on the server: BUCKET/PATH/backupstore/...
    assert!(srv
        .root
        .join("backups/cluster-a/backupstore/volumes/v1/volume.cfg")
        .exists());

    // Empty PATH: the store root.
    let target = BackupTarget::parse("s3://backups@us-east-1/").expect("url");
    let (store, prefix) = open_target(&target, &creds, tmp.path())
        .await
        .expect("open");
    assert_eq!(prefix.as_ref(), "");
    roundtrip(&store, &prefix).await;
    assert!(srv
        .root
        .join("backups/backupstore/volumes/v1/volume.cfg")
        .exists());
}

#[tokio::test]
async fn s3_virtual_hosted_style() {
    let srv = s3s_fs();
    std::fs::create_dir(srv.root.join("vbucket")).expect("bucket");
    let tmp = tempfile::tempdir().expect("tempdir");
    // glibc does not resolve vbucket.localhost; open_target resolves
    // *.localhost to loopback itself (RFC 6761).
    let endpoint = format!("http://localhost:{}", srv.port);
    let (creds, _) = s3_creds(tmp.path(), &endpoint, SK, "VIRTUAL_HOSTED_STYLE=true\n");
    let target = BackupTarget::parse("s3://vbucket@us-east-1/vh/").expect("url");
    check_target(&target, &creds, tmp.path())
        .await
        .expect("probe");
    let (store, prefix) = open_target(&target, &creds, tmp.path())
        .await
        .expect("open");
    roundtrip(&store, &prefix).await;
    assert!(srv
        .root
        .join("vbucket/vh/backupstore/volumes/v1/volume.cfg")
        .exists());

    // Virtual-hosted style cannot put a bucket in front of an IP address.
    let (creds, _) = s3_creds(
        tmp.path(),
        &format!("http://127.0.0.1:{}", srv.port),
        SK,
        "VIRTUAL_HOSTED_STYLE=true\n",
    );
    let err = check_target(&target, &creds, tmp.path())
        .await
        .expect_err("ip");
    assert!(err.to_string().contains("needs a DNS name"), "{err}");
}

#[tokio::test]
async fn s3_wrong_secret_is_access_denied() {
    let srv = s3s_fs();
    std::fs::create_dir(srv.root.join("backups")).expect("bucket");
    let tmp = tempfile::tempdir().expect("tempdir");
    let endpoint = format!("http://127.0.0.1:{}", srv.port);
    let (creds, file) = s3_creds(tmp.path(), &endpoint, "WRONG-TOPSECRET", "");
    let target = BackupTarget::parse("s3://backups@us-east-1/").expect("url");
    let err = check_target(&target, &creds, tmp.path())
        .await
        .expect_err("denied");
    assert!(matches!(err, TargetError::AccessDenied { .. }), "{err:?}");
    let msg = err.to_string();
    eprintln!("{err}");
    let want = format!(
        "access denied: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in {}",
        file.display()
    );
    assert!(msg.contains(&want), "{msg}");
    assert!(!format!("{msg} {err:?}").contains("TOPSECRET"), "{msg}");
}

#[tokio::test]
async fn s3_missing_bucket_and_unreachable_endpoint() {
    let srv = s3s_fs();
    let tmp = tempfile::tempdir().expect("tempdir");
    let endpoint = format!("http://127.0.0.1:{}", srv.port);
    let (creds, _) = s3_creds(tmp.path(), &endpoint, SK, "");
    let target = BackupTarget::parse("s3://nosuchbucket@us-east-1/x/").expect("url");
    let err = check_target(&target, &creds, tmp.path())
        .await
        .expect_err("missing");
    assert!(matches!(err, TargetError::BucketNotFound { .. }), "{err:?}");
    eprintln!("{err}");
    assert!(
        err.to_string()
            .contains(&format!("bucket nosuchbucket not found at {endpoint}")),
        "{err}"
    );

    let dead = format!("http://127.0.0.1:{}", free_port());
    let (creds, _) = s3_creds(tmp.path(), &dead, SK, "");
    let t0 = Instant::now();
    let err = check_target(&target, &creds, tmp.path())
        .await
        .expect_err("unreachable");
    assert!(matches!(err, TargetError::Unreachable { .. }), "{err:?}");
    eprintln!("{err}");
    assert!(
        err.to_string()
            .contains(&format!("cannot reach endpoint {dead}")),
        "{err}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "probe took {:?}",
        t0.elapsed()
    );
}

/// A forwarding HTTP proxy for plain-http requests; counts the requests it sees.
fn start_proxy(seen: Arc<AtomicUsize>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(64) {
            let Ok(mut client) = conn else { continue };
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                // Read the request head to learn the upstream (absolute-form URI).
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match client.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let Some(authority) = text
                    .split_whitespace()
                    .nth(1)
                    .and_then(|u| u.strip_prefix("http://"))
                    .and_then(|u| u.split('/').next())
                else {
                    return;
                };
                seen.fetch_add(1, Ordering::SeqCst);
                let Ok(mut upstream) = TcpStream::connect(authority) else {
                    return;
                };
                if upstream.write_all(&head).is_err() {
                    return;
                }
                // One request per connection is enough for the probe and a
                // put/get: pipe both ways until either side closes.
                let (Ok(mut up2), Ok(mut c2)) = (upstream.try_clone(), client.try_clone()) else {
                    return;
                };
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut up2);
                });
                let _ = std::io::copy(&mut upstream, &mut client);
            });
        }
    });
    port
}

#[tokio::test]
async fn s3_through_http_proxy() {
    let srv = s3s_fs();
    std::fs::create_dir(srv.root.join("backups")).expect("bucket");
    let tmp = tempfile::tempdir().expect("tempdir");
    let seen = Arc::new(AtomicUsize::new(0));
    let proxy = start_proxy(Arc::clone(&seen));
    let endpoint = format!("http://127.0.0.1:{}", srv.port);
    let (creds, _) = s3_creds(
        tmp.path(),
        &endpoint,
        SK,
        &format!("HTTP_PROXY=http://127.0.0.1:{proxy}\nHTTPS_PROXY=http://127.0.0.1:1\n"),
    );
    let target = BackupTarget::parse("s3://backups@us-east-1/p/").expect("url");
    check_target(&target, &creds, tmp.path())
        .await
        .expect("probe via proxy");
    let (store, prefix) = open_target(&target, &creds, tmp.path())
        .await
        .expect("open");
    roundtrip(&store, &prefix).await;
    assert!(seen.load(Ordering::SeqCst) >= 1, "proxy saw no request");

    // NO_PROXY bypasses it.
    let before = seen.load(Ordering::SeqCst);
    let (creds, _) = s3_creds(
        tmp.path(),
        &endpoint,
        SK,
        &format!("HTTP_PROXY=http://127.0.0.1:{proxy}\nNO_PROXY=127.0.0.1\n"),
    );
    check_target(&target, &creds, tmp.path())
        .await
        .expect("probe direct");
    assert_eq!(seen.load(Ordering::SeqCst), before, "NO_PROXY ignored");
}

#[tokio::test]
async fn s3_tls_custom_ca_with_moto() {
    let moto = tool(
        "CAIRN_MOTO_SERVER",
        "target/tools/moto/bin/moto_server",
        "install-moto",
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let certs = tmp.path().join("certs");
    let st = Command::new("bash")
        .arg(repo().join("scripts/s3-server.sh"))
        .arg("tls-certs")
        .arg(&certs)
        .status()
        .expect("run s3-server.sh tls-certs");
    assert!(st.success(), "tls-certs failed (is openssl installed?)");
    let port = free_port();
    let mut child = Command::new(moto)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .arg("-c")
        .arg(certs.join("server.pem"))
        .arg("-k")
        .arg(certs.join("server.key"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn moto_server");
    wait_listening(port, &mut child);
    let _srv = Server {
        child,
        port,
        root: certs.clone(),
        _dir: tempfile::tempdir().expect("tempdir"),
    };
    let endpoint = format!("https://127.0.0.1:{port}");
    // moto takes any key; create the bucket with a plain PUT.
    let st = Command::new("curl")
        .args(["-sf", "-X", "PUT", "--cacert"])
        .arg(certs.join("ca.pem"))
        .arg(format!("{endpoint}/tlsbucket"))
        .stdout(Stdio::null())
        .status()
        .expect("curl");
    assert!(st.success(), "create bucket on moto");
    let target = BackupTarget::parse("s3://tlsbucket@us-east-1/t/").expect("url");

    // Without the CA: a TLS error that says what to set.
    let (creds, _) = s3_creds(tmp.path(), &endpoint, SK, "");
    let err = check_target(&target, &creds, tmp.path())
        .await
        .expect_err("untrusted");
    assert!(matches!(err, TargetError::Tls { .. }), "{err:?}");
    eprintln!("{err}");
    assert!(err.to_string().contains("set AWS_CERT to the CA"), "{err}");

    // With the CA inline as a multi-line quoted PEM (a chain: CA + server cert).
    let ca = std::fs::read_to_string(certs.join("ca.pem")).expect("ca");
    let leaf = std::fs::read_to_string(certs.join("server.pem")).expect("leaf");
    let (creds, _) = s3_creds(
        tmp.path(),
        &endpoint,
        SK,
        &format!("AWS_CERT=\"{ca}{leaf}\"\n"),
    );
    check_target(&target, &creds, tmp.path())
        .await
        .expect("probe with AWS_CERT");
    let (store, prefix) = open_target(&target, &creds, tmp.path())
        .await
        .expect("open");
    roundtrip(&store, &prefix).await;

    // And from AWS_CERT_FILE, relative to the credentials file.
    std::fs::copy(certs.join("ca.pem"), tmp.path().join("ca.pem")).expect("copy");
    let (creds, _) = s3_creds(tmp.path(), &endpoint, SK, "AWS_CERT_FILE=ca.pem\n");
    check_target(&target, &creds, tmp.path())
        .await
        .expect("probe with AWS_CERT_FILE");
}

#[tokio::test]
async fn file_target_put_get() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("does/not/exist/yet");
    let target = BackupTarget::parse(&format!("file://{}", dir.display())).expect("url");
    assert_eq!(target.to_string(), format!("file://{}", dir.display()));
    let creds = Credentials::from_pairs(CredentialSource::Environment, vec![], Path::new("."))
        .expect("empty");
    check_target(&target, &creds, tmp.path())
        .await
        .expect("probe");
    let (store, prefix) = open_target(&target, &creds, tmp.path())
        .await
        .expect("open");
    roundtrip(&store, &prefix).await;
    assert!(dir.join("backupstore/volumes/v1/volume.cfg").exists());
}

#[test]
fn bad_urls_are_explained() {
    let cases = [
        (
            "s3://bucket/path/",
            "missing region: write s3://bucket@REGION/path/",
        ),
        ("s3://bucket@us-east-1/path", "missing trailing '/'"),
        ("ftp://host/x", "unknown scheme \"ftp\""),
        ("s3://@us-east-1/", "empty bucket"),
        ("s3://Bad*Bucket@us-east-1/", "invalid bucket"),
        (
            "file://backups",
            "needs an absolute path: write file:///backups",
        ),
        (
            "nfs://nas.local",
            "missing export path: write nfs://nas.local:/PATH",
        ),
    ];
    for (url, want) in cases {
        let err = BackupTarget::parse(url).expect_err(url).to_string();
        assert!(err.contains(want), "{url}: {err}");
        assert!(err.contains(url), "error names the setting: {err}");
    }
}

#[test]
fn credentials_file_formats_and_redaction() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (c, file) = creds_file(
        tmp.path(),
        &format!(
            "# Longhorn secret as a file\n\nAWS_ACCESS_KEY_ID={AK}\nAWS_SECRET_ACCESS_KEY='{SK}'\n\
             AWS_SESSION_TOKEN=TOPSECRET-token\nAWS_ENDPOINTS=https://s3.example:9000/\nHTTPS_PROXY=http://u:TOPSECRET@p:3128\nLONGHORN_EXTRA=ignored\n"
        ),
    );
    assert_eq!(c.source, CredentialSource::File(file));
    assert_eq!(c.endpoint.as_deref(), Some("https://s3.example:9000"));
    let shown = format!("{c:?}\n{c}");
    assert!(!shown.contains("TOPSECRET"), "{shown}");
    assert!(shown.contains(AK));

    let err = Credentials::from_pairs(
        CredentialSource::Environment,
        vec![("AWS_ACCESS_KEY_ID".into(), AK.into())],
        Path::new("."),
    )
    .expect_err("half pair")
    .to_string();
    assert!(err.contains("AWS_SECRET_ACCESS_KEY is not"), "{err}");
    let err = Credentials::from_pairs(
        CredentialSource::Environment,
        vec![("VIRTUAL_HOSTED_STYLE".into(), "maybe".into())],
        Path::new("."),
    )
    .expect_err("maybe")
    .to_string();
    assert!(
        err.contains("VIRTUAL_HOSTED_STYLE=\"maybe\" is not a boolean"),
        "{err}"
    );
}
