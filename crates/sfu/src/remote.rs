//! The seam for the trunk: another node as a member of a room.
//!
//! DESIGN: "a remote node appears in a room as one more member that publishes
//! remote tracks and subscribes to local ones". The binary's trunk adapter
//! attaches one [`RemoteLink`] per room link (a room open here and on a peer
//! node) and translates in both directions; the media plane never learns
//! what a trunk is. Everything here is plain data so the adapter stays thin
//! and tests can bridge two media planes in-process.
//!
//! What a link sees ([`RemoteEvent`]) is *origin-only*: participants and
//! tracks of this node, never what other links taught it, so a track is never
//! relayed from one remote node to another (no duplicates with three or
//! more nodes).

use std::sync::Arc;
use std::time::Instant;

use signal::{DisplayName, Kind, RoomName, Source};
use str0m::format::{Codec, CodecSpec, FormatParams, PayloadParams};
use str0m::media::Frequency;
use tokio::sync::mpsc;

use crate::worker::Commands;

/// Media packets queued towards one link before newer ones are dropped
/// (and counted in `SfuMetrics::remote_media_dropped`): a stalled trunk must
/// not grow the worker's memory without bound. ~1 s of a busy room.
pub const REMOTE_MEDIA_QUEUE: usize = 4096;

/// Media packets from remote nodes waiting in the worker's command queue
/// before newer ones are dropped (and counted in
/// `SfuMetrics::remote_media_in_dropped`): they share the queue with
/// control commands, which keeps a track's announcement ahead of its first
/// packet, but only this many may be media.
pub const REMOTE_MEDIA_IN_QUEUE: usize = 8192;

/// How a track is encoded, as the trunk describes it (DESIGN's
/// `TrackInfo.codec`): enough for a receiving node to negotiate it with its
/// browsers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecInfo {
    /// e.g. `video/VP8`, `audio/opus`.
    pub mime_type: String,
    pub clock_rate: u32,
    pub channels: Option<u8>,
    /// The payload type the origin's packets carry.
    pub payload_type: u8,
    /// SDP `a=fmtp` parameters, e.g. `profile-level-id=42e01f;packetization-mode=1`.
    pub fmtp: String,
}

impl CodecInfo {
    pub(crate) fn from_params(p: &PayloadParams) -> CodecInfo {
        let spec = p.spec();
        let kind = if spec.codec.is_audio() {
            "audio"
        } else {
            "video"
        };
        CodecInfo {
            mime_type: format!("{kind}/{}", spec.codec),
            clock_rate: spec.clock_rate.get(),
            channels: spec.channels,
            payload_type: *p.pt(),
            fmtp: spec.format.to_string(),
        }
    }

    /// The str0m description, or `None` for a codec we cannot forward.
    pub(crate) fn to_params(&self) -> Option<PayloadParams> {
        let name = self.mime_type.split_once('/').map_or("", |(_, c)| c);
        let codec = Codec::from(name);
        if matches!(codec, Codec::Unknown | Codec::Null | Codec::Rtx) {
            return None;
        }
        let clock_rate = Frequency::new(self.clock_rate)?;
        let spec = CodecSpec {
            codec,
            clock_rate,
            channels: self.channels,
            format: FormatParams::parse_line(&self.fmtp),
        };
        Some(PayloadParams::new(self.payload_type.into(), None, spec))
    }
}

/// A published track as another node learns of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackDescription {
    /// Room-unique track id (the origin's).
    pub id: String,
    /// Id of the participant publishing it.
    pub participant: String,
    pub kind: Kind,
    pub source: Source,
    pub codec: CodecInfo,
}

/// One RTP packet of a track, as the origin received it from its publisher
/// (before any per-subscriber rewriting): what the trunk carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaPacket {
    pub ssrc: u32,
    /// Extended (64-bit, rollover-free) sequence number.
    pub seq: u64,
    pub rtp_ts: u32,
    pub marker: bool,
    pub payload_type: u8,
    pub payload: Arc<[u8]>,
    /// RFC 6464 audio level (-127..=0 dBov) and voice activity, if present.
    pub audio_level: Option<i8>,
    pub voice_activity: Option<bool>,
    /// When the packet reached its origin node, on this node's clock. It is
    /// the wallclock of the packet for every subscriber (str0m builds sender
    /// reports from it): the origin's timing, not the trunk's, so audio and
    /// video of one publisher stay in sync on every node.
    pub arrival: Instant,
}

