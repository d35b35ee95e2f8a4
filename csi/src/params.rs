//! StorageClass and VolumeSnapshotClass parameters, and volume sizes.
//!
//! Every parameter is checked before anything is made; an error names the
//! parameter and what it accepts (`INVALID_ARGUMENT`). Keys under
//! `csi.storage.k8s.io/` are the sidecars' own and are passed over.

use std::collections::HashMap;

use tonic::Status;

use crate::pb::CapacityRange;

/// Volumes are sized in whole 2 MiB blocks: the backup block size, so any
/// volume backs up and restores to exactly its size.
pub const SIZE_UNIT: u64 = 2 << 20;
/// A volume whose request gives no size.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// The StorageClass parameters the driver knows.
pub const VOLUME_PARAMETERS: &[&str] = &[
    "numberOfReplicas",
    "staleReplicaTimeout",
    "fromBackup",
    "recurringJobs",
    "mkfsParams",
    "dataLocality",
];

/// Where a volume's replicas go relative to the node it is attached on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataLocality {
    /// Anywhere placement puts them.
    #[default]
    Disabled,
    /// Created on the node the scheduler picked for the first consumer
    /// (the `preferred` topology of a `WaitForFirstConsumer` claim), which
    /// puts a replica there when one fits; elsewhere when it does not.
    BestEffort,
}

/// A StorageClass's parameters, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeParams {
    /// 0: cairnd's default (3 in a cluster, fewer on a smaller one).
    pub replicas: u32,
    /// Minutes; accepted for Longhorn StorageClasses, applied cluster-wide
    /// by cairnd's `stale-replica-timeout` setting (see docs/kubernetes.md).
    pub stale_replica_timeout: Option<u32>,
    /// `bak://VOLUME/BACKUP`: the new volume is a restore of it.
    pub from_backup: Option<String>,
    /// Longhorn's recurring-job JSON (checked by cairnd, as for
    /// `volume create --recurring-jobs`).
    pub recurring_jobs: Option<String>,
    /// Extra `mkfs` arguments for a mount volume's first format.
    pub mkfs_params: Option<String>,
    pub data_locality: DataLocality,
}

fn bad(param: &str, value: &str, want: &str) -> Status {
    Status::invalid_argument(format!(
        "StorageClass parameter {param}: {value:?} is not valid: {want}"
    ))
}

impl VolumeParams {
    pub fn parse(params: &HashMap<String, String>) -> Result<VolumeParams, Status> {
        let mut p = VolumeParams::default();
        let mut keys: Vec<&String> = params.keys().collect();
        keys.sort();
        for key in keys {
            let value = params[key].as_str();
            match key.as_str() {
                "numberOfReplicas" => {
                    p.replicas = value
                        .parse::<u32>()
                        .ok()
                        .filter(|n| (1..=8).contains(n))
                        .ok_or_else(|| bad(key, value, "give a number of replicas, 1-8"))?;
                }
                "staleReplicaTimeout" => {
                    p.stale_replica_timeout = Some(
                        value
                            .parse::<u32>()
                            .ok()
                            .filter(|n| *n >= 1)
                            .ok_or_else(|| bad(key, value, "give whole minutes, at least 1"))?,
                    );
                }
                "fromBackup" => {
                    let ok = crate::naming::SnapshotHandle::parse(value)
                        .is_some_and(|h| matches!(h, crate::naming::SnapshotHandle::Bak { .. }));
                    if !ok {
                        return Err(bad(key, value, "give a backup handle, bak://VOLUME/BACKUP"));
                    }
                    p.from_backup = Some(value.to_string());
                }
                "recurringJobs" => {
                    if !value.trim_start().starts_with('[') {
                        return Err(bad(
                            key,
                            value,
                            "give a JSON array of jobs, e.g. [{\"name\":\"snap\",\"task\":\"snapshot\",\"cron\":\"0 * * * *\",\"retain\":5}]",
                        ));
                    }
                    p.recurring_jobs = Some(value.to_string());
                }
                "mkfsParams" => {
                    let allowed = |c: char| c.is_ascii_alphanumeric() || " \t-_=,.:/+".contains(c);
                    if !value.chars().all(allowed) {
                        return Err(bad(
                            key,
                            value,
                            "give mkfs options separated by spaces (letters, digits and -_=,.:/+ only; no quotes)",
                        ));
                    }
                    p.mkfs_params = Some(value.to_string()).filter(|v| !v.trim().is_empty());
                }
                "dataLocality" => {
                    p.data_locality = match value {
                        "" | "disabled" => DataLocality::Disabled,
                        "best-effort" => DataLocality::BestEffort,
                        _ => return Err(bad(key, value, "use disabled or best-effort")),
                    };
                }
                k if k.starts_with("csi.storage.k8s.io/") => {}
                other => {
                    return Err(Status::invalid_argument(format!(
                        "unknown StorageClass parameter {other:?}: known are {}",
                        VOLUME_PARAMETERS.join(", ")
                    )))
                }
            }
        }
        Ok(p)
    }
}

/// What a VolumeSnapshotClass's `type` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotType {
    /// A Cairn snapshot in the volume's replicas (`snap://`), ready at once.
    Snap,
    /// A backup in the backup target (`bak://`), ready once uploaded.
    Bak,
}

