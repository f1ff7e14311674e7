//! The trunk seam of the media plane, without QUIC: two or three real nodes
//! whose rooms are joined by an in-process bridge doing what the trunk
//! adapter will do — attach a remote link per room on each node and carry
//! each link's events to the other as commands. str0m test clients on
//! different nodes must then see and hear each other as if in one room.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::{T, assert_contiguous, has_tracks_from, join, node};
use sfu::{
    DisplayName, MediaPacket, RemoteCommand, RemoteEvent, RemoteLink, RoomName, SeqExtender, Sfu,
};
use signal::Kind;

/// What one node's link says, as the other node's link hears it. Media
/// crosses as RTP bytes, as on the trunk, with one sequence extender per
/// track on the receiving side.
fn relay(e: RemoteEvent, seqs: &mut HashMap<String, SeqExtender>) -> Option<RemoteCommand> {
    Some(match e {
        RemoteEvent::ParticipantJoined { id, name } => RemoteCommand::ParticipantJoined {
            id,
            name: DisplayName::parse(&name).ok()?,
        },
        RemoteEvent::ParticipantLeft { id } => RemoteCommand::ParticipantLeft { id },
        RemoteEvent::Mute { id, audio, video } => RemoteCommand::Mute { id, audio, video },
        RemoteEvent::TrackAdded(d) => RemoteCommand::TrackAdded(d),
        RemoteEvent::TrackRemoved { id } => RemoteCommand::TrackRemoved { id },
        RemoteEvent::Subscribe { track } => RemoteCommand::Subscribe { track },
        RemoteEvent::Media { track, packet } => {
            let bytes = packet.to_rtp();
            let ext = seqs.entry(track.clone()).or_default();
            let packet =
                MediaPacket::from_rtp(&bytes, ext, packet.arrival).expect("our own RTP parses");
            RemoteCommand::Media { track, packet }
        }
        RemoteEvent::KeyframeRequest { track } => RemoteCommand::KeyframeRequest { track },
        RemoteEvent::Chat { from, text, .. } => RemoteCommand::Chat { from, text },
        RemoteEvent::Closed => return None,
    })
}

