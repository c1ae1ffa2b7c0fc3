//! End-to-end tests of the repository engine: writes through the shared `Repository` API,
//! crash injection at every storage operation, torn tails, mid-log damage, and index rebuilds.

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use tardis_core::api::{HostKey, Repository, SetState, Write};
use tardis_core::chunkcodec;
use tardis_core::crypto::{Keys, MasterKey};
use tardis_core::event::{EntryDeleted, Extent, FileVersion, SetStats};
use tardis_core::ids::{DirId, HostId, SetId};
use tardis_core::keywrap::{KdfHeader, KdfParams, WrappedKey};
use tardis_core::login::LoginKey;
use tardis_core::meta::{FileMeta, Kind};
use tardis_core::view::{self, Tree};
use tardis_log::fault::{CrashMode, FaultStorage};
use tardis_log::storage::DirStorage;
use tardis_log::{CompactOptions, Error, LogOptions, Repo, RepoOptions};

const HOST: &str = "testhost";

/// File name → content of one set.
type Files = BTreeMap<String, Vec<u8>>;

fn small_segments() -> RepoOptions {
    RepoOptions { log: LogOptions { segment_size: 64 << 10 }, ..RepoOptions::default() }
}

fn keys() -> Keys {
    Keys::encrypted(HostId([3; 16]), &MasterKey::generate().unwrap())
}

/// Writes files into the open set `set` under the root directory, the way a client does:
/// chunks first, then the root entry and one version per file, in one batch.
fn write_files(repo: &Repo, keys: &Keys, set: SetId, files: &BTreeMap<String, Vec<u8>>, deleted: &[String]) {
    write_entries(repo, keys, set, files, deleted, true);
}

/// [`write_files`], writing the root directory's version only `with_root`.
fn write_entries(repo: &Repo, keys: &Keys, set: SetId, files: &Files, deleted: &[String], with_root: bool) {
    let root_dir = keys.dir_id(&DirId::TOP, view::ROOT_NAME);
    let mut writes = Vec::new();
    let root_meta =
        FileMeta { name: view::ROOT_NAME.to_vec().into(), kind: Kind::Dir, mode: 0o755, ..FileMeta::default() };
    let root_key = keys.name_key(&DirId::TOP, view::ROOT_NAME);
    if with_root {
        writes.push(Write::Version(FileVersion {
            set,
            dir: DirId::TOP,
            name: root_key,
            extents: vec![],
            meta: view::seal_meta(keys, &DirId::TOP, &root_key, set, &root_meta).unwrap(),
        }));
    }
    for (name, data) in files {
        let mut extents = Vec::new();
        let mut offset = 0u64;
        for piece in data.chunks(3000) {
            let id = keys.chunk_id(piece);
            writes.push(Write::Chunk(chunkcodec::encode(keys, id, piece).unwrap()));
            extents.push(Extent { offset, len: piece.len() as u32, id });
            offset += piece.len() as u64;
        }
        let meta = FileMeta {
            name: name.as_bytes().to_vec().into(),
            kind: Kind::File,
            mode: 0o644,
            size: data.len() as u64,
            ..FileMeta::default()
        };
        let key = keys.name_key(&root_dir, name.as_bytes());
        writes.push(Write::Version(FileVersion {
            set,
            dir: root_dir,
            name: key,
            extents,
            meta: view::seal_meta(keys, &root_dir, &key, set, &meta).unwrap(),
        }));
    }
    for name in deleted {
        writes.push(Write::Delete(EntryDeleted {
            set,
            dir: root_dir,
            name: keys.name_key(&root_dir, name.as_bytes()),
        }));
    }
    repo.append(set, writes).unwrap();
}

/// Reads every file of a set back through the view.
fn read_set(repo: &Repo, keys: &Keys, set: SetId) -> BTreeMap<String, Vec<u8>> {
    let tree = Tree::new(repo, keys, set);
    let Some(root) = tree.root().unwrap() else { return BTreeMap::new() };
    tree.children(&root)
        .unwrap()
        .into_iter()
        .map(|n| {
            let data = tree.read_at(&n, 0, n.size() as usize).unwrap();
            (String::from_utf8(n.meta.name.to_vec()).unwrap(), data)
        })
        .collect()
}

fn create_host(repo: &Repo, keys: &Keys, password: &[u8]) {
    let master = MasterKey::generate().unwrap();
    let header = KdfHeader::new(KdfParams::FLOOR).unwrap();
    let secrets = header.derive(password).unwrap();
    let wrapped = WrappedKey::seal(&master, &header, &secrets).unwrap().as_bytes().to_vec();
    let verifier = LoginKey::from_secrets(&secrets).unwrap().verifier();
    repo.create_host(keys.host(), Some(HostKey { wrapped, verifier })).unwrap();
}

fn files(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
    pairs.iter().map(|(n, d)| (n.to_string(), d.repeat(1000).into_bytes())).collect()
}

#[test]
fn sets_carry_unchanged_entries_forward_and_deletions_end_them() {
    let dir = tempfile::tempdir().unwrap();
    let keys = keys();
    let repo = Repo::open(dir.path(), HOST, small_segments()).unwrap();
    create_host(&repo, &keys, b"pw");

    let s1 = repo.open_set("Daily-1", 20).unwrap();
    let v1 = files(&[("a", "alpha"), ("b", "beta"), ("c", "gamma")]);
    write_files(&repo, &keys, s1, &v1, &[]);
    repo.complete_set(s1, SetStats::default(), None).unwrap();

    // Set 2 only changes b and deletes c: a is carried forward at no cost.
    let s2 = repo.open_set("Daily-2", 20).unwrap();
    write_files(&repo, &keys, s2, &files(&[("b", "BETA")]), &["c".into()]);
    repo.complete_set(s2, SetStats::default(), None).unwrap();

    // Set 3 is abandoned: its writes must never be seen.
    let s3 = repo.open_set("Daily-3", 20).unwrap();
    write_files(&repo, &keys, s3, &files(&[("a", "junk")]), &["b".into()]);
    let s4 = repo.open_set("Daily-3", 20).unwrap();
    repo.complete_set(s4, SetStats::default(), None).unwrap();

    let expect2 = files(&[("a", "alpha"), ("b", "BETA")]);
    assert_eq!(read_set(&repo, &keys, s1), v1);
    assert_eq!(read_set(&repo, &keys, s2), expect2);
    assert_eq!(read_set(&repo, &keys, s4), expect2);
    let states: Vec<SetState> = repo.sets().unwrap().iter().map(|s| s.state).collect();
    assert_eq!(states, [SetState::Completed, SetState::Completed, SetState::Abandoned, SetState::Completed]);

    // Everything survives a reopen, and a rebuilt index is identical.
    let before = repo.index().dump().unwrap();
    drop(repo);
    let repo = Repo::open(dir.path(), HOST, small_segments()).unwrap();
    assert_eq!(repo.index().dump().unwrap(), before);
    assert_eq!(read_set(&repo, &keys, s2), expect2);
    drop(repo);
    Repo::rebuild_index(dir.path(), HOST, small_segments()).unwrap();
    let repo = Repo::open(dir.path(), HOST, small_segments()).unwrap();
    assert_eq!(repo.index().dump().unwrap(), before);
}

#[test]
fn server_side_rules_refuse_bad_writes() {
    let dir = tempfile::tempdir().unwrap();
    let keys = keys();
    let repo = Repo::open(dir.path(), HOST, RepoOptions::default()).unwrap();
    assert!(repo.open_set("x", 1).is_err(), "no set before the host exists");
    create_host(&repo, &keys, b"pw");
    let s = repo.open_set("x", 1).unwrap();
    // A version that references a chunk nobody stored is refused (invariant 2).
    let id = keys.chunk_id(b"never stored");
    let meta = view::seal_meta(&keys, &DirId::TOP, &keys.name_key(&DirId::TOP, b"/"), s, &FileMeta::default()).unwrap();
    let v = FileVersion {
        set: s,
        dir: DirId::TOP,
        name: keys.name_key(&DirId::TOP, b"/"),
        extents: vec![Extent { offset: 0, len: 12, id }],
        meta,
    };
    let err = repo.append(s, vec![Write::Version(v.clone())]).unwrap_err();
    assert!(err.to_string().contains("not stored"), "{err}");
    // Writing to a set that is not open is refused.
    assert!(repo.append(s + 1, vec![]).is_err());
    repo.complete_set(s, SetStats::default(), None).unwrap();
    assert!(repo.complete_set(s, SetStats::default(), None).is_err());
    assert!(repo.open_set("x", 1).is_err(), "live set names are unique");
    // A second process cannot open the same repository.
    assert!(matches!(Repo::open(dir.path(), HOST, RepoOptions::default()), Err(Error::Locked { .. })));
}

