//! Keyframes: a new subscription (local, or a remote node's) starts at the
//! track's cached group of pictures (`gop.rs`) when it is young enough,
//! else by asking the publisher for a keyframe; subscribers' PLI/FIR go to
//! the publisher through the track's `KeyframeLimiter` (`keyframe.rs`), as a
//! PLI to a local browser or a request over the track's remote link.

use std::sync::atomic::Ordering;
use std::time::Instant;

use signal::RoomName;
use str0m::format::PayloadParams;
use str0m::media::{KeyframeRequestKind, MediaKind, Mid};
use str0m::rtp::ExtensionValues;
use tracing::debug;

use super::forward::{Written, write_to};
use super::participant::guarded;
use super::{LinkKey, Origin, Pid, Track, Worker};
use crate::gop::GopCache;
use crate::remote::{MediaPacket, RemoteEvent};

impl Worker {
    /// Subscriptions of `pid` that can receive media from now on (answer in
    /// and transport up; `tracks` may name audio, which needs nothing): each
    /// video one gets the track's cached group of pictures at once if there
    /// is one, else asks the publisher for a keyframe. Asked any earlier
    /// (at the answer, before ICE and DTLS finished), the keyframe went out
    /// before this subscriber could receive it.
    pub(super) fn start_subscriptions(&mut self, pid: Pid, tracks: Vec<String>) {
        let Some(room) = self.peers.get(&pid).map(|p| p.room.clone()) else {
            return;
        };
        for track in tracks {
            if !self.replay_to_subscriber(&room, pid, &track) {
                self.keyframe_for_track(&room, &track, true);
            }
        }
    }

    /// Replay a track's cached group to one local subscription. False: no
    /// group young enough (or not a video track, or nothing written).
    fn replay_to_subscriber(&mut self, room: &RoomName, pid: Pid, track_id: &str) -> bool {
        let Worker {
            peers,
            rooms,
            metrics,
            dirty,
            ..
        } = self;
        let Some(track) = rooms.get(room).and_then(|r| r.tracks.get(track_id)) else {
            return false;
        };
        let (Some(gop), Some(params)) = (&track.gop, track.codec) else {
            return false;
        };
        let now = Instant::now();
        let Some(packets) = gop.replay(now) else {
            return false;
        };
        let Some(peer) = peers.get_mut(&pid) else {
            return false;
        };
        if !peer.subs.contains_key(track_id) {
            return false;
        }
        let ext = ExtensionValues::default();
        let mut sent = 0u64;
        for packet in packets {
            match write_to(
                peer,
                track_id,
                params,
                packet,
                &ext,
                packet.arrival.min(now),
                true,
            ) {
                Written::Yes => sent += 1,
                Written::No => {}
                Written::Panicked => return true,
            }
        }
        if sent == 0 {
            return false;
        }
        dirty.insert(pid);
        metrics.gop_replays.fetch_add(1, Ordering::Relaxed);
        metrics
            .gop_replayed_packets
            .fetch_add(sent, Ordering::Relaxed);
        metrics.rtp_packets_out.fetch_add(sent, Ordering::Relaxed);
        debug!(track = %track_id, packets = sent, "new subscription started from the cached keyframe");
        true
    }

    /// Replay a local track's cached group to one remote node that just
    /// subscribed to it. The packets leave stamped with the current time:
    /// they are sent now, and the receiving node would drop them as late
    /// otherwise. False: no group young enough.
    pub(super) fn replay_to_link(&mut self, room: &RoomName, key: LinkKey, track_id: &str) -> bool {
        let Some(r) = self.rooms.get(room) else {
            return false;
        };
        let Some(gop) = r.tracks.get(track_id).and_then(|t| t.gop.as_ref()) else {
            return false;
        };
        let Some(link) = r.links.get(&key) else {
            return false;
        };
        let now = Instant::now();
        let Some(packets) = gop.replay(now) else {
            return false;
        };
        let mut sent = 0u64;
        for packet in packets {
            let packet = MediaPacket {
                arrival: now,
                ..packet.clone()
            };
            let event = RemoteEvent::Media {
                track: track_id.to_owned(),
                packet,
            };
            if link.media.try_send(event).is_ok() {
                sent += 1;
            } else {
                self.metrics
                    .remote_media_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        self.metrics.gop_replays.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .gop_replayed_packets
            .fetch_add(sent, Ordering::Relaxed);
        debug!(track = %track_id, packets = sent, "remote subscription started from the cached keyframe");
        sent > 0
    }

    /// A subscriber's PLI/FIR on its m-line `mid`: for that track's publisher.
    pub(super) fn keyframe_request_from_subscriber(&mut self, pid: Pid, mid: Mid) {
        let Some(peer) = self.peers.get(&pid) else {
            return;
        };
        let Some(track) = peer.sub_by_mid.get(&mid).cloned() else {
            return;
        };
        let room = peer.room.clone();
        self.keyframe_for_track(&room, &track, false);
    }

    /// Ask for a keyframe of a track, rate-limited; `new_subscriber`: the
    /// request starts a subscription (shorter spacing, see
    /// `NEW_SUBSCRIBER_INTERVAL`).
    pub(super) fn keyframe_for_track(
        &mut self,
        room: &RoomName,
        track_id: &str,
        new_subscriber: bool,
    ) {
        let Some(t) = self
            .rooms
            .get_mut(room)
            .and_then(|r| r.tracks.get_mut(track_id))
        else {
            return;
        };
        if t.kind != MediaKind::Video {
            return;
        }
        let now = Instant::now();
        let pass = if new_subscriber {
            t.keyframes.request_new_subscriber(now)
        } else {
            t.keyframes.request(now)
        };
        debug!(track = %track_id, new_subscriber, pass, "keyframe wanted");
        if pass {
            let origin = t.origin;
            self.send_keyframe_request(room, track_id, origin);
        }
    }

    /// Ask a track's publisher for a keyframe (the limiter already agreed):
    /// a PLI to a local browser, or a request over the track's remote link.
    pub(super) fn send_keyframe_request(
        &mut self,
        room: &RoomName,
        track_id: &str,
        origin: Origin,
    ) {
        match origin {
            Origin::Local { pid, mid } => {
                let Some(p) = self.peers.get_mut(&pid) else {
                    return;
                };
                let requested = guarded(p, |rtc| {
                    let mut api = rtc.direct_api();
                    api.stream_rx_by_mid(mid, None)
                        .map(|rx| rx.request_keyframe(KeyframeRequestKind::Pli))
                });
                if let Some(Some(())) = requested {
                    self.dirty.insert(pid);
                }
            }
            Origin::Remote { link } => {
                let Some(l) = self.rooms.get(room).and_then(|r| r.links.get(&link)) else {
                    return;
                };
                l.tell(RemoteEvent::KeyframeRequest {
                    track: track_id.to_owned(),
                });
            }
        }
        self.metrics
            .keyframe_requests_sent
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// Keep a video packet in its track's group-of-pictures cache.
pub(super) fn remember(track: &mut Track, params: PayloadParams, packet: &MediaPacket) {
    if track.kind != MediaKind::Video {
        return;
    }
    track
        .gop
        .get_or_insert_with(|| GopCache::new(params.spec().codec))
        .push(packet, packet.arrival);
}
