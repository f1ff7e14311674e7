//! Hot paths of the protocol core: what the trunk adds per media packet
//! (datagram header encode + decode, the subscription check) and per chat
//! message (handling one Data frame).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use trunk::proto::wire::{self, Message};
use trunk::proto::{
    CodecParams, Config, ConnId, Gens, Layer, Node, NodeId, ParticipantId, ParticipantInfo,
    RoomName, Time, TrackId, TrackInfo, TrackKind, TrackSource, Transmit, WireId,
};

fn datagram(c: &mut Criterion) {
    let packet = vec![0x80u8; 1200];
    let mut out = Vec::with_capacity(1300);
    let mut g = c.benchmark_group("datagram");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode+decode header, 1200 B packet", |b| {
        b.iter(|| {
            wire::encode_datagram(
                black_box(WireId(300)),
                12_345_678,
                black_box(&packet),
                &mut out,
            );
            let d = wire::decode_datagram(black_box(&out)).expect("decodes");
            black_box(matches!(d, wire::Datagram::Media { .. }))
        })
    });
    g.finish();
}

/// Two nodes with the room link for `r` up and node 1 subscribed to one of
/// node 2's tracks; returns (node 1, node 2).
fn linked_pair() -> (Node, Node, RoomName) {
    let mut a = Node::new(Config::new(NodeId(1), "bench"), 1);
    let mut b = Node::new(Config::new(NodeId(2), "bench"), 2);
    let conn = ConnId(1);
    let r = RoomName::new("standup").expect("valid");
    a.handle_connected(conn, Some(NodeId(2)), Time(0));
    b.handle_connected(conn, None, Time(0));
    for n in [&mut a, &mut b] {
        n.open_room(r.clone(), Time(0)).expect("open");
        n.participant_joined(
            &r,
            ParticipantInfo {
                id: ParticipantId(1),
                display_name: "p".into(),
            },
        )
        .expect("join");
    }
    b.publish_track(
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
            layers: vec!["h".into()],
        },
    )
    .expect("publish");
    // Exchange until quiet.
    loop {
        let mut moved = false;
        while let Some(Transmit::Frame { bytes, .. }) = a.poll_transmit() {
            b.handle_frame(conn, &bytes[wire::LEN_PREFIX..], Time(0));
            moved = true;
        }
        while let Some(Transmit::Frame { bytes, .. }) = b.poll_transmit() {
            a.handle_frame(conn, &bytes[wire::LEN_PREFIX..], Time(0));
            moved = true;
        }
        if !moved {
            break;
        }
    }
    while a.poll_event().is_some() {}
    while b.poll_event().is_some() {}
    (a, b, r)
}

fn data_frame(c: &mut Criterion) {
    let (mut a, b, r) = linked_pair();
    let from = b.snapshot().local_rooms[&r].generation;
    let to = a.snapshot().local_rooms[&r].generation;
    let msg = Message::Data {
        room: r.clone(),
        gens: Gens { from, to },
        from: ParticipantId(1),
        payload: b"hello, this is a chat message of typical length".to_vec(),
    };
    let frame = wire::encode_frame(&msg).expect("encodes");
    let body = &frame[wire::LEN_PREFIX..];
    let mut g = c.benchmark_group("control");
    g.throughput(Throughput::Elements(1));
    g.bench_function("handle one Data frame (decode, check gens, event)", |bch| {
        bch.iter(|| {
            a.handle_frame(ConnId(1), black_box(body), Time(1));
            black_box(a.poll_event())
        })
    });
    g.bench_function("encode one Data frame", |bch| {
        bch.iter(|| black_box(wire::encode_frame(black_box(&msg)).expect("encodes")))
    });
    g.finish();

    let mut m = c.benchmark_group("media");
    let (mut a, mut b, _) = linked_pair();
    let wire_id = a.snapshot().peers[&NodeId(2)].rooms[&r]
        .tracks
        .keys()
        .copied()
        .next()
        .expect("a track");
    a.subscribe(&r, NodeId(2), wire_id, Layer(0))
        .expect("subscribe");
    while let Some(Transmit::Frame { bytes, .. }) = a.poll_transmit() {
        b.handle_frame(ConnId(1), &bytes[wire::LEN_PREFIX..], Time(0));
    }
    let mut dgram = Vec::new();
    // A video RTP packet: the origin records it for retransmission and the
    // receiver runs gap detection on it, as in production.
    let mut rtp = vec![0x80u8; 1200];
    rtp[1] = 96;
    m.throughput(Throughput::Elements(1));
    m.bench_function("origin: should_send(node, track, layer)", |bch| {
        bch.iter(|| black_box(b.should_send(NodeId(1), TrackId(1), Layer(0))))
    });
    let mut seq = 0u16;
    m.bench_function("origin: send_media (encode + history), 1200 B", |bch| {
        bch.iter(|| {
            seq = seq.wrapping_add(1);
            rtp[2..4].copy_from_slice(&seq.to_be_bytes());
            let t = Time(u64::from(seq) * 1000);
            black_box(
                b.send_media(TrackId(1), Layer(0), black_box(&rtp), t, t, &mut dgram)
                    .len(),
            )
        })
    });
    let mut t = 0u64;
    m.bench_function(
        "receiver: handle_datagram (known wire id, in order)",
        |bch| {
            bch.iter(|| {
                t += 1000;
                seq = seq.wrapping_add(1);
                rtp[2..4].copy_from_slice(&seq.to_be_bytes());
                wire::encode_datagram(wire_id, t, &rtp, &mut dgram);
                black_box(
                    a.handle_datagram(ConnId(1), black_box(&dgram), Time(t))
                        .map(|d| d.wire_id),
                )
            })
        },
    );
    m.finish();
}

criterion_group!(benches, datagram, data_frame);
criterion_main!(benches);
