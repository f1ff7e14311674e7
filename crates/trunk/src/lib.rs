//! The trunk: node-to-node server transport (see DESIGN.md, "The trunk protocol").
//!
//! [`proto`] is the whole protocol as a sans-IO state machine: no sockets, no
//! async runtime and no clock. The driver feeds it bytes and time and executes
//! what it asks for; that is what lets `tests/sim/` run thousands of
//! deterministic multi-node schedules per second.

pub mod proto;

/// The I/O driver over QUIC (feature `quic`, on by default).
#[cfg(feature = "quic")]
pub mod quic;
