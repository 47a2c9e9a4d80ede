//! `platform-bench sagas`: the fulfilment saga under load, against the command throughput of
//! the same platform measured in the same run.
//!
//! The platform runs whole in this process (`Part::All`, as `serve` does), on the backend the
//! global flags choose, with its own port, topic prefix, schema and data directory. Its SKUs
//! get stock enough for every order first. Then, each phase `--warmup` seconds unmeasured and
//! `--duration` seconds measured:
//!
//! 0. **Unloaded**: one client placing one order at a time and awaiting its saga's end before
//!    placing the next (same token mix as below). Latency is from the placement's start to the
//!    ending event's `occurred_at`. Targets: on the embedded log p50 ≤ 20 ms and p99 ≤ 50 ms for
//!    placed → confirmed; on Kafka p50 ≤ 5 × `--kafka-fetch-wait-ms` + 50 ms (a saga crosses the
//!    log six times: three events to the saga, three commands to their services).
//! 1. **Commands**: `--clients` closed-loop HTTP clients receiving stock (`POST
//!    /inventory/{sku}/receipts`): the command throughput C of this platform (decide, append,
//!    read back as effective, answer), with no saga work behind it.
//! 2. **Sagas at saturation**: `--sagas-in-flight` closed-loop clients, each placing a
//!    one-line order and waiting for its saga to end before placing the next (so that many
//!    sagas are in flight; a saga spends most of its life waiting for hops through the log,
//!    so saturating the orchestrator takes many more of them than saturating the command
//!    path takes clients), `--decline-share` of them with `tok_decline`, the rest `tok_approve`. A saga has
//!    ended when its order is confirmed (happy path: place, reserve, authorise, confirm,
//!    capture) or rejected (decline: place, reserve, authorise, release, reject): 5 commands
//!    either way. Ends are seen on the order topic by a tailing reader (not polled over HTTP).
//!    Completed sagas/s is the rate of those round trips ending inside the window (the rate of
//!    `order.confirmed` / `order.rejected` events occurring in it is shown beside it). Target:
//!    sagas/s ≥ 0.8 × C ÷ 5.
//! 3. **Latency at half that rate**: an open loop placing orders at half the completed sagas/s
//!    (same mix), each placement started on schedule whatever the earlier ones do. Latency is
//!    from the scheduled placement to the event's `occurred_at` (the order service's clock, the
//!    same machine's), for confirmed orders (p50, p99) and declined ones (the compensation:
//!    release the stock, reject the order). Target: compensation p99 ≤ 2 × happy-path p99.
//!
//! After each saga phase the bench waits (at most `--drain-timeout`) until every saga it
//! started has finished, so a backlog is reported rather than carried into the next phase.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use event_log::{SharedLog, topics};
use event_schema::Envelope;
use hdrhistogram::Histogram;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    Answered, Failure, Operation, Stats, Timing, closed_loop, command_line, finish, histogram,
    load_average, lock, open_loop, verdict,
};
use platform::backend::Backend;
use platform::{Part, Platform, Settings};

/// Commands one saga takes, its order's placement included (one-line orders; the happy path
/// and the decline path alike).
const COMMANDS_PER_SAGA: f64 = 5.0;

/// Options of `platform-bench sagas`. The backend and its tuning come from the global settings,
/// as for `serve` (`--kafka`, `--database-url`, `--partitions`, ...).
#[derive(Debug, Clone, clap::Args)]
pub struct SagasBench {
    /// Concurrent clients of the closed-loop phases.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,

    /// Sagas in flight in the saturation phase (closed-loop clients each awaiting its saga's
    /// end). Completed sagas/s is in-flight ÷ saga latency until the platform saturates.
    #[arg(long, default_value_t = 256)]
    pub sagas_in_flight: usize,

    /// Measured seconds of each phase.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,

    /// Unmeasured seconds before each phase's measurement.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,

    /// How many SKUs the orders and receipts spread over.
    #[arg(long, default_value_t = 200)]
    pub skus: usize,

    /// Share of orders paid with `tok_decline` (compensated), 0 to 1.
    #[arg(long, default_value_t = 0.2)]
    pub decline_share: f64,

    /// Longest wait, in seconds, for the sagas of a phase to finish after it.
    #[arg(long, default_value_t = 120)]
    pub drain_timeout: u64,

    /// Also report the CPU use of this process (e.g. the broker) in each phase; repeatable.
    #[arg(long)]
    pub watch_pid: Vec<u32>,
}

/// An order the bench placed.
#[derive(Debug, Clone, Copy)]
struct Placed {
    at: DateTime<Utc>,
    declined: bool,
}

