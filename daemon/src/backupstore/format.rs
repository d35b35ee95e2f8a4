//! Longhorn's backupstore format: where things live in the store, the two
//! JSON configs, block checksums, block compression and backup handles.
//!
//! As read from Longhorn's backupstore (`config.go`, `backupstore.go`,
//! `deltablock.go`, `util/util.go`); see `docs/design/0004-backupstore-format.md`.
//!
//! ```text
//! <prefix>/backupstore/volumes/H[0:2]/H[2:4]/<volume>/volume.cfg
//!                                                   backups/backup_<name>.cfg
//!                                                   blocks/C[0:2]/C[2:4]/C.blk
//!                                                   locks/lock-<id>.lck
//! H = checksum(volume name), C = checksum(uncompressed block)
//! checksum(x) = hex(SHA-512(x))[..64]
//! ```
//!
//! Go's `json:",string"` tag shapes some fields: integers are written as
//! JSON strings (`"Size":"1073741824"`) and, on `string` fields of
//! `volume.cfg`, the value is JSON-encoded twice (`"CompressionMethod":
//! "\"lz4\""`). Cairn writes exactly that and reads both shapes. Fields it
//! does not know are kept when it rewrites a config.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha512};

/// Longhorn's block size; 16 MiB may be chosen for new backup volumes.
pub const DEFAULT_BLOCK_SIZE: u64 = 2 << 20;
pub const LARGE_BLOCK_SIZE: u64 = 16 << 20;
const BASE: &str = "backupstore";

/// `hex(SHA-512(data))[..64]`: block names and the volume path hash.
pub fn checksum(data: &[u8]) -> String {
    let digest = Sha512::digest(data);
    let mut s = String::with_capacity(128);
    for b in digest.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s.truncate(64);
    s
}

/// Object paths (relative to the target's prefix) of one backup volume.
#[derive(Debug, Clone)]
pub struct VolumePaths {
    dir: String,
}

impl VolumePaths {
    pub fn new(volume: &str) -> VolumePaths {
        let h = checksum(volume.as_bytes());
        VolumePaths {
            dir: format!("{BASE}/volumes/{}/{}/{volume}", &h[0..2], &h[2..4]),
        }
    }
    pub fn volumes_root() -> String {
        format!("{BASE}/volumes")
    }
    pub fn dir(&self) -> &str {
        &self.dir
    }
    pub fn volume_cfg(&self) -> String {
        format!("{}/volume.cfg", self.dir)
    }
    pub fn backups_dir(&self) -> String {
        format!("{}/backups", self.dir)
    }
    pub fn backup_cfg(&self, backup: &str) -> String {
        format!("{}/backups/backup_{backup}.cfg", self.dir)
    }
    pub fn blocks_dir(&self) -> String {
        format!("{}/blocks", self.dir)
    }
    pub fn block(&self, checksum: &str) -> String {
        let (a, b) = (
            checksum.get(0..2).unwrap_or("00"),
            checksum.get(2..4).unwrap_or("00"),
        );
        format!("{}/blocks/{a}/{b}/{checksum}.blk", self.dir)
    }
    pub fn locks_dir(&self) -> String {
        format!("{}/locks", self.dir)
    }
    pub fn lock(&self, name: &str) -> String {
        format!("{}/locks/{name}.lck", self.dir)
    }
}

/// The backup name in `backup_<name>.cfg`.
pub fn backup_name_of(file: &str) -> Option<&str> {
    file.strip_prefix("backup_")?.strip_suffix(".cfg")
}

