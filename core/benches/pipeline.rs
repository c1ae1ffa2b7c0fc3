//! Throughput of the core chunk pipeline next to the throughput of its parts.
//!
//! Generates `TARDIS_BENCH_MB` MiB (default 256) of mixed data in memory, deterministically,
//! then times on one thread, best of three runs each: FastCDC chunking, keyed BLAKE3, zstd
//! level 3 and AES-256-GCM-SIV sealing alone, and the whole pipeline (chunk → `chunk_id` →
//! `chunkcodec::encode`, which includes the decode-and-rehash self-check). The ratios between
//! the rows say how close the pipeline is to its parts; the absolute numbers depend on the
//! machine and on whatever else it is doing.
//!
//! Run with `cargo bench -p tardis-core --bench pipeline`; the report is markdown on stdout.
//! `TARDIS_BENCH_DUMP=<path>` also writes the generated data to a file, so that external tools
//! (`zstd -b3`, `b3sum`) can be measured on exactly the same bytes.

use std::error::Error;
use std::hint::black_box;
use std::io::Write;
use std::time::{Duration, Instant};
use tardis_core::chunk::Chunker;
use tardis_core::chunkcodec;
use tardis_core::compress;
use tardis_core::crypto::{Keys, MasterKey, Purpose};
use tardis_core::ids::{ChunkId, HostId};
use tardis_core::keywrap::{KdfHeader, KdfParams};

/// Every measurement is repeated this often and the fastest run is kept: on a shared machine
/// the minimum is the figure least disturbed by other processes.
const RUNS: usize = 3;
const DEFAULT_MIB: usize = 256;
const SEED: u64 = 0x7a3d_1500_2026;

