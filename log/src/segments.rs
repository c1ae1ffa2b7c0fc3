//! The append-only segment log: batches of framed records, fsync discipline, and recovery.
//!
//! Recovery rules (RELIABILITY invariants 1 and 3):
//! - A batch exists iff its commit record is durable. Records after the last commit of the
//!   last segment were never acknowledged and are cut off on open (kept in `quarantine/`).
//! - A bad record is only a torn tail if no complete, valid batch follows it. If one does, the
//!   bytes are damage in the middle of the log: nothing is truncated, the damage is reported,
//!   later batches stay readable, and new writes go to a fresh segment.
//! - A scan across segments (index replay, verify) also checks that every segment's `first_seq`
//!   follows the previous segment's last batch ([`NextSeq`]): a missing segment is damage too,
//!   reported, and the scan reads on. A damaged header of a segment other than the
//!   last is damage as well; only the last segment's header must be valid for the log to open.
//! - After any failed write or fsync the log is poisoned and refuses writes until reopened,
//!   because the state of the file after a failed write is unknown (fsyncgate).

use crate::error::{Error, Result};
use crate::frame::{self, Commit, FrameError, RecordHeader, SegmentHeader, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use crate::storage::{SegmentFile, Storage};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use tardis_core::event::kind::BATCH_COMMIT;

/// A position in the log: a segment and a byte offset in it. Ordered by time of writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    pub segment: u64,
    pub offset: u64,
}

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.segment, self.offset)
    }
}

/// One record to append.
#[derive(Debug, Clone, Copy)]
pub struct Rec<'a> {
    pub kind: u8,
    pub version: u8,
    pub meta: &'a [u8],
    pub body: &'a [u8],
}

/// A record as seen by a scan: where it is, its header and its meta (bodies are not loaded).
#[derive(Debug, Clone)]
pub struct ScannedRecord {
    pub pos: Pos,
    pub header: RecordHeader,
    pub meta: Vec<u8>,
    /// Set when bodies were verified and this one failed its CRC.
    pub body_damage: Option<String>,
}

/// A committed batch found by a scan.
#[derive(Debug, Clone)]
pub struct Batch {
    pub seq: u64,
    pub records: Vec<ScannedRecord>,
    /// Position just after the batch's commit record.
    pub end: Pos,
}

/// Damage found in the middle of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub segment: u64,
    pub offset: u64,
    /// Where valid batches resume (the damaged bytes are `offset..resume`).
    pub resume: u64,
    pub reason: String,
}

/// Bytes cut from the end of the log on open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trim {
    pub segment: u64,
    pub offset: u64,
    pub bytes: u64,
    pub quarantine: PathBuf,
}

/// What opening the log found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    pub trimmed: Option<Trim>,
    pub damage: Vec<Damage>,
    /// A segment whose creation was cut short (no complete header) and was removed.
    pub removed_segment: Option<u64>,
}

/// Log tuning.
#[derive(Debug, Clone, Copy)]
pub struct LogOptions {
    /// A new segment is started once the current one reaches this size.
    pub segment_size: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions { segment_size: 128 << 20 }
    }
}

/// The writer side of the log plus reads of single records.
#[derive(Debug)]
pub struct Log {
    storage: Arc<dyn Storage>,
    opts: LogOptions,
    writer: Option<Box<dyn SegmentFile>>,
    /// Segment being appended to (0 before the first segment exists).
    segment: u64,
    /// Committed length of `segment`.
    end: u64,
    next_seq: u64,
    poisoned: bool,
}

