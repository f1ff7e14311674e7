//! A test participant for Switchboard, built on str0m: it joins a room over
//! the signaling protocol (docs/SIGNALING.md), negotiates like a browser (it
//! makes the first offer with a data channel `sb`, answers server offers, is
//! the polite side of glare), publishes synthetic audio/video RTP whose
//! payload carries a magic, a per-track counter and a send timestamp, and
//! records everything it receives so tests can check order and integrity.
//!
//! The signaling transport is a pair of channels ([`Transport`]); a WebSocket
//! bridge is provided ([`Transport::websocket`]), and in-process transports
//! can be built from plain channels by whoever owns the server side.
//!
//! Media goes over UDP, or ([`MediaTransport::Tcp`]) over ICE-TCP only, as a
//! browser whose UDP is blocked: the client offers one active TCP host
//! candidate, connects to the server's passive one and frames every packet
//! by RFC 4571.

mod payload;
mod tcp;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use signal::{ClientMessage, ParticipantView, ServerMessage, Source, TrackSource};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
pub use str0m::format::Codec;
pub use str0m::media::MediaKind;
use str0m::media::{Direction, Mid};
use str0m::net::{Protocol, Receive, TcpType};
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Message;

pub use payload::{Payload, decode_payload, encode_payload};
use tcp::{TcpLinks, recv_tcp};

/// VP8 payload descriptor byte of a packet that starts a frame (S = 1,
/// partition 0); the synthetic payload begins with `S` (0x53), never this.
const VP8_FRAME_START: u8 = 0x10;

#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("websocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("the server refused: {0:?}")]
    Refused(ServerMessage),
    #[error("the session ended")]
    Ended,
}

/// A signaling connection as two channels.
pub struct Transport {
    pub tx: mpsc::UnboundedSender<ClientMessage>,
    pub rx: mpsc::UnboundedReceiver<ServerMessage>,
}

impl Transport {
    /// Connect to `ws://host:port/ws` and bridge it to channels.
    pub async fn websocket(url: &str) -> Result<Transport, KitError> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Transport::from_websocket(ws))
    }

    /// Bridge an open WebSocket (over any stream: TLS the caller set up,
    /// say) to channels.
    pub fn from_websocket<S>(ws: tokio_tungstenite::WebSocketStream<S>) -> Transport
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sink, mut stream) = ws.split();
        let (ctx, mut crx) = mpsc::unbounded_channel::<ClientMessage>();
        let (stx, srx) = mpsc::unbounded_channel::<ServerMessage>();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    out = crx.recv() => match out {
                        Some(m) => {
                            let Ok(text) = serde_json::to_string(&m) else { continue };
                            if sink.send(Message::Text(text.into())).await.is_err() { break; }
                        }
                        None => { let _ = sink.close().await; break; }
                    },
                    inc = stream.next() => match inc {
                        Some(Ok(Message::Text(t))) => {
                            if let Ok(m) = serde_json::from_str::<ServerMessage>(&t)
                                && stx.send(m).is_err()
                            {
                                break;
                            }
                        }
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                        Some(Ok(_)) => {}
                    },
                }
            }
        });
        Transport { tx: ctx, rx: srx }
    }
}

/// How a client's media reaches the server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MediaTransport {
    /// A UDP host candidate (a loopback socket).
    #[default]
    Udp,
    /// Only an active ICE-TCP host candidate (RFC 6544): the client
    /// connects to the server's passive TCP candidate, RFC 4571 framing.
    Tcp,
}

/// The active TCP candidate's address: browsers advertise port 9 (the
/// discard port) for active candidates, whose real port is only known once
/// connected; the server learns it from the connection.
const TCP_ACTIVE_CANDIDATE: &str = "127.0.0.1:9";

/// One received RTP packet, as recorded.
#[derive(Debug, Clone)]
pub struct Received {
    pub payload: Payload,
    /// For a track published with [`Client::publish_keyframes`]: whether
    /// this packet starts a (VP8) keyframe. `None` for other tracks.
    pub keyframe: Option<bool>,
    pub seq: u64,
    pub at: Instant,
    /// Wall-clock receive time, comparable with `payload.sent_micros`.
    pub at_micros: u64,
}

