//! Control-stream frames: the decoder, and a node (with rooms open) fed the
//! input as a frame stream before and after a valid Hello, and on a
//! connection held by a node-id probe. Must never panic and must keep its
//! structural invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trunk::proto::wire::{self, Message, PROTOCOL_VERSION};
use trunk::proto::{
    CodecParams, Config, ConnId, Incarnation, Node, NodeId, ParticipantId, ParticipantInfo,
    RoomName, Time, TrackId, TrackInfo, TrackKind, TrackSource,
};

fuzz_target!(|data: &[u8]| {
    let _ = wire::decode_frame(data);
    let _ = wire::decode_body(data);

    // A node on a fresh connection, then after the peer's Hello.
    let mut node = Node::new(Config::new(NodeId(1), "sim"), 7);
    // Rooms open (generations 1..=3, as in the simulation's corpus) so that
    // room-scoped messages can pass the generation check and go deep.
    for (k, name) in ["standup", "retro", "lunch"].into_iter().enumerate() {
        let Ok(room) = RoomName::new(name) else {
            return;
        };
        let _ = node.open_room(room.clone(), Time(0));
        let pid = ParticipantId(k as u64 + 1);
        let info = ParticipantInfo {
            id: pid,
            display_name: "p".into(),
        };
        let _ = node.participant_joined(&room, info);
        let track = TrackInfo {
            participant: pid,
            kind: TrackKind::Video,
            source: TrackSource::Camera,
            codec: CodecParams {
                mime_type: "video/VP8".into(),
                clock_rate: 90_000,
                channels: None,
                payload_type: 96,
                fmtp: String::new(),
            },
            layers: vec!["l".into(), "h".into()],
        };
        let _ = node.publish_track(&room, TrackId(k as u64), track);
    }
    let conn = ConnId(1);
    node.handle_connected(conn, None, Time(0));
    let mut buf = data;
    let mut t = 1;
    // First frame as-is (pre-handshake; a Hello from the corpus makes this
    // connection active), then a valid Hello on a second one, then the rest
    // on whichever is active.
    if let Ok(Some((body, used))) = wire::split_frame(buf) {
        node.handle_frame(conn, body, Time(t));
        buf = &buf[used..];
    }
    node.handle_connected(ConnId(2), None, Time(t));
    let hello = Message::Hello {
        node_id: NodeId(2),
        incarnation: Incarnation(5),
        version: PROTOCOL_VERSION,
        cluster: "sim".into(),
    };
    if let Ok(frame) = wire::encode_frame(&hello) {
        node.handle_frame(ConnId(2), &frame[wire::LEN_PREFIX..], Time(t));
    }
    // A third connection claims node 2 with another incarnation: it is
    // held while node 1 probes connection 2 (restart or a second process?);
    // a Pong in the input refuses it, the probe's end lets it in.
    node.handle_connected(ConnId(3), None, Time(t));
    let claim = Message::Hello {
        node_id: NodeId(2),
        incarnation: Incarnation(6),
        version: PROTOCOL_VERSION,
        cluster: "sim".into(),
    };
    if let Ok(frame) = wire::encode_frame(&claim) {
        node.handle_frame(ConnId(3), &frame[wire::LEN_PREFIX..], Time(t));
    }
    while let Ok(Some((body, used))) = wire::split_frame(buf) {
        t += 1000;
        // To every connection: whichever is alive processes it.
        node.handle_frame(conn, body, Time(t));
        node.handle_frame(ConnId(2), body, Time(t));
        node.handle_frame(ConnId(3), body, Time(t));
        node.handle_timeout(Time(t));
        buf = &buf[used..];
    }
    // The rest as datagrams (media, NACKs, garbage), each prefixed by one
    // length byte, with timers in between (NACK retries, give-ups).
    while let Some((&len, rest)) = buf.split_first() {
        let len = usize::from(len).min(rest.len());
        t += 5_000;
        let _ = node.handle_datagram(ConnId(2), &rest[..len], Time(t));
        node.handle_timeout(Time(t));
        buf = &rest[len..];
    }
    while node.poll_datagram().is_some() {}
    while node.poll_transmit().is_some() {}
    while node.poll_event().is_some() {}
    // Whatever arrived, room-link state stays consistent (no orphans).
    if let Err(e) = node.check_structure() {
        panic!("structure broken by input: {e}");
    }
});
