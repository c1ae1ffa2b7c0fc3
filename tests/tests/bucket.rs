//! Segments in an S3-compatible bucket, end to end against a real `s3s-fs` on loopback:
//! migration of a local repository, backups, regenerate, verify, purge and compaction with the
//! bucket backend, `rebuild-index` on a new machine from the bucket alone, and a `tardisd`
//! that keeps backing up through an outage of the store.

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use tardis_tests::s3::{local_segments, program, S3Server};
use tardis_tests::server::Daemon;
use tardis_tests::{assert_same, bin, change_every_kind, every_kind_tree, manifest, noise, run};

/// Runs `program` on host `h` (password `pw`) of `db`, with its own state directory.
fn on(db: &Path, state: &Path, program: &str, args: &[&OsStr]) -> Output {
    Command::new(bin(program))
        .arg("--db")
        .arg(db)
        .args(["--host", "h", "--password", "pw", "--state-dir"])
        .arg(state)
        .args(args)
        .env_remove("TARDIS_DB")
        .env_remove("TARDIS_HOST")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()
        .expect("program starts")
}

fn ok(what: &str, out: Output) -> String {
    assert!(out.status.success(), "{what}: exit {:?}: {}", out.status.code(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(x: &str) -> &OsStr {
    OsStr::new(x)
}

#[test]
fn a_local_repository_moves_to_a_bucket_and_every_tool_works_from_it() {
    let Some(s3s) = program() else { return };
    let work = tempfile::tempdir().unwrap();
    let (src, db, state) = (work.path().join("src"), work.path().join("db"), work.path().join("state"));
    let store = S3Server::start(&s3s, &work.path().join("s3"));
    every_kind_tree(&src, 3_000_000);
    let mut kept = Vec::new();
    let backup = |name: &str| {
        let args = [s("--local"), s("--name"), s(name), src.as_os_str()];
        ok(&format!("backup {name}"), on(&db, &state, "tardis", &args));
    };
    backup("one");
    kept.push(("one", manifest(&src)));
    change_every_kind(&src);
    backup("two");
    kept.push(("two", manifest(&src)));

    // Migrate: every segment goes up, the local copies go away, storage.cfg names the bucket.
    let cfg = work.path().join("s3.cfg");
    fs::write(&cfg, format!("# a tardisd.cfg: other keys are skipped\nPort = 7431\n{}", store.settings("site")))
        .unwrap();
    let out = ok("migrate", on(&db, &state, "tardis-tools", &[s("migrate"), s("--config"), cfg.as_os_str()]));
    assert!(out.contains("now keeps its segments in s3://tardis/site"), "{out}");
    let uploaded = store.segments("site", "h");
    assert!(!uploaded.is_empty());
    assert_eq!(local_segments(&db.join("h/segments")), Vec::<u64>::new(), "local copies are gone");
    assert!(fs::read_to_string(db.join("storage.cfg")).unwrap().contains("S3Bucket = tardis"));
    let again = on(&db, &state, "tardis-tools", &[s("migrate"), s("--config"), cfg.as_os_str()]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already keeps"));

    // Backups go on into the bucket: the completed set's segment is uploaded at once.
    fs::write(src.join("dir/big.bin"), noise(2_000_000, 9)).unwrap();
    backup("three");
    kept.push(("three", manifest(&src)));
    let after = store.segments("site", "h");
    assert!(after.len() > uploaded.len(), "{after:?} after {uploaded:?}");
    assert_eq!(local_segments(&db.join("h/segments")), Vec::<u64>::new(), "nothing stays staged");

    for (set, want) in &kept {
        let out = work.path().join(format!("out-{set}"));
        let args = [s("regenerate"), s("--set"), s(set), s("-o"), out.as_os_str(), src.as_os_str()];
        ok("regenerate", on(&db, &state, "tardis-tools", &args));
        assert_same(want, &manifest(&out), &format!("set {set} from the bucket"));
    }
    ok("verify", on(&db, &state, "tardis-tools", &[s("verify"), s("--read-data")]));

    // Purge and compaction delete objects from the bucket, and what is kept still restores.
    ok("purge", on(&db, &state, "tardis-tools", &[s("purge"), s("--set"), s("one")]));
    ok("compact", on(&db, &state, "tardis-tools", &[s("compact"), s("--threshold"), s("1")]));
    let compacted = store.segments("site", "h");
    assert!(after.iter().any(|seg| !compacted.contains(seg)), "compaction deleted objects: {after:?} -> {compacted:?}");
    ok("verify after compaction", on(&db, &state, "tardis-tools", &[s("verify"), s("--read-data")]));
    kept.remove(0);

    // A new machine: only storage.cfg (and the credentials it names). The index is rebuilt
    // from the bucket, and every kept set restores bit-exact.
    let db2 = work.path().join("db2");
    fs::create_dir(&db2).unwrap();
    fs::copy(db.join("storage.cfg"), db2.join("storage.cfg")).unwrap();
    let out = ok("rebuild-index", on(&db2, &state, "tardis-tools", &[s("rebuild-index")]));
    assert!(out.contains("rebuilt the index of host h"), "{out}");
    let sets = ok("sets", on(&db2, &state, "tardis-tools", &[s("sets")]));
    assert!(sets.contains("two") && sets.contains("three") && !sets.contains(" one "), "{sets}");
    for (set, want) in &kept {
        let out = work.path().join(format!("new-{set}"));
        let args = [s("regenerate"), s("--set"), s(set), s("-o"), out.as_os_str(), src.as_os_str()];
        ok("regenerate on the new machine", on(&db2, &state, "tardis-tools", &args));
        assert_same(want, &manifest(&out), &format!("set {set} rebuilt from the bucket alone"));
    }
    ok("verify on the new machine", on(&db2, &state, "tardis-tools", &[s("verify"), s("--read-data")]));

    // Without storage.cfg, the host directory refuses to open as an empty local repository.
    fs::remove_file(db.join("storage.cfg")).unwrap();
    let out = on(&db, &state, "tardis", &[s("--local"), src.as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("storage.cfg is missing"), "{err}");
}

#[test]
fn tardisd_with_a_bucket_backs_up_through_an_outage_of_the_store() {
    let Some(s3s) = program() else { return };
    let work = tempfile::tempdir().unwrap();
    let (src, srv, kh) = (work.path().join("src"), work.path().join("srv"), work.path().join("known_hosts"));
    let mut store = S3Server::start(&s3s, &work.path().join("s3"));
    every_kind_tree(&src, 2_000_000);
    let mut d = Daemon::start(&srv, &format!("AllowNewHosts = yes\n{}", store.settings("")));
    assert!(fs::read_to_string(srv.join("storage.cfg")).unwrap().contains("S3Bucket = tardis"));
    let backup = |d: &Daemon, host: &str, name: &str, extra: &[&str]| {
        let mut args: Vec<String> = d.client_args(host, "pw", &kh);
        args.extend(["--state-dir".into(), work.path().join("state").display().to_string()]);
        args.extend(extra.iter().map(|a| a.to_string()));
        args.extend(["--name".into(), name.into(), src.display().to_string()]);
        let refs: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        run("tardis", &refs)
    };
    let r = backup(&d, "h", "one", &["--create"]);
    assert!(r.status.success(), "first backup: {}", String::from_utf8_lossy(&r.stderr));
    let m1 = manifest(&src);
    let first = store.segments("", "h");
    assert!(!first.is_empty(), "the completed set is in the bucket");

    // The store goes down: the backup still completes, its segment staged on the daemon's disk.
    store.stop();
    change_every_kind(&src);
    let r = backup(&d, "h", "two", &[]);
    assert!(r.status.success(), "backup during the outage: {}", String::from_utf8_lossy(&r.stderr));
    let m2 = manifest(&src);
    let staged = local_segments(&srv.join("h/segments"));
    assert!(!staged.is_empty(), "the set is staged locally");
    assert!(d.log().contains("stay staged"), "the daemon says so: {}", d.log());

    // A crash while the store is down loses nothing; once it is back, the next backup
    // uploads what was staged.
    d.crash_and_restart();
    store.restart();
    fs::write(src.join("plain.txt"), "after the outage\n").unwrap();
    let r = backup(&d, "h", "three", &[]);
    assert!(r.status.success(), "backup after the outage: {}", String::from_utf8_lossy(&r.stderr));
    let m3 = manifest(&src);
    let now = store.segments("", "h");
    for seg in &staged {
        assert!(now.contains(seg), "staged segment {seg} was uploaded: {now:?}");
    }
    assert_eq!(local_segments(&srv.join("h/segments")), Vec::<u64>::new(), "nothing stays staged");

    for (set, want) in [("one", &m1), ("two", &m2), ("three", &m3)] {
        let out = work.path().join(format!("out-{set}"));
        let mut args: Vec<String> = d.client_args("h", "pw", &kh);
        args.extend(["--state-dir".into(), work.path().join("state").display().to_string()]);
        args.extend(["--set".into(), set.into(), "-o".into(), out.display().to_string(), src.display().to_string()]);
        let refs: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let r = run("regenerate", &refs);
        assert!(r.status.success(), "regenerate {set}: {}", String::from_utf8_lossy(&r.stderr));
        assert_same(want, &manifest(&out), &format!("set {set} through tardisd from the bucket"));
    }
    // A second daemon with its own BaseDir serves another host over the same bucket.
    let before = store.segments("", "h");
    let srv2 = work.path().join("srv2");
    let d2 = Daemon::start(&srv2, &format!("AllowNewHosts = yes\n{}", store.settings("")));
    let r = backup(&d2, "h2", "other", &["--create"]);
    assert!(r.status.success(), "a backup through the second daemon: {}", String::from_utf8_lossy(&r.stderr));
    assert!(!store.segments("", "h2").is_empty(), "h2's segments are in the bucket");
    assert_eq!(store.segments("", "h"), before, "h's objects are untouched");
    drop(d2);
    d.stop();

    // The daemon refuses a BaseDir that holds local repositories until they are migrated.
    let local = work.path().join("local");
    let args = [s("--local"), s("--db"), local.as_os_str(), s("--host"), s("l"), s("--password"), s("pw")];
    let mut all: Vec<&OsStr> = args.to_vec();
    all.extend([s("--state-dir"), work.path().as_os_str(), src.as_os_str()]);
    assert!(run("tardis", &all).status.success());
    let cfg = work.path().join("refuse.cfg");
    fs::write(&cfg, format!("BaseDir = {}\nPort = 7999\n{}", local.display(), store.settings("other"))).unwrap();
    let out = Command::new(bin("tardisd")).args(["--foreground", "--config"]).arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("tardis-tools") && err.contains("migrate"), "{err}");
}
