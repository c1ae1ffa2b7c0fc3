//! The RocksDB index: materialized views of the log, rebuildable by replaying it.
//!
//! Column families (key layouts in `docs/FORMAT.md`, "Index"):
//! - `meta`: the log position the index reflects (`applied`), the host record, the wrapped key.
//! - `chunks`: chunk ID → where its record is.
//! - `sets`: set ID → name, priority, times, state, totals.
//! - `entries`: (directory, name, first set) → the version written by that set, or a deletion.
//!   A version stays valid for every later set until a later row for the same name; so an
//!   unchanged file costs nothing per set.
//! - `config`: per-host configuration values.
//!
//! Invariant: every write batch that changes the views also stores the log position it brings
//! the index to, so a crash between log and index loses nothing (the tail is replayed) and a
//! replay of already-applied records is harmless (every update is idempotent).

use crate::error::{Error, Result};
use crate::segments::Pos;
use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteBatch, DB};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::RwLock;
use tardis_core::api::{EntryVersion, SetInfo, SetState};
use tardis_core::event::{DeltaBase, Event, FileVersion, HostCreated, SetStats};
use tardis_core::ids::{ChunkId, DirId, NameKey, SetId};
use tardis_core::login::Verifier;

const CF_META: &str = "meta";
const CF_CHUNKS: &str = "chunks";
const CF_SETS: &str = "sets";
const CF_ENTRIES: &str = "entries";
const CF_CONFIG: &str = "config";
const ALL_CFS: [&str; 5] = [CF_META, CF_CHUNKS, CF_SETS, CF_ENTRIES, CF_CONFIG];

const KEY_APPLIED: &[u8] = b"applied";
const KEY_FORMAT: &[u8] = b"format";
const KEY_HOST: &[u8] = b"host";
const KEY_WRAPPED: &[u8] = b"wrapped-key";
const KEY_VERIFIER: &[u8] = b"login-verifier";

/// Version of the index layout. An index of an older version is rebuilt from the log; one of a
/// newer version is refused (and kept) so that the build that wrote it can still use it.
pub const INDEX_VERSION: u32 = 2;

const ENTRY_DELETED: u8 = 0;
const ENTRY_VERSION: u8 = 1;
/// An entry value starts with its tag and the position of the record that wrote it.
const ENTRY_HEADER: usize = 17;
const RETIRED_PREFIX: &[u8] = b"retired/";

// Row codecs. Each decoder is the one the reading paths use, public with its encoder so that
// the fuzz targets can feed it arbitrary bytes: a damaged index is untrusted input, and must
// give `Error::Refused` ("run rebuild-index"), never a panic.

/// The value of an `entries` row: the tag, the position of the record that wrote it, and for
/// a version its `FileVersion` payload.
pub fn encode_entry(pos: Pos, version: Option<&FileVersion>) -> Vec<u8> {
    let mut v = Vec::with_capacity(ENTRY_HEADER + 64);
    v.push(if version.is_some() { ENTRY_VERSION } else { ENTRY_DELETED });
    v.extend_from_slice(&pos.segment.to_le_bytes());
    v.extend_from_slice(&pos.offset.to_le_bytes());
    if let Some(fv) = version {
        v.extend_from_slice(&Event::FileVersion(fv.clone()).encode());
    }
    v
}

/// The position of the record that wrote an `entries` row.
pub fn entry_pos(value: &[u8]) -> Result<Pos> {
    if value.len() < ENTRY_HEADER {
        return Err(bad_value("entry", value.len()));
    }
    let u64_at = |i: usize| u64::from_le_bytes(value[i..i + 8].try_into().expect("8-byte slice"));
    Ok(Pos { segment: u64_at(1), offset: u64_at(9) })
}

fn retired_key(seg: u64) -> Vec<u8> {
    let mut k = RETIRED_PREFIX.to_vec();
    k.extend_from_slice(&seg.to_be_bytes());
    k
}

/// The `retired/<segment>` row of `meta`: the batch range (`first_seq`, next) a compacted
/// segment held.
pub fn encode_retired(seg: u64, [first, next]: [u64; 2]) -> (Vec<u8>, [u8; 16]) {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&first.to_le_bytes());
    v[8..].copy_from_slice(&next.to_le_bytes());
    (retired_key(seg), v)
}

/// Decodes a `retired/<segment>` row; `Ok(None)` if `key` is another `meta` key.
pub fn decode_retired(key: &[u8], value: &[u8]) -> Result<Option<(u64, [u64; 2])>> {
    let Some(seg) = key.strip_prefix(RETIRED_PREFIX) else { return Ok(None) };
    let seg = u64::from_be_bytes(seg.try_into().map_err(|_| bad_value("retired key", key.len()))?);
    if value.len() != 16 {
        return Err(bad_value("retired range", value.len()));
    }
    let first = u64::from_le_bytes(value[..8].try_into().expect("8 bytes"));
    let next = u64::from_le_bytes(value[8..].try_into().expect("8 bytes"));
    Ok(Some((seg, [first, next])))
}

/// The `applied` value of `meta`: segment and offset, big-endian.
pub fn encode_applied(pos: Pos) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&pos.segment.to_be_bytes());
    v[8..].copy_from_slice(&pos.offset.to_be_bytes());
    v
}

/// Decodes the `applied` value of `meta`.
pub fn decode_applied(v: &[u8]) -> Result<Pos> {
    if v.len() != 16 {
        return Err(bad_value("applied position", v.len()));
    }
    let segment = u64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
    let offset = u64::from_be_bytes(v[8..].try_into().expect("8 bytes"));
    Ok(Pos { segment, offset })
}

/// A row of the `sets` family: the set ID big-endian (so rows sort by set), the row as
/// MessagePack.
pub fn encode_set_row(id: SetId, row: &SetRow) -> ([u8; 8], Vec<u8>) {
    (id.to_be_bytes(), rmp_serde::to_vec(row).expect("set rows encode"))
}

