//! One host's repository: the segment log, its RocksDB index, and the rules every write must
//! pass. [`Repo`] implements [`tardis_core::api::Repository`], the interface that the client,
//! the tools and the mount use (in-process for `--local`, over QUIC through `tardisd`).
//!
//! Layout under `BaseDir/<host>/`: `segments/` (the log), `index/` (RocksDB), `quarantine/`
//! (bytes cut off by recovery), `lock` (held by the one process that has the repository open).

use crate::error::{Error, Result};
use crate::frame::{MAX_BODY, SEGMENT_HEADER_LEN};
use crate::index::{Applied, Index, IndexMismatch, IndexOptions, INDEX_VERSION};
use crate::segments::{self, Batch, Damage, Log, LogOptions, NextSeq, Pos, Rec, Recovery};
use crate::storage::{DirStorage, Storage};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tardis_core::api::{EntryVersion, HostInfo, HostKey, Repository, SetInfo, StoredChunk, Write};
use tardis_core::chunk::MAX_CHUNK;
use tardis_core::chunkcodec::{self, EncodedChunk};
use tardis_core::event::{
    self, ChunkStored, ConfigChanged, Event, FileVersion, HostCreated, KeyWrapped, SetCompleted, SetLocked, SetOpened,
    SetPurged, SetStats, MAX_CHAIN,
};
use tardis_core::ids::{ChunkId, DirId, HostId, NameKey, SetId};
use tardis_core::keywrap::WrappedKey;

/// How to open a repository.
#[derive(Debug, Clone, Default)]
pub struct RepoOptions {
    pub log: LogOptions,
    pub index: IndexOptions,
    /// Segment storage to use instead of `<host>/segments` (tests inject faults with it).
    pub storage: Option<Arc<dyn Storage>>,
    /// The time to stamp events with (Unix nanoseconds) instead of the system clock: tests
    /// move it to simulate months of backups (the binaries set it from `TARDIS_NOW`).
    pub clock: Option<Arc<AtomicI64>>,
}

/// What a full index rebuild did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayStats {
    pub segments: u64,
    pub batches: u64,
    pub records: u64,
    pub damage: Vec<Damage>,
}

/// Name of the scratch index that [`Repo::check_index`] rebuilds from the log, under the
/// host's directory. It exists only while a check runs.
pub const VERIFY_INDEX_DIR: &str = "verify-index.tmp";

/// How many index differences [`Repo::check_index`] keeps (all of them are counted).
pub const MISMATCH_LIMIT: usize = 20;

/// Largest set seal the repository stores: a 255-byte name and four small fields, sealed.
pub const MAX_SEAL: usize = 1024;

/// What [`Repo::check_index`] found.
#[derive(Debug)]
pub struct IndexCheck {
    /// The full scan of the log that fed the rebuilt index: every record and every body was
    /// read and checked, so `scan.damage` is what [`Repo::scan_log`] reports.
    pub scan: ReplayStats,
    /// The first [`MISMATCH_LIMIT`] differences between the live index and the rebuilt one.
    pub mismatches: Vec<IndexMismatch>,
    /// How many differences there are in all.
    pub mismatch_count: u64,
    /// The index rebuilt from the log. It stays open, so callers can ask it where the log
    /// holds a chunk, and is deleted when this value is dropped.
    pub rebuilt: ScratchIndex,
}

/// A temporary index in its own directory, deleted when dropped.
#[derive(Debug)]
pub struct ScratchIndex {
    index: Option<Index>,
    path: PathBuf,
}

impl ScratchIndex {
    /// Creates an empty index at `path`. Anything already there can only be left over from a
    /// run that was killed (the repository lock keeps two checks apart), so it is removed.
    fn create(path: &Path, options: IndexOptions) -> Result<ScratchIndex> {
        if fs::symlink_metadata(path).is_ok() {
            tracing::warn!(path = %path.display(), "removing the scratch index of an interrupted verify");
            fs::remove_dir_all(path)
                .map_err(|e| Error::io("removing scratch index left by an interrupted verify", path, e))?;
        }
        // From here on, dropping the guard removes whatever was created, even on error.
        let mut scratch = ScratchIndex { index: None, path: path.to_owned() };
        scratch.index = Some(Index::open(path, options)?);
        Ok(scratch)
    }
}

impl std::ops::Deref for ScratchIndex {
    type Target = Index;
    fn deref(&self) -> &Index {
        self.index.as_ref().expect("set by create and taken only by drop")
    }
}

impl Drop for ScratchIndex {
    fn drop(&mut self) {
        drop(self.index.take()); // RocksDB must be closed before its files go
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), "removing scratch index: {e}");
            }
        }
    }
}

/// One host's repository, open for reading and writing.
#[derive(Debug)]
pub struct Repo {
    dir: PathBuf,
    host: String,
    storage: Arc<dyn Storage>,
    log: Mutex<Log>,
    index: Index,
    recovery: Recovery,
    replayed: ReplayStats,
    clock: Option<Arc<AtomicI64>>,
    index_options: IndexOptions,
    /// Held by a running compaction, so that two never interleave their copies.
    compaction: Mutex<()>,
    _lock: File,
}

/// Whether opening keeps the index on disk or starts a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IndexStart {
    /// Use the index on disk, replaying what it lacks (a normal open).
    Existing,
    /// Delete it and rebuild it from the log alone (`rebuild_index`).
    Fresh,
}

/// How [`Repo::scan_segments`] reads the log.
#[derive(Debug, Clone, Copy)]
struct ScanPlan {
    /// Start at this batch end (the index's applied position), or at the beginning of the log.
    from: Option<Pos>,
    /// Read and check every body as well (verify); replay reads headers and metas only.
    verify_bodies: bool,
    /// Whether bytes after the last commit of the last segment count as damage. Opening has
    /// already cut a torn tail there, so only a scan that runs later (verify) reports them.
    last_tail_is_damage: bool,
}

