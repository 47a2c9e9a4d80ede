//! The Kafka backend (rdkafka).
//!
//! Two idempotent producers (acks=all) are shared by every append. An append made when the
//! process is quiet (none in flight, none started or finished within the linger) goes out at
//! once, on the prompt producer (no linger): a quiet platform's appends, such as a saga's steps
//! one after the other, never wait to fill a batch. Every other append goes to the batching
//! producer (`--kafka-linger-ms`), so under load appends ride in the same produce batches, and
//! nothing waits for one delivery before sending the next. (Quiet means more than nothing in
//! flight: under a closed loop, a batch's acknowledgements leave nothing in flight for a moment,
//! and the next commands come at once; sending the first of them alone would double the
//! produce requests, which is what a broker such as nisshi spends its CPU on.) Appends in flight together have no order between them (an owner appends
//! the next event of an aggregate only once the previous one is acknowledged), so two
//! producers order nothing differently from one. Readers assign explicit partitions and seek to explicit offsets; they never use Kafka's
//! committed offsets, since positions are stored with their effects (see ARCHITECTURE.md).
//! A reader's fetch wait depends on its [`ReadMode`]: a few ms for readers someone waits on, a
//! longer one for background readers, since some brokers (nisshi) hold every fetch for its full
//! wait and spend their CPU answering idle readers' fetches.
//!
//! # Idle group members
//! A group member (a projection worker, the saga, an owner's command consumer) pauses each of
//! its partitions that has given no record for [`IDLE_AFTER`], so its consumer stops fetching
//! it, and waits on the partition's end instead: one task per process ([`EndWatch`]) asks the
//! broker where every paused partition of the process ends, in one ListOffsets request,
//! [`IDLE_CHECK_FIRST`] after a member paused one and then less and less often, up to every
//! `--kafka-idle-check-ms`; this process's own appends move the ends at once. A paused
//! partition is resumed as soon as it ends past what the member has delivered of it (and its
//! leader is sent a request, which gets librdkafka fetching at once: [`KafkaMember::nudge`]);
//! librdkafka fetches a resumed partition from the last record delivered (a seek in between
//! resets that to the seek's offset). Fetches name only the partitions that are busy, which is
//! what a broker such as nisshi spends its CPU on (in proportion to the partitions a fetch
//! names), so a platform with a trickle of traffic fetches a few partitions, not all of them,
//! and an idle one costs the broker about one request a second, whatever its number of
//! partitions and members. The first record another process writes to a quiet partition
//! arrives at most one check later (at once when this process wrote it). On nisshi a
//! ListOffsets request costs about as much as a fetch (in proportion to its partitions), which
//! is why the checks slow down; `--kafka-idle-check-ms 0` turns pausing off, for brokers that
//! hold an idle fetch until data arrives (Apache Kafka).
//!
//! Topics are created with the configured replication factor, capped at the cluster's broker
//! count, and `min.insync.replicas` one less than it (between 1 and 2), so with acks=all an
//! acknowledged record is on two brokers whenever the cluster has three; a cap, or an existing
//! topic with fewer replicas, is logged as a warning and never fails a start
//! ([`replication_for`]). Replica counts come from the cluster's metadata (each partition's
//! replica list), which every Kafka-protocol broker serves.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use event_schema::{Header, Record};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KafkaHeader, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

use crate::{
    EventLog, GroupEvent, GroupMember, LogError, LogReader, LogRecord, Position, ReadMode,
    TopicPartition,
};

/// How the platform talks to Kafka.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `host:port[,host:port...]`
    pub brokers: String,
    /// How long the producer waits to fill a batch. A few ms buys large batches under load and
    /// costs that much latency at idle.
    pub linger_ms: u32,
    /// How long the broker may hold a fetch open. Brokers that do not answer a fetch early when
    /// data arrives (nisshi, see KAFKA.md) add this to every read-back; keep it small.
    pub fetch_wait_max_ms: u32,
    /// The fetch wait of [`ReadMode::Background`] readers: long, so an idle reader costs the
    /// broker a few fetches a second rather than hundreds.
    pub background_fetch_wait_ms: u32,
    /// The longest interval between two checks of the ends of idle group members' paused
    /// partitions (see the module documentation): the most a record written by another process
    /// after a long quiet spell waits before an idle member fetches it. 0: members never pause
    /// (for brokers that hold an idle fetch until data arrives, such as Apache Kafka, where an
    /// idle fetch costs next to nothing).
    pub idle_check_ms: u32,
    /// How long an append may take before it fails (and the command answers 503).
    pub delivery_timeout: Duration,
    /// How many brokers keep a copy of each partition of a topic [`EventLog::ensure_topic`]
    /// creates: capped at the brokers the cluster has (see [`replication_for`]). An existing
    /// topic with fewer copies is reported, never changed.
    pub replication_factor: u32,
}

