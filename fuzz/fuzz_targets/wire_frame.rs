//! Fuzzes the replica wire decoder with arbitrary bytes (as a hostile or
//! broken peer would send them): it must return errors, never panic or
//! allocate what a length field claims, and whatever it accepts must survive
//! an encode/decode roundtrip unchanged.
#![no_main]

use cairn::transport::wire::{decode_frame, encode_frame, Decoded, FrameReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Every frame in the input, back to back, as a stream decoder would.
    let mut at = 0;
    while let Ok(Decoded::Frame { header, payload, consumed }) = decode_frame(&data[at..]) {
        let mut again = Vec::new();
        encode_frame(&mut again, &header, payload).expect("re-encode an accepted frame");
        match decode_frame(&again) {
            Ok(Decoded::Frame { header: h2, payload: p2, .. }) => {
                assert_eq!(h2, header);
                assert_eq!(p2, payload);
            }
            other => panic!("re-encoded frame does not decode: {other:?}"),
        }
        at += consumed;
    }
    // The buffered reader over the same bytes.
    let mut reader = FrameReader::new(data);
    while let Ok(Some(_)) = reader.next_frame() {}
});
