//! A seeded UDP relay that impairs the link between one client and one server, for testing the
//! QUIC transport on loopback without root.
//!
//! The kernel here has no `netem`, so delay, jitter, reordering and duplication are made in the test
//! process (random loss and rate limits are also available at kernel level: see [`crate::netns`]).
//! The client sends to [`Relay::addr`]; the relay forwards to the fixed upstream address (the
//! server) and sends the server's replies back to the client. Each direction has its own [`Link`]
//! and its own thread, which receives, decides the fate of each datagram, and sends it when due.
//!
//! Every random decision comes from a generator seeded by [`RelayConfig::seed`] (one stream per
//! direction), and the seed is printed when the relay starts, so a failing run can be repeated by
//! passing the same seed (tests take it from `TARDIS_RELAY_SEED` through [`seed_from_env`]).
//!
//! Accounting identity, per direction, in every snapshot of [`Relay::stats`]: `received +
//! duplicated == forwarded + dropped + outage_dropped + queue_dropped + send_errors + in_flight`.

use std::collections::BinaryHeap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a relay thread blocks at most before checking whether it should stop. This bounds the
/// time `Drop` waits, and costs one wake-up per direction every 20 ms while idle.
const POLL: Duration = Duration::from_millis(20);

/// Buffer size of the relay's sockets. The kernel's default (about 200 KiB) holds fewer than 100
/// datagrams of 1 KB; a burst larger than that would be lost before the relay sees it, which is
/// loss nobody configured and that the counters cannot show.
const SOCKET_BUFFER: usize = 4 << 20;

/// Gives a socket 4 MiB receive and send buffers, so that bursts are not lost in the kernel on
/// loopback (the relay does this to its own sockets; tests can do it to theirs). Beyond
/// `net.core.rmem_max` only as root; otherwise the kernel caps it.
pub fn roomy_buffers(sock: &UdpSocket) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(sock, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        setsockopt(sock, sockopt::RcvBuf, &SOCKET_BUFFER)?;
    }
    if setsockopt(sock, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        setsockopt(sock, sockopt::SndBuf, &SOCKET_BUFFER)?;
    }
    Ok(())
}

/// The impairments of one direction. `Link::default()` forwards everything at once.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Fixed one-way delay: no datagram is delivered sooner (100 ms RTT = 50 ms each way).
    pub delay: Duration,
    /// Extra delay, uniform in `[0, jitter]`, drawn per datagram; reorders datagrams sent closer
    /// together than the jitter.
    pub jitter: Duration,
    /// Probability that a datagram is held back by `reorder_hold`, so that later ones overtake it.
    pub reorder: f64,
    /// How long a datagram picked by `reorder` is held back.
    pub reorder_hold: Duration,
    /// Probability that a datagram is sent twice (the copy has its own jitter and reorder draw).
    pub duplicate: f64,
    /// Bandwidth cap in bytes of UDP payload per second; `None` is unlimited.
    pub rate: Option<u64>,
    /// With a rate cap, the longest backlog a datagram may wait behind before it is dropped
    /// instead (a bounded router queue; unbounded queues hide congestion from the sender).
    pub queue: Duration,
}

impl Default for Link {
    fn default() -> Self {
        Link {
            loss: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder: 0.0,
            reorder_hold: Duration::from_millis(10),
            duplicate: 0.0,
            rate: None,
            queue: Duration::from_millis(200),
        }
    }
}

impl Link {
    /// A link with the given loss probability and round-trip time (half of it each way).
    pub fn lossy(loss: f64, rtt: Duration) -> Self {
        Link { loss, delay: rtt / 2, ..Link::default() }
    }
}

/// The relay's configuration: a seed and one [`Link`] per direction.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayConfig {
    pub seed: u64,
    /// Client to server.
    pub to_server: Link,
    /// Server to client.
    pub to_client: Link,
}

impl RelayConfig {
    /// The same link in both directions.
    pub fn symmetric(seed: u64, link: Link) -> Self {
        RelayConfig { seed, to_server: link.clone(), to_client: link }
    }
}

/// `TARDIS_RELAY_SEED` if set (to repeat a printed run), else `default` (CI runs fixed seeds).
pub fn seed_from_env(default: u64) -> u64 {
    match std::env::var("TARDIS_RELAY_SEED") {
        Ok(s) => s.trim().parse().unwrap_or_else(|_| panic!("TARDIS_RELAY_SEED={s:?} is not a u64")),
        Err(_) => default,
    }
}

/// One direction of the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToServer,
    ToClient,
}

