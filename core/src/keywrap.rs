//! Wrapping the master key with a password (Argon2id + AES-256-GCM-SIV).
//!
//! The wrapped blob lives on the server, so it carries everything needed to unwrap it (the
//! Argon2id parameters and salt) and is authenticated as a whole: changing a parameter or
//! the salt makes unwrapping fail exactly like a wrong password does. Parameters below a
//! safety floor are refused, so a hostile server cannot make the client derive a weak key,
//! and parameters above a ceiling are refused, so it cannot make the client exhaust memory.
//!
//! Argon2id yields 64 bytes: the first 32 are the key-encryption key, the last 32 are a login
//! secret whose hash the server may keep as a verifier; neither reveals the other.

use crate::crypto::MasterKey;
use crate::{random_bytes, Error, Result};
use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use zeroize::Zeroize;

const MAGIC: &[u8; 4] = b"TKEY";
const VERSION: u8 = 1;
const ALG_ARGON2ID_13: u8 = 1;
const HEADER_LEN: usize = 36;
/// Length of a wrapped-key blob in bytes.
pub const BLOB_LEN: usize = HEADER_LEN + 12 + 32 + 16;

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl KdfParams {
    /// What new keys are wrapped with: 64 MiB, 3 passes, 1 lane.
    pub const DEFAULT: KdfParams = KdfParams { m_kib: 64 * 1024, t: 3, p: 1 };
    /// The weakest parameters accepted (OWASP's Argon2id minimum).
    pub const FLOOR: KdfParams = KdfParams { m_kib: 19 * 1024, t: 2, p: 1 };
    /// The most expensive parameters accepted, so a blob cannot demand unbounded memory.
    pub const CEILING: KdfParams = KdfParams { m_kib: 4 * 1024 * 1024, t: 64, p: 16 };

    fn check(&self) -> Result<()> {
        let (f, c) = (Self::FLOOR, Self::CEILING);
        if self.m_kib < f.m_kib || self.t < f.t || self.p < f.p {
            return Err(Error::WeakParameters(format!(
                "m={} KiB t={} p={} below the floor m={} t={}",
                self.m_kib, self.t, self.p, f.m_kib, f.t
            )));
        }
        if self.m_kib > c.m_kib || self.t > c.t || self.p > c.p {
            return Err(Error::WeakParameters(format!(
                "m={} KiB t={} p={} above the ceiling m={} t={} p={}",
                self.m_kib, self.t, self.p, c.m_kib, c.t, c.p
            )));
        }
        Ok(())
    }
}

/// A master key sealed under a password, in its stored form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    bytes: Vec<u8>,
}

/// The result of unwrapping: the master key and the login secret. Both are zeroed on drop and
/// never printed.
#[derive(zeroize::ZeroizeOnDrop)]
pub struct Unwrapped {
    pub master: MasterKey,
    pub login_secret: [u8; 32],
}

impl std::fmt::Debug for Unwrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Unwrapped(..)")
    }
}

/// The public part of a wrapped key: format, Argon2id parameters and salt. The server hands
/// it out before login, so a client can derive its login key; the sealed master key itself
/// is only sent after the login succeeded (no offline guessing from the blob without logging in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KdfHeader {
    bytes: [u8; HEADER_LEN],
}

/// What Argon2id derives from a password: the key-encryption key and the login secret. Zeroed
/// on drop and never printed.
#[derive(zeroize::ZeroizeOnDrop)]
pub struct Secrets {
    kek: [u8; 32],
    login_secret: [u8; 32],
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(..)")
    }
}

impl Secrets {
    /// The secret that the login key is made from (see `login`).
    pub fn login_secret(&self) -> &[u8; 32] {
        &self.login_secret
    }
}

impl KdfHeader {
    /// Length of the header in bytes.
    pub const LEN: usize = HEADER_LEN;

