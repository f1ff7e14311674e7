//! Connections and peer links: a connection comes up (`handle_connected`),
//! carries Hello and then frames (`handle_frame`), and goes away (lost,
//! Goodbye, protocol error, duplicate, replaced by a restarted peer,
//! shutdown). Here live the duplicate rule, restart detection, what a link
//! going down removes, and the redial schedule — everything about *which
//! trunk* a peer is reached on, nothing about rooms (`rooms.rs`). Dialing
//! discovered addresses, whose node ids come with the Hello, is in
//! `discover.rs`.

use super::{Event, KfKey, Node, Refusal, Transmit, send};
use crate::proto::error::DecodeError;
use crate::proto::heartbeat::Heartbeat;
use crate::proto::link::{Conn, ConnState, DialState, Dialed, Peer, backoff};
use crate::proto::time::Time;
use crate::proto::types::{CloseCode, ConnId, Incarnation, NodeId, RoomName};
use crate::proto::wire::{self, Message, PROTOCOL_VERSION};
use std::time::Duration;

/// Shortest wait for the old trunk's answer when a node id shows up with a
/// new incarnation (restart, or a second process with that id?).
const PROBE_MIN: Duration = Duration::from_millis(100);
/// The wait when the old trunk has no RTT sample yet.
const PROBE_DEFAULT: Duration = Duration::from_millis(250);
/// Most bytes of frames held from a connection while its probe runs (a
/// restarted peer's resync is its `Open`s: ~10,000 rooms fit); past it the
/// connection is cut as a protocol error.
const MAX_HELD_BYTES: usize = 2 << 20;

/// How long to wait for the old trunk's Pong: four of its RTTs, at least
/// `PROBE_MIN`, at most one heartbeat (a dead trunk is no later noticed
/// than by the heartbeat anyway).
fn probe_wait(rtt: Option<Duration>, heartbeat: Duration) -> Duration {
    rtt.map_or(PROBE_DEFAULT, |r| r.saturating_mul(4))
        .min(heartbeat)
        .max(PROBE_MIN)
}

impl Node {
    /// Smoothed-enough RTT of the trunk to `node` (last Ping/Pong).
    pub fn rtt(&self, node: NodeId) -> Option<Duration> {
        let conn = self.peers.get(&node)?.conn?;
        self.conns.get(&conn)?.heartbeat.rtt()
    }

