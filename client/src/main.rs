//! `tardis`: back up file systems into a Tardis repository.

use clap::Parser;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use tardis_client::backup::{self, BackupOptions, BackupStats, Progress};
use tardis_client::cli::{self, LogArgs, PasswordArgs, RepoArgs};
use tardis_client::exclude::ExcludeConfig;
use tardis_client::purge::{self, PurgeOptions, Selection};
use tardis_client::remote::{self, ServerArgs};
use tardis_client::session::IfMissing;
use tardis_core::api::Repository;
use tardis_core::ids::SetId;

/// Back up files incrementally into a Tardis repository.
///
/// Each run makes one backup set holding the given paths as they are now. Only what changed
/// since the last set is read and stored; unchanged files cost a stat. Sets are named after the
/// seed's schedule (Monthly-, Weekly-, Daily-, Hourly-<date>) unless --name is given.
///
/// Exit status: 0 success, 1 failure, 2 usage error, 3 completed with warnings (some files
/// could not be read; see the messages). Arguments can be read from files: @FILE.
#[derive(Parser, Debug)]
#[command(name = "tardis", version, max_term_width = 100)]
struct Cli {
    /// Back up into the embedded repository at --db, with no server
    #[arg(long)]
    local: bool,
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    server: ServerArgs,
    /// With --server: create the host if the server does not have it yet
    #[arg(long)]
    create: bool,
    /// Name of the new set [default: the first unused schedule name]
    #[arg(long, value_name = "SET")]
    name: Option<String>,
    /// Priority of the new set, used by purge [default: 40 monthly, 30 weekly, 20 daily, 10 hourly, 0 other]
    #[arg(long, value_name = "N")]
    priority: Option<u32>,
    #[command(flatten)]
    password: PasswordArgs,
    /// Read every file, even those whose size and times are unchanged
    #[arg(long)]
    full: bool,
    /// After the backup, purge the sets the host's retention schedule says are due (see
    /// `tardis-tools config`; by default hourly sets go after a day, daily after 30 days,
    /// weekly after 26 weeks, monthly never). Locked sets and the newest set are always kept
    #[arg(long)]
    purge: bool,
    /// Leave out entries matching PATTERN (shell glob; a pattern with '/' is anchored at each PATH)
    #[arg(long, value_name = "PATTERN")]
    exclude: Vec<String>,
    /// Read exclude patterns from FILE, one per line
    #[arg(long, value_name = "FILE")]
    exclude_file: Vec<PathBuf>,
    /// Descend into other file systems mounted below the given paths
    #[arg(long)]
    crossdev: bool,
    /// Print the summary as one JSON object on stdout
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    log: LogArgs,
    /// Files and directories to back up
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(cli::args());
    cli.log.init();
    if !cli.local && cli.server.server.is_none() {
        eprintln!("tardis: give --local (back up into the embedded repository at --db) or --server HOST (see --help)");
        return ExitCode::from(2);
    }
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            cli::report("tardis", e.as_ref());
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let password = cli.password.read()?;
    let paths = cli.paths.iter().map(|p| backup::normalize(p)).collect::<Result<Vec<_>, _>>()?;
    let host = cli.repo.host_name()?;
    let mut server = cli.server.clone();
    if cli.local {
        server.server = None; // --local wins over a TARDIS_SERVER in the environment
    }
    // Locally the first backup creates the host; a server needs --create for that, so that a
    // mistyped --host does not silently start a new host there.
    let if_missing = if server.server.is_none() || cli.create { IfMissing::Create } else { IfMissing::Fail };
    let (opened, keys, seen) = remote::open_any(&cli.repo, &server, "tardis", password.as_deref(), if_missing)?;
    let repo = opened.repo();
    let opts = BackupOptions {
        name: cli.name.clone(),
        priority: cli.priority,
        full: cli.full,
        crossdev: cli.crossdev,
        excludes: ExcludeConfig::from_env(cli.exclude.clone(), cli.exclude_file.clone()),
        now: cli::now_override()?,
        batch_bytes: if server.server.is_some() { backup::REMOTE_BATCH_BYTES } else { backup::LOCAL_BATCH_BYTES },
    };
    let show_bar = !cli.json && !cli.log.quiet && std::io::stderr().is_terminal();
    let bar = Bar::new(show_bar);
    let mut stats = backup::backup(repo, &keys, &paths, &opts, &bar)?;
    bar.finish();
    seen.record(stats.set, &stats.set_name);
    if cli.purge {
        // After the backup, so the set just made counts as the newest one and is kept.
        let now = cli::now()?;
        // The set is complete whatever happens here, so a skipped, refused or failed purge (a
        // wrong clock, an append-only host, a dropped connection) is a warning, not a failure.
        let purged = match clock_skew(repo, stats.set, now)? {
            Some(msg) => Err(msg),
            None => {
                let req = PurgeOptions { selection: Selection::Schedule { now }, max_priority: None, dry_run: false };
                purge::purge(repo, &req).map_err(|e| format!("purge failed; the backup itself is complete: {e}"))
            }
        };
        match purged {
            Ok(sets) => stats.purged = sets.into_iter().map(|s| s.name).collect(),
            Err(msg) => {
                tracing::warn!("{msg}");
                stats.warnings.push(msg);
            }
        }
    }
    if cli.json {
        println!("{}", serde_json::to_string(&stats)?);
    } else {
        print_summary(&host, &stats);
        for name in &stats.purged {
            println!("purged set {name}");
        }
    }
    Ok(if stats.warnings.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(3) })
}

