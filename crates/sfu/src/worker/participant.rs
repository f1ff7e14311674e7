//! Participants: joining (a new str0m `Rtc`), driving each `Rtc` until it
//! reports its next timeout and acting on its events, and removing the
//! ones whose session ended with everything they held.
//!
//! Also [`guarded`], the one way to call str0m on a participant's `Rtc`.

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::time::Instant;

use mio::net::UdpSocket;
use signal::{DisplayName, ErrorCode, RoomName, ServerMessage};
use str0m::net::{Protocol, TcpType, Transmit};
use str0m::{Candidate, Event, IceConnectionState, Output, Rtc};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, info, warn};

use super::rooms::remove_track;
use super::tcp::TcpMedia;
use super::{End, Peer, Phase, Pid, Worker};
use crate::Permissions;
use crate::remote::{RemoteEvent, RoomEvent};
use crate::{ParticipantCommand, SfuMetrics};

/// The passive ICE-TCP host candidate on `addr` (the media port).
pub(super) fn tcp_candidate(addr: SocketAddr) -> Result<Candidate, str0m::error::IceError> {
    Candidate::builder()
        .tcp()
        .host(addr)
        .tcptype(TcpType::Passive)
        .build()
}

/// Run `f` on `peer`'s `Rtc`, catching a panic. Every str0m call on a
/// participant's `Rtc` goes through here: str0m panics on internal bugs by
/// design, and one participant must not take the worker down. On a panic
/// the participant is marked `End::Panicked` (reaped with `error internal`
/// and counted in `SfuMetrics::media_panics`, see `Worker::remove`) and the
/// answer is `None`.
pub(super) fn guarded<R>(peer: &mut Peer, f: impl FnOnce(&mut Rtc) -> R) -> Option<R> {
    #[cfg(any(feature = "test-hooks", debug_assertions))]
    let boom = std::mem::take(&mut peer.panic_next);
    #[cfg(not(any(feature = "test-hooks", debug_assertions)))]
    let boom = false;
    let rtc = &mut peer.rtc;
    match catch_unwind(AssertUnwindSafe(|| {
        if boom {
            panic!("test hook: a str0m call panics");
        }
        f(rtc)
    })) {
        Ok(r) => Some(r),
        Err(_) => {
            warn!(participant = %peer.id, "str0m panicked; dropping participant");
            peer.ended = Some(End::Panicked);
            None
        }
    }
}

/// Send one of `pid`'s transmits: UDP from the media socket, or framed on
/// `pid`'s ICE-TCP connection to that address (`tcp.rs`). Never blocks; what
/// cannot go is counted.
fn transmit(
    socket: &UdpSocket,
    tcp: &mut Option<TcpMedia>,
    metrics: &SfuMetrics,
    pid: Pid,
    t: &Transmit,
) {
    if t.proto == Protocol::Tcp {
        let sent = tcp
            .as_mut()
            .is_some_and(|tcp| tcp.send(pid, t.destination, &t.contents));
        if !sent {
            metrics.tcp_frames_dropped.fetch_add(1, Ordering::Relaxed);
        }
    } else if let Err(e) = socket.send_to(&t.contents, t.destination) {
        debug!(error = %e, to = %t.destination, "media send failed");
        metrics.udp_packets_dropped.fetch_add(1, Ordering::Relaxed);
    }
}

