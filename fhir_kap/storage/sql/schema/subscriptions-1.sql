-- subscriptions-1: topic-based Subscriptions (storage/subscriptions.py) and their numbered events.
-- Kept beside its module until the schema registry (storage/sql/migrations.py) lists it; applied
-- with migrations.run under this name, so moving it into schema/ later applies nothing twice.

CREATE TABLE subscriptions (
        id TEXT PRIMARY KEY, partner TEXT NOT NULL, topic TEXT NOT NULL, status TEXT NOT NULL,
        base TEXT NOT NULL, body TEXT NOT NULL, version {bigint} NOT NULL DEFAULT 1, events {bigint} NOT NULL DEFAULT 0,
        heartbeat_period {real}, next_heartbeat_at {real}, end_at {real}, error TEXT,
        created_at {real} NOT NULL, updated_at {real} NOT NULL);

CREATE INDEX subscriptions_partner ON subscriptions (partner, id);

CREATE INDEX subscriptions_topic ON subscriptions (topic, status);

CREATE TABLE subscription_events (
        subscription TEXT NOT NULL, number {bigint} NOT NULL, at TEXT NOT NULL,
        focus TEXT, focus_version TEXT, PRIMARY KEY (subscription, number));
