//! Where segment bytes live. Every segment read and write goes through [`Storage`], so tests
//! can inject failures and crashes ([`crate::fault`]) and an object-store backend can be added
//! beside the local directory without touching the log logic.
//!
//! Durability contract an implementation must keep: `create` returns only after the new file
//! (with its header) and its directory entry are durable; `sync` returns only after every byte
//! appended so far is durable; `truncate` and `remove` are durable when they return.

use std::collections::HashMap;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// An open segment being appended to.
pub trait SegmentFile: Send + Debug {
    /// Appends bytes at the end (not yet durable).
    fn append(&mut self, data: &[u8]) -> io::Result<()>;
    /// Makes everything appended so far durable.
    fn sync(&mut self) -> io::Result<()>;
}

/// A set of numbered, append-only segment files.
pub trait Storage: Send + Sync + Debug {
    /// Numbers of all segments, ascending.
    fn list(&self) -> io::Result<Vec<u64>>;
    /// Creates segment `seg` holding `header`; durable (file and directory) on return.
    fn create(&self, seg: u64, header: &[u8]) -> io::Result<Box<dyn SegmentFile>>;
    /// Opens an existing segment for appending at its current end.
    fn open_append(&self, seg: u64) -> io::Result<Box<dyn SegmentFile>>;
    /// Current length of a segment.
    fn len(&self, seg: u64) -> io::Result<u64>;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, seg: u64, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Shortens a segment (recovery of a torn tail); durable on return.
    fn truncate(&self, seg: u64, len: u64) -> io::Result<()>;
    /// Deletes a segment; durable on return.
    fn remove(&self, seg: u64) -> io::Result<()>;
    /// Keeps bytes cut from a segment for later inspection; returns where they went.
    fn quarantine(&self, seg: u64, offset: u64, bytes: &[u8]) -> io::Result<PathBuf>;
    /// A human-readable location of a segment, for messages.
    fn describe(&self, seg: u64) -> PathBuf;
    /// Bytes that can still be written, and the capacity, if the backend knows them.
    fn space(&self) -> io::Result<Option<Space>> {
        Ok(None)
    }
    /// Whether `open_append` can reopen `seg` (a segment sealed in a bucket cannot).
    fn appendable(&self, _seg: u64) -> bool {
        true
    }
    /// Whether sealed segments move elsewhere ([`Storage::seal`]): the log then seals its
    /// segment after every completed set and before compaction deletes anything.
    fn remote(&self) -> bool {
        false
    }
    /// Segments numbered below `below` will never be appended to again: move them to their
    /// final home (upload them), durably. A no-op for local storage.
    fn seal(&self, _below: u64) -> io::Result<()> {
        Ok(())
    }
}

/// Free and total bytes of the file system holding the segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub free: u64,
    pub total: u64,
}

impl Space {
    /// Space kept free below every batch, so the index and the file system never run out
    /// mid-write: 2% of the file system, at least 1 MiB and at most 64 MiB.
    pub fn reserve(&self) -> u64 {
        (self.total / 50).clamp(1 << 20, 64 << 20)
    }
}

/// Segments as files `<dir>/<16 hex digits>.seg`.
#[derive(Debug)]
pub struct DirStorage {
    dir: PathBuf,
    quarantine: PathBuf,
    readers: Mutex<HashMap<u64, Arc<File>>>,
}

impl DirStorage {
    /// Uses `dir` for segments and `quarantine` for cut-off bytes, creating both if needed.
    pub fn new(dir: &Path, quarantine: &Path) -> io::Result<Self> {
        if !dir.is_dir() {
            fs::create_dir_all(dir)?;
            // The new directory entry must survive a power cut like the files inside it.
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        Ok(DirStorage { dir: dir.to_owned(), quarantine: quarantine.to_owned(), readers: Mutex::new(HashMap::new()) })
    }

    pub fn path(&self, seg: u64) -> PathBuf {
        self.dir.join(format!("{seg:016x}.seg"))
    }

    fn reader(&self, seg: u64) -> io::Result<Arc<File>> {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = readers.get(&seg) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(self.path(seg))?);
        readers.insert(seg, f.clone());
        Ok(f)
    }

    pub(crate) fn forget_reader(&self, seg: u64) {
        self.readers.lock().unwrap_or_else(|p| p.into_inner()).remove(&seg);
    }
}

/// The number of a segment file or object named `<16 hex digits>.seg`; `None` for other names.
pub fn segment_number(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg").filter(|h| h.len() == 16)?;
    u64::from_str_radix(hex, 16).ok()
}

/// Makes a directory's entries (file creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[derive(Debug)]
struct LocalSegment {
    file: File,
}

impl SegmentFile for LocalSegment {
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

impl Storage for DirStorage {
    fn list(&self) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(n) = segment_number(name) {
                out.push(n);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn create(&self, seg: u64, header: &[u8]) -> io::Result<Box<dyn SegmentFile>> {
        let mut file = OpenOptions::new().append(true).create_new(true).open(self.path(seg))?;
        file.write_all(header)?;
        file.sync_all()?;
        sync_dir(&self.dir)?;
        Ok(Box::new(LocalSegment { file }))
    }

    fn open_append(&self, seg: u64) -> io::Result<Box<dyn SegmentFile>> {
        let file = OpenOptions::new().append(true).open(self.path(seg))?;
        Ok(Box::new(LocalSegment { file }))
    }

    fn len(&self, seg: u64) -> io::Result<u64> {
        Ok(fs::metadata(self.path(seg))?.len())
    }

    fn read_at(&self, seg: u64, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.reader(seg)?.read_exact_at(buf, offset)
    }

    fn truncate(&self, seg: u64, len: u64) -> io::Result<()> {
        let f = OpenOptions::new().write(true).open(self.path(seg))?;
        f.set_len(len)?;
        f.sync_all()?;
        self.forget_reader(seg);
        Ok(())
    }

    fn remove(&self, seg: u64) -> io::Result<()> {
        self.forget_reader(seg);
        fs::remove_file(self.path(seg))?;
        sync_dir(&self.dir)
    }

    fn quarantine(&self, seg: u64, offset: u64, bytes: &[u8]) -> io::Result<PathBuf> {
        fs::create_dir_all(&self.quarantine)?;
        // Never overwrite earlier quarantined bytes: the same offset can be cut more than once.
        let (path, mut f) = (0u32..)
            .map(|n| self.quarantine.join(format!("{seg:016x}-{offset:x}-{n}.tail")))
            .find_map(|p| match OpenOptions::new().write(true).create_new(true).open(&p) {
                Ok(f) => Some(Ok((p, f))),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => None,
                Err(e) => Some(Err(e)),
            })
            .expect("an unused quarantine name exists")?;
        f.write_all(bytes)?;
        f.sync_all()?;
        sync_dir(&self.quarantine)?;
        Ok(path)
    }

    fn describe(&self, seg: u64) -> PathBuf {
        self.path(seg)
    }

    fn space(&self) -> io::Result<Option<Space>> {
        let st = nix::sys::statvfs::statvfs(&self.dir).map_err(io::Error::from)?;
        let frag = st.fragment_size() as u64;
        Ok(Some(Space { free: st.blocks_available() as u64 * frag, total: st.blocks() as u64 * frag }))
    }
}
