use std::io;
use std::path::PathBuf;

/// Result alias of `tardis-log`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the repository engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The repository's disk is full; nothing after the last durable batch was kept.
    #[error("repository disk full while {op} {}: free space and run again", path.display())]
    DiskFull { op: &'static str, path: PathBuf },
    /// A stored record is damaged. Never repaired silently; `verify` lists what depends on it.
    #[error("corrupt record in segment {segment} at offset {offset}: {reason}")]
    Corrupt { segment: u64, offset: u64, reason: String },
    /// A previous write or fsync failed; the log accepts no writes until it is reopened.
    #[error("repository refuses writes after an earlier write failure; reopen it to recover")]
    Poisoned,
    /// Another process holds the repository.
    #[error("repository {} is locked by another process (pid {pid}); wait for it to finish", path.display())]
    Locked { path: PathBuf, pid: String },
    /// The RocksDB index failed.
    #[error("index {op}: {source}")]
    Index {
        op: &'static str,
        #[source]
        source: rocksdb::Error,
    },
    /// A file or record carries a version this build cannot read.
    #[error("unsupported {what} version {found} (this build reads up to {supported}); upgrade tardis")]
    Version { what: &'static str, found: u32, supported: u32 },
    /// A request that breaks the repository's rules (unknown set, missing chunk, ...).
    #[error("{0}")]
    Refused(String),
    /// The host has no repository yet.
    #[error("host {0} has no backups here; check --host and --db, or make a first backup")]
    NoHost(String),
    /// An error from the core codecs.
    #[error(transparent)]
    Core(#[from] tardis_core::Error),
}

impl Error {
    /// Wraps an I/O error with what was being done to which path; ENOSPC becomes `DiskFull`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(28) {
            return Error::DiskFull { op, path };
        }
        Error::Io { op, path, source }
    }

    pub(crate) fn index(op: &'static str) -> impl FnOnce(rocksdb::Error) -> Error {
        move |source| Error::Index { op, source }
    }
}

impl From<Error> for tardis_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Core(c) => c,
            other => tardis_core::Error::Backend(Box::new(other)),
        }
    }
}
