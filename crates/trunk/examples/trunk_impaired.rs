//! Media through two real trunks with the impairment proxy between them:
//! how much of a video + audio stream arrives, how much was repaired, how
//! late, under loss, jitter and bandwidth caps — for each QUIC congestion
//! controller and loss-detection setting. A measurement, not a test: the
//! figures behind the driver's defaults (BENCHMARKS.md, ARCHITECTURE.md).
//!
//! ```text
//! cargo run --release -p trunk --example trunk_impaired -- \
//!     [--seconds 10] [--loss 0.03] [--delay-ms 20] [--jitter-ms 20] [--rate-kbps 0] [--queue-kb 64] \
//!     [--video-kbps 900] [--congestion bbr|cubic|newreno] [--packet-threshold N] \
//!     [--send-buffer-kb 64]
//! ```
//! One stream: video (1,100-byte RTP packets at `--video-kbps`) and audio
//! (120-byte packets every 20 ms) from node A to node B; B dials A through
//! the proxy, so both directions of the trunk are impaired alike. Prints one
//! Markdown table row.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use impair::{Direction, Impairment, Proxy, ProxyConfig};
use trunk::proto::{
    CodecParams, Config, Event, Layer, NodeId, ParticipantId, ParticipantInfo, RoomName, TrackId,
    TrackInfo, TrackKind, TrackSource, WireId,
};
use trunk::quic::{Congestion, Identity, Trunk, TrunkConfig, TrunkEvent, TrunkEvents, Tuning};

const SECRET: &str = "Impaired-Trunk_Measurement-2Xq7Vz9K";
const VIDEO: TrackId = TrackId(1);
const AUDIO: TrackId = TrackId(2);

struct Args {
    seconds: u64,
    loss: f64,
    delay_ms: f64,
    jitter_ms: f64,
    rate_kbps: u64,
    queue_kb: usize,
    video_kbps: u64,
    congestion: Congestion,
    tuning: Tuning,
}

