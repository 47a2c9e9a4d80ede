//! The owner of a set of partitions of one aggregate type: it holds those aggregates' current
//! state in memory and decides every command for them (see ARCHITECTURE.md, "one owner per
//! partition makes it fast").
//!
//! - **Start-up**: per owned partition, load the latest snapshot, then read the log tail up to
//!   the end offsets seen at start; only then is the owner ready.
//! - **Commands** are decided under a per-aggregate lock against that state. The event is
//!   appended, and the command is acknowledged only once its record has been folded into the
//!   state in log order and judged effective, by the effective-history rule
//!   (`event_schema::history`) every other reader uses. Commands on different aggregates run
//!   concurrently, so their appends share produce batches (group commit).
//! - **Read-back from the acknowledgement.** The log's acknowledgement of an append says at
//!   which offset our record sits, and what sits there is exactly what we sent. So once every
//!   earlier offset of the partition is folded, our record is folded from the acknowledgement
//!   itself: when the offsets between the last folded one and our record are all our own
//!   acknowledged appends, nobody else wrote in between, and reading them back would only
//!   return what we already hold.
//! - **Gaps are read from the log.** An offset that is not ours (another writer's record, or an
//!   append of ours whose acknowledgement was lost) leaves a gap, and what follows it waits.
//!   The owner reads such a gap as soon as an acknowledged append has waited [`GAP_GRACE`]
//!   for it (each such read opens a reader of its own: gaps are rare). It also asks the log
//!   where its partitions end every [`WATCH_EVERY`], and reads what it has not folded up to
//!   the end seen one check earlier, so a record it did not write is found within two checks
//!   even when it writes nothing itself. There is no continuous tail: on a broker, a reader
//!   fetching back every record just written slows the appends themselves (BENCHMARKS.md,
//!   session 4, "raw append + tail").
//! - **An assumption:** the log holds at an acknowledged offset the record it acknowledged
//!   there (Kafka with an idempotent producer and acks=all). The owner checks it only where a
//!   read of the log meets an acknowledged offset it has not folded yet.
//! - A record the owner did not write appearing after start-up means another writer is active
//!   on the partition (a zombie, or a second owner): the owner steps down from that partition
//!   and refuses its commands, so it never acknowledges a write that readers would skip.
//! - **Command outcomes are remembered for a window.** A command its sender may send again
//!   carries a request fingerprint (`request_hash`: an HTTP request with an `Idempotency-Key`,
//!   a command from a command topic); the outcome of such a command is kept, so a repeat gets
//!   it back and appends nothing. It is forgotten once the partition's log time (the latest
//!   `occurred_at` folded there) has moved [`OwnerConfig::idempotency_window`] past it, so
//!   memory, snapshots and start-up follow the rate of such commands over the window, not the
//!   whole history. A command without a fingerprint (an HTTP request without a key) has an id
//!   nobody else knows: its outcome is never asked for, and is not kept. Log time, not the
//!   clock, so an owner that was down for a while forgets nothing it may still be asked.
//! - **Snapshots** are incremental and taken by a task of their own, off the commands' path:
//!   each one stores only the aggregates and command outcomes changed since the previous one
//!   (and drops the outcomes forgotten since), with the offset it covers, so its cost follows
//!   the write rate, not the history, and start-up reads the stored aggregates plus the log
//!   after that offset.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::Utc;
use event_log::{LogRecord, Position, ReadMode, SharedLog, partition_for};
use event_schema::{CommandMeta, Envelope, EventCodec, Record, Verdict, judge};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;
use uuid::Uuid;

use domain::Decision;

use crate::sharded::ShardedMap;
use crate::store::{CommandStore, Snapshot};

/// Bumped whenever the snapshot rows change shape; older snapshots are then ignored and the
/// partition is rebuilt from the log. 3: outcomes carry when their event occurred, and only
/// those of commands with a request fingerprint are kept.
const SNAPSHOT_FORMAT: u32 = 3;

/// How often the snapshot task looks for partitions due a snapshot.
const SNAPSHOT_CHECK: Duration = Duration::from_millis(500);

