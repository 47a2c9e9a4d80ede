//! The `platform` binary: parses the command line, sets up logging, and runs a part of the
//! platform or an operator tool.

use clap::{Parser, Subcommand};
use platform::{Part, Platform, Settings};

#[derive(Debug, Parser)]
#[command(name = "platform", version, about = "Event-sourced order fulfilment")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    settings: Settings,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "PLATFORM_LOG_JSON", global = true)]
    log_json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a part of the platform (default: all of it, in one process).
    Serve {
        #[arg(value_enum, default_value = "all")]
        part: Part,
    },
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,rdkafka=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match cli.command.unwrap_or(Command::Serve { part: Part::All }) {
        Command::Serve { part } => {
            let platform = Platform::build(cli.settings, part).await?;
            platform.run_until_stopped(shutdown_signal()).await
        }
    }
}