/// What [`Repo::scan_segments`] found.
#[derive(Debug, Default)]
struct ScanReport {
    segments: u64,
    damage: Vec<Damage>,
}

/// Whether the gap between segment `prev` (or the start of the log) and `seg`, where batch
/// `expected` was due and `first_seq` came, is exactly the batches of segments that compaction
/// retired: every segment number in between is retired, and their ranges chain without a hole.
fn retirement_explains(
    retired: &BTreeMap<u64, [u64; 2]>,
    prev: Option<u64>,
    seg: u64,
    expected: NextSeq,
    first_seq: u64,
) -> bool {
    let NextSeq::Exactly(mut due) = expected else { return false };
    let from = prev.map_or(1, |p| p + 1);
    if from >= seg {
        return false;
    }
    for s in from..seg {
        match retired.get(&s) {
            Some([first, next]) if *first == due => due = *next,
            _ => return false,
        }
    }
    due == first_seq
}

/// Checks that a host name is usable as a directory name: 1 to 255 bytes, no `/` or NUL, not
/// starting with `.` (which also rules out `.` and `..`). Anything else is accepted.
pub fn check_host_name(host: &str) -> Result<()> {
    let problem = if host.is_empty() {
        "it is empty"
    } else if host.len() > 255 {
        "it is longer than 255 bytes"
    } else if host.contains('/') {
        "it contains '/'"
    } else if host.contains('\0') {
        "it contains a NUL byte"
    } else if host.starts_with('.') {
        "it starts with '.'"
    } else {
        return Ok(());
    };
    Err(Error::Refused(format!(
        "invalid host name {host:?}: {problem} (a host name is 1 to 255 bytes, contains no '/' or NUL, \
         and does not start with '.')"
    )))
}

/// The event for a new wrapped key, after checking that the blob is one.
fn key_wrapped(key: &HostKey) -> Result<KeyWrapped> {
    WrappedKey::from_bytes(&key.wrapped).map_err(|e| Error::Refused(format!("the wrapped key is not valid: {e}")))?;
    Ok(KeyWrapped { blob: serde_bytes::ByteBuf::from(key.wrapped.clone()), verifier: Some(key.verifier) })
}

/// `opts` with the storage the base directory names (a bucket per `storage.cfg`, else the
/// host's `segments/` directory), unless a test already injected one.
fn with_storage(base: &Path, dir: &Path, host: &str, mut opts: RepoOptions) -> Result<RepoOptions> {
    if opts.storage.is_some() {
        return Ok(opts);
    }
    let storage: Arc<dyn Storage> = match crate::bucket::Backend::of(base)? {
        crate::bucket::Backend::Local => {
            crate::bucket::check_not_marked(dir)?;
            Arc::new(
                DirStorage::new(&dir.join("segments"), &dir.join("quarantine"))
                    .map_err(|e| Error::io("opening segment directory", dir.join("segments"), e))?,
            )
        }
        crate::bucket::Backend::Bucket(cfg) => Arc::new(crate::bucket::BucketStorage::open(&cfg, dir, host)?),
    };
    opts.storage = Some(storage);
    Ok(opts)
}

/// After a completed set or a purge, with remote storage: the segment is sealed and uploaded,
/// so that the bucket alone restores every completed set. A failure leaves it staged, durable
/// on the local disk, for the next seal to retry.
fn seal_after(log: &mut Log) {
    if let Err(e) = log.seal_all() {
        tracing::warn!("segments stay staged until the object store answers: {e}");
    }
}