/// The default [`KafkaSettings::linger_ms`] (the platform's `--kafka-linger-ms`).
pub const DEFAULT_LINGER_MS: u32 = 10;
/// The default [`KafkaSettings::fetch_wait_max_ms`] (`--kafka-fetch-wait-ms`).
pub const DEFAULT_FETCH_WAIT_MS: u32 = 50;
/// The default [`KafkaSettings::background_fetch_wait_ms`]
/// (`--kafka-background-fetch-wait-ms`).
pub const DEFAULT_BACKGROUND_FETCH_WAIT_MS: u32 = 250;
/// The default [`KafkaSettings::idle_check_ms`] (`--kafka-idle-check-ms`).
pub const DEFAULT_IDLE_CHECK_MS: u32 = 1000;
/// The first check after a member pauses comes this soon; each check that finds nothing
/// doubles the interval, up to [`KafkaSettings::idle_check_ms`].
pub const IDLE_CHECK_FIRST: Duration = Duration::from_millis(100);
/// A group member pauses a partition that gave no record for this long and waits on its end
/// (see the module documentation).
pub const IDLE_AFTER: Duration = Duration::from_secs(1);
/// The default [`KafkaSettings::replication_factor`] (`--replication-factor`): a topic survives
/// the loss of a broker, and acknowledged writes are on two of them.
pub const DEFAULT_REPLICATION_FACTOR: u32 = 3;

/// How a new topic is replicated: see [`replication_for`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replication {
    /// Brokers holding a copy of each partition.
    pub factor: u32,
    /// The topic's `min.insync.replicas`: with `acks=all`, a write is acknowledged only once
    /// this many copies have it, and refused while fewer are in sync.
    pub min_insync_replicas: u32,
    /// The requested factor was more than the cluster's brokers.
    pub capped: bool,
}

/// The replication of a topic created with `requested` copies on a cluster of `brokers`
/// brokers: the factor is capped at the broker count (a cluster cannot hold more copies than
/// it has brokers), and `min.insync.replicas` is one less than the factor, at least 1 and at
/// most 2, so writes go on while one broker is down and are on two brokers whenever the
/// factor allows it.
pub fn replication_for(requested: u32, brokers: u32) -> Replication {
    let requested = requested.max(1);
    let factor = requested.min(brokers.max(1));
    Replication {
        factor,
        min_insync_replicas: factor.saturating_sub(1).clamp(1, 2),
        capped: factor < requested,
    }
}

/// What the cluster's metadata says about one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TopicMetadata {
    /// Brokers in the cluster.
    brokers: u32,
    /// The topic's partitions; `None` when the topic does not exist (yet).
    partitions: Option<u32>,
    /// The fewest distinct brokers holding a replica of one of its partitions (the replica
    /// list may name one broker several times: nisshi accepts a factor of 3 on its single
    /// broker and lists it thrice).
    replication_factor: Option<u32>,
}

impl KafkaSettings {
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaSettings {
            brokers: brokers.into(),
            linger_ms: DEFAULT_LINGER_MS,
            fetch_wait_max_ms: DEFAULT_FETCH_WAIT_MS,
            background_fetch_wait_ms: DEFAULT_BACKGROUND_FETCH_WAIT_MS,
            idle_check_ms: DEFAULT_IDLE_CHECK_MS,
            delivery_timeout: Duration::from_secs(15),
            replication_factor: DEFAULT_REPLICATION_FACTOR,
        }
    }

    fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("socket.keepalive.enable", "true")
            .set("log_level", "4");
        config
    }
}

fn unavailable(error: impl std::error::Error + Send + Sync + 'static) -> LogError {
    LogError::Backend {
        backend: "Kafka",
        source: Arc::new(error),
    }
}

/// The log on a Kafka cluster.
#[derive(Clone)]
pub struct KafkaLog {
    inner: Arc<Inner>,
}

struct Inner {
    settings: KafkaSettings,
    /// Lingers `linger_ms` to fill batches: for appends made while others are in flight.
    producer: FutureProducer,
    /// Sends at once: for an append made while none is in flight.
    prompt: FutureProducer,
    /// Appends sent and not yet acknowledged (or failed).
    in_flight: AtomicUsize,
    /// When an append last started or finished, in µs after `epoch` ([`NEVER`] before the
    /// first).
    last_append: AtomicU64,
    epoch: std::time::Instant,
    admin: AdminClient<DefaultClientContext>,
    /// For metadata and watermarks; never subscribes.
    metadata: Arc<BaseConsumer>,
    partitions: RwLock<HashMap<String, u32>>,
    ends: Arc<EndWatch>,
}

/// The ends of the partitions paused by idle group members (see the module documentation).
#[derive(Default)]
struct EndWatch {
    /// The partitions each paused member waits on, by member.
    watched: Mutex<HashMap<u64, Vec<TopicPartition>>>,
    /// The highest end seen of each partition (asked for, or one past an append of this
    /// process). Members waiting on it are woken whenever one moves.
    ends: tokio::sync::watch::Sender<HashMap<TopicPartition, u64>>,
    members: AtomicU64,
    /// A member paused.
    paused: tokio::sync::Notify,
}

impl EndWatch {
    /// Sets what `member` waits on; `newly_paused`: it paused partitions just now (the next
    /// check comes soon).
    fn watch(&self, member: u64, partitions: Vec<TopicPartition>, newly_paused: bool) {
        if let Ok(mut watched) = self.watched.lock() {
            watched.insert(member, partitions);
        }
        if newly_paused {
            self.paused.notify_one();
        }
    }

    fn unwatch(&self, member: u64) {
        if let Ok(mut watched) = self.watched.lock() {
            watched.remove(&member);
        }
    }

