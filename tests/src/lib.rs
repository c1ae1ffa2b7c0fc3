//! Helpers for the end-to-end tests: running the built programs, and describing a file tree
//! (content hashes and every piece of restorable metadata) so two trees can be compared.
//!
//! The programs are the workspace's binaries next to the test executable (`target/<profile>/`);
//! `cargo test --workspace` and `cargo nextest run --workspace` build them first.
//!
//! Lossy links: [`relay`] impairs UDP between a client and a server on loopback (delay, jitter,
//! reordering, duplication, loss, rate caps, outages); [`netns`] makes kernel-level loss and rate
//! limits between two network namespaces.

pub mod netns;
pub mod relay;

pub mod s3;
pub mod server;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Path of a workspace binary built alongside the tests.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let p = dir.join(name);
    assert!(p.exists(), "{} is not built; run the tests with `cargo test --workspace` (or nextest)", p.display());
    p
}

/// Runs a program to completion with the given arguments.
pub fn run(name: &str, args: &[&OsStr]) -> Output {
    Command::new(bin(name))
        .args(args)
        .env_remove("TARDIS_DB")
        .env_remove("TARDIS_HOST")
        .output()
        .expect("program starts")
}

/// Shorthand for string arguments.
pub fn run_s(name: &str, args: &[&str]) -> Output {
    let a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    run(name, &a)
}

/// 2026-03-01 00:00:00 UTC: the clock (`TARDIS_NOW`) of tests that name sets by date.
pub const MARCH_1: i64 = 1_772_323_200;

/// Runs a program on host `h` (password `pw`) of the repository `db`, at [`MARCH_1`] in UTC.
pub fn on_host(db: &Path, program: &str, args: &[&str]) -> Output {
    host_command(db, program).args(args).output().expect("program starts")
}

/// The command [`on_host`] runs, before its own arguments, for callers that add to it.
pub fn host_command(db: &Path, program: &str) -> Command {
    let mut cmd = Command::new(bin(program));
    cmd.arg("--db")
        .arg(db)
        .args(["--host", "h", "--password", "pw"])
        .env_remove("TARDIS_DB")
        .env_remove("TARDIS_HOST")
        .env("TARDIS_NOW", MARCH_1.to_string())
        .env("TZ", "UTC");
    cmd
}

/// The standard output of a program that must have succeeded.
pub fn ok(out: Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "exit {:?}: {text}{}", out.status.code(), String::from_utf8_lossy(&out.stderr));
    text
}

/// Everything Tardis promises to restore about one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, i64),
    pub rdev: u64,
    pub content: Option<String>,
    pub target: Option<Vec<u8>>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Other paths (relative) of the same hard-link group, sorted.
    pub links: Vec<Vec<u8>>,
    /// Whether the file has holes (allocated less than its size).
    pub sparse: bool,
}

/// Describes the tree below `root`, keyed by relative path (raw bytes; "" is the root itself).
/// Sockets are left out: they are never backed up.
pub fn manifest(root: &Path) -> BTreeMap<Vec<u8>, Entry> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<Vec<u8>>> = BTreeMap::new();
    walk(root, root, &mut out, &mut inodes);
    for group in inodes.values().filter(|g| g.len() > 1) {
        for p in group {
            let e = out.get_mut(p).expect("entry of the group");
            e.links = group.iter().filter(|q| *q != p).cloned().collect();
        }
    }
    out
}

fn walk(root: &Path, path: &Path, out: &mut BTreeMap<Vec<u8>, Entry>, inodes: &mut BTreeMap<(u64, u64), Vec<Vec<u8>>>) {
    let md = fs::symlink_metadata(path).expect("lstat");
    let ft = md.file_type();
    if ft.is_socket() {
        return;
    }
    let rel = path.strip_prefix(root).expect("below root").as_os_str().as_bytes().to_vec();
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_fifo() {
        'p'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else {
        '-'
    };
    let content = (kind == '-').then(|| blake3::hash(&fs::read(path).expect("read file")).to_hex().to_string());
    let target = (kind == 'l').then(|| fs::read_link(path).expect("readlink").as_os_str().as_bytes().to_vec());
    let mut xattrs = BTreeMap::new();
    if let Ok(names) = xattr::list(path) {
        for n in names {
            if let Ok(Some(v)) = xattr::get(path, &n) {
                xattrs.insert(n.as_bytes().to_vec(), v);
            }
        }
    }
    if kind == '-' && md.nlink() > 1 {
        inodes.entry((md.dev(), md.ino())).or_default().push(rel.clone());
    }
    out.insert(
        rel,
        Entry {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            size: if kind == 'd' { 0 } else { md.size() },
            mtime: (md.mtime(), md.mtime_nsec()),
            rdev: md.rdev(),
            content,
            target,
            xattrs,
            links: Vec::new(),
            sparse: kind == '-' && md.blocks() * 512 < md.size(),
        },
    );
    if kind == 'd' {
        let mut names: Vec<_> = fs::read_dir(path).expect("list").map(|e| e.expect("entry").file_name()).collect();
        names.sort();
        for n in names {
            walk(root, &path.join(n), out, inodes);
        }
    }
}

/// Asserts two manifests are equal, listing every differing path.
pub fn assert_same(expected: &BTreeMap<Vec<u8>, Entry>, actual: &BTreeMap<Vec<u8>, Entry>, what: &str) {
    let mut diffs = Vec::new();
    for (p, e) in expected {
        match actual.get(p) {
            None => diffs.push(format!("missing {}", String::from_utf8_lossy(p))),
            Some(a) if a != e => diffs.push(format!("{}: expected {e:?}\n   got {a:?}", String::from_utf8_lossy(p))),
            _ => {}
        }
    }
    for p in actual.keys().filter(|p| !expected.contains_key(*p)) {
        diffs.push(format!("unexpected {}", String::from_utf8_lossy(p)));
    }
    assert!(diffs.is_empty(), "{what}: {} differences:\n{}", diffs.len(), diffs.join("\n"));
}

/// Total size of the files below `dir`.
pub fn du(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let md = e.metadata().expect("metadata");
            total += if md.is_dir() { du(&e.path()) } else { md.len() };
        }
    }
    total
}

