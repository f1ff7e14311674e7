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