    /// Every partition some member waits on, once.
    fn watched(&self) -> Vec<TopicPartition> {
        let mut partitions: Vec<TopicPartition> = self
            .watched
            .lock()
            .map(|watched| watched.values().flatten().cloned().collect())
            .unwrap_or_default();
        partitions.sort_unstable();
        partitions.dedup();
        partitions
    }

    /// Records ends seen; wakes the waiting members when a partition one of them waits on
    /// moved (and says so). Only those: this process's appends raise ends all the time, and a
    /// paused member woken for nothing at each of them would spin.
    fn raise(&self, seen: impl IntoIterator<Item = (TopicPartition, u64)>) -> bool {
        let seen: Vec<_> = seen.into_iter().collect();
        self.ends.send_if_modified(|ends| {
            // Read under the channel's lock, with the ends: a member that pauses a partition
            // meanwhile either is in this set or reads the end written here (it looks at the
            // ends after it is watched), never neither.
            let watched: HashSet<TopicPartition> = self
                .watched
                .lock()
                .map(|watched| watched.values().flatten().cloned().collect())
                .unwrap_or_default();
            let mut moved = false;
            for (partition, end) in seen {
                let known = ends.entry(partition.clone()).or_insert(0);
                if end > *known {
                    *known = end;
                    moved |= watched.contains(&partition);
                }
            }
            moved
        })
    }
}

/// Asks where the paused partitions of this process end (one ListOffsets request for all of
/// them): [`IDLE_CHECK_FIRST`] after a member paused or something moved, then twice as long
/// after each check that found nothing new, up to `slowest`. Stops when the log is dropped.
async fn watch_ends(log: Weak<Inner>, watch: Arc<EndWatch>, slowest: Duration) {
    let fastest = IDLE_CHECK_FIRST.min(slowest);
    let mut every = fastest;
    let mut next_check = tokio::time::Instant::now() + every;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_check) => {}
            // A member just went idle: look soon (never later than already planned), then
            // less and less often.
            _ = watch.paused.notified() => {
                every = fastest;
                next_check = next_check.min(tokio::time::Instant::now() + fastest);
                continue;
            }
        }
        let Some(inner) = log.upgrade() else {
            return;
        };
        let watched = watch.watched();
        if watched.is_empty() {
            every = slowest;
            next_check = tokio::time::Instant::now() + every;
            continue;
        }
        let moved = match list_ends(inner.metadata.clone(), watched).await {
            Ok(found) => watch.raise(found),
            Err(error) => {
                tracing::debug!(%error, "cannot ask where idle partitions end");
                false
            }
        };
        every = if moved {
            fastest
        } else {
            (every * 2).min(slowest)
        };
        next_check = tokio::time::Instant::now() + every;
    }
}

/// Where the given partitions end, in one ListOffsets request (the offset of the latest record
/// + 1, as for a timestamp of -1).
async fn list_ends(
    metadata: Arc<BaseConsumer>,
    partitions: Vec<TopicPartition>,
) -> Result<Vec<(TopicPartition, u64)>, LogError> {
    let mut request = TopicPartitionList::new();
    for (topic, partition) in &partitions {
        request
            // The "timestamp" -1 (`Offset::End`): the latest offset.
            .add_partition_offset(topic, *partition as i32, Offset::End)
            .map_err(unavailable)?;
    }
    tokio::task::spawn_blocking(move || {
        let found = metadata
            .offsets_for_times(request, Timeout::After(Duration::from_secs(10)))
            .map_err(unavailable)?;
        found
            .elements()
            .iter()
            .map(|element| {
                let key = (element.topic().to_owned(), element.partition() as u32);
                if let Some(error) = element.error().err() {
                    return Err(LogError::Unavailable(format!(
                        "{}/{}: no end offset: {error}",
                        key.0, key.1
                    )));
                }
                match element.offset() {
                    Offset::Offset(end) if end >= 0 => Ok((key, end as u64)),
                    // An empty partition.
                    Offset::End | Offset::Beginning => Ok((key, 0)),
                    other => Err(LogError::Unavailable(format!(
                        "{}/{}: no end offset ({other:?})",
                        key.0, key.1
                    ))),
                }
            })
            .collect::<Result<Vec<_>, LogError>>()
    })
    .await
    .map_err(unavailable)?
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLog")
            .field("brokers", &self.inner.settings.brokers)
            .finish()
    }
}

