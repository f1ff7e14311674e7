//! Dialing discovered addresses (`Node::set_dial_addrs`), sans-IO: node ids
//! learned from Hello, one trunk per pair when both sides discover each
//! other, this node's own address recognised and skipped, addresses that
//! leave the set forgotten only once their trunk is down.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use trunk::proto::wire;
use trunk::proto::{CloseCode, Config, ConnId, Event, Node, NodeId, Time, Transmit};

/// Nodes at addresses, connections made at once when asked for, frames
/// delivered in order (FIFO over all connections) by [`Net::run`].
struct Net {
    nodes: Vec<Node>,
    /// Where each node listens; `alive[i]` false: nothing answers there.
    addrs: Vec<SocketAddr>,
    alive: Vec<bool>,
    /// Each end of a connection has its own id (as in the driver; a node
    /// dialing itself holds both ends): end → (owner, other end, dialed it).
    ends: BTreeMap<ConnId, (usize, ConnId, bool)>,
    next_conn: u64,
    queue: VecDeque<(usize, ConnId, Option<Vec<u8>>)>,
    /// Dials each node asked for, by address.
    dials: Vec<Vec<SocketAddr>>,
    events: Vec<Vec<Event>>,
    closes: Vec<Vec<(ConnId, CloseCode)>>,
    now: Time,
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1 + i as u8], 3002))
}

impl Net {
    fn new(ids: &[u64]) -> Self {
        Self::with_seed(ids, 500)
    }

    /// `seed` draws the nodes' incarnations and redial jitter.
    fn with_seed(ids: &[u64], seed: u64) -> Self {
        let n = ids.len();
        Net {
            nodes: ids
                .iter()
                .enumerate()
                .map(|(i, id)| Node::new(Config::new(NodeId(*id), "test"), seed + i as u64))
                .collect(),
            addrs: (0..n).map(addr).collect(),
            alive: vec![true; n],
            ends: BTreeMap::new(),
            next_conn: 1,
            queue: VecDeque::new(),
            dials: vec![Vec::new(); n],
            events: vec![Vec::new(); n],
            closes: vec![Vec::new(); n],
            now: Time(0),
        }
    }

    /// Where what is sent on `conn` arrives: (node, its end).
    fn other(&self, conn: ConnId) -> Option<(usize, ConnId)> {
        let (_, end, _) = *self.ends.get(&conn)?;
        Some((self.ends.get(&end)?.0, end))
    }

    fn list(&mut self, i: usize, who: &[usize]) {
        let addrs: Vec<SocketAddr> = who.iter().map(|j| self.addrs[*j]).collect();
        self.nodes[i].set_dial_addrs(addrs, self.now);
    }

    /// Carry out every node's outputs: frames queued, dials connected (or
    /// failed) at once.
    fn collect(&mut self) {
        for i in 0..self.nodes.len() {
            while let Some(t) = self.nodes[i].poll_transmit() {
                match t {
                    Transmit::Frame { conn, bytes } => {
                        if let Some((j, end)) = self.other(conn) {
                            self.queue.push_back((j, end, Some(bytes)));
                        }
                    }
                    Transmit::Close { conn, code } => {
                        self.closes[i].push((conn, code));
                        if let Some((j, end)) = self.other(conn) {
                            self.queue.push_back((j, end, None));
                        }
                    }
                }
            }
            while let Some(e) = self.nodes[i].poll_event() {
                if let Event::Dial { addr } = e {
                    self.dials[i].push(addr);
                    let target = self.addrs.iter().position(|a| *a == addr);
                    match target.filter(|j| self.alive[*j]) {
                        Some(j) => {
                            let (c, d) = (ConnId(self.next_conn), ConnId(self.next_conn + 1));
                            self.next_conn += 2;
                            self.ends.insert(c, (i, d, true));
                            self.ends.insert(d, (j, c, false));
                            self.nodes[i].handle_connected_addr(c, addr, self.now);
                            self.nodes[j].handle_connected(d, None, self.now);
                        }
                        None => self.nodes[i].handle_addr_dial_failed(addr, self.now),
                    }
                }
                self.events[i].push(e);
            }
        }
    }