/// Block compression. Longhorn names them `none`, `gzip`, `lz4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    None,
    Gzip,
    #[default]
    Lz4,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Lz4 => "lz4",
        }
    }

    /// Longhorn treats an empty method (old backups) as gzip.
    pub fn from_config(s: &str) -> Option<Compression> {
        match s {
            "none" => Some(Compression::None),
            "gzip" | "" => Some(Compression::Gzip),
            "lz4" => Some(Compression::Lz4),
            _ => None,
        }
    }

    pub fn compress(self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        match self {
            Compression::None => Ok(data.to_vec()),
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(
                    Vec::with_capacity(data.len() / 2),
                    flate2::Compression::fast(),
                );
                e.write_all(data)?;
                e.finish()
            }
            Compression::Lz4 => {
                let mut e = lz4_flex::frame::FrameEncoder::new(Vec::with_capacity(data.len() / 2));
                e.write_all(data)?;
                e.finish().map_err(std::io::Error::other)
            }
        }
    }

    /// Decompresses at most `limit` bytes (a block), refusing more.
    pub fn decompress(self, data: &[u8], limit: u64) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let n = match self {
            Compression::None => return Ok(data.to_vec()),
            Compression::Gzip => flate2::read::GzDecoder::new(data)
                .take(limit + 1)
                .read_to_end(&mut out)?,
            Compression::Lz4 => lz4_flex::frame::FrameDecoder::new(data)
                .take(limit + 1)
                .read_to_end(&mut out)?,
        };
        if n as u64 > limit {
            return Err(std::io::Error::other(format!(
                "decompresses to more than {limit} bytes"
            )));
        }
        Ok(out)
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Compression::None),
            "gzip" => Ok(Compression::Gzip),
            "lz4" => Ok(Compression::Lz4),
            _ => Err(format!("compression {s:?}: use lz4, gzip or none")),
        }
    }
}

/// Integers Go writes with `json:",string"`; read as string or number.
mod go_int {
    use super::*;
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum N {
            S(String),
            N(u64),
            I(i64),
        }
        match Option::<N>::deserialize(d)? {
            None => Ok(0),
            Some(N::N(n)) => Ok(n),
            Some(N::I(n)) => u64::try_from(n).map_err(serde::de::Error::custom),
            Some(N::S(s)) if s.is_empty() => Ok(0),
            Some(N::S(s)) => s.parse::<u64>().map_err(serde::de::Error::custom),
        }
    }
}

/// Strings Go writes with `json:",string"`: JSON-encoded inside the JSON
/// string. Reads both the double-encoded and the plain form.
mod go_quoted {
    use super::*;
    pub fn serialize<S: Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
        let inner = serde_json::to_string(v).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&inner)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        let raw = Option::<String>::deserialize(d)?.unwrap_or_default();
        if raw.starts_with('"') {
            if let Ok(inner) = serde_json::from_str::<String>(&raw) {
                return Ok(inner);
            }
        }
        Ok(raw)
    }
}

