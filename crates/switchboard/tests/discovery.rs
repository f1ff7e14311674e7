//! DNS discovery of trunk peers (`--peer-dns`) with real nodes, real trunks
//! and a real DNS server on loopback (hickory-server, in-memory zone) that
//! the nodes ask through `--dns-server`:
//!
//! - A records, like a Kubernetes headless Service: three nodes on
//!   127.0.0.1-3 with one trunk port, each resolving the same name that
//!   lists all three (itself included), form a full mesh with one
//!   connection per pair; an address removed from the zone keeps its trunk
//!   while the node is up and is forgotten once its trunk dies; a fourth
//!   node added to the zone joins.
//! - SRV records with distinct ports on 127.0.0.1: the mesh forms, and a
//!   DNS server that stops answering keeps the last addresses (counted as
//!   failures) without touching the trunks.
//!
//! Waits poll for a condition with a deadline ([`common::T`]); nothing
//! sleeps for a fixed time to synchronise.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{T, metric, reqwest_status, start};
use hickory_server::ServerFuture;
use hickory_server::authority::{AuthorityObject, Catalog, ZoneType};
use hickory_server::proto::rr::rdata::{A, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType, RrKey};
use hickory_server::store::in_memory::InMemoryAuthority;
use switchboard::config::{PeerDns, Secret};
use switchboard::{Config, Node};

const SECRET: &str = "Discovery-Tests_Share-This_8Rt3Xk";
const ZONE: &str = "sb.test.";
/// Short TTLs: a change is seen at the next resolution.
const TTL: u32 = 1;

/// An authoritative DNS server for [`ZONE`] on 127.0.0.1 (UDP and TCP on
/// one port, as resolvers expect), whose records the test changes.
struct Dns {
    addr: SocketAddr,
    zone: Arc<InMemoryAuthority>,
    serial: AtomicU32,
    server: Option<ServerFuture<Catalog>>,
}

impl Dns {
    async fn start() -> Dns {
        let origin = Name::from_str(ZONE).unwrap();
        let mut zone = InMemoryAuthority::empty(origin.clone(), ZoneType::Primary, false);
        let soa = SOA::new(
            Name::from_str("ns.sb.test.").unwrap(),
            Name::from_str("admin.sb.test.").unwrap(),
            1,
            60,
            60,
            60,
            TTL,
        );
        assert!(zone.upsert_mut(Record::from_rdata(origin.clone(), TTL, RData::SOA(soa)), 1));
        let zone = Arc::new(zone);
        let mut catalog = Catalog::new();
        let authority: Arc<dyn AuthorityObject> = zone.clone();
        catalog.upsert(LowerName::new(&origin), vec![authority]);
        let mut server = ServerFuture::new(catalog);
        // One port for UDP and TCP: retry if TCP finds it taken.
        let mut tries = 0;
        let addr = loop {
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            match tokio::net::TcpListener::bind(addr).await {
                Ok(tcp) => {
                    server.register_socket(udp);
                    server.register_listener(tcp, Duration::from_secs(5));
                    break addr;
                }
                Err(e) => {
                    tries += 1;
                    assert!(tries < 20, "no port free for UDP and TCP: {e}");
                }
            }
        };
        Dns {
            addr,
            zone,
            serial: AtomicU32::new(1),
            server: Some(server),
        }
    }

    /// Replace the records of `name` of `kind` with `data`.
    async fn set(&self, name: &str, kind: RecordType, data: Vec<RData>) {
        let name = Name::from_str(name).unwrap();
        let serial = self.serial.fetch_add(1, Ordering::Relaxed) + 1;
        self.zone
            .records_mut()
            .await
            .remove(&RrKey::new(LowerName::new(&name), kind));
        for rdata in data {
            assert!(
                self.zone
                    .upsert(Record::from_rdata(name.clone(), TTL, rdata), serial)
                    .await
            );
        }
    }

    async fn set_a(&self, name: &str, ips: &[Ipv4Addr]) {
        let data = ips.iter().map(|ip| RData::A(A(*ip))).collect();
        self.set(name, RecordType::A, data).await;
    }

    /// SRV records `_trunk._udp.<name>` pointing at `t<port>.sb.test.`,
    /// each with an A record 127.0.0.1.
    async fn set_srv(&self, name: &str, ports: &[u16]) {
        let mut data = Vec::new();
        for port in ports {
            let target = format!("t{port}.{ZONE}");
            self.set_a(&target, &[Ipv4Addr::LOCALHOST]).await;
            let srv = SRV::new(0, 0, *port, Name::from_str(&target).unwrap());
            data.push(RData::SRV(srv));
        }
        self.set(name, RecordType::SRV, data).await;
    }

