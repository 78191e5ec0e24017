-- auditlog-2: the operator console's audit search: newest first without a filter (or with a date
-- range only), and type with outcome together (e.g. Provenance with a deny outcome finds none at once).

CREATE INDEX audit_log_recorded ON audit_log (recorded_epoch, seq);

CREATE INDEX audit_log_type_outcome ON audit_log (resource_type, outcome, recorded_epoch, seq);
