//! The browser signaling protocol (one WebSocket per participant at `/ws`).
//!
//! Every message is a JSON object with a `"type"` field. This crate holds the
//! message types, the validated names, the error codes and the parser that
//! maps every malformed input to a precise [`ErrorCode`]. It is shared by the
//! server (`switchboard`), the media plane (`sfu`, which emits
//! [`ServerMessage`]s) and the test client (`testkit`), so the three can never
//! disagree about the wire format. `docs/SIGNALING.md` is the prose version.

mod names;

pub use names::{DisplayName, NameError, RoomName};

use serde::{Deserialize, Serialize};

/// Largest text frame the server accepts. SDP offers from a browser with a
/// dozen transceivers are ~20 KiB; 128 KiB leaves room without letting one
/// client make the server buffer megabytes.
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024;
/// Longest chat message, in Unicode scalar values.
pub const MAX_CHAT_CHARS: usize = 2000;
/// Longest SDP the server accepts (bytes) by default ([`Limits::default`]);
/// a node sizes its own from its room limits ([`Limits::for_rooms`]).
pub const MAX_SDP_BYTES: usize = 100 * 1024;
/// SDP bytes budgeted per m-line when sizing limits to a room: a browser's
/// answer to a server offer carries every codec of str0m's default set,
/// ~2.2 KB per m-line measured from Chromium (BENCHMARKS.md, churn soak);
/// 3 KiB leaves room for longer candidates and extensions.
pub const SDP_BYTES_PER_MLINE: usize = 3 * 1024;
/// SDP bytes budgeted beyond the m-lines (session part, data channel).
const SDP_BASE_BYTES: usize = 16 * 1024;

/// Size limits of one client message. A subscriber's SDP holds one m-line
/// per track it receives, so a fixed cap cuts subscribers of big rooms
/// (the churn soak lost every subscriber of a room with more than ~22
/// audio+video publishers at 100 KiB): a node derives its limits from how
/// many tracks one room may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest text frame (bytes).
    pub max_message_bytes: usize,
    /// Longest SDP in an offer or answer (bytes).
    pub max_sdp_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: MAX_MESSAGE_BYTES,
            max_sdp_bytes: MAX_SDP_BYTES,
        }
    }
}

impl Limits {
    /// Limits that fit a room of `max_participants`, each publishing up to
    /// `max_tracks`: a participant's SDP may then hold every track of the
    /// room (its own and everyone else's) at [`SDP_BYTES_PER_MLINE`] each.
    /// Never below the defaults. The message limit adds JSON's escaping of
    /// the SDP (`\r\n` becomes four bytes: under 1/8 for SDP lines of 30
    /// bytes or more) and an offer's track list.
    pub fn for_rooms(max_participants: usize, max_tracks: usize) -> Limits {
        let mlines = max_participants.max(1).saturating_mul(max_tracks.max(1));
        let sdp = SDP_BASE_BYTES
            .saturating_add(mlines.saturating_mul(SDP_BYTES_PER_MLINE))
            .max(MAX_SDP_BYTES);
        let message = sdp.saturating_add(sdp / 8).saturating_add(16 * 1024);
        Limits {
            max_message_bytes: message.max(MAX_MESSAGE_BYTES),
            max_sdp_bytes: sdp,
        }
    }
}
/// Most tracks one participant may describe in one offer.
pub const MAX_TRACKS_PER_OFFER: usize = 16;
/// Longest room access token (bytes). A token carries a handful of short
/// claims (~300 bytes); 4 KiB leaves room for an issuer's extra claims
/// without letting a client make the server verify megabytes.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Messages a browser sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// First message: enter `room` as `name`. `token` is the room access
    /// token (a signed JWT); a node started with `--auth-secret` requires
    /// it, and then the token's display name replaces `name`. Absent from
    /// the JSON when `None`, so a join without a token stays as it was.
    Join {
        room: String,
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// The browser's own offer (it adds or removes tracks it publishes).
    /// `tracks` says what each of its sending transceivers carries, by mid.
    Offer {
        sdp: String,
        #[serde(default)]
        tracks: Vec<TrackSource>,
    },
    /// The browser's answer to a server offer.
    Answer { sdp: String },
    /// A chat line to everyone in the room.
    Chat { text: String },
    /// The participant's own mute state, shown to everyone in the roster.
    Mute { audio: bool, video: bool },
    /// Application-level keepalive; answered with `pong`.
    Ping,
    /// Leave the room; the server closes the socket afterwards.
    Leave,
}

/// What one sending transceiver of a browser carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackSource {
    pub mid: String,
    pub source: Source,
}

/// Where a track comes from. Lets the page lay out screens differently from cameras.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Camera,
    Microphone,
    Screen,
    ScreenAudio,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Audio,
    Video,
}

