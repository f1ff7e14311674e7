//! The track directory: what this node publishes (local rooms) and what it
//! has learned from each peer for rooms where the room link is up.

use super::ratelimit::RateLimiter;
use super::types::{
    Generation, Layer, NodeId, ParticipantId, ParticipantInfo, TrackId, TrackInfo, WireId,
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

    pub fn track_by_wire(&mut self, wire_id: WireId) -> Option<(TrackId, &mut LocalTrack)> {
        self.tracks
            .iter_mut()
            .find(|(_, t)| t.wire_id == wire_id)
            .map(|(id, t)| (*id, t))
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
