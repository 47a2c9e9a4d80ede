//! One small database layer over Postgres and SQLite, so every table's SQL is written once
//! (read models, the command side's snapshots, the saga's state and outbox).
//!
//! # Layout
//! [`Db`] (a pool, one Postgres schema or one SQLite file), [`Tx`] (a transaction on it),
//! [`Value`] and [`Row`] (what goes in and comes out), and [`value_rows`] and [`placeholders`]
//! for multi-row statements and `IN (...)` lists, the bulk statements [`fetch_for_keys`] and
//! [`write_rows`] (one statement per call on Postgres) are in this file; [`Migrations`] and
//! [`migrate`], which every owner of tables runs at start, in `migrations.rs`.
//! Statements use Postgres placeholders (`$1`, `$2`, ...); on SQLite they become numbered
//! parameters (`?1`, `?2`, ...), which bind the same way. Values are integers, text or null:
//! timestamps are stored as Unix milliseconds and documents as JSON text, in both databases.
//!
//! Several processes may start at once on one database (all of a deployment's parts, or the
//! replicas of one): on Postgres a schema's creation and its migrations run under one advisory
//! lock per schema, so the first process to take it does the work and the others wait, then
//! find it done; on SQLite a migration holds the file's write lock from its start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

mod migrations;

pub use migrations::{Migrations, migrate};

use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Column, Executor, PgPool, Postgres, Sqlite, SqlitePool, Transaction};

/// A value bound to or read from a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Int(i64),
    Text(String),
    Null,
}

impl Value {
    pub fn int(&self) -> Option<i64> {
        match self {
            Value::Int(value) => Some(*value),
            _ => None,
        }
    }

    pub fn text(&self) -> Option<&str> {
        match self {
            Value::Text(value) => Some(value),
            _ => None,
        }
    }
}

impl From<i64> for Value {
    fn from(value: i64) -> Self {
        Value::Int(value)
    }
}

impl From<u64> for Value {
    fn from(value: u64) -> Self {
        Value::Int(value as i64)
    }
}

impl From<u32> for Value {
    fn from(value: u32) -> Self {
        Value::Int(i64::from(value))
    }
}

impl From<&str> for Value {
    fn from(value: &str) -> Self {
        Value::Text(value.to_owned())
    }
}

impl From<String> for Value {
    fn from(value: String) -> Self {
        Value::Text(value)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(value: Option<T>) -> Self {
        value.map(Into::into).unwrap_or(Value::Null)
    }
}

/// A row: its columns by name, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Row {
    pub columns: Vec<(String, Value)>,
}

impl Row {
    pub fn get(&self, name: &str) -> &Value {
        self.columns
            .iter()
            .find(|(column, _)| column == name)
            .map(|(_, value)| value)
            .unwrap_or(&Value::Null)
    }

    pub fn int(&self, name: &str) -> i64 {
        self.get(name).int().unwrap_or(0)
    }

    pub fn text(&self, name: &str) -> String {
        self.get(name).text().unwrap_or_default().to_owned()
    }
}

/// Why a store could not do what it was asked. The store that owns the database names itself
/// when it reports one (`command-side store: …`, `saga store: …`, `read model orders: …`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    /// The database could not be reached or refused a statement; the driver's error is the
    /// source.
    #[error("database error: {0}")]
    Sql(#[source] Arc<sqlx::Error>),
    /// The store's files could not be made or opened.
    #[error("database files: {0}")]
    Io(#[source] Arc<std::io::Error>),
    /// Anything else a store cannot use (an unreadable row, a table without a key), in words.
    #[error("{0}")]
    Other(String),
}

impl From<sqlx::Error> for DbError {
    fn from(error: sqlx::Error) -> Self {
        DbError::Sql(Arc::new(error))
    }
}

impl From<std::io::Error> for DbError {
    fn from(error: std::io::Error) -> Self {
        DbError::Io(Arc::new(error))
    }
}

fn db_error(error: impl Into<DbError>) -> DbError {
    error.into()
}

/// SQLITE_BUSY or one of its extended codes (the primary code is the low byte).
fn is_busy(error: &dyn sqlx::error::DatabaseError) -> bool {
    error
        .code()
        .and_then(|code| code.parse::<i32>().ok())
        .is_some_and(|code| code & 0xff == 5)
}

fn sqlite_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(BUSY_TIMEOUT)
}

