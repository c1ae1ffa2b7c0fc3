//! Compaction: the live records of mostly-dead segments are copied to the end of the log, and
//! those segments are then retired (deleted). `docs/FORMAT.md` §7 (W10–W14) and §8.8 give the
//! rules and the crash analysis; in short:
//!
//! 1. Under the writer lock, briefly: the liveness of every record is computed from the index
//!    (which rows and chunks a kept set, the open set or a future set can still see), and the
//!    end of the log is noted. Everything before that end is immutable from then on.
//! 2. Without the lock: the log up to that end is scanned once to size each segment's live
//!    bytes (a log with damage is not compacted), and the live chunks and entry rows of each
//!    chosen segment are appended, byte for byte, as ordinary batches, each taking the writer
//!    lock only for its append (fsynced, then applied: the index points at the latest copy).
//!    Backups append their own batches in between.
//! 3. Under the writer lock again: the host, key, set and config records of the chosen segments
//!    that are still the latest of their key (records appended meanwhile are read to know) are
//!    copied, and a `SegmentsCompacted` batch names the retired segments with their batch
//!    ranges; applying it drops the index rows that still point into them (the dead ones).
//! 4. The index is flushed (and, with a bucket, the copies uploaded), and only then are the
//!    retired segments deleted. Last, the index's own files are compacted.
//!
//! Backups meanwhile: a set open in step 1 keeps every chunk live, and segments holding its
//! entry rows are not chosen (the backup may still replace those rows). A set opened after
//! step 1 may have been told by `missing_chunks` that a chunk step 1 found dead exists, so the
//! run stops before the switch, retiring nothing ([`CompactReport::interrupted`]); its copies
//! are ordinary duplicates that the next run reclaims. The segment being appended to in step 1
//! is retired only if nothing was appended to it by the time the copies start; the log then
//! rolls past it first.
//!
//! A crash before step 3's switch leaves the old segments authoritative for what was not yet
//! copied and the copies for what was (both are complete, valid records); a crash after it
//! leaves the copies authoritative, and the next open deletes the retired files that are left
//! ([`crate::Repo::open`]). There is no state in which neither holds a live record.

use crate::error::{Error, Result};
use crate::index::{Applied, Index};
use crate::segments::{self, Batch, Pos, Rec};
use std::collections::{BTreeMap, HashMap, HashSet};
use tardis_core::api::{EntryVersion, SetInfo, SetState};
use tardis_core::event::{kind, Event, SegmentsCompacted};
use tardis_core::ids::{ChunkId, DirId, NameKey, SetId};

/// How `compact` chooses segments.
#[derive(Debug, Clone, Copy)]
pub struct CompactOptions {
    /// Segments whose live fraction (live record bytes / record bytes) is below this are
    /// compacted: 0.0 compacts nothing, 1.0 every segment with any dead byte.
    pub threshold: f64,
    /// Most records copied per batch (each batch is held in memory, up to 8 MiB).
    pub batch_records: usize,
}

impl Default for CompactOptions {
    fn default() -> Self {
        CompactOptions { threshold: 0.5, batch_records: 4096 }
    }
}

/// What `compact` did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CompactReport {
    /// Segments and their bytes before.
    pub segments_before: u64,
    pub bytes_before: u64,
    /// Segments and their bytes after.
    pub segments_after: u64,
    pub bytes_after: u64,
    /// Segments retired (deleted).
    pub retired: Vec<u64>,
    /// Records copied, and their bytes.
    pub copied_records: u64,
    pub copied_bytes: u64,
    /// A set was open, so every chunk was kept (see [`live_positions`]).
    pub pinned_by_open_set: Option<SetId>,
    /// A backup opened a set while the records were copied, so nothing was retired: run again
    /// once it has finished.
    pub interrupted: bool,
    /// Segments left as they are because copying their live records would have eaten into the
    /// space kept free for writes, and the free bytes the cheapest of them needed.
    pub short_of_space: Option<(u64, u64)>,
}

/// Which records are live, by position: the entry rows and chunks that some set can still see.
#[derive(Debug, Default)]
pub struct Liveness {
    pub positions: HashSet<Pos>,
    /// The open set, if any; while one is open every chunk is live.
    pub open_set: Option<SetId>,
}

