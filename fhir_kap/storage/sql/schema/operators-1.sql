-- operators-1: operator accounts of the console (storage/operators.py; argon2id hashes only),
-- their server-side sessions (the cookie's SHA-256, with the session's CSRF token) and the
-- operator log (every login, logout and action; append-only: the dialect's file adds the guards).

CREATE TABLE operators (
        name TEXT PRIMARY KEY, password_hash TEXT NOT NULL, created TEXT NOT NULL,
        disabled {bigint} NOT NULL DEFAULT 0, failed_logins {bigint} NOT NULL DEFAULT 0,
        locked_until {real});

CREATE TABLE operator_sessions (
        token_sha256 TEXT PRIMARY KEY, operator TEXT NOT NULL, csrf TEXT NOT NULL,
        created_at {real} NOT NULL, seen_at {real} NOT NULL, expires_at {real} NOT NULL);

CREATE INDEX operator_sessions_operator ON operator_sessions (operator);

CREATE TABLE operator_log (
        seq {pk}, at {real} NOT NULL, operator TEXT, action TEXT NOT NULL, target TEXT,
        outcome TEXT NOT NULL, detail TEXT);

CREATE INDEX operator_log_at ON operator_log (at, seq);
