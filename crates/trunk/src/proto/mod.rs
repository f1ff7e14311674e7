//! Sans-IO core of the trunk protocol (see the trunk section of `docs/ARCHITECTURE.md`).
//!
//! Inputs are method calls on [`Node`] carrying a [`Time`]; outputs are values
//! pulled with [`Node::poll_transmit`], [`Node::poll_event`] and
//! [`Node::poll_timeout`]. Nothing here reads a clock, draws randomness on its
//! own or touches a socket, so a run is a pure function of its inputs.

mod directory;
mod error;
mod heartbeat;
mod link;
mod metrics;
mod node;
mod ratelimit;
pub mod repair;
mod time;
mod types;
pub mod wire;

pub use error::{DecodeError, LocalError};
pub use heartbeat::Heartbeat;
pub use metrics::Metrics;
#[cfg(feature = "planted-bugs")]
pub use node::PlantedBugs;
pub use node::{
    Config, DatagramOut, DialAddrSnapshot, Event, MediaTargets, Node, NodeSnapshot, PeerMediaStats,
    PeerSnapshot, Refusal, RemoteDatagram, Transmit,
};
pub use ratelimit::RateLimiter;
pub use repair::RepairConfig;
pub use time::Time;
pub use types::{
    CloseCode, CodecParams, ConnId, Generation, Gens, Incarnation, Layer, NodeId, ParticipantId,
    ParticipantInfo, RoomName, RoomNameError, TrackId, TrackInfo, TrackKind, TrackSource, WireId,
};
pub use wire::{Datagram, DatagramMessage, Message, PROTOCOL_VERSION};
