//! The `switchboard` node: configuration, HTTP (web client, WebSocket
//! signaling, health, metrics, status) and graceful shutdown, wired around
//! the media plane (`sfu`). The binary (`main.rs`) only parses the config,
//! sets up logging and waits for a signal; tests start nodes in-process.

mod access;
pub mod auth;
mod cluster;
pub mod config;
mod discovery;
mod http;
mod metrics;
pub mod tls;
mod web;
mod ws;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use sfu::{Sfu, SfuConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

pub use config::{Cli, Command, Config, LogFormat, TokenArgs};
pub use tls::TlsError;

/// Longest a graceful shutdown waits for signaling sockets to close, and
/// then for the HTTP server to finish.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// State shared by every request handler.
pub(crate) struct AppState {
    pub sfu: Arc<Sfu>,
    pub ready: AtomicBool,
    pub started: Instant,
    /// Open signaling sockets; shutdown waits for it to reach 0.
    pub ws_connections: watch::Sender<u64>,
    pub ws_total: AtomicU64,
    pub signaling: metrics::SignalingMetrics,
    /// Flips to true when the node shuts down; every session watches it.
    pub shutdown: watch::Receiver<bool>,
    pub config: Config,
    pub http_addr: SocketAddr,
    /// The trunk side, if this node is in a cluster.
    pub cluster: Option<cluster::Cluster>,
    /// `/api/status`'s last room listing (see `http::STATUS_REUSE`), and
    /// how many listings the worker was asked for.
    pub status_cache: tokio::sync::Mutex<Option<(Instant, Vec<sfu::RoomStatus>)>>,
    pub status_builds: AtomicU64,
    /// Checks room access tokens; `None` without `--auth-secret` (open rooms).
    pub auth: Option<auth::Verifier>,
    /// The HTTPS certificate, if `--tls-cert`.
    pub tls: Option<Arc<tls::Tls>>,
    /// Admin and Origin refusals.
    pub access: access::AccessMetrics,
    /// Size limits of a client message, sized to the room limits.
    pub limits: signal::Limits,
}

/// What the operator should hear about at start: settings that leave the
/// node open or unusable beyond this machine. Warnings, not errors: both
/// are right for development on one machine.
pub fn startup_warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if config.auth_secret.is_none() {
        out.push(
            "no --auth-secret: rooms are open, anyone who reaches this node can join any room \
             (fine for development; set SWITCHBOARD_AUTH_SECRET and hand out `switchboard token`s)"
                .to_owned(),
        );
    }
    let clustered = config.cluster_secret.is_some() || config.trunk_ca.is_some();
    if !clustered && (!config.peers.is_empty() || !config.peer_dns.is_empty()) {
        out.push(
            "--peer/--peer-dns given but no --cluster-secret (or --trunk-ca): this node runs \
             alone and dials nobody"
                .to_owned(),
        );
    }
    if config.tls_cert.is_none() && !is_loopback(config.bind) {
        out.push(format!(
            "serving plain HTTP on {}, which is not loopback: browsers on other machines refuse \
             camera and microphone without HTTPS; give --tls-cert and --tls-key (or put a TLS proxy in front)",
            config.bind
        ));
    }
    if let Some(me) = config.node_id {
        for p in config.peers.iter().filter(|p| p.node_id == me) {
            out.push(format!(
                "--peer {me}@{} names this node's own id {me}: it is not dialed. If another node \
                 listens there, the two share one id; give every node its own --node-id",
                p.addr
            ));
        }
    }
    out
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// A running node.
pub struct Node {
    state: Arc<AppState>,
    /// Tells sessions the node is going away.
    shutdown_tx: watch::Sender<bool>,
    /// Stops the HTTP listeners; sent only once the sessions are gone, so
    /// `/readyz` answers 503 (rather than connection refused) meanwhile.
    http_stop: watch::Sender<bool>,
    /// The main listener's server, then the admin listener's, if any.
    servers: Vec<JoinHandle<()>>,
    admin_addr: Option<SocketAddr>,
}

/// Serve `app` on `listener` (over TLS if `tls`) until `stop` turns true,
/// then finish in-flight requests for up to [`DRAIN_LIMIT`]. axum-server
/// rather than `axum::serve`: one accept loop for plain and TLS, with the
/// handshake in each connection's own task (a slow handshake cannot hold
/// up accepting) and a swappable certificate.
fn serve(
    listener: std::net::TcpListener,
    app: axum::Router,
    tls: Option<axum_server::tls_rustls::RustlsConfig>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<JoinHandle<()>> {
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        let _ = stop.wait_for(|s| *s).await;
        stopper.graceful_shutdown(Some(DRAIN_LIMIT));
    });
    // The peer address (ConnectInfo) is what the admin check looks at.
    let make = app.into_make_service_with_connect_info::<SocketAddr>();
    // Not `http1_only()`: axum-server then serves connections without
    // upgrades, and `/ws` would never open. HTTP/1.1 is what TLS clients
    // get anyway (the ALPN offer, see `tls::build`).
    let server = axum_server::from_tcp(listener)?.handle(handle);
    Ok(tokio::spawn(async move {
        let result = match tls {
            Some(config) => {
                server
                    .acceptor(axum_server::tls_rustls::RustlsAcceptor::new(config))
                    .serve(make)
                    .await
            }
            None => server.serve(make).await,
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "HTTP server failed");
        }
    }))
}

