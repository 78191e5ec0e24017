-- outbox-1: the durable outbox (outbox_items) and the consent context the send-time
-- re-check reads (outbox_context; storage/context.py).

CREATE TABLE outbox_items (
        id {pk},
        endpoint TEXT NOT NULL,
        base_url TEXT NOT NULL,
        resource_type TEXT NOT NULL,
        resource TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        patient_ref TEXT,
        recipient_ref TEXT,
        purpose TEXT,
        consent_ref TEXT,
        state TEXT NOT NULL DEFAULT 'pending',
        attempts {bigint} NOT NULL DEFAULT 0,
        next_attempt_at {real} NOT NULL,
        lease_owner TEXT,
        lease_until {real},
        last_error TEXT,
        hold_reason TEXT,
        server_id TEXT,
        server_version TEXT,
        server_location TEXT,
        delivered_by TEXT,
        delivered_at {real},
        created_at {real} NOT NULL,
        updated_at {real} NOT NULL,
        UNIQUE (endpoint, idempotency_key));

CREATE INDEX outbox_items_due ON outbox_items (state, next_attempt_at);

CREATE INDEX outbox_items_lease ON outbox_items (state, lease_until);

CREATE INDEX outbox_items_recipient ON outbox_items (recipient_ref, state);

CREATE TABLE outbox_context (
        type TEXT NOT NULL, id TEXT NOT NULL, version TEXT, patient_ref TEXT,
        body TEXT NOT NULL, updated_at {real} NOT NULL, PRIMARY KEY (type, id));

CREATE INDEX outbox_context_patient ON outbox_context (patient_ref);
