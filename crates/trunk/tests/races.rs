//! The two races of the earlier design ("Transport Add/Removal States" in the
//! original notes), replayed step by step against two nodes whose messages
//! are delivered by hand, in exactly the order the notes describe.

use std::collections::VecDeque;
use trunk::proto::wire;
use trunk::proto::{
    CodecParams, Config, ConnId, Event, Node, NodeId, ParticipantId, ParticipantInfo, RoomName,
    Time, TrackId, TrackInfo, TrackKind, TrackSource, Transmit,
};

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);
const CONN: ConnId = ConnId(7);

/// Two nodes joined by one trunk whose two directions are queues we drain
/// one frame at a time.
struct Pair {
    a: Node,
    b: Node,
    to_a: VecDeque<Vec<u8>>,
    to_b: VecDeque<Vec<u8>>,
    events_a: Vec<Event>,
    events_b: Vec<Event>,
    now: Time,
}

impl Pair {
    fn connected() -> Self {
        let mut p = Pair {
            a: Node::new(Config::new(A, "test"), 1),
            b: Node::new(Config::new(B, "test"), 2),
            to_a: VecDeque::new(),
            to_b: VecDeque::new(),
            events_a: Vec::new(),
            events_b: Vec::new(),
            now: Time(0),
        };
        p.a.handle_connected(CONN, Some(B), p.now);
        p.b.handle_connected(CONN, None, p.now);
        p.flush();
        p.deliver_all();
        assert!(p.a.is_link_up(B) && p.b.is_link_up(A));
        p.events_a.clear();
        p.events_b.clear();
        p
    }

    /// Move both nodes' outputs into the queues and event logs.
    fn flush(&mut self) {
        while let Some(t) = self.a.poll_transmit() {
            if let Transmit::Frame { bytes, .. } = t {
                self.to_b.push_back(bytes);
            }
        }
        while let Some(t) = self.b.poll_transmit() {
            if let Transmit::Frame { bytes, .. } = t {
                self.to_a.push_back(bytes);
            }
        }
        while let Some(e) = self.a.poll_event() {
            self.events_a.push(e);
        }
        while let Some(e) = self.b.poll_event() {
            self.events_b.push(e);
        }
    }

    fn body(bytes: &[u8]) -> &[u8] {
        match wire::split_frame(bytes) {
            Ok(Some((body, _))) => body,
            other => panic!("bad frame in test network: {other:?}"),
        }
    }

    /// Deliver the next `n` frames queued for A.
    fn deliver_to_a(&mut self, n: usize) {
        for _ in 0..n {
            let Some(f) = self.to_a.pop_front() else {
                break;
            };
            self.a.handle_frame(CONN, Self::body(&f), self.now);
            self.flush();
        }
    }

    fn deliver_to_b(&mut self, n: usize) {
        for _ in 0..n {
            let Some(f) = self.to_b.pop_front() else {
                break;
            };
            self.b.handle_frame(CONN, Self::body(&f), self.now);
            self.flush();
        }
    }

    fn deliver_all(&mut self) {
        while !self.to_a.is_empty() || !self.to_b.is_empty() {
            self.deliver_to_a(usize::MAX);
            self.deliver_to_b(usize::MAX);
        }
    }

    fn peek_to_b(&self) -> Vec<String> {
        self.to_b
            .iter()
            .map(|f| {
                wire::decode_frame(f)
                    .map(|m| m.name().to_string())
                    .unwrap_or_default()
            })
            .collect()
    }
}

fn room() -> RoomName {
    RoomName::new("standup").expect("valid")
}

fn person(id: u64) -> ParticipantInfo {
    ParticipantInfo {
        id: ParticipantId(id),
        display_name: format!("p{id}"),
    }
}

fn video(participant: u64) -> TrackInfo {
    TrackInfo {
        participant: ParticipantId(participant),
        kind: TrackKind::Video,
        source: TrackSource::Camera,
        codec: CodecParams {
            mime_type: "video/VP8".into(),
            clock_rate: 90_000,
            channels: None,
            payload_type: 96,
            fmtp: String::new(),
        },
        layers: vec!["l".into(), "m".into(), "h".into()],
    }
}

