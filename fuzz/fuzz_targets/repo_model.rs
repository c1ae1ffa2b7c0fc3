//! Model-based target for the repository engine: random histories of set openings, appended
//! batches (chunks, versions, deletions), completions, abandoned sets, clean reopens and
//! power cuts (an injected I/O failure at the Nth storage operation, then unsynced bytes
//! dropped, kept or torn) against a `BTreeMap` model of the files.
//!
//! Checked after every reopen and at the end: every set whose completion was acknowledged
//! reads back exactly as the model says, no other set is completed, and at the end the index
//! maintained incrementally equals one rebuilt from the log (from nothing for inputs of odd
//! length, else replayed onto the empty repository's index).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tardis_core::api::{Repository, SetState, Write};
use tardis_core::chunkcodec;
use tardis_core::crypto::Keys;
use tardis_core::event::{EntryDeleted, Extent, FileVersion, SetStats};
use tardis_core::ids::{DirId, HostId, SetId};
use tardis_core::meta::{FileMeta, Kind};
use tardis_core::view::{self, Tree};
use tardis_log::fault::{CrashMode, FaultStorage};
use tardis_log::storage::DirStorage;
use tardis_log::{IndexOptions, LogOptions, Repo, RepoOptions};

const HOST: &str = "fuzzhost";
/// At most this many operations per input, so one execution stays short.
const MAX_OPS: usize = 32;

type Files = BTreeMap<String, Vec<u8>>;

#[derive(Debug, Clone, Copy)]
enum Op {
    Write {
        file: u8,
        content: u8,
    },
    Delete {
        file: u8,
    },
    Complete,
    Abandon,
    Reopen,
    /// Fail storage operation `after` (counted from now), then cut the power with `mode`.
    /// With `reopen`, the repository is first reopened on the armed storage, so the failure
    /// may strike during recovery itself.
    Crash {
        after: u8,
        mode: CrashMode,
        reopen: bool,
    },
}

fn ops(data: &[u8]) -> Vec<Op> {
    data.chunks_exact(2)
        .take(MAX_OPS)
        .map(|b| match b[0] % 8 {
            0 | 1 => Op::Write { file: b[0] / 8 % 4, content: b[1] },
            2 => Op::Delete { file: b[1] % 4 },
            3 | 4 => Op::Complete,
            5 => Op::Abandon,
            6 => Op::Reopen,
            _ => Op::Crash {
                after: b[1] % 16,
                reopen: b[1] & 16 != 0,
                mode: match b[0] / 8 % 3 {
                    0 => CrashMode::DropUnsynced,
                    1 => CrashMode::KeepUnsynced,
                    _ => CrashMode::Tear { seed: u64::from(b[1]) },
                },
            },
        })
        .collect()
}

fn open(root: &Path, fail_at: Option<u64>) -> (Repo, Arc<FaultStorage>) {
    let seg = root.join(HOST).join("segments");
    let inner = DirStorage::new(&seg, &root.join(HOST).join("quarantine")).expect("segment directory");
    let fault = Arc::new(FaultStorage::new(inner, fail_at));
    let opts = RepoOptions { storage: Some(fault.clone()), ..options() };
    match Repo::open(root, HOST, opts) {
        Ok(repo) => (repo, fault),
        // An open that hit the injected failure (while trimming a torn tail, say) is retried
        // on healthy storage: recovery must then succeed.
        Err(_) if fail_at.is_some() => open(root, None),
        Err(e) => panic!("the repository does not open after a crash: {e}"),
    }
}

fn content(file: u8, content: u8) -> Vec<u8> {
    format!("{file}:{content};").repeat(usize::from(content) * 20 + 1).into_bytes()
}

/// A version of `name` in `dir` written by `set`, with its metadata sealed as a client does.
fn version(keys: &Keys, set: SetId, dir: DirId, name: &[u8], kind: Kind, extents: Vec<Extent>) -> Write {
    let size = extents.iter().map(|e| u64::from(e.len)).sum();
    let meta = FileMeta { name: name.to_vec().into(), kind, size, ..FileMeta::default() };
    let key = keys.name_key(&dir, name);
    let meta = view::seal_meta(keys, &dir, &key, set, &meta).expect("sealing metadata");
    Write::Version(FileVersion { set, dir, name: key, extents, meta })
}

