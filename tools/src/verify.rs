//! `verify`: proves that every kept set can be restored, or says exactly what cannot.
//!
//! The checks, in order (`docs/FORMAT.md` §8.7):
//! 1. **Log**: every record and body of every segment, the batch commits and the sequence
//!    across segments (damage is listed by segment and byte range);
//! 2. **Index against log**: the whole log is replayed into a scratch index, which is compared
//!    with the live one key by key (both in one pass over the log: `Repo::check_index`);
//! 3. **References**: every version a kept set sees is in the log as well (else
//!    `rebuild-index` would lose it) and its metadata opens; every chunk it references is in
//!    the index, at the place the log has it, outside every damaged range, with the extent's
//!    length;
//! 4. **Data** (`--read-data[=PERCENT]`): those chunks are read, decrypted, decompressed and
//!    re-hashed to their IDs; a failure is retried once, and a failure that a retry cures is
//!    reported apart from one that persists (restic #5467). A percentage reads a slice in log
//!    order and keeps a cursor, so repeated runs cover everything once per cycle;
//! 5. **Impact**: the trees of the kept sets are walked to name every (set, path) that uses a
//!    missing or damaged chunk.
//!
//! RELIABILITY invariant 7: an error while reading (I/O, RocksDB) aborts the run with an error;
//! it is never taken for an empty result, so "no damage" is printed only after every check ran.

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write as _;
use std::path::Path;
use tardis_client::seen::Seen;
use tardis_core::api::{Repository, SetInfo};
use tardis_core::crypto::Keys;
use tardis_core::ids::{ChunkId, DirId, NameKey, SetId};
use tardis_core::meta::Kind;
use tardis_core::view::{self, ROOT_NAME};
use tardis_log::index::{ChunkLoc, Difference, Index};
use tardis_log::segments::Damage;
use tardis_log::{IndexCheck, Pos, Repo};

/// Where `--read-data=PERCENT` keeps its place, under the host's directory.
pub const CURSOR_FILE: &str = "verify-cursor";
/// First line of the cursor file: its format and version.
const CURSOR_MAGIC: &str = "tardis-verify-cursor 1";
/// Chunk IDs looked up in the index per batched read.
const LOOKUP_BATCH: usize = 1024;
/// Chunks decoded per parallel step: bounds memory to this many chunks at once.
const READ_BATCH: usize = 64;

/// What to verify.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Read and decode this percentage of the referenced chunks (100: all of them, no cursor).
    pub read_data: Option<u8>,
    /// Only the references of this set.
    pub set: Option<String>,
    /// JSON Lines on stdout instead of text.
    pub json: bool,
    /// A progress bar on stderr.
    pub progress: bool,
    /// The host's name and this client's mark of its newest set, to check for a rollback.
    pub seen: (String, Seen),
}

/// How a run ended; `main` maps it to the exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every check ran and found nothing.
    Clean,
    /// Nothing is damaged, but some chunks read correctly only on the second attempt.
    Transient,
    /// Something is damaged or missing (listed).
    Damage,
}

/// One line of the report. With `--json`, one object per line, tagged by `type`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Finding {
    /// A live set whose seal fails: the set list was altered.
    Set { set: String, reason: String },
    /// The set list is older than this client has seen: a rollback.
    Rollback { reason: String },
    /// Bytes of the log that are damaged (`offset..resume` of `segment`).
    LogDamage { segment: u64, offset: u64, resume: u64, reason: String },
    /// The live index and the log disagree about one key (`what` decodes the key).
    Index { cf: &'static str, key: String, what: String, difference: &'static str },
    /// A referenced chunk that is missing or damaged.
    Chunk { chunk: String, state: State, segment: Option<u64>, offset: Option<u64>, reason: String },
    /// A file of a kept set that uses a missing or damaged chunk.
    File { set: String, path: String, chunk: String, state: State, segment: Option<u64>, offset: Option<u64> },
    /// An entry of a kept set whose version (written by set `written_by`) the index serves
    /// but the log does not hold: its record is damaged or missing.
    Version { set: String, path: String, written_by: SetId },
    /// A version seen by a kept set whose metadata does not open (its name is unknown).
    Entry { set: String, dir: String, dir_path: Option<String>, name_key: String, reason: String },
    /// A chunk that failed to read or decode once, then read correctly.
    Transient { chunk: String, segment: u64, offset: u64, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum State {
    Missing,
    Damaged,
}

impl State {
    fn word(self) -> &'static str {
        match self {
            State::Missing => "missing",
            State::Damaged => "damaged",
        }
    }
}

