//! The chunk pipeline: plaintext → ID, compression, sealing, self-check; and back.
//!
//! A chunk is stored in full, or as a delta against another stored chunk (its base): a
//! fast_rsync delta, compressed and sealed like a full chunk. A delta chunk keeps the ID of its
//! own plaintext, so deduplication and verification are the same for both kinds; reading one
//! needs the base's plaintext first (see `view::read_chunk`).
//!
//! Every encoded chunk is decoded again and re-hashed before it is handed to storage
//! (RELIABILITY invariant 10): a bug or miscompilation in the compressor or cipher then fails
//! the backup instead of silently storing bytes that can never be restored.

use crate::chunk::MAX_CHUNK;
use crate::compress;
use crate::crypto::{Keys, Purpose};
use crate::event::{DeltaBase, MAX_CHAIN};
use crate::ids::ChunkId;
use crate::{Error, Result};
use fast_rsync::{Signature, SignatureOptions};

/// Encoding flag: the body is zstd-compressed.
pub const ENC_ZSTD: u8 = 1;
/// Encoding flag: the body is sealed with the host's data key.
pub const ENC_SEALED: u8 = 2;
/// Encoding flag: the body is a fast_rsync delta against the chunk's base.
pub const ENC_DELTA: u8 = 4;
/// All flags this version understands.
pub const ENC_KNOWN: u8 = ENC_ZSTD | ENC_SEALED | ENC_DELTA;

/// A chunk ready to be stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EncodedChunk {
    pub id: ChunkId,
    pub plain_len: u32,
    pub encoding: u8,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// The base of a delta chunk (`encoding` has [`ENC_DELTA`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaBase>,
}

/// Largest delta (before compression) for a chunk of `plain_len` bytes. An all-literal delta
/// is the chunk plus a few bytes of commands; anything longer is never worth storing, and the
/// bound caps what a reader decompresses.
pub fn max_delta_len(plain_len: u32) -> usize {
    plain_len as usize + plain_len as usize / 16 + 1024
}

/// The rsync block size for a base of `len` bytes: about its square root (as rsync chooses),
/// as a power of two from 64 bytes to 4 KiB. Small blocks find small edits: a 4 KiB write at
/// any alignment costs about 5 KiB of literals in a 1 MiB chunk, against 8 KiB with 4 KiB blocks.
fn block_size(len: usize) -> u32 {
    let root = (len as f64).sqrt() as u32;
    root.next_power_of_two().clamp(64, 4096)
}

/// Encodes a chunk whose ID the caller already computed with `keys.chunk_id(data)`.
pub fn encode(keys: &Keys, id: ChunkId, data: &[u8]) -> Result<EncodedChunk> {
    if data.len() > MAX_CHUNK {
        return Err(Error::Invalid(format!("chunk of {} bytes exceeds the maximum {MAX_CHUNK}", data.len())));
    }
    let (mut encoding, compressed) = match compress::compress(data)? {
        Some(c) => (ENC_ZSTD, Some(c)),
        None => (0, None),
    };
    let stored: &[u8] = compressed.as_deref().unwrap_or(data);
    let body = if keys.is_encrypted() {
        encoding |= ENC_SEALED;
        keys.seal(Purpose::Chunk, &id.0, stored)?
    } else {
        stored.to_vec()
    };
    let chunk = EncodedChunk { id, plain_len: data.len() as u32, encoding, body, delta: None };
    self_check(keys, &chunk, None)?;
    Ok(chunk)
}

