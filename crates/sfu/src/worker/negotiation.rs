//! Negotiation, server side: the browser's offers (answered here) and
//! answers (matched to the outstanding server offer by their m-lines,
//! [`sdp_mids`] / [`answers`]), the server's own offers (`renegotiate`:
//! one `sendonly` m-line per track the participant should receive), and
//! publishing: an m-line the browser sends on becomes a room track
//! (`media_direction`).

use std::collections::HashMap;
use std::fmt::Display;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;

use signal::{ErrorCode, OfferedTrack, RoomName, ServerMessage, Source, TrackSource};
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::format::PayloadParams;
use str0m::media::{Direction, MediaKind, Mid};
use tracing::{debug, info};

use super::participant::guarded;
use super::rooms::remove_track;
use super::sdp_text::{
    answers, narrow_codecs, payload_type_conflict, sdp_mids, unknown_recvonly_inactive,
    without_simulcast,
};
use super::{
    GLARE_YIELD, Origin, Peer, Phase, Pid, RENEGOTIATE_WINDOW, Spare, Subscription, Track, Worker,
};
use crate::SfuMetrics;
use crate::keyframe::{KEYFRAME_INTERVAL, KeyframeLimiter};
use crate::rewrite::Rewriter;
use std::time::Instant;

impl Worker {
    /// The browser's offer: answered, unless a server offer is outstanding
    /// (glare: we are the impolite side; the browser rolls back). The first
    /// one also brings the participant what the room already has.
    pub(super) fn offer(&mut self, pid: Pid, sdp: String, tracks: Vec<TrackSource>) {
        let Some(peer) = self.peers.get_mut(&pid) else {
            return;
        };
        if peer.pending.is_some() {
            // Glare: we are the impolite side; the browser rolls back,
            // answers ours and offers again (we then yield to it).
            debug!(participant = %peer.id, "client offer during server offer; ignored");
            peer.glared = true;
            return;
        }
        let sdp = without_simulcast(&sdp);
        let ours = |mid: &str| peer.forwards_on().any(|m| m.to_string() == mid);
        let sdp = unknown_recvonly_inactive(&sdp, ours).into_owned();
        if let Some(e) = payload_type_conflict(&sdp) {
            return send_error(peer, ErrorCode::InvalidSdp, e);
        }
        let offer = match parse_sdp(&self.metrics, || SdpOffer::from_sdp_string(&sdp)) {
            Ok(o) => o,
            Err(message) => return send_error(peer, ErrorCode::InvalidSdp, message),
        };
        for t in tracks {
            peer.declared.insert(t.mid, t.source);
        }
        match guarded(peer, |rtc| rtc.sdp_api().accept_offer(offer)) {
            Some(Ok(answer)) => {
                let _ = peer.events.send(ServerMessage::Answer {
                    sdp: answer.to_sdp_string(),
                });
                let first = peer.phase == Phase::AwaitingOffer;
                peer.phase = Phase::Negotiated;
                let yielded = peer.yield_until.take().is_some();
                self.dirty.insert(pid);
                if first {
                    // Now that we can offer, send what the room already has.
                    self.drive_dirty();
                    self.renegotiate(pid);
                } else if yielded && self.renegotiate_soon.remove(&pid).is_some() {
                    // What we held back for this offer goes out now.
                    self.renegotiate(pid);
                }
            }
            Some(Err(e)) => send_error(peer, ErrorCode::InvalidSdp, e.to_string()),
            None => {} // panicked: `guarded` ended it
        }
    }

