//! The track directory: what this node publishes (local rooms) and what it
//! has learned from each peer for rooms where the room link is up.

use super::ratelimit::RateLimiter;
use super::repair::{RecvRepair, SendHistory};
use super::types::{
    ConnId, Generation, Layer, NodeId, ParticipantId, ParticipantInfo, RoomName, TrackId,
    TrackInfo, TrackKind, WireId,
};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// A room with at least one local participant.
#[derive(Debug)]
pub(crate) struct LocalRoom {
    pub generation: Generation,
    pub participants: BTreeMap<ParticipantId, ParticipantInfo>,
    pub tracks: BTreeMap<TrackId, LocalTrack>,
}

impl LocalRoom {
    pub fn new(generation: Generation) -> Self {
        Self {
            generation,
            participants: BTreeMap::new(),
            tracks: BTreeMap::new(),
        }
    }
}

/// A track published by a local participant.
#[derive(Debug)]
pub(crate) struct LocalTrack {
    pub wire_id: WireId,
    pub info: TrackInfo,
    /// Which peers want which layers: media goes only there.
    pub subscribers: BTreeMap<NodeId, BTreeSet<Layer>>,
    pub keyframes: RateLimiter,
}

impl LocalTrack {
    pub fn new(wire_id: WireId, info: TrackInfo, keyframe_interval: Duration) -> Self {
        Self {
            wire_id,
            info,
            subscribers: BTreeMap::new(),
            keyframes: RateLimiter::new(keyframe_interval),
        }
    }
}

/// What a peer told us about one room while the room link is up. Exists
/// only while both sides have the room open ("no orphans").
#[derive(Debug, Default)]
pub(crate) struct RemoteRoom {
    pub participants: BTreeMap<ParticipantId, ParticipantInfo>,
    pub tracks: BTreeMap<WireId, RemoteTrack>,
}

/// A track announced by its origin.
#[derive(Debug)]
pub(crate) struct RemoteTrack {
    pub info: TrackInfo,
    /// Layers the local SFU subscribed to.
    pub layers: BTreeSet<Layer>,
    pub keyframes: RateLimiter,
}

/// The media fast path's view of a local track: kept apart from the room
/// directory so sending a packet is one hash lookup and no allocation.
#[derive(Debug)]
pub(crate) struct TrackMedia {
    pub wire_id: WireId,
    pub kind: TrackKind,
    /// Per layer, the (node, connection) pairs subscribed to it; rebuilt
    /// whenever a subscription or a link changes, never per packet.
    pub targets: Vec<(Layer, Vec<(NodeId, ConnId)>)>,
    /// What was sent, for retransmission (every track: browsers do not
    /// NACK audio, so a trunk loss would otherwise always be concealed).
    pub history: SendHistory,
}

/// The receive side's view of one remote wire id (up room links only).
#[derive(Debug)]
pub(crate) struct WireIn {
    pub room: RoomName,
    /// Gap detection and NACKs, while the local SFU subscribes to the
    /// track; `None` otherwise.
    pub repair: Option<RecvRepair>,
}
