//! The `platform` binary: parses the command line, sets up logging, and runs a part of the
//! platform or an operator tool.

use clap::{Parser, Subcommand};
use platform::settings::{SagaSettings, StoreSettings};
use platform::{Part, Platform, Settings};

/// mimalloc instead of glibc's malloc: see its entry in Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Event-sourced order fulfilment.
///
/// Without a command, `platform [OPTIONS]` runs `platform serve all [OPTIONS]`. Each command takes
/// only the flags it uses: `platform <COMMAND> --help` lists them.
#[derive(Debug, Parser)]
#[command(name = "platform", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    // `serve all`'s flags, for `platform` without a command.
    #[command(flatten)]
    serve: ServeArgs,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "PLATFORM_LOG_JSON", global = true)]
    log_json: bool,
}

/// The flags of `platform serve`.
#[derive(Debug, clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    settings: Settings,

    /// Export OpenTelemetry traces by OTLP over HTTP (protobuf) to this collector base URL (spans
    /// go to `<url>/v1/traces`); off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

/// Makes a command's flags its subcommands' flags too, so they go after the subcommand as well
/// (`platform audit trace <id> --data-dir …`).
fn for_subcommands_too(arg: clap::Arg) -> clap::Arg {
    arg.global(true)
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a part of the platform (default: all of it, in one process).
    Serve {
        #[arg(value_enum, default_value = "all")]
        part: Part,
        #[command(flatten)]
        serve: Box<ServeArgs>,
    },
    /// Rebuild read models from the log into shadow tables and swap them in (live queries keep
    /// answering); or count (--dry-run) or compare (--diff) only.
    Replay {
        #[command(flatten)]
        args: platform::tools::ReplayArgs,
        #[command(flatten)]
        store: StoreSettings,
    },
    /// The audit trail: an aggregate's timeline, a request's causation tree, state as of a time
    /// or version.
    #[command(mut_args = for_subcommands_too)]
    Audit {
        #[command(subcommand)]
        command: platform::tools::AuditCommand,
        #[command(flatten)]
        store: StoreSettings,
    },
    /// Projection lag per projection and partition.
    #[command(mut_args = for_subcommands_too)]
    Projections {
        #[command(subcommand)]
        command: platform::ops::ProjectionsCommand,
        #[command(flatten)]
        store: StoreSettings,
    },
    /// Events a projection could not apply: list, retry, skip.
    #[command(mut_args = for_subcommands_too)]
    Parked {
        #[command(subcommand)]
        command: platform::ops::ParkedCommand,
        #[command(flatten)]
        store: StoreSettings,
    },
    /// Order-fulfilment sagas: list (by state, stuck), show, retry a parked one.
    #[command(mut_args = for_subcommands_too)]
    Sagas {
        #[command(subcommand)]
        command: platform::ops::SagasCommand,
        #[command(flatten)]
        store: StoreSettings,
        #[command(flatten)]
        saga: SagaSettings,
    },
    /// Customers: the erasure report (where a customer's personal data could live, and that
    /// nothing readable remains once they are erased).
    #[command(mut_args = for_subcommands_too)]
    Customers {
        #[command(subcommand)]
        command: platform::customers::CustomersCommand,
        #[command(flatten)]
        store: StoreSettings,
    },
    /// List (and with --apply, reset) command-side snapshots and positions stored beyond the
    /// log's end, which the services refuse to start on.
    Recover {
        #[command(flatten)]
        args: platform::ops::RecoverArgs,
        #[command(flatten)]
        store: StoreSettings,
    },
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
    let command = cli.command.unwrap_or(Command::Serve {
        part: Part::All,
        serve: Box::new(cli.serve),
    });
    // Operator commands print a report; only warnings should interleave with it.
    let default_filter = match command {
        Command::Serve { .. } => "info,sqlx=warn,rdkafka=warn",
        Command::Replay { .. } | Command::Audit { .. } => "warn",
        Command::Projections { .. }
        | Command::Parked { .. }
        | Command::Sagas { .. }
        | Command::Recover { .. }
        | Command::Customers { .. } => "warn",
    };
    let otlp = match &command {
        Command::Serve { part, serve } => serve
            .otlp_endpoint
            .as_deref()
            .map(str::trim)
            .filter(|endpoint| !endpoint.is_empty())
            .map(|endpoint| (endpoint, format!("platform-{part:?}").to_lowercase())),
        _ => None,
    };
    let exporter = init_logging(
        cli.log_json,
        default_filter,
        matches!(command, Command::Replay { .. }),
        otlp.as_ref()
            .map(|(endpoint, service)| (*endpoint, service.as_str())),
    )?;
    if let Some((endpoint, service)) = &otlp {
        tracing::info!(endpoint, service, "exporting traces by OTLP/HTTP");
    }
    let result = run(command).await;
    if let Some(exporter) = exporter {
        // The batch processor's thread exports what is left; not on a runtime worker.
        let _ = tokio::task::spawn_blocking(move || exporter.shutdown()).await;
    }
    if let Err(error) = result {
        eprintln!("Error: {}", with_causes(&error));
        std::process::exit(1);
    }
    Ok(())
}