    /// Stop answering (queries then time out).
    async fn stop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.shutdown_gracefully().await;
        }
    }
}

/// A clustered node on `ip` discovering peers by `peer_dns` through `dns`,
/// resolving every second.
async fn node(id: u64, ip: Ipv4Addr, trunk_port: u16, peer_dns: &str, dns: &Dns) -> Node {
    start(Config {
        bind: ip.into(),
        trunk_port,
        cluster_secret: Some(Secret(SECRET.into())),
        node_id: Some(id),
        peer_dns: vec![peer_dns.parse().expect("valid --peer-dns")],
        peer_dns_interval_secs: 1,
        dns_server: Some(dns.addr),
        ..Default::default()
    })
    .await
}

/// A UDP port free on every one of `ips` (for nodes sharing one trunk port,
/// as pods behind one headless Service do).
fn port_free_on(ips: &[Ipv4Addr]) -> u16 {
    for _ in 0..50 {
        let probe = std::net::UdpSocket::bind((ips[0], 0)).unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        if ips
            .iter()
            .all(|ip| std::net::UdpSocket::bind((*ip, port)).is_ok())
        {
            return port;
        }
    }
    panic!("no UDP port free on all of {ips:?}");
}

/// What `/api/status` says of the trunks: ids of the peers that are up,
/// and every peer id listed at all.
async fn trunks(n: &Node) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let s = reqwest_status(n).await;
    let mut up = BTreeSet::new();
    let mut all = BTreeSet::new();
    for t in s["trunks"].as_array().cloned().unwrap_or_default() {
        let id = t["node_id"].as_u64().expect("node id");
        all.insert(id);
        if t["up"] == true {
            up.insert(id);
        }
    }
    (up, all)
}

/// The discovered addresses `/api/status` shows: addr → (listed, node id, self).
async fn discovered(n: &Node) -> Vec<(String, bool, Option<u64>, bool)> {
    let s = reqwest_status(n).await;
    s["discovery"]["addresses"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|a| {
            (
                a["addr"].as_str().unwrap_or_default().to_owned(),
                a["listed"] == true,
                a["node_id"].as_u64(),
                a["self"] == true,
            )
        })
        .collect()
}

