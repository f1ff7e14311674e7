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

/// A metric family with one value per peer node: name, help, (peer, value).
type PeerFamily<V> = (&'static str, &'static str, Vec<(String, V)>);

/// A gauge family with one label: name, help, label name, (label value, value).
type LabelledGauge = (
    &'static str,
    &'static str,
    &'static str,
    Vec<(&'static str, i64)>,
);

#[derive(Debug)]
struct Snapshot {
    gauges: Vec<(&'static str, &'static str, i64)>,
    counters: Vec<(&'static str, &'static str, u64)>,
    errors: Vec<(&'static str, u64)>,
    /// HTTP requests refused, by reason (`access.rs`).
    http_refused: Vec<(&'static str, u64)>,
    /// Per peer node: (node id, link up, RTT in seconds if measured).
    trunks: Vec<(String, i64, Option<f64>)>,
    /// Per-peer counter families.
    peer_counters: Vec<PeerFamily<u64>>,
    /// Per-peer gauge families.
    peer_gauges: Vec<PeerFamily<f64>>,
    /// Other gauge families with one label.
    labelled_gauges: Vec<LabelledGauge>,
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
        let mut refused = enc.encode_descriptor(
            "switchboard_http_refused",
            "HTTP requests refused: admin endpoints without loopback or the admin token, /ws from a foreign Origin",
            None,
            kind,
        )?;
        for (reason, v) in &self.http_refused {
            ConstCounter::new(*v).encode(refused.encode_family(&[("reason", *reason)])?)?;
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
        for (name, help, values) in &self.peer_counters {
            let kind = ConstCounter::new(0u64).metric_type();
            let mut family = enc.encode_descriptor(name, help, None, kind)?;
            for (peer, v) in values {
                let labels = [("peer", peer.as_str())];
                ConstCounter::new(*v).encode(family.encode_family(&labels)?)?;
            }
        }
        for (name, help, label, values) in &self.labelled_gauges {
            let kind = ConstGauge::new(0i64).metric_type();
            let mut family = enc.encode_descriptor(name, help, None, kind)?;
            for (value, v) in values {
                ConstGauge::new(*v).encode(family.encode_family(&[(*label, *value)])?)?;
            }
        }
        for (name, help, values) in &self.peer_gauges {
            let kind = ConstGauge::new(0.0f64).metric_type();
            let mut family = enc.encode_descriptor(name, help, None, kind)?;
            for (peer, v) in values {
                let labels = [("peer", peer.as_str())];
                ConstGauge::new(*v).encode(family.encode_family(&labels)?)?;
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
            (
                "switchboard_tcp_connections_open",
                "ICE-TCP media connections open (handshaking or carrying a participant's media)",
                g(&m.tcp_connections_open) as i64,
            ),
            (
                "switchboard_media_worker_up",
                "1 while the media worker thread runs",
                i64::from(state.sfu.is_running()),
            ),
            (
                "switchboard_tokio_tasks",
                "Tasks alive in the node's tokio runtime (a leak shows as growth after everyone left)",
                tokio::runtime::Handle::try_current()
                    .map_or(0, |h| h.metrics().num_alive_tasks() as i64),
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
                "switchboard_keyframe_cache_replays",
                "New subscriptions (here or on another node) started from a track's cached keyframe instead of a keyframe request",
                g(&m.gop_replays),
            ),
            (
                "switchboard_keyframe_cache_replayed_packets",
                "Packets those replays took",
                g(&m.gop_replayed_packets),
            ),
            (
                "switchboard_media_publish_refused",
                "m-lines the media plane ignored because the participant may not publish",
                g(&m.publish_refused),
            ),
            (
                "switchboard_status_builds",
                "Room listings /api/status asked of the media worker (requests within 250 ms share one)",
                state.status_builds.load(Ordering::Relaxed),
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
                "switchboard_tcp_connections_accepted",
                "ICE-TCP media connections accepted on the media port",
                g(&m.tcp_connections_accepted),
            ),
            (
                "switchboard_tcp_connections_refused",
                "ICE-TCP media connections refused or cut: over --max-tcp-connections or the per-participant cap, a first frame that is not a STUN binding request for a participant here, or none within the handshake deadline",
                g(&m.tcp_connections_refused),
            ),
            (
                "switchboard_tcp_frames_dropped",
                "ICE-TCP frames dropped: outgoing ones that did not fit a connection's bounded write queue (a slow reader), incoming ones the media engine could not take",
                g(&m.tcp_frames_dropped),
            ),
            (
                "switchboard_remote_media_dropped",
                "Media packets for other nodes dropped because a trunk link's queue was full",
                g(&m.remote_media_dropped),
            ),
            (
                "switchboard_media_panics",
                "str0m calls that panicked (that participant removed with error internal)",
                g(&m.media_panics),
            ),
            (
                "switchboard_remote_media_in_dropped",
                "Media packets from other nodes dropped because the media worker's queue was full",
                g(&m.remote_media_in_dropped),
            ),
            (
                "switchboard_trunk_adapter_media_dropped",
                "Local media for other nodes dropped on its way to the trunk adapter",
                state.cluster.as_ref().map_or(0, |c| c.adapter_drops()),
            ),
            (
                "switchboard_trunk_claims_refused",
                "Peer announcements refused: a participant another node (or this one) owns, or a removal, track or message for one the peer does not own, or over the per-room caps",
                state.cluster.as_ref().map_or(0, |c| c.claims_refused()),
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
        http_refused: vec![
            (
                "admin_unauthorized",
                state.access.admin_unauthorized.load(Ordering::Relaxed),
            ),
            (
                "origin",
                state.access.origin_refused.load(Ordering::Relaxed),
            ),
        ],
        peer_counters: Vec::new(),
        peer_gauges: Vec::new(),
        labelled_gauges: Vec::new(),
    };
    let mut snapshot = snapshot;
    if let Some(tls) = &state.tls {
        snapshot.counters.extend([
            (
                "switchboard_tls_reloads",
                "Times a new TLS certificate was loaded without a restart",
                tls.reloads.load(Ordering::Relaxed),
            ),
            (
                "switchboard_tls_reload_failures",
                "Reloads that failed (the previous certificate kept serving)",
                tls.reload_failures.load(Ordering::Relaxed),
            ),
        ]);
    }
    if let Some(d) = state.cluster.as_ref().and_then(|c| c.discovery()) {
        let m = &d.metrics;
        snapshot.counters.extend([
            (
                "switchboard_trunk_discovery_resolutions",
                "--peer-dns names resolved (an answer, possibly empty)",
                m.resolutions.load(Ordering::Relaxed),
            ),
            (
                "switchboard_trunk_discovery_failures",
                "--peer-dns resolutions that failed (the name's last addresses were kept)",
                m.failures.load(Ordering::Relaxed),
            ),
            (
                "switchboard_trunk_discovery_truncated",
                "Addresses (or SRV targets) left out because a --peer-dns name listed more than 64",
                m.truncated.load(Ordering::Relaxed),
            ),
        ]);
        // What became of each listed address, as the trunk core knows it.
        let (mut own, mut up, mut down) = (0, 0, 0);
        for a in trunk
            .iter()
            .flat_map(|t| t.node.dial_addrs.values())
            .filter(|a| a.listed)
        {
            match (a.is_self, a.node) {
                (true, _) => own += 1,
                (false, Some(n))
                    if trunk
                        .as_ref()
                        .is_some_and(|t| t.node.peers.get(&n).is_some_and(|p| p.up)) =>
                {
                    up += 1
                }
                _ => down += 1,
            }
        }
        snapshot.labelled_gauges.push((
            "switchboard_trunk_discovered_addresses",
            "Addresses the --peer-dns names list now: this node's own (self), a node with its trunk up (up), or not linked (down: not yet reached, unreachable, or reached only the other way)",
            "state",
            vec![("self", own), ("up", up), ("down", down)],
        ));
    }
    if let Some(t) = &trunk {
        let tm = &t.metrics;
        snapshot.gauges.push((
            "switchboard_trunk_connections",
            "Trunk QUIC connections open (handshaking or active; one per peer once settled)",
            t.node.connections as i64,
        ));
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
                "switchboard_trunk_open_floods",
                "Trunks cut because the peer re-opened rooms too fast or opened too many",
                tm.open_floods,
            ),
            (
                "switchboard_trunk_unknown_wire_drops",
                "Trunk datagrams or messages for an unknown wire id",
                tm.unknown_wire_drops,
            ),
            (
                "switchboard_trunk_foreign_data_drops",
                "Trunk chat/mute data naming a sender the peer did not announce in that room",
                tm.foreign_data_drops,
            ),
            (
                "switchboard_trunk_protocol_errors",
                "Trunk frames that broke the protocol (trunk closed)",
                tm.protocol_errors,
            ),
            (
                "switchboard_trunk_incarnation_probes",
                "Peers seen with a new incarnation while their trunk was live (old trunk probed: restart or duplicate id?)",
                tm.incarnation_probes,
            ),
            (
                "switchboard_trunk_node_id_conflicts",
                "Trunk connections refused because a second live node claimed a node id (a peer's or ours)",
                tm.node_id_conflicts,
            ),
            (
                "switchboard_trunk_identity_refused",
                "Trunk connections refused because the Hello named another node id than the certificate",
                tm.identity_refused,
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
                "switchboard_trunk_duplicates_closed",
                "Trunk connections closed because another one joined the same pair of nodes",
                tm.duplicates_closed,
            ),
            (
                "switchboard_trunk_self_dials",
                "Discovered addresses that turned out to be this node (not dialed again)",
                tm.self_dials,
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
            (
                "switchboard_trunk_datagrams_in_dropped",
                "Trunk datagrams dropped because the trunk core's queue was full",
                t.driver.datagrams_in_dropped,
            ),
            (
                "switchboard_trunk_media_events_dropped",
                "Remote media dropped because the adapter's queue was full",
                t.driver.media_events_dropped,
            ),
            (
                "switchboard_trunk_video_dropped_congestion",
                "Video packets not sent because a trunk lacked bandwidth (audio kept)",
                t.driver.video_dropped_congestion,
            ),
            (
                "switchboard_trunk_video_resumed",
                "Keyframes asked for when video fit on a trunk again",
                t.driver.video_resumed,
            ),
            (
                "switchboard_trunk_writer_overflows",
                "Trunks closed because the peer stopped reading its control stream",
                t.driver.writer_overflows,
            ),
        ]);
        let peers: Vec<(String, &trunk::proto::PeerMediaStats)> = t
            .node
            .peers
            .iter()
            .map(|(id, p)| (id.0.to_string(), &p.media))
            .collect();
        let per = |f: fn(&trunk::proto::PeerMediaStats) -> u64| {
            peers
                .iter()
                .map(|(id, m)| (id.clone(), f(m)))
                .collect::<Vec<_>>()
        };
        snapshot.peer_counters.extend([
            (
                "switchboard_trunk_media_datagrams_in",
                "Media datagrams accepted from the peer",
                per(|m| m.datagrams_in),
            ),
            (
                "switchboard_trunk_media_lost",
                "Packets of the peer's tracks seen missing on the trunk (gaps)",
                per(|m| m.lost),
            ),
            (
                "switchboard_trunk_media_repaired",
                "Missing packets later received (retransmitted or late)",
                per(|m| m.repaired),
            ),
            (
                "switchboard_trunk_media_given_up",
                "Missing packets given up (too late to be useful)",
                per(|m| m.given_up),
            ),
            (
                "switchboard_trunk_media_late_drops",
                "Media datagrams from the peer dropped for arriving after the lateness bound",
                per(|m| m.late_drops),
            ),
            (
                "switchboard_trunk_media_duplicates",
                "Packets from the peer received twice or after being given up: dropped",
                per(|m| m.duplicates),
            ),
            (
                "switchboard_trunk_nacks_sent",
                "NACK datagrams sent to the peer",
                per(|m| m.nacks_sent),
            ),
            (
                "switchboard_trunk_nacks_received",
                "NACK datagrams received from the peer",
                per(|m| m.nacks_received),
            ),
            (
                "switchboard_trunk_retransmits_sent",
                "Packets resent to the peer answering its NACKs",
                per(|m| m.retransmits_sent),
            ),
            (
                "switchboard_trunk_retransmits_missed",
                "Packets the peer NACKed that were no longer in the history",
                per(|m| m.retransmits_missed),
            ),
            (
                "switchboard_trunk_retransmits_refused",
                "NACKed packets refused (not subscribed, or over the peer's budget)",
                per(|m| m.retransmits_refused),
            ),
        ]);
        let paths: Vec<(String, trunk::quic::PathStatus)> = t
            .paths
            .iter()
            .map(|(id, p)| (id.0.to_string(), *p))
            .collect();
        let path = |f: fn(&trunk::quic::PathStatus) -> f64| {
            paths
                .iter()
                .map(|(id, p)| (id.clone(), f(p)))
                .collect::<Vec<_>>()
        };
        snapshot.peer_gauges.extend([
            (
                "switchboard_trunk_path_rtt_seconds",
                "QUIC's smoothed RTT of the trunk",
                path(|p| p.rtt.as_secs_f64()),
            ),
            (
                "switchboard_trunk_path_cwnd_bytes",
                "QUIC congestion window of the trunk",
                path(|p| p.cwnd as f64),
            ),
            (
                "switchboard_trunk_path_lost_packets",
                "QUIC packets lost on the trunk's current connection",
                path(|p| p.lost_packets as f64),
            ),
            (
                "switchboard_trunk_path_congestion_events",
                "QUIC congestion events on the trunk's current connection",
                path(|p| p.congestion_events as f64),
            ),
        ]);
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}
