//! Discovered addresses: dialing peers whose node ids we do not know.
//!
//! The driver resolves a name (DNS) and hands the whole set over with
//! [`Node::set_dial_addrs`]. Each address becomes a dial target of its own,
//! dialed (`Event::Dial`) and redialed with the same backoff as a configured
//! peer. Whose it is comes with the Hello on a connection we dialed there:
//! from then on the connection is an ordinary one of that node, so the
//! duplicate rule (`conns.rs`: the trunk dialed by the smaller id survives)
//! applies unchanged — "we dialed it" is all the rule asks of a connection.
//!
//! - An address is dialed only while its node (once known) has no link up:
//!   a trunk the other node dialed serves as well. Its redial waits an
//!   extra `yield_to_smaller` when that node's id is smaller than ours, so
//!   the trunk the duplicate rule keeps is usually the only one dialed.
//! - Self: the set usually lists this node too (a Kubernetes headless
//!   Service lists every pod). Our own Hello (own id *and* incarnation)
//!   coming back on a connection we dialed marks the address as ours; it
//!   is never dialed again while listed. Another node claiming our id
//!   (same id, other incarnation) is refused as before (`WrongCluster`).
//! - Forgetting: an address missing from the latest set is forgotten once
//!   no dial or connection of it is in flight and its node's trunk is down.
//!   A trunk that is up is never torn down because DNS stopped listing it
//!   (a DNS hiccup must not cut calls); it simply is not redialed.
//! - A node known only through addresses stays in the peer table (down)
//!   while an address names it, so status shows listed-but-unreachable
//!   nodes; forgotten with its last address.

use super::{Event, Node};
use crate::proto::link::{AddrTarget, ConnState, DialState, Dialed, backoff};
use crate::proto::time::Time;
use crate::proto::types::{CloseCode, ConnId, NodeId};
use std::collections::BTreeSet;
use std::net::SocketAddr;

impl Node {
    /// Replace the set of discovered addresses to dial (the driver calls it
    /// after each resolution, with everything it found). New addresses are
    /// dialed at once; addresses no longer listed are forgotten once their
    /// trunk is down (see the module docs).
    pub fn set_dial_addrs(&mut self, addrs: impl IntoIterator<Item = SocketAddr>, now: Time) {
        self.timers_changed();
        let listed: BTreeSet<SocketAddr> = addrs.into_iter().collect();
        for (addr, t) in self.addrs.iter_mut() {
            t.listed = listed.contains(addr);
            if !t.listed && matches!(t.dial, DialState::Scheduled(_)) {
                t.dial = DialState::Idle;
            }
        }
        for addr in listed {
            if self.addrs.contains_key(&addr) {
                self.ensure_addr_dial(addr, now);
                continue;
            }
            let mut t = AddrTarget::new();
            if !self.shut_down {
                t.dial = DialState::Scheduled(now);
            }
            self.addrs.insert(addr, t);
        }
        self.forget_unlisted_addrs();
    }

    /// A connection requested by [`Event::Dial`] is established. We send
    /// Hello; the peer's Hello says which node it is.
    pub fn handle_connected_addr(&mut self, conn: ConnId, addr: SocketAddr, now: Time) {
        if let Some(t) = self.addrs.get_mut(&addr)
            && t.dial == DialState::Dialing
        {
            t.dial = DialState::Idle;
        }
        self.connected(conn, Some(Dialed::Addr(addr)), now);
    }

    /// A dial requested by [`Event::Dial`] failed.
    pub fn handle_addr_dial_failed(&mut self, addr: SocketAddr, now: Time) {
        self.timers_changed();
        if let Some(t) = self.addrs.get_mut(&addr)
            && t.dial == DialState::Dialing
        {
            t.dial = DialState::Idle;
            self.addr_attempt_failed(addr, now);
        }
        self.forget_unlisted_addrs();
    }

    /// A dial of `addr`, or a connection we dialed there, failed before
    /// its Hello: back off, then try again if still wanted.
    pub(super) fn addr_attempt_failed(&mut self, addr: SocketAddr, now: Time) {
        if let Some(t) = self.addrs.get_mut(&addr) {
            t.attempts = t.attempts.saturating_add(1);
        }
        self.ensure_addr_dial(addr, now);
    }

    /// Whether `addr` should be dialed now: listed, not ourselves, no
    /// connection we dialed there still handshaking, and its node (if
    /// known) neither linked nor a configured peer (which redials itself).
    fn addr_wanted(&self, addr: SocketAddr) -> bool {
        let Some(t) = self.addrs.get(&addr) else {
            return false;
        };
        if self.shut_down || !t.listed || t.is_self {
            return false;
        }
        let handshaking = self
            .conns
            .values()
            .any(|c| c.dialed == Some(Dialed::Addr(addr)) && c.state == ConnState::Handshaking);
        if handshaking {
            return false;
        }
        match t.node.and_then(|n| self.peers.get(&n)) {
            Some(p) => p.conn.is_none() && !p.configured,
            None => true,
        }
    }

