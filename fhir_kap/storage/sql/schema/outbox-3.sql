-- outbox-3: no DDL; a data migration in Python (migrations._rekey_consents) keys the
-- stored Consents by the current business-identifier rule.