/// A gauge sample with one label, e.g. `name{state="up"}`.
async fn gauge(n: &Node, name: &str, label: &str) -> u64 {
    let text = common::http_get(n, "/metrics").await;
    let prefix = format!("{name}{{{label}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// Poll `check` until it returns `Ok`, failing with its last `Err` at the
/// deadline.
async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let last = match check().await {
            Ok(()) => return,
            Err(e) => e,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {T:?}: {last}"
        );
        // Polling interval of a condition wait (the nodes resolve once a
        // second; nothing to await on from outside).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every node in `nodes` has exactly the others' trunks up, each over one
/// connection (no duplicate survived), and sees its own address as self.
async fn full_mesh(nodes: &[(u64, &Node)]) -> Result<(), String> {
    for (id, n) in nodes {
        let want: BTreeSet<u64> = nodes.iter().map(|(i, _)| *i).filter(|i| i != id).collect();
        let (up, _) = trunks(n).await;
        if up != want {
            return Err(format!("node {id}: trunks up {up:?}, want {want:?}"));
        }
        let conns = metric(n, "switchboard_trunk_connections").await;
        if conns != want.len() as u64 {
            return Err(format!("node {id}: {conns} connections for {want:?}"));
        }
        let selfs = gauge(
            n,
            "switchboard_trunk_discovered_addresses",
            "state=\"self\"",
        )
        .await;
        let ups = gauge(n, "switchboard_trunk_discovered_addresses", "state=\"up\"").await;
        if (selfs, ups) != (1, want.len() as u64) {
            return Err(format!(
                "node {id}: discovered self {selfs}, up {ups} (want 1, {})",
                want.len()
            ));
        }
    }
    Ok(())
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_form_a_mesh_forget_a_removed_node_and_admit_a_new_one() {
    let dns = Dns::start().await;
    let port = port_free_on(&[ip(1), ip(2), ip(3), ip(4)]);
    let name = format!("peers.{ZONE}");
    dns.set_a(&name, &[ip(1), ip(2), ip(3)]).await;
    let spec = format!("{name}:{port}");
    let n1 = node(1, ip(1), port, &spec, &dns).await;
    let n2 = node(2, ip(2), port, &spec, &dns).await;
    let n3 = node(3, ip(3), port, &spec, &dns).await;

    // 1. Everyone resolves the same three addresses, itself included: a
    // full mesh, one connection per pair, each node's own address skipped.
    wait_for("three-node mesh", || async {
        full_mesh(&[(1, &n1), (2, &n2), (3, &n3)]).await
    })
    .await;
    for n in [&n1, &n2, &n3] {
        assert!(metric(n, "switchboard_trunk_self_dials_total").await >= 1);
        assert_eq!(
            metric(n, "switchboard_trunk_discovery_failures_total").await,
            0
        );
        let d = discovered(n).await;
        assert_eq!(d.len(), 3, "{d:?}");
        let own = n.trunk_addr().unwrap().to_string();
        for (addr, listed, id, is_self) in &d {
            assert!(listed);
            assert_eq!(*is_self, *addr == own, "{addr} vs own {own}");
            if !is_self {
                let want = addr
                    .strip_prefix("127.0.0.")
                    .and_then(|r| r.split(':').next());
                assert_eq!(
                    id.map(|i| i.to_string()).as_deref(),
                    want,
                    "id learned from Hello"
                );
            }
        }
    }

    // 2. DNS stops listing node 3: its trunks stay up while it runs (a DNS
    // change must not cut calls) ...
    dns.set_a(&name, &[ip(1), ip(2)]).await;
    let addr3 = format!("{}:{port}", ip(3));
    for n in [&n1, &n2] {
        wait_for("node 3 unlisted", || async {
            let d = discovered(n).await;
            match d.iter().find(|a| a.0 == addr3) {
                Some((_, false, Some(3), false)) => Ok(()),
                other => Err(format!("127.0.0.3 is {other:?}")),
            }
        })
        .await;
        // ... through more resolution rounds.
        let rounds = metric(n, "switchboard_trunk_discovery_resolutions_total").await;
        common::metric_reaches(
            n,
            "switchboard_trunk_discovery_resolutions_total",
            rounds + 2,
        )
        .await;
        assert!(trunks(n).await.0.contains(&3), "trunk to node 3 kept up");
    }
    // ... and once it stops, its trunks die and it is forgotten.
    n3.shutdown().await;
    for (id, n) in [(1, &n1), (2, &n2)] {
        wait_for("node 3 forgotten", || async {
            let (up, all) = trunks(n).await;
            let d = discovered(n).await;
            if all.contains(&3) || d.iter().any(|a| a.0 == addr3) {
                return Err(format!("node {id}: trunks {all:?}, discovered {d:?}"));
            }
            if up != BTreeSet::from([3 - id]) {
                return Err(format!("node {id}: trunks up {up:?}"));
            }
            Ok(())
        })
        .await;
    }
    // It is not redialed: DNS does not list it.
    let rounds = metric(&n1, "switchboard_trunk_discovery_resolutions_total").await;
    common::metric_reaches(
        &n1,
        "switchboard_trunk_discovery_resolutions_total",
        rounds + 2,
    )
    .await;
    assert!(!trunks(&n1).await.1.contains(&3));
    assert_eq!(
        gauge(
            &n1,
            "switchboard_trunk_discovered_addresses",
            "state=\"down\""
        )
        .await,
        0
    );

    // 3. A fourth node appears in DNS and starts: it joins the mesh.
    dns.set_a(&name, &[ip(1), ip(2), ip(4)]).await;
    let n4 = node(4, ip(4), port, &spec, &dns).await;
    wait_for("mesh with node 4", || async {
        full_mesh(&[(1, &n1), (2, &n2), (4, &n4)]).await
    })
    .await;

    for n in [n1, n2, n4] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_give_ports_and_a_dns_outage_keeps_the_last_addresses() {
    let mut dns = Dns::start().await;
    let srv = format!("_trunk._udp.{ZONE}");
    let spec = srv.trim_end_matches('.').to_owned();
    assert!(matches!(spec.parse(), Ok(PeerDns::Srv { .. })));
    // Nodes first (any free trunk port), then the records naming them:
    // until then they resolve nothing, which is no failure.
    let a = node(1, ip(1), 0, &spec, &dns).await;
    let b = node(2, ip(1), 0, &spec, &dns).await;
    let ports: Vec<u16> = [&a, &b]
        .iter()
        .map(|n| n.trunk_addr().unwrap().port())
        .collect();
    dns.set_srv(&srv, &ports).await;
    wait_for("two-node mesh over SRV", || async {
        full_mesh(&[(1, &a), (2, &b)]).await
    })
    .await;

    // The DNS server goes away: resolutions fail, are counted, and the last
    // addresses stay listed; the trunk is untouched.
    dns.stop().await;
    for n in [&a, &b] {
        common::metric_reaches(n, "switchboard_trunk_discovery_failures_total", 1).await;
        let d = discovered(n).await;
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d.iter().all(|x| x.1), "still listed: {d:?}");
    }
    full_mesh(&[(1, &a), (2, &b)]).await.expect("mesh kept");
    for n in [a, b] {
        n.shutdown().await;
    }
}
