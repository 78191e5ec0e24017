-- store-3 (SQLite): the body once (in the history) and fewer B-trees per create (see
-- storage/store.py); migrations._check_store_3 refuses it when a current row has no history row.

CREATE TABLE fhir_history_3 (
            seq INTEGER PRIMARY KEY, type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL,
            last_updated TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0, source TEXT,
            body TEXT NOT NULL, UNIQUE (type, id, version));

INSERT INTO fhir_history_3 (seq, type, id, version, last_updated, deleted, source, body) SELECT seq, type, id, version, last_updated, deleted, source, body FROM fhir_history;

DROP TABLE fhir_history;

ALTER TABLE fhir_history_3 RENAME TO fhir_history;

CREATE TABLE fhir_current_3 (
            type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, seq INTEGER NOT NULL,
            last_updated TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0, source TEXT,
            PRIMARY KEY (type, id)) WITHOUT ROWID;

INSERT INTO fhir_current_3 (type, id, version, seq, last_updated, deleted, source) SELECT type, id, version, seq, last_updated, deleted, source FROM fhir_current;

DROP TABLE fhir_current;

ALTER TABLE fhir_current_3 RENAME TO fhir_current;

CREATE INDEX fhir_current_seq ON fhir_current (type, seq);
