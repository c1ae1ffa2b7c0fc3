//! `diff SET1 SET2 [PATH]`: entries added, removed and changed between two sets.

use anyhow::Result;
use std::collections::BTreeMap;
use tardis_core::meta::Kind;
use tardis_core::view::{Node, Tree};

/// One difference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Added(Vec<u8>),
    Removed(Vec<u8>),
    Changed(Vec<u8>),
}

/// Compares the subtrees at `path` of two sets, depth first, in name order.
pub fn diff(a: &Tree<'_>, b: &Tree<'_>, path: &[u8]) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    let na = a.resolve(path)?;
    let nb = b.resolve(path)?;
    walk(a, b, path.to_vec(), na.as_ref(), nb.as_ref(), &mut out)?;
    Ok(out)
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = parent.to_vec();
    if !p.ends_with(b"/") {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn children(t: &Tree<'_>, n: Option<&Node>) -> Result<BTreeMap<Vec<u8>, Node>> {
    match n {
        Some(n) if n.meta.kind == Kind::Dir => {
            Ok(t.children(n)?.into_iter().map(|c| (c.meta.name.to_vec(), c)).collect())
        }
        _ => Ok(BTreeMap::new()),
    }
}

fn walk(
    a: &Tree<'_>,
    b: &Tree<'_>,
    path: Vec<u8>,
    na: Option<&Node>,
    nb: Option<&Node>,
    out: &mut Vec<Change>,
) -> Result<()> {
    match (na, nb) {
        (None, None) => return Ok(()),
        (None, Some(_)) => out.push(Change::Added(path.clone())),
        (Some(_), None) => out.push(Change::Removed(path.clone())),
        (Some(x), Some(y)) => {
            // The same stored row means the same version; otherwise compare what a user sees.
            let same = x.version == y.version
                || (x.version.extents == y.version.extents && x.meta.size == y.meta.size && same_visible(x, y));
            // Directories themselves are not reported: their times change with every child.
            let both_dirs = x.meta.kind == Kind::Dir && y.meta.kind == Kind::Dir;
            if !same && !both_dirs {
                out.push(Change::Changed(path.clone()));
            }
        }
    }
    let ca = children(a, na)?;
    let mut cb = children(b, nb)?;
    for (name, x) in &ca {
        let y = cb.remove(name);
        walk(a, b, join(&path, name), Some(x), y.as_ref(), out)?;
    }
    for (name, y) in &cb {
        walk(a, b, join(&path, name), None, Some(y), out)?;
    }
    Ok(())
}

fn same_visible(x: &Node, y: &Node) -> bool {
    let (m, n) = (&x.meta, &y.meta);
    m.kind == n.kind
        && m.mode == n.mode
        && m.uid == n.uid
        && m.gid == n.gid
        && m.target == n.target
        && m.xattrs == n.xattrs
        && m.mtime == n.mtime
}