    /// The browser's answer to the outstanding server offer: its m-lines
    /// become active subscriptions (started at a keyframe once the
    /// transport is up).
    pub(super) fn answer(&mut self, pid: Pid, sdp: String) {
        let Some(peer) = self.peers.get_mut(&pid) else {
            return;
        };
        let Some(pending) = peer.pending.take() else {
            return send_error(
                peer,
                ErrorCode::NoPendingOffer,
                "no server offer is outstanding".into(),
            );
        };
        let parsed = match payload_type_conflict(&sdp) {
            Some(e) => Err(e),
            None => parse_sdp(&self.metrics, || SdpAnswer::from_sdp_string(&sdp)),
        };
        let answer = match parsed {
            Ok(a) => a,
            Err(message) => {
                peer.pending = Some(pending);
                return send_error(peer, ErrorCode::InvalidSdp, message);
            }
        };
        // An answer to an earlier offer (a client repeating itself,
        // or one that missed an offer) must not spend the one
        // outstanding: that made every later answer one offer
        // behind, an endless re-offer loop (issue 7).
        let mids = sdp_mids(&sdp);
        if !answers(&mids, &peer.pending_mids) {
            peer.pending = Some(pending);
            return send_error(
                peer,
                ErrorCode::InvalidSdp,
                format!(
                    "answer does not match the outstanding offer (m-lines {mids:?}, offered {:?}); ignored",
                    peer.pending_mids
                ),
            );
        }
        match guarded(peer, |rtc| rtc.sdp_api().accept_answer(pending, answer)) {
            Some(Ok(())) => {
                let mut new_video = Vec::new(); // audio too; only video needs starting
                for (track, sub) in peer.subs.iter_mut() {
                    if !sub.active {
                        sub.active = true;
                        new_video.push(track.clone());
                    }
                }
                self.dirty.insert(pid);
                // A new subscriber needs a keyframe to start decoding;
                // one not connected yet starts at `Event::Connected`.
                if self.peers[&pid].connected {
                    self.start_subscriptions(pid, new_video);
                }
                let Some(peer) = self.peers.get_mut(&pid) else {
                    return;
                };
                if std::mem::take(&mut peer.glared) {
                    // The browser offers again now: let its offer in first.
                    peer.yield_until = Some(Instant::now() + GLARE_YIELD);
                }
                if peer.renegotiate {
                    self.renegotiate(pid);
                }
            }
            Some(Err(e)) => {
                send_error(peer, ErrorCode::InvalidSdp, e.to_string());
                // The offer is spent; start over with a fresh one.
                peer.renegotiate = true;
                self.rebuild_subscriptions(pid);
            }
            None => {} // panicked: `guarded` ended it
        }
    }

    // ---- publishing -----------------------------------------------------

    /// The browser's side of `mid` changed direction: it now sends (publish)
    /// or stopped sending (unpublish).
    pub(super) fn media_direction(&mut self, pid: Pid, mid: Mid, kind: MediaKind, dir: Direction) {
        let Some(peer) = self.peers.get_mut(&pid) else {
            return;
        };
        if peer.forwards_on().any(|m| m == mid) {
            return; // one of our forwarding m-lines
        }
        let receiving = matches!(dir, Direction::RecvOnly | Direction::SendRecv);
        let room = peer.room.clone();
        let max_tracks = self.config.max_tracks_per_participant;
        match (receiving, peer.published.get(&mid).cloned()) {
            (true, None) if !peer.permissions.publish => {
                // The signaling layer refuses offers that send media without
                // the grant; this is the second line, in the media plane.
                self.metrics.publish_refused.fetch_add(1, Ordering::Relaxed);
                return send_error(
                    peer,
                    ErrorCode::Forbidden,
                    format!("this participant may not publish; m-line {mid} ignored"),
                );
            }
            (true, None) if peer.published.len() >= max_tracks => {
                // `invalid_sdp`, not `full`: the session goes on with the
                // tracks it has (`full` ends a session, see SIGNALING.md).
                return send_error(
                    peer,
                    ErrorCode::InvalidSdp,
                    format!(
                        "at most {max_tracks} published tracks per participant; m-line {mid} ignored"
                    ),
                );
            }
            (true, None) => {
                let source = peer
                    .declared
                    .get(&mid.to_string())
                    .copied()
                    .unwrap_or(match kind {
                        MediaKind::Audio => Source::Microphone,
                        MediaKind::Video => Source::Camera,
                    });
                // The codec the browser will send: the first of our answer
                // on this m-line, which str0m writes in its configuration's
                // order among the payload types both sides have.
                let Some(expected) = guarded(peer, |rtc| {
                    let pts = rtc.media(mid).map(|m| m.remote_pts().to_vec())?;
                    let config = rtc.codec_config();
                    config
                        .params()
                        .iter()
                        .find(|p| pts.contains(&p.pt()))
                        .copied()
                }) else {
                    return;
                };
                let track_id = format!("{}-{}", peer.id, self.next_track);
                self.next_track += 1;
                peer.published.insert(mid, track_id.clone());
                let codec = expected.map(|c| c.spec().codec);
                info!(participant = %peer.id, track = %track_id, ?kind, ?source, ?codec, "published");
                let track = Track {
                    id: track_id.clone(),
                    participant: peer.id.clone(),
                    origin: Origin::Local { pid, mid },
                    kind,
                    source,
                    keyframes: KeyframeLimiter::new(KEYFRAME_INTERVAL),
                    gop: None,
                    codec: None,
                    expected,
                };
                if let Some(r) = self.rooms.get_mut(&room) {
                    r.tracks.insert(track_id, track);
                }
            }
            (false, Some(track_id)) => {
                peer.published.remove(&mid);
                info!(participant = %peer.id, track = %track_id, "unpublished");
                if let Some(r) = self.rooms.get_mut(&room) {
                    remove_track(r, &track_id);
                }
            }
            _ => return,
        }
        self.update_gauges();
        self.broadcast_roster(&room);
        self.renegotiate_room(&room, Some(pid));
    }

