//! `tardis-tools config`, `lock`/`unlock`, `purge` and `tardis --purge` end to end, with the
//! clock fixed by `TARDIS_NOW` so that retention is exact.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use tardis_tests::bin;

/// 2026-03-01 00:00:00 UTC, a Sunday.
const MARCH_1: i64 = 1_772_323_200;
const HOUR: i64 = 3600;

/// Runs a program against the repository `db`, host `h`, at Unix time `now`.
fn at(now: i64, db: &Path, program: &str, args: &[&str]) -> Output {
    Command::new(bin(program))
        .arg("--db")
        .arg(db)
        .args(["--host", "h"])
        .args(args)
        .env_remove("TARDIS_DB")
        .env_remove("TARDIS_HOST")
        .env("TARDIS_NOW", now.to_string())
        .env("TZ", "UTC")
        .output()
        .expect("program starts")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(out: Output) -> String {
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

/// Names of the sets `sets --json` lists (with `--all`: purged ones too), with their state and
/// whether they are locked. `sets` is for a host with the password `pw`.
fn sets(db: &Path, all: bool) -> Vec<(String, String, bool)> {
    listed(db, all, &["--password", "pw"])
}

fn listed(db: &Path, all: bool, password: &[&str]) -> Vec<(String, String, bool)> {
    let mut args = password.to_vec();
    args.extend(["sets", "--json"]);
    if all {
        args.push("--all");
    }
    ok(at(MARCH_1, db, "tardis-tools", &args))
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["name"].as_str().unwrap().to_owned(), v["state"].as_str().unwrap().to_owned(), v["locked"] == true)
        })
        .collect()
}

fn names(db: &Path) -> Vec<String> {
    sets(db, false).into_iter().map(|s| s.0).collect()
}

#[test]
fn config_keys_are_typed_and_stored_in_the_repository() {
    let work = tempfile::tempdir().unwrap();
    let (src, db) = (work.path().join("src"), work.path().join("db"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), "x").unwrap();
    ok(at(MARCH_1, &db, "tardis", &["--local", src.to_str().unwrap()]));

    let all = ok(at(MARCH_1, &db, "tardis-tools", &["config"]));
    for line in [
        "HourlyPriority = 10 (default)",
        "HourlyKeep = 1d (default)",
        "DailyKeep = 30d (default)",
        "WeeklyKeep = 26w (default)",
        "MonthlyPriority = 40 (default)",
        "MonthlyKeep = forever (default)",
        "MaxDeltaChain = 5 (default)",
    ] {
        assert!(all.lines().any(|l| l == line), "{line} in:\n{all}");
    }
    assert_eq!(ok(at(MARCH_1, &db, "tardis-tools", &["config", "HourlyKeep", "36h"])), "HourlyKeep = 36h\n");
    assert_eq!(ok(at(MARCH_1, &db, "tardis-tools", &["config", "HourlyKeep"])), "36h\n");
    assert!(ok(at(MARCH_1, &db, "tardis-tools", &["config"])).lines().any(|l| l == "HourlyKeep = 36h"));

    let err = fails(at(MARCH_1, &db, "tardis-tools", &["config", "HourlyKept", "2d"]));
    assert!(
        err.contains("unknown configuration key \"HourlyKept\"") && err.contains("HourlyKeep, DailyPriority"),
        "{err}"
    );
    let err = fails(at(MARCH_1, &db, "tardis-tools", &["config", "DailyKeep", "a month"]));
    assert!(err.contains("invalid value \"a month\" for DailyKeep: it must be a time like 24h, 30d or 26w"), "{err}");
    let err = fails(at(MARCH_1, &db, "tardis-tools", &["config", "MaxDeltaChain", "0"]));
    assert!(err.contains("from 1 to 100"), "{err}");
    assert_eq!(
        ok(at(MARCH_1, &db, "tardis-tools", &["config", "HourlyKeep"])),
        "36h\n",
        "a refused value changes nothing"
    );

    assert_eq!(
        ok(at(MARCH_1, &db, "tardis-tools", &["config", "--unset", "HourlyKeep"])),
        "HourlyKeep = 1d (default)\n"
    );
    assert_eq!(ok(at(MARCH_1, &db, "tardis-tools", &["config", "HourlyKeep"])), "1d\n");
    // The values live in the log: a rebuilt index has them.
    ok(at(MARCH_1, &db, "tardis-tools", &["config", "MaxDeltaChain", "7"]));
    ok(at(MARCH_1, &db, "tardis-tools", &["rebuild-index"]));
    assert_eq!(ok(at(MARCH_1, &db, "tardis-tools", &["config", "MaxDeltaChain"])), "7\n");
    let bad = at(MARCH_1, &db, "tardis-tools", &["config", "--unset", "X", "HourlyKeep"]);
    assert_eq!(bad.status.code(), Some(2), "--unset with a key is a usage error");
}

