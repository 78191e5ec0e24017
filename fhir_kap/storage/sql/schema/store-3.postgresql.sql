-- store-3 (PostgreSQL): the body once, in the history (see storage/store.py);
-- migrations._check_store_3 refuses it when a current row has no history row.

ALTER TABLE fhir_current DROP COLUMN body;
