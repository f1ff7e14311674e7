//! RFC 4571 framing for ICE-TCP (RFC 6544): every packet (STUN, DTLS, RTP,
//! RTCP) on a TCP media connection is preceded by its length as a 16-bit
//! big-endian number, so no frame is larger than [`MAX_FRAME`] bytes.
//!
//! Sans-IO and bounded: [`FrameDecoder`] holds at most one partial frame
//! plus one read's worth of bytes; [`WriteQueue`] holds at most its
//! capacity and takes a frame whole or not at all (a partial frame would
//! desynchronise the stream for good).

use std::io::{self, ErrorKind, Read, Write};

/// The largest payload a 16-bit length can describe.
pub const MAX_FRAME: usize = u16::MAX as usize;

/// Splits a byte stream into frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` before this were handed out already.
    start: usize,
}

impl FrameDecoder {
    /// Append bytes received from the stream.
    pub fn push(&mut self, data: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(data);
    }

    /// One `read` from `r` of at most `max` bytes straight into the buffer.
    /// `Ok(0)` is the end of the stream, as with [`Read::read`].
    pub fn read_from<R: Read>(&mut self, r: &mut R, max: usize) -> io::Result<usize> {
        self.compact();
        let old = self.buf.len();
        self.buf.resize(old + max, 0);
        let read = r.read(&mut self.buf[old..]);
        let n = match &read {
            Ok(n) => (*n).min(max),
            Err(_) => 0,
        };
        self.buf.truncate(old + n);
        read.map(|_| n)
    }

    /// The next complete frame, if the buffer holds one. Empty frames
    /// (length 0) carry nothing and are skipped.
    pub fn next_frame(&mut self) -> Option<&[u8]> {
        loop {
            let avail = self.buf.get(self.start..)?;
            let [hi, lo, ..] = *avail else {
                return None;
            };
            let len = usize::from(u16::from_be_bytes([hi, lo]));
            if avail.len() < 2 + len {
                return None;
            }
            let from = self.start + 2;
            self.start = from + len;
            if len > 0 {
                return self.buf.get(from..from + len);
            }
        }
    }

    /// Bytes held that are not yet a complete frame (after `next_frame`
    /// returned `None`).
    pub fn buffered(&self) -> usize {
        self.buf.len().saturating_sub(self.start)
    }

    fn compact(&mut self) {
        if self.start == 0 {
            return;
        }
        if self.start >= self.buf.len() {
            self.buf.clear();
        } else {
            self.buf.drain(..self.start);
        }
        self.start = 0;
    }
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("frame of {0} bytes is larger than {MAX_FRAME}")]
    TooLarge(usize),
    #[error("write queue full")]
    Full,
}

/// Framed bytes waiting for a non-blocking socket, bounded.
#[derive(Debug)]
pub struct WriteQueue {
    buf: Vec<u8>,
    /// Bytes of `buf` before this were written already.
    start: usize,
    cap: usize,
}

