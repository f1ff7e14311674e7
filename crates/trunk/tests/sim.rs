//! Deterministic simulation of 2–6 trunk nodes over a simulated network with
//! virtual time (see DESIGN.md, "Invariants").
//!
//! Each seed draws a cluster size and a schedule of participant joins and
//! leaves (including rapid join-leave-join), publishes, subscriptions,
//! keyframe requests, chat, link cuts and restores, crashes with restart (new
//! incarnation), graceful shutdowns and junk datagrams, with random message
//! delays. The network keeps each connection's stream in order and reorders
//! across connections. After the schedule, everything is healed, the cluster
//! settles, and all six invariants are checked; then every participant leaves
//! and "no leaks" is checked.
//!
//! `SIM_SEEDS=N` runs N seeds (default 2000); `SIM_SEED=S` replays one seed;
//! `SIM_TRACE=1` prints what happens.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use trunk::proto::wire;
use trunk::proto::{
    CodecParams, Config, ConnId, Event, Incarnation, Layer, Node, NodeId, ParticipantId,
    ParticipantInfo, PlantedBugs, RoomName, Time, TrackId, TrackInfo, TrackKind, TrackSource,
    Transmit, WireId,
};

const HEARTBEAT: Duration = Duration::from_secs(1);
const MISSES: u32 = 3;
const MAX_DELAY_MS: u64 = 50;
/// Rare long delays during the fault phase.
const MAX_LONG_DELAY_MS: u64 = 900;
/// Long enough for a broken trunk to be declared dead (3 s), the longest
/// redial backoff (10 s cap) and a resync.
const SETTLE: Duration = Duration::from_secs(16);
/// Totals over a run, printed so a reader can see the schedules did work.
static STATS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];
const STAT_NAMES: [&str; 6] = [
    "remote tracks checked at settle",
    "stale drops",
    "link ups",
    "crashes+shutdowns",
    "frames",
    "subscriptions checked",
];

fn stat(i: usize, n: u64) {
    STATS[i].fetch_add(n, Ordering::Relaxed);
}

const ROOMS: [&str; 3] = ["standup", "retro", "lunch"];

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[derive(Debug)]
enum Ev {
    /// One frame on a connection, to one side.
    Deliver {
        conn: u64,
        to: usize,
        bytes: Vec<u8>,
    },
    /// The other side closed the connection.
    Lost {
        conn: u64,
        to: usize,
    },
    /// A dial completes (or fails, if either side is gone or the path is cut).
    Connect {
        conn: u64,
    },
    Timer {
        node: usize,
        epoch: u64,
    },
    /// A random action; `calm` ones never cut, crash or inject junk.
    Act {
        calm: bool,
    },
    Restart {
        node: usize,
    },
    /// Invariant 3: nothing learned from `node`'s `incarnation` may remain.
    GhostCheck {
        node: usize,
        incarnation: Incarnation,
        among: Vec<usize>,
    },
}

#[derive(Debug)]
struct SimConn {
    /// (node index, epoch) of dialer and acceptor.
    ends: [(usize, u64); 2],
    broken: bool,
    /// Each direction is one ordered stream: deliveries never overtake.
    last: [Time; 2],
}

/// One node: the protocol state machine plus a model of its local SFU,
/// built only from the events the node emitted.
struct SimNode {
    id: NodeId,
    alive: bool,
    epoch: u64,
    node: Node,
    timer: Option<Time>,
    participants: BTreeMap<ParticipantId, RoomName>,
    tracks: BTreeMap<TrackId, (RoomName, ParticipantId, WireId)>,
    remote_tracks: BTreeMap<(RoomName, NodeId, WireId), TrackInfo>,
    remote_participants: BTreeMap<(RoomName, NodeId, ParticipantId), ParticipantInfo>,
    /// What the local SFU subscribed to.
    wanted: BTreeMap<(RoomName, NodeId, WireId), BTreeSet<Layer>>,
    /// What peers asked of our tracks (from Subscribe events).
    subscribers: BTreeMap<(RoomName, NodeId, TrackId), BTreeSet<Layer>>,
    data_seen: BTreeMap<(NodeId, ParticipantId), u64>,
}

struct Sim {
    seed: u64,
    rng: ChaCha8Rng,
    now: Time,
    seq: u64,
    queue: BinaryHeap<Reverse<(Time, u64)>>,
    pending: HashMap<u64, Ev>,
    nodes: Vec<SimNode>,
    conns: HashMap<u64, SimConn>,
    cuts: BTreeSet<(usize, usize)>,
    next_conn: u64,
    next_id: u64,
    bugs: PlantedBugs,
    trace: bool,
    violation: Option<String>,
    /// Fault phase: long delays allowed.
    chaos: bool,
    /// `SIM_DUMP_CORPUS=dir`: frames delivered per connection direction,
    /// written out as seed inputs for the `frame` fuzz target.
    dump: Option<BTreeMap<(u64, usize), Vec<u8>>>,
}

