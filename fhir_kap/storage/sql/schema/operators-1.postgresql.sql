-- operators-1 (PostgreSQL): a trigger refuses UPDATE, DELETE and TRUNCATE on operator_log.

CREATE FUNCTION operator_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'operator_log is append-only'; END $$;

CREATE TRIGGER operator_log_no_change BEFORE UPDATE OR DELETE ON operator_log
           FOR EACH ROW EXECUTE FUNCTION operator_log_append_only();

CREATE TRIGGER operator_log_no_truncate BEFORE TRUNCATE ON operator_log
           FOR EACH STATEMENT EXECUTE FUNCTION operator_log_append_only();
