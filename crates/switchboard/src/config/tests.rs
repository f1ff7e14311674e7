//! Tests of the configuration layers (defaults < file < env < flags).

use super::*;
use std::sync::Mutex;

/// clap reads `SWITCHBOARD_*` from the process environment, which tests
/// share: every test that parses arguments holds this lock.
static ENV: Mutex<()> = Mutex::new(());

fn env_lock() -> std::sync::MutexGuard<'static, ()> {
    ENV.lock().unwrap_or_else(|p| p.into_inner())
}

/// Parse `args` with `file` as the TOML file's text (when `--config` is given).
fn parse(args: &[&str], file: &str) -> Config {
    parse_cli(args, file).config
}

fn parse_cli(args: &[&str], file: &str) -> Cli {
    let matches = Cli::command()
        .try_get_matches_from(args)
        .expect("valid args");
    Cli::from_matches(&matches, |_| Ok(toml::from_str(file)?)).expect("valid config")
}

#[test]
fn defaults_serve_a_single_node_on_3000() {
    let _env = env_lock();
    assert_eq!(parse(&["switchboard"], ""), Config::default());
    let c = Config::default();
    assert_eq!(c.http_port, 3000);
    assert_eq!(c.bind.to_string(), "127.0.0.1");
    Cli::command().debug_assert();
}

#[test]
fn flag_beats_file_beats_default() {
    let _env = env_lock();
    let c = parse(
        &["switchboard", "--config", "x.toml", "--http-port", "7000"],
        "http_port = 8080\nmedia_port = 9000\nlog_format = \"json\"",
    );
    assert_eq!(c.http_port, 7000, "flag wins");
    assert_eq!(c.media_port, 9000, "file beats default");
    assert_eq!(c.log_format, LogFormat::Json);
    assert_eq!(c.max_participants_per_room, 100, "default");
}

#[test]
fn a_flag_equal_to_the_default_still_beats_the_file() {
    let _env = env_lock();
    let c = parse(
        &["switchboard", "--config", "x.toml", "--http-port", "3000"],
        "http_port = 8080",
    );
    assert_eq!(c.http_port, 3000);
}

#[test]
fn env_is_read_and_flag_beats_env_beats_file() {
    let _env = env_lock();
    // SAFETY: every test that reads the environment holds the lock.
    unsafe {
        std::env::set_var("SWITCHBOARD_PUBLIC_IP", "203.0.113.7");
        std::env::set_var("SWITCHBOARD_MAX_PARTICIPANTS_PER_ROOM", "5");
    }
    let matches = Cli::command().try_get_matches_from([
        "switchboard",
        "--config",
        "x.toml",
        "--max-participants-per-room",
        "9",
    ]);
    unsafe {
        std::env::remove_var("SWITCHBOARD_PUBLIC_IP");
        std::env::remove_var("SWITCHBOARD_MAX_PARTICIPANTS_PER_ROOM");
    }
    let c = Cli::from_matches(&matches.unwrap(), |_| {
        Ok(toml::from_str(
            "public_ip = \"198.51.100.1\"\nmax_participants_per_room = 2",
        )?)
    })
    .unwrap()
    .config;
    assert_eq!(
        c.public_ip.unwrap().to_string(),
        "203.0.113.7",
        "env beats file"
    );
    assert_eq!(c.max_participants_per_room, 9, "flag beats env");
}

