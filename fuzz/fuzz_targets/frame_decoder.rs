//! Arbitrary bytes into the frame decoder, as both message directions, whole and as a stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pkgmesh_protocol::wire::{decode_frame, encode, Request, Response, MAX_FRAME_BYTES};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((request, used))) = decode_frame::<Request>(data) {
        assert!(used <= data.len() && used <= MAX_FRAME_BYTES + 4);
        // Whatever decodes must encode back to the same bytes: no two encodings of one message.
        let again = encode(&request).expect("a decoded request encodes");
        assert_eq!(&again[..], &data[..used]);
    }
    if let Ok(Some((response, used))) = decode_frame::<Response>(data) {
        assert!(used <= data.len());
        let again = encode(&response).expect("a decoded response encodes");
        assert_eq!(&again[..], &data[..used]);
    }
});
