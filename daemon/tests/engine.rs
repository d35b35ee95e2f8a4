//! The engine driven in-process, without ublk: a plain io_uring stands in for
//! the ublk queue ring. Faults are real I/O errors, injected by pointing a
//! replica's open head fd (`dup2`) at `/dev/full` (writes fail with ENOSPC) or
//! at a write-only fd (reads fail with EBADF).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cairn::engine::{
    EngineEvent, IoOp, IoRequest, QueueEngine, QueueLayout, ReplicaHandle, ReplicaIo, ReplicaState,
    VolumeHealth, VolumeIo,
};
use cairn::replica::{Replica, ReplicaSpec};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;
const LAYOUT: QueueLayout = QueueLayout {
    queues: 1,
    depth: 64,
};

mod common;
use common::TestRing;

fn req(op: IoOp, offset: u64, len: usize) -> IoRequest {
    IoRequest {
        op,
        offset,
        len: len as u32,
        fua: false,
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    volume: Arc<VolumeIo>,
    replicas: Vec<Arc<Replica>>,
    events: Arc<Mutex<Vec<EngineEvent>>>,
}

fn make_replica(dir: &Path, i: usize, size: u64) -> Replica {
    let spec = ReplicaSpec {
        volume: "vol".into(),
        replica: format!("vol-r-{i}"),
        size,
    };
    Replica::create(&dir.join(format!("r{i}")), &spec).expect("create replica")
}

fn fixture_with(size: u64, n: usize, prepare: impl Fn(usize, &mut Replica)) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut replicas = Vec::new();
    for i in 0..n {
        let mut r = make_replica(dir.path(), i, size);
        prepare(i, &mut r);
        replicas.push(Arc::new(r));
    }
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let handles = replicas
        .iter()
        .enumerate()
        .map(|(i, r)| ReplicaHandle {
            name: format!("vol-r-{i}"),
            io: Some(ReplicaIo::Local(r.clone())),
        })
        .collect();
    let volume = VolumeIo::new(
        "vol",
        size,
        handles,
        Box::new(move |e| sink.lock().expect("lock").push(e)),
        LAYOUT,
    )
    .expect("volume");
    volume.begin_epoch().expect("epoch");
    Fixture {
        _dir: dir,
        volume,
        replicas,
        events,
    }
}

