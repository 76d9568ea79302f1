//! Fuzz target: the streaming frame decoder and the payload decoder, on arbitrary bytes.
//!
//! The first input byte chooses how the rest is split into `feed` calls (1 to 256 bytes at a
//! time) and the second a payload limit, so partial headers, partial payloads and small limits
//! are all exercised. Properties beyond "no panic": a decoded frame's payload has exactly the
//! announced length within the limit, and a payload that decodes re-encodes to the same bytes.
//! This target does not open sockets or files.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_net::{Decoder, Message, FRAME_PAYLOAD_BYTES_MAX, HEADER_BYTES};

fuzz_target!(|data: &[u8]| {
    let [chunk, limit, rest @ ..] = data else {
        return;
    };
    let chunk = usize::from(*chunk) + 1;
    let limit = match limit {
        0 => FRAME_PAYLOAD_BYTES_MAX,
        n => u32::from(*n) * 16,
    };
    let mut decoder = Decoder::new(limit);
    let mut again = Vec::new();
    'stream: for piece in rest.chunks(chunk) {
        decoder.feed(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    assert_eq!(frame.payload.len(), frame.header.length as usize);
                    assert!(frame.header.length <= limit);
                    if let Ok(message) = Message::decode(&frame) {
                        again.clear();
                        message
                            .encode(frame.header.request_id, &mut again)
                            .expect("a decoded message encodes");
                        assert_eq!(&again[HEADER_BYTES..], frame.payload);
                        assert_eq!(message.kind(), frame.header.kind);
                    }
                }
                Ok(None) => break,
                Err(_) => break 'stream,
            }
        }
    }
    let _ = decoder.finish();
});
