//! Unit tests of the replica directory format, maps and crash recovery.

use super::*;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

const MIB: u64 = 1 << 20;

fn spec(size: u64) -> ReplicaSpec {
    ReplicaSpec {
        volume: "vol".into(),
        replica: "vol-r1".into(),
        size,
    }
}

fn with_fd<T>(fd: RawFd, f: impl FnOnce(&File) -> T) -> T {
    // SAFETY: `fd` is owned by a live Replica for the whole call, and
    // ManuallyDrop keeps this borrowed File from closing it.
    let file = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    f(&file)
}

/// Writes `data` to the head at `off` the way the I/O path does.
fn write(r: &Replica, off: u64, data: &[u8]) {
    with_fd(r.head_fd(), |f| f.write_all_at(data, off)).unwrap();
    r.mark_written(off, data.len() as u64);
}

/// Executes `resolve_read` with pread, as the I/O path does.
fn read(r: &Replica, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0xAAu8; len as usize];
    let mut next = 0;
    r.resolve_read(off, len, |s| {
        assert_eq!(s.buf_offset, next, "segments must be consecutive");
        next += s.len;
        let dst = &mut buf[s.buf_offset as usize..(s.buf_offset + s.len) as usize];
        match s.fd {
            None => dst.fill(0),
            Some(fd) => with_fd(fd, |f| f.read_exact_at(dst, s.file_offset)).unwrap(),
        }
    });
    assert_eq!(next, len);
    buf
}

fn segments(r: &Replica, off: u64, len: u64) -> Vec<ReadSegment> {
    let mut v = Vec::new();
    r.resolve_read(off, len, |s| v.push(s));
    v
}

#[test]
fn create_open_roundtrip() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("r");
    let r = Replica::create(&dir, &spec(4 * MIB)).unwrap();
    assert_eq!(r.size(), 4 * MIB);
    assert_eq!(r.revision(), 0);
    assert!(!r.has_lower_layers());
    assert_eq!(r.volume_name(), "vol");
    assert_eq!(r.replica_name(), "vol-r1");
    assert_eq!(r.dir(), dir.as_path());
    drop(r);
    let r = Replica::open(&dir).unwrap();
    let chain = r.chain();
    assert_eq!(chain.len(), 1);
    assert_eq!(chain[0].file, "volume-head-000.img");
    assert!(chain[0].is_head && chain[0].parent.is_empty() && chain[0].allocated == 0);
    assert!(matches!(
        Replica::create(&dir, &spec(MIB)),
        Err(ReplicaError::AlreadyExists { .. })
    ));
}

#[test]
fn create_rejects_bad_size_and_names() {
    let d = tempfile::tempdir().unwrap();
    for size in [0, 4095, 4097] {
        assert!(matches!(
            Replica::create(&d.path().join("x"), &spec(size)),
            Err(ReplicaError::InvalidSize { .. })
        ));
    }
    let bad = ReplicaSpec {
        volume: "Bad_Name".into(),
        ..spec(MIB)
    };
    assert!(matches!(
        Replica::create(&d.path().join("y"), &bad),
        Err(ReplicaError::InvalidName(_))
    ));
    assert!(matches!(
        Replica::open(&d.path().join("z")),
        Err(ReplicaError::NotAReplica { .. })
    ));
}

#[test]
fn revision_persists() {
    let d = tempfile::tempdir().unwrap();
    let r = Replica::create(d.path(), &spec(MIB)).unwrap();
    r.set_revision(42).unwrap();
    assert_eq!(r.revision(), 42);
    drop(r);
    assert_eq!(Replica::open(d.path()).unwrap().revision(), 42);
}

#[test]
fn single_layer_read_is_one_head_segment() {
    let d = tempfile::tempdir().unwrap();
    let r = Replica::create(d.path(), &spec(MIB)).unwrap();
    write(&r, 8192, b"hello");
    let segs = segments(&r, 4096, 3 * 4096);
    assert_eq!(
        segs,
        vec![ReadSegment {
            fd: Some(r.head_fd()),
            file_offset: 4096,
            buf_offset: 0,
            len: 3 * 4096
        }]
    );
    let b = read(&r, 8192, 4096);
    assert_eq!(&b[..5], b"hello");
    assert!(b[5..].iter().all(|&x| x == 0));
}

