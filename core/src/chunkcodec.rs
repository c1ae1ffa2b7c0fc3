//! The chunk pipeline: plaintext → ID, compression, sealing, self-check; and back.
//!
//! Every encoded chunk is decoded again and re-hashed before it is handed to storage
//! (RELIABILITY invariant 10): a bug or miscompilation in the compressor or cipher then fails
//! the backup instead of silently storing bytes that can never be restored.

use crate::chunk::MAX_CHUNK;
use crate::compress;
use crate::crypto::{Keys, Purpose};
use crate::ids::ChunkId;
use crate::{Error, Result};

/// Encoding flag: the body is zstd-compressed.
pub const ENC_ZSTD: u8 = 1;
/// Encoding flag: the body is sealed with the host's data key.
pub const ENC_SEALED: u8 = 2;
/// All flags this version understands.
pub const ENC_KNOWN: u8 = ENC_ZSTD | ENC_SEALED;

/// A chunk ready to be stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EncodedChunk {
    pub id: ChunkId,
    pub plain_len: u32,
    pub encoding: u8,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
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
    let chunk = EncodedChunk { id, plain_len: data.len() as u32, encoding, body };
    self_check(keys, &chunk)?;
    Ok(chunk)
}

fn self_check(keys: &Keys, chunk: &EncodedChunk) -> Result<()> {
    decode(keys, &chunk.id, chunk.plain_len, chunk.encoding, &chunk.body)
        .map(|_| ())
        .map_err(|e| Error::SelfCheck { id: chunk.id.to_hex(), reason: e.to_string() })
}

/// Decodes a stored chunk and checks that its plaintext hashes to `id`.
pub fn decode(keys: &Keys, id: &ChunkId, plain_len: u32, encoding: u8, body: &[u8]) -> Result<Vec<u8>> {
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
    let plain = if encoding & ENC_ZSTD != 0 { compress::decompress(&opened, plain_len as usize)? } else { opened };
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
                prop_assert_eq!(decode(&k, &id, c.plain_len, c.encoding, &c.body).unwrap(), data.clone());
            }
        }
    }

    #[test]
    fn wrong_id_or_flipped_body_is_detected() {
        for k in both_kinds() {
            let data = b"some chunk data ".repeat(100);
            let id = k.chunk_id(&data);
            let c = encode(&k, id, &data).unwrap();
            let other = k.chunk_id(b"other");
            assert!(decode(&k, &other, c.plain_len, c.encoding, &c.body).is_err());
            let mut body = c.body.clone();
            let mid = body.len() / 2;
            body[mid] ^= 0x40;
            assert!(decode(&k, &id, c.plain_len, c.encoding, &body).is_err());
            assert!(decode(&k, &id, c.plain_len, c.encoding | 0x80, &c.body).is_err());
        }
    }
}