/// Rewrites `$N` placeholders for SQLite (outside string literals): to plain `?` when they
/// appear exactly as `$1, $2, ..., $n` in order (every multi-row insert), else to `?N`.
///
/// Plain `?` is not a matter of taste: sqlx asks SQLite for every parameter's name, and SQLite
/// finds a numbered parameter's name by a linear scan of the statement's named parameters, so
/// binding n numbered parameters costs O(n²). A 500-row insert of 15 columns (7,500 `?N`) spent
/// half of a replay's time there; anonymous parameters have no names to scan.
fn sqlite_sql(sql: &str) -> String {
    let mut numbers = Vec::new();
    let mut in_string = false;
    let bytes = sql.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        let c = bytes[at];
        if c == b'\'' {
            in_string = !in_string;
        }
        if c == b'$' && !in_string && bytes.get(at + 1).is_some_and(u8::is_ascii_digit) {
            let digits = bytes[at + 1..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            numbers.push(sql[at + 1..at + 1 + digits].parse::<usize>().unwrap_or(0));
            at += 1 + digits;
            continue;
        }
        at += 1;
    }
    let anonymous = numbers
        .iter()
        .enumerate()
        .all(|(index, number)| *number == index + 1);
    let mut out = String::with_capacity(sql.len());
    let mut in_string = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' {
            in_string = !in_string;
        }
        if c == '$' && !in_string && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
            if anonymous {
                while chars.peek().is_some_and(char::is_ascii_digit) {
                    chars.next();
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The database of one store (a read model, the saga, the command side): one Postgres schema,
/// or one SQLite file.
#[derive(Debug, Clone)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// An open transaction on a [`Db`]. On SQLite it holds its process's turn to write the file
/// ([`WriteTurn`]) until it ends.
#[derive(Debug)]
pub enum Tx {
    Postgres(Transaction<'static, Postgres>),
    Sqlite(Transaction<'static, Sqlite>, WriteTurn),
}

/// How long SQLite waits for another connection's write lock before it fails a statement
/// (`busy_timeout`), and how long a writer waits for its turn in this process before it goes
/// ahead without one.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A process's turn to write one SQLite file (`None`: taken without one, see [`write_turn`]).
///
/// SQLite lets one connection write a file at a time. The others wait in its busy handler,
/// which sleeps and looks again, up to 100 ms between looks, so a writer that queues behind
/// another (the saga's worker behind its relay marking commands sent, and the other way
/// round) starts up to 100 ms after the lock is free. The writers of one process take turns
/// here instead: in the order they asked, each the moment the one before it is done. Writers
/// in other processes still meet the busy handler.
#[derive(Debug)]
pub struct WriteTurn(#[allow(dead_code)] Option<tokio::sync::OwnedMutexGuard<()>>);

/// The turns of every SQLite file this process writes, by path.
static WRITE_TURNS: LazyLock<Mutex<HashMap<PathBuf, Weak<tokio::sync::Mutex<()>>>>> =
    LazyLock::new(Mutex::default);

/// Waits for this process's turn to write `path`. After [`BUSY_TIMEOUT`] it goes ahead without
/// one and leaves the waiting to SQLite (a task that opens a second transaction on a file while
/// it holds one would otherwise wait for itself for good; SQLite fails it instead).
async fn write_turn(path: &Path) -> WriteTurn {
    let turns = {
        let mut registry = WRITE_TURNS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match registry.get(path).and_then(Weak::upgrade) {
            Some(turns) => turns,
            None => {
                registry.retain(|_, turns| turns.strong_count() > 0);
                let turns = Arc::new(tokio::sync::Mutex::new(()));
                registry.insert(path.to_owned(), Arc::downgrade(&turns));
                turns
            }
        }
    };
    match tokio::time::timeout(BUSY_TIMEOUT, turns.lock_owned()).await {
        Ok(guard) => WriteTurn(Some(guard)),
        Err(_) => {
            tracing::warn!(path = %path.display(), "no turn to write the SQLite file after 10 s; writing without one");
            WriteTurn(None)
        }
    }
}

macro_rules! bind_all {
    ($query:expr, $args:expr) => {{
        let mut query = $query;
        for arg in $args {
            query = match arg {
                Value::Int(value) => query.bind(*value),
                Value::Text(value) => query.bind(value.clone()),
                Value::Null => query.bind(None::<String>),
            };
        }
        query
    }};
}

fn read_row<R: sqlx::Row>(row: &R) -> Row
where
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    usize: sqlx::ColumnIndex<R>,
{
    let columns = row
        .columns()
        .iter()
        .enumerate()
        .map(|(index, column)| {
            let value = match row.try_get::<Option<i64>, _>(index) {
                Ok(Some(value)) => Value::Int(value),
                Ok(None) => Value::Null,
                Err(_) => match row.try_get::<Option<String>, _>(index) {
                    Ok(Some(value)) => Value::Text(value),
                    _ => Value::Null,
                },
            };
            (column.name().to_owned(), value)
        })
        .collect();
    Row { columns }
}

impl Db {
    /// Connects to Postgres with `schema` (created when missing) as the search path. The
    /// schema is created under its advisory lock (see [`migrate`]), so processes that start at
    /// once on a fresh database do not race on it.
    pub async fn postgres(url: &str, schema: &str, max_connections: u32) -> Result<Db, DbError> {
        if schema.is_empty()
            || !schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(DbError::Other(format!(
                "{schema:?} is not a plain schema name"
            )));
        }
        let bootstrap = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(db_error)?;
        // Under the schema's lock: two `CREATE SCHEMA IF NOT EXISTS` at once both find it
        // missing, and the second fails on the catalog's unique index.
        let mut tx = bootstrap.begin().await.map_err(db_error)?;
        sqlx::query(LOCK_SCHEMA)
            .bind(SCHEMA_LOCK_CLASS)
            .bind(Some(schema))
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        (&mut *tx)
            .execute(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"").as_str())
            .await
            .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        bootstrap.close().await;
        let set_path = format!("SET search_path TO \"{schema}\"");
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |connection, _| {
                let set_path = set_path.clone();
                Box::pin(async move {
                    connection.execute(set_path.as_str()).await?;
                    // Short queries only: compiling a plan with LLVM costs more than it saves
                    // (40 ms on a count over 100,000 sagas).
                    connection.execute("SET jit = off").await?;
                    Ok(())
                })
            })
            .connect(url)
            .await
            .map_err(db_error)?;
        Ok(Db::Postgres(pool))
    }

    /// Opens (creating) a SQLite file in WAL mode.
    pub async fn sqlite(path: &Path) -> Result<Db, DbError> {
        Db::sqlite_with(path, sqlite_options(path), 4).await
    }

    /// Opens (creating) a SQLite file for secrets that must both last and be erasable: each
    /// commit is synced to disk before it returns (`synchronous = FULL`), and what a statement
    /// deletes or overwrites is zeroed in the file's pages (`secure_delete`), not left in free
    /// space. The WAL still holds the old pages until a checkpoint: see [`Db::truncate_wal`].
    pub async fn sqlite_secure(path: &Path) -> Result<Db, DbError> {
        let options = sqlite_options(path)
            .synchronous(SqliteSynchronous::Full)
            .pragma("secure_delete", "on");
        Db::sqlite_with(path, options, 4).await
    }

    /// Runs `sql` (no parameters) outside any transaction, as one simple-protocol query: for
    /// what a transaction block refuses, such as Postgres' `VACUUM`.
    pub async fn run_alone(&self, sql: &str) -> Result<(), DbError> {
        match self {
            Db::Postgres(pool) => {
                pool.execute(sqlx::raw_sql(sql)).await.map_err(db_error)?;
            }
            Db::Sqlite(pool) => {
                pool.execute(sqlx::raw_sql(sql)).await.map_err(db_error)?;
            }
        }
        Ok(())
    }

    /// On SQLite, copies the WAL into the database file and truncates the WAL to nothing
    /// (`wal_checkpoint(TRUNCATE)`), so that the pages a transaction replaced are no longer in
    /// any file; true when it did (false while another connection still reads an older state).
    /// On Postgres it does nothing and answers false.
    pub async fn truncate_wal(&self) -> Result<bool, DbError> {
        if self.is_postgres() {
            return Ok(false);
        }
        let row = self
            .fetch_optional("PRAGMA wal_checkpoint(TRUNCATE)", &[])
            .await?;
        Ok(row.is_some_and(|row| row.int("busy") == 0))
    }

    /// Opens (creating) a SQLite file for bulk loading something that can be rebuilt and has no
    /// concurrent readers (a replay's shadow): a 256 MiB page cache per connection, so index
    /// inserts with random keys stay in memory; a rollback journal instead of WAL, so the new
    /// pages are written once (WAL writes them twice: to the log, then to the file); and no
    /// fsync (a crash of the machine may cost the file, and the rebuild then starts again; a
    /// crash of the process costs nothing, the journal rolls the open batch back).
    pub async fn sqlite_bulk(path: &Path) -> Result<Db, DbError> {
        let options = sqlite_options(path)
            .journal_mode(SqliteJournalMode::Truncate)
            .synchronous(SqliteSynchronous::Off)
            .pragma("cache_size", "-262144")
            .pragma("temp_store", "memory");
        // One connection: the cache is per connection, and a bulk load writes from one anyway.
        Db::sqlite_with(path, options, 1).await
    }

    async fn sqlite_with(
        path: &Path,
        options: SqliteConnectOptions,
        max_connections: u32,
    ) -> Result<Db, DbError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(db_error)?;
        }
        // Connections opening a fresh file at once (processes started together) each switch it
        // to WAL, and SQLite answers SQLITE_BUSY at once, without waiting in the busy handler,
        // where waiting could deadlock: open again until the busy timeout has passed.
        let deadline = tokio::time::Instant::now() + BUSY_TIMEOUT;
        let mut pause = Duration::from_millis(5);
        loop {
            match SqlitePoolOptions::new()
                .max_connections(max_connections)
                .connect_with(options.clone())
                .await
            {
                Ok(pool) => return Ok(Db::Sqlite(pool)),
                Err(sqlx::Error::Database(error))
                    if is_busy(error.as_ref()) && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                Err(error) => return Err(db_error(error)),
            }
        }
    }

    pub async fn begin(&self) -> Result<Tx, DbError> {
        Ok(match self {
            Db::Postgres(pool) => Tx::Postgres(pool.begin().await.map_err(db_error)?),
            // IMMEDIATE: take the write lock up front. A deferred transaction that reads and then
            // writes fails with SQLITE_BUSY_SNAPSHOT (not waited out by busy_timeout) whenever
            // another connection committed in between, e.g. the saga worker against its relay.
            Db::Sqlite(pool) => {
                let turn = write_turn(pool.connect_options().get_filename()).await;
                Tx::Sqlite(
                    pool.begin_with("BEGIN IMMEDIATE").await.map_err(db_error)?,
                    turn,
                )
            }
        })
    }

    pub async fn fetch_all(&self, sql: &str, args: &[Value]) -> Result<Vec<Row>, DbError> {
        Ok(match self {
            Db::Postgres(pool) => bind_all!(sqlx::query(sql), args)
                .fetch_all(pool)
                .await
                .map_err(db_error)?
                .iter()
                .map(read_row)
                .collect(),
            Db::Sqlite(pool) => {
                let sql = sqlite_sql(sql);
                bind_all!(sqlx::query(&sql), args)
                    .fetch_all(pool)
                    .await
                    .map_err(db_error)?
                    .iter()
                    .map(read_row)
                    .collect()
            }
        })
    }

    pub async fn fetch_optional(&self, sql: &str, args: &[Value]) -> Result<Option<Row>, DbError> {
        Ok(self.fetch_all(sql, args).await?.into_iter().next())
    }

    pub async fn execute(&self, sql: &str, args: &[Value]) -> Result<u64, DbError> {
        let mut tx = self.begin().await?;
        let affected = tx.execute(sql, args).await?;
        tx.commit().await?;
        Ok(affected)
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Db::Postgres(_))
    }
}

