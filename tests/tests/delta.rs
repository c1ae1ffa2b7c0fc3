//! Delta-encoded chunks end to end: scattered small writes in a big file (random data, and a
//! SQLite database) cost about the bytes changed, not the chunks touched; every version
//! regenerates bit-exact; chains stop at `MaxDeltaChain`; purging the set that holds a basis and
//! compacting keeps exactly the chunks that kept sets and their chains need.

use serde_json::Value;
use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use tardis_core::api::Repository;
use tardis_core::crypto::Keys;
use tardis_core::ids::ChunkId;
use tardis_core::view::Tree;
use tardis_tests::relay::Rng;
use tardis_tests::{du, noise, ok, on_host};

/// Backs up `src` as set `name` and returns the client's statistics.
fn backup(db: &Path, name: &str, src: &Path) -> Value {
    let out = ok(on_host(db, "tardis", &["--local", "--json", "--name", name, src.to_str().unwrap()]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Regenerates `path` of set `set` and checks it against `expected`.
fn regenerates(db: &Path, set: &str, path: &Path, expected: &[u8], scratch: &Path) {
    let out = scratch.join(format!("regenerated-{set}"));
    ok(on_host(db, "tardis-tools", &["regenerate", "--set", set, "-o", out.to_str().unwrap(), path.to_str().unwrap()]));
    let got = fs::read(&out).unwrap();
    assert!(got == expected, "set {set}: {} regenerated differently ({} bytes)", path.display(), got.len());
    fs::remove_file(out).unwrap();
}

fn verify(db: &Path) {
    let out = ok(on_host(db, "tardis-tools", &["verify", "--read-data"]));
    assert!(out.contains("no damage"), "{out}");
}

/// Counts 4 KiB blocks that differ between two equally long files: the bytes an application
/// with 4 KiB pages rewrote.
fn changed_pages(a: &[u8], b: &[u8]) -> usize {
    assert_eq!(a.len(), b.len());
    a.chunks(4096).zip(b.chunks(4096)).filter(|(x, y)| x != y).count()
}

#[test]
fn scattered_4k_writes_in_a_256_mib_file_cost_about_the_bytes_written() {
    let work = tempfile::tempdir().unwrap();
    let (src, db) = (work.path().join("src"), work.path().join("db"));
    fs::create_dir_all(&src).unwrap();
    let path = src.join("disk.img");
    let v1 = noise(256 << 20, 1);
    fs::write(&path, &v1).unwrap();
    backup(&db, "v1", &src);
    let segments = db.join("h").join("segments");
    let before = du(&segments);

    // Rewrite 1% of the 4 KiB blocks, at distinct random places, with fresh random data.
    let blocks = v1.len() / 4096;
    let mut rng = Rng::from_seed(7);
    let mut chosen = HashSet::new();
    while chosen.len() < blocks / 100 {
        chosen.insert(rng.below(blocks as u64));
    }
    let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
    for b in &chosen {
        file.write_all_at(&noise(4096, 1000 + b), b * 4096).unwrap();
    }
    drop(file);
    let v2 = fs::read(&path).unwrap();
    let changed = changed_pages(&v1, &v2) * 4096;

    let stats = backup(&db, "v2", &src);
    let growth = du(&segments) - before;
    let ratio = growth as f64 / changed as f64;
    eprintln!(
        "256 MiB file, {} of {blocks} 4 KiB blocks rewritten ({changed} bytes): the repository grew by {growth} \
         bytes, {ratio:.2}x the bytes changed; {} new chunks, {} of them deltas",
        chosen.len(),
        stats["new_chunks"],
        stats["delta_chunks"]
    );
    assert!(stats["delta_chunks"].as_u64().unwrap() > 0, "{stats}");
    assert!(growth <= 3 * changed as u64, "growth {growth} for {changed} changed bytes ({ratio:.2}x)");

    regenerates(&db, "v1", &path, &v1, work.path());
    regenerates(&db, "v2", &path, &v2, work.path());
    verify(&db);
}

fn sqlite(db: &Path, sql: &str) {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().expect("sqlite3 runs (.ci/setup installs it)");
    assert!(out.status.success(), "sqlite3: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_sqlite_database_after_1000_row_updates_costs_about_the_pages_changed() {
    let work = tempfile::tempdir().unwrap();
    let (src, db) = (work.path().join("src"), work.path().join("db"));
    fs::create_dir_all(&src).unwrap();
    let path = src.join("app.sqlite");
    // About 100 MiB: 100,000 rows of 1,000 random bytes (incompressible, the hard case).
    sqlite(
        &path,
        "PRAGMA journal_mode=DELETE; CREATE TABLE t(id INTEGER PRIMARY KEY, payload BLOB); \
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000) \
         INSERT INTO t SELECT i, randomblob(1000) FROM n;",
    );
    let v1 = fs::read(&path).unwrap();
    assert!(v1.len() > 100_000_000, "{} bytes", v1.len());
    backup(&db, "v1", &src);
    let segments = db.join("h").join("segments");
    let before = du(&segments);

    sqlite(
        &path,
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000) \
         UPDATE t SET payload = randomblob(1000) WHERE id IN (SELECT abs(random()) % 100000 + 1 FROM n);",
    );
    let v2 = fs::read(&path).unwrap();
    assert_eq!(v1.len(), v2.len(), "updates in place keep the file's size");
    let changed = changed_pages(&v1, &v2) * 4096;

    let stats = backup(&db, "v2", &src);
    let growth = du(&segments) - before;
    let ratio = growth as f64 / changed as f64;
    eprintln!(
        "{} byte SQLite database, 1000 row updates changed {} pages ({changed} bytes): the repository grew by \
         {growth} bytes, {ratio:.2}x; {} new chunks, {} of them deltas",
        v1.len(),
        changed / 4096,
        stats["new_chunks"],
        stats["delta_chunks"]
    );
    assert!(growth <= 3 * changed as u64, "growth {growth} for {changed} changed bytes ({ratio:.2}x)");

    regenerates(&db, "v1", &path, &v1, work.path());
    regenerates(&db, "v2", &path, &v2, work.path());
    verify(&db);
}

/// Every chunk that the given sets reference, and the bases of their delta chains, read
/// through the public repository interface.
fn needed_chunks(repo: &dyn Repository, keys: &Keys, sets: &[&str]) -> HashSet<ChunkId> {
    let all = repo.sets().unwrap();
    let mut needed = HashSet::new();
    for name in sets {
        let set = all.iter().find(|s| s.name == *name && s.is_live()).unwrap_or_else(|| panic!("set {name}"));
        let tree = Tree::new(repo, keys, set.id);
        let root = tree.resolve(b"/").unwrap().unwrap();
        let mut todo = vec![root];
        while let Some(node) = todo.pop() {
            if node.child_dir(keys).is_some() {
                todo.extend(tree.children(&node).unwrap());
            }
            for e in &node.version.extents {
                let mut id = Some(e.id);
                while let Some(c) = id {
                    if !needed.insert(c) {
                        break;
                    }
                    id = repo.read_chunk(&c).unwrap().meta.delta.map(|d| d.base);
                }
            }
        }
    }
    needed
}

#[test]
fn chains_are_bounded_and_purge_plus_compaction_keeps_exactly_the_needed_bases() {
    let work = tempfile::tempdir().unwrap();
    let (src, db) = (work.path().join("src"), work.path().join("db"));
    fs::create_dir_all(&src).unwrap();
    ok(on_host(&db, "tardis", &["--local", "--name", "empty", src.to_str().unwrap()]));
    ok(on_host(&db, "tardis-tools", &["config", "MaxDeltaChain", "2"]));
    // One 3 MiB file edited a little before every backup (in its first chunk), and a file that
    // only the first set holds.
    let path = src.join("data.bin");
    let mut data = noise(3 << 20, 5);
    fs::write(src.join("only-in-s1.bin"), noise(1 << 20, 6)).unwrap();
    let mut versions = Vec::new();
    let mut deltas = Vec::new();
    for i in 0..6u64 {
        data[1000 + i as usize * 5000..][..3000].copy_from_slice(&noise(3000, 100 + i));
        fs::write(&path, &data).unwrap();
        if i == 1 {
            fs::remove_file(src.join("only-in-s1.bin")).unwrap();
        }
        let stats = backup(&db, &format!("s{i}"), &src);
        deltas.push(stats["delta_chunks"].as_u64().unwrap());
        versions.push(data.clone());
    }
    // s0 is full; then deltas of depth 1 and 2; the chain bound makes s3 full again, and so on.
    assert_eq!(deltas, [0, 1, 1, 0, 1, 1], "delta chunks per set");

    // Purge the sets holding the bases of s2's chain (s0, s1) and s3, then compact.
    let purged = ok(on_host(&db, "tardis-tools", &["purge", "--set", "s0"]))
        + &ok(on_host(&db, "tardis-tools", &["purge", "--set", "s1"]))
        + &ok(on_host(&db, "tardis-tools", &["purge", "--set", "s3"]));
    assert_eq!(purged.lines().count(), 3, "{purged}");
    let compacted = ok(on_host(&db, "tardis-tools", &["compact", "--threshold", "1"]));
    assert!(compacted.starts_with("retired "), "{compacted}");
    verify(&db);
    for (i, v) in versions.iter().enumerate().filter(|(i, _)| [2, 4, 5].contains(i)) {
        regenerates(&db, &format!("s{i}"), &path, v, work.path());
    }

    // Stored chunks are exactly those the kept sets and their chains need: s2's chain still
    // reaches s0's chunk, while the file only s0 held is gone.
    let repo = tardis_log::Repo::open(&db, "h", Default::default()).unwrap();
    let keys =
        tardis_client::session::open_keys(&repo, "h", Some(b"pw"), tardis_client::session::IfMissing::Fail).unwrap();
    let needed = needed_chunks(&repo, &keys, &["s2", "s4", "s5", "empty"]);
    let mut stored = HashSet::new();
    repo.index()
        .for_each_chunk(&mut |id, _| {
            stored.insert(*id);
            Ok(())
        })
        .unwrap();
    assert_eq!(stored, needed, "stored chunks are exactly the needed ones");
}
