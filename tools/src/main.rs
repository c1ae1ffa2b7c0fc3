//! `tardis-tools`: restore, inspect, compare and maintain a host's backups.

use anyhow::{bail, Result};
use clap::{CommandFactory, Parser, Subcommand};
use std::io::IsTerminal;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::ExitCode;
use tardis_client::cli::{self, LogArgs, PasswordArgs, RepoArgs};
use tardis_client::purge::{PurgeOptions, Selection};
use tardis_client::remote::{self, Opened, ServerArgs};
use tardis_client::seen::Seen;
use tardis_client::session::IfMissing;
use tardis_core::api::Repository;
use tardis_core::view::Tree;
use tardis_log::{CompactOptions, Repo, RepoOptions};
use tardis_tools::regenerate::RegenerateArgs;
use tardis_tools::verify::{Verdict, VerifyOptions};
use tardis_tools::{diff, listing, regenerate, select, verify};

/// Restore, inspect, compare and maintain Tardis backups.
///
/// Works on the embedded repository at --db (the one `tardis --local` writes), or with
/// --server on a host's repository on a tardisd (sets, ls, regenerate, diff; verify and
/// rebuild-index run where the repository is). Arguments can be read from files: @FILE. Exit status: 0 success, 1 failure (for verify: damage found), 2 usage
/// error, 3 verify found no damage but some reads succeeded only when retried.
#[derive(Parser, Debug)]
#[command(name = "tardis-tools", version, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    password: PasswordArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List every backup set: name, state, priority, time, size and what it added
    Sets {
        /// One JSON object per set on stdout
        #[arg(long)]
        json: bool,
        /// Also list purged sets
        #[arg(long)]
        all: bool,
    },
    /// List a directory of a set like `ls -l`, or every version of a path with --versions
    Ls {
        /// Set to list [default: the latest completed set]
        #[arg(long, value_name = "SET")]
        set: Option<String>,
        /// List every set that holds a different version of PATH
        #[arg(long)]
        versions: bool,
        /// Absolute path as it was backed up
        #[arg(default_value = "/")]
        path: PathBuf,
    },
    /// Restore files or trees from a set, bit-exact with their metadata
    Regenerate(RegenerateArgs),
    /// Entries added (+), removed (-) and changed (M) between two sets
    Diff {
        set1: String,
        set2: String,
        /// Only compare below this path
        #[arg(default_value = "/")]
        path: PathBuf,
    },
    /// Rebuild the index from the segment log alone
    RebuildIndex,
    /// Move every host of --db into an S3-compatible bucket, so that only indexes and caches
    /// stay on the local disk
    ///
    /// Reads the S3 keys (S3Endpoint, S3Bucket, S3Prefix, S3Region, S3CredentialsFile,
    /// S3CacheSize) from FILE, a tardisd.cfg or a file with only those keys; credentials come
    /// from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or from S3CredentialsFile. Every segment
    /// is uploaded and its length checked before --db switches to the bucket (by writing
    /// storage.cfg); only then are the local copies deleted. Stop tardisd first. An interrupted
    /// migration is finished by running it again. On an empty or new --db, this sets up a
    /// repository whose first backup already goes to the bucket.
    Migrate {
        /// File with the S3 keys
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Show or change the host's configuration stored in the repository
    ///
    /// Without arguments, prints every key with its value ("(default)" when not set). With KEY,
    /// prints its value; with KEY VALUE, stores it. Keys: HourlyPriority, HourlyKeep,
    /// DailyPriority, DailyKeep, WeeklyPriority, WeeklyKeep, MonthlyPriority, MonthlyKeep
    /// (retention: priorities 0-1000, keep times like 24h, 30d, 26w or forever; a set of
    /// priority P is purged once older than the keep time of any class of priority >= P) and
    /// MaxDeltaChain (1-100).
    Config {
        /// Key to show or set
        key: Option<String>,
        /// New value for KEY
        value: Option<String>,
        /// Remove KEY's stored value, so that its default applies again
        #[arg(long, value_name = "KEY", conflicts_with_all = ["key", "value"])]
        unset: Option<String>,
    },
    /// Change the host's password, without rewriting any data
    ///
    /// The host's master key, which encrypts its data, is wrapped again under the new password
    /// (Argon2id, fresh salt) and stored with a new login verifier in one event; the old
    /// password stops working at once, for every client and for tardisd. Give the current
    /// password as usual (--password, --password-file or --password-prompt) and the new one
    /// with one of the options below. Works with --db and with --server.
    Keys {
        #[command(flatten)]
        new: NewPassword,
    },
    /// Reclaim the space of purged sets: copy the live records out of mostly-dead segments and
    /// delete those segments
    ///
    /// A segment is compacted when the share of its bytes that a kept set, the running backup
    /// or a future backup can still use is below the threshold. The copies and the index are
    /// made durable before any segment is deleted, so an interruption at any point leaves a
    /// valid repository (run it again to finish). While a backup is running (or an interrupted
    /// one has left its set open) every chunk is kept, since that backup may still use it.
    Compact {
        /// Compact segments whose live fraction is below F (0 to 1)
        #[arg(long, value_name = "F", default_value_t = 0.5, value_parser = parse_fraction)]
        threshold: f64,
    },
    /// Lock a set: no purge removes it until it is unlocked
    Lock {
        /// Name of the set
        set: String,
    },
    /// Unlock a set locked with `lock`
    Unlock {
        /// Name of the set
        set: String,
    },
    /// Purge sets: by the host's retention schedule, or by time or name
    ///
    /// Without --before or --set, purges the sets that the retention schedule (see `config`)
    /// says are due now. Purging appends events: the sets disappear from `sets`, the mount
    /// and `regenerate`, and `compact` reclaims their space. Locked sets and the newest
    /// completed set are never purged.
    Purge {
        /// Only purge sets of this priority or lower
        #[arg(long, value_name = "P")]
        priority: Option<u32>,
        /// Purge every set that finished before WHEN ("2026-11-26 10:00", "30 days ago", ...);
        /// a day alone means its start: `--before 2026-11-26` keeps the sets of that day
        #[arg(long, value_name = "WHEN", conflicts_with = "set")]
        before: Option<String>,
        /// Purge the set of this name
        #[arg(long, value_name = "NAME")]
        set: Option<String>,
        /// List the sets that would be purged, and purge nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Check that every kept set can be restored, and name every set and file that cannot
    ///
    /// Reads every record of the log (framing, checksums, batch commits, missing segments),
    /// rebuilds the index from the log into a scratch directory and compares it with the live
    /// one, and checks that every chunk a kept set references is stored, undamaged, with the
    /// right length, and that every entry's metadata opens. Damage is listed by segment and
    /// offset, with every (set, path) that depends on it. Exit status 1 on any damage; 3 when
    /// some chunks read correctly only on a second attempt (a failing disk or cable).
    Verify {
        /// Also read every referenced chunk and decrypt, decompress and re-hash it to its ID.
        /// With =PERCENT, read only that share, continuing where the last run stopped: a daily
        /// --read-data=5 reads everything once every 20 days (progress in <host>/verify-cursor)
        #[arg(
            long,
            value_name = "PERCENT",
            num_args = 0..=1,
            require_equals = true,
            default_missing_value = "100",
            value_parser = clap::value_parser!(u8).range(1..=100)
        )]
        read_data: Option<u8>,
        /// Only check what this set references [default: every completed set]
        #[arg(long, value_name = "SET")]
        set: Option<String>,
        /// JSON Lines on stdout: one object per finding, then a summary object
        #[arg(long)]
        json: bool,
    },
}

