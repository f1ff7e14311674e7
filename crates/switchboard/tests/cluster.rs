//! Real nodes joined by real trunks (QUIC on loopback): participants on
//! different nodes in one room see and hear each other, chat and mute cross,
//! and leaving or a node going away cleans up on the other side.

mod common;

use common::{
    T, assert_contiguous, has_tracks_from, http_get, join, metric_reaches, reqwest_status, start,
};
use signal::Kind;
use switchboard::config::{Peer, Secret};
use switchboard::{Config, Node};
const SECRET: &str = "Cluster-Tests_Share-This_5ecret-7Qz";

async fn node(id: u64, secret: &str, peers: &[&Node]) -> Node {
    start(Config {
        trunk_port: 0,
        cluster_secret: Some(Secret(secret.into())),
        node_id: Some(id),
        peers: peers
            .iter()
            .enumerate()
            .map(|(i, n)| Peer {
                node_id: [1, 2, 3][i],
                addr: n.trunk_addr().expect("peer is clustered"),
            })
            .collect(),
        ..Default::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_spans_two_nodes_over_the_trunk() {
    let a = node(1, SECRET, &[]).await;
    let b = node(2, SECRET, &[&a]).await;
    let mut ann = join(&a, "standup", "Ann").await;
    let mut ben = join(&b, "standup", "Ben").await;
    ann.publish_av();
    ben.publish_av();
    let (ann_id, ben_id) = (ann.id.clone(), ben.id.clone());

    ben.wait_until("Ann's audio+video via the trunk", T, |s| {
        has_tracks_from(s, &ann_id, 2, 40)
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:?}",
            ben.state(|s| (
                s.roster.clone(),
                s.tracks.keys().cloned().collect::<Vec<_>>()
            ))
        )
    });
    ann.wait_until("Ben's audio+video via the trunk", T, |s| {
        has_tracks_from(s, &ben_id, 2, 40)
    })
    .await
    .unwrap();
    for (who, c) in [("Ann", &ann), ("Ben", &ben)] {
        c.state(|s| {
            assert_contiguous(who, s);
            assert_eq!(s.corrupt, 0, "{who}");
            assert_eq!(s.tracks.len(), 2, "{who}: {:?}", s.tracks.keys());
            let names: Vec<&str> = s.roster.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(names.len(), 2, "{who}: {names:?}");
            for p in &s.roster {
                let mut kinds: Vec<Kind> = p.tracks.iter().map(|t| t.kind).collect();
                kinds.sort_by_key(|k| *k == Kind::Video);
                assert_eq!(kinds, vec![Kind::Audio, Kind::Video], "{who}: {p:?}");
            }
        });
    }

    ann.chat("hello across nodes");
    ben.wait_until("chat crosses the trunk", T, |s| {
        s.chat
            .iter()
            .any(|(name, text)| name == "Ann" && text == "hello across nodes")
    })
    .await
    .unwrap();
    ben.mute(true, false);
    ann.wait_until("Ben's mute crosses the trunk", T, |s| {
        s.roster.iter().any(|p| p.id == ben_id && p.audio_muted)
    })
    .await
    .unwrap();

    // A keyframe request from B reaches the publisher on A.
    let ann_video = ben.state(|s| {
        s.roster
            .iter()
            .find(|p| p.id == ann_id)
            .and_then(|p| p.tracks.iter().find(|t| t.kind == Kind::Video))
            .map(|t| t.id.clone())
            .unwrap()
    });
    let before = ann.state(|s| s.keyframe_requests);
    ben.request_keyframe(&ann_video);
    ann.wait_until("keyframe request across the trunk", T, |s| {
        s.keyframe_requests > before
    })
    .await
    .unwrap();

    // The status API shows the link.
    let status: serde_json::Value = reqwest_status(&a).await;
    assert_eq!(status["trunks"][0]["node_id"], 2);
    assert_eq!(status["trunks"][0]["up"], true);
    let metrics = http_get(&a, "/metrics").await;
    assert!(
        metrics.contains("switchboard_trunk_up{peer=\"2\"} 1"),
        "{metrics}"
    );
    let datagrams_out = metrics
        .lines()
        .find_map(|l| l.strip_prefix("switchboard_trunk_datagrams_out_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(datagrams_out > 0, "A sent Ann's media over the trunk");

    ben.leave();
    ann.wait_until("Ben gone on A", T, |s| s.roster.len() == 1)
        .await
        .unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_each_track_arrives_once() {
    // Full mesh: B dials A, C dials A and B.
    let a = node(1, SECRET, &[]).await;
    let b = node(2, SECRET, &[&a]).await;
    let c = node(3, SECRET, &[&a, &b]).await;
    let mut clients = Vec::new();
    for (n, name) in [(&a, "Ann"), (&b, "Ben"), (&c, "Cat")] {
        clients.push(join(n, "trio", name).await);
    }
    for c in &mut clients {
        c.publish_av();
    }
    let ids: Vec<String> = clients.iter().map(|c| c.id.clone()).collect();
    for c in &clients {
        let others: Vec<&String> = ids.iter().filter(|i| **i != c.id).collect();
        c.wait_until("both other nodes' audio+video", T, |s| {
            others.iter().all(|o| has_tracks_from(s, o, 2, 30))
        })
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", c.id));
    }
    for c in &clients {
        c.state(|s| {
            // A track relayed through the third node would arrive twice.
            assert_eq!(s.tracks.len(), 4, "{}: {:?}", c.id, s.tracks.keys());
            assert_eq!(s.roster.len(), 3, "{}: {:?}", c.id, s.roster);
            assert_contiguous(&c.id, s);
        });
    }
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_going_away_takes_its_participants_along() {
    let a = node(1, SECRET, &[]).await;
    let b = node(2, SECRET, &[&a]).await;
    let ann = join(&a, "bye", "Ann").await;
    let mut ben = join(&b, "bye", "Ben").await;
    ben.publish_av();
    let ben_id = ben.id.clone();
    ann.wait_until("Ben's media on A", T, |s| {
        has_tracks_from(s, &ben_id, 2, 10)
    })
    .await
    .unwrap();
    // Graceful: B says Goodbye; A drops Ben at once (no heartbeat wait).
    b.shutdown().await;
    ann.wait_until("Ben gone from A", T, |s| s.roster.len() == 1)
        .await
        .unwrap();
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_secret_keeps_rooms_apart() {
    let a = node(1, SECRET, &[]).await;
    let b = node(2, &trunk::quic::generate_secret(), &[&a]).await;
    let ann = join(&a, "apart", "Ann").await;
    let mut ben = join(&b, "apart", "Ben").await;
    ben.publish_av();
    let ben_id = ben.id.clone();
    // Ann's own node is working (she sees herself) but never sees Ben.
    ann.wait_until("Ann's roster", T, |s| s.roster.len() == 1)
        .await
        .unwrap();
    // Ben's media flows on B (his node works) while A stays apart.
    let carl = join(&b, "apart", "Carl").await;
    carl.wait_until("Ben's media on B", T, |s| {
        has_tracks_from(s, &ben_id, 2, 20)
    })
    .await
    .unwrap();
    assert_eq!(
        ann.state(|s| s.roster.len()),
        1,
        "a foreign node joined the room"
    );
    let status = reqwest_status(&a).await;
    assert!(
        status["trunks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["up"] != true),
        "{status}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_another_node_starts_at_a_keyframe() {
    let a = node(1, SECRET, &[]).await;
    let b = node(2, SECRET, &[&a]).await;
    let mut ann = join(&a, "gop", "Ann").await;
    // A keyframe every 15 packets (~500 ms), like an encoder's periodic ones.
    let v = ann.publish_keyframes(std::time::Duration::from_millis(33), 1000, 15);
    ann.wait_until("40 video packets sent", T, |s| {
        s.sent.get(&v).is_some_and(|n| *n >= 40)
    })
    .await
    .unwrap();
    // Nobody on B yet: B joins the room, learns the track, subscribes over
    // the trunk; node A answers with the cached group, node B passes it on.
    let ben = join(&b, "gop", "Ben").await;
    let ann_id = ann.id.clone();
    let first = |s: &testkit::State| -> Vec<testkit::Received> {
        s.tracks_from(&ann_id)
            .first()
            .and_then(|t| s.tracks.get(*t))
            .map(|r| r.iter().take(20).cloned().collect())
            .unwrap_or_default()
    };
    ben.wait_until("20 packets of Ann's video", T, |s| first(s).len() == 20)
        .await
        .unwrap();
    let got = ben.state(first);
    assert_eq!(
        got[0].keyframe,
        Some(true),
        "the first packet across the trunk starts a keyframe: {:?}",
        got.iter()
            .map(|r| (r.payload.counter, r.keyframe))
            .collect::<Vec<_>>()
    );
    for w in got.windows(2) {
        assert_eq!(
            w[1].payload.counter,
            w[0].payload.counter + 1,
            "then every packet, in order"
        );
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// Node C (here a bare trunk with the cluster's secret, driven by hand)
/// claims to be Ben, who is on node B: announcing his participant id under
/// another name, chatting as him, removing him. Node A refuses each claim,
/// counts it, and Ann keeps seeing the real Ben.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cannot_speak_for_another_nodes_participants() {
    use trunk::proto::{self, NodeId, ParticipantId, ParticipantInfo};
    use trunk::quic::{Identity, Trunk, TrunkConfig, TrunkEvent};

    let a = node(1, SECRET, &[]).await;
    let b = node(2, SECRET, &[&a]).await;
    let ann = join(&a, "iso", "Ann").await;
    let ben = join(&b, "iso", "Ben").await;
    let ben_id = ben.id.clone();
    ann.wait_until("Ben in Ann's roster", T, |s| {
        s.roster.iter().any(|p| p.id == ben_id && p.name == "Ben")
    })
    .await
    .unwrap();

    let (c, mut events) = Trunk::start(TrunkConfig {
        proto: proto::Config::new(NodeId(3), "switchboard"),
        identity: Identity::from_secret(SECRET, NodeId(3)).unwrap(),
        bind: "127.0.0.1:0".parse().unwrap(),
        peers: vec![(NodeId(1), a.trunk_addr().unwrap())],
        congestion: Default::default(),
        tuning: Default::default(),
    })
    .unwrap();
    tokio::time::timeout(T, async {
        while let Some(e) = events.recv().await {
            if let TrunkEvent::Proto(proto::Event::LinkUp { node, .. }) = e
                && node == NodeId(1)
            {
                return;
            }
        }
    })
    .await
    .expect("C links up with A");
    // Keep C's events drained (its core must not wait on us).
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    let room = proto::RoomName::new("iso").unwrap();
    let ben_pid = ParticipantId(u64::from_str_radix(&ben_id, 16).unwrap());
    let ann_pid = ParticipantId(u64::from_str_radix(&ann.id, 16).unwrap());
    let r = room.clone();
    c.call(move |n, now| {
        n.open_room(r.clone(), now).unwrap();
        // Ben's id under another name, and Ann's (A's own participant).
        for (id, name) in [(ben_pid, "Mallory"), (ann_pid, "Mallory too")] {
            n.participant_joined(
                &r,
                ParticipantInfo {
                    id,
                    display_name: name.into(),
                },
            )
            .unwrap();
        }
    })
    .await
    .unwrap();
    let refused = "switchboard_trunk_claims_refused_total";
    metric_reaches(&a, refused, 2).await;
    // Chat as Ben, then remove "him".
    let r = room.clone();
    c.call(move |n, _| {
        n.send_data(&r, ben_pid, br#"{"t":"chat","text":"I am Ben, trust me"}"#)
            .unwrap();
        n.participant_left(&r, ben_pid).unwrap();
    })
    .await
    .unwrap();
    metric_reaches(&a, refused, 4).await;
    // The real Ben still chats and is still Ben, once, in Ann's roster.
    ben.chat("the real Ben");
    ann.wait_until("the real Ben's chat", T, |s| {
        s.chat.iter().any(|(_, t)| t == "the real Ben")
    })
    .await
    .unwrap();
    ann.state(|s| {
        assert!(
            !s.chat.iter().any(|(_, t)| t.contains("trust me")),
            "{:?}",
            s.chat
        );
        let bens: Vec<_> = s.roster.iter().filter(|p| p.id == ben_id).collect();
        assert_eq!(bens.len(), 1, "{:?}", s.roster);
        assert_eq!(bens[0].name, "Ben");
        assert!(
            s.roster.iter().all(|p| !p.name.starts_with("Mallory")),
            "{:?}",
            s.roster
        );
    });
    c.close().await;
    a.shutdown().await;
    b.shutdown().await;
}

/// A participant on another node leaving with audio and video costs the
/// subscribers here one server offer, as on a single node (it was one per
/// track: two track removals crossing the trunk).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_participant_leaving_costs_one_offer() {
    let a = node(1, SECRET, &[]).await;
    let b = node(2, SECRET, &[&a]).await;
    let mut ann = join(&a, "bye", "Ann").await;
    ann.publish_av();
    let ben = join(&b, "bye", "Ben").await;
    let ann_id = ann.id.clone();
    ben.wait_until("Ann's media", T, |s| has_tracks_from(s, &ann_id, 2, 10))
        .await
        .unwrap();
    // Settled: no offer outstanding.
    let before = ben.state(|s| s.offers_received);
    drop(ann);
    ben.wait_until("Ann gone", T, |s| !s.roster.iter().any(|p| p.id == ann_id))
        .await
        .unwrap();
    ben.wait_until("an offer removing Ann's tracks", T, |s| {
        s.offers_received > before
    })
    .await
    .unwrap();
    // A second offer would follow Ben's answer to the first; his chat goes
    // after that answer on the same socket, so once his own line is back
    // any second offer has arrived.
    ben.chat("still here");
    ben.wait_until("own chat back", T, |s| {
        s.chat.iter().any(|(_, t)| t == "still here")
    })
    .await
    .unwrap();
    assert_eq!(ben.state(|s| s.offers_received), before + 1);
    a.shutdown().await;
    b.shutdown().await;
}
