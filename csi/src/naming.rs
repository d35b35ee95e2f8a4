//! CSI names to Cairn names, and snapshot handles.
//!
//! A CSI name (up to 128 characters, any text) maps to a Cairn name (a
//! DNS-1123 label) that is stable: the same CSI name always gives the same
//! Cairn name, so a retried `CreateVolume` finds the volume it made. A name
//! that already is a valid Cairn name (`pvc-<uuid>`, what the external
//! provisioner sends) is kept as it is, so volumes read the same in
//! `cairnctl` and in Kubernetes, and a static PV's `volumeHandle` is the
//! Cairn volume name. Any other name becomes a readable prefix (the name
//! lower-cased, other characters turned to `-`) plus 16 hex digits of its
//! SHA-256.

use cairn_api::name::{validate_label, MAX_VOLUME_NAME};
use sha2::{Digest, Sha256};
use tonic::Status;

/// Longest name a CSI request may carry (the spec's limit for names and ids).
pub const MAX_CSI_NAME: usize = 128;
/// Longest Cairn snapshot name.
pub const MAX_SNAPSHOT_NAME: usize = 63;

/// The Cairn volume name for CSI volume name `name`.
pub fn volume_name(name: &str) -> Result<String, Status> {
    cairn_name("volume", "name", name, MAX_VOLUME_NAME)
}

/// The Cairn snapshot (or backup label) name for CSI snapshot name `name`.
pub fn snapshot_name(name: &str) -> Result<String, Status> {
    cairn_name("snapshot", "name", name, MAX_SNAPSHOT_NAME)
}

fn cairn_name(kind: &'static str, field: &str, name: &str, max: usize) -> Result<String, Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{field} is missing: give the {kind}'s name"
        )));
    }
    if name.len() > MAX_CSI_NAME {
        return Err(Status::invalid_argument(format!(
            "{field} is {} characters long: CSI names have at most {MAX_CSI_NAME}",
            name.len()
        )));
    }
    if validate_label(kind, name, max).is_ok() {
        return Ok(name.to_string());
    }
    let digest = Sha256::digest(name.as_bytes());
    let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let sanitized: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let keep = max - hash.len() - 1;
    let prefix: String = sanitized.chars().take(keep).collect();
    let prefix = prefix.trim_matches('-');
    Ok(if prefix.is_empty() {
        format!("csi-{hash}")
    } else {
        format!("{prefix}-{hash}")
    })
}

/// A CSI snapshot id: a Cairn snapshot or a backup in the backup target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotHandle {
    /// `snap://VOLUME/SNAPSHOT`: a snapshot in the volume's replicas.
    Snap { volume: String, snapshot: String },
    /// `bak://VOLUME/BACKUP`: a backup (also a Longhorn `bs://` handle).
    Bak { volume: String, handle: String },
}

impl SnapshotHandle {
    /// Reads a snapshot id; `None` when it is neither form (such a snapshot
    /// cannot exist here).
    pub fn parse(id: &str) -> Option<SnapshotHandle> {
        let split = |rest: &str| -> Option<(String, String)> {
            let (v, s) = rest.split_once('/')?;
            (!v.is_empty() && !s.is_empty() && !s.contains('/'))
                .then(|| (v.to_string(), s.to_string()))
        };
        if let Some(rest) = id.strip_prefix("snap://") {
            let (volume, snapshot) = split(rest)?;
            return Some(SnapshotHandle::Snap { volume, snapshot });
        }
        let rest = id
            .strip_prefix("bak://")
            .or_else(|| id.strip_prefix("bs://"))?;
        let (volume, _) = split(rest)?;
        Some(SnapshotHandle::Bak {
            volume,
            handle: id.to_string(),
        })
    }

    /// The id of a Cairn snapshot.
    pub fn snap_id(volume: &str, snapshot: &str) -> String {
        format!("snap://{volume}/{snapshot}")
    }

    /// The volume the snapshot was taken of (for a backup: its backup
    /// volume, named after the source volume).
    pub fn volume(&self) -> &str {
        match self {
            SnapshotHandle::Snap { volume, .. } | SnapshotHandle::Bak { volume, .. } => volume,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names_stay_and_others_hash_stably() {
        let pvc = "pvc-3f2a8c1e-1b2c-4d5e-8f90-123456789abc";
        assert_eq!(volume_name(pvc).unwrap_or_default(), pvc);
        let long = format!("Data_{}", "x".repeat(120));
        let a = volume_name(&long).unwrap_or_default();
        assert_eq!(a, volume_name(&long).unwrap_or_default(), "not stable");
        assert!(validate_label("volume", &a, MAX_VOLUME_NAME).is_ok(), "{a}");
        assert!(a.starts_with("data-xxx"), "{a}");
        // Two names with one sanitized form stay apart.
        let (b, c) = (
            volume_name("My.Vol").unwrap_or_default(),
            volume_name("my_vol").unwrap_or_default(),
        );
        assert_ne!(b, c);
        assert!(
            b.starts_with("my-vol-") && c.starts_with("my-vol-"),
            "{b} {c}"
        );
        let odd = volume_name("___").unwrap_or_default();
        assert!(odd.starts_with("csi-") && odd.len() == 20, "{odd}");
        let snap = snapshot_name(&"S".repeat(128)).unwrap_or_default();
        assert!(snap.len() <= MAX_SNAPSHOT_NAME, "{snap}");
    }

    #[test]
    fn bad_names_name_the_field() {
        for bad in [String::new(), "x".repeat(129)] {
            let e = volume_name(&bad).expect_err("accepted");
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().starts_with("name is"), "{}", e.message());
        }
    }

    #[test]
    fn handles_parse() {
        assert_eq!(
            SnapshotHandle::parse("snap://db/s1"),
            Some(SnapshotHandle::Snap {
                volume: "db".into(),
                snapshot: "s1".into()
            })
        );
        assert_eq!(
            SnapshotHandle::parse("bak://db/backup-1").map(|h| h.volume().to_string()),
            Some("db".into())
        );
        for bad in [
            "",
            "snap://db",
            "snap:///s",
            "snap://db/",
            "snap://a/b/c",
            "x://a/b",
            "db/s1",
        ] {
            assert_eq!(SnapshotHandle::parse(bad), None, "{bad}");
        }
    }
}
