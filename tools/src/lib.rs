//! `tardis-tools` and `regenerate`: everything a user does with a repository besides backing up.
//!
//! - [`select`]: choosing a set by name or by time.
//! - [`regenerate`]: restoring files and trees bit-exact with their metadata.
//! - [`listing`]: `sets`, `ls` and `ls --versions`.
//! - [`diff`]: what changed between two sets.
//!
//! All of it reads through [`tardis_core::api::Repository`] and [`tardis_core::view::Tree`].

pub mod diff;
pub mod listing;
pub mod regenerate;
pub mod select;
