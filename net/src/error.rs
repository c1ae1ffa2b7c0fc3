use crate::proto::ErrorCode;
use std::path::{Path, PathBuf};

/// Result alias of the `tardis-net` crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong between a client and `tardisd`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer sent bytes that are not a valid message at this point.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server refused a request and said why.
    #[error("{message}")]
    Server { code: ErrorCode, message: String },
    /// No connection could be made.
    #[error("cannot connect to {server}: {reason}")]
    Connect { server: String, reason: String },
    /// An established connection broke.
    #[error("connection to {server} lost: {reason}")]
    Lost { server: String, reason: String },
    /// The server's certificate differs from the one pinned on first use.
    #[error(
        "the certificate of {server} has changed (pinned {pinned}, offered {offered}); if it was replaced on \
         purpose, delete the line for {server} from {}; otherwise someone may be intercepting the connection",
        file.display()
    )]
    PinMismatch { server: String, pinned: String, offered: String, file: PathBuf },
    /// TLS setup or certificate files.
    #[error("TLS: {0}")]
    Tls(String),
    /// A file could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    /// A known-hosts file line that cannot be parsed.
    #[error("{}:{line}: {reason}", path.display())]
    KnownHosts { path: PathBuf, line: usize, reason: String },
    #[error(transparent)]
    Core(#[from] tardis_core::Error),
}

impl Error {
    pub(crate) fn io(what: &'static str, path: &Path, source: std::io::Error) -> Error {
        Error::Io { what, path: path.to_owned(), source }
    }

    /// Whether retrying on a new connection may succeed: the link or the server went away,
    /// or the server is restarting. Refusals and protocol errors are final.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Lost { .. } => true,
            Error::Server { code, .. } => *code == ErrorCode::ShuttingDown,
            _ => false,
        }
    }
}

impl From<Error> for tardis_core::Error {
    fn from(e: Error) -> tardis_core::Error {
        match e {
            Error::Core(c) => c,
            Error::Server { code: ErrorCode::NotFound, message } => tardis_core::Error::NotFound(message),
            other => tardis_core::Error::Backend(Box::new(other)),
        }
    }
}