/// Computes the live entry rows and chunks from the index.
///
/// An entry row written by set F is live if F is the open set (a running backup sees its own
/// rows), or F completed and either it is the newest completed row of its entry (every future
/// set starts from it) or some live set R (completed, not purged) has F <= R < F', where F' is
/// the set of the entry's next completed row (the sets that see it, as in `Index::lookup`).
/// Rows of abandoned sets are dead. A chunk is live if a live version row references it — or,
/// while any set is open, always: a running backup may have been told by `missing_chunks` that
/// the repository holds a chunk it will reference later, and only completing or abandoning its
/// set ends that promise (the pin has no wall-clock expiry, RELIABILITY invariant 6). The base
/// of a live delta chunk is live, down its whole chain.
pub fn live_positions(index: &Index) -> Result<Liveness> {
    let sets = index.sets();
    let open_set = sets.iter().find(|s| s.state == SetState::Open).map(|s| s.id);
    let completed: HashSet<SetId> = sets.iter().filter(|s| s.state == SetState::Completed).map(|s| s.id).collect();
    let readers: Vec<SetId> = sets.iter().filter(|s| SetInfo::is_live(s)).map(|s| s.id).collect();
    let mut out = Liveness { positions: HashSet::new(), open_set };
    let mut chunks: HashSet<ChunkId> = HashSet::new();
    let mut group: Option<(DirId, NameKey)> = None;
    let mut rows: Vec<(SetId, Pos, EntryVersion)> = Vec::new();
    let mut flush = |rows: &mut Vec<(SetId, Pos, EntryVersion)>, out: &mut Liveness| {
        let done: Vec<usize> = (0..rows.len()).filter(|i| completed.contains(&rows[*i].0)).collect();
        for (i, (set, pos, row)) in rows.iter().enumerate() {
            let live = if Some(*set) == open_set {
                true
            } else if let Some(k) = done.iter().position(|j| *j == i) {
                match done.get(k + 1) {
                    None => true,
                    Some(next) => {
                        let until = rows[*next].0;
                        let from = readers.partition_point(|r| r < set);
                        readers.get(from).is_some_and(|r| *r < until)
                    }
                }
            } else {
                false
            };
            if live {
                out.positions.insert(*pos);
                if let EntryVersion::Version(v) = row {
                    chunks.extend(v.extents.iter().map(|e| e.id));
                }
            }
        }
        rows.clear();
    };
    index.for_each_entry_at(&mut |dir, name, set, pos, row| {
        if group != Some((*dir, *name)) {
            flush(&mut rows, &mut out);
            group = Some((*dir, *name));
        }
        rows.push((set, pos, row));
        Ok(())
    })?;
    flush(&mut rows, &mut out);
    if open_set.is_none() {
        keep_delta_bases(index, &mut chunks)?;
    }
    index.for_each_chunk(&mut |id, loc| {
        if open_set.is_some() || chunks.contains(id) {
            out.positions.insert(loc.pos);
        }
        Ok(())
    })?;
    Ok(out)
}

/// Adds to `live` the base of every live delta chunk, down each chain to its full chunk: a
/// delta is only readable while its whole chain is stored.
fn keep_delta_bases(index: &Index, live: &mut HashSet<ChunkId>) -> Result<()> {
    let mut base_of: HashMap<ChunkId, ChunkId> = HashMap::new();
    index.for_each_chunk(&mut |id, loc| {
        if let Some(d) = loc.delta {
            base_of.insert(*id, d.base);
        }
        Ok(())
    })?;
    let mut todo: Vec<ChunkId> = live.iter().filter(|id| base_of.contains_key(id)).copied().collect();
    while let Some(id) = todo.pop() {
        if let Some(base) = base_of.get(&id) {
            if live.insert(*base) {
                todo.push(*base);
            }
        }
    }
    Ok(())
}

