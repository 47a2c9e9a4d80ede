-- One row per order's payment, as the payment service shows it.
CREATE TABLE payments (
    order_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    currency TEXT,
    authorised_minor BIGINT NOT NULL,
    captured_minor BIGINT NOT NULL,
    refunded_minor BIGINT NOT NULL,
    authorisation_id TEXT,
    reason TEXT,
    version BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
)
