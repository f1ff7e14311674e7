//! Node configuration: defaults < TOML file < `SWITCHBOARD_*` env < flags.
//!
//! [`Cli`] is the clap command line: the node's settings ([`Config`], each
//! flag also read from its `SWITCHBOARD_*` variable) and an optional
//! subcommand ([`Command`]); without one, the binary runs a node. The TOML
//! file sits between the defaults and the environment: after parsing, clap
//! says where each value came from ([`ArgMatches::value_source`]), and a
//! value that is only clap's default is replaced by the file's.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

const DEFAULT_BIND: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
const DEFAULT_HTTP_PORT: u16 = 3000;
/// A fixed media port by default (rather than 0) so a firewall rule or a
/// container port mapping can be written once.
const DEFAULT_MEDIA_PORT: u16 = 3001;
const DEFAULT_MAX_PARTICIPANTS_PER_ROOM: usize = 100;
/// Signaling sockets open at once: each holds a task and, once joined, a
/// str0m `Rtc`; 2,000 is well above what one worker thread forwards.
const DEFAULT_MAX_CONNECTIONS: usize = 2000;
/// Rooms open on this node at once: each costs a little state here and a
/// room link per peer on the trunk.
const DEFAULT_MAX_ROOMS: usize = 1000;
/// A browser offers once per publish change (camera, screen share, mute
/// does not renegotiate): 60 a minute is far above any real use.
const DEFAULT_MAX_OFFERS_PER_MINUTE: u32 = 60;
/// Messages waiting for a client that does not read (rosters, chat): a
/// slow consumer past this is cut rather than queued for without bound.
const DEFAULT_MAX_QUEUED_MESSAGES: usize = 1000;
/// The web client sends `join` as soon as its socket opens; 10 s is ample.
const DEFAULT_JOIN_TIMEOUT_SECS: u64 = 10;
/// ICE-TCP on the media port: on, it costs nothing until a browser uses it.
const DEFAULT_MEDIA_TCP: bool = true;
/// UDP port of the trunk (QUIC) when clustering.
const DEFAULT_TRUNK_PORT: u16 = 3002;
const DEFAULT_CLUSTER_NAME: &str = "switchboard";

/// A secret (cluster secret, auth secret, admin token): never printed
/// (`Debug` shows `***`).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// A peer node to dial: `<node id>@<host:port>` (the id it was started with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub node_id: u64,
    pub addr: std::net::SocketAddr,
}

impl std::str::FromStr for Peer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (id, addr) = s
            .split_once('@')
            .ok_or_else(|| format!("peer `{s}`: expected <node id>@<host:port>"))?;
        let node_id = id
            .parse()
            .map_err(|_| format!("peer `{s}`: node id must be a number"))?;
        let addr = std::net::ToSocketAddrs::to_socket_addrs(addr)
            .map_err(|e| format!("peer `{s}`: {e}"))?
            .next()
            .ok_or_else(|| format!("peer `{s}`: address resolves to nothing"))?;
        Ok(Peer { node_id, addr })
    }
}

impl<'de> Deserialize<'de> for Peer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A DNS name to discover trunk peers by (`--peer-dns`), resolved every
/// `--peer-dns-interval-secs`; every address found is dialed and the node
/// ids come from the trunk Hello.
///
/// - `<name>:<port>`: the name's A and AAAA records, each with `port`
///   (a Kubernetes headless Service: every pod's IP).
/// - `_<service>._<proto>.<name>` (no port): the name's SRV records, each
///   target's A and AAAA records with the record's port (priority and
///   weight are ignored: every node is dialed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerDns {
    Host { name: String, port: u16 },
    Srv { name: String },
}

/// Longest DNS name (RFC 1035: 255 octets on the wire, 253 as text).
const MAX_DNS_NAME: usize = 253;

impl PeerDns {
    /// The name as given (without the port).
    pub fn name(&self) -> &str {
        match self {
            PeerDns::Host { name, .. } | PeerDns::Srv { name } => name,
        }
    }
}

impl std::fmt::Display for PeerDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerDns::Host { name, port } if name.contains(':') => write!(f, "[{name}]:{port}"),
            PeerDns::Host { name, port } => write!(f, "{name}:{port}"),
            PeerDns::Srv { name } => f.write_str(name),
        }
    }
}

