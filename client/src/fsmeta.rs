//! Reading file metadata from the local file system into [`FileMeta`].
//!
//! The walker calls [`capture`] once per directory entry, so it only `lstat`s (never follows a
//! symlink: a backup saves the link, not what it points to), caches user and group names in
//! [`Owners`] (a tree of 100k files has a handful of owners), and reads extended attributes, which
//! carry POSIX ACLs and SELinux labels. [`same_meta`] is the change-detection rule that lets an
//! unchanged file cost only its `stat`, and [`data_regions`] finds the extents of a sparse file so
//! that holes are neither read nor stored. [`open_read`] and [`list_dir`] read files and
//! directories without touching their access times.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::unistd::{lseek, Gid, Group, Uid, User, Whence};
use serde_bytes::ByteBuf;
use tardis_core::meta::{FileMeta, Kind, Timestamp, Xattr};

use crate::error::{Error, Result};

/// A cache of user and group database lookups, in both directions.
///
/// `getpwuid` may go to NSS (LDAP, sssd), so each id or name is looked up once per run. A failed
/// lookup is cached as "unknown" too: it would fail the same way for the next file. The cache is
/// shared by reference between a restore's writer threads; its lock covers only the lookup, never
/// the file system calls that use the answer.
#[derive(Debug, Default)]
pub struct Owners {
    maps: Mutex<OwnerMaps>,
}

#[derive(Debug, Default)]
struct OwnerMaps {
    users: HashMap<u32, Option<String>>,
    groups: HashMap<u32, Option<String>>,
    uids: HashMap<String, Option<u32>>,
    gids: HashMap<String, Option<u32>>,
}

impl Owners {
    pub fn new() -> Self {
        Self::default()
    }

    fn maps(&self) -> MutexGuard<'_, OwnerMaps> {
        // A panic elsewhere cannot leave the maps half-updated: each insert is one call.
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The local name of user `uid`, if it has one.
    pub fn user(&self, uid: u32) -> Option<String> {
        self.maps()
            .users
            .entry(uid)
            .or_insert_with(|| User::from_uid(Uid::from_raw(uid)).ok().flatten().map(|u| u.name))
            .clone()
    }

    /// The local name of group `gid`, if it has one.
    pub fn group(&self, gid: u32) -> Option<String> {
        self.maps()
            .groups
            .entry(gid)
            .or_insert_with(|| Group::from_gid(Gid::from_raw(gid)).ok().flatten().map(|g| g.name))
            .clone()
    }

    /// The local uid of user `name`, if such a user exists here.
    pub fn uid_of(&self, name: &str) -> Option<u32> {
        let mut maps = self.maps();
        if let Some(uid) = maps.uids.get(name) {
            return *uid;
        }
        let uid = User::from_name(name).ok().flatten().map(|u| u.uid.as_raw());
        maps.uids.insert(name.to_owned(), uid);
        uid
    }

    /// The local gid of group `name`, if such a group exists here.
    pub fn gid_of(&self, name: &str) -> Option<u32> {
        let mut maps = self.maps();
        if let Some(gid) = maps.gids.get(name) {
            return *gid;
        }
        let gid = Group::from_name(name).ok().flatten().map(|g| g.gid.as_raw());
        maps.gids.insert(name.to_owned(), gid);
        gid
    }
}

/// Reads the metadata of `path` without following a final symlink. `name` is the entry's name as
/// it will be stored (the walker knows it as raw bytes already).
///
/// Returns `Ok(None)` for sockets, which cannot be backed up; the caller reports them as skipped.
pub fn capture(path: &Path, name: &[u8], owners: &Owners) -> Result<Option<FileMeta>> {
    let md = fs::symlink_metadata(path).map_err(Error::io_at("reading metadata of", path))?;
    let ft = md.file_type();
    let kind = if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_char_device() {
        Kind::CharDev
    } else if ft.is_block_device() {
        Kind::BlockDev
    } else {
        // Sockets (and anything a future kernel invents) have no content to restore.
        return Ok(None);
    };

    let target = if kind == Kind::Symlink {
        let t = fs::read_link(path).map_err(Error::io_at("reading symlink", path))?;
        Some(ByteBuf::from(t.as_os_str().as_bytes().to_vec()))
    } else {
        None
    };

    Ok(Some(FileMeta {
        name: ByteBuf::from(name.to_vec()),
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        user: owners.user(md.uid()),
        group: owners.group(md.gid()),
        size: md.size(),
        mtime: timestamp(md.mtime(), md.mtime_nsec()),
        atime: timestamp(md.atime(), md.atime_nsec()),
        ctime: timestamp(md.ctime(), md.ctime_nsec()),
        dev: md.dev(),
        ino: md.ino(),
        nlink: md.nlink(),
        rdev: md.rdev(),
        target,
        xattrs: read_xattrs(path)?,
        // Fewer allocated bytes than the length means some of the file is holes. (Inline data on
        // some file systems can also look like this; data_regions then simply finds no hole.)
        sparse: kind == Kind::File && md.blocks().saturating_mul(512) < md.size(),
    }))
}

