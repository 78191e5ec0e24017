-- store-4: find a resource by its business identifier without scanning its type
-- (Store.with_identifier: the bridge recognises a resend on every POST, and a conditional create
-- `identifier=SYSTEM|VALUE` looks its match up). Partial: only identifier rows (one or two per
-- resource) pay for a second B-tree; the primary key (type, id, param, code, system) serves
-- lookups by owner.

CREATE INDEX fhir_index_identifier ON fhir_index (type, code, system) WHERE param = 'identifier';
