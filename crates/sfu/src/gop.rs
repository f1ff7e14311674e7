//! The last keyframe of a video track and everything since (one group of
//! pictures), so a new subscriber starts at once.
//!
//! Why: a new subscription used to ask the publisher for a keyframe and wait.
//! Browsers ignore a keyframe request that comes within 300 ms of the last
//! one they honoured (libwebrtc's minimum keyframe interval), so when two
//! subscribers arrive close together — the usual case when a room fills, and
//! always when one of them is on another node, whose subscription crosses the
//! trunk a round trip later — the second one missed the keyframe made for
//! the first and waited for its own request to be honoured: first frame
//! 600–700 ms later than the first subscriber's (measured across a 40 ms
//! trunk, issue 6). Replaying the cached group (keyframe first, then the
//! frames that depend on it) gives the new subscriber a decodable stream at
//! once, without asking the publisher for anything.
//!
//! The cache is bounded (packets, bytes and age): a publisher that sends
//! keyframes rarely has a long group, and past the bound the cache is empty
//! until the next keyframe; a new subscriber then asks for one as before.
//! Janus' streaming plugin (keyframe buffering) and LiveKit's relay do the
//! same kind of thing; no crate does it for us.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use str0m::format::{
    Codec, detect_av1_keyframe, detect_h264_nalu, detect_h265_keyframe, detect_vp8_keyframe,
};

use crate::remote::MediaPacket;

/// Most packets kept (about 1 s of 2.5 Mbit/s video).
pub const GOP_MAX_PACKETS: usize = 400;
/// Most payload bytes kept.
pub const GOP_MAX_BYTES: usize = 512 * 1024;
/// A group older than this is not replayed: the publisher honours a fresh
/// keyframe request by then, and a subscriber should not start with a
/// second of catching up.
pub const GOP_MAX_AGE: Duration = Duration::from_millis(1000);

/// One video track's current group of pictures.
#[derive(Debug)]
pub struct GopCache {
    codec: Codec,
    /// Packets from the first packet of the last keyframe on, in arrival
    /// order. Empty: no usable group (none seen yet, or it outgrew the bounds).
    packets: VecDeque<MediaPacket>,
    bytes: usize,
    /// When the keyframe started.
    started: Option<Instant>,
    /// RTP timestamp and index in `packets` of the newest frame's first
    /// packet (a keyframe's first packet is not always the one that shows
    /// it is a keyframe: H.264 puts SPS/PPS ahead of the IDR slice).
    frame_ts: Option<u32>,
    frame_start: usize,
    /// Packets of the newest frame seen while no group is open, so a group
    /// can still begin at that frame's first packet.
    pending: Vec<MediaPacket>,
    max_seq: Option<u64>,
}

impl GopCache {
    pub fn new(codec: Codec) -> Self {
        GopCache {
            codec,
            packets: VecDeque::new(),
            bytes: 0,
            started: None,
            frame_ts: None,
            frame_start: 0,
            pending: Vec::new(),
            max_seq: None,
        }
    }

    /// Whether this codec's keyframes can be recognised (others are never cached).
    pub fn supported(codec: Codec) -> bool {
        matches!(
            codec,
            Codec::Vp8 | Codec::Vp9 | Codec::H264 | Codec::H265 | Codec::Av1
        )
    }

    fn is_keyframe(&self, payload: &[u8]) -> bool {
        match self.codec {
            Codec::Vp8 => detect_vp8_keyframe(payload),
            // P = 0 (not inter-predicted) on a packet that begins a frame (B).
            Codec::Vp9 => payload
                .first()
                .is_some_and(|b| b & 0x40 == 0 && b & 0x08 != 0),
            // An IDR slice, or the SPS that precedes one.
            Codec::H264 => detect_h264_nalu(payload, 5) || detect_h264_nalu(payload, 7),
            Codec::H265 => detect_h265_keyframe(payload),
            Codec::Av1 => detect_av1_keyframe(payload),
            _ => false,
        }
    }

    /// Take one packet of the track, as forwarded.
    pub fn push(&mut self, packet: &MediaPacket, now: Instant) {
        if !Self::supported(self.codec) {
            return;
        }
        let newer = self.max_seq.is_none_or(|m| packet.seq > m);
        if newer {
            self.max_seq = Some(packet.seq);
        }
        let new_frame = newer && self.frame_ts != Some(packet.rtp_ts);
        if new_frame {
            self.frame_ts = Some(packet.rtp_ts);
            self.frame_start = self.packets.len();
            self.pending.clear();
        }
        let key = self.is_keyframe(&packet.payload);
        let same_frame = packet.rtp_ts == self.frame_ts.unwrap_or(packet.rtp_ts);
        if key && same_frame {
            // A keyframe begins (or goes on): the group restarts at its
            // frame's first packet.
            let frame: Vec<MediaPacket> = if self.started.is_some() {
                self.packets.drain(self.frame_start..).collect()
            } else {
                std::mem::take(&mut self.pending)
            };
            // Otherwise the group already begins at this frame (a keyframe
            // recognisable in several of its packets): it goes on.
            if self.started.is_none() || self.frame_start > 0 {
                tracing::debug!(
                    seq = packet.seq,
                    ts = packet.rtp_ts,
                    "keyframe: group of pictures restarts"
                );
                self.clear();
                self.started = Some(now);
            }
            for p in frame {
                self.add(p);
            }
        }
        if self.started.is_some() {
            self.add(packet.clone());
            if self.packets.len() > GOP_MAX_PACKETS || self.bytes > GOP_MAX_BYTES {
                self.clear();
            }
        } else if same_frame && self.pending.len() < GOP_MAX_PACKETS {
            self.pending.push(packet.clone());
        }
    }

