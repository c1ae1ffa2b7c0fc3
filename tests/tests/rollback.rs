//! The set list is authenticated (RELIABILITY invariant 8, test D3): every set carries the
//! client's seal, and each client remembers the newest set it has seen of a host. A repository
//! rolled back to an older copy, or holding a set its host's key did not seal, is refused by
//! every program and reported by `verify`, and nothing is written to it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tardis_core::api::Repository;
use tardis_core::event::SetStats;
use tardis_log::{Repo, RepoOptions};
use tardis_tests::{bin, noise};

struct Client {
    db: PathBuf,
    state: PathBuf,
}

impl Client {
    fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new(bin(program))
            .arg("--db")
            .arg(&self.db)
            .arg("--state-dir")
            .arg(&self.state)
            .args(["--host", "h", "--password", "pw"])
            .args(args)
            .env_remove("TARDIS_DB")
            .env_remove("TARDIS_HOST")
            .env_remove("TARDIS_STATE_DIR")
            .output()
            .expect("program starts")
    }

    fn ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        assert!(out.status.success(), "{program} {args:?}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn refused(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        assert!(!out.status.success(), "{program} {args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
        let err = stderr(&out);
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        err
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(st.success());
}

/// Every file under `dir` with its length: what "nothing was written" is checked against.
fn listing(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if e.path().extension().is_some_and(|x| x == "seg") {
                out.push((e.path(), m.len()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_repository_rolled_back_to_an_older_copy_is_refused_until_its_mark_is_removed() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a"), noise(100_000, 1)).unwrap();
    let me = Client { db: work.path().join("db"), state: work.path().join("state") };
    let s = src.to_str().unwrap();
    me.ok("tardis", &["--local", "--name", "one", s]);
    let old = work.path().join("old");
    copy_dir(&me.db, &old);
    fs::write(src.join("a"), noise(100_000, 2)).unwrap();
    me.ok("tardis", &["--local", "--name", "two", s]);

    // The server (here, whoever can write the directory) puts the older copy back.
    fs::remove_dir_all(&me.db).unwrap();
    copy_dir(&old, &me.db);
    let before = listing(&me.db);
    let err = me.refused("tardis-tools", &["sets"]);
    assert!(err.contains("older than this client last saw"), "{err}");
    assert!(err.contains("set 1 (one)") && err.contains("(two)"), "names what it holds and what was seen: {err}");
    let mark = me.state.join("seen");
    assert!(err.contains(&mark.display().to_string()), "names the file to delete: {err}");
    for (program, args) in [
        ("tardis", vec!["--local", "--name", "three", s]),
        ("regenerate", vec!["-o", "/nonexistent-restore-target", s]),
        ("tardis-tools", vec!["purge", "--set", "one"]),
    ] {
        let e = me.refused(program, &args);
        assert!(e.contains("older than this client last saw"), "{program}: {e}");
    }
    assert_eq!(listing(&me.db), before, "nothing was written to the rolled-back repository");

    let out = me.run("tardis-tools", &["verify"]);
    assert_eq!(out.status.code(), Some(1), "verify reports the rollback as damage");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("older than this client last saw"), "{text}");

    // The mark is this client's: another one has not seen set two and accepts the copy.
    let other = Client { db: me.db.clone(), state: work.path().join("other-state") };
    assert!(other.ok("tardis-tools", &["sets"]).contains("one"));

    // Removing the mark accepts the older copy on purpose; backups go on from there.
    let marks: Vec<PathBuf> = fs::read_dir(&mark).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert!(err.contains(&marks[0].display().to_string()), "{err}");
    fs::remove_file(&marks[0]).unwrap();
    assert!(me.ok("tardis-tools", &["sets"]).contains("one"));
    me.ok("tardis", &["--local", "--name", "three", s]);
    assert_eq!(fs::read_to_string(&marks[0]).unwrap().split_whitespace().nth(2), Some("three"));
}

#[test]
fn a_set_the_server_forged_or_replayed_is_refused_and_verify_names_it() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a"), noise(50_000, 3)).unwrap();
    let me = Client { db: work.path().join("db"), state: work.path().join("state") };
    let s = src.to_str().unwrap();
    me.ok("tardis", &["--local", "--name", "one", s]);
    me.ok("tardis", &["--local", "--name", "two", s]);

    // The repository's owner appends sets of its own through the storage API: one without a
    // seal, and one carrying set two's seal (a replay under another ID).
    let stolen = {
        let repo = Repo::open(&me.db, "h", RepoOptions::default()).unwrap();
        let sets = repo.sets().unwrap();
        let two = sets.iter().find(|x| x.name == "two").unwrap();
        let seal = two.seal.clone().expect("a completed set carries its seal").into_vec();
        let forged = repo.open_set("forged", 0).unwrap();
        repo.complete_set(forged, SetStats::default(), None).unwrap();
        let replayed = repo.open_set("two-again", 0).unwrap();
        repo.complete_set(replayed, SetStats::default(), Some(seal.clone())).unwrap();
        seal
    };
    assert!(!stolen.is_empty());
    let before = listing(&me.db);
    let err = me.refused("tardis-tools", &["sets"]);
    assert!(err.contains("2 of the 4 sets") && err.contains("seal"), "{err}");
    assert!(err.contains("tardis-tools verify"), "says what to run next: {err}");
    let e = me.refused("tardis", &["--local", "--name", "three", s]);
    assert!(e.contains("seal"), "{e}");
    assert_eq!(listing(&me.db), before, "nothing was written");

    let out = me.run("tardis-tools", &["verify"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("set forged: ") && text.contains("carries no seal"), "{text}");
    assert!(text.contains("set two-again: ") && text.contains("not made by this host's key for this set"), "{text}");
    assert!(!text.contains("set one:") && !text.contains("set two:"), "the genuine sets are not named: {text}");
}
