-- Fenced owners: every owner of a partition takes the next epoch here when it starts owning
-- it, and its records and snapshot heads carry that epoch, so a later owner's writes tell an
-- earlier one (a zombie, an instance replaced in a rolling update) to stop, and a snapshot
-- head never goes back to an earlier owner's.
CREATE TABLE command_owner_epochs (
    topic TEXT NOT NULL,
    partition BIGINT NOT NULL,
    epoch BIGINT NOT NULL,
    holder TEXT NOT NULL,
    acquired_at BIGINT NOT NULL,
    PRIMARY KEY (topic, partition)
);
ALTER TABLE command_snapshot_heads ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0
