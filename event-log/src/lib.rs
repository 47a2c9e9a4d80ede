//! The event log, behind one trait with two backends that behave the same.
//!
//! A log is a set of topics, each split into numbered partitions; a partition is an ordered
//! sequence of records, each at an offset (0, 1, 2, ...). Records are keyed by aggregate id and
//! every backend sends a key to the same partition ([`partition_for`], Kafka's default
//! partitioner), so one aggregate's records are totally ordered. The log itself knows nothing
//! of aggregate versions: which records count is decided by readers with the effective-history
//! rule (`event_schema::history`).
//!
//! # Layout
//! - this file: the [`EventLog`] and [`LogReader`] traits, [`Position`], [`LogError`] and the
//!   partitioner.
//! - [`embedded`]: the default backend, a local SQLite file in WAL mode; appends from many
//!   tasks are group-committed by one writer thread, readers wake on new records and take the
//!   most recent ones from memory.
//! - [`kafka`]: rdkafka; an idempotent producer (acks=all, a few ms of linger) shared by all
//!   appends, and readers that assign explicit partitions and seek to explicit offsets, with a
//!   short fetch wait or, for [`ReadMode::Background`] readers, a longer one; topics created
//!   replicated (`--replication-factor`, capped at the broker count) with `min.insync.replicas`.
//! - [`shared`]: one consumer-group member shared by the consumers of one process that always
//!   run together (the projections), each seeing only its topics and its own positions.
//! - [`metrics`]: the append latency and projection batch size histograms behind `/metrics`.
//! - [`topics`]: the topic naming scheme (`<prefix>.<aggregate>.events`, `.commands`).

pub mod embedded;
pub mod kafka;
pub mod metrics;
pub mod shared;
pub mod topics;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
pub use event_schema::Record;

/// Where one record sits in the log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
}

impl fmt::Display for Position {
    /// The form used for consistency tokens: `<topic>:<partition>:<offset>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.topic, self.partition, self.offset)
    }
}

impl FromStr for Position {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let mut parts = raw.rsplitn(3, ':');
        let offset = parts.next().and_then(|part| part.parse().ok());
        let partition = parts.next().and_then(|part| part.parse().ok());
        let topic = parts.next().filter(|topic| !topic.is_empty());
        match (topic, partition, offset) {
            (Some(topic), Some(partition), Some(offset)) => Ok(Position {
                topic: topic.to_owned(),
                partition,
                offset,
            }),
            _ => Err(format!(
                "{raw:?} is not a position (expected <topic>:<partition>:<offset>)"
            )),
        }
    }
}

/// A record as read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub position: Position,
    /// When the log accepted the record (milliseconds since the Unix epoch).
    pub timestamp_ms: i64,
    pub record: Record,
}

/// Why a log could not do what it was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// The broker or the log's file cannot be reached or refused the operation; retrying later
    /// may work. The client's or the database's error is the source.
    #[error("event log unavailable ({backend}): {source}")]
    Backend {
        /// `Kafka` or `embedded log`.
        backend: &'static str,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// Unavailable for a reason that has no error of its own (the writer stopped, a topic
    /// could not be created), in words.
    #[error("event log unavailable: {0}")]
    Unavailable(String),
    #[error("topic {0:?} does not exist")]
    UnknownTopic(String),
    #[error("topic {topic:?} has no partition {partition}")]
    UnknownPartition { topic: String, partition: u32 },
    #[error("invalid record: {0}")]
    InvalidRecord(String),
}

/// Errors with a source are equal when they are the same error (a clone), not when their texts
/// match.
impl PartialEq for LogError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (
                LogError::Backend { backend, source },
                LogError::Backend {
                    backend: other_backend,
                    source: other_source,
                },
            ) => backend == other_backend && Arc::ptr_eq(source, other_source),
            (LogError::Unavailable(a), LogError::Unavailable(b))
            | (LogError::UnknownTopic(a), LogError::UnknownTopic(b))
            | (LogError::InvalidRecord(a), LogError::InvalidRecord(b)) => a == b,
            (
                LogError::UnknownPartition { topic, partition },
                LogError::UnknownPartition {
                    topic: other_topic,
                    partition: other_partition,
                },
            ) => topic == other_topic && partition == other_partition,
            _ => false,
        }
    }
}

impl Eq for LogError {}

