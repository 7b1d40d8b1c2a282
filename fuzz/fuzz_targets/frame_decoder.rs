//! Arbitrary bytes into the frame decoder, as both message directions, whole and as a stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pkgmesh_protocol::wire::{decode_frame, encode, Request, Response, MAX_FRAME_BYTES};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((request, used))) = decode_frame::<Request>(data) {
        assert!(used <= data.len() && used <= MAX_FRAME_BYTES + 4);
        // Whatever decodes must encode and decode back to itself. (Not to the same bytes:
        // bincode's varints accept non-minimal encodings, which are harmless.)
        let again = encode(&request).expect("a decoded request encodes");
        let (back, _) = decode_frame::<Request>(&again).expect("re-decodes").expect("whole");
        assert_eq!(back, request);
    }
    if let Ok(Some((response, used))) = decode_frame::<Response>(data) {
        assert!(used <= data.len());
        let again = encode(&response).expect("a decoded response encodes");
        let (back, _) = decode_frame::<Response>(&again).expect("re-decodes").expect("whole");
        assert_eq!(back, response);
    }
});
