//! Remote links, the trunk seam (`crate::remote`): a remote node attached
//! to a room as a member. Attaching resyncs it with what this node has
//! (origin-only); its `RemoteCommand`s are checked against what that link
//! announced (participants, tracks, subscriptions, keyframe requests, chat)
//! and applied; detaching removes all it brought. Its media packets go to
//! `remote_media` (`forward.rs`).

use std::collections::HashSet;

use signal::{Kind, RoomName, ServerMessage};
use str0m::format::PayloadParams;
use str0m::media::MediaKind;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, warn};

use super::rooms::remove_track;
use super::{Link, LinkKey, Origin, RemoteParticipant, Room, Track, Worker, kind_of, now_ms};
use crate::keyframe::{KEYFRAME_INTERVAL, KeyframeLimiter};
use crate::remote::{CodecInfo, RemoteCommand, RemoteEvent, TrackDescription};

impl Worker {
    /// A remote node joins `room` as a member through link `key` (answered
    /// `Closed` at once, creating nothing, if the room is not open here).
    pub(super) fn attach(
        &mut self,
        key: LinkKey,
        room: RoomName,
        node: String,
        control: UnboundedSender<RemoteEvent>,
        media: tokio::sync::mpsc::Sender<RemoteEvent>,
    ) {
        let Some(r) = self.rooms.get_mut(&room) else {
            // Not open here: nothing is created for a room with nobody in
            // it; the adapter learns at once and closes its room link.
            let _ = control.send(RemoteEvent::Closed);
            return;
        };
        let link = Link {
            node,
            control,
            media,
            subs: HashSet::new(),
        };
        // Resync: everything this node has in the room, origin-only.
        for pid in &r.members {
            if let Some(p) = self.peers.get(pid) {
                link.tell(RemoteEvent::ParticipantJoined {
                    id: p.id.clone(),
                    name: p.name.to_string(),
                });
                if p.audio_muted || p.video_muted {
                    link.tell(RemoteEvent::Mute {
                        id: p.id.clone(),
                        audio: p.audio_muted,
                        video: p.video_muted,
                    });
                }
            }
        }
        for t in r.tracks.values() {
            if let (Origin::Local { .. }, Some(codec)) = (t.origin, t.codec) {
                link.tell(RemoteEvent::TrackAdded(describe(t, codec)));
            }
        }
        // Remote tracks are not told: a node learns a track from its
        // origin only, never relayed through a third node.
        info!(%room, node = %link.node, "remote link attached");
        r.links.insert(key, link);
        self.links.insert(key, room);
    }

    /// The adapter dropped the link: its participants and tracks leave the room.
    pub(super) fn detach(&mut self, key: LinkKey) {
        let Some(room) = self.links.remove(&key) else {
            return;
        };
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        if let Some(link) = r.links.remove(&key) {
            info!(%room, node = %link.node, "remote link detached");
        }
        let tracks: Vec<String> = r
            .tracks
            .values()
            .filter(|t| t.origin == (Origin::Remote { link: key }))
            .map(|t| t.id.clone())
            .collect();
        for id in &tracks {
            remove_track(r, id);
        }
        let before = r.remote_participants.len();
        r.remote_participants.retain(|_, p| p.link != key);
        if tracks.is_empty() && before == r.remote_participants.len() {
            return;
        }
        self.update_gauges();
        self.broadcast_roster(&room);
        self.renegotiate_room(&room, None);
    }

