//! The events of a host's repository log.
//!
//! Each event is one record in a segment: a one-byte kind (numeric tags below, never reused),
//! a one-byte payload version, a MessagePack payload ("meta") and, for chunks only, a body
//! holding the stored chunk bytes. Payload structs are encoded as MessagePack arrays; fields
//! are only ever added at the end with `#[serde(default)]`, so older records keep decoding.
//!
//! What the server can read in the clear is exactly what it needs to check references and run
//! retention: set numbers, names, priorities and times, chunk IDs and lengths, and the opaque
//! directory/name keys of entries. Names, modes, owners, times and xattrs of files are inside
//! the sealed `meta` of [`FileVersion`].

use crate::ids::{ChunkId, DirId, HostId, NameKey, SetId};
use crate::{Error, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// Numeric record kinds. Part of the on-disk format: never renumber or reuse.
pub mod kind {
    /// End of an atomic batch (framing; defined by the `log` crate).
    pub const BATCH_COMMIT: u8 = 1;
    pub const HOST_CREATED: u8 = 10;
    pub const KEY_WRAPPED: u8 = 11;
    pub const SET_OPENED: u8 = 20;
    pub const SET_COMPLETED: u8 = 21;
    pub const SET_PURGED: u8 = 22;
    pub const SET_LOCKED: u8 = 23;
    pub const CHUNK_STORED: u8 = 30;
    pub const FILE_VERSION: u8 = 40;
    pub const ENTRY_DELETED: u8 = 41;
    pub const CONFIG_CHANGED: u8 = 50;
    pub const SEGMENTS_COMPACTED: u8 = 60;
}

/// Payload version of the first format, and the one this build writes for every kind except
/// those listed in [`payload_version`].
pub const PAYLOAD_VERSION: u8 = 1;

/// The payload version this build writes (and the highest it reads) for a record kind. A kind's
/// version goes up when its payload gains a field, so that older builds refuse such records
/// with "upgrade tardis" instead of misreading them. `KeyWrapped` 2 adds `verifier`;
/// `ChunkStored` 2 adds `delta` (see [`Event::version`]).
pub fn payload_version(kind: u8) -> u8 {
    match kind {
        kind::KEY_WRAPPED | kind::CHUNK_STORED | kind::SET_COMPLETED => 2,
        _ => PAYLOAD_VERSION,
    }
}

/// A host's repository came into being.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCreated {
    pub host_id: HostId,
    pub name: String,
    /// Unix time in nanoseconds.
    pub created: i64,
    pub encrypted: bool,
}

/// The master key, wrapped with the host's password (see `keywrap`). The latest one wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyWrapped {
    pub blob: ByteBuf,
    /// The login verifier derived from the same password (`login`); absent in records written
    /// before format 1.1 added it.
    #[serde(default)]
    pub verifier: Option<crate::login::Verifier>,
}

/// A backup set was started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetOpened {
    pub set: SetId,
    pub name: String,
    pub priority: u32,
    /// Unix time in nanoseconds.
    pub started: i64,
    /// The completed set this one records changes against, if any.
    pub base: Option<SetId>,
}

/// Totals of a completed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SetStats {
    /// Entries in the set.
    pub entries: u64,
    /// Bytes of file data in the set.
    pub bytes: u64,
    /// Entries whose version was written by this set.
    pub changed: u64,
    /// Chunks this set added to the repository, and their stored size.
    pub new_chunks: u64,
    pub new_bytes: u64,
}

/// The commit point of a set: it exists (and is shown) once this record is durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetCompleted {
    pub set: SetId,
    /// Unix time in nanoseconds.
    pub finished: i64,
    pub stats: SetStats,
    /// The client's seal of the set (`setseal`), added in payload version 2. Absent in sets
    /// written without one, whose payload stays the version-1 array of three elements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<ByteBuf>,
}

/// A set was removed by purge; its records become garbage for compaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetPurged {
    pub set: SetId,
    pub time: i64,
}

/// A set was locked (never purged while locked) or unlocked. The latest event wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetLocked {
    pub set: SetId,
    pub locked: bool,
    pub time: i64,
}