/// A `map[string]string` Go may write as `null`.
mod go_map {
    use super::*;
    pub fn serialize<S: Serializer>(v: &BTreeMap<String, String>, s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, String>, D::Error> {
        Ok(Option::<BTreeMap<String, String>>::deserialize(d)?.unwrap_or_default())
    }
}

/// `volume.cfg`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct VolumeCfg {
    #[serde(default)]
    pub name: String,
    #[serde(default, with = "go_int")]
    pub size: u64,
    #[serde(default, with = "go_map")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub created_time: String,
    #[serde(default)]
    pub last_backup_name: String,
    #[serde(default)]
    pub last_backup_at: String,
    #[serde(default, with = "go_int")]
    pub block_count: u64,
    #[serde(default, with = "go_quoted")]
    pub backing_image_name: String,
    #[serde(default, with = "go_quoted")]
    pub backing_image_checksum: String,
    #[serde(default, with = "go_quoted")]
    pub compression_method: String,
    #[serde(default, with = "go_quoted")]
    pub storage_class_name: String,
    #[serde(default, with = "go_quoted")]
    pub data_engine: String,
    /// Everything else Longhorn (or a later version) wrote, kept as is.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Where Longhorn records a backup's block size: `Parameters` of the
/// backup config, a Kubernetes quantity (`2Mi`, `16Mi`, or bytes).
pub const BLOCK_SIZE_PARAMETER: &str = "backup-block-size";

/// `2Mi` / `16Mi` / `2097152` → bytes; absent, empty or 0 → 2 MiB.
pub fn parse_block_size(v: Option<&str>) -> Result<u64, String> {
    let v = v.unwrap_or("").trim();
    if v.is_empty() {
        return Ok(DEFAULT_BLOCK_SIZE);
    }
    let (num, mul) = match v {
        _ if v.ends_with("Ki") => (&v[..v.len() - 2], 1u64 << 10),
        _ if v.ends_with("Mi") => (&v[..v.len() - 2], 1 << 20),
        _ if v.ends_with("Gi") => (&v[..v.len() - 2], 1 << 30),
        _ => (v, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("block size {v:?} is not a quantity like 2Mi"))?;
    match n.checked_mul(mul) {
        Some(0) => Ok(DEFAULT_BLOCK_SIZE),
        Some(b) if b % 4096 == 0 && b <= 64 << 20 => Ok(b),
        _ => Err(format!(
            "block size {v:?} must be a multiple of 4096 bytes up to 64Mi"
        )),
    }
}

/// `2Mi` for 2 MiB: how Cairn writes the parameter.
pub fn block_size_quantity(b: u64) -> String {
    if b % (1 << 20) == 0 {
        format!("{}Mi", b >> 20)
    } else {
        b.to_string()
    }
}

impl BackupCfg {
    /// The backup's block size (see [`BLOCK_SIZE_PARAMETER`]).
    pub fn block_size(&self) -> Result<u64, String> {
        parse_block_size(
            self.parameters
                .get(BLOCK_SIZE_PARAMETER)
                .map(String::as_str),
        )
    }
}

/// One entry of a backup's block map.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct BlockMapping {
    pub offset: u64,
    pub block_checksum: String,
}

/// `backups/backup_<name>.cfg`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct BackupCfg {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub volume_name: String,
    #[serde(default)]
    pub snapshot_name: String,
    #[serde(default)]
    pub snapshot_created_at: String,
    /// Empty while the backup is in progress.
    #[serde(default)]
    pub created_time: String,
    /// Bytes of data in the map (blocks × block size), as Longhorn counts.
    #[serde(default, with = "go_int")]
    pub size: u64,
    #[serde(default, with = "go_map")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, with = "go_map")]
    pub parameters: BTreeMap<String, String>,
    #[serde(default)]
    pub is_incremental: bool,
    #[serde(default)]
    pub compression_method: String,
    #[serde(default, with = "go_int")]
    pub newly_uploaded_data_size: u64,
    #[serde(default, with = "go_int")]
    pub re_uploaded_data_size: u64,
    /// The complete block map, sorted by offset.
    #[serde(default, deserialize_with = "null_vec")]
    pub blocks: Vec<BlockMapping>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn null_vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<BlockMapping>, D::Error> {
    Ok(Option::<Vec<BlockMapping>>::deserialize(d)?.unwrap_or_default())
}

impl BackupCfg {
    pub fn in_progress(&self) -> bool {
        self.created_time.is_empty()
    }
}

/// Why a config or handle could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct FormatError {
    pub what: String,
    pub reason: String,
}

pub fn parse_volume_cfg(what: &str, bytes: &[u8]) -> Result<VolumeCfg, FormatError> {
    serde_json::from_slice(bytes).map_err(|e| FormatError {
        what: what.into(),
        reason: format!("not a valid volume.cfg: {e}"),
    })
}

pub fn parse_backup_cfg(what: &str, bytes: &[u8]) -> Result<BackupCfg, FormatError> {
    let cfg: BackupCfg = serde_json::from_slice(bytes).map_err(|e| FormatError {
        what: what.into(),
        reason: format!("not a valid backup config: {e}"),
    })?;
    for b in &cfg.blocks {
        if b.block_checksum.len() != 64 || !b.block_checksum.bytes().all(|c| c.is_ascii_hexdigit())
        {
            return Err(FormatError {
                what: what.into(),
                reason: format!(
                    "block at offset {} has a bad checksum {:?}",
                    b.offset, b.block_checksum
                ),
            });
        }
    }
    Ok(cfg)
}

/// `bak://VOLUME/BACKUP`, or `bak://VOLUME` (a backup volume, for DR);
/// Longhorn's older `bs://` is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupHandle {
    pub volume: String,
    pub backup: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("backup handle {handle:?}: {reason}")]
pub struct HandleError {
    pub handle: String,
    pub reason: String,
}