impl KafkaLog {
    /// Connects to the cluster and checks that it answers.
    pub async fn connect(settings: KafkaSettings) -> Result<Self, LogError> {
        let producer = |linger_ms: u32| -> Result<FutureProducer, LogError> {
            settings
                .client()
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .set("linger.ms", linger_ms.to_string())
                .set("batch.num.messages", "10000")
                .set("compression.type", "none")
                .set(
                    "message.timeout.ms",
                    settings.delivery_timeout.as_millis().to_string(),
                )
                .create()
                .map_err(unavailable)
        };
        let (prompt, producer) = (producer(0)?, producer(settings.linger_ms)?);
        let admin: AdminClient<DefaultClientContext> =
            settings.client().create().map_err(unavailable)?;
        let metadata: BaseConsumer = settings
            .client()
            .set("group.id", "platform-metadata")
            .set("enable.auto.commit", "false")
            .create()
            .map_err(unavailable)?;
        let log = KafkaLog {
            inner: Arc::new(Inner {
                settings,
                producer,
                prompt,
                in_flight: AtomicUsize::new(0),
                last_append: AtomicU64::new(NEVER),
                epoch: std::time::Instant::now(),
                admin,
                metadata: Arc::new(metadata),
                partitions: RwLock::new(HashMap::new()),
                ends: Arc::default(),
            }),
        };
        if log.inner.settings.idle_check_ms > 0 {
            tokio::spawn(watch_ends(
                Arc::downgrade(&log.inner),
                log.inner.ends.clone(),
                Duration::from_millis(u64::from(log.inner.settings.idle_check_ms)),
            ));
        }
        // Fail fast with a clear message when the brokers do not answer.
        let producer = log.inner.producer.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Timeout::After(Duration::from_secs(10)))
                .map(|_| ())
        })
        .await
        .map_err(unavailable)?
        .map_err(|error| LogError::Backend {
            backend: "Kafka: cannot reach the brokers",
            source: Arc::new(error),
        })?;
        Ok(log)
    }

    async fn fetch_partition_count(&self, topic: &str) -> Result<Option<u32>, LogError> {
        Ok(self.fetch_topic(topic).await?.partitions)
    }

    /// The topic's metadata (a consumer's request: it never creates the topic).
    async fn fetch_topic(&self, topic: &str) -> Result<TopicMetadata, LogError> {
        let metadata = self.inner.metadata.clone();
        let name = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let metadata = metadata
                .fetch_metadata(Some(&name), Timeout::After(Duration::from_secs(10)))
                .map_err(unavailable)?;
            let found = metadata
                .topics()
                .iter()
                .find(|found| found.name() == name && found.error().is_none())
                .filter(|found| !found.partitions().is_empty());
            Ok(TopicMetadata {
                brokers: metadata.brokers().len() as u32,
                partitions: found.map(|found| found.partitions().len() as u32),
                replication_factor: found.and_then(|found| {
                    found
                        .partitions()
                        .iter()
                        .map(|partition| {
                            let mut brokers = partition.replicas().to_vec();
                            brokers.sort_unstable();
                            brokers.dedup();
                            brokers.len() as u32
                        })
                        .min()
                }),
            })
        })
        .await
        .map_err(unavailable)?
    }
}

#[async_trait]
impl EventLog for KafkaLog {
    /// Creates the topic replicated as [`replication_for`] says, with a warning when the
    /// cluster has fewer brokers than `--replication-factor`; an existing topic (or one another
    /// process creates at the same moment) is left as it is, with a warning when it has fewer
    /// replicas than requested.
    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<u32, LogError> {
        let requested = self.inner.settings.replication_factor.max(1);
        let found = self.fetch_topic(topic).await?;
        let mut created = false;
        if found.partitions.is_none() {
            let replication = replication_for(requested, found.brokers);
            if replication.capped {
                tracing::warn!(
                    topic,
                    requested,
                    brokers = found.brokers,
                    replication_factor = replication.factor,
                    "creating topic {topic} with replication factor {} instead of the requested \
                     {requested} (--replication-factor): the cluster has {} broker(s)",
                    replication.factor,
                    found.brokers,
                );
            }
            let min_insync_replicas = replication.min_insync_replicas.to_string();
            let new_topic = NewTopic::new(
                topic,
                partitions as i32,
                TopicReplication::Fixed(replication.factor as i32),
            )
            // Events are the source of truth: keep them for ever.
            .set("retention.ms", "-1")
            .set("min.insync.replicas", &min_insync_replicas);
            let options = AdminOptions::new()
                .operation_timeout(Some(Timeout::After(Duration::from_secs(10))));
            let results = self
                .inner
                .admin
                .create_topics(&[new_topic], &options)
                .await
                .map_err(unavailable)?;
            for result in results {
                match result {
                    Ok(_) => created = true,
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((name, code)) => {
                        return Err(LogError::Unavailable(format!(
                            "cannot create topic {name}: {code}"
                        )));
                    }
                }
            }
        }
        // Metadata can trail a fresh creation by a moment.
        for _ in 0..50 {
            let found = self.fetch_topic(topic).await?;
            if let Some(count) = found.partitions {
                if let Ok(mut known) = self.inner.partitions.write() {
                    known.insert(topic.to_owned(), count);
                }
                if !created
                    && let Some(factor) = found.replication_factor
                    && factor < requested
                {
                    tracing::warn!(
                        topic,
                        replication_factor = factor,
                        requested,
                        brokers = found.brokers,
                        "topic {topic} has replication factor {factor}, below the requested \
                         {requested} (--replication-factor); an existing topic is left as it is \
                         (the cluster has {} broker(s))",
                        found.brokers,
                    );
                }
                return Ok(count);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(LogError::UnknownTopic(topic.to_owned()))
    }

    async fn partition_count(&self, topic: &str) -> Result<u32, LogError> {
        if let Some(count) = self
            .inner
            .partitions
            .read()
            .ok()
            .and_then(|known| known.get(topic).copied())
        {
            return Ok(count);
        }
        let count = self
            .fetch_partition_count(topic)
            .await?
            .ok_or_else(|| LogError::UnknownTopic(topic.to_owned()))?;
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
        let headers = record.headers.iter().fold(
            OwnedHeaders::new_with_capacity(record.headers.len()),
            |headers, header| {
                headers.insert(KafkaHeader {
                    key: &header.name,
                    value: Some(header.value.as_bytes()),
                })
            },
        );
        let in_flight = InFlight::enter(&self.inner);
        let producer = if in_flight.quiet {
            &self.inner.prompt
        } else {
            &self.inner.producer
        };
        let delivery = producer
            .send(
                FutureRecord::to(topic)
                    .partition(partition as i32)
                    .key(&record.key)
                    .payload(&record.value)
                    .headers(headers),
                Timeout::After(self.inner.settings.delivery_timeout),
            )
            .await;
        match delivery {
            Ok(delivery) => {
                let position = Position {
                    topic: topic.to_owned(),
                    partition: delivery.partition as u32,
                    offset: delivery.offset as u64,
                };
                // Idle members of this process waiting on the partition fetch it now.
                let _ = self.inner.ends.raise([(
                    (position.topic.clone(), position.partition),
                    position.offset + 1,
                )]);
                Ok(position)
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::UnknownPartition), _)) => {
                Err(LogError::UnknownPartition {
                    topic: topic.to_owned(),
                    partition,
                })
            }
            Err((error, _)) => Err(unavailable(error)),
        }
    }

