//! `platform-bench`: load generators that print their figures next to the raw baselines
//! measured in the same run.
//!
//! # `platform-bench commands`
//! Measures the HTTP command path (HTTP → owner → decide → append → judged effective →
//! answer) against the two things it is built from, each measured in the same run, on the same
//! machine, against the same broker or file:
//!
//! 1. **HTTP no-op**: `GET /health/live` on the very server that takes the commands (it does
//!    no IO), from the same `--clients` closed-loop clients (one shared keep-alive pool). The
//!    load goes through a lean HTTP/1.1 client on hyper's connection API (`bench/src/client.rs`):
//!    the generator shares the CPUs with the server it measures, and reqwest spent more of
//!    them than the server's own HTTP layer.
//! 2. **Raw append**: the event log's own `append` with the platform's producer configuration
//!    (for Kafka, a `KafkaLog` built from the same settings as the platform's: idempotent,
//!    acks=all, the same linger; for the embedded backend an `EmbeddedLog` on a file of its
//!    own beside the platform's), writing real envelopes (an `OrderPlaced` or a
//!    `StockReceived`, decided by the domain, in the same mix as the commands, keyed and
//!    partitioned as the platform does) to fresh topics laid out as the platform's (one per
//!    aggregate type, orders and stock, with the same partition count, so the appends spread
//!    over as many partitions as the commands' do), from `--clients` closed-loop tasks that
//!    each await their own append.
//! 3. **Commands**: `--clients` closed-loop HTTP clients placing orders (`POST /orders`, 1-2
//!    lines) and receiving stock (`POST /inventory/{sku}/receipts`) over `--skus` SKUs. Only
//!    2xx answers count; anything else is reported as an error.
//! 4. **Half load**: an open loop (a fixed arrival rate of half the measured commands/s,
//!    requests started on schedule whether or not earlier ones have finished) first of raw
//!    appends, then of commands, then of the HTTP no-op (informative: what HTTP alone costs at
//!    that rate). Latency is measured from each request's *scheduled* start, so a stall is not
//!    hidden by the generator waiting for it (no coordinated omission); the schedule is kept
//!    by a 1 ms ticker, which adds at most about a millisecond to all alike.
//! 5. **Half load, taking turns** (the judged latency figure): the same open loop at the same
//!    rate, carried by raw appends and by commands in turns of one second (in the order raw,
//!    commands, commands, raw, repeated, so neither runs on average earlier), until each has
//!    been measured for `--duration`. One phase after the other cannot tell the command path
//!    from the broker: a broker's latency drifts as its storage grows and stalls now and then
//!    for 100 ms to over a second (nisshi on SQLite does, and so does SQLite itself on a busy
//!    disk, BENCHMARKS.md), and one phase may catch a stall the other does not. Taking turns,
//!    drift weighs on both alike; a single stall still lands in one turn, so a longer
//!    `--duration` gives steadier figures.
//!
//!    Two more rows split off the log's part of each side's latency in the turns: every
//!    append's own time, from the `append` call to the log's acknowledgement
//!    ([`timed_log`]), the raw loop's and the platform's (inside the
//!    commands). When the commands' p99 is over the raw one, they tell whether their appends
//!    took longer (the broker or file answering slower while the platform runs) or the rest of
//!    the command path did (HTTP, deciding, folding). Two more split the commands' latency
//!    further: the server's own time, from the `Server-Timing: app;dur=` header every answer
//!    carries (arrival at the middleware to the answer), and how late the generator sent each
//!    request after its scheduled start (a stall of the whole process, or a backlog of ready
//!    tasks on its runtime, shows there first).
//!
//! The whole sequence runs once per `--part`, by default twice, each with its own baselines:
//!
//! - `commands` (the judged figure): the three command services alone (`Part::Commands`), as
//!   they are deployed and scaled, separately from the projections and the saga. This is what
//!   the issue's benchmark describes (HTTP clients placing orders and receiving stock).
//! - `all`: the whole platform (`Part::All`: command services, projections, saga), as `serve`
//!   runs it: an order starts a saga and every event feeds the projections, so the command
//!   phases include that background work in the same process.
//!
//! After the full-load phase the bench waits until the process is back to its idle CPU use
//! (measured right after start-up, plus 0.1 core; at most `--drain-timeout`) and reports how
//! long the backlog took to drain; the half-load phases then run on a fresh platform (new
//! topics, schema and directory), so nothing left over loads them or their raw baseline.
//!
//! Before the platform starts, the raw append loop also runs once on its own (informative:
//! it shows what the log does without the platform's readers polling it).
//!
//! Every phase runs `--warmup` seconds unmeasured, then `--duration` seconds measured. A
//! request counts in the closed loops when it completes inside the measured window, in the
//! open loops when it was scheduled inside it. Only successes go into the latency histograms
//! (microsecond resolution, HdrHistogram).
//!
//! The targets: commands/s ≥ 0.5 × H(raw append/s, no-op/s), with H(a, b) =
//! 1 / (1/a + 1/b) (the rate of doing both, one after the other); and p99 at half that load ≤
//! raw append p99 + 5 ms. The p99s judged are those of the turns at the same rate (like for
//! like); the phases one after the other and the closed-loop raw p99 (at saturation, so
//! usually larger) are shown beside them.
//!
//! Everything — the platform, the load generator, and on a single machine the broker and
//! Postgres — shares the same CPUs, so each phase also reports the CPU cores in use during its
//! window: the whole machine's, this process's, and those of any `--watch-pid` process (the
//! broker, say), from `/proc` (Linux only; elsewhere the columns stay empty).
//!
//! The run uses a free port, its own topic prefix and Postgres schema (both left in place: the
//! log has no delete, and a test broker is thrown away anyway) and its own data directory
//! (under `--data-dir`, removed at the end).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use domain::order::{OrderAggregate, OrderCommand, OrderLine, PlaceOrder};
use domain::stock::{StockAggregate, StockCommand};
use domain::{Aggregate, CustomerId, Decision, OrderId, PaymentToken, Quantity, Sku};
use event_log::embedded::EmbeddedLog;
use event_log::kafka::KafkaLog;
use event_log::{Record, SharedLog, partition_for};
use event_schema::{CommandMeta, Envelope};
use hdrhistogram::Histogram;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;

use platform::backend::kafka_settings;
use platform::{Part, Platform, Settings};

mod client;
mod console;
mod projections;
mod queries;
mod replay;
mod sagas;
pub mod timed_log;

/// The load generators of `platform-bench`.
#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// HTTP commands (orders and stock receipts) against the raw append rate of the same log
    /// and the HTTP no-op rate of the same server, all measured in one run.
    Commands(CommandsBench),
    /// `platform replay` rebuilding read models from a preloaded log, against the raw consume
    /// rate of the same log and the raw COPY rate into equivalent tables (`bench/src/replay.rs`).
    Replay(replay::ReplayBench),
    /// Projection workers catching up on a preloaded log, against raw batched-upsert and COPY
    /// rates into equivalent tables and the command event rate (`bench/src/projections.rs`).
    Projections(projections::ProjectionsBench),
    /// `GET /orders/{id}` against the HTTP no-op and `pgbench -S` (`bench/src/queries.rs`).
    Queries(queries::QueriesBench),
    /// The fulfilment saga under load: completed sagas/s and order-placed → confirmed latency,
    /// against the command throughput of the same run (`bench/src/sagas.rs`).
    Sagas(sagas::SagasBench),
    /// Every console page's answer time with `--orders` orders in the read models
    /// (`bench/src/console.rs`).
    Console(console::ConsoleBench),
}