/// A host name (letters, digits, `-`, `_`, dot-separated labels of 1-63,
/// an optional final dot) or an IP address.
fn valid_dns_name(name: &str) -> bool {
    if name.parse::<IpAddr>().is_ok() {
        return true;
    }
    let bare = name.strip_suffix('.').unwrap_or(name);
    !bare.is_empty()
        && name.len() <= MAX_DNS_NAME
        && bare.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl std::str::FromStr for PeerDns {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let usage =
            "expected <name>:<port> (A/AAAA records) or _<service>._<proto>.<name> (SRV records)";
        let s = s.trim();
        // `[v6]:port`, `name:port`, or no port at all.
        let (name, port) = if let Some(rest) = s.strip_prefix('[') {
            let (ip, port) = rest
                .split_once("]:")
                .ok_or_else(|| format!("peer DNS `{s}`: {usage}"))?;
            (ip, Some(port))
        } else if s.matches(':').count() == 1 {
            let (name, port) = s.split_once(':').unwrap_or((s, ""));
            (name, Some(port))
        } else {
            (s, None)
        };
        if !valid_dns_name(name) {
            return Err(format!(
                "peer DNS `{s}`: `{name}` is not a DNS name; {usage}"
            ));
        }
        let srv = name.starts_with('_');
        match (port, srv) {
            (Some(port), false) => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("peer DNS `{s}`: the port must be 1-65535"))?;
                Ok(PeerDns::Host {
                    name: name.to_owned(),
                    port,
                })
            }
            (None, true) if name.split('.').nth(1).is_some_and(|l| l.starts_with('_')) => {
                Ok(PeerDns::Srv {
                    name: name.to_owned(),
                })
            }
            (Some(_), true) => Err(format!(
                "peer DNS `{s}`: an SRV name takes its ports from its records; drop the port"
            )),
            (None, _) => Err(format!("peer DNS `{s}`: {usage}")),
        }
    }
}

impl<'de> Deserialize<'de> for PeerDns {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How often `--peer-dns` names are resolved again by default: a new node
/// is dialed within this, a vanished one is forgotten (its trunk dies on
/// its own, within seconds, by heartbeat).
const DEFAULT_PEER_DNS_INTERVAL_SECS: u64 = 10;

/// The command line: the node's settings and, optionally, a subcommand.
/// `switchboard` alone runs a node.
#[derive(Debug, Clone, PartialEq, Parser)]
#[command(name = "switchboard", version, about = "A WebRTC SFU for group calls")]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What the binary does instead of running a node.
#[derive(Debug, Clone, PartialEq, Subcommand)]
pub enum Command {
    /// Mint a room access token with the --auth-secret (or
    /// SWITCHBOARD_AUTH_SECRET) and print it.
    Token(TokenArgs),
    /// Print a fresh random secret (256 bits, 43 characters), for
    /// --cluster-secret (and long enough for --auth-secret).
    Secret,
}

/// `switchboard token`: what the token admits to.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct TokenArgs {
    /// The room the token admits to.
    #[arg(long)]
    pub room: String,
    /// The display name the others see (the join's own name is ignored).
    #[arg(long)]
    pub name: String,
    /// The participant's stable identity (the token's `sub`, logged at
    /// join); a random one if unset.
    #[arg(long)]
    pub identity: Option<String>,
    /// How long the token admits: a number with `s`, `m`, `h` or `d`
    /// (`90s`, `30m`, `1h`, `7d`). A session that joined in time is not cut
    /// when the token expires later.
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// Not allowed to send audio, video or screen.
    #[arg(long)]
    pub no_publish: bool,
    /// Not allowed to receive the others' media.
    #[arg(long)]
    pub no_subscribe: bool,
    /// Not allowed to send chat messages.
    #[arg(long)]
    pub no_chat: bool,
}

