//! Forwarding: where a packet goes. An RTP packet from a local publisher
//! (`forward`) or from a remote node (`remote_media`) is sent to the
//! remote links that subscribed to it and fanned out to every local
//! subscriber (`fan_out`), each written through `write_to`: payload type
//! mapped to the subscriber's, numbering rewritten, payload shared.

use std::sync::atomic::Ordering;
use std::time::Instant;

use signal::RoomName;
use str0m::format::PayloadParams;
use str0m::media::MediaKind;
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite};
use tracing::debug;

use super::keyframes::remember;
use super::links::describe;
use super::participant::guarded;
use super::{LinkKey, Origin, Peer, Pid, Worker};
use crate::remote::{MediaPacket, RemoteEvent};

impl Worker {
    /// One RTP packet from a local publisher: write it to every subscriber,
    /// here and on subscribed remote nodes.
    pub(super) fn forward(&mut self, from: Pid, pkt: RtpPacket) {
        self.metrics.rtp_packets_in.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .rtp_bytes_in
            .fetch_add(pkt.payload.len() as u64, Ordering::Relaxed);
        let Some(publisher) = self.peers.get_mut(&from) else {
            return;
        };
        let ssrc = pkt.header.ssrc;
        let pt = pkt.header.payload_type;
        // The packet's m-line and the codec its payload type stands for.
        let found = guarded(publisher, |rtc| {
            let mid = rtc.direct_api().stream_rx(&ssrc).map(|s| s.mid())?;
            let params = rtc.codec_config().find(|p| p.pt() == pt).copied()?;
            Some((mid, params))
        });
        let Some((mid, params)) = found.flatten() else {
            return;
        };
        let Some(track_id) = publisher.published.get(&mid).cloned() else {
            return;
        };
        let packet = MediaPacket {
            ssrc: *ssrc,
            seq: *pkt.seq_no,
            rtp_ts: pkt.header.timestamp,
            marker: pkt.header.marker,
            payload_type: *pt,
            payload: pkt.payload,
            audio_level: pkt.header.ext_vals.audio_level,
            voice_activity: pkt.header.ext_vals.voice_activity,
            arrival: pkt.timestamp,
        };
        let room_name = publisher.room.clone();
        let Some(room) = self.rooms.get_mut(&room_name) else {
            return;
        };
        let Some(track) = room.tracks.get_mut(&track_id) else {
            return;
        };
        remember(track, params, &packet);
        let first = track.codec.is_none();
        // Members here were offered the track with its expected codec; if
        // the first packet shows another, `renegotiate` (below) moves it.
        let unexpected = first && track.expected.map(|c| c.spec()) != Some(params.spec());
        if first {
            // First packet: now the codec is known and other nodes can be told.
            track.codec = Some(params);
            let desc = describe(track, params);
            room.tell_links(RemoteEvent::TrackAdded(desc));
        }
        let mut ext = ExtensionValues {
            audio_level: packet.audio_level,
            voice_activity: packet.voice_activity,
            ..Default::default()
        };
        ext.video_orientation = pkt.header.ext_vals.video_orientation;
        for link in room.links.values() {
            if link.subs.contains(&track_id)
                && link
                    .media
                    .try_send(RemoteEvent::Media {
                        track: track_id.clone(),
                        packet: packet.clone(),
                    })
                    .is_err()
            {
                self.metrics
                    .remote_media_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        if unexpected {
            self.renegotiate_room(&room_name, Some(from));
        }
        self.fan_out(&room_name, &track_id, params, &packet, ext, pkt.timestamp);
    }

    /// A packet of a remote track, from its link.
    pub(super) fn remote_media(&mut self, key: LinkKey, track_id: &str, packet: MediaPacket) {
        let Some(room_name) = self.links.get(&key).cloned() else {
            return;
        };
        let Some(track) = self
            .rooms
            .get_mut(&room_name)
            .and_then(|r| r.tracks.get_mut(track_id))
        else {
            return; // removed meanwhile: late packets are dropped, never create anything
        };
        if track.origin != (Origin::Remote { link: key }) {
            return;
        }
        let Some(params) = track.codec else {
            return;
        };
        if packet.payload_type != *params.pt() {
            debug!(track = %track_id, pt = packet.payload_type, "remote packet with an unannounced payload type");
            return;
        }
        self.metrics.rtp_packets_in.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .rtp_bytes_in
            .fetch_add(packet.payload.len() as u64, Ordering::Relaxed);
        let ext = ExtensionValues {
            audio_level: packet.audio_level,
            voice_activity: packet.voice_activity,
            ..Default::default()
        };
        // The origin's timing (see `MediaPacket::arrival`): sender reports
        // then map RTP time to the wallclock the origin saw, for audio and
        // video alike, whatever the trunk's jitter or repair delay.
        let arrival = packet.arrival.min(Instant::now());
        remember(track, params, &packet);
        self.fan_out(&room_name, track_id, params, &packet, ext, arrival);
    }

    /// Write one packet of `track_id` to every local subscriber of it, each
    /// with its own numbering and payload type.
    fn fan_out(
        &mut self,
        room: &RoomName,
        track_id: &str,
        params: PayloadParams,
        packet: &MediaPacket,
        ext: ExtensionValues,
        arrival: Instant,
    ) {
        // Borrow the fields apart: the room is read while subscribers are
        // written, without copying its member list per packet.
        let Worker {
            peers,
            rooms,
            metrics,
            dirty,
            ..
        } = self;
        let Some(room) = rooms.get(room) else {
            return;
        };
        let Some(track) = room.tracks.get(track_id) else {
            return;
        };
        let nackable = track.kind == MediaKind::Video;
        let mut sent = 0u64;
        for &m in &room.members {
            if matches!(track.origin, Origin::Local { pid, .. } if pid == m) {
                continue;
            }
            let Some(sub_peer) = peers.get_mut(&m) else {
                continue;
            };
            // Not before the transport is up: nothing written earlier
            // arrives, and the subscription starts with a keyframe then
            // (`start_subscriptions`).
            if sub_peer.ended.is_some() || !sub_peer.connected {
                continue;
            }
            // One lookup of the subscription, in `write_to` (none for its
            // own track, inactive until the answer is in).
            match write_to(sub_peer, track_id, params, packet, &ext, arrival, nackable) {
                Written::Yes => {}
                Written::No | Written::Panicked => continue,
            }
            sent += 1;
            dirty.insert(m);
        }
        let len = packet.payload.len() as u64;
        metrics.rtp_packets_out.fetch_add(sent, Ordering::Relaxed);
        metrics
            .rtp_bytes_out
            .fetch_add(sent * len, Ordering::Relaxed);
    }
}

/// What [`write_to`] did with a packet.
pub(super) enum Written {
    Yes,
    /// Not forwarded (no active subscription, no common codec, older than its
    /// source, no send stream yet); logged at debug.
    No,
    /// str0m panicked: the subscriber has ended (see [`guarded`]).
    Panicked,
}

/// Write one packet of `track_id` to `peer`'s subscription to it: payload
/// type mapped (once per publisher payload type), numbering rewritten,
/// str0m calls guarded.
pub(super) fn write_to(
    peer: &mut Peer,
    track_id: &str,
    params: PayloadParams,
    packet: &MediaPacket,
    ext: &ExtensionValues,
    arrival: Instant,
    nackable: bool,
) -> Written {
    let Some(mut sub) = peer.subs.get_mut(track_id).filter(|s| s.active) else {
        return Written::No;
    };
    let in_pt = packet.payload_type;
    let cached = sub
        .pt_map
        .iter()
        .find(|(p, _)| *p == in_pt)
        .map(|(_, out)| *out);
    let out_pt = match cached {
        Some(out) => out,
        None => {
            // The subscriber's payload type for the publisher's codec, if it
            // has one and the m-line was offered for that codec (else the
            // browser would drop it; the m-line is being replaced, see
            // `Subscription::offered_for`).
            let offered = sub.offered_for.spec() == params.spec();
            let Some(out) = guarded(peer, |rtc| {
                let out = rtc.codec_config().match_params(params).map(|p| *p.pt());
                out.filter(|_| offered)
            }) else {
                return Written::Panicked;
            };
            let Some(s) = peer.subs.get_mut(track_id) else {
                return Written::No;
            };
            sub = s;
            sub.pt_map.push((in_pt, out));
            out
        }
    };
    let Some(out_pt) = out_pt else {
        debug!(track = %track_id, "no common codec; not forwarded");
        return Written::No;
    };
    let clock_rate = params.spec().clock_rate.get();
    let Some((seq, ts)) =
        sub.rewriter
            .rewrite(packet.ssrc, packet.seq, packet.rtp_ts, arrival, clock_rate)
    else {
        debug!(track = %track_id, "packet older than its source; not forwarded");
        return Written::No;
    };
    let write = RtpWrite::new(
        out_pt.into(),
        seq.into(),
        ts,
        arrival,
        packet.payload.clone(),
    )
    .marker(packet.marker)
    .ext_vals(ext.clone())
    .nackable(nackable);
    let mid = sub.mid;
    let written = guarded(peer, |rtc| {
        let mut api = rtc.direct_api();
        api.stream_tx_by_mid(mid, None)
            .map(|stream| stream.write_rtp(write))
    });
    match written {
        Some(Some(_)) => Written::Yes,
        Some(None) => {
            debug!(track = %track_id, "no send stream (yet); not forwarded");
            Written::No
        }
        None => Written::Panicked,
    }
}
