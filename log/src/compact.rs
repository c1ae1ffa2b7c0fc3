//! Compaction: the live records of mostly-dead segments are copied to the end of the log, and
//! those segments are then retired (deleted). `docs/FORMAT.md` §7 (W10–W14) and §8.8 give the
//! rules and the crash analysis; in short:
//!
//! 1. Under the writer lock, the liveness of every record is computed from the index (which
//!    rows and chunks a kept set, the open set or a future set can still see) and the log is
//!    scanned once to size each segment's live bytes. A log with damage is not compacted.
//! 2. The live records of each chosen segment are appended, byte for byte, as ordinary batches
//!    (fsynced, then applied: the index points at the latest copy of a chunk or an entry row).
//!    If the segment being appended to is chosen, the log first rolls to a new one.
//! 3. A `SegmentsCompacted` batch names the retired segments with their batch ranges; applying
//!    it drops the index rows that still point into them (the dead ones).
//! 4. The index is flushed, and only then are the retired segment files deleted. Last, the
//!    index's own files are compacted, so the rows the copies replaced stop taking space.
//!
//! A crash before step 3 leaves the old segments authoritative for what was not yet copied and
//! the copies for what was (both are complete, valid records); a crash after it leaves the
//! copies authoritative, and the next open deletes the retired files that are left
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
    /// Live iff the index points at this position (chunks, entry rows).
    Indexed,
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
        Event::ChunkStored(_) | Event::FileVersion(_) | Event::EntryDeleted(_) => Class::Indexed,
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

/// Reads every segment (headers and metas; bodies are read when copied, with their CRC
/// checked): the class and size of every record, each segment's batch range, and the position of
/// the latest record of every `Latest` key. Damage anywhere refuses the compaction.
fn scan(storage: &dyn crate::storage::Storage) -> Result<(BTreeMap<u64, SegInfo>, Latest)> {
    let mut segs = BTreeMap::new();
    let mut latest: Latest = HashMap::new();
    let list = storage.list().map_err(|e| Error::io("listing segments in", storage.describe(0), e))?;
    for seg in list {
        let len = storage.len(seg).map_err(|e| Error::io("reading length of", storage.describe(seg), e))?;
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
    /// Compacts the log: see the module documentation. Holds the writer lock throughout, so no
    /// batch is appended meanwhile (in `tardisd`, backups wait for it).
    pub fn compact(&self, opts: &CompactOptions) -> Result<CompactReport> {
        let mut log = self.writer();
        if log.is_poisoned() {
            return Err(Error::Poisoned);
        }
        let storage = self.storage().clone();
        let current = log.end().segment;
        let live = live_positions(self.index())?;

        // One scan of the whole log: each record's class and size, each segment's batch range.
        let (segs, latest) = scan(storage.as_ref())?;
        let is_live = |r: &RecInfo| match &r.class {
            Class::Indexed => live.positions.contains(&r.pos),
            Class::Latest(k, key) => latest.get(&(*k, key.clone())) == Some(&r.pos),
            Class::Always => true,
        };

        let mut report = CompactReport {
            segments_before: segs.len() as u64,
            bytes_before: segs.values().map(|s| s.len).sum(),
            pinned_by_open_set: live.open_set,
            ..CompactReport::default()
        };
        let victims: Vec<u64> = segs
            .iter()
            .filter(|(_, info)| {
                let total: u64 = info.records.iter().map(|r| r.len).sum();
                let kept: u64 = info.records.iter().filter(|r| is_live(r)).map(|r| r.len).sum();
                // An empty segment (a header and nothing else) is all overhead.
                total == 0 || (kept as f64) < opts.threshold * total as f64
            })
            .map(|(seg, _)| *seg)
            .collect();
        if victims.is_empty() {
            report.segments_after = report.segments_before;
            report.bytes_after = report.bytes_before;
            return Ok(report);
        }

        if victims.contains(&current) {
            // The segment being appended to goes too: the copies start a new one.
            log.roll();
        }

        // Copy, in log order, in bounded batches. Each batch is durable before it is applied.
        let mut pending: Vec<(u8, u8, Vec<u8>, Vec<u8>)> = Vec::new();
        let mut pending_bytes = 0usize;
        let mut created: Vec<u64> = Vec::new();
        for seg in &victims {
            for r in segs[seg].records.iter().filter(|r| is_live(r)) {
                let (header, meta, body) = segments::read_record(storage.as_ref(), r.pos)?;
                pending_bytes += meta.len() + body.len();
                report.copied_records += 1;
                report.copied_bytes += r.len;
                pending.push((header.kind, header.version, meta, body));
                if pending_bytes >= COPY_BATCH_BYTES || pending.len() >= opts.batch_records.max(1) {
                    let end = self.commit_raw(&mut log, std::mem::take(&mut pending))?;
                    created.push(end.segment);
                    pending_bytes = 0;
                }
            }
        }
        if !pending.is_empty() {
            let end = self.commit_raw(&mut log, pending)?;
            created.push(end.segment);
        }
        created.dedup();

        // The switch: one durable record names what is retired.
        let ranges = victims.iter().map(|s| [segs[s].first_seq, segs[s].next_seq]).collect();
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
