//! Room access tokens: HS256 JWTs signed with `--auth-secret`.
//!
//! The token is the whole authorization: it names the room, who the
//! participant is, what they may do, and until when. Nothing in it or in
//! its check is node-specific, so every node of a cluster started with the
//! same secret accepts the same tokens, and an application backend can mint
//! them with any JWT library (the claims are documented in SIGNALING.md).
//! The token is checked once, at `join`; a session that joined in time is
//! not cut when the token expires later (rejoining needs a fresh one).

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use signal::{DisplayName, ErrorCode, RoomName};

/// Shortest `--auth-secret` accepted. Anyone holding one token can test
/// guesses of the secret offline, as fast as they can compute HMACs; RFC
/// 7518 asks HS256 keys to be at least as long as the hash (256 bits).
pub const MIN_SECRET_BYTES: usize = 32;
/// Longest identity (`sub`) accepted: it is logged, so it is bounded.
pub const MAX_IDENTITY_BYTES: usize = 256;
/// Clock difference between the minting host and a node that a token's
/// `exp` and `nbf` tolerate.
const LEEWAY_SECS: u64 = 60;

/// What a participant may do. A grant missing from a token is not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    /// Send camera, microphone or screen (offer sending m-lines).
    #[serde(default)]
    pub publish: bool,
    /// Receive the others' media.
    #[serde(default)]
    pub subscribe: bool,
    /// Send chat lines (everyone still receives the room's chat).
    #[serde(default)]
    pub chat: bool,
}

impl Grants {
    /// Everything: a node without `--auth-secret`, or a token with every grant.
    pub const ALL: Grants = Grants {
        publish: true,
        subscribe: true,
        chat: true,
    };
}

/// The token's payload (the contract in SIGNALING.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub room: String,
    /// The participant's identity, chosen by whoever mints the token.
    pub sub: String,
    /// The display name; replaces the `join`'s `name`.
    pub name: String,
    pub grants: Grants,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not valid before (checked when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the auth secret must be at least {MIN_SECRET_BYTES} bytes")]
    WeakSecret,
    #[error("the token has expired; ask for a new one")]
    Expired,
    #[error("the token is for room {token:?}, not {join:?}")]
    WrongRoom { token: String, join: String },
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("cannot mint the token: {0}")]
    Mint(String),
}

impl AuthError {
    /// The error code a client gets for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Expired => ErrorCode::TokenExpired,
            AuthError::WrongRoom { .. } => ErrorCode::TokenWrongRoom,
            AuthError::Invalid(_) | AuthError::WeakSecret | AuthError::Mint(_) => {
                ErrorCode::TokenInvalid
            }
        }
    }
}

/// What a valid token admits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub identity: String,
    pub name: DisplayName,
    pub grants: Grants,
}

/// Checks tokens against one secret.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier(***)")
    }
}

/// jsonwebtoken picks its crypto provider from its features; with exactly
/// one (aws-lc, ours) it needs no setup. Installing it explicitly keeps
/// signing and checking working should another crate in the build ever
/// enable the second provider too (jsonwebtoken would then panic instead).
fn install_crypto() {
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
}

impl Verifier {
    pub fn new(secret: &[u8]) -> Result<Verifier, AuthError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(AuthError::WeakSecret);
        }
        install_crypto();
        let key =
            DecodingKey::from_secret(secret).map_err(|e| AuthError::Invalid(e.to_string()))?;
        // HS256 only: a token whose header names another algorithm (`none`,
        // RS256 with our secret as a "public key") is refused before any
        // signature check.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        // Tokens carry no audience; one with an `aud` is not refused for it.
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Verifier { key, validation })
    }

    /// Check `token` for a join of `room`: signature, expiry, claims, room.
    pub fn verify(&self, token: &str, room: &RoomName) -> Result<Access, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => {
                    AuthError::Invalid("the signature does not match this node's secret".into())
                }
                ErrorKind::ImmatureSignature => AuthError::Invalid("not valid yet (nbf)".into()),
                ErrorKind::InvalidAlgorithm => {
                    AuthError::Invalid("the algorithm must be HS256".into())
                }
                ErrorKind::MissingRequiredClaim(c) => AuthError::Invalid(format!("no `{c}` claim")),
                ErrorKind::Json(e) => AuthError::Invalid(format!("bad claims: {e}")),
                _ => AuthError::Invalid("malformed token".into()),
            },
        )?;
        let claims = data.claims;
        if claims.room != room.as_str() {
            return Err(AuthError::WrongRoom {
                token: claims.room.chars().take(64).collect(),
                join: room.as_str().to_owned(),
            });
        }
        if claims.sub.is_empty()
            || claims.sub.len() > MAX_IDENTITY_BYTES
            || claims.sub.chars().any(char::is_control)
        {
            return Err(AuthError::Invalid(format!(
                "`sub` must be 1-{MAX_IDENTITY_BYTES} bytes without control characters"
            )));
        }
        let name = DisplayName::parse(&claims.name)
            .map_err(|e| AuthError::Invalid(format!("display name {e}")))?;
        Ok(Access {
            identity: claims.sub,
            name,
            grants: claims.grants,
        })
    }
}