impl Log {
    /// Opens the log, recovering the tail of the last segment. `hint` is a position known to be
    /// the end of a committed batch (the index's applied position); the scan starts there.
    pub fn open(storage: Arc<dyn Storage>, opts: LogOptions, hint: Option<Pos>) -> Result<(Log, Recovery)> {
        let mut recovery = Recovery::default();
        let mut segs = storage.list().map_err(|e| Error::io("listing segments in", storage.describe(0), e))?;
        let mut log =
            Log { storage: storage.clone(), opts, writer: None, segment: 0, end: 0, next_seq: 1, poisoned: false };
        let Some(&last) = segs.last() else { return Ok((log, recovery)) };

        let len = log.seg_len(last)?;
        let header = match log.segment_header(last, len) {
            Ok(h) => h,
            Err(_) if len < SEGMENT_HEADER_LEN as u64 || log.all_zero(last, len)? => {
                // Creation was cut short before the header was durable (the file is shorter than a
                // header, or its size reached the disk before its bytes): no record is inside.
                let mut bytes = vec![0u8; len as usize];
                log.read_exact(last, 0, &mut bytes)?;
                storage
                    .quarantine(last, 0, &bytes)
                    .map_err(|e| Error::io("quarantining", storage.describe(last), e))?;
                storage.remove(last).map_err(|e| Error::io("removing", storage.describe(last), e))?;
                recovery.removed_segment = Some(last);
                segs.pop();
                return match segs.last() {
                    Some(_) => {
                        let (log, mut r) = Log::open(storage, opts, hint)?;
                        r.removed_segment = Some(last);
                        Ok((log, r))
                    }
                    None => Ok((log, recovery)),
                };
            }
            Err(e) => return Err(e),
        };

        // Start at the hint when it points into this segment and names a real commit.
        let mut from = SEGMENT_HEADER_LEN as u64;
        let mut seq_before = header.first_seq.checked_sub(1);
        if let Some(h) = hint.filter(|h| h.segment == last && h.offset > from && h.offset <= len) {
            if let Ok(seq) = log.commit_ending_at(h) {
                from = h.offset;
                seq_before = Some(seq);
            }
        }
        let outcome = scan_segment(storage.as_ref(), last, from, len, seq_before, true, &mut |_| Ok(()))?;
        recovery.damage = outcome.damage.clone();
        log.next_seq = outcome.last_seq.or(seq_before).map_or(header.first_seq, |s| s + 1);
        log.segment = last;
        log.end = outcome.committed_end;

        if outcome.committed_end < len {
            let offset = outcome.committed_end;
            let mut bytes = vec![0u8; (len - offset) as usize];
            log.read_exact(last, offset, &mut bytes)?;
            let quarantine = storage
                .quarantine(last, offset, &bytes)
                .map_err(|e| Error::io("quarantining", storage.describe(last), e))?;
            storage.truncate(last, offset).map_err(|e| Error::io("truncating", storage.describe(last), e))?;
            tracing::warn!(segment = last, offset, bytes = bytes.len(), "cut uncommitted tail of the log");
            recovery.trimmed = Some(Trim { segment: last, offset, bytes: bytes.len() as u64, quarantine });
        }
        if recovery.damage.is_empty() && storage.appendable(last) {
            log.writer = Some(storage.open_append(last).map_err(|e| Error::io("opening", storage.describe(last), e))?);
        }
        // With damage, or when the last segment is sealed in a bucket, `writer` stays empty and
        // the next batch starts a new segment.
        Ok((log, recovery))
    }

    /// Ends the current segment: the next batch starts a new one. Compaction calls this so that
    /// the segment it was appending to can be retired like any other.
    pub fn roll(&mut self) {
        self.writer = None;
    }

    /// With remote storage, ends the current segment and uploads every segment not yet
    /// uploaded; a no-op for local storage. An error leaves them staged (durable locally).
    pub fn seal_all(&mut self) -> Result<()> {
        if !self.storage.remote() {
            return Ok(());
        }
        self.writer = None;
        self.storage.seal(self.segment + 1).map_err(|e| Error::io("sealing", self.storage.describe(self.segment), e))
    }

    /// With remote storage, uploads the segments that are sealed but still staged (after an
    /// outage of the store); the open segment stays open.
    pub fn upload_sealed(&mut self) -> Result<()> {
        let below = if self.writer.is_some() { self.segment } else { self.segment + 1 };
        self.storage.seal(below).map_err(|e| Error::io("sealing", self.storage.describe(self.segment), e))
    }

