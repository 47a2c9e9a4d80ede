//! `platform-bench replay`: how fast `platform replay` rebuilds read models from the log,
//! against the raw rates of the same broker and database, all measured in one run.
//!
//! 1. **Preload.** `--events` `stock.received` events over `--skus` stock items (each item's
//!    versions 1, 2, 3, ...), appended with the log's own `append` in waves by version so each
//!    item's events are in order in its partition.
//! 2. **Raw consume.** Every partition read from offset 0 to its end with plain readers (the
//!    replay's own way of reading), decoding nothing.
//! 3. **Raw COPY.** The rows the audit model holds for those events (one per event, its 15
//!    columns), built beforehand, written by `COPY … FROM STDIN` in batches of the replay's
//!    size into a table made by the audit model's own migration in a scratch schema
//!    (Postgres). SQLite has no COPY: there the baseline is multi-row inserts of the same rows
//!    in batch-size transactions, into a scratch file.
//! 4. **Replay.** `replay::replay` of the audit model (one row per event) and of the inventory
//!    model (one row per SKU), each from scratch into its shadow and swapped in.
//!
//! Targets: replaying the audit model ≥ 0.25 × raw COPY, and 1,000,000 events
//! rebuilt in under 60 s.

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use domain::Quantity;
use domain::stock::{StockAggregate, StockEvent, StockReceived};
use event_log::{SharedLog, partition_for, topics};
use event_schema::{CommandMeta, Envelope, Record};
use projections::db::{Db, Value, copy_text, value_rows};
use projections::models::audit::Audit;
use projections::replay::{self, ReplayOptions};
use projections::runtime::{Event, Projection};
use projections::{ReadBackend, ReadSide};

use platform::backend::Backend;
use platform::settings::Settings;

#[derive(Debug, Clone, clap::Args)]
pub struct ReplayBench {
    /// Events to preload (and rebuild).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Stock items they are spread over.
    #[arg(long, default_value_t = 10_000)]
    pub skus: u64,
    /// Records per replay transaction (and per raw COPY batch); the default is `platform
    /// replay`'s.
    #[arg(long, default_value_t = 25_000)]
    pub batch: usize,
}

/// Appends the preload; returns when every append is acknowledged.
async fn preload(
    log: &SharedLog,
    topic: &str,
    partitions: u32,
    options: &ReplayBench,
) -> anyhow::Result<()> {
    let per_sku = options.events.div_ceil(options.skus.max(1));
    let meta = CommandMeta::new("bench");
    let mut written = 0u64;
    for version in 1..=per_sku {
        let mut wave = Vec::new();
        for sku in 0..options.skus {
            if written >= options.events {
                break;
            }
            written += 1;
            let id = format!("SKU-{sku:06}");
            let event = StockEvent::Received(StockReceived {
                quantity: Quantity::new(1).map_err(anyhow::Error::msg)?,
            });
            let envelope = Envelope::new::<StockAggregate>(&id, version, &event, &meta, Utc::now());
            let record = Record::from(&envelope);
            let partition = partition_for(&id, partitions);
            let log = log.clone();
            let topic = topic.to_owned();
            wave.push(tokio::spawn(async move {
                log.append(&topic, partition, record).await
            }));
            if wave.len() >= 2000 {
                for append in wave.drain(..) {
                    append.await??;
                }
            }
        }
        for append in wave {
            append.await??;
        }
    }
    Ok(())
}

/// Reads every partition to its end; the records read.
async fn raw_consume(
    log: &SharedLog,
    topic: &str,
    partitions: u32,
) -> anyhow::Result<Vec<event_log::LogRecord>> {
    let mut ends = Vec::new();
    for partition in 0..partitions {
        ends.push(log.end_offset(topic, partition).await?);
    }
    let start: Vec<(u32, u64)> = (0..partitions).map(|partition| (partition, 0)).collect();
    let mut reader = log.reader(topic, &start).await?;
    let mut next = vec![0u64; partitions as usize];
    let mut records = Vec::new();
    while next.iter().zip(&ends).any(|(next, end)| next < end) {
        for record in reader.poll(5000, Duration::from_millis(200)).await? {
            let at = &mut next[record.position.partition as usize];
            *at = (*at).max(record.position.offset + 1);
            records.push(record);
        }
    }
    Ok(records)
}

/// Writes the rows into a fresh audit table: COPY on Postgres, multi-row inserts on SQLite.
async fn raw_write(
    db: &Db,
    columns: &str,
    rows: &[Vec<Value>],
    batch: usize,
) -> anyhow::Result<Duration> {
    let batch = batch.max(1);
    match db {
        Db::Postgres(pool) => {
            let texts: Vec<String> = rows.chunks(batch).map(copy_text).collect();
            let statement = format!("COPY audit_events ({columns}) FROM STDIN");
            let start = Instant::now();
            for text in texts {
                let mut tx = pool.begin().await?;
                let mut copy = tx.copy_in_raw(&statement).await?;
                copy.send(text.into_bytes()).await?;
                copy.finish().await?;
                tx.commit().await?;
            }
            Ok(start.elapsed())
        }
        Db::Sqlite(_) => {
            let start = Instant::now();
            for chunk in rows.chunks(batch) {
                let mut tx = db.begin().await?;
                for rows in chunk.chunks(60) {
                    let args: Vec<Value> = rows.iter().flatten().cloned().collect();
                    tx.execute(
                        &format!(
                            "INSERT INTO audit_events ({columns}) VALUES {}",
                            value_rows(rows.len(), 15, 1)
                        ),
                        &args,
                    )
                    .await?;
                }
                tx.commit().await?;
            }
            Ok(start.elapsed())
        }
    }
}

fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

