//! Link-level behaviour, one property per test: handshake checks, restart
//! (new incarnation), duplicate trunks, heartbeat death and redial backoff,
//! Goodbye, protocol errors, subscriptions, keyframe coalescing, datagrams.

use std::collections::VecDeque;
use std::time::Duration;
use trunk::proto::wire::{self, Message};
use trunk::proto::{
    CloseCode, CodecParams, Config, ConnId, Event, Layer, Node, NodeId, ParticipantId,
    ParticipantInfo, Refusal, RoomName, Time, TrackId, TrackInfo, TrackKind, TrackSource, Transmit,
    WireId,
};

/// Nodes plus connections delivered instantly, in order, by [`Net::run`].
struct Net {
    nodes: Vec<Node>,
    /// conn → (dialer index, acceptor index)
    conns: Vec<(ConnId, usize, usize)>,
    queue: VecDeque<(usize, ConnId, Option<Vec<u8>>)>,
    events: Vec<Vec<Event>>,
    closes: Vec<Vec<(ConnId, CloseCode)>>,
    now: Time,
}

fn cfg(id: u64) -> Config {
    Config::new(NodeId(id), "test")
}

impl Net {
    fn new(configs: Vec<Config>) -> Self {
        let n = configs.len();
        Net {
            nodes: configs
                .into_iter()
                .enumerate()
                .map(|(i, c)| Node::new(c, 100 + i as u64))
                .collect(),
            conns: Vec::new(),
            queue: VecDeque::new(),
            events: vec![Vec::new(); n],
            closes: vec![Vec::new(); n],
            now: Time(0),
        }
    }

    /// Node `i` dials node `j` on connection `conn` (connected at once).
    fn dial(&mut self, i: usize, j: usize, conn: u64) {
        let conn = ConnId(conn);
        self.conns.push((conn, i, j));
        let target = self.nodes[j].node_id();
        self.nodes[i].handle_connected(conn, Some(target), self.now);
        self.nodes[j].handle_connected(conn, None, self.now);
    }

    fn other(&self, conn: ConnId, me: usize) -> Option<usize> {
        let (_, a, b) = self.conns.iter().find(|c| c.0 == conn)?;
        Some(if *a == me { *b } else { *a })
    }

    /// Collect outputs of every node into the queue.
    fn collect(&mut self) {
        for i in 0..self.nodes.len() {
            while let Some(t) = self.nodes[i].poll_transmit() {
                match t {
                    Transmit::Frame { conn, bytes } => {
                        if let Some(j) = self.other(conn, i) {
                            self.queue.push_back((j, conn, Some(bytes)));
                        }
                    }
                    Transmit::Close { conn, code } => {
                        self.closes[i].push((conn, code));
                        if let Some(j) = self.other(conn, i) {
                            self.queue.push_back((j, conn, None));
                        }
                    }
                }
            }
            while let Some(e) = self.nodes[i].poll_event() {
                self.events[i].push(e);
            }
        }
    }

    /// Deliver until nothing moves.
    fn run(&mut self) {
        self.collect();
        while let Some((j, conn, frame)) = self.queue.pop_front() {
            match frame {
                Some(bytes) => {
                    let body = &bytes[wire::LEN_PREFIX..];
                    self.nodes[j].handle_frame(conn, body, self.now);
                }
                None => self.nodes[j].handle_lost(conn, self.now),
            }
            self.collect();
        }
    }

    /// Advance time to `t`, firing every timer on the way; frames are not
    /// delivered (the network is silent).
    fn advance_silent(&mut self, t: Time) {
        loop {
            let next = self
                .nodes
                .iter()
                .filter_map(|n| n.poll_timeout())
                .filter(|x| *x <= t)
                .min();
            let Some(next) = next else { break };
            self.now = next;
            for n in &mut self.nodes {
                if n.poll_timeout().is_some_and(|x| x <= next) {
                    n.handle_timeout(next);
                }
            }
            self.collect();
            self.queue.clear();
        }
        self.now = t;
    }
}

fn room() -> RoomName {
    RoomName::new("standup").expect("valid")
}

fn track(p: u64) -> TrackInfo {
    TrackInfo {
        participant: ParticipantId(p),
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
    }
}

