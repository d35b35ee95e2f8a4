//! What the CSI test suites share: a real cairnd child process and the
//! driver in process on its own socket, clients over that socket, and
//! request builders.
#![allow(clippy::unwrap_used, dead_code)]

pub mod pod;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_csi::pb::controller_client::ControllerClient;
use cairn_csi::pb::node_client::NodeClient;
use cairn_csi::pb::volume_capability::access_mode::Mode;
use cairn_csi::pb::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use cairn_csi::pb::*;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

pub const MIB: i64 = 1 << 20;

/// The workspace's `cairnd`, built next to this test by `cargo test
/// --workspace` (or `cargo build --workspace`); `CAIRND_BIN` overrides.
pub fn cairnd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CAIRND_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/conformance-<hash>
    let bin = exe.parent().unwrap().parent().unwrap().join("cairnd");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (`cargo build --release --workspace`) or set CAIRND_BIN",
        bin.display()
    );
    bin
}

/// A cairnd and the driver in front of it; both stop when dropped.
pub struct Env {
    pub cairnd: Child,
    pub cairnd_socket: PathBuf,
    pub csi_socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub _tmp: tempfile::TempDir,
}

impl Drop for Env {
    /// Unmounts what a failed test left mounted under its directory, then
    /// stops cairnd with SIGTERM (it detaches its volumes, so no ublk device
    /// is left parked), killing it only if it does not exit.
    fn drop(&mut self) {
        if let Ok(list) = cairn_csi::mounts::mounts() {
            for m in list
                .iter()
                .rev()
                .filter(|m| m.target.starts_with(self._tmp.path()))
            {
                let _ = Command::new("umount").arg("-l").arg(&m.target).status();
            }
        }
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(self.cairnd.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if matches!(self.cairnd.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.cairnd.kill();
        let _ = self.cairnd.wait();
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub async fn wait_socket(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(path).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not open {} within 30 s",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Env {
    pub async fn start() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let cairnd_socket = tmp.path().join("cairnd.sock");
        for d in ["d1", "d2"] {
            std::fs::create_dir(tmp.path().join(d)).unwrap();
        }
        let cairnd = Command::new(cairnd_bin())
            .arg("--data-dir")
            .arg(tmp.path().join("data"))
            .arg("--socket")
            .arg(&cairnd_socket)
            .arg("--disk")
            .arg(tmp.path().join("d1"))
            .arg("--disk")
            .arg(tmp.path().join("d2"))
            .args([
                "--node-id",
                "node-a",
                "--queues",
                "1",
                "--log-level",
                "warn",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        wait_socket(&cairnd_socket, "cairnd").await;
        // The host's filesystem may sit below the default 25 % free rule.
        let mut c = cairn_api::connect(&cairnd_socket).await.unwrap();
        c.set_setting(cairn_api::pb::SetSettingRequest {
            name: "storage-minimal-available-percentage".into(),
            value: "0".into(),
        })
        .await
        .unwrap();
        let csi_socket = tmp.path().join("csi/csi.sock");
        let tx = start_driver(&cairnd_socket, "node-a", &csi_socket).await;
        Env {
            cairnd,
            cairnd_socket,
            csi_socket,
            stop: Some(tx),
            _tmp: tmp,
        }
    }

    pub async fn channel(&self) -> Channel {
        csi_channel(&self.csi_socket).await
    }

    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }

    pub async fn cairn(&self) -> cairn_api::pb::cairn_client::CairnClient<Channel> {
        cairn_api::connect(&self.cairnd_socket).await.unwrap()
    }

    /// Whether cairnd's kernel resizes a live device (`node get`).
    pub async fn online_expansion(&self) -> bool {
        self.cairn()
            .await
            .get_node(cairn_api::pb::GetNodeRequest {})
            .await
            .unwrap()
            .into_inner()
            .online_expansion
    }

    pub async fn volume_names(&self) -> Vec<String> {
        let mut c = self.cairn().await;
        let mut v: Vec<String> = c
            .list_volumes(cairn_api::pb::ListVolumesRequest {})
            .await
            .unwrap()
            .into_inner()
            .volumes
            .into_iter()
            .map(|v| v.name)
            .collect();
        v.sort();
        v
    }
}

/// Serves the driver (mode `all`) for `node_id` in this process on
/// `csi_socket`, in front of the cairnd at `cairnd_socket`; it stops when
/// the sender is dropped or fires.
pub async fn start_driver(
    cairnd_socket: &Path,
    node_id: &str,
    csi_socket: &Path,
) -> tokio::sync::oneshot::Sender<()> {
    let config = cairn_csi::DriverConfig {
        endpoint: csi_socket.to_path_buf(),
        node_id: node_id.into(),
        cairnd_socket: cairnd_socket.to_path_buf(),
        mode: cairn_csi::Mode::All,
        driver_name: cairn_csi::DEFAULT_DRIVER_NAME.into(),
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(cairn_csi::serve(config, async {
        let _ = rx.await;
    }));
    wait_socket(csi_socket, "cairn-csi").await;
    tx
}

/// A client channel over a driver's Unix socket.
pub async fn csi_channel(csi_socket: &Path) -> Channel {
    let path = csi_socket.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap()
}

/// ListSnapshots by snapshot id.
pub async fn snapshots_by_id(
    c: &mut ControllerClient<Channel>,
    id: &str,
) -> Vec<list_snapshots_response::Entry> {
    c.list_snapshots(ListSnapshotsRequest {
        snapshot_id: id.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .entries
}

pub fn mount_cap(fs: &str, mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        })),
    }
}

pub fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

pub fn create_req(name: &str, required: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap("ext4", Mode::SingleNodeWriter)],
        parameters: HashMap::from([("numberOfReplicas".into(), "2".into())]),
        ..Default::default()
    }
}

/// Expects `code`, with a message containing `needle`.
pub fn expect_err<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    needle: &str,
) {
    match r {
        Ok(v) => panic!("expected {code:?} ({needle}), got {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(
                s.message().contains(needle),
                "{:?} does not mention {needle:?}",
                s.message()
            );
        }
    }
}