    /// Deliver until nothing moves.
    fn run(&mut self) {
        self.collect();
        while let Some((j, conn, frame)) = self.queue.pop_front() {
            if !self.alive[j] {
                continue;
            }
            match frame {
                Some(bytes) => {
                    self.nodes[j].handle_frame(conn, &bytes[wire::LEN_PREFIX..], self.now)
                }
                None => self.nodes[j].handle_lost(conn, self.now),
            }
            self.collect();
        }
    }

    /// Advance to `t`, firing timers and delivering everything on the way.
    fn advance(&mut self, t: Time) {
        self.run();
        loop {
            let next = (0..self.nodes.len())
                .filter(|i| self.alive[*i])
                .filter_map(|i| self.nodes[i].poll_timeout())
                .filter(|x| *x <= t)
                .min();
            let Some(next) = next else { break };
            self.now = next;
            for i in 0..self.nodes.len() {
                if self.alive[i] && self.nodes[i].poll_timeout().is_some_and(|x| x <= next) {
                    self.nodes[i].handle_timeout(next);
                }
            }
            self.run();
        }
        self.now = t;
    }

    /// Node `i` vanishes: its peers see its connections lost.
    fn kill(&mut self, i: usize) {
        self.alive[i] = false;
        let lost: Vec<(usize, ConnId)> = self
            .ends
            .values()
            .filter(|(owner, _, _)| *owner == i)
            .filter_map(|(_, end, _)| Some((self.ends.get(end)?.0, *end)))
            .collect();
        for (j, end) in lost {
            self.queue.push_back((j, end, None));
        }
        self.run();
    }

    fn check(&self) {
        for (i, n) in self.nodes.iter().enumerate() {
            if self.alive[i] {
                n.check_structure()
                    .unwrap_or_else(|e| panic!("node {i}: {e}"));
            }
        }
    }

    fn up(&self, i: usize, id: u64) -> bool {
        self.nodes[i].is_link_up(NodeId(id))
    }
}

fn secs(s: u64) -> Time {
    Time(s * 1_000_000)
}

#[test]
fn nodes_that_discover_each_other_form_one_trunk_per_pair() {
    let mut net = Net::new(&[1, 2, 3]);
    for i in 0..3 {
        net.list(i, &[0, 1, 2]);
    }
    net.advance(secs(1));
    net.check();
    for i in 0..3 {
        let snap = net.nodes[i].snapshot();
        let ids: Vec<u64> = snap
            .peers
            .iter()
            .filter(|(_, p)| p.up)
            .map(|(n, _)| n.0)
            .collect();
        let want: Vec<u64> = (1..=3).filter(|id| *id != i as u64 + 1).collect();
        assert_eq!(ids, want, "node {i} links");
        assert_eq!(snap.connections, 2, "node {i}: one connection per peer");
        for (j, a) in net.addrs.iter().enumerate() {
            let t = snap.dial_addrs[a];
            if i == j {
                assert!(t.is_self && t.node.is_none(), "node {i}: own address {t:?}");
            } else {
                assert_eq!(t.node, Some(NodeId(j as u64 + 1)), "node {i}: learned id");
                assert!(!t.is_self);
            }
        }
        assert_eq!(net.nodes[i].metrics().self_dials, 1, "node {i}");
    }
    // Settled: heartbeats only, no dial ever again, the same trunks.
    let dials: Vec<usize> = net.dials.iter().map(Vec::len).collect();
    let ups: Vec<u64> = net.nodes.iter().map(|n| n.metrics().link_ups).collect();
    net.advance(secs(60));
    net.check();
    assert_eq!(
        net.dials.iter().map(Vec::len).collect::<Vec<_>>(),
        dials,
        "no redial while every trunk is up"
    );
    assert_eq!(
        net.nodes
            .iter()
            .map(|n| n.metrics().link_ups)
            .collect::<Vec<_>>(),
        ups
    );
    for i in 0..3 {
        assert_eq!(net.nodes[i].snapshot().connections, 2);
        // The same set again changes nothing.
        net.list(i, &[2, 1, 0]);
    }
    net.advance(secs(61));
    assert_eq!(net.dials.iter().map(Vec::len).collect::<Vec<_>>(), dials);
}

