//! The daemon's maintenance jobs, on a thread of their own: compaction of every host's
//! repository at a fixed interval, and space management, which purges sets by priority when
//! the disk under `BaseDir` runs low (the seed's "on demand purging when low on space").

use crate::service::Service;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tardis_core::api::{Repository, SetInfo};
use tardis_core::retention;
use tardis_log::CompactOptions;

/// What the jobs do and how often.
#[derive(Debug, Clone, PartialEq)]
pub struct JobConfig {
    /// Compact every host this often; `None` never.
    pub compact_every: Option<Duration>,
    /// Segments less live than this are compacted.
    pub compact_threshold: f64,
    /// Keep at least this many bytes free under `BaseDir`; 0 turns space management off.
    pub min_free: MinFree,
    /// How often free space is checked.
    pub space_check_every: Duration,
    /// Close a host's repository after this long unused (`HostIdleTimeout`).
    pub idle_close: Duration,
    /// Apply every host's retention schedule this often (`PurgeInterval`); `None` never.
    pub purge_every: Option<Duration>,
}

/// The free-space floor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFree {
    Off,
    Bytes(u64),
    /// A percentage of the file system's size.
    Percent(f64),
}

impl MinFree {
    /// Parses `0`, `10G`, `500M`, `2048K`, `123456` (bytes) or `5%`.
    pub fn parse(v: &str) -> Option<MinFree> {
        let v = v.trim();
        if let Some(p) = v.strip_suffix('%') {
            let p: f64 = p.trim().parse().ok()?;
            return (0.0..100.0).contains(&p).then_some(if p == 0.0 { MinFree::Off } else { MinFree::Percent(p) });
        }
        let n = tardis_core::config::parse_size(v)?;
        Some(if n == 0 { MinFree::Off } else { MinFree::Bytes(n) })
    }

    fn bytes(self, total: u64) -> u64 {
        match self {
            MinFree::Off => 0,
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => (total as f64 * p / 100.0) as u64,
        }
    }
}

/// Free and total bytes of the file system holding `path` (free as an unprivileged user sees it).
// The statvfs field types differ between platforms (u64 here, u32 on some 32-bit ones).
#[allow(clippy::unnecessary_cast)]
fn space(path: &Path) -> std::io::Result<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    let frsize = s.fragment_size() as u64;
    Ok((s.blocks_available() as u64 * frsize, s.blocks() as u64 * frsize))
}

/// How often segments left staged by an outage of the object store are retried.
const UPLOAD_RETRY: Duration = Duration::from_secs(30);

/// How often idle repositories are looked for (more often if `HostIdleTimeout` is shorter).
const IDLE_CHECK: Duration = Duration::from_secs(10);

