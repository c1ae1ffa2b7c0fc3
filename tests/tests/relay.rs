//! The lossy-link harness, tested: each impairment of the relay and of the network namespaces
//! really happens, is counted, and agrees with its configuration.
//!
//! Every exchange is accounted for end to end before anything is measured: the echo server must
//! have received exactly what the relay (or nftables) says it let through, and the client exactly
//! what came back, so a counter that lies, or loopback losing datagrams, fails the test instead of
//! skewing a figure. Rates are checked against binomial bounds (5 standard deviations) for the
//! fixed seeds; `TARDIS_RELAY_SEED` repeats a printed seed. The only timing assertions are lower
//! bounds the harness guarantees (nothing arrives before its configured delay).
//!
//! The namespace tests need root, iproute2 and nftables; without them they skip with a message,
//! unless `TARDIS_REQUIRE_NETNS=1` (set by `.ci/run`), in which case they fail.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tardis_tests::netns::{self, NetnsPair, RateLimit, Side};
use tardis_tests::relay::{roomy_buffers, seed_from_env, Direction, Link, Relay, RelayConfig, Stats};

const MS: Duration = Duration::from_millis(1);
/// How long any exchange may take before the test gives up (a failure, never a measurement).
const PATIENCE: Duration = Duration::from_secs(60);

/// One datagram seen by a receiver: its number, when it was sent and when it arrived, both as
/// time since the test's epoch.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    seq: u64,
    sent: Duration,
    at: Duration,
}

/// A datagram of `len` bytes (at least 16) carrying its number and send time.
fn payload(seq: u64, sent: Duration, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len.max(16)];
    p[..8].copy_from_slice(&seq.to_le_bytes());
    p[8..16].copy_from_slice(&(sent.as_nanos() as u64).to_le_bytes());
    p
}

fn parse(p: &[u8], at: Duration) -> Arrival {
    let seq = u64::from_le_bytes(p[..8].try_into().expect("16-byte header"));
    let sent = Duration::from_nanos(u64::from_le_bytes(p[8..16].try_into().expect("16-byte header")));
    Arrival { seq, sent, at }
}

/// A UDP echo server on its own thread that logs every datagram and sends it back.
struct Echo {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Arrival>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start(sock: UdpSocket, epoch: Instant) -> Echo {
        let addr = sock.local_addr().expect("echo address");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (Arc::clone(&log), Arc::clone(&stop));
        sock.set_read_timeout(Some(10 * MS)).expect("timeout");
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::SeqCst) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
                let a = parse(&buf[..n], epoch.elapsed());
                // Logged before echoing, so a reply never overtakes its log entry.
                l.lock().unwrap().push(a);
                let _ = sock.send_to(&buf[..n], from);
            }
        });
        Echo { addr, log, stop, thread: Some(thread) }
    }

    fn count(&self) -> u64 {
        self.log.lock().unwrap().len() as u64
    }

    fn arrivals(&self) -> Vec<Arrival> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("echo thread");
        }
    }
}

/// The sending side: numbered datagrams out, echoes in.
struct Client {
    sock: UdpSocket,
    to: SocketAddr,
    epoch: Instant,
    sent: Vec<Duration>,
    echoes: Vec<Arrival>,
}

impl Client {
    fn new(sock: UdpSocket, to: SocketAddr, epoch: Instant) -> Client {
        sock.set_read_timeout(Some(MS)).expect("timeout");
        Client { sock, to, epoch, sent: Vec::new(), echoes: Vec::new() }
    }

    /// Sends `n` datagrams of `len` bytes back to back; returns the first one's number.
    fn burst(&mut self, n: usize, len: usize) -> u64 {
        let first = self.sent.len() as u64;
        for _ in 0..n {
            let seq = self.sent.len() as u64;
            let now = self.epoch.elapsed();
            self.sent.push(now);
            self.sock.send_to(&payload(seq, now, len), self.to).expect("send");
        }
        first
    }

    /// Reads the echoes that have arrived (waiting at most 1 ms for the first).
    fn drain(&mut self) {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = self.sock.recv(&mut buf) {
            self.echoes.push(parse(&buf[..n], self.epoch.elapsed()));
        }
    }
}

