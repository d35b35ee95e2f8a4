//! Replicas on other nodes, in one process: real replica servers on
//! loopback TCP (each with its own disks), the engine on a plain io_uring
//! with remote legs answered through its completion port. Faults are real:
//! servers stopped mid-stream, a server that never answers, wrong secrets,
//! garbage on the port.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn::disks::NodeDisks;
use cairn::engine::{
    rebuild, IoOp, IoRequest, QueueEngine, QueueLayout, RebuildProgress, RemoteReplica,
    RemoteTarget, ReplicaHandle, ReplicaIo, ReplicaState, VolumeHealth, VolumeIo,
};
use cairn::replica::{Claim, Replica, ReplicaSpec};
use cairn::transport::{ClusterSecret, Op, PeerConn, PeerError, ReplicaServer};

mod common;
use common::TestRing;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const LAYOUT: QueueLayout = QueueLayout {
    queues: 1,
    depth: 64,
};

fn secret() -> ClusterSecret {
    ClusterSecret::from_bytes(b"0123456789abcdef-test-secret").expect("secret")
}

/// One node: disks under `root`, a replica server on 127.0.0.1.
struct Node {
    root: PathBuf,
    disks: Arc<NodeDisks>,
    server: Option<ReplicaServer>,
    addr: String,
}

