//! Signaling over a real WebSocket against an in-process node: hostile and
//! malformed input gets the documented error, and a participant in another
//! room keeps being served after every single abuse. Plus the HTTP endpoints.

mod wsclient;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard::{Config, Node};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, connect_async};

// The socket helpers shared with the auth/admin/TLS tests.
use wsclient::{Ws, close_code, expect_error, recv, recv_type, send, still_served};

const WAIT: Duration = Duration::from_secs(5);

async fn node() -> Node {
    Node::start(Config {
        http_port: 0,
        media_port: 0,
        ..Default::default()
    })
    .await
    .expect("node starts")
}

async fn ws(node: &Node) -> Ws {
    connect(node.http_addr()).await
}

async fn connect(addr: std::net::SocketAddr) -> Ws {
    let (ws, _) = connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("websocket connects");
    ws
}

async fn joined(node: &Node, room: &str, name: &str) -> Ws {
    let mut w = ws(node).await;
    send(&mut w, json!({"type":"join","room":room,"name":name})).await;
    let j = recv_type(&mut w, "joined").await;
    assert_eq!(j["room"], room);
    assert_eq!(j["name"], name);
    w
}

/// Names in the next roster.
async fn roster_names(ws: &mut Ws) -> Vec<Value> {
    let r = recv_type(ws, "roster").await;
    r["participants"]
        .as_array()
        .expect("participants is a list")
        .iter()
        .map(|p| p["name"].clone())
        .collect()
}

/// Each case: what to send on a fresh socket (after an optional join) and
/// the error code it must get.
struct Case {
    name: &'static str,
    join_first: bool,
    frame: Message,
    code: &'static str,
    closes: bool,
}

fn text(s: impl Into<String>) -> Message {
    Message::Text(s.into().into())
}

