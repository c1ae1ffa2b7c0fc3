//! `sets`, `ls` and `ls --versions`.

use crate::select::format_time;
use anyhow::{anyhow, Result};
use serde::Serialize;
use tardis_core::api::{EntryVersion, Repository, SetInfo, SetState};
use tardis_core::crypto::Keys;
use tardis_core::ids::DirId;
use tardis_core::meta::{FileMeta, Kind};
use tardis_core::view::{self, components, Node, Tree};

/// One line of `sets --json`.
#[derive(Debug, Serialize)]
pub struct SetLine {
    pub id: u64,
    pub name: String,
    pub state: &'static str,
    pub priority: u32,
    pub started: String,
    pub finished: Option<String>,
    pub entries: u64,
    pub bytes: u64,
    pub changed: u64,
    pub new_chunks: u64,
    pub new_bytes: u64,
    pub locked: bool,
}

impl From<&SetInfo> for SetLine {
    fn from(s: &SetInfo) -> Self {
        let state = match (s.state, s.purged) {
            (_, true) => "purged",
            (SetState::Completed, _) => "complete",
            (SetState::Open, _) => "running",
            (SetState::Abandoned, _) => "incomplete",
        };
        SetLine {
            id: s.id,
            name: s.name.clone(),
            state,
            priority: s.priority,
            started: format_time(s.started),
            finished: s.finished.map(format_time),
            entries: s.stats.entries,
            bytes: s.stats.bytes,
            changed: s.stats.changed,
            new_chunks: s.stats.new_chunks,
            new_bytes: s.stats.new_bytes,
            locked: s.locked,
        }
    }
}

/// Prints every set, oldest first; purged sets only with `all`.
pub fn sets(repo: &dyn Repository, json: bool, all: bool) -> Result<()> {
    let sets: Vec<SetInfo> = repo.sets()?.into_iter().filter(|s| all || !s.purged).collect();
    if json {
        for s in &sets {
            println!("{}", serde_json::to_string(&SetLine::from(s))?);
        }
        return Ok(());
    }
    println!(
        "{:>5}  {:<28} {:<10} {:>4}  {:<19}  {:>9} {:>10} {:>8} {:>10}",
        "ID", "NAME", "STATE", "PRIO", "STARTED", "ENTRIES", "SIZE", "CHANGED", "ADDED"
    );
    for s in &sets {
        let l = SetLine::from(s);
        println!(
            "{:>5}  {:<28} {:<10} {:>4}  {:<19}  {:>9} {:>10} {:>8} {:>10}",
            l.id,
            l.name,
            if l.locked && l.state == "complete" { "locked" } else { l.state },
            l.priority,
            l.started,
            l.entries,
            human(l.bytes),
            l.changed,
            human(l.new_bytes)
        );
    }
    Ok(())
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `ls -l`-style line for one entry.
pub fn long_line(meta: &FileMeta) -> String {
    let kind = match meta.kind {
        Kind::File => '-',
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::Fifo => 'p',
        Kind::CharDev => 'c',
        Kind::BlockDev => 'b',
    };
    let mut perms = String::with_capacity(9);
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        perms.push(if meta.mode & (0o400 >> i) != 0 { c } else { '-' });
    }
    let user = meta.user.clone().unwrap_or_else(|| meta.uid.to_string());
    let group = meta.group.clone().unwrap_or_else(|| meta.gid.to_string());
    let mtime = format_time(meta.mtime.sec.saturating_mul(1_000_000_000).saturating_add(i64::from(meta.mtime.nsec)));
    let mut line = format!(
        "{kind}{perms} {:>3} {user:<8} {group:<8} {:>12} {mtime} {}",
        meta.nlink,
        meta.size,
        String::from_utf8_lossy(&meta.name)
    );
    if let Some(t) = &meta.target {
        line.push_str(" -> ");
        line.push_str(&String::from_utf8_lossy(t));
    }
    line
}

/// Lists a directory (or describes a file) of a set.
pub fn ls(tree: &Tree<'_>, path: &[u8]) -> Result<()> {
    let node =
        tree.resolve(path)?.ok_or_else(|| anyhow!("{} is not in set {}", String::from_utf8_lossy(path), tree.set()))?;
    let entries: Vec<Node> = if node.meta.kind == Kind::Dir { tree.children(&node)? } else { vec![node] };
    for n in entries {
        println!("{}", long_line(&n.meta));
    }
    Ok(())
}

/// The directory ID and name of an absolute path, computed from the keys alone.
pub fn path_ids(keys: &Keys, path: &[u8]) -> (DirId, Vec<u8>) {
    let comps = components(path);
    let mut parent = DirId::TOP;
    let mut name = view::ROOT_NAME.to_vec();
    for c in comps {
        parent = keys.dir_id(&parent, &name);
        name = c.to_vec();
    }
    (parent, name)
}

/// Every distinct version of a path, with the first set that holds it (the seed's `lstardis`).
pub fn versions(repo: &dyn Repository, keys: &Keys, path: &[u8]) -> Result<()> {
    let (dir, name) = path_ids(keys, path);
    let key = keys.name_key(&dir, &name);
    let sets = repo.sets()?;
    let completed = |id: u64| sets.iter().find(|s| s.id == id && s.state == SetState::Completed);
    let mut any = false;
    for v in repo.history(&dir, &key)? {
        let Some(set) = completed(v.set()) else { continue };
        any = true;
        let purged = if set.purged { " (purged)" } else { "" };
        match v {
            EntryVersion::Version(fv) => {
                let meta = view::open_meta(keys, &fv)?;
                println!("{:<28} {}{purged}", set.name, long_line(&meta));
            }
            EntryVersion::Deleted(_) => println!("{:<28} (deleted){purged}", set.name),
        }
    }
    if !any {
        return Err(anyhow!("{} is in no backup set", String::from_utf8_lossy(path)));
    }
    Ok(())
}
