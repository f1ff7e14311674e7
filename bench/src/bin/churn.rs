//! Churn soak: two clustered `switchboard` processes, and testkit clients
//! that keep joining, publishing (audio + video), subscribing to each other
//! (rooms span both nodes, so across the trunk too) and leaving. At the end,
//! after the last leave, both nodes must be back where they started.
//!
//! cargo build --release -p switchboard -p switchboard-bench
//! target/release/churn --seconds 60            # the CI-sized variant
//! target/release/churn --seconds 1800          # the 30-minute soak
//!
//! Measured per node at the start (trunk up, before the first join) and at
//! the end (after the last client left and the nodes settled): RSS, open
//! fds, threads, tokio tasks (`switchboard_tokio_tasks`), rooms,
//! participants, tracks and signaling sockets (`/metrics`), panics
//! (`switchboard_media_panics_total` and `panicked at` on stderr), and
//! whether the process still runs. Exits non-zero if a node died or
//! panicked, rooms/participants/tracks/sockets are not back to 0, fds or
//! tasks grew past a small slack, a node did not stop with exit code 0 on
//! SIGTERM, or more than 1 % of the joins failed. RSS is reported, not
//! judged (allocators keep freed memory).
//!
//! Also counted and reported (judged only with `--strict`): sessions the
//! server ended before the client left (with the `error` codes it sent),
//! clients whose own audio/video never got negotiated during their stay,
//! and clients that were offered a remote track but got none of its
//! packets. `CHURN_DEBUG=1` prints one line per such client on stderr.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use switchboard_bench::Server;
use testkit::{Client, KitError};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until, timeout};

#[derive(Parser)]
struct Args {
    /// How long new clients keep joining.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// New clients per second (spread evenly; fewer when `--max-alive` is reached).
    #[arg(long, default_value_t = 20.0)]
    joins_per_sec: f64,
    /// Rooms the clients pick from (each room exists on both nodes).
    #[arg(long, default_value_t = 10)]
    rooms: usize,
    /// Clients alive at once, at most (a join waits for a free slot).
    #[arg(long, default_value_t = 150)]
    max_alive: usize,
    /// A client stays between these many seconds once its media is up.
    /// At 20 joins/s, 1–6 s keeps ~80 clients alive (rooms of ~8). The
    /// earlier 2–10 s kept ~120–150 alive (rooms of ~12–15), whose media,
    /// quadratic in room size (~50k packets/s to the clients), saturated
    /// the 2 cores that the generator shares with both nodes: connects
    /// then took 2.5 s and the `--max-alive` cap held the rate at ~18/s
    /// (BENCHMARKS.md). This is a churn soak; forwarding throughput has
    /// its own benchmark.
    #[arg(long, default_value_t = 1.0)]
    min_stay: f64,
    #[arg(long, default_value_t = 6.0)]
    max_stay: f64,
    /// Every n-th client just closes its socket instead of sending `leave`.
    #[arg(long, default_value_t = 4)]
    drop_every: u64,
    /// Seed of the node / room / stay choices (runs are repeatable).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A join fails without `joined` and a connected media transport by
    /// then (the node itself gives up on a transport after 15 s).
    #[arg(long, default_value_t = 15)]
    join_timeout_secs: u64,
    /// After the last leave, how long the nodes may take to get back to baseline.
    #[arg(long, default_value_t = 15)]
    settle_secs: u64,
    /// End fds / tokio tasks may exceed the start by this much.
    #[arg(long, default_value_t = 5)]
    fd_slack: i64,
    #[arg(long, default_value_t = 5)]
    task_slack: i64,
    /// Failed joins allowed, in percent of the joins started.
    #[arg(long, default_value_t = 1.0)]
    max_failed_percent: f64,
    /// Also fail when the server cut a session short (an `error` that
    /// closes it) or a client's own tracks never got negotiated during its
    /// stay; both are reported either way.
    #[arg(long)]
    strict: bool,
    /// Seconds between progress lines.
    #[arg(long, default_value_t = 10)]
    progress_secs: u64,
    /// The server binary.
    #[arg(long, default_value = "target/release/switchboard")]
    bin: String,
}

