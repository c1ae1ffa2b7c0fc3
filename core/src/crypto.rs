//! The per-host key hierarchy and authenticated encryption.
//!
//! A host's 32-byte random master key never leaves the client unwrapped. Independent subkeys
//! are derived from it with BLAKE3's key-derivation mode, one per purpose, so that a chunk ID
//! (keyed hash) can never be confused with a sealing key. Hosts without a password derive the
//! hashing keys from their public host ID instead and store data unsealed; they are marked
//! unencrypted in the log and every tool says so.
//!
//! Sealing is AES-256-GCM-SIV with a random 96-bit nonce per message. GCM-SIV stays secure if
//! a nonce ever repeats (it then only reveals that two messages were equal), which is the
//! right failure mode for a random nonce source. The associated data binds every ciphertext to
//! its format version, host, record kind and object identity, so a record moved to another
//! place, host or kind fails to open.

use crate::ids::{ChunkId, DirId, HostId, NameKey};
use crate::{random_bytes, Error, Result, FORMAT_VERSION};
use aes_gcm_siv::aead::{AeadInPlace, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce, Tag};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Bytes added by [`Keys::seal`]: the nonce in front and the tag behind.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// A host's master key. Zeroed when dropped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey(pub(crate) [u8; 32]);

impl MasterKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self> {
        let mut k = [0u8; 32];
        random_bytes(&mut k)?;
        Ok(MasterKey(k))
    }

    /// Raw bytes, for wrapping.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// What a sealed message is, for the associated data. Values are part of the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Purpose {
    Chunk = 1,
    EntryMeta = 2,
    SetMeta = 3,
}

/// All keys of one host, derived once after the master key is unwrapped.
pub struct Keys {
    host: HostId,
    sealing: Option<(Aes256GcmSiv, Aes256GcmSiv)>,
    chunk_id_key: [u8; 32],
    name_key: [u8; 32],
    dir_key: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("host", &self.host).field("encrypted", &self.is_encrypted()).finish()
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.chunk_id_key.zeroize();
        self.name_key.zeroize();
        self.dir_key.zeroize();
    }
}

impl Keys {
    /// Keys of an encrypted host.
    pub fn encrypted(host: HostId, master: &MasterKey) -> Self {
        let m = &master.0;
        let data = blake3::derive_key("tardis 2026 data sealing key", m);
        let meta = blake3::derive_key("tardis 2026 metadata sealing key", m);
        let keys = Keys {
            host,
            sealing: Some((Aes256GcmSiv::new((&data).into()), Aes256GcmSiv::new((&meta).into()))),
            chunk_id_key: blake3::derive_key("tardis 2026 chunk id key", m),
            name_key: blake3::derive_key("tardis 2026 name key", m),
            dir_key: blake3::derive_key("tardis 2026 directory id key", m),
        };
        let (mut d, mut t) = (data, meta);
        d.zeroize();
        t.zeroize();
        keys
    }

    /// Keys of a host created without a password: identifiers are still keyed (by the public
    /// host ID, so they do not collide across hosts) but nothing is sealed.
    pub fn unencrypted(host: HostId) -> Self {
        let h = &host.0;
        Keys {
            host,
            sealing: None,
            chunk_id_key: blake3::derive_key("tardis 2026 unencrypted chunk id key", h),
            name_key: blake3::derive_key("tardis 2026 unencrypted name key", h),
            dir_key: blake3::derive_key("tardis 2026 unencrypted directory id key", h),
        }
    }

    pub fn host(&self) -> HostId {
        self.host
    }

    pub fn is_encrypted(&self) -> bool {
        self.sealing.is_some()
    }