/// Everything the client has seen. Tests read it through [`Client::state`]
/// and [`Client::wait_until`].
#[derive(Debug, Default)]
pub struct State {
    pub participant_id: Option<String>,
    pub roster: Vec<ParticipantView>,
    pub chat: Vec<(String, String)>,
    pub errors: Vec<ServerMessage>,
    /// Received packets by roster track id (as the server offer's `tracks` names them).
    pub tracks: BTreeMap<String, Vec<Received>>,
    /// Track id -> publisher participant id (from the server offer's `tracks`).
    pub track_owner: HashMap<String, String>,
    pub connected: bool,
    pub ended: bool,
    pub offers_received: usize,
    /// The most m-lines any server offer had.
    pub offers_received_mlines: usize,
    /// The last server offer (SDP text), and the bytes of all of them.
    pub last_offer: String,
    pub offer_bytes: u64,
    /// Every answer the server sent to our offers (SDP text).
    pub answers: Vec<String>,
    /// RTP packets that could not be attributed to a remote track, or whose
    /// payload was not intact.
    pub unmapped: u64,
    pub corrupt: u64,
    /// Codec of each received track, from the payload type of its packets.
    pub track_codec: HashMap<String, Codec>,
    /// Keyframe requests (PLI/FIR) the server sent us for our tracks.
    pub keyframe_requests: u64,
    /// Packets sent per local track index.
    pub sent: BTreeMap<u32, u64>,
}

impl State {
    /// Tracks received from `participant` (by id).
    pub fn tracks_from(&self, participant: &str) -> Vec<&String> {
        self.track_owner
            .iter()
            .filter(|(_, p)| p.as_str() == participant)
            .map(|(t, _)| t)
            .collect()
    }
    /// Packets received on a track, 0 if none.
    pub fn count(&self, track: &str) -> usize {
        self.tracks.get(track).map_or(0, |v| v.len())
    }
}

enum Cmd {
    Publish {
        kind: MediaKind,
        codec: Codec,
        source: Source,
        rate: Duration,
        size: usize,
        keyframe_every: Option<u64>,
    },
    Unpublish(u32),
    Send(ClientMessage),
    Vanish,
    StallTcp,
    RequestKeyframe(String),
    StaleAnswerOnce,
    OfferRecvOnly(MediaKind),
    AnswerDelay(Duration),
    HoldMedia(Duration),
}

/// Handle to a running test participant.
pub struct Client {
    cmd: mpsc::UnboundedSender<Cmd>,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    next_track: u32,
    pub id: String,
}

impl Client {
    /// Join `room` as `name` over `transport`; returns once `joined` arrived.
    pub async fn join(transport: Transport, room: &str, name: &str) -> Result<Client, KitError> {
        Client::join_with(transport, room, name, MediaTransport::Udp).await
    }

