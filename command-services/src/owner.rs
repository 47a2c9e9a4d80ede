//! The owner of a set of partitions of one aggregate type: it holds those aggregates' current
//! state in memory and decides every command for them (see ARCHITECTURE.md, "one owner per
//! partition makes it fast").
//!
//! - **Taking a partition** ([`Owner::acquire`], as the service's consumer group assigns it;
//!   or at start, for a static share): load its latest snapshot (refused when it covers more
//!   than the log holds), read the log tail up to the end seen when it started, take the
//!   partition's next epoch; only then are its commands decided. **Giving it up**
//!   ([`Owner::release`]): decide nothing more for it, let its commands in flight settle, leave
//!   a last snapshot, forget it.
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
//!   Commands).
//! - **An assumption:** the log holds at an acknowledged offset the record it acknowledged
//!   there (Kafka with an idempotent producer and acks=all). The owner checks it only where a
//!   read of the log meets an acknowledged offset it has not folded yet.
//! - **Fenced writers.** Once caught up, an owner takes the partition's next epoch from the
//!   store ([`CommandStore::acquire_epoch`], above every epoch its records show) and stamps it
//!   on every record it appends (the `owner-epoch` header) and on every snapshot head. A record
//!   of a later epoch means a newer owner took the partition (an instance started for it in a
//!   rolling update, or after this one was frozen): this owner stops deciding for it, answers
//!   "not the owner" (routing information for the gateway), and takes no more snapshots of
//!   it. A record of an earlier epoch is a stale writer's (a zombie): it is judged by the
//!   effective-history rule like any other, and the owner goes on serving. Either way a
//!   command whose own record lost to another writer's is decided again against the new
//!   state, so no client is told of a write that readers skip.
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
use event_log::{LogError, LogRecord, Position, ReadMode, SharedLog, partition_for};
use event_schema::{CommandMeta, Envelope, EventCodec, Record, Verdict, judge};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;
use uuid::Uuid;

use domain::Decision;

use crate::sharded::ShardedMap;
use crate::store::{CommandStore, SaveError, Snapshot};

/// The record header carrying the appending owner's epoch.
pub const EPOCH_HEADER: &str = "owner-epoch";

/// How many times a command whose record lost to another writer's is decided again.
const REDECIDE_LIMIT: u32 = 3;

/// Bumped whenever the snapshot rows change shape; older snapshots are then ignored and the
/// partition is rebuilt from the log. 3: outcomes carry when their event occurred, and only
/// those of commands with a request fingerprint are kept.
pub const SNAPSHOT_FORMAT: u32 = 3;

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
    /// The partitions come from a consumer group ([`Owner::acquire`], [`Owner::release`]):
    /// `owned` is empty, and the owner is ready once told of its first assignment.
    pub assigned_by_group: bool,
    /// Who this owner is, in the store's epoch table (host and process).
    pub holder: String,
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
    /// A newer owner took the partition: its records carry a later epoch than this owner's.
    #[error(
        "partition {partition} has a newer owner (epoch {newer}; this instance's: {ours}); this instance no longer decides for it"
    )]
    Fenced {
        partition: u32,
        ours: u64,
        newer: u64,
    },
    /// A stored snapshot covers more of the log than the log holds: the log lost its tail, or
    /// the topic was recreated. The owner refuses to start rather than decide on state the log
    /// does not have.
    #[error(
        "the snapshot of {topic} partition {partition} covers offsets up to {stored}, but the log ends at {end}: the log lost records or the topic was recreated. The snapshot cannot be trusted; after checking the log, run `platform recover` to drop the snapshots ahead of the log (the owner then rebuilds the partition from the log)"
    )]
    AheadOfLog {
        topic: String,
        partition: u32,
        stored: u64,
        end: u64,
    },
    /// The log held another record than the one it acknowledged to this instance, which no
    /// longer writes to the partition.
    #[error("partition {partition} has another writer; this instance stepped down from it")]
    SteppedDown { partition: u32 },
    /// Another writer's record took the version this command's record claimed, each time the
    /// command was decided again; nothing of it took effect.
    #[error(
        "another writer's records kept taking the aggregate's next version on partition {partition}; nothing was written, retry"
    )]
    Contended { partition: u32 },
    /// The log refused an append or a read; its error is the source.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The log's answer did not come in time, or came to an instance that no longer owns the
    /// partition.
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
    /// The partitions this owner holds (serving or catching up), each with the tenure it holds
    /// it in: a number no earlier holding of the partition had. Whatever started in one
    /// tenure (a read of the log, an append waiting for its acknowledgement, a command) changes
    /// nothing in another, nor in a partition given up.
    live: BTreeMap<u32, u64>,
    tenures: u64,
}

