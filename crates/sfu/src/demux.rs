//! Which participant an incoming UDP datagram belongs to.
//!
//! All participants of a worker share one UDP socket. Asking every `Rtc`
//! whether it accepts a packet is O(participants) per packet; instead we keep
//! a map from remote address to participant, learned from the first STUN
//! binding request of each address, whose USERNAME (`<our ufrag>:<theirs>`)
//! names the participant by the ICE ufrag we gave it.
//!
//! Only a binding request whose MESSAGE-INTEGRITY checks out against the
//! ICE password we gave that participant (RFC 8445 §7.3, short-term
//! credentials) teaches an address or binds a connection. The USERNAME
//! travels in clear in every binding request, so without the check anyone
//! who saw one could point new addresses at the participant or take its
//! ICE-TCP connection slots; the password only ever travels in the SDP,
//! over the signaling connection. (str0m checks the integrity again when
//! the request reaches the participant's `Rtc`.)
//!
//! ICE-TCP connections (`worker/tcp.rs`) are bound to a participant by the
//! same ufrag lookup on their first frame ([`Demux::binding_request_for`]),
//! without learning an address: the connection itself is the route.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::SocketAddr;

use std::sync::LazyLock;

use str0m::crypto::Sha1HmacProvider;
use str0m::ice::StunMessage;

#[derive(Debug)]
pub struct Demux<K> {
    by_addr: HashMap<SocketAddr, K>,
    /// Our ufrag -> the participant and the ICE password we gave it.
    by_ufrag: HashMap<String, (K, String)>,
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
    /// A participant, by the ICE ufrag and password we gave it.
    pub fn add(&mut self, ufrag: String, password: String, key: K) {
        self.by_ufrag.insert(ufrag, (key, password));
    }

    /// Forget everything pointing at `key` (participant left).
    pub fn remove(&mut self, key: K) {
        self.by_addr.retain(|_, k| *k != key);
        self.by_ufrag.retain(|_, (k, _)| *k != key);
    }

    /// Route a datagram. Known address: its participant. Unknown address:
    /// only an authentic binding request naming one of our ufrags is routed
    /// (and teaches us the address); anything else is dropped by the caller.
    pub fn route(&mut self, source: SocketAddr, buf: &[u8]) -> Option<K> {
        if let Some(k) = self.by_addr.get(&source) {
            return Some(*k);
        }
        let key = self.binding_request_for(buf)?;
        self.by_addr.insert(source, key);
        Some(key)
    }

    /// The participant a STUN binding request names by our ufrag, without
    /// learning its address (ICE-TCP: a connection, not an address, is
    /// what belongs to the participant).
    pub fn binding_request_for(&self, buf: &[u8]) -> Option<K> {
        authentic_request(buf, |ufrag| {
            self.by_ufrag
                .get(ufrag)
                .map(|(key, password)| (*key, password.as_bytes()))
        })
    }

    #[cfg(test)]
    pub fn addresses(&self) -> usize {
        self.by_addr.len()
    }
}

/// The participant an authentic STUN binding request names: `lookup`
/// turns our ufrag (the first half of its USERNAME) into the participant
/// and its password, against which MESSAGE-INTEGRITY must check out.
fn authentic_request<'p, K>(
    buf: &[u8],
    lookup: impl FnOnce(&str) -> Option<(K, &'p [u8])>,
) -> Option<K> {
    // STUN starts with two zero bits (RFC 7983 demultiplexing: first byte 0..=3).
    if buf.first().is_none_or(|b| *b > 3) {
        return None;
    }
    // str0m panics on internal bugs by design and this runs on
    // unauthenticated input: a panic here would end the whole worker.
    // (`lookup` only reads a map: nothing is left half-changed.)
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let msg = StunMessage::parse(buf).ok()?;
        if !msg.is_binding_request() {
            return None;
        }
        let (local, _remote) = msg.split_username()?;
        let (key, password) = lookup(local)?;
        msg.verify(password, sha1_hmac).then_some(key)
    }))
    .ok()
    .flatten()
}