/// A deterministic workload of `n` sets; returns, per completed set, the files it must hold.
fn workload(repo: &Repo, keys: &Keys, n: usize) -> Result<Vec<(SetId, Files)>, tardis_core::Error> {
    let mut done = Vec::new();
    let mut state = BTreeMap::new();
    for i in 0..n {
        let set = repo.open_set(&format!("set-{i}"), 10)?;
        let mut changed = BTreeMap::new();
        for f in 0..3 {
            let name = format!("f{}", (i + f) % 5);
            let data = format!("{name}-{i}-{f}-").repeat(700 + i * 13).into_bytes();
            changed.insert(name, data);
        }
        let deleted = if i % 3 == 2 { vec![format!("f{}", (i + 3) % 5)] } else { vec![] };
        // Call through the trait so errors come back instead of panicking.
        let mut writes = Vec::new();
        let root_dir = keys.dir_id(&DirId::TOP, view::ROOT_NAME);
        let root_key = keys.name_key(&DirId::TOP, view::ROOT_NAME);
        let root_meta = FileMeta { name: view::ROOT_NAME.to_vec().into(), kind: Kind::Dir, ..FileMeta::default() };
        writes.push(Write::Version(FileVersion {
            set,
            dir: DirId::TOP,
            name: root_key,
            extents: vec![],
            meta: view::seal_meta(keys, &DirId::TOP, &root_key, set, &root_meta)?,
        }));
        for (name, data) in &changed {
            let mut extents = Vec::new();
            for (k, piece) in data.chunks(4096).enumerate() {
                let id = keys.chunk_id(piece);
                writes.push(Write::Chunk(chunkcodec::encode(keys, id, piece)?));
                extents.push(Extent { offset: (k * 4096) as u64, len: piece.len() as u32, id });
            }
            let key = keys.name_key(&root_dir, name.as_bytes());
            let meta =
                FileMeta { name: name.as_bytes().to_vec().into(), size: data.len() as u64, ..FileMeta::default() };
            writes.push(Write::Version(FileVersion {
                set,
                dir: root_dir,
                name: key,
                extents,
                meta: view::seal_meta(keys, &root_dir, &key, set, &meta)?,
            }));
        }
        // Split the writes in two batches so crashes can land between them.
        let second = writes.split_off(writes.len() / 2);
        repo.append(set, writes)?;
        repo.append(set, second)?;
        if !deleted.is_empty() {
            let d = deleted
                .iter()
                .map(|n| {
                    Write::Delete(EntryDeleted { set, dir: root_dir, name: keys.name_key(&root_dir, n.as_bytes()) })
                })
                .collect();
            repo.append(set, d)?;
        }
        repo.complete_set(set, SetStats::default(), None)?;
        for n in &deleted {
            state.remove(n);
        }
        state.extend(changed);
        done.push((set, state.clone()));
    }
    Ok(done)
}

fn fault_opts(root: &Path, fail_at: Option<u64>) -> (RepoOptions, Arc<FaultStorage>) {
    let seg = root.join(HOST).join("segments");
    let inner = DirStorage::new(&seg, &root.join(HOST).join("quarantine")).unwrap();
    let fault = Arc::new(FaultStorage::new(inner, fail_at));
    (
        RepoOptions {
            log: LogOptions { segment_size: 48 << 10 },
            storage: Some(fault.clone()),
            ..RepoOptions::default()
        },
        fault,
    )
}

/// Sweeps a storage failure over every write and fsync of a workload; after each simulated
/// power cut the repository reopens, every acknowledged set reads back exactly, no other set
/// is visible as completed, and the index equals one rebuilt from the log.
#[test]
fn crash_at_every_storage_operation() {
    let keys = keys();
    // Count the operations of a clean run first.
    let total = {
        let dir = tempfile::tempdir().unwrap();
        let (opts, fault) = fault_opts(dir.path(), None);
        let repo = Repo::open(dir.path(), HOST, opts).unwrap();
        repo.create_host(keys.host(), None).unwrap();
        workload(&repo, &keys, 6).unwrap();
        fault.ops()
    };
    assert!(total > 40, "workload too small to be interesting: {total} ops");
    eprintln!("crash sweep over {total} storage operations");
    let modes = [CrashMode::DropUnsynced, CrashMode::KeepUnsynced, CrashMode::Tear { seed: 1 }];
    for n in 1..=total {
        let mode = modes[n as usize % modes.len()];
        let dir = tempfile::tempdir().unwrap();
        let (opts, fault) = fault_opts(dir.path(), Some(n));
        let acked = {
            let repo = match Repo::open(dir.path(), HOST, opts) {
                Ok(r) => r,
                Err(_) => continue,
            };
            if repo.create_host(keys.host(), None).is_err() {
                Vec::new()
            } else {
                let mut acked = Vec::new();
                // Record what was acknowledged before the failure.
                match workload(&repo, &keys, 6) {
                    Ok(all) => acked = all,
                    Err(_) => {
                        for s in repo.sets().unwrap() {
                            if s.state == SetState::Completed {
                                acked.push((s.id, BTreeMap::new()));
                            }
                        }
                    }
                }
                // Writes after a failure are refused until reopen.
                if fault.failed() {
                    assert!(repo.open_set("after-failure", 1).is_err());
                }
                acked
            }
        };
        fault.crash(mode).unwrap();
        let (opts, _) = fault_opts(dir.path(), None);
        let repo = Repo::open(dir.path(), HOST, opts)
            .unwrap_or_else(|e| panic!("reopen after crash at op {n} ({mode:?}): {e}"));
        assert_eq!(repo.replayed().damage, [], "op {n} ({mode:?})");
        let completed: Vec<SetId> =
            repo.sets().unwrap().iter().filter(|s| s.state == SetState::Completed).map(|s| s.id).collect();
        let acked_ids: Vec<SetId> = acked.iter().map(|(s, _)| *s).collect();
        // Every acknowledged set is there; at most one more (committed but not yet acknowledged).
        assert!(
            acked_ids.iter().all(|s| completed.contains(s)),
            "op {n}: lost an acknowledged set: {acked_ids:?} vs {completed:?}"
        );
        assert!(completed.len() <= acked_ids.len() + 1, "op {n}: {completed:?} vs {acked_ids:?}");
        let expected = workload_expectation(&keys);
        for s in &completed {
            assert_eq!(read_set(&repo, &keys, *s), expected[(*s - 1) as usize], "op {n}: set {s} differs");
        }
        // The next backup works on the recovered repository.
        if repo.host().unwrap().is_none() {
            repo.create_host(keys.host(), None).unwrap();
        }
        let s = repo.open_set("after-crash", 1).unwrap();
        repo.complete_set(s, SetStats::default(), None).unwrap();
        let dump = repo.index().dump().unwrap();
        drop(repo);
        let (opts, _) = fault_opts(dir.path(), None);
        let stats = Repo::rebuild_index(dir.path(), HOST, opts).unwrap();
        // A crash leaves no damage and no sequence break: only a torn tail, which opening cut.
        assert_eq!(stats.damage, [], "op {n}: a full replay after the crash found damage");
        let (opts, _) = fault_opts(dir.path(), None);
        let repo = Repo::open(dir.path(), HOST, opts).unwrap();
        assert_eq!(repo.index().dump().unwrap(), dump, "op {n}: rebuilt index differs");
    }
}

/// What each set of [`workload`] holds, computed by running it once on a clean repository.
fn workload_expectation(keys: &Keys) -> Vec<Files> {
    thread_local!(static CACHE: std::cell::RefCell<Option<Vec<Files>>> = const { std::cell::RefCell::new(None) });
    CACHE.with(|c| {
        c.borrow_mut()
            .get_or_insert_with(|| {
                let dir = tempfile::tempdir().unwrap();
                let repo = Repo::open(dir.path(), HOST, RepoOptions::default()).unwrap();
                repo.create_host(keys.host(), None).unwrap();
                workload(&repo, keys, 6).unwrap().into_iter().map(|(_, f)| f).collect()
            })
            .clone()
    })
}