/// splitmix64: the run's choices depend on the seed only.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Default)]
struct Stats {
    started: AtomicU64,
    /// `joined` and media transport connected in time.
    joined: AtomicU64,
    failed: AtomicU64,
    /// Joined, saw another participant's track for over a second, and
    /// received none of its packets.
    no_media: AtomicU64,
    /// Joined, and none of its own packets went out (publish not negotiated).
    not_published: AtomicU64,
    /// Sessions the server ended before the client left (see `errors`).
    cut: AtomicU64,
    /// Left with `leave` / by closing the socket.
    left: AtomicU64,
    dropped: AtomicU64,
    alive: AtomicU64,
    peak_alive: AtomicU64,
    /// Packets received from other participants, over all clients.
    packets_received: AtomicU64,
    /// Server offers the clients got, and the seconds they were connected
    /// (renegotiation is what a busy room costs: every offer is an SDP
    /// built, sent, parsed and answered).
    offers: AtomicU64,
    offer_bytes: AtomicU64,
    connected_ms: AtomicU64,
    /// The most m-lines any server offer to a client had, per client.
    offer_mlines: Mutex<Vec<u64>>,
    failures: Mutex<BTreeMap<String, u64>>,
    /// `error` messages the clients received, by code.
    errors: Mutex<BTreeMap<String, u64>>,
    /// Join sent → media transport connected, per joined client (ms).
    connect_ms: Mutex<Vec<u64>>,
    /// The parts of it: join sent → `joined`, → the server's answer to
    /// the client's first offer, → media transport connected (ms).
    joined_ms: Mutex<Vec<u64>>,
    answered_ms: Mutex<Vec<u64>>,
    ice_dtls_ms: Mutex<Vec<u64>>,
    /// Media connected → first own packet sent / first remote packet (ms).
    publish_ms: Mutex<Vec<u64>>,
    first_media_ms: Mutex<Vec<u64>>,
}

impl Stats {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        *self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(why)
            .or_default() += 1;
    }
}

/// One client's life: join, publish, stay, leave.
struct Life {
    url: String,
    room: String,
    name: String,
    stay: Duration,
    polite: bool,
    join_timeout: Duration,
}

async fn live(life: Life, stats: Arc<Stats>) {
    let alive = stats.alive.fetch_add(1, Ordering::Relaxed) + 1;
    stats.peak_alive.fetch_max(alive, Ordering::Relaxed);
    run_life(&life, &stats).await;
    stats.alive.fetch_sub(1, Ordering::Relaxed);
}