/// What is wrong with one referenced chunk.
#[derive(Debug, Clone)]
struct Problem {
    state: State,
    /// Where the index says the chunk is, if it says so.
    pos: Option<Pos>,
    reason: String,
}

/// The last line of the report.
#[derive(Debug, Serialize)]
struct Summary {
    #[serde(rename = "type")]
    kind: &'static str,
    ok: bool,
    segments: u64,
    records: u64,
    chunks_referenced: u64,
    sets: u64,
    /// Chunks read and decoded correctly (with `--read-data`).
    chunks_decoded: Option<u64>,
    read_data: Option<SliceReport>,
    /// Damaged log ranges + index differences + bad chunks + entries that do not open.
    problems: u64,
    index_differences: u64,
    transient: u64,
}

/// Which part of the referenced chunks a `--read-data` run read, in log order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
struct SliceReport {
    percent: u8,
    /// Chunks `from..to` of `total`, ordered by their position in the log.
    from: u64,
    to: u64,
    total: u64,
    /// This run read the last chunk of the cycle; the next run starts a new one.
    cycle_complete: bool,
}

/// Prints findings as they are made, as text or JSON Lines.
struct Report {
    json: bool,
}

impl Report {
    fn emit(&self, f: &Finding) -> Result<()> {
        if self.json {
            println!("{}", serde_json::to_string(f)?);
            return Ok(());
        }
        let at = |seg: &Option<u64>, off: &Option<u64>| match (seg, off) {
            (Some(s), Some(o)) => format!(" (segment {s} offset {o})"),
            _ => String::new(),
        };
        match f {
            Finding::Set { set, reason } => println!("set {set}: {reason}"),
            Finding::Rollback { reason } => println!("{reason}"),
            Finding::LogDamage { segment, offset, resume, reason } => {
                println!("damaged log: segment {segment} offset {offset}..{resume}: {reason}")
            }
            Finding::Index { what, difference, .. } => println!("index differs from the log: {what}: {difference}"),
            Finding::Chunk { chunk, state, segment, offset, reason } => {
                println!("chunk {chunk} {}{}: {reason}", state.word(), at(segment, offset))
            }
            Finding::File { set, path, chunk, state, segment, offset } => {
                println!("{set} {path}: chunk {chunk} {}{}", state.word(), at(segment, offset))
            }
            Finding::Version { set, path, written_by } => println!(
                "{set} {path}: the version written by set {written_by} is not in the log (its record is damaged \
                 or missing; `rebuild-index` would drop it)"
            ),
            Finding::Entry { set, dir, dir_path, name_key, reason } => {
                let dir = dir_path.clone().unwrap_or_else(|| format!("with ID {dir}"));
                println!("{set}: entry {name_key} in directory {dir}: metadata does not open: {reason}")
            }
            Finding::Transient { chunk, segment, offset, reason } => println!(
                "chunk {chunk} (segment {segment} offset {offset}) failed once, then read correctly \
                 (a transient fault; check the disk): {reason}"
            ),
        }
        Ok(())
    }
}

