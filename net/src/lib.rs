//! The Tardis wire protocol and its QUIC transport.
//!
//! - [`proto`]: message types, framing with size limits checked before allocating, and the
//!   version range; no I/O, so it can be tested and fuzzed alone.
//! - [`tls`]: the server's certificate (self-signed on first start) and the client's trust
//!   in it: pinned on first use in a known-hosts file, or checked against a CA.
//! - [`transport`]: quinn endpoint settings and frame I/O on QUIC streams.
//! - [`client`]: connecting, logging in, and [`client::RemoteRepo`], the network
//!   implementation of `tardis_core::api::Repository`.
//!
//! `docs/PROTOCOL.md` specifies the protocol.

pub mod client;
mod error;
pub mod proto;
pub mod tls;
pub mod transport;

pub use error::{Error, Result};