fn segment_files(root: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> =
        std::fs::read_dir(root.join(HOST).join("segments")).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

#[test]
fn torn_tail_is_trimmed_quarantined_and_reported() {
    let keys = Keys::unencrypted(HostId([5; 16]));
    for variant in 0..4 {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo::open(dir.path(), HOST, RepoOptions::default()).unwrap();
        repo.create_host(keys.host(), None).unwrap();
        let sets = workload(&repo, &keys, 3).unwrap();
        drop(repo);
        let seg = segment_files(dir.path()).pop().unwrap();
        let len = std::fs::metadata(&seg).unwrap().len();
        let mut bytes = std::fs::read(&seg).unwrap();
        match variant {
            0 => bytes.extend_from_slice(&[0u8; 700]),
            1 => bytes.extend((0..999u32).map(|i| (i * 7919 % 251) as u8)),
            // A valid-looking record header with a bad CRC.
            2 => bytes.extend_from_slice(b"TRec\x1e\x01\0\0\x04\0\0\0\0\0\0\0\0\0\0\0\xde\xad\xbe\xefmeta"),
            // Half of a real record: the start of the log copied to the end, cut short.
            _ => {
                let piece = bytes[32..32 + 500].to_vec();
                bytes.extend_from_slice(&piece);
            }
        }
        std::fs::write(&seg, &bytes).unwrap();
        let repo = Repo::open(dir.path(), HOST, RepoOptions::default()).unwrap();
        let trim = repo.recovery().trimmed.clone().expect("tail trimmed");
        assert_eq!(trim.offset, len, "variant {variant}");
        assert_eq!(trim.bytes, bytes.len() as u64 - len);
        assert!(trim.quarantine.exists());
        assert!(repo.recovery().damage.is_empty());
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), len);
        for (s, f) in &sets {
            assert_eq!(&read_set(&repo, &keys, *s), f);
        }
    }
}

#[test]
fn truncating_the_last_batch_at_any_offset_returns_to_the_previous_commit() {
    let keys = Keys::unencrypted(HostId([5; 16]));
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::open(dir.path(), HOST, RepoOptions::default()).unwrap();
    repo.create_host(keys.host(), None).unwrap();
    let sets = workload(&repo, &keys, 2).unwrap();
    let committed = repo.log_end();
    let s = repo.open_set("last", 1).unwrap();
    write_files(&repo, &keys, s, &files(&[("z", "zed")]), &[]);
    drop(repo);
    let seg = segment_files(dir.path()).pop().unwrap();
    let full = std::fs::read(&seg).unwrap();
    let snapshot = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), snapshot.path());
    let step = ((full.len() as u64 - committed.offset) / 97).max(1);
    let mut cut = committed.offset + 1;
    while cut < full.len() as u64 {
        copy_dir(snapshot.path(), dir.path());
        std::fs::write(&seg, &full[..cut as usize]).unwrap();
        let repo = Repo::open(dir.path(), HOST, RepoOptions::default()).unwrap();
        assert!(repo.log_end() <= tardis_log::Pos { segment: committed.segment, offset: cut });
        for (s, f) in &sets {
            assert_eq!(&read_set(&repo, &keys, *s), f, "cut at {cut}");
        }
        drop(repo);
        cut += step;
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[test]
fn flipped_byte_mid_log_is_reported_with_segment_and_offset_never_trimmed() {
    let keys = Keys::unencrypted(HostId([5; 16]));
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::open(dir.path(), HOST, RepoOptions::default()).unwrap();
    repo.create_host(keys.host(), None).unwrap();
    let sets = workload(&repo, &keys, 3).unwrap();
    // Find a chunk of the first set and flip a byte inside its stored body.
    let tree = Tree::new(&repo, &keys, sets[0].0);
    let root = tree.root().unwrap().unwrap();
    let victim = tree.children(&root).unwrap().into_iter().next().unwrap();
    let extent = victim.version.extents[0];
    let loc = repo.index().chunk(&extent.id).unwrap().unwrap();
    drop(repo);
    let seg = segment_files(dir.path()).pop().unwrap();
    let len_before = std::fs::metadata(&seg).unwrap().len();
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = (loc.pos.offset + 24 + 60) as usize;
    bytes[at] ^= 0x10;
    std::fs::write(&seg, &bytes).unwrap();

    let repo = Repo::open(dir.path(), HOST, RepoOptions::default()).unwrap();
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), len_before, "damage must never be truncated");
    assert!(repo.recovery().trimmed.is_none());
    // Opening does not read old records; a full scan names exactly the damaged record.
    let damage = repo.scan_log().unwrap();
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert_eq!((damage[0].segment, damage[0].offset), (loc.pos.segment, loc.pos.offset));
    let err = repo.read_chunk(&extent.id).unwrap_err().to_string();
    assert!(err.contains(&format!("segment {} at offset {}", loc.pos.segment, loc.pos.offset)), "{err}");
    // Files that do not use the damaged chunk still read; new writes go to a fresh segment.
    let last = sets.last().unwrap();
    let tree = Tree::new(&repo, &keys, last.0);
    let root = tree.root().unwrap().unwrap();
    let mut ok = 0;
    for n in tree.children(&root).unwrap() {
        if !n.version.extents.iter().any(|e| e.id == extent.id) {
            assert_eq!(
                tree.read_at(&n, 0, n.size() as usize).unwrap(),
                last.1[std::str::from_utf8(&n.meta.name).unwrap()]
            );
            ok += 1;
        }
    }
    assert!(ok > 0);
    let s = repo.open_set("after-damage", 1).unwrap();
    repo.complete_set(s, SetStats::default(), None).unwrap();
    drop(repo);
    // Damage inside a header breaks framing: the rest of the segment is still found and kept.
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[at] ^= 0x10; // undo the body flip
    let header_at = (loc.pos.offset + 5) as usize;
    bytes[header_at] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let len_before = bytes.len() as u64;
    let repo = Repo::open(dir.path(), HOST, RepoOptions::default()).unwrap();
    assert!(repo.recovery().trimmed.is_none());
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), len_before);
    let damage = repo.scan_log().unwrap();
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert_eq!(damage[0].segment, loc.pos.segment);
    assert!(damage[0].offset <= loc.pos.offset && damage[0].resume > loc.pos.offset, "{damage:?}");
    drop(repo);
    // A rebuild from the damaged log keeps every set whose records are intact.
    let stats = Repo::rebuild_index(dir.path(), HOST, RepoOptions::default()).unwrap();
    assert_eq!(stats.damage.len(), 1);
    let repo = Repo::open(dir.path(), HOST, RepoOptions::default()).unwrap();
    assert_eq!(repo.sets().unwrap().iter().filter(|s| s.state == SetState::Completed).count(), sets.len() + 1);
}

#[test]
fn wrong_password_is_detected_at_unwrap() {
    let dir = tempfile::tempdir().unwrap();
    let keys = keys();
    let repo = Repo::open(dir.path(), HOST, RepoOptions::default()).unwrap();
    create_host(&repo, &keys, b"right");
    let blob = repo.host().unwrap().unwrap().wrapped_key.unwrap();
    let w = WrappedKey::from_bytes(&blob).unwrap();
    assert!(w.unwrap_key(b"right").is_ok());
    assert!(matches!(w.unwrap_key(b"wrong"), Err(tardis_core::Error::WrongPassword)));
}

