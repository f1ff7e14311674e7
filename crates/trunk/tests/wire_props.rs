//! Property tests of the wire format: every message round-trips; random
//! and mutated bytes never panic and never decode past the frame limit.

use proptest::prelude::*;
use trunk::proto::wire::{self, Datagram, DatagramMessage, MAX_FRAME, Message};
use trunk::proto::{
    CloseCode, CodecParams, Generation, Gens, Incarnation, Layer, NodeId, ParticipantId,
    ParticipantInfo, RoomName, TrackInfo, TrackKind, TrackSource, WireId,
};

fn room() -> impl Strategy<Value = RoomName> {
    "[A-Za-z0-9._-]{1,64}".prop_map(|s| RoomName::new(s).expect("strategy yields valid names"))
}

fn gens() -> impl Strategy<Value = Gens> {
    (any::<u64>(), any::<u64>()).prop_map(|(f, t)| Gens {
        from: Generation(f),
        to: Generation(t),
    })
}

fn track() -> impl Strategy<Value = TrackInfo> {
    (
        any::<u64>(),
        any::<bool>(),
        ".{0,20}",
        any::<u32>(),
        proptest::option::of(any::<u8>()),
        any::<u8>(),
        ".{0,40}",
        proptest::collection::vec(".{0,4}", 0..4),
    )
        .prop_map(|(p, video, mime, clock, ch, pt, fmtp, layers)| TrackInfo {
            participant: ParticipantId(p),
            kind: if video {
                TrackKind::Video
            } else {
                TrackKind::Audio
            },
            source: [
                TrackSource::Camera,
                TrackSource::Microphone,
                TrackSource::Screen,
            ][usize::from(pt % 3)],
            codec: CodecParams {
                mime_type: mime,
                clock_rate: clock,
                channels: ch,
                payload_type: pt,
                fmtp,
            },
            layers,
        })
}

