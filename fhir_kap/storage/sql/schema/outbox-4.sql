-- outbox-4: the operator console's listings (bridge/console): items of a state, or of an
-- endpoint (and state), in id order without sorting the whole table; counts by endpoint and state.

CREATE INDEX outbox_items_state_id ON outbox_items (state, id);

CREATE INDEX outbox_items_endpoint_state ON outbox_items (endpoint, state, id);

CREATE INDEX outbox_items_endpoint_id ON outbox_items (endpoint, id);