#[test]
fn map_built_at_open_equals_marked_map() {
    let d = tempfile::tempdir().unwrap();
    let r = Replica::create(d.path(), &spec(8 * MIB)).unwrap();
    let block = vec![7u8; BLOCK_SIZE as usize];
    for b in [0u64, 1, 2, 63, 64, 65, 200, 1000, 2047] {
        write(&r, b * BLOCK_SIZE, &block);
    }
    write(&r, 500 * BLOCK_SIZE, &vec![1u8; 10 * BLOCK_SIZE as usize]);
    let marked = r.head_block_ranges();
    assert_eq!(
        marked,
        vec![
            (0, 3),
            (63, 66),
            (200, 201),
            (500, 510),
            (1000, 1001),
            (2047, 2048)
        ]
    );
    drop(r);
    let r = Replica::open(d.path()).unwrap();
    assert_eq!(r.head_block_ranges(), marked);
    // After a snapshot the same blocks form the lower map.
    let r = r;
    r.snapshot("s1", true, BTreeMap::new()).unwrap();
    let lower: Vec<(u64, u64)> = r.lower_extents().iter().map(|x| (x.start, x.end)).collect();
    assert_eq!(lower, marked);
    assert!(r.head_block_ranges().is_empty());
}

#[test]
fn segments_coalesce_and_pick_newest() {
    let d = tempfile::tempdir().unwrap();
    let r = Replica::create(d.path(), &spec(MIB)).unwrap();
    let bs = BLOCK_SIZE as usize;
    write(&r, 0, &vec![1u8; 4 * bs]); // base: blocks 0..4
    r.snapshot("a", true, BTreeMap::new()).unwrap();
    write(&r, 2 * BLOCK_SIZE, &vec![2u8; 4 * bs]); // snap b: blocks 2..6
    r.snapshot("b", false, BTreeMap::new()).unwrap();
    write(&r, 3 * BLOCK_SIZE, &vec![3u8; bs]); // head: block 3
    let fds: Vec<RawFd> = r.chain_now().fds.clone();
    assert_eq!(fds.len(), 3);
    let segs = segments(&r, 0, 8 * BLOCK_SIZE);
    let b = BLOCK_SIZE;
    assert_eq!(
        segs,
        vec![
            ReadSegment {
                fd: Some(fds[0]),
                file_offset: 0,
                buf_offset: 0,
                len: 2 * b
            },
            ReadSegment {
                fd: Some(fds[1]),
                file_offset: 2 * b,
                buf_offset: 2 * b,
                len: b
            },
            ReadSegment {
                fd: Some(fds[2]),
                file_offset: 3 * b,
                buf_offset: 3 * b,
                len: b
            },
            ReadSegment {
                fd: Some(fds[1]),
                file_offset: 4 * b,
                buf_offset: 4 * b,
                len: 2 * b
            },
            ReadSegment {
                fd: None,
                file_offset: 6 * b,
                buf_offset: 6 * b,
                len: 2 * b
            },
        ]
    );
    let data = read(&r, 0, 8 * BLOCK_SIZE);
    let expect: Vec<u8> = [1u8, 1, 2, 3, 2, 2, 0, 0]
        .iter()
        .flat_map(|&v| vec![v; bs])
        .collect();
    assert_eq!(data, expect);
    let chain = r.chain();
    let files: Vec<&str> = chain.iter().map(|l| l.file.as_str()).collect();
    assert_eq!(
        files,
        [
            "volume-snap-a.img",
            "volume-snap-b.img",
            "volume-head-002.img"
        ]
    );
    assert_eq!(chain[0].snapshot.as_deref(), Some("a"));
    assert_eq!(chain[1].parent, "volume-snap-a.img");
    assert_eq!(chain[2].parent, "volume-snap-b.img");
    assert_eq!(chain[0].allocated, 4 * b);
    assert_eq!(chain[2].allocated, b);
}

