//! Mounting: the kernel session with its request threads, and a clean unmount on SIGINT,
//! SIGTERM and SIGHUP.
//!
//! Signals are handled without a signal handler: [`Signals::install`] blocks them in the
//! calling thread before any other thread exists (threads inherit the mask), and one thread
//! waits for them with `sigwait`. That thread may then do anything a normal thread does, such
//! as unmounting.
//!
//! Unmounting ends the session by itself: the kernel tears the connection down, every request
//! loop sees ENODEV and [`serve`] returns, and the process exits normally (closing the
//! repository). If files are still open the unmount is refused (EBUSY); on a signal the mount
//! is then detached (`umount -l`): it disappears at once, its open files keep working, and the
//! session ends when the last one is closed. A second signal exits at once, which closes the
//! FUSE device so that the remaining readers get an error instead of waiting.

use crate::error::{Error, Result};
use crate::fs::TardisFs;
use fuser::{MountOption, SessionACL, SessionUnmounter};
use nix::sys::signal::{SigSet, Signal};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountConfig {
    pub mountpoint: PathBuf,
    /// The "device" shown by `mount` and in `/proc/self/mountinfo` (`tardis:HOST`).
    pub fsname: String,
    pub allow_other: bool,
    pub allow_root: bool,
    /// Request-handling threads: a slow read occupies one of them, not the whole mount.
    pub threads: usize,
}

/// The signal-waiting thread and what it should do when a signal comes.
#[derive(Debug)]
pub struct Signals {
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
enum State {
    /// Not mounted (yet): a signal asks the main thread to stop at its next step. Exiting
    /// from here could leave a dead mount point (if `mount(2)` was in progress) or kill the
    /// process while RocksDB's threads run.
    Starting {
        stop: bool,
    },
    Mounted {
        mountpoint: PathBuf,
        unmounter: SessionUnmounter,
    },
    /// Detached while files were open: the session ends when they are closed. Another signal
    /// cuts them off.
    Detached,
    /// The session is ending; the process is about to exit by itself.
    Done,
}

const SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

impl Signals {
    /// Blocks SIGINT, SIGTERM and SIGHUP in this thread, and so in every thread it starts
    /// afterwards, and starts the thread that waits for them. Call it before anything starts
    /// a thread (RocksDB does, when the repository is opened).
    pub fn install() -> Result<Signals> {
        let mut set = SigSet::empty();
        for s in SIGNALS {
            set.add(s);
        }
        set.thread_block().map_err(|e| Error::io("blocking signals of", "tardisfs", e.into()))?;
        let state = Arc::new(Mutex::new(State::Starting { stop: false }));
        let st = state.clone();
        std::thread::Builder::new()
            .name("tardisfs-signals".into())
            .spawn(move || loop {
                if let Ok(sig) = set.wait() {
                    on_signal(sig, &st);
                }
            })
            .map_err(|e| Error::io("starting the signal thread of", "tardisfs", e))?;
        Ok(Signals { state })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails with [`Error::Interrupted`] if a signal came before the mount was up; the main
    /// thread calls this between the steps of starting.
    pub fn check(&self) -> Result<()> {
        match *self.lock() {
            State::Starting { stop: true } => Err(Error::Interrupted),
            _ => Ok(()),
        }
    }
}

fn on_signal(sig: Signal, state: &Mutex<State>) {
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    match &mut *st {
        State::Starting { stop } => {
            tracing::info!("{sig}: stopping");
            *stop = true;
        }
        State::Done => {}
        State::Detached => {
            tracing::warn!("{sig}: exiting; readers of files still open under the mount get errors");
            // Closing the FUSE device (by exiting) ends the connection for the remaining readers.
            std::process::exit(1);
        }
        State::Mounted { mountpoint, unmounter } => {
            tracing::info!("{sig}: unmounting {}", mountpoint.display());
            match unmounter.unmount() {
                // The kernel ends the session; `serve` returns and the process exits.
                Ok(()) => *st = State::Done,
                Err(e) => {
                    if e.raw_os_error() == Some(libc::EBUSY) {
                        tracing::warn!(
                            "files are still open under {}: detached the mount; tardisfs exits when they \
                             are closed (signal again to cut them off)",
                            mountpoint.display()
                        );
                    } else {
                        tracing::error!("unmounting {}: {e}; detaching it", mountpoint.display());
                    }
                    detach(mountpoint);
                    *st = State::Detached;
                }
            }
        }
    }
}

/// Lazy unmount: the mount disappears from the tree now and goes away when its last user
/// does. Root calls umount2 directly; other users need the set-uid `fusermount3`.
fn detach(mountpoint: &Path) {
    match nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) => {}
        Err(nix::errno::Errno::EPERM) => {
            let r = std::process::Command::new("fusermount3").arg("-u").arg("-z").arg("--").arg(mountpoint).status();
            if !r.is_ok_and(|s| s.success()) {
                tracing::error!("fusermount3 -u -z {} failed", mountpoint.display());
            }
        }
        Err(e) => tracing::error!("detaching {}: {e}", mountpoint.display()),
    }
}

/// Mounts `fs` and serves it until it is unmounted (`fusermount3 -u`, `umount`, or a signal).
/// `ready` runs once the mount is up and answering, before serving starts; if it fails, the
/// mount is taken down again.
pub fn serve(fs: TardisFs, cfg: &MountConfig, signals: &Signals, ready: impl FnOnce() -> Result<()>) -> Result<()> {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoAtime,
        // The kernel checks the backed-up modes and owners, as on the original file system.
        MountOption::DefaultPermissions,
        MountOption::FSName(cfg.fsname.clone()),
        MountOption::Subtype("tardis".into()),
    ];
    config.acl = match (cfg.allow_other, cfg.allow_root) {
        (true, _) => SessionACL::All,
        (false, true) => SessionACL::RootAndOwner,
        (false, false) => SessionACL::Owner,
    };
    config.n_threads = Some(cfg.threads.max(1));
    // One /dev/fuse descriptor per thread, so the threads do not contend for one queue.
    config.clone_fd = cfg.threads > 1;
    let mut session =
        fuser::Session::new(fs, &cfg.mountpoint, &config).map_err(|e| Error::io("mounting on", &cfg.mountpoint, e))?;
    {
        let mut st = signals.lock();
        if let State::Starting { stop: true } = *st {
            // A signal came while mounting: take the mount down again rather than serve it.
            *st = State::Done;
            drop(st);
            let _ = session.unmount();
            return Err(Error::Interrupted);
        }
        *st = State::Mounted { mountpoint: cfg.mountpoint.clone(), unmounter: session.unmount_callable() };
    }
    if let Err(e) = ready() {
        *signals.lock() = State::Done;
        let _ = session.unmount();
        return Err(e);
    }
    tracing::info!("mounted on {}", cfg.mountpoint.display());
    let result = session.run();
    *signals.lock() = State::Done;
    match result {
        // Request loops see ENODEV when the mount goes away (fuser ends quietly on that), but
        // also ECONNABORTED when the kernel tears a detached mount down: both are the end.
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
        r => r.map_err(|e| Error::io("serving the mount on", &cfg.mountpoint, e)),
    }
}
