//! `switchboard-impair`: the [`impair`] UDP impairment proxy as a command, for
//! shell scripts and benchmarks (this kernel has no netem).
//!
//! Prints exactly one line to stdout once bound,
//! `impair listening on <addr> -> <upstream>`, then runs until SIGTERM or
//! SIGINT, printing one stats line to stderr every few seconds and on exit.
//! With `--stats-file`, a JSON snapshot is rewritten (atomically) every second
//! and once more on exit.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use impair::{Burst, Direction, Impairment, Proxy, ProxyConfig, Stats};

/// Deterministic user-space UDP impairment proxy (loss, burst loss, delay,
/// jitter, rate cap). Impairment flags apply to BOTH directions (so a
/// `--delay-ms 40` adds 80 ms of round-trip time); `--up-*` (client ->
/// upstream) and `--down-*` (upstream -> client) override one direction.
#[derive(Debug, Parser)]
#[command(name = "switchboard-impair", version)]
struct Args {
    /// Address clients send to (port 0: pick a free port; see the first line
    /// printed).
    #[arg(long, default_value = "127.0.0.1:0", env = "IMPAIR_LISTEN")]
    listen: SocketAddr,
    /// Address datagrams are forwarded to.
    #[arg(long, env = "IMPAIR_UPSTREAM")]
    upstream: SocketAddr,
    /// RNG seed for loss and jitter decisions.
    #[arg(long, default_value_t = 1, env = "IMPAIR_SEED")]
    seed: u64,

    #[command(flatten)]
    both: Knobs,

    /// Client -> upstream: random loss probability (overrides --loss).
    #[arg(long)]
    up_loss: Option<f64>,
    /// Client -> upstream: burst loss `p_enter,p_leave,loss_in_burst` or `off`.
    #[arg(long, value_parser = parse_burst)]
    up_burst: Option<BurstArg>,
    /// Client -> upstream: one-way delay in ms.
    #[arg(long)]
    up_delay_ms: Option<f64>,
    /// Client -> upstream: jitter in ms.
    #[arg(long)]
    up_jitter_ms: Option<f64>,
    /// Client -> upstream: rate cap in kbit/s (0: no cap).
    #[arg(long)]
    up_rate_kbps: Option<f64>,
    /// Client -> upstream: queue limit in KiB.
    #[arg(long)]
    up_queue_kb: Option<f64>,

    /// Upstream -> client: random loss probability (overrides --loss).
    #[arg(long)]
    down_loss: Option<f64>,
    /// Upstream -> client: burst loss `p_enter,p_leave,loss_in_burst` or `off`.
    #[arg(long, value_parser = parse_burst)]
    down_burst: Option<BurstArg>,
    /// Upstream -> client: one-way delay in ms.
    #[arg(long)]
    down_delay_ms: Option<f64>,
    /// Upstream -> client: jitter in ms.
    #[arg(long)]
    down_jitter_ms: Option<f64>,
    /// Upstream -> client: rate cap in kbit/s (0: no cap).
    #[arg(long)]
    down_rate_kbps: Option<f64>,
    /// Upstream -> client: queue limit in KiB.
    #[arg(long)]
    down_queue_kb: Option<f64>,

    /// Rewrite this JSON file with the stats every second (and on exit).
    #[arg(long)]
    stats_file: Option<PathBuf>,
    /// Seconds between stats lines on stderr (0: only on exit).
    #[arg(long, default_value_t = 5)]
    stats_interval_s: u64,
}

/// Impairment flags applied to both directions.
#[derive(Debug, clap::Args)]
struct Knobs {
    /// Independent random loss probability, 0..=1.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Gilbert-Elliott burst loss on top of --loss:
    /// `p_enter,p_leave,loss_in_burst` (mean burst length 1/p_leave packets),
    /// or `off`.
    #[arg(long, value_parser = parse_burst)]
    burst: Option<BurstArg>,
    /// One-way base delay in milliseconds (fractions allowed).
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Extra uniform random delay in [0, jitter] ms per packet (reorders).
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Bandwidth cap in kbit/s (1 kbit = 1000 bits); 0 or absent: no cap.
    #[arg(long)]
    rate_kbps: Option<f64>,
    /// Drop-tail queue limit of the rate cap in KiB.
    #[arg(long, default_value_t = 64.0)]
    queue_kb: f64,
}

#[derive(Debug, Clone, Copy)]
struct BurstArg(Option<Burst>);

fn parse_burst(s: &str) -> Result<BurstArg, String> {
    match s.trim() {
        "off" | "none" | "" => Ok(BurstArg(None)),
        s => s
            .parse::<Burst>()
            .map(|b| BurstArg(Some(b)))
            .map_err(|e| e.to_string()),
    }
}

fn millis(ms: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(ms / 1000.0).with_context(|| format!("bad duration {ms} ms"))
}

fn rate(kbps: Option<f64>) -> anyhow::Result<Option<u64>> {
    match kbps {
        None => Ok(None),
        Some(k) if k.is_finite() && k >= 0.0 => {
            let bps = (k * 1000.0).round() as u64;
            Ok((bps > 0).then_some(bps))
        }
        Some(k) => anyhow::bail!("bad rate {k} kbit/s"),
    }
}

fn queue(kb: f64) -> anyhow::Result<usize> {
    anyhow::ensure!(kb.is_finite() && kb >= 0.0, "bad queue size {kb} KiB");
    Ok((kb * 1024.0).round() as usize)
}

