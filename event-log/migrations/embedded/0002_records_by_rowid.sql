-- The records move from a WITHOUT ROWID table keyed by position to a rowid table, with the
-- position in a unique index of its own.
--
-- A record is about a kilobyte. In a WITHOUT ROWID table the interior pages of the b-tree hold
-- whole rows too, so a 4 KiB page holds only a few and appends to 16 partitions split pages at
-- every few records: a commit of one record wrote 3.6 pages to the WAL on average (15 KB for
-- one record), a commit of five 16 pages (SQLite's documentation advises WITHOUT ROWID only for
-- rows under about a twentieth of a page). A rowid table appends every row at its one end, and
-- the index's entries are small: 2.6 pages for a commit of one record, 8.6 for five
-- (BENCHMARKS.md, session 8). Less written per append, fewer checkpoints, less to sync.
CREATE TABLE records_by_rowid (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    "offset" INTEGER NOT NULL,
    key TEXT NOT NULL,
    headers TEXT NOT NULL,
    value BLOB NOT NULL,
    timestamp_ms INTEGER NOT NULL
);

INSERT INTO records_by_rowid (topic, partition, "offset", key, headers, value, timestamp_ms)
SELECT topic, partition, "offset", key, headers, value, timestamp_ms
FROM records
ORDER BY topic, partition, "offset";

DROP TABLE records;

ALTER TABLE records_by_rowid RENAME TO records;

CREATE UNIQUE INDEX records_position ON records (topic, partition, "offset");