impl SnapshotType {
    /// `type` is `snap` or `bak`; absent or empty is `bak` (Longhorn's
    /// default).
    pub fn parse(params: &HashMap<String, String>) -> Result<SnapshotType, Status> {
        let mut t = SnapshotType::Bak;
        for (key, value) in params {
            match key.as_str() {
                "type" => {
                    t = match value.as_str() {
                        "" | "bak" => SnapshotType::Bak,
                        "snap" => SnapshotType::Snap,
                        _ => {
                            return Err(Status::invalid_argument(format!(
                                "VolumeSnapshotClass parameter type: {value:?} is not valid: use snap (a Cairn snapshot) or bak (a backup)"
                            )))
                        }
                    }
                }
                k if k.starts_with("csi.storage.k8s.io/") => {}
                other => {
                    return Err(Status::invalid_argument(format!(
                        "unknown VolumeSnapshotClass parameter {other:?}: the only one is type"
                    )))
                }
            }
        }
        Ok(t)
    }
}

/// The size for a capacity range: the required bytes rounded up to
/// [`SIZE_UNIT`] (no range: [`DEFAULT_SIZE`], or the limit if that is
/// smaller), never above the limit.
pub fn size_for(range: Option<&CapacityRange>) -> Result<u64, Status> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(Status::invalid_argument(format!(
            "capacity_range: required_bytes {required} and limit_bytes {limit} must not be negative"
        )));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit > 0 && required > limit {
        return Err(Status::out_of_range(format!(
            "capacity_range: required_bytes {required} is above limit_bytes {limit}"
        )));
    }
    let want = if required > 0 {
        required
    } else if limit > 0 {
        limit.min(DEFAULT_SIZE)
    } else {
        DEFAULT_SIZE
    };
    let size = want.div_ceil(SIZE_UNIT) * SIZE_UNIT;
    if limit > 0 && size > limit {
        return Err(Status::out_of_range(format!(
            "capacity_range: volumes come in whole {} MiB; none lies between required_bytes {required} and limit_bytes {limit}",
            SIZE_UNIT >> 20
        )));
    }
    Ok(size)
}

/// Whether `size` satisfies `range` (for a volume that exists already).
pub fn fits(size: u64, range: Option<&CapacityRange>) -> bool {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    size >= required.max(0) as u64 && (limit <= 0 || size <= limit as u64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn range(required: i64, limit: i64) -> CapacityRange {
        CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }
    }

    #[test]
    fn sizes_round_up_and_respect_the_limit() {
        assert_eq!(size_for(None).unwrap(), DEFAULT_SIZE);
        assert_eq!(size_for(Some(&range(1, 0))).unwrap(), SIZE_UNIT);
        assert_eq!(size_for(Some(&range(0, 10 << 20))).unwrap(), 10 << 20);
        assert_eq!(size_for(Some(&range(5 << 20, 0))).unwrap(), 6 << 20);
        let e = size_for(Some(&range(5 << 20, 5 << 20))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        let e = size_for(Some(&range(3, 2))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        let e = size_for(Some(&range(-1, 0))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(fits(6 << 20, Some(&range(5 << 20, 0))));
        assert!(!fits(6 << 20, Some(&range(7 << 20, 0))));
        assert!(!fits(6 << 20, Some(&range(0, 4 << 20))));
    }

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parameters_parse_or_name_the_parameter() {
        let p = VolumeParams::parse(&map(&[
            ("numberOfReplicas", "3"),
            ("staleReplicaTimeout", "30"),
            ("fromBackup", "bak://db/backup-1"),
            ("mkfsParams", "-E nodiscard -I 256"),
            ("dataLocality", "disabled"),
            ("csi.storage.k8s.io/fstype", "xfs"),
        ]))
        .unwrap();
        assert_eq!(p.replicas, 3);
        assert_eq!(p.stale_replica_timeout, Some(30));
        assert_eq!(p.from_backup.as_deref(), Some("bak://db/backup-1"));
        assert_eq!(p.data_locality, DataLocality::Disabled);
        let p = VolumeParams::parse(&map(&[("dataLocality", "best-effort")])).unwrap();
        assert_eq!(p.data_locality, DataLocality::BestEffort);
        for (k, v) in [
            ("numberOfReplicas", "0"),
            ("numberOfReplicas", "three"),
            ("staleReplicaTimeout", "-1"),
            ("fromBackup", "s3://bucket"),
            ("recurringJobs", "{}"),
            ("mkfsParams", "-L 'x'; rm -rf /"),
            ("dataLocality", "strict-local"),
            ("replicas", "3"),
        ] {
            let e = VolumeParams::parse(&map(&[(k, v)])).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{k}={v}");
            assert!(e.message().contains(k), "{k}={v}: {}", e.message());
        }
        assert_eq!(SnapshotType::parse(&map(&[])).unwrap(), SnapshotType::Bak);
        assert_eq!(
            SnapshotType::parse(&map(&[("type", "snap")])).unwrap(),
            SnapshotType::Snap
        );
        for (k, v) in [("type", "full"), ("kind", "snap")] {
            let e = SnapshotType::parse(&map(&[(k, v)])).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(k), "{}", e.message());
        }
    }
}
