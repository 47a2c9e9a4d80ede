//! `platform-bench projections`: how fast the real projection workers (orders, inventory,
//! payments, audit) turn a backlog in the log into read-model rows, against the raw rates at
//! which the same Postgres takes the same rows, all measured in one run.
//!
//! 1. **Preload.** `--orders` complete order lifecycles are decided by the domain itself
//!    (`decide`/`evolve` of the order, stock and payment aggregates, in memory): stock received
//!    for every SKU, then per order `OrderPlaced`, one `StockReserved` per line (or
//!    `StockReservationRejected` when stock is short), `PaymentAuthorised` (every tenth one
//!    `PaymentDeclined`), then either `OrderConfirmed`, `PaymentCaptured` and
//!    `StockReservationCommitted` per line, or the compensations (`StockReservationReleased`,
//!    `PaymentVoided`, `OrderRejected`); some SKUs are restocked along the way. The envelopes
//!    are written with the log's own `append` (the platform's producer and record mapping),
//!    keyed and partitioned as the platform does, many appends in flight. Appends go in waves by
//!    aggregate version (every aggregate's version 1, then every version 2, ...), so each
//!    aggregate's events are in version order in its partition whatever the producer does with
//!    concurrent sends.
//! 2. **Raw batched upsert.** The rows the read models would write for those events, computed
//!    beforehand, written by one task per projection (four connections, as the workers use) in
//!    batches of `MAX_BATCH` events (the runtime's), one transaction per batch, as
//!    multi-row `INSERT … ON CONFLICT … DO UPDATE … WHERE version <` statements (the batch's
//!    rows folded per key first), into tables made by the projections' own migrations in a
//!    scratch schema. No reading, no versions, no positions.
//! 3. **Raw COPY.** The same rows, one per event (keys made unique, so nothing conflicts), by
//!    `COPY … FROM STDIN` per batch into a second set of such tables.
//! 4. **Projections.** The four workers start on fresh schemas from position 0, each in its
//!    own consumer group, exactly as `serve` starts them; the clock runs until every
//!    projection's positions reach the ends of the preloaded partitions. The rate is counted
//!    from the first applied batch (joining the consumer groups is reported apart).
//! 5. **Commands** (unless `--command-events-per-s` cites a figure): the whole platform under
//!    `platform-bench commands`' closed-loop HTTP load (orders and stock receipts, the same
//!    generator), counting the events appended to the three event topics during the measured
//!    window (commands plus what the saga adds).
//!
//! The rates are log events per second: the preload's event count over the time until all four
//! writers (raw) or all four projections are done, since every projection must have applied an
//! event before the read side has it. The targets: projections ≥ 0.5 × raw batched
//! upsert, and ≥ 1.5 × the command phase's event rate.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ::projections::db::{Db, Value, copy_text, value_rows};
use ::projections::models::{
    audit::Audit, inventory::Inventory, orders::Orders, payments::Payments,
};
use ::projections::read_side::ReadBackend;
use ::projections::runtime::{MAX_BATCH, Projection};
use anyhow::Context;
use chrono::Utc;
use domain::order::{OrderAggregate, OrderCommand, OrderLine, PlaceOrder};
use domain::payment::{PaymentAggregate, PaymentCommand, ProviderAnswer};
use domain::stock::{StockAggregate, StockCommand};
use domain::{Aggregate, CustomerId, Decision, Money, OrderId, PaymentToken, Quantity, Sku};
use event_log::{Position, Record, SharedLog, partition_for, topics};
use event_schema::{CommandMeta, Envelope, EventCodec};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{
    CpuSample, CpuUse, Keys, Mix, Timing, UNIT_PRICE_MINOR, Work, closed_loop, command_line,
    command_operation, load_average, open_raw_log, start_platform, verdict,
};
use platform::Settings;

/// Options of `platform-bench projections` (Postgres read models: `--database-url` is
/// required; the log is Kafka with `--kafka`, else the embedded one).
#[derive(Debug, Clone, clap::Args)]
pub struct ProjectionsBench {
    /// Order lifecycles to preload (about 7 events each, plus stock receipts).
    #[arg(long, default_value_t = 10_000)]
    pub orders: usize,

    /// SKUs the orders spread over.
    #[arg(long, default_value_t = 1000)]
    pub skus: usize,

    /// Appends in flight while preloading.
    #[arg(long, default_value_t = 2048)]
    pub in_flight: usize,

    /// Longest wait, in seconds, for the projections to catch up.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,

    /// Cite this command-phase event rate (events/s) instead of measuring it in this run.
    #[arg(long)]
    pub command_events_per_s: Option<f64>,

    /// Clients of the command phase.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,

    /// Measured seconds of the command phase.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,

    /// Unmeasured seconds before the command phase's measurement.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,

    /// Also report the CPU use of this process (e.g. the broker) in each phase; repeatable.
    #[arg(long)]
    pub watch_pid: Vec<u32>,
}

// ---------------------------------------------------------------------------------------------
// The preload

/// Every aggregate's state and version while the histories are decided.
struct Histories<A: Aggregate> {
    states: HashMap<String, (A::State, u64)>,
}

impl<A: Aggregate + EventCodec> Histories<A> {
    fn new() -> Self {
        Histories {
            states: HashMap::new(),
        }
    }

