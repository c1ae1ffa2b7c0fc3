//! Stored chunk bodies (encoding flags, declared length, zstd frame, sealed box) as a server or
//! a damaged disk hands them to a reader. Decoding must refuse what does not check out, never
//! allocate past the declared (bounded) length, and round-trip what the encoder writes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tardis_core::chunk::MAX_CHUNK;
use tardis_core::chunkcodec;
use tardis_fuzz::keys;

fuzz_target!(|data: &[u8]| {
    let [mode, encoding, l0, l1, l2, body @ ..] = data else { return };
    let keys = &keys()[usize::from(mode & 1)];
    // Declared lengths near the body's own length are the interesting ones; the top bit of
    // `mode` lets the fuzzer also try lengths up to and past the maximum.
    let declared = u32::from_le_bytes([*l0, *l1, *l2, 0]);
    let plain_len = if mode & 0x80 != 0 { declared << 8 } else { declared };
    // With the ID of the body itself, an unsealed raw body can pass every check.
    let id = keys.chunk_id(body);
    if let Ok(plain) = chunkcodec::decode(keys, &id, plain_len, *encoding, body, None) {
        assert_eq!(plain.len(), plain_len as usize);
        assert!(plain.len() <= MAX_CHUNK);
        assert_eq!(keys.chunk_id(&plain), id);
    }
    if mode & 2 != 0 && body.len() <= MAX_CHUNK {
        let c = chunkcodec::encode(keys, id, body).expect("a chunk within the maximum encodes");
        let plain =
            chunkcodec::decode(keys, &id, c.plain_len, c.encoding, &c.body, None).expect("an encoded chunk decodes");
        assert_eq!(plain, body);
    }
});