/// The new password of `keys`.
#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
struct NewPassword {
    /// The new password (visible to other users in `ps`; prefer the others)
    #[arg(long, value_name = "PW")]
    new_password: Option<String>,
    /// Read the new password from the first line of FILE
    #[arg(long, value_name = "FILE")]
    new_password_file: Option<PathBuf>,
    /// Ask for the new password on the terminal, twice, without echo
    #[arg(long)]
    new_password_prompt: bool,
}

impl NewPassword {
    fn read(&self) -> Result<Vec<u8>> {
        if let Some(p) = &self.new_password {
            if p.is_empty() {
                bail!("--new-password is empty; give a password");
            }
            return Ok(p.as_bytes().to_vec());
        }
        if let Some(f) = &self.new_password_file {
            return Ok(cli::password_from_file(f)?);
        }
        Ok(cli::prompt_new_password()?)
    }
}

/// `keys`: wraps the master key under the new password.
fn change_password(repo: &dyn Repository, host: &str, old: Option<&[u8]>, new: &NewPassword) -> Result<()> {
    // Before asking for the new password, which may be a prompt.
    let Some(old) = old else { return Err(tardis_client::session::no_password_to_change(host).into()) };
    let new = new.read()?;
    tardis_client::session::change_password(repo, host, old, &new)?;
    println!("changed the password of host {host}; the old one no longer opens it");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(cli::args());
    cli.log.init();
    if let Command::Verify { read_data: Some(p), set: Some(_), .. } = &cli.command {
        if *p < 100 {
            Cli::command()
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    "--read-data=PERCENT reads a rotating slice of the whole repository; with --set, use --read-data",
                )
                .exit();
        }
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            cli::report("tardis-tools", e.as_ref());
            ExitCode::from(1)
        }
    }
}