    async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        let metadata = self.inner.metadata.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            metadata
                .fetch_watermarks(
                    &topic,
                    partition as i32,
                    Timeout::After(Duration::from_secs(10)),
                )
                .map(|(_, high)| high.max(0) as u64)
                .map_err(unavailable)
        })
        .await
        .map_err(unavailable)?
    }

    async fn end_offsets(
        &self,
        topic: &str,
        partitions: &[u32],
    ) -> Result<Vec<(u32, u64)>, LogError> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let asked = partitions
            .iter()
            .map(|partition| (topic.to_owned(), *partition))
            .collect();
        Ok(list_ends(self.inner.metadata.clone(), asked)
            .await?
            .into_iter()
            .map(|((_, partition), end)| (partition, end))
            .collect())
    }

    async fn open_reader(
        &self,
        topic: &str,
        start: &[(u32, u64)],
        mode: ReadMode,
    ) -> Result<Box<dyn LogReader>, LogError> {
        // A background reader asks for more than a fetch usually finds, so a broker holds its
        // fetch for the whole wait even under load, and answers it a few times a second.
        // A bulk reader also takes up to 8 MiB per partition per fetch (the default is 1 MiB), so
        // a backlog comes in few round trips.
        let (fetch_wait, min_bytes, partition_bytes) = match mode {
            ReadMode::Latency => (self.inner.settings.fetch_wait_max_ms, 1, 1 << 20),
            ReadMode::Background => (
                self.inner.settings.background_fetch_wait_ms,
                1 << 20,
                1 << 20,
            ),
            ReadMode::Bulk => (
                self.inner.settings.background_fetch_wait_ms,
                1 << 20,
                8 << 20,
            ),
        };
        let consumer: StreamConsumer = self
            .inner
            .settings
            .client()
            // Readers never commit: positions live with the effects they produced.
            .set(
                "group.id",
                format!("platform-reader-{}", uuid::Uuid::new_v4()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            // A reader starts at positions stored with their effects: one beyond the log's end
            // is an error to report, never a reason to read from elsewhere.
            .set("auto.offset.reset", "error")
            .set("fetch.wait.max.ms", fetch_wait.to_string())
            .set("fetch.min.bytes", min_bytes.to_string())
            .set("max.partition.fetch.bytes", partition_bytes.to_string())
            .create()
            .map_err(unavailable)?;
        let mut assignment = TopicPartitionList::new();
        for (partition, offset) in start {
            assignment
                .add_partition_offset(topic, *partition as i32, Offset::Offset(*offset as i64))
                .map_err(unavailable)?;
        }
        consumer.assign(&assignment).map_err(unavailable)?;
        Ok(Box::new(KafkaReader {
            consumer,
            topic: topic.to_owned(),
        }))
    }

    async fn join_group(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<Box<dyn GroupMember>, LogError> {
        self.join_group_as(group, topics, ReadMode::Latency).await
    }

    async fn join_group_as(
        &self,
        group: &str,
        topics: &[String],
        mode: ReadMode,
    ) -> Result<Box<dyn GroupMember>, LogError> {
        // As for readers: a background member's idle fetches come a few times a second, not
        // every few ms (nisshi holds each fetch for its whole wait).
        let fetch_wait = match mode {
            ReadMode::Latency => self.inner.settings.fetch_wait_max_ms,
            ReadMode::Background | ReadMode::Bulk => self.inner.settings.background_fetch_wait_ms,
        };
        let consumer: StreamConsumer<GroupContext> = self
            .inner
            .settings
            .client()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            // A member joining or leaving moves only the partitions that change hands; the
            // others keep being read (and owned) without a pause.
            .set("partition.assignment.strategy", "cooperative-sticky")
            // A killed member's partitions move on after this long.
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", fetch_wait.to_string())
            // Under a steady flow a partition is fetched again only once what was fetched of
            // it has been taken and `fetch_wait` has passed: each fetch brings what arrived
            // meanwhile, instead of one fetch per few records (librdkafka's prefetching). On
            // nisshi, which answers a fetch at once when it has data and spends its CPU per
            // partition fetched, that is the difference between the broker serving appends
            // and serving fetches (BENCHMARKS.md); the cost is up to `fetch_wait` of latency,
            // what an idle fetch costs anyway.
            .set("queued.min.messages", "1")
            .set("fetch.queue.backoff.ms", fetch_wait.to_string())
            .create_with_context(GroupContext::default())
            .map_err(unavailable)?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).map_err(unavailable)?;
        let ends = self.inner.ends.ends.subscribe();
        Ok(Box::new(KafkaMember {
            consumer: Arc::new(consumer),
            started: HashMap::new(),
            id: self.inner.ends.members.fetch_add(1, Ordering::Relaxed),
            watch: self.inner.ends.clone(),
            ends,
            pauses: self.inner.settings.idle_check_ms > 0,
            paused: HashSet::new(),
            active: HashMap::new(),
        }))
    }

    fn backend(&self) -> &'static str {
        "kafka"
    }
}

