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
/// Longest SDP the server accepts (bytes).
pub const MAX_SDP_BYTES: usize = 100 * 1024;
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
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(SignalError::new(
            ErrorCode::TooLarge,
            format!(
                "message is {} bytes; the limit is {MAX_MESSAGE_BYTES}",
                text.len()
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
    check_limits(&msg)?;
    Ok(msg)
}

fn check_limits(msg: &ClientMessage) -> Result<(), SignalError> {
    match msg {
        ClientMessage::Offer { sdp, tracks } => {
            check_sdp(sdp)?;
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
        ClientMessage::Answer { sdp } => check_sdp(sdp),
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

fn check_sdp(sdp: &str) -> Result<(), SignalError> {
    if sdp.len() > MAX_SDP_BYTES {
        return Err(SignalError::new(ErrorCode::TooLarge, "SDP too large"));
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
}