#[test]
fn snapshot_rejects_bad_and_duplicate_names() {
    let d = tempfile::tempdir().unwrap();
    let r = Replica::create(d.path(), &spec(MIB)).unwrap();
    assert!(matches!(
        r.snapshot("Bad", true, BTreeMap::new()),
        Err(ReplicaError::InvalidName(_))
    ));
    r.snapshot("a", true, BTreeMap::new()).unwrap();
    assert!(matches!(
        r.snapshot("a", true, BTreeMap::new()),
        Err(ReplicaError::SnapshotExists { .. })
    ));
    // The failed attempt changed nothing.
    assert_eq!(Replica::open(d.path()).unwrap().chain().len(), 2);
}

#[test]
fn crash_before_snapshot_commit_keeps_old_chain() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let r = Replica::create(dir, &spec(MIB)).unwrap();
    write(&r, 0, b"data");
    drop(r);
    // Steps 2-4 of snapshot() done, step 5 (volume.meta) not.
    let snap_meta = LayerMeta {
        name: "volume-snap-x.img".into(),
        parent: String::new(),
        created: "0".into(),
        user_created: true,
        removed: false,
        labels: BTreeMap::new(),
    };
    write_layer_meta(dir, &snap_meta).unwrap();
    std::fs::hard_link(
        dir.join("volume-head-000.img"),
        dir.join("volume-snap-x.img"),
    )
    .unwrap();
    create_sparse(&dir.join("volume-head-001.img"), MIB).unwrap();
    let head_meta = LayerMeta {
        name: "volume-head-001.img".into(),
        parent: "volume-snap-x.img".into(),
        ..snap_meta
    };
    write_layer_meta(dir, &head_meta).unwrap();

    let r = Replica::open(dir).unwrap();
    assert_eq!(r.chain().len(), 1);
    assert_eq!(&read(&r, 0, 4)[..], b"data");
    for leftover in [
        "volume-snap-x.img",
        "volume-snap-x.img.meta",
        "volume-head-001.img",
        "volume-head-001.img.meta",
    ] {
        assert!(!dir.join(leftover).exists(), "{leftover} not cleaned");
    }
    // And the same snapshot can now be taken for real.
    r.snapshot("x", true, BTreeMap::new()).unwrap();
    assert_eq!(&read(&r, 0, 4)[..], b"data");
}

#[test]
fn crash_after_snapshot_commit_uses_new_chain() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let r = Replica::create(dir, &spec(MIB)).unwrap();
    write(&r, 0, b"data");
    // Keep the old head's names alive, as if step 6 had not run.
    std::fs::hard_link(dir.join("volume-head-000.img"), dir.join("keep.img")).unwrap();
    std::fs::copy(dir.join("volume-head-000.img.meta"), dir.join("keep.meta")).unwrap();
    r.snapshot("x", true, BTreeMap::new()).unwrap();
    drop(r);
    std::fs::rename(dir.join("keep.img"), dir.join("volume-head-000.img")).unwrap();
    std::fs::rename(dir.join("keep.meta"), dir.join("volume-head-000.img.meta")).unwrap();

    let r = Replica::open(dir).unwrap();
    let files: Vec<String> = r.chain().into_iter().map(|l| l.file).collect();
    assert_eq!(files, ["volume-snap-x.img", "volume-head-001.img"]);
    assert_eq!(&read(&r, 0, 4)[..], b"data");
    assert!(!dir.join("volume-head-000.img").exists());
    assert!(!dir.join("volume-head-000.img.meta").exists());
}

