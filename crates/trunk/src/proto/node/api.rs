//! The local API: what the SFU adapter calls when its own participants
//! come and go — open and close a room, join and leave, publish and
//! unpublish a track, subscribe to a remote one, ask for a keyframe, send
//! chat data. Each call updates the local directory and tells the peers
//! whose room links are up.

use super::{KfKey, Node, send};
use crate::proto::directory::{LocalRoom, LocalTrack, TrackMedia};
use crate::proto::error::{DecodeError, LocalError};
use crate::proto::repair::{RecvRepair, SendHistory};
use crate::proto::time::Time;
use crate::proto::types::{
    Generation, Gens, Layer, NodeId, ParticipantId, ParticipantInfo, RoomName, TrackId, TrackInfo,
    WireId,
};
use crate::proto::wire::{self, MAX_DATA_PAYLOAD, Message};

impl Node {
    /// The first local participant is about to join `room`: open it.
    pub fn open_room(&mut self, room: RoomName, _now: Time) -> Result<Generation, LocalError> {
        self.timers_changed();
        if self.shut_down {
            return Err(LocalError::ShutDown);
        }
        if self.rooms.contains_key(&room) {
            return Err(LocalError::RoomAlreadyOpen(room));
        }
        let generation = Generation(self.next_gen);
        self.next_gen += 1;
        self.rooms.insert(room.clone(), LocalRoom::new(generation));
        let nodes: Vec<NodeId> = self.peers.keys().copied().collect();
        for node in nodes {
            let Some(peer) = self.peers.get(&node) else {
                continue;
            };
            let Some(conn) = peer.conn else { continue };
            let remote_has = peer.remote_open.contains_key(&room);
            let msg = Message::Open {
                room: room.clone(),
                generation,
            };
            send(&mut self.out, &mut self.metrics, conn, &msg);
            if remote_has {
                self.room_link_up(node, &room);
            }
        }
        Ok(generation)
    }

    /// The last local participant left `room`: close it and forget everything
    /// about it (its room links go down on both sides).
    pub fn close_room(&mut self, room: &RoomName, _now: Time) -> Result<(), LocalError> {
        self.timers_changed();
        let Some(local) = self.rooms.get(room) else {
            return Err(LocalError::RoomNotOpen(room.clone()));
        };
        let generation = local.generation;
        let nodes: Vec<NodeId> = self.peers.keys().copied().collect();
        for node in nodes {
            self.room_link_down(node, room);
            if let Some(conn) = self.peers.get(&node).and_then(|p| p.conn) {
                let msg = Message::Close {
                    room: room.clone(),
                    generation,
                };
                send(&mut self.out, &mut self.metrics, conn, &msg);
            }
        }
        if let Some(local) = self.rooms.remove(room) {
            for (id, t) in &local.tracks {
                self.track_rooms.remove(id);
                self.media.remove(id);
                self.local_wires.remove(&t.wire_id);
                self.kf_pending.remove(&KfKey::Local(*id));
            }
        }
        Ok(())
    }

    pub fn participant_joined(
        &mut self,
        room: &RoomName,
        info: ParticipantInfo,
    ) -> Result<(), LocalError> {
        self.timers_changed();
        let local = self
            .rooms
            .get_mut(room)
            .ok_or_else(|| LocalError::RoomNotOpen(room.clone()))?;
        if local.participants.contains_key(&info.id) {
            return Err(LocalError::ParticipantExists);
        }
        local.participants.insert(info.id, info.clone());
        self.broadcast(room, |gens| Message::ParticipantJoined {
            room: room.clone(),
            gens,
            participant: info.clone(),
        });
        Ok(())
    }

    /// A local participant left; its tracks are unpublished first.
    pub fn participant_left(
        &mut self,
        room: &RoomName,
        id: ParticipantId,
    ) -> Result<(), LocalError> {
        self.timers_changed();
        let local = self
            .rooms
            .get_mut(room)
            .ok_or_else(|| LocalError::RoomNotOpen(room.clone()))?;
        if local.participants.remove(&id).is_none() {
            return Err(LocalError::UnknownParticipant);
        }
        let tracks: Vec<TrackId> = local
            .tracks
            .iter()
            .filter(|(_, t)| t.info.participant == id)
            .map(|(tid, _)| *tid)
            .collect();
        for tid in tracks {
            self.unpublish_track(room, tid)?;
        }
        self.broadcast(room, |gens| Message::ParticipantLeft {
            room: room.clone(),
            gens,
            participant: id,
        });
        Ok(())
    }

    /// Publish a local participant's track; announced on every up room link.
    pub fn publish_track(
        &mut self,
        room: &RoomName,
        track: TrackId,
        info: TrackInfo,
    ) -> Result<WireId, LocalError> {
        self.timers_changed();
        if self.track_rooms.contains_key(&track) {
            return Err(LocalError::TrackExists);
        }
        let local = self
            .rooms
            .get_mut(room)
            .ok_or_else(|| LocalError::RoomNotOpen(room.clone()))?;
        if !local.participants.contains_key(&info.participant) {
            return Err(LocalError::UnknownParticipant);
        }
        let probe = Message::TrackAdded {
            room: room.clone(),
            gens: Gens {
                from: Generation(0),
                to: Generation(0),
            },
            wire_id: WireId(0),
            track: info.clone(),
        };
        if let Err(DecodeError::TooLarge(n)) = wire::encode_frame(&probe) {
            return Err(LocalError::PayloadTooLarge(n));
        }
        let wire_id = WireId(self.next_wire);
        self.next_wire = self.next_wire.wrapping_add(1).max(1);
        local.tracks.insert(
            track,
            LocalTrack::new(wire_id, info.clone(), self.config.keyframe_interval),
        );
        self.track_rooms.insert(track, room.clone());
        self.local_wires.insert(wire_id, track);
        self.media.insert(
            track,
            TrackMedia {
                wire_id,
                kind: info.kind,
                targets: Vec::new(),
                history: SendHistory::new(),
            },
        );
        self.broadcast(room, |gens| Message::TrackAdded {
            room: room.clone(),
            gens,
            wire_id,
            track: info.clone(),
        });
        Ok(wire_id)
    }

