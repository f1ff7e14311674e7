//! The synthetic media payload: enough to check that forwarded packets are
//! intact, in order and from the right track, and to measure latency.
//!
//! Layout (big endian): magic `SBTK` | track u32 | counter u64 |
//! sent_micros u64 | filler up to the packet size, each filler byte a
//! function of the counter so corruption anywhere is detected.

const MAGIC: &[u8; 4] = b"SBTK";
const HEADER: usize = 4 + 4 + 8 + 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    pub track: u32,
    pub counter: u64,
    pub sent_micros: u64,
}

fn filler(counter: u64, i: usize) -> u8 {
    (counter as usize).wrapping_mul(31).wrapping_add(i) as u8
}

pub fn encode_payload(p: &Payload, size: usize) -> Vec<u8> {
    let size = size.max(HEADER);
    let mut v = Vec::with_capacity(size);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&p.track.to_be_bytes());
    v.extend_from_slice(&p.counter.to_be_bytes());
    v.extend_from_slice(&p.sent_micros.to_be_bytes());
    for i in HEADER..size {
        v.push(filler(p.counter, i));
    }
    v
}

/// `None` unless the bytes are an intact payload.
pub fn decode_payload(b: &[u8]) -> Option<Payload> {
    if b.len() < HEADER || &b[..4] != MAGIC {
        return None;
    }
    let track = u32::from_be_bytes(b[4..8].try_into().ok()?);
    let counter = u64::from_be_bytes(b[8..16].try_into().ok()?);
    let sent_micros = u64::from_be_bytes(b[16..24].try_into().ok()?);
    if b[HEADER..]
        .iter()
        .enumerate()
        .any(|(i, x)| *x != filler(counter, HEADER + i))
    {
        return None;
    }
    Some(Payload {
        track,
        counter,
        sent_micros,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_is_detected() {
        let p = Payload {
            track: 3,
            counter: 77,
            sent_micros: 123_456,
        };
        let mut b = encode_payload(&p, 1000);
        assert_eq!(b.len(), 1000);
        assert_eq!(decode_payload(&b), Some(p));
        b[500] ^= 1;
        assert_eq!(decode_payload(&b), None);
        assert_eq!(decode_payload(&b[..10]), None);
        assert_eq!(decode_payload(&[0u8; 100]), None);
    }
}
