//! The random schedule: which action happens next (a weighted table, drawn
//! from the current state), and the faults — cuts, crashes, restarts.

use crate::events::Ev;
use crate::network::pair;
use crate::network::{MAX_DELAY_MS, MAX_LONG_DELAY_MS};
use crate::{HEARTBEAT, MISSES, ROOMS, Sim, config, ms, stat};
use rand::Rng;
use trunk::proto::wire;
use trunk::proto::{ConnId, Layer, Node, NodeId, ParticipantId, RoomName, TrackId, WireId};

/// One step of the random schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// A participant joins a random room (opening it if it is the first).
    Join,
    /// A random local participant leaves (closing its room if last).
    Leave,
    /// Join, leave and join again at once: the short-lived connection race.
    RapidRejoin,
    /// A local participant publishes a track (audio, or video with layers).
    Publish,
    /// A local track is unpublished.
    Unpublish,
    /// The SFU subscribes to a layer of a remote track it was told about.
    Subscribe,
    /// The SFU drops a layer it subscribes.
    Unsubscribe,
    /// The SFU asks the origin of a subscribed track for a keyframe.
    Keyframe,
    /// A local participant sends chat data.
    Chat,
    /// Fault: the path between two nodes is cut.
    Cut,
    /// Fault: a cut path is restored.
    Restore,
    /// Fault: a node crashes (restarts later with a new incarnation).
    Crash,
    /// Fault: a node shuts down gracefully (restarts later).
    Shutdown,
    /// Fault: junk media (an unknown wire id), sometimes a corrupt frame.
    Junk,
}

impl Action {
    /// Calm phases (on the healed cluster) draw only these: no faults.
    pub(crate) fn calm(self) -> bool {
        !matches!(
            self,
            Action::Cut | Action::Restore | Action::Crash | Action::Shutdown | Action::Junk
        )
    }
}

/// How often each action is drawn, relative to the others. Faults come
/// last, so a calm draw is one over the calm prefix of the table.
pub(crate) const ACTIONS: &[(Action, u32)] = &[
    (Action::Join, 22),
    (Action::Leave, 10),
    (Action::RapidRejoin, 6),
    (Action::Publish, 14),
    (Action::Unpublish, 6),
    (Action::Subscribe, 12),
    (Action::Unsubscribe, 5),
    (Action::Keyframe, 4),
    (Action::Chat, 6),
    (Action::Cut, 4),
    (Action::Restore, 3),
    (Action::Crash, 3),
    (Action::Shutdown, 2),
    (Action::Junk, 3),
];

/// Draw an action by weight (calm ones only if `calm`).
pub(crate) fn pick_action(rng: &mut impl Rng, calm: bool) -> Action {
    let allowed: Vec<(Action, u32)> = ACTIONS
        .iter()
        .copied()
        .filter(|(a, _)| !calm || a.calm())
        .collect();
    weighted(rng, &allowed)
}

/// Draw one entry of a weighted table.
pub(crate) fn weighted<T: Copy>(rng: &mut impl Rng, table: &[(T, u32)]) -> T {
    let total: u32 = table.iter().map(|(_, w)| w).sum();
    let mut roll = rng.random_range(0..total);
    for &(item, weight) in table {
        if roll < weight {
            return item;
        }
        roll -= weight;
    }
    unreachable!("roll below the total weight")
}

impl Sim {
    /// One random action, chosen from the current state.
    pub(crate) fn act(&mut self, calm: bool) {
        let alive = self.alive();
        let Some(i) = self.pick(&alive) else { return };
        let now = self.now;
        let action = pick_action(&mut self.rng, calm);
        let room = RoomName::new(ROOMS[self.rng.random_range(0..ROOMS.len())]).expect("valid room");
        let pids: Vec<ParticipantId> = self.nodes[i].participants.keys().copied().collect();
        match action {
            Action::Join => self.join(i, room),
            Action::Leave => {
                if let Some(p) = self.pick(&pids) {
                    self.leave(i, p);
                }
            }
            Action::RapidRejoin => {
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
            Action::Publish => {
                let Some(p) = self.pick(&pids) else { return };
                let tid = TrackId(self.new_id());
                let layers = self.rng.random_range(1..=3);
                self.publish(i, p, tid, layers);
            }
            Action::Unpublish => {
                let tracks: Vec<(TrackId, RoomName)> = self.nodes[i]
                    .tracks
                    .iter()
                    .map(|(t, (r, _, _))| (*t, r.clone()))
                    .collect();
                let Some((t, room)) = self.pick(&tracks) else {
                    return;
                };
                self.unpublish(i, t, room);
            }
            Action::Subscribe => {
                let remote: Vec<(RoomName, NodeId, WireId)> =
                    self.nodes[i].remote_tracks.keys().cloned().collect();
                let Some(key) = self.pick(&remote) else {
                    return;
                };
                let layer = Layer(self.rng.random_range(0..3));
                self.subscribe(i, key, layer);
            }
            Action::Unsubscribe => {
                let subs: Vec<((RoomName, NodeId, WireId), Layer)> = self.nodes[i]
                    .wanted
                    .iter()
                    .flat_map(|(k, ls)| ls.iter().map(move |l| (k.clone(), *l)))
                    .collect();
                let Some((key, layer)) = self.pick(&subs) else {
                    return;
                };
                self.unsubscribe(i, key, layer);
            }
            Action::Keyframe => {
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
            Action::Chat => {
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
            Action::Cut => {
                let Some(j) = self.pick(&alive) else { return };
                if i != j {
                    self.cuts.insert(pair(i, j));
                }
            }
            Action::Restore => {
                let cuts: Vec<(usize, usize)> = self.cuts.iter().copied().collect();
                if let Some(c) = self.pick(&cuts) {
                    self.cuts.remove(&c);
                }
            }
            Action::Crash => self.crash(i, false),
            Action::Shutdown => self.crash(i, true),
            Action::Junk => {
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

    /// Node `i` crashes (or, `graceful`, shuts down), and restarts within 5 s;
    /// schedules the ghost checks its death calls for.
    pub(crate) fn crash(&mut self, i: usize, graceful: bool) {
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

    /// Node `i` comes back as a new process: new incarnation, new clock.
    pub(crate) fn restart(&mut self, i: usize) {
        if self.nodes[i].alive {
            return;
        }
        let seed = self.rng.random();
        let node = Node::new(config(self.nodes[i].id, self.bugs), seed);
        // The new process's clock starts at zero.
        let skew = -(self.now.0 as i64);
        self.nodes[i].restart(node, skew);
        self.add_peers(i);
    }
}
