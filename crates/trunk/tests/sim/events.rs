//! The event queue: virtual time, and what happens at each instant. Every
//! frame, datagram, timer, action, restart and delayed check is an [`Ev`]
//! at a time; `run_until` pops them in order and `step` carries each out.

use crate::Sim;
use crate::media::Payload;
use crate::network::pair;
use std::cmp::Reverse;
use trunk::proto::wire::{self, Datagram};
use trunk::proto::{ConnId, Incarnation, Layer, NodeId, RoomName, Time, TrackId, WireId};

#[derive(Debug)]
pub(crate) enum Ev {
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
    /// One datagram on a connection, to one side (unordered, may be lost).
    Dgram {
        conn: u64,
        to: usize,
        bytes: Vec<u8>,
    },
    /// Every published track sends one packet.
    MediaTick,
    /// The SFU drops a subscription, if it still holds it.
    Unsubscribe {
        node: usize,
        key: (RoomName, NodeId, WireId),
        layer: Layer,
    },
    /// Something no peer sent (`strays.rs`): a NACK, media for a wire id
    /// the receiver does not know, or a replayed stale frame.
    Stray,
}

impl Sim {
    /// Schedule `ev` at `t` (events at one time run in the order scheduled).
    pub(crate) fn at(&mut self, t: Time, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((t, self.seq)));
        self.pending.insert(self.seq, ev);
    }

    /// Run every event up to `end` (or the first violation).
    pub(crate) fn run_until(&mut self, end: Time) {
        while let Some(Reverse((t, seq))) = self.queue.peek().copied() {
            if t > end || self.violation.is_some() {
                break;
            }
            self.queue.pop();
            self.now = t;
            let Some(ev) = self.pending.remove(&seq) else {
                continue;
            };
            if self.trace {
                let show = match &ev {
                    Ev::Timer { .. } | Ev::MediaTick => false,
                    Ev::Dgram { bytes, .. } => {
                        self.trace_media
                            || matches!(wire::decode_datagram(bytes), Ok(Datagram::Control(_)))
                    }
                    _ => true,
                };
                if show {
                    eprintln!("[{}ms] {}", t.0 / 1000, describe(&ev));
                }
            }
            self.step(ev);
        }
        self.now = self.now.max(end);
    }

    /// Carry out one event.
    pub(crate) fn step(&mut self, ev: Ev) {
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
                let from = self.nodes[self.conns[&conn].ends[1 - to].0].id;
                match wire::split_frame(&bytes) {
                    Ok(Some((body, used))) if used == bytes.len() => {
                        self.deliver_frame(i, from, conn, body)
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
                let addr = self.conns[&conn].addr;
                if let (true, Some(b)) = (ok, b) {
                    let target = self.nodes[b].id;
                    match addr {
                        Some(addr) => {
                            self.nodes[a]
                                .node
                                .handle_connected_addr(ConnId(conn), addr, now)
                        }
                        None => {
                            self.nodes[a]
                                .node
                                .handle_connected(ConnId(conn), Some(target), now)
                        }
                    }
                    self.nodes[b].node.handle_connected(ConnId(conn), None, now);
                    self.pump(a);
                    self.pump(b);
                } else {
                    let target = self.conns[&conn].ends[1].0;
                    let id = self.nodes[target].id;
                    self.conns.remove(&conn);
                    match addr {
                        Some(addr) => self.nodes[a].node.handle_addr_dial_failed(addr, now),
                        None => self.nodes[a].node.handle_dial_failed(id, now),
                    }
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
            Ev::Dgram { conn, to, bytes } => {
                let Some(i) = self.end_alive(conn, to) else {
                    return;
                };
                let from = self.conns[&conn].ends[1 - to].0;
                if self.cuts.contains(&pair(i, from)) {
                    return;
                }
                self.receive_dgram(i, from, conn, &bytes);
                self.pump(i);
            }
            Ev::MediaTick => {
                self.tick_pending = false;
                if self.media_on {
                    for i in self.alive() {
                        let tracks: Vec<TrackId> = self.nodes[i].sources.keys().copied().collect();
                        for t in tracks {
                            self.send_packet(i, t);
                        }
                    }
                    self.tick_pending = true;
                    self.at(now + self.tick, Ev::MediaTick);
                }
            }
            Ev::Stray => self.stray(),
            Ev::Unsubscribe { node, key, layer } => {
                let held = self.nodes[node]
                    .wanted
                    .get(&key)
                    .is_some_and(|l| l.contains(&layer));
                if held && self.nodes[node].alive {
                    self.unsubscribe(node, key, layer);
                }
            }
            Ev::GhostCheck {
                node,
                incarnation,
                among,
            } => self.check_ghosts(node, incarnation, &among),
        }
    }
}

/// One line about an event, for `SIM_TRACE`.
pub(crate) fn describe(ev: &Ev) -> String {
    match ev {
        Ev::Deliver { conn, to, bytes } => {
            let msg = wire::decode_frame(bytes)
                .map(|m| format!("{m:?}"))
                .unwrap_or_else(|e| e.to_string());
            format!("deliver conn {conn} to side {to}: {msg}")
        }
        Ev::Dgram { conn, to, bytes } => match wire::decode_datagram(bytes) {
            Ok(Datagram::Media {
                wire_id,
                origin,
                packet,
            }) => format!(
                "datagram conn {conn} to side {to}: media {wire_id:?} origin {origin} {:?}",
                Payload::decode(packet)
            ),
            Ok(Datagram::Control(m)) => format!("datagram conn {conn} to side {to}: {m:?}"),
            Err(e) => format!("datagram conn {conn} to side {to}: {e}"),
        },
        other => format!("{other:?}"),
    }
}
