//! The Tardis repository engine: one host's backups as an append-only log of immutable events
//! in segment files, with RocksDB indices derived from that log.
//!
//! - [`storage`]: where segment bytes live (a directory; fault injection in [`fault`]); [`bucket`]
//!   keeps sealed segments in an S3-compatible bucket.
//! - [`frame`]: the byte layout of segments and records.
//! - [`segments`]: the log itself: atomic batches, fsync discipline, tail recovery.
//! - [`index`]: the RocksDB views (chunks, sets, directory entries over set ranges, config).
//! - [`repo`]: [`Repo`], which ties them together and implements the shared
//!   [`tardis_core::api::Repository`] interface.
//!
//! The log is the truth; the index can always be rebuilt from it ([`Repo::rebuild_index`]).

pub mod bucket;
pub mod clock;
pub mod compact;
mod error;
pub mod fault;
pub mod frame;
pub mod index;
pub mod repo;
pub mod segments;
pub mod storage;

pub use compact::{CompactOptions, CompactReport};
pub use error::{Error, Result};
pub use index::IndexOptions;
pub use repo::{IndexCheck, ReplayStats, Repo, RepoOptions};
pub use segments::{LogOptions, Pos};
