//! The owner of a set of partitions of one aggregate type: it holds those aggregates' current
//! state in memory and decides every command for them (see ARCHITECTURE.md, "one owner per
//! partition makes it fast").
//!
//! - **Start-up**: per owned partition, load the latest snapshot, then read the log tail up to
//!   the end offsets seen at start; only then is the owner ready.
//! - **Tail**: one task reads the owned partitions continuously and folds each record into the
//!   state by the effective-history rule (`event_schema::history`), the same rule every other
//!   reader uses.
//! - **Commands** are decided under a per-aggregate lock against that state. The event is
//!   appended, and the command is acknowledged only once the tail has read the record back and
//!   judged it effective. Commands on different aggregates run concurrently, so their appends
//!   share produce batches (group commit).
//! - A record the owner did not write appearing after start-up means another writer is active
//!   on the partition (a zombie, or a second owner): the owner steps down from that partition
//!   and refuses its commands, so it never acknowledges a write that readers would skip.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::Utc;
use event_log::{LogRecord, Position, SharedLog, partition_for};
use event_schema::{CommandMeta, Envelope, EventCodec, Record, Verdict, judge};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use domain::Decision;

use crate::store::{CommandStore, Snapshot};

/// Bumped whenever the snapshot body changes shape; older snapshots are then ignored and the
/// partition is rebuilt from the log.
const SNAPSHOT_FORMAT: u32 = 1;

#[derive(Debug, Clone)]
pub struct OwnerConfig {
    /// The events topic of the aggregate type.
    pub topic: String,
    pub partitions: u32,
    /// The partitions this instance owns.
    pub owned: Vec<u32>,
    /// Take a partition's snapshot after this many new records.
    pub snapshot_every: u64,
    /// How long a command waits to read its own record back before answering 503.
    pub read_back_timeout: Duration,
}

/// A command to decide, with who asked and what they expect.
#[derive(Debug, Clone)]
pub struct CommandRequest<C> {
    pub aggregate_id: String,
    pub command: C,
    pub meta: CommandMeta,
    /// `If-Match`: the version the caller believes current.
    pub expected_version: Option<u64>,
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new event became the aggregate's `version`, at `position`.
    Appended { version: u64, position: Position },
    /// The command had already taken effect; nothing was appended. `position` is that of the
    /// aggregate's latest event, if it has one.
    Unchanged {
        version: u64,
        position: Option<Position>,
    },
    /// The same command (same command id) was decided before; this is its original outcome.
    Repeated { version: u64, position: Position },
}

impl Outcome {
    pub fn version(&self) -> u64 {
        match self {
            Outcome::Appended { version, .. }
            | Outcome::Unchanged { version, .. }
            | Outcome::Repeated { version, .. } => *version,
        }
    }

    pub fn position(&self) -> Option<&Position> {
        match self {
            Outcome::Appended { position, .. } | Outcome::Repeated { position, .. } => {
                Some(position)
            }
            Outcome::Unchanged { position, .. } => position.as_ref(),
        }
    }
}

/// Why a command was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError<E> {
    /// The domain said no.
    #[error("{0}")]
    Domain(E),
    /// `If-Match` named another version than the current one.
    #[error("expected version {expected}, but the current version is {actual}")]
    VersionConflict { expected: u64, actual: u64 },
    /// The command id (idempotency key) was used before for a different request.
    #[error("this idempotency key was already used for a different request")]
    IdempotencyMismatch,
    /// Still rebuilding state at start-up.
    #[error("the service is starting and not ready yet")]
    NotReady,
    /// The aggregate's partition belongs to another instance.
    #[error("partition {partition} is owned by another instance")]
    NotOwner { partition: u32 },
    /// Another writer was seen on the partition; this instance no longer writes to it.
    #[error("partition {partition} has another writer; this instance stepped down from it")]
    SteppedDown { partition: u32 },
    /// The log could not be written or read back in time.
    #[error("event log unavailable: {0}")]
    Unavailable(String),
}

/// The outcome of an effective event, kept so a repeated command id gets it back.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredOutcome {
    aggregate_id: String,
    version: u64,
    position: String,
    request_hash: Option<String>,
}

#[derive(Debug, Clone)]
struct Slot<S> {
    state: S,
    version: u64,
    partition: u32,
    position: Option<Position>,
}

