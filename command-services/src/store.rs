//! Where the command side keeps its snapshots and command-topic positions: a SQLite file on the
//! embedded backend, its own Postgres schema on the distributed one (one implementation over
//! the shared SQL layer, `sql-store`).

use std::path::Path;

use async_trait::async_trait;
use sql_store::{Db, DbError};

/// A snapshot of one partition: everything needed to resume reading it at `next_offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub next_offset: u64,
    /// JSON.
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("command-side store unavailable: {0}")]
pub struct StoreError(pub String);

impl From<DbError> for StoreError {
    fn from(error: DbError) -> Self {
        StoreError(error.0)
    }
}

/// Snapshots and consumer positions. Implementations must never return a snapshot newer than
/// the log they were taken from could contain (a position is only saved after what it covers
/// is durable in the log).
#[async_trait]
pub trait CommandStore: Send + Sync + 'static {
    async fn load_snapshot(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<Option<Snapshot>, StoreError>;
    async fn save_snapshot(
        &self,
        topic: &str,
        partition: u32,
        snapshot: Snapshot,
    ) -> Result<(), StoreError>;
    async fn load_position(
        &self,
        consumer: &str,
        topic: &str,
        partition: u32,
    ) -> Result<Option<u64>, StoreError>;
    async fn save_position(
        &self,
        consumer: &str,
        topic: &str,
        partition: u32,
        next_offset: u64,
    ) -> Result<(), StoreError>;
}

const MIGRATIONS: &[&str] = &["
-- The command side's own bookkeeping: snapshots of each partition's aggregate states (so
-- start-up reads only the log tail), and how far each command topic has been consumed. Neither
-- is a source of truth: losing them costs a longer start-up, no data.
CREATE TABLE command_snapshots (
    topic TEXT NOT NULL,
    partition BIGINT NOT NULL,
    next_offset BIGINT NOT NULL,
    taken_at BIGINT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (topic, partition)
);
CREATE TABLE command_positions (
    consumer TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition BIGINT NOT NULL,
    next_offset BIGINT NOT NULL,
    PRIMARY KEY (consumer, topic, partition)
)
"];

/// The store, in SQLite or Postgres.
#[derive(Debug, Clone)]
pub struct SqlStore {
    db: Db,
}

impl SqlStore {
    /// A SQLite file (embedded backend).
    pub async fn sqlite(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::migrated(Db::sqlite(path.as_ref()).await?).await
    }

    /// Its own Postgres schema (created when missing).
    pub async fn postgres(url: &str, schema: &str) -> Result<Self, StoreError> {
        Self::migrated(Db::postgres(url, schema, 4).await?).await
    }

    async fn migrated(db: Db) -> Result<Self, StoreError> {
        sql_store::migrate(&db, "command_side", MIGRATIONS).await?;
        Ok(SqlStore { db })
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[async_trait]
impl CommandStore for SqlStore {
    async fn load_snapshot(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<Option<Snapshot>, StoreError> {
        let row = self
            .db
            .fetch_optional(
                "SELECT next_offset, body FROM command_snapshots WHERE topic = $1 AND partition = $2",
                &[topic.into(), partition.into()],
            )
            .await?;
        Ok(row.map(|row| Snapshot {
            next_offset: row.int("next_offset") as u64,
            body: row.text("body").into_bytes(),
        }))
    }

    async fn save_snapshot(
        &self,
        topic: &str,
        partition: u32,
        snapshot: Snapshot,
    ) -> Result<(), StoreError> {
        let body =
            String::from_utf8(snapshot.body).map_err(|error| StoreError(error.to_string()))?;
        self.db
            .execute(
                "INSERT INTO command_snapshots (topic, partition, next_offset, taken_at, body) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (topic, partition) DO UPDATE
                 SET next_offset = excluded.next_offset, taken_at = excluded.taken_at, body = excluded.body",
                &[
                    topic.into(),
                    partition.into(),
                    snapshot.next_offset.into(),
                    now_ms().into(),
                    body.into(),
                ],
            )
            .await?;
        Ok(())
    }

    async fn load_position(
        &self,
        consumer: &str,
        topic: &str,
        partition: u32,
    ) -> Result<Option<u64>, StoreError> {
        let row = self
            .db
            .fetch_optional(
                "SELECT next_offset FROM command_positions WHERE consumer = $1 AND topic = $2 AND partition = $3",
                &[consumer.into(), topic.into(), partition.into()],
            )
            .await?;
        Ok(row.map(|row| row.int("next_offset") as u64))
    }

    async fn save_position(
        &self,
        consumer: &str,
        topic: &str,
        partition: u32,
        next_offset: u64,
    ) -> Result<(), StoreError> {
        self.db
            .execute(
                "INSERT INTO command_positions (consumer, topic, partition, next_offset) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (consumer, topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
                &[consumer.into(), topic.into(), partition.into(), next_offset.into()],
            )
            .await?;
        Ok(())
    }
}
