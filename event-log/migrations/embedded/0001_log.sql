-- The embedded event log: the same topics, partitions and offsets as Kafka, in one SQLite file,
-- so `cargo run` needs no broker. Offsets are assigned by the single writer task.
CREATE TABLE topics (
    name TEXT PRIMARY KEY,
    partitions INTEGER NOT NULL CHECK (partitions > 0)
);

CREATE TABLE records (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    "offset" INTEGER NOT NULL,
    key TEXT NOT NULL,
    headers TEXT NOT NULL,
    value BLOB NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    PRIMARY KEY (topic, partition, "offset")
) WITHOUT ROWID;