/// `config`: prints every key, one key, or stores a value.
fn config(repo: &dyn Repository, key: Option<String>, value: Option<String>, unset: Option<String>) -> Result<()> {
    if let Some(k) = unset {
        repo.set_config(&k, None)?;
        let spec = tardis_core::config::spec(&k)?;
        println!("{k} = {} (default)", spec.default);
        return Ok(());
    }
    let stored = repo.config()?;
    match (key, value) {
        (None, _) => {
            for k in tardis_core::config::KEYS {
                match stored.get(k.name) {
                    Some(v) => println!("{} = {v}", k.name),
                    None => println!("{} = {} (default)", k.name, k.default),
                }
            }
        }
        (Some(k), None) => {
            let spec = tardis_core::config::spec(&k)?;
            println!("{}", stored.get(&k).map_or(spec.default, String::as_str));
        }
        (Some(k), Some(v)) => {
            tardis_core::config::validate(&k, &v)?;
            repo.set_config(&k, Some(&v))?;
            println!("{k} = {v}");
        }
    }
    Ok(())
}

/// `--threshold`: a fraction from 0 to 1.
fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{s:?} is not a fraction from 0 to 1 (e.g. 0.5)")),
    }
}

/// `compact`: prints what was retired and the space before and after.
fn compact(repo: &Repo, threshold: f64) -> Result<()> {
    let r = repo.compact(&CompactOptions { threshold, ..CompactOptions::default() })?;
    if let Some(set) = r.pinned_by_open_set {
        println!("set {set} is open (a backup is running or was interrupted): every chunk was kept");
    }
    if let Some((n, need)) = r.short_of_space {
        println!(
            "{n} segments were left as they are: copying their live records needs {need} more bytes free (the \
             repository keeps 2% of the disk, 1 MiB to 64 MiB, free for writes); free space and run compact again"
        );
    }
    if r.interrupted {
        println!(
            "a backup started while the records were copied, so nothing was retired; run compact again when it ends"
        );
        return Ok(());
    }
    if r.retired.is_empty() {
        println!("nothing to compact: no segment is less than {:.0}% live", threshold * 100.0);
        return Ok(());
    }
    println!(
        "retired {} segments, copied {} records ({} bytes); segments: {} bytes in {} files before, {} bytes in {} after",
        r.retired.len(),
        r.copied_records,
        r.copied_bytes,
        r.bytes_before,
        r.segments_before,
        r.bytes_after,
        r.segments_after
    );
    Ok(())
}