/// Messages the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Reply to `join`: who you are. A `roster` follows at once.
    Joined {
        participant_id: String,
        room: String,
        name: String,
    },
    /// The server's offer (tracks to receive appeared or disappeared).
    /// `tracks` names what every forwarding m-line of the offer carries
    /// now. It, not the SDP's `a=msid`, is authoritative: an m-line whose
    /// track went away is made `inactive` and later given to the next track
    /// of its kind, keeping the msid it was created with (see SIGNALING.md).
    Offer {
        sdp: String,
        #[serde(default)]
        tracks: Vec<OfferedTrack>,
    },
    /// The server's answer to the browser's offer.
    Answer {
        sdp: String,
    },
    /// The whole room as it is now; sent after every change.
    Roster {
        participants: Vec<ParticipantView>,
    },
    /// A chat line. `from` is a participant id.
    Chat {
        from: String,
        name: String,
        text: String,
        /// Milliseconds since the Unix epoch, server clock.
        ts: u64,
    },
    Pong,
    /// Something the client sent was refused, or the server is closing the session.
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// What one forwarding m-line of a server offer carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferedTrack {
    pub mid: String,
    /// The roster's track id (`TrackView::id`).
    pub track: String,
    /// The publishing participant's id.
    pub participant: String,
}

/// One participant as everyone sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParticipantView {
    pub id: String,
    pub name: String,
    pub audio_muted: bool,
    pub video_muted: bool,
    pub tracks: Vec<TrackView>,
}

/// One published track. `id` names it in a server offer's `tracks` (and is
/// the `msid` track id of the m-line first made for it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrackView {
    pub id: String,
    pub kind: Kind,
    pub source: Source,
}

/// Error codes of `{"type":"error"}` replies. Stable strings: clients switch on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not valid JSON, not an object, or not UTF-8 text.
    BadJson,
    /// `type` missing or not one this server knows.
    UnknownType,
    /// Right type, wrong fields (missing, extra, wrong JSON type).
    BadMessage,
    /// Frame larger than [`MAX_MESSAGE_BYTES`] (the socket is closed after this).
    TooLarge,
    InvalidRoom,
    InvalidName,
    /// A message that needs a joined session arrived before `join`.
    NotJoined,
    AlreadyJoined,
    /// The SDP was refused by the media plane.
    InvalidSdp,
    /// An answer arrived when no server offer was pending.
    NoPendingOffer,
    ChatTooLong,
    /// Too many messages; the server drops them until the rate falls.
    RateLimited,
    /// The room or the node is full.
    Full,
    /// The media connection failed or timed out; the session is over.
    Disconnected,
    /// The node is shutting down.
    ShuttingDown,
    /// The client did not read its messages: more were waiting than the
    /// server keeps for one client (the socket is closed after this).
    SlowConsumer,
    Internal,
    /// The node requires a room access token and the `join` had none (the
    /// socket is closed after this).
    TokenRequired,
    /// The token is not one this node accepts: bad signature, malformed,
    /// missing or bad claims, not valid yet (the socket is closed after this).
    TokenInvalid,
    /// The token's `exp` has passed: ask for a new one (the socket is closed
    /// after this).
    TokenExpired,
    /// The token names another room than the `join` (the socket is closed
    /// after this).
    TokenWrongRoom,
    /// The token does not grant this action (publish or chat); the message
    /// is ignored and the session goes on.
    Forbidden,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::AlreadyJoined => "already_joined",
            ErrorCode::InvalidSdp => "invalid_sdp",
            ErrorCode::NoPendingOffer => "no_pending_offer",
            ErrorCode::ChatTooLong => "chat_too_long",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Full => "full",
            ErrorCode::Disconnected => "disconnected",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::Internal => "internal",
            ErrorCode::TokenRequired => "token_required",
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TokenWrongRoom => "token_wrong_room",
            ErrorCode::Forbidden => "forbidden",
        }
    }
}

/// A refused client message: the code and a human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct SignalError {
    pub code: ErrorCode,
    pub message: String,
}

impl SignalError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        SignalError {
            code,
            message: message.into(),
        }
    }

    pub fn to_message(&self) -> ServerMessage {
        ServerMessage::Error {
            code: self.code,
            message: self.message.clone(),
        }
    }
}

const CLIENT_TYPES: &[&str] = &["join", "offer", "answer", "chat", "mute", "ping", "leave"];

/// Parse one text frame from a browser, telling apart bad JSON, an unknown
/// type and bad fields. Size and content limits (SDP size, chat length,
/// track count) are checked here too; room and display names are checked by
/// [`RoomName::parse`] / [`DisplayName::parse`] when a `join` is handled.
pub fn parse_client(text: &str) -> Result<ClientMessage, SignalError> {
    parse_client_with(text, &Limits::default())
}

