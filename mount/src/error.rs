//! The mount's error type. Inside the file system every error ends up as an errno for the
//! kernel ([`Error::errno`]); outside it (options, opening the repository, mounting) the message
//! is what the user sees, so each variant says what was being done to what.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// Result alias of `tardis-mount`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the mount library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The command line or a `-o` option cannot be used as given (exit status 2).
    #[error("{0}")]
    Usage(String),
    /// An operating-system call on a path failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// SIGINT, SIGTERM or SIGHUP came before the mount was up; nothing is left mounted.
    #[error("interrupted by a signal before the mount was up")]
    Interrupted,
    /// The background mount process did not come up; the message is what it reported.
    #[error("{0}")]
    Daemon(String),
    /// Opening the repository or the host's keys failed (wrong password, no such host, ...).
    #[error(transparent)]
    Client(#[from] tardis_client::Error),
    /// Reading the repository failed: an index or segment error, or an entry that does not
    /// decrypt.
    #[error(transparent)]
    Core(#[from] tardis_core::Error),
    /// A chunk could not be read or decoded. Shared, because every reader that waited for the
    /// same chunk gets the same failure.
    #[error("reading chunk: {0}")]
    Chunk(#[source] Arc<tardis_core::Error>),
}

impl Error {
    /// Wraps an I/O error with the operation and the path it was done to.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io { op, path: path.into(), source }
    }

    /// The errno a file-system operation that failed with this error returns. Anything that
    /// is not a plain "not there" is EIO: a damaged chunk must never read as zeros or as
    /// success.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Core(tardis_core::Error::NotFound(_)) => libc::ENOENT,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damage_is_eio_and_absence_is_enoent() {
        let tampered = tardis_core::Error::Tampered { what: "chunk".into() };
        assert_eq!(Error::Chunk(Arc::new(tampered)).errno(), libc::EIO);
        assert_eq!(Error::Core(tardis_core::Error::NotFound("x".into())).errno(), libc::ENOENT);
        let e = Error::io("opening", "/x", io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(e.errno(), libc::EACCES);
        assert!(e.to_string().starts_with("opening /x: "), "{e}");
    }
}