/// How an order's saga ended, as its order event says.
#[derive(Debug, Clone, Copy)]
struct Ended {
    at: DateTime<Utc>,
    confirmed: bool,
}

#[derive(Default)]
struct Book {
    placed: HashMap<String, Placed>,
    ended: HashMap<String, Ended>,
    /// Woken whenever the tracker has noted ends, so clients awaiting one need not poll.
    ends_noted: Arc<tokio::sync::Notify>,
}

type Shared = Arc<Mutex<Book>>;

/// Reads the order topic from its start and notes every order's confirmation or rejection.
async fn track(log: SharedLog, topic: String, book: Shared, mut stop: watch::Receiver<bool>) {
    let partitions = loop {
        match log.partition_count(&topic).await {
            Ok(partitions) => break partitions,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let from: Vec<(u32, u64)> = (0..partitions).map(|partition| (partition, 0)).collect();
    // Ends are timed by their events' `occurred_at`, not by when this reader sees them, so it
    // reads as a background reader: a broker that holds every fetch for its whole wait (nisshi)
    // then spends on it a few fetches a second, not twenty.
    let mut reader = match log
        .open_reader(&topic, &from, event_log::ReadMode::Background)
        .await
    {
        Ok(reader) => reader,
        Err(error) => {
            eprintln!("bench: cannot read {topic}: {error}");
            return;
        }
    };
    while !*stop.borrow() {
        let records = tokio::select! {
            records = reader.poll(1000, Duration::from_millis(100)) => records,
            _ = stop.changed() => return,
        };
        let Ok(records) = records else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut book = lock(&book);
        for record in records {
            let Ok(envelope) = Envelope::try_from(&record.record) else {
                continue;
            };
            let confirmed = match envelope.event_type.as_str() {
                "order.confirmed" => true,
                "order.rejected" => false,
                _ => continue,
            };
            book.ended.entry(envelope.aggregate_id).or_insert(Ended {
                at: envelope.occurred_at,
                confirmed,
            });
        }
        book.ends_noted.notify_waiters();
    }
}

fn sku(n: u64, skus: usize) -> String {
    format!("SKU-SB{}", n % skus as u64)
}

/// Deterministic spread of clients' requests over SKUs and tokens.
fn pick(client: usize, sequence: u64, salt: u64) -> u64 {
    let mut x = (client as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ sequence ^ salt;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

fn receipt_operation(
    http: reqwest::Client,
    base: String,
    skus: usize,
) -> impl Fn(usize, u64) -> Operation + Send + Sync + 'static {
    move |client, sequence| {
        let sku = sku(pick(client, sequence, 1), skus);
        let request = http
            .post(format!("{base}/inventory/{sku}/receipts"))
            .json(&serde_json::json!({"quantity": 1}));
        Box::pin(async move { finish(request.send().await, 200).await })
    }
}

fn order_operation(
    http: reqwest::Client,
    base: String,
    skus: usize,
    decline_share: f64,
    book: Shared,
    wait_for_end: bool,
) -> impl Fn(usize, u64) -> Operation + Send + Sync + 'static {
    move |client, sequence| {
        // Taken when the request is due (the open loop calls this on schedule).
        let at = Utc::now();
        let roll = pick(client, sequence, 2);
        let declined = (roll % 10_000) as f64 / 10_000.0 < decline_share;
        let token = if declined {
            "tok_decline"
        } else {
            "tok_approve"
        };
        let request = http.post(format!("{base}/orders")).json(&serde_json::json!({
            "customer_id": format!("bench-{client}"),
            "currency": "EUR",
            "payment_token": token,
            "lines": [{"sku": sku(pick(client, sequence, 3), skus), "quantity": 1, "unit_price_minor": 1000}],
        }));
        let book = book.clone();
        Box::pin(async move {
            let response = request
                .send()
                .await
                .map_err(|error| Failure::new("transport", error))?;
            let status = response.status().as_u16();
            let body: serde_json::Value = response
                .json()
                .await
                .map_err(|error| Failure::new("body", error))?;
            if status != 201 {
                return Err(Failure::new(format!("HTTP {status}"), body));
            }
            let order_id = body["order_id"].as_str().unwrap_or_default().to_owned();
            lock(&book)
                .placed
                .insert(order_id.clone(), Placed { at, declined });
            if wait_for_end {
                let deadline = Instant::now() + Duration::from_secs(60);
                let ends_noted = lock(&book).ends_noted.clone();
                loop {
                    let noted = ends_noted.notified();
                    tokio::pin!(noted);
                    // Registered before the check, so an end noted in between still wakes us.
                    noted.as_mut().enable();
                    if lock(&book).ended.contains_key(&order_id) {
                        break;
                    }
                    if tokio::time::timeout_at(deadline, noted).await.is_err() {
                        return Err(Failure::new("saga unfinished after 60 s", order_id));
                    }
                }
            }
            Ok(Answered::default())
        })
    }
}

/// Waits until every order placed so far has ended; false after `limit`.
async fn drain(book: &Shared, limit: Duration) -> (bool, Duration) {
    let start = Instant::now();
    loop {
        let open = {
            let book = lock(book);
            book.placed
                .keys()
                .filter(|id| !book.ended.contains_key(*id))
                .count()
        };
        if open == 0 {
            return (true, start.elapsed());
        }
        if start.elapsed() >= limit {
            eprintln!("bench: {open} sagas still open after {} s", limit.as_secs());
            return (false, start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a saga phase measured, from the book.
struct SagaFigures {
    per_second: f64,
    happy: Histogram<u64>,
    compensated: Histogram<u64>,
    unfinished: usize,
}

fn figures(
    book: &Shared,
    since: &HashMap<String, Placed>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> SagaFigures {
    let book = lock(book);
    let mut happy = histogram();
    let mut compensated = histogram();
    let mut completed = 0;
    let mut unfinished = 0;
    for (order_id, placed) in &book.placed {
        if since.contains_key(order_id) {
            continue;
        }
        let Some(ended) = book.ended.get(order_id) else {
            unfinished += 1;
            continue;
        };
        if ended.at >= from && ended.at < to {
            completed += 1;
        }
        if placed.at >= from && placed.at < to {
            let micros = (ended.at - placed.at)
                .num_microseconds()
                .unwrap_or(0)
                .max(1) as u64;
            let histogram = if ended.confirmed && !placed.declined {
                &mut happy
            } else {
                &mut compensated
            };
            histogram.saturating_record(micros);
        }
    }
    let seconds = (to - from).num_milliseconds() as f64 / 1000.0;
    SagaFigures {
        per_second: completed as f64 / seconds,
        happy,
        compensated,
        unfinished,
    }
}

fn ms(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

fn cpu(stats: &Stats) -> String {
    stats
        .cpu
        .as_ref()
        .map(|cpu| format!("{:.2} cores (machine {:.2})", cpu.own, cpu.machine))
        .unwrap_or_else(|| "n/a".into())
}

fn errors(stats: &Stats) -> String {
    if stats.errors.is_empty() {
        return "none".into();
    }
    stats
        .errors
        .iter()
        .map(|(kind, count)| {
            format!(
                "{kind} x{count} ({})",
                stats.samples.get(kind).map(String::as_str).unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

pub async fn run(options: SagasBench, base_settings: Settings) -> anyhow::Result<()> {
    anyhow::ensure!(options.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(
        options.sagas_in_flight > 0,
        "--sagas-in-flight must be at least 1"
    );
    anyhow::ensure!(options.duration > 0, "--duration must be at least 1");
    anyhow::ensure!(options.skus > 0, "--skus must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&options.decline_share),
        "--decline-share must be between 0 and 1"
    );
    let command = command_line();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let data_dir = base_settings
        .store
        .data_dir
        .join(format!("bench-sagas-{run_id}"));
    let mut settings = base_settings.clone();
    settings.store.data_dir = data_dir.clone();
    settings.http_addr = SocketAddr::new(base_settings.http_addr.ip(), 0);
    settings.store.topic_prefix = format!("{}-sagas-{run_id}", base_settings.store.topic_prefix);
    settings.store.schema_prefix = format!("{}sagas_{run_id}_", base_settings.store.schema_prefix);
    settings.instance = 0;
    settings.instances = 1;
    // The load comes from one address and measures the saga, not the gate in front of it.
    settings.security.auth = Some(platform::settings::Toggle::Off);
    settings.security.rate_limit = 1e9;
    settings.security.rate_burst = u32::MAX;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let load_before = load_average();
    let backend_name = if settings.store.kafka.is_some() {
        "kafka + postgres"
    } else {
        "embedded (SQLite)"
    };

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(options.clients.max(options.sagas_in_flight) * 2)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    eprintln!(
        "bench: starting the platform (topic prefix {})",
        settings.store.topic_prefix
    );
    let platform = Platform::build(settings.clone(), Part::All)
        .await
        .context("starting the platform under test")?;
    let base = format!("http://{}", platform.local_addr());
    let (stop_platform, platform_stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(platform.run_until_stopped(async move {
        let _ = platform_stopped.await;
    }));
    let ready_by = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(response) = http.get(format!("{base}/health/ready")).send().await
            && response.status() == 200
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < ready_by,
            "the platform was not ready within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Stock for every order the run can place.
    eprintln!("bench: receiving stock for {} SKUs", options.skus);
    for n in 0..options.skus as u64 {
        let response = http
            .post(format!(
                "{base}/inventory/{}/receipts",
                sku(n, options.skus)
            ))
            .json(&serde_json::json!({"quantity": 1_000_000}))
            .send()
            .await
            .context("receiving stock")?;
        anyhow::ensure!(
            response.status() == 200,
            "receiving stock: HTTP {}",
            response.status()
        );
    }

    // The tracker reads the order topic through a log client of its own.
    let log = Backend::open(&settings).await?.log;
    let book: Shared = Arc::new(Mutex::new(Book::default()));
    let (stop_tracker, stopped) = watch::channel(false);
    let tracker = tokio::spawn(track(
        log,
        topics::events(&settings.store.topic_prefix, "order"),
        book.clone(),
        stopped,
    ));

    let timing = Timing {
        warmup: Duration::from_secs(options.warmup),
        duration: Duration::from_secs(options.duration),
        watched: &options.watch_pid,
    };
    let drain_limit = Duration::from_secs(options.drain_timeout);
    let window_of = |start: DateTime<Utc>| {
        let from = start + chrono::TimeDelta::seconds(options.warmup as i64);
        (
            from,
            from + chrono::TimeDelta::seconds(options.duration as i64),
        )
    };

    // Unloaded first, while nothing else has run: one order at a time, each placed once the
    // previous one's saga has ended.
    eprintln!("bench: unloaded sagas, one at a time");
    let before = lock(&book).placed.clone();
    let start = Utc::now();
    let unloaded_run = closed_loop(
        1,
        timing,
        order_operation(
            http.clone(),
            base.clone(),
            options.skus,
            options.decline_share,
            book.clone(),
            true,
        ),
    )
    .await;
    let (from, to) = window_of(start);
    let unloaded = figures(&book, &before, from, to);

    eprintln!(
        "bench: commands (stock receipts), {} clients",
        options.clients
    );
    let commands = closed_loop(
        options.clients,
        timing,
        receipt_operation(http.clone(), base.clone(), options.skus),
    )
    .await;
    let command_rate = commands.rate();

    eprintln!(
        "bench: sagas at saturation, {} clients each placing an order and awaiting its end",
        options.sagas_in_flight
    );
    let before = lock(&book).placed.clone();
    let start = Utc::now();
    let saturated = closed_loop(
        options.sagas_in_flight,
        timing,
        order_operation(
            http.clone(),
            base.clone(),
            options.skus,
            options.decline_share,
            book.clone(),
            true,
        ),
    )
    .await;
    let (drained_full, drain_full) = drain(&book, drain_limit).await;
    let (from, to) = window_of(start);
    let full = figures(&book, &before, from, to);

    let saga_rate = saturated.rate();
    let rate = (saga_rate / 2.0).max(1.0);
    eprintln!("bench: sagas at half that rate ({rate:.0} orders/s), open loop");
    let before = lock(&book).placed.clone();
    let start = Utc::now();
    let half_load = open_loop(
        rate,
        timing,
        order_operation(
            http.clone(),
            base.clone(),
            options.skus,
            options.decline_share,
            book.clone(),
            false,
        ),
    )
    .await;
    let (drained_half, drain_half) = drain(&book, drain_limit).await;
    let (from, to) = window_of(start);
    let half = figures(&book, &before, from, to);

    let _ = stop_tracker.send(true);
    let _ = tracker.await;
    let _ = stop_platform.send(());
    match served.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => eprintln!("bench: the platform stopped with an error: {error:#}"),
        Err(error) => eprintln!("bench: the platform task failed: {error}"),
    }
    let _ = std::fs::remove_dir_all(&data_dir);

    let target_rate = 0.8 * command_rate / COMMANDS_PER_SAGA;
    let happy_p99 = ms(&half.happy, 0.99);
    let compensation_p99 = ms(&half.compensated, 0.99);
    println!("platform-bench sagas");
    println!("command:  {command}");
    println!(
        "backend:  {backend_name}; partitions {}",
        settings.partitions
    );
    println!(
        "run:      {} command clients, {} sagas in flight, {} s warm-up + {} s measured per phase, {} SKUs, decline share {}",
        options.clients,
        options.sagas_in_flight,
        options.warmup,
        options.duration,
        options.skus,
        options.decline_share
    );
    println!("load avg: {load_before} before, {} after", load_average());
    println!();
    println!(
        "sagas unloaded (one at a time): happy path (placed->confirmed, {} sagas) p50 {:.1} ms p99 {:.1} ms \
         max {:.1} ms; compensation (declined->released->rejected, {} sagas) p50 {:.1} ms p99 {:.1} ms \
         max {:.1} ms; errors: {}; cpu {}",
        unloaded.happy.len(),
        ms(&unloaded.happy, 0.5),
        ms(&unloaded.happy, 0.99),
        unloaded.happy.max() as f64 / 1000.0,
        unloaded.compensated.len(),
        ms(&unloaded.compensated, 0.5),
        ms(&unloaded.compensated, 0.99),
        unloaded.compensated.max() as f64 / 1000.0,
        errors(&unloaded_run),
        cpu(&unloaded_run)
    );
    println!(
        "commands (stock receipts, closed loop): {:.0}/s, p50 {:.1} ms, p99 {:.1} ms, errors: {}; cpu {}",
        command_rate,
        commands.ms(0.5),
        commands.ms(0.99),
        errors(&commands),
        cpu(&commands)
    );
    println!(
        "sagas at saturation (closed loop, {} sagas in flight): {:.1} completed sagas/s \
         (saga ends in the window by the order events: {:.1}/s); placed->ended p50 {:.0} ms p99 {:.0} ms; \
         placed->confirmed p50 {:.0} ms p99 {:.0} ms; declined->rejected p99 {:.0} ms; \
         drained {} in {:.1} s{}; errors: {}; cpu {}",
        options.sagas_in_flight,
        saga_rate,
        full.per_second,
        saturated.ms(0.5),
        saturated.ms(0.99),
        ms(&full.happy, 0.5),
        ms(&full.happy, 0.99),
        ms(&full.compensated, 0.99),
        if drained_full { "fully" } else { "NOT fully" },
        drain_full.as_secs_f64(),
        if full.unfinished > 0 {
            format!(" ({} unfinished)", full.unfinished)
        } else {
            String::new()
        },
        errors(&saturated),
        cpu(&saturated)
    );
    println!(
        "sagas at {rate:.0} orders/s (open loop): {:.1} completed sagas/s; happy path (placed->confirmed, {} sagas) \
         p50 {:.0} ms p99 {:.0} ms max {:.0} ms; compensation (declined->released->rejected, {} sagas) p50 {:.0} ms \
         p99 {:.0} ms max {:.0} ms; drained {} in {:.1} s{}; errors: {}; cpu {}",
        half.per_second,
        half.happy.len(),
        ms(&half.happy, 0.5),
        happy_p99,
        half.happy.max() as f64 / 1000.0,
        half.compensated.len(),
        ms(&half.compensated, 0.5),
        compensation_p99,
        half.compensated.max() as f64 / 1000.0,
        if drained_half { "fully" } else { "NOT fully" },
        drain_half.as_secs_f64(),
        if half.unfinished > 0 {
            format!(" ({} unfinished)", half.unfinished)
        } else {
            String::new()
        },
        errors(&half_load),
        cpu(&half_load)
    );
    println!();
    let unloaded_p50 = ms(&unloaded.happy, 0.5);
    let unloaded_p99 = ms(&unloaded.happy, 0.99);
    match settings.store.kafka.as_ref() {
        None => println!(
            "target: unloaded placed->confirmed p50 <= 20 ms and p99 <= 50 ms: p50 {unloaded_p50:.1} ms, \
             p99 {unloaded_p99:.1} ms -> {}",
            verdict(!unloaded.happy.is_empty() && unloaded_p50 <= 20.0 && unloaded_p99 <= 50.0)
        ),
        Some(_) => {
            let bound = 5.0 * f64::from(settings.kafka_fetch_wait_ms) + 50.0;
            println!(
                "target: unloaded placed->confirmed p50 <= 5 x fetch wait {} ms + 50 ms = {bound:.0} ms: \
                 p50 {unloaded_p50:.1} ms -> {}",
                settings.kafka_fetch_wait_ms,
                verdict(!unloaded.happy.is_empty() && unloaded_p50 <= bound)
            );
        }
    }
    println!(
        "target: sagas/s >= 0.8 x {command_rate:.0} commands/s / {COMMANDS_PER_SAGA} commands per saga = {target_rate:.1}: \
         {saga_rate:.1} -> {}",
        verdict(saga_rate >= target_rate)
    );
    println!(
        "target: compensation p99 <= 2 x happy-path p99 = {:.0} ms: {compensation_p99:.0} ms -> {}",
        2.0 * happy_p99,
        verdict(
            !half.compensated.is_empty()
                && !half.happy.is_empty()
                && compensation_p99 <= 2.0 * happy_p99
        )
    );
    Ok(())
}
