//! The saga orchestrator of one process: its database, its event consumer, its deadline ticker
//! and its outbox relay.

use std::sync::Arc;
use std::time::Duration;

use event_log::shared::SharedGroup;
use event_log::{SharedLog, topics};
use projections::ReadBackend;
use projections::runtime::{Projection, Worker, WorkerState, migrate};
use sql_store::{Db, DbError};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::driver::{RESCAN, SagaProjection, Wakes, run_relay, run_ticker};
use crate::saga::SagaConfig;
use projections::traced::{SpanKind, Traced};

/// Cheap to clone.
#[derive(Clone)]
pub struct SagaSide {
    db: Db,
    log: SharedLog,
    topic_prefix: String,
    projection: Arc<SagaProjection>,
    state: Arc<WorkerState>,
}

impl std::fmt::Debug for SagaSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SagaSide({})", self.topic_prefix)
    }
}

impl SagaSide {
    /// Opens (and migrates) the orchestrator's database: the Postgres schema
    /// `<schema_prefix>saga`, or `saga.db` in the data directory.
    pub async fn open(
        log: SharedLog,
        backend: &ReadBackend,
        topic_prefix: &str,
        config: SagaConfig,
    ) -> Result<Self, DbError> {
        let db = match backend {
            ReadBackend::Postgres { url, schema_prefix } => {
                Db::postgres(url, &format!("{schema_prefix}saga"), 4).await?
            }
            ReadBackend::Sqlite { dir } => Db::sqlite(&dir.join("saga.db")).await?,
        };
        let projection = Arc::new(SagaProjection {
            config,
            wakes: Arc::new(Wakes::default()),
        });
        migrate(&db, projection.as_ref()).await?;
        Ok(SagaSide {
            db,
            log,
            topic_prefix: topic_prefix.to_owned(),
            projection,
            state: Arc::new(WorkerState::default()),
        })
    }

    /// Starts the event consumer (a member of the saga's consumer group), the deadline ticker
    /// and the outbox relay, each under `supervisor` (`saga worker`, `saga ticker`, `saga relay`).
    /// On the stop, the relay publishes what the other two commit until they have ended.
    pub fn start(&self, shutdown: watch::Receiver<bool>, supervisor: &supervisor::Supervisor) {
        let topics: Vec<String> = self
            .projection
            .aggregate_types()
            .iter()
            .map(|aggregate| topics::events(&self.topic_prefix, aggregate))
            .collect();
        let worker = Worker {
            log: self.log.clone(),
            db: self.db.clone(),
            projection: Traced::wrap(self.projection.clone(), SpanKind::Saga),
            group: Arc::new(SharedGroup::new(
                self.log.clone(),
                format!("{}.saga", self.topic_prefix),
                topics.clone(),
            )),
            topics,
            state: self.state.clone(),
        };
        // What writes the outbox, for the relay to know when nothing more can come.
        let producers = TaskTracker::new();
        supervisor.spawn(
            "saga worker",
            producers.track_future(worker.run(shutdown.clone())),
        );
        supervisor.spawn(
            "saga ticker",
            producers.track_future(run_ticker(
                self.db.clone(),
                self.projection.config.clone(),
                self.projection.wakes.clone(),
                RESCAN,
                shutdown.clone(),
            )),
        );
        producers.close();
        supervisor.spawn(
            "saga relay",
            run_relay(
                self.db.clone(),
                self.log.clone(),
                self.topic_prefix.clone(),
                self.projection.wakes.clone(),
                RESCAN,
                shutdown,
                producers,
            ),
        );
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn config(&self) -> &SagaConfig {
        &self.projection.config
    }

    /// What wakes this process's relay and ticker (for pokes made through it).
    pub fn wakes(&self) -> &Wakes {
        &self.projection.wakes
    }

    /// The partitions this process's saga consumer holds.
    pub fn held_partitions(&self) -> usize {
        self.state.positions().len()
    }

    /// What keeps this process's saga consumer from applying everything it holds (a stored
    /// position beyond the log's end), as sentences for a readiness check; empty when nothing
    /// does.
    pub fn problems(&self) -> Vec<String> {
        self.state.problems()
    }

    /// Waits until `projection`-style positions cover everything in the log (tests, tools).
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            let unsent = self
                .db
                .fetch_optional(
                    "SELECT COUNT(*) AS unsent FROM saga_outbox WHERE sent_at IS NULL",
                    &[],
                )
                .await
                .map(|row| row.map(|row| row.int("unsent")).unwrap_or(0))
                .unwrap_or(1);
            if unsent == 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}
