//! `/metrics`: Prometheus (OpenMetrics) text, via `prometheus-client`.
//!
//! The media plane keeps plain atomics; they are read at scrape time by a
//! collector rather than mirrored into registered metrics, so the hot path
//! never touches the metrics library.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use sfu::SfuMetrics;
use signal::ErrorCode;

use crate::AppState;

/// Counters of the signaling layer.
#[derive(Debug, Default)]
pub(crate) struct SignalingMetrics {
    errors: Mutex<BTreeMap<&'static str, u64>>,
    pub rate_limited: AtomicU64,
}

impl SignalingMetrics {
    pub fn error(&self, code: ErrorCode) {
        if let Ok(mut m) = self.errors.lock() {
            *m.entry(code.as_str()).or_default() += 1;
        }
    }
}

#[derive(Debug)]
struct Snapshot {
    gauges: Vec<(&'static str, &'static str, i64)>,
    counters: Vec<(&'static str, &'static str, u64)>,
    errors: Vec<(&'static str, u64)>,
    /// Per peer node: (node id, link up, RTT in seconds if measured).
    trunks: Vec<(String, i64, Option<f64>)>,
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        for (name, help, v) in &self.gauges {
            let g = ConstGauge::new(*v);
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        for (name, help, v) in &self.counters {
            let c = ConstCounter::new(*v);
            c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let kind = ConstCounter::new(0u64).metric_type();
        let mut family = enc.encode_descriptor(
            "switchboard_signaling_errors",
            "Error replies sent to browsers, by code",
            None,
            kind,
        )?;
        for (code, v) in &self.errors {
            let labels = [("code", *code)];
            ConstCounter::new(*v).encode(family.encode_family(&labels)?)?;
        }
        if !self.trunks.is_empty() {
            let kind = ConstGauge::new(0i64).metric_type();
            let mut up = enc.encode_descriptor(
                "switchboard_trunk_up",
                "1 while the trunk to this peer node is up",
                None,
                kind,
            )?;
            for (node, v, _) in &self.trunks {
                let labels = [("peer", node.as_str())];
                ConstGauge::new(*v).encode(up.encode_family(&labels)?)?;
            }
            let kind = ConstGauge::new(0.0f64).metric_type();
            let mut rtt = enc.encode_descriptor(
                "switchboard_trunk_rtt_seconds",
                "Round-trip time to the peer node (heartbeat)",
                None,
                kind,
            )?;
            for (node, _, r) in &self.trunks {
                if let Some(r) = r {
                    let labels = [("peer", node.as_str())];
                    ConstGauge::new(*r).encode(rtt.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn render(
    state: &AppState,
    trunk: Option<trunk::quic::TrunkStatus>,
) -> Result<String, std::fmt::Error> {
    let m = state.sfu.metrics();
    let g = |v: &AtomicU64| SfuMetrics::get(v);
    let snapshot = Snapshot {
        gauges: vec![
            (
                "switchboard_participants",
                "Participants on this node",
                g(&m.participants) as i64,
            ),
            (
                "switchboard_rooms",
                "Rooms open on this node",
                g(&m.rooms) as i64,
            ),
            (
                "switchboard_tracks",
                "Published tracks on this node",
                g(&m.tracks) as i64,
            ),
            (
                "switchboard_ws_connections",
                "Open signaling WebSockets",
                *state.ws_connections.borrow() as i64,
            ),
            (
                "switchboard_ready",
                "1 while accepting participants",
                state.ready.load(Ordering::Relaxed) as i64,
            ),
        ],
        counters: vec![
            (
                "switchboard_rtp_packets_in",
                "RTP packets received from publishers",
                g(&m.rtp_packets_in),
            ),
            (
                "switchboard_rtp_bytes_in",
                "RTP payload bytes received from publishers",
                g(&m.rtp_bytes_in),
            ),
            (
                "switchboard_rtp_packets_out",
                "RTP packets forwarded to subscribers",
                g(&m.rtp_packets_out),
            ),
            (
                "switchboard_rtp_bytes_out",
                "RTP payload bytes forwarded to subscribers",
                g(&m.rtp_bytes_out),
            ),
            (
                "switchboard_keyframe_requests",
                "Keyframe requests sent to publishers",
                g(&m.keyframe_requests_sent),
            ),
            (
                "switchboard_participants_reaped",
                "Participants removed because their media died",
                g(&m.participants_reaped),
            ),
            (
                "switchboard_udp_dropped",
                "UDP datagrams dropped (unknown sender, send failure)",
                g(&m.udp_packets_dropped),
            ),
            (
                "switchboard_remote_media_dropped",
                "Media packets for other nodes dropped because a trunk link's queue was full",
                g(&m.remote_media_dropped),
            ),
            (
                "switchboard_ws_accepted",
                "Signaling WebSockets accepted",
                state.ws_total.load(Ordering::Relaxed),
            ),
            (
                "switchboard_signaling_rate_limited",
                "Signaling messages dropped by the rate limit",
                state.signaling.rate_limited.load(Ordering::Relaxed),
            ),
        ],
        errors: state
            .signaling
            .errors
            .lock()
            .map(|e| e.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default(),
        trunks: trunk
            .as_ref()
            .map(|t| {
                t.node
                    .peers
                    .iter()
                    .map(|(id, p)| {
                        (
                            id.0.to_string(),
                            i64::from(p.up),
                            p.rtt.map(|r| r.as_secs_f64()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
    };
    let mut snapshot = snapshot;
    if let Some(t) = &trunk {
        let tm = &t.metrics;
        snapshot.counters.extend([
            (
                "switchboard_trunk_frames_in",
                "Trunk control frames received",
                tm.frames_in,
            ),
            (
                "switchboard_trunk_frames_out",
                "Trunk control frames sent",
                tm.frames_out,
            ),
            (
                "switchboard_trunk_datagrams_in",
                "Trunk media datagrams received",
                tm.datagrams_in,
            ),
            (
                "switchboard_trunk_datagrams_out",
                "Trunk media datagrams sent",
                tm.datagrams_out,
            ),
            (
                "switchboard_trunk_stale_drops",
                "Room-scoped trunk messages dropped for a stale generation",
                tm.stale_drops,
            ),
            (
                "switchboard_trunk_unknown_wire_drops",
                "Trunk datagrams or messages for an unknown wire id",
                tm.unknown_wire_drops,
            ),
            (
                "switchboard_trunk_protocol_errors",
                "Trunk frames that broke the protocol (trunk closed)",
                tm.protocol_errors,
            ),
            (
                "switchboard_trunk_link_ups",
                "Trunk links that came up",
                tm.link_ups,
            ),
            (
                "switchboard_trunk_link_downs",
                "Trunk links that went down",
                tm.link_downs,
            ),
            (
                "switchboard_trunk_datagrams_too_large",
                "Media packets too large for a trunk's path",
                t.driver.datagrams_too_large,
            ),
            (
                "switchboard_trunk_media_queue_drops",
                "Media packets for the trunk dropped because its queue was full",
                t.driver.media_queue_drops,
            ),
            (
                "switchboard_trunk_handshakes_failed",
                "Incoming trunk handshakes that failed (unauthenticated nodes, garbage)",
                t.driver.handshakes_failed,
            ),
        ]);
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}