/// Open `standup` with one participant (id = 10 + node index) and one track.
fn populate(net: &mut Net, i: usize) {
    let r = room();
    let now = net.now;
    let n = &mut net.nodes[i];
    n.open_room(r.clone(), now).expect("open");
    let pid = ParticipantId(10 + i as u64);
    n.participant_joined(
        &r,
        ParticipantInfo {
            id: pid,
            display_name: "p".into(),
        },
    )
    .expect("join");
    n.publish_track(&r, TrackId(i as u64), track(pid.0))
        .expect("publish");
}

fn up(net: &Net, i: usize, j: usize) -> bool {
    net.nodes[i].is_link_up(net.nodes[j].node_id())
}

#[test]
fn version_and_cluster_are_checked() {
    let mut other = cfg(2);
    other.cluster = "elsewhere".into();
    let mut net = Net::new(vec![cfg(1), other]);
    net.dial(0, 1, 1);
    net.run();
    assert!(!up(&net, 0, 1) && !up(&net, 1, 0));
    assert!(net.closes[0].contains(&(ConnId(1), CloseCode::WrongCluster)));

    let mut net = Net::new(vec![cfg(1)]);
    net.nodes[0].handle_connected(ConnId(9), None, Time(0));
    let hello = Message::Hello {
        node_id: NodeId(3),
        incarnation: trunk::proto::Incarnation(1),
        version: trunk::proto::PROTOCOL_VERSION + 1,
        cluster: "test".into(),
    };
    let f = wire::encode_frame(&hello).expect("encodes");
    net.nodes[0].handle_frame(ConnId(9), &f[wire::LEN_PREFIX..], Time(0));
    net.collect();
    assert!(net.closes[0].contains(&(ConnId(9), CloseCode::Version)));
    assert!(!net.nodes[0].is_link_up(NodeId(3)));
}

#[test]
fn garbage_or_early_frames_close_the_trunk() {
    let mut net = Net::new(vec![cfg(1), cfg(2)]);
    net.dial(0, 1, 1);
    net.run();
    assert!(up(&net, 0, 1));
    net.nodes[1].handle_frame(ConnId(1), &[1, 0xff, 0xff, 0xff], net.now);
    net.run();
    assert!(!up(&net, 1, 0));
    assert!(!up(&net, 0, 1), "the peer learns at once (Goodbye)");
    assert_eq!(net.nodes[1].metrics().protocol_errors, 1);

    // A message other than Hello first is a protocol error too.
    let mut net = Net::new(vec![cfg(1)]);
    net.nodes[0].handle_connected(ConnId(3), None, Time(0));
    let f = wire::encode_frame(&Message::Ping { seq: 1 }).expect("encodes");
    net.nodes[0].handle_frame(ConnId(3), &f[wire::LEN_PREFIX..], Time(0));
    net.collect();
    assert!(net.closes[0].contains(&(ConnId(3), CloseCode::ProtocolError)));
}