/// One direction's per-direction overrides.
struct Overrides {
    loss: Option<f64>,
    burst: Option<BurstArg>,
    delay_ms: Option<f64>,
    jitter_ms: Option<f64>,
    rate_kbps: Option<f64>,
    queue_kb: Option<f64>,
}

fn impairment(both: &Knobs, o: Overrides) -> anyhow::Result<Impairment> {
    let imp = Impairment {
        loss: o.loss.unwrap_or(both.loss),
        burst: o.burst.or(both.burst).and_then(|b| b.0),
        delay: millis(o.delay_ms.unwrap_or(both.delay_ms))?,
        jitter: millis(o.jitter_ms.unwrap_or(both.jitter_ms))?,
        rate_bps: rate(o.rate_kbps.or(both.rate_kbps))?,
        queue_bytes: queue(o.queue_kb.unwrap_or(both.queue_kb))?,
    };
    imp.validate()?;
    Ok(imp)
}

fn describe(imp: &Impairment) -> String {
    let mut s = format!(
        "loss={} delay={:?} jitter={:?}",
        imp.loss, imp.delay, imp.jitter
    );
    if let Some(b) = imp.burst {
        s += &format!(" burst={},{},{}", b.p_enter, b.p_leave, b.loss_in_burst);
    }
    if let Some(r) = imp.rate_bps {
        s += &format!(" rate={}kbps queue={}B", r as f64 / 1000.0, imp.queue_bytes);
    }
    s
}

fn write_stats_file(
    path: &Path,
    stats: &Stats,
    start: Instant,
    proxy: &Proxy,
    upstream: SocketAddr,
) -> std::io::Result<()> {
    let json = serde_json::json!({
        "listen": proxy.local_addr().to_string(),
        "upstream": upstream.to_string(),
        "uptime_ms": start.elapsed().as_millis() as u64,
        "to_upstream": stats.to_upstream,
        "to_client": stats.to_client,
        "clients": stats.clients,
        "recv_errors": stats.recv_errors,
    });
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{json}\n"))?;
    std::fs::rename(&tmp, path)
}

/// Blocks SIGINT and SIGTERM in this thread (and so in every thread spawned
/// after) so they can be taken synchronously with `sigtimedwait`.
fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc calls on a locally owned, initialised sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits up to `timeout` for one of the blocked signals; returns it if any.
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` and `ts` are valid for the call; siginfo may be null.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

fn main() -> anyhow::Result<()> {
    let sigset = block_signals();
    let args = Args::parse();
    let to_upstream = impairment(
        &args.both,
        Overrides {
            loss: args.up_loss,
            burst: args.up_burst,
            delay_ms: args.up_delay_ms,
            jitter_ms: args.up_jitter_ms,
            rate_kbps: args.up_rate_kbps,
            queue_kb: args.up_queue_kb,
        },
    )
    .context("client -> upstream impairment")?;
    let to_client = impairment(
        &args.both,
        Overrides {
            loss: args.down_loss,
            burst: args.down_burst,
            delay_ms: args.down_delay_ms,
            jitter_ms: args.down_jitter_ms,
            rate_kbps: args.down_rate_kbps,
            queue_kb: args.down_queue_kb,
        },
    )
    .context("upstream -> client impairment")?;

    let proxy = Proxy::start(ProxyConfig {
        listen: args.listen,
        upstream: args.upstream,
        to_upstream,
        to_client,
        seed: args.seed,
    })
    .with_context(|| format!("starting proxy on {}", args.listen))?;
    let start = Instant::now();

    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "impair listening on {} -> {}",
            proxy.local_addr(),
            args.upstream
        )?;
        out.flush()?;
    }
    eprintln!(
        "impair: seed={} up[{}] down[{}]",
        args.seed,
        describe(&proxy.impairment(Direction::ToUpstream)),
        describe(&proxy.impairment(Direction::ToClient)),
    );

    let file_every = Duration::from_secs(1);
    let line_every = Duration::from_secs(args.stats_interval_s);
    let mut next_file = start + file_every;
    let mut next_line = start + line_every;
    let mut file_error_reported = false;
    let mut write_file = |proxy: &Proxy, stats: &Stats| {
        let Some(path) = &args.stats_file else {
            return;
        };
        if let Err(e) = write_stats_file(path, stats, start, proxy, args.upstream)
            && !file_error_reported
        {
            eprintln!("impair: cannot write {}: {e}", path.display());
            file_error_reported = true;
        }
    };
    write_file(&proxy, &proxy.stats());

    let signal = loop {
        let now = Instant::now();
        let mut next = next_file;
        if args.stats_interval_s > 0 {
            next = next.min(next_line);
        }
        if let Some(sig) = wait_signal(&sigset, next.saturating_duration_since(now)) {
            break sig;
        }
        let now = Instant::now();
        if now >= next_file {
            write_file(&proxy, &proxy.stats());
            while next_file <= now {
                next_file += file_every;
            }
        }
        if args.stats_interval_s > 0 && now >= next_line {
            eprintln!("impair: {}", proxy.stats());
            while next_line <= now {
                next_line += line_every;
            }
        }
    };

    let stats = proxy.stats();
    write_file(&proxy, &stats);
    eprintln!("impair: exit on signal {signal}: {stats}");
    proxy.stop();
    Ok(())
}