/// Runs the jobs until `stop` is set. Errors are logged, never fatal: the next round retries.
pub fn run(service: Arc<Service>, config: JobConfig, stop: Arc<AtomicBool>) {
    let mut next_compact = config.compact_every.map(|d| Instant::now() + d);
    let mut next_space = Instant::now();
    let mut next_upload = Instant::now() + UPLOAD_RETRY;
    let mut next_idle_check = Instant::now();
    let mut next_purge = config.purge_every.map(|_| Instant::now());
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= next_upload {
            for h in service.open_hosts() {
                if let Err(e) = h.repo().upload_sealed() {
                    tracing::warn!(host = h.name(), "segments stay staged: {e}");
                }
            }
            next_upload = now + UPLOAD_RETRY;
        }
        if now >= next_idle_check {
            service.close_idle(config.idle_close);
            next_idle_check = now + IDLE_CHECK.min(config.idle_close);
        }
        if config.min_free != MinFree::Off && now >= next_space {
            manage_space(&service, &config);
            next_space = now + config.space_check_every;
        }
        if let (Some(at), Some(every)) = (next_purge, config.purge_every) {
            if now >= at {
                for host in service.host_names() {
                    purge_by_schedule(&service, &host);
                }
                next_purge = Some(Instant::now() + every);
            }
        }
        if let (Some(at), Some(every)) = (next_compact, config.compact_every) {
            if now >= at {
                for host in service.host_names() {
                    compact(&service, &host, config.compact_threshold);
                }
                next_compact = Some(Instant::now() + every);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Purges the sets that `host`'s retention schedule (its stored configuration) says are due,
/// by the daemon's clock: the clock that stamped the sets, so a client's wrong clock plays no
/// part. The repository refuses a locked set or the latest one whatever the schedule says.
fn purge_by_schedule(service: &Service, host: &str) {
    let Some(h) = service.open_host(host) else { return };
    let due = || -> Result<Vec<SetInfo>, tardis_core::Error> {
        let sets = h.repo().sets()?;
        let config = tardis_core::config::Config::from_stored(&h.repo().config()?)?;
        let ids = retention::by_schedule(&sets, &config.schedule(), service.now(), None);
        if !ids.is_empty() {
            h.repo().purge_sets(&ids)?;
        }
        Ok(sets.into_iter().filter(|s| ids.contains(&s.id)).collect())
    };
    match due() {
        Ok(purged) => {
            for s in purged {
                tracing::info!(host, set = s.name, priority = s.priority, "purged set by the retention schedule");
            }
        }
        Err(e) => tracing::error!(host, "purging by the retention schedule failed: {e}"),
    }
}

fn compact(service: &Service, host: &str, threshold: f64) {
    let Some(h) = service.open_host(host) else { return };
    match h.repo().compact(&CompactOptions { threshold, ..CompactOptions::default() }) {
        Ok(r) if !r.retired.is_empty() => tracing::info!(
            host,
            retired = r.retired.len(),
            before = r.bytes_before,
            after = r.bytes_after,
            "compacted segments"
        ),
        Ok(_) => {}
        Err(e) => tracing::error!(host, "compaction failed: {e}"),
    }
}

/// While free space is below the floor: purge the lowest-priority, oldest set of any host
/// that a purge may take (never a locked set, an open one, or a host's latest), compact that
/// host to give the space back, and look again.
fn manage_space(service: &Service, config: &JobConfig) {
    let base = service.base();
    loop {
        let (free, total) = match space(base) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(base = %base.display(), "reading free space: {e}");
                return;
            }
        };
        let floor = config.min_free.bytes(total);
        if free >= floor {
            return;
        }
        let Some((host, set)) = candidate(service) else {
            tracing::warn!(free, floor, "disk below MinFreeSpace, and every host is down to sets a purge must keep");
            return;
        };
        let Some(h) = service.open_host(&host) else { return };
        if let Err(e) = h.repo().purge_sets(&[set.id]) {
            tracing::error!(host, set = set.name, "purging for space failed: {e}");
            return;
        }
        tracing::warn!(host, set = set.name, priority = set.priority, free, floor, "disk low: purged set");
        compact(service, &host, 0.999);
    }
}

/// The next set to purge for space: lowest priority first, then oldest, over all hosts.
fn candidate(service: &Service) -> Option<(String, SetInfo)> {
    let mut best: Option<(String, SetInfo)> = None;
    for host in service.host_names() {
        let Some(h) = service.open_host(&host) else { continue };
        let Ok(sets) = h.repo().sets() else { continue };
        for s in sets.iter().filter(|s| s.is_live() && retention::protected(&sets, s.id).is_none()) {
            let better = best.as_ref().is_none_or(|(_, b)| (s.priority, s.finished) < (b.priority, b.finished));
            if better {
                best = Some((host.clone(), s.clone()));
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_parse() {
        assert_eq!(MinFree::parse("0"), Some(MinFree::Off));
        assert_eq!(MinFree::parse("10G"), Some(MinFree::Bytes(10 << 30)));
        assert_eq!(MinFree::parse("512 M"), Some(MinFree::Bytes(512 << 20)));
        assert_eq!(MinFree::parse("12345"), Some(MinFree::Bytes(12345)));
        assert_eq!(MinFree::parse("5%"), Some(MinFree::Percent(5.0)));
        assert_eq!(MinFree::parse("0%"), Some(MinFree::Off));
        for bad in ["", "%", "-1", "100%", "ten", "5X", "99999999999T"] {
            assert_eq!(MinFree::parse(bad), None, "{bad}");
        }
        assert_eq!(MinFree::Percent(10.0).bytes(1000), 100);
    }
}
