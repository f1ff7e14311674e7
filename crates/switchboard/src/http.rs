//! HTTP routes: the web client, `/ws`, health, metrics and status.
//!
//! Status and metrics sit behind [`access::admin_guard`] on the main
//! listener; the `--admin-bind` listener ([`admin_router`]) serves them
//! without it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::AppState;
use crate::access;
use crate::web;
use crate::ws;

/// The main listener: page, signaling, probes, and the guarded admin routes.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let admin = admin_routes().route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        access::admin_guard,
    ));
    Router::new()
        .route("/", get(index))
        .route("/r/{room}", get(room_page))
        .route("/ws", get(websocket))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(admin)
        .route("/{*path}", get(asset))
        .with_state(state)
}

/// The `--admin-bind` listener: status, metrics and the probes, unguarded.
pub(crate) fn admin_router(state: Arc<AppState>) -> Router {
    admin_routes()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

fn admin_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
}

async fn index() -> Response {
    web::page()
}

/// The call page; the script reads the room from the path (and validates it).
async fn room_page(Path(_room): Path<String>) -> Response {
    web::page()
}

async fn asset(Path(path): Path<String>) -> Response {
    web::asset(&path)
}

async fn websocket(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if let Some(refused) = access::origin_refusal(&state, &headers) {
        return refused;
    }
    ws::upgrade(state, upgrade)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if !state.ready.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else if !state.sfu.is_running() {
        (StatusCode::SERVICE_UNAVAILABLE, "media worker stopped\n").into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let trunk = match &state.cluster {
        Some(c) => c.status().await,
        None => None,
    };
    let body = crate::metrics::render(&state, trunk);
    match body {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The cluster as `/api/status` shows it: this node's id and trunk address,
/// and each known peer with its link state and RTT.
async fn trunks(state: &AppState) -> serde_json::Value {
    let Some(cluster) = &state.cluster else {
        return json!([]);
    };
    let Some(status) = cluster.status().await else {
        return json!([]);
    };
    status
        .node
        .peers
        .iter()
        .map(|(id, p)| {
            let m = &p.media;
            let path = status.paths.get(id);
            json!({
                "node_id": id.0,
                "up": p.up,
                "rtt_ms": p.rtt.map(|r| r.as_secs_f64() * 1000.0),
                "rooms": p.rooms.keys().map(|r| r.as_str()).collect::<Vec<_>>(),
                "media": {
                    "datagrams_in": m.datagrams_in,
                    "lost": m.lost,
                    "repaired": m.repaired,
                    "given_up": m.given_up,
                    "late_drops": m.late_drops,
                    "duplicates": m.duplicates,
                    "nacks_sent": m.nacks_sent,
                    "nack_seqs_sent": m.nack_seqs_sent,
                    "nacks_received": m.nacks_received,
                    "nack_seqs_received": m.nack_seqs_received,
                    "retransmits_sent": m.retransmits_sent,
                    "retransmits_missed": m.retransmits_missed,
                    "retransmits_refused": m.retransmits_refused,
                },
                "path": path.map(|p| json!({
                    "rtt_ms": p.rtt.as_secs_f64() * 1000.0,
                    "cwnd_bytes": p.cwnd,
                    "lost_packets": p.lost_packets,
                    "congestion_events": p.congestion_events,
                    "sent_packets": p.sent_packets,
                    "mtu": p.current_mtu,
                })),
            })
        })
        .collect()
}

/// `--peer-dns` as `/api/status` shows it: the names, and every address
/// the trunk core knows from them (`null` without `--peer-dns`).
async fn discovery(state: &AppState) -> serde_json::Value {
    let Some(cluster) = &state.cluster else {
        return serde_json::Value::Null;
    };
    let Some(d) = cluster.discovery() else {
        return serde_json::Value::Null;
    };
    let status = cluster.status().await;
    let addrs: Vec<serde_json::Value> = status
        .iter()
        .flat_map(|s| {
            s.node.dial_addrs.iter().map(|(addr, a)| {
                let up = a
                    .node
                    .and_then(|n| s.node.peers.get(&n))
                    .is_some_and(|p| p.up);
                json!({
                    "addr": addr.to_string(),
                    "listed": a.listed,
                    "node_id": a.node.map(|n| n.0),
                    "self": a.is_self,
                    "up": up,
                })
            })
        })
        .collect();
    json!({
        "names": d.names.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "addresses": addrs,
    })
}

/// How long `/api/status` reuses the rooms the media worker last listed.
/// Building them walks every room and roster on the worker thread, the one
/// that forwards media: without this, a client polling status in a loop
/// takes worker time from every call on the node.
const STATUS_REUSE: Duration = Duration::from_millis(250);

async fn status(State(state): State<Arc<AppState>>) -> Response {
    let rooms = {
        // Held across the worker call: concurrent requests wait for one
        // listing and share it.
        let mut cache = state.status_cache.lock().await;
        match &*cache {
            Some((at, rooms)) if at.elapsed() < STATUS_REUSE => rooms.clone(),
            _ => {
                let rooms = state.sfu.status().await.unwrap_or_default();
                state.status_builds.fetch_add(1, Ordering::Relaxed);
                *cache = Some((Instant::now(), rooms.clone()));
                rooms
            }
        }
    };
    let body = json!({
        "node": {
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": state.started.elapsed().as_secs(),
            "ready": state.ready.load(Ordering::SeqCst),
            "http": state.http_addr.to_string(),
            "tls": state.tls.is_some(),
            "auth": state.auth.is_some(),
            "media": state.sfu.media_addr().to_string(),
            "max_participants_per_room": state.config.max_participants_per_room,
            "participants": rooms.iter().map(|r| r.participants.len()).sum::<usize>(),
            "node_id": state.cluster.as_ref().map(|c| c.node_id()),
            "trunk": state.cluster.as_ref().map(|c| c.trunk_addr().to_string()),
        },
        "rooms": rooms,
        "trunks": trunks(&state).await,
        "discovery": discovery(&state).await,
    });
    axum::Json(body).into_response()
}