    /// Like [`Client::join`], with media over `media`.
    pub async fn join_with(
        mut transport: Transport,
        room: &str,
        name: &str,
        media: MediaTransport,
    ) -> Result<Client, KitError> {
        transport
            .tx
            .send(ClientMessage::Join {
                room: room.into(),
                name: name.into(),
                token: None,
            })
            .map_err(|_| KitError::Ended)?;
        let id = loop {
            match tokio::time::timeout(Duration::from_secs(10), transport.rx.recv()).await {
                Err(_) => return Err(KitError::Timeout(Duration::from_secs(10), "joined".into())),
                Ok(None) => return Err(KitError::Ended),
                Ok(Some(ServerMessage::Joined { participant_id, .. })) => break participant_id,
                Ok(Some(m @ ServerMessage::Error { .. })) => return Err(KitError::Refused(m)),
                Ok(Some(_)) => {}
            }
        };
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        // Like the server: a test client must not lose media to a small buffer.
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(4 << 20);
        let local = socket.local_addr()?;
        let mut rtc = Rtc::builder().set_rtp_mode(true).build(Instant::now());
        let (local, tcp, tcp_rx) = match media {
            MediaTransport::Udp => {
                if let Ok(c) = Candidate::host(local, "udp") {
                    rtc.add_local_candidate(c);
                }
                (local, None, None)
            }
            MediaTransport::Tcp => {
                let addr: SocketAddr = TCP_ACTIVE_CANDIDATE.parse().map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "candidate")
                })?;
                if let Ok(c) = Candidate::builder()
                    .tcp()
                    .host(addr)
                    .tcptype(TcpType::Active)
                    .build()
                {
                    rtc.add_local_candidate(c);
                }
                let (tx, rx) = mpsc::unbounded_channel();
                let links = TcpLinks {
                    conns: HashMap::new(),
                    inbound: tx,
                    stall: Arc::new(AtomicBool::new(false)),
                };
                (addr, Some(links), Some(rx))
            }
        };
        let state = Arc::new(Mutex::new(State {
            participant_id: Some(id.clone()),
            ..Default::default()
        }));
        let changed = Arc::new(Notify::new());
        let (ctx, crx) = mpsc::unbounded_channel();
        let driver = Driver {
            rtc,
            socket: Some(socket),
            tcp,
            local,
            signal_tx: transport.tx,
            state: state.clone(),
            changed: changed.clone(),
            pending: None,
            first_done: false,
            pubs: Vec::new(),
            remote: HashMap::new(),
            dirty: true,
            last_answer: None,
            stale_answer: false,
            recvonly: Vec::new(),
            answer_delay: Duration::ZERO,
            hold_media: Duration::ZERO,
            connected_at: None,
            held_answer: None,
        };
        tokio::spawn(driver.run(transport.rx, crx, tcp_rx));
        Ok(Client {
            cmd: ctx,
            state,
            changed,
            next_track: 0,
            id,
        })
    }

    /// Join over a WebSocket at `ws_url` (e.g. `ws://127.0.0.1:3000/ws`).
    pub async fn join_ws(ws_url: &str, room: &str, name: &str) -> Result<Client, KitError> {
        Client::join(Transport::websocket(ws_url).await?, room, name).await
    }

    /// Like [`Client::join_ws`], with media over ICE-TCP only.
    pub async fn join_ws_tcp(ws_url: &str, room: &str, name: &str) -> Result<Client, KitError> {
        let transport = Transport::websocket(ws_url).await?;
        Client::join_with(transport, room, name, MediaTransport::Tcp).await
    }

    /// Start publishing a synthetic track: one packet of `size` bytes every
    /// `rate`. Returns the local track index (stamped into every payload).
    pub fn publish(&mut self, kind: MediaKind, source: Source, rate: Duration, size: usize) -> u32 {
        let codec = match kind {
            MediaKind::Audio => Codec::Opus,
            MediaKind::Video => Codec::Vp8,
        };
        self.publish_codec(kind, codec, source, rate, size)
    }

    /// Like [`Client::publish`] with a chosen codec (e.g. H.264 video).
    pub fn publish_codec(
        &mut self,
        kind: MediaKind,
        codec: Codec,
        source: Source,
        rate: Duration,
        size: usize,
    ) -> u32 {
        let idx = self.next_track;
        self.next_track += 1;
        let _ = self.cmd.send(Cmd::Publish {
            kind,
            codec,
            source,
            rate,
            size,
            keyframe_every: None,
        });
        idx
    }

    /// VP8 video like an encoder's, as far as an SFU can tell: every packet
    /// begins a frame, every `every`-th (and the first, and the next one
    /// after a keyframe request) is a keyframe (VP8 payload descriptor with
    /// S = 1 and a payload header with P = 0, then the synthetic payload).
    pub fn publish_keyframes(&mut self, rate: Duration, size: usize, every: u64) -> u32 {
        let idx = self.next_track;
        self.next_track += 1;
        let _ = self.cmd.send(Cmd::Publish {
            kind: MediaKind::Video,
            codec: Codec::Vp8,
            source: Source::Camera,
            rate,
            size,
            keyframe_every: Some(every.max(1)),
        });
        idx
    }

    /// Audio (Opus-like: 50 packets/s of 120 B) and video (~30 packets/s of 1000 B).
    pub fn publish_av(&mut self) -> (u32, u32) {
        let a = self.publish(
            MediaKind::Audio,
            Source::Microphone,
            Duration::from_millis(20),
            120,
        );
        let v = self.publish(
            MediaKind::Video,
            Source::Camera,
            Duration::from_millis(33),
            1000,
        );
        (a, v)
    }

    pub fn unpublish(&self, idx: u32) {
        let _ = self.cmd.send(Cmd::Unpublish(idx));
    }

    pub fn chat(&self, text: &str) {
        let _ = self
            .cmd
            .send(Cmd::Send(ClientMessage::Chat { text: text.into() }));
    }

    pub fn mute(&self, audio: bool, video: bool) {
        let _ = self
            .cmd
            .send(Cmd::Send(ClientMessage::Mute { audio, video }));
    }

    /// Leave politely (`leave`, then the socket closes).
    pub fn leave(self) {
        let _ = self.cmd.send(Cmd::Send(ClientMessage::Leave));
    }

    /// Stop all UDP/ICE activity but keep signaling open: the server must
    /// notice by itself that the media is gone.
    pub fn vanish(&self) {
        let _ = self.cmd.send(Cmd::Vanish);
    }

    /// ICE-TCP: stop reading the connections (they stay open), as a
    /// receiver too slow for its stream: the server's queue for it fills.
    pub fn stall_tcp(&self) {
        let _ = self.cmd.send(Cmd::StallTcp);
    }

    /// Send a PLI for a received track (by roster track id), as a decoder
    /// that lost its reference would.
    pub fn request_keyframe(&self, track: &str) {
        let _ = self.cmd.send(Cmd::RequestKeyframe(track.into()));
    }

    /// Misbehave once, as a client with a stale answer would: at the next
    /// server offer, first send the previous answer again, then the right
    /// one.
    pub fn stale_answer_once(&self) {
        let _ = self.cmd.send(Cmd::StaleAnswerOnce);
    }

    /// Answer every server offer `delay` late, as a slow device does
    /// (the answer is made at once, sent later; nothing is offered
    /// meanwhile).
    pub fn answer_delay(&self, delay: Duration) {
        let _ = self.cmd.send(Cmd::AnswerDelay(delay));
    }

    /// Send no media until `delay` after the transport connected (a
    /// browser's encoder warming up): the server knows the tracks from
    /// the SDP long before their first packet.
    pub fn hold_media(&self, delay: Duration) {
        let _ = self.cmd.send(Cmd::HoldMedia(delay));
    }

    /// Offer a `recvonly` m-line of `kind` in the next offer, as clients
    /// that receive through their own transceivers do (aiortc's
    /// `addTransceiver(kind, direction="recvonly")`).
    pub fn offer_recvonly(&self, kind: MediaKind) {
        let _ = self.cmd.send(Cmd::OfferRecvOnly(kind));
    }

    /// Read the recorded state.
    pub fn state<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&s)
    }

    /// Wait until `pred` holds on the state, or fail after `timeout`.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&State) -> bool,
    ) -> Result<(), KitError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if self.state(&pred) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(KitError::Timeout(timeout, what.into()));
            }
        }
    }
}

