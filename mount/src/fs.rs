//! The file system itself: FUSE operations answered from a repository through
//! `tardis_core::view`.
//!
//! Layout of the mount:
//!
//! ```text
//! /                      one directory per live set, by name (see `sets`), plus:
//! /latest                symlink to the latest set
//! /.versions/<path>/     every distinct version of <path>, one entry per set that wrote it
//! /<set>/<path>          the backed-up tree as it was in that set
//! ```
//!
//! Every answer comes from the index one directory or one entry at a time (`Tree::lookup`,
//! `Tree::children_of`); nothing walks a whole set. File data is read chunk by chunk through
//! the [`ChunkCache`], with the next chunk prefetched on sequential reads. The repository is
//! immutable while mounted (the mount holds the repository lock), so attributes, entries and
//! pages are cached by the kernel for long and files are opened with `FOPEN_KEEP_CACHE`.
//!
//! Concurrency: fuser runs several request loops (see `session`), so operations run in
//! parallel. The shared state is the inode table (read-write lock, held only around map
//! operations, never during repository I/O), the open handles (a mutex, likewise) and the chunk
//! cache.

use crate::cache::{assemble, touched, ChunkCache, ChunkData};
use crate::error::{Error, Result};
use crate::inodes::{self, Inode, InodeTable, Key};
use crate::sets::{self, SetDirs};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags, KernelConfig,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tardis_core::api::{EntryVersion, Repository};
use tardis_core::crypto::Keys;
use tardis_core::event::Extent;
use tardis_core::ids::{DirId, SetId};
use tardis_core::meta::{FileMeta, Kind, Timestamp};
use tardis_core::view::{self, Node, Tree};

/// How long the kernel may cache attributes and entries. Nothing changes while mounted.
const TTL: Duration = Duration::from_secs(3600);
/// Prefetch requests waiting for the prefetch thread; more are dropped, not queued.
const PREFETCH_QUEUE: usize = 16;

/// Tunables of the file system.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Bytes of decoded chunks to keep.
    pub cache_bytes: usize,
    /// Decode the next chunk in the background during sequential reads.
    pub prefetch: bool,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig { cache_bytes: 64 << 20, prefetch: true }
    }
}

/// The read-only view of one host's repository, ready to be mounted.
pub struct TardisFs {
    shared: Arc<Shared>,
    prefetch: Option<SyncSender<Extent>>,
    prefetcher: Option<std::thread::JoinHandle<()>>,
}

impl Drop for TardisFs {
    fn drop(&mut self) {
        // Stop the prefetch thread and wait for it, so that the repository is closed here, in
        // the thread ending the session, and not by that thread racing the process's exit
        // (RocksDB aborts if its threads still run while the process tears down).
        self.prefetch = None;
        if let Some(t) = self.prefetcher.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for TardisFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TardisFs").field("sets", &self.shared.sets.dirs().len()).finish_non_exhaustive()
    }
}

struct Shared {
    repo: Arc<dyn Repository>,
    keys: Keys,
    sets: SetDirs,
    cache: ChunkCache,
    inodes: RwLock<InodeTable>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    /// Owner of the synthetic directories (root, `.versions`): whoever mounted.
    uid: u32,
    gid: u32,
    /// Time of the synthetic entries: the latest set's finish, or the mount time.
    time: SystemTime,
}

/// An open file or directory.
enum Handle {
    File {
        inode: Arc<Inode>,
        /// Where a sequential read would continue; a read starting there triggers prefetch.
        next: AtomicU64,
        /// One past the index of the last extent prefetched for this handle: each chunk is
        /// asked for once, not once per read that touches its predecessor.
        prefetched: AtomicUsize,
    },
    Dir {
        /// The listing, made on the first `readdir` and reused for the following pages.
        items: Mutex<Option<Arc<Vec<DirItem>>>>,
    },
}

struct DirItem {
    ino: u64,
    kind: FileType,
    name: OsString,
}

/// One entry of a `.versions` directory.
struct VersionItem {
    /// Directory name of the first live set that holds this version.
    name: String,
    set: SetId,
    node: Node,
}

