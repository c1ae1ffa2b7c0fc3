//! `tardis --local` and `regenerate`/`tardis-tools` end to end, on real trees, as root.

use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use tardis_tests::{assert_same, bin, change_every_kind, du, every_kind_tree, manifest, noise, on_host, run, run_s};

/// The shared tree of every kind of entry, plus a socket (skipped with a note).
fn build_tree(root: &Path) {
    every_kind_tree(root, 3_000_000);
    let _sock = std::os::unix::net::UnixListener::bind(root.join("socket")).unwrap();
}

fn backup(db: &Path, host: &str, pw: &str, path: &Path, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let mut args: Vec<&OsStr> =
        vec![OsStr::new("--local"), OsStr::new("--db"), db.as_os_str(), OsStr::new("--host"), OsStr::new(host)];
    args.extend([OsStr::new("--password"), OsStr::new(pw), OsStr::new("--json")]);
    args.extend(extra.iter().map(OsStr::new));
    args.push(path.as_os_str());
    let out = run("tardis", &args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), json, stderr)
}

fn regenerate(db: &Path, host: &str, pw: &str, set: &str, path: &Path, out: &Path) {
    let args: Vec<&OsStr> = vec![
        "--db".as_ref(),
        db.as_os_str(),
        "--host".as_ref(),
        host.as_ref(),
        "--password".as_ref(),
        pw.as_ref(),
        "--set".as_ref(),
        set.as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
        path.as_os_str(),
    ];
    let r = run("regenerate", &args);
    assert!(r.status.success(), "regenerate failed: {}", String::from_utf8_lossy(&r.stderr));
}