    /// Decides `command` for aggregate `id`; an appended event is folded in and its envelope
    /// pushed to `out`. A rejected or no-op command appends nothing.
    fn decide(
        &mut self,
        id: &str,
        command: &A::Command,
        meta: &CommandMeta,
        out: &mut Vec<Envelope>,
    ) -> Option<A::Event> {
        let (state, version) = self.states.entry(id.to_owned()).or_default();
        match A::decide(state, command) {
            Ok(Decision::Append(event)) => {
                *state = A::evolve(std::mem::take(state), &event);
                *version += 1;
                out.push(Envelope::new::<A>(id, *version, &event, meta, Utc::now()));
                Some(event)
            }
            Ok(Decision::Unchanged) | Err(_) => None,
        }
    }

    fn state(&self, id: &str) -> A::State {
        self.states
            .get(id)
            .map(|(state, _)| state.clone())
            .unwrap_or_default()
    }
}

/// The preloaded events and what they are.
pub(super) struct Preload {
    /// The events, by aggregate version: `waves[0]` holds every aggregate's first event.
    waves: Vec<Vec<Envelope>>,
    pub(super) order_ids: Vec<String>,
    pub(super) events: usize,
    /// Events per aggregate type.
    by_type: BTreeMap<String, usize>,
}

/// A saga step's metadata: caused by the previous event of the same order.
fn step_meta(actor: &str, correlation: &str, cause: Option<&Envelope>) -> CommandMeta {
    let mut meta = CommandMeta::new(actor);
    meta.correlation_id = correlation.to_owned();
    meta.causation_id = cause.map(|event| event.event_id.to_string());
    meta
}

