//! The QUIC layer: endpoint and transport settings, and reading and writing frames on quinn
//! streams. Everything protocol-specific is in `proto`; this module only moves its frames.

use crate::error::{Error, Result};
use crate::proto::{self, HEADER_LEN};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use serde::{de::DeserializeOwned, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tardis_core::login::BINDING_LEN;

/// How long a connection may be silent before it is considered dead. Keep-alives every
/// [`KEEP_ALIVE`] keep a healthy idle connection open; a link that is down this long makes
/// both ends drop the connection (the client then reconnects with backoff).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
pub const KEEP_ALIVE: Duration = Duration::from_secs(4);

/// Most streams a client may have open at once on one connection (the server's memory bound
/// is this times [`proto::MAX_FRAME`] per connection, and a global budget on top).
pub const MAX_STREAMS: u32 = 16;

/// Application close code: the server is stopping (clients retry).
pub const CLOSE_SHUTDOWN: u32 = 1;
/// Application close code: a protocol violation or a failed login.
pub const CLOSE_PROTOCOL: u32 = 2;
/// Application close code: the client is done.
pub const CLOSE_DONE: u32 = 0;

/// Label of the TLS exporter value that logins sign (RFC 5705 / RFC 8446 section 7.5).
const BINDING_LABEL: &[u8] = b"EXPORTER-tardis-login-v1";

/// Environment variable that picks another congestion controller (`cubic` or `newreno`)
/// instead of BBR, on whichever end reads it; for measuring and for links where BBR
/// misbehaves. See `docs/PROTOCOL.md`.
pub const CONGESTION_ENV: &str = "TARDIS_QUIC_CONGESTION";

/// Transport settings for both ends, tuned for lossy, high-latency links (see
/// `docs/PROTOCOL.md`): BBR congestion control, which does not read every lost packet as
/// congestion the way NewReno and CUBIC do; flow-control windows large enough for a
/// 100 ms round trip at 100 Mbit/s; keep-alives well inside the idle timeout.
pub fn transport_config() -> TransportConfig {
    let mut t = TransportConfig::default();
    match std::env::var(CONGESTION_ENV).as_deref() {
        Ok("cubic") => t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default())),
        Ok("newreno") => t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default())),
        _ => t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default())),
    };
    t.max_idle_timeout(Some(IdleTimeout::try_from(IDLE_TIMEOUT).expect("20 s is a valid idle timeout")));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.stream_receive_window(VarInt::from_u32(4 << 20));
    t.receive_window(VarInt::from_u32(RECEIVE_WINDOW));
    t.send_window(16 << 20);
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t
}

/// Connection receive window of the server before a client has logged in: room for the
/// handshake frames (at most 64 KiB each), not for megabytes that nobody reads. With the full
/// window, each connection of a flood could park 16 MiB in the server's buffers.
pub const PRE_LOGIN_WINDOW: u32 = 256 << 10;
/// Streams a client may open before it has logged in.
pub const PRE_LOGIN_STREAMS: u32 = 4;
/// Full receive window of a logged-in connection (see [`transport_config`]).
pub const RECEIVE_WINDOW: u32 = 16 << 20;

/// The server's settings: [`transport_config`], narrowed until login ([`open_up`]).
pub fn server_transport_config() -> TransportConfig {
    let mut t = transport_config();
    t.receive_window(VarInt::from_u32(PRE_LOGIN_WINDOW));
    t.max_concurrent_bidi_streams(VarInt::from_u32(PRE_LOGIN_STREAMS));
    t
}

/// Gives a connection that has logged in the full window and stream count.
pub fn open_up(conn: &quinn::Connection) {
    conn.set_receive_window(VarInt::from_u32(RECEIVE_WINDOW));
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(MAX_STREAMS));
}

/// Socket buffer size asked for on both ends. At the kernel's default (208 KiB) a burst of
/// QUIC packets overflows the receiving socket on a fast link: 39% of datagrams were dropped
/// there in a loopback backup, each one a retransmission. The kernel caps the request at
/// `net.core.rmem_max`/`wmem_max` unless the process may raise it (root).
pub const SOCKET_BUFFER: usize = 4 << 20;

/// A UDP socket bound to `addr` with large receive and send buffers (best effort: a smaller
/// buffer than asked for is logged, not an error).
pub fn udp_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    let sock = std::net::UdpSocket::bind(addr)?;
    if setsockopt(&sock, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(&sock, sockopt::RcvBuf, &SOCKET_BUFFER);
    }
    if setsockopt(&sock, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(&sock, sockopt::SndBuf, &SOCKET_BUFFER);
    }
    if let Ok(got) = getsockopt(&sock, sockopt::RcvBuf) {
        // Linux reports twice the usable size it granted.
        if got < SOCKET_BUFFER {
            tracing::debug!(
                "UDP receive buffer is {got} bytes; raise net.core.rmem_max to {SOCKET_BUFFER} for fast links"
            );
        }
    }
    Ok(sock)
}

