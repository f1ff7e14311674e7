//! Connections and peer links: a connection comes up (`handle_connected`),
//! carries Hello and then frames (`handle_frame`), and goes away (lost,
//! Goodbye, protocol error, duplicate, replaced by a restarted peer,
//! shutdown). Here live the duplicate rule, restart detection, what a link
//! going down removes, and the redial schedule — everything about *which
//! trunk* a peer is reached on, nothing about rooms (`rooms.rs`). Dialing
//! discovered addresses, whose node ids come with the Hello, is in
//! `discover.rs`.

use super::{Event, KfKey, Node, Transmit, send};
use crate::proto::error::DecodeError;
use crate::proto::heartbeat::Heartbeat;
use crate::proto::link::{Conn, ConnState, DialState, Dialed, Peer, backoff};
use crate::proto::time::Time;
use crate::proto::types::{CloseCode, ConnId, Incarnation, NodeId, RoomName};
use crate::proto::wire::{self, Message, PROTOCOL_VERSION};
use std::time::Duration;

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
            (ConnState::Handshaking, _) | (ConnState::Active(_), Message::Hello { .. }) => {
                self.protocol_error(conn, &DecodeError::Malformed("unexpected".into()), now)
            }
            (ConnState::Active(node), msg) => self.on_message(conn, node, msg, now),
        }
    }

    /// Say Goodbye on every trunk and stop: no more dialing or accepting.
    pub fn shutdown(&mut self, now: Time) {
        self.timers_changed();
        let mut conns: Vec<ConnId> = self.conns.keys().copied().collect();
        conns.sort();
        for conn in conns {
            self.drop_conn(conn, Some(CloseCode::Shutdown), CloseCode::Shutdown, now);
        }
        self.shut_down = true;
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
            ConnState::Handshaking => match c.dialed {
                Some(Dialed::Node(node)) => self.ensure_redial(node, now),
                // A duplicate loser reached a live node: no failure.
                Some(Dialed::Addr(addr)) if reason == CloseCode::Duplicate => {
                    self.ensure_addr_dial(addr, now)
                }
                Some(Dialed::Addr(addr)) => self.addr_attempt_failed(addr, now),
                None => {}
            },
        }
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
        if cluster != self.config.cluster || node == self.config.node_id {
            self.drop_conn(
                conn,
                Some(CloseCode::WrongCluster),
                CloseCode::WrongCluster,
                now,
            );
            return;
        }
        self.learn_addr_node(conn, node);
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
                // The peer restarted: the old trunk and all it taught us go now.
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
                self.drop_conn(old, Some(CloseCode::Replaced), CloseCode::Replaced, now);
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
}
