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
const SECRET: &str = "a test cluster secret of some length";

fn start(id: u64, secret: &str, peers: Vec<(u64, SocketAddr)>) -> (Trunk, TrunkEvents) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    Trunk::start(TrunkConfig {
        proto: Config::new(NodeId(id), "test"),
        identity: Identity::from_secret(secret).unwrap(),
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
        "not the cluster secret at all",
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

/// PEM files for a node: `dir/{ca,cert,key}.pem`, signed by `ca`.
fn write_node_pems(dir: &std::path::Path, ca: &rcgen::Issuer<'_, rcgen::KeyPair>, ca_pem: &str) {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair};
    std::fs::create_dir_all(dir).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["switchboard-trunk".to_owned()]).unwrap();
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
    write_node_pems(&base.join("a"), &ca, &ca_pem);
    write_node_pems(&base.join("b"), &ca, &ca_pem);
    write_node_pems(&base.join("m"), &other, &other_pem);

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