/// `<n>s|m|h|d`, n ≥ 1: short enough to type, no parser crate for it.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let err = || format!("`{s}`: expected a number with s, m, h or d, e.g. 1h");
    let unit = s.chars().last().ok_or_else(err)?;
    let secs_per = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(err()),
    };
    let n: u64 = s[..s.len() - 1].parse().map_err(|_| err())?;
    if n == 0 {
        return Err(format!("`{s}`: the lifetime must be positive"));
    }
    n.checked_mul(secs_per)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{s}`: too long"))
}

/// Certificates are renewed days before they expire; checking the files
/// every few seconds is prompt enough and reading two small files that
/// often costs nothing.
const DEFAULT_TLS_POLL_SECS: u64 = 2;

/// `--admin-allow-loopback`: whether a client on the loopback interface
/// may read `/api/status` and `/metrics` without the admin token.
const DEFAULT_ADMIN_ALLOW_LOOPBACK: bool = true;

/// Everything a node needs to start. `Default` runs a single node on
/// http://127.0.0.1:3000 with media on UDP 3001.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct Config {
    /// TOML file with any of the settings below (keys: the flag names with
    /// `_`, e.g. `http_port = 8080`); flags and env override it.
    #[arg(long, env = "SWITCHBOARD_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Address HTTP and media bind to. A specific address: the ICE-lite
    /// media plane advertises it as its candidate (unless --public-ip).
    #[arg(long, env = "SWITCHBOARD_BIND", default_value_t = DEFAULT_BIND)]
    pub bind: IpAddr,
    /// HTTP port (web client, signaling, health, metrics); 0 = any free port.
    #[arg(long, env = "SWITCHBOARD_HTTP_PORT", default_value_t = DEFAULT_HTTP_PORT)]
    pub http_port: u16,
    /// UDP port for all media; 0 = any free port. With --media-tcp the
    /// same port number also listens on TCP.
    #[arg(long, env = "SWITCHBOARD_MEDIA_PORT", default_value_t = DEFAULT_MEDIA_PORT)]
    pub media_port: u16,
    /// ICE-TCP fallback: also listen on TCP on the media port and offer it
    /// as a (lower-priority) passive candidate, so a browser whose UDP is
    /// blocked still gets media. `false` turns it off.
    #[arg(
        long,
        env = "SWITCHBOARD_MEDIA_TCP",
        default_value_t = DEFAULT_MEDIA_TCP,
        action = clap::ArgAction::Set
    )]
    pub media_tcp: bool,
    /// Most ICE-TCP media connections open at once; one more is closed at
    /// once (counted in switchboard_tcp_connections_refused).
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_TCP_CONNECTIONS",
        default_value_t = sfu::DEFAULT_MAX_TCP_CONNECTIONS,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub max_tcp_connections: usize,
    /// Address advertised to browsers instead of --bind (NAT, containers).
    #[arg(long, env = "SWITCHBOARD_PUBLIC_IP")]
    pub public_ip: Option<IpAddr>,
    /// Most participants in one room on this node.
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_PARTICIPANTS_PER_ROOM",
        default_value_t = DEFAULT_MAX_PARTICIPANTS_PER_ROOM
    )]
    pub max_participants_per_room: usize,
    /// Most signaling connections open at once; one more gets `error
    /// server_busy` and is closed.
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_CONNECTIONS",
        default_value_t = DEFAULT_MAX_CONNECTIONS,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub max_connections: usize,
    /// Most rooms open on this node at once; a join that would open one more
    /// gets `error full` and is closed.
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_ROOMS",
        default_value_t = DEFAULT_MAX_ROOMS,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub max_rooms: usize,
    /// Most tracks one participant may publish (here, and announced by a
    /// peer node for one of its participants); more m-lines are ignored
    /// with `error invalid_sdp`.
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_TRACKS_PER_PARTICIPANT",
        default_value_t = sfu::MAX_PUBLISHED_TRACKS,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub max_tracks_per_participant: usize,
    /// Most SDP offers one participant may send per minute (a burst of a
    /// quarter of it at once); more get `error rate_limited` and are ignored.
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_OFFERS_PER_MINUTE",
        default_value_t = DEFAULT_MAX_OFFERS_PER_MINUTE,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_offers_per_minute: u32,
    /// Most messages queued for a client that does not read them; past it
    /// the client gets `error slow_consumer` and is disconnected.
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_QUEUED_MESSAGES",
        default_value_t = DEFAULT_MAX_QUEUED_MESSAGES,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub max_queued_messages: usize,
    /// Seconds a signaling socket may stay open without joining a room
    /// (then `error not_joined` and close): idle sockets cost a task each.
    #[arg(
        long,
        env = "SWITCHBOARD_JOIN_TIMEOUT_SECS",
        default_value_t = DEFAULT_JOIN_TIMEOUT_SECS,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub join_timeout_secs: u64,
    /// Log output format (the filter is SWITCHBOARD_LOG, RUST_LOG syntax).
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Shared secret of the cluster: at least 128 random bits in base64 or
    /// hex (`switchboard secret` prints one; a weak one is refused). Set it
    /// to join rooms with other nodes over trunks; unset, the node runs
    /// alone. Every holder is equally trusted (can pose as any node): use
    /// --trunk-ca/--trunk-cert/--trunk-key to bind node ids. Prefer the env
    /// variable or the file: a flag shows in `ps`.
    #[arg(long, env = "SWITCHBOARD_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<Secret>,
    /// This node's id in the cluster (peers name it in their --peer; with
    /// --peer-dns they learn it from the trunk Hello); each node needs its
    /// own (a second live node with an id is refused and exits). Unset: the
    /// id in --trunk-cert, else random.
    #[arg(long, env = "SWITCHBOARD_NODE_ID")]
    pub node_id: Option<u64>,
    /// Cluster name: nodes of another cluster are refused even with the secret.
    #[arg(long, env = "SWITCHBOARD_CLUSTER_NAME", default_value = DEFAULT_CLUSTER_NAME)]
    pub cluster_name: String,
    /// UDP port of the trunk (QUIC); 0 = any free port.
    #[arg(long, env = "SWITCHBOARD_TRUNK_PORT", default_value_t = DEFAULT_TRUNK_PORT)]
    pub trunk_port: u16,
    /// A node to dial, `<node id>@<host:port>`; repeat, or comma-separate in
    /// the env variable. Nodes not listed may still dial us.
    #[arg(long = "peer", env = "SWITCHBOARD_PEERS", value_delimiter = ',')]
    pub peers: Vec<Peer>,
    /// Discover peers by DNS: `<name>:<port>` dials every A/AAAA address of
    /// the name (e.g. a Kubernetes headless Service), `_<service>._<proto>.<name>`
    /// every SRV target with its port. Resolved again every
    /// --peer-dns-interval-secs; node ids come from the trunk Hello, this
    /// node's own address is recognised and skipped, and an address gone
    /// from DNS is forgotten once its trunk is down (an up trunk is never
    /// cut for it). Repeat, or comma-separate in the env variable.
    #[arg(long = "peer-dns", env = "SWITCHBOARD_PEER_DNS", value_delimiter = ',')]
    pub peer_dns: Vec<PeerDns>,
    /// Seconds between resolutions of the --peer-dns names (cached answers
    /// are not trusted for longer). A failed resolution keeps the last
    /// addresses found.
    #[arg(
        long,
        env = "SWITCHBOARD_PEER_DNS_INTERVAL_SECS",
        default_value_t = DEFAULT_PEER_DNS_INTERVAL_SECS,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub peer_dns_interval_secs: u64,
    /// DNS server (`ip:port`, plain DNS over UDP and TCP) for --peer-dns
    /// instead of the system's (/etc/resolv.conf); tests point it at a
    /// server of their own.
    #[arg(long, env = "SWITCHBOARD_DNS_SERVER")]
    pub dns_server: Option<SocketAddr>,
    /// Instead of a secret: PEM file of the cluster CA every node's
    /// certificate chains to (with --trunk-cert and --trunk-key).
    #[arg(long, env = "SWITCHBOARD_TRUNK_CA", requires_all = ["trunk_cert", "trunk_key"])]
    pub trunk_ca: Option<PathBuf>,
    /// This node's certificate chain (PEM; DNS name `switchboard-trunk`, URI
    /// `switchboard-node:<node id>`, server and client auth). A peer whose
    /// Hello names another id than its certificate is refused.
    #[arg(long, env = "SWITCHBOARD_TRUNK_CERT", requires_all = ["trunk_ca", "trunk_key"])]
    pub trunk_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, env = "SWITCHBOARD_TRUNK_KEY", requires_all = ["trunk_ca", "trunk_cert"])]
    pub trunk_key: Option<PathBuf>,
    /// QUIC congestion controller of the trunks: `bbr` (default; random
    /// loss does not shrink its window), `cubic` or `newreno` (loss-based).
    /// See docs/ARCHITECTURE.md for the measurements behind the default.
    #[arg(long, env = "SWITCHBOARD_TRUNK_CONGESTION", value_enum, default_value_t = TrunkCongestion::Bbr)]
    pub trunk_congestion: TrunkCongestion,
    /// PEM certificate chain for HTTPS/WSS on the HTTP port (with
    /// --tls-key). Browsers open camera and microphone only on a secure
    /// origin. Reloaded on SIGHUP and when the file changes.
    #[arg(long, env = "SWITCHBOARD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "SWITCHBOARD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Seconds between checks of the certificate files for a change;
    /// 0 = reload on SIGHUP only.
    #[arg(long, env = "SWITCHBOARD_TLS_POLL_SECS", default_value_t = DEFAULT_TLS_POLL_SECS)]
    pub tls_poll_secs: u64,
    /// Secret (≥ 32 bytes) that signs room access tokens (HS256 JWT). Set,
    /// every join needs a token (`switchboard token` mints one); unset,
    /// rooms are open to anyone who reaches the node. Every node of a
    /// cluster takes the same secret. Prefer the env variable or the file.
    #[arg(
        long,
        env = "SWITCHBOARD_AUTH_SECRET",
        hide_env_values = true,
        global = true
    )]
    pub auth_secret: Option<Secret>,
    /// Bearer token that lets a non-loopback client read `/api/status`
    /// and `/metrics` (`Authorization: Bearer <token>`); unset, only
    /// loopback clients and the --admin-bind listener may.
    #[arg(long, env = "SWITCHBOARD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,
    /// A second, plain-HTTP listener (`addr:port`) that serves `/api/status`,
    /// `/metrics`, `/healthz` and `/readyz` without the admin token: bind it
    /// to loopback or a private network.
    #[arg(long, env = "SWITCHBOARD_ADMIN_BIND")]
    pub admin_bind: Option<SocketAddr>,
    /// Whether loopback clients may read `/api/status` and `/metrics` on the
    /// main port without the admin token. Turn it off (`false`) behind a
    /// reverse proxy on the same host: every request then comes from loopback.
    #[arg(
        long,
        env = "SWITCHBOARD_ADMIN_ALLOW_LOOPBACK",
        default_value_t = DEFAULT_ADMIN_ALLOW_LOOPBACK,
        action = clap::ArgAction::Set
    )]
    pub admin_allow_loopback: bool,
    /// Origins (`https://host[:port]`, comma-separated; `*` for any) whose
    /// pages may open `/ws`, besides the node's own origin (the request's
    /// Host). A request without `Origin` (not a browser) is allowed.
    #[arg(long, env = "SWITCHBOARD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
}