fn fixture(size: u64, n: usize) -> Fixture {
    fixture_with(size, n, |_, _| {})
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn head_bytes(r: &Replica, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    // SAFETY: dup of an fd the replica keeps open; the File owns the copy.
    let f = unsafe { File::from_raw_fd_dup(r.head_fd()) };
    f.read_exact_at(&mut out, offset).expect("pread head");
    out
}

trait DupFd {
    unsafe fn from_raw_fd_dup(fd: RawFd) -> File;
}
impl DupFd for File {
    unsafe fn from_raw_fd_dup(fd: RawFd) -> File {
        use std::os::fd::FromRawFd;
        // SAFETY: dup returns a new fd we own.
        unsafe { File::from_raw_fd(libc::dup(fd)) }
    }
}

/// Points `fd` at `target` (a real I/O fault for everything issued after).
fn inject(fd: RawFd, target: &File) {
    // SAFETY: both fds are open; dup2 atomically replaces `fd`.
    assert!(unsafe { libc::dup2(target.as_raw_fd(), fd) } >= 0);
}

#[test]
fn write_lands_on_every_replica_and_reads_back() {
    let f = fixture(8 * MIB, 3);
    let mut engine = QueueEngine::new(f.volume.clone(), 0, 8);
    let mut ring = TestRing::new();
    let mut data = pattern(7, 64 * 1024);
    assert_eq!(
        ring.one(&mut engine, req(IoOp::Write, MIB, data.len()), &mut data),
        data.len() as i32
    );
    for r in &f.replicas {
        assert_eq!(head_bytes(r, MIB, data.len()), data);
    }
    // Reads alternate between replicas; each must return the data.
    for _ in 0..6 {
        let mut out = vec![0u8; data.len()];
        assert_eq!(
            ring.one(&mut engine, req(IoOp::Read, MIB, out.len()), &mut out),
            out.len() as i32
        );
        assert_eq!(out, data);
    }
    let mut nothing = [];
    assert_eq!(
        ring.one(
            &mut engine,
            IoRequest {
                op: IoOp::Flush,
                ..IoRequest::default()
            },
            &mut nothing
        ),
        0
    );
    assert_eq!(f.volume.health(), VolumeHealth::Healthy);
    let stats = f.volume.stats();
    assert_eq!(
        (stats.writes, stats.reads, stats.flushes, stats.errors),
        (1, 6, 1, 0)
    );
    assert_eq!(stats.write_bytes, data.len() as u64);
}

#[test]
fn out_of_range_and_unaligned_requests_are_rejected() {
    let f = fixture(4 * MIB, 1);
    let mut engine = QueueEngine::new(f.volume.clone(), 0, 4);
    let mut ring = TestRing::new();
    let mut buf = vec![0u8; 8192];
    assert_eq!(
        ring.one(
            &mut engine,
            req(IoOp::Write, 4 * MIB - 4096, 8192),
            &mut buf
        ),
        -libc::EINVAL
    );
    assert_eq!(
        ring.one(&mut engine, req(IoOp::Read, 512, 4096), &mut buf),
        -libc::EINVAL
    );
    assert_eq!(
        ring.one(
            &mut engine,
            req(IoOp::Read, u64::MAX - 4095, 4096),
            &mut buf
        ),
        -libc::EINVAL
    );
}

#[test]
fn failed_write_leg_fails_the_replica_and_the_write_succeeds_degraded() {
    let f = fixture(4 * MIB, 2);
    let mut engine = QueueEngine::new(f.volume.clone(), 0, 4);
    let mut ring = TestRing::new();
    let rev_before = f.replicas[0].revision();
    let full = File::options()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    inject(f.replicas[1].head_fd(), &full);

    let mut data = pattern(1, 16384);
    assert_eq!(
        ring.one(&mut engine, req(IoOp::Write, 0, data.len()), &mut data),
        data.len() as i32
    );
    assert_eq!(f.volume.health(), VolumeHealth::Degraded);
    let states = f.volume.replicas();
    assert_eq!(states[0].state, ReplicaState::Healthy);
    assert_eq!(states[1].state, ReplicaState::Failed);
    assert!(
        states[1].message.contains("Write failed"),
        "{}",
        states[1].message
    );
    // The survivor's revision moved past the failed replica's, on disk.
    assert!(f.replicas[0].revision() > rev_before);
    let reopened = Replica::open(&f._dir.path().join("r0")).expect("reopen");
    assert!(reopened.revision() > f.replicas[1].revision());
    assert!(
        matches!(&f.events.lock().expect("lock")[..], [EngineEvent::ReplicaFailed { replica, .. }] if replica == "vol-r-1")
    );

    // Later I/O skips the failed replica entirely.
    let mut more = pattern(2, 4096);
    assert_eq!(
        ring.one(
            &mut engine,
            req(IoOp::Write, 8192 * 4, more.len()),
            &mut more
        ),
        4096
    );
    let mut out = vec![0u8; 16384];
    for _ in 0..4 {
        assert_eq!(
            ring.one(&mut engine, req(IoOp::Read, 0, out.len()), &mut out),
            16384
        );
        assert_eq!(out, data);
    }
}

#[test]
fn failed_read_is_retried_on_another_replica() {
    let f = fixture(4 * MIB, 2);
    let mut engine = QueueEngine::new(f.volume.clone(), 0, 4);
    let mut ring = TestRing::new();
    let mut data = pattern(3, 8192);
    assert_eq!(
        ring.one(&mut engine, req(IoOp::Write, 4096, data.len()), &mut data),
        8192
    );
    let wronly = File::options()
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    inject(f.replicas[0].head_fd(), &wronly);
    for _ in 0..3 {
        let mut out = vec![0u8; 8192];
        assert_eq!(
            ring.one(&mut engine, req(IoOp::Read, 4096, out.len()), &mut out),
            8192
        );
        assert_eq!(out, data);
    }
    assert_eq!(f.volume.replicas()[0].state, ReplicaState::Failed);
    assert_eq!(f.volume.health(), VolumeHealth::Degraded);
}

#[test]
fn short_read_from_a_truncated_head_fails_that_replica() {
    let f = fixture(4 * MIB, 2);
    let mut engine = QueueEngine::new(f.volume.clone(), 0, 4);
    let mut ring = TestRing::new();
    let mut data = pattern(9, 8192);
    assert_eq!(
        ring.one(
            &mut engine,
            req(IoOp::Write, 2 * MIB, data.len()),
            &mut data
        ),
        8192
    );
    // Someone truncates replica 0's head under the running volume: reads
    // there come back short (EOF), not with an error.
    // SAFETY: the fd is open and owned by the replica.
    assert_eq!(unsafe { libc::ftruncate(f.replicas[0].head_fd(), 0) }, 0);
    for _ in 0..4 {
        let mut out = vec![0xaau8; 8192];
        assert_eq!(
            ring.one(&mut engine, req(IoOp::Read, 2 * MIB, out.len()), &mut out),
            8192
        );
        assert_eq!(out, data);
    }
    let states = f.volume.replicas();
    assert_eq!(states[0].state, ReplicaState::Failed);
    assert!(states[0].message.contains("short"), "{}", states[0].message);
}

#[test]
fn losing_every_replica_faults_the_volume() {
    let f = fixture(4 * MIB, 2);
    let mut engine = QueueEngine::new(f.volume.clone(), 0, 4);
    let mut ring = TestRing::new();
    let full = File::options()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    for r in &f.replicas {
        inject(r.head_fd(), &full);
    }
    let mut data = pattern(4, 4096);
    assert!(ring.one(&mut engine, req(IoOp::Write, 0, 4096), &mut data) < 0);
    assert_eq!(f.volume.health(), VolumeHealth::Faulted);
    assert_eq!(
        ring.one(&mut engine, req(IoOp::Read, 0, 4096), &mut data),
        -libc::EIO
    );
}

#[test]
fn operator_cannot_fail_the_last_healthy_replica() {
    let f = fixture(4 * MIB, 2);
    f.volume
        .fail_replica("vol-r-0", "operator")
        .expect("fail first");
    assert!(f.volume.fail_replica("vol-r-1", "operator").is_err());
    assert!(f.volume.fail_replica("nope", "operator").is_err());
    assert_eq!(f.volume.health(), VolumeHealth::Degraded);
}

#[test]
fn stale_replica_leaves_the_set_at_attach() {
    let f = fixture(4 * MIB, 2);
    f.volume.fail_replica("vol-r-1", "test").expect("fail");
    let (r0, r1) = (f.replicas[0].revision(), f.replicas[1].revision());
    assert!(r0 > r1);
    // Attach again with both replicas claimed healthy: the stale one is caught.
    let handles = f
        .replicas
        .iter()
        .enumerate()
        .map(|(i, r)| ReplicaHandle {
            name: format!("vol-r-{i}"),
            io: Some(ReplicaIo::Local(r.clone())),
        })
        .collect();
    let again = VolumeIo::new("vol", 4 * MIB, handles, Box::new(|_| {}), LAYOUT).expect("volume");
    again.begin_epoch().expect("epoch");
    let states = again.replicas();
    assert_eq!(states[1].state, ReplicaState::Failed);
    assert!(states[1].message.contains("stale"), "{}", states[1].message);
}

#[test]
fn health_check_fails_a_replica_whose_head_was_deleted() {
    let f = fixture(4 * MIB, 2);
    let head = std::fs::read_dir(f._dir.path().join("r1"))
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name().is_some_and(|n| {
                n.to_string_lossy().starts_with("volume-head-")
                    && n.to_string_lossy().ends_with(".img")
            })
        })
        .expect("head file");
    std::fs::remove_file(head).expect("rm");
    f.volume.check_replicas();
    assert_eq!(f.volume.replicas()[1].state, ReplicaState::Failed);
    assert_eq!(f.volume.replicas()[0].state, ReplicaState::Healthy);
}