/// One batch, as a client sends it: the root entry, then each file's chunks before the version
/// that uses them, then deletions.
fn batch(keys: &Keys, set: SetId, files: &Files, deleted: &[String]) -> Vec<Write> {
    let root_dir = keys.dir_id(&DirId::TOP, view::ROOT_NAME);
    let mut writes = vec![version(keys, set, DirId::TOP, view::ROOT_NAME, Kind::Dir, Vec::new())];
    for (name, data) in files {
        // Pieces of 3000 bytes, so that larger files take several chunks.
        let extents = (0..data.len())
            .step_by(3000)
            .map(|offset| {
                let piece = &data[offset..data.len().min(offset + 3000)];
                let id = keys.chunk_id(piece);
                writes.push(Write::Chunk(chunkcodec::encode(keys, id, piece).expect("encoding a chunk")));
                Extent { offset: offset as u64, len: piece.len() as u32, id }
            })
            .collect();
        writes.push(version(keys, set, root_dir, name.as_bytes(), Kind::File, extents));
    }
    writes.extend(deleted.iter().map(|name| {
        Write::Delete(EntryDeleted { set, dir: root_dir, name: keys.name_key(&root_dir, name.as_bytes()) })
    }));
    writes
}

fn read_set(repo: &Repo, keys: &Keys, set: SetId) -> Files {
    let tree = Tree::new(repo, keys, set);
    let Some(root) = tree.root().expect("reading the root") else { return Files::new() };
    tree.children(&root)
        .expect("listing the root")
        .into_iter()
        .map(|n| {
            let data = tree.read_at(&n, 0, n.size() as usize).expect("reading a file");
            (String::from_utf8(n.meta.name.to_vec()).expect("UTF-8 names"), data)
        })
        .collect()
}

