//! Daemon settings: named values with defaults, validated on every change
//! and kept in `<data-dir>/settings.json` (atomic rewrite). Names follow
//! Longhorn's where Longhorn has the setting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::fsutil;

#[derive(Debug, thiserror::Error)]
pub enum SettingError {
    #[error("unknown setting {0:?}: see `cairnctl setting list`")]
    Unknown(String),
    #[error("setting {name}: {value:?} is not valid: {expected}")]
    Invalid {
        name: String,
        value: String,
        expected: String,
    },
    #[error("settings file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// What values a setting takes.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Bool,
    /// An integer in `[min, max]`.
    Int {
        min: u64,
        max: u64,
    },
    /// A positive decimal number.
    Positive,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// Free text checked by a function (which says what is wrong).
    Text(fn(&str) -> Result<(), String>),
}

/// One setting's definition.
pub struct Definition {
    pub name: &'static str,
    pub default: &'static str,
    pub description: &'static str,
    kind: Kind,
}

pub const REPLICA_SOFT_ANTI_AFFINITY: &str = "replica-soft-anti-affinity";
pub const OVER_PROVISIONING: &str = "storage-over-provisioning-percentage";
pub const MIN_AVAILABLE: &str = "storage-minimal-available-percentage";
pub const STALE_REPLICA_TIMEOUT: &str = "stale-replica-timeout";
pub const AUTO_SALVAGE: &str = "auto-salvage";
pub const REBUILD_LIMIT: &str = "concurrent-replica-rebuild-per-node-limit";
pub const REPLICA_TIMEOUT: &str = "engine-replica-timeout";
pub const BACKUP_TARGET: &str = "backup-target";
pub const BACKUP_CREDENTIAL: &str = "backup-target-credential-secret";
pub const BACKUPSTORE_POLL_INTERVAL: &str = "backupstore-poll-interval";
pub const ALLOW_DETACHED_JOBS: &str = "allow-recurring-job-while-volume-detached";
pub const BACKUP_COMPRESSION: &str = "backup-compression-method";
pub const BACKUP_BLOCK_SIZE: &str = "backup-block-size";
pub const BACKUP_CONCURRENCY: &str = "backup-concurrent-limit";
pub const RESTORE_CONCURRENCY: &str = "restore-concurrent-limit";