/// Encodes `data` (whose ID is `id`) as a delta against `base`, the plaintext of chunk
/// `base_id` stored at chain depth `base_depth` (0 for a full chunk). Returns `None` when no
/// delta can be stored: the chain would be longer than [`MAX_CHAIN`], or the delta is not
/// shorter than the chunk. Whether a delta is worth its chain is the caller's choice.
pub fn encode_delta(
    keys: &Keys,
    id: ChunkId,
    data: &[u8],
    base_id: ChunkId,
    base: &[u8],
    base_depth: u8,
) -> Result<Option<EncodedChunk>> {
    if data.len() > MAX_CHUNK || base.len() > MAX_CHUNK {
        return Err(Error::Invalid(format!("chunk of {} bytes exceeds the maximum {MAX_CHUNK}", data.len())));
    }
    if base_depth >= MAX_CHAIN || base_id == id {
        return Ok(None);
    }
    let signature =
        Signature::calculate(base, SignatureOptions { block_size: block_size(base.len()), crypto_hash_size: 8 });
    let mut delta = Vec::new();
    fast_rsync::diff(&signature.index(), data, &mut delta).map_err(|e| Error::Invalid(format!("delta: {e}")))?;
    if delta.len() > max_delta_len(data.len() as u32) {
        return Ok(None);
    }
    let (mut encoding, compressed) = match compress::compress(&delta)? {
        Some(c) => (ENC_DELTA | ENC_ZSTD, Some(c)),
        None => (ENC_DELTA, None),
    };
    let stored: &[u8] = compressed.as_deref().unwrap_or(&delta);
    if stored.len() >= data.len() {
        return Ok(None);
    }
    let body = if keys.is_encrypted() {
        encoding |= ENC_SEALED;
        keys.seal(Purpose::Chunk, &id.0, stored)?
    } else {
        stored.to_vec()
    };
    let delta = Some(DeltaBase { base: base_id, depth: base_depth + 1 });
    let chunk = EncodedChunk { id, plain_len: data.len() as u32, encoding, body, delta };
    // The rsync block match uses a truncated MD4, which a crafted file can collide: such a
    // delta fails the self-check, and the chunk is then stored in full instead.
    // (A miscompiled codec still fails the backup: the full encoding has its own self-check.)
    Ok(self_check(keys, &chunk, Some(base)).is_ok().then_some(chunk))
}

fn self_check(keys: &Keys, chunk: &EncodedChunk, base: Option<&[u8]>) -> Result<()> {
    decode(keys, &chunk.id, chunk.plain_len, chunk.encoding, &chunk.body, base)
        .map(|_| ())
        .map_err(|e| Error::SelfCheck { id: chunk.id.to_hex(), reason: e.to_string() })
}

