//! Deterministic simulation of 2–6 trunk nodes over a simulated network with
//! virtual time (see DESIGN.md, "Invariants").
//!
//! Each seed draws a cluster size and a schedule of participant joins and
//! leaves (including rapid join-leave-join), publishes, subscriptions,
//! keyframe requests, chat, link cuts and restores, crashes with restart (new
//! incarnation, new clock), graceful shutdowns and junk datagrams, with random
//! message delays. Even seeds configure every peer by id (`add_peer`); odd
//! seeds give each node the other nodes' addresses instead
//! (`set_dial_addrs`, as DNS discovery does), so node ids are learned from
//! Hello and both ends of every pair dial. The network keeps each connection's stream in order and
//! reorders across connections. After the schedule, everything is healed, the
//! cluster settles, and all six invariants are checked; then every
//! participant leaves and "no leaks" is checked.
//!
//! Media and loss repair ride on the same schedule. Every published track
//! sends an RTP-shaped packet (version 2, a per-track sequence number, a
//! payload naming origin node, track, participant, wire id and sequence
//! number) through `send_media` every 20–40 ms of virtual time (per seed)
//! while anyone subscribes, during the faults (most seeds), the calm phase
//! and a final quiet phase. Datagrams are unordered, each lost with a per-seed
//! probability (0–10 %) and delayed by a per-seed base plus jitter (rarely
//! much longer while faults are injected, to exercise the lateness bound);
//! NACKs and retransmissions from `poll_datagram` travel the same way. Each
//! node's origin times use its own clock (a restarted node's starts again
//! at zero, like the driver's). Strays are injected throughout: NACKs for
//! live, removed and never-used wire ids; media for wire ids the receiver
//! does not know, among them once-valid ones (a track it was told of and saw
//! removed: its last real datagram is replayed); and room-scoped frames it
//! accepted earlier, replayed on the sender's current trunk once stale.
//! Checked on every frame and datagram:
//!
//! - stale messages only count: every room-scoped frame is judged from what
//!   the receiver knew before it (open generation, the sender's announced
//!   one, room link up); a stale one must change no state, emit nothing and
//!   count exactly one `stale_drops`, a current one none;
//! - no retransmission to a non-subscriber: a media datagram from
//!   `poll_datagram` goes only to a (node, conn) whose node subscribes to
//!   the track in the sender's snapshot, on that peer's active connection;
//!   NACKs only name video tracks the sender subscribes, to their origin;
//! - nothing from a stray: NACKs and media for unknown or once-valid wire
//!   ids change no snapshot and count exactly one unknown-wire drop, and
//!   media of a removed track is never delivered, late or replayed;
//! - delivered media is what the origin sent: the payload matches the wire
//!   id's track as the receiver knows it, the origin time maps into
//!   [sent, now], a packet is delivered more than once only if it was
//!   retransmitted and never twice in one subscription of a video track
//!   (under repair), `repaired` only fills a hole of that subscription, a
//!   repair is counted only if delivered, a
//!   retransmission is flagged as one, and a NACK names only packets not
//!   delivered in the current subscription;
//! - repair works: in the quiet phase (no faults, no churn, layer 0 of most
//!   video tracks subscribed) every packet the network did not lose is
//!   delivered (nothing late) and most lost video packets are repaired
//!   (at most 10 % + 6 unrepaired per seed, at least 98 % over a run);
//!   then every subscription is dropped within 500 ms while media flows,
//!   so NACKs in flight reach origins that no longer serve the asker;
//! - no leaks: nothing of a track survives its unpublishing (`track_rooms`,
//!   the media fast path); after everyone left, no wire, repair timer, NACK
//!   or media target remains.
//!
//! On a settled cluster the SFU model (built from events) is compared with
//! the cores by identity: remote and local participants and tracks per room
//! and node, and subscriptions on both ends.
//!
//! Media goes on layer 0 only, as the SFU sends it (`cluster.rs`): RTP
//! sequence numbers are per stream, and the core repairs per wire id.
//!
//! | module | what |
//! |---|---|
//! | `main.rs` | the `Sim` struct, the phases of a run, the tests and planted-bug checks |
//! | `events.rs` | the event queue: virtual time and what each event does |
//! | `network.rs` | connections, frame and datagram delays, loss, cuts; `pump` |
//! | `model.rs` | the SFU model of each node and the SFU's calls into it |
//! | `actions.rs` | the weighted table of random actions; crashes and restarts |
//! | `media.rs` | RTP-shaped packets, sending and receiving media, the quiet phase |
//! | `strays.rs` | injected datagrams and replayed stale frames |
//! | `invariants.rs` | checks on the cluster's state and on every frame |
//! | `media_invariants.rs` | checks on every datagram, repair, media leaks |
//!
//! `SIM_SEEDS=N` runs N seeds (default 2000); `SIM_SEED=S` replays one seed;
//! `SIM_TRACE=1` prints what happens (`SIM_TRACE=2` also every media datagram).