#[derive(Debug)]
struct Table<S> {
    aggregates: HashMap<String, Slot<S>>,
    commands: HashMap<Uuid, StoredOutcome>,
    next_offsets: BTreeMap<u32, u64>,
    since_snapshot: BTreeMap<u32, u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PartitionSnapshot<S> {
    format: u32,
    aggregates: Vec<(String, u64, Option<String>, S)>,
    commands: Vec<(Uuid, StoredOutcome)>,
}

enum ReadBack {
    Effective(Position),
    Skipped(Verdict),
}

/// What an owner reports about itself (health, CLI).
#[derive(Debug, Clone, Serialize)]
pub struct OwnerStatus {
    pub topic: String,
    pub ready: bool,
    pub aggregates: usize,
    /// Records skipped by the effective-history rule since start.
    pub conflicts: u64,
    pub partitions: Vec<PartitionStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub partition: u32,
    pub next_offset: u64,
    pub stepped_down: bool,
}

/// See the module documentation.
pub struct Owner<A: EventCodec> {
    inner: Arc<Inner<A>>,
}

impl<A: EventCodec> Clone for Owner<A> {
    fn clone(&self) -> Self {
        Owner {
            inner: self.inner.clone(),
        }
    }
}

impl<A: EventCodec> std::fmt::Debug for Owner<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Owner({})", self.inner.config.topic)
    }
}

struct Inner<A: EventCodec> {
    log: SharedLog,
    store: Arc<dyn CommandStore>,
    config: OwnerConfig,
    table: Mutex<Table<A::State>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    waiters: Mutex<HashMap<Uuid, oneshot::Sender<ReadBack>>>,
    /// Our own records whose append or read-back failed: they may still appear in the log,
    /// and are not another writer's when they do.
    in_doubt: Mutex<HashSet<Uuid>>,
    stepped_down: Mutex<BTreeSet<u32>>,
    ready: AtomicBool,
    conflicts: AtomicU64,
}