impl Repo {
    /// Opens the repository of `host` under `base`, creating its directory if needed (the host
    /// itself is created by [`Repository::create_host`]). Recovers the log tail and brings the
    /// index up to date with the log. An index written by a newer build is refused with
    /// [`Error::Version`] and left as it is; an older one is rebuilt from the log.
    pub fn open(base: &Path, host: &str, opts: RepoOptions) -> Result<Repo> {
        check_host_name(host)?;
        let dir = base.join(host);
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(|e| Error::io("creating repository directory", &dir, e))?;
            crate::storage::sync_dir(base).map_err(|e| Error::io("syncing", base, e))?;
        }
        let lock = lock_dir(&dir)?;
        let opts = with_storage(base, &dir, host, opts)?;
        Repo::open_locked(dir, host, lock, opts, IndexStart::Existing)
    }

    /// Throws the index away and rebuilds it from the log alone, holding the repository lock
    /// throughout. The damage the full replay finds (including sequence breaks) is in the result.
    pub fn rebuild_index(base: &Path, host: &str, opts: RepoOptions) -> Result<ReplayStats> {
        check_host_name(host)?;
        let dir = base.join(host);
        if opts.storage.is_none() && !crate::bucket::host_exists(base, host)? {
            return Err(Error::NoHost(host.to_owned()));
        }
        // One lock, held from deleting the old index until the new one is complete: no other
        // process may open the repository in between and see, or build, a partial index.
        fs::create_dir_all(&dir).map_err(|e| Error::io("creating repository directory", &dir, e))?;
        let lock = lock_dir(&dir)?;
        let opts = with_storage(base, &dir, host, opts)?;
        let repo = Repo::open_locked(dir, host, lock, opts, IndexStart::Fresh)?;
        repo.index.flush()?;
        Ok(repo.replayed.clone())
    }

    /// Opens the repository in `dir`, whose lock the caller holds: recovers the log tail, checks
    /// the index against this build and the log, and replays what the index lacks.
    fn open_locked(dir: PathBuf, host: &str, lock: File, opts: RepoOptions, start: IndexStart) -> Result<Repo> {
        let storage: Arc<dyn Storage> = opts.storage.clone().expect("chosen by with_storage");
        let index_dir = dir.join("index");
        if start == IndexStart::Fresh {
            destroy_index(&index_dir)?;
            test_hooks::index_deleted(&dir);
        }
        let existing = match Index::open(&index_dir, opts.index) {
            Ok(i) => Some(i),
            // A newer build's index: refuse, and leave it alone for that build.
            Err(e @ Error::Version { what: "index", found, .. }) if found > INDEX_VERSION => return Err(e),
            // An older layout: rebuilt from the log, once the log is known to be readable.
            Err(Error::Version { what: "index", .. }) => None,
            Err(e) => return Err(e),
        };
        let hint = match &existing {
            Some(i) => i.applied()?,
            None => None,
        };
        let (log, recovery) = Log::open(storage.clone(), opts.log, hint)?;
        let (index, from) = match existing {
            Some(i) => match hint.filter(|h| *h > log.end() || !log.is_commit_end(*h)) {
                None => (i, hint),
                Some(h) => {
                    // The index claims more than the log holds, or a position that is not the end
                    // of a batch (the log was restored from an older copy, lost data, or belongs
                    // to another history): it cannot be trusted, so it is rebuilt from the log.
                    tracing::warn!(index = %h, log = %log.end(), "index does not match the log; rebuilding it");
                    drop(i);
                    destroy_index(&index_dir)?;
                    (Index::open(&index_dir, opts.index)?, None)
                }
            },
            None => {
                tracing::warn!("index has an older layout version; rebuilding it from the log");
                destroy_index(&index_dir)?;
                (Index::open(&index_dir, opts.index)?, None)
            }
        };
        let mut repo = Repo {
            dir,
            host: host.to_owned(),
            storage,
            log: Mutex::new(log),
            index,
            recovery,
            replayed: ReplayStats::default(),
            clock: opts.clock.clone(),
            index_options: opts.index,
            compaction: Mutex::new(()),
            _lock: lock,
        };
        repo.replayed = repo.replay(from)?;
        if repo.storage.remote() {
            // Segments left staged by an outage or a crash go up now (the open one stays).
            if let Err(e) = repo.storage.seal(repo.log_end().segment) {
                tracing::warn!("segments stay staged until the object store answers: {e}");
            }
        }
        if repo.replayed.damage.is_empty() {
            repo.finish_retirement()?;
        }
        Ok(repo)
    }

    /// Whether `base` holds a repository for `host` with at least one segment, on the local
    /// disk or in the base directory's bucket.
    pub fn exists(base: &Path, host: &str) -> Result<bool> {
        crate::bucket::host_exists(base, host)
    }

    /// Uploads the sealed segments that are still staged (remote storage only): the retry
    /// after an outage of the object store. The daemon calls it periodically.
    pub fn upload_sealed(&self) -> Result<()> {
        self.writer().upload_sealed()
    }

    /// Seals the open segment too and uploads everything (remote storage only): `migrate`.
    pub fn seal_log(&self) -> Result<()> {
        self.writer().seal_all()
    }

    pub fn host_name(&self) -> &str {
        &self.host
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What opening found in the log (trimmed tail, damage).
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// What was replayed into the index when opening.
    pub fn replayed(&self) -> &ReplayStats {
        &self.replayed
    }

    /// The index, for tools that inspect it.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The segment storage.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Position after the last committed batch.
    pub fn log_end(&self) -> Pos {
        self.writer().end()
    }

    /// The time events are stamped with: the injected clock if there is one.
    pub fn now(&self) -> i64 {
        match &self.clock {
            Some(c) => c.load(Ordering::SeqCst),
            None => crate::clock::system_now(),
        }
    }

    pub(crate) fn compaction_lock(&self) -> MutexGuard<'_, ()> {
        self.compaction.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn writer(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies every committed batch after `from` (every batch, without `from`) to the index.
    fn replay(&self, from: Option<Pos>) -> Result<ReplayStats> {
        let plan = ScanPlan { from, verify_bodies: false, last_tail_is_damage: false };
        let stats = self.replay_into(&self.index, plan)?;
        for d in &stats.damage {
            tracing::error!(
                segment = d.segment,
                offset = d.offset,
                "damaged log records: {}; run `tardis-tools verify`",
                d.reason
            );
        }
        Ok(stats)
    }

    /// Applies every committed batch that `plan` reads to `index`: the live index when opening
    /// or rebuilding, a scratch index when checking the live one.
    fn replay_into(&self, index: &Index, plan: ScanPlan) -> Result<ReplayStats> {
        let (mut batches, mut records) = (0u64, 0u64);
        let report = self.scan_segments(plan, &mut |batch| {
            let mut applied = Vec::with_capacity(batch.records.len());
            for r in &batch.records {
                let event = Event::decode(r.header.kind, r.header.version, &r.meta)
                    .map_err(|e| segments::corrupt(r.pos.segment, r.pos.offset, e))?;
                applied.push(Applied { pos: r.pos, event, body_len: r.header.body_len });
            }
            batches += 1;
            records += applied.len() as u64;
            index.apply(&applied, batch.end)
        })?;
        Ok(ReplayStats { segments: report.segments, batches, records, damage: report.damage })
    }

    /// Checks that the index could be rebuilt to the same state: replays the whole log into a
    /// scratch index (`<host>/verify-index.tmp`) and compares it with the live index key by key.
    /// The replay reads every record and body, so the result also holds the damage that
    /// [`Repo::scan_log`] would report: one pass over the log serves both checks.
    ///
    /// Writes are held off for the whole check, so the log and the live index stand still.
    pub fn check_index(&self) -> Result<IndexCheck> {
        let _writer = self.writer();
        let rebuilt = ScratchIndex::create(&self.dir.join(VERIFY_INDEX_DIR), self.index_options)?;
        let plan = ScanPlan { from: None, verify_bodies: true, last_tail_is_damage: true };
        let scan = self.replay_into(&rebuilt, plan)?;
        let cmp = self.index.compare(&rebuilt, MISMATCH_LIMIT)?;
        Ok(IndexCheck { scan, mismatches: cmp.mismatches, mismatch_count: cmp.total, rebuilt })
    }

    /// Reads every record of every segment, checking framing, both checksums, batch commits and
    /// the sequence across segments, and returns the damage found (empty for a healthy log).
    /// The index is not used.
    pub fn scan_log(&self) -> Result<Vec<Damage>> {
        let _writer = self.writer(); // a stable end: no batch is half-written while we scan
        let plan = ScanPlan { from: None, verify_bodies: true, last_tail_is_damage: true };
        Ok(self.scan_segments(plan, &mut |_| Ok(()))?.damage)
    }

    /// Reads the segments in order from `plan.from`, calling `on_batch` for every committed
    /// batch. Every problem with the stored bytes becomes a [`Damage`] entry and the scan reads
    /// on: a segment header that is damaged or of an unsupported version, damaged records, a
    /// segment that ends in damage, and a break in the batch sequence between segments (a
    /// missing segment). Only I/O failures and errors from `on_batch` abort the scan.
    fn scan_segments(&self, plan: ScanPlan, on_batch: &mut dyn FnMut(Batch) -> Result<()>) -> Result<ScanReport> {
        let storage = self.storage.as_ref();
        let header_len = SEGMENT_HEADER_LEN as u64;
        let segs = storage.list().map_err(|e| Error::io("listing segments in", storage.describe(0), e))?;
        let last = segs.last().copied();
        // What the next segment's first batch must be. From the beginning, the log's first batch
        // is batch 1; starting at `from`, the hint's batch number is read from its commit.
        let mut next = match plan.from {
            None => Some(NextSeq::Exactly(1)),
            Some(_) => None,
        };
        let mut report = ScanReport::default();
        // Sequence breaks are only provisional: compaction retires whole segments, and the
        // `SegmentsCompacted` record that names them (with their batch ranges) comes later in
        // the log than the gap (FORMAT.md §8.6). Breaks it explains are not damage.
        let mut breaks: Vec<(Option<u64>, u64, NextSeq, u64, Damage)> = Vec::new();
        let mut retired: BTreeMap<u64, [u64; 2]> = BTreeMap::new();
        let mut prev_seg: Option<u64> = None;
        let mut on_batch = |batch: Batch| -> Result<()> {
            for r in batch.records.iter().filter(|r| r.header.kind == event::kind::SEGMENTS_COMPACTED) {
                if let Ok(Event::SegmentsCompacted(e)) = Event::decode(r.header.kind, r.header.version, &r.meta) {
                    retired.extend(e.retired.iter().zip(e.ranges.iter()).map(|(s, r)| (*s, *r)));
                }
            }
            on_batch(batch)
        };
        for seg in segs.into_iter().filter(|s| plan.from.is_none_or(|f| *s >= f.segment)) {
            let prev = prev_seg.replace(seg);
            report.segments += 1;
            let len = storage.len(seg).map_err(|e| Error::io("reading length of", storage.describe(seg), e))?;
            let header = match segments::read_segment_header(storage, seg, len) {
                Ok(h) => h,
                Err(e) => {
                    report.damage.push(segments::header_damage(seg, len, e)?);
                    next = next.map(NextSeq::loosen);
                    continue;
                }
            };
            // `check_seq`: the batch number the scan checks the first commit against;
            // `seq_before`: the number of the batch before `start`, where it is known.
            let (start, check_seq, seq_before) = match plan.from {
                // Starting mid-segment, the hint's batch was already checked by `Log::open`; its
                // number only serves the continuity check of the next segment.
                Some(f) if f.segment == seg => (f.offset, None, segments::commit_seq_ending_at(storage, f).ok()),
                _ => {
                    if let Some(n) = next {
                        if let Some(d) = n.check(seg, header.first_seq) {
                            breaks.push((prev, seg, n, header.first_seq, d));
                        }
                    }
                    let before = header.first_seq.checked_sub(1);
                    (header_len, before, before)
                }
            };
            let outcome =
                segments::scan_segment(storage, seg, start, len, check_seq, plan.verify_bodies, &mut on_batch)?;
            report.damage.extend(outcome.damage);
            let tail_damaged = outcome.committed_end < len;
            if tail_damaged && (Some(seg) != last || plan.last_tail_is_damage) {
                report.damage.push(Damage {
                    segment: seg,
                    offset: outcome.committed_end,
                    resume: len,
                    reason: "segment ends in a damaged or uncommitted record".into(),
                });
            }
            next = outcome.last_seq.or(seq_before).map(|s| NextSeq::after(s, tail_damaged));
        }
        for (prev, seg, expected, first_seq, damage) in breaks {
            if !retirement_explains(&retired, prev, seg, expected, first_seq) {
                report.damage.push(damage);
            }
        }
        report.damage.sort_by_key(|d| (d.segment, d.offset));
        Ok(report)
    }

    /// Deletes segments that an applied `SegmentsCompacted` retired but that are still there
    /// (a crash came between the switch and the deletions). Their live records were copied and
    /// the index no longer points into them.
    fn finish_retirement(&self) -> Result<()> {
        let retired = self.index.retired()?;
        if retired.is_empty() {
            return Ok(());
        }
        if self.storage.remote() {
            // The copies must be in the bucket before what they replace leaves it.
            if let Err(e) = self.writer().seal_all() {
                tracing::warn!("retired segments stay until the copies are uploaded: {e}");
                return Ok(());
            }
        }
        let current = self.writer().end().segment;
        let present = self.storage.list().map_err(|e| Error::io("listing segments in", self.storage.describe(0), e))?;
        let left: Vec<u64> = present.into_iter().filter(|s| retired.contains_key(s) && *s != current).collect();
        if !left.is_empty() {
            self.index.flush()?; // retire only behind a durable index, as compaction does
        }
        for seg in left {
            tracing::warn!(segment = seg, "deleting a segment retired by an interrupted compaction");
            self.storage
                .remove(seg)
                .map_err(|e| Error::io("removing retired segment", self.storage.describe(seg), e))?;
        }
        Ok(())
    }

    /// Appends events as one durable batch and applies them to the index.
    fn commit(&self, log: &mut Log, events: Vec<(Event, Vec<u8>)>) -> Result<()> {
        let metas: Vec<Vec<u8>> = events.iter().map(|(e, _)| e.encode()).collect();
        let recs: Vec<Rec<'_>> = events
            .iter()
            .zip(&metas)
            .map(|((e, body), meta)| Rec { kind: e.kind(), version: e.version(), meta, body })
            .collect();
        let (positions, end) = log.append(&recs)?;
        let applied: Vec<Applied> = events
            .into_iter()
            .zip(positions)
            .map(|((event, body), pos)| Applied { pos, event, body_len: body.len() as u32 })
            .collect();
        let result = self.index.apply(&applied, end);
        if result.is_err() {
            // The batch is durable but the index does not show it; a later batch applied on top
            // would hide the gap. Reopening replays the log from the index's position.
            log.poison();
        }
        result
    }

    fn open_set_id(&self) -> Option<SetId> {
        self.index.open_set()
    }

    fn require_open(&self, set: SetId) -> Result<()> {
        match self.open_set_id() {
            Some(open) if open == set => Ok(()),
            _ => Err(Error::Refused(format!("set {set} is not the open set of host {}", self.host))),
        }
    }

    fn require_host(&self) -> Result<HostCreated> {
        self.index.host()?.ok_or_else(|| Error::NoHost(self.host.clone()))
    }

    fn read_chunk_inner(&self, id: &ChunkId) -> Result<StoredChunk> {
        let loc =
            self.index.chunk(id)?.ok_or_else(|| Error::Refused(format!("chunk {id} is not in the repository")))?;
        let (header, meta, body) = segments::read_record(self.storage.as_ref(), loc.pos)?;
        let bad = |reason: &str| segments::corrupt(loc.pos.segment, loc.pos.offset, reason);
        let Event::ChunkStored(cs) =
            Event::decode(header.kind, header.version, &meta).map_err(|e| bad(&e.to_string()))?
        else {
            return Err(bad("index points at a record that is not a chunk"));
        };
        if cs.id != *id {
            return Err(bad("record holds another chunk"));
        }
        Ok(StoredChunk { meta: cs, body })
    }

    fn append_inner(&self, set: SetId, writes: Vec<Write>) -> Result<()> {
        let mut log = self.writer();
        self.require_open(set)?;
        let mut events = Vec::with_capacity(writes.len());
        // Chunks of this batch: plain length and delta depth.
        let mut in_batch: HashMap<ChunkId, (u32, u8)> = HashMap::new();
        for w in writes {
            match w {
                Write::Chunk(c) => {
                    if c.plain_len as usize > MAX_CHUNK || c.body.len() > MAX_BODY as usize {
                        return Err(Error::Refused(format!("chunk {} is larger than the format allows", c.id)));
                    }
                    if in_batch.contains_key(&c.id) || self.index.has_chunk(&c.id)? {
                        continue; // already stored: never overwrite an existing ID
                    }
                    let depth = self.check_delta(&c, &in_batch)?;
                    in_batch.insert(c.id, (c.plain_len, depth));
                    let meta = ChunkStored { id: c.id, plain_len: c.plain_len, encoding: c.encoding, delta: c.delta };
                    events.push((Event::ChunkStored(meta), c.body));
                }
                Write::Version(v) => {
                    self.check_version(set, &v, &in_batch)?;
                    // A client repeats a batch whose acknowledgement it lost; the version is
                    // already the set's row, and a second record of it could, once the set is
                    // dead and compaction keeps only the first, bring a dead row back on replay
                    // (docs/FORMAT.md §8.8).
                    if matches!(self.index.own_row(&v.dir, &v.name, set)?, Some(EntryVersion::Version(old)) if old == v)
                    {
                        continue;
                    }
                    events.push((Event::FileVersion(v), Vec::new()));
                }
                Write::Delete(d) => {
                    if d.set != set {
                        return Err(Error::Refused(format!("deletion for set {} sent in set {set}", d.set)));
                    }
                    if self.index.own_row(&d.dir, &d.name, set)? == Some(EntryVersion::Deleted(set)) {
                        continue;
                    }
                    events.push((Event::EntryDeleted(d), Vec::new()));
                }
            }
        }
        if events.is_empty() {
            return Ok(());
        }
        self.commit(&mut log, events)
    }

    /// A delta chunk's base must be durably stored (or earlier in the same batch), so a chain
    /// always ends in a full chunk, and its depth must be the base's plus one, at most
    /// [`MAX_CHAIN`]. Returns the chunk's depth (0 for a full chunk).
    fn check_delta(&self, c: &EncodedChunk, in_batch: &HashMap<ChunkId, (u32, u8)>) -> Result<u8> {
        let flagged = c.encoding & chunkcodec::ENC_DELTA != 0;
        let Some(d) = c.delta else {
            if flagged {
                return Err(Error::Refused(format!("chunk {} is marked as a delta but names no base", c.id)));
            }
            return Ok(0);
        };
        if !flagged {
            return Err(Error::Refused(format!("chunk {} names a base but is not marked as a delta", c.id)));
        }
        let base_depth = match in_batch.get(&d.base) {
            Some((_, depth)) => *depth,
            None => match self.index.chunk(&d.base)? {
                Some(loc) => loc.delta.map_or(0, |b| b.depth),
                None => {
                    return Err(Error::Refused(format!("delta chunk {} has base {} that is not stored", c.id, d.base)))
                }
            },
        };
        if u32::from(d.depth) != u32::from(base_depth) + 1 || d.depth > MAX_CHAIN {
            return Err(Error::Refused(format!(
                "delta chunk {} claims depth {} on a base of depth {base_depth} (at most {MAX_CHAIN})",
                c.id, d.depth
            )));
        }
        Ok(d.depth)
    }

    /// A file version may only reference chunks that are durably stored (or earlier in the same
    /// batch), with matching lengths, in ascending non-overlapping extents (invariant 2).
    fn check_version(&self, set: SetId, v: &FileVersion, in_batch: &HashMap<ChunkId, (u32, u8)>) -> Result<()> {
        if v.set != set {
            return Err(Error::Refused(format!("file version for set {} sent in set {set}", v.set)));
        }
        let mut next = 0u64;
        for e in &v.extents {
            if e.offset < next {
                return Err(Error::Refused("file version has overlapping or unsorted extents".into()));
            }
            next = e.offset + u64::from(e.len);
            let len = match in_batch.get(&e.id) {
                Some((l, _)) => *l,
                None => match self.index.chunk(&e.id)? {
                    Some(loc) => loc.plain_len,
                    None => {
                        return Err(Error::Refused(format!(
                            "file version references chunk {} that is not stored",
                            e.id
                        )))
                    }
                },
            };
            if len != e.len {
                return Err(Error::Refused(format!(
                    "extent length {} does not match chunk {} ({len} bytes)",
                    e.len, e.id
                )));
            }
        }
        Ok(())
    }
}

impl Drop for Repo {
    fn drop(&mut self) {
        // After a failed write (a full disk, say) leave the index alone: RocksDB must not be
        // asked to flush on top of a failed write, and the log replay covers whatever it lost.
        if self.writer().is_poisoned() {
            return;
        }
        // Best effort: a flushed index opens without replaying its own WAL.
        if let Err(e) = self.index.flush() {
            tracing::warn!("flushing index: {e}");
        }
    }
}

fn destroy_index(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("removing index", path, e)),
    }
}

