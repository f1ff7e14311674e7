//! End-to-end tests of the impairment proxy over real loopback sockets.
//! Bounds are generous: the machine running them may be loaded.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use impair::{Burst, Direction, Impairment, Proxy, ProxyConfig, Stats};

fn udp() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let _ = socket2::SockRef::from(&s).set_recv_buffer_size(8 << 20);
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    s
}

/// A received datagram and when it arrived.
type Received = (Instant, Vec<u8>);

/// A socket whose received datagrams are collected (with receive time) by a
/// background thread; optionally echoes them back.
struct Peer {
    sock: Arc<UdpSocket>,
    got: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Peer {
    fn new(echo: bool) -> Peer {
        let sock = Arc::new(udp());
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (sock, got, stop) = (sock.clone(), got.clone(), stop.clone());
            thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        let now = Instant::now();
                        if echo {
                            sock.send_to(&buf[..n], from).unwrap();
                        } else {
                            got.lock().unwrap().push((now, buf[..n].to_vec()));
                        }
                    }
                }
            })
        };
        Peer {
            sock,
            got,
            stop,
            thread: Some(thread),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    fn take(&self) -> Vec<(Instant, Vec<u8>)> {
        std::mem::take(&mut *self.got.lock().unwrap())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A packet: 8-byte big-endian sequence number, then `len - 8` bytes derived
/// from it.
fn packet(seq: u64, len: usize) -> Vec<u8> {
    let mut p = seq.to_be_bytes().to_vec();
    p.extend((0..len.saturating_sub(8)).map(|i| (seq as usize * 31 + i) as u8));
    p
}

fn seq_of(p: &[u8]) -> u64 {
    u64::from_be_bytes(p[..8].try_into().unwrap())
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    cond()
}

fn proxy(upstream: SocketAddr, seed: u64, up: Impairment, down: Impairment) -> Proxy {
    Proxy::start(ProxyConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream,
        to_upstream: up,
        to_client: down,
        seed,
    })
    .unwrap()
}

/// Sends `n` packets of `len` bytes (sequence numbers from `first`), in bursts
/// of `burst` with a 1 ms pause, so no socket buffer overflows.
fn send_many(from: &UdpSocket, to: SocketAddr, first: u64, n: u64, len: usize, burst: u64) {
    for seq in first..first + n {
        from.send_to(&packet(seq, len), to).unwrap();
        if (seq - first + 1).is_multiple_of(burst) {
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Like [`send_many`] towards the proxy, but also never lets more than a few
/// hundred datagrams wait in a kernel buffer (proxy's or sink's), so a
/// starved thread on a loaded machine cannot cause kernel drops that would
/// look like proxy losses.
fn send_flow_controlled(from: &UdpSocket, p: &Proxy, sink: &Peer, n: u64, len: usize) {
    const WINDOW: u64 = 200;
    for seq in 0..n {
        from.send_to(&packet(seq, len), p.local_addr()).unwrap();
        if (seq + 1).is_multiple_of(25) {
            thread::sleep(Duration::from_millis(1));
            let caught_up = wait_until(Duration::from_secs(10), || {
                let d = p.stats().to_upstream;
                d.packets_in + WINDOW > seq + 1 && (sink.count() as u64) + WINDOW > d.forwarded
            });
            assert!(caught_up, "proxy or sink stuck: {}", p.stats());
        }
    }
}

/// Waits until every packet that entered `dir` is forwarded or dropped and
/// none is pending.
fn settle(p: &Proxy, dir: Direction, expected_in: u64) -> Stats {
    let ok = wait_until(Duration::from_secs(20), || {
        let s = p.stats();
        let d = s.dir(dir);
        d.packets_in == expected_in
            && d.pending == 0
            && d.forwarded + d.dropped_loss + d.dropped_queue + d.dropped_overflow + d.send_errors
                == expected_in
    });
    let s = p.stats();
    assert!(ok, "proxy did not settle: {s}");
    s
}

#[test]
fn forwards_both_ways_for_several_clients() {
    let echo = Peer::new(true);
    let p = proxy(echo.addr(), 1, Impairment::none(), Impairment::none());
    assert_ne!(p.local_addr().port(), 0);
    let clients: Vec<Peer> = (0..3).map(|_| Peer::new(false)).collect();
    let n = 500u64;
    for (c, client) in clients.iter().enumerate() {
        let first = c as u64 * 1_000_000;
        // Varying sizes, up to a large 8 KiB datagram.
        for seq in first..first + n {
            let len =
                8 + (seq as usize * 37) % 1400 + if seq.is_multiple_of(100) { 7000 } else { 0 };
            client
                .sock
                .send_to(&packet(seq, len), p.local_addr())
                .unwrap();
            if seq % 20 == 0 {
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
    assert!(wait_until(Duration::from_secs(10), || clients
        .iter()
        .all(|c| c.count() >= n as usize)));
    for (c, client) in clients.iter().enumerate() {
        let first = c as u64 * 1_000_000;
        let got: Vec<Vec<u8>> = client.take().into_iter().map(|(_, d)| d).collect();
        assert_eq!(got.len(), n as usize, "client {c}");
        for (i, d) in got.iter().enumerate() {
            let seq = seq_of(d);
            assert_eq!(
                seq,
                first + i as u64,
                "client {c}: order kept without jitter"
            );
            let len =
                8 + (seq as usize * 37) % 1400 + if seq.is_multiple_of(100) { 7000 } else { 0 };
            assert_eq!(*d, packet(seq, len), "client {c}: payload intact");
        }
    }
    let s = p.stats();
    assert_eq!(s.clients, 3);
    for d in [s.to_upstream, s.to_client] {
        assert_eq!(d.packets_in, 3 * n);
        assert_eq!(d.forwarded, 3 * n);
        assert_eq!(d.dropped_loss + d.dropped_queue + d.dropped_overflow, 0);
        assert_eq!(d.bytes_forwarded, d.bytes_in);
    }
    p.stop();
}

/// Runs 5,000 packets through 10 % loss; returns the lost sequence numbers.
fn lost_with_seed(seed: u64) -> BTreeSet<u64> {
    let sink = Peer::new(false);
    let up = Impairment {
        loss: 0.1,
        ..Impairment::none()
    };
    let p = proxy(sink.addr(), seed, up, Impairment::none());
    let client = udp();
    let n = 5_000u64;
    send_flow_controlled(&client, &p, &sink, n, 100);
    let s = settle(&p, Direction::ToUpstream, n);
    let d = s.to_upstream;
    assert!(wait_until(Duration::from_secs(5), || sink.count()
        == d.forwarded as usize));
    let received: BTreeSet<u64> = sink.take().iter().map(|(_, d)| seq_of(d)).collect();
    let lost: BTreeSet<u64> = (0..n).filter(|s| !received.contains(s)).collect();
    assert_eq!(
        lost.len() as u64,
        d.dropped_loss,
        "every loss is the proxy's: {s}"
    );
    assert_eq!(d.dropped_queue + d.dropped_overflow + d.send_errors, 0);
    lost
}

#[test]
fn seeded_loss_rate_and_determinism() {
    let a = lost_with_seed(1234);
    assert!(
        (400..=600).contains(&a.len()),
        "lost {} of 5000, expected 8..12 %",
        a.len()
    );
    let b = lost_with_seed(1234);
    assert_eq!(a, b, "same seed, same lost packets");
    let c = lost_with_seed(4321);
    assert_ne!(a, c, "another seed, other lost packets");
}

#[test]
fn jitter_reorders_and_delay_is_a_floor() {
    let sink = Peer::new(false);
    let delay = Duration::from_millis(30);
    let up = Impairment {
        delay,
        jitter: Duration::from_millis(20),
        ..Impairment::none()
    };
    let p = proxy(sink.addr(), 9, up, Impairment::none());
    let client = udp();
    let n = 300u64;
    let mut sent_at = Vec::new();
    for seq in 0..n {
        sent_at.push(Instant::now());
        client.send_to(&packet(seq, 200), p.local_addr()).unwrap();
        thread::sleep(Duration::from_millis(1));
    }
    settle(&p, Direction::ToUpstream, n);
    assert!(wait_until(Duration::from_secs(5), || sink.count() == n as usize));
    let got = sink.take();
    let mut max_seen = None;
    let mut out_of_order = 0;
    for (at, d) in &got {
        let seq = seq_of(d);
        let waited = *at - sent_at[seq as usize];
        assert!(waited >= delay, "packet {seq} took {waited:?} < {delay:?}");
        assert!(
            waited < Duration::from_secs(2),
            "packet {seq} took {waited:?}"
        );
        if max_seen.is_some_and(|m| seq < m) {
            out_of_order += 1;
        }
        max_seen = max_seen.max(Some(seq));
    }
    assert!(out_of_order >= 10, "only {out_of_order} reordered packets");
}

#[test]
fn delay_applies_to_each_direction() {
    let echo = Peer::new(true);
    let delay = Duration::from_millis(15);
    let imp = Impairment {
        delay,
        ..Impairment::none()
    };
    let p = proxy(echo.addr(), 2, imp.clone(), imp);
    let client = udp();
    let mut buf = [0u8; 64];
    for seq in 0..20u64 {
        let t = Instant::now();
        client.send_to(&packet(seq, 16), p.local_addr()).unwrap();
        let deadline = t + Duration::from_secs(2);
        loop {
            assert!(Instant::now() < deadline, "no echo for {seq}");
            if let Ok(n) = client.recv(&mut buf) {
                assert_eq!(seq_of(&buf[..n]), seq);
                break;
            }
        }
        let rtt = t.elapsed();
        assert!(rtt >= 2 * delay, "rtt {rtt:?}");
    }
}

/// Offers `pps` packets/s of `len` bytes for `dur`; returns packets sent.
fn offer(from: &UdpSocket, to: SocketAddr, first: u64, pps: f64, len: usize, dur: Duration) -> u64 {
    let t0 = Instant::now();
    let mut sent = 0u64;
    while t0.elapsed() < dur {
        let due = (t0.elapsed().as_secs_f64() * pps) as u64 + 1;
        while sent < due {
            from.send_to(&packet(first + sent, len), to).unwrap();
            sent += 1;
        }
        thread::sleep(Duration::from_millis(1));
    }
    sent
}

/// Bytes per second between the first and the last packet received
/// (counting the bytes after the first one).
fn receive_rate(got: &[(Instant, Vec<u8>)]) -> f64 {
    let (first, last) = (got.first().unwrap().0, got.last().unwrap().0);
    let bytes: usize = got[1..].iter().map(|(_, d)| d.len()).sum();
    bytes as f64 / (last - first).as_secs_f64()
}

#[test]
fn rate_cap_holds_and_lifting_it_recovers() {
    let sink = Peer::new(false);
    let cap_bps = 800_000u64; // 100 kB/s
    let up = Impairment {
        rate_bps: Some(cap_bps),
        queue_bytes: 32 * 1024,
        ..Impairment::none()
    };
    let p = proxy(sink.addr(), 3, up, Impairment::none());
    let client = udp();
    let len = 1000;

    // Phase 1: offer 400 kB/s, four times the cap, for 2 s.
    let sent1 = offer(
        &client,
        p.local_addr(),
        0,
        400.0,
        len,
        Duration::from_secs(2),
    );
    let s1 = settle(&p, Direction::ToUpstream, sent1);
    assert!(wait_until(Duration::from_secs(5), || sink.count()
        == s1.to_upstream.forwarded as usize));
    let got1 = sink.take();
    let rate1 = receive_rate(&got1);
    eprintln!("capped: {rate1:.0} B/s; {s1}");
    let cap = cap_bps as f64 / 8.0;
    assert!(
        (0.75 * cap..=1.25 * cap).contains(&rate1),
        "capped receive rate {rate1:.0} B/s vs cap {cap:.0} B/s ({s1})"
    );
    assert!(
        s1.to_upstream.dropped_queue > 0,
        "queue drops counted: {s1}"
    );
    assert_eq!(s1.to_upstream.dropped_loss, 0);

    // Phase 2: lift the cap; the same offered load goes through.
    p.set(Direction::ToUpstream, Impairment::none());
    assert_eq!(p.impairment(Direction::ToUpstream).rate_bps, None);
    let sent2 = offer(
        &client,
        p.local_addr(),
        1_000_000,
        400.0,
        len,
        Duration::from_secs(1),
    );
    let s2 = settle(&p, Direction::ToUpstream, sent1 + sent2);
    assert!(wait_until(Duration::from_secs(5), || sink.count()
        == (s2.to_upstream.forwarded - s1.to_upstream.forwarded)
            as usize));
    let got2 = sink.take();
    assert_eq!(
        s2.to_upstream.dropped_queue, s1.to_upstream.dropped_queue,
        "no queue drops without a cap"
    );
    assert_eq!(got2.len() as u64, sent2);
    let rate2 = receive_rate(&got2);
    eprintln!("uncapped: {rate2:.0} B/s");
    assert!(
        rate2 > 2.5 * cap,
        "uncapped receive rate {rate2:.0} B/s should be near the offered 400 kB/s"
    );
}

fn longest_run(lost: &BTreeSet<u64>) -> usize {
    let (mut longest, mut run, mut prev) = (0, 0, None);
    for &x in lost {
        run = if prev.is_some_and(|p| p + 1 == x) {
            run + 1
        } else {
            1
        };
        longest = longest.max(run);
        prev = Some(x);
    }
    longest
}

#[test]
fn burst_loss_loses_runs() {
    let sink = Peer::new(false);
    let up = Impairment {
        burst: Some(Burst {
            p_enter: 0.05,
            p_leave: 0.3,
            loss_in_burst: 1.0,
        }),
        ..Impairment::none()
    };
    let p = proxy(sink.addr(), 77, up, Impairment::none());
    let client = udp();
    let n = 3_000u64;
    send_flow_controlled(&client, &p, &sink, n, 64);
    let s = settle(&p, Direction::ToUpstream, n);
    assert!(wait_until(Duration::from_secs(5), || sink.count()
        == s.to_upstream.forwarded as usize));
    let received: BTreeSet<u64> = sink.take().iter().map(|(_, d)| seq_of(d)).collect();
    let lost: BTreeSet<u64> = (0..n).filter(|s| !received.contains(s)).collect();
    assert_eq!(lost.len() as u64, s.to_upstream.dropped_loss);
    // Stationary share of the bad state: 0.05 / 0.35 ~ 14 %.
    assert!(
        (150..=900).contains(&lost.len()),
        "lost {} of {n}",
        lost.len()
    );
    let longest = longest_run(&lost);
    assert!(longest >= 4, "longest run of losses {longest}");
}

#[test]
fn invalid_impairment_is_rejected() {
    let bad = Impairment {
        loss: 1.5,
        ..Impairment::none()
    };
    let err = Proxy::start(ProxyConfig {
        to_client: bad,
        ..ProxyConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:9".parse().unwrap(),
        )
    })
    .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!("0.1,0.5".parse::<Burst>().is_err());
    assert!("0.1,0.5,2".parse::<Burst>().is_err());
    assert_eq!(
        "0.1, 0.5,1".parse::<Burst>().unwrap(),
        Burst {
            p_enter: 0.1,
            p_leave: 0.5,
            loss_in_burst: 1.0
        }
    );
}

#[test]
fn binary_prints_address_forwards_and_writes_stats() {
    let echo = Peer::new(true);
    let dir = std::env::temp_dir().join(format!("impair-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let stats_file = dir.join("stats.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard-impair"))
        .args(["--listen", "127.0.0.1:0", "--upstream"])
        .arg(echo.addr().to_string())
        .args(["--delay-ms", "2", "--down-loss", "0", "--stats-file"])
        .arg(&stats_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let expected_tail = format!(" -> {}\n", echo.addr());
    assert!(
        line.starts_with("impair listening on ") && line.ends_with(&expected_tail),
        "{line:?}"
    );
    let addr: SocketAddr = line["impair listening on ".len()..line.len() - expected_tail.len()]
        .parse()
        .unwrap();

    let client = Peer::new(false);
    send_many(&client.sock, addr, 0, 100, 100, 10);
    assert!(wait_until(Duration::from_secs(5), || client.count() == 100));

    // The stats file is rewritten every second.
    let forwarded = || -> Option<u64> {
        let text = std::fs::read_to_string(&stats_file).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v["to_client"]["forwarded"].as_u64()
    };
    assert!(wait_until(Duration::from_secs(5), || forwarded() == Some(100)));

    // SIGTERM: clean exit.
    let pid = child.id() as libc::pid_t;
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
