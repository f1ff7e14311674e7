//! The media worker: one thread that owns a UDP socket and whole rooms.
//!
//! mediasoup's model: everything about a room lives on one thread, so
//! forwarding a packet from a publisher to its subscribers is a function call
//! over plain data, never a channel hop. Handles on other threads
//! ([`crate::Participant`], [`crate::Sfu`]) talk to the worker through a
//! command channel and a [`mio::Waker`]. A second worker per core later means
//! a second instance of [`Worker`] with its own socket and rooms.
//!
//! Each participant is one str0m `Rtc` in RTP mode (ICE-lite, DTLS-SRTP).
//! The loop: wait on the socket, the waker, or the earliest str0m timeout;
//! feed datagrams and timeouts in; drive the `Rtc`s that were touched until
//! they report their next timeout; act on their events (forward RTP, relay
//! keyframe requests, publish/unpublish, renegotiate).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TryRecvError, unbounded};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use signal::{
    DisplayName, ErrorCode, Kind, ParticipantView, RoomName, ServerMessage, Source, TrackView,
};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::PayloadParams;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, info, warn};

use crate::demux::Demux;
use crate::gop::GopCache;
use crate::keyframe::{KEYFRAME_INTERVAL, KeyframeLimiter};
use crate::remote::{
    CodecInfo, MediaPacket, REMOTE_MEDIA_IN_QUEUE, REMOTE_MEDIA_QUEUE, RemoteCommand, RemoteEvent,
    RemoteLink, RoomEvent, TrackDescription,
};
use crate::rewrite::Rewriter;
use crate::{Participant, ParticipantCommand, RoomStatus, SfuConfig, SfuError, SfuMetrics};

/// A participant that has not completed ICE this long after joining is
/// removed (its browser never sent an offer, or could not reach us).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// A connected participant we have heard nothing from (no STUN consent
/// check, RTP or RTCP) for this long is gone. Browsers send consent checks
/// every ~5 s and RTCP every second or so; str0m's own ICE-lite timeout
/// took ~15 s (measured), too slow to free a vanished participant's tiles.
const MEDIA_SILENCE_TIMEOUT: Duration = Duration::from_secs(8);

/// Requested UDP buffer sizes (the kernel caps them at net.core.[rw]mem_max).
const SOCKET_BUFFER: usize = 4 << 20;
/// Most tracks one participant may publish (camera, microphone, screen and
/// its audio, with room to spare). An SDP may declare far more m-lines, and
/// each would become a track every other member is offered.
pub const MAX_PUBLISHED_TRACKS: usize = 8;

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);

enum Cmd {
    Join {
        id: String,
        room: RoomName,
        name: DisplayName,
        events: UnboundedSender<ServerMessage>,
    },
    Participant(String, ParticipantCommand),
    Leave(String),
    Attach {
        key: LinkKey,
        room: RoomName,
        node: String,
        control: UnboundedSender<RemoteEvent>,
        media: tokio::sync::mpsc::Sender<RemoteEvent>,
    },
    Remote(LinkKey, RemoteCommand),
    Detach(LinkKey),
    WatchRooms(UnboundedSender<RoomEvent>),
    Status(tokio::sync::oneshot::Sender<Vec<RoomStatus>>),
    Shutdown,
}

/// Sends commands to the worker and wakes it.
#[derive(Clone)]
pub(crate) struct Commands {
    tx: Sender<Cmd>,
    waker: Arc<Waker>,
    /// Remote media packets queued and not yet taken by the worker.
    media_queued: Arc<AtomicUsize>,
    metrics: Arc<SfuMetrics>,
}