/// Decodes a row of the `sets` family.
pub fn decode_set_row(key: &[u8], value: &[u8]) -> Result<(SetId, SetRow)> {
    let id = SetId::from_be_bytes(key.try_into().map_err(|_| bad_value("set key", key.len()))?);
    let row: SetRow = rmp_serde::from_slice(value).map_err(|_| bad_value("set row", value.len()))?;
    Ok((id, row))
}

/// Where a chunk's record is, its sizes and, for a delta chunk, its base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLoc {
    pub pos: Pos,
    pub plain_len: u32,
    pub stored_len: u32,
    pub encoding: u8,
    pub delta: Option<DeltaBase>,
}

impl ChunkLoc {
    /// 25 bytes for a full chunk (the layout before delta chunks), 58 for a delta chunk (base
    /// ID and depth appended).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(58);
        b.extend_from_slice(&self.pos.segment.to_le_bytes());
        b.extend_from_slice(&self.pos.offset.to_le_bytes());
        b.extend_from_slice(&self.plain_len.to_le_bytes());
        b.extend_from_slice(&self.stored_len.to_le_bytes());
        b.push(self.encoding);
        if let Some(d) = &self.delta {
            b.extend_from_slice(&d.base.0);
            b.push(d.depth);
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != 25 && b.len() != 58 {
            return Err(bad_value("chunk location", b.len()));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8-byte slice"));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4-byte slice"));
        let delta = (b.len() == 58)
            .then(|| DeltaBase { base: ChunkId(b[25..57].try_into().expect("32-byte slice")), depth: b[57] });
        Ok(ChunkLoc {
            pos: Pos { segment: u64_at(0), offset: u64_at(8) },
            plain_len: u32_at(16),
            stored_len: u32_at(20),
            encoding: b[24],
            delta,
        })
    }
}

/// A set as the index keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SetRow {
    pub name: String,
    pub priority: u32,
    pub started: i64,
    pub base: Option<SetId>,
    pub finished: Option<i64>,
    pub stats: SetStats,
    pub purged: bool,
    /// Added in index version 2.
    #[serde(default)]
    pub locked: bool,
    /// The client's seal from `SetCompleted`; absent (and not serialised, so older rows keep
    /// their bytes) for sets completed without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<serde_bytes::ByteBuf>,
}

/// The set rows as a batch being applied changes them: its changes over the cached rows.
struct SetOverlay<'a> {
    base: &'a BTreeMap<SetId, SetRow>,
    changed: BTreeMap<SetId, SetRow>,
}

impl SetOverlay<'_> {
    fn get_or_new(&mut self, id: SetId) -> &mut SetRow {
        let base = self.base;
        self.changed.entry(id).or_insert_with(|| base.get(&id).cloned().unwrap_or_default())
    }
}

/// One event of a batch being applied, with where it was written and its body length.
#[derive(Debug, Clone)]
pub struct Applied {
    pub pos: Pos,
    pub event: Event,
    pub body_len: u32,
}

/// What [`Index::for_each_entry_at`] calls for each row: entry, set, record position, row.
pub type EntryAtFn<'a> = dyn FnMut(&DirId, &NameKey, SetId, Pos, EntryVersion) -> Result<()> + 'a;

/// One key-value pair of a logical index dump: column family, key, value.
pub type DumpRow = (&'static str, Vec<u8>, Vec<u8>);

/// How a key differs between the live index and an index rebuilt from the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Difference {
    /// The live index holds the key; replaying the log does not produce it.
    OnlyInIndex,
    /// Replaying the log produces the key; the live index lacks it.
    MissingFromIndex,
    /// Both hold the key, with different values.
    ValueDiffers,
}

/// One difference found by [`Index::compare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexMismatch {
    /// Column family (`meta`, `chunks`, `sets`, `entries`, `config`).
    pub cf: &'static str,
    pub key: Vec<u8>,
    pub difference: Difference,
}

/// What [`Index::compare`] found: the first differences, and how many there are in all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Comparison {
    pub mismatches: Vec<IndexMismatch>,
    pub total: u64,
}

/// The index of one host's repository.
#[derive(Debug)]
pub struct Index {
    db: DB,
    /// Every set, cached: sets are few and consulted on every lookup.
    sets: RwLock<BTreeMap<SetId, SetRow>>,
}

fn bad_value(what: &str, len: usize) -> Error {
    Error::Refused(format!("index holds a malformed {what} ({len} bytes); run `tardis-tools rebuild-index`"))
}

fn entry_key(dir: &DirId, name: &NameKey, set: SetId) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..16].copy_from_slice(&dir.0);
    k[16..32].copy_from_slice(&name.0);
    k[32..].copy_from_slice(&set.to_be_bytes());
    k
}

fn entry_set(key: &[u8]) -> SetId {
    SetId::from_be_bytes(key[32..40].try_into().expect("entry keys are 40 bytes"))
}

/// Decodes an `entries` row: the version it holds, or the deletion (by the set in its key).
pub fn decode_entry(key: &[u8], value: &[u8]) -> Result<EntryVersion> {
    if key.len() != 40 {
        return Err(bad_value("entry key", key.len()));
    }
    if value.len() < ENTRY_HEADER {
        return Err(bad_value("entry", value.len()));
    }
    match value.first() {
        Some(&ENTRY_DELETED) => Ok(EntryVersion::Deleted(entry_set(key))),
        Some(&ENTRY_VERSION) => {
            match Event::decode(tardis_core::event::kind::FILE_VERSION, 1, &value[ENTRY_HEADER..])? {
                Event::FileVersion(v) => Ok(EntryVersion::Version(v)),
                _ => Err(bad_value("entry", value.len())),
            }
        }
        _ => Err(bad_value("entry", value.len())),
    }
}

