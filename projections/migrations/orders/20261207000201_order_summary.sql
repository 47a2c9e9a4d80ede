-- The order summary, as the order service shows it; `lines` is the order's lines as JSON.
CREATE TABLE order_summary (
    order_id TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    status TEXT NOT NULL,
    currency TEXT NOT NULL,
    total_minor BIGINT NOT NULL,
    lines TEXT NOT NULL,
    reason TEXT,
    placed_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    version BIGINT NOT NULL
);
-- A customer's orders, newest first, optionally by status.
CREATE INDEX order_summary_by_customer ON order_summary (customer_id, placed_at DESC, order_id DESC);
CREATE INDEX order_summary_by_customer_status ON order_summary (customer_id, status, placed_at DESC, order_id DESC);
-- The order's payment status, from the payment's events.
CREATE TABLE order_payment (
    order_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    version BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
-- The order's stock reservations, one per SKU, from the stock items' events.
CREATE TABLE order_reservations (
    order_id TEXT NOT NULL,
    sku TEXT NOT NULL,
    quantity BIGINT NOT NULL,
    status TEXT NOT NULL,
    -- The stock item's version of the event behind `status`.
    stock_version BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (order_id, sku)
)