struct Publication {
    idx: u32,
    kind: MediaKind,
    codec: Codec,
    source: Source,
    rate: Duration,
    size: usize,
    /// The m-line once offered (None: not yet in an offer).
    mid: Option<Mid>,
    /// Whether the server accepted it (answer applied).
    negotiated: bool,
    active: bool,
    next_send: Instant,
    counter: u64,
    /// See [`Client::publish_keyframes`].
    keyframe_every: Option<u64>,
    /// A keyframe request came in: the next packet is a keyframe.
    key_wanted: bool,
    seq: u64,
    ts: u32,
}

struct Driver {
    rtc: Rtc,
    socket: Option<UdpSocket>,
    /// [`MediaTransport::Tcp`]: the connections (`None` for UDP).
    tcp: Option<TcpLinks>,
    local: SocketAddr,
    signal_tx: mpsc::UnboundedSender<ClientMessage>,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    pending: Option<SdpPendingOffer>,
    first_done: bool,
    pubs: Vec<Publication>,
    /// Remote mid -> (owner participant id, track id).
    remote: HashMap<Mid, (String, String)>,
    /// Local changes wait for negotiation.
    dirty: bool,
    /// The last answer sent, and whether to repeat it before the next one.
    last_answer: Option<String>,
    stale_answer: bool,
    /// `recvonly` m-lines to add to the next offer.
    recvonly: Vec<MediaKind>,
    /// See [`Client::answer_delay`]; an answer waiting to be sent.
    answer_delay: Duration,
    held_answer: Option<(Instant, String)>,
    /// `Client::hold_media`, and when the transport was first seen connected.
    hold_media: Duration,
    connected_at: Option<Instant>,
}

