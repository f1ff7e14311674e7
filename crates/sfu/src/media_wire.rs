//! [`MediaPacket`] as bytes on the trunk: a plain RTP packet (RFC 3550),
//! which is what DESIGN says a trunk datagram carries after its wire id.
//!
//! The RTP header itself is read and written by `rtp-types`. Two small
//! things no crate does for us are written here:
//! - the RFC 8285 one-byte header-extension element for the audio level
//!   (RFC 6464) — `rtp-types` hands out the raw extension block only;
//! - extending the 16-bit sequence number back to the 64-bit one the
//!   rewriter works with ([`SeqExtender`]); str0m does this internally but
//!   does not export it.
//!
//! Decoding arbitrary bytes returns an error, never panics.

use std::sync::Arc;
use std::time::Instant;

use rtp_types::{RtpPacket, RtpPacketBuilder};

use crate::remote::MediaPacket;

/// RFC 8285 one-byte header extension profile.
const ONE_BYTE_PROFILE: u16 = 0xBEDE;
/// Extension element id used for the audio level on the trunk (our choice:
/// the trunk is not negotiated by SDP).
const AUDIO_LEVEL_ID: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaWireError {
    #[error("not an RTP packet: {0}")]
    Rtp(String),
    #[error("RTP packet has no payload")]
    Empty,
}

impl MediaPacket {
    /// The packet as RTP bytes (sequence number truncated to 16 bits, as
    /// on any RTP wire).
    pub fn to_rtp(&self) -> Vec<u8> {
        let ext: Option<[u8; 4]> = self.audio_level.map(|level| {
            let v = u8::from(self.voice_activity.unwrap_or(false)) << 7;
            let level = (-(level.clamp(-127, 0) as i16)) as u8;
            // element header: id (4 bits) | length - 1 (4 bits); then
            // padding to a 32-bit word.
            [(AUDIO_LEVEL_ID << 4), v | level, 0, 0]
        });
        let mut b = RtpPacketBuilder::<&[u8], &[u8]>::new()
            .marker_bit(self.marker)
            .payload_type(self.payload_type & 0x7f)
            .sequence_number(self.seq as u16)
            .timestamp(self.rtp_ts)
            .ssrc(self.ssrc)
            .payload(&self.payload[..]);
        if let Some(ext) = ext.as_ref() {
            b = b.extension(ONE_BYTE_PROFILE, &ext[..]);
        }
        b.write_vec_unchecked()
    }

    /// Parse RTP bytes from the trunk, extending the sequence number with
    /// `seq` (one extender per remote track). `arrival`: when the packet
    /// reached its origin node, on our clock (see [`MediaPacket::arrival`]).
    pub fn from_rtp(
        bytes: &[u8],
        seq: &mut SeqExtender,
        arrival: Instant,
    ) -> Result<MediaPacket, MediaWireError> {
        let p = RtpPacket::parse(bytes).map_err(|e| MediaWireError::Rtp(e.to_string()))?;
        if p.payload_len() == 0 {
            return Err(MediaWireError::Empty);
        }
        let (mut audio_level, mut voice_activity) = (None, None);
        if let Some((ONE_BYTE_PROFILE, data)) = p.extension()
            && let Some((level, vad)) = audio_level_element(data)
        {
            audio_level = Some(level);
            voice_activity = Some(vad);
        }
        Ok(MediaPacket {
            ssrc: p.ssrc(),
            seq: seq.extend(p.sequence_number()),
            rtp_ts: p.timestamp(),
            marker: p.marker_bit(),
            payload_type: p.payload_type(),
            payload: Arc::from(p.payload()),
            audio_level,
            voice_activity,
            arrival,
        })
    }
}

/// Find the audio-level element in an RFC 8285 one-byte extension block.
fn audio_level_element(mut data: &[u8]) -> Option<(i8, bool)> {
    while let Some((&head, rest)) = data.split_first() {
        if head == 0 {
            data = rest; // padding
            continue;
        }
        let id = head >> 4;
        if id == 15 {
            return None; // reserved: stop parsing (RFC 8285 §4.2)
        }
        let len = usize::from(head & 0x0f) + 1;
        let value = rest.get(..len)?;
        if id == AUDIO_LEVEL_ID {
            let v = value[0];
            return Some((-((v & 0x7f) as i8), v & 0x80 != 0));
        }
        data = &rest[len..];
    }
    None
}