/// Runs every check and prints the findings and a summary.
pub fn verify(repo: &Repo, keys: &Keys, opts: &VerifyOptions) -> Result<Verdict> {
    if opts.set.is_some() && opts.read_data.is_some_and(|p| p < 100) {
        bail!("--read-data=PERCENT covers the whole repository over several runs; with --set, use --read-data");
    }
    let report = Report { json: opts.json };
    let readers: Vec<SetInfo> = match &opts.set {
        Some(name) => vec![crate::select::pick(repo, Some(name), None)?],
        None => repo.sets()?.into_iter().filter(SetInfo::is_live).collect(),
    };
    let spinner = spinner(opts.progress, "checking the log and the index");

    // 0: the set list: every live set sealed by the host key, and nothing newer seen before.
    let all_sets = repo.sets()?;
    let (host, seen) = &opts.seen;
    let bad_seals = seen.bad_seals(keys, &all_sets);
    let mut problems = bad_seals.len() as u64;
    for (s, e) in &bad_seals {
        report.emit(&Finding::Set { set: s.name.clone(), reason: e.to_string() })?;
    }
    let sealed: Vec<SetInfo> =
        all_sets.iter().filter(|s| !bad_seals.iter().any(|(b, _)| b.id == s.id)).cloned().collect();
    if let Err(e) = seen.check_newest(host, &sealed) {
        report.emit(&Finding::Rollback { reason: e.to_string() })?;
        problems += 1;
    }

    // 1 and 2: the log, and the index against it.
    let check = repo.check_index().context("checking the log and the index")?;
    problems += check.scan.damage.len() as u64 + check.mismatch_count;
    for d in &check.scan.damage {
        report.emit(&Finding::LogDamage {
            segment: d.segment,
            offset: d.offset,
            resume: d.resume,
            reason: d.reason.clone(),
        })?;
    }
    for m in &check.mismatches {
        let difference = match m.difference {
            Difference::OnlyInIndex => "in the index but not in the log",
            Difference::MissingFromIndex => "in the log but not in the index",
            Difference::ValueDiffers => "the index holds another value than the log gives",
        };
        report.emit(&Finding::Index { cf: m.cf, key: hex(&m.key), what: describe_key(m.cf, &m.key), difference })?;
    }
    if check.mismatch_count > check.mismatches.len() as u64 && !opts.json {
        println!(
            "index differs from the log: {} more differences",
            check.mismatch_count - check.mismatches.len() as u64
        );
    }

    // 3: what the kept sets reference, and whether it is there.
    spinner.set_message("checking what the sets reference");
    let mut refs = References::collect(repo, &check.rebuilt, keys, &readers)?;
    let Checked { mut bad, mut located, dependents } = check_chunks(repo, &check, &mut refs)?;
    spinner.finish_and_clear();

    // 4: read and decode.
    let (mut transient, mut decoded, mut slice_report) = (0, None, None);
    if let Some(percent) = opts.read_data {
        let read = read_data(repo, keys, &mut located, percent, opts.progress)?;
        for (pos, id, outcome) in read.outcomes {
            match outcome {
                ReadOutcome::Ok => {}
                ReadOutcome::Transient(reason) => {
                    transient += 1;
                    let (segment, offset) = (pos.segment, pos.offset);
                    report.emit(&Finding::Transient { chunk: id.to_hex(), segment, offset, reason })?;
                }
                ReadOutcome::Failed(reason) => {
                    // A chunk already known to be bad keeps its first, more precise reason.
                    bad.entry(id).or_insert(Problem { state: State::Damaged, pos: Some(pos), reason });
                }
            }
        }
        decoded = Some(read.decoded);
        slice_report = Some(read.slice);
    }

    // 5: which sets and files the bad chunks and entries touch.
    spread_to_dependents(&mut bad, &dependents, &located);
    let mut bad_list: Vec<(&ChunkId, &Problem)> = bad.iter().collect();
    bad_list.sort_by_key(|(id, p)| (p.pos, **id));
    for (id, p) in &bad_list {
        report.emit(&Finding::Chunk {
            chunk: id.to_hex(),
            state: p.state,
            segment: p.pos.map(|p| p.segment),
            offset: p.pos.map(|p| p.offset),
            reason: p.reason.clone(),
        })?;
    }
    let want_dirs: HashSet<DirId> = refs.tampered.iter().map(|t| t.dir).collect();
    let impact = if bad.is_empty() && want_dirs.is_empty() && refs.unconfirmed.is_empty() {
        Impact::default()
    } else {
        affected(repo, keys, &readers, &bad, &refs.unconfirmed, &want_dirs)?
    };
    for (set, path, hit) in &impact.hits {
        let path = String::from_utf8_lossy(path).into_owned();
        let f = match hit {
            Hit::Chunk(id) => {
                let p = &bad[id];
                Finding::File {
                    set: set.clone(),
                    path,
                    chunk: id.to_hex(),
                    state: p.state,
                    segment: p.pos.map(|p| p.segment),
                    offset: p.pos.map(|p| p.offset),
                }
            }
            Hit::Version(written_by) => Finding::Version { set: set.clone(), path, written_by: *written_by },
        };
        report.emit(&f)?;
    }
    let dir_paths = impact.dir_paths;
    for t in &refs.tampered {
        for set in &t.sets {
            report.emit(&Finding::Entry {
                set: set.clone(),
                dir: t.dir.to_hex(),
                dir_path: dir_paths.get(&t.dir).map(|p| String::from_utf8_lossy(p).into_owned()),
                name_key: t.name.to_hex(),
                reason: t.reason.clone(),
            })?;
        }
    }
    problems += bad.len() as u64 + refs.tampered.len() as u64;

    let summary = Summary {
        kind: "summary",
        ok: problems == 0,
        segments: check.scan.segments,
        records: check.scan.records,
        chunks_referenced: refs.chunks.len() as u64,
        sets: readers.len() as u64,
        chunks_decoded: decoded,
        read_data: slice_report,
        problems,
        index_differences: check.mismatch_count,
        transient,
    };
    print_summary(&summary, opts.json)?;
    Ok(match (problems, transient) {
        (0, 0) => Verdict::Clean,
        (0, _) => Verdict::Transient,
        _ => Verdict::Damage,
    })
}

