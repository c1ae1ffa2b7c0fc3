//! Set seals: the client's signature on each set it completes.
//!
//! A set's name, priority, start time and base come from the server's set list, which the
//! server could edit: rename a set, move it in time, or change the base a set records its
//! changes against. The client therefore seals those fields with the host key
//! (`Purpose::SetMeta`, the set ID as the object) and stores the seal in the set's
//! `SetCompleted` record. Anyone reading the set list checks each live set against its seal,
//! so a set the server forged, altered or copied under another ID fails to open.
//!
//! Set IDs grow with every set a host opens and the latest completed set is never purged, so
//! the highest sealed set ID is a high-water mark: a repository that shows a lower one than a
//! client has seen before was rolled back (see `tardis_client::seen`).

use crate::api::SetInfo;
use crate::crypto::{Keys, Purpose};
use crate::ids::SetId;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// The fields of a set that its seal binds (the set ID and host are in the associated data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Sealed {
    name: String,
    priority: u32,
    started: i64,
    base: Option<SetId>,
}

impl Sealed {
    fn of(info: &SetInfo) -> Sealed {
        Sealed { name: info.name.clone(), priority: info.priority, started: info.started, base: info.base }
    }
}

/// The seal of `info` (an open set, as the server lists it) for its `SetCompleted` record.
pub fn seal(keys: &Keys, info: &SetInfo) -> Result<Vec<u8>> {
    let plain = rmp_serde::to_vec(&Sealed::of(info)).expect("a set's sealed fields serialise");
    keys.seal(Purpose::SetMeta, &info.id.to_le_bytes(), &plain)
}

/// Checks that `info` carries a seal made by this host's key for exactly these fields.
pub fn check(keys: &Keys, info: &SetInfo) -> Result<()> {
    let tampered = |why: &str| Error::Tampered { what: format!("set {} ({}): {why}", info.id, info.name) };
    let Some(sealed) = &info.seal else {
        return Err(tampered("it carries no seal"));
    };
    let plain = keys
        .open(Purpose::SetMeta, &info.id.to_le_bytes(), sealed)
        .map_err(|_| tampered("its seal was not made by this host's key for this set"))?;
    let fields: Sealed = rmp_serde::from_slice(&plain).map_err(|_| tampered("its seal does not decode"))?;
    if fields != Sealed::of(info) {
        return Err(tampered("the set list differs from what its seal says (name, priority, start or base)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SetState;
    use crate::crypto::MasterKey;
    use crate::event::SetStats;
    use crate::ids::HostId;
    use proptest::prelude::*;

    fn keys(host: u8) -> Keys {
        Keys::encrypted(HostId([host; 16]), &MasterKey([7; 32]))
    }

    fn info(id: SetId, name: &str) -> SetInfo {
        SetInfo {
            id,
            name: name.into(),
            priority: 10,
            started: 1_000,
            finished: Some(2_000),
            base: id.checked_sub(1),
            state: SetState::Completed,
            purged: false,
            locked: false,
            stats: SetStats::default(),
            seal: None,
        }
    }

    fn sealed(k: &Keys, id: SetId, name: &str) -> SetInfo {
        let mut i = info(id, name);
        i.seal = Some(seal(k, &i).unwrap().into());
        i
    }

    #[test]
    fn a_sealed_set_checks_and_every_edit_is_caught() {
        let k = keys(1);
        let good = sealed(&k, 5, "monday");
        check(&k, &good).unwrap();
        // Fields the server may change freely: completion time, statistics, flags.
        let mut fine = good.clone();
        fine.finished = Some(9_999);
        fine.stats.entries = 42;
        fine.locked = true;
        check(&k, &fine).unwrap();
        let edits: [fn(&mut SetInfo); 6] = [
            |i| i.name = "tuesday".into(),
            |i| i.priority = 0,
            |i| i.started += 1,
            |i| i.base = None,
            |i| i.id = 6,
            |i| i.seal = None,
        ];
        for edit in edits {
            let mut bad = good.clone();
            edit(&mut bad);
            assert!(matches!(check(&k, &bad), Err(Error::Tampered { .. })), "{bad:?}");
        }
        assert!(check(&keys(2), &good).is_err(), "another host's key does not accept the seal");
    }

    proptest! {
        #[test]
        fn seals_round_trip_and_flipped_bytes_fail(id in 1u64..u64::MAX, name in "[a-z0-9-]{1,40}", flip in any::<prop::sample::Index>()) {
            let k = keys(3);
            let good = sealed(&k, id, &name);
            prop_assert!(check(&k, &good).is_ok());
            let mut bad = good.clone();
            let seal = bad.seal.as_mut().unwrap();
            let at = flip.index(seal.len());
            seal[at] ^= 1;
            prop_assert!(check(&k, &bad).is_err());
        }
    }
}
