//! Rooms across a trunk that crosses a bad network: the impairment proxy
//! (`impair`) sits between node B and node A's trunk port, so both
//! directions of the trunk lose, delay and reorder datagrams, or are capped
//! in bandwidth, while the browsers' legs stay clean. What a person would
//! notice is checked with the test clients' packet records: every video
//! packet arrives intact once repair is done; under a bandwidth cap audio
//! keeps flowing, memory stays bounded and video comes back with a keyframe
//! when the cap is lifted.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{T, http_get, join, metric, reqwest_status, start};
use impair::{Direction, Impairment, Proxy, ProxyConfig};
use signal::Kind;
use signal::Source;
use switchboard::config::{Peer, Secret};
use switchboard::{Config, Node};
use testkit::{Client, MediaKind, State};

const SECRET: &str = "Impaired-Trunk_Tests-Share_9Kd2Wq";

async fn node(id: u64, peer: Option<std::net::SocketAddr>) -> Node {
    start(Config {
        trunk_port: 0,
        cluster_secret: Some(Secret(SECRET.into())),
        node_id: Some(id),
        peers: peer
            .map(|addr| Peer { node_id: 1, addr })
            .into_iter()
            .collect(),
        ..Default::default()
    })
    .await
}

/// Node A, the proxy in front of A's trunk port, node B dialing A through it.
async fn cluster(seed: u64) -> (Node, Proxy, Node) {
    let a = node(1, None).await;
    let mut pc = ProxyConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        a.trunk_addr().expect("A is clustered"),
    );
    pc.seed = seed;
    let proxy = Proxy::start(pc).expect("proxy starts");
    let b = node(2, Some(proxy.local_addr())).await;
    (a, proxy, b)
}

fn impair_both(proxy: &Proxy, imp: Impairment) {
    proxy.set(Direction::ToUpstream, imp.clone());
    proxy.set(Direction::ToClient, imp);
}

/// Ann's track of `kind` as Ben knows it.
fn track_of(s: &State, owner: &str, kind: Kind) -> Option<String> {
    s.roster
        .iter()
        .find(|p| p.id == owner)?
        .tracks
        .iter()
        .find(|t| t.kind == kind)
        .map(|t| t.id.clone())
}

/// Opus-like audio (120 B every 20 ms) and 1,000-byte video packets every
/// `video_every`.
fn publish_av(c: &mut Client, video_every: Duration) {
    c.publish(
        MediaKind::Audio,
        Source::Microphone,
        Duration::from_millis(20),
        120,
    );
    c.publish(MediaKind::Video, Source::Camera, video_every, 1000);
}

