//! Which sets a purge removes: pure functions of the sets, the schedule and the time.
//!
//! The same rules protect every selection, whoever makes it (schedule, `--before`, `--set`):
//! only live sets (completed, not purged) are purged, never a locked one, and never the latest
//! completed set, so a host always keeps at least its newest backup. The repository enforces
//! these rules again when it is asked to purge ([`crate::api::Repository::purge_sets`]).

use crate::api::{SetInfo, SetState};
use crate::config::Schedule;
use crate::ids::SetId;

/// Why a set cannot be purged, or `None` if it can.
pub fn protected(sets: &[SetInfo], set: SetId) -> Option<&'static str> {
    let Some(s) = sets.iter().find(|s| s.id == set) else { return Some("it does not exist") };
    why_kept(s, latest_completed(sets))
}

/// The newest live set: the one backup a purge always leaves.
pub fn latest_completed(sets: &[SetInfo]) -> Option<SetId> {
    sets.iter().filter(|s| s.is_live()).map(|s| s.id).max()
}

/// [`protected`] for one set, given the latest completed set (computed once per selection, so
/// that choosing among many sets stays linear).
fn why_kept(s: &SetInfo, latest: Option<SetId>) -> Option<&'static str> {
    if s.purged {
        return Some("it is already purged");
    }
    match s.state {
        SetState::Open => return Some("it is still being written"),
        SetState::Abandoned => return Some("it never completed"),
        SetState::Completed => {}
    }
    if s.locked {
        return Some("it is locked (unlock it first)");
    }
    if latest == Some(s.id) {
        return Some("it is the latest completed set");
    }
    None
}

fn purgeable(sets: &[SetInfo], max_priority: Option<u32>) -> impl Iterator<Item = &SetInfo> + '_ {
    let latest = latest_completed(sets);
    sets.iter()
        .filter(move |s| why_kept(s, latest).is_none())
        .filter(move |s| max_priority.is_none_or(|p| s.priority <= p))
}

/// The sets the schedule removes at `now` (Unix nanoseconds): those that finished longer ago
/// than their priority's keep time. A set exactly as old as its keep time stays. With
/// `max_priority`, only sets of that priority or lower are considered.
pub fn by_schedule(sets: &[SetInfo], schedule: &Schedule, now: i64, max_priority: Option<u32>) -> Vec<SetId> {
    purgeable(sets, max_priority)
        .filter(|s| {
            let (Some(keep), Some(finished)) = (schedule.keep_for(s.priority), s.finished) else { return false };
            now.saturating_sub(finished) > keep
        })
        .map(|s| s.id)
        .collect()
}

