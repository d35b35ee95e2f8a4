//! Persisted volume records: one JSON file per volume at
//! `<data-dir>/volumes/<name>.json`, replaced with [`fsutil::atomic_write`] so
//! a crash leaves the old record or the new one, never a torn file.
//!
//! The record is the control plane's memory across restarts: the volume's
//! shape, where its replicas live, which of them are failed (a failed replica
//! is never silently trusted again), and whether the operator wants it
//! attached.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ControlError;
use crate::fsutil;

/// Record format version, bumped on incompatible changes.
pub const RECORD_FORMAT: u32 = 1;

/// One volume as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub format: u32,
    pub name: String,
    pub size: u64,
    /// Replicas the volume was created with (the length of `replicas`).
    pub replica_count: u32,
    pub queues: u16,
    pub queue_depth: u16,
    /// The operator's wish: attach this volume whenever cairnd runs.
    pub attached: bool,
    /// ublk device id while attached, kept after a crash so the next cairnd
    /// recovers the same `/dev/ublkbN`; cleared on a clean stop.
    pub dev_id: Option<u32>,
    /// Revision counter as of the last epoch the control plane saw.
    pub revision: u64,
    pub replicas: Vec<ReplicaRecord>,
    /// A DR standby volume: follows a backup volume, cannot be attached.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub standby: bool,
    /// The backup this volume was restored from (`bak://VOLUME/BACKUP`), or
    /// the backup volume a standby volume follows (`bak://VOLUME`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub from_backup: String,
    /// The last backup restored into this volume.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_restored: String,
    /// A restore into this volume started and has not finished: its
    /// replicas hold a mix of the old and the new backup, so the next
    /// restore starts from zeros, not incrementally from `last_restored`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restoring: Option<String>,
    /// Recurring jobs attached to this volume (JSON of Longhorn's format).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub recurring_jobs: String,
    /// Name of the last backup of this volume Cairn made (incremental base).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_backup: String,
    /// The snapshot the last backup was taken from.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_backup_snapshot: String,
    /// The owner term: 1 at creation, one more at every handover or forced
    /// takeover (see `replica::fence::OwnerTerm`). 0 in records from before
    /// volumes could move.
    #[serde(default)]
    pub owner_term: u64,
    /// The node that handed this volume over to `node` and has not yet
    /// heard that `node` holds it (see `control::handover`). A record in
    /// this state is not this node's any more: not attached, not reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handed_to: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub name: String,
    pub node: String,
    pub disk: PathBuf,
    pub dir: PathBuf,
    pub state: RecordState,
    /// Why the replica failed; empty while healthy.
    #[serde(default)]
    pub message: String,
    /// The replica server address of `node`; empty for a replica on this node.
    #[serde(default)]
    pub addr: String,
    /// When it failed (seconds since the Unix epoch), for the stale-replica
    /// timeout.
    #[serde(default)]
    pub failed_at: Option<u64>,
    /// The last rebuild that completed onto this replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rebuild: Option<LastRebuild>,
}

impl ReplicaRecord {
    /// A new, healthy replica at `dir` on `disk` of `node` (`addr` empty
    /// for this node).
    pub fn new(
        name: String,
        node: String,
        addr: String,
        disk: PathBuf,
        dir: PathBuf,
    ) -> ReplicaRecord {
        ReplicaRecord {
            name,
            node,
            disk,
            dir,
            state: RecordState::Healthy,
            message: String::new(),
            addr,
            failed_at: None,
            last_rebuild: None,
        }
    }
}

/// What the last completed rebuild of a replica did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRebuild {
    pub incremental: bool,
    pub copied: u64,
    pub millis: u64,
    pub finished_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordState {
    Healthy,
    Failed,
}

/// A record file that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("volume record {path}: {reason}")]
pub struct CorruptRecord {
    pub path: PathBuf,
    pub reason: String,
}

/// The healthy set and the revision it was given, as the engine committed
/// them. The volume record learns of a replica failure asynchronously (an
/// event, then a save behind the state lock); this mark is written inside
/// the commit, before the smaller set is published and before the write
/// that exposed the failure is acknowledged. Attach trusts no replica the
/// mark left out, so a crash in that window cannot bring back a replica that
/// missed acknowledged writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochMark {
    pub revision: u64,
    pub healthy: Vec<String>,
}

/// Writes an epoch mark to `path` (atomic).
pub fn write_epoch(path: &Path, mark: &EpochMark) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(mark).map_err(std::io::Error::other)?;
    fsutil::atomic_write(path, &bytes)
}

impl EpochMark {
    /// Whether attach may trust replica `name` at `revision`: one the mark
    /// left out of the healthy set, or one behind the mark's revision,
    /// missed writes that were acknowledged.
    pub fn trusts(&self, name: &str, revision: u64) -> bool {
        revision >= self.revision && self.healthy.iter().any(|h| h == name)
    }
}

