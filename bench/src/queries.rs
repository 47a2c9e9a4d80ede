//! `platform-bench queries`: `GET /orders/{id}` on the query API against the two things it is
//! built from, measured in the same run: the HTTP no-op of the same server and Postgres' own
//! primary-key lookup rate (`pgbench -S`).
//!
//! 1. **Preload**: `--orders` order lifecycles decided by the domain and appended to the log,
//!    as `platform-bench projections` does; then the platform's projection part (`serve
//!    projections`: the workers and the query API, nothing else) starts and the bench waits
//!    until the read models have caught up.
//! 2. **HTTP no-op**: `GET /health/live` on that server from `--clients` closed-loop clients.
//! 3. **Query by id**: `GET /orders/{id}` of preloaded orders (each request picks one at
//!    random) from `--clients` closed-loop clients; only 200 answers count.
//! 4. **`pgbench -S`** (select-only: one primary-key lookup of `pgbench_accounts` per
//!    transaction) with `--clients` connections, `--pgbench-threads` threads, for `--duration`
//!    seconds, on a database initialised at `--pgbench-scale` (scale 1 = 100 000 accounts) in
//!    its own schema of the same Postgres.
//!
//! The target: query rps ≥ 0.5 × H(no-op rps, pgbench tps), H(a, b) = 1/(1/a + 1/b).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

use super::projections::{append_preload, decide_lifecycles};
use super::{
    CpuSample, CpuUse, Operation, Running, Stats, Timing, closed_loop, command_line, finish,
    harmonic, load_average, mix, open_raw_log, verdict, wait_ready,
};
use platform::{Part, Platform, Settings};

/// Options of `platform-bench queries` (Postgres read models: `--database-url` is required;
/// the log is Kafka with `--kafka`, else the embedded one).
#[derive(Debug, Clone, clap::Args)]
pub struct QueriesBench {
    /// Order lifecycles to preload (the orders queried).
    #[arg(long, default_value_t = 5000)]
    pub orders: usize,

    /// SKUs the orders spread over.
    #[arg(long, default_value_t = 1000)]
    pub skus: usize,

    /// Closed-loop clients of each phase (and pgbench's connections: Postgres' default limit
    /// is 100 connections, shared with the platform and anything else running).
    #[arg(long, default_value_t = 32)]
    pub clients: usize,

    /// Measured seconds of each phase.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,

    /// Unmeasured seconds before each HTTP phase's measurement.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,

    /// pgbench's scale factor (100 000 accounts each).
    #[arg(long, default_value_t = 10)]
    pub pgbench_scale: u32,

    /// pgbench's worker threads.
    #[arg(long, default_value_t = 2)]
    pub pgbench_threads: usize,

    /// The pgbench program.
    #[arg(long, default_value = "pgbench")]
    pub pgbench: String,

    /// Also report the CPU use of this process (e.g. the broker) in each phase; repeatable.
    #[arg(long)]
    pub watch_pid: Vec<u32>,
}

/// What one pgbench run reported.
#[derive(Debug)]
struct Pgbench {
    tps: f64,
    latency_ms: Option<f64>,
    failed: Option<u64>,
    cpu: Option<CpuUse>,
}

/// A number after `label` on one of pgbench's lines (`tps = 1234.5 (…)`).
fn number_after(output: &str, label: &str) -> Option<f64> {
    output.lines().find_map(|line| {
        let rest = line.trim().strip_prefix(label)?;
        rest.trim_start_matches([' ', '=', ':'])
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// Runs pgbench with `PGOPTIONS` putting `schema` first on the search path, so its tables live
/// apart from everything else in the database.
async fn run_pgbench(
    program: &str,
    url: &str,
    schema: &str,
    args: Vec<String>,
) -> anyhow::Result<String> {
    let program = program.to_owned();
    let url = url.to_owned();
    let options = format!("-c search_path={schema}");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&program)
            .args(&args)
            .arg(&url)
            .env("PGOPTIONS", options)
            .output()
            .with_context(|| format!("running {program}"))
    })
    .await??;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "pgbench failed ({}): {}{}",
        output.status,
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

/// `GET /health/live` through the same client as the queries (reqwest), so the two differ
/// only in what the server does.
fn noop_operation(
    http: reqwest::Client,
    base: &str,
) -> impl Fn(usize, u64) -> Operation + Send + Sync + 'static {
    let url = format!("{base}/health/live");
    move |_, _| {
        let request = http.get(&url);
        Box::pin(async move { finish(request.send().await, 200).await })
    }
}

fn query_operation(
    http: reqwest::Client,
    base: String,
    ids: std::sync::Arc<Vec<String>>,
) -> impl Fn(usize, u64) -> Operation + Send + Sync + 'static {
    move |client, sequence| {
        let id = &ids[(mix(client, sequence, 11) % ids.len() as u64) as usize];
        let request = http.get(format!("{base}/orders/{id}"));
        Box::pin(async move { finish(request.send().await, 200).await })
    }
}

