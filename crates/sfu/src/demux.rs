//! Which participant an incoming UDP datagram belongs to.
//!
//! All participants of a worker share one UDP socket. Asking every `Rtc`
//! whether it accepts a packet is O(participants) per packet; instead we keep
//! a map from remote address to participant, learned from the first STUN
//! binding request of each address, whose USERNAME (`<our ufrag>:<theirs>`)
//! names the participant by the ICE ufrag we gave it.
//!
//! ICE-TCP connections (`worker/tcp.rs`) are bound to a participant by the
//! same ufrag lookup on their first frame ([`Demux::binding_request_for`]),
//! without learning an address: the connection itself is the route.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::SocketAddr;

use str0m::ice::StunMessage;

#[derive(Debug)]
pub struct Demux<K> {
    by_addr: HashMap<SocketAddr, K>,
    by_ufrag: HashMap<String, K>,
}

impl<K: Copy + Eq + Hash> Default for Demux<K> {
    fn default() -> Self {
        Demux {
            by_addr: HashMap::new(),
            by_ufrag: HashMap::new(),
        }
    }
}

impl<K: Copy + Eq + Hash> Demux<K> {
    pub fn add(&mut self, ufrag: String, key: K) {
        self.by_ufrag.insert(ufrag, key);
    }

    /// Forget everything pointing at `key` (participant left).
    pub fn remove(&mut self, key: K) {
        self.by_addr.retain(|_, k| *k != key);
        self.by_ufrag.retain(|_, k| *k != key);
    }

    /// Route a datagram. Known address: its participant. Unknown address: only
    /// a STUN request naming one of our ufrags is routed (and teaches us the
    /// address); anything else is dropped by the caller.
    pub fn route(&mut self, source: SocketAddr, buf: &[u8]) -> Option<K> {
        if let Some(k) = self.by_addr.get(&source) {
            return Some(*k);
        }
        let key = *self.by_ufrag.get(&local_ufrag(buf)?)?;
        self.by_addr.insert(source, key);
        Some(key)
    }

    /// The participant a STUN binding request names by our ufrag, without
    /// learning its address (ICE-TCP: a connection, not an address, is
    /// what belongs to the participant).
    pub fn binding_request_for(&self, buf: &[u8]) -> Option<K> {
        let (ufrag, request) = stun_ufrag(buf)?;
        if !request {
            return None;
        }
        self.by_ufrag.get(&ufrag).copied()
    }

    #[cfg(test)]
    pub fn addresses(&self) -> usize {
        self.by_addr.len()
    }
}

/// The local (our) ufrag of a STUN binding request, if `buf` is one.
fn local_ufrag(buf: &[u8]) -> Option<String> {
    stun_ufrag(buf).map(|(ufrag, _)| ufrag)
}

/// The local ufrag of a STUN message with a USERNAME, and whether it is a
/// binding request.
fn stun_ufrag(buf: &[u8]) -> Option<(String, bool)> {
    // STUN starts with two zero bits (RFC 7983 demultiplexing: first byte 0..=3).
    if buf.first().is_none_or(|b| *b > 3) {
        return None;
    }
    // str0m panics on internal bugs by design and this runs on
    // unauthenticated input: a panic here would end the whole worker.
    let msg = std::panic::catch_unwind(|| StunMessage::parse(buf))
        .ok()?
        .ok()?;
    let (local, _remote) = msg.split_username()?;
    Some((local.to_owned(), msg.is_binding_request()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding_request(username: &str) -> Vec<u8> {
        // Minimal STUN binding request with only a USERNAME attribute.
        let mut attr = Vec::new();
        attr.extend_from_slice(&0x0006u16.to_be_bytes());
        attr.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attr.extend_from_slice(username.as_bytes());
        while attr.len() % 4 != 0 {
            attr.push(0);
        }
        // PRIORITY and a (not verified here) MESSAGE-INTEGRITY, as browsers send.
        attr.extend_from_slice(&0x0024u16.to_be_bytes());
        attr.extend_from_slice(&4u16.to_be_bytes());
        attr.extend_from_slice(&1u32.to_be_bytes());
        attr.extend_from_slice(&0x0008u16.to_be_bytes());
        attr.extend_from_slice(&20u16.to_be_bytes());
        attr.extend_from_slice(&[0u8; 20]);
        let mut m = Vec::new();
        m.extend_from_slice(&0x0001u16.to_be_bytes());
        m.extend_from_slice(&(attr.len() as u16).to_be_bytes());
        m.extend_from_slice(&0x2112A442u32.to_be_bytes());
        m.extend_from_slice(&[7u8; 12]);
        m.extend_from_slice(&attr);
        m
    }

    #[test]
    fn learns_address_from_stun_then_routes_everything_from_it() {
        let mut d = Demux::default();
        d.add("abcd".into(), 1u32);
        d.add("wxyz".into(), 2u32);
        let a: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:5001".parse().unwrap();
        assert_eq!(
            d.route(a, &[0x80, 0, 0, 0]),
            None,
            "RTP from unknown address"
        );
        assert_eq!(d.route(a, &binding_request("wxyz:remote")), Some(2));
        assert_eq!(d.route(a, &[0x80, 0, 0, 0]), Some(2));
        assert_eq!(d.route(b, &binding_request("nope:remote")), None);
        d.remove(2);
        assert_eq!(d.route(a, &[0x80, 0, 0, 0]), None);
        assert_eq!(d.addresses(), 0);
    }

    #[test]
    fn a_binding_request_names_its_participant_without_teaching_an_address() {
        let mut d = Demux::default();
        d.add("abcd".into(), 1u32);
        assert_eq!(d.binding_request_for(&binding_request("abcd:x")), Some(1));
        assert_eq!(d.binding_request_for(&binding_request("zzzz:x")), None);
        assert_eq!(d.binding_request_for(&[0x80, 0, 0, 0]), None);
        let mut response = binding_request("abcd:x");
        response[0..2].copy_from_slice(&0x0101u16.to_be_bytes());
        assert_eq!(d.binding_request_for(&response), None, "not a request");
        assert_eq!(d.addresses(), 0);
    }

    #[test]
    fn garbage_is_never_routed() {
        let mut d = Demux::default();
        d.add("abcd".into(), 1u32);
        let a: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        for buf in [&[][..], &[0u8; 3], &[0u8; 20], &[1u8; 64], &[0xffu8; 100]] {
            assert_eq!(d.route(a, buf), None);
        }
    }

    proptest::proptest! {
        /// Unauthenticated datagrams that look like STUN (first byte 0–3)
        /// reach str0m's STUN parser: whatever they hold, routing returns
        /// and the worker lives on.
        #[test]
        fn stun_like_garbage_never_panics(
            first in 0u8..4,
            rest in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
        ) {
            let mut d = Demux::default();
            d.add("abcd".into(), 1u32);
            let a: SocketAddr = "127.0.0.1:5000".parse().unwrap();
            let mut buf = vec![first];
            buf.extend(rest);
            let _ = d.route(a, &buf);
        }
    }
}
