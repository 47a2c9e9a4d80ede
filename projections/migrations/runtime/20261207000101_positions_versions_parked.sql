-- The projection runtime's bookkeeping, kept in the same database as the read models so that
-- rows, positions and versions always change in one transaction.
CREATE TABLE IF NOT EXISTS projection_positions (
    projection TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition BIGINT NOT NULL,
    next_offset BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (projection, topic, partition)
);
CREATE TABLE IF NOT EXISTS applied_versions (
    projection TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    PRIMARY KEY (projection, aggregate_type, aggregate_id)
);
CREATE TABLE IF NOT EXISTS parked_events (
    projection TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition BIGINT NOT NULL,
    "offset" BIGINT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    aggregate_version BIGINT NOT NULL,
    event_type TEXT NOT NULL,
    error TEXT NOT NULL,
    record TEXT NOT NULL,
    parked_at BIGINT NOT NULL,
    status TEXT NOT NULL,
    PRIMARY KEY (projection, topic, partition, "offset")
);
CREATE INDEX IF NOT EXISTS parked_events_by_aggregate
    ON parked_events (projection, aggregate_type, aggregate_id, status);