pub(super) async fn run(options: ReplayBench, base: Settings) -> anyhow::Result<()> {
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let mut settings = base.clone();
    settings.store.topic_prefix = format!("bench{}", &unique[..8]);
    settings.store.schema_prefix = format!("bench{}_", &unique[..8]);
    let scratch = tempdir_in(&base)?;
    if settings.store.database_url.is_none() {
        settings.store.data_dir = scratch.clone();
    }
    let backend = Backend::open(&settings).await?;
    let log = backend.log.clone();
    let topic = topics::events(&settings.store.topic_prefix, "stock");
    let partitions = log.ensure_topic(&topic, settings.partitions).await?;
    let read_backend = match &settings.store.database_url {
        Some(url) => ReadBackend::Postgres {
            url: url.clone(),
            schema_prefix: settings.store.schema_prefix.clone(),
        },
        None => ReadBackend::Sqlite {
            dir: settings.store.data_dir.clone(),
        },
    };
    println!(
        "replay benchmark: {} events over {} SKUs, {} partitions, backend {}, batch {}",
        options.events,
        options.skus,
        partitions,
        log.backend(),
        options.batch
    );

    eprintln!("bench: preload");
    let started = Instant::now();
    preload(&log, &topic, partitions, &options)
        .await
        .context("preloading the log")?;
    let preload_time = started.elapsed();

    eprintln!("bench: raw consume");
    let started = Instant::now();
    let records = raw_consume(&log, &topic, partitions).await?;
    let consume_time = started.elapsed();
    let events = records.len() as u64;

    eprintln!("bench: raw write");
    // The rows the audit model itself writes for these events.
    let decoded: Vec<Event> = records
        .into_iter()
        .map(|record| {
            Ok(Event {
                envelope: Envelope::try_from(&record.record).map_err(anyhow::Error::msg)?,
                position: record.position,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let audit_rows = Audit
        .append_only_rows(&decoded)
        .context("the audit model is append-only")?;
    drop(decoded);
    let columns = audit_rows.columns.join(", ");
    let rows = audit_rows.rows;
    let raw_db = match &settings.store.database_url {
        Some(url) => {
            Db::postgres(
                url,
                &format!("{}raw_audit", settings.store.schema_prefix),
                2,
            )
            .await?
        }
        None => Db::sqlite(&scratch.join("raw-audit.db")).await?,
    };
    projections::runtime::migrate(&raw_db, &Audit).await?;
    let copy_time = raw_write(&raw_db, &columns, &rows, options.batch).await?;
    drop(rows);

    let read = ReadSide::open(log.clone(), &read_backend, &settings.store.topic_prefix)
        .await
        .map_err(anyhow::Error::msg)?;
    let replay_options = ReplayOptions {
        batch: options.batch,
        ..ReplayOptions::default()
    };
    let mut results = Vec::new();
    for name in ["audit", "inventory"] {
        eprintln!("bench: replay {name}");
        let report = replay::replay(
            &log,
            &read_backend,
            &settings.store.topic_prefix,
            read.db(name).context("no such projection")?,
            read.projection(name).context("no such projection")?,
            &replay_options,
            &mut |_| {},
        )
        .await
        .map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            report.applied == events,
            "{name} applied {} of {events} events",
            report.applied
        );
        results.push((name, report));
    }

    let raw_name = if raw_db.is_postgres() {
        "raw COPY into audit_events"
    } else {
        "raw multi-row INSERT into audit_events (SQLite has no COPY)"
    };
    let copy_rate = rate(events, copy_time);
    println!();
    println!("{:<58} {:>12} {:>10}", "phase", "events/s", "seconds");
    println!(
        "{:<58} {:>12.0} {:>10.1}",
        "preload (append)",
        rate(events, preload_time),
        preload_time.as_secs_f64()
    );
    println!(
        "{:<58} {:>12.0} {:>10.1}",
        "raw consume (plain readers, no decoding)",
        rate(events, consume_time),
        consume_time.as_secs_f64()
    );
    println!(
        "{:<58} {:>12.0} {:>10.1}",
        raw_name,
        copy_rate,
        copy_time.as_secs_f64()
    );
    for (name, report) in &results {
        println!(
            "{:<58} {:>12.0} {:>10.1}",
            format!("replay {name} (read, decode, apply, swap)"),
            report.events_per_second(),
            report.seconds
        );
    }
    println!();
    let audit = &results[0].1;
    let ratio = audit.events_per_second() / copy_rate.max(1e-9);
    println!(
        "audit replay / raw write: {ratio:.2} (target >= 0.25): {}",
        if ratio >= 0.25 { "met" } else { "NOT met" }
    );
    let per_million = audit.seconds * 1_000_000.0 / events.max(1) as f64;
    println!(
        "audit replay time per 1,000,000 events: {per_million:.1} s (target < 60 s): {}",
        if per_million < 60.0 { "met" } else { "NOT met" }
    );
    println!(
        "audit replay / raw consume: {:.2}",
        audit.events_per_second() / rate(events, consume_time).max(1e-9)
    );
    if raw_db.is_postgres() {
        // The scratch schemas go; the topic stays (the log is append-only).
        for schema in ["raw_audit", "audit", "inventory", "orders", "payments"] {
            let _ = raw_db
                .execute(
                    &format!(
                        "DROP SCHEMA IF EXISTS \"{}{schema}\" CASCADE",
                        settings.store.schema_prefix
                    ),
                    &[],
                )
                .await;
        }
    }
    if settings.store.database_url.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok(())
}

/// A scratch directory under the data directory (the embedded log and read models go there).
fn tempdir_in(base: &Settings) -> anyhow::Result<std::path::PathBuf> {
    let dir = base
        .store
        .data_dir
        .join(format!("bench-replay-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