/// Options of `platform-bench commands`. The backend and its tuning come from the global
/// settings (`--kafka`, `--database-url`, `--partitions`, `--kafka-linger-ms`,
/// `--kafka-fetch-wait-ms`, `--snapshot-every`, `--data-dir`), as for `serve`; the run then
/// takes its own port, topic prefix, schema and data directory so it never touches real data.
#[derive(Debug, Clone, clap::Args)]
pub struct CommandsBench {
    /// Concurrent clients of each closed-loop phase.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,

    /// Measured seconds of each phase.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,

    /// Unmeasured seconds before each phase's measurement.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,

    /// How many SKUs the commands spread over.
    #[arg(long, default_value_t = 1000)]
    pub skus: usize,

    /// Share of commands that are orders (the rest are stock receipts), 0 to 1.
    #[arg(long, default_value_t = 0.5)]
    pub order_share: f64,

    /// Share of commands sent with an `Idempotency-Key` (each its own), 0 to 1. Their outcomes
    /// are remembered for the idempotency window and written to the snapshots; those of the
    /// others are not. The raw baseline's records then carry a request fingerprint too.
    #[arg(long, default_value_t = 0.0)]
    pub keyed_share: f64,

    /// Longest wait, in seconds, for the platform's background work (saga, projections) to
    /// drain after a command phase before the next phase starts anyway.
    #[arg(long, default_value_t = 60)]
    pub drain_timeout: u64,

    /// Also report the CPU use of this process (e.g. the broker) in each phase; repeatable.
    #[arg(long)]
    pub watch_pid: Vec<u32>,

    /// Which part of the platform serves the commands; repeatable, each runs the whole sequence
    /// with its own baselines. `commands`: the command services alone (the judged figure);
    /// `all`: everything in one process, with projections and saga.
    #[arg(long = "part", value_enum, default_values_t = [Part::Commands, Part::All])]
    pub parts: Vec<Part>,
}

/// Runs one benchmark and prints its report on stdout (progress goes to stderr).
pub async fn run(bench: Bench, settings: Settings) -> anyhow::Result<()> {
    match bench {
        Bench::Commands(options) => {
            for (index, part) in options.parts.iter().enumerate() {
                if index > 0 {
                    println!();
                }
                commands(options.clone(), settings.clone(), *part).await?;
            }
            Ok(())
        }
        Bench::Replay(options) => replay::run(options, settings).await,
        Bench::Projections(options) => projections::run(options, settings).await,
        Bench::Queries(options) => queries::run(options, settings).await,
        Bench::Sagas(options) => sagas::run(options, settings).await,
        Bench::Console(options) => console::run(options, settings).await,
    }
}

// ---------------------------------------------------------------------------------------------
// Measurement

/// The `app` metric's duration in a `Server-Timing` header value (W3C Server Timing:
/// `app;dur=1.234`, milliseconds, possibly among other metrics).
fn server_time(header: &str) -> Option<Duration> {
    header.split(',').find_map(|metric| {
        let mut params = metric.split(';').map(str::trim);
        if params.next()? != "app" {
            return None;
        }
        let millis: f64 = params
            .find_map(|param| param.strip_prefix("dur="))?
            .parse()
            .ok()?;
        (millis.is_finite() && millis >= 0.0).then(|| Duration::from_secs_f64(millis / 1e3))
    })
}

/// The server's own time an answer's `Server-Timing` headers give, if any.
fn server_time_of(headers: &axum::http::HeaderMap) -> Option<Duration> {
    headers
        .get_all("server-timing")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find_map(server_time)
}

/// Latencies are recorded in microseconds, up to a minute.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// What one phase measured.
#[derive(Debug)]
struct Stats {
    ok: u64,
    errors: BTreeMap<String, u64>,
    /// One example message per error kind.
    samples: BTreeMap<String, String>,
    latency: Histogram<u64>,
    /// Of the successes, the server's own time, where it told it (`Server-Timing: app`).
    server: Histogram<u64>,
    /// In the open loops: how late each request was sent after its scheduled start (the load
    /// generator's own queueing, included in `latency`).
    lag: Histogram<u64>,
    window: Duration,
    cpu: Option<CpuUse>,
}

impl Stats {
    fn new(window: Duration) -> Self {
        Stats {
            ok: 0,
            errors: BTreeMap::new(),
            samples: BTreeMap::new(),
            latency: histogram(),
            server: histogram(),
            lag: histogram(),
            window,
            cpu: None,
        }
    }

    fn record(&mut self, result: Result<Answered, Failure>, latency: Duration) {
        match result {
            Ok(answered) => {
                self.ok += 1;
                record_micros(&mut self.latency, latency);
                if let Some(server) = answered.server {
                    record_micros(&mut self.server, server);
                }
            }
            Err(failure) => {
                *self.errors.entry(failure.kind.clone()).or_default() += 1;
                self.samples.entry(failure.kind).or_insert(failure.detail);
            }
        }
    }

    fn merge(&mut self, other: Stats) {
        self.ok += other.ok;
        for (kind, count) in other.errors {
            *self.errors.entry(kind).or_default() += count;
        }
        for (kind, sample) in other.samples {
            self.samples.entry(kind).or_insert(sample);
        }
        // Same bounds on both sides: this cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.server.add(&other.server);
        let _ = self.lag.add(&other.lag);
    }

    /// One part of the latency (`server` or `lag`) as a row of its own.
    fn part(&self, part: &Histogram<u64>) -> Stats {
        let mut stats = Stats::new(self.window);
        stats.ok = part.len();
        stats.latency = part.clone();
        stats
    }

    fn rate(&self) -> f64 {
        self.ok as f64 / self.window.as_secs_f64()
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// A latency quantile in milliseconds.
    fn ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }

    fn max_ms(&self) -> f64 {
        self.latency.max() as f64 / 1000.0
    }
}

fn record_micros(histogram: &mut Histogram<u64>, took: Duration) {
    let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(micros.max(1));
}

/// What one successful request tells besides its latency.
#[derive(Debug, Default, Clone, Copy)]
struct Answered {
    /// The server's own time (from its `Server-Timing` header), for HTTP requests.
    server: Option<Duration>,
}

/// Why one request did not succeed: a short kind to count by, and a detail to show once.
#[derive(Debug)]
struct Failure {
    kind: String,
    detail: String,
}

impl Failure {
    fn new(kind: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        let mut detail = detail.to_string();
        if detail.len() > 300 {
            let mut cut = 300;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        Failure {
            kind: kind.into(),
            detail,
        }
    }
}

/// When a phase is measured.
#[derive(Debug, Clone, Copy)]
struct Window {
    from: Instant,
    to: Instant,
}

impl Window {
    fn after(warmup: Duration, duration: Duration) -> Self {
        let from = Instant::now() + warmup;
        Window {
            from,
            to: from + duration,
        }
    }

    fn duration(&self) -> Duration {
        self.to - self.from
    }