/// The sets that finished before `when`, of priority `max_priority` or lower if given.
pub fn before(sets: &[SetInfo], when: i64, max_priority: Option<u32>) -> Vec<SetId> {
    purgeable(sets, max_priority).filter(|s| s.finished.is_some_and(|f| f < when)).map(|s| s.id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::event::SetStats;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const HOUR: i64 = 3600 * 1_000_000_000;

    fn set(id: SetId, priority: u32, finished: Option<i64>) -> SetInfo {
        SetInfo {
            id,
            name: format!("s{id}"),
            priority,
            started: finished.unwrap_or(0),
            finished,
            base: None,
            state: if finished.is_some() { SetState::Completed } else { SetState::Abandoned },
            purged: false,
            locked: false,
            stats: SetStats::default(),
            seal: None,
        }
    }

    #[test]
    fn the_schedule_keeps_each_class_for_its_time() {
        let now = 1000 * 24 * HOUR;
        let sets = vec![
            set(1, 10, Some(now - 25 * HOUR)), // hourly, older than a day: goes
            set(2, 10, Some(now - 24 * HOUR)), // exactly a day: stays
            set(3, 20, Some(now - 31 * 24 * HOUR)),
            set(4, 20, Some(now - 29 * 24 * HOUR)),
            set(5, 30, Some(now - 183 * 24 * HOUR)),
            set(6, 30, Some(now - 181 * 24 * HOUR)),
            set(7, 40, Some(now - 900 * 24 * HOUR)),
            set(8, 0, Some(now - 25 * HOUR)), // a named set of priority 0 follows the hourly rule
            set(9, 50, Some(now - 900 * 24 * HOUR)),
            set(10, 10, Some(now - 2 * HOUR)),
        ];
        assert_eq!(by_schedule(&sets, &Schedule::default(), now, None), vec![1, 3, 5, 8]);
        assert_eq!(by_schedule(&sets, &Schedule::default(), now, Some(10)), vec![1, 8]);
        assert_eq!(before(&sets, now - 30 * 24 * HOUR, None), vec![3, 5, 6, 7, 9]);
        assert_eq!(before(&sets, now - 30 * 24 * HOUR, Some(30)), vec![3, 5, 6]);
    }

    #[test]
    fn locked_latest_open_and_purged_sets_are_protected() {
        let now = 1000 * 24 * HOUR;
        let mut sets = vec![set(1, 10, Some(now - 90 * HOUR)), set(2, 10, Some(now - 80 * HOUR))];
        sets[0].locked = true;
        assert_eq!(protected(&sets, 1), Some("it is locked (unlock it first)"));
        assert_eq!(protected(&sets, 2), Some("it is the latest completed set"));
        assert_eq!(by_schedule(&sets, &Schedule::default(), now, None), Vec::<SetId>::new());
        // An open set newer than the latest completed one does not make that one purgeable.
        let mut open = set(3, 10, None);
        open.state = SetState::Open;
        sets.push(open);
        assert_eq!(protected(&sets, 3), Some("it is still being written"));
        assert_eq!(protected(&sets, 2), Some("it is the latest completed set"));
        // A purged newer set does not count as the latest.
        sets[1].purged = true;
        sets[0].locked = false;
        assert_eq!(protected(&sets, 1), Some("it is the latest completed set"));
        assert_eq!(protected(&sets, 2), Some("it is already purged"));
        assert_eq!(protected(&sets, 9), Some("it does not exist"));
    }

    fn arb_sets() -> impl Strategy<Value = Vec<SetInfo>> {
        proptest::collection::vec((0u32..60, 0i64..2000, 0u8..10, any::<bool>()), 0..40).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (prio, age_hours, kind, locked))| {
                    let mut s = set(i as SetId + 1, prio, Some(-age_hours * HOUR));
                    s.locked = locked && kind < 3;
                    s.purged = kind == 3;
                    if kind == 4 {
                        s.state = SetState::Abandoned;
                        s.finished = None;
                    }
                    s
                })
                .collect()
        })
    }

    fn arb_schedule() -> impl Strategy<Value = Schedule> {
        let keep = prop_oneof![Just("forever".to_string()), (1u32..2000).prop_map(|h| format!("{h}h"))];
        (proptest::collection::vec(0u32..60, 4), proptest::collection::vec(keep, 4)).prop_map(|(p, k)| {
            let names = ["Hourly", "Daily", "Weekly", "Monthly"];
            let mut stored = BTreeMap::new();
            for i in 0..4 {
                stored.insert(format!("{}Priority", names[i]), p[i].to_string());
                stored.insert(format!("{}Keep", names[i]), k[i].clone());
            }
            Config::from_stored(&stored).unwrap().schedule()
        })
    }

    proptest! {
        #[test]
        fn a_plan_only_ever_names_purgeable_sets(sets in arb_sets(), schedule in arb_schedule(), p in proptest::option::of(0u32..60)) {
            let plan = by_schedule(&sets, &schedule, 0, p);
            for id in &plan {
                prop_assert_eq!(protected(&sets, *id), None);
                let s = sets.iter().find(|s| s.id == *id).unwrap();
                prop_assert!(p.is_none_or(|p| s.priority <= p));
                prop_assert!(-s.finished.unwrap() > schedule.keep_for(s.priority).unwrap());
            }
            // Whatever the schedule, the newest completed set survives, and so does every locked one.
            if let Some(latest) = latest_completed(&sets) {
                prop_assert!(!plan.contains(&latest));
            }
            prop_assert!(sets.iter().filter(|s| s.locked).all(|s| !plan.contains(&s.id)));
        }

        #[test]
        fn a_longer_keep_time_never_purges_more(sets in arb_sets(), hours in 1i64..2000) {
            let mut stored = BTreeMap::new();
            stored.insert("HourlyKeep".to_string(), format!("{hours}h"));
            let short = Config::from_stored(&stored).unwrap().schedule();
            stored.insert("HourlyKeep".to_string(), format!("{}h", hours + 1));
            let long = Config::from_stored(&stored).unwrap().schedule();
            let a = by_schedule(&sets, &short, 0, None);
            let b = by_schedule(&sets, &long, 0, None);
            prop_assert!(b.iter().all(|id| a.contains(id)));
        }

        #[test]
        fn purging_the_plan_leaves_nothing_more_to_purge(sets in arb_sets(), schedule in arb_schedule()) {
            let plan = by_schedule(&sets, &schedule, 0, None);
            let after: Vec<SetInfo> = sets.iter().cloned().map(|mut s| { s.purged |= plan.contains(&s.id); s }).collect();
            prop_assert_eq!(by_schedule(&after, &schedule, 0, None), Vec::<SetId>::new());
        }
    }
}
