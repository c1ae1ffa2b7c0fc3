//! Rows of a damaged index: every column family's decoder on arbitrary keys and values. A row
//! that decodes re-encodes to bytes that decode to the same row.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tardis_core::api::EntryVersion;
use tardis_log::index::{self, ChunkLoc};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the family, the second how much of the rest is the key.
    let [family, split, rest @ ..] = data else { return };
    let at = usize::from(*split).min(rest.len());
    let (key, value) = rest.split_at(at);
    match family % 5 {
        0 => {
            if let Ok(loc) = ChunkLoc::decode(value) {
                assert_eq!(&loc.encode()[..], value);
            }
        }
        1 => {
            if let Ok((id, row)) = index::decode_set_row(key, value) {
                let (k, v) = index::encode_set_row(id, &row);
                assert_eq!(&k[..], key);
                assert_eq!(index::decode_set_row(&k, &v).expect("a re-encoded set row decodes"), (id, row));
            }
        }
        2 => {
            let pos = index::entry_pos(value);
            if let Ok(row) = index::decode_entry(key, value) {
                let pos = pos.expect("a decodable entry has a position");
                let encoded = match &row {
                    EntryVersion::Version(v) => index::encode_entry(pos, Some(v)),
                    EntryVersion::Deleted(_) => index::encode_entry(pos, None),
                };
                assert_eq!(index::entry_pos(&encoded).expect("re-encoded position"), pos);
                assert_eq!(index::decode_entry(key, &encoded).expect("a re-encoded entry decodes"), row);
            }
        }
        3 => {
            if let Ok(pos) = index::decode_applied(value) {
                assert_eq!(&index::encode_applied(pos)[..], value);
            }
        }
        _ => {
            if let Ok(Some((seg, range))) = index::decode_retired(key, value) {
                let (k, v) = index::encode_retired(seg, range);
                assert_eq!((&k[..], &v[..]), (key, value));
            }
        }
    }
});
