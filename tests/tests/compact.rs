//! `tardis-tools compact` end to end: back up, purge, compact; the bytes on disk follow the live
//! data, every kept set regenerates bit-exact, and `verify --read-data` passes before and after
//! `rebuild-index`.

use std::collections::BTreeMap;
use std::fs;
use tardis_tests::{assert_same, du, manifest, noise, ok, on_host, Entry};

#[test]
fn purge_then_compact_shrinks_the_repository_and_keeps_every_kept_set() {
    let work = tempfile::tempdir().unwrap();
    let (src, db) = (work.path().join("src"), work.path().join("db"));
    fs::create_dir_all(&src).unwrap();
    let s = src.to_str().unwrap();
    // Ten sets; each rewrites two of four 512 KiB files with fresh, incompressible data, so a
    // purged set's versions are dead weight that only compaction can give back.
    let mut kept: BTreeMap<String, BTreeMap<Vec<u8>, Entry>> = BTreeMap::new();
    for i in 0..10u64 {
        for f in [i % 4, (i + 1) % 4] {
            fs::write(src.join(format!("file{f}")), noise(512 << 10, i * 10 + f)).unwrap();
        }
        if i == 0 {
            fs::write(src.join("small.txt"), "kept in every set").unwrap();
        }
        let name = format!("s{i}");
        ok(on_host(&db, "tardis", &["--local", "--name", &name, s]));
        if [1, 9].contains(&i) {
            kept.insert(name, manifest(&src));
        }
    }
    ok(on_host(&db, "tardis-tools", &["lock", "s1"]));
    let purged = ok(on_host(&db, "tardis-tools", &["purge", "--before", "2026-03-02"]));
    // All but s1, which is locked, and s9, the newest.
    assert_eq!(purged.lines().count(), 8, "{purged}");
    let segments = db.join("h").join("segments");
    let before = du(&segments);

    let out = ok(on_host(&db, "tardis-tools", &["compact"]));
    assert!(out.starts_with("retired "), "{out}");
    let after = du(&segments);
    eprintln!("segments: {before} bytes before purge and compaction, {after} after: {out}");
    // Live: the four current files (2 MiB) and what only s1 holds (three older versions), 7
    // of the 20 versions written.
    assert!(after < before * 6 / 10, "{before} -> {after}");
    assert!(after > 2 << 20, "the live data is still there: {after}");

    for (set, expected) in &kept {
        let restored = work.path().join(format!("out-{set}"));
        ok(on_host(&db, "regenerate", &["--set", set, "-o", restored.to_str().unwrap(), s]));
        assert_same(expected, &manifest(&restored), set);
    }
    let verify = ok(on_host(&db, "tardis-tools", &["verify", "--read-data"]));
    assert!(verify.contains("no damage"), "{verify}");
    assert_eq!(
        ok(on_host(&db, "tardis-tools", &["compact"])),
        "nothing to compact: no segment is less than 50% live\n",
        "a second run has nothing left to do"
    );

    // The log alone gives the same repository: rebuild the index, verify again, back up again.
    ok(on_host(&db, "tardis-tools", &["rebuild-index"]));
    ok(on_host(&db, "tardis-tools", &["verify", "--read-data"]));
    fs::write(src.join("file0"), noise(4096, 99)).unwrap();
    ok(on_host(&db, "tardis", &["--local", "--name", "s10", s]));
    let restored = work.path().join("out-s10");
    ok(on_host(&db, "regenerate", &["--set", "s10", "-o", restored.to_str().unwrap(), s]));
    assert_same(&manifest(&src), &manifest(&restored), "s10");
    let sets = ok(on_host(&db, "tardis-tools", &["sets"]));
    assert_eq!(
        sets.lines().skip(1).map(|l| l.split_whitespace().nth(1).unwrap()).collect::<Vec<_>>(),
        ["s1", "s9", "s10"]
    );

    let bad = on_host(&db, "tardis-tools", &["compact", "--threshold", "2"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a fraction from 0 to 1"));
}