#[test]
fn both_dialing_at_once_keeps_the_trunk_the_smaller_id_dialed() {
    let mut net = Net::new(&[1, 2]);
    net.list(0, &[1]);
    net.list(1, &[0]);
    net.advance(secs(1));
    net.check();
    assert_eq!(net.dials[0], [addr(1)]);
    assert_eq!(
        net.dials[1],
        [addr(0)],
        "both dialed, not knowing each other"
    );
    assert!(net.up(0, 2) && net.up(1, 1));
    for i in 0..2 {
        assert_eq!(net.nodes[i].snapshot().connections, 1, "node {i}");
        assert!(
            net.closes[i]
                .iter()
                .all(|(_, c)| *c == CloseCode::Duplicate)
        );
    }
    let survivor = net.nodes[0].peer_conn(NodeId(2)).expect("up");
    let (_, end, dialed) = net.ends[&survivor];
    assert_eq!(net.nodes[1].peer_conn(NodeId(1)), Some(end), "both kept it");
    assert!(dialed, "node 1 (smaller id) dialed it");
}

#[test]
fn after_a_loss_the_smaller_id_redials_first_and_alone() {
    // Over many seeds: without the yield, the jitter lets node 2 dial
    // first about half the time.
    for seed in 0..40 {
        after_a_loss(seed * 10);
    }
}

fn after_a_loss(seed: u64) {
    let mut net = Net::with_seed(&[1, 2], seed);
    net.list(0, &[1]);
    net.list(1, &[0]);
    net.advance(secs(1));
    let before: Vec<usize> = net.dials.iter().map(Vec::len).collect();
    let ups = net.nodes[1].metrics().link_ups;
    // The trunk breaks (both ends see it lost at once).
    let conn = net.nodes[0].peer_conn(NodeId(2)).expect("up");
    let (_, end, _) = net.ends[&conn];
    net.queue.push_back((0, conn, None));
    net.queue.push_back((1, end, None));
    net.ends.remove(&conn);
    net.ends.remove(&end);
    net.run();
    assert!(!net.up(0, 2) && !net.up(1, 1));
    net.advance(secs(5));
    net.check();
    assert!(net.up(0, 2) && net.up(1, 1), "relinked");
    assert_eq!(net.dials[0].len(), before[0] + 1, "node 1 redialed once");
    assert_eq!(
        net.dials[1].len(),
        before[1],
        "node 2 yielded to the smaller id"
    );
    assert_eq!(net.nodes[1].metrics().link_ups, ups + 1, "no extra flap");
}

#[test]
fn own_address_is_dialed_once_then_never_again() {
    let mut net = Net::new(&[7]);
    net.list(0, &[0]);
    net.advance(secs(1));
    net.check();
    assert_eq!(net.dials[0], [addr(0)]);
    let snap = net.nodes[0].snapshot();
    assert!(snap.dial_addrs[&addr(0)].is_self);
    assert!(snap.peers.is_empty(), "we are no peer of ours");
    assert_eq!(
        snap.connections, 0,
        "both ends of the self connection closed"
    );
    assert_eq!(net.nodes[0].metrics().self_dials, 1);
    assert_eq!(net.nodes[0].metrics().link_ups, 0);
    net.list(0, &[0]);
    net.advance(secs(120));
    assert_eq!(net.dials[0].len(), 1, "never redialed");
    assert_eq!(net.nodes[0].poll_timeout(), None, "nothing left to do");
}