impl TardisFs {
    /// The view of `repo`, whose keys are `keys`. Reads the set list once: sets completed
    /// later are not shown until the next mount.
    pub fn new(repo: Arc<dyn Repository>, keys: Keys, config: FsConfig) -> Result<TardisFs> {
        let sets = SetDirs::new(repo.sets()?);
        let time = sets.latest().and_then(|s| s.info.finished).map(nanos_to_time).unwrap_or_else(SystemTime::now);
        let shared = Arc::new(Shared {
            repo,
            keys,
            sets,
            cache: ChunkCache::new(config.cache_bytes),
            inodes: RwLock::new(InodeTable::default()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            time,
        });
        let (prefetch, prefetcher) = if config.prefetch {
            let (tx, rx) = sync_channel(PREFETCH_QUEUE);
            let s = shared.clone();
            let t = std::thread::Builder::new()
                .name("tardisfs-prefetch".into())
                .spawn(move || prefetcher(&s, rx))
                .map_err(|e| Error::io("starting the prefetch thread for", "the mount", e))?;
            (Some(tx), Some(t))
        } else {
            (None, None)
        };
        Ok(TardisFs { shared, prefetch, prefetcher })
    }
}

/// Decodes chunks that sequential readers will want next, until the file system goes away.
fn prefetcher(shared: &Shared, rx: Receiver<Extent>) {
    for e in rx {
        tracing::trace!(chunk = %e.id, "prefetching");
        if let Err(err) = shared.chunk(&e) {
            // The reader that gets there will try again and report the error.
            tracing::debug!(chunk = %e.id, "prefetch failed: {err}");
        }
    }
}

impl Shared {
    fn table(&self) -> std::sync::RwLockReadGuard<'_, InodeTable> {
        // The table's maps stay consistent even if a thread panicked while holding the lock.
        self.inodes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn table_mut(&self) -> std::sync::RwLockWriteGuard<'_, InodeTable> {
        self.inodes.write().unwrap_or_else(|p| p.into_inner())
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Handle>>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tree(&self, set: SetId) -> Tree<'_> {
        Tree::new(&*self.repo, &self.keys, set)
    }

    /// The ID under which the children of every set's `/` are stored.
    fn top_dir(&self) -> DirId {
        self.keys.dir_id(&DirId::TOP, view::ROOT_NAME)
    }

    fn inode(&self, ino: INodeNo) -> Result<Arc<Inode>, Errno> {
        self.table().get(ino.0).ok_or(Errno::ENOENT)
    }

    fn chunk(&self, e: &Extent) -> Result<ChunkData> {
        self.cache.get(&e.id, || view::read_extent_cached(&*self.repo, &self.keys, e, &self.cache))
    }

    // ---- lookups ----

    /// The child `name` of directory inode `parent`: its key and a fresh inode for it.
    fn find(&self, parent: &Inode, name: &[u8]) -> Result<Option<(Key, Inode)>> {
        match parent {
            Inode::Root => Ok(self.find_in_root(name)?),
            Inode::Set { set, .. } => self.find_entry(*set, &self.top_dir(), name),
            Inode::Entry { set, node } => match node.child_dir(&self.keys) {
                Some(dir) => self.find_entry(*set, &dir, name),
                None => Ok(None),
            },
            Inode::Versions { dir, name: path_name } => self.find_version(dir, path_name, name),
            Inode::Latest => Ok(None),
        }
    }

    fn find_in_root(&self, name: &[u8]) -> Result<Option<(Key, Inode)>> {
        let Some(d) = std::str::from_utf8(name).ok().and_then(|n| self.sets.by_name(n)) else { return Ok(None) };
        let root = self.tree(d.info.id).root()?;
        Ok(Some((Key::Set(d.info.id), Inode::Set { set: d.info.id, root })))
    }

    fn find_entry(&self, set: SetId, dir: &DirId, name: &[u8]) -> Result<Option<(Key, Inode)>> {
        Ok(self.tree(set).lookup(dir, name)?.map(|node| (Key::of_node(set, &node), Inode::Entry { set, node })))
    }

    /// In `.versions/<path>`: a set name is that version of <path>; any other name is the
    /// history directory of `<path>/<name>`, if that path was ever backed up.
    fn find_version(&self, dir: &DirId, path_name: &[u8], name: &[u8]) -> Result<Option<(Key, Inode)>> {
        if let Some(v) = self.versions(dir, path_name)?.into_iter().find(|v| v.name.as_bytes() == name) {
            return Ok(Some((Key::of_node(v.set, &v.node), Inode::Entry { set: v.set, node: v.node })));
        }
        let child_dir = self.keys.dir_id(dir, path_name);
        let key = self.keys.name_key(&child_dir, name);
        let seen = self.repo.history(&child_dir, &key)?.iter().any(|v| self.sets.is_completed(v.set()));
        Ok(seen.then(|| {
            (Key::Versions { dir: child_dir, name: key }, Inode::Versions { dir: child_dir, name: name.to_vec() })
        }))
    }

