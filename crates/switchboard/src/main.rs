//! `switchboard`: run one node. `cargo run --release` serves
//! http://127.0.0.1:3000 with no other setup. `switchboard token …` mints
//! a room access token instead, `switchboard secret` prints a fresh secret.

use anyhow::Context;
use switchboard::auth::{self, Claims, Grants};
use switchboard::{Cli, Command, LogFormat, Node, TokenArgs};
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat) -> anyhow::Result<()> {
    // Unset means `info`; a typo is an error rather than silently `info`.
    let filter = match std::env::var("SWITCHBOARD_LOG") {
        Ok(spec) => {
            EnvFilter::try_new(&spec).with_context(|| format!("bad SWITCHBOARD_LOG {spec:?}"))?
        }
        Err(_) => EnvFilter::new("info"),
    };
    // Colours only for a terminal, not for a log file or a collector.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// `switchboard token`: print one token (alone on stdout, for `$(…)`).
fn mint_token(
    secret: Option<&switchboard::config::Secret>,
    args: &TokenArgs,
) -> anyhow::Result<()> {
    let secret = secret.context(
        "minting a token needs the node's secret: --auth-secret or SWITCHBOARD_AUTH_SECRET",
    )?;
    // Refuse here what every node would refuse at join.
    signal::RoomName::parse(&args.room).map_err(|e| anyhow::anyhow!("--room: room name {e}"))?;
    signal::DisplayName::parse(&args.name)
        .map_err(|e| anyhow::anyhow!("--name: display name {e}"))?;
    let identity = match &args.identity {
        Some(i) => i.clone(),
        None => format!("{:016x}", rand::random::<u64>()),
    };
    let now = auth::now_secs();
    let claims = Claims {
        room: args.room.clone(),
        sub: identity,
        name: args.name.clone(),
        grants: Grants {
            publish: !args.no_publish,
            subscribe: !args.no_subscribe,
            chat: !args.no_chat,
        },
        exp: now.saturating_add(args.ttl.as_secs()),
        iat: Some(now),
        nbf: None,
    };
    let token = auth::mint(secret.0.as_bytes(), &claims).context("--auth-secret")?;
    println!("{token}");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::from_env()?;
    match &cli.command {
        Some(Command::Token(args)) => return mint_token(cli.config.auth_secret.as_ref(), args),
        // One line, alone on stdout, for `$(switchboard secret)`.
        Some(Command::Secret) => {
            println!("{}", trunk::quic::generate_secret());
            return Ok(());
        }
        None => {}
    }
    let config = cli.config;
    init_logging(config.log_format)?;
    let format = config.log_format;
    // Handlers first: a SIGTERM that arrives while the node starts (or right
    // after it printed its URL) must still mean a graceful stop, not death.
    // SIGHUP too: its default action would kill the node.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let node = Node::start(config).await?;
    // JSON output stays pure JSON lines: the "ready" event carries the URL.
    if format == LogFormat::Human {
        println!(
            "Switchboard is running: open {}://{}/",
            node.scheme(),
            node.http_addr()
        );
    }
    // Debug builds only (the release binary has no such hook): the media
    // worker panics outside every guard, so tests/binary.rs can check the
    // path a supervisor relies on, a logged error and a non-zero exit.
    #[cfg(debug_assertions)]
    if std::env::var_os("SWITCHBOARD_DEBUG_PANIC_WORKER").is_some() {
        node.sfu().panic_worker_for_test();
    }
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match node.reload_tls().await {
                Ok(true) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                Ok(false) => tracing::info!("SIGHUP: TLS certificate unchanged (or no TLS); nothing reloaded"),
                Err(e) => tracing::error!(error = %e, "SIGHUP: TLS certificate not reloaded; still serving the previous one"),
            },
            reason = node.node_id_in_use() => {
                tracing::error!("{reason}; shutting down");
                node.shutdown().await;
                anyhow::bail!("{reason}");
            }
            _ = node.media_failed() => {
                tracing::error!("the media worker stopped unexpectedly; shutting down to be restarted");
                node.shutdown().await;
                anyhow::bail!("the media worker stopped unexpectedly (see the log above)");
            }
        }
    }
    tracing::info!("signal received; shutting down");
    node.shutdown().await;
    Ok(())
}
