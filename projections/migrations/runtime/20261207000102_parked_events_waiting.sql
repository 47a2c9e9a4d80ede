-- The events still parked, which a worker lists before each batch.
CREATE INDEX IF NOT EXISTS parked_events_waiting
    ON parked_events (projection, aggregate_type, aggregate_id) WHERE status = 'parked'
