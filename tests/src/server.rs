//! A real `tardisd` on loopback for the end-to-end tests: started in the foreground on a free
//! UDP port with its own configuration file, stopped with SIGTERM when dropped.

use crate::bin;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    /// Program and arguments that run `tardisd` (e.g. inside a network namespace).
    launcher: Vec<String>,
    pub port: u16,
    pub db: PathBuf,
    config: PathBuf,
    log: PathBuf,
    /// `TARDIS_NOW` for the daemon (Unix seconds), if its clock is fixed.
    now: Option<i64>,
}

/// A UDP port that was free a moment ago.
pub fn free_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("binding an ephemeral UDP port");
    s.local_addr().expect("local address").port()
}

impl Daemon {
    /// Starts `tardisd` on a free port with repositories under `db`. `config` is appended to
    /// the generated configuration file (e.g. `AllowNewHosts = yes`).
    pub fn start(db: &Path, config: &str) -> Daemon {
        Daemon::start_on(db, free_port(), config)
    }

    /// Starts `tardisd` on `port`.
    pub fn start_on(db: &Path, port: u16, config: &str) -> Daemon {
        Daemon::launch(db, port, "127.0.0.1", &[], config)
    }

    /// Starts `tardisd` listening on `listen`:`port`, run through `launcher` (a command
    /// prefix such as `ip netns exec NAME`; its last step must exec the daemon, so that
    /// signals reach it).
    pub fn launch(db: &Path, port: u16, listen: &str, launcher: &[String], config: &str) -> Daemon {
        fs::create_dir_all(db).expect("creating the daemon's BaseDir");
        let dir = db.parent().expect("db has a parent").to_owned();
        let cfg = dir.join(format!("tardisd-{port}.cfg"));
        fs::write(&cfg, format!("[Tardis]\nBaseDir = {}\nPort = {port}\nListen = {listen}\n{config}\n", db.display()))
            .expect("writing tardisd.cfg");
        let mut d = Daemon {
            child: None,
            launcher: launcher.to_vec(),
            port,
            db: db.to_owned(),
            config: cfg,
            log: dir.join(format!("tardisd-{port}.log")),
            now: None,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("daemon log file");
        let start = fs::metadata(&self.log).map_or(0, |m| m.len()) as usize;
        let mut cmd = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin("tardisd"));
                c
            }
            None => Command::new(bin("tardisd")),
        };
        let child = cmd
            .args(["--foreground", "--config"])
            .arg(&self.config)
            .env_remove("TARDIS_DB")
            .env_remove("TARDIS_PORT")
            .env("RUST_LOG", "info,quinn=warn")
            .env_remove("TARDIS_NOW")
            .envs(self.now.map(|t| ("TARDIS_NOW", t.to_string())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file handle"))
            .stderr(log)
            .spawn()
            .expect("tardisd starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = fs::read_to_string(&self.log).unwrap_or_default();
            if text.get(start..).is_some_and(|t| t.contains("tardisd: listening on")) {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("tardisd exited with {status} before listening:\n{text}");
            }
            assert!(Instant::now() < deadline, "tardisd did not start listening within 30 s:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the daemon with SIGTERM and returns its exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = child.try_wait().expect("waiting for tardisd") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("tardisd did not stop within 60 s of SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a daemon that was killed from outside (SIGKILL) and forgets it.
    pub fn reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Kills the daemon with SIGKILL (a crash: no cleanup) and starts it again.
    pub fn crash_and_restart(&mut self) {
        let _ = kill(Pid::from_raw(self.pid() as i32), Signal::SIGKILL);
        self.reap();
        self.restart();
    }

    /// Starts the daemon again on the same port with the same configuration.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the daemon before restarting it");
        self.spawn();
    }

    /// Stops the daemon and starts it again with its clock fixed at `now` (Unix seconds).
    pub fn restart_at(&mut self, now: i64) {
        if self.child.is_some() {
            assert!(self.stop().success(), "the daemon stops cleanly:\n{}", self.log());
        }
        self.now = Some(now);
        self.spawn();
    }

    /// Client options that reach this daemon as `host` with `password`, pinning its
    /// certificate in `known_hosts`.
    pub fn client_args(&self, host: &str, password: &str, known_hosts: &Path) -> Vec<String> {
        client_args("127.0.0.1", self.port, host, password, known_hosts)
    }
}

/// Client options that reach a daemon at `server`:`port` (or a relay in front of it).
pub fn client_args(server: &str, port: u16, host: &str, password: &str, known_hosts: &Path) -> Vec<String> {
    vec![
        "--server".into(),
        server.into(),
        "--port".into(),
        port.to_string(),
        "--known-hosts".into(),
        known_hosts.display().to_string(),
        "--host".into(),
        host.into(),
        "--password".into(),
        password.into(),
    ]
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