/// Hears about rebalances. Records of a newly assigned partition are dropped until the member
/// has sought to the position stored with its effects (librdkafka refuses a seek on a paused
/// partition, so it is not paused; after a seek, librdkafka itself discards what it fetched
/// before).
#[derive(Default)]
struct GroupContext {
    events: std::sync::Mutex<std::collections::VecDeque<GroupEvent>>,
}

impl rdkafka::ClientContext for GroupContext {}

fn partitions_of(list: &TopicPartitionList) -> Vec<TopicPartition> {
    list.elements()
        .iter()
        .map(|element| (element.topic().to_owned(), element.partition() as u32))
        .collect()
}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let event = match rebalance {
            Rebalance::Assign(list) => GroupEvent::Assigned(partitions_of(list)),
            Rebalance::Revoke(list) => GroupEvent::Revoked(partitions_of(list)),
            Rebalance::Error(error) => {
                tracing::warn!(%error, "consumer group rebalance failed");
                return;
            }
        };
        if let Ok(mut events) = self.events.lock() {
            events.push_back(event);
        }
    }
}

struct KafkaMember {
    /// Shared only with [`KafkaMember::nudge`]'s requests.
    consumer: Arc<StreamConsumer<GroupContext>>,
    /// The next offset to deliver, per started partition.
    started: HashMap<TopicPartition, u64>,
    /// This member in [`EndWatch`].
    id: u64,
    watch: Arc<EndWatch>,
    ends: tokio::sync::watch::Receiver<HashMap<TopicPartition, u64>>,
    /// It pauses idle partitions (`--kafka-idle-check-ms` is not 0).
    pauses: bool,
    /// Started partitions it stopped fetching because nothing came of them for [`IDLE_AFTER`]:
    /// it waits on their ends instead.
    paused: HashSet<TopicPartition>,
    /// When each started, fetched partition last gave a record (or was started or resumed).
    active: HashMap<TopicPartition, tokio::time::Instant>,
}

impl Drop for KafkaMember {
    fn drop(&mut self) {
        self.watch.unwatch(self.id);
    }
}

fn partition_list(partitions: &[TopicPartition]) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for (topic, partition) in partitions {
        list.add_partition(topic, *partition as i32);
    }
    list
}

impl KafkaMember {
    /// Tells the end watch which partitions this member waits on.
    fn rewatch(&self, newly_paused: bool) {
        if self.paused.is_empty() {
            self.watch.unwatch(self.id);
        } else {
            self.watch
                .watch(self.id, self.paused.iter().cloned().collect(), newly_paused);
        }
    }

    /// Stops fetching the started partitions that gave nothing for [`IDLE_AFTER`]; their ends
    /// are watched instead.
    fn pause_idle(&mut self) -> Result<(), LogError> {
        if !self.pauses {
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        let idle: Vec<TopicPartition> = self
            .active
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= IDLE_AFTER)
            .map(|(partition, _)| partition.clone())
            .collect();
        if idle.is_empty() {
            return Ok(());
        }
        self.consumer
            .pause(&partition_list(&idle))
            .map_err(unavailable)?;
        for partition in idle {
            self.active.remove(&partition);
            self.paused.insert(partition);
        }
        self.rewatch(true);
        // Look at the ends known now at the next poll: a record may have landed meanwhile.
        self.ends.mark_changed();
        Ok(())
    }

    /// Fetches `partitions` again (those of them that are paused).
    fn resume(&mut self, partitions: &[TopicPartition]) -> Result<(), LogError> {
        let now = tokio::time::Instant::now();
        let resumed: Vec<TopicPartition> = partitions
            .iter()
            .filter(|partition| self.paused.contains(*partition))
            .cloned()
            .collect();
        if resumed.is_empty() {
            return Ok(());
        }
        self.consumer
            .resume(&partition_list(&resumed))
            .map_err(unavailable)?;
        for partition in resumed {
            self.paused.remove(&partition);
            if self.started.contains_key(&partition) {
                self.active.insert(partition, now);
            }
        }
        self.rewatch(false);
        Ok(())
    }

    fn resume_all(&mut self) -> Result<(), LogError> {
        let paused: Vec<TopicPartition> = self.paused.iter().cloned().collect();
        self.resume(&paused)
    }

    /// Fetches again the paused partitions that end past what was delivered of them.
    fn resume_moved(&mut self) -> Result<(), LogError> {
        let moved = self.moved();
        if !moved.is_empty() {
            self.resume(&moved)?;
            self.nudge(moved);
        }
        Ok(())
    }