#[test]
fn check_files_detects_changes() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let r = Replica::create(dir, &spec(MIB)).unwrap();
    r.check_files().unwrap();
    let head = dir.join("volume-head-000.img");

    std::fs::OpenOptions::new()
        .write(true)
        .open(&head)
        .unwrap()
        .set_len(4096)
        .unwrap();
    match r.check_files() {
        Err(
            e @ ReplicaError::HeadTruncated {
                len: 4096,
                expected: MIB,
                ..
            },
        ) => {
            assert!(
                e.to_string()
                    .contains("truncated to 4096 bytes, expected 1048576"),
                "{e}"
            )
        }
        other => panic!("{other:?}"),
    }
    with_fd(r.head_fd(), |f| f.set_len(MIB)).unwrap();
    r.check_files().unwrap();

    std::fs::rename(&head, dir.join("moved")).unwrap();
    std::fs::write(&head, vec![0u8; MIB as usize]).unwrap();
    assert!(matches!(
        r.check_files(),
        Err(ReplicaError::HeadReplaced { .. })
    ));

    std::fs::remove_file(&head).unwrap();
    match r.check_files() {
        Err(e @ ReplicaError::HeadDeleted { .. }) => {
            assert!(
                e.to_string().contains("volume-head-000.img was deleted"),
                "{e}"
            )
        }
        other => panic!("{other:?}"),
    }
    std::fs::rename(dir.join("moved"), &head).unwrap();
    r.check_files().unwrap();

    std::fs::write(dir.join("volume.meta"), b"{not json").unwrap();
    assert!(matches!(r.check_files(), Err(ReplicaError::BadJson { .. })));
}

#[test]
fn open_removes_tmp_leftovers() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    Replica::create(dir, &spec(MIB))
        .unwrap()
        .set_revision(5)
        .unwrap();
    std::fs::write(dir.join("volume.meta.tmp"), b"{\"format\":1, \"revis").unwrap();
    std::fs::write(dir.join("volume-head-000.img.meta.tmp"), b"\0\0garbage").unwrap();
    let r = Replica::open(dir).unwrap();
    assert_eq!(r.revision(), 5);
    assert!(!dir.join("volume.meta.tmp").exists());
    assert!(!dir.join("volume-head-000.img.meta.tmp").exists());
}

fn snaps(r: &Replica) -> Vec<(String, bool)> {
    r.chain()
        .into_iter()
        .filter_map(|l| l.snapshot.map(|s| (s, l.removed)))
        .collect()
}

/// Remove marks, coalesces into a snapshot child, and never changes what
/// the head or a later snapshot reads.
#[test]
fn remove_coalesce_purge_keep_data() {
    let d = tempfile::tempdir().unwrap();
    let r = Replica::create(&d.path().join("r"), &spec(4 * MIB)).unwrap();
    write(&r, 0, &[1u8; 8192]);
    write(&r, MIB, &[2u8; 4096]);
    r.snapshot("a", true, BTreeMap::new()).unwrap();
    write(&r, 4096, &[3u8; 4096]);
    r.snapshot("b", true, BTreeMap::new()).unwrap();
    write(&r, 2 * MIB, &[4u8; 4096]);
    let before = read(&r, 0, 4 * MIB);
    let b_before = {
        let v = r.snapshot_view("b").unwrap();
        let mut buf = vec![0u8; (4 * MIB) as usize];
        v.read_at(0, &mut buf).unwrap();
        buf
    };
    // b's child is the head: only marked.
    assert_eq!(r.remove_snapshot("b").unwrap(), Removal::Marked);
    assert_eq!(snaps(&r), vec![("a".into(), false), ("b".into(), true)]);
    // a's child is b: merged away; b now holds a's blocks.
    assert_eq!(r.remove_snapshot("a").unwrap(), Removal::Coalesced);
    assert_eq!(snaps(&r), vec![("b".into(), true)]);
    assert_eq!(read(&r, 0, 4 * MIB), before);
    let v = r.snapshot_view("b").unwrap();
    let mut buf = vec![0u8; (4 * MIB) as usize];
    v.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, b_before);
    assert!(!d.path().join("r").join("volume-snap-a.img").exists());
    // After a new snapshot, purge merges the removed b into c.
    r.snapshot("c", true, BTreeMap::new()).unwrap();
    assert_eq!(r.purge().unwrap(), vec!["b".to_string()]);
    assert_eq!(snaps(&r), vec![("c".into(), false)]);
    assert_eq!(read(&r, 0, 4 * MIB), before);
    // And the result survives a reopen.
    let again = Replica::open(&d.path().join("r")).unwrap();
    assert_eq!(read(&again, 0, 4 * MIB), before);
    assert!(matches!(
        r.remove_snapshot("zzz"),
        Err(ReplicaError::SnapshotNotFound { .. })
    ));
}