impl BackupHandle {
    pub fn parse(s: &str) -> Result<BackupHandle, HandleError> {
        let err = |reason: &str| HandleError {
            handle: s.to_string(),
            reason: reason.to_string(),
        };
        let rest = s
            .strip_prefix("bak://")
            .or_else(|| s.strip_prefix("bs://"))
            .ok_or_else(|| err("use bak://VOLUME/BACKUP (or Longhorn's bs://VOLUME/BACKUP)"))?;
        let mut parts = rest.split('/');
        let volume = parts.next().unwrap_or_default();
        let backup = parts.next().filter(|b| !b.is_empty());
        if parts.next().is_some() {
            return Err(err("too many '/': use bak://VOLUME/BACKUP"));
        }
        let valid = |n: &str| {
            !n.is_empty()
                && n.len() <= 253
                && n.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
        };
        if !valid(volume) {
            return Err(err("the volume name is empty or has characters other than letters, digits, '-', '_', '.'"));
        }
        if let Some(b) = backup {
            if !valid(b) {
                return Err(err(
                    "the backup name has characters other than letters, digits, '-', '_', '.'",
                ));
            }
        }
        Ok(BackupHandle {
            volume: volume.to_string(),
            backup: backup.map(str::to_string),
        })
    }
}

impl fmt::Display for BackupHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backup {
            Some(b) => write!(f, "bak://{}/{b}", self.volume),
            None => write!(f, "bak://{}", self.volume),
        }
    }
}

