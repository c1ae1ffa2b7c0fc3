//! Per-host configuration values kept in the repository (`ConfigChanged` events).
//!
//! The set of keys is fixed: each one has a type, a default and a description, and a value is
//! checked against its type before it is stored, both by `tardis-tools config` and by the
//! repository itself (the server must not trust the client's check). A key that is not set
//! has its default; unsetting a key returns it to the default.
//!
//! Retention: four classes (hourly, daily, weekly, monthly), each with a priority and a keep
//! time. A completed set of priority `p` is purged once it is older than the keep time of any
//! class whose priority is at least `p` (the seed's `purge(priority, time)` applied class by
//! class), so with the defaults hourly sets go after a day, daily ones after 30 days, weekly
//! ones after 26 weeks and monthly ones never.

use crate::{Error, Result};
use std::collections::BTreeMap;

/// One known key: its name, what kind of value it takes, its default and what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySpec {
    pub name: &'static str,
    pub kind: ValueKind,
    pub default: &'static str,
    pub help: &'static str,
}

/// The type of a configuration value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// A set priority: an integer from 0 to 1000.
    Priority,
    /// A keep time: `<N>h`, `<N>d` or `<N>w` (N from 1 to 100000), or `forever`.
    Keep,
    /// A count from 1 to 100.
    Count,
    /// A percentage from 0 to 100.
    Percent,
}

impl ValueKind {
    fn describe(self) -> &'static str {
        match self {
            ValueKind::Priority => "an integer from 0 to 1000",
            ValueKind::Keep => "a time like 24h, 30d or 26w, or forever",
            ValueKind::Count => "an integer from 1 to 100",
            ValueKind::Percent => "an integer from 0 to 100",
        }
    }
}

pub const HOURLY_PRIORITY: &str = "HourlyPriority";
pub const HOURLY_KEEP: &str = "HourlyKeep";
pub const DAILY_PRIORITY: &str = "DailyPriority";
pub const DAILY_KEEP: &str = "DailyKeep";
pub const WEEKLY_PRIORITY: &str = "WeeklyPriority";
pub const WEEKLY_KEEP: &str = "WeeklyKeep";
pub const MONTHLY_PRIORITY: &str = "MonthlyPriority";
pub const MONTHLY_KEEP: &str = "MonthlyKeep";
pub const MAX_DELTA_CHAIN: &str = "MaxDeltaChain";
pub const MAX_DELTA_PERCENT: &str = "MaxDeltaPercent";

/// Every key a host's configuration may hold, in the order `config` prints them.
pub const KEYS: &[KeySpec] = &[
    KeySpec { name: HOURLY_PRIORITY, kind: ValueKind::Priority, default: "10", help: "priority of hourly sets" },
    KeySpec { name: HOURLY_KEEP, kind: ValueKind::Keep, default: "1d", help: "how long hourly sets are kept" },
    KeySpec { name: DAILY_PRIORITY, kind: ValueKind::Priority, default: "20", help: "priority of daily sets" },
    KeySpec { name: DAILY_KEEP, kind: ValueKind::Keep, default: "30d", help: "how long daily sets are kept" },
    KeySpec { name: WEEKLY_PRIORITY, kind: ValueKind::Priority, default: "30", help: "priority of weekly sets" },
    KeySpec { name: WEEKLY_KEEP, kind: ValueKind::Keep, default: "26w", help: "how long weekly sets are kept" },
    KeySpec { name: MONTHLY_PRIORITY, kind: ValueKind::Priority, default: "40", help: "priority of monthly sets" },
    KeySpec { name: MONTHLY_KEEP, kind: ValueKind::Keep, default: "forever", help: "how long monthly sets are kept" },
    KeySpec {
        name: MAX_DELTA_CHAIN,
        kind: ValueKind::Count,
        default: "5",
        help: "longest chain of deltas a chunk may be stored as",
    },
    KeySpec {
        name: MAX_DELTA_PERCENT,
        kind: ValueKind::Percent,
        default: "50",
        help: "store a changed chunk as a delta only if that takes at most this percent of its full size (0: never)",
    },
];

/// The spec of `key`, or an error naming every valid key.
pub fn spec(key: &str) -> Result<&'static KeySpec> {
    KEYS.iter().find(|k| k.name == key).ok_or_else(|| {
        let names: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
        Error::Invalid(format!("unknown configuration key {key:?}; valid keys are {}", names.join(", ")))
    })
}

