//! DNS discovery of trunk peers (`--peer-dns`).
//!
//! One tokio task resolves every configured name at start and then every
//! `--peer-dns-interval-secs`, and hands the union of what it found to the
//! trunk core (`Trunk::set_dial_addrs`), which dials each address, learns
//! node ids from the Hello, recognises this node's own address and forgets
//! addresses no longer listed once their trunk is down (see
//! `trunk::proto` `discover.rs`). Nothing here touches the media worker or
//! waits inside the trunk's core task: lookups run on this task, bounded in
//! time ([`LOOKUP_TIMEOUT`]) and in size ([`MAX_ADDRS_PER_NAME`]).
//!
//! What counts as what:
//! - an answer (possibly with no records: NXDOMAIN or NODATA, e.g. a
//!   Service with no pods yet) replaces the name's addresses;
//! - a failure (timeout, SERVFAIL, no server reachable) keeps the name's
//!   last addresses, is counted, and is logged at warn at most once per
//!   [`WARN_EVERY`] per name (with how many were not logged).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfigGroup, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::{ResolveError, Resolver, TokioResolver};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use trunk::quic::Trunk;

use crate::config::PeerDns;

/// Most addresses taken from one name per resolution; the rest are left
/// out (lowest addresses kept, so the choice is stable) and counted.
pub(crate) const MAX_ADDRS_PER_NAME: usize = 64;
/// Longest one name's resolution may take (the resolver's own timeouts
/// and retries are shorter; this bounds everything, SRV targets included).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Per query to one server, and tries per server.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
const QUERY_ATTEMPTS: usize = 2;
/// A failing name is logged at warn at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("reading the system's DNS configuration (give --dns-server instead?): {0}")]
    SystemConfig(#[source] ResolveError),
}

/// Counters of the discovery task, read by `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct DiscoveryMetrics {
    /// Names resolved (an answer, possibly empty).
    pub resolutions: AtomicU64,
    /// Resolutions that failed (the name's last addresses were kept).
    pub failures: AtomicU64,
    /// Addresses left out because a name listed more than
    /// [`MAX_ADDRS_PER_NAME`].
    pub truncated: AtomicU64,
    /// Addresses handed to the trunk by the last round (all names).
    pub addresses: AtomicU64,
}

/// The running discovery task; stopped when dropped.
pub(crate) struct Discovery {
    pub metrics: Arc<DiscoveryMetrics>,
    pub names: Vec<PeerDns>,
    task: JoinHandle<()>,
}

impl Discovery {
    /// Build the resolver (system configuration, or `server`) and start
    /// resolving `names` every `interval` for `trunk`.
    pub(crate) fn start(
        names: Vec<PeerDns>,
        server: Option<SocketAddr>,
        interval: Duration,
        trunk: Arc<Trunk>,
    ) -> Result<Discovery, DiscoveryError> {
        let resolver = resolver(server, interval)?;
        let metrics = Arc::new(DiscoveryMetrics::default());
        let task = Task {
            resolver,
            names: names
                .iter()
                .map(|n| NameState {
                    spec: n.clone(),
                    last: BTreeSet::new(),
                    failing: 0,
                    last_warn: None,
                })
                .collect(),
            interval,
            trunk,
            metrics: metrics.clone(),
        };
        info!(
            names = %names.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            every_secs = interval.as_secs(),
            dns_server = ?server,
            "discovering trunk peers by DNS"
        );
        Ok(Discovery {
            metrics,
            names,
            task: tokio::spawn(task.run()),
        })
    }