fn print_summary(s: &Summary, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(s)?);
        return Ok(());
    }
    if let Some(r) = &s.read_data {
        if r.percent < 100 {
            let cycle = if r.cycle_complete {
                "cycle complete: every referenced chunk was read once; the next run starts a new cycle".to_owned()
            } else {
                format!("cycle {}% done", r.to * 100 / r.total.max(1))
            };
            println!("read-data {}%: chunks {}..{} of {} in log order; {cycle}", r.percent, r.from, r.to, r.total);
        }
    }
    let read = s.chunks_decoded.map(|n| format!(", {n} read and decoded")).unwrap_or_default();
    let what = format!(
        "verified {}, {}, {} referenced by {}{read}",
        count(s.segments, "segment"),
        count(s.records, "record"),
        count(s.chunks_referenced, "chunk"),
        count(s.sets, "set")
    );
    match (s.problems, s.transient) {
        (0, 0) => println!("{what}: no damage"),
        (0, t) => println!(
            "{what}: no damage, but {} read correctly only on the second attempt (listed above)",
            count(t, "chunk")
        ),
        (p, _) => println!("{what}: {} (listed above)", count(p, "problem")),
    }
    Ok(())
}

/// "1 set", "2 sets".
fn count(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// A version seen by a kept set whose metadata does not open.
#[derive(Debug)]
struct Tampered {
    sets: Vec<String>,
    dir: DirId,
    name: NameKey,
    reason: String,
}

/// An entry row: directory, name key, the set that wrote it.
type RowKey = (DirId, NameKey, SetId);

/// What the kept sets reference, from one pass over the `entries` column family.
#[derive(Debug, Default)]
struct References {
    /// Every referenced chunk, with the extent length first seen for it.
    chunks: HashMap<ChunkId, u32>,
    /// Other extent lengths seen for the same chunk (only a damaged index or log has any).
    other_lens: HashSet<(ChunkId, u32)>,
    tampered: Vec<Tampered>,
    /// Rows that kept sets see but the log does not hold as they are.
    unconfirmed: HashSet<RowKey>,
}

impl References {
    fn collect(repo: &Repo, rebuilt: &Index, keys: &Keys, readers: &[SetInfo]) -> Result<References> {
        let ids: Vec<u64> = readers.iter().map(|s| s.id).collect();
        let names: HashMap<u64, &str> = readers.iter().map(|s| (s.id, s.name.as_str())).collect();
        let mut refs = References::default();
        let mut pending: Vec<RowKey> = Vec::with_capacity(LOOKUP_BATCH);
        let confirm = |pending: &mut Vec<RowKey>, unconfirmed: &mut HashSet<RowKey>| -> tardis_log::Result<()> {
            let same = repo.index().same_entries(rebuilt, pending)?;
            unconfirmed.extend(pending.drain(..).zip(same).filter(|(_, same)| !same).map(|(row, _)| row));
            Ok(())
        };
        repo.index().for_each_seen_version(&ids, &mut |v, seen| {
            pending.push((v.dir, v.name, v.set));
            if pending.len() == LOOKUP_BATCH {
                confirm(&mut pending, &mut refs.unconfirmed)?;
            }
            // Opening proves the sealed metadata is intact and belongs to this (dir, name, set).
            if let Err(e) = view::open_meta(keys, v) {
                refs.tampered.push(Tampered {
                    sets: seen.iter().map(|s| names[s].to_owned()).collect(),
                    dir: v.dir,
                    name: v.name,
                    reason: e.to_string(),
                });
            }
            for e in &v.extents {
                let first = *refs.chunks.entry(e.id).or_insert(e.len);
                if first != e.len {
                    refs.other_lens.insert((e.id, e.len));
                }
            }
            Ok(())
        })?;
        confirm(&mut pending, &mut refs.unconfirmed)?;
        Ok(refs)
    }
}

/// What is wrong with each bad chunk.
type BadChunks = HashMap<ChunkId, Problem>;

/// Looks up every referenced chunk in the live index and in the one rebuilt from the log, and
/// the bases of delta chunks down each chain (they are added to `refs`). Returns what is wrong
/// with each bad one, where the live index puts every chunk it has, and the delta chunks built
/// on each base.
fn check_chunks(repo: &Repo, check: &IndexCheck, refs: &mut References) -> Result<Checked> {
    let segments: BTreeSet<u64> = repo
        .storage()
        .list()
        .with_context(|| format!("listing segments of {}", repo.dir().display()))?
        .into_iter()
        .collect();
    let damage = DamageMap::new(&check.scan.damage);
    let mut out = Checked::default();
    let mut ids: Vec<ChunkId> = refs.chunks.keys().copied().collect();
    while !ids.is_empty() {
        let mut bases = Vec::new();
        for batch in ids.chunks(LOOKUP_BATCH) {
            let live = repo.index().chunk_locs(batch)?;
            let logged = check.rebuilt.chunk_locs(batch)?;
            for ((id, live), logged) in batch.iter().zip(live).zip(logged) {
                if let Some(loc) = live {
                    out.located.push((loc.pos, *id));
                    if let Some(d) = loc.delta {
                        out.dependents.entry(d.base).or_default().push(*id);
                        if !refs.chunks.contains_key(&d.base) {
                            bases.push(d.base);
                        }
                    }
                }
                if let Some(p) = classify(refs, id, live, logged, &segments, &damage) {
                    out.bad.insert(*id, p);
                }
            }
        }
        bases.sort_unstable();
        bases.dedup();
        // A base is referenced by a chain, not an extent: its own stored length is the one
        // expected (a base the index lacks is reported missing before its length matters).
        for batch in bases.chunks(LOOKUP_BATCH) {
            for (id, loc) in batch.iter().zip(repo.index().chunk_locs(batch)?) {
                refs.chunks.insert(*id, loc.map_or(0, |l| l.plain_len));
            }
        }
        ids = bases;
    }
    Ok(out)
}

/// What `check_chunks` finds.
#[derive(Debug, Default)]
struct Checked {
    bad: BadChunks,
    located: Vec<(Pos, ChunkId)>,
    /// Base → the delta chunks stored against it.
    dependents: HashMap<ChunkId, Vec<ChunkId>>,
}

/// A delta chunk whose base is bad cannot be read either: marks every chunk up each chain from
/// a bad one as bad too, so the files that use them are reported.
fn spread_to_dependents(bad: &mut BadChunks, dependents: &HashMap<ChunkId, Vec<ChunkId>>, located: &[(Pos, ChunkId)]) {
    let pos: HashMap<ChunkId, Pos> = located.iter().map(|(p, id)| (*id, *p)).collect();
    let mut todo: Vec<ChunkId> = bad.keys().copied().collect();
    while let Some(base) = todo.pop() {
        let state = bad[&base].state;
        for dep in dependents.get(&base).into_iter().flatten() {
            if bad.contains_key(dep) {
                continue;
            }
            let reason = format!("its delta base {base} is {}", state.word());
            bad.insert(*dep, Problem { state, pos: pos.get(dep).copied(), reason });
            todo.push(*dep);
        }
    }
}

/// What a `--read-data` run read.
#[derive(Debug)]
struct ReadRun {
    /// Every chunk read that did not succeed at once.
    outcomes: Vec<(Pos, ChunkId, ReadOutcome)>,
    /// Chunks read and decoded correctly (at the first or the second attempt).
    decoded: u64,
    slice: SliceReport,
}

/// Reads and decodes the chunks of `located` (sorted here into log order) that this run
/// covers: all of them, or the next slice of a `percent` cycle, whose cursor it then advances.
fn read_data(repo: &Repo, keys: &Keys, located: &mut [(Pos, ChunkId)], percent: u8, progress: bool) -> Result<ReadRun> {
    located.sort_unstable();
    let cursor = if percent < 100 { read_cursor(repo.dir())? } else { None };
    let slice = plan_slice(located, cursor, percent);
    let bar = bar(progress, (slice.to - slice.from) as u64);
    let (mut outcomes, mut decoded) = (Vec::new(), 0u64);
    for group in located[slice.from..slice.to].chunks(READ_BATCH) {
        let results: Vec<ReadOutcome> = group.par_iter().map(|(_, id)| read_twice(repo, keys, id)).collect();
        for ((pos, id), outcome) in group.iter().zip(results) {
            if !matches!(outcome, ReadOutcome::Failed(_)) {
                decoded += 1;
            }
            if !matches!(outcome, ReadOutcome::Ok) {
                outcomes.push((*pos, *id, outcome));
            }
        }
        bar.inc(group.len() as u64);
    }
    bar.finish_and_clear();
    let cycle_complete = slice.to == located.len();
    if percent < 100 {
        // Advanced only after the whole slice was read: a run that fails half-way is repeated.
        write_cursor(repo.dir(), (!cycle_complete).then(|| located[slice.to - 1].0))?;
    }
    let slice = SliceReport {
        percent,
        from: slice.from as u64,
        to: slice.to as u64,
        total: located.len() as u64,
        cycle_complete,
    };
    Ok(ReadRun { outcomes, decoded, slice })
}

/// The damaged byte ranges of the log, sorted, for "does this position lie in damage?".
struct DamageMap<'a> {
    ranges: Vec<&'a Damage>,
}