    fn add(&mut self, p: MediaPacket) {
        self.bytes += p.payload.len();
        self.packets.push_back(p);
    }

    fn clear(&mut self) {
        self.packets.clear();
        self.bytes = 0;
        self.started = None;
        self.frame_start = 0;
    }

    /// The group to replay to a new subscriber, keyframe first; `None` when
    /// there is none young enough.
    pub fn replay(&self, now: Instant) -> Option<impl Iterator<Item = &MediaPacket>> {
        let started = self.started?;
        if now.saturating_duration_since(started) > GOP_MAX_AGE || self.packets.is_empty() {
            return None;
        }
        Some(self.packets.iter())
    }

    /// Packets held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.packets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn vp8(seq: u64, ts: u32, key_start: bool, frame_start: bool) -> MediaPacket {
        // VP8 payload descriptor: S bit (0x10) on a frame's first packet,
        // then the payload header whose P bit (0x01) is 0 for a keyframe.
        let desc = if frame_start { 0x10 } else { 0x00 };
        let hdr = if key_start { 0x00 } else { 0x01 };
        MediaPacket {
            ssrc: 1,
            seq,
            rtp_ts: ts,
            marker: false,
            payload_type: 96,
            payload: Arc::from(vec![desc, hdr, 0, 0].into_boxed_slice()),
            audio_level: None,
            voice_activity: None,
            arrival: Instant::now(),
        }
    }

    fn seqs(c: &GopCache, now: Instant) -> Vec<u64> {
        c.replay(now)
            .map(|i| i.map(|p| p.seq).collect())
            .unwrap_or_default()
    }

    #[test]
    fn nothing_before_the_first_keyframe() {
        let mut c = GopCache::new(Codec::Vp8);
        let now = Instant::now();
        c.push(&vp8(1, 100, false, true), now);
        c.push(&vp8(2, 100, false, false), now);
        assert!(c.replay(now).is_none());
    }

    #[test]
    fn keeps_the_keyframe_and_what_follows_and_restarts_at_the_next() {
        let mut c = GopCache::new(Codec::Vp8);
        let now = Instant::now();
        c.push(&vp8(1, 100, false, true), now);
        c.push(&vp8(2, 200, true, true), now);
        c.push(&vp8(3, 200, false, false), now);
        c.push(&vp8(4, 300, false, true), now);
        assert_eq!(seqs(&c, now), vec![2, 3, 4]);
        c.push(&vp8(5, 400, true, true), now);
        c.push(&vp8(6, 500, false, true), now);
        assert_eq!(seqs(&c, now), vec![5, 6]);
    }

    #[test]
    fn a_keyframe_recognised_late_in_its_frame_starts_at_the_frame() {
        // H.264: SPS/PPS and the IDR slice may come in separate packets; a
        // packet before the one recognised belongs to the group too.
        let mut c = GopCache::new(Codec::H264);
        let now = Instant::now();
        let pkt = |seq, ts, nal: u8| MediaPacket {
            payload: Arc::from(vec![nal, 0, 0].into_boxed_slice()),
            ..vp8(seq, ts, false, false)
        };
        c.push(&pkt(1, 100, 1), now); // non-IDR slice
        c.push(&pkt(2, 200, 6), now); // SEI, same frame as the IDR
        c.push(&pkt(3, 200, 5), now); // IDR
        c.push(&pkt(4, 300, 1), now);
        assert_eq!(seqs(&c, now), vec![2, 3, 4]);
    }

    #[test]
    fn bounded_by_packets_and_age() {
        let mut c = GopCache::new(Codec::Vp8);
        let t0 = Instant::now();
        c.push(&vp8(1, 0, true, true), t0);
        for i in 0..GOP_MAX_PACKETS as u64 {
            c.push(&vp8(2 + i, 1 + i as u32, false, true), t0);
        }
        assert!(c.replay(t0).is_none(), "outgrew the bound: emptied");
        assert!(c.len() <= GOP_MAX_PACKETS);
        c.push(&vp8(1000, 5000, true, true), t0);
        assert_eq!(seqs(&c, t0), vec![1000]);
        assert!(
            c.replay(t0 + GOP_MAX_AGE + Duration::from_millis(1))
                .is_none()
        );
    }

    #[test]
    fn a_late_packet_of_an_older_frame_does_not_move_the_frame_start() {
        let mut c = GopCache::new(Codec::Vp8);
        let now = Instant::now();
        c.push(&vp8(10, 100, true, true), now);
        c.push(&vp8(12, 200, false, true), now);
        c.push(&vp8(11, 100, false, false), now); // late, keyframe's second packet
        c.push(&vp8(13, 200, false, false), now);
        assert_eq!(seqs(&c, now), vec![10, 12, 11, 13]);
    }

    #[test]
    fn audio_codecs_are_not_cached() {
        let mut c = GopCache::new(Codec::Opus);
        let now = Instant::now();
        c.push(&vp8(1, 0, true, true), now);
        assert!(c.replay(now).is_none());
    }
}