/// True if two captures of the same path describe an unchanged entry: all metadata equal apart
/// from the access time (which reading changes and nobody restores for). Such a file is not read
/// again. The ctime catches `touch -r` style resets of mtime, and the inode catches a file
/// replaced by rename. Runs for every entry of every backup, so it compares in place rather than
/// cloning; the exhaustive pattern makes a new field of `FileMeta` a compile error here until
/// it is decided.
pub fn same_meta(a: &FileMeta, b: &FileMeta) -> bool {
    let FileMeta {
        name,
        kind,
        mode,
        uid,
        gid,
        user,
        group,
        size,
        mtime,
        atime: _,
        ctime,
        dev,
        ino,
        nlink,
        rdev,
        target,
        xattrs,
        sparse,
    } = a;
    // Cheap fields first: most unchanged-or-not decisions end at size or mtime.
    *size == b.size
        && *mtime == b.mtime
        && *ctime == b.ctime
        && *ino == b.ino
        && *dev == b.dev
        && *kind == b.kind
        && *mode == b.mode
        && *uid == b.uid
        && *gid == b.gid
        && *nlink == b.nlink
        && *rdev == b.rdev
        && *sparse == b.sparse
        && *name == b.name
        && *user == b.user
        && *group == b.group
        && *target == b.target
        && *xattrs == b.xattrs
}

/// The data regions `(offset, len)` of `file`'s first `size` bytes, in ascending order; what lies
/// between them is holes. Uses `SEEK_DATA`/`SEEK_HOLE`; where the file system does not support
/// them the whole file is one region. An empty list means the file is all hole (or empty).
///
/// The file offset is reset to 0 afterwards, so the caller may read sequentially.
pub fn data_regions(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let whole = || if size == 0 { Vec::new() } else { vec![(0, size)] };
    let mut regions = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let data = match lseek(fd, to_off(pos)?, Whence::SeekData) {
            Ok(off) => off as u64, // lseek never returns a negative offset on success
            // No data at or after `pos`: the rest is a hole.
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(whole()),
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = match lseek(fd, to_off(data)?, Whence::SeekHole) {
            Ok(off) => off as u64, // as above
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(whole()),
            // The file shrank under us between the two calls: stop at what we have.
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = hole.min(size);
        regions.push((data, end - data));
        pos = end;
    }
    lseek(fd, 0, Whence::SeekSet)?;
    Ok(regions)
}

/// Opens `path` for reading with `flags` added, and with `O_NOATIME`: the backup records each
/// entry's access time and leaves it as it was, for the programs that rely on it (mail readers
/// telling new mail from read mail, cleaners of unused files). `O_NOATIME` needs the file's owner
/// or `CAP_FOWNER`; without them, the file is opened without it.
pub fn open_read(path: &Path, flags: OFlag) -> io::Result<File> {
    let open = |flags: OFlag| fs::OpenOptions::new().read(true).custom_flags(flags.bits()).open(path);
    match open(flags | OFlag::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(flags),
        opened => opened,
    }
}

/// Opens the regular file at `path` that the walk chose to read, as [`open_read`] does, but never
/// through a symlink and without waiting for a writer: the name may have been given to another
/// entry since the walk read its metadata, and a FIFO put there would block the reader.
pub fn open_chosen(path: &Path) -> io::Result<File> {
    open_read(path, OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK)
}

/// The entries of directory `path` (without `.` and `..`), listed as [`open_read`] reads a file:
/// without updating the directory's access time where that is permitted.
pub fn list_dir(path: &Path) -> io::Result<DirNames> {
    let dir = open_read(path, OFlag::O_DIRECTORY)?;
    // rustix reads with getdents64 and reports every error; after one, it ends the listing, as
    // std's `ReadDir` does, so a failing directory cannot loop forever.
    Ok(DirNames { entries: rustix::fs::Dir::new(OwnedFd::from(dir))?, path: path.to_path_buf() })
}

/// What [`list_dir`] returns: each entry's name, and whether it is a directory.
#[derive(Debug)]
pub struct DirNames {
    entries: rustix::fs::Dir,
    path: PathBuf,
}

impl Iterator for DirNames {
    type Item = io::Result<(Vec<u8>, bool)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let entry = match self.entries.next()? {
                Ok(e) => e,
                Err(e) => return Some(Err(e.into())),
            };
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let is_dir = match entry.file_type() {
                rustix::fs::FileType::Directory => true,
                // The file system does not say (DT_UNKNOWN): ask the inode.
                rustix::fs::FileType::Unknown => {
                    fs::symlink_metadata(self.path.join(OsStr::from_bytes(name))).is_ok_and(|m| m.is_dir())
                }
                _ => false,
            };
            return Some(Ok((name.to_vec(), is_dir)));
        }
    }
}

