-- The orchestrator's own state: each order's saga (as JSON, plus the columns its read model
-- filters on), and the outbox of commands decided but perhaps not yet published.
CREATE TABLE sagas (
    order_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    deadline BIGINT,
    correlation_id TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    revision BIGINT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX sagas_by_deadline ON sagas (deadline);
CREATE INDEX sagas_by_state ON sagas (state, updated_at);
CREATE TABLE saga_outbox (
    command_id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    order_id TEXT NOT NULL,
    service TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    message TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    sent_at BIGINT
);
CREATE INDEX saga_outbox_unsent ON saga_outbox (sent_at, seq)
