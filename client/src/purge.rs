//! Purging sets: choosing them (the retention schedule, `--before`, `--set`) and asking the
//! repository to purge them. Used by `tardis --purge` and `tardis-tools purge`.
//!
//! The choice is made here with [`tardis_core::retention`]; the repository checks the same rules
//! again when it appends the `SetPurged` events, so a client with a wrong clock or an old view of
//! the sets can never remove a locked set or the latest backup.

use crate::error::{Error, Result};
use tardis_core::api::{Repository, SetInfo};
use tardis_core::config::Config;
use tardis_core::retention;

/// Which sets to purge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Those the host's retention schedule says are due at `now` (Unix nanoseconds).
    Schedule { now: i64 },
    /// Those that finished before this time (Unix nanoseconds).
    Before(i64),
    /// The live set of this name.
    Set(String),
}

/// A purge request.
#[derive(Debug, Clone)]
pub struct PurgeOptions {
    pub selection: Selection,
    /// Only sets of this priority or lower.
    pub max_priority: Option<u32>,
    /// List the sets that would go, purge nothing.
    pub dry_run: bool,
}

/// Chooses the sets and, unless `dry_run`, purges them in one batch. Returns them, oldest first.
pub fn purge(repo: &dyn Repository, opts: &PurgeOptions) -> Result<Vec<SetInfo>> {
    let sets = repo.sets()?;
    let ids = match &opts.selection {
        Selection::Schedule { now } => {
            let config = Config::from_stored(&repo.config()?)?;
            retention::by_schedule(&sets, &config.schedule(), *now, opts.max_priority)
        }
        Selection::Before(when) => retention::before(&sets, *when, opts.max_priority),
        Selection::Set(name) => {
            let Some(s) = sets.iter().rev().find(|s| s.name == *name && s.is_live()) else {
                return Err(Error::Invalid(format!("no completed set named {name}; see `tardis-tools sets`")));
            };
            if let Some(why) = retention::protected(&sets, s.id) {
                return Err(Error::Invalid(format!("cannot purge set {name}: {why}")));
            }
            if let Some(p) = opts.max_priority.filter(|p| s.priority > *p) {
                return Err(Error::Invalid(format!(
                    "set {name} has priority {}, above --priority {p}; raise --priority or leave it out",
                    s.priority
                )));
            }
            vec![s.id]
        }
    };
    let chosen: Vec<SetInfo> = sets.into_iter().filter(|s| ids.contains(&s.id)).collect();
    if !opts.dry_run && !chosen.is_empty() {
        repo.purge_sets(&ids)?;
    }
    Ok(chosen)
}
