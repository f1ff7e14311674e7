//! Node configuration: defaults < TOML file < `SWITCHBOARD_*` env < flags.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use serde::Deserialize;

/// Everything a node needs to start. `Default` runs a single node on
/// http://127.0.0.1:3000 with media on UDP 3001.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Address HTTP and media bind to. A specific address: the ICE-lite
    /// media plane advertises it as its candidate.
    pub bind: IpAddr,
    /// HTTP port (web client, signaling, health, metrics); 0 = any free port.
    pub http_port: u16,
    /// UDP port for all media; 0 = any free port.
    pub media_port: u16,
    /// Address advertised to browsers instead of `bind` (NAT, containers).
    pub public_ip: Option<IpAddr>,
    pub max_participants_per_room: usize,
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: IpAddr::from([127, 0, 0, 1]),
            http_port: 3000,
            media_port: 3001,
            public_ip: None,
            max_participants_per_room: 100,
            log_format: LogFormat::Human,
        }
    }
}

/// Command line (each flag also read from its `SWITCHBOARD_*` variable).
/// Everything is optional here so that a value can be told apart from a
/// default and the TOML file can sit between them.
#[derive(Debug, Parser, Default)]
#[command(name = "switchboard", version, about = "A WebRTC SFU for group calls")]
pub struct Args {
    /// TOML file with any of the settings below (keys: bind, http_port, ...).
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to bind HTTP and media to [default: 127.0.0.1].
    #[arg(long, env = "SWITCHBOARD_BIND")]
    pub bind: Option<IpAddr>,
    /// HTTP port; 0 = any free port [default: 3000].
    #[arg(long, env = "SWITCHBOARD_HTTP_PORT")]
    pub http_port: Option<u16>,
    /// UDP media port; 0 = any free port [default: 3001].
    #[arg(long, env = "SWITCHBOARD_MEDIA_PORT")]
    pub media_port: Option<u16>,
    /// Address advertised in ICE candidates instead of --bind.
    #[arg(long, env = "SWITCHBOARD_PUBLIC_IP")]
    pub public_ip: Option<IpAddr>,
    /// Most participants per room on this node [default: 100].
    #[arg(long, env = "SWITCHBOARD_MAX_PARTICIPANTS_PER_ROOM")]
    pub max_participants_per_room: Option<usize>,
    /// Log output format [default: human].
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
}

/// The TOML file: same keys as the flags, with `_`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub bind: Option<IpAddr>,
    pub http_port: Option<u16>,
    pub media_port: Option<u16>,
    pub public_ip: Option<IpAddr>,
    pub max_participants_per_room: Option<usize>,
    pub log_format: Option<LogFormat>,
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("bad config file {}", path.display()))
    }
}

impl Config {
    /// Resolve flags/env (`args`) over the file over the defaults.
    pub fn resolve(args: Args, file: FileConfig) -> Config {
        let d = Config::default();
        Config {
            bind: args.bind.or(file.bind).unwrap_or(d.bind),
            http_port: args.http_port.or(file.http_port).unwrap_or(d.http_port),
            media_port: args.media_port.or(file.media_port).unwrap_or(d.media_port),
            public_ip: args.public_ip.or(file.public_ip).or(d.public_ip),
            max_participants_per_room: args
                .max_participants_per_room
                .or(file.max_participants_per_room)
                .unwrap_or(d.max_participants_per_room),
            log_format: args.log_format.or(file.log_format).unwrap_or(d.log_format),
        }
    }

    /// Parse the process's command line, environment and config file.
    pub fn from_env() -> anyhow::Result<Config> {
        let args = Args::parse();
        let file = match &args.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        Ok(Config::resolve(args, file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// clap reads `SWITCHBOARD_*` from the process environment, which tests
    /// share: every test that parses arguments holds this lock.
    static ENV: Mutex<()> = Mutex::new(());

    fn env_lock() -> std::sync::MutexGuard<'static, ()> {
        ENV.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[test]
    fn defaults_serve_a_single_node_on_3000() {
        let c = Config::resolve(Args::default(), FileConfig::default());
        assert_eq!(c, Config::default());
        assert_eq!(c.http_port, 3000);
        assert_eq!(c.bind.to_string(), "127.0.0.1");
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let _env = env_lock();
        let file: FileConfig =
            toml::from_str("http_port = 8080\nmedia_port = 9000\nlog_format = \"json\"").unwrap();
        let args = Args::try_parse_from(["switchboard", "--http-port", "7000"]).unwrap();
        let c = Config::resolve(args, file);
        assert_eq!(c.http_port, 7000, "flag wins");
        assert_eq!(c.media_port, 9000, "file beats default");
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.max_participants_per_room, 100, "default");
    }

    #[test]
    fn env_is_read_and_flag_beats_env() {
        let _env = env_lock();
        // SAFETY: every test that reads the environment holds the lock.
        unsafe {
            std::env::set_var("SWITCHBOARD_PUBLIC_IP", "203.0.113.7");
            std::env::set_var("SWITCHBOARD_MAX_PARTICIPANTS_PER_ROOM", "5");
        }
        let args = Args::try_parse_from(["switchboard", "--max-participants-per-room", "9"]);
        unsafe {
            std::env::remove_var("SWITCHBOARD_PUBLIC_IP");
            std::env::remove_var("SWITCHBOARD_MAX_PARTICIPANTS_PER_ROOM");
        }
        let file: FileConfig = toml::from_str("public_ip = \"198.51.100.1\"").unwrap();
        let c = Config::resolve(args.unwrap(), file);
        assert_eq!(
            c.public_ip.unwrap().to_string(),
            "203.0.113.7",
            "env beats file"
        );
        assert_eq!(c.max_participants_per_room, 9, "flag beats env");
    }

    #[test]
    fn unknown_file_keys_and_bad_values_are_errors() {
        let _env = env_lock();
        assert!(toml::from_str::<FileConfig>("htp_port = 1").is_err());
        assert!(toml::from_str::<FileConfig>("http_port = 70000").is_err());
        assert!(Args::try_parse_from(["switchboard", "--bind", "nope"]).is_err());
    }
}
