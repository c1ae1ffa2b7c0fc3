//! `tardis-tools` and `regenerate`: everything a user does with a repository besides backing up.
//!
//! - [`select`]: choosing a set by name or by time.
//! - [`regenerate`]: restoring files and trees bit-exact with their metadata.
//! - [`listing`]: `sets`, `ls` and `ls --versions`.
//! - [`diff`]: what changed between two sets.
//! - [`verify`]: proving that every kept set can be restored, or naming what cannot.
//!
//! All of it but `verify` reads through [`tardis_core::api::Repository`] and
//! [`tardis_core::view::Tree`]; `verify` also asks the embedded repository to check its log
//! and index (`tardis_log::Repo::check_index`) and walks the index's entries.

pub mod diff;
pub mod listing;
pub mod regenerate;
pub mod select;
pub mod verify;