    // ---- server offers ----------------------------------------------------

    /// Every member but `except` will get an offer for the room's changed
    /// tracks, once the change window has passed (see `renegotiate_soon`).
    pub(super) fn renegotiate_room(&mut self, room: &RoomName, except: Option<Pid>) {
        let Some(r) = self.rooms.get(room) else {
            return;
        };
        let due = Instant::now() + RENEGOTIATE_WINDOW;
        for &m in r.members.iter().filter(|m| Some(**m) != except) {
            self.renegotiate_soon.entry(m).or_insert(due);
        }
    }

    /// The offers `renegotiate_room` put off whose window has passed.
    pub(super) fn flush_renegotiations(&mut self) {
        let now = Instant::now();
        let due: Vec<Pid> = self
            .renegotiate_soon
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(pid, _)| *pid)
            .collect();
        for pid in due {
            self.renegotiate_soon.remove(&pid);
            self.renegotiate(pid);
        }
    }

    /// Bring the set of m-lines we send to `pid` in line with the room's
    /// tracks: one server offer giving each new track a spare m-line of its
    /// kind (or a new one) and making the m-lines of gone tracks spare
    /// (`inactive`; see [`Spare`](super::Spare)).
    pub(super) fn renegotiate(&mut self, pid: Pid) {
        let Some(peer) = self.peers.get(&pid) else {
            return;
        };
        if peer.phase != Phase::Negotiated || peer.ended.is_some() {
            return;
        }
        let Some(room) = self.rooms.get(&peer.room) else {
            return;
        };
        let gone: Vec<String> = peer
            .subs
            .keys()
            .filter(|id| !room.tracks.contains_key(*id))
            .cloned()
            .collect();
        // Without the subscribe permission no track is ever offered, so
        // nothing is forwarded to it and it asks no publisher for keyframes.
        let may_subscribe = peer.permissions.subscribe;
        // A subscription offered for a codec its track's packets turned out
        // not to have (a local track's `expected` codec was wrong): its
        // m-line lists the wrong codec, so it goes like a gone track's and
        // the track is offered again on an m-line of the right one.
        let mismatched = |id: &String, sub: &Subscription| {
            let codec = room.tracks.get(id).and_then(|t| t.codec);
            codec.is_some_and(|c| c.spec() != sub.offered_for.spec())
        };
        let gone: Vec<String> = gone
            .into_iter()
            .chain(
                peer.subs
                    .iter()
                    .filter(|(id, sub)| mismatched(id, sub))
                    .map(|(id, _)| id.clone()),
            )
            .collect();
        // A track is offered with its codec, known (a remote one is
        // announced with it; a local one from its first packet) or
        // expected (a local one before its first packet), so its m-line
        // can carry that codec only (`narrow_codecs`).
        let new: Vec<(String, MediaKind, String, PayloadParams)> = room
            .tracks
            .iter()
            .filter(|(id, t)| {
                may_subscribe
                    && t.participant != peer.id
                    && peer.subs.get(*id).is_none_or(|sub| mismatched(id, sub))
            })
            .filter_map(|(id, t)| {
                let codec = t.codec.or(t.expected)?;
                Some((id.clone(), t.kind, t.participant.clone(), codec))
            })
            .collect();
        let Some(peer) = self.peers.get_mut(&pid) else {
            return;
        };
        if peer.pending.is_some() {
            peer.renegotiate = true;
            return;
        }
        if let Some(until) = peer.yield_until {
            if Instant::now() < until {
                // Held for the browser's offer; goes out with or after it.
                peer.renegotiate = false;
                self.renegotiate_soon.insert(pid, until);
                return;
            }
            peer.yield_until = None;
        }
        peer.renegotiate = false;
        if gone.is_empty() && new.is_empty() {
            return;
        }
        let stopped: Vec<Mid> = gone
            .iter()
            .filter_map(|id| peer.subs.get(id).map(|sub| sub.mid))
            .collect();
        // This subscriber's parameters for each new track's codec.
        let Some(new) = guarded(peer, |rtc| {
            let config = rtc.codec_config();
            new.into_iter()
                .map(|(id, kind, owner, codec)| {
                    (id, kind, owner, codec, config.match_params(codec).copied())
                })
                .collect::<Vec<_>>()
        }) else {
            return;
        };
        // Spares freed before this offer first (their `inactive` is known
        // to the browser); those freed by it wait for the next one. A spare
        // narrowed to a codec takes a track of that codec only.
        let mut reused = Vec::new();
        let mut fresh = Vec::new();
        for (id, kind, owner, offered_for, codec) in new {
            let fits = |s: &Spare| {
                s.kind == kind
                    && s.codec
                        .is_none_or(|c| Some(c.pt()) == codec.map(|c| c.pt()))
            };
            let codecs = (offered_for, codec);
            match peer.spare.iter().position(fits) {
                Some(i) => reused.push((id, owner, codecs, peer.spare.swap_remove(i))),
                None => fresh.push((id, kind, owner, codecs)),
            }
        }
        let reused_mids: Vec<Mid> = reused.iter().map(|(_, _, _, s)| s.mid).collect();
        // Every str0m call of the change under one guard: a panic ends
        // this participant (reaped with `error internal`), not the worker.
        let Some((added, applied)) = guarded(peer, |rtc| {
            let mut change = rtc.sdp_api();
            for &mid in &stopped {
                change.set_direction(mid, Direction::Inactive);
            }
            for &mid in &reused_mids {
                change.set_direction(mid, Direction::SendOnly);
            }
            let added: Vec<_> = fresh
                .into_iter()
                .map(|(id, kind, owner, codecs)| {
                    let mid = change.add_media(
                        kind,
                        Direction::SendOnly,
                        Some(owner.clone()),
                        Some(id.clone()),
                        None,
                    );
                    (id, kind, owner, codecs, mid)
                })
                .collect();
            (added, change.apply())
        }) else {
            return;
        };
        for id in &gone {
            if let Some(sub) = peer.subs.remove(id) {
                peer.sub_by_mid.remove(&sub.mid);
                peer.spare.push(Spare {
                    mid: sub.mid,
                    kind: sub.kind,
                    codec: sub.codec,
                    rewriter: sub.rewriter,
                });
            }
        }
        let subscribed = reused
            .into_iter()
            .map(|(id, owner, codecs, s)| (id, s.kind, owner, codecs, s.mid, s.rewriter))
            .chain(added.into_iter().map(|(id, kind, owner, codecs, mid)| {
                (id, kind, owner, codecs, mid, Rewriter::default())
            }));
        for (id, kind, participant, (offered_for, codec), mid, rewriter) in subscribed {
            peer.sub_by_mid.insert(mid, id.clone());
            peer.subs.insert(
                id,
                Subscription {
                    mid,
                    kind,
                    codec,
                    offered_for,
                    participant,
                    rewriter,
                    pt_map: Vec::new(),
                    active: false,
                },
            );
        }
        if let Some((offer, pending)) = applied {
            peer.pending = Some(pending);
            // Every forwarding m-line, new or not, lists its codec only.
            let subs = peer.subs.values().map(|s| (s.mid, s.codec));
            let spares = peer.spare.iter().map(|s| (s.mid, s.codec));
            let keep: HashMap<String, Vec<u8>> = subs
                .chain(spares)
                .filter_map(|(mid, codec)| Some((mid.to_string(), payload_types(&codec?))))
                .collect();
            let sdp = narrow_codecs(&offer.to_sdp_string(), &keep);
            peer.pending_mids = sdp_mids(&sdp);
            let mut tracks: Vec<OfferedTrack> = peer
                .subs
                .iter()
                .map(|(id, sub)| OfferedTrack {
                    mid: sub.mid.to_string(),
                    track: id.clone(),
                    participant: sub.participant.clone(),
                })
                .collect();
            tracks.sort_by(|a, b| a.mid.cmp(&b.mid));
            let _ = peer.events.send(ServerMessage::Offer { sdp, tracks });
            self.dirty.insert(pid);
        }
    }

    /// A server offer was refused: forget its m-lines so the next offer
    /// adds them again. A new m-line was never made; a reused one is spare
    /// again, and `inactive` again (str0m changed its direction at once,
    /// and the refused offer never reached the browser's state).
    fn rebuild_subscriptions(&mut self, pid: Pid) {
        if let Some(peer) = self.peers.get_mut(&pid) {
            let unanswered: Vec<String> = peer
                .subs
                .iter()
                .filter(|(_, s)| !s.active)
                .map(|(id, _)| id.clone())
                .collect();
            for id in unanswered {
                let Some(sub) = peer.subs.remove(&id) else {
                    continue;
                };
                peer.sub_by_mid.remove(&sub.mid);
                let mid = sub.mid;
                let existed = guarded(peer, |rtc| {
                    let exists = rtc.media(mid).is_some();
                    if exists {
                        // Not applied: only the direction is to change.
                        rtc.sdp_api().set_direction(mid, Direction::Inactive);
                    }
                    exists
                });
                match existed {
                    Some(true) => peer.spare.push(Spare {
                        mid,
                        kind: sub.kind,
                        codec: sub.codec,
                        rewriter: sub.rewriter,
                    }),
                    Some(false) => {}
                    None => return, // panicked: `guarded` ended it
                }
            }
        }
        self.renegotiate(pid);
    }
}

