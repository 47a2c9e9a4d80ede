//! The embedded backend: the log in a local SQLite file (WAL mode), for `cargo run` without a
//! broker and for single-node use.
//!
//! One writer thread owns the only write connection. Appends from any number of tasks queue up
//! for it and it commits whatever has queued as one transaction (group commit), so a burst of
//! commands costs one commit, not one each. The writer is a thread with a rusqlite connection,
//! not a task, so commits go on while the runtime's workers are busy (see [`write_loop`]). With
//! [`Durability::Fsync`] (the default) a commit returns only once the WAL is synced to disk
//! (`synchronous=FULL`: one fsync per group commit), so an acknowledged append survives a
//! power loss, and no reader (a projection, the saga, a snapshot) sees a record before it is on
//! disk: no store derived from the log can get ahead of it. [`Durability::Os`] leaves the WAL to
//! the operating system (`synchronous=NORMAL`): it survives a crash of the process, not of the
//! machine. SQLite's own checkpoint, in the commit that fills the WAL to 1000 pages, copies it
//! into the database file and syncs that.
//! Checkpoints beside the writer, on a connection of their own, make the p99 worse, not better
//! (BENCHMARKS.md, Commands).
//!
//! Readers share a pool of read connections and sleep on a watch channel that the writer bumps
//! after each commit, so a tailing reader sees a new record within microseconds rather than
//! after a poll interval.
//!
//! After each commit the writer also keeps, per partition, the end offset and the most recent
//! records it wrote ([`RECENT`] of them) in memory. A reader woken by a commit looks there
//! first: a partition with nothing new costs it no query, and a reader close behind the end
//! (every tail, most of the time) takes its records from memory. Only a reader further behind
//! queries SQLite. Another process writing the same file does not wake this one's readers, so
//! a reader still queries every partition when its wait times out, and at least every
//! [`RECHECK`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use event_schema::{Header, Record};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, Row, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    EventLog, GroupEvent, GroupMember, LogError, LogReader, LogRecord, Position, ReadMode,
    TopicPartition,
};

/// Most records one group commit writes.
const MAX_BATCH: usize = 1000;

/// Where a partition ends: the offset its next record takes. The writer asks it (once per
/// partition and batch) and so does [`EventLog::end_offset`].
const END_OFFSET: &str =
    r#"SELECT COALESCE(MAX("offset") + 1, 0) FROM records WHERE topic = ?1 AND partition = ?2"#;

/// How many of the latest records of each partition the writer keeps in memory for readers.
const RECENT: usize = 256;

/// A reader woken only by this process's commits still queries every partition this often, for
/// records other processes wrote to the same file.
const RECHECK: Duration = Duration::from_millis(100);

struct AppendRequest {
    topic: String,
    partition: u32,
    record: Record,
    done: oneshot::Sender<Result<Position, LogError>>,
}

/// When an append counts as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// On disk: each group commit is synced before it is acknowledged or read.
    #[default]
    Fsync,
    /// Handed to the operating system: survives the process, not a power loss, kernel crash
    /// or VM reset (which lose what was acknowledged since the last checkpoint).
    Os,
}

/// The log in a SQLite file.
#[derive(Debug, Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    reads: SqlitePool,
    appends: mpsc::Sender<AppendRequest>,
    /// Bumped after every commit; readers wait on it.
    committed: watch::Receiver<u64>,
    /// What this process's writer committed last, per partition.
    heads: Arc<Heads>,
    /// For the rare writes that are not appends (topic creation).
    admin: tokio::sync::Mutex<SqliteConnection>,
    partitions: RwLock<HashMap<String, u32>>,
    /// Consumer groups of this process (the embedded backend is single-node).
    groups: std::sync::Mutex<HashMap<String, GroupState>>,
    /// Bumped whenever a group's membership changes.
    group_changes: watch::Sender<u64>,
    /// `PRAGMA synchronous` of the writer's connection (2: FULL, 1: NORMAL).
    writer_synchronous: i64,
}

/// Per topic and partition, what this process's writer committed last.
#[derive(Debug, Default)]
struct Heads {
    partitions: std::sync::Mutex<HashMap<TopicPartition, Head>>,
}

#[derive(Debug, Default)]
struct Head {
    /// The offset after the last record this process committed.
    end: u64,
    /// The latest records committed here, contiguous, ending at `end`.
    recent: VecDeque<LogRecord>,
}

