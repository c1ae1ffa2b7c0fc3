//! The inode table: which kernel inode number stands for what.
//!
//! Nothing is loaded up front. An inode is created when the kernel first learns its number (a
//! `lookup` reply) and dropped when the kernel forgets it (`forget` brings its lookup count to
//! zero), so the table holds about what the kernel's own inode cache holds, however large the
//! repository. Numbers are a hash of what the inode is (set, directory ID, name key), so the
//! same entry gets the same number again after it was forgotten, and `readdir` can give the
//! number of an entry without creating it. A hash collision is resolved by probing to the next
//! free number, which only a table lookup can see; the few inodes that are always there (the
//! root, `latest`, `.versions`) have fixed numbers below [`FIRST_DYNAMIC`].

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use tardis_core::ids::{DirId, NameKey, SetId};
use tardis_core::meta::Kind;
use tardis_core::view::Node;

/// The mount's root directory (the kernel's fixed root number).
pub const ROOT: u64 = 1;
/// The `latest` symlink.
pub const LATEST: u64 = 2;
/// `.versions`, the history view of `/`.
pub const VERSIONS_ROOT: u64 = 3;
/// Hashed numbers start here.
pub const FIRST_DYNAMIC: u64 = 16;

/// What an inode stands for, as far as its number is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// A set's directory at the root (the set's `/`).
    Set(SetId),
    /// An entry as seen from set `set`: its directory ID and name key.
    Entry { set: SetId, dir: DirId, name: NameKey },
    /// A hard-linked file of set `set`: every name of it shares one inode, as on the source.
    Link { set: SetId, dev: u64, ino: u64 },
    /// The `.versions` directory of one path (its directory ID and name key).
    Versions { dir: DirId, name: NameKey },
}

impl Key {
    /// The key of an entry seen from `set`.
    pub fn of_node(set: SetId, node: &Node) -> Key {
        if node.meta.kind == Kind::File && node.meta.nlink > 1 {
            Key::Link { set, dev: node.meta.dev, ino: node.meta.ino }
        } else {
            Key::Entry { set, dir: node.version.dir, name: node.version.name }
        }
    }

    fn hash_ino(&self) -> u64 {
        // SipHash with fixed keys: the same key gets the same number for the whole mount.
        let mut h = std::hash::DefaultHasher::new();
        self.hash(&mut h);
        h.finish().max(FIRST_DYNAMIC)
    }
}

/// What the file system needs to answer for an inode.
#[derive(Debug)]
pub enum Inode {
    /// The mount's root: one directory per set, `latest`, `.versions`.
    Root,
    /// The symlink to the latest set.
    Latest,
    /// A set's directory; `root` is the set's stored `/` entry, if it has one.
    Set { set: SetId, root: Option<Node> },
    /// An entry of a set's tree, as seen from set `set`.
    Entry { set: SetId, node: Node },
    /// `.versions/<path>`: `dir` and `name` are the path's directory ID and last component
    /// (the root `/` for `.versions` itself).
    Versions { dir: DirId, name: Vec<u8> },
}

#[derive(Debug)]
struct Slot {
    key: Option<Key>,
    inode: Arc<Inode>,
    /// The kernel's lookup count; pinned slots ignore it.
    lookups: u64,
    pinned: bool,
}

/// The table; the file system keeps it behind a lock.
#[derive(Debug)]
pub struct InodeTable {
    slots: HashMap<u64, Slot>,
}

impl Default for InodeTable {
    fn default() -> Self {
        let mut slots = HashMap::new();
        let mut pin =
            |ino, inode| slots.insert(ino, Slot { key: None, inode: Arc::new(inode), lookups: 0, pinned: true });
        pin(ROOT, Inode::Root);
        pin(LATEST, Inode::Latest);
        pin(VERSIONS_ROOT, Inode::Versions { dir: DirId::TOP, name: tardis_core::view::ROOT_NAME.to_vec() });
        InodeTable { slots }
    }
}

impl InodeTable {
    /// The inode numbered `ino`, if the kernel may still use that number.
    pub fn get(&self, ino: u64) -> Option<Arc<Inode>> {
        self.slots.get(&ino).map(|s| s.inode.clone())
    }

    /// The number `key` has, or would get if it were looked up now.
    pub fn number(&self, key: &Key) -> u64 {
        let mut ino = key.hash_ino();
        loop {
            match self.slots.get(&ino) {
                Some(s) if s.key.as_ref() != Some(key) => ino = next(ino),
                _ => return ino,
            }
        }
    }

    /// Records one more kernel lookup of `key`, creating its inode with `make` if it is not in
    /// the table. Returns the number and the inode (the existing one if there was one).
    pub fn remember(&mut self, key: Key, make: impl FnOnce() -> Inode) -> (u64, Arc<Inode>) {
        let ino = self.number(&key);
        let slot = self.slots.entry(ino).or_insert_with(|| Slot {
            key: Some(key),
            inode: Arc::new(make()),
            lookups: 0,
            pinned: false,
        });
        slot.lookups += 1;
        (ino, slot.inode.clone())
    }

    /// The kernel dropped `n` lookups of `ino`; at zero the inode goes away.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if let Some(s) = self.slots.get_mut(&ino) {
            s.lookups = s.lookups.saturating_sub(n);
            if s.lookups == 0 && !s.pinned {
                self.slots.remove(&ino);
            }
        }
    }

    /// Inodes held (for tests and the debug log).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Never true: the fixed inodes are always there.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

fn next(ino: u64) -> u64 {
    ino.checked_add(1).unwrap_or(FIRST_DYNAMIC).max(FIRST_DYNAMIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8) -> Key {
        Key::Entry { set: 1, dir: DirId([n; 16]), name: NameKey([n; 16]) }
    }

    #[test]
    fn numbers_are_stable_and_forget_frees() {
        let mut t = InodeTable::default();
        let before = t.len();
        let predicted = t.number(&entry(1));
        let (a, _) = t.remember(entry(1), || Inode::Root);
        assert_eq!(a, predicted);
        assert!(a >= FIRST_DYNAMIC);
        let (again, _) = t.remember(entry(1), || unreachable!("already in the table"));
        assert_eq!(again, a);
        t.forget(a, 1);
        assert!(t.get(a).is_some(), "one lookup left");
        t.forget(a, 1);
        assert!(t.get(a).is_none());
        assert_eq!(t.len(), before);
        let (b, _) = t.remember(entry(1), || Inode::Root);
        assert_eq!(b, a, "the same entry gets the same number after being forgotten");
    }

    #[test]
    fn collisions_probe_to_a_free_number() {
        let mut t = InodeTable::default();
        let h = entry(2).hash_ino();
        // Occupy the number entry 2 hashes to with another key.
        t.slots.insert(h, Slot { key: Some(entry(3)), inode: Arc::new(Inode::Root), lookups: 1, pinned: false });
        let (ino, _) = t.remember(entry(2), || Inode::Latest);
        assert_ne!(ino, h);
        assert!(matches!(*t.get(ino).unwrap(), Inode::Latest));
        assert!(matches!(*t.get(h).unwrap(), Inode::Root));
    }

    #[test]
    fn fixed_inodes_are_never_forgotten() {
        let mut t = InodeTable::default();
        t.forget(ROOT, 100);
        t.forget(VERSIONS_ROOT, 1);
        assert!(matches!(*t.get(ROOT).unwrap(), Inode::Root));
        assert!(matches!(*t.get(VERSIONS_ROOT).unwrap(), Inode::Versions { .. }));
        assert_eq!(next(u64::MAX), FIRST_DYNAMIC);
    }
}