#[test]
fn another_node_with_our_id_is_refused_not_taken_for_ourselves() {
    let mut net = Net::new(&[1, 1]);
    net.list(0, &[1]);
    net.advance(secs(1));
    net.check();
    let snap = net.nodes[0].snapshot();
    let t = snap.dial_addrs[&addr(1)];
    assert!(!t.is_self, "another incarnation is not us");
    assert_eq!(net.nodes[0].metrics().self_dials, 0);
    // Refused as a second live process with our id (not as ourselves).
    assert!(
        net.closes[0]
            .iter()
            .any(|(_, c)| *c == CloseCode::NodeIdInUse),
        "{:?}",
        net.closes[0]
    );
    assert!(net.nodes[0].metrics().node_id_conflicts >= 1);
    // It is tried again, with backoff.
    net.advance(secs(30));
    assert!(net.dials[0].len() >= 3, "{:?}", net.dials[0]);
    assert!(net.dials[0].len() < 20, "backoff: {}", net.dials[0].len());
}

#[test]
fn an_unlisted_address_keeps_its_trunk_until_it_dies_then_is_forgotten() {
    let mut net = Net::new(&[1, 2, 3]);
    for i in 0..3 {
        net.list(i, &[0, 1, 2]);
    }
    net.advance(secs(1));
    // DNS stops listing node 3 on node 1: nothing is torn down.
    net.list(0, &[0, 1]);
    net.advance(secs(10));
    net.check();
    assert!(net.up(0, 3), "a trunk that is up stays up");
    let t = net.nodes[0].snapshot().dial_addrs[&addr(2)];
    assert!(!t.listed && t.node == Some(NodeId(3)));
    // Node 3 dies: node 1 forgets it and never dials it again; node 2,
    // whose DNS still lists it, keeps trying.
    let dials = net.dials[0].len();
    net.kill(2);
    net.advance(secs(60));
    net.check();
    let snap = net.nodes[0].snapshot();
    assert!(!snap.dial_addrs.contains_key(&addr(2)), "forgotten");
    assert!(!snap.peers.contains_key(&NodeId(3)), "no trace of node 3");
    assert_eq!(net.dials[0].len(), dials, "not redialed");
    let snap2 = net.nodes[1].snapshot();
    assert!(
        !snap2.peers[&NodeId(3)].up,
        "node 2 shows listed node 3 down"
    );
    assert!(net.dials[1].iter().filter(|a| **a == addr(2)).count() >= 3);
    assert!(net.up(0, 2) && net.up(1, 1), "the rest is untouched");
}

#[test]
fn an_address_that_never_answers_backs_off_and_is_forgotten_when_unlisted() {
    let mut net = Net::new(&[1, 2]);
    net.alive[1] = false;
    net.list(0, &[1]);
    net.advance(secs(30));
    net.check();
    let n = net.dials[0].len();
    assert!((4..=12).contains(&n), "backoff up to the cap: {n} dials");
    let t = net.nodes[0].snapshot().dial_addrs[&addr(1)];
    assert!(t.listed && t.node.is_none());
    net.list(0, &[]);
    net.check();
    assert!(net.nodes[0].snapshot().dial_addrs.is_empty());
    net.advance(secs(120));
    assert_eq!(net.dials[0].len(), n);
    // Listed again (the node came up): dialed at once.
    net.alive[1] = true;
    net.list(0, &[1]);
    net.run();
    net.advance(net.now);
    assert!(net.up(0, 2));
}

#[test]
fn a_discovered_node_that_restarts_is_relinked() {
    let mut net = Net::new(&[1, 2]);
    net.list(0, &[1]);
    net.advance(secs(1));
    assert!(net.up(0, 2));
    net.kill(1);
    // Same id, same address, new incarnation; it has not resolved DNS yet.
    net.nodes[1] = Node::new(Config::new(NodeId(2), "test"), 9_999);
    net.alive[1] = true;
    net.advance(secs(20));
    net.check();
    assert!(net.up(0, 2) && net.up(1, 1), "node 1 redialed the address");
}