/// The metadata of a stored chunk; the stored bytes are the record's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkStored {
    pub id: ChunkId,
    pub plain_len: u32,
    /// `chunkcodec::ENC_*` flags.
    pub encoding: u8,
    /// For a chunk stored as a delta: the chunk it applies to. Absent for full chunks, whose
    /// payload stays the version-1 array of three elements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaBase>,
}

/// The basis of a delta-encoded chunk, and how long the chain down to a full chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeltaBase {
    pub base: ChunkId,
    /// 1 when `base` is stored in full, else the base's depth plus one.
    pub depth: u8,
}

/// Longest delta chain any reader follows (and the repository accepts): the upper bound of the
/// `MaxDeltaChain` setting. It bounds the work of reading one chunk whatever the log says.
pub const MAX_CHAIN: u8 = 100;

/// One piece of a file's data: `len` bytes at `offset` are chunk `id`. Gaps between extents
/// are holes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub len: u32,
    pub id: ChunkId,
}

/// A new version of a directory entry, valid from `set` until a later version or deletion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileVersion {
    pub set: SetId,
    pub dir: DirId,
    pub name: NameKey,
    pub extents: Vec<Extent>,
    /// `meta::FileMeta`, sealed with the entry's identity on encrypted hosts.
    pub meta: ByteBuf,
}

/// A directory entry stops existing from `set` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryDeleted {
    pub set: SetId,
    pub dir: DirId,
    pub name: NameKey,
}

/// A per-host configuration value was set (or removed, with `None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigChanged {
    pub key: String,
    pub value: Option<String>,
}

/// Compaction copied the live records of `retired` into `created`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentsCompacted {
    pub retired: Vec<u64>,
    pub created: Vec<u64>,
    /// For each retired segment, the batches it held: `[first_seq, next_seq)`. Scans use them
    /// to tell a retired segment from a missing one.
    #[serde(default)]
    pub ranges: Vec<[u64; 2]>,
}

/// Any event of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    HostCreated(HostCreated),
    KeyWrapped(KeyWrapped),
    SetOpened(SetOpened),
    SetCompleted(SetCompleted),
    SetPurged(SetPurged),
    SetLocked(SetLocked),
    ChunkStored(ChunkStored),
    FileVersion(FileVersion),
    EntryDeleted(EntryDeleted),
    ConfigChanged(ConfigChanged),
    SegmentsCompacted(SegmentsCompacted),
}

impl Event {
    /// The record kind tag.
    pub fn kind(&self) -> u8 {
        match self {
            Event::HostCreated(_) => kind::HOST_CREATED,
            Event::KeyWrapped(_) => kind::KEY_WRAPPED,
            Event::SetOpened(_) => kind::SET_OPENED,
            Event::SetCompleted(_) => kind::SET_COMPLETED,
            Event::SetPurged(_) => kind::SET_PURGED,
            Event::SetLocked(_) => kind::SET_LOCKED,
            Event::ChunkStored(_) => kind::CHUNK_STORED,
            Event::FileVersion(_) => kind::FILE_VERSION,
            Event::EntryDeleted(_) => kind::ENTRY_DELETED,
            Event::ConfigChanged(_) => kind::CONFIG_CHANGED,
            Event::SegmentsCompacted(_) => kind::SEGMENTS_COMPACTED,
        }
    }

    /// The payload version to write this event with: the lowest that can express it, so
    /// that full chunks stay readable by builds that predate delta chunks.
    pub fn version(&self) -> u8 {
        match self {
            Event::ChunkStored(ChunkStored { delta: None, .. }) => PAYLOAD_VERSION,
            Event::SetCompleted(SetCompleted { seal: None, .. }) => PAYLOAD_VERSION,
            e => payload_version(e.kind()),
        }
    }

    /// The MessagePack payload.
    pub fn encode(&self) -> Vec<u8> {
        fn enc<T: Serialize>(v: &T) -> Vec<u8> {
            rmp_serde::to_vec(v).expect("event payloads serialise to MessagePack without fail")
        }
        match self {
            Event::HostCreated(e) => enc(e),
            Event::KeyWrapped(e) => enc(e),
            Event::SetOpened(e) => enc(e),
            Event::SetCompleted(e) => enc(e),
            Event::SetPurged(e) => enc(e),
            Event::SetLocked(e) => enc(e),
            Event::ChunkStored(e) => enc(e),
            Event::FileVersion(e) => enc(e),
            Event::EntryDeleted(e) => enc(e),
            Event::ConfigChanged(e) => enc(e),
            Event::SegmentsCompacted(e) => enc(e),
        }
    }

