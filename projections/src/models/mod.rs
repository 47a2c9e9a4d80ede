//! The read models, one module each. Every one checks all events of a batch in memory first
//! (loading the rows they touch with one query), then writes each table with one statement.
//!
//! This file also holds the two bulk statements the models and the runtime share,
//! [`fetch_for_keys`] and [`write_rows`]. On Postgres each is one statement per call whatever
//! the number of rows, with the keys or every column bound as one array (`UNNEST`): the text
//! never changes, so each connection prepares it once and the server never parses a
//! thousand-row `VALUES` list. On SQLite (in-process, no round trips) they are `IN (...)` lists
//! and multi-row `VALUES` in chunks.

pub mod audit;
pub mod inventory;
pub mod orders;
pub mod payments;

use sqlx::{Column as _, Row as _};

use crate::db::{DbError, Row, Tx, Value, placeholders, value_rows};

/// Keys per `IN (...)` list and rows per `VALUES` statement on SQLite (its limit is 32766
/// parameters per statement).
const SQLITE_CHUNK: usize = 500;

fn db_error(error: impl std::fmt::Display) -> DbError {
    DbError(error.to_string())
}

fn read_pg_row(row: &sqlx::postgres::PgRow) -> Row {
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

/// Runs `sql` for a set of distinct text keys. `sql` says where the keys go with `{keys}`
/// (after a column: `aggregate_id {keys}`; it may appear more than once), and binds `args` as
/// `$1`, `$2`, ...; the keys come after them. Empty `keys` read nothing.
pub(crate) async fn fetch_for_keys(
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
            let mut query = sqlx::query(&sql);
            for arg in args {
                query = match arg {
                    Value::Int(value) => query.bind(*value),
                    Value::Text(value) => query.bind(value.as_str()),
                    Value::Null => query.bind(None::<String>),
                };
            }
            Ok(query
                .bind(keys)
                .fetch_all(&mut **tx)
                .await
                .map_err(db_error)?
                .iter()
                .map(read_pg_row)
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
pub(crate) enum Kind {
    Int,
    Text,
}

/// Writes `rows` (each `columns.len()` values, in the order of `columns`) with
/// `INSERT INTO {table} ({columns}) … {conflict}`. `conflict` is the `ON CONFLICT` clause, which
/// may refer to `excluded`. The rows must not repeat a key an `ON CONFLICT DO UPDATE` acts on
/// (fold them first). Returns how many rows were inserted or updated.
pub(crate) async fn write_rows(
    tx: &mut Tx,
    table: &str,
    columns: &[(&str, Kind)],
    rows: &[Vec<Value>],
    conflict: &str,
) -> Result<u64, DbError> {
    if rows.is_empty() {
        return Ok(0);
    }
    let names = columns
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ");
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
            let sql =
                format!("INSERT INTO {table} ({names}) SELECT * FROM UNNEST({arrays}) {conflict}");
            let mut query = sqlx::query(&sql);
            for (index, (name, kind)) in columns.iter().enumerate() {
                query = match kind {
                    Kind::Int => query.bind(
                        rows.iter()
                            .map(|row| match &row[index] {
                                Value::Int(value) => Ok(Some(*value)),
                                Value::Null => Ok(None),
                                Value::Text(_) => Err(DbError(format!(
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
                                Value::Int(_) => Err(DbError(format!(
                                    "{table}.{name}: an integer value for a text column"
                                ))),
                            })
                            .collect::<Result<Vec<Option<&str>>, _>>()?,
                    ),
                };
            }
            Ok(query
                .execute(&mut **tx)
                .await
                .map_err(db_error)?
                .rows_affected())
        }
        Tx::Sqlite(..) => {
            let mut written = 0;
            for chunk in rows.chunks(SQLITE_CHUNK.min(30_000 / columns.len().max(1))) {
                let sql = format!(
                    "INSERT INTO {table} ({names}) VALUES {} {conflict}",
                    value_rows(chunk.len(), columns.len(), 1)
                );
                let args: Vec<Value> = chunk.iter().flatten().cloned().collect();
                written += tx.execute(&sql, &args).await?;
            }
            Ok(written)
        }
    }
}
