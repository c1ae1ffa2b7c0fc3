//! Picking a set: by name (`--set`), by time (`--time`: the last set completed at or before it),
//! or the latest completed set.

use anyhow::{anyhow, bail, Context, Result};
use chrono::{Local, NaiveDate, NaiveDateTime, TimeZone};
use tardis_core::api::{Repository, SetInfo};

/// Parses "2026-11-26 10:00[:00]", "2026-11-26", "now", "today", "yesterday" or "N days ago",
/// in local time, into Unix nanoseconds. "Now" is `TARDIS_NOW` when that is set. A day alone
/// means its last second, so that `--time 2026-11-26` reads the state at the end of that day.
pub fn parse_when(s: &str) -> Result<i64> {
    parse_at(s, |d| d.and_hms_opt(23, 59, 59).expect("valid time"))
}

/// As [`parse_when`], but a day alone means its first second: for `purge --before`, which
/// should keep the sets of the day it names, and destroy nothing a reader may have meant to keep.
pub fn parse_before(s: &str) -> Result<i64> {
    parse_at(s, |d| d.and_hms_opt(0, 0, 0).expect("valid time"))
}

fn parse_at(s: &str, day: fn(NaiveDate) -> NaiveDateTime) -> Result<i64> {
    let s = s.trim();
    let now = match tardis_client::cli::now_override()? {
        Some(t) => Local.timestamp_nanos(t),
        None => Local::now(),
    };
    let naive: NaiveDateTime = match s {
        "now" => now.naive_local(),
        "today" => day(now.date_naive()),
        "yesterday" => day(now.date_naive().pred_opt().ok_or_else(|| anyhow!("date out of range"))?),
        _ => {
            if let Some(n) = s.strip_suffix(" days ago").and_then(|n| n.trim().parse::<i64>().ok()) {
                // Checked: `Duration::days` and the subtraction panic out of chrono's range.
                chrono::Duration::try_days(n)
                    .and_then(|d| now.checked_sub_signed(d))
                    .ok_or_else(|| anyhow!("cannot read the time {s:?}: {n} days is out of range"))?
                    .naive_local()
            } else if let Ok(t) = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S") {
                t
            } else if let Ok(t) = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M") {
                t
            } else if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
                day(d)
            } else {
                bail!("cannot read the time {s:?}: use \"YYYY-MM-DD HH:MM\", \"YYYY-MM-DD\", \"yesterday\" or \"N days ago\"")
            }
        }
    };
    let t = Local
        .from_local_datetime(&naive)
        .earliest()
        .ok_or_else(|| anyhow!("{s:?} does not exist in the local time zone"))?;
    t.timestamp_nanos_opt().context("time out of range")
}

/// The set to read: `--set NAME`, else `--time WHEN`, else the latest completed set.
pub fn pick(repo: &dyn Repository, name: Option<&str>, when: Option<&str>) -> Result<SetInfo> {
    let sets: Vec<SetInfo> = repo.sets()?.into_iter().filter(|s| s.is_live()).collect();
    if let Some(n) = name {
        return sets
            .into_iter()
            .rev()
            .find(|s| s.name == n)
            .ok_or_else(|| anyhow!("no completed set named {n}; see `tardis-tools sets`"));
    }
    if let Some(w) = when {
        let t = parse_when(w)?;
        return sets
            .into_iter()
            .rev()
            .find(|s| s.finished.is_some_and(|f| f <= t))
            .ok_or_else(|| anyhow!("no set completed at or before {w}"));
    }
    sets.into_iter().next_back().ok_or_else(|| anyhow!("the host has no completed backup yet"))
}

/// Formats Unix nanoseconds as local "YYYY-MM-DD HH:MM:SS".
pub fn format_time(nanos: i64) -> String {
    Local.timestamp_nanos(nanos).format("%Y-%m-%d %H:%M:%S").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse() {
        assert!(parse_when("2026-11-26 10:00").is_ok());
        assert!(parse_when("2026-11-26 10:00:30").is_ok());
        assert!(parse_when("2026-11-26").unwrap() > parse_when("2026-11-26 10:00").unwrap());
        assert!(parse_when("yesterday").unwrap() < parse_when("now").unwrap());
        assert!(parse_when("3 days ago").unwrap() < parse_when("yesterday").unwrap());
        assert!(parse_when("last tuesday").is_err());
    }

    #[test]
    fn a_day_alone_ends_a_reading_and_starts_a_purge() {
        let (start, end) = (parse_before("2026-06-01").unwrap(), parse_when("2026-06-01").unwrap());
        assert_eq!(start, parse_when("2026-06-01 00:00").unwrap());
        assert_eq!(end, parse_when("2026-06-01 23:59:59").unwrap());
        assert_eq!(parse_before("2026-06-01 10:00").unwrap(), parse_when("2026-06-01 10:00").unwrap());
        assert!(parse_before("yesterday").unwrap() < parse_before("today").unwrap());
        assert!(parse_before("today").unwrap() <= parse_when("now").unwrap());
    }

    /// Found by `fuzz/when_and_host_config` with `-7777777777731 days ago`: chrono's
    /// `Duration::days` panicked ("TimeDelta::days out of bounds") instead of an error.
    #[test]
    fn day_counts_out_of_range_are_errors_not_panics() {
        for s in ["-7777777777731 days ago", "9223372036854775807 days ago", "300000000 days ago"] {
            let e = parse_when(s).unwrap_err().to_string();
            assert!(e.contains("out of range"), "{s}: {e}");
        }
    }
}