    /// The transport's RTT estimate of a connection's path (the driver
    /// reports it before timers; NACK retries are spaced by it, falling
    /// back to the heartbeat's RTT).
    pub fn set_path_rtt(&mut self, conn: ConnId, rtt: Duration) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.path_rtt = Some(rtt);
        }
    }

    /// RTT for spacing NACK retries to `node`.
    pub(super) fn repair_rtt(&self, node: NodeId) -> Option<Duration> {
        let conn = self.peers.get(&node)?.conn?;
        let c = self.conns.get(&conn)?;
        c.path_rtt.or_else(|| c.heartbeat.rtt())
    }

    /// The active connection to `node`, if the link is up.
    pub fn peer_conn(&self, node: NodeId) -> Option<ConnId> {
        self.peers.get(&node)?.conn
    }

    pub fn is_link_up(&self, node: NodeId) -> bool {
        self.peers.get(&node).is_some_and(|p| p.conn.is_some())
    }

    /// Configure a peer to dial (and redial whenever the link is lost).
    pub fn add_peer(&mut self, node: NodeId, now: Time) {
        self.timers_changed();
        if node == self.config.node_id || self.shut_down {
            return;
        }
        let peer = self.peers.entry(node).or_insert_with(|| Peer::new(true));
        peer.configured = true;
        if peer.conn.is_none() && peer.dial == DialState::Idle {
            peer.dial = DialState::Scheduled(now);
        }
    }

    /// A connection is established (`dialed = Some(peer)` if we dialed it).
    /// We send Hello at once; the link is up when the peer's Hello arrives.
    pub fn handle_connected(&mut self, conn: ConnId, dialed: Option<NodeId>, now: Time) {
        if let Some(node) = dialed
            && let Some(peer) = self.peers.get_mut(&node)
            && peer.dial == DialState::Dialing
        {
            peer.dial = DialState::Idle;
        }
        self.connected(conn, dialed.map(Dialed::Node), now);
    }

    /// Record a new connection and send our Hello on it.
    pub(super) fn connected(&mut self, conn: ConnId, dialed: Option<Dialed>, now: Time) {
        self.timers_changed();
        if self.shut_down {
            self.out.push_back(Transmit::Close {
                conn,
                code: CloseCode::Shutdown,
            });
            return;
        }
        self.next_serial += 1;
        self.conns.insert(
            conn,
            Conn {
                dialed,
                state: ConnState::Handshaking,
                heartbeat: Heartbeat::new(self.config.heartbeat, self.config.misses, now),
                serial: self.next_serial,
                path_rtt: None,
                certified: None,
                held: Vec::new(),
                held_bytes: 0,
            },
        );
        let hello = Message::Hello {
            node_id: self.config.node_id,
            incarnation: self.incarnation,
            version: PROTOCOL_VERSION,
            cluster: self.config.cluster.clone(),
        };
        send(&mut self.out, &mut self.metrics, conn, &hello);
    }

    /// The connection's certificate names `node` (`None`: no node id).
    /// The driver calls it right after [`Self::handle_connected`] when
    /// certificates bind node ids (operator CA files): the peer's Hello
    /// must then name that id, or the connection is refused
    /// ([`CloseCode::NotCertified`], [`Refusal::NotCertified`]).
    pub fn handle_certified(&mut self, conn: ConnId, node: Option<NodeId>) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.certified = Some(node);
        }
    }

    /// A dial requested by [`Event::Redial`] failed.
    pub fn handle_dial_failed(&mut self, node: NodeId, now: Time) {
        self.timers_changed();
        if let Some(peer) = self.peers.get_mut(&node)
            && peer.dial == DialState::Dialing
        {
            peer.dial = DialState::Idle;
            peer.attempts = peer.attempts.saturating_add(1);
        }
        self.ensure_redial(node, now);
    }

    /// The driver saw the connection close (peer's close, idle timeout, reset).
    pub fn handle_lost(&mut self, conn: ConnId, now: Time) {
        self.timers_changed();
        self.drop_conn(conn, None, CloseCode::Timeout, now);
    }

    /// One frame body from the control stream (see [`wire::split_frame`]).
    /// A malformed frame closes the trunk with a protocol error.
    pub fn handle_frame(&mut self, conn: ConnId, body: &[u8], now: Time) {
        self.timers_changed();
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        self.metrics.frames_in += 1;
        self.metrics.bytes_in += body.len() as u64 + wire::LEN_PREFIX as u64;
        c.heartbeat.on_receive(now);
        let state = c.state;
        let msg = match wire::decode_body(body) {
            Ok(m) => m,
            Err(e) => {
                self.protocol_error(conn, &e, now);
                return;
            }
        };
        match (state, msg) {
            (_, Message::Goodbye { reason }) => self.drop_conn(conn, None, reason, now),
            (
                ConnState::Handshaking,
                Message::Hello {
                    node_id,
                    incarnation,
                    version,
                    cluster,
                },
            ) => self.on_hello(conn, node_id, incarnation, version, &cluster, now),
            (ConnState::Handshaking, _)
            | (ConnState::Active(_) | ConnState::Probing { .. }, Message::Hello { .. }) => {
                self.protocol_error(conn, &DecodeError::Malformed("unexpected".into()), now)
            }
            (ConnState::Probing { own_seq, .. }, Message::Pong { seq }) if seq == own_seq => {
                self.claimant_answered(conn, now)
            }
            (ConnState::Probing { .. }, msg) => self.hold(conn, msg, body.len(), now),
            (ConnState::Active(node), msg) => self.on_message(conn, node, msg, now),
        }
    }

    /// Keep a message of a connection whose probe runs, for when it
    /// becomes active (bounded).
    fn hold(&mut self, conn: ConnId, msg: Message, len: usize, now: Time) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.held_bytes += len;
        if c.held_bytes > MAX_HELD_BYTES {
            self.protocol_error(
                conn,
                &DecodeError::Malformed("too much before link up".into()),
                now,
            );
            return;
        }
        c.held.push(msg);
    }

    /// Say Goodbye on every trunk and stop: no more dialing or accepting.
    pub fn shutdown(&mut self, now: Time) {
        self.timers_changed();
        // First: no probe waiting on a trunk closed here may bring its
        // connection up.
        self.shut_down = true;
        let mut conns: Vec<ConnId> = self.conns.keys().copied().collect();
        conns.sort();
        for conn in conns {
            self.drop_conn(conn, Some(CloseCode::Shutdown), CloseCode::Shutdown, now);
        }
        for p in self.peers.values_mut() {
            p.dial = DialState::Idle;
        }
        for t in self.addrs.values_mut() {
            t.dial = DialState::Idle;
        }
    }

    fn protocol_error(&mut self, conn: ConnId, _err: &DecodeError, now: Time) {
        self.metrics.protocol_errors += 1;
        self.drop_conn(
            conn,
            Some(CloseCode::ProtocolError),
            CloseCode::ProtocolError,
            now,
        );
    }

    /// Forget a connection. `goodbye = Some(code)` when *we* close it (send
    /// Goodbye, then ask the driver to close); `None` when it is already gone.
    pub(super) fn drop_conn(
        &mut self,
        conn: ConnId,
        goodbye: Option<CloseCode>,
        reason: CloseCode,
        now: Time,
    ) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(code) = goodbye {
            send(
                &mut self.out,
                &mut self.metrics,
                conn,
                &Message::Goodbye { reason: code },
            );
            self.out.push_back(Transmit::Close { conn, code });
        } else {
            self.out.push_back(Transmit::Close { conn, code: reason });
        }
        match c.state {
            ConnState::Active(node) => {
                self.link_down(node, reason);
                self.ensure_redial(node, now);
                self.redial_addrs_of(node, now);
            }
            ConnState::Handshaking | ConnState::Probing { .. } => match c.dialed {
                Some(Dialed::Node(node)) => self.ensure_redial(node, now),
                // A duplicate loser reached a live node: no failure.
                Some(Dialed::Addr(addr)) if reason == CloseCode::Duplicate => {
                    self.ensure_addr_dial(addr, now)
                }
                Some(Dialed::Addr(addr)) => self.addr_attempt_failed(addr, now),
                None => {}
            },
        }
        // A connection probing this one as the old trunk: it is gone, so
        // the claimant restarted that node.
        self.resume_probes(conn, now);
        self.forget_unlisted_addrs();
    }

    /// The link to `node` is gone: drop everything it taught us.
    fn link_down(&mut self, node: NodeId, reason: CloseCode) {
        let rooms: Vec<RoomName> = match self.peers.get(&node) {
            Some(p) => p.rooms.keys().cloned().collect(),
            None => return,
        };
        for room in rooms {
            self.room_link_down(node, &room);
        }
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        if peer.conn.take().is_some() {
            self.metrics.link_downs += 1;
            self.events.push_back(Event::LinkDown { node, reason });
        }
        peer.remote_open.clear();
        peer.wires.clear();
        self.repairing.retain(|(n, _)| *n != node);
        self.kf_pending
            .retain(|k| !matches!(k, KfKey::Remote(n, _) if *n == node));
        if !peer.configured && !self.addrs.values().any(|t| t.node == Some(node)) {
            self.peers.remove(&node);
        }
    }

    /// Schedule a redial if `node` is configured, not connected, not being
    /// dialed and no connection we dialed to it is still handshaking.
    fn ensure_redial(&mut self, node: NodeId, now: Time) {
        if self.shut_down {
            return;
        }
        let handshaking = self
            .conns
            .values()
            .any(|c| c.dialed == Some(Dialed::Node(node)) && c.state == ConnState::Handshaking);
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        if !peer.configured || peer.conn.is_some() || handshaking || peer.dial != DialState::Idle {
            return;
        }
        let delay = backoff(
            self.config.redial_base,
            self.config.redial_cap,
            peer.attempts,
            self.rng.next_u64(),
        );
        peer.dial = DialState::Scheduled(now + delay);
    }

    fn on_hello(
        &mut self,
        conn: ConnId,
        node: NodeId,
        incarnation: Incarnation,
        version: u8,
        cluster: &str,
        now: Time,
    ) {
        if version != PROTOCOL_VERSION {
            self.drop_conn(conn, Some(CloseCode::Version), CloseCode::Version, now);
            return;
        }
        if node == self.config.node_id
            && incarnation == self.incarnation
            && cluster == self.config.cluster
        {
            // We reached ourselves (a discovered name lists this node too).
            self.reached_self(conn, now);
            return;
        }
        if cluster != self.config.cluster {
            self.drop_conn(
                conn,
                Some(CloseCode::WrongCluster),
                CloseCode::WrongCluster,
                now,
            );
            return;
        }
        if let Some(certified) = self.conns.get(&conn).and_then(|c| c.certified)
            && certified != Some(node)
        {
            // A member posing as another (or a certificate without an id).
            self.metrics.identity_refused += 1;
            self.events.push_back(Event::Refused {
                conn,
                node,
                why: Refusal::NotCertified { certified },
            });
            self.drop_conn(
                conn,
                Some(CloseCode::NotCertified),
                CloseCode::NotCertified,
                now,
            );
            return;
        }
        if node == self.config.node_id {
            // Our own incarnation was handled above (we reached ourselves):
            // another live process holds our id. It answers on a connection
            // made just now, so it is no ghost of ours.
            self.metrics.node_id_conflicts += 1;
            self.events.push_back(Event::Refused {
                conn,
                node,
                why: Refusal::OurNodeId,
            });
            self.drop_conn(
                conn,
                Some(CloseCode::NodeIdInUse),
                CloseCode::NodeIdInUse,
                now,
            );
            return;
        }
        self.learn_addr_node(conn, node);
        self.admit(conn, node, incarnation, now);
    }

    /// A valid Hello from `node`: restart (after a probe), duplicate rule,
    /// or link up.
    fn admit(&mut self, conn: ConnId, node: NodeId, incarnation: Incarnation, now: Time) {
        let me = self.config.node_id;
        let preferred_dialer = me.min(node);
        let dialer_of = |c: &Conn| if c.dialed.is_some() { me } else { node };
        let Some(new) = self.conns.get(&conn) else {
            return;
        };
        let new_pref = dialer_of(new) == preferred_dialer;
        let new_serial = new.serial;
        let peer = self.peers.entry(node).or_insert_with(|| Peer::new(false));
        if let Some(old) = peer.conn {
            if peer.incarnation != Some(incarnation) {
                // The peer restarted — or a second process claims its id.
                #[cfg(feature = "planted-bugs")]
                if self.config.bugs.keep_state_on_restart {
                    self.conns.remove(&old);
                    self.out.push_back(Transmit::Close {
                        conn: old,
                        code: CloseCode::Replaced,
                    });
                    peer.conn = Some(conn);
                    peer.incarnation = Some(incarnation);
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.state = ConnState::Active(node);
                    }
                    self.send_resync(node, conn);
                    return;
                }
                self.probe(conn, node, incarnation, old, now);
                return;
            } else {
                let old_pref = self
                    .conns
                    .get(&old)
                    .is_some_and(|c| dialer_of(c) == preferred_dialer);
                let old_serial = self.conns.get(&old).map_or(0, |c| c.serial);
                let new_wins = match (new_pref, old_pref) {
                    (true, false) => true,
                    (false, true) => false,
                    _ => new_serial > old_serial,
                };
                self.metrics.duplicates_closed += 1;
                if new_wins {
                    self.drop_conn(old, Some(CloseCode::Duplicate), CloseCode::Duplicate, now);
                } else {
                    self.drop_conn(conn, Some(CloseCode::Duplicate), CloseCode::Duplicate, now);
                    return;
                }
            }
        }
        let peer = self.peers.entry(node).or_insert_with(|| Peer::new(false));
        peer.conn = Some(conn);
        peer.incarnation = Some(incarnation);
        // A restarted peer has a new clock; learn its offset afresh.
        peer.clock = Default::default();
        peer.attempts = 0;
        peer.dial = DialState::Idle;
        let reconnect = peer.ever_up;
        peer.ever_up = true;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.state = ConnState::Active(node);
        }
        self.addr_link_up(node);
        self.metrics.link_ups += 1;
        self.events.push_back(Event::LinkUp { node, incarnation });
        #[cfg(feature = "planted-bugs")]
        if reconnect && self.config.bugs.skip_resync {
            return;
        }
        let _ = reconnect;
        self.send_resync(node, conn);
    }

    /// `node`'s live trunk `old` has another incarnation than the Hello on
    /// `conn`. A restarted process has left `old` dead; a second process
    /// with the same id leaves it alive. Ask `old` (one Ping, shared by
    /// every claimant) and `conn` (a stale Hello from a process since gone
    /// is no second process), and hold `conn` until they answer or the
    /// wait ends.
    fn probe(
        &mut self,
        conn: ConnId,
        node: NodeId,
        incarnation: Incarnation,
        old: ConnId,
        now: Time,
    ) {
        let running = self.conns.values().find_map(|c| match c.state {
            ConnState::Probing {
                old: o,
                seq,
                until,
                old_alive,
                ..
            } if o == old => Some((seq, until, old_alive)),
            _ => None,
        });
        let (seq, until, old_alive) = match running {
            Some(p) => p,
            None => {
                let heartbeat = self.config.heartbeat;
                let Some(o) = self.conns.get_mut(&old) else {
                    return;
                };
                let wait = probe_wait(o.path_rtt.or_else(|| o.heartbeat.rtt()), heartbeat);
                let seq = o.heartbeat.probe(now);
                self.metrics.incarnation_probes += 1;
                send(
                    &mut self.out,
                    &mut self.metrics,
                    old,
                    &Message::Ping { seq },
                );
                (seq, now + wait, false)
            }
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let own_seq = c.heartbeat.probe(now);
        c.state = ConnState::Probing {
            node,
            incarnation,
            old,
            seq,
            own_seq,
            until,
            old_alive,
            alive: false,
        };
        send(
            &mut self.out,
            &mut self.metrics,
            conn,
            &Message::Ping { seq: own_seq },
        );
    }

    /// A Pong on `conn`: if it answers a probe, the process behind `conn`
    /// is alive; every connection probing it whose own process answered
    /// too claims its id a second time: refused, loudly.
    pub(super) fn probe_answered(&mut self, conn: ConnId, seq: u64, now: Time) {
        let mut both: Vec<ConnId> = Vec::new();
        for (id, c) in self.conns.iter_mut() {
            if let ConnState::Probing {
                old,
                seq: s,
                old_alive,
                alive,
                ..
            } = &mut c.state
                && *old == conn
                && *s == seq
            {
                *old_alive = true;
                if *alive {
                    both.push(*id);
                }
            }
        }
        both.sort();
        for id in both {
            self.refuse_claimant(id, now);
        }
    }

    /// The probing connection `conn` answered its own Ping: its process
    /// is alive. If the old trunk answered too, refuse it.
    fn claimant_answered(&mut self, conn: ConnId, now: Time) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let ConnState::Probing {
            old_alive, alive, ..
        } = &mut c.state
        else {
            return;
        };
        *alive = true;
        if *old_alive {
            self.refuse_claimant(conn, now);
        }
    }

    /// Two live processes claim one id: refuse the later one (`conn`),
    /// loudly (event, counter); the live trunk stays.
    fn refuse_claimant(&mut self, conn: ConnId, now: Time) {
        let Some(ConnState::Probing { node, old, .. }) = self.conns.get(&conn).map(|c| c.state)
        else {
            return;
        };
        self.metrics.node_id_conflicts += 1;
        self.events.push_back(Event::Refused {
            conn,
            node,
            why: Refusal::NodeIdInUse { live: old },
        });
        self.drop_conn(
            conn,
            Some(CloseCode::NodeIdInUse),
            CloseCode::NodeIdInUse,
            now,
        );
    }

    /// Probes whose wait is over. The old trunk never answered: its
    /// process is gone, the claimant is its restart; the old trunk goes
    /// (`Replaced`), which resumes the claimants. The old trunk answered
    /// but the claimant did not: the claimant's Hello came from a process
    /// that is gone (it was late): closed quietly.
    pub(super) fn probe_timers(&mut self, now: Time) {
        let mut replaced: Vec<ConnId> = Vec::new();
        let mut stale: Vec<ConnId> = Vec::new();
        for (id, c) in &self.conns {
            if let ConnState::Probing {
                old,
                until,
                old_alive,
                ..
            } = c.state
                && until <= now
            {
                if old_alive {
                    stale.push(*id);
                } else {
                    replaced.push(old);
                }
            }
        }
        stale.sort();
        for conn in stale {
            self.drop_conn(conn, Some(CloseCode::Timeout), CloseCode::Timeout, now);
        }
        replaced.sort();
        replaced.dedup();
        for old in replaced {
            if self.conns.contains_key(&old) {
                self.drop_conn(old, Some(CloseCode::Replaced), CloseCode::Replaced, now);
            } else {
                self.resume_probes(old, now);
            }
        }
    }

    /// `old` is gone: every connection that was probing it takes its Hello
    /// up again (in arrival order) and, once active, gets what it held.
    fn resume_probes(&mut self, old: ConnId, now: Time) {
        if self.shut_down {
            return;
        }
        let mut waiting: Vec<(u64, ConnId, NodeId, Incarnation)> = self
            .conns
            .iter()
            .filter_map(|(id, c)| match c.state {
                ConnState::Probing {
                    node,
                    incarnation,
                    old: o,
                    ..
                } if o == old => Some((c.serial, *id, node, incarnation)),
                _ => None,
            })
            .collect();
        waiting.sort();
        for (_, conn, node, incarnation) in waiting {
            match self.conns.get_mut(&conn) {
                Some(c) if matches!(c.state, ConnState::Probing { old: o, .. } if o == old) => {
                    c.state = ConnState::Handshaking;
                }
                _ => continue,
            }
            self.admit(conn, node, incarnation, now);
            self.release_held(conn, now);
        }
    }

    /// Deliver what an active connection received while its probe ran.
    fn release_held(&mut self, conn: ConnId, now: Time) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        // Still probing (another incarnation took the link first): keep.
        let ConnState::Active(node) = c.state else {
            return;
        };
        let held = std::mem::take(&mut c.held);
        c.held_bytes = 0;
        for msg in held {
            // An earlier message may have closed the connection.
            let active = self
                .conns
                .get(&conn)
                .is_some_and(|c| c.state == ConnState::Active(node));
            if !active {
                return;
            }
            self.on_message(conn, node, msg, now);
        }
    }
}