    /// The paused partitions that end past what was delivered of them.
    fn moved(&mut self) -> Vec<TopicPartition> {
        let ends = self.ends.borrow_and_update();
        self.paused
            .iter()
            .filter(|partition| {
                let next = self.started.get(*partition).copied().unwrap_or(0);
                ends.get(*partition).is_some_and(|end| *end > next)
            })
            .cloned()
            .collect()
    }

    /// Gets the consumer fetching `partitions` again at once after a resume. librdkafka resumes
    /// a partition without waking the thread that fetches from its leader, which sleeps up to a
    /// second (its longest block) when it has nothing to fetch; a request to that leader wakes
    /// it. So each resumed partition's ends are asked of its leader (a ListOffsets request,
    /// answered in about 2 ms), off the runtime's threads, the answer unused. Without it a
    /// record this process appends reaches its idle member a second later
    /// (`an_idle_member_gets_its_own_process_append_at_once` in the contract tests).
    fn nudge(&self, partitions: Vec<TopicPartition>) {
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || {
            for (topic, partition) in partitions {
                let _ = consumer.fetch_watermarks(
                    &topic,
                    partition as i32,
                    Timeout::After(Duration::from_secs(1)),
                );
            }
        });
    }

    /// Notes records delivered: their partitions are active.
    fn delivered(&mut self, records: &[LogRecord]) {
        let now = tokio::time::Instant::now();
        for record in records {
            let key = (record.position.topic.clone(), record.position.partition);
            if let Some(since) = self.active.get_mut(&key) {
                *since = now;
            }
        }
    }

    /// Resumes everything after an assignment change was taken: the change is the caller's
    /// now, so a failure is logged, and what stays paused is resumed by the next move.
    fn resume_after_event(&mut self) {
        if let Err(error) = self.resume_all() {
            tracing::warn!(%error, "cannot resume the consumer's partitions");
        }
    }

    fn next_event(&mut self) -> Option<GroupEvent> {
        let event = self.consumer.context().events.lock().ok()?.pop_front()?;
        if let GroupEvent::Revoked(partitions) = &event {
            for partition in partitions {
                self.started.remove(partition);
                self.active.remove(partition);
                self.paused.remove(partition);
            }
            self.rewatch(false);
        }
        if let GroupEvent::Assigned(partitions) = &event {
            for partition in partitions {
                self.started.remove(partition);
                self.active.remove(partition);
                self.paused.remove(partition);
            }
            // librdkafka keeps an application's pause of a partition across its revocation
            // and a later re-assignment: one revoked while this member had it paused would come
            // back paused, and never be fetched.
            let list = partition_list(partitions);
            if list.count() > 0
                && let Err(error) = self.consumer.resume(&list)
            {
                tracing::warn!(%error, "cannot resume newly assigned partitions");
            }
            self.rewatch(false);
        }
        Some(event)
    }
}

/// Keeps a record only if its partition is started and it is not before the next one expected
/// (records fetched before a seek took effect are dropped).
fn accept(
    started: &mut HashMap<TopicPartition, u64>,
    message: &rdkafka::message::BorrowedMessage<'_>,
) -> Option<LogRecord> {
    {
        let key = (message.topic().to_owned(), message.partition() as u32);
        let next = started.get_mut(&key)?;
        let offset = message.offset() as u64;
        if offset < *next {
            return None;
        }
        *next = offset + 1;
        Some(convert(message, message.topic()))
    }
}

#[async_trait]
impl GroupMember for KafkaMember {
    /// Records, or the next assignment change, within `wait`. The consumer is polled every
    /// time, since rebalances are served from its poll; a paused partition whose end moves
    /// meanwhile is fetched again at once.
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<GroupEvent, LogError> {
        if let Some(event) = self.next_event() {
            self.resume_after_event();
            return Ok(event);
        }
        let mut records = Vec::new();
        // Ends that moved while the consumer kept the poll busy with other partitions' records
        // (the select below looks at the ends only while no record is ready).
        if !self.paused.is_empty() && self.ends.has_changed().unwrap_or(false) {
            self.resume_moved()?;
        }
        let watching = !self.paused.is_empty();
        tokio::select! {
            // The consumer first, every time: rebalances are served from its poll.
            biased;
            received = tokio::time::timeout(wait, self.consumer.recv()) => match received {
                Err(_) => {}
                Ok(Err(error)) => return Err(unavailable(error)),
                Ok(Ok(message)) => records.extend(accept(&mut self.started, &message)),
            },
            changed = self.ends.changed(), if watching => {
                if changed.is_ok() {
                    self.resume_moved()?;
                }
            }
        }
        while !records.is_empty() && records.len() < max {
            match tokio::time::timeout(Duration::ZERO, self.consumer.recv()).await {
                Ok(Ok(message)) => records.extend(accept(&mut self.started, &message)),
                // Records already accepted are delivered: their offsets are past `started`.
                // A lasting failure shows at the next poll.
                Ok(Err(error)) => {
                    tracing::debug!(%error, "a read after the first record failed");
                    break;
                }
                Err(_) => break,
            }
        }
        if records.is_empty()
            && let Some(event) = self.next_event()
        {
            self.resume_after_event();
            return Ok(event);
        }
        self.delivered(&records);
        if let Err(error) = self.pause_idle() {
            // The partitions stay fetched; the next poll tries again.
            tracing::warn!(%error, "cannot pause idle partitions");
        }
        Ok(GroupEvent::Records(records))
    }

