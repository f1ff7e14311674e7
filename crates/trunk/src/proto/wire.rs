//! Wire format: control-stream frames and media datagram headers.
//!
//! A frame is `u32 big-endian length` + `version byte` + the [`Message`] in
//! postcard (a compact serde format: varints, no field names). The length is
//! checked against [`MAX_FRAME`] before anything else, so a peer cannot make
//! us buffer or allocate more than that; postcard itself never allocates more
//! than the input it was given. A media datagram is `varint wire_id` +
//! `varint origin time` + one RTP packet, untouched; wire id 0 marks a
//! control datagram (a NACK), see [`DatagramMessage`].

use super::error::DecodeError;
use super::types::{
    CloseCode, Generation, Gens, Incarnation, Layer, NodeId, ParticipantId, ParticipantInfo,
    RoomName, TrackInfo, WireId,
};
use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change of [`Message`] or of the datagram
/// format; checked in every frame and in Hello. 2: datagrams carry the
/// origin time; NACK datagrams.
pub const PROTOCOL_VERSION: u8 = 2;
/// Largest frame body (version byte + message) accepted or produced.
pub const MAX_FRAME: usize = 64 * 1024;
/// Largest `Data` payload; leaves room for the envelope within [`MAX_FRAME`].
pub const MAX_DATA_PAYLOAD: usize = 60 * 1024;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Every control message. Room-scoped ones carry `room` and [`Gens`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Hello {
        node_id: NodeId,
        incarnation: Incarnation,
        version: u8,
        cluster: String,
    },
    Ping {
        seq: u64,
    },
    Pong {
        seq: u64,
    },
    Open {
        room: RoomName,
        generation: Generation,
    },
    Close {
        room: RoomName,
        generation: Generation,
    },
    ParticipantJoined {
        room: RoomName,
        gens: Gens,
        participant: ParticipantInfo,
    },
    ParticipantLeft {
        room: RoomName,
        gens: Gens,
        participant: ParticipantId,
    },
    TrackAdded {
        room: RoomName,
        gens: Gens,
        wire_id: WireId,
        track: TrackInfo,
    },
    TrackRemoved {
        room: RoomName,
        gens: Gens,
        wire_id: WireId,
    },
    Subscribe {
        room: RoomName,
        gens: Gens,
        wire_id: WireId,
        layer: Layer,
    },
    Unsubscribe {
        room: RoomName,
        gens: Gens,
        wire_id: WireId,
        layer: Layer,
    },
    KeyframeRequest {
        room: RoomName,
        gens: Gens,
        wire_id: WireId,
    },
    Data {
        room: RoomName,
        gens: Gens,
        from: ParticipantId,
        payload: Vec<u8>,
    },
    Goodbye {
        reason: CloseCode,
    },
}

impl Message {
    /// Short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::Open { .. } => "open",
            Message::Close { .. } => "close",
            Message::ParticipantJoined { .. } => "participant_joined",
            Message::ParticipantLeft { .. } => "participant_left",
            Message::TrackAdded { .. } => "track_added",
            Message::TrackRemoved { .. } => "track_removed",
            Message::Subscribe { .. } => "subscribe",
            Message::Unsubscribe { .. } => "unsubscribe",
            Message::KeyframeRequest { .. } => "keyframe_request",
            Message::Data { .. } => "data",
            Message::Goodbye { .. } => "goodbye",
        }
    }
}

/// Encode `msg` as one complete frame (length prefix included), appended to `out`.
pub fn encode_frame_into(msg: &Message, out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let start = out.len();
    out.extend_from_slice(&[0; LEN_PREFIX]);
    out.push(PROTOCOL_VERSION);
    let mut out_vec = std::mem::take(out);
    out_vec =
        postcard::to_extend(msg, out_vec).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    *out = out_vec;
    let body = out.len() - start - LEN_PREFIX;
    if body > MAX_FRAME {
        out.truncate(start);
        return Err(DecodeError::TooLarge(body));
    }
    let len = u32::try_from(body).map_err(|_| DecodeError::TooLarge(body))?;
    out[start..start + LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Encode `msg` as one complete frame (length prefix included).
pub fn encode_frame(msg: &Message) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(64);
    encode_frame_into(msg, &mut out)?;
    Ok(out)
}

/// Find the first complete frame in a stream buffer. `Ok(None)` means more
/// bytes are needed; otherwise returns the frame body (without prefix) and
/// how many bytes of `buf` it used. A length over [`MAX_FRAME`] is an error
/// at once, before the body arrives, so nothing unbounded is ever buffered.
pub fn split_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, DecodeError> {
    let Some(prefix) = buf.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let mut len_bytes = [0u8; LEN_PREFIX];
    len_bytes.copy_from_slice(prefix);
    let len = u32::from_be_bytes(len_bytes) as usize;
    if len > MAX_FRAME {
        return Err(DecodeError::TooLarge(len));
    }
    if len == 0 {
        return Err(DecodeError::Truncated);
    }
    match buf.get(LEN_PREFIX..LEN_PREFIX + len) {
        Some(body) => Ok(Some((body, LEN_PREFIX + len))),
        None => Ok(None),
    }
}

/// Decode a frame body (version byte + message), as returned by [`split_frame`].
pub fn decode_body(body: &[u8]) -> Result<Message, DecodeError> {
    if body.len() > MAX_FRAME {
        return Err(DecodeError::TooLarge(body.len()));
    }
    let (&version, rest) = body.split_first().ok_or(DecodeError::Truncated)?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::Version(version));
    }
    let (msg, trailing) = postcard::take_from_bytes::<Message>(rest)
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !trailing.is_empty() {
        return Err(DecodeError::Trailing);
    }
    Ok(msg)
}