/// Points where unit tests look inside `open_locked` and `lock_dir`; no-ops outside tests.
#[cfg(not(test))]
mod test_hooks {
    pub(super) fn index_deleted(_dir: &std::path::Path) {}
    pub(super) fn locked() {}
}

#[cfg(test)]
mod test_hooks {
    use std::cell::{Cell, RefCell};
    use std::path::Path;

    type Hook = Box<dyn FnMut(&Path)>;

    thread_local! {
        /// Called by a fresh-index open right after the old index was deleted.
        pub(super) static INDEX_DELETED: RefCell<Option<Hook>> = const { RefCell::new(None) };
        /// Repository locks taken by this thread.
        pub(super) static LOCKS_TAKEN: Cell<u32> = const { Cell::new(0) };
    }

    pub(super) fn index_deleted(dir: &Path) {
        let hook = INDEX_DELETED.with(|h| h.borrow_mut().take());
        if let Some(mut hook) = hook {
            hook(dir);
        }
    }

    pub(super) fn locked() {
        LOCKS_TAKEN.with(|n| n.set(n.get() + 1));
    }
}

/// Takes the repository lock (one process per host repository) and records our pid in it.
fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join("lock");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io("opening", &path, e))?;
    match f.try_lock() {
        Ok(()) => test_hooks::locked(),
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            return Err(Error::Locked { path: dir.to_owned(), pid: pid.trim().to_owned() });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("locking", &path, e)),
    }
    f.set_len(0)
        .and_then(|_| f.rewind())
        .and_then(|_| writeln!(f, "{}", std::process::id()))
        .map_err(|e| Error::io("writing", &path, e))?;
    Ok(f)
}