/// Waits until `done` holds (calling it repeatedly), or fails the test naming `what`.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::yield_now();
    }
}

/// Waits until every datagram the clients sent is accounted for end to end through the relay,
/// and returns the counters: the relay received them all and holds none back; the echo server
/// received exactly what the relay forwarded to it and echoed it; the relay received every echo;
/// and the clients received exactly what it forwarded back.
fn settle(relay: &Relay, echo: &Echo, clients: &mut [&mut Client]) -> Stats {
    settle_with_kernel_loss(relay, echo, clients, || (0, 0))
}

/// [`settle`] where the kernel drops some datagrams between the relay and the echo server:
/// `kernel_drops` returns how many so far towards the server and back.
fn settle_with_kernel_loss(
    relay: &Relay,
    echo: &Echo,
    clients: &mut [&mut Client],
    kernel_drops: impl Fn() -> (u64, u64),
) -> Stats {
    let sent: u64 = clients.iter().map(|c| c.sent.len() as u64).sum();
    let deadline = Instant::now() + PATIENCE;
    loop {
        for c in clients.iter_mut() {
            c.drain();
        }
        let s = relay.stats();
        let got: u64 = clients.iter().map(|c| c.echoes.len() as u64).sum();
        let (up, down) = (s.to_server, s.to_client);
        // Read after the relay's counters and before the echo server's: each is at most its
        // final value, so when the sums match, all of them are final.
        let (kernel_up, kernel_down) = kernel_drops();
        let echoed = echo.count();
        if up.received == sent
            && up.in_flight == 0
            && echoed + kernel_up == up.forwarded
            && down.received + kernel_down == echoed
            && down.in_flight == 0
            && got == down.forwarded
        {
            for d in [up, down] {
                let ends = d.forwarded + d.dropped + d.outage_dropped + d.queue_dropped + d.send_errors + d.in_flight;
                assert_eq!(d.received + d.duplicated, ends, "every datagram ends exactly once: {d:?}");
            }
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "exchange never settled: sent {sent}, echo server got {echoed}, clients got {got}, relay {s:#?}"
        );
    }
}

/// Asserts `k` successes of `n` trials are within 5 standard deviations of probability `p`, and
/// returns the measured rate.
fn assert_binomial(what: &str, k: u64, n: u64, p: f64) -> f64 {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    let rate = k as f64 / n as f64;
    eprintln!("{what}: {k} of {n} = {:.2} % (configured {:.1} %, bound ±{:.0})", rate * 100.0, p * 100.0, 5.0 * sd);
    assert!((k as f64 - mean).abs() <= 5.0 * sd + 1.0, "{what}: {k} of {n} is not within 5 sd of {mean:.0}");
    rate
}

/// Duplicates and reorderings as a receiver saw them: datagrams whose number it had seen
/// before, and datagrams whose number is below the highest seen (the relay's own definitions).
fn observed_dups_and_reorders(arrivals: &[Arrival]) -> (u64, u64) {
    let mut seen = HashSet::new();
    let (mut dups, mut reorders, mut max) = (0, 0, None);
    for a in arrivals {
        if !seen.insert(a.seq) {
            dups += 1;
        }
        match max {
            Some(m) if a.seq < m => reorders += 1,
            _ => max = Some(a.seq),
        }
    }
    (dups, reorders)
}

fn loopback() -> UdpSocket {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind loopback");
    roomy_buffers(&sock).expect("socket buffers");
    sock
}

