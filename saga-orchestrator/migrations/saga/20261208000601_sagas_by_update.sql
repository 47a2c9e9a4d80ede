-- The console's and the API's saga lists page by (update time, order id), newest first, over
-- every saga or over one state's; the unfinished ones (the stuck-for filter, the overview's
-- count of stuck sagas) have an index of their own, which stays small however many sagas
-- have finished.
CREATE INDEX sagas_by_update ON sagas (updated_at, order_id);
CREATE INDEX sagas_by_state_update ON sagas (state, updated_at, order_id);
CREATE INDEX sagas_unfinished ON sagas (updated_at, order_id)
    WHERE state NOT IN ('confirmed', 'completed', 'rejected', 'cancelled')
