//! The simulated network: connections between node epochs, each direction
//! an ordered stream of frames with random delays (rarely long ones while
//! faults are injected); unordered, lossy, jittered datagrams; cut paths
//! (`Sim::cuts`) that break whatever crosses them. `pump` moves a node's
//! outputs onto it.

use crate::events::Ev;
use crate::{Sim, ms};
use rand::Rng;
use std::net::SocketAddr;
use std::time::Duration;
use trunk::proto::{NodeId, Time, Transmit};

pub(crate) const MAX_DELAY_MS: u64 = 50;
/// Rare long delays during the fault phase.
pub(crate) const MAX_LONG_DELAY_MS: u64 = 900;

/// Highest datagram loss rate drawn for a seed.
pub(crate) const MAX_DGRAM_LOSS: f64 = 0.10;
/// Datagram one-way delay: a per-seed base plus a per-seed jitter.
pub(crate) const MAX_DGRAM_BASE_MS: u64 = 20;
pub(crate) const MAX_DGRAM_JITTER_MS: u64 = 40;

/// What became of a datagram handed to the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    Sent,
    Lost,
    /// Cut path or closed connection.
    Blocked,
}

#[derive(Debug)]
pub(crate) struct SimConn {
    /// (node index, epoch) of dialer and acceptor.
    pub(crate) ends: [(usize, u64); 2],
    pub(crate) broken: bool,
    /// Each direction is one ordered stream: deliveries never overtake.
    pub(crate) last: [Time; 2],
    /// Dialed for a discovered address (`Event::Dial`), not a node id.
    pub(crate) addr: Option<SocketAddr>,
}

/// Where node `i` listens, for seeds that discover peers by address.
pub(crate) fn sim_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1 + i as u8], 3002))
}

/// A path between two nodes, either way round.
pub(crate) fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Sim {
    /// How long the next frame takes.
    pub(crate) fn delay(&mut self) -> Duration {
        // While faults are injected, a few messages are held much longer
        // (still under one heartbeat, so "no ghosts" keeps its bound).
        if self.chaos && self.rng.random_bool(0.02) {
            return ms(self.rng.random_range(MAX_DELAY_MS..=MAX_LONG_DELAY_MS));
        }
        ms(self.rng.random_range(0..=MAX_DELAY_MS))
    }

    /// Node `i` is configured with every node as a peer (itself ignored),
    /// or, on seeds that discover, given every other node's address (ids
    /// learned from Hello; a node's own address is covered by
    /// `tests/discover.rs`: here both ends of a connection share its id).
    pub(crate) fn add_peers(&mut self, i: usize) {
        let now = self.now;
        if self.discover {
            let addrs: Vec<SocketAddr> = (0..self.nodes.len())
                .filter(|j| *j != i)
                .map(sim_addr)
                .collect();
            self.nodes[i].node.set_dial_addrs(addrs, now);
        } else {
            let ids: Vec<NodeId> = self.nodes.iter().map(|n| n.id).collect();
            for id in ids {
                self.nodes[i].node.add_peer(id, now);
            }
        }
        self.pump(i);
    }

    /// Node `i` dials node `target` (by id, or for a discovered `addr`):
    /// connected, or failed, after a network delay.
    pub(crate) fn dial(&mut self, i: usize, target: usize, addr: Option<SocketAddr>) {
        let conn = self.next_conn;
        self.next_conn += 1;
        let ends = [(i, self.nodes[i].epoch), (target, self.nodes[target].epoch)];
        self.conns.insert(
            conn,
            SimConn {
                ends,
                broken: false,
                last: [Time(0); 2],
                addr,
            },
        );
        let d = self.delay();
        self.at(self.now + d + ms(1), Ev::Connect { conn });
    }

    /// Drain a node's outputs into the network and its SFU model.
    pub(crate) fn pump(&mut self, i: usize) {
        while let Some(t) = self.nodes[i].node.poll_transmit() {
            match t {
                Transmit::Frame { conn, bytes } => self.send(i, conn.0, Some(bytes)),
                Transmit::Close { conn, .. } => self.send(i, conn.0, None),
            }
        }
        let mut snap = None;
        while let Some(out) = self.nodes[i].node.poll_datagram() {
            self.datagram_out(i, out, &mut snap);
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

    /// Put a frame (or, `None`, a close) from node `from` on a connection,
    /// in order behind what it sent before; a cut path breaks it.
    pub(crate) fn send(&mut self, from: usize, conn: u64, bytes: Option<Vec<u8>>) {
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

    /// How long the next datagram takes.
    pub(crate) fn dgram_delay(&mut self) -> Duration {
        // While faults are injected, a few datagrams are held past the
        // lateness bound.
        if self.chaos && self.mrng.random_bool(0.01) {
            return ms(self.mrng.random_range(250..=MAX_LONG_DELAY_MS));
        }
        Duration::from_micros(self.dgram_base + self.mrng.random_range(0..=self.dgram_jitter))
    }

    /// Put a datagram on the network: unordered, maybe lost.
    pub(crate) fn send_dgram(&mut self, from: usize, conn: u64, bytes: Vec<u8>) -> Fate {
        let Some(c) = self.conns.get(&conn) else {
            return Fate::Blocked;
        };
        let side = if c.ends[0].0 == from { 0 } else { 1 };
        if c.broken || self.cuts.contains(&pair(from, c.ends[1 - side].0)) {
            return Fate::Blocked;
        }
        if self.mrng.random_bool(self.loss) {
            return Fate::Lost;
        }
        let d = self.dgram_delay();
        self.at(
            self.now + d,
            Ev::Dgram {
                conn,
                to: 1 - side,
                bytes,
            },
        );
        Fate::Sent
    }

    /// The node at one end of a connection, if that process is still alive.
    pub(crate) fn end_alive(&self, conn: u64, side: usize) -> Option<usize> {
        let c = self.conns.get(&conn)?;
        let (i, epoch) = c.ends[side];
        let n = &self.nodes[i];
        (n.alive && n.epoch == epoch).then_some(i)
    }
}