/// Operations of the model-based test.
#[derive(Debug, Clone)]
enum Op {
    Write {
        file: u8,
        content: u16,
    },
    Delete {
        file: u8,
    },
    Complete,
    Abandon,
    Reopen,
    /// Purge the `pick`-th live completed set (modulo their number).
    Purge {
        pick: u8,
    },
    /// Compact every segment with a dead byte, or only those less than half live.
    Compact {
        all: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..6, any::<u16>()).prop_map(|(file, content)| Op::Write { file, content }),
        2 => (0u8..6).prop_map(|file| Op::Delete { file }),
        3 => Just(Op::Complete),
        1 => Just(Op::Abandon),
        1 => Just(Op::Reopen),
        3 => any::<u8>().prop_map(|pick| Op::Purge { pick }),
        1 => any::<bool>().prop_map(|all| Op::Compact { all }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random histories against a BTreeMap model: every completed set that was not purged
    /// reads back as the model says, purges take exactly the sets asked for (never the latest),
    /// compaction in between loses nothing, and the incrementally maintained index equals one
    /// rebuilt from the log.
    #[test]
    fn model_and_rebuild_agree(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::unencrypted(HostId([9; 16]));
        // Small segments, so that purges leave segments partly dead for compaction.
        let opts = || RepoOptions { log: LogOptions { segment_size: 4 << 10 }, ..RepoOptions::default() };
        let mut repo = Repo::open(dir.path(), HOST, opts()).unwrap();
        repo.create_host(keys.host(), None).unwrap();
        let mut committed: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut pending = committed.clone();
        let mut open: Option<SetId> = None;
        let mut expect: Vec<(SetId, BTreeMap<String, Vec<u8>>)> = Vec::new();
        let mut purged: Vec<SetId> = Vec::new();
        // A set that writes one entry twice and then dies can leave its first record in a
        // segment compaction keeps while the second goes, and a replay brings the dead row back
        // (a known limit, docs/FORMAT.md §8.8). Clients write each entry, the root included,
        // once per set, so histories that purge or compact do the same.
        let rewrites = !ops.iter().any(|o| matches!(o, Op::Purge { .. } | Op::Compact { .. }));
        let mut written: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut n = 0;
        for op in ops {
            n += 1;
            let set = match open {
                Some(s) => s,
                None => {
                    let s = repo.open_set(&format!("s{n}"), 1).unwrap();
                    open = Some(s);
                    pending = committed.clone();
                    written.clear();
                    s
                }
            };
            match op {
                Op::Write { file, .. } if !rewrites && written.contains(&format!("file{file}")) => {}
                Op::Delete { file } if !rewrites && written.contains(&format!("file{file}")) => {}
                Op::Write { file, content } => {
                    let name = format!("file{file}");
                    let with_root = rewrites || written.is_empty();
                    written.insert(name.clone());
                    let data = format!("{content}:").repeat(content as usize % 3000 + 1).into_bytes();
                    write_entries(&repo, &keys, set, &[(name.clone(), data.clone())].into(), &[], with_root);
                    pending.insert(name, data);
                }
                Op::Delete { file } => {
                    let name = format!("file{file}");
                    let with_root = rewrites || written.is_empty();
                    written.insert(name.clone());
                    write_entries(&repo, &keys, set, &BTreeMap::new(), std::slice::from_ref(&name), with_root);
                    pending.remove(&name);
                }
                Op::Complete => {
                    repo.complete_set(set, SetStats::default(), None).unwrap();
                    committed = pending.clone();
                    expect.push((set, committed.clone()));
                    open = None;
                }
                Op::Abandon => open = None,
                Op::Reopen => {
                    drop(repo);
                    repo = Repo::open(dir.path(), HOST, opts()).unwrap();
                    if open.is_some() {
                        // The open set survives a reopen and can still be written.
                        prop_assert_eq!(repo.sets().unwrap().last().unwrap().state, SetState::Open);
                    }
                }
                Op::Purge { pick } if !expect.is_empty() => {
                    let i = pick as usize % expect.len();
                    let r = repo.purge_sets(&[expect[i].0]);
                    if i + 1 == expect.len() {
                        prop_assert!(r.is_err(), "the latest completed set was purged");
                    } else {
                        r.unwrap();
                        purged.push(expect.remove(i).0);
                    }
                }
                Op::Purge { .. } => {}
                Op::Compact { all } => {
                    let threshold = if all { 1.0 } else { 0.5 };
                    repo.compact(&CompactOptions { threshold, batch_records: 3 }).unwrap();
                }
            }
        }
        for (s, files) in &expect {
            prop_assert_eq!(&read_set(&repo, &keys, *s), files);
        }
        let sets = repo.sets().unwrap();
        let live: Vec<SetId> = sets.iter().filter(|s| s.is_live()).map(|s| s.id).collect();
        prop_assert_eq!(live, expect.iter().map(|(s, _)| *s).collect::<Vec<_>>());
        for s in &purged {
            prop_assert!(sets.iter().all(|i| i.id != *s || i.purged), "purged set {} is back", s);
        }
        let dump = repo.index().dump().unwrap();
        drop(repo);
        Repo::rebuild_index(dir.path(), HOST, opts()).unwrap();
        let repo = Repo::open(dir.path(), HOST, opts()).unwrap();
        prop_assert_eq!(repo.index().dump().unwrap(), dump);
    }
}

/// Options with segments so small that nearly every batch starts a new one.
fn tiny_segments() -> RepoOptions {
    RepoOptions { log: LogOptions { segment_size: 512 }, ..RepoOptions::default() }
}

/// One set of [`independent_sets`]: its ID, its files, and the segments its batches went to.
struct Written {
    set: SetId,
    files: Files,
    segments: std::ops::RangeInclusive<u64>,
}

/// Writes `n` sets that each rewrite every file they hold, so that each set depends only on
/// its own batches; `tag` makes their names unique.
fn independent_sets(repo: &Repo, keys: &Keys, tag: &str, n: usize) -> Vec<Written> {
    (0..n)
        .map(|i| {
            let first = repo.log_end().segment;
            let set = repo.open_set(&format!("{tag}-{i}"), 1).unwrap();
            let files = files(&[("a", &format!("a{i}")), ("b", &format!("b{i}"))]);
            write_files(repo, keys, set, &files, &[]);
            repo.complete_set(set, SetStats::default(), None).unwrap();
            // The first batch goes to `first` or to a new segment after it.
            Written { set, files, segments: first..=repo.log_end().segment }
        })
        .collect()
}

fn segment_path(root: &Path, seg: u64) -> std::path::PathBuf {
    root.join(HOST).join("segments").join(format!("{seg:016x}.seg"))
}

/// The `first_seq` field of a segment's header.
fn first_seq(root: &Path, seg: u64) -> u64 {
    let b = std::fs::read(segment_path(root, seg)).unwrap();
    u64::from_le_bytes(b[24..32].try_into().unwrap())
}

#[test]
fn a_missing_middle_segment_is_a_sequence_break_and_the_other_sets_still_read() {
    let keys = Keys::unencrypted(HostId([6; 16]));
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::open(dir.path(), HOST, tiny_segments()).unwrap();
    repo.create_host(keys.host(), None).unwrap();
    let sets = independent_sets(&repo, &keys, "set", 7);
    let last = repo.log_end().segment;
    assert!(repo.scan_log().unwrap().is_empty());
    drop(repo);
    let pristine = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), pristine.path());

    // Lose the segment that holds the commit point of the middle set.
    let victim = &sets[3];
    let gone = *victim.segments.end();
    assert!(gone > 1 && gone < last, "segment {gone} of 1..={last} is not in the middle");
    let expected = first_seq(dir.path(), gone);
    let found = first_seq(dir.path(), gone + 1);
    std::fs::remove_file(segment_path(dir.path(), gone)).unwrap();
    let reason =
        format!("sequence break: expected batch {expected}, segment starts at {found}; a segment may be missing");
    let brk = tardis_log::segments::Damage { segment: gone + 1, offset: 32, resume: 32, reason };

    // Opening reads only from the index's position on; a full scan finds the break.
    let repo = Repo::open(dir.path(), HOST, tiny_segments()).unwrap();
    assert_eq!(repo.scan_log().unwrap(), std::slice::from_ref(&brk));
    drop(repo);
    // So does a rebuild, which replays past it rather than stopping.
    let stats = Repo::rebuild_index(dir.path(), HOST, tiny_segments()).unwrap();
    assert_eq!(stats.damage, std::slice::from_ref(&brk));
    let repo = Repo::open(dir.path(), HOST, tiny_segments()).unwrap();
    assert_eq!(repo.scan_log().unwrap(), [brk]);
    let unaffected: Vec<&Written> = sets.iter().filter(|w| !w.segments.contains(&gone)).collect();
    assert!(unaffected.iter().any(|w| w.set < victim.set) && unaffected.iter().any(|w| w.set > victim.set));
    for w in &unaffected {
        assert_eq!(read_set(&repo, &keys, w.set), w.files, "set {}", w.set);
    }
    // The set whose commit point was lost is not shown as completed.
    let info = repo.sets().unwrap();
    assert_ne!(info.iter().find(|s| s.id == victim.set).map(|s| s.state), Some(SetState::Completed));
    // The repository still takes new sets.
    let s = repo.open_set("after-break", 1).unwrap();
    repo.complete_set(s, SetStats::default(), None).unwrap();
    drop(repo);

    // Losing the first segment breaks the sequence too: the log's first batch is batch 1.
    std::fs::remove_file(segment_path(pristine.path(), 1)).unwrap();
    let stats = Repo::rebuild_index(pristine.path(), HOST, tiny_segments()).unwrap();
    assert_eq!(stats.damage.len(), 1, "{:?}", stats.damage);
    assert_eq!(stats.damage[0].segment, 2);
    assert!(stats.damage[0].reason.starts_with("sequence break: expected batch 1, segment starts at "));
}

#[test]
fn a_missing_segment_after_the_index_position_is_reported_when_opening() {
    let keys = Keys::unencrypted(HostId([6; 16]));
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::open(dir.path(), HOST, tiny_segments()).unwrap();
    repo.create_host(keys.host(), None).unwrap();
    let early = independent_sets(&repo, &keys, "early", 2);
    let hint = repo.log_end();
    drop(repo);
    let old_index = tempfile::tempdir().unwrap();
    copy_dir(&dir.path().join(HOST).join("index"), old_index.path());
    let repo = Repo::open(dir.path(), HOST, tiny_segments()).unwrap();
    let late = independent_sets(&repo, &keys, "late", 4);
    drop(repo);

    // The index falls back to an older copy, and a segment after its position is lost.
    let gone = *late[1].segments.end();
    assert!(gone > hint.segment + 1);
    std::fs::remove_file(segment_path(dir.path(), gone)).unwrap();
    copy_dir(old_index.path(), &dir.path().join(HOST).join("index"));
    let repo = Repo::open(dir.path(), HOST, tiny_segments()).unwrap();
    let damage = &repo.replayed().damage;
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert_eq!(damage[0].segment, gone + 1);
    assert!(damage[0].reason.starts_with("sequence break: expected batch "), "{damage:?}");
    for w in early.iter().chain(late.iter().filter(|w| !w.segments.contains(&gone))) {
        assert_eq!(read_set(&repo, &keys, w.set), w.files, "set {}", w.set);
    }
}