/// `lock` and `unlock`.
fn lock(repo: &dyn Repository, name: &str, locked: bool) -> Result<()> {
    let info = select::pick(repo, Some(name), None)?;
    repo.set_locked(info.id, locked)?;
    println!("{} set {}", if locked { "locked" } else { "unlocked" }, info.name);
    Ok(())
}

/// `purge`: lists what goes (or would go, with --dry-run).
fn purge(repo: &dyn Repository, opts: &PurgeOptions) -> Result<()> {
    let chosen = tardis_client::purge::purge(repo, opts)?;
    if chosen.is_empty() {
        println!("nothing to purge");
    }
    let verb = if opts.dry_run { "would purge" } else { "purged" };
    for s in &chosen {
        let finished = s.finished.map_or_else(String::new, select::format_time);
        println!("{verb} set {} (priority {}, finished {finished})", s.name, s.priority);
    }
    Ok(())
}

fn run(cli: Cli) -> Result<ExitCode> {
    if let (Some(server), Command::Verify { .. } | Command::RebuildIndex | Command::Compact { .. }) =
        (&cli.server.server, &cli.command)
    {
        bail!(
            "verify, compact and rebuild-index read the segments directly: run them on {server} with --db pointing \
             at its BaseDir (tardisd lets go of a host HostIdleTimeout after its last client)"
        );
    }
    if let Command::Migrate { config } = &cli.command {
        migrate(&cli.repo.db_dir(), config)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::RebuildIndex = cli.command {
        let db = cli.repo.db_dir();
        let host = cli.repo.host_name()?;
        if !Repo::exists(&db, &host)? {
            bail!("no backups of host {host} in {}; check --host and --db", db.display());
        }
        let stats = Repo::rebuild_index(&db, &host, RepoOptions::default())?;
        println!(
            "rebuilt the index of host {host} from {} segments, {} batches, {} records",
            stats.segments, stats.batches, stats.records
        );
        for d in &stats.damage {
            println!("damaged records in segment {} at offset {}..{}: {}", d.segment, d.offset, d.resume, d.reason);
        }
        if !stats.damage.is_empty() {
            bail!("the log has damaged records (listed above); sets that depend on them cannot be fully restored");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let password = cli.password.read()?;
    // Verify reports a bad set list along with all other damage; every other command refuses it.
    let (opened, keys, seen) = if matches!(cli.command, Command::Verify { .. }) {
        let (o, k) =
            remote::open_any_unchecked(&cli.repo, &cli.server, "tardis-tools", password.as_deref(), IfMissing::Fail)?;
        let seen = Seen::new(&cli.repo.state_dir(), k.host());
        (o, k, seen)
    } else {
        remote::open_any(&cli.repo, &cli.server, "tardis-tools", password.as_deref(), IfMissing::Fail)?
    };
    let repo = opened.repo();
    let progress = !cli.log.quiet && std::io::stderr().is_terminal();
    let done = match cli.command {
        Command::Verify { read_data, set, json } => {
            let opts = VerifyOptions {
                read_data,
                set,
                json,
                progress: progress && !json,
                seen: (cli.repo.host_name()?, seen),
            };
            let Opened::Local(repo) = &opened else { unreachable!("refused above for --server") };
            return Ok(match verify::verify(repo.as_ref(), &keys, &opts)? {
                Verdict::Clean => ExitCode::SUCCESS,
                Verdict::Damage => ExitCode::from(1),
                Verdict::Transient => ExitCode::from(3),
            });
        }
        Command::Sets { json, all } => listing::sets(repo, json, all),
        Command::Config { key, value, unset } => config(repo, key, value, unset),
        Command::Compact { threshold } => {
            let Opened::Local(repo) = &opened else { unreachable!("refused above for --server") };
            compact(repo, threshold)
        }
        Command::Keys { new } => change_password(repo, &cli.repo.host_name()?, password.as_deref(), &new),
        Command::Lock { set } => lock(repo, &set, true),
        Command::Unlock { set } => lock(repo, &set, false),
        Command::Purge { priority, before, set, dry_run } => {
            let selection = match (before, set) {
                (Some(w), _) => Selection::Before(select::parse_before(&w)?),
                (None, Some(name)) => Selection::Set(name),
                (None, None) => Selection::Schedule { now: cli::now()? },
            };
            purge(repo, &PurgeOptions { selection, max_priority: priority, dry_run })
        }
        Command::Ls { set, versions, path } => {
            if versions {
                listing::versions(repo, &keys, path.as_os_str().as_bytes())
            } else {
                let info = select::pick(repo, set.as_deref(), None)?;
                listing::ls(&Tree::new(repo, &keys, info.id), path.as_os_str().as_bytes())
            }
        }
        Command::Regenerate(args) => regenerate::run(repo, &keys, &args),
        Command::Diff { set1, set2, path } => {
            let a = select::pick(repo, Some(&set1), None)?;
            let b = select::pick(repo, Some(&set2), None)?;
            let (ta, tb) = (Tree::new(repo, &keys, a.id), Tree::new(repo, &keys, b.id));
            for c in diff::diff(&ta, &tb, path.as_os_str().as_bytes())? {
                let (tag, p) = match c {
                    diff::Change::Added(p) => ('+', p),
                    diff::Change::Removed(p) => ('-', p),
                    diff::Change::Changed(p) => ('M', p),
                };
                println!("{tag} {}", String::from_utf8_lossy(&p));
            }
            Ok(())
        }
        Command::RebuildIndex | Command::Migrate { .. } => unreachable!("handled before the repository is opened"),
    };
    done.map(|()| ExitCode::SUCCESS)
}

/// `migrate`: uploads every host's segments, then switches the base directory to the bucket.
fn migrate(db: &std::path::Path, config: &std::path::Path) -> Result<()> {
    use tardis_log::bucket::{self, Backend, BucketStorage};
    use tardis_log::storage::Storage;
    let cfg = bucket::BucketConfig::from_file(config, true)?.ok_or_else(|| {
        anyhow::anyhow!(
            "{} has no S3 keys; add at least S3Bucket = NAME (and S3Endpoint for a server other than AWS)",
            config.display()
        )
    })?;
    if let Backend::Bucket(old) = Backend::of(db)? {
        bail!("{} already keeps its segments in {}; nothing to migrate", db.display(), old.url());
    }
    let hosts = bucket::host_names(db)?;
    for host in &hosts {
        let dir = db.join(host);
        let local = tardis_log::storage::DirStorage::new(&dir.join("segments"), &dir.join("quarantine"))?;
        let remote = bucket::remote_segments(&cfg, host)?;
        // A rerun after an interruption finds its own uploads: same numbers, same lengths.
        for (seg, len) in &remote {
            if local.len(*seg).ok() != Some(*len) {
                bail!(
                    "{} already holds segment {seg} of host {host}, which is not this repository's; \
                     give another S3Prefix",
                    cfg.url()
                );
            }
        }
        let storage = std::sync::Arc::new(BucketStorage::open(&cfg, &dir, host)?);
        let repo = Repo::open(db, host, RepoOptions { storage: Some(storage.clone()), ..RepoOptions::default() })?;
        repo.seal_log()?;
        let segments = storage.list()?;
        let bytes: u64 = segments.iter().map(|s| storage.len(*s)).sum::<std::io::Result<u64>>()?;
        println!("host {host}: {} segments, {bytes} bytes in {}", segments.len(), cfg.url());
    }
    bucket::write_descriptor(db, &cfg)?;
    // Opened through storage.cfg, each host drops the local copies the bucket now holds.
    for host in &hosts {
        Repo::open(db, host, RepoOptions::default())?;
    }
    println!("{} now keeps its segments in {}", db.display(), cfg.url());
    Ok(())
}