    /// Decodes a payload of the given kind and version. Unknown kinds and versions are errors.
    pub fn decode(kind: u8, version: u8, payload: &[u8]) -> Result<Event> {
        let supported = payload_version(kind);
        if version == 0 || version > supported {
            return Err(Error::UnsupportedVersion {
                what: "event payload",
                version: version.into(),
                supported: supported.into(),
            });
        }
        fn dec<T: DeserializeOwned>(p: &[u8]) -> Result<T> {
            rmp_serde::from_slice(p).map_err(|e| Error::malformed("event payload", e))
        }
        Ok(match kind {
            kind::HOST_CREATED => Event::HostCreated(dec(payload)?),
            kind::KEY_WRAPPED => Event::KeyWrapped(dec(payload)?),
            kind::SET_OPENED => Event::SetOpened(dec(payload)?),
            kind::SET_COMPLETED => Event::SetCompleted(dec(payload)?),
            kind::SET_PURGED => Event::SetPurged(dec(payload)?),
            kind::SET_LOCKED => Event::SetLocked(dec(payload)?),
            kind::CHUNK_STORED => Event::ChunkStored(dec(payload)?),
            kind::FILE_VERSION => Event::FileVersion(dec(payload)?),
            kind::ENTRY_DELETED => Event::EntryDeleted(dec(payload)?),
            kind::CONFIG_CHANGED => Event::ConfigChanged(dec(payload)?),
            kind::SEGMENTS_COMPACTED => Event::SegmentsCompacted(dec(payload)?),
            other => return Err(Error::malformed("event", format!("unknown record kind {other}"))),
        })
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_id<const N: usize>() -> impl Strategy<Value = [u8; N]> {
        proptest::collection::vec(any::<u8>(), N).prop_map(|v| v.try_into().unwrap())
    }

    pub fn arb_event() -> impl Strategy<Value = Event> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..200).prop_map(ByteBuf::from);
        prop_oneof![
            (arb_id::<16>(), ".{0,20}", any::<i64>(), any::<bool>()).prop_map(|(h, name, created, encrypted)| {
                Event::HostCreated(HostCreated { host_id: HostId(h), name, created, encrypted })
            }),
            (bytes(), any::<Option<[u8; 32]>>())
                .prop_map(|(blob, verifier)| Event::KeyWrapped(KeyWrapped { blob, verifier })),
            (any::<u64>(), ".{0,30}", any::<u32>(), any::<i64>(), any::<Option<u64>>()).prop_map(
                |(set, name, priority, started, base)| Event::SetOpened(SetOpened {
                    set,
                    name,
                    priority,
                    started,
                    base
                })
            ),
            (
                any::<u64>(),
                any::<i64>(),
                any::<[u64; 5]>(),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..80))
            )
                .prop_map(|(set, finished, s, seal)| Event::SetCompleted(SetCompleted {
                    set,
                    finished,
                    stats: SetStats { entries: s[0], bytes: s[1], changed: s[2], new_chunks: s[3], new_bytes: s[4] },
                    seal: seal.map(ByteBuf::from),
                })),
            (any::<u64>(), any::<i64>()).prop_map(|(set, time)| Event::SetPurged(SetPurged { set, time })),
            (any::<u64>(), any::<bool>(), any::<i64>()).prop_map(|(set, locked, time)| Event::SetLocked(SetLocked {
                set,
                locked,
                time
            })),
            (arb_id::<32>(), any::<u32>(), any::<u8>(), proptest::option::of((arb_id::<32>(), any::<u8>()))).prop_map(
                |(id, plain_len, encoding, delta)| Event::ChunkStored(ChunkStored {
                    id: ChunkId(id),
                    plain_len,
                    encoding,
                    delta: delta.map(|(b, depth)| DeltaBase { base: ChunkId(b), depth })
                })
            ),
            (
                any::<u64>(),
                arb_id::<16>(),
                arb_id::<16>(),
                proptest::collection::vec((any::<u64>(), any::<u32>(), arb_id::<32>()), 0..10),
                bytes()
            )
                .prop_map(|(set, d, n, ex, meta)| Event::FileVersion(FileVersion {
                    set,
                    dir: DirId(d),
                    name: NameKey(n),
                    extents: ex.into_iter().map(|(offset, len, id)| Extent { offset, len, id: ChunkId(id) }).collect(),
                    meta
                })),
            (any::<u64>(), arb_id::<16>(), arb_id::<16>()).prop_map(|(set, d, n)| Event::EntryDeleted(EntryDeleted {
                set,
                dir: DirId(d),
                name: NameKey(n)
            })),
            (".{0,20}", proptest::option::of(".{0,20}"))
                .prop_map(|(key, value)| Event::ConfigChanged(ConfigChanged { key, value })),
            (proptest::collection::vec(any::<u64>(), 0..5), proptest::collection::vec(any::<u64>(), 0..5)).prop_map(
                |(retired, created)| {
                    let ranges = retired.iter().map(|s| [*s, s.wrapping_add(1)]).collect();
                    Event::SegmentsCompacted(SegmentsCompacted { retired, created, ranges })
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(e in arb_event()) {
            let bytes = e.encode();
            prop_assert_eq!(Event::decode(e.kind(), e.version(), &bytes).unwrap(), e.clone());
            prop_assert_eq!(Event::decode(e.kind(), payload_version(e.kind()), &bytes).unwrap(), e);
        }

        #[test]
        fn garbage_never_panics(kind in any::<u8>(), bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Event::decode(kind, payload_version(kind), &bytes);
        }
    }

    #[test]
    fn unknown_kind_and_version_are_errors() {
        let e = Event::SetPurged(SetPurged { set: 1, time: 2 });
        assert!(matches!(Event::decode(99, 1, &e.encode()), Err(Error::Malformed { .. })));
        assert!(matches!(Event::decode(e.kind(), 2, &e.encode()), Err(Error::UnsupportedVersion { .. })));
    }
}