    /// Every distinct version of the entry `name` in `dir`, oldest first, each named after the
    /// first live set that holds it (the seed's `lstardis`, as `tardis-tools ls --versions`).
    fn versions(&self, dir: &DirId, name: &[u8]) -> Result<Vec<VersionItem>> {
        let key = self.keys.name_key(dir, name);
        // Versions and deletions of sets that never completed were never visible to any set.
        let events: Vec<EntryVersion> =
            self.repo.history(dir, &key)?.into_iter().filter(|v| self.sets.is_completed(v.set())).collect();
        let mut out = Vec::new();
        for (i, ev) in events.iter().enumerate() {
            let EntryVersion::Version(fv) = ev else { continue };
            let until = events.get(i + 1).map(EntryVersion::set);
            let Some(shown) = self.sets.first_live_in(fv.set, until) else { continue };
            let meta = view::open_meta(&self.keys, fv)?;
            out.push(VersionItem {
                name: shown.name.clone(),
                set: shown.info.id,
                node: Node { version: fv.clone(), meta },
            });
        }
        Ok(out)
    }

    /// Looks `name` up in `parent` and records the kernel's new reference.
    fn lookup(&self, parent: INodeNo, name: &OsStr) -> Result<(u64, Arc<Inode>), Errno> {
        let parent = self.inode(parent)?;
        let name = name.as_bytes();
        if let Inode::Root = *parent {
            match name {
                n if n == sets::LATEST.as_bytes() && self.sets.latest().is_some() => {
                    return Ok((inodes::LATEST, self.inode(INodeNo(inodes::LATEST))?))
                }
                n if n == sets::VERSIONS.as_bytes() => {
                    return Ok((inodes::VERSIONS_ROOT, self.inode(INodeNo(inodes::VERSIONS_ROOT))?))
                }
                _ => {}
            }
        }
        match self.find(&parent, name) {
            Ok(Some((key, inode))) => Ok(self.table_mut().remember(key, || inode)),
            Ok(None) => Err(Errno::ENOENT),
            Err(e) => Err(self.failed("looking up", &String::from_utf8_lossy(name), &e)),
        }
    }

    /// Logs an error that is not a plain "not found" and turns it into an errno.
    fn failed(&self, op: &str, what: &str, e: &Error) -> Errno {
        let errno = e.errno();
        if errno != libc::ENOENT {
            tracing::error!("{op} {what}: {e}");
        }
        Errno::from_i32(errno)
    }

    // ---- attributes ----

    fn attr(&self, ino: u64, inode: &Inode) -> FileAttr {
        let dir = |nlink: u32| FileAttr {
            ino: INodeNo(ino),
            size: 0,
            blocks: 0,
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind: FileType::Directory,
            perm: 0o555,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        };
        match inode {
            Inode::Root => dir(3 + self.sets.dirs().len() as u32),
            Inode::Versions { .. } => dir(2),
            Inode::Latest => {
                let target = self.sets.latest().map_or(0, |s| s.name.len() as u64);
                FileAttr { kind: FileType::Symlink, perm: 0o777, nlink: 1, size: target, ..dir(1) }
            }
            Inode::Set { set, root } => {
                let finished = self.sets.live(*set).and_then(|s| s.info.finished).map_or(self.time, nanos_to_time);
                let base = match root {
                    Some(n) => meta_attr(ino, &n.meta, &n.version.extents),
                    None => dir(2),
                };
                // A set's directory is dated by the set, not by the backed-up `/`.
                FileAttr { kind: FileType::Directory, atime: finished, mtime: finished, ctime: finished, ..base }
            }
            Inode::Entry { node, .. } => meta_attr(ino, &node.meta, &node.version.extents),
        }
    }

    // ---- directories ----