impl Node {
    fn new(root: &Path, name: &str) -> Node {
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
    fn kill(&mut self) {
        self.server = None;
    }

    /// Starts it again on the same port.
    fn restart(&mut self) {
        let addr = self.addr.parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match ReplicaServer::start(addr, secret(), self.disks.clone()) {
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

    fn create(&self, replica: &str) {
        self.disks
            .create("vol", replica, SIZE, None, |_| true)
            .expect("create replica");
    }

    fn target(&self, replica: &str, timeout: Duration) -> RemoteTarget {
        RemoteTarget {
            addr: self.addr.clone(),
            volume: "vol".into(),
            replica: replica.into(),
            secret: secret(),
            node: "engine".into(),
            timeout,
        }
    }

    fn remote(&self, replica: &str) -> ReplicaIo {
        ReplicaIo::Remote(Arc::new(
            RemoteReplica::connect(
                self.target(replica, Duration::from_secs(2)),
                Claim::Takeover,
            )
            .expect("connect"),
        ))
    }

    /// A replica's whole content, read through its layer chain.
    fn content(&self, replica: &str) -> Vec<u8> {
        let r = self.disks.open("vol", replica).expect("open");
        let mut buf = vec![0u8; SIZE as usize];
        r.read_at(0, &mut buf).expect("read");
        buf
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(2654435761).wrapping_add(seed * 97) >> 3) as u8)
        .collect()
}

fn write(ring: &mut TestRing, engine: &mut QueueEngine, offset: u64, data: &mut [u8]) -> i32 {
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

fn read(ring: &mut TestRing, engine: &mut QueueEngine, offset: u64, len: usize) -> Vec<u8> {
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

fn volume(handles: Vec<ReplicaHandle>) -> Arc<VolumeIo> {
    let v = VolumeIo::new("vol", SIZE, handles, Box::new(|_| {}), LAYOUT).expect("volume");
    v.begin_epoch().expect("epoch");
    v
}

#[test]
fn pipelined_writes_reach_every_replica_and_reads_come_back() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = (Node::new(tmp.path(), "a"), Node::new(tmp.path(), "b"));
    a.create("vol-r-a");
    b.create("vol-r-b");
    let local_dir = tmp.path().join("local");
    let local = Arc::new(
        Replica::create(
            &local_dir,
            &ReplicaSpec {
                volume: "vol".into(),
                replica: "vol-r-l".into(),
                size: SIZE,
            },
        )
        .expect("local"),
    );
    let v = volume(vec![
        ReplicaHandle {
            name: "vol-r-l".into(),
            io: Some(ReplicaIo::Local(local.clone())),
        },
        ReplicaHandle {
            name: "vol-r-a".into(),
            io: Some(a.remote("vol-r-a")),
        },
        ReplicaHandle {
            name: "vol-r-b".into(),
            io: Some(b.remote("vol-r-b")),
        },
    ]);
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    // 48 writes of 64 KiB in flight at once on each connection.
    let mut bufs: Vec<Vec<u8>> = (0..48).map(|i| pattern(i, 64 * 1024)).collect();
    let reqs: Vec<(IoRequest, *mut u8)> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| {
            (
                IoRequest {
                    op: IoOp::Write,
                    offset: i as u64 * 320 * 1024,
                    len: b.len() as u32,
                    fua: i % 7 == 0,
                },
                b.as_mut_ptr(),
            )
        })
        .collect();
    let results = ring.run(&mut engine, &reqs);
    assert!(results.iter().all(|&r| r == 64 * 1024), "{results:?}");
    let mut flush = [0u8; 0];
    assert_eq!(
        ring.one(
            &mut engine,
            IoRequest {
                op: IoOp::Flush,
                offset: 0,
                len: 0,
                fua: false
            },
            &mut flush
        ),
        0
    );
    assert_eq!(v.health(), VolumeHealth::Healthy);
    // Every replica holds the same bytes.
    let mut want = vec![0u8; SIZE as usize];
    local.read_at(0, &mut want).expect("read local");
    assert_eq!(a.content("vol-r-a"), want);
    assert_eq!(b.content("vol-r-b"), want);
    // Reads go to the local replica while it is healthy...
    for i in 0..48u64 {
        assert_eq!(
            read(&mut ring, &mut engine, i * 320 * 1024, 64 * 1024),
            bufs[i as usize],
            "read {i}"
        );
    }
    // ...and round-robin over the remote ones without it.
    v.fail_replica("vol-r-l", "test").expect("fail local");
    let reqs: Vec<Vec<u8>> = (0..48).map(|_| vec![0u8; 64 * 1024]).collect();
    let mut reqs = reqs;
    let batch: Vec<(IoRequest, *mut u8)> = reqs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| {
            (
                IoRequest {
                    op: IoOp::Read,
                    offset: i as u64 * 320 * 1024,
                    len: b.len() as u32,
                    fua: false,
                },
                b.as_mut_ptr(),
            )
        })
        .collect();
    assert!(ring
        .run(&mut engine, &batch)
        .iter()
        .all(|&r| r == 64 * 1024));
    assert_eq!(reqs, bufs, "remote reads returned other data");
    let _ = a.root.clone();
}

#[test]
fn killed_replica_fails_fast_and_rebuilds_only_what_it_missed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, mut b) = (Node::new(tmp.path(), "a"), Node::new(tmp.path(), "b"));
    a.create("vol-r-a");
    b.create("vol-r-b");
    let v = volume(vec![
        ReplicaHandle {
            name: "vol-r-a".into(),
            io: Some(a.remote("vol-r-a")),
        },
        ReplicaHandle {
            name: "vol-r-b".into(),
            io: Some(b.remote("vol-r-b")),
        },
    ]);
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    // Fill 8 MiB while both are up.
    for i in 0..8u64 {
        let mut d = pattern(i, MIB as usize);
        assert_eq!(write(&mut ring, &mut engine, i * MIB, &mut d), MIB as i32);
    }
    b.kill();
    // The next write fails B's leg at once (connection reset), not after a timeout.
    let started = Instant::now();
    let mut d = pattern(100, 64 * 1024);
    assert_eq!(write(&mut ring, &mut engine, 9 * MIB, &mut d), 64 * 1024);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(v.replicas()[1].state, ReplicaState::Failed);
    assert_eq!(v.health(), VolumeHealth::Degraded);
    // Two more writes while B is away: 64 KiB + 128 KiB of dirty blocks.
    let mut d = pattern(101, 128 * 1024);
    assert_eq!(write(&mut ring, &mut engine, 12 * MIB, &mut d), 128 * 1024);
    b.restart();
    let back = b.remote("vol-r-b");
    assert!(
        v.can_resume(1, "vol-r-b", back.revision()),
        "B came back at the revision it left at"
    );
    let progress = RebuildProgress::new("vol-r-b");
    let report =
        rebuild(&v, 1, "vol-r-b", back, &progress, &AtomicBool::new(false)).expect("rebuild");
    assert!(report.incremental);
    assert_eq!(
        report.copied,
        192 * 1024,
        "copies exactly the blocks written while B was away"
    );
    assert_eq!(v.health(), VolumeHealth::Healthy);
    assert_eq!(a.content("vol-r-a"), b.content("vol-r-b"));
    // And B serves reads again.
    for _ in 0..4 {
        assert_eq!(read(&mut ring, &mut engine, 12 * MIB, 128 * 1024), d);
    }
}