#[test]
fn damaged_or_newer_segment_headers_mid_log_are_listed_as_damage() {
    let keys = Keys::unencrypted(HostId([6; 16]));
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::open(dir.path(), HOST, tiny_segments()).unwrap();
    repo.create_host(keys.host(), None).unwrap();
    let sets = independent_sets(&repo, &keys, "set", 7);
    let last = repo.log_end().segment;
    drop(repo);
    let (newer, bad_magic) = (*sets[2].segments.end(), *sets[4].segments.end());
    assert!(newer + 1 < bad_magic && bad_magic < last);
    let patch = |seg: u64, at: usize, byte: u8| {
        let path = segment_path(dir.path(), seg);
        let mut b = std::fs::read(&path).unwrap();
        b[at] = byte;
        std::fs::write(&path, &b).unwrap();
        b.len() as u64
    };
    let newer_len = patch(newer, 8, 2); // header version 2
    let bad_len = patch(bad_magic, 0, b'X');
    let expected = [
        tardis_log::segments::Damage {
            segment: newer,
            offset: 0,
            resume: newer_len,
            reason: "segment header: unsupported segment version 2 (this build reads up to 1)".into(),
        },
        tardis_log::segments::Damage {
            segment: bad_magic,
            offset: 0,
            resume: bad_len,
            reason: "segment header: bad magic".into(),
        },
    ];

    // Every other segment is still scanned, and the segments after the unreadable ones are not
    // reported as sequence breaks (the batches they lost have unknown numbers).
    let repo = Repo::open(dir.path(), HOST, tiny_segments()).unwrap();
    assert_eq!(repo.scan_log().unwrap(), expected);
    drop(repo);
    let stats = Repo::rebuild_index(dir.path(), HOST, tiny_segments()).unwrap();
    assert_eq!(stats.damage, expected);
    let repo = Repo::open(dir.path(), HOST, tiny_segments()).unwrap();
    for w in sets.iter().filter(|w| !w.segments.contains(&newer) && !w.segments.contains(&bad_magic)) {
        assert_eq!(read_set(&repo, &keys, w.set), w.files, "set {}", w.set);
    }
    drop(repo);

    // The last segment stays strict: a newer version there means a newer repository.
    patch(last, 8, 2);
    for result in [Repo::open(dir.path(), HOST, tiny_segments()).map(|_| ()), {
        Repo::rebuild_index(dir.path(), HOST, tiny_segments()).map(|_| ())
    }] {
        let err = result.unwrap_err();
        assert!(matches!(err, Error::Version { what: "segment", found: 2, supported: 1 }), "{err}");
        assert!(err.to_string().contains("upgrade tardis"), "{err}");
    }
}

/// Writes `version` into the index's `meta`/`format` key, as another build would have.
fn set_index_format(root: &Path, version: u32) {
    let path = root.join(HOST).join("index");
    let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &path, ["meta", "chunks", "sets", "entries", "config"])
        .unwrap();
    db.put_cf(db.cf_handle("meta").unwrap(), b"format", version.to_le_bytes()).unwrap();
    db.flush_cf(db.cf_handle("meta").unwrap()).unwrap();
}

fn index_format(root: &Path) -> Vec<u8> {
    let path = root.join(HOST).join("index");
    let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &path, ["meta", "chunks", "sets", "entries", "config"])
        .unwrap();
    db.get_cf(db.cf_handle("meta").unwrap(), b"format").unwrap().unwrap()
}

#[test]
fn a_newer_index_is_refused_and_kept_an_older_one_is_rebuilt() {
    let keys = Keys::unencrypted(HostId([6; 16]));
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::open(dir.path(), HOST, RepoOptions::default()).unwrap();
    repo.create_host(keys.host(), None).unwrap();
    let sets = workload(&repo, &keys, 2).unwrap();
    let dump = repo.index().dump().unwrap();
    drop(repo);

    let newer = tardis_log::index::INDEX_VERSION + 1;
    set_index_format(dir.path(), newer);
    let err = Repo::open(dir.path(), HOST, RepoOptions::default()).unwrap_err();
    let supported = tardis_log::index::INDEX_VERSION;
    assert!(
        matches!(err, Error::Version { what: "index", found, supported: s } if found == newer && s == supported),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade tardis"), "{err}");
    assert_eq!(index_format(dir.path()), newer.to_le_bytes(), "a newer build's index must be left alone");

    set_index_format(dir.path(), 0);
    let repo = Repo::open(dir.path(), HOST, RepoOptions::default()).unwrap();
    assert!(repo.replayed().batches > 0, "rebuilt by replaying the whole log");
    assert_eq!(repo.index().dump().unwrap(), dump);
    for (s, f) in &sets {
        assert_eq!(&read_set(&repo, &keys, *s), f);
    }
}

/// [`fault_opts`] with small segments, so that the workload spreads over many of them.
fn compact_opts(root: &Path, fail_at: Option<u64>) -> (RepoOptions, Arc<FaultStorage>) {
    let (opts, fault) = fault_opts(root, fail_at);
    (RepoOptions { log: LogOptions { segment_size: 2048 }, ..opts }, fault)
}

/// The repository [`compaction_template`] builds: six sets of [`workload`], the first four
/// purged, so most of the early segments are dead. Returns the kept sets and their files.
fn compaction_template(root: &Path, keys: &Keys) -> Vec<(SetId, Files)> {
    let (opts, _) = compact_opts(root, None);
    let repo = Repo::open(root, HOST, opts).unwrap();
    repo.create_host(keys.host(), None).unwrap();
    let sets = workload(&repo, keys, 6).unwrap();
    repo.purge_sets(&[1, 2, 3, 4]).unwrap();
    repo.set_locked(5, true).unwrap();
    repo.set_config("HourlyKeep", Some("2d")).unwrap();
    sets.into_iter().filter(|(s, _)| *s > 4).collect()
}

fn segment_bytes(root: &Path) -> u64 {
    segment_files(root).iter().map(|p| std::fs::metadata(p).unwrap().len()).sum()
}

/// Everything a reader can observe, for comparing a repository before and after compaction.
fn observable(repo: &Repo, keys: &Keys, kept: &[(SetId, Files)]) -> String {
    let sets: Vec<String> = repo
        .sets()
        .unwrap()
        .iter()
        .map(|s| format!("{} {:?} purged={} locked={}", s.id, s.state, s.purged, s.locked))
        .collect();
    for (s, files) in kept {
        assert_eq!(&read_set(repo, keys, *s), files, "set {s} reads back");
    }
    format!("{sets:?} {:?} {:?}", repo.config().unwrap(), repo.host().unwrap())
}

#[test]
fn compaction_reclaims_dead_segments_and_keeps_every_kept_set() {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let kept = compaction_template(dir.path(), &keys);
    let (opts, _) = compact_opts(dir.path(), None);
    let repo = Repo::open(dir.path(), HOST, opts).unwrap();
    let before_obs = observable(&repo, &keys, &kept);
    let before = segment_bytes(dir.path());

    let report = repo.compact(&CompactOptions { threshold: 0.5, batch_records: 3 }).unwrap();
    assert!(!report.retired.is_empty(), "{report:?}");
    assert_eq!(report.bytes_before, before);
    let after = segment_bytes(dir.path());
    assert_eq!(report.bytes_after, after);
    assert!(after < before / 2, "bytes on disk {before} -> {after}: {report:?}");
    eprintln!("compaction: {before} -> {after} bytes, {:?}", report);
    assert_eq!(observable(&repo, &keys, &kept), before_obs);
    let check = repo.check_index().unwrap();
    assert_eq!((check.mismatch_count, check.scan.damage.clone()), (0, vec![]), "{:?}", check.mismatches);
    drop(check);

    // Nothing more to do at the same threshold; a new backup still works on top.
    let again = repo.compact(&CompactOptions { threshold: 0.5, batch_records: 3 }).unwrap();
    assert!(again.retired.is_empty(), "{again:?}");
    let s = repo.open_set("after", 1).unwrap();
    repo.complete_set(s, SetStats::default(), None).unwrap();
    let dump = repo.index().dump().unwrap();
    drop(repo);
    let (opts, _) = compact_opts(dir.path(), None);
    let stats = Repo::rebuild_index(dir.path(), HOST, opts).unwrap();
    assert_eq!(stats.damage, [], "the retired segments' gap in the sequence is explained, not damage");
    let (opts, _) = compact_opts(dir.path(), None);
    let repo = Repo::open(dir.path(), HOST, opts).unwrap();
    assert_eq!(repo.index().dump().unwrap(), dump, "rebuilt index equals the compacted one");
}

/// With everything in the segment being appended to, compaction moves past it, copies into a
/// new one and retires it (the copies never land in the segment they empty).
#[test]
fn the_segment_being_appended_to_is_compacted_too() {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::open(dir.path(), HOST, RepoOptions::default()).unwrap();
    repo.create_host(keys.host(), None).unwrap();
    let sets = workload(&repo, &keys, 4).unwrap();
    repo.purge_sets(&[1, 2]).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1);
    let report = repo.compact(&CompactOptions { threshold: 1.0, batch_records: 2 }).unwrap();
    assert_eq!(report.retired, [1], "{report:?}");
    assert!(report.bytes_after < report.bytes_before, "{report:?}");
    assert_eq!(segment_files(dir.path()).len(), 1);
    for (set, files) in &sets[2..] {
        assert_eq!(&read_set(&repo, &keys, *set), files);
    }
    let again = repo.compact(&CompactOptions { threshold: 1.0, ..CompactOptions::default() }).unwrap();
    assert!(again.retired.is_empty(), "nothing dead is left: {again:?}");
}