/// What the scan learns about one record.
#[derive(Debug, Clone)]
struct RecInfo {
    pos: Pos,
    len: u64,
    class: Class,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Class {
    /// Live iff the index points at this position (chunks; entry rows, with their set).
    Indexed(Option<SetId>),
    /// Only the latest record of this key is live (host, key, set and config events).
    Latest(u8, Vec<u8>),
    /// Always live (compaction records: they explain the gaps in the sequence).
    Always,
}

/// One segment as the scan saw it.
#[derive(Debug, Default)]
struct SegInfo {
    len: u64,
    first_seq: u64,
    next_seq: u64,
    records: Vec<RecInfo>,
}

fn classify(r: &segments::ScannedRecord) -> Result<Class> {
    let event = Event::decode(r.header.kind, r.header.version, &r.meta)
        .map_err(|e| segments::corrupt(r.pos.segment, r.pos.offset, e))?;
    Ok(match event {
        Event::ChunkStored(_) => Class::Indexed(None),
        Event::FileVersion(e) => Class::Indexed(Some(e.set)),
        Event::EntryDeleted(e) => Class::Indexed(Some(e.set)),
        Event::HostCreated(_) => Class::Latest(kind::HOST_CREATED, Vec::new()),
        Event::KeyWrapped(_) => Class::Latest(kind::KEY_WRAPPED, Vec::new()),
        Event::SetOpened(e) => Class::Latest(kind::SET_OPENED, e.set.to_be_bytes().to_vec()),
        Event::SetCompleted(e) => Class::Latest(kind::SET_COMPLETED, e.set.to_be_bytes().to_vec()),
        Event::SetPurged(e) => Class::Latest(kind::SET_PURGED, e.set.to_be_bytes().to_vec()),
        Event::SetLocked(e) => Class::Latest(kind::SET_LOCKED, e.set.to_be_bytes().to_vec()),
        Event::ConfigChanged(e) => Class::Latest(kind::CONFIG_CHANGED, e.key.into_bytes()),
        Event::SegmentsCompacted(_) => Class::Always,
    })
}

/// Reads every segment up to `end` (headers and metas; bodies are read when copied, with their
/// CRC checked): the class and size of every record, each segment's batch range, and the
/// position of the latest record of every `Latest` key. Damage anywhere refuses the compaction.
fn scan(storage: &dyn crate::storage::Storage, end: Pos) -> Result<(BTreeMap<u64, SegInfo>, Latest)> {
    let mut segs = BTreeMap::new();
    let mut latest: Latest = HashMap::new();
    let list = storage.list().map_err(|e| Error::io("listing segments in", storage.describe(0), e))?;
    for seg in list.into_iter().filter(|s| *s <= end.segment) {
        // The segment being appended to is read only up to where the log ended in step 1.
        let len = match seg == end.segment {
            true => end.offset,
            false => storage.len(seg).map_err(|e| Error::io("reading length of", storage.describe(seg), e))?,
        };
        let header = segments::read_segment_header(storage, seg, len)?;
        let mut info = SegInfo { len, first_seq: header.first_seq, next_seq: header.first_seq, records: Vec::new() };
        let header_len = crate::frame::SEGMENT_HEADER_LEN as u64;
        let before = header.first_seq.checked_sub(1);
        let outcome = segments::scan_segment(storage, seg, header_len, len, before, false, &mut |batch: Batch| {
            info.next_seq = batch.seq + 1;
            for r in &batch.records {
                let class = classify(r)?;
                if let Class::Latest(k, key) = &class {
                    latest.insert((*k, key.clone()), r.pos);
                }
                info.records.push(RecInfo { pos: r.pos, len: r.header.total_len(), class });
            }
            Ok(())
        })?;
        let damage =
            outcome.damage.first().map(|d| d.offset).or((outcome.committed_end < len).then_some(outcome.committed_end));
        if let Some(offset) = damage {
            return Err(Error::Refused(format!(
                "segment {seg} is damaged at offset {offset}; compaction would copy around it: run \
                 `tardis-tools verify` and repair the repository first"
            )));
        }
        segs.insert(seg, info);
    }
    Ok((segs, latest))
}

/// The position of the latest record of each `Latest` key.
type Latest = HashMap<(u8, Vec<u8>), Pos>;

/// Bytes copied per batch: bounded so that a batch (held in memory) stays small.
const COPY_BATCH_BYTES: usize = 8 << 20;

impl crate::Repo {
    /// Compacts the log: see the module documentation. Backups run meanwhile; the writer lock
    /// is held only to compute liveness, for each copy batch, and for the switch.
    pub fn compact(&self, opts: &CompactOptions) -> Result<CompactReport> {
        let _one_at_a_time = self.compaction_lock();
        let storage = self.storage().clone();
        // Step 1: liveness from an index that stands still, and the end of the log it matches.
        let (live, start, newest) = {
            let log = self.writer();
            if log.is_poisoned() {
                return Err(Error::Poisoned);
            }
            (live_positions(self.index())?, log.end(), newest_set(self.index()))
        };
        if start.segment == 0 {
            return Ok(CompactReport::default());
        }

        // Step 2: one scan of the log up to that end, then the copies of chunks and rows.
        let (segs, mut latest) = scan(storage.as_ref(), start)?;
        let is_live = |r: &RecInfo, latest: &Latest| match &r.class {
            Class::Indexed(_) => live.positions.contains(&r.pos),
            Class::Latest(k, key) => latest.get(&(*k, key.clone())) == Some(&r.pos),
            Class::Always => true,
        };
        let mut report = CompactReport {
            segments_before: segs.len() as u64,
            bytes_before: segs.values().map(|s| s.len).sum(),
            pinned_by_open_set: live.open_set,
            ..CompactReport::default()
        };
        // Each candidate with the bytes of its live records: what copying it costs.
        let mut candidates: Vec<(u64, u64)> = segs
            .iter()
            .filter_map(|(seg, info)| {
                // The running backup may still replace its own rows: their segments stay.
                let holds_open_rows = live.open_set.is_some()
                    && info.records.iter().any(|r| r.class == Class::Indexed(live.open_set) && is_live(r, &latest));
                let total: u64 = info.records.iter().map(|r| r.len).sum();
                let kept: u64 = info.records.iter().filter(|r| is_live(r, &latest)).map(|r| r.len).sum();
                // An empty segment (a header and nothing else) is all overhead.
                let worth = total == 0 || (kept as f64) < opts.threshold * total as f64;
                (!holds_open_rows && worth).then_some((kept, *seg))
            })
            .collect();
        // The copies are written before the segments they replace are deleted, so they need
        // free space first. Segments whose copies do not fit above the reserve kept for writes
        // stay for a later run: starting them would fail half-way and leave the disk fuller
        // than before, with duplicates only a later compaction reclaims. A segment with nothing
        // live costs nothing and always goes.
        if let Some(space) = storage.space().map_err(|e| Error::io("checking free space of", storage.describe(0), e))? {
            let mut room = space.free.saturating_sub(space.reserve());
            candidates.sort_unstable();
            candidates.retain(|&(cost, _)| {
                if cost <= room {
                    room -= cost;
                    return true;
                }
                // The first one skipped is the cheapest: its shortfall is reported.
                report.short_of_space.get_or_insert((0, cost - room)).0 += 1;
                false
            });
        }
        let mut victims: Vec<u64> = candidates.into_iter().map(|(_, seg)| seg).collect();
        victims.sort_unstable();
        if let Some((n, need)) = report.short_of_space {
            tracing::warn!(
                host = self.host_name(),
                segments = n,
                need,
                "segments left uncompacted: their live records need more free space"
            );
        }
        if victims.is_empty() {
            return Ok(unchanged(report));
        }

        if victims.contains(&start.segment) {
            // The last segment at step 1: retired only if nothing was appended to it since, and
            // then the log moves past it before the copies (which must not land in it).
            let mut log = self.writer();
            let len = storage
                .len(start.segment)
                .map_err(|e| Error::io("reading length of", storage.describe(start.segment), e))?;
            if len > start.offset {
                victims.retain(|s| *s != start.segment);
            } else {
                log.roll();
            }
        }
        let mut batch =
            CopyBatch { created: Vec::new(), pending: Vec::new(), bytes: 0, max: opts.batch_records.max(1) };
        for seg in &victims {
            for r in segs[seg].records.iter().filter(|r| matches!(r.class, Class::Indexed(_) | Class::Always)) {
                if !is_live(r, &latest) {
                    continue;
                }
                let (header, meta, body) = segments::read_record(storage.as_ref(), r.pos)?;
                report.copied_records += 1;
                report.copied_bytes += r.len;
                if batch.push(header.kind, header.version, meta, body) {
                    let mut log = self.writer();
                    if newest_set(self.index()) != newest {
                        return Ok(interrupted(report));
                    }
                    batch.commit(self, &mut log)?;
                }
            }
        }

        // Step 3, under the lock to the end: the latest-of-their-key records and the switch.
        let mut log = self.writer();
        if newest_set(self.index()) != newest {
            return Ok(interrupted(report));
        }
        // Host, key, set and config records appended since step 1 supersede older copies.
        latest_since(storage.as_ref(), start, log.end(), &mut latest)?;
        for seg in &victims {
            for r in segs[seg].records.iter().filter(|r| matches!(r.class, Class::Latest(..))) {
                if is_live(r, &latest) {
                    let (header, meta, body) = segments::read_record(storage.as_ref(), r.pos)?;
                    report.copied_records += 1;
                    report.copied_bytes += r.len;
                    batch.push(header.kind, header.version, meta, body);
                }
            }
        }
        batch.commit(self, &mut log)?;
        if victims.is_empty() {
            return Ok(unchanged(report));
        }
        // The switch: one durable record names what is retired.
        let ranges = victims.iter().map(|s| [segs[s].first_seq, segs[s].next_seq]).collect();
        let mut created = std::mem::take(&mut batch.created);
        created.dedup();
        let event = Event::SegmentsCompacted(SegmentsCompacted { retired: victims.clone(), created, ranges });
        let meta = event.encode();
        self.commit_raw(&mut log, vec![(event.kind(), tardis_core::event::PAYLOAD_VERSION, meta, Vec::new())])?;

        // Retire only once the index that no longer points into them is durable too, and,
        // with a bucket, once the copies are uploaded.
        self.index().flush()?;
        log.seal_all()?;
        for seg in &victims {
            storage.remove(*seg).map_err(|e| Error::io("removing retired segment", storage.describe(*seg), e))?;
        }
        drop(log);
        report.retired = victims;
        self.index().compact_files();
        let after = storage.list().map_err(|e| Error::io("listing segments in", storage.describe(0), e))?;
        report.segments_after = after.len() as u64;
        for seg in after {
            report.bytes_after +=
                storage.len(seg).map_err(|e| Error::io("reading length of", storage.describe(seg), e))?;
        }
        tracing::info!(retired = ?report.retired, copied = report.copied_records, "compaction done");
        Ok(report)
    }