impl Tx {
    pub async fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64, DbError> {
        Ok(match self {
            Tx::Postgres(tx) => bind_all!(sqlx::query(sql), args)
                .execute(&mut **tx)
                .await
                .map_err(db_error)?
                .rows_affected(),
            Tx::Sqlite(tx, _) => {
                let sql = sqlite_sql(sql);
                bind_all!(sqlx::query(&sql), args)
                    .execute(&mut **tx)
                    .await
                    .map_err(db_error)?
                    .rows_affected()
            }
        })
    }

    pub async fn fetch_all(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, DbError> {
        Ok(match self {
            Tx::Postgres(tx) => bind_all!(sqlx::query(sql), args)
                .fetch_all(&mut **tx)
                .await
                .map_err(db_error)?
                .iter()
                .map(read_row)
                .collect(),
            Tx::Sqlite(tx, _) => {
                let sql = sqlite_sql(sql);
                bind_all!(sqlx::query(&sql), args)
                    .fetch_all(&mut **tx)
                    .await
                    .map_err(db_error)?
                    .iter()
                    .map(read_row)
                    .collect()
            }
        })
    }

    pub async fn fetch_optional(
        &mut self,
        sql: &str,
        args: &[Value],
    ) -> Result<Option<Row>, DbError> {
        Ok(self.fetch_all(sql, args).await?.into_iter().next())
    }

    /// Inserts rows that cannot conflict (a fresh table, unique keys): `COPY … FROM STDIN` on
    /// Postgres, multi-row inserts on SQLite. A conflict fails the statement.
    pub async fn copy_rows(
        &mut self,
        table: &str,
        columns: &[&str],
        rows: &[Vec<Value>],
    ) -> Result<(), DbError> {
        if rows.is_empty() {
            return Ok(());
        }
        let names = columns.join(", ");
        match self {
            Tx::Postgres(tx) => {
                let mut copy = tx
                    .copy_in_raw(&format!("COPY {table} ({names}) FROM STDIN"))
                    .await
                    .map_err(db_error)?;
                copy.send(copy_text(rows).into_bytes())
                    .await
                    .map_err(db_error)?;
                copy.finish().await.map_err(db_error)?;
            }
            Tx::Sqlite(..) => {
                for chunk in rows.chunks((30_000 / columns.len().max(1)).max(1)) {
                    let sql = format!(
                        "INSERT INTO {table} ({names}) VALUES {}",
                        value_rows(chunk.len(), columns.len(), 1)
                    );
                    let args: Vec<Value> = chunk.iter().flatten().cloned().collect();
                    self.execute(&sql, &args).await?;
                }
            }
        }
        Ok(())
    }

    /// [`Tx::copy_rows`] for rows that should not conflict, when a conflict is not fatal: the
    /// COPY runs under a savepoint, and if it is refused the savepoint is rolled back, so the
    /// transaction goes on as before it. Returns why it was refused (`None`: copied). Only
    /// failing to roll back is an error.
    pub async fn copy_rows_or_undo(
        &mut self,
        table: &str,
        columns: &[&str],
        rows: &[Vec<Value>],
    ) -> Result<Option<DbError>, DbError> {
        if rows.is_empty() {
            return Ok(None);
        }
        self.run("SAVEPOINT copy_rows").await?;
        match self.copy_rows(table, columns, rows).await {
            // Released by the commit.
            Ok(()) => Ok(None),
            Err(refused) => {
                self.run("ROLLBACK TO SAVEPOINT copy_rows").await?;
                Ok(Some(refused))
            }
        }
    }

    /// Runs a statement given as plain SQL with no parameters (DDL, savepoints).
    pub async fn run(&mut self, sql: &str) -> Result<(), DbError> {
        match self {
            Tx::Postgres(tx) => {
                (&mut **tx).execute(sql).await.map_err(db_error)?;
            }
            Tx::Sqlite(tx, _) => {
                (&mut **tx).execute(sql).await.map_err(db_error)?;
            }
        }
        Ok(())
    }

    pub async fn commit(self) -> Result<(), DbError> {
        match self {
            Tx::Postgres(tx) => tx.commit().await.map_err(db_error),
            Tx::Sqlite(tx, _turn) => tx.commit().await.map_err(db_error),
        }
    }
}

/// Rows in Postgres' COPY text format: tab-separated fields, `\N` for NULL, backslash escapes.
pub fn copy_text(rows: &[Vec<Value>]) -> String {
    let mut out = String::with_capacity(rows.len() * 128);
    for row in rows {
        for (index, value) in row.iter().enumerate() {
            if index > 0 {
                out.push('\t');
            }
            match value {
                Value::Int(value) => out.push_str(&value.to_string()),
                Value::Null => out.push_str("\\N"),
                Value::Text(text) => {
                    for c in text.chars() {
                        match c {
                            '\\' => out.push_str("\\\\"),
                            '\t' => out.push_str("\\t"),
                            '\n' => out.push_str("\\n"),
                            '\r' => out.push_str("\\r"),
                            c => out.push(c),
                        }
                    }
                }
            }
        }
        out.push('\n');
    }
    out
}

/// `$first, $first+1, ...`: `count` parameters, for an `IN (...)` list.
pub fn placeholders(count: usize, first: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `($1, $2), ($3, $4), ...`: placeholders for a multi-row statement of `rows` rows of `width`
/// values, numbered from `first`.
pub fn value_rows(rows: usize, width: usize, first: usize) -> String {
    let mut out = String::new();
    for row in 0..rows {
        if row > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for column in 0..width {
            if column > 0 {
                out.push_str(", ");
            }
            out.push('$');
            out.push_str(&(first + row * width + column).to_string());
        }
        out.push(')');
    }
    out
}

/// Keys per `IN (...)` list and rows per `VALUES` statement on SQLite (its limit is 32766
/// parameters per statement).
const SQLITE_CHUNK: usize = 500;

/// Runs `sql` for a set of distinct text keys. `sql` says where the keys go with `{keys}`
/// (after a column: `aggregate_id {keys}`; it may appear more than once), and binds `args` as
/// `$1`, `$2`, ...; the keys come after them. Empty `keys` read nothing.
///
/// On Postgres it is one statement whatever the number of keys, bound as one array
/// (`UNNEST`): the text never changes, so each connection prepares it once. On SQLite
/// (in-process, no round trips) it is `IN (...)` lists in chunks.
pub async fn fetch_for_keys(
    tx: &mut Tx,
    sql: &str,
    args: &[Value],
    keys: &[String],
) -> Result<Vec<Row>, DbError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    match tx {
        Tx::Postgres(tx) => {
            // One lookup per key, by the table's index, whatever the planner believes about
            // the table: a fresh read model grows far faster than its statistics, and a
            // generic plan for `= ANY($n)` then filters the whole table once per key.
            let sql = format!(
                "SELECT q.* FROM UNNEST(${}::text[]) AS k(key) CROSS JOIN LATERAL ({}) AS q",
                args.len() + 1,
                sql.replace("{keys}", "= k.key")
            );
            Ok(bind_all!(sqlx::query(&sql), args)
                .bind(keys)
                .fetch_all(&mut **tx)
                .await
                .map_err(db_error)?
                .iter()
                .map(read_row)
                .collect())
        }
        Tx::Sqlite(..) => {
            let mut rows = Vec::new();
            for chunk in keys.chunks(SQLITE_CHUNK) {
                let sql = sql.replace(
                    "{keys}",
                    &format!("IN ({})", placeholders(chunk.len(), args.len() + 1)),
                );
                let mut all = args.to_vec();
                all.extend(chunk.iter().map(|key| Value::from(key.as_str())));
                rows.extend(tx.fetch_all(&sql, &all).await?);
            }
            Ok(rows)
        }
    }
}

/// The SQL type of a column written by [`write_rows`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    Text,
}

