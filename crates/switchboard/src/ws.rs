//! One browser's signaling session over a WebSocket.
//!
//! Everything from the network is untrusted: every text frame goes through
//! `signal::parse_client`, names through `RoomName`/`DisplayName`, the frame
//! size is capped by the WebSocket layer, and a token bucket limits the rate.
//! Each refusal is an `{"type":"error"}` reply; the socket closes only for
//! the codes SIGNALING.md lists.
//!
//! With `--auth-secret`, `join` needs a room access token ([`crate::auth`]);
//! its grants are kept for the session and checked here for what the
//! signaling layer sees: chat, and offers that would publish.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use sfu::{Participant, ParticipantCommand};
use signal::{
    ClientMessage, DisplayName, ErrorCode, RoomName, ServerMessage, SignalError, parse_client_with,
};
use tracing::{debug, info};

use crate::AppState;
use crate::auth::{self, Grants};

/// Messages per second a connection may send on average, and its burst.
pub const RATE_PER_SEC: f64 = 20.0;
pub const RATE_BURST: f64 = 40.0;
/// Messages dropped in a row by the rate limit before the socket is closed.
pub const FLOOD_CLOSE_AFTER: u32 = 200;
/// WebSocket ping interval, and silence after which the peer is gone.
const PING_EVERY: Duration = Duration::from_secs(10);
const SILENCE_LIMIT: Duration = Duration::from_secs(30);
/// How long a closing socket waits for the peer's Close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Longest a single outgoing frame may wait for the peer to read. A client
/// that stops reading would otherwise park its session forever while the
/// media plane keeps queueing rosters and chat for it.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// A client whose SDP the media plane refused (`invalid_sdp`, or an answer
/// with no offer pending) this many times within [`INVALID_SDP_WINDOW`] is
/// disconnected: a correct client errs once in a while (a stale answer, an
/// answer crossing a new offer), a broken one loops.
pub const INVALID_SDP_CLOSE_AFTER: usize = 10;
const INVALID_SDP_WINDOW: Duration = Duration::from_secs(60);
/// How far past `Limits::max_message_bytes` a frame is still read (and
/// answered `too_large`) before the WebSocket layer cuts the socket.
const WS_CAP_MARGIN: usize = 64 * 1024;
/// How often the backlog is checked while a send waits on the client.
const BACKLOG_CHECK: Duration = Duration::from_millis(100);

pub(crate) fn upgrade(state: Arc<AppState>, upgrade: WebSocketUpgrade) -> Response {
    // The WebSocket layer refuses anything over our limit plus a margin
    // without buffering it; within the margin, we answer `too_large`
    // ourselves. Memory a client can make a socket hold is thus bounded by
    // this cap (times --max-connections for the node).
    let cap = state.limits.max_message_bytes + WS_CAP_MARGIN;
    upgrade
        .max_message_size(cap)
        .max_frame_size(cap)
        .on_upgrade(move |socket| async move {
            // Checked and counted in one step: concurrent upgrades cannot
            // both take the last place.
            let max = state.config.max_connections as u64;
            let mut admitted = false;
            state.ws_connections.send_modify(|n| {
                if *n < max {
                    *n += 1;
                    admitted = true;
                }
            });
            state.ws_total.fetch_add(1, Ordering::Relaxed);
            if !admitted {
                state.signaling.error(ErrorCode::Full);
                let e = SignalError::new(
                    ErrorCode::Full,
                    format!(
                        "this node has its maximum of {max} signaling connections; try again later"
                    ),
                );
                turn_away(socket, &e.to_message()).await;
                return;
            }
            Session::new(state.clone()).run(socket).await;
            state
                .ws_connections
                .send_modify(|n| *n = n.saturating_sub(1));
        })
}

/// Send one error and close (1013, try again later) without a session.
async fn turn_away(socket: WebSocket, msg: &ServerMessage) {
    let (mut tx, mut rx) = socket.split();
    let _ = send(&mut tx, msg).await;
    close_handshake(&mut tx, &mut rx, close_code::AGAIN, "node full").await;
}