/// Where a partition's next records are, as far as the heads know.
enum Found {
    /// Taken from memory (maybe none: the reader is at the end).
    Records(Vec<LogRecord>),
    /// This process's writer has written nothing new there.
    Nothing,
    /// Not in memory: query the file.
    Query,
}

impl Heads {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TopicPartition, Head>> {
        self.partitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records the committed batch.
    fn committed(&self, records: Vec<LogRecord>) {
        let mut heads = self.lock();
        for record in records {
            let key = (record.position.topic.clone(), record.position.partition);
            let head = heads.entry(key).or_default();
            let offset = record.position.offset;
            if offset != head.end || head.recent.is_empty() {
                // Another process wrote in between (or this is the first record seen here):
                // what is kept must stay contiguous.
                head.recent.clear();
            }
            head.end = offset + 1;
            head.recent.push_back(record);
            if head.recent.len() > RECENT {
                head.recent.pop_front();
            }
        }
    }

    /// Up to `limit` records of a partition from `next`, if memory can tell.
    fn find(&self, topic: &str, partition: u32, next: u64, limit: usize) -> Found {
        let heads = self.lock();
        let Some(head) = heads.get(&(topic.to_owned(), partition)) else {
            return Found::Nothing;
        };
        if next >= head.end {
            return Found::Nothing;
        }
        match head.recent.front() {
            Some(first) if next >= first.position.offset => Found::Records(
                head.recent
                    .iter()
                    .skip((next - first.position.offset) as usize)
                    .take(limit)
                    .cloned()
                    .collect(),
            ),
            _ => Found::Query,
        }
    }
}

/// Reads up to `max` records over `partitions` (each with the next offset to read, advanced
/// past what is returned), from memory where the heads can tell and from the file otherwise.
/// `thorough` also queries the partitions where this process wrote nothing new (another
/// process may have).
async fn read_partitions<'a>(
    pool: &SqlitePool,
    heads: &Heads,
    partitions: impl Iterator<Item = (&'a str, u32, &'a mut u64)>,
    count: usize,
    max: usize,
    thorough: bool,
) -> Result<Vec<LogRecord>, LogError> {
    let mut partitions: Vec<(&str, u32, &mut u64)> = partitions.collect();
    let mut records = Vec::new();
    // Each partition gets an equal share of `max`; what partitions near their end leave unused
    // goes, in further rounds, to those that filled their share (so a reader catching up on a
    // few long partitions still gets full batches).
    let mut open: Vec<usize> = (0..partitions.len()).collect();
    let mut share_of = count.max(1);
    while !open.is_empty() && records.len() < max {
        let per_partition = (max - records.len()).div_ceil(share_of).max(1);
        let mut filled = Vec::new();
        for index in open {
            if records.len() >= max {
                break;
            }
            let (topic, partition, next) = &mut partitions[index];
            let (topic, partition) = (*topic, *partition);
            let fetched = match heads.find(topic, partition, **next, per_partition) {
                Found::Records(found) if !found.is_empty() => found,
                Found::Nothing | Found::Records(_) if !thorough => continue,
                _ => fetch_partition(pool, topic, partition, **next, per_partition).await?,
            };
            if let Some(last) = fetched.last() {
                **next = last.position.offset + 1;
            }
            if fetched.len() >= per_partition {
                filled.push(index);
            }
            records.extend(fetched);
        }
        share_of = filled.len();
        open = filled;
    }
    Ok(records)
}

#[derive(Debug, Default)]
struct GroupState {
    members: BTreeSet<u64>,
    generation: u64,
}

static NEXT_MEMBER: AtomicU64 = AtomicU64::new(1);

impl std::fmt::Debug for AppendRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AppendRequest({}:{})", self.topic, self.partition)
    }
}

fn unavailable(error: impl std::error::Error + Send + Sync + 'static) -> LogError {
    LogError::Backend {
        backend: "embedded log",
        source: Arc::new(error),
    }
}

fn options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // With WAL, NORMAL survives a process crash (kill -9); only an OS crash can lose the
        // last transactions.
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
}

