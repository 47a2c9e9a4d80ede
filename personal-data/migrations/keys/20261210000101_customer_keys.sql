-- The customers' data keys: each customer's personal fields are sealed with their own key,
-- which lives only here, never in the log. Erasing a customer clears the key and keeps the row
-- as a tombstone (erased_at), so that no new key is ever made for that customer again.
CREATE TABLE customer_keys (
    customer_id TEXT PRIMARY KEY,
    data_key TEXT,
    created_at BIGINT NOT NULL,
    erased_at BIGINT
)
