//! Media through a real node: str0m test clients (crates/testkit) over
//! WebSocket signaling and loopback UDP.

mod common;

use std::time::Duration;

use common::{T, assert_contiguous, has_tracks_from, join, node};
use signal::Kind;
use testkit::State;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_receive_each_others_tracks_intact_and_in_order() {
    let node = node().await;
    let mut clients = Vec::new();
    for name in ["Ann", "Ben", "Cat"] {
        let mut c = join(&node, "trio", name).await;
        c.publish_av();
        clients.push(c);
    }
    let ids: Vec<String> = clients.iter().map(|c| c.id.clone()).collect();
    for c in &clients {
        let others: Vec<String> = ids.iter().filter(|i| **i != c.id).cloned().collect();
        c.wait_until("audio+video from both others, 40 packets each", T, |s| {
            others.iter().all(|o| has_tracks_from(s, o, 2, 40))
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; state: {:?}",
                c.id,
                c.state(|s| s
                    .tracks
                    .iter()
                    .map(|(k, v)| (k.clone(), v.len()))
                    .collect::<Vec<_>>())
            )
        });
    }
    for c in &clients {
        c.state(|s| {
            assert_contiguous(&c.id, s);
            // Exactly the others' tracks: never its own, never twice.
            assert_eq!(s.tracks.len(), 4, "{}: {:?}", c.id, s.tracks.keys());
            assert!(s.tracks_from(&c.id).is_empty());
            // The roster names every participant and its two tracks.
            assert_eq!(s.roster.len(), 3);
            for p in &s.roster {
                let mut kinds: Vec<Kind> = p.tracks.iter().map(|t| t.kind).collect();
                kinds.sort_by_key(|k| *k == Kind::Video);
                assert_eq!(kinds, vec![Kind::Audio, Kind::Video], "{:?}", p);
            }
        });
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublish_and_leave_propagate() {
    let node = node().await;
    let mut ann = join(&node, "duo", "Ann").await;
    let (_audio, video) = ann.publish_av();
    let ben = join(&node, "duo", "Ben").await;
    let ann_id = ann.id.clone();
    ben.wait_until("Ann's two tracks flowing", T, |s| {
        has_tracks_from(s, &ann_id, 2, 20)
    })
    .await
    .unwrap();
    let offers_before = ben.state(|s| s.offers_received);

    ann.unpublish(video);
    ben.wait_until("roster shows only Ann's audio", T, |s| {
        s.roster
            .iter()
            .find(|p| p.id == ann_id)
            .is_some_and(|p| p.tracks.len() == 1 && p.tracks[0].kind == Kind::Audio)
    })
    .await
    .unwrap();
    ben.wait_until("a server offer removing the video", T, |s| {
        s.offers_received > offers_before
    })
    .await
    .unwrap();
    // Video stops while audio goes on.
    let video_track = ben.state(|s| {
        s.roster
            .iter()
            .find(|p| p.id == ann_id)
            .map(|p| p.tracks[0].id.clone())
            .unwrap()
    });
    let video_id = ben.state(|s| {
        s.tracks_from(&ann_id)
            .into_iter()
            .find(|t| **t != video_track)
            .cloned()
            .unwrap()
    });
    let frozen = ben.state(|s| s.count(&video_id));
    let audio_now = ben.state(|s| s.count(&video_track));
    ben.wait_until("50 more audio packets", T, |s| {
        s.count(&video_track) >= audio_now + 50
    })
    .await
    .unwrap();
    assert!(
        ben.state(|s| s.count(&video_id)) <= frozen + 5,
        "video kept flowing after unpublish"
    );

    ann.leave();
    ben.wait_until("Ann gone from the roster", T, |s| {
        s.roster.len() == 1 && s.roster[0].id == ben.id
    })
    .await
    .unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_is_reaped() {
    let node = node().await;
    let ann = join(&node, "reap", "Ann").await;
    let mut ben = join(&node, "reap", "Ben").await;
    ben.publish_av();
    let ben_id = ben.id.clone();
    ann.wait_until("Ben's media flowing", T, |s| {
        has_tracks_from(s, &ben_id, 2, 10)
    })
    .await
    .unwrap();
    ben.vanish();
    let vanished = std::time::Instant::now();
    // ICE consent lapses within seconds; the server removes Ben and all he held.
    ann.wait_until("Ben reaped", Duration::from_secs(30), |s| {
        s.roster.len() == 1 && s.roster[0].id == ann.id
    })
    .await
    .unwrap();
    eprintln!("vanished client reaped after {:?}", vanished.elapsed());
    ben.wait_until("Ben told he was disconnected", T, |s| {
        s.errors.iter().any(|e| {
            matches!(
                e,
                signal::ServerMessage::Error {
                    code: signal::ErrorCode::Disconnected,
                    ..
                }
            )
        })
    })
    .await
    .unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rooms_do_not_leak_into_each_other() {
    let node = node().await;
    let mut a1 = join(&node, "room-one", "A1").await;
    a1.publish_av();
    let mut b1 = join(&node, "room-two", "B1").await;
    b1.publish_av();
    let a2 = join(&node, "room-one", "A2").await;
    let b2 = join(&node, "room-two", "B2").await;
    let (a1_id, b1_id) = (a1.id.clone(), b1.id.clone());
    a2.wait_until("A1's media in room-one", T, |s| {
        has_tracks_from(s, &a1_id, 2, 30)
    })
    .await
    .unwrap();
    b2.wait_until("B1's media in room-two", T, |s| {
        has_tracks_from(s, &b1_id, 2, 30)
    })
    .await
    .unwrap();
    a2.state(|s| {
        assert!(
            s.tracks_from(&b1_id).is_empty(),
            "room-two media leaked into room-one"
        );
        assert_eq!(s.tracks.len(), 2);
        assert!(
            s.roster.iter().all(|p| p.id == a1_id || p.id == a2.id),
            "{:?}",
            s.roster
        );
    });
    b2.state(|s| {
        assert!(
            s.tracks_from(&a1_id).is_empty(),
            "room-one media leaked into room-two"
        );
        assert_eq!(s.tracks.len(), 2);
        assert!(
            s.roster.iter().all(|p| p.id == b1_id || p.id == b2.id),
            "{:?}",
            s.roster
        );
    });
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyframe_requests_reach_the_publisher_coalesced() {
    let node = node().await;
    let mut publisher = join(&node, "kf", "Pub").await;
    publisher.publish_av();
    let pub_id = publisher.id.clone();
    let subs = [
        join(&node, "kf", "S1").await,
        join(&node, "kf", "S2").await,
        join(&node, "kf", "S3").await,
    ];
    for s in &subs {
        s.wait_until("Pub's media", T, |st| has_tracks_from(st, &pub_id, 2, 10))
            .await
            .unwrap();
    }
    // New subscribers made the server ask the publisher for a keyframe.
    publisher
        .wait_until("a keyframe request for new subscribers", T, |s| {
            s.keyframe_requests >= 1
        })
        .await
        .unwrap();
    let video = subs[0].state(|s| {
        s.roster
            .iter()
            .find(|p| p.id == pub_id)
            .and_then(|p| p.tracks.iter().find(|t| t.kind == Kind::Video))
            .map(|t| t.id.clone())
            .unwrap()
    });
    let audio_count = |s: &State| -> usize {
        s.tracks_from(&pub_id)
            .iter()
            .filter(|t| ***t != video)
            .map(|t| s.count(t))
            .sum()
    };
    // Let the limiter's window (500 ms) pass: 40 audio packets = 800 ms.
    let mark = subs[0].state(audio_count);
    subs[0]
        .wait_until("800 ms of audio", T, |s| audio_count(s) >= mark + 40)
        .await
        .unwrap();
    let before = publisher.state(|s| s.keyframe_requests);
    // A storm: 3 subscribers x 20 PLIs, all at once.
    for _ in 0..20 {
        for s in &subs {
            s.request_keyframe(&video);
        }
    }
    publisher
        .wait_until("the storm reaches the publisher", T, |s| {
            s.keyframe_requests > before
        })
        .await
        .unwrap();
    // Watch 1.5 s more (75 audio packets): at most one request per 500 ms
    // window gets through, i.e. one now and one deferred.
    let mark = subs[0].state(audio_count);
    subs[0]
        .wait_until("1.5 s of audio", T, |s| audio_count(s) >= mark + 75)
        .await
        .unwrap();
    let relayed = publisher.state(|s| s.keyframe_requests) - before;
    assert!(
        (1..=2).contains(&relayed),
        "60 PLIs from subscribers became {relayed} requests to the publisher"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h264_and_vp9_video_are_forwarded_with_their_codec() {
    use testkit::{Codec, MediaKind};
    let node = node().await;
    let mut publisher = join(&node, "codecs", "Pub").await;
    for codec in [Codec::H264, Codec::Vp9] {
        publisher.publish_codec(
            MediaKind::Video,
            codec,
            signal::Source::Camera,
            Duration::from_millis(33),
            900,
        );
    }
    let sub = join(&node, "codecs", "Sub").await;
    let pub_id = publisher.id.clone();
    sub.wait_until("both video tracks", T, |s| {
        has_tracks_from(s, &pub_id, 2, 20)
    })
    .await
    .unwrap();
    sub.state(|s| {
        assert_contiguous("Sub", s);
        let mut codecs: Vec<Codec> = s.track_codec.values().copied().collect();
        codecs.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(codecs, vec![Codec::H264, Codec::Vp9]);
        // Our answer to the publisher put VP8 first, so both tracks were
        // expected to be VP8 and offered so; their first packets said
        // otherwise, and each got an m-line of its own codec.
        let mut listed: Vec<String> = forwarding_codecs(&s.last_offer)
            .into_iter()
            .filter(|c| c.len() == 2)
            .map(|c| c[0].clone())
            .collect();
        listed.sort();
        assert_eq!(listed, ["H264/90000", "VP9/90000"], "{}", s.last_offer);
    });
    node.shutdown().await;
}

/// A publisher whose first packet shows another codec than expected (our
/// answer put VP8 first; this one sends H.264, which a browser would not):
/// a member offered the track with VP8 before that packet gets a new
/// m-line of the right codec, and the track's media on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_track_offered_with_the_wrong_codec_moves_to_an_m_line_of_its_own() {
    use testkit::{Codec, MediaKind};
    let node = node().await;
    let sub = join(&node, "mispredicted", "Sub").await;
    sub.wait_until("Sub connected", T, |s| s.connected)
        .await
        .unwrap();
    let mut publisher = join(&node, "mispredicted", "Pub").await;
    publisher.hold_media(Duration::from_millis(700));
    publisher.publish_codec(
        MediaKind::Video,
        Codec::H264,
        signal::Source::Camera,
        Duration::from_millis(33),
        900,
    );
    let pub_id = publisher.id.clone();
    sub.wait_until("the track offered before its first packet", T, |s| {
        s.track_owner.values().any(|o| *o == pub_id)
    })
    .await
    .unwrap();
    let first = sub.state(|s| forwarding_codecs(&s.last_offer));
    assert_eq!(first, [["VP8/90000", "rtx/90000"]], "expected VP8 first");
    sub.wait_until("H.264 video", T, |s| has_tracks_from(s, &pub_id, 1, 20))
        .await
        .unwrap();
    sub.state(|s| {
        assert_contiguous("Sub", s);
        assert!(s.track_codec.values().all(|c| *c == Codec::H264));
        // The VP8 m-line is a spare now (`inactive`); H.264 has its own.
        let listed = forwarding_codecs(&s.last_offer);
        assert_eq!(listed, [["H264/90000", "rtx/90000"]], "{}", s.last_offer);
    });
    node.shutdown().await;
}

/// The codecs (`a=rtpmap` names) of each forwarding (`sendonly`) m-line of
/// a server offer, in order.
fn forwarding_codecs(offer: &str) -> Vec<Vec<String>> {
    offer
        .split("m=")
        .skip(1)
        .filter(|section| section.contains("a=sendonly"))
        .map(|section| {
            section
                .lines()
                .filter_map(|l| l.strip_prefix("a=rtpmap:"))
                .filter_map(|l| l.split(' ').nth(1))
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

/// A client that repeats its previous answer while a server offer is
/// outstanding gets `invalid_sdp` for it, and the offer stays outstanding:
/// its right answer is then accepted. (It used to spend the offer, so every
/// later answer was one offer behind: an endless re-offer loop, and the new
/// publisher's media never reached that subscriber.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_answer_does_not_start_a_re_offer_loop() {
    let node = node().await;
    let mut ann = join(&node, "stale", "Ann").await;
    ann.publish_av();
    let ann_id = ann.id.clone();
    let ben = join(&node, "stale", "Ben").await;
    ben.wait_until("Ann's media", T, |s| has_tracks_from(s, &ann_id, 2, 10))
        .await
        .unwrap();
    ben.stale_answer_once();
    let mut cat = join(&node, "stale", "Cat").await;
    cat.publish_av();
    let cat_id = cat.id.clone();
    ben.wait_until("Cat's media despite the stale answer", T, |s| {
        has_tracks_from(s, &cat_id, 2, 20)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", ben.state(|s| s.errors.clone())));
    let offers = ben.state(|s| s.offers_received);
    // A loop sends an offer per answer, dozens a second; a settled session
    // sends none while a second of Cat's media (50 audio + 30 video
    // packets) comes in.
    let cat_video = ben.state(|s| {
        s.tracks_from(&cat_id)
            .iter()
            .map(|t| s.count(t))
            .sum::<usize>()
    });
    ben.wait_until("another second of Cat's media", T, |s| {
        s.tracks_from(&cat_id)
            .iter()
            .map(|t| s.count(t))
            .sum::<usize>()
            >= cat_video + 80
    })
    .await
    .unwrap();
    ben.state(|s| {
        assert_eq!(s.offers_received, offers, "offers kept coming");
        let refused = s
            .errors
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    signal::ServerMessage::Error {
                        code: signal::ErrorCode::InvalidSdp,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(refused, 1, "{:?}", s.errors);
        assert_contiguous("Ben", s);
    });
}

/// A participant that publishes more tracks than the limit gets
/// `invalid_sdp` for the rest and stays in the call; the others see only
/// the allowed ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_tracks_per_participant_are_limited() {
    // The default (8) is a flag; a node set lower holds to it.
    assert_eq!(
        switchboard::Config::default().max_tracks_per_participant,
        sfu::MAX_PUBLISHED_TRACKS
    );
    const MAX: usize = 3;
    let node = common::start(switchboard::Config {
        max_tracks_per_participant: MAX,
        ..Default::default()
    })
    .await;
    let mut ann = join(&node, "many", "Ann").await;
    for _ in 0..MAX + 3 {
        ann.publish(
            testkit::MediaKind::Audio,
            signal::Source::Microphone,
            Duration::from_millis(20),
            100,
        );
    }
    let ann_id = ann.id.clone();
    let ben = join(&node, "many", "Ben").await;
    ben.wait_until("the allowed tracks", T, |s| {
        has_tracks_from(s, &ann_id, MAX, 5)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", ben.state(|s| s.tracks.len())));
    ann.wait_until("invalid_sdp for the rest", T, |s| {
        s.errors.iter().any(|e| {
            matches!(
                e,
                signal::ServerMessage::Error {
                    code: signal::ErrorCode::InvalidSdp,
                    ..
                }
            )
        })
    })
    .await
    .unwrap();
    ben.state(|s| {
        let owners = s
            .roster
            .iter()
            .find(|p| p.id == ann_id)
            .map(|p| p.tracks.len());
        assert_eq!(owners, Some(MAX), "{:?}", s.roster);
    });
}

/// The first packets a subscriber gets of `owner`'s video.
fn first_video_packets(s: &State, owner: &str, n: usize) -> Vec<testkit::Received> {
    let video = s
        .roster
        .iter()
        .find(|p| p.id == owner)
        .and_then(|p| p.tracks.iter().find(|t| t.kind == Kind::Video))
        .map(|t| t.id.clone());
    video
        .and_then(|v| s.tracks.get(&v))
        .map(|r| r.iter().take(n).cloned().collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_subscriber_starts_at_the_cached_keyframe() {
    let node = node().await;
    let mut publisher = join(&node, "gop", "Pub").await;
    // A keyframe every 15 packets (~500 ms), like an encoder's periodic ones.
    let v = publisher.publish_keyframes(Duration::from_millis(33), 1000, 15);
    publisher
        .wait_until("40 video packets sent", T, |s| {
            s.sent.get(&v).is_some_and(|n| *n >= 40)
        })
        .await
        .unwrap();
    let requests = publisher.state(|s| s.keyframe_requests);
    let sub = join(&node, "gop", "Sub").await;
    let pub_id = publisher.id.clone();
    sub.wait_until("20 packets of Pub's video", T, |s| {
        first_video_packets(s, &pub_id, 20).len() == 20
    })
    .await
    .unwrap();
    let first = sub.state(|s| first_video_packets(s, &pub_id, 20));
    assert_eq!(
        first[0].keyframe,
        Some(true),
        "the first packet is the cached keyframe, not whatever came next: {:?}",
        first
            .iter()
            .map(|r| (r.payload.counter, r.keyframe))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        first[0].payload.counter % 15,
        0,
        "a keyframe the publisher made before"
    );
    for w in first.windows(2) {
        assert_eq!(
            w[1].payload.counter,
            w[0].payload.counter + 1,
            "then every packet since, in order"
        );
    }
    // Started from the cache: the publisher was not asked for another one.
    assert_eq!(publisher.state(|s| s.keyframe_requests), requests);
    let metrics = common::http_get(&node, "/metrics").await;
    assert!(
        metrics.contains("switchboard_keyframe_cache_replays_total 1\n"),
        "{metrics}"
    );
    node.shutdown().await;
}

/// A str0m panic inside one participant's call (forced by a test hook)
/// removes that participant with `error internal`, counted; its room and a
/// parallel room keep their media.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_str0m_panic_removes_only_that_participant() {
    let node = node().await;
    let mut ann = join(&node, "panic", "Ann").await;
    ann.publish_av();
    let victim = join(&node, "panic", "Vic").await;
    let ben = join(&node, "panic", "Ben").await;
    let mut cat = join(&node, "calm", "Cat").await;
    cat.publish_av();
    let dan = join(&node, "calm", "Dan").await;
    let (ann_id, cat_id) = (ann.id.clone(), cat.id.clone());
    for c in [&victim, &ben] {
        c.wait_until("Ann's media", T, |s| has_tracks_from(s, &ann_id, 2, 10))
            .await
            .unwrap();
    }
    dan.wait_until("Cat's media", T, |s| has_tracks_from(s, &cat_id, 2, 10))
        .await
        .unwrap();

    node.sfu().panic_in_participant_for_test(&victim.id);
    victim
        .wait_until("error internal, then the end", T, |s| {
            s.ended
                && s.errors.iter().any(|e| {
                    matches!(
                        e,
                        signal::ServerMessage::Error {
                            code: signal::ErrorCode::Internal,
                            ..
                        }
                    )
                })
        })
        .await
        .unwrap();
    let vic_id = victim.id.clone();
    ben.wait_until("Vic gone from Ben's roster", T, |s| {
        !s.roster.iter().any(|p| p.id == vic_id)
    })
    .await
    .unwrap();
    // Both rooms still carry media: 50 more packets each.
    let count =
        |s: &State, from: &str| -> usize { s.tracks_from(from).iter().map(|t| s.count(t)).sum() };
    let (b0, d0) = (
        ben.state(|s| count(s, &ann_id)),
        dan.state(|s| count(s, &cat_id)),
    );
    ben.wait_until("Ann's media goes on", T, |s| count(s, &ann_id) >= b0 + 50)
        .await
        .unwrap();
    dan.wait_until("Cat's media goes on", T, |s| count(s, &cat_id) >= d0 + 50)
        .await
        .unwrap();
    let metrics = common::http_get(&node, "/metrics").await;
    assert!(
        metrics.contains("switchboard_media_panics_total 1\n"),
        "{metrics}"
    );
    assert!(node.sfu().is_running());
    node.shutdown().await;
}

/// A panic in the worker loop itself (outside every guard) ends the media
/// plane: the node reports it (`media_failed`, which the binary turns into
/// a non-zero exit) and `/readyz` answers 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_panic_marks_the_node_failed_and_not_ready() {
    let node = node().await;
    let _ann = join(&node, "doomed", "Ann").await;
    assert!(common::http_get(&node, "/readyz").await.contains("ready"));
    node.sfu().panic_worker_for_test();
    tokio::time::timeout(T, node.media_failed())
        .await
        .expect("the node notices its media worker is gone");
    assert!(!node.sfu().is_running());
    let readyz = common::http_get(&node, "/readyz").await;
    assert!(!readyz.contains("ready"), "{readyz}");
    let metrics = common::http_get(&node, "/metrics").await;
    assert!(
        metrics.contains("switchboard_media_worker_up 0\n"),
        "{metrics}"
    );
    node.shutdown().await;
}

/// A client that offers its own `recvonly` m-lines (aiortc-style) gets them
/// answered `inactive`, not `sendonly` with an msid matching nothing, and
/// receives the room's media on the m-lines the server offers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_recvonly_m_lines_are_answered_inactive() {
    use testkit::MediaKind;
    let node = node().await;
    let mut ann = join(&node, "recv", "Ann").await;
    ann.publish_av();
    let ben = join(&node, "recv", "Ben").await;
    ben.offer_recvonly(MediaKind::Audio);
    ben.offer_recvonly(MediaKind::Video);
    let ann_id = ann.id.clone();
    ben.wait_until("an answer to the recvonly offer, and Ann's media", T, |s| {
        s.answers.len() >= 2 && has_tracks_from(s, &ann_id, 2, 20)
    })
    .await
    .unwrap();
    ben.state(|s| {
        let last = s.answers.last().unwrap();
        let sections: Vec<&str> = last.split("m=").skip(1).collect();
        assert!(sections.len() >= 2, "{last}");
        for m in &sections {
            assert!(
                !m.contains("a=sendonly"),
                "nothing is sent on a client's m-line: {m}"
            );
        }
        let inactive = sections.iter().filter(|m| m.contains("a=inactive")).count();
        assert!(inactive >= 2, "the two recvonly m-lines: {last}");
        assert_contiguous("Ben", s);
    });
    node.shutdown().await;
}

/// A subscriber that outlives many publishers keeps a bounded offer: the
/// m-lines of departed tracks are reused for the next track of their kind
/// instead of piling up (each stopped one stayed in every later offer and
/// answer, ~2.2 KB each from a browser, until an answer passed
/// `MAX_SDP_BYTES` and the session was cut with `too_large`). The media of
/// each new publisher arrives on a reused m-line, told by `Offer::tracks`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_outliving_thirty_publishers_keeps_its_m_lines() {
    let node = node().await;
    let stayer = join(&node, "marathon", "Stay").await;
    for i in 0..30 {
        let mut p = join(&node, "marathon", &format!("P{i}")).await;
        p.publish_av();
        let pid = p.id.clone();
        stayer
            .wait_until(&format!("P{i}'s audio and video"), T, |s| {
                has_tracks_from(s, &pid, 2, 5)
            })
            .await
            .unwrap();
        p.leave();
        stayer
            .wait_until(&format!("P{i} gone"), T, |s| s.roster.len() == 1)
            .await
            .unwrap();
    }
    let (errors, ended, most) =
        stayer.state(|s| (s.errors.clone(), s.ended, s.offers_received_mlines));
    assert!(errors.is_empty() && !ended, "{errors:?}");
    // The data channel's m-line, one audio and one video.
    assert_eq!(most, 3, "m-lines of the largest server offer");
    node.shutdown().await;
}

/// A subscriber of a big room keeps its session: its SDP holds one m-line
/// per live track (~2.2 KB each), so 64 live tracks make an answer of
/// ~140 KB, over the old fixed 100 KiB limit (the churn soak cut every
/// subscriber of a room with more than ~22 audio+video publishers with
/// `too_large`). The node sizes its SDP limit to
/// `--max-participants-per-room` x `--max-tracks-per-participant`.
/// Eight publishers of eight tracks each (the default per-participant
/// limit) rather than 32 of two: the same m-lines, with far fewer
/// renegotiation rounds for an in-process debug build to get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_of_sixty_four_live_tracks_keeps_its_session() {
    use signal::Source;
    use testkit::MediaKind;
    // A packet a second per track: the m-lines make the SDP big, the packet
    // rate does not matter here (at 5/s per track the debug build's worker,
    // sharing 2 cores with 9 str0m clients, fell 8 s behind and cut
    // everyone as silent).
    const SLOW: Duration = Duration::from_millis(1000);
    let node = node().await;
    let stayer = join(&node, "big-room", "Stay").await;
    let mut publishers = Vec::new();
    for i in 0..8 {
        let mut p = join(&node, "big-room", &format!("P{i}")).await;
        for _ in 0..4 {
            p.publish(MediaKind::Audio, Source::Microphone, SLOW, 120);
            p.publish(MediaKind::Video, Source::Camera, SLOW, 1000);
        }
        publishers.push(p);
    }
    let ids: Vec<String> = publishers.iter().map(|p| p.id.clone()).collect();
    stayer
        .wait_until("every publisher's eight tracks", T, |s| {
            s.ended || ids.iter().all(|id| has_tracks_from(s, id, 8, 3))
        })
        .await
        .unwrap_or_else(|e| {
            let got = stayer.state(|s| {
                let per: Vec<(usize, Vec<usize>)> = ids
                    .iter()
                    .map(|id| {
                        let t = s.tracks_from(id);
                        (t.len(), t.iter().map(|t| s.count(t)).collect())
                    })
                    .collect();
                (
                    per,
                    s.errors.clone(),
                    s.offers_received,
                    s.offers_received_mlines,
                )
            });
            panic!(
                "{e:?}: received per publisher (tracks, packets), errors, offers, m-lines: {got:?}"
            )
        });
    let (errors, ended, most) =
        stayer.state(|s| (s.errors.clone(), s.ended, s.offers_received_mlines));
    assert!(errors.is_empty() && !ended, "{errors:?}");
    assert!(most >= 65, "m-lines of the largest server offer: {most}");
    node.shutdown().await;
}

/// Glare in a busy room: a slow browser (1 s to answer) publishing while
/// the room keeps changing. Its offer collides with a server offer and is
/// ignored; it answers ours and offers again. The server used to send its
/// next offer (a change was always queued by then) right after the answer,
/// so the re-offer collided again, forever: the track was never
/// negotiated. Now the server yields to the browser's re-offer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_browser_gets_its_offer_in_while_the_room_keeps_changing() {
    use testkit::MediaKind;
    let node = node().await;
    let mut ben = join(&node, "busy", "Ben").await;
    ben.answer_delay(Duration::from_secs(1));
    let watcher = join(&node, "busy", "Wat").await;
    let ben_id = ben.id.clone();
    let audio = |c: &mut testkit::Client| {
        c.publish(
            MediaKind::Audio,
            signal::Source::Microphone,
            Duration::from_millis(20),
            100,
        )
    };
    // The room changes every ~50 ms: a participant joins with a track, the
    // oldest of three leaves (new participants: one participant's offers
    // are rate-limited). Ben publishes once he sits on an answer.
    let mut live = std::collections::VecDeque::new();
    let until = std::time::Instant::now() + T;
    let mut published = false;
    let mut changes = 0;
    while !watcher.state(|s| has_tracks_from(s, &ben_id, 1, 10)) {
        assert!(
            std::time::Instant::now() < until,
            "Ben's track not negotiated after {changes} room changes; Ben: {:?}",
            ben.state(|s| (s.offers_received, s.errors.clone()))
        );
        if !published && ben.state(|s| s.offers_received) > 0 {
            audio(&mut ben);
            published = true;
        }
        let mut p = join(&node, "busy", &format!("C{changes}")).await;
        audio(&mut p);
        live.push_back(p);
        if live.len() > 3
            && let Some(old) = live.pop_front()
        {
            old.leave();
        }
        changes += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.shutdown().await;
}

/// ICE-TCP (RFC 6544) fallback: a client that offers only an active TCP
/// candidate (as a browser whose UDP is blocked) publishes and subscribes
/// through the node's passive TCP candidate, with a UDP client in the same
/// room; leaving closes the connection on the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_ice_tcp_sends_and_receives_intact() {
    let node = node().await;
    let mut ann = common::join_tcp(&node, "tcp", "Ann").await;
    ann.publish_av();
    let mut ben = join(&node, "tcp", "Ben").await;
    ben.publish_av();
    let (ann_id, ben_id) = (ann.id.clone(), ben.id.clone());
    ann.wait_until("Ben's audio+video over TCP", T, |s| {
        has_tracks_from(s, &ben_id, 2, 40)
    })
    .await
    .unwrap();
    ben.wait_until("Ann's audio+video sent over TCP", T, |s| {
        has_tracks_from(s, &ann_id, 2, 40)
    })
    .await
    .unwrap();
    ann.state(|s| assert_contiguous("Ann (TCP)", s));
    ben.state(|s| assert_contiguous("Ben (UDP)", s));

    // The answer offers both candidates, TCP passive below UDP.
    let answer = ann.state(|s| s.answers[0].clone());
    let prio = |proto: &str| -> u64 {
        answer
            .lines()
            .find(|l| l.starts_with("a=candidate:") && l.split(' ').nth(2) == Some(proto))
            .and_then(|l| l.split(' ').nth(3)?.parse().ok())
            .unwrap_or_else(|| panic!("no {proto} candidate in {answer}"))
    };
    assert!(answer.contains("tcptype passive"), "{answer}");
    assert!(prio("udp") > prio("tcp"), "{answer}");

    assert_eq!(
        common::metric(&node, "switchboard_tcp_connections_open").await,
        1
    );
    assert!(common::metric(&node, "switchboard_tcp_connections_accepted_total").await >= 1);
    assert_eq!(
        common::metric(&node, "switchboard_tcp_connections_refused_total").await,
        0
    );

    ann.leave();
    ben.wait_until("Ann gone", T, |s| s.roster.len() == 1)
        .await
        .unwrap();
    common::metric_until(&node, "switchboard_tcp_connections_open", "0", |n| n == 0).await;
    node.shutdown().await;
}

/// A TCP subscriber that stops reading: the node's bounded write queue for
/// it fills and frames are dropped and counted, while the worker goes on
/// forwarding to everyone else (it never waits on a TCP socket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tcp_reader_costs_dropped_frames_not_the_worker() {
    use testkit::MediaKind;
    let node = node().await;
    let mut publisher = join(&node, "stall", "Pub").await;
    // ~1.2 MB/s: fills the kernel's buffers and the queue in seconds.
    publisher.publish(
        MediaKind::Video,
        signal::Source::Camera,
        Duration::from_millis(1),
        1100,
    );
    let pub_id = publisher.id.clone();
    let slow = common::join_tcp(&node, "stall", "Slow").await;
    slow.wait_until("video over TCP", T, |s| has_tracks_from(s, &pub_id, 1, 20))
        .await
        .unwrap();
    slow.stall_tcp();
    let fast = join(&node, "stall", "Fast").await;
    fast.wait_until("video over UDP", T, |s| has_tracks_from(s, &pub_id, 1, 20))
        .await
        .unwrap();
    common::metric_reaches(&node, "switchboard_tcp_frames_dropped_total", 1).await;
    // Forwarding to the UDP subscriber goes on while the queue is full.
    let track = fast.state(|s| s.tracks_from(&pub_id)[0].clone());
    let before = fast.state(|s| s.count(&track));
    fast.wait_until("500 more packets while TCP is stalled", T, |s| {
        s.count(&track) >= before + 500
    })
    .await
    .unwrap();
    assert!(common::metric(&node, "switchboard_tcp_frames_dropped_total").await > 0);
    slow.leave();
    common::metric_until(&node, "switchboard_tcp_connections_open", "0", |n| n == 0).await;
    node.shutdown().await;
}

/// A forwarding m-line lists the codec its track carries and nothing
/// else (`sdp_text::narrow_codecs`): str0m would offer all twelve video
/// codecs of its configuration, each with RTX, on every m-line it adds
/// (~2 KB each), and every later offer and answer repeated them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarding_m_line_offers_only_the_codec_of_its_track() {
    let node = node().await;
    let mut ann = join(&node, "lean", "Ann").await;
    ann.publish_av();
    let ben = join(&node, "lean", "Ben").await;
    let ann_id = ann.id.clone();
    ben.wait_until("Ann's two tracks flowing", T, |s| {
        has_tracks_from(s, &ann_id, 2, 20)
    })
    .await
    .unwrap();
    let (offer, mids) = ben.state(|s| (s.last_offer.clone(), s.tracks.len()));
    assert_eq!(mids, 2);
    let mut forwarding = 0;
    for section in offer.split("m=").skip(1) {
        if !section.contains("a=sendonly") {
            continue; // Ben's own m-lines (publishing none) and the data channel
        }
        forwarding += 1;
        let codecs: Vec<&str> = section
            .lines()
            .filter_map(|l| l.strip_prefix("a=rtpmap:"))
            .filter_map(|l| l.split(' ').nth(1))
            .collect();
        let expected: &[&str] = if section.starts_with("audio") {
            &["opus/48000/2"]
        } else {
            &["VP8/90000", "rtx/90000"]
        };
        assert_eq!(codecs, expected, "m-line: m={section}");
        let formats = section
            .lines()
            .next()
            .unwrap_or_default()
            .split(' ')
            .count()
            - 3;
        assert_eq!(formats, expected.len(), "m-line: m={section}");
    }
    assert_eq!(forwarding, 2, "offer: {offer}");
    // A publisher joining later is offered before its first packet, with
    // the codec it will send (the first of our answer to it): Ben gets one
    // offer for Cat's two tracks, never a second one to fix a codec.
    let before = ben.state(|s| s.offers_received);
    let mut cat = join(&node, "lean", "Cat").await;
    cat.publish_av();
    let cat_id = cat.id.clone();
    ben.wait_until("Cat's two tracks flowing", T, |s| {
        has_tracks_from(s, &cat_id, 2, 20)
    })
    .await
    .unwrap();
    ben.state(|s| {
        assert_eq!(s.offers_received, before + 1, "offers for Cat's tracks");
        let cat_codecs: Vec<Vec<String>> = forwarding_codecs(&s.last_offer);
        assert_eq!(cat_codecs.len(), 4, "{}", s.last_offer);
    });
    node.shutdown().await;
}

/// A spare m-line keeps the codec it was narrowed to: a departed VP8
/// track's m-line is not given to an H.264 track (the browser accepted VP8
/// only there), which gets an m-line of its own; the next VP8 and H.264
/// tracks reuse the spare of their codec, and every track arrives in its
/// own codec.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_m_line_is_reused_by_a_track_of_its_codec_only() {
    use signal::Source;
    use testkit::{Codec, MediaKind};
    let node = node().await;
    let stayer = join(&node, "codec-spares", "Stay").await;
    for (i, codec) in [Codec::Vp8, Codec::H264, Codec::Vp8, Codec::H264]
        .into_iter()
        .enumerate()
    {
        let mut p = join(&node, "codec-spares", &format!("P{i}")).await;
        p.publish_codec(
            MediaKind::Video,
            codec,
            Source::Camera,
            Duration::from_millis(33),
            900,
        );
        let pid = p.id.clone();
        stayer
            .wait_until(&format!("P{i}'s video"), T, |s| {
                has_tracks_from(s, &pid, 1, 10)
            })
            .await
            .unwrap();
        stayer.state(|s| {
            let track = s.tracks_from(&pid)[0].clone();
            assert_eq!(s.track_codec.get(&track), Some(&codec), "P{i}");
        });
        p.leave();
        stayer
            .wait_until(&format!("P{i} gone"), T, |s| s.roster.len() == 1)
            .await
            .unwrap();
    }
    let (errors, most) = stayer.state(|s| (s.errors.clone(), s.offers_received_mlines));
    assert!(errors.is_empty(), "{errors:?}");
    // The data channel's m-line, one VP8 and one H.264 video.
    assert_eq!(most, 3, "m-lines of the largest server offer");
    node.shutdown().await;
}