#[test]
fn an_open_set_pins_every_chunk() {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let kept = compaction_template(dir.path(), &keys);
    let (opts, _) = compact_opts(dir.path(), None);
    let repo = Repo::open(dir.path(), HOST, opts).unwrap();
    // A backup is running: it was told chunks of the purged sets exist and will reference them.
    let open = repo.open_set("running", 10).unwrap();
    let first = workload_expectation(&keys)[0].clone();
    let report = repo.compact(&CompactOptions { threshold: 1.0, ..CompactOptions::default() }).unwrap();
    assert_eq!(report.pinned_by_open_set, Some(open));
    // Every chunk of the purged first set is still readable, so the running backup can commit.
    write_files(&repo, &keys, open, &first, &[]);
    repo.complete_set(open, SetStats::default(), None).unwrap();
    assert_eq!(read_set(&repo, &keys, open).get("f0"), first.get("f0"));
    observable(&repo, &keys, &kept);
}

/// Segments in a directory, with a hook run once at the first single-record read that a
/// compaction makes while copying (the scan before it reads whole windows).
struct HookStorage {
    inner: DirStorage,
    #[allow(clippy::type_complexity)]
    hook: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl std::fmt::Debug for HookStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookStorage").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl HookStorage {
    /// The repository under `root` (2 KiB segments) on a new `HookStorage`.
    fn repo(root: &Path) -> (Arc<HookStorage>, Arc<Repo>) {
        let inner = DirStorage::new(&root.join(HOST).join("segments"), &root.join(HOST).join("quarantine")).unwrap();
        let storage = Arc::new(HookStorage { inner, hook: std::sync::Mutex::new(None) });
        let opts = RepoOptions {
            log: LogOptions { segment_size: 2048 },
            storage: Some(storage.clone()),
            ..RepoOptions::default()
        };
        (storage, Arc::new(Repo::open(root, HOST, opts).unwrap()))
    }
}

impl tardis_log::storage::Storage for HookStorage {
    fn list(&self) -> std::io::Result<Vec<u64>> {
        self.inner.list()
    }
    fn create(&self, seg: u64, header: &[u8]) -> std::io::Result<Box<dyn tardis_log::storage::SegmentFile>> {
        self.inner.create(seg, header)
    }
    fn open_append(&self, seg: u64) -> std::io::Result<Box<dyn tardis_log::storage::SegmentFile>> {
        self.inner.open_append(seg)
    }
    fn len(&self, seg: u64) -> std::io::Result<u64> {
        self.inner.len(seg)
    }
    fn read_at(&self, seg: u64, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if buf.len() == tardis_log::frame::RECORD_HEADER_LEN {
            let hook = self.hook.lock().unwrap().take();
            if let Some(hook) = hook {
                hook();
            }
        }
        self.inner.read_at(seg, offset, buf)
    }
    fn truncate(&self, seg: u64, len: u64) -> std::io::Result<()> {
        self.inner.truncate(seg, len)
    }
    fn remove(&self, seg: u64) -> std::io::Result<()> {
        self.inner.remove(seg)
    }
    fn quarantine(&self, seg: u64, offset: u64, bytes: &[u8]) -> std::io::Result<std::path::PathBuf> {
        self.inner.quarantine(seg, offset, bytes)
    }
    fn describe(&self, seg: u64) -> std::path::PathBuf {
        self.inner.describe(seg)
    }
}

/// A backup that opens its set while compaction copies records may dedup against chunks that
/// compaction found dead (here: the purged first set's): the compaction stops before its
/// switch and retires nothing, the backup completes and reads back, and the next compaction
/// reclaims the space.
#[test]
fn a_backup_that_starts_during_compaction_keeps_every_chunk_it_was_promised() {
    let keys = Arc::new(keys());
    let dir = tempfile::tempdir().unwrap();
    let kept = compaction_template(dir.path(), &keys);
    let (storage, repo) = HookStorage::repo(dir.path());
    let before = observable(&repo, &keys, &kept);
    let first = workload_expectation(&keys)[0].clone();
    let running = Arc::new(std::sync::Mutex::new(None));
    {
        let (repo, keys, first, running) = (repo.clone(), keys.clone(), first.clone(), running.clone());
        *storage.hook.lock().unwrap() = Some(Box::new(move || {
            // The backup starts and references chunks of the purged first set it was told exist.
            let set = repo.open_set("during", 10).unwrap();
            let ids: Vec<_> = first.values().flat_map(|d| d.chunks(4096).map(|p| keys.chunk_id(p))).collect();
            assert_eq!(repo.missing_chunks(&ids).unwrap(), vec![], "the purged set's chunks are still stored");
            // So it stores none of them: its versions only reference them.
            let root_dir = keys.dir_id(&DirId::TOP, view::ROOT_NAME);
            let root_key = keys.name_key(&DirId::TOP, view::ROOT_NAME);
            let root_meta = FileMeta { name: view::ROOT_NAME.to_vec().into(), kind: Kind::Dir, ..FileMeta::default() };
            let mut writes = vec![Write::Version(FileVersion {
                set,
                dir: DirId::TOP,
                name: root_key,
                extents: vec![],
                meta: view::seal_meta(&keys, &DirId::TOP, &root_key, set, &root_meta).unwrap(),
            })];
            for (name, data) in &first {
                let extents = data
                    .chunks(4096)
                    .enumerate()
                    .map(|(k, p)| Extent { offset: (k * 4096) as u64, len: p.len() as u32, id: keys.chunk_id(p) })
                    .collect();
                let meta = FileMeta {
                    name: name.as_bytes().to_vec().into(),
                    kind: Kind::File,
                    size: data.len() as u64,
                    ..FileMeta::default()
                };
                let key = keys.name_key(&root_dir, name.as_bytes());
                let meta = view::seal_meta(&keys, &root_dir, &key, set, &meta).unwrap();
                writes.push(Write::Version(FileVersion { set, dir: root_dir, name: key, extents, meta }));
            }
            repo.append(set, writes).unwrap();
            repo.complete_set(set, SetStats::default(), None).unwrap();
            *running.lock().unwrap() = Some(set);
        }));
    }
    let report = repo.compact(&CompactOptions { threshold: 0.5, batch_records: 3 }).unwrap();
    let during = running.lock().unwrap().expect("the hook ran during the copies");
    assert!(report.interrupted && report.retired.is_empty(), "{report:?}");
    // Its own files read back (it also sees the files it did not change, from the sets before).
    let reads_back = |repo: &Repo| {
        let got = read_set(repo, &keys, during);
        first.iter().all(|(name, data)| got.get(name) == Some(data))
    };
    assert!(reads_back(&repo), "the new set reads back");
    let after = observable(&repo, &keys, &kept);
    assert!(after.starts_with(before.split(']').next().unwrap()), "earlier sets unchanged: {before} / {after}");

    // The next run, with no backup starting, retires what is dead and keeps the new set whole.
    let again = repo.compact(&CompactOptions { threshold: 0.5, batch_records: 3 }).unwrap();
    assert!(!again.interrupted && !again.retired.is_empty(), "{again:?}");
    assert!(reads_back(&repo), "the new set reads back after compaction");
    observable(&repo, &keys, &kept);
    let check = repo.check_index().unwrap();
    assert_eq!((check.mismatch_count, check.scan.damage.clone()), (0, vec![]), "{:?}", check.mismatches);
}

