//! Event payloads as they come out of a segment record: any kind, any version, any bytes.
//! A payload that decodes re-encodes (at the version this build writes) to the same event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tardis_core::event::{payload_version, Event};

fuzz_target!(|data: &[u8]| {
    let [kind, version, payload @ ..] = data else { return };
    let Ok(event) = Event::decode(*kind, *version, payload) else { return };
    assert_eq!(event.kind(), *kind);
    let encoded = event.encode();
    let again = Event::decode(*kind, payload_version(*kind), &encoded).expect("a re-encoded event decodes");
    assert_eq!(again, event);
    assert_eq!(again.encode(), encoded);
});