impl Repository for Repo {
    fn host(&self) -> tardis_core::Result<Option<HostInfo>> {
        let Some(h) = self.index.host()? else { return Ok(None) };
        Ok(Some(HostInfo {
            host_id: h.host_id,
            name: h.name,
            encrypted: h.encrypted,
            wrapped_key: self.index.wrapped_key()?,
            verifier: self.index.verifier()?,
        }))
    }

    fn create_host(&self, host_id: HostId, key: Option<HostKey>) -> tardis_core::Result<HostInfo> {
        let mut log = self.writer();
        if self.index.host()?.is_some() {
            return Err(Error::Refused(format!("host {} already exists", self.host)).into());
        }
        let encrypted = key.is_some();
        let created = HostCreated { host_id, name: self.host.clone(), created: self.now(), encrypted };
        let mut events = vec![(Event::HostCreated(created), Vec::new())];
        if let Some(k) = &key {
            events.push((Event::KeyWrapped(key_wrapped(k)?), Vec::new()));
        }
        self.commit(&mut log, events)?;
        Ok(HostInfo {
            host_id,
            name: self.host.clone(),
            encrypted,
            wrapped_key: key.as_ref().map(|k| k.wrapped.clone()),
            verifier: key.map(|k| k.verifier),
        })
    }