/// An append-only, partitioned log.
///
/// Implementations must not reorder records of one partition, must not acknowledge an append
/// before it is durable (as durable as the backend gets: acks=all, or a committed SQLite
/// transaction), and must not await one append's durability before accepting the next:
/// concurrent appends share batches (group commit).
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Creates `topic` with `partitions` partitions unless it exists; returns its partition
    /// count (which may differ from `partitions` when the topic already existed).
    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<u32, LogError>;

    /// The partition count of an existing topic.
    async fn partition_count(&self, topic: &str) -> Result<u32, LogError>;

    /// Appends one record to a partition and returns where it landed, once durable. Appends
    /// in flight together land in no promised order; a caller that needs one record before
    /// another awaits the first append before making the second (as the owner does for an
    /// aggregate's events and the saga's relay for an aggregate's commands).
    async fn append(
        &self,
        topic: &str,
        partition: u32,
        record: Record,
    ) -> Result<Position, LogError>;

    /// The offset the next record of the partition will get (the high watermark).
    async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError>;

    /// [`EventLog::end_offset`] of several partitions of a topic, in one request where the
    /// backend allows it (Kafka: one ListOffsets for all of them).
    async fn end_offsets(
        &self,
        topic: &str,
        partitions: &[u32],
    ) -> Result<Vec<(u32, u64)>, LogError> {
        let mut ends = Vec::with_capacity(partitions.len());
        for partition in partitions {
            ends.push((*partition, self.end_offset(topic, *partition).await?));
        }
        Ok(ends)
    }

    /// Opens a reader of `topic` positioned at explicit offsets, one per partition to read,
    /// for someone who waits on what it reads ([`ReadMode::Latency`]).
    async fn reader(
        &self,
        topic: &str,
        start: &[(u32, u64)],
    ) -> Result<Box<dyn LogReader>, LogError> {
        self.open_reader(topic, start, ReadMode::Latency).await
    }

    /// Opens a reader as [`EventLog::reader`] does, tuned for `mode`. The mode changes only how
    /// soon new records arrive, never which records or in which order.
    async fn open_reader(
        &self,
        topic: &str,
        start: &[(u32, u64)],
        mode: ReadMode,
    ) -> Result<Box<dyn LogReader>, LogError>;

    /// Joins consumer group `group` reading `topics`: the group's members share the topics'
    /// partitions among themselves and hand them over when a member joins or leaves.
    async fn join_group(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<Box<dyn GroupMember>, LogError>;

    /// Joins a group as [`EventLog::join_group`] does, its fetches tuned for `mode` (changes only
    /// how soon new records arrive, as for readers).
    async fn join_group_as(
        &self,
        group: &str,
        topics: &[String],
        mode: ReadMode,
    ) -> Result<Box<dyn GroupMember>, LogError> {
        let _ = mode;
        self.join_group(group, topics).await
    }

    /// A short name for logs and health output (`kafka`, `embedded`).
    fn backend(&self) -> &'static str;
}

/// How eagerly a reader asks for new records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadMode {
    /// Someone waits on each new record (a read-back, read-your-writes): deliver it as soon as
    /// possible.
    #[default]
    Latency,
    /// Nobody waits on a record's arrival to the millisecond (a tail kept for checking, a
    /// consumer of commands): fewer, larger fetches are fine. On Kafka this is a longer fetch
    /// wait, which matters on brokers that hold every fetch for its full wait (see KAFKA.md).
    Background,
    /// Reading a backlog as fast as the log gives it (a replay): the largest fetches.
    Bulk,
}

/// A topic and one of its partitions.
pub type TopicPartition = (String, u32);

/// What a group member learns when it polls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupEvent {
    /// These partitions are now this member's. Nothing of them is delivered until the member
    /// says where to start with [`GroupMember::start`] (positions live with their effects, not
    /// in the broker).
    Assigned(Vec<TopicPartition>),
    /// These partitions were taken away; their records no longer arrive.
    Revoked(Vec<TopicPartition>),
    /// Records of started partitions, in log order within each partition.
    Records(Vec<LogRecord>),
}

/// A member of a consumer group. Leaving the group is dropping the member.
#[async_trait]
pub trait GroupMember: Send {
    /// The next assignment change, or the next records; an empty `Records` after `wait`.
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<GroupEvent, LogError>;

    /// Starts delivering an assigned partition from `offset`. Fails with
    /// `LogError::UnknownPartition` when the partition is no longer assigned (revoked by a newer
    /// rebalance before it started): skip it, its `Revoked` event follows.
    async fn start(&mut self, topic: &str, partition: u32, offset: u64) -> Result<(), LogError>;
}

/// Reads assigned partitions from explicit offsets, in log order within each partition.
#[async_trait]
pub trait LogReader: Send {
    /// The next records, at most `max`; waits up to `wait` when none is available yet and then
    /// returns an empty batch.
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<LogRecord>, LogError>;
}

pub type SharedLog = Arc<dyn EventLog>;

/// Kafka's default partitioner (murmur2 of the key, made positive, modulo the partition
/// count), so records written here land where any Kafka client would put them.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    (murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions.max(1)
}

fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len();
    let mut h: u32 = SEED ^ (length as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partitioner_agrees_with_kafkas_java_client() {
        // Values from the Java client's `Utils.murmur2` test vectors.
        assert_eq!(murmur2(b"21") as i32, -973932308);
        assert_eq!(murmur2(b"foobar") as i32, -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32,
            -58897971
        );
        assert_eq!(murmur2(b"abc") as i32, 479470107);
    }

    #[test]
    fn a_position_prints_and_parses_back() {
        let position = Position {
            topic: "test.order.events".into(),
            partition: 3,
            offset: 42,
        };
        assert_eq!(position.to_string(), "test.order.events:3:42");
        assert_eq!(position.to_string().parse::<Position>(), Ok(position));
        assert!("nonsense".parse::<Position>().is_err());
        assert!(":1:2".parse::<Position>().is_err());
    }
}

mod migrations {
    //! Migrations owned by this crate (`migrations/embedded/`), embedded in the binary.
    use std::sync::LazyLock;

    use sql_store::Migrations;
    use sqlx::migrate::Migrator;

    static EMBEDDED: LazyLock<Migrations> = LazyLock::new(|| {
        sql_store::migrations!(
            "log",
            "../migrations/embedded/0001_log.sql",
            "../migrations/embedded/0002_records_by_rowid.sql",
        )
        .alone()
    });

    /// The embedded log's file.
    pub(crate) fn embedded() -> &'static Migrator {
        EMBEDDED.migrator()
    }
}
