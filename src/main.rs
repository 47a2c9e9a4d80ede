//! The `platform` binary: parses the command line, sets up logging, and runs a part of the
//! platform or an operator tool.

use clap::{Parser, Subcommand};
use platform::{Part, Platform, Settings};

/// mimalloc instead of glibc's malloc: see its entry in Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

    /// Export OpenTelemetry traces of `serve` by OTLP over HTTP (protobuf) to this collector base
    /// URL (spans go to `<url>/v1/traces`); off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    otlp_endpoint: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a part of the platform (default: all of it, in one process).
    Serve {
        #[arg(value_enum, default_value = "all")]
        part: Part,
    },
    /// Rebuild read models from the log into shadow tables and swap them in (live queries keep
    /// answering); or count (--dry-run) or compare (--diff) only.
    Replay(platform::tools::ReplayArgs),
    /// The audit trail: an aggregate's timeline, a request's causation tree, state as of a time
    /// or version.
    Audit {
        #[command(subcommand)]
        command: platform::tools::AuditCommand,
    },
    /// Projection lag per projection and partition.
    Projections {
        #[command(subcommand)]
        command: platform::ops::ProjectionsCommand,
    },
    /// Events a projection could not apply: list, retry, skip.
    Parked {
        #[command(subcommand)]
        command: platform::ops::ParkedCommand,
    },
    /// Order-fulfilment sagas: list (by state, stuck), show, retry a parked one.
    Sagas {
        #[command(subcommand)]
        command: platform::ops::SagasCommand,
    },
    /// List (and with --apply, reset) command-side snapshots and positions stored beyond the
    /// log's end, which the services refuse to start on.
    Recover(platform::ops::RecoverArgs),
}

/// `default` applies when `RUST_LOG` is not set. `to_stderr` keeps stdout for a command's own
/// output (a replay's report). With `otlp` (an endpoint and a service name), spans are also
/// exported by OTLP; the exporter is returned to be shut down (flushed) on exit.
fn init_logging(
    json: bool,
    default: &str,
    to_stderr: bool,
    otlp: Option<(&str, &str)>,
) -> anyhow::Result<Option<platform::otlp::Exporter>> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let writer = if to_stderr {
        tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr)
    } else {
        tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stdout)
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let (otel, exporter) = match otlp {
        Some((endpoint, service)) => {
            let (layer, exporter) = platform::otlp::layer(endpoint, service)?;
            (Some(layer), Some(exporter))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .with(filter)
        .init();
    Ok(exporter)
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
    let command = cli.command.unwrap_or(Command::Serve { part: Part::All });
    // Operator commands print a report; only warnings should interleave with it.
    let default_filter = match command {
        Command::Serve { .. } => "info,sqlx=warn,rdkafka=warn",
        Command::Replay(_) | Command::Audit { .. } => "warn",
        Command::Projections { .. }
        | Command::Parked { .. }
        | Command::Sagas { .. }
        | Command::Recover(_) => "warn",
    };
    let service = match &command {
        Command::Serve { part } => Some(format!("platform-{part:?}").to_lowercase()),
        _ => None,
    };
    let otlp = cli
        .otlp_endpoint
        .as_deref()
        .map(str::trim)
        .filter(|endpoint| !endpoint.is_empty())
        .zip(service.as_deref());
    let exporter = init_logging(
        cli.log_json,
        default_filter,
        matches!(command, Command::Replay(_)),
        otlp,
    )?;
    if let Some((endpoint, service)) = otlp {
        tracing::info!(endpoint, service, "exporting traces by OTLP/HTTP");
    }
    let result = run(command, cli.settings).await;
    if let Some(exporter) = exporter {
        // The batch processor's thread exports what is left; not on a runtime worker.
        let _ = tokio::task::spawn_blocking(move || exporter.shutdown()).await;
    }
    result
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Serve {
            part: Part::Gateway,
        } => {
            let gateway = gateway::Gateway::build(&settings.gateway_config()).await?;
            Ok(gateway.run_until_stopped(shutdown_signal()).await?)
        }
        Command::Serve { part } => {
            let platform = Platform::build(settings, part).await?;
            Ok(platform.run_until_stopped(shutdown_signal()).await?)
        }
        Command::Replay(args) => platform::tools::replay(args, settings).await,
        Command::Audit { command } => platform::tools::audit(command, settings).await,
        Command::Projections { command } => platform::ops::projections(command, settings).await,
        Command::Parked { command } => platform::ops::parked(command, settings).await,
        Command::Sagas { command } => platform::ops::sagas(command, settings).await,
        Command::Recover(args) => platform::ops::recover(args, settings).await,
    }
}