impl Worker {
    pub(super) fn join(
        &mut self,
        id: String,
        room: RoomName,
        name: DisplayName,
        permissions: Permissions,
        events: UnboundedSender<ServerMessage>,
    ) {
        let members = self.rooms.get(&room).map_or(0, |r| r.members.len());
        if members >= self.config.max_participants_per_room {
            let _ = events.send(ServerMessage::Error {
                code: ErrorCode::Full,
                message: format!(
                    "room {room} is full ({} participants)",
                    self.config.max_participants_per_room
                ),
            });
            return; // dropping `events` ends the session
        }
        if !self.rooms.contains_key(&room) && self.rooms.len() >= self.config.max_rooms {
            let _ = events.send(ServerMessage::Error {
                code: ErrorCode::Full,
                message: format!(
                    "this node has its maximum of {} rooms; try another room or later",
                    self.config.max_rooms
                ),
            });
            return;
        }
        let now = Instant::now();
        let mut rtc = Rtc::builder()
            .set_ice_lite(true)
            .set_rtp_mode(true)
            .build(now);
        match Candidate::host(self.advertised, "udp") {
            Ok(c) => {
                rtc.add_local_candidate(c);
                // ICE-TCP (`tcp.rs`): the same address and port, passive.
                // str0m gives a TCP host candidate type preference 90
                // against UDP's 126, so browsers prefer UDP when it works.
                if self.tcp.is_some() {
                    match tcp_candidate(self.advertised) {
                        Ok(c) => {
                            rtc.add_local_candidate(c);
                        }
                        Err(e) => warn!(error = %e, "cannot advertise the ICE-TCP candidate"),
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, addr = %self.advertised, "cannot advertise media address");
                let _ = events.send(ServerMessage::Error {
                    code: ErrorCode::Internal,
                    message: "media address unusable".into(),
                });
                return;
            }
        }
        let creds = rtc.direct_api().local_ice_credentials();
        let pid = self.next_pid;
        self.next_pid += 1;
        self.demux.add(creds.ufrag, creds.pass, pid);
        self.ids.insert(id.clone(), pid);
        let _ = events.send(ServerMessage::Joined {
            participant_id: id.clone(),
            room: room.to_string(),
            name: name.to_string(),
        });
        info!(participant = %id, %room, %name, "joined");
        self.peers.insert(
            pid,
            Peer {
                id,
                room: room.clone(),
                name,
                permissions,
                rtc,
                events,
                phase: Phase::AwaitingOffer,
                pending: None,
                pending_mids: Vec::new(),
                renegotiate: false,
                glared: false,
                yield_until: None,
                declared: Default::default(),
                published: Default::default(),
                subs: Default::default(),
                sub_by_mid: Default::default(),
                spare: Vec::new(),
                audio_muted: false,
                video_muted: false,
                joined_at: now,
                connected: false,
                last_heard: now,
                next_timeout: now,
                ended: None,
                #[cfg(any(feature = "test-hooks", debug_assertions))]
                panic_next: false,
            },
        );
        if !self.rooms.contains_key(&room) {
            info!(%room, "room opened");
            self.room_watchers
                .retain(|w| w.send(RoomEvent::Opened(room.clone())).is_ok());
        }
        let r = self.rooms.entry(room.clone()).or_default();
        r.members.push(pid);
        if let Some(p) = self.peers.get(&pid) {
            r.tell_links(RemoteEvent::ParticipantJoined {
                id: p.id.clone(),
                name: p.name.to_string(),
            });
        }
        self.update_gauges();
        self.dirty.insert(pid);
        self.broadcast_roster(&room);
    }

    /// A command from a participant's session (ignored once it has ended).
    pub(super) fn participant_command(&mut self, pid: Pid, cmd: ParticipantCommand) {
        let Some(peer) = self.peers.get(&pid) else {
            return;
        };
        if peer.ended.is_some() {
            return;
        }
        match cmd {
            ParticipantCommand::Offer { sdp, tracks } => self.offer(pid, sdp, tracks),
            ParticipantCommand::Answer { sdp } => self.answer(pid, sdp),
            ParticipantCommand::Chat { text } => self.chat(pid, text),
            ParticipantCommand::Mute { audio, video } => self.mute(pid, audio, video),
        }
    }

    // ---- driving str0m --------------------------------------------------

    /// Drive one `Rtc` to its next timeout and act on its events at once.
    pub(super) fn drive_now(&mut self, pid: Pid) {
        self.dirty.remove(&pid);
        for e in self.drive(pid) {
            self.event(pid, e);
        }
    }

    /// Poll every touched `Rtc` until it reports its next timeout, then act
    /// on what it said. Acting may touch other `Rtc`s (forwarding), so repeat
    /// until nothing is left.
    pub(super) fn drive_dirty(&mut self) {
        while !self.dirty.is_empty() {
            let batch: Vec<Pid> = self.dirty.drain().collect();
            for pid in batch {
                let events = self.drive(pid);
                for e in events {
                    self.event(pid, e);
                }
            }
        }
    }

    /// Poll one `Rtc` until its next timeout: datagrams go out on the
    /// socket, events are returned.
    fn drive(&mut self, pid: Pid) -> Vec<Event> {
        let Some(peer) = self.peers.get_mut(&pid) else {
            return Vec::new();
        };
        let socket = &self.socket;
        let tcp = &mut self.tcp;
        let metrics = &self.metrics;
        let mut events = Vec::new();
        // The next timeout and whether the `Rtc` still lives, or its error.
        let drained = guarded(peer, |rtc| {
            loop {
                match rtc.poll_output() {
                    Ok(Output::Transmit(t)) => transmit(socket, tcp, metrics, pid, &t),
                    Ok(Output::Timeout(t)) => return Ok((t, rtc.is_alive())),
                    Ok(Output::Event(e)) => events.push(e),
                    Err(e) => return Err(e),
                }
            }
        });
        match drained {
            Some(Ok((next, alive))) => {
                peer.next_timeout = next;
                if !alive && peer.ended.is_none() {
                    peer.ended = Some(End::Disconnected);
                }
            }
            Some(Err(e)) => {
                warn!(participant = %peer.id, error = %e, "rtc failed");
                peer.ended = Some(End::Failed);
            }
            None => {} // panicked: `guarded` ended it
        }
        events
    }

    fn event(&mut self, pid: Pid, event: Event) {
        match event {
            Event::RtpPacket(pkt) => self.forward(pid, pkt),
            Event::KeyframeRequest(req) => self.keyframe_request_from_subscriber(pid, req.mid),
            Event::Connected => {
                let Some(p) = self.peers.get_mut(&pid) else {
                    return;
                };
                p.connected = true;
                info!(participant = %p.id, "media connected");
                // Subscriptions answered before the transport came up start
                // now that media can flow (see `start_subscriptions`).
                let ready: Vec<String> = p
                    .subs
                    .iter()
                    .filter(|(_, sub)| sub.active)
                    .map(|(track, _)| track.clone())
                    .collect();
                self.start_subscriptions(pid, ready);
            }
            Event::IceConnectionStateChange(state) => {
                if let Some(p) = self.peers.get_mut(&pid) {
                    debug!(participant = %p.id, ?state, "ICE state");
                    if state == IceConnectionState::Disconnected && p.ended.is_none() {
                        info!(participant = %p.id, "ICE disconnected; removing");
                        p.ended = Some(End::Disconnected);
                    }
                }
            }
            Event::MediaAdded(m) => self.media_direction(pid, m.mid, m.kind, m.direction),
            Event::MediaChanged(m) => {
                let kind = self
                    .peers
                    .get_mut(&pid)
                    .and_then(|p| guarded(p, |rtc| rtc.media(m.mid).map(|media| media.kind())))
                    .flatten();
                if let Some(kind) = kind {
                    self.media_direction(pid, m.mid, kind, m.direction);
                }
            }
            Event::Closed => {
                if let Some(p) = self.peers.get_mut(&pid) {
                    p.ended.get_or_insert(End::Disconnected);
                }
            }
            _ => {}
        }
    }

    // ---- ending -----------------------------------------------------------

    /// Remove every participant whose session ended, with all it held.
    pub(super) fn reap(&mut self) {
        let ended: Vec<(Pid, End)> = self
            .peers
            .iter()
            .filter_map(|(pid, p)| p.ended.map(|e| (*pid, e)))
            .collect();
        for (pid, end) in ended {
            self.remove(pid, end);
        }
    }

    /// Remove one participant: tell it why, let str0m close, take its tracks
    /// out of the room (closing the room if it was the last one here).
    pub(super) fn remove(&mut self, pid: Pid, end: End) {
        let Some(mut peer) = self.peers.remove(&pid) else {
            return;
        };
        self.ids.remove(&peer.id);
        self.demux.remove(pid);
        self.dirty.remove(&pid);
        match end {
            End::Left => {}
            End::Disconnected | End::Failed => {
                self.metrics
                    .participants_reaped
                    .fetch_add(1, Ordering::Relaxed);
                let _ = peer.events.send(ServerMessage::Error {
                    code: ErrorCode::Disconnected,
                    message: "media connection lost".into(),
                });
            }
            End::Panicked => {
                self.metrics.media_panics.fetch_add(1, Ordering::Relaxed);
                let _ = peer.events.send(ServerMessage::Error {
                    code: ErrorCode::Internal,
                    message: "internal error in the media engine; please rejoin".into(),
                });
            }
        }
        info!(participant = %peer.id, room = %peer.room, ?end, "left");
        // Let str0m say goodbye (DTLS close) where it still can.
        let socket = &self.socket;
        let tcp = &mut self.tcp;
        let _ = guarded(&mut peer, |rtc| {
            rtc.disconnect();
            while let Ok(Output::Transmit(t)) = rtc.poll_output() {
                // Best effort, not counted: a browser that closed the
                // page has usually closed its TCP connection already.
                if t.proto == Protocol::Tcp {
                    if let Some(tcp) = tcp.as_mut() {
                        tcp.send(pid, t.destination, &t.contents);
                    }
                } else {
                    let _ = socket.send_to(&t.contents, t.destination);
                }
            }
        });
        self.tcp_close_participant(pid);
        let room = peer.room.clone();
        let mut empty = false;
        if let Some(r) = self.rooms.get_mut(&room) {
            r.members.retain(|m| *m != pid);
            let own: Vec<String> = r
                .tracks
                .values()
                .filter(|t| t.participant == peer.id)
                .map(|t| t.id.clone())
                .collect();
            for id in own {
                remove_track(r, &id);
            }
            r.tell_links(RemoteEvent::ParticipantLeft {
                id: peer.id.clone(),
            });
            empty = r.members.is_empty();
        }
        if empty {
            self.close_room(&room);
        } else {
            self.broadcast_roster(&room);
            self.renegotiate_room(&room, None);
        }
        self.update_gauges();
    }
}
