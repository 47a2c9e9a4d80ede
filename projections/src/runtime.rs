//! The projection runtime: one consumer group per projection; each batch of records is applied
//! in one database transaction that also writes the positions reached, so a crash or a
//! redelivery can never apply an event twice or skip one. On every assignment the worker seeks
//! to the positions stored with the rows, never to Kafka's committed offsets.
//!
//! Within a batch: records are decoded; the effective-history rule is applied with the last
//! applied version of each aggregate, stored in `applied_versions` in the same database (a
//! duplicate or conflicting record changes nothing); events of an aggregate that has a parked
//! event wait behind it (parked too); the projection applies the rest. An event the projection
//! cannot apply is parked with its error and the batch goes on without it.
//!
//! A worker remembers the versions it has committed ([`Known`]), so a batch reads from
//! `applied_versions` only the aggregates the worker has not met. The memory is checked, not
//! trusted: every version a batch writes must advance the stored one, and a batch where one does
//! not (another member or a replay moved it on) is rolled back and judged again from the
//! database.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use event_log::{GroupEvent, LogRecord, Position, SharedLog};
use event_schema::{Envelope, judge};
use serde::Serialize;
use tokio::sync::watch;

use crate::db::{Db, DbError, Tx, Value};
use crate::models::{Kind, fetch_for_keys, write_rows};

/// The most records a worker applies in one transaction.
pub const MAX_BATCH: usize = 10_000;

/// The most aggregate versions a worker remembers; past it, it forgets them all and reads them
/// again as it meets them.
const KNOWN_LIMIT: usize = 250_000;

/// Up to this many aggregates with a parked event, a worker reads them all before each batch
/// (one short query on a partial index); with more, it looks up the batch's aggregates.
const PARKED_LISTED: usize = 1000;

/// Why a projection could not apply a batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApplyError {
    /// The event at `index` cannot be applied (whatever is retried); nothing was written.
    #[error("event {index} cannot be applied: {message}")]
    Poison { index: usize, message: String },
    /// The database failed; the batch is retried.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A read model fed by events.
///
/// Implementations must check every event before writing anything (so a poison event is
/// reported with nothing half-applied), must write only through the transaction they are given,
/// and must not read another service's tables.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// The projection's name (its consumer group and its rows in the shared tables).
    fn name(&self) -> &'static str;
    /// The aggregate types whose events it consumes.
    fn aggregate_types(&self) -> &'static [&'static str];
    /// Its tables, as ordered migrations; each runs once, and is never edited once released.
    fn migrations(&self) -> &'static [&'static str];
    /// Applies effective events, in log order per aggregate.
    async fn apply(&self, tx: &mut Tx, events: &[Event]) -> Result<(), ApplyError>;
    /// For a model whose `apply` only inserts one row per event into one table, keyed so that
    /// only a redelivered event could conflict (the audit): that table and the rows. A replay,
    /// which never applies an event twice, then writes them by COPY instead of calling `apply`.
    fn append_only_rows(&self, _events: &[Event]) -> Option<AppendOnlyRows> {
        None
    }
}

/// Rows a replay may COPY into `table` (see [`Projection::append_only_rows`]).
#[derive(Debug, Clone)]
pub struct AppendOnlyRows {
    pub table: &'static str,
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<crate::db::Value>>,
}

/// An effective event with where it was read.
#[derive(Debug, Clone)]
pub struct Event {
    pub position: event_log::Position,
    pub envelope: Envelope,
}

/// The runtime's own tables, in every read-model database.
const RUNTIME_MIGRATION: &str = r#"
-- The projection runtime's bookkeeping, kept in the same database as the read models so that
-- rows, positions and versions always change in one transaction.
CREATE TABLE IF NOT EXISTS projection_positions (
    projection TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition BIGINT NOT NULL,
    next_offset BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (projection, topic, partition)
);
CREATE TABLE IF NOT EXISTS applied_versions (
    projection TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    PRIMARY KEY (projection, aggregate_type, aggregate_id)
);
CREATE TABLE IF NOT EXISTS parked_events (
    projection TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition BIGINT NOT NULL,
    "offset" BIGINT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    aggregate_version BIGINT NOT NULL,
    event_type TEXT NOT NULL,
    error TEXT NOT NULL,
    record TEXT NOT NULL,
    parked_at BIGINT NOT NULL,
    status TEXT NOT NULL,
    PRIMARY KEY (projection, topic, partition, "offset")
);
CREATE INDEX IF NOT EXISTS parked_events_by_aggregate
    ON parked_events (projection, aggregate_type, aggregate_id, status);