#[test]
fn reads_resolve_through_snapshot_layers() {
    let size = 4 * MIB;
    // Layer 0 (oldest): block 0..4 = A; layer 1: block 2..6 = B; head: block 5 = C.
    let f = fixture_with(size, 2, |_, r| {
        let head = |r: &Replica| unsafe { File::from_raw_fd_dup(r.head_fd()) };
        head(r)
            .write_all_at(&vec![b'A'; 4 * 4096], 0)
            .expect("write A");
        r.snapshot("s1", true, BTreeMap::new()).expect("snapshot 1");
        head(r)
            .write_all_at(&vec![b'B'; 4 * 4096], 2 * 4096)
            .expect("write B");
        r.snapshot("s2", true, BTreeMap::new()).expect("snapshot 2");
    });
    let mut engine = QueueEngine::new(f.volume.clone(), 0, 4);
    let mut ring = TestRing::new();
    let mut c = vec![b'C'; 4096];
    assert_eq!(
        ring.one(&mut engine, req(IoOp::Write, 5 * 4096, 4096), &mut c),
        4096
    );
    let mut expect = vec![0u8; 8 * 4096];
    expect[..4 * 4096].fill(b'A');
    expect[2 * 4096..6 * 4096].fill(b'B');
    expect[5 * 4096..6 * 4096].fill(b'C');
    for _ in 0..2 {
        let mut out = vec![0xffu8; 8 * 4096];
        assert_eq!(
            ring.one(&mut engine, req(IoOp::Read, 0, out.len()), &mut out),
            out.len() as i32
        );
        assert_eq!(out, expect);
    }
    // Write-zeroes over snapshot data must read zeros, discard must not fail.
    let mut none = [];
    assert_eq!(
        ring.one(&mut engine, req(IoOp::WriteZeroes, 0, 2 * 4096), &mut none),
        0
    );
    assert_eq!(
        ring.one(&mut engine, req(IoOp::Discard, 6 * 4096, 4096), &mut none),
        0
    );
    expect[..2 * 4096].fill(0);
    let mut out = vec![0xffu8; 8 * 4096];
    assert_eq!(
        ring.one(&mut engine, req(IoOp::Read, 0, out.len()), &mut out),
        out.len() as i32
    );
    assert_eq!(out, expect);
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        block: u64,
        blocks: u64,
        seed: u8,
        fua: bool,
    },
    Read {
        block: u64,
        blocks: u64,
    },
    Discard {
        block: u64,
        blocks: u64,
    },
    Zero {
        block: u64,
        blocks: u64,
    },
    Flush,
    /// Several writes to random places in flight at once.
    Burst(Vec<(u64, u8)>),
}