    pub fn unpublish_track(&mut self, room: &RoomName, track: TrackId) -> Result<(), LocalError> {
        self.timers_changed();
        let local = self
            .rooms
            .get_mut(room)
            .ok_or_else(|| LocalError::RoomNotOpen(room.clone()))?;
        let t = local
            .tracks
            .remove(&track)
            .ok_or(LocalError::UnknownTrack)?;
        self.track_rooms.remove(&track);
        self.media.remove(&track);
        self.local_wires.remove(&t.wire_id);
        self.kf_pending.remove(&KfKey::Local(track));
        let wire_id = t.wire_id;
        self.broadcast(room, |gens| Message::TrackRemoved {
            room: room.clone(),
            gens,
            wire_id,
        });
        Ok(())
    }

    /// The local SFU wants `layer` of a remote track.
    pub fn subscribe(
        &mut self,
        room: &RoomName,
        node: NodeId,
        wire_id: WireId,
        layer: Layer,
    ) -> Result<(), LocalError> {
        self.set_subscription(room, node, wire_id, layer, true)
    }

    pub fn unsubscribe(
        &mut self,
        room: &RoomName,
        node: NodeId,
        wire_id: WireId,
        layer: Layer,
    ) -> Result<(), LocalError> {
        self.set_subscription(room, node, wire_id, layer, false)
    }

    fn set_subscription(
        &mut self,
        room: &RoomName,
        node: NodeId,
        wire_id: WireId,
        layer: Layer,
        on: bool,
    ) -> Result<(), LocalError> {
        self.timers_changed();
        let generation = self
            .rooms
            .get(room)
            .ok_or_else(|| LocalError::RoomNotOpen(room.clone()))?
            .generation;
        let peer = self.peers.get_mut(&node).ok_or(LocalError::UnknownTrack)?;
        let (Some(conn), Some(to)) = (peer.conn, peer.remote_open.get(room).copied()) else {
            return Err(LocalError::UnknownTrack);
        };
        let track = peer
            .rooms
            .get_mut(room)
            .and_then(|r| r.tracks.get_mut(&wire_id))
            .ok_or(LocalError::UnknownTrack)?;
        let changed = if on {
            track.layers.insert(layer)
        } else {
            track.layers.remove(&layer)
        };
        let subscribed = !track.layers.is_empty();
        if let Some(w) = peer.wires.get_mut(&wire_id) {
            match (subscribed, w.repair.is_some()) {
                (true, false) => w.repair = Some(RecvRepair::new()),
                (false, true) => {
                    w.repair = None;
                    self.repairing.remove(&(node, wire_id));
                }
                _ => {}
            }
        }
        if changed {
            let gens = Gens {
                from: generation,
                to,
            };
            let msg = if on {
                Message::Subscribe {
                    room: room.clone(),
                    gens,
                    wire_id,
                    layer,
                }
            } else {
                Message::Unsubscribe {
                    room: room.clone(),
                    gens,
                    wire_id,
                    layer,
                }
            };
            send(&mut self.out, &mut self.metrics, conn, &msg);
        }
        Ok(())
    }

    /// Ask the origin of a remote track for a keyframe (coalesced, rate-limited).
    pub fn request_keyframe(
        &mut self,
        room: &RoomName,
        node: NodeId,
        wire_id: WireId,
        now: Time,
    ) -> Result<(), LocalError> {
        self.timers_changed();
        let generation = self
            .rooms
            .get(room)
            .ok_or_else(|| LocalError::RoomNotOpen(room.clone()))?
            .generation;
        let peer = self.peers.get_mut(&node).ok_or(LocalError::UnknownTrack)?;
        let (Some(conn), Some(to)) = (peer.conn, peer.remote_open.get(room).copied()) else {
            return Err(LocalError::UnknownTrack);
        };
        let track = peer
            .rooms
            .get_mut(room)
            .and_then(|r| r.tracks.get_mut(&wire_id))
            .ok_or(LocalError::UnknownTrack)?;
        if track.keyframes.request(now) {
            let msg = Message::KeyframeRequest {
                room: room.clone(),
                gens: Gens {
                    from: generation,
                    to,
                },
                wire_id,
            };
            send(&mut self.out, &mut self.metrics, conn, &msg);
        } else {
            self.metrics.keyframes_coalesced += 1;
            self.kf_pending.insert(KfKey::Remote(node, wire_id));
        }
        Ok(())
    }

    /// Chat / data-channel message from a local participant to every node
    /// sharing the room (reliable, ordered on each trunk).
    pub fn send_data(
        &mut self,
        room: &RoomName,
        from: ParticipantId,
        payload: &[u8],
    ) -> Result<(), LocalError> {
        self.timers_changed();
        if payload.len() > MAX_DATA_PAYLOAD {
            return Err(LocalError::PayloadTooLarge(payload.len()));
        }
        if !self.rooms.contains_key(room) {
            return Err(LocalError::RoomNotOpen(room.clone()));
        }
        self.broadcast(room, |gens| Message::Data {
            room: room.clone(),
            gens,
            from,
            payload: payload.to_vec(),
        });
        Ok(())
    }
}