impl<'a> DamageMap<'a> {
    fn new(damage: &'a [Damage]) -> Self {
        let mut ranges: Vec<&Damage> = damage.iter().filter(|d| d.resume > d.offset).collect();
        ranges.sort_by_key(|d| (d.segment, d.offset));
        DamageMap { ranges }
    }

    /// The damage covering `pos`. A scan reports the ranges of one segment in order and
    /// without overlap, so the last range starting at or before `pos` is the only candidate.
    fn at(&self, pos: Pos) -> Option<&'a Damage> {
        let i = self.ranges.partition_point(|d| (d.segment, d.offset) <= (pos.segment, pos.offset));
        let d = *self.ranges.get(i.checked_sub(1)?)?;
        (d.segment == pos.segment && pos.offset < d.resume).then_some(d)
    }
}

/// What is wrong with a referenced chunk, given where the live index (`live`) and the index
/// rebuilt from the log (`logged`) say it is; `None` if nothing is.
fn classify(
    refs: &References,
    id: &ChunkId,
    live: Option<ChunkLoc>,
    logged: Option<ChunkLoc>,
    segments: &BTreeSet<u64>,
    damage: &DamageMap<'_>,
) -> Option<Problem> {
    let at = |p: Pos| format!("segment {} offset {}", p.segment, p.offset);
    let Some(loc) = live else {
        let reason = match logged {
            Some(l) => format!(
                "not in the index; the log holds it at {} (`tardis-tools rebuild-index` restores it)",
                at(l.pos)
            ),
            None => "neither in the index nor in the log".to_owned(),
        };
        return Some(Problem { state: State::Missing, pos: None, reason });
    };
    let damaged = |reason: String| Some(Problem { state: State::Damaged, pos: Some(loc.pos), reason });
    if !segments.contains(&loc.pos.segment) {
        return damaged(format!("segment {} is missing", loc.pos.segment));
    }
    if let Some(d) = damage.at(loc.pos) {
        return damaged(format!("in damaged log range {}..{}: {}", d.offset, d.resume, d.reason));
    }
    match logged {
        None => return damaged("the index points at a record the log does not hold as this chunk".to_owned()),
        Some(l) if l != loc => {
            return damaged(format!("the index points elsewhere than the log, which holds it at {}", at(l.pos)))
        }
        Some(_) => {}
    }
    let first = refs.chunks[id];
    if first != loc.plain_len || refs.other_lens.iter().any(|(c, len)| c == id && *len != loc.plain_len) {
        return damaged(format!(
            "the chunk holds {} bytes, but extents referencing it have another length",
            loc.plain_len
        ));
    }
    None
}