fn to_off(pos: u64) -> io::Result<i64> {
    i64::try_from(pos).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset beyond i64::MAX"))
}

fn timestamp(sec: i64, nsec: i64) -> Timestamp {
    // The kernel keeps nanoseconds in [0, 1e9); anything else would be a broken file system,
    // and 0 is the harmless reading of it.
    Timestamp { sec, nsec: u32::try_from(nsec).unwrap_or(0) }
}

/// Reads all extended attributes of `path` itself (not of a symlink's target). A file system
/// without xattr support has none, which is not an error.
fn read_xattrs(path: &Path) -> Result<Vec<Xattr>> {
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if is_unsupported(&e) => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("reading xattrs of", path, e)),
    };
    let mut out = Vec::new();
    for name in names {
        // `get` returns None if the attribute vanished between list and get: nothing to save.
        match xattr::get(path, &name) {
            Ok(Some(value)) => {
                out.push(Xattr { name: ByteBuf::from(OsStr::as_bytes(&name).to_vec()), value: ByteBuf::from(value) })
            }
            Ok(None) => {}
            Err(e) if is_unsupported(&e) => {}
            Err(e) => return Err(Error::io("reading xattrs of", path, e)),
        }
    }
    Ok(out)
}

/// True for the errors a file system gives when it has no extended attributes at all.
pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == Errno::ENOTSUP as i32 || code == Errno::EOPNOTSUPP as i32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::{symlink, FileExt, PermissionsExt};
    use std::os::unix::net::UnixListener;

    use nix::sys::stat::{makedev, mknod, utimensat, Mode, SFlag, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    use nix::unistd::mkfifo;

    /// Sets an access time older than the modification time: under `relatime` (or
    /// `strictatime`), the next ordinary read of `path` moves it.
    fn stale_atime(path: &Path) {
        let (atime, mtime) = (TimeSpec::new(1_000_000_000, 0), TimeSpec::new(1_100_000_000, 0));
        utimensat(None, path, &atime, &mtime, UtimensatFlags::NoFollowSymlink).unwrap();
    }

    fn atime(path: &Path) -> i64 {
        fs::symlink_metadata(path).unwrap().atime()
    }

    #[test]
    fn open_read_and_list_dir_leave_access_times_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, file) = (tmp.path().join("d"), tmp.path().join("d/f"));
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(&file, b"data").unwrap();
        symlink("f", dir.join("link")).unwrap();
        for p in [&dir, &file] {
            stale_atime(p);
        }

        let mut names: Vec<_> = list_dir(&dir).unwrap().map(Result::unwrap).collect();
        names.sort();
        let want: Vec<(Vec<u8>, bool)> =
            vec![(b"f".to_vec(), false), (b"link".to_vec(), false), (b"sub".to_vec(), true)];
        assert_eq!(names, want);
        let mut data = Vec::new();
        open_read(&file, OFlag::empty()).unwrap().read_to_end(&mut data).unwrap();
        assert_eq!(data, b"data");
        assert_eq!(atime(&dir), 1_000_000_000, "listing moved the directory's atime");
        assert_eq!(atime(&file), 1_000_000_000, "reading moved the file's atime");

        // The same reads done the ordinary way do move them here, or the test proves nothing
        // (a file system mounted noatime).
        fs::read(&file).unwrap();
        fs::read_dir(&dir).unwrap().for_each(drop);
        assert_ne!(atime(&file), 1_000_000_000, "ordinary reads keep atimes on this file system");
        assert_ne!(atime(&dir), 1_000_000_000, "ordinary listing keeps atimes on this file system");
        assert!(list_dir(&file).is_err() && open_read(&dir.join("missing"), OFlag::empty()).is_err());
    }

    /// Run by the test below as `nobody`, in a process of its own: reads the tree in
    /// `TARDIS_NOATIME_DIR`, whose entries `nobody` does not own.
    #[test]
    #[ignore = "run by without_the_right_to_keep_atimes_files_and_directories_are_still_read"]
    fn read_as_another_user() {
        let dir = PathBuf::from(std::env::var_os("TARDIS_NOATIME_DIR").expect("TARDIS_NOATIME_DIR"));
        let direct = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOATIME).open(dir.join("f"));
        assert_eq!(direct.unwrap_err().raw_os_error(), Some(libc::EPERM), "O_NOATIME was permitted");
        let mut data = Vec::new();
        open_read(&dir.join("f"), OFlag::empty()).unwrap().read_to_end(&mut data).unwrap();
        assert_eq!(data, b"data");
        let names: Vec<_> = list_dir(&dir).unwrap().map(Result::unwrap).collect();
        assert_eq!(names, vec![(b"f".to_vec(), false)]);
    }

    #[test]
    fn without_the_right_to_keep_atimes_files_and_directories_are_still_read() {
        use std::os::unix::process::CommandExt;
        if !Uid::effective().is_root() {
            eprintln!("skipped: needs root, to read as another user");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("f"), b"data").unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "fsmeta::tests::read_as_another_user", "--ignored", "--nocapture"])
            .env("TARDIS_NOATIME_DIR", &dir)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && log.contains("1 passed"), "{log}");
    }

    fn cap(path: &Path) -> FileMeta {
        capture(path, b"x", &Owners::new()).unwrap().unwrap()
    }

    #[test]
    fn regular_file_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"hello").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o4751)).unwrap();
        let t = TimeSpec::new(1_600_000_000, 123_456_789);
        utimensat(None, &p, &TimeSpec::new(1_500_000_000, 5), &t, UtimensatFlags::NoFollowSymlink).unwrap();
        xattr::set(&p, "user.tardis", b"value").unwrap();

        let m = capture(&p, b"f\xff", &Owners::new()).unwrap().unwrap();
        let md = fs::symlink_metadata(&p).unwrap();
        assert_eq!(m.name.as_slice(), b"f\xff");
        assert_eq!(m.kind, Kind::File);
        assert_eq!(m.mode, 0o4751);
        assert_eq!(m.size, 5);
        assert_eq!(m.mtime, Timestamp { sec: 1_600_000_000, nsec: 123_456_789 });
        assert_eq!(m.atime, Timestamp { sec: 1_500_000_000, nsec: 5 });
        assert_eq!((m.uid, m.gid), (md.uid(), md.gid()));
        assert_eq!((m.dev, m.ino, m.nlink), (md.dev(), md.ino(), 1));
        assert_eq!(m.ctime.sec, md.ctime());
        assert_eq!(m.target, None);
        assert!(!m.sparse);
        assert!(m.xattrs.iter().any(|x| x.name.as_slice() == b"user.tardis" && x.value.as_slice() == b"value"));
        if md.uid() == 0 {
            assert_eq!(m.user.as_deref(), Some("root"));
        }
    }

    #[test]
    fn symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        // Dangling on purpose: following it would fail.
        symlink("no/such\u{e9}", &p).unwrap();
        let m = cap(&p);
        assert_eq!(m.kind, Kind::Symlink);
        assert_eq!(m.target.as_deref().map(|t| t.as_slice()), Some("no/such\u{e9}".as_bytes()));
        assert_eq!(m.size, "no/such\u{e9}".len() as u64);
        assert!(!m.sparse);
    }

    #[test]
    fn special_kinds_and_sockets() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(cap(dir.path()).kind, Kind::Dir);

        let fifo = dir.path().join("fifo");
        mkfifo(&fifo, Mode::from_bits_truncate(0o640)).unwrap();
        let m = cap(&fifo);
        assert_eq!((m.kind, m.mode), (Kind::Fifo, 0o640));

        let sock = dir.path().join("sock");
        let _listener = UnixListener::bind(&sock).unwrap();
        assert!(capture(&sock, b"sock", &Owners::new()).unwrap().is_none());

        if nix::unistd::geteuid().is_root() {
            let dev = dir.path().join("null");
            mknod(&dev, SFlag::S_IFCHR, Mode::from_bits_truncate(0o666), makedev(1, 3)).unwrap();
            let m = cap(&dev);
            assert_eq!((m.kind, m.rdev), (Kind::CharDev, makedev(1, 3)));
        }
    }

    #[test]
    fn missing_path_names_operation_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gone");
        let e = capture(&p, b"gone", &Owners::new()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("reading metadata of ") && msg.contains("gone"), "{msg}");
    }

    #[test]
    fn file_system_without_user_xattrs_is_fine() {
        // procfs lists no attributes; capture must succeed either way.
        let m = cap(Path::new("/proc/self/status"));
        assert_eq!(m.kind, Kind::File);
        assert!(is_unsupported(&io::Error::from_raw_os_error(Errno::ENOTSUP as i32)));
        assert!(!is_unsupported(&io::Error::from_raw_os_error(Errno::EACCES as i32)));
    }

    #[test]
    fn owners_cache_both_directions() {
        let o = Owners::new();
        assert_eq!(o.user(0).as_deref(), Some("root"));
        assert_eq!(o.user(0).as_deref(), Some("root"));
        assert_eq!(o.uid_of("root"), Some(0));
        assert_eq!(o.gid_of("root"), Some(0));
        assert!(o.group(0).is_some());
        // An id no account uses, and a name no account has.
        assert_eq!(o.user(3_999_999_999), None);
        assert_eq!(o.group(3_999_999_999), None);
        assert_eq!(o.uid_of("tardis-no-such-user"), None);
        assert_eq!(o.gid_of("tardis-no-such-group"), None);
        assert_eq!(o.maps().users.len(), 2);
        assert_eq!(o.maps().uids.len(), 2);
    }

    #[test]
    fn same_meta_detects_changes_but_not_reads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"one").unwrap();
        let a = cap(&p);
        let b = cap(&p);
        assert!(same_meta(&a, &b));
        // Reading moves only the access time: not a change.
        let mut read = b.clone();
        read.atime = Timestamp { sec: read.atime.sec + 5, nsec: 0 };
        assert!(same_meta(&a, &read));

        // Same size, different content and mtime.
        let t = TimeSpec::new(1_000, 1);
        fs::write(&p, b"two").unwrap();
        utimensat(None, &p, &t, &t, UtimensatFlags::NoFollowSymlink).unwrap();
        let c = cap(&p);
        assert!(!same_meta(&a, &c));

        // Only the ctime moves (chmod): still a change.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let mut d = cap(&p);
        d.ctime = Timestamp { sec: d.ctime.sec + 1, nsec: d.ctime.nsec };
        assert!(!same_meta(&c, &d));

        // Replaced by another inode with identical times and size.
        let mut e = c.clone();
        e.ino += 1;
        assert!(!same_meta(&c, &e));
    }

    #[test]
    fn data_regions_of_a_file_with_a_hole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse");
        let f = fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        const MIB: u64 = 1 << 20;
        f.set_len(4 * MIB).unwrap();
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        f.write_all_at(&[2u8; 4096], 2 * MIB).unwrap();
        f.sync_all().unwrap();

        let regions = data_regions(&f, 4 * MIB).unwrap();
        assert!(!regions.is_empty());
        let mut prev_end = 0;
        for &(off, len) in &regions {
            assert!(off >= prev_end && len > 0, "{regions:?}");
            prev_end = off + len;
        }
        assert!(prev_end <= 4 * MIB);
        let covers = |at: u64| regions.iter().any(|&(o, l)| o <= at && at + 4096 <= o + l);
        assert!(covers(0) && covers(2 * MIB), "{regions:?}");

        let m = cap(&p);
        if m.sparse {
            // The file system stores holes, so it must report them too.
            let total: u64 = regions.iter().map(|r| r.1).sum();
            assert!(total < 4 * MIB, "{regions:?}");
        }

        // The offset is back at the start for a sequential reader.
        let mut g = &f;
        g.write_all(b"Z").unwrap();
        assert_eq!(fs::read(&p).unwrap()[0], b'Z');
    }

    #[test]
    fn data_regions_edge_cases() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        assert_eq!(data_regions(&f, 0).unwrap(), vec![]);

        // A file of nothing but hole has no data regions (or, without hole support, one).
        f.set_len(1 << 20).unwrap();
        let r = data_regions(&f, 1 << 20).unwrap();
        assert!(r.is_empty() || r == vec![(0, 1 << 20)], "{r:?}");

        // Dense data is one region, clipped to the size asked for.
        f.write_all_at(&[7u8; 1 << 20], 0).unwrap();
        assert_eq!(data_regions(&f, 1000).unwrap(), vec![(0, 1000)]);
    }
}