/// How far this machine's clock may be from the repository's before `--purge` is skipped.
const MAX_CLOCK_SKEW_SECS: i64 = 600;

/// Why `--purge` must not run now: the retention schedule compares this machine's clock with
/// the finish times the repository stamped, and `set`, finished a moment ago, shows how far
/// apart the two are. A clock days ahead would purge sets that are not due.
fn clock_skew(repo: &dyn Repository, set: SetId, now: i64) -> anyhow::Result<Option<String>> {
    let Some(finished) = repo.sets()?.into_iter().find(|s| s.id == set).and_then(|s| s.finished) else {
        return Ok(None);
    };
    let skew = (now - finished) / 1_000_000_000;
    if skew.abs() <= MAX_CLOCK_SKEW_SECS {
        return Ok(None);
    }
    Ok(Some(format!(
        "purge skipped: this machine's clock is {} {} the repository's, which stamped the set just made; \
         set the clock right (or let tardisd purge, PurgeInterval) and purge again",
        human_secs(skew.unsigned_abs()),
        if skew > 0 { "ahead of" } else { "behind" }
    )))
}

/// Seconds to the nearest whole days, hours or minutes, whichever gives at least two.
fn human_secs(s: u64) -> String {
    let (days, hours) = ((s + 43_200) / 86_400, (s + 1_800) / 3_600);
    if days >= 2 {
        format!("{days} days")
    } else if hours >= 2 {
        format!("{hours} hours")
    } else {
        format!("{} minutes", (s + 30) / 60)
    }
}

fn print_summary(host: &str, s: &BackupStats) {
    println!(
        "set {} ({}, priority {}) of host {host}: {} entries, {} files, {}; read {} files ({}); \
         {} changed, {} deleted; stored {} new chunks ({})",
        s.set_name,
        s.set,
        s.priority,
        s.entries,
        s.files,
        human(s.bytes),
        s.files_read,
        human(s.bytes_read),
        s.changed,
        s.deleted,
        s.new_chunks,
        human(s.new_bytes),
    );
    if !s.warnings.is_empty() {
        println!("{} warnings (listed above); exit status 3", s.warnings.len());
    }
}

fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

/// A progress line on a terminal: bytes read, rate, entries and the current path.
struct Bar {
    bar: Option<indicatif::ProgressBar>,
    entries: AtomicU64,
}

impl Bar {
    fn new(show: bool) -> Bar {
        let bar = show.then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {elapsed} {bytes} read ({bytes_per_sec}) {msg}")
                    .expect("the template is valid"),
            );
            b.enable_steady_tick(std::time::Duration::from_millis(200));
            b
        });
        Bar { bar, entries: AtomicU64::new(0) }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn entry(&self, path: &Path) {
        let n = self.entries.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(b) = &self.bar {
            if n % 64 == 1 {
                b.set_message(format!("{n} entries  {}", path.display()));
            }
        }
    }

    fn read(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }
}