    /// A header with `params` and a fresh random salt.
    pub fn new(params: KdfParams) -> Result<Self> {
        params.check()?;
        let mut bytes = [0u8; HEADER_LEN];
        bytes[..4].copy_from_slice(MAGIC);
        bytes[4..8].copy_from_slice(&[VERSION, ALG_ARGON2ID_13, 0, 0]);
        bytes[8..12].copy_from_slice(&params.m_kib.to_le_bytes());
        bytes[12..16].copy_from_slice(&params.t.to_le_bytes());
        bytes[16..20].copy_from_slice(&params.p.to_le_bytes());
        random_bytes(&mut bytes[20..36])?;
        Ok(KdfHeader { bytes })
    }

    /// Parses a header (or the start of a whole blob), checking magic, version, algorithm and
    /// that the parameters lie between the floor and the ceiling.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < HEADER_LEN {
            return Err(Error::malformed("wrapped key", format!("length {} (expected {BLOB_LEN})", bytes.len())));
        }
        if &bytes[..4] != MAGIC {
            return Err(Error::malformed("wrapped key", "bad magic"));
        }
        if bytes[4] != VERSION {
            return Err(Error::UnsupportedVersion {
                what: "wrapped key",
                version: bytes[4].into(),
                supported: VERSION.into(),
            });
        }
        if bytes[5] != ALG_ARGON2ID_13 {
            return Err(Error::malformed("wrapped key", format!("unknown algorithm {}", bytes[5])));
        }
        let h = KdfHeader { bytes: bytes[..HEADER_LEN].try_into().expect("length checked above") };
        h.params().check()?;
        Ok(h)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn params(&self) -> KdfParams {
        let u = |i: usize| u32::from_le_bytes(self.bytes[i..i + 4].try_into().expect("4-byte field"));
        KdfParams { m_kib: u(8), t: u(12), p: u(16) }
    }

    /// Runs Argon2id over `password` with this header's salt and parameters.
    pub fn derive(&self, password: &[u8]) -> Result<Secrets> {
        let params = self.params();
        params.check()?;
        let mut derived = derive(password, &self.bytes[20..36], params)?;
        let mut s = Secrets { kek: [0; 32], login_secret: [0; 32] };
        s.kek.copy_from_slice(&derived[..32]);
        s.login_secret.copy_from_slice(&derived[32..]);
        derived.zeroize();
        Ok(s)
    }
}

impl WrappedKey {
    /// Wraps `master` under `password` with fresh salt and nonce.
    pub fn wrap(master: &MasterKey, password: &[u8], params: KdfParams) -> Result<Self> {
        let header = KdfHeader::new(params)?;
        let secrets = header.derive(password)?;
        Self::seal(master, &header, &secrets)
    }

    /// Wraps `master` with secrets already derived from `header` (one Argon2id run serves both
    /// the wrapped key and the login verifier of a new host).
    pub fn seal(master: &MasterKey, header: &KdfHeader, secrets: &Secrets) -> Result<Self> {
        let cipher = Aes256GcmSiv::new_from_slice(&secrets.kek).map_err(|_| Error::Invalid("kek length".into()))?;
        let mut nonce = [0u8; 12];
        random_bytes(&mut nonce)?;
        let ct = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: master.as_bytes(), aad: header.as_bytes() })
            .map_err(|_| Error::Invalid("key wrap failed".into()))?;
        let mut bytes = Vec::with_capacity(BLOB_LEN);
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&ct);
        Ok(WrappedKey { bytes })
    }

    /// Parses a stored blob, checking its layout and parameters.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != BLOB_LEN {
            return Err(Error::malformed("wrapped key", format!("length {} (expected {BLOB_LEN})", bytes.len())));
        }
        KdfHeader::from_bytes(bytes)?;
        Ok(WrappedKey { bytes: bytes.to_vec() })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The public header: format, parameters and salt.
    pub fn header(&self) -> KdfHeader {
        KdfHeader { bytes: self.bytes[..HEADER_LEN].try_into().expect("blob length checked when parsed") }
    }

    pub fn params(&self) -> KdfParams {
        self.header().params()
    }

    /// Recovers the master key with secrets derived from this blob's header; secrets of
    /// another password (or any altered byte) give `WrongPassword`.
    pub fn open(&self, secrets: &Secrets) -> Result<MasterKey> {
        let cipher = Aes256GcmSiv::new_from_slice(&secrets.kek).map_err(|_| Error::Invalid("kek length".into()))?;
        let nonce = &self.bytes[HEADER_LEN..HEADER_LEN + 12];
        let mut plain = cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload { msg: &self.bytes[HEADER_LEN + 12..], aad: &self.bytes[..HEADER_LEN] },
            )
            .map_err(|_| Error::WrongPassword)?;
        let mut key = [0u8; 32];
        key.copy_from_slice(&plain);
        plain.zeroize();
        Ok(MasterKey(key))
    }

    /// Recovers the master key; a wrong password (or any altered byte) is `WrongPassword`.
    pub fn unwrap_key(&self, password: &[u8]) -> Result<Unwrapped> {
        let secrets = self.header().derive(password)?;
        let master = self.open(&secrets)?;
        Ok(Unwrapped { master, login_secret: secrets.login_secret })
    }
}