#[test]
fn purge_by_hand_respects_locks_and_the_latest_set() {
    let work = tempfile::tempdir().unwrap();
    let (src, db) = (work.path().join("src"), work.path().join("db"));
    fs::create_dir_all(&src).unwrap();
    let s = src.to_str().unwrap();
    for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
        fs::write(src.join("f"), format!("version {name}")).unwrap();
        ok(at(MARCH_1 + i as i64 * HOUR, &db, "tardis", &["--local", "--name", name, "--password", "pw", s]));
    }
    let tools = |args: &[&str]| {
        let mut a = vec!["--password", "pw"];
        a.extend_from_slice(args);
        at(MARCH_1 + 10 * HOUR, &db, "tardis-tools", &a)
    };

    assert_eq!(ok(tools(&["lock", "b"])), "locked set b\n");
    assert_eq!(sets(&db, false)[1], ("b".into(), "complete".into(), true));
    let err = fails(tools(&["purge", "--set", "b"]));
    assert!(err.contains("cannot purge set b: it is locked (unlock it first)"), "{err}");
    let err = fails(tools(&["purge", "--set", "d"]));
    assert!(err.contains("cannot purge set d: it is the latest completed set"), "{err}");
    let err = fails(tools(&["purge", "--set", "zz"]));
    assert!(err.contains("no completed set named zz"), "{err}");
    let err = fails(tools(&["lock", "zz"]));
    assert!(err.contains("no completed set named zz"), "{err}");

    // A day alone means its start: the sets of that day stay.
    assert_eq!(ok(tools(&["purge", "--before", "2026-03-01", "--dry-run"])), "nothing to purge\n");

    // Everything before 03:00 except the locked set; a dry run first changes nothing.
    let plan = ok(tools(&["purge", "--before", "2026-03-01 03:00", "--dry-run"]));
    assert_eq!(plan.lines().map(|l| l.split(' ').nth(3).unwrap()).collect::<Vec<_>>(), ["a", "c"], "{plan}");
    assert!(plan.starts_with("would purge set a (priority 0, finished 2026-03-01 00:00:00)"), "{plan}");
    assert_eq!(names(&db), ["a", "b", "c", "d"]);
    assert_eq!(
        tools(&["purge", "--before", "yesterday", "--set", "a"]).status.code(),
        Some(2),
        "one selection at a time"
    );

    let done = ok(tools(&["purge", "--before", "2026-03-01 03:00"]));
    assert_eq!(done.lines().count(), 2, "{done}");
    assert!(done.contains("purged set a") && done.contains("purged set c"), "{done}");
    assert_eq!(names(&db), ["b", "d"], "purged sets leave `sets`");
    let listed = sets(&db, true);
    assert_eq!(listed.iter().filter(|s| s.1 == "purged").count(), 2, "--all lists them: {listed:?}");
    assert_eq!(ok(tools(&["purge", "--before", "2026-03-01 03:00"])), "nothing to purge\n");

    // A purged set cannot be restored; the others still can, bit-exact.
    let out = work.path().join("out");
    let err = fails(tools(&["regenerate", "--set", "a", "-o", out.to_str().unwrap(), s]));
    assert!(err.contains("no completed set named a"), "{err}");
    for (set, content) in [("b", "version b"), ("d", "version d")] {
        let f = src.join("f");
        let got = ok(tools(&["regenerate", "--set", set, f.to_str().unwrap()]));
        assert_eq!(got, content);
    }
    ok(tools(&["verify", "--read-data"]));

    // Unlocked, b can go; d, the newest, still cannot.
    assert_eq!(ok(tools(&["unlock", "b"])), "unlocked set b\n");
    assert!(!sets(&db, false)[0].2);
    assert_eq!(ok(tools(&["purge", "--set", "b"])), "purged set b (priority 0, finished 2026-03-01 01:00:00)\n");
    assert_eq!(names(&db), ["d"]);
    assert_eq!(ok(tools(&["purge", "--before", "2026-03-02"])), "nothing to purge\n");
    assert_eq!(names(&db), ["d"], "never the last set");
    ok(tools(&["verify", "--read-data"]));
}