fn check_backup_target(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    crate::backupstore::target::BackupTarget::parse(v)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn check_credential_file(v: &str) -> Result<(), String> {
    if v.is_empty() || Path::new(v).is_absolute() {
        Ok(())
    } else {
        Err(
            "give the absolute path of a KEY=VALUE credentials file, or empty for the environment"
                .into(),
        )
    }
}

pub static DEFINITIONS: &[Definition] = &[
    Definition {
        name: REPLICA_SOFT_ANTI_AFFINITY,
        default: "false",
        description: "allow replicas of one volume on the same node (distinct disks) when there are not enough nodes",
        kind: Kind::Bool,
    },
    Definition {
        name: OVER_PROVISIONING,
        default: "100",
        description: "a disk may promise volume bytes up to this percent of its size",
        kind: Kind::Int { min: 0, max: 10_000 },
    },
    Definition {
        name: MIN_AVAILABLE,
        default: "25",
        description: "a disk with less free space than this percent of its size gets no new replicas",
        kind: Kind::Int { min: 0, max: 100 },
    },
    Definition {
        name: STALE_REPLICA_TIMEOUT,
        default: "2880",
        description: "minutes a failed replica may stay away before it is deleted and replaced (fractions allowed)",
        kind: Kind::Positive,
    },
    Definition {
        name: AUTO_SALVAGE,
        default: "true",
        description: "when every replica failed, recover from those with the highest revision",
        kind: Kind::Bool,
    },
    Definition {
        name: REBUILD_LIMIT,
        default: "5",
        description: "rebuilds onto one node at a time (0 stops rebuilds)",
        kind: Kind::Int { min: 0, max: 100 },
    },
    Definition {
        name: REPLICA_TIMEOUT,
        default: "8",
        description: "seconds a remote replica may take to answer before it is failed",
        kind: Kind::Int { min: 1, max: 300 },
    },
    Definition {
        name: BACKUP_TARGET,
        default: "",
        description: "where backups go: s3://BUCKET@REGION/PATH/, nfs://HOST:/PATH, file:///PATH; empty = file://<data-dir>/backups",
        kind: Kind::Text(check_backup_target),
    },
    Definition {
        name: BACKUP_CREDENTIAL,
        default: "",
        description: "file of KEY=VALUE lines (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINTS, AWS_CERT, VIRTUAL_HOSTED_STYLE, HTTP(S)_PROXY, NO_PROXY); empty = the daemon's environment",
        kind: Kind::Text(check_credential_file),
    },
    Definition {
        name: BACKUPSTORE_POLL_INTERVAL,
        default: "300",
        description: "seconds between polls of the backup target by DR standby volumes (0 stops polling)",
        kind: Kind::Int { min: 0, max: 86_400 },
    },
    Definition {
        name: ALLOW_DETACHED_JOBS,
        default: "false",
        description: "let recurring jobs run on detached volumes (replicas opened without a device)",
        kind: Kind::Bool,
    },
    Definition {
        name: BACKUP_COMPRESSION,
        default: "lz4",
        description: "compression of new backup blocks: lz4, gzip or none (all are readable)",
        kind: Kind::Choice(&["lz4", "gzip", "none"]),
    },
    Definition {
        name: BACKUP_BLOCK_SIZE,
        default: "2MiB",
        description: "block size of new backup volumes: 2MiB or 16MiB",
        kind: Kind::Choice(&["2MiB", "16MiB"]),
    },
    Definition {
        name: BACKUP_CONCURRENCY,
        default: "8",
        description: "block uploads in flight per backup",
        kind: Kind::Int { min: 1, max: 64 },
    },
    Definition {
        name: RESTORE_CONCURRENCY,
        default: "8",
        description: "block downloads in flight per restore",
        kind: Kind::Int { min: 1, max: 64 },
    },
];

fn definition(name: &str) -> Result<&'static Definition, SettingError> {
    DEFINITIONS
        .iter()
        .find(|d| d.name == name)
        .ok_or_else(|| SettingError::Unknown(name.to_string()))
}

/// Checks `value` for setting `name`; returns it normalized.
pub fn validate(name: &str, value: &str) -> Result<String, SettingError> {
    let d = definition(name)?;
    let v = value.trim();
    let bad = |expected: String| SettingError::Invalid {
        name: name.to_string(),
        value: value.to_string(),
        expected,
    };
    match d.kind {
        Kind::Bool => match v {
            "true" | "false" => Ok(v.to_string()),
            _ => Err(bad("use true or false".into())),
        },
        Kind::Int { min, max } => match v.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n.to_string()),
            _ => Err(bad(format!("use a whole number from {min} to {max}"))),
        },
        Kind::Positive => match v.parse::<f64>() {
            Ok(x) if x.is_finite() && x > 0.0 => Ok(v.to_string()),
            _ => Err(bad("use a positive number, e.g. 2880 or 0.5".into())),
        },
        Kind::Choice(words) => match words.iter().find(|w| **w == v) {
            Some(w) => Ok(w.to_string()),
            None => Err(bad(format!("use one of: {}", words.join(", ")))),
        },
        Kind::Text(check) => check(v).map(|()| v.to_string()).map_err(bad),
    }
}

/// The node's settings.
pub struct Settings {
    path: PathBuf,
    values: Mutex<BTreeMap<String, String>>,
}

