-- The customers read model: one row per customer, its personal fields as the log holds them
-- (sealed with the customer's data key; the query API opens them with the key store). An
-- erased customer's row keeps no sealed field at all.
CREATE TABLE customers (
    customer_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    name TEXT,
    email TEXT,
    version BIGINT NOT NULL,
    registered_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    erased_at BIGINT
)
