//! Running in the background with a pidfile, the way init scripts expect.
//!
//! `tardisd` without `--foreground` must return only once the daemon listens (so an init
//! script can report failure), and startup errors must reach the terminal. It re-runs itself
//! as a child instead of forking (forking a process with threads is unsafe): the child starts
//! a new session, sets everything up, writes one line to its stdout (a pipe to the parent)
//! and then points its standard streams at `/dev/null`. The parent exits 0 if it read that
//! line, or with the child's status otherwise.

use crate::error::{Error, Result};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const CHILD_ENV: &str = "TARDISD_BACKGROUND_CHILD";
const READY: &[u8] = b"listening\n";

/// Whether this process is the background child.
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Starts the background child and waits for it to listen or fail. Returns the exit code
/// for the parent.
pub fn detach(args: &[OsString]) -> Result<u8> {
    let exe = std::env::current_exe().map_err(|e| io("finding", Path::new("tardisd"), e))?;
    let mut child = Command::new(&exe)
        .args(args)
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| io("starting", &exe, e))?;
    let mut out = Vec::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_end(&mut out);
    }
    if out.starts_with(READY) {
        return Ok(0);
    }
    let status = child.wait().map_err(|e| io("waiting for", &exe, e))?;
    Ok(status.code().and_then(|c| u8::try_from(c).ok()).filter(|c| *c != 0).unwrap_or(1))
}

/// In the child, first thing: leave the terminal's session (no SIGHUP or SIGINT from it).
pub fn start_child() {
    let _ = nix::unistd::setsid();
}

/// In the child, once listening: tells the parent and lets go of the terminal.
pub fn child_ready() -> Result<()> {
    std::env::set_current_dir("/").map_err(|e| io("changing directory to", Path::new("/"), e))?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(READY).and_then(|()| stdout.flush()).map_err(|e| io("reporting to", Path::new("parent"), e))?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| io("opening", Path::new("/dev/null"), e))?;
    for fd in 0..=2 {
        nix::unistd::dup2(null.as_raw_fd(), fd).map_err(|e| io("redirecting to", Path::new("/dev/null"), e.into()))?;
    }
    Ok(())
}

fn io(what: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::Io { what, path: path.to_owned(), source }
}

/// A pidfile that exists while the daemon runs. A pidfile naming a live process stops a
/// second daemon; one left by a crashed daemon is replaced.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    pub fn create(path: &Path) -> Result<PidFile> {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
                if alive && pid != std::process::id() as i32 {
                    return Err(Error::Running { pid, path: path.to_owned() });
                }
            }
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io("creating directory", dir, e))?;
        }
        std::fs::write(path, format!("{}\n", std::process::id())).map_err(|e| io("writing pidfile", path, e))?;
        Ok(PidFile { path: path.to_owned() })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
