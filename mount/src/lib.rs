//! `tardisfs`, the read-only FUSE view of a host's backups.
//!
//! It will present one directory per completed set, each the backed-up tree with its original
//! metadata, reading file data chunk by chunk through `tardis_core::view::Tree` and a bounded
//! cache of decrypted chunks.