    /// Refuses further writes until the log is reopened: the caller could not finish what a
    /// durable batch started (the index update after it failed).
    pub fn poison(&mut self) {
        self.poisoned = true;
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Whether `pos` is the end of a committed batch of this log (an index position that can be
    /// trusted as a replay start).
    pub fn is_commit_end(&self, pos: Pos) -> bool {
        if pos == self.end() {
            return true;
        }
        let len = match self.storage.len(pos.segment) {
            Ok(l) => l,
            Err(_) => return false,
        };
        pos.offset <= len && self.commit_ending_at(pos).is_ok()
    }

    /// The position just after the last committed batch.
    pub fn end(&self) -> Pos {
        Pos { segment: self.segment, offset: self.end }
    }

    /// The storage this log reads and writes.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Appends `records` as one batch and makes it durable. Returns each record's position and
    /// the end of the batch.
    pub fn append(&mut self, records: &[Rec<'_>]) -> Result<(Vec<Pos>, Pos)> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let mut buf = Vec::with_capacity(
            records.iter().map(|r| RECORD_HEADER_LEN + r.meta.len() + r.body.len()).sum::<usize>() + 64,
        );
        let mut offsets = Vec::with_capacity(records.len());
        let mut batch_crc = 0u32;
        for r in records {
            offsets.push(buf.len() as u64);
            let crc = frame::encode_record(&mut buf, r.kind, r.version, r.meta, r.body);
            batch_crc = Commit::chain(batch_crc, crc);
        }
        let commit = Commit { seq: self.next_seq, count: records.len() as u32, batch_crc };
        frame::encode_record(&mut buf, BATCH_COMMIT, 1, &commit.encode(), &[]);

        let result = self.write_batch(&buf);
        if result.is_err() && !matches!(result, Err(Error::DiskFull { op: "reserving space in", .. })) {
            self.poisoned = true;
        }
        let start = result?;
        self.end = start + buf.len() as u64;
        self.next_seq += 1;
        let positions = offsets.into_iter().map(|o| Pos { segment: self.segment, offset: start + o }).collect();
        Ok((positions, self.end()))
    }

    /// Writes one encoded batch, rolling to a new segment first when the current one is full.
    /// Returns the offset the batch starts at.
    fn write_batch(&mut self, buf: &[u8]) -> Result<u64> {
        // Refuse before writing when the batch would eat into the reserve: a full disk then
        // fails one backup cleanly instead of failing writes half-way (Borg PR #9853).
        if let Some(space) =
            self.storage.space().map_err(|e| Error::io("checking free space of", self.storage.describe(0), e))?
        {
            if (buf.len() as u64).saturating_add(space.reserve()) > space.free {
                return Err(Error::DiskFull {
                    op: "reserving space in",
                    path: self.storage.describe(self.segment.max(1)),
                });
            }
        }
        let header_only = self.end <= SEGMENT_HEADER_LEN as u64;
        if self.writer.is_none() || (!header_only && self.end + buf.len() as u64 > self.opts.segment_size) {
            let seg = self.segment + 1;
            let header = SegmentHeader { segment: seg, first_seq: self.next_seq }.encode();
            self.writer = None;
            let w = self
                .storage
                .create(seg, &header)
                .map_err(|e| Error::io("creating segment", self.storage.describe(seg), e))?;
            self.writer = Some(w);
            self.segment = seg;
            self.end = SEGMENT_HEADER_LEN as u64;
            if let Err(e) = self.storage.seal(seg) {
                // Staged and durable locally; the next seal retries (the store may be down).
                tracing::warn!(segment = seg - 1, "segment stays staged: {e}");
            }
        }
        let path = self.storage.describe(self.segment);
        let w = self.writer.as_mut().ok_or(Error::Poisoned)?;
        w.append(buf).map_err(|e| Error::io("appending to", path.clone(), e))?;
        w.sync().map_err(|e| Error::io("syncing", path, e))?;
        Ok(self.end)
    }

    /// Reads one record, checking both CRCs. Returns its header, meta and body.
    pub fn read(&self, pos: Pos) -> Result<(RecordHeader, Vec<u8>, Vec<u8>)> {
        read_record(self.storage.as_ref(), pos)
    }

    fn all_zero(&self, seg: u64, len: u64) -> Result<bool> {
        if len > 16 << 20 {
            return Ok(false);
        }
        let mut b = vec![0u8; len as usize];
        self.read_exact(seg, 0, &mut b)?;
        Ok(b.iter().all(|x| *x == 0))
    }

    fn seg_len(&self, seg: u64) -> Result<u64> {
        self.storage.len(seg).map_err(|e| Error::io("reading length of", self.storage.describe(seg), e))
    }

    fn read_exact(&self, seg: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        read_exact(self.storage.as_ref(), seg, offset, buf)
    }

    fn segment_header(&self, seg: u64, len: u64) -> Result<SegmentHeader> {
        read_segment_header(self.storage.as_ref(), seg, len)
    }

    /// The sequence number of the batch whose commit record ends exactly at `pos`.
    fn commit_ending_at(&self, pos: Pos) -> Result<u64> {
        commit_seq_ending_at(self.storage.as_ref(), pos)
    }
}

/// The sequence number of the batch whose commit record ends exactly at `pos`; an error if the
/// bytes before `pos` are not a valid commit record.
pub fn commit_seq_ending_at(storage: &dyn Storage, pos: Pos) -> Result<u64> {
    let len = (RECORD_HEADER_LEN + frame::COMMIT_META_LEN) as u64;
    let start = pos.offset.checked_sub(len).ok_or_else(|| corrupt(pos.segment, pos.offset, "no commit before hint"))?;
    let mut b = vec![0u8; len as usize];
    read_exact(storage, pos.segment, start, &mut b)?;
    let p = frame::parse_record(&b).map_err(|e| corrupt(pos.segment, start, e))?;
    if p.header.kind != BATCH_COMMIT {
        return Err(corrupt(pos.segment, start, "hint does not follow a commit"));
    }
    Ok(Commit::decode(p.meta).map_err(|e| corrupt(pos.segment, start, e))?.seq)
}

/// Turns a problem with the header of segment `seg` (of length `len`) into damage covering the
/// whole segment, so that a full scan reports it and reads on. I/O errors stay errors: a failed
/// read is never taken for an empty or damaged segment (RELIABILITY invariant 7).
pub fn header_damage(seg: u64, len: u64, err: Error) -> Result<Damage> {
    let reason = match err {
        Error::Corrupt { reason, .. } => reason,
        Error::Version { what, found, supported } => {
            format!("unsupported {what} version {found} (this build reads up to {supported})")
        }
        other => return Err(other),
    };
    Ok(Damage { segment: seg, offset: 0, resume: len, reason: format!("segment header: {reason}") })
}

/// What the next segment's `first_seq` must be, as a scan that reads segments in order learns it.
///
/// Sequence numbers, not segment numbers, carry continuity: a later version's compaction will
/// retire segments and leave gaps in their numbering, but never in the batches' sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextSeq {
    /// The previous segment was read to its end: the next one starts with exactly this batch.
    Exactly(u64),
    /// The previous segment lost batches of unknown numbers (damage at its end, or an unreadable
    /// header): the next one starts with this batch or a later one.
    AtLeast(u64),
}

impl NextSeq {
    /// The expectation after a segment whose last committed batch is `last_seq`.
    pub fn after(last_seq: u64, tail_damaged: bool) -> NextSeq {
        let next = last_seq.saturating_add(1);
        if tail_damaged {
            NextSeq::AtLeast(next)
        } else {
            NextSeq::Exactly(next)
        }
    }

