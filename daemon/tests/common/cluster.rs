//! A small cluster in one process: nodes with their own disks and replica
//! servers on loopback, a proxy that can freeze a connection, and the
//! engine helpers the remote-replica and failpoint tests share.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn::disks::NodeDisks;
use cairn::engine::intent::IntentLog;
use cairn::engine::{
    IoOp, IoRequest, QueueEngine, QueueLayout, RemoteReplica, RemoteTarget, ReplicaHandle,
    ReplicaIo, VolumeIo,
};
use cairn::replica::Claim;
use cairn::transport::{ClusterSecret, ReplicaServer};

use super::TestRing;

pub const MIB: u64 = 1 << 20;
pub const SIZE: u64 = 16 * MIB;
pub const LAYOUT: QueueLayout = QueueLayout {
    queues: 1,
    depth: 64,
};

pub fn secret() -> ClusterSecret {
    ClusterSecret::from_bytes(b"0123456789abcdef-test-secret").expect("secret")
}

/// One node: disks under `root`, a replica server on 127.0.0.1.
pub struct Node {
    pub root: PathBuf,
    pub disks: Arc<NodeDisks>,
    pub server: Option<ReplicaServer>,
    pub addr: String,
}

impl Node {
    pub fn new(root: &Path, name: &str) -> Node {
        let disk = root.join(name);
        std::fs::create_dir_all(disk.join("replicas")).expect("disk");
        let disks = Arc::new(NodeDisks::new(name, vec![disk]));
        let server = ReplicaServer::start(
            "127.0.0.1:0".parse().expect("addr"),
            secret(),
            disks.clone(),
        )
        .expect("server");
        let addr = server.local_addr().to_string();
        Node {
            root: root.to_path_buf(),
            disks,
            server: Some(server),
            addr,
        }
    }

    /// Stops the server and closes its connections (a killed daemon).
    pub fn kill(&mut self) {
        self.server = None;
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.restart_as(&cairn::transport::server::boot_instance());
    }

    /// Starts it again on the same port as another boot of the node (what
    /// a power loss looks like to an engine).
    pub fn restart_as(&mut self, instance: &str) {
        let addr = self.addr.parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match ReplicaServer::start_as(addr, secret(), self.disks.clone(), instance.to_string())
            {
                Ok(s) => {
                    self.server = Some(s);
                    return;
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("restart {addr}: {e}"),
            }
        }
    }

    pub fn create(&self, replica: &str) {
        self.disks
            .create("vol", replica, SIZE, None, |_| true)
            .expect("create replica");
    }

    pub fn target(&self, replica: &str, timeout: Duration) -> RemoteTarget {
        RemoteTarget {
            addr: self.addr.clone(),
            volume: "vol".into(),
            replica: replica.into(),
            secret: secret(),
            node: "engine".into(),
            timeout,
        }
    }

    pub fn remote(&self, replica: &str) -> ReplicaIo {
        ReplicaIo::Remote(Arc::new(
            RemoteReplica::connect(
                self.target(replica, Duration::from_secs(2)),
                Claim::Takeover {
                    owner: Default::default(),
                },
            )
            .expect("connect"),
        ))
    }

    /// A replica's whole content, read through its layer chain.
    pub fn content(&self, replica: &str) -> Vec<u8> {
        let r = self.disks.open("vol", replica).expect("open");
        let mut buf = vec![0u8; SIZE as usize];
        r.read_at(0, &mut buf).expect("read");
        buf
    }
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(2654435761).wrapping_add(seed * 97) >> 3) as u8)
        .collect()
}

pub fn write(ring: &mut TestRing, engine: &mut QueueEngine, offset: u64, data: &mut [u8]) -> i32 {
    ring.one(
        engine,
        IoRequest {
            op: IoOp::Write,
            offset,
            len: data.len() as u32,
            fua: false,
        },
        data,
    )
}

pub fn read(ring: &mut TestRing, engine: &mut QueueEngine, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let r = ring.one(
        engine,
        IoRequest {
            op: IoOp::Read,
            offset,
            len: len as u32,
            fua: false,
        },
        &mut buf,
    );
    assert_eq!(r, len as i32, "read at {offset}");
    buf
}

pub fn volume(handles: Vec<ReplicaHandle>) -> Arc<VolumeIo> {
    let v = VolumeIo::new("vol", SIZE, handles, Box::new(|_| {}), LAYOUT).expect("volume");
    v.begin_epoch().expect("epoch");
    v
}

/// A TCP proxy in front of one replica server that can hold every byte of
/// its connections (both directions) and release them later: a stalled
/// link, or a node frozen mid-request.
pub struct FreezingProxy {
    pub addr: String,
    frozen: Arc<AtomicBool>,
}

impl FreezingProxy {
    pub fn new(upstream: &str) -> FreezingProxy {
        let proxy = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = proxy.local_addr().expect("addr").to_string();
        let upstream = upstream.to_string();
        let frozen = Arc::new(AtomicBool::new(false));
        let f2 = frozen.clone();
        std::thread::spawn(move || {
            for c in proxy.incoming().flatten() {
                let Ok(up) = TcpStream::connect(&upstream) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (c.try_clone().expect("c"), up.try_clone().expect("u")),
                    (up, c),
                ] {
                    let f = f2.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 65536];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            while f.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
            }
        });
        FreezingProxy { addr, frozen }
    }

    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// A remote replica of `node` reached through this proxy.
    pub fn remote(&self, node: &Node, replica: &str, timeout: Duration) -> ReplicaIo {
        let mut t = node.target(replica, timeout);
        t.addr = self.addr.clone();
        ReplicaIo::Remote(Arc::new(
            RemoteReplica::connect(
                t,
                Claim::Takeover {
                    owner: Default::default(),
                },
            )
            .expect("connect through the proxy"),
        ))
    }
}

/// A volume on replica `vol-r-a` of node `a` and `vol-r-b` of node `b`,
/// both reached over TCP, its first epoch begun.
pub fn pair_volume(a: &Node, b: &Node) -> Arc<VolumeIo> {
    volume(vec![
        ReplicaHandle {
            name: "vol-r-a".into(),
            io: Some(a.remote("vol-r-a")),
        },
        ReplicaHandle {
            name: "vol-r-b".into(),
            io: Some(b.remote("vol-r-b")),
        },
    ])
}

/// Two fresh nodes `a` and `b` holding `vol-r-a` and `vol-r-b`, the pair
/// volume on them with a write-intent log at the returned path.
pub fn logged_pair(tmp: &Path) -> (Node, Node, Arc<VolumeIo>, PathBuf) {
    let (a, b) = (Node::new(tmp, "a"), Node::new(tmp, "b"));
    a.create("vol-r-a");
    b.create("vol-r-b");
    let log_path = tmp.join("vol.intent");
    let v = pair_volume(&a, &b);
    v.set_intent_log(IntentLog::create(&log_path, SIZE).expect("log"));
    (a, b, v, log_path)
}

/// Waits up to `secs` for `cond`.
pub fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Runs `f` on another thread while this one keeps the queue engine
/// answering the pause handshake (as a ublk queue thread does).
pub fn with_queue_pumped<T: Send + 'static>(
    ring: &mut TestRing,
    engine: &mut QueueEngine,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let t = std::thread::spawn(f);
    while !t.is_finished() {
        engine.poll_pause(ring, |_, _| {});
        std::thread::sleep(Duration::from_millis(1));
    }
    engine.poll_pause(ring, |_, _| {});
    t.join().expect("thread")
}
