//! The read side of one process: the read-model databases, the workers, and what the query API
//! and the health checks need from them (read-your-writes, lag).
//!
//! [`ReadSide::status`] is also the read side's readiness: each projection's `problems` name the
//! topic and partition, both offsets and the way to recover, while a stored position is beyond
//! its log's end (checked against the log on every call, and as this process's workers found
//! it, which stays true after the log has grown past the position again), so `/health/ready`
//! answers 503 until the projection is rebuilt.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use event_log::shared::SharedGroup;
use event_log::{Position, SharedLog, topics};
use serde::Serialize;
use tokio::sync::watch;

use crate::db::{Db, DbError};
use crate::models::{
    audit::Audit, customers::Customers, inventory::Inventory, orders::Orders, payments::Payments,
};
use crate::runtime::{BeyondLogEnd, Projection, Worker, WorkerState, migrate, stored_positions};
use crate::traced::{SpanKind, Traced};

/// Where the read models live.
#[derive(Debug, Clone)]
pub enum ReadBackend {
    /// One Postgres schema per service, named `<schema_prefix><service>`.
    Postgres { url: String, schema_prefix: String },
    /// One SQLite file per service in `dir`.
    Sqlite { dir: PathBuf },
}

struct Running {
    projection: Arc<dyn Projection>,
    db: Db,
    state: Arc<WorkerState>,
    topics: Vec<String>,
}

/// The read models of this process; cheap to clone.
/// Why the projections' status could not be measured; the database's or the log's error is
/// the source.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StatusError {
    #[error("read models: {0}")]
    Db(#[from] DbError),
    #[error(transparent)]
    Log(#[from] event_log::LogError),
}

#[derive(Clone)]
pub struct ReadSide {
    log: SharedLog,
    topic_prefix: String,
    group_prefix: String,
    running: Arc<Vec<Running>>,
    /// The customers' data keys, which the query API opens sealed personal fields with.
    keys: Option<personal_data::KeyStore>,
}

impl std::fmt::Debug for ReadSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadSide")
            .field("topic_prefix", &self.topic_prefix)
            .finish()
    }
}