/// Counters of one direction. Every datagram and copy is counted once on arrival and once at its
/// end (forwarded or dropped), in one consistent update each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirStats {
    /// Datagrams that reached the relay (from the client, or from upstream).
    pub received: u64,
    /// Datagrams and copies sent on.
    pub forwarded: u64,
    /// Payload bytes sent on.
    pub bytes_forwarded: u64,
    /// Dropped by the random loss.
    pub dropped: u64,
    /// Dropped because the link was down when they arrived or were due.
    pub outage_dropped: u64,
    /// Dropped because the rate cap's queue was full.
    pub queue_dropped: u64,
    /// Extra copies made.
    pub duplicated: u64,
    /// Datagrams sent after one that reached the relay later than them.
    pub reordered: u64,
    /// Sends that failed, or replies with no client to go to.
    pub send_errors: u64,
    /// Datagrams and copies waiting for their time.
    pub in_flight: u64,
}

/// A snapshot of the relay's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub to_server: DirStats,
    pub to_client: DirStats,
    /// How many times the client address was taken from a datagram: 1 after the first one, one
    /// more for each datagram from a new address (a reconnecting client's new socket).
    pub client_changes: u64,
}

/// A running relay. Dropping it stops and joins both threads and closes its sockets.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    upstream: SocketAddr,
    seed: u64,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay on a free loopback port that forwards to `upstream`. Started from a thread
    /// inside a network namespace (`NetnsPair::run`), the relay lives in that namespace.
    pub fn start(upstream: SocketAddr, config: RelayConfig) -> io::Result<Relay> {
        // The client-facing socket and the server-facing one; each thread receives on one and
        // sends on the other. Neither is connected: a connected socket would report ICMP errors
        // (a server not listening yet) as receive errors.
        let front = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        // Towards a loopback server, stay on loopback; towards another address (a relay started
        // inside a network namespace, in front of a server across a veth), let routing pick.
        let back = match upstream.ip() {
            ip if ip.is_loopback() => UdpSocket::bind((ip, 0))?,
            IpAddr::V4(_) => UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?,
            IpAddr::V6(_) => UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?,
        };
        roomy_buffers(&front)?;
        roomy_buffers(&back)?;
        let addr = front.local_addr()?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            down: AtomicBool::new(false),
            outages: Mutex::new(Vec::new()),
            client: Mutex::new(None),
            client_changes: AtomicU64::new(0),
            links: [Mutex::new(config.to_server), Mutex::new(config.to_client)],
            counters: [Mutex::default(), Mutex::default()],
        });
        eprintln!(
            "relay {addr} -> {upstream}: seed {} (TARDIS_RELAY_SEED={} repeats a test that uses seed_from_env)",
            config.seed, config.seed
        );
        // Made before the threads, so that a failure to start the second one stops the first.
        let mut relay = Relay { addr, upstream, seed: config.seed, shared, threads: Vec::new() };
        for dir in [Direction::ToServer, Direction::ToClient] {
            let (rx, tx) = match dir {
                Direction::ToServer => (front.try_clone()?, back.try_clone()?),
                Direction::ToClient => (back.try_clone()?, front.try_clone()?),
            };
            let mut worker = Worker {
                dir,
                rx,
                tx,
                upstream,
                shared: Arc::clone(&relay.shared),
                rng: Rng::new(config.seed, dir),
                queue: BinaryHeap::new(),
                link_free: Instant::now(),
                next_seq: 0,
                next_order: 0,
                max_sent: None,
            };
            let name = format!("relay-{dir:?}");
            relay.threads.push(std::thread::Builder::new().name(name).spawn(move || worker.run())?);
        }
        Ok(relay)
    }

    /// The address clients send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's address.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The current client: the source of the latest datagram from a new address.
    pub fn client(&self) -> Option<SocketAddr> {
        *lock(&self.shared.client)
    }

    /// Takes the link down (everything in both directions is dropped) or brings it back up.
    pub fn set_outage(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Takes the link down from `after` from now for `length`; returns that window.
    pub fn schedule_outage(&self, after: Duration, length: Duration) -> Range<Instant> {
        let start = Instant::now() + after;
        let window = start..start + length;
        lock(&self.shared.outages).push(window.clone());
        window
    }

    /// Replaces one direction's impairments from the next datagram on (already queued ones keep
    /// their times).
    pub fn set_link(&self, dir: Direction, link: Link) {
        *lock(&self.shared.links[dir as usize]) = link;
    }

    pub fn stats(&self) -> Stats {
        Stats {
            to_server: *lock(&self.shared.counters[0]),
            to_client: *lock(&self.shared.counters[1]),
            client_changes: self.shared.client_changes.load(Ordering::SeqCst),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            // A panicking relay thread is a bug in the relay; don't hide it, but don't panic
            // inside a drop that may already run during unwinding either.
            if t.join().is_err() {
                eprintln!("relay {}: a relay thread panicked", self.addr);
            }
        }
    }
}

