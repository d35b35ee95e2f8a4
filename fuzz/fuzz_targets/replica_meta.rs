//! Fuzzes the replica metadata parsers with arbitrary bytes: they must
//! return errors, never panic, and whatever they accept must survive a
//! serialize/parse roundtrip unchanged.
#![no_main]

use cairn::replica::meta;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = meta::parse_volume_meta(data) {
        let bytes = meta::serialize_volume_meta(&m).expect("serialize volume.meta");
        assert_eq!(meta::parse_volume_meta(&bytes), Ok(m));
    }
    if let Ok(m) = meta::parse_layer_meta(data) {
        let bytes = meta::serialize_layer_meta(&m).expect("serialize layer meta");
        assert_eq!(meta::parse_layer_meta(&bytes), Ok(m));
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = meta::parse_layer_file_name(s);
    }
});
