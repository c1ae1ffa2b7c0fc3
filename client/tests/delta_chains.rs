//! Property test of delta chains through the real backup: random edit scripts (overwrites,
//! insertions, deletions) applied to a random file, one backup per version into an embedded
//! repository with a random `MaxDeltaChain`; every version then reads back exactly, and no
//! chunk is stored deeper than the bound.

use proptest::prelude::*;
use std::fs;
use tardis_client::backup::{backup, BackupOptions, NoProgress};
use tardis_core::api::Repository;
use tardis_core::config::MAX_DELTA_CHAIN;
use tardis_core::crypto::Keys;
use tardis_core::ids::HostId;
use tardis_core::view::{self, Tree};
use tardis_log::{Repo, RepoOptions};

/// Bytes that do not compress, different for every seed: keyed hashes of a counter.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let k = Keys::unencrypted(HostId([(seed % 251) as u8; 16]));
    let salt = seed.to_le_bytes();
    (0u64..).flat_map(|i| k.chunk_id(&[&salt[..], &i.to_le_bytes()].concat()).0).take(len).collect()
}

/// `(kind, at, len, seed)`: overwrite, insert or delete `len` bytes at `at` (scaled to the file).
type Edit = (u8, u32, u16, u64);

fn apply(data: &mut Vec<u8>, (kind, at, len, seed): Edit) {
    let at = (at as usize) % (data.len() + 1);
    let len = usize::from(len);
    match kind % 3 {
        0 => {
            let end = (at + len).min(data.len());
            data[at..end].copy_from_slice(&noise(end - at, seed));
        }
        1 => {
            let tail = data.split_off(at);
            data.extend(noise(len, seed));
            data.extend(tail);
        }
        _ => {
            let end = (at + len).min(data.len());
            data.drain(at..end);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn every_version_reads_back_and_chains_stay_within_the_bound(
        size in 1usize..3_000_000,
        seed in any::<u64>(),
        bound in 1u32..4,
        scripts in proptest::collection::vec(proptest::collection::vec(any::<Edit>(), 1..4), 1..6),
    ) {
        let work = tempfile::tempdir().unwrap();
        let (src, db) = (work.path().join("src"), work.path().join("db"));
        fs::create_dir_all(&src).unwrap();
        let repo = Repo::open(&db, "h", RepoOptions::default()).unwrap();
        let keys = Keys::unencrypted(HostId([5; 16]));
        repo.create_host(keys.host(), None).unwrap();
        repo.set_config(MAX_DELTA_CHAIN, Some(&bound.to_string())).unwrap();
        let path = src.join("file");
        let mut data = noise(size, seed);
        let mut versions = Vec::new();
        for (i, script) in std::iter::once(Vec::new()).chain(scripts).enumerate() {
            for edit in script {
                apply(&mut data, edit);
            }
            fs::write(&path, &data).unwrap();
            let opts = BackupOptions { name: Some(format!("v{i}")), full: true, ..BackupOptions::default() };
            let stats = backup(&repo, &keys, std::slice::from_ref(&src), &opts, &NoProgress).unwrap();
            versions.push((stats.set, data.clone()));
        }
        for (i, (set, want)) in versions.iter().enumerate() {
            let tree = Tree::new(&repo, &keys, *set);
            let node = tree.resolve(path.to_str().unwrap().as_bytes()).unwrap().unwrap();
            let got = tree.read_at(&node, 0, node.size() as usize).unwrap();
            prop_assert!(got == *want, "version {} of {} bytes reads back differently", i, want.len());
            for e in &node.version.extents {
                let depth = view::read_chunk(&repo, &keys, &e.id).unwrap().depth;
                prop_assert!(u32::from(depth) <= bound, "chunk {} at depth {} over the bound {}", e.id, depth, bound);
            }
        }
    }
}