    fn list(&self, ino: u64, inode: &Inode) -> Result<Vec<DirItem>> {
        let mut items = vec![
            DirItem { ino, kind: FileType::Directory, name: ".".into() },
            // The kernel answers `..` itself; the number here is only what `ls -ai` shows.
            DirItem { ino: inodes::ROOT, kind: FileType::Directory, name: "..".into() },
        ];
        let nodes = |set: SetId, dir: &DirId| -> Result<Vec<DirItem>> {
            let children = self.tree(set).children_of(dir)?;
            let table = self.table();
            Ok(children
                .into_iter()
                .map(|n| DirItem {
                    ino: table.number(&Key::of_node(set, &n)),
                    kind: file_type(n.meta.kind),
                    name: OsString::from_vec(n.meta.name.into_vec()),
                })
                .collect())
        };
        match inode {
            Inode::Root => {
                let table = self.table();
                for d in self.sets.dirs() {
                    let ino = table.number(&Key::Set(d.info.id));
                    items.push(DirItem { ino, kind: FileType::Directory, name: d.name.clone().into() });
                }
                if self.sets.latest().is_some() {
                    items.push(DirItem { ino: inodes::LATEST, kind: FileType::Symlink, name: sets::LATEST.into() });
                }
                items.push(DirItem {
                    ino: inodes::VERSIONS_ROOT,
                    kind: FileType::Directory,
                    name: sets::VERSIONS.into(),
                });
            }
            Inode::Set { set, .. } => items.extend(nodes(*set, &self.top_dir())?),
            Inode::Entry { set, node } => match node.child_dir(&self.keys) {
                Some(dir) => items.extend(nodes(*set, &dir)?),
                None => return Err(Error::Core(tardis_core::Error::Invalid("not a directory".into()))),
            },
            Inode::Versions { dir, name } => {
                let versions = self.versions(dir, name)?;
                let table = self.table();
                for v in versions {
                    items.push(DirItem {
                        ino: table.number(&Key::of_node(v.set, &v.node)),
                        kind: file_type(v.node.meta.kind),
                        name: v.name.into(),
                    });
                }
            }
            Inode::Latest => return Err(Error::Core(tardis_core::Error::Invalid("not a directory".into()))),
        }
        Ok(items)
    }

    // ---- extended attributes ----

    /// The extended attributes of an inode: the stored ones (including POSIX ACLs) and
    /// Tardis' own `user.tardis.*`.
    fn xattrs(&self, inode: &Inode) -> Vec<(Vec<u8>, Vec<u8>)> {
        let stored = |m: &FileMeta| m.xattrs.iter().map(|x| (x.name.to_vec(), x.value.to_vec())).collect::<Vec<_>>();
        match inode {
            Inode::Set { set, root } => {
                let mut out = root.as_ref().map(|n| stored(&n.meta)).unwrap_or_default();
                if let Some(d) = self.sets.live(*set) {
                    out.push((b"user.tardis.priority".to_vec(), d.info.priority.to_string().into_bytes()));
                    if let Some(f) = d.info.finished {
                        out.push((b"user.tardis.time".to_vec(), format_time(f).into_bytes()));
                    }
                }
                out
            }
            Inode::Entry { node, .. } => {
                let mut out = stored(&node.meta);
                // The kernel allows user.* attributes only on files and directories.
                if matches!(node.meta.kind, Kind::File | Kind::Dir) {
                    if let Some(name) = self.sets.name_of(node.version.set) {
                        out.push((b"user.tardis.since".to_vec(), name.as_bytes().to_vec()));
                    }
                }
                out
            }
            Inode::Root | Inode::Latest | Inode::Versions { .. } => Vec::new(),
        }
    }

    // ---- reads ----

    fn read(
        &self,
        inode: &Inode,
        handle: Option<&Handle>,
        offset: u64,
        size: u32,
        prefetch: Option<&SyncSender<Extent>>,
    ) -> Result<Vec<u8>> {
        let Inode::Entry { node, .. } = inode else {
            return Err(Error::Core(tardis_core::Error::Invalid("not a regular file".into())));
        };
        let extents = &node.version.extents;
        let data = assemble(extents, node.meta.size, offset, size as usize, |e| self.chunk(e))?;
        let end = offset + data.len() as u64;
        if let (Some(Handle::File { next, prefetched, .. }), Some(tx)) = (handle, prefetch) {
            let sequential = next.swap(end, Ordering::Relaxed) == offset;
            // The chunk after the ones this read touched: decode it while the reader consumes
            // this one.
            let i = touched(extents, offset, end.max(offset + 1)).end;
            if sequential && i < extents.len() && prefetched.fetch_max(i + 1, Ordering::Relaxed) < i + 1 {
                let e = extents[i];
                if !self.cache.contains(&e.id) {
                    // A full queue drops the hint rather than blocking a read.
                    let _ = tx.try_send(e);
                }
            }
        }
        Ok(data)
    }

