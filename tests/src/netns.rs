//! Two network namespaces joined by a veth pair, for kernel-level packet loss and rate limits.
//!
//! This kernel has no `netem`; what it has is nftables (`numgen random` drops) and `tbf`. A
//! [`NetnsPair`] makes namespaces `A` and `B`, each holding one end of a veth pair named
//! [`IFACE`] with an address on a private /30 ([`ADDR_A`], [`ADDR_B`]). Because the addresses and
//! rules live only inside namespaces the test made, nothing of the host's network changes and
//! pairs of concurrent tests do not collide. Programs run inside with [`NetnsPair::command`]
//! (`ip netns exec`); the test process itself can open sockets inside with [`NetnsPair::run`].
//!
//! Everything is deleted when the pair is dropped, also while unwinding from a panic; pairs left
//! by a killed test process are deleted by the next [`NetnsPair::create`].
//!
//! Needs root, `ip` and `tc` (iproute2) and `nft` (nftables): [`unavailable`] says what is
//! missing, and [`skip_unless_available`] turns that into a skip, or into a failure when
//! `TARDIS_REQUIRE_NETNS=1` (set by `.ci/run`).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The veth end's name in both namespaces.
pub const IFACE: &str = "veth0";
/// Side A's address, on 10.201.0.0/30.
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
/// Side B's address, on 10.201.0.0/30.
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);

/// Prefix of every namespace this module makes, followed by the owning process id.
const PREFIX: &str = "tardis-t";
/// The nftables table holding the loss rule, in the namespace receiving the lossy traffic.
const TABLE: &str = "tardis_lossy";

/// One end of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

impl Side {
    pub fn addr(self) -> Ipv4Addr {
        match self {
            Side::A => ADDR_A,
            Side::B => ADDR_B,
        }
    }

    pub fn peer(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// A `tbf` rate limit on one side's outgoing traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained rate in bits per second.
    pub bits_per_sec: u64,
    /// Bucket size in bytes: how much may leave at line speed after an idle period.
    pub burst_bytes: u32,
    /// Longest time a packet may wait in the queue before it is dropped.
    pub latency: Duration,
}

/// Why the harness cannot run here, or `None` if it can.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("network namespaces need root".into());
    }
    for (tool, package) in [("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")] {
        let found = Command::new(tool).arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
        if !found {
            return Some(format!("`{tool}` is not installed (package {package})"));
        }
    }
    None
}

/// True if the netns tests can run; otherwise prints why and returns false, or panics when
/// `TARDIS_REQUIRE_NETNS=1`, so that CI can never pass by skipping them.
pub fn skip_unless_available(test: &str) -> bool {
    let Some(problem) = unavailable() else { return true };
    assert!(
        std::env::var("TARDIS_REQUIRE_NETNS").as_deref() != Ok("1"),
        "{test}: {problem}, and TARDIS_REQUIRE_NETNS=1 requires the network namespace tests to run"
    );
    eprintln!("SKIPPED {test}: {problem}; the network namespace test did not run");
    false
}

/// Two namespaces joined by a veth pair; deleted on drop.
#[derive(Debug)]
pub struct NetnsPair {
    a: String,
    b: String,
}