#[test]
fn two_sets_of_every_kind_of_entry_regenerate_exactly() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let db = work.path().join("db");
    build_tree(&src);
    let m1 = manifest(&src);

    let (code, s1, err) = backup(&db, "h", "pw", &src, &["--name", "first"]);
    assert_eq!(code, 3, "a skipped socket makes the run end with warnings: {err}");
    assert!(err.contains("skipped socket"), "{err}");
    assert!(s1["files_read"].as_u64().unwrap() >= 8);

    change_every_kind(&src);
    fs::remove_file(src.join("socket")).unwrap();
    let m2 = manifest(&src);
    let (code, s2, err) = backup(&db, "h", "pw", &src, &["--name", "second"]);
    assert_eq!(code, 0, "{err}");
    // Only what changed was read: not the 3 MB file, not the sparse image.
    assert!(s2["bytes_read"].as_u64().unwrap() < 100_000, "{s2}");
    assert!(s2["deleted"].as_u64().unwrap() >= 3, "{s2}");

    for (set, expected) in [("first", &m1), ("second", &m2)] {
        let out = work.path().join(format!("out-{set}"));
        regenerate(&db, "h", "pw", set, &src, &out);
        assert_same(expected, &manifest(&out), set);
    }
    // Sparse holes are kept.
    let restored = work.path().join("out-first/sparse.img");
    assert!(fs::metadata(&restored).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512 < (21 << 20)).unwrap());

    // A single file to stdout, and tools that list what is there.
    let out = run_s(
        "regenerate",
        &["--db", db.to_str().unwrap(), "--host", "h", "--password", "pw", src.join("new.txt").to_str().unwrap()],
    );
    assert_eq!(out.stdout, b"brand new");
    let sets = run_s("tardis-tools", &["--db", db.to_str().unwrap(), "--host", "h", "--password", "pw", "sets"]);
    let sets = String::from_utf8_lossy(&sets.stdout);
    assert!(sets.contains("first") && sets.contains("second"), "{sets}");
    let diff = run_s(
        "tardis-tools",
        &[
            "--db",
            db.to_str().unwrap(),
            "--host",
            "h",
            "--password",
            "pw",
            "diff",
            "first",
            "second",
            src.to_str().unwrap(),
        ],
    );
    let diff = String::from_utf8_lossy(&diff.stdout);
    for line in ["+ ", "- ", "M "] {
        assert!(diff.lines().any(|l| l.starts_with(line)), "diff lacks {line:?}: {diff}");
    }
    assert!(diff.contains(&format!("M {}", src.join("plain.txt").display())), "{diff}");
    assert!(diff.contains(&format!("- {}", src.join("empty").display())), "{diff}");
    assert!(diff.contains(&format!("+ {}", src.join("new.txt").display())), "{diff}");
    let versions = run_s(
        "tardis-tools",
        &[
            "--db",
            db.to_str().unwrap(),
            "--host",
            "h",
            "--password",
            "pw",
            "ls",
            "--versions",
            src.join("plain.txt").to_str().unwrap(),
        ],
    );
    let versions = String::from_utf8_lossy(&versions.stdout);
    assert_eq!(versions.lines().count(), 2, "{versions}");
    // The index rebuilt from the log serves the same restore.
    let r = run_s("tardis-tools", &["--db", db.to_str().unwrap(), "--host", "h", "rebuild-index"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let out = work.path().join("out-after-rebuild");
    regenerate(&db, "h", "pw", "first", &src, &out);
    assert_same(&m1, &manifest(&out), "first after rebuild-index");
}

/// Regenerate writes files on several threads and queues at most 1,024 at a time: links whose
/// first path was written with an earlier part of the queue, and read-only directories whose
/// metadata must wait for their contents, still come back exactly.
#[test]
fn a_tree_of_5000_files_with_links_across_the_write_queue_regenerates_exactly() {
    use std::os::unix::fs::PermissionsExt;
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    for d in 0..50 {
        let dir = src.join(format!("d{d:02}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            let len = if f % 10 == 0 { 300_000 } else { 100 + f * 7 };
            fs::write(dir.join(format!("f{f:02}")), noise(len, (d * 100 + f) as u64)).unwrap();
        }
    }
    for d in [10, 30, 49] {
        fs::hard_link(src.join("d00/f00"), src.join(format!("d{d:02}/link-to-first"))).unwrap();
        fs::hard_link(src.join("d48/f99"), src.join(format!("d{d:02}/link-to-late"))).unwrap();
    }
    for d in [5, 25] {
        fs::set_permissions(src.join(format!("d{d:02}")), fs::Permissions::from_mode(0o555)).unwrap();
    }
    let db = work.path().join("db");
    let (code, json, err) = backup(&db, "h", "pw", &src, &["--name", "one"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json["files"], 5_006, "{json}");
    let out = work.path().join("out");
    regenerate(&db, "h", "pw", "one", &src, &out);
    assert_same(&manifest(&src), &manifest(&out), "5,000 files restored in parallel");
}

#[test]
fn a_killed_tree_restore_leaves_no_target_and_the_rerun_restores_it_whole() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    for d in 0..4 {
        let dir = src.join(format!("d{d}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..8u64 {
            fs::write(dir.join(format!("f{f}")), noise(4 << 20, d * 8 + f + 1)).unwrap();
        }
    }
    let db = work.path().join("db");
    let (code, _, err) = backup(&db, "h", "pw", &src, &["--name", "one"]);
    assert_eq!(code, 0, "{err}");

    // The tree is built under `.out.tardis-tmp` beside `out` and renamed when complete.
    let out = work.path().join("out");
    let staging = work.path().join(".out.tardis-tmp");
    let mut child = Command::new(bin("regenerate"))
        .arg("--db")
        .arg(&db)
        .args(["--host", "h", "--password", "pw", "--set", "one", "-o"])
        .arg(&out)
        .arg(&src)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while du(&staging) < 24 << 20 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("restore finished before it could be killed: {status}");
        }
        std::thread::yield_now();
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    assert!(!out.exists(), "a killed restore left a partial tree under the target name");
    assert!(staging.is_dir(), "the killed restore had not written where it should");

    regenerate(&db, "h", "pw", "one", &src, &out);
    assert_same(&manifest(&src), &manifest(&out), "tree restored after a killed restore");
    assert!(!staging.exists(), "the rerun left the killed restore's tree behind");
}

#[test]
fn copies_of_a_file_in_consecutive_batches_are_stored_once() {
    let work = tempfile::tempdir().unwrap();
    let (one, many) = (work.path().join("one"), work.path().join("many"));
    fs::create_dir_all(&one).unwrap();
    fs::create_dir_all(&many).unwrap();
    let data = noise(3 << 20, 77);
    fs::write(one.join("f00a"), &data).unwrap();
    // A copy then a distinct file, 12 times: every 4 MiB batch holds a copy, so while one batch
    // is appended the next is asked about, and the copy's chunks in flight must not be sent again.
    for i in 0..12 {
        fs::write(many.join(format!("f{i:02}a")), &data).unwrap();
        for dir in [&one, &many] {
            fs::write(dir.join(format!("f{i:02}b")), noise(3 << 20, i)).unwrap();
        }
    }
    let (code, single, err) = backup(&work.path().join("db1"), "h", "pw", &one, &[]);
    assert_eq!(code, 0, "{err}");
    let (code, copies, err) = backup(&work.path().join("db2"), "h", "pw", &many, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(copies["files_read"], 24, "{copies}");
    assert_eq!(copies["new_chunks"], single["new_chunks"], "copies stored more chunks than one file: {copies}");
    assert_eq!(copies["new_bytes"], single["new_bytes"], "{copies}");
}

/// Sets an access time older than the modification time, which an ordinary read moves.
fn stale_atime(path: &Path) {
    let (atime, mtime) = (TimeSpec::new(1_000_000_000, 0), TimeSpec::new(1_100_000_000, 0));
    utimensat(None, path, &atime, &mtime, UtimensatFlags::NoFollowSymlink).unwrap();
}

#[test]
fn a_backup_leaves_access_times_as_they_were_and_records_them() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(src.join("mail/new")).unwrap();
    fs::write(src.join("mail/new/big"), noise(3 << 20, 1)).unwrap();
    fs::write(src.join("mail/new/small"), "unread\n").unwrap();
    fs::write(src.join(".tardis-excludes"), "*.tmp\n").unwrap();
    let paths: Vec<_> = ["", "mail", "mail/new", "mail/new/big", "mail/new/small", ".tardis-excludes"]
        .iter()
        .map(|p| src.join(p))
        .collect();
    // Children first: setting a file's times does not touch its directory's.
    for p in paths.iter().rev() {
        stale_atime(p);
    }
    let db = work.path().join("db");
    let (code, json, err) = backup(&db, "h", "pw", &src, &["--name", "one"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json["files_read"], 3, "{json}");
    for p in &paths {
        assert_eq!(fs::metadata(p).unwrap().atime(), 1_000_000_000, "the backup moved the atime of {}", p.display());
    }
    let out = work.path().join("out");
    regenerate(&db, "h", "pw", "one", &src, &out);
    for name in ["mail/new", "mail/new/big", "mail/new/small"] {
        assert_eq!(
            fs::metadata(out.join(name)).unwrap().atime(),
            1_000_000_000,
            "{name} was recorded with another atime"
        );
    }
    // An ordinary read does move it here, or this test proves nothing (a noatime mount).
    fs::read(src.join("mail/new/small")).unwrap();
    assert_ne!(fs::metadata(src.join("mail/new/small")).unwrap().atime(), 1_000_000_000, "reads keep atimes here");
}

#[test]
fn unchanged_tree_of_10000_files_reads_nothing_and_stores_little() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    for d in 0..100 {
        let dir = src.join(format!("d{d:03}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            fs::write(dir.join(format!("f{f:03}")), format!("file {d} {f}")).unwrap();
        }
    }
    let db = work.path().join("db");
    let (code, first, err) = backup(&db, "h", "pw", &src, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(first["files_read"], 10_000);
    let before = du(&db.join("h/segments"));
    let (code, second, err) = backup(&db, "h", "pw", &src, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(second["files_read"], 0, "{second}");
    assert_eq!(second["files"], 10_000);
    let grown = du(&db.join("h/segments")) - before;
    assert!(grown < 4096, "an unchanged backup stored {grown} bytes of events");
    eprintln!("unchanged 10,000-file backup added {grown} bytes to the log");
}

#[test]
fn sigkill_mid_backup_loses_nothing_and_the_next_run_reuses_stored_chunks() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let db = work.path().join("db");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("small"), "the first set").unwrap();
    let (code, _, err) = backup(&db, "h", "pw", &src, &["--name", "before"]);
    assert_eq!(code, 0, "{err}");
    let m_before = manifest(&src);
    // 48 files of 4 MiB of noise: enough to kill the backup in the middle.
    for i in 0..48u64 {
        fs::write(src.join(format!("big{i:02}")), noise(4 << 20, i + 1)).unwrap();
    }
    let mut child = Command::new(bin("tardis"))
        .args(["--local", "--db"])
        .arg(&db)
        .args(["--host", "h", "--password", "pw", "--name", "killed"])
        .arg(&src)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until a good part of the data is durable, then kill.
    let segs = db.join("h/segments");
    let base_size = du(&segs);
    loop {
        if du(&segs) > 100 << 20 {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("backup finished before it could be killed: {status}");
        }
        std::thread::yield_now();
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    let stored_by_killed = du(&segs);

    let (code, again, err) = backup(&db, "h", "pw", &src, &["--name", "after"]);
    assert_eq!(code, 0, "{err}");
    // The rerun sends at most what the killed run had not made durable, plus the one batch
    // that was in flight when it died (RELIABILITY C7): 4 MiB by default, up to 32 MiB allowed.
    let total = 48u64 * (4 << 20);
    let sent = again["new_bytes"].as_u64().unwrap();
    let durable = stored_by_killed - base_size;
    assert!(sent < total, "nothing was reused");
    assert!(
        sent <= total - durable + (33 << 20),
        "the rerun stored {sent} of {total} bytes again; {durable} were on disk"
    );
    eprintln!("killed after {durable} bytes; the rerun sent {sent} of {total} bytes");
    let sent = again["new_bytes"].as_u64().unwrap();
    assert!(
        sent < total - (40 << 20),
        "the rerun stored {sent} of {total} bytes again (killed run had {stored_by_killed})"
    );
    let out = work.path().join("out-before");
    regenerate(&db, "h", "pw", "before", &src, &out);
    assert_same(&m_before, &manifest(&out), "set before the kill");
    let out = work.path().join("out-after");
    regenerate(&db, "h", "pw", "after", &src, &out);
    assert_same(&manifest(&src), &manifest(&out), "set after the kill");
    let sets =
        run_s("tardis-tools", &["--db", db.to_str().unwrap(), "--host", "h", "--password", "pw", "sets", "--json"]);
    let sets = String::from_utf8_lossy(&sets.stdout);
    assert!(sets.lines().any(|l| l.contains("\"killed\"") && l.contains("\"incomplete\"")), "{sets}");
}

fn one_line_error(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success());
    assert_eq!(out.status.code(), Some(1), "{err}");
    err
}

#[test]
fn bad_input_fails_with_one_clear_line_and_damages_nothing() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let db = work.path().join("db");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), "data").unwrap();
    let (code, _, err) = backup(&db, "h", "right", &src, &["--name", "good"]);
    assert_eq!(code, 0, "{err}");
    let segs_before = du(&db.join("h/segments"));

    // Wrong password: stops before writing anything.
    let out = run_s(
        "tardis",
        &["--local", "--db", db.to_str().unwrap(), "--host", "h", "--password", "wrong", src.to_str().unwrap()],
    );
    let err = one_line_error(&out);
    assert!(err.contains("wrong password for host h"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(du(&db.join("h/segments")), segs_before);

    // Missing path.
    let out = run_s(
        "tardis",
        &["--local", "--db", db.to_str().unwrap(), "--host", "h", "--password", "right", "/nonexistent/path"],
    );
    let err = one_line_error(&out);
    assert!(err.contains("/nonexistent/path"), "{err}");

    // Unusable --db (a file, not a directory).
    let not_dir = work.path().join("plainfile");
    fs::write(&not_dir, "x").unwrap();
    let out = run_s("tardis", &["--local", "--db", not_dir.to_str().unwrap(), "--host", "h", src.to_str().unwrap()]);
    let err = one_line_error(&out);
    assert!(err.contains(not_dir.to_str().unwrap()), "{err}");

    // No password for an encrypted host, and a password for an unencrypted one.
    let out = run_s("tardis", &["--local", "--db", db.to_str().unwrap(), "--host", "h", src.to_str().unwrap()]);
    assert!(one_line_error(&out).contains("encrypted"));

    // Usage errors exit 2.
    let out = run_s("tardis", &["--local"]);
    assert_eq!(out.status.code(), Some(2));

    let out = work.path().join("out");
    regenerate(&db, "h", "right", "good", &src, &out);
    assert_eq!(fs::read(out.join("f")).unwrap(), b"data");
}

#[test]
fn full_disk_fails_the_backup_and_keeps_earlier_sets() {
    let work = tempfile::tempdir().unwrap();
    let db = work.path().join("db");
    fs::create_dir_all(&db).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"]).arg(&db).status().unwrap();
    assert!(mounted.success(), "mounting a small tmpfs needs root");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(&db);
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("small"), "fits").unwrap();
    let (code, _, err) = backup(&db, "h", "pw", &src, &["--name", "fits"]);
    assert_eq!(code, 0, "{err}");
    let m = manifest(&src);
    fs::write(src.join("too-big"), noise(12 << 20, 99)).unwrap();
    let (code, _, err) = backup(&db, "h", "pw", &src, &["--name", "too-big"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("disk full"), "{err}");
    fs::remove_file(src.join("too-big")).unwrap();
    let out = work.path().join("out");
    regenerate(&db, "h", "pw", "fits", &src, &out);
    assert_same(&m, &manifest(&out), "set before the disk filled up");
}

#[test]
fn keys_changes_the_password_without_rewriting_data() {
    let work = tempfile::tempdir().unwrap();
    let (src, db) = (work.path().join("src"), work.path().join("db"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), noise(400_000, 7)).unwrap();
    let (code, _, err) = backup(&db, "h", "old", &src, &["--name", "first"]);
    assert_eq!(code, 0, "{err}");
    let m1 = manifest(&src);
    let dbs = db.to_str().unwrap();
    let tools = |pw: &str, args: &[&str]| {
        let mut all = vec!["--db", dbs, "--host", "h", "--password", pw];
        all.extend(args);
        run_s("tardis-tools", &all)
    };
    let segs_before = du(&db.join("h/segments"));

    // A wrong current password, an empty new one and two options at once change nothing.
    let out = tools("wrong", &["keys", "--new-password", "new"]);
    assert!(one_line_error(&out).contains("wrong password for host h"));
    let empty = work.path().join("empty");
    fs::write(&empty, "\n").unwrap();
    let out = tools("old", &["keys", "--new-password-file", empty.to_str().unwrap()]);
    assert!(one_line_error(&out).contains("is empty"));
    let out = tools("old", &["keys", "--new-password", "a", "--new-password-file", empty.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let out = tools("old", &["keys"]);
    assert_eq!(out.status.code(), Some(2), "a new password is required");
    assert!(tools("old", &["sets"]).status.success(), "the old password still opens the host");

    let new_file = work.path().join("new-pw");
    fs::write(&new_file, "new secret\n").unwrap();
    let out = tools("old", &["keys", "--new-password-file", new_file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("changed the password of host h"));
    // One small event, not a rewrite of the data.
    let grown = du(&db.join("h/segments")) - segs_before;
    assert!(grown < 4096, "the segments grew by {grown} bytes");

    let out = tools("old", &["sets"]);
    assert!(one_line_error(&out).contains("wrong password for host h"));
    let (code, _, err) = backup(&db, "h", "old", &src, &[]);
    assert_ne!(code, 0, "the old password no longer backs up: {err}");
    // The same master key: the next backup finds its data stored, and the old set restores.
    let (code, s2, err) = backup(&db, "h", "new secret", &src, &["--name", "second"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(s2["files_read"].as_u64(), Some(0), "{s2}");
    let out = work.path().join("out");
    regenerate(&db, "h", "new secret", "first", &src, &out);
    assert_same(&m1, &manifest(&out), "first set under the new password");

    // A host made without a password has none to change.
    let out = run_s("tardis", &["--local", "--db", dbs, "--host", "plain", src.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run_s("tardis-tools", &["--db", dbs, "--host", "plain", "keys", "--new-password", "x"]);
    assert!(one_line_error(&out).contains("has no password to change"));
}

/// Reads `len` bytes of `path` at `offset`.
fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    fs::File::open(path).unwrap().read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn files_that_break_backup_tools_round_trip() {
    use std::os::unix::fs::FileExt;
    let work = tempfile::tempdir().unwrap();
    let (src, huge_dir, db) = (work.path().join("src"), work.path().join("huge"), work.path().join("db"));
    fs::create_dir_all(&src).unwrap();
    fs::create_dir_all(&huge_dir).unwrap();
    const MIB: usize = 1 << 20;
    // All zeros, written (not holes): chunks at the 4 MiB maximum, all the same.
    fs::write(src.join("zeros"), vec![0u8; 9 * MIB]).unwrap();
    // Zero runs that start and end on the chunker's size limits, between incompressible data.
    let mut runs = noise(4 * MIB, 1);
    runs.extend(vec![0u8; 4 * MIB]);
    runs.extend(noise(256 << 10, 2));
    runs.extend(vec![0u8; 256 << 10]);
    runs.extend(noise(MIB + 1, 3));
    fs::write(src.join("zero-runs"), &runs).unwrap();
    // Sizes on and next to the chunk limits.
    for (name, len) in [("max", 4 * MIB), ("max+1", 4 * MIB + 1), ("min-1", (256 << 10) - 1), ("one", 1)] {
        fs::write(src.join(name), noise(len, len as u64)).unwrap();
    }
    // A name of 255 bytes, and a path of about 3.9 KiB below the source.
    let long_name = "n".repeat(255);
    fs::write(src.join(&long_name), "longest name").unwrap();
    let mut deep = src.clone();
    while deep.as_os_str().len() < 3_700 {
        deep = deep.join("d".repeat(200));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("at-the-bottom"), "deep").unwrap();
    // 5 GiB, nearly all hole, with data at the start, across the 4 GiB mark and at the end.
    let huge = huge_dir.join("huge.img");
    let f = fs::File::create(&huge).unwrap();
    f.set_len(5 << 30).unwrap();
    let pieces: [(u64, Vec<u8>); 3] =
        [(0, noise(100_000, 4)), ((4 << 30) - 50_000, noise(100_000, 5)), ((5 << 30) - 10, b"last bytes".to_vec())];
    for (at, data) in &pieces {
        f.write_all_at(data, *at).unwrap();
    }
    drop(f);
    let want = manifest(&src);

    let paths = [src.to_str().unwrap(), huge_dir.to_str().unwrap()];
    let out = on_host(&db, "tardis", &["--local", "--name", "edges", "--json", paths[0], paths[1]]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(stats["bytes_read"].as_u64().unwrap() < 1 << 30, "the holes were not read: {stats}");

    let restored = work.path().join("out");
    regenerate(&db, "h", "pw", "edges", &src, &restored);
    assert_same(&want, &manifest(&restored), "edge-case files");
    let restored_huge = work.path().join("out-huge.img");
    regenerate(&db, "h", "pw", "edges", &huge, &restored_huge);
    let md = fs::metadata(&restored_huge).unwrap();
    assert_eq!(md.len(), 5 << 30);
    assert!(md.blocks() * 512 < 64 << 20, "restored with its holes: {} blocks", md.blocks());
    for (at, data) in &pieces {
        assert_eq!(&read_at(&restored_huge, *at, data.len()), data, "the data at {at}");
    }
    // Between the pieces, zeros: a sample either side of the 4 GiB mark.
    assert_eq!(read_at(&restored_huge, (4 << 30) - 200_000, 100_000), vec![0u8; 100_000]);
    assert_eq!(read_at(&restored_huge, (4 << 30) + 100_000, 100_000), vec![0u8; 100_000]);

    // Verify reads every chunk back.
    let v = on_host(&db, "tardis-tools", &["verify", "--read-data"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}
