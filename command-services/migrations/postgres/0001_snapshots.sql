-- The command side's own bookkeeping: snapshots of each partition's aggregate states (so
-- start-up reads only the log tail), and how far each command topic has been consumed. Neither
-- is a source of truth: losing them costs a longer start-up, no data.
CREATE TABLE snapshots (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset BIGINT NOT NULL,
    taken_at TIMESTAMPTZ NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (topic, partition)
);

CREATE TABLE consumer_positions (
    consumer TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset BIGINT NOT NULL,
    PRIMARY KEY (consumer, topic, partition)
);
