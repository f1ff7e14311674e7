//! Load generator: one publisher sending a ~1 Mbit/s video-like RTP stream
//! (plus a small audio stream) to N subscribers through a separate
//! `switchboard` process. Reports forwarded packets per CPU-second of the
//! server process and per-packet forwarding latency (payload send time vs
//! receive time, same machine clock).
//!
//! cargo build --release -p switchboard -p switchboard-bench
//! target/release/switchboard-bench --subscribers 10,50,100 --seconds 10
//!
//! With `--tls` the nodes serve HTTPS/WSS and every client signs in over
//! WSS (signaling only: media is DTLS-SRTP either way).
//!
//! With `--cluster` it starts two clustered nodes: the publisher joins node
//! A, the subscribers node B, so every packet crosses the trunk once; CPU is
//! both processes together.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use signal::Source;
use switchboard_bench::tls::BenchTls;
use switchboard_bench::{Server, cpu_of};
use testkit::{Client, MediaKind};

#[derive(Parser)]
struct Args {
    /// Subscriber counts to run, one run each.
    #[arg(long, value_delimiter = ',', default_value = "10,50,100")]
    subscribers: Vec<usize>,
    /// Measured seconds per run (after every subscriber receives).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The server binary.
    #[arg(long, default_value = "target/release/switchboard")]
    bin: String,
    /// Video packet size and interval: 1100 B every 10 ms ~ 0.9 Mbit/s.
    #[arg(long, default_value_t = 1100)]
    video_bytes: usize,
    #[arg(long, default_value_t = 10)]
    video_interval_ms: u64,
    /// Publisher on one node, subscribers on a second node joined by a trunk.
    #[arg(long)]
    cluster: bool,
    /// Serve HTTPS/WSS (a throwaway CA's certificate) and sign everyone in
    /// over WSS. TLS is only on signaling, so the forwarding figures should
    /// match a plain run's.
    #[arg(long)]
    tls: bool,
}

fn room_name(n: usize) -> String {
    format!("bench-{n}")
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn run(args: &Args, n: usize) -> anyhow::Result<()> {
    // `server` forwards to the subscribers; `origin` (cluster mode) has the
    // publisher and sends each packet over the trunk once.
    let tls = if args.tls {
        Some(BenchTls::new()?)
    } else {
        None
    };
    let start = |extra: &[&str]| match &tls {
        Some(t) => Server::start_tls(&args.bin, extra, t),
        None => Server::start(&args.bin, extra),
    };
    let (server, origin) = if args.cluster {
        let a = start(&["--node-id", "1", "--trunk-port", "0"])?;
        let peer = format!("1@{}", a.trunk_addr()?);
        let b = start(&["--node-id", "2", "--trunk-port", "0", "--peer", &peer])?;
        (b, Some(a))
    } else {
        (start(&[])?, None)
    };
    let pub_addr = origin.as_ref().map_or(&server.http, |a| &a.http).clone();
    let join = async |addr: &str, name: &str| -> anyhow::Result<Client> {
        match &tls {
            Some(t) => t.join(addr, &room_name(n), name).await,
            None => Ok(Client::join_ws(&format!("ws://{addr}/ws"), &room_name(n), name).await?),
        }
    };
    let mut publisher = join(&pub_addr, "publisher").await?;
    publisher.publish(
        MediaKind::Video,
        Source::Camera,
        Duration::from_millis(args.video_interval_ms),
        args.video_bytes,
    );
    publisher.publish(
        MediaKind::Audio,
        Source::Microphone,
        Duration::from_millis(20),
        120,
    );
    let mut subs = Vec::with_capacity(n);
    for i in 0..n {
        subs.push(join(&server.http, &format!("sub{i}")).await?);
    }
    let pid = publisher.id.clone();
    for s in &subs {
        s.wait_until("both tracks flowing", Duration::from_secs(60), |st| {
            let t = st.tracks_from(&pid);
            t.len() == 2 && t.iter().all(|t| st.count(t) > 0)
        })
        .await?;
    }
    let start_marks: Vec<usize> = subs
        .iter()
        .map(|s| s.state(|st| st.tracks.values().map(|v| v.len()).sum()))
        .collect();
    let origin_cpu = || origin.as_ref().map_or(Ok(0.0), |a| a.cpu_seconds());
    let cpu0 = server.cpu_seconds()? + origin_cpu()?;
    let gen0 = cpu_of("/proc/self/stat")?;
    let out0 = server.metric("switchboard_rtp_packets_out_total")?;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let wall = t0.elapsed().as_secs_f64();
    let out1 = server.metric("switchboard_rtp_packets_out_total")?;
    let cpu1 = server.cpu_seconds()? + origin_cpu()?;
    let gen1 = cpu_of("/proc/self/stat")?;
    let mut lat = Vec::new();
    let mut received = 0usize;
    for (s, mark) in subs.iter().zip(start_marks) {
        s.state(|st| {
            let mut all: Vec<&testkit::Received> = st.tracks.values().flatten().collect();
            all.sort_by_key(|r| r.at);
            for r in all.into_iter().skip(mark) {
                received += 1;
                lat.push(r.at_micros.saturating_sub(r.payload.sent_micros));
            }
        });
    }
    lat.sort_unstable();
    let forwarded = out1 - out0;
    let cpu = cpu1 - cpu0;
    println!(
        "| {n} | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
        forwarded as f64 / wall,
        forwarded as f64 / cpu.max(0.01),
        cpu / wall,
        received as f64 / wall,
        percentile(&lat, 0.5) as f64 / 1000.0,
        percentile(&lat, 0.99) as f64 / 1000.0,
        (gen1 - gen0) / wall,
        lat.len(),
    );
    if received == 0 {
        bail!("no packets received during the run");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.cluster {
        println!("cluster: publisher on node A, subscribers on node B; CPU = both nodes");
    }
    println!(
        "| subscribers | forwarded pkt/s | forwarded pkt per server CPU-s | server CPU (cores) | received pkt/s | latency p50 ms | latency p99 ms | load generator CPU (cores) | samples |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &n in &args.subscribers {
        run(&args, n).await?;
    }
    Ok(())
}
