//! Room access with `--auth-secret`: a join needs a signed token for its
//! room; each kind of bad token gets its documented error and the socket
//! is closed; grants limit publishing and chat; a token minted by
//! `switchboard token` admits to every node sharing the secret.

mod common;
mod wsclient;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use signal::{ClientMessage, ErrorCode, ServerMessage, Source};
use switchboard::auth::{self, Claims, Grants};
use switchboard::config::Secret;
use switchboard::{Config, Node};
use testkit::{Client, MediaKind, Transport};
use tokio::sync::mpsc;
use wsclient::*;

const SECRET: &str = "a test secret of at least thirty-two bytes";

async fn auth_node(secret: &str) -> Node {
    common::init_tracing();
    Node::start(Config {
        http_port: 0,
        media_port: 0,
        auth_secret: Some(Secret(secret.into())),
        ..Default::default()
    })
    .await
    .expect("node starts")
}

fn claims(room: &str, name: &str, grants: Grants) -> Claims {
    let now = auth::now_secs();
    Claims {
        room: room.into(),
        sub: format!("id-{name}"),
        name: name.into(),
        grants,
        exp: now + 600,
        iat: Some(now),
        nbf: None,
    }
}

fn token(room: &str, name: &str, grants: Grants) -> String {
    auth::mint(SECRET.as_bytes(), &claims(room, name, grants)).unwrap()
}

/// Join over a raw socket with `token`; the `joined` reply.
async fn join_with(node: &Node, room: &str, name: &str, token: &str) -> (Ws, serde_json::Value) {
    let mut w = ws(node.http_addr()).await;
    send(
        &mut w,
        json!({"type":"join","room":room,"name":name,"token":token}),
    )
    .await;
    let joined = recv_type(&mut w, "joined").await;
    (w, joined)
}

async fn metrics(node: &Node) -> String {
    let (status, body) = http(node.http_addr(), "/metrics", &[]).await;
    assert_eq!(status, 200);
    body
}

#[tokio::test]
async fn a_join_without_a_good_token_gets_its_error_and_is_closed() {
    let node = auth_node(SECRET).await;
    let (mut bystander, _) = join_with(
        &node,
        "quiet",
        "ignored",
        &token("quiet", "Bystander", Grants::ALL),
    )
    .await;
    let mut expired = claims("standup", "Late", Grants::ALL);
    expired.exp = auth::now_secs() - 3600;
    let expired = auth::mint(SECRET.as_bytes(), &expired).unwrap();
    let foreign = auth::mint(
        b"another secret, not this node's, 32+ bytes",
        &claims("standup", "Mallory", Grants::ALL),
    )
    .unwrap();
    let mut tampered = token("standup", "Eve", Grants::ALL);
    tampered.pop();
    let cases: [(&str, Option<&str>, &str); 6] = [
        ("no token", None, "token_required"),
        ("expired", Some(&expired), "token_expired"),
        (
            "another room's token",
            Some(&token("other-room", "Ann", Grants::ALL)),
            "token_wrong_room",
        ),
        (
            "signed with another secret",
            Some(&foreign),
            "token_invalid",
        ),
        ("signature altered", Some(&tampered), "token_invalid"),
        ("not a JWT", Some("not.a.jwt"), "token_invalid"),
    ];
    for (what, tok, code) in cases {
        let mut w = ws(node.http_addr()).await;
        let mut join = json!({"type":"join","room":"standup","name":"Ann"});
        if let Some(t) = tok {
            join["token"] = json!(t);
        }
        send(&mut w, join).await;
        let m = recv_type(&mut w, "error").await;
        assert_eq!(m["code"], code, "{what}: {m}");
        assert_eq!(
            close_code(&mut w).await,
            Some(1008),
            "{what}: the session ends"
        );
        still_served(&mut bystander).await;
    }
    let body = metrics(&node).await;
    for (code, n) in [
        ("token_required", 1),
        ("token_expired", 1),
        ("token_wrong_room", 1),
        ("token_invalid", 3),
    ] {
        let series = format!("switchboard_signaling_errors_total{{code=\"{code}\"}}");
        assert_eq!(sample(&body, &series), n, "{series}\n{body}");
    }
    // An empty token is refused by the parser, and closed the same way.
    let mut w = ws(node.http_addr()).await;
    send(
        &mut w,
        json!({"type":"join","room":"standup","name":"Ann","token":""}),
    )
    .await;
    expect_error(&mut w, "token_invalid").await;
    assert_eq!(close_code(&mut w).await, Some(1008));
    node.shutdown().await;
}

