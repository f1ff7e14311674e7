//! The ICE-TCP listener on the media port against what the network may
//! send it: garbage, STUN-looking garbage, frames naming nobody, silence,
//! more connections than allowed. Every such connection is closed by the
//! node and counted, the worker lives on, and no descriptor is left behind.
//! (Media over TCP with a real client: `crates/switchboard/tests/media.rs`.)

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use sfu::{Sfu, SfuConfig, SfuMetrics};

const T: Duration = Duration::from_secs(10);

/// The tests of this file run one at a time: one counts the process's
/// descriptors.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn start(max: usize, handshake: Duration) -> Sfu {
    Sfu::start(SfuConfig {
        max_tcp_connections: max,
        tcp_handshake_timeout: handshake,
        ..SfuConfig::default()
    })
    .expect("media plane starts")
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("the media port takes TCP");
    s.set_read_timeout(Some(T)).unwrap();
    s
}

/// Whether the node closed `s` (EOF or reset) within `T`. Whatever it sent
/// first is read and ignored: the node only ever answers a valid binding
/// request, so there should be nothing.
fn closed_by_node(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    let until = Instant::now() + T;
    while Instant::now() < until {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                return false;
            }
            Err(_) => return true,
        }
    }
    false
}

fn wait_for(what: &str, v: &AtomicU64, pred: impl Fn(u64) -> bool) {
    let until = Instant::now() + T;
    while !pred(SfuMetrics::get(v)) {
        assert!(
            Instant::now() < until,
            "{what}: still {}",
            SfuMetrics::get(v)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// xorshift64*: reproducible garbage without another dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A STUN binding request (with a bogus MESSAGE-INTEGRITY) whose
/// USERNAME is `username`.
fn binding_request(username: &str) -> Vec<u8> {
    let mut attr = Vec::new();
    attr.extend_from_slice(&0x0006u16.to_be_bytes());
    attr.extend_from_slice(&(username.len() as u16).to_be_bytes());
    attr.extend_from_slice(username.as_bytes());
    while attr.len() % 4 != 0 {
        attr.push(0);
    }
    attr.extend_from_slice(&0x0008u16.to_be_bytes());
    attr.extend_from_slice(&20u16.to_be_bytes());
    attr.extend_from_slice(&[0u8; 20]);
    let mut m = Vec::new();
    m.extend_from_slice(&0x0001u16.to_be_bytes());
    m.extend_from_slice(&(attr.len() as u16).to_be_bytes());
    m.extend_from_slice(&0x2112A442u32.to_be_bytes());
    m.extend_from_slice(&[7u8; 12]);
    m.extend_from_slice(&attr);
    m
}

fn framed(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

#[test]
fn garbage_on_the_tcp_media_port_is_closed_counted_and_leaks_nothing() {
    let _serial = serial();
    let sfu = start(64, Duration::from_secs(5));
    let addr = sfu.media_addr();
    let m = sfu.metrics();
    let fds_before = open_fds();
    let mut rng = Rng(0x5eed_1234_abcd_0001);

    // What a scanner or a confused client might send as its first bytes.
    let mut inputs: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        framed(&[0x80; 40]),                  // RTP-looking frame
        framed(&binding_request("nobody:x")), // STUN naming no participant
        framed(&rng.bytes(65_535)),           // the largest frame, garbage
        vec![0xff, 0xff],                     // a length and then nothing...
        framed(&[0x00; 20]),                  // STUN-shaped zeros
    ];
    for _ in 0..40 {
        // STUN-looking garbage (first byte 0..=3 reaches the STUN parser).
        let len = (rng.next() % 600) as usize + 1;
        let mut p = rng.bytes(len);
        p[0] &= 0x03;
        inputs.push(framed(&p));
        // Plain random bytes of random length.
        let n = (rng.next() % 3000) as usize + 1;
        inputs.push(rng.bytes(n));
    }
    let refused_before = SfuMetrics::get(&m.tcp_connections_refused);
    let mut cut = 0;
    let mut waiting = Vec::new();
    for input in &inputs {
        let mut s = connect(addr);
        // The node may close while we still write: that is fine.
        let _ = s.write_all(input);
        if input.len() >= 2
            && usize::from(u16::from_be_bytes([input[0], input[1]])) + 2 > input.len()
        {
            // An incomplete first frame: closed only at the handshake deadline.
            waiting.push(s);
            continue;
        }
        assert!(
            closed_by_node(&mut s),
            "input of {} bytes left open",
            input.len()
        );
        cut += 1;
    }
    for mut s in waiting {
        assert!(
            closed_by_node(&mut s),
            "an incomplete frame outlived the deadline"
        );
        cut += 1;
    }
    wait_for("refused", &m.tcp_connections_refused, |v| {
        v >= refused_before + cut
    });
    wait_for("open connections", &m.tcp_connections_open, |v| v == 0);
    assert!(sfu.is_running(), "the worker survived");
    assert_eq!(
        open_fds(),
        fds_before,
        "descriptors leaked (client sockets are closed by now)"
    );
    sfu.close();
}

#[test]
fn silent_and_surplus_connections_are_closed() {
    let _serial = serial();
    let sfu = start(2, Duration::from_millis(300));
    let addr = sfu.media_addr();
    let m = sfu.metrics();
    let mut a = connect(addr);
    let mut b = connect(addr);
    wait_for("two open", &m.tcp_connections_open, |v| v == 2);
    // Over the limit: closed at once.
    let mut c = connect(addr);
    assert!(closed_by_node(&mut c));
    assert_eq!(SfuMetrics::get(&m.tcp_connections_open), 2);
    // Silent past the handshake deadline: closed.
    assert!(closed_by_node(&mut a));
    assert!(closed_by_node(&mut b));
    wait_for("none open", &m.tcp_connections_open, |v| v == 0);
    assert_eq!(SfuMetrics::get(&m.tcp_connections_refused), 3);
    assert_eq!(SfuMetrics::get(&m.tcp_connections_accepted), 2);
    assert!(sfu.is_running());
    sfu.close();
}

#[test]
fn tcp_can_be_turned_off() {
    let _serial = serial();
    let sfu = Sfu::start(SfuConfig {
        tcp: false,
        ..SfuConfig::default()
    })
    .expect("starts");
    assert!(TcpStream::connect(sfu.media_addr()).is_err());
    sfu.close();
}

#[test]
fn a_taken_tcp_port_is_an_error_for_a_fixed_media_port() {
    let _serial = serial();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = Sfu::start(SfuConfig {
        media_port: port,
        ..SfuConfig::default()
    });
    // The UDP port of that number may be free; the TCP one is not.
    assert!(
        matches!(
            err,
            Err(sfu::SfuError::BindTcp { .. }) | Err(sfu::SfuError::Bind { .. })
        ),
        "started on a taken TCP port"
    );
}