impl Commands {
    fn send(&self, cmd: Cmd) -> Result<(), SfuError> {
        self.tx.send(cmd).map_err(|_| SfuError::Stopped)?;
        // A failed wake means the poll is gone, i.e. the worker has stopped.
        self.waker.wake().map_err(|_| SfuError::Stopped)
    }
    pub(crate) fn participant(&self, id: &str, cmd: ParticipantCommand) {
        let _ = self.send(Cmd::Participant(id.to_owned(), cmd));
    }
    pub(crate) fn leave(&self, id: &str) {
        let _ = self.send(Cmd::Leave(id.to_owned()));
    }
    pub(crate) fn remote(&self, key: LinkKey, cmd: RemoteCommand) {
        if matches!(cmd, RemoteCommand::Media { .. }) {
            // Bounded: a trunk faster than the worker loses media, counted,
            // instead of growing the queue.
            if self.media_queued.fetch_add(1, Ordering::Relaxed) >= REMOTE_MEDIA_IN_QUEUE {
                self.media_queued.fetch_sub(1, Ordering::Relaxed);
                self.metrics
                    .remote_media_in_dropped
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let _ = self.send(Cmd::Remote(key, cmd));
    }
    pub(crate) fn detach(&self, key: LinkKey) {
        let _ = self.send(Cmd::Detach(key));
    }
}

pub(crate) struct Handle {
    commands: Commands,
    next_link: std::sync::atomic::AtomicU64,
    addr: SocketAddr,
    metrics: Arc<SfuMetrics>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Handle {
    pub(crate) fn start(config: SfuConfig) -> Result<Handle, SfuError> {
        let addr = SocketAddr::new(config.bind, config.media_port);
        let std_socket =
            std::net::UdpSocket::bind(addr).map_err(|source| SfuError::Bind { addr, source })?;
        std_socket.set_nonblocking(true).map_err(SfuError::Worker)?;
        // The default receive buffer (~200 KiB) holds well under 100 video
        // packets: one slow turn of the loop (a DTLS handshake, a burst of
        // keyframes) would overflow it and lose media for every subscriber.
        let sock = socket2::SockRef::from(&std_socket);
        let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
        let local = std_socket.local_addr().map_err(SfuError::Worker)?;
        let mut socket = UdpSocket::from_std(std_socket);
        let poll = Poll::new().map_err(SfuError::Worker)?;
        poll.registry()
            .register(&mut socket, SOCKET, Interest::READABLE)
            .map_err(SfuError::Worker)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(SfuError::Worker)?);
        let (tx, rx) = unbounded();
        let metrics = Arc::new(SfuMetrics::default());
        let media_queued = Arc::new(AtomicUsize::new(0));
        // The address browsers are told: the public one if configured. str0m
        // only accepts STUN addressed to a local candidate, so datagrams are
        // fed to it as if addressed there.
        let advertised = SocketAddr::new(config.public_ip.unwrap_or(config.bind), local.port());
        let worker = Worker {
            config,
            socket,
            advertised,
            metrics: metrics.clone(),
            peers: HashMap::new(),
            rooms: BTreeMap::new(),
            demux: Demux::default(),
            next_pid: 1,
            next_track: 1,
            dirty: HashSet::new(),
            ids: HashMap::new(),
            links: HashMap::new(),
            room_watchers: Vec::new(),
            media_queued: media_queued.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("sfu-worker".into())
            .spawn(move || worker.run(poll, rx))
            .map_err(SfuError::Worker)?;
        Ok(Handle {
            commands: Commands {
                tx,
                waker,
                media_queued,
                metrics: metrics.clone(),
            },
            next_link: std::sync::atomic::AtomicU64::new(1),
            addr: local,
            metrics,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }
    pub(crate) fn media_addr(&self) -> SocketAddr {
        self.addr
    }
    pub(crate) fn is_running(&self) -> bool {
        let thread = match self.thread.lock() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        };
        thread.as_ref().is_some_and(|t| !t.is_finished())
    }
    pub(crate) fn metrics(&self) -> Arc<SfuMetrics> {
        self.metrics.clone()
    }
    pub(crate) fn join(&self, room: RoomName, name: DisplayName) -> Result<Participant, SfuError> {
        let id = format!("{:016x}", rand::random::<u64>());
        let (etx, erx) = tokio::sync::mpsc::unbounded_channel();
        self.commands.send(Cmd::Join {
            id: id.clone(),
            room,
            name,
            events: etx,
        })?;
        Ok(Participant {
            id,
            commands: self.commands.clone(),
            events: erx,
        })
    }
    pub(crate) fn attach(&self, room: RoomName, node: String) -> Result<RemoteLink, SfuError> {
        let key = self.next_link.fetch_add(1, Ordering::Relaxed);
        let (ctx, crx) = tokio::sync::mpsc::unbounded_channel();
        let (mtx, mrx) = tokio::sync::mpsc::channel(REMOTE_MEDIA_QUEUE);
        self.commands.send(Cmd::Attach {
            key,
            room,
            node,
            control: ctx,
            media: mtx,
        })?;
        Ok(RemoteLink {
            key,
            commands: self.commands.clone(),
            control: crx,
            media: mrx,
        })
    }
    pub(crate) fn watch_rooms(
        &self,
    ) -> Result<tokio::sync::mpsc::UnboundedReceiver<RoomEvent>, SfuError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.commands.send(Cmd::WatchRooms(tx))?;
        Ok(rx)
    }
    pub(crate) async fn status(&self) -> Result<Vec<RoomStatus>, SfuError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.commands.send(Cmd::Status(tx))?;
        rx.await.map_err(|_| SfuError::Stopped)
    }
    /// Stop the worker (every participant is told `shutting_down`) and wait
    /// for its thread. Idempotent.
    pub(crate) fn stop(&self) {
        let _ = self.commands.send(Cmd::Shutdown);
        let thread = match self.thread.lock() {
            Ok(mut t) => t.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Worker-local participant key (cheap to copy and hash; the public id is a string).
type Pid = u64;

/// Worker-local key of an attached [`RemoteLink`].
type LinkKey = u64;

/// Where a track's packets come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A participant here, on the m-line `mid` of its PeerConnection.
    Local { pid: Pid, mid: Mid },
    /// Another node, through a remote link.
    Remote { link: LinkKey },
}

/// A published track, as the room knows it. The room forwards by track;
/// the publisher is a local participant or a remote node (the trunk seam).
#[derive(Debug)]
struct Track {
    id: String,
    /// Public id of the publishing participant.
    participant: String,
    origin: Origin,
    kind: MediaKind,
    source: Source,
    keyframes: KeyframeLimiter,
    /// Video: the last keyframe and what followed, replayed to a new
    /// subscription (created with the codec, at the first packet).
    gop: Option<GopCache>,
    /// The codec its packets carry: given for remote tracks, learned from
    /// the first packet for local ones (which are announced to remote
    /// links only then).
    codec: Option<PayloadParams>,
}

/// A participant on another node, known through a remote link.
#[derive(Debug)]
struct RemoteParticipant {
    link: LinkKey,
    name: String,
    audio_muted: bool,
    video_muted: bool,
}

/// A remote node's membership of a room.
struct Link {
    node: String,
    control: UnboundedSender<RemoteEvent>,
    media: tokio::sync::mpsc::Sender<RemoteEvent>,
    /// Local track ids the remote node subscribed to.
    subs: HashSet<String>,
}

impl Link {
    fn tell(&self, e: RemoteEvent) {
        let _ = self.control.send(e);
    }
}

#[derive(Default)]
struct Room {
    /// Local participants. A room exists while it has at least one.
    members: Vec<Pid>,
    /// Track id -> track, in publication order.
    tracks: BTreeMap<String, Track>,
    links: BTreeMap<LinkKey, Link>,
    /// Public id -> participant on another node.
    remote_participants: BTreeMap<String, RemoteParticipant>,
}

impl Room {
    fn tell_links(&self, e: RemoteEvent) {
        for l in self.links.values() {
            l.tell(e.clone());
        }
    }
}

/// One forwarded track on a subscriber's PeerConnection.
struct Subscription {
    mid: Mid,
    rewriter: Rewriter,
    /// Publisher payload type -> subscriber payload type (None: no common codec).
    pt_map: Vec<(u8, Option<u8>)>,
    /// Whether the subscriber has accepted the m-line (answer applied).
    active: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Joined; waiting for the browser's first offer.
    AwaitingOffer,
    /// First offer/answer done; the server may renegotiate.
    Negotiated,
}

struct Peer {
    id: String,
    room: RoomName,
    name: DisplayName,
    rtc: Rtc,
    events: UnboundedSender<ServerMessage>,
    phase: Phase,
    /// The server's outstanding offer, if any (at most one).
    pending: Option<SdpPendingOffer>,
    /// The m-lines (mid of each, in order) of the outstanding offer: an
    /// answer must have exactly these.
    pending_mids: Vec<String>,
    /// A change happened while an offer was outstanding: offer again after.
    renegotiate: bool,
    /// Sources the browser declared for its sending mids.
    declared: HashMap<String, Source>,
    /// Our mids on which the browser publishes -> room track id.
    published: HashMap<Mid, String>,
    /// Room track id -> how it is forwarded to this participant.
    subs: HashMap<String, Subscription>,
    /// Subscriber mid -> track id (for keyframe requests).
    sub_by_mid: HashMap<Mid, String>,
    audio_muted: bool,
    video_muted: bool,
    joined_at: Instant,
    connected: bool,
    /// When the last datagram from this participant arrived.
    last_heard: Instant,
    next_timeout: Instant,
    /// Set when the session must end; the reason goes to the browser.
    ended: Option<End>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The browser left (socket closed / `leave`): nothing to tell.
    Left,
    /// ICE died or never came up.
    Disconnected,
    /// str0m failed on this participant.
    Failed,
    /// A str0m call panicked on this participant (an internal bug of
    /// str0m's, by its design): it is removed with `error internal` and
    /// counted; the worker and everyone else go on.
    Panicked,
}

struct Worker {
    config: SfuConfig,
    socket: UdpSocket,
    advertised: SocketAddr,
    metrics: Arc<SfuMetrics>,
    peers: HashMap<Pid, Peer>,
    rooms: BTreeMap<RoomName, Room>,
    demux: Demux<Pid>,
    /// Public id -> worker key.
    ids: HashMap<String, Pid>,
    next_pid: Pid,
    next_track: u64,
    /// Peers whose `Rtc` got input and must be polled until their next timeout.
    dirty: HashSet<Pid>,
    /// Attached remote link -> its room.
    links: HashMap<LinkKey, RoomName>,
    room_watchers: Vec<UnboundedSender<RoomEvent>>,
    /// Remote media in the command queue (see `Commands::remote`).
    media_queued: Arc<AtomicUsize>,
}

/// The mid of every m-line of an SDP, in order (`""` for an m-line without
/// one). Offer and answer must list the same (RFC 8829 §5.3.1), so this
/// tells which offer an answer belongs to. A line scan, not a parser: str0m
/// parses the SDP itself; this only compares.
fn sdp_mids(sdp: &str) -> Vec<String> {
    let mut mids: Vec<String> = Vec::new();
    for line in sdp.lines() {
        let line = line.trim_end();
        if line.starts_with("m=") {
            mids.push(String::new());
        } else if let (Some(mid), Some(last)) = (line.strip_prefix("a=mid:"), mids.last_mut()) {
            *last = mid.to_owned();
        }
    }
    mids
}

/// Could an answer with m-lines `answer` belong to the offer with `offer`?
/// Same number of m-lines, and each mid the answer names is the offer's
/// there (an answer that leaves a rejected m-line without its mid is not
/// held against it).
fn answers(answer: &[String], offer: &[String]) -> bool {
    answer.len() == offer.len()
        && answer
            .iter()
            .zip(offer)
            .all(|(a, o)| a.is_empty() || a == o)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn kind_of(k: MediaKind) -> Kind {
    match k {
        MediaKind::Audio => Kind::Audio,
        MediaKind::Video => Kind::Video,
    }
}

impl Worker {
    fn run(mut self, mut poll: Poll, rx: Receiver<Cmd>) {
        let mut events = Events::with_capacity(64);
        let mut buf = vec![0u8; 2048];
        loop {
            let timeout = self
                .next_deadline()
                .map(|t| t.saturating_duration_since(Instant::now()));
            if let Err(e) = poll.poll(&mut events, timeout)
                && e.kind() != ErrorKind::Interrupted
            {
                warn!(error = %e, "media poll failed; worker stops");
                break;
            }
            self.read_socket(&mut buf);
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
            self.drive_dirty();
            self.timeouts(Instant::now());
            self.drive_dirty();
            self.reap();
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
        peers.chain(keyframes.flatten()).min()
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

    fn datagram(&mut self, source: SocketAddr, data: &[u8]) {
        let Some(pid) = self.demux.route(source, data) else {
            self.metrics
                .udp_packets_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Ok(receive) = Receive::new(Protocol::Udp, source, self.advertised, data) else {
            self.metrics
                .udp_packets_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(peer) = self.peers.get_mut(&pid) else {
            return;
        };
        let now = Instant::now();
        peer.last_heard = now;
        let result = catch_unwind(AssertUnwindSafe(|| {
            peer.rtc.handle_input(Input::Receive(now, receive))
        }));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(participant = %peer.id, error = %e, "input refused"),
            Err(_) => {
                warn!(participant = %peer.id, "str0m panicked on input; dropping participant");
                peer.ended = Some(End::Panicked);
            }
        }
        // str0m wants its output drained after every input: a second input
        // first could overwrite what the first produced (measured: RTP
        // packets lost when two arrived in one socket read batch).
        self.drive_now(pid);
    }

    /// Drive one `Rtc` to its next timeout and act on its events at once.
    fn drive_now(&mut self, pid: Pid) {
        self.dirty.remove(&pid);
        for e in self.drive(pid) {
            self.event(pid, e);
        }
    }

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
                let r = catch_unwind(AssertUnwindSafe(|| {
                    peer.rtc.handle_input(Input::Timeout(now))
                }));
                if r.is_err() {
                    peer.ended = Some(End::Panicked);
                }
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

    /// Poll every touched `Rtc` until it reports its next timeout, then act
    /// on what it said. Acting may touch other `Rtc`s (forwarding), so repeat
    /// until nothing is left.
    fn drive_dirty(&mut self) {
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

    fn drive(&mut self, pid: Pid) -> Vec<Event> {
        let Some(peer) = self.peers.get_mut(&pid) else {
            return Vec::new();
        };
        let socket = &self.socket;
        let metrics = &self.metrics;
        let mut events = Vec::new();
        let result = catch_unwind(AssertUnwindSafe(|| {
            loop {
                match peer.rtc.poll_output() {
                    Ok(Output::Transmit(t)) => {
                        if let Err(e) = socket.send_to(&t.contents, t.destination) {
                            debug!(error = %e, to = %t.destination, "media send failed");
                            metrics.udp_packets_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Output::Timeout(t)) => {
                        peer.next_timeout = t;
                        return true;
                    }
                    Ok(Output::Event(e)) => events.push(e),
                    Err(e) => {
                        warn!(participant = %peer.id, error = %e, "rtc failed");
                        return false;
                    }
                }
            }
        }));
        match result {
            Ok(true) => {}
            Ok(false) => peer.ended = Some(End::Failed),
            Err(_) => {
                warn!(participant = %peer.id, "str0m panicked; dropping participant");
                peer.ended = Some(End::Panicked);
            }
        }
        if !peer.rtc.is_alive() && peer.ended.is_none() {
            peer.ended = Some(End::Disconnected);
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
                    .get(&pid)
                    .and_then(|p| p.rtc.media(m.mid))
                    .map(|media| media.kind());
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

    // ---- commands -------------------------------------------------------

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Join {
                id,
                room,
                name,
                events,
            } => self.join(id, room, name, events),
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
            Cmd::WatchRooms(tx) => {
                for room in self.rooms.keys() {
                    let _ = tx.send(RoomEvent::Opened(room.clone()));
                }
                self.room_watchers.push(tx);
            }
            Cmd::Status(reply) => {
                let rooms = self
                    .rooms
                    .keys()
                    .map(|name| RoomStatus {
                        name: name.to_string(),
                        participants: self.roster(name),
                    })
                    .collect();
                let _ = reply.send(rooms);
            }
            Cmd::Shutdown => {}
        }
    }

    fn join(
        &mut self,
        id: String,
        room: RoomName,
        name: DisplayName,
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
        let now = Instant::now();
        let mut rtc = Rtc::builder()
            .set_ice_lite(true)
            .set_rtp_mode(true)
            .build(now);
        match Candidate::host(self.advertised, "udp") {
            Ok(c) => {
                rtc.add_local_candidate(c);
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
        let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        let pid = self.next_pid;
        self.next_pid += 1;
        self.demux.add(ufrag, pid);
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
                rtc,
                events,
                phase: Phase::AwaitingOffer,
                pending: None,
                pending_mids: Vec::new(),
                renegotiate: false,
                declared: HashMap::new(),
                published: HashMap::new(),
                subs: HashMap::new(),
                sub_by_mid: HashMap::new(),
                audio_muted: false,
                video_muted: false,
                joined_at: now,
                connected: false,
                last_heard: now,
                next_timeout: now,
                ended: None,
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

    fn participant_command(&mut self, pid: Pid, cmd: ParticipantCommand) {
        let Some(peer) = self.peers.get_mut(&pid) else {
            return;
        };
        if peer.ended.is_some() {
            return;
        }
        match cmd {
            ParticipantCommand::Offer { sdp, tracks } => {
                if peer.pending.is_some() {
                    // Glare: we are the impolite side; the browser rolls back.
                    debug!(participant = %peer.id, "client offer during server offer; ignored");
                    return;
                }
                let offer = match catch_unwind(|| SdpOffer::from_sdp_string(&sdp)) {
                    Ok(Ok(o)) => o,
                    Ok(Err(e)) => return send_error(peer, ErrorCode::InvalidSdp, e.to_string()),
                    Err(_) => {
                        self.metrics.media_panics.fetch_add(1, Ordering::Relaxed);
                        return send_error(peer, ErrorCode::InvalidSdp, "unparsable SDP".into());
                    }
                };
                for t in tracks {
                    peer.declared.insert(t.mid, t.source);
                }
                let answer =
                    catch_unwind(AssertUnwindSafe(|| peer.rtc.sdp_api().accept_offer(offer)));
                match answer {
                    Ok(Ok(answer)) => {
                        let _ = peer.events.send(ServerMessage::Answer {
                            sdp: answer.to_sdp_string(),
                        });
                        let first = peer.phase == Phase::AwaitingOffer;
                        peer.phase = Phase::Negotiated;
                        self.dirty.insert(pid);
                        if first {
                            // Now that we can offer, send what the room already has.
                            self.drive_dirty();
                            self.renegotiate(pid);
                        }
                    }
                    Ok(Err(e)) => send_error(peer, ErrorCode::InvalidSdp, e.to_string()),
                    Err(_) => {
                        peer.ended = Some(End::Panicked);
                    }
                }
            }
            ParticipantCommand::Answer { sdp } => {
                let Some(pending) = peer.pending.take() else {
                    return send_error(
                        peer,
                        ErrorCode::NoPendingOffer,
                        "no server offer is outstanding".into(),
                    );
                };
                let answer = match catch_unwind(|| SdpAnswer::from_sdp_string(&sdp)) {
                    Ok(Ok(a)) => a,
                    Ok(Err(e)) => {
                        peer.pending = Some(pending);
                        return send_error(peer, ErrorCode::InvalidSdp, e.to_string());
                    }
                    Err(_) => {
                        self.metrics.media_panics.fetch_add(1, Ordering::Relaxed);
                        peer.pending = Some(pending);
                        return send_error(peer, ErrorCode::InvalidSdp, "unparsable SDP".into());
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
                let r = catch_unwind(AssertUnwindSafe(|| {
                    peer.rtc.sdp_api().accept_answer(pending, answer)
                }));
                match r {
                    Ok(Ok(())) => {
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
                        let again = self.peers.get(&pid).is_some_and(|p| p.renegotiate);
                        if again {
                            self.renegotiate(pid);
                        }
                    }
                    Ok(Err(e)) => {
                        send_error(peer, ErrorCode::InvalidSdp, e.to_string());
                        // The offer is spent; start over with a fresh one.
                        peer.renegotiate = true;
                        self.rebuild_subscriptions(pid);
                    }
                    Err(_) => peer.ended = Some(End::Panicked),
                }
            }
            ParticipantCommand::Chat { text } => {
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
            ParticipantCommand::Mute { audio, video } => {
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
        }
    }

    // ---- publishing -----------------------------------------------------

    /// The browser's side of `mid` changed direction: it now sends (publish)
    /// or stopped sending (unpublish).
    fn media_direction(&mut self, pid: Pid, mid: Mid, kind: MediaKind, dir: Direction) {
        let Some(peer) = self.peers.get_mut(&pid) else {
            return;
        };
        if peer.sub_by_mid.contains_key(&mid) {
            return; // one of our forwarding m-lines
        }
        let receiving = matches!(dir, Direction::RecvOnly | Direction::SendRecv);
        let room = peer.room.clone();
        match (receiving, peer.published.get(&mid).cloned()) {
            (true, None) if peer.published.len() >= MAX_PUBLISHED_TRACKS => {
                // `invalid_sdp`, not `full`: the session goes on with the
                // tracks it has (`full` ends a session, see SIGNALING.md).
                return send_error(
                    peer,
                    ErrorCode::InvalidSdp,
                    format!(
                        "at most {MAX_PUBLISHED_TRACKS} published tracks per participant; m-line {mid} ignored"
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
                let track_id = format!("{}-{}", peer.id, self.next_track);
                self.next_track += 1;
                peer.published.insert(mid, track_id.clone());
                info!(participant = %peer.id, track = %track_id, ?kind, ?source, "published");
                let track = Track {
                    id: track_id.clone(),
                    participant: peer.id.clone(),
                    origin: Origin::Local { pid, mid },
                    kind,
                    source,
                    keyframes: KeyframeLimiter::new(KEYFRAME_INTERVAL),
                    gop: None,
                    codec: None,
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

    // ---- negotiation ----------------------------------------------------

    fn renegotiate_room(&mut self, room: &RoomName, except: Option<Pid>) {
        let members = self
            .rooms
            .get(room)
            .map(|r| r.members.clone())
            .unwrap_or_default();
        for m in members {
            if Some(m) != except {
                self.renegotiate(m);
            }
        }
    }

    /// Bring the set of m-lines we send to `pid` in line with the room's
    /// tracks: one server offer adding what is new and stopping what is gone.
    fn renegotiate(&mut self, pid: Pid) {
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
        let new: Vec<(String, MediaKind, String)> = room
            .tracks
            .iter()
            .filter(|(id, t)| t.participant != peer.id && !peer.subs.contains_key(*id))
            .map(|(id, t)| (id.clone(), t.kind, t.participant.clone()))
            .collect();
        let Some(peer) = self.peers.get_mut(&pid) else {
            return;
        };
        if peer.pending.is_some() {
            peer.renegotiate = true;
            return;
        }
        peer.renegotiate = false;
        if gone.is_empty() && new.is_empty() {
            return;
        }
        // Every str0m call of the change under one guard: a panic ends
        // this participant (reaped with `error internal`), not the worker.
        let applied = catch_unwind(AssertUnwindSafe(|| {
            let mut change = peer.rtc.sdp_api();
            for id in &gone {
                if let Some(sub) = peer.subs.remove(id) {
                    peer.sub_by_mid.remove(&sub.mid);
                    change.stop_media(sub.mid);
                }
            }
            for (id, kind, owner) in new {
                let mid = change.add_media(
                    kind,
                    Direction::SendOnly,
                    Some(owner),
                    Some(id.clone()),
                    None,
                );
                peer.sub_by_mid.insert(mid, id.clone());
                peer.subs.insert(
                    id,
                    Subscription {
                        mid,
                        rewriter: Rewriter::default(),
                        pt_map: Vec::new(),
                        active: false,
                    },
                );
            }
            change.apply()
        }));
        let applied = match applied {
            Ok(a) => a,
            Err(_) => {
                peer.ended = Some(End::Panicked);
                return;
            }
        };
        if let Some((offer, pending)) = applied {
            peer.pending = Some(pending);
            let sdp = offer.to_sdp_string();
            peer.pending_mids = sdp_mids(&sdp);
            let _ = peer.events.send(ServerMessage::Offer { sdp });
            self.dirty.insert(pid);
        }
    }

    /// A server offer was refused: forget its m-lines so the next offer
    /// adds them again.
    fn rebuild_subscriptions(&mut self, pid: Pid) {
        if let Some(peer) = self.peers.get_mut(&pid) {
            let inactive: Vec<String> = peer
                .subs
                .iter()
                .filter(|(_, s)| !s.active)
                .map(|(id, _)| id.clone())
                .collect();
            for id in inactive {
                if let Some(s) = peer.subs.remove(&id) {
                    peer.sub_by_mid.remove(&s.mid);
                }
            }
        }
        self.renegotiate(pid);
    }

    // ---- forwarding -----------------------------------------------------

    /// One RTP packet from a local publisher: write it to every subscriber,
    /// here and on subscribed remote nodes.
    fn forward(&mut self, from: Pid, pkt: RtpPacket) {
        self.metrics.rtp_packets_in.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .rtp_bytes_in
            .fetch_add(pkt.payload.len() as u64, Ordering::Relaxed);
        let Some(publisher) = self.peers.get_mut(&from) else {
            return;
        };
        let ssrc = pkt.header.ssrc;
        let Some(mid) = publisher.rtc.direct_api().stream_rx(&ssrc).map(|s| s.mid()) else {
            return;
        };
        let Some(track_id) = publisher.published.get(&mid).cloned() else {
            return;
        };
        let pt = pkt.header.payload_type;
        let Some(params) = publisher.rtc.codec_config().find(|p| p.pt() == pt).copied() else {
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
        if track.codec.is_none() {
            // First packet: now the codec is known, other nodes can be told.
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
        self.fan_out(&room_name, &track_id, params, &packet, ext, pkt.timestamp);
    }

    /// A packet of a remote track, from its link.
    fn remote_media(&mut self, key: LinkKey, track_id: &str, packet: MediaPacket) {
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
            let Some(sub) = sub_peer.subs.get_mut(track_id) else {
                continue; // its own track, or not negotiated yet
            };
            if !sub.active {
                continue;
            }
            match write_to(
                &mut sub_peer.rtc,
                sub,
                track_id,
                params,
                packet,
                &ext,
                arrival,
                nackable,
            ) {
                Written::Yes => {}
                Written::No => continue,
                Written::Panicked => {
                    sub_peer.ended = Some(End::Panicked);
                    continue;
                }
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

    // ---- keyframes ------------------------------------------------------

    /// Subscriptions of `pid` that can receive media from now on (answer in
    /// and transport up; `tracks` may name audio, which needs nothing): each
    /// video one gets the track's cached group of pictures at once if there
    /// is one, else asks the publisher for a keyframe. Asked any earlier
    /// (at the answer, before ICE and DTLS finished), the keyframe went out
    /// before this subscriber could receive it.
    fn start_subscriptions(&mut self, pid: Pid, tracks: Vec<String>) {
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
        let Some(packets) = gop.replay(Instant::now()) else {
            return false;
        };
        let Some(peer) = peers.get_mut(&pid) else {
            return false;
        };
        let Some(sub) = peer.subs.get_mut(track_id) else {
            return false;
        };
        let mut sent = 0u64;
        for packet in packets {
            let ext = ExtensionValues::default();
            match write_to(
                &mut peer.rtc,
                sub,
                track_id,
                params,
                packet,
                &ext,
                packet.arrival.min(Instant::now()),
                true,
            ) {
                Written::Yes => sent += 1,
                Written::No => {}
                Written::Panicked => {
                    peer.ended = Some(End::Panicked);
                    return true;
                }
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
    fn replay_to_link(&mut self, room: &RoomName, key: LinkKey, track_id: &str) -> bool {
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

    fn keyframe_request_from_subscriber(&mut self, pid: Pid, mid: Mid) {
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
    fn keyframe_for_track(&mut self, room: &RoomName, track_id: &str, new_subscriber: bool) {
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
    fn send_keyframe_request(&mut self, room: &RoomName, track_id: &str, origin: Origin) {
        match origin {
            Origin::Local { pid, mid } => {
                let Some(p) = self.peers.get_mut(&pid) else {
                    return;
                };
                let rtc = &mut p.rtc;
                let r = catch_unwind(AssertUnwindSafe(|| {
                    let mut api = rtc.direct_api();
                    api.stream_rx_by_mid(mid, None)
                        .map(|rx| rx.request_keyframe(KeyframeRequestKind::Pli))
                }));
                match r {
                    Ok(Some(())) => {
                        self.dirty.insert(pid);
                    }
                    Ok(None) => {}
                    Err(_) => {
                        p.ended = Some(End::Panicked);
                    }
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

    // ---- rosters, chat, leaving -----------------------------------------

    fn roster(&self, room: &RoomName) -> Vec<ParticipantView> {
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

    fn broadcast_roster(&self, room: &RoomName) {
        let participants = self.roster(room);
        self.broadcast(room, ServerMessage::Roster { participants });
    }

    fn broadcast(&self, room: &RoomName, msg: ServerMessage) {
        if let Some(r) = self.rooms.get(room) {
            for pid in &r.members {
                if let Some(p) = self.peers.get(pid) {
                    let _ = p.events.send(msg.clone());
                }
            }
        }
    }

    /// Remove every participant whose session ended, with all it held.
    fn reap(&mut self) {
        let ended: Vec<(Pid, End)> = self
            .peers
            .iter()
            .filter_map(|(pid, p)| p.ended.map(|e| (*pid, e)))
            .collect();
        for (pid, end) in ended {
            self.remove(pid, end);
        }
    }

    fn remove(&mut self, pid: Pid, end: End) {
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
        let _ = catch_unwind(AssertUnwindSafe(|| {
            peer.rtc.disconnect();
            while let Ok(Output::Transmit(t)) = peer.rtc.poll_output() {
                let _ = self.socket.send_to(&t.contents, t.destination);
            }
        }));
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

    /// The last local participant left: the room and every link to it end.
    fn close_room(&mut self, room: &RoomName) {
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

    // ---- remote links (the trunk seam) ----------------------------------

    fn attach(
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

    fn detach(&mut self, key: LinkKey) {
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

    fn remote_command(&mut self, key: LinkKey, cmd: RemoteCommand) {
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

    fn update_gauges(&self) {
        let m = &self.metrics;
        m.participants
            .store(self.peers.len() as u64, Ordering::Relaxed);
        m.rooms.store(self.rooms.len() as u64, Ordering::Relaxed);
        let tracks: usize = self.rooms.values().map(|r| r.tracks.len()).sum();
        m.tracks.store(tracks as u64, Ordering::Relaxed);
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

/// Remove a track from its room: local subscribers lose it at the next
/// renegotiation; remote nodes are told if they knew of it.
fn remove_track(room: &mut Room, id: &str) {
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

/// A local track as remote nodes learn of it.
fn describe(t: &Track, codec: PayloadParams) -> TrackDescription {
    TrackDescription {
        id: t.id.clone(),
        participant: t.participant.clone(),
        kind: kind_of(t.kind),
        source: t.source,
        codec: CodecInfo::from_params(&codec),
    }
}

fn send_error(peer: &Peer, code: ErrorCode, message: String) {
    let _ = peer.events.send(ServerMessage::Error { code, message });
}

/// The subscriber's payload type for the publisher's codec, if it has one.
fn map_pt(rtc: &Rtc, params: PayloadParams) -> Option<u8> {
    // Guarded like every str0m call: a panic means "no common codec".
    catch_unwind(AssertUnwindSafe(|| {
        rtc.codec_config().match_params(params).map(|p| *p.pt())
    }))
    .ok()
    .flatten()
}

/// What [`write_to`] did with a packet.
enum Written {
    Yes,
    /// Not forwarded (no common codec, older than its source, no send
    /// stream yet); logged at debug.
    No,
    /// str0m panicked: the subscriber must be removed.
    Panicked,
}

/// Write one packet of `track_id` to one active subscription: payload type
/// mapped, numbering rewritten, str0m call guarded.
#[allow(clippy::too_many_arguments)]
fn write_to(
    rtc: &mut Rtc,
    sub: &mut Subscription,
    track_id: &str,
    params: PayloadParams,
    packet: &MediaPacket,
    ext: &ExtensionValues,
    arrival: Instant,
    nackable: bool,
) -> Written {
    let in_pt = packet.payload_type;
    let out_pt = match sub.pt_map.iter().find(|(p, _)| *p == in_pt) {
        Some((_, out)) => *out,
        None => {
            let out = map_pt(rtc, params);
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
    let r = catch_unwind(AssertUnwindSafe(|| {
        let mut api = rtc.direct_api();
        api.stream_tx_by_mid(mid, None)
            .map(|stream| stream.write_rtp(write))
    }));
    match r {
        Ok(Some(_)) => Written::Yes,
        Ok(None) => {
            debug!(track = %track_id, "no send stream (yet); not forwarded");
            Written::No
        }
        Err(_) => Written::Panicked,
    }
}

/// Keep a video packet in its track's group-of-pictures cache.
fn remember(track: &mut Track, params: PayloadParams, packet: &MediaPacket) {
    if track.kind != MediaKind::Video {
        return;
    }
    track
        .gop
        .get_or_insert_with(|| GopCache::new(params.spec().codec))
        .push(packet, packet.arrival);
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n\
        m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:0\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\n\
        m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\n";

    #[test]
    fn answers_are_matched_to_their_offer_by_m_lines() {
        let offer = sdp_mids(OFFER);
        assert_eq!(offer, ["0", "1", "2"]);
        assert!(answers(&offer, &offer));
        // A rejected m-line without its mid still answers the offer.
        let lenient = sdp_mids(&OFFER.replace("a=mid:2\r\n", ""));
        assert_eq!(lenient, ["0", "1", ""]);
        assert!(answers(&lenient, &offer));
        // The previous answer (one m-line fewer), or other mids: not this offer.
        let stale = sdp_mids(OFFER.split("m=video").next().unwrap_or_default());
        assert!(!answers(&stale, &offer));
        let other = sdp_mids(&OFFER.replace("a=mid:1", "a=mid:7"));
        assert!(!answers(&other, &offer));
        assert!(sdp_mids("garbage\nno m-lines").is_empty());
    }
}
