//! `regenerate`: restore files or trees from a Tardis backup (same as `tardis-tools regenerate`).

use clap::Parser;
use std::process::ExitCode;
use tardis_client::cli::{self, LogArgs, PasswordArgs, RepoArgs};
use tardis_client::remote::{self, ServerArgs};
use tardis_client::session::IfMissing;
use tardis_tools::regenerate::{self, RegenerateArgs};

/// Restore files or trees from a Tardis backup set, bit-exact with their metadata.
///
/// Same as `tardis-tools regenerate`. Arguments can be read from files: @FILE.
/// Exit status: 0 success, 1 failure, 2 usage error.
#[derive(Parser, Debug)]
#[command(name = "regenerate", version, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    password: PasswordArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    args: RegenerateArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(cli::args());
    cli.log.init();
    let result = (|| -> anyhow::Result<()> {
        let password = cli.password.read()?;
        let (opened, keys, _) =
            remote::open_any(&cli.repo, &cli.server, "regenerate", password.as_deref(), IfMissing::Fail)?;
        regenerate::run(opened.repo(), &keys, &cli.args)
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            cli::report("regenerate", e.as_ref());
            ExitCode::from(1)
        }
    }
}