impl EmbeddedLog {
    /// Opens (creating when missing) the log file at `path` and starts its writer thread, with
    /// fsync-durable appends.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, LogError> {
        Self::open_with(path, Durability::Fsync).await
    }

    /// Opens the log as [`EmbeddedLog::open`] does, its appends as durable as `durability`.
    pub async fn open_with(
        path: impl AsRef<Path>,
        durability: Durability,
    ) -> Result<Self, LogError> {
        let path = path.as_ref();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(unavailable)?;
        }
        // Migrations run through sqlx (as for every other store); the writer then has a
        // connection of its own on its thread.
        let mut migrate = SqliteConnection::connect_with(&options(path))
            .await
            .map_err(unavailable)?;
        crate::migrations::embedded()
            .run_direct(&mut migrate)
            .await
            .map_err(unavailable)?;
        migrate.close().await.map_err(unavailable)?;
        let (writer, writer_synchronous) = open_writer(path, durability)?;
        let admin = SqliteConnection::connect_with(&options(path))
            .await
            .map_err(unavailable)?;
        let reads = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options(path).read_only(true))
            .await
            .map_err(unavailable)?;
        let (appends, queue) = mpsc::channel(MAX_BATCH * 4);
        let (bump, committed) = watch::channel(0);
        let heads = Arc::new(Heads::default());
        {
            let heads = heads.clone();
            std::thread::Builder::new()
                .name("embedded-log-writer".into())
                .spawn(move || write_loop(writer, queue, bump, heads))
                .map_err(unavailable)?;
        }
        Ok(EmbeddedLog {
            inner: Arc::new(Inner {
                reads,
                appends,
                committed,
                heads,
                admin: tokio::sync::Mutex::new(admin),
                partitions: RwLock::new(HashMap::new()),
                groups: std::sync::Mutex::new(HashMap::new()),
                group_changes: watch::channel(0).0,
                writer_synchronous,
            }),
        })
    }

    /// Whether the writer syncs each commit to disk before it returns, as its connection
    /// reports it (`PRAGMA synchronous` is FULL or EXTRA).
    pub fn syncs_each_commit(&self) -> bool {
        self.inner.writer_synchronous >= 2
    }
}

/// Opens the writer's connection: the same file settings as [`options`], on rusqlite, so a
/// batch's statements run on the writer thread itself; `synchronous` as `durability` says.
/// Returns the `synchronous` level the connection reports.
fn open_writer(
    path: &Path,
    durability: Durability,
) -> Result<(rusqlite::Connection, i64), LogError> {
    let connection = rusqlite::Connection::open(path).map_err(unavailable)?;
    connection
        .busy_timeout(Duration::from_secs(10))
        .map_err(unavailable)?;
    // WAL is a property of the file (set by [`options`] when it was opened first);
    // `synchronous` is per connection, and only the writer's matters: it alone commits
    // records. FULL syncs the WAL in every commit, before the write lock is released.
    connection
        .pragma_update(None, "journal_mode", "WAL")
        .map_err(unavailable)?;
    let synchronous = match durability {
        Durability::Fsync => "FULL",
        Durability::Os => "NORMAL",
    };
    connection
        .pragma_update(None, "synchronous", synchronous)
        .map_err(unavailable)?;
    let level: i64 = connection
        .pragma_query_value(None, "synchronous", |row| row.get(0))
        .map_err(unavailable)?;
    Ok((connection, level))
}