/// [`parse_client`] with a node's own [`Limits`].
pub fn parse_client_with(text: &str, limits: &Limits) -> Result<ClientMessage, SignalError> {
    if text.len() > limits.max_message_bytes {
        return Err(SignalError::new(
            ErrorCode::TooLarge,
            format!(
                "message is {} bytes; the limit is {}",
                text.len(),
                limits.max_message_bytes
            ),
        ));
    }
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| SignalError::new(ErrorCode::BadJson, format!("not valid JSON: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err(SignalError::new(
            ErrorCode::BadJson,
            "a message must be a JSON object",
        ));
    };
    match obj.get("type") {
        // Only an SDP grows with the room; everything else keeps the
        // default frame limit.
        Some(serde_json::Value::String(t))
            if text.len() > MAX_MESSAGE_BYTES && t != "offer" && t != "answer" =>
        {
            return Err(SignalError::new(
                ErrorCode::TooLarge,
                format!(
                    "a {} message is {} bytes; the limit is {MAX_MESSAGE_BYTES}",
                    t.chars().take(32).collect::<String>(),
                    text.len()
                ),
            ));
        }
        Some(serde_json::Value::String(t)) if CLIENT_TYPES.contains(&t.as_str()) => {}
        Some(serde_json::Value::String(t)) => {
            let shown: String = t.chars().take(32).collect();
            return Err(SignalError::new(
                ErrorCode::UnknownType,
                format!("unknown message type {shown:?}"),
            ));
        }
        _ => {
            return Err(SignalError::new(
                ErrorCode::UnknownType,
                "a message needs a string field \"type\"",
            ));
        }
    }
    let msg: ClientMessage = serde_json::from_value(value)
        .map_err(|e| SignalError::new(ErrorCode::BadMessage, format!("bad fields: {e}")))?;
    check_limits(&msg, limits)?;
    Ok(msg)
}

