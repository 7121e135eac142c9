-- The admin log (rein_core::admin_log): every tenant created and every API key created or
-- revoked, with who asked and when, hash-chained like a run's events. Each entry is written in
-- the transaction that makes its change. Existing tenants and keys have no entry: the log
-- starts with this migration.
CREATE TABLE admin_log (
    seq        INTEGER PRIMARY KEY NOT NULL,
    ts_ms      INTEGER NOT NULL,
    action     TEXT NOT NULL,
    tenant     TEXT NOT NULL,
    key_id     TEXT,
    actor      TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);

CREATE TRIGGER admin_log_is_append_only BEFORE UPDATE ON admin_log
BEGIN
    SELECT RAISE(ABORT, 'the admin log is append-only');
END;
CREATE TRIGGER admin_log_is_never_deleted BEFORE DELETE ON admin_log
BEGIN
    SELECT RAISE(ABORT, 'the admin log is append-only');
END;
