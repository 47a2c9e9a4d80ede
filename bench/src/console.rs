//! `platform-bench console`: every console page's answer time with real volumes.
//!
//! The platform runs whole in this process (`Part::All`, as `serve` does) on the backend the
//! global flags choose. `--orders` orders go through it over HTTP from `--clients` closed-loop
//! clients (a third declined, a fifth of the rest cancelled once confirmed, the rest shipped),
//! and the bench waits until every saga has ended and the read models have caught up. Then
//! each console page is fetched `--requests` times by one client, one request after the other,
//! and its answer times are reported (p50, p99, max). Target: every page's p99 ≤ 100 ms.
//!
//! The overview answers with the console's latest measurement (taken every second while it is
//! looked at); how old its figures are when a browser gets them is reported too: its "As of"
//! against the time of the answer, `--overview-requests` times, `--overview-gap-ms` apart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{command_line, histogram, load_average};
use platform::{Part, Platform, Settings};

/// Options of `platform-bench console`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsoleBench {
    /// Orders placed before the pages are measured.
    #[arg(long, default_value_t = 100_000)]
    pub orders: u64,

    /// Closed-loop clients placing the orders.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,

    /// SKUs the orders spread over.
    #[arg(long, default_value_t = 1000)]
    pub skus: u64,

    /// Requests per page.
    #[arg(long, default_value_t = 200)]
    pub requests: usize,

    /// Requests of the overview whose age (now − its "As of") is measured.
    #[arg(long, default_value_t = 30)]
    pub overview_requests: usize,

    /// Milliseconds between those requests.
    #[arg(long, default_value_t = 700)]
    pub overview_gap_ms: u64,

    /// Longest wait, in seconds, for every saga to end after the last order.
    #[arg(long, default_value_t = 900)]
    pub drain_timeout: u64,
}

fn sku(n: u64, skus: u64) -> String {
    format!("SKU-{:05}", n % skus.max(1))
}

