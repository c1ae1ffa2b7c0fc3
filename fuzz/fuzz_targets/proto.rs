//! Protocol frames from a hostile peer: the length header against both limits (the handshake's
//! and the session's), then every request and response message. A message that decodes
//! re-encodes to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;
use tardis_net::proto::{self, Request, Response, HEADER_LEN, MAX_FRAME, MAX_HANDSHAKE_FRAME};

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(frame: &[u8], limit: usize) {
    let Ok(msg) = proto::decode_frame::<T>(frame, limit) else { return };
    assert!(frame.len() - HEADER_LEN <= limit);
    let encoded = proto::encode(&msg);
    let again: T = proto::decode_frame(&encoded, MAX_FRAME).expect("a re-encoded message decodes");
    assert_eq!(again, msg);
    assert_eq!(proto::encode(&again), encoded);
}

fuzz_target!(|data: &[u8]| {
    if let Some(header) = data.get(..HEADER_LEN) {
        let header: [u8; HEADER_LEN] = header.try_into().expect("length checked");
        for limit in [MAX_HANDSHAKE_FRAME, MAX_FRAME] {
            if let Ok(len) = proto::body_len(header, limit) {
                assert!(len <= limit);
            }
        }
    }
    for limit in [MAX_HANDSHAKE_FRAME, MAX_FRAME] {
        round_trip::<Request>(data, limit);
        round_trip::<Response>(data, limit);
    }
    // A body on its own, as the stream reader hands it over after reading the header.
    if let Ok(msg) = proto::decode::<Request>(data) {
        let encoded = proto::encode(&msg);
        assert_eq!(proto::decode::<Request>(&encoded[HEADER_LEN..]).expect("re-encoded request"), msg);
    }
    if let Ok(msg) = proto::decode::<Response>(data) {
        let encoded = proto::encode(&msg);
        assert_eq!(proto::decode::<Response>(&encoded[HEADER_LEN..]).expect("re-encoded response"), msg);
    }
});