    /// Appends records (already encoded: copies keep their kind, version and bytes) as one
    /// durable batch and applies it to the index. Returns the end of the batch.
    fn commit_raw(&self, log: &mut segments::Log, recs: Vec<(u8, u8, Vec<u8>, Vec<u8>)>) -> Result<Pos> {
        let mut events = Vec::with_capacity(recs.len());
        for (k, v, meta, _) in &recs {
            events.push(Event::decode(*k, *v, meta)?);
        }
        let frames: Vec<Rec<'_>> =
            recs.iter().map(|(k, v, meta, body)| Rec { kind: *k, version: *v, meta, body }).collect();
        let (positions, end) = log.append(&frames)?;
        let applied: Vec<Applied> = events
            .into_iter()
            .zip(positions)
            .zip(&recs)
            .map(|((event, pos), r)| Applied { pos, event, body_len: r.3.len() as u32 })
            .collect();
        if let Err(e) = self.index().apply(&applied, end) {
            log.poison(); // as in `Repo::commit`: the batch is durable, the index must replay it
            return Err(e);
        }
        Ok(end)
    }
}

/// Records copied and not yet appended.
struct CopyBatch {
    /// Segments the copies went to.
    created: Vec<u64>,
    pending: Vec<(u8, u8, Vec<u8>, Vec<u8>)>,
    bytes: usize,
    max: usize,
}

impl CopyBatch {
    /// Adds a record; true when the batch is full and should be committed.
    fn push(&mut self, kind: u8, version: u8, meta: Vec<u8>, body: Vec<u8>) -> bool {
        self.bytes += meta.len() + body.len();
        self.pending.push((kind, version, meta, body));
        self.bytes >= COPY_BATCH_BYTES || self.pending.len() >= self.max
    }