fn close_code() -> impl Strategy<Value = CloseCode> {
    prop_oneof![
        Just(CloseCode::Shutdown),
        Just(CloseCode::Duplicate),
        Just(CloseCode::Replaced),
        Just(CloseCode::Timeout),
        Just(CloseCode::ProtocolError),
        Just(CloseCode::Version),
        Just(CloseCode::WrongCluster),
        Just(CloseCode::NodeIdInUse),
        Just(CloseCode::NotCertified),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), any::<u8>(), ".{0,30}").prop_map(|(n, i, v, c)| {
            Message::Hello {
                node_id: NodeId(n),
                incarnation: Incarnation(i),
                version: v,
                cluster: c,
            }
        }),
        any::<u64>().prop_map(|seq| Message::Ping { seq }),
        any::<u64>().prop_map(|seq| Message::Pong { seq }),
        (room(), any::<u64>()).prop_map(|(room, g)| Message::Open {
            room,
            generation: Generation(g)
        }),
        (room(), any::<u64>()).prop_map(|(room, g)| Message::Close {
            room,
            generation: Generation(g)
        }),
        (room(), gens(), any::<u64>(), ".{0,30}").prop_map(|(room, gens, id, name)| {
            Message::ParticipantJoined {
                room,
                gens,
                participant: ParticipantInfo {
                    id: ParticipantId(id),
                    display_name: name,
                },
            }
        }),
        (room(), gens(), any::<u64>()).prop_map(|(room, gens, id)| Message::ParticipantLeft {
            room,
            gens,
            participant: ParticipantId(id)
        }),
        (room(), gens(), any::<u32>(), track()).prop_map(|(room, gens, w, track)| {
            Message::TrackAdded {
                room,
                gens,
                wire_id: WireId(w),
                track,
            }
        }),
        (room(), gens(), any::<u32>()).prop_map(|(room, gens, w)| Message::TrackRemoved {
            room,
            gens,
            wire_id: WireId(w)
        }),
        (room(), gens(), any::<u32>(), any::<u8>()).prop_map(|(room, gens, w, l)| {
            Message::Subscribe {
                room,
                gens,
                wire_id: WireId(w),
                layer: Layer(l),
            }
        }),
        (room(), gens(), any::<u32>(), any::<u8>()).prop_map(|(room, gens, w, l)| {
            Message::Unsubscribe {
                room,
                gens,
                wire_id: WireId(w),
                layer: Layer(l),
            }
        }),
        (room(), gens(), any::<u32>()).prop_map(|(room, gens, w)| Message::KeyframeRequest {
            room,
            gens,
            wire_id: WireId(w)
        }),
        (
            room(),
            gens(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..2000)
        )
            .prop_map(|(room, gens, from, payload)| Message::Data {
                room,
                gens,
                from: ParticipantId(from),
                payload,
            }),
        close_code().prop_map(|reason| Message::Goodbye { reason }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_message_round_trips(msg in message()) {
        let frame = wire::encode_frame(&msg).expect("encodes");
        prop_assert!(frame.len() <= MAX_FRAME + wire::LEN_PREFIX);
        prop_assert_eq!(wire::decode_frame(&frame).expect("decodes"), msg.clone());
        // Streamed: a frame split anywhere needs more bytes, never errors.
        let (body, used) = wire::split_frame(&frame).expect("ok").expect("complete");
        prop_assert_eq!(used, frame.len());
        prop_assert_eq!(wire::decode_body(body).expect("decodes"), msg);
        for cut in 0..frame.len().min(64) {
            prop_assert_eq!(wire::split_frame(&frame[..cut]), Ok(None));
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = wire::decode_frame(&bytes);
        let _ = wire::decode_body(&bytes);
        let _ = wire::split_frame(&bytes);
        let _ = wire::decode_datagram(&bytes);
    }

    #[test]
    fn mutated_frames_never_panic(
        msg in message(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        truncate in any::<Option<usize>>(),
    ) {
        let mut frame = wire::encode_frame(&msg).expect("encodes");
        for (at, x) in flips {
            let i = at % frame.len();
            frame[i] ^= x;
        }
        if let Some(t) = truncate {
            frame.truncate(t % (frame.len() + 1));
        }
        if let Ok(decoded) = wire::decode_frame(&frame) {
            // Whatever decodes re-encodes to a valid frame (no invalid room names etc.).
            let again = wire::encode_frame(&decoded).expect("re-encodes");
            prop_assert_eq!(wire::decode_frame(&again).expect("decodes"), decoded);
        }
    }

    #[test]
    fn datagram_round_trips(
        w in 1..=u32::MAX,
        origin in any::<u64>(),
        packet in proptest::collection::vec(any::<u8>(), 0..1500),
    ) {
        let mut out = Vec::new();
        wire::encode_datagram(WireId(w), origin, &packet, &mut out);
        prop_assert!(out.len() <= packet.len() + wire::MAX_DATAGRAM_HEADER);
        let decoded = wire::decode_datagram(&out).expect("decodes");
        prop_assert_eq!(
            decoded,
            Datagram::Media { wire_id: WireId(w), origin, packet: &packet[..] }
        );
    }

    #[test]
    fn nack_datagrams_round_trip(
        w in any::<u32>(),
        seqs in proptest::collection::vec(any::<u16>(), 0..=wire::MAX_NACK_SEQS),
    ) {
        let msg = DatagramMessage::Nack { wire_id: WireId(w), seqs };
        let mut out = Vec::new();
        wire::encode_control_datagram(&msg, &mut out);
        prop_assert_eq!(wire::decode_datagram(&out).expect("decodes"), Datagram::Control(msg));
    }

    #[test]
    fn oversized_nacks_are_refused(w in any::<u32>(), extra in 1usize..64) {
        let seqs = vec![7u16; wire::MAX_NACK_SEQS + extra];
        let mut out = Vec::new();
        wire::encode_control_datagram(&DatagramMessage::Nack { wire_id: WireId(w), seqs }, &mut out);
        prop_assert!(wire::decode_datagram(&out).is_err());
    }

    #[test]
    fn mutated_datagrams_never_panic(
        seqs in proptest::collection::vec(any::<u16>(), 0..20),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        truncate in any::<Option<usize>>(),
    ) {
        let mut out = Vec::new();
        wire::encode_control_datagram(&DatagramMessage::Nack { wire_id: WireId(3), seqs }, &mut out);
        for (at, x) in flips {
            let i = at % out.len();
            out[i] ^= x;
        }
        if let Some(t) = truncate {
            out.truncate(t % (out.len() + 1));
        }
        if let Ok(Datagram::Control(DatagramMessage::Nack { seqs, .. })) = wire::decode_datagram(&out) {
            prop_assert!(seqs.len() <= wire::MAX_NACK_SEQS);
        }
    }

    #[test]
    fn room_names_validate(s in ".{0,80}") {
        let ok = !s.is_empty() && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        prop_assert_eq!(RoomName::new(s).is_ok(), ok);
    }
}

#[test]
fn oversized_length_is_refused_before_the_body_arrives() {
    let len = (MAX_FRAME as u32 + 1).to_be_bytes();
    assert!(matches!(
        wire::split_frame(&len),
        Err(wire_err) if wire_err.to_string().contains("exceeds")
    ));
}

#[test]
fn wrong_version_is_refused() {
    let mut frame = wire::encode_frame(&Message::Ping { seq: 1 }).expect("encodes");
    frame[wire::LEN_PREFIX] = 99;
    assert!(wire::decode_frame(&frame).is_err());
}

#[test]
fn invalid_room_name_on_the_wire_is_refused() {
    // Hand-build an Open with an invalid room name by patching a valid one.
    let msg = Message::Open {
        room: RoomName::new("abc").expect("valid"),
        generation: Generation(1),
    };
    let mut frame = wire::encode_frame(&msg).expect("encodes");
    let pos = frame
        .windows(3)
        .position(|w| w == b"abc")
        .expect("name in frame");
    frame[pos] = b'/';
    assert!(wire::decode_frame(&frame).is_err());
}

#[test]
fn oversized_data_is_refused_by_the_encoder() {
    let msg = Message::Data {
        room: RoomName::new("r").expect("valid"),
        gens: Gens {
            from: Generation(1),
            to: Generation(1),
        },
        from: ParticipantId(1),
        payload: vec![0; MAX_FRAME + 1],
    };
    assert!(wire::encode_frame(&msg).is_err());
}
