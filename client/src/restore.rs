//! Writing backed-up entries back to disk, for `regenerate`.
//!
//! Every new entry is first made under a temporary name (`.<name>.tardis-tmp`) in its target
//! directory and then renamed into place, so a restore that is killed half-way never leaves a
//! truncated file (or a half-made node) under the real name, and an existing entry is replaced
//! only when [`RestoreOptions::overwrite`] says so. A whole tree restored to a path that does
//! not exist yet gets the same guarantee more cheaply: it is built under one temporary name
//! ([`begin_tree`]), its entries written directly ([`RestoreOptions::direct`]), and renamed into
//! place once complete ([`finish_tree`]). Regular files go through [`FileWriter`], which
//! writes only the data regions it is given: gaps stay holes, so sparse files come back sparse.
//!
//! Metadata is applied in the order the kernel requires: owner first (chown clears set-uid and
//! set-gid bits), then extended attributes, then the mode, and the times last (every earlier
//! step changes ctime, and writing into a directory changes its mtime). A regular file gets it
//! through the descriptor it was written with, in [`FileWriter::finish`], before it takes its
//! name; everything else by path with [`apply_meta`]. The caller therefore applies a directory's
//! metadata after everything inside it has been written, i.e. in post-order; that also lets a
//! read-only directory be filled first.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::stat::{futimens, mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::mkfifo;
use tardis_core::meta::{FileMeta, Kind, Timestamp};
use xattr::FileExt as _;

use crate::error::{Error, Result};
use crate::fsmeta::{is_unsupported, Owners};

/// How a restore treats ownership and existing entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreOptions {
    /// Set the saved owner and group. Only root may give files away, so the default is on for
    /// root and off for everyone else.
    pub owners: bool,
    /// Replace entries that already exist at the target path; otherwise they are an error.
    pub overwrite: bool,
    /// Entries are written directly under their names, without a temporary name each, because
    /// they go into a tree of [`begin_tree`] that nothing else sees until [`finish_tree`]. Saves
    /// a rename, a stat and an unlink per file: a fifth of a full restore's system time.
    pub direct: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions { owners: nix::unistd::geteuid().is_root(), overwrite: false, direct: false }
    }
}

/// Creates a directory, symlink, FIFO or device node at `path` as described by `meta`, with
/// private permissions until [`apply_meta`] sets the real ones. An existing directory is reused.
/// Regular files are written with [`FileWriter`] instead.
pub fn create_node(path: &Path, meta: &FileMeta, opts: &RestoreOptions) -> Result<()> {
    match meta.kind {
        Kind::Dir if opts.direct => create_new_dir(path),
        Kind::Dir => create_dir(path, opts),
        Kind::File => Err(Error::io(
            "creating",
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "regular files are restored with FileWriter"),
        )),
        Kind::Symlink | Kind::Fifo | Kind::CharDev | Kind::BlockDev if opts.direct => {
            make_special(path, meta).map_err(Error::io_at("creating", path))
        }
        Kind::Symlink | Kind::Fifo | Kind::CharDev | Kind::BlockDev => {
            if !opts.overwrite {
                refuse_existing(path)?;
            }
            let tmp = temp_path(path)?;
            remove_stale(&tmp)?;
            make_special(&tmp, meta).map_err(Error::io_at("creating", path))?;
            place(&tmp, path, opts.overwrite).map_err(|e| {
                let _ = fs::remove_file(&tmp);
                Error::io("moving into place", path, e)
            })
        }
    }
}

fn create_dir(path: &Path, opts: &RestoreOptions) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => return Ok(()),
        Ok(_) if opts.overwrite => fs::remove_file(path).map_err(Error::io_at("replacing", path))?,
        Ok(_) => return Err(exists_error(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("reading metadata of", path, e)),
    }
    create_new_dir(path)
}

fn create_new_dir(path: &Path) -> Result<()> {
    // Owner-only until apply_meta: the restore is still writing into it.
    fs::DirBuilder::new().mode(0o700).create(path).map_err(Error::io_at("creating directory", path))
}

fn make_special(tmp: &Path, meta: &FileMeta) -> io::Result<()> {
    let private = Mode::from_bits_truncate(0o600);
    match meta.kind {
        Kind::Symlink => {
            let target = meta
                .target
                .as_ref()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "symlink metadata without a target"))?;
            std::os::unix::fs::symlink(OsStr::from_bytes(target), tmp)
        }
        Kind::Fifo => Ok(mkfifo(tmp, private)?),
        Kind::CharDev => Ok(mknod(tmp, SFlag::S_IFCHR, private, meta.rdev)?),
        Kind::BlockDev => Ok(mknod(tmp, SFlag::S_IFBLK, private, meta.rdev)?),
        // create_node sends these elsewhere before calling us.
        Kind::File | Kind::Dir => Err(io::Error::new(io::ErrorKind::InvalidInput, "not a special file")),
    }
}

