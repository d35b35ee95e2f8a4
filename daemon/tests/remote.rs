//! Replicas on other nodes, in one process: real replica servers on
//! loopback TCP (each with its own disks), the engine on a plain io_uring
//! with remote legs answered through its completion port. Faults are real:
//! servers stopped mid-stream, a server that never answers, wrong secrets,
//! garbage on the port.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn::engine::intent::{IntentLog, Leftover};
use cairn::engine::{
    rebuild, IoOp, IoRequest, QueueEngine, RebuildProgress, RemoteReplica, ReplicaHandle,
    ReplicaIo, ReplicaState, VolumeHealth,
};
use cairn::replica::{Replica, ReplicaSpec};
use cairn::transport::{ClusterSecret, Op, PeerConn, PeerError};

mod common;
use common::cluster::*;
use common::TestRing;

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
    let v = pair_volume(&a, &b);
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
    // frozen: the proxy in front of it stops relaying.
    let proxy = FreezingProxy::new(&h.addr);
    let hung = proxy.remote(&h, "vol-r-h", Duration::from_millis(800));
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
    proxy.freeze();
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
    let v = pair_volume(&a, &b);
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
    let v = pair_volume(&a, &b);
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

// ---- Data safety under faults (issue: fencing and the acknowledgement rule).

/// Scenario 1: a write held in a stalled connection must not land on the
/// replica after the replica was rebuilt and rejoined.
#[test]
fn a_stalled_connection_cannot_land_a_write_after_the_rebuild() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = (Node::new(tmp.path(), "a"), Node::new(tmp.path(), "b"));
    a.create("vol-r-a");
    b.create("vol-r-b");
    let proxy = FreezingProxy::new(&b.addr);
    let v = volume(vec![
        ReplicaHandle {
            name: "vol-r-a".into(),
            io: Some(a.remote("vol-r-a")),
        },
        ReplicaHandle {
            name: "vol-r-b".into(),
            io: Some(proxy.remote(&b, "vol-r-b", Duration::from_millis(800))),
        },
    ]);
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    let mut d1 = pattern(1, 4096);
    assert_eq!(write(&mut ring, &mut engine, 0, &mut d1), 4096);
    proxy.freeze();
    let mut d2 = pattern(2, 4096);
    assert_eq!(
        write(&mut ring, &mut engine, 0, &mut d2),
        4096,
        "acknowledged on A alone"
    );
    assert_eq!(v.replicas()[1].state, ReplicaState::Failed);
    let mut d3 = pattern(3, 4096);
    assert_eq!(write(&mut ring, &mut engine, 0, &mut d3), 4096);
    // B comes back on a new connection; the stalled one still holds d2.
    let back = ReplicaIo::Remote(Arc::new(
        RemoteReplica::connect(
            b.target("vol-r-b", Duration::from_secs(2)),
            v.claim_for(1, "vol-r-b"),
        )
        .expect("reconnect"),
    ));
    let progress = RebuildProgress::new("vol-r-b");
    let report =
        rebuild(&v, 1, "vol-r-b", back, &progress, &AtomicBool::new(false)).expect("rebuild");
    assert!(report.incremental);
    assert_eq!(v.health(), VolumeHealth::Healthy);
    assert_eq!(b.content("vol-r-b")[..4096], d3[..]);
    // The stalled connection delivers d2 now: the server must refuse it.
    proxy.thaw();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        b.content("vol-r-b")[..4096],
        d3[..],
        "a write from the dead session landed on a healthy replica"
    );
    for _ in 0..4 {
        assert_eq!(read(&mut ring, &mut engine, 0, 4096), d3);
    }
}

