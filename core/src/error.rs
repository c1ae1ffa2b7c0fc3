use std::fmt;

/// Result alias used throughout `tardis-core`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure the core logic can report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The password does not unwrap the host's master key.
    #[error("wrong password")]
    WrongPassword,
    /// Authenticated decryption failed: the record was altered, moved or belongs elsewhere.
    #[error("authentication failed for {what}: the stored bytes were altered or moved")]
    Tampered { what: String },
    /// Bytes that should follow a known layout do not.
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    /// A record or blob declares a version this build does not understand.
    #[error("unsupported {what} version {version} (this build reads up to {supported}); upgrade tardis")]
    UnsupportedVersion { what: &'static str, version: u32, supported: u32 },
    /// Key-derivation parameters are below the safety floor or above the resource ceiling.
    #[error("refusing key-derivation parameters {0}")]
    WeakParameters(String),
    /// A chunk failed its pre-store self-check (decrypt, decompress, re-hash).
    #[error("self-check failed for chunk {id}: {reason}")]
    SelfCheck { id: String, reason: String },
    /// The operating system's random source failed.
    #[error("random source failed: {0}")]
    Random(String),
    /// A path, set or entry that was asked for does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// An error from the repository behind the [`crate::api::Repository`] trait.
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    /// An operation that is not valid in the current state.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn malformed(what: &'static str, reason: impl fmt::Display) -> Self {
        Error::Malformed { what, reason: reason.to_string() }
    }
}

/// Fills `buf` from the operating system's random source.
pub fn random_bytes(buf: &mut [u8]) -> Result<()> {
    getrandom::getrandom(buf).map_err(|e| Error::Random(e.to_string()))
}

/// An error and its sources on one line, `what: why: cause`, leaving out a source whose text
/// its parent already includes. Every Tardis program reports errors this way.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}