    /// The expectation after a segment that could not be read at all.
    pub fn loosen(self) -> NextSeq {
        match self {
            NextSeq::Exactly(n) | NextSeq::AtLeast(n) => NextSeq::AtLeast(n),
        }
    }

    /// The damage to report if segment `seg`, whose header says `first_seq`, breaks the sequence.
    /// It sits just before the segment's first record: no byte of this segment is damaged, the
    /// missing batches are before it.
    pub fn check(self, seg: u64, first_seq: u64) -> Option<Damage> {
        let (ok, expected) = match self {
            NextSeq::Exactly(n) => (first_seq == n, format!("batch {n}")),
            NextSeq::AtLeast(n) => (first_seq >= n, format!("batch {n} or later")),
        };
        (!ok).then(|| Damage {
            segment: seg,
            offset: SEGMENT_HEADER_LEN as u64,
            resume: SEGMENT_HEADER_LEN as u64,
            reason: format!(
                "sequence break: expected {expected}, segment starts at {first_seq}; a segment may be missing"
            ),
        })
    }
}

/// Reads and checks the header of segment `seg` (of length `len`).
pub fn read_segment_header(storage: &dyn Storage, seg: u64, len: u64) -> Result<SegmentHeader> {
    let mut b = [0u8; SEGMENT_HEADER_LEN];
    if len < SEGMENT_HEADER_LEN as u64 {
        return Err(corrupt(seg, 0, FrameError::Short));
    }
    read_exact(storage, seg, 0, &mut b)?;
    let h = SegmentHeader::decode(&b).map_err(|e| match e {
        FrameError::Version(v) => Error::Version { what: "segment", found: v, supported: frame::SEGMENT_VERSION },
        e => corrupt(seg, 0, e),
    })?;
    if h.segment != seg {
        return Err(corrupt(seg, 0, format!("header names segment {}", h.segment)));
    }
    Ok(h)
}

/// Result of scanning one segment.
#[derive(Debug, Clone, Default)]
pub struct ScanOutcome {
    /// End of the last committed batch.
    pub committed_end: u64,
    pub last_seq: Option<u64>,
    /// Mid-log damage skipped over (valid batches follow each).
    pub damage: Vec<Damage>,
}

/// Scans one segment, calling `on_batch` for every committed batch in order. Damage followed
/// by valid batches is reported and skipped; damage or uncommitted records at the end stop the
/// scan there (the caller decides whether that end is a torn tail).
pub fn scan_segment(
    storage: &dyn Storage,
    seg: u64,
    from: u64,
    len: u64,
    prev_seq: Option<u64>,
    verify_bodies: bool,
    on_batch: &mut dyn FnMut(Batch) -> Result<()>,
) -> Result<ScanOutcome> {
    let mut reader = SeqReader::new(storage, seg, len);
    let mut out = ScanOutcome { committed_end: from, last_seq: prev_seq, ..ScanOutcome::default() };
    let mut off = from;
    let mut pending: Vec<ScannedRecord> = Vec::new();
    let mut batch_crc = 0u32;
    while off < len {
        match next_record(&mut reader, off, verify_bodies)? {
            Ok(rec) => {
                let total = rec.header.total_len();
                if rec.header.kind == BATCH_COMMIT {
                    // Sequence numbers rise by one per batch, so a stale copy of an old batch
                    // (a replayed or duplicated region) never passes for a new commit.
                    // After skipping damage the lost batches' numbers are unknown: any later one fits.
                    let resynced = out.damage.last().is_some_and(|d| d.resume > out.committed_end);
                    let seq_ok = |seq: u64| match out.last_seq {
                        None => true,
                        Some(last) if resynced => seq > last,
                        Some(last) => seq == last + 1,
                    };
                    let commit = Commit::decode(&rec.meta)
                        .ok()
                        .filter(|c| c.count as usize == pending.len() && c.batch_crc == batch_crc && seq_ok(c.seq));
                    let Some(commit) = commit else {
                        if !damage_or_stop(
                            &mut reader,
                            &mut out,
                            seg,
                            off,
                            FrameError::BadCommit,
                            &mut pending,
                            &mut batch_crc,
                        )? {
                            break;
                        }
                        off = out.damage.last().map_or(len, |d| d.resume);
                        continue;
                    };
                    off += total;
                    out.committed_end = off;
                    out.last_seq = Some(commit.seq);
                    let records: Vec<ScannedRecord> = std::mem::take(&mut pending);
                    batch_crc = 0;
                    on_batch(Batch { seq: commit.seq, records, end: Pos { segment: seg, offset: off } })?;
                } else {
                    if let Some(reason) = &rec.body_damage {
                        // The header is intact, so framing continues; only this record's body
                        // is lost. Report it precisely and keep the rest of the batch.
                        tracing::error!(segment = seg, offset = off, "damaged record body: {reason}");
                        out.damage.push(Damage {
                            segment: seg,
                            offset: off,
                            resume: off + total,
                            reason: reason.clone(),
                        });
                    }
                    batch_crc = Commit::chain(batch_crc, rec.header.head_crc);
                    pending.push(rec);
                    off += total;
                }
            }
            Err(e) => {
                if !damage_or_stop(&mut reader, &mut out, seg, off, e, &mut pending, &mut batch_crc)? {
                    break;
                }
                off = out.damage.last().map_or(len, |d| d.resume);
            }
        }
    }
    Ok(out)
}

/// Handles a bad record at `off`: if a valid batch follows, records damage (the partial batch
/// before it is lost with it) and returns true; otherwise returns false (end of valid data).
fn damage_or_stop(
    reader: &mut SeqReader<'_>,
    out: &mut ScanOutcome,
    seg: u64,
    off: u64,
    err: FrameError,
    pending: &mut Vec<ScannedRecord>,
    batch_crc: &mut u32,
) -> Result<bool> {
    let Some(resume) = find_valid_batch(reader, off + 1, out.last_seq)? else { return Ok(false) };
    let start = pending.first().map_or(off, |r| r.pos.offset);
    tracing::error!(segment = seg, offset = off, resume, "damaged record in the middle of the log: {err}");
    out.damage.push(Damage { segment: seg, offset: start, resume, reason: err.to_string() });
    pending.clear();
    *batch_crc = 0;
    Ok(true)
}

/// Reads and checks the record at `off`. The outer `Result` is an I/O failure; the inner one
/// says whether the bytes form a valid record.
fn next_record(reader: &mut SeqReader<'_>, off: u64, verify_bodies: bool) -> Result<Result<ScannedRecord, FrameError>> {
    let Some(hb) = reader.get(off, RECORD_HEADER_LEN)? else { return Ok(Err(FrameError::Short)) };
    let header = match RecordHeader::decode(hb) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e)),
    };
    let hb = hb.to_vec();
    let Some(meta) = reader.get(off + RECORD_HEADER_LEN as u64, header.meta_len as usize)? else {
        return Ok(Err(FrameError::Short));
    };
    if let Err(e) = header.check(&hb, meta) {
        return Ok(Err(e));
    }
    let meta = meta.to_vec();
    let body_at = off + RECORD_HEADER_LEN as u64 + u64::from(header.meta_len);
    let mut body_damage = None;
    if verify_bodies {
        let Some(body) = reader.get(body_at, header.body_len as usize)? else { return Ok(Err(FrameError::Short)) };
        if let Err(e) = header.check_body(body) {
            body_damage = Some(format!("body {e}"));
        }
    } else if body_at + u64::from(header.body_len) > reader.len {
        return Ok(Err(FrameError::Short));
    }
    Ok(Ok(ScannedRecord { pos: Pos { segment: reader.seg, offset: off }, header, meta, body_damage }))
}