/// Scenario 2: a second engine takes the volume over; the first one's
/// writes are refused, it reports itself fenced, and it moves no revision.
#[test]
fn a_second_owner_fences_the_first() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = (Node::new(tmp.path(), "a"), Node::new(tmp.path(), "b"));
    a.create("vol-r-a");
    b.create("vol-r-b");
    let handles = || {
        vec![
            ReplicaHandle {
                name: "vol-r-a".into(),
                io: Some(a.remote("vol-r-a")),
            },
            ReplicaHandle {
                name: "vol-r-b".into(),
                io: Some(b.remote("vol-r-b")),
            },
        ]
    };
    let old = volume(handles());
    let mut e_old = QueueEngine::new(old.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    let mut w1 = pattern(11, 8192);
    assert_eq!(write(&mut ring, &mut e_old, 0, &mut w1), 8192);
    // `volume adopt` on another node while this one still runs it.
    let new = volume(handles());
    let mut e_new = QueueEngine::new(new.clone(), 0, LAYOUT.depth);
    let mut ring2 = TestRing::new();
    let mut w2 = pattern(12, 8192);
    assert!(
        write(&mut ring, &mut e_old, 0, &mut w2) < 0,
        "the old owner's write was acknowledged after the takeover"
    );
    assert!(
        old.is_fenced(),
        "the old owner does not know it lost the volume"
    );
    assert_eq!(read(&mut ring2, &mut e_new, 0, 8192), w1);
    let mut w3 = pattern(13, 8192);
    assert_eq!(write(&mut ring2, &mut e_new, 0, &mut w3), 8192);
    assert!(write(&mut ring, &mut e_old, 8192, &mut w2) < 0);
    for (n, r) in [(&a, "vol-r-a"), (&b, "vol-r-b")] {
        assert_eq!(n.content(r)[..8192], w3[..]);
        let rev = n.disks.open("vol", r).expect("open").revision();
        assert_eq!(
            rev,
            new.revision(),
            "{r}'s revision was moved by the fenced owner"
        );
    }
    assert_eq!(new.health(), VolumeHealth::Healthy);
}

/// Scenario 3: a write is acknowledged only if every replica in the healthy
/// set when it completes holds it.
#[test]
fn a_write_held_only_by_a_replica_that_left_is_not_acknowledged() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (g, h) = (Node::new(tmp.path(), "g"), Node::new(tmp.path(), "h"));
    g.create("vol-r-g");
    h.create("vol-r-h");
    let proxy = FreezingProxy::new(&g.addr);
    let v = volume(vec![
        ReplicaHandle {
            name: "vol-r-g".into(),
            io: Some(proxy.remote(&g, "vol-r-g", Duration::from_millis(800))),
        },
        ReplicaHandle {
            name: "vol-r-h".into(),
            io: Some(h.remote("vol-r-h")),
        },
    ]);
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    let mut w0 = pattern(20, 4096);
    assert_eq!(write(&mut ring, &mut engine, 0, &mut w0), 4096);
    proxy.freeze();
    // H answers W at once; while G's leg hangs, H leaves the set.
    let v2 = v.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        v2.fail_replica("vol-r-h", "operator")
    });
    let mut w = pattern(21, 4096);
    let res = write(&mut ring, &mut engine, 4096, &mut w);
    t.join().expect("thread").expect("fail H");
    assert!(
        res < 0,
        "W was acknowledged on the strength of H, which had left the set"
    );
    proxy.thaw();
}

/// Scenario 8: a replica whose node rebooted (page cache lost) is not
/// resumed from the dirty map alone: it gets a full copy.
#[test]
fn a_replica_back_from_another_boot_is_not_resumed_incrementally() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, mut b) = (Node::new(tmp.path(), "a"), Node::new(tmp.path(), "b"));
    a.create("vol-r-a");
    b.create("vol-r-b");
    let v = pair_volume(&a, &b);
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    let mut d1 = pattern(31, 64 * 1024);
    assert_eq!(write(&mut ring, &mut engine, 0, &mut d1), 64 * 1024);
    b.kill();
    let mut d2 = pattern(32, 4096);
    assert_eq!(write(&mut ring, &mut engine, MIB, &mut d2), 4096);
    // Power loss on B: d1 was acknowledged but never flushed there.
    b.disks
        .open("vol", "vol-r-b")
        .expect("open")
        .write_at(0, &vec![0u8; 64 * 1024], false)
        .expect("lose d1");
    b.restart_as("another-boot");
    let back = ReplicaIo::Remote(Arc::new(
        RemoteReplica::connect(
            b.target("vol-r-b", Duration::from_secs(2)),
            v.claim_for(1, "vol-r-b"),
        )
        .expect("reconnect"),
    ));
    assert!(
        !v.would_resume(1, "vol-r-b", &back),
        "a replica from another boot would be resumed from its dirty map"
    );
    let progress = RebuildProgress::new("vol-r-b");
    let report =
        rebuild(&v, 1, "vol-r-b", back, &progress, &AtomicBool::new(false)).expect("rebuild");
    assert!(!report.incremental);
    assert_eq!(a.content("vol-r-a"), b.content("vol-r-b"));
}

