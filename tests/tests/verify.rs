//! `tardis-tools verify` end to end: a healthy repository passes; a flipped byte in a chunk
//! record, a chunk deleted from the index and an index entry pointing at the wrong record are
//! each reported exactly (which segment, which sets, which files); `rebuild-index` repairs the
//! index; `--read-data=25` reads every referenced chunk exactly once in four runs.
//!
//! The libraries are used only to find where a chunk is stored (so the test knows which
//! bytes to damage and which files must be named) and to damage the index; the expected
//! (set, path) pairs come from the files the test wrote, not from the code under test.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use tardis_core::api::Repository;
use tardis_core::crypto::Keys;
use tardis_core::event::Event;
use tardis_core::ids::ChunkId;
use tardis_core::keywrap::WrappedKey;
use tardis_core::view::{self, Tree};
use tardis_log::index::ChunkLoc;
use tardis_log::{Repo, RepoOptions};
use tardis_tests::{noise, run_s};

/// Absolute path → content, for one set.
type Files = BTreeMap<PathBuf, Vec<u8>>;

/// Two sets of a tree of 22 files: distinct small files (one chunk each), two files with the
/// same content (one shared chunk), a 3 MB file (several chunks) and an empty one.
struct Fixture {
    _work: tempfile::TempDir,
    src: PathBuf,
    db: PathBuf,
    sets: Vec<(&'static str, Files)>,
}

/// Content of the two duplicate files: under FastCDC's minimum, so exactly one chunk.
fn shared_content() -> Vec<u8> {
    noise(40_000, 999)
}

fn write(files: &mut Files, path: PathBuf, data: Vec<u8>) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, &data).unwrap();
    files.insert(path, data);
}

fn backup(db: &Path, src: &Path, name: &str) {
    let out = run_s(
        "tardis",
        &[
            "--local",
            "--db",
            db.to_str().unwrap(),
            "--host",
            "h",
            "--password",
            "pw",
            "--name",
            name,
            src.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "backup {name}: {}", String::from_utf8_lossy(&out.stderr));
}

fn fixture() -> Fixture {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let db = work.path().join("db");
    let mut files = Files::new();
    for i in 0..16u64 {
        let dir = if i % 2 == 0 { src.clone() } else { src.join("sub") };
        write(&mut files, dir.join(format!("f{i:02}")), noise(1_000 + i as usize * 2_500, i));
    }
    write(&mut files, src.join("dup-a"), shared_content());
    write(&mut files, src.join("sub/deeper/dup-b"), shared_content());
    write(&mut files, src.join("big.bin"), noise(3_000_000, 77));
    write(&mut files, src.join("empty"), Vec::new());
    backup(&db, &src, "first");
    let first = files.clone();

    // The second set: one file changed, one deleted, two added; the rest carried forward.
    write(&mut files, src.join("f00"), noise(5_000, 100));
    fs::remove_file(src.join("f02")).unwrap();
    files.remove(&src.join("f02"));
    write(&mut files, src.join("new-1"), noise(7_000, 101));
    write(&mut files, src.join("sub/new-2"), noise(9_000, 102));
    backup(&db, &src, "second");
    Fixture { _work: work, src, db, sets: vec![("first", first), ("second", files)] }
}

impl Fixture {
    /// Runs `tardis-tools` on the fixture's repository.
    fn tools(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["--db", self.db.to_str().unwrap(), "--host", "h", "--password", "pw"];
        all.extend_from_slice(args);
        run_s("tardis-tools", &all)
    }

    /// `verify --json ARGS`: the exit status and the JSON objects, the summary last.
    fn verify(&self, args: &[&str]) -> (i32, Vec<Value>) {
        let mut all = vec!["verify", "--json"];
        all.extend_from_slice(args);
        let out = self.tools(&all);
        let lines: Vec<Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
            .collect();
        let summary = lines.last().unwrap_or_else(|| panic!("no output: {}", String::from_utf8_lossy(&out.stderr)));
        assert_eq!(summary["type"], "summary", "{lines:?}");
        (out.status.code().unwrap_or(-1), lines)
    }

    /// The repository and the host's keys. The repository is locked while the value lives:
    /// drop it before running a program.
    fn open(&self) -> (Repo, Keys) {
        let repo = Repo::open(&self.db, "h", RepoOptions::default()).unwrap();
        let host = repo.host().unwrap().unwrap();
        let wrapped = WrappedKey::from_bytes(&host.wrapped_key.unwrap()).unwrap();
        let keys = Keys::encrypted(host.host_id, &wrapped.unwrap_key(b"pw").unwrap().master);
        (repo, keys)
    }

    /// Where the chunk holding `content` (a single-chunk file) is stored.
    fn locate(&self, content: &[u8]) -> (ChunkId, ChunkLoc) {
        let (repo, keys) = self.open();
        let id = keys.chunk_id(content);
        let loc = repo.index().chunk(&id).unwrap().expect("the chunk is stored");
        (id, loc)
    }

    /// Every (set, path) whose file has exactly `content`: the files a single chunk serves.
    fn users_of(&self, content: &[u8]) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for (set, files) in &self.sets {
            for (path, data) in files {
                if data == content {
                    out.insert((set.to_string(), path.to_str().unwrap().to_owned()));
                }
            }
        }
        out
    }

    fn segment(&self, seg: u64) -> PathBuf {
        self.db.join("h/segments").join(format!("{seg:016x}.seg"))
    }

    /// Opens the index directly, as damage from outside would reach it.
    fn raw_index(&self) -> rocksdb::DB {
        let cfs = ["meta", "chunks", "sets", "entries", "config"];
        rocksdb::DB::open_cf(&rocksdb::Options::default(), self.db.join("h/index"), cfs).unwrap()
    }

    fn regenerate(&self, set: &str, path: &Path) -> std::process::Output {
        self.tools(&["regenerate", "--set", set, path.to_str().unwrap()])
    }
}

