//! `switchboard`: run one node. `cargo run --release` serves
//! http://127.0.0.1:3000 with no other setup.

use anyhow::Context;
use switchboard::{Config, LogFormat, Node};
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    init_logging(config.log_format)?;
    let format = config.log_format;
    // Handlers first: a SIGTERM that arrives while the node starts (or right
    // after it printed its URL) must still mean a graceful stop, not death.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let node = Node::start(config).await?;
    // JSON output stays pure JSON lines: the "ready" event carries the URL.
    if format == LogFormat::Human {
        println!("Switchboard is running: open http://{}/", node.http_addr());
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = node.media_failed() => {
            tracing::error!("the media worker stopped unexpectedly; shutting down to be restarted");
            node.shutdown().await;
            anyhow::bail!("the media worker stopped unexpectedly (see the log above)");
        }
    }
    tracing::info!("signal received; shutting down");
    node.shutdown().await;
    Ok(())
}