#[test]
fn new_incarnation_replaces_the_link_once_the_old_trunk_is_silent() {
    let mut net = Net::new(vec![cfg(1), cfg(2)]);
    populate(&mut net, 0);
    populate(&mut net, 1);
    net.dial(0, 1, 1);
    net.run();
    assert!(
        net.events[0]
            .iter()
            .any(|e| matches!(e, Event::RemoteTrackAdded { .. }))
    );
    // Node 2 crashes silently and comes back with a new incarnation (and
    // its room): what node 1 sends on the old trunk now reaches nobody.
    net.nodes[1] = Node::new(cfg(2), 999);
    populate(&mut net, 1);
    net.events[0].clear();
    net.conns.push((ConnId(2), 1, 0));
    net.nodes[1].handle_connected(ConnId(2), Some(NodeId(1)), net.now);
    net.nodes[0].handle_connected(ConnId(2), None, net.now);
    net.run();
    // Restart or a second process with id 2? Node 1 asked the old trunk
    // (a Ping) and holds the new one, and what came on it, meanwhile.
    assert!(net.events[0].is_empty(), "{:?}", net.events[0]);
    assert_eq!(
        net.nodes[0].snapshot().peers[&NodeId(2)].incarnation,
        Some(Node::new(cfg(2), 101).incarnation()),
        "the old incarnation is still the peer's"
    );
    // No Pong: the old process is gone. The new trunk replaces it at the
    // end of the wait (a fraction of a heartbeat).
    let wait = net.nodes[0].poll_timeout().expect("probe timer");
    assert!(wait <= Time(250_000), "{wait:?}");
    net.now = wait;
    net.nodes[0].handle_timeout(wait);
    net.run();
    let ev = &net.events[0];
    let down = ev.iter().position(|e| {
        matches!(
            e,
            Event::LinkDown {
                reason: CloseCode::Replaced,
                ..
            }
        )
    });
    let removed = ev
        .iter()
        .position(|e| matches!(e, Event::RemoteTrackRemoved { .. }));
    let upi = ev.iter().position(|e| matches!(e, Event::LinkUp { .. }));
    let added = ev
        .iter()
        .rposition(|e| matches!(e, Event::RemoteTrackAdded { .. }));
    assert!(
        removed.is_some() && down.is_some() && upi.is_some() && added.is_some(),
        "{ev:?}"
    );
    assert!(removed < upi && down < upi && upi < added, "{ev:?}");
    assert!(net.closes[0].contains(&(ConnId(1), CloseCode::Replaced)));
    assert_eq!(
        net.nodes[0].snapshot().peers[&NodeId(2)].incarnation,
        Some(net.nodes[1].incarnation())
    );
    assert_eq!(net.nodes[0].metrics().node_id_conflicts, 0);
    // The new incarnation's room (held during the probe) linked up.
    assert!(up(&net, 1, 0) && up(&net, 0, 1));
}

#[test]
fn a_second_live_process_with_a_node_id_is_refused_not_replacing() {
    // Nodes 2 and 2' were both started with id 2 (other seeds, so other
    // incarnations).
    let mut net = Net::new(vec![cfg(1), cfg(2), cfg(2)]);
    populate(&mut net, 0);
    populate(&mut net, 1);
    populate(&mut net, 2);
    net.dial(1, 0, 1);
    net.run();
    let first = net.nodes[1].incarnation();
    net.events[0].clear();
    net.dial(2, 0, 2);
    net.run();
    // The old trunk answered the probe: 2' is refused, 2 keeps its link.
    assert!(
        net.events[0].contains(&Event::Refused {
            conn: ConnId(2),
            node: NodeId(2),
            why: Refusal::NodeIdInUse { live: ConnId(1) },
        }),
        "{:?}",
        net.events[0]
    );
    assert!(
        !net.events[0].iter().any(|e| matches!(
            e,
            Event::LinkDown { .. } | Event::LinkUp { .. } | Event::RemoteTrackAdded { .. }
        )),
        "nothing learned from the refused one, nothing lost: {:?}",
        net.events[0]
    );
    assert!(net.closes[0].contains(&(ConnId(2), CloseCode::NodeIdInUse)));
    assert_eq!(net.nodes[0].metrics().node_id_conflicts, 1);
    assert_eq!(
        net.nodes[0].snapshot().peers[&NodeId(2)].incarnation,
        Some(first)
    );
    assert!(up(&net, 0, 1) && up(&net, 1, 0));
    // The refused process hears why.
    assert!(
        net.events[2].contains(&Event::LinkDown {
            node: NodeId(1),
            reason: CloseCode::NodeIdInUse
        }),
        "{:?}",
        net.events[2]
    );
    // Later, long after: still refused while the first one lives.
    net.now = Time(5_000_000);
    net.dial(2, 0, 3);
    net.run();
    assert!(net.closes[0].contains(&(ConnId(3), CloseCode::NodeIdInUse)));
    assert_eq!(net.nodes[0].metrics().node_id_conflicts, 2);
}