/// How often a ready owner asks the log where its partitions end. A partition still not folded
/// up to the end seen one check earlier holds records the owner did not get acknowledged (its
/// own in-flight appends are acknowledged well within that time), which it then reads.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// How long an acknowledged append waits for an earlier offset of its partition before the
/// owner reads that gap from the log. Acknowledgements of one produce batch reach their
/// commands in any order, so a gap shorter than this is usually not one.
pub const GAP_GRACE: Duration = Duration::from_millis(50);

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
    /// How long, in the partition's log time, the outcome of a command with a request
    /// fingerprint is remembered: a repeat within it gets the original outcome back.
    pub idempotency_window: Duration,
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
    /// When the event occurred, in ms since the epoch: the outcome is forgotten once the
    /// partition's log time is the idempotency window past it.
    occurred_ms: i64,
}

#[derive(Debug, Clone)]
struct Slot<S> {
    /// Shared, so a snapshot takes it under the table's lock without copying it.
    state: Arc<S>,
    version: u64,
    position: Option<Position>,
}

#[derive(Debug)]
struct Table<S> {
    /// Sharded: they grow with the history, and a `HashMap` growing in one piece would hold
    /// the table's lock, and every command, for as long as it takes to move all of it.
    aggregates: ShardedMap<String, Slot<S>>,
    commands: ShardedMap<Uuid, Arc<StoredOutcome>>,
    next_offsets: BTreeMap<u32, u64>,
    since_snapshot: BTreeMap<u32, u64>,
    /// What changed since each partition's last snapshot.
    dirty: BTreeMap<u32, Dirty<S>>,
    /// Our own appends the log acknowledged that cannot be folded yet (an earlier offset of
    /// their partition is not folded), by partition and offset, with when they were
    /// acknowledged.
    acked: BTreeMap<u32, BTreeMap<u64, (Envelope, Instant)>>,
    /// Each partition's log time: the latest `occurred_at` folded there, in ms.
    log_time: BTreeMap<u32, i64>,
    /// The remembered outcomes of each partition, oldest first, to forget past the window.
    remembered: BTreeMap<u32, VecDeque<(i64, Uuid)>>,
    /// [`OwnerConfig::idempotency_window`] in ms.
    window_ms: i64,
}

/// What changed in a partition since its last snapshot, kept as it changes (the states are
/// shared with the table), so a snapshot takes it whole without holding the table's lock for
/// more than a swap.
#[derive(Debug)]
struct Dirty<S> {
    aggregates: HashMap<String, Changed<S>>,
    commands: HashMap<Uuid, Arc<StoredOutcome>>,
    /// Outcomes forgotten since (past the idempotency window) that may be stored. A snapshot
    /// deletes them after its inserts, so an id both here and in `commands` ends up deleted.
    forgotten: HashSet<Uuid>,
    /// No usable snapshot was loaded at start: the next one replaces whatever is stored.
    replace: bool,
}

impl<S> Default for Dirty<S> {
    fn default() -> Self {
        Dirty {
            aggregates: HashMap::new(),
            commands: HashMap::new(),
            forgotten: HashSet::new(),
            replace: false,
        }
    }
}

/// An aggregate as it was after its latest change.
#[derive(Debug)]
struct Changed<S> {
    version: u64,
    /// The offset of its latest event, in the snapshot's partition.
    offset: Option<u64>,
    state: Arc<S>,
    /// Created since the last snapshot: not stored yet.
    new: bool,
}

/// One aggregate in a snapshot.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotSlot<S> {
    version: u64,
    position: Option<String>,
    state: S,
}