/// Starts the projection part (workers and query API) and waits until it is ready.
async fn start_projections(settings: Settings, http: &reqwest::Client) -> anyhow::Result<Running> {
    let platform = Platform::build(settings, Part::Projections)
        .await
        .context("starting the projection part")?;
    let running = Running::serve(platform);
    wait_ready(http, &running.base).await?;
    Ok(running)
}

fn print_row(name: &str, stats: &Stats, watched: usize) {
    let cpu = stats.cpu.as_ref();
    let mut line = format!(
        "  {:<40} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>7}",
        name,
        stats.rate(),
        stats.ms(0.5),
        stats.ms(0.99),
        stats.max_ms(),
        stats.error_count(),
    );
    line.push_str(&super::projections::cpu_columns(cpu, watched));
    println!("{line}");
}

pub(super) async fn run(options: QueriesBench, base: Settings) -> anyhow::Result<()> {
    let url =
        base.store.database_url.clone().context(
            "platform-bench queries measures the Postgres read models: pass --database-url",
        )?;
    anyhow::ensure!(options.orders > 0, "--orders must be at least 1");
    anyhow::ensure!(options.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(options.duration > 0, "--duration must be at least 1");
    let command = command_line();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let data_dir = base.store.data_dir.join(format!("bench-{run_id}"));
    let created_parent = !base.store.data_dir.exists();
    let mut settings = base.clone();
    settings.store.data_dir = data_dir.clone();
    settings.http_addr = SocketAddr::new(base.http_addr.ip(), 0);
    settings.store.topic_prefix = format!("{}-qbench-{run_id}", base.store.topic_prefix);
    settings.store.schema_prefix = format!("{}qbench_{run_id}_", base.store.schema_prefix);
    settings.instance = 0;
    settings.instances = 1;
    let load_before = load_average();
    let watched = options.watch_pid.clone();
    let timing = Timing {
        warmup: Duration::from_secs(options.warmup),
        duration: Duration::from_secs(options.duration),
        watched: &watched,
    };

    eprintln!("bench: preloading {} order lifecycles", options.orders);
    let preload = decide_lifecycles(options.orders, options.skus)?;
    let (log, backend) = open_raw_log(&settings).await?;
    append_preload(
        &log,
        &settings.store.topic_prefix,
        settings.partitions,
        &preload,
        2048,
    )
    .await?;
    drop(log);

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(options.clients * 4)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    eprintln!("bench: starting the projection part and waiting for it to catch up");
    let running = start_projections(settings.clone(), &http).await?;
    let read = ::projections::ReadSide::open(
        open_raw_log(&settings).await?.0,
        &::projections::ReadBackend::Postgres {
            url: url.clone(),
            schema_prefix: settings.store.schema_prefix.clone(),
        },
        &settings.store.topic_prefix,
    )
    .await
    .context("opening the read models")?;
    anyhow::ensure!(
        read.wait_caught_up(Duration::from_secs(600))
            .await
            .map_err(anyhow::Error::msg)?,
        "the read models did not catch up within 600 s"
    );
    drop(read);

    eprintln!(
        "bench: initialising pgbench (scale {})",
        options.pgbench_scale
    );
    let pgbench_schema = format!("{}pgbench", settings.store.schema_prefix);
    // Creates the schema.
    let schema_db = ::projections::db::Db::postgres(&url, &pgbench_schema, 1).await?;
    run_pgbench(
        &options.pgbench,
        &url,
        &pgbench_schema,
        vec![
            "-i".into(),
            "-q".into(),
            "-s".into(),
            options.pgbench_scale.to_string(),
        ],
    )
    .await?;

    let ids = std::sync::Arc::new(preload.order_ids.clone());
    eprintln!("bench: HTTP no-op, {} clients", options.clients);
    let noop = closed_loop(
        options.clients,
        timing,
        noop_operation(http.clone(), &running.base),
    )
    .await;
    eprintln!("bench: GET /orders/{{id}}, {} clients", options.clients);
    let queries = closed_loop(
        options.clients,
        timing,
        query_operation(http.clone(), running.base.clone(), ids),
    )
    .await;
    eprintln!("bench: pgbench -S, {} clients", options.clients);
    let cpu_start = CpuSample::take(&watched);
    let output = run_pgbench(
        &options.pgbench,
        &url,
        &pgbench_schema,
        vec![
            "-S".into(),
            "-n".into(),
            "-c".into(),
            options.clients.to_string(),
            "-j".into(),
            options.pgbench_threads.to_string(),
            "-T".into(),
            options.duration.to_string(),
        ],
    )
    .await?;
    let cpu_end = CpuSample::take(&watched);
    let pgbench = Pgbench {
        tps: number_after(&output, "tps").context("pgbench printed no tps")?,
        latency_ms: number_after(&output, "latency average"),
        failed: number_after(&output, "number of failed transactions").map(|n| n as u64),
        cpu: match (cpu_start, cpu_end) {
            (Some(start), Some(end)) => Some(CpuUse::between(&start, &end)),
            _ => None,
        },
    };
    let load_after = load_average();
    running.stop().await;
    // pgbench's tables go; the read models stay, like every bench's.
    let mut tx = schema_db.begin().await?;
    tx.run(
        "DROP TABLE IF EXISTS pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers",
    )
    .await?;
    tx.commit().await?;
    let _ = std::fs::remove_dir_all(&data_dir);
    if created_parent {
        let _ = std::fs::remove_dir(&base.store.data_dir);
    }

    let cores = std::thread::available_parallelism()
        .map(|cores| cores.get())
        .unwrap_or(0);
    println!("platform-bench queries");
    println!("  command:   {command}");
    println!(
        "  backend:   {backend}; read models in Postgres (schemas {}*)",
        settings.store.schema_prefix
    );
    println!(
        "  workload:  {} clients; {} preloaded orders ({} events), each request a random one; {} s warm-up + {} s measured per HTTP phase",
        options.clients, options.orders, preload.events, options.warmup, options.duration
    );
    println!(
        "  pgbench:   {} -S -n -c {} -j {} -T {} at scale {} ({} accounts), schema {pgbench_schema}",
        options.pgbench,
        options.clients,
        options.pgbench_threads,
        options.duration,
        options.pgbench_scale,
        u64::from(options.pgbench_scale) * 100_000
    );
    println!("  machine:   {cores} cores; load average {load_before} before, {load_after} after");
    println!();
    let mut header = format!(
        "  {:<40} {:>10} {:>8} {:>8} {:>8} {:>7} {:>6} {:>6}",
        "phase", "ok/s", "p50 ms", "p99 ms", "max ms", "errors", "busy", "bench"
    );
    for pid in &watched {
        header.push_str(&format!(" {:>8}", format!("pid {pid}")));
    }
    header.push_str(&format!(" {:>6}", "other"));
    println!("{header}");
    print_row(
        "HTTP no-op (GET /health/live), closed",
        &noop,
        watched.len(),
    );
    print_row("GET /orders/{id}, closed", &queries, watched.len());
    println!(
        "  {:<40} {:>10.0} {:>8} {:>8} {:>8} {:>7}{}",
        "pgbench -S (tps)",
        pgbench.tps,
        pgbench
            .latency_ms
            .map(|ms| format!("{ms:.2}avg"))
            .unwrap_or_else(|| "-".into()),
        "-",
        "-",
        pgbench
            .failed
            .map(|failed| failed.to_string())
            .unwrap_or_else(|| "-".into()),
        super::projections::cpu_columns(pgbench.cpu.as_ref(), watched.len())
    );
    println!(
        "  (CPU cores in use during each measured window: busy = the whole machine; bench = this process; pid N = each --watch-pid process; other = the rest, Postgres included)"
    );
    for (name, stats) in [("HTTP no-op", &noop), ("GET /orders/{id}", &queries)] {
        for (kind, count) in &stats.errors {
            let sample = stats.samples.get(kind).map(String::as_str).unwrap_or("");
            println!("  errors: {name}: {count} × {kind}: {sample}");
        }
    }
    let h = harmonic(noop.rate(), pgbench.tps);
    println!();
    println!(
        "  {:<58} {:>12} {:>34} {:>6}",
        "target", "measured", "baseline → bound", "result"
    );
    println!(
        "  {:<58} {:>12} {:>34} {:>6}",
        "GET /orders/{id} rps ≥ 0.5 × H(no-op rps, pgbench -S tps)",
        format!("{:.0}/s", queries.rate()),
        format!(
            "H({:.0}, {:.0}) = {:.0} → ≥ {:.0}",
            noop.rate(),
            pgbench.tps,
            h,
            0.5 * h
        ),
        verdict(queries.rate() >= 0.5 * h)
    );
    println!(
        "  {:<58} {:>12} {:>34} {:>6}",
        "no query failed",
        queries.error_count().to_string(),
        "0",
        verdict(queries.error_count() == 0)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_figures_are_read_from_its_report() {
        let report = "transaction type: <builtin: select only>\n\
                      scaling factor: 10\n\
                      number of failed transactions: 0 (0.000%)\n\
                      latency average = 2.345 ms\n\
                      initial connection time = 45.1 ms\n\
                      tps = 27291.654321 (without initial connection time)\n";
        assert_eq!(number_after(report, "tps"), Some(27291.654321));
        assert_eq!(number_after(report, "latency average"), Some(2.345));
        assert_eq!(
            number_after(report, "number of failed transactions"),
            Some(0.0)
        );
        assert_eq!(number_after(report, "nothing"), None);
    }
}