"#;

/// The events still parked, which a worker lists before each batch.
const RUNTIME_MIGRATION_2: &str = r#"
CREATE INDEX IF NOT EXISTS parked_events_waiting
    ON parked_events (projection, aggregate_type, aggregate_id) WHERE status = 'parked'
"#;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Runs the runtime's and the projection's migrations that have not run yet.
pub async fn migrate(db: &Db, projection: &dyn Projection) -> Result<(), DbError> {
    crate::db::migrate(db, "runtime", &[RUNTIME_MIGRATION, RUNTIME_MIGRATION_2]).await?;
    crate::db::migrate(db, projection.name(), projection.migrations()).await
}

/// Where a projection stands on one partition.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PartitionProgress {
    pub topic: String,
    pub partition: u32,
    /// The next offset to apply (everything before it is applied).
    pub next_offset: u64,
}

/// What a worker shares with the query side and the health checks.
#[derive(Debug, Default)]
pub struct WorkerState {
    /// Positions reached, per (topic, partition), for the partitions this worker holds.
    positions: Mutex<BTreeMap<(String, u32), u64>>,
    changed: Mutex<Option<watch::Sender<u64>>>,
    conflicts: std::sync::atomic::AtomicU64,
    parked: std::sync::atomic::AtomicU64,
    applied: std::sync::atomic::AtomicU64,
    known: Mutex<Known>,
}

/// The last versions a worker has committed, per aggregate type and id, so that a batch reads
/// only the aggregates the worker has not met. Forgotten on every assignment change, every
/// failed batch, and past [`KNOWN_LIMIT`]. It cannot make a batch apply an event twice: each
/// version a batch writes must advance the stored one (see [`Worker::apply_batch`]).
#[derive(Debug, Default)]
struct Known {
    versions: HashMap<String, HashMap<String, u64>>,
    len: usize,
    /// Partitions this worker started at offset 0 (nothing of theirs applied) and has held since
    /// without forgetting: an aggregate of theirs that is not in `versions` has no version yet.
    fresh: HashMap<String, HashSet<u32>>,
}

impl Known {
    fn forget(&mut self) {
        *self = Known::default();
    }

    /// The aggregate's last applied version, when known without reading the database.
    fn version(&self, aggregate_type: &str, aggregate_id: &str, read_at: &Position) -> Option<u64> {
        self.versions
            .get(aggregate_type)
            .and_then(|ids| ids.get(aggregate_id))
            .copied()
            .or_else(|| {
                self.fresh
                    .get(&read_at.topic)
                    .is_some_and(|partitions| partitions.contains(&read_at.partition))
                    .then_some(0)
            })
    }

    fn remember(&mut self, aggregate_type: &str, aggregate_id: &str, version: u64) {
        let ids = match self.versions.get_mut(aggregate_type) {
            Some(ids) => ids,
            None => self.versions.entry(aggregate_type.to_owned()).or_default(),
        };
        if ids.insert(aggregate_id.to_owned(), version).is_none() {
            self.len += 1;
        }
        if self.len > KNOWN_LIMIT {
            self.forget();
        }
    }
}

/// Why a batch was not applied.
#[derive(Debug)]
enum BatchError {
    Db(DbError),
    /// A stored version did not advance: it moved on without this worker.
    VersionsMoved,
}

impl From<DbError> for BatchError {
    fn from(error: DbError) -> Self {
        BatchError::Db(error)
    }
}