    fn statfs(&self) -> (u64, u64) {
        self.sets.latest().map_or((0, 0), |s| (s.info.stats.bytes.div_ceil(4096), s.info.stats.entries))
    }
}

/// Attributes of a stored entry.
fn meta_attr(ino: u64, m: &FileMeta, extents: &[Extent]) -> FileAttr {
    let kind = file_type(m.kind);
    // Allocated blocks: the data extents of a file (holes take none, so sparse files look
    // sparse), the size of anything else.
    let allocated = match m.kind {
        Kind::File => extents.iter().map(|e| u64::from(e.len)).sum::<u64>(),
        _ => m.size,
    };
    FileAttr {
        ino: INodeNo(ino),
        size: m.size,
        blocks: allocated.div_ceil(512),
        atime: to_time(m.atime),
        mtime: to_time(m.mtime),
        ctime: to_time(m.ctime),
        crtime: to_time(m.mtime),
        kind,
        perm: (m.mode & 0o7777) as u16,
        nlink: u32::try_from(m.nlink).unwrap_or(u32::MAX).max(1),
        uid: m.uid,
        gid: m.gid,
        rdev: kernel_rdev(m.rdev),
        blksize: 4096,
        flags: 0,
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

/// Converts a stored `st_rdev` (glibc's 64-bit encoding) to the kernel's 32-bit one, which is
/// what FUSE carries: major in bits 8–19, minor in bits 0–7 and 20–31.
fn kernel_rdev(dev: u64) -> u32 {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    ((minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)) as u32
}

fn to_time(t: Timestamp) -> SystemTime {
    let nsec = Duration::from_nanos(u64::from(t.nsec.min(999_999_999)));
    if t.sec >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(t.sec as u64) + nsec).unwrap_or(UNIX_EPOCH)
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(t.sec.unsigned_abs()))
            .and_then(|b| b.checked_add(nsec))
            .unwrap_or(UNIX_EPOCH)
    }
}

fn nanos_to_time(n: i64) -> SystemTime {
    to_time(Timestamp { sec: n.div_euclid(1_000_000_000), nsec: n.rem_euclid(1_000_000_000) as u32 })
}

/// A set's time as `user.tardis.time` shows it: RFC 3339 in local time, to the second.
fn format_time(nanos: i64) -> String {
    use chrono::TimeZone;
    chrono::Local.timestamp_nanos(nanos).to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
}

/// Answers a `getxattr`/`listxattr` with `value`: its size when asked for the size, ERANGE
/// when the caller's buffer is too small.
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