async fn run_life(life: &Life, stats: &Stats) {
    let t0 = Instant::now();
    let deadline = t0 + life.join_timeout;
    let mut client = match timeout(
        life.join_timeout,
        Client::join_ws(&life.url, &life.room, &life.name),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            stats.fail(format!("join: {}", kit_error(&e)));
            return;
        }
        Err(_) => {
            stats.fail("join: no `joined` in time".into());
            return;
        }
    };
    let t_joined = Instant::now();
    client.publish_av();
    let left = deadline.saturating_duration_since(Instant::now());
    if client
        .wait_until("answer", left, |s| !s.answers.is_empty() || s.ended)
        .await
        .is_err()
    {
        stats.fail("no answer to the first offer in time".into());
        return;
    }
    let t_answered = Instant::now();
    let left = deadline.saturating_duration_since(Instant::now());
    if client
        .wait_until("media connected", left, |s| s.connected || s.ended)
        .await
        .is_err()
    {
        stats.fail("media transport not connected in time".into());
        return;
    }
    if let Some(errors) = client.state(|s| {
        s.ended
            .then(|| s.errors.iter().map(error_code).collect::<Vec<_>>())
    }) {
        stats.fail(format!("session ended before media connected {errors:?}"));
        return;
    }
    let connected = Instant::now();
    lock(&stats.connect_ms).push((connected - t0).as_millis() as u64);
    lock(&stats.joined_ms).push((t_joined - t0).as_millis() as u64);
    lock(&stats.answered_ms).push((t_answered - t_joined).as_millis() as u64);
    lock(&stats.ice_dtls_ms).push((connected - t_answered).as_millis() as u64);
    stats.joined.fetch_add(1, Ordering::Relaxed);

    // Stay, looking every 100 ms at what the client has: a remote track,
    // its packets, our own packets going out, or the server ending the
    // session first.
    let leave_at = connected + life.stay;
    let (mut track_seen, mut first_packet, mut first_sent, mut cut_at) = (None, None, None, None);
    loop {
        let now = Instant::now();
        let (track, packet, sent, ended) = client.state(|s| {
            (
                !s.track_owner.is_empty(),
                s.tracks.values().any(|v| !v.is_empty()),
                s.sent.values().any(|&n| n > 0),
                s.ended,
            )
        });
        if track {
            track_seen.get_or_insert(now);
        }
        if packet {
            first_packet.get_or_insert(now);
        }
        if sent {
            first_sent.get_or_insert(now);
        }
        if ended {
            cut_at = Some(now);
            break;
        }
        if now >= leave_at {
            break;
        }
        sleep(Duration::from_millis(100).min(leave_at - now)).await;
    }
    let end = cut_at.unwrap_or(leave_at);
    let cut = cut_at.is_some();
    let cut_after = end - connected;
    if let Some(t) = first_sent {
        lock(&stats.publish_ms).push((t - connected).as_millis() as u64);
    }
    if let Some(t) = first_packet {
        lock(&stats.first_media_ms).push((t - connected).as_millis() as u64);
    }
    let (received, errors, offers, seen, error_texts, mlines, offer_bytes) = client.state(|s| {
        (
            s.tracks.values().map(|v| v.len() as u64).sum::<u64>(),
            s.errors.iter().map(error_code).collect::<Vec<_>>(),
            s.offers_received,
            s.track_owner.len(),
            s.errors
                .iter()
                .map(|e| format!("{e:?}"))
                .collect::<Vec<_>>(),
            s.offers_received_mlines as u64,
            s.offer_bytes,
        )
    });
    stats.offer_bytes.fetch_add(offer_bytes, Ordering::Relaxed);
    stats.offers.fetch_add(offers as u64, Ordering::Relaxed);
    stats
        .connected_ms
        .fetch_add(cut_after.as_millis() as u64, Ordering::Relaxed);
    lock(&stats.offer_mlines).push(mlines);
    let debug = std::env::var_os("CHURN_DEBUG").is_some();
    if cut {
        stats.cut.fetch_add(1, Ordering::Relaxed);
        if debug {
            eprintln!(
                "cut: {} after {:.1} s of {:.1} s, errors {error_texts:?}, {offers} server offers, {seen} remote tracks (m-lines) seen",
                life.name,
                cut_after.as_secs_f64(),
                life.stay.as_secs_f64()
            );
        }
    }
    for e in errors {
        *lock(&stats.errors).entry(e).or_default() += 1;
    }
    stats
        .packets_received
        .fetch_add(received, Ordering::Relaxed);
    if first_packet.is_none() && track_seen.is_some_and(|t| end - t > Duration::from_secs(1)) {
        stats.no_media.fetch_add(1, Ordering::Relaxed);
    }
    if first_sent.is_none() {
        stats.not_published.fetch_add(1, Ordering::Relaxed);
        if debug {
            eprintln!(
                "not published: {} stay {:.1} s, cut {cut}, {offers} server offers, {seen} remote tracks seen, {received} packets received",
                life.name,
                life.stay.as_secs_f64()
            );
        }
    }
    if cut {
        return;
    }
    if life.polite {
        stats.left.fetch_add(1, Ordering::Relaxed);
        client.leave();
    } else {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
        drop(client);
    }
}

fn kit_error(e: &KitError) -> String {
    match e {
        KitError::Refused(m) => format!("refused {}", error_code(m)),
        KitError::Timeout(..) => "no `joined` in time".into(),
        KitError::Ended => "session ended".into(),
        KitError::WebSocket(e) => format!("websocket {e}"),
        KitError::Io(e) => format!("io {}", e.kind()),
    }
}

fn error_code(m: &signal::ServerMessage) -> String {
    match m {
        signal::ServerMessage::Error { code, .. } => code.as_str().to_string(),
        other => format!("{other:?}"),
    }
}

