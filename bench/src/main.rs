//! The `platform-bench` binary: load generators that run the platform in this process and
//! print its figures next to raw baselines measured in the same run (BENCHMARKS.md gives each
//! command). The backend flags (`--kafka`, `--database-url`, `--partitions`, ...) are those of
//! `platform serve`; each run takes its own port, topic prefix, schema and data directory.

use clap::Parser;
use platform::Settings;
use platform_bench::Bench;

/// The allocator the product binary runs with: the platform under test runs in this process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "platform-bench",
    version,
    about = "Load generators that measure the platform against raw baselines taken in the same run",
    // The platform's flags go before or after the benchmark's name.
    mut_args = |arg: clap::Arg| arg.global(true)
)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,

    #[command(flatten)]
    settings: Settings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli {
        bench,
        mut settings,
    } = Cli::parse();
    // The report goes to stdout; progress and warnings to stderr.
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // The load generators talk to the platform they start without credentials.
    settings
        .security
        .auth
        .get_or_insert(platform::settings::Toggle::Off);
    platform_bench::run(bench, settings).await
}
