//! Replica metadata: the `volume.meta` and per-layer `<file>.meta` JSON
//! documents, their parsers and serializers, and the layer file naming rules.
//!
//! The parsers take untrusted bytes (a disk may hold anything after a bug or
//! a bit flip) and are fuzzed: they must return an error, never panic. They
//! also check every file name a document mentions, so that a corrupt
//! `parent` such as `../../etc/passwd` can never make the replica open a
//! file outside its directory.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The only `volume.meta` format version this build reads and writes.
pub const FORMAT_VERSION: u64 = 1;

/// File name of the replica's root metadata; its `head` field is the commit
/// point of every chain change.
pub const VOLUME_META: &str = "volume.meta";

/// Suffix appended to a layer file name to name its metadata file.
pub const LAYER_META_SUFFIX: &str = ".meta";

const HEAD_PREFIX: &str = "volume-head-";
const SNAP_PREFIX: &str = "volume-snap-";
const IMG_SUFFIX: &str = ".img";

/// Why a metadata document was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// Not JSON, wrong types, or a required key is missing.
    #[error("bad JSON: {0}")]
    Json(String),
    /// A `format` this build does not understand.
    #[error("format version {found} is not supported (this build reads version {FORMAT_VERSION})")]
    UnsupportedFormat { found: u64 },
    /// Well-formed JSON whose values break a rule of the format.
    #[error("{0}")]
    Invalid(String),
}

/// Contents of `volume.meta`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub format: u64,
    pub volume: String,
    pub replica: String,
    pub size: u64,
    pub sector_size: u64,
    /// File name of the writable head layer.
    pub head: String,
    pub revision: u64,
    /// The owner session generation (fencing; see `replica::fence`).
    /// Absent in replicas written before fencing existed: 0.
    #[serde(default)]
    pub owner_generation: u64,
    /// The ownership (volume owner node and term) of the last takeover
    /// claim (see `replica::fence::OwnerTerm`). Absent before volumes
    /// could move: 0 and "".
    #[serde(default)]
    pub owner_term: u64,
    #[serde(default)]
    pub owner_node: String,
}

/// Contents of a layer's `<file>.meta`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMeta {
    /// The layer's file name (Longhorn's convention): a meta file copied next
    /// to the wrong image is detected by comparing this with its own name.
    pub name: String,
    /// File name of the next older layer, or empty for the base layer.
    pub parent: String,
    /// Creation time: RFC 3339 or unix seconds, kept as written.
    pub created: String,
    pub user_created: bool,
    pub removed: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// What a layer file name says about the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerName<'a> {
    /// `volume-head-NNN.img`: the writable head, generation NNN.
    Head(u64),
    /// `volume-snap-<name>.img`: a snapshot called `<name>`.
    Snapshot(&'a str),
}

/// Parses a layer file name; `None` if it is not one (this includes anything
/// with a path separator or a name that is not a DNS-1123 label).
pub fn parse_layer_file_name(file: &str) -> Option<LayerName<'_>> {
    if let Some(num) = file
        .strip_prefix(HEAD_PREFIX)
        .and_then(|s| s.strip_suffix(IMG_SUFFIX))
    {
        if num.is_empty() || num.len() > 19 || !num.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        return num.parse().ok().map(LayerName::Head);
    }
    let name = file.strip_prefix(SNAP_PREFIX)?.strip_suffix(IMG_SUFFIX)?;
    crate::name::validate_label("snapshot", name, 63).ok()?;
    Some(LayerName::Snapshot(name))
}

/// File name of head generation `n`.
pub fn head_file_name(n: u64) -> String {
    format!("{HEAD_PREFIX}{n:03}{IMG_SUFFIX}")
}

/// File name of snapshot `name` (assumed already validated).
pub fn snapshot_file_name(name: &str) -> String {
    format!("{SNAP_PREFIX}{name}{IMG_SUFFIX}")
}

/// File name of the metadata of layer file `file`.
pub fn layer_meta_file_name(file: &str) -> String {
    format!("{file}{LAYER_META_SUFFIX}")
}

/// Parses and validates `volume.meta`.
pub fn parse_volume_meta(bytes: &[u8]) -> Result<VolumeMeta, MetaError> {
    // Read the version first, so a future format with different keys is
    // reported as "unsupported version", not as a confusing missing key.
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(json_err)?;
    let found = match value.get("format") {
        None => return Err(MetaError::Json("missing field `format`".into())),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| MetaError::Json("`format` is not a non-negative integer".into()))?,
    };
    if found != FORMAT_VERSION {
        return Err(MetaError::UnsupportedFormat { found });
    }
    let m: VolumeMeta = serde_json::from_value(value).map_err(json_err)?;
    validate_volume_meta(&m)?;
    Ok(m)
}

