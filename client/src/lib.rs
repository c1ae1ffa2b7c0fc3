//! The Tardis client: everything that touches the backed-up machine's file system.
//!
//! - [`fsmeta`]: reading an entry's metadata (`lstat`, owners, xattrs), change detection and the
//!   data regions of sparse files.
//! - [`exclude`]: which entries a backup leaves out (pattern files, skip files, `CACHEDIR.TAG`).
//! - [`restore`]: writing entries and their metadata back to disk for `regenerate`.
//! - [`session`]: creating a host or unwrapping its key with the password.
//! - [`remote`]: the same against a `tardisd`: connect, log in, unwrap.
//! - [`seen`]: set seals and the newest set this client has seen, against rollbacks.
//! - [`backup`]: the walk that turns a tree into one backup set.
//! - [`purge`]: choosing sets by retention schedule, time or name, and purging them.
//! - [`cli`]: command-line options shared by all Tardis programs.

pub mod backup;
pub mod cli;
mod error;
pub mod exclude;
pub mod fsmeta;
mod prefetch;
pub mod purge;
pub mod remote;
pub mod restore;
pub mod seen;
pub mod session;

pub use error::{Error, Result};
