//! The repository interface shared by every program.
//!
//! The embedded repository (`tardis-log`) implements it directly; the network client will
//! implement it by sending the same calls to `tardisd`. Everything above it (the backup walk,
//! `regenerate`, the mount) is written once against this trait, so `--local` and remote runs
//! share one code path. The trait speaks only in opaque IDs and sealed bytes: no key ever
//! crosses it.

use crate::chunkcodec::EncodedChunk;
use crate::event::{ChunkStored, EntryDeleted, FileVersion, SetStats};
use crate::ids::{ChunkId, DirId, HostId, NameKey, SetId};
use crate::login::Verifier;
use crate::Result;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::collections::BTreeMap;

/// What a repository knows about its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub host_id: HostId,
    pub name: String,
    pub encrypted: bool,
    /// The latest wrapped master key (encrypted hosts only).
    #[serde(with = "serde_bytes")]
    pub wrapped_key: Option<Vec<u8>>,
    /// The login verifier stored with that key (see `login`); `None` for unencrypted hosts
    /// and for keys wrapped before verifiers existed.
    pub verifier: Option<Verifier>,
}

/// A wrapped master key and the login verifier derived from the same password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKey {
    #[serde(with = "serde_bytes")]
    pub wrapped: Vec<u8>,
    pub verifier: Verifier,
}

/// Where a set is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetState {
    /// Being written; not shown as a backup.
    Open,
    /// Committed; restorable.
    Completed,
    /// Opened but never completed, and a later set has been opened since: it never will be.
    Abandoned,
}

/// A backup set as listed by `sets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetInfo {
    pub id: SetId,
    pub name: String,
    pub priority: u32,
    /// Unix nanoseconds.
    pub started: i64,
    pub finished: Option<i64>,
    pub base: Option<SetId>,
    pub state: SetState,
    pub purged: bool,
    /// Locked sets are never purged.
    pub locked: bool,
    pub stats: SetStats,
    /// The client's seal over the set's name, priority, start and base (`setseal`); `None`
    /// until the set is completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<ByteBuf>,
}

impl SetInfo {
    /// Completed and not purged: a set users can see and restore.
    pub fn is_live(&self) -> bool {
        self.state == SetState::Completed && !self.purged
    }
}

/// One stored version of an entry, or the record of its deletion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryVersion {
    Version(FileVersion),
    Deleted(SetId),
}

impl EntryVersion {
    pub fn set(&self) -> SetId {
        match self {
            EntryVersion::Version(v) => v.set,
            EntryVersion::Deleted(s) => *s,
        }
    }
}

/// A chunk as stored: its metadata and body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredChunk {
    pub meta: ChunkStored,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// One item of an upload batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Write {
    Chunk(EncodedChunk),
    Version(FileVersion),
    Delete(EntryDeleted),
}

/// A host's repository, seen through the operations every program needs.
pub trait Repository: Send + Sync {
    /// The host, or `None` if it has not been created yet.
    fn host(&self) -> Result<Option<HostInfo>>;

    /// Creates the host: encrypted with `key`, or unencrypted with `None`.
    fn create_host(&self, host_id: HostId, key: Option<HostKey>) -> Result<HostInfo>;

    /// Replaces the wrapped master key and its verifier (a password change, or adding the
    /// verifier to a key wrapped without one); data is not rewritten.
    fn set_wrapped_key(&self, key: HostKey) -> Result<()>;

    /// Every set ever opened, oldest first.
    fn sets(&self) -> Result<Vec<SetInfo>>;

    /// The version of `name` in `dir` that set `set` sees, if the entry exists there.
    fn lookup(&self, set: SetId, dir: &DirId, name: &NameKey) -> Result<Option<FileVersion>>;

    /// Every entry of `dir` as set `set` sees it (in key order, not name order).
    fn list(&self, set: SetId, dir: &DirId) -> Result<Vec<FileVersion>>;

    /// Every stored version and deletion of one entry, oldest first, including those of sets
    /// that were never completed (callers filter with [`Repository::sets`]).
    fn history(&self, dir: &DirId, name: &NameKey) -> Result<Vec<EntryVersion>>;

    /// Reads a stored chunk.
    fn read_chunk(&self, id: &ChunkId) -> Result<StoredChunk>;

    /// Of `ids`, those the repository does not hold.
    fn missing_chunks(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>>;

    /// Opens a new set; any set still open is abandoned. Returns the new set's ID.
    fn open_set(&self, name: &str, priority: u32) -> Result<SetId>;

    /// Appends an atomic, durable batch of writes to the open set `set`. Every chunk that a
    /// file version references must already be stored or be earlier in the same batch.
    fn append(&self, set: SetId, writes: Vec<Write>) -> Result<()>;

    /// Commits `set` with the client's seal of it (`setseal`): once this returns, the set is
    /// durable and restorable.
    fn complete_set(&self, set: SetId, stats: SetStats, seal: Option<Vec<u8>>) -> Result<()>;

    /// The host's stored configuration values (keys of [`crate::config::KEYS`] that were set;
    /// the others have their defaults).
    fn config(&self) -> Result<BTreeMap<String, String>>;

    /// Sets a configuration value, or removes it (back to its default) with `None`. Unknown
    /// keys and values of the wrong type are refused.
    fn set_config(&self, key: &str, value: Option<&str>) -> Result<()>;

    /// Locks (`true`) or unlocks a completed set. A locked set is never purged.
    fn set_locked(&self, set: SetId, locked: bool) -> Result<()>;

    /// Purges `sets` in one atomic batch of `SetPurged` events. Refused as a whole if any of
    /// them is not completed, already purged, locked, or the latest completed set (see
    /// [`crate::retention::protected`]). Purged sets are no longer listed or restorable; their
    /// records become garbage for compaction.
    fn purge_sets(&self, sets: &[SetId]) -> Result<()>;
}