/// The value a login proof is bound to: exported from this connection's TLS session, so it
/// differs in every session and on each side of a machine in the middle.
pub fn binding(conn: &quinn::Connection) -> Result<[u8; BINDING_LEN]> {
    let mut out = [0u8; BINDING_LEN];
    conn.export_keying_material(&mut out, BINDING_LABEL, b"")
        .map_err(|_| Error::Tls("exporting the session's binding value failed".into()))?;
    Ok(out)
}

/// Writes one frame.
pub async fn write_frame<T: Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<()> {
    send.write_all(&proto::encode(msg)).await.map_err(write_error)
}

/// A connection that goes away mid-write is classified like one that goes away mid-read, so a
/// server restart during an upload is retried rather than reported as a protocol error.
fn write_error(e: quinn::WriteError) -> Error {
    match e {
        quinn::WriteError::ConnectionLost(c) => lost(c),
        other => Error::Protocol(format!("sending: {other}")),
    }
}

/// Reads a frame header: `None` if the stream ended cleanly before one.
pub async fn read_header(recv: &mut quinn::RecvStream, limit: usize) -> Result<Option<usize>> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => Ok(Some(proto::body_len(header, limit)?)),
        Err(quinn::ReadExactError::FinishedEarly(0)) => Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            Err(Error::Protocol(format!("stream ended after {n} bytes of a frame header")))
        }
        Err(quinn::ReadExactError::ReadError(e)) => Err(read_error(e)),
    }
}

/// Reads a frame body of `len` bytes (from [`read_header`]) and decodes it.
pub async fn read_body<T: DeserializeOwned>(recv: &mut quinn::RecvStream, len: usize) -> Result<T> {
    let mut body = vec![0u8; len];
    match recv.read_exact(&mut body).await {
        Ok(()) => proto::decode(&body),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            Err(Error::Protocol(format!("stream ended after {n} of {len} bytes of a frame")))
        }
        Err(quinn::ReadExactError::ReadError(e)) => Err(read_error(e)),
    }
}

/// Reads one whole frame; `None` if the stream ended cleanly before it.
pub async fn read_frame<T: DeserializeOwned>(recv: &mut quinn::RecvStream, limit: usize) -> Result<Option<T>> {
    match read_header(recv, limit).await? {
        None => Ok(None),
        Some(len) => read_body(recv, len).await.map(Some),
    }
}

fn read_error(e: quinn::ReadError) -> Error {
    match e {
        quinn::ReadError::ConnectionLost(c) => lost(c),
        other => Error::Protocol(format!("receiving: {other}")),
    }
}

/// Classifies a connection failure: a server that is stopping, a link that went away, or a
/// peer that closed on purpose.
pub fn lost(e: quinn::ConnectionError) -> Error {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(CLOSE_SHUTDOWN) => {
            Error::Server { code: proto::ErrorCode::ShuttingDown, message: "the server is shutting down".into() }
        }
        quinn::ConnectionError::ApplicationClosed(c) => {
            Error::Protocol(format!("the server closed the connection: {}", String::from_utf8_lossy(&c.reason)))
        }
        other => Error::Lost { server: String::new(), reason: other.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{self, ServerIdentity, Trust};
    use std::sync::Arc;

    /// A server endpoint and a client connected to it, both on loopback.
    async fn pair(dir: &std::path::Path) -> (quinn::Endpoint, quinn::Connection, quinn::Connection) {
        let id = ServerIdentity::load_or_generate(&dir.join("cert.pem"), &dir.join("key.pem"), &["localhost".into()])
            .unwrap();
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(id.server_config().unwrap()).unwrap();
        let server =
            quinn::Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(quic)), "127.0.0.1:0".parse().unwrap())
                .unwrap();
        let (tls, _) = tls::client_config(&Trust::KnownHosts(dir.join("known_hosts")), "localhost").unwrap();
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
        let connecting = client.connect(server.local_addr().unwrap(), "localhost").unwrap();
        let (c, s) = tokio::join!(connecting, async { server.accept().await.unwrap().await });
        (server, c.unwrap(), s.unwrap())
    }

    #[tokio::test]
    async fn a_shutdown_that_arrives_mid_write_is_transient() {
        let dir = tempfile::tempdir().unwrap();
        let (_server, client, server_side) = pair(dir.path()).await;
        let (mut send, _recv) = client.open_bi().await.unwrap();
        server_side.close(CLOSE_SHUTDOWN.into(), b"server shutting down");
        // Keep writing until the close arrives: each frame is larger than the flow-control
        // window, so the write waits on the peer and sees the connection go.
        let big = vec![0u8; 4 << 20];
        let err = loop {
            if let Err(e) = write_frame(&mut send, &serde_bytes::ByteBuf::from(big.clone())).await {
                break e;
            }
        };
        assert!(err.is_transient(), "{err}");
        assert!(matches!(err, Error::Server { code: proto::ErrorCode::ShuttingDown, .. }), "{err:?}");
    }
}
