//! Time: `handle_timeout` runs whatever is due (pings, dead trunks,
//! redials, coalesced keyframe requests, NACK retries and give-ups), and
//! `poll_timeout` says when that is next, cached until a call can bring a
//! timer forward. Only tracks with pending work are visited, never all.

use super::{DatagramOut, Event, KfKey, Node, send};
use crate::proto::heartbeat::HeartbeatAction;
use crate::proto::link::{ConnState, DialState};
use crate::proto::ratelimit::RateLimiter;
use crate::proto::time::Time;
use crate::proto::types::{CloseCode, Gens, NodeId, WireId};
use crate::proto::wire::{self, DatagramMessage, MAX_NACK_SEQS, Message};

impl Node {
    /// The earliest time [`Self::handle_timeout`] has work to do. Cached:
    /// recomputed only after a call that can bring a timer forward (the
    /// media fast path, `send_media` and a gap-free `handle_datagram`, never
    /// does), so a driver may ask after every packet. It may be early (a
    /// timer went away since: `handle_timeout` then finds nothing to do),
    /// never late. The computation visits
    /// connections and peers, and only the tracks that hold a coalesced
    /// keyframe request or a gap under repair — never every track.
    pub fn poll_timeout(&self) -> Option<Time> {
        if let Some(t) = self.timeout.get() {
            return t;
        }
        let t = self.compute_timeout();
        self.timeout.set(Some(t));
        t
    }

    /// Forget the cached [`Self::poll_timeout`].
    pub(super) fn timers_changed(&self) {
        self.timeout.set(None);
    }

    pub(super) fn compute_timeout(&self) -> Option<Time> {
        let mut t: Option<Time> = None;
        let mut min = |x: Time| t = Some(t.map_or(x, |y| y.min(x)));
        for c in self.conns.values() {
            min(c.heartbeat.poll_timeout());
            if let ConnState::Probing { until, .. } = c.state {
                min(until);
            }
        }
        for p in self.peers.values() {
            if let DialState::Scheduled(at) = p.dial {
                min(at);
            }
        }
        for a in self.addrs.values() {
            if let DialState::Scheduled(at) = a.dial {
                min(at);
            }
        }
        for key in &self.kf_pending {
            if let Some(at) = self.limiter(key).and_then(|l| l.poll_timeout()) {
                min(at);
            }
        }
        for (node, wire) in &self.repairing {
            let due = self
                .peers
                .get(node)
                .and_then(|p| p.wires.get(wire))
                .and_then(|w| w.repair.as_ref())
                .and_then(|r| r.next_due(&self.config.repair));
            if let Some(at) = due {
                min(at);
            }
        }
        t
    }

    fn limiter(&self, key: &KfKey) -> Option<&RateLimiter> {
        match key {
            KfKey::Local(track) => {
                let room = self.track_rooms.get(track)?;
                Some(&self.rooms.get(room)?.tracks.get(track)?.keyframes)
            }
            KfKey::Remote(node, wire) => {
                let peer = self.peers.get(node)?;
                let room = &peer.wires.get(wire)?.room;
                Some(&peer.rooms.get(room)?.tracks.get(wire)?.keyframes)
            }
        }
    }