/// Join `room` on two media planes until either side closes it or the
/// returned handle is aborted (dropping both links detaches them).
fn bridge(a: &Arc<Sfu>, b: &Arc<Sfu>, room: &str) -> tokio::task::JoinHandle<()> {
    let room = RoomName::parse(room).unwrap();
    let mut la = a.attach(room.clone(), "b").unwrap();
    let mut lb = b.attach(room, "a").unwrap();
    tokio::spawn(async move {
        let (mut to_b, mut to_a) = (HashMap::new(), HashMap::new());
        loop {
            let (e, to, seqs): (Option<RemoteEvent>, &RemoteLink, _) = tokio::select! {
                e = la.recv() => (e, &lb, &mut to_b),
                e = lb.recv() => (e, &la, &mut to_a),
            };
            match e.and_then(|e| relay(e, seqs)) {
                Some(cmd) => to.send(cmd),
                None => return,
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_on_two_nodes_share_media_roster_chat_and_mute() {
    let (a, b) = (node().await, node().await);
    let mut ann = join(&a, "span", "Ann").await;
    let mut ben = join(&b, "span", "Ben").await;
    let bridge = bridge(a.sfu(), b.sfu(), "span");
    ann.publish_av();
    ben.publish_av();
    let (ann_id, ben_id) = (ann.id.clone(), ben.id.clone());

    ben.wait_until("Ann's audio+video across nodes", T, |s| {
        has_tracks_from(s, &ann_id, 2, 40)
    })
    .await
    .unwrap();
    ann.wait_until("Ben's audio+video across nodes", T, |s| {
        has_tracks_from(s, &ben_id, 2, 40)
    })
    .await
    .unwrap();
    for (who, c) in [("Ann", &ann), ("Ben", &ben)] {
        c.state(|s| {
            assert_contiguous(who, s);
            assert_eq!(s.tracks.len(), 2, "{who}: {:?}", s.tracks.keys());
            assert_eq!(s.corrupt, 0);
            assert_eq!(s.roster.len(), 2, "{who}: {:?}", s.roster);
            for p in &s.roster {
                let mut kinds: Vec<Kind> = p.tracks.iter().map(|t| t.kind).collect();
                kinds.sort_by_key(|k| *k == Kind::Video);
                assert_eq!(kinds, vec![Kind::Audio, Kind::Video], "{who}: {p:?}");
            }
        });
    }

    ann.chat("hello from node A");
    ben.wait_until("Ann's chat on node B", T, |s| {
        s.chat
            .iter()
            .any(|(name, text)| name == "Ann" && text == "hello from node A")
    })
    .await
    .unwrap();
    ben.mute(true, false);
    ann.wait_until("Ben shown muted on node A", T, |s| {
        s.roster
            .iter()
            .any(|p| p.id == ben_id && p.audio_muted && !p.video_muted)
    })
    .await
    .unwrap();

    // A keyframe request from a subscriber on B reaches the publisher on A.
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
    ann.wait_until("keyframe request relayed across nodes", T, |s| {
        s.keyframe_requests > before
    })
    .await
    .unwrap();

    // Leaving on B removes Ben and his tracks on A.
    ben.leave();
    ann.wait_until("Ben gone from node A's roster", T, |s| {
        s.roster.len() == 1 && s.roster[0].id == ann_id
    })
    .await
    .unwrap();
    // B's room closed with its last participant: the link ended too.
    tokio::time::timeout(T, bridge)
        .await
        .expect("bridge ends when a side closes")
        .unwrap();
    assert!(b.sfu().status().await.unwrap().is_empty(), "room left on B");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_node_takes_its_participants_and_tracks_with_it() {
    let (a, b) = (node().await, node().await);
    let ann = join(&a, "cut", "Ann").await;
    let mut ben = join(&b, "cut", "Ben").await;
    let bridge = bridge(a.sfu(), b.sfu(), "cut");
    ben.publish_av();
    let ben_id = ben.id.clone();
    ann.wait_until("Ben's media on A", T, |s| {
        has_tracks_from(s, &ben_id, 2, 10)
    })
    .await
    .unwrap();
    let offers = ann.state(|s| s.offers_received);
    // The trunk went down: the adapter drops its links.
    bridge.abort();
    ann.wait_until("Ben gone and his tracks renegotiated away", T, |s| {
        s.roster.len() == 1 && s.offers_received > offers
    })
    .await
    .unwrap();
    let status = a.sfu().status().await.unwrap();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].participants.len(), 1);
    assert_eq!(
        a.sfu()
            .metrics()
            .tracks
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_meshed_deliver_each_track_exactly_once() {
    let nodes = [node().await, node().await, node().await];
    let mut clients = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        clients.push(join(n, "mesh", &format!("P{i}")).await);
    }
    // Full mesh, as trunks form it: every pair bridged once.
    let mut bridges = Vec::new();
    for (i, j) in [(0, 1), (0, 2), (1, 2)] {
        bridges.push(bridge(nodes[i].sfu(), nodes[j].sfu(), "mesh"));
    }
    for c in &mut clients {
        c.publish_av();
    }
    let ids: Vec<String> = clients.iter().map(|c| c.id.clone()).collect();
    for c in &clients {
        let others: Vec<&String> = ids.iter().filter(|i| **i != c.id).collect();
        c.wait_until("both others' audio+video", T, |s| {
            others.iter().all(|o| has_tracks_from(s, o, 2, 30))
        })
        .await
        .unwrap();
    }
    for c in &clients {
        c.state(|s| {
            // Two tracks from each of two others: a track relayed through a
            // third node would show up twice.
            assert_eq!(s.tracks.len(), 4, "{}: {:?}", c.id, s.tracks.keys());
            assert_eq!(s.roster.len(), 3, "{}: {:?}", c.id, s.roster);
            assert_contiguous(&c.id, s);
        });
    }
    for b in bridges {
        b.abort();
    }
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_created_for_a_room_not_open_here_and_claims_are_checked() {
    let (a, b) = (node().await, node().await);
    // No room "ghost" on A: attaching is refused with Closed, A stays empty.
    let mut link = a
        .sfu()
        .attach(RoomName::parse("ghost").unwrap(), "b")
        .unwrap();
    let e = tokio::time::timeout(T, link.recv()).await.unwrap();
    assert_eq!(e, Some(RemoteEvent::Closed));
    // Commands on the dead link create nothing either.
    link.send(RemoteCommand::ParticipantJoined {
        id: "x".into(),
        name: DisplayName::parse("X").unwrap(),
    });
    assert!(a.sfu().status().await.unwrap().is_empty());

    // A remote node may not impersonate a local participant, nor publish
    // for a participant it did not announce.
    let ann = join(&a, "claims", "Ann").await;
    let link = a
        .sfu()
        .attach(RoomName::parse("claims").unwrap(), "b")
        .unwrap();
    link.send(RemoteCommand::ParticipantJoined {
        id: ann.id.clone(),
        name: DisplayName::parse("Mallory").unwrap(),
    });
    link.send(RemoteCommand::TrackAdded(sfu::TrackDescription {
        id: "t1".into(),
        participant: "nobody".into(),
        kind: Kind::Video,
        source: signal::Source::Camera,
        codec: sfu::CodecInfo {
            mime_type: "video/VP8".into(),
            clock_rate: 90_000,
            channels: None,
            payload_type: 96,
            fmtp: String::new(),
        },
    }));
    link.send(RemoteCommand::ParticipantJoined {
        id: "remote-1".into(),
        name: DisplayName::parse("Rita").unwrap(),
    });
    ann.wait_until("Rita in the roster", T, |s| s.roster.len() == 2)
        .await
        .unwrap();
    let status = a.sfu().status().await.unwrap();
    let names: Vec<&str> = status[0]
        .participants
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(
        names,
        ["Ann", "Rita"],
        "impersonation or orphan track accepted"
    );
    assert!(status[0].participants.iter().all(|p| p.tracks.is_empty()));
    a.shutdown().await;
    b.shutdown().await;
}