/// Checks that `value` suits `key`. Errors name the key, the value and what it should be.
pub fn validate(key: &str, value: &str) -> Result<()> {
    let spec = spec(key)?;
    let ok = match spec.kind {
        ValueKind::Priority => parse_int(value, 0, 1000).is_some(),
        ValueKind::Keep => parse_keep(value).is_some(),
        ValueKind::Count => parse_int(value, 1, 100).is_some(),
        ValueKind::Percent => parse_int(value, 0, 100).is_some(),
    };
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("invalid value {value:?} for {key}: it must be {}", spec.kind.describe())))
    }
}

fn parse_int(value: &str, min: u32, max: u32) -> Option<u32> {
    // Only plain digits: "+5" or " 5" are refused rather than silently read.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) || value.len() > 6 {
        return None;
    }
    value.parse().ok().filter(|v| (min..=max).contains(v))
}

/// A keep time in nanoseconds (`None` = forever), or `None` if `value` is not one.
fn parse_keep(value: &str) -> Option<Option<i64>> {
    if value == "forever" {
        return Some(None);
    }
    let unit = value.chars().last()?;
    let hours: i64 = match unit {
        'h' => 1,
        'd' => 24,
        'w' => 24 * 7,
        _ => return None,
    };
    let n = i64::from(parse_int(&value[..value.len() - 1], 1, 100_000)?);
    // 100,000 weeks is more nanoseconds than an i64 holds (the limit is about 15,250 weeks):
    // saturate, since a keep time past i64::MAX is never reached by `now - finished` anyway.
    Some(Some(n.saturating_mul(hours * 3600 * 1_000_000_000)))
}

/// The configuration of a host: every known key, with defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    values: BTreeMap<String, String>,
}

impl Config {
    /// Reads stored values. Values that are not valid (written by another build, say) are
    /// reported rather than replaced by defaults: retention must not run on a guess.
    pub fn from_stored(stored: &BTreeMap<String, String>) -> Result<Config> {
        let mut values = BTreeMap::new();
        for k in KEYS {
            let v = match stored.get(k.name) {
                Some(v) => {
                    validate(k.name, v)?;
                    v.clone()
                }
                None => k.default.to_owned(),
            };
            values.insert(k.name.to_owned(), v);
        }
        Ok(Config { values })
    }

    /// The value of a known key (default included).
    pub fn get(&self, key: &str) -> &str {
        self.values.get(key).map_or("", String::as_str)
    }

    /// The retention schedule.
    pub fn schedule(&self) -> Schedule {
        let class = |name: &'static str, prio: &str, keep: &str| Class {
            name,
            priority: parse_int(self.get(prio), 0, 1000).expect("validated on load"),
            keep: parse_keep(self.get(keep)).expect("validated on load"),
        };
        Schedule {
            classes: vec![
                class("hourly", HOURLY_PRIORITY, HOURLY_KEEP),
                class("daily", DAILY_PRIORITY, DAILY_KEEP),
                class("weekly", WEEKLY_PRIORITY, WEEKLY_KEEP),
                class("monthly", MONTHLY_PRIORITY, MONTHLY_KEEP),
            ],
        }
    }

    /// `MaxDeltaChain`.
    pub fn max_delta_chain(&self) -> u32 {
        parse_int(self.get(MAX_DELTA_CHAIN), 1, 100).expect("validated on load")
    }

    /// `MaxDeltaPercent`.
    pub fn max_delta_percent(&self) -> u32 {
        parse_int(self.get(MAX_DELTA_PERCENT), 0, 100).expect("validated on load")
    }
}

/// One retention class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class {
    pub name: &'static str,
    pub priority: u32,
    /// Nanoseconds a set is kept after it finished; `None` = forever.
    pub keep: Option<i64>,
}

/// The retention schedule: classes by priority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub classes: Vec<Class>,
}

impl Schedule {
    /// How long a completed set of `priority` is kept: the shortest keep time of the classes
    /// whose priority is at least `priority`; `None` (forever) if there is none.
    pub fn keep_for(&self, priority: u32) -> Option<i64> {
        self.classes.iter().filter(|c| c.priority >= priority).filter_map(|c| c.keep).min()
    }
}

impl Default for Schedule {
    fn default() -> Self {
        Config::from_stored(&BTreeMap::new()).expect("the defaults are valid").schedule()
    }
}