    /// The ID of a chunk with this plaintext.
    pub fn chunk_id(&self, plaintext: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.chunk_id_key, plaintext).as_bytes())
    }

    /// The ID of the directory named `name` inside `parent`.
    pub fn dir_id(&self, parent: &DirId, name: &[u8]) -> DirId {
        DirId(truncate16(&keyed_pair(&self.dir_key, &parent.0, name)))
    }

    /// The index key of `name` inside `parent`.
    pub fn name_key(&self, parent: &DirId, name: &[u8]) -> NameKey {
        NameKey(truncate16(&keyed_pair(&self.name_key, &parent.0, name)))
    }

    /// Seals `plaintext` (or passes it through on an unencrypted host).
    pub fn seal(&self, purpose: Purpose, object: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let Some(cipher) = self.cipher(purpose) else {
            return Ok(plaintext.to_vec());
        };
        let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce)?;
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let aad = self.aad(purpose, object);
        let tag = cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut out[NONCE_LEN..])
            .map_err(|_| Error::Invalid("message too long to seal".into()))?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Opens what [`Keys::seal`] produced for the same purpose and object. On failure no
    /// plaintext is returned or left behind.
    pub fn open(&self, purpose: Purpose, object: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        let Some(cipher) = self.cipher(purpose) else {
            return Ok(sealed.to_vec());
        };
        let tampered = || Error::Tampered { what: format!("{purpose:?} {}", hex_prefix(object)) };
        if sealed.len() < SEAL_OVERHEAD {
            return Err(tampered());
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut buf = body.to_vec();
        let aad = self.aad(purpose, object);
        match cipher.decrypt_in_place_detached(Nonce::from_slice(nonce), &aad, &mut buf, Tag::from_slice(tag)) {
            Ok(()) => Ok(buf),
            Err(_) => {
                buf.zeroize();
                Err(tampered())
            }
        }
    }

    fn cipher(&self, purpose: Purpose) -> Option<&Aes256GcmSiv> {
        self.sealing.as_ref().map(|(data, meta)| match purpose {
            Purpose::Chunk => data,
            Purpose::EntryMeta | Purpose::SetMeta => meta,
        })
    }

    /// Associated data: format version, host, purpose and the object's identity.
    fn aad(&self, purpose: Purpose, object: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(2 + 16 + 1 + object.len());
        aad.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        aad.extend_from_slice(&self.host.0);
        aad.push(purpose as u8);
        aad.extend_from_slice(object);
        aad
    }
}

fn keyed_pair(key: &[u8; 32], a: &[u8], b: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    // Length-prefix the first part so (a, b) pairs cannot collide by shifting bytes across.
    h.update(&(a.len() as u64).to_le_bytes());
    h.update(a);
    h.update(b);
    *h.finalize().as_bytes()
}

fn truncate16(h: &[u8; 32]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&h[..16]);
    out
}

fn hex_prefix(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys() -> Keys {
        Keys::encrypted(HostId([7; 16]), &MasterKey([9; 32]))
    }

    #[test]
    fn seal_binds_purpose_object_and_host() {
        let k = keys();
        let sealed = k.seal(Purpose::Chunk, b"obj", b"hello").unwrap();
        assert_eq!(k.open(Purpose::Chunk, b"obj", &sealed).unwrap(), b"hello");
        assert!(matches!(k.open(Purpose::Chunk, b"other", &sealed), Err(Error::Tampered { .. })));
        assert!(matches!(k.open(Purpose::EntryMeta, b"obj", &sealed), Err(Error::Tampered { .. })));
        let other_host = Keys::encrypted(HostId([8; 16]), &MasterKey([9; 32]));
        assert!(matches!(other_host.open(Purpose::Chunk, b"obj", &sealed), Err(Error::Tampered { .. })));
        assert!(matches!(k.open(Purpose::Chunk, b"obj", &sealed[..10]), Err(Error::Tampered { .. })));
    }

    #[test]
    fn nonces_are_fresh() {
        let k = keys();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let s = k.seal(Purpose::Chunk, b"x", b"same").unwrap();
            assert!(seen.insert(s[..NONCE_LEN].to_vec()), "nonce repeated");
        }
    }

    #[test]
    fn ids_depend_on_the_key() {
        let a = keys();
        let b = Keys::encrypted(HostId([7; 16]), &MasterKey([10; 32]));
        assert_ne!(a.chunk_id(b"data"), b.chunk_id(b"data"));
        assert_eq!(a.chunk_id(b"data"), keys().chunk_id(b"data"));
        assert_ne!(a.chunk_id(b"data"), ChunkId(*blake3::hash(b"data").as_bytes()));
        assert_ne!(a.name_key(&DirId::TOP, b"ab"), a.name_key(&DirId([1; 16]), b"ab"));
        assert_ne!(a.dir_id(&DirId::TOP, b"ab").0, a.name_key(&DirId::TOP, b"ab").0);
    }

    #[test]
    fn unencrypted_hosts_pass_data_through() {
        let k = Keys::unencrypted(HostId([1; 16]));
        assert!(!k.is_encrypted());
        assert_eq!(k.seal(Purpose::Chunk, b"o", b"plain").unwrap(), b"plain");
    }

    proptest! {
        #[test]
        fn seal_open_round_trip_and_any_flip_is_detected(
            data in proptest::collection::vec(any::<u8>(), 0..4096),
            flip in any::<proptest::sample::Index>(),
            bit in 0u8..8,
        ) {
            let k = keys();
            let mut sealed = k.seal(Purpose::EntryMeta, b"id", &data).unwrap();
            prop_assert_eq!(k.open(Purpose::EntryMeta, b"id", &sealed).unwrap(), data);
            let i = flip.index(sealed.len());
            sealed[i] ^= 1 << bit;
            prop_assert!(matches!(k.open(Purpose::EntryMeta, b"id", &sealed), Err(Error::Tampered { .. })), "flip accepted");
        }
    }
}