fn main() -> Result<(), Box<dyn Error>> {
    let mib = match std::env::var("TARDIS_BENCH_MB") {
        Ok(v) => {
            v.trim().parse::<usize>().ok().filter(|&n| n > 0).ok_or("TARDIS_BENCH_MB must be a positive integer")?
        }
        Err(_) => DEFAULT_MIB,
    };
    let mix = generate(mib << 20, SEED);
    if let Ok(path) = std::env::var("TARDIS_BENCH_DUMP") {
        std::fs::write(&path, &mix.data).map_err(|e| format!("writing the generated data to {path}: {e}"))?;
        eprintln!("wrote {} bytes to {path}", mix.data.len());
    }
    let data = &mix.data[..];
    let keys = Keys::encrypted(HostId([7; 16]), &MasterKey::generate()?);
    let chunker = Chunker::default();
    let chunks = |cuts: &[(usize, usize)]| cuts.iter().map(|&(o, l)| &data[o..o + l]).collect::<Vec<_>>();

    // (a) Chunking alone.
    let (t_chunk, cuts) = best_of(|| chunker.split(data));
    let pieces = chunks(&cuts);
    // IDs for the sealing rows, computed once outside any timing: the associated data names
    // the chunk, as in the pipeline.
    let ids: Vec<ChunkId> = pieces.iter().map(|c| keys.chunk_id(c)).collect();

    // (b) Keyed BLAKE3 alone.
    let (t_hash, ()) = best_of(|| {
        for c in &pieces {
            black_box(keys.chunk_id(black_box(c)));
        }
    });

    // (c) zstd level 3 alone (with the crate's keep-only-if-smaller rule, which costs nothing).
    let (t_zstd, zstd_stored) = best_of(|| -> Result<usize, Box<dyn Error>> {
        let mut stored = 0;
        for c in &pieces {
            stored += compress::compress(black_box(c))?.map_or(c.len(), |z| z.len());
        }
        Ok(stored)
    });
    let zstd_stored = zstd_stored?;

    // (d) AES-256-GCM-SIV seal alone, over the plaintext chunks.
    let (t_seal, sealed) = best_of(|| -> Result<(), Box<dyn Error>> {
        for (c, id) in pieces.iter().zip(&ids) {
            black_box(keys.seal(Purpose::Chunk, &id.0, black_box(c))?);
        }
        Ok(())
    });
    sealed?;

    // (e) The full pipeline, chunking included.
    let (t_pipe, piped) = best_of(|| -> Result<(usize, usize), Box<dyn Error>> {
        let cuts = chunker.split(black_box(data));
        let mut stored = 0;
        for &(o, l) in &cuts {
            let c = &data[o..o + l];
            let id = keys.chunk_id(c);
            stored += black_box(chunkcodec::encode(&keys, id, c)?).body.len();
        }
        Ok((cuts.len(), stored))
    });
    let (pipe_chunks, pipe_stored) = piped?;
    assert_eq!(pipe_chunks, cuts.len(), "the pipeline must see the same chunks as the parts");

    // Work that `encode` does besides (b)–(d): it seals the compressed body rather than the
    // plaintext, then opens, decompresses and re-hashes it. Timed per call, which costs a few
    // clock reads per megabyte.
    let check = self_check_parts(&keys, &pieces, &ids)?;

    // The fixed cost of every command that opens an encrypted host: one Argon2id derivation
    // at the default parameters (its memory is part of every client's peak RSS too).
    let kdf = KdfHeader::new(KdfParams::DEFAULT)?;
    let (t_kdf, derived) = best_of(|| kdf.derive(black_box(b"benchmark password")));
    derived?;

    let total = data.len();
    let mbps = |t: Duration| total as f64 / 1e6 / t.as_secs_f64();
    let parts_sum = t_chunk + t_hash + t_zstd + t_seal;
    let model = t_chunk + t_hash * 2 + t_zstd + check.seal_stored + check.open + check.decompress;

    let mut out = String::new();
    let w = &mut out;
    line(w, format!("Data: {mib} MiB ({:.1} MB) generated in-process (seed {SEED:#x}) as {} \"files\" of 64 KiB–8 MiB, interleaved:", total as f64 / 1e6, mix.files));
    let kinds = ["text-like (seeded words)", "random bytes", "structured records with repeats"];
    let described: Vec<String> = (0..3)
        .map(|k| {
            let ratio = mix.bytes[k] as f64 / mix.zstd_bytes[k].max(1) as f64;
            format!("{} {:.1} MB (zstd-3 {ratio:.2}×)", kinds[k], mix.bytes[k] as f64 / 1e6)
        })
        .collect();
    line(w, format!("{}.", described.join(", ")));
    line(w, format!("Chunks: {} (FastCDC 256 KiB / 1 MiB / 4 MiB, mean {:.2} MB). Best of {RUNS} runs per row, one thread, MB = 10^6 bytes.", cuts.len(), total as f64 / 1e6 / cuts.len().max(1) as f64));
    line(
        w,
        format!(
            "Machine: {} logical CPUs, {}.",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model()
        ),
    );
    line(w, "");
    line(w, "| Stage | Best time | Throughput |");
    line(w, "|---|---:|---:|");
    for (name, t) in [
        ("(a) FastCDC chunking alone (`Chunker::split`)", t_chunk),
        ("(b) BLAKE3 keyed hash alone (`Keys::chunk_id`) over the chunks", t_hash),
        ("(c) zstd level 3 alone (`compress::compress`) over the chunks", t_zstd),
        ("(d) AES-256-GCM-SIV seal alone (`Keys::seal`) over the chunks", t_seal),
        ("**(e) pipeline: chunk → `chunk_id` → `chunkcodec::encode` (with self-check)**", t_pipe),
    ] {
        line(w, format!("| {name} | {:.3} s | {:.0} MB/s |", t.as_secs_f64(), mbps(t)));
    }
    line(w, "");
    line(w, "| Derived | Value |");
    line(w, "|---|---:|");
    line(
        w,
        format!(
            "| Pipeline compression ratio (plaintext / stored bodies incl. nonce and tag) | {:.2}× |",
            total as f64 / pipe_stored as f64
        ),
    );
    line(w, format!("| zstd-3 ratio alone (after the raw fallback) | {:.2}× |", total as f64 / zstd_stored as f64));
    line(
        w,
        format!("| Pipeline / min(BLAKE3, zstd) throughput | {:.2} |", mbps(t_pipe) / mbps(t_hash).min(mbps(t_zstd))),
    );
    line(
        w,
        format!(
            "| Sum of part times (a)+(b)+(c)+(d) | {:.3} s ({:.0} MB/s) |",
            parts_sum.as_secs_f64(),
            mbps(parts_sum)
        ),
    );
    line(w, format!("| Pipeline time / sum of part times | {:.2} |", t_pipe.as_secs_f64() / parts_sum.as_secs_f64()));
    line(w, "");
    line(w, "What `encode` does besides (a)–(d), for the accounting:");
    line(w, "");
    line(w, "| Inside the pipeline | Best time | Throughput |");
    line(w, "|---|---:|---:|");
    for (name, t) in [
        ("seal of the stored bodies (compressed where that helps, not the plaintext)", check.seal_stored),
        ("self-check: open of the sealed bodies", check.open),
        ("self-check: zstd decompress", check.decompress),
        ("self-check: re-hash of the plaintext (= (b))", t_hash),
        ("model: (a) + 2×(b) + (c) + the three rows above", model),
    ] {
        line(w, format!("| {name} | {:.3} s | {:.0} MB/s |", t.as_secs_f64(), mbps(t)));
    }
    line(w, format!("| pipeline time / model | {:.2} | |", t_pipe.as_secs_f64() / model.as_secs_f64()));
    line(w, "");
    let p = KdfParams::DEFAULT;
    line(w, "| Per open of an encrypted host | Best time |");
    line(w, "|---|---:|");
    line(
        w,
        format!(
            "| Argon2id key derivation ({} MiB, t = {}, p = {}) | {:.3} s |",
            p.m_kib / 1024,
            p.t,
            p.p,
            t_kdf.as_secs_f64()
        ),
    );
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

fn line(out: &mut String, s: impl AsRef<str>) {
    out.push_str(s.as_ref());
    out.push('\n');
}

/// Runs `f` [`RUNS`] times; returns the shortest time and the last result.
fn best_of<T>(mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut result = None;
    for _ in 0..RUNS {
        let start = Instant::now();
        let r = black_box(f());
        best = best.min(start.elapsed());
        result = Some(r);
    }
    // RUNS is a positive constant, so the loop ran and stored a result.
    (best, result.expect("RUNS > 0"))
}

/// Best-of-[`RUNS`] totals of the steps `chunkcodec::encode` performs beyond hash, compress
/// and seal of the plaintext.
struct SelfCheckParts {
    seal_stored: Duration,
    open: Duration,
    decompress: Duration,
}

fn self_check_parts(keys: &Keys, pieces: &[&[u8]], ids: &[ChunkId]) -> Result<SelfCheckParts, Box<dyn Error>> {
    let mut best = SelfCheckParts { seal_stored: Duration::MAX, open: Duration::MAX, decompress: Duration::MAX };
    for _ in 0..RUNS {
        let (mut seal, mut open, mut decompress) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        for (c, id) in pieces.iter().zip(ids) {
            let compressed = compress::compress(c)?;
            let stored = compressed.as_deref().unwrap_or(c);
            let t0 = Instant::now();
            let sealed = black_box(keys.seal(Purpose::Chunk, &id.0, stored)?);
            let t1 = Instant::now();
            let opened = black_box(keys.open(Purpose::Chunk, &id.0, &sealed)?);
            let t2 = Instant::now();
            if compressed.is_some() {
                black_box(compress::decompress(&opened, c.len())?);
            }
            let t3 = Instant::now();
            seal += t1 - t0;
            open += t2 - t1;
            decompress += t3 - t2;
        }
        best.seal_stored = best.seal_stored.min(seal);
        best.open = best.open.min(open);
        best.decompress = best.decompress.min(decompress);
    }
    Ok(best)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

/// The generated data set and what it is made of.
struct Mix {
    data: Vec<u8>,
    files: usize,
    /// Bytes of each kind: text-like, random, records.
    bytes: [usize; 3],
    /// Bytes of each kind after zstd level 3 in 1 MiB pieces, for the description only.
    zstd_bytes: [usize; 3],
}

/// `len` bytes of "files" of 64 KiB to 8 MiB, each text-like, random or structured, with the
/// kind furthest behind its third going next so that the mix stays balanced.
fn generate(len: usize, seed: u64) -> Mix {
    let mut rng = Rng(seed);
    let mut mix = Mix { data: Vec::with_capacity(len), files: 0, bytes: [0; 3], zstd_bytes: [0; 3] };
    while mix.data.len() < len {
        let kind = (0..3).min_by_key(|&k| mix.bytes[k]).unwrap_or(0);
        let size = ((64 << 10) + rng.below((8 << 20) - (64 << 10)) as usize).min(len - mix.data.len());
        let start = mix.data.len();
        match kind {
            0 => text(&mut rng, &mut mix.data, size),
            1 => random(&mut rng, &mut mix.data, size),
            _ => records(&mut rng, &mut mix.data, size),
        }
        debug_assert_eq!(mix.data.len(), start + size);
        for piece in mix.data[start..].chunks(1 << 20) {
            // The description is informational; a compression error would surface in (c) anyway.
            let z = compress::compress(piece).ok().flatten().map_or(piece.len(), |z| z.len());
            mix.zstd_bytes[kind] += z;
        }
        mix.bytes[kind] += size;
        mix.files += 1;
    }
    mix
}

/// SplitMix64: tiny, fast and good enough for test data; the same seed gives the same bytes
/// on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "backup",
    "restore",
    "chunk",
    "segment",
    "index",
    "host",
    "server",
    "client",
    "file",
    "directory",
    "snapshot",
    "version",
    "error",
    "return",
    "value",
    "struct",
    "impl",
    "fn",
    "let",
    "mut",
    "match",
    "Some",
    "None",
    "Ok",
    "Err",
    "self",
    "data",
    "length",
    "offset",
    "buffer",
    "stream",
    "read",
    "write",
    "sync",
    "key",
    "password",
    "network",
    "packet",
    "window",
    "system",
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
    "president",
    "team",
    "minute",
    "idea",
];

/// Prose-like text: words with a skewed frequency (smaller indices are likelier), punctuation,
/// occasional numbers and line breaks.
fn text(rng: &mut Rng, out: &mut Vec<u8>, size: usize) {
    let end = out.len() + size;
    let n = WORDS.len() as u64;
    let mut in_line = 0;
    while out.len() < end {
        let word = WORDS[rng.below(n).min(rng.below(n)) as usize];
        out.extend_from_slice(word.as_bytes());
        match rng.below(24) {
            0 => out.extend_from_slice(b". "),
            1 | 2 => out.extend_from_slice(b", "),
            3 => {
                let number = rng.below(100_000);
                let _ = write!(out, " {number} ");
            }
            _ => out.push(b' '),
        }
        in_line += 1;
        if in_line >= 10 + rng.below(8) {
            out.push(b'\n');
            in_line = 0;
        }
    }
    out.truncate(end);
}

/// Incompressible bytes, standing in for media, archives and encrypted files.
fn random(rng: &mut Rng, out: &mut Vec<u8>, size: usize) {
    let end = out.len() + size;
    while out.len() < end {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(end);
}

/// Table- or log-like binary: 64-byte records with a sequence number, a slowly rising
/// timestamp, small random fields, a name from a short list and 8 random bytes; one 4 KiB block
/// in eight repeats an earlier block of the same file verbatim.
fn records(rng: &mut Rng, out: &mut Vec<u8>, size: usize) {
    const RECORD: usize = 64;
    const BLOCK: usize = 64 * RECORD;
    const NAMES: [&[u8]; 12] = [
        b"alpha", b"bravo", b"charlie", b"delta", b"echo", b"foxtrot", b"golf", b"hotel", b"india", b"juliett",
        b"kilo", b"lima",
    ];
    const STATUS: [u16; 6] = [200, 200, 200, 304, 404, 500];
    let start = out.len();
    let end = start + size;
    let mut seq = rng.next() >> 40;
    let mut time = 1_700_000_000_000 + rng.below(1 << 30);
    while out.len() < end {
        let here = out.len();
        let earlier = (here - start) / BLOCK;
        if earlier > 0 && rng.below(8) == 0 {
            let from = here - BLOCK * (1 + rng.below(earlier.min(64) as u64) as usize);
            out.extend_from_within(from..from + BLOCK);
            continue;
        }
        for _ in 0..BLOCK / RECORD {
            seq += 1;
            time += rng.below(1000);
            out.extend_from_slice(b"RC\x01\x00");
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&time.to_le_bytes());
            out.extend_from_slice(&(rng.below(500) as u32).to_le_bytes());
            out.extend_from_slice(&STATUS[rng.below(STATUS.len() as u64) as usize].to_le_bytes());
            out.extend_from_slice(&(rng.below(4) as u16).to_le_bytes());
            out.extend_from_slice(&(rng.below(100_000) as u32).to_le_bytes());
            let mut name = [0u8; 16];
            let pick = NAMES[rng.below(NAMES.len() as u64) as usize];
            name[..pick.len()].copy_from_slice(pick);
            out.extend_from_slice(&name);
            out.extend_from_slice(&rng.next().to_le_bytes());
            out.extend_from_slice(&[0u8; 8]);
        }
    }
    out.truncate(end);
}
