//! Delta chunks as a server or a damaged disk hands them to a reader: a fast_rsync delta
//! (raw or zstd-compressed, sealed or not) applied to a base. Applying must refuse what does not
//! check out and never produce more than the declared length; what `encode_delta` writes for an
//! edited base must decode to the edited bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tardis_core::chunk::MAX_CHUNK;
use tardis_core::chunkcodec::{self, ENC_DELTA};
use tardis_fuzz::keys;

fuzz_target!(|data: &[u8]| {
    let [mode, encoding, l0, l1, split, rest @ ..] = data else { return };
    let keys = &keys()[usize::from(mode & 1)];
    let at = (usize::from(*split) * rest.len() / 255).min(rest.len());
    let (base, delta) = rest.split_at(at);
    let plain_len = u32::from_le_bytes([*l0, *l1, 0, 0]);
    // Any bytes as a delta body: the ID is that of the base, so a delta that copies the whole
    // base (and nothing else) passes every check.
    let id = keys.chunk_id(base);
    if let Ok(plain) = chunkcodec::decode(keys, &id, plain_len, *encoding | ENC_DELTA, delta, Some(base)) {
        assert_eq!(plain.len(), plain_len as usize);
        assert_eq!(plain, base);
    }
    if mode & 2 != 0 && base.len() <= MAX_CHUNK && delta.len() <= MAX_CHUNK {
        // `delta` read as the new version of `base`.
        let new_id = keys.chunk_id(delta);
        let base_id = keys.chunk_id(base);
        if let Some(c) = chunkcodec::encode_delta(keys, new_id, delta, base_id, base, 0).expect("encoding a delta") {
            let plain = chunkcodec::decode(keys, &new_id, c.plain_len, c.encoding, &c.body, Some(base))
                .expect("an encoded delta decodes");
            assert_eq!(plain, delta);
        }
    }
});
