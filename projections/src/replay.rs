//! Replay: rebuilding a projection from the log into shadow tables, then swapping them in while
//! the live projection keeps answering queries.
//!
//! The shadow lives beside the live read model: a schema `<live schema>_replay` on Postgres, a
//! file `<projection>.replay.db` on SQLite. It is built by the projection's own migrations and
//! `apply`, so its tables are the live ones, runtime tables included (positions, applied
//! versions, parked events). The bulk path reads each topic with a plain reader (explicit
//! offsets, not the live consumer group), keeps the effective-history versions in memory
//! instead of re-reading them per batch, and writes each large batch in one transaction with
//! one position write per partition.
//!
//! The swap, in one transaction on the live database:
//! 1. lock the live tables (Postgres: `LOCK TABLE ... ACCESS EXCLUSIVE` in the order the
//!    worker takes them; SQLite: the database's write lock), so the live worker cannot commit;
//! 2. read the live positions and catch the shadow up to them, so the shadow is at least as
//!    far as the live read model on every partition (as far as the log goes);
//! 3. replace the live tables with the shadow's (Postgres: drop, then `SET SCHEMA`, a catalog
//!    change; SQLite: delete and copy from the attached shadow file, while readers keep
//!    seeing the old rows under WAL until the commit).
//!
//! The live worker's next batch then judges against the swapped-in tables, not its memory: its
//! claim on a partition (the runtime's fence, see `runtime`) checks the position and when it
//! was written, and fails after a swap, so the worker forgets what it remembers; what it
//! re-reads below the swapped-in positions is stale under the effective-history rule and
//! changes nothing. Where a live position was beyond the log's end (the log lost its tail, or
//! the topic was recreated), the shadow stands at the end instead, and the worker, which
//! stopped applying that partition, starts it again from there. An interrupted replay leaves
//! the shadow with its positions, so running it again resumes (unless the shadow is beyond the
//! log's end: it then starts afresh); the shadow is always a correct build up to its positions,
//! so even swapping it twice is harmless.
//!
//! A replay with filters (time range, event types, aggregate id) builds the shadow from the
//! selected events only. Such a shadow is not a whole read model, so it is never swapped in:
//! it is for `--dry-run` and `--diff` (which then compares only the rows the shadow has).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use event_log::{LogReader, LogRecord, ReadMode, SharedLog, topics};
use event_schema::{Envelope, judge};
use serde::Serialize;

use crate::ReadBackend;
use crate::db::{Db, DbError, Row, Value, value_rows};
use crate::runtime::{ApplyError, Event, Projection, migrate, park};

/// Tables of the runtime, swapped with the model's tables.
const RUNTIME_TABLES: [&str; 3] = ["applied_versions", "parked_events", "projection_positions"];
/// Tables of the shadow that are never swapped: the migrations' records (sqlx's, and those of
/// the platform's earlier runner in a database made by it) and the replay's own.
const SHADOW_ONLY: [&str; 3] = ["_sqlx_migrations", "schema_migrations", "replay_meta"];

/// Which events a replay applies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Filter {
    /// Only events that occurred at or after this time.
    pub from: Option<DateTime<Utc>>,
    /// Only events that occurred before this time.
    pub to: Option<DateTime<Utc>>,
    /// Only these event types (`order.placed`, ...); empty: all.
    pub event_types: Vec<String>,
    /// Only this aggregate's events.
    pub aggregate_id: Option<String>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.from.is_none()
            && self.to.is_none()
            && self.event_types.is_empty()
            && self.aggregate_id.is_none()
    }

    pub fn keeps(&self, envelope: &Envelope) -> bool {
        self.from.is_none_or(|from| envelope.occurred_at >= from)
            && self.to.is_none_or(|to| envelope.occurred_at < to)
            && (self.event_types.is_empty() || self.event_types.contains(&envelope.event_type))
            && self
                .aggregate_id
                .as_ref()
                .is_none_or(|id| *id == envelope.aggregate_id)
    }

    fn key(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// What a replay does.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub filter: Filter,
    /// Read the log and count what would be applied; write nothing.
    pub dry_run: bool,
    /// Build the shadow and compare it with the live read model; swap nothing.
    pub diff: bool,
    /// Throw away an interrupted replay's shadow instead of resuming it.
    pub restart: bool,
    /// Records per transaction.
    pub batch: usize,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            filter: Filter::default(),
            dry_run: false,
            diff: false,
            restart: false,
            batch: 25_000,
        }
    }
}

/// How far a replay has come, for progress bars.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Records read so far (of every topic of the projection).
    pub done: u64,
    /// Records to read (from the shadow's positions to the log's end when the replay started).
    pub total: u64,
}

/// A row that differs between the live read model and the shadow.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RowDiff {
    pub table: String,
    /// The primary key, `column=value` joined by `, `.
    pub key: String,
    /// The live row (`None`: missing from the live model).
    pub live: Option<BTreeMap<String, String>>,
    /// The rebuilt row (`None`: missing from the rebuild).
    pub replay: Option<BTreeMap<String, String>>,
}