#[test]
fn a_late_hello_from_a_process_already_gone_is_closed_quietly() {
    // Node 2' said Hello with id 2 and died before node 1 read it (a late
    // Hello): node 2 answers the probe, 2' cannot. Not a conflict.
    let mut net = Net::new(vec![cfg(1), cfg(2), cfg(2)]);
    net.dial(1, 0, 1);
    net.run();
    let first = net.nodes[1].incarnation();
    net.conns.push((ConnId(2), 2, 0));
    net.nodes[2].handle_connected(ConnId(2), Some(NodeId(1)), net.now);
    net.nodes[0].handle_connected(ConnId(2), None, net.now);
    net.collect();
    net.nodes[2] = Node::new(cfg(3), 5); // 2' is gone; nothing answers on conn 2
    net.events[0].clear();
    net.run();
    let wait = net.nodes[0].poll_timeout().expect("probe timer");
    net.now = wait;
    net.nodes[0].handle_timeout(wait);
    net.run();
    assert!(net.closes[0].contains(&(ConnId(2), CloseCode::Timeout)));
    assert!(
        !net.events[0]
            .iter()
            .any(|e| matches!(e, Event::Refused { .. } | Event::LinkDown { .. })),
        "{:?}",
        net.events[0]
    );
    assert_eq!(net.nodes[0].metrics().node_id_conflicts, 0);
    assert_eq!(
        net.nodes[0].snapshot().peers[&NodeId(2)].incarnation,
        Some(first)
    );
    assert!(up(&net, 0, 1));
}

#[test]
fn a_node_refuses_a_peer_with_its_own_id() {
    let mut net = Net::new(vec![cfg(1), cfg(1)]);
    net.dial(0, 1, 1);
    net.run();
    for i in 0..2 {
        assert!(
            net.events[i].contains(&Event::Refused {
                conn: ConnId(1),
                node: NodeId(1),
                why: Refusal::OurNodeId,
            }),
            "{:?}",
            net.events[i]
        );
        assert!(net.closes[i].contains(&(ConnId(1), CloseCode::NodeIdInUse)));
        assert_eq!(net.nodes[i].metrics().node_id_conflicts, 1);
    }
    // Dialing ourselves (our own address listed as a peer) is no conflict.
    let mut net = Net::new(vec![cfg(1)]);
    net.nodes[0].handle_connected(ConnId(7), Some(NodeId(1)), Time(0));
    net.nodes[0].handle_connected(ConnId(8), None, Time(0));
    let hello = net.nodes[0].poll_transmit();
    let Some(Transmit::Frame { bytes, .. }) = hello else {
        panic!("hello expected, got {hello:?}");
    };
    // Our own Hello (our incarnation) arrives at both ends: the accepting
    // end leaves the closing to the dialing end, which closes it as a
    // connection to ourselves (see discover.rs).
    net.nodes[0].handle_frame(ConnId(8), &bytes[wire::LEN_PREFIX..], Time(0));
    net.nodes[0].handle_frame(ConnId(7), &bytes[wire::LEN_PREFIX..], Time(0));
    net.collect();
    assert!(net.closes[0].contains(&(ConnId(7), CloseCode::WrongCluster)));
    assert_eq!(net.nodes[0].metrics().self_dials, 1);
    assert_eq!(net.nodes[0].metrics().node_id_conflicts, 0);
    assert!(
        !net.events[0]
            .iter()
            .any(|e| matches!(e, Event::Refused { .. }))
    );
}

#[test]
fn a_hello_must_name_the_certified_node_id() {
    for (certified, ok) in [
        (Some(NodeId(2)), true),
        (Some(NodeId(3)), false),
        (None, false),
    ] {
        let mut net = Net::new(vec![cfg(1), cfg(2)]);
        net.conns.push((ConnId(1), 1, 0));
        net.nodes[1].handle_connected(ConnId(1), Some(NodeId(1)), net.now);
        net.nodes[0].handle_connected(ConnId(1), None, net.now);
        net.nodes[0].handle_certified(ConnId(1), certified);
        net.run();
        assert_eq!(up(&net, 0, 1), ok, "{certified:?}");
        assert_eq!(up(&net, 1, 0), ok, "the peer learns at once");
        if !ok {
            assert!(net.closes[0].contains(&(ConnId(1), CloseCode::NotCertified)));
            assert_eq!(net.nodes[0].metrics().identity_refused, 1);
            assert!(net.events[0].contains(&Event::Refused {
                conn: ConnId(1),
                node: NodeId(2),
                why: Refusal::NotCertified { certified },
            }));
        }
    }
}