/// The payload types an m-line carrying `codec` needs: its own, its RTX
/// and RED if it has them.
fn payload_types(codec: &PayloadParams) -> Vec<u8> {
    [codec.red(), Some(codec.pt()), codec.resend()]
        .into_iter()
        .flatten()
        .map(|pt| *pt)
        .collect()
}

/// Parse the browser's SDP. str0m's parser panicking on hostile input is
/// answered like any parse error (`invalid_sdp`) and counted in
/// `SfuMetrics::media_panics`; the participant goes on. (Not a call on the
/// participant's `Rtc`, so not [`guarded`].)
fn parse_sdp<T, E: Display>(
    metrics: &SfuMetrics,
    parse: impl FnOnce() -> Result<T, E>,
) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(parse)) {
        Ok(Ok(sdp)) => Ok(sdp),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => {
            metrics.media_panics.fetch_add(1, Ordering::Relaxed);
            Err("unparsable SDP".into())
        }
    }
}

fn send_error(peer: &Peer, code: ErrorCode, message: String) {
    let _ = peer.events.send(ServerMessage::Error { code, message });
}

/// The SDP path of one participant as the worker runs it, without the
/// worker: a browser offer (munged, parsed, accepted by an `Rtc` built like
/// the worker's), then a server offer adding a forwarding m-line, then a
/// browser answer (matched to that offer by mids, parsed, accepted). For
/// the `sdp` fuzz target (`fuzz/`): str0m must not panic on any of it, and
/// the worker's own line scanners must not either. Returns how far it got.
#[doc(hidden)]
pub fn sdp_round_for_fuzzing(offer: &str, answer: &str) -> usize {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    let now = std::time::Instant::now();
    let mut rtc = str0m::Rtc::builder()
        .set_ice_lite(true)
        .set_rtp_mode(true)
        .build(now);
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 3001);
    if let Ok(c) = str0m::Candidate::host(addr, "udp") {
        rtc.add_local_candidate(c);
    }
    let offer = without_simulcast(offer);
    let offer = unknown_recvonly_inactive(&offer, |mid| mid == "7");
    let _ = sdp_mids(&offer);
    if payload_type_conflict(&offer).is_some() {
        return 0;
    }
    let Ok(offer) = SdpOffer::from_sdp_string(&offer) else {
        return 0;
    };
    if rtc.sdp_api().accept_offer(offer).is_err() {
        return 1;
    }
    let mut change = rtc.sdp_api();
    change.add_media(
        MediaKind::Video,
        Direction::SendOnly,
        Some("p".into()),
        Some("t".into()),
        None,
    );
    let Some((server_offer, pending)) = change.apply() else {
        return 2;
    };
    let offered = sdp_mids(&server_offer.to_sdp_string());
    if !answers(&sdp_mids(answer), &offered) || payload_type_conflict(answer).is_some() {
        return 3;
    }
    let Ok(answer) = SdpAnswer::from_sdp_string(answer) else {
        return 4;
    };
    if rtc.sdp_api().accept_answer(pending, answer).is_err() {
        return 5;
    }
    6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fuzzing_round_goes_all_the_way_with_a_real_exchange() {
        // A browser-like offer made by str0m itself, and an answer made by
        // a second str0m to the server's offer: the round must get through.
        let now = std::time::Instant::now();
        let mut client = str0m::Rtc::builder().build(now);
        let mut change = client.sdp_api();
        change.add_channel("sb".into());
        let (offer, _) = change.apply().unwrap();
        assert!(sdp_round_for_fuzzing(&offer.to_sdp_string(), "garbage") >= 3);
        assert_eq!(sdp_round_for_fuzzing("not sdp", ""), 0);
    }
}