pub async fn run(options: ConsoleBench, base_settings: Settings) -> anyhow::Result<()> {
    anyhow::ensure!(options.orders > 0, "--orders must be at least 1");
    anyhow::ensure!(options.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(options.requests > 0, "--requests must be at least 1");
    let command = command_line();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let data_dir = base_settings
        .store
        .data_dir
        .join(format!("bench-console-{run_id}"));
    let mut settings = base_settings.clone();
    settings.store.data_dir = data_dir.clone();
    settings.http_addr = SocketAddr::new(base_settings.http_addr.ip(), 0);
    settings.store.topic_prefix = format!("{}-console-{run_id}", base_settings.store.topic_prefix);
    settings.store.schema_prefix =
        format!("{}console_{run_id}_", base_settings.store.schema_prefix);
    settings.instance = 0;
    settings.instances = 1;
    settings.security.auth = Some(platform::settings::Toggle::Off);
    settings.security.rate_limit = 1e9;
    settings.security.rate_burst = u32::MAX;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let backend_name = if settings.store.kafka.is_some() {
        "kafka + postgres"
    } else if settings.store.database_url.is_some() {
        "embedded log, Postgres read models"
    } else {
        "embedded (SQLite)"
    };
    let load_before = load_average();

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(options.clients * 2)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .build()
        .context("building the HTTP client")?;
    eprintln!("bench: starting the platform");
    let platform = Platform::build(settings.clone(), Part::All)
        .await
        .context("starting the platform under test")?;
    let running = super::Running::serve(platform);
    let base = running.base.clone();
    super::wait_ready(&http, &base).await?;

    eprintln!("bench: receiving stock for {} SKUs", options.skus);
    for n in 0..options.skus {
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

    // The orders: every third declined; of the approved, every fifth cancelled once confirmed
    // and the others shipped (their sagas complete).
    eprintln!("bench: placing {} orders", options.orders);
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut clients = JoinSet::new();
    for _ in 0..options.clients {
        let (http, base, next) = (http.clone(), base.clone(), next.clone());
        let (orders, skus) = (options.orders, options.skus);
        clients.spawn(async move {
            let mut placed = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= orders {
                    return Ok::<_, anyhow::Error>(placed);
                }
                let token = if n % 3 == 0 {
                    "tok_decline"
                } else {
                    "tok_approve"
                };
                let response = http
                    .post(format!("{base}/orders"))
                    .json(&serde_json::json!({
                        "customer_id": format!("c-{}", n % 5000),
                        "currency": "EUR",
                        "payment_token": token,
                        "lines": [{"sku": sku(n, skus), "quantity": 1, "unit_price_minor": 500}],
                    }))
                    .send()
                    .await
                    .context("placing an order")?;
                anyhow::ensure!(
                    response.status() == 201,
                    "placing an order: HTTP {}",
                    response.status()
                );
                let body: serde_json::Value = response.json().await?;
                if token == "tok_approve" {
                    placed.push((n, body["order_id"].as_str().unwrap_or_default().to_owned()));
                }
                if n % 10_000 == 0 && n > 0 {
                    eprintln!("bench: {n} orders placed");
                }
            }
        });
    }
    let mut approved = Vec::new();
    while let Some(result) = clients.join_next().await {
        approved.extend(result??);
    }
    let placing = started.elapsed();
    eprintln!(
        "bench: {} orders placed in {:.1} s; waiting for their sagas",
        options.orders,
        placing.as_secs_f64()
    );
    let drain_by = Instant::now() + Duration::from_secs(options.drain_timeout);
    // Once every saga has settled, ship or cancel each confirmed order (a cancellation
    // compensates: refund, release; a shipment completes the saga).
    wait_drained(&http, &base, drain_by).await?;
    eprintln!("bench: sagas settled; shipping and cancelling the confirmed orders");
    let mut work = JoinSet::new();
    for chunk in approved.chunks(approved.len().div_ceil(options.clients).max(1)) {
        let (http, base, chunk) = (http.clone(), base.clone(), chunk.to_vec());
        work.spawn(async move {
            for (n, id) in chunk {
                let action = if n % 5 == 1 { "cancel" } else { "ship" };
                let response = http
                    .post(format!("{base}/orders/{id}/{action}"))
                    .json(&serde_json::json!({}))
                    .send()
                    .await?;
                anyhow::ensure!(
                    response.status() == 200,
                    "{action} of order {id}: HTTP {}",
                    response.status()
                );
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(result) = work.join_next().await {
        result??;
    }
    wait_drained(&http, &base, drain_by).await?;
    eprintln!(
        "bench: every saga ended, read models caught up after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Ids to look pages up by.
    let list: serde_json::Value = http
        .get(format!("{base}/sagas?state=completed&limit=1"))
        .send()
        .await?
        .json()
        .await?;
    let order_id = list["sagas"][0]["order_id"]
        .as_str()
        .context("a completed saga")?
        .to_owned();
    let correlation_id = list["sagas"][0]["correlation_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // A later page of the list: where the first 500 sagas end.
    let first: serde_json::Value = http
        .get(format!("{base}/sagas?limit=500"))
        .send()
        .await?
        .json()
        .await?;
    let last = &first["sagas"][499];
    let after =
        chrono::DateTime::parse_from_rfc3339(last["updated_at"].as_str().unwrap_or_default())
            .map(|time| {
                format!(
                    "{}.{}",
                    time.timestamp_millis(),
                    last["order_id"].as_str().unwrap_or_default()
                )
            })
            .context("the 500th saga's update time")?;

    let pages: Vec<(String, String)> = vec![
        ("overview (as served)".into(), "/console".into()),
        (
            "overview refresh (as served)".into(),
            "/console/overview".into(),
        ),
        ("sagas, newest 100".into(), "/console/sagas".into()),
        (
            "sagas, completed, newest 100".into(),
            "/console/sagas?state=completed".into(),
        ),
        (
            "sagas, the page after 500".into(),
            format!("/console/sagas?after={after}"),
        ),
        (
            "sagas unchanged 1 min+".into(),
            "/console/sagas?stuck_minutes=1".into(),
        ),
        ("one saga".into(), format!("/console/sagas/{order_id}")),
        ("projections".into(), "/console/projections".into()),
        (
            "audit search by order".into(),
            format!("/console/audit?q={order_id}"),
        ),
        (
            "audit search by SKU".into(),
            format!("/console/audit?q={}", sku(1, options.skus)),
        ),
        (
            "audit search by correlation".into(),
            format!("/console/audit?q={correlation_id}"),
        ),
        (
            "order as of version 1".into(),
            format!("/console/audit/order/{order_id}?version=1"),
        ),
    ];
    let mut rows = Vec::new();
    for (name, path) in &pages {
        let timings = time_page(&http, &base, path, options.requests, Duration::ZERO).await?;
        rows.push((name.clone(), path.clone(), timings));
    }
    let mut ages = histogram();
    for _ in 0..options.overview_requests {
        let body = http
            .get(format!("{base}/console/overview"))
            .send()
            .await?
            .text()
            .await?;
        let answered = chrono::Utc::now();
        let as_of = body
            .split_once("As of ")
            .and_then(|(_, rest)| rest.split_once('.'))
            .and_then(|(seconds, rest)| {
                let millis = rest.get(..4)?;
                chrono::DateTime::parse_from_rfc3339(&format!("{seconds}.{millis}")).ok()
            })
            .context("the overview's \"As of\"")?;
        let age = (answered - as_of.with_timezone(&chrono::Utc))
            .num_microseconds()
            .unwrap_or(0)
            .max(1);
        ages.record(age as u64)?;
        tokio::time::sleep(Duration::from_millis(options.overview_gap_ms)).await;
    }

    running.stop().await;
    let _ = std::fs::remove_dir_all(&data_dir);

    println!("# platform-bench console: {backend_name}");
    println!("command: {command}");
    println!(
        "orders: {} placed in {:.1} s by {} clients; load average before: {load_before}",
        options.orders,
        placing.as_secs_f64(),
        options.clients
    );
    println!();
    println!("| page | requests | p50 | p99 | max | target p99 ≤ 100 ms |");
    println!("|---|---|---|---|---|---|");
    let mut all_met = true;
    for (name, path, timings) in &rows {
        let p99 = ms(timings, 0.99);
        let met = p99 <= 100.0;
        all_met &= met;
        println!(
            "| {name} (`{path}`) | {} | {:.1} ms | {p99:.1} ms | {:.1} ms | {} |",
            timings.len(),
            ms(timings, 0.5),
            timings.max() as f64 / 1000.0,
            if met { "met" } else { "**not met**" }
        );
    }
    println!();
    println!(
        "every page p99 ≤ 100 ms: {}",
        if all_met { "met" } else { "not met" }
    );
    println!(
        "the overview's age when answered ({} requests {} ms apart): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        ages.len(),
        options.overview_gap_ms,
        ms(&ages, 0.5),
        ms(&ages, 0.99),
        ages.max() as f64 / 1000.0
    );
    Ok(())
}

/// Waits until no saga is between steps and no projection lags.
async fn wait_drained(http: &reqwest::Client, base: &str, by: Instant) -> anyhow::Result<()> {
    loop {
        let mut busy = 0;
        for state in [
            "reserving_stock",
            "authorising_payment",
            "confirming",
            "compensating",
        ] {
            let list: serde_json::Value = http
                .get(format!("{base}/sagas?state={state}&limit=1"))
                .send()
                .await?
                .json()
                .await?;
            busy += list["sagas"].as_array().map_or(0, Vec::len);
        }
        let metrics = http
            .get(format!("{base}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let lag: f64 = metrics
            .lines()
            .filter(|line| line.starts_with("platform_projection_lag_events"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if busy == 0 && lag == 0.0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < by,
            "sagas still running or projections lagging ({lag} events) at the drain timeout"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn ms(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

/// `requests` answers of `path`, one after the other, `gap` apart; each must be 200.
async fn time_page(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    requests: usize,
    gap: Duration,
) -> anyhow::Result<Histogram<u64>> {
    let mut timings = histogram();
    for _ in 0..requests {
        let started = Instant::now();
        let response = http
            .get(format!("{base}{path}"))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = response.status();
        let body = response.bytes().await?;
        let took = started.elapsed();
        anyhow::ensure!(
            status == 200,
            "GET {path}: HTTP {status}: {}",
            String::from_utf8_lossy(&body)
        );
        timings.record(took.as_micros().max(1) as u64)?;
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
    }
    Ok(timings)
}