/// Scenario 14: a peer call that timed out leaves no late answer behind to
/// be read as the answer to the next call.
#[test]
fn a_timed_out_peer_call_does_not_poison_the_next_one() {
    let tmp = tempfile::tempdir().expect("tmp");
    let a = Node::new(tmp.path(), "a");
    a.create("vol-r-a");
    let proxy = FreezingProxy::new(&a.addr);
    let ReplicaIo::Remote(r) = proxy.remote(&a, "vol-r-a", Duration::from_millis(400)) else {
        unreachable!()
    };
    let mut c = r.open_stream().expect("stream");
    proxy.freeze();
    assert!(c.call(Op::Ping).is_err(), "the frozen call times out");
    proxy.thaw();
    std::thread::sleep(Duration::from_millis(100));
    // The late Pong must not answer this call; the connection is dropped.
    assert!(c.is_broken());
    assert!(c.call(Op::GetRevision).is_err());
    let mut fresh = r.open_stream().expect("a new stream");
    assert!(matches!(fresh.call(Op::Ping), Ok(Op::Pong)));
}

/// Scenario 2 with a local replica: the old owner writes its own replica
/// through io_uring, not through a server. The new owner's claim (through
/// that node's server) fences the old engine and waits for its writes.
#[test]
fn a_takeover_through_the_server_fences_the_old_owners_local_replica() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (n, a) = (Node::new(tmp.path(), "n"), Node::new(tmp.path(), "a"));
    n.create("vol-r-l");
    a.create("vol-r-a");
    let local = n.disks.open("vol", "vol-r-l").expect("open local");
    let old = volume(vec![
        ReplicaHandle {
            name: "vol-r-l".into(),
            io: Some(ReplicaIo::Local(local.clone())),
        },
        ReplicaHandle {
            name: "vol-r-a".into(),
            io: Some(a.remote("vol-r-a")),
        },
    ]);
    let mut e_old = QueueEngine::new(old.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    let mut w1 = pattern(41, 4096);
    assert_eq!(write(&mut ring, &mut e_old, 0, &mut w1), 4096);
    let new = volume(vec![
        ReplicaHandle {
            name: "vol-r-l".into(),
            io: Some(n.remote("vol-r-l")),
        },
        ReplicaHandle {
            name: "vol-r-a".into(),
            io: Some(a.remote("vol-r-a")),
        },
    ]);
    assert!(old.is_fenced(), "the claim did not fence the local engine");
    let mut w2 = pattern(42, 4096);
    assert!(write(&mut ring, &mut e_old, 0, &mut w2) < 0);
    let mut e_new = QueueEngine::new(new.clone(), 0, LAYOUT.depth);
    let mut ring2 = TestRing::new();
    assert_eq!(read(&mut ring2, &mut e_new, 0, 4096), w1);
    assert_eq!(local.revision(), new.revision());
}

/// Scenario 10: the replica set a failure leaves is persisted inside the
/// commit (the epoch mark), before the write that exposed the failure is
/// acknowledged; attach trusts no replica that mark left out.
#[test]
fn a_replica_failure_is_persisted_before_the_write_is_acknowledged() {
    use cairn::control::store::EpochMark;
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, mut b) = (Node::new(tmp.path(), "a"), Node::new(tmp.path(), "b"));
    a.create("vol-r-a");
    b.create("vol-r-b");
    let v = cairn::engine::VolumeIo::new(
        "vol",
        SIZE,
        vec![
            ReplicaHandle {
                name: "vol-r-a".into(),
                io: Some(a.remote("vol-r-a")),
            },
            ReplicaHandle {
                name: "vol-r-b".into(),
                io: Some(b.remote("vol-r-b")),
            },
        ],
        Box::new(|_| {}),
        LAYOUT,
    )
    .expect("volume");
    let log: Arc<std::sync::Mutex<Vec<EpochMark>>> = Arc::default();
    let l2 = log.clone();
    v.set_epoch_log(Box::new(move |revision, healthy| {
        l2.lock().expect("log").push(EpochMark {
            revision,
            healthy: healthy.to_vec(),
        });
        Ok(())
    }));
    v.begin_epoch().expect("epoch");
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    b.kill();
    let mut d = pattern(51, 4096);
    assert_eq!(write(&mut ring, &mut engine, 0, &mut d), 4096);
    let last = log.lock().expect("log").last().cloned().expect("a mark");
    assert_eq!(last.revision, v.revision());
    assert_eq!(last.healthy, vec!["vol-r-a".to_string()]);
    // What attach makes of it after a crash with only B reachable.
    let b_rev = b.disks.open("vol", "vol-r-b").expect("open").revision();
    assert!(!last.trusts("vol-r-b", b_rev), "B would be attached alone");
    assert!(last.trusts("vol-r-a", v.revision()));
}