impl Filesystem for TardisFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Parallel lookups in one directory, and symlink targets in the page cache: both are
        // safe because nothing changes. Kernels without them simply do without.
        for cap in [InitFlags::FUSE_PARALLEL_DIROPS, InitFlags::FUSE_CACHE_SYMLINKS] {
            let _ = config.add_capabilities(cap);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        tracing::debug!(chunks_decoded = self.shared.cache.decoded(), "unmounted");
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.shared.lookup(parent, name) {
            Ok((ino, inode)) => reply.entry(&TTL, &self.shared.attr(ino, &inode), fuser::Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.shared.table_mut().forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.shared.inode(ino) {
            Ok(inode) => reply.attr(&TTL, &self.shared.attr(ino.0, &inode)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.shared.inode(ino).as_deref() {
            Ok(Inode::Latest) => match self.shared.sets.latest() {
                Some(s) => reply.data(s.name.as_bytes()),
                None => reply.error(Errno::ENOENT),
            },
            Ok(Inode::Entry { node, .. }) => match &node.meta.target {
                Some(t) => reply.data(t),
                None => reply.error(Errno::EINVAL),
            },
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(*e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        let inode = match self.shared.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        if !matches!(&*inode, Inode::Entry { node, .. } if node.meta.kind == Kind::File) {
            return reply.error(Errno::EINVAL);
        }
        let fh = self.shared.next_fh.fetch_add(1, Ordering::Relaxed);
        self.shared
            .handles()
            .insert(fh, Arc::new(Handle::File { inode, next: AtomicU64::new(0), prefetched: AtomicUsize::new(0) }));
        // The content never changes: keep the kernel's cached pages across opens.
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let handle = self.shared.handles().get(&fh.0).cloned();
        let inode = match handle.as_deref() {
            Some(Handle::File { inode, .. }) => inode.clone(),
            _ => match self.shared.inode(ino) {
                Ok(i) => i,
                Err(e) => return reply.error(e),
            },
        };
        match self.shared.read(&inode, handle.as_deref(), offset, size, self.prefetch.as_ref()) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(self.shared.failed("reading", &format!("inode {} at {offset}", ino.0), &e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.shared.handles().remove(&fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if let Err(e) = self.shared.inode(ino) {
            return reply.error(e);
        }
        let fh = self.shared.next_fh.fetch_add(1, Ordering::Relaxed);
        self.shared.handles().insert(fh, Arc::new(Handle::Dir { items: Mutex::new(None) }));
        // Listings never change: the kernel may keep them in its cache.
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR);
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let handle = self.shared.handles().get(&fh.0).cloned();
        let cached = match handle.as_deref() {
            Some(Handle::Dir { items }) => items.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            _ => None,
        };
        let items = match cached {
            Some(items) => items,
            None => {
                let inode = match self.shared.inode(ino) {
                    Ok(i) => i,
                    Err(e) => return reply.error(e),
                };
                let items = match self.shared.list(ino.0, &inode) {
                    Ok(items) => Arc::new(items),
                    Err(e) => return reply.error(self.shared.failed("listing", &format!("inode {}", ino.0), &e)),
                };
                if let Some(Handle::Dir { items: slot }) = handle.as_deref() {
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(items.clone());
                }
                items
            }
        };
        for (i, item) in items.iter().enumerate().skip(offset as usize) {
            // The offset of an entry is where the next call continues after it.
            if reply.add(INodeNo(item.ino), i as u64 + 1, item.kind, &item.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.shared.handles().remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (blocks, files) = self.shared.statfs();
        reply.statfs(blocks, 0, 0, files, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let inode = match self.shared.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        match self.shared.xattrs(&inode).into_iter().find(|(n, _)| n.as_slice() == name.as_bytes()) {
            Some((_, value)) => reply_xattr(reply, size, &value),
            None => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let inode = match self.shared.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let mut names = Vec::new();
        for (n, _) in self.shared.xattrs(&inode) {
            names.extend_from_slice(&n);
            names.push(0);
        }
        reply_xattr(reply, size, &names);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.shared.inode(ino) {
            Err(e) => reply.error(e),
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Ok(_) => reply.ok(),
        }
    }

    // Everything that would change the tree is refused: backups are immutable. (The mount is
    // also made with `ro`, so the kernel refuses most of these before they get here.)

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, _mode: u32, _umask: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, _target: &Path, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(&self, _req: &Request, _ino: INodeNo, _newparent: INodeNo, _newname: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: fuser::LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_keep_major_and_minor() {
        // glibc's makedev(1, 3) and makedev(259, 70000).
        assert_eq!(kernel_rdev(0x103), 0x103);
        let glibc = |major: u64, minor: u64| {
            (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12) | ((major & !0xfff) << 32)
        };
        let k = kernel_rdev(glibc(259, 70000));
        // The kernel's new_decode_dev.
        assert_eq!((k & 0xfff00) >> 8, 259);
        assert_eq!((k & 0xff) | ((k >> 12) & 0xfff00), 70000);
    }

    #[test]
    fn times_before_and_after_the_epoch() {
        assert_eq!(to_time(Timestamp { sec: 1, nsec: 5 }), UNIX_EPOCH + Duration::new(1, 5));
        assert_eq!(to_time(Timestamp { sec: -2, nsec: 500_000_000 }), UNIX_EPOCH - Duration::from_millis(1500));
        assert_eq!(nanos_to_time(-1), UNIX_EPOCH - Duration::from_nanos(1));
    }

    #[test]
    fn sparse_files_allocate_only_their_extents() {
        let m = FileMeta { kind: Kind::File, size: 1 << 20, nlink: 1, ..FileMeta::default() };
        let e = [Extent { offset: 0, len: 4096, id: tardis_core::ids::ChunkId::default() }];
        let a = meta_attr(20, &m, &e);
        assert_eq!(a.blocks, 8);
        assert_eq!(a.size, 1 << 20);
        assert_eq!(meta_attr(20, &m, &[]).blocks, 0);
    }
}