#[test]
fn revert_drops_newer_layers_and_head() {
    let d = tempfile::tempdir().unwrap();
    let r = Replica::create(&d.path().join("r"), &spec(MIB)).unwrap();
    write(&r, 0, &[1u8; 4096]);
    r.snapshot("a", true, BTreeMap::new()).unwrap();
    write(&r, 0, &[2u8; 4096]);
    r.snapshot("b", true, BTreeMap::new()).unwrap();
    write(&r, 4096, &[3u8; 4096]);
    assert_eq!(r.revert("a").unwrap(), vec!["b".to_string()]);
    let got = read(&r, 0, 8192);
    assert!(got[..4096].iter().all(|&b| b == 1));
    assert!(got[4096..].iter().all(|&b| b == 0));
    assert_eq!(snaps(&r), vec![("a".into(), false)]);
    let again = Replica::open(&d.path().join("r")).unwrap();
    assert_eq!(read(&again, 0, 8192), got);
}

#[test]
fn changed_between_lists_newer_layers_only() {
    let d = tempfile::tempdir().unwrap();
    let r = Replica::create(&d.path().join("r"), &spec(4 * MIB)).unwrap();
    write(&r, 0, &[1u8; 4096]);
    r.snapshot("a", true, BTreeMap::new()).unwrap();
    write(&r, MIB, &[2u8; 8192]);
    r.snapshot("b", true, BTreeMap::new()).unwrap();
    write(&r, 2 * MIB, &[3u8; 4096]);
    r.snapshot("c", true, BTreeMap::new()).unwrap();
    assert_eq!(
        r.changed_between("a", "c").unwrap(),
        Some(vec![(MIB, 8192), (2 * MIB, 4096)])
    );
    assert_eq!(
        r.changed_between("b", "c").unwrap(),
        Some(vec![(2 * MIB, 4096)])
    );
    assert_eq!(r.changed_between("gone", "c").unwrap(), None);
    assert_eq!(
        r.snapshot_view("b").unwrap().data_ranges(),
        vec![(0, 4096), (MIB, 8192)]
    );
    assert!(!r.head_has_data());
    write(&r, 0, &[9u8; 4096]);
    assert!(r.head_has_data());
}

#[test]
fn expand_grows_every_layer_keeps_data_and_survives_an_interrupted_commit() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("r");
    let r = Replica::create(&dir, &spec(4 * MIB)).unwrap();
    write(&r, 0, &[1u8; 4096]);
    r.snapshot("s1", true, BTreeMap::new()).unwrap();
    write(&r, 4096, &[2u8; 4096]);
    drop(r);
    // Refusals change nothing.
    assert!(matches!(
        Replica::expand(&dir, 2 * MIB),
        Err(ReplicaError::Shrink { .. })
    ));
    assert!(matches!(
        Replica::expand(&dir, 8 * MIB + 1),
        Err(ReplicaError::InvalidSize { .. })
    ));
    assert_eq!(Replica::open(&dir).unwrap().size(), 4 * MIB);

    Replica::expand(&dir, 8 * MIB).unwrap();
    let r = Replica::open(&dir).unwrap();
    assert_eq!(r.size(), 8 * MIB);
    assert_eq!(read(&r, 0, 4096), vec![1u8; 4096], "snapshot data");
    assert_eq!(read(&r, 4096, 4096), vec![2u8; 4096], "head data");
    assert_eq!(read(&r, 6 * MIB, 4096), vec![0u8; 4096], "the new range");
    write(&r, 7 * MIB, &[3u8; 4096]);
    assert_eq!(read(&r, 7 * MIB, 4096), vec![3u8; 4096]);
    r.check_files().unwrap();
    drop(r);
    Replica::expand(&dir, 8 * MIB).unwrap();

    // Interrupted before the commit: layers longer than the size; it opens
    // at the old size and the next expansion completes.
    for l in Replica::open(&dir).unwrap().chain() {
        let f = OpenOptions::new()
            .write(true)
            .open(dir.join(&l.file))
            .unwrap();
        f.set_len(12 * MIB).unwrap();
    }
    let r = Replica::open(&dir).unwrap();
    assert_eq!(r.size(), 8 * MIB);
    r.check_files().unwrap();
    assert_eq!(read(&r, 7 * MIB, 4096), vec![3u8; 4096]);
    drop(r);
    Replica::expand(&dir, 12 * MIB).unwrap();
    assert_eq!(Replica::open(&dir).unwrap().size(), 12 * MIB);
}

