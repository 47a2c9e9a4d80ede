-- The console's and the API's saga lists page by (update time, order id), newest first.
CREATE INDEX sagas_by_update ON sagas (updated_at, order_id)