/// Writes `rows` (each `columns.len()` values, in the order of `columns`) with
/// `INSERT INTO {table} ({columns}) … {conflict}`. `conflict` is the `ON CONFLICT` clause, which
/// may refer to `excluded`. The rows must not repeat a key an `ON CONFLICT DO UPDATE` acts on
/// (fold them first). Returns how many rows were inserted or updated.
///
/// On Postgres it is one statement whatever the number of rows, every column bound as one
/// array (`UNNEST`): the text never changes, so each connection prepares it once and the
/// server never parses a thousand-row `VALUES` list. On SQLite it is multi-row `VALUES` in
/// chunks.
pub async fn write_rows(
    tx: &mut Tx,
    table: &str,
    columns: &[(&str, Kind)],
    rows: &[Vec<Value>],
    conflict: &str,
) -> Result<u64, DbError> {
    Ok(write(tx, table, columns, rows, conflict, None).await?.0)
}

/// [`write_rows`] that also returns `returning` (a column list) of each row inserted or
/// updated; a row an `ON CONFLICT … DO NOTHING` or a false `DO UPDATE … WHERE` left alone
/// returns nothing.
pub async fn write_rows_returning(
    tx: &mut Tx,
    table: &str,
    columns: &[(&str, Kind)],
    rows: &[Vec<Value>],
    conflict: &str,
    returning: &str,
) -> Result<Vec<Row>, DbError> {
    Ok(write(tx, table, columns, rows, conflict, Some(returning))
        .await?
        .1)
}