/// Checks the rules `volume.meta` must follow beyond its JSON shape.
pub fn validate_volume_meta(m: &VolumeMeta) -> Result<(), MetaError> {
    if m.format != FORMAT_VERSION {
        return Err(MetaError::UnsupportedFormat { found: m.format });
    }
    if m.size == 0 || m.size % super::BLOCK_SIZE != 0 {
        return Err(MetaError::Invalid(format!(
            "size {} is not a nonzero multiple of {}",
            m.size,
            super::BLOCK_SIZE
        )));
    }
    if !matches!(m.sector_size, 512 | 1024 | 2048 | 4096) {
        return Err(MetaError::Invalid(format!(
            "sector_size {} is not 512, 1024, 2048 or 4096",
            m.sector_size
        )));
    }
    if !matches!(parse_layer_file_name(&m.head), Some(LayerName::Head(_))) {
        return Err(MetaError::Invalid(format!(
            "head {:?} is not a head file name (volume-head-NNN.img)",
            m.head
        )));
    }
    Ok(())
}

/// Parses and validates a layer `.meta` document.
pub fn parse_layer_meta(bytes: &[u8]) -> Result<LayerMeta, MetaError> {
    let m: LayerMeta = serde_json::from_slice(bytes).map_err(json_err)?;
    if parse_layer_file_name(&m.name).is_none() {
        return Err(MetaError::Invalid(format!(
            "name {:?} is not a layer file name",
            m.name
        )));
    }
    // Only snapshots can be parents: the head is the one writable layer.
    if !m.parent.is_empty()
        && !matches!(
            parse_layer_file_name(&m.parent),
            Some(LayerName::Snapshot(_))
        )
    {
        return Err(MetaError::Invalid(format!(
            "parent {:?} is not a snapshot file name (volume-snap-<name>.img)",
            m.parent
        )));
    }
    if m.parent == m.name {
        return Err(MetaError::Invalid(format!(
            "layer {:?} names itself as parent",
            m.name
        )));
    }
    Ok(m)
}

/// Serializes `volume.meta` (pretty, newline-terminated, for humans).
pub fn serialize_volume_meta(m: &VolumeMeta) -> std::io::Result<Vec<u8>> {
    to_json(m)
}

/// Serializes a layer `.meta`.
pub fn serialize_layer_meta(m: &LayerMeta) -> std::io::Result<Vec<u8>> {
    to_json(m)
}

fn to_json<T: Serialize>(v: &T) -> std::io::Result<Vec<u8>> {
    // Cannot fail for these structs (string map keys only), but an error is
    // reported rather than writing an empty document.
    let mut out = serde_json::to_vec_pretty(v).map_err(std::io::Error::other)?;
    out.push(b'\n');
    Ok(out)
}

fn json_err(e: serde_json::Error) -> MetaError {
    MetaError::Json(e.to_string())
}

