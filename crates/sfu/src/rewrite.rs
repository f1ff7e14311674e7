//! Per-subscriber RTP sequence-number and timestamp rewriting.
//!
//! A subscriber's outgoing stream must look like one continuous RTP stream
//! even when what feeds it changes: the publisher restarts its encoder (new
//! SSRC), a track later moves between nodes, or a simulcast layer switch
//! swaps the source. We therefore never copy the publisher's numbers as they
//! are: each subscription owns an offset for the (extended) sequence number
//! and for the timestamp, re-based whenever the source changes so the output
//! continues where it left off.

use std::time::Instant;

/// Rewrites one incoming stream's numbering into one outgoing stream's.
#[derive(Debug, Default)]
pub struct Rewriter {
    state: Option<State>,
}

#[derive(Debug)]
struct State {
    /// Identity of the source currently feeding this output.
    source: u32,
    /// The source before the last switch: its stragglers are dropped
    /// rather than switching back.
    previous: Option<u32>,
    /// out_seq = in_seq + seq_offset (extended, 64-bit sequence numbers).
    seq_offset: i64,
    /// out_ts = in_ts + ts_offset (mod 2^32).
    ts_offset: u32,
    /// Highest sequence number sent so far.
    max_out_seq: u64,
    /// Timestamp of the packet carrying `max_out_seq`, and when it arrived.
    max_out_ts: u32,
    max_arrival: Instant,
}

impl Rewriter {
    /// Map one packet. `source` identifies the feeding stream (the SSRC),
    /// `seq` is the extended sequence number, `clock_rate` the RTP clock.
    /// Returns `None` for a packet older than the start of the current source
    /// (it cannot be placed in the output without going backwards).
    pub fn rewrite(
        &mut self,
        source: u32,
        seq: u64,
        ts: u32,
        arrival: Instant,
        clock_rate: u32,
    ) -> Option<(u64, u32)> {
        match &mut self.state {
            None => {
                // Start where the publisher is, within the first rollover, so
                // the outgoing SRTP ROC starts at 0 as receivers expect.
                let start = seq & 0xffff;
                self.state = Some(State {
                    source,
                    previous: None,
                    seq_offset: start as i64 - seq as i64,
                    ts_offset: 0,
                    max_out_seq: start,
                    max_out_ts: ts,
                    max_arrival: arrival,
                });
                Some((start, ts))
            }
            Some(st) if st.previous == Some(source) => None,
            Some(st) if st.source != source => {
                // Source switch: continue right after the last packet, with a
                // timestamp advanced by the wall time that passed.
                let elapsed = arrival.saturating_duration_since(st.max_arrival);
                let ticks = (elapsed.as_secs_f64() * clock_rate as f64).max(1.0) as u32;
                let out_seq = st.max_out_seq + 1;
                let out_ts = st.max_out_ts.wrapping_add(ticks);
                st.previous = Some(st.source);
                st.source = source;
                st.seq_offset = out_seq as i64 - seq as i64;
                st.ts_offset = out_ts.wrapping_sub(ts);
                st.max_out_seq = out_seq;
                st.max_out_ts = out_ts;
                st.max_arrival = arrival;
                Some((out_seq, out_ts))
            }
            Some(st) => {
                let out = seq as i64 + st.seq_offset;
                if out < 0 {
                    return None;
                }
                let out_seq = out as u64;
                let out_ts = ts.wrapping_add(st.ts_offset);
                if out_seq > st.max_out_seq {
                    st.max_out_seq = out_seq;
                    st.max_out_ts = out_ts;
                    st.max_arrival = arrival;
                }
                Some((out_seq, out_ts))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn first_packet_keeps_low_bits_and_timestamp() {
        let mut r = Rewriter::default();
        let now = Instant::now();
        assert_eq!(
            r.rewrite(1, 70_000, 1234, now, 90_000),
            Some((70_000 & 0xffff, 1234))
        );
    }

    #[test]
    fn continuous_stream_is_continuous_across_16_bit_wrap() {
        let mut r = Rewriter::default();
        let now = Instant::now();
        let mut prev = None;
        for i in 0..200u64 {
            let seq = 65_500 + i;
            let ts = (4_294_967_000u32).wrapping_add(3000 * i as u32);
            let (s, t) = r.rewrite(7, seq, ts, now, 90_000).unwrap();
            if let Some((ps, pt)) = prev {
                assert_eq!(s, ps + 1);
                assert_eq!(t, u32::wrapping_add(pt, 3000));
            }
            prev = Some((s, t));
        }
    }

    #[test]
    fn reordered_packets_keep_their_order_and_gaps() {
        let mut r = Rewriter::default();
        let now = Instant::now();
        let a = r.rewrite(1, 100, 0, now, 90_000).unwrap().0;
        let c = r.rewrite(1, 103, 0, now, 90_000).unwrap().0;
        let b = r.rewrite(1, 101, 0, now, 90_000).unwrap().0;
        assert_eq!((b - a, c - a), (1, 3));
        assert_eq!(r.rewrite(1, 99, 0, now, 90_000), Some((a - 1, 0)));
        // Started just after a 16-bit wrap: a packet from before the wrap
        // would need a negative output number and cannot be placed.
        let mut r = Rewriter::default();
        assert_eq!(r.rewrite(1, 65_537, 0, now, 90_000), Some((1, 0)));
        assert_eq!(r.rewrite(1, 65_535, 0, now, 90_000), None);
    }

    #[test]
    fn source_switch_continues_numbering_and_time() {
        let mut r = Rewriter::default();
        let t0 = Instant::now();
        let (s1, ts1) = r.rewrite(1, 500, 10_000, t0, 90_000).unwrap();
        let (s2, ts2) = r
            .rewrite(2, 9, 777, t0 + Duration::from_millis(100), 90_000)
            .unwrap();
        assert_eq!(s2, s1 + 1);
        assert_eq!(ts2, ts1 + 9_000);
        // And the new source continues from there.
        let (s3, ts3) = r
            .rewrite(2, 10, 777 + 3000, t0 + Duration::from_millis(133), 90_000)
            .unwrap();
        assert_eq!((s3, ts3), (s2 + 1, ts2 + 3000));
        // A late packet of the old source does not switch back.
        assert_eq!(r.rewrite(1, 501, 13_000, t0, 90_000), None);
        let (s4, _) = r.rewrite(2, 11, 777 + 6000, t0, 90_000).unwrap();
        assert_eq!(s4, s3 + 1);
    }
}