/// Decides `orders` order lifecycles over `skus` SKUs with the domain, in memory.
pub(super) fn decide_lifecycles(orders: usize, skus: usize) -> anyhow::Result<Preload> {
    let mut order = Histories::<OrderAggregate>::new();
    let mut stock = Histories::<StockAggregate>::new();
    let mut payment = Histories::<PaymentAggregate>::new();
    let mut out: Vec<Envelope> = Vec::new();
    let mix = Mix {
        skus,
        order_share: 1.0,
    };
    // Enough stock for about nine orders in ten: each SKU sees ~3 units per order line that
    // names it, 1.5 lines per order.
    let per_sku = (orders as f64 * 1.5 * 2.0 / skus.max(1) as f64 * 0.9).ceil() as u32 + 1;
    for index in 0..skus.max(1) {
        let sku = Mix::sku(index as u64);
        let meta = step_meta("warehouse", &uuid::Uuid::now_v7().to_string(), None);
        stock.decide(
            &sku,
            &StockCommand::Receive {
                quantity: Quantity::new(per_sku)?,
            },
            &meta,
            &mut out,
        );
    }
    let mut order_ids = Vec::with_capacity(orders);
    for sequence in 0..orders as u64 {
        let Work::Order { lines } = mix.pick(1, sequence) else {
            anyhow::bail!("an order share of 1 picked something else");
        };
        let order_id = OrderId(uuid::Uuid::now_v7());
        let id = order_id.to_string();
        order_ids.push(id.clone());
        let customer = format!("customer-{:04}", sequence % 500);
        let token = if sequence % 10 == 9 {
            "tok_decline"
        } else {
            "tok_approve"
        };
        let lines: Vec<OrderLine> = lines
            .iter()
            .map(|(sku, quantity)| {
                Ok(OrderLine {
                    sku: Sku::parse(sku)?,
                    quantity: Quantity::new(*quantity)?,
                    unit_price_minor: UNIT_PRICE_MINOR,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let place = PlaceOrder {
            order_id,
            customer_id: CustomerId::parse(&customer)?,
            currency: "EUR".parse()?,
            payment_token: PaymentToken::parse(token)?,
            lines: lines.clone(),
        };
        let meta = step_meta(&customer, &id, None);
        let Some(_) = order.decide(&id, &OrderCommand::Place(place), &meta, &mut out) else {
            anyhow::bail!("the domain refused a generated order");
        };
        let placed = out.last().cloned();
        let mut reserved = Vec::new();
        let mut all_reserved = true;
        for line in &lines {
            let meta = step_meta("saga", &id, placed.as_ref());
            let sku = line.sku.to_string();
            let before = stock.state(&sku).reserved;
            stock.decide(
                &sku,
                &StockCommand::Reserve {
                    order_id,
                    quantity: line.quantity,
                },
                &meta,
                &mut out,
            );
            if stock.state(&sku).reserved > before {
                reserved.push(sku);
            } else {
                all_reserved = false;
            }
        }
        let total: i64 = lines
            .iter()
            .map(|line| i64::from(line.quantity.get()) * line.unit_price_minor)
            .sum();
        let amount = Money {
            amount_minor: total,
            currency: "EUR".parse()?,
        };
        let mut authorised = false;
        if all_reserved {
            let meta = step_meta("saga", &id, placed.as_ref());
            let answer = if token == "tok_approve" {
                authorised = true;
                ProviderAnswer::Approved {
                    authorisation_id: format!("auth-{sequence}"),
                }
            } else {
                ProviderAnswer::Declined {
                    reason: "card declined".into(),
                }
            };
            payment.decide(
                &id,
                &PaymentCommand::Authorise {
                    order_id,
                    amount,
                    token: PaymentToken::parse(token)?,
                    answer,
                },
                &meta,
                &mut out,
            );
        }
        let cause = out.last().cloned();
        let meta = step_meta("saga", &id, cause.as_ref());
        if authorised {
            order.decide(&id, &OrderCommand::Confirm, &meta, &mut out);
            payment.decide(
                &id,
                &PaymentCommand::Capture { amount: None },
                &meta,
                &mut out,
            );
            for sku in &reserved {
                stock.decide(sku, &StockCommand::Commit { order_id }, &meta, &mut out);
            }
        } else {
            for sku in &reserved {
                stock.decide(sku, &StockCommand::Release { order_id }, &meta, &mut out);
            }
            order.decide(
                &id,
                &OrderCommand::Reject {
                    reason: if all_reserved {
                        "payment declined".into()
                    } else {
                        "stock unavailable".into()
                    },
                },
                &meta,
                &mut out,
            );
        }
        // Restock a SKU now and then, as a warehouse would.
        if sequence % 4 == 0 {
            let sku = Mix::sku(sequence / 4 % skus.max(1) as u64);
            let meta = step_meta("warehouse", &uuid::Uuid::now_v7().to_string(), None);
            stock.decide(
                &sku,
                &StockCommand::Receive {
                    quantity: Quantity::new(6)?,
                },
                &meta,
                &mut out,
            );
        }
    }
    let events = out.len();
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    let mut waves: Vec<Vec<Envelope>> = Vec::new();
    for envelope in out {
        *by_type.entry(envelope.aggregate_type.clone()).or_default() += 1;
        let wave = envelope.aggregate_version as usize - 1;
        if waves.len() <= wave {
            waves.resize_with(wave + 1, Vec::new);
        }
        waves[wave].push(envelope);
    }
    Ok(Preload {
        waves,
        order_ids,
        events,
        by_type,
    })
}

/// Appends the preload to `<prefix>.<aggregate>.events` (created with `partitions`), at most
/// `in_flight` appends at a time, wave after wave. Returns every event with its position, and
/// the end offset of every partition written.
pub(super) async fn append_preload(
    log: &SharedLog,
    prefix: &str,
    partitions: u32,
    preload: &Preload,
    in_flight: usize,
) -> anyhow::Result<(Vec<(Position, Envelope)>, BTreeMap<(String, u32), u64>)> {
    let mut counts = BTreeMap::new();
    for aggregate in ["order", "payment", "stock"] {
        let topic = topics::events(prefix, aggregate);
        let count = log
            .ensure_topic(&topic, partitions)
            .await
            .with_context(|| format!("creating {topic}"))?;
        counts.insert(aggregate.to_owned(), (topic, count));
    }
    let mut written = Vec::with_capacity(preload.events);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(in_flight.max(1)));
    for wave in &preload.waves {
        let mut tasks = JoinSet::new();
        for envelope in wave {
            let (topic, count) = counts
                .get(&envelope.aggregate_type)
                .cloned()
                .context("an event of an unknown aggregate type")?;
            let record = Record::from(envelope);
            let partition = partition_for(&record.key, count);
            let log = log.clone();
            let permit = semaphore.clone().acquire_owned().await?;
            let envelope = envelope.clone();
            tasks.spawn(async move {
                let position = log.append(&topic, partition, record).await;
                drop(permit);
                position.map(|position| (position, envelope))
            });
        }
        while let Some(done) = tasks.join_next().await {
            written.push(done.context("an append task failed")??);
        }
    }
    let mut ends = BTreeMap::new();
    for (topic, count) in counts.values() {
        for partition in 0..*count {
            let end = log.end_offset(topic, partition).await?;
            ends.insert((topic.clone(), partition), end);
        }
    }
    written.sort_by(|(a, _), (b, _)| {
        (a.offset, &a.topic, a.partition).cmp(&(b.offset, &b.topic, b.partition))
    });
    Ok((written, ends))
}

// ---------------------------------------------------------------------------------------------
// The raw baselines

/// A read-model table as the raw baselines write it.
struct Table {
    name: &'static str,
    columns: &'static [&'static str],
    key: &'static [&'static str],
    /// The version column that guards an update, or none for insert-only tables.
    guard: Option<&'static str>,
}

const AUDIT_EVENTS: Table = Table {
    name: "audit_events",
    columns: &[
        "event_id",
        "aggregate_type",
        "aggregate_id",
        "aggregate_version",
        "event_type",
        "schema_version",
        "occurred_at",
        "correlation_id",
        "causation_id",
        "command_id",
        "actor",
        "topic",
        "partition",
        "\"offset\"",
        "envelope",
    ],
    key: &["event_id"],
    guard: None,
};
const ORDER_SUMMARY: Table = Table {
    name: "order_summary",
    columns: &[
        "order_id",
        "customer_id",
        "status",
        "currency",
        "total_minor",
        "lines",
        "reason",
        "placed_at",
        "updated_at",
        "version",
    ],
    key: &["order_id"],
    guard: Some("version"),
};
const ORDER_PAYMENT: Table = Table {
    name: "order_payment",
    columns: &["order_id", "status", "version", "updated_at"],
    key: &["order_id"],
    guard: Some("version"),
};
const ORDER_RESERVATIONS: Table = Table {
    name: "order_reservations",
    columns: &[
        "order_id",
        "sku",
        "quantity",
        "status",
        "stock_version",
        "updated_at",
    ],
    key: &["order_id", "sku"],
    guard: Some("stock_version"),
};
const STOCK_LEVELS: Table = Table {
    name: "stock_levels",
    columns: &[
        "sku",
        "on_hand",
        "reserved",
        "available",
        "version",
        "updated_at",
    ],
    key: &["sku"],
    guard: Some("version"),
};
const PAYMENTS: Table = Table {
    name: "payments",
    columns: &[
        "order_id",
        "status",
        "currency",
        "authorised_minor",
        "captured_minor",
        "refunded_minor",
        "authorisation_id",
        "reason",
        "version",
        "updated_at",
    ],
    key: &["order_id"],
    guard: Some("version"),
};

/// One row for a table; `key` identifies it within the table.
struct RawRow {
    table: &'static Table,
    key: String,
    values: Vec<Value>,
}

fn data_text(envelope: &Envelope, field: &str) -> Option<String> {
    envelope.data.get(field).and_then(|value| match value {
        serde_json::Value::String(text) => Some(text.clone()),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    })
}

fn data_int(envelope: &Envelope, field: &str) -> i64 {
    envelope
        .data
        .get(field)
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(1)
}

/// The status word of an event type (`order.confirmed` → `confirmed`).
fn status_of(envelope: &Envelope) -> String {
    envelope
        .event_type
        .rsplit('.')
        .next()
        .unwrap_or("unknown")
        .replace("reservation_", "")
}

/// The row(s) projection `projection` writes for one event, in the shape of its tables (the
/// values are the event's own, not a fold of the aggregate: the cost of writing is the same).
fn raw_rows(projection: &str, position: &Position, envelope: &Envelope) -> Vec<RawRow> {
    let at = envelope.occurred_at.timestamp_millis();
    let version = envelope.aggregate_version as i64;
    let id = envelope.aggregate_id.clone();
    match (projection, envelope.aggregate_type.as_str()) {
        ("audit", _) => vec![RawRow {
            table: &AUDIT_EVENTS,
            key: envelope.event_id.to_string(),
            values: vec![
                envelope.event_id.to_string().into(),
                envelope.aggregate_type.as_str().into(),
                id.as_str().into(),
                version.into(),
                envelope.event_type.as_str().into(),
                i64::from(envelope.schema_version).into(),
                at.into(),
                envelope.correlation_id.as_str().into(),
                envelope.causation_id.as_str().into(),
                envelope.command_id.to_string().into(),
                envelope.actor.as_str().into(),
                position.topic.as_str().into(),
                position.partition.into(),
                position.offset.into(),
                envelope.to_json().to_string().into(),
            ],
        }],
        ("orders", "order") => vec![RawRow {
            table: &ORDER_SUMMARY,
            key: id.clone(),
            values: vec![
                id.as_str().into(),
                data_text(envelope, "customer_id")
                    .unwrap_or_else(|| "customer-0000".into())
                    .into(),
                status_of(envelope).into(),
                "EUR".into(),
                data_int(envelope, "total_minor").into(),
                data_text(envelope, "lines")
                    .unwrap_or_else(|| "[]".into())
                    .into(),
                data_text(envelope, "reason").into(),
                at.into(),
                at.into(),
                version.into(),
            ],
        }],
        ("orders", "payment") => vec![RawRow {
            table: &ORDER_PAYMENT,
            key: id.clone(),
            values: vec![
                id.as_str().into(),
                status_of(envelope).into(),
                version.into(),
                at.into(),
            ],
        }],
        ("orders", "stock") => match data_text(envelope, "order_id") {
            Some(order_id) => vec![RawRow {
                table: &ORDER_RESERVATIONS,
                key: format!("{order_id}/{id}"),
                values: vec![
                    order_id.into(),
                    id.as_str().into(),
                    data_int(envelope, "quantity").into(),
                    status_of(envelope).into(),
                    version.into(),
                    at.into(),
                ],
            }],
            None => Vec::new(),
        },
        ("inventory", "stock") => vec![RawRow {
            table: &STOCK_LEVELS,
            key: id.clone(),
            values: vec![
                id.as_str().into(),
                (version * 3).into(),
                version.into(),
                (version * 2).into(),
                version.into(),
                at.into(),
            ],
        }],
        ("payments", "payment") => vec![RawRow {
            table: &PAYMENTS,
            key: id.clone(),
            values: vec![
                id.as_str().into(),
                status_of(envelope).into(),
                Some("EUR").into(),
                data_int(envelope, "amount").into(),
                0i64.into(),
                0i64.into(),
                data_text(envelope, "authorisation_id").into(),
                data_text(envelope, "reason").into(),
                version.into(),
                at.into(),
            ],
        }],
        _ => Vec::new(),
    }
}

/// The projections' names and the aggregate types each reads (as the workers subscribe).
/// A topic and one of its partitions.
type TopicPartition = (String, u32);

const PROJECTIONS: [(&str, &[&str]); 4] = [
    ("orders", &["order", "payment", "stock"]),
    ("inventory", &["stock"]),
    ("payments", &["payment"]),
    ("audit", &["order", "payment", "stock"]),
];

/// One projection's events cut into batches of rows, in log order.
struct RawWork {
    projection: &'static str,
    events: usize,
    batches: Vec<Vec<RawRow>>,
}

fn raw_work(written: &[(Position, Envelope)]) -> Vec<RawWork> {
    PROJECTIONS
        .iter()
        .map(|(projection, types)| {
            let events: Vec<&(Position, Envelope)> = written
                .iter()
                .filter(|(_, envelope)| types.contains(&envelope.aggregate_type.as_str()))
                .collect();
            let batches = events
                .chunks(MAX_BATCH)
                .map(|chunk| {
                    chunk
                        .iter()
                        .flat_map(|(position, envelope)| raw_rows(projection, position, envelope))
                        .collect()
                })
                .collect();
            RawWork {
                projection,
                events: events.len(),
                batches,
            }
        })
        .collect()
}

/// Statements per multi-row upsert, as the projections chunk theirs.
const UPSERT_ROWS: usize = 500;

fn upsert_sql(table: &Table, rows: usize) -> String {
    let conflict = match table.guard {
        None => "DO NOTHING".to_owned(),
        Some(guard) => {
            let set = table
                .columns
                .iter()
                .filter(|column| !table.key.contains(column))
                .map(|column| format!("{column} = excluded.{column}"))
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                "DO UPDATE SET {set} WHERE {}.{guard} < excluded.{guard}",
                table.name
            )
        }
    };
    format!(
        "INSERT INTO {} ({}) VALUES {} ON CONFLICT ({}) {conflict}",
        table.name,
        table.columns.join(", "),
        value_rows(rows, table.columns.len(), 1),
        table.key.join(", ")
    )
}