#[tokio::test]
async fn a_valid_token_joins_under_its_own_name() {
    let node = auth_node(SECRET).await;
    let (mut ann, joined) = join_with(
        &node,
        "standup",
        "whatever the page says",
        &token("standup", "Ann Token", Grants::ALL),
    )
    .await;
    assert_eq!(
        joined["name"], "Ann Token",
        "the token names the participant"
    );
    assert_eq!(joined["room"], "standup");
    let roster = recv_type(&mut ann, "roster").await;
    assert_eq!(roster["participants"][0]["name"], "Ann Token");
    // Open-room behaviour is gone: a bare join is refused.
    let mut bare = ws(node.http_addr()).await;
    send(
        &mut bare,
        json!({"type":"join","room":"standup","name":"x"}),
    )
    .await;
    expect_error(&mut bare, "token_required").await;
    still_served(&mut ann).await;
    node.shutdown().await;
}

/// An offer whose audio m-line sends; not a real browser SDP, so the media
/// plane refuses it (`invalid_sdp`) — the point is who refuses it.
const SENDING_OFFER: &str = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendrecv\r\n";
const RECEIVING_OFFER: &str = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=recvonly\r\n";

#[tokio::test]
async fn publishing_and_chat_need_their_grants() {
    let node = auth_node(SECRET).await;
    let viewer = Grants {
        publish: false,
        subscribe: true,
        chat: false,
    };
    let (mut host, _) = join_with(&node, "talk", "h", &token("talk", "Host", Grants::ALL)).await;
    let (mut guest, _) = join_with(&node, "talk", "g", &token("talk", "Guest", viewer)).await;

    let offer =
        |sdp: &str| json!({"type":"offer","sdp":sdp,"tracks":[{"mid":"0","source":"microphone"}]});
    send(&mut guest, offer(SENDING_OFFER)).await;
    expect_error(&mut guest, "forbidden").await;
    still_served(&mut guest).await;
    // Receiving only is allowed: the offer goes on to the media plane.
    send(&mut guest, offer(RECEIVING_OFFER)).await;
    loop {
        let m = recv(&mut guest).await.expect("a reply");
        match m["type"].as_str() {
            Some("answer") => break,
            Some("error") => {
                assert_ne!(m["code"], "forbidden", "{m}");
                break;
            }
            _ => {}
        }
    }
    // With the grant the same offer reaches the media plane too.
    send(&mut host, offer(SENDING_OFFER)).await;
    let m = recv_type(&mut host, "error").await;
    assert_eq!(m["code"], "invalid_sdp", "forwarded, not forbidden: {m}");

    send(&mut guest, json!({"type":"chat","text":"let me in"})).await;
    expect_error(&mut guest, "forbidden").await;
    send(&mut host, json!({"type":"chat","text":"welcome"})).await;
    // The guest still receives the room's chat, and the host got nothing
    // from the guest: the first chat each sees is the host's.
    for w in [&mut guest, &mut host] {
        let c = recv_type(w, "chat").await;
        assert_eq!(c["text"], "welcome", "{c}");
        still_served(w).await;
    }
    let series = "switchboard_signaling_errors_total{code=\"forbidden\"}";
    assert_eq!(sample(&metrics(&node).await, series), 2);
    node.shutdown().await;
}