/// Decodes a stored chunk and checks that its plaintext hashes to `id`. A delta chunk
/// ([`ENC_DELTA`]) needs the plaintext of its base in `base`; a full chunk must get `None`.
pub fn decode(
    keys: &Keys,
    id: &ChunkId,
    plain_len: u32,
    encoding: u8,
    body: &[u8],
    base: Option<&[u8]>,
) -> Result<Vec<u8>> {
    if encoding & !ENC_KNOWN != 0 {
        return Err(Error::UnsupportedVersion {
            what: "chunk encoding",
            version: encoding.into(),
            supported: ENC_KNOWN.into(),
        });
    }
    if plain_len as usize > MAX_CHUNK {
        return Err(Error::malformed("chunk", format!("declared length {plain_len} exceeds the maximum")));
    }
    if (encoding & ENC_SEALED != 0) != keys.is_encrypted() {
        return Err(Error::malformed("chunk", "encryption flag does not match the host"));
    }
    let opened = if encoding & ENC_SEALED != 0 { keys.open(Purpose::Chunk, &id.0, body)? } else { body.to_vec() };
    let plain = match (encoding & ENC_DELTA != 0, base) {
        (false, None) if encoding & ENC_ZSTD != 0 => compress::decompress(&opened, plain_len as usize)?,
        (false, None) => opened,
        (true, Some(base)) => {
            let bound = max_delta_len(plain_len);
            let delta = if encoding & ENC_ZSTD != 0 { compress::decompress_bounded(&opened, bound)? } else { opened };
            if delta.len() > bound {
                return Err(Error::malformed("delta", format!("{} bytes for a chunk of {plain_len}", delta.len())));
            }
            let mut out = Vec::with_capacity(plain_len as usize);
            fast_rsync::apply_limited(base, &delta, &mut out, plain_len as usize)
                .map_err(|e| Error::malformed("delta", e))?;
            out
        }
        (true, None) => return Err(Error::malformed("chunk", "a delta chunk read without its base")),
        (false, Some(_)) => return Err(Error::malformed("chunk", "a full chunk read as a delta")),
    };
    if plain.len() != plain_len as usize {
        return Err(Error::malformed("chunk", format!("{} bytes, expected {plain_len}", plain.len())));
    }
    if keys.chunk_id(&plain) != *id {
        return Err(Error::Tampered { what: format!("chunk {id}: content does not match its ID") });
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::tests::pseudo_random as noise;
    use crate::crypto::MasterKey;
    use crate::ids::HostId;
    use proptest::prelude::*;

    fn both_kinds() -> [Keys; 2] {
        [Keys::encrypted(HostId([1; 16]), &MasterKey::generate().unwrap()), Keys::unencrypted(HostId([2; 16]))]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn round_trip(data in proptest::collection::vec(0u8..3, 0..50_000)) {
            for k in both_kinds() {
                let id = k.chunk_id(&data);
                let c = encode(&k, id, &data).unwrap();
                prop_assert_eq!(decode(&k, &id, c.plain_len, c.encoding, &c.body, None).unwrap(), data.clone());
            }
        }

        /// Random edit scripts (overwrites, insertions, deletions) on a random base: every
        /// delta that is stored decodes to the edited bytes, and only against its own base.
        #[test]
        fn delta_round_trip(
            seed in any::<u64>(),
            len in 0usize..200_000,
            edits in proptest::collection::vec((any::<u8>(), 0usize..200_000, 1usize..5_000, any::<u64>()), 0..8),
        ) {
            let base = noise(len, seed);
            let data = apply_edits(&base, &edits);
            for k in both_kinds() {
                let base_id = k.chunk_id(&base);
                let id = k.chunk_id(&data);
                let Some(c) = encode_delta(&k, id, &data, base_id, &base, 3).unwrap() else { continue };
                prop_assert_eq!(c.delta, Some(DeltaBase { base: base_id, depth: 4 }));
                prop_assert!(c.encoding & ENC_DELTA != 0);
                prop_assert_eq!(decode(&k, &id, c.plain_len, c.encoding, &c.body, Some(&base)).unwrap(), data.clone());
                prop_assert!(decode(&k, &id, c.plain_len, c.encoding, &c.body, None).is_err());
                // Against another base, a delta that copies anything fails its ID check (one that
                // is all literals reads the same whatever the base).
                let other = noise(len.max(1), seed ^ 1);
                if let Ok(p) = decode(&k, &id, c.plain_len, c.encoding, &c.body, Some(&other)) {
                    prop_assert_eq!(p, data.clone());
                }
            }
        }
    }

    /// Applies `(kind, at, len, seed)` edits: overwrite, insert or delete `len` bytes at `at`.
    fn apply_edits(base: &[u8], edits: &[(u8, usize, usize, u64)]) -> Vec<u8> {
        let mut out = base.to_vec();
        for (kind, at, len, seed) in edits {
            let at = (*at).min(out.len());
            match kind % 3 {
                0 => {
                    let end = (at + len).min(out.len());
                    out[at..end].copy_from_slice(&noise(end - at, *seed));
                }
                1 => {
                    let tail = out.split_off(at);
                    out.extend(noise(*len, *seed));
                    out.extend(tail);
                }
                _ => {
                    let end = (at + len).min(out.len());
                    out.drain(at..end);
                }
            }
        }
        out.truncate(MAX_CHUNK);
        out
    }

    #[test]
    fn small_edits_give_small_deltas() {
        let k = &both_kinds()[0];
        let base = noise(1 << 20, 5);
        let mut data = base.clone();
        for at in [1000usize, 300_001, 700_123] {
            data[at..at + 4096].copy_from_slice(&noise(4096, at as u64));
        }
        let c = encode_delta(k, k.chunk_id(&data), &data, k.chunk_id(&base), &base, 0).unwrap().unwrap();
        // 12 KiB changed: the literals plus 1 KiB blocks around each edit, commands, the seal.
        assert!(c.body.len() < 3 * 5 * 1024 + 1024, "delta of {} bytes", c.body.len());
        assert_eq!(c.delta.unwrap().depth, 1);
    }

    #[test]
    fn no_delta_past_the_chain_bound_or_against_itself() {
        let k = &both_kinds()[1];
        let base = noise(10_000, 1);
        let id = k.chunk_id(&base);
        assert!(encode_delta(k, id, &base, k.chunk_id(b"x"), b"x", MAX_CHAIN).unwrap().is_none());
        assert!(encode_delta(k, id, &base, id, &base, 0).unwrap().is_none());
    }

    #[test]
    fn wrong_id_or_flipped_body_is_detected() {
        for k in both_kinds() {
            let data = b"some chunk data ".repeat(100);
            let id = k.chunk_id(&data);
            let c = encode(&k, id, &data).unwrap();
            let other = k.chunk_id(b"other");
            assert!(decode(&k, &other, c.plain_len, c.encoding, &c.body, None).is_err());
            let mut body = c.body.clone();
            let mid = body.len() / 2;
            body[mid] ^= 0x40;
            assert!(decode(&k, &id, c.plain_len, c.encoding, &body, None).is_err());
            assert!(decode(&k, &id, c.plain_len, c.encoding | 0x80, &c.body, None).is_err());
            assert!(decode(&k, &id, c.plain_len, c.encoding, &c.body, Some(b"base")).is_err());
            assert!(decode(&k, &id, c.plain_len, c.encoding | ENC_DELTA, &c.body, None).is_err());
        }
    }
}