#[test]
fn rebuild_under_concurrent_writes_converges() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = (Node::new(tmp.path(), "a"), Node::new(tmp.path(), "b"));
    a.create("vol-r-a");
    b.create("vol-r-b");
    let v = volume(vec![
        ReplicaHandle {
            name: "vol-r-a".into(),
            io: Some(a.remote("vol-r-a")),
        },
        ReplicaHandle {
            name: "vol-r-b".into(),
            io: None,
        },
    ]);
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    for i in 0..16u64 {
        let mut d = pattern(i, MIB as usize);
        assert_eq!(write(&mut ring, &mut engine, i * MIB, &mut d), MIB as i32);
    }
    // A full rebuild onto the empty B, while this thread keeps writing.
    let target = b.remote("vol-r-b");
    let (v2, done) = (v.clone(), Arc::new(AtomicBool::new(false)));
    let done2 = done.clone();
    let t = std::thread::spawn(move || {
        let progress = RebuildProgress::new("vol-r-b");
        let r = rebuild(
            &v2,
            1,
            "vol-r-b",
            target,
            &progress,
            &AtomicBool::new(false),
        );
        done2.store(true, Ordering::SeqCst);
        r
    });
    let mut n = 0u64;
    while !done.load(Ordering::SeqCst) || n < 50 {
        let mut d = pattern(1000 + n, 16 * 1024);
        let off = (n * 7919 * 4096) % (SIZE - 16 * 1024);
        assert_eq!(
            write(&mut ring, &mut engine, off & !4095, &mut d),
            16 * 1024
        );
        n += 1;
    }
    let report = t.join().expect("thread").expect("rebuild");
    assert!(!report.incremental);
    assert!(report.copied >= 16 * MIB, "copied {}", report.copied);
    assert_eq!(v.health(), VolumeHealth::Healthy);
    assert_eq!(
        a.content("vol-r-a"),
        b.content("vol-r-b"),
        "replicas differ after rebuild under load"
    );
}