const BLOCKS: u64 = 256;

fn op() -> impl Strategy<Value = Op> {
    let range = (0..BLOCKS).prop_flat_map(|b| (Just(b), 1..=(BLOCKS - b).min(32)));
    prop_oneof![
        4 => (range.clone(), any::<u8>(), any::<bool>()).prop_map(|((block, blocks), seed, fua)| Op::Write { block, blocks, seed, fua }),
        4 => range.clone().prop_map(|(block, blocks)| Op::Read { block, blocks }),
        1 => range.clone().prop_map(|(block, blocks)| Op::Discard { block, blocks }),
        1 => range.prop_map(|(block, blocks)| Op::Zero { block, blocks }),
        1 => Just(Op::Flush),
        // Distinct blocks: concurrent overlapping writes have no defined order.
        1 => proptest::collection::btree_map(0..BLOCKS, any::<u8>(), 1..8).prop_map(|m| Op::Burst(m.into_iter().collect())),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random request sequences through io_uring against a byte-array model,
    /// over a 2-replica volume whose replicas carry a snapshot layer.
    #[test]
    fn engine_matches_model(ops in proptest::collection::vec(op(), 1..40), layered in any::<bool>()) {
        let size = BLOCKS * 4096;
        let base = pattern(99, size as usize / 2);
        let f = fixture_with(size, 2, |_, r| {
            if layered {
                let head = unsafe { File::from_raw_fd_dup(r.head_fd()) };
                head.write_all_at(&base, 4096 * 16).expect("base");
                r.snapshot("base", false, BTreeMap::new()).expect("snapshot");
            }
        });
        let mut model = vec![0u8; size as usize];
        if layered {
            model[4096 * 16..4096 * 16 + base.len()].copy_from_slice(&base);
        }
        let mut engine = QueueEngine::new(f.volume.clone(), 0, 16);
        let mut ring = TestRing::new();
        let mut none = [];
        for op in ops {
            match op {
                Op::Write { block, blocks, seed, fua } => {
                    let mut data = pattern(seed, (blocks * 4096) as usize);
                    let r = IoRequest { op: IoOp::Write, offset: block * 4096, len: data.len() as u32, fua };
                    prop_assert_eq!(ring.one(&mut engine, r, &mut data), data.len() as i32);
                    model[(block * 4096) as usize..][..data.len()].copy_from_slice(&data);
                }
                Op::Read { block, blocks } => {
                    let mut out = vec![0xeeu8; (blocks * 4096) as usize];
                    prop_assert_eq!(ring.one(&mut engine, req(IoOp::Read, block * 4096, out.len()), &mut out), out.len() as i32);
                    prop_assert!(out == model[(block * 4096) as usize..][..out.len()], "read mismatch at block {}", block);
                }
                Op::Discard { block, blocks } => {
                    prop_assert_eq!(ring.one(&mut engine, req(IoOp::Discard, block * 4096, (blocks * 4096) as usize), &mut none), 0);
                    // Data after a discard is unspecified unless the head is
                    // the only layer (then it reads zeros).
                    if !layered {
                        model[(block * 4096) as usize..][..(blocks * 4096) as usize].fill(0);
                    } else {
                        // Re-read to resync the model with what the device shows.
                        let mut out = vec![0u8; (blocks * 4096) as usize];
                        prop_assert_eq!(ring.one(&mut engine, req(IoOp::Read, block * 4096, out.len()), &mut out), out.len() as i32);
                        model[(block * 4096) as usize..][..out.len()].copy_from_slice(&out);
                    }
                }
                Op::Zero { block, blocks } => {
                    prop_assert_eq!(ring.one(&mut engine, req(IoOp::WriteZeroes, block * 4096, (blocks * 4096) as usize), &mut none), 0);
                    model[(block * 4096) as usize..][..(blocks * 4096) as usize].fill(0);
                }
                Op::Flush => {
                    prop_assert_eq!(ring.one(&mut engine, IoRequest { op: IoOp::Flush, ..IoRequest::default() }, &mut none), 0);
                }
                Op::Burst(writes) => {
                    let mut bufs: Vec<Vec<u8>> = writes.iter().map(|(_, s)| pattern(*s, 4096)).collect();
                    let reqs: Vec<_> = writes.iter().zip(bufs.iter_mut())
                        .map(|((b, _), buf)| (req(IoOp::Write, b * 4096, 4096), buf.as_mut_ptr()))
                        .collect();
                    let res = ring.run(&mut engine, &reqs);
                    prop_assert!(res.iter().all(|r| *r == 4096));
                    for ((b, _), data) in writes.iter().zip(&bufs) {
                        model[(b * 4096) as usize..][..4096].copy_from_slice(data);
                    }
                }
            }
        }
        // Every replica holds the same bytes as the model.
        prop_assert_eq!(f.volume.health(), VolumeHealth::Healthy);
        for _ in 0..2 {
            let mut out = vec![0u8; size as usize];
            let chunk = 128 * 1024;
            for (i, c) in out.chunks_mut(chunk).enumerate() {
                prop_assert_eq!(ring.one(&mut engine, req(IoOp::Read, (i * chunk) as u64, c.len()), c), c.len() as i32);
            }
            prop_assert!(out == model, "full read differs from the model");
        }
    }
}
