//! Identifiers and descriptions shared by every part of the protocol.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Stable identity of a node (from configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

/// Random value drawn at every start of a node; a new one in a Hello means
/// the peer restarted and everything it taught us is void.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Incarnation(pub u64);

/// Names one lifetime of a room on one node; bumped on every local open.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Generation(pub u64);

/// Per-trunk number an origin assigns to a local track; the datagram header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WireId(pub u32);

/// The local SFU's handle for one of its tracks (never sent on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TrackId(pub u64);

/// A participant, unique within its origin node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ParticipantId(pub u64);

/// A simulcast layer index (0 = lowest, or the only one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Layer(pub u8);

/// The driver's handle for one connection; assigned by the driver, unique
/// for the lifetime of a [`super::Node`]. Needed because an accepted
/// connection has no known [`NodeId`] until its Hello arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// Both generations a room-scoped message belongs to: the sender's current
/// one (`from`) and the receiver's as last announced to the sender (`to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Gens {
    pub from: Generation,
    pub to: Generation,
}

/// A validated room name: 1–64 characters of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RoomName(String);

/// Why a string is not a valid [`RoomName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomNameError {
    #[error("room name must be 1-64 characters, got {0}")]
    Length(usize),
    #[error("room name may only contain A-Z a-z 0-9 . _ -")]
    Character,
}

impl RoomName {
    pub const MAX_LEN: usize = 64;

    pub fn new(name: impl Into<String>) -> Result<Self, RoomNameError> {
        let name = name.into();
        if name.is_empty() || name.len() > Self::MAX_LEN {
            return Err(RoomNameError::Length(name.len()));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(RoomNameError::Character);
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Validate on the way in too: a peer must not be able to smuggle a name the
/// local API would refuse.
impl<'de> Deserialize<'de> for RoomName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RoomName::new(s).map_err(serde::de::Error::custom)
    }
}

/// A participant as shown in every node's roster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantInfo {
    pub id: ParticipantId,
    pub display_name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TrackKind {
    Audio,
    Video,
}

/// What a receiving SFU needs to negotiate the track with its browsers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodecParams {
    /// e.g. `video/VP8`, `audio/opus`.
    pub mime_type: String,
    pub clock_rate: u32,
    pub channels: Option<u8>,
    pub payload_type: u8,
    /// SDP `a=fmtp` parameters, as given by the publisher.
    pub fmtp: String,
}

/// What a track shows, so receiving nodes lay it out like the origin does
/// (a screen share is not a camera tile).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TrackSource {
    Camera,
    Microphone,
    Screen,
    /// The audio of a screen share.
    ScreenAudio,
    Other,
}

/// One published track: who, what, how, and which simulcast layers exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackInfo {
    pub participant: ParticipantId,
    pub kind: TrackKind,
    pub source: TrackSource,
    pub codec: CodecParams,
    /// Simulcast layers (rids) in order lowest first; one entry if no simulcast.
    pub layers: Vec<String>,
}

/// Why a trunk is closed; sent in Goodbye and as the connection close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CloseCode {
    /// The node is shutting down.
    Shutdown,
    /// Another trunk between the same pair survives.
    Duplicate,
    /// The peer restarted (new incarnation) on another trunk.
    Replaced,
    /// Nothing heard for `heartbeat × misses`.
    Timeout,
    /// A malformed or unexpected frame.
    ProtocolError,
    /// Hello with another protocol version.
    Version,
    /// Hello from another cluster (or from ourselves: a self-dial).
    WrongCluster,
    /// A second live process claims this node id: the node already has a
    /// live trunk that answered a probe (or the Hello names the receiver's
    /// own id with another incarnation). Sent to the later one.
    NodeIdInUse,
    /// The Hello names a node id the connection's certificate does not
    /// (operator CA files: each node's certificate binds its id).
    NotCertified,
}

impl CloseCode {
    /// Numeric application close code for the QUIC CONNECTION_CLOSE.
    pub fn code(self) -> u32 {
        match self {
            CloseCode::Shutdown => 0,
            CloseCode::Duplicate => 1,
            CloseCode::Replaced => 2,
            CloseCode::Timeout => 3,
            CloseCode::ProtocolError => 4,
            CloseCode::Version => 5,
            CloseCode::WrongCluster => 6,
            CloseCode::NodeIdInUse => 7,
            CloseCode::NotCertified => 8,
        }
    }
}
