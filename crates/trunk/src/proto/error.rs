//! Errors of the protocol core.

use super::types::RoomName;

/// Why bytes from the network could not be decoded. Every one closes the
/// trunk with a protocol error (frames) or drops the packet (datagrams).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame too short")]
    Truncated,
    #[error("frame of {0} bytes exceeds the maximum")]
    TooLarge(usize),
    #[error("unsupported protocol version {0}")]
    Version(u8),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("trailing bytes after message")]
    Trailing,
}

/// Misuse of the local API (by the SFU adapter), reported instead of panicking.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalError {
    #[error("room {0} is not open on this node")]
    RoomNotOpen(RoomName),
    #[error("room {0} is already open on this node")]
    RoomAlreadyOpen(RoomName),
    #[error("track already published")]
    TrackExists,
    #[error("unknown track")]
    UnknownTrack,
    #[error("unknown participant")]
    UnknownParticipant,
    #[error("payload of {0} bytes exceeds the maximum")]
    PayloadTooLarge(usize),
    #[error("participant already in the room")]
    ParticipantExists,
    #[error("node is shut down")]
    ShutDown,
}