fn config(id: NodeId, bugs: PlantedBugs) -> Config {
    let mut c = Config::new(id, "sim");
    c.heartbeat = HEARTBEAT;
    c.misses = MISSES;
    c.bugs = bugs;
    c
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Sim {
    fn new(seed: u64, bugs: PlantedBugs) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = rng.random_range(2..=6usize);
        let nodes = (0..n)
            .map(|i| {
                let id = NodeId(i as u64 + 1);
                SimNode {
                    id,
                    alive: true,
                    epoch: 0,
                    node: Node::new(config(id, bugs), rng.random()),
                    timer: None,
                    participants: BTreeMap::new(),
                    tracks: BTreeMap::new(),
                    remote_tracks: BTreeMap::new(),
                    remote_participants: BTreeMap::new(),
                    wanted: BTreeMap::new(),
                    subscribers: BTreeMap::new(),
                    data_seen: BTreeMap::new(),
                }
            })
            .collect();
        Sim {
            seed,
            rng,
            now: Time(0),
            seq: 0,
            queue: BinaryHeap::new(),
            pending: HashMap::new(),
            nodes,
            conns: HashMap::new(),
            cuts: BTreeSet::new(),
            next_conn: 1,
            next_id: 1,
            bugs,
            trace: std::env::var("SIM_TRACE").is_ok(),
            violation: None,
            chaos: true,
            dump: std::env::var("SIM_DUMP_CORPUS")
                .ok()
                .map(|_| BTreeMap::new()),
        }
    }

    fn fail(&mut self, msg: String) {
        if self.violation.is_none() {
            self.violation = Some(format!("t={}ms: {msg}", self.now.0 / 1000));
        }
    }

    fn at(&mut self, t: Time, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((t, self.seq)));
        self.pending.insert(self.seq, ev);
    }

    fn delay(&mut self) -> Duration {
        // While faults are injected, a few messages are held much longer
        // (still under one heartbeat, so "no ghosts" keeps its bound).
        if self.chaos && self.rng.random_bool(0.02) {
            return ms(self.rng.random_range(MAX_DELAY_MS..=MAX_LONG_DELAY_MS));
        }
        ms(self.rng.random_range(0..=MAX_DELAY_MS))
    }

    fn add_peers(&mut self, i: usize) {
        let ids: Vec<NodeId> = self.nodes.iter().map(|n| n.id).collect();
        let now = self.now;
        for id in ids {
            self.nodes[i].node.add_peer(id, now);
        }
        self.pump(i);
    }

    /// Drain a node's outputs into the network and its SFU model.
    fn pump(&mut self, i: usize) {
        while let Some(t) = self.nodes[i].node.poll_transmit() {
            match t {
                Transmit::Frame { conn, bytes } => self.send(i, conn.0, Some(bytes)),
                Transmit::Close { conn, .. } => self.send(i, conn.0, None),
            }
        }
        while let Some(ev) = self.nodes[i].node.poll_event() {
            self.on_event(i, ev);
        }
        if let Err(e) = self.nodes[i].node.check_structure() {
            self.fail(format!("node {}: {e}", i + 1));
        }
        let t = self.nodes[i].node.poll_timeout();
        if t.is_some() && t != self.nodes[i].timer {
            self.nodes[i].timer = t;
            let at = t.unwrap_or(self.now).max(self.now);
            let epoch = self.nodes[i].epoch;
            self.at(at, Ev::Timer { node: i, epoch });
        }
    }

    fn send(&mut self, from: usize, conn: u64, bytes: Option<Vec<u8>>) {
        let d = self.delay();
        let now = self.now;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let side = if c.ends[0].0 == from { 0 } else { 1 };
        let to = c.ends[1 - side].0;
        if self.cuts.contains(&pair(from, to)) {
            c.broken = true;
        }
        if c.broken {
            return;
        }
        let t = (now + d).max(c.last[side]);
        c.last[side] = t;
        let ev = match bytes {
            Some(bytes) => Ev::Deliver {
                conn,
                to: 1 - side,
                bytes,
            },
            None => {
                // Nothing more flows from this side after a close.
                c.broken = true;
                Ev::Lost { conn, to: 1 - side }
            }
        };
        self.at(t, ev);
    }

    fn end_alive(&self, conn: u64, side: usize) -> Option<usize> {
        let c = self.conns.get(&conn)?;
        let (i, epoch) = c.ends[side];
        let n = &self.nodes[i];
        (n.alive && n.epoch == epoch).then_some(i)
    }

    fn on_event(&mut self, i: usize, ev: Event) {
        if self.trace {
            eprintln!("  [{}ms] node {} event {ev:?}", self.now.0 / 1000, i + 1);
        }
        let open =
            |s: &Self, room: &RoomName| s.nodes[i].node.snapshot().local_rooms.contains_key(room);
        match ev {
            Event::Redial { node } => {
                let target = (node.0 - 1) as usize;
                let conn = self.next_conn;
                self.next_conn += 1;
                let ends = [(i, self.nodes[i].epoch), (target, self.nodes[target].epoch)];
                self.conns.insert(
                    conn,
                    SimConn {
                        ends,
                        broken: false,
                        last: [Time(0); 2],
                    },
                );
                let d = self.delay();
                self.at(self.now + d + ms(1), Ev::Connect { conn });
            }
            Event::LinkUp { .. } => {}
            Event::LinkDown { node, .. } => {
                let n = &self.nodes[i];
                if n.remote_tracks.keys().any(|k| k.1 == node)
                    || n.remote_participants.keys().any(|k| k.1 == node)
                    || n.subscribers.keys().any(|k| k.1 == node)
                {
                    self.fail(format!(
                        "node {}: link to {node:?} down before its state was removed",
                        i + 1
                    ));
                }
            }
            Event::RemoteParticipantAdded {
                room,
                node,
                participant,
            } => {
                if !open(self, &room) {
                    self.fail(format!(
                        "node {}: participant event for room {room} not open",
                        i + 1
                    ));
                }
                let key = (room, node, participant.id);
                if self.nodes[i]
                    .remote_participants
                    .insert(key.clone(), participant)
                    .is_some()
                {
                    self.fail(format!("node {}: participant {key:?} added twice", i + 1));
                }
            }
            Event::RemoteParticipantRemoved {
                room,
                node,
                participant,
            } => {
                let key = (room, node, participant);
                if self.nodes[i].remote_participants.remove(&key).is_none() {
                    self.fail(format!(
                        "node {}: removal of unknown participant {key:?}",
                        i + 1
                    ));
                }
            }
            Event::RemoteTrackAdded {
                room,
                node,
                wire_id,
                track,
            } => {
                if !open(self, &room) {
                    self.fail(format!(
                        "node {}: track event for room {room} not open",
                        i + 1
                    ));
                }
                let key = (room, node, wire_id);
                if self.nodes[i]
                    .remote_tracks
                    .insert(key.clone(), track)
                    .is_some()
                {
                    self.fail(format!(
                        "node {}: track {key:?} added twice (exactly once)",
                        i + 1
                    ));
                }
            }
            Event::RemoteTrackRemoved {
                room,
                node,
                wire_id,
            } => {
                let key = (room, node, wire_id);
                if self.nodes[i].remote_tracks.remove(&key).is_none() {
                    self.fail(format!("node {}: removal of unknown track {key:?}", i + 1));
                }
                self.nodes[i].wanted.remove(&key);
            }
            Event::SubscribeRequested {
                room,
                node,
                track,
                layer,
            } => {
                if !self.nodes[i].tracks.contains_key(&track) {
                    self.fail(format!(
                        "node {}: subscribe to unknown local track {track:?}",
                        i + 1
                    ));
                }
                let fresh = self.nodes[i]
                    .subscribers
                    .entry((room, node, track))
                    .or_default()
                    .insert(layer);
                if !fresh {
                    self.fail(format!("node {}: duplicate SubscribeRequested", i + 1));
                }
            }
            Event::SubscribeCancelled {
                room,
                node,
                track,
                layer,
            } => {
                let key = (room, node, track);
                let subs = &mut self.nodes[i].subscribers;
                let had = subs.get_mut(&key).is_some_and(|l| l.remove(&layer));
                if subs.get(&key).is_some_and(|l| l.is_empty()) {
                    subs.remove(&key);
                }
                if !had {
                    self.fail(format!(
                        "node {}: SubscribeCancelled without request {key:?}",
                        i + 1
                    ));
                }
            }
            Event::KeyframeRequested { track, .. } => {
                if !self.nodes[i].tracks.contains_key(&track) {
                    self.fail(format!(
                        "node {}: keyframe request for unknown track",
                        i + 1
                    ));
                }
            }
            Event::DataReceived {
                room,
                node,
                from,
                payload,
            } => {
                if !open(self, &room) {
                    self.fail(format!("node {}: data for room {room} not open", i + 1));
                }
                let seq = payload
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes);
                let Some(seq) = seq else {
                    self.fail("bad data payload".into());
                    return;
                };
                let last = self.nodes[i].data_seen.insert((node, from), seq);
                if last.is_some_and(|l| l >= seq) {
                    self.fail(format!(
                        "node {}: data out of order from {node:?}/{from:?}",
                        i + 1
                    ));
                }
            }
        }
    }

    fn run_until(&mut self, end: Time) {
        while let Some(Reverse((t, seq))) = self.queue.peek().copied() {
            if t > end || self.violation.is_some() {
                break;
            }
            self.queue.pop();
            self.now = t;
            let Some(ev) = self.pending.remove(&seq) else {
                continue;
            };
            if self.trace && !matches!(ev, Ev::Timer { .. }) {
                eprintln!("[{}ms] {}", t.0 / 1000, describe(&ev));
            }
            self.step(ev);
        }
        self.now = self.now.max(end);
    }

    fn step(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::Deliver { conn, to, bytes } => {
                let Some(i) = self.end_alive(conn, to) else {
                    return;
                };
                if let Some(d) = self.dump.as_mut() {
                    let stream = d.entry((conn, to)).or_default();
                    if stream.len() < 4096 {
                        stream.extend_from_slice(&bytes);
                    }
                }
                match wire::split_frame(&bytes) {
                    Ok(Some((body, used))) if used == bytes.len() => {
                        self.nodes[i].node.handle_frame(ConnId(conn), body, now)
                    }
                    other => self.fail(format!("network carried a bad frame: {other:?}")),
                }
                self.pump(i);
            }
            Ev::Lost { conn, to } => {
                if let Some(i) = self.end_alive(conn, to) {
                    self.nodes[i].node.handle_lost(ConnId(conn), now);
                    self.pump(i);
                }
            }
            Ev::Connect { conn } => {
                let (a, b) = (self.end_alive(conn, 0), self.end_alive(conn, 1));
                let Some(a) = a else { return };
                let ok = match b {
                    Some(b) => !self.cuts.contains(&pair(a, b)),
                    None => false,
                };
                if let (true, Some(b)) = (ok, b) {
                    let target = self.nodes[b].id;
                    self.nodes[a]
                        .node
                        .handle_connected(ConnId(conn), Some(target), now);
                    self.nodes[b].node.handle_connected(ConnId(conn), None, now);
                    self.pump(a);
                    self.pump(b);
                } else {
                    let target = self.conns[&conn].ends[1].0;
                    let id = self.nodes[target].id;
                    self.conns.remove(&conn);
                    self.nodes[a].node.handle_dial_failed(id, now);
                    self.pump(a);
                }
            }
            Ev::Timer { node, epoch } => {
                let n = &mut self.nodes[node];
                if !n.alive || n.epoch != epoch || n.timer.is_none_or(|t| t > now) {
                    return;
                }
                n.timer = None;
                n.node.handle_timeout(now);
                self.pump(node);
            }
            Ev::Act { calm } => self.act(calm),
            Ev::Restart { node } => self.restart(node),
            Ev::GhostCheck {
                node,
                incarnation,
                among,
            } => {
                let id = self.nodes[node].id;
                for (j, other) in self.nodes.iter().enumerate() {
                    if !other.alive || j == node || !among.contains(&j) {
                        continue;
                    }
                    let snap = other.node.snapshot();
                    if let Some(p) = snap.peers.get(&id)
                        && p.up
                        && p.incarnation == Some(incarnation)
                    {
                        let msg = format!(
                            "no ghosts: node {} still holds dead node {}'s old trunk",
                            j + 1,
                            node + 1
                        );
                        self.fail(msg);
                        return;
                    }
                }
            }
        }
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn alive(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].alive)
            .collect()
    }

    fn pick<T: Clone>(&mut self, v: &[T]) -> Option<T> {
        if v.is_empty() {
            None
        } else {
            Some(v[self.rng.random_range(0..v.len())].clone())
        }
    }

    fn join(&mut self, i: usize, room: RoomName) {
        let now = self.now;
        let n = &mut self.nodes[i];
        if !n.participants.values().any(|r| *r == room)
            && let Err(e) = n.node.open_room(room.clone(), now)
        {
            self.fail(format!("open_room: {e}"));
            return;
        }
        let id = ParticipantId(self.new_id());
        let info = ParticipantInfo {
            id,
            display_name: format!("p{}", id.0),
        };
        let n = &mut self.nodes[i];
        let r = n.node.participant_joined(&room, info);
        n.participants.insert(id, room);
        if let Err(e) = r {
            self.fail(format!("participant_joined: {e}"));
        }
        self.pump(i);
    }

    fn leave(&mut self, i: usize, pid: ParticipantId) {
        let now = self.now;
        let n = &mut self.nodes[i];
        let Some(room) = n.participants.remove(&pid) else {
            return;
        };
        let gone: Vec<TrackId> = n
            .tracks
            .iter()
            .filter(|(_, (_, p, _))| *p == pid)
            .map(|(t, _)| *t)
            .collect();
        for t in &gone {
            n.tracks.remove(t);
            n.subscribers.retain(|k, _| k.2 != *t);
        }
        let r = n.node.participant_left(&room, pid);
        let mut err = r.err().map(|e| format!("participant_left: {e}"));
        if !n.participants.values().any(|r| *r == room)
            && let Err(e) = n.node.close_room(&room, now)
        {
            err = Some(format!("close_room: {e}"));
        }
        if let Some(e) = err {
            self.fail(e);
        }
        self.pump(i);
        // Closing a room must have told the SFU to drop everything in it.
        let n = &self.nodes[i];
        if !n.participants.values().any(|r| *r == room)
            && (n.remote_tracks.keys().any(|k| k.0 == room)
                || n.remote_participants.keys().any(|k| k.0 == room)
                || n.wanted.keys().any(|k| k.0 == room))
        {
            self.fail(format!(
                "node {}: closed room {room} but remote state remains",
                i + 1
            ));
        }
    }

    fn crash(&mut self, i: usize, graceful: bool) {
        let now = self.now;
        let incarnation = self.nodes[i].node.incarnation();
        stat(3, 1);
        self.collect(i);
        if graceful {
            self.nodes[i].node.shutdown(now);
            self.pump(i);
        }
        let n = &mut self.nodes[i];
        n.alive = false;
        n.epoch += 1;
        n.timer = None;
        // A crash breaks every trunk of the node without a word; sometimes
        // the transport's idle timeout (~3.2 s) reports it before the
        // heartbeat does.
        let mut lost = Vec::new();
        for (id, c) in self.conns.iter_mut() {
            if c.ends[0].0 == i || c.ends[1].0 == i {
                c.broken = c.broken || !graceful;
                if !graceful {
                    let other = if c.ends[0].0 == i { 1 } else { 0 };
                    lost.push((*id, other));
                }
            }
        }
        lost.sort_unstable();
        for (conn, to) in lost {
            if self.rng.random_bool(0.5) {
                let t = now + ms(self.rng.random_range(2900..3300));
                self.at(t, Ev::Lost { conn, to });
            }
        }
        // Within heartbeat × misses + one heartbeat, every node forgets it;
        // after a Goodbye, every node it could still reach forgets it at once.
        let everyone: Vec<usize> = (0..self.nodes.len()).collect();
        self.at(
            now + HEARTBEAT * (MISSES + 1),
            Ev::GhostCheck {
                node: i,
                incarnation,
                among: everyone,
            },
        );
        if graceful {
            let reachable: Vec<usize> = (0..self.nodes.len())
                .filter(|&j| {
                    self.conns.values().all(|c| {
                        let ends = [c.ends[0].0, c.ends[1].0];
                        let current = c
                            .ends
                            .iter()
                            .all(|(k, e)| *k == i || self.nodes[*k].epoch == *e);
                        !(ends.contains(&i) && ends.contains(&j) && current && c.broken)
                    })
                })
                .collect();
            self.at(
                now + ms(MAX_LONG_DELAY_MS + MAX_DELAY_MS + 1),
                Ev::GhostCheck {
                    node: i,
                    incarnation,
                    among: reachable,
                },
            );
        }
        let back = ms(self.rng.random_range(0..5000));
        self.at(now + back, Ev::Restart { node: i });
    }

    fn restart(&mut self, i: usize) {
        if self.nodes[i].alive {
            return;
        }
        let seed = self.rng.random();
        let n = &mut self.nodes[i];
        n.alive = true;
        n.node = Node::new(config(n.id, self.bugs), seed);
        n.participants.clear();
        n.tracks.clear();
        n.remote_tracks.clear();
        n.remote_participants.clear();
        n.wanted.clear();
        n.subscribers.clear();
        n.data_seen.clear();
        self.add_peers(i);
    }

    /// One random action, chosen from the current state.
    fn act(&mut self, calm: bool) {
        let alive = self.alive();
        let Some(i) = self.pick(&alive) else { return };
        let now = self.now;
        let roll = self.rng.random_range(0..if calm { 85 } else { 100 });
        let room = RoomName::new(ROOMS[self.rng.random_range(0..ROOMS.len())]).expect("valid room");
        let pids: Vec<ParticipantId> = self.nodes[i].participants.keys().copied().collect();
        match roll {
            0..=21 => self.join(i, room),
            22..=31 => {
                if let Some(p) = self.pick(&pids) {
                    self.leave(i, p);
                }
            }
            32..=37 => {
                // Rapid join-leave-join: the short-lived connection race.
                self.join(i, room.clone());
                if let Some((&p, _)) = self.nodes[i]
                    .participants
                    .iter()
                    .rev()
                    .find(|(_, r)| **r == room)
                {
                    self.leave(i, p);
                }
                self.join(i, room);
            }
            38..=51 => {
                let Some(p) = self.pick(&pids) else { return };
                let room = self.nodes[i].participants[&p].clone();
                let tid = TrackId(self.new_id());
                let layers = self.rng.random_range(1..=3);
                let info = TrackInfo {
                    participant: p,
                    kind: if layers > 1 {
                        TrackKind::Video
                    } else {
                        TrackKind::Audio
                    },
                    source: if layers > 1 {
                        TrackSource::Camera
                    } else {
                        TrackSource::Microphone
                    },
                    codec: CodecParams {
                        mime_type: "video/VP8".into(),
                        clock_rate: 90_000,
                        channels: None,
                        payload_type: 96,
                        fmtp: String::new(),
                    },
                    layers: (0..layers).map(|l| format!("l{l}")).collect(),
                };
                match self.nodes[i].node.publish_track(&room, tid, info) {
                    Ok(wire) => {
                        self.nodes[i].tracks.insert(tid, (room, p, wire));
                    }
                    Err(e) => self.fail(format!("publish_track: {e}")),
                }
                self.pump(i);
            }
            52..=57 => {
                let tracks: Vec<(TrackId, RoomName)> = self.nodes[i]
                    .tracks
                    .iter()
                    .map(|(t, (r, _, _))| (*t, r.clone()))
                    .collect();
                let Some((t, room)) = self.pick(&tracks) else {
                    return;
                };
                self.nodes[i].tracks.remove(&t);
                self.nodes[i].subscribers.retain(|k, _| k.2 != t);
                if let Err(e) = self.nodes[i].node.unpublish_track(&room, t) {
                    self.fail(format!("unpublish_track: {e}"));
                }
                self.pump(i);
            }
            58..=69 => {
                let remote: Vec<(RoomName, NodeId, WireId)> =
                    self.nodes[i].remote_tracks.keys().cloned().collect();
                let Some((room, node, wire)) = self.pick(&remote) else {
                    return;
                };
                let layer = Layer(self.rng.random_range(0..3));
                if let Err(e) = self.nodes[i].node.subscribe(&room, node, wire, layer) {
                    self.fail(format!("subscribe to a track the SFU was told about: {e}"));
                }
                self.nodes[i]
                    .wanted
                    .entry((room, node, wire))
                    .or_default()
                    .insert(layer);
                self.pump(i);
            }
            70..=74 => {
                let subs: Vec<((RoomName, NodeId, WireId), Layer)> = self.nodes[i]
                    .wanted
                    .iter()
                    .flat_map(|(k, ls)| ls.iter().map(move |l| (k.clone(), *l)))
                    .collect();
                let Some(((room, node, wire), layer)) = self.pick(&subs) else {
                    return;
                };
                if let Err(e) = self.nodes[i].node.unsubscribe(&room, node, wire, layer) {
                    self.fail(format!("unsubscribe: {e}"));
                }
                let w = &mut self.nodes[i].wanted;
                if let Some(ls) = w.get_mut(&(room.clone(), node, wire)) {
                    ls.remove(&layer);
                    if ls.is_empty() {
                        w.remove(&(room, node, wire));
                    }
                }
                self.pump(i);
            }
            75..=78 => {
                let subs: Vec<(RoomName, NodeId, WireId)> =
                    self.nodes[i].wanted.keys().cloned().collect();
                let Some((room, node, wire)) = self.pick(&subs) else {
                    return;
                };
                if let Err(e) = self.nodes[i].node.request_keyframe(&room, node, wire, now) {
                    self.fail(format!("request_keyframe: {e}"));
                }
                self.pump(i);
            }
            79..=84 => {
                let Some(p) = self.pick(&pids) else { return };
                let room = self.nodes[i].participants[&p].clone();
                let seq = self.new_id();
                let mut payload = seq.to_be_bytes().to_vec();
                payload.extend_from_slice(b"hello");
                if let Err(e) = self.nodes[i].node.send_data(&room, p, &payload) {
                    self.fail(format!("send_data: {e}"));
                }
                self.pump(i);
            }
            85..=88 => {
                let Some(j) = self.pick(&alive) else { return };
                if i != j {
                    self.cuts.insert(pair(i, j));
                }
            }
            89..=91 => {
                let cuts: Vec<(usize, usize)> = self.cuts.iter().copied().collect();
                if let Some(c) = self.pick(&cuts) {
                    self.cuts.remove(&c);
                }
            }
            92..=94 => self.crash(i, false),
            95..=96 => self.crash(i, true),
            _ => {
                // Junk media: an unknown wire id must be dropped and counted.
                let conns: Vec<u64> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| {
                        !c.broken && c.ends[1].0 == i && c.ends[1].1 == self.nodes[i].epoch
                    })
                    .map(|(k, _)| *k)
                    .collect();
                let mut conns = conns;
                conns.sort_unstable();
                let Some(conn) = self.pick(&conns) else {
                    return;
                };
                let mut dgram = Vec::new();
                wire::encode_datagram(
                    WireId(self.rng.random_range(1 << 30..u32::MAX)),
                    self.now.0,
                    b"rtp",
                    &mut dgram,
                );
                let before = self.nodes[i].node.metrics().unknown_wire_drops;
                let now = self.now;
                if self.nodes[i]
                    .node
                    .handle_datagram(ConnId(conn), &dgram, now)
                    .is_some()
                {
                    self.fail("a datagram with an unknown wire id was accepted".into());
                }
                if self.nodes[i].node.metrics().unknown_wire_drops != before + 1 {
                    self.fail("unknown wire id drop not counted".into());
                }
                // Sometimes a corrupt control frame too: the trunk must close
                // (Goodbye) and the cluster recover through redial + resync.
                if self.rng.random_bool(0.3) {
                    let errors = self.nodes[i].node.metrics().protocol_errors;
                    self.nodes[i]
                        .node
                        .handle_frame(ConnId(conn), &[0xff; 3], now);
                    if self.nodes[i].node.metrics().protocol_errors > errors + 1 {
                        self.fail("one bad frame counted twice".into());
                    }
                    self.pump(i);
                }
            }
        }
    }

    fn collect(&self, i: usize) {
        let m = self.nodes[i].node.metrics();
        stat(1, m.stale_drops);
        stat(2, m.link_ups);
        stat(4, m.frames_in);
    }

    fn heal(&mut self) {
        self.chaos = false;
        self.cuts.clear();
        for i in 0..self.nodes.len() {
            if !self.nodes[i].alive {
                self.restart(i);
            }
        }
    }

    /// Invariants 1, 2 and 4 on a settled cluster; returns the first violation.
    fn check_settled(&mut self) {
        let snaps: Vec<_> = self.nodes.iter().map(|n| n.node.snapshot()).collect();
        for (a, sa) in snaps.iter().enumerate() {
            let na = &self.nodes[a];
            for (b, sb) in snaps.iter().enumerate() {
                if a == b {
                    continue;
                }
                let idb = self.nodes[b].id;
                let Some(pa) = sa.peers.get(&idb).filter(|p| p.up) else {
                    return self.fail(format!(
                        "convergence: trunk {}->{} not up after settling",
                        a + 1,
                        b + 1
                    ));
                };
                if pa.incarnation != sb.incarnation {
                    return self.fail(format!(
                        "convergence: node {} holds a stale incarnation of {}",
                        a + 1,
                        b + 1
                    ));
                }
                let b_open: BTreeMap<_, _> = sb
                    .local_rooms
                    .iter()
                    .map(|(r, l)| (r.clone(), l.generation))
                    .collect();
                if pa.remote_open != b_open {
                    return self.fail(format!(
                        "convergence: node {} thinks {} has {:?}, it has {:?}",
                        a + 1,
                        b + 1,
                        pa.remote_open,
                        b_open
                    ));
                }
                for (room, la) in &sa.local_rooms {
                    let link = pa.rooms.get(room);
                    match sb.local_rooms.get(room) {
                        Some(lb) => {
                            let Some(link) = link else {
                                return self.fail(format!(
                                    "convergence: room link {room} {}->{} down",
                                    a + 1,
                                    b + 1
                                ));
                            };
                            if link.tracks != lb.tracks || link.participants != lb.participants {
                                return self.fail(format!(
                                    "convergence: node {} view of {}'s room {room} differs",
                                    a + 1,
                                    b + 1
                                ));
                            }
                            // The SFU model (from events) agrees with the core.
                            let ev_tracks: BTreeMap<WireId, TrackInfo> = na
                                .remote_tracks
                                .iter()
                                .filter(|(k, _)| k.0 == *room && k.1 == idb)
                                .map(|(k, v)| (k.2, v.clone()))
                                .collect();
                            stat(0, ev_tracks.len() as u64);
                            if ev_tracks != lb.tracks {
                                return self.fail(format!(
                                    "exactly once: node {} events for {}'s tracks in {room} differ",
                                    a + 1,
                                    b + 1
                                ));
                            }
                            let ev_parts: usize = na
                                .remote_participants
                                .keys()
                                .filter(|k| k.0 == *room && k.1 == idb)
                                .count();
                            if ev_parts != lb.participants.len() {
                                return self.fail(format!(
                                    "convergence: node {} roster of {}'s {room} differs",
                                    a + 1,
                                    b + 1
                                ));
                            }
                            // Subscriptions: what A wants is what B serves.
                            let want: BTreeMap<WireId, BTreeSet<Layer>> = na
                                .wanted
                                .iter()
                                .filter(|(k, l)| k.0 == *room && k.1 == idb && !l.is_empty())
                                .map(|(k, v)| (k.2, v.clone()))
                                .collect();
                            stat(5, want.len() as u64);
                            if link.subscribed != want {
                                return self.fail(format!(
                                    "subscriptions: node {} core {:?} != sfu {:?}",
                                    a + 1,
                                    link.subscribed,
                                    want
                                ));
                            }
                            let served: BTreeMap<WireId, BTreeSet<Layer>> = lb
                                .subscribers
                                .iter()
                                .filter(|(k, _)| k.1 == na.id)
                                .map(|(k, v)| (k.0, v.clone()))
                                .collect();
                            if served != want {
                                return self.fail(format!(
                                    "subscriptions: node {} wants {want:?} of {}, which serves {served:?}",
                                    a + 1,
                                    b + 1
                                ));
                            }
                            let _ = la;
                        }
                        None => {
                            if link.is_some() {
                                return self.fail(format!(
                                    "room link {room} {}->{} up but {} has it closed",
                                    a + 1,
                                    b + 1,
                                    b + 1
                                ));
                            }
                        }
                    }
                }
            }
            // Origin-side event model matches the core.
            let ev_subs: BTreeMap<(WireId, NodeId), BTreeSet<Layer>> = na
                .subscribers
                .iter()
                .filter_map(|((_, node, tid), l)| Some(((na.tracks.get(tid)?.2, *node), l.clone())))
                .collect();
            let core_subs: BTreeMap<(WireId, NodeId), BTreeSet<Layer>> = sa
                .local_rooms
                .values()
                .flat_map(|r| r.subscribers.clone())
                .collect();
            if ev_subs != core_subs {
                return self.fail(format!(
                    "subscriptions: node {} events {ev_subs:?} != core {core_subs:?}",
                    a + 1
                ));
            }
        }
    }

    /// Invariant 5: with every participant gone, every map is empty.
    fn check_empty(&mut self) {
        for i in 0..self.nodes.len() {
            let s = self.nodes[i].node.snapshot();
            let n = &self.nodes[i];
            let leaks = !s.local_rooms.is_empty()
                || s.peers
                    .values()
                    .any(|p| !p.remote_open.is_empty() || !p.rooms.is_empty() || p.wires != 0)
                || !n.remote_tracks.is_empty()
                || !n.remote_participants.is_empty()
                || !n.subscribers.is_empty()
                || !n.wanted.is_empty();
            if leaks {
                return self.fail(format!(
                    "no leaks: node {} holds state after everyone left: {s:?}",
                    i + 1
                ));
            }
        }
    }

    /// Everything observable at the end, to compare two runs of one seed.
    fn digest(&self) -> String {
        let mut out = format!("t={} frames=", self.now.0);
        for n in &self.nodes {
            out.push_str(&format!("{:?};{:?};", n.node.metrics(), n.node.snapshot()));
        }
        out
    }

    fn run(mut self) -> Result<String, String> {
        for i in 0..self.nodes.len() {
            self.add_peers(i);
        }
        let actions = self.rng.random_range(10..60);
        let mut t = self.now;
        for _ in 0..actions {
            // Mostly close together (races), sometimes long gaps (timeouts).
            let gap = if self.rng.random_bool(0.1) {
                self.rng.random_range(0..5000)
            } else {
                self.rng.random_range(0..200)
            };
            t = t + ms(gap);
            self.at(t, Ev::Act { calm: false });
        }
        self.run_until(t);
        self.heal();
        let settle_end = self.now + SETTLE;
        self.run_until(settle_end);
        if self.violation.is_none() {
            self.check_settled();
        }
        // A calm phase on the healed cluster: the normal path, then check again.
        if self.violation.is_none() {
            let calm = self.rng.random_range(5..30);
            let mut t = self.now;
            for _ in 0..calm {
                t = t + ms(self.rng.random_range(0..100));
                self.at(t, Ev::Act { calm: true });
            }
            self.run_until(t + ms(4 * MAX_DELAY_MS + 10));
            self.check_settled();
        }
        if self.violation.is_none() {
            for i in 0..self.nodes.len() {
                let pids: Vec<ParticipantId> = self.nodes[i].participants.keys().copied().collect();
                for p in pids {
                    self.leave(i, p);
                }
            }
            let end = self.now + ms(4 * MAX_DELAY_MS);
            self.run_until(end);
        }
        if self.violation.is_none() {
            self.check_empty();
        }
        for i in 0..self.nodes.len() {
            self.collect(i);
        }
        if let (Some(d), Ok(dir)) = (&self.dump, std::env::var("SIM_DUMP_CORPUS")) {
            for ((conn, to), stream) in d {
                let path = format!("{dir}/sim-{}-{conn}-{to}", self.seed);
                if let Err(e) = std::fs::write(&path, stream) {
                    eprintln!("cannot write {path}: {e}");
                }
            }
        }
        match self.violation.clone() {
            None => Ok(self.digest()),
            Some(v) => Err(format!(
                "seed {}: {v}\n  replay: SIM_SEED={} cargo test -p trunk --test sim simulate_seeds -- --nocapture",
                self.seed, self.seed
            )),
        }
    }
}

