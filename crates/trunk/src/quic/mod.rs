//! The QUIC driver of the trunk (DESIGN: "One connection per node pair"):
//! quinn endpoints, dialing and accepting, mutual TLS from the cluster
//! secret, the control stream and media datagrams, timers. All protocol
//! decisions are made by [`crate::proto::Node`]; this module only moves
//! bytes and time in and effects out.

mod conn_io;
mod driver;
mod gate;
pub mod identity;

pub use driver::{
    Congestion, DriverMetrics, PathStatus, Trunk, TrunkConfig, TrunkError, TrunkEvent, TrunkEvents,
    TrunkStatus, Tuning,
};
pub use identity::{
    ALPN, Identity, IdentityError, MIN_SECRET_BITS, NODE_URI_PREFIX, cert_node_id, check_secret,
    generate_secret, node_uri,
};