/// A configuration change, a lock and a purge that land while compaction copies are not undone
/// by the copies of the older records of the same keys that compaction makes at its switch.
#[test]
fn changes_made_during_compaction_are_not_undone_by_its_copies() {
    let keys = Arc::new(keys());
    let dir = tempfile::tempdir().unwrap();
    let (storage, repo) = HookStorage::repo(dir.path());
    repo.create_host(keys.host(), None).unwrap();
    // A segment that holds the latest config, lock and set records next to dead rows.
    let small = |tag: &str| BTreeMap::from([(tag.to_owned(), tag.as_bytes().repeat(20))]);
    let w = repo.open_set("w", 10).unwrap();
    write_files(&repo, &keys, w, &small("w"), &[]);
    repo.complete_set(w, SetStats::default(), None).unwrap();
    let x = repo.open_set("x", 10).unwrap();
    write_files(&repo, &keys, x, &small("x"), &["w".to_owned()]);
    repo.complete_set(x, SetStats::default(), None).unwrap();
    repo.set_config("HourlyKeep", Some("5d")).unwrap();
    let y = repo.open_set("y", 10).unwrap();
    write_files(&repo, &keys, y, &small("y"), &["x".to_owned()]);
    repo.complete_set(y, SetStats::default(), None).unwrap();
    repo.set_locked(x, true).unwrap();
    let z = repo.open_set("z", 10).unwrap();
    write_files(&repo, &keys, z, &small("z"), &[]);
    repo.complete_set(z, SetStats::default(), None).unwrap();
    repo.purge_sets(&[w]).unwrap();
    {
        let repo = repo.clone();
        *storage.hook.lock().unwrap() = Some(Box::new(move || {
            repo.set_config("HourlyKeep", Some("9d")).unwrap();
            repo.set_locked(x, false).unwrap();
            repo.purge_sets(&[x]).unwrap();
        }));
    }
    let report = repo.compact(&CompactOptions { threshold: 1.0, batch_records: 1 }).unwrap();
    assert!(storage.hook.lock().unwrap().is_none(), "the changes were made while records were copied: {report:?}");
    assert!(!report.interrupted && !report.retired.is_empty(), "{report:?}");
    assert_eq!(repo.config().unwrap().get("HourlyKeep").map(String::as_str), Some("9d"));
    let sets = repo.sets().unwrap();
    let info = sets.iter().find(|s| s.id == x).unwrap();
    assert!(info.purged && !info.locked, "{info:?}");
    drop(repo);
    let opts = RepoOptions { log: LogOptions { segment_size: 2048 }, ..RepoOptions::default() };
    Repo::rebuild_index(dir.path(), HOST, opts.clone()).unwrap();
    let repo = Repo::open(dir.path(), HOST, opts).unwrap();
    assert_eq!(repo.config().unwrap().get("HourlyKeep").map(String::as_str), Some("9d"), "after a rebuild too");
}

/// A long backup appends while compactions copy (its open set pins every chunk), and the
/// configuration changes meanwhile: all of it survives, the last configuration value wins,
/// and a compaction after the backup retires what is dead.
#[test]
fn backups_and_compaction_run_at_the_same_time() {
    let keys = Arc::new(keys());
    let dir = tempfile::tempdir().unwrap();
    let kept = compaction_template(dir.path(), &keys);
    let (opts, _) = compact_opts(dir.path(), None);
    let repo = Arc::new(Repo::open(dir.path(), HOST, opts).unwrap());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let set = repo.open_set("long", 10).unwrap();
    let backup = {
        let (repo, keys, done) = (repo.clone(), keys.clone(), done.clone());
        std::thread::spawn(move || {
            let mut files = Files::new();
            while !done.load(std::sync::atomic::Ordering::SeqCst) || files.len() < 5 {
                let name = format!("g{}", files.len());
                let data = format!("{name}-").repeat(900 + files.len()).into_bytes();
                write_files(&repo, &keys, set, &BTreeMap::from([(name.clone(), data.clone())]), &[]);
                files.insert(name, data);
            }
            repo.complete_set(set, SetStats::default(), None).unwrap();
            files
        })
    };
    let config = {
        let (repo, done) = (repo.clone(), done.clone());
        std::thread::spawn(move || {
            let mut last = String::new();
            for d in 3.. {
                if done.load(std::sync::atomic::Ordering::SeqCst) && d > 5 {
                    break;
                }
                last = format!("{d}d");
                repo.set_config("HourlyKeep", Some(&last)).unwrap();
            }
            last
        })
    };
    let mut reports = Vec::new();
    for _ in 0..3 {
        reports.push(repo.compact(&CompactOptions { threshold: 0.9, batch_records: 1 }).unwrap());
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (files, last) = (backup.join().unwrap(), config.join().unwrap());
    eprintln!("{} files backed up during 3 compactions: {reports:?}", files.len());
    assert!(reports.iter().all(|r| r.pinned_by_open_set == Some(set) && !r.interrupted), "{reports:?}");
    assert_eq!(repo.config().unwrap().get("HourlyKeep"), Some(&last), "the last value written wins");
    let check_all = |repo: &Repo| {
        let got = read_set(repo, &keys, set);
        assert!(files.iter().all(|(name, data)| got.get(name) == Some(data)), "the long backup reads back");
        observable(repo, &keys, &kept);
        let check = repo.check_index().unwrap();
        assert_eq!((check.mismatch_count, check.scan.damage.clone()), (0, vec![]), "{:?}", check.mismatches);
    };
    check_all(&repo);
    let after = repo.compact(&CompactOptions { threshold: 0.9, batch_records: 3 }).unwrap();
    assert!(!after.retired.is_empty(), "{after:?}");
    check_all(&repo);
    assert_eq!(repo.config().unwrap().get("HourlyKeep"), Some(&last));
    let dump = repo.index().dump().unwrap();
    drop(repo);
    let (opts, _) = compact_opts(dir.path(), None);
    assert_eq!(Repo::rebuild_index(dir.path(), HOST, opts).unwrap().damage, []);
    let (opts, _) = compact_opts(dir.path(), None);
    assert_eq!(Repo::open(dir.path(), HOST, opts).unwrap().index().dump().unwrap(), dump);
}

/// Fails the storage at every operation of a compaction (each copy batch's write and fsync,
/// the switch record, each segment removal), simulates a power cut with each crash mode, and
/// checks after reopening that every kept set reads back exactly, purges, locks and config
/// are unchanged, the index equals one rebuilt from the log, and a second compaction finishes.
#[test]
fn crash_at_every_step_of_compaction() {
    let keys = keys();
    let template = tempfile::tempdir().unwrap();
    let kept = compaction_template(template.path(), &keys);
    let expected = {
        let (opts, _) = compact_opts(template.path(), None);
        let repo = Repo::open(template.path(), HOST, opts).unwrap();
        observable(&repo, &keys, &kept)
    };
    // Operations a clean open takes, then those of a clean compaction.
    let (base, total) = {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(template.path(), dir.path());
        let (opts, fault) = compact_opts(dir.path(), None);
        let repo = Repo::open(dir.path(), HOST, opts).unwrap();
        let base = fault.ops();
        let report = repo.compact(&CompactOptions { threshold: 0.5, batch_records: 3 }).unwrap();
        assert!(report.retired.len() >= 2, "{report:?}");
        (base, fault.ops() - base)
    };
    eprintln!("compaction crash sweep over {total} storage operations");
    assert!(total >= 6, "too few steps to be interesting: {total}");
    let modes = [CrashMode::DropUnsynced, CrashMode::KeepUnsynced, CrashMode::Tear { seed: 7 }];
    for n in 1..=total {
        for mode in modes {
            let dir = tempfile::tempdir().unwrap();
            copy_dir(template.path(), dir.path());
            let (opts, fault) = compact_opts(dir.path(), Some(base + n));
            {
                let repo = Repo::open(dir.path(), HOST, opts).unwrap();
                let result = repo.compact(&CompactOptions { threshold: 0.5, batch_records: 3 });
                assert!(result.is_err(), "op {n} of {total} should have failed");
                assert!(fault.failed());
            }
            fault.crash(mode).unwrap();
            let (opts, _) = compact_opts(dir.path(), None);
            let repo = Repo::open(dir.path(), HOST, opts)
                .unwrap_or_else(|e| panic!("reopen after a crash at compaction op {n} ({mode:?}): {e}"));
            assert_eq!(repo.replayed().damage, [], "op {n} ({mode:?})");
            assert_eq!(observable(&repo, &keys, &kept), expected, "op {n} ({mode:?})");
            let check = repo.check_index().unwrap();
            assert_eq!(check.scan.damage, [], "op {n} ({mode:?})");
            assert_eq!(check.mismatch_count, 0, "op {n} ({mode:?}): {:?}", check.mismatches);
            drop(check);
            // Finishing the job afterwards works and keeps everything.
            repo.compact(&CompactOptions { threshold: 0.5, batch_records: 3 }).unwrap();
            assert_eq!(observable(&repo, &keys, &kept), expected, "op {n} ({mode:?}), compacted again");
            let dump = repo.index().dump().unwrap();
            drop(repo);
            let (opts, _) = compact_opts(dir.path(), None);
            assert_eq!(Repo::rebuild_index(dir.path(), HOST, opts).unwrap().damage, [], "op {n} ({mode:?})");
            let (opts, _) = compact_opts(dir.path(), None);
            let repo = Repo::open(dir.path(), HOST, opts).unwrap();
            assert_eq!(repo.index().dump().unwrap(), dump, "op {n} ({mode:?}): rebuilt index differs");
        }
    }
}

/// Remembers what a reader decoded, and counts the lookups it answered.
#[derive(Default)]
struct CountingCache {
    plains: std::sync::Mutex<BTreeMap<tardis_core::ids::ChunkId, Arc<Vec<u8>>>>,
    hits: std::sync::atomic::AtomicU32,
}

impl view::PlainCache for CountingCache {
    fn get(&self, id: &tardis_core::ids::ChunkId) -> Option<Arc<Vec<u8>>> {
        let found = self.plains.lock().unwrap().get(id).cloned();
        if found.is_some() {
            self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        found
    }
    fn put(&self, id: &tardis_core::ids::ChunkId, plain: Arc<Vec<u8>>) {
        self.plains.lock().unwrap().insert(*id, plain);
    }
}

/// A chain of three versions (full, delta, delta of the delta): the repository accepts only
/// consistent depths and stored bases, every version reads back, and a reader with a cache
/// decodes the shared bases once.
#[test]
fn delta_chains_are_checked_on_append_and_read_through_a_cache() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::open(dir.path(), "h", RepoOptions::default()).unwrap();
    let keys = keys();
    repo.create_host(keys.host(), None).unwrap();
    let mut versions = vec![noise(300_000, 1)];
    for i in 0..2u64 {
        let mut next = versions.last().unwrap().clone();
        next[10_000 * (i as usize + 1)..][..2000].copy_from_slice(&noise(2000, 10 + i));
        versions.push(next);
    }
    let ids: Vec<_> = versions.iter().map(|v| keys.chunk_id(v)).collect();
    let set = repo.open_set("s", 0).unwrap();
    let full = chunkcodec::encode(&keys, ids[0], &versions[0]).unwrap();
    let d1 = chunkcodec::encode_delta(&keys, ids[1], &versions[1], ids[0], &versions[0], 0).unwrap().unwrap();
    let d2 = chunkcodec::encode_delta(&keys, ids[2], &versions[2], ids[1], &versions[1], 1).unwrap().unwrap();
    assert_eq!(d2.delta.unwrap().depth, 2);
    // A delta whose base is not stored, or whose depth is wrong, is refused.
    let err = repo.append(set, vec![Write::Chunk(d1.clone())]).unwrap_err().to_string();
    assert!(err.contains("not stored"), "{err}");
    let mut lying = d1.clone();
    lying.delta.as_mut().unwrap().depth = 3;
    let err = repo.append(set, vec![Write::Chunk(full.clone()), Write::Chunk(lying)]).unwrap_err().to_string();
    assert!(err.contains("depth"), "{err}");
    repo.append(set, vec![Write::Chunk(full), Write::Chunk(d1), Write::Chunk(d2)]).unwrap();

    for (i, id) in ids.iter().enumerate() {
        let read = view::read_chunk(&repo, &keys, id).unwrap();
        assert_eq!((read.plain == versions[i], read.depth), (true, i as u8));
    }
    let cache = CountingCache::default();
    let top = view::read_chunk_cached(&repo, &keys, &ids[2], &cache).unwrap();
    assert!(top.plain == versions[2]);
    assert_eq!(cache.plains.lock().unwrap().len(), 2, "both bases kept");
    let mid = view::read_chunk_cached(&repo, &keys, &ids[1], &cache).unwrap();
    assert_eq!((mid.plain == versions[1], mid.depth), (true, 1));
    assert_eq!(cache.hits.load(std::sync::atomic::Ordering::Relaxed), 1, "the second read stopped at the cached base");
}

/// Bytes that do not compress, different for every seed: keyed hashes of a counter.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let k = Keys::unencrypted(HostId([seed as u8; 16]));
    (0u64..).flat_map(|i| k.chunk_id(&i.to_le_bytes()).0).take(len).collect()
}