impl WriteQueue {
    /// A queue that holds at most `cap` bytes (length prefixes included).
    pub fn new(cap: usize) -> WriteQueue {
        WriteQueue {
            buf: Vec::new(),
            start: 0,
            cap,
        }
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queue `payload` as one frame, or nothing if it does not fit.
    pub fn push_frame(&mut self, payload: &[u8]) -> Result<(), QueueError> {
        let Ok(len) = u16::try_from(payload.len()) else {
            return Err(QueueError::TooLarge(payload.len()));
        };
        if self.len() + 2 + payload.len() > self.cap {
            return Err(QueueError::Full);
        }
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(payload);
        Ok(())
    }

    /// Write as much as `w` takes without blocking. `Ok` with bytes left
    /// means `w` would block (wait until it is writable); an error means
    /// the connection is unusable.
    pub fn flush<W: Write>(&mut self, w: &mut W) -> io::Result<()> {
        while self.start < self.buf.len() {
            match w.write(&self.buf[self.start..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => self.start = (self.start + n).min(self.buf.len()),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(payloads: &[&[u8]]) -> Vec<u8> {
        let mut q = WriteQueue::new(usize::MAX);
        for p in payloads {
            q.push_frame(p).unwrap();
        }
        let mut out = Vec::new();
        q.flush(&mut out).unwrap();
        out
    }

    #[test]
    fn frames_round_trip_whatever_the_chunking() {
        let a = vec![1u8; 1];
        let b = vec![2u8; 1200];
        let c = vec![3u8; MAX_FRAME];
        let wire = framed(&[&a, &[], &b, &c]);
        assert_eq!(wire.len(), 8 + 1 + 1200 + MAX_FRAME);
        for chunk in [1, 2, 3, 7, 1000, wire.len()] {
            let mut d = FrameDecoder::default();
            let mut got: Vec<Vec<u8>> = Vec::new();
            for piece in wire.chunks(chunk) {
                d.push(piece);
                while let Some(f) = d.next_frame() {
                    got.push(f.to_vec());
                }
            }
            assert_eq!(got, vec![a.clone(), b.clone(), c.clone()], "chunk {chunk}");
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn a_partial_frame_waits() {
        let mut d = FrameDecoder::default();
        d.push(&[0, 5, 1, 2]);
        assert_eq!(d.next_frame(), None);
        assert_eq!(d.buffered(), 4);
        d.push(&[3, 4, 5, 0]);
        assert_eq!(d.next_frame(), Some(&[1, 2, 3, 4, 5][..]));
        assert_eq!(d.next_frame(), None);
        assert_eq!(d.buffered(), 1);
    }

    #[test]
    fn read_from_takes_at_most_max() {
        let wire = framed(&[&[9u8; 10]]);
        let mut d = FrameDecoder::default();
        let mut r = &wire[..];
        assert_eq!(d.read_from(&mut r, 5).unwrap(), 5);
        assert_eq!(d.next_frame(), None);
        assert_eq!(d.read_from(&mut r, 100).unwrap(), 7);
        assert_eq!(d.next_frame(), Some(&[9u8; 10][..]));
        assert_eq!(d.read_from(&mut r, 100).unwrap(), 0, "end of stream");
    }

    #[test]
    fn the_queue_takes_whole_frames_up_to_its_cap() {
        let mut q = WriteQueue::new(10);
        assert_eq!(q.push_frame(&[0; 4]), Ok(()));
        assert_eq!(q.push_frame(&[0; 3]), Err(QueueError::Full), "6 + 5 > 10");
        assert_eq!(q.push_frame(&[0; 2]), Ok(()));
        assert_eq!(q.len(), 10);
        assert_eq!(
            q.push_frame(&vec![0; MAX_FRAME + 1]),
            Err(QueueError::TooLarge(MAX_FRAME + 1))
        );
    }

    /// Takes `n` bytes per write, then would block.
    struct Slow {
        out: Vec<u8>,
        per_call: usize,
        calls_left: usize,
    }
    impl Write for Slow {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.calls_left == 0 {
                return Err(ErrorKind::WouldBlock.into());
            }
            self.calls_left -= 1;
            let n = b.len().min(self.per_call);
            self.out.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_slow_writer_keeps_the_rest_queued_in_order() {
        let mut q = WriteQueue::new(1000);
        let mut w = Slow {
            out: Vec::new(),
            per_call: 3,
            calls_left: 2,
        };
        q.push_frame(&[1; 10]).unwrap();
        q.flush(&mut w).unwrap();
        assert_eq!(q.len(), 6, "12 queued, 6 written");
        q.push_frame(&[2; 4]).unwrap();
        w.calls_left = usize::MAX;
        q.flush(&mut w).unwrap();
        assert!(q.is_empty());
        let mut d = FrameDecoder::default();
        d.push(&w.out);
        assert_eq!(d.next_frame(), Some(&[1u8; 10][..]));
        assert_eq!(d.next_frame(), Some(&[2u8; 4][..]));
    }

    #[test]
    fn a_writer_that_takes_nothing_is_an_error() {
        struct Zero;
        impl Write for Zero {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Ok(0)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut q = WriteQueue::new(100);
        q.push_frame(&[1]).unwrap();
        assert!(q.flush(&mut Zero).is_err());
    }

    proptest::proptest! {
        /// Any bytes, in any chunks: the decoder returns, never holds more
        /// than one frame's worth plus the last chunk, and every frame it
        /// returns fits the length prefix.
        #[test]
        fn garbage_is_bounded_and_never_panics(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4000),
            chunk in 1usize..600,
        ) {
            let mut d = FrameDecoder::default();
            for piece in bytes.chunks(chunk) {
                d.push(piece);
                while let Some(f) = d.next_frame() {
                    proptest::prop_assert!(!f.is_empty() && f.len() <= MAX_FRAME);
                }
                proptest::prop_assert!(d.buffered() <= 2 + MAX_FRAME + chunk);
            }
        }
    }
}
