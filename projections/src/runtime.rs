//! The projection runtime: one consumer group per projection; each batch of records is applied
//! in one database transaction that also writes the positions reached, so a crash, a
//! redelivery or a worker that lost its partitions can never apply an event twice or skip one.
//! On every assignment the worker seeks to the positions stored with the rows, never to Kafka's
//! committed offsets.
//!
//! # The fence
//! A batch's transaction opens by claiming each partition of the batch, in order: a conditional
//! write of its position in `projection_positions` that succeeds only where the stored next
//! offset is the batch's first offset of that partition (and, where the worker would judge by
//! its memory, only where this worker's last commit wrote it: `updated_at` is checked too), and
//! moves it past the batch. It is the batch's only write of its positions. The claim holds the
//! row's lock (Postgres) or the database's write lock (SQLite) until the commit, so a concurrent
//! batch of the same partition waits for it and then fails its own claim. A failed claim means
//! the partition moved without this worker (another member applied it after a rebalance or a
//! pause past the session timeout, a replay swapped a rebuild in). The worker forgets what it
//! remembers and reads the stored position in the same transaction:
//! - at or past the batch's first offset: it claims the partition from there and judges the
//!   whole batch against the database, where everything below that position is applied, so
//!   those records are stale and only the rest can count;
//! - behind the batch (a rebuild that stands before it), or beyond the log's end: that
//!   partition's records are left out ([`Applied::restart`]), and the worker starts it again as
//!   on assignment, reading the log from the stored position after the check below.
//!
//! Within a batch: records are decoded; the effective-history rule is applied with the last
//! applied version of each aggregate, stored in `applied_versions` in the same database (a
//! duplicate or conflicting record changes nothing); events of an aggregate that has a parked
//! event wait behind it (parked too); the projection applies the rest. An event the projection
//! cannot apply is parked with its error and the batch goes on without it.
//!
//! A worker remembers the versions it has committed ([`Known`]), so a batch reads from
//! `applied_versions` only the aggregates the worker has not met. The fence is what makes the
//! memory safe to use (see [`Known`]); as a second check, every version a batch writes must
//! still advance the stored one (a database changed by hand), or the batch is rolled back and
//! judged again from the database.
//!
//! # Start-up checks
//! On assignment, a partition whose stored position is beyond the log's end (a log that lost its
//! tail, a topic recreated under the same prefix) is not started: the records the log has there
//! now are not the ones the read model was built from, so going on would skip or misjudge them.
//! The worker logs a [`BeyondLogEnd`] error, which says how to recover, and reports it in
//! [`WorkerState::problems`] (the read side turns it into a failed readiness check). It starts
//! the partition once its stored position has changed to one within the log (a rebuild by
//! `platform replay` swapped in).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use event_log::shared::SharedGroup;
use event_log::{GroupEvent, GroupMember, LogRecord, Position, SharedLog};
use event_schema::{Envelope, judge};
use serde::Serialize;
use tokio::sync::watch;

use crate::db::{Db, DbError, Migrations, Tx, Value};
use crate::models::{Kind, fetch_for_keys, write_rows};

/// The most records a worker applies in one transaction.
pub const MAX_BATCH: usize = 10_000;

/// The most aggregate versions a worker remembers; past it, it forgets them all and reads them
/// again as it meets them.
const KNOWN_LIMIT: usize = 250_000;

/// Up to this many aggregates with a parked event, a worker reads them all before each batch
/// (one short query on a partial index); with more, it looks up the batch's aggregates.
const PARKED_LISTED: usize = 1000;