/// Sequence numbers between the first and the last received on `track`
/// that are missing, and how many that span holds.
fn missing(s: &State, track: &str) -> (Vec<u64>, u64) {
    let got: BTreeSet<u64> = s
        .tracks
        .get(track)
        .map(|v| v.iter().map(|r| r.seq).collect())
        .unwrap_or_default();
    let (Some(&first), Some(&last)) = (got.first(), got.last()) else {
        return (Vec::new(), 0);
    };
    let gaps = (first..=last).filter(|q| !got.contains(q)).collect();
    (gaps, last - first + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn video_crosses_a_lossy_reordering_trunk_intact() {
    let (a, proxy, b) = cluster(3).await;
    let mut ann = join(&a, "lossy", "Ann").await;
    let ben = join(&b, "lossy", "Ben").await;
    // 100 video packets/s (a 800 kbit/s camera) and Opus-like audio.
    publish_av(&mut ann, Duration::from_millis(10));
    let ann_id = ann.id.clone();
    ben.wait_until("Ann's video via the trunk", T, |s| {
        track_of(s, &ann_id, Kind::Video).is_some_and(|t| s.count(&t) >= 20)
    })
    .await
    .unwrap();
    // Now 3 % loss both ways plus 5–25 ms of jitter (reordering: packets
    // are 10 ms apart).
    impair_both(
        &proxy,
        Impairment {
            loss: 0.03,
            delay: Duration::from_millis(5),
            jitter: Duration::from_millis(20),
            ..Impairment::none()
        },
    );
    let video = ben.state(|s| track_of(s, &ann_id, Kind::Video)).unwrap();
    let start = ben.state(|s| s.count(&video));
    ben.wait_until("600 more video packets under loss", T, |s| {
        s.count(&video) >= start + 600
    })
    .await
    .unwrap();
    // Stop the loss, wait for the last repairs to land, then look at the
    // record: no gap may remain.
    impair_both(&proxy, Impairment::none());
    let lost_at_b = metric(&b, "switchboard_trunk_media_lost_total").await;
    let dropped_by_proxy = proxy.stats().to_client.dropped_loss;
    if ben
        .wait_until("every video packet once repair is done", T, |s| {
            missing(s, &video).0.is_empty()
        })
        .await
        .is_err()
    {
        let (gaps, span) = ben.state(|s| missing(s, &video));
        panic!(
            "Ben misses {} of {span} video packets after repair: {gaps:?}",
            gaps.len()
        );
    }
    ben.state(|s| assert_eq!(s.corrupt, 0, "corrupt payloads"));
    let repaired = metric(&b, "switchboard_trunk_media_repaired_total").await;
    let nacks = metric(&b, "switchboard_trunk_nacks_sent_total").await;
    let resent = metric(&a, "switchboard_trunk_retransmits_sent_total").await;
    assert!(
        dropped_by_proxy > 10,
        "the proxy lost only {dropped_by_proxy} datagrams towards B"
    );
    assert!(
        lost_at_b > 0 && repaired > 0,
        "lost {lost_at_b}, repaired {repaired}"
    );
    assert!(
        nacks > 0 && resent > 0,
        "NACKs {nacks}, retransmissions {resent}"
    );
    // The status API shows the same per peer, with QUIC's view of the path.
    let status = reqwest_status(&b).await;
    let trunk = &status["trunks"][0];
    assert_eq!(trunk["node_id"], 1, "{status}");
    assert!(trunk["media"]["repaired"].as_u64() > Some(0), "{status}");
    assert!(trunk["media"]["nacks_sent"].as_u64() > Some(0), "{status}");
    assert!(trunk["path"]["rtt_ms"].as_f64().is_some(), "{status}");
    assert!(trunk["path"]["cwnd_bytes"].as_u64() > Some(0), "{status}");
    a.shutdown().await;
    b.shutdown().await;
}

/// Wait until `seconds` more of audio (50 packets a second) arrived on
/// `track`: time under a condition, not a sleep.
async fn audio_for(c: &Client, track: &str, seconds: usize, what: &str) {
    let from = c.state(|s| s.count(track));
    c.wait_until(&format!("{seconds} s of audio {what}"), T, |s| {
        s.count(track) >= from + 50 * seconds
    })
    .await
    .unwrap();
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Packets received on `track` within the last `window`.
fn recent(s: &State, track: &str, window: Duration) -> usize {
    s.tracks
        .get(track)
        .map_or(0, |v| v.iter().filter(|r| r.at.elapsed() <= window).count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trunk_short_of_bandwidth_keeps_audio_and_recovers_video() {
    let (a, proxy, b) = cluster(5).await;
    let mut ann = join(&a, "narrow", "Ann").await;
    let ben = join(&b, "narrow", "Ben").await;
    // ~1.6 Mbit/s of video.
    publish_av(&mut ann, Duration::from_millis(5));
    let ann_id = ann.id.clone();
    ben.wait_until("Ann's audio and video via the trunk", T, |s| {
        [Kind::Audio, Kind::Video]
            .iter()
            .all(|k| track_of(s, &ann_id, *k).is_some_and(|t| s.count(&t) >= 20))
    })
    .await
    .unwrap();
    let (audio, video) = ben.state(|s| {
        (
            track_of(s, &ann_id, Kind::Audio).unwrap(),
            track_of(s, &ann_id, Kind::Video).unwrap(),
        )
    });
    // Cap the trunk at 600 kbit/s, far below the stream, with a shallow
    // bottleneck queue as on a real access link.
    impair_both(
        &proxy,
        Impairment {
            rate_bps: Some(600_000),
            queue_bytes: 24 * 1024,
            ..Impairment::none()
        },
    );
    // Settle on the cap, then measure memory across 4 s more under it (both
    // counted in audio packets, 50 a second, which must keep coming).
    audio_for(&ben, &audio, 2, "settling on the cap").await;
    let rss_before = rss_bytes();
    audio_for(&ben, &audio, 4, "under the cap").await;
    let rss_after = rss_bytes();
    // Audio: 50 packets/s; at least 80 % of the last 2 s arrived.
    let audio_recent = ben.state(|s| recent(s, &audio, Duration::from_secs(2)));
    assert!(
        audio_recent >= 80,
        "audio starved under the cap: {audio_recent} packets in 2 s"
    );
    let held_back = metric(&a, "switchboard_trunk_video_dropped_congestion_total").await;
    assert!(held_back > 0, "A never held video back for the cap");
    assert!(
        rss_after < rss_before + 64 * 1024 * 1024,
        "memory grew by {} MiB under the cap",
        (rss_after - rss_before) >> 20
    );
    // Lift the cap: video flows again, and the publisher was asked for a
    // keyframe so the picture recovers at once.
    let keyframes_before = ann.state(|s| s.keyframe_requests);
    impair_both(&proxy, Impairment::none());
    if let Err(e) = ben
        .wait_until("video at full rate again", T, |s| {
            recent(s, &video, Duration::from_secs(1)) >= 150
        })
        .await
    {
        let mut report = String::new();
        for (n, who) in [(&a, "A"), (&b, "B")] {
            for line in http_get(n, "/metrics").await.lines() {
                if line.starts_with("switchboard_trunk") || line.starts_with("switchboard_remote") {
                    report.push_str(&format!("{who}: {line}\n"));
                }
            }
        }
        let rate = ben.state(|s| recent(s, &video, Duration::from_secs(1)));
        panic!(
            "{e}: {rate} video packets in the last second\n{report}\n{:?}",
            proxy.stats()
        );
    }
    ann.wait_until("a keyframe request once video fits again", T, |s| {
        s.keyframe_requests > keyframes_before
    })
    .await
    .unwrap();
    assert!(metric(&a, "switchboard_trunk_video_resumed_total").await > 0);
    a.shutdown().await;
    b.shutdown().await;
}
