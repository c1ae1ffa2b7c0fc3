/// Result alias of the `tardis-server` crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can stop the daemon from starting or serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration file or an option is invalid.
    #[error("configuration: {0}")]
    Config(String),
    #[error("{what} {}: {source}", path.display())]
    Io { what: &'static str, path: std::path::PathBuf, source: std::io::Error },
    #[error(transparent)]
    Net(#[from] tardis_net::Error),
    #[error(transparent)]
    Log(#[from] tardis_log::Error),
    /// Another daemon holds the pidfile.
    #[error("tardisd is already running as pid {pid} (pidfile {}); stop it first", path.display())]
    Running { pid: i32, path: std::path::PathBuf },
}