    /// Appends what is pending as one durable batch (nothing if empty).
    fn commit(&mut self, repo: &crate::Repo, log: &mut segments::Log) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let end = repo.commit_raw(log, std::mem::take(&mut self.pending))?;
        self.bytes = 0;
        self.created.push(end.segment);
        Ok(())
    }
}

/// The newest set the index knows: a set opened after step 1 changes it.
fn newest_set(index: &Index) -> Option<SetId> {
    index.with_set_rows(|rows| rows.keys().next_back().copied())
}

fn interrupted(mut report: CompactReport) -> CompactReport {
    tracing::info!("a backup started during compaction: nothing retired this time");
    report.interrupted = true;
    unchanged(report)
}

/// `report` for a run that retired nothing: the segments after are those before.
fn unchanged(mut report: CompactReport) -> CompactReport {
    report.segments_after = report.segments_before;
    report.bytes_after = report.bytes_before;
    report
}

/// Updates `latest` with the host, key, set and config records appended between `from` and
/// `to` (called under the writer lock, so that stretch of the log stands still).
fn latest_since(storage: &dyn crate::storage::Storage, from: Pos, to: Pos, latest: &mut Latest) -> Result<()> {
    for seg in from.segment..=to.segment {
        let len = storage.len(seg).map_err(|e| Error::io("reading length of", storage.describe(seg), e))?;
        let (begin, before) = match seg == from.segment {
            true => (from.offset, None),
            false => (crate::frame::SEGMENT_HEADER_LEN as u64, None),
        };
        if begin >= len {
            continue;
        }
        segments::scan_segment(storage, seg, begin, len, before, false, &mut |batch: Batch| {
            for r in &batch.records {
                if let Class::Latest(k, key) = classify(r)? {
                    latest.insert((k, key), r.pos);
                }
            }
            Ok(())
        })?;
    }
    Ok(())
}