impl WorkerState {
    fn notify(&self) {
        if let Ok(changed) = self.changed.lock()
            && let Some(sender) = changed.as_ref()
        {
            sender.send_modify(|count| *count += 1);
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        let mut changed = self
            .changed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        changed
            .get_or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    pub fn positions(&self) -> Vec<PartitionProgress> {
        self.positions
            .lock()
            .map(|positions| {
                positions
                    .iter()
                    .map(|((topic, partition), next_offset)| PartitionProgress {
                        topic: topic.clone(),
                        partition: *partition,
                        next_offset: *next_offset,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn conflicts(&self) -> u64 {
        self.conflicts.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn parked(&self) -> u64 {
        self.parked.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn applied(&self) -> u64 {
        self.applied.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Reads the stored positions of a projection.
pub async fn stored_positions(
    db: &Db,
    projection: &str,
) -> Result<Vec<PartitionProgress>, DbError> {
    Ok(db
        .fetch_all(
            "SELECT topic, partition, next_offset FROM projection_positions WHERE projection = $1 ORDER BY topic, partition",
            &[projection.into()],
        )
        .await?
        .into_iter()
        .map(|row| PartitionProgress {
            topic: row.text("topic"),
            partition: row.int("partition") as u32,
            next_offset: row.int("next_offset") as u64,
        })
        .collect())
}

/// One projection's worker: a member of the projection's consumer group.
pub struct Worker {
    pub log: SharedLog,
    pub db: Db,
    pub projection: Arc<dyn Projection>,
    pub topics: Vec<String>,
    pub group: String,
    pub state: Arc<WorkerState>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Worker({})", self.projection.name())
    }
}

impl Worker {
    /// Consumes until `shutdown` turns true. Database or log failures are retried; a batch is
    /// applied whole or not at all.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let name = self.projection.name();
        let mut member = loop {
            match self.log.join_group(&self.group, &self.topics).await {
                Ok(member) => break member,
                Err(error) => {
                    tracing::warn!(projection = name, %error, "cannot join the consumer group; retrying");
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        // What the member said while the previous batch was being applied (the next poll
        // overlaps the database work, so the log is read while Postgres writes).
        let mut ahead: Option<Result<GroupEvent, event_log::LogError>> = None;
        loop {
            let polled = match ahead.take() {
                Some(polled) => polled,
                None => tokio::select! {
                    _ = shutdown.changed() => break,
                    polled = member.poll(MAX_BATCH, Duration::from_millis(100)) => polled,
                },
            };
            let event = match polled {
                Ok(event) => event,
                Err(error) => {
                    tracing::warn!(projection = name, %error, "polling the log failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            match event {
                GroupEvent::Assigned(partitions) => {
                    self.state.known().forget();
                    for (topic, partition) in partitions {
                        let next = loop {
                            match self.stored_position(&topic, partition).await {
                                Ok(next) => break next,
                                Err(error) => {
                                    tracing::warn!(projection = name, %error, "cannot read the stored position; retrying");
                                    tokio::time::sleep(Duration::from_millis(500)).await;
                                }
                            }
                        };
                        if let Err(error) = member.start(&topic, partition, next).await {
                            tracing::warn!(projection = name, %error, topic, partition, "cannot start the partition");
                            continue;
                        }
                        if next == 0 {
                            self.state
                                .known()
                                .fresh
                                .entry(topic.clone())
                                .or_default()
                                .insert(partition);
                        }
                        if let Ok(mut positions) = self.state.positions.lock() {
                            positions.insert((topic.clone(), partition), next);
                        }
                        tracing::info!(
                            projection = name,
                            topic,
                            partition,
                            next_offset = next,
                            "partition assigned"
                        );
                    }
                    self.state.notify();
                }
                GroupEvent::Revoked(partitions) => {
                    self.state.known().forget();
                    if let Ok(mut positions) = self.state.positions.lock() {
                        for partition in &partitions {
                            positions.remove(partition);
                        }
                    }
                    tracing::info!(projection = name, ?partitions, "partitions revoked");
                }
                GroupEvent::Records(records) if records.is_empty() => {}
                GroupEvent::Records(records) => {
                    // Assignment changes polled meanwhile are handled after this batch
                    // commits, in the order the member reported them.
                    let (applied, next) = tokio::join!(
                        self.apply_until_done(&records, &mut shutdown),
                        member.poll(MAX_BATCH, Duration::from_millis(100))
                    );
                    if !applied {
                        return;
                    }
                    ahead = Some(next);
                }
            }
        }
    }

    /// Applies a batch, retrying with backoff while the database fails; false when shutdown
    /// came first.
    async fn apply_until_done(
        &self,
        records: &[LogRecord],
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.apply_batch(records).await {
                Ok(()) => return true,
                Err(error) => {
                    tracing::warn!(projection = self.projection.name(), %error, "applying a batch failed; retrying");
                    tokio::select! {
                        _ = shutdown.changed() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn stored_position(&self, topic: &str, partition: u32) -> Result<u64, DbError> {
        Ok(self
            .db
            .fetch_optional(
                "SELECT next_offset FROM projection_positions WHERE projection = $1 AND topic = $2 AND partition = $3",
                &[self.projection.name().into(), topic.into(), partition.into()],
            )
            .await?
            .map(|row| row.int("next_offset") as u64)
            .unwrap_or(0))
    }

    /// Applies one batch in one transaction, with its positions. When a stored version has moved
    /// on without this worker, the batch is rolled back and judged again from the database.
    pub async fn apply_batch(&self, records: &[LogRecord]) -> Result<(), DbError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match self.try_apply_batch(records).await {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            self.state.known().forget();
            match error {
                BatchError::Db(error) => return Err(error),
                BatchError::VersionsMoved if attempt < 3 => tracing::info!(
                    projection = self.projection.name(),
                    "applied versions moved on without this worker; judging the batch again from the database"
                ),
                BatchError::VersionsMoved => {
                    return Err(DbError(
                        "applied versions keep moving on without this worker (another member of its group applying the same partitions?)".into(),
                    ));
                }
            }
        }
    }

    async fn try_apply_batch(&self, records: &[LogRecord]) -> Result<(), BatchError> {
        let name = self.projection.name();
        let mut tx = self.db.begin().await?;
        let mut decoded: Vec<Result<Envelope, String>> = records
            .iter()
            .map(|record| Envelope::try_from(&record.record).map_err(|error| error.to_string()))
            .collect();

        // Last applied versions: remembered, or read per aggregate type for the aggregates this
        // worker has not met (one query each, using the table's key in full).
        let mut versions: HashMap<(String, String), u64> = HashMap::new();
        let mut ids: BTreeMap<&str, HashSet<&str>> = BTreeMap::new();
        let mut unknown: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        {
            let known = self.state.known();
            for (record, envelope) in records.iter().zip(&decoded) {
                let Ok(envelope) = envelope else { continue };
                let (kind, id) = (
                    envelope.aggregate_type.as_str(),
                    envelope.aggregate_id.as_str(),
                );
                if !ids.entry(kind).or_default().insert(id) {
                    continue;
                }
                match known.version(kind, id, &record.position) {
                    Some(version) => {
                        versions.insert((kind.to_owned(), id.to_owned()), version);
                    }
                    None => unknown.entry(kind).or_default().push(id.to_owned()),
                }
            }
        }
        for (aggregate_type, ids) in &unknown {
            for row in fetch_for_keys(
                &mut tx,
                "SELECT aggregate_id, version FROM applied_versions
                 WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id {keys}",
                &[name.into(), (*aggregate_type).into()],
                ids,
            )
            .await?
            {
                versions.insert(
                    ((*aggregate_type).to_owned(), row.text("aggregate_id")),
                    row.int("version") as u64,
                );
            }
        }

        // Which aggregates have a stored version (a row in `applied_versions`) before this batch.
        let stored: HashSet<(String, String)> = versions
            .iter()
            .filter(|(_, version)| **version > 0)
            .map(|(aggregate, _)| aggregate.clone())
            .collect();

        // Aggregates with a parked event: all of the projection's while there are few (the usual
        // case: none), else those of the batch.
        let mut blocked: HashSet<(String, String)> = HashSet::new();
        let waiting = tx
            .fetch_all(
                "SELECT DISTINCT aggregate_type, aggregate_id FROM parked_events
                 WHERE projection = $1 AND status = 'parked' LIMIT $2",
                &[name.into(), (PARKED_LISTED as u64 + 1).into()],
            )
            .await?;
        if waiting.len() <= PARKED_LISTED {
            blocked.extend(
                waiting
                    .iter()
                    .map(|row| (row.text("aggregate_type"), row.text("aggregate_id"))),
            );
        } else {
            for (aggregate_type, ids) in &ids {
                let ids: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
                for row in fetch_for_keys(
                    &mut tx,
                    "SELECT DISTINCT aggregate_id FROM parked_events
                     WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id {keys} AND status = 'parked'",
                    &[name.into(), (*aggregate_type).into()],
                    &ids,
                )
                .await?
                {
                    blocked.insert(((*aggregate_type).to_owned(), row.text("aggregate_id")));
                }
            }
        }
        drop(ids);

        // The effective events, in log order; what is parked, with why.
        let mut effective: Vec<(usize, Event)> = Vec::with_capacity(records.len());
        let mut parked: Vec<(usize, String, Option<Envelope>)> = Vec::new();
        let mut touched: HashSet<(String, String)> = HashSet::new();
        let mut conflicts = 0;
        for (index, record) in records.iter().enumerate() {
            let envelope = match std::mem::replace(&mut decoded[index], Err(String::new())) {
                Ok(envelope) => envelope,
                Err(error) => {
                    parked.push((index, format!("undecodable: {error}"), None));
                    continue;
                }
            };
            let aggregate = (
                envelope.aggregate_type.clone(),
                envelope.aggregate_id.clone(),
            );
            let last = versions.get(&aggregate).copied().unwrap_or(0);
            let verdict = judge(last, envelope.aggregate_version);
            if !verdict.is_effective() {
                conflicts += 1;
                tracing::info!(projection = name, position = %record.position, ?verdict, "record skipped by the effective-history rule");
                continue;
            }
            versions.insert(aggregate.clone(), envelope.aggregate_version);
            if blocked.contains(&aggregate) {
                touched.insert(aggregate);
                parked.push((
                    index,
                    "waiting behind a parked event of the same aggregate".into(),
                    Some(envelope),
                ));
                continue;
            }
            touched.insert(aggregate);
            effective.push((
                index,
                Event {
                    position: record.position.clone(),
                    envelope,
                },
            ));
        }

        // Apply; a poison event is parked, with every later event of its aggregate.
        let mut events: Vec<Event> = Vec::new();
        let mut at: Vec<usize> = Vec::new();
        for (index, event) in effective {
            at.push(index);
            events.push(event);
        }
        loop {
            match self.projection.apply(&mut tx, &events).await {
                Ok(()) => break,
                Err(ApplyError::Db(error)) => return Err(error.into()),
                Err(ApplyError::Poison { index, message }) => {
                    if index >= events.len() {
                        return Err(DbError(format!(
                            "projection {name} reported poison at a bad index"
                        ))
                        .into());
                    }
                    // Nothing of the failed attempt may stay: the projection checks before it
                    // writes, so its transaction is still clean.
                    let poison_at = at.remove(index);
                    let poison = events.remove(index).envelope;
                    tracing::warn!(projection = name, position = %records[poison_at].position, event_type = %poison.event_type, %message, "event parked");
                    let mut kept_at = Vec::with_capacity(at.len());
                    let mut kept = Vec::with_capacity(events.len());
                    for (index, event) in at.drain(..).zip(events.drain(..)) {
                        if index > poison_at
                            && event.envelope.aggregate_type == poison.aggregate_type
                            && event.envelope.aggregate_id == poison.aggregate_id
                        {
                            parked.push((
                                index,
                                "waiting behind a parked event of the same aggregate".into(),
                                Some(event.envelope),
                            ));
                        } else {
                            kept_at.push(index);
                            kept.push(event);
                        }
                    }
                    parked.push((poison_at, message, Some(poison)));
                    at = kept_at;
                    events = kept;
                }
            }
        }

        // Park, record versions and positions, commit.
        parked.sort_by_key(|(index, _, _)| *index);
        for (index, error, envelope) in &parked {
            park(&mut tx, name, &records[*index], envelope.as_ref(), error).await?;
        }
        let advanced: Vec<((String, String), u64)> = touched
            .into_iter()
            .map(|aggregate| {
                let version = versions[&aggregate];
                (aggregate, version)
            })
            .collect();
        let mut rows: Vec<Vec<Value>> = Vec::new();
        let mut new_rows: Vec<Vec<Value>> = Vec::new();
        for (aggregate, version) in &advanced {
            let row = vec![
                name.into(),
                aggregate.0.as_str().into(),
                aggregate.1.as_str().into(),
                (*version).into(),
            ];
            if stored.contains(aggregate) {
                rows.push(row);
            } else {
                new_rows.push(row);
            }
        }
        // Aggregates with no stored version get their first row by COPY (cheaper than an upsert).
        // Should one have a row after all, the savepoint undoes the COPY and they join the
        // checked upsert below.
        if let Some(refused) = tx
            .copy_rows_or_undo(
                "applied_versions",
                &["projection", "aggregate_type", "aggregate_id", "version"],
                &new_rows,
            )
            .await?
        {
            tracing::info!(projection = name, error = %refused, "a first applied version exists already; writing them with the checked upsert");
            rows.extend(new_rows);
        }
        // Each must advance the stored version: one that does not moved on without this worker
        // (its memory, or its read under another member's commit, is out of date), and this
        // batch's judgement with it.
        let written = write_rows(
            &mut tx,
            "applied_versions",
            &[
                ("projection", Kind::Text),
                ("aggregate_type", Kind::Text),
                ("aggregate_id", Kind::Text),
                ("version", Kind::Int),
            ],
            &rows,
            "ON CONFLICT (projection, aggregate_type, aggregate_id) DO UPDATE SET version = excluded.version
             WHERE applied_versions.version < excluded.version",
        )
        .await?;
        if written != rows.len() as u64 {
            return Err(BatchError::VersionsMoved);
        }
        let mut reached: BTreeMap<(String, u32), u64> = BTreeMap::new();
        for record in records {
            let next = reached
                .entry((record.position.topic.clone(), record.position.partition))
                .or_default();
            *next = (*next).max(record.position.offset + 1);
        }
        let now = now_ms();
        let rows: Vec<Vec<Value>> = reached
            .iter()
            .map(|((topic, partition), next)| {
                vec![
                    name.into(),
                    topic.as_str().into(),
                    (*partition).into(),
                    (*next).into(),
                    now.into(),
                ]
            })
            .collect();
        write_rows(
            &mut tx,
            "projection_positions",
            &[
                ("projection", Kind::Text),
                ("topic", Kind::Text),
                ("partition", Kind::Int),
                ("next_offset", Kind::Int),
                ("updated_at", Kind::Int),
            ],
            &rows,
            "ON CONFLICT (projection, topic, partition) DO UPDATE
             SET next_offset = excluded.next_offset, updated_at = excluded.updated_at
             WHERE projection_positions.next_offset < excluded.next_offset",
        )
        .await?;
        tx.commit().await?;

        use std::sync::atomic::Ordering::Relaxed;
        self.state.conflicts.fetch_add(conflicts, Relaxed);
        self.state.parked.fetch_add(parked.len() as u64, Relaxed);
        self.state.applied.fetch_add(events.len() as u64, Relaxed);
        {
            let mut known = self.state.known();
            for ((aggregate_type, aggregate_id), version) in &advanced {
                known.remember(aggregate_type, aggregate_id, *version);
            }
        }
        if let Ok(mut positions) = self.state.positions.lock() {
            for (key, next) in reached {
                positions.insert(key, next);
            }
        }
        self.state.notify();
        Ok(())
    }
}

/// `<prefix>.<aggregate>.events` → `<aggregate>`.
/// Writes a record a projection could not apply into `parked_events` (once per position), with
/// what the envelope says of it, or what the record itself says when it did not decode. Shared by
/// the live worker and the replay's bulk path.
pub(crate) async fn park(
    tx: &mut Tx,
    projection: &str,
    record: &LogRecord,
    envelope: Option<&Envelope>,
    error: &str,
) -> Result<(), DbError> {
    let (aggregate_type, aggregate_id, version, event_type, body) = match envelope {
        Some(envelope) => (
            envelope.aggregate_type.clone(),
            envelope.aggregate_id.clone(),
            envelope.aggregate_version as i64,
            envelope.event_type.clone(),
            envelope.to_json().to_string(),
        ),
        None => (
            aggregate_type_of(&record.position.topic),
            record.record.key.clone(),
            0,
            record
                .record
                .header("ce_type")
                .unwrap_or("unknown")
                .to_owned(),
            String::from_utf8_lossy(&record.record.value).into_owned(),
        ),
    };
    tx.execute(
        r#"INSERT INTO parked_events (projection, topic, partition, "offset", aggregate_type, aggregate_id,
               aggregate_version, event_type, error, record, parked_at, status)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'parked')
           ON CONFLICT (projection, topic, partition, "offset") DO NOTHING"#,
        &[
            projection.into(),
            record.position.topic.as_str().into(),
            record.position.partition.into(),
            record.position.offset.into(),
            aggregate_type.into(),
            aggregate_id.into(),
            version.into(),
            event_type.into(),
            error.into(),
            body.into(),
            now_ms().into(),
        ],
    )
    .await?;
    Ok(())
}

fn aggregate_type_of(topic: &str) -> String {
    topic
        .strip_suffix(".events")
        .and_then(|rest| rest.rsplit('.').next())
        .unwrap_or("unknown")
        .to_owned()
}
