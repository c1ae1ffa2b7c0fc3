//! `tardis-tools`: restore, inspect, compare and maintain a host's backups.

use anyhow::{bail, Result};
use clap::{CommandFactory, Parser, Subcommand};
use std::io::IsTerminal;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::ExitCode;
use tardis_client::cli::{self, LogArgs, PasswordArgs, RepoArgs};
use tardis_client::remote::{self, Opened, ServerArgs};
use tardis_client::session::IfMissing;
use tardis_core::view::Tree;
use tardis_log::{Repo, RepoOptions};
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

fn run(cli: Cli) -> Result<ExitCode> {
    if let (Some(server), Command::Verify { .. } | Command::RebuildIndex) = (&cli.server.server, &cli.command) {
        bail!(
            "verify and rebuild-index read the segments directly: run them on {server} with --db pointing at its \
             BaseDir (and tardisd stopped for rebuild-index)"
        );
    }
    if let Command::RebuildIndex = cli.command {
        let db = cli.repo.db_dir();
        let host = cli.repo.host_name()?;
        if !Repo::exists(&db, &host) {
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
    let (opened, keys) =
        remote::open_any(&cli.repo, &cli.server, "tardis-tools", password.as_deref(), IfMissing::Fail)?;
    let repo = opened.repo();
    let progress = !cli.log.quiet && std::io::stderr().is_terminal();
    let done = match cli.command {
        Command::Verify { read_data, set, json } => {
            let opts = VerifyOptions { read_data, set, json, progress: progress && !json };
            let Opened::Local(repo) = &opened else { unreachable!("refused above for --server") };
            return Ok(match verify::verify(repo.as_ref(), &keys, &opts)? {
                Verdict::Clean => ExitCode::SUCCESS,
                Verdict::Damage => ExitCode::from(1),
                Verdict::Transient => ExitCode::from(3),
            });
        }
        Command::Sets { json } => listing::sets(repo, json),
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
        Command::RebuildIndex => unreachable!("handled before the repository is opened"),
    };
    done.map(|()| ExitCode::SUCCESS)
}
