//! The backup walk: one set per run, recording only what changed since the last completed set.
//!
//! The walk visits the given paths depth-first in name order, side by side with the same
//! directories of the base set (the latest completed one). For every entry it decides:
//! - unchanged (the same metadata apart from atime, which includes device, inode, size, mtime
//!   and ctime, `fsmeta::same_meta`): nothing is written, the base row stays valid;
//! - new or changed: a new version is written; a file is read, chunked and hashed, and only
//!   chunks the repository lacks are encoded and sent;
//! - gone (in the base set, not on disk, or now excluded): a deletion is written, for a
//!   directory together with everything below it, so that a later directory of the same name
//!   never sees stale children.
//!
//! Three stages run at once. The walk reads files, cuts them into chunks and hashes them (BLAKE3
//! is an order of magnitude faster than compression, so one thread keeps up), and hands bounded
//! batches ([`BackupOptions::batch_bytes`]) to a sender thread. The sender asks the repository
//! which chunks it lacks and compresses and seals those on all cores, while an appender thread
//! appends the batch before, so a remote repository's round trips overlap the work.
//!
//! A new chunk of a changed file is also tried as a delta against the chunk of the previous
//! version that covered the most of the same byte range (its "hint"): the sender reads that
//! chunk back from the repository, encodes a fast_rsync delta, and stores the delta instead of
//! the full chunk when it takes at most `MaxDeltaPercent` of the space and the chain stays
//! within `MaxDeltaChain` (both per-host settings). A database or disk image with scattered
//! small writes changes nearly every chunk, so without deltas it would be stored again whole. At most
//! one batch waits between each two stages, so memory stays bounded whatever the tree size. Batches
//! are appended in order, so every version reaches the repository after (or with) the chunks it
//! references, which the repository checks. Nothing here knows whether the repository is local
//! or remote: it only uses [`Repository`].

use crate::error::{Error, Result};
use crate::exclude::{ExcludeConfig, Rules};
use crate::fsmeta::{self, Owners};
use crate::prefetch::Prefetch;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc;
use tardis_core::api::{Repository, SetState, Write};
use tardis_core::chunk::Chunker;
use tardis_core::chunkcodec::{self, EncodedChunk};
use tardis_core::config::Config;
use tardis_core::crypto::Keys;
use tardis_core::event::{EntryDeleted, Extent, FileVersion, SetStats, MAX_CHAIN};
use tardis_core::ids::{ChunkId, DirId, SetId};
use tardis_core::meta::{FileMeta, Kind};
use tardis_core::view::{self, Node, Tree};

/// How to run a backup.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Set name; by default the seed's schedule names (see [`choose_name`]).
    pub name: Option<String>,
    pub priority: Option<u32>,
    /// Read every file, even those whose stat says unchanged.
    pub full: bool,
    /// Descend into other file systems below the given paths.
    pub crossdev: bool,
    pub excludes: ExcludeConfig,
    /// File data gathered before it is hashed, encoded and sent as one batch. Up to three
    /// batches of raw data (being filled, queued, being encoded) and two encoded ones (waiting
    /// for the appender, being appended) are in memory at once [default: [`LOCAL_BATCH_BYTES`]].
    pub batch_bytes: usize,
    /// The time that picks the schedule name (Unix nanoseconds) [default: the system clock].
    pub now: Option<i64>,
}

/// The batch size into a local repository. 4 MiB backs up the benchmark corpus as fast as 32 MiB
/// did (23.4-24.7 s against 23.8 s) with 100 MiB of peak RSS instead of 218 MiB.
pub const LOCAL_BATCH_BYTES: usize = 4 << 20;

/// The batch size to a server, where each batch costs round trips (its chunks' uploads, then its
/// versions) that only larger batches amortize. 105 MiB through a 100 ms round trip took 12.6 s
/// in 4 MiB batches, 9.4 s in 8 MiB, 7.7 s in 16 MiB and 7.1-7.8 s in 32 MiB.
pub const REMOTE_BATCH_BYTES: usize = 16 << 20;

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            name: None,
            priority: None,
            full: false,
            crossdev: false,
            excludes: ExcludeConfig::from_env(Vec::new(), Vec::new()),
            batch_bytes: LOCAL_BATCH_BYTES,
            now: None,
        }
    }
}