/// Bytes that do not compress (xorshift).
fn incompressible(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn free_bytes(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    st.blocks_available() as u64 * st.fragment_size() as u64
}

#[test]
fn compaction_leaves_segments_whose_copies_do_not_fit_and_takes_them_once_they_do() {
    // A small file system of its own, so that free space is real (the tests run as root).
    let dir = tempfile::tempdir().unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tardis-compact-space"])
        .arg(dir.path())
        .status();
    assert!(st.is_ok_and(|s| s.success()), "mounting a tmpfs");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _unmount = Unmount(dir.path());
    let keys = keys();
    let opts = RepoOptions { log: LogOptions { segment_size: 4 << 20 }, ..RepoOptions::default() };
    let repo = Repo::open(dir.path(), HOST, opts).unwrap();
    repo.create_host(keys.host(), None).unwrap();
    // Set one holds a and b, set two keeps a and deletes b: once set one is purged, its
    // segment is half live (a's 1.5 MiB).
    let a = incompressible(1536 << 10, 1);
    let one = repo.open_set("one", 1).unwrap();
    let both: Files = [("a".to_owned(), a.clone()), ("b".to_owned(), incompressible(1536 << 10, 2))].into();
    write_files(&repo, &keys, one, &both, &[]);
    repo.complete_set(one, SetStats::default(), None).unwrap();
    let two = repo.open_set("two", 1).unwrap();
    write_files(&repo, &keys, two, &Files::new(), &["b".to_owned()]);
    repo.complete_set(two, SetStats::default(), None).unwrap();
    let only_a: Files = [("a".to_owned(), a)].into();
    assert_eq!(read_set(&repo, &keys, two), only_a);
    repo.purge_sets(&[one]).unwrap();

    // 2 MiB free: the copy (1.5 MiB) would eat into the 1 MiB kept free for writes.
    let filler = dir.path().join("filler");
    std::fs::write(&filler, vec![1u8; (free_bytes(dir.path()) - (2 << 20)) as usize]).unwrap();
    let before = segment_bytes(dir.path());
    let free_before = free_bytes(dir.path());
    let r = repo.compact(&CompactOptions { threshold: 0.9, ..CompactOptions::default() }).unwrap();
    assert!(r.retired.is_empty() && r.copied_records == 0, "{r:?}");
    let (skipped, need) = r.short_of_space.expect("reported short of space");
    assert_eq!(skipped, 1, "{r:?}");
    assert!(need > 0 && need < 1 << 20, "{r:?}");
    assert_eq!(segment_bytes(dir.path()), before, "nothing was copied");
    assert!(free_bytes(dir.path()) + (64 << 10) >= free_before, "the attempt used no space");
    assert_eq!(read_set(&repo, &keys, two), only_a);

    // With room again, the same compaction copies a and retires the segment.
    std::fs::remove_file(&filler).unwrap();
    let r = repo.compact(&CompactOptions { threshold: 0.9, ..CompactOptions::default() }).unwrap();
    assert_eq!(r.short_of_space, None, "{r:?}");
    assert!(!r.retired.is_empty(), "{r:?}");
    assert!(segment_bytes(dir.path()) < before - (1 << 20), "{r:?}");
    assert_eq!(read_set(&repo, &keys, two), only_a);
}

/// A client that lost the acknowledgement of a batch sends it again: nothing is written twice,
/// so no entry of a set has two records (docs/FORMAT.md §8.8).
#[test]
fn a_repeated_batch_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Unencrypted, so that the same versions seal to the same bytes, as a repeated request has.
    let keys = Keys::unencrypted(HostId([7; 16]));
    let repo = Repo::open(dir.path(), HOST, RepoOptions::default()).unwrap();
    repo.create_host(keys.host(), None).unwrap();
    let set = repo.open_set("s", 1).unwrap();
    let files = files(&[("a", "one"), ("b", "two")]);
    let gone = ["c".to_owned()];
    write_files(&repo, &keys, set, &files, &gone);
    let end = repo.log_end();
    write_files(&repo, &keys, set, &files, &gone);
    assert_eq!(repo.log_end(), end, "the repeat adds no record");
    // A different version of an entry is still written.
    write_files(&repo, &keys, set, &self::files(&[("a", "changed")]), &[]);
    assert!(repo.log_end() > end);
    repo.complete_set(set, SetStats::default(), None).unwrap();
    assert_eq!(read_set(&repo, &keys, set), self::files(&[("a", "changed"), ("b", "two")]));
}
