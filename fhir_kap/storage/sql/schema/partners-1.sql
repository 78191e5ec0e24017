-- partners-1: registered partners (storage/partners.py); tokens are kept as SHA-256 digests.

CREATE TABLE partners (
        name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE, scopes TEXT NOT NULL,
        identity TEXT NOT NULL, endpoint_url TEXT, endpoint_auth TEXT, webhook_url TEXT,
        webhook_secret TEXT, revoked {bigint} NOT NULL DEFAULT 0, created TEXT NOT NULL);