impl<S> Table<S> {
    fn empty(idempotency_window: Duration) -> Self {
        Table {
            aggregates: ShardedMap::new(),
            commands: ShardedMap::new(),
            next_offsets: BTreeMap::new(),
            since_snapshot: BTreeMap::new(),
            dirty: BTreeMap::new(),
            acked: BTreeMap::new(),
            log_time: BTreeMap::new(),
            remembered: BTreeMap::new(),
            window_ms: i64::try_from(idempotency_window.as_millis()).unwrap_or(i64::MAX),
            live: BTreeMap::new(),
            tenures: 0,
        }
    }

    /// Starts a new tenure of `partition`; returns it.
    fn hold(&mut self, partition: u32) -> u64 {
        self.tenures += 1;
        self.live.insert(partition, self.tenures);
        self.tenures
    }

    fn tenure(&self, partition: u32) -> Option<u64> {
        self.live.get(&partition).copied()
    }

    /// Takes in what `other` holds of partitions this table has nothing of.
    fn absorb(&mut self, other: Table<S>) {
        for (id, slot) in other.aggregates.into_entries() {
            self.aggregates.insert(id, slot);
        }
        for (id, outcome) in other.commands.into_entries() {
            self.commands.insert(id, outcome);
        }
        self.next_offsets.extend(other.next_offsets);
        self.since_snapshot.extend(other.since_snapshot);
        self.dirty.extend(other.dirty);
        self.acked.extend(other.acked);
        self.log_time.extend(other.log_time);
        self.remembered.extend(other.remembered);
    }
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
    /// The writer's epoch, for a record read from the log (ours are folded from their
    /// acknowledgement and carry none here).
    epoch: Option<u64>,
}

