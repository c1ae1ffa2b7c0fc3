//! `tardisd`, the repository daemon.
//!
//! - [`config`]: `tardisd.cfg`, merged with the environment and the command line.
//! - [`service`]: the hosts' repositories (one `tardis_log::Repo` per host under `BaseDir`),
//!   login checks against each host's stored verifier, and the lease that allows one running
//!   backup per host; no networking, so it is tested directly.
//! - [`listener`]: the QUIC side: hello, login, and one task per request stream.
//! - [`jobs`]: scheduled compaction, and purging by priority when the disk runs low.
//! - [`daemon`]: starting (foreground or detached, pidfile) and stopping on a signal.

pub mod config;
pub mod daemon;
mod error;
pub mod jobs;
pub mod listener;
pub mod service;

pub use error::{Error, Result};
