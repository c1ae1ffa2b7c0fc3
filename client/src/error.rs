//! The client's error type. Every variant names what was being done and to which file, because a
//! backup walks many thousands of paths and "permission denied" alone tells the user nothing.

use std::io;
use std::path::PathBuf;

/// Result alias of `tardis-client`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the client library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call on a local path failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An exclusion pattern does not parse. `line` is 1-based; 0 means the file as a whole.
    #[error("bad exclude pattern in {file} line {line}: {reason}")]
    Pattern { file: String, line: usize, reason: String },
    /// The password does not open the host's key.
    #[error("wrong password for host {host}")]
    WrongPassword { host: String },
    /// The request cannot be carried out as given; the message says what to change.
    #[error("{0}")]
    Invalid(String),
    /// An error from the core codecs or the repository behind the `Repository` trait.
    #[error(transparent)]
    Core(#[from] tardis_core::Error),
    /// Connecting to or logging in at `tardisd`.
    #[error(transparent)]
    Net(#[from] tardis_net::Error),
}

impl Error {
    /// Wraps an I/O error with the operation ("reading xattrs of") and the path it was done to.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io { op, path: path.into(), source }
    }

    /// Returns a closure for `map_err` that wraps an I/O error like [`Error::io`].
    pub(crate) fn io_at<'a>(op: &'static str, path: &'a std::path::Path) -> impl FnOnce(io::Error) -> Error + 'a {
        move |source| Error::io(op, path, source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_operation_path_and_cause() {
        let e = Error::io("reading xattrs of", "/x", io::Error::from_raw_os_error(13));
        let msg = e.to_string();
        assert!(msg.starts_with("reading xattrs of /x: "), "{msg}");
        assert!(std::error::Error::source(&e).is_some());

        let e = Error::Pattern { file: "/etc/tardis/excludes".into(), line: 3, reason: "unclosed [".into() };
        assert_eq!(e.to_string(), "bad exclude pattern in /etc/tardis/excludes line 3: unclosed [");

        let e: Error = tardis_core::Error::NotFound("set x".into()).into();
        assert_eq!(e.to_string(), "set x not found");
    }
}
