//! What this client has seen of each host's sets: every live set must carry a valid seal
//! (`tardis_core::setseal`), and the newest set may never go back in time.
//!
//! Set IDs only grow and the latest completed set is never purged, so the newest sealed set
//! a client has seen is a high-water mark. It is kept per host ID in a small file in the
//! client's state directory. A repository whose newest set is older than that mark was rolled
//! back (an old copy restored, or its newest records withheld) and is refused, loudly, before
//! anything is backed up on top of it or restored from it.

use crate::{Error, Result};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use tardis_core::api::SetInfo;
use tardis_core::crypto::Keys;
use tardis_core::ids::{HostId, SetId};

/// The high-water mark file of one host.
#[derive(Debug, Clone)]
pub struct Seen {
    path: PathBuf,
}

/// What a mark file records.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mark {
    /// The newest live set seen, and its name (for messages).
    set: SetId,
    name: String,
    /// The oldest sealed set seen: an unsealed set from here on had its seal stripped.
    sealed_from: Option<SetId>,
}

impl Seen {
    /// The mark of `host` under `state_dir`.
    pub fn new(state_dir: &Path, host: HostId) -> Seen {
        Seen { path: state_dir.join("seen").join(hex(&host.0)) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks the seal of every live set in `sets`, then that the newest is not older than
    /// the mark, and raises the mark to it.
    pub fn check(&self, host: &str, keys: &Keys, sets: &[SetInfo]) -> Result<()> {
        let bad = self.bad_seals(keys, sets);
        if let Some((_, first)) = bad.first() {
            return Err(Error::Invalid(format!(
                "{} of the {} sets of host {host} fail their seal check ({first}); the repository was altered or \
                 damaged: run `tardis-tools verify` to see what it touches",
                bad.len(),
                sets.iter().filter(|s| s.is_live()).count()
            )));
        }
        self.check_newest(host, sets)
    }

    /// The live sets of `sets` whose seal fails, each with the reason. Sets completed before
    /// seals existed (format revision 4) carry none; an unsealed set is accepted as one of
    /// those only if it is older than every sealed set, both those listed and those seen.
    pub fn bad_seals<'a>(&self, keys: &Keys, sets: &'a [SetInfo]) -> Vec<(&'a SetInfo, tardis_core::Error)> {
        let listed = oldest_sealed(sets);
        let seen = self.read().ok().flatten().and_then(|m| m.sealed_from);
        let legacy_below = listed.into_iter().chain(seen).min().unwrap_or(SetId::MAX);
        sets.iter()
            .filter(|s| s.is_live() && !(s.seal.is_none() && s.id < legacy_below))
            .filter_map(|s| tardis_core::setseal::check(keys, s).err().map(|e| (s, e)))
            .collect()
    }

    /// Checks that the newest live set in `sets` (whose seals the caller has checked) is not
    /// older than the mark, and raises the mark to it.
    pub fn check_newest(&self, host: &str, sets: &[SetInfo]) -> Result<()> {
        let newest = sets.iter().filter(|s| s.is_live()).max_by_key(|s| s.id);
        self.compare(host, newest)?;
        if let Some(n) = newest {
            self.raise(n.id, &n.name, oldest_sealed(sets));
        }
        Ok(())
    }

    /// Raises the mark to `set`, a set this client just completed and sealed.
    pub fn record(&self, set: SetId, name: &str) {
        self.raise(set, name, Some(set));
    }

    /// Failing to keep the mark only weakens the check, so it is logged, not returned.
    fn raise(&self, set: SetId, name: &str, sealed: Option<SetId>) {
        let old = self.read().unwrap_or_else(|e| {
            tracing::warn!("{e}");
            None
        });
        let mut mark = old.clone().unwrap_or(Mark { set, name: name.to_owned(), sealed_from: None });
        if set > mark.set {
            (mark.set, mark.name) = (set, name.to_owned());
        }
        mark.sealed_from = mark.sealed_from.into_iter().chain(sealed).min();
        if old.as_ref() == Some(&mark) {
            return;
        }
        if let Err(e) = self.write(&mark) {
            tracing::warn!("{e}; a rollback of this repository would go unnoticed");
        }
    }

    fn compare(&self, host: &str, newest: Option<&SetInfo>) -> Result<()> {
        let mark = match self.read() {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::warn!("{e}; the repository cannot be checked for a rollback");
                return Ok(());
            }
        };
        if newest.is_some_and(|n| n.id >= mark.set) {
            return Ok(());
        }
        let holds = newest.map_or_else(|| "no sets".to_owned(), |n| format!("set {} ({}) as its newest", n.id, n.name));
        Err(Error::Invalid(format!(
            "the repository of host {host} is older than this client last saw: it holds {holds}, but set {} ({}) was \
             seen before; it was rolled back to an older copy or its newest records were withheld. If an older copy \
             was restored on purpose, delete {} and run again",
            mark.set,
            mark.name,
            self.path.display()
        )))
    }