    fn set_wrapped_key(&self, key: HostKey) -> tardis_core::Result<()> {
        let mut log = self.writer();
        let host = self.require_host()?;
        if !host.encrypted {
            return Err(Error::Refused(format!("host {} is not encrypted", self.host)).into());
        }
        let e = Event::KeyWrapped(key_wrapped(&key)?);
        Ok(self.commit(&mut log, vec![(e, Vec::new())])?)
    }

    fn sets(&self) -> tardis_core::Result<Vec<SetInfo>> {
        Ok(self.index.sets())
    }

    fn lookup(&self, set: SetId, dir: &DirId, name: &NameKey) -> tardis_core::Result<Option<FileVersion>> {
        Ok(self.index.lookup(set, dir, name)?)
    }

    fn list(&self, set: SetId, dir: &DirId) -> tardis_core::Result<Vec<FileVersion>> {
        Ok(self.index.list(set, dir)?)
    }

    fn history(&self, dir: &DirId, name: &NameKey) -> tardis_core::Result<Vec<EntryVersion>> {
        Ok(self.index.history(dir, name)?)
    }

    fn read_chunk(&self, id: &ChunkId) -> tardis_core::Result<StoredChunk> {
        Ok(self.read_chunk_inner(id)?)
    }

    fn missing_chunks(&self, ids: &[ChunkId]) -> tardis_core::Result<Vec<ChunkId>> {
        let have = self.index.has_chunks(ids)?;
        Ok(ids.iter().zip(have).filter(|(_, h)| !h).map(|(id, _)| *id).collect())
    }

