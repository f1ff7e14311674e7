//! What a node hands out through its pull API: [`Transmit`] for the
//! driver (frames and closes, [`Node::poll_transmit`]) and [`Event`] for the
//! local SFU ([`Node::poll_event`]). Media datagrams have their own types in
//! `media.rs`, snapshots in `inspect.rs`.

#[cfg(doc)]
use super::Node;
use std::net::SocketAddr;

use crate::proto::types::{
    CloseCode, ConnId, Incarnation, Layer, NodeId, ParticipantId, ParticipantInfo, RoomName,
    TrackId, TrackInfo, WireId,
};

/// Something for the driver to send or do on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// Write these bytes (one or more complete frames) on the control stream.
    Frame { conn: ConnId, bytes: Vec<u8> },
    /// Close the connection with this code, after flushing earlier frames.
    /// The core has already forgotten it: do not report it lost.
    Close { conn: ConnId, code: CloseCode },
}

/// What happened, for the local SFU (and the driver, for `Redial`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    LinkUp {
        node: NodeId,
        incarnation: Incarnation,
    },
    LinkDown {
        node: NodeId,
        reason: CloseCode,
    },
    RemoteParticipantAdded {
        room: RoomName,
        node: NodeId,
        participant: ParticipantInfo,
    },
    RemoteParticipantRemoved {
        room: RoomName,
        node: NodeId,
        participant: ParticipantId,
    },
    RemoteTrackAdded {
        room: RoomName,
        node: NodeId,
        wire_id: WireId,
        track: TrackInfo,
    },
    /// Also implies every local subscription to it is gone.
    RemoteTrackRemoved {
        room: RoomName,
        node: NodeId,
        wire_id: WireId,
    },
    /// A peer wants this layer of a local track: start sending its media there.
    SubscribeRequested {
        room: RoomName,
        node: NodeId,
        track: TrackId,
        layer: Layer,
    },
    SubscribeCancelled {
        room: RoomName,
        node: NodeId,
        track: TrackId,
        layer: Layer,
    },
    /// Ask the publisher of this local track for a keyframe (already rate-limited).
    KeyframeRequested {
        room: RoomName,
        track: TrackId,
    },
    DataReceived {
        room: RoomName,
        node: NodeId,
        from: ParticipantId,
        payload: Vec<u8>,
    },
    /// Dial this node now; report with `handle_connected` or `handle_dial_failed`.
    Redial {
        node: NodeId,
    },
    /// Dial this discovered address now (whose it is, its Hello will say);
    /// report with `handle_connected_addr` or `handle_addr_dial_failed`.
    Dial {
        addr: SocketAddr,
    },
    /// A connection was refused for the node id its Hello claims (already
    /// closed, counted). For the driver's log, which knows the addresses;
    /// nothing for the SFU to do.
    Refused {
        conn: ConnId,
        node: NodeId,
        why: Refusal,
    },
}

/// Why a connection claiming a node id was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `node` has a live trunk, `live`, which answered our probe: a second
    /// process was started with the same id. The later one is refused
    /// (`CloseCode::NodeIdInUse`); the live trunk stays.
    NodeIdInUse { live: ConnId },
    /// The Hello names our own node id with another incarnation: another
    /// live process was started with our id (`CloseCode::NodeIdInUse`).
    OurNodeId,
    /// The certificate names `certified` (or no node id), not the Hello's
    /// (`CloseCode::NotCertified`).
    NotCertified { certified: Option<NodeId> },
}