/// Makes `new` a hard link to the already restored `existing`.
pub fn link(existing: &Path, new: &Path, opts: &RestoreOptions) -> Result<()> {
    if !opts.overwrite || opts.direct {
        return fs::hard_link(existing, new).map_err(Error::io_at("linking", new));
    }
    let tmp = temp_path(new)?;
    remove_stale(&tmp)?;
    fs::hard_link(existing, &tmp).map_err(Error::io_at("linking", new))?;
    let renamed = fs::rename(&tmp, new);
    // If `new` already was a link to the same inode, rename succeeds without doing anything and
    // the temporary name remains; it must not be left behind.
    let _ = fs::remove_file(&tmp);
    renamed.map_err(Error::io_at("moving into place", new))
}

/// Writes a regular file's data to a temporary file beside the target and moves it into place
/// only once it is complete (directly to the target with [`RestoreOptions::direct`]). Dropping
/// a writer without [`FileWriter::finish`] removes the file it was writing.
#[derive(Debug)]
pub struct FileWriter {
    file: File,
    tmp: PathBuf,
    target: PathBuf,
    opts: RestoreOptions,
    /// The end of the furthest write: the length the file has without a `set_len`.
    end: u64,
    finished: bool,
}

impl FileWriter {
    /// Starts restoring the file at `path`. Fails at once, before any data is fetched, if `path`
    /// exists and `opts.overwrite` is off.
    pub fn create(path: &Path, opts: &RestoreOptions) -> Result<FileWriter> {
        let tmp = if opts.direct {
            path.to_path_buf()
        } else {
            if !opts.overwrite {
                refuse_existing(path)?;
            }
            let tmp = temp_path(path)?;
            remove_stale(&tmp)?;
            tmp
        };
        // create_new never follows a symlink planted under the temporary name.
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(Error::io_at("creating", &tmp))?;
        Ok(FileWriter { file, tmp, target: path.to_path_buf(), opts: *opts, end: 0, finished: false })
    }