/// Writes every batch, one transaction each: the batch's rows folded per key (the last wins),
/// then one multi-row upsert per table and `UPSERT_ROWS` rows.
async fn raw_upsert(db: Db, work: &RawWork) -> anyhow::Result<Duration> {
    let start = Instant::now();
    for batch in &work.batches {
        let mut tables: BTreeMap<&'static str, (&'static Table, BTreeMap<&str, &RawRow>)> =
            BTreeMap::new();
        for row in batch {
            tables
                .entry(row.table.name)
                .or_insert_with(|| (row.table, BTreeMap::new()))
                .1
                .insert(row.key.as_str(), row);
        }
        let mut tx = db.begin().await?;
        for (table, rows) in tables.values() {
            let rows: Vec<&&RawRow> = rows.values().collect();
            for chunk in rows.chunks(UPSERT_ROWS) {
                let args: Vec<Value> = chunk
                    .iter()
                    .flat_map(|row| row.values.iter().cloned())
                    .collect();
                tx.execute(&upsert_sql(table, chunk.len()), &args).await?;
            }
        }
        tx.commit().await?;
    }
    Ok(start.elapsed())
}

/// Copies every batch, one transaction and one `COPY` per table each; every row is its own
/// (its key suffixed with its position in the batch list), so nothing conflicts.
async fn raw_copy(db: Db, work: &RawWork) -> anyhow::Result<Duration> {
    let Db::Postgres(pool) = db else {
        anyhow::bail!("COPY needs Postgres");
    };
    // The texts are built before the clock starts: COPY's own cost is what is measured.
    let mut prepared: Vec<Vec<(String, String)>> = Vec::new();
    let mut serial = 0u64;
    for batch in &work.batches {
        let mut tables: BTreeMap<&'static str, (&'static Table, String)> = BTreeMap::new();
        for row in batch {
            serial += 1;
            let (_, text) = tables
                .entry(row.table.name)
                .or_insert_with(|| (row.table, String::new()));
            // The first column is (part of) every table's key: make it unique.
            let mut values = row.values.clone();
            if let Some(Value::Text(key)) = values.first_mut() {
                key.push_str(&format!("#{serial}"));
            }
            text.push_str(&copy_text(std::slice::from_ref(&values)));
        }
        prepared.push(
            tables
                .into_values()
                .map(|(table, text)| {
                    (
                        format!(
                            "COPY {} ({}) FROM STDIN",
                            table.name,
                            table.columns.join(", ")
                        ),
                        text,
                    )
                })
                .collect(),
        );
    }
    let start = Instant::now();
    for batch in prepared {
        let mut tx = pool.begin().await?;
        for (statement, text) in batch {
            let mut copy = tx.copy_in_raw(&statement).await?;
            copy.send(text.into_bytes()).await?;
            copy.finish().await?;
        }
        tx.commit().await?;
    }
    Ok(start.elapsed())
}

