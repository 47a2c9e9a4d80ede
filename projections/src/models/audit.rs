//! Audit: every effective event, indexed by aggregate, correlation id, causation id, type and
//! time. The audit tools read it.

use async_trait::async_trait;

use crate::db::{Tx, Value, value_rows};
use crate::runtime::{ApplyError, Event, Projection};

#[derive(Debug, Default)]
pub struct Audit;

#[async_trait]
impl Projection for Audit {
    fn name(&self) -> &'static str {
        "audit"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["order", "payment", "stock"]
    }

    fn migrations(&self) -> &'static [&'static str] {
        &["
-- Every effective event of every aggregate, with its envelope (CloudEvents JSON) and where it
-- sits in the log.
CREATE TABLE audit_events (
    event_id TEXT PRIMARY KEY,
    aggregate_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    aggregate_version BIGINT NOT NULL,
    event_type TEXT NOT NULL,
    schema_version BIGINT NOT NULL,
    occurred_at BIGINT NOT NULL,
    correlation_id TEXT NOT NULL,
    causation_id TEXT NOT NULL,
    command_id TEXT NOT NULL,
    actor TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition BIGINT NOT NULL,
    \"offset\" BIGINT NOT NULL,
    envelope TEXT NOT NULL
);
CREATE UNIQUE INDEX audit_events_by_aggregate ON audit_events (aggregate_type, aggregate_id, aggregate_version);
CREATE INDEX audit_events_by_correlation ON audit_events (correlation_id, occurred_at);
CREATE INDEX audit_events_by_causation ON audit_events (causation_id);
CREATE INDEX audit_events_by_type ON audit_events (event_type, occurred_at);
CREATE INDEX audit_events_by_time ON audit_events (occurred_at)
"]
    }

    async fn apply(&self, tx: &mut Tx, events: &[Event]) -> Result<(), ApplyError> {
        for chunk in events.chunks(100) {
            let mut args = Vec::with_capacity(chunk.len() * 15);
            for event in chunk {
                let envelope = &event.envelope;
                args.extend([
                    Value::from(envelope.event_id.to_string()),
                    envelope.aggregate_type.as_str().into(),
                    envelope.aggregate_id.as_str().into(),
                    envelope.aggregate_version.into(),
                    envelope.event_type.as_str().into(),
                    i64::from(envelope.schema_version).into(),
                    envelope.occurred_at.timestamp_millis().into(),
                    envelope.correlation_id.as_str().into(),
                    envelope.causation_id.as_str().into(),
                    envelope.command_id.to_string().into(),
                    envelope.actor.as_str().into(),
                    event.position.topic.as_str().into(),
                    event.position.partition.into(),
                    event.position.offset.into(),
                    envelope.to_json().to_string().into(),
                ]);
            }
            tx.execute(
                &format!(
                    "INSERT INTO audit_events (event_id, aggregate_type, aggregate_id, aggregate_version, event_type,
                         schema_version, occurred_at, correlation_id, causation_id, command_id, actor, topic, partition,
                         \"offset\", envelope) VALUES {}
                     ON CONFLICT (event_id) DO NOTHING",
                    value_rows(chunk.len(), 15, 1)
                ),
                &args,
            )
            .await?;
        }
        Ok(())
    }
}