    pub(crate) fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn resolver(
    server: Option<SocketAddr>,
    interval: Duration,
) -> Result<TokioResolver, DiscoveryError> {
    let mut builder = match server {
        Some(addr) => Resolver::builder_with_config(
            ResolverConfig::from_parts(
                None,
                Vec::new(),
                NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true),
            ),
            TokioConnectionProvider::default(),
        ),
        None => Resolver::builder_tokio().map_err(DiscoveryError::SystemConfig)?,
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.timeout = QUERY_TIMEOUT;
    opts.attempts = QUERY_ATTEMPTS;
    // The interval is the staleness the operator chose: a cached answer is
    // not reused past the next round, whatever its TTL.
    opts.positive_max_ttl = Some(interval);
    opts.negative_max_ttl = Some(interval);
    Ok(builder.build())
}

struct NameState {
    spec: PeerDns,
    /// What the last answer listed (kept while resolution fails).
    last: BTreeSet<SocketAddr>,
    /// Failures in a row.
    failing: u64,
    last_warn: Option<Instant>,
}

struct Task {
    resolver: TokioResolver,
    names: Vec<NameState>,
    interval: Duration,
    trunk: Arc<Trunk>,
    metrics: Arc<DiscoveryMetrics>,
}

impl Task {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // All names at once, each bounded by LOOKUP_TIMEOUT, and the
            // trunk told as each answers: a slow or dead name holds up
            // neither the others nor the dialing of what they found.
            let mut lookups: FuturesUnordered<_> = self
                .names
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let (resolver, spec) = (self.resolver.clone(), n.spec.clone());
                    async move {
                        let r = tokio::time::timeout(LOOKUP_TIMEOUT, resolve(&resolver, &spec));
                        (i, r.await)
                    }
                })
                .collect();
            while let Some((i, result)) = lookups.next().await {
                if self.record(i, result) && !self.publish().await {
                    return; // the trunk has stopped
                }
            }
        }
    }

    /// Hand the union of every name's addresses to the trunk; false once
    /// the trunk has stopped.
    async fn publish(&self) -> bool {
        let all: BTreeSet<SocketAddr> = self
            .names
            .iter()
            .flat_map(|n| n.last.iter().copied())
            .collect();
        self.metrics
            .addresses
            .store(all.len() as u64, Ordering::Relaxed);
        debug!(addresses = ?all, "peer DNS addresses to dial");
        self.trunk
            .set_dial_addrs(all.into_iter().collect())
            .await
            .is_ok()
    }

    /// What one name's resolution gave: its new addresses, or a failure.
    /// Whether its addresses changed (only then is the trunk told: it
    /// redials what it has on its own).
    fn record(&mut self, i: usize, result: Result<Resolved, tokio::time::error::Elapsed>) -> bool {
        let spec = self.names[i].spec.clone();
        let n = &mut self.names[i];
        match result {
            Ok(Ok((found, targets_left_out))) => {
                self.metrics.resolutions.fetch_add(1, Ordering::Relaxed);
                if n.failing > 0 {
                    info!(name = %spec, failures = n.failing, "peer DNS resolves again");
                }
                n.failing = 0;
                n.last_warn = None;
                let found: BTreeSet<SocketAddr> = found.into_iter().collect();
                let over = found.len().saturating_sub(MAX_ADDRS_PER_NAME) + targets_left_out;
                if over > 0 {
                    self.metrics
                        .truncated
                        .fetch_add(over as u64, Ordering::Relaxed);
                    debug!(name = %spec, left_out = over, "peer DNS lists too many addresses");
                }
                let kept: BTreeSet<SocketAddr> =
                    found.into_iter().take(MAX_ADDRS_PER_NAME).collect();
                let changed = kept != n.last;
                if changed {
                    info!(name = %spec, addresses = kept.len(), left_out = over, "peer DNS answer changed");
                }
                n.last = kept;
                changed
            }
            Ok(Err(e)) => {
                fail(n, &self.metrics, &spec, &e.to_string());
                false
            }
            Err(_) => {
                fail(n, &self.metrics, &spec, "timed out");
                false
            }
        }
    }
}

/// Addresses found and SRV targets left out, or the resolver's error.
type Resolved = Result<(Vec<SocketAddr>, usize), ResolveError>;

/// A failed resolution: counted, the last addresses kept, logged at warn
/// at most once per [`WARN_EVERY`].
fn fail(n: &mut NameState, metrics: &DiscoveryMetrics, spec: &PeerDns, error: &str) {
    metrics.failures.fetch_add(1, Ordering::Relaxed);
    n.failing += 1;
    let due = n.last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY);
    if due {
        n.last_warn = Some(Instant::now());
        warn!(
            name = %spec,
            error,
            failures_in_a_row = n.failing,
            keeping = n.last.len(),
            "peer DNS resolution failed; keeping the last addresses"
        );
    } else {
        debug!(name = %spec, error, "peer DNS resolution failed");
    }
}

/// Every address `spec` lists now, and how many SRV targets were left out
/// (over [`MAX_ADDRS_PER_NAME`]). No records (NXDOMAIN, NODATA) is an
/// answer: nothing.
async fn resolve(resolver: &TokioResolver, spec: &PeerDns) -> Resolved {
    match spec {
        PeerDns::Host { name, port } => {
            let ips = match resolver.lookup_ip(name.as_str()).await {
                Ok(ips) => ips,
                Err(e) if e.is_no_records_found() => return Ok((Vec::new(), 0)),
                Err(e) => return Err(e),
            };
            Ok((ips.iter().map(|ip| SocketAddr::new(ip, *port)).collect(), 0))
        }
        PeerDns::Srv { name } => {
            let srv = match resolver.srv_lookup(name.as_str()).await {
                Ok(srv) => srv,
                Err(e) if e.is_no_records_found() => return Ok((Vec::new(), 0)),
                Err(e) => return Err(e),
            };
            // Target "." means "no service here" (RFC 2782).
            let targets: BTreeSet<(String, u16)> = srv
                .iter()
                .filter(|r| !r.target().is_root())
                .map(|r| (r.target().to_ascii(), r.port()))
                .collect();
            let left_out = targets.len().saturating_sub(MAX_ADDRS_PER_NAME);
            let targets: Vec<(String, u16)> =
                targets.into_iter().take(MAX_ADDRS_PER_NAME).collect();
            let lookups = targets
                .iter()
                .map(|(target, _)| resolver.lookup_ip(target.as_str()));
            let answers = futures_util::future::join_all(lookups).await;
            let mut out = Vec::new();
            for ((_, port), answer) in targets.iter().zip(answers) {
                match answer {
                    Ok(ips) => out.extend(ips.iter().map(|ip| SocketAddr::new(ip, *port))),
                    Err(e) if e.is_no_records_found() => {}
                    Err(e) => return Err(e),
                }
            }
            Ok((out, left_out))
        }
    }
}