/// Extends 16-bit RTP sequence numbers to 64 bits: each new number is
/// placed in the rollover cycle that puts it closest to the highest seen
/// so far (RFC 3550 A.1 in spirit), so reordering across a wrap is right.
#[derive(Debug, Default, Clone)]
pub struct SeqExtender {
    max: Option<u64>,
}

impl SeqExtender {
    pub fn extend(&mut self, seq: u16) -> u64 {
        let Some(max) = self.max else {
            // Start in the second cycle so a packet reordered before the
            // first one never goes below zero.
            let first = (1 << 16) + u64::from(seq);
            self.max = Some(first);
            return first;
        };
        // `max` is never in cycle 0, so the previous cycle always exists.
        let cycle = max & !0xffff;
        let ext = [cycle - (1 << 16), cycle, cycle + (1 << 16)]
            .into_iter()
            .map(|c| c | u64::from(seq))
            .min_by_key(|c| c.abs_diff(max))
            .unwrap_or(cycle | u64::from(seq));
        if ext > max {
            self.max = Some(ext);
        }
        ext
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn packet(seq: u64, level: Option<i8>) -> MediaPacket {
        MediaPacket {
            ssrc: 0xdead_beef,
            seq,
            rtp_ts: 123_456,
            marker: true,
            payload_type: 96,
            payload: Arc::from(&b"payload bytes"[..]),
            audio_level: level,
            voice_activity: level.map(|_| true),
            arrival: Instant::now(),
        }
    }

    #[test]
    fn round_trip_with_and_without_audio_level() {
        for level in [None, Some(0), Some(-30), Some(-127)] {
            let p = packet(70_000, level);
            let mut ext = SeqExtender::default();
            let back = MediaPacket::from_rtp(&p.to_rtp(), &mut ext, Instant::now()).unwrap();
            assert_eq!(back.ssrc, p.ssrc);
            assert_eq!(back.seq & 0xffff, p.seq & 0xffff);
            assert_eq!(back.rtp_ts, p.rtp_ts);
            assert_eq!(back.marker, p.marker);
            assert_eq!(back.payload_type, p.payload_type);
            assert_eq!(back.payload, p.payload);
            assert_eq!(back.audio_level, level);
            assert_eq!(back.voice_activity, p.voice_activity);
        }
    }

    #[test]
    fn sequence_numbers_extend_across_wrap_and_reordering() {
        let mut e = SeqExtender::default();
        let a = e.extend(65_534);
        assert_eq!(e.extend(65_535), a + 1);
        assert_eq!(e.extend(1), a + 3); // 0 lost or late
        assert_eq!(e.extend(0), a + 2); // late, before the wrap point
        assert_eq!(e.extend(65_535), a + 1); // very late, previous cycle
        assert_eq!(e.extend(2), a + 4);
    }

    #[test]
    fn garbage_is_an_error() {
        let mut e = SeqExtender::default();
        for bytes in [
            &b""[..],
            &[0x80][..],
            &[0x00; 12][..],
            &[0x80, 0x60, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1][..],
        ] {
            assert!(
                MediaPacket::from_rtp(bytes, &mut e, Instant::now()).is_err(),
                "{bytes:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let mut e = SeqExtender::default();
            let _ = MediaPacket::from_rtp(&bytes, &mut e, Instant::now());
        }

        #[test]
        fn in_order_sequences_extend_monotonically(start in any::<u16>(), n in 1usize..70_000) {
            let mut e = SeqExtender::default();
            let first = e.extend(start);
            let mut prev = first;
            for i in 1..n {
                let s = start.wrapping_add(i as u16);
                let x = e.extend(s);
                prop_assert_eq!(x, prev + 1);
                prev = x;
            }
        }

        #[test]
        fn mutated_packets_never_panic(flip in 0usize..40, bit in 0u8..8) {
            let mut bytes = packet(5, Some(-20)).to_rtp();
            let i = flip % bytes.len();
            bytes[i] ^= 1 << bit;
            let _ = MediaPacket::from_rtp(&bytes, &mut SeqExtender::default(), Instant::now());
        }
    }
}
