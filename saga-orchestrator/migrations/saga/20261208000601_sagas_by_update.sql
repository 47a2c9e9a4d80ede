-- The console's and the API's saga lists page by (update time, order id), newest first, over
-- every saga or over one state's.
CREATE INDEX sagas_by_update ON sagas (updated_at, order_id);
CREATE INDEX sagas_by_state_update ON sagas (state, updated_at, order_id)
