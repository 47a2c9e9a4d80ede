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
    "offset" BIGINT NOT NULL,
    envelope TEXT NOT NULL
);
CREATE UNIQUE INDEX audit_events_by_aggregate ON audit_events (aggregate_type, aggregate_id, aggregate_version);
CREATE INDEX audit_events_by_correlation ON audit_events (correlation_id, occurred_at);
CREATE INDEX audit_events_by_causation ON audit_events (causation_id);
CREATE INDEX audit_events_by_type ON audit_events (event_type, occurred_at);
CREATE INDEX audit_events_by_time ON audit_events (occurred_at)