/// Scenario 13 (salvage): replicas at one revision that differ in a write
/// never acknowledged (in flight when the volume faulted) are not all kept:
/// reads would flip between old and new data. One is the source; the other
/// resumes from it, copying only what may differ.
#[test]
fn salvage_keeps_one_source_and_resyncs_the_others_at_its_revision() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (mut a, mut b) = (Node::new(tmp.path(), "a"), Node::new(tmp.path(), "b"));
    a.create("vol-r-a");
    b.create("vol-r-b");
    let v = pair_volume(&a, &b);
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    for i in 0..4u64 {
        let mut d = pattern(60 + i, MIB as usize);
        assert_eq!(write(&mut ring, &mut engine, i * MIB, &mut d), MIB as i32);
    }
    a.kill();
    b.kill();
    assert!(write(&mut ring, &mut engine, 0, &mut pattern(62, 4096)) < 0);
    // The failed write reached B only.
    b.disks
        .open("vol", "vol-r-b")
        .expect("open")
        .write_at(0, &pattern(63, 4096), false)
        .expect("stray write");
    a.restart();
    b.restart();
    let (ra, rb) = (a.remote("vol-r-a"), b.remote("vol-r-b"));
    assert_eq!(ra.revision(), rb.revision(), "both left in one commit");
    let kept = v
        .salvage(vec![(0, "vol-r-a".into(), ra), (1, "vol-r-b".into(), rb)])
        .expect("salvage");
    assert_eq!(kept, vec!["vol-r-a".to_string()], "one source, the first");
    let first = read(&mut ring, &mut engine, 0, 4096);
    for _ in 0..8 {
        assert_eq!(read(&mut ring, &mut engine, 0, 4096), first, "reads flip");
    }
    let back = b.remote("vol-r-b");
    assert!(
        v.would_resume(1, "vol-r-b", &back),
        "B resumes from the source, not a full rebuild"
    );
    let progress = RebuildProgress::new("vol-r-b");
    let report =
        rebuild(&v, 1, "vol-r-b", back, &progress, &AtomicBool::new(false)).expect("resync");
    assert!(report.incremental);
    assert!(
        report.copied <= 64 * 1024,
        "copies what may differ, not the volume: {}",
        report.copied
    );
    assert_eq!(a.content("vol-r-a"), b.content("vol-r-b"), "replicas agree");
    assert_eq!(v.health(), VolumeHealth::Healthy);
}

/// Scenario 13 (unclean stop): the engine dies with a write in flight that
/// reached only B; both replicas stay at one revision. The next engine
/// finds the chunk in the write-intent log, serves from one replica and
/// resyncs only the logged chunks onto the other.
#[test]
fn an_unclean_stop_serves_one_replica_and_resyncs_the_logged_chunks() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b, v, log_path) = logged_pair(tmp.path());
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    let mut d1 = pattern(71, 4096);
    assert_eq!(write(&mut ring, &mut engine, 0, &mut d1), 4096);
    b.disks
        .open("vol", "vol-r-b")
        .expect("open")
        .write_at(0, &pattern(72, 4096), false)
        .expect("in flight at the crash");
    // The crash: no flush, no close.
    drop(engine);
    drop(v);
    let Leftover::Chunks(ranges) = IntentLog::leftover(&log_path, SIZE) else {
        panic!("the log lost the written chunk");
    };
    assert_eq!(ranges, vec![(0, SIZE)]);
    let v = pair_volume(&a, &b);
    v.resync_after_unclean_stop(Some(&ranges)).expect("resync");
    assert_eq!(v.health(), VolumeHealth::Degraded);
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    for _ in 0..8 {
        assert_eq!(read(&mut ring, &mut engine, 0, 4096), d1, "reads flip");
    }
    let back = b.remote("vol-r-b");
    assert!(v.would_resume(1, "vol-r-b", &back));
    let progress = RebuildProgress::new("vol-r-b");
    let report =
        rebuild(&v, 1, "vol-r-b", back, &progress, &AtomicBool::new(false)).expect("resync");
    assert!(report.incremental);
    assert_eq!(a.content("vol-r-a"), b.content("vol-r-b"), "replicas agree");
    assert_eq!(v.health(), VolumeHealth::Healthy);
}

/// A chunk that stays quiet through a settle interval is flushed and
/// cleared; a clean close removes the log, so the next attach trusts every
/// replica at the top revision.
#[test]
fn quiet_chunks_settle_and_a_clean_close_leaves_no_resync() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (_a, _b, v, log_path) = logged_pair(tmp.path());
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    assert_eq!(
        write(&mut ring, &mut engine, 0, &mut pattern(81, 4096)),
        4096
    );
    assert_eq!(v.settle_intent(), 0, "first look: just written");
    assert_eq!(
        write(&mut ring, &mut engine, MIB, &mut pattern(82, 4096)),
        4096
    );
    assert_eq!(v.settle_intent(), 0, "written since the last look");
    assert_eq!(v.settle_intent(), 1, "quiet for a whole interval");
    assert_eq!(IntentLog::leftover(&log_path, SIZE), Leftover::Clean);
    assert_eq!(
        write(&mut ring, &mut engine, 0, &mut pattern(83, 4096)),
        4096
    );
    assert!(matches!(
        IntentLog::leftover(&log_path, SIZE),
        Leftover::Chunks(_)
    ));
    v.flush_and_close().expect("close");
    assert!(!log_path.exists());
}

