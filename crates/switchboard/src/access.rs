//! Who may reach what over HTTP: the admin endpoints (`/api/status`,
//! `/metrics`) and the browsers' `Origin` on `/ws`.
//!
//! Status lists every room with its participants' names, and metrics tell
//! who is busy: on the main port they are answered for loopback clients
//! (an operator on the host, unless `--admin-allow-loopback false`) and for
//! requests carrying `Authorization: Bearer <--admin-token>`; everyone
//! else gets 401. `--admin-bind` serves them on a separate listener,
//! without the check, for a scraper on a private network.
//!
//! A page on another site can open a WebSocket to any host its visitor
//! reaches (browsers do not apply CORS to WebSockets), so `/ws` checks the
//! `Origin` header browsers always send: the node's own origin, and those
//! of `--allowed-origins`, pass. Clients that are not browsers send none
//! and are not refused (they could forge any Origin anyway).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;

/// Requests refused by the checks here.
#[derive(Debug, Default)]
pub struct AccessMetrics {
    /// `/api/status` or `/metrics` without loopback or the admin token.
    pub admin_unauthorized: AtomicU64,
    /// `/ws` from a page of a foreign origin.
    pub origin_refused: AtomicU64,
}

/// Middleware of the admin routes on the main listener.
pub(crate) async fn admin_guard(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    if admin_allowed(&state, peer, req.headers()) {
        return next.run(req).await;
    }
    state
        .access
        .admin_unauthorized
        .fetch_add(1, Ordering::Relaxed);
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            "Bearer realm=\"switchboard admin\"",
        )],
        "status and metrics need Authorization: Bearer <admin token>, or the admin listener\n",
    )
        .into_response()
}

fn admin_allowed(state: &AppState, peer: Option<SocketAddr>, headers: &HeaderMap) -> bool {
    let loopback = peer.is_some_and(|p| p.ip().to_canonical().is_loopback());
    if loopback && state.config.admin_allow_loopback {
        return true;
    }
    let Some(expected) = &state.config.admin_token else {
        return false;
    };
    bearer(headers).is_some_and(|given| constant_time_eq(given.as_bytes(), expected.0.as_bytes()))
}

/// The credentials of `Authorization: Bearer <token>` (scheme in any case).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Equality whose time does not depend on where the inputs differ, so the
/// admin token cannot be found byte by byte from response times (its
/// length can; it is not the secret part).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The 403 to send when a browser page of a foreign origin opens `/ws`
/// (counted); `None` to go on.
pub(crate) fn origin_refusal(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let origin = headers.get(header::ORIGIN)?;
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let allowed = origin
        .to_str()
        .is_ok_and(|o| origin_allowed(o, host, &state.config.allowed_origins));
    if allowed {
        return None;
    }
    state.access.origin_refused.fetch_add(1, Ordering::Relaxed);
    Some(
        (
            StatusCode::FORBIDDEN,
            "this origin may not open signaling here (see --allowed-origins)\n",
        )
            .into_response(),
    )
}

/// `origin` (`scheme://host[:port]`) is the node's own — its host and port
/// are the request's `Host` — or one of `allowed` (`*` = any). Only the
/// host and port are compared for the own origin, not the scheme: behind a
/// TLS-terminating proxy the page is `https://` while the node speaks HTTP.
fn origin_allowed(origin: &str, host: Option<&str>, allowed: &[String]) -> bool {
    let Some((scheme, authority)) = split_origin(origin) else {
        // `null` (sandboxed frames, file: pages) and anything malformed.
        return false;
    };
    if let Some(host) = host
        && strip_default_port(scheme, authority)
            .eq_ignore_ascii_case(strip_default_port(scheme, host.trim()))
    {
        return true;
    }
    allowed.iter().any(|a| {
        let a = a.trim().trim_end_matches('/');
        a == "*"
            || split_origin(a).is_some_and(|(s, auth)| {
                s.eq_ignore_ascii_case(scheme)
                    && strip_default_port(s, auth)
                        .eq_ignore_ascii_case(strip_default_port(scheme, authority))
            })
    })
}

/// `("https", "host:port")` of a serialized origin; nothing after the authority.
fn split_origin(origin: &str) -> Option<(&str, &str)> {
    let (scheme, authority) = origin.split_once("://")?;
    let ok = !scheme.is_empty()
        && !authority.is_empty()
        && !authority.contains(['/', '?', '#', '@', ' ']);
    ok.then_some((scheme, authority))
}

/// Browsers leave the scheme's default port out of `Origin`; a client may
/// still write it in `Host`.
fn strip_default_port<'a>(scheme: &str, authority: &'a str) -> &'a str {
    let default = if scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("wss") {
        ":443"
    } else {
        ":80"
    };
    authority.strip_suffix(default).unwrap_or(authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_origin_and_listed_origins_pass() {
        let none: &[String] = &[];
        assert!(origin_allowed(
            "http://127.0.0.1:3000",
            Some("127.0.0.1:3000"),
            none
        ));
        assert!(origin_allowed(
            "https://Call.Example",
            Some("call.example:443"),
            none
        ));
        assert!(origin_allowed(
            "https://call.example",
            Some("call.example"),
            none
        ));
        assert!(!origin_allowed(
            "https://evil.example",
            Some("call.example"),
            none
        ));
        assert!(!origin_allowed(
            "http://127.0.0.1:3001",
            Some("127.0.0.1:3000"),
            none
        ));
        assert!(!origin_allowed("null", Some("127.0.0.1:3000"), none));
        assert!(!origin_allowed(
            "https://a.example/path",
            Some("a.example/path"),
            none
        ));
        assert!(!origin_allowed("https://a.example", None, none));
        let list = [
            "https://app.example/".to_owned(),
            "http://x.test:8080".to_owned(),
        ];
        assert!(origin_allowed(
            "https://app.example",
            Some("node:3000"),
            &list
        ));
        assert!(origin_allowed(
            "https://app.example:443",
            Some("node:3000"),
            &list
        ));
        assert!(
            !origin_allowed("http://app.example", Some("node:3000"), &list),
            "scheme counts"
        );
        assert!(origin_allowed(
            "http://x.test:8080",
            Some("node:3000"),
            &list
        ));
        assert!(origin_allowed("https://anything", None, &["*".to_owned()]));
    }

    #[test]
    fn bearer_and_comparison() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "bearer  s3cret ".parse().unwrap());
        assert_eq!(bearer(&h), Some("s3cret"));
        h.insert(header::AUTHORIZATION, "Basic s3cret".parse().unwrap());
        assert_eq!(bearer(&h), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