impl Node {
    /// Bind HTTP and media and start serving.
    pub async fn start(config: Config) -> anyhow::Result<Node> {
        let auth = match &config.auth_secret {
            Some(secret) => Some(
                auth::Verifier::new(secret.0.as_bytes())
                    .context("--auth-secret (SWITCHBOARD_AUTH_SECRET)")?,
            ),
            None => None,
        };
        if config.admin_token.as_ref().is_some_and(|t| t.0.is_empty()) {
            anyhow::bail!("--admin-token is empty");
        }
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(
                tls::Tls::load(cert, key)
                    .await
                    .context("loading --tls-cert/--tls-key")?,
            )),
            (None, None) => None,
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        };
        for warning in startup_warnings(&config) {
            tracing::warn!("{warning}");
        }
        // Settings and files are checked above, before any port is taken.
        let sfu = Sfu::start(SfuConfig {
            bind: config.bind,
            media_port: config.media_port,
            tcp: config.media_tcp,
            max_tcp_connections: config.max_tcp_connections,
            tcp_handshake_timeout: sfu::DEFAULT_TCP_HANDSHAKE_TIMEOUT,
            public_ip: config.public_ip,
            max_participants_per_room: config.max_participants_per_room,
            max_rooms: config.max_rooms,
            max_tracks_per_participant: config.max_tracks_per_participant,
        })
        .context("starting the media plane")?;
        let listener = tokio::net::TcpListener::bind((config.bind, config.http_port))
            .await
            .with_context(|| format!("binding HTTP on {}:{}", config.bind, config.http_port))?;
        let http_addr = listener.local_addr()?;
        let admin_listener = match config.admin_bind {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the admin listener on {addr}"))?,
            ),
            None => None,
        };
        let admin_addr = admin_listener
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let sfu = Arc::new(sfu);
        let cluster = cluster::Cluster::start(&config, sfu.clone())?;
        if let Some(c) = &cluster {
            info!(node_id = c.node_id(), trunk = %c.trunk_addr(), "clustering");
        }
        let state = Arc::new(AppState {
            sfu,
            ready: AtomicBool::new(true),
            started: Instant::now(),
            ws_connections: watch::Sender::new(0),
            ws_total: AtomicU64::new(0),
            signaling: metrics::SignalingMetrics::default(),
            shutdown: shutdown_rx.clone(),
            http_addr,
            cluster,
            status_cache: tokio::sync::Mutex::new(None),
            status_builds: AtomicU64::new(0),
            auth,
            tls: tls.clone(),
            access: access::AccessMetrics::default(),
            limits: signal::Limits::for_rooms(
                config.max_participants_per_room,
                config.max_tracks_per_participant,
            ),
            config,
        });
        let (http_stop, stop) = watch::channel(false);
        let mut servers = vec![serve(
            listener.into_std()?,
            http::router(state.clone()),
            tls.as_ref().map(|t| t.acceptor_config()),
            stop.clone(),
        )?];
        if let Some(l) = admin_listener {
            servers.push(serve(
                l.into_std()?,
                http::admin_router(state.clone()),
                None,
                stop.clone(),
            )?);
            info!(admin = ?admin_addr, "admin listener (status, metrics) up");
        }
        if let Some(t) = &tls
            && state.config.tls_poll_secs > 0
        {
            let every = Duration::from_secs(state.config.tls_poll_secs);
            tokio::spawn(t.clone().watch(every, stop));
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        info!(
            http = %http_addr,
            media = %state.sfu.media_addr(),
            media_tcp = state.config.media_tcp,
            "switchboard node ready at {scheme}://{http_addr}/"
        );
        Ok(Node {
            state,
            shutdown_tx,
            http_stop,
            servers,
            admin_addr,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.state.http_addr
    }

    /// `https` with `--tls-cert`, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.state.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The `--admin-bind` listener's address, if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Re-read `--tls-cert`/`--tls-key` now (SIGHUP does this; the files are
    /// also polled). `Ok(true)`: new connections get the new certificate;
    /// `Ok(false)`: the files are unchanged or there is no TLS. Open
    /// connections keep theirs either way, and on an error the previous
    /// certificate keeps serving.
    pub async fn reload_tls(&self) -> Result<bool, TlsError> {
        match &self.state.tls {
            Some(t) => t.reload().await,
            None => Ok(false),
        }
    }

    pub fn media_addr(&self) -> SocketAddr {
        self.state.sfu.media_addr()
    }

    /// The trunk's UDP address, if this node is in a cluster.
    pub fn trunk_addr(&self) -> Option<SocketAddr> {
        self.state.cluster.as_ref().map(|c| c.trunk_addr())
    }

    /// The media plane (the trunk adapter attaches remote links to it).
    pub fn sfu(&self) -> &Arc<Sfu> {
        &self.state.sfu
    }

    /// Resolves if the media worker stops without a shutdown (a panic
    /// outside the guarded str0m calls): the node can no longer carry
    /// media. `/readyz` already answers 503 then; the binary logs it, stops
    /// gracefully and exits non-zero so a supervisor restarts it, rather
    /// than staying up half-dead. Never resolves while the worker runs.
    pub async fn media_failed(&self) {
        // The worker is a plain thread with nothing to await on; a check
        // every 250 ms costs nothing and bounds the reaction time.
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            if !self.state.sfu.is_running() && self.state.ready.load(Ordering::SeqCst) {
                self.state.ready.store(false, Ordering::SeqCst);
                return;
            }
        }
    }

    /// Resolves (with the reason) if a peer refused this node because
    /// another live node already uses its node id (DESIGN: two nodes with
    /// one id are refused loudly, never replace each other). The binary
    /// logs it, stops gracefully and exits non-zero: a configuration error
    /// that no restart fixes. Never resolves without a cluster.
    pub async fn node_id_in_use(&self) -> String {
        match &self.state.cluster {
            Some(c) => c.id_in_use().await,
            None => std::future::pending().await,
        }
    }

    /// Graceful stop: `/readyz` turns 503, every participant gets
    /// `error shutting_down` and its socket is closed, the media plane stops,
    /// and HTTP stops once the sockets are gone (or after [`DRAIN_LIMIT`]).
    pub async fn shutdown(mut self) {
        self.stop().await;
    }

    async fn stop(&mut self) {
        self.state.ready.store(false, Ordering::SeqCst);
        let _ = self.shutdown_tx.send(true);
        let sfu = self.state.sfu.clone();
        // Tells every participant `shutting_down` and ends their event
        // streams, so their sessions close; joins the worker thread, so keep
        // it off the async runtime.
        let _ = tokio::task::spawn_blocking(move || sfu.close()).await;
        // Then Goodbye to the other nodes: they drop our participants at once.
        if let Some(c) = &self.state.cluster {
            c.shutdown().await;
        }
        let mut open = self.state.ws_connections.subscribe();
        // Do not hang on a client that never completes the close handshake.
        if tokio::time::timeout(DRAIN_LIMIT, open.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            tracing::warn!(
                open = *open.borrow(),
                "signaling sockets still open after the drain limit"
            );
        }
        let _ = self.http_stop.send(true);
        for server in self.servers.drain(..) {
            // The servers themselves give up on connections after
            // DRAIN_LIMIT; this only bounds a server that does not return.
            let _ = tokio::time::timeout(DRAIN_LIMIT + Duration::from_secs(1), server).await;
        }
        info!("switchboard node stopped");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
        let _ = self.http_stop.send(true);
        self.state.sfu.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_rooms_and_plain_http_off_loopback_are_warned_about() {
        let dev = Config::default();
        let w = startup_warnings(&dev);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("rooms are open"));
        let exposed = Config {
            bind: "0.0.0.0".parse().unwrap(),
            auth_secret: Some(config::Secret("x".repeat(32))),
            ..Config::default()
        };
        let w = startup_warnings(&exposed);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("refuse camera and microphone"), "{w:?}");
        let with_tls = Config {
            tls_cert: Some("c.pem".into()),
            tls_key: Some("k.pem".into()),
            ..exposed.clone()
        };
        assert!(startup_warnings(&with_tls).is_empty());
        let v6_loopback = Config {
            bind: "::1".parse().unwrap(),
            ..exposed
        };
        assert!(startup_warnings(&v6_loopback).is_empty());
        let lonely = Config {
            peer_dns: vec!["peers.example:3002".parse().unwrap()],
            ..v6_loopback.clone()
        };
        let w = startup_warnings(&lonely);
        assert!(w.len() == 1 && w[0].contains("runs alone"), "{w:?}");
        let clustered = Config {
            cluster_secret: Some(config::Secret("x".repeat(16))),
            ..lonely
        };
        assert!(startup_warnings(&clustered).is_empty());
    }

    #[test]
    fn a_peer_named_with_our_own_id_is_warned_about() {
        let quiet = Config {
            auth_secret: Some(config::Secret("x".repeat(32))),
            // A clustered node (peers without a secret get their own warning).
            cluster_secret: Some(config::Secret("x".repeat(16))),
            node_id: Some(1),
            peers: vec!["2@127.0.0.1:3002".parse().unwrap()],
            ..Config::default()
        };
        assert!(startup_warnings(&quiet).is_empty());
        let same = Config {
            peers: vec!["1@127.0.0.1:3002".parse().unwrap()],
            ..quiet
        };
        let w = startup_warnings(&same);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("own id 1") && w[0].contains("--node-id"),
            "{w:?}"
        );
    }
}