/// State both threads and the handle share.
#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    down: AtomicBool,
    outages: Mutex<Vec<Range<Instant>>>,
    client: Mutex<Option<SocketAddr>>,
    client_changes: AtomicU64,
    /// Indexed by `Direction as usize`.
    links: [Mutex<Link>; 2],
    /// Each event (an arrival and its fate, a departure and its outcome) is one update under the
    /// lock, so a snapshot never shows a datagram half counted.
    counters: [Mutex<DirStats>; 2],
}

impl Shared {
    fn is_down(&self, now: Instant) -> bool {
        self.down.load(Ordering::SeqCst) || lock(&self.outages).iter().any(|w| w.contains(&now))
    }
}

/// Locks a mutex, ignoring poisoning: the data are plain values that a panic cannot leave half
/// updated.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DirStats {
    fn add(&mut self, d: &DirStats) {
        self.received += d.received;
        self.forwarded += d.forwarded;
        self.bytes_forwarded += d.bytes_forwarded;
        self.dropped += d.dropped;
        self.outage_dropped += d.outage_dropped;
        self.queue_dropped += d.queue_dropped;
        self.duplicated += d.duplicated;
        self.reordered += d.reordered;
        self.send_errors += d.send_errors;
        self.in_flight += d.in_flight;
    }
}

/// A datagram (or copy) waiting for its time.
#[derive(Debug, PartialEq, Eq)]
struct Pending {
    due: Instant,
    /// Arrival order of tie-breaking copies with the same `due`: keeps equal-time datagrams in
    /// arrival order, so only the configured impairments reorder.
    order: u64,
    /// Arrival number of the original datagram (copies share it), for counting reordering.
    seq: u64,
    data: Vec<u8>,
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Reversed: `BinaryHeap` is a max-heap and the earliest datagram must come out first.
        (other.due, other.order).cmp(&(self.due, self.order))
    }
}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// One direction's thread: receives, decides, and sends datagrams when they are due.
struct Worker {
    dir: Direction,
    rx: UdpSocket,
    tx: UdpSocket,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    rng: Rng,
    queue: BinaryHeap<Pending>,
    /// With a rate cap, when the link finishes sending what is already queued.
    link_free: Instant,
    next_seq: u64,
    next_order: u64,
    max_sent: Option<u64>,
}

impl Worker {
    fn record(&self, d: &DirStats) {
        lock(&self.shared.counters[self.dir as usize]).add(d);
    }