/// How often a worker looks again at partitions it did not start because their stored
/// position was beyond the log's end.
const BEYOND_END_RECHECK: Duration = Duration::from_secs(2);

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
    /// Its tables, as ordered migrations (`.sql` files in `migrations/<name>/`); each runs
    /// once, and is never edited once released.
    fn migrations(&self) -> &'static Migrations;
    /// Applies effective events, in log order per aggregate.
    async fn apply(&self, tx: &mut Tx, events: &[Event]) -> Result<(), ApplyError>;
    /// Called after a transaction in which `apply` ran has committed: for work the projection
    /// hands on only once it is durable (the saga wakes its outbox relay here). A transaction
    /// that rolls back is followed by another `apply` before the next call.
    fn committed(&self) {}
    /// For a model whose `apply` only inserts one row per event into one table, keyed so that
    /// only a redelivered event could conflict (the audit): that table and the rows. A replay,
    /// which never applies an event twice, then writes them by COPY instead of calling `apply`.
    fn append_only_rows(&self, _events: &[Event]) -> Option<AppendOnlyRows> {
        None
    }
    /// How an operator brings the projection back when its stored state no longer matches the
    /// log (a stored position beyond the log's end), completing "nothing of that partition is
    /// applied until …".
    fn recovery(&self) -> String {
        format!(
            "it is rebuilt from the log: `platform replay --projection {} --restart`",
            self.name()
        )
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

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Runs the runtime's and the projection's migrations that have not run yet.
pub async fn migrate(db: &Db, projection: &dyn Projection) -> Result<(), DbError> {
    static RUNTIME: LazyLock<Migrations> = LazyLock::new(|| {
        sql_store::migrations!(
            "runtime",
            "../migrations/runtime/20261207000101_positions_versions_parked.sql",
            "../migrations/runtime/20261207000102_parked_events_waiting.sql",
        )
    });
    crate::db::migrate(db, &RUNTIME).await?;
    crate::db::migrate(db, projection.migrations()).await
}

/// Where a projection stands on one partition.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PartitionProgress {
    pub topic: String,
    pub partition: u32,
    /// The next offset to apply (everything before it is applied).
    pub next_offset: u64,
}

/// A stored position beyond the end of its partition: the log no longer has what the read
/// model was built from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "projection {projection}: the position stored for {topic} partition {partition} is offset \
     {stored}, beyond the log's end at offset {end} (the log lost its tail, or the topic was \
     recreated under the same prefix); nothing of that partition is applied until {recovery}"
)]
pub struct BeyondLogEnd {
    pub projection: String,
    pub topic: String,
    pub partition: u32,
    pub stored: u64,
    pub end: u64,
    /// What the operator does about it ([`Projection::recovery`]).
    pub recovery: String,
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
    /// Partitions held but not applied: their stored position is beyond the log's end.
    beyond_end: Mutex<BTreeMap<(String, u32), BeyondLogEnd>>,
}

/// The last versions a worker has committed, per aggregate type and id, so that a batch reads
/// only the aggregates the worker has not met.
///
/// Why the memory is safe to use: an aggregate's events all live in one partition, and only a
/// batch holding that partition's claim (see the module documentation) writes its version. A
/// batch uses the memory only where it continues a partition exactly where this worker's own
/// last commit (or its start) left it ([`Mark`]), and its claim then checks that the stored
/// position is still that one, written by that commit: had anyone else applied the partition
/// since, or a replay swapped a rebuild in, the claim fails and the memory is forgotten before
/// anything is judged. So a version taken from memory is the stored one. The memory is also
/// forgotten on every assignment change, every failed batch, and past [`KNOWN_LIMIT`].
#[derive(Debug, Default)]
struct Known {
    versions: HashMap<String, HashMap<String, u64>>,
    len: usize,
    /// Partitions this worker started at offset 0 (nothing of theirs applied) and has held since
    /// without forgetting: an aggregate of theirs that is not in `versions` has no version yet.
    fresh: HashMap<String, HashSet<u32>>,
    /// Where the memory of each partition's aggregates holds.
    marks: HashMap<String, HashMap<u32, Mark>>,
}

