//! Longhorn compatibility of the backupstore, both ways, against an
//! independent Python implementation of Longhorn's layout
//! (`tests/fixtures/make-longhorn-fixture.py`, written from Longhorn's Go
//! sources): Cairn restores the committed Longhorn-layout fixture, and the
//! script restores what Cairn writes. The script needs PyPI `lz4`:
//! `scripts/s3-server.sh install-moto` puts it in `target/tools/moto`.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cairn::backupstore::format::Compression;
use cairn::backupstore::store::{BackupPlan, BackupRequest, BackupStore, BlockSink, BlockSource};
use cairn::backupstore::Progress;
use object_store::local::LocalFileSystem;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

struct Mem(Mutex<Vec<u8>>);

impl BlockSource for Mem {
    fn size(&self) -> u64 {
        self.0.lock().expect("lock").len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let v = self.0.lock().expect("lock");
        buf.copy_from_slice(&v[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
}

impl BlockSink for Mem {
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut v = self.0.lock().expect("lock");
        v[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut v = self.0.lock().expect("lock");
        v[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).expect("copy");
        }
    }
}

fn store_at(root: &Path) -> BackupStore {
    let fs = LocalFileSystem::new_with_prefix(root).expect("local fs");
    BackupStore::new(Arc::new(fs), object_store::path::Path::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_backups_longhorn_wrote() {
    let tmp = tempfile::tempdir().expect("tmp");
    copy_dir(&fixtures().join("longhorn-backupstore"), tmp.path());
    let store = store_at(tmp.path());
    let expected =
        std::fs::read_to_string(tmp.path().join("expected-sha256.txt")).expect("expected");
    let mut by_backup: BTreeMap<(String, String), Vec<u8>> = BTreeMap::new();
    for line in expected.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (vol, backup, want, size) = (f[0], f[1], f[2], f[3].parse::<usize>().expect("size"));
        assert_eq!(
            store.get_volume(vol).await.expect("volume.cfg").size as usize,
            size
        );
        let sink = Arc::new(Mem(Mutex::new(vec![0u8; size])));
        let r = store
            .restore(
                vol,
                backup,
                sink.clone(),
                None,
                Arc::new(Progress::new()),
                4,
            )
            .await
            .expect("restore");
        let img = sink.0.lock().expect("lock").clone();
        assert_eq!(sha(&img), want, "{vol}/{backup} restored wrong ({r:?})");
        println!(
            "restored Longhorn's {vol}/{backup}: {} blocks, sha256 {want}",
            r.restored_blocks
        );
        by_backup.insert((vol.into(), backup.into()), img);
    }
    // Incremental (DR) restore from backup-1 to backup-2 fetches only what changed.
    let base = store.get_backup("lhvol", "backup-1").await.expect("base");
    let sink = Arc::new(Mem(Mutex::new(
        by_backup[&("lhvol".to_string(), "backup-1".to_string())].clone(),
    )));
    let r = store
        .restore(
            "lhvol",
            "backup-2",
            sink.clone(),
            Some(&base),
            Arc::new(Progress::new()),
            4,
        )
        .await
        .expect("incremental");
    assert_eq!(
        *sink.0.lock().expect("lock"),
        by_backup[&("lhvol".to_string(), "backup-2".to_string())]
    );
    assert!(
        r.restored_blocks < base.blocks.len() as u64 + 1 && r.zeroed_blocks == 1,
        "{r:?}"
    );
    println!(
        "incremental restore backup-1 -> backup-2: {} fetched, {} zeroed",
        r.restored_blocks, r.zeroed_blocks
    );
}

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("CAIRN_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/moto/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn longhorns_reader_restores_what_cairn_writes() {
    let py = python();
    let ok = std::process::Command::new(&py)
        .args(["-c", "import lz4.frame"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{} cannot import lz4: run scripts/s3-server.sh install-moto (or set CAIRN_PYTHON)",
        py.display()
    );
    let tmp = tempfile::tempdir().expect("tmp");
    let store = store_at(tmp.path());
    for (i, c) in [Compression::Lz4, Compression::Gzip, Compression::None]
        .into_iter()
        .enumerate()
    {
        let vol = format!("cairn-{}", c.as_str());
        let mut data: Vec<u8> = (0..8 * MIB as usize)
            .map(|j| ((j * 31 + i) % 253) as u8)
            .collect();
        data[4 * MIB as usize..6 * MIB as usize].fill(0); // a hole
        let src = Arc::new(Mem(Mutex::new(data.clone())));
        let req = |name: &str, plan: BackupPlan| BackupRequest {
            volume: vol.clone(),
            volume_size: 8 * MIB,
            backup_name: name.into(),
            snapshot_name: format!("snap-{name}"),
            snapshot_created: "2026-01-01T00:00:00Z".into(),
            labels: BTreeMap::new(),
            compression: c,
            block_size: 2 * MIB,
            plan,
            concurrency: 4,
        };
        store
            .create_backup(
                req(
                    "b1",
                    BackupPlan::Full {
                        ranges: vec![(0, 8 * MIB)],
                    },
                ),
                src.clone(),
                Arc::new(Progress::new()),
            )
            .await
            .expect("b1");
        // Change one block and fill the hole: an incremental backup.
        {
            let mut v = src.0.lock().expect("lock");
            v[MIB as usize..MIB as usize + 4096].fill(7);
            v[4 * MIB as usize..4 * MIB as usize + 8192].fill(9);
        }
        let changed = vec![(MIB, 4096), (4 * MIB, 8192)];
        let r = store
            .create_backup(
                req(
                    "b2",
                    BackupPlan::Incremental {
                        base_backup: "b1".into(),
                        changed,
                    },
                ),
                src.clone(),
                Arc::new(Progress::new()),
            )
            .await
            .expect("b2");
        assert_eq!(r.uploaded_blocks, 2);
        for (backup, want) in [
            ("b1", sha(&data)),
            ("b2", sha(&src.0.lock().expect("lock"))),
        ] {
            let out = std::process::Command::new(&py)
                .arg(fixtures().join("make-longhorn-fixture.py"))
                .args(["--verify", tmp.path().to_str().expect("utf8"), &vol, backup])
                .output()
                .expect("run the verify script");
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                out.status.success(),
                "{vol}/{backup}: {} {}",
                text,
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                text.split_whitespace().next(),
                Some(want.as_str()),
                "{vol}/{backup}"
            );
            println!("Longhorn-layout reader restored Cairn's {vol}/{backup}: sha256 {want}");
        }
    }
}

/// Longhorn's lock rules: a backup (or restore) lock held by another
/// process keeps a deletion out, a deletion lock keeps backups and restores
/// out, and backups and restores run beside each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_files_exclude_deletion_from_backup_and_restore() {
    let tmp = tempfile::tempdir().expect("tmp");
    copy_dir(&fixtures().join("longhorn-backupstore"), tmp.path());
    let store = store_at(tmp.path()).with_lock_wait(std::time::Duration::from_secs(2));
    let volume_dir = {
        let h: String = sha2::Sha512::digest(b"lhvol")
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect();
        tmp.path().join(format!(
            "backupstore/volumes/{}/{}/lhvol",
            &h[0..2],
            &h[2..4]
        ))
    };
    let locks = volume_dir.join("locks");
    std::fs::create_dir_all(&locks).expect("locks dir");
    let other = |ty: u8| {
        std::fs::write(
            locks.join("lock-other.lck"),
            format!(r#"{{"Name":"lock-other","Type":{ty},"Acquired":true}}"#),
        )
        .expect("lock")
    };
    // Another node holds a backup lock: deletion is refused, nothing deleted.
    other(1);
    let e = store
        .delete_backup("lhvol", "backup-1")
        .await
        .expect_err("deletion beside a backup")
        .to_string();
    assert!(
        e.contains("deletion lock") && e.contains("backup or restore"),
        "{e}"
    );
    assert!(
        store.get_backup("lhvol", "backup-1").await.is_ok(),
        "the refused deletion changed nothing"
    );
    // ... but a restore runs beside it.
    let size = store.get_volume("lhvol").await.expect("vol").size as usize;
    let sink = Arc::new(Mem(Mutex::new(vec![0u8; size])));
    store
        .restore(
            "lhvol",
            "backup-1",
            sink,
            None,
            Arc::new(Progress::new()),
            2,
        )
        .await
        .expect("restore beside a backup lock");
    // Another node deletes: restores (and backups) are refused.
    other(2);
    let sink = Arc::new(Mem(Mutex::new(vec![0u8; size])));
    let e = store
        .restore(
            "lhvol",
            "backup-1",
            sink,
            None,
            Arc::new(Progress::new()),
            2,
        )
        .await
        .expect_err("restore beside a deletion")
        .to_string();
    assert!(
        e.contains("backup/restore lock") && e.contains("deletion"),
        "{e}"
    );
    // Released: the deletion goes through, and our lock files are gone.
    std::fs::remove_file(locks.join("lock-other.lck")).expect("unlock");
    store
        .delete_backup("lhvol", "backup-1")
        .await
        .expect("delete");
    assert_eq!(
        std::fs::read_dir(&locks).expect("locks").count(),
        0,
        "lock files left behind"
    );
}