/// The single writer, on a thread of its own: drains the queue, commits each batch in one
/// transaction, answers.
///
/// Not a task: a commit is a few statements, each of which would be a round trip between a
/// task and the driver's thread, and each wake-up of the task would wait its turn behind
/// whatever the runtime's workers are busy with (under a burst of commands, the HTTP work). On
/// its own thread the commit goes on whatever the runtime is doing, and costs no hand-offs.
fn write_loop(
    mut connection: rusqlite::Connection,
    mut queue: mpsc::Receiver<AppendRequest>,
    bump: watch::Sender<u64>,
    heads: Arc<Heads>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        match write_batch(&mut connection, &batch) {
            Ok((positions, timestamp_ms)) => {
                let mut committed = Vec::with_capacity(batch.len());
                for (request, position) in batch.drain(..).zip(positions) {
                    let _ = request.done.send(Ok(position.clone()));
                    committed.push(LogRecord {
                        position,
                        timestamp_ms,
                        record: request.record,
                    });
                }
                heads.committed(committed);
                bump.send_modify(|count| *count += 1);
            }
            Err(error) => {
                tracing::warn!(%error, "embedded log: batch append failed");
                for request in batch.drain(..) {
                    let _ = request.done.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Writes one batch in one transaction; returns the positions written and their timestamp.
fn write_batch(
    connection: &mut rusqlite::Connection,
    batch: &[AppendRequest],
) -> Result<(Vec<Position>, i64), LogError> {
    // IMMEDIATE takes the write lock up front, so the offsets read below cannot be taken by
    // another process writing the same file before this transaction commits. A transaction
    // that fails (the insert, or the COMMIT itself: SQLITE_BUSY, SQLITE_FULL, an I/O error) is
    // rolled back when dropped, so the next batch starts clean.
    let transaction = connection
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(unavailable)?;
    let now_ms = now_ms();
    let positions = insert_batch(&transaction, batch, now_ms).map_err(unavailable)?;
    transaction.commit().map_err(unavailable)?;
    Ok((positions, now_ms))
}

fn insert_batch(
    transaction: &rusqlite::Transaction<'_>,
    batch: &[AppendRequest],
    now_ms: i64,
) -> rusqlite::Result<Vec<Position>> {
    let mut end = transaction.prepare_cached(END_OFFSET)?;
    let mut insert = transaction.prepare_cached(
        r#"INSERT INTO records (topic, partition, "offset", key, headers, value, timestamp_ms)
           VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"#,
    )?;
    let mut planned: HashMap<(&str, u32), u64> = HashMap::new();
    let mut positions = Vec::with_capacity(batch.len());
    for request in batch {
        let slot = (request.topic.as_str(), request.partition);
        let offset = match planned.get(&slot) {
            Some(next) => *next,
            None => end.query_row((&request.topic, request.partition), |row| {
                row.get::<_, i64>(0)
            })? as u64,
        };
        planned.insert(slot, offset + 1);
        insert.execute((
            &request.topic,
            request.partition,
            offset as i64,
            &request.record.key,
            headers_to_json(&request.record.headers),
            &request.record.value,
            now_ms,
        ))?;
        positions.push(Position {
            topic: request.topic.clone(),
            partition: request.partition,
            offset,
        });
    }
    Ok(positions)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

fn headers_to_json(headers: &[Header]) -> String {
    let pairs: Vec<(&str, &str)> = headers
        .iter()
        .map(|header| (header.name.as_str(), header.value.as_str()))
        .collect();
    serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".to_owned())
}

fn headers_from_json(raw: &str) -> Vec<Header> {
    serde_json::from_str::<Vec<(String, String)>>(raw)
        .unwrap_or_default()
        .into_iter()
        .map(|(name, value)| Header { name, value })
        .collect()
}

#[async_trait]
impl EventLog for EmbeddedLog {
    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<u32, LogError> {
        // Topic creation is rare; it uses its own connection rather than the append queue.
        let mut admin = self.inner.admin.lock().await;
        sqlx::query(
            "INSERT INTO topics (name, partitions) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(topic)
        .bind(partitions)
        .execute(&mut *admin)
        .await
        .map_err(unavailable)?;
        drop(admin);
        self.partition_count(topic).await
    }

    async fn partition_count(&self, topic: &str) -> Result<u32, LogError> {
        // A topic's partition count never changes once created.
        if let Some(count) = self
            .inner
            .partitions
            .read()
            .ok()
            .and_then(|known| known.get(topic).copied())
        {
            return Ok(count);
        }
        let row = sqlx::query("SELECT partitions FROM topics WHERE name = ?")
            .bind(topic)
            .fetch_optional(&self.inner.reads)
            .await
            .map_err(unavailable)?;
        let count = match row {
            Some(row) => row.get::<i64, _>(0) as u32,
            None => return Err(LogError::UnknownTopic(topic.to_owned())),
        };
        if let Ok(mut known) = self.inner.partitions.write() {
            known.insert(topic.to_owned(), count);
        }
        Ok(count)
    }

    async fn append(
        &self,
        topic: &str,
        partition: u32,
        record: Record,
    ) -> Result<Position, LogError> {
        let _timer = crate::metrics::AppendTimer::start(self.backend(), topic);
        let partitions = self.partition_count(topic).await?;
        if partition >= partitions {
            return Err(LogError::UnknownPartition {
                topic: topic.to_owned(),
                partition,
            });
        }
        let (done, answer) = oneshot::channel();
        self.inner
            .appends
            .send(AppendRequest {
                topic: topic.to_owned(),
                partition,
                record,
                done,
            })
            .await
            .map_err(|_| LogError::Unavailable("embedded log writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| LogError::Unavailable("embedded log writer has stopped".into()))?
    }

    async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        let row = sqlx::query(END_OFFSET)
            .bind(topic)
            .bind(partition)
            .fetch_one(&self.inner.reads)
            .await
            .map_err(unavailable)?;
        Ok(row.get::<i64, _>(0) as u64)
    }

    async fn open_reader(
        &self,
        topic: &str,
        start: &[(u32, u64)],
        // Memory and SQLite answer at once either way.
        _mode: ReadMode,
    ) -> Result<Box<dyn LogReader>, LogError> {
        let partitions = self.partition_count(topic).await?;
        if let Some((partition, _)) = start.iter().find(|(partition, _)| *partition >= partitions) {
            return Err(LogError::UnknownPartition {
                topic: topic.to_owned(),
                partition: *partition,
            });
        }
        Ok(Box::new(EmbeddedReader {
            pool: self.inner.reads.clone(),
            heads: self.inner.heads.clone(),
            committed: self.inner.committed.clone(),
            topic: topic.to_owned(),
            next: start.to_vec(),
            checked: None,
        }))
    }

    async fn join_group(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<Box<dyn GroupMember>, LogError> {
        for topic in topics {
            self.partition_count(topic).await?;
        }
        let id = NEXT_MEMBER.fetch_add(1, Ordering::Relaxed);
        {
            let mut groups = self
                .inner
                .groups
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let state = groups.entry(group.to_owned()).or_default();
            state.members.insert(id);
            state.generation += 1;
        }
        self.inner.group_changes.send_modify(|count| *count += 1);
        Ok(Box::new(EmbeddedMember {
            log: self.clone(),
            group: group.to_owned(),
            topics: topics.to_vec(),
            id,
            seen_generation: 0,
            assigned: BTreeSet::new(),
            started: BTreeMap::new(),
            pending: VecDeque::new(),
            changes: self.inner.group_changes.subscribe(),
            committed: self.inner.committed.clone(),
            checked: None,
        }))
    }

    fn backend(&self) -> &'static str {
        "embedded"
    }
}

/// A member of an in-process consumer group: the group's partitions, sorted, are dealt out
/// round-robin over its members, sorted by join order.
struct EmbeddedMember {
    log: EmbeddedLog,
    group: String,
    topics: Vec<String>,
    id: u64,
    seen_generation: u64,
    assigned: BTreeSet<TopicPartition>,
    /// The next offset to deliver, per started partition.
    started: BTreeMap<TopicPartition, u64>,
    pending: VecDeque<GroupEvent>,
    changes: watch::Receiver<u64>,
    committed: watch::Receiver<u64>,
    /// When every started partition was last queried (see the module documentation).
    checked: Option<tokio::time::Instant>,
}

impl EmbeddedMember {
    /// Recomputes this member's share when the group changed; queues what changed.
    async fn rebalance(&mut self) -> Result<(), LogError> {
        let (generation, members) = {
            let groups = self
                .log
                .inner
                .groups
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match groups.get(&self.group) {
                Some(state) => (
                    state.generation,
                    state.members.iter().copied().collect::<Vec<_>>(),
                ),
                None => return Ok(()),
            }
        };
        if generation == self.seen_generation {
            return Ok(());
        }
        let mut all = Vec::new();
        for topic in &self.topics {
            for partition in 0..self.log.partition_count(topic).await? {
                all.push((topic.clone(), partition));
            }
        }
        let rank = members
            .iter()
            .position(|member| *member == self.id)
            .unwrap_or(0);
        let mine: BTreeSet<TopicPartition> = all
            .into_iter()
            .enumerate()
            .filter(|(index, _)| index % members.len().max(1) == rank)
            .map(|(_, partition)| partition)
            .collect();
        let revoked: Vec<_> = self.assigned.difference(&mine).cloned().collect();
        let added: Vec<_> = mine.difference(&self.assigned).cloned().collect();
        self.started.retain(|partition, _| mine.contains(partition));
        self.assigned = mine;
        self.seen_generation = generation;
        if !revoked.is_empty() {
            self.pending.push_back(GroupEvent::Revoked(revoked));
        }
        if !added.is_empty() {
            self.pending.push_back(GroupEvent::Assigned(added));
        }
        Ok(())
    }

    /// The next records of the started partitions; `thorough` queries every partition (see
    /// [`read_partitions`]), and is forced every [`RECHECK`].
    async fn fetch(&mut self, max: usize, thorough: bool) -> Result<Vec<LogRecord>, LogError> {
        let now = tokio::time::Instant::now();
        let thorough = thorough
            || self
                .checked
                .is_none_or(|checked| now.duration_since(checked) >= RECHECK);
        if thorough {
            self.checked = Some(now);
        }
        let count = self.started.len();
        read_partitions(
            &self.log.inner.reads,
            &self.log.inner.heads,
            self.started
                .iter_mut()
                .map(|((topic, partition), next)| (topic.as_str(), *partition, next)),
            count,
            max,
            thorough,
        )
        .await
    }
}

#[async_trait]
impl GroupMember for EmbeddedMember {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<GroupEvent, LogError> {
        self.changes.borrow_and_update();
        self.committed.borrow_and_update();
        self.rebalance().await?;
        if let Some(event) = self.pending.pop_front() {
            return Ok(event);
        }
        let records = self.fetch(max, false).await?;
        if !records.is_empty() || wait.is_zero() {
            return Ok(GroupEvent::Records(records));
        }
        let woken = tokio::time::timeout(wait, async {
            tokio::select! {
                _ = self.changes.changed() => {}
                _ = self.committed.changed() => {}
            }
        })
        .await;
        self.rebalance().await?;
        if let Some(event) = self.pending.pop_front() {
            return Ok(event);
        }
        Ok(GroupEvent::Records(self.fetch(max, woken.is_err()).await?))
    }

    async fn start(&mut self, topic: &str, partition: u32, offset: u64) -> Result<(), LogError> {
        let key = (topic.to_owned(), partition);
        if !self.assigned.contains(&key) {
            return Err(LogError::UnknownPartition {
                topic: topic.to_owned(),
                partition,
            });
        }
        self.started.insert(key, offset);
        Ok(())
    }
}

impl Drop for EmbeddedMember {
    fn drop(&mut self) {
        {
            let mut groups = self
                .log
                .inner
                .groups
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(state) = groups.get_mut(&self.group) {
                state.members.remove(&self.id);
                state.generation += 1;
            }
        }
        self.log
            .inner
            .group_changes
            .send_modify(|count| *count += 1);
    }
}

struct EmbeddedReader {
    pool: SqlitePool,
    heads: Arc<Heads>,
    committed: watch::Receiver<u64>,
    topic: String,
    /// The next offset to read, per partition.
    next: Vec<(u32, u64)>,
    /// When every partition was last queried (see the module documentation).
    checked: Option<tokio::time::Instant>,
}

/// Up to `limit` records of one partition from offset `from`.
async fn fetch_partition(
    pool: &SqlitePool,
    topic: &str,
    partition: u32,
    from: u64,
    limit: usize,
) -> Result<Vec<LogRecord>, LogError> {
    let rows = sqlx::query(
        r#"SELECT "offset", key, headers, value, timestamp_ms FROM records
           WHERE topic = ? AND partition = ? AND "offset" >= ?
           ORDER BY "offset" LIMIT ?"#,
    )
    .bind(topic)
    .bind(partition)
    .bind(from as i64)
    .bind(limit as i64)
    .fetch_all(pool)
    .await
    .map_err(unavailable)?;
    Ok(rows
        .into_iter()
        .map(|row| LogRecord {
            position: Position {
                topic: topic.to_owned(),
                partition,
                offset: row.get::<i64, _>(0) as u64,
            },
            timestamp_ms: row.get(4),
            record: Record {
                key: row.get(1),
                headers: headers_from_json(row.get::<&str, _>(2)),
                value: row.get(3),
            },
        })
        .collect())
}

impl EmbeddedReader {
    /// As [`EmbeddedMember::fetch`].
    async fn fetch(&mut self, max: usize, thorough: bool) -> Result<Vec<LogRecord>, LogError> {
        let now = tokio::time::Instant::now();
        let thorough = thorough
            || self
                .checked
                .is_none_or(|checked| now.duration_since(checked) >= RECHECK);
        if thorough {
            self.checked = Some(now);
        }
        let count = self.next.len();
        let topic = self.topic.as_str();
        read_partitions(
            &self.pool,
            &self.heads,
            self.next
                .iter_mut()
                .map(|(partition, next)| (topic, *partition, next)),
            count,
            max,
            thorough,
        )
        .await
    }
}

#[async_trait]
impl LogReader for EmbeddedReader {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<LogRecord>, LogError> {
        // Mark the current commit count as seen before reading, so a commit that lands between
        // the read and the wait still wakes us.
        self.committed.borrow_and_update();
        let records = self.fetch(max, false).await?;
        if !records.is_empty() || wait.is_zero() {
            return Ok(records);
        }
        match tokio::time::timeout(wait, self.committed.changed()).await {
            Ok(Err(_)) => Err(LogError::Unavailable(
                "embedded log writer has stopped".into(),
            )),
            // Woken by our own writer: its heads say what is new.
            Ok(Ok(())) => self.fetch(max, false).await,
            // Timed out: another process may have written to the same file without waking us.
            Err(_) => self.fetch(max, true).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::migrate::Migrator;

    /// By default the writer's connection syncs every commit (an acknowledgement means on
    /// disk); `Durability::Os` is the one way to have it not do so.
    #[tokio::test]
    async fn the_writer_syncs_every_commit_unless_told_otherwise() {
        let dir = tempfile::tempdir().expect("temp dir");
        let durable = EmbeddedLog::open(dir.path().join("durable.db"))
            .await
            .expect("open");
        assert!(durable.syncs_each_commit());
        let fast = EmbeddedLog::open_with(dir.path().join("fast.db"), Durability::Os)
            .await
            .expect("open");
        assert!(!fast.syncs_each_commit());
        // Reopened, the same file follows what it is opened with, not how it was written.
        drop(fast);
        let reopened = EmbeddedLog::open(dir.path().join("fast.db"))
            .await
            .expect("reopen");
        assert!(reopened.syncs_each_commit());
    }

    /// A log file a newer binary migrated further is refused, not opened as if it were known.
    #[tokio::test]
    async fn a_log_file_from_a_newer_binary_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("log.db");
        drop(EmbeddedLog::open(&path).await.expect("open"));
        let mut connection = SqliteConnection::connect_with(&options(&path))
            .await
            .expect("connect");
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (99, 'from the future', TRUE, x'00', 0)",
        )
        .execute(&mut connection)
        .await
        .expect("record a newer migration");
        connection.close().await.expect("close");
        let error = EmbeddedLog::open(&path)
            .await
            .expect_err("a newer log file must be refused");
        assert!(error.to_string().contains("99"), "{error}");
    }

    /// A log file written before the records moved to a rowid table (migration 2) keeps its
    /// records, in order, and takes new appends after them.
    #[tokio::test]
    async fn a_log_from_before_the_rowid_table_keeps_its_records() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("log.db");
        {
            let mut old = SqliteConnection::connect_with(&options(&path))
                .await
                .expect("open");
            let first = crate::migrations::embedded()
                .migrations
                .iter()
                .take(1)
                .cloned()
                .collect::<Vec<_>>();
            Migrator {
                migrations: first.into(),
                ..Migrator::DEFAULT
            }
            .run_direct(&mut old)
            .await
            .expect("first migration");
            sqlx::query("INSERT INTO topics (name, partitions) VALUES ('t', 2)")
                .execute(&mut old)
                .await
                .expect("topic");
            for (partition, offset) in [(0, 0), (1, 0), (0, 1)] {
                sqlx::query(
                    r#"INSERT INTO records (topic, partition, "offset", key, headers, value, timestamp_ms)
                       VALUES ('t', ?, ?, 'k', '[]', ?, 1)"#,
                )
                .bind(partition)
                .bind(offset)
                .bind(format!("{partition}-{offset}").into_bytes())
                .execute(&mut old)
                .await
                .expect("record");
            }
            old.close().await.expect("close");
        }
        let log = EmbeddedLog::open(&path).await.expect("migrated");
        let appended = log
            .append(
                "t",
                0,
                Record {
                    key: "k".into(),
                    headers: Vec::new(),
                    value: b"0-2".to_vec(),
                },
            )
            .await
            .expect("append");
        assert_eq!(appended.offset, 2);
        let mut reader = log
            .open_reader("t", &[(0, 0)], ReadMode::Latency)
            .await
            .expect("reader");
        let values: Vec<Vec<u8>> = reader
            .poll(10, Duration::ZERO)
            .await
            .expect("read")
            .into_iter()
            .map(|record| record.record.value)
            .collect();
        assert_eq!(values, [b"0-0".to_vec(), b"0-1".to_vec(), b"0-2".to_vec()]);
        assert_eq!(log.end_offset("t", 1).await.expect("end"), 1);
    }
}
