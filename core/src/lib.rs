//! Tardis core: everything about a backup that can be said without touching a disk or a socket.
//!
//! - [`chunk`]: content-defined chunking (FastCDC) of file data.
//! - [`crypto`]: the per-host key hierarchy, keyed BLAKE3 identifiers and AES-256-GCM-SIV sealing.
//! - [`keywrap`]: Argon2id wrapping of the random master key with the user's password.
//! - [`login`]: the Ed25519 login key derived from the password, and the verifier a server keeps.
//! - [`compress`]: zstd with a stored-uncompressed fallback.
//! - [`chunkcodec`]: the whole chunk pipeline (compress, seal, self-check) and its inverse.
//! - [`event`]: the immutable events that make up a host's repository log.
//! - [`meta`]: the file metadata that is sealed inside a file-version event.
//! - [`config`]: the per-host configuration keys, their types and defaults (retention schedule).
//! - [`retention`]: which sets a purge removes, as pure functions.
//! - [`api`]: the repository trait that the embedded log and the network client both implement.
//! - [`view`]: path resolution, directory listing and file reads on top of that trait.
//!
//! Nothing here performs I/O; the `log` crate stores what this crate encodes.

pub mod api;
pub mod chunk;
pub mod chunkcodec;
pub mod compress;
pub mod config;
pub mod crypto;
mod error;
pub mod event;
pub mod ids;
pub mod keywrap;
pub mod login;
pub mod meta;
pub mod retention;
pub mod setseal;
pub mod view;

pub use error::{chain, random_bytes, Error, Result};

/// Version of the repository format that this build writes. Readers refuse higher versions.
pub const FORMAT_VERSION: u16 = 1;
