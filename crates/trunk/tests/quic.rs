//! The QUIC driver end to end on loopback: real quinn endpoints, mutual TLS
//! from the cluster secret, the protocol core in between. Waits are for
//! events; the timeouts only bound a hang.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use trunk::proto::{
    CloseCode, CodecParams, Config, Event, Layer, NodeId, ParticipantId, ParticipantInfo, RoomName,
    TrackId, TrackInfo, TrackKind, TrackSource, WireId,
};
use trunk::quic::{Identity, Trunk, TrunkConfig, TrunkEvent, TrunkEvents};

const T: Duration = Duration::from_secs(20);
const SECRET: &str = "tQ4v9Zk2-Lr7_Xw1Np5Bs8Hd3Fm6Yc0J";

fn start(id: u64, secret: &str, peers: Vec<(u64, SocketAddr)>) -> (Trunk, TrunkEvents) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    Trunk::start(TrunkConfig {
        proto: Config::new(NodeId(id), "test"),
        identity: Identity::from_secret(secret, NodeId(id)).unwrap(),
        bind: "127.0.0.1:0".parse().unwrap(),
        peers: peers.into_iter().map(|(n, a)| (NodeId(n), a)).collect(),
        congestion: Default::default(),
        tuning: Default::default(),
    })
    .expect("trunk starts")
}

