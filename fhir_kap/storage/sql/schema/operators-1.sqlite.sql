-- operators-1 (SQLite): triggers refuse UPDATE and DELETE on operator_log.

CREATE TRIGGER operator_log_no_update BEFORE UPDATE ON operator_log
           BEGIN SELECT RAISE(ABORT, 'operator_log is append-only'); END;

CREATE TRIGGER operator_log_no_delete BEFORE DELETE ON operator_log
           BEGIN SELECT RAISE(ABORT, 'operator_log is append-only'); END;
