-- store-2: one index row per (param, code, system) keyed by its owner (see storage/store.py);
-- refilled from the current versions by migrations._reindex.

DROP TABLE fhir_index;

CREATE TABLE fhir_index (
        type TEXT NOT NULL, id TEXT NOT NULL, param TEXT NOT NULL, code TEXT NOT NULL,
        system TEXT NOT NULL, PRIMARY KEY (type, id, param, code, system)){without_rowid};