/// An echo server, a relay in front of it and a client of the relay.
fn setup(config: RelayConfig) -> (Echo, Relay, Client) {
    let epoch = Instant::now();
    let echo = Echo::start(loopback(), epoch);
    let relay = Relay::start(echo.addr, config).expect("start relay");
    let client = Client::new(loopback(), relay.addr(), epoch);
    (echo, relay, client)
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[test]
fn relay_loss_matches_configured_rate() {
    let seed = seed_from_env(0x7a2d_1500);
    let (echo, relay, mut client) = setup(RelayConfig::symmetric(seed, Link::default()));

    // Control: a perfect link loses nothing, so the losses below are the relay's.
    for _ in 0..10 {
        client.burst(50, 64);
        settle(&relay, &echo, &mut [&mut client]);
    }
    let s = relay.stats();
    assert_eq!((s.to_server.forwarded, s.to_client.forwarded), (500, 500), "perfect link: {s:?}");

    relay.set_link(Direction::ToServer, Link { loss: 0.10, ..Link::default() });
    relay.set_link(Direction::ToClient, Link { loss: 0.20, ..Link::default() });
    let n = 3000;
    for _ in 0..n / 50 {
        client.burst(50, 64);
        settle(&relay, &echo, &mut [&mut client]);
    }
    let after = relay.stats();
    let (up, down) = (after.to_server, after.to_client);
    assert_eq!(up.received - s.to_server.received, n);
    assert_binomial("relay loss to server", up.dropped, n, 0.10);
    assert_binomial("relay loss to client", down.dropped, down.received - 500, 0.20);
    // End to end, a round trip survives both: (1 − 0.1)(1 − 0.2) = 72 %.
    let back = client.echoes.len() as u64 - 500;
    assert_binomial("relay round trips completed", back, n, 0.9 * 0.8);
    assert_eq!(up.duplicated + up.reordered + down.duplicated + down.reordered, 0, "only loss configured");
}

#[test]
fn relay_delay_is_never_shorter_than_configured_and_jitter_reorders() {
    let seed = seed_from_env(0x7a2d_de1a);
    let link = Link { delay: 50 * MS, jitter: 20 * MS, ..Link::default() };
    let (echo, relay, mut client) = setup(RelayConfig::symmetric(seed, link));
    for _ in 0..10 {
        client.burst(20, 64);
        settle(&relay, &echo, &mut [&mut client]);
    }
    let one_way: Vec<Duration> = echo.arrivals().iter().map(|a| a.at - a.sent).collect();
    let rtt: Vec<Duration> = client.echoes.iter().map(|a| a.at - a.sent).collect();
    assert_eq!((one_way.len(), rtt.len()), (200, 200));
    for (what, mut v, floor) in [("one-way", one_way, 50 * MS), ("round trip", rtt, 100 * MS)] {
        v.sort();
        let (min, med, max) = (v[0], v[v.len() / 2], v[v.len() - 1]);
        eprintln!("{what}: min {:.1} ms, median {:.1} ms, max {:.1} ms", millis(min), millis(med), millis(max));
        assert!(min >= floor, "{what} of {min:?} is shorter than the configured {floor:?}");
    }
    // 20 datagrams sent back to back with 0–20 ms of jitter each cannot all keep their order.
    let (dups, reorders) = observed_dups_and_reorders(&echo.arrivals());
    let s = relay.stats();
    eprintln!("jitter reordered {reorders} of 200 datagrams");
    assert_eq!((dups, reorders), (0, s.to_server.reordered), "the echo server saw what the relay counted");
    assert!(reorders > 0, "20 ms of jitter reordered nothing");
}

#[test]
fn relay_duplicates_and_reorders_as_configured() {
    let seed = seed_from_env(0x7a2d_d0b1);
    let to_server = Link { duplicate: 0.05, reorder: 0.05, reorder_hold: 5 * MS, ..Link::default() };
    let (echo, relay, mut client) = setup(RelayConfig { seed, to_server, to_client: Link::default() });
    let n = 2000;
    for _ in 0..n / 50 {
        client.burst(50, 64);
        settle(&relay, &echo, &mut [&mut client]);
    }
    let s = relay.stats().to_server;
    let (dups, reorders) = observed_dups_and_reorders(&echo.arrivals());
    assert_eq!((dups, reorders), (s.duplicated, s.reordered), "the echo server saw what the relay counted");
    assert_eq!(echo.count(), n + dups);
    assert_binomial("relay duplication", dups, n, 0.05);
    // A held datagram is overtaken by the rest of its burst unless it is the burst's last one, so
    // about 5 % of the copies are reordered; never more, and far more than none.
    let copies = n + dups;
    eprintln!("relay reordering: {reorders} of {copies} copies");
    assert!(reorders as f64 <= copies as f64 * 0.05 + 5.0 * (copies as f64 * 0.05 * 0.95).sqrt());
    assert!(reorders as f64 >= copies as f64 * 0.05 / 2.0, "only {reorders} of {copies} reordered");
    assert_eq!(s.dropped, 0);
}

#[test]
fn relay_outage_drops_everything_then_recovers() {
    let seed = seed_from_env(0x7a2d_0ff1);
    let (echo, relay, mut client) = setup(RelayConfig::symmetric(seed, Link::default()));
    client.burst(20, 64);
    settle(&relay, &echo, &mut [&mut client]);

    // Switched by hand: everything sent while down is lost, in both directions.
    relay.set_outage(true);
    for _ in 0..5 {
        client.burst(20, 64);
        let s = settle(&relay, &echo, &mut [&mut client]);
        assert_eq!((echo.count(), client.echoes.len()), (20, 20), "nothing crosses a link that is down");
        assert_eq!(s.to_server.outage_dropped, client.sent.len() as u64 - 20);
    }
    relay.set_outage(false);
    client.burst(20, 64);
    settle(&relay, &echo, &mut [&mut client]);
    assert_eq!((echo.count(), client.echoes.len()), (40, 40), "the link works again");

    // Scheduled: a datagram sent during the window crosses only after the window (the relay may
    // hold it) or not at all, and everything sent after the window comes back.
    let window = relay.schedule_outage(300 * MS, 1000 * MS);
    let (start, end) = (window.start - client.epoch, window.end - client.epoch);
    while Instant::now() < window.end + 300 * MS {
        client.burst(1, 64);
        std::thread::sleep(5 * MS); // Pacing, not synchronisation.
        client.drain();
    }
    let s = settle(&relay, &echo, &mut [&mut client]);
    let lost = s.to_server.outage_dropped + s.to_client.outage_dropped - 100;
    let during = client.sent.iter().filter(|t| (start..end).contains(t)).count();
    let after = client.sent.iter().filter(|t| **t >= end).count();
    eprintln!("scheduled outage: {during} datagrams sent during it, {lost} lost, {after} sent after");
    assert!(lost > 0 && after > 0, "the window was missed: {s:?}");
    for a in echo.arrivals().iter().filter(|a| a.sent >= start) {
        assert!(a.at >= end, "datagram {} sent at {:?} crossed during the outage ({:?})", a.seq, a.sent, a.at);
    }
    let back: HashSet<u64> = client.echoes.iter().map(|a| a.seq).collect();
    for (seq, t) in client.sent.iter().enumerate().filter(|(_, t)| **t >= end) {
        assert!(back.contains(&(seq as u64)), "datagram {seq} sent at {t:?}, after the outage, was lost");
    }
}

#[test]
fn relay_follows_a_client_that_changes_address() {
    let (echo, relay, mut first) = setup(RelayConfig::symmetric(seed_from_env(1), Link::default()));
    let mut second = Client::new(loopback(), relay.addr(), first.epoch);
    first.burst(5, 64);
    settle(&relay, &echo, &mut [&mut first, &mut second]);
    assert_eq!(relay.client(), Some(first.sock.local_addr().unwrap()));
    // A reconnecting client opens a new socket: its replies must go there.
    second.burst(5, 64);
    settle(&relay, &echo, &mut [&mut first, &mut second]);
    assert_eq!(relay.client(), Some(second.sock.local_addr().unwrap()));
    assert_eq!((first.echoes.len(), second.echoes.len()), (5, 5));
    first.burst(5, 64);
    let s = settle(&relay, &echo, &mut [&mut first, &mut second]);
    assert_eq!((first.echoes.len(), second.echoes.len(), s.client_changes), (10, 5, 3));
}

#[test]
fn relay_rate_cap_paces_and_its_queue_overflows() {
    let seed = seed_from_env(0x7a2d_ba4d);
    let rate = 100_000; // bytes per second
    let link = Link { rate: Some(rate), queue: 2000 * MS, ..Link::default() };
    let (echo, relay, mut client) = setup(RelayConfig { seed, to_server: link, to_client: Link::default() });
    for _ in 0..4 {
        client.burst(25, 1000);
    }
    let s = settle(&relay, &echo, &mut [&mut client]).to_server;
    assert_eq!((s.forwarded, s.queue_dropped), (100, 0));
    // The link carries each datagram for len/rate, one after the other, from the first arrival.
    let took = echo.arrivals().last().unwrap().at - client.sent[0];
    let floor = Duration::from_secs_f64(s.bytes_forwarded as f64 / rate as f64);
    eprintln!("rate cap {rate} B/s: {} bytes in {:.0} ms", s.bytes_forwarded, millis(took));
    assert!(took >= floor, "{} bytes crossed in {took:?}, faster than the cap allows ({floor:?})", s.bytes_forwarded);

    // A short queue: a burst longer than it is cut.
    relay.set_link(Direction::ToServer, Link { rate: Some(rate), queue: 50 * MS, ..Link::default() });
    client.burst(40, 1000);
    let after = settle(&relay, &echo, &mut [&mut client]).to_server;
    let (fwd, cut) = (after.forwarded - s.forwarded, after.queue_dropped);
    eprintln!("50 ms queue: {fwd} of 40 forwarded, {cut} dropped");
    assert!(cut > 0 && fwd + cut == 40, "{after:?}");
}

#[test]
fn relay_drop_stops_its_threads_and_frees_its_port() {
    let (echo, relay, mut client) = setup(RelayConfig::symmetric(seed_from_env(2), Link::default()));
    client.burst(3, 64);
    settle(&relay, &echo, &mut [&mut client]);
    let addr = relay.addr();
    drop(relay);
    // Both threads held a handle of the client-facing socket: the port is free only once both
    // have returned and the relay's own handle is closed.
    UdpSocket::bind(addr).expect("the relay's port is free after drop");
}

/// An echo server in `B`, a client in `A`, and the pair.
fn netns_setup(tag: &str) -> (NetnsPair, Echo, Client) {
    let pair = NetnsPair::create(tag).expect("create namespaces");
    let epoch = Instant::now();
    let echo = Echo::start(pair.udp_socket(Side::B, 0).expect("socket in B"), epoch);
    let client = Client::new(pair.udp_socket(Side::A, 0).expect("socket in A"), echo.addr, epoch);
    (pair, echo, client)
}

#[test]
fn netns_loss_at_30_percent_and_teardown() {
    if !netns::skip_unless_available("netns_loss_at_30_percent_and_teardown") {
        return;
    }
    let (pair, echo, mut client) = netns_setup("loss");
    let names = [pair.name(Side::A).to_owned(), pair.name(Side::B).to_owned()];
    assert!(names.iter().all(|n| netns::exists(n)));
    // Addresses live only inside the namespaces, and programs run there.
    let out = pair.command(Side::B, "ip").args(["-4", "-o", "addr", "show", "dev", netns::IFACE]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.201.0.2/30"), "{out:?}");
    let host = std::process::Command::new("ip").args(["-4", "-o", "addr"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&host.stdout).contains("10.201.0."), "the host's network was changed");

    // Datagrams out of `lossy` are dropped, the others not; wait until the echo server's count
    // plus the rule's drops account for every datagram, and the client got every echo back.
    let mut phase = |lossy: Side, percent: u8, n: u64| -> (u64, u64, u64) {
        pair.set_loss(lossy, percent).unwrap();
        pair.set_loss(lossy.peer(), 0).unwrap();
        let (sent0, echoed0, back0) = (client.sent.len() as u64, echo.count(), client.echoes.len() as u64);
        for _ in 0..n / 50 {
            client.burst(50, 64);
            let sent = client.sent.len() as u64;
            wait_for("datagrams to cross the veth", || {
                client.drain();
                let up = pair.loss_dropped(Side::A).unwrap();
                let down = pair.loss_dropped(Side::B).unwrap();
                echo.count() + up == sent - sent0 + echoed0
                    && client.echoes.len() as u64 + down == echo.count() - echoed0 + back0
            });
        }
        (echo.count() - echoed0, client.echoes.len() as u64 - back0, pair.loss_dropped(lossy).unwrap())
    };
    assert_eq!(phase(Side::A, 0, 200), (200, 200, 0), "no loss configured, none measured");
    let (crossed, back, dropped) = phase(Side::A, 30, 2000);
    assert_eq!((crossed + dropped, back), (2000, crossed));
    assert_binomial("nftables loss A to B", dropped, 2000, 0.30);
    let (crossed, back, dropped) = phase(Side::B, 30, 2000);
    assert_eq!((crossed, back + dropped), (2000, 2000));
    assert_binomial("nftables loss B to A", dropped, 2000, 0.30);

    drop(client);
    drop(echo);
    drop(pair);
    let list = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    for n in &names {
        assert!(!netns::exists(n), "{n} survived the drop");
        assert!(!String::from_utf8_lossy(&list.stdout).contains(n.as_str()), "{n} still listed");
    }
}

#[test]
fn netns_rate_limit_paces_traffic() {
    if !netns::skip_unless_available("netns_rate_limit_paces_traffic") {
        return;
    }
    let (pair, echo, mut client) = netns_setup("rate");
    let limit = RateLimit { bits_per_sec: 1_000_000, burst_bytes: 10_000, latency: 200 * MS };
    pair.set_rate(Side::A, limit).unwrap();
    // Bursts no bigger than the bucket and queue can hold, so tbf delays and never drops: every
    // datagram must arrive, and the waits then show the rate.
    let n = 150;
    for _ in 0..n / 10 {
        client.burst(10, 1000);
        let sent = client.sent.len() as u64;
        wait_for("datagrams through tbf", || {
            client.drain();
            echo.count() == sent && client.echoes.len() as u64 == sent
        });
    }
    let took = echo.arrivals().last().unwrap().at - client.sent[0];
    // tbf lets one bucket through at once, then at most the rate (payload only: headers also
    // count against the rate, so this floor is lower than the real one).
    let bytes = n as u64 * 1000;
    let floor =
        Duration::from_secs_f64((bytes - u64::from(limit.burst_bytes)) as f64 * 8.0 / limit.bits_per_sec as f64);
    eprintln!("tbf 1 Mbit/s: {bytes} bytes in {:.0} ms (floor {:.0} ms)", millis(took), millis(floor));
    assert!(took >= floor, "{bytes} bytes took {took:?}, faster than the limit allows ({floor:?})");
}

#[test]
fn netns_torn_down_after_a_panic() {
    if !netns::skip_unless_available("netns_torn_down_after_a_panic") {
        return;
    }
    let names = Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let pair = NetnsPair::create("panic").expect("create namespaces");
        pair.set_loss(Side::A, 50).unwrap();
        names.lock().unwrap().extend([pair.name(Side::A).to_owned(), pair.name(Side::B).to_owned()]);
        assert!(netns::exists(pair.name(Side::A)));
        panic!("deliberate panic with the namespaces alive");
    });
    assert!(result.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 2);
    for n in &names {
        assert!(!netns::exists(n), "{n} survived a panic");
    }
}