/// What a backup did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BackupStats {
    pub set: SetId,
    pub set_name: String,
    pub priority: u32,
    /// Entries in the set (files, directories, links, ...).
    pub entries: u64,
    pub files: u64,
    /// Bytes of file data in the set.
    pub bytes: u64,
    /// Files whose contents were read in this run, and how many bytes.
    pub files_read: u64,
    pub bytes_read: u64,
    /// Entries written as new versions, and entries deleted.
    pub changed: u64,
    pub deleted: u64,
    /// Chunks sent to the repository and their stored size.
    pub new_chunks: u64,
    pub new_bytes: u64,
    /// Of those, chunks stored as deltas against a chunk of the previous version.
    pub delta_chunks: u64,
    /// Problems that did not stop the backup (unreadable or vanished files, sockets skipped).
    pub warnings: Vec<String>,
    /// Sets removed by `--purge` after the backup (filled in by the caller that purged).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub purged: Vec<String>,
}

/// Receives progress while a backup runs.
pub trait Progress: Sync {
    /// An entry is being looked at.
    fn entry(&self, _path: &Path) {}
    /// File bytes were read.
    fn read(&self, _bytes: u64) {}
}

/// Reports nothing.
#[derive(Debug)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// The seed's set naming: the first unused of the monthly, weekly, daily and hourly names (with
/// priorities 40, 30, 20, 10), else a timestamped name with priority 0.
pub fn choose_name(now: chrono::DateTime<chrono::Local>, taken: &HashSet<String>) -> (String, u32) {
    let candidates = [
        (now.format("Monthly-%Y-%m").to_string(), 40),
        (now.format("Weekly-%Y-%U").to_string(), 30),
        (now.format("Daily-%Y-%m-%d").to_string(), 20),
        (now.format("Hourly-%Y-%m-%d-%H").to_string(), 10),
    ];
    for (name, prio) in candidates {
        if !taken.contains(&name) {
            return (name, prio);
        }
    }
    (now.format("Backup_%Y-%m-%d_%H:%M:%S").to_string(), 0)
}

/// Makes `path` absolute and removes `.` and `..` lexically (symlinks are not followed, so a
/// given symlink is backed up as a link).
pub fn normalize(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path).map_err(Error::io_at("resolving", path))?;
    let mut out = PathBuf::from("/");
    for c in abs.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(out)
}

/// The paths to back up as a tree: inner nodes are ancestors recorded for their metadata only,
/// `full` nodes are backed up with everything below them.
#[derive(Debug, Default)]
struct Selection {
    full: bool,
    children: BTreeMap<Vec<u8>, Selection>,
}

impl Selection {
    fn new(paths: &[PathBuf]) -> Selection {
        let mut root = Selection::default();
        for p in paths {
            let mut node = &mut root;
            for c in p.components() {
                if let Component::Normal(n) = c {
                    node = node.children.entry(n.as_bytes().to_vec()).or_default();
                }
            }
            node.full = true;
        }
        root
    }
}