/// Where this worker last left a partition: the next offset, and the `updated_at` it wrote with
/// it (or read at the start), which its next claim also checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    next: u64,
    written_at: Option<i64>,
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

    fn mark(&self, topic: &str, partition: u32) -> Option<Mark> {
        self.marks
            .get(topic)
            .and_then(|partitions| partitions.get(&partition))
            .copied()
    }

    fn set_mark(&mut self, topic: &str, partition: u32, mark: Mark) {
        match self.marks.get_mut(topic) {
            Some(partitions) => {
                partitions.insert(partition, mark);
            }
            None => {
                self.marks
                    .entry(topic.to_owned())
                    .or_default()
                    .insert(partition, mark);
            }
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

/// What applying a batch did besides applying it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Partitions whose records were left out because their stored position, given with them,
    /// is not one the batch can go on from: behind the batch (a rebuild swapped in that stands
    /// before it) or beyond the log's end. The worker starts them again as on assignment.
    pub restart: Vec<(String, u32, u64)>,
}

/// Where a partition just assigned (or to be read again) stands.
enum Checked {
    /// Its stored position, within the log (`None`: no batch committed yet).
    Start(Option<(u64, i64)>),
    /// Beyond the log's end: left unstarted and reported.
    Halted,
    Shutdown,
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

    /// Partitions this worker holds but does not apply, each with why and how to recover.
    pub fn beyond_end(&self) -> Vec<BeyondLogEnd> {
        self.halted().values().cloned().collect()
    }

    /// What keeps this worker from applying everything it holds, as sentences for readiness
    /// checks; empty when nothing does.
    pub fn problems(&self) -> Vec<String> {
        self.halted()
            .values()
            .map(|problem| problem.to_string())
            .collect()
    }

    fn halted(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, u32), BeyondLogEnd>> {
        self.beyond_end
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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

const STORED_POSITION: &str = "SELECT next_offset, updated_at FROM projection_positions
     WHERE projection = $1 AND topic = $2 AND partition = $3";

/// A partition's stored position as (next offset, updated_at); `None` before its first batch.
async fn stored_position(
    db: &Db,
    projection: &str,
    topic: &str,
    partition: u32,
) -> Result<Option<(u64, i64)>, DbError> {
    Ok(db
        .fetch_optional(
            STORED_POSITION,
            &[projection.into(), topic.into(), partition.into()],
        )
        .await?
        .map(|row| (row.int("next_offset") as u64, row.int("updated_at"))))
}

/// Claims a partition for a batch (see the module documentation): moves its stored position
/// from `expected` to `next`, provided it is at `expected` (and was written at `written_at`,
/// when given). False when it is not, which changes nothing.
async fn claim(
    tx: &mut Tx,
    projection: &str,
    (topic, partition): (&str, u32),
    expected: u64,
    written_at: Option<i64>,
    next: u64,
    now: i64,
) -> Result<bool, DbError> {
    let claimed = if expected == 0 {
        // No batch of the partition committed yet: no row, unless a concurrent first batch
        // inserted one, which this insert then waits for and finds moved on.
        tx.execute(
            "INSERT INTO projection_positions (projection, topic, partition, next_offset, updated_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (projection, topic, partition) DO UPDATE
             SET next_offset = excluded.next_offset, updated_at = excluded.updated_at
             WHERE projection_positions.next_offset = 0",
            &[
                projection.into(),
                topic.into(),
                partition.into(),
                next.into(),
                now.into(),
            ],
        )
        .await?
    } else {
        tx.execute(
            "UPDATE projection_positions SET next_offset = $1, updated_at = $2
             WHERE projection = $3 AND topic = $4 AND partition = $5 AND next_offset = $6
               AND ($7 < 0 OR updated_at = $7)",
            &[
                next.into(),
                now.into(),
                projection.into(),
                topic.into(),
                partition.into(),
                expected.into(),
                written_at.unwrap_or(-1).into(),
            ],
        )
        .await?
    };
    Ok(claimed == 1)
}

/// One projection's worker: a member of the projection's consumer group (shared with the other
/// projections of the process that are in the same group).
pub struct Worker {
    pub log: SharedLog,
    pub db: Db,
    pub projection: Arc<dyn Projection>,
    pub topics: Vec<String>,
    pub group: Arc<SharedGroup>,
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
            match self.group.join(&self.topics).await {
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
        let mut rechecked = tokio::time::Instant::now();
        loop {
            if rechecked.elapsed() >= BEYOND_END_RECHECK {
                rechecked = tokio::time::Instant::now();
                self.recheck_beyond_end(member.as_mut()).await;
            }
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
                        match self.checked_start(&topic, partition, &mut shutdown).await {
                            Checked::Start(stored) => {
                                self.start(member.as_mut(), &topic, partition, stored).await;
                            }
                            Checked::Halted => {}
                            Checked::Shutdown => return,
                        }
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
                    {
                        let mut halted = self.state.halted();
                        for partition in &partitions {
                            halted.remove(partition);
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
                    let Some(applied) = applied else {
                        return;
                    };
                    ahead = Some(next);
                    for (topic, partition, stored) in applied.restart {
                        // What was polled meanwhile of that partition comes after the batch:
                        // it is read again from the stored position too.
                        if let Some(Ok(GroupEvent::Records(records))) = ahead.as_mut() {
                            records.retain(|record| {
                                record.position.topic != topic
                                    || record.position.partition != partition
                            });
                        }
                        tracing::warn!(
                            projection = name,
                            topic,
                            partition,
                            next_offset = stored,
                            "the stored position moved without this worker to where its batch cannot go on (a rebuild swapped in, or a log that lost its tail); starting the partition again"
                        );
                        match self.checked_start(&topic, partition, &mut shutdown).await {
                            Checked::Start(stored) => {
                                self.start(member.as_mut(), &topic, partition, stored).await;
                            }
                            Checked::Halted => {}
                            Checked::Shutdown => return,
                        }
                    }
                }
            }
        }
    }

    /// Where a partition just assigned stands: its stored position once that is known to be
    /// within the log, or halted when it is beyond the log's end. Database and log failures are
    /// retried.
    async fn checked_start(
        &self,
        topic: &str,
        partition: u32,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Checked {
        let name = self.projection.name();
        let mut checks = 0;
        loop {
            let checked = async {
                let stored = stored_position(&self.db, name, topic, partition).await?;
                let end = self
                    .log
                    .end_offset(topic, partition)
                    .await
                    .map_err(|error| DbError::Other(format!("reading the log's end: {error}")))?;
                Ok::<_, DbError>((stored, end))
            }
            .await;
            let wait = match checked {
                Ok((stored, end)) => match stored {
                    Some((next, _)) if next > end => {
                        // A new partition leader's high watermark can lag for a moment: look
                        // three times over two seconds before calling it lost.
                        checks += 1;
                        if checks == 3 {
                            self.halt(topic, partition, next, end);
                            return Checked::Halted;
                        }
                        Duration::from_secs(1)
                    }
                    _ => return Checked::Start(stored),
                },
                Err(error) => {
                    tracing::warn!(projection = name, %error, topic, partition, "cannot check the stored position; retrying");
                    Duration::from_millis(500)
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return Checked::Shutdown,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Leaves a partition unstarted because its stored position is beyond the log's end.
    fn halt(&self, topic: &str, partition: u32, stored: u64, end: u64) {
        let problem = BeyondLogEnd {
            projection: self.projection.name().to_owned(),
            topic: topic.to_owned(),
            partition,
            stored,
            end,
            recovery: self.projection.recovery(),
        };
        tracing::error!(
            projection = %problem.projection,
            topic,
            partition,
            stored_offset = stored,
            end_offset = end,
            "{problem}"
        );
        if let Ok(mut positions) = self.state.positions.lock() {
            positions.remove(&(topic.to_owned(), partition));
        }
        // Nothing remembered of the partition may outlive what recovers it (a rebuild).
        self.state.known().forget();
        self.state
            .halted()
            .insert((topic.to_owned(), partition), problem);
        self.state.notify();
    }

    /// Starts delivering a partition from its stored position (`None`: no batch committed yet,
    /// offset 0), which is where this worker's memory of it begins.
    async fn start(
        &self,
        member: &mut dyn GroupMember,
        topic: &str,
        partition: u32,
        stored: Option<(u64, i64)>,
    ) {
        let name = self.projection.name();
        let next = stored.map_or(0, |(next, _)| next);
        let mut attempts = 0;
        while let Err(error) = member.start(topic, partition, next).await {
            attempts += 1;
            // Revoked meanwhile: its Revoked event follows. Otherwise the log failed: try
            // again a while (the partition would deliver nothing until its next assignment).
            if matches!(error, event_log::LogError::UnknownPartition { .. }) || attempts >= 10 {
                tracing::warn!(projection = name, %error, topic, partition, "cannot start the partition");
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        {
            let mut known = self.state.known();
            let written_at = stored.map(|(_, written_at)| written_at);
            known.set_mark(topic, partition, Mark { next, written_at });
            if stored.is_none() {
                known
                    .fresh
                    .entry(topic.to_owned())
                    .or_default()
                    .insert(partition);
            }
        }
        if let Ok(mut positions) = self.state.positions.lock() {
            positions.insert((topic.to_owned(), partition), next);
        }
        tracing::debug!(
            projection = name,
            topic,
            partition,
            next_offset = next,
            "partition started"
        );
    }

    /// Starts the partitions left unstarted for a position beyond the log's end whose stored
    /// position has since changed to one within the log (a rebuild swapped in). One whose
    /// position has not changed stays unstarted even once the log has grown past it: the records
    /// up to it are not the ones the read model was built from.
    async fn recheck_beyond_end(&self, member: &mut dyn GroupMember) {
        let halted = self.state.beyond_end();
        for problem in halted {
            let (topic, partition) = (problem.topic.as_str(), problem.partition);
            let stored =
                match stored_position(&self.db, self.projection.name(), topic, partition).await {
                    Ok(stored) => stored,
                    Err(_) => continue,
                };
            let next = stored.map_or(0, |(next, _)| next);
            if next == problem.stored {
                continue;
            }
            let Ok(end) = self.log.end_offset(topic, partition).await else {
                continue;
            };
            if next > end {
                self.halt(topic, partition, next, end);
                continue;
            }
            self.state.halted().remove(&(topic.to_owned(), partition));
            tracing::info!(
                projection = self.projection.name(),
                topic,
                partition,
                next_offset = next,
                "the stored position is within the log again"
            );
            self.start(member, topic, partition, stored).await;
            self.state.notify();
        }
    }

    /// Applies a batch, retrying with backoff while the database fails; `None` when shutdown
    /// came first.
    async fn apply_until_done(
        &self,
        records: &[LogRecord],
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Applied> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.apply_batch(records).await {
                Ok(applied) => return Some(applied),
                Err(error) => {
                    tracing::warn!(projection = self.projection.name(), %error, "applying a batch failed; retrying");
                    tokio::select! {
                        _ = shutdown.changed() => return None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Applies one batch in one transaction, with its positions, fenced by claims on its
    /// partitions (see the module documentation). Records of partitions left unstarted for a
    /// position beyond the log's end are left out, as are those of partitions whose stored
    /// position the batch cannot go on from (returned in [`Applied::restart`]).
    pub async fn apply_batch(&self, records: &[LogRecord]) -> Result<Applied, DbError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match self.try_apply_batch(records).await {
                Ok(applied) => return Ok(applied),
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
                    return Err(DbError::Other(
                        "applied versions keep moving on without this worker (changed by hand, or by a writer outside the projection runtime?)".into(),
                    ));
                }
            }
        }
    }

    /// Claims every partition of the batch (see the module documentation), in one order for
    /// every worker so that two batches never wait for each other's claims in a cycle. `spans`
    /// holds each partition's first offset in the batch and the offset after its last. Returns
    /// the partitions claimed, with where this batch leaves them.
    async fn claim_partitions(
        &self,
        tx: &mut Tx,
        spans: BTreeMap<(&str, u32), (u64, u64)>,
        now: i64,
    ) -> Result<(BTreeMap<(String, u32), u64>, Applied), BatchError> {
        let name = self.projection.name();
        let mut claimed: BTreeMap<(String, u32), u64> = BTreeMap::new();
        let mut applied = Applied::default();
        let mut moved = false;
        for ((topic, partition), (first, reached)) in spans {
            // Memory of the partition counts only where this batch continues exactly where this
            // worker's last commit left it; the claim then checks that commit is still the last.
            let mark = self.state.known().mark(topic, partition);
            let continues = mark.is_some_and(|mark| mark.next == first);
            moved |= mark.is_some() && !continues;
            let mut written_at = mark.filter(|_| continues).and_then(|mark| mark.written_at);
            let mut expected = first;
            let mut attempts = 0;
            loop {
                let next = reached.max(expected);
                if claim(
                    tx,
                    name,
                    (topic, partition),
                    expected,
                    written_at,
                    next,
                    now,
                )
                .await?
                {
                    claimed.insert((topic.to_owned(), partition), next);
                    break;
                }
                // The partition moved without this worker (or, on a second attempt, moved
                // again between reading it and claiming it: the claim waited for that commit).
                moved = true;
                attempts += 1;
                if attempts == 5 {
                    return Err(DbError::Other(format!(
                        "the position of {topic} partition {partition} keeps moving without this worker"
                    ))
                    .into());
                }
                let stored = tx
                    .fetch_optional(
                        STORED_POSITION,
                        &[name.into(), topic.into(), partition.into()],
                    )
                    .await?
                    .map_or(0, |row| row.int("next_offset") as u64);
                if stored < first {
                    applied.restart.push((topic.to_owned(), partition, stored));
                    break;
                }
                if stored > first {
                    let end = self
                        .log
                        .end_offset(topic, partition)
                        .await
                        .map_err(|error| {
                            DbError::Other(format!(
                                "reading the end of {topic} partition {partition}: {error}"
                            ))
                        })?;
                    if stored > end {
                        applied.restart.push((topic.to_owned(), partition, stored));
                        break;
                    }
                }
                // Everything below `stored` is applied: the batch is judged against the
                // database from there.
                expected = stored;
                written_at = None;
            }
        }
        if moved {
            // Judge the whole batch against the database.
            self.state.known().forget();
        }
        Ok((claimed, applied))
    }

    async fn try_apply_batch(&self, records: &[LogRecord]) -> Result<Applied, BatchError> {
        let name = self.projection.name();
        let now = now_ms();
        let mut tx = self.db.begin().await?;
        // Partitions left unstarted for a position beyond the log's end are not applied, even
        // when their records still arrive (one found beyond the end while it was running).
        let halted: HashSet<(String, u32)> = self.state.halted().keys().cloned().collect();
        let mut spans: BTreeMap<(&str, u32), (u64, u64)> = BTreeMap::new();
        let mut left_out = false;
        for record in records {
            let (topic, partition, offset) = (
                record.position.topic.as_str(),
                record.position.partition,
                record.position.offset,
            );
            if !halted.is_empty() && halted.contains(&(topic.to_owned(), partition)) {
                left_out = true;
                continue;
            }
            let span = spans
                .entry((topic, partition))
                .or_insert((offset, offset + 1));
            span.0 = span.0.min(offset);
            span.1 = span.1.max(offset + 1);
        }
        let partitions = spans.len();
        let (claimed, applied) = self.claim_partitions(&mut tx, spans, now).await?;
        if claimed.is_empty() {
            return Ok(applied);
        }
        // Only the records of claimed partitions (a copy only when some are left out).
        let kept: Vec<LogRecord>;
        let records = if left_out || claimed.len() < partitions {
            kept = records
                .iter()
                .filter(|record| {
                    claimed
                        .contains_key(&(record.position.topic.clone(), record.position.partition))
                })
                .cloned()
                .collect();
            kept.as_slice()
        } else {
            records
        };
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
                        return Err(DbError::Other(format!(
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
        tx.commit().await?;
        self.projection.committed();

        use std::sync::atomic::Ordering::Relaxed;
        self.state.conflicts.fetch_add(conflicts, Relaxed);
        self.state.parked.fetch_add(parked.len() as u64, Relaxed);
        self.state.applied.fetch_add(events.len() as u64, Relaxed);
        {
            let mut known = self.state.known();
            for ((aggregate_type, aggregate_id), version) in &advanced {
                known.remember(aggregate_type, aggregate_id, *version);
            }
            for ((topic, partition), next) in &claimed {
                let mark = Mark {
                    next: *next,
                    written_at: Some(now),
                };
                known.set_mark(topic, *partition, mark);
            }
        }
        if let Ok(mut positions) = self.state.positions.lock() {
            for (key, next) in claimed {
                positions.insert(key, next);
            }
        }
        self.state.notify();
        Ok(applied)
    }
}

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

/// `<prefix>.<aggregate>.events` → `<aggregate>`.
fn aggregate_type_of(topic: &str) -> String {
    topic
        .strip_suffix(".events")
        .and_then(|rest| rest.rsplit('.').next())
        .unwrap_or("unknown")
        .to_owned()
}