/// Finds the first offset at or after `from` where a complete, valid batch (records followed by
/// a matching commit) starts.
fn find_valid_batch(reader: &mut SeqReader<'_>, from: u64, after_seq: Option<u64>) -> Result<Option<u64>> {
    let len = reader.len;
    if from >= len {
        return Ok(None);
    }
    let mut rest = vec![0u8; (len - from) as usize];
    read_exact(reader.storage, reader.seg, from, &mut rest)?;
    let mut i = 0usize;
    while let Some(found) = memfind(&rest[i..], &frame::RECORD_MAGIC) {
        let start = i + found;
        if valid_batch_at(&rest[start..], after_seq) {
            return Ok(Some(from + start as u64));
        }
        i = start + 1;
    }
    Ok(None)
}

fn valid_batch_at(buf: &[u8], after_seq: Option<u64>) -> bool {
    let mut off = 0usize;
    let mut crc = 0u32;
    let mut count = 0u32;
    while let Ok(p) = frame::parse_record(&buf[off..]) {
        if p.header.kind == BATCH_COMMIT {
            return Commit::decode(p.meta)
                .is_ok_and(|c| c.count == count && c.batch_crc == crc && after_seq.is_none_or(|a| c.seq > a));
        }
        crc = Commit::chain(crc, p.header.head_crc);
        count += 1;
        off += p.header.total_len() as usize;
    }
    false
}

