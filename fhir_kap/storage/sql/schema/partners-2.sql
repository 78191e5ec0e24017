-- partners-2: SMART backend services: the partner's public keys, issued access tokens,
-- seen assertion ids.

ALTER TABLE partners ADD COLUMN jwks TEXT;

CREATE TABLE partner_access_tokens (
        token_sha256 TEXT PRIMARY KEY, partner TEXT NOT NULL, scopes TEXT NOT NULL,
        expires_at {real} NOT NULL);

CREATE TABLE partner_assertions (
        partner TEXT NOT NULL, jti TEXT NOT NULL, expires_at {real} NOT NULL, PRIMARY KEY (partner, jti));
