//! The messages of the Tardis protocol and their framing, free of any I/O.
//!
//! Every QUIC stream carries one exchange: the client opens a bidirectional stream, sends one
//! [`Request`] frame and finishes its side; the server answers with one or more [`Response`]
//! frames (several only for [`Request::List`], whose pages end with `last: true`) and
//! finishes. A frame is a 4-byte big-endian length followed by that many bytes of
//! MessagePack. Lengths are checked against a limit before anything is allocated.
//! `docs/PROTOCOL.md` specifies each message.

use crate::error::{Error, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tardis_core::api::{EntryVersion, HostInfo, HostKey, SetInfo, StoredChunk, Write};
use tardis_core::event::{FileVersion, SetStats};
use tardis_core::ids::{ChunkId, DirId, HostId, NameKey, SetId};

/// The protocol versions this build speaks. The client offers a range in [`Request::Hello`];
/// the server picks the highest version both speak or refuses with [`ErrorCode::Version`].
/// Version 2 added delta chunks (`EncodedChunk::delta`, `ChunkStored::delta`); a version-1 peer
/// could neither send nor read them, so it is no longer spoken.
pub const PROTOCOL_MIN: u16 = 3;
pub const PROTOCOL_MAX: u16 = 3;

/// TLS application protocol name. It stays the same across protocol versions, so that an
/// incompatible client gets a readable refusal from the `Hello` exchange, not a TLS alert.
pub const ALPN: &[u8] = b"tardis";

/// Default UDP port of `tardisd` (the seed's port).
pub const DEFAULT_PORT: u16 = 7430;

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// Largest frame either side accepts: one maximal chunk (4 MiB, plus what compression and
/// sealing may add) with room to spare. Upload batches are cut to stay well below it.
pub const MAX_FRAME: usize = 8 << 20;

/// Largest frame accepted before login: nothing before login needs more, and an
/// unauthenticated peer gets no large buffers.
pub const MAX_HANDSHAKE_FRAME: usize = 64 << 10;

/// Target size of one upload request: chunks are sent in requests of about this many bytes,
/// several at once on parallel streams.
pub const UPLOAD_BATCH: usize = 2 << 20;

/// Most entries in one page of a directory listing.
pub const LIST_PAGE: usize = 4096;

/// Who is connecting, for the server's log and for the message a second backup of the same
/// host gets ("host X is being backed up by ...").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// Program and version, e.g. `tardis 0.1.0`.
    pub software: String,
    /// The machine the client runs on.
    pub machine: String,
    pub pid: u32,
}

impl std::fmt::Display for ClientInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (pid {} on {})", self.software, self.pid, self.machine)
    }
}

/// A random value that names one client run across reconnections: a resumed connection
/// presenting it takes over the run's claim on its host.
pub type SessionToken = [u8; 16];

/// What the client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// First exchange of every connection.
    Hello {
        min: u16,
        max: u16,
        software: String,
    },
    /// The public header of the host's wrapped key (salt and Argon2id parameters), so that
    /// the client can derive its login key. Answered before login.
    KeyHeader {
        host: String,
    },
    /// Proves the password of `host`: `proof` is a `login::LoginKey` signature over the host
    /// name and the TLS session's exported binding value.
    Login {
        host: String,
        client: ClientInfo,
        session: SessionToken,
        proof: ByteBuf,
    },
    /// Creates `host` (where the server allows new hosts) and logs in as it; `proof` is made
    /// with the login key behind `key.verifier`.
    CreateHost {
        host: String,
        host_id: HostId,
        key: HostKey,
        client: ClientInfo,
        session: SessionToken,
        proof: ByteBuf,
    },
    // After login; each maps to the `Repository` method of the same name.
    Host,
    SetWrappedKey {
        key: HostKey,
    },
    Sets,
    Lookup {
        set: SetId,
        dir: DirId,
        name: NameKey,
    },
    List {
        set: SetId,
        dir: DirId,
    },
    History {
        dir: DirId,
        name: NameKey,
    },
    ReadChunk {
        id: ChunkId,
    },
    MissingChunks {
        ids: Vec<ChunkId>,
    },
    OpenSet {
        name: String,
        priority: u32,
    },
    Append {
        set: SetId,
        writes: Vec<Write>,
    },
    CompleteSet {
        set: SetId,
        stats: SetStats,
        /// The client's seal of the set (`tardis_core::setseal`); added in protocol 3.
        seal: Option<ByteBuf>,
    },
    Config,
    SetConfig {
        key: String,
        value: Option<String>,
    },
    SetLocked {
        set: SetId,
        locked: bool,
    },
    PurgeSets {
        sets: Vec<SetId>,
    },
}

impl Request {
    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::KeyHeader { .. } => "key-header",
            Request::Login { .. } => "login",
            Request::CreateHost { .. } => "create-host",
            Request::Host => "host",
            Request::SetWrappedKey { .. } => "set-wrapped-key",
            Request::Sets => "sets",
            Request::Lookup { .. } => "lookup",
            Request::List { .. } => "list",
            Request::History { .. } => "history",
            Request::ReadChunk { .. } => "read-chunk",
            Request::MissingChunks { .. } => "missing-chunks",
            Request::OpenSet { .. } => "open-set",
            Request::Append { .. } => "append",
            Request::CompleteSet { .. } => "complete-set",
            Request::Config => "config",
            Request::SetConfig { .. } => "set-config",
            Request::SetLocked { .. } => "set-locked",
            Request::PurgeSets { .. } => "purge-sets",
        }
    }
}

