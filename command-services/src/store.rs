//! Where the command side keeps its snapshots and command-topic positions: a SQLite file on the
//! embedded backend, its own Postgres schema on the distributed one.

use std::borrow::Cow;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Executor, PgPool, Row, SqlitePool};

/// A snapshot of one partition: everything needed to resume reading it at `next_offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub next_offset: u64,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("command-side store unavailable: {0}")]
pub struct StoreError(pub String);

fn store_error(error: impl std::fmt::Display) -> StoreError {
    StoreError(error.to_string())
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

fn migrator(sql: &'static str) -> Migrator {
    Migrator {
        migrations: Cow::Owned(vec![Migration::new(
            1,
            Cow::Borrowed("snapshots"),
            MigrationType::Simple,
            Cow::Borrowed(sql),
            false,
        )]),
        ..Migrator::DEFAULT
    }
}

/// The store in a SQLite file (embedded backend).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path.as_ref())
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .map_err(store_error)?;
        let mut connection = pool.acquire().await.map_err(store_error)?;
        migrator(include_str!("../migrations/sqlite/0001_snapshots.sql"))
            .run_direct(&mut *connection)
            .await
            .map_err(store_error)?;
        drop(connection);
        Ok(SqliteStore { pool })
    }
}

#[async_trait]
impl CommandStore for SqliteStore {
    async fn load_snapshot(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<Option<Snapshot>, StoreError> {
        let row = sqlx::query(
            "SELECT next_offset, body FROM snapshots WHERE topic = ? AND partition = ?",
        )
        .bind(topic)
        .bind(partition)
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(row.map(|row| Snapshot {
            next_offset: row.get::<i64, _>(0) as u64,
            body: row.get(1),
        }))
    }

    async fn save_snapshot(
        &self,
        topic: &str,
        partition: u32,
        snapshot: Snapshot,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO snapshots (topic, partition, next_offset, taken_at, body) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (topic, partition) DO UPDATE
             SET next_offset = excluded.next_offset, taken_at = excluded.taken_at, body = excluded.body",
        )
        .bind(topic)
        .bind(partition)
        .bind(snapshot.next_offset as i64)
        .bind(chrono::Utc::now().to_rfc3339())
        .bind(snapshot.body)
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn load_position(
        &self,
        consumer: &str,
        topic: &str,
        partition: u32,
    ) -> Result<Option<u64>, StoreError> {
        let row = sqlx::query(
            "SELECT next_offset FROM consumer_positions WHERE consumer = ? AND topic = ? AND partition = ?",
        )
        .bind(consumer)
        .bind(topic)
        .bind(partition)
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(row.map(|row| row.get::<i64, _>(0) as u64))
    }

    async fn save_position(
        &self,
        consumer: &str,
        topic: &str,
        partition: u32,
        next_offset: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO consumer_positions (consumer, topic, partition, next_offset) VALUES (?, ?, ?, ?)
             ON CONFLICT (consumer, topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
        )
        .bind(consumer)
        .bind(topic)
        .bind(partition)
        .bind(next_offset as i64)
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }
}

/// The store in its own Postgres schema (distributed backend).
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects and migrates the tables in `schema` (created when missing).
    pub async fn connect(url: &str, schema: &str) -> Result<Self, StoreError> {
        if !schema
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || schema.is_empty()
        {
            return Err(StoreError(format!("{schema:?} is not a plain schema name")));
        }
        let set_path = format!("SET search_path TO \"{schema}\"");
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |connection, _| {
                let set_path = set_path.clone();
                Box::pin(async move {
                    connection.execute(set_path.as_str()).await?;
                    Ok(())
                })
            })
            .connect(url)
            .await
            .map_err(store_error)?;
        pool.execute(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"").as_str())
            .await
            .map_err(store_error)?;
        let mut connection = pool.acquire().await.map_err(store_error)?;
        migrator(include_str!("../migrations/postgres/0001_snapshots.sql"))
            .run_direct(&mut *connection)
            .await
            .map_err(store_error)?;
        drop(connection);
        Ok(PostgresStore { pool })
    }
}

#[async_trait]
impl CommandStore for PostgresStore {
    async fn load_snapshot(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<Option<Snapshot>, StoreError> {
        let row = sqlx::query(
            "SELECT next_offset, body FROM snapshots WHERE topic = $1 AND partition = $2",
        )
        .bind(topic)
        .bind(partition as i32)
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(row.map(|row| Snapshot {
            next_offset: row.get::<i64, _>(0) as u64,
            body: row.get(1),
        }))
    }

    async fn save_snapshot(
        &self,
        topic: &str,
        partition: u32,
        snapshot: Snapshot,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO snapshots (topic, partition, next_offset, taken_at, body) VALUES ($1, $2, $3, now(), $4)
             ON CONFLICT (topic, partition) DO UPDATE
             SET next_offset = excluded.next_offset, taken_at = excluded.taken_at, body = excluded.body",
        )
        .bind(topic)
        .bind(partition as i32)
        .bind(snapshot.next_offset as i64)
        .bind(snapshot.body)
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }

    async fn load_position(
        &self,
        consumer: &str,
        topic: &str,
        partition: u32,
    ) -> Result<Option<u64>, StoreError> {
        let row = sqlx::query(
            "SELECT next_offset FROM consumer_positions WHERE consumer = $1 AND topic = $2 AND partition = $3",
        )
        .bind(consumer)
        .bind(topic)
        .bind(partition as i32)
        .fetch_optional(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(row.map(|row| row.get::<i64, _>(0) as u64))
    }

    async fn save_position(
        &self,
        consumer: &str,
        topic: &str,
        partition: u32,
        next_offset: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO consumer_positions (consumer, topic, partition, next_offset) VALUES ($1, $2, $3, $4)
             ON CONFLICT (consumer, topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
        )
        .bind(consumer)
        .bind(topic)
        .bind(partition as i32)
        .bind(next_offset as i64)
        .execute(&self.pool)
        .await
        .map_err(store_error)?;
        Ok(())
    }
}