    fn open_set(&self, name: &str, priority: u32) -> tardis_core::Result<SetId> {
        let mut log = self.writer();
        self.require_host()?;
        if name.is_empty() || name.contains('/') || name.len() > 255 || name.starts_with('.') {
            return Err(Error::Refused(format!("invalid set name {name:?}")).into());
        }
        let (taken, id, base) = self.index.with_set_rows(|rows| {
            let taken = rows.values().any(|r| r.name == name && r.finished.is_some() && !r.purged);
            let id = rows.keys().next_back().map_or(1, |s| s + 1);
            let base = rows.iter().rev().find(|(_, r)| r.finished.is_some()).map(|(id, _)| *id);
            (taken, id, base)
        });
        if taken {
            return Err(Error::Refused(format!("a set named {name} already exists; choose another --name")).into());
        }
        let e = Event::SetOpened(SetOpened { set: id, name: name.to_owned(), priority, started: self.now(), base });
        self.commit(&mut log, vec![(e, Vec::new())])?;
        Ok(id)
    }

    fn append(&self, set: SetId, writes: Vec<Write>) -> tardis_core::Result<()> {
        Ok(self.append_inner(set, writes)?)
    }

    fn complete_set(&self, set: SetId, stats: SetStats, seal: Option<Vec<u8>>) -> tardis_core::Result<()> {
        if seal.as_ref().is_some_and(|s| s.len() > MAX_SEAL) {
            return Err(Error::Refused(format!("a set seal is at most {MAX_SEAL} bytes")).into());
        }
        let mut log = self.writer();
        self.require_open(set)?;
        let e = Event::SetCompleted(SetCompleted { set, finished: self.now(), stats, seal: seal.map(Into::into) });
        self.commit(&mut log, vec![(e, Vec::new())])?;
        seal_after(&mut log);
        Ok(())
    }

    fn config(&self) -> tardis_core::Result<BTreeMap<String, String>> {
        Ok(self.index.config()?)
    }

    fn set_config(&self, key: &str, value: Option<&str>) -> tardis_core::Result<()> {
        // Checked here as well as by the tools: the server must not store what retention
        // cannot read.
        match value {
            Some(v) => tardis_core::config::validate(key, v)?,
            None => {
                tardis_core::config::spec(key)?;
            }
        }
        let mut log = self.writer();
        self.require_host()?;
        let e = Event::ConfigChanged(ConfigChanged { key: key.to_owned(), value: value.map(str::to_owned) });
        Ok(self.commit(&mut log, vec![(e, Vec::new())])?)
    }

    fn set_locked(&self, set: SetId, locked: bool) -> tardis_core::Result<()> {
        let mut log = self.writer();
        self.require_host()?;
        let Some(info) = self.index.sets().into_iter().find(|s| s.id == set) else {
            return Err(Error::Refused(format!("host {} has no set {set}", self.host)).into());
        };
        if !info.is_live() {
            return Err(Error::Refused(format!(
                "set {} is not a completed, unpurged set; only those can be locked",
                info.name
            ))
            .into());
        }
        if info.locked == locked {
            return Ok(()); // nothing to record
        }
        let e = Event::SetLocked(SetLocked { set, locked, time: self.now() });
        Ok(self.commit(&mut log, vec![(e, Vec::new())])?)
    }