/// A testkit client whose join carries `token`; its error replies are
/// copied to the returned channel.
async fn media_client(
    node: &Node,
    room: &str,
    token: String,
) -> (Client, mpsc::UnboundedReceiver<ErrorCode>) {
    let real = Transport::websocket(&format!("ws://{}/ws", node.http_addr()))
        .await
        .unwrap();
    let (ctx, mut crx) = mpsc::unbounded_channel::<ClientMessage>();
    let (stx, srx) = mpsc::unbounded_channel::<ServerMessage>();
    let (etx, erx) = mpsc::unbounded_channel();
    let Transport {
        tx: real_tx,
        rx: mut real_rx,
    } = real;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                out = crx.recv() => match out {
                    Some(ClientMessage::Join { room, name, .. }) => {
                        let join = ClientMessage::Join { room, name, token: Some(token.clone()) };
                        if real_tx.send(join).is_err() { break; }
                    }
                    Some(m) => if real_tx.send(m).is_err() { break; },
                    None => break,
                },
                inc = real_rx.recv() => match inc {
                    Some(m) => {
                        if let ServerMessage::Error { code, .. } = &m {
                            let _ = etx.send(*code);
                        }
                        if stx.send(m).is_err() { break; }
                    }
                    None => break,
                },
            }
        }
    });
    let client = Client::join(Transport { tx: ctx, rx: srx }, room, "set by the token")
        .await
        .expect("joins with the token");
    (client, erx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_only_token_receives_media_but_never_publishes() {
    let node = auth_node(SECRET).await;
    let (mut host, _) = media_client(&node, "show", token("show", "Host", Grants::ALL)).await;
    let viewer = Grants {
        publish: false,
        subscribe: true,
        chat: true,
    };
    let (mut guest, mut guest_errors) =
        media_client(&node, "show", token("show", "Guest", viewer)).await;
    host.publish(
        MediaKind::Audio,
        Source::Microphone,
        Duration::from_millis(20),
        200,
    );
    let host_id = host.id.clone();
    guest
        .wait_until("the host's audio", common::T, |s| {
            common::has_tracks_from(s, &host_id, 1, 20)
        })
        .await
        .unwrap();
    guest.publish(
        MediaKind::Audio,
        Source::Microphone,
        Duration::from_millis(20),
        200,
    );
    let code = tokio::time::timeout(common::T, guest_errors.recv())
        .await
        .expect("the publishing offer is refused in time");
    assert_eq!(code, Some(ErrorCode::Forbidden));
    // Nothing of the guest's ever became a track: the host's roster shows
    // none (it has seen the guest join), and it receives nothing from it.
    let guest_id = guest.id.clone();
    host.wait_until("the guest in the roster", common::T, |s| {
        s.roster.iter().any(|p| p.id == guest_id)
    })
    .await
    .unwrap();
    host.state(|s| {
        let g = s.roster.iter().find(|p| p.id == guest_id).unwrap();
        assert!(g.tracks.is_empty(), "{g:?}");
        assert!(s.tracks_from(&guest_id).is_empty());
    });
    assert_eq!(
        sample(
            &metrics(&node).await,
            "switchboard_signaling_errors_total{code=\"forbidden\"}"
        ),
        1
    );
    node.shutdown().await;
}

/// A token without `subscribe` (a publish-only camera, say): the node never
/// offers it anyone's media, so nothing is forwarded to it, while a
/// subscribing participant of the same room gets the host's media. It still
/// sees the roster and can publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_subscribe_is_offered_no_media() {
    let node = auth_node(SECRET).await;
    let (mut host, _) = media_client(&node, "cams", token("cams", "Host", Grants::ALL)).await;
    let camera_only = Grants {
        publish: true,
        subscribe: false,
        chat: false,
    };
    let (mut cam, _) = media_client(&node, "cams", token("cams", "Cam", camera_only)).await;
    let (viewer, _) = media_client(&node, "cams", token("cams", "View", Grants::ALL)).await;
    host.publish(
        MediaKind::Audio,
        Source::Microphone,
        Duration::from_millis(20),
        200,
    );
    cam.publish(
        MediaKind::Audio,
        Source::Microphone,
        Duration::from_millis(20),
        200,
    );
    let (host_id, cam_id) = (host.id.clone(), cam.id.clone());
    // The viewer receives both: the host's media flows, and the camera's
    // own track was published and forwarded.
    viewer
        .wait_until("the host's and the camera's audio", common::T, |s| {
            common::has_tracks_from(s, &host_id, 1, 20)
                && common::has_tracks_from(s, &cam_id, 1, 20)
        })
        .await
        .unwrap();
    // The host's track is in the camera's roster, yet no server offer
    // carried it (or anything else) and no packet of it arrived.
    cam.wait_until("the host's track in the roster", common::T, |s| {
        s.roster
            .iter()
            .any(|p| p.id == host_id && !p.tracks.is_empty())
    })
    .await
    .unwrap();
    cam.state(|s| {
        assert!(s.tracks_from(&host_id).is_empty(), "{:?}", s.track_owner);
        assert!(
            s.tracks.values().all(|t| t.is_empty()),
            "{:?}",
            s.tracks.keys()
        );
        assert!(s.errors.is_empty(), "{:?}", s.errors);
    });
    node.shutdown().await;
}

