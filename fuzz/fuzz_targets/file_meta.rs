//! Entry metadata as a reader opens it from a stored `FileVersion`: the sealed box, the
//! MessagePack `FileMeta` inside, and the check that the name matches its keyed name.
//! Metadata that opens seals and opens again to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_bytes::ByteBuf;
use tardis_core::event::FileVersion;
use tardis_core::ids::{DirId, NameKey};
use tardis_core::meta::FileMeta;
use tardis_core::view;
use tardis_fuzz::keys;

fuzz_target!(|data: &[u8]| {
    let [mode, set, meta @ ..] = data else { return };
    if let Ok(m) = FileMeta::decode(meta) {
        assert_eq!(FileMeta::decode(&m.encode()).expect("re-encoded metadata decodes"), m);
    }
    let keys = &keys()[usize::from(mode & 1)];
    let set = u64::from(*set);
    let dir = DirId([*mode; 16]);
    // The name key the reader expects is that of the decoded name, if there is one; otherwise
    // any key (and the open must then fail the name check, not panic).
    let decoded = FileMeta::decode(meta).ok();
    let name = decoded.as_ref().map_or(NameKey([0; 16]), |m| keys.name_key(&dir, &m.name));
    let v = FileVersion { set, dir, name, extents: vec![], meta: ByteBuf::from(meta.to_vec()) };
    if let Ok(m) = view::open_meta(keys, &v) {
        assert_eq!(keys.name_key(&dir, &m.name), name);
    }
    if let Some(m) = decoded {
        let sealed = view::seal_meta(keys, &dir, &name, set, &m).expect("metadata seals");
        let v = FileVersion { meta: sealed, ..v };
        assert_eq!(view::open_meta(keys, &v).expect("sealed metadata opens"), m);
    }
});
