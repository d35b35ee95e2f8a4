//! Backups, restores, DR volumes and recurring jobs through the volume
//! manager, in process, against the local file:// target and a real S3
//! server (s3s-fs on 127.0.0.1, started here). Volumes stay detached (this
//! host has no ublk): their data is written into the replica files, and
//! compared by reading the replicas back. The device-level checks run in the
//! guest (scripts/e2e/15, 16).

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use cairn::control::{NodeConfig, VolumeManager};
use cairn::jobs::ManualClock;
use cairn::replica::Replica;

const MIB: u64 = 1 << 20;

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    m: VolumeManager,
    clock: Arc<ManualClock>,
}

async fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().to_path_buf();
    let mut config = NodeConfig::new(root.join("data"));
    config.node_id = "n1".into();
    for i in 0..2 {
        let d = root.join(format!("disk{i}"));
        std::fs::create_dir_all(&d).expect("disk");
        config.disks.push(d);
    }
    let clock = Arc::new(ManualClock::new(
        "2026-01-05T00:00:30Z".parse().expect("time"),
    ));
    config.clock = Some(cairn::control::ClockHandle(
        clock.clone() as Arc<dyn cairn::jobs::Clock>
    ));
    let m = VolumeManager::open(config).await.expect("manager");
    // The disks share the host's filesystem, whose free space is not this
    // test's business (a shared CI pool may sit below the 25 % default,
    // which refuses every expansion).
    m.set_setting("storage-minimal-available-percentage", "0")
        .await
        .expect("setting");
    Fixture {
        _tmp: tmp,
        root,
        m,
        clock,
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` at `off` into every replica's head file of a detached volume.
async fn write(m: &VolumeManager, volume: &str, off: u64, data: &[u8]) {
    for r in m.get(volume).await.expect("get").replicas {
        write_head(&r.dir, off, data);
    }
}

/// Writes `data` at `off` into the head file of the replica in `dir`.
fn write_head(dir: &Path, off: u64, data: &[u8]) {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("volume.meta")).expect("meta"))
            .expect("json");
    let head = dir.join(meta["head"].as_str().expect("head"));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&head)
        .expect("open head");
    f.write_all_at(data, off).expect("write");
    f.sync_all().expect("sync");
}

/// The volume's contents read through each replica's chain; asserts all
/// replicas agree.
async fn content(m: &VolumeManager, volume: &str) -> Vec<u8> {
    let info = m.get(volume).await.expect("get");
    let mut out: Option<Vec<u8>> = None;
    for r in &info.replicas {
        let rep = Replica::open(&r.dir).expect("open replica");
        let mut buf = vec![0u8; info.size as usize];
        rep.read_at(0, &mut buf).expect("read");
        if let Some(o) = &out {
            assert!(o == &buf, "replicas of {volume} differ");
        }
        out = Some(buf);
    }
    out.expect("a replica")
}

fn blocks_in(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "blk") {
                v.push(p);
            }
        }
    }
    v.sort();
    v
}

/// The whole backup scenario against whatever target the manager has.
async fn scenario(f: &Fixture, store_root: &Path, tag: &str) {
    let m = &f.m;
    let v = format!("vol-{tag}");
    m.create(&v, 64 * MIB, Some(2), "").await.expect("create");
    write(m, &v, 0, &pattern(1, 40 * MIB as usize)).await;
    let full = m
        .backup_create(&v, None, BTreeMap::from([("tier".into(), "gold".into())]))
        .await
        .expect("backup 1");
    println!(
        "{tag}: full backup uploaded {} of {} blocks",
        full.uploaded_blocks, full.total_blocks
    );
    assert_eq!(
        (full.uploaded_blocks, full.total_blocks),
        (20, 20),
        "40 MiB = 20 blocks of 2 MiB"
    );
    let same = m
        .backup_create(&v, None, BTreeMap::new())
        .await
        .expect("backup 2");
    println!(
        "{tag}: unchanged volume: uploaded {} blocks",
        same.uploaded_blocks
    );
    assert_eq!(same.uploaded_blocks, 0);
    assert!(same.incremental);
    // 1% of 64 MiB, inside one 2 MiB block that held zeros.
    write(m, &v, 48 * MIB, &pattern(2, 655_360)).await;
    let small = m
        .backup_create(&v, None, BTreeMap::new())
        .await
        .expect("backup 3");
    println!(
        "{tag}: 1% changed: uploaded {} of {} blocks ({} bytes)",
        small.uploaded_blocks, small.total_blocks, small.uploaded_bytes
    );
    assert_eq!(small.uploaded_blocks, 1);
    assert_eq!(small.total_blocks, 21);
    let want3 = content(m, &v).await;

    // Restore the first and the last backup.
    m.create_from_backup(
        &format!("{v}-r1"),
        None,
        Some(2),
        &format!("bak://{v}/{}", full.name),
        false,
        "",
    )
    .await
    .expect("restore 1");
    let mut want1 = pattern(1, 40 * MIB as usize);
    want1.resize(64 * MIB as usize, 0);
    assert!(
        content(m, &format!("{v}-r1")).await == want1,
        "restore of backup 1 differs"
    );
    m.create_from_backup(
        &format!("{v}-r3"),
        None,
        Some(1),
        &format!("bs://{v}/{}", small.name),
        false,
        "",
    )
    .await
    .expect("restore 3");
    assert!(
        content(m, &format!("{v}-r3")).await == want3,
        "restore of backup 3 differs"
    );

    // Delete backup 3: exactly its one unique block goes.
    let before = blocks_in(store_root);
    let (removed, _kept) = m
        .backup_delete(&format!("bak://{v}/{}", small.name))
        .await
        .expect("delete");
    let after = blocks_in(store_root);
    println!(
        "{tag}: delete removed {removed} block(s): {} -> {}",
        before.len(),
        after.len()
    );
    assert_eq!(removed, 1);
    assert_eq!(before.len() - after.len(), 1);
    assert_eq!(m.backup_list(Some(&v)).await.expect("list").len(), 2);

    // A corrupt block fails the restore, names the block, leaves no volume.
    if let Some(blk) = after.first() {
        let data = std::fs::read(blk).expect("read blk");
        let mut bad = data.clone();
        let i = bad.len() / 2;
        bad[i] ^= 0xff;
        std::fs::write(blk, &bad).expect("corrupt");
        let e = m
            .create_from_backup(
                &format!("{v}-bad"),
                None,
                Some(1),
                &format!("bak://{v}/{}", full.name),
                false,
                "",
            )
            .await
            .expect_err("restore of a corrupt block must fail")
            .to_string();
        let stem = blk.file_stem().and_then(|s| s.to_str()).expect("stem");
        assert!(e.contains(stem), "error names the block: {e}");
        assert!(
            m.get(&format!("{v}-bad")).await.is_err(),
            "no half-made volume"
        );
        std::fs::write(blk, &data).expect("repair");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_to_the_local_file_target() {
    let f = fixture().await;
    let store = f.root.join("data").join("backups");
    scenario(&f, &store, "file").await;
}

struct S3 {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s3s_fs() -> S3 {
    let bin = std::env::var("CAIRN_S3S_FS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/bin/s3s-fs")
        });
    assert!(
        bin.exists(),
        "s3s-fs not found at {}: run scripts/s3-server.sh install",
        bin.display()
    );
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(dir.path().join("bucket")).expect("bucket");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        l.local_addr().expect("addr").port()
    };
    let child = Command::new(&bin)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--access-key",
            "ak",
            "--secret-key",
            "sk",
        ])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start s3s-fs");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    S3 { child, dir, port }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_to_a_real_s3_server_and_bad_credentials() {
    let s3 = s3s_fs();
    let f = fixture().await;
    let creds = f.root.join("creds");
    std::fs::write(
        &creds,
        format!(
            "AWS_ACCESS_KEY_ID=ak\nAWS_SECRET_ACCESS_KEY=nope\nAWS_ENDPOINTS=http://127.0.0.1:{}\n",
            s3.port
        ),
    )
    .expect("creds");
    f.m.set_setting(
        "backup-target-credential-secret",
        creds.to_str().expect("utf8"),
    )
    .await
    .expect("cred setting");
    f.m.set_setting("backup-target", "s3://bucket@us-east-1/cairn/")
        .await
        .expect("target");
    let e =
        f.m.backup_list(None)
            .await
            .expect_err("wrong secret")
            .to_string();
    assert!(
        e.to_lowercase().contains("access denied") || e.contains("AWS_SECRET_ACCESS_KEY"),
        "{e}"
    );
    assert!(!e.contains("nope"), "the secret leaked into an error: {e}");
    std::fs::write(
        &creds,
        format!(
            "AWS_ACCESS_KEY_ID=ak\nAWS_SECRET_ACCESS_KEY=sk\nAWS_ENDPOINTS=http://127.0.0.1:{}\n",
            s3.port
        ),
    )
    .expect("creds");
    scenario(&f, &s3.dir.path().join("bucket"), "s3").await;
    // Bad URLs are refused and change nothing.
    for bad in [
        "s3://bucket/cairn/",
        "s3://bucket@us-east-1/cairn",
        "ftp://x/",
        "file://relative",
    ] {
        let e =
            f.m.set_setting("backup-target", bad)
                .await
                .expect_err(bad)
                .to_string();
        println!("{bad}: {e}");
    }
    assert_eq!(
        f.m.setting("backup-target").expect("get"),
        "s3://bucket@us-east-1/cairn/"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dr_volume_follows_backups_incrementally_and_activates() {
    let f = fixture().await;
    let m = &f.m;
    m.create("src", 32 * MIB, Some(1), "")
        .await
        .expect("create");
    write(m, "src", 0, &pattern(7, 8 * MIB as usize)).await;
    let b1 = m
        .backup_create("src", None, BTreeMap::new())
        .await
        .expect("b1");
    m.create_from_backup("dr", None, Some(2), "bak://src", true, "")
        .await
        .expect("standby");
    let info = m.get("dr").await.expect("get");
    assert!(info.standby);
    assert_eq!(info.last_restored, b1.name);
    assert!(
        m.attach("dr").await.is_err(),
        "standby volumes cannot attach"
    );
    m.set_setting("backupstore-poll-interval", "1")
        .await
        .expect("poll");
    for i in 0..3u64 {
        write(
            m,
            "src",
            (10 + i * 4) * MIB,
            &pattern(100 + i, MIB as usize),
        )
        .await;
        let b = m
            .backup_create("src", None, BTreeMap::new())
            .await
            .expect("backup");
        let mut ok = false;
        for _ in 0..100 {
            if m.get("dr").await.expect("get").last_restored == b.name {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "DR volume did not follow backup {}", b.name);
    }
    let want = content(m, "src").await;
    let info = m.activate("dr").await.expect("activate");
    assert!(!info.standby);
    assert!(
        content(m, "dr").await == want,
        "activated DR volume differs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recurring_snapshot_and_backup_jobs_with_retain() {
    let f = fixture().await;
    let m = &f.m;
    m.create("v", 16 * MIB, Some(1), "").await.expect("create");
    let jobs = r#"[{"name":"snap","task":"snapshot","cron":"*/5 * * * *","retain":2,"labels":{"k":"v"}},
                   {"name":"bk","task":"backup","cron":"0 * * * *","retain":1}]"#;
    m.set_recurring_jobs("v", jobs).await.expect("jobs");
    m.set_setting("allow-recurring-job-while-volume-detached", "true")
        .await
        .expect("setting");
    // Nothing due before 00:05.
    assert!(m.run_due_jobs().await.is_empty());
    let mut snapshots_taken = 0;
    for step in 1..=4u64 {
        write(m, "v", step * MIB, &pattern(step, 4096)).await;
        f.clock.advance(chrono::Duration::minutes(5));
        let runs = m.run_due_jobs().await;
        assert_eq!(runs.len(), 1, "{runs:?}");
        assert!(runs[0].outcome.starts_with("snapshot"), "{runs:?}");
        snapshots_taken += 1;
    }
    // No new data: the next run skips.
    f.clock.advance(chrono::Duration::minutes(5));
    let runs = m.run_due_jobs().await;
    assert!(runs[0].outcome.starts_with("skipped"), "{runs:?}");
    let snaps: Vec<_> = m
        .snapshot_list("v")
        .await
        .expect("list")
        .into_iter()
        .filter(|s| s.labels.get("RecurringJob").is_some() && !s.removed)
        .collect();
    assert_eq!(snaps.len(), 2, "retain 2 of {snapshots_taken}: {snaps:?}");
    // The hourly backup job at 01:00 and 02:00, with changes: retain 1.
    for (i, at) in ["2026-01-05T01:00:30Z", "2026-01-05T02:00:30Z"]
        .iter()
        .enumerate()
    {
        write(m, "v", 9 * MIB, &pattern(99 + i as u64, 8192)).await;
        f.clock.set(at.parse().expect("t"));
        let runs = m.run_due_jobs().await;
        let b = runs.iter().find(|r| r.job == "bk").expect("backup job ran");
        assert!(b.outcome.starts_with("backup"), "{runs:?}");
    }
    // No change since: the 03:00 run skips.
    f.clock.set("2026-01-05T03:00:30Z".parse().expect("t"));
    let runs = m.run_due_jobs().await;
    let b = runs.iter().find(|r| r.job == "bk").expect("backup job ran");
    assert!(b.outcome.starts_with("skipped"), "{runs:?}");
    let backups = m.backup_list(Some("v")).await.expect("backups");
    assert_eq!(backups.len(), 1, "retain 1: {backups:?}");
    // Bad jobs are rejected and change nothing.
    for bad in [
        r#"[{"name":"x","task":"snapshot","cron":"0 0 * * 8","retain":1}]"#,
        r#"[{"name":"x","task":"snapshot","cron":"* * * * *","retain":0}]"#,
        r#"[{"name":"this-name-is-much-too-long-for-a-recurring-job","task":"snapshot","cron":"* * * * *","retain":1}]"#,
        r#"[{"name":"x","task":"nope","cron":"* * * * *","retain":1}]"#,
    ] {
        let e = m
            .set_recurring_jobs("v", bad)
            .await
            .expect_err(bad)
            .to_string();
        println!("rejected: {e}");
    }
    assert!(m
        .get("v")
        .await
        .expect("get")
        .recurring_jobs
        .contains("\"snap\""));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The owner of a volume whose only healthy replica is on another node
/// backs it up by reading that replica's snapshot over the wire (layer by
/// layer), fully and then incrementally, and the restore matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_reads_a_replica_on_another_node() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path();
    let secret = root.join("secret");
    std::fs::write(&secret, "a-test-cluster-secret-of-32-bytes").expect("secret");
    let ports = [free_port(), free_port()];
    let peers: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut nodes = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let mut c = NodeConfig::new(root.join(format!("n{i}")));
        c.node_id = format!("n{i}");
        c.replica_listen = Some(format!("127.0.0.1:{port}").parse().expect("addr"));
        c.cluster_secret = Some(secret.clone());
        c.peers = peers.clone();
        nodes.push(VolumeManager::open(c).await.expect("manager"));
    }
    // Both managers stay alive to the end: n1 serves the replica read.
    let n0 = &nodes[0];
    for _ in 0..100 {
        if n0.nodes().await.iter().filter(|n| n.up).count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The test's disks share the host's filesystem, whose free space is not
    // this test's business (CI's sat below the 25 % default).
    n0.set_setting("storage-minimal-available-percentage", "0")
        .await
        .expect("setting");
    let v = "far";
    let info = n0
        .create(v, 16 * MIB, Some(2), "")
        .await
        .expect("create (one replica per node)");
    let local = info
        .replicas
        .iter()
        .find(|r| r.addr.is_empty())
        .expect("a replica on the owner")
        .name
        .clone();
    assert!(
        info.replicas.iter().any(|r| !r.addr.is_empty()),
        "a replica on n1: {info:?}"
    );
    write(n0, v, 0, &pattern(7, 6 * MIB as usize)).await;
    // Take the owner's own replica out: only the one on n1 is healthy.
    n0.fail_replica(v, &local)
        .await
        .expect("fail the local replica");
    let full = n0
        .backup_create(v, None, BTreeMap::new())
        .await
        .expect("backup from the remote replica");
    println!(
        "remote source: full backup uploaded {} of {} blocks",
        full.uploaded_blocks, full.total_blocks
    );
    assert_eq!((full.uploaded_blocks, full.total_blocks), (3, 3));
    // New data on the healthy replica only (the failed one is not written).
    let far = n0
        .get(v)
        .await
        .expect("get")
        .replicas
        .into_iter()
        .find(|r| !r.addr.is_empty())
        .expect("remote");
    write_head(&far.dir, 10 * MIB, &pattern(8, 4096));
    let incr = n0
        .backup_create(v, None, BTreeMap::new())
        .await
        .expect("incremental backup from the remote replica");
    println!(
        "remote source: 4 KiB changed: uploaded {} of {} blocks",
        incr.uploaded_blocks, incr.total_blocks
    );
    assert!(incr.incremental);
    assert_eq!((incr.uploaded_blocks, incr.total_blocks), (1, 4));
    let mut want = pattern(7, 6 * MIB as usize);
    want.resize(16 * MIB as usize, 0);
    want[10 * MIB as usize..10 * MIB as usize + 4096].copy_from_slice(&pattern(8, 4096));
    n0.create_from_backup(
        "back",
        None,
        Some(1),
        &format!("bak://{v}/{}", incr.name),
        false,
        "",
    )
    .await
    .expect("restore");
    assert!(
        content(n0, "back").await == want,
        "restore of the remote-sourced backup differs"
    );

    // 16 MiB backup blocks: larger than one frame, read in pieces.
    n0.set_setting("backup-block-size", "16MiB")
        .await
        .expect("setting");
    let info = n0
        .create("wide", 32 * MIB, Some(2), "")
        .await
        .expect("create");
    let data = pattern(9, 20 * MIB as usize);
    write(n0, "wide", 0, &data).await;
    let local = info
        .replicas
        .iter()
        .find(|r| r.addr.is_empty())
        .expect("local")
        .name
        .clone();
    n0.fail_replica("wide", &local)
        .await
        .expect("fail the local replica");
    let b = n0
        .backup_create("wide", None, BTreeMap::new())
        .await
        .expect("16 MiB-block backup");
    assert_eq!((b.uploaded_blocks, b.total_blocks), (2, 2));
    n0.create_from_backup(
        "wide-back",
        None,
        Some(1),
        &format!("bak://wide/{}", b.name),
        false,
        "",
    )
    .await
    .expect("restore");
    let mut want = data;
    want.resize(32 * MIB as usize, 0);
    assert!(
        content(n0, "wide-back").await == want,
        "16 MiB-block restore differs"
    );
}

/// A volume that grew between two backups: the incremental one covers the
/// new range, and restoring it (into a volume of the new size, or a bigger
/// one) gives the grown content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_and_restores_of_a_volume_that_grew() {
    let f = fixture().await;
    let m = &f.m;
    m.create("grow", 8 * MIB, Some(2), "")
        .await
        .expect("create");
    write(m, "grow", 0, &pattern(7, 4 * MIB as usize)).await;
    let first = m
        .backup_create("grow", None, BTreeMap::new())
        .await
        .expect("backup before");
    m.expand("grow", 16 * MIB).await.expect("expand");
    write(m, "grow", 12 * MIB, &pattern(8, 2 * MIB as usize)).await;
    let want = content(m, "grow").await;
    assert_eq!(want.len() as u64, 16 * MIB);
    let second = m
        .backup_create("grow", None, BTreeMap::new())
        .await
        .expect("backup after");
    assert!(second.incremental, "incremental across the growth");
    for (name, size) in [("grow-r", None), ("grow-big", Some(32 * MIB))] {
        m.create_from_backup(
            name,
            size,
            Some(1),
            &format!("bak://grow/{}", second.name),
            false,
            "",
        )
        .await
        .expect("restore");
        let mut got = content(m, name).await;
        if size.is_some() {
            assert!(got[16 * MIB as usize..].iter().all(|&b| b == 0));
            got.truncate(16 * MIB as usize);
        }
        assert!(got == want, "restore {name} differs");
    }
    // The old backup still restores the old content; like Longhorn, a
    // restore takes the backup volume's size (now the grown one): zeros
    // beyond what the backup had.
    m.create_from_backup(
        "grow-old",
        None,
        Some(1),
        &format!("bak://grow/{}", first.name),
        false,
        "",
    )
    .await
    .expect("restore old");
    let old = content(m, "grow-old").await;
    assert_eq!(old.len() as u64, 16 * MIB);
    assert!(old[..4 * MIB as usize] == pattern(7, 4 * MIB as usize)[..]);
    assert!(old[4 * MIB as usize..].iter().all(|&b| b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_from_snapshots_and_clones_hold_their_snapshot_point() {
    use cairn::control::clone::CloneSource;
    let f = fixture().await;
    let m = &f.m;
    m.create("src", 16 * MIB, Some(2), "")
        .await
        .expect("create");
    let a = pattern(7, 8 * MIB as usize);
    write(m, "src", 0, &a).await;
    m.snapshot_create("src", Some("s1"), BTreeMap::new())
        .await
        .expect("snapshot");
    // The source keeps changing after the snapshot.
    let b = pattern(8, 4 * MIB as usize);
    write(m, "src", 2 * MIB, &b).await;
    let mut at_s1 = a.clone();
    at_s1.resize(16 * MIB as usize, 0);
    let mut now = at_s1.clone();
    now[2 * MIB as usize..6 * MIB as usize].copy_from_slice(&b);

    let from_s1 = CloneSource::parse("src/s1", "")
        .expect("parse")
        .expect("a source");
    let made = m
        .create_clone("from-s1", 0, Some(2), &from_s1)
        .await
        .expect("from snapshot");
    assert_eq!(made.size, 16 * MIB, "the source's size by default");
    assert!(
        content(m, "from-s1").await == at_s1,
        "the copy holds s1, not the head"
    );

    // A clone: a snapshot of the source now, into a bigger volume.
    let clone = m
        .create_clone(
            "clone",
            32 * MIB,
            None,
            &CloneSource::Volume {
                volume: "src".into(),
            },
        )
        .await
        .expect("clone");
    assert_eq!(clone.size, 32 * MIB);
    let got = content(m, "clone").await;
    assert!(
        got[..16 * MIB as usize] == now[..],
        "the clone holds the source's data now"
    );
    assert!(got[16 * MIB as usize..].iter().all(|&x| x == 0));
    let snaps = m.snapshot_list("src").await.expect("snapshots");
    assert!(
        snaps
            .iter()
            .any(|s| s.labels.get("cairn.io/clone").map(String::as_str) == Some("clone")),
        "the clone's snapshot of the source is labelled: {snaps:?}"
    );

    // Bad input: a clear error, and no volume made.
    let before = m.list().await.len();
    let e = m
        .create_clone("small", 8 * MIB, None, &from_s1)
        .await
        .expect_err("smaller than the source");
    assert!(
        e.to_string().contains("smaller than the source volume"),
        "{e}"
    );
    let nope = CloneSource::parse("src/nope", "")
        .expect("parse")
        .expect("a source");
    let e = m
        .create_clone("x", 0, None, &nope)
        .await
        .expect_err("unknown snapshot");
    assert!(e.to_string().contains("nope"), "{e}");
    let e = m
        .create_clone(
            "x",
            0,
            None,
            &CloneSource::Volume {
                volume: "ghost".into(),
            },
        )
        .await
        .expect_err("unknown source");
    assert!(e.to_string().contains("ghost"), "{e}");
    let e = m
        .create_clone("from-s1", 0, None, &from_s1)
        .await
        .expect_err("taken name");
    assert!(e.to_string().contains("already exists"), "{e}");
    for bad in [("src", ""), ("src/s1/x", ""), ("src/s1", "src")] {
        assert!(CloneSource::parse(bad.0, bad.1).is_err(), "{bad:?}");
    }
    assert_eq!(
        m.list().await.len(),
        before,
        "a refused clone made a volume"
    );

    // A copy that fails (the snapshot's files are gone from every replica
    // of the source) leaves no volume behind.
    for r in m.get("src").await.expect("get").replicas {
        std::fs::remove_file(Path::new(&r.dir).join("volume-snap-s1.img")).expect("remove layer");
    }
    m.create_clone("broken", 0, None, &from_s1)
        .await
        .expect_err("the copy cannot read its source");
    assert_eq!(m.list().await.len(), before, "a failed copy left a volume");
    assert!(m.get("broken").await.is_err());
}
