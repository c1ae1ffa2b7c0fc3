//! Helpers for the end-to-end tests: running the built programs, and describing a file tree
//! (content hashes and every piece of restorable metadata) so two trees can be compared.
//!
//! The programs are the workspace's binaries next to the test executable (`target/<profile>/`);
//! `cargo test --workspace` and `cargo nextest run --workspace` build them first.

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