#[test]
fn cluster_settings_from_flags_env_and_file() {
    let _env = env_lock();
    let c = parse(
        &[
            "switchboard",
            "--cluster-secret",
            "sixteen bytes or more",
            "--node-id",
            "7",
            "--peer",
            "1@127.0.0.1:4001",
            "--peer",
            "2@127.0.0.1:4002",
        ],
        "",
    );
    assert_eq!(c.node_id, Some(7));
    assert_eq!(
        c.peers.iter().map(|p| p.node_id).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(c.peers[1].addr.to_string(), "127.0.0.1:4002");
    assert!(
        !format!("{c:?}").contains("sixteen"),
        "the secret must never be printed"
    );
    // SAFETY: every test that reads the environment holds the lock.
    unsafe { std::env::set_var("SWITCHBOARD_PEERS", "3@127.0.0.1:1,4@127.0.0.1:2") };
    let c = parse(
        &["switchboard", "--config", "f.toml"],
        "peers = [\"9@127.0.0.1:9\"]\ntrunk_port = 5",
    );
    unsafe { std::env::remove_var("SWITCHBOARD_PEERS") };
    assert_eq!(
        c.peers.iter().map(|p| p.node_id).collect::<Vec<_>>(),
        [3, 4],
        "env beats the file"
    );
    assert_eq!(c.trunk_port, 5);
    let c = parse(
        &["switchboard", "--config", "f.toml"],
        "peers = [\"9@127.0.0.1:9\"]",
    );
    assert_eq!(c.peers[0].node_id, 9);
    for bad in ["127.0.0.1:1", "x@127.0.0.1:1", "1@nowhere", "1@"] {
        assert!(
            Cli::command()
                .try_get_matches_from(["switchboard", "--peer", bad])
                .is_err(),
            "{bad}"
        );
    }
}

#[test]
fn peer_dns_from_flags_env_and_file() {
    let _env = env_lock();
    let c = parse(&["switchboard"], "");
    assert!(c.peer_dns.is_empty() && c.dns_server.is_none());
    assert_eq!(c.peer_dns_interval_secs, 10);
    let c = parse(
        &[
            "switchboard",
            "--peer-dns",
            "switchboard-trunk.switchboard.svc.cluster.local:3002",
            "--peer-dns",
            "_trunk._udp.example.org",
            "--peer-dns-interval-secs",
            "3",
            "--dns-server",
            "127.0.0.1:5353",
        ],
        "",
    );
    assert_eq!(
        c.peer_dns,
        [
            PeerDns::Host {
                name: "switchboard-trunk.switchboard.svc.cluster.local".into(),
                port: 3002
            },
            PeerDns::Srv {
                name: "_trunk._udp.example.org".into()
            }
        ]
    );
    assert_eq!(c.peer_dns_interval_secs, 3);
    assert_eq!(c.dns_server.unwrap().to_string(), "127.0.0.1:5353");
    assert_eq!(
        c.peer_dns[0].to_string(),
        "switchboard-trunk.switchboard.svc.cluster.local:3002"
    );
    // SAFETY: every test that reads the environment holds the lock.
    unsafe { std::env::set_var("SWITCHBOARD_PEER_DNS", "a.example:1,[::1]:2,b.example.:3") };
    let c = parse(
        &["switchboard", "--config", "f.toml"],
        "peer_dns = [\"file.example:9\"]\npeer_dns_interval_secs = 30\ndns_server = \"[::1]:53\"",
    );
    unsafe { std::env::remove_var("SWITCHBOARD_PEER_DNS") };
    assert_eq!(
        c.peer_dns
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["a.example:1", "[::1]:2", "b.example.:3"],
        "env beats the file"
    );
    assert_eq!(c.peer_dns_interval_secs, 30);
    assert_eq!(c.dns_server.unwrap().to_string(), "[::1]:53");
    let c = parse(
        &["switchboard", "--config", "f.toml"],
        "peer_dns = [\"file.example:9\"]",
    );
    assert_eq!(c.peer_dns[0].name(), "file.example");
    for bad in [
        "",
        "name-without-port",
        "name:0",
        "name:70000",
        "name:port",
        "bad name:1",
        "a..b:1",
        "_trunk._udp.example.org:3002",
        "_trunk.example.org",
        "::1:3002",
        "[::1]",
        &format!("{}:1", "a".repeat(64)),
        &format!("{}.b:1", "a.".repeat(130)),
    ] {
        assert!(bad.parse::<PeerDns>().is_err(), "{bad:?} accepted");
        assert!(
            Cli::command()
                .try_get_matches_from(["switchboard", "--peer-dns", bad])
                .is_err(),
            "{bad:?}"
        );
    }
    assert!(Config::try_parse_args(["switchboard", "--peer-dns-interval-secs", "0"]).is_err());
    assert!(toml::from_str::<FileConfig>("peer_dns = [\"nope\"]").is_err());
}

#[test]
fn unknown_file_keys_and_bad_values_are_errors() {
    let _env = env_lock();
    assert!(toml::from_str::<FileConfig>("htp_port = 1").is_err());
    assert!(toml::from_str::<FileConfig>("http_port = 70000").is_err());
    assert!(Config::try_parse_args(["switchboard", "--bind", "nope"]).is_err());
    assert!(Config::try_parse_args(["switchboard", "--log-format", "xml"]).is_err());
    assert!(Config::try_parse_args(["switchboard", "--join-timeout-secs", "0"]).is_err());
    assert!(Config::try_parse_args(["switchboard", "--config", "/nonexistent/sb.toml"]).is_err());
}

#[test]
fn no_subcommand_runs_a_node_and_token_takes_its_own_flags() {
    let _env = env_lock();
    assert_eq!(parse_cli(&["switchboard"], "").command, None);
    let cli = parse_cli(
        &[
            "switchboard",
            "token",
            "--room",
            "standup",
            "--name",
            "Ada",
            "--ttl",
            "90m",
            "--no-publish",
            // Global: the secret may follow the subcommand.
            "--auth-secret",
            "0123456789abcdef0123456789abcdef",
        ],
        "",
    );
    let Some(Command::Token(t)) = cli.command else {
        panic!("token subcommand expected")
    };
    assert_eq!((t.room.as_str(), t.name.as_str()), ("standup", "Ada"));
    assert_eq!(t.ttl, Duration::from_secs(90 * 60));
    assert!(t.no_publish && !t.no_subscribe && !t.no_chat);
    assert_eq!(t.identity, None);
    assert!(cli.config.auth_secret.is_some());
    let t = parse_cli(&["switchboard", "token", "--room", "r", "--name", "n"], "");
    let Some(Command::Token(t)) = t.command else {
        panic!("token subcommand expected")
    };
    assert_eq!(t.ttl, Duration::from_secs(3600), "default one hour");
    assert!(
        Cli::try_parse_args(["switchboard", "token", "--room", "r"]).is_err(),
        "a name is required"
    );
}

#[test]
fn ttl_takes_a_unit() {
    assert_eq!(parse_ttl("30s"), Ok(Duration::from_secs(30)));
    assert_eq!(parse_ttl("2h"), Ok(Duration::from_secs(7200)));
    assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(7 * 86_400)));
    for bad in [
        "",
        "h",
        "10",
        "0m",
        "-1h",
        "1.5h",
        "1w",
        "99999999999999999999d",
    ] {
        assert!(parse_ttl(bad).is_err(), "{bad}");
    }
}

