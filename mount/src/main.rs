//! `tardisfs`: mount a host's backups as a read-only file system.

use anyhow::Context;
use clap::Parser;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tardis_client::cli::{self, LogArgs, PasswordArgs, RepoArgs};
use tardis_client::remote::{self, ServerArgs};
use tardis_client::session::IfMissing;
use tardis_mount::options::{MountOptions, PasswordOption};
use tardis_mount::{daemon, Error, FsConfig, MountConfig, Signals, TardisFs};

/// Mount a host's backups as a read-only file system.
///
/// The root holds one directory per completed backup set, named after the set, each the
/// backed-up tree as it was (`ls MOUNTPOINT/Daily-2026-11-26/home/ann`), a `latest` symlink to
/// the latest set, and `.versions/PATH/`, which lists every distinct version of PATH under the
/// name of the set that first holds it. Writes fail with EROFS.
///
/// With --server HOST, the backups of host= are read from that tardisd over QUIC instead of
/// from database=.
///
/// Without -f, tardisfs returns once the mount is up and keeps serving it in the background.
/// Unmount with `fusermount3 -u MOUNTPOINT` or `umount MOUNTPOINT` (or SIGTERM/SIGINT to the
/// process). While mounted, the repository is locked: backups into it fail until the unmount.
///
/// Options (-o, comma-separated, repeatable): database=DIR, host=NAME, password=PW
/// (password= with no value asks on the terminal), password_file=FILE, allow_other,
/// allow_root, threads=N (request threads, default 4), cache=MIB (decoded-chunk cache,
/// default 64). Exit status: 0 mounted (and, with -f, unmounted cleanly), 1 failure, 2 usage.
#[derive(Parser, Debug)]
#[command(name = "tardisfs", version, max_term_width = 100)]
struct Cli {
    /// Mount options: database=DIR,host=NAME,password=[PW],password_file=F,... (see above)
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Stay in the foreground (logging to stderr) instead of going to the background
    #[arg(short = 'f', long)]
    foreground: bool,
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    password: PasswordArgs,
    #[command(flatten)]
    log: LogArgs,
    /// Directory to mount on
    #[arg(value_name = "MOUNTPOINT")]
    mountpoint: PathBuf,
}

fn main() -> ExitCode {
    let args = cli::args();
    let cli = Cli::parse_from(&args);
    cli.log.init();
    match run(cli, &args[1..]) {
        Ok(code) => code,
        Err(e) => {
            cli::report("tardisfs", e.as_ref());
            let usage = matches!(e.downcast_ref::<Error>(), Some(Error::Usage(_)));
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

fn run(cli: Cli, args: &[OsString]) -> anyhow::Result<ExitCode> {
    let opts = MountOptions::parse(&cli.options)?;
    let mut repo_args = cli.repo.clone();
    if let Some(db) = &opts.database {
        repo_args.db = Some(db.clone());
    }
    if let Some(host) = &opts.host {
        repo_args.host = Some(host.clone());
    }
    let password_args = merge_password(opts.password.clone(), cli.password.clone())?;

    if daemon::is_child() {
        let password = daemon::start_child()?;
        mount(&cli, &opts, &repo_args, password, daemon::child_ready)?;
    } else if cli.foreground {
        let password = password_args.read()?;
        mount(&cli, &opts, &repo_args, password, || Ok(()))?;
    } else {
        // The password is read here, where the terminal is, and handed to the child.
        let password = password_args.read()?;
        if let Some(code) = daemon::spawn(args, password.as_deref())? {
            return Ok(ExitCode::from(code));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The password options of `-o` and of `--password…`; giving both is a usage error.
fn merge_password(o: Option<PasswordOption>, flags: PasswordArgs) -> Result<PasswordArgs, Error> {
    let Some(o) = o else { return Ok(flags) };
    if flags.password.is_some() || flags.password_file.is_some() || flags.password_prompt {
        return Err(Error::Usage("give the password either with -o password… or with --password…, not both".into()));
    }
    Ok(match o {
        PasswordOption::Given(pw) => PasswordArgs { password: Some(pw), ..PasswordArgs::default() },
        PasswordOption::Prompt => PasswordArgs { password_prompt: true, ..PasswordArgs::default() },
        PasswordOption::File(f) => PasswordArgs { password_file: Some(f), ..PasswordArgs::default() },
    })
}

/// Opens the repository and the keys, mounts, and serves until unmounted.
fn mount(
    cli: &Cli,
    opts: &MountOptions,
    repo_args: &RepoArgs,
    password: Option<Vec<u8>>,
    ready: impl FnOnce() -> tardis_mount::Result<()>,
) -> anyhow::Result<()> {
    // Before the repository is opened: RocksDB starts threads, which must inherit the mask.
    let signals = Signals::install()?;
    let mountpoint = absolute(&cli.mountpoint)?;
    if !mountpoint.is_dir() {
        anyhow::bail!("mount point {} is not a directory", mountpoint.display());
    }
    let mut repo_args = repo_args.clone();
    // The background child leaves the working directory once mounted.
    repo_args.db = Some(absolute(&repo_args.db_dir())?);
    repo_args.state_dir = Some(absolute(&repo_args.state_dir())?);
    let host = repo_args.host_name()?;
    let mut server = cli.server.clone();
    if let Some(f) = &server.known_hosts {
        server.known_hosts = Some(absolute(f)?);
    }
    let (repo, keys, _) = remote::open_any(&repo_args, &server, "tardisfs", password.as_deref(), IfMissing::Fail)?;
    signals.check()?;
    let fs_config = FsConfig { cache_bytes: opts.cache_mib.unwrap_or(64) << 20, ..FsConfig::default() };
    let fs = TardisFs::new(repo.into_arc(), keys, fs_config).context("reading the sets")?;
    let config = MountConfig {
        mountpoint,
        fsname: format!("tardis:{host}"),
        allow_other: opts.allow_other,
        allow_root: opts.allow_root,
        threads: opts.threads.unwrap_or(4),
    };
    tardis_mount::serve(fs, &config, &signals, ready)?;
    Ok(())
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}