/// The trunk's QUIC congestion controller (`trunk::quic::Congestion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TrunkCongestion {
    #[default]
    Bbr,
    Cubic,
    Newreno,
}

impl From<TrunkCongestion> for trunk::quic::Congestion {
    fn from(c: TrunkCongestion) -> Self {
        match c {
            TrunkCongestion::Bbr => trunk::quic::Congestion::Bbr,
            TrunkCongestion::Cubic => trunk::quic::Congestion::Cubic,
            TrunkCongestion::Newreno => trunk::quic::Congestion::NewReno,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// The same values clap uses as defaults; written out rather than parsed so
/// that `Default` never reads the process environment.
impl Default for Config {
    fn default() -> Self {
        Config {
            config: None,
            bind: DEFAULT_BIND,
            http_port: DEFAULT_HTTP_PORT,
            media_port: DEFAULT_MEDIA_PORT,
            media_tcp: DEFAULT_MEDIA_TCP,
            max_tcp_connections: sfu::DEFAULT_MAX_TCP_CONNECTIONS,
            public_ip: None,
            max_participants_per_room: DEFAULT_MAX_PARTICIPANTS_PER_ROOM,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_rooms: DEFAULT_MAX_ROOMS,
            max_tracks_per_participant: sfu::MAX_PUBLISHED_TRACKS,
            max_offers_per_minute: DEFAULT_MAX_OFFERS_PER_MINUTE,
            max_queued_messages: DEFAULT_MAX_QUEUED_MESSAGES,
            join_timeout_secs: DEFAULT_JOIN_TIMEOUT_SECS,
            log_format: LogFormat::Human,
            cluster_secret: None,
            node_id: None,
            cluster_name: DEFAULT_CLUSTER_NAME.to_owned(),
            trunk_port: DEFAULT_TRUNK_PORT,
            peers: Vec::new(),
            peer_dns: Vec::new(),
            peer_dns_interval_secs: DEFAULT_PEER_DNS_INTERVAL_SECS,
            dns_server: None,
            trunk_ca: None,
            trunk_cert: None,
            trunk_key: None,
            trunk_congestion: TrunkCongestion::Bbr,
            tls_cert: None,
            tls_key: None,
            tls_poll_secs: DEFAULT_TLS_POLL_SECS,
            auth_secret: None,
            admin_token: None,
            admin_bind: None,
            admin_allow_loopback: DEFAULT_ADMIN_ALLOW_LOOPBACK,
            allowed_origins: Vec::new(),
        }
    }
}

/// The TOML file: same keys as the flags, with `_`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub bind: Option<IpAddr>,
    pub http_port: Option<u16>,
    pub media_port: Option<u16>,
    pub media_tcp: Option<bool>,
    pub max_tcp_connections: Option<usize>,
    pub public_ip: Option<IpAddr>,
    pub max_participants_per_room: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_rooms: Option<usize>,
    pub max_tracks_per_participant: Option<usize>,
    pub max_offers_per_minute: Option<u32>,
    pub max_queued_messages: Option<usize>,
    pub join_timeout_secs: Option<u64>,
    pub log_format: Option<LogFormat>,
    pub cluster_secret: Option<Secret>,
    pub node_id: Option<u64>,
    pub cluster_name: Option<String>,
    pub trunk_port: Option<u16>,
    pub peers: Option<Vec<Peer>>,
    pub peer_dns: Option<Vec<PeerDns>>,
    pub peer_dns_interval_secs: Option<u64>,
    pub dns_server: Option<SocketAddr>,
    pub trunk_ca: Option<PathBuf>,
    pub trunk_cert: Option<PathBuf>,
    pub trunk_key: Option<PathBuf>,
    pub trunk_congestion: Option<TrunkCongestion>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_poll_secs: Option<u64>,
    pub auth_secret: Option<Secret>,
    pub admin_token: Option<Secret>,
    pub admin_bind: Option<SocketAddr>,
    pub admin_allow_loopback: Option<bool>,
    pub allowed_origins: Option<Vec<String>>,
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("bad config file {}", path.display()))
    }
}