#[test]
fn hourly_backups_with_purge_keep_the_schedule() {
    // Three days of hourly `tardis --local --purge` runs from Sunday 1 March 2026 00:00 UTC.
    let work = tempfile::tempdir().unwrap();
    let (src, db) = (work.path().join("src"), work.path().join("db"));
    fs::create_dir_all(&src).unwrap();
    let s = src.to_str().unwrap();
    let mut last = String::new();
    for h in 0..72 {
        fs::write(src.join("f"), format!("hour {h}")).unwrap();
        last = ok(at(MARCH_1 + h * HOUR, &db, "tardis", &["--local", "--purge", "--json", s]));
    }
    // The last run (3 March 23:00) purged the hourly set of 2 March 22:00, 25 hours old.
    let v: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(v["set_name"], "Hourly-2026-03-03-23");
    assert_eq!(v["purged"], serde_json::json!(["Hourly-2026-03-02-22"]));

    let mut expected = vec!["Monthly-2026-03".to_string(), "Weekly-2026-09".into(), "Daily-2026-03-01".into()];
    expected.push("Daily-2026-03-02".into());
    // The hourly set exactly one day old stays.
    expected.push("Hourly-2026-03-02-23".into());
    expected.push("Daily-2026-03-03".into());
    expected.extend((1..24).map(|h| format!("Hourly-2026-03-03-{h:02}")));
    let names: Vec<String> = listed(&db, false, &[]).into_iter().map(|s| s.0).collect();
    assert_eq!(names, expected);
    // The dry run a day later (no backup in between) would take the hourly ones but the newest.
    let plan = ok(at(MARCH_1 + 95 * HOUR, &db, "tardis-tools", &["purge", "--dry-run"]));
    assert_eq!(plan.lines().count(), 23, "{plan}");
    assert!(!plan.contains("Hourly-2026-03-03-23"), "{plan}");
    let plan = ok(at(MARCH_1 + 95 * HOUR, &db, "tardis-tools", &["purge", "--dry-run", "--priority", "5"]));
    assert_eq!(plan, "nothing to purge\n");

    // A day later again with HourlyKeep raised to 3 days, nothing hourly goes.
    ok(at(MARCH_1, &db, "tardis-tools", &["config", "HourlyKeep", "3d"]));
    assert_eq!(ok(at(MARCH_1 + 95 * HOUR, &db, "tardis-tools", &["purge"])), "nothing to purge\n");
    let bad = at(MARCH_1, &db, "tardis-tools", &["purge"]);
    assert!(bad.status.success());
    let mut cmd = Command::new(bin("tardis-tools"));
    cmd.args(["--db", db.to_str().unwrap(), "--host", "h", "purge"]).env("TARDIS_NOW", "next tuesday");
    let err = fails(cmd.output().unwrap());
    assert!(err.contains("TARDIS_NOW=\"next tuesday\" is not a time"), "{err}");
}
