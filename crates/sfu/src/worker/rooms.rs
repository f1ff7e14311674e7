//! Rooms: rosters (local and remote participants with their tracks), chat,
//! mute, `/api/status`, room watchers, closing a room with its last local
//! member, removing a track, and the gauges.

use std::sync::atomic::Ordering;

use signal::{ParticipantView, RoomName, ServerMessage, TrackView};
use tokio::sync::mpsc::UnboundedSender;
use tracing::info;

use super::{Origin, Pid, Room, Worker, kind_of, now_ms};
use crate::RoomStatus;
use crate::remote::{RemoteEvent, RoomEvent};

impl Worker {
    /// Who is in `room` (here and on other nodes) and what they publish.
    pub(super) fn roster(&self, room: &RoomName) -> Vec<ParticipantView> {
        let Some(r) = self.rooms.get(room) else {
            return Vec::new();
        };
        let tracks_of = |id: &str| -> Vec<TrackView> {
            r.tracks
                .values()
                .filter(|t| t.participant == id)
                .map(|t| TrackView {
                    id: t.id.clone(),
                    kind: kind_of(t.kind),
                    source: t.source,
                })
                .collect()
        };
        let local = r
            .members
            .iter()
            .filter_map(|pid| self.peers.get(pid))
            .map(|p| ParticipantView {
                id: p.id.clone(),
                name: p.name.to_string(),
                audio_muted: p.audio_muted,
                video_muted: p.video_muted,
                tracks: tracks_of(&p.id),
            });
        let remote = r.remote_participants.iter().map(|(id, p)| ParticipantView {
            id: id.clone(),
            name: p.name.clone(),
            audio_muted: p.audio_muted,
            video_muted: p.video_muted,
            tracks: tracks_of(id),
        });
        local.chain(remote).collect()
    }

    pub(super) fn broadcast_roster(&self, room: &RoomName) {
        let participants = self.roster(room);
        self.broadcast(room, ServerMessage::Roster { participants });
    }

    /// Send `msg` to every local member of `room`.
    pub(super) fn broadcast(&self, room: &RoomName, msg: ServerMessage) {
        if let Some(r) = self.rooms.get(room) {
            for pid in &r.members {
                if let Some(p) = self.peers.get(pid) {
                    let _ = p.events.send(msg.clone());
                }
            }
        }
    }

    /// A local participant's chat message: to the room here and every link.
    pub(super) fn chat(&self, pid: Pid, text: String) {
        let Some(peer) = self.peers.get(&pid) else {
            return;
        };
        let room = peer.room.clone();
        if let Some(r) = self.rooms.get(&room) {
            r.tell_links(RemoteEvent::Chat {
                from: peer.id.clone(),
                name: peer.name.to_string(),
                text: text.clone(),
            });
        }
        let msg = ServerMessage::Chat {
            from: peer.id.clone(),
            name: peer.name.to_string(),
            text,
            ts: now_ms(),
        };
        self.broadcast(&room, msg);
    }

    /// A local participant's mute state; told only when it changed.
    pub(super) fn mute(&mut self, pid: Pid, audio: bool, video: bool) {
        let Some(peer) = self.peers.get_mut(&pid) else {
            return;
        };
        if (peer.audio_muted, peer.video_muted) == (audio, video) {
            // Nothing changed: no roster to every member and no
            // message to every node (a client may repeat itself).
            return;
        }
        peer.audio_muted = audio;
        peer.video_muted = video;
        let room = peer.room.clone();
        if let Some(r) = self.rooms.get(&room) {
            r.tell_links(RemoteEvent::Mute {
                id: peer.id.clone(),
                audio,
                video,
            });
        }
        self.broadcast_roster(&room);
    }

    /// Every room here with its roster (`/api/status`).
    pub(super) fn status(&self) -> Vec<RoomStatus> {
        self.rooms
            .keys()
            .map(|name| RoomStatus {
                name: name.to_string(),
                participants: self.roster(name),
            })
            .collect()
    }

    /// A new room watcher: told the rooms open now, then every change.
    pub(super) fn watch_rooms(&mut self, tx: UnboundedSender<RoomEvent>) {
        for room in self.rooms.keys() {
            let _ = tx.send(RoomEvent::Opened(room.clone()));
        }
        self.room_watchers.push(tx);
    }

    /// The last local participant left: the room and every link to it end.
    pub(super) fn close_room(&mut self, room: &RoomName) {
        let Some(r) = self.rooms.remove(room) else {
            return;
        };
        for (key, link) in r.links {
            link.tell(RemoteEvent::Closed);
            self.links.remove(&key);
        }
        info!(%room, "room closed");
        self.room_watchers
            .retain(|w| w.send(RoomEvent::Closed(room.clone())).is_ok());
    }

    pub(super) fn update_gauges(&self) {
        let m = &self.metrics;
        m.participants
            .store(self.peers.len() as u64, Ordering::Relaxed);
        m.rooms.store(self.rooms.len() as u64, Ordering::Relaxed);
        let tracks: usize = self.rooms.values().map(|r| r.tracks.len()).sum();
        m.tracks.store(tracks as u64, Ordering::Relaxed);
    }
}

/// Remove a track from its room: local subscribers lose it at the next
/// renegotiation; remote nodes are told if they knew of it.
pub(super) fn remove_track(room: &mut Room, id: &str) {
    let Some(t) = room.tracks.remove(id) else {
        return;
    };
    for l in room.links.values_mut() {
        l.subs.remove(id);
    }
    if matches!(t.origin, Origin::Local { .. }) && t.codec.is_some() {
        room.tell_links(RemoteEvent::TrackRemoved { id: t.id });
    }
}
