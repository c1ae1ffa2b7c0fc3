//! Logging in to `tardisd` without giving the server anything it could log in with.
//!
//! The login secret (the second half of the Argon2id output, see `keywrap`) is the seed of an
//! Ed25519 key pair. The server stores only the public key, the *verifier*; at each login the
//! client signs the host name and a value exported from the TLS session (channel binding).
//! So the server never learns the password, the encryption key or the login secret; a
//! recorded login cannot be replayed (the exported value differs in every session); and a
//! machine in the middle cannot relay a login to the real server (its TLS session exports a
//! different value).

use crate::keywrap::Secrets;
use crate::{Error, Result};
use ring::signature::{self, Ed25519KeyPair, KeyPair};

/// Length of a verifier (an Ed25519 public key).
pub const VERIFIER_LEN: usize = 32;
/// Length of a login proof (an Ed25519 signature).
pub const PROOF_LEN: usize = 64;
/// Length of the channel-binding value the transport exports.
pub const BINDING_LEN: usize = 32;

const CONTEXT: &[u8] = b"tardis login v1\0";

/// The verifier a server keeps for a host.
pub type Verifier = [u8; VERIFIER_LEN];

/// The key a client logs in with.
pub struct LoginKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for LoginKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginKey(..)")
    }
}

fn message(host: &str, binding: &[u8; BINDING_LEN]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CONTEXT.len() + 8 + host.len() + BINDING_LEN);
    m.extend_from_slice(CONTEXT);
    m.extend_from_slice(&(host.len() as u64).to_be_bytes());
    m.extend_from_slice(host.as_bytes());
    m.extend_from_slice(binding);
    m
}

impl LoginKey {
    /// The login key of a password, from the secrets derived with the host's key header.
    pub fn from_secrets(secrets: &Secrets) -> Result<LoginKey> {
        LoginKey::from_seed(secrets.login_secret())
    }

    /// The login key from a login secret directly.
    pub fn from_seed(seed: &[u8; 32]) -> Result<LoginKey> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|e| Error::Invalid(format!("login key from seed: {e}")))?;
        Ok(LoginKey { pair })
    }

    /// What the server stores to check this key's proofs.
    pub fn verifier(&self) -> Verifier {
        self.pair.public_key().as_ref().try_into().expect("an Ed25519 public key is 32 bytes")
    }

    /// Proves knowledge of the key for `host` in the session that exported `binding`.
    pub fn prove(&self, host: &str, binding: &[u8; BINDING_LEN]) -> [u8; PROOF_LEN] {
        self.pair.sign(&message(host, binding)).as_ref().try_into().expect("an Ed25519 signature is 64 bytes")
    }
}

/// Whether `proof` was made by the key behind `verifier` for `host` in the session that
/// exported `binding`.
pub fn check(verifier: &Verifier, host: &str, binding: &[u8; BINDING_LEN], proof: &[u8]) -> bool {
    signature::UnparsedPublicKey::new(&signature::ED25519, verifier).verify(&message(host, binding), proof).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keywrap::{KdfHeader, KdfParams};
    use proptest::prelude::*;

    fn key(password: &[u8], header: &KdfHeader) -> LoginKey {
        LoginKey::from_secrets(&header.derive(password).unwrap()).unwrap()
    }

    #[test]
    fn right_password_proves_and_wrong_one_does_not() {
        let header = KdfHeader::new(KdfParams::FLOOR).unwrap();
        let v = key(b"pw", &header).verifier();
        let binding = [7u8; BINDING_LEN];
        assert!(check(&v, "h", &binding, &key(b"pw", &header).prove("h", &binding)));
        assert!(!check(&v, "h", &binding, &key(b"pW", &header).prove("h", &binding)));
        // Same password with another salt: another key.
        let other = KdfHeader::new(KdfParams::FLOOR).unwrap();
        assert!(!check(&v, "h", &binding, &key(b"pw", &other).prove("h", &binding)));
    }

    proptest! {
        #[test]
        fn a_proof_is_bound_to_host_and_session(seed in any::<[u8; 32]>(), b1 in any::<[u8; 32]>(),
                                                b2 in any::<[u8; 32]>(), flip in 0usize..64) {
            let k = LoginKey::from_seed(&seed).unwrap();
            let v = k.verifier();
            let p = k.prove("alpha", &b1);
            prop_assert!(check(&v, "alpha", &b1, &p));
            prop_assert!(!check(&v, "alph", &b1, &p));
            if b1 != b2 {
                prop_assert!(!check(&v, "alpha", &b2, &p));
            }
            let mut bad = p;
            bad[flip] ^= 1;
            prop_assert!(!check(&v, "alpha", &b1, &bad));
            prop_assert!(!check(&v, "alpha", &b1, &p[..63]));
        }
    }
}