    /// Writes `data` at `offset`. Ranges never written read back as zeros and take no space.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, offset).map_err(Error::io_at("writing", &self.tmp))?;
        // An empty write does not make the file longer.
        if !data.is_empty() {
            self.end = self.end.max(offset + data.len() as u64);
        }
        Ok(())
    }

    /// Gives the file its length (`meta.size`; a trailing gap becomes a hole) and the rest of
    /// `meta` as [`apply_meta`] would, then, unless it was written directly
    /// ([`RestoreOptions::direct`]), renames it onto the target. The metadata goes through the
    /// open descriptor: four calls that each resolved the whole path took a tenth of a full
    /// restore's system time.
    pub fn finish(mut self, meta: &FileMeta, owners: &Owners) -> Result<()> {
        // The file is new, so its length is the end of the last write unless a hole trails it.
        if self.end != meta.size {
            self.file.set_len(meta.size).map_err(Error::io_at("setting the length of", &self.tmp))?;
        }
        apply(On::Open(&self.file, &self.tmp), meta, &self.opts, owners)?;
        // No fsync per file: a killed restore never shows a partial file under the target name
        // (the rename of the file, or of the staged tree, is the last step), and durability
        // comes from one `sync_filesystem` at the end of the restore, which is an order of
        // magnitude faster on trees of small files.
        if !self.opts.direct {
            place(&self.tmp, &self.target, self.opts.overwrite)
                .map_err(Error::io_at("moving into place", &self.target))?;
        }
        self.finished = true;
        Ok(())
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        if !self.finished {
            // Best effort: a leftover is removed by the next restore of the same path anyway.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Sets owner, extended attributes, mode and times of `path` (never following a symlink) from
/// `meta`. Call it after the entry's content is complete, and for directories only after all of
/// their entries are restored (post-order), because writing into a directory changes its mtime.
///
/// Owners: a saved user or group name that exists on this machine gives the local id; otherwise
/// the saved numeric id is used. Attributes the file system does not support are skipped with a
/// warning; `user.` and ACL attributes present on the file but not in `meta` (such as an ACL
/// inherited from the parent's default ACL) are removed.
pub fn apply_meta(path: &Path, meta: &FileMeta, opts: &RestoreOptions, owners: &Owners) -> Result<()> {
    apply(On::Path(path), meta, opts, owners)
}

/// What [`apply`] sets metadata on: a path, never following a symlink, or an open regular file
/// (with the path it has, for messages).
#[derive(Clone, Copy)]
enum On<'a> {
    Path(&'a Path),
    Open(&'a File, &'a Path),
}

impl<'a> On<'a> {
    fn path(self) -> &'a Path {
        match self {
            On::Path(p) | On::Open(_, p) => p,
        }
    }
}

fn apply(on: On<'_>, meta: &FileMeta, opts: &RestoreOptions, owners: &Owners) -> Result<()> {
    let path = on.path();
    if opts.owners {
        let uid = meta.user.as_deref().and_then(|n| owners.uid_of(n)).unwrap_or(meta.uid);
        let gid = meta.group.as_deref().and_then(|n| owners.gid_of(n)).unwrap_or(meta.gid);
        match on {
            On::Path(p) => std::os::unix::fs::lchown(p, Some(uid), Some(gid)),
            On::Open(f, _) => std::os::unix::fs::fchown(f, Some(uid), Some(gid)),
        }
        .map_err(Error::io_at("changing owner of", path))?;
    }
    restore_xattrs(on, meta)?;
    // Symlinks have no mode of their own on Linux, and chmod would follow the link.
    if meta.kind != Kind::Symlink {
        let mode = fs::Permissions::from_mode(meta.mode & 0o7777);
        match on {
            On::Path(p) => fs::set_permissions(p, mode),
            On::Open(f, _) => f.set_permissions(mode),
        }
        .map_err(Error::io_at("changing mode of", path))?;
    }
    let (atime, mtime) = (timespec(meta.atime), timespec(meta.mtime));
    match on {
        On::Path(p) => utimensat(None, p, &atime, &mtime, UtimensatFlags::NoFollowSymlink),
        On::Open(f, _) => futimens(f.as_raw_fd(), &atime, &mtime),
    }
    .map_err(|e| Error::io("setting times of", path, e.into()))
}

fn timespec(t: Timestamp) -> TimeSpec {
    TimeSpec::new(t.sec, i64::from(t.nsec))
}

fn restore_xattrs(on: On<'_>, meta: &FileMeta) -> Result<()> {
    let path = on.path();
    let wanted: HashSet<&[u8]> = meta.xattrs.iter().map(|x| x.name.as_slice()).collect();
    let present = match on {
        On::Path(p) => xattr::list(p),
        On::Open(f, _) => f.list_xattr(),
    };
    match present {
        Ok(present) => {
            for name in present {
                let bytes = name.as_bytes();
                let ours = bytes.starts_with(b"user.") || bytes.starts_with(b"system.posix_acl_");
                if !ours || wanted.contains(bytes) {
                    continue;
                }
                let removed = match on {
                    On::Path(p) => xattr::remove(p, &name),
                    On::Open(f, _) => f.remove_xattr(&name),
                };
                match removed {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(Errno::ENODATA as i32) => {}
                    Err(e) => return Err(Error::io("removing xattrs of", path, e)),
                }
            }
        }
        Err(e) if is_unsupported(&e) => {
            if !meta.xattrs.is_empty() {
                tracing::warn!(path = %path.display(), "no extended attribute support here; attributes not restored");
            }
            return Ok(());
        }
        Err(e) => return Err(Error::io("reading xattrs of", path, e)),
    }
    for x in &meta.xattrs {
        let name = OsStr::from_bytes(&x.name);
        let set = match on {
            On::Path(p) => xattr::set(p, name, &x.value),
            On::Open(f, _) => f.set_xattr(name, &x.value),
        };
        match set {
            Ok(()) => {}
            Err(e) if xattr_skippable(&e, &x.name) => {
                let xattr = String::from_utf8_lossy(&x.name);
                tracing::warn!(path = %path.display(), %xattr, error = %e, "extended attribute not restored");
            }
            Err(e) => return Err(Error::io("setting xattrs of", path, e)),
        }
    }
    Ok(())
}

/// True if failing to set attribute `name` should cost only that attribute, not the file: the
/// file system has no xattrs, or a namespace other than `user.` (`trusted.`, `security.`) needs a
/// privilege this restore lacks.
fn xattr_skippable(e: &io::Error, name: &[u8]) -> bool {
    is_unsupported(e) || (e.raw_os_error() == Some(Errno::EPERM as i32) && !name.starts_with(b"user."))
}

/// `.<name>.tardis-tmp` beside `path`. Long names are cut so the result stays within NAME_MAX.
fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        Error::io("restoring", path, io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))
    })?;
    let bytes = name.as_bytes();
    let mut tmp = Vec::with_capacity(bytes.len().min(200) + 12);
    tmp.push(b'.');
    tmp.extend_from_slice(&bytes[..bytes.len().min(200)]);
    tmp.extend_from_slice(b".tardis-tmp");
    Ok(path.with_file_name(OsStr::from_bytes(&tmp)))
}