/// A copy of a sample list, sorted for `percentile`.
fn sorted(m: &Mutex<Vec<u64>>) -> Vec<u64> {
    let mut v = lock(m).clone();
    v.sort_unstable();
    v
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One node's figures at one moment.
#[derive(Debug, Clone, Default)]
struct Snap {
    alive: bool,
    rss_kb: u64,
    fds: i64,
    threads: u64,
    tasks: i64,
    rooms: i64,
    participants: i64,
    tracks: i64,
    ws: i64,
    media_panics: i64,
    log_panics: u64,
    trunk_up: bool,
    trunk_datagrams_out: i64,
    /// `switchboard_signaling_errors_total` by code, where not 0.
    signaling_errors: BTreeMap<String, i64>,
}

fn snap(s: &mut Server) -> Snap {
    let mut out = Snap {
        alive: s.alive(),
        log_panics: s.log().panics,
        ..Default::default()
    };
    if !out.alive {
        return out;
    }
    out.rss_kb = s.proc_status("VmRSS").unwrap_or(0);
    out.threads = s.proc_status("Threads").unwrap_or(0);
    out.fds = s.open_fds().map_or(-1, |n| n as i64);
    let m = s.metrics().unwrap_or_default();
    let g = |k: &str| m.get(k).map_or(-1, |v| *v as i64);
    out.tasks = g("switchboard_tokio_tasks");
    out.rooms = g("switchboard_rooms");
    out.participants = g("switchboard_participants");
    out.tracks = g("switchboard_tracks");
    out.ws = g("switchboard_ws_connections");
    out.media_panics = g("switchboard_media_panics_total");
    out.trunk_up = m
        .iter()
        .any(|(k, v)| k.starts_with("switchboard_trunk_up{") && *v == 1.0);
    out.trunk_datagrams_out = g("switchboard_trunk_datagrams_out_total");
    out.signaling_errors = m
        .iter()
        .filter(|(_, v)| **v > 0.0)
        .filter_map(|(k, v)| {
            let code = k.strip_prefix("switchboard_signaling_errors_total{code=\"")?;
            Some((code.trim_end_matches("\"}").to_string(), *v as i64))
        })
        .collect();
    out
}

impl Snap {
    fn json(&self) -> String {
        format!(
            "{{\"alive\":{},\"rss_kb\":{},\"fds\":{},\"threads\":{},\"tokio_tasks\":{},\"rooms\":{},\"participants\":{},\"tracks\":{},\"ws_connections\":{},\"media_panics\":{},\"log_panics\":{},\"signaling_errors\":{{{}}}}}",
            self.alive,
            self.rss_kb,
            self.fds,
            self.threads,
            self.tasks,
            self.rooms,
            self.participants,
            self.tracks,
            self.ws,
            self.media_panics,
            self.log_panics,
            self.signaling_errors
                .iter()
                .map(|(code, n)| format!("\"{code}\":{n}"))
                .collect::<Vec<_>>()
                .join(",")
        )
    }
}

/// Why the end state is not back to the start state (empty: it is).
fn judge(start: &Snap, end: &Snap, args: &Args) -> Vec<String> {
    let mut bad = Vec::new();
    if !end.alive {
        bad.push("died".to_string());
        return bad;
    }
    if end.media_panics != 0 || end.log_panics != 0 {
        bad.push(format!(
            "panics: {} media, {} in the log",
            end.media_panics, end.log_panics
        ));
    }
    for (what, v) in [
        ("rooms", end.rooms),
        ("participants", end.participants),
        ("tracks", end.tracks),
        ("ws connections", end.ws),
    ] {
        if v != 0 {
            bad.push(format!("{what} {v} (not 0)"));
        }
    }
    if end.fds > start.fds + args.fd_slack {
        bad.push(format!("fds {} → {}", start.fds, end.fds));
    }
    if end.tasks < 0 || end.tasks > start.tasks + args.task_slack {
        bad.push(format!("tokio tasks {} → {}", start.tasks, end.tasks));
    }
    bad
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.joins_per_sec > 0.0, "--joins-per-sec must be > 0");
    anyhow::ensure!(
        args.rooms > 0 && args.max_alive > 0,
        "--rooms, --max-alive > 0"
    );
    anyhow::ensure!(args.min_stay <= args.max_stay, "--min-stay > --max-stay");

    let mut a = Server::start(&args.bin, &["--node-id", "1", "--trunk-port", "0"])?;
    let peer = format!("1@{}", a.trunk_addr()?);
    let mut b = Server::start(
        &args.bin,
        &["--node-id", "2", "--trunk-port", "0", "--peer", &peer],
    )?;
    let up_by = Instant::now() + Duration::from_secs(30);
    while !(snap(&mut a).trunk_up && snap(&mut b).trunk_up) {
        anyhow::ensure!(Instant::now() < up_by, "the trunk did not come up in 30 s");
        sleep(Duration::from_millis(100)).await;
    }
    // Let the fresh nodes finish whatever follows the link coming up.
    sleep(Duration::from_secs(1)).await;
    let urls = [format!("ws://{}/ws", a.http), format!("ws://{}/ws", b.http)];
    let start = [snap(&mut a), snap(&mut b)];
    println!(
        "churn: {} s, {} joins/s, {} rooms over 2 nodes, ≤ {} alive, stays {}–{} s, seed {}",
        args.seconds,
        args.joins_per_sec,
        args.rooms,
        args.max_alive,
        args.min_stay,
        args.max_stay,
        args.seed
    );

    let stats = Arc::new(Stats::default());
    let sem = Arc::new(Semaphore::new(args.max_alive));
    let mut rng = Rng(args.seed);
    let mut set = JoinSet::new();
    let interval = Duration::from_secs_f64(1.0 / args.joins_per_sec);
    let t0 = Instant::now();
    let churn_end = t0 + Duration::from_secs(args.seconds);
    let mut next = t0;
    let progress_every = Duration::from_secs(args.progress_secs);
    let mut next_progress = if args.progress_secs > 0 {
        t0 + progress_every
    } else {
        churn_end + Duration::from_secs(1)
    };
    let mut peak = [Snap::default(), Snap::default()];
    let mut n = 0u64;
    loop {
        if Instant::now() >= next_progress {
            next_progress += progress_every;
            let now = tokio::task::block_in_place(|| [snap(&mut a), snap(&mut b)]);
            for (p, s) in peak.iter_mut().zip(&now) {
                p.rss_kb = p.rss_kb.max(s.rss_kb);
                p.fds = p.fds.max(s.fds);
                p.tasks = p.tasks.max(s.tasks);
                p.participants = p.participants.max(s.participants);
                p.threads = p.threads.max(s.threads);
            }
            println!(
                "  {:>5.0} s: {} joins, {} alive, {} failed, {} cut | A: {} participants, {} ws, {} rooms, {} tasks, {} fds, {:.1} MiB | B: {} participants, {} ws, {} rooms, {} tasks, {} fds, {:.1} MiB",
                t0.elapsed().as_secs_f64(),
                stats.started.load(Ordering::Relaxed),
                stats.alive.load(Ordering::Relaxed),
                stats.failed.load(Ordering::Relaxed),
                stats.cut.load(Ordering::Relaxed),
                now[0].participants,
                now[0].ws,
                now[0].rooms,
                now[0].tasks,
                now[0].fds,
                mib(now[0].rss_kb),
                now[1].participants,
                now[1].ws,
                now[1].rooms,
                now[1].tasks,
                now[1].fds,
                mib(now[1].rss_kb),
            );
            if !now[0].alive || !now[1].alive {
                println!("  a node died; stopping the churn");
                break;
            }
        }
        let now = Instant::now();
        if now >= churn_end {
            break;
        }
        if next > now {
            sleep_until(next.min(next_progress).min(churn_end)).await;
            continue;
        }
        // Keep to the schedule: joins delayed by a late timer or by a full
        // house are made up for by the next ones, up to a second's worth.
        next = next.max(now - Duration::from_secs(1)) + interval;
        let permit = match sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let p = tokio::select! {
                    p = sem.clone().acquire_owned() => p?,
                    _ = sleep_until(churn_end.min(next_progress)) => continue,
                };
                next = next.max(Instant::now() - Duration::from_secs(1));
                p
            }
        };
        n += 1;
        let node = rng.below(2) as usize;
        let room = rng.below(args.rooms as u64);
        let stay = args.min_stay + rng.unit() * (args.max_stay - args.min_stay);
        let life = Life {
            url: urls[node].clone(),
            room: format!("churn-{room}"),
            name: format!("c{n}"),
            stay: Duration::from_secs_f64(stay),
            polite: args.drop_every == 0 || !n.is_multiple_of(args.drop_every),
            join_timeout: Duration::from_secs(args.join_timeout_secs),
        };
        stats.started.fetch_add(1, Ordering::Relaxed);
        let st = stats.clone();
        set.spawn(async move {
            live(life, st).await;
            drop(permit);
        });
        while set.try_join_next().is_some() {}
    }
    let churn_wall = t0.elapsed().as_secs_f64();

    // The last clients finish their stay and leave.
    while let Some(r) = set.join_next().await {
        r.context("a client task panicked")?;
    }
    let last_leave = Instant::now();
    println!(
        "churn over after {churn_wall:.1} s; last client left {:.1} s later",
        (last_leave - t0).as_secs_f64() - churn_wall
    );

    // Settle: everything back to the start, or the time is up.
    let settle_by = last_leave + Duration::from_secs(args.settle_secs);
    let end = loop {
        let end = tokio::task::block_in_place(|| [snap(&mut a), snap(&mut b)]);
        let fine = judge(&start[0], &end[0], &args).is_empty()
            && judge(&start[1], &end[1], &args).is_empty();
        if fine || Instant::now() >= settle_by {
            break end;
        }
        sleep(Duration::from_millis(250)).await;
    };
    let settled = last_leave.elapsed().as_secs_f64();
    let logs = [a.log(), b.log()];
    let exits = [
        a.terminate(Duration::from_secs(20)),
        b.terminate(Duration::from_secs(20)),
    ];

    let started = stats.started.load(Ordering::Relaxed);
    let joined = stats.joined.load(Ordering::Relaxed);
    let failed = stats.failed.load(Ordering::Relaxed);
    let no_media = stats.no_media.load(Ordering::Relaxed);
    let failed_pct = 100.0 * failed as f64 / started.max(1) as f64;
    let rate = started as f64 / churn_wall;
    let connect = sorted(&stats.connect_ms);

    println!();
    println!(
        "| node | when | alive | RSS MiB | open fds | threads | tokio tasks | rooms | participants | tracks | ws sockets | media panics | panics in log |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (i, name) in ["A (1)", "B (2)"].iter().enumerate() {
        for (when, s) in [("start", &start[i]), ("peak", &peak[i]), ("end", &end[i])] {
            let peak_row = when == "peak";
            let dash = |v: i64| {
                if peak_row {
                    "–".to_string()
                } else {
                    v.to_string()
                }
            };
            println!(
                "| {name} | {when} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                if peak_row {
                    "–"
                } else if s.alive {
                    "yes"
                } else {
                    "NO"
                },
                mib(s.rss_kb),
                s.fds,
                s.threads,
                s.tasks,
                dash(s.rooms),
                s.participants,
                dash(s.tracks),
                dash(s.ws),
                dash(s.media_panics),
                if peak_row {
                    "–".to_string()
                } else {
                    s.log_panics.to_string()
                },
            );
        }
    }
    println!();
    println!(
        "joins: {started} started ({rate:.2}/s achieved of {} asked), {joined} joined, {failed} failed ({failed_pct:.2} %), {no_media} without remote media, {} not published, {} cut by the server; {} left with `leave`, {} closed the socket; peak {} alive",
        args.joins_per_sec,
        stats.not_published.load(Ordering::Relaxed),
        stats.cut.load(Ordering::Relaxed),
        stats.left.load(Ordering::Relaxed),
        stats.dropped.load(Ordering::Relaxed),
        stats.peak_alive.load(Ordering::Relaxed),
    );
    for (why, k) in lock(&stats.failures).iter() {
        println!("  failed: {k} × {why}");
    }
    for (code, k) in lock(&stats.errors).iter() {
        println!("  clients got `error {code}` {k} times");
    }
    for (name, e) in ["A", "B"].iter().zip(&end) {
        if !e.signaling_errors.is_empty() {
            println!("  node {name} sent errors: {:?}", e.signaling_errors);
        }
    }
    println!(
        "join → media connected: p50 {} ms, p99 {} ms, max {} ms; {} packets received by clients; trunk datagrams out A {} B {}",
        percentile(&connect, 0.5),
        percentile(&connect, 0.99),
        connect.last().copied().unwrap_or(0),
        stats.packets_received.load(Ordering::Relaxed),
        end[0].trunk_datagrams_out - start[0].trunk_datagrams_out,
        end[1].trunk_datagrams_out - start[1].trunk_datagrams_out,
    );
    let parts = [&stats.joined_ms, &stats.answered_ms, &stats.ice_dtls_ms].map(sorted);
    println!(
        "  of which: join → `joined` p50 {} / p99 {} ms; → answer p50 {} / p99 {} ms; → ICE + DTLS connected p50 {} / p99 {} ms",
        percentile(&parts[0], 0.5),
        percentile(&parts[0], 0.99),
        percentile(&parts[1], 0.5),
        percentile(&parts[1], 0.99),
        percentile(&parts[2], 0.5),
        percentile(&parts[2], 0.99),
    );
    let mlines = sorted(&stats.offer_mlines);
    let offers = stats.offers.load(Ordering::Relaxed);
    println!(
        "server offers: {offers}, {:.2} per connected client-second, {:.1} KB on average; largest offer per client p50 {} / max {} m-lines",
        offers as f64 / (stats.connected_ms.load(Ordering::Relaxed) as f64 / 1000.0).max(1.0),
        stats.offer_bytes.load(Ordering::Relaxed) as f64 / offers.max(1) as f64 / 1000.0,
        percentile(&mlines, 0.5),
        mlines.last().copied().unwrap_or(0),
    );
    let publish = sorted(&stats.publish_ms);
    let first_media = sorted(&stats.first_media_ms);
    println!(
        "media connected → own packets out: p50 {} ms, p99 {} ms; → first remote packet: p50 {} ms, p99 {} ms",
        percentile(&publish, 0.5),
        percentile(&publish, 0.99),
        percentile(&first_media, 0.5),
        percentile(&first_media, 0.99),
    );
    println!(
        "settled {settled:.1} s after the last leave; log: A {} warnings {} errors, B {} warnings {} errors; SIGTERM exit: A {:?}, B {:?}",
        logs[0].warns,
        logs[0].errors,
        logs[1].warns,
        logs[1].errors,
        exits[0].map(|s| s.code()),
        exits[1].map(|s| s.code()),
    );
    for (name, log) in ["A", "B"].iter().zip(&logs) {
        for l in &log.first_problems {
            println!("  {name} log: {l}");
        }
    }

    let mut bad = Vec::new();
    for (i, name) in ["A", "B"].iter().enumerate() {
        for why in judge(&start[i], &end[i], &args) {
            bad.push(format!("node {name}: {why}"));
        }
        if exits[i].is_none_or(|s| !s.success()) {
            bad.push(format!(
                "node {name}: SIGTERM did not end it with exit code 0 ({:?})",
                exits[i]
            ));
        }
    }
    let cut = stats.cut.load(Ordering::Relaxed);
    let not_published = stats.not_published.load(Ordering::Relaxed);
    if args.strict && (cut > 0 || not_published > 0 || no_media > 0) {
        bad.push(format!(
            "--strict: {cut} sessions cut by the server, {not_published} never published, {no_media} without remote media"
        ));
    }
    if failed_pct > args.max_failed_percent {
        bad.push(format!(
            "{failed} of {started} joins failed ({failed_pct:.2} %)"
        ));
    }
    if started == 0 {
        bad.push("no client joined".into());
    }

    let mut json = String::new();
    let _ = write!(
        json,
        "{{\"bench\":\"churn\",\"seconds\":{},\"joins_per_sec\":{},\"rooms\":{},\"max_alive\":{},\"seed\":{},\"joins_started\":{started},\"joins_ok\":{joined},\"joins_failed\":{failed},\"no_media\":{no_media},\"not_published\":{not_published},\"cut_by_server\":{cut},\"achieved_joins_per_sec\":{rate:.2},\"peak_alive\":{},\"connect_ms_p50\":{},\"connect_ms_p99\":{},\"settle_secs\":{settled:.1},\"nodes\":[",
        args.seconds,
        args.joins_per_sec,
        args.rooms,
        args.max_alive,
        args.seed,
        stats.peak_alive.load(Ordering::Relaxed),
        percentile(&connect, 0.5),
        percentile(&connect, 0.99),
    );
    for i in 0..2 {
        let _ = write!(
            json,
            "{}{{\"node\":{},\"start\":{},\"end\":{},\"peak_rss_kb\":{},\"peak_tasks\":{},\"exit_code\":{}}}",
            if i == 0 { "" } else { "," },
            i + 1,
            start[i].json(),
            end[i].json(),
            peak[i].rss_kb,
            peak[i].tasks,
            exits[i]
                .and_then(|s| s.code())
                .map_or("null".to_string(), |c| c.to_string()),
        );
    }
    let _ = write!(json, "],\"pass\":{}}}", bad.is_empty());
    println!("{json}");

    if bad.is_empty() {
        println!("PASS: both nodes back to baseline");
        Ok(())
    } else {
        for why in &bad {
            println!("FAIL: {why}");
        }
        std::process::exit(1);
    }
}