/// HMAC-SHA1 over `parts` (STUN's MESSAGE-INTEGRITY, RFC 5389 §15.4): the
/// one str0m's ICE agent checks with, from the crypto provider str0m is
/// built with.
pub(crate) fn sha1_hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 20] {
    static HMAC: LazyLock<&'static dyn Sha1HmacProvider> =
        LazyLock::new(|| str0m::crypto::from_feature_flags().sha1_hmac_provider);
    HMAC.sha1_hmac(key, parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A STUN binding request as a browser sends it: USERNAME
    /// `<our ufrag>:<theirs>`, MESSAGE-INTEGRITY keyed by `password`.
    fn binding_request(username: &str, password: &str) -> Vec<u8> {
        use str0m::ice::TransId;
        let msg = StunMessage::binding_request(username, TransId::new(), true, 7, 1, false);
        let mut buf = vec![0u8; 600];
        let n = msg
            .to_bytes(Some(password.as_bytes()), &mut buf, sha1_hmac)
            .expect("a binding request fits");
        buf.truncate(n);
        buf
    }

    #[test]
    fn learns_address_from_stun_then_routes_everything_from_it() {
        let mut d = Demux::default();
        d.add("abcd".into(), "pw-abcd".into(), 1u32);
        d.add("wxyz".into(), "pw-wxyz".into(), 2u32);
        let a: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:5001".parse().unwrap();
        assert_eq!(
            d.route(a, &[0x80, 0, 0, 0]),
            None,
            "RTP from unknown address"
        );
        assert_eq!(
            d.route(a, &binding_request("wxyz:remote", "pw-wxyz")),
            Some(2)
        );
        assert_eq!(d.route(a, &[0x80, 0, 0, 0]), Some(2));
        assert_eq!(d.route(b, &binding_request("nope:remote", "pw-wxyz")), None);
        d.remove(2);
        assert_eq!(d.route(a, &[0x80, 0, 0, 0]), None);
        assert_eq!(d.addresses(), 0);
    }

    #[test]
    fn a_binding_request_names_its_participant_without_teaching_an_address() {
        let mut d = Demux::default();
        d.add("abcd".into(), "pw-abcd".into(), 1u32);
        assert_eq!(
            d.binding_request_for(&binding_request("abcd:x", "pw-abcd")),
            Some(1)
        );
        assert_eq!(
            d.binding_request_for(&binding_request("zzzz:x", "pw-abcd")),
            None
        );
        assert_eq!(d.binding_request_for(&[0x80, 0, 0, 0]), None);
        let mut response = binding_request("abcd:x", "pw-abcd");
        response[0..2].copy_from_slice(&0x0101u16.to_be_bytes());
        assert_eq!(d.binding_request_for(&response), None, "not a request");
        assert_eq!(d.addresses(), 0);
    }

    /// The USERNAME is in clear on the wire; the password never is. A
    /// binding request that names a participant but fails its integrity
    /// check (forged, or keyed by another participant's password) neither
    /// teaches an address nor binds an ICE-TCP connection.
    #[test]
    fn a_binding_request_must_carry_the_participants_integrity() {
        let mut d = Demux::default();
        d.add("abcd".into(), "pw-abcd".into(), 1u32);
        d.add("wxyz".into(), "pw-wxyz".into(), 2u32);
        let a: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let forged = binding_request("abcd:x", "guessed");
        assert_eq!(d.route(a, &forged), None);
        assert_eq!(d.binding_request_for(&forged), None);
        let crossed = binding_request("abcd:x", "pw-wxyz");
        assert_eq!(d.route(a, &crossed), None);
        let mut tampered = binding_request("abcd:x", "pw-abcd");
        tampered[8] ^= 1; // the transaction id, under the integrity
        assert_eq!(d.route(a, &tampered), None);
        assert_eq!(d.addresses(), 0);
        assert_eq!(d.route(a, &binding_request("abcd:x", "pw-abcd")), Some(1));
    }

    #[test]
    fn garbage_is_never_routed() {
        let mut d = Demux::default();
        d.add("abcd".into(), "pw-abcd".into(), 1u32);
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
            d.add("abcd".into(), "pw-abcd".into(), 1u32);
            let a: SocketAddr = "127.0.0.1:5000".parse().unwrap();
            let mut buf = vec![first];
            buf.extend(rest);
            let _ = d.route(a, &buf);
        }
    }
}