fn of_type<'a>(lines: &'a [Value], t: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["type"] == t).collect()
}

/// The (set, path) pairs of the `file` findings.
fn named_files(lines: &[Value]) -> BTreeSet<(String, String)> {
    of_type(lines, "file")
        .into_iter()
        .map(|f| (f["set"].as_str().unwrap().to_owned(), f["path"].as_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn a_healthy_repository_verifies_with_and_without_reading_data() {
    let fx = fixture();
    let out = fx.tools(&["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("verified 1 segment, "), "{text}");
    assert!(text.contains("referenced by 2 sets: no damage"), "{text}");
    assert!(!fx.db.join("h/verify-index.tmp").exists(), "the scratch index is removed");

    let (code, lines) = fx.verify(&["--read-data"]);
    assert_eq!(code, 0, "{lines:?}");
    let s = lines.last().unwrap();
    assert_eq!(lines.len(), 1, "only the summary: {lines:?}");
    assert_eq!(s["ok"], true);
    assert_eq!(s["sets"], 2);
    // 16 small files, one chunk for both duplicates, the 3 MB file's chunks, and the second
    // set's three new files.
    let referenced = s["chunks_referenced"].as_u64().unwrap();
    assert!(referenced >= 20, "{s}");
    assert_eq!(s["chunks_decoded"].as_u64(), Some(referenced), "every referenced chunk was decoded: {s}");
    assert!(!fx.db.join("h/verify-cursor").exists(), "a full read keeps no cursor");

    // Without the password of an encrypted host, nothing can be checked for paths or data.
    let out = run_s("tardis-tools", &["--db", fx.db.to_str().unwrap(), "--host", "h", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("host h is encrypted: give --password"));
}

#[test]
fn a_flipped_byte_in_a_chunk_names_the_segment_and_exactly_the_files_using_it() {
    let fx = fixture();
    let shared = shared_content();
    let (id, loc) = fx.locate(&shared);
    let expected = fx.users_of(&shared);
    assert_eq!(expected.len(), 4, "two files in each of two sets: {expected:?}");

    // Flip one byte in the middle of the record's body (after its 24-byte header and meta).
    let seg = fx.segment(loc.pos.segment);
    let mut bytes = fs::read(&seg).unwrap();
    let at = loc.pos.offset as usize;
    let meta_len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
    let body_len = u32::from_le_bytes(bytes[at + 12..at + 16].try_into().unwrap()) as usize;
    assert_eq!(body_len, loc.stored_len as usize);
    bytes[at + 24 + meta_len + body_len / 2] ^= 0x20;
    fs::write(&seg, &bytes).unwrap();

    // Without reading data: the log scan finds the record, and the files depending on it.
    let (code, lines) = fx.verify(&[]);
    assert_eq!(code, 1, "{lines:?}");
    let damage = of_type(&lines, "log_damage");
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert_eq!(
        (damage[0]["segment"].as_u64(), damage[0]["offset"].as_u64()),
        (Some(loc.pos.segment), Some(loc.pos.offset))
    );
    assert!(damage[0]["reason"].as_str().unwrap().contains("body checksum"), "{damage:?}");
    let chunks = of_type(&lines, "chunk");
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    assert_eq!((chunks[0]["chunk"].as_str(), chunks[0]["state"].as_str()), (Some(&*id.to_hex()), Some("damaged")));
    assert_eq!(named_files(&lines), expected, "precision and recall of the named files");
    assert!(of_type(&lines, "index").is_empty(), "the index still matches the log: {lines:?}");
    assert_eq!(lines.last().unwrap()["problems"], 2, "one damaged range, one damaged chunk");

    // Reading data: the same files, the decode failure persisting over the retry.
    let (code, lines) = fx.verify(&["--read-data"]);
    assert_eq!(code, 1, "{lines:?}");
    assert_eq!(named_files(&lines), expected);
    assert!(of_type(&lines, "transient").is_empty());
    let s = lines.last().unwrap();
    assert_eq!(s["chunks_decoded"].as_u64().unwrap() + 1, s["chunks_referenced"].as_u64().unwrap(), "{s}");

    // The text form names the segment, and each (set, path) on its own line.
    let out = fx.tools(&["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("damaged log: segment {} offset {}..", loc.pos.segment, loc.pos.offset)), "{text}");
    let dup = fx.src.join("sub/deeper/dup-b");
    let line =
        format!("second {}: chunk {id} damaged (segment {} offset {})", dup.display(), loc.pos.segment, loc.pos.offset);
    assert!(text.contains(&line), "{text}");
    assert!(text.trim_end().ends_with(": 2 problems (listed above)"), "{text}");

    // Files that do not use the chunk still regenerate; those that do fail.
    let f05 = fx.src.join("sub/f05");
    let out = fx.regenerate("second", &f05);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, fx.sets[1].1[&f05]);
    assert!(!fx.regenerate("first", &dup).status.success());
}

#[test]
fn an_index_that_disagrees_with_the_log_is_reported_and_rebuild_index_repairs_it() {
    let fx = fixture();
    let f05 = fx.src.join("sub/f05");
    let content = fx.sets[0].1[&f05].clone();
    let (id, loc) = fx.locate(&content);
    let users = fx.users_of(&content);
    assert_eq!(users.len(), 2, "f05 in both sets");

    // A chunk deleted from the index: missing for the sets, and a difference from the log.
    let db = fx.raw_index();
    db.delete_cf(db.cf_handle("chunks").unwrap(), id.0).unwrap();
    drop(db);
    let (code, lines) = fx.verify(&[]);
    assert_eq!(code, 1, "{lines:?}");
    let index = of_type(&lines, "index");
    assert_eq!(index.len(), 1, "{index:?}");
    assert_eq!(index[0]["cf"], "chunks");
    assert_eq!(index[0]["key"].as_str(), Some(&*id.to_hex()));
    assert_eq!(index[0]["difference"], "in the log but not in the index");
    let chunks = of_type(&lines, "chunk");
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    assert_eq!(chunks[0]["state"], "missing");
    assert!(chunks[0]["reason"].as_str().unwrap().contains("rebuild-index"), "{chunks:?}");
    assert_eq!(named_files(&lines), users);
    assert!(of_type(&lines, "log_damage").is_empty(), "the log itself is intact");

    let out = fx.tools(&["rebuild-index"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, lines) = fx.verify(&["--read-data"]);
    assert_eq!(code, 0, "after rebuild-index: {lines:?}");

    // An index entry pointing at another chunk's record: a changed value, and the files named.
    let (_, other) = fx.locate(&fx.sets[0].1[&fx.src.join("f04")]);
    let db = fx.raw_index();
    let mut value = db.get_cf(db.cf_handle("chunks").unwrap(), id.0).unwrap().unwrap();
    value[8..16].copy_from_slice(&other.pos.offset.to_le_bytes());
    db.put_cf(db.cf_handle("chunks").unwrap(), id.0, &value).unwrap();
    drop(db);
    // Found by comparing the locations alone, and again by reading the record it points at.
    for args in [&[][..], &["--read-data"]] {
        let (code, lines) = fx.verify(args);
        assert_eq!(code, 1, "{args:?}: {lines:?}");
        let index = of_type(&lines, "index");
        assert_eq!(index.len(), 1, "{index:?}");
        assert_eq!(index[0]["difference"], "the index holds another value than the log gives");
        let chunks = of_type(&lines, "chunk");
        assert_eq!((chunks.len(), chunks[0]["state"].as_str()), (1, Some("damaged")), "{args:?}: {chunks:?}");
        assert_eq!(chunks[0]["offset"].as_u64(), Some(other.pos.offset), "where the index points");
        assert!(chunks[0]["reason"].as_str().unwrap().contains(&format!("offset {}", loc.pos.offset)), "{chunks:?}");
        assert_eq!(named_files(&lines), users, "{args:?}");
    }

    let out = fx.tools(&["rebuild-index"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, lines) = fx.verify(&["--read-data"]);
    assert_eq!(code, 0, "after the second rebuild-index: {lines:?}");

    // Version rows the log never wrote, as if set 2 had stored f05 and f07 again: f05's sealed
    // validly (reads use it, but `rebuild-index` would drop it, so verify names the path it
    // serves), f07's with the seal of set 1, which does not open in set 2 (tampered).
    let f07 = fx.src.join("sub/f07");
    let (repo, keys) = fx.open();
    let tree = Tree::new(&repo, &keys, 1);
    let mut forged = Vec::new();
    for (path, reseal) in [(&f05, true), (&f07, false)] {
        let node = tree.resolve(path.to_str().unwrap().as_bytes()).unwrap().unwrap();
        let mut v = node.version.clone();
        v.set = 2;
        if reseal {
            v.meta = view::seal_meta(&keys, &v.dir, &v.name, 2, &node.meta).unwrap();
        }
        forged.push(v);
    }
    let sub_dir = forged[1].dir;
    drop(repo);
    let db = fx.raw_index();
    for v in forged {
        let mut key = v.dir.0.to_vec();
        key.extend_from_slice(&v.name.0);
        key.extend_from_slice(&2u64.to_be_bytes());
        // Tag, then the position of the record that wrote the row (there is none), then the
        // payload (FORMAT.md §6.1).
        let mut value = vec![1u8];
        value.extend_from_slice(&[0u8; 16]);
        value.extend_from_slice(&Event::FileVersion(v).encode());
        db.put_cf(db.cf_handle("entries").unwrap(), &key, &value).unwrap();
    }
    drop(db);
    let (code, lines) = fx.verify(&[]);
    assert_eq!(code, 1, "{lines:?}");
    let index = of_type(&lines, "index");
    assert_eq!(index.len(), 2, "{index:?}");
    assert!(index.iter().all(|i| i["cf"] == "entries" && i["difference"] == "in the index but not in the log"));
    let entries = of_type(&lines, "entry");
    assert_eq!(entries.len(), 1, "{lines:?}");
    assert_eq!(entries[0]["set"], "second");
    assert_eq!(entries[0]["dir"].as_str(), Some(&*sub_dir.to_hex()));
    assert_eq!(entries[0]["dir_path"].as_str(), fx.src.join("sub").to_str(), "the directory is named by its path");
    assert!(entries[0]["reason"].as_str().unwrap().contains("authentication failed"), "{entries:?}");
    let versions = of_type(&lines, "version");
    assert_eq!(versions.len(), 1, "only the set that sees the forged row: {lines:?}");
    assert_eq!(versions[0]["set"], "second");
    assert_eq!(versions[0]["path"].as_str(), f05.to_str());
    assert_eq!(versions[0]["written_by"], 2);
    assert!(of_type(&lines, "file").is_empty() && of_type(&lines, "chunk").is_empty(), "{lines:?}");
    let out = fx.tools(&["rebuild-index"]);
    assert!(out.status.success());
    assert_eq!(fx.verify(&[]).0, 0, "after the third rebuild-index");
}

#[test]
fn read_data_25_percent_reads_every_chunk_once_in_four_runs() {
    let fx = fixture();
    let (code, lines) = fx.verify(&["--read-data"]);
    assert_eq!(code, 0);
    let total = lines.last().unwrap()["chunks_referenced"].as_u64().unwrap();
    // ceil(total / 4) chunks per run; for this tree (20–30 chunks) that is exactly four runs.
    assert!((13..=40).contains(&total), "{total} chunks");

    let mut next = 0;
    for run in 1..=5 {
        let (code, lines) = fx.verify(&["--read-data=25"]);
        assert_eq!(code, 0, "run {run}: {lines:?}");
        let s = lines.last().unwrap();
        let r = &s["read_data"];
        let (from, to) = (r["from"].as_u64().unwrap(), r["to"].as_u64().unwrap());
        assert_eq!(r["total"].as_u64(), Some(total), "run {run}");
        assert_eq!(from, if run == 5 { 0 } else { next }, "run {run} starts where run {} stopped", run - 1);
        assert_eq!(to - from, total.div_ceil(4).min(total - from), "run {run}: {s}");
        assert_eq!(s["chunks_decoded"].as_u64(), Some(to - from), "run {run}: {s}");
        assert_eq!(r["cycle_complete"], run == 4, "run {run}: {s}");
        next = to;
        if run == 4 {
            assert_eq!(to, total, "four runs cover every referenced chunk, each once");
        }
    }
    let cursor = fs::read_to_string(fx.db.join("h/verify-cursor")).unwrap();
    assert!(cursor.starts_with("tardis-verify-cursor 1\n"), "{cursor}");
    // The text form says how far the cycle is: the sixth run reads the second quarter.
    let out = fx.tools(&["verify", "--read-data=25"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let k = total.div_ceil(4);
    let line =
        format!("read-data 25%: chunks {k}..{} of {total} in log order; cycle {}% done", 2 * k, 2 * k * 100 / total);
    assert!(text.contains(&line), "{text}");
}

/// A delta chunk is only as good as its chain: damage to the full chunk at the bottom of one is
/// reported for the base and for the delta built on it, and names the file in both sets.
#[test]
fn a_damaged_delta_base_names_the_files_of_every_version_built_on_it() {
    let work = tempfile::tempdir().unwrap();
    let (src, db) = (work.path().join("src"), work.path().join("db"));
    let path = src.join("table.db");
    // Under FastCDC's minimum size, so each version is exactly one chunk.
    let v1 = noise(200_000, 1);
    let mut v2 = v1.clone();
    v2[50_000..54_096].copy_from_slice(&noise(4096, 2));
    let mut sets = Vec::new();
    for (name, data) in [("first", &v1), ("second", &v2)] {
        let mut files = Files::new();
        write(&mut files, path.clone(), data.clone());
        backup(&db, &src, name);
        sets.push((name, files));
    }
    let fx = Fixture { _work: work, src, db, sets };
    let (base, base_loc) = fx.locate(&v1);
    let (delta, delta_loc) = fx.locate(&v2);
    assert_eq!(delta_loc.delta.map(|d| (d.base, d.depth)), Some((base, 1)), "the second version is a delta");
    assert!(delta_loc.stored_len < 10_000, "a 4 KiB edit is stored as a small delta: {}", delta_loc.stored_len);
    let (code, lines) = fx.verify(&["--read-data"]);
    assert_eq!(code, 0, "{lines:?}");

    let seg = fx.segment(base_loc.pos.segment);
    let mut bytes = fs::read(&seg).unwrap();
    let at = base_loc.pos.offset as usize;
    let meta_len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
    bytes[at + 24 + meta_len + 100] ^= 0x01;
    fs::write(&seg, &bytes).unwrap();

    let (code, lines) = fx.verify(&[]);
    assert_eq!(code, 1, "{lines:?}");
    let chunks: BTreeMap<String, String> = of_type(&lines, "chunk")
        .into_iter()
        .map(|c| (c["chunk"].as_str().unwrap().to_owned(), c["reason"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(chunks.len(), 2, "{chunks:?}");
    assert!(chunks[&base.to_hex()].contains("damaged log range"), "{chunks:?}");
    assert!(chunks[&delta.to_hex()].contains(&format!("its delta base {base} is damaged")), "{chunks:?}");
    let p = path.to_str().unwrap().to_owned();
    assert_eq!(named_files(&lines), BTreeSet::from([("first".to_owned(), p.clone()), ("second".to_owned(), p)]));
    assert!(!fx.regenerate("second", &path).status.success(), "a delta on a damaged base cannot be read");
}