fn cases() -> Vec<Case> {
    let c = |name, join_first, frame, code| Case {
        name,
        join_first,
        frame,
        code,
        closes: false,
    };
    let join =
        |room: &str, name: &str| text(json!({"type":"join","room":room,"name":name}).to_string());
    vec![
        c("bad json", false, text("{not json"), "bad_json"),
        c("json array", false, text("[1,2,3]"), "bad_json"),
        c("json string", false, text("\"join\""), "bad_json"),
        c("empty text", false, text(""), "bad_json"),
        c("missing type", false, text(r#"{"room":"a"}"#), "unknown_type"),
        c("type not a string", false, text(r#"{"type":7}"#), "unknown_type"),
        c("unknown type", false, text(r#"{"type":"launch_missiles"}"#), "unknown_type"),
        c("join missing name", false, text(r#"{"type":"join","room":"a"}"#), "bad_message"),
        c("join wrong field type", false, text(r#"{"type":"join","room":5,"name":"x"}"#), "bad_message"),
        c("join extra field", false, text(r#"{"type":"join","room":"a","name":"x","admin":true}"#), "bad_message"),
        c("empty room", false, join("", "x"), "invalid_room"),
        c("65-char room", false, join(&"r".repeat(65), "x"), "invalid_room"),
        c("path traversal room", false, join("../../etc/passwd", "x"), "invalid_room"),
        c("unicode room", false, join("räum", "x"), "invalid_room"),
        c("room with space", false, join("a b", "x"), "invalid_room"),
        c("empty name", false, join("ok-room", ""), "invalid_name"),
        c("65-char name", false, join("ok-room", &"n".repeat(65)), "invalid_name"),
        c("control char name", false, join("ok-room", "bad\u{7}name"), "invalid_name"),
        c("offer before join", false, text(r#"{"type":"offer","sdp":"v=0","tracks":[]}"#), "not_joined"),
        c("answer before join", false, text(r#"{"type":"answer","sdp":"v=0"}"#), "not_joined"),
        c("chat before join", false, text(r#"{"type":"chat","text":"hi"}"#), "not_joined"),
        c("mute before join", false, text(r#"{"type":"mute","audio":true,"video":false}"#), "not_joined"),
        c("binary frame", false, Message::Binary(vec![0, 1, 2, 3].into()), "bad_message"),
        c("double join", true, join("other", "y"), "already_joined"),
        c("answer without server offer", true, text(r#"{"type":"answer","sdp":"v=0\r\n"}"#), "no_pending_offer"),
        c("garbage sdp offer", true, text(r#"{"type":"offer","sdp":"v=0\r\nthis is not sdp","tracks":[]}"#), "invalid_sdp"),
        c("chat too long", true, text(json!({"type":"chat","text":"x".repeat(2001)}).to_string()), "chat_too_long"),
        c("empty chat", true, text(r#"{"type":"chat","text":"   "}"#), "bad_message"),
        c("too many tracks", true, text(json!({"type":"offer","sdp":"v=0","tracks":(0..17).map(|i| json!({"mid": i.to_string(), "source":"camera"})).collect::<Vec<_>>()}).to_string()), "bad_message"),
        c("unknown source", true, text(r#"{"type":"offer","sdp":"v=0","tracks":[{"mid":"0","source":"hologram"}]}"#), "bad_message"),
        Case {
            name: "oversized frame",
            join_first: false,
            frame: text(format!(r#"{{"type":"chat","text":"{}"}}"#, "x".repeat(200 * 1024))),
            code: "too_large",
            closes: true,
        },
    ]
}

#[tokio::test]
async fn hostile_messages_get_documented_errors_and_other_rooms_keep_working() {
    let node = node().await;
    let mut bystander = joined(&node, "quiet-room", "Bystander").await;
    let cases = cases();
    assert!(cases.len() >= 20);
    for case in cases {
        let mut w = if case.join_first {
            joined(&node, "abuse-room", "Abuser").await
        } else {
            ws(&node).await
        };
        w.send(case.frame).await.unwrap();
        let m = recv_type(&mut w, "error").await;
        assert_eq!(m["code"], case.code, "case {:?}: got {m}", case.name);
        if case.closes {
            assert_eq!(
                close_code(&mut w).await,
                Some(1009),
                "case {:?}: socket must close with 1009",
                case.name
            );
        } else {
            // The session goes on after a refusal.
            still_served(&mut w).await;
        }
        still_served(&mut bystander).await;
    }
    node.shutdown().await;
}

#[tokio::test]
async fn a_flood_is_rate_limited_then_closed_without_hurting_others() {
    let node = node().await;
    let mut bystander = joined(&node, "calm", "Calm").await;
    let mut w = ws(&node).await;
    for _ in 0..300 {
        if w.send(text(r#"{"type":"ping"}"#)).await.is_err() {
            break;
        }
    }
    let mut pongs = 0;
    let mut rate_limited = 0;
    let close = loop {
        let frame = tokio::time::timeout(WAIT, w.next())
            .await
            .expect("a frame within 5 s");
        let m: Value = match frame {
            Some(Ok(Message::Text(t))) => serde_json::from_str(&t).unwrap(),
            Some(Ok(Message::Close(c))) => break c.map(|c| u16::from(c.code)),
            Some(Ok(_)) => continue,
            None | Some(Err(_)) => break None,
        };
        match m["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => {
                assert_eq!(m["code"], "rate_limited", "{m}");
                rate_limited += 1;
            }
            _ => panic!("unexpected {m}"),
        }
    };
    assert_eq!(
        close,
        Some(1008),
        "a sustained flood is closed as a policy violation"
    );
    assert!(
        (40..300).contains(&pongs),
        "burst is served, the rest dropped: {pongs} pongs"
    );
    assert!(rate_limited >= 1, "the client is told it is rate limited");
    still_served(&mut bystander).await;
    node.shutdown().await;
}

#[tokio::test]
async fn chat_and_mute_reach_the_room_but_not_other_rooms() {
    let node = node().await;
    let mut a = joined(&node, "room-a", "Ann").await;
    let mut b = joined(&node, "room-a", "Ben").await;
    let mut other = joined(&node, "room-b", "Olga").await;
    send(&mut a, json!({"type":"chat","text":"hi Ben"})).await;
    let c = recv_type(&mut b, "chat").await;
    assert_eq!(
        (c["name"].as_str(), c["text"].as_str()),
        (Some("Ann"), Some("hi Ben"))
    );
    assert!(c["ts"].as_u64().unwrap() > 1_600_000_000_000);
    let echo = recv_type(&mut a, "chat").await;
    assert_eq!(echo["text"], "hi Ben");
    send(&mut a, json!({"type":"mute","audio":true,"video":false})).await;
    loop {
        let r = recv_type(&mut b, "roster").await;
        let ann = r["participants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "Ann")
            .cloned();
        if ann.is_some_and(|p| p["audio_muted"] == true) {
            break;
        }
    }
    // Olga saw only her own room: her ping is answered with nothing else queued before.
    send(&mut other, json!({"type":"ping"})).await;
    loop {
        let m = recv(&mut other).await.unwrap();
        assert_ne!(m["type"], "chat", "chat leaked across rooms: {m}");
        if m["type"] == "roster" {
            let names: Vec<_> = m["participants"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["name"].clone())
                .collect();
            assert_eq!(names, vec![json!("Olga")]);
        }
        if m["type"] == "pong" {
            break;
        }
    }
    node.shutdown().await;
}

#[tokio::test]
async fn full_room_is_refused_and_closed() {
    let node = Node::start(Config {
        http_port: 0,
        media_port: 0,
        max_participants_per_room: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let _first = joined(&node, "tiny", "One").await;
    let mut second = ws(&node).await;
    send(
        &mut second,
        json!({"type":"join","room":"tiny","name":"Two"}),
    )
    .await;
    expect_error(&mut second, "full").await;
    assert_eq!(recv(&mut second).await, None, "socket closes after full");
    node.shutdown().await;
}

/// Scrape `/metrics` until `ok` holds (state changes land asynchronously).
async fn metrics_eventually(node: &Node, ok: impl Fn(&str) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, _, body) = get(node, "/metrics").await;
        if ok(&body) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never matched: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get(node: &Node, path: &str) -> (u16, String, String) {
    get_addr(node.http_addr(), path).await
}

async fn get_addr(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_lowercase(), body.to_string())
}

#[tokio::test]
async fn http_endpoints() {
    let node = node().await;
    let (s, _, body) = get(&node, "/healthz").await;
    assert_eq!((s, body.trim()), (200, "ok"));
    let (s, _, _) = get(&node, "/readyz").await;
    assert_eq!(s, 200);
    let (s, head, body) = get(&node, "/r/standup").await;
    assert_eq!(s, 200);
    assert!(head.contains("content-type: text/html"));
    assert!(body.contains("/app.js"));
    let (s, _, body) = get(&node, "/").await;
    assert_eq!(s, 200);
    assert!(body.contains("/app.js"), "the room picker is the same page");
    let (s, head, _) = get(&node, "/app.js").await;
    assert_eq!(s, 200);
    assert!(head.contains("javascript"));
    let (s, head, _) = get(&node, "/style.css").await;
    assert_eq!(s, 200);
    assert!(head.contains("content-type: text/css"));
    assert_eq!(get(&node, "/nope.js").await.0, 404);
    assert_eq!(get(&node, "/%2e%2e/Cargo.toml").await.0, 404);
    assert_eq!(get(&node, "/r/").await.0, 404);

    // One refusal, counted by code in /metrics.
    let mut bad = ws(&node).await;
    bad.send(text("{nope")).await.unwrap();
    expect_error(&mut bad, "bad_json").await;

    let _w = joined(&node, "status-room", "Sam").await;
    let (s, _, body) = get(&node, "/api/status").await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["rooms"][0]["name"], "status-room");
    assert_eq!(v["rooms"][0]["participants"][0]["name"], "Sam");
    assert!(v["trunks"].as_array().unwrap().is_empty());
    assert!(v["node"]["version"].is_string());
    assert!(v["node"]["uptime_seconds"].is_u64());
    assert_eq!(v["node"]["ready"], true);
    assert_eq!(v["node"]["participants"], 1);
    assert_eq!(v["node"]["http"], node.http_addr().to_string());
    assert_eq!(v["node"]["media"], node.media_addr().to_string());

    let (s, _, body) = get(&node, "/metrics").await;
    assert_eq!(s, 200);
    assert!(body.contains("switchboard_participants 1"), "{body}");
    assert!(body.contains("switchboard_rooms 1"), "{body}");
    assert!(body.contains("switchboard_ws_connections 2"), "{body}");
    assert!(
        body.contains(r#"switchboard_signaling_errors_total{code="bad_json"} 1"#),
        "{body}"
    );
    for name in [
        "switchboard_tracks ",
        "switchboard_rtp_packets_in_total ",
        "switchboard_rtp_bytes_in_total ",
        "switchboard_rtp_packets_out_total ",
        "switchboard_rtp_bytes_out_total ",
        "switchboard_keyframe_requests_total ",
        "switchboard_participants_reaped_total ",
        "switchboard_ws_accepted_total ",
        "switchboard_signaling_rate_limited_total ",
    ] {
        assert!(body.contains(name), "missing {name}: {body}");
    }
    assert!(body.contains("# EOF"));
    node.shutdown().await;
}

#[tokio::test]
async fn a_socket_that_never_joins_is_closed() {
    let node = Node::start(Config {
        http_port: 0,
        media_port: 0,
        join_timeout_secs: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut member = joined(&node, "idle-room", "Ida").await;
    let mut idle = ws(&node).await;
    let e = expect_error(&mut idle, "not_joined").await;
    assert!(e["message"].as_str().unwrap().contains("1 s"), "{e}");
    assert_eq!(close_code(&mut idle).await, Some(1008));
    // The deadline only applies before `join`.
    still_served(&mut member).await;
    node.shutdown().await;
}

#[tokio::test]
async fn leave_closes_normally_and_leaves_the_room() {
    let node = node().await;
    let mut stay = joined(&node, "exit-room", "Stay").await;
    let mut go = joined(&node, "exit-room", "Go").await;
    while roster_names(&mut stay).await.len() != 2 {}
    send(&mut go, json!({"type":"leave"})).await;
    // The room's roster drops the leaver at once: not after the leaver's
    // closing handshake (which waits up to 2 s for a client that, like this
    // one, is not reading).
    let dropped = async { while roster_names(&mut stay).await != vec![json!("Stay")] {} };
    tokio::time::timeout(Duration::from_millis(1500), dropped)
        .await
        .expect("the leaver left the roster before its closing handshake");
    assert_eq!(close_code(&mut go).await, Some(1000));
    node.shutdown().await;
}

#[tokio::test]
async fn readyz_turns_503_while_shutting_down() {
    let node = node().await;
    let addr = node.http_addr();
    assert_eq!(get(&node, "/readyz").await.0, 200);
    let mut w = joined(&node, "drain-room", "Dee").await;
    let stop = tokio::spawn(node.shutdown());
    expect_error(&mut w, "shutting_down").await;
    // The node now waits for this socket's closing handshake (we have not
    // read its Close yet), still serving HTTP: not ready, but alive.
    let (s, _, _) = get_addr(addr, "/readyz").await;
    assert_eq!(s, 503, "not ready once shutdown has begun");
    let (s, _, _) = get_addr(addr, "/healthz").await;
    assert_eq!(s, 200, "still alive while draining");
    let mut late = connect(addr).await;
    late.send(text(r#"{"type":"join","room":"late","name":"Lou"}"#))
        .await
        .unwrap();
    expect_error(&mut late, "shutting_down").await;
    assert_eq!(recv(&mut late).await, None, "late joiner is closed");
    assert_eq!(recv(&mut w).await, None, "socket closes on shutdown");
    stop.await.unwrap();
}

#[tokio::test]
async fn binary_and_control_floods_are_rate_limited_too() {
    let node = node().await;
    let mut bystander = joined(&node, "calm-2", "Calm").await;
    let mut w = ws(&node).await;
    for _ in 0..300 {
        if w.send(Message::Binary(vec![1, 2, 3].into())).await.is_err() {
            break;
        }
    }
    let (mut bad_message, mut rate_limited) = (0, 0);
    while let Some(m) = recv(&mut w).await {
        match m["code"].as_str() {
            Some("bad_message") => bad_message += 1,
            Some("rate_limited") => rate_limited += 1,
            _ => panic!("unexpected {m}"),
        }
    }
    assert!(
        (40..300).contains(&bad_message),
        "only the burst is answered: {bad_message}"
    );
    assert!(rate_limited >= 1);
    still_served(&mut bystander).await;
    let (_, _, body) = get(&node, "/metrics").await;
    let dropped: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("switchboard_signaling_rate_limited_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(dropped >= 1, "{body}");
    node.shutdown().await;
}

#[tokio::test]
async fn a_frame_beyond_the_websocket_cap_closes_only_that_socket() {
    let node = node().await;
    let mut bystander = joined(&node, "calm-3", "Calm").await;
    let mut w = joined(&node, "big-room", "Big").await;
    let huge = format!(r#"{{"type":"chat","text":"{}"}}"#, "x".repeat(1024 * 1024));
    // The server may cut the connection while we are still writing.
    let _ = w.send(text(huge)).await;
    loop {
        match recv(&mut w).await {
            None => break,
            Some(m) if m["type"] == "error" => assert_eq!(m["code"], "too_large", "{m}"),
            Some(_) => {}
        }
    }
    still_served(&mut bystander).await;
    // The big socket's session ended and its participant left.
    metrics_eventually(&node, |m| {
        m.contains("switchboard_ws_connections 1\n") && m.contains("switchboard_participants 1\n")
    })
    .await;
    node.shutdown().await;
}

#[tokio::test]
async fn shutdown_tells_participants_and_stops_serving() {
    let node = node().await;
    let addr = node.http_addr();
    let mut w = joined(&node, "bye-room", "Bea").await;
    let stop = tokio::spawn(node.shutdown());
    expect_error(&mut w, "shutting_down").await;
    assert_eq!(close_code(&mut w).await, Some(1001), "closed as going away");
    stop.await.unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "HTTP stops accepting after shutdown"
    );
}

#[tokio::test]
async fn connections_beyond_the_limit_get_full_and_the_node_keeps_serving() {
    let node = Node::start(Config {
        http_port: 0,
        media_port: 0,
        max_connections: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut one = joined(&node, "limits", "One").await;
    let two = ws(&node).await;
    metrics_eventually(&node, |m| m.contains("switchboard_ws_connections 2\n")).await;
    let mut three = ws(&node).await;
    let e = expect_error(&mut three, "full").await;
    assert!(
        e["message"].as_str().unwrap().contains("maximum of 2"),
        "{e}"
    );
    assert_eq!(close_code(&mut three).await, Some(1013), "try again later");
    metrics_eventually(&node, |m| {
        m.contains(r#"switchboard_signaling_errors_total{code="full"} 1"#)
    })
    .await;
    still_served(&mut one).await;
    // A place frees up: the next one gets in.
    drop(two);
    metrics_eventually(&node, |m| m.contains("switchboard_ws_connections 1\n")).await;
    let _four = joined(&node, "limits", "Four").await;
    node.shutdown().await;
}

#[tokio::test]
async fn offers_beyond_the_per_minute_limit_are_refused() {
    let node = Node::start(Config {
        http_port: 0,
        media_port: 0,
        max_offers_per_minute: 4, // a burst of 1
        ..Default::default()
    })
    .await
    .unwrap();
    let mut w = joined(&node, "offers", "Olly").await;
    let offer = json!({"type":"offer","sdp":"v=0\r\nnot really","tracks":[]});
    send(&mut w, offer.clone()).await;
    send(&mut w, offer).await;
    // The first reaches the media plane (and is refused there as SDP); the
    // second never gets that far.
    loop {
        let e = recv_type(&mut w, "error").await;
        if e["code"] == "rate_limited" {
            assert!(
                e["message"]
                    .as_str()
                    .unwrap()
                    .contains("4 offers per minute"),
                "{e}"
            );
            break;
        }
        assert_eq!(e["code"], "invalid_sdp", "{e}");
    }
    still_served(&mut w).await;
    node.shutdown().await;
}

#[tokio::test]
async fn a_client_whose_sdp_keeps_being_refused_is_disconnected() {
    let node = node().await;
    let mut bystander = joined(&node, "elsewhere", "Bea").await;
    let mut w = joined(&node, "bad-sdp", "Bob").await;
    // Answers with nothing pending and offers that are not SDP, alternately.
    for i in 0..10 {
        let m = if i % 2 == 0 {
            json!({"type":"answer","sdp":"v=0\r\nstale"})
        } else {
            json!({"type":"offer","sdp":"v=0\r\ngarbage","tracks":[]})
        };
        send(&mut w, m).await;
    }
    let mut refused = 0;
    let last = loop {
        let e = recv_type(&mut w, "error").await;
        if e["message"].as_str().unwrap().contains("closing") {
            break e;
        }
        assert!(
            e["code"] == "invalid_sdp" || e["code"] == "no_pending_offer",
            "{e}"
        );
        refused += 1;
    };
    assert_eq!(refused, 10, "each refusal is answered, then the verdict");
    assert_eq!(last["code"], "invalid_sdp", "{last}");
    assert_eq!(close_code(&mut w).await, Some(1008));
    still_served(&mut bystander).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_cut_not_queued_for() {
    let node = Node::start(Config {
        http_port: 0,
        media_port: 0,
        max_queued_messages: 20,
        ..Default::default()
    })
    .await
    .unwrap();
    // A reader with a tiny receive window that then reads nothing.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(node.http_addr()).await.unwrap();
    let url = format!("ws://{}/ws", node.http_addr());
    let (mut stuck, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
        .await
        .unwrap();
    send(
        &mut stuck,
        json!({"type":"join","room":"chatty","name":"Stuck"}),
    )
    .await;
    recv_type(&mut stuck, "joined").await;
    let mut talkers = Vec::new();
    for i in 0..6 {
        talkers.push(joined(&node, "chatty", &format!("Talker {i}")).await);
    }
    // Each talker chats within its rate limit (20 frames/s) with long
    // messages; every chat goes to everyone, Stuck included.
    let long = "😀".repeat(2000); // 8 KB
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    'outer: loop {
        for t in talkers.iter_mut() {
            send(t, json!({"type":"chat","text": long})).await;
        }
        let (_, _, m) = get(&node, "/metrics").await;
        if m.contains(r#"switchboard_signaling_errors_total{code="slow_consumer"} 1"#) {
            break 'outer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stuck client was never cut"
        );
        // Drain the talkers' own sockets so only Stuck falls behind.
        for t in talkers.iter_mut() {
            while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(1), t.next()).await {
            }
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    // Stuck left the room; the talkers are still served.
    metrics_eventually(&node, |m| m.contains("switchboard_participants 6\n")).await;
    still_served(&mut talkers[0]).await;
    drop(stuck);
    node.shutdown().await;
}

#[tokio::test]
async fn a_join_that_would_open_a_room_beyond_the_limit_gets_full() {
    let node = Node::start(Config {
        http_port: 0,
        media_port: 0,
        max_rooms: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut one = joined(&node, "room-1", "One").await;
    let _two = joined(&node, "room-2", "Two").await;
    let mut three = ws(&node).await;
    send(
        &mut three,
        json!({"type":"join","room":"room-3","name":"Three"}),
    )
    .await;
    let e = expect_error(&mut three, "full").await;
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("maximum of 2 rooms"),
        "{e}"
    );
    assert_eq!(recv(&mut three).await, None, "closed after full");
    // An open room still takes people; the node keeps serving.
    let _four = joined(&node, "room-1", "Four").await;
    still_served(&mut one).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_storm_costs_the_media_worker_a_few_listings() {
    let node = node().await;
    let _w = joined(&node, "watched", "Wanda").await;
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let addr = node.http_addr();
        tasks.push(tokio::spawn(
            async move { get_addr(addr, "/api/status").await },
        ));
    }
    for t in tasks {
        let (s, _, body) = t.await.unwrap();
        assert_eq!(s, 200);
        assert!(body.contains("Wanda"), "{body}");
    }
    let elapsed = started.elapsed();
    let (_, _, m) = get(&node, "/metrics").await;
    let builds: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("switchboard_status_builds_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the counter is exported");
    // One listing per 250 ms at most, however many requests.
    let bound = 1 + (elapsed.as_millis() / 250) as u64 + 1;
    assert!(
        builds <= bound,
        "{builds} listings for 200 requests in {elapsed:?}"
    );
    node.shutdown().await;
}