/// Removes what an earlier, killed restore left under the temporary name.
/// That may be a whole tree of a killed tree restore ([`begin_tree`]), whose directories may
/// already carry read-only modes if it was killed while applying them.
fn remove_stale(tmp: &Path) -> Result<()> {
    let md = match fs::symlink_metadata(tmp) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("reading metadata of", tmp, e)),
    };
    if !md.is_dir() {
        return fs::remove_file(tmp).map_err(Error::io_at("removing stale", tmp));
    }
    if fs::remove_dir_all(tmp).is_ok() {
        return Ok(());
    }
    make_dirs_writable(tmp);
    fs::remove_dir_all(tmp).map_err(Error::io_at("removing stale", tmp))
}

/// Gives the owner full access to every directory of the tree at `dir`, so it can be removed.
/// Best effort: what still cannot be removed is reported by the caller.
fn make_dirs_writable(dir: &Path) {
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            make_dirs_writable(&e.path());
        }
    }
}

fn refuse_existing(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(_) => Err(exists_error(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("reading metadata of", path, e)),
    }
}

fn exists_error(path: &Path) -> Error {
    Error::io(
        "restoring",
        path,
        io::Error::new(io::ErrorKind::AlreadyExists, "it already exists (overwriting is not enabled)"),
    )
}

