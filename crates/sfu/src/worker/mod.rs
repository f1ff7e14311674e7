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
//!
//! This file holds the worker's state (rooms, tracks, participants, remote
//! links) and its construction. `impl Worker` is split by job:
//!
//! - [`handle`]: what other threads hold: the command channel, starting and
//!   stopping the thread.
//! - [`io`]: the loop: poll, socket reads, timeouts, applying commands,
//!   shutdown.
//! - [`participant`]: joining, driving each `Rtc` and acting on its events,
//!   [`participant::guarded`] (the one guarded str0m call), reaping.
//! - [`negotiation`]: browser offers and answers, server offers
//!   (`renegotiate`), publishing and unpublishing (`media_direction`).
//! - [`forward`]: where a packet is forwarded: `forward` (local publisher),
//!   `remote_media` (remote track), `fan_out`, `write_to`.
//! - [`keyframes`]: new subscriptions starting at a keyframe, keyframe
//!   requests towards publishers.
//! - [`rooms`]: rosters, chat, mute, status, closing a room.
//! - [`links`]: remote links (the trunk seam): attach, detach, `RemoteCommand`s.
//! - [`tcp`]: ICE-TCP media (RFC 6544 passive candidate, RFC 4571
//!   framing): the listener and connections in the same `mio` loop.

mod forward;
mod handle;
mod io;
mod keyframes;
mod links;
mod negotiation;
mod participant;
mod rooms;
mod sdp_text;
mod tcp;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::UdpSocket;
use signal::{DisplayName, Kind, RoomName, ServerMessage, Source};
use str0m::Rtc;
use str0m::change::SdpPendingOffer;
use str0m::format::PayloadParams;
use str0m::media::{MediaKind, Mid};
use tokio::sync::mpsc::UnboundedSender;

use crate::demux::Demux;
use crate::gop::GopCache;
use crate::keyframe::KeyframeLimiter;
use crate::remote::{RemoteEvent, RoomEvent};
use crate::rewrite::Rewriter;
use crate::{SfuConfig, SfuMetrics};

pub(crate) use handle::{Commands, Handle};
#[doc(hidden)]
pub use negotiation::sdp_round_for_fuzzing;

/// Default of `SfuConfig::max_tracks_per_participant`: camera, microphone,
/// screen and its audio, with room to spare. An SDP may declare far more
/// m-lines, and each would become a track every other member is offered.
pub const MAX_PUBLISHED_TRACKS: usize = 8;

/// How long a room change waits for more before its offers go out (see
/// `Worker::renegotiate_soon`): well under what a person notices, well over
/// the gap between commands sent back to back by another thread.
const RENEGOTIATE_WINDOW: Duration = Duration::from_millis(30);

/// How long the server holds its next offer for a browser whose own offer
/// it ignored (glare): the browser answers ours, rolls its offer back and
/// offers again at once, and that offer must find no server offer in the
/// way. Without the wait a busy room always had the next server offer out
/// again right after the answer, and such a browser's tracks were never
/// negotiated (the churn soak: 6–10 clients a minute). A bound, not a
/// delay: the browser's offer ends the wait.
const GLARE_YIELD: Duration = Duration::from_secs(1);

/// Worker-local participant key (cheap to copy and hash; the public id is a string).
type Pid = u64;

/// Worker-local key of an attached [`crate::RemoteLink`].
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
    /// A local track's codec as expected at publish, before its first
    /// packet: the first codec of our answer on the publisher's m-line,
    /// which is the one a browser sends. Members are offered the track
    /// with it at once; should the first packet show another codec, their
    /// m-lines are replaced (`Subscription::offered_for`).
    expected: Option<PayloadParams>,
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
    kind: MediaKind,
    /// The subscriber's parameters of the track's codec, the only codec
    /// its m-line lists (`sdp_text::narrow_codecs`); None: no common codec.
    codec: Option<PayloadParams>,
    /// The track's codec (publisher side) the m-line was offered for: the
    /// known or the expected one. A track whose packets turned out to be
    /// of another codec gets a new m-line (`renegotiate`).
    offered_for: PayloadParams,
    /// The publishing participant (told to the client in `Offer::tracks`).
    participant: String,
    rewriter: Rewriter,
    /// Publisher payload type -> subscriber payload type (None: no common codec).
    pt_map: Vec<(u8, Option<u8>)>,
    /// Whether the subscriber has accepted the m-line (answer applied).
    active: bool,
}

