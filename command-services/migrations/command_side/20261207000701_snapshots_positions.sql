-- The command side's own bookkeeping: snapshots of each partition's aggregate states (so
-- start-up reads only the log tail), and how far each command topic has been consumed. Neither
-- is a source of truth: losing them costs a longer start-up, no data.
CREATE TABLE command_snapshots (
    topic TEXT NOT NULL,
    partition BIGINT NOT NULL,
    next_offset BIGINT NOT NULL,
    taken_at BIGINT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (topic, partition)
);
CREATE TABLE command_positions (
    consumer TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition BIGINT NOT NULL,
    next_offset BIGINT NOT NULL,
    PRIMARY KEY (consumer, topic, partition)
)