/// Renames `tmp` onto `target`; unless `overwrite`, an existing target is an error and is kept.
fn place(tmp: &Path, target: &Path, overwrite: bool) -> io::Result<()> {
    if overwrite {
        return fs::rename(tmp, target);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    match nix::fcntl::renameat2(None, tmp, None, target, nix::fcntl::RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => return Ok(()),
        // The file system lacks RENAME_NOREPLACE: fall back to the ways below.
        Err(Errno::EINVAL) => {}
        Err(e) => return Err(e.into()),
    }
    match place_by_link(tmp, target) {
        // A directory cannot be linked, and some file systems have no hard links at all: check,
        // then rename. Only there can an entry that appears in between be replaced.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EOPNOTSUPP | libc::ENOSYS)) => {
            if fs::symlink_metadata(target).is_ok() {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            fs::rename(tmp, target)
        }
        other => other,
    }
}

/// Moves `tmp` to `target` without ever replacing an entry there: a hard link fails with
/// EEXIST atomically, then the temporary name is removed. Not for directories.
fn place_by_link(tmp: &Path, target: &Path) -> io::Result<()> {
    // On Linux this links a symlink itself, not what it points to.
    fs::hard_link(tmp, target)?;
    fs::remove_file(tmp)
}

/// Starts a tree restore to `target`, which must not exist: returns the temporary path to
/// restore it under (with [`RestoreOptions::direct`]), after removing what a killed restore of
/// the same target left there.
pub fn begin_tree(target: &Path) -> Result<PathBuf> {
    let staging = temp_path(target)?;
    remove_stale(&staging)?;
    Ok(staging)
}

/// Ends a tree restore of [`begin_tree`]: makes the tree under `staging` durable, then renames
/// it to `target` (never replacing an entry that appeared there meanwhile), so the target
/// appears whole or not at all, also after a power cut.
pub fn finish_tree(staging: &Path, target: &Path) -> Result<()> {
    sync_filesystem(staging)?;
    place(staging, target, false).map_err(Error::io_at("moving into place", target))
}

/// Makes everything written to the file system holding `path` durable (`syncfs`): called once
/// at the end of a restore instead of an fsync per file.
pub fn sync_filesystem(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(path).map_err(Error::io_at("opening", path))?;
    nix::unistd::syncfs(f.as_raw_fd()).map_err(|e| Error::io("syncing the file system of", path, e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsmeta::{capture, data_regions};
    use std::io::Read;
    use std::os::unix::fs::{symlink, MetadataExt};

    use nix::sys::stat::makedev;
    use nix::unistd::geteuid;
    use serde_bytes::ByteBuf;
    use tardis_core::meta::Xattr;

    fn root_opts() -> RestoreOptions {
        RestoreOptions { owners: geteuid().is_root(), overwrite: false, direct: false }
    }

    fn cap(path: &Path) -> FileMeta {
        capture(path, b"n", &Owners::new()).unwrap().unwrap()
    }

    /// A regular file of `size` bytes, mode 0644, owned by root.
    fn sized(size: u64) -> FileMeta {
        FileMeta { kind: Kind::File, size, mode: 0o644, ..FileMeta::default() }
    }

    fn set_times(path: &Path, sec: i64, nsec: i64) {
        let t = TimeSpec::new(sec, nsec);
        utimensat(None, path, &TimeSpec::new(sec - 100, 7), &t, UtimensatFlags::NoFollowSymlink).unwrap();
    }

    fn sorted_xattrs(m: &FileMeta) -> Vec<Xattr> {
        let mut x = m.xattrs.clone();
        x.sort_by(|a, b| a.name.cmp(&b.name));
        x
    }

    /// Everything a restore promises to bring back.
    fn assert_restored(orig: &FileMeta, back: &FileMeta) {
        assert_eq!(back.kind, orig.kind);
        if orig.kind != Kind::Symlink {
            assert_eq!(back.mode, orig.mode);
        }
        if geteuid().is_root() {
            assert_eq!((back.uid, back.gid), (orig.uid, orig.gid));
        }
        assert_eq!(back.size, orig.size);
        assert_eq!(back.mtime, orig.mtime);
        assert_eq!(back.atime, orig.atime);
        assert_eq!(back.rdev, orig.rdev);
        assert_eq!(back.target, orig.target);
        assert_eq!(sorted_xattrs(back), sorted_xattrs(orig));
    }

    /// Restores `src`'s data and `meta` at `dst` as a restore does.
    fn copy_file(src: &Path, dst: &Path, meta: &FileMeta, opts: &RestoreOptions) {
        let f = File::open(src).unwrap();
        let mut w = FileWriter::create(dst, opts).unwrap();
        for (off, len) in data_regions(&f, meta.size).unwrap() {
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, off).unwrap();
            w.write_at(off, &buf).unwrap();
        }
        w.finish(meta, &Owners::new()).unwrap();
    }

    #[test]
    fn regular_file_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::write(&src, b"contents\n").unwrap();
        if geteuid().is_root() {
            std::os::unix::fs::lchown(&src, Some(4321), Some(8765)).unwrap();
        }
        // Set-uid after chown, as the restore must do it too.
        fs::set_permissions(&src, fs::Permissions::from_mode(0o4751)).unwrap();
        xattr::set(&src, "user.colour", b"blue\0green").unwrap();
        set_times(&src, 1_234_567_890, 987_654_321);
        let orig = cap(&src);

        let dst = tmp.path().join("dst");
        let opts = root_opts();
        copy_file(&src, &dst, &orig, &opts);
        let back = cap(&dst);
        assert_restored(&orig, &back);
        assert_eq!(back.mode, 0o4751, "chown must not clear set-uid applied after it");
        assert_eq!(fs::read(&dst).unwrap(), b"contents\n");
        assert!(!tmp.path().join(".dst.tardis-tmp").exists());
    }

    #[test]
    fn directory_symlink_fifo_and_device_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let dst = tmp.path().join("dst");
        fs::create_dir_all(src.join("dir")).unwrap();
        fs::create_dir(&dst).unwrap();
        symlink("../some\u{fc}/target", src.join("link")).unwrap();
        mkfifo(&src.join("fifo"), Mode::from_bits_truncate(0o620)).unwrap();
        let mut names = vec!["dir", "link", "fifo"];
        if geteuid().is_root() {
            mknod(&src.join("null"), SFlag::S_IFCHR, Mode::from_bits_truncate(0o666), makedev(1, 3)).unwrap();
            names.push("null");
            std::os::unix::fs::lchown(src.join("link"), Some(1111), Some(2222)).unwrap();
        }
        fs::set_permissions(src.join("dir"), fs::Permissions::from_mode(0o1750)).unwrap();
        xattr::set(src.join("dir"), "user.d", b"1").unwrap();
        for (i, n) in names.iter().enumerate() {
            set_times(&src.join(n), 1_000_000 + i as i64, 1 + i as i64 * 1000);
        }

        let opts = root_opts();
        let owners = Owners::new();
        for n in &names {
            let orig = cap(&src.join(n));
            let path = dst.join(n);
            create_node(&path, &orig, &opts).unwrap();
            apply_meta(&path, &orig, &opts, &owners).unwrap();
            assert_restored(&orig, &cap(&path));
        }
        assert_eq!(fs::read_link(dst.join("link")).unwrap(), Path::new("../some\u{fc}/target"));

        // An existing directory is reused; an existing node is refused.
        let dir_meta = cap(&src.join("dir"));
        create_node(&dst.join("dir"), &dir_meta, &opts).unwrap();
        let err = create_node(&dst.join("fifo"), &cap(&src.join("fifo")), &opts).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert!(create_node(&dst.join("f"), &FileMeta::default(), &opts).is_err());
    }

    #[test]
    fn overwrite_replaces_nodes_and_dirs_replace_files() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("x");
        fs::write(&p, b"old").unwrap();
        let link_meta =
            FileMeta { kind: Kind::Symlink, target: Some(ByteBuf::from(b"t".to_vec())), ..FileMeta::default() };
        let over = RestoreOptions { owners: false, overwrite: true, direct: false };
        create_node(&p, &link_meta, &over).unwrap();
        assert_eq!(fs::read_link(&p).unwrap(), Path::new("t"));

        let dir_meta = FileMeta { kind: Kind::Dir, ..FileMeta::default() };
        assert!(create_node(&p, &dir_meta, &RestoreOptions { owners: false, overwrite: false, direct: false }).is_err());
        create_node(&p, &dir_meta, &over).unwrap();
        assert!(fs::symlink_metadata(&p).unwrap().is_dir());
        let names: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![OsStr::new("x")], "no temporary names left");
    }

    #[test]
    fn sparse_file_keeps_its_holes() {
        const MIB: u64 = 1 << 20;
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let f = fs::OpenOptions::new().write(true).create_new(true).open(&src).unwrap();
        f.set_len(8 * MIB).unwrap();
        f.write_all_at(&[0xaa; 8192], MIB).unwrap();
        f.write_all_at(&[0xbb; 100], 4 * MIB).unwrap();
        f.sync_all().unwrap();
        let orig = cap(&src);

        let dst = tmp.path().join("dst");
        copy_file(&src, &dst, &orig, &root_opts());
        let back = cap(&dst);
        assert_restored(&orig, &back);
        assert_eq!(fs::read(&dst).unwrap(), fs::read(&src).unwrap());
        if orig.sparse {
            let md = fs::metadata(&dst).unwrap();
            assert!(md.blocks() * 512 < md.len(), "restored file is dense: {} blocks", md.blocks());
            assert!(back.sparse);
        }
    }

    #[test]
    fn existing_target_is_kept_unless_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f");
        fs::write(&p, b"precious").unwrap();
        let keep = RestoreOptions { owners: false, overwrite: false, direct: false };
        let err = FileWriter::create(&p, &keep).unwrap_err();
        assert!(err.to_string().starts_with(&format!("restoring {}", p.display())), "{err}");

        // The target appears between create and finish: still not replaced.
        let q = tmp.path().join("g");
        let mut w = FileWriter::create(&q, &keep).unwrap();
        w.write_at(0, b"new").unwrap();
        fs::write(&q, b"racer").unwrap();
        assert!(w.finish(&sized(3), &Owners::new()).is_err());
        assert_eq!(fs::read(&q).unwrap(), b"racer");
        assert!(!tmp.path().join(".g.tardis-tmp").exists(), "failed finish cleans up");

        let over = RestoreOptions { owners: false, overwrite: true, direct: false };
        let mut w = FileWriter::create(&p, &over).unwrap();
        w.write_at(0, b"new").unwrap();
        w.finish(&sized(3), &Owners::new()).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn interrupted_restore_never_leaves_a_partial_target() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("big");
        let opts = RestoreOptions { owners: false, overwrite: false, direct: false };

        // Dropped (error path): nothing at all remains.
        let mut w = FileWriter::create(&p, &opts).unwrap();
        w.write_at(0, b"part").unwrap();
        drop(w);
        assert!(!p.exists());
        assert!(!tmp.path().join(".big.tardis-tmp").exists());

        // Killed (no destructor runs): only the temporary file remains, and the next restore
        // of the same path takes it over.
        let mut w = FileWriter::create(&p, &opts).unwrap();
        w.write_at(0, b"part").unwrap();
        std::mem::forget(w);
        assert!(!p.exists());
        assert!(tmp.path().join(".big.tardis-tmp").exists());
        let mut w = FileWriter::create(&p, &opts).unwrap();
        w.write_at(0, b"whole").unwrap();
        w.finish(&sized(5), &Owners::new()).unwrap();
        let mut s = String::new();
        File::open(&p).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "whole");
        assert!(!tmp.path().join(".big.tardis-tmp").exists());
    }

    #[test]
    fn a_tree_is_built_under_a_temporary_name_and_placed_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("tree");
        let direct = RestoreOptions { owners: false, overwrite: false, direct: true };

        // What a killed restore left: a stale tree under the temporary name, killed while it
        // applied read-only modes.
        let stale = begin_tree(&target).unwrap();
        assert_eq!(stale, tmp.path().join(".tree.tardis-tmp"));
        fs::create_dir_all(stale.join("d/e")).unwrap();
        fs::write(stale.join("d/partial"), "par").unwrap();
        for d in ["d/e", "d"] {
            fs::set_permissions(stale.join(d), fs::Permissions::from_mode(0o555)).unwrap();
        }
        make_dirs_writable(&stale);
        for d in ["", "d", "d/e"] {
            assert_eq!(fs::metadata(stale.join(d)).unwrap().permissions().mode() & 0o777, 0o700, "{d}");
        }
        fs::set_permissions(stale.join("d"), fs::Permissions::from_mode(0o555)).unwrap();

        let staging = begin_tree(&target).unwrap();
        assert!(!staging.exists(), "the stale tree was not removed");
        create_node(&staging, &cap(tmp.path()), &direct).unwrap();
        let mut w = FileWriter::create(&staging.join("f"), &direct).unwrap();
        w.write_at(0, b"whole").unwrap();
        // Written directly: the real name exists before finish, and no temporary name does.
        assert!(staging.join("f").exists() && !staging.join(".f.tardis-tmp").exists());
        w.finish(&sized(8), &Owners::new()).unwrap();
        assert_eq!(fs::read(staging.join("f")).unwrap(), b"whole\0\0\0");
        assert!(!target.exists());
        finish_tree(&staging, &target).unwrap();
        assert!(!staging.exists());
        assert_eq!(fs::read(target.join("f")).unwrap(), b"whole\0\0\0");

        // A stale tree does not block a later restore of a file to the same name.
        let f = tmp.path().join("f");
        fs::create_dir_all(tmp.path().join(".f.tardis-tmp/sub")).unwrap();
        let keep = RestoreOptions { owners: false, overwrite: false, direct: false };
        let mut w = FileWriter::create(&f, &keep).unwrap();
        // An empty write at the end does not stand in for the length.
        w.write_at(0, b"ab").unwrap();
        w.write_at(4, b"").unwrap();
        w.finish(&sized(4), &Owners::new()).unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"ab\0\0");

        // An entry that appeared at the target meanwhile is never replaced.
        let other = tmp.path().join("other");
        fs::write(&other, "mine").unwrap();
        let staging = begin_tree(&other).unwrap();
        fs::create_dir(&staging).unwrap();
        assert!(finish_tree(&staging, &other).is_err());
        assert_eq!(fs::read(&other).unwrap(), b"mine");
    }

    #[test]
    fn stale_temporary_symlink_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        symlink(&victim, tmp.path().join(".f.tardis-tmp")).unwrap();
        let mut w = FileWriter::create(&tmp.path().join("f"), &RestoreOptions::default()).unwrap();
        w.write_at(0, b"data").unwrap();
        w.finish(&sized(4), &Owners::new()).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert_eq!(fs::read(tmp.path().join("f")).unwrap(), b"data");
    }

    #[test]
    fn long_names_get_a_short_enough_temporary_name() {
        let tmp = tempfile::tempdir().unwrap();
        let name = "n".repeat(255);
        let p = tmp.path().join(&name);
        let mut w = FileWriter::create(&p, &RestoreOptions::default()).unwrap();
        w.write_at(0, b"x").unwrap();
        w.finish(&sized(1), &Owners::new()).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"x");
    }

    #[test]
    fn hard_links() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        fs::write(&a, b"shared").unwrap();
        let opts = RestoreOptions { owners: false, overwrite: false, direct: false };
        link(&a, &b, &opts).unwrap();
        assert_eq!(cap(&a).ino, cap(&b).ino);
        assert_eq!(cap(&a).nlink, 2);
        assert!(link(&a, &b, &opts).is_err());

        // Overwriting with a link to the same inode is a no-op that leaves no temporary name.
        let over = RestoreOptions { owners: false, overwrite: true, direct: false };
        link(&a, &b, &over).unwrap();
        let c = tmp.path().join("c");
        fs::write(&c, b"other").unwrap();
        link(&a, &c, &over).unwrap();
        assert_eq!(cap(&c).ino, cap(&a).ino);
        let mut names: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, vec![OsStr::new("a"), OsStr::new("b"), OsStr::new("c")]);
    }

    #[test]
    fn owner_names_win_over_numeric_ids() {
        if !geteuid().is_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f");
        fs::write(&p, b"").unwrap();
        let opts = RestoreOptions { owners: true, overwrite: false, direct: false };
        let owners = Owners::new();
        let mut meta = cap(&p);
        (meta.uid, meta.gid, meta.user, meta.group) = (4242, 4343, Some("root".into()), Some("root".into()));
        apply_meta(&p, &meta, &opts, &owners).unwrap();
        assert_eq!((cap(&p).uid, cap(&p).gid), (0, 0));

        (meta.user, meta.group) = (Some("tardis-no-such-user".into()), None);
        apply_meta(&p, &meta, &opts, &owners).unwrap();
        assert_eq!((cap(&p).uid, cap(&p).gid), (4242, 4343));

        // Without `owners` the file keeps whatever owner it has.
        meta.uid = 5000;
        apply_meta(&p, &meta, &RestoreOptions { owners: false, overwrite: false, direct: false }, &owners).unwrap();
        assert_eq!(cap(&p).uid, 4242);
    }

    #[test]
    fn placing_by_link_never_replaces_an_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, target) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("t"));
        fs::write(&a, b"first").unwrap();
        place_by_link(&a, &target).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"first");
        assert!(!a.exists(), "the temporary name is gone");
        fs::write(&b, b"second").unwrap();
        let err = place_by_link(&b, &target).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&target).unwrap(), b"first", "the existing entry is kept");
        // A symlink is moved as itself.
        symlink("nowhere", &a).unwrap();
        place_by_link(&a, &tmp.path().join("l")).unwrap();
        assert_eq!(fs::read_link(tmp.path().join("l")).unwrap(), Path::new("nowhere"));
    }

    #[test]
    fn xattrs_not_in_the_backup_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f");
        fs::write(&p, b"").unwrap();
        xattr::set(&p, "user.stale", b"x").unwrap();
        let mut meta = cap(&p);
        meta.xattrs = vec![Xattr { name: ByteBuf::from(b"user.fresh".to_vec()), value: ByteBuf::from(vec![]) }];
        let opts = RestoreOptions { owners: false, overwrite: false, direct: false };
        apply_meta(&p, &meta, &opts, &Owners::new()).unwrap();
        assert_eq!(sorted_xattrs(&cap(&p)), meta.xattrs);
        // The same through a descriptor, as FileWriter::finish applies it.
        xattr::set(&p, "user.stale", b"x").unwrap();
        let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
        apply(On::Open(&f, &p), &meta, &opts, &Owners::new()).unwrap();
        assert_eq!(sorted_xattrs(&cap(&p)), meta.xattrs);
    }

    #[test]
    fn unsupported_or_privileged_xattrs_are_skipped() {
        let eperm = io::Error::from_raw_os_error(Errno::EPERM as i32);
        let enotsup = io::Error::from_raw_os_error(Errno::ENOTSUP as i32);
        assert!(xattr_skippable(&enotsup, b"user.x"));
        assert!(xattr_skippable(&eperm, b"trusted.x"));
        assert!(!xattr_skippable(&eperm, b"user.x"));
        assert!(!xattr_skippable(&io::Error::from_raw_os_error(Errno::EIO as i32), b"trusted.x"));
    }

    #[test]
    fn errors_name_the_operation() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("missing");
        let meta = FileMeta { mode: 0o644, ..FileMeta::default() };
        let err =
            apply_meta(&p, &meta, &RestoreOptions { owners: false, overwrite: false, direct: false }, &Owners::new())
                .unwrap_err();
        assert!(err.to_string().starts_with("reading xattrs of "), "{err}");
        let bad = FileMeta { kind: Kind::Symlink, target: None, ..FileMeta::default() };
        let err = create_node(&tmp.path().join("l"), &bad, &RestoreOptions::default()).unwrap_err();
        assert!(err.to_string().contains("without a target"), "{err}");
    }
}