fn check_limits(msg: &ClientMessage, limits: &Limits) -> Result<(), SignalError> {
    match msg {
        ClientMessage::Offer { sdp, tracks } => {
            check_sdp(sdp, limits)?;
            if tracks.len() > MAX_TRACKS_PER_OFFER {
                return Err(SignalError::new(
                    ErrorCode::BadMessage,
                    format!("at most {MAX_TRACKS_PER_OFFER} tracks per offer"),
                ));
            }
            if tracks.iter().any(|t| t.mid.is_empty() || t.mid.len() > 32) {
                return Err(SignalError::new(
                    ErrorCode::BadMessage,
                    "a track mid must be 1-32 bytes",
                ));
            }
            Ok(())
        }
        ClientMessage::Answer { sdp } => check_sdp(sdp, limits),
        ClientMessage::Join {
            token: Some(token), ..
        } if token.is_empty() || token.len() > MAX_TOKEN_BYTES => Err(SignalError::new(
            ErrorCode::TokenInvalid,
            format!("a token must be 1-{MAX_TOKEN_BYTES} bytes"),
        )),
        ClientMessage::Chat { text } => {
            let n = text.chars().count();
            if n == 0 || text.trim().is_empty() {
                return Err(SignalError::new(
                    ErrorCode::BadMessage,
                    "empty chat message",
                ));
            }
            if n > MAX_CHAT_CHARS {
                return Err(SignalError::new(
                    ErrorCode::ChatTooLong,
                    format!("chat message is {n} characters; the limit is {MAX_CHAT_CHARS}"),
                ));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn check_sdp(sdp: &str, limits: &Limits) -> Result<(), SignalError> {
    if sdp.len() > limits.max_sdp_bytes {
        return Err(SignalError::new(
            ErrorCode::TooLarge,
            format!(
                "SDP is {} bytes; the limit is {} (sized to this node's room limits)",
                sdp.len(),
                limits.max_sdp_bytes
            ),
        ));
    }
    if !sdp.starts_with("v=0") {
        return Err(SignalError::new(
            ErrorCode::InvalidSdp,
            "SDP must start with v=0",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        parse_client(text).unwrap_err().code
    }

    #[test]
    fn parses_every_client_type() {
        assert_eq!(
            parse_client(r#"{"type":"join","room":"a","name":"b"}"#).unwrap(),
            ClientMessage::Join {
                room: "a".into(),
                name: "b".into(),
                token: None,
            }
        );
        assert!(matches!(
            parse_client(r#"{"type":"offer","sdp":"v=0\r\n","tracks":[{"mid":"0","source":"camera"}]}"#).unwrap(),
            ClientMessage::Offer { tracks, .. } if tracks.len() == 1
        ));
        assert_eq!(
            parse_client(r#"{"type":"ping"}"#).unwrap(),
            ClientMessage::Ping
        );
        assert_eq!(
            parse_client(r#"{"type":"leave"}"#).unwrap(),
            ClientMessage::Leave
        );
        assert_eq!(
            parse_client(r#"{"type":"mute","audio":true,"video":false}"#).unwrap(),
            ClientMessage::Mute {
                audio: true,
                video: false
            }
        );
    }

    #[test]
    fn classifies_bad_input() {
        assert_eq!(code("{"), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::BadJson);
        assert_eq!(code(r#"{"room":"a"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":7}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"explode"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"join","room":"a"}"#), ErrorCode::BadMessage);
        assert_eq!(
            code(r#"{"type":"join","room":"a","name":"b","x":1}"#),
            ErrorCode::BadMessage
        );
        assert_eq!(
            code(r#"{"type":"answer","sdp":"hello"}"#),
            ErrorCode::InvalidSdp
        );
        assert_eq!(
            code(r#"{"type":"chat","text":"   "}"#),
            ErrorCode::BadMessage
        );
        let long = format!(
            r#"{{"type":"chat","text":"{}"}}"#,
            "x".repeat(MAX_CHAT_CHARS + 1)
        );
        assert_eq!(code(&long), ErrorCode::ChatTooLong);
        let huge = format!(
            r#"{{"type":"chat","text":"{}"}}"#,
            "x".repeat(MAX_MESSAGE_BYTES)
        );
        assert_eq!(code(&huge), ErrorCode::TooLarge);
    }

    #[test]
    fn join_takes_an_optional_token() {
        let with = parse_client(r#"{"type":"join","room":"r","name":"n","token":"a.b.c"}"#);
        assert_eq!(
            with.unwrap(),
            ClientMessage::Join {
                room: "r".into(),
                name: "n".into(),
                token: Some("a.b.c".into()),
            }
        );
        // Without one the wire form is unchanged: no `"token":null`.
        let without = ClientMessage::Join {
            room: "r".into(),
            name: "n".into(),
            token: None,
        };
        assert_eq!(
            serde_json::to_string(&without).unwrap(),
            r#"{"type":"join","room":"r","name":"n"}"#
        );
        assert_eq!(
            code(r#"{"type":"join","room":"r","name":"n","token":""}"#),
            ErrorCode::TokenInvalid
        );
        assert_eq!(
            code(r#"{"type":"join","room":"r","name":"n","token":7}"#),
            ErrorCode::BadMessage
        );
        let long = format!(
            r#"{{"type":"join","room":"r","name":"n","token":"{}"}}"#,
            "x".repeat(MAX_TOKEN_BYTES + 1)
        );
        assert_eq!(code(&long), ErrorCode::TokenInvalid);
    }

    #[test]
    fn server_messages_are_tagged() {
        let m = ServerMessage::Error {
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
        };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(
            s,
            r#"{"type":"error","code":"rate_limited","message":"slow down"}"#
        );
        for c in [
            ErrorCode::BadJson,
            ErrorCode::NoPendingOffer,
            ErrorCode::ShuttingDown,
            ErrorCode::SlowConsumer,
            ErrorCode::TokenRequired,
            ErrorCode::TokenInvalid,
            ErrorCode::TokenExpired,
            ErrorCode::TokenWrongRoom,
            ErrorCode::Forbidden,
        ] {
            assert_eq!(
                serde_json::to_value(c).unwrap(),
                serde_json::Value::String(c.as_str().into())
            );
        }
    }

    #[test]
    fn limits_grow_with_the_room_and_never_shrink_below_the_defaults() {
        let small = Limits::for_rooms(1, 1);
        assert_eq!(small.max_sdp_bytes, MAX_SDP_BYTES);
        assert!(small.max_message_bytes >= MAX_MESSAGE_BYTES);
        let big = Limits::for_rooms(100, 8);
        assert!(big.max_sdp_bytes >= 800 * SDP_BYTES_PER_MLINE, "{big:?}");
        assert!(big.max_message_bytes > big.max_sdp_bytes + big.max_sdp_bytes / 8);
        // An answer of 60 m-lines at the measured ~2.2 KB each: over the
        // default, within a 40-participant room's limits.
        let sdp = format!("v=0\r\n{}", "a=x\r\n".repeat(60 * 2200 / 5));
        let msg = serde_json::json!({"type": "answer", "sdp": sdp}).to_string();
        assert_eq!(parse_client(&msg).unwrap_err().code, ErrorCode::TooLarge);
        let room = Limits::for_rooms(40, 2);
        assert!(matches!(
            parse_client_with(&msg, &room),
            Ok(ClientMessage::Answer { .. })
        ));
        assert!(Limits::for_rooms(usize::MAX, usize::MAX).max_sdp_bytes == usize::MAX);
        // Only offers and answers get the room-sized limit.
        let chat = serde_json::json!({"type": "chat", "text": "x".repeat(200 * 1024)}).to_string();
        assert_eq!(
            parse_client_with(&chat, &room).unwrap_err().code,
            ErrorCode::TooLarge
        );
    }
}