impl Settings {
    /// Loads `<data_dir>/settings.json`; a missing file means all defaults.
    /// Unknown or invalid entries are an error (the file is ours).
    pub fn open(data_dir: &Path) -> Result<Settings, SettingError> {
        let path = data_dir.join("settings.json");
        let file_err = |reason: String| SettingError::File {
            path: path.clone(),
            reason,
        };
        let values: BTreeMap<String, String> = match std::fs::read(&path) {
            Ok(b) => {
                serde_json::from_slice(&b).map_err(|e| file_err(format!("not valid JSON: {e}")))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(file_err(e.to_string())),
        };
        for (k, v) in &values {
            validate(k, v).map_err(|e| file_err(e.to_string()))?;
        }
        Ok(Settings {
            path,
            values: Mutex::new(values),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.values.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every setting with its current value, by name.
    pub fn list(&self) -> Vec<(&'static Definition, String)> {
        let values = self.lock();
        DEFINITIONS
            .iter()
            .map(|d| {
                (
                    d,
                    values
                        .get(d.name)
                        .cloned()
                        .unwrap_or_else(|| d.default.to_string()),
                )
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> Result<String, SettingError> {
        let d = definition(name)?;
        Ok(self
            .lock()
            .get(name)
            .cloned()
            .unwrap_or_else(|| d.default.to_string()))
    }

    /// Validates and persists; on any error nothing changes.
    pub fn set(&self, name: &str, value: &str) -> Result<String, SettingError> {
        let v = validate(name, value)?;
        let mut values = self.lock();
        let mut next = values.clone();
        next.insert(name.to_string(), v.clone());
        let bytes = serde_json::to_vec_pretty(&next).map_err(|e| SettingError::File {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        fsutil::atomic_write(&self.path, &bytes).map_err(|e| SettingError::File {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        *values = next;
        tracing::info!(setting = name, value = %v, "setting changed");
        Ok(v)
    }

    pub fn bool(&self, name: &str) -> bool {
        self.get(name).map(|v| v == "true").unwrap_or(false)
    }

    pub fn u64(&self, name: &str) -> u64 {
        self.get(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn f64(&self, name: &str) -> f64 {
        self.get(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_set_persist_and_reject() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Settings::open(tmp.path()).unwrap();
        assert_eq!(s.get(AUTO_SALVAGE).unwrap(), "true");
        assert_eq!(s.u64(REPLICA_TIMEOUT), 8);
        s.set(STALE_REPLICA_TIMEOUT, "0.25").unwrap();
        s.set(REPLICA_SOFT_ANTI_AFFINITY, "true").unwrap();
        let cases = [
            (AUTO_SALVAGE, "yes", "use true or false"),
            (MIN_AVAILABLE, "101", "from 0 to 100"),
            (REPLICA_TIMEOUT, "0", "from 1 to 300"),
            (STALE_REPLICA_TIMEOUT, "-1", "positive number"),
            (STALE_REPLICA_TIMEOUT, "NaN", "positive number"),
            (BACKUP_COMPRESSION, "zstd", "one of: lz4, gzip, none"),
            (BACKUP_BLOCK_SIZE, "4MiB", "one of: 2MiB, 16MiB"),
            (BACKUPSTORE_POLL_INTERVAL, "-5", "from 0 to 86400"),
            (BACKUP_CREDENTIAL, "relative/creds", "absolute path"),
            (BACKUP_TARGET, "s3://bucket/path/", ""),
            (BACKUP_TARGET, "ftp://x/", "scheme"),
            (ALLOW_DETACHED_JOBS, "1", "use true or false"),
        ];
        let before = std::fs::read(tmp.path().join("settings.json")).unwrap();
        for (name, value, want) in cases {
            let e = s.set(name, value).unwrap_err().to_string();
            assert!(e.contains(want), "{name}={value}: {e}");
        }
        let e = s.set("no-such", "1").unwrap_err().to_string();
        assert!(e.contains("unknown setting \"no-such\""), "{e}");
        assert_eq!(
            std::fs::read(tmp.path().join("settings.json")).unwrap(),
            before,
            "bad input changed the file"
        );
        let again = Settings::open(tmp.path()).unwrap();
        assert_eq!(again.f64(STALE_REPLICA_TIMEOUT), 0.25);
        assert!(again.bool(REPLICA_SOFT_ANTI_AFFINITY));
        assert_eq!(again.list().len(), DEFINITIONS.len());
    }
}