    /// A command from link `key`; what it may not claim is logged and dropped.
    pub(super) fn remote_command(&mut self, key: LinkKey, cmd: RemoteCommand) {
        let Some(room) = self.links.get(&key).cloned() else {
            return; // detached or its room closed: late commands create nothing
        };
        if let RemoteCommand::Media { track, packet } = cmd {
            return self.remote_media(key, &track, packet);
        }
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        // Ids a remote node may not claim: a local participant's, or one
        // another link brought.
        let local_ids: HashSet<&str> = r
            .members
            .iter()
            .filter_map(|pid| self.peers.get(pid).map(|p| p.id.as_str()))
            .collect();
        let owns =
            |r: &Room, id: &str| r.remote_participants.get(id).is_some_and(|p| p.link == key);
        match cmd {
            RemoteCommand::Media { .. } => {}
            RemoteCommand::ParticipantJoined { id, name } => {
                if local_ids.contains(id.as_str())
                    || r.remote_participants
                        .get(&id)
                        .is_some_and(|p| p.link != key)
                {
                    warn!(%room, participant = %id, "remote participant id already taken; ignored");
                    return;
                }
                let p = r
                    .remote_participants
                    .entry(id)
                    .or_insert(RemoteParticipant {
                        link: key,
                        name: String::new(),
                        audio_muted: false,
                        video_muted: false,
                    });
                p.name = name.to_string();
                self.broadcast_roster(&room);
            }
            RemoteCommand::ParticipantLeft { id } => {
                if !owns(r, &id) {
                    return;
                }
                r.remote_participants.remove(&id);
                let own: Vec<String> = r
                    .tracks
                    .values()
                    .filter(|t| t.participant == id)
                    .map(|t| t.id.clone())
                    .collect();
                for t in &own {
                    remove_track(r, t);
                }
                self.update_gauges();
                self.broadcast_roster(&room);
                if !own.is_empty() {
                    self.renegotiate_room(&room, None);
                }
            }
            RemoteCommand::Mute { id, audio, video } => {
                let Some(p) = r.remote_participants.get_mut(&id) else {
                    return;
                };
                if p.link != key {
                    return;
                }
                p.audio_muted = audio;
                p.video_muted = video;
                self.broadcast_roster(&room);
            }
            RemoteCommand::TrackAdded(desc) => {
                if !owns(r, &desc.participant) || r.tracks.contains_key(&desc.id) {
                    warn!(%room, track = %desc.id, "remote track of an unknown participant or with a taken id; ignored");
                    return;
                }
                let Some(codec) = desc.codec.to_params() else {
                    warn!(%room, track = %desc.id, mime = %desc.codec.mime_type, "remote track with a codec we cannot forward; ignored");
                    return;
                };
                let kind = match desc.kind {
                    Kind::Audio => MediaKind::Audio,
                    Kind::Video => MediaKind::Video,
                };
                if codec.spec().codec.kind() != kind {
                    warn!(%room, track = %desc.id, "remote track kind and codec disagree; ignored");
                    return;
                }
                info!(%room, track = %desc.id, participant = %desc.participant, "remote track added");
                r.tracks.insert(
                    desc.id.clone(),
                    Track {
                        id: desc.id.clone(),
                        participant: desc.participant,
                        origin: Origin::Remote { link: key },
                        kind,
                        source: desc.source,
                        keyframes: KeyframeLimiter::new(KEYFRAME_INTERVAL),
                        gop: None,
                        codec: Some(codec),
                        expected: None,
                    },
                );
                // Everyone here receives every track: want it at once.
                if let Some(l) = r.links.get(&key) {
                    l.tell(RemoteEvent::Subscribe { track: desc.id });
                }
                self.update_gauges();
                self.broadcast_roster(&room);
                self.renegotiate_room(&room, None);
            }
            RemoteCommand::TrackRemoved { id } => {
                if r.tracks.get(&id).map(|t| t.origin) != Some(Origin::Remote { link: key }) {
                    return;
                }
                remove_track(r, &id);
                self.update_gauges();
                self.broadcast_roster(&room);
                self.renegotiate_room(&room, None);
            }
            RemoteCommand::Subscribe { track } => {
                let local = r
                    .tracks
                    .get(&track)
                    .is_some_and(|t| matches!(t.origin, Origin::Local { .. }));
                if !local {
                    return; // only origins serve tracks
                }
                let Some(l) = r.links.get_mut(&key) else {
                    return;
                };
                if l.subs.insert(track.clone()) {
                    // A new subscriber needs a keyframe to start decoding:
                    // the cached group if there is one (sent to this link
                    // only), else a fresh keyframe.
                    if !self.replay_to_link(&room, key, &track) {
                        self.keyframe_for_track(&room, &track, true);
                    }
                }
            }
            RemoteCommand::Unsubscribe { track } => {
                if let Some(l) = r.links.get_mut(&key) {
                    l.subs.remove(&track);
                }
            }
            RemoteCommand::KeyframeRequest { track } => {
                let local = r
                    .tracks
                    .get(&track)
                    .is_some_and(|t| matches!(t.origin, Origin::Local { .. }));
                if local {
                    // Another node's request: its own limiter already spaced
                    // it (per node, per track), and it is often a new
                    // subscriber there, which must not wait out our interval.
                    self.keyframe_for_track(&room, &track, true);
                }
            }
            RemoteCommand::Chat { from, text } => {
                let Some(p) = r.remote_participants.get(&from) else {
                    return;
                };
                if p.link != key {
                    return;
                }
                let msg = ServerMessage::Chat {
                    from,
                    name: p.name.clone(),
                    text,
                    ts: now_ms(),
                };
                self.broadcast(&room, msg);
            }
        }
    }
}

/// A local track as remote nodes learn of it.
pub(super) fn describe(t: &Track, codec: PayloadParams) -> TrackDescription {
    TrackDescription {
        id: t.id.clone(),
        participant: t.participant.clone(),
        kind: kind_of(t.kind),
        source: t.source,
        codec: CodecInfo::from_params(&codec),
    }
}
