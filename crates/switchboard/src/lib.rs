//! The `switchboard` node: configuration, HTTP (web client, WebSocket
//! signaling, health, metrics, status) and graceful shutdown, wired around
//! the media plane (`sfu`). The binary (`main.rs`) only parses the config,
//! sets up logging and waits for a signal; tests start nodes in-process.

mod cluster;
pub mod config;
mod http;
mod metrics;
mod web;
mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use sfu::{Sfu, SfuConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

pub use config::{Config, LogFormat};

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
}

/// A running node.
pub struct Node {
    state: Arc<AppState>,
    /// Tells sessions the node is going away.
    shutdown_tx: watch::Sender<bool>,
    /// Stops the HTTP listener; sent only once the sessions are gone, so
    /// `/readyz` answers 503 (rather than connection refused) meanwhile.
    http_stop: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
}

impl Node {
    /// Bind HTTP and media and start serving.
    pub async fn start(config: Config) -> anyhow::Result<Node> {
        let sfu = Sfu::start(SfuConfig {
            bind: config.bind,
            media_port: config.media_port,
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
            config,
            http_addr,
            cluster,
            status_cache: tokio::sync::Mutex::new(None),
            status_builds: AtomicU64::new(0),
        });
        let app = http::router(state.clone());
        let (http_stop, mut stop) = watch::channel(false);
        let server = tokio::spawn(async move {
            let graceful = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(graceful)
                .await
            {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        info!(
            http = %http_addr,
            media = %state.sfu.media_addr(),
            "switchboard node ready at http://{http_addr}/"
        );
        Ok(Node {
            state,
            shutdown_tx,
            http_stop,
            server: Some(server),
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.state.http_addr
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
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(DRAIN_LIMIT, server).await;
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