/// The directory of volume records.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Uses `<data_dir>/volumes`, creating it if missing.
    pub fn open(data_dir: &Path) -> Result<Store, ControlError> {
        let dir = data_dir.join("volumes");
        std::fs::create_dir_all(&dir).map_err(ControlError::io(&dir))?;
        Ok(Store { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Every record, sorted by name, plus the files that could not be read.
    /// A bad file is reported, not fatal: one corrupt record must not keep
    /// every other volume from coming back.
    pub fn load_all(&self) -> Result<(Vec<VolumeRecord>, Vec<CorruptRecord>), ControlError> {
        let mut records = Vec::new();
        let mut corrupt = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(ControlError::io(&self.dir))?;
        for entry in entries {
            let entry = entry.map_err(ControlError::io(&self.dir))?;
            let path = entry.path();
            // Skips `*.json.tmp` left by a crash inside atomic_write.
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match load_one(&path) {
                Ok(r) => records.push(r),
                Err(reason) => corrupt.push(CorruptRecord { path, reason }),
            }
        }
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((records, corrupt))
    }

    pub fn save(&self, record: &VolumeRecord) -> Result<(), ControlError> {
        let path = self.path(&record.name);
        let mut bytes = serde_json::to_vec_pretty(record)
            .map_err(|e| ControlError::Internal(format!("encoding volume record: {e}")))?;
        bytes.push(b'\n');
        fsutil::atomic_write(&path, &bytes).map_err(ControlError::io(&path))
    }

    /// Removes the record; a missing one is already removed.
    /// `<name>.epoch`: the engine's last replica-set change, written
    /// synchronously before that change is published (see [`EpochMark`]).
    pub fn epoch_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.epoch"))
    }

    /// Persists `mark` (atomic; called from an I/O thread on the rare path).
    pub fn save_epoch(&self, name: &str, mark: &EpochMark) -> std::io::Result<()> {
        write_epoch(&self.epoch_path(name), mark)
    }

    /// The last epoch mark, if any; an unreadable one is logged and ignored
    /// (the record and the replicas' revisions still decide).
    pub fn load_epoch(&self, name: &str) -> Option<EpochMark> {
        let path = self.epoch_path(name);
        let bytes = std::fs::read(&path).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable epoch mark");
                None
            }
        }
    }

    /// `<name>.intent`: the attached engine's write-intent log (see
    /// [`crate::engine::intent`]); absent after a clean stop.
    pub fn intent_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.intent"))
    }

    pub fn remove(&self, name: &str) -> Result<(), ControlError> {
        let _ = std::fs::remove_file(self.epoch_path(name));
        let _ = std::fs::remove_file(self.intent_path(name));
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ControlError::io(&path)(e)),
        }
        fsutil::fsync_dir(&self.dir).map_err(ControlError::io(&self.dir))
    }
}

fn load_one(path: &Path) -> Result<VolumeRecord, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let record: VolumeRecord =
        serde_json::from_slice(&bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    if record.format != RECORD_FORMAT {
        return Err(format!(
            "format {} is not supported (this cairnd reads {RECORD_FORMAT})",
            record.format
        ));
    }
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    if record.name != stem {
        return Err(format!(
            "names volume {:?}, but the file is named for {stem:?}",
            record.name
        ));
    }
    crate::name::validate_volume_name(&record.name).map_err(|e| e.to_string())?;
    if record.replicas.is_empty() {
        return Err("lists no replicas".to_string());
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(name: &str) -> VolumeRecord {
        VolumeRecord {
            format: RECORD_FORMAT,
            name: name.to_string(),
            size: 1 << 20,
            replica_count: 2,
            queues: 1,
            queue_depth: 64,
            attached: true,
            dev_id: Some(3),
            revision: 7,
            replicas: vec![
                ReplicaRecord {
                    name: format!("{name}-r-0000abcd"),
                    node: "n1".into(),
                    disk: "/d1".into(),
                    dir: format!("/d1/replicas/{name}-r-0000abcd").into(),
                    state: RecordState::Healthy,
                    message: String::new(),
                    addr: String::new(),
                    failed_at: None,
                    last_rebuild: None,
                },
                ReplicaRecord {
                    name: format!("{name}-r-1111abcd"),
                    node: "n1".into(),
                    disk: "/d2".into(),
                    dir: format!("/d2/replicas/{name}-r-1111abcd").into(),
                    state: RecordState::Failed,
                    message: "head file deleted".into(),
                    addr: "10.0.0.2:9500".into(),
                    failed_at: Some(1_700_000_000),
                    last_rebuild: Some(LastRebuild {
                        incremental: true,
                        copied: 4096,
                        millis: 3,
                        finished_at: 1_700_000_100,
                    }),
                },
            ],
            standby: false,
            from_backup: String::new(),
            last_restored: String::new(),
            restoring: None,
            recurring_jobs: String::new(),
            last_backup: String::new(),
            last_backup_snapshot: String::new(),
            owner_term: 0,
            handed_to: None,
        }
    }

    #[test]
    fn roundtrip() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let (a, b) = (record("a"), record("b"));
        store.save(&b).unwrap();
        store.save(&a).unwrap();
        let (loaded, corrupt) = store.load_all().unwrap();
        assert!(corrupt.is_empty());
        assert_eq!(loaded, vec![a.clone(), b]);
        let text = std::fs::read_to_string(store.path("a")).unwrap();
        assert!(text.contains("\"state\": \"failed\""), "{text}");
        store.remove("b").unwrap();
        store.remove("b").unwrap();
        assert_eq!(store.load_all().unwrap().0, vec![a]);
    }

    #[test]
    fn corrupt_records_are_skipped_and_named() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        store.save(&record("good")).unwrap();
        std::fs::write(store.path("bad"), b"{\"name\": \"bad\", trunc").unwrap();
        std::fs::write(
            store.path("other"),
            serde_json::to_vec(&record("good")).unwrap(),
        )
        .unwrap();
        std::fs::write(tmp.path().join("volumes/crash.json.tmp"), b"garbage").unwrap();
        let (loaded, corrupt) = store.load_all().unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].name, "good");
        let mut bad: Vec<_> = corrupt.iter().map(|c| c.to_string()).collect();
        bad.sort();
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(
            bad[0].contains("bad.json") && bad[0].contains("not valid JSON"),
            "{bad:?}"
        );
        assert!(
            bad[1].contains("other.json") && bad[1].contains("file is named for"),
            "{bad:?}"
        );
    }
}