#[test]
fn a_silent_replica_times_out_and_leaves_the_io_set() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, h) = (Node::new(tmp.path(), "a"), Node::new(tmp.path(), "h"));
    a.create("vol-r-a");
    h.create("vol-r-h");
    // The hung node: a real server for the handshake and Open, then it is
    // frozen by SIGSTOP-like means: we point a proxy at it and stop relaying.
    let proxy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy_addr = proxy.local_addr().expect("addr").to_string();
    let upstream = h.addr.clone();
    let frozen = Arc::new(AtomicBool::new(false));
    let f2 = frozen.clone();
    std::thread::spawn(move || {
        for c in proxy.incoming().flatten() {
            let up = TcpStream::connect(&upstream).expect("upstream");
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
    let mut t = h.target("vol-r-h", Duration::from_millis(800));
    t.addr = proxy_addr;
    let hung = ReplicaIo::Remote(Arc::new(
        RemoteReplica::connect(t, Claim::Takeover).expect("connect"),
    ));
    let v = volume(vec![
        ReplicaHandle {
            name: "vol-r-a".into(),
            io: Some(a.remote("vol-r-a")),
        },
        ReplicaHandle {
            name: "vol-r-h".into(),
            io: Some(hung),
        },
    ]);
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    let mut d = pattern(1, 4096);
    assert_eq!(write(&mut ring, &mut engine, 0, &mut d), 4096);
    frozen.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let mut d = pattern(2, 4096);
    assert_eq!(
        write(&mut ring, &mut engine, 4096, &mut d),
        4096,
        "the write completes on the live replica"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(3),
        "bounded by the timeout: {took:?}"
    );
    let st = v.replicas();
    assert_eq!(st[1].state, ReplicaState::Failed);
    assert!(
        st[1].message.contains("timed out") || st[1].message.to_lowercase().contains("time"),
        "{}",
        st[1].message
    );
    // No more waiting: the failed replica is out of the I/O set.
    let started = Instant::now();
    let mut d = pattern(3, 4096);
    assert_eq!(write(&mut ring, &mut engine, 8192, &mut d), 4096);
    assert!(started.elapsed() < Duration::from_millis(300));
}

#[test]
fn wrong_secret_and_garbage_are_rejected_and_the_server_keeps_serving() {
    let tmp = tempfile::tempdir().expect("tmp");
    let a = Node::new(tmp.path(), "a");
    a.create("vol-r-a");
    let wrong = ClusterSecret::from_bytes(b"not-the-cluster-secret!!").expect("secret");
    match PeerConn::connect(&a.addr, &wrong, "intruder", Duration::from_secs(2)) {
        Err(PeerError::Auth { .. }) => {}
        Err(e) => panic!("expected an authentication failure, got {e}"),
        Ok(_) => panic!("a peer with the wrong secret got in"),
    }
    // Random bytes, a truncated frame, a data op before the handshake.
    for junk in [
        (0..4096).map(|i| (i * 7 + 3) as u8).collect::<Vec<u8>>(),
        b"CRN2\x05\x00".to_vec(),
        {
            let mut f = Vec::new();
            cairn::transport::encode_frame(
                &mut f,
                &cairn::transport::Header {
                    request_id: 1,
                    op: Op::Read {
                        offset: 0,
                        len: 4096,
                    },
                },
                &[],
            )
            .expect("encode");
            f
        },
    ] {
        let mut s = TcpStream::connect(&a.addr).expect("connect");
        let _ = s.write_all(&junk);
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        // The server closes the connection without serving anything.
        let n = s.read(&mut buf).unwrap_or(0);
        assert!(
            n == 0 || !buf[..n].windows(4).any(|w| w == b"CRN2") || n < 64,
            "server answered garbage"
        );
    }
    let stats = a.server.as_ref().expect("server").stats();
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.rejected.load(Ordering::Relaxed) < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        stats.rejected.load(Ordering::Relaxed) >= 3,
        "rejections counted: {}",
        stats.rejected.load(Ordering::Relaxed)
    );
    // The right secret still works.
    let mut c =
        PeerConn::connect(&a.addr, &secret(), "engine", Duration::from_secs(2)).expect("good peer");
    assert_eq!(c.call(Op::Ping).expect("ping"), Op::Pong);
    match c.call(Op::Read {
        offset: 0,
        len: 4096,
    }) {
        Err(PeerError::Remote { errno, .. }) => {
            assert_eq!(errno, libc::EBADF, "data op before Open")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn salvage_recovers_from_the_newest_replicas() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (mut a, mut b) = (Node::new(tmp.path(), "a"), Node::new(tmp.path(), "b"));
    a.create("vol-r-a");
    b.create("vol-r-b");
    let v = volume(vec![
        ReplicaHandle {
            name: "vol-r-a".into(),
            io: Some(a.remote("vol-r-a")),
        },
        ReplicaHandle {
            name: "vol-r-b".into(),
            io: Some(b.remote("vol-r-b")),
        },
    ]);
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    let mut old = pattern(1, 65536);
    assert_eq!(write(&mut ring, &mut engine, 0, &mut old), 65536);
    a.kill();
    // B alone gets the newer data; its revision moves past A's.
    let mut new = pattern(2, 65536);
    assert_eq!(write(&mut ring, &mut engine, 0, &mut new), 65536);
    b.kill();
    let mut d = pattern(3, 4096);
    assert!(
        write(&mut ring, &mut engine, 0, &mut d) < 0,
        "no replica left: the write fails"
    );
    assert_eq!(v.health(), VolumeHealth::Faulted);
    a.restart();
    b.restart();
    let kept = v
        .salvage(vec![
            (0, "vol-r-a".into(), a.remote("vol-r-a")),
            (1, "vol-r-b".into(), b.remote("vol-r-b")),
        ])
        .expect("salvage");
    assert_eq!(kept, vec!["vol-r-b".to_string()], "the newest replica wins");
    assert_eq!(read(&mut ring, &mut engine, 0, 65536), new);
}

/// Runs `f` on another thread while this one keeps the queue engine
/// answering the pause handshake (as a ublk queue thread does).
fn with_queue_pumped<T: Send + 'static>(
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

#[test]
fn snapshots_reach_remote_replicas_and_a_full_rebuild_copies_the_chain() {
    use cairn::replica::ChainChange;
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b, c) = (
        Node::new(tmp.path(), "a"),
        Node::new(tmp.path(), "b"),
        Node::new(tmp.path(), "c"),
    );
    a.create("vol-r-a");
    b.create("vol-r-b");
    c.create("vol-r-c");
    let v = volume(vec![
        ReplicaHandle {
            name: "vol-r-a".into(),
            io: Some(a.remote("vol-r-a")),
        },
        ReplicaHandle {
            name: "vol-r-b".into(),
            io: Some(b.remote("vol-r-b")),
        },
    ]);
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    let snap = |name: &str| ChainChange::Snapshot {
        name: name.into(),
        created: String::new(),
        user_created: true,
        labels: Default::default(),
    };
    let change = |ring: &mut TestRing, engine: &mut QueueEngine, c: ChainChange| {
        let v2 = v.clone();
        with_queue_pumped(ring, engine, move || {
            v2.change_chain(&c, Duration::from_secs(5))
        })
    };
    let mut d = pattern(1, 4 * MIB as usize);
    assert_eq!(write(&mut ring, &mut engine, 0, &mut d), 4 * MIB as i32);
    change(&mut ring, &mut engine, snap("s1")).expect("s1");
    let mut d = pattern(2, 4 * MIB as usize);
    assert_eq!(
        write(&mut ring, &mut engine, 2 * MIB, &mut d),
        4 * MIB as i32
    );
    change(&mut ring, &mut engine, snap("s2")).expect("s2");
    let mut d = pattern(3, 2 * MIB as usize);
    assert_eq!(
        write(&mut ring, &mut engine, 6 * MIB, &mut d),
        2 * MIB as i32
    );
    change(&mut ring, &mut engine, snap("s3")).expect("s3");
    let o = change(
        &mut ring,
        &mut engine,
        ChainChange::Remove { name: "s1".into() },
    )
    .expect("remove s1");
    assert!(o.coalesced, "s1's child s2 is a snapshot: merged");
    let o = change(
        &mut ring,
        &mut engine,
        ChainChange::Remove { name: "s3".into() },
    )
    .expect("mark s3");
    assert!(!o.coalesced, "s3's child is the head: only marked");
    let mut d = pattern(4, MIB as usize);
    assert_eq!(write(&mut ring, &mut engine, 9 * MIB, &mut d), MIB as i32);
    let chain_of = |n: &Node, r: &str| -> Vec<(String, bool, String)> {
        n.disks
            .open("vol", r)
            .expect("open")
            .chain()
            .into_iter()
            .map(|l| (l.file, l.removed, l.created))
            .collect()
    };
    assert_eq!(
        chain_of(&a, "vol-r-a"),
        chain_of(&b, "vol-r-b"),
        "both replicas took every change"
    );
    assert_eq!(a.content("vol-r-a"), b.content("vol-r-b"));

    // Replace B by a fresh C: a full rebuild copies s2 and s3, then the head.
    v.fail_replica("vol-r-b", "test").expect("fail b");
    let progress = RebuildProgress::new("vol-r-c");
    let report = rebuild(
        &v,
        1,
        "vol-r-c",
        c.remote("vol-r-c"),
        &progress,
        &AtomicBool::new(false),
    )
    .expect("rebuild");
    assert!(!report.incremental);
    assert_eq!(
        report.copied, MIB,
        "only the head's data goes through the live copy"
    );
    let (ca, cc) = (chain_of(&a, "vol-r-a"), chain_of(&c, "vol-r-c"));
    let strip = |v: Vec<(String, bool, String)>| -> Vec<(String, bool, String)> {
        v.into_iter()
            .map(|(f, r, t)| {
                if f.starts_with("volume-head") {
                    (String::new(), r, String::new())
                } else {
                    (f, r, t)
                }
            })
            .collect()
    };
    assert_eq!(
        strip(ca),
        strip(cc),
        "the rebuilt replica has the same snapshots, times and marks"
    );
    assert_eq!(a.content("vol-r-a"), c.content("vol-r-c"));
    for s in ["s2", "s3"] {
        let view = |n: &Node, r: &str| {
            let view = n
                .disks
                .open("vol", r)
                .expect("open")
                .snapshot_view(s)
                .expect("view");
            let mut buf = vec![0u8; SIZE as usize];
            view.read_at(0, &mut buf).expect("read view");
            buf
        };
        assert_eq!(
            view(&a, "vol-r-a"),
            view(&c, "vol-r-c"),
            "snapshot {s} differs after rebuild"
        );
    }
    // Chain changes are refused while a rebuild runs; a fresh epoch works.
    assert_eq!(v.health(), VolumeHealth::Healthy);
}