/// What one raw baseline measured.
struct RawResult {
    /// Per projection: events covered and the time its writer took.
    writers: Vec<(&'static str, usize, Duration)>,
    /// Until the last writer finished.
    wall: Duration,
    cpu: Option<CpuUse>,
}

/// Runs one writer per projection at once, each on its own connection, into tables made by the
/// projections' own migrations in scratch schemas `<schema_prefix><projection>`.
async fn raw_phase(
    url: &str,
    schema_prefix: &str,
    work: &Arc<Vec<RawWork>>,
    copy: bool,
    watched: &[u32],
) -> anyhow::Result<RawResult> {
    let mut dbs = Vec::new();
    let all: [Arc<dyn Projection>; 4] = [
        Arc::new(Orders),
        Arc::new(Inventory),
        Arc::new(Payments),
        Arc::new(Audit),
    ];
    for projection in all {
        let db = Db::postgres(url, &format!("{schema_prefix}{}", projection.name()), 1)
            .await
            .context("connecting a raw baseline's schema")?;
        ::projections::runtime::migrate(&db, projection.as_ref()).await?;
        dbs.push((projection.name(), db));
    }
    let cpu_start = CpuSample::take(watched);
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for (index, item) in work.iter().enumerate() {
        let db = dbs
            .iter()
            .find(|(name, _)| *name == item.projection)
            .map(|(_, db)| db.clone())
            .context("a raw baseline without its schema")?;
        let work = work.clone();
        tasks.spawn(async move {
            let item = &work[index];
            let took = if copy {
                raw_copy(db, item).await
            } else {
                raw_upsert(db, item).await
            };
            took.map(|took| (item.projection, item.events, took))
        });
    }
    let mut writers = Vec::new();
    while let Some(done) = tasks.join_next().await {
        writers.push(done.context("a raw writer failed")??);
    }
    let wall = start.elapsed();
    let cpu = match (cpu_start, CpuSample::take(watched)) {
        (Some(start), Some(end)) => Some(CpuUse::between(&start, &end)),
        _ => None,
    };
    writers.sort_by_key(|(name, _, _)| PROJECTIONS.iter().position(|(p, _)| p == name));
    Ok(RawResult { writers, wall, cpu })
}

// ---------------------------------------------------------------------------------------------
// The projections

struct ProjectionResult {
    /// From starting the workers until the first batch was applied (joining the groups).
    join: Duration,
    /// From the first applied batch until each projection had everything, per projection.
    per_projection: Vec<(&'static str, usize, Duration)>,
    /// From the first applied batch until all had everything.
    wall: Duration,
    cpu: Option<CpuUse>,
    applied: u64,
}

/// The workers' read models: schemas `<schema_prefix><projection>` of `url`, in consumer groups
/// named after `schema_prefix`.
struct Target<'a> {
    url: &'a str,
    schema_prefix: &'a str,
    topic_prefix: &'a str,
}

async fn projection_phase(
    log: SharedLog,
    target: Target<'_>,
    ends: &BTreeMap<(String, u32), u64>,
    events_per_projection: &BTreeMap<&'static str, usize>,
    timeout: Duration,
    watched: &[u32],
) -> anyhow::Result<ProjectionResult> {
    let Target {
        url,
        schema_prefix,
        topic_prefix,
    } = target;
    let backend = ReadBackend::Postgres {
        url: url.to_owned(),
        schema_prefix: schema_prefix.to_owned(),
    };
    let read = ::projections::ReadSide::open_in_group(log, &backend, topic_prefix, schema_prefix)
        .await
        .context("opening the read models")?;
    let names = read.projection_names();
    // The partitions each projection must reach, and where.
    let targets: BTreeMap<&str, Vec<(TopicPartition, u64)>> = PROJECTIONS
        .iter()
        .map(|(name, types)| {
            let wanted: Vec<String> = types
                .iter()
                .map(|aggregate| topics::events(topic_prefix, aggregate))
                .collect();
            (
                *name,
                ends.iter()
                    .filter(|((topic, _), _)| wanted.contains(topic))
                    .map(|(key, end)| (key.clone(), *end))
                    .collect(),
            )
        })
        .collect();
    let reached = |name: &str| -> (u64, bool) {
        let held: BTreeMap<(String, u32), u64> = read
            .held_partitions(name)
            .into_iter()
            .map(|progress| ((progress.topic, progress.partition), progress.next_offset))
            .collect();
        let target = &targets[name];
        let done = target
            .iter()
            .all(|(key, end)| held.get(key).is_some_and(|next| next >= end));
        (held.values().sum(), done)
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    read.start_workers(stopped, &supervisor::Supervisor::new());
    let deadline = started + timeout;
    let mut first: Option<(Instant, Option<CpuSample>)> = None;
    let mut finished: BTreeMap<&'static str, Instant> = BTreeMap::new();
    loop {
        let now = Instant::now();
        let mut progress = 0;
        for name in &names {
            let (sum, done) = reached(name);
            progress += sum;
            if done && !finished.contains_key(name) {
                finished.insert(name, now);
            }
        }
        if first.is_none() && progress > 0 {
            first = Some((now, CpuSample::take(watched)));
        }
        if finished.len() == names.len() {
            break;
        }
        if now >= deadline {
            let _ = stop.send(true);
            anyhow::bail!(
                "the projections did not catch up within {} s (done: {:?})",
                timeout.as_secs(),
                finished.keys().collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let end = Instant::now();
    let cpu_end = CpuSample::take(watched);
    let _ = stop.send(true);
    let (first_at, cpu_start) = first.unwrap_or((started, None));
    let applied = read
        .status()
        .await
        .map(|statuses| statuses.iter().map(|status| status.applied).sum())
        .unwrap_or(0);
    let per_projection = PROJECTIONS
        .iter()
        .map(|(name, _)| {
            (
                *name,
                events_per_projection.get(name).copied().unwrap_or(0),
                finished
                    .get(name)
                    .map(|at| at.saturating_duration_since(first_at))
                    .unwrap_or_default(),
            )
        })
        .collect();
    Ok(ProjectionResult {
        join: first_at - started,
        per_projection,
        wall: end - first_at,
        cpu: match (cpu_start, cpu_end) {
            (Some(start), Some(end)) => Some(CpuUse::between(&start, &end)),
            _ => None,
        },
        applied,
    })
}

// ---------------------------------------------------------------------------------------------
// The command phase

/// Events appended to the three event topics per second while the whole platform takes
/// closed-loop commands, as `platform-bench commands` sends them.
async fn command_phase(
    settings: &Settings,
    options: &ProjectionsBench,
) -> anyhow::Result<(f64, f64, Option<CpuUse>)> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(options.clients * 4)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let (log, _) = open_raw_log(settings).await?;
    let (running, _) = start_platform(settings.clone(), &http).await?;
    let timing = Timing {
        warmup: Duration::from_secs(options.warmup),
        duration: Duration::from_secs(options.duration),
        watched: &options.watch_pid,
    };
    let topic_prefix = settings.store.topic_prefix.clone();
    let sum_log = log.clone();
    let window_from = Instant::now() + timing.warmup;
    let window_to = window_from + timing.duration;
    let counter = tokio::spawn(async move {
        let sum = || async {
            let mut total = 0u64;
            for aggregate in ["order", "payment", "stock"] {
                let topic = topics::events(&topic_prefix, aggregate);
                let count = sum_log.partition_count(&topic).await.unwrap_or(0);
                for partition in 0..count {
                    total += sum_log.end_offset(&topic, partition).await.unwrap_or(0);
                }
            }
            total
        };
        tokio::time::sleep_until(window_from).await;
        let before = sum().await;
        tokio::time::sleep_until(window_to).await;
        let after = sum().await;
        after.saturating_sub(before)
    });
    let stats = closed_loop(
        options.clients,
        timing,
        command_operation(
            super::client::Client::new(running.addr, options.clients * 4),
            Mix {
                skus: options.skus,
                order_share: 0.5,
            },
            Keys::new(0.0),
        ),
    )
    .await;
    let events = counter.await.unwrap_or(0);
    running.stop().await;
    Ok((
        events as f64 / timing.duration.as_secs_f64(),
        stats.rate(),
        stats.cpu,
    ))
}

// ---------------------------------------------------------------------------------------------
// The run

fn rate(events: usize, took: Duration) -> f64 {
    events as f64 / took.as_secs_f64().max(1e-9)
}

fn cores(value: Option<f64>) -> String {
    value
        .map(|value| format!("{value:.2}"))
        .unwrap_or_else(|| "-".into())
}

/// `busy bench [pid …] other` for a phase.
pub(super) fn cpu_columns(cpu: Option<&CpuUse>, watched: usize) -> String {
    let mut line = format!(
        " {:>6} {:>6}",
        cores(cpu.map(|cpu| cpu.machine)),
        cores(cpu.map(|cpu| cpu.own))
    );
    for index in 0..watched {
        line.push_str(&format!(
            " {:>8}",
            cores(cpu.and_then(|cpu| cpu.watched.get(index).copied().flatten()))
        ));
    }
    let other =
        cpu.map(|cpu| (cpu.machine - cpu.own - cpu.watched.iter().flatten().sum::<f64>()).max(0.0));
    line.push_str(&format!(" {:>6}", cores(other)));
    line
}

pub(super) async fn run(options: ProjectionsBench, base: Settings) -> anyhow::Result<()> {
    let url = base.store.database_url.clone().context(
        "platform-bench projections measures the Postgres read models: pass --database-url",
    )?;
    anyhow::ensure!(options.orders > 0, "--orders must be at least 1");
    anyhow::ensure!(options.skus > 0, "--skus must be at least 1");
    let command = command_line();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let data_dir = base.store.data_dir.join(format!("bench-{run_id}"));
    let created_parent = !base.store.data_dir.exists();
    let mut settings = base.clone();
    settings.store.data_dir = data_dir.clone();
    settings.http_addr = SocketAddr::new(base.http_addr.ip(), 0);
    settings.store.topic_prefix = format!("{}-pbench-{run_id}", base.store.topic_prefix);
    settings.store.schema_prefix = format!("{}pbench_{run_id}_", base.store.schema_prefix);
    settings.instance = 0;
    settings.instances = 1;
    let load_before = load_average();
    let watched = options.watch_pid.clone();

    eprintln!("bench: deciding {} order lifecycles", options.orders);
    let preload = decide_lifecycles(options.orders, options.skus)?;
    let (log, backend) = open_raw_log(&settings).await?;
    eprintln!(
        "bench: appending {} events ({} waves)",
        preload.events,
        preload.waves.len()
    );
    let preload_started = Instant::now();
    let (written, ends) = append_preload(
        &log,
        &settings.store.topic_prefix,
        settings.partitions,
        &preload,
        options.in_flight,
    )
    .await?;
    let preload_took = preload_started.elapsed();

    let work = Arc::new(raw_work(&written));
    let events_per_projection: BTreeMap<&'static str, usize> = work
        .iter()
        .map(|item| (item.projection, item.events))
        .collect();
    eprintln!("bench: raw batched upsert");
    let upsert = raw_phase(
        &url,
        &format!("{}raw_upsert_", settings.store.schema_prefix),
        &work,
        false,
        &watched,
    )
    .await?;
    eprintln!("bench: raw COPY");
    let copy = raw_phase(
        &url,
        &format!("{}raw_copy_", settings.store.schema_prefix),
        &work,
        true,
        &watched,
    )
    .await?;
    eprintln!("bench: projections from position 0");
    let projected = projection_phase(
        log.clone(),
        Target {
            url: &url,
            schema_prefix: &settings.store.schema_prefix,
            topic_prefix: &settings.store.topic_prefix,
        },
        &ends,
        &events_per_projection,
        Duration::from_secs(options.timeout),
        &watched,
    )
    .await?;
    drop(log);
    let command_rate = match options.command_events_per_s {
        Some(cited) => Err(cited),
        None => {
            eprintln!("bench: commands, {} clients", options.clients);
            let mut commands = settings.clone();
            commands.store.topic_prefix = format!("{}-cmd", settings.store.topic_prefix);
            commands.store.schema_prefix = format!("{}cmd_", settings.store.schema_prefix);
            commands.store.data_dir = data_dir.join("commands");
            Ok(command_phase(&commands, &options).await?)
        }
    };
    let load_after = load_average();
    let _ = std::fs::remove_dir_all(&data_dir);
    if created_parent {
        let _ = std::fs::remove_dir(&base.store.data_dir);
    }

    // The report.
    let machine_cores = std::thread::available_parallelism()
        .map(|cores| cores.get())
        .unwrap_or(0);
    println!("platform-bench projections");
    println!("  command:   {command}");
    println!(
        "  backend:   {backend}; read models in Postgres (schemas {}*)",
        settings.store.schema_prefix
    );
    println!(
        "  preload:   {} order lifecycles over {} SKUs = {} events ({}), {} partitions; appended in {:.1} s ({:.0}/s, {} in flight)",
        options.orders,
        options.skus,
        preload.events,
        preload
            .by_type
            .iter()
            .map(|(kind, count)| format!("{kind} {count}"))
            .collect::<Vec<_>>()
            .join(", "),
        settings.partitions,
        preload_took.as_secs_f64(),
        rate(preload.events, preload_took),
        options.in_flight
    );
    println!(
        "  batches:   up to {MAX_BATCH} events per transaction (raw writers cut the same batches; {UPSERT_ROWS} rows per upsert statement)"
    );
    println!(
        "  machine:   {machine_cores} cores; load average {load_before} before, {load_after} after"
    );
    println!();
    let mut header = format!(
        "  {:<44} {:>10} {:>9} {:>6} {:>6}",
        "phase", "events/s", "seconds", "busy", "bench"
    );
    for pid in &watched {
        header.push_str(&format!(" {:>8}", format!("pid {pid}")));
    }
    header.push_str(&format!(" {:>6}", "other"));
    println!("{header}");
    let row = |name: &str, events: usize, took: Duration, cpu: Option<&CpuUse>| {
        println!(
            "  {:<44} {:>10.0} {:>9.2}{}",
            name,
            rate(events, took),
            took.as_secs_f64(),
            cpu_columns(cpu, watched.len())
        );
    };
    let sub = |name: &str, events: usize, took: Duration| {
        println!(
            "  {:<44} {:>10.0} {:>9.2}",
            format!("  {name} ({events} events)"),
            rate(events, took),
            took.as_secs_f64()
        );
    };
    row(
        "raw batched upsert (4 writers)",
        preload.events,
        upsert.wall,
        upsert.cpu.as_ref(),
    );
    for (name, events, took) in &upsert.writers {
        sub(name, *events, *took);
    }
    row(
        "raw COPY (4 writers)",
        preload.events,
        copy.wall,
        copy.cpu.as_ref(),
    );
    for (name, events, took) in &copy.writers {
        sub(name, *events, *took);
    }
    row(
        "projections from 0 until caught up",
        preload.events,
        projected.wall,
        projected.cpu.as_ref(),
    );
    for (name, events, took) in &projected.per_projection {
        sub(name, *events, *took);
    }
    println!(
        "  (events/s = the preload's {} log events over the time until every writer / projection had all it reads; the per-projection lines count that projection's own events)",
        preload.events
    );
    println!(
        "  (joining the four consumer groups before the first batch: {:.2} s, not counted; events applied by the workers: {} of the {} they read{})",
        projected.join.as_secs_f64(),
        projected.applied,
        events_per_projection.values().sum::<usize>(),
        if projected.applied as usize == events_per_projection.values().sum::<usize>() {
            ""
        } else {
            ": some were skipped or parked, see the warnings"
        }
    );
    let (command_events, command_source) = match &command_rate {
        Ok((events, commands, cpu)) => {
            println!(
                "  commands ({} clients, {} s): {:.0} commands/s appending {:.0} events/s to the event topics (commands and saga){}",
                options.clients,
                options.duration,
                commands,
                events,
                cpu_columns(cpu.as_ref(), watched.len())
            );
            (*events, "measured in this run")
        }
        Err(cited) => (*cited, "cited (--command-events-per-s)"),
    };
    println!();
    let projection_rate = rate(preload.events, projected.wall);
    let upsert_rate = rate(preload.events, upsert.wall);
    println!(
        "  {:<58} {:>12} {:>34} {:>6}",
        "target", "measured", "baseline → bound", "result"
    );
    println!(
        "  {:<58} {:>12} {:>34} {:>6}",
        "projection events/s ≥ 0.5 × raw batched upsert",
        format!("{projection_rate:.0}/s"),
        format!("0.5 × {upsert_rate:.0} → ≥ {:.0}", 0.5 * upsert_rate),
        verdict(projection_rate >= 0.5 * upsert_rate)
    );
    println!(
        "  {:<58} {:>12} {:>34} {:>6}",
        format!("projection events/s ≥ 1.5 × command events/s ({command_source})"),
        format!("{projection_rate:.0}/s"),
        format!("1.5 × {command_events:.0} → ≥ {:.0}", 1.5 * command_events),
        verdict(projection_rate >= 1.5 * command_events)
    );
    println!(
        "  {:<58} {:>12} {:>34} {:>6}",
        "  (informative) projection events/s vs raw COPY",
        format!("{projection_rate:.0}/s"),
        format!("{:.0}/s", rate(preload.events, copy.wall)),
        format!(
            "{:.0}%",
            100.0 * projection_rate / rate(preload.events, copy.wall).max(1e-9)
        )
    );
    Ok(())
}