/// A poisoned lock only means another thread panicked while holding it; the table itself is
/// always left consistent (each update is a single assignment), so keep going.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<A> Owner<A>
where
    A: EventCodec + Send + Sync + 'static,
    A::State: Serialize + DeserializeOwned + Send + Sync,
    A::Command: Send + Sync,
    A::Event: Send,
    A::Error: Send,
{
    /// Loads the snapshots and starts the tail; the owner becomes ready once it has read its
    /// partitions up to where they ended at start. Stops when `shutdown` turns true.
    pub async fn start(
        log: SharedLog,
        store: Arc<dyn CommandStore>,
        config: OwnerConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, CommandError<A::Error>> {
        let mut table = Table {
            aggregates: HashMap::new(),
            commands: HashMap::new(),
            next_offsets: BTreeMap::new(),
            since_snapshot: BTreeMap::new(),
        };
        let mut targets = BTreeMap::new();
        for &partition in &config.owned {
            let offset = load_snapshot::<A>(&*store, &config.topic, partition, &mut table).await;
            table.next_offsets.insert(partition, offset);
            let end = log
                .end_offset(&config.topic, partition)
                .await
                .map_err(|error| CommandError::Unavailable(error.to_string()))?;
            targets.insert(partition, end);
        }
        tracing::info!(
            topic = %config.topic,
            aggregates = table.aggregates.len(),
            "owner loaded snapshots; reading the log tail"
        );
        let inner = Arc::new(Inner {
            log,
            store,
            config,
            table: Mutex::new(table),
            locks: Mutex::new(HashMap::new()),
            waiters: Mutex::new(HashMap::new()),
            in_doubt: Mutex::new(HashSet::new()),
            stepped_down: Mutex::new(BTreeSet::new()),
            ready: AtomicBool::new(false),
            conflicts: AtomicU64::new(0),
        });
        tokio::spawn(tail(inner.clone(), targets, shutdown));
        Ok(Owner { inner })
    }

    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// Waits until ready, at most `limit`; returns whether it is.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.is_ready() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    pub fn topic(&self) -> &str {
        &self.inner.config.topic
    }

    pub fn partitions(&self) -> u32 {
        self.inner.config.partitions
    }

    /// The current state and version of an aggregate (version 0: it has no event yet).
    pub fn state(&self, aggregate_id: &str) -> (A::State, u64) {
        lock(&self.inner.table)
            .aggregates
            .get(aggregate_id)
            .map(|slot| (slot.state.clone(), slot.version))
            .unwrap_or_default()
    }

    pub fn status(&self) -> OwnerStatus {
        let table = lock(&self.inner.table);
        let stepped_down = lock(&self.inner.stepped_down);
        OwnerStatus {
            topic: self.inner.config.topic.clone(),
            ready: self.is_ready(),
            aggregates: table.aggregates.len(),
            conflicts: self.inner.conflicts.load(Ordering::Relaxed),
            partitions: table
                .next_offsets
                .iter()
                .map(|(partition, next_offset)| PartitionStatus {
                    partition: *partition,
                    next_offset: *next_offset,
                    stepped_down: stepped_down.contains(partition),
                })
                .collect(),
        }
    }

    /// Decides and carries out one command; see the module documentation.
    pub async fn execute(
        &self,
        request: CommandRequest<A::Command>,
    ) -> Result<Outcome, CommandError<A::Error>> {
        if !self.is_ready() {
            return Err(CommandError::NotReady);
        }
        let partition = partition_for(&request.aggregate_id, self.inner.config.partitions);
        if !self.inner.config.owned.contains(&partition) {
            return Err(CommandError::NotOwner { partition });
        }
        if lock(&self.inner.stepped_down).contains(&partition) {
            return Err(CommandError::SteppedDown { partition });
        }
        if let Some(outcome) = self.repeated(&request.meta)? {
            return Ok(outcome);
        }
        let aggregate_lock = {
            let mut locks = lock(&self.inner.locks);
            locks
                .entry(request.aggregate_id.clone())
                .or_default()
                .clone()
        };
        let guard = aggregate_lock.lock().await;
        let result = self.execute_locked(&request, partition).await;
        drop(guard);
        let mut locks = lock(&self.inner.locks);
        // Only the map and this function hold it: nobody else waits, forget it.
        if Arc::strong_count(&aggregate_lock) == 2 {
            locks.remove(&request.aggregate_id);
        }
        result
    }

    /// The original outcome of a command id seen before.
    fn repeated(&self, meta: &CommandMeta) -> Result<Option<Outcome>, CommandError<A::Error>> {
        let table = lock(&self.inner.table);
        let Some(stored) = table.commands.get(&meta.command_id) else {
            return Ok(None);
        };
        if stored.request_hash != meta.request_hash {
            return Err(CommandError::IdempotencyMismatch);
        }
        let position = stored
            .position
            .parse()
            .map_err(|error: String| CommandError::Unavailable(error))?;
        Ok(Some(Outcome::Repeated {
            version: stored.version,
            position,
        }))
    }

    async fn execute_locked(
        &self,
        request: &CommandRequest<A::Command>,
        partition: u32,
    ) -> Result<Outcome, CommandError<A::Error>> {
        // A copy of this command may have finished while we waited for the lock.
        if let Some(outcome) = self.repeated(&request.meta)? {
            return Ok(outcome);
        }
        let (state, version, last_position) = {
            let table = lock(&self.inner.table);
            match table.aggregates.get(&request.aggregate_id) {
                Some(slot) => (slot.state.clone(), slot.version, slot.position.clone()),
                None => (A::State::default(), 0, None),
            }
        };
        if let Some(expected) = request.expected_version
            && expected != version
        {
            return Err(CommandError::VersionConflict {
                expected,
                actual: version,
            });
        }
        let event = match A::decide(&state, &request.command).map_err(CommandError::Domain)? {
            Decision::Append(event) => event,
            Decision::Unchanged => {
                return Ok(Outcome::Unchanged {
                    version,
                    position: last_position,
                });
            }
        };
        let envelope = Envelope::new::<A>(
            request.aggregate_id.clone(),
            version + 1,
            &event,
            &request.meta,
            Utc::now(),
        );
        let event_id = envelope.event_id;
        let (sender, read_back) = oneshot::channel();
        lock(&self.inner.waiters).insert(event_id, sender);
        let appended = self
            .inner
            .log
            .append(&self.inner.config.topic, partition, Record::from(&envelope))
            .await;
        if let Err(error) = appended {
            self.forget_waiter(event_id);
            return Err(CommandError::Unavailable(error.to_string()));
        }
        match tokio::time::timeout(self.inner.config.read_back_timeout, read_back).await {
            Ok(Ok(ReadBack::Effective(position))) => Ok(Outcome::Appended {
                version: version + 1,
                position,
            }),
            Ok(Ok(ReadBack::Skipped(verdict))) => {
                tracing::warn!(aggregate_id = %request.aggregate_id, ?verdict, "own record skipped by the effective-history rule");
                Err(CommandError::SteppedDown { partition })
            }
            Ok(Err(_)) | Err(_) => {
                self.forget_waiter(event_id);
                Err(CommandError::Unavailable(
                    "the appended event was not read back in time".into(),
                ))
            }
        }
    }

    /// Stops waiting for a record that may still land in the log.
    fn forget_waiter(&self, event_id: Uuid) {
        lock(&self.inner.waiters).remove(&event_id);
        lock(&self.inner.in_doubt).insert(event_id);
    }
}

