-- auditlog-1: the append-only audit log (storage/auditlog.py); the dialect's file adds the
-- guards that make the database itself refuse UPDATE and DELETE.

CREATE TABLE audit_log (
        seq {pk}, resource_type TEXT NOT NULL, resource_id TEXT, recorded TEXT NOT NULL,
        recorded_epoch {real} NOT NULL, patient TEXT, recipient TEXT, outcome TEXT,
        consent_ref TEXT, body TEXT NOT NULL);

CREATE INDEX audit_log_type ON audit_log (resource_type, recorded_epoch);

CREATE INDEX audit_log_patient ON audit_log (patient, recorded_epoch);

CREATE INDEX audit_log_recipient ON audit_log (recipient, recorded_epoch);

CREATE INDEX audit_log_outcome ON audit_log (outcome, recorded_epoch);

CREATE INDEX audit_log_consent ON audit_log (consent_ref);