fn args() -> Args {
    let mut a = Args {
        seconds: 10,
        loss: 0.0,
        delay_ms: 0.0,
        jitter_ms: 0.0,
        rate_kbps: 0,
        queue_kb: 64,
        video_kbps: 900,
        congestion: Congestion::default(),
        tuning: Tuning::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().unwrap_or_default();
        match flag.as_str() {
            "--seconds" => a.seconds = v.parse().expect("seconds"),
            "--loss" => a.loss = v.parse().expect("loss"),
            "--delay-ms" => a.delay_ms = v.parse().expect("delay"),
            "--jitter-ms" => a.jitter_ms = v.parse().expect("jitter"),
            "--rate-kbps" => a.rate_kbps = v.parse().expect("rate"),
            "--queue-kb" => a.queue_kb = v.parse().expect("queue"),
            "--video-kbps" => a.video_kbps = v.parse().expect("video rate"),
            "--packet-threshold" => a.tuning.packet_threshold = v.parse().expect("threshold"),
            "--send-buffer-kb" => {
                a.tuning.datagram_send_buffer = v.parse::<usize>().expect("kb") * 1024
            }
            "--congestion" => {
                a.congestion = match v.as_str() {
                    "bbr" => Congestion::Bbr,
                    "cubic" => Congestion::Cubic,
                    "newreno" => Congestion::NewReno,
                    other => panic!("unknown congestion controller {other}"),
                }
            }
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn track(kind: TrackKind) -> TrackInfo {
    TrackInfo {
        participant: ParticipantId(1),
        kind,
        source: TrackSource::Camera,
        codec: CodecParams {
            mime_type: if kind == TrackKind::Video {
                "video/VP8".into()
            } else {
                "audio/opus".into()
            },
            clock_rate: 90_000,
            channels: None,
            payload_type: 96,
            fmtp: String::new(),
        },
        layers: vec![String::new()],
    }
}

/// An RTP packet of `len` bytes whose payload carries its send time.
fn rtp(seq: u16, len: usize, sent_us: u64) -> Bytes {
    let mut p = vec![0u8; len];
    p[0] = 0x80;
    p[1] = 96;
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p[12..20].copy_from_slice(&sent_us.to_le_bytes());
    Bytes::from(p)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    let start = |id, peers| {
        Trunk::start(TrunkConfig {
            proto: Config::new(NodeId(id), "bench"),
            identity: Identity::from_secret(SECRET, NodeId(id)).unwrap(),
            bind: "127.0.0.1:0".parse().unwrap(),
            peers,
            congestion: args.congestion,
            tuning: args.tuning,
        })
        .unwrap()
    };
    let (a, mut arx) = start(1, vec![]);
    let imp = Impairment {
        loss: args.loss,
        delay: Duration::from_secs_f64(args.delay_ms / 1000.0),
        jitter: Duration::from_secs_f64(args.jitter_ms / 1000.0),
        rate_bps: (args.rate_kbps > 0).then_some(args.rate_kbps * 1000),
        queue_bytes: args.queue_kb * 1024,
        ..Impairment::none()
    };
    let mut pc = ProxyConfig::new("127.0.0.1:0".parse().unwrap(), a.local_addr());
    pc.seed = 7;
    let proxy = Proxy::start(pc).expect("proxy starts");
    let (b, mut brx) = start(2, vec![(NodeId(1), proxy.local_addr())]);
    wait(&mut arx, |e| {
        matches!(e, TrunkEvent::Proto(Event::LinkUp { .. }))
    })
    .await;
    let room = RoomName::new("bench").unwrap();
    let r = room.clone();
    b.call(move |n, now| n.open_room(r, now).unwrap())
        .await
        .unwrap();
    let r = room.clone();
    a.call(move |n, now| {
        n.open_room(r.clone(), now).unwrap();
        let p = ParticipantInfo {
            id: ParticipantId(1),
            display_name: "p".into(),
        };
        n.participant_joined(&r, p).unwrap();
        n.publish_track(&r, VIDEO, track(TrackKind::Video)).unwrap();
        n.publish_track(&r, AUDIO, track(TrackKind::Audio)).unwrap();
    })
    .await
    .unwrap();
    let mut kinds: HashMap<WireId, TrackKind> = HashMap::new();
    while kinds.len() < 2 {
        if let TrunkEvent::Proto(Event::RemoteTrackAdded { wire_id, track, .. }) =
            wait(&mut brx, |e| {
                matches!(e, TrunkEvent::Proto(Event::RemoteTrackAdded { .. }))
            })
            .await
        {
            kinds.insert(wire_id, track.kind);
        }
    }
    for w in kinds.keys().copied() {
        let r = room.clone();
        b.call(move |n, _| n.subscribe(&r, NodeId(1), w, Layer(0)).unwrap())
            .await
            .unwrap();
    }
    for _ in 0..2 {
        wait(&mut arx, |e| {
            matches!(e, TrunkEvent::Proto(Event::SubscribeRequested { .. }))
        })
        .await;
    }
    // Impair only now: the link is up and subscribed (the handshake itself
    // is not what is measured).
    proxy.set(Direction::ToUpstream, imp.clone());
    proxy.set(Direction::ToClient, imp);

    let origin = Instant::now();
    let receiver = tokio::spawn(async move {
        // (kind) -> (received, latencies in µs)
        let mut got: HashMap<TrackKind, (u64, Vec<u64>)> = HashMap::new();
        while let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(2), brx.recv()).await {
            if let TrunkEvent::Media {
                wire_id, packet, ..
            } = e
            {
                let kind = kinds[&wire_id];
                let sent = u64::from_le_bytes(packet[12..20].try_into().unwrap());
                let e = got.entry(kind).or_default();
                e.0 += 1;
                e.1.push(origin.elapsed().as_micros() as u64 - sent);
            }
        }
        (got, b)
    });
    let video_pps = (args.video_kbps * 1000 / 8 / 1100).max(1);
    let video_gap = Duration::from_nanos(1_000_000_000 / video_pps);
    let audio_gap = Duration::from_millis(20);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let (mut next_v, mut next_a) = (Instant::now(), Instant::now());
    let (mut sv, mut sa) = (0u64, 0u64);
    while Instant::now() < deadline {
        let now = Instant::now();
        let us = origin.elapsed().as_micros() as u64;
        if now >= next_v {
            a.send_media(VIDEO, Layer(0), rtp(sv as u16, 1100, us), now);
            sv += 1;
            next_v += video_gap;
        }
        if now >= next_a {
            a.send_media(AUDIO, Layer(0), rtp(sa as u16, 120, us), now);
            sa += 1;
            next_a += audio_gap;
        }
        tokio::time::sleep_until(next_v.min(next_a).into()).await;
    }
    let (got, b) = receiver.await.unwrap();
    let sa_status = a.status().await.unwrap();
    let sb = b.status().await.unwrap();
    let media = sb.node.peers[&NodeId(1)].media;
    let path = sa_status.paths.get(&NodeId(2)).copied().unwrap_or_default();
    let row = |kind: TrackKind, sent: u64| {
        let (n, mut lat) = got.get(&kind).cloned().unwrap_or_default();
        lat.sort_unstable();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                .map_or(0.0, |v| *v as f64 / 1000.0)
        };
        format!(
            "{:.1} % | {:.0} / {:.0}",
            100.0 * n as f64 / sent.max(1) as f64,
            pct(0.5),
            pct(0.99)
        )
    };
    println!(
        "| {:?} | loss {} delay {}±{} ms cap {} kbps | video {} | audio {} | lost {} repaired {} given up {} late {} | video held back {} | cwnd {} congestion events {} |",
        args.congestion,
        args.loss,
        args.delay_ms + args.jitter_ms / 2.0,
        args.jitter_ms / 2.0,
        args.rate_kbps,
        row(TrackKind::Video, sv),
        row(TrackKind::Audio, sa),
        media.lost,
        media.repaired,
        media.given_up,
        media.late_drops,
        sa_status.driver.video_dropped_congestion,
        path.cwnd,
        path.congestion_events,
    );
    a.shutdown().await;
    b.shutdown().await;
    proxy.stop();
}

async fn wait(rx: &mut TrunkEvents, pred: impl Fn(&TrunkEvent) -> bool) -> TrunkEvent {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("trunk event in time")
            .expect("trunk running");
        if pred(&e) {
            return e;
        }
    }
}
