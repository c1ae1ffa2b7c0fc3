//! Restoring a file or a tree from a set, bit-exact, with metadata.
//!
//! Regular files are written to a temporary name and renamed into place (a killed restore never
//! leaves a truncated file at the target); a tree restored to a new path is built under one
//! temporary name and renamed into place whole. Only data extents are written, so holes stay
//! holes.
//! Hard links are restored as links within one run. Directory metadata is applied after their
//! contents, so their times are the stored ones.
//!
//! The tree is walked on one thread, which creates directories and small nodes at once and
//! queues regular files. Queued files are written by a pool of threads, several files at a
//! time and, within a file, several chunks decoded at a time and written in order, so a
//! restore uses every core for decryption and decompression, and keeps several reads in flight
//! to a server. The queue is bounded, so memory does not grow with the tree.

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tardis_client::fsmeta::Owners;
use tardis_client::restore::{self, FileWriter, RestoreOptions};
use tardis_core::event::Extent;
use tardis_core::meta::{FileMeta, Kind};
use tardis_core::view::{Node, Tree};

/// Threads that write files. More than the cores: with a server, each waits on round trips.
const WRITERS: usize = 8;
/// Chunks of one file decoded at a time (at most 4 MiB each).
const CHUNKS_AT_ONCE: usize = 8;
/// Files and bytes the walk queues before the writers empty the queue.
const QUEUE_FILES: usize = 1024;
const QUEUE_BYTES: u64 = 256 << 20;

/// Totals of a restore.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RestoreStats {
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
    pub links: u64,
}

/// A regular file the walk found, to be written by the pool.
#[derive(Debug)]
struct FileJob {
    node: Node,
    target: PathBuf,
}

/// Restores nodes of one tree.
#[derive(Debug)]
pub struct Restorer<'a> {
    tree: &'a Tree<'a>,
    opts: RestoreOptions,
    owners: Owners,
    /// Held while a file's length and metadata are set (`FileWriter::finish`), so that one
    /// writer at a time does it: eight at once contend in the file system. Restoring the
    /// benchmark's v2 set to ext4 took 11.0 s (12.7 s system time) that way, and 8.3 s (7.7 s)
    /// one at a time (medians of 5, cold cache).
    finishing: Mutex<()>,
    pool: rayon::ThreadPool,
    /// The first path restored for each (device, inode) with several links.
    links: HashMap<(u64, u64), PathBuf>,
    queue: Vec<FileJob>,
    queued_bytes: u64,
    /// Further links to files that may still be queued: made once the queue is written.
    later_links: Vec<(PathBuf, PathBuf)>,
    /// Directories in the order they were created; their metadata is applied last, deepest first.
    dirs: Vec<(PathBuf, FileMeta)>,
    pub stats: RestoreStats,
}