    /// Schedule a dial of `addr` with backoff if it is wanted and idle.
    pub(super) fn ensure_addr_dial(&mut self, addr: SocketAddr, now: Time) {
        if !self.addr_wanted(addr) {
            return;
        }
        let me = self.config.node_id;
        let (base, cap, wait) = (
            self.config.redial_base,
            self.config.redial_cap,
            self.config.yield_to_smaller,
        );
        let Some(t) = self.addrs.get(&addr) else {
            return;
        };
        if t.dial != DialState::Idle {
            return;
        }
        let mut delay = backoff(base, cap, t.attempts, self.rng.next_u64());
        if t.node.is_some_and(|n| n < me) {
            delay += wait;
        }
        if let Some(t) = self.addrs.get_mut(&addr) {
            t.dial = DialState::Scheduled(now + delay);
        }
    }

    /// The link to `node` went down: redial every address it answered on.
    pub(super) fn redial_addrs_of(&mut self, node: NodeId, now: Time) {
        let addrs: Vec<SocketAddr> = self
            .addrs
            .iter()
            .filter(|(_, t)| t.node == Some(node))
            .map(|(a, _)| *a)
            .collect();
        for addr in addrs {
            self.ensure_addr_dial(addr, now);
        }
    }

    /// The link to `node` is up: its addresses need no dial.
    pub(super) fn addr_link_up(&mut self, node: NodeId) {
        for t in self.addrs.values_mut() {
            if t.node == Some(node) && matches!(t.dial, DialState::Scheduled(_)) {
                t.dial = DialState::Idle;
            }
        }
    }

    /// A valid Hello from `node` on `conn`: if we dialed `conn` for a
    /// discovered address, that address is `node`'s.
    pub(super) fn learn_addr_node(&mut self, conn: ConnId, node: NodeId) {
        let Some(Dialed::Addr(addr)) = self.conns.get(&conn).and_then(|c| c.dialed) else {
            return;
        };
        let Some(t) = self.addrs.get_mut(&addr) else {
            return;
        };
        t.attempts = 0;
        t.is_self = false;
        if let Some(old) = t.node.replace(node)
            && old != node
        {
            self.forget_peer_if_unused(old);
        }
    }

    /// Our own Hello came back on `conn`. On a connection we dialed to a
    /// discovered address: that address is ours, never dial it again (while
    /// listed), and close. On the accepting end of the same connection:
    /// nothing — the dialing end (this node too) closes it, and were its
    /// Hello lost, the handshake deadline would.
    pub(super) fn reached_self(&mut self, conn: ConnId, now: Time) {
        let dialed = self.conns.get(&conn).and_then(|c| c.dialed);
        match dialed {
            None => {}
            Some(d) => {
                self.metrics.self_dials += 1;
                if let Dialed::Addr(addr) = d
                    && let Some(t) = self.addrs.get_mut(&addr)
                {
                    t.is_self = true;
                    t.dial = DialState::Idle;
                    if let Some(old) = t.node.take() {
                        self.forget_peer_if_unused(old);
                    }
                }
                self.drop_conn(
                    conn,
                    Some(CloseCode::WrongCluster),
                    CloseCode::WrongCluster,
                    now,
                );
            }
        }
    }

    /// Forget every unlisted address with nothing in flight (no dial, no
    /// connection we dialed there) whose node's trunk is down.
    pub(super) fn forget_unlisted_addrs(&mut self) {
        let gone: Vec<SocketAddr> = self
            .addrs
            .iter()
            .filter(|(addr, t)| {
                !t.listed
                    && t.dial != DialState::Dialing
                    && !t.node.is_some_and(|n| self.is_link_up(n))
                    && !self
                        .conns
                        .values()
                        .any(|c| c.dialed == Some(Dialed::Addr(**addr)))
            })
            .map(|(a, _)| *a)
            .collect();
        for addr in gone {
            if let Some(node) = self.addrs.remove(&addr).and_then(|t| t.node) {
                self.forget_peer_if_unused(node);
            }
        }
    }

    /// Drop `node` from the peer table if nothing keeps it: not configured,
    /// no link, no discovered address naming it.
    fn forget_peer_if_unused(&mut self, node: NodeId) {
        let keep = self.peers.get(&node).is_none_or(|p| {
            p.configured || p.conn.is_some() || self.addrs.values().any(|t| t.node == Some(node))
        });
        if !keep {
            self.peers.remove(&node);
        }
    }

    /// Dials of discovered addresses that are due.
    pub(super) fn addr_timers(&mut self, now: Time) {
        let due: Vec<SocketAddr> = self
            .addrs
            .iter()
            .filter(|(_, t)| matches!(t.dial, DialState::Scheduled(at) if at <= now))
            .map(|(a, _)| *a)
            .collect();
        for addr in due {
            let wanted = self.addr_wanted(addr);
            let Some(t) = self.addrs.get_mut(&addr) else {
                continue;
            };
            if wanted {
                t.dial = DialState::Dialing;
                self.events.push_back(Event::Dial { addr });
            } else {
                t.dial = DialState::Idle;
            }
        }
    }
}
