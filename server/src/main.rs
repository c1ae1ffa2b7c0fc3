//! `tardisd`: serve hosts' repositories over QUIC.

use anyhow::Context;
use clap::Parser;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tardis_net::{tls, transport};
use tardis_server::config::Config;
use tardis_server::daemon;
use tardis_server::listener::{self, Shared};
use tardis_server::service::{Hosts, Service};

/// The Tardis repository daemon: keeps the backups of many hosts and serves them over QUIC.
///
/// Settings come from the configuration file (default /etc/tardis/tardisd.cfg), overridden by
/// environment variables, overridden by these options. Without --foreground, tardisd returns
/// once it listens and keeps running in the background. SIGTERM or SIGINT stop it cleanly.
#[derive(Parser, Debug)]
#[command(name = "tardisd", version, max_term_width = 100)]
struct Cli {
    /// Configuration file
    #[arg(long, env = "TARDIS_DAEMON_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory holding the hosts' repositories (BaseDir)
    #[arg(long, env = "TARDIS_DB", value_name = "DIR")]
    db: Option<PathBuf>,
    /// UDP port to listen on (Port) [default: 7430]
    #[arg(long, env = "TARDIS_PORT", value_name = "N")]
    port: Option<u16>,
    /// Address to listen on (Listen) [default: ::, all addresses]
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Let clients create new hosts (AllowNewHosts)
    #[arg(long)]
    allow_new_hosts: bool,
    /// Stay in the foreground and log to stderr
    #[arg(long, short = 'f')]
    foreground: bool,
    /// Write the daemon's process ID to FILE while it runs (PidFile)
    #[arg(long, env = "TARDIS_PIDFILE", value_name = "FILE")]
    pidfile: Option<PathBuf>,
    /// More log output (repeat for more)
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match settings(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tardisd: {e:#}");
            return ExitCode::from(2);
        }
    };
    if !cli.foreground && !daemon::is_child() {
        let args: Vec<_> = std::env::args_os().skip(1).collect();
        return match daemon::detach(&args) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("tardisd: {e}");
                ExitCode::from(1)
            }
        };
    }
    if daemon::is_child() {
        daemon::start_child();
    }
    match run(&cli, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // In the background this still reaches the terminal until the child is ready.
            tracing::error!("{e:#}");
            eprintln!("tardisd: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn settings(cli: &Cli) -> anyhow::Result<Config> {
    let mut c = Config::load(cli.config.as_deref())?;
    if let Some(db) = &cli.db {
        let fresh = Config::with_base(db.clone());
        if c.cert_file == Config::with_base(c.base_dir.clone()).cert_file {
            c.cert_file = fresh.cert_file;
            c.key_file = fresh.key_file;
        }
        c.base_dir = db.clone();
    }
    if let Some(p) = cli.port {
        anyhow::ensure!(p != 0, "--port must not be 0");
        c.port = p;
    }
    if let Some(l) = &cli.listen {
        c.listen = l.clone();
    }
    if cli.allow_new_hosts {
        c.rules.new_hosts = Hosts::Any;
    }
    if cli.pidfile.is_some() {
        c.pid_file = cli.pidfile.clone();
    }
    match cli.verbose {
        0 => {}
        1 => c.log_level = "debug".into(),
        _ => c.log_level = "trace".into(),
    }
    c.listen.parse::<IpAddr>().with_context(|| format!("Listen = {:?} is not an IP address", c.listen))?;
    Ok(c)
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{},quinn=warn", config.log_level)));
    if daemon::is_child() {
        let path = config.log_file.clone().unwrap_or_else(|| config.base_dir.join(".tardisd/tardisd.log"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening log file {}", path.display()))?;
        let _ =
            tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(Arc::new(file)).try_init();
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let _ =
            tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
    }
    Ok(())
}

fn run(_cli: &Cli, config: Config) -> anyhow::Result<()> {
    init_logging(&config)?;
    std::fs::create_dir_all(&config.base_dir)
        .with_context(|| format!("creating BaseDir {}", config.base_dir.display()))?;
    if let Some(bucket) = &config.bucket {
        tardis_log::bucket::adopt(&config.base_dir, bucket)?;
        bucket.client()?; // the credentials are readable: a configuration error stops here
        match tardis_log::bucket::host_names(&config.base_dir) {
            Ok(hosts) => tracing::info!(bucket = bucket.url(), hosts = hosts.len(), "segments are kept in the bucket"),
            // An outage is not a configuration error: backups stage locally until it ends.
            Err(e) => tracing::warn!(bucket = bucket.url(), "the bucket does not answer yet: {e}"),
        }
    }
    let mut names = vec!["localhost".to_owned()];
    if let Ok(h) = nix::unistd::gethostname() {
        if let Some(h) = h.to_str().filter(|h| !h.is_empty()) {
            names.insert(0, h.to_owned());
        }
    }
    let identity = tls::ServerIdentity::load_or_generate(&config.cert_file, &config.key_file, &names)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .thread_name("tardisd")
        .enable_all()
        .build()
        .context("starting the runtime")?;
    // Before binding: a second daemon is told about the first by its pidfile, not by a
    // port conflict.
    let pidfile = config.pid_file.as_deref().map(daemon::PidFile::create).transpose()?;
    let endpoint = {
        let _guard = rt.enter();
        bind(&config, &identity)?
    };
    let addr = endpoint.local_addr().context("reading the bound address")?;
    tracing::info!(
        %addr,
        base = %config.base_dir.display(),
        certificate = identity.fingerprint(),
        allow_new_hosts = %config.rules.new_hosts,
        append_only = %config.rules.append_only,
        "tardisd {} listening",
        env!("CARGO_PKG_VERSION")
    );
    if daemon::is_child() {
        daemon::child_ready()?;
    } else {
        eprintln!("tardisd: listening on {addr} (UDP), certificate {}", identity.fingerprint());
    }
    let clock = tardis_log::clock::from_env().map_err(anyhow::Error::msg)?;
    let service = Arc::new(Service::new(config.base_dir.clone(), config.rules.clone(), config.session_timeout, clock));
    let shared = Shared::new(service.clone(), config.max_connections);
    let stop_jobs = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let jobs = {
        let (service, config, stop) = (service.clone(), config.jobs.clone(), stop_jobs.clone());
        std::thread::Builder::new()
            .name("tardisd-jobs".into())
            .spawn(move || tardis_server::jobs::run(service, config, stop))
            .context("starting the maintenance thread")?
    };
    rt.block_on(async {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(listener::serve(endpoint.clone(), shared.clone(), stop_rx));
        wait_for_signal().await;
        tracing::info!("stopping: finishing requests in progress");
        let _ = stop_tx.send(true);
        let _ = server.await;
        // Requests in progress finish (each append is atomic; an open set stays open and its
        // client resumes it after the restart).
        if tokio::time::timeout(Duration::from_secs(30), shared.in_flight.wait_idle()).await.is_err() {
            tracing::warn!("requests still running after 30 s; stopping anyway (their batches were not committed)");
        }
        endpoint.close(transport::CLOSE_SHUTDOWN.into(), b"server shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    });
    drop(rt);
    stop_jobs.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = jobs.join();
    service.close();
    drop(pidfile);
    tracing::info!("stopped");
    Ok(())
}

fn bind(config: &Config, identity: &tls::ServerIdentity) -> anyhow::Result<quinn::Endpoint> {
    let tls = identity.server_config()?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).context("TLS configuration for QUIC")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(Arc::new(transport::server_transport_config()));
    let ip: IpAddr = config.listen.parse().context("Listen address")?;
    let addr = SocketAddr::new(ip, config.port);
    let socket = match transport::udp_socket(addr) {
        Ok(s) => s,
        // A system without IPv6: the default "::" falls back to all IPv4 addresses.
        Err(e) if ip == IpAddr::from([0u16; 8]) && e.kind() == std::io::ErrorKind::AddrNotAvailable => {
            transport::udp_socket(SocketAddr::new(IpAddr::from([0u8; 4]), config.port))
                .with_context(|| format!("listening on UDP port {}", config.port))?
        }
        Err(e) => return Err(e).with_context(|| format!("listening on UDP {addr} (is another tardisd running?)")),
    };
    // Stateless resets keyed by the server's identity stay valid across restarts.
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &identity.reset_secret());
    let endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    quinn::Endpoint::new(endpoint_config, Some(server), socket, Arc::new(quinn::TokioRuntime))
        .context("starting the QUIC endpoint")
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}