mod actions;
mod events;
mod invariants;
mod media;
mod media_invariants;
mod model;
mod network;
mod strays;

use events::Ev;
use invariants::{FOREIGN_DATA_INVARIANT, ONCE_VALID_INVARIANT, STALE_INVARIANT};
use media::MEDIA_TICK_MS;
use media::{NetRec, QuietPkt};
use media_invariants::{REPAIR_MIN_TOTAL_PERMILLE, REPAIR_REPORT_MIN_LOST, RETRANSMIT_INVARIANT};
use model::SimNode;
use network::{MAX_DELAY_MS, MAX_DGRAM_BASE_MS, MAX_DGRAM_JITTER_MS, MAX_DGRAM_LOSS, SimConn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use trunk::proto::{Config, Node, NodeId, ParticipantId, PlantedBugs, Time, TrackId, WireId};

const HEARTBEAT: Duration = Duration::from_secs(1);
const MISSES: u32 = 3;

/// Long enough for a broken trunk to be declared dead (3 s), the longest
/// redial backoff (10 s cap) and a resync.
const SETTLE: Duration = Duration::from_secs(16);

/// Totals over a run, printed so a reader can see the schedules did work.
static STATS: [AtomicU64; 21] = [const { AtomicU64::new(0) }; 21];
const STAT_NAMES: [&str; 21] = [
    "remote tracks checked at settle",
    "stale drops",
    "link ups",
    "crashes+shutdowns",
    "frames",
    "subscriptions checked",
    "media packets sent (per target)",
    "media datagrams delivered",
    "media datagrams lost in the network",
    "NACKs sent",
    "retransmissions sent",
    "repaired deliveries",
    "late drops",
    "stray datagrams injected",
    "quiet phase: video packets lost",
    "quiet phase: of those repaired",
    "frames judged stale (each checked: one stale drop, nothing else)",
    "stale frames replayed",
    "datagrams for once-valid remote wire ids injected",
    "data frames forged (a sender not announced there)",
    "new incarnations met while the old trunk lived (both probed)",
];
/// Lowest repaired share (‰) of a quiet phase with enough losses.
static WORST_REPAIR: AtomicU64 = AtomicU64::new(u64::MAX);

thread_local! {
    /// Quiet-phase (lost, repaired) video packets of the seeds run on this
    /// thread (each test runs its seeds on its own thread).
    static QUIET_TOTAL: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

fn stat(i: usize, n: u64) {
    STATS[i].fetch_add(n, Ordering::Relaxed);
}

const ROOMS: [&str; 3] = ["standup", "retro", "lunch"];

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The whole simulated cluster: nodes, network, virtual time, and what the
/// checks need to remember.
struct Sim {
    seed: u64,
    rng: ChaCha8Rng,
    now: Time,
    seq: u64,
    queue: BinaryHeap<Reverse<(Time, u64)>>,
    pending: HashMap<u64, Ev>,
    nodes: Vec<SimNode>,
    conns: HashMap<u64, SimConn>,
    cuts: BTreeSet<(usize, usize)>,
    next_conn: u64,
    next_id: u64,
    bugs: PlantedBugs,
    /// Odd seeds: peers are found by address (`set_dial_addrs`, ids
    /// learned from Hello) instead of configured by id (`add_peer`).
    discover: bool,
    trace: bool,
    violation: Option<String>,
    /// Fault phase: long delays allowed.
    chaos: bool,
    /// `SIM_DUMP_CORPUS=dir`: frames delivered per connection direction,
    /// written out as seed inputs for the `frame` fuzz target.
    dump: Option<BTreeMap<(u64, usize), Vec<u8>>>,
    /// Media, datagrams and strays draw from their own stream, so a seed's
    /// control schedule is the same whatever the media does.
    mrng: ChaCha8Rng,
    /// Datagram loss probability, delay base and jitter (µs) of this seed.
    loss: f64,
    dgram_base: u64,
    dgram_jitter: u64,
    /// Media tick of this seed.
    tick: Duration,
    media_on: bool,
    tick_pending: bool,
    scratch: Vec<u8>,
    /// (receiver, track, sequence number) → what the network did with it.
    net: HashMap<(usize, TrackId, u32), NetRec>,
    /// (receiver, origin, wire) → generation of its current subscription:
    /// bumped whenever the SFU subscribes to a track it did not subscribe
    /// (the receiver's repair state starts afresh then).
    sub_gen: HashMap<(usize, NodeId, WireId), u64>,
    next_sub_gen: u64,
    /// The quiet phase's measured window, and what was sent in it.
    window: Option<(Time, Time)>,
    quiet: Vec<QuietPkt>,
    /// Datagrams the nodes emitted (NACKs, retransmissions).
    emitted: u64,
    /// A stray NACK is being answered (for violation messages).
    in_stray: bool,
    trace_media: bool,
}

fn config(id: NodeId, bugs: PlantedBugs) -> Config {
    let mut c = Config::new(id, "sim");
    c.heartbeat = HEARTBEAT;
    c.misses = MISSES;
    c.bugs = bugs;
    c
}

impl Sim {
    fn new(seed: u64, bugs: PlantedBugs) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut mrng = ChaCha8Rng::seed_from_u64(seed ^ 0x6d65_6469_615f_7273);
        let n = rng.random_range(2..=6usize);
        let nodes = (0..n)
            .map(|i| {
                let id = NodeId(i as u64 + 1);
                let node = Node::new(config(id, bugs), rng.random());
                // Processes started up to an hour before the run.
                SimNode::new(id, node, mrng.random_range(0..3_600_000_000))
            })
            .collect();
        let loss = if mrng.random_bool(0.2) {
            0.0
        } else {
            mrng.random_range(0.0..=MAX_DGRAM_LOSS)
        };
        let dgram_base = mrng.random_range(0..=MAX_DGRAM_BASE_MS * 1000);
        let dgram_jitter = mrng.random_range(0..=MAX_DGRAM_JITTER_MS * 1000);
        let tick = ms(mrng.random_range(MEDIA_TICK_MS));
        Sim {
            seed,
            rng,
            now: Time(0),
            seq: 0,
            queue: BinaryHeap::new(),
            pending: HashMap::new(),
            nodes,
            conns: HashMap::new(),
            cuts: BTreeSet::new(),
            next_conn: 1,
            next_id: 1,
            bugs,
            discover: seed % 2 == 1,
            trace: std::env::var("SIM_TRACE").is_ok(),
            violation: None,
            chaos: true,
            dump: std::env::var("SIM_DUMP_CORPUS")
                .ok()
                .map(|_| BTreeMap::new()),
            mrng,
            loss,
            dgram_base,
            dgram_jitter,
            tick,
            media_on: false,
            tick_pending: false,
            scratch: Vec::new(),
            net: HashMap::new(),
            sub_gen: HashMap::new(),
            next_sub_gen: 0,
            window: None,
            quiet: Vec::new(),
            emitted: 0,
            in_stray: false,
            trace_media: std::env::var("SIM_TRACE").is_ok_and(|v| v == "2"),
        }
    }

    fn fail(&mut self, msg: String) {
        if self.violation.is_none() {
            self.violation = Some(format!("t={}ms: {msg}", self.now.0 / 1000));
        }
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn alive(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].alive)
            .collect()
    }

    fn pick<T: Clone>(&mut self, v: &[T]) -> Option<T> {
        if v.is_empty() {
            None
        } else {
            Some(v[self.rng.random_range(0..v.len())].clone())
        }
    }

    fn collect(&self, i: usize) {
        let m = self.nodes[i].node.metrics();
        stat(1, m.stale_drops);
        stat(2, m.link_ups);
        stat(20, m.incarnation_probes);
        stat(4, m.frames_in);
    }

    fn heal(&mut self) {
        self.chaos = false;
        self.media_on = false;
        self.cuts.clear();
        for i in 0..self.nodes.len() {
            if !self.nodes[i].alive {
                self.restart(i);
            }
        }
    }

    /// Everything observable at the end, to compare two runs of one seed.
    fn digest(&self) -> String {
        let mut out = format!("t={} frames=", self.now.0);
        for n in &self.nodes {
            out.push_str(&format!("{:?};{:?};", n.node.metrics(), n.node.snapshot()));
        }
        out
    }

    fn run(mut self) -> Result<String, String> {
        for i in 0..self.nodes.len() {
            self.add_peers(i);
        }
        let actions = self.rng.random_range(10..60);
        let mut t = self.now;
        for _ in 0..actions {
            // Mostly close together (races), sometimes long gaps (timeouts).
            let gap = if self.rng.random_bool(0.1) {
                self.rng.random_range(0..5000)
            } else {
                self.rng.random_range(0..200)
            };
            t = t + ms(gap);
            self.at(t, Ev::Act { calm: false });
        }
        // Media flows during the faults in most seeds; strays throughout.
        if self.mrng.random_bool(0.7) {
            self.start_media();
        }
        self.schedule_strays(t);
        self.run_until(t);
        self.heal();
        let settle_end = self.now + SETTLE;
        self.run_until(settle_end);
        if self.violation.is_none() {
            self.check_settled();
        }
        // A calm phase on the healed cluster: the normal path, then check again.
        if self.violation.is_none() {
            let calm = self.rng.random_range(5..30);
            let mut t = self.now;
            for _ in 0..calm {
                t = t + ms(self.rng.random_range(0..100));
                self.at(t, Ev::Act { calm: true });
            }
            self.start_media();
            self.schedule_strays(t);
            self.run_until(t + ms(4 * MAX_DELAY_MS + 10));
            self.check_settled();
        }
        if self.violation.is_none() {
            self.quiet_phase();
        }
        if self.violation.is_none() {
            self.check_settled();
        }
        if self.violation.is_none() {
            for i in 0..self.nodes.len() {
                let pids: Vec<ParticipantId> = self.nodes[i].participants.keys().copied().collect();
                for p in pids {
                    self.leave(i, p);
                }
            }
            let end = self.now + ms(4 * MAX_DELAY_MS);
            self.run_until(end);
        }
        if self.violation.is_none() {
            self.check_empty();
        }
        if self.violation.is_none() {
            self.check_media_gone();
        }
        for i in 0..self.nodes.len() {
            self.collect(i);
        }
        if let (Some(d), Ok(dir)) = (&self.dump, std::env::var("SIM_DUMP_CORPUS")) {
            for ((conn, to), stream) in d {
                let path = format!("{dir}/sim-{}-{conn}-{to}", self.seed);
                if let Err(e) = std::fs::write(&path, stream) {
                    eprintln!("cannot write {path}: {e}");
                }
            }
        }
        match self.violation.clone() {
            None => Ok(self.digest()),
            Some(v) => Err(format!(
                "seed {}: {v}\n  replay: SIM_SEED={} cargo test -p trunk --test sim simulate_seeds -- --nocapture",
                self.seed, self.seed
            )),
        }
    }
}