/// The memtable of each column family: what RocksDB holds in memory before it writes a table
/// file, and (× 1.1) what the write-ahead log preallocates on disk at every open. RocksDB's
/// default, 64 MiB, let every writer of an index (a backup, the daemon, verify's scratch index)
/// grow by up to 5 × 2 × 64 MiB with the number of files, and reserved 70 MiB of disk per open
/// index. 4 MiB bounds the memtables at 40 MiB and the reservation at 4.4 MiB.
const MEMTABLE_BYTES: usize = 4 << 20;

/// How the index uses memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexOptions {
    /// Bytes of memtables that all column families share before RocksDB flushes them to
    /// table files, below the 4 MiB each may hold [default: no shared cap]. Tests and fuzzing
    /// set a small one so that flushes happen within short histories.
    pub memtable_budget: Option<usize>,
    /// Bytes RocksDB reserves for its MANIFEST at every open [default: RocksDB's 4 MiB]. The
    /// model fuzz target sets a small one: on tmpfs, reserving and releasing 4 MiB per open
    /// took a fifth of each execution.
    pub manifest_preallocation: Option<usize>,
}

impl Index {
    /// Opens (creating if needed) the index at `path`.
    pub fn open(path: &Path, options: IndexOptions) -> Result<Index> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_keep_log_file_num(4);
        opts.set_write_buffer_size(MEMTABLE_BYTES);
        // RocksDB starts 15 threads per column family at every open to load table files in
        // parallel; the index has a few table files, so those threads cost more than they save
        // (on tmpfs, an open of an existing index took 11.0 ms with them, about 5 ms without).
        opts.set_max_file_opening_threads(1);
        if let Some(budget) = options.memtable_budget {
            opts.set_db_write_buffer_size(budget);
        }
        if let Some(bytes) = options.manifest_preallocation {
            opts.set_manifest_preallocation_size(bytes);
        }
        // RocksDB's own log at Info dumps every option of every column family at each open; the
        // index's opens are frequent (every command), and warnings and errors are what a user
        // can act on.
        opts.set_log_level(rocksdb::LogLevel::Warn);
        let cfs = ALL_CFS.iter().map(|n| {
            let mut cf = Options::default();
            cf.set_write_buffer_size(MEMTABLE_BYTES);
            ColumnFamilyDescriptor::new(*n, cf)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(Error::index("opening"))?;
        let index = Index { db, sets: RwLock::new(BTreeMap::new()) };
        match index.db.get_cf(index.cf(CF_META), KEY_FORMAT).map_err(Error::index("reading format"))? {
            None => index
                .db
                .put_cf(index.cf(CF_META), KEY_FORMAT, INDEX_VERSION.to_le_bytes())
                .map_err(Error::index("writing format"))?,
            Some(v) if v.as_slice() == INDEX_VERSION.to_le_bytes() => {}
            Some(v) => {
                let found = v.get(..4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_le_bytes);
                return Err(Error::Version { what: "index", found, supported: INDEX_VERSION });
            }
        }
        let sets = index.load_sets()?;
        *index.sets.write().unwrap_or_else(|p| p.into_inner()) = sets;
        Ok(index)
    }

    fn load_sets(&self) -> Result<BTreeMap<SetId, SetRow>> {
        let mut sets = BTreeMap::new();
        let mut it = self.db.raw_iterator_cf(self.cf(CF_SETS));
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let (id, row) = decode_set_row(k, v)?;
            sets.insert(id, row);
            it.next();
        }
        it.status().map_err(Error::index("reading sets"))?;
        Ok(sets)
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db.cf_handle(name).expect("every column family is created at open")
    }

    /// The log position this index reflects (end of the last applied batch).
    pub fn applied(&self) -> Result<Option<Pos>> {
        let v = self.db.get_cf(self.cf(CF_META), KEY_APPLIED).map_err(Error::index("reading position"))?;
        v.map(|v| decode_applied(&v)).transpose()
    }