/// Online growth over the replica protocol: under quiesce every healthy
/// replica grows in place (inside the owner session), the write-intent log
/// is rewritten for the new size with its set bits kept, and the new range
/// takes writes at once on both replicas. A replica out of the write set
/// keeps its size and loses its dirty map (it is replaced, never resumed);
/// a smaller size is refused and a repeat is a no-op.
#[test]
fn a_live_volume_grows_on_every_healthy_replica() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b, c) = (
        Node::new(tmp.path(), "a"),
        Node::new(tmp.path(), "b"),
        Node::new(tmp.path(), "c"),
    );
    for (n, r) in [(&a, "vol-r-a"), (&b, "vol-r-b"), (&c, "vol-r-c")] {
        n.create(r);
    }
    let v = volume(vec![
        ReplicaHandle {
            name: "vol-r-a".into(),
            io: Some(a.remote("vol-r-a")),
        },
        ReplicaHandle {
            name: "vol-r-b".into(),
            io: Some(b.remote("vol-r-b")),
        },
        ReplicaHandle {
            name: "vol-r-c".into(),
            io: Some(c.remote("vol-r-c")),
        },
    ]);
    let log_path = tmp.path().join("vol.intent");
    v.set_intent_log(IntentLog::create(&log_path, SIZE).expect("log"));
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    let mut tail = pattern(1, 65536);
    assert_eq!(
        write(&mut ring, &mut engine, SIZE - 65536, &mut tail),
        65536
    );
    v.fail_replica("vol-r-c", "test: out of the write set")
        .expect("fail c");
    assert!(v.may_resume(2, "vol-r-c"), "c tracks what it misses");
    let grow = |ring: &mut TestRing, engine: &mut QueueEngine, size: u64| {
        let v2 = v.clone();
        with_queue_pumped(ring, engine, move || v2.grow(size, Duration::from_secs(5)))
    };
    assert!(grow(&mut ring, &mut engine, SIZE / 2).is_err(), "shrink");
    let big = 3 * SIZE;
    grow(&mut ring, &mut engine, big).expect("grow");
    assert_eq!(v.size(), big);
    assert!(
        !v.may_resume(2, "vol-r-c"),
        "a replica that missed the growth must be replaced, not resumed"
    );
    // The new range is served at once, on both healthy replicas.
    let mut past = pattern(2, 131072);
    assert_eq!(
        write(&mut ring, &mut engine, 2 * SIZE + MIB, &mut past),
        131072
    );
    assert_eq!(read(&mut ring, &mut engine, 2 * SIZE + MIB, 131072), past);
    assert_eq!(read(&mut ring, &mut engine, SIZE - 65536, 65536), tail);
    let mut end = pattern(3, 4096);
    assert_eq!(write(&mut ring, &mut engine, big - 4096, &mut end), 4096);
    grow(&mut ring, &mut engine, big).expect("a repeat is a no-op");
    for (n, r) in [(&a, "vol-r-a"), (&b, "vol-r-b")] {
        let rep = n.disks.open("vol", r).expect("open");
        assert_eq!(rep.size(), big, "{r} did not grow");
        let mut buf = vec![0u8; 131072];
        rep.read_at(2 * SIZE + MIB, &mut buf).expect("read");
        assert_eq!(buf, past, "{r} lacks the write past the old end");
    }
    assert_eq!(
        c.disks.open("vol", "vol-r-c").expect("open").size(),
        SIZE,
        "the failed replica was not touched"
    );
    // The log now describes the grown volume: the write past the old end
    // is marked (chunk 2 of 16 MiB), the one before it still is.
    match IntentLog::leftover(&log_path, big) {
        Leftover::Chunks(ranges) => {
            assert!(ranges.contains(&(0, SIZE)), "{ranges:?}");
            assert!(
                ranges
                    .iter()
                    .any(|&(s, e)| s <= 2 * SIZE + MIB && e >= 2 * SIZE + MIB + 131072),
                "{ranges:?}"
            );
        }
        other => panic!("write-intent log after the growth: {other:?}"),
    }
}