#[test]
fn netns_relay_inside_a_namespace_adds_delay_to_kernel_loss() {
    if !netns::skip_unless_available("netns_relay_inside_a_namespace_adds_delay_to_kernel_loss") {
        return;
    }
    // The relay (delay) runs in A next to the client; nftables drops between A and B (loss).
    let (pair, echo, mut client) = netns_setup("both");
    let config = RelayConfig::symmetric(seed_from_env(0x7a2d_b070), Link { delay: 25 * MS, ..Link::default() });
    let relay = pair.run(Side::A, || Relay::start(echo.addr, config)).unwrap().expect("relay in A");
    client.to = relay.addr();
    pair.set_loss(Side::A, 20).unwrap();
    pair.set_loss(Side::B, 0).unwrap();
    let n = 1000;
    for _ in 0..n / 50 {
        client.burst(50, 64);
        settle_with_kernel_loss(&relay, &echo, &mut [&mut client], || {
            (pair.loss_dropped(Side::A).unwrap(), pair.loss_dropped(Side::B).unwrap())
        });
    }
    let s = relay.stats();
    assert_eq!((s.to_server.dropped, s.to_client.dropped), (0, 0), "the relay itself loses nothing here");
    assert_binomial("nftables loss behind the relay", pair.loss_dropped(Side::A).unwrap(), n, 0.20);
    let min_rtt = client.echoes.iter().map(|a| a.at - a.sent).min().expect("some echoes");
    eprintln!("relay in a namespace: shortest round trip {:.1} ms", millis(min_rtt));
    assert!(min_rtt >= 50 * MS, "a round trip of {min_rtt:?} beat the relay's 2 × 25 ms");
}