impl Driver {
    fn with_state(&self, f: impl FnOnce(&mut State)) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        drop(s);
        self.changed.notify_waiters();
    }

    async fn run(
        mut self,
        mut signal_rx: mpsc::UnboundedReceiver<ServerMessage>,
        mut cmd_rx: mpsc::UnboundedReceiver<Cmd>,
        mut tcp_rx: Option<mpsc::UnboundedReceiver<(SocketAddr, Vec<u8>)>>,
    ) {
        let mut buf = vec![0u8; 2048];
        loop {
            if let Some((at, _)) = &self.held_answer
                && *at <= Instant::now()
                && let Some((_, sdp)) = self.held_answer.take()
            {
                let _ = self.signal_tx.send(ClientMessage::Answer { sdp });
            }
            if self.dirty && self.pending.is_none() && self.held_answer.is_none() {
                self.offer();
            }
            let next = self.poll();
            let mut next = self.send_media(next);
            if let Some((at, _)) = &self.held_answer {
                next = next.min(*at);
            }
            let sleep = tokio::time::sleep_until(next.into());
            tokio::select! {
                r = recv(&self.socket, &mut buf) => {
                    if let Some((n, source)) = r
                        && let Ok(rcv) = Receive::new(Protocol::Udp, source, self.local, &buf[..n])
                    {
                        let _ = self.rtc.handle_input(Input::Receive(Instant::now(), rcv));
                    }
                }
                f = recv_tcp(&mut tcp_rx) => {
                    if let Some((source, frame)) = f
                        && self.socket.is_some()
                        && let Ok(rcv) = Receive::new(Protocol::Tcp, source, self.local, &frame)
                    {
                        let _ = self.rtc.handle_input(Input::Receive(Instant::now(), rcv));
                    }
                }
                m = signal_rx.recv() => match m {
                    Some(m) => self.signal(m),
                    None => { self.with_state(|s| s.ended = true); return; }
                },
                c = cmd_rx.recv() => match c {
                    Some(c) => self.command(c),
                    // The handle is gone: leave by closing signaling.
                    None => return,
                },
                _ = sleep => {
                    if self.socket.is_some() {
                        let _ = self.rtc.handle_input(Input::Timeout(Instant::now()));
                    }
                }
            }
        }
    }

    /// Drive str0m until it wants time to pass; returns when.
    fn poll(&mut self) -> Instant {
        loop {
            if self.socket.is_none() {
                return Instant::now() + Duration::from_secs(3600);
            }
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => return t,
                Ok(Output::Transmit(t)) => {
                    if t.proto == Protocol::Tcp {
                        if let Some(tcp) = &mut self.tcp {
                            tcp.send(t.destination, t.contents.to_vec());
                        }
                    } else if let Some(s) = &self.socket {
                        // A full socket buffer loses the packet, as the network would.
                        let _ = s.try_send_to(&t.contents, t.destination);
                    }
                }
                Ok(Output::Event(e)) => self.event(e),
                Err(_) => {
                    self.with_state(|s| s.ended = true);
                    return Instant::now() + Duration::from_secs(3600);
                }
            }
        }
    }

    fn event(&mut self, e: Event) {
        match e {
            Event::Connected => self.with_state(|s| s.connected = true),
            Event::KeyframeRequest(req) => {
                if let Some(p) = self.pubs.iter_mut().find(|p| p.mid == Some(req.mid)) {
                    p.key_wanted = true;
                }
                self.with_state(|s| s.keyframe_requests += 1)
            }
            Event::RtpPacket(pkt) => {
                let mid = self
                    .rtc
                    .direct_api()
                    .stream_rx(&pkt.header.ssrc)
                    .map(|s| s.mid());
                let Some((_, track)) = mid.and_then(|m| self.remote.get(&m)).cloned() else {
                    self.with_state(|s| s.unmapped += 1);
                    return;
                };
                // A VP8 descriptor + payload header ahead of the synthetic
                // payload: see `Client::publish_keyframes`.
                let (keyframe, body) = match &pkt.payload[..] {
                    [VP8_FRAME_START, hdr, rest @ ..] => (Some(hdr & 1 == 0), rest),
                    all => (None, all),
                };
                let Some(payload) = decode_payload(body) else {
                    self.with_state(|s| s.corrupt += 1);
                    return;
                };
                let codec = self
                    .rtc
                    .codec_config()
                    .find(|c| c.pt() == pkt.header.payload_type)
                    .map(|c| c.spec().codec);
                let rec = Received {
                    payload,
                    keyframe,
                    seq: *pkt.seq_no,
                    at: Instant::now(),
                    at_micros: micros_now(),
                };
                self.with_state(|s| {
                    if let Some(c) = codec {
                        s.track_codec.insert(track.clone(), c);
                    }
                    s.tracks.entry(track).or_default().push(rec)
                });
            }
            _ => {}
        }
    }

    fn signal(&mut self, m: ServerMessage) {
        match m {
            ServerMessage::Answer { sdp } => {
                self.with_state(|s| s.answers.push(sdp.clone()));
                let (Some(pending), Ok(answer)) =
                    (self.pending.take(), SdpAnswer::from_sdp_string(&sdp))
                else {
                    return;
                };
                if self.rtc.sdp_api().accept_answer(pending, answer).is_ok() {
                    self.first_done = true;
                    for p in self.pubs.iter_mut().filter(|p| p.mid.is_some()) {
                        p.negotiated = true;
                    }
                }
            }
            ServerMessage::Offer { sdp, tracks } => {
                let Ok(offer) = SdpOffer::from_sdp_string(&sdp) else {
                    return;
                };
                // What each forwarding m-line carries comes from `tracks`,
                // not the SDP's msid: the server reuses m-lines.
                self.remote = tracks
                    .iter()
                    .map(|t| {
                        let mid = Mid::from(t.mid.as_str());
                        (mid, (t.participant.clone(), t.track.clone()))
                    })
                    .collect();
                self.with_state(|s| {
                    for t in tracks {
                        s.track_owner.insert(t.track, t.participant);
                    }
                    s.offers_received_mlines = s
                        .offers_received_mlines
                        .max(sdp.lines().filter(|l| l.starts_with("m=")).count());
                    s.offer_bytes += sdp.len() as u64;
                    s.last_offer = sdp.clone();
                });
                // Polite side of glare: our outstanding offer is rolled back
                // (str0m invalidates it) and made again after answering.
                if self.pending.take().is_some() {
                    for p in self.pubs.iter_mut().filter(|p| !p.negotiated) {
                        p.mid = None;
                    }
                    self.dirty = true;
                }
                if let Ok(answer) = self.rtc.sdp_api().accept_offer(offer) {
                    if std::mem::take(&mut self.stale_answer)
                        && let Some(old) = self.last_answer.clone()
                    {
                        let _ = self.signal_tx.send(ClientMessage::Answer { sdp: old });
                    }
                    let sdp = answer.to_sdp_string();
                    self.last_answer = Some(sdp.clone());
                    if self.answer_delay.is_zero() {
                        let _ = self.signal_tx.send(ClientMessage::Answer { sdp });
                    } else {
                        self.held_answer = Some((Instant::now() + self.answer_delay, sdp));
                    }
                }
                self.with_state(|s| s.offers_received += 1);
            }
            ServerMessage::Roster { participants } => self.with_state(|s| s.roster = participants),
            ServerMessage::Chat { name, text, .. } => {
                self.with_state(|s| s.chat.push((name, text)))
            }
            m @ ServerMessage::Error { .. } => self.with_state(|s| s.errors.push(m)),
            _ => {}
        }
    }

    fn command(&mut self, c: Cmd) {
        match c {
            Cmd::Publish {
                kind,
                codec,
                source,
                rate,
                size,
                keyframe_every,
            } => {
                let idx = self.pubs.len() as u32;
                self.pubs.push(Publication {
                    idx,
                    kind,
                    codec,
                    source,
                    rate,
                    size,
                    mid: None,
                    negotiated: false,
                    active: true,
                    next_send: Instant::now(),
                    counter: 0,
                    keyframe_every,
                    key_wanted: false,
                    seq: 1 + (idx as u64) * 1000,
                    ts: 1000,
                });
                self.dirty = true;
            }
            Cmd::Unpublish(idx) => {
                if let Some(p) = self.pubs.iter_mut().find(|p| p.idx == idx) {
                    p.active = false;
                    self.dirty = true;
                }
            }
            Cmd::Send(m) => {
                let _ = self.signal_tx.send(m);
            }
            Cmd::Vanish => {
                self.socket = None;
                // Dropping the senders ends the tasks: connections close.
                if let Some(tcp) = &mut self.tcp {
                    tcp.conns.clear();
                }
            }
            Cmd::StallTcp => {
                if let Some(tcp) = &self.tcp {
                    tcp.stall.store(true, Ordering::Relaxed);
                }
            }
            Cmd::StaleAnswerOnce => self.stale_answer = true,
            Cmd::AnswerDelay(d) => self.answer_delay = d,
            Cmd::HoldMedia(d) => self.hold_media = d,
            Cmd::OfferRecvOnly(kind) => {
                self.recvonly.push(kind);
                self.dirty = true;
            }
            Cmd::RequestKeyframe(track) => {
                let mid = self
                    .remote
                    .iter()
                    .find(|(_, (_, t))| *t == track)
                    .map(|(m, _)| *m);
                if let Some(m) = mid {
                    let mut api = self.rtc.direct_api();
                    if let Some(rx) = api.stream_rx_by_mid(m, None) {
                        rx.request_keyframe(str0m::media::KeyframeRequestKind::Pli);
                    }
                }
            }
        }
    }

    /// Offer whatever is not negotiated yet (the first offer always, with
    /// the `sb` data channel).
    fn offer(&mut self) {
        self.dirty = false;
        let mut change = self.rtc.sdp_api();
        if !self.first_done {
            change.add_channel("sb".into());
        }
        let mut tracks = Vec::new();
        for kind in self.recvonly.drain(..) {
            change.add_media(kind, Direction::RecvOnly, None, None, None);
        }
        for p in self.pubs.iter_mut() {
            match (p.active, p.mid) {
                (true, None) => {
                    let mid = change.add_media(p.kind, Direction::SendOnly, None, None, None);
                    p.mid = Some(mid);
                }
                (false, Some(mid)) if p.negotiated => {
                    change.set_direction(mid, Direction::Inactive)
                }
                _ => {}
            }
            if let (true, Some(mid)) = (p.active, p.mid) {
                tracks.push(TrackSource {
                    mid: mid.to_string(),
                    source: p.source,
                });
            }
        }
        if let Some((offer, pending)) = change.apply() {
            self.pending = Some(pending);
            let _ = self.signal_tx.send(ClientMessage::Offer {
                sdp: offer.to_sdp_string(),
                tracks,
            });
        }
    }

    /// Write due media packets; returns the earlier of `next` and the next send.
    fn send_media(&mut self, next: Instant) -> Instant {
        let now = Instant::now();
        let mut earliest = next;
        let connected = self.state.lock().map(|s| s.connected).unwrap_or(false);
        if !connected || self.socket.is_none() {
            return earliest.min(now + Duration::from_millis(50));
        }
        let start = *self.connected_at.get_or_insert(now) + self.hold_media;
        if now < start {
            return earliest.min(start);
        }
        let mut sent = Vec::new();
        for p in self.pubs.iter_mut().filter(|p| p.active && p.negotiated) {
            let Some(mid) = p.mid else { continue };
            let Some(params) = self
                .rtc
                .codec_config()
                .find(|c| c.spec().codec == p.codec)
                .copied()
            else {
                continue;
            };
            let clock = params.spec().clock_rate.get();
            while p.next_send <= now {
                let mut api = self.rtc.direct_api();
                let Some(stream) = api.stream_tx_by_mid(mid, None) else {
                    break;
                };
                let mut payload = encode_payload(
                    &Payload {
                        track: p.idx,
                        counter: p.counter,
                        sent_micros: micros_now(),
                    },
                    p.size,
                );
                if let Some(every) = p.keyframe_every {
                    let key = p.counter % every == 0 || std::mem::take(&mut p.key_wanted);
                    payload.splice(0..0, [VP8_FRAME_START, if key { 0 } else { 1 }]);
                }
                let w = RtpWrite::new(params.pt(), p.seq.into(), p.ts, now, payload)
                    .marker(true)
                    .nackable(p.kind == MediaKind::Video);
                stream.write_rtp(w);
                p.counter += 1;
                p.seq += 1;
                p.ts =
                    p.ts.wrapping_add((clock as f64 * p.rate.as_secs_f64()) as u32);
                p.next_send += p.rate;
                sent.push(p.idx);
            }
            earliest = earliest.min(p.next_send);
        }
        if !sent.is_empty() {
            self.with_state(|s| {
                for i in sent {
                    *s.sent.entry(i).or_default() += 1;
                }
            });
            // Flush what was written.
            let t = self.poll();
            earliest = earliest.min(t);
        }
        earliest
    }
}

/// Microseconds of wall-clock time: shared by every process on the machine,
/// so a receiver in another process can compute latency from the payload.
pub fn micros_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

async fn recv(socket: &Option<UdpSocket>, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
    match socket {
        Some(s) => s.recv_from(buf).await.ok(),
        None => std::future::pending().await,
    }
}