/// Sign `claims` with `secret` (what `switchboard token` does).
pub fn mint(secret: &[u8], claims: &Claims) -> Result<String, AuthError> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(AuthError::WeakSecret);
    }
    install_crypto();
    let key = EncodingKey::from_secret(secret).map_err(|e| AuthError::Mint(e.to_string()))?;
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key)
        .map_err(|e| AuthError::Mint(e.to_string()))
}

/// Seconds since the Unix epoch (the clock tokens are checked against).
pub fn now_secs() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Whether a client's SDP offer sends media: an audio or video (any
/// non-`application`) m-section that is not rejected (port 0 without
/// `a=bundle-only`) and whose direction — its own attribute, else the
/// session's, else `sendrecv` (RFC 3264's default) — is `sendrecv` or
/// `sendonly`. A participant without the publish grant may offer only
/// `recvonly`/`inactive` media and data channels.
pub fn sdp_sends_media(sdp: &str) -> bool {
    #[derive(Default)]
    struct Section<'a> {
        media: bool,
        port_zero: bool,
        bundle_only: bool,
        direction: Option<&'a str>,
    }
    fn sends(s: &Section<'_>, session: Option<&str>) -> bool {
        let rejected = s.port_zero && !s.bundle_only;
        let dir = s.direction.or(session).unwrap_or("sendrecv");
        s.media && !rejected && matches!(dir, "sendrecv" | "sendonly")
    }
    let mut session: Option<&str> = None;
    let mut current: Option<Section<'_>> = None;
    for line in sdp.lines().map(str::trim) {
        if let Some(m) = line.strip_prefix("m=") {
            if let Some(s) = current.take()
                && sends(&s, session)
            {
                return true;
            }
            let mut fields = m.split_ascii_whitespace();
            let kind = fields.next().unwrap_or("");
            let port = fields.next().unwrap_or("");
            current = Some(Section {
                media: kind != "application",
                // `9/2` (port and count) is a port too; only 0 rejects.
                port_zero: port.split('/').next() == Some("0"),
                ..Default::default()
            });
            continue;
        }
        let dir = match line {
            "a=sendrecv" | "a=sendonly" | "a=recvonly" | "a=inactive" => Some(&line[2..]),
            _ => None,
        };
        match (&mut current, dir) {
            (Some(s), Some(d)) => s.direction = Some(d),
            (Some(s), None) if line == "a=bundle-only" => s.bundle_only = true,
            (None, Some(d)) => session = Some(d),
            _ => {}
        }
    }
    current.is_some_and(|s| sends(&s, session))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn claims(room: &str) -> Claims {
        Claims {
            room: room.into(),
            sub: "user-1".into(),
            name: "Ada".into(),
            grants: Grants::ALL,
            exp: now_secs() + 600,
            iat: Some(now_secs()),
            nbf: None,
        }
    }

    fn room(r: &str) -> RoomName {
        RoomName::parse(r).unwrap()
    }

    #[test]
    fn a_minted_token_verifies_and_names_the_participant() {
        let v = Verifier::new(SECRET).unwrap();
        let mut c = claims("standup");
        c.grants.publish = false;
        let a = v
            .verify(&mint(SECRET, &c).unwrap(), &room("standup"))
            .unwrap();
        assert_eq!(a.identity, "user-1");
        assert_eq!(a.name.as_str(), "Ada");
        assert!(!a.grants.publish && a.grants.subscribe && a.grants.chat);
    }

    #[test]
    fn refusals_have_their_codes() {
        let v = Verifier::new(SECRET).unwrap();
        let code = |t: &str, r: &str| v.verify(t, &room(r)).unwrap_err().code();
        let ok = mint(SECRET, &claims("a")).unwrap();
        assert_eq!(code(&ok, "b"), ErrorCode::TokenWrongRoom);
        let mut old = claims("a");
        old.exp = now_secs() - 3600;
        assert_eq!(
            code(&mint(SECRET, &old).unwrap(), "a"),
            ErrorCode::TokenExpired
        );
        let other = mint(b"another secret, also 32 bytes long", &claims("a")).unwrap();
        assert_eq!(code(&other, "a"), ErrorCode::TokenInvalid);
        let mut early = claims("a");
        early.nbf = Some(now_secs() + 3600);
        assert_eq!(
            code(&mint(SECRET, &early).unwrap(), "a"),
            ErrorCode::TokenInvalid
        );
        let mut bad_name = claims("a");
        bad_name.name = "\u{7}".into();
        assert_eq!(
            code(&mint(SECRET, &bad_name).unwrap(), "a"),
            ErrorCode::TokenInvalid
        );
        for junk in ["", "x", "a.b.c", "....", &ok[..ok.len() - 2]] {
            assert_eq!(code(junk, "a"), ErrorCode::TokenInvalid, "{junk}");
        }
        // alg none: the payload of a valid token, no signature.
        let payload = ok.split('.').nth(1).unwrap();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        assert_eq!(code(&none, "a"), ErrorCode::TokenInvalid);
    }

    #[test]
    fn a_token_without_grants_or_expiry_is_invalid() {
        let v = Verifier::new(SECRET).unwrap();
        let key = EncodingKey::from_secret(SECRET).unwrap();
        let sign = |v: serde_json::Value| {
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &v, &key).unwrap()
        };
        let exp = now_secs() + 600;
        let no_grants = sign(serde_json::json!({"room":"a","sub":"u","name":"n","exp":exp}));
        let no_exp = sign(serde_json::json!({"room":"a","sub":"u","name":"n","grants":{}}));
        for t in [no_grants, no_exp] {
            assert_eq!(
                v.verify(&t, &room("a")).unwrap_err().code(),
                ErrorCode::TokenInvalid
            );
        }
        // A missing grant is not given.
        let partial = sign(serde_json::json!(
            {"room":"a","sub":"u","name":"n","exp":exp,"grants":{"chat":true}}
        ));
        let g = v.verify(&partial, &room("a")).unwrap().grants;
        assert_eq!(
            g,
            Grants {
                publish: false,
                subscribe: false,
                chat: true
            }
        );
    }

    #[test]
    fn short_secrets_are_refused() {
        assert_eq!(Verifier::new(b"short").unwrap_err(), AuthError::WeakSecret);
        assert_eq!(
            mint(b"short", &claims("a")).unwrap_err(),
            AuthError::WeakSecret
        );
    }

    #[test]
    fn sending_m_lines_are_found() {
        let sdp = |body: &str| format!("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n{body}");
        let app = "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:0\r\n";
        assert!(!sdp_sends_media(&sdp(app)), "a data channel only");
        assert!(!sdp_sends_media(&sdp(&format!(
            "{app}m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\na=recvonly\r\n\
             m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=inactive\r\n"
        ))));
        assert!(sdp_sends_media(&sdp(&format!(
            "{app}m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:1\r\na=sendrecv\r\n"
        ))));
        assert!(sdp_sends_media(&sdp(
            "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\na=sendonly\r\n"
        )));
        // No direction anywhere: sendrecv.
        assert!(sdp_sends_media(&sdp("m=audio 9 RTP/AVP 0\r\n")));
        // The session's direction applies to sections without their own.
        assert!(!sdp_sends_media(&sdp(
            "a=recvonly\r\nm=audio 9 RTP/AVP 0\r\n"
        )));
        assert!(sdp_sends_media(&sdp(
            "a=recvonly\r\nm=audio 9 RTP/AVP 0\r\na=sendonly\r\n"
        )));
        // Rejected (port 0) sections send nothing, unless bundle-only.
        assert!(!sdp_sends_media(&sdp(
            "m=audio 0 RTP/AVP 0\r\na=sendrecv\r\n"
        )));
        assert!(sdp_sends_media(&sdp(
            "m=audio 0 RTP/AVP 0\r\na=bundle-only\r\na=sendrecv\r\n"
        )));
        // LF-only line ends and surrounding junk do not hide a sender.
        assert!(sdp_sends_media("v=0\nm=video 9 X 96\na=sendrecv  \n"));
        assert!(!sdp_sends_media("v=0"));
    }
}