    /// Samples CPU use over the window, in the background: the machine's, this process's and
    /// that of the `watched` processes.
    fn watch_cpu(&self, watched: &[u32]) -> tokio::task::JoinHandle<Option<CpuUse>> {
        let window = *self;
        let watched = watched.to_vec();
        tokio::spawn(async move {
            tokio::time::sleep_until(window.from).await;
            let start = CpuSample::take(&watched);
            tokio::time::sleep_until(window.to).await;
            let end = CpuSample::take(&watched);
            Some(CpuUse::between(&start?, &end?))
        })
    }
}

/// How long a phase warms up and measures, and which other processes' CPU it samples.
#[derive(Debug, Clone, Copy)]
struct Timing<'a> {
    warmup: Duration,
    duration: Duration,
    watched: &'a [u32],
}

/// `clients` tasks, each sending its next request as soon as the previous one answered.
async fn closed_loop<F, Fut>(clients: usize, timing: Timing<'_>, operation: F) -> Stats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Answered, Failure>> + Send + 'static,
{
    let operation = Arc::new(operation);
    let window = Window::after(timing.warmup, timing.duration);
    let cpu = window.watch_cpu(timing.watched);
    let mut tasks = JoinSet::new();
    for client in 0..clients {
        let operation = operation.clone();
        tasks.spawn(async move {
            let mut stats = Stats::new(window.duration());
            let mut sequence = 0u64;
            while Instant::now() < window.to {
                let start = Instant::now();
                let result = operation(client, sequence).await;
                let end = Instant::now();
                sequence += 1;
                if end >= window.from && end <= window.to {
                    stats.record(result, end - start);
                }
            }
            stats
        });
    }
    let mut total = Stats::new(window.duration());
    while let Some(stats) = tasks.join_next().await {
        if let Ok(stats) = stats {
            total.merge(stats);
        }
    }
    total.cpu = cpu.await.ok().flatten();
    total
}

/// Requests started at a fixed `rate` per second, each on its own task, whatever the earlier
/// ones are doing. Latency counts from the scheduled start.
async fn open_loop<F, Fut>(rate: f64, timing: Timing<'_>, operation: F) -> Stats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Answered, Failure>> + Send + 'static,
{
    let rate = rate.max(1.0);
    let begin = Instant::now();
    let window = Window {
        from: begin + timing.warmup,
        to: begin + timing.warmup + timing.duration,
    };
    let cpu = window.watch_cpu(timing.watched);
    let stats = Arc::new(Mutex::new(Stats::new(window.duration())));
    let mut tasks = JoinSet::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut issued = 0u64;
    loop {
        ticker.tick().await;
        let now = Instant::now();
        if now >= window.to {
            break;
        }
        let due = ((now - begin).as_secs_f64() * rate) as u64;
        while issued < due {
            let scheduled = begin + Duration::from_secs_f64(issued as f64 / rate);
            let request = operation(issued as usize, issued);
            let stats = stats.clone();
            tasks.spawn(async move {
                let sent = Instant::now();
                let result = request.await;
                let end = Instant::now();
                if scheduled >= window.from && scheduled < window.to {
                    let mut stats = lock(&stats);
                    stats.record(result, end - scheduled);
                    record_micros(&mut stats.lag, sent - scheduled);
                }
            });
            issued += 1;
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mut stats = std::mem::replace(&mut *lock(&stats), Stats::new(window.duration()));
    stats.cpu = cpu.await.ok().flatten();
    stats
}

/// One operation of the load generator: a request, ready to be awaited.
type Operation = std::pin::Pin<Box<dyn Future<Output = Result<Answered, Failure>> + Send>>;

/// The length of one turn of an interleaved phase.
const SLICE: Duration = Duration::from_secs(1);

/// Two open loops taking turns at one arrival rate: `SLICE`-long turns alternate between `a`
/// and `b` in the order a b b a, repeated (so neither runs on average earlier than the other),
/// for `timing.warmup` unmeasured, then until each has been measured for `timing.duration`.
/// The load never changes, only which operation carries it, so a backend whose latency drifts
/// or stalls during the run weighs on both alike, which two phases one after the other cannot
/// promise. Latency counts from the scheduled start, as in [`open_loop`]; a request counts for
/// the operation whose turn it was scheduled in.
async fn interleaved_open_loop<A, B>(rate: f64, timing: Timing<'_>, a: A, b: B) -> (Stats, Stats)
where
    A: Fn(usize, u64) -> Operation + Send + Sync + 'static,
    B: Fn(usize, u64) -> Operation + Send + Sync + 'static,
{
    let rate = rate.max(1.0);
    let begin = Instant::now();
    let from = begin + timing.warmup;
    let to = from + timing.duration * 2;
    let slice = SLICE.as_secs_f64();
    // The turns are counted from the measured window's start (so the window holds as many of
    // each as it can); the warm-up simply alternates.
    let turn_of = |at: Instant| -> u64 {
        ((at.saturating_duration_since(from)).as_secs_f64() / slice) as u64
    };
    let is_b = |at: Instant| -> bool {
        if at < from {
            (((at - begin).as_secs_f64() / slice) as u64) % 2 == 1
        } else {
            matches!(turn_of(at) % 4, 1 | 2)
        }
    };
    // How long each operation is measured, turn by turn.
    let mut measured = [Duration::ZERO, Duration::ZERO];
    let mut turn_from = from;
    while turn_from < to {
        let turn_to = (turn_from + SLICE).min(to);
        measured[usize::from(is_b(turn_from))] += turn_to - turn_from;
        turn_from = turn_to;
    }
    let stats = Arc::new(Mutex::new([
        Stats::new(measured[0]),
        Stats::new(measured[1]),
    ]));
    let mut cpu = [CpuTotals::default(), CpuTotals::default()];
    let mut turn_start: Option<(u64, bool, CpuSample)> = None;
    let mut tasks = JoinSet::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut issued = 0u64;
    loop {
        ticker.tick().await;
        let now = Instant::now();
        // CPU use per operation: sampled at each change of turn inside the measured window.
        if now >= from {
            let turn = turn_of(now.min(to));
            let changed = turn_start
                .as_ref()
                .is_none_or(|(started, _, _)| *started != turn);
            if changed || now >= to {
                let sample = CpuSample::take(timing.watched);
                if let (Some((_, was_b, start)), Some(end)) = (turn_start.take(), &sample) {
                    cpu[usize::from(was_b)].add(&start, end);
                }
                turn_start = sample.map(|sample| (turn, is_b(now), sample));
            }
        }
        if now >= to {
            break;
        }
        let due = ((now - begin).as_secs_f64() * rate) as u64;
        while issued < due {
            let scheduled = begin + Duration::from_secs_f64(issued as f64 / rate);
            let is_b = is_b(scheduled);
            let request = if is_b {
                b(issued as usize, issued)
            } else {
                a(issued as usize, issued)
            };
            let stats = stats.clone();
            tasks.spawn(async move {
                let sent = Instant::now();
                let result = request.await;
                let end = Instant::now();
                if scheduled >= from && scheduled < to {
                    let stats = &mut lock(&stats)[usize::from(is_b)];
                    stats.record(result, end - scheduled);
                    record_micros(&mut stats.lag, sent - scheduled);
                }
            });
            issued += 1;
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let [mut stats_a, mut stats_b] = std::mem::replace(
        &mut *lock(&stats),
        [Stats::new(measured[0]), Stats::new(measured[1])],
    );
    stats_a.cpu = cpu[0].cores();
    stats_b.cpu = cpu[1].cores();
    (stats_a, stats_b)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// CPU use, from /proc (Linux); elsewhere the columns stay empty.

#[derive(Debug, Clone)]
struct CpuSample {
    /// All CPUs' busy and total jiffies since boot.
    busy: u64,
    total: u64,
    /// This process's user + system jiffies.
    own: u64,
    /// The same for each watched process (None once it is gone).
    watched: Vec<Option<u64>>,
}

/// User + system jiffies of a process.
fn process_jiffies(stat: &str) -> Option<u64> {
    // Fields after the command name (which may contain spaces) start at "state".
    let after_name = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

impl CpuSample {
    fn take(watched: &[u32]) -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|field| field.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...
        let total: u64 = fields.iter().take(8).sum();
        let idle = fields.get(3)? + fields.get(4)?;
        let own = process_jiffies(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
        let watched = watched
            .iter()
            .map(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|stat| process_jiffies(&stat))
            })
            .collect();
        Some(CpuSample {
            busy: total - idle,
            total,
            own,
            watched,
        })
    }
}

/// CPU use over a window, in cores (1.0 = one core busy all the time).
#[derive(Debug, Clone)]
struct CpuUse {
    machine: f64,
    own: f64,
    watched: Vec<Option<f64>>,
}

/// CPU jiffies spent over several stretches of time (the slices of one operation in an
/// interleaved phase), summed.
#[derive(Debug, Clone, Default)]
struct CpuTotals {
    busy: u64,
    total: u64,
    own: u64,
    watched: Vec<Option<u64>>,
}

impl CpuTotals {
    fn add(&mut self, start: &CpuSample, end: &CpuSample) {
        self.busy += end.busy.saturating_sub(start.busy);
        self.total += end.total.saturating_sub(start.total);
        self.own += end.own.saturating_sub(start.own);
        let deltas = start
            .watched
            .iter()
            .zip(&end.watched)
            .map(|(start, end)| Some(end.as_ref()?.saturating_sub(*start.as_ref()?)));
        if self.watched.is_empty() {
            self.watched = deltas.collect();
        } else {
            for (sum, delta) in self.watched.iter_mut().zip(deltas) {
                *sum = sum.zip(delta).map(|(sum, delta)| sum + delta);
            }
        }
    }

    fn cores(&self) -> Option<CpuUse> {
        (self.total > 0).then(|| {
            let start = CpuSample {
                busy: 0,
                total: 0,
                own: 0,
                watched: vec![Some(0); self.watched.len()],
            };
            let end = CpuSample {
                busy: self.busy,
                total: self.total,
                own: self.own,
                watched: self.watched.clone(),
            };
            CpuUse::between(&start, &end)
        })
    }
}

impl CpuUse {
    fn between(start: &CpuSample, end: &CpuSample) -> Self {
        let cores = std::thread::available_parallelism()
            .map(|cores| cores.get())
            .unwrap_or(1) as f64;
        // /proc/stat's first line sums all CPUs: its total advances `cores` jiffies per tick.
        let total = end.total.saturating_sub(start.total).max(1) as f64;
        let share = |jiffies: u64| cores * jiffies as f64 / total;
        CpuUse {
            machine: share(end.busy.saturating_sub(start.busy)),
            own: share(end.own.saturating_sub(start.own)),
            watched: start
                .watched
                .iter()
                .zip(&end.watched)
                .map(|(start, end)| Some(share(end.as_ref()?.saturating_sub(*start.as_ref()?))))
                .collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The workload

/// A small deterministic generator (SplitMix64), so each request's choices depend only on
/// (client, sequence) and no RNG state is shared.
fn mix(client: usize, sequence: u64, salt: u64) -> u64 {
    let mut z = (client as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(sequence.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        .wrapping_add(salt.wrapping_mul(0x94d0_49bb_1331_11eb));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One command of the mix.
#[derive(Debug, Clone)]
enum Work {
    /// An order of 1-2 lines (distinct SKUs, 1-3 units each).
    Order { lines: Vec<(String, u32)> },
    /// A receipt of 1-10 units of a SKU.
    Receipt { sku: String, quantity: u32 },
}

#[derive(Debug, Clone, Copy)]
struct Mix {
    skus: usize,
    order_share: f64,
}

impl Mix {
    fn sku(index: u64) -> String {
        format!("SKU-{index:05}")
    }

    fn pick(&self, client: usize, sequence: u64) -> Work {
        let skus = self.skus.max(1) as u64;
        let roll = (mix(client, sequence, 1) >> 11) as f64 / (1u64 << 53) as f64;
        if roll < self.order_share {
            let first = mix(client, sequence, 2) % skus;
            let mut lines = vec![(Self::sku(first), 1 + (mix(client, sequence, 3) % 3) as u32)];
            if skus > 1 && mix(client, sequence, 4).is_multiple_of(2) {
                let second = (first + 1 + mix(client, sequence, 5) % (skus - 1)) % skus;
                lines.push((Self::sku(second), 1 + (mix(client, sequence, 6) % 3) as u32));
            }
            Work::Order { lines }
        } else {
            Work::Receipt {
                sku: Self::sku(mix(client, sequence, 7) % skus),
                quantity: 1 + (mix(client, sequence, 8) % 10) as u32,
            }
        }
    }
}

const UNIT_PRICE_MINOR: i64 = 1999;

/// Which commands carry an `Idempotency-Key` (`--keyed-share`), each a key of its own.
#[derive(Debug, Clone, Copy)]
struct Keys {
    share: f64,
    /// Differs between phases, so no phase repeats another's keys.
    nonce: u64,
}

impl Keys {
    fn new(share: f64) -> Self {
        Keys {
            share,
            nonce: uuid::Uuid::new_v4().as_u64_pair().0,
        }
    }

    fn key(&self, client: usize, sequence: u64) -> Option<String> {
        let roll = (mix(client, sequence, 9) >> 11) as f64 / (1u64 << 53) as f64;
        (roll < self.share).then(|| format!("bench-{:016x}-{client}-{sequence}", self.nonce))
    }
}

/// The envelope the platform would write for `work`, as a log record, decided by the domain
/// itself so it has the real size and shape.
fn record_for(work: &Work, keyed: bool) -> anyhow::Result<Record> {
    // What the HTTP layer puts in a client's command: with an idempotency key, the request's
    // fingerprint (a hex SHA-256) too.
    let mut meta = CommandMeta::new("anonymous");
    meta.correlation_id = uuid::Uuid::now_v7().to_string();
    if keyed {
        meta.request_hash = Some(format!("{:064x}", u128::from(mix(0, 0, 10))));
    }
    let envelope = match work {
        Work::Order { lines } => {
            let order_id = OrderId(uuid::Uuid::now_v7());
            let place = PlaceOrder {
                order_id,
                customer_id: CustomerId::parse("bench-customer")?,
                currency: "EUR".parse()?,
                payment_token: PaymentToken::parse("tok_approve")?,
                lines: lines
                    .iter()
                    .map(|(sku, quantity)| {
                        Ok(OrderLine {
                            sku: Sku::parse(sku)?,
                            quantity: Quantity::new(*quantity)?,
                            unit_price_minor: UNIT_PRICE_MINOR,
                        })
                    })
                    .collect::<anyhow::Result<_>>()?,
            };
            let command = OrderCommand::Place(place);
            let Decision::Append(event) = OrderAggregate::decide(&Default::default(), &command)?
            else {
                anyhow::bail!("placing a new order decided nothing");
            };
            Envelope::new::<OrderAggregate>(order_id.to_string(), 1, &event, &meta, Utc::now())
        }
        Work::Receipt { sku, quantity } => {
            let command = StockCommand::Receive {
                quantity: Quantity::new(*quantity)?,
            };
            let Decision::Append(event) = StockAggregate::decide(&Default::default(), &command)?
            else {
                anyhow::bail!("receiving stock decided nothing");
            };
            Envelope::new::<StockAggregate>(sku.clone(), 1, &event, &meta, Utc::now())
        }
    };
    Ok(Record::from(&envelope))
}

/// The HTTP request for `work`: method path, body, and the status that means success.
fn request_for(work: &Work) -> (String, String, u16) {
    match work {
        Work::Order { lines } => {
            let lines: Vec<serde_json::Value> = lines
                .iter()
                .map(|(sku, quantity)| {
                    serde_json::json!({
                        "sku": sku,
                        "quantity": quantity,
                        "unit_price_minor": UNIT_PRICE_MINOR,
                    })
                })
                .collect();
            let body = serde_json::json!({
                "customer_id": "bench-customer",
                "currency": "EUR",
                "payment_token": "tok_approve",
                "lines": lines,
            });
            ("/orders".to_owned(), body.to_string(), 201)
        }
        Work::Receipt { sku, quantity } => (
            format!("/inventory/{sku}/receipts"),
            serde_json::json!({ "quantity": quantity }).to_string(),
            200,
        ),
    }
}

fn http_failure(error: reqwest::Error) -> Failure {
    let kind = if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect"
    } else {
        "transport"
    };
    Failure::new(kind, error)
}

/// Reads the whole answer (so the connection goes back to the pool) and checks its status.
async fn finish(
    response: Result<reqwest::Response, reqwest::Error>,
    expected: u16,
) -> Result<Answered, Failure> {
    let response = response.map_err(http_failure)?;
    let status = response.status().as_u16();
    let server = crate::server_time_of(response.headers());
    let body = response.bytes().await.map_err(http_failure)?;
    if status == expected {
        Ok(Answered { server })
    } else {
        Err(Failure::new(
            format!("HTTP {status}"),
            String::from_utf8_lossy(&body),
        ))
    }
}

fn command_operation(
    http: client::Client,
    workload: Mix,
    keys: Keys,
) -> impl Fn(usize, u64) -> Operation + Send + Sync + 'static {
    move |client, sequence| {
        let (path, body, expected) = request_for(&workload.pick(client, sequence));
        let key = keys.key(client, sequence);
        let http = http.clone();
        Box::pin(async move {
            http.send(
                axum::http::Method::POST,
                &path,
                Some(body.into()),
                key.as_deref(),
                expected,
            )
            .await
        })
    }
}

fn noop_operation(
    http: client::Client,
) -> impl Fn(usize, u64) -> Operation + Send + Sync + 'static {
    move |_, _| {
        let http = http.clone();
        Box::pin(async move {
            http.send(axum::http::Method::GET, "/health/live", None, None, 200)
                .await
        })
    }
}

fn append_operation(
    log: SharedLog,
    topics: RawTopics,
    workload: Mix,
    keys: Keys,
) -> impl Fn(usize, u64) -> Operation + Send + Sync + 'static {
    move |client, sequence| {
        let log = log.clone();
        let work = workload.pick(client, sequence);
        let (topic, partitions) = topics.of(&work);
        let topic = topic.to_owned();
        let record = record_for(&work, keys.key(client, sequence).is_some());
        Box::pin(async move {
            let record = record.map_err(|error| Failure::new("record", error))?;
            let partition = partition_for(&record.key, partitions);
            log.append(&topic, partition, record)
                .await
                .map(|_| Answered::default())
                .map_err(|error| Failure::new("append", error))
        })
    }
}

/// Each append's own latency while raw appends and commands take turns, by whose append it
/// was: the raw loop's (its topics) or the platform's (topics under its prefix). Counted when
/// the append started inside the turns' measured window; the rate is per second of that
/// side's turns.
struct AppendTimes {
    /// Raw, then platform.
    stats: Arc<Mutex<[Stats; 2]>>,
}

impl AppendTimes {
    /// Starts recording, for a turns phase about to start with `timing`.
    fn install(raw: &RawTopics, platform_prefix: &str, timing: Timing<'_>) -> Self {
        let raw_topics = [raw.order.0.clone(), raw.stock.0.clone()];
        let platform_prefix = platform_prefix.to_owned();
        let from = std::time::Instant::now() + timing.warmup;
        let to = from + timing.duration * 2;
        let stats = Arc::new(Mutex::new([
            Stats::new(timing.duration),
            Stats::new(timing.duration),
        ]));
        let recorder = stats.clone();
        timed_log::set_hook(Some(Arc::new(move |topic: &str, took: Duration| {
            let now = std::time::Instant::now();
            let started = now.checked_sub(took).unwrap_or(now);
            if started < from || started >= to {
                return;
            }
            let side = if raw_topics.iter().any(|raw| raw == topic) {
                0
            } else if topic.starts_with(&platform_prefix) {
                1
            } else {
                return;
            };
            lock(&recorder)[side].record(Ok(Answered::default()), took);
        })));
        AppendTimes { stats }
    }

    /// Stops recording: the raw loop's appends, then the platform's.
    fn finish(self) -> [Stats; 2] {
        timed_log::set_hook(None);
        std::mem::replace(
            &mut *lock(&self.stats),
            [Stats::new(Duration::ZERO), Stats::new(Duration::ZERO)],
        )
    }
}

/// The raw baseline's topics: one per aggregate type, as the platform's, so its records spread
/// over as many partitions as the commands' records do.
#[derive(Debug, Clone)]
struct RawTopics {
    /// Each topic with its partition count.
    order: (String, u32),
    stock: (String, u32),
}

impl RawTopics {
    /// Creates the topics (with the platform's partition count) when missing.
    async fn create(log: &SharedLog, prefix: &str, partitions: u32) -> anyhow::Result<RawTopics> {
        let mut topics = Vec::new();
        for kind in ["order", "stock"] {
            let topic = format!("{prefix}.bench.raw.{kind}");
            let count = log
                .ensure_topic(&topic, partitions)
                .await
                .context("creating the raw baseline's topics")?;
            topics.push((topic, count));
        }
        let stock = topics.pop().unwrap_or_default();
        let order = topics.pop().unwrap_or_default();
        Ok(RawTopics { order, stock })
    }

    fn of(&self, work: &Work) -> (&str, u32) {
        let (topic, partitions) = match work {
            Work::Order { .. } => &self.order,
            Work::Receipt { .. } => &self.stock,
        };
        (topic, *partitions)
    }
}

// ---------------------------------------------------------------------------------------------
// The run

/// The raw baseline's own log, configured exactly as the platform's: for Kafka a producer with
/// the platform's settings, for the embedded backend a file of its own beside the platform's
/// (`raw-log.db` in `settings.data_dir`: the same disk and settings). Not the platform's file:
/// two writers of one SQLite file wait for each other's write lock in SQLite's busy handler,
/// which sleeps 1–100 ms at a time, and raw appends and commands taking turns (each turn's
/// last requests overlapping the next's first) then measured that contention, not the
/// platform (p50 7.4 and 13.6 ms in turns, against 2.2 and 3.1 ms one after the other).
/// Also a description for the report.
async fn open_raw_log(settings: &Settings) -> anyhow::Result<(SharedLog, String)> {
    std::fs::create_dir_all(&settings.store.data_dir)
        .with_context(|| format!("creating {}", settings.store.data_dir.display()))?;
    Ok(match &settings.store.kafka {
        Some(brokers) => (
            timed_log::timed(Arc::new(
                KafkaLog::connect(kafka_settings(brokers, settings))
                    .await
                    .context("connecting the raw producer")?,
            )),
            format!(
                "kafka ({brokers}), linger {} ms, fetch.wait.max.ms {} ({} for background readers)",
                settings.kafka_linger_ms,
                settings.kafka_fetch_wait_ms,
                kafka_settings(brokers, settings).background_fetch_wait_ms
            ),
        ),
        None => {
            let path = settings.store.data_dir.join("raw-log.db");
            (
                timed_log::timed(Arc::new(
                    EmbeddedLog::open_with(&path, settings.durability.into())
                        .await
                        .context("opening the raw embedded log")?,
                )),
                format!("embedded (SQLite, {})", path.display()),
            )
        }
    })
}

/// The platform under test, serving in this process.
struct Running {
    /// `http://127.0.0.1:<port>`
    base: String,
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<Result<(), platform::Error>>,
}

impl Running {
    /// Serves `platform` on a task of its own until [`Running::stop`].
    fn serve(platform: Platform) -> Self {
        let addr = platform.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(platform.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        Running {
            base: format!("http://{addr}"),
            addr,
            stop,
            served,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        match self.served.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("bench: the platform stopped with an error: {error:#}"),
            Err(error) => eprintln!("bench: the platform task failed: {error}"),
        }
    }
}

/// Starts the whole platform (`Part::All`); see [`start_part`].
async fn start_platform(
    settings: Settings,
    http: &reqwest::Client,
) -> anyhow::Result<(Running, Option<f64>)> {
    start_part(settings, Part::All, http).await
}

/// Starts `part` of the platform, waits until it is ready, and measures its idle CPU use (its
/// readers poll even when nothing happens), the reference for "quiet" later.
async fn start_part(
    settings: Settings,
    part: Part,
    http: &reqwest::Client,
) -> anyhow::Result<(Running, Option<f64>)> {
    eprintln!(
        "bench: starting the platform ({part:?}, topic prefix {})",
        settings.store.topic_prefix
    );
    let platform = Platform::build_with(settings, part, timed_log::timed)
        .await
        .context("starting the platform under test")?;
    let running = Running::serve(platform);
    wait_ready(http, &running.base).await?;
    let idle = own_cores(Duration::from_secs(2)).await;
    Ok((running, idle))
}

async fn wait_ready(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(response) = http.get(format!("{base}/health/ready")).send().await
            && response.status() == reqwest::StatusCode::OK
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("the platform was not ready within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CPU cores this process uses over `window` (None where /proc cannot be read).
async fn own_cores(window: Duration) -> Option<f64> {
    let start = CpuSample::take(&[])?;
    tokio::time::sleep(window).await;
    let end = CpuSample::take(&[])?;
    Some(CpuUse::between(&start, &end).own)
}

/// Waits until this process (the platform, since the load generator is idle now) is back to
/// its idle CPU use (`idle`, measured before any load, plus 0.1 core) over two consecutive
/// half-second samples. Returns how long that took, or `None` when it did not happen within
/// `limit` or CPU use cannot be read.
async fn wait_quiet(idle: Option<f64>, limit: Duration) -> Option<Duration> {
    let threshold = idle? + 0.1;
    let start = Instant::now();
    let mut quiet_samples = 0;
    while start.elapsed() < limit {
        let used = own_cores(Duration::from_millis(500)).await?;
        quiet_samples = if used <= threshold {
            quiet_samples + 1
        } else {
            0
        };
        if quiet_samples >= 2 {
            return Some(start.elapsed());
        }
    }
    None
}

/// The command line as typed, quoted where a shell would need it, with the database password
/// (if any) hidden.
fn command_line() -> String {
    let mut hide_next = false;
    std::env::args()
        .map(|arg| {
            let shown = if hide_next {
                hide_password(&arg)
            } else if let Some(url) = arg.strip_prefix("--database-url=") {
                format!("--database-url={}", hide_password(url))
            } else {
                arg.clone()
            };
            hide_next = arg == "--database-url";
            if shown.is_empty()
                || shown
                    .chars()
                    .any(|c| c.is_whitespace() || "'\"$`\\;&|<>*?()".contains(c))
            {
                format!("'{}'", shown.replace('\'', r"'\''"))
            } else {
                shown
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((credentials, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|raw| raw.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "n/a".to_owned())
}

/// H(a, b) = 1 / (1/a + 1/b): the rate of doing one of each, one after the other.
fn harmonic(a: f64, b: f64) -> f64 {
    if a <= 0.0 || b <= 0.0 {
        0.0
    } else {
        1.0 / (1.0 / a + 1.0 / b)
    }
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "FAIL" }
}

/// What `part` runs, for the report.
fn part_description(part: Part) -> &'static str {
    match part {
        Part::Commands => {
            "commands (order, payment and inventory services; no projections, no saga)"
        }
        Part::All => "all (command services, projections and saga in one process)",
        _ => "one part",
    }
}

async fn commands(
    options: CommandsBench,
    base_settings: Settings,
    part: Part,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        matches!(part, Part::Commands | Part::All),
        "--part must be commands or all (the benchmark needs the order and inventory services)"
    );
    anyhow::ensure!(options.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(options.duration > 0, "--duration must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&options.order_share),
        "--order-share must be between 0 and 1"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&options.keyed_share),
        "--keyed-share must be between 0 and 1"
    );
    let keyed_share = options.keyed_share;
    // The raw baseline writes no command's outcome: its keys only decide which records carry
    // a fingerprint, as the commands' would.
    let keys = Keys::new(keyed_share);
    let command = command_line();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    // A fresh directory under --data-dir (so the disk is the user's choice), removed afterwards.
    let data_dir = base_settings.store.data_dir.join(format!("bench-{run_id}"));
    let created_parent = !base_settings.store.data_dir.exists();
    let mut settings = base_settings.clone();
    settings.store.data_dir = data_dir.clone();
    settings.http_addr = SocketAddr::new(base_settings.http_addr.ip(), 0);
    settings.store.topic_prefix = format!("{}-bench-{run_id}", base_settings.store.topic_prefix);
    settings.store.schema_prefix = format!("{}bench_{run_id}_", base_settings.store.schema_prefix);
    // Every part of every service runs in this one process.
    settings.instance = 0;
    settings.instances = 1;
    // The load comes from one address and measures the command path, not the gate in front of
    // it: no credentials, and a rate limit far above any rate reached here.
    settings.security.auth = Some(platform::settings::Toggle::Off);
    settings.security.rate_limit = 1e9;
    settings.security.rate_burst = u32::MAX;

    let load_before = load_average();
    let timing = Timing {
        warmup: Duration::from_secs(options.warmup),
        duration: Duration::from_secs(options.duration),
        watched: &options.watch_pid,
    };
    let workload = Mix {
        skus: options.skus,
        order_share: options.order_share,
    };
    let clients = options.clients;
    let drain_timeout = Duration::from_secs(options.drain_timeout);

    let (raw_log, backend) = open_raw_log(&settings).await?;
    let raw_topics =
        RawTopics::create(&raw_log, &settings.store.topic_prefix, settings.partitions).await?;

    // Informative: the log on its own, before the platform's readers exist.
    eprintln!("bench: raw append before the platform starts, {clients} tasks");
    let raw_alone = closed_loop(
        clients,
        timing,
        append_operation(raw_log.clone(), raw_topics.clone(), workload, keys),
    )
    .await;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(options.clients * 4)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let (running, idle) = start_part(settings.clone(), part, &http).await?;
    // The load itself goes through the lean client (see `client`).
    let lean = client::Client::new(running.addr, clients * 4);

    eprintln!("bench: HTTP no-op (GET /health/live), {clients} clients");
    let noop = closed_loop(clients, timing, noop_operation(lean.clone())).await;
    eprintln!("bench: raw append, {clients} tasks");
    let raw = closed_loop(
        clients,
        timing,
        append_operation(raw_log.clone(), raw_topics.clone(), workload, keys),
    )
    .await;
    eprintln!("bench: commands, {clients} clients");
    let commands = closed_loop(
        clients,
        timing,
        command_operation(lean.clone(), workload, Keys::new(keyed_share)),
    )
    .await;
    // Orders set the saga and the projections to work. See how long that backlog takes to
    // drain, then start the half-load phases on a fresh, idle platform so nothing left over
    // from the full-load phase loads them.
    eprintln!("bench: waiting for the platform to go quiet");
    let drained = wait_quiet(idle, drain_timeout).await;
    running.stop().await;
    let mut fresh = settings.clone();
    fresh.store.data_dir = data_dir.join("half-load");
    fresh.store.topic_prefix = format!("{}-2", settings.store.topic_prefix);
    fresh.store.schema_prefix = format!("{}2_", settings.store.schema_prefix);
    // On the embedded backend the raw baseline starts a fresh file too, beside the fresh
    // platform's (the first one now holds a large log, and its checkpoints would stall the
    // baseline).
    let raw_log = if settings.store.kafka.is_some() {
        raw_log
    } else {
        drop(raw_log);
        let (log, _) = open_raw_log(&fresh).await?;
        RawTopics::create(&log, &settings.store.topic_prefix, settings.partitions).await?;
        log
    };
    // The platform's topics are `<prefix>.<aggregate type>.<kind>`.
    let platform_topics = format!("{}.", fresh.store.topic_prefix);
    let (running, idle_half) = start_part(fresh, part, &http).await?;
    let lean = client::Client::new(running.addr, clients * 4);
    let half = commands.rate() / 2.0;
    eprintln!("bench: raw append, open loop at {half:.0}/s");
    let raw_half = open_loop(
        half,
        timing,
        append_operation(raw_log.clone(), raw_topics.clone(), workload, keys),
    )
    .await;
    eprintln!("bench: commands, open loop at {half:.0}/s");
    let commands_half = open_loop(
        half,
        timing,
        command_operation(lean.clone(), workload, Keys::new(keyed_share)),
    )
    .await;
    eprintln!("bench: HTTP no-op, open loop at {half:.0}/s");
    let noop_half = open_loop(half, timing, noop_operation(lean.clone())).await;
    eprintln!(
        "bench: raw append and commands taking turns of {} s, open loop at {half:.0}/s",
        SLICE.as_secs()
    );
    let append_times = AppendTimes::install(&raw_topics, &platform_topics, timing);
    let (raw_turns, commands_turns) = interleaved_open_loop(
        half,
        timing,
        append_operation(raw_log.clone(), raw_topics.clone(), workload, keys),
        command_operation(lean.clone(), workload, Keys::new(keyed_share)),
    )
    .await;
    let [raw_turn_appends, command_turn_appends] = append_times.finish();
    eprintln!("bench: waiting for the platform to go quiet");
    let drained_half = wait_quiet(idle_half, drain_timeout).await;
    let load_after = load_average();
    running.stop().await;
    drop(raw_log);
    let _ = std::fs::remove_dir_all(&data_dir);
    if created_parent {
        // Only succeeds when empty: never removes anything but what this run created.
        let _ = std::fs::remove_dir(&base_settings.store.data_dir);
    }

    // The report.
    let cores = std::thread::available_parallelism()
        .map(|cores| cores.get())
        .unwrap_or(0);
    println!("platform-bench commands");
    println!("  command:   {command}");
    println!("  platform:  {}", part_description(part));
    println!("  backend:   {backend}");
    println!(
        "  workload:  {clients} clients; {:.0}% orders (1-2 lines) / {:.0}% stock receipts over {} SKUs; {:.0}% with an Idempotency-Key; {} partitions; snapshot every {} events",
        workload.order_share * 100.0,
        (1.0 - workload.order_share) * 100.0,
        workload.skus,
        keyed_share * 100.0,
        settings.partitions,
        settings.snapshot_every
    );
    println!(
        "  phases:    {} s warm-up + {} s measured each",
        options.warmup, options.duration
    );
    println!("  machine:   {cores} cores; load average {load_before} before, {load_after} after");
    println!();
    let mut header = format!(
        "  {:<40} {:>10} {:>8} {:>8} {:>8} {:>7} {:>6} {:>6}",
        "phase", "ok/s", "p50 ms", "p99 ms", "max ms", "errors", "busy", "bench"
    );
    for pid in &options.watch_pid {
        header.push_str(&format!(" {:>8}", format!("pid {pid}")));
    }
    header.push_str(&format!(" {:>6}", "other"));
    println!("{header}");
    let command_turns_server = commands_turns.part(&commands_turns.server);
    let command_turns_lag = commands_turns.part(&commands_turns.lag);
    let raw_turns_lag = raw_turns.part(&raw_turns.lag);
    let rows = [
        (
            "(raw append, closed, platform not started)".to_owned(),
            &raw_alone,
        ),
        ("HTTP no-op (GET /health/live), closed".to_owned(), &noop),
        ("raw append, closed".to_owned(), &raw),
        ("commands, closed".to_owned(), &commands),
        (format!("raw append, open @ {half:.0}/s"), &raw_half),
        (format!("commands, open @ {half:.0}/s"), &commands_half),
        (format!("HTTP no-op, open @ {half:.0}/s"), &noop_half),
        (format!("raw append, open @ {half:.0}/s, turns"), &raw_turns),
        (
            format!("commands, open @ {half:.0}/s, turns"),
            &commands_turns,
        ),
        (
            "… raw turns: log append alone".to_owned(),
            &raw_turn_appends,
        ),
        (
            "… command turns: log append alone".to_owned(),
            &command_turn_appends,
        ),
        (
            "… command turns: server's own time".to_owned(),
            &command_turns_server,
        ),
        (
            "… command turns: sent late by".to_owned(),
            &command_turns_lag,
        ),
        ("… raw turns: sent late by".to_owned(), &raw_turns_lag),
    ];
    let cores_used = |value: Option<f64>| {
        value
            .map(|value| format!("{value:.2}"))
            .unwrap_or_else(|| "-".into())
    };
    for (name, stats) in &rows {
        let mut line = format!(
            "  {:<40} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>6} {:>6}",
            name,
            stats.rate(),
            stats.ms(0.5),
            stats.ms(0.99),
            stats.max_ms(),
            stats.error_count(),
            cores_used(stats.cpu.as_ref().map(|cpu| cpu.machine)),
            cores_used(stats.cpu.as_ref().map(|cpu| cpu.own)),
        );
        for index in 0..options.watch_pid.len() {
            let watched = stats
                .cpu
                .as_ref()
                .and_then(|cpu| cpu.watched.get(index).copied().flatten());
            line.push_str(&format!(" {:>8}", cores_used(watched)));
        }
        let other = stats.cpu.as_ref().map(|cpu| {
            (cpu.machine - cpu.own - cpu.watched.iter().flatten().sum::<f64>()).max(0.0)
        });
        line.push_str(&format!(" {:>6}", cores_used(other)));
        println!("{line}");
    }
    println!(
        "  (CPU cores in use during each measured window: busy = the whole machine; bench = this process, platform and load generator; pid N = each --watch-pid process; other = the rest of the machine)"
    );
    println!(
        "  (log append alone: each append's time from the call to the log's acknowledgement during the turns, the raw loop's and the platform's inside the commands)"
    );
    println!(
        "  (server's own time: from the server's Server-Timing header, the request's arrival at its middleware to its answer; sent late by: how long after its scheduled start the load generator sent each request, part of its latency)"
    );
    let drain = |drained: Option<Duration>| {
        drained
            .map(|took| format!("{:.1} s", took.as_secs_f64()))
            .unwrap_or_else(|| format!("not within {} s", drain_timeout.as_secs()))
    };
    println!(
        "  idle platform: {} cores ({} for the fresh one of the half-load phases); back to idle (background work: snapshots, saga, projections) after the closed-loop commands in {}, after the open-loop commands in {}",
        cores_used(idle),
        cores_used(idle_half),
        drain(drained),
        drain(drained_half)
    );
    let mut any_errors = false;
    for (name, stats) in &rows {
        for (kind, count) in &stats.errors {
            if !any_errors {
                println!();
                println!("  errors:");
                any_errors = true;
            }
            let sample = stats.samples.get(kind).map(String::as_str).unwrap_or("");
            println!("    {name}: {count} × {kind}: {sample}");
        }
    }

    let h = harmonic(raw.rate(), noop.rate());
    let throughput_target = 0.5 * h;
    println!();
    println!(
        "  {:<58} {:>12} {:>34} {:>6}",
        "target", "measured", "baseline → bound", "result"
    );
    println!(
        "  {:<58} {:>12} {:>34} {:>6}",
        "commands/s ≥ 0.5 × H(raw append/s, no-op/s)",
        format!("{:.0}/s", commands.rate()),
        format!(
            "H({:.0}, {:.0}) = {:.0} → ≥ {:.0}",
            raw.rate(),
            noop.rate(),
            h,
            throughput_target
        ),
        verdict(commands.rate() >= throughput_target)
    );
    // The half-load p99 against a raw append p99 + 5 ms: the judged line (the two taking
    // turns), then informative ones.
    let p99_line = |name: &str, measured: &Stats, baseline: &Stats| {
        let bound = baseline.ms(0.99) + 5.0;
        println!(
            "  {:<58} {:>12} {:>34} {:>6}",
            name,
            format!("{:.2} ms", measured.ms(0.99)),
            format!("{:.2} ms + 5 → ≤ {:.2} ms", baseline.ms(0.99), bound),
            verdict(measured.ms(0.99) <= bound)
        );
    };
    p99_line(
        "p99 at half load ≤ raw append p99 (same rate, turns) + 5 ms",
        &commands_turns,
        &raw_turns,
    );
    p99_line(
        "  (informative) … one phase after the other",
        &commands_half,
        &raw_half,
    );
    p99_line(
        "  (informative) … ≤ raw append p99 (closed loop) + 5 ms",
        &commands_turns,
        &raw,
    );
    let failed =
        commands.error_count() + commands_half.error_count() + commands_turns.error_count();
    println!(
        "  {:<58} {:>12} {:>34} {:>6}",
        "no command failed",
        failed.to_string(),
        "0",
        verdict(failed == 0)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_time_is_the_app_metric_of_server_timing() {
        assert_eq!(
            server_time("app;dur=2.5"),
            Some(Duration::from_micros(2500))
        );
        assert_eq!(
            server_time("db;dur=2, app;desc=\"x\";dur=1.5"),
            Some(Duration::from_micros(1500))
        );
        assert_eq!(server_time("db;dur=2"), None);
        assert_eq!(server_time("app;dur=-1"), None);
    }

    #[test]
    fn the_harmonic_combination_is_the_rate_of_doing_both_in_turn() {
        assert!((harmonic(1000.0, 1000.0) - 500.0).abs() < 1e-9);
        assert!((harmonic(3000.0, 1500.0) - 1000.0).abs() < 1e-9);
        assert_eq!(harmonic(0.0, 10.0), 0.0);
    }

    #[test]
    fn the_mix_spreads_over_the_skus_with_distinct_lines() {
        let workload = Mix {
            skus: 10,
            order_share: 0.5,
        };
        let mut orders = 0;
        for sequence in 0..1000 {
            match workload.pick(3, sequence) {
                Work::Order { lines } => {
                    orders += 1;
                    assert!((1..=2).contains(&lines.len()));
                    if lines.len() == 2 {
                        assert_ne!(lines[0].0, lines[1].0, "an order's SKUs must differ");
                    }
                }
                Work::Receipt { quantity, .. } => assert!((1..=10).contains(&quantity)),
            }
        }
        assert!((400..600).contains(&orders), "{orders} orders of 1000");
    }

    #[test]
    fn the_raw_records_are_real_envelopes_keyed_like_the_platforms() {
        let order = record_for(
            &Work::Order {
                lines: vec![("SKU-00001".into(), 2), ("SKU-00002".into(), 1)],
            },
            false,
        )
        .expect("an order record");
        let envelope = Envelope::try_from(&order).expect("a readable envelope");
        assert_eq!(envelope.aggregate_type, "order");
        assert_eq!(envelope.event_type, "order.placed");
        let receipt = record_for(
            &Work::Receipt {
                sku: "SKU-00007".into(),
                quantity: 3,
            },
            true,
        )
        .expect("a receipt record");
        assert_eq!(receipt.key, "SKU-00007");
    }

    #[test]
    fn the_printed_command_line_hides_the_database_password() {
        assert_eq!(
            hide_password("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            hide_password("postgres://postgres@127.0.0.1:5432/test"),
            "postgres://postgres@127.0.0.1:5432/test"
        );
    }
}