impl<'a> Restorer<'a> {
    pub fn new(tree: &'a Tree<'a>, opts: RestoreOptions) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(WRITERS.max(std::thread::available_parallelism().map_or(1, |n| n.get())))
            .thread_name(|i| format!("restore-{i}"))
            .build()
            .context("starting the restore threads")?;
        Ok(Restorer {
            tree,
            opts,
            owners: Owners::new(),
            finishing: Mutex::new(()),
            pool,
            links: HashMap::new(),
            queue: Vec::new(),
            queued_bytes: 0,
            later_links: Vec::new(),
            dirs: Vec::new(),
            stats: RestoreStats::default(),
        })
    }

    /// Restores `node` (and, for a directory, everything below it) at `target`.
    pub fn restore(&mut self, node: &Node, target: &Path) -> Result<()> {
        let new_tree = node.meta.kind == Kind::Dir
            && matches!(std::fs::symlink_metadata(target), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
        if !new_tree {
            return self.restore_at(node, target);
        }
        let staging = restore::begin_tree(target)?;
        let saved = self.opts;
        self.opts.direct = true;
        let done = self.restore_at(node, &staging);
        self.opts = saved;
        if let Err(e) = done {
            if staging.exists() {
                let note = format!("what was restored so far is in {} (a new run starts over)", staging.display());
                return Err(e.context(note));
            }
            return Err(e);
        }
        restore::finish_tree(&staging, target)
            .with_context(|| format!("the restored tree is complete under {}", staging.display()))?;
        // Links to this tree from paths restored later must name where it is now.
        for path in self.links.values_mut() {
            if let Ok(rest) = path.strip_prefix(&staging) {
                *path = target.join(rest);
            }
        }
        Ok(())
    }

    fn restore_at(&mut self, node: &Node, target: &Path) -> Result<()> {
        self.walk(node, target)?;
        self.write_queue()?;
        for (existing, new) in std::mem::take(&mut self.later_links) {
            restore::link(&existing, &new, &self.opts)?;
        }
        for (path, meta) in std::mem::take(&mut self.dirs).iter().rev() {
            restore::apply_meta(path, meta, &self.opts, &self.owners)?;
        }
        Ok(())
    }

    fn walk(&mut self, node: &Node, target: &Path) -> Result<()> {
        self.stats.entries += 1;
        let meta = &node.meta;
        match meta.kind {
            Kind::Dir => {
                restore::create_node(target, meta, &self.opts)?;
                self.dirs.push((target.to_owned(), meta.clone()));
                for child in self.tree.children(node)? {
                    let name = std::ffi::OsStr::from_bytes(&child.meta.name);
                    self.walk(&child, &target.join(name))?;
                }
                return Ok(());
            }
            Kind::File => {
                if meta.nlink > 1 {
                    let key = (meta.dev, meta.ino);
                    if let Some(existing) = self.links.get(&key) {
                        self.later_links.push((existing.clone(), target.to_owned()));
                        self.stats.links += 1;
                        return Ok(());
                    }
                    self.links.insert(key, target.to_owned());
                }
                self.stats.files += 1;
                self.stats.bytes += meta.size;
                self.queued_bytes += meta.size;
                self.queue.push(FileJob { node: node.clone(), target: target.to_owned() });
                if self.queue.len() >= QUEUE_FILES || self.queued_bytes >= QUEUE_BYTES {
                    self.write_queue()?;
                }
                return Ok(());
            }
            _ => restore::create_node(target, meta, &self.opts)?,
        }
        restore::apply_meta(target, meta, &self.opts, &self.owners)?;
        Ok(())
    }

    /// Writes every queued file, several at a time.
    fn write_queue(&mut self) -> Result<()> {
        let queue = std::mem::take(&mut self.queue);
        self.queued_bytes = 0;
        let (tree, opts, owners, pool) = (self.tree, &self.opts, &self.owners, &self.pool);
        let finishing = &self.finishing;
        pool.install(|| {
            queue.par_iter().try_for_each(|job| {
                let mut w = FileWriter::create(&job.target, opts)?;
                for_each_extent(pool, tree, &job.node.version.extents, |e, data| {
                    w.write_at(e.offset, data)
                        .with_context(|| format!("writing {} at offset {}", job.target.display(), e.offset))
                })
                .with_context(|| format!("restoring {}", job.target.display()))?;
                let _one_at_a_time = finishing.lock().unwrap_or_else(|p| p.into_inner());
                w.finish(&job.node.meta, owners)?;
                Ok(())
            })
        })
    }

    /// Writes a regular file's data to `out` (for `regenerate` without `-o`).
    pub fn write_to(&mut self, node: &Node, out: &mut dyn std::io::Write) -> Result<()> {
        if node.meta.kind != Kind::File {
            bail!("{} is not a regular file: give -o DIR to restore it", String::from_utf8_lossy(&node.meta.name));
        }
        let mut pos = 0u64;
        for_each_extent(&self.pool, self.tree, &node.version.extents, |e, data| {
            write_zeros(out, e.offset - pos)?;
            out.write_all(data)?;
            pos = e.offset + u64::from(e.len);
            Ok(())
        })?;
        write_zeros(out, node.meta.size.saturating_sub(pos))?;
        out.flush()?;
        self.stats.files += 1;
        self.stats.bytes += node.meta.size;
        Ok(())
    }
}