/// What a replay of one projection did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    pub projection: String,
    /// Records read from the log.
    pub read: u64,
    /// Events applied (or, in a dry run, that would be).
    pub applied: u64,
    /// Effective events left out by the filter.
    pub filtered_out: u64,
    /// Records skipped by the effective-history rule.
    pub conflicts: u64,
    /// Events the projection could not apply (parked in the rebuild).
    pub parked: u64,
    /// Applied events per event type.
    pub by_type: BTreeMap<String, u64>,
    /// Records applied under the swap's lock to catch up with the live projection.
    pub caught_up: u64,
    /// The rebuild resumed an interrupted one.
    pub resumed: bool,
    pub swapped: bool,
    /// Rows that differ (with `diff`).
    pub differences: Vec<RowDiff>,
    pub seconds: f64,
}

impl ReplayReport {
    pub fn events_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.read as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Where a projection's shadow lives.
#[derive(Debug, Clone)]
enum Location {
    Postgres {
        url: String,
        live_schema: String,
        shadow_schema: String,
    },
    Sqlite {
        shadow_path: PathBuf,
    },
}

impl Location {
    fn of(backend: &ReadBackend, projection: &str) -> Location {
        match backend {
            ReadBackend::Postgres { url, schema_prefix } => Location::Postgres {
                url: url.clone(),
                live_schema: format!("{schema_prefix}{projection}"),
                shadow_schema: format!("{schema_prefix}{projection}_replay"),
            },
            ReadBackend::Sqlite { dir } => Location::Sqlite {
                shadow_path: dir.join(format!("{projection}.replay.db")),
            },
        }
    }
}

/// The rebuild's in-memory view of the effective history, kept across batches (a replay is
/// the only writer of its shadow).
#[derive(Debug, Default)]
struct History {
    versions: HashMap<(String, String), u64>,
    blocked: HashSet<(String, String)>,
    positions: BTreeMap<(String, u32), u64>,
}

/// Why a replay stopped; the log's or the database's error is the source.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Log(#[from] event_log::LogError),
    /// The replay was asked for something it cannot do, or the log stopped answering.
    #[error("{0}")]
    Refused(String),
}