/// Runs one backup of `paths` (absolute, normalized) into a new set and completes it.
pub fn backup(
    repo: &dyn Repository,
    keys: &Keys,
    paths: &[PathBuf],
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupStats> {
    for p in paths {
        fs::symlink_metadata(p).map_err(Error::io_at("reading", p))?;
    }
    let sets = repo.sets()?;
    let base = sets.iter().rev().find(|s| s.state == SetState::Completed).map(|s| s.id);
    let taken: HashSet<String> = sets.iter().filter(|s| s.is_live()).map(|s| s.name.clone()).collect();
    let (name, prio) = match &opts.name {
        Some(n) => (n.clone(), opts.priority.unwrap_or(0)),
        None => {
            let now = match opts.now {
                Some(t) => chrono::TimeZone::timestamp_nanos(&chrono::Local, t),
                None => chrono::Local::now(),
            };
            let (n, p) = choose_name(now, &taken);
            (n, opts.priority.unwrap_or(p))
        }
    };
    let config = Config::from_stored(&repo.config()?)?;
    let policy = DeltaPolicy {
        max_chain: config.max_delta_chain().min(u32::from(MAX_CHAIN)) as u8,
        max_percent: config.max_delta_percent(),
    };
    let set = repo.open_set(&name, prio)?;
    let seal = seal_opened(repo, keys, set, &name, prio, base)?;
    tracing::info!(set, name, base, "backup started");
    let mut stats = BackupStats { set, set_name: name, priority: prio, ..BackupStats::default() };
    let (tx, rx) = mpsc::sync_channel::<Batch>(1);
    let prefetch = Prefetch::start();
    let (walked, sent) = std::thread::scope(|scope| {
        let sender = scope.spawn(move || send_batches(repo, keys, set, rx, policy));
        let mut w = Walker {
            keys,
            set,
            base: base.map(|b| Tree::new(repo, keys, b)),
            opts,
            progress,
            owners: Owners::new(),
            chunker: Chunker::default(),
            batch: Batch::default(),
            tx: Some(tx),
            links: HashMap::new(),
            prefetch: &prefetch,
            stats: &mut stats,
        };
        let walked = w.walk(paths);
        // Dropping the walker closes the channel, so the sender finishes.
        drop(w);
        let sent = sender.join().unwrap_or_else(|_| Err(Error::Invalid("the sender thread panicked".into())));
        (walked, sent)
    });
    // The sender's error explains a walk that stopped because its batches were refused.
    let sent = sent?;
    walked?;
    let (new_chunks, new_bytes) = (sent.chunks, sent.bytes);
    stats.new_chunks = new_chunks;
    stats.new_bytes = new_bytes;
    stats.delta_chunks = sent.deltas;
    let totals = SetStats { entries: stats.entries, bytes: stats.bytes, changed: stats.changed, new_chunks, new_bytes };
    repo.complete_set(set, totals, Some(seal))?;
    tracing::info!(set, "backup completed");
    Ok(stats)
}

/// The seal of the set just opened, made from the server's record of it after checking that
/// the record says what was asked for: the name, the priority and the base this backup
/// records its changes against.
fn seal_opened(
    repo: &dyn Repository,
    keys: &Keys,
    set: SetId,
    name: &str,
    priority: u32,
    base: Option<SetId>,
) -> Result<Vec<u8>> {
    let info = repo.sets()?.into_iter().find(|s| s.id == set);
    match info {
        Some(i) if i.state == SetState::Open && i.name == name && i.priority == priority && i.base == base => {
            Ok(tardis_core::setseal::seal(keys, &i)?)
        }
        other => Err(Error::Invalid(format!(
            "the repository recorded set {set} differently from what was asked ({name}, priority {priority}, \
             base {base:?}): {other:?}"
        ))),
    }
}

/// Work handed from the walk to the sender: hashed chunk data and versions/deletions.
#[derive(Debug, Default)]
struct Batch {
    chunks: Vec<NewChunk>,
    ids: HashSet<ChunkId>,
    bytes: usize,
    writes: Vec<Write>,
}

/// A chunk the walk read, and the chunk of the previous version it most likely replaces.
#[derive(Debug)]
struct NewChunk {
    id: ChunkId,
    data: Vec<u8>,
    hint: Option<ChunkId>,
}

const MAX_BATCH_ENTRIES: usize = 20_000;

/// When a changed chunk is stored as a delta (the host's `MaxDeltaChain`, `MaxDeltaPercent`).
#[derive(Debug, Clone, Copy)]
struct DeltaPolicy {
    max_chain: u8,
    max_percent: u32,
}

/// Bases read at once: reading is a round trip per chunk to a remote repository, so more
/// than the cores' worth are in flight.
const BASE_READERS: usize = 8;

/// What the sender stored.
#[derive(Debug, Default)]
struct Sent {
    chunks: u64,
    bytes: u64,
    deltas: u64,
}

/// The sender stage: for each batch in order, finds the chunks the repository lacks, encodes
/// them on all cores (as deltas where that pays) and appends them with the batch's versions.
///
/// Two threads, so that a remote repository's round trips overlap: while one batch is being
/// appended (its chunks uploaded, then its versions), the next one is asked about and encoded.
/// One batch at a time crossed a 100 ms round trip three times per 4 MiB batch, which took
/// twice as long as 32 MiB batches over such a link.
fn send_batches(
    repo: &dyn Repository,
    keys: &Keys,
    set: SetId,
    rx: mpsc::Receiver<Batch>,
    policy: DeltaPolicy,
) -> Result<Sent> {
    // A rendezvous: a hand-over completes only when the appender has finished the batch before.
    let (tx, encoded) = mpsc::sync_channel::<Vec<Write>>(0);
    std::thread::scope(|scope| {
        let appender = scope.spawn(move || -> Result<()> {
            for writes in encoded {
                repo.append(set, writes)?;
            }
            Ok(())
        });
        let sent = encode_batches(repo, keys, rx, policy, tx);
        let appended = appender.join().unwrap_or_else(|_| Err(Error::Invalid("the append thread panicked".into())));
        // An append error explains an encoder that stopped because its hand-over was refused.
        appended?;
        sent
    })
}

/// The first half of [`send_batches`]: turns each batch into the writes to append and hands
/// them to the appender.
fn encode_batches(
    repo: &dyn Repository,
    keys: &Keys,
    rx: mpsc::Receiver<Batch>,
    policy: DeltaPolicy,
    tx: mpsc::SyncSender<Vec<Write>>,
) -> Result<Sent> {
    let mut sent = Sent::default();
    // The new chunks of the batch being appended while the next one is asked about: the
    // repository may not have them yet, and they must not be sent twice.
    let mut in_flight: HashSet<ChunkId> = HashSet::new();
    for batch in rx {
        let ids: Vec<ChunkId> = batch.chunks.iter().map(|c| c.id).filter(|id| !in_flight.contains(id)).collect();
        let missing: HashSet<ChunkId> = repo.missing_chunks(&ids)?.into_iter().collect();
        let new: Vec<&NewChunk> = batch.chunks.iter().filter(|c| missing.contains(&c.id)).collect();
        let bases = if policy.max_percent > 0 {
            read_bases(repo, keys, new.iter().filter_map(|c| c.hint), policy.max_chain)
        } else {
            HashMap::new()
        };
        let encoded: Vec<EncodedChunk> = new
            .par_iter()
            .map(|c| encode_chunk(keys, c, c.hint.and_then(|h| bases.get(&h)), policy))
            .collect::<tardis_core::Result<_>>()?;
        let mut writes: Vec<Write> = Vec::with_capacity(encoded.len() + batch.writes.len());
        for c in encoded {
            sent.chunks += 1;
            sent.bytes += c.body.len() as u64;
            sent.deltas += u64::from(c.delta.is_some());
            writes.push(Write::Chunk(c));
        }
        writes.extend(batch.writes);
        // The raw data is encoded now: free it before waiting for the appender.
        drop(new);
        drop(bases);
        drop(batch.chunks);
        if !writes.is_empty() {
            // Refused: the appender stopped on an error, which send_batches reports.
            tx.send(writes).map_err(|_| Error::Invalid("the repository stopped accepting writes".into()))?;
            // The hand-over means the batch before is appended; this one now is in flight.
            in_flight = missing;
        }
    }
    Ok(sent)
}

/// Reads the plaintext of the given chunks, `BASE_READERS` at a time, keeping those whose
/// chain leaves room for one more delta. A base that cannot be read only costs its delta: the
/// chunk is then stored in full (and a damaged repository is `verify`'s to report).
fn read_bases(
    repo: &dyn Repository,
    keys: &Keys,
    hints: impl Iterator<Item = ChunkId>,
    max_chain: u8,
) -> HashMap<ChunkId, view::Plain> {
    let mut wanted: Vec<ChunkId> = hints.collect();
    wanted.sort_unstable();
    wanted.dedup();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let found = std::sync::Mutex::new(HashMap::new());
    std::thread::scope(|scope| {
        for _ in 0..BASE_READERS.min(wanted.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(id) = wanted.get(i) else { break };
                match view::read_chunk(repo, keys, id) {
                    Ok(plain) if plain.depth < max_chain => {
                        found.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(*id, plain);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("reading chunk {id} as a delta base: {e}; storing in full"),
                }
            });
        }
    });
    found.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Encodes one new chunk: as a delta against `base` when that is allowed and small enough,
/// otherwise in full.
fn encode_chunk(
    keys: &Keys,
    c: &NewChunk,
    base: Option<&view::Plain>,
    policy: DeltaPolicy,
) -> tardis_core::Result<EncodedChunk> {
    let delta = match (base, c.hint) {
        (Some(base), Some(base_id)) => chunkcodec::encode_delta(keys, c.id, &c.data, base_id, &base.plain, base.depth)?,
        _ => None,
    };
    let Some(delta) = delta else { return chunkcodec::encode(keys, c.id, &c.data) };
    let (stored, budget) = (delta.body.len() as u64 * 100, u64::from(policy.max_percent));
    // The full size the delta is held against, without compressing the chunk in full to learn
    // it: zstd at level 3 rarely shrinks a chunk past 1/16, and the chunk the delta is taken
    // against is the same content before the change, so it compresses about as well as the
    // full chunk at the bottom of its chain did. Compressing every changed chunk in full to
    // compare took a fifth of the CPU time of the corpus's v1 -> v2 backup.
    if stored <= budget * full_estimate(c.data.len(), base) {
        return Ok(delta);
    }
    let full = chunkcodec::encode(keys, c.id, &c.data)?;
    Ok(if stored <= budget * full.body.len() as u64 { delta } else { full })
}

/// What a chunk of `len` bytes taking the place of `base` is taken to cost stored in full: the
/// compression ratio of the full chunk under `base`'s chain, and never less than 1/16 of `len`.
fn full_estimate(len: usize, base: Option<&view::Plain>) -> u64 {
    let floor = len as u64 / 16;
    base.and_then(|b| b.full_sizes).map_or(floor, |(full, plain)| floor.max(len as u64 * full / plain.max(1)))
}

struct Walker<'a, 's> {
    keys: &'a Keys,
    set: SetId,
    base: Option<Tree<'a>>,
    opts: &'a BackupOptions,
    progress: &'a dyn Progress,
    owners: Owners,
    chunker: Chunker,
    batch: Batch,
    /// Hand-over to the sender; `None` once the walk is over.
    tx: Option<mpsc::SyncSender<Batch>>,
    /// Hard-linked files already read in this run: (dev, ino) → their extents.
    links: HashMap<(u64, u64), Vec<Extent>>,
    prefetch: &'a Prefetch,
    stats: &'s mut BackupStats,
}

/// Entries of a directory whose metadata the walk reads before their turn, so that the data of
/// the files among them it will read is on its way from the disk while it hashes the one before.
/// On a cold cache, the first backup of the benchmark corpus (86,624 files, 2.1 GB) took 15.1 s
/// reading each file in turn and 11.0 s looking 32 entries ahead; 128 gained nothing more.
const LOOKAHEAD: usize = 32;

/// A directory entry met ahead of its turn, with its metadata if it is not a directory.
struct Ahead {
    name: Vec<u8>,
    is_dir: bool,
    path: PathBuf,
    captured: Option<Result<Option<FileMeta>>>,
}

/// The chunk of `old` (sorted extents) that overlaps `[offset, offset + len)` the most: what a
/// new chunk at that place most likely replaced.
fn replaced_chunk(old: &[Extent], offset: u64, len: u64) -> Option<ChunkId> {
    let end = offset + len;
    let first = old.partition_point(|e| e.offset + u64::from(e.len) <= offset);
    old[first..]
        .iter()
        .take_while(|e| e.offset < end)
        .map(|e| (end.min(e.offset + u64::from(e.len)) - offset.max(e.offset), e.id))
        .max_by_key(|(overlap, _)| *overlap)
        .map(|(_, id)| id)
}

/// Opens the regular file `path` whose metadata `meta` the walk captured (up to [`LOOKAHEAD`]
/// entries ago), for reading, and checks that it is still that file.
fn open_captured(path: &Path, meta: &FileMeta) -> Result<fs::File> {
    let file = fsmeta::open_chosen(path).map_err(Error::io_at("opening", path))?;
    let opened = file.metadata().map_err(Error::io_at("reading metadata of", path))?;
    if !opened.is_file() || opened.dev() != meta.dev || opened.ino() != meta.ino {
        return Err(Error::Invalid("it was replaced by another entry since its metadata was read".into()));
    }
    Ok(file)
}

impl Walker<'_, '_> {
    /// Walks every selected path and hands the last batch over.
    fn walk(&mut self, paths: &[PathBuf]) -> Result<()> {
        let selection = Selection::new(paths);
        let base_root = match &self.base {
            Some(t) => t.root()?,
            None => None,
        };
        self.selected(Path::new("/"), &DirId::TOP, view::ROOT_NAME, &selection, base_root.as_ref())?;
        self.flush()?;
        self.tx = None;
        Ok(())
    }

    fn warn(&mut self, msg: String) {
        tracing::warn!("{msg}");
        self.stats.warnings.push(msg);
    }

    /// The base set's entries below `dir`, by name: none unless the base entry is a directory.
    fn base_children(&self, dir: &DirId, base: Option<&Node>) -> Result<BTreeMap<Vec<u8>, Node>> {
        match (&self.base, base) {
            (Some(t), Some(b)) if b.meta.kind == Kind::Dir => {
                Ok(t.children_of(dir)?.into_iter().map(|n| (n.meta.name.to_vec(), n)).collect())
            }
            _ => Ok(BTreeMap::new()),
        }
    }

    /// Deletes every base entry below `dir` (whose base entry is `base`), recursively.
    fn delete_children(&mut self, dir: &DirId, base: Option<&Node>) -> Result<()> {
        for child in self.base_children(dir, base)?.values() {
            self.delete(dir, child)?;
        }
        Ok(())
    }

    /// An ancestor of the given paths (or one of them): recorded for its metadata, and only the
    /// selected children are visited.
    fn selected(
        &mut self,
        path: &Path,
        parent: &DirId,
        name: &[u8],
        sel: &Selection,
        base: Option<&Node>,
    ) -> Result<()> {
        if sel.full {
            let rules = self.opts.excludes.root_rules(path)?;
            let dev = fs::symlink_metadata(path).map_err(Error::io_at("reading", path))?.dev();
            self.entry(path, parent, name, base, &rules, dev, None)?;
            return Ok(());
        }
        let Some(meta) = fsmeta::capture(path, name, &self.owners)? else {
            return Err(Error::Invalid(format!(
                "{} is not a directory (a symlink?); give the path without symlinks",
                path.display()
            )));
        };
        let dir = self.keys.dir_id(parent, name);
        let mut base_children = self.base_children(&dir, base)?;
        for (cname, csel) in &sel.children {
            let cbase = base_children.remove(cname);
            let cpath = path.join(std::ffi::OsStr::from_bytes(cname));
            self.selected(&cpath, &dir, cname, csel, cbase.as_ref())?;
        }
        for gone in base_children.values() {
            self.delete(&dir, gone)?;
        }
        self.record(parent, name, meta, base)
    }

    /// Writes a new version of a non-file entry unless the base holds the same metadata.
    fn record(&mut self, parent: &DirId, name: &[u8], meta: FileMeta, base: Option<&Node>) -> Result<()> {
        self.stats.entries += 1;
        if base.is_some_and(|b| fsmeta::same_meta(&b.meta, &meta)) {
            return Ok(());
        }
        self.clear_stale_children(parent, name, &meta, base)?;
        let key = self.keys.name_key(parent, name);
        let sealed = view::seal_meta(self.keys, parent, &key, self.set, &meta)?;
        self.stats.changed += 1;
        self.batch.writes.push(Write::Version(FileVersion {
            set: self.set,
            dir: *parent,
            name: key,
            extents: Vec::new(),
            meta: sealed,
        }));
        self.maybe_flush()
    }

    /// A directory replaced by something else loses its children too.
    fn clear_stale_children(
        &mut self,
        parent: &DirId,
        name: &[u8],
        meta: &FileMeta,
        base: Option<&Node>,
    ) -> Result<()> {
        if meta.kind == Kind::Dir {
            return Ok(());
        }
        self.delete_children(&self.keys.dir_id(parent, name), base)
    }

    /// Records the deletion of a base entry and, for a directory, of everything below it.
    fn delete(&mut self, parent: &DirId, node: &Node) -> Result<()> {
        self.delete_children(&self.keys.dir_id(parent, &node.meta.name), Some(node))?;
        self.stats.deleted += 1;
        self.batch.writes.push(Write::Delete(EntryDeleted { set: self.set, dir: *parent, name: node.version.name }));
        self.maybe_flush()
    }

    /// Backs up one entry and, for a directory, everything below it. `captured` is its metadata
    /// if it was read ahead.
    #[allow(clippy::too_many_arguments)]
    fn entry(
        &mut self,
        path: &Path,
        parent: &DirId,
        name: &[u8],
        base: Option<&Node>,
        rules: &Rules,
        dev: u64,
        captured: Option<Result<Option<FileMeta>>>,
    ) -> Result<bool> {
        self.progress.entry(path);
        let captured = captured.unwrap_or_else(|| fsmeta::capture(path, name, &self.owners));
        let meta = match captured {
            Ok(Some(m)) => m,
            Ok(None) => {
                self.warn(format!("skipped socket {}", path.display()));
                return Ok(false);
            }
            Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                self.warn(format!("{} vanished during the backup", path.display()));
                return Ok(false);
            }
            Err(e) => {
                self.warn(format!("cannot back up {}: {e}", path.display()));
                return Ok(false);
            }
        };
        match meta.kind {
            Kind::Dir => self.directory(path, parent, name, meta, base, rules, dev)?,
            Kind::File => self.file(path, parent, name, meta, base)?,
            _ => self.record(parent, name, meta, base)?,
        }
        Ok(true)
    }

    #[allow(clippy::too_many_arguments)]
    fn directory(
        &mut self,
        path: &Path,
        parent: &DirId,
        name: &[u8],
        meta: FileMeta,
        base: Option<&Node>,
        rules: &Rules,
        dev: u64,
    ) -> Result<()> {
        let dir = self.keys.dir_id(parent, name);
        let mut base_children = self.base_children(&dir, base)?;
        // Another file system below a given path is recorded as an empty mount point.
        let descend = self.opts.crossdev || meta.dev == dev;
        if descend {
            let child_rules = match rules.enter_dir(path) {
                Ok(r) => r,
                Err(e) => {
                    self.warn(format!("ignoring exclude patterns of {}: {e}", path.display()));
                    rules.clone()
                }
            };
            let mut names: Vec<(Vec<u8>, bool)> = Vec::new();
            match fsmeta::list_dir(path) {
                Ok(entries) => {
                    for e in entries {
                        match e {
                            Ok(name) => names.push(name),
                            Err(e) => self.warn(format!("listing {}: {e}", path.display())),
                        }
                    }
                }
                Err(e) => self.warn(format!("cannot list {}: {e}", path.display())),
            }
            names.sort();
            let kept: Vec<(Vec<u8>, bool, PathBuf)> = names
                .into_iter()
                .filter_map(|(cname, is_dir)| {
                    let cpath = path.join(std::ffi::OsStr::from_bytes(&cname));
                    (!child_rules.is_excluded(&cpath, is_dir)).then_some((cname, is_dir, cpath))
                })
                .collect();
            // Before skip_dir, which already reads inside each subdirectory.
            let same_dev = (!self.opts.crossdev).then_some(dev);
            for (_, _, cpath) in kept.iter().filter(|k| k.1) {
                self.prefetch.dir(cpath, same_dev);
            }
            let mut ahead: VecDeque<Ahead> = VecDeque::with_capacity(LOOKAHEAD);
            let mut rest = kept.into_iter();
            loop {
                while ahead.len() < LOOKAHEAD {
                    let Some((name, is_dir, path)) = rest.next() else { break };
                    let captured = (!is_dir).then(|| self.look_ahead(&path, &name, base_children.get(&name)));
                    ahead.push_back(Ahead { name, is_dir, path, captured });
                }
                let Some(next) = ahead.pop_front() else { break };
                if next.is_dir && child_rules.skip_dir(&next.path) {
                    continue;
                }
                let cbase = base_children.remove(&next.name);
                self.entry(&next.path, &dir, &next.name, cbase.as_ref(), &child_rules, dev, next.captured)?;
            }
        }
        for gone in base_children.values() {
            self.delete(&dir, gone)?;
        }
        self.record(parent, name, meta, base)
    }

    /// Reads the metadata of a directory's non-directory entry before its turn, and if it is a
    /// file the walk will read, has its data requested from the disk.
    fn look_ahead(&self, path: &Path, name: &[u8], base: Option<&Node>) -> Result<Option<FileMeta>> {
        let captured = fsmeta::capture(path, name, &self.owners);
        if let Ok(Some(meta)) = &captured {
            if meta.kind == Kind::File && meta.size > 0 && !self.unchanged(meta, base) {
                self.prefetch.data(path, meta.size);
            }
        }
        captured
    }

    /// Whether file `meta` is recorded by its base version as it is, without reading it.
    fn unchanged(&self, meta: &FileMeta, base: Option<&Node>) -> bool {
        !self.opts.full && base.is_some_and(|b| fsmeta::same_meta(&b.meta, meta))
    }

    fn file(
        &mut self,
        path: &Path,
        parent: &DirId,
        name: &[u8],
        mut meta: FileMeta,
        base: Option<&Node>,
    ) -> Result<()> {
        self.stats.entries += 1;
        self.stats.files += 1;
        self.stats.bytes += meta.size;
        if self.unchanged(&meta, base) {
            return Ok(());
        }
        self.clear_stale_children(parent, name, &meta, base)?;
        let link_key = (meta.nlink > 1).then_some((meta.dev, meta.ino));
        let extents = match link_key.and_then(|k| self.links.get(&k)) {
            // Another name of a file read earlier in this run: same data, no second read.
            Some(extents) => extents.clone(),
            None => match self.read_file(path, &mut meta, base.filter(|b| b.meta.kind == Kind::File)) {
                Ok(extents) => extents,
                Err(e) => {
                    // The entry keeps its base version, or is left out if it is new; chunks
                    // already handed over are harmless (unreferenced).
                    self.warn(format!("cannot read {}: {e}", path.display()));
                    return Ok(());
                }
            },
        };
        if let Some(k) = link_key {
            self.links.insert(k, extents.clone());
        }
        self.stats.changed += 1;
        let key = self.keys.name_key(parent, name);
        let sealed = view::seal_meta(self.keys, parent, &key, self.set, &meta)?;
        self.batch.writes.push(Write::Version(FileVersion {
            set: self.set,
            dir: *parent,
            name: key,
            extents,
            meta: sealed,
        }));
        self.maybe_flush()
    }

    /// Reads a file's data regions, hashing each chunk and handing its data to the batch, with
    /// the chunk of `previous` (the file's version in the base set) that each one replaces.
    fn read_file(&mut self, path: &Path, meta: &mut FileMeta, previous: Option<&Node>) -> Result<Vec<Extent>> {
        let old: &[Extent] = previous.map_or(&[], |p| &p.version.extents);
        let mut file = open_captured(path, meta)?;
        let regions = if meta.sparse {
            fsmeta::data_regions(&file, meta.size).map_err(Error::io_at("finding data regions of", path))?
        } else {
            vec![(0, meta.size)]
        };
        self.stats.files_read += 1;
        let mut extents = Vec::new();
        let mut end = 0u64;
        for (start, len) in regions {
            file.seek(SeekFrom::Start(start)).map_err(Error::io_at("seeking in", path))?;
            let mut reader = (&file).take(len);
            // FastCDC never cuts below its minimum size, so a region that small is one chunk:
            // read it directly instead of setting up a 4 MiB streaming buffer per small file.
            let small = len <= u64::from(self.chunker.params().min);
            let chunks: Box<dyn Iterator<Item = io::Result<tardis_core::chunk::Chunk>>> = if small {
                let mut data = Vec::with_capacity(len as usize);
                let read = reader.read_to_end(&mut data).map(|_| tardis_core::chunk::Chunk { offset: 0, data });
                Box::new(std::iter::once(read).filter(|c| !c.as_ref().is_ok_and(|c| c.data.is_empty())))
            } else {
                Box::new(self.chunker.stream(reader))
            };
            for chunk in chunks {
                let chunk = chunk.map_err(Error::io_at("reading", path))?;
                let n = chunk.data.len();
                let offset = start + chunk.offset;
                end = offset + n as u64;
                self.stats.bytes_read += n as u64;
                self.progress.read(n as u64);
                let id = self.keys.chunk_id(&chunk.data);
                extents.push(Extent { offset, len: n as u32, id });
                if self.batch.ids.insert(id) {
                    self.batch.bytes += n;
                    let hint = replaced_chunk(old, offset, n as u64).filter(|h| *h != id);
                    self.batch.chunks.push(NewChunk { id, data: chunk.data, hint });
                }
                self.maybe_flush()?;
            }
        }
        let after = file.metadata().map_err(Error::io_at("reading metadata of", path))?;
        if !meta.sparse && end < meta.size {
            self.warn(format!("{} shrank while being read; stored its first {end} bytes", path.display()));
            meta.size = end;
        } else if after.len() != meta.size
            || after.mtime() != meta.mtime.sec
            || after.mtime_nsec() as u32 != meta.mtime.nsec
        {
            self.warn(format!("{} changed while being read; stored what was read", path.display()));
        }
        Ok(extents)
    }

    fn maybe_flush(&mut self) -> Result<()> {
        if self.batch.bytes >= self.opts.batch_bytes
            || self.batch.chunks.len() + self.batch.writes.len() >= MAX_BATCH_ENTRIES
        {
            self.flush()?;
        }
        Ok(())
    }

    /// Hands the current batch to the sender, waiting while two batches are already queued.
    fn flush(&mut self) -> Result<()> {
        let batch = std::mem::take(&mut self.batch);
        if batch.chunks.is_empty() && batch.writes.is_empty() {
            return Ok(());
        }
        let tx = self.tx.as_ref().ok_or_else(|| Error::Invalid("batch after the end of the walk".into()))?;
        // A closed channel means the sender stopped on an error, which `backup` reports.
        tx.send(batch).map_err(|_| Error::Invalid("the repository stopped accepting writes".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(full_sizes: Option<(u64, u64)>) -> view::Plain {
        view::Plain { plain: Vec::new(), depth: 0, full_sizes }
    }

    #[test]
    fn a_file_replaced_after_its_metadata_was_read_is_not_read() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f");
        let capture = |p: &Path| fsmeta::capture(p, b"f", &Owners::new()).unwrap().unwrap();
        fs::write(&p, b"data").unwrap();
        let meta = capture(&p);
        assert!(open_captured(&p, &meta).is_ok());
        // Rewritten in place: the same inode, still read (the size check after reading warns).
        fs::write(&p, b"longer data").unwrap();
        assert!(open_captured(&p, &meta).is_ok());

        let replaced = |what: &str| {
            let err = open_captured(&p, &meta).unwrap_err().to_string();
            assert!(err.contains("replaced") || err.contains("opening"), "{what}: {err}");
        };
        // Saved under a new inode, as editors do.
        fs::write(tmp.path().join("new"), b"data").unwrap();
        fs::rename(tmp.path().join("new"), &p).unwrap();
        replaced("a new file");
        // A symlink to a file the walk did not choose.
        fs::remove_file(&p).unwrap();
        fs::write(tmp.path().join("secret"), b"secret").unwrap();
        std::os::unix::fs::symlink("secret", &p).unwrap();
        replaced("a symlink");
        // A FIFO without a writer: opening must not block.
        fs::remove_file(&p).unwrap();
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        replaced("a FIFO");
    }

    #[test]
    fn a_delta_is_held_against_how_well_the_replaced_content_compressed() {
        // No base, or a chain that ended at a cached base: 1/16 of the chunk.
        assert_eq!(full_estimate(1 << 20, None), 65_536);
        assert_eq!(full_estimate(1 << 20, Some(&base(None))), 65_536);
        // Text that compressed to a third of its size, scaled to this chunk's length.
        assert_eq!(full_estimate(3_000, Some(&base(Some((1_000, 3_000))))), 1_000);
        assert_eq!(full_estimate(6_000, Some(&base(Some((1_000, 3_000))))), 2_000);
        // Incompressible content (stored raw, plus the seal's nonce and tag).
        assert_eq!(full_estimate(4_096, Some(&base(Some((4_124, 4_096))))), 4_124);
        // Never below 1/16, however well the base compressed; an empty base divides by one.
        assert_eq!(full_estimate(16_000, Some(&base(Some((10, 16_000))))), 1_000);
        assert_eq!(full_estimate(16, Some(&base(Some((0, 0))))), 1);
    }
}