/// Current time as unix seconds, the `created` form this build writes.
pub fn now_created() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests fail loudly by design.
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vol() -> VolumeMeta {
        VolumeMeta {
            format: 1,
            volume: "v".into(),
            replica: "v-r1".into(),
            size: 1 << 20,
            sector_size: 4096,
            head: "volume-head-000.img".into(),
            revision: 7,
            owner_generation: 3,
            owner_term: 2,
            owner_node: "n1".into(),
        }
    }

    fn layer() -> LayerMeta {
        LayerMeta {
            name: "volume-head-001.img".into(),
            parent: "volume-snap-a.img".into(),
            created: "1700000000".into(),
            user_created: false,
            removed: false,
            labels: BTreeMap::from([("k".into(), "v".into())]),
        }
    }

    #[test]
    fn roundtrip() {
        assert_eq!(
            parse_volume_meta(&serialize_volume_meta(&vol()).unwrap()),
            Ok(vol())
        );
        assert_eq!(
            parse_layer_meta(&serialize_layer_meta(&layer()).unwrap()),
            Ok(layer())
        );
    }

    #[test]
    fn extra_keys_ignored_missing_keys_rejected() {
        let j = br#"{"format":1,"volume":"v","replica":"r","size":4096,"sector_size":4096,
            "head":"volume-head-000.img","revision":0,"future":{"x":1}}"#;
        assert!(parse_volume_meta(j).is_ok());
        let j = br#"{"format":1,"volume":"v","replica":"r","size":4096,"sector_size":4096,
            "head":"volume-head-000.img"}"#;
        match parse_volume_meta(j) {
            Err(MetaError::Json(m)) => assert!(m.contains("revision"), "{m}"),
            other => panic!("{other:?}"),
        }
        let j =
            br#"{"name":"volume-snap-a.img","created":"0","user_created":true,"removed":false}"#;
        match parse_layer_meta(j) {
            Err(MetaError::Json(m)) => assert!(m.contains("parent"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_format_version() {
        let j = br#"{"format":2,"whatever":true}"#;
        assert_eq!(
            parse_volume_meta(j),
            Err(MetaError::UnsupportedFormat { found: 2 })
        );
    }

    #[test]
    fn rejects_bad_values() {
        let mut m = vol();
        m.size = 4097;
        assert!(matches!(
            parse_volume_meta(&serialize_volume_meta(&m).unwrap()),
            Err(MetaError::Invalid(_))
        ));
        let mut m = vol();
        m.head = "../etc/passwd".into();
        assert!(matches!(
            parse_volume_meta(&serialize_volume_meta(&m).unwrap()),
            Err(MetaError::Invalid(_))
        ));
        let mut l = layer();
        l.parent = "../../x/volume-snap-a.img".into();
        assert!(matches!(
            parse_layer_meta(&serialize_layer_meta(&l).unwrap()),
            Err(MetaError::Invalid(_))
        ));
        let mut l = layer();
        l.parent = "volume-head-000.img".into();
        assert!(matches!(
            parse_layer_meta(&serialize_layer_meta(&l).unwrap()),
            Err(MetaError::Invalid(_))
        ));
    }

    #[test]
    fn layer_file_names() {
        assert_eq!(
            parse_layer_file_name("volume-head-000.img"),
            Some(LayerName::Head(0))
        );
        assert_eq!(
            parse_layer_file_name("volume-head-1234.img"),
            Some(LayerName::Head(1234))
        );
        assert_eq!(
            parse_layer_file_name("volume-snap-a-1.img"),
            Some(LayerName::Snapshot("a-1"))
        );
        for bad in [
            "volume-head-.img",
            "volume-head-x.img",
            "volume-head-99999999999999999999.img",
            "volume-snap-.img",
            "volume-snap-A.img",
            "volume-snap-a/b.img",
            "volume-snap-a.img.meta",
            "volume.meta",
        ] {
            assert_eq!(parse_layer_file_name(bad), None, "{bad}");
        }
        assert_eq!(head_file_name(1), "volume-head-001.img");
    }

    /// Applies one random edit to `bytes`: flip, insert, delete or truncate.
    fn mutate(bytes: &mut Vec<u8>, op: u8, pos: usize, val: u8) {
        if bytes.is_empty() {
            bytes.push(val);
            return;
        }
        let p = pos % bytes.len();
        match op % 4 {
            0 => bytes[p] ^= val | 1,
            1 => bytes.insert(p, val),
            2 => {
                bytes.remove(p);
            }
            _ => bytes.truncate(p),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn parsers_never_panic_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_volume_meta(&bytes);
            let _ = parse_layer_meta(&bytes);
            if let Ok(s) = std::str::from_utf8(&bytes) {
                let _ = parse_layer_file_name(s);
            }
        }

        #[test]
        fn parsers_never_panic_on_mutated_meta(
            edits in proptest::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..8),
        ) {
            for seed in [serialize_volume_meta(&vol()).unwrap(), serialize_layer_meta(&layer()).unwrap()] {
                let mut b = seed;
                for &(op, pos, val) in &edits {
                    mutate(&mut b, op, pos, val);
                }
                // Whatever a parser accepts must still satisfy the format rules
                // and survive a serialize/parse roundtrip.
                if let Ok(m) = parse_volume_meta(&b) {
                    prop_assert!(validate_volume_meta(&m).is_ok());
                    prop_assert_eq!(parse_volume_meta(&serialize_volume_meta(&m).unwrap()), Ok(m));
                }
                if let Ok(m) = parse_layer_meta(&b) {
                    prop_assert_eq!(parse_layer_meta(&serialize_layer_meta(&m).unwrap()), Ok(m));
                }
            }
        }
    }
}