#[test]
fn duplicate_trunks_resolve_to_the_one_dialed_by_the_smaller_id() {
    for order in [false, true] {
        let mut net = Net::new(vec![cfg(1), cfg(2)]);
        // Both dial at once; delivery order varies.
        if order {
            net.dial(1, 0, 20);
            net.dial(0, 1, 10);
        } else {
            net.dial(0, 1, 10);
            net.dial(1, 0, 20);
        }
        net.run();
        assert!(up(&net, 0, 1) && up(&net, 1, 0));
        for i in 0..2 {
            assert!(
                net.closes[i].iter().all(|(c, _)| *c == ConnId(20)),
                "node {i} closed {:?}",
                net.closes[i]
            );
        }
        // The survivor carries traffic: RTT is measured on it.
        net.advance_silent(Time(1_000_000));
        assert!(net.nodes[0].snapshot().connections == 1);
    }
}

#[test]
fn silent_peer_is_dead_after_misses_then_redialed_with_backoff() {
    let mut a = cfg(1);
    a.heartbeat = Duration::from_secs(1);
    a.misses = 3;
    let mut net = Net::new(vec![a, cfg(2)]);
    net.nodes[0].add_peer(NodeId(2), Time(0));
    net.nodes[0].handle_timeout(Time(0));
    net.collect();
    assert_eq!(net.events[0], vec![Event::Redial { node: NodeId(2) }]);
    net.events[0].clear();
    net.dial(0, 1, 1);
    net.run();
    assert!(up(&net, 0, 1));
    // Silence from now on.
    net.advance_silent(Time(2_999_999));
    assert!(up(&net, 0, 1), "not dead before heartbeat × misses");
    net.advance_silent(Time(3_000_000));
    assert!(!up(&net, 0, 1), "dead at heartbeat × misses");
    assert!(net.events[0].iter().any(|e| matches!(
        e,
        Event::LinkDown {
            reason: CloseCode::Timeout,
            ..
        }
    )));
    // Redials: each failure doubles the delay (with jitter in [d/2, d]), capped at 10 s.
    let mut last = net.now;
    let mut delays = Vec::new();
    for _ in 0..12 {
        net.events[0].clear();
        let due = net.nodes[0].poll_timeout().expect("redial scheduled");
        net.nodes[0].handle_timeout(due);
        net.collect();
        assert!(net.events[0].contains(&Event::Redial { node: NodeId(2) }));
        delays.push(due.since(last));
        net.nodes[0].handle_dial_failed(NodeId(2), due);
        last = due;
    }
    let base = Duration::from_millis(100);
    for (k, d) in delays.iter().enumerate() {
        let full = base.saturating_mul(1 << k).min(Duration::from_secs(10));
        assert!(
            *d >= full / 2 && *d <= full,
            "attempt {k}: {d:?} vs {full:?}"
        );
    }
}

#[test]
fn rtt_is_measured_from_ping_pong() {
    let mut net = Net::new(vec![cfg(1), cfg(2)]);
    net.dial(0, 1, 1);
    net.run();
    net.now = Time(1_000_000);
    net.nodes[0].handle_timeout(net.now);
    net.nodes[1].handle_timeout(net.now);
    net.collect();
    net.now = Time(1_020_000); // 20 ms later the pings arrive and are answered
    net.run();
    assert_eq!(net.nodes[0].rtt(NodeId(2)), Some(Duration::from_millis(20)));
}

#[test]
fn shutdown_says_goodbye_and_the_peer_drops_everything_at_once() {
    let mut net = Net::new(vec![cfg(1), cfg(2)]);
    populate(&mut net, 0);
    populate(&mut net, 1);
    net.dial(0, 1, 1);
    net.run();
    net.nodes[1].shutdown(net.now);
    net.events[0].clear();
    net.run();
    assert!(!up(&net, 0, 1));
    assert!(net.events[0].contains(&Event::LinkDown {
        node: NodeId(2),
        reason: CloseCode::Shutdown
    }));
    let s = net.nodes[0].snapshot();
    // A peer we were not told to dial is forgotten entirely.
    assert!(
        s.peers
            .get(&NodeId(2))
            .is_none_or(|p| p.rooms.is_empty() && p.remote_open.is_empty())
    );
    assert!(net.nodes[1].open_room(room(), net.now).is_err());
}