    /// The file holds one line: `<newest set> <oldest sealed set or -> <name of the newest>`.
    fn read(&self) -> Result<Option<Mark>> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("reading", &self.path, e)),
        };
        let bad = || Error::Invalid(format!("{} is not a set mark; delete it", self.path.display()));
        let mut parts = text.trim_end_matches('\n').splitn(3, ' ');
        let (Some(set), Some(from), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let sealed_from = match from {
            "-" => None,
            n => Some(n.parse().map_err(|_| bad())?),
        };
        Ok(Some(Mark { set: set.parse().map_err(|_| bad())?, name: name.to_owned(), sealed_from }))
    }

    /// Written to a temporary file and renamed, so a crash leaves the old mark or the new one.
    fn write(&self, mark: &Mark) -> Result<()> {
        let dir = self.path.parent().expect("the mark lives in a directory");
        fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
        let tmp = self.path.with_extension("tmp");
        let mut f = fs::File::create(&tmp).map_err(|e| Error::io("creating", &tmp, e))?;
        let from = mark.sealed_from.map_or_else(|| "-".to_owned(), |s| s.to_string());
        writeln!(f, "{} {from} {}", mark.set, mark.name)
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io("writing", &tmp, e))?;
        fs::rename(&tmp, &self.path).map_err(|e| Error::io("renaming", &tmp, e))
    }
}

/// The oldest live set of `sets` that carries a seal.
fn oldest_sealed(sets: &[SetInfo]) -> Option<SetId> {
    sets.iter().filter(|s| s.is_live() && s.seal.is_some()).map(|s| s.id).min()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tardis_core::api::SetState;
    use tardis_core::crypto::MasterKey;

    fn keys() -> Keys {
        Keys::encrypted(HostId([9; 16]), &MasterKey::generate().unwrap())
    }

    fn set(keys: &Keys, id: SetId) -> SetInfo {
        let mut s = SetInfo {
            id,
            name: format!("s{id}"),
            priority: 0,
            started: id as i64,
            finished: Some(id as i64),
            base: id.checked_sub(1),
            state: SetState::Completed,
            purged: false,
            locked: false,
            stats: Default::default(),
            seal: None,
        };
        s.seal = Some(tardis_core::setseal::seal(keys, &s).unwrap().into());
        s
    }

    #[test]
    fn the_mark_rises_and_a_rollback_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let k = keys();
        let seen = Seen::new(dir.path(), k.host());
        seen.check("h", &k, &[]).unwrap();
        let sets: Vec<SetInfo> = (1..=3).map(|i| set(&k, i)).collect();
        seen.check("h", &k, &sets).unwrap();
        assert_eq!(fs::read_to_string(seen.path()).unwrap(), "3 1 s3\n");
        // Purging older sets is not a rollback.
        seen.check("h", &k, &sets[2..]).unwrap();
        let err = seen.check("h", &k, &sets[..2]).unwrap_err().to_string();
        assert!(err.contains("older than this client last saw"), "{err}");
        assert!(err.contains("set 2 (s2)") && err.contains("set 3 (s3)"), "{err}");
        assert!(err.contains(&seen.path().display().to_string()), "{err}");
        assert!(seen.check("h", &k, &[]).is_err(), "an emptied repository is a rollback too");
        // The mark never falls.
        seen.record(1, "s1");
        assert_eq!(fs::read_to_string(seen.path()).unwrap(), "3 1 s3\n");
        // Deleting the mark accepts the older copy.
        fs::remove_file(seen.path()).unwrap();
        seen.check("h", &k, &sets[..2]).unwrap();
    }

    #[test]
    fn an_unsealed_or_altered_set_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let k = keys();
        let seen = Seen::new(dir.path(), k.host());
        let mut sets: Vec<SetInfo> = (1..=2).map(|i| set(&k, i)).collect();
        sets[0].name = "renamed".into();
        let err = seen.check("h", &k, &sets).unwrap_err().to_string();
        assert!(err.contains("1 of the 2 sets") && err.contains("tardis-tools verify"), "{err}");
        sets[0] = set(&k, 1);
        sets[1].seal = None;
        assert!(seen.check("h", &k, &sets).is_err());
        assert!(!seen.path().exists(), "nothing is recorded from a list that fails");
    }

    #[test]
    fn a_garbled_mark_is_rewritten_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let k = keys();
        let seen = Seen::new(dir.path(), k.host());
        fs::create_dir_all(seen.path().parent().unwrap()).unwrap();
        fs::write(seen.path(), "garbage").unwrap();
        seen.check("h", &k, &[set(&k, 1)]).unwrap();
        assert_eq!(fs::read_to_string(seen.path()).unwrap(), "1 1 s1\n");
    }

    #[test]
    fn sets_older_than_every_sealed_one_pass_as_written_before_seals() {
        let dir = tempfile::tempdir().unwrap();
        let k = keys();
        let seen = Seen::new(dir.path(), k.host());
        let mut sets: Vec<SetInfo> = (1..=3).map(|i| set(&k, i)).collect();
        sets[0].seal = None;
        sets[1].seal = None;
        seen.check("h", &k, &sets).unwrap();
        assert_eq!(fs::read_to_string(seen.path()).unwrap(), "3 3 s3\n");
        // An unsealed set newer than a sealed one is not from before seals.
        let mut later = sets.clone();
        later.push(set(&k, 4));
        later[3].seal = None;
        assert!(seen.check("h", &k, &later).is_err());
        // Stripping the seal of every set does not pass either: this client saw set 3 sealed.
        let mut stripped = sets.clone();
        stripped[2].seal = None;
        let err = seen.check("h", &k, &stripped).unwrap_err().to_string();
        assert!(err.contains("1 of the 3 sets") && err.contains("set 3 (s3)"), "{err}");
        // A repository written entirely before seals is read as it is.
        let fresh = Seen::new(&dir.path().join("fresh"), k.host());
        fresh.check("h", &k, &sets[..2]).unwrap();
        assert_eq!(fs::read_to_string(fresh.path()).unwrap(), "2 - s2\n");
    }
}