/// The result of reading one chunk, with one retry.
#[derive(Debug)]
enum ReadOutcome {
    Ok,
    /// The first attempt failed with this error; the second succeeded.
    Transient(String),
    /// Both attempts failed; the second attempt's error.
    Failed(String),
}

/// Reads a chunk's record (both CRCs), opens, decompresses and re-hashes it to its ID; once
/// more if that fails, so that a passing fault is not reported as damage (restic #5467).
fn read_twice(repo: &Repo, keys: &Keys, id: &ChunkId) -> ReadOutcome {
    twice(|| view::read_chunk(repo, keys, id).map(|_| ()))
}

/// Runs `once`, and again if it fails.
fn twice(once: impl Fn() -> tardis_core::Result<()>) -> ReadOutcome {
    match once() {
        Ok(()) => ReadOutcome::Ok,
        Err(first) => match once() {
            Ok(()) => ReadOutcome::Transient(first.to_string()),
            Err(second) => ReadOutcome::Failed(second.to_string()),
        },
    }
}

/// Chunks `from..to` of the list ordered by log position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slice {
    from: usize,
    to: usize,
}

/// The slice a `--read-data=PERCENT` run reads: `ceil(total * percent / 100)` chunks after
/// the cursor (the position of the last chunk the previous run read), never past the end of
/// the list. A cycle thus takes at most `ceil(100 / percent)` runs and reads every chunk
/// once; chunks stored during a cycle lie after the cursor and are read in the same cycle.
fn plan_slice(order: &[(Pos, ChunkId)], cursor: Option<Pos>, percent: u8) -> Slice {
    let total = order.len();
    if percent >= 100 {
        return Slice { from: 0, to: total };
    }
    let per_run = (total * usize::from(percent)).div_ceil(100);
    let mut from = cursor.map_or(0, |c| order.partition_point(|(p, _)| *p <= c));
    if from >= total {
        from = 0; // every chunk after the cursor is gone: start a new cycle
    }
    Slice { from, to: (from + per_run).min(total) }
}