    /// Timers: heartbeats, dead trunks, redials, coalesced keyframe requests.
    pub fn handle_timeout(&mut self, now: Time) {
        self.timers_changed();
        let mut actions = Vec::new();
        for (&id, c) in self.conns.iter_mut() {
            if let Some(a) = c.heartbeat.handle_timeout(now) {
                actions.push((id, a));
            }
        }
        actions.sort_by_key(|(id, _)| *id);
        for (conn, action) in actions {
            match action {
                HeartbeatAction::Ping(seq) => send(
                    &mut self.out,
                    &mut self.metrics,
                    conn,
                    &Message::Ping { seq },
                ),
                HeartbeatAction::Dead => {
                    self.drop_conn(conn, Some(CloseCode::Timeout), CloseCode::Timeout, now)
                }
            }
        }
        self.probe_timers(now);
        let due: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| matches!(p.dial, DialState::Scheduled(at) if at <= now))
            .map(|(n, _)| *n)
            .collect();
        for node in due {
            if let Some(p) = self.peers.get_mut(&node) {
                p.dial = DialState::Dialing;
                self.events.push_back(Event::Redial { node });
            }
        }
        self.addr_timers(now);
        self.keyframe_timers(now);
        self.repair_timers(now);
    }

    /// Coalesced keyframe requests whose interval has passed.
    fn keyframe_timers(&mut self, now: Time) {
        let keys: Vec<KfKey> = self.kf_pending.iter().cloned().collect();
        for key in keys {
            match &key {
                KfKey::Local(track) => {
                    let fired = self.track_rooms.get(track).cloned().and_then(|room| {
                        let t = self.rooms.get_mut(&room)?.tracks.get_mut(track)?;
                        Some((
                            room,
                            t.keyframes.handle_timeout(now),
                            t.keyframes.poll_timeout(),
                        ))
                    });
                    match fired {
                        Some((room, fired, pending)) => {
                            if fired {
                                self.events.push_back(Event::KeyframeRequested {
                                    room,
                                    track: *track,
                                });
                            }
                            if pending.is_none() {
                                self.kf_pending.remove(&key);
                            }
                        }
                        None => {
                            self.kf_pending.remove(&key);
                        }
                    }
                }
                KfKey::Remote(node, wire) => {
                    let (node, wire) = (*node, *wire);
                    let Some(peer) = self.peers.get_mut(&node) else {
                        self.kf_pending.remove(&key);
                        continue;
                    };
                    let (Some(conn), Some(room)) =
                        (peer.conn, peer.wires.get(&wire).map(|w| w.room.clone()))
                    else {
                        self.kf_pending.remove(&key);
                        continue;
                    };
                    let (Some(local), Some(to)) =
                        (self.rooms.get(&room), peer.remote_open.get(&room))
                    else {
                        self.kf_pending.remove(&key);
                        continue;
                    };
                    let gens = Gens {
                        from: local.generation,
                        to: *to,
                    };
                    let Some(t) = peer
                        .rooms
                        .get_mut(&room)
                        .and_then(|r| r.tracks.get_mut(&wire))
                    else {
                        self.kf_pending.remove(&key);
                        continue;
                    };
                    if t.keyframes.handle_timeout(now) {
                        let msg = Message::KeyframeRequest {
                            room,
                            gens,
                            wire_id: wire,
                        };
                        send(&mut self.out, &mut self.metrics, conn, &msg);
                    }
                    if t.keyframes.poll_timeout().is_none() {
                        self.kf_pending.remove(&key);
                    }
                }
            }
        }
    }

    /// NACK what is due and give up what can no longer arrive in time, for
    /// the remote tracks with gaps only.
    fn repair_timers(&mut self, now: Time) {
        let cfg = self.config.repair;
        let due: Vec<(NodeId, WireId)> = self.repairing.iter().copied().collect();
        let mut seqs = Vec::new();
        for (node, wire) in due {
            let rtt = self.repair_rtt(node);
            let Some(peer) = self.peers.get_mut(&node) else {
                self.repairing.remove(&(node, wire));
                continue;
            };
            let conn = peer.conn;
            let Some(r) = peer.wires.get_mut(&wire).and_then(|w| w.repair.as_mut()) else {
                self.repairing.remove(&(node, wire));
                continue;
            };
            seqs.clear();
            let given_up = r.poll(now, rtt, &cfg, &mut seqs, MAX_NACK_SEQS);
            if r.missing() == 0 {
                self.repairing.remove(&(node, wire));
            }
            peer.stats.given_up += given_up;
            self.metrics.media_given_up += given_up;
            let (Some(conn), false) = (conn, seqs.is_empty()) else {
                continue;
            };
            let msg = DatagramMessage::Nack {
                wire_id: wire,
                seqs: seqs.clone(),
            };
            let mut bytes = Vec::with_capacity(8 + 3 * seqs.len());
            wire::encode_control_datagram(&msg, &mut bytes);
            peer.stats.nacks_sent += 1;
            peer.stats.nack_seqs_sent += seqs.len() as u64;
            self.metrics.nacks_sent += 1;
            self.datagrams.push_back(DatagramOut {
                conn,
                node,
                bytes,
                retransmit: false,
            });
        }
    }
}