/// Online growth: the open replica grows in place (the engine's
/// `ChainChange::Grow`), serves the new range at once, and a reopen sees
/// the committed size; a repeat is a no-op, shrinking is refused.
#[test]
fn an_open_replica_grows_in_place_and_serves_the_new_range() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("r");
    let r = Replica::create(&dir, &spec(4 * MIB)).unwrap();
    write(&r, 0, &[1u8; 4096]);
    r.snapshot("s1", true, BTreeMap::new()).unwrap();
    write(&r, 4 * MIB - 4096, &[2u8; 4096]);
    r.change_chain(&ChainChange::Grow { size: 8 * MIB })
        .unwrap();
    assert_eq!(r.size(), 8 * MIB);
    assert_eq!(read(&r, 0, 4096), vec![1u8; 4096], "snapshot data");
    assert_eq!(read(&r, 4 * MIB - 4096, 4096), vec![2u8; 4096], "head data");
    assert_eq!(read(&r, 5 * MIB, 4096), vec![0u8; 4096], "the new range");
    write(&r, 8 * MIB - 4096, &[3u8; 4096]);
    assert_eq!(read(&r, 8 * MIB - 4096, 4096), vec![3u8; 4096]);
    r.check_files().unwrap();
    r.grow(8 * MIB).unwrap();
    assert!(matches!(r.grow(6 * MIB), Err(ReplicaError::Shrink { .. })));
    assert!(matches!(
        r.grow(10 * MIB + 512),
        Err(ReplicaError::InvalidSize { .. })
    ));
    assert_eq!(r.size(), 8 * MIB);
    // A snapshot after the growth, and a view of the older one, span it.
    r.snapshot("s2", true, BTreeMap::new()).unwrap();
    assert_eq!(r.snapshot_view("s1").unwrap().size(), 8 * MIB);
    drop(r);
    let r = Replica::open(&dir).unwrap();
    assert_eq!(r.size(), 8 * MIB);
    assert_eq!(read(&r, 8 * MIB - 4096, 4096), vec![3u8; 4096]);
    r.check_files().unwrap();
}

#[test]
fn a_takeover_at_an_older_term_is_refused_and_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("r");
    let r = Replica::create(&dir, &spec(MIB)).unwrap();
    let n1 = |term| Claim::Takeover {
        owner: OwnerTerm::new(term, "n1"),
    };
    let first = r.claim(n1(1)).unwrap();
    // The volume moves to n2 at term 2: n1's session is fenced.
    let n2 = r
        .claim(Claim::Takeover {
            owner: OwnerTerm::new(2, "n2"),
        })
        .unwrap();
    assert!(first.is_fenced());
    let before = std::fs::read(dir.join("volume.meta")).unwrap();
    // n1 comes back with the term it had: refused, n2's session lives on,
    // and the stored ownership is n2's (also after a reopen).
    let e = r.claim(n1(1)).unwrap_err().to_string();
    assert!(e.contains("taken over by node n2 at term 2"), "{e}");
    assert!(!n2.is_fenced());
    assert_eq!(std::fs::read(dir.join("volume.meta")).unwrap(), before);
    drop(r);
    let r = Replica::open(&dir).unwrap();
    assert_eq!(r.owner_term(), OwnerTerm::new(2, "n2"));
    // The same term from another node is refused too; n2 itself may claim
    // again (its own restart), and a later term from anyone may.
    assert!(r
        .claim(Claim::Takeover {
            owner: OwnerTerm::new(2, "n3")
        })
        .is_err());
    r.claim(Claim::Takeover {
        owner: OwnerTerm::new(2, "n2"),
    })
    .unwrap();
    r.claim(n1(3)).unwrap();
    assert_eq!(r.owner_term(), OwnerTerm::new(3, "n1"));
}