fn is_remote_state(e: &Event) -> bool {
    matches!(
        e,
        Event::RemoteParticipantAdded { .. }
            | Event::RemoteTrackAdded { .. }
            | Event::SubscribeRequested { .. }
            | Event::DataReceived { .. }
    )
}

/// Race (a): node 1 announces tracks; node 2's room is created, receives a
/// track event and closes; the late track events must not recreate it.
#[test]
fn late_track_events_do_not_recreate_a_closed_room() {
    let mut p = Pair::connected();
    let r = room();
    // Node 1: a participant with two tracks.
    p.a.open_room(r.clone(), p.now).expect("open");
    p.a.participant_joined(&r, person(10)).expect("join");
    p.a.publish_track(&r, TrackId(1), video(10))
        .expect("publish");
    p.a.publish_track(&r, TrackId(2), video(10))
        .expect("publish");
    p.flush();
    p.deliver_all();
    // Node 2 had nobody: it knows node 1's interest, nothing else.
    let snap = p.b.snapshot();
    assert!(
        snap.peers[&A].rooms.is_empty(),
        "no state for a room not open locally"
    );
    assert!(p.events_b.iter().all(|e| !is_remote_state(e)));

    // Node 2's room is created (a participant joins) and node 1 answers
    // with its announcements.
    p.b.open_room(r.clone(), p.now).expect("open");
    p.b.participant_joined(&r, person(20)).expect("join");
    p.flush();
    p.deliver_to_a(usize::MAX);
    assert_eq!(
        p.peek_to_b(),
        ["participant_joined", "track_added", "track_added"]
    );
    // Node 2 receives one event, then its participant leaves and the room closes.
    p.deliver_to_b(2);
    assert!(
        p.events_b
            .iter()
            .any(|e| matches!(e, Event::RemoteTrackAdded { .. }))
    );
    p.b.participant_left(&r, ParticipantId(20)).expect("leave");
    p.b.close_room(&r, p.now).expect("close");
    p.flush();
    let stale_before = p.b.metrics().stale_drops;
    p.events_b.clear();

    // The late track event arrives: dropped, counted, nothing recreated.
    p.deliver_to_b(1);
    assert_eq!(p.b.metrics().stale_drops, stale_before + 1);
    assert!(
        p.events_b.is_empty(),
        "late message produced {:?}",
        p.events_b
    );
    let snap = p.b.snapshot();
    assert!(snap.local_rooms.is_empty());
    assert!(snap.peers[&A].rooms.is_empty());
    assert_eq!(snap.peers[&A].wires, 0);

    // Everything settles with no room link on either side.
    p.deliver_all();
    assert!(p.a.snapshot().peers[&B].rooms.is_empty());
    assert!(p.a.snapshot().peers[&B].remote_open.is_empty());
    assert!(p.b.snapshot().peers[&A].rooms.is_empty());
    assert!(p.events_b.iter().all(|e| !is_remote_state(e)));
}

/// Race (a'), the short-lived connection: node 2 leaves and rejoins before
/// node 1's announcements for the old lifetime arrive; each track must be
/// seen exactly once, from the new lifetime only.
#[test]
fn rejoin_sees_each_track_exactly_once() {
    let mut p = Pair::connected();
    let r = room();
    p.a.open_room(r.clone(), p.now).expect("open");
    p.a.participant_joined(&r, person(10)).expect("join");
    p.a.publish_track(&r, TrackId(1), video(10))
        .expect("publish");
    p.flush();
    p.deliver_all();

    p.b.open_room(r.clone(), p.now).expect("open");
    p.b.participant_joined(&r, person(20)).expect("join");
    p.flush();
    p.deliver_to_a(usize::MAX); // node 1 announces for node 2's first generation
    p.b.participant_left(&r, ParticipantId(20)).expect("leave");
    p.b.close_room(&r, p.now).expect("close");
    let gen2 = p.b.open_room(r.clone(), p.now).expect("reopen");
    p.b.participant_joined(&r, person(21)).expect("join");
    p.flush();
    p.deliver_all();

    let added: Vec<_> = p
        .events_b
        .iter()
        .filter(|e| matches!(e, Event::RemoteTrackAdded { .. }))
        .collect();
    assert_eq!(added.len(), 1, "exactly once: {:?}", p.events_b);
    assert!(
        p.b.metrics().stale_drops >= 2,
        "the old generation's messages were dropped"
    );
    let snap = p.b.snapshot();
    assert_eq!(snap.local_rooms[&r].generation, gen2);
    assert_eq!(snap.peers[&A].rooms[&r].tracks.len(), 1);
    assert_eq!(snap.peers[&A].rooms[&r].participants.len(), 1);
}

