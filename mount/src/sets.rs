//! The sets shown at the root of the mount, and the names they are shown under.
//!
//! Only live sets (completed, not purged) are shown. Their names come from the user
//! (`--name`) or the schedule, so they are made safe as directory names: a `/` or NUL becomes
//! `_`, and a name that is empty, `.`, `..`, one of the mount's own entries (`latest`,
//! `.versions`), or held by a later set, gets the suffix `~ID`. The latest set of a name keeps
//! the plain name, which is the set `tardis-tools --set NAME` picks too.

use std::collections::{HashMap, HashSet};
use tardis_core::api::{SetInfo, SetState};
use tardis_core::ids::SetId;

/// The symlink at the root that points at the latest set.
pub const LATEST: &str = "latest";
/// The per-file history view at the root.
pub const VERSIONS: &str = ".versions";

/// One set directory at the root.
#[derive(Debug, Clone)]
pub struct SetDir {
    pub info: SetInfo,
    /// The directory's name at the root (unique).
    pub name: String,
}

/// The live sets, oldest first, with their directory names; and the names of every set (for
/// `user.tardis.since`, which may name a set that is no longer live).
#[derive(Debug, Clone, Default)]
pub struct SetDirs {
    dirs: Vec<SetDir>,
    by_name: HashMap<String, usize>,
    by_id: HashMap<SetId, usize>,
    all_names: HashMap<SetId, String>,
    /// Completed sets, purged or not: their versions and deletions were visible to later sets.
    completed: HashSet<SetId>,
}

impl SetDirs {
    /// Builds the root's set directories from `Repository::sets` (every set, oldest first).
    pub fn new(sets: Vec<SetInfo>) -> SetDirs {
        let all_names = sets.iter().map(|s| (s.id, s.name.clone())).collect();
        let completed = sets.iter().filter(|s| s.state == SetState::Completed).map(|s| s.id).collect();
        let live: Vec<SetInfo> = sets.into_iter().filter(SetInfo::is_live).collect();
        let mut taken: HashSet<String> = [LATEST, VERSIONS, ".", ".."].iter().map(|s| s.to_string()).collect();
        // Newest first, so the latest set of a name keeps it.
        let mut names = vec![String::new(); live.len()];
        for (i, s) in live.iter().enumerate().rev() {
            let mut name: String = s.name.chars().map(|c| if c == '/' || c == '\0' { '_' } else { c }).collect();
            while name.is_empty() || taken.contains(&name) {
                name = format!("{name}~{}", s.id);
            }
            taken.insert(name.clone());
            names[i] = name;
        }
        let dirs: Vec<SetDir> = live.into_iter().zip(names).map(|(info, name)| SetDir { info, name }).collect();
        let by_name = dirs.iter().enumerate().map(|(i, d)| (d.name.clone(), i)).collect();
        let by_id = dirs.iter().enumerate().map(|(i, d)| (d.info.id, i)).collect();
        SetDirs { dirs, by_name, by_id, all_names, completed }
    }

    /// The live sets, oldest first.
    pub fn dirs(&self) -> &[SetDir] {
        &self.dirs
    }

    /// The set shown under `name`.
    pub fn by_name(&self, name: &str) -> Option<&SetDir> {
        self.by_name.get(name).map(|&i| &self.dirs[i])
    }

    /// The live set `id`.
    pub fn live(&self, id: SetId) -> Option<&SetDir> {
        self.by_id.get(&id).map(|&i| &self.dirs[i])
    }

    /// The latest live set, which `latest` points at.
    pub fn latest(&self) -> Option<&SetDir> {
        self.dirs.last()
    }

    /// The stored name of any set, live or not.
    pub fn name_of(&self, id: SetId) -> Option<&str> {
        self.all_names.get(&id).map(String::as_str)
    }

    /// Whether set `id` completed (purged or not).
    pub fn is_completed(&self, id: SetId) -> bool {
        self.completed.contains(&id)
    }

    /// The first live set in `[from, until)`: the one a version written by set `from` and
    /// replaced (or deleted) by set `until` is shown under.
    pub fn first_live_in(&self, from: SetId, until: Option<SetId>) -> Option<&SetDir> {
        let i = self.dirs.partition_point(|d| d.info.id < from);
        self.dirs.get(i).filter(|d| until.is_none_or(|u| d.info.id < u))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(id: SetId, name: &str, state: SetState, purged: bool) -> SetInfo {
        SetInfo {
            id,
            name: name.into(),
            priority: 0,
            started: 0,
            finished: Some(id as i64),
            base: None,
            state,
            purged,
            locked: false,
            stats: Default::default(),
            seal: None,
        }
    }

    #[test]
    fn only_live_sets_with_safe_unique_names() {
        use SetState::*;
        let dirs = SetDirs::new(vec![
            set(1, "daily", Completed, false),
            set(2, "killed", Abandoned, false),
            set(3, "old", Completed, true),
            set(4, "a/b", Completed, false),
            set(5, "daily", Completed, false),
            set(6, "latest", Completed, false),
            set(7, "", Completed, false),
            set(8, "running", Open, false),
        ]);
        let names: Vec<&str> = dirs.dirs().iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["daily~1", "a_b", "daily", "latest~6", "~7"]);
        assert_eq!(dirs.by_name("daily").unwrap().info.id, 5);
        assert_eq!(dirs.latest().unwrap().info.id, 7);
        assert_eq!(dirs.name_of(3), Some("old"));
        assert!(dirs.live(3).is_none());
        assert!(dirs.is_completed(3) && !dirs.is_completed(2) && !dirs.is_completed(8));
    }

    #[test]
    fn versions_are_shown_under_the_first_live_set_holding_them() {
        use SetState::*;
        let dirs = SetDirs::new(vec![
            set(1, "a", Completed, true),
            set(2, "b", Completed, false),
            set(3, "c", Completed, false),
            set(5, "e", Completed, false),
        ]);
        assert_eq!(dirs.first_live_in(1, None).unwrap().name, "b", "written by a purged set, still seen by b");
        assert_eq!(dirs.first_live_in(3, Some(5)).unwrap().name, "c");
        assert!(dirs.first_live_in(1, Some(2)).is_none(), "replaced before any live set saw it");
        assert!(dirs.first_live_in(6, None).is_none());
    }
}
