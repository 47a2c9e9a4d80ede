//! Where the command side keeps its snapshots and command-topic positions: a SQLite file on the
//! embedded backend, its own Postgres schema on the distributed one (one implementation over
//! the shared SQL layer, `sql-store`).

use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use sql_store::{Db, DbError, Migrations, Value, placeholders, value_rows};

/// A partition's snapshot, or the change to it since the previous one: the aggregates and
/// command outcomes (JSON, keyed by aggregate id and command id) as of `next_offset`, the offset
/// from which reading resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The owner's snapshot format; a snapshot of another format is not used.
    pub format: u32,
    pub next_offset: u64,
    /// The epoch of the owner that took it (see [`CommandStore::acquire_epoch`]).
    pub epoch: u64,
    /// Aggregates (id, JSON), changed since the previous snapshot; on loading, all of them.
    pub aggregates: Vec<(String, String)>,
    /// On saving, aggregates created since the previous snapshot, so not stored yet (the store
    /// may write them faster); on loading, empty.
    pub new_aggregates: Vec<(String, String)>,
    /// Command outcomes (command id, JSON). Each is usually new, so the store may write them
    /// as such, falling back to an update where one is there already.
    pub outcomes: Vec<(String, String)>,
    /// On saving, the command ids of outcomes no longer remembered, to delete (after the
    /// inserts: one may be in both); on loading, empty.
    pub forgotten_outcomes: Vec<String>,
}

