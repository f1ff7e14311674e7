//! The media plane: one str0m `Rtc` per participant, rooms, RTP forwarding.
//!
//! The public surface is deliberately small so the binary (signaling) and,
//! later, the trunk adapter can drive it: [`Sfu::start`] spawns the worker,
//! [`Sfu::join`] returns a [`Participant`] handle whose commands go to the
//! worker and whose events are ready-to-send [`signal::ServerMessage`]s.
//! Knows nothing of QUIC or HTTP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

pub use signal::{
    DisplayName, Kind, ParticipantView, RoomName, ServerMessage, Source, TrackSource,
};

mod demux;
pub mod framing;
mod gop;
mod keyframe;
mod media_wire;
mod metrics;
mod remote;
mod rewrite;
mod worker;

pub use media_wire::{MediaWireError, SeqExtender};
pub use metrics::SfuMetrics;
pub use remote::{
    CodecInfo, MediaPacket, REMOTE_MEDIA_IN_QUEUE, REMOTE_MEDIA_QUEUE, RemoteCommand, RemoteEvent,
    RemoteLink, RemoteSender, RoomEvent, TrackDescription,
};
pub use worker::MAX_PUBLISHED_TRACKS;
#[doc(hidden)]
pub use worker::sdp_round_for_fuzzing;

/// Default of `SfuConfig::max_tcp_connections`: each holds a descriptor
/// and up to ~320 KiB of buffers (a 64 KiB frame being read, the write
/// queue); TCP is the fallback for the few whose UDP is blocked.
pub const DEFAULT_MAX_TCP_CONNECTIONS: usize = 500;

/// Default of `SfuConfig::tcp_handshake_timeout`: browsers send their
/// first binding request right after connecting.
pub const DEFAULT_TCP_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Media-plane configuration.
#[derive(Debug, Clone)]
pub struct SfuConfig {
    /// Address the media UDP socket binds to. Must be a specific address
    /// (not 0.0.0.0) unless `public_ip` is set: str0m only accepts STUN whose
    /// destination is a local candidate.
    pub bind: IpAddr,
    /// UDP port for media; 0 picks a free one. With `tcp`, the ICE-TCP
    /// listener takes the same port number.
    pub media_port: u16,
    /// Also listen for ICE-TCP (RFC 6544, passive) on the media port and
    /// offer it as a lower-priority candidate: browsers whose UDP is
    /// blocked still get media.
    pub tcp: bool,
    /// Most ICE-TCP media connections open at once (handshaking or bound);
    /// one more is closed at once and counted.
    pub max_tcp_connections: usize,
    /// An ICE-TCP connection whose first frame (a STUN binding request
    /// naming a participant here) has not arrived within this is closed.
    pub tcp_handshake_timeout: Duration,
    /// Address advertised in ICE candidates instead of `bind` (NAT, containers).
    pub public_ip: Option<IpAddr>,
    /// Most participants in one room on this node.
    pub max_participants_per_room: usize,
    /// Most rooms open on this node at once (a join that would open one
    /// more gets `error full`).
    pub max_rooms: usize,
    /// Most tracks one participant may publish; more m-lines are ignored
    /// with `invalid_sdp` (default [`MAX_PUBLISHED_TRACKS`]).
    pub max_tracks_per_participant: usize,
}

impl Default for SfuConfig {
    fn default() -> Self {
        SfuConfig {
            bind: IpAddr::from([127, 0, 0, 1]),
            media_port: 0,
            tcp: true,
            max_tcp_connections: DEFAULT_MAX_TCP_CONNECTIONS,
            tcp_handshake_timeout: DEFAULT_TCP_HANDSHAKE_TIMEOUT,
            public_ip: None,
            max_participants_per_room: 100,
            max_rooms: 1000,
            max_tracks_per_participant: MAX_PUBLISHED_TRACKS,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SfuError {
    #[error("cannot bind media socket on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen for ICE-TCP media on {addr}: {source}")]
    BindTcp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("media worker failed to start: {0}")]
    Worker(std::io::Error),
    #[error("the media worker has stopped")]
    Stopped,
}

/// What a participant's session asks of the media plane (already validated
/// by the signaling layer).
#[derive(Debug, Clone, PartialEq)]
pub enum ParticipantCommand {
    Offer {
        sdp: String,
        tracks: Vec<TrackSource>,
    },
    Answer {
        sdp: String,
    },
    Chat {
        text: String,
    },
    Mute {
        audio: bool,
        video: bool,
    },
}

/// One room as `/api/status` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RoomStatus {
    pub name: String,
    pub participants: Vec<ParticipantView>,
}

/// Handle to the running media plane. Dropping it without [`Sfu::shutdown`]
/// also stops the worker.
pub struct Sfu {
    inner: worker::Handle,
}

impl Sfu {
    /// Bind the media socket and start the worker thread.
    pub fn start(config: SfuConfig) -> Result<Sfu, SfuError> {
        Ok(Sfu {
            inner: worker::Handle::start(config)?,
        })
    }