/// The next event matching `pred`, skipping others.
async fn expect<F: Fn(&TrunkEvent) -> bool>(
    rx: &mut TrunkEvents,
    what: &str,
    pred: F,
) -> TrunkEvent {
    let found = tokio::time::timeout(T, async {
        while let Some(e) = rx.recv().await {
            if pred(&e) {
                return Some(e);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(e)) => e,
        Ok(None) => panic!("{what}: trunk stopped"),
        Err(_) => panic!("{what}: not within {T:?}"),
    }
}

fn link_up(node: u64) -> impl Fn(&TrunkEvent) -> bool {
    move |e| matches!(e, TrunkEvent::Proto(Event::LinkUp { node: n, .. }) if n.0 == node)
}

fn room() -> RoomName {
    RoomName::new("standup").unwrap()
}

fn video(participant: u64) -> TrackInfo {
    TrackInfo {
        participant: ParticipantId(participant),
        kind: TrackKind::Video,
        source: TrackSource::Camera,
        codec: CodecParams {
            mime_type: "video/VP8".into(),
            clock_rate: 90_000,
            channels: None,
            payload_type: 96,
            fmtp: String::new(),
        },
        layers: vec!["f".into()],
    }
}

/// Open `standup` on a node with one participant publishing one track.
async fn open_and_publish(t: &Trunk, participant: u64, track: u64) -> WireId {
    t.call(move |n, now| {
        n.open_room(room(), now).unwrap();
        n.participant_joined(
            &room(),
            ParticipantInfo {
                id: ParticipantId(participant),
                display_name: format!("p{participant}"),
            },
        )
        .unwrap();
        n.publish_track(&room(), TrackId(track), video(participant))
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_link_and_carry_tracks_media_and_data() {
    let (b, mut brx) = start(2, SECRET, vec![]);
    let (a, mut arx) = start(1, SECRET, vec![(2, b.local_addr())]);
    expect(&mut arx, "A sees B", link_up(2)).await;
    expect(&mut brx, "B sees A", link_up(1)).await;

    b.call(|n, now| n.open_room(room(), now).unwrap())
        .await
        .unwrap();
    open_and_publish(&a, 10, 100).await;
    let TrunkEvent::Proto(Event::RemoteTrackAdded { wire_id, track, .. }) =
        expect(&mut brx, "B learns A's track", |e| {
            matches!(e, TrunkEvent::Proto(Event::RemoteTrackAdded { .. }))
        })
        .await
    else {
        unreachable!()
    };
    assert_eq!(track, video(10));

    b.call(move |n, _| n.subscribe(&room(), NodeId(1), wire_id, Layer(0)).unwrap())
        .await
        .unwrap();
    expect(&mut arx, "A asked to send", |e| {
        matches!(
            e,
            TrunkEvent::Proto(Event::SubscribeRequested {
                track: TrackId(100),
                ..
            })
        )
    })
    .await;

    // A 1200-byte RTP-sized packet arrives intact (it must fit from the
    // first datagram: initial MTU).
    let packet: Vec<u8> = (0..1200u32).map(|i| (i * 7 % 251) as u8).collect();
    a.send_media(
        TrackId(100),
        Layer(0),
        Bytes::from(packet.clone()),
        std::time::Instant::now(),
    );
    let TrunkEvent::Media {
        node,
        wire_id: w,
        packet: got,
        ..
    } = expect(&mut brx, "media at B", |e| {
        matches!(e, TrunkEvent::Media { .. })
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!((node, w), (NodeId(1), wire_id));
    assert_eq!(&got[..], &packet[..]);

    // Chat-like data arrives in order.
    a.call(|n, _| {
        for i in 0..20u8 {
            n.send_data(&room(), ParticipantId(10), &[i; 3]).unwrap();
        }
    })
    .await
    .unwrap();
    for i in 0..20u8 {
        let TrunkEvent::Proto(Event::DataReceived { payload, from, .. }) =
            expect(&mut brx, "data", |e| {
                matches!(e, TrunkEvent::Proto(Event::DataReceived { .. }))
            })
            .await
        else {
            unreachable!()
        };
        assert_eq!((from, payload), (ParticipantId(10), vec![i; 3]));
    }
    let status = a.status().await.unwrap();
    assert!(status.node.peers[&NodeId(2)].up);
    assert_eq!(status.metrics.datagrams_out, 1);
    assert_eq!(status.driver.datagrams_too_large, 0);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_secret_never_links_and_garbage_does_not_hurt() {
    let (b, mut brx) = start(2, SECRET, vec![]);
    // Garbage on the trunk port first.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        let junk: Vec<u8> = (0..(i % 1300)).map(|j| (j ^ i) as u8).collect();
        sock.send_to(&junk, b.local_addr()).unwrap();
    }
    let (mallory, mut mrx) = start(
        3,
        &trunk::quic::generate_secret(),
        vec![(2, b.local_addr())],
    );
    // A good node still links while Mallory keeps failing.
    let (a, mut arx) = start(1, SECRET, vec![(2, b.local_addr())]);
    expect(&mut arx, "A links with B", link_up(2)).await;
    expect(&mut brx, "B links with A only", |e| match e {
        TrunkEvent::Proto(Event::LinkUp { node, .. }) => {
            assert_ne!(node.0, 3, "an unauthenticated node got a link");
            node.0 == 1
        }
        _ => false,
    })
    .await;
    // Mallory's dials fail at the TLS layer, over and over; B counts them.
    let failed = async {
        loop {
            if b.status().await.unwrap().driver.handshakes_failed >= 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(T, failed)
        .await
        .expect("B saw Mallory's handshakes fail");
    while let Ok(e) = mrx.control.try_recv() {
        assert!(
            !matches!(e, TrunkEvent::Proto(Event::LinkUp { .. })),
            "Mallory linked: {e:?}"
        );
    }
    assert!(
        b.status()
            .await
            .unwrap()
            .node
            .peers
            .keys()
            .all(|n| n.0 != 3)
    );
    mallory.shutdown().await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_noticed_and_its_restart_relinks_with_its_tracks() {
    let (b, mut brx) = start(2, SECRET, vec![]);
    let b_addr = b.local_addr();
    let (a, mut arx) = start(1, SECRET, vec![(2, b_addr)]);
    expect(&mut arx, "A sees B", link_up(2)).await;
    b.call(|n, now| n.open_room(room(), now).unwrap())
        .await
        .unwrap();
    open_and_publish(&a, 10, 100).await;
    expect(&mut brx, "B learns the track", |e| {
        matches!(e, TrunkEvent::Proto(Event::RemoteTrackAdded { .. }))
    })
    .await;

    // Kill A: no Goodbye. B notices by heartbeat and forgets A's track.
    drop(a);
    expect(&mut brx, "B sees A's track removed", |e| {
        matches!(e, TrunkEvent::Proto(Event::RemoteTrackRemoved { .. }))
    })
    .await;
    let TrunkEvent::Proto(Event::LinkDown { reason, .. }) =
        expect(&mut brx, "B: link to A down", |e| {
            matches!(
                e,
                TrunkEvent::Proto(Event::LinkDown {
                    node: NodeId(1),
                    ..
                })
            )
        })
        .await
    else {
        unreachable!()
    };
    assert_ne!(reason, CloseCode::Shutdown, "a killed node said Goodbye?");

    // A restarts (new incarnation) and publishes again: B relinks and
    // learns the track anew.
    let (a2, mut a2rx) = start(1, SECRET, vec![(2, b_addr)]);
    expect(&mut a2rx, "A (restarted) sees B", link_up(2)).await;
    open_and_publish(&a2, 11, 101).await;
    let TrunkEvent::Proto(Event::RemoteTrackAdded { track, .. }) =
        expect(&mut brx, "B learns the new track", |e| {
            matches!(e, TrunkEvent::Proto(Event::RemoteTrackAdded { .. }))
        })
        .await
    else {
        unreachable!()
    };
    assert_eq!(track.participant, ParticipantId(11));
    a2.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_is_seen_at_once() {
    let (b, mut brx) = start(2, SECRET, vec![]);
    let (a, mut arx) = start(1, SECRET, vec![(2, b.local_addr())]);
    expect(&mut arx, "A sees B", link_up(2)).await;
    expect(&mut brx, "B sees A", link_up(1)).await;
    a.shutdown().await;
    let TrunkEvent::Proto(Event::LinkDown { reason, .. }) =
        expect(&mut brx, "B: A said goodbye", |e| {
            matches!(e, TrunkEvent::Proto(Event::LinkDown { .. }))
        })
        .await
    else {
        unreachable!()
    };
    assert_eq!(reason, CloseCode::Shutdown, "Goodbye, not a timeout");
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_each_learn_a_track_once() {
    let (c, mut crx) = start(3, SECRET, vec![]);
    let (b, mut brx) = start(2, SECRET, vec![(3, c.local_addr())]);
    let (a, mut arx) = start(1, SECRET, vec![(2, b.local_addr()), (3, c.local_addr())]);
    // Both of A's links, in whatever order they come up.
    let mut up = std::collections::BTreeSet::new();
    while up.len() < 2 {
        if let TrunkEvent::Proto(Event::LinkUp { node, .. }) =
            expect(&mut arx, "A-B and A-C", |e| {
                matches!(e, TrunkEvent::Proto(Event::LinkUp { .. }))
            })
            .await
        {
            up.insert(node.0);
        }
    }
    assert_eq!(up, [2, 3].into());
    expect(&mut brx, "B-C", link_up(3)).await;
    b.call(|n, now| n.open_room(room(), now).unwrap())
        .await
        .unwrap();
    c.call(|n, now| n.open_room(room(), now).unwrap())
        .await
        .unwrap();
    open_and_publish(&a, 10, 100).await;
    for (name, rx) in [("B", &mut brx), ("C", &mut crx)] {
        expect(rx, name, |e| {
            matches!(
                e,
                TrunkEvent::Proto(Event::RemoteTrackAdded {
                    node: NodeId(1),
                    ..
                })
            )
        })
        .await;
    }
    // Each node holds A's track exactly once, learned from A (origin-only):
    // nothing through the third node.
    for (name, t, other) in [("B", &b, 3u64), ("C", &c, 2u64)] {
        let peers = t.status().await.unwrap().node.peers;
        let from_a: usize = peers[&NodeId(1)]
            .rooms
            .values()
            .map(|r| r.tracks.len())
            .sum();
        let from_other: usize = peers[&NodeId(other)]
            .rooms
            .values()
            .map(|r| r.tracks.len())
            .sum();
        assert_eq!((from_a, from_other), (1, 0), "{name}: {peers:?}");
    }
    for t in [a, b, c] {
        t.shutdown().await;
    }
}

/// PEM files for a node: `dir/{ca,cert,key}.pem`, signed by `ca`, naming
/// node `id` (URI SAN `switchboard-node:<id>`) unless `None`.
fn write_node_pems(
    dir: &std::path::Path,
    ca: &rcgen::Issuer<'_, rcgen::KeyPair>,
    ca_pem: &str,
    id: Option<u64>,
) {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};
    std::fs::create_dir_all(dir).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["switchboard-trunk".to_owned()]).unwrap();
    if let Some(id) = id {
        params.subject_alt_names.push(SanType::URI(
            format!("switchboard-node:{id}").try_into().unwrap(),
        ));
    }
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, ca).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
}

fn new_ca(name: &str) -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (rcgen::Issuer::new(params, key), cert.pem())
}

fn start_with_files(
    id: u64,
    dir: &std::path::Path,
    peers: Vec<(u64, SocketAddr)>,
) -> (Trunk, TrunkEvents) {
    let identity = Identity::from_pem_files(
        &dir.join("ca.pem"),
        &dir.join("cert.pem"),
        &dir.join("key.pem"),
    )
    .expect("PEM identity loads");
    Trunk::start(TrunkConfig {
        proto: Config::new(NodeId(id), "test"),
        identity,
        bind: "127.0.0.1:0".parse().unwrap(),
        peers: peers.into_iter().map(|(n, a)| (NodeId(n), a)).collect(),
        congestion: Default::default(),
        tuning: Default::default(),
    })
    .expect("trunk starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_pem_files_link_nodes_of_one_ca_only() {
    let base = std::env::temp_dir().join(format!("trunk-pem-{}", std::process::id()));
    let (ca, ca_pem) = new_ca("ops CA");
    let (other, other_pem) = new_ca("someone else's CA");
    write_node_pems(&base.join("a"), &ca, &ca_pem, Some(1));
    write_node_pems(&base.join("b"), &ca, &ca_pem, Some(2));
    write_node_pems(&base.join("m"), &other, &other_pem, Some(3));

    let (b, mut brx) = start_with_files(2, &base.join("b"), vec![]);
    let (m, _mrx) = start_with_files(3, &base.join("m"), vec![(2, b.local_addr())]);
    let (a, mut arx) = start_with_files(1, &base.join("a"), vec![(2, b.local_addr())]);
    expect(&mut arx, "A links with B", link_up(2)).await;
    expect(&mut brx, "B links with A, never M", |e| match e {
        TrunkEvent::Proto(Event::LinkUp { node, .. }) => {
            assert_ne!(node.0, 3, "a node of another CA got a link");
            node.0 == 1
        }
        _ => false,
    })
    .await;
    assert!(
        b.status()
            .await
            .unwrap()
            .node
            .peers
            .keys()
            .all(|n| n.0 != 3)
    );

    // Missing or garbage files are clear errors, not panics.
    std::fs::write(base.join("garbage.pem"), "not a certificate").unwrap();
    let err = Identity::from_pem_files(
        &base.join("garbage.pem"),
        &base.join("a/cert.pem"),
        &base.join("a/key.pem"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("CA file"), "{err}");
    assert!(
        Identity::from_pem_files(&base.join("nope"), &base.join("nope"), &base.join("nope"))
            .is_err()
    );
    for t in [a, b, m] {
        t.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// A member of the cluster (a certificate from the operator's CA for node
/// `cert_id`) that dials `addr` and says Hello as node `claim`, bypassing
/// `Trunk::start`'s own check: how the connection ends (its close code).
async fn pose_as(identity: &Identity, addr: SocketAddr, claim: u64) -> Option<u32> {
    use quinn::crypto::rustls::QuicClientConfig;
    use trunk::proto::wire::{self, Message};
    let client = QuicClientConfig::try_from(identity.client_config().unwrap()).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(client)));
    let conn = endpoint
        .connect(addr, "switchboard-trunk")
        .unwrap()
        .await
        .expect("the CA's certificate is accepted");
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let hello = Message::Hello {
        node_id: NodeId(claim),
        incarnation: trunk::proto::Incarnation(77),
        version: trunk::proto::PROTOCOL_VERSION,
        cluster: "test".into(),
    };
    send.write_all(&wire::encode_frame(&hello).unwrap())
        .await
        .unwrap();
    let closed = tokio::time::timeout(T, conn.closed())
        .await
        .expect("closed");
    endpoint.close(0u32.into(), b"");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            u32::try_from(c.error_code.into_inner()).ok()
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pem_files_a_certificate_binds_the_node_id() {
    let base = std::env::temp_dir().join(format!("trunk-pem-id-{}", std::process::id()));
    let (ca, ca_pem) = new_ca("ops CA");
    write_node_pems(&base.join("a"), &ca, &ca_pem, Some(1));
    write_node_pems(&base.join("b"), &ca, &ca_pem, Some(2));
    write_node_pems(&base.join("m"), &ca, &ca_pem, Some(3));
    write_node_pems(&base.join("anon"), &ca, &ca_pem, None);
    let files = |d: &str| {
        (
            base.join(d).join("ca.pem"),
            base.join(d).join("cert.pem"),
            base.join(d).join("key.pem"),
        )
    };

    // At start: a node's own certificate must name its id.
    let (c, k, key) = files("b");
    let b_identity = Identity::from_pem_files(&c, &k, &key).unwrap();
    assert_eq!(b_identity.node_id(), Some(NodeId(2)));
    let err = Trunk::start(TrunkConfig {
        proto: Config::new(NodeId(3), "test"),
        identity: b_identity,
        bind: "127.0.0.1:0".parse().unwrap(),
        peers: vec![],
        congestion: Default::default(),
        tuning: Default::default(),
    })
    .err()
    .expect("node 3 with node 2's certificate is refused");
    assert!(
        err.to_string()
            .contains("names node 2, but this node's id is 3"),
        "{err}"
    );
    let (c, k, key) = files("anon");
    let err = Identity::from_pem_files(&c, &k, &key).unwrap_err();
    assert!(
        err.to_string().contains("names no node id")
            && err.to_string().contains("switchboard-node:<id>"),
        "{err}"
    );

    // On the trunk: M (a member, node 3) says Hello as node 1 — refused,
    // counted, and the real node 1 still links.
    let (b, mut brx) = start_with_files(2, &base.join("b"), vec![]);
    let (c, k, key) = files("m");
    let m = Identity::from_pem_files(&c, &k, &key).unwrap();
    let code = pose_as(&m, b.local_addr(), 1).await;
    assert_eq!(code, Some(CloseCode::NotCertified.code()));
    expect(&mut brx, "B refuses M posing as node 1", |e| {
        matches!(
            e,
            TrunkEvent::Proto(Event::Refused {
                node: NodeId(1),
                why: trunk::proto::Refusal::NotCertified {
                    certified: Some(NodeId(3))
                },
                ..
            })
        )
    })
    .await;
    assert_eq!(b.status().await.unwrap().node.peers.len(), 0);
    assert_eq!(b.status().await.unwrap().metrics.identity_refused, 1);
    let (a, mut arx) = start_with_files(1, &base.join("a"), vec![(2, b.local_addr())]);
    expect(&mut arx, "A links with B", link_up(2)).await;
    expect(&mut brx, "B links with the real node 1", link_up(1)).await;
    assert_eq!(b.status().await.unwrap().metrics.identity_refused, 1);
    for t in [a, b] {
        t.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&base);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_live_nodes_with_one_id_are_refused_not_replacing_each_other() {
    let (b, mut brx) = start(2, SECRET, vec![]);
    let (a1, mut a1rx) = start(1, SECRET, vec![(2, b.local_addr())]);
    expect(&mut a1rx, "A1 links with B", link_up(2)).await;
    expect(&mut brx, "B links with A1", link_up(1)).await;
    let first = b.status().await.unwrap().node.peers[&NodeId(1)].incarnation;
    // A second process started with id 1: B refuses it, A1 keeps its link.
    let (a2, mut a2rx) = start(1, SECRET, vec![(2, b.local_addr())]);
    expect(&mut a2rx, "A2 hears it is refused", |e| {
        matches!(
            e,
            TrunkEvent::Proto(Event::LinkDown {
                node: NodeId(2),
                reason: CloseCode::NodeIdInUse
            })
        )
    })
    .await;
    expect(&mut brx, "B refuses A2", |e| match e {
        TrunkEvent::Proto(Event::LinkDown { node, reason }) => {
            panic!("B lost node {node:?} ({reason:?}) to a duplicate id")
        }
        TrunkEvent::Proto(Event::Refused { node, why, .. }) => {
            *node == NodeId(1) && matches!(why, trunk::proto::Refusal::NodeIdInUse { .. })
        }
        _ => false,
    })
    .await;
    let status = b.status().await.unwrap();
    assert_eq!(status.node.peers[&NodeId(1)].incarnation, first);
    assert!(status.metrics.node_id_conflicts >= 1);
    assert!(b.call(|n, _| n.is_link_up(NodeId(1))).await.unwrap());
    // A node reaching a node with its own id (listed under another id, as
    // a node never dials its own): both refuse.
    let (b2, mut b2rx) = start(2, SECRET, vec![(3, b.local_addr())]);
    for (name, rx) in [("B", &mut brx), ("B2", &mut b2rx)] {
        expect(rx, name, |e| {
            matches!(
                e,
                TrunkEvent::Proto(Event::Refused {
                    node: NodeId(2),
                    why: trunk::proto::Refusal::OurNodeId,
                    ..
                })
            )
        })
        .await;
    }
    assert!(b.call(|n, _| n.is_link_up(NodeId(1))).await.unwrap());
    for t in [a1, a2, b, b2] {
        t.shutdown().await;
    }
}
