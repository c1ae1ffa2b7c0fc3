//! Going to the background once the mount is up.
//!
//! `tardisfs` without `-f` must return only when the mount works (scripts use the mount point
//! right after), and must report a wrong password or a bad mount point as its own failure. It
//! re-runs itself as a child rather than forking: forking a process that may already have
//! threads is unsafe, and the child can start from scratch. The protocol:
//!
//! 1. The parent reads the password (it has the terminal for a prompt), starts the same program
//!    with the same arguments and [`CHILD_ENV`] set, writes the password to the child's stdin
//!    and closes it.
//! 2. The child starts a new session (no controlling terminal, so no SIGINT or SIGHUP from
//!    it), reads the password, opens the repository and mounts. Errors go to its stderr,
//!    which is still the parent's, and it exits non-zero.
//! 3. Once mounted, the child writes `ready` to its stdout (a pipe to the parent), moves to `/`
//!    and points stdin, stdout and stderr at `/dev/null`, which closes the pipe.
//! 4. The parent exits 0 if it read `ready`, else with the child's exit status.

use crate::error::{Error, Result};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

/// Set in the environment of the background child.
pub const CHILD_ENV: &str = "TARDISFS_DAEMON_CHILD";

const READY: &[u8] = b"ready\n";

/// Whether this process is the background child of a `tardisfs` without `-f`.
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Starts the background child with `args` (the program's arguments, without the program name)
/// and waits until it has mounted or failed. Returns `None` once the mount is up, or the
/// child's exit code if it failed (it has already printed why).
pub fn spawn(args: &[OsString], password: Option<&[u8]>) -> Result<Option<u8>> {
    let exe = std::env::current_exe().map_err(|e| Error::io("finding", "the tardisfs executable", e))?;
    let mut child = Command::new(&exe)
        .args(args)
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Error::io("starting", &exe, e))?;
    if let Some(mut stdin) = child.stdin.take() {
        let mut msg = Vec::new();
        match password {
            Some(pw) => {
                msg.push(b'P');
                msg.extend_from_slice(pw);
            }
            None => msg.push(b'N'),
        }
        // A child that died early closed its end; its exit status says why.
        let _ = stdin.write_all(&msg);
    }
    let mut out = Vec::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_end(&mut out);
    }
    if out.starts_with(READY) {
        return Ok(None);
    }
    let status = child.wait().map_err(|e| Error::io("waiting for", &exe, e))?;
    Ok(Some(status.code().and_then(|c| u8::try_from(c).ok()).filter(|c| *c != 0).unwrap_or(1)))
}

/// In the child: leaves the terminal's session and reads the password the parent sent.
pub fn start_child() -> Result<Option<Vec<u8>>> {
    // Fails only if we already lead a process group, in which case we have no terminal
    // signals to escape from anyway.
    let _ = nix::unistd::setsid();
    let mut msg = Vec::new();
    std::io::stdin().read_to_end(&mut msg).map_err(|e| Error::io("reading the password from", "the parent", e))?;
    match msg.split_first() {
        Some((b'P', pw)) => Ok(Some(pw.to_vec())),
        Some((b'N', _)) => Ok(None),
        _ => Err(Error::Daemon("started as a background child without a password message".into())),
    }
}

/// In the child, once mounted: tells the parent and lets go of its terminal and pipes.
pub fn child_ready() -> Result<()> {
    // The daemon must not keep a directory busy (it could not be unmounted).
    std::env::set_current_dir("/").map_err(|e| Error::io("changing directory to", "/", e))?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(READY).and_then(|()| stdout.flush()).map_err(|e| Error::io("reporting to", "the parent", e))?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| Error::io("opening", "/dev/null", e))?;
    for fd in 0..=2 {
        nix::unistd::dup2(null.as_raw_fd(), fd).map_err(|e| Error::io("redirecting to", "/dev/null", e.into()))?;
    }
    Ok(())
}