async fn load_snapshot<A>(
    store: &dyn CommandStore,
    topic: &str,
    partition: u32,
    table: &mut Table<A::State>,
) -> u64
where
    A: EventCodec,
    A::State: DeserializeOwned,
{
    let snapshot = match store.load_snapshot(topic, partition).await {
        Ok(Some(snapshot)) => snapshot,
        Ok(None) => return 0,
        Err(error) => {
            tracing::warn!(%error, topic, partition, "cannot load snapshot; rebuilding from the log");
            return 0;
        }
    };
    let body = match serde_json::from_slice::<PartitionSnapshot<A::State>>(&snapshot.body) {
        Ok(body) if body.format == SNAPSHOT_FORMAT => body,
        _ => {
            tracing::info!(
                topic,
                partition,
                "snapshot in an older format; rebuilding from the log"
            );
            return 0;
        }
    };
    for (aggregate_id, version, position, state) in body.aggregates {
        let position = position.and_then(|position| position.parse().ok());
        table.aggregates.insert(
            aggregate_id,
            Slot {
                state,
                version,
                partition,
                position,
            },
        );
    }
    table.commands.extend(body.commands);
    snapshot.next_offset
}

/// Reads the owned partitions for ever, folding records into the table.
async fn tail<A>(
    inner: Arc<Inner<A>>,
    targets: BTreeMap<u32, u64>,
    mut shutdown: watch::Receiver<bool>,
) where
    A: EventCodec + Send + Sync + 'static,
    A::State: Serialize + DeserializeOwned + Send + Sync,
{
    let start: Vec<(u32, u64)> = lock(&inner.table)
        .next_offsets
        .iter()
        .map(|(partition, offset)| (*partition, *offset))
        .collect();
    let mut reader = loop {
        match inner.log.reader(&inner.config.topic, &start).await {
            Ok(reader) => break reader,
            Err(error) => {
                tracing::warn!(%error, topic = %inner.config.topic, "cannot open the log tail; retrying");
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    loop {
        let batch = tokio::select! {
            _ = shutdown.changed() => break,
            batch = reader.poll(1000, Duration::from_millis(100)) => batch,
        };
        let records = match batch {
            Ok(records) => records,
            Err(error) => {
                tracing::warn!(%error, topic = %inner.config.topic, "reading the log tail failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        for record in &records {
            apply(&inner, record);
        }
        if !inner.ready.load(Ordering::Acquire) {
            let table = lock(&inner.table);
            let caught_up = targets.iter().all(|(partition, end)| {
                table.next_offsets.get(partition).copied().unwrap_or(0) >= *end
            });
            drop(table);
            if caught_up {
                inner.ready.store(true, Ordering::Release);
                tracing::info!(topic = %inner.config.topic, "owner caught up with the log; ready");
            }
        }
        save_due_snapshots(&inner, false).await;
    }
    save_due_snapshots(&inner, true).await;
}

/// Folds one record into the table by the effective-history rule, and answers whoever waits.
fn apply<A>(inner: &Inner<A>, record: &LogRecord)
where
    A: EventCodec,
{
    let partition = record.position.partition;
    let envelope = match Envelope::try_from(&record.record) {
        Ok(envelope) => envelope,
        Err(error) => {
            tracing::error!(position = %record.position, %error, "undecodable record in the log; skipped");
            let mut table = lock(&inner.table);
            table
                .next_offsets
                .insert(partition, record.position.offset + 1);
            return;
        }
    };
    let mut table = lock(&inner.table);
    table
        .next_offsets
        .insert(partition, record.position.offset + 1);
    *table.since_snapshot.entry(partition).or_default() += 1;
    let last = table
        .aggregates
        .get(&envelope.aggregate_id)
        .map(|slot| slot.version)
        .unwrap_or(0);
    let mut verdict = judge(last, envelope.aggregate_version);
    if verdict.is_effective() {
        match envelope.event::<A>() {
            Ok(event) => {
                let slot = table
                    .aggregates
                    .entry(envelope.aggregate_id.clone())
                    .or_insert_with(|| Slot {
                        state: A::State::default(),
                        version: 0,
                        partition,
                        position: None,
                    });
                slot.state = A::evolve(std::mem::take(&mut slot.state), &event);
                slot.version = envelope.aggregate_version;
                slot.position = Some(record.position.clone());
                table.commands.insert(
                    envelope.command_id,
                    StoredOutcome {
                        aggregate_id: envelope.aggregate_id.clone(),
                        version: envelope.aggregate_version,
                        position: record.position.to_string(),
                        request_hash: envelope.request_hash.clone(),
                    },
                );
            }
            Err(error) => {
                // Every reader skips it alike, so agreement holds; but an event we cannot read
                // is a broken invariant worth an alert.
                tracing::error!(position = %record.position, %error, "effective event cannot be decoded; skipped");
                verdict = Verdict::Stale {
                    last_effective: last,
                };
            }
        }
    }
    drop(table);
    if !verdict.is_effective() {
        inner.conflicts.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            position = %record.position,
            aggregate_id = %envelope.aggregate_id,
            claimed = envelope.aggregate_version,
            ?verdict,
            "record skipped by the effective-history rule"
        );
    }
    let waiter = lock(&inner.waiters).remove(&envelope.event_id);
    match waiter {
        Some(waiter) => {
            let answer = if verdict.is_effective() {
                ReadBack::Effective(record.position.clone())
            } else {
                ReadBack::Skipped(verdict)
            };
            let _ = waiter.send(answer);
        }
        None => {
            let ours = lock(&inner.in_doubt).remove(&envelope.event_id);
            if !ours && inner.ready.load(Ordering::Acquire) {
                let newly = lock(&inner.stepped_down).insert(partition);
                if newly {
                    tracing::error!(
                        topic = %inner.config.topic,
                        partition,
                        position = %record.position,
                        "another writer appended to an owned partition; stepping down from it"
                    );
                }
            }
        }
    }
}

async fn save_due_snapshots<A>(inner: &Inner<A>, all: bool)
where
    A: EventCodec,
    A::State: Serialize,
{
    let due: Vec<u32> = lock(&inner.table)
        .since_snapshot
        .iter()
        .filter(|(_, count)| **count > 0 && (all || **count >= inner.config.snapshot_every))
        .map(|(partition, _)| *partition)
        .collect();
    for partition in due {
        let (next_offset, body) = {
            let mut table = lock(&inner.table);
            table.since_snapshot.insert(partition, 0);
            let next_offset = table.next_offsets.get(&partition).copied().unwrap_or(0);
            let aggregates: Vec<_> = table
                .aggregates
                .iter()
                .filter(|(_, slot)| slot.partition == partition)
                .map(|(id, slot)| {
                    (
                        id.clone(),
                        slot.version,
                        slot.position.as_ref().map(Position::to_string),
                        slot.state.clone(),
                    )
                })
                .collect();
            let commands: Vec<_> = table
                .commands
                .iter()
                .filter(|(_, outcome)| {
                    table
                        .aggregates
                        .get(&outcome.aggregate_id)
                        .is_some_and(|slot| slot.partition == partition)
                })
                .map(|(id, outcome)| (*id, outcome.clone()))
                .collect();
            let body = PartitionSnapshot {
                format: SNAPSHOT_FORMAT,
                aggregates,
                commands,
            };
            (next_offset, serde_json::to_vec(&body))
        };
        let body = match body {
            Ok(body) => body,
            Err(error) => {
                tracing::error!(%error, "cannot serialise a snapshot");
                continue;
            }
        };
        if let Err(error) = inner
            .store
            .save_snapshot(
                &inner.config.topic,
                partition,
                Snapshot { next_offset, body },
            )
            .await
        {
            tracing::warn!(%error, partition, "cannot save snapshot; will retry later");
        }
    }
}