#[test]
fn access_settings_from_flags_env_and_file() {
    let _env = env_lock();
    let c = parse(&["switchboard"], "");
    assert!(c.admin_allow_loopback, "loopback may read admin by default");
    assert!(c.allowed_origins.is_empty() && c.tls_cert.is_none());
    // SAFETY: every test that reads the environment holds the lock.
    unsafe {
        std::env::set_var(
            "SWITCHBOARD_ALLOWED_ORIGINS",
            "https://a.example,https://b.example",
        );
        std::env::set_var("SWITCHBOARD_AUTH_SECRET", "from the environment, 32 bytes+");
    }
    let c = parse(
        &[
            "switchboard",
            "--config",
            "f.toml",
            "--admin-allow-loopback",
            "false",
        ],
        "admin_bind = \"127.0.0.1:9100\"\nadmin_token = \"t0k\"\nallowed_origins = [\"https://c.example\"]\n\
         tls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\nauth_secret = \"from the file\"\ntls_poll_secs = 0",
    );
    unsafe {
        std::env::remove_var("SWITCHBOARD_ALLOWED_ORIGINS");
        std::env::remove_var("SWITCHBOARD_AUTH_SECRET");
    }
    assert!(!c.admin_allow_loopback);
    assert_eq!(
        c.allowed_origins,
        ["https://a.example", "https://b.example"]
    );
    assert_eq!(
        c.auth_secret,
        Some(Secret("from the environment, 32 bytes+".into())),
        "env beats the file"
    );
    assert_eq!(c.admin_token, Some(Secret("t0k".into())));
    assert_eq!(c.admin_bind.unwrap().to_string(), "127.0.0.1:9100");
    assert_eq!(c.tls_cert.as_deref(), Some(Path::new("/c.pem")));
    assert_eq!(c.tls_key.as_deref(), Some(Path::new("/k.pem")));
    assert_eq!(c.tls_poll_secs, 0);
    assert!(
        !format!("{c:?}").contains("t0k"),
        "secrets are never printed"
    );
    assert!(
        Config::try_parse_args(["switchboard", "--tls-cert", "/c.pem"]).is_err(),
        "a certificate needs its key"
    );
}
