//! The admin surface: `/api/status` and `/metrics` only for loopback
//! clients, the bearer of `--admin-token`, or on the `--admin-bind`
//! listener; the probes stay public; `/ws` refuses pages of foreign origins.
//!
//! Every client of a test is on loopback. The loopback exemption is a
//! setting (`admin_allow_loopback`, also what a same-host reverse proxy
//! needs turned off), so turning it off makes these clients stand for any
//! remote client: the token path is exercised for real.

mod common;
mod wsclient;

use std::net::SocketAddr;

use serde_json::json;
use switchboard::config::Secret;
use switchboard::{Config, Node};
use tokio_tungstenite::tungstenite;
use wsclient::*;

const ADMIN: &str = "admin-token-for-tests";

use common::start;

/// A node that treats its (loopback) clients as remote.
async fn locked_node(admin_bind: Option<SocketAddr>) -> Node {
    start(Config {
        admin_allow_loopback: false,
        admin_token: Some(Secret(ADMIN.into())),
        admin_bind,
        ..Default::default()
    })
    .await
}

fn refused(body: &str, reason: &str) -> u64 {
    sample(
        body,
        &format!("switchboard_http_refused_total{{reason=\"{reason}\"}}"),
    )
}

#[tokio::test]
async fn loopback_clients_read_status_and_metrics_by_default() {
    let node = start(Config::default()).await;
    for path in ["/api/status", "/metrics", "/healthz", "/readyz"] {
        assert_eq!(http(node.http_addr(), path, &[]).await.0, 200, "{path}");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn remote_clients_need_the_admin_token() {
    let node = locked_node(None).await;
    let addr = node.http_addr();
    let bearer = format!("Bearer {ADMIN}");
    for path in ["/api/status", "/metrics"] {
        let (status, _) = http(addr, path, &[]).await;
        assert_eq!(status, 401, "{path} without a token");
        let (status, _) = http(addr, path, &[("Authorization", "Bearer wrong-token")]).await;
        assert_eq!(status, 401, "{path} with a wrong token");
        let (status, _) = http(addr, path, &[("Authorization", &format!("Basic {ADMIN}"))]).await;
        assert_eq!(status, 401, "{path} with another scheme");
        let (status, body) = http(addr, path, &[("Authorization", &bearer)]).await;
        assert_eq!(status, 200, "{path} with the token: {body}");
    }
    let (_, status) = http(addr, "/api/status", &[("Authorization", &bearer)]).await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["node"]["auth"], false);
    assert_eq!(status["node"]["tls"], false);
    // Probes and the page stay public.
    for path in ["/healthz", "/readyz", "/"] {
        assert_eq!(http(addr, path, &[]).await.0, 200, "{path}");
    }
    let (_, metrics) = http(addr, "/metrics", &[("Authorization", &bearer)]).await;
    assert_eq!(refused(&metrics, "admin_unauthorized"), 6, "{metrics}");
    assert!(metrics.ends_with("# EOF\n"), "still one valid exposition");
    node.shutdown().await;
}

#[tokio::test]
async fn the_admin_listener_serves_status_and_metrics_without_the_token() {
    let node = locked_node(Some("127.0.0.1:0".parse().unwrap())).await;
    let admin = node.admin_addr().expect("an admin listener");
    assert_ne!(admin, node.http_addr());
    for path in ["/api/status", "/metrics", "/healthz", "/readyz"] {
        assert_eq!(
            http(admin, path, &[]).await.0,
            200,
            "{path} on the admin listener"
        );
    }
    // Only those: no page, no signaling there.
    assert_eq!(http(admin, "/", &[]).await.0, 404);
    assert!(connect(admin, None).await.is_err());
    // The main port still guards them.
    assert_eq!(http(node.http_addr(), "/api/status", &[]).await.0, 401);
    node.shutdown().await;
}

#[tokio::test]
async fn without_a_token_configured_remote_clients_get_nothing() {
    let node = start(Config {
        admin_allow_loopback: false,
        ..Default::default()
    })
    .await;
    let (status, _) = http(
        node.http_addr(),
        "/metrics",
        &[("Authorization", "Bearer ")],
    )
    .await;
    assert_eq!(status, 401);
    node.shutdown().await;
}

fn http_status(e: tungstenite::Error) -> u16 {
    match e {
        tungstenite::Error::Http(resp) => resp.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

#[tokio::test]
async fn a_foreign_origin_cannot_open_signaling() {
    let node = start(Config {
        allowed_origins: vec!["https://app.example".into()],
        ..Default::default()
    })
    .await;
    let addr = node.http_addr();
    for foreign in ["https://evil.example", "null", "http://127.0.0.1:1"] {
        let e = connect(addr, Some(foreign)).await.expect_err(foreign);
        assert_eq!(http_status(e), 403, "{foreign}");
    }
    // The node's own page, a listed origin, and non-browser clients (no
    // Origin) are let in and can join.
    let own = format!("http://{addr}");
    for origin in [Some(own.as_str()), Some("https://app.example"), None] {
        let mut w = connect(addr, origin)
            .await
            .unwrap_or_else(|e| panic!("{origin:?}: {e}"));
        send(&mut w, json!({"type":"join","room":"o","name":"n"})).await;
        recv_type(&mut w, "joined").await;
    }
    let (_, metrics) = http(addr, "/metrics", &[]).await;
    assert_eq!(refused(&metrics, "origin"), 3, "{metrics}");
    node.shutdown().await;
}

#[tokio::test]
async fn by_default_only_the_nodes_own_origin_is_allowed() {
    let node = start(Config::default()).await;
    let addr = node.http_addr();
    let e = connect(addr, Some("https://app.example")).await.err();
    assert_eq!(http_status(e.expect("refused")), 403);
    let own = format!("http://{addr}");
    assert!(connect(addr, Some(&own)).await.is_ok());
    // The host as the page saw it, even when spelled in another case.
    let own_upper = format!("HTTP://{}", addr.to_string().to_uppercase());
    assert!(connect(addr, Some(&own_upper)).await.is_ok());
    node.shutdown().await;
}
