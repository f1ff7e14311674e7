//! Helpers shared by the media, remote-seam and cluster tests (each test
//! binary compiles this module; not every one uses every helper).
#![allow(dead_code)]

use std::time::Duration;

use switchboard::{Config, Node};

use testkit::{Client, State};

/// Bounds a hang; waits are for conditions, never for time.
pub const T: Duration = Duration::from_secs(20);

/// `RUST_LOG=str0m=debug,sfu=debug` shows what the media plane does.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A node on free ports, with `config` for the rest.
pub async fn start(config: Config) -> Node {
    init_tracing();
    Node::start(Config {
        http_port: 0,
        media_port: 0,
        ..config
    })
    .await
    .expect("node starts")
}

/// A single node on free ports.
pub async fn node() -> Node {
    start(Config::default()).await
}

pub async fn join(node: &Node, room: &str, name: &str) -> Client {
    Client::join_ws(&format!("ws://{}/ws", node.http_addr()), room, name)
        .await
        .unwrap_or_else(|e| panic!("{name} joins {room}: {e}"))
}

/// Like [`join`], with media over ICE-TCP only (no UDP candidate).
pub async fn join_tcp(node: &Node, room: &str, name: &str) -> Client {
    Client::join_ws_tcp(&format!("ws://{}/ws", node.http_addr()), room, name)
        .await
        .unwrap_or_else(|e| panic!("{name} joins {room} over TCP: {e}"))
}

/// Every packet of every received track arrived intact (the testkit drops
/// corrupted payloads, so they would show up as gaps) and in order, with no
/// gap once forwarding started.
pub fn assert_contiguous(who: &str, s: &State) {
    for (track, packets) in &s.tracks {
        for w in packets.windows(2) {
            assert_eq!(
                w[1].payload.counter,
                w[0].payload.counter + 1,
                "{who}: track {track} has a gap or reordering: {} then {} (unattributed {}, corrupt {})",
                w[0].payload.counter,
                w[1].payload.counter,
                s.unmapped,
                s.corrupt
            );
            assert_eq!(
                w[1].seq,
                w[0].seq + 1,
                "{who}: track {track} RTP sequence not contiguous"
            );
            assert_eq!(w[1].payload.track, w[0].payload.track);
        }
    }
}

/// `owner`'s `n` tracks are all flowing, with at least `min_packets` each.
pub fn has_tracks_from(s: &State, owner: &str, n: usize, min_packets: usize) -> bool {
    let tracks = s.tracks_from(owner);
    tracks.len() == n && tracks.iter().all(|t| s.count(t) >= min_packets)
}

/// The body of `GET path` with a bare HTTP/1.1 request (no client crate needed).
pub async fn http_get(node: &Node, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(node.http_addr())
        .await
        .unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or(text)
}

pub async fn reqwest_status(node: &Node) -> serde_json::Value {
    let body = http_get(node, "/api/status").await;
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// A counter of a node's `/metrics` (summed over label sets; 0 if absent).
pub async fn metric(node: &Node, name: &str) -> u64 {
    let text = http_get(node, "/metrics").await;
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Wait until a counter of `node`'s `/metrics` reaches `want`; its value.
pub async fn metric_reaches(node: &Node, name: &str, want: u64) -> u64 {
    metric_until(node, name, &format!(">= {want}"), |n| n >= want).await
}

/// Wait until a metric of `node`'s `/metrics` satisfies `ok` (`what`
/// says how, for the failure message); its value.
pub async fn metric_until(node: &Node, name: &str, what: &str, ok: impl Fn(u64) -> bool) -> u64 {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let n = metric(node, name).await;
        if ok(n) {
            return n;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}: {n}, not {what}"
        );
        // Polling interval of a condition wait (the metric moves when the
        // node handles the message; nothing to await on from outside).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