    async fn start(&mut self, topic: &str, partition: u32, offset: u64) -> Result<(), LogError> {
        // librdkafka refuses a seek on a paused partition.
        let key = (topic.to_owned(), partition);
        self.resume(std::slice::from_ref(&key))?;
        if let Err(error) = self
            .consumer
            .resume(&partition_list(std::slice::from_ref(&key)))
        {
            tracing::debug!(%error, topic, partition, "resuming a partition to start it");
        }
        // A partition just assigned may not accept a seek until its fetcher is set up; one
        // revoked meanwhile (a newer rebalance) never will: say so at once.
        let mut attempts = 0;
        loop {
            let assigned = self
                .consumer
                .assignment()
                .map(|list| list.find_partition(topic, partition as i32).is_some())
                .unwrap_or(false);
            if !assigned {
                return Err(LogError::UnknownPartition {
                    topic: topic.to_owned(),
                    partition,
                });
            }
            match self.consumer.seek(
                topic,
                partition as i32,
                Offset::Offset(offset as i64),
                Timeout::After(Duration::from_secs(2)),
            ) {
                Ok(()) => break,
                Err(error) if attempts >= 50 => return Err(unavailable(error)),
                Err(_) => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        self.started.insert(key.clone(), offset);
        self.active.insert(key, tokio::time::Instant::now());
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Deliver what is still queued before the producers go away.
        let _ = self.producer.flush(Timeout::After(Duration::from_secs(5)));
        let _ = self.prompt.flush(Timeout::After(Duration::from_secs(5)));
    }
}

/// [`Inner::last_append`] before any append.
const NEVER: u64 = u64::MAX;

/// One append counted in [`Inner::in_flight`] until it is dropped (delivered, failed, or its
/// caller gone).
struct InFlight<'a> {
    inner: &'a Inner,
    /// No other append was in flight when this one started, and none started or finished
    /// within the linger before.
    quiet: bool,
}

impl<'a> InFlight<'a> {
    fn enter(inner: &'a Inner) -> InFlight<'a> {
        let alone = inner.in_flight.fetch_add(1, Ordering::AcqRel) == 0;
        let now = inner.now_us();
        let last = inner.last_append.swap(now, Ordering::AcqRel);
        let linger = u64::from(inner.settings.linger_ms) * 1000;
        InFlight {
            inner,
            quiet: alone && (last == NEVER || now.saturating_sub(last) >= linger),
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.inner
            .last_append
            .store(self.inner.now_us(), Ordering::Release);
        self.inner.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Inner {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

struct KafkaReader {
    consumer: StreamConsumer,
    topic: String,
}

fn convert(message: &rdkafka::message::BorrowedMessage<'_>, topic: &str) -> LogRecord {
    let headers = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|header| Header {
                    name: header.key.to_owned(),
                    value: header
                        .value
                        .map(|value| String::from_utf8_lossy(value).into_owned())
                        .unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    LogRecord {
        position: Position {
            topic: topic.to_owned(),
            partition: message.partition() as u32,
            offset: message.offset() as u64,
        },
        timestamp_ms: message.timestamp().to_millis().unwrap_or(0),
        record: Record {
            key: message
                .key()
                .map(|key| String::from_utf8_lossy(key).into_owned())
                .unwrap_or_default(),
            headers,
            value: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        },
    }
}

#[async_trait]
impl LogReader for KafkaReader {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<LogRecord>, LogError> {
        let mut records = Vec::new();
        match tokio::time::timeout(wait, self.consumer.recv()).await {
            Err(_) => return Ok(records),
            Ok(Err(error)) => return Err(unavailable(error)),
            Ok(Ok(message)) => records.push(convert(&message, &self.topic)),
        }
        // Take whatever else has already arrived, without waiting.
        while records.len() < max {
            match tokio::time::timeout(Duration::ZERO, self.consumer.recv()).await {
                Ok(Ok(message)) => records.push(convert(&message, &self.topic)),
                Ok(Err(error)) => return Err(unavailable(error)),
                Err(_) => break,
            }
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replication_factor_is_capped_at_the_broker_count() {
        assert_eq!(
            replication_for(3, 1),
            Replication {
                factor: 1,
                min_insync_replicas: 1,
                capped: true
            }
        );
        assert_eq!(
            replication_for(3, 2),
            Replication {
                factor: 2,
                min_insync_replicas: 1,
                capped: true
            }
        );
    }

    #[test]
    fn within_the_broker_count_the_requested_factor_is_kept() {
        assert_eq!(
            replication_for(3, 5),
            Replication {
                factor: 3,
                min_insync_replicas: 2,
                capped: false
            }
        );
    }

    #[test]
    fn min_insync_replicas_is_one_less_than_the_factor_between_one_and_two() {
        let min_insync = |factor| replication_for(factor, 5).min_insync_replicas;
        assert_eq!([1, 2, 3, 4, 5].map(min_insync), [1, 1, 2, 2, 2]);
    }

    #[test]
    fn a_factor_of_zero_or_an_empty_broker_list_still_means_one_copy() {
        assert_eq!(replication_for(0, 3).factor, 1);
        assert!(!replication_for(0, 3).capped);
        assert_eq!(replication_for(3, 0).factor, 1);
    }
}