/// Why the command-side store (snapshots, owner epochs, consumer positions) failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("command-side store: {0}")]
pub struct StoreError(#[from] pub DbError);

/// Why a snapshot was not stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SaveError {
    /// The stored snapshot is newer: taken by an owner of a later epoch, or further along the
    /// log. Nothing was written; the snapshot's changes stay the caller's to save later.
    #[error(
        "a newer snapshot is stored (epoch {stored_epoch}, offset {stored_offset}; this one: epoch {epoch}, offset {offset})"
    )]
    Superseded {
        stored_epoch: u64,
        stored_offset: u64,
        epoch: u64,
        offset: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<DbError> for SaveError {
    fn from(error: DbError) -> Self {
        SaveError::Store(error.into())
    }
}

/// Snapshots, owner epochs and consumer positions. Implementations must never return a snapshot
/// newer than the log they were taken from could contain (a position is only saved after what
/// it covers is durable in the log), and must never let a partition's snapshot head move back:
/// neither to an earlier offset nor to an earlier owner epoch.
#[async_trait]
pub trait CommandStore: Send + Sync + 'static {
    /// Takes the next owner epoch of a partition for `holder`, above `floor` (the latest epoch
    /// its owner saw on the partition's records and snapshot): each call returns a number
    /// larger than every one returned before, to anyone, and than `floor`. Records and
    /// snapshots carry it, so a later owner's writes tell an earlier one that it was replaced.
    async fn acquire_epoch(
        &self,
        topic: &str,
        partition: u32,
        holder: &str,
        floor: u64,
    ) -> Result<u64, StoreError>;
    /// Deletes a partition's snapshot (the owner then rebuilds it from the log): the recovery
    /// when a snapshot covers more of the log than the log holds.
    async fn drop_snapshot(&self, topic: &str, partition: u32) -> Result<(), StoreError>;
    /// Everything stored for the partition: every aggregate and outcome ever saved, with the
    /// latest offset.
    async fn load_snapshot(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<Option<Snapshot>, StoreError>;
    /// Stores the changes in `snapshot` over what is stored for the partition (or, with
    /// `replace`, instead of it), atomically: a crash leaves the previous snapshot or this one.
    /// Refuses ([`SaveError::Superseded`]) when the stored head has a later epoch or offset, so
    /// a replaced owner's snapshot never overwrites its successor's.
    async fn save_snapshot(
        &self,
        topic: &str,
        partition: u32,
        snapshot: Snapshot,
        replace: bool,
    ) -> Result<(), SaveError>;
    async fn load_position(
        &self,
        consumer: &str,
        topic: &str,
        partition: u32,
    ) -> Result<Option<u64>, StoreError>;
    /// Moves a consumer's positions forward, `(partition, next offset)` each, in one write
    /// (never back: two consumers of one partition, an old owner's and a new one's, may both
    /// save it). The partitions are distinct.
    async fn save_positions(
        &self,
        consumer: &str,
        topic: &str,
        positions: &[(u32, u64)],
    ) -> Result<(), StoreError>;
    /// Sets a consumer's position, back too: the recovery when it is beyond the log's end.
    async fn reset_position(
        &self,
        consumer: &str,
        topic: &str,
        partition: u32,
        next_offset: u64,
    ) -> Result<(), StoreError>;
}

/// The command side's tables (`migrations/command_side/`).
static MIGRATIONS: LazyLock<Migrations> = LazyLock::new(|| {
    sql_store::migrations!(
        "command_side",
        "../migrations/command_side/20261207000701_snapshots_positions.sql",
        "../migrations/command_side/20261207000702_incremental_snapshots.sql",
        "../migrations/command_side/20261207000703_owner_epochs.sql",
    )
});

/// Rows per multi-row upsert (4 values each; well under both databases' parameter limits).
const CHUNK: usize = 250;

/// Rows per COPY of a snapshot's new rows (at least, on Postgres).
const COPY_CHUNK: usize = 250;

/// COPYs (savepoints) per table and snapshot on Postgres, at most: two tables take them, which
/// stays under the 64 subtransactions Postgres caches per transaction.
const MAX_COPIES_PER_TABLE: usize = 25;

/// The pause between a snapshot's writes.
const SNAPSHOT_PAUSE: Duration = Duration::from_millis(5);

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
        sql_store::migrate(&db, &MIGRATIONS).await?;
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
        let key = [topic.into(), partition.into()];
        let Some(head) = self
            .db
            .fetch_optional(
                "SELECT format, next_offset, epoch FROM command_snapshot_heads WHERE topic = $1 AND partition = $2",
                &key,
            )
            .await?
        else {
            return Ok(None);
        };
        let pairs = |rows: Vec<sql_store::Row>, id: &str| -> Vec<(String, String)> {
            rows.into_iter()
                .map(|row| (row.text(id), row.text("body")))
                .collect()
        };
        let aggregates = self
            .db
            .fetch_all(
                "SELECT aggregate_id, body FROM command_snapshot_aggregates WHERE topic = $1 AND partition = $2",
                &key,
            )
            .await?;
        let outcomes = self
            .db
            .fetch_all(
                "SELECT command_id, body FROM command_snapshot_outcomes WHERE topic = $1 AND partition = $2",
                &key,
            )
            .await?;
        Ok(Some(Snapshot {
            format: head.int("format") as u32,
            next_offset: head.int("next_offset") as u64,
            epoch: head.int("epoch") as u64,
            aggregates: pairs(aggregates, "aggregate_id"),
            new_aggregates: Vec::new(),
            outcomes: pairs(outcomes, "command_id"),
            forgotten_outcomes: Vec::new(),
        }))
    }

    async fn save_snapshot(
        &self,
        topic: &str,
        partition: u32,
        snapshot: Snapshot,
        replace: bool,
    ) -> Result<(), SaveError> {
        let mut tx = self.db.begin().await?;
        if self.db.is_postgres() {
            // A snapshot is a cache (see the migration): its commit need not wait for the WAL
            // flush. A crash may lose the latest one, never part of one, and costs a longer
            // start-up. Not waiting keeps the flush off the path of whatever else shares the
            // disk, such as a broker's appends.
            tx.execute("SET LOCAL synchronous_commit = off", &[])
                .await?;
        }
        // The head first, and only forward: the statement takes the head row's lock (or, for a
        // first snapshot, waits on the key), so two owners' snapshots of one partition never
        // interleave, and the one behind (an earlier epoch or offset) writes nothing. An
        // owner's changes since its own last stored snapshot, over a head at or before its
        // offset, leave every row at its aggregate's state as of the new head: rows written by
        // others since were taken from the same log at offsets no later than this one.
        let moved = tx
            .execute(
                "INSERT INTO command_snapshot_heads (topic, partition, format, next_offset, taken_at, epoch)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (topic, partition) DO UPDATE
                 SET format = excluded.format, next_offset = excluded.next_offset,
                     taken_at = excluded.taken_at, epoch = excluded.epoch
                 WHERE command_snapshot_heads.epoch <= excluded.epoch
                   AND command_snapshot_heads.next_offset <= excluded.next_offset",
                &[
                    topic.into(),
                    partition.into(),
                    snapshot.format.into(),
                    snapshot.next_offset.into(),
                    now_ms().into(),
                    snapshot.epoch.into(),
                ],
            )
            .await?;
        if moved == 0 {
            let stored = tx
                .fetch_optional(
                    "SELECT next_offset, epoch FROM command_snapshot_heads WHERE topic = $1 AND partition = $2",
                    &[topic.into(), partition.into()],
                )
                .await?
                .unwrap_or_default();
            return Err(SaveError::Superseded {
                stored_epoch: stored.int("epoch") as u64,
                stored_offset: stored.int("next_offset") as u64,
                epoch: snapshot.epoch,
                offset: snapshot.next_offset,
            });
        }
        if replace {
            for table in ["command_snapshot_aggregates", "command_snapshot_outcomes"] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE topic = $1 AND partition = $2"),
                    &[topic.into(), partition.into()],
                )
                .await?;
            }
        }
        let values = |(key, body): &(String, String)| -> [Value; 4] {
            [
                topic.into(),
                partition.into(),
                key.as_str().into(),
                body.as_str().into(),
            ]
        };
        // Rows never stored before go in by COPY, far cheaper than an upsert; the others, and
        // a COPY refused because a row was there after all, by upsert.
        for (table, id, rows, new) in [
            (
                "command_snapshot_aggregates",
                "aggregate_id",
                &snapshot.new_aggregates,
                true,
            ),
            (
                "command_snapshot_aggregates",
                "aggregate_id",
                &snapshot.aggregates,
                false,
            ),
            (
                "command_snapshot_outcomes",
                "command_id",
                &snapshot.outcomes,
                true,
            ),
        ] {
            // On Postgres each COPY runs under a savepoint, a subtransaction, and past 64 of
            // them in one transaction every session slows down: at most
            // `MAX_COPIES_PER_TABLE` per table, larger chunks for larger snapshots.
            let chunk_rows = match (new, self.db.is_postgres()) {
                (false, _) => CHUNK,
                (true, true) => rows.len().div_ceil(MAX_COPIES_PER_TABLE).max(COPY_CHUNK),
                (true, false) => COPY_CHUNK,
            };
            for (index, chunk) in rows.chunks(chunk_rows).enumerate() {
                if index > 0 {
                    // A snapshot is background work of thousands of rows: paced, it leaves
                    // the CPU and the disk to the commands (and to a broker or log file on
                    // the same machine) instead of taking them in one burst. On SQLite the
                    // pauses hold this store's write lock, which only the command-topic
                    // consumers' positions wait for (this file holds nothing else).
                    tokio::time::sleep(SNAPSHOT_PAUSE).await;
                }
                if new {
                    let copied: Vec<Vec<Value>> =
                        chunk.iter().map(|row| values(row).to_vec()).collect();
                    let refused = tx
                        .copy_rows_or_undo(table, &["topic", "partition", id, "body"], &copied)
                        .await?;
                    if refused.is_none() {
                        continue;
                    }
                }
                for rows in chunk.chunks(CHUNK) {
                    let args: Vec<Value> = rows.iter().flat_map(values).collect();
                    tx.execute(
                        &format!(
                            "INSERT INTO {table} (topic, partition, {id}, body) VALUES {}
                             ON CONFLICT (topic, partition, {id}) DO UPDATE SET body = excluded.body",
                            value_rows(rows.len(), 4, 1)
                        ),
                        &args,
                    )
                    .await?;
                }
            }
        }
        for (index, chunk) in snapshot.forgotten_outcomes.chunks(CHUNK).enumerate() {
            if index > 0 {
                tokio::time::sleep(SNAPSHOT_PAUSE).await;
            }
            let mut args: Vec<Value> = vec![topic.into(), partition.into()];
            args.extend(chunk.iter().map(|id| Value::from(id.as_str())));
            tx.execute(
                &format!(
                    "DELETE FROM command_snapshot_outcomes WHERE topic = $1 AND partition = $2 AND command_id IN ({})",
                    placeholders(chunk.len(), 3)
                ),
                &args,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn acquire_epoch(
        &self,
        topic: &str,
        partition: u32,
        holder: &str,
        floor: u64,
    ) -> Result<u64, StoreError> {
        // Epochs are BIGINT: a floor beyond them (a garbage header) is refused, not wrapped.
        let floor = i64::try_from(floor)
            .ok()
            .filter(|floor| *floor < i64::MAX)
            .ok_or_else(|| {
                StoreError(DbError::Other(format!(
                    "epoch floor {floor} is out of range"
                )))
            })?;
        let mut tx = self.db.begin().await?;
        let row = tx
            .fetch_optional(
                "INSERT INTO command_owner_epochs (topic, partition, epoch, holder, acquired_at)
                 VALUES ($1, $2, $5 + 1, $3, $4)
                 ON CONFLICT (topic, partition) DO UPDATE
                 SET epoch = CASE WHEN command_owner_epochs.epoch > $5
                                  THEN command_owner_epochs.epoch + 1 ELSE $5 + 1 END,
                     holder = excluded.holder, acquired_at = excluded.acquired_at
                 RETURNING epoch",
                &[
                    topic.into(),
                    partition.into(),
                    holder.into(),
                    now_ms().into(),
                    floor.into(),
                ],
            )
            .await?;
        tx.commit().await?;
        row.map(|row| row.int("epoch") as u64).ok_or_else(|| {
            StoreError(DbError::Other(
                "taking an owner epoch returned no row".into(),
            ))
        })
    }

    async fn drop_snapshot(&self, topic: &str, partition: u32) -> Result<(), StoreError> {
        let mut tx = self.db.begin().await?;
        for table in [
            "command_snapshot_aggregates",
            "command_snapshot_outcomes",
            "command_snapshot_heads",
        ] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE topic = $1 AND partition = $2"),
                &[topic.into(), partition.into()],
            )
            .await?;
        }
        tx.commit().await?;
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

    async fn save_positions(
        &self,
        consumer: &str,
        topic: &str,
        positions: &[(u32, u64)],
    ) -> Result<(), StoreError> {
        if positions.is_empty() {
            return Ok(());
        }
        let mut args: Vec<Value> = vec![consumer.into(), topic.into()];
        for (partition, next_offset) in positions {
            args.push((*partition).into());
            args.push((*next_offset).into());
        }
        let rows = (0..positions.len())
            .map(|n| format!("($1, $2, ${}, ${})", 3 + 2 * n, 4 + 2 * n))
            .collect::<Vec<_>>()
            .join(", ");
        self.db
            .execute(
                &format!(
                    "INSERT INTO command_positions (consumer, topic, partition, next_offset) VALUES {rows}
                     ON CONFLICT (consumer, topic, partition) DO UPDATE SET next_offset = excluded.next_offset
                     WHERE command_positions.next_offset < excluded.next_offset"
                ),
                &args,
            )
            .await?;
        Ok(())
    }

    async fn reset_position(
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
