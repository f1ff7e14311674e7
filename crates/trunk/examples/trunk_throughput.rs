//! Media through two real trunks on loopback: how many 1200-byte packets per
//! second one `Trunk::send_media` caller gets across, with how much loss and
//! what one-way latency. A measurement, not a test (numbers go to
//! BENCHMARKS.md).
//!
//! `cargo run --release -p trunk --example trunk_throughput -- [packets/s] [seconds]`
//! (0 packets/s = as fast as the sender can go).

use std::time::{Duration, Instant};

use bytes::Bytes;
use trunk::proto::{
    CodecParams, Config, Event, Layer, NodeId, ParticipantId, ParticipantInfo, RoomName, TrackId,
    TrackInfo, TrackKind, TrackSource,
};
use trunk::quic::{Identity, Trunk, TrunkConfig, TrunkEvent, TrunkEvents};

const SECRET: &str = "Throughput_Measurement-8Rw3Jb5N_k";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let rate: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let start = |id, peers| {
        Trunk::start(TrunkConfig {
            proto: Config::new(NodeId(id), "bench"),
            identity: Identity::from_secret(SECRET, NodeId(id)).unwrap(),
            bind: "127.0.0.1:0".parse().unwrap(),
            peers,
            congestion: Default::default(),
            tuning: Default::default(),
        })
        .unwrap()
    };
    let (b, mut brx) = start(2, vec![]);
    let (a, mut arx) = start(1, vec![(NodeId(2), b.local_addr())]);
    let room = RoomName::new("bench").unwrap();
    wait(&mut arx, |e| {
        matches!(e, TrunkEvent::Proto(Event::LinkUp { .. }))
    })
    .await;
    let r = room.clone();
    b.call(move |n, now| n.open_room(r, now).unwrap())
        .await
        .unwrap();
    let r = room.clone();
    a.call(move |n, now| {
        n.open_room(r.clone(), now).unwrap();
        n.participant_joined(
            &r,
            ParticipantInfo {
                id: ParticipantId(1),
                display_name: "p".into(),
            },
        )
        .unwrap();
        n.publish_track(
            &r,
            TrackId(1),
            TrackInfo {
                participant: ParticipantId(1),
                kind: TrackKind::Video,
                source: TrackSource::Camera,
                codec: CodecParams {
                    mime_type: "video/VP8".into(),
                    clock_rate: 90_000,
                    channels: None,
                    payload_type: 96,
                    fmtp: String::new(),
                },
                layers: vec![String::new()],
            },
        )
        .unwrap()
    })
    .await
    .unwrap();
    let TrunkEvent::Proto(Event::RemoteTrackAdded { wire_id, .. }) = wait(&mut brx, |e| {
        matches!(e, TrunkEvent::Proto(Event::RemoteTrackAdded { .. }))
    })
    .await
    else {
        unreachable!()
    };
    let r = room.clone();
    b.call(move |n, _| n.subscribe(&r, NodeId(1), wire_id, Layer(0)).unwrap())
        .await
        .unwrap();
    wait(&mut arx, |e| {
        matches!(e, TrunkEvent::Proto(Event::SubscribeRequested { .. }))
    })
    .await;

    // Receiver: count packets and one-way latency (send time in the payload).
    let origin = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut got = 0u64;
        let mut lat = Vec::new();
        while let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(2), brx.recv()).await {
            if let TrunkEvent::Media { packet, .. } = e {
                got += 1;
                let sent = u64::from_le_bytes(packet[..8].try_into().unwrap());
                lat.push(origin.elapsed().as_micros() as u64 - sent);
            }
        }
        (got, lat)
    });
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut sent = 0u64;
    let mut payload = vec![0u8; 1200];
    let interval = (rate > 0).then(|| Duration::from_nanos(1_000_000_000 / rate));
    let mut next = Instant::now();
    while Instant::now() < deadline {
        payload[..8].copy_from_slice(&(origin.elapsed().as_micros() as u64).to_le_bytes());
        a.send_media(
            TrackId(1),
            Layer(0),
            Bytes::copy_from_slice(&payload),
            Instant::now(),
        );
        sent += 1;
        match interval {
            Some(i) => {
                next += i;
                tokio::time::sleep_until(next.into()).await;
            }
            None if sent.is_multiple_of(64) => tokio::task::yield_now().await,
            None => {}
        }
    }
    let (got, mut lat) = receiver.await.unwrap();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |v| *v as f64 / 1000.0)
    };
    let status = a.status().await.unwrap();
    println!(
        "| {} | {seconds} | {sent} | {got} | {:.0} | {:.2} % | {:.2} | {:.2} | {} | {} |",
        if rate == 0 {
            "max".to_string()
        } else {
            rate.to_string()
        },
        got as f64 / seconds as f64,
        100.0 * (sent - got) as f64 / sent.max(1) as f64,
        pct(0.5),
        pct(0.99),
        status.driver.datagrams_too_large,
        status.driver.media_queue_drops,
    );
    a.shutdown().await;
    b.shutdown().await;
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
