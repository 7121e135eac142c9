-- The admin log (rein_core::admin_log): every tenant created and every API key created or
-- revoked, with who asked and when, hash-chained like a run's events. Each entry is written in
-- the transaction that makes its change (serialised on an advisory lock, so the chain never
-- forks). Existing tenants and keys have no entry: the log starts with this migration.
CREATE TABLE admin_log (
    seq        BIGINT PRIMARY KEY,
    ts_ms      BIGINT NOT NULL,
    action     TEXT NOT NULL,
    tenant     TEXT NOT NULL,
    key_id     TEXT,
    actor      TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);

CREATE TRIGGER admin_log_is_append_only BEFORE UPDATE OR DELETE ON admin_log
    FOR EACH ROW EXECUTE FUNCTION rein_refuse('the admin log is append-only');
CREATE TRIGGER admin_log_is_never_truncated BEFORE TRUNCATE ON admin_log
    FOR EACH STATEMENT EXECUTE FUNCTION rein_refuse('the admin log is append-only');