/// Decodes the extents of one file [`CHUNKS_AT_ONCE`] at a time, in parallel on `pool`, and
/// hands each to `write` in order on the calling thread.
fn for_each_extent(
    pool: &rayon::ThreadPool,
    tree: &Tree<'_>,
    extents: &[Extent],
    mut write: impl FnMut(&Extent, &[u8]) -> Result<()>,
) -> Result<()> {
    for group in extents.chunks(CHUNKS_AT_ONCE) {
        let data: Vec<Vec<u8>> = pool.install(|| {
            group
                .par_iter()
                .map(|e| tree.read_extent(e).with_context(|| format!("reading the chunk at offset {}", e.offset)))
                .collect::<Result<_>>()
        })?;
        for (e, d) in group.iter().zip(&data) {
            write(e, d)?;
        }
    }
    Ok(())
}

fn write_zeros(out: &mut dyn std::io::Write, mut n: u64) -> Result<()> {
    let zeros = [0u8; 64 << 10];
    while n > 0 {
        let k = n.min(zeros.len() as u64) as usize;
        out.write_all(&zeros[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// Where each of `paths` goes for `-o OUT`: OUT itself for one path that is not an existing
/// directory, else OUT/<base name>.
pub fn targets(paths: &[PathBuf], out: &Path) -> Result<Vec<PathBuf>> {
    let out_is_dir = out.is_dir();
    if paths.len() > 1 && !out_is_dir {
        bail!("{} is not a directory: with several paths, -o must name an existing directory", out.display());
    }
    paths
        .iter()
        .map(|p| {
            if !out_is_dir {
                return Ok(out.to_owned());
            }
            Ok(match p.file_name() {
                Some(n) => out.join(n),
                None => out.to_owned(), // the root "/" restores into OUT itself
            })
        })
        .collect()
}

/// Options of `regenerate`.
#[derive(clap::Args, Debug, Clone)]
pub struct RegenerateArgs {
    /// Restore from the set with this name [default: the latest completed set]
    #[arg(long, value_name = "SET", conflicts_with = "time")]
    pub set: Option<String>,
    /// Restore from the last set completed at or before WHEN ("2026-11-26 10:00", "yesterday", "3 days ago")
    #[arg(long, value_name = "WHEN")]
    pub time: Option<String>,
    /// Where to restore: a new path, or an existing directory to restore into [default: a single
    /// file is written to stdout]
    #[arg(short, long, value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Replace files that already exist at the target
    #[arg(long)]
    pub overwrite: bool,
    /// Do not restore owners (default: restore them when running as root)
    #[arg(long)]
    pub no_owners: bool,
    /// Absolute paths as they were backed up
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

/// Runs `regenerate` against an opened repository.
pub fn run(
    repo: &dyn tardis_core::api::Repository,
    keys: &tardis_core::crypto::Keys,
    args: &RegenerateArgs,
) -> Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let info = crate::select::pick(repo, args.set.as_deref(), args.time.as_deref())?;
    let tree = Tree::new(repo, keys, info.id);
    let mut opts = RestoreOptions { overwrite: args.overwrite, ..RestoreOptions::default() };
    if args.no_owners {
        opts.owners = false;
    }
    let mut r = Restorer::new(&tree, opts)?;
    let mut nodes = Vec::new();
    for p in &args.paths {
        let abs = tardis_client::backup::normalize(p)?;
        let node = tree
            .resolve(abs.as_os_str().as_bytes())?
            .with_context(|| format!("{} is not in set {}", abs.display(), info.name))?;
        nodes.push(node);
    }
    match &args.output {
        None => {
            if nodes.len() != 1 {
                bail!("give -o DIR to restore several paths");
            }
            let stdout = std::io::stdout();
            r.write_to(&nodes[0], &mut stdout.lock())?;
        }
        Some(out) => {
            let targets = targets(&args.paths, out)?;
            for (node, target) in nodes.iter().zip(&targets) {
                r.restore(node, target)?;
            }
            // One sync per target's file system, not one per file: when regenerate succeeds, the
            // files are durable. (A new directory tree was also synced once before it was renamed
            // into place.)
            for target in &targets {
                restore::sync_filesystem(target)?;
            }
            tracing::info!(set = info.name, files = r.stats.files, bytes = r.stats.bytes, "restored");
        }
    }
    Ok(())
}
