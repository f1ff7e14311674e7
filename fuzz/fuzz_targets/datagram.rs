//! Media datagram header decoding. Must never panic; whatever decodes must
//! re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trunk::proto::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok((id, packet)) = wire::decode_datagram(data) {
        let mut out = Vec::new();
        wire::encode_datagram(id, packet, &mut out);
        // postcard varints are canonical only if minimal; non-minimal input
        // decodes too, so compare by decoding again rather than bytes.
        assert_eq!(wire::decode_datagram(&out).ok(), Some((id, packet)));
    }
});