/// Replays one projection. `live` is the live read model's database; `progress` is called
/// after every batch.
pub async fn replay(
    log: &SharedLog,
    backend: &ReadBackend,
    topic_prefix: &str,
    live: &Db,
    projection: Arc<dyn Projection>,
    options: &ReplayOptions,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<ReplayReport, ReplayError> {
    let started = Instant::now();
    let name = projection.name();
    let topics: Vec<String> = projection
        .aggregate_types()
        .iter()
        .map(|aggregate| topics::events(topic_prefix, aggregate))
        .collect();
    let mut report = ReplayReport {
        projection: name.to_owned(),
        ..ReplayReport::default()
    };
    if options.dry_run {
        dry_run(log, &topics, &options.filter, &mut report, progress).await?;
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    if !options.filter.is_empty() && !options.diff {
        return Err(ReplayError::Refused(
            "a filtered replay holds only the selected events, so it cannot replace the read model: add --diff or --dry-run".into(),
        ));
    }
    let location = Location::of(backend, name);
    let mut shadow = open_shadow(&location, live, projection.as_ref(), options).await?;
    let mut history = load_history(&shadow, name).await?;
    let ends = end_offsets(log, &topics).await?;
    if let Some(((topic, partition), next)) = history
        .positions
        .iter()
        .find(|(key, next)| ends.get(*key).is_some_and(|end| **next > *end))
    {
        // An interrupted rebuild of records the log no longer has (it lost its tail, or the
        // topic was recreated): start afresh.
        tracing::warn!(
            projection = name,
            topic,
            partition,
            next_offset = next,
            "the interrupted replay's shadow is beyond the log's end; starting afresh"
        );
        close(shadow).await;
        drop_shadow(&location, live).await?;
        shadow = open_shadow(&location, live, projection.as_ref(), options).await?;
        history = load_history(&shadow, name).await?;
    }
    report.resumed = !history.positions.is_empty();
    if !report.resumed {
        defer_indexes(&shadow, &location).await?;
    }

    let total: u64 = ends
        .iter()
        .map(|(key, end)| end.saturating_sub(history.positions.get(key).copied().unwrap_or(0)))
        .sum();
    let mut done = 0u64;
    progress(Progress { done, total });
    for topic in &topics {
        let targets: BTreeMap<u32, u64> = ends
            .iter()
            .filter(|((t, _), _)| t == topic)
            .map(|((_, partition), end)| (*partition, *end))
            .collect();
        read_into_shadow(
            log,
            &shadow,
            projection.as_ref(),
            topic,
            &targets,
            &options.filter,
            options.batch,
            &mut history,
            &mut report,
            &mut |read| {
                done += read;
                progress(Progress { done, total });
            },
        )
        .await?;
    }

    if options.diff {
        report.differences = diff(live, &shadow, !options.filter.is_empty()).await?;
        close(shadow).await;
        drop_shadow(&location, live).await?;
    } else {
        restore_indexes(&shadow, &location).await?;
        swap(
            log,
            &location,
            live,
            shadow,
            projection.as_ref(),
            &topics,
            &mut history,
            options.batch,
            &mut report,
        )
        .await?;
        report.swapped = true;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn close(db: Db) {
    match db {
        Db::Postgres(pool) => pool.close().await,
        Db::Sqlite(pool) => pool.close().await,
    }
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// Opens the shadow, resuming an interrupted replay with the same filter or starting afresh.
async fn open_shadow(
    location: &Location,
    live: &Db,
    projection: &dyn Projection,
    options: &ReplayOptions,
) -> Result<Db, DbError> {
    if options.restart {
        drop_shadow(location, live).await?;
    }
    let mut shadow = connect_shadow(location).await?;
    let wanted = options.filter.key();
    let existing = shadow
        .fetch_optional("SELECT value FROM replay_meta WHERE key = 'filter'", &[])
        .await
        .ok()
        .flatten()
        .map(|row| row.text("value"));
    if existing.as_deref().is_some_and(|filter| filter != wanted) {
        // A shadow built for another selection of events: start again.
        close(shadow).await;
        drop_shadow(location, live).await?;
        shadow = connect_shadow(location).await?;
    }
    migrate(&shadow, projection).await?;
    shadow
        .execute(
            "CREATE TABLE IF NOT EXISTS replay_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            &[],
        )
        .await?;
    shadow
        .execute(
            "INSERT INTO replay_meta (key, value) VALUES ('filter', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[wanted.into()],
        )
        .await?;
    Ok(shadow)
}

async fn connect_shadow(location: &Location) -> Result<Db, DbError> {
    match location {
        Location::Postgres {
            url, shadow_schema, ..
        } => Db::postgres(url, shadow_schema, 4).await,
        Location::Sqlite { shadow_path } => Db::sqlite_bulk(shadow_path).await,
    }
}

async fn drop_shadow(location: &Location, live: &Db) -> Result<(), DbError> {
    match location {
        Location::Postgres { shadow_schema, .. } => {
            live.execute(
                &format!("DROP SCHEMA IF EXISTS {} CASCADE", quote(shadow_schema)),
                &[],
            )
            .await?;
        }
        Location::Sqlite { shadow_path } => {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let mut path = shadow_path.clone().into_os_string();
                path.push(suffix);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => {
                        return Err(DbError::Other(format!("removing the shadow: {error}")));
                    }
                }
            }
        }
    }
    Ok(())
}

async fn load_history(shadow: &Db, name: &str) -> Result<History, DbError> {
    let mut history = History::default();
    for row in shadow
        .fetch_all(
            "SELECT aggregate_type, aggregate_id, version FROM applied_versions WHERE projection = $1",
            &[name.into()],
        )
        .await?
    {
        history.versions.insert(
            (row.text("aggregate_type"), row.text("aggregate_id")),
            row.int("version") as u64,
        );
    }
    for row in shadow
        .fetch_all(
            "SELECT DISTINCT aggregate_type, aggregate_id FROM parked_events
             WHERE projection = $1 AND status = 'parked'",
            &[name.into()],
        )
        .await?
    {
        history
            .blocked
            .insert((row.text("aggregate_type"), row.text("aggregate_id")));
    }
    for progress in crate::runtime::stored_positions(shadow, name).await? {
        history
            .positions
            .insert((progress.topic, progress.partition), progress.next_offset);
    }
    Ok(history)
}

async fn end_offsets(
    log: &SharedLog,
    topics: &[String],
) -> Result<BTreeMap<(String, u32), u64>, ReplayError> {
    let mut ends = BTreeMap::new();
    for topic in topics {
        let count = match log.partition_count(topic).await {
            Ok(count) => count,
            Err(event_log::LogError::UnknownTopic(_)) => continue,
            Err(error) => return Err(error.into()),
        };
        for partition in 0..count {
            let end = log.end_offset(topic, partition).await?;
            ends.insert((topic.clone(), partition), end);
        }
    }
    Ok(ends)
}

/// Reads `topic` from the shadow's positions until every partition reaches its target, and
/// applies it to the shadow in batches.
#[allow(clippy::too_many_arguments)]
async fn read_into_shadow(
    log: &SharedLog,
    shadow: &Db,
    projection: &dyn Projection,
    topic: &str,
    targets: &BTreeMap<u32, u64>,
    filter: &Filter,
    batch: usize,
    history: &mut History,
    report: &mut ReplayReport,
    on_batch: &mut (dyn FnMut(u64) + Send),
) -> Result<(), ReplayError> {
    let next: BTreeMap<u32, u64> = targets
        .keys()
        .map(|partition| {
            (
                *partition,
                history
                    .positions
                    .get(&(topic.to_owned(), *partition))
                    .copied()
                    .unwrap_or(0),
            )
        })
        .collect();
    let start: Vec<(u32, u64)> = next
        .iter()
        .filter(|(partition, offset)| targets.get(partition).is_some_and(|end| *offset < end))
        .map(|(partition, offset)| (*partition, *offset))
        .collect();
    if start.is_empty() {
        return Ok(());
    }
    let reader = log.open_reader(topic, &start, ReadMode::Bulk).await?;
    let batch = batch.max(1);
    // Reading and writing overlap: a task reads ahead (a few polls) while this one writes.
    let (sender, mut receiver) = tokio::sync::mpsc::channel(4);
    let feeder = AbortOnDrop(tokio::spawn(feed(
        reader,
        topic.to_owned(),
        next,
        targets.clone(),
        batch,
        sender,
    )));
    let mut pending: Vec<Read> = Vec::with_capacity(batch * 2);
    while let Some(records) = receiver.recv().await {
        pending.extend(records?);
        while pending.len() >= batch {
            let rest = pending.split_off(batch);
            let mut records = std::mem::replace(&mut pending, rest);
            apply_bulk(shadow, projection, &mut records, filter, history, report).await?;
            on_batch(records.len() as u64);
        }
    }
    drop(feeder);
    if !pending.is_empty() {
        apply_bulk(shadow, projection, &mut pending, filter, history, report).await?;
        on_batch(pending.len() as u64);
    }
    Ok(())
}

/// A record read, with its envelope decoded (or why it did not decode) by the reading task.
type Read = (LogRecord, Result<Envelope, String>);

/// Aborts a task when dropped (a replay that fails while writing stops its reader).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads `topic` until every partition has reached its target, sending what it reads; an error
/// (or a log that stops answering for a minute) is sent as the last message.
async fn feed(
    mut reader: Box<dyn LogReader>,
    topic: String,
    mut next: BTreeMap<u32, u64>,
    targets: BTreeMap<u32, u64>,
    batch: usize,
    sender: tokio::sync::mpsc::Sender<Result<Vec<Read>, ReplayError>>,
) {
    let mut idle_since = Instant::now();
    while next
        .iter()
        .any(|(partition, offset)| targets.get(partition).is_some_and(|end| offset < end))
    {
        let records = match reader.poll(batch, Duration::from_millis(200)).await {
            Ok(records) => records,
            Err(error) => {
                let _ = sender.send(Err(error.into())).await;
                return;
            }
        };
        if records.is_empty() {
            if idle_since.elapsed() > Duration::from_secs(60) {
                let _ = sender
                    .send(Err(ReplayError::Refused(format!(
                        "the log stopped answering while replaying {topic}"
                    ))))
                    .await;
                return;
            }
            continue;
        }
        idle_since = Instant::now();
        for record in &records {
            let offset = next.entry(record.position.partition).or_default();
            *offset = (*offset).max(record.position.offset + 1);
        }
        // Decoding here overlaps it with the writer's database work.
        let decoded: Vec<Read> = records
            .into_iter()
            .map(|record| {
                let envelope =
                    Envelope::try_from(&record.record).map_err(|error| error.to_string());
                (record, envelope)
            })
            .collect();
        if sender.send(Ok(decoded)).await.is_err() {
            return;
        }
    }
}

/// Secondary indexes that are not unique (so no upsert's conflict target depends on them) are
/// dropped while a fresh shadow is loaded and built once at the end: one sort per index
/// instead of an insert at a random place per row. Their definitions wait in `replay_meta`, so
/// an interrupted replay that resumes builds them when it finishes.
async fn defer_indexes(shadow: &Db, location: &Location) -> Result<(), DbError> {
    let (rows, schema) = match location {
        Location::Postgres { shadow_schema, .. } => (
            shadow
                .fetch_all(
                    "SELECT indexname::text AS name, indexdef AS definition FROM pg_indexes
                     WHERE schemaname = $1 AND indexdef NOT LIKE 'CREATE UNIQUE%'
                     ORDER BY indexname",
                    &[shadow_schema.as_str().into()],
                )
                .await?,
            Some(shadow_schema),
        ),
        Location::Sqlite { .. } => (
            shadow
                .fetch_all(
                    "SELECT name, sql AS definition FROM sqlite_master
                     WHERE type = 'index' AND sql IS NOT NULL AND sql NOT LIKE 'CREATE UNIQUE%'
                     ORDER BY name",
                    &[],
                )
                .await?,
            None,
        ),
    };
    let mut tx = shadow.begin().await?;
    for row in rows {
        let name = row.text("name");
        tx.execute(
            "INSERT INTO replay_meta (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[
                format!("index:{name}").into(),
                row.text("definition").into(),
            ],
        )
        .await?;
        let qualified = match schema {
            Some(schema) => format!("{}.{}", quote(schema), quote(&name)),
            None => quote(&name),
        };
        tx.run(&format!("DROP INDEX {qualified}")).await?;
    }
    tx.commit().await
}

/// Builds the indexes `defer_indexes` put aside.
async fn restore_indexes(shadow: &Db, location: &Location) -> Result<(), DbError> {
    let deferred = shadow
        .fetch_all(
            "SELECT key, value FROM replay_meta WHERE key LIKE 'index:%' ORDER BY key",
            &[],
        )
        .await?;
    for row in deferred {
        let mut tx = shadow.begin().await?;
        if matches!(location, Location::Postgres { .. }) {
            tx.run("SET LOCAL maintenance_work_mem = '256MB'").await?;
        }
        tx.run(&row.text("value")).await?;
        tx.execute(
            "DELETE FROM replay_meta WHERE key = $1",
            &[row.text("key").into()],
        )
        .await?;
        tx.commit().await?;
    }
    Ok(())
}

/// A transaction on the shadow. On Postgres its commit does not wait for the WAL flush: the
/// shadow can always be rebuilt, and a lost tail of batches is read again on resume (the
/// positions are lost with them).
async fn begin_bulk(shadow: &Db) -> Result<crate::db::Tx, DbError> {
    let mut tx = shadow.begin().await?;
    if shadow.is_postgres() {
        tx.run("SET LOCAL synchronous_commit = off").await?;
    }
    Ok(tx)
}

/// Applies one batch to the shadow in one transaction: the effective-history rule with the
/// in-memory versions, the filter, parking, the projection's own `apply`, then the applied
/// versions and one position per partition.
async fn apply_bulk(
    shadow: &Db,
    projection: &dyn Projection,
    records: &mut [Read],
    filter: &Filter,
    history: &mut History,
    report: &mut ReplayReport,
) -> Result<(), DbError> {
    let name = projection.name();
    let mut versions: HashMap<(String, String), u64> = HashMap::new();
    let mut blocked: HashSet<(String, String)> = HashSet::new();
    let mut effective: Vec<Event> = Vec::new();
    let mut parked: Vec<(usize, Option<Envelope>, String)> = Vec::new();
    let mut conflicts = 0;
    let mut filtered_out = 0;
    let mut at_of: Vec<usize> = Vec::new();
    for (index, (record, decoded)) in records.iter_mut().enumerate() {
        let envelope = match std::mem::replace(decoded, Err(String::new())) {
            Ok(envelope) => envelope,
            Err(error) => {
                parked.push((index, None, format!("undecodable: {error}")));
                continue;
            }
        };
        let aggregate = (
            envelope.aggregate_type.clone(),
            envelope.aggregate_id.clone(),
        );
        let last = versions
            .get(&aggregate)
            .or_else(|| history.versions.get(&aggregate))
            .copied()
            .unwrap_or(0);
        if !judge(last, envelope.aggregate_version).is_effective() {
            conflicts += 1;
            continue;
        }
        versions.insert(aggregate.clone(), envelope.aggregate_version);
        if !filter.keeps(&envelope) {
            filtered_out += 1;
            continue;
        }
        if blocked.contains(&aggregate) || history.blocked.contains(&aggregate) {
            parked.push((
                index,
                Some(envelope),
                "waiting behind a parked event of the same aggregate".into(),
            ));
            continue;
        }
        at_of.push(index);
        effective.push(Event {
            position: record.position.clone(),
            envelope,
        });
    }

    let mut tx = begin_bulk(shadow).await?;
    // A replay never applies an event twice, so an append-only model's rows cannot conflict:
    // COPY them (Postgres) instead of upserting.
    if let Some(rows) = projection.append_only_rows(&effective) {
        tx.copy_rows(rows.table, &rows.columns, &rows.rows).await?;
    } else {
        loop {
            match projection.apply(&mut tx, &effective).await {
                Ok(()) => break,
                Err(ApplyError::Db(error)) => return Err(error),
                Err(ApplyError::Poison { index, message }) => {
                    if index >= effective.len() {
                        return Err(DbError::Other(format!(
                            "projection {name} reported poison at a bad index"
                        )));
                    }
                    // The failed attempt may have written part of the batch: start it again.
                    drop(tx);
                    tx = begin_bulk(shadow).await?;
                    let poison = effective.remove(index);
                    let poison_at = at_of.remove(index);
                    let aggregate = (
                        poison.envelope.aggregate_type.clone(),
                        poison.envelope.aggregate_id.clone(),
                    );
                    blocked.insert(aggregate.clone());
                    parked.push((poison_at, Some(poison.envelope), message));
                    let mut kept = Vec::new();
                    let mut kept_at = Vec::new();
                    for (event, at) in effective.into_iter().zip(at_of) {
                        if at > poison_at
                            && event.envelope.aggregate_type == aggregate.0
                            && event.envelope.aggregate_id == aggregate.1
                        {
                            parked.push((
                                at,
                                Some(event.envelope),
                                "waiting behind a parked event of the same aggregate".into(),
                            ));
                        } else {
                            kept.push(event);
                            kept_at.push(at);
                        }
                    }
                    effective = kept;
                    at_of = kept_at;
                }
            }
        }
    }
    for (index, envelope, error) in &parked {
        if let Some(envelope) = envelope {
            blocked.insert((
                envelope.aggregate_type.clone(),
                envelope.aggregate_id.clone(),
            ));
        }
        park(&mut tx, name, &records[*index].0, envelope.as_ref(), error).await?;
    }
    let touched: Vec<(&(String, String), &u64)> = versions.iter().collect();
    for chunk in touched.chunks(500) {
        let mut args: Vec<Value> = Vec::with_capacity(chunk.len() * 4);
        for ((aggregate_type, aggregate_id), version) in chunk {
            args.extend([
                Value::from(name),
                aggregate_type.as_str().into(),
                aggregate_id.as_str().into(),
                (**version).into(),
            ]);
        }
        tx.execute(
            &format!(
                "INSERT INTO applied_versions (projection, aggregate_type, aggregate_id, version) VALUES {}
                 ON CONFLICT (projection, aggregate_type, aggregate_id) DO UPDATE SET version = excluded.version
                 WHERE applied_versions.version < excluded.version",
                value_rows(chunk.len(), 4, 1)
            ),
            &args,
        )
        .await?;
    }
    let mut reached: BTreeMap<(String, u32), u64> = BTreeMap::new();
    for (record, _) in records.iter() {
        let next = reached
            .entry((record.position.topic.clone(), record.position.partition))
            .or_default();
        *next = (*next).max(record.position.offset + 1);
    }
    for ((topic, partition), next) in &reached {
        tx.execute(
            "INSERT INTO projection_positions (projection, topic, partition, next_offset, updated_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (projection, topic, partition) DO UPDATE
             SET next_offset = excluded.next_offset, updated_at = excluded.updated_at
             WHERE projection_positions.next_offset < excluded.next_offset",
            &[
                name.into(),
                topic.as_str().into(),
                (*partition).into(),
                (*next).into(),
                Utc::now().timestamp_millis().into(),
            ],
        )
        .await?;
    }
    tx.commit().await?;

    // Committed: the batch's history becomes the replay's.
    history.versions.extend(versions);
    history.blocked.extend(blocked);
    for (key, next) in reached {
        let position = history.positions.entry(key).or_default();
        *position = (*position).max(next);
    }
    report.read += records.len() as u64;
    report.applied += effective.len() as u64;
    report.conflicts += conflicts;
    report.filtered_out += filtered_out;
    report.parked += parked.len() as u64;
    for event in &effective {
        *report
            .by_type
            .entry(event.envelope.event_type.clone())
            .or_default() += 1;
    }
    Ok(())
}

/// Counts what a replay would apply, per event type, writing nothing.
async fn dry_run(
    log: &SharedLog,
    topics: &[String],
    filter: &Filter,
    report: &mut ReplayReport,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<(), ReplayError> {
    let ends = end_offsets(log, topics).await?;
    let total: u64 = ends.values().sum();
    let mut versions: HashMap<(String, String), u64> = HashMap::new();
    let mut done = 0;
    progress(Progress { done, total });
    for topic in topics {
        let start: Vec<(u32, u64)> = ends
            .iter()
            .filter(|((t, _), end)| t == topic && **end > 0)
            .map(|((_, partition), _)| (*partition, 0))
            .collect();
        if start.is_empty() {
            continue;
        }
        let mut next: BTreeMap<u32, u64> = start.iter().copied().collect();
        let mut reader = log.reader(topic, &start).await?;
        let mut idle_since = Instant::now();
        while next
            .iter()
            .any(|(partition, offset)| *offset < ends[&(topic.clone(), *partition)])
        {
            let records = reader.poll(5000, Duration::from_millis(200)).await?;
            if records.is_empty() && idle_since.elapsed() > Duration::from_secs(60) {
                return Err(ReplayError::Refused(format!(
                    "the log stopped answering while reading {topic}"
                )));
            }
            idle_since = Instant::now();
            for record in &records {
                let offset = next.entry(record.position.partition).or_default();
                *offset = (*offset).max(record.position.offset + 1);
                report.read += 1;
                let Ok(envelope) = Envelope::try_from(&record.record) else {
                    report.parked += 1;
                    continue;
                };
                let aggregate = (
                    envelope.aggregate_type.clone(),
                    envelope.aggregate_id.clone(),
                );
                let last = versions.get(&aggregate).copied().unwrap_or(0);
                if !judge(last, envelope.aggregate_version).is_effective() {
                    report.conflicts += 1;
                    continue;
                }
                versions.insert(aggregate, envelope.aggregate_version);
                if !filter.keeps(&envelope) {
                    report.filtered_out += 1;
                    continue;
                }
                report.applied += 1;
                *report.by_type.entry(envelope.event_type).or_default() += 1;
            }
            done += records.len() as u64;
            progress(Progress { done, total });
        }
    }
    Ok(())
}

/// The tables to swap: every table of the shadow but its own bookkeeping, the model's first
/// and the runtime's in the order the live worker locks them.
async fn shadow_tables(shadow: &Db, location: &Location) -> Result<Vec<String>, DbError> {
    let rows = match location {
        Location::Postgres { shadow_schema, .. } => {
            shadow
                .fetch_all(
                    "SELECT table_name::text AS name FROM information_schema.tables
                     WHERE table_schema = $1 AND table_type = 'BASE TABLE' ORDER BY table_name",
                    &[shadow_schema.as_str().into()],
                )
                .await?
        }
        Location::Sqlite { .. } => {
            shadow
                .fetch_all(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
                    &[],
                )
                .await?
        }
    };
    let names: Vec<String> = rows
        .into_iter()
        .map(|row| row.text("name"))
        .filter(|name| !SHADOW_ONLY.contains(&name.as_str()))
        .collect();
    Ok(names)
}

/// Lock order, the worker's: projection_positions (a batch claims its partitions first), then
/// applied_versions, parked_events, the model's tables.
fn lock_order(tables: &[String]) -> Vec<String> {
    let mut ordered = vec![
        "projection_positions".to_owned(),
        "applied_versions".to_owned(),
        "parked_events".to_owned(),
    ];
    ordered.extend(
        tables
            .iter()
            .filter(|name| !RUNTIME_TABLES.contains(&name.as_str()))
            .cloned(),
    );
    ordered
}

#[allow(clippy::too_many_arguments)]
/// Catches the shadow up to `live` positions: reads each partition from the shadow's position
/// up to the live one, or up to the log's end where the live position is beyond it (the log
/// lost its tail, or the topic was recreated): the rebuild then replaces a read model built
/// from records the log no longer has, and the live worker reads again from the rebuild's
/// position.
async fn catch_up(
    log: &SharedLog,
    shadow: &Db,
    projection: &dyn Projection,
    topics: &[String],
    live: &[Row],
    history: &mut History,
    batch: usize,
    report: &mut ReplayReport,
) -> Result<(), ReplayError> {
    let before = report.read;
    let ends = end_offsets(log, topics).await?;
    for topic in topics {
        let targets: BTreeMap<u32, u64> = live
            .iter()
            .filter(|row| row.text("topic") == *topic)
            .map(|row| {
                let partition = row.int("partition") as u32;
                let live = row.int("next_offset") as u64;
                let end = ends
                    .get(&(topic.clone(), partition))
                    .copied()
                    .unwrap_or(live);
                if live > end {
                    tracing::warn!(
                        projection = projection.name(),
                        topic,
                        partition,
                        live,
                        end,
                        "the live position is beyond the log's end; the rebuild replaces it"
                    );
                }
                (partition, live.min(end))
            })
            .collect();
        read_into_shadow(
            log,
            shadow,
            projection,
            topic,
            &targets,
            &Filter::default(),
            batch,
            history,
            report,
            &mut |_| {},
        )
        .await?;
    }
    report.caught_up += report.read - before;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn swap(
    log: &SharedLog,
    location: &Location,
    live: &Db,
    shadow: Db,
    projection: &dyn Projection,
    topics: &[String],
    history: &mut History,
    batch: usize,
    report: &mut ReplayReport,
) -> Result<(), ReplayError> {
    let name = projection.name();
    let tables = lock_order(&shadow_tables(&shadow, location).await?);
    let positions_sql =
        "SELECT topic, partition, next_offset FROM projection_positions WHERE projection = $1";
    match (location, live) {
        (
            Location::Postgres {
                live_schema,
                shadow_schema,
                ..
            },
            Db::Postgres(_),
        ) => {
            let mut tx = live.begin().await?;
            tx.run("SET LOCAL lock_timeout = '30s'").await?;
            let list = tables
                .iter()
                .map(|table| format!("{}.{}", quote(live_schema), quote(table)))
                .collect::<Vec<_>>()
                .join(", ");
            tx.run(&format!("LOCK TABLE {list} IN ACCESS EXCLUSIVE MODE"))
                .await?;
            let positions = tx.fetch_all(positions_sql, &[name.into()]).await?;
            catch_up(
                log, &shadow, projection, topics, &positions, history, batch, report,
            )
            .await?;
            close(shadow).await;
            for table in &tables {
                tx.run(&format!(
                    "DROP TABLE {}.{}",
                    quote(live_schema),
                    quote(table)
                ))
                .await?;
                tx.run(&format!(
                    "ALTER TABLE {}.{} SET SCHEMA {}",
                    quote(shadow_schema),
                    quote(table),
                    quote(live_schema)
                ))
                .await?;
            }
            tx.run(&format!("DROP SCHEMA {} CASCADE", quote(shadow_schema)))
                .await?;
            tx.commit().await?;
        }
        (Location::Sqlite { shadow_path }, Db::Sqlite(pool)) => {
            use sqlx::{Connection, Executor};
            let mut connection = pool.acquire().await.map_err(DbError::from)?;
            let path = shadow_path.to_string_lossy().replace('\'', "''");
            connection
                .execute(format!("ATTACH DATABASE '{path}' AS replay").as_str())
                .await
                .map_err(DbError::from)?;
            let result = async {
                let mut tx = connection
                    .begin()
                    .await
                    .map_err(DbError::from)?;
                // A write takes the live file's write lock (and only that file's): the live
                // worker cannot commit until the swap does; readers keep their snapshots.
                sqlx::query("DELETE FROM main.projection_positions WHERE projection = ''")
                    .execute(&mut *tx)
                    .await
                    .map_err(DbError::from)?;
                let positions: Vec<Row> = sqlx::query(
                    "SELECT topic, partition, next_offset FROM main.projection_positions WHERE projection = ?1",
                )
                .bind(name)
                .fetch_all(&mut *tx)
                .await
                .map_err(DbError::from)?
                .iter()
                .map(|row| {
                    use sqlx::Row as _;
                    Row {
                        columns: vec![
                            ("topic".into(), Value::Text(row.get::<String, _>(0))),
                            ("partition".into(), Value::Int(row.get::<i64, _>(1))),
                            ("next_offset".into(), Value::Int(row.get::<i64, _>(2))),
                        ],
                    }
                })
                .collect();
                catch_up(log, &shadow, projection, topics, &positions, history, batch, report)
                    .await?;
                close(shadow).await;
                for table in &tables {
                    (&mut *tx)
                        .execute(format!("DELETE FROM main.{}", quote(table)).as_str())
                        .await
                        .map_err(DbError::from)?;
                    (&mut *tx)
                        .execute(
                            format!("INSERT INTO main.{0} SELECT * FROM replay.{0}", quote(table))
                                .as_str(),
                        )
                        .await
                    .map_err(DbError::from)?;
                }
                tx.commit()
                    .await
                    .map_err(|error| ReplayError::Db(error.into()))
            }
            .await;
            let _ = connection.execute("DETACH DATABASE replay").await;
            result?;
            drop(connection);
            drop_shadow(location, live).await?;
        }
        _ => {
            return Err(ReplayError::Refused(
                "the shadow and the live model are on different databases".into(),
            ));
        }
    }
    Ok(())
}

/// The primary-key columns of a table, in key order.
async fn primary_key(db: &Db, table: &str) -> Result<Vec<String>, DbError> {
    let rows = if db.is_postgres() {
        db.fetch_all(
            "SELECT a.attname::text AS name FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
             WHERE i.indrelid = to_regclass($1) AND i.indisprimary
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[quote(table).into()],
        )
        .await?
    } else {
        db.fetch_all(
            "SELECT name FROM pragma_table_info($1) WHERE pk > 0 ORDER BY pk",
            &[table.into()],
        )
        .await?
    };
    let columns: Vec<String> = rows.into_iter().map(|row| row.text("name")).collect();
    if columns.is_empty() {
        return Err(DbError::Other(format!("table {table} has no primary key")));
    }
    Ok(columns)
}

fn render(row: &Row) -> BTreeMap<String, String> {
    row.columns
        .iter()
        .map(|(name, value)| {
            let text = match value {
                Value::Int(value) => value.to_string(),
                Value::Text(value) => value.clone(),
                Value::Null => "null".into(),
            };
            (name.clone(), text)
        })
        .collect()
}

/// Compares every model table of the shadow with the live one, row for row by primary key.
/// With `shadow_keys_only`, rows missing from the shadow are not differences (a filtered
/// rebuild holds only some rows).
pub async fn diff(live: &Db, shadow: &Db, shadow_keys_only: bool) -> Result<Vec<RowDiff>, DbError> {
    let location_tables = if shadow.is_postgres() {
        shadow
            .fetch_all(
                "SELECT table_name::text AS name FROM information_schema.tables
                 WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY table_name",
                &[],
            )
            .await?
    } else {
        shadow
            .fetch_all(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
                &[],
            )
            .await?
    };
    let mut differences = Vec::new();
    for table in location_tables.into_iter().map(|row| row.text("name")) {
        if SHADOW_ONLY.contains(&table.as_str()) || RUNTIME_TABLES.contains(&table.as_str()) {
            continue;
        }
        let key = primary_key(shadow, &table).await?;
        let order = key
            .iter()
            .map(|column| quote(column))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!("SELECT * FROM {} ORDER BY {order}", quote(&table));
        let keyed = |rows: Vec<Row>| -> BTreeMap<String, BTreeMap<String, String>> {
            rows.iter()
                .map(|row| {
                    let rendered = render(row);
                    let id = key
                        .iter()
                        .map(|column| {
                            format!(
                                "{column}={}",
                                rendered.get(column).cloned().unwrap_or_default()
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ");
                    (id, rendered)
                })
                .collect()
        };
        let live_rows = keyed(live.fetch_all(&sql, &[]).await?);
        let shadow_rows = keyed(shadow.fetch_all(&sql, &[]).await?);
        let keys: std::collections::BTreeSet<&String> =
            live_rows.keys().chain(shadow_rows.keys()).collect();
        for id in keys {
            let (live_row, shadow_row) = (live_rows.get(id), shadow_rows.get(id));
            if live_row == shadow_row || (shadow_keys_only && shadow_row.is_none()) {
                continue;
            }
            differences.push(RowDiff {
                table: table.clone(),
                key: id.clone(),
                live: live_row.cloned(),
                replay: shadow_row.cloned(),
            });
        }
    }
    Ok(differences)
}