    /// Whether the media worker thread is still running. It only ends on
    /// shutdown or if something outside the guarded str0m calls panicked:
    /// `/readyz` then answers 503 so a load balancer stops sending people
    /// to a node that cannot carry media.
    pub fn is_running(&self) -> bool {
        self.inner.is_running()
    }

    /// The address browsers send media to (the advertised candidate uses
    /// `public_ip` if set, with this port).
    pub fn media_addr(&self) -> SocketAddr {
        self.inner.media_addr()
    }

    /// Enter `room` as `name`. Returns at once; the worker answers on the
    /// handle with `Joined` then `Roster`, or `Error { Full }` and closes it.
    pub fn join(&self, room: RoomName, name: DisplayName) -> Result<Participant, SfuError> {
        self.inner.join(room, name, Permissions::ALL)
    }

    /// [`Sfu::join`] with what the participant may do (from its access
    /// token): without `subscribe` it is offered no one's media, so nothing
    /// is forwarded to it and it causes no keyframe requests; without
    /// `publish` the m-lines it sends on are ignored (`error forbidden`).
    pub fn join_with(
        &self,
        room: RoomName,
        name: DisplayName,
        permissions: Permissions,
    ) -> Result<Participant, SfuError> {
        self.inner.join(room, name, permissions)
    }

    /// Attach another node to `room` as a member (the trunk adapter does
    /// this per room link). If the room is not open here the link gets
    /// [`RemoteEvent::Closed`] at once; nothing is created for it. `node`
    /// names the remote node in logs.
    pub fn attach(&self, room: RoomName, node: &str) -> Result<RemoteLink, SfuError> {
        self.inner.attach(room, node.to_owned())
    }

    /// Rooms opening and closing on this node, starting with the ones open
    /// now.
    pub fn watch_rooms(&self) -> Result<tokio::sync::mpsc::UnboundedReceiver<RoomEvent>, SfuError> {
        self.inner.watch_rooms()
    }

    /// Live counters (cheap to read; export them as metrics).
    pub fn metrics(&self) -> Arc<SfuMetrics> {
        self.inner.metrics()
    }

    /// The rooms on this node and who is in them.
    pub async fn status(&self) -> Result<Vec<RoomStatus>, SfuError> {
        self.inner.status().await
    }

    /// Tell every participant the node is going away (`error shutting_down`),
    /// close their sessions and join the worker thread.
    pub fn shutdown(self) {
        self.inner.stop()
    }

    /// Like [`Sfu::shutdown`], for a media plane shared behind an `Arc`:
    /// blocks until the worker has stopped; later calls return at once.
    pub fn close(&self) {
        self.inner.stop()
    }
}

/// One participant's session. Dropping it leaves the room.
pub struct Participant {
    id: String,
    commands: worker::Commands,
    events: tokio::sync::mpsc::UnboundedReceiver<ServerMessage>,
}

impl Participant {
    /// Unique id of this participant (also the msid stream id of its tracks).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn send(&self, cmd: ParticipantCommand) {
        self.commands.participant(&self.id, cmd);
    }

    /// Next message for the browser; `None` once the media plane has ended
    /// the session (ICE died, room full, shutdown) — close the socket then.
    pub async fn recv(&mut self) -> Option<ServerMessage> {
        self.events.recv().await
    }

    /// Messages waiting to be taken with [`Participant::recv`]: the media
    /// plane never waits on a client, so the signaling layer bounds this
    /// (a client that does not read is cut, see `--max-queued-messages`).
    pub fn queued(&self) -> usize {
        self.events.len()
    }
}

/// What a participant may do with media. Chat and the roster are the
/// signaling layer's business.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permissions {
    /// Send media (its m-lines become room tracks).
    pub publish: bool,
    /// Receive the others' media.
    pub subscribe: bool,
}

impl Permissions {
    pub const ALL: Permissions = Permissions {
        publish: true,
        subscribe: true,
    };
}

#[cfg(any(feature = "test-hooks", debug_assertions))]
impl Sfu {
    /// Test hook: the next str0m call of participant `id` panics (inside
    /// the guard: that participant is removed with `error internal`).
    pub fn panic_in_participant_for_test(&self, id: &str) {
        self.inner.panic_in_participant(id);
    }

    /// Test hook: the worker loop panics outside every guard (the thread
    /// ends; `is_running` turns false).
    pub fn panic_worker_for_test(&self) {
        self.inner.panic_in_worker();
    }
}

impl Drop for Participant {
    fn drop(&mut self) {
        self.commands.leave(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_reports_whether_it_runs() {
        let sfu = Sfu::start(SfuConfig::default()).expect("starts on a free port");
        assert!(sfu.is_running());
        sfu.close();
        assert!(!sfu.is_running(), "a stopped worker must not look ready");
    }
}