/// An error's text followed by those of its causes that it does not already contain (most of
/// the platform's errors end with their cause's text; some, such as a failed bind, do not).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(source) = cause {
        let said = source.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = source.source();
    }
    text
}

async fn run(command: Command) -> Result<(), platform::Error> {
    match command {
        Command::Serve {
            part: Part::Gateway,
            serve,
        } => {
            let gateway = gateway::Gateway::build(&serve.settings.gateway_config()).await?;
            Ok(gateway.run_until_stopped(shutdown_signal()).await?)
        }
        Command::Serve { part, serve } => {
            let platform = Platform::build(serve.settings, part).await?;
            Ok(platform.run_until_stopped(shutdown_signal()).await?)
        }
        Command::Replay { args, store } => platform::tools::replay(args, &store).await,
        Command::Audit { command, store } => platform::tools::audit(command, &store).await,
        Command::Projections { command, store } => {
            platform::ops::projections(command, &store).await
        }
        Command::Parked { command, store } => platform::ops::parked(command, &store).await,
        Command::Sagas {
            command,
            store,
            saga,
        } => platform::ops::sagas(command, &store, &saga).await,
        Command::Recover { args, store } => platform::ops::recover(args, &store).await,
        Command::Customers { command, store } => {
            platform::customers::customers(command, &store).await
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use clap::{Args, CommandFactory};

    use super::*;

    #[test]
    fn an_error_is_printed_with_the_causes_its_text_does_not_already_give() {
        let bind = platform::Error::Io {
            what: "binding 0.0.0.0:8080".into(),
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use"),
        };
        // The text already ends with the cause: printed once.
        assert_eq!(
            with_causes(&bind),
            "binding 0.0.0.0:8080: Address already in use"
        );
        #[derive(Debug, thiserror::Error)]
        #[error("binding 0.0.0.0:8080")]
        struct Bind(#[source] std::io::Error);
        let quiet = Bind(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "Address already in use",
        ));
        assert_eq!(
            with_causes(&quiet),
            "binding 0.0.0.0:8080: Address already in use"
        );
    }

    /// The long flags `command` takes (its parents' global ones included, once built), less
    /// --help and --version.
    fn flags(command: &clap::Command) -> BTreeSet<String> {
        command
            .get_arguments()
            .filter_map(|arg| arg.get_long())
            .filter(|long| !["help", "version"].contains(long))
            .map(|long| format!("--{long}"))
            .collect()
    }

    fn flags_of_group(augment: fn(clap::Command) -> clap::Command) -> BTreeSet<String> {
        flags(&augment(clap::Command::new("group")))
    }

    /// Every command that runs something (`sagas list`, not `sagas`), by its path.
    fn leaves(command: &clap::Command, path: &str, found: &mut Vec<(String, BTreeSet<String>)>) {
        for sub in command
            .get_subcommands()
            .filter(|sub| sub.get_name() != "help")
        {
            let path = format!("{path} {}", sub.get_name()).trim().to_owned();
            if sub.has_subcommands() {
                leaves(sub, &path, found);
            } else {
                found.push((path, flags(sub)));
            }
        }
    }

    fn cli() -> clap::Command {
        let mut command = Cli::command();
        command.build();
        command
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn each_command_takes_only_the_flags_it_uses() {
        let command = cli();
        let mut commands = Vec::new();
        leaves(&command, "", &mut commands);
        let serve = commands
            .iter()
            .find(|(path, _)| path == "serve")
            .map(|(_, flags)| flags.clone())
            .expect("serve");
        let store = flags_of_group(StoreSettings::augment_args);
        let saga = flags_of_group(SagaSettings::augment_args);
        let serve_only: BTreeSet<String> = serve
            .iter()
            .filter(|flag| !store.contains(*flag) && *flag != "--log-json")
            .cloned()
            .collect();
        for flag in [
            "--http-addr",
            "--instance",
            "--assignment",
            "--partitions",
            "--durability",
            "--kafka-linger-ms",
            "--replication-factor",
            "--snapshot-every",
            "--max-lag-seconds",
            "--saga-timeout-ms",
            "--auth",
            "--api-keys",
            "--gateway-order",
            "--gateway-retries",
            "--http-request-timeout-ms",
            "--http-max-connections",
            "--otlp-endpoint",
        ] {
            assert!(serve_only.contains(flag), "serve takes {flag}");
        }
        assert!(store.contains("--kafka") && store.contains("--data-dir"));
        // `platform` alone is `platform serve all`, with the same flags.
        assert_eq!(flags(&command), serve);

        let tools: Vec<_> = commands
            .iter()
            .filter(|(path, _)| path != "serve")
            .collect();
        assert!(tools.len() >= 13, "{tools:?}");
        for (path, flags) in tools {
            assert!(
                store.is_subset(flags),
                "`platform {path}` takes every backend flag: {flags:?}"
            );
            let allowed: &BTreeSet<String> = if path.starts_with("sagas ") {
                &saga
            } else {
                &BTreeSet::new()
            };
            let foreign: Vec<_> = flags
                .intersection(&serve_only)
                .filter(|flag| !allowed.contains(*flag))
                .collect();
            assert!(
                foreign.is_empty(),
                "`platform {path}` offers serve's {foreign:?}"
            );
            assert_eq!(
                path.starts_with("sagas "),
                saga.is_subset(flags),
                "`platform {path}`: only `sagas` takes the saga's timeouts"
            );
        }
    }

    #[test]
    fn flags_go_after_the_command_and_its_subcommand() {
        let cli = Cli::try_parse_from([
            "platform",
            "sagas",
            "retry",
            "id",
            "--data-dir",
            "/tmp/d",
            "--saga-compensation-timeout-ms",
            "300",
        ])
        .expect("sagas retry");
        let Some(Command::Sagas { store, saga, .. }) = cli.command else {
            panic!("sagas: {:?}", cli.command);
        };
        assert_eq!(store.data_dir, std::path::Path::new("/tmp/d"));
        assert_eq!(saga.compensation_timeout_ms, 300);

        let cli = Cli::try_parse_from(["platform", "audit", "--data-dir", "/tmp/e", "trace", "c"])
            .expect("audit trace");
        let Some(Command::Audit { store, .. }) = cli.command else {
            panic!("audit: {:?}", cli.command);
        };
        assert_eq!(store.data_dir, std::path::Path::new("/tmp/e"));

        let cli = Cli::try_parse_from(["platform", "--topic-prefix", "t", "--partitions", "2"])
            .expect("serve all's flags without a command");
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.settings.store.topic_prefix, "t");
        assert_eq!(cli.serve.settings.partitions, 2);

        for refused in [
            &["platform", "replay", "--http-addr", "127.0.0.1:1"][..],
            &["platform", "recover", "--instance", "1"],
            &[
                "platform",
                "projections",
                "status",
                "--gateway-order",
                "http://x",
            ],
            &["platform", "audit", "order", "o", "--saga-timeout-ms", "1"],
            &["platform", "--data-dir", "/tmp/d", "replay"],
        ] {
            assert!(Cli::try_parse_from(refused).is_err(), "{refused:?}");
        }
    }
}
