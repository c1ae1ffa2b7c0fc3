//! Restoring a file or a tree from a set, bit-exact, with metadata.
//!
//! Regular files are written to a temporary name and renamed into place (a killed restore never
//! leaves a truncated file at the target); only data extents are written, so holes stay holes.
//! Hard links are restored as links within one run. Directory metadata is applied after their
//! contents (post-order), so their times are the stored ones.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use tardis_client::fsmeta::Owners;
use tardis_client::restore::{self, FileWriter, RestoreOptions};
use tardis_core::meta::Kind;
use tardis_core::view::{Node, Tree};

/// Totals of a restore.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RestoreStats {
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
    pub links: u64,
}

/// Restores nodes of one tree.
#[derive(Debug)]
pub struct Restorer<'a> {
    tree: &'a Tree<'a>,
    opts: RestoreOptions,
    owners: Owners,
    links: HashMap<(u64, u64), PathBuf>,
    pub stats: RestoreStats,
}

impl<'a> Restorer<'a> {
    pub fn new(tree: &'a Tree<'a>, opts: RestoreOptions) -> Self {
        Restorer { tree, opts, owners: Owners::new(), links: HashMap::new(), stats: RestoreStats::default() }
    }

    /// Restores `node` (and, for a directory, everything below it) at `target`.
    pub fn restore(&mut self, node: &Node, target: &Path) -> Result<()> {
        self.stats.entries += 1;
        let meta = &node.meta;
        match meta.kind {
            Kind::Dir => {
                restore::create_node(target, meta, &self.opts)?;
                for child in self.tree.children(node)? {
                    let name = std::ffi::OsStr::from_bytes(&child.meta.name);
                    self.restore(&child, &target.join(name))?;
                }
            }
            Kind::File => {
                let link_key = (meta.nlink > 1).then_some((meta.dev, meta.ino));
                if let Some(existing) = link_key.and_then(|k| self.links.get(&k)) {
                    restore::link(existing, target, &self.opts)?;
                    self.stats.links += 1;
                    return Ok(());
                }
                let mut w = FileWriter::create(target, &self.opts)?;
                for e in &node.version.extents {
                    let data = self
                        .tree
                        .read_extent(e)
                        .with_context(|| format!("reading {} at offset {}", target.display(), e.offset))?;
                    w.write_at(e.offset, &data)?;
                }
                w.finish(meta.size)?;
                self.stats.files += 1;
                self.stats.bytes += meta.size;
                if let Some(k) = link_key {
                    self.links.insert(k, target.to_owned());
                }
            }
            _ => restore::create_node(target, meta, &self.opts)?,
        }
        restore::apply_meta(target, meta, &self.opts, &mut self.owners)?;
        Ok(())
    }

    /// Writes a regular file's data to `out` (for `regenerate` without `-o`).
    pub fn write_to(&mut self, node: &Node, out: &mut dyn std::io::Write) -> Result<()> {
        if node.meta.kind != Kind::File {
            bail!("{} is not a regular file: give -o DIR to restore it", String::from_utf8_lossy(&node.meta.name));
        }
        let mut pos = 0u64;
        for e in &node.version.extents {
            write_zeros(out, e.offset - pos)?;
            out.write_all(&self.tree.read_extent(e)?)?;
            pos = e.offset + u64::from(e.len);
        }
        write_zeros(out, node.meta.size.saturating_sub(pos))?;
        out.flush()?;
        self.stats.files += 1;
        self.stats.bytes += node.meta.size;
        Ok(())
    }
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
    let mut r = Restorer::new(&tree, opts);
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
            // One sync for the whole restore: when regenerate succeeds, the files are durable.
            for target in &targets {
                restore::sync_filesystem(target)?;
            }
            tracing::info!(set = info.name, files = r.stats.files, bytes = r.stats.bytes, "restored");
        }
    }
    Ok(())
}