fn run_seed(seed: u64, bugs: PlantedBugs) -> Result<(), String> {
    Sim::new(seed, bugs).run().map(|_| ())
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn simulate_seeds() {
    let seeds: Vec<u64> = match env_u64("SIM_SEED") {
        Some(s) => vec![s],
        None => (0..env_u64("SIM_SEEDS").unwrap_or(2000)).collect(),
    };
    let start = std::time::Instant::now();
    let mut failures = Vec::new();
    for &seed in &seeds {
        if let Err(e) = run_seed(seed, PlantedBugs::default()) {
            eprintln!("{e}");
            failures.push(e);
            if failures.len() >= 5 {
                break;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "sim: {} seeds in {secs:.1}s ({:.0} seeds/s), {} violations",
        seeds.len(),
        seeds.len() as f64 / secs,
        failures.len()
    );
    for (name, v) in STAT_NAMES.iter().zip(STATS.iter()) {
        eprintln!("  {name}: {}", v.load(Ordering::Relaxed));
    }
    let worst = WORST_REPAIR.load(Ordering::Relaxed);
    if worst != u64::MAX {
        eprintln!(
            "  lowest repaired share of a quiet phase with >= {REPAIR_REPORT_MIN_LOST} lost: {:.1} %",
            worst as f64 / 10.0
        );
    }
    let (lost, repaired) = QUIET_TOTAL.with(|t| t.get());
    if lost >= 1000 && failures.is_empty() {
        assert!(
            repaired * 1000 >= lost * REPAIR_MIN_TOTAL_PERMILLE,
            "repair works: over all seeds only {repaired} of {lost} lost video packets were repaired in the quiet phases"
        );
    }
    assert!(
        failures.is_empty(),
        "{} seeds violated invariants; first: {}",
        failures.len(),
        failures[0]
    );
}

/// The simulation must be able to fail: each planted bug is found within a
/// bounded number of seeds.
/// A seed counts only if it passes without the bug: otherwise what failed
/// is the core itself (reported, then skipped).
fn finds(bugs: PlantedBugs, within: u64) -> Option<(u64, String)> {
    let found = (0..within).find_map(|seed| {
        let e = run_seed(seed, bugs).err()?;
        if let Err(clean) = run_seed(seed, PlantedBugs::default()) {
            eprintln!("seed {seed} fails without {bugs:?} too, skipped: {clean}");
            return None;
        }
        Some((seed, e))
    });
    if let Some((seed, e)) = &found {
        eprintln!("planted {bugs:?} found at seed {seed}: {e}");
    }
    found
}

/// A planted bug must be found within 300 seeds, and by the invariant it
/// breaks (one of `by`, substrings of that invariant's report), not by
/// whatever else happens to trip.
fn caught(bugs: PlantedBugs, what: &str, by: &[&str]) {
    let Some((seed, e)) = finds(bugs, 300) else {
        panic!("{what} went unnoticed for 300 seeds");
    };
    assert!(
        by.iter().any(|b| e.contains(b)),
        "seed {seed} caught {what}, but not by {by:?}: {e}"
    );
}

#[test]
fn catches_ignored_generations() {
    // Accepting stale room-scoped messages breaks invariant 6: every frame
    // is judged before it arrives, and a stale one must be dropped and
    // counted (it would go on to recreate room-link state: an orphan).
    caught(
        PlantedBugs {
            ignore_generations: true,
            ..Default::default()
        },
        "ignoring generations",
        &[STALE_INVARIANT],
    );
}

/// Invariant 1: without the resync, a node never learns the rooms a peer
/// opened while the link was down.
#[test]
fn catches_skipped_resync() {
    caught(
        PlantedBugs {
            skip_resync: true,
            ..Default::default()
        },
        "skipping the resync",
        &["convergence"],
    );
}

/// Invariant 1: a restarted peer's old rooms and tracks stay in our view.
#[test]
fn catches_state_kept_across_restart() {
    caught(
        PlantedBugs {
            keep_state_on_restart: true,
            ..Default::default()
        },
        "keeping a restarted peer's state",
        &["convergence"],
    );
}

#[test]
fn catches_retransmit_to_unsubscribed() {
    caught(
        PlantedBugs {
            retransmit_unsubscribed: true,
            ..Default::default()
        },
        "retransmitting to a non-subscriber",
        &[RETRANSMIT_INVARIANT],
    );
}

/// Invariant 6 for a once-valid wire id: media of a removed track (late
/// in flight, or replayed as a stray) must be dropped and counted, not
/// delivered.
#[test]
fn catches_media_of_removed_track() {
    caught(
        PlantedBugs {
            deliver_removed_tracks: true,
            ..Default::default()
        },
        "delivering media of a removed track",
        &[ONCE_VALID_INVARIANT],
    );
}

/// No node speaks for another's participants: `Data` naming a sender its
/// peer did not announce in that room (a forged stray) must be dropped.
#[test]
fn catches_foreign_data() {
    caught(
        PlantedBugs {
            accept_foreign_data: true,
            ..Default::default()
        },
        "delivering data from a participant the sender did not announce",
        &[FOREIGN_DATA_INVARIANT],
    );
}

/// A seed is a complete description of a run: two runs of it agree on every
/// counter and every map (no hash-order or clock leaks into the simulation).
#[test]
fn runs_are_deterministic() {
    for seed in [1u64, 7, 42, 1234] {
        let a = Sim::new(seed, PlantedBugs::default()).run();
        let b = Sim::new(seed, PlantedBugs::default()).run();
        assert_eq!(a, b, "seed {seed} is not reproducible");
    }
}
