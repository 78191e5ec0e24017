-- outbox-2: a Consent is one consent per business identifier: an EHR that re-posts it
-- (e.g. revoked) gets a new server id, and the gate must see the new state, not two consents.

ALTER TABLE outbox_context ADD COLUMN ident TEXT;

CREATE INDEX outbox_context_ident ON outbox_context (type, ident);