/// Decode one complete frame (prefix included, nothing after it).
pub fn decode_frame(frame: &[u8]) -> Result<Message, DecodeError> {
    match split_frame(frame)? {
        Some((body, used)) if used == frame.len() => decode_body(body),
        Some(_) => Err(DecodeError::Trailing),
        None => Err(DecodeError::Truncated),
    }
}

/// Largest encoded size of a media datagram header: `u32` varint wire id
/// (≤ 5 bytes) + `u64` varint origin time (≤ 10 bytes).
pub const MAX_DATAGRAM_HEADER: usize = 15;

/// Wire id 0 never names a track (origins number tracks from 1): a datagram
/// starting with it carries a [`DatagramMessage`] instead of media.
pub const CONTROL_WIRE_ID: WireId = WireId(0);

/// Most sequence numbers one `Nack` may name; a longer list is a decode error.
pub const MAX_NACK_SEQS: usize = 128;

/// Messages that travel as QUIC datagrams rather than on the control stream.
///
/// Loss repair is useless late: a NACK on the reliable control stream would
/// wait behind every lost stream packet (head-of-line blocking) exactly when
/// the link is lossy. As a datagram it is either on time or lost, and the
/// receiver's own retry (see `repair.rs`) covers the loss.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DatagramMessage {
    /// The receiver misses these RTP sequence numbers (low 16 bits, as on
    /// the wire) of the origin's track `wire_id`: resend them if still held.
    Nack { wire_id: WireId, seqs: Vec<u16> },
}

/// One datagram, decoded without copying the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datagram<'a> {
    /// An RTP packet of the origin's track `wire_id`; `origin` is when the
    /// origin node received it from its publisher, on the origin's clock
    /// (µs). Receivers use it to bound lateness and to keep lip sync.
    Media {
        wire_id: WireId,
        origin: u64,
        packet: &'a [u8],
    },
    Control(DatagramMessage),
}

/// Encode a media datagram: `varint(wire_id)` + `varint(origin µs)` +
/// `packet`, into `out` (cleared first). `wire_id` 0 is reserved.
pub fn encode_datagram(wire_id: WireId, origin: u64, packet: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(MAX_DATAGRAM_HEADER + packet.len());
    let mut header = [0u8; MAX_DATAGRAM_HEADER];
    // Varints of a u32 and a u64 always fit in 15 bytes, so this cannot
    // fail; fall back to an empty header (dropped by the receiver as
    // malformed) rather than panic if postcard ever disagreed.
    let used = postcard::to_slice(&(wire_id.0, origin), &mut header)
        .map(|s| s.len())
        .unwrap_or(0);
    out.extend_from_slice(&header[..used]);
    out.extend_from_slice(packet);
}

/// Encode a control datagram (`varint(0)` + postcard message) into `out`.
pub fn encode_control_datagram(msg: &DatagramMessage, out: &mut Vec<u8>) {
    out.clear();
    out.push(0); // varint(CONTROL_WIRE_ID)
    let buf = std::mem::take(out);
    // Serializing into a Vec cannot fail for this type.
    *out = postcard::to_extend(msg, buf).unwrap_or_default();
}

/// Decode a datagram. Never panics; a NACK naming more than
/// [`MAX_NACK_SEQS`] sequence numbers is refused.
pub fn decode_datagram(datagram: &[u8]) -> Result<Datagram<'_>, DecodeError> {
    let (id, rest) = postcard::take_from_bytes::<u32>(datagram)
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if WireId(id) == CONTROL_WIRE_ID {
        let (msg, trailing) = postcard::take_from_bytes::<DatagramMessage>(rest)
            .map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if !trailing.is_empty() {
            return Err(DecodeError::Trailing);
        }
        let DatagramMessage::Nack { seqs, .. } = &msg;
        if seqs.len() > MAX_NACK_SEQS {
            return Err(DecodeError::TooLarge(seqs.len()));
        }
        return Ok(Datagram::Control(msg));
    }
    let (origin, packet) = postcard::take_from_bytes::<u64>(rest)
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    Ok(Datagram::Media {
        wire_id: WireId(id),
        origin,
        packet,
    })
}

/// Reassembles frames from a byte stream (the QUIC control stream delivers
/// arbitrary chunks). Holds at most one incomplete frame: a length over
/// [`MAX_FRAME`] is an error before its body is buffered.
#[derive(Debug, Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    start: usize,
}

impl FrameBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Append bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame body, if one is buffered. An error means the
    /// stream is corrupt: close the trunk.
    pub fn next_body(&mut self) -> Result<Option<&[u8]>, DecodeError> {
        if self.start > 0 && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let rest = &self.buf[self.start..];
        match split_frame(rest)? {
            Some((_, used)) => {
                let from = self.start + LEN_PREFIX;
                self.start += used;
                Ok(Some(&self.buf[from..self.start]))
            }
            None => Ok(None),
        }
    }

    /// Bytes buffered but not yet returned.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_buffer_reassembles_any_split() {
        let msgs: Vec<Message> = (0..20).map(|seq| Message::Ping { seq }).collect();
        let mut stream = Vec::new();
        for m in &msgs {
            encode_frame_into(m, &mut stream).expect("encodes");
        }
        for chunk in [1, 2, 3, 7, 64, stream.len()] {
            let mut fb = FrameBuffer::new();
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                fb.push(piece);
                while let Some(body) = fb.next_body().expect("valid stream") {
                    got.push(decode_body(body).expect("decodes"));
                }
            }
            assert_eq!(got, msgs, "chunk size {chunk}");
            assert_eq!(fb.pending(), 0);
        }
    }

    #[test]
    fn frame_buffer_refuses_oversized_length_early() {
        let mut fb = FrameBuffer::new();
        fb.push(&u32::MAX.to_be_bytes());
        assert!(fb.next_body().is_err());
    }
}