    fn purge_sets(&self, sets: &[SetId]) -> tardis_core::Result<()> {
        let mut log = self.writer();
        self.require_host()?;
        // Checked under the writer lock, against the index as it is now: a backup completing
        // or a set being locked meanwhile cannot slip past the rules.
        let all = self.index.sets();
        let mut seen = std::collections::HashSet::new();
        let mut events = Vec::with_capacity(sets.len());
        for &id in sets {
            if !seen.insert(id) {
                continue;
            }
            if let Some(why) = tardis_core::retention::protected(&all, id) {
                let name = all.iter().find(|s| s.id == id).map_or_else(|| id.to_string(), |s| s.name.clone());
                return Err(Error::Refused(format!("cannot purge set {name}: {why}")).into());
            }
            events.push((Event::SetPurged(SetPurged { set: id, time: self.now() }), Vec::new()));
        }
        if events.is_empty() {
            return Ok(());
        }
        self.commit(&mut log, events)?;
        seal_after(&mut log);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn rebuild_index_holds_one_lock_from_deleting_the_index_to_reopening() {
        let base = tempfile::tempdir().unwrap();
        let repo = Repo::open(base.path(), "h", RepoOptions::default()).unwrap();
        repo.create_host(HostId([1; 16]), None).unwrap();
        let set = repo.open_set("s", 1).unwrap();
        repo.complete_set(set, SetStats::default(), None).unwrap();
        let before = repo.index().dump().unwrap();
        drop(repo);

        // While the index is gone, another opener must find the repository locked.
        let refused = Rc::new(Cell::new(false));
        let seen = refused.clone();
        let path = base.path().to_owned();
        test_hooks::INDEX_DELETED.with(|h| {
            *h.borrow_mut() = Some(Box::new(move |dir: &Path| {
                assert!(!dir.join("index").exists(), "the hook runs after the index is deleted");
                let other = Repo::open(&path, "h", RepoOptions::default());
                seen.set(matches!(other, Err(Error::Locked { .. })));
            }))
        });
        let taken = test_hooks::LOCKS_TAKEN.with(|n| n.get());
        let stats = Repo::rebuild_index(base.path(), "h", RepoOptions::default()).unwrap();
        assert!(refused.get(), "the repository was not locked between deleting and rebuilding the index");
        // Taken once: the lock is never released and retaken between the two steps.
        assert_eq!(test_hooks::LOCKS_TAKEN.with(|n| n.get()) - taken, 1);
        assert_eq!(stats.batches, 3);
        let repo = Repo::open(base.path(), "h", RepoOptions::default()).unwrap();
        assert_eq!(repo.index().dump().unwrap(), before);
    }

    #[test]
    fn check_index_compares_with_a_scratch_rebuild_and_removes_it() {
        let base = tempfile::tempdir().unwrap();
        let repo = Repo::open(base.path(), "h", RepoOptions::default()).unwrap();
        repo.create_host(HostId([1; 16]), None).unwrap();
        let set = repo.open_set("s", 1).unwrap();
        let id = ChunkId([7; 32]);
        let chunk =
            tardis_core::chunkcodec::EncodedChunk { id, plain_len: 3, encoding: 0, body: b"abc".to_vec(), delta: None };
        repo.append(set, vec![Write::Chunk(chunk)]).unwrap();
        repo.complete_set(set, SetStats::default(), None).unwrap();
        let scratch = base.path().join("h").join(VERIFY_INDEX_DIR);
        // A scratch index left by a killed run is replaced, not trusted.
        fs::create_dir_all(scratch.join("junk")).unwrap();

        let check = repo.check_index().unwrap();
        assert!(check.mismatches.is_empty() && check.mismatch_count == 0, "{:?}", check.mismatches);
        assert!(check.scan.damage.is_empty());
        assert_eq!((check.scan.batches, check.scan.records), (4, 4));
        assert!(scratch.is_dir() && !scratch.join("junk").exists());
        assert!(check.rebuilt.chunk(&id).unwrap().is_some(), "the rebuilt index stays open for lookups");
        drop(check);
        assert!(!scratch.exists(), "the scratch index is removed afterwards");

        repo.index().delete_raw("chunks", &id.0);
        let check = repo.check_index().unwrap();
        assert_eq!(check.mismatch_count, 1);
        assert_eq!(check.mismatches[0].cf, "chunks");
        assert_eq!(check.mismatches[0].key, id.0.to_vec());
        assert_eq!(check.mismatches[0].difference, crate::index::Difference::MissingFromIndex);
    }

    /// Segment storage whose reads fail with EIO while `fail` is set.
    #[derive(Debug)]
    struct FailingReads {
        inner: DirStorage,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Storage for FailingReads {
        fn list(&self) -> std::io::Result<Vec<u64>> {
            self.inner.list()
        }
        fn create(&self, seg: u64, header: &[u8]) -> std::io::Result<Box<dyn crate::storage::SegmentFile>> {
            self.inner.create(seg, header)
        }
        fn open_append(&self, seg: u64) -> std::io::Result<Box<dyn crate::storage::SegmentFile>> {
            self.inner.open_append(seg)
        }
        fn len(&self, seg: u64) -> std::io::Result<u64> {
            self.inner.len(seg)
        }
        fn read_at(&self, seg: u64, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(5));
            }
            self.inner.read_at(seg, offset, buf)
        }
        fn truncate(&self, seg: u64, len: u64) -> std::io::Result<()> {
            self.inner.truncate(seg, len)
        }
        fn remove(&self, seg: u64) -> std::io::Result<()> {
            self.inner.remove(seg)
        }
        fn quarantine(&self, seg: u64, offset: u64, bytes: &[u8]) -> std::io::Result<PathBuf> {
            self.inner.quarantine(seg, offset, bytes)
        }
        fn describe(&self, seg: u64) -> PathBuf {
            self.inner.describe(seg)
        }
    }

    #[test]
    fn a_read_error_aborts_the_checks_and_is_never_an_empty_result() {
        // RELIABILITY invariant 7 (restic #4612): a failed read must not pass for "no damage".
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("h");
        let inner = DirStorage::new(&dir.join("segments"), &dir.join("quarantine")).unwrap();
        let storage = Arc::new(FailingReads { inner, fail: false.into() });
        let opts = RepoOptions { storage: Some(storage.clone()), ..RepoOptions::default() };
        let repo = Repo::open(base.path(), "h", opts).unwrap();
        repo.create_host(HostId([1; 16]), None).unwrap();
        let set = repo.open_set("s", 1).unwrap();
        repo.complete_set(set, SetStats::default(), None).unwrap();

        storage.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let err = repo.check_index().unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert!(!dir.join(VERIFY_INDEX_DIR).exists(), "the scratch index is removed on error too");
        assert!(matches!(repo.scan_log(), Err(Error::Io { .. })));
        storage.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(repo.check_index().unwrap().mismatch_count, 0);
    }

    #[test]
    fn host_name_errors_say_exactly_what_is_refused() {
        for ok in ["web-1", "host name with spaces", "ünïcode", "a+b=c:d", "x.", &"n".repeat(255)] {
            assert!(check_host_name(ok).is_ok(), "{ok:?} is a usable directory name");
        }
        let cases = [
            ("", "it is empty"),
            (&*"n".repeat(256), "longer than 255 bytes"),
            ("a/b", "contains '/'"),
            ("a\0b", "contains a NUL byte"),
            (".hidden", "starts with '.'"),
            (".", "starts with '.'"),
            ("..", "starts with '.'"),
        ];
        for (name, why) in cases {
            let msg = check_host_name(name).unwrap_err().to_string();
            assert!(msg.contains(why), "{name:?}: {msg}");
            assert!(msg.contains("1 to 255 bytes, contains no '/' or NUL, and does not start with '.'"), "{msg}");
        }
    }
}
