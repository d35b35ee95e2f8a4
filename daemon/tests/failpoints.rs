//! Data-safety scenarios driven by named failpoints (`fail` crate, compiled
//! in only with the `failpoints` feature):
//!
//! `cargo test --release --features failpoints --test failpoints`
//!
//! Each test pins one interleaving the review found unsafe: a paused
//! replica server, a write stalled inside the queue engine, a lost answer.
//! Failpoints are process-global, so every test holds a `FailScenario`
//! (which serializes them).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use cairn::control::backups::BackupState;
use cairn::engine::intent::{IntentLog, Leftover};
use cairn::engine::{rebuild, QueueEngine, RebuildProgress, ReplicaHandle, VolumeHealth};
use cairn::replica::ChainChange;
use fail::FailScenario;

mod common;
use common::cluster::*;
use common::TestRing;

/// A two-replica volume: A reachable, B absent (to be rebuilt), 4 MiB of
/// data on A.
fn one_of_two(tmp: &std::path::Path) -> (Node, Node, Arc<cairn::engine::VolumeIo>) {
    let (a, b) = (Node::new(tmp, "a"), Node::new(tmp, "b"));
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
    (a, b, v)
}

/// The snapshot files of replica `r` on node `n`, oldest first.
fn chain_of(n: &Node, r: &str) -> Vec<String> {
    n.disks
        .open("vol", r)
        .expect("open")
        .chain()
        .into_iter()
        .filter(|l| !l.is_head)
        .map(|l| l.file)
        .collect()
}

/// Takes snapshot `s1` while this thread answers the queue's pause.
fn snapshot_s1(
    v: &Arc<cairn::engine::VolumeIo>,
    ring: &mut TestRing,
    engine: &mut QueueEngine,
) -> Result<cairn::replica::ChainOutcome, cairn::engine::EngineError> {
    let v = v.clone();
    with_queue_pumped(ring, engine, move || {
        v.change_chain(
            &ChainChange::Snapshot {
                name: "s1".into(),
                created: "2026-12-01T00:00:00Z".into(),
                user_created: true,
                labels: Default::default(),
            },
            Duration::from_secs(10),
        )
    })
}

fn fill(engine: &mut QueueEngine, ring: &mut TestRing, mibs: u64) {
    for i in 0..mibs {
        let mut d = pattern(i, MIB as usize);
        assert_eq!(write(ring, engine, i * MIB, &mut d), MIB as i32);
    }
}

/// Scenario 4: the survivors' revision was persisted on A but the answer
/// was lost, so A is dropped; B must end strictly above anything A holds.
#[test]
fn an_ambiguous_revision_answer_leaves_the_survivors_ahead() {
    let scenario = FailScenario::setup();
    let tmp = tempfile::tempdir().expect("tmp");
    let nodes: Vec<Node> = ["a", "b", "c"]
        .iter()
        .map(|n| Node::new(tmp.path(), n))
        .collect();
    let handles = nodes
        .iter()
        .zip(["vol-r-a", "vol-r-b", "vol-r-c"])
        .map(|(n, r)| {
            n.create(r);
            ReplicaHandle {
                name: r.into(),
                io: Some(n.remote(r)),
            }
        })
        .collect();
    let v = volume(handles);
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    fill(&mut engine, &mut ring, 1);
    fail::cfg("server::set_revision::after_persist", "1*return").expect("cfg");
    v.fail_replica("vol-r-c", "operator").expect("fail C");
    fail::remove("server::set_revision::after_persist");
    let rev = |n: &Node, r: &str| n.disks.open("vol", r).expect("open").revision();
    let (ra, rb) = (rev(&nodes[0], "vol-r-a"), rev(&nodes[1], "vol-r-b"));
    assert_eq!(v.replicas()[0].state, cairn::engine::ReplicaState::Failed);
    assert_eq!(rb, v.revision());
    assert!(
        ra < rb,
        "dropped replica A holds revision {ra}, as new as the survivor's {rb}"
    );
    scenario.teardown();
}