    fn run(&mut self) {
        let mut buf = vec![0u8; 65536];
        while !self.shared.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            while self.queue.peek().is_some_and(|p| p.due <= now) {
                let p = self.queue.pop().expect("peeked");
                self.depart(p);
            }
            // Sleep in the receive until the next datagram is due (never past POLL, to notice a
            // stop). A zero timeout is an error for sockets, hence the floor; it only makes a
            // datagram later, never earlier.
            let wait = self.queue.peek().map_or(POLL, |p| p.due.saturating_duration_since(now));
            let wait = wait.clamp(Duration::from_micros(50), POLL);
            if self.rx.set_read_timeout(Some(wait)).is_err() {
                return;
            }
            match self.rx.recv_from(&mut buf) {
                Ok((n, from)) => self.arrive(&buf[..n], from),
                // Timeouts, and errors that a peer's ICMP messages may cause: nothing to do.
                Err(_) => continue,
            }
        }
    }

    fn arrive(&mut self, data: &[u8], from: SocketAddr) {
        if self.dir == Direction::ToClient && from != self.upstream {
            return; // Not from the server: not part of this link.
        }
        let mut d = DirStats { received: 1, ..DirStats::default() };
        self.decide(data, from, &mut d);
        self.record(&d);
    }

    /// Decides an arriving datagram's fate, counting it in `d`.
    fn decide(&mut self, data: &[u8], from: SocketAddr, d: &mut DirStats) {
        let now = Instant::now();
        if self.shared.is_down(now) {
            d.outage_dropped += 1;
            return;
        }
        if self.dir == Direction::ToServer {
            // Any new source becomes the client: a reconnecting QUIC client opens a new socket.
            let mut client = lock(&self.shared.client);
            if *client != Some(from) {
                *client = Some(from);
                self.shared.client_changes.fetch_add(1, Ordering::SeqCst);
            }
        }
        let link = lock(&self.shared.links[self.dir as usize]).clone();
        // Loss is drawn first for every datagram, so a seed's loss pattern does not depend on the
        // other settings.
        if self.rng.chance(link.loss) {
            d.dropped += 1;
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let copies = if self.rng.chance(link.duplicate) { 2 } else { 1 };
        d.duplicated += copies - 1;
        for _ in 0..copies {
            let mut ready = now;
            if let Some(rate) = link.rate {
                let start = self.link_free.max(now);
                if start - now > link.queue {
                    d.queue_dropped += 1;
                    continue;
                }
                // Serialisation: each datagram occupies the link for len/rate after the previous
                // (rounded up, so the cap is never exceeded).
                let nanos = (data.len() as u128 * 1_000_000_000).div_ceil(u128::from(rate.max(1))) as u64;
                self.link_free = start + Duration::from_nanos(nanos);
                ready = self.link_free;
            }
            let mut due = ready + link.delay + self.rng.duration(link.jitter);
            if self.rng.chance(link.reorder) {
                due += link.reorder_hold;
            }
            self.queue.push(Pending { due, order: self.next_order, seq, data: data.to_vec() });
            self.next_order += 1;
            d.in_flight += 1;
        }
    }

    fn depart(&mut self, p: Pending) {
        let outcome = self.send(&p);
        let mut c = lock(&self.shared.counters[self.dir as usize]);
        c.in_flight -= 1;
        match outcome {
            Sent::Down => c.outage_dropped += 1,
            Sent::Failed => c.send_errors += 1,
            Sent::Ok => {
                c.forwarded += 1;
                c.bytes_forwarded += p.data.len() as u64;
                match self.max_sent {
                    Some(m) if p.seq < m => c.reordered += 1,
                    _ => self.max_sent = Some(p.seq),
                }
            }
        }
    }

    fn send(&self, p: &Pending) -> Sent {
        // Datagrams still on the wire when the link goes down are lost too.
        if self.shared.is_down(Instant::now()) {
            return Sent::Down;
        }
        let dest = match self.dir {
            Direction::ToServer => Some(self.upstream),
            Direction::ToClient => *lock(&self.shared.client),
        };
        match dest.map(|dest| self.tx.send_to(&p.data, dest)) {
            Some(Ok(_)) => Sent::Ok,
            // A failed send, or a reply before any client spoke.
            _ => Sent::Failed,
        }
    }
}

/// What became of a datagram that was due.
enum Sent {
    Ok,
    Down,
    Failed,
}

/// SplitMix64: tiny, seedable, and good enough for drawing impairments and crash points; no
/// dependency needed.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// A stream that depends only on `seed`.
    pub fn from_seed(seed: u64) -> Self {
        Rng(seed)
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    fn new(seed: u64, dir: Direction) -> Self {
        // Distinct streams per direction from one seed.
        Rng(seed ^ (dir as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// True with probability `p`. Always draws, so the stream stays aligned whatever `p` is.
    fn chance(&mut self, p: f64) -> bool {
        let x = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        x < p
    }

    /// Uniform in `[0, max]`.
    fn duration(&mut self, max: Duration) -> Duration {
        let r = self.next_u64();
        let n = max.as_nanos() as u64;
        if n == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(r % (n + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_reproducible_and_unbiased_enough() {
        let mut a = Rng::new(7, Direction::ToServer);
        let mut b = Rng::new(7, Direction::ToServer);
        let mut c = Rng::new(7, Direction::ToClient);
        let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..100).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
        let hits = (0..100_000).filter(|_| a.chance(0.25)).count();
        assert!((24_000..26_000).contains(&hits), "{hits} hits of 100,000 at p = 0.25");
        assert!((0..1000).all(|_| a.duration(Duration::from_millis(3)) <= Duration::from_millis(3)));
    }

    #[test]
    fn pending_pops_earliest_first_and_ties_in_arrival_order() {
        let t = Instant::now();
        let p = |ms, order| Pending { due: t + Duration::from_millis(ms), order, seq: order, data: Vec::new() };
        let mut h: BinaryHeap<Pending> = [p(5, 0), p(1, 1), p(5, 2), p(0, 3)].into_iter().collect();
        let out: Vec<u64> = std::iter::from_fn(|| h.pop().map(|p| p.order)).collect();
        assert_eq!(out, [3, 1, 0, 2]);
    }
}