/// The media plane's own check of the publish permission, under the
/// signaling layer's (which refuses such offers first, tested above): a
/// participant joined straight into the SFU without `publish` gets its
/// sending m-line ignored with `error forbidden`, counted, and no room track.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_media_plane_ignores_m_lines_of_a_participant_that_may_not_publish() {
    use signal::{DisplayName, RoomName};
    let node = auth_node(SECRET).await;
    let sfu = node.sfu().clone();
    // A transport straight into `Sfu::join_with`, bypassing `/ws`.
    let (ctx, mut crx) = mpsc::unbounded_channel::<ClientMessage>();
    let (stx, srx) = mpsc::unbounded_channel::<ServerMessage>();
    tokio::spawn(async move {
        let Some(ClientMessage::Join { room, name, .. }) = crx.recv().await else {
            return;
        };
        let room = RoomName::parse(&room).unwrap();
        let name = DisplayName::parse(&name).unwrap();
        let no_publish = sfu::Permissions {
            publish: false,
            subscribe: true,
        };
        let mut p = sfu.join_with(room, name, no_publish).unwrap();
        loop {
            tokio::select! {
                out = crx.recv() => match out {
                    Some(ClientMessage::Offer { sdp, tracks }) => {
                        p.send(sfu::ParticipantCommand::Offer { sdp, tracks })
                    }
                    Some(ClientMessage::Answer { sdp }) => p.send(sfu::ParticipantCommand::Answer { sdp }),
                    Some(_) => {}
                    None => break,
                },
                inc = p.recv() => match inc {
                    Some(m) => if stx.send(m).is_err() { break; },
                    None => break,
                },
            }
        }
    });
    let mut sneaky = Client::join(Transport { tx: ctx, rx: srx }, "direct", "Sneaky")
        .await
        .expect("joins the SFU");
    let (watcher, _) = media_client(&node, "direct", token("direct", "Watch", Grants::ALL)).await;
    sneaky.publish(
        MediaKind::Audio,
        Source::Microphone,
        Duration::from_millis(20),
        200,
    );
    sneaky
        .wait_until("error forbidden", common::T, |s| {
            s.errors.iter().any(|e| {
                matches!(
                    e,
                    ServerMessage::Error {
                        code: ErrorCode::Forbidden,
                        ..
                    }
                )
            })
        })
        .await
        .unwrap();
    // Refused in the same worker step that would have made the track.
    let m = metrics(&node).await;
    assert!(
        sample(&m, "switchboard_media_publish_refused_total") >= 1,
        "{m}"
    );
    assert_eq!(sample(&m, "switchboard_tracks"), 0, "{m}");
    drop(watcher);
    node.shutdown().await;
}

/// `switchboard token …` with `secret` in the environment: (exit ok, stdout, stderr).
fn mint_with_binary(args: &[&str], secret: Option<&str>) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.arg("token")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("SWITCHBOARD_") {
            cmd.env_remove(k);
        }
    }
    if let Some(s) = secret {
        cmd.env("SWITCHBOARD_AUTH_SECRET", s);
    }
    let out = cmd.output().expect("the binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_token_from_the_subcommand_admits_to_every_node_with_the_secret() {
    let (ok, tok, err) = mint_with_binary(
        &[
            "--room",
            "all-hands",
            "--name",
            "Ada Lovelace",
            "--identity",
            "ada@example.org",
            "--ttl",
            "10m",
            "--no-chat",
        ],
        Some(SECRET),
    );
    assert!(ok, "{err}");
    assert_eq!(tok.lines().count(), 1, "the token alone: {tok}");
    let access = auth::Verifier::new(SECRET.as_bytes())
        .unwrap()
        .verify(&tok, &signal::RoomName::parse("all-hands").unwrap())
        .unwrap();
    assert_eq!(access.identity, "ada@example.org");
    assert_eq!(
        access.grants,
        Grants {
            publish: true,
            subscribe: true,
            chat: false
        }
    );

    // Two separate nodes (no cluster) with the same secret both admit it.
    let a = auth_node(SECRET).await;
    let b = auth_node(SECRET).await;
    let (mut on_a, joined_a) = join_with(&a, "all-hands", "x", &tok).await;
    let (mut on_b, joined_b) = join_with(&b, "all-hands", "y", &tok).await;
    assert_eq!(joined_a["name"], "Ada Lovelace");
    assert_eq!(joined_b["name"], "Ada Lovelace");
    // Its grants hold on both.
    for w in [&mut on_a, &mut on_b] {
        send(w, json!({"type":"chat","text":"hello"})).await;
        expect_error(w, "forbidden").await;
    }
    // A node with another secret does not.
    let c = auth_node("a different secret, thirty-two bytes or more").await;
    let mut w = ws(c.http_addr()).await;
    send(
        &mut w,
        json!({"type":"join","room":"all-hands","name":"x","token":tok}),
    )
    .await;
    expect_error(&mut w, "token_invalid").await;
    for n in [a, b, c] {
        n.shutdown().await;
    }

    // Without a secret, or with a weak one, nothing is minted.
    let (ok, out, err) = mint_with_binary(&["--room", "r", "--name", "n"], None);
    assert!(!ok && out.is_empty());
    assert!(err.contains("SWITCHBOARD_AUTH_SECRET"), "{err}");
    let (ok, _, err) = mint_with_binary(&["--room", "r", "--name", "n"], Some("short"));
    assert!(!ok);
    assert!(err.contains("32 bytes"), "{err}");
    let (ok, _, err) = mint_with_binary(&["--room", "no spaces", "--name", "n"], Some(SECRET));
    assert!(!ok);
    assert!(err.contains("--room"), "{err}");
}

#[tokio::test]
async fn a_node_refuses_a_weak_auth_secret() {
    let err = Node::start(Config {
        http_port: 0,
        media_port: 0,
        auth_secret: Some(Secret("too short".into())),
        ..Default::default()
    })
    .await
    .err()
    .expect("refused");
    assert!(format!("{err:#}").contains("32 bytes"), "{err:#}");
}
