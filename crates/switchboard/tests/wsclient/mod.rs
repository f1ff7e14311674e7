//! A raw signaling client and a bare HTTP client for the access tests
//! (tokens, admin endpoints, Origin): they need to send what a browser
//! would not, and to see status codes and close codes.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub const WAIT: Duration = Duration::from_secs(10);

/// Open `/ws`, with an `Origin` header if given. `Err` carries the HTTP
/// refusal (e.g. 403).
pub async fn connect(
    addr: SocketAddr,
    origin: Option<&str>,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{addr}/ws").into_client_request()?;
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", o.parse().unwrap());
    }
    Ok(connect_async(req).await?.0)
}

pub async fn ws(addr: SocketAddr) -> Ws {
    connect(addr, None).await.expect("websocket connects")
}

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// Next JSON message (skipping pings); `None` if the socket closed.
pub async fn recv(ws: &mut Ws) -> Option<Value> {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time");
        match frame {
            Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

pub async fn recv_type(ws: &mut Ws, ty: &str) -> Value {
    loop {
        let m = recv(ws)
            .await
            .unwrap_or_else(|| panic!("socket closed while waiting for {ty}"));
        if m["type"] == ty {
            return m;
        }
    }
}

pub async fn expect_error(ws: &mut Ws, code: &str) -> Value {
    let m = recv_type(ws, "error").await;
    assert_eq!(m["code"], code, "wrong error: {m}");
    assert!(
        m["message"].as_str().is_some_and(|s| !s.is_empty()),
        "an error says why: {m}"
    );
    m
}

/// Skip messages until the server's Close frame; its code.
pub async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the socket closes in time");
        match frame {
            Some(Ok(Message::Close(c))) => return c.map(|c| u16::from(c.code)),
            None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// The session is alive: ping → pong.
pub async fn still_served(ws: &mut Ws) {
    send(ws, serde_json::json!({"type":"ping"})).await;
    recv_type(ws, "pong").await;
}

/// Status and body of `GET path` with extra request headers.
pub async fn http(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("a response in time")
        .unwrap();
    parse_response(&buf)
}

/// Status code (0 if unreadable) and body of a raw HTTP/1.1 response.
pub fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    (status, body.unwrap_or_default())
}

/// The value of one sample line of a `/metrics` body, e.g.
/// `switchboard_http_refused_total{reason="origin"}`; 0 if absent.
pub fn sample(body: &str, series: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}