/// The cursor of `<host>/verify-cursor`: `None` at the start of a cycle. A file that is not a
/// cursor of this version is reported and ignored (a new cycle starts); a failed read is an
/// error.
fn read_cursor(dir: &Path) -> Result<Option<Pos>> {
    let path = dir.join(CURSOR_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut lines = text.lines();
    let parsed = (lines.next() == Some(CURSOR_MAGIC))
        .then(|| lines.next())
        .flatten()
        .and_then(|l| l.split_once(' '))
        .and_then(|(s, o)| Some(Pos { segment: s.parse().ok()?, offset: o.parse().ok()? }));
    match parsed {
        // Segment 0 does not exist: it marks the start of a cycle.
        Some(p) if p.segment == 0 => Ok(None),
        Some(p) => Ok(Some(p)),
        None => {
            tracing::warn!(path = %path.display(), "ignoring an unreadable verify cursor; starting a new cycle");
            Ok(None)
        }
    }
}

/// Writes the cursor atomically: a temporary file, fsync, rename, directory fsync. A crash
/// leaves the old cursor or the new one, never a torn one.
fn write_cursor(dir: &Path, cursor: Option<Pos>) -> Result<()> {
    let pos = cursor.unwrap_or_default();
    let path = dir.join(CURSOR_FILE);
    let tmp = dir.join(format!("{CURSOR_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        writeln!(f, "{CURSOR_MAGIC}\n{} {}", pos.segment, pos.offset)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    };
    write().with_context(|| format!("writing {}", path.display()))
}

/// Why a path is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Hit {
    /// The file uses this missing or damaged chunk.
    Chunk(ChunkId),
    /// The entry's version, written by this set, is not in the log.
    Version(SetId),
}

/// What the tree walk found.
#[derive(Debug, Default)]
struct Impact {
    /// (set name, path, why), by set, then path.
    hits: Vec<(String, Vec<u8>, Hit)>,
    /// Paths of the directories that hold entries whose metadata does not open.
    dir_paths: HashMap<DirId, Vec<u8>>,
}

/// Walks the trees of `readers` and names every path whose file uses a chunk in `bad` or
/// whose version is in `unconfirmed`, and the paths of the directories in `want_dirs`. An
/// entry whose metadata does not open is skipped (the references pass reports it); so is
/// everything below it.
fn affected(
    repo: &Repo,
    keys: &Keys,
    readers: &[SetInfo],
    bad: &BadChunks,
    unconfirmed: &HashSet<RowKey>,
    want_dirs: &HashSet<DirId>,
) -> Result<Impact> {
    let mut out = Impact::default();
    for set in readers {
        let mut seen: BTreeSet<(Vec<u8>, Hit)> = BTreeSet::new();
        let root = repo.lookup(set.id, &DirId::TOP, &keys.name_key(&DirId::TOP, ROOT_NAME))?;
        if root.is_none_or(|r| view::open_meta(keys, &r).is_err()) {
            continue;
        }
        let mut stack = vec![(keys.dir_id(&DirId::TOP, ROOT_NAME), b"/".to_vec())];
        while let Some((dir, path)) = stack.pop() {
            if want_dirs.contains(&dir) {
                out.dir_paths.entry(dir).or_insert_with(|| path.clone());
            }
            for v in repo.list(set.id, &dir)? {
                let Ok(meta) = view::open_meta(keys, &v) else { continue };
                let mut child = path.clone();
                if !child.ends_with(b"/") {
                    child.push(b'/');
                }
                child.extend_from_slice(&meta.name);
                if unconfirmed.contains(&(v.dir, v.name, v.set)) {
                    seen.insert((child.clone(), Hit::Version(v.set)));
                }
                for e in v.extents.iter().filter(|e| bad.contains_key(&e.id)) {
                    seen.insert((child.clone(), Hit::Chunk(e.id)));
                }
                if meta.kind == Kind::Dir {
                    stack.push((keys.dir_id(&v.dir, &meta.name), child));
                }
            }
        }
        out.hits.extend(seen.into_iter().map(|(path, hit)| (set.name.clone(), path, hit)));
    }
    Ok(out)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An index key in words, after the layouts of `docs/FORMAT.md` §6.1.
fn describe_key(cf: &str, key: &[u8]) -> String {
    match (cf, key.len()) {
        ("chunks", 32) => format!("chunk {}", hex(key)),
        ("sets", 8) => format!("set {}", u64::from_be_bytes(key.try_into().expect("8 bytes"))),
        ("entries", 40) => format!(
            "entry {} in directory {} written by set {}",
            hex(&key[16..32]),
            hex(&key[..16]),
            u64::from_be_bytes(key[32..].try_into().expect("8 bytes"))
        ),
        ("meta" | "config", _) => format!("{cf} {}", String::from_utf8_lossy(key)),
        _ => format!("{cf} key {}", hex(key)),
    }
}

fn spinner(show: bool, msg: &'static str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new_spinner();
    b.set_style(indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("the template is valid"));
    b.set_message(msg);
    b.enable_steady_tick(std::time::Duration::from_millis(200));
    b
}

fn bar(show: bool, len: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed} reading chunks {bar:30} {pos}/{len} ({per_sec}, {eta} left)",
        )
        .expect("the template is valid"),
    );
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(n: u64) -> Vec<(Pos, ChunkId)> {
        (0..n).map(|i| (Pos { segment: 1, offset: 100 + i * 10 }, ChunkId([i as u8; 32]))).collect()
    }

    #[test]
    fn slices_of_a_cycle_cover_every_chunk_once() {
        for total in [0u64, 1, 3, 4, 5, 13, 25, 101] {
            for percent in [1u8, 5, 25, 33, 50, 99] {
                let list = order(total);
                let (mut cursor, mut covered, mut runs) = (None, 0usize, 0);
                loop {
                    let s = plan_slice(&list, cursor, percent);
                    assert_eq!(s.from, covered, "{total} chunks, {percent}%: slices follow each other");
                    covered = s.to;
                    runs += 1;
                    if s.to == list.len() {
                        break;
                    }
                    cursor = Some(list[s.to - 1].0);
                }
                assert!(runs <= 100usize.div_ceil(percent.into()), "{total} chunks, {percent}%: {runs} runs");
                // The cursor after a complete cycle is the start marker: the next run starts over.
                assert_eq!(plan_slice(&list, None, percent).from, 0);
            }
        }
    }

    #[test]
    fn a_failure_is_retried_once_and_transient_and_persistent_ones_are_told_apart() {
        use std::cell::Cell;
        let fail_first = |n: u32| {
            let calls = Cell::new(0u32);
            let outcome = twice(|| {
                calls.set(calls.get() + 1);
                match calls.get() <= n {
                    true => Err(tardis_core::Error::Invalid(format!("failure {}", calls.get()))),
                    false => Ok(()),
                }
            });
            (outcome, calls.get())
        };
        assert!(matches!(fail_first(0), (ReadOutcome::Ok, 1)));
        let (outcome, calls) = fail_first(1);
        assert!(matches!(&outcome, ReadOutcome::Transient(r) if r == "failure 1"), "{outcome:?}");
        assert_eq!(calls, 2);
        let (outcome, calls) = fail_first(5);
        assert!(matches!(&outcome, ReadOutcome::Failed(r) if r == "failure 2"), "{outcome:?}");
        assert_eq!(calls, 2, "retried once, not more");
    }

    #[test]
    fn a_cursor_past_every_chunk_starts_a_new_cycle() {
        let list = order(10);
        let s = plan_slice(&list, Some(Pos { segment: 9, offset: 0 }), 25);
        assert_eq!(s, Slice { from: 0, to: 3 });
    }

    #[test]
    fn cursor_round_trips_and_a_foreign_file_restarts_the_cycle() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_cursor(dir.path()).unwrap(), None);
        let p = Pos { segment: 3, offset: 4096 };
        write_cursor(dir.path(), Some(p)).unwrap();
        assert_eq!(read_cursor(dir.path()).unwrap(), Some(p));
        write_cursor(dir.path(), None).unwrap();
        assert_eq!(read_cursor(dir.path()).unwrap(), None);
        fs::write(dir.path().join(CURSOR_FILE), "something else\n").unwrap();
        assert_eq!(read_cursor(dir.path()).unwrap(), None);
        assert!(!dir.path().join("verify-cursor.tmp").exists());
    }

    #[test]
    fn damage_lookup_finds_the_covering_range_only() {
        let d = |segment, offset, resume| Damage { segment, offset, resume, reason: String::new() };
        let list = vec![d(2, 500, 900), d(1, 100, 200), d(3, 32, 32), d(4, 0, 1000)];
        let map = DamageMap::new(&list);
        let at = |segment, offset| map.at(Pos { segment, offset }).map(|d| (d.segment, d.offset));
        assert_eq!(at(1, 100), Some((1, 100)));
        assert_eq!(at(1, 199), Some((1, 100)));
        assert_eq!(at(1, 200), None);
        assert_eq!(at(1, 99), None);
        assert_eq!(at(2, 600), Some((2, 500)));
        assert_eq!(at(3, 32), None, "a sequence break covers no bytes");
        assert_eq!(at(4, 40), Some((4, 0)));
        assert_eq!(at(5, 40), None);
    }
}