/// Lag of one projection on one partition.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: u32,
    /// The next offset the projection will apply.
    pub applied: u64,
    /// The partition's end (the offset the next record will get).
    pub end: u64,
    /// Records not applied yet.
    pub lag_events: u64,
    /// Age of the oldest record not applied yet; 0 when caught up.
    pub lag_seconds: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProjectionStatus {
    pub projection: String,
    pub partitions: Vec<PartitionLag>,
    pub lag_events: u64,
    pub lag_seconds: f64,
    /// Events parked (not applied) and still waiting for an operator.
    pub parked: u64,
    /// Since this process started: events applied, and records skipped by the rule.
    pub applied: u64,
    pub conflicts: u64,
    /// What keeps the projection from going on (a stored position beyond its log's end), as
    /// sentences naming the partition, both offsets and the way to recover.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

fn all_projections() -> Vec<Arc<dyn Projection>> {
    let projections: Vec<Arc<dyn Projection>> = vec![
        Arc::new(Orders),
        Arc::new(Inventory),
        Arc::new(Payments),
        Arc::new(Customers),
        Arc::new(Audit),
    ];
    projections
        .into_iter()
        .map(|projection| Traced::wrap(projection, SpanKind::Projection))
        .collect()
}

impl ReadSide {
    /// Connects to (or creates) every read-model database and runs their migrations. Starts no
    /// worker.
    pub async fn open(
        log: SharedLog,
        backend: &ReadBackend,
        topic_prefix: &str,
    ) -> Result<Self, DbError> {
        Self::open_in_group(log, backend, topic_prefix, topic_prefix).await
    }

    /// Like [`ReadSide::open`], with the workers in consumer groups named after `group_prefix`
    /// (a second, independent build of the read models, such as a replay).
    pub async fn open_in_group(
        log: SharedLog,
        backend: &ReadBackend,
        topic_prefix: &str,
        group_prefix: &str,
    ) -> Result<Self, DbError> {
        let mut running = Vec::new();
        for projection in all_projections() {
            let db = match backend {
                ReadBackend::Postgres { url, schema_prefix } => {
                    Db::postgres(url, &format!("{schema_prefix}{}", projection.name()), 4).await?
                }
                ReadBackend::Sqlite { dir } => {
                    Db::sqlite(&dir.join(format!("{}.db", projection.name()))).await?
                }
            };
            migrate(&db, projection.as_ref()).await?;
            let topics = projection
                .aggregate_types()
                .iter()
                .map(|aggregate| topics::events(topic_prefix, aggregate))
                .collect();
            running.push(Running {
                projection,
                db,
                state: Arc::new(WorkerState::default()),
                topics,
            });
        }
        Ok(ReadSide {
            log,
            topic_prefix: topic_prefix.to_owned(),
            group_prefix: group_prefix.to_owned(),
            running: Arc::new(running),
            keys: None,
        })
    }

    /// The read side, showing sealed personal fields opened with `keys`; without it the
    /// query API shows them as unreadable.
    pub fn with_keys(mut self, keys: personal_data::KeyStore) -> Self {
        self.keys = Some(keys);
        self
    }

    pub fn keys(&self) -> Option<&personal_data::KeyStore> {
        self.keys.as_ref()
    }

    /// Starts one worker per projection. They share one member of the projections' consumer
    /// group (`<prefix>.projections`), so the process reads each topic once, and every
    /// projection applies what it reads in transactions of its own. The topics must exist (the
    /// command services create them). Each worker runs under `supervisor` (a dead worker is a
    /// failure the part's readiness reports), named `projection <name>`.
    pub fn start_workers(
        &self,
        shutdown: watch::Receiver<bool>,
        supervisor: &supervisor::Supervisor,
    ) {
        let group = Arc::new(SharedGroup::new(
            self.log.clone(),
            format!("{}.projections", self.group_prefix),
            self.running
                .iter()
                .flat_map(|running| running.topics.iter().cloned())
                .collect(),
        ));
        for running in self.running.iter() {
            let worker = Worker {
                log: self.log.clone(),
                db: running.db.clone(),
                projection: running.projection.clone(),
                topics: running.topics.clone(),
                group: group.clone(),
                state: running.state.clone(),
            };
            supervisor.spawn(
                format!("projection {}", running.projection.name()),
                worker.run(shutdown.clone()),
            );
        }
    }

    fn running(&self, projection: &str) -> Option<&Running> {
        self.running
            .iter()
            .find(|running| running.projection.name() == projection)
    }

    /// The database of a projection (`orders`, `inventory`, `payments`, `customers`, `audit`).
    pub fn db(&self, projection: &str) -> Option<&Db> {
        self.running(projection).map(|running| &running.db)
    }

    /// Waits until every projection has applied everything the log held when called.
    pub async fn wait_caught_up(&self, limit: Duration) -> Result<bool, StatusError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let statuses = self.status().await?;
            if statuses.iter().all(|status| status.lag_events == 0) {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every row of a read-model table, in primary-key order, as text (for comparisons).
    pub async fn dump(
        &self,
        projection: &str,
        table: &str,
        order_by: &str,
    ) -> Result<Vec<Vec<String>>, DbError> {
        let db = self
            .db(projection)
            .ok_or_else(|| DbError::Other(format!("no projection {projection}")))?;
        let rows = db
            .fetch_all(&format!("SELECT * FROM {table} ORDER BY {order_by}"), &[])
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                row.columns
                    .into_iter()
                    .map(|(name, value)| format!("{name}={value:?}"))
                    .collect()
            })
            .collect())
    }

    /// A projection by name.
    pub fn projection(&self, name: &str) -> Option<Arc<dyn Projection>> {
        self.running(name).map(|running| running.projection.clone())
    }

    /// The log this read side reads.
    pub fn log(&self) -> SharedLog {
        self.log.clone()
    }

    /// The partitions this process's worker of `projection` holds, with its positions.
    pub fn held_partitions(&self, projection: &str) -> Vec<crate::runtime::PartitionProgress> {
        self.running(projection)
            .map(|running| running.state.positions())
            .unwrap_or_default()
    }

    pub fn projection_names(&self) -> Vec<&'static str> {
        self.running
            .iter()
            .map(|running| running.projection.name())
            .collect()
    }

    /// Waits until `projection` has applied everything up to and including `position`; false
    /// when `limit` passed first. A position of a topic the projection does not read is
    /// reached at once.
    pub async fn wait_for(
        &self,
        projection: &str,
        position: &Position,
        limit: Duration,
    ) -> Result<bool, DbError> {
        let Some(running) = self.running(projection) else {
            return Ok(true);
        };
        if !running.topics.contains(&position.topic) {
            return Ok(true);
        }
        let mut changes = running.state.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let reached = running
                .db
                .fetch_optional(
                    "SELECT next_offset FROM projection_positions WHERE projection = $1 AND topic = $2 AND partition = $3",
                    &[projection.into(), position.topic.as_str().into(), position.partition.into()],
                )
                .await?
                .is_some_and(|row| row.int("next_offset") as u64 > position.offset);
            if reached {
                return Ok(true);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            // Woken by this process's worker; another process's worker is seen by polling.
            let _ = tokio::time::timeout(
                (deadline - now).min(Duration::from_millis(25)),
                changes.changed(),
            )
            .await;
        }
    }

    /// Lag of every projection on every partition it reads, with what keeps one from going on
    /// (see the module documentation).
    pub async fn status(&self) -> Result<Vec<ProjectionStatus>, StatusError> {
        let mut statuses = Vec::new();
        let mut beyond: BTreeMap<(&str, String, u32), BeyondLogEnd> = BTreeMap::new();
        for running in self.running.iter() {
            let name = running.projection.name();
            let stored: BTreeMap<(String, u32), u64> = stored_positions(&running.db, name)
                .await?
                .into_iter()
                .map(|progress| ((progress.topic, progress.partition), progress.next_offset))
                .collect();
            let mut partitions = Vec::new();
            for topic in &running.topics {
                let count = match self.log.partition_count(topic).await {
                    Ok(count) => count,
                    Err(event_log::LogError::UnknownTopic(_)) => continue,
                    Err(error) => return Err(error.into()),
                };
                let mut lagging = Vec::new();
                for partition in 0..count {
                    let end = self.log.end_offset(topic, partition).await?;
                    let applied = stored
                        .get(&(topic.clone(), partition))
                        .copied()
                        .unwrap_or(0);
                    if applied < end {
                        lagging.push((partition, applied));
                    }
                    if applied > end {
                        beyond.insert(
                            (name, topic.clone(), partition),
                            BeyondLogEnd {
                                projection: name.to_owned(),
                                topic: topic.clone(),
                                partition,
                                stored: applied,
                                end,
                                recovery: running.projection.recovery(),
                            },
                        );
                    }
                    partitions.push(PartitionLag {
                        topic: topic.clone(),
                        partition,
                        applied,
                        end,
                        lag_events: end.saturating_sub(applied),
                        lag_seconds: 0.0,
                    });
                }
                // The age of the oldest unapplied record: read the record at each lagging
                // partition's applied offset.
                if !lagging.is_empty() {
                    let ages = self.oldest_unapplied(topic, &lagging).await;
                    for lag in partitions.iter_mut().filter(|lag| &lag.topic == topic) {
                        if let Some(age) = ages.get(&lag.partition) {
                            lag.lag_seconds = *age;
                        }
                    }
                }
            }
            for problem in running.state.beyond_end() {
                beyond.insert((name, problem.topic.clone(), problem.partition), problem);
            }
            let parked = running
                .db
                .fetch_optional(
                    "SELECT COUNT(*) AS parked FROM parked_events WHERE projection = $1 AND status = 'parked'",
                    &[name.into()],
                )
                .await?
                .map(|row| row.int("parked") as u64)
                .unwrap_or(0);
            statuses.push(ProjectionStatus {
                projection: name.to_owned(),
                lag_events: partitions.iter().map(|lag| lag.lag_events).sum(),
                lag_seconds: partitions
                    .iter()
                    .map(|lag| lag.lag_seconds)
                    .fold(0.0, f64::max),
                partitions,
                parked,
                applied: running.state.applied(),
                conflicts: running.state.conflicts(),
                problems: Vec::new(),
            });
        }
        for ((name, _, _), problem) in beyond {
            if let Some(status) = statuses.iter_mut().find(|status| status.projection == name) {
                status.problems.push(problem.to_string());
            }
        }
        Ok(statuses)
    }

    async fn oldest_unapplied(&self, topic: &str, lagging: &[(u32, u64)]) -> BTreeMap<u32, f64> {
        let mut ages = BTreeMap::new();
        let Ok(mut reader) = self.log.reader(topic, lagging).await else {
            return ages;
        };
        let now = chrono::Utc::now().timestamp_millis();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while ages.len() < lagging.len() && tokio::time::Instant::now() < deadline {
            let Ok(records) = reader.poll(lagging.len(), Duration::from_millis(100)).await else {
                break;
            };
            for record in records {
                ages.entry(record.position.partition)
                    .or_insert(((now - record.timestamp_ms).max(0) as f64) / 1000.0);
            }
        }
        ages
    }
}
