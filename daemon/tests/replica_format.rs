//! Replica format through the public API only: chains built with
//! `snapshot()` checked against a whole-volume reference model, corrupt
//! directories rejected with specific errors, and crash leftovers of
//! `atomic_write` ignored.

use std::collections::BTreeMap;
use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use cairn::fsutil;
use cairn::replica::{ReadSegment, Replica, ReplicaError, ReplicaSpec, BLOCK_SIZE};
use proptest::prelude::*;

const BS: u64 = BLOCK_SIZE;

fn spec(size: u64) -> ReplicaSpec {
    ReplicaSpec {
        volume: "vol".into(),
        replica: "vol-r1".into(),
        size,
    }
}

fn with_fd<T>(fd: RawFd, f: impl FnOnce(&File) -> T) -> T {
    // SAFETY: the fd belongs to a Replica alive for the whole call;
    // ManuallyDrop stops this File from closing it.
    let file = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    f(&file)
}

fn write(r: &Replica, off: u64, data: &[u8]) {
    with_fd(r.head_fd(), |f| f.write_all_at(data, off)).expect("pwrite head");
    r.mark_written(off, data.len() as u64);
}

/// Runs `resolve_read` and executes the segments with pread.
fn read(r: &Replica, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0x5Au8; len as usize];
    let mut covered = 0;
    let mut prev: Option<ReadSegment> = None;
    r.resolve_read(off, len, |s| {
        assert_eq!(s.buf_offset, covered, "segments out of order: {s:?}");
        assert!(s.len > 0);
        if let Some(p) = prev {
            // Coalescing: never two adjacent segments from the same source.
            assert!(p.fd != s.fd, "uncoalesced segments {p:?} {s:?}");
        }
        prev = Some(s);
        covered += s.len;
        let dst = &mut buf[s.buf_offset as usize..(s.buf_offset + s.len) as usize];
        match s.fd {
            None => dst.fill(0),
            Some(fd) => with_fd(fd, |f| f.read_exact_at(dst, s.file_offset)).expect("pread"),
        }
    });
    assert_eq!(covered, len);
    buf
}

#[derive(Debug, Clone)]
enum Op {
    /// Write `blocks` blocks at block `at`, filled with a pattern from `seed`.
    Write {
        at: u64,
        blocks: u64,
        seed: u8,
    },
    Snapshot,
    Reopen,
}

fn op_strategy(nblocks: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..nblocks, 1..12u64, any::<u8>()).prop_map(|(at, blocks, seed)| Op::Write { at, blocks, seed }),
        2 => Just(Op::Snapshot),
        1 => Just(Op::Reopen),
    ]
}