/// A record folded into the table, to be answered once the table's lock is released.
#[derive(Debug)]
struct Folded {
    position: Position,
    event_id: Uuid,
    aggregate_id: String,
    claimed: u64,
    verdict: Verdict,
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
    /// Woken when an acknowledged append is left waiting for an earlier offset.
    gap: Notify,
    ready: AtomicBool,
    conflicts: AtomicU64,
    /// Turns true once the snapshot task has written its last snapshots after shutdown.
    snapshots_done: watch::Sender<bool>,
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
    /// Loads the snapshots and starts reading the log; the owner becomes ready once it has read
    /// its partitions up to where they ended at start. Stops when `shutdown` turns true.
    pub async fn start(
        log: SharedLog,
        store: Arc<dyn CommandStore>,
        config: OwnerConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, CommandError<A::Error>> {
        let mut table = Table {
            aggregates: ShardedMap::new(),
            commands: ShardedMap::new(),
            next_offsets: BTreeMap::new(),
            since_snapshot: BTreeMap::new(),
            dirty: BTreeMap::new(),
            acked: BTreeMap::new(),
            log_time: BTreeMap::new(),
            remembered: BTreeMap::new(),
            window_ms: i64::try_from(config.idempotency_window.as_millis()).unwrap_or(i64::MAX),
        };
        let mut targets = BTreeMap::new();
        for &partition in &config.owned {
            let loaded = load_snapshot::<A>(&*store, &config.topic, partition, &mut table).await;
            table.dirty.entry(partition).or_default().replace = loaded.is_none();
            table.next_offsets.insert(partition, loaded.unwrap_or(0));
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
            gap: Notify::new(),
            ready: AtomicBool::new(false),
            conflicts: AtomicU64::new(0),
            snapshots_done: watch::Sender::new(false),
        });
        tokio::spawn(follow(inner.clone(), targets, shutdown.clone()));
        tokio::spawn(take_snapshots(inner.clone(), shutdown));
        Ok(Owner { inner })
    }

    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// After shutdown: waits until the last snapshots are written (or could not be), so a
    /// graceful stop leaves them for the next start-up.
    pub async fn snapshots_written(&self) {
        let mut done = self.inner.snapshots_done.subscribe();
        let _ = done.wait_for(|done| *done).await;
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
            .map(|slot| (A::State::clone(&slot.state), slot.version))
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
                None => (Arc::default(), 0, None),
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
        let decision = A::decide(&state, &request.command).map_err(CommandError::Domain);
        // Let go of the state before our record is folded, so it evolves in place (a shared
        // state would be copied).
        drop(state);
        let event = match decision? {
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
        match appended {
            Ok(position) => acknowledged::<A>(&self.inner, position, envelope),
            Err(error) => {
                self.forget_waiter(event_id);
                return Err(CommandError::Unavailable(error.to_string()));
            }
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

/// Loads a partition's snapshot into the table; returns the offset it covers, or `None` when
/// there is no usable one (the partition is then rebuilt from the log).
async fn load_snapshot<A>(
    store: &dyn CommandStore,
    topic: &str,
    partition: u32,
    table: &mut Table<A::State>,
) -> Option<u64>
where
    A: EventCodec,
    A::State: DeserializeOwned,
{
    let snapshot = match store.load_snapshot(topic, partition).await {
        Ok(Some(snapshot)) => snapshot,
        Ok(None) => return None,
        Err(error) => {
            tracing::warn!(%error, topic, partition, "cannot load snapshot; rebuilding from the log");
            return None;
        }
    };
    if snapshot.format != SNAPSHOT_FORMAT {
        tracing::info!(
            topic,
            partition,
            "snapshot in an older format; rebuilding from the log"
        );
        return None;
    }
    let mut aggregates = Vec::with_capacity(snapshot.aggregates.len());
    for (aggregate_id, body) in snapshot.aggregates {
        match serde_json::from_str::<SnapshotSlot<A::State>>(&body) {
            Ok(slot) => aggregates.push((aggregate_id, slot)),
            Err(error) => {
                tracing::warn!(%error, topic, partition, "unreadable snapshot; rebuilding from the log");
                return None;
            }
        }
    }
    let mut commands = Vec::with_capacity(snapshot.outcomes.len());
    for (command_id, body) in snapshot.outcomes {
        match (
            command_id.parse::<Uuid>(),
            serde_json::from_str::<StoredOutcome>(&body),
        ) {
            (Ok(command_id), Ok(outcome)) => commands.push((command_id, outcome)),
            _ => {
                tracing::warn!(
                    topic,
                    partition,
                    "unreadable snapshot; rebuilding from the log"
                );
                return None;
            }
        }
    }
    for (aggregate_id, slot) in aggregates {
        table.aggregates.insert(
            aggregate_id,
            Slot {
                state: Arc::new(slot.state),
                version: slot.version,
                position: slot.position.and_then(|position| position.parse().ok()),
            },
        );
    }
    // Oldest first, as they are forgotten.
    commands.sort_unstable_by_key(|(_, outcome)| outcome.occurred_ms);
    let remembered = table.remembered.entry(partition).or_default();
    for (command_id, outcome) in commands {
        remembered.push_back((outcome.occurred_ms, command_id));
        let log_time = table
            .log_time
            .entry(partition)
            .or_insert(outcome.occurred_ms);
        *log_time = (*log_time).max(outcome.occurred_ms);
        table.commands.insert(command_id, Arc::new(outcome));
    }
    Some(snapshot.next_offset)
}

/// Catches up with the log, then watches it for records the owner did not get acknowledged,
/// until shutdown.
async fn follow<A>(
    inner: Arc<Inner<A>>,
    targets: BTreeMap<u32, u64>,
    mut shutdown: watch::Receiver<bool>,
) where
    A: EventCodec + Send + Sync + 'static,
    A::State: Serialize + DeserializeOwned + Send + Sync,
{
    if !read_until(&inner, &targets, None, &mut shutdown).await {
        return;
    }
    inner.ready.store(true, Ordering::Release);
    tracing::info!(topic = %inner.config.topic, "owner caught up with the log; ready");
    watch_log(&inner, &mut shutdown).await;
}

/// The offset up to which each partition is folded.
fn folded_until<S>(table: &Table<S>, partition: u32) -> u64 {
    table.next_offsets.get(&partition).copied().unwrap_or(0)
}

/// Reads the given partitions from their first unfolded offset until each is folded up to its
/// target, folding every record read. Gives up after `limit`, if one is given; returns false
/// when it stopped for shutdown or gave up.
async fn read_until<A>(
    inner: &Inner<A>,
    targets: &BTreeMap<u32, u64>,
    limit: Option<Duration>,
    shutdown: &mut watch::Receiver<bool>,
) -> bool
where
    A: EventCodec + Send + Sync + 'static,
    A::State: Serialize + DeserializeOwned + Send + Sync,
{
    let topic = &inner.config.topic;
    let behind = || -> Vec<(u32, u64)> {
        let table = lock(&inner.table);
        targets
            .iter()
            .map(|(partition, target)| (*partition, folded_until(&table, *partition), *target))
            .filter(|(_, next, target)| next < target)
            .map(|(partition, next, _)| (partition, next))
            .collect()
    };
    let start = behind();
    if start.is_empty() {
        return true;
    }
    let deadline = limit.map(|limit| Instant::now() + limit);
    let mode = if inner.ready.load(Ordering::Acquire) {
        ReadMode::Latency
    } else {
        ReadMode::Bulk
    };
    let mut reader = loop {
        match inner.log.open_reader(topic, &start, mode).await {
            Ok(reader) => break reader,
            Err(error) => {
                tracing::warn!(%error, %topic, "cannot open a reader of the log; retrying");
                if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    return false;
                }
                tokio::select! {
                    _ = shutdown.changed() => return false,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    while !behind().is_empty() {
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            tracing::warn!(%topic, ?targets, "the log was not read up to the targets in time; will try again");
            return false;
        }
        let batch = tokio::select! {
            _ = shutdown.changed() => return false,
            batch = reader.poll(1000, Duration::from_millis(100)) => batch,
        };
        match batch {
            Ok(records) => {
                for record in &records {
                    read_record(inner, record);
                }
            }
            Err(error) => {
                tracing::warn!(%error, %topic, "reading the log failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    true
}

/// Reads the gaps of a ready owner's partitions (see the module documentation) until shutdown.
async fn watch_log<A>(inner: &Inner<A>, shutdown: &mut watch::Receiver<bool>)
where
    A: EventCodec + Send + Sync + 'static,
    A::State: Serialize + DeserializeOwned + Send + Sync,
{
    let topic = &inner.config.topic;
    // The ends seen at the previous check.
    let mut seen: BTreeMap<u32, u64> = BTreeMap::new();
    let mut next_check = Instant::now() + WATCH_EVERY;
    // When to look again at acknowledgements left waiting.
    let mut recheck: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = inner.gap.notified(), if recheck.is_none() => {
                recheck = Some(Instant::now() + GAP_GRACE);
            }
            _ = tokio::time::sleep_until(recheck.unwrap_or(next_check)), if recheck.is_some() => {
                let (gaps, waiting_since) = stuck_gaps(inner);
                recheck = waiting_since.map(|since| since + GAP_GRACE);
                if !gaps.is_empty() {
                    read_until(inner, &gaps, Some(inner.config.read_back_timeout), shutdown).await;
                    if *shutdown.borrow() {
                        return;
                    }
                    // What the read unblocked is folded; look again at what is left.
                    recheck = Some(Instant::now());
                }
            }
            _ = tokio::time::sleep_until(next_check) => {
                next_check = Instant::now() + WATCH_EVERY;
                let mut ends = BTreeMap::new();
                for &partition in &inner.config.owned {
                    match inner.log.end_offset(topic, partition).await {
                        Ok(end) => {
                            ends.insert(partition, end);
                        }
                        Err(error) => {
                            tracing::warn!(%error, %topic, partition, "cannot ask the log where a partition ends");
                        }
                    }
                }
                let behind: BTreeMap<u32, u64> = {
                    let table = lock(&inner.table);
                    seen.iter()
                        .filter(|(partition, end)| folded_until(&table, **partition) < **end)
                        .map(|(partition, end)| (*partition, *end))
                        .collect()
                };
                seen = ends;
                if !behind.is_empty() {
                    read_until(inner, &behind, Some(inner.config.read_back_timeout), shutdown).await;
                    if *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    }
}

/// The partitions whose oldest waiting acknowledgement has waited [`GAP_GRACE`] or longer, each
/// with the offset up to which it must be read; and when the first of the others started
/// waiting.
fn stuck_gaps<A: EventCodec>(inner: &Inner<A>) -> (BTreeMap<u32, u64>, Option<Instant>) {
    let table = lock(&inner.table);
    let now = Instant::now();
    let mut gaps = BTreeMap::new();
    let mut waiting_since: Option<Instant> = None;
    for (partition, acked) in &table.acked {
        let Some(since) = acked.values().map(|(_, at)| *at).min() else {
            continue;
        };
        let first = acked.keys().next().copied().unwrap_or(0);
        if first <= folded_until(&table, *partition) {
            continue;
        }
        if now.duration_since(since) >= GAP_GRACE {
            gaps.insert(*partition, first);
        } else {
            waiting_since = Some(waiting_since.map_or(since, |earliest| earliest.min(since)));
        }
    }
    (gaps, waiting_since)
}

/// The log acknowledged our append at `position`: fold it, and whatever it unblocks, as soon as
/// every earlier offset of the partition is folded; otherwise leave it waiting for the gap.
fn acknowledged<A: EventCodec>(inner: &Inner<A>, position: Position, envelope: Envelope) {
    let partition = position.partition;
    let (folded, waiting) = {
        let mut table = lock(&inner.table);
        if position.offset < folded_until(&table, partition) {
            // A read of the log got it first and answered.
            return;
        }
        table
            .acked
            .entry(partition)
            .or_default()
            .insert(position.offset, (envelope, Instant::now()));
        let folded = fold_acknowledged::<A>(&mut table, &inner.config.topic, partition);
        let waiting = table
            .acked
            .get(&partition)
            .is_some_and(|acked| !acked.is_empty());
        (folded, waiting)
    };
    if waiting {
        inner.gap.notify_one();
    }
    settle(inner, folded);
}

/// Folds the acknowledged appends that continue the partition from its next offset.
fn fold_acknowledged<A: EventCodec>(
    table: &mut Table<A::State>,
    topic: &str,
    partition: u32,
) -> Vec<Folded> {
    let mut folded = Vec::new();
    loop {
        let next = folded_until(table, partition);
        let Some((envelope, _)) = table
            .acked
            .get_mut(&partition)
            .and_then(|acked| acked.remove(&next))
        else {
            break;
        };
        let position = Position {
            topic: topic.to_owned(),
            partition,
            offset: next,
        };
        folded.push(fold::<A>(table, position, &envelope));
    }
    folded
}

/// One record read from the log: folds it unless an acknowledgement already did, and checks
/// that it is the record acknowledged there, if one was.
fn read_record<A: EventCodec>(inner: &Inner<A>, record: &LogRecord) {
    let partition = record.position.partition;
    let offset = record.position.offset;
    let mut table = lock(&inner.table);
    if offset < folded_until(&table, partition) {
        return;
    }
    let decoded = Envelope::try_from(&record.record);
    let acked = table
        .acked
        .get_mut(&partition)
        .and_then(|acked| acked.remove(&offset))
        .map(|(envelope, _)| envelope);
    let envelope = match decoded {
        Ok(envelope) => envelope,
        Err(error) => {
            tracing::error!(position = %record.position, %error, "undecodable record in the log; skipped");
            table.next_offsets.insert(partition, offset + 1);
            let folded = fold_acknowledged::<A>(&mut table, &inner.config.topic, partition);
            drop(table);
            settle(inner, folded);
            return;
        }
    };
    if let Some(acked) = &acked
        && acked.event_id != envelope.event_id
    {
        // The log acknowledged one record at this offset and holds another: what this owner
        // would fold may not be what readers see. Stop writing here.
        tracing::error!(
            position = %record.position,
            acknowledged = %acked.event_id,
            held = %envelope.event_id,
            "the log holds another record than the one it acknowledged; stepping down"
        );
        lock(&inner.stepped_down).insert(partition);
    }
    let mut folded = vec![fold::<A>(&mut table, record.position.clone(), &envelope)];
    folded.extend(fold_acknowledged::<A>(
        &mut table,
        &inner.config.topic,
        partition,
    ));
    drop(table);
    settle(inner, folded);
}

/// Folds one record, the next of its partition, into the table by the effective-history rule.
fn fold<A: EventCodec>(
    table: &mut Table<A::State>,
    position: Position,
    envelope: &Envelope,
) -> Folded {
    let partition = position.partition;
    table.next_offsets.insert(partition, position.offset + 1);
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
                let Table {
                    aggregates,
                    commands,
                    dirty,
                    log_time,
                    remembered,
                    ..
                } = &mut *table;
                let pending = dirty.entry(partition).or_default();
                let mut changed = pending.aggregates.entry(envelope.aggregate_id.clone());
                // The snapshot's reference to the aggregate's previous state goes first, so the
                // state evolves in place instead of being copied. Every stored aggregate is in
                // the table from start-up on, so one that was not (version 0) is not stored yet.
                let new = match &mut changed {
                    Entry::Occupied(entry) => {
                        entry.get_mut().state = Arc::default();
                        entry.get().new
                    }
                    Entry::Vacant(_) => last == 0,
                };
                let slot = aggregates
                    .entry(envelope.aggregate_id.clone())
                    .or_insert_with(|| Slot {
                        state: Arc::default(),
                        version: 0,
                        position: None,
                    });
                let state = Arc::unwrap_or_clone(std::mem::take(&mut slot.state));
                slot.state = Arc::new(A::evolve(state, &event));
                slot.version = envelope.aggregate_version;
                slot.position = Some(position.clone());
                let latest = Changed {
                    version: slot.version,
                    offset: Some(position.offset),
                    state: slot.state.clone(),
                    new,
                };
                match changed {
                    Entry::Occupied(mut entry) => {
                        *entry.get_mut() = latest;
                    }
                    Entry::Vacant(entry) => {
                        entry.insert(latest);
                    }
                }
                let occurred_ms = envelope.occurred_at.timestamp_millis();
                let log_time = log_time.entry(partition).or_insert(occurred_ms);
                *log_time = (*log_time).max(occurred_ms);
                // Only a command with a fingerprint can be sent again (see the module
                // documentation); nobody asks for the others' outcomes.
                if envelope.request_hash.is_some() {
                    let outcome = Arc::new(StoredOutcome {
                        aggregate_id: envelope.aggregate_id.clone(),
                        version: envelope.aggregate_version,
                        position: position.to_string(),
                        request_hash: envelope.request_hash.clone(),
                        occurred_ms,
                    });
                    commands.insert(envelope.command_id, outcome.clone());
                    // A key used again after it was forgotten: its new outcome must be stored,
                    // not deleted with the old one.
                    pending.forgotten.remove(&envelope.command_id);
                    pending.commands.insert(envelope.command_id, outcome);
                    remembered
                        .entry(partition)
                        .or_default()
                        .push_back((occurred_ms, envelope.command_id));
                }
                forget_expired(table, partition);
            }
            Err(error) => {
                // Every reader skips it alike, so agreement holds; but an event we cannot read
                // is a broken invariant worth an alert.
                tracing::error!(%position, %error, "effective event cannot be decoded; skipped");
                verdict = Verdict::Stale {
                    last_effective: last,
                };
            }
        }
    }
    Folded {
        position,
        event_id: envelope.event_id,
        aggregate_id: envelope.aggregate_id.clone(),
        claimed: envelope.aggregate_version,
        verdict,
    }
}

/// Forgets the partition's outcomes that the idempotency window has left behind its log time;
/// the next snapshot drops those it may have stored.
fn forget_expired<S>(table: &mut Table<S>, partition: u32) {
    let Some(now) = table.log_time.get(&partition).copied() else {
        return;
    };
    let horizon = now.saturating_sub(table.window_ms);
    let Table {
        commands,
        dirty,
        remembered,
        ..
    } = table;
    let Some(queue) = remembered.get_mut(&partition) else {
        return;
    };
    while let Some(&(occurred_ms, command_id)) = queue.front() {
        if occurred_ms >= horizon {
            break;
        }
        queue.pop_front();
        commands.remove(&command_id);
        let pending = dirty.entry(partition).or_default();
        // Not stored yet: it never will be. Otherwise (or when a snapshot now storing it
        // fails and gives it back) the next snapshot deletes it, after its inserts.
        if pending.commands.remove(&command_id).is_none() {
            pending.forgotten.insert(command_id);
        }
    }
}

/// Answers whoever waits for the folded records, and steps down from a partition where a
/// record nobody here wrote appeared.
fn settle<A: EventCodec>(inner: &Inner<A>, folded: Vec<Folded>) {
    for folded in folded {
        let Folded {
            position,
            event_id,
            aggregate_id,
            claimed,
            verdict,
        } = folded;
        if !verdict.is_effective() {
            inner.conflicts.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                %position,
                %aggregate_id,
                claimed,
                ?verdict,
                "record skipped by the effective-history rule"
            );
        }
        let waiter = lock(&inner.waiters).remove(&event_id);
        match waiter {
            Some(waiter) => {
                let answer = if verdict.is_effective() {
                    ReadBack::Effective(position)
                } else {
                    ReadBack::Skipped(verdict)
                };
                let _ = waiter.send(answer);
            }
            None => {
                let ours = lock(&inner.in_doubt).remove(&event_id);
                if !ours && inner.ready.load(Ordering::Acquire) {
                    let newly = lock(&inner.stepped_down).insert(position.partition);
                    if newly {
                        tracing::error!(
                            topic = %inner.config.topic,
                            partition = position.partition,
                            %position,
                            "another writer appended to an owned partition; stepping down from it"
                        );
                    }
                }
            }
        }
    }
}

/// Takes the snapshots that are due, off the reads of the log and the commands' path, until
/// shutdown; then one last time for every partition with changes.
async fn take_snapshots<A>(inner: Arc<Inner<A>>, mut shutdown: watch::Receiver<bool>)
where
    A: EventCodec,
    A::State: Serialize + Send + Sync,
{
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tokio::time::sleep(SNAPSHOT_CHECK) => {}
        }
        if *shutdown.borrow() {
            break;
        }
        save_due_snapshots(&inner, false).await;
    }
    save_due_snapshots(&inner, true).await;
    inner.snapshots_done.send_replace(true);
}

async fn save_due_snapshots<A>(inner: &Inner<A>, all: bool)
where
    A: EventCodec,
    A::State: Serialize,
{
    let mut due: Vec<(u64, u32)> = lock(&inner.table)
        .since_snapshot
        .iter()
        .filter(|(_, count)| **count > 0 && (all || **count >= inner.config.snapshot_every))
        .map(|(partition, count)| (*count, *partition))
        .collect();
    if !all {
        // One partition per round, the one furthest behind: partitions fill at about the
        // same rate, and their snapshots taken back to back would load the database (and the
        // machine) in one long burst.
        due.sort_unstable();
        due.drain(..due.len().saturating_sub(1));
    }
    let due = due.into_iter().map(|(_, partition)| partition);
    for partition in due {
        // The commands wait on the table's lock: it is held only to take what changed, which
        // is serialised and stored outside it.
        let (next_offset, dirty) = {
            let mut table = lock(&inner.table);
            table.since_snapshot.insert(partition, 0);
            let next_offset = folded_until(&table, partition);
            (
                next_offset,
                table.dirty.remove(&partition).unwrap_or_default(),
            )
        };
        let saved = match serialise_snapshot(&inner.config.topic, partition, &dirty).await {
            Ok(SnapshotRows {
                aggregates,
                new_aggregates,
                outcomes,
            }) => inner
                .store
                .save_snapshot(
                    &inner.config.topic,
                    partition,
                    Snapshot {
                        format: SNAPSHOT_FORMAT,
                        next_offset,
                        aggregates,
                        new_aggregates,
                        outcomes,
                        forgotten_outcomes: dirty.forgotten.iter().map(Uuid::to_string).collect(),
                    },
                    dirty.replace,
                )
                .await
                .map_err(|error| error.to_string()),
            Err(error) => Err(format!("cannot serialise a snapshot: {error}")),
        };
        if let Err(error) = saved {
            tracing::warn!(%error, partition, "cannot save snapshot; will retry later");
            // Keep what changed for the next attempt, unless it changed again since.
            let mut table = lock(&inner.table);
            let pending = table.dirty.entry(partition).or_default();
            for (id, changed) in dirty.aggregates {
                pending.aggregates.entry(id).or_insert(changed);
            }
            for (id, outcome) in dirty.commands {
                pending.commands.entry(id).or_insert(outcome);
            }
            // Unless the id has a newer outcome since (a key used again), which must stay.
            for id in dirty.forgotten {
                if !pending.commands.contains_key(&id) {
                    pending.forgotten.insert(id);
                }
            }
            pending.replace |= dirty.replace;
            let count = table.since_snapshot.entry(partition).or_default();
            *count = (*count).max(inner.config.snapshot_every);
        }
    }
}

/// A snapshot's rows as JSON: the aggregates stored before, those created since, the outcomes.
struct SnapshotRows {
    aggregates: Vec<(String, String)>,
    new_aggregates: Vec<(String, String)>,
    outcomes: Vec<(String, String)>,
}

/// Rows serialised between two yields to the other tasks.
const SERIALISE_CHUNK: usize = 250;

/// The rows of a snapshot: each changed aggregate and command outcome as JSON. Thousands of
/// them are serialised a chunk at a time, yielding in between, so the commands on the same
/// workers do not wait for the whole snapshot.
async fn serialise_snapshot<S: Serialize>(
    topic: &str,
    partition: u32,
    dirty: &Dirty<S>,
) -> Result<SnapshotRows, serde_json::Error> {
    let mut aggregates = Vec::new();
    let mut new_aggregates = Vec::new();
    for (index, (id, changed)) in dirty.aggregates.iter().enumerate() {
        if index % SERIALISE_CHUNK == SERIALISE_CHUNK - 1 {
            tokio::task::yield_now().await;
        }
        let slot = SnapshotSlot {
            version: changed.version,
            position: changed.offset.map(|offset| {
                Position {
                    topic: topic.to_owned(),
                    partition,
                    offset,
                }
                .to_string()
            }),
            state: &*changed.state,
        };
        let row = (id.clone(), serde_json::to_string(&slot)?);
        if changed.new || dirty.replace {
            new_aggregates.push(row);
        } else {
            aggregates.push(row);
        }
    }
    let mut outcomes = Vec::with_capacity(dirty.commands.len());
    for (index, (id, outcome)) in dirty.commands.iter().enumerate() {
        if index % SERIALISE_CHUNK == SERIALISE_CHUNK - 1 {
            tokio::task::yield_now().await;
        }
        outcomes.push((id.to_string(), serde_json::to_string(&**outcome)?));
    }
    Ok(SnapshotRows {
        aggregates,
        new_aggregates,
        outcomes,
    })
}