/// What this node tells a remote node about a room (origin-only).
#[derive(Debug, Clone, PartialEq)]
pub enum RemoteEvent {
    /// A participant on this node (also sent for everyone present when the
    /// link attaches).
    ParticipantJoined {
        id: String,
        name: String,
    },
    ParticipantLeft {
        id: String,
    },
    Mute {
        id: String,
        audio: bool,
        video: bool,
    },
    /// A track of this node, announced once its codec is known (its first
    /// packet arrived).
    TrackAdded(TrackDescription),
    TrackRemoved {
        id: String,
    },
    /// This node wants the remote track (someone here receives it).
    Subscribe {
        track: String,
    },
    /// A packet of a local track the remote node subscribed to.
    Media {
        track: String,
        packet: MediaPacket,
    },
    /// Someone here needs a keyframe of the remote track (already coalesced
    /// and rate-limited per track).
    KeyframeRequest {
        track: String,
    },
    /// A chat message written on this node.
    Chat {
        from: String,
        name: String,
        text: String,
    },
    /// The room closed on this node (its last local participant left) or
    /// the node is shutting down: close the room link.
    Closed,
}

/// What a remote node tells this node about a room.
#[derive(Debug, Clone, PartialEq)]
pub enum RemoteCommand {
    ParticipantJoined {
        id: String,
        name: DisplayName,
    },
    ParticipantLeft {
        id: String,
    },
    Mute {
        id: String,
        audio: bool,
        video: bool,
    },
    /// A track published on the remote node; local participants receive it.
    TrackAdded(TrackDescription),
    TrackRemoved {
        id: String,
    },
    /// A packet of a remote track.
    Media {
        track: String,
        packet: MediaPacket,
    },
    /// The remote node wants a local track (media then flows as
    /// [`RemoteEvent::Media`]) or no longer does.
    Subscribe {
        track: String,
    },
    Unsubscribe {
        track: String,
    },
    /// A remote subscriber needs a keyframe of a local track.
    KeyframeRequest {
        track: String,
    },
    Chat {
        from: String,
        text: String,
    },
}

/// Rooms opening and closing on this node: the trunk adapter opens and
/// closes its room interest from these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomEvent {
    Opened(RoomName),
    Closed(RoomName),
}

/// A remote node's membership of one room. Dropping it detaches: the
/// remote participants and tracks it brought leave the room.
pub struct RemoteLink {
    pub(crate) key: u64,
    pub(crate) commands: Commands,
    pub(crate) control: mpsc::UnboundedReceiver<RemoteEvent>,
    pub(crate) media: mpsc::Receiver<RemoteEvent>,
}

impl RemoteLink {
    pub fn send(&self, cmd: RemoteCommand) {
        self.commands.remote(self.key, cmd);
    }

    /// A handle that sends commands for this link from elsewhere (another
    /// task), straight into the worker's queue. Commands sent after the
    /// link is dropped are ignored.
    pub fn sender(&self) -> RemoteSender {
        RemoteSender {
            key: self.key,
            commands: self.commands.clone(),
        }
    }

    /// Next event for the remote node; `None` once the link has ended (the
    /// room closed or the media plane stopped). Control events come before
    /// queued media.
    pub async fn recv(&mut self) -> Option<RemoteEvent> {
        tokio::select! {
            biased;
            // Control closes only when the worker dropped the link; media
            // still queued is of no use then.
            e = self.control.recv() => e,
            Some(m) = self.media.recv() => Some(m),
        }
    }
}

/// Sends commands for one [`RemoteLink`] (see [`RemoteLink::sender`]).
#[derive(Clone)]
pub struct RemoteSender {
    key: u64,
    commands: Commands,
}

impl RemoteSender {
    pub fn send(&self, cmd: RemoteCommand) {
        self.commands.remote(self.key, cmd);
    }
}

impl Drop for RemoteLink {
    fn drop(&mut self) {
        self.commands.detach(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_info_round_trips_through_str0m() {
        let info = CodecInfo {
            mime_type: "video/H264".into(),
            clock_rate: 90_000,
            channels: None,
            payload_type: 102,
            fmtp: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f".into(),
        };
        let p = info.to_params().expect("H264 is forwardable");
        assert_eq!(*p.pt(), 102);
        assert_eq!(p.spec().codec, Codec::H264);
        let back = CodecInfo::from_params(&p);
        assert_eq!(back.mime_type, "video/H264");
        assert_eq!(back.clock_rate, 90_000);
        assert_eq!(back.to_params(), Some(p));
    }

    #[test]
    fn unknown_codecs_are_refused_not_guessed() {
        for mime in ["video/nonsense", "", "audio/rtx", "opus"] {
            let info = CodecInfo {
                mime_type: mime.into(),
                clock_rate: 48_000,
                channels: Some(2),
                payload_type: 111,
                fmtp: String::new(),
            };
            assert_eq!(info.to_params(), None, "{mime}");
        }
        let zero_rate = CodecInfo {
            mime_type: "audio/opus".into(),
            clock_rate: 0,
            channels: Some(2),
            payload_type: 111,
            fmtp: String::new(),
        };
        assert_eq!(zero_rate.to_params(), None);
    }
}