fn derive(password: &[u8], salt: &[u8], p: KdfParams) -> Result<[u8; 64]> {
    let params = argon2::Params::new(p.m_kib, p.t, p.p, Some(64)).map_err(|e| Error::WeakParameters(e.to_string()))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 64];
    a.hash_password_into(password, salt, &mut out).map_err(|e| Error::Invalid(format!("argon2id: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: KdfParams = KdfParams::FLOOR;

    #[test]
    fn wrap_unwrap_and_wrong_password() {
        let mk = MasterKey::generate().unwrap();
        let w = WrappedKey::wrap(&mk, b"correct horse", FAST).unwrap();
        let w = WrappedKey::from_bytes(w.as_bytes()).unwrap();
        let u = w.unwrap_key(b"correct horse").unwrap();
        assert_eq!(u.master.as_bytes(), mk.as_bytes());
        assert!(matches!(w.unwrap_key(b"battery staple"), Err(Error::WrongPassword)));
        // Same password, same blob: same login secret; a rewrap changes it (fresh salt).
        assert_eq!(w.unwrap_key(b"correct horse").unwrap().login_secret, u.login_secret);
        let w2 = WrappedKey::wrap(&mk, b"correct horse", FAST).unwrap();
        assert_ne!(w2.unwrap_key(b"correct horse").unwrap().login_secret, u.login_secret);
    }

    #[test]
    fn altered_header_fails_like_a_wrong_password() {
        let mk = MasterKey::generate().unwrap();
        let w = WrappedKey::wrap(&mk, b"pw", FAST).unwrap();
        let mut b = w.as_bytes().to_vec();
        b[25] ^= 1; // salt
        assert!(matches!(WrappedKey::from_bytes(&b).unwrap().unwrap_key(b"pw"), Err(Error::WrongPassword)));
    }

    #[test]
    fn weak_or_huge_parameters_are_refused() {
        let mk = MasterKey::generate().unwrap();
        let weak = KdfParams { m_kib: 1024, t: 1, p: 1 };
        assert!(matches!(WrappedKey::wrap(&mk, b"pw", weak), Err(Error::WeakParameters(_))));
        let mut b = WrappedKey::wrap(&mk, b"pw", FAST).unwrap().as_bytes().to_vec();
        b[8..12].copy_from_slice(&8u32.to_le_bytes());
        assert!(matches!(WrappedKey::from_bytes(&b), Err(Error::WeakParameters(_))));
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(WrappedKey::from_bytes(&b), Err(Error::WeakParameters(_))));
    }

    #[test]
    fn malformed_blobs_are_errors() {
        assert!(matches!(WrappedKey::from_bytes(b"short"), Err(Error::Malformed { .. })));
        let mut b = vec![0u8; BLOB_LEN];
        assert!(matches!(WrappedKey::from_bytes(&b), Err(Error::Malformed { .. })));
        b[..4].copy_from_slice(MAGIC);
        b[4] = 9;
        assert!(matches!(WrappedKey::from_bytes(&b), Err(Error::UnsupportedVersion { .. })));
    }
}