/// Why the server refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// No protocol version in common.
    Version,
    /// A request that is not valid at this point (e.g. before login), or malformed.
    Protocol,
    /// Wrong password, or a host that has no verifier.
    Auth,
    /// The host does not exist.
    NoHost,
    /// The server does not create hosts (no `AllowNewHosts`).
    NewHostsNotAllowed,
    /// Another client is backing up the same host.
    Busy,
    /// The repository refused the operation (a broken rule, a missing chunk, a full disk).
    Refused,
    /// What was asked for does not exist.
    NotFound,
    /// The server is stopping; retry later.
    ShuttingDown,
    /// The server failed; its log says why.
    Internal,
    /// A code from a newer server.
    #[serde(other)]
    Unknown,
}

/// What the server answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Welcome {
        version: u16,
        software: String,
        allow_new_hosts: bool,
    },
    /// `None`: no such host.
    KeyHeader {
        header: Option<ByteBuf>,
    },
    LoggedIn {
        info: HostInfo,
    },
    Host {
        info: Option<HostInfo>,
    },
    Done,
    Sets {
        sets: Vec<SetInfo>,
    },
    Version {
        version: Option<FileVersion>,
    },
    Page {
        versions: Vec<FileVersion>,
        last: bool,
    },
    History {
        versions: Vec<EntryVersion>,
    },
    Chunk {
        chunk: StoredChunk,
    },
    Missing {
        ids: Vec<ChunkId>,
    },
    SetOpened {
        set: SetId,
    },
    Config {
        values: std::collections::BTreeMap<String, String>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// Encodes a message as one frame (header and body).
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    // Encoding into a Vec cannot fail for these types: every field is a plain value.
    rmp_serde::encode::write(&mut out, msg).expect("protocol messages always encode");
    let len = (out.len() - HEADER_LEN) as u32;
    out[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    out
}

/// The body length announced by a frame header, refused if it exceeds `limit`.
pub fn body_len(header: [u8; HEADER_LEN], limit: usize) -> Result<usize> {
    let len = u32::from_be_bytes(header) as usize;
    if len > limit {
        return Err(Error::Protocol(format!("frame of {len} bytes exceeds the limit of {limit}")));
    }
    Ok(len)
}

/// Decodes a frame body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    rmp_serde::from_slice(body).map_err(|e| Error::Protocol(format!("malformed message: {e}")))
}

/// Decodes a whole frame held in one buffer (header included); for tests and fuzzing.
pub fn decode_frame<T: DeserializeOwned>(frame: &[u8], limit: usize) -> Result<T> {
    let header: [u8; HEADER_LEN] = frame
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| Error::Protocol("truncated frame header".into()))?;
    let len = body_len(header, limit)?;
    let body = &frame[HEADER_LEN..];
    if body.len() != len {
        return Err(Error::Protocol(format!("frame announces {len} bytes but holds {}", body.len())));
    }
    decode(body)
}