/// Send our Close, then read (and discard) until the peer's. Closing the
/// TCP socket with unread input would reset it and the peer could lose our
/// last messages (the error saying why).
async fn close_handshake<T, R>(tx: &mut T, rx: &mut R, code: u16, reason: &'static str)
where
    T: SinkExt<Message, Error = axum::Error> + Unpin,
    R: futures_util::Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    let close = tx.send(Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    })));
    let _ = tokio::time::timeout(SEND_TIMEOUT, close).await;
    let drain = async {
        while let Some(Ok(f)) = rx.next().await {
            if matches!(f, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, drain).await;
}

/// Token bucket: `rate` tokens per second up to `burst`.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }
    pub fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What to do after handling one client frame.
enum Next {
    Continue,
    Close(u16, &'static str),
}

struct Session {
    state: Arc<AppState>,
    participant: Option<Participant>,
    bucket: TokenBucket,
    /// `--max-offers-per-minute`, a quarter of it as the burst.
    offers: TokenBucket,
    /// When the media plane refused this client's SDP lately (see
    /// [`INVALID_SDP_CLOSE_AFTER`]).
    invalid_sdp: std::collections::VecDeque<Instant>,
    dropped_in_a_row: u32,
    last_rate_error: Option<Instant>,
    /// What this participant may do: everything without `--auth-secret`,
    /// else what its token grants. Set at join.
    grants: Grants,
}

impl Session {
    fn new(state: Arc<AppState>) -> Self {
        Session {
            state: state.clone(),
            participant: None,
            bucket: TokenBucket::new(RATE_PER_SEC, RATE_BURST, Instant::now()),
            offers: {
                let per_min = f64::from(state.config.max_offers_per_minute);
                TokenBucket::new(per_min / 60.0, (per_min / 4.0).max(1.0), Instant::now())
            },
            invalid_sdp: std::collections::VecDeque::new(),
            dropped_in_a_row: 0,
            last_rate_error: None,
            grants: Grants::ALL,
        }
    }

    async fn run(mut self, socket: WebSocket) {
        let (mut tx, mut rx) = socket.split();
        let mut shutdown = self.state.shutdown.clone();
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let mut last_heard = Instant::now();
        let join_deadline =
            tokio::time::sleep(Duration::from_secs(self.state.config.join_timeout_secs));
        tokio::pin!(join_deadline);
        let mut outbox: Vec<ServerMessage> = Vec::new();
        let close: Option<(u16, &'static str)> = loop {
            for msg in outbox.drain(..) {
                // While a send waits on a client that does not read, the
                // media plane goes on queueing for it: cut it once the
                // backlog passes the limit, not only when the send times out.
                let sending = send(&mut tx, &msg);
                tokio::pin!(sending);
                let mut check = tokio::time::interval(BACKLOG_CHECK);
                let sent = loop {
                    tokio::select! {
                        r = &mut sending => break r.is_ok(),
                        _ = check.tick() => {
                            if let Some(e) = self.backlog() {
                                // It reads nothing: the reason cannot reach it.
                                self.state.signaling.error(e.code);
                                info!(reason = %e.message, "slow signaling client cut");
                                return;
                            }
                        }
                    }
                };
                if !sent {
                    debug!("signaling peer not reading; dropping the session");
                    return;
                }
            }
            tokio::select! {
                frame = rx.next() => {
                    let frame = match frame {
                        Some(Ok(frame)) => frame,
                        Some(Err(e)) => {
                            // Includes frames over the WebSocket layer's size
                            // cap: the stream cannot be resynchronised.
                            debug!(error = %e, "signaling socket read failed");
                            break None;
                        }
                        None => break None,
                    };
                    last_heard = Instant::now();
                    match self.frame(frame, &mut outbox) {
                        Next::Continue => {}
                        Next::Close(code, why) => break Some((code, why)),
                    }
                }
                event = next_event(&mut self.participant) => {
                    match event {
                        Some(msg) => {
                            let next = self.event(&msg);
                            outbox.push(msg);
                            if let Some((e, code, why)) = next {
                                self.refuse(&mut outbox, e);
                                break Some((code, why));
                            }
                        }
                        // The media plane ended the session (its reason, if
                        // any, was the last message).
                        None if !self.state.ready.load(Ordering::SeqCst) => {
                            break Some((close_code::AWAY, "shutting down"))
                        }
                        None => break Some((close_code::NORMAL, "session ended")),
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > SILENCE_LIMIT {
                        debug!("signaling peer silent; closing");
                        break Some((close_code::AWAY, "no traffic"));
                    }
                    let ping = tx.send(Message::Ping(Default::default()));
                    if !matches!(tokio::time::timeout(SEND_TIMEOUT, ping).await, Ok(Ok(()))) {
                        break None;
                    }
                }
                _ = &mut join_deadline, if self.participant.is_none() => {
                    let secs = self.state.config.join_timeout_secs;
                    self.refuse(&mut outbox, SignalError::new(
                        ErrorCode::NotJoined,
                        format!("no join within {secs} s; closing"),
                    ));
                    break Some((close_code::POLICY, "no join"));
                }
                _ = stopped(&mut shutdown), if self.participant.is_none() => {
                    outbox.push(error(ErrorCode::ShuttingDown, "the server is shutting down"));
                    break Some((close_code::AWAY, "shutting down"));
                }
            }
        };
        // Leave the room now (dropping the participant), not after the
        // closing handshake: the others' rosters should not wait on it.
        if let Some(p) = self.participant.take() {
            info!(participant = p.id(), "signaling closed");
        }
        for msg in outbox.drain(..) {
            let _ = send(&mut tx, &msg).await;
        }
        if let Some((code, reason)) = close {
            close_handshake(&mut tx, &mut rx, code, reason).await;
        }
    }

    /// A message from the media plane on its way to the client: is the
    /// client keeping up, and is it still speaking sense? `Some`: close
    /// the session with this error.
    fn event(&mut self, msg: &ServerMessage) -> Option<(SignalError, u16, &'static str)> {
        if let Some(e) = self.backlog() {
            return Some((e, close_code::POLICY, "slow consumer"));
        }
        if let ServerMessage::Error {
            code: ErrorCode::InvalidSdp | ErrorCode::NoPendingOffer,
            ..
        } = msg
        {
            let now = Instant::now();
            self.invalid_sdp.push_back(now);
            while self
                .invalid_sdp
                .front()
                .is_some_and(|t| now.duration_since(*t) > INVALID_SDP_WINDOW)
            {
                self.invalid_sdp.pop_front();
            }
            if self.invalid_sdp.len() >= INVALID_SDP_CLOSE_AFTER {
                return Some((
                    SignalError::new(
                        ErrorCode::InvalidSdp,
                        format!(
                            "{INVALID_SDP_CLOSE_AFTER} SDPs refused within {} s; closing",
                            INVALID_SDP_WINDOW.as_secs()
                        ),
                    ),
                    close_code::POLICY,
                    "invalid sdp",
                ));
            }
        }
        None
    }

    /// `Some` when more messages wait for this client than
    /// `--max-queued-messages`.
    fn backlog(&self) -> Option<SignalError> {
        let queued = self.participant.as_ref().map_or(0, |p| p.queued());
        let max = self.state.config.max_queued_messages;
        (queued > max).then(|| {
            SignalError::new(
                ErrorCode::SlowConsumer,
                format!("{queued} messages were waiting for this client (limit {max}); closing"),
            )
        })
    }

    fn refuse(&self, out: &mut Vec<ServerMessage>, e: SignalError) {
        self.state.signaling.error(e.code);
        out.push(e.to_message());
    }

    fn frame(&mut self, frame: Message, out: &mut Vec<ServerMessage>) -> Next {
        if matches!(frame, Message::Close(_)) {
            return Next::Close(close_code::NORMAL, "bye");
        }
        // Every other frame counts against the rate limit, binary and
        // control frames included: each costs the server a reply.
        if let Some(next) = self.rate_limit(out) {
            return next;
        }
        let text = match frame {
            Message::Text(t) => t,
            Message::Binary(_) => {
                self.refuse(
                    out,
                    SignalError::new(
                        ErrorCode::BadMessage,
                        "binary frames are not accepted; send JSON text",
                    ),
                );
                return Next::Continue;
            }
            Message::Close(_) | Message::Ping(_) | Message::Pong(_) => return Next::Continue,
        };
        let msg = match parse_client_with(text.as_str(), &self.state.limits) {
            Ok(m) => m,
            Err(e) => {
                let code = e.code;
                self.refuse(out, e);
                if code == ErrorCode::TooLarge {
                    return Next::Close(close_code::SIZE, "message too large");
                }
                // A join whose token the parser already refuses (empty,
                // oversized) ends like any refused join.
                if code == ErrorCode::TokenInvalid && self.participant.is_none() {
                    return Next::Close(close_code::POLICY, "token refused");
                }
                return Next::Continue;
            }
        };
        self.message(msg, out)
    }

    /// Take a token for one incoming frame. `Some` when the frame must be
    /// dropped: at most one `rate_limited` reply per second, and the socket
    /// is closed once [`FLOOD_CLOSE_AFTER`] frames in a row were dropped.
    fn rate_limit(&mut self, out: &mut Vec<ServerMessage>) -> Option<Next> {
        let now = Instant::now();
        if !self.bucket.take(now) {
            self.state
                .signaling
                .rate_limited
                .fetch_add(1, Ordering::Relaxed);
            self.dropped_in_a_row += 1;
            if self.dropped_in_a_row >= FLOOD_CLOSE_AFTER {
                self.refuse(
                    out,
                    SignalError::new(ErrorCode::RateLimited, "sustained flood; closing"),
                );
                return Some(Next::Close(close_code::POLICY, "flood"));
            }
            if self
                .last_rate_error
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
            {
                self.last_rate_error = Some(now);
                self.refuse(out, SignalError::new(
                    ErrorCode::RateLimited,
                    format!("more than {RATE_PER_SEC} messages per second; messages are being dropped"),
                ));
            }
            return Some(Next::Continue);
        }
        self.dropped_in_a_row = 0;
        None
    }

    fn message(&mut self, msg: ClientMessage, out: &mut Vec<ServerMessage>) -> Next {
        match (msg, &self.participant) {
            (ClientMessage::Ping, _) => out.push(ServerMessage::Pong),
            (ClientMessage::Leave, _) => return Next::Close(close_code::NORMAL, "left"),
            (ClientMessage::Join { room, name, token }, None) => {
                let room = match RoomName::parse(&room) {
                    Ok(r) => r,
                    Err(e) => {
                        self.refuse(
                            out,
                            SignalError::new(ErrorCode::InvalidRoom, format!("room name {e}")),
                        );
                        return Next::Continue;
                    }
                };
                let name = match (&self.state.auth, token) {
                    // Open rooms: a token, if any, is not looked at.
                    (None, _) => match DisplayName::parse(&name) {
                        Ok(n) => n,
                        Err(e) => {
                            self.refuse(
                                out,
                                SignalError::new(
                                    ErrorCode::InvalidName,
                                    format!("display name {e}"),
                                ),
                            );
                            return Next::Continue;
                        }
                    },
                    (Some(_), None) => {
                        self.refuse(
                            out,
                            SignalError::new(
                                ErrorCode::TokenRequired,
                                "this node requires a room access token; join with \"token\"",
                            ),
                        );
                        return Next::Close(close_code::POLICY, "token required");
                    }
                    (Some(verifier), Some(token)) => match verifier.verify(&token, &room) {
                        Ok(access) => {
                            info!(room = %room, identity = %access.identity, grants = ?access.grants, "token accepted");
                            self.grants = access.grants;
                            access.name
                        }
                        Err(e) => {
                            debug!(room = %room, error = %e, "token refused");
                            self.refuse(out, SignalError::new(e.code(), e.to_string()));
                            return Next::Close(close_code::POLICY, "token refused");
                        }
                    },
                };
                if !self.state.ready.load(Ordering::SeqCst) {
                    out.push(error(
                        ErrorCode::ShuttingDown,
                        "the server is shutting down",
                    ));
                    return Next::Close(close_code::AWAY, "shutting down");
                }
                let permissions = sfu::Permissions {
                    publish: self.grants.publish,
                    subscribe: self.grants.subscribe,
                };
                match self.state.sfu.join_with(room, name, permissions) {
                    Ok(p) => self.participant = Some(p),
                    // Shutdown began between the check above and the join.
                    Err(_) if !self.state.ready.load(Ordering::SeqCst) => {
                        out.push(error(
                            ErrorCode::ShuttingDown,
                            "the server is shutting down",
                        ));
                        return Next::Close(close_code::AWAY, "shutting down");
                    }
                    Err(e) => {
                        self.refuse(out, SignalError::new(ErrorCode::Internal, e.to_string()));
                        return Next::Close(close_code::ERROR, "media plane unavailable");
                    }
                }
            }
            (ClientMessage::Join { .. }, Some(_)) => {
                self.refuse(
                    out,
                    SignalError::new(
                        ErrorCode::AlreadyJoined,
                        "this socket has already joined a room",
                    ),
                );
            }
            (_, None) => {
                self.refuse(
                    out,
                    SignalError::new(ErrorCode::NotJoined, "send join first"),
                );
            }
            (ClientMessage::Offer { sdp, .. }, Some(_))
                if !self.grants.publish && auth::sdp_sends_media(&sdp) =>
            {
                // Refused here, before the media plane sees it, so no track
                // of it is ever created or forwarded.
                self.refuse(
                    out,
                    SignalError::new(
                        ErrorCode::Forbidden,
                        "your token does not allow publishing: offer media only as recvonly or inactive; this offer is ignored",
                    ),
                );
            }
            (ClientMessage::Chat { .. }, Some(_)) if !self.grants.chat => {
                self.refuse(
                    out,
                    SignalError::new(
                        ErrorCode::Forbidden,
                        "your token does not allow chat; the message is not sent",
                    ),
                );
            }
            (ClientMessage::Offer { sdp, tracks }, Some(p)) => {
                if self.offers.take(Instant::now()) {
                    p.send(ParticipantCommand::Offer { sdp, tracks })
                } else {
                    let max = self.state.config.max_offers_per_minute;
                    self.refuse(
                        out,
                        SignalError::new(
                            ErrorCode::RateLimited,
                            format!("more than {max} offers per minute; this offer is ignored"),
                        ),
                    );
                }
            }
            (ClientMessage::Answer { sdp }, Some(p)) => p.send(ParticipantCommand::Answer { sdp }),
            (ClientMessage::Chat { text }, Some(p)) => p.send(ParticipantCommand::Chat { text }),
            (ClientMessage::Mute { audio, video }, Some(p)) => {
                p.send(ParticipantCommand::Mute { audio, video })
            }
        }
        Next::Continue
    }
}

fn error(code: ErrorCode, message: &str) -> ServerMessage {
    ServerMessage::Error {
        code,
        message: message.into(),
    }
}

async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn next_event(p: &mut Option<Participant>) -> Option<ServerMessage> {
    match p {
        Some(p) => p.recv().await,
        None => std::future::pending().await,
    }
}

async fn send<S>(tx: &mut S, msg: &ServerMessage) -> Result<(), axum::Error>
where
    S: SinkExt<Message, Error = axum::Error> + Unpin,
{
    let text = serde_json::to_string(msg).unwrap_or_else(|_| {
        r#"{"type":"error","code":"internal","message":"encoding failed"}"#.into()
    });
    match tokio::time::timeout(SEND_TIMEOUT, tx.send(Message::Text(text.into()))).await {
        Ok(r) => r,
        Err(_) => Err(axum::Error::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "peer did not read in time",
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(20.0, 40.0, t0);
        assert_eq!((0..100).filter(|_| b.take(t0)).count(), 40);
        // One second later: 20 more.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| b.take(t1)).count(), 20);
        // Long idle refills only up to the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..100).filter(|_| b.take(t2)).count(), 40);
    }
}