fn memfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one record at `pos`, checking both CRCs.
pub fn read_record(storage: &dyn Storage, pos: Pos) -> Result<(RecordHeader, Vec<u8>, Vec<u8>)> {
    let mut hb = [0u8; RECORD_HEADER_LEN];
    read_exact(storage, pos.segment, pos.offset, &mut hb)?;
    let header = RecordHeader::decode(&hb).map_err(|e| corrupt(pos.segment, pos.offset, e))?;
    let mut rest = vec![0u8; (header.meta_len + header.body_len) as usize];
    read_exact(storage, pos.segment, pos.offset + RECORD_HEADER_LEN as u64, &mut rest)?;
    let (meta, body) = rest.split_at(header.meta_len as usize);
    header.check(&hb, meta).map_err(|e| corrupt(pos.segment, pos.offset, e))?;
    header.check_body(body).map_err(|e| corrupt(pos.segment, pos.offset, format!("body {e}")))?;
    let body = body.to_vec();
    rest.truncate(header.meta_len as usize);
    Ok((header, rest, body))
}

fn read_exact(storage: &dyn Storage, seg: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
    storage.read_at(seg, offset, buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            corrupt(seg, offset, "record runs past the end of the segment")
        } else {
            Error::io("reading", storage.describe(seg), e)
        }
    })
}