/// Parses a byte count: `123456`, `2048K`, `500M`, `10G` or `1T` (binary multiples).
pub fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let (num, mult) = match v.char_indices().last()? {
        (i, 'K' | 'k') => (&v[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&v[..i], 1 << 20),
        (i, 'G' | 'g') => (&v[..i], 1 << 30),
        (i, 'T' | 't') => (&v[..i], 1 << 40),
        _ => (v, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3600 * 1_000_000_000;

    #[test]
    fn defaults_are_the_seed_schedule() {
        let s = Schedule::default();
        assert_eq!(s.keep_for(10), Some(24 * HOUR));
        assert_eq!(s.keep_for(0), Some(24 * HOUR), "below every class: the shortest rule applies");
        assert_eq!(s.keep_for(11), Some(30 * 24 * HOUR));
        assert_eq!(s.keep_for(20), Some(30 * 24 * HOUR));
        assert_eq!(s.keep_for(30), Some(26 * 7 * 24 * HOUR));
        assert_eq!(s.keep_for(40), None);
        assert_eq!(s.keep_for(41), None);
        let c = Config::from_stored(&BTreeMap::new()).unwrap();
        assert_eq!(c.max_delta_chain(), 5);
        assert_eq!(c.max_delta_percent(), 50);
    }

    #[test]
    fn values_are_checked_by_type() {
        for (k, v) in [
            (HOURLY_KEEP, "36h"),
            (DAILY_KEEP, "forever"),
            (WEEKLY_KEEP, "4w"),
            (DAILY_PRIORITY, "0"),
            (MONTHLY_PRIORITY, "1000"),
            (MAX_DELTA_CHAIN, "1"),
            (MAX_DELTA_PERCENT, "0"),
            (MAX_DELTA_PERCENT, "100"),
        ] {
            validate(k, v).unwrap();
        }
        for (k, v, why) in [
            (HOURLY_KEEP, "1", "a time like 24h"),
            (HOURLY_KEEP, "0d", "a time like 24h"),
            (HOURLY_KEEP, "d", "a time like 24h"),
            (HOURLY_KEEP, "3m", "a time like 24h"),
            (DAILY_PRIORITY, "-1", "from 0 to 1000"),
            (DAILY_PRIORITY, "1001", "from 0 to 1000"),
            (DAILY_PRIORITY, " 5", "from 0 to 1000"),
            (MAX_DELTA_CHAIN, "0", "from 1 to 100"),
            (MAX_DELTA_CHAIN, "", "from 1 to 100"),
            (MAX_DELTA_PERCENT, "101", "from 0 to 100"),
        ] {
            let msg = validate(k, v).unwrap_err().to_string();
            assert!(msg.contains(why) && msg.contains(k), "{k}={v:?}: {msg}");
        }
        let msg = validate("HourlyKept", "1d").unwrap_err().to_string();
        assert!(msg.contains("unknown configuration key \"HourlyKept\""), "{msg}");
        assert!(msg.contains("HourlyKeep, DailyPriority"), "the message names the valid keys: {msg}");
    }

    /// Found by `fuzz/when_and_host_config` with `DailyKeep = 80080w`: the keep time in
    /// nanoseconds overflowed i64 (a panic with overflow checks; without them it wrapped, e.g.
    /// to a negative keep for 20000w, which would purge every set of the class at once).
    #[test]
    fn keep_times_beyond_i64_nanoseconds_saturate_instead_of_overflowing() {
        for v in ["80080w", "20000w", "100000w"] {
            validate(DAILY_KEEP, v).unwrap();
            assert_eq!(parse_keep(v), Some(Some(i64::MAX)), "{v}");
            let stored = BTreeMap::from([(MONTHLY_KEEP.to_owned(), v.to_owned())]);
            let s = Config::from_stored(&stored).unwrap().schedule();
            assert_eq!(s.keep_for(40), Some(i64::MAX), "{v}");
        }
        assert_eq!(parse_keep("15000w"), Some(Some(15_000 * 7 * 24 * HOUR)), "below the limit nothing changes");
    }

    #[test]
    fn stored_values_override_defaults_and_bad_ones_are_refused() {
        let mut stored = BTreeMap::new();
        stored.insert(HOURLY_KEEP.to_owned(), "2d".to_owned());
        stored.insert(MONTHLY_KEEP.to_owned(), "52w".to_owned());
        let s = Config::from_stored(&stored).unwrap().schedule();
        assert_eq!(s.keep_for(10), Some(48 * HOUR));
        assert_eq!(s.keep_for(40), Some(52 * 7 * 24 * HOUR));
        stored.insert(DAILY_KEEP.to_owned(), "soon".to_owned());
        assert!(Config::from_stored(&stored).is_err());
    }
}