impl NetnsPair {
    /// Creates the namespaces (named after `tag`, this process and a counter), the veth pair, its
    /// addresses, and brings the links up.
    pub fn create(tag: &str) -> io::Result<NetnsPair> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag: String = tag.chars().filter(|c| c.is_ascii_alphanumeric()).take(16).collect();
        let base = format!("{PREFIX}{}-{n}-{tag}", std::process::id());
        let pair = NetnsPair { a: format!("{base}-a"), b: format!("{base}-b") };
        // From here on, `Drop` removes whatever part of the pair was made.
        ip(&["netns", "add", &pair.a])?;
        ip(&["netns", "add", &pair.b])?;
        // Made directly inside the namespaces, so no interface ever appears in the host's.
        ip(&["link", "add", IFACE, "netns", &pair.a, "type", "veth", "peer", "name", IFACE, "netns", &pair.b])?;
        for side in [Side::A, Side::B] {
            let ns = pair.name(side);
            ip(&["-n", ns, "addr", "add", &format!("{}/30", side.addr()), "dev", IFACE])?;
            ip(&["-n", ns, "link", "set", IFACE, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// The namespace's name (as in `ip netns list`).
    pub fn name(&self, side: Side) -> &str {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }

    /// Drops `percent` % of the IPv4 packets `side` sends through the veth, chosen by the kernel
    /// at random (nftables `numgen random mod 100 < percent drop`). Replaces any earlier rule and
    /// resets its counter; 0 keeps a rule that drops nothing.
    ///
    /// The rule sits where the packets arrive, in the peer's namespace: dropped on the sender's
    /// own output path, `sendmsg` would fail with EPERM, and a real lossy link tells the sender
    /// nothing.
    pub fn set_loss(&self, side: Side, percent: u8) -> io::Result<()> {
        assert!(percent <= 100, "loss {percent} % is not a percentage");
        // Creating the table first makes the delete valid when there was none; the whole script
        // is one nftables transaction.
        let script = format!(
            "table ip {TABLE} {{}}\n\
             delete table ip {TABLE}\n\
             table ip {TABLE} {{\n\
             \x20 chain ingress {{\n\
             \x20   type filter hook prerouting priority raw; policy accept;\n\
             \x20   iifname \"{IFACE}\" numgen random mod 100 < {percent} counter drop\n\
             \x20 }}\n\
             }}\n"
        );
        let mut child =
            self.command(side.peer(), "nft").args(["-f", "-"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        child.stdin.take().expect("piped stdin").write_all(script.as_bytes())?;
        checked("nft -f -", child.wait_with_output()?)?;
        Ok(())
    }

    /// Packets from `side` that the loss rule has dropped since [`Self::set_loss`].
    pub fn loss_dropped(&self, side: Side) -> io::Result<u64> {
        let out = self.command(side.peer(), "nft").args(["-j", "list", "chain", "ip", TABLE, "ingress"]).output()?;
        let out = checked("nft list chain", out)?;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(io::Error::other)?;
        // {"nftables": [.., {"rule": {"expr": [.., {"counter": {"packets": N, ..}}, ..]}}]}
        let packets = json["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|item| item["rule"]["expr"].as_array())
            .flatten()
            .find_map(|e| e["counter"]["packets"].as_u64());
        packets.ok_or_else(|| io::Error::other("no counter in the loss rule"))
    }

    /// Limits the rate of everything leaving `side` through the veth with a `tbf` qdisc.
    pub fn set_rate(&self, side: Side, limit: RateLimit) -> io::Result<()> {
        let rate = format!("{}bit", limit.bits_per_sec);
        let burst = limit.burst_bytes.to_string(); // A bare number is bytes to tc.
        let latency = format!("{}us", limit.latency.as_micros());
        let args =
            ["qdisc", "replace", "dev", IFACE, "root", "tbf", "rate", &rate, "burst", &burst, "latency", &latency];
        checked("tc qdisc replace", self.command(side, "tc").args(args).output()?)?;
        Ok(())
    }

    /// A command that runs `program` inside `side`'s namespace (add arguments as usual).
    pub fn command(&self, side: Side, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.name(side)]).arg(program);
        c
    }

    /// Runs `f` on a thread that has entered `side`'s namespace. Sockets made by `f` stay in that
    /// namespace for their whole life, whichever thread uses them later.
    pub fn run<T: Send>(&self, side: Side, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let ns = File::open(format!("/run/netns/{}", self.name(side)))?;
        std::thread::scope(|s| {
            s.spawn(move || {
                // Only this thread moves: the network namespace is per thread.
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// A UDP socket bound to `side`'s address and `port` (0 for any), inside its namespace.
    pub fn udp_socket(&self, side: Side, port: u16) -> io::Result<UdpSocket> {
        self.run(side, || UdpSocket::bind(SocketAddr::from((side.addr(), port))))?
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth end (and so the pair), its qdiscs and its nftables
        // tables. Failures are printed, never raised: this may run while unwinding.
        for ns in [&self.a, &self.b] {
            if exists(ns) {
                if let Err(e) = ip(&["netns", "del", ns]) {
                    eprintln!("netns: could not delete {ns}: {e}");
                }
            }
        }
    }
}

/// Whether a namespace of that name exists.
pub fn exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

/// Deletes namespaces left by test processes that no longer run (killed before `Drop` ran).
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else { return };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()) else { continue };
        let alive = std::path::Path::new("/proc").join(pid).exists();
        if !alive && pid.bytes().all(|b| b.is_ascii_digit()) {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

fn ip(args: &[&str]) -> io::Result<Output> {
    checked(&format!("ip {}", args.join(" ")), Command::new("ip").args(args).output()?)
}

/// The output of a command that exited 0; otherwise an error with its stderr.
fn checked(what: &str, out: Output) -> io::Result<Output> {
    if out.status.success() {
        return Ok(out);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(io::Error::other(format!("{what}: {}: {}", out.status, stderr.trim())))
}
