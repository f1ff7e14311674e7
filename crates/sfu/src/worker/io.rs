//! The worker's loop: wait on the socket, the ICE-TCP listener and
//! connections (`tcp.rs`), the waker and the earliest deadline; read every
//! datagram and frame into its participant's `Rtc`; apply the
//! commands other threads sent; feed timeouts (str0m's, liveness, deferred
//! keyframe requests); reap; and shut down.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use mio::{Events, Poll};
use signal::{ErrorCode, ServerMessage};
use str0m::Input;
use str0m::net::{Protocol, Receive};
use tracing::{debug, info, warn};

use super::handle::{Cmd, SOCKET, WAKER};
use super::participant::guarded;
use super::tcp::TcpEvent;
use super::{End, Pid, Worker};
use crate::remote::RemoteCommand;

/// A participant that has not completed ICE this long after joining is
/// removed (its browser never sent an offer, or could not reach us).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// A connected participant we have heard nothing from (no STUN consent
/// check, RTP or RTCP) for this long is gone. Browsers send consent checks
/// every ~5 s and RTCP every second or so; str0m's own ICE-lite timeout
/// took ~15 s (measured), too slow to free a vanished participant's tiles.
const MEDIA_SILENCE_TIMEOUT: Duration = Duration::from_secs(8);

impl Worker {
    /// The worker thread: runs until `Cmd::Shutdown`, every handle gone, or
    /// a failed poll.
    pub(super) fn run(mut self, mut poll: Poll, rx: Receiver<Cmd>) {
        let mut events = Events::with_capacity(64);
        let mut tcp_events = Vec::with_capacity(64);
        let mut buf = vec![0u8; 2048];
        loop {
            let timeout = if self.tcp.as_ref().is_some_and(|t| t.has_backlog()) {
                Some(Duration::ZERO)
            } else {
                self.next_deadline()
                    .map(|t| t.saturating_duration_since(Instant::now()))
            };
            if let Err(e) = poll.poll(&mut events, timeout)
                && e.kind() != ErrorKind::Interrupted
            {
                warn!(error = %e, "media poll failed; worker stops");
                break;
            }
            tcp_events.clear();
            tcp_events.extend(
                events
                    .iter()
                    .filter(|e| e.token() != SOCKET && e.token() != WAKER)
                    .map(|e| TcpEvent {
                        token: e.token(),
                        readable: e.is_readable() || e.is_read_closed() || e.is_error(),
                        writable: e.is_writable(),
                    }),
            );
            self.read_socket(&mut buf);
            self.tcp_io(&tcp_events);
            loop {
                match rx.try_recv() {
                    Ok(Cmd::Shutdown) | Err(TryRecvError::Disconnected) => {
                        self.shutdown();
                        return;
                    }
                    Ok(cmd) => self.command(cmd),
                    Err(TryRecvError::Empty) => break,
                }
            }
            self.flush_renegotiations();
            self.drive_dirty();
            self.timeouts(Instant::now());
            self.reap();
            self.tcp_reap(Instant::now());
            self.flush_renegotiations();
            self.drive_dirty();
        }
        self.shutdown();
    }

    fn next_deadline(&self) -> Option<Instant> {
        let peers = self.peers.values().flat_map(|p| {
            let liveness = if p.connected {
                p.last_heard + MEDIA_SILENCE_TIMEOUT
            } else {
                p.joined_at + CONNECT_TIMEOUT
            };
            [p.next_timeout, liveness]
        });
        let keyframes = self
            .rooms
            .values()
            .flat_map(|r| r.tracks.values().map(|t| t.keyframes.deadline()));
        let offers = self.renegotiate_soon.values().copied();
        let handshakes = self.tcp.as_ref().and_then(|t| t.next_deadline());
        peers
            .chain(keyframes.flatten())
            .chain(offers)
            .chain(handshakes)
            .min()
    }

    fn read_socket(&mut self, buf: &mut [u8]) {
        loop {
            match self.socket.recv_from(buf) {
                Ok((n, source)) => self.datagram(source, &buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ICMP errors from a vanished peer surface here on Linux; not fatal.
                    debug!(error = %e, "media socket recv error");
                    break;
                }
            }
        }
    }

