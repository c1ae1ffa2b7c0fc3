//! `tardisfs` end to end: real FUSE mounts of real backups, as root.
//!
//! Every test needs `/dev/fuse` and root. Without them a test skips with a message, unless
//! `TARDIS_REQUIRE_FUSE=1` (set by `.ci/run`), in which case it fails: CI must never pass by
//! skipping the mount tests.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tardis_tests::{assert_same, bin, change_every_kind, every_kind_tree, manifest, noise, run, run_s, Entry};

/// How long a mount may take to appear or a process to exit before the test fails.
const LIMIT: Duration = Duration::from_secs(30);
const EROFS: i32 = 30;

/// Whether the mount tests can run here; panics if they cannot but must.
fn fuse_usable() -> bool {
    let problem = if !Path::new("/dev/fuse").exists() {
        Some("/dev/fuse is missing")
    } else if !nix::unistd::geteuid().is_root() {
        Some("the mount tests need root")
    } else {
        None
    };
    let Some(problem) = problem else { return true };
    assert!(
        std::env::var("TARDIS_REQUIRE_FUSE").as_deref() != Ok("1"),
        "{problem}, and TARDIS_REQUIRE_FUSE=1 requires the FUSE tests to run"
    );
    eprintln!("SKIPPED: {problem}; the FUSE mount tests did not run");
    false
}

/// Whether `path` is a mount point now, according to `/proc/self/mountinfo`.
fn is_mounted(path: &Path) -> bool {
    let info = fs::read("/proc/self/mountinfo").expect("read mountinfo");
    let want = path.as_os_str().as_bytes();
    info.split(|b| *b == b'\n').any(|line| {
        // Field 5 is the mount point, with space, tab, newline and backslash as octal escapes.
        line.split(|b| *b == b' ').nth(4).is_some_and(|m| unescape(m) == want)
    })
}

fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 3 < field.len() && field[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let oct = std::str::from_utf8(&field[i + 1..i + 4]).expect("digits");
            out.push(u8::from_str_radix(oct, 8).expect("octal escape"));
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

/// Polls `cond` until it holds, failing the test after [`LIMIT`].
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < LIMIT, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_exit(child: &mut Child) -> ExitStatus {
    let mut status = None;
    wait_until("tardisfs exits", || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    status.expect("exited")
}

/// A mount made by the test; the guard unmounts it (lazily, so it cannot hang) and ends the
/// `tardisfs` process even when the test fails halfway.
struct Mounted {
    mnt: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Mounted {
    /// Runs `tardisfs -o OPTIONS -f MNT` and waits until the mount appears.
    fn foreground(options: &str, mnt: &Path, log: &Path) -> Mounted {
        Mounted::foreground_with(&[], options, mnt, log)
    }

    /// Like [`Mounted::foreground`], with more arguments before the mount point.
    fn foreground_with(args: &[String], options: &str, mnt: &Path, log: &Path) -> Mounted {
        let child = Command::new(bin("tardisfs"))
            .args(["-o", options, "-f"])
            .args(args)
            .arg(mnt)
            .env_remove("TARDIS_DB")
            .env_remove("TARDIS_HOST")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log).expect("log file"))
            .spawn()
            .expect("start tardisfs");
        let mut m = Mounted { mnt: mnt.to_path_buf(), child: Some(child), log: log.to_path_buf() };
        let start = Instant::now();
        while !is_mounted(mnt) {
            if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().expect("try_wait")) {
                panic!("tardisfs exited with {status} before mounting: {}", m.log());
            }
            assert!(start.elapsed() < LIMIT, "the mount did not appear: {}", m.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        m
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("a foreground tardisfs")
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let ok = Command::new("fusermount3").args(["-u", "-z"]).arg(&self.mnt).status().is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Content of the files that the concurrent readers check.
fn par_content(i: u64) -> Vec<u8> {
    noise(1_500_000 + i as usize * 123_457, 100 + i)
}

/// The shared tree of every kind of entry (with a 5 MB file spanning chunks), plus eight files
/// for the concurrent readers.
fn build_tree(root: &Path) {
    every_kind_tree(root, 5_000_000);
    fs::create_dir(root.join("par")).unwrap();
    for i in 0..8 {
        fs::write(root.join(format!("par/f{i}")), par_content(i)).unwrap();
    }
}

fn backup(db: &Path, src: &Path, name: &str) {
    let out = run(
        "tardis",
        &[
            "--local".as_ref(),
            "--db".as_ref(),
            db.as_os_str(),
            "--host".as_ref(),
            "h".as_ref(),
            "--password".as_ref(),
            "pw".as_ref(),
            "--name".as_ref(),
            name.as_ref(),
            src.as_os_str(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "backup {name}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The manifest of `dir` in the mount, without the `user.tardis.*` attributes the mount adds.
fn mounted_manifest(dir: &Path) -> BTreeMap<Vec<u8>, Entry> {
    let mut m = manifest(dir);
    for e in m.values_mut() {
        e.xattrs.retain(|k, _| !k.starts_with(b"user.tardis."));
    }
    m
}

/// `base` joined with the absolute path `abs` (as it appears inside a set).
fn inside(base: &Path, abs: &Path) -> PathBuf {
    base.join(abs.strip_prefix("/").expect("absolute path"))
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    n.sort();
    n
}

fn xattr_str(path: &Path, name: &str) -> String {
    let v = xattr::get(path, name).unwrap_or_else(|e| panic!("getxattr {name} of {}: {e}", path.display()));
    String::from_utf8(v.unwrap_or_else(|| panic!("{} has no {name}", path.display()))).unwrap()
}

fn erofs(what: &str, r: std::io::Result<impl Sized>) {
    match r {
        Ok(_) => panic!("{what} succeeded on the read-only mount"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(EROFS), "{what}: {e}"),
    }
}

#[test]
fn two_sets_read_back_through_the_mount_as_they_were() {
    if !fuse_usable() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let db = work.path().join("db");
    let mnt = work.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    build_tree(&src);
    let m1 = manifest(&src);
    backup(&db, &src, "first");
    change_every_kind(&src);
    let m2 = manifest(&src);
    backup(&db, &src, "second");

    let opts = format!("database={},host=h,password=pw", db.display());
    let mut mount = Mounted::foreground(&opts, &mnt, &work.path().join("tardisfs.log"));

    // The root: a directory per set, `latest`, and the hidden history view.
    assert_eq!(names(&mnt), [".versions", "first", "latest", "second"]);
    assert_eq!(fs::read_link(mnt.join("latest")).unwrap(), Path::new("second"));
    assert_eq!(names(&mnt.join("latest")), names(&mnt.join("second")));

    // Each set is the tree as it was at its backup: content, kind, mode, owners, size, mtime,
    // device numbers, symlink targets, xattrs (ACLs included), hard-link groups, sparseness.
    for (set, expected) in [("first", &m1), ("second", &m2)] {
        assert_same(expected, &mounted_manifest(&inside(&mnt.join(set), &src)), set);
    }
    let first = inside(&mnt.join("first"), &src);
    let second = inside(&mnt.join("second"), &src);

    // Extended attributes, the stored ones and the mount's own.
    assert_eq!(xattr_str(&first.join("plain.txt"), "user.comment"), "a comment");
    assert_eq!(xattr_str(&second.join("plain.txt"), "user.comment"), "changed comment");
    assert_eq!(xattr_str(&second.join("plain.txt"), "user.tardis.since"), "second");
    assert_eq!(xattr_str(&second.join("dir/big.bin"), "user.tardis.since"), "first");
    assert_eq!(xattr_str(&mnt.join("second"), "user.tardis.priority"), "0");
    let time = xattr_str(&mnt.join("first"), "user.tardis.time");
    assert!(time.len() >= 20 && time.as_bytes()[..4].iter().all(u8::is_ascii_digit), "{time}");
    let getfattr = Command::new("getfattr").args(["-d", "-m", "-"]).arg(second.join("plain.txt")).output().unwrap();
    let shown = String::from_utf8_lossy(&getfattr.stdout);
    assert!(shown.contains("user.comment=\"changed comment\""), "{shown}");
    assert!(shown.contains("user.tardis.since=\"second\""), "{shown}");
    let getfattr = Command::new("getfattr").args(["-d", "-m", "-"]).arg(first.join("dir/big.bin")).output().unwrap();
    assert!(String::from_utf8_lossy(&getfattr.stdout).contains("system.posix_acl_access"));

    // Nothing can be changed.
    erofs("creating a file", File::create(second.join("new-file")));
    erofs("creating a file at the root", File::create(mnt.join("new-set")));
    erofs("opening for writing", fs::OpenOptions::new().write(true).open(second.join("plain.txt")));
    erofs("mkdir", fs::create_dir(second.join("newdir2")));
    erofs("unlink", fs::remove_file(second.join("plain.txt")));
    erofs("rmdir", fs::remove_dir(second.join("newdir")));
    erofs("rename", fs::rename(second.join("plain.txt"), second.join("p2")));
    erofs("chmod", fs::set_permissions(second.join("plain.txt"), fs::Permissions::from_mode(0o777)));
    erofs("symlink", symlink("x", second.join("l2")));
    erofs("setxattr", xattr::set(second.join("plain.txt"), "user.comment", b"no"));
    erofs("removexattr", xattr::remove(second.join("plain.txt"), "user.comment"));

    // The history view: each distinct version of a path, named by the set that first has it.
    let versions = inside(&mnt.join(".versions"), &src);
    assert_eq!(names(&versions.join("plain.txt")), ["first", "second"]);
    assert_eq!(fs::read(versions.join("plain.txt/first")).unwrap(), b"hello tardis\n");
    assert_eq!(fs::read(versions.join("plain.txt/second")).unwrap(), b"hello again, tardis\n");
    assert_eq!(names(&versions.join("dir/big.bin")), ["first"], "unchanged: one version");
    assert_eq!(fs::read(versions.join("dir/big.bin/first")).unwrap(), noise(5_000_000, 5));
    assert_eq!(names(&versions.join("empty")), ["first"], "deleted in the second set");
    assert_eq!(names(&versions.join("new.txt")), ["second"]);
    assert!(versions.join("link/first").is_symlink() && versions.join("link/second").is_dir());
    assert!(!versions.join("never-existed").exists());

    // A random read in the middle of a multi-chunk file.
    let big = File::open(first.join("dir/big.bin")).unwrap();
    let mut buf = vec![0u8; 100_000];
    big.read_exact_at(&mut buf, 3_000_001).unwrap();
    assert_eq!(buf, noise(5_000_000, 5)[3_000_001..3_100_001]);
    drop(big);

    // Eight threads reading different files, in unaligned pieces and whole, get their bytes.
    std::thread::scope(|s| {
        for i in 0..8u64 {
            let path = first.join(format!("par/f{i}"));
            s.spawn(move || {
                let want = par_content(i);
                let f = File::open(&path).unwrap();
                let mut off = 0usize;
                while off < want.len() {
                    let n = (77_777 + i as usize * 1000).min(want.len() - off);
                    let mut piece = vec![0u8; n];
                    f.read_exact_at(&mut piece, off as u64).unwrap();
                    assert!(piece == want[off..off + n], "{} at {off}", path.display());
                    off += n;
                }
                assert!(fs::read(&path).unwrap() == want, "{}", path.display());
            });
        }
    });

    // Unmounting while a reader holds a file open neither hangs nor loses the mount's state:
    // a plain unmount is refused, a lazy one detaches, and tardisfs exits when the file closes.
    let mut reader = File::open(second.join("dir/big.bin")).unwrap();
    let mut head = vec![0u8; 4096];
    reader.read_exact(&mut head).unwrap();
    let busy = Command::new("umount").arg(&mnt).stderr(Stdio::null()).status().unwrap();
    assert!(!busy.success(), "unmount with an open file should be refused");
    assert!(is_mounted(&mnt));
    let lazy = Command::new("umount").arg("-l").arg(&mnt).status().unwrap();
    assert!(lazy.success());
    assert!(!is_mounted(&mnt));
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest); // served or refused, but it returns
    drop(reader);
    let status = wait_exit(mount.child());
    assert!(status.success(), "tardisfs exited with {status}: {}", mount.log());
}

#[test]
fn background_mount_signals_and_bad_input() {
    if !fuse_usable() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let db = work.path().join("db");
    let mnt = work.path().join("mnt");
    fs::create_dir_all(&src).unwrap();
    fs::create_dir(&mnt).unwrap();
    fs::write(src.join("f"), "data").unwrap();
    backup(&db, &src, "only");
    let tardisfs = |opts: &str, extra: &[&str]| {
        let mut args = vec!["-o", opts];
        args.extend(extra);
        args.push(mnt.to_str().unwrap());
        run_s("tardisfs", &args)
    };
    let dbs = db.display();

    // A wrong password, a missing repository and a bad option fail with one clear line and
    // leave nothing mounted.
    let out = tardisfs(&format!("database={dbs},host=h,password=wrong"), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("wrong password for host h"), "{err}");
    assert!(!is_mounted(&mnt));
    let missing = work.path().join("no-such-db");
    let out = tardisfs(&format!("database={},host=h,password=pw", missing.display()), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    assert!(!is_mounted(&mnt));
    let out = tardisfs(&format!("database={dbs},host=h,colour=blue"), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!is_mounted(&mnt));

    // Without -f, tardisfs returns once the mount works, and serves it in the background
    // until unmounted. The password comes from a file here.
    let pwfile = work.path().join("pw");
    fs::write(&pwfile, "pw\n").unwrap();
    let out = tardisfs(&format!("database={dbs},host=h,password_file={}", pwfile.display()), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let guard = Mounted { mnt: mnt.clone(), child: None, log: work.path().join("none") };
    assert!(is_mounted(&mnt), "the mount is up when tardisfs returns");
    assert_eq!(fs::read(inside(&mnt.join("only"), &src).join("f")).unwrap(), b"data");
    let u = Command::new("fusermount3").arg("-u").arg(&mnt).status().unwrap();
    assert!(u.success());
    assert!(!is_mounted(&mnt));
    drop(guard);
    wait_until("the background tardisfs exits", || !tardisfs_running(&mnt));

    // SIGTERM to a foreground tardisfs unmounts and exits cleanly.
    let opts = format!("database={dbs},host=h,password=pw");
    let mut mount = Mounted::foreground(&opts, &mnt, &work.path().join("tardisfs.log"));
    let pid = nix::unistd::Pid::from_raw(mount.child().id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = wait_exit(mount.child());
    assert!(status.success(), "tardisfs exited with {status}: {}", mount.log());
    assert!(!is_mounted(&mnt));
    drop(mount);

    // SIGTERM while a file is open: the mount is detached at once, the open file keeps
    // working, and tardisfs exits cleanly when it is closed.
    let mut mount = Mounted::foreground(&opts, &mnt, &work.path().join("tardisfs2.log"));
    let mut open = File::open(inside(&mnt.join("only"), &src).join("f")).unwrap();
    let pid = nix::unistd::Pid::from_raw(mount.child().id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_until("the mount is detached", || !is_mounted(&mnt));
    assert!(mount.child().try_wait().unwrap().is_none(), "tardisfs serves the open file until it is closed");
    let mut data = Vec::new();
    open.read_to_end(&mut data).unwrap();
    assert_eq!(data, b"data");
    drop(open);
    let status = wait_exit(mount.child());
    assert!(status.success(), "tardisfs exited with {status}: {}", mount.log());
}

/// Whether a `tardisfs` process serving `mnt` is still running.
fn tardisfs_running(mnt: &Path) -> bool {
    let Ok(procs) = fs::read_dir("/proc") else { return false };
    procs.flatten().any(|p| {
        let Ok(cmd) = fs::read(p.path().join("cmdline")) else { return false };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        args.first().is_some_and(|a| a.ends_with(b"tardisfs")) && args.contains(&mnt.as_os_str().as_bytes())
    })
}

#[test]
fn damaged_chunks_read_as_eio_never_as_zeros() {
    if !fuse_usable() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let db = work.path().join("db");
    let mnt = work.path().join("mnt");
    fs::create_dir_all(&src).unwrap();
    fs::create_dir(&mnt).unwrap();
    let content = noise(8_000_000, 77);
    fs::write(src.join("big"), &content).unwrap();
    backup(&db, &src, "one");
    // Flip a byte in the middle of the segment: almost all of it is chunk bodies.
    let seg = fs::read_dir(db.join("h/segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension() == Some(OsStr::new("seg")))
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .expect("a segment");
    let mut bytes = fs::read(&seg).unwrap();
    let at = bytes.len() * 6 / 10;
    bytes[at] ^= 0xff;
    fs::write(&seg, &bytes).unwrap();

    let opts = format!("database={},host=h,password=pw", db.display());
    let mount = Mounted::foreground(&opts, &mnt, &work.path().join("tardisfs.log"));
    let path = inside(&mnt.join("one"), &src).join("big");
    let err = fs::read(&path).expect_err("reading a damaged file must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Piece by piece: every piece either reads its true bytes or fails with EIO.
    let f = File::open(&path).unwrap();
    let mut failed = 0;
    for off in (0..content.len()).step_by(1 << 16) {
        let n = (1 << 16).min(content.len() - off);
        let mut piece = vec![0u8; n];
        match f.read_exact_at(&mut piece, off as u64) {
            Ok(()) => assert!(piece == content[off..off + n], "wrong bytes at {off}"),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "at {off}: {e}");
                failed += 1;
            }
        }
    }
    assert!(failed > 0 && failed < content.len() / (1 << 16), "{failed} pieces failed");
    assert!(mount.log().contains("checksum"), "the damage is logged: {}", mount.log());
}

#[test]
fn a_remote_mount_shows_the_sets_of_a_tardisd() {
    if !fuse_usable() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (src, kh, mnt) = (work.path().join("src"), work.path().join("known_hosts"), work.path().join("mnt"));
    build_tree(&src);
    fs::create_dir(&mnt).unwrap();
    let d = tardis_tests::server::Daemon::start(&work.path().join("srv"), "AllowNewHosts = yes");
    let mut args = d.client_args("h", "pw", &kh);
    args.extend(["--create".into(), "--name".into(), "first".into(), src.display().to_string()]);
    let r = Command::new(bin("tardis")).args(&args).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let m1 = manifest(&src);

    let args: Vec<String> = d.client_args("h", "pw", &kh).into_iter().filter(|a| a != "--host" && a != "h").collect();
    let mut m = Mounted::foreground_with(&args, "host=h", &mnt, &work.path().join("tardisfs.log"));
    assert_eq!(names(&mnt), [".versions", "first", "latest"]);
    assert_same(&m1, &mounted_manifest(&inside(&mnt.join("first"), &src)), "set first through a remote mount");
    // Readers in parallel, each over its own QUIC streams.
    std::thread::scope(|s| {
        for i in 0..8u64 {
            let p = inside(&mnt.join("first"), &src).join(format!("par/f{i}"));
            s.spawn(move || assert!(fs::read(&p).unwrap() == par_content(i), "par/f{i} over the network"));
        }
    });
    let st = Command::new("fusermount3").arg("-u").arg(&mnt).status().unwrap();
    assert!(st.success());
    assert!(wait_exit(m.child()).success(), "{}", m.log());
}

/// A scratch directory with `src/` and `mnt/` and the path for a repository, or `None` when
/// FUSE cannot be used here (see `fuse_usable`).
fn local_setup() -> Option<(tempfile::TempDir, PathBuf, PathBuf, PathBuf)> {
    if !fuse_usable() {
        return None;
    }
    let work = tempfile::tempdir().unwrap();
    let (src, db, mnt) = (work.path().join("src"), work.path().join("db"), work.path().join("mnt"));
    fs::create_dir_all(&src).unwrap();
    fs::create_dir(&mnt).unwrap();
    Some((work, src, db, mnt))
}

#[test]
fn purged_sets_leave_the_mount_and_compacted_sets_read_back() {
    let Some((work, src, db, mnt)) = local_setup() else { return };
    let mut kept = BTreeMap::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        fs::write(src.join("data"), noise(300_000, i as u64)).unwrap();
        backup(&db, &src, name);
        kept.insert(*name, manifest(&src));
    }
    let tools = |args: &[&str]| {
        let mut all = vec!["--db", db.to_str().unwrap(), "--host", "h", "--password", "pw"];
        all.extend_from_slice(args);
        let out = run_s("tardis-tools", &all);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    tools(&["purge", "--set", "b"]);
    kept.remove("b");
    tools(&["compact", "--threshold", "0.9"]);

    let opts = format!("database={},host=h,password=pw", db.display());
    let _mount = Mounted::foreground(&opts, &mnt, &work.path().join("tardisfs.log"));
    assert_eq!(names(&mnt), [".versions", "a", "c", "latest"], "the purged set is gone");
    for (set, expected) in &kept {
        assert_same(expected, &mounted_manifest(&inside(&mnt.join(set), &src)), set);
    }
}

/// Versions of a file stored as a chain of deltas read back exactly through the mount, in any
/// order and from several readers at once (the chunk cache shares their bases).
#[test]
fn versions_stored_as_delta_chains_read_back_through_the_mount() {
    let Some((work, src, db, mnt)) = local_setup() else { return };
    let mut data = noise(3 << 20, 40);
    let mut versions = Vec::new();
    for i in 0..4u64 {
        if i > 0 {
            data[(i as usize) * 300_000..][..4096].copy_from_slice(&noise(4096, 40 + i));
        }
        fs::write(src.join("disk.img"), &data).unwrap();
        backup(&db, &src, &format!("v{i}"));
        versions.push(data.clone());
    }
    let opts = format!("database={},host=h,password=pw", db.display());
    let _mount = Mounted::foreground(&opts, &mnt, &work.path().join("tardisfs.log"));
    let path = |i: usize| inside(&mnt.join(format!("v{i}")), &src.join("disk.img"));
    for i in [3, 1, 2, 0] {
        assert!(fs::read(path(i)).unwrap() == versions[i], "v{i} reads back exactly");
    }
    std::thread::scope(|s| {
        for (i, want) in versions.iter().enumerate() {
            let p = path(i);
            s.spawn(move || assert!(fs::read(&p).unwrap() == *want, "v{i} read concurrently"));
        }
    });
}

/// A repository whose segments are in an S3-compatible bucket mounts like a local one: the
/// mount reads the segments back with ranged GETs through the bucket's cache.
#[test]
fn a_bucket_backed_repository_mounts_and_reads_back() {
    let Some(s3s) = tardis_tests::s3::program() else { return };
    let Some((work, src, db, mnt)) = local_setup() else { return };
    let store = tardis_tests::s3::S3Server::start(&s3s, &work.path().join("s3"));
    build_tree(&src);
    backup(&db, &src, "local");
    let m1 = manifest(&src);
    let cfg = work.path().join("s3.cfg");
    fs::write(&cfg, store.settings("m")).unwrap();
    let args = ["--db", db.to_str().unwrap(), "--host", "h", "migrate", "--config", cfg.to_str().unwrap()];
    let out = run_s("tardis-tools", &args);
    assert!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
    fs::write(src.join("plain.txt"), "in the bucket\n").unwrap();
    backup(&db, &src, "bucket");
    let m2 = manifest(&src);
    assert!(store.segments("m", "h").len() >= 2);

    let opts = format!("database={},host=h,password=pw", db.display());
    let _mount = Mounted::foreground(&opts, &mnt, &work.path().join("tardisfs.log"));
    assert_same(&m1, &mounted_manifest(&inside(&mnt.join("local"), &src)), "first set, from the bucket");
    assert_same(&m2, &mounted_manifest(&inside(&mnt.join("bucket"), &src)), "second set, from the bucket");
}