impl Cli {
    /// Parse the process's command line, environment and config file.
    /// `--help`/`--version` and usage errors print and exit, as clap does.
    pub fn from_env() -> anyhow::Result<Cli> {
        let matches = Cli::command().get_matches();
        Cli::from_matches(&matches, FileConfig::load)
    }

    /// Like [`Cli::from_env`] for a given command line (env still read),
    /// returning usage errors instead of exiting.
    pub fn try_parse_args<I, T>(args: I) -> anyhow::Result<Cli>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let matches = Cli::command().try_get_matches_from(args)?;
        Cli::from_matches(&matches, FileConfig::load)
    }

    fn from_matches(
        matches: &ArgMatches,
        load: impl FnOnce(&Path) -> anyhow::Result<FileConfig>,
    ) -> anyhow::Result<Cli> {
        let mut cli = Cli::from_arg_matches(matches)?;
        if let Some(path) = cli.config.config.clone() {
            cli.config.apply_file(load(&path)?, matches);
        }
        Ok(cli)
    }
}

impl Config {
    /// The node settings of a command line (see [`Cli::try_parse_args`]).
    pub fn try_parse_args<I, T>(args: I) -> anyhow::Result<Config>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        Ok(Cli::try_parse_args(args)?.config)
    }

    /// Take each value from the file unless a flag or env var set it.
    fn apply_file(&mut self, file: FileConfig, matches: &ArgMatches) {
        let unset = |id: &str| {
            !matches!(
                matches.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        };
        if let Some(v) = file.bind.filter(|_| unset("bind")) {
            self.bind = v;
        }
        if let Some(v) = file.http_port.filter(|_| unset("http_port")) {
            self.http_port = v;
        }
        if let Some(v) = file.media_port.filter(|_| unset("media_port")) {
            self.media_port = v;
        }
        if let Some(v) = file.media_tcp.filter(|_| unset("media_tcp")) {
            self.media_tcp = v;
        }
        if let Some(v) = file
            .max_tcp_connections
            .filter(|_| unset("max_tcp_connections"))
        {
            self.max_tcp_connections = v.max(1);
        }
        if let Some(v) = file.public_ip.filter(|_| unset("public_ip")) {
            self.public_ip = Some(v);
        }
        if let Some(v) = file
            .max_participants_per_room
            .filter(|_| unset("max_participants_per_room"))
        {
            self.max_participants_per_room = v;
        }
        if let Some(v) = file.max_connections.filter(|_| unset("max_connections")) {
            self.max_connections = v.max(1);
        }
        if let Some(v) = file.max_rooms.filter(|_| unset("max_rooms")) {
            self.max_rooms = v.max(1);
        }
        if let Some(v) = file
            .max_tracks_per_participant
            .filter(|_| unset("max_tracks_per_participant"))
        {
            self.max_tracks_per_participant = v.max(1);
        }
        if let Some(v) = file
            .max_offers_per_minute
            .filter(|_| unset("max_offers_per_minute"))
        {
            self.max_offers_per_minute = v.max(1);
        }
        if let Some(v) = file
            .max_queued_messages
            .filter(|_| unset("max_queued_messages"))
        {
            self.max_queued_messages = v.max(1);
        }
        if let Some(v) = file
            .join_timeout_secs
            .filter(|_| unset("join_timeout_secs"))
        {
            self.join_timeout_secs = v.max(1);
        }
        if let Some(v) = file.log_format.filter(|_| unset("log_format")) {
            self.log_format = v;
        }
        if let Some(v) = file.cluster_secret.filter(|_| unset("cluster_secret")) {
            self.cluster_secret = Some(v);
        }
        if let Some(v) = file.node_id.filter(|_| unset("node_id")) {
            self.node_id = Some(v);
        }
        if let Some(v) = file.cluster_name.filter(|_| unset("cluster_name")) {
            self.cluster_name = v;
        }
        if let Some(v) = file.trunk_port.filter(|_| unset("trunk_port")) {
            self.trunk_port = v;
        }
        if let Some(v) = file.peers.filter(|_| unset("peers")) {
            self.peers = v;
        }
        if let Some(v) = file.peer_dns.filter(|_| unset("peer_dns")) {
            self.peer_dns = v;
        }
        if let Some(v) = file
            .peer_dns_interval_secs
            .filter(|_| unset("peer_dns_interval_secs"))
        {
            self.peer_dns_interval_secs = v.clamp(1, 86_400);
        }
        if let Some(v) = file.dns_server.filter(|_| unset("dns_server")) {
            self.dns_server = Some(v);
        }
        if let Some(v) = file.trunk_ca.filter(|_| unset("trunk_ca")) {
            self.trunk_ca = Some(v);
        }
        if let Some(v) = file.trunk_cert.filter(|_| unset("trunk_cert")) {
            self.trunk_cert = Some(v);
        }
        if let Some(v) = file.trunk_key.filter(|_| unset("trunk_key")) {
            self.trunk_key = Some(v);
        }
        if let Some(v) = file.trunk_congestion.filter(|_| unset("trunk_congestion")) {
            self.trunk_congestion = v;
        }
        if let Some(v) = file.tls_cert.filter(|_| unset("tls_cert")) {
            self.tls_cert = Some(v);
        }
        if let Some(v) = file.tls_key.filter(|_| unset("tls_key")) {
            self.tls_key = Some(v);
        }
        if let Some(v) = file.tls_poll_secs.filter(|_| unset("tls_poll_secs")) {
            self.tls_poll_secs = v;
        }
        if let Some(v) = file.auth_secret.filter(|_| unset("auth_secret")) {
            self.auth_secret = Some(v);
        }
        if let Some(v) = file.admin_token.filter(|_| unset("admin_token")) {
            self.admin_token = Some(v);
        }
        if let Some(v) = file.admin_bind.filter(|_| unset("admin_bind")) {
            self.admin_bind = Some(v);
        }
        if let Some(v) = file
            .admin_allow_loopback
            .filter(|_| unset("admin_allow_loopback"))
        {
            self.admin_allow_loopback = v;
        }
        if let Some(v) = file.allowed_origins.filter(|_| unset("allowed_origins")) {
            self.allowed_origins = v;
        }
    }
}

#[cfg(test)]
mod tests;