fn describe(ev: &Ev) -> String {
    match ev {
        Ev::Deliver { conn, to, bytes } => {
            let msg = wire::decode_frame(bytes)
                .map(|m| format!("{m:?}"))
                .unwrap_or_else(|e| e.to_string());
            format!("deliver conn {conn} to side {to}: {msg}")
        }
        other => format!("{other:?}"),
    }
}

fn run_seed(seed: u64, bugs: PlantedBugs) -> Result<(), String> {
    Sim::new(seed, bugs).run().map(|_| ())
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn simulate_seeds() {
    let seeds: Vec<u64> = match env_u64("SIM_SEED") {
        Some(s) => vec![s],
        None => (0..env_u64("SIM_SEEDS").unwrap_or(2000)).collect(),
    };
    let start = std::time::Instant::now();
    let mut failures = Vec::new();
    for &seed in &seeds {
        if let Err(e) = run_seed(seed, PlantedBugs::default()) {
            eprintln!("{e}");
            failures.push(e);
            if failures.len() >= 5 {
                break;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "sim: {} seeds in {secs:.1}s ({:.0} seeds/s), {} violations",
        seeds.len(),
        seeds.len() as f64 / secs,
        failures.len()
    );
    for (name, v) in STAT_NAMES.iter().zip(STATS.iter()) {
        eprintln!("  {name}: {}", v.load(Ordering::Relaxed));
    }
    assert!(
        failures.is_empty(),
        "{} seeds violated invariants; first: {}",
        failures.len(),
        failures[0]
    );
}

/// The simulation must be able to fail: each planted bug is found within a
/// bounded number of seeds.
fn finds(bugs: PlantedBugs, within: u64) -> Option<(u64, String)> {
    let found = (0..within).find_map(|seed| run_seed(seed, bugs).err().map(|e| (seed, e)));
    if let Some((seed, e)) = &found {
        eprintln!("planted {bugs:?} found at seed {seed}: {e}");
    }
    found
}

#[test]
fn catches_ignored_generations() {
    let found = finds(
        PlantedBugs {
            ignore_generations: true,
            ..Default::default()
        },
        300,
    );
    assert!(
        found.is_some(),
        "ignoring generations went unnoticed for 300 seeds"
    );
}

#[test]
fn catches_skipped_resync() {
    let found = finds(
        PlantedBugs {
            skip_resync: true,
            ..Default::default()
        },
        300,
    );
    assert!(
        found.is_some(),
        "skipping the resync went unnoticed for 300 seeds"
    );
}

#[test]
fn catches_state_kept_across_restart() {
    let found = finds(
        PlantedBugs {
            keep_state_on_restart: true,
            ..Default::default()
        },
        300,
    );
    assert!(
        found.is_some(),
        "keeping a restarted peer's state went unnoticed for 300 seeds"
    );
}

/// A seed is a complete description of a run: two runs of it agree on every
/// counter and every map (no hash-order or clock leaks into the simulation).
#[test]
fn runs_are_deterministic() {
    for seed in [1u64, 7, 42, 1234] {
        let a = Sim::new(seed, PlantedBugs::default()).run();
        let b = Sim::new(seed, PlantedBugs::default()).run();
        assert_eq!(a, b, "seed {seed} is not reproducible");
    }
}