/// `len` bytes that do not compress (xorshift64* output), different for every `seed`.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Sets a path's access and modification times (not following a final symlink).
pub fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    let ts = nix::sys::time::TimeSpec::new(sec, nsec);
    nix::sys::stat::utimensat(None, path, &ts, &ts, nix::sys::stat::UtimensatFlags::NoFollowSymlink)
        .expect("utimensat");
}

/// A tree with every kind of entry Tardis saves: files (empty, small, one of `big_len` bytes of
/// noise spanning chunks, a sparse one), directories, symlinks (one dangling), a hard link, a
/// FIFO, a device node, a name that is not UTF-8, private and set-uid modes, another owner,
/// xattrs, a POSIX ACL and nanosecond times. Needs root.
pub fn every_kind_tree(root: &Path, big_len: usize) {
    use std::io::Write as _;
    use std::os::unix::fs::{symlink, PermissionsExt};
    fs::create_dir_all(root.join("dir/deeper")).expect("mkdir");
    fs::write(root.join("plain.txt"), "hello tardis\n").expect("write");
    fs::write(root.join("dir/deeper/nested.txt"), "nested ".repeat(1000)).expect("write");
    fs::write(root.join("empty"), "").expect("write");
    fs::write(root.join("dir/big.bin"), noise(big_len, 5)).expect("write");
    // Sparse: 1 MiB of data, a 20 MiB hole, then more data.
    let mut f = fs::File::create(root.join("sparse.img")).expect("create");
    f.write_all(&vec![7u8; 1 << 20]).expect("write");
    f.set_len(21 << 20).expect("set_len");
    drop(f);
    let f = fs::OpenOptions::new().append(true).open(root.join("sparse.img")).expect("open");
    (&f).write_all(b"tail data").expect("write");
    symlink("plain.txt", root.join("link")).expect("symlink");
    symlink("/nonexistent/target", root.join("dangling")).expect("symlink");
    fs::hard_link(root.join("plain.txt"), root.join("dir/hardlink")).expect("link");
    nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o640)).expect("mkfifo");
    nix::sys::stat::mknod(
        &root.join("null-dev"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .expect("mknod (needs root)");
    fs::write(root.join(OsStr::from_bytes(b"latin1-\xe9t\xe9")), "not utf-8 name").expect("write");
    fs::write(root.join("secret"), "mode 600").expect("write");
    fs::set_permissions(root.join("secret"), fs::Permissions::from_mode(0o600)).expect("chmod");
    nix::unistd::chown(&root.join("secret"), Some(1234.into()), Some(5678.into())).expect("chown (needs root)");
    fs::write(root.join("setuid"), "suid").expect("write");
    fs::set_permissions(root.join("setuid"), fs::Permissions::from_mode(0o4755)).expect("chmod");
    xattr::set(root.join("plain.txt"), "user.comment", b"a comment").expect("setxattr");
    xattr::set(root.join("dir"), "user.dirattr", b"\x00\x01binary").expect("setxattr");
    let acl = Command::new("setfacl")
        .args(["-m", "u:1234:r"])
        .arg(root.join("dir/big.bin"))
        .status()
        .expect("setfacl (package acl)");
    assert!(acl.success());
    set_mtime(&root.join("plain.txt"), 1_600_000_000, 123_456_789);
    set_mtime(&root.join("link"), 1_500_000_000, 987_654_321);
}

/// Changes of every kind to [`every_kind_tree`]: an edit, a deletion, a rename, new entries,
/// changed xattrs and modes, and a symlink that became a directory.
pub fn change_every_kind(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fs::write(root.join("plain.txt"), "hello again, tardis\n").expect("write");
    fs::remove_file(root.join("empty")).expect("rm");
    fs::rename(root.join("dir/deeper"), root.join("moved")).expect("rename");
    fs::write(root.join("new.txt"), "brand new").expect("write");
    fs::create_dir(root.join("newdir")).expect("mkdir");
    fs::write(root.join("newdir/inside"), "x".repeat(5000)).expect("write");
    xattr::set(root.join("plain.txt"), "user.comment", b"changed comment").expect("setxattr");
    xattr::remove(root.join("dir"), "user.dirattr").expect("removexattr");
    fs::set_permissions(root.join("secret"), fs::Permissions::from_mode(0o640)).expect("chmod");
    fs::remove_file(root.join("link")).expect("rm");
    fs::create_dir(root.join("link")).expect("mkdir");
}