/// A forwarding m-line whose track went away: made `inactive`, and given
/// to the next track of its kind instead of a new m-line. str0m 0.25's
/// own offers never recycle a stopped m-line (RFC 8829 §5.2.2 allows it,
/// str0m only accepts it from the remote), so stopping one per departed
/// track grew every offer and answer by ~2.2 KB for good: a subscriber
/// that saw ~22 publishers come and go sent an answer over
/// `MAX_SDP_BYTES` and was cut (`too_large`, found by the churn soak).
/// Reusing keeps the m-lines at the most tracks received at once.
struct Spare {
    mid: Mid,
    kind: MediaKind,
    /// The codec the m-line was narrowed to: it takes a track of that codec
    /// only (None: it lists every codec, and takes any track).
    codec: Option<PayloadParams>,
    /// Kept so the m-line's RTP stream goes on where it stopped.
    rewriter: Rewriter,
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
    /// What its access token lets it do with media.
    permissions: crate::Permissions,
    /// Only touched through [`participant::guarded`].
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
    /// Glare: the browser's offer was ignored while ours was out.
    glared: bool,
    /// Our next offer waits until then for the browser's own (see
    /// [`GLARE_YIELD`]).
    yield_until: Option<Instant>,
    /// Sources the browser declared for its sending mids.
    declared: HashMap<String, Source>,
    /// Our mids on which the browser publishes -> room track id.
    published: HashMap<Mid, String>,
    /// Room track id -> how it is forwarded to this participant.
    subs: HashMap<String, Subscription>,
    /// Subscriber mid -> track id (for keyframe requests).
    sub_by_mid: HashMap<Mid, String>,
    /// Forwarding m-lines free for the next track of their kind.
    spare: Vec<Spare>,
    audio_muted: bool,
    video_muted: bool,
    joined_at: Instant,
    connected: bool,
    /// When the last datagram from this participant arrived.
    last_heard: Instant,
    next_timeout: Instant,
    /// Set when the session must end; the reason goes to the browser.
    ended: Option<End>,
    /// Test hook: the next guarded str0m call panics.
    #[cfg(any(feature = "test-hooks", debug_assertions))]
    panic_next: bool,
}

impl Peer {
    /// Our forwarding m-lines: in use, and spare.
    fn forwards_on(&self) -> impl Iterator<Item = Mid> + '_ {
        let spare = self.spare.iter().map(|s| s.mid);
        self.sub_by_mid.keys().copied().chain(spare)
    }
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
    /// ICE-TCP listener and connections (`SfuConfig::tcp`).
    tcp: Option<tcp::TcpMedia>,
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
    /// Participants whose m-lines must follow their room's tracks, and
    /// when their offer goes out (`flush_renegotiations`): a short window
    /// after the first change, so changes that arrive separately but
    /// together (a remote participant leaving removes its audio and its
    /// video in two commands, which the worker may take in two loop turns)
    /// cost one offer, not one each.
    renegotiate_soon: std::collections::BTreeMap<Pid, Instant>,
    /// Attached remote link -> its room.
    links: HashMap<LinkKey, RoomName>,
    room_watchers: Vec<UnboundedSender<RoomEvent>>,
    /// Remote media in the command queue (see `Commands::remote`).
    media_queued: Arc<AtomicUsize>,
}

impl Worker {
    /// A worker with no participants and no rooms on `socket` (and `tcp`'s
    /// listener); browsers are told `advertised` as its address.
    fn new(
        config: SfuConfig,
        socket: UdpSocket,
        tcp: Option<tcp::TcpMedia>,
        advertised: SocketAddr,
        metrics: Arc<SfuMetrics>,
        media_queued: Arc<AtomicUsize>,
    ) -> Worker {
        Worker {
            config,
            socket,
            tcp,
            advertised,
            metrics,
            peers: HashMap::new(),
            rooms: BTreeMap::new(),
            demux: Demux::default(),
            next_pid: 1,
            next_track: 1,
            dirty: HashSet::new(),
            renegotiate_soon: Default::default(),
            ids: HashMap::new(),
            links: HashMap::new(),
            room_watchers: Vec::new(),
            media_queued,
        }
    }
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