async fn write(
    tx: &mut Tx,
    table: &str,
    columns: &[(&str, Kind)],
    rows: &[Vec<Value>],
    conflict: &str,
    returning: Option<&str>,
) -> Result<(u64, Vec<Row>), DbError> {
    if rows.is_empty() {
        return Ok((0, Vec::new()));
    }
    let names = columns
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ");
    let returning = returning.map_or(String::new(), |columns| format!(" RETURNING {columns}"));
    match tx {
        Tx::Postgres(tx) => {
            let arrays = columns
                .iter()
                .enumerate()
                .map(|(index, (_, kind))| {
                    let kind = match kind {
                        Kind::Int => "bigint",
                        Kind::Text => "text",
                    };
                    format!("${}::{kind}[]", index + 1)
                })
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO {table} ({names}) SELECT * FROM UNNEST({arrays}) {conflict}{returning}"
            );
            let mut query = sqlx::query(&sql);
            for (index, (name, kind)) in columns.iter().enumerate() {
                query = match kind {
                    Kind::Int => query.bind(
                        rows.iter()
                            .map(|row| match &row[index] {
                                Value::Int(value) => Ok(Some(*value)),
                                Value::Null => Ok(None),
                                Value::Text(_) => Err(DbError::Other(format!(
                                    "{table}.{name}: a text value for an integer column"
                                ))),
                            })
                            .collect::<Result<Vec<Option<i64>>, _>>()?,
                    ),
                    Kind::Text => query.bind(
                        rows.iter()
                            .map(|row| match &row[index] {
                                Value::Text(value) => Ok(Some(value.as_str())),
                                Value::Null => Ok(None),
                                Value::Int(_) => Err(DbError::Other(format!(
                                    "{table}.{name}: an integer value for a text column"
                                ))),
                            })
                            .collect::<Result<Vec<Option<&str>>, _>>()?,
                    ),
                };
            }
            if returning.is_empty() {
                let written = query
                    .execute(&mut **tx)
                    .await
                    .map_err(db_error)?
                    .rows_affected();
                Ok((written, Vec::new()))
            } else {
                let rows: Vec<Row> = query
                    .fetch_all(&mut **tx)
                    .await
                    .map_err(db_error)?
                    .iter()
                    .map(read_row)
                    .collect();
                Ok((rows.len() as u64, rows))
            }
        }
        Tx::Sqlite(..) => {
            let (mut written, mut returned) = (0, Vec::new());
            for chunk in rows.chunks(SQLITE_CHUNK.min(30_000 / columns.len().max(1))) {
                let sql = format!(
                    "INSERT INTO {table} ({names}) VALUES {} {conflict}{returning}",
                    value_rows(chunk.len(), columns.len(), 1)
                );
                let args: Vec<Value> = chunk.iter().flatten().cloned().collect();
                if returning.is_empty() {
                    written += tx.execute(&sql, &args).await?;
                } else {
                    let rows = tx.fetch_all(&sql, &args).await?;
                    written += rows.len() as u64;
                    returned.extend(rows);
                }
            }
            Ok((written, returned))
        }
    }
}