pub(crate) fn corrupt(segment: u64, offset: u64, reason: impl std::fmt::Display) -> Error {
    Error::Corrupt { segment, offset, reason: reason.to_string() }
}

/// Buffered sequential reads over [`Storage::read_at`]: scans issue one large read per
/// window instead of three small ones per record.
struct SeqReader<'a> {
    storage: &'a dyn Storage,
    seg: u64,
    len: u64,
    buf: Vec<u8>,
    start: u64,
}

const WINDOW: usize = 1 << 20;

impl<'a> SeqReader<'a> {
    fn new(storage: &'a dyn Storage, seg: u64, len: u64) -> Self {
        SeqReader { storage, seg, len, buf: Vec::new(), start: 0 }
    }

    /// `n` bytes at `off`, or `None` if they run past the end of the segment.
    fn get(&mut self, off: u64, n: usize) -> Result<Option<&[u8]>> {
        let Some(end) = off.checked_add(n as u64).filter(|e| *e <= self.len) else { return Ok(None) };
        let have = off >= self.start && end <= self.start + self.buf.len() as u64;
        if !have {
            let want = (n.max(WINDOW) as u64).min(self.len - off) as usize;
            self.buf.resize(want, 0);
            read_exact(self.storage, self.seg, off, &mut self.buf)?;
            self.start = off;
        }
        let i = (off - self.start) as usize;
        Ok(Some(&self.buf[i..i + n]))
    }
}
