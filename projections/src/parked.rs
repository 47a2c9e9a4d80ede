//! Parked events: list them, retry them (apply again, e.g. after a fix), or skip them. Either
//! way the events parked behind one of the same aggregate follow in order. A retry or skip holds
//! the event's partition as a worker's batch does (see `runtime`), so it never runs beside a
//! batch of that partition or another retry of the same event.

use serde::Serialize;

use crate::db::{Db, DbError};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ParkedEvent {
    pub projection: String,
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub aggregate_version: u64,
    pub event_type: String,
    pub error: String,
    pub parked_at: i64,
    pub status: String,
}

/// The parked events of a projection (only those still waiting unless `all`).
pub async fn list(db: &Db, projection: &str, all: bool) -> Result<Vec<ParkedEvent>, DbError> {
    let rows = db
        .fetch_all(
            &format!(
                r#"SELECT projection, topic, partition, "offset", aggregate_type, aggregate_id, aggregate_version,
                       event_type, error, parked_at, status
                   FROM parked_events WHERE projection = $1 {}
                   ORDER BY aggregate_type, aggregate_id, aggregate_version, topic, partition, "offset""#,
                if all { "" } else { "AND status = 'parked'" }
            ),
            &[projection.into()],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| ParkedEvent {
            projection: row.text("projection"),
            topic: row.text("topic"),
            partition: row.int("partition") as u32,
            offset: row.int("offset") as u64,
            aggregate_type: row.text("aggregate_type"),
            aggregate_id: row.text("aggregate_id"),
            aggregate_version: row.int("aggregate_version") as u64,
            event_type: row.text("event_type"),
            error: row.text("error"),
            parked_at: row.int("parked_at"),
            status: row.text("status"),
        })
        .collect())
}

/// What an operator does with a parked event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Apply it again (after a fix); if it applies, the events waiting behind it follow.
    Retry,
    /// Give it up; the events waiting behind it are applied.
    Skip,
}

/// What came of a retry or skip.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Resolved {
    /// Offsets of events now applied.
    pub applied: Vec<u64>,
    /// The offset of an event skipped.
    pub skipped: Option<u64>,
    /// An event still parked (with its error), if one failed again.
    pub still_parked: Option<(u64, String)>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    #[error("no parked event of {projection} at {topic}:{partition}:{offset}")]
    NotFound {
        projection: String,
        topic: String,
        partition: u32,
        offset: u64,
    },
    #[error(
        "an earlier event of {aggregate} is still parked (at offset {offset}); retry or skip it first"
    )]
    NotFirst { aggregate: String, offset: u64 },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Retries or skips the parked event at a position, then applies the events of the same
/// aggregate parked behind it, in order, until one fails again.
pub async fn resolve(
    db: &Db,
    projection: &dyn crate::runtime::Projection,
    position: &event_log::Position,
    resolution: Resolution,
) -> Result<Resolved, ResolveError> {
    let name = projection.name();
    let mut tx = db.begin().await?;
    // Hold the partition as a worker's batch does (its claim takes the same row first), so
    // neither a batch nor another retry of the same event runs meanwhile: what is read below is
    // what stays stored until the commit, and each event is applied once.
    tx.execute(
        "UPDATE projection_positions SET updated_at = updated_at
         WHERE projection = $1 AND topic = $2 AND partition = $3",
        &[
            name.into(),
            position.topic.as_str().into(),
            position.partition.into(),
        ],
    )
    .await?;
    let target = tx
        .fetch_optional(
            r#"SELECT aggregate_type, aggregate_id FROM parked_events
               WHERE projection = $1 AND topic = $2 AND partition = $3 AND "offset" = $4 AND status = 'parked'"#,
            &[name.into(), position.topic.as_str().into(), position.partition.into(), position.offset.into()],
        )
        .await?
        .ok_or_else(|| ResolveError::NotFound {
            projection: name.to_owned(),
            topic: position.topic.clone(),
            partition: position.partition,
            offset: position.offset,
        })?;
    let queue = tx
        .fetch_all(
            r#"SELECT topic, partition, "offset", record FROM parked_events
               WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id = $3 AND status = 'parked'
               ORDER BY aggregate_version, "offset""#,
            &[name.into(), target.get("aggregate_type").clone(), target.get("aggregate_id").clone()],
        )
        .await?;
    let first = queue.first().map(|row| row.int("offset") as u64);
    if first != Some(position.offset) {
        return Err(ResolveError::NotFirst {
            aggregate: format!(
                "{} {}",
                target.text("aggregate_type"),
                target.text("aggregate_id")
            ),
            offset: first.unwrap_or_default(),
        });
    }
    let mark = |status: &'static str, row: &crate::db::Row| {
        (
            r#"UPDATE parked_events SET status = $1
               WHERE projection = $2 AND topic = $3 AND partition = $4 AND "offset" = $5"#,
            vec![
                status.into(),
                name.into(),
                row.get("topic").clone(),
                row.get("partition").clone(),
                row.get("offset").clone(),
            ],
        )
    };
    let mut resolved = Resolved::default();
    let mut rows = queue.into_iter();
    if resolution == Resolution::Skip
        && let Some(row) = rows.next()
    {
        let (sql, args) = mark("skipped", &row);
        tx.execute(sql, &args).await?;
        resolved.skipped = Some(row.int("offset") as u64);
    }
    for row in rows {
        let offset = row.int("offset") as u64;
        let applied = match event_schema::Envelope::from_json_bytes(row.text("record").as_bytes()) {
            Err(error) => Err(error.to_string()),
            Ok(envelope) => {
                let event = crate::runtime::Event {
                    position: event_log::Position {
                        topic: row.text("topic"),
                        partition: row.int("partition") as u32,
                        offset,
                    },
                    envelope,
                };
                match projection
                    .apply(&mut tx, std::slice::from_ref(&event))
                    .await
                {
                    Ok(()) => Ok(()),
                    Err(crate::runtime::ApplyError::Poison { message, .. }) => Err(message),
                    Err(crate::runtime::ApplyError::Db(error)) => return Err(error.into()),
                }
            }
        };
        match applied {
            Ok(()) => {
                let (sql, args) = mark("retried", &row);
                tx.execute(sql, &args).await?;
                resolved.applied.push(offset);
            }
            Err(message) => {
                tx.execute(
                    r#"UPDATE parked_events SET error = $1
                       WHERE projection = $2 AND topic = $3 AND partition = $4 AND "offset" = $5"#,
                    &[
                        message.as_str().into(),
                        name.into(),
                        row.get("topic").clone(),
                        row.get("partition").clone(),
                        row.get("offset").clone(),
                    ],
                )
                .await?;
                resolved.still_parked = Some((offset, message));
                break;
            }
        }
    }
    tx.commit().await?;
    projection.committed();
    Ok(resolved)
}