    /// Applies one committed batch and records `end` as the applied position, atomically.
    pub fn apply(&self, events: &[Applied], end: Pos) -> Result<()> {
        let mut wb = WriteBatch::default();
        // Only the rows this batch touches are copied: the cache holds every set ever made.
        let cache = self.sets.read().unwrap_or_else(|p| p.into_inner());
        let mut sets = SetOverlay { base: &cache, changed: BTreeMap::new() };
        for a in events {
            match &a.event {
                Event::HostCreated(h) => {
                    wb.put_cf(self.cf(CF_META), KEY_HOST, rmp_serde::to_vec(h).expect("host record encodes"))
                }
                Event::KeyWrapped(k) => {
                    // The latest key wins, and its verifier with it (or none, for old records).
                    wb.put_cf(self.cf(CF_META), KEY_WRAPPED, &k.blob);
                    match &k.verifier {
                        Some(v) => wb.put_cf(self.cf(CF_META), KEY_VERIFIER, v),
                        None => wb.delete_cf(self.cf(CF_META), KEY_VERIFIER),
                    }
                }
                // Each set event sets its own fields of the row, creating the row if needed:
                // compaction copies a set's records forward past later ones (a `SetOpened` can
                // come after its set's `SetPurged`), so the result must not depend on their order.
                Event::SetOpened(o) => {
                    let row = sets.get_or_new(o.set);
                    row.name.clone_from(&o.name);
                    row.priority = o.priority;
                    row.started = o.started;
                    row.base = o.base;
                    self.put_set(&mut wb, o.set, &sets.changed);
                }
                Event::SetCompleted(c) => {
                    let row = sets.get_or_new(c.set);
                    row.finished = Some(c.finished);
                    row.stats = c.stats;
                    row.seal.clone_from(&c.seal);
                    self.put_set(&mut wb, c.set, &sets.changed);
                }
                Event::SetPurged(p) => {
                    sets.get_or_new(p.set).purged = true;
                    self.put_set(&mut wb, p.set, &sets.changed);
                }
                Event::SetLocked(l) => {
                    sets.get_or_new(l.set).locked = l.locked;
                    self.put_set(&mut wb, l.set, &sets.changed);
                }
                Event::ChunkStored(c) => {
                    // The latest copy in log order is authoritative: writers never store a known
                    // ID twice, so a later copy is compaction's (or a re-upload of a chunk that
                    // compaction dropped). Replays apply batches in log order, so they agree.
                    let loc = ChunkLoc {
                        pos: a.pos,
                        plain_len: c.plain_len,
                        stored_len: a.body_len,
                        encoding: c.encoding,
                        delta: c.delta,
                    };
                    wb.put_cf(self.cf(CF_CHUNKS), c.id.0, loc.encode());
                }
                Event::FileVersion(v) => {
                    wb.put_cf(self.cf(CF_ENTRIES), entry_key(&v.dir, &v.name, v.set), encode_entry(a.pos, Some(v)));
                }
                Event::EntryDeleted(d) => {
                    wb.put_cf(self.cf(CF_ENTRIES), entry_key(&d.dir, &d.name, d.set), encode_entry(a.pos, None))
                }
                Event::ConfigChanged(c) => match &c.value {
                    Some(v) => wb.put_cf(self.cf(CF_CONFIG), c.key.as_bytes(), v.as_bytes()),
                    None => wb.delete_cf(self.cf(CF_CONFIG), c.key.as_bytes()),
                },
                Event::SegmentsCompacted(e) => {
                    // Alone in its batch (so the reads below see every earlier batch): rows
                    // still pointing into a retired segment are the dead ones compaction did
                    // not copy, and go with it.
                    let retired: HashSet<u64> = e.retired.iter().copied().collect();
                    self.for_each_chunk(&mut |id, loc| {
                        if retired.contains(&loc.pos.segment) {
                            wb.delete_cf(self.cf(CF_CHUNKS), id.0);
                        }
                        Ok(())
                    })?;
                    self.for_each_entry_at(&mut |dir, name, set, pos, _| {
                        if retired.contains(&pos.segment) {
                            wb.delete_cf(self.cf(CF_ENTRIES), entry_key(dir, name, set));
                        }
                        Ok(())
                    })?;
                    for (i, seg) in e.retired.iter().enumerate() {
                        let (k, v) = encode_retired(*seg, e.ranges.get(i).copied().unwrap_or([0, 0]));
                        wb.put_cf(self.cf(CF_META), k, v);
                    }
                }
            }
        }
        wb.put_cf(self.cf(CF_META), KEY_APPLIED, encode_applied(end));
        self.db.write(wb).map_err(Error::index("applying batch"))?;
        let changed = sets.changed;
        drop(cache);
        self.sets.write().unwrap_or_else(|p| p.into_inner()).extend(changed);
        Ok(())
    }

    fn put_set(&self, wb: &mut WriteBatch, id: SetId, sets: &BTreeMap<SetId, SetRow>) {
        let (k, v) = encode_set_row(id, &sets[&id]);
        wb.put_cf(self.cf(CF_SETS), k, v);
    }

    /// The host record, once the host exists.
    pub fn host(&self) -> Result<Option<HostCreated>> {
        let v = self.db.get_cf(self.cf(CF_META), KEY_HOST).map_err(Error::index("reading host"))?;
        v.map(|v| rmp_serde::from_slice(&v).map_err(|_| bad_value("host record", v.len()))).transpose()
    }

    /// The latest wrapped master key.
    pub fn wrapped_key(&self) -> Result<Option<Vec<u8>>> {
        self.db.get_cf(self.cf(CF_META), KEY_WRAPPED).map_err(Error::index("reading wrapped key"))
    }

    /// The login verifier stored with the latest wrapped key.
    pub fn verifier(&self) -> Result<Option<Verifier>> {
        let v = self.db.get_cf(self.cf(CF_META), KEY_VERIFIER).map_err(Error::index("reading login verifier"))?;
        v.map(|v| Verifier::try_from(v.as_slice()).map_err(|_| bad_value("login verifier", v.len()))).transpose()
    }