/// The first key of the Postgres advisory lock that serialises the creation and the
/// migrations of one schema (the second key is the hash of the schema's name): the bytes
/// `sqlm`, so the lock is told apart from any other two-key advisory lock in `pg_locks`.
pub(crate) const SCHEMA_LOCK_CLASS: i32 = i32::from_be_bytes(*b"sqlm");

/// Takes a schema's lock until the transaction ends: `$1` is [`SCHEMA_LOCK_CLASS`], `$2` the
/// schema's name, or NULL for the transaction's current schema (its search path).
pub(crate) const LOCK_SCHEMA: &str =
    "SELECT pg_advisory_xact_lock($1, hashtext(coalesce($2::TEXT, current_schema()::TEXT, '')))";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_numbered_sqlite_parameters_outside_strings() {
        assert_eq!(
            sqlite_sql("SELECT $1, '$2', $10 WHERE a = 'x' AND b = $2"),
            "SELECT ?1, '$2', ?10 WHERE a = 'x' AND b = ?2"
        );
    }

    #[test]
    fn placeholders_in_order_become_anonymous_sqlite_parameters() {
        assert_eq!(
            sqlite_sql("INSERT INTO t VALUES ($1, $2, '$9'), ($3, $4) WHERE c = '$1'"),
            "INSERT INTO t VALUES (?, ?, '$9'), (?, ?) WHERE c = '$1'"
        );
        // Repeated or out of order: numbered, so each binds its own value.
        assert_eq!(sqlite_sql("SELECT $1, $1"), "SELECT ?1, ?1");
        assert_eq!(sqlite_sql("SELECT $2, $1"), "SELECT ?2, ?1");
    }

    #[test]
    fn multi_row_placeholders_are_numbered_row_by_row() {
        assert_eq!(value_rows(2, 3, 1), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(value_rows(1, 2, 5), "($5, $6)");
    }
}
