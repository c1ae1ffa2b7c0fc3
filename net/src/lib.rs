//! The Tardis wire protocol and its QUIC transport.
//!
//! This crate will hold, in order of dependency: `proto` — the message types, their codec with
//! size limits checked before allocating, and the version handshake, free of any I/O; and a thin
//! layer over quinn and rustls (TLS 1.3) that carries those messages, with certificate pinning
//! on first use. Remote clients implement `tardis_core::api::Repository` on top of it, so the
//! backup, restore and mount code is the same for local and remote repositories.
//! See `docs/PROTOCOL.md` once the protocol lands.