enum ReadBack {
    Effective(Position),
    Skipped(Verdict),
    /// The partition was given up before the record's verdict was known here.
    Abandoned,
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
    /// Assigned partitions it cannot serve, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub partition: u32,
    pub next_offset: u64,
    /// This owner's epoch on the partition (0 until it has caught up and taken one).
    pub epoch: u64,
    /// The log held another record than it acknowledged: this owner stopped writing here.
    pub stepped_down: bool,
    /// A newer owner's records were seen: this owner no longer decides for the partition.
    pub fenced: bool,
    /// Still catching up with the log: not deciding yet.
    pub loading: bool,
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

/// Its std mutexes are never held across an `.await`, and never two at once except the table's
/// with one of the others taken after it (`read_record`); everything else takes one at a time.
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
    /// This owner's epoch per partition, taken once caught up.
    epochs: Mutex<BTreeMap<u32, u64>>,
    /// Partitions a newer owner took, with the newer epoch seen.
    fenced: Mutex<BTreeMap<u32, u64>>,
    /// The latest epoch seen on each partition's records while catching up.
    seen_epochs: Mutex<BTreeMap<u32, u64>>,
    /// The partitions this owner decides for: caught up, with an epoch.
    serving: Mutex<BTreeSet<u32>>,
    /// Partitions being caught up.
    loading: Mutex<BTreeSet<u32>>,
    /// Commands being decided, per partition; `settled` is woken as each ends.
    in_flight: Mutex<BTreeMap<u32, usize>>,
    settled: Notify,
    /// Assigned partitions this owner cannot serve, and why (state ahead of the log).
    problems: Mutex<BTreeMap<u32, String>>,
    /// Held while a snapshot is taken and stored, so two of one partition (the snapshot task's
    /// and a release's) never overlap: each must be stored before the next is taken.
    snapshotting: tokio::sync::Mutex<()>,
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
        supervisor: &supervisor::Supervisor,
    ) -> Result<Self, CommandError<A::Error>> {
        let mut table = Table::empty(config.idempotency_window);
        let mut targets = BTreeMap::new();
        let mut floors = BTreeMap::new();
        for &partition in &config.owned {
            let (end, epoch) =
                load_partition::<A>(&log, &*store, &config.topic, partition, &mut table).await?;
            table.hold(partition);
            targets.insert(partition, end);
            floors.insert(partition, epoch);
        }
        tracing::debug!(
            topic = %config.topic,
            aggregates = table.aggregates.len(),
            "owner loaded snapshots; reading the log tail"
        );
        let loading = config.owned.iter().copied().collect();
        let inner = Arc::new(Inner {
            log,
            store,
            config,
            table: Mutex::new(table),
            locks: Mutex::new(HashMap::new()),
            waiters: Mutex::new(HashMap::new()),
            in_doubt: Mutex::new(HashSet::new()),
            stepped_down: Mutex::new(BTreeSet::new()),
            epochs: Mutex::new(BTreeMap::new()),
            fenced: Mutex::new(BTreeMap::new()),
            seen_epochs: Mutex::new(floors),
            serving: Mutex::new(BTreeSet::new()),
            loading: Mutex::new(loading),
            in_flight: Mutex::new(BTreeMap::new()),
            settled: Notify::new(),
            problems: Mutex::new(BTreeMap::new()),
            snapshotting: tokio::sync::Mutex::new(()),
            gap: Notify::new(),
            ready: AtomicBool::new(false),
            conflicts: AtomicU64::new(0),
            snapshots_done: watch::Sender::new(false),
        });
        supervisor.spawn(
            format!("owner of {}", inner.config.topic),
            follow(inner.clone(), targets, shutdown.clone()),
        );
        supervisor.spawn(
            format!("snapshots of {}", inner.config.topic),
            take_snapshots(inner.clone(), shutdown),
        );
        Ok(Owner { inner })
    }

    /// Caught up with every partition it owns, and none it was given is refused.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire) && lock(&self.inner.problems).is_empty()
    }

    /// For an owner whose partitions come from a consumer group: its first assignment has been
    /// taken up (it may be empty), so it is ready to answer (and to send elsewhere).
    pub fn mark_ready(&self) {
        if !self.inner.ready.swap(true, Ordering::AcqRel) {
            tracing::debug!(topic = %self.inner.config.topic, "owner ready");
        }
    }

    /// Partitions this owner holds but a newer owner's records fenced it off.
    pub fn fenced(&self) -> Vec<u32> {
        lock(&self.inner.fenced).keys().copied().collect()
    }

    /// The partitions this owner decides for now.
    pub fn serving(&self) -> Vec<u32> {
        lock(&self.inner.serving).iter().copied().collect()
    }

    /// Starts owning `partition` (assigned by the group): loads its snapshot, reads its log to
    /// the end, takes its next epoch, then decides its commands. Until then its commands are
    /// answered "not ready". Fails when the snapshot is ahead of the log, or shutdown came.
    pub async fn acquire(
        &self,
        partition: u32,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), CommandError<A::Error>> {
        let inner = &self.inner;
        let topic = &inner.config.topic;
        lock(&inner.loading).insert(partition);
        // Taken again (fenced while still assigned): nothing is decided until caught up anew.
        lock(&inner.serving).remove(&partition);
        let mut staged = Table::empty(inner.config.idempotency_window);
        let loaded =
            load_partition::<A>(&inner.log, &*inner.store, topic, partition, &mut staged).await;
        let (end, head_epoch) = match loaded {
            Ok(loaded) => loaded,
            Err(error) => {
                lock(&inner.loading).remove(&partition);
                let abandoned = {
                    let mut table = lock(&inner.table);
                    table.live.remove(&partition);
                    clear_partition(&mut table, partition, inner.config.partitions)
                };
                abandon(inner, abandoned);
                return Err(error);
            }
        };
        let abandoned = {
            let mut table = lock(&inner.table);
            let abandoned = clear_partition(&mut table, partition, inner.config.partitions);
            table.absorb(staged);
            table.hold(partition);
            abandoned
        };
        abandon(inner, abandoned);
        // The epoch taken once caught up passes the snapshot's and every record's.
        lock(&inner.seen_epochs).insert(partition, head_epoch);
        lock(&inner.epochs).remove(&partition);
        lock(&inner.fenced).remove(&partition);
        lock(&inner.stepped_down).remove(&partition);
        let targets = BTreeMap::from([(partition, end)]);
        let caught_up = read_until(inner, &targets, None, shutdown).await
            && acquire_epochs(inner, &[partition], shutdown).await;
        lock(&inner.loading).remove(&partition);
        if !caught_up {
            return Err(CommandError::NotReady);
        }
        lock(&inner.serving).insert(partition);
        tracing::debug!(%topic, partition, "partition caught up; deciding its commands");
        Ok(())
    }

    /// Stops owning `partition` (revoked by the group): decides nothing more for it, waits for
    /// its commands in flight to settle (at most the read-back timeout), takes its last
    /// snapshot for the next owner, and forgets it.
    pub async fn release(&self, partition: u32) {
        let inner = &self.inner;
        let was_serving = lock(&inner.serving).remove(&partition);
        lock(&inner.loading).remove(&partition);
        let deadline = Instant::now() + inner.config.read_back_timeout;
        loop {
            let settled = inner.settled.notified();
            if lock(&inner.in_flight).get(&partition).copied().unwrap_or(0) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                tracing::warn!(topic = %inner.config.topic, partition, "commands still in flight on a released partition");
                break;
            }
        }
        if was_serving {
            save_snapshot_of(inner, partition).await;
        }
        let abandoned = {
            let mut table = lock(&inner.table);
            table.live.remove(&partition);
            clear_partition(&mut table, partition, inner.config.partitions)
        };
        abandon(inner, abandoned);
        lock(&inner.epochs).remove(&partition);
        lock(&inner.fenced).remove(&partition);
        lock(&inner.stepped_down).remove(&partition);
        lock(&inner.seen_epochs).remove(&partition);
        tracing::info!(topic = %inner.config.topic, partition, "partition released");
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
        // Copies, one lock at a time, then the table's (see `Inner`).
        let stepped_down = lock(&self.inner.stepped_down).clone();
        let epochs = lock(&self.inner.epochs).clone();
        let fenced = lock(&self.inner.fenced).clone();
        let loading = lock(&self.inner.loading).clone();
        let serving = lock(&self.inner.serving).clone();
        let problems = lock(&self.inner.problems).values().cloned().collect();
        let ready = self.is_ready();
        let table = lock(&self.inner.table);
        OwnerStatus {
            topic: self.inner.config.topic.clone(),
            ready,
            aggregates: table.aggregates.len(),
            conflicts: self.inner.conflicts.load(Ordering::Relaxed),
            partitions: table
                .next_offsets
                .iter()
                .filter(|(partition, _)| serving.contains(partition) || loading.contains(partition))
                .map(|(partition, next_offset)| PartitionStatus {
                    partition: *partition,
                    next_offset: *next_offset,
                    epoch: epochs.get(partition).copied().unwrap_or(0),
                    stepped_down: stepped_down.contains(partition),
                    fenced: fenced.contains_key(partition),
                    loading: loading.contains(partition),
                })
                .collect(),
            problems,
        }
    }

    /// Whether this instance decides for `aggregate_id` now (ready, serving its partition,
    /// not fenced): the checks [`Owner::execute`] starts with, for a caller that must do
    /// something outside the log first only where the command will be decided here.
    pub fn decides_for(&self, aggregate_id: &str) -> Result<u32, CommandError<A::Error>> {
        // The partition decides, not the instance: a problem with one partition (reported in
        // `is_ready`) leaves the others serving.
        if !self.inner.ready.load(Ordering::Acquire) {
            return Err(CommandError::NotReady);
        }
        let partition = partition_for(aggregate_id, self.inner.config.partitions);
        if !lock(&self.inner.serving).contains(&partition) {
            return Err(if lock(&self.inner.loading).contains(&partition) {
                CommandError::NotReady
            } else {
                CommandError::NotOwner { partition }
            });
        }
        self.check_serving(partition)?;
        Ok(partition)
    }

    /// Decides and carries out one command; see the module documentation.
    pub async fn execute(
        &self,
        request: CommandRequest<A::Command>,
    ) -> Result<Outcome, CommandError<A::Error>> {
        let partition = self.decides_for(&request.aggregate_id)?;
        let _in_flight = InFlight::enter(&self.inner, partition);
        // The tenure and epoch this command is decided in: given up or taken again meanwhile,
        // the partition refuses it (see `Table::live`).
        let Some(tenure) = lock(&self.inner.table).tenure(partition) else {
            return Err(CommandError::NotOwner { partition });
        };
        let epoch = lock(&self.inner.epochs)
            .get(&partition)
            .copied()
            .unwrap_or(0);
        let held = Held {
            partition,
            tenure,
            epoch,
        };
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
        let mut result = self.execute_locked(&request, &held).await;
        let mut redecided = 0;
        // Our record lost to another writer's (folded by now): decide again on the new state,
        // unless a newer owner took the partition meanwhile.
        while matches!(result, Err(CommandError::Contended { .. })) && redecided < REDECIDE_LIMIT {
            redecided += 1;
            result = match self.check_serving(partition) {
                Ok(()) => self.execute_locked(&request, &held).await,
                Err(error) => Err(error),
            };
        }
        drop(guard);
        let mut locks = lock(&self.inner.locks);
        // Only the map and this function hold it: nobody else waits, forget it.
        if Arc::strong_count(&aggregate_lock) == 2 {
            locks.remove(&request.aggregate_id);
        }
        result
    }

    /// Refuses a partition this owner no longer decides for.
    fn check_serving(&self, partition: u32) -> Result<(), CommandError<A::Error>> {
        if lock(&self.inner.stepped_down).contains(&partition) {
            return Err(CommandError::SteppedDown { partition });
        }
        // One lock at a time (see `Inner`).
        let newer = lock(&self.inner.fenced).get(&partition).copied();
        if let Some(newer) = newer {
            let ours = lock(&self.inner.epochs)
                .get(&partition)
                .copied()
                .unwrap_or(0);
            return Err(CommandError::Fenced {
                partition,
                ours,
                newer,
            });
        }
        Ok(())
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
        held: &Held,
    ) -> Result<Outcome, CommandError<A::Error>> {
        let partition = held.partition;
        // A copy of this command may have finished while we waited for the lock.
        if let Some(outcome) = self.repeated(&request.meta)? {
            return Ok(outcome);
        }
        let (state, version, last_position) = {
            let table = lock(&self.inner.table);
            if table.tenure(partition) != Some(held.tenure) {
                return Err(CommandError::NotOwner { partition });
            }
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
        let mut record = Record::from(&envelope);
        record.headers.push(event_schema::Header {
            name: EPOCH_HEADER.to_owned(),
            value: held.epoch.to_string(),
        });
        let (sender, read_back) = oneshot::channel();
        lock(&self.inner.waiters).insert(event_id, sender);
        let appended = self
            .inner
            .log
            .append(&self.inner.config.topic, partition, record)
            .await;
        match appended {
            Ok(position) => acknowledged::<A>(&self.inner, position, envelope, held.tenure),
            Err(error) => {
                self.forget_waiter(event_id);
                return Err(CommandError::Log(error));
            }
        }
        match tokio::time::timeout(self.inner.config.read_back_timeout, read_back).await {
            Ok(Ok(ReadBack::Effective(position))) => Ok(Outcome::Appended {
                version: version + 1,
                position,
            }),
            Ok(Ok(ReadBack::Abandoned)) => Err(CommandError::Unavailable(
                "this instance gave up the partition before its record's verdict was known; \
                 retry (with the same Idempotency-Key, a retry is recognised)"
                    .into(),
            )),
            Ok(Ok(ReadBack::Skipped(verdict))) => {
                tracing::warn!(aggregate_id = %request.aggregate_id, ?verdict, "own record skipped by the effective-history rule; deciding again");
                Err(CommandError::Contended { partition })
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

/// A partition's snapshot, read and parsed, to install into the table.
struct Loaded<S> {
    next_offset: u64,
    /// The epoch of the owner that took it.
    epoch: u64,
    aggregates: Vec<(String, SnapshotSlot<S>)>,
    commands: Vec<(Uuid, StoredOutcome)>,
}

/// Reads a partition's snapshot; `None` when there is no usable one (the partition is then
/// rebuilt from the log).
async fn load_snapshot<A>(
    store: &dyn CommandStore,
    topic: &str,
    partition: u32,
) -> Option<Loaded<A::State>>
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
    Some(Loaded {
        next_offset: snapshot.next_offset,
        epoch: snapshot.epoch,
        aggregates,
        commands,
    })
}

/// Puts a loaded snapshot into the table; returns the offset it covers.
fn install_snapshot<S>(table: &mut Table<S>, partition: u32, loaded: Loaded<S>) -> u64 {
    let Loaded {
        next_offset,
        aggregates,
        mut commands,
        ..
    } = loaded;
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
    next_offset
}

/// The partition a command is decided in, with the tenure and epoch it held when the command
/// arrived.
struct Held {
    partition: u32,
    tenure: u64,
    epoch: u64,
}

/// A command being decided on a partition, counted while it lives (see [`Owner::release`]).
struct InFlight<'a, A: EventCodec> {
    inner: &'a Inner<A>,
    partition: u32,
}

impl<'a, A: EventCodec> InFlight<'a, A> {
    fn enter(inner: &'a Inner<A>, partition: u32) -> Self {
        *lock(&inner.in_flight).entry(partition).or_default() += 1;
        InFlight { inner, partition }
    }
}

impl<A: EventCodec> Drop for InFlight<'_, A> {
    fn drop(&mut self) {
        if let Some(count) = lock(&self.inner.in_flight).get_mut(&self.partition) {
            *count = count.saturating_sub(1);
        }
        self.inner.settled.notify_waiters();
    }
}

/// Loads a partition's snapshot into `table`; returns where the log ends and the snapshot's
/// epoch (0 without one). Refuses a snapshot beyond that end.
async fn load_partition<A>(
    log: &SharedLog,
    store: &dyn CommandStore,
    topic: &str,
    partition: u32,
    table: &mut Table<A::State>,
) -> Result<(u64, u64), CommandError<A::Error>>
where
    A: EventCodec,
    A::State: DeserializeOwned,
{
    // The snapshot first: it covers only records already in the log, so an end read after it
    // is at least as far, even while the previous owner is still writing (a hand-over).
    let loaded = load_snapshot::<A>(store, topic, partition).await;
    let end = log.end_offset(topic, partition).await?;
    if let Some(loaded) = &loaded
        && loaded.next_offset > end
    {
        return Err(CommandError::AheadOfLog {
            topic: topic.to_owned(),
            partition,
            stored: loaded.next_offset,
            end,
        });
    }
    table.dirty.entry(partition).or_default().replace = loaded.is_none();
    let epoch = loaded.as_ref().map_or(0, |loaded| loaded.epoch);
    let next = loaded.map_or(0, |loaded| install_snapshot(table, partition, loaded));
    table.next_offsets.insert(partition, next);
    Ok((end, epoch))
}

/// Forgets everything the table holds of a partition; returns the event ids of our appends that
/// were acknowledged but not folded yet, whose commands wait for an answer.
fn clear_partition<S>(table: &mut Table<S>, partition: u32, partitions: u32) -> Vec<Uuid> {
    table
        .aggregates
        .retain(|id, _| partition_for(id, partitions) != partition);
    table
        .commands
        .retain(|_, outcome| partition_for(&outcome.aggregate_id, partitions) != partition);
    table.next_offsets.remove(&partition);
    table.since_snapshot.remove(&partition);
    table.dirty.remove(&partition);
    let abandoned = table
        .acked
        .remove(&partition)
        .map(|acked| {
            acked
                .values()
                .map(|(envelope, _)| envelope.event_id)
                .collect()
        })
        .unwrap_or_default();
    table.log_time.remove(&partition);
    table.remembered.remove(&partition);
    abandoned
}

/// Tells the commands waiting for these records that the partition was given up.
fn abandon<A: EventCodec>(inner: &Inner<A>, event_ids: Vec<Uuid>) {
    let mut waiters = lock(&inner.waiters);
    for event_id in event_ids {
        if let Some(waiter) = waiters.remove(&event_id) {
            let _ = waiter.send(ReadBack::Abandoned);
        }
    }
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
    if !acquire_epochs(&inner, &inner.config.owned, &mut shutdown).await {
        return;
    }
    lock(&inner.serving).extend(inner.config.owned.iter().copied());
    lock(&inner.loading).clear();
    if !inner.config.assigned_by_group {
        inner.ready.store(true, Ordering::Release);
    }
    tracing::debug!(topic = %inner.config.topic, "owner caught up with the log; ready");
    watch_log(&inner, &mut shutdown).await;
}

/// Takes this owner's epoch of every owned partition, above any epoch its records showed while
/// catching up (the store's count may have been lost while the log kept its records), retrying
/// while the store is unavailable; false when shutdown came first.
async fn acquire_epochs<A: EventCodec>(
    inner: &Inner<A>,
    partitions: &[u32],
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    for &partition in partitions {
        let seen = lock(&inner.seen_epochs)
            .get(&partition)
            .copied()
            .unwrap_or(0);
        loop {
            let acquired = inner
                .store
                .acquire_epoch(&inner.config.topic, partition, &inner.config.holder, seen)
                .await;
            match acquired {
                Ok(epoch) => {
                    lock(&inner.epochs).insert(partition, epoch);
                    tracing::debug!(topic = %inner.config.topic, partition, epoch, "owning the partition");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, topic = %inner.config.topic, partition, "cannot take an owner epoch; retrying");
                    tokio::select! {
                        _ = shutdown.changed() => return false,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
    true
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
    // Each target in the tenure it is held in now; a read that outlives it stops (false).
    let tenures: BTreeMap<u32, u64> = {
        let table = lock(&inner.table);
        targets
            .keys()
            .filter_map(|partition| table.tenure(*partition).map(|tenure| (*partition, tenure)))
            .collect()
    };
    let behind = || -> Option<Vec<(u32, u64)>> {
        let table = lock(&inner.table);
        let mut behind = Vec::new();
        for (partition, target) in targets {
            if tenures.get(partition).copied() != table.tenure(*partition) {
                return None;
            }
            let next = folded_until(&table, *partition);
            if next < *target {
                behind.push((*partition, next));
            }
        }
        Some(behind)
    };
    let Some(start) = behind() else {
        return false;
    };
    if start.is_empty() {
        return true;
    }
    let deadline = limit.map(|limit| Instant::now() + limit);
    let catching_up = {
        let loading = lock(&inner.loading);
        targets.keys().any(|partition| loading.contains(partition))
    };
    let mode = if inner.ready.load(Ordering::Acquire) && !catching_up {
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
    loop {
        match behind() {
            None => return false,
            Some(behind) if behind.is_empty() => return true,
            Some(_) => {}
        }
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
                    if !read_record(inner, record, &tenures) {
                        return false;
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, %topic, "reading the log failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
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
                let serving: Vec<u32> = lock(&inner.serving).iter().copied().collect();
                // One request for all of them (Kafka: one ListOffsets).
                let ends: BTreeMap<u32, u64> = match inner.log.end_offsets(topic, &serving).await {
                    Ok(ends) => ends.into_iter().collect(),
                    Err(error) => {
                        tracing::warn!(%error, %topic, "cannot ask the log where the partitions end");
                        BTreeMap::new()
                    }
                };
                let behind: BTreeMap<u32, u64> = {
                    let table = lock(&inner.table);
                    // Only partitions still held: one given up since is nobody's to read here.
                    seen.iter()
                        .filter(|(partition, _)| table.tenure(**partition).is_some())
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
fn acknowledged<A: EventCodec>(
    inner: &Inner<A>,
    position: Position,
    envelope: Envelope,
    tenure: u64,
) {
    let partition = position.partition;
    let (folded, waiting) = {
        let mut table = lock(&inner.table);
        if table.tenure(partition) != Some(tenure) {
            // Given up (or taken again) since the append: nothing to fold it into.
            drop(table);
            abandon(inner, vec![envelope.event_id]);
            return;
        }
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
/// Returns false when the read should stop: its partition's tenure has ended, or it is out of
/// step with what is folded (a record beyond the next offset).
fn read_record<A: EventCodec>(
    inner: &Inner<A>,
    record: &LogRecord,
    tenures: &BTreeMap<u32, u64>,
) -> bool {
    let partition = record.position.partition;
    let offset = record.position.offset;
    let mut table = lock(&inner.table);
    if tenures.get(&partition).copied() != table.tenure(partition) {
        return false;
    }
    let next = folded_until(&table, partition);
    if offset < next {
        return true;
    }
    if offset > next {
        tracing::warn!(position = %record.position, next, "a read of the log skipped offsets; reading again");
        return false;
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
            return true;
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
    let mut first = fold::<A>(&mut table, record.position.clone(), &envelope);
    first.epoch = record
        .record
        .header(EPOCH_HEADER)
        .and_then(|epoch| epoch.parse().ok());
    let mut folded = vec![first];
    folded.extend(fold_acknowledged::<A>(
        &mut table,
        &inner.config.topic,
        partition,
    ));
    drop(table);
    settle(inner, folded);
    true
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
        epoch: None,
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

/// Answers whoever waits for the folded records, and stops deciding for a partition where a
/// newer owner's record appeared.
fn settle<A: EventCodec>(inner: &Inner<A>, folded: Vec<Folded>) {
    for folded in folded {
        let Folded {
            position,
            event_id,
            aggregate_id,
            claimed,
            verdict,
            epoch,
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
                if !ours {
                    foreign_record(inner, &position, epoch.unwrap_or(0));
                }
            }
        }
    }
}

/// A record this owner did not write: a newer owner's fences this one off the partition; an
/// older one's (a zombie's) is only noted. Before this owner has its epoch (catching up), the
/// latest epoch seen is kept, so the one it takes is above it.
fn foreign_record<A: EventCodec>(inner: &Inner<A>, position: &Position, epoch: u64) {
    let partition = position.partition;
    let Some(ours) = lock(&inner.epochs).get(&partition).copied() else {
        let mut seen = lock(&inner.seen_epochs);
        let latest = seen.entry(partition).or_insert(epoch);
        *latest = (*latest).max(epoch);
        return;
    };
    if epoch > ours {
        let mut fenced = lock(&inner.fenced);
        if !fenced.contains_key(&partition) {
            tracing::warn!(
                topic = %inner.config.topic,
                partition,
                %position,
                ours,
                newer = epoch,
                "a newer owner wrote to the partition; no longer deciding for it"
            );
        }
        let newer = fenced.entry(partition).or_insert(epoch);
        *newer = (*newer).max(epoch);
    } else {
        tracing::warn!(
            topic = %inner.config.topic,
            partition,
            %position,
            ours,
            theirs = epoch,
            "a writer of an earlier epoch (a zombie) appended to the partition; its record is judged by the effective-history rule"
        );
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
    // Only partitions this owner decides for: nobody snapshots a partition it does not own.
    let epochs = lock(&inner.epochs).clone();
    let fenced: BTreeSet<u32> = lock(&inner.fenced).keys().copied().collect();
    let stepped_down = lock(&inner.stepped_down).clone();
    let mut due: Vec<(u64, u32)> = lock(&inner.table)
        .since_snapshot
        .iter()
        .filter(|(_, count)| **count > 0 && (all || **count >= inner.config.snapshot_every))
        .filter(|(partition, _)| {
            epochs.contains_key(partition)
                && !fenced.contains(partition)
                && !stepped_down.contains(partition)
        })
        .map(|(partition, count)| (*count, *partition))
        .collect();
    if !all {
        // One partition per round, the one furthest behind: partitions fill at about the
        // same rate, and their snapshots taken back to back would load the database (and the
        // machine) in one long burst.
        due.sort_unstable();
        due.drain(..due.len().saturating_sub(1));
    }
    for (_, partition) in due {
        save_snapshot_of(inner, partition).await;
    }
}

/// Takes and stores the snapshot of one partition this owner decides for (with its epoch); on
/// failure keeps its changes for the next one.
async fn save_snapshot_of<A>(inner: &Inner<A>, partition: u32)
where
    A: EventCodec,
    A::State: Serialize,
{
    let _one_at_a_time = inner.snapshotting.lock().await;
    let Some(epoch) = lock(&inner.epochs).get(&partition).copied() else {
        return;
    };
    if lock(&inner.fenced).contains_key(&partition)
        || lock(&inner.stepped_down).contains(&partition)
    {
        return;
    }
    {
        // The commands wait on the table's lock: it is held only to take what changed, which
        // is serialised and stored outside it.
        let (tenure, next_offset, dirty) = {
            let mut table = lock(&inner.table);
            let Some(tenure) = table.tenure(partition) else {
                return;
            };
            table.since_snapshot.insert(partition, 0);
            let next_offset = folded_until(&table, partition);
            (
                tenure,
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
                        epoch,
                        aggregates,
                        new_aggregates,
                        outcomes,
                        forgotten_outcomes: dirty.forgotten.iter().map(Uuid::to_string).collect(),
                    },
                    dirty.replace,
                )
                .await
                .map_err(|error| match error {
                    SaveError::Superseded { stored_epoch, .. } if stored_epoch > epoch => {
                        // A newer owner's snapshot: it owns the partition now (unless this
                        // owner has taken the partition again since, with a newer epoch).
                        if lock(&inner.epochs).get(&partition) == Some(&epoch) {
                            lock(&inner.fenced).entry(partition).or_insert(stored_epoch);
                        }
                        error.to_string()
                    }
                    error => error.to_string(),
                }),
            Err(error) => Err(format!("cannot serialise a snapshot: {error}")),
        };
        if let Err(error) = saved {
            tracing::warn!(%error, partition, "cannot save snapshot; will retry later");
            // Keep what changed for the next attempt, unless it changed again since; nothing
            // of a tenure that has ended since (the next one loads its own snapshot).
            let mut table = lock(&inner.table);
            if table.tenure(partition) != Some(tenure) {
                return;
            }
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

#[async_trait::async_trait]
impl<A> crate::consumer::Ownership for Owner<A>
where
    A: EventCodec + Send + Sync + 'static,
    A::State: Serialize + DeserializeOwned + Send + Sync,
    A::Command: Send + Sync,
    A::Event: Send,
    A::Error: Send + std::fmt::Display,
{
    async fn acquire(
        &self,
        partition: u32,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        Owner::acquire(self, partition, shutdown)
            .await
            .map_err(|error| error.to_string())
    }

    async fn release(&self, partition: u32) {
        Owner::release(self, partition).await;
    }

    fn assigned(&self) {
        self.mark_ready();
    }

    fn fenced(&self) -> Vec<u32> {
        Owner::fenced(self)
    }

    fn report(&self, partition: u32, problem: Option<String>) {
        let mut problems = lock(&self.inner.problems);
        match problem {
            Some(problem) => {
                problems.insert(partition, problem);
            }
            None => {
                problems.remove(&partition);
            }
        }
    }
}