    /// Where a chunk is stored.
    pub fn chunk(&self, id: &ChunkId) -> Result<Option<ChunkLoc>> {
        let v = self.db.get_cf(self.cf(CF_CHUNKS), id.0).map_err(Error::index("reading chunk location"))?;
        v.map(|v| ChunkLoc::decode(&v)).transpose()
    }

    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.db.get_pinned_cf(self.cf(CF_CHUNKS), id.0).map_err(Error::index("reading chunk location"))?.is_some())
    }

    /// For each ID, whether the chunk is stored.
    pub fn has_chunks(&self, ids: &[ChunkId]) -> Result<Vec<bool>> {
        let cf = self.cf(CF_CHUNKS);
        self.db
            .multi_get_cf(ids.iter().map(|id| (cf, id.0)))
            .into_iter()
            .map(|r| r.map(|v| v.is_some()).map_err(Error::index("reading chunk locations")))
            .collect()
    }

    /// For each ID, where the chunk is stored (one batched read).
    pub fn chunk_locs(&self, ids: &[ChunkId]) -> Result<Vec<Option<ChunkLoc>>> {
        let cf = self.cf(CF_CHUNKS);
        self.db
            .multi_get_cf(ids.iter().map(|id| (cf, id.0)))
            .into_iter()
            .map(|r| match r.map_err(Error::index("reading chunk locations"))? {
                Some(v) => ChunkLoc::decode(&v).map(Some),
                None => Ok(None),
            })
            .collect()
    }

    /// Every set with its derived state.
    pub fn sets(&self) -> Vec<SetInfo> {
        let sets = self.sets.read().unwrap_or_else(|p| p.into_inner());
        let newest = sets.keys().next_back().copied();
        sets.iter()
            .map(|(id, r)| SetInfo {
                id: *id,
                name: r.name.clone(),
                priority: r.priority,
                started: r.started,
                finished: r.finished,
                base: r.base,
                state: match r.finished {
                    Some(_) => SetState::Completed,
                    None if Some(*id) == newest => SetState::Open,
                    None => SetState::Abandoned,
                },
                purged: r.purged,
                locked: r.locked,
                stats: r.stats,
                seal: r.seal.clone(),
            })
            .collect()
    }

    /// Runs `f` on the cached set rows, without copying them (sets are never forgotten, so
    /// a long-lived host has thousands).
    pub fn with_set_rows<T>(&self, f: impl FnOnce(&BTreeMap<SetId, SetRow>) -> T) -> T {
        f(&self.sets.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The open set: the newest set, if it has not completed (see [`Index::sets`]).
    pub fn open_set(&self) -> Option<SetId> {
        let sets = self.sets.read().unwrap_or_else(|p| p.into_inner());
        sets.iter().next_back().filter(|(_, r)| r.finished.is_none()).map(|(id, _)| *id)
    }

    /// The set row of `id`.
    pub fn set_row(&self, id: SetId) -> Option<SetRow> {
        self.sets.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    /// Rows written by `first` are seen by `reader` if `first` completed, or is `reader` itself
    /// (a running backup sees its own writes). Abandoned sets' rows are never seen.
    fn visible(sets: &BTreeMap<SetId, SetRow>, first: SetId, reader: SetId) -> bool {
        first == reader || sets.get(&first).is_some_and(|r| r.finished.is_some())
    }

    /// The row that set `set` itself wrote for an entry, if any.
    pub fn own_row(&self, dir: &DirId, name: &NameKey, set: SetId) -> Result<Option<EntryVersion>> {
        let key = entry_key(dir, name, set);
        let value = self.db.get_pinned_cf(self.cf(CF_ENTRIES), key).map_err(Error::index("reading entry"))?;
        value.map(|v| decode_entry(&key, &v)).transpose()
    }

    /// The version of an entry that set `set` sees.
    pub fn lookup(&self, set: SetId, dir: &DirId, name: &NameKey) -> Result<Option<FileVersion>> {
        let sets = self.sets.read().unwrap_or_else(|p| p.into_inner());
        let mut it = self.db.raw_iterator_cf(self.cf(CF_ENTRIES));
        it.seek_for_prev(entry_key(dir, name, set));
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if k.len() != 40 || k[..16] != dir.0 || k[16..32] != name.0 {
                break;
            }
            if Self::visible(&sets, entry_set(k), set) {
                return match decode_entry(k, v)? {
                    EntryVersion::Version(v) => Ok(Some(v)),
                    EntryVersion::Deleted(_) => Ok(None),
                };
            }
            it.prev();
        }
        it.status().map_err(Error::index("looking up entry"))?;
        Ok(None)
    }

    /// Every entry of a directory that set `set` sees, in key order.
    pub fn list(&self, set: SetId, dir: &DirId) -> Result<Vec<FileVersion>> {
        let sets = self.sets.read().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        let mut it = self.db.raw_iterator_cf(self.cf(CF_ENTRIES));
        it.seek(dir.0);
        // Rows of one name are consecutive, ordered by set; keep the last visible one ≤ `set`.
        // (name key, value of the visible row so far, its key)
        type Current = Option<([u8; 16], Option<Vec<u8>>, Vec<u8>)>;
        let mut current: Current = None;
        let flush = |cur: Current, out: &mut Vec<FileVersion>| -> Result<()> {
            if let Some((_, Some(v), k)) = cur {
                if let EntryVersion::Version(fv) = decode_entry(&k, &v)? {
                    out.push(fv);
                }
            }
            Ok(())
        };
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if k.len() != 40 || k[..16] != dir.0 {
                break;
            }
            let name: [u8; 16] = k[16..32].try_into().expect("16-byte slice");
            let first = entry_set(k);
            if current.as_ref().is_none_or(|c| c.0 != name) {
                flush(current.take(), &mut out)?;
                current = Some((name, None, Vec::new()));
            }
            if first <= set && Self::visible(&sets, first, set) {
                let c = current.as_mut().expect("set just above");
                c.1 = Some(v.to_vec());
                c.2 = k.to_vec();
            }
            it.next();
        }
        it.status().map_err(Error::index("listing directory"))?;
        flush(current, &mut out)?;
        Ok(out)
    }

    /// Every row of one entry, oldest first.
    pub fn history(&self, dir: &DirId, name: &NameKey) -> Result<Vec<EntryVersion>> {
        let mut out = Vec::new();
        let mut it = self.db.raw_iterator_cf(self.cf(CF_ENTRIES));
        it.seek(entry_key(dir, name, 0));
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if k.len() != 40 || k[..16] != dir.0 || k[16..32] != name.0 {
                break;
            }
            out.push(decode_entry(k, v)?);
            it.next();
        }
        it.status().map_err(Error::index("reading history"))?;
        Ok(out)
    }

    /// Calls `f` for every row of the `entries` family, in key order: rows of one entry are
    /// adjacent and ordered by the set that wrote them. Streams: nothing is collected.
    pub fn for_each_entry(&self, f: &mut dyn FnMut(&DirId, &NameKey, SetId, EntryVersion) -> Result<()>) -> Result<()> {
        let mut it = self.db.raw_iterator_cf(self.cf(CF_ENTRIES));
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if k.len() != 40 {
                return Err(bad_value("entry key", k.len()));
            }
            let dir = DirId(k[..16].try_into().expect("16-byte slice"));
            let name = NameKey(k[16..32].try_into().expect("16-byte slice"));
            f(&dir, &name, entry_set(k), decode_entry(k, v)?)?;
            it.next();
        }
        it.status().map_err(Error::index("reading entries"))
    }

    /// Calls `f` for every stored version that at least one of `readers` sees, with the readers
    /// that see it. `readers` must be completed sets in ascending order (the live sets, or one
    /// of them): `verify` uses this to find every chunk a kept set references.
    ///
    /// For a completed reader R the rule of [`Index::lookup`] reduces to this: a row written by
    /// set F is visible to R iff F = R or F completed, and F = R implies F completed. So the
    /// row of F is seen by exactly the readers R with F <= R < F', where F' is the set of the
    /// next row of the same entry whose set completed (a version or a deletion). Rows of sets
    /// that never completed are seen by no completed reader.
    pub fn for_each_seen_version(
        &self,
        readers: &[SetId],
        f: &mut dyn FnMut(&FileVersion, &[SetId]) -> Result<()>,
    ) -> Result<()> {
        let sets = self.sets.read().unwrap_or_else(|p| p.into_inner()).clone();
        let completed = |s: SetId| sets.get(&s).is_some_and(|r| r.finished.is_some());
        if let Some(r) = readers.iter().find(|r| !completed(**r)) {
            return Err(Error::Refused(format!("set {r} is not completed; only completed sets can be checked")));
        }
        if readers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::Refused("readers must be in ascending order".into()));
        }
        // The rows of the current entry: (dir, name) and its rows of completed sets, oldest
        // first. Bounded by the number of sets, however large the index.
        let mut group: Option<(DirId, NameKey)> = None;
        let mut rows: Vec<EntryVersion> = Vec::new();
        let mut flush = |rows: &mut Vec<EntryVersion>| -> Result<()> {
            for (i, row) in rows.iter().enumerate() {
                let EntryVersion::Version(v) = row else { continue };
                let until = rows.get(i + 1).map_or(SetId::MAX, |next| next.set());
                let from = readers.partition_point(|r| *r < v.set);
                let to = readers.partition_point(|r| *r < until);
                if from < to {
                    f(v, &readers[from..to])?;
                }
            }
            rows.clear();
            Ok(())
        };
        self.for_each_entry(&mut |dir, name, set, row| {
            if group != Some((*dir, *name)) {
                flush(&mut rows)?;
                group = Some((*dir, *name));
            }
            if completed(set) {
                rows.push(row);
            }
            Ok(())
        })?;
        flush(&mut rows)
    }

    /// For each entry row (directory, name, set that wrote it), whether `other` holds the same
    /// row with the same value. `verify` asks this of the index rebuilt from the log about every
    /// row a kept set sees: a row the log does not confirm would be lost by `rebuild-index`.
    pub fn same_entries(&self, other: &Index, rows: &[(DirId, NameKey, SetId)]) -> Result<Vec<bool>> {
        let get = |ix: &Index| -> Result<Vec<Option<Vec<u8>>>> {
            let cf = ix.cf(CF_ENTRIES);
            ix.db
                .multi_get_cf(rows.iter().map(|(d, n, s)| (cf, entry_key(d, n, *s))))
                .into_iter()
                .map(|r| r.map_err(Error::index("reading entries")))
                .collect()
        };
        let (mine, theirs) = (get(self)?, get(other)?);
        Ok(mine.iter().zip(&theirs).map(|(a, b)| a.is_some() && a == b).collect())
    }

    /// Calls `f` for every entry row with the position of the record that wrote it.
    pub fn for_each_entry_at(&self, f: &mut EntryAtFn<'_>) -> Result<()> {
        let mut it = self.db.raw_iterator_cf(self.cf(CF_ENTRIES));
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if k.len() != 40 {
                return Err(bad_value("entry key", k.len()));
            }
            let dir = DirId(k[..16].try_into().expect("16-byte slice"));
            let name = NameKey(k[16..32].try_into().expect("16-byte slice"));
            f(&dir, &name, entry_set(k), entry_pos(v)?, decode_entry(k, v)?)?;
            it.next();
        }
        it.status().map_err(Error::index("reading entries"))
    }

    /// Calls `f` for every stored chunk and its location.
    pub fn for_each_chunk(&self, f: &mut dyn FnMut(&ChunkId, ChunkLoc) -> Result<()>) -> Result<()> {
        let mut it = self.db.raw_iterator_cf(self.cf(CF_CHUNKS));
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let id = ChunkId(k.try_into().map_err(|_| bad_value("chunk key", k.len()))?);
            f(&id, ChunkLoc::decode(v)?)?;
            it.next();
        }
        it.status().map_err(Error::index("reading chunk locations"))
    }

    /// Segments retired by compaction, with the batch range each held (`first_seq`, next).
    pub fn retired(&self) -> Result<BTreeMap<u64, [u64; 2]>> {
        let mut out = BTreeMap::new();
        let mut it = self.db.raw_iterator_cf(self.cf(CF_META));
        it.seek(RETIRED_PREFIX);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let Some((seg, range)) = decode_retired(k, v)? else { break };
            out.insert(seg, range);
            it.next();
        }
        it.status().map_err(Error::index("reading retired segments"))?;
        Ok(out)
    }

    /// Per-host configuration values.
    pub fn config(&self) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        let mut it = self.db.raw_iterator_cf(self.cf(CF_CONFIG));
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            out.insert(String::from_utf8_lossy(k).into_owned(), String::from_utf8_lossy(v).into_owned());
            it.next();
        }
        it.status().map_err(Error::index("reading config"))?;
        Ok(out)
    }

    /// Every key and value of every column family, for comparing two indexes.
    pub fn dump(&self) -> Result<Vec<DumpRow>> {
        let mut out = Vec::new();
        for name in ALL_CFS {
            let mut it = self.db.raw_iterator_cf(self.cf(name));
            it.seek_to_first();
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                out.push((name, k.to_vec(), v.to_vec()));
                it.next();
            }
            it.status().map_err(Error::index("dumping"))?;
        }
        Ok(out)
    }

    /// Compares this (live) index with `expected`, one rebuilt from the log, column family by
    /// column family with two iterators in lockstep (nothing is loaded whole). Keeps the first
    /// `limit` differences and counts all of them. An iterator error aborts the comparison: it
    /// is never taken for the end of the data.
    pub fn compare(&self, expected: &Index, limit: usize) -> Result<Comparison> {
        use std::cmp::Ordering;
        let mut out = Comparison::default();
        for name in ALL_CFS {
            let mut live = self.db.raw_iterator_cf(self.cf(name));
            let mut log = expected.db.raw_iterator_cf(expected.cf(name));
            live.seek_to_first();
            log.seek_to_first();
            loop {
                let difference = match (live.key(), log.key()) {
                    (None, None) => break,
                    (Some(_), None) => Some((Difference::OnlyInIndex, Ordering::Less)),
                    (None, Some(_)) => Some((Difference::MissingFromIndex, Ordering::Greater)),
                    (Some(a), Some(b)) => match a.cmp(b) {
                        Ordering::Less => Some((Difference::OnlyInIndex, Ordering::Less)),
                        Ordering::Greater => Some((Difference::MissingFromIndex, Ordering::Greater)),
                        Ordering::Equal if live.value() == log.value() => None,
                        Ordering::Equal => Some((Difference::ValueDiffers, Ordering::Equal)),
                    },
                };
                // Which side to advance: the one with the smaller key, or both on equal keys.
                let step = match difference {
                    None => Ordering::Equal,
                    Some((difference, step)) => {
                        out.total += 1;
                        if out.mismatches.len() < limit {
                            let key = if step == Ordering::Greater { log.key() } else { live.key() };
                            let key = key.expect("the side that differs has a key").to_vec();
                            out.mismatches.push(IndexMismatch { cf: name, key, difference });
                        }
                        step
                    }
                };
                if step != Ordering::Greater {
                    live.next();
                }
                if step != Ordering::Less {
                    log.next();
                }
            }
            live.status().map_err(Error::index("comparing indexes"))?;
            log.status().map_err(Error::index("comparing indexes"))?;
        }
        Ok(out)
    }

    /// Deletes one key, as damage to the index would (tests of the checks only).
    #[cfg(test)]
    pub(crate) fn delete_raw(&self, cf: &str, key: &[u8]) {
        self.db.delete_cf(self.cf(cf), key).unwrap();
    }

    /// Flushes memtables so the index need not be replayed from its WAL on the next open.
    pub fn flush(&self) -> Result<()> {
        for name in ALL_CFS {
            self.db.flush_cf(self.cf(name)).map_err(Error::index("flushing"))?;
        }
        Ok(())
    }

    /// Rewrites the index's files without the rows that later writes replaced. Compaction
    /// moves every live row it copies, so without this the index would keep both the old and
    /// the new rows until RocksDB got round to merging them, and grow by what was reclaimed.
    pub fn compact_files(&self) {
        for name in ALL_CFS {
            self.db.compact_range_cf(self.cf(name), None::<&[u8]>, None::<&[u8]>);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use tardis_core::event::{ChunkStored, DeltaBase, EntryDeleted, Extent, SetCompleted, SetOpened, SetPurged};

    #[test]
    fn row_codecs_round_trip_and_refuse_bad_lengths() {
        let pos = Pos { segment: 3, offset: 4096 };
        assert_eq!(decode_applied(&encode_applied(pos)).unwrap(), pos);
        assert!(decode_applied(&[0; 15]).is_err());
        let (k, v) = encode_retired(7, [10, 12]);
        assert_eq!(decode_retired(&k, &v).unwrap(), Some((7, [10, 12])));
        assert_eq!(decode_retired(b"applied", &v).unwrap(), None);
        assert!(decode_retired(b"retired/1", &v).is_err());
        let row = SetRow { name: "Daily-1".into(), priority: 20, finished: Some(5), ..SetRow::default() };
        let (k, v) = encode_set_row(9, &row);
        assert_eq!(decode_set_row(&k, &v).unwrap(), (9, row));
        assert!(decode_set_row(&k[..7], &v).is_err());
        let loc = ChunkLoc { pos, plain_len: 100, stored_len: 60, encoding: 1, delta: None };
        assert_eq!(loc.encode().len(), 25);
        assert_eq!(ChunkLoc::decode(&loc.encode()).unwrap(), loc);
        let loc = ChunkLoc { delta: Some(DeltaBase { base: ChunkId([4; 32]), depth: 3 }), encoding: 7, ..loc };
        assert_eq!(ChunkLoc::decode(&loc.encode()).unwrap(), loc);
        assert!(ChunkLoc::decode(&loc.encode()[..57]).is_err());
        let key = entry_key(&DirId([1; 16]), &NameKey([2; 16]), 5);
        let deleted = encode_entry(pos, None);
        assert_eq!(entry_pos(&deleted).unwrap(), pos);
        assert_eq!(decode_entry(&key, &deleted).unwrap(), EntryVersion::Deleted(5));
        // Keys of the wrong length are refused rather than sliced.
        assert!(decode_entry(&key[..39], &deleted).is_err());
    }

    /// Applies `events` as one batch ending at offset `end` of segment 1.
    fn apply(ix: &Index, events: Vec<Event>, end: u64) {
        let applied: Vec<Applied> = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| Applied { pos: Pos { segment: 1, offset: end * 100 + i as u64 }, event, body_len: 7 })
            .collect();
        ix.apply(&applied, Pos { segment: 1, offset: end * 100 + 99 }).unwrap();
    }

    fn opened(set: SetId) -> Event {
        Event::SetOpened(SetOpened { set, name: format!("s{set}"), priority: 1, started: 0, base: None })
    }

    fn completed(set: SetId) -> Event {
        Event::SetCompleted(SetCompleted { set, finished: set as i64, stats: SetStats::default(), seal: None })
    }

    fn version(set: SetId, dir: u8, name: u8) -> Event {
        let id = ChunkId([set as u8; 32]);
        Event::FileVersion(FileVersion {
            set,
            dir: DirId([dir; 16]),
            name: NameKey([name; 16]),
            extents: vec![Extent { offset: 0, len: 3, id }],
            meta: Default::default(),
        })
    }

    /// The same small history, applied to a fresh index.
    fn small_history(path: &Path) -> Index {
        let ix = Index::open(path, IndexOptions::default()).unwrap();
        let chunk = Event::ChunkStored(ChunkStored { id: ChunkId([1; 32]), plain_len: 3, encoding: 0, delta: None });
        apply(&ix, vec![opened(1)], 1);
        apply(&ix, vec![chunk, version(1, 1, 1), version(1, 1, 2)], 2);
        apply(&ix, vec![completed(1)], 3);
        ix
    }

    #[test]
    fn compare_reports_a_missing_key_an_extra_key_and_a_changed_value() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (live, log) = (small_history(a.path()), small_history(b.path()));
        assert_eq!(live.compare(&log, 20).unwrap(), Comparison::default(), "equal histories give equal indexes");

        live.db.delete_cf(live.cf(CF_CHUNKS), [1; 32]).unwrap();
        let extra = entry_key(&DirId([9; 16]), &NameKey([9; 16]), 5);
        live.db.put_cf(live.cf(CF_ENTRIES), extra, [ENTRY_DELETED]).unwrap();
        live.db.put_cf(live.cf(CF_SETS), 1u64.to_be_bytes(), b"changed").unwrap();

        let cmp = live.compare(&log, 20).unwrap();
        assert_eq!(cmp.total, 3, "{cmp:?}");
        let expected = vec![
            IndexMismatch { cf: CF_CHUNKS, key: vec![1; 32], difference: Difference::MissingFromIndex },
            IndexMismatch { cf: CF_SETS, key: 1u64.to_be_bytes().to_vec(), difference: Difference::ValueDiffers },
            IndexMismatch { cf: CF_ENTRIES, key: extra.to_vec(), difference: Difference::OnlyInIndex },
        ];
        assert_eq!(cmp.mismatches, expected);
        // The other direction swaps the sides.
        let back = log.compare(&live, 20).unwrap();
        assert_eq!(back.mismatches[0].difference, Difference::OnlyInIndex);
        assert_eq!(back.mismatches[2].difference, Difference::MissingFromIndex);
        // Only `limit` differences are kept, all are counted.
        let cut = live.compare(&log, 1).unwrap();
        assert_eq!((cut.mismatches.len(), cut.total), (1, 3));
    }

    #[test]
    fn same_entries_confirms_only_identical_rows() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (live, log) = (small_history(a.path()), small_history(b.path()));
        let rows = [
            (DirId([1; 16]), NameKey([1; 16]), 1),
            (DirId([1; 16]), NameKey([2; 16]), 1),
            (DirId([1; 16]), NameKey([3; 16]), 1),
        ];
        assert_eq!(
            live.same_entries(&log, &rows).unwrap(),
            [true, true, false],
            "a row neither holds is not confirmed"
        );
        log.db.put_cf(log.cf(CF_ENTRIES), entry_key(&rows[1].0, &rows[1].1, 1), [ENTRY_DELETED]).unwrap();
        assert_eq!(live.same_entries(&log, &rows).unwrap(), [true, false, false]);
    }

    /// xorshift64, so the histories are varied but the same on every run.
    fn next(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    #[test]
    fn seen_versions_follow_exactly_the_lookup_rule() {
        for seed in 1..=25u64 {
            let dir = tempfile::tempdir().unwrap();
            let ix = Index::open(dir.path(), IndexOptions::default()).unwrap();
            let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut end = 0;
            let sets = 3 + next(&mut x) % 8;
            for set in 1..=sets {
                end += 1;
                apply(&ix, vec![opened(set)], end);
                let mut writes = Vec::new();
                for name in 0..4u8 {
                    match next(&mut x) % 4 {
                        0 => writes.push(version(set, 1, name)),
                        1 => writes.push(Event::EntryDeleted(EntryDeleted {
                            set,
                            dir: DirId([1; 16]),
                            name: NameKey([name; 16]),
                        })),
                        _ => {}
                    }
                }
                end += 1;
                apply(&ix, writes, end);
                // Some sets are abandoned (the next one is opened before they complete), some
                // completed sets are purged later on.
                if !next(&mut x).is_multiple_of(4) {
                    end += 1;
                    apply(&ix, vec![completed(set)], end);
                }
            }
            let purge = 1 + next(&mut x) % sets;
            end += 1;
            apply(&ix, vec![Event::SetPurged(SetPurged { set: purge, time: 0 })], end);
            let readers: Vec<SetId> = ix.sets().into_iter().filter(|s| s.is_live()).map(|s| s.id).collect();

            let mut expected: BTreeSet<(u8, SetId, SetId)> = BTreeSet::new();
            for r in &readers {
                for name in 0..4u8 {
                    if let Some(v) = ix.lookup(*r, &DirId([1; 16]), &NameKey([name; 16])).unwrap() {
                        expected.insert((name, v.set, *r));
                    }
                }
            }
            let mut seen = BTreeSet::new();
            ix.for_each_seen_version(&readers, &mut |v, by| {
                assert!(!by.is_empty());
                seen.extend(by.iter().map(|r| (v.name.0[0], v.set, *r)));
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, expected, "seed {seed}: readers {readers:?}");
        }
    }

    #[test]
    fn seen_versions_refuse_readers_that_are_not_completed() {
        let dir = tempfile::tempdir().unwrap();
        let ix = small_history(dir.path());
        apply(&ix, vec![opened(2)], 10);
        let err = ix.for_each_seen_version(&[1, 2], &mut |_, _| Ok(())).unwrap_err();
        assert!(err.to_string().contains("set 2 is not completed"), "{err}");
    }
}