/// Race (b), the nine steps: a peer joins on B while the last peer leaves A.
/// End: no room link, no room-link state on either node, nothing recreated.
#[test]
fn join_on_b_while_last_leaves_a() {
    let mut p = Pair::connected();
    let x = room();
    // 1–2. Node A room X receives a peer; A tells B.
    p.a.open_room(x.clone(), p.now).expect("open");
    p.a.participant_joined(&x, person(10)).expect("join");
    p.a.publish_track(&x, TrackId(1), video(10))
        .expect("publish");
    p.flush();
    p.deliver_to_b(usize::MAX);
    // 3. Node B: nothing yet — and holds nothing for X.
    assert!(p.b.snapshot().peers[&A].rooms.is_empty());
    assert!(p.events_b.iter().all(|e| !is_remote_state(e)));
    // 4–5. B receives a peer in X; around the same time A's peer leaves.
    p.b.open_room(x.clone(), p.now).expect("open");
    p.b.participant_joined(&x, person(20)).expect("join");
    p.b.publish_track(&x, TrackId(2), video(20))
        .expect("publish");
    p.a.participant_left(&x, ParticipantId(10)).expect("leave");
    p.a.close_room(&x, p.now).expect("close");
    p.flush();
    // 6–7. B's news reaches A after A closed X: A records B's interest only.
    let stale_a = p.a.metrics().stale_drops;
    p.deliver_to_a(usize::MAX);
    assert!(
        p.a.metrics().stale_drops > stale_a,
        "B's announcements were stale on A"
    );
    assert!(p.a.snapshot().peers[&B].rooms.is_empty());
    // 8–9. A's close reaches B: the room link goes down on B.
    p.deliver_all();

    let (sa, sb) = (p.a.snapshot(), p.b.snapshot());
    assert!(sa.local_rooms.is_empty());
    assert!(sa.peers[&B].rooms.is_empty(), "A: no room link");
    assert_eq!(sa.peers[&B].wires, 0);
    assert!(sb.peers[&A].rooms.is_empty(), "B: no room link");
    assert!(sb.peers[&A].remote_open.is_empty(), "B knows A closed X");
    assert_eq!(sb.peers[&A].wires, 0);
    assert!(sb.local_rooms[&x].subscribers.is_empty());
    assert!(
        p.events_a.iter().all(|e| !is_remote_state(e)),
        "A recreated state: {:?}",
        p.events_a
    );
    // B briefly learned A's participant and track? It may have, but must
    // have been told to drop them: adds and removes balance.
    let adds = p.events_b.iter().filter(|e| is_remote_state(e)).count();
    let removes = p
        .events_b
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::RemoteParticipantRemoved { .. } | Event::RemoteTrackRemoved { .. }
            )
        })
        .count();
    assert_eq!(adds, removes, "B events: {:?}", p.events_b);

    // When B's last peer leaves too, both nodes are empty.
    p.b.participant_left(&x, ParticipantId(20)).expect("leave");
    p.b.close_room(&x, p.now).expect("close");
    p.flush();
    p.deliver_all();
    for s in [p.a.snapshot(), p.b.snapshot()] {
        assert!(s.local_rooms.is_empty());
        assert!(
            s.peers
                .values()
                .all(|peer| peer.remote_open.is_empty() && peer.rooms.is_empty())
        );
    }
}