    /// One datagram: routed to its participant (`demux.rs`), then
    /// [`Worker::receive`].
    fn datagram(&mut self, source: SocketAddr, data: &[u8]) {
        let Some(pid) = self.demux.route(source, data) else {
            self.metrics
                .udp_packets_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !self.receive(pid, Protocol::Udp, source, data) {
            self.metrics
                .udp_packets_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Bytes from `source` for participant `pid`, from UDP or one ICE-TCP
    /// frame: parsed by str0m, fed to its `Rtc`, which is drained at once.
    /// The parse runs on unauthenticated bytes and str0m panics on internal
    /// bugs by design, so it is guarded too. False if the bytes did not
    /// parse (the caller counts the drop).
    pub(super) fn receive(
        &mut self,
        pid: Pid,
        proto: Protocol,
        source: SocketAddr,
        data: &[u8],
    ) -> bool {
        let advertised = self.advertised;
        let parsed =
            std::panic::catch_unwind(|| Receive::new(proto, source, advertised, data).ok());
        let Ok(Some(receive)) = parsed else {
            return false;
        };
        let Some(peer) = self.peers.get_mut(&pid) else {
            return true;
        };
        let now = Instant::now();
        peer.last_heard = now;
        if let Some(Err(e)) = guarded(peer, |rtc| rtc.handle_input(Input::Receive(now, receive))) {
            debug!(participant = %peer.id, error = %e, "input refused");
        }
        // str0m wants its output drained after every input: a second input
        // first could overwrite what the first produced (measured: RTP
        // packets lost when two arrived in one socket read batch).
        self.drive_now(pid);
        true
    }

    /// Whatever is due at `now`: liveness (connect and media-silence
    /// deadlines), str0m timeouts, deferred keyframe requests.
    fn timeouts(&mut self, now: Instant) {
        let mut due = Vec::new();
        for (pid, peer) in self.peers.iter_mut() {
            if peer.ended.is_some() {
                continue;
            }
            if !peer.connected && now >= peer.joined_at + CONNECT_TIMEOUT {
                info!(participant = %peer.id, "ICE never connected; removing");
                peer.ended = Some(End::Disconnected);
                continue;
            }
            if peer.connected && now >= peer.last_heard + MEDIA_SILENCE_TIMEOUT {
                info!(participant = %peer.id, "media silent; removing");
                peer.ended = Some(End::Disconnected);
                continue;
            }
            if now >= peer.next_timeout {
                let _ = guarded(peer, |rtc| rtc.handle_input(Input::Timeout(now)));
                due.push(*pid);
            }
        }
        for pid in due {
            self.drive_now(pid);
        }
        let mut requests = Vec::new();
        for (name, room) in self.rooms.iter_mut() {
            for t in room.tracks.values_mut() {
                if t.keyframes.poll(now) {
                    requests.push((name.clone(), t.id.clone(), t.origin));
                }
            }
        }
        for (room, track, origin) in requests {
            self.send_keyframe_request(&room, &track, origin);
        }
    }

    /// Apply one command from another thread.
    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Join {
                id,
                room,
                name,
                permissions,
                events,
            } => self.join(id, room, name, permissions, events),
            Cmd::Participant(id, cmd) => {
                if let Some(pid) = self.ids.get(&id).copied() {
                    self.participant_command(pid, cmd);
                }
            }
            Cmd::Leave(id) => {
                if let Some(p) = self.ids.get(&id).and_then(|pid| self.peers.get_mut(pid)) {
                    p.ended.get_or_insert(End::Left);
                }
            }
            Cmd::Attach {
                key,
                room,
                node,
                control,
                media,
            } => self.attach(key, room, node, control, media),
            Cmd::Remote(key, cmd) => {
                if matches!(cmd, RemoteCommand::Media { .. }) {
                    self.media_queued.fetch_sub(1, Ordering::Relaxed);
                }
                self.remote_command(key, cmd)
            }
            Cmd::Detach(key) => self.detach(key),
            Cmd::WatchRooms(tx) => self.watch_rooms(tx),
            Cmd::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Cmd::Shutdown => {}
            #[cfg(any(feature = "test-hooks", debug_assertions))]
            Cmd::PanicInParticipant(id) => {
                if let Some(p) = self.ids.get(&id).and_then(|pid| self.peers.get_mut(pid)) {
                    p.panic_next = true;
                }
            }
            #[cfg(any(feature = "test-hooks", debug_assertions))]
            Cmd::PanicInWorker => panic!("test hook: the worker loop panics"),
        }
    }

    fn shutdown(&mut self) {
        let pids: Vec<Pid> = self.peers.keys().copied().collect();
        for pid in pids {
            if let Some(p) = self.peers.get(&pid) {
                let _ = p.events.send(ServerMessage::Error {
                    code: ErrorCode::ShuttingDown,
                    message: "the server is shutting down".into(),
                });
            }
            self.remove(pid, End::Left);
        }
        info!("media worker stopped");
    }
}
