-- Stock per SKU as the inventory service shows it; `version` is the stock item's last applied
-- aggregate version, so a redelivered event is recognised.
CREATE TABLE stock_levels (
    sku TEXT PRIMARY KEY,
    on_hand BIGINT NOT NULL,
    reserved BIGINT NOT NULL,
    available BIGINT NOT NULL,
    version BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX stock_levels_by_available ON stock_levels (available, sku)
