//! Room links and the control messages of an up link. A room link (us,
//! peer, room) is up exactly when the room is open here, the peer's latest
//! word about it is `Open`, and the link is active; `room_link_up` /
//! `room_link_down` keep that true and announce or forget what it carries.
//! `on_message` handles every frame of an active link after Hello: Open and
//! Close, participants, tracks, subscriptions, keyframe requests and data,
//! each room-scoped one passing the generation gate (`accept`) first.

use super::{Event, KfKey, Node, send};
use crate::proto::directory::{RemoteRoom, RemoteTrack, WireIn};
use crate::proto::ratelimit::RateLimiter;
use crate::proto::time::Time;
use crate::proto::types::{CloseCode, ConnId, Gens, Layer, NodeId, RoomName, WireId};
use crate::proto::wire::Message;
use std::collections::BTreeSet;

impl Node {
    /// Full resync after (re)connect: our whole interest set.
    pub(super) fn send_resync(&mut self, _node: NodeId, conn: ConnId) {
        for (room, r) in &self.rooms {
            let msg = Message::Open {
                room: room.clone(),
                generation: r.generation,
            };
            send(&mut self.out, &mut self.metrics, conn, &msg);
        }
    }

    /// Send a room-scoped message to every peer whose room link is up.
    pub(super) fn broadcast(&mut self, room: &RoomName, mut make: impl FnMut(Gens) -> Message) {
        let Some(local) = self.rooms.get(room) else {
            return;
        };
        for peer in self.peers.values() {
            let (Some(conn), true) = (peer.conn, peer.rooms.contains_key(room)) else {
                continue;
            };
            let Some(to) = peer.remote_open.get(room) else {
                continue;
            };
            let msg = make(Gens {
                from: local.generation,
                to: *to,
            });
            send(&mut self.out, &mut self.metrics, conn, &msg);
        }
    }

    /// Both sides have `room` open: create the room link and announce ours.
    pub(super) fn room_link_up(&mut self, node: NodeId, room: &RoomName) {
        let Some(local) = self.rooms.get(room) else {
            return;
        };
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        let (Some(conn), Some(to)) = (peer.conn, peer.remote_open.get(room).copied()) else {
            return;
        };
        if peer.rooms.contains_key(room) {
            return;
        }
        peer.rooms.insert(room.clone(), RemoteRoom::default());
        let gens = Gens {
            from: local.generation,
            to,
        };
        for p in local.participants.values() {
            let msg = Message::ParticipantJoined {
                room: room.clone(),
                gens,
                participant: p.clone(),
            };
            send(&mut self.out, &mut self.metrics, conn, &msg);
        }
        for t in local.tracks.values() {
            let msg = Message::TrackAdded {
                room: room.clone(),
                gens,
                wire_id: t.wire_id,
                track: t.info.clone(),
            };
            send(&mut self.out, &mut self.metrics, conn, &msg);
        }
    }

    /// The room link is gone: forget what the peer told us about the room
    /// and its subscriptions to our tracks there.
    pub(super) fn room_link_down(&mut self, node: NodeId, room: &RoomName) {
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        let Some(remote) = peer.rooms.remove(room) else {
            return;
        };
        for wire_id in remote.tracks.keys() {
            peer.wires.remove(wire_id);
            #[cfg(feature = "planted-bugs")]
            if self.config.bugs.deliver_removed_tracks {
                self.tombstones.insert((node, *wire_id));
            }
            self.repairing.remove(&(node, *wire_id));
            self.kf_pending.remove(&KfKey::Remote(node, *wire_id));
            self.events.push_back(Event::RemoteTrackRemoved {
                room: room.clone(),
                node,
                wire_id: *wire_id,
            });
        }
        for pid in remote.participants.keys() {
            self.events.push_back(Event::RemoteParticipantRemoved {
                room: room.clone(),
                node,
                participant: *pid,
            });
        }
        let mut changed = Vec::new();
        if let Some(local) = self.rooms.get_mut(room) {
            for (tid, t) in local.tracks.iter_mut() {
                if let Some(layers) = t.subscribers.remove(&node) {
                    changed.push(*tid);
                    for layer in layers {
                        self.events.push_back(Event::SubscribeCancelled {
                            room: room.clone(),
                            node,
                            track: *tid,
                            layer,
                        });
                    }
                }
            }
        }
        for tid in changed {
            self.refresh_targets(tid);
        }
    }