/// Writes `len` bytes at `off` on one thread while a failpoint (`point`,
/// set to pause before this is called) holds it, starts a full rebuild of B
/// on another, releases the failpoint, and checks that B ends up with the
/// write and identical to A. `check_waits`: the rebuild must still be
/// running while the write is held.
fn rebuild_while_a_write_is_held(point: &str, off: u64, len: usize, check_waits: bool) {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b, v) = one_of_two(tmp.path());
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    fill(&mut engine, &mut ring, 2);
    fail::cfg(point, "pause").expect("cfg");
    let writer = std::thread::spawn(move || {
        let mut w = pattern(77, len);
        let res = write(&mut ring, &mut engine, off, &mut w);
        (res, w)
    });
    std::thread::sleep(Duration::from_millis(300));
    let target = b.remote("vol-r-b");
    let v2 = v.clone();
    let rebuilder = std::thread::spawn(move || {
        let progress = RebuildProgress::new("vol-r-b");
        rebuild(
            &v2,
            1,
            "vol-r-b",
            target,
            &progress,
            &AtomicBool::new(false),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    if check_waits {
        assert!(
            !rebuilder.is_finished(),
            "the rebuild finished while a counted write was still in flight"
        );
    }
    fail::remove(point);
    let (res, w) = writer.join().expect("writer");
    assert_eq!(res, len as i32);
    rebuilder.join().expect("rebuild thread").expect("rebuild");
    assert_eq!(v.health(), VolumeHealth::Healthy);
    let content = b.content("vol-r-b");
    assert_eq!(
        content[off as usize..off as usize + len],
        w[..],
        "the rebuilt replica lacks a write acknowledged while it joined"
    );
    assert_eq!(a.content("vol-r-a"), content);
}

/// Scenario 5: a write in flight on the source (not yet on disk there, so
/// not in its extent list) when a fresh target joins reaches the target.
/// Every replica server holds writes before its pwrite.
#[test]
fn a_full_rebuild_gets_the_write_in_flight_when_the_target_joined() {
    let scenario = FailScenario::setup();
    rebuild_while_a_write_is_held("server::write::before", 8 * MIB, 64 * 1024, false);
    scenario.teardown();
}

/// Scenario 6: a write stalled right after it counted itself (before it
/// loads the replica set) is waited for by the rebuild and reaches the
/// target. Before the fix it loaded the set first and counted later, so a
/// rebuild could finish in between and miss it.
#[test]
fn a_write_stalled_before_loading_the_set_reaches_the_rebuilt_replica() {
    let scenario = FailScenario::setup();
    rebuild_while_a_write_is_held("queue::submit::after_count", 5 * MIB, 16 * 1024, true);
    scenario.teardown();
}

/// Scenario 9: a snapshot taken while a full rebuild joins never leaves the
/// rebuilt replica healthy without the snapshot (or with its dirty map
/// dropped): either the rebuild sees the change and stops, or the target
/// has the same chain.
#[test]
fn a_snapshot_racing_a_rebuild_join_never_leaves_chains_apart() {
    let scenario = FailScenario::setup();
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b, v) = one_of_two(tmp.path());
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    fill(&mut engine, &mut ring, 1);
    // The snapshot pauses after its checks, on its first replica.
    fail::cfg("engine::change_chain::replica", "1*pause").expect("cfg");
    let (v2, target) = (v.clone(), b.remote("vol-r-b"));
    let racer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let v3 = v2.clone();
        let r = std::thread::spawn(move || {
            let progress = RebuildProgress::new("vol-r-b");
            rebuild(
                &v3,
                1,
                "vol-r-b",
                target,
                &progress,
                &AtomicBool::new(false),
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        fail::remove("engine::change_chain::replica");
        r.join().expect("rebuild thread")
    });
    let snap = snapshot_s1(&v, &mut ring, &mut engine);
    let rebuilt = racer.join().expect("racer");
    snap.expect("snapshot");
    if rebuilt.is_ok() {
        assert_eq!(
            chain_of(&a, "vol-r-a"),
            chain_of(&b, "vol-r-b"),
            "the rebuilt replica is healthy with another chain"
        );
    }
    assert!(
        rebuilt.is_ok() || v.replicas()[1].state != cairn::engine::ReplicaState::Healthy,
        "a failed rebuild left its target healthy"
    );
    scenario.teardown();
}

/// A standalone manager with two disks under `tmp` (backups go to the
/// default `file://` target in its data directory).
async fn manager(tmp: &std::path::Path) -> cairn::control::VolumeManager {
    let mut config = cairn::control::NodeConfig::new(tmp.join("data"));
    config.node_id = "n1".into();
    for i in 0..2 {
        let d = tmp.join(format!("disk{i}"));
        std::fs::create_dir_all(&d).expect("disk");
        config.disks.push(d);
    }
    cairn::control::VolumeManager::open(config)
        .await
        .expect("manager")
}

/// Writes `data` at `off` on every replica of a detached volume.
async fn write_detached(m: &cairn::control::VolumeManager, v: &str, off: u64, data: &[u8]) {
    for r in m.get(v).await.expect("get").replicas {
        let rep = cairn::replica::Replica::open(&r.dir).expect("open");
        rep.write_at(off, data, false).expect("write");
        rep.flush().expect("flush");
    }
}

/// A detached volume's content through its first replica's chain.
async fn content_of(m: &cairn::control::VolumeManager, v: &str) -> Vec<u8> {
    let info = m.get(v).await.expect("get");
    let rep = cairn::replica::Replica::open(&info.replicas[0].dir).expect("open");
    let mut buf = vec![0u8; info.size as usize];
    rep.read_at(0, &mut buf).expect("read");
    buf
}

/// Scenario 12: a DR volume whose restore failed part-way holds a mix of
/// two backups; the next backup must not be restored as a diff against
/// the one restored last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dr_volume_after_an_interrupted_restore_restores_whole() {
    let scenario = FailScenario::setup();
    let tmp = tempfile::tempdir().expect("tmp");
    let m = manager(tmp.path()).await;
    let blk = 2 * MIB as usize;
    m.create("src", 8 * MIB, Some(1), "").await.expect("create");
    write_detached(&m, "src", 0, &pattern(1, blk)).await;
    m.backup_create("src", None, Default::default())
        .await
        .expect("b1");
    m.create_from_backup("dr", None, Some(1), "bak://src", true, "")
        .await
        .expect("standby");
    m.set_setting("restore-concurrent-limit", "1")
        .await
        .expect("setting");
    // b2 changes block 0 (B) and block 1 (C); its restore fails after the
    // first block every time, so the DR volume holds B at block 0.
    write_detached(&m, "src", 0, &pattern(2, blk)).await;
    write_detached(&m, "src", 2 * MIB, &pattern(3, blk)).await;
    m.backup_create("src", None, Default::default())
        .await
        .expect("b2");
    fail::cfg("backupstore::restore::after_block", "return").expect("cfg");
    m.set_setting("backupstore-poll-interval", "1")
        .await
        .expect("poll");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // b3: block 0 back to A (as in b1), block 1 still C.
    write_detached(&m, "src", 0, &pattern(1, blk)).await;
    let b3 = m
        .backup_create("src", None, Default::default())
        .await
        .expect("b3");
    fail::remove("backupstore::restore::after_block");
    let mut followed = false;
    for _ in 0..100 {
        if m.get("dr").await.expect("get").last_restored == b3.name {
            followed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(followed, "the DR volume did not restore {}", b3.name);
    assert!(
        content_of(&m, "dr").await == content_of(&m, "src").await,
        "the DR volume differs from its source after an interrupted restore"
    );
    scenario.teardown();
}

/// Scenario 11: a chain change on a detached volume moves each replica it
/// reaches to a revision above all of them, right after the change. A crash
/// (here: a failure) between the change and the bump on one replica leaves
/// that replica behind, never two chains at one revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_chain_changes_move_the_revision() {
    let scenario = FailScenario::setup();
    let tmp = tempfile::tempdir().expect("tmp");
    let m = manager(tmp.path()).await;
    let info = m.create("v", 16 * MIB, Some(2), "").await.expect("create");
    let rev = |dir: &std::path::Path| cairn::replica::Replica::open(dir).expect("open").revision();
    let dirs: Vec<_> = info.replicas.iter().map(|r| r.dir.clone()).collect();
    let before: Vec<u64> = dirs.iter().map(|d| rev(d)).collect();
    m.snapshot_create("v", Some("s1"), Default::default())
        .await
        .expect("snapshot");
    let after: Vec<u64> = dirs.iter().map(|d| rev(d)).collect();
    assert_eq!(after[0], after[1]);
    assert!(
        after[0] > before[0].max(before[1]),
        "{before:?} -> {after:?}"
    );
    assert_eq!(m.get("v").await.expect("get").revision, after[0]);
    // The first replica takes the change but not the revision.
    fail::cfg("snapshots::detached::before_revision", "1*return").expect("cfg");
    m.snapshot_create("v", Some("s2"), Default::default())
        .await
        .expect("snapshot on the other replica");
    fail::remove("snapshots::detached::before_revision");
    let now: Vec<u64> = dirs.iter().map(|d| rev(d)).collect();
    assert!(
        now[0] != now[1],
        "replicas with different chains share revision {}",
        now[0]
    );
    let info = m.get("v").await.expect("get");
    let behind = if now[0] < now[1] { 0 } else { 1 };
    assert_eq!(
        info.replicas[behind].state,
        cairn::engine::ReplicaState::Failed,
        "the replica that missed the revision is not trusted"
    );
    scenario.teardown();
}

/// Scenario 13's log: a write that starts in a chunk after the settle
/// found it quiet (and flushed) must keep the chunk logged, or a crash right
/// after would resync without it.
#[test]
fn a_write_racing_the_intent_settle_keeps_its_chunk_logged() {
    let scenario = FailScenario::setup();
    let tmp = tempfile::tempdir().expect("tmp");
    let (_a, _b, v, log_path) = logged_pair(tmp.path());
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    assert_eq!(
        write(&mut ring, &mut engine, 0, &mut pattern(91, 4096)),
        4096
    );
    assert_eq!(v.settle_intent(), 0, "first look");
    // The settle finds the chunk quiet, flushes, then stops before clearing.
    fail::cfg("intent::clear::before", "pause").expect("cfg");
    let settler = {
        let v = v.clone();
        std::thread::spawn(move || v.settle_intent())
    };
    std::thread::sleep(Duration::from_millis(500));
    // The bit is still set: this write goes out without touching the log.
    assert_eq!(
        write(&mut ring, &mut engine, 4096, &mut pattern(92, 4096)),
        4096
    );
    fail::cfg("intent::clear::before", "off").expect("cfg");
    let cleared = settler.join().expect("settler");
    assert_eq!(cleared, 0, "a write started in the chunk meanwhile");
    assert_eq!(
        IntentLog::leftover(&log_path, SIZE),
        Leftover::Chunks(vec![(0, SIZE)]),
        "the chunk a write just went to is logged"
    );
    scenario.teardown();
}

/// Scenario 9, the other window: a rebuild that joins while a snapshot
/// waits to quiesce is seen by the snapshot (its check is after the
/// quiesce, under the membership lock): it refuses, or both chains agree.
#[test]
fn a_rebuild_joining_while_a_snapshot_quiesces_is_seen() {
    let scenario = FailScenario::setup();
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b, v) = one_of_two(tmp.path());
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    fill(&mut engine, &mut ring, 1);
    fail::cfg("engine::change_chain::before_quiesce", "1*pause").expect("cfg");
    fail::cfg("rebuild::before_listing", "1*pause").expect("cfg");
    let (v2, target) = (v.clone(), b.remote("vol-r-b"));
    let rebuilder = std::thread::spawn(move || {
        // The snapshot is waiting before its quiesce by now.
        std::thread::sleep(Duration::from_millis(300));
        let progress = RebuildProgress::new("vol-r-b");
        rebuild(
            &v2,
            1,
            "vol-r-b",
            target,
            &progress,
            &AtomicBool::new(false),
        )
    });
    let releaser = std::thread::spawn(|| {
        // The rebuild has joined (paused before its listing): the snapshot
        // goes on, then the rebuild.
        std::thread::sleep(Duration::from_millis(900));
        fail::remove("engine::change_chain::before_quiesce");
        std::thread::sleep(Duration::from_millis(600));
        fail::remove("rebuild::before_listing");
    });
    let snap = snapshot_s1(&v, &mut ring, &mut engine);
    releaser.join().expect("releaser");
    let rebuilt = rebuilder.join().expect("rebuilder");
    match &snap {
        Err(cairn::engine::EngineError::Rebuilding { .. }) => {}
        other => {
            other.as_ref().expect("snapshot");
            if rebuilt.is_ok() {
                assert_eq!(
                    chain_of(&a, "vol-r-a"),
                    chain_of(&b, "vol-r-b"),
                    "the rebuilt replica is healthy with another chain"
                );
            }
        }
    }
    assert!(
        rebuilt.is_ok() || v.replicas()[1].state != cairn::engine::ReplicaState::Healthy,
        "a failed rebuild left its target healthy"
    );
    scenario.teardown();
}

/// Asynchronous backups (`backup create --no-wait`): the call returns the
/// backup in progress with its final handle; `backup get` follows it to
/// `completed`, or to `error` with the reason when the upload fails.
#[test]
fn an_async_backup_reports_progress_then_completed_or_the_error() {
    let scenario = FailScenario::setup();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut config = cairn::control::NodeConfig::new(tmp.path().join("data"));
        config.node_id = "n1".into();
        let disk = tmp.path().join("disk");
        std::fs::create_dir_all(&disk).expect("disk");
        config.disks.push(disk);
        let m = cairn::control::VolumeManager::open(config)
            .await
            .expect("manager");
        let target = tmp.path().join("target");
        std::fs::create_dir_all(&target).expect("target");
        m.set_setting("backup-target", &format!("file://{}", target.display()))
            .await
            .expect("target");
        m.create("v", 8 * MIB, Some(1), "").await.expect("create");
        // Data in the replica's head (the volume is detached), a new 1 MiB
        // before each backup so each has a block to upload.
        let dir = m.get("v").await.expect("get").replicas[0].dir.clone();
        let put = |seed: u64| {
            let r = cairn::replica::Replica::open(&dir).expect("replica");
            r.write_at(seed * MIB, &pattern(seed, MIB as usize), false)
                .expect("write");
            r.flush().expect("flush");
        };
        put(1);
        let get = |h: String| {
            let m = &m;
            async move { m.backup_get(&h).await.expect("get") }
        };
        let wait_for = |h: String, want: BackupState| {
            let get = &get;
            async move {
                for _ in 0..200 {
                    let b = get(h.clone()).await;
                    if b.state == want {
                        return b;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!("backup {h} never became {want}");
            }
        };

        // Held after its first block: in progress, with a handle.
        fail::cfg("backupstore::backup::after_block", "pause").expect("cfg");
        let b = m
            .backup_start("v", None, Default::default())
            .await
            .expect("start");
        assert_eq!(b.state, BackupState::InProgress);
        assert!(b.handle().starts_with("bak://v/backup-"), "{}", b.handle());
        let seen = get(b.handle()).await;
        assert_eq!(seen.state, BackupState::InProgress);
        assert!(seen.progress.is_some(), "progress while running");
        fail::cfg("backupstore::backup::after_block", "off").expect("cfg");
        let done = wait_for(b.handle(), BackupState::Completed).await;
        assert!(done.progress.is_none());

        // A failing upload ends in error, saying why; nothing stays locked.
        put(2);
        fail::cfg("backupstore::backup::after_block", "return").expect("cfg");
        let b = m
            .backup_start("v", None, Default::default())
            .await
            .expect("start");
        let failed = wait_for(b.handle(), BackupState::Error).await;
        assert!(failed.message.contains("failpoint"), "{}", failed.message);
        let listed = m.backup_list(Some("v")).await.expect("list");
        assert!(
            listed
                .iter()
                .any(|x| x.name == b.name && x.state == BackupState::Error),
            "the failed backup is listed"
        );
        fail::cfg("backupstore::backup::after_block", "off").expect("cfg");
        let again = m
            .backup_create("v", None, Default::default())
            .await
            .expect("backup after a failure");
        assert_eq!(again.state, BackupState::Completed);
        m.shutdown().await;
    });
    scenario.teardown();
}

/// A write that lands between a full rebuild's listing and its copy (on
/// data the listing did not see) reaches the rebuilt replica: the target is
/// a write target from its join on, and its map is re-read each pass.
#[test]
fn a_write_between_the_rebuild_listing_and_the_copy_reaches_the_target() {
    let scenario = FailScenario::setup();
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b, v) = one_of_two(tmp.path());
    let mut engine = QueueEngine::new(v.clone(), 0, LAYOUT.depth);
    let mut ring = TestRing::new();
    fill(&mut engine, &mut ring, 2);
    fail::cfg("rebuild::after_listing", "pause").expect("cfg");
    let target = b.remote("vol-r-b");
    let v2 = v.clone();
    let rebuilder = std::thread::spawn(move || {
        let progress = RebuildProgress::new("vol-r-b");
        rebuild(
            &v2,
            1,
            "vol-r-b",
            target,
            &progress,
            &AtomicBool::new(false),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    // Listed already: 0..2 MiB. This lands at 9 MiB, and over listed data.
    let mut fresh = pattern(88, 64 * 1024);
    assert_eq!(
        write(&mut ring, &mut engine, 9 * MIB, &mut fresh),
        64 * 1024
    );
    let mut over = pattern(89, 4096);
    assert_eq!(write(&mut ring, &mut engine, MIB, &mut over), 4096);
    fail::remove("rebuild::after_listing");
    rebuilder.join().expect("rebuild thread").expect("rebuild");
    assert_eq!(v.health(), VolumeHealth::Healthy);
    let content = b.content("vol-r-b");
    assert_eq!(
        content[9 * MIB as usize..9 * MIB as usize + 64 * 1024],
        fresh[..]
    );
    assert_eq!(content[MIB as usize..MIB as usize + 4096], over[..]);
    assert_eq!(a.content("vol-r-a"), content);
    scenario.teardown();
}
