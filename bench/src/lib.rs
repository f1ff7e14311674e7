//! What the bench binaries share: starting a `switchboard` process on free
//! ports (alone or as a cluster node), talking plain HTTP to it, and reading
//! its figures from `/metrics` and `/proc`.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context;

pub mod tls;

/// The cluster secret of bench clusters (passed by environment, not flag).
pub const BENCH_SECRET: &str = "Switchboard-Bench_Cluster-4Tn8Rv1Y";

/// A `switchboard` process on free ports. Its stdout (the log) and stderr
/// (panic messages) are drained by two threads, which count what matters
/// and keep the last lines. Killed when dropped.
pub struct Server {
    child: Child,
    pub http: String,
    /// Where `/metrics` and `/api/status` are fetched over plain HTTP: the
    /// admin listener when the main one speaks TLS, else `http`.
    plain: String,
    log: Arc<Mutex<Log>>,
}

/// What the process wrote.
#[derive(Debug, Default, Clone)]
pub struct Log {
    /// Lines with a ` WARN ` / ` ERROR ` level (human log format).
    pub warns: u64,
    pub errors: u64,
    /// `thread '…' panicked at` lines (stderr).
    pub panics: u64,
    /// The first warning/error/panic lines, verbatim.
    pub first_problems: Vec<String>,
    /// The last lines of both streams.
    pub tail: VecDeque<String>,
}

impl Log {
    fn line(&mut self, line: String) {
        let warn = line.contains(" WARN ");
        let error = line.contains(" ERROR ");
        let panic = line.contains("panicked at");
        self.warns += u64::from(warn);
        self.errors += u64::from(error);
        self.panics += u64::from(panic);
        if (warn || error || panic) && self.first_problems.len() < 20 {
            self.first_problems.push(line.clone());
        }
        if self.tail.len() == 50 {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }
}

impl Server {
    /// Start `bin` on free HTTP and media ports with `extra` arguments
    /// (cluster flags: then the bench cluster secret is set too) and wait
    /// for the URL it prints.
    pub fn start(bin: &str, extra: &[&str]) -> anyhow::Result<Server> {
        Server::start_with(bin, extra, None)
    }

    /// [`Server::start`] serving HTTPS/WSS with `tls`'s certificate; the
    /// admin endpoints go to a plain loopback listener of their own.
    pub fn start_tls(bin: &str, extra: &[&str], tls: &tls::BenchTls) -> anyhow::Result<Server> {
        Server::start_with(bin, extra, Some(tls))
    }

    fn start_with(
        bin: &str,
        extra: &[&str],
        tls: Option<&tls::BenchTls>,
    ) -> anyhow::Result<Server> {
        let mut cmd = Command::new(bin);
        let mut admin = None;
        if let Some(tls) = tls {
            // A free port for the admin listener (picked, released, reused
            // at once: fine for a bench on loopback).
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let addr = format!("127.0.0.1:{port}");
            cmd.args(["--tls-cert", &tls.cert_path, "--tls-key", &tls.key_path])
                .args(["--admin-bind", &addr]);
            admin = Some(addr);
        }
        cmd.args(["--http-port", "0", "--media-port", "0"])
            .args(["--max-participants-per-room", "10000"])
            .args(extra)
            .env("SWITCHBOARD_LOG", "warn");
        if !extra.is_empty() {
            cmd.env("SWITCHBOARD_CLUSTER_SECRET", BENCH_SECRET);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let log = Arc::new(Mutex::new(Log::default()));
        let (url_tx, url_rx) = mpsc::channel::<String>();
        let stdout = child.stdout.take().context("stdout")?;
        let stderr = child.stderr.take().context("stderr")?;
        let out_log = log.clone();
        std::thread::spawn(move || {
            let mut url_tx = Some(url_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match url_tx.take() {
                    Some(tx) if line.contains("http://") || line.contains("https://") => {
                        let _ = tx.send(line);
                    }
                    other => {
                        url_tx = other;
                        lock(&out_log).line(line);
                    }
                }
            }
        });
        let err_log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                lock(&err_log).line(line);
            }
        });
        let line = match url_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                // Give the drain threads a moment to record the last words.
                std::thread::sleep(Duration::from_millis(100));
                let tail: Vec<String> = lock(&log).tail.iter().cloned().collect();
                anyhow::bail!(
                    "{bin} did not print its URL; its output:\n{}",
                    tail.join("\n")
                );
            }
        };
        let http = line
            .split("://")
            .nth(1)
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .context("server did not print its URL")?;
        let plain = admin.unwrap_or_else(|| http.clone());
        Ok(Server {
            child,
            http,
            plain,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What the process wrote so far.
    pub fn log(&self) -> Log {
        lock(&self.log).clone()
    }

    /// Ask for a graceful stop (SIGTERM) and wait up to `timeout` for the
    /// exit; `None` if it did not exit by then (it is killed on drop).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// utime + stime of the server process, in seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_of(&format!("/proc/{}/stat", self.child.id()))
    }

    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        let mut s = TcpStream::connect(&self.plain)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    }

    /// The trunk address this node reports in `/api/status`.
    pub fn trunk_addr(&self) -> anyhow::Result<String> {
        let body = self.get("/api/status")?;
        let at = body.find("\"trunk\":\"").context("no trunk in status")? + 9;
        let end = body[at..].find('"').context("status format")?;
        Ok(body[at..at + end].to_string())
    }

    /// One unlabelled metric from `/metrics`.
    pub fn metric(&self, name: &str) -> anyhow::Result<u64> {
        let body = self.get("/metrics")?;
        body.lines()
            .find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some(name)).then(|| it.next()?.parse().ok())?
            })
            .with_context(|| format!("metric {name} missing"))
    }

    /// Every sample of `/metrics`, by series (name with its labels, e.g.
    /// `switchboard_trunk_up{peer="1"}`).
    pub fn metrics(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let body = self.get("/metrics")?;
        let (_, body) = body.split_once("\r\n\r\n").context("HTTP response")?;
        Ok(body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series.to_string(), value.parse().ok()?))
            })
            .collect())
    }

    /// A field of `/proc/<pid>/status` in its unit (kB for memory), e.g.
    /// `VmRSS` or `Threads`.
    pub fn proc_status(&self, field: &str) -> anyhow::Result<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        text.lines()
            .find_map(|l| {
                let rest = l.strip_prefix(field)?.strip_prefix(':')?;
                rest.split_whitespace().next()?.parse().ok()
            })
            .with_context(|| format!("{field} missing in /proc/<pid>/status"))
    }

    /// Open file descriptors of the process.
    pub fn open_fds(&self) -> anyhow::Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))?.count())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lock(log: &Mutex<Log>) -> std::sync::MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(|p| p.into_inner())
}

/// utime + stime of a process from its `/proc/<pid>/stat`, in seconds.
pub fn cpu_of(stat: &str) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(stat)?;
    // Fields after the ")" of the command name; utime, stime are 14 and 15.
    let rest = text.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / 100.0) // USER_HZ is 100 on Linux
}