#[test]
fn media_flows_only_to_subscribers_and_unknown_wire_ids_are_dropped() {
    let mut net = Net::new(vec![cfg(1), cfg(2), cfg(3)]);
    for i in 0..3 {
        populate(&mut net, i);
    }
    net.dial(0, 1, 1);
    net.dial(0, 2, 2);
    net.dial(1, 2, 3);
    net.run();
    let r = room();
    // Node 1 subscribes to layer 1 of node 2's track.
    let wire_id = net.nodes[0].snapshot().peers[&NodeId(2)].rooms[&r]
        .tracks
        .keys()
        .copied()
        .next()
        .expect("track");
    assert!(
        net.nodes[1]
            .should_send(NodeId(1), TrackId(1), Layer(1))
            .is_none()
    );
    net.nodes[0]
        .subscribe(&r, NodeId(2), wire_id, Layer(1))
        .expect("subscribe");
    net.run();
    assert!(net.events[1].contains(&Event::SubscribeRequested {
        room: r.clone(),
        node: NodeId(1),
        track: TrackId(1),
        layer: Layer(1)
    }));
    assert_eq!(
        net.nodes[1].should_send(NodeId(1), TrackId(1), Layer(1)),
        Some((ConnId(1), wire_id))
    );
    assert!(
        net.nodes[1]
            .should_send(NodeId(1), TrackId(1), Layer(0))
            .is_none()
    );
    assert!(
        net.nodes[1]
            .should_send(NodeId(3), TrackId(1), Layer(1))
            .is_none()
    );
    let mut d = Vec::new();
    let now = net.now;
    assert_eq!(
        net.nodes[1]
            .send_media(TrackId(1), Layer(1), b"rtp", now, now, &mut d)
            .targets,
        &[(NodeId(1), ConnId(1))]
    );
    assert!(
        net.nodes[1]
            .send_media(TrackId(1), Layer(0), b"rtp", now, now, &mut Vec::new())
            .is_empty(),
        "nobody wants layer 0"
    );
    let got = net.nodes[0]
        .handle_datagram(ConnId(1), &d, now)
        .expect("accepted");
    assert_eq!((got.node, got.packet), (NodeId(2), &b"rtp"[..]));
    wire::encode_datagram(WireId(4242), 0, b"rtp", &mut d);
    assert!(net.nodes[0].handle_datagram(ConnId(1), &d, now).is_none());
    assert!(net.nodes[0].handle_datagram(ConnId(77), &d, now).is_none());
    assert_eq!(net.nodes[0].metrics().unknown_wire_drops, 2);

    net.nodes[0]
        .unsubscribe(&r, NodeId(2), wire_id, Layer(1))
        .expect("unsubscribe");
    net.run();
    assert!(
        net.nodes[1]
            .should_send(NodeId(1), TrackId(1), Layer(1))
            .is_none()
    );
    // Unpublish: the track disappears everywhere; its datagrams are now unknown.
    net.nodes[1]
        .unpublish_track(&r, TrackId(1))
        .expect("unpublish");
    net.run();
    wire::encode_datagram(wire_id, 0, b"rtp", &mut d);
    assert!(net.nodes[0].handle_datagram(ConnId(1), &d, now).is_none());
}

