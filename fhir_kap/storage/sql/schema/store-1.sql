-- store-1: the versioned FHIR store (storage/store.py): history, current versions, search index.

CREATE TABLE fhir_history (
        seq {pk}, type TEXT NOT NULL, id TEXT NOT NULL, version {bigint} NOT NULL,
        last_updated TEXT NOT NULL, deleted {bigint} NOT NULL DEFAULT 0, source TEXT,
        body TEXT NOT NULL, UNIQUE (type, id, version));

CREATE TABLE fhir_current (
        type TEXT NOT NULL, id TEXT NOT NULL, version {bigint} NOT NULL, seq {bigint} NOT NULL,
        last_updated TEXT NOT NULL, deleted {bigint} NOT NULL DEFAULT 0, source TEXT,
        body TEXT NOT NULL, PRIMARY KEY (type, id));

CREATE INDEX fhir_current_seq ON fhir_current (type, seq);

CREATE TABLE fhir_index (
        type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, value TEXT NOT NULL);

CREATE INDEX fhir_index_lookup ON fhir_index (type, param, value, id);

CREATE INDEX fhir_index_owner ON fhir_index (type, id);