#[cfg(test)]
mod compat {
    use super::*;

    /// `KeyWrapped` as format 1 wrote it, before the verifier field.
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct KeyWrappedV1 {
        blob: ByteBuf,
    }

    #[test]
    fn key_wrapped_of_version_1_still_decodes_and_version_2_is_marked() {
        let old = rmp_serde::to_vec(&KeyWrappedV1 { blob: ByteBuf::from(vec![1, 2, 3]) }).unwrap();
        let new = Event::decode(kind::KEY_WRAPPED, 1, &old).unwrap();
        assert_eq!(new, Event::KeyWrapped(KeyWrapped { blob: ByteBuf::from(vec![1, 2, 3]), verifier: None }));
        // A build that reads only version 1 refuses the new record rather than misreading it.
        assert_eq!(payload_version(kind::KEY_WRAPPED), 2);
        assert!(matches!(
            Event::decode(kind::KEY_WRAPPED, 3, &old),
            Err(Error::UnsupportedVersion { version: 3, supported: 2, .. })
        ));
        assert!(Event::decode(kind::SET_OPENED, 2, &old).is_err());
    }

    /// `ChunkStored` as format 1 wrote it, before delta chunks.
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct ChunkStoredV1 {
        id: ChunkId,
        plain_len: u32,
        encoding: u8,
    }

    #[test]
    fn full_chunks_keep_version_1_and_deltas_are_version_2() {
        let v1 = ChunkStoredV1 { id: ChunkId([7; 32]), plain_len: 9, encoding: 3 };
        let full = Event::ChunkStored(ChunkStored { id: v1.id, plain_len: 9, encoding: 3, delta: None });
        assert_eq!(full.encode(), rmp_serde::to_vec(&v1).unwrap());
        assert_eq!(full.version(), 1);
        assert_eq!(Event::decode(kind::CHUNK_STORED, 1, &full.encode()).unwrap(), full);
        let delta = Event::ChunkStored(ChunkStored {
            id: v1.id,
            plain_len: 9,
            encoding: 7,
            delta: Some(DeltaBase { base: ChunkId([8; 32]), depth: 2 }),
        });
        assert_eq!(delta.version(), 2);
        assert_eq!(Event::decode(kind::CHUNK_STORED, 2, &delta.encode()).unwrap(), delta);
        assert!(
            rmp_serde::from_slice::<ChunkStoredV1>(&delta.encode()).is_err(),
            "a version-1 reader must not misread a delta"
        );
    }
}