/// Every acknowledged set reads back as the model says, and no other set is completed.
fn check(repo: &Repo, keys: &Keys, expect: &BTreeMap<SetId, Files>) {
    let completed: Vec<SetId> =
        repo.sets().expect("listing sets").iter().filter(|s| s.state == SetState::Completed).map(|s| s.id).collect();
    assert_eq!(completed, expect.keys().copied().collect::<Vec<_>>(), "completed sets differ from the model");
    for (set, files) in expect {
        assert_eq!(&read_set(repo, keys, *set), files, "set {set} reads back wrong");
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = tardis_fuzz::tempdir();
    let root = dir.path();
    let keys = Keys::unencrypted(HostId([9; 16]));
    copy_tree(template(&keys), root);
    let (mut repo, mut fault) = open(root, None);

    let mut committed = Files::new();
    let mut pending = Files::new();
    let mut open_set: Option<SetId> = None;
    // Acknowledged completions: set → its files.
    let mut expect: BTreeMap<SetId, Files> = BTreeMap::new();
    // A completion whose result was an error: it may or may not be durable.
    let mut in_doubt: Option<(SetId, Files)> = None;
    let mut crash_mode = CrashMode::DropUnsynced;
    for (n, op) in (1u32..).zip(ops(data)) {
        let result = match op {
            Op::Write { file, content: c } => (|| -> tardis_core::Result<()> {
                let set = match open_set {
                    Some(s) => s,
                    None => {
                        let s = repo.open_set(&format!("s{n}"), 1)?;
                        pending = committed.clone();
                        open_set = Some(s);
                        s
                    }
                };
                let name = format!("file{file}");
                let data = content(file, c);
                repo.append(set, batch(&keys, set, &[(name.clone(), data.clone())].into(), &[]))?;
                pending.insert(name, data);
                Ok(())
            })(),
            Op::Delete { file } => (|| -> tardis_core::Result<()> {
                let Some(set) = open_set else { return Ok(()) };
                let name = format!("file{file}");
                repo.append(set, batch(&keys, set, &Files::new(), std::slice::from_ref(&name)))?;
                pending.remove(&name);
                Ok(())
            })(),
            Op::Complete => (|| -> tardis_core::Result<()> {
                let Some(set) = open_set.take() else { return Ok(()) };
                if let Err(e) = repo.complete_set(set, SetStats::default(), None) {
                    in_doubt = Some((set, pending.clone()));
                    return Err(e);
                }
                committed = pending.clone();
                expect.insert(set, committed.clone());
                Ok(())
            })(),
            Op::Abandon => {
                open_set = None;
                Ok(())
            }
            Op::Reopen => {
                drop(repo);
                (repo, fault) = open(root, None);
                check(&repo, &keys, &expect);
                Ok(())
            }
            Op::Crash { after, mode, reopen } => {
                // The history goes on until some write or fsync fails `after` operations from now.
                let at = u64::from(after) + 1;
                if reopen {
                    drop(repo);
                    (repo, fault) = open(root, Some(at));
                } else {
                    fault.arm(at);
                }
                crash_mode = mode;
                Ok(())
            }
        };
        if result.is_err() || fault.failed() {
            // The engine refuses writes after a failure: cut the power and recover.
            fault.crash(crash_mode).expect("simulating the power cut");
            drop(repo);
            (repo, fault) = open(root, None);
            open_set = None;
            if let Some((set, files)) = in_doubt.take() {
                let done =
                    repo.sets().expect("listing sets").iter().any(|s| s.id == set && s.state == SetState::Completed);
                if done {
                    committed = files.clone();
                    expect.insert(set, files);
                }
            }
            check(&repo, &keys, &expect);
        }
    }
    check(&repo, &keys, &expect);
    let dump = repo.index().dump().expect("dumping the index");
    drop(repo);
    if data.len() % 2 == 1 {
        // An input of odd length (its last byte is not an operation) rebuilds the index from
        // nothing, as `tardis-tools rebuild-index` does.
        Repo::rebuild_index(root, HOST, options()).expect("rebuilding the index");
    } else {
        // Otherwise the index goes back to the template's, which has applied only the host's
        // creation, and the open replays the whole history onto it: the same replay, without
        // RocksDB creating five column families (each writes and re-reads an options file,
        // which took most of an execution's time).
        let index = root.join(HOST).join("index");
        fs::remove_dir_all(&index).expect("removing the index");
        fs::create_dir(&index).expect("creating the index directory");
        copy_tree(&template(&keys).join(HOST).join("index"), &index);
    }
    let rebuilt = Repo::open(root, HOST, options()).expect("opening after the rebuild");
    assert_eq!(rebuilt.index().dump().expect("dumping the rebuilt index"), dump, "the rebuilt index differs");
});

/// A repository holding only the host, made once per process. Every history starts from a copy
/// of it: creating an index's column families costs RocksDB an options file each, and made a
/// fresh repository per execution cost three times a reopen.
fn template(keys: &Keys) -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let dir = tardis_fuzz::tempdir().keep();
        let (repo, _) = open(&dir, None);
        repo.create_host(keys.host(), None).expect("creating the host");
        dir
    })
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in fs::read_dir(from).expect("listing the template") {
        let entry = entry.expect("listing the template");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a template entry's type").is_dir() {
            fs::create_dir(&target).expect("copying the template");
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("copying the template");
        }
    }
}

/// Every open of the repository uses these (with the fault-injecting storage where armed).
fn options() -> RepoOptions {
    RepoOptions {
        // Small segments, so that histories cross segment boundaries.
        log: LogOptions { segment_size: 8 << 10 },
        // Small memtables: RocksDB flushes them to table files within one history, so those
        // paths run too, and each open preallocates a write-ahead log of 64 KiB, not 4.4 MiB.
        // The MANIFEST's preallocation is cut likewise.
        index: IndexOptions { memtable_budget: Some(64 << 10), manifest_preallocation: Some(64 << 10) },
        ..RepoOptions::default()
    }
}