/// Time stamps in configs: RFC 3339 in UTC, as Longhorn writes them, with
/// milliseconds so that backups taken within one second still order.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn checksum_and_paths_match_an_independent_sha512() {
        // python3 -c 'import hashlib;print(hashlib.sha512(b"pvc-1").hexdigest()[:64])'
        let h = checksum(b"pvc-1");
        assert_eq!(h.len(), 64);
        assert_eq!(
            h,
            "7eedf508c892db38891f451d3233c21df0a2e921344c75bdd7b7b71471d5903a"
        );
        let p = VolumePaths::new("pvc-1");
        assert_eq!(
            p.volume_cfg(),
            format!(
                "backupstore/volumes/{}/{}/pvc-1/volume.cfg",
                &h[0..2],
                &h[2..4]
            )
        );
        let c = checksum(&[0u8; 16]);
        assert_eq!(
            p.block(&c),
            format!(
                "backupstore/volumes/{}/{}/pvc-1/blocks/{}/{}/{c}.blk",
                &h[0..2],
                &h[2..4],
                &c[0..2],
                &c[2..4]
            )
        );
        assert_eq!(backup_name_of("backup_backup-1a.cfg"), Some("backup-1a"));
        assert_eq!(backup_name_of("other.cfg"), None);
    }

    #[test]
    fn reads_longhorn_configs_and_writes_go_shapes() {
        let lh = r#"{"Name":"pvc-1","Size":"2147483648","Labels":null,"CreatedTime":"2024-01-01T00:00:00Z",
            "LastBackupName":"backup-a","LastBackupAt":"2024-01-02T00:00:00Z","DataStored":"4194304","Messages":{},
            "BlockCount":"2","BackingImageName":"\"\"","BackingImageChecksum":"\"\"","CompressionMethod":"\"lz4\"",
            "StorageClassName":"\"longhorn\"","DataEngine":"\"v1\""}"#;
        let v = parse_volume_cfg("t", lh.as_bytes()).unwrap();
        assert_eq!(
            (
                v.size,
                v.block_count,
                v.compression_method.as_str(),
                v.storage_class_name.as_str()
            ),
            (2147483648, 2, "lz4", "longhorn")
        );
        assert_eq!(
            v.extra.get("DataStored"),
            Some(&serde_json::json!("4194304")),
            "unknown fields are kept"
        );
        let out = serde_json::to_string(&v).unwrap();
        assert!(out.contains(r#""Size":"2147483648""#), "{out}");
        assert!(out.contains(r#""CompressionMethod":"\"lz4\"""#), "{out}");
        assert!(out.contains(r#""DataStored":"4194304""#), "{out}");
        // The plain form (some writers) reads too.
        let plain = parse_volume_cfg(
            "t",
            br#"{"Name":"v","Size":4096,"CompressionMethod":"gzip"}"#,
        )
        .unwrap();
        assert_eq!(
            (plain.size, plain.compression_method.as_str()),
            (4096, "gzip")
        );

        let b = r#"{"Name":"backup-a","VolumeName":"pvc-1","SnapshotName":"s1","SnapshotCreatedAt":"t1","CreatedTime":"t2",
            "Size":"4194304","Labels":{"k":"v"},"IsIncremental":true,"CompressionMethod":"lz4",
            "Blocks":[{"Offset":0,"BlockChecksum":"0000000000000000000000000000000000000000000000000000000000000000"}],
            "ProcessingBlocks":{},"SingleFile":{"FilePath":"","BlockChecksum":""}}"#;
        let c = parse_backup_cfg("t", b.as_bytes()).unwrap();
        assert_eq!(
            (c.size, c.blocks.len(), c.labels["k"].as_str()),
            (4194304, 1, "v")
        );
        assert!(!c.in_progress());
        assert!(parse_backup_cfg(
            "t",
            br#"{"Blocks":[{"Offset":0,"BlockChecksum":"../../x"}]}"#
        )
        .is_err());
        let inprog = parse_backup_cfg("t", br#"{"Name":"b","VolumeName":"v","CompressionMethod":"lz4","CreatedTime":"","Blocks":null}"#).unwrap();
        assert!(inprog.in_progress());
    }

    #[test]
    fn compression_round_trips_and_refuses_bombs() {
        let data: Vec<u8> = (0..DEFAULT_BLOCK_SIZE as usize)
            .map(|i| (i % 251) as u8)
            .collect();
        for c in [Compression::None, Compression::Gzip, Compression::Lz4] {
            let z = c.compress(&data).unwrap();
            assert_eq!(c.decompress(&z, DEFAULT_BLOCK_SIZE).unwrap(), data, "{c:?}");
            if c != Compression::None {
                assert!(
                    c.decompress(&z, 1000).is_err(),
                    "{c:?} must refuse more than the limit"
                );
                assert!(c.decompress(b"garbage", DEFAULT_BLOCK_SIZE).is_err());
            }
        }
        assert_eq!(Compression::from_config(""), Some(Compression::Gzip));
        assert!("zstd".parse::<Compression>().is_err());
    }

    #[test]
    fn block_size_parameter() {
        assert_eq!(parse_block_size(None), Ok(DEFAULT_BLOCK_SIZE));
        assert_eq!(parse_block_size(Some("16Mi")), Ok(16 << 20));
        assert_eq!(parse_block_size(Some("2097152")), Ok(2 << 20));
        assert_eq!(parse_block_size(Some("0")), Ok(DEFAULT_BLOCK_SIZE));
        assert!(parse_block_size(Some("3000")).is_err());
        assert!(parse_block_size(Some("lots")).is_err());
        assert_eq!(block_size_quantity(2 << 20), "2Mi");
    }

    #[test]
    fn handles() {
        let h = BackupHandle::parse("bak://pvc-1/backup-a").unwrap();
        assert_eq!(
            (h.volume.as_str(), h.backup.as_deref()),
            ("pvc-1", Some("backup-a"))
        );
        assert_eq!(BackupHandle::parse("bs://pvc-1/backup-a").unwrap(), h);
        assert_eq!(BackupHandle::parse("bak://pvc-1").unwrap().backup, None);
        assert_eq!(h.to_string(), "bak://pvc-1/backup-a");
        for (bad, want) in [
            ("s3://x/y", "use bak://"),
            ("bak://", "volume name is empty"),
            ("bak://a/b/c", "too many"),
            ("bak://a b/c", "volume name"),
            ("bak://a/../x", "too many"),
            ("bak://a/b c", "backup name"),
        ] {
            let e = BackupHandle::parse(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = parse_volume_cfg("x", &bytes);
            let _ = parse_backup_cfg("x", &bytes);
            let _ = BackupHandle::parse(&String::from_utf8_lossy(&bytes));
            let _ = Compression::Lz4.decompress(&bytes, 1 << 16);
            let _ = Compression::Gzip.decompress(&bytes, 1 << 16);
        }
    }
}