/// Splits upload writes into requests: chunks into groups of about [`UPLOAD_BATCH`] bytes
/// that can travel in parallel, and the versions and deletions that reference them, in their
/// original order, into groups that fit a frame. The caller sends every chunk group before
/// the first version group, so a version never arrives before its chunks.
pub fn split_writes(writes: Vec<Write>) -> (Vec<Vec<Write>>, Vec<Vec<Write>>) {
    let mut chunk_groups = Vec::new();
    let mut entry_groups = Vec::new();
    let (mut chunks, mut chunk_bytes) = (Vec::new(), 0usize);
    let (mut entries, mut entry_bytes) = (Vec::new(), 0usize);
    for w in writes {
        match &w {
            Write::Chunk(c) => {
                let n = c.body.len() + 64;
                if chunk_bytes + n > UPLOAD_BATCH && !chunks.is_empty() {
                    chunk_groups.push(std::mem::take(&mut chunks));
                    chunk_bytes = 0;
                }
                chunk_bytes += n;
                chunks.push(w);
            }
            Write::Version(v) => {
                let n = v.meta.len() + v.extents.len() * 64 + 96;
                if entry_bytes + n > UPLOAD_BATCH && !entries.is_empty() {
                    entry_groups.push(std::mem::take(&mut entries));
                    entry_bytes = 0;
                }
                entry_bytes += n;
                entries.push(w);
            }
            Write::Delete(_) => {
                entry_bytes += 96;
                entries.push(w);
            }
        }
    }
    if !chunks.is_empty() {
        chunk_groups.push(chunks);
    }
    if !entries.is_empty() {
        entry_groups.push(entries);
    }
    (chunk_groups, entry_groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tardis_core::chunkcodec::EncodedChunk;
    use tardis_core::event::{EntryDeleted, Extent};

    fn arb_id<const N: usize>() -> impl Strategy<Value = [u8; N]> {
        any::<[u8; N]>()
    }

    fn arb_write() -> impl Strategy<Value = Write> {
        prop_oneof![
            (
                arb_id::<32>(),
                any::<u32>(),
                any::<u8>(),
                proptest::collection::vec(any::<u8>(), 0..300),
                proptest::option::of((arb_id::<32>(), any::<u8>()))
            )
                .prop_map(|(id, plain_len, encoding, body, delta)| Write::Chunk(EncodedChunk {
                    id: ChunkId(id),
                    plain_len,
                    encoding,
                    body,
                    delta: delta.map(|(b, depth)| tardis_core::event::DeltaBase { base: ChunkId(b), depth })
                })),
            (
                any::<u64>(),
                arb_id::<16>(),
                arb_id::<16>(),
                proptest::collection::vec(any::<u8>(), 0..100),
                any::<u64>()
            )
                .prop_map(|(set, d, n, meta, off)| Write::Version(FileVersion {
                    set,
                    dir: DirId(d),
                    name: NameKey(n),
                    extents: vec![Extent { offset: off, len: 7, id: ChunkId([1; 32]) }],
                    meta: ByteBuf::from(meta),
                })),
            (any::<u64>(), arb_id::<16>(), arb_id::<16>()).prop_map(|(set, d, n)| Write::Delete(EntryDeleted {
                set,
                dir: DirId(d),
                name: NameKey(n)
            })),
        ]
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (any::<u16>(), any::<u16>(), ".{0,20}").prop_map(|(min, max, software)| Request::Hello {
                min,
                max,
                software
            }),
            ".{0,40}".prop_map(|host| Request::KeyHeader { host }),
            (".{0,20}", arb_id::<16>(), proptest::collection::vec(any::<u8>(), 0..80)).prop_map(
                |(host, session, p)| {
                    Request::Login {
                        host,
                        client: ClientInfo { software: "t".into(), machine: "m".into(), pid: 4 },
                        session,
                        proof: ByteBuf::from(p),
                    }
                }
            ),
            Just(Request::Sets),
            (any::<u64>(), arb_id::<16>(), arb_id::<16>()).prop_map(|(set, d, n)| Request::Lookup {
                set,
                dir: DirId(d),
                name: NameKey(n)
            }),
            proptest::collection::vec(arb_id::<32>(), 0..20)
                .prop_map(|ids| Request::MissingChunks { ids: ids.into_iter().map(ChunkId).collect() }),
            (any::<u64>(), proptest::collection::vec(arb_write(), 0..10))
                .prop_map(|(set, writes)| Request::Append { set, writes }),
            (".{0,20}", any::<u32>()).prop_map(|(name, priority)| Request::OpenSet { name, priority }),
            (".{0,20}", proptest::option::of(".{0,20}")).prop_map(|(key, value)| Request::SetConfig { key, value }),
            (any::<u64>(), any::<bool>()).prop_map(|(set, locked)| Request::SetLocked { set, locked }),
            proptest::collection::vec(any::<u64>(), 0..10).prop_map(|sets| Request::PurgeSets { sets }),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(req in arb_request()) {
            let frame = encode(&req);
            prop_assert_eq!(decode_frame::<Request>(&frame, MAX_FRAME).unwrap(), req);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_frame::<Request>(&bytes, MAX_FRAME);
            let _ = decode::<Response>(&bytes);
        }

        #[test]
        fn truncated_frames_are_errors(req in arb_request(), cut in 1usize..50) {
            let frame = encode(&req);
            let cut = cut.min(frame.len());
            prop_assert!(decode_frame::<Request>(&frame[..frame.len() - cut], MAX_FRAME).is_err());
        }

        #[test]
        fn split_keeps_every_write_in_order(writes in proptest::collection::vec(arb_write(), 0..60)) {
            let (chunks, entries) = split_writes(writes.clone());
            let is_chunk = |w: &Write| matches!(w, Write::Chunk(_));
            let want_chunks: Vec<_> = writes.iter().filter(|w| is_chunk(w)).cloned().collect();
            let want_entries: Vec<_> = writes.iter().filter(|w| !is_chunk(w)).cloned().collect();
            prop_assert_eq!(chunks.concat(), want_chunks);
            prop_assert_eq!(entries.concat(), want_entries);
            prop_assert!(chunks.iter().chain(&entries).all(|g| !g.is_empty()));
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_reading() {
        let header = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(body_len(header, MAX_FRAME), Err(Error::Protocol(_))));
        assert_eq!(body_len(100u32.to_be_bytes(), MAX_FRAME).unwrap(), 100);
    }

    #[test]
    fn unknown_error_codes_decode_as_unknown() {
        // A newer server's code: same frame shape, a variant name this build lacks.
        #[derive(Serialize)]
        enum Future {
            Error { code: &'static str, message: String },
        }
        let frame = encode(&Future::Error { code: "SomethingNew", message: "m".into() });
        let r: Response = decode_frame(&frame, MAX_FRAME).unwrap();
        assert_eq!(r, Response::Error { code: ErrorCode::Unknown, message: "m".into() });
    }
}
