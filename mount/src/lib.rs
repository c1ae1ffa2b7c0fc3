//! `tardisfs`, the read-only FUSE view of a host's backups.
//!
//! The root of the mount has one directory per completed set, named after the set, each the
//! backed-up tree as it was with its original metadata and extended attributes; `latest`
//! links to the latest set and `.versions/<path>` lists every distinct version of a path. File
//! data is read chunk by chunk through `tardis_core::view` and a bounded cache of decoded
//! chunks, so opening a file in a huge set costs a few index lookups, not a walk.
//!
//! - [`fs`]: the FUSE operations ([`TardisFs`]).
//! - [`inodes`]: the lazily filled inode table.
//! - [`cache`]: byte ranges to chunks, and the decoded-chunk cache.
//! - [`sets`]: which sets the root shows, under which names.
//! - [`session`]: mounting, request threads, unmounting on signals.
//! - [`daemon`]: going to the background once the mount is up.
//! - [`options`]: the seed's `-o database=…,host=…,password=…` options.
//!
//! The file system reads only through `tardis_core::api::Repository`, so a remote repository
//! will serve the same view.

pub mod cache;
pub mod daemon;
mod error;
pub mod fs;
pub mod inodes;
pub mod options;
pub mod session;
pub mod sets;

pub use error::{Error, Result};
pub use fs::{FsConfig, TardisFs};
pub use session::{serve, MountConfig, Signals};