fn check_against_model(
    r: &Replica,
    model: &[u8],
    reads: &[(u64, u64)],
) -> Result<(), TestCaseError> {
    prop_assert_eq!(&read(r, 0, model.len() as u64)[..], model);
    for &(start, len) in reads {
        let start = start.min(model.len() as u64 - 1);
        let len = len.min(model.len() as u64 - start).max(1);
        prop_assert_eq!(
            &read(r, start, len)[..],
            &model[start as usize..(start + len) as usize],
            "read {}+{}",
            start,
            len
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn chain_reads_match_reference_model(
        ops in proptest::collection::vec(op_strategy(96), 1..40),
        reads in proptest::collection::vec((0..96 * BS, 1..20 * BS), 0..12),
    ) {
        let nblocks = 96;
        let size = nblocks * BS;
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path().join("r");
        let mut r = Replica::create(&dir, &spec(size)).expect("create");
        let mut model = vec![0u8; size as usize];
        let mut snaps = 0;
        for op in &ops {
            match *op {
                Op::Write { at, blocks, seed } => {
                    let blocks = blocks.min(nblocks - at);
                    let data: Vec<u8> = (0..blocks * BS)
                        .map(|i| seed.wrapping_add((i % 251) as u8) | 1)
                        .collect();
                    write(&r, at * BS, &data);
                    model[(at * BS) as usize..((at + blocks) * BS) as usize].copy_from_slice(&data);
                }
                Op::Snapshot => {
                    r.snapshot(&format!("s{snaps}"), snaps % 2 == 0, BTreeMap::new()).expect("snapshot");
                    snaps += 1;
                }
                Op::Reopen => {
                    let before = r.head_block_ranges();
                    drop(r);
                    r = Replica::open(&dir).expect("reopen");
                    // The head map rebuilt from SEEK_DATA equals the one
                    // maintained by mark_written.
                    prop_assert_eq!(r.head_block_ranges(), before);
                }
            }
            check_against_model(&r, &model, &reads)?;
        }
        prop_assert_eq!(r.chain().len(), snaps + 1);
        prop_assert_eq!(r.has_lower_layers(), snaps > 0);
        drop(r);
        let r = Replica::open(&dir).expect("final reopen");
        check_against_model(&r, &model, &reads)?;
    }
}

#[test]
fn three_layer_chain_and_holes() {
    let d = tempfile::tempdir().expect("tempdir");
    let r = Replica::create(d.path(), &spec(64 * BS)).expect("create");
    write(&r, 0, &vec![1u8; (8 * BS) as usize]);
    r.snapshot("one", true, BTreeMap::from([("k".into(), "v".into())]))
        .expect("snap");
    write(&r, 4 * BS, &vec![2u8; (8 * BS) as usize]);
    r.snapshot("two", false, BTreeMap::new()).expect("snap");
    write(&r, 10 * BS, &vec![3u8; BS as usize]);
    r.snapshot("three", true, BTreeMap::new()).expect("snap");
    let chain = r.chain();
    assert_eq!(chain.len(), 4);
    assert_eq!(chain[0].labels.get("k").map(String::as_str), Some("v"));
    assert!(chain[0].user_created && !chain[1].user_created);
    assert!(chain[3].is_head && chain[3].allocated == 0);
    let data = read(&r, 0, 64 * BS);
    let at = |b: u64| data[(b * BS) as usize];
    assert_eq!(
        [at(0), at(3), at(4), at(9), at(10), at(11), at(12), at(63)],
        [1, 1, 2, 2, 3, 2, 0, 0]
    );
    // A read entirely inside a hole is one zero segment.
    let mut segs = Vec::new();
    r.resolve_read(20 * BS, 10 * BS, |s| segs.push(s));
    assert_eq!(
        segs,
        vec![ReadSegment {
            fd: None,
            file_offset: 20 * BS,
            buf_offset: 0,
            len: 10 * BS
        }]
    );
}

fn fresh(size: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path().join("r");
    let r = Replica::create(&dir, &spec(size)).expect("create");
    r.snapshot("a", true, BTreeMap::new()).expect("snap a");
    r.snapshot("b", true, BTreeMap::new()).expect("snap b");
    (d, dir)
}

fn edit_json(path: &Path, key: &str, value: serde_json::Value) {
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json");
    match value {
        serde_json::Value::Null => {
            v.as_object_mut().expect("object").remove(key);
        }
        value => v[key] = value,
    }
    std::fs::write(path, serde_json::to_vec(&v).expect("ser")).expect("write");
}

fn open_err(dir: &Path) -> (ReplicaError, String) {
    match Replica::open(dir) {
        Ok(_) => panic!("open of a corrupt replica succeeded"),
        Err(e) => {
            let msg = e.to_string();
            (e, msg)
        }
    }
}

#[test]
fn missing_parent_is_named() {
    let (_d, dir) = fresh(16 * BS);
    std::fs::remove_file(dir.join("volume-snap-a.img")).expect("rm");
    let (e, msg) = open_err(&dir);
    assert!(matches!(e, ReplicaError::MissingLayer { .. }), "{e:?}");
    assert!(
        msg.contains("volume-snap-b.img.meta names parent volume-snap-a.img which does not exist"),
        "{msg}"
    );
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
}

#[test]
fn missing_head_and_meta() {
    let (_d, dir) = fresh(16 * BS);
    std::fs::remove_file(dir.join("volume-snap-b.img.meta")).expect("rm");
    assert!(matches!(
        open_err(&dir).0,
        ReplicaError::MissingLayerMeta { .. }
    ));
    let (_d, dir) = fresh(16 * BS);
    std::fs::remove_file(dir.join("volume-head-002.img")).expect("rm");
    let (e, msg) = open_err(&dir);
    assert!(matches!(e, ReplicaError::MissingLayer { .. }), "{e:?}");
    assert!(
        msg.contains("volume.meta names head volume-head-002.img"),
        "{msg}"
    );
}

#[test]
fn cycle_is_detected() {
    let (_d, dir) = fresh(16 * BS);
    edit_json(
        &dir.join("volume-snap-a.img.meta"),
        "parent",
        "volume-snap-b.img".into(),
    );
    let (e, msg) = open_err(&dir);
    assert!(matches!(e, ReplicaError::ChainCycle { .. }), "{e:?}");
    assert!(msg.contains("cycle"), "{msg}");
}

#[test]
fn wrong_layer_size() {
    let (_d, dir) = fresh(16 * BS);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("volume-snap-a.img"))
        .expect("open");
    f.set_len(8 * BS).expect("truncate");
    let (e, msg) = open_err(&dir);
    assert!(
        matches!(e, ReplicaError::LayerSizeMismatch { len, .. } if len == 8 * BS),
        "{e:?}"
    );
    assert!(msg.contains("volume-snap-a.img"), "{msg}");
}

#[test]
fn bad_json_missing_key_and_unknown_format() {
    let (_d, dir) = fresh(16 * BS);
    std::fs::write(dir.join("volume-snap-a.img.meta"), b"{\"name\": ").expect("write");
    let (e, msg) = open_err(&dir);
    assert!(matches!(e, ReplicaError::BadJson { .. }), "{e:?}");
    assert!(msg.contains("volume-snap-a.img.meta"), "{msg}");

    let (_d, dir) = fresh(16 * BS);
    edit_json(&dir.join("volume.meta"), "size", serde_json::Value::Null);
    let (e, msg) = open_err(&dir);
    assert!(matches!(e, ReplicaError::BadJson { .. }), "{e:?}");
    assert!(msg.contains("size"), "{msg}");

    let (_d, dir) = fresh(16 * BS);
    edit_json(&dir.join("volume.meta"), "format", 9.into());
    let (e, msg) = open_err(&dir);
    assert!(
        matches!(e, ReplicaError::UnsupportedFormat { found: 9, .. }),
        "{e:?}"
    );
    assert!(msg.contains("version 9"), "{msg}");

    // Extra keys are fine (forward compatible).
    let (_d, dir) = fresh(16 * BS);
    edit_json(&dir.join("volume.meta"), "future_field", "x".into());
    edit_json(&dir.join("volume-snap-a.img.meta"), "checksum", 12.into());
    Replica::open(&dir).expect("extra keys are ignored");
}

#[test]
fn path_traversal_in_parent_is_rejected() {
    let (_d, dir) = fresh(16 * BS);
    edit_json(
        &dir.join("volume-snap-a.img.meta"),
        "parent",
        "../volume-snap-x.img".into(),
    );
    assert!(matches!(open_err(&dir).0, ReplicaError::InvalidMeta { .. }));
}

#[test]
fn atomic_write_crash_leaves_old_content() {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path().join("r");
    let r = Replica::create(&dir, &spec(16 * BS)).expect("create");
    r.set_revision(3).expect("rev");
    drop(r);
    let vm = dir.join("volume.meta");
    let good = std::fs::read(&vm).expect("read");
    // Crash mid-write of the tmp file: a truncated copy of a newer document.
    let mut torn = good.clone();
    torn.truncate(good.len() / 2);
    std::fs::write(fsutil::tmp_path(&vm), &torn).expect("tmp");
    // And garbage left for a layer meta.
    std::fs::write(
        fsutil::tmp_path(&dir.join("volume-head-000.img.meta")),
        [0xffu8; 100],
    )
    .expect("tmp");
    let r = Replica::open(&dir).expect("open ignores tmp leftovers");
    assert_eq!(r.revision(), 3);
    assert_eq!(std::fs::read(&vm).expect("read"), good);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .expect("ls")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The next write after the "crash" works and persists.
    r.set_revision(4).expect("rev");
    drop(r);
    assert_eq!(Replica::open(&dir).expect("open").revision(), 4);
}

#[test]
fn check_files_sees_delete_and_truncate() {
    let d = tempfile::tempdir().expect("tempdir");
    let r = Replica::create(d.path(), &spec(16 * BS)).expect("create");
    r.check_files().expect("healthy");
    let head = d.path().join("volume-head-000.img");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&head)
        .expect("open")
        .set_len(BS)
        .expect("trunc");
    assert!(matches!(
        r.check_files(),
        Err(ReplicaError::HeadTruncated { .. })
    ));
    std::fs::remove_file(&head).expect("rm");
    assert!(matches!(
        r.check_files(),
        Err(ReplicaError::HeadDeleted { .. })
    ));
}

#[test]
fn replica_is_send_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Replica>();
}
