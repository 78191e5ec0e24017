-- webhooks-1: the rest-hook job queue (storage/webhooks.py), leased like the outbox.

CREATE TABLE webhook_jobs (
        id {pk}, partner TEXT NOT NULL, event TEXT NOT NULL, resource TEXT NOT NULL,
        version TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending', attempts {bigint} NOT NULL DEFAULT 0,
        next_attempt_at {real} NOT NULL, lease_owner TEXT, lease_until {real},
        last_status {bigint}, last_error TEXT, created_at {real} NOT NULL, updated_at {real} NOT NULL,
        UNIQUE (partner, event, resource, version));

CREATE INDEX webhook_jobs_due ON webhook_jobs (state, next_attempt_at);
