-- Audit anchors (rein_core::anchor): now and then, a commitment to the admin log's head and to
-- every run created before a cutoff, chained like the admin log, so the audit finds a run
-- removed or an ended run's log cut, which no chain shows.
CREATE TABLE audit_anchors (
    seq          BIGINT PRIMARY KEY,
    ts_ms        BIGINT NOT NULL,
    cutoff_ms    BIGINT NOT NULL,
    admin_seq    BIGINT,
    admin_hash   TEXT,
    runs         BIGINT NOT NULL,
    runs_sha256  TEXT NOT NULL,
    prev_hash    TEXT NOT NULL,
    hash         TEXT NOT NULL
);

CREATE TRIGGER audit_anchors_are_append_only BEFORE UPDATE OR DELETE ON audit_anchors
    FOR EACH ROW EXECUTE FUNCTION rein_refuse('audit anchors are append-only');
CREATE TRIGGER audit_anchors_are_never_truncated BEFORE TRUNCATE ON audit_anchors
    FOR EACH STATEMENT EXECUTE FUNCTION rein_refuse('audit anchors are append-only');

-- Anchors walk every run in byte order of its id, a page at a time.
CREATE INDEX runs_by_id_bytes ON runs (id COLLATE "C");