    /// Gate for room-scoped messages: the room must be open here with the
    /// generation the sender names, and the sender's generation must be the
    /// one it last announced. Anything else is stale: dropped and counted.
    fn accept(&mut self, node: NodeId, room: &RoomName, gens: Gens) -> bool {
        #[cfg(feature = "planted-bugs")]
        if self.config.bugs.ignore_generations {
            if let Some(peer) = self.peers.get_mut(&node) {
                peer.rooms.entry(room.clone()).or_default();
            }
            return true;
        }
        let ok = match (self.rooms.get(room), self.peers.get(&node)) {
            (Some(local), Some(peer)) => {
                local.generation == gens.to
                    && peer.remote_open.get(room) == Some(&gens.from)
                    && peer.rooms.contains_key(room)
            }
            _ => false,
        };
        if !ok {
            self.metrics.stale_drops += 1;
        }
        ok
    }

    pub(super) fn on_message(&mut self, conn: ConnId, node: NodeId, msg: Message, now: Time) {
        match msg {
            Message::Hello { .. } | Message::Goodbye { .. } => {}
            Message::Ping { seq } => send(
                &mut self.out,
                &mut self.metrics,
                conn,
                &Message::Pong { seq },
            ),
            Message::Pong { seq } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.heartbeat.on_pong(seq, now);
                }
                self.probe_answered(conn, seq, now);
            }
            Message::Open { room, generation } => {
                let Some(peer) = self.peers.get_mut(&node) else {
                    return;
                };
                let replacing = peer
                    .remote_open
                    .get(&room)
                    .is_some_and(|g| *g != generation);
                let new_room = !peer.remote_open.contains_key(&room);
                let flood = (replacing
                    && !peer
                        .reopen_budget
                        .take(now, self.config.max_reopens_per_sec))
                    || (new_room && peer.remote_open.len() >= self.config.max_remote_rooms);
                if flood {
                    self.metrics.open_floods += 1;
                    self.drop_conn(
                        conn,
                        Some(CloseCode::ProtocolError),
                        CloseCode::ProtocolError,
                        now,
                    );
                    return;
                }
                if replacing {
                    // A new lifetime replaces the old one.
                    self.room_link_down(node, &room);
                }
                if let Some(peer) = self.peers.get_mut(&node) {
                    peer.remote_open.insert(room.clone(), generation);
                }
                if self.rooms.contains_key(&room) {
                    self.room_link_up(node, &room);
                }
            }
            Message::Close { room, generation } => {
                let Some(peer) = self.peers.get_mut(&node) else {
                    return;
                };
                if peer.remote_open.get(&room) == Some(&generation) {
                    self.room_link_down(node, &room);
                    if let Some(peer) = self.peers.get_mut(&node) {
                        peer.remote_open.remove(&room);
                    }
                } else {
                    self.metrics.stale_drops += 1;
                }
            }
            Message::ParticipantJoined {
                room,
                gens,
                participant,
            } => {
                if !self.accept(node, &room, gens) {
                    return;
                }
                let Some(r) = self
                    .peers
                    .get_mut(&node)
                    .and_then(|p| p.rooms.get_mut(&room))
                else {
                    return;
                };
                if r.participants
                    .insert(participant.id, participant.clone())
                    .is_none()
                {
                    self.events.push_back(Event::RemoteParticipantAdded {
                        room,
                        node,
                        participant,
                    });
                }
            }
            Message::ParticipantLeft {
                room,
                gens,
                participant,
            } => {
                if !self.accept(node, &room, gens) {
                    return;
                }
                let Some(r) = self
                    .peers
                    .get_mut(&node)
                    .and_then(|p| p.rooms.get_mut(&room))
                else {
                    return;
                };
                if r.participants.remove(&participant).is_some() {
                    self.events.push_back(Event::RemoteParticipantRemoved {
                        room,
                        node,
                        participant,
                    });
                }
            }
            Message::TrackAdded {
                room,
                gens,
                wire_id,
                track,
            } => {
                if !self.accept(node, &room, gens) {
                    return;
                }
                let interval = self.config.keyframe_interval;
                let Some(peer) = self.peers.get_mut(&node) else {
                    return;
                };
                if peer.wires.contains_key(&wire_id) {
                    return;
                }
                let Some(r) = peer.rooms.get_mut(&room) else {
                    return;
                };
                r.tracks.insert(
                    wire_id,
                    RemoteTrack {
                        info: track.clone(),
                        layers: BTreeSet::new(),
                        keyframes: RateLimiter::new(interval),
                    },
                );
                peer.wires.insert(
                    wire_id,
                    WireIn {
                        room: room.clone(),
                        repair: None,
                    },
                );
                #[cfg(feature = "planted-bugs")]
                self.tombstones.remove(&(node, wire_id));
                self.events.push_back(Event::RemoteTrackAdded {
                    room,
                    node,
                    wire_id,
                    track,
                });
            }
            Message::TrackRemoved {
                room,
                gens,
                wire_id,
            } => {
                if !self.accept(node, &room, gens) {
                    return;
                }
                let Some(peer) = self.peers.get_mut(&node) else {
                    return;
                };
                let removed = peer
                    .rooms
                    .get_mut(&room)
                    .and_then(|r| r.tracks.remove(&wire_id));
                if removed.is_some() {
                    peer.wires.remove(&wire_id);
                    #[cfg(feature = "planted-bugs")]
                    if self.config.bugs.deliver_removed_tracks {
                        self.tombstones.insert((node, wire_id));
                    }
                    self.repairing.remove(&(node, wire_id));
                    self.kf_pending.remove(&KfKey::Remote(node, wire_id));
                    self.events.push_back(Event::RemoteTrackRemoved {
                        room,
                        node,
                        wire_id,
                    });
                } else {
                    self.metrics.unknown_wire_drops += 1;
                }
            }
            Message::Subscribe {
                room,
                gens,
                wire_id,
                layer,
            } => self.on_subscribe(node, room, gens, wire_id, layer, true),
            Message::Unsubscribe {
                room,
                gens,
                wire_id,
                layer,
            } => self.on_subscribe(node, room, gens, wire_id, layer, false),
            Message::KeyframeRequest {
                room,
                gens,
                wire_id,
            } => {
                if !self.accept(node, &room, gens) {
                    return;
                }
                let known = match self.local_wires.get(&wire_id).copied() {
                    Some(track) => self.local_keyframe(room, track, now),
                    None => false,
                };
                if !known {
                    self.metrics.unknown_wire_drops += 1;
                }
            }
            Message::Data {
                room,
                gens,
                from,
                payload,
            } => {
                if !self.accept(node, &room, gens) {
                    return;
                }
                // Only a participant this peer announced in this room may
                // speak through it (ParticipantJoined comes first on the
                // same ordered stream, so an honest peer never fails this).
                let announced = self
                    .peers
                    .get(&node)
                    .and_then(|p| p.rooms.get(&room))
                    .is_some_and(|r| r.participants.contains_key(&from));
                #[cfg(feature = "planted-bugs")]
                let announced = announced || self.config.bugs.accept_foreign_data;
                if !announced {
                    self.metrics.foreign_data_drops += 1;
                    return;
                }
                self.events.push_back(Event::DataReceived {
                    room,
                    node,
                    from,
                    payload,
                });
            }
        }
    }

    fn on_subscribe(
        &mut self,
        node: NodeId,
        room: RoomName,
        gens: Gens,
        wire_id: WireId,
        layer: Layer,
        on: bool,
    ) {
        if !self.accept(node, &room, gens) {
            return;
        }
        let Some(local) = self.rooms.get_mut(&room) else {
            return;
        };
        let Some((track, t)) = self
            .local_wires
            .get(&wire_id)
            .and_then(|id| Some((*id, local.tracks.get_mut(id)?)))
        else {
            // Unpublished while the request was in flight.
            self.metrics.unknown_wire_drops += 1;
            return;
        };
        let changed = if on {
            t.subscribers.entry(node).or_default().insert(layer)
        } else {
            let removed = t
                .subscribers
                .get_mut(&node)
                .is_some_and(|l| l.remove(&layer));
            if t.subscribers.get(&node).is_some_and(|l| l.is_empty()) {
                t.subscribers.remove(&node);
            }
            removed
        };
        if changed {
            self.refresh_targets(track);
            self.events.push_back(if on {
                Event::SubscribeRequested {
                    room,
                    node,
                    track,
                    layer,
                }
            } else {
                Event::SubscribeCancelled {
                    room,
                    node,
                    track,
                    layer,
                }
            });
        }
    }
}