#[test]
fn keyframe_requests_are_coalesced_and_rate_limited() {
    // A 500 ms interval (the default is shorter) makes the schedule below
    // easy to read.
    let slow = |id| {
        let mut c = cfg(id);
        c.keyframe_interval = Duration::from_millis(500);
        c
    };
    let mut net = Net::new(vec![slow(1), slow(2), slow(3)]);
    for i in 0..3 {
        populate(&mut net, i);
    }
    net.dial(0, 1, 1);
    net.dial(2, 1, 2);
    net.run();
    let r = room();
    let wire_of = |net: &Net, i: usize| {
        net.nodes[i].snapshot().peers[&NodeId(2)].rooms[&r]
            .tracks
            .keys()
            .copied()
            .next()
            .expect("track")
    };
    let (w0, w2) = (wire_of(&net, 0), wire_of(&net, 2));
    let count = |net: &Net| {
        net.events[1]
            .iter()
            .filter(|e| matches!(e, Event::KeyframeRequested { .. }))
            .count()
    };
    // Bursts from two subscriber nodes within the interval: one keyframe now…
    for k in 0..5u64 {
        net.now = Time(k * 10_000);
        net.nodes[0]
            .request_keyframe(&r, NodeId(2), w0, net.now)
            .expect("request");
        net.nodes[2]
            .request_keyframe(&r, NodeId(2), w2, net.now)
            .expect("request");
        net.run();
    }
    assert_eq!(count(&net), 1);
    // …then at most one per interval (500 ms): each subscriber's coalesced
    // request arrives at 500 ms; the origin lets one through and holds the
    // other until 1000 ms. Nothing after that.
    let mut seen = Vec::new();
    for t in [
        400_000u64, 500_000, 520_000, 999_000, 1_000_000, 1_100_000, 3_000_000,
    ] {
        net.now = Time(t);
        for n in &mut net.nodes {
            n.handle_timeout(Time(t));
        }
        net.run();
        seen.push(count(&net));
    }
    assert_eq!(seen, [1, 2, 2, 2, 3, 3, 3], "{:?}", net.events[1]);
}

#[test]
fn data_is_relayed_in_order() {
    let mut net = Net::new(vec![cfg(1), cfg(2)]);
    populate(&mut net, 0);
    populate(&mut net, 1);
    net.dial(0, 1, 1);
    net.run();
    for k in 0..50u8 {
        net.nodes[0]
            .send_data(&room(), ParticipantId(10), &[k])
            .expect("send");
    }
    net.run();
    let got: Vec<u8> = net.events[1]
        .iter()
        .filter_map(|e| match e {
            Event::DataReceived { payload, .. } => payload.first().copied(),
            _ => None,
        })
        .collect();
    assert_eq!(got, (0..50).collect::<Vec<u8>>());
    assert!(
        net.nodes[0]
            .send_data(&room(), ParticipantId(10), &vec![0; 70_000])
            .is_err()
    );
}

#[test]
fn a_peer_re_opening_rooms_too_fast_or_opening_too_many_is_cut() {
    use trunk::proto::Generation;
    let mut net = Net::new(vec![cfg(1), cfg(2)]);
    net.dial(0, 1, 1);
    net.run();
    populate(&mut net, 0);
    net.run();
    let open = |room: &str, g: u64| {
        let f = wire::encode_frame(&Message::Open {
            room: RoomName::new(room).expect("valid"),
            generation: Generation(g),
        })
        .expect("encodes");
        f[wire::LEN_PREFIX..].to_vec()
    };
    // The peer opens the room, then ten new lifetimes of it at once pass
    // (a burst); the eleventh within the same second cuts the trunk.
    for g in 0..=10 {
        net.nodes[0].handle_frame(ConnId(1), &open("standup", 1000 + g), net.now);
        net.run();
        assert!(up(&net, 0, 1), "re-open {g} is within the budget");
    }
    net.nodes[0].handle_frame(ConnId(1), &open("standup", 2000), net.now);
    net.run();
    assert!(!up(&net, 0, 1));
    assert!(net.closes[0].contains(&(ConnId(1), CloseCode::ProtocolError)));
    assert_eq!(net.nodes[0].metrics().open_floods, 1);

    // Too many rooms open towards us: cut likewise.
    let mut c = cfg(1);
    c.max_remote_rooms = 3;
    let mut net = Net::new(vec![c, cfg(2)]);
    net.dial(0, 1, 1);
    net.run();
    for (i, room) in ["a", "b", "c"].into_iter().enumerate() {
        net.nodes[0].handle_frame(ConnId(1), &open(room, i as u64), net.now);
        net.run();
        assert!(up(&net, 0, 1));
    }
    net.nodes[0].handle_frame(ConnId(1), &open("d", 9), net.now);
    net.run();
    assert!(!up(&net, 0, 1));
    assert_eq!(net.nodes[0].metrics().open_floods, 1);
}
