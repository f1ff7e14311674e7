//! The real `switchboard` executable: configuration from file + env + flags,
//! the URL it prints, and a clean exit (status 0) on SIGTERM and SIGINT.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

/// Kills the child if a test fails half-way.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Running {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null());
        // Only what this test sets: nothing from the developer's shell.
        for (k, _) in std::env::vars() {
            if k.starts_with("SWITCHBOARD_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().expect("the binary starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines }
    }

    /// Lines of output until one satisfies `want`; returns them all.
    fn wait_line(&self, want: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let done = want(&l);
                    seen.push(l);
                    if done {
                        return seen;
                    }
                }
                Err(_) => panic!("no matching output line; got {seen:#?}"),
            }
        }
    }

    /// The `http://ADDR/` the binary prints at start.
    fn http_addr(&self) -> (String, Vec<String>) {
        // Human output prints a line for people; JSON output only its
        // `ready` event, which carries the same URL.
        let lines =
            self.wait_line(|l| l.contains("Switchboard is running") || l.contains("node ready at"));
        let last = lines.last().cloned().unwrap_or_default();
        let addr = last
            .split("http://")
            .nth(1)
            .and_then(|s| s.split('/').next())
            .expect("the URL is printed")
            .to_string();
        (addr, lines)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok);
    }

    fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait works") {
                return status.code();
            }
            assert!(Instant::now() < deadline, "did not exit within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("HTTP is up");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn file_env_and_flags_combine_and_sigterm_exits_zero() {
    let dir = std::env::temp_dir().join(format!("switchboard-bin-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("node.toml");
    std::fs::write(
        &file,
        "http_port = 0\nmedia_port = 0\nmax_participants_per_room = 7\nlog_format = \"json\"\n",
    )
    .unwrap();
    let file_arg = file.to_string_lossy().into_owned();
    let mut node = Running::start(
        &["--config", &file_arg, "--bind", "127.0.0.1"],
        &[
            // env beats the file...
            ("SWITCHBOARD_MAX_PARTICIPANTS_PER_ROOM", "3"),
            ("SWITCHBOARD_LOG", "switchboard=debug,info"),
        ],
    );
    let (addr, lines) = node.http_addr();
    assert_eq!(get(&addr, "/healthz").0, 200);
    assert_eq!(get(&addr, "/readyz").0, 200);
    let (s, body) = get(&addr, "/api/status");
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
    assert_eq!(v["node"]["max_participants_per_room"], 3, "env beats file");
    // The file asked for JSON logs: every line is a JSON object.
    assert!(
        lines
            .iter()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v.is_object())),
        "JSON log lines expected: {lines:#?}"
    );
    node.signal("-TERM");
    node.wait_line(|l| l.contains("switchboard node stopped"));
    assert_eq!(node.exit_code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn flags_beat_env_and_sigint_exits_zero() {
    let mut node = Running::start(
        &[
            "--http-port",
            "0",
            "--media-port",
            "0",
            "--log-format",
            "human",
        ],
        &[
            ("SWITCHBOARD_HTTP_PORT", "1"),
            ("SWITCHBOARD_LOG_FORMAT", "json"),
        ],
    );
    let (addr, _) = node.http_addr();
    let lines = node.wait_line(|l| l.contains("Switchboard is running"));
    assert!(!addr.ends_with(":1"), "the flag wins over the env: {addr}");
    assert!(
        lines.iter().all(|l| !l.starts_with('{')),
        "human logs: {lines:#?}"
    );
    assert_eq!(get(&addr, "/healthz").0, 200);
    node.signal("-INT");
    assert_eq!(node.exit_code(), Some(0));
}

#[test]
fn a_bad_config_file_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("switchboard-bad-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "http_prot = 8080\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--config", &file.to_string_lossy()])
        .stdin(Stdio::null())
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad config file"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A media worker that dies (a panic outside every guarded str0m call)
/// makes the process log it and exit non-zero, so a supervisor restarts
/// it: never a half-dead node that still answers HTTP. The debug binary
/// panics its worker on `SWITCHBOARD_DEBUG_PANIC_WORKER` (no such hook in
/// a release build).
#[test]
fn a_dead_media_worker_makes_the_process_exit_non_zero() {
    let mut node = Running::start(
        &["--http-port", "0", "--media-port", "0"],
        &[("SWITCHBOARD_DEBUG_PANIC_WORKER", "1")],
    );
    let lines = node.wait_line(|l| l.contains("media worker stopped unexpectedly"));
    let code = node.exit_code();
    assert!(
        matches!(code, Some(c) if c != 0),
        "exit code {code:?}; output {lines:#?}"
    );
}

/// `switchboard <args>` to completion, with only `env` set.
fn run_once(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SWITCHBOARD_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("runs")
}

#[test]
fn switchboard_secret_prints_a_fresh_secret_a_node_accepts() {
    let one = run_once(&["secret"], &[]);
    let two = run_once(&["secret"], &[]);
    assert!(one.status.success() && two.status.success());
    let one = String::from_utf8(one.stdout).unwrap();
    let two = String::from_utf8(two.stdout).unwrap();
    assert_eq!(one.lines().count(), 1, "one line: {one:?}");
    let secret = one.trim_end();
    assert_eq!(secret.len(), 43, "{secret:?}");
    assert_ne!(secret, two.trim_end(), "fresh each time");
    let mut node = Running::start(
        &["--http-port", "0", "--media-port", "0", "--trunk-port", "0"],
        &[("SWITCHBOARD_CLUSTER_SECRET", secret)],
    );
    node.http_addr();
    node.signal("-TERM");
    assert_eq!(node.exit_code(), Some(0));
}

#[test]
fn a_weak_cluster_secret_is_refused_with_a_clear_message() {
    for weak in [
        "a long shared secret",
        "short",
        "0123456789abcdef0123456789abcdef",
    ] {
        let out = run_once(
            &["--http-port", "0", "--media-port", "0", "--trunk-port", "0"],
            &[("SWITCHBOARD_CLUSTER_SECRET", weak)],
        );
        assert!(!out.status.success(), "{weak:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("SWITCHBOARD_CLUSTER_SECRET")
                && err.contains("too weak")
                && err.contains("128 random bits")
                && err.contains("switchboard secret"),
            "{weak:?}: {err}"
        );
    }
}

/// `/api/status` of a node, as JSON.
fn status(addr: &str) -> serde_json::Value {
    let (s, body) = get(addr, "/api/status");
    assert_eq!(s, 200);
    serde_json::from_str(&body).expect("status is JSON")
}

/// Waits until `/api/status` satisfies `want`.
fn wait_status(addr: &str, what: &str, want: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = status(addr);
        if want(&v) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {v:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_nodes_started_with_the_same_id_are_refused_with_a_clear_message() {
    let secret = String::from_utf8(run_once(&["secret"], &[]).stdout).unwrap();
    let env = [("SWITCHBOARD_CLUSTER_SECRET", secret.trim_end())];
    let ports = ["--http-port", "0", "--media-port", "0", "--trunk-port", "0"];
    let args = |extra: &[&str]| -> Vec<String> {
        ports
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    };
    let start = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        Running::start(&a, &env)
    };
    let b = start(args(&["--node-id", "2"]));
    let (b_http, _) = b.http_addr();
    let b_trunk = status(&b_http)["node"]["trunk"]
        .as_str()
        .expect("B's trunk address")
        .to_string();
    let peer = format!("2@{b_trunk}");
    let a1 = start(args(&["--node-id", "1", "--peer", &peer]));
    let (a1_http, _) = a1.http_addr();
    let linked = |v: &serde_json::Value| {
        v["trunks"]
            .as_array()
            .is_some_and(|t| t.iter().any(|p| p["node_id"] == 1 && p["up"] == true))
    };
    wait_status(&b_http, "B links with A1", linked);

    // A second process with id 1: refused by B, it says why and exits
    // non-zero; A1 keeps its trunk.
    let mut a2 = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(args(&["--node-id", "1", "--peer", &peer]))
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    let deadline = Instant::now() + WAIT;
    let code = loop {
        if let Some(status) = a2.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = a2.kill();
            let _ = a2.wait();
            panic!("the second node 1 kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_ne!(code, Some(0));
    let mut err = String::new();
    a2.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(
        err.contains("node id 1 is already used by another live node") && err.contains("--node-id"),
        "{err}"
    );
    // B said it loudly, naming both addresses.
    let line = b.wait_line(|l| l.contains("two live nodes claim node id 1"));
    let line = line.last().unwrap();
    assert!(
        line.contains("keeps its trunk")
            && line.contains("is refused")
            && line.matches("127.0.0.1:").count() >= 2,
        "both addresses named: {line}"
    );
    let v = status(&b_http);
    assert!(linked(&v), "A1 lost its trunk: {v:#}");
    let v = status(&a1_http);
    assert!(
        v["trunks"]
            .as_array()
            .is_some_and(|t| t.iter().any(|p| p["node_id"] == 2 && p["up"] == true)),
        "A1 lost its trunk: {v:#}"
    );
    let (_, metrics) = get(&b_http, "/metrics");
    assert!(
        metrics.lines().any(
            |l| l.starts_with("switchboard_trunk_node_id_conflicts_total ") && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
    drop(a1);
}
