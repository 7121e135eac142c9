-- Audit anchors (rein_core::anchor): now and then, a commitment to the admin log's head and to
-- every run created before a cutoff, chained like the admin log, so the audit finds a run
-- removed or an ended run's log cut, which no chain shows.
CREATE TABLE audit_anchors (
    seq          INTEGER PRIMARY KEY NOT NULL,
    ts_ms        INTEGER NOT NULL,
    cutoff_ms    INTEGER NOT NULL,
    admin_seq    INTEGER,
    admin_hash   TEXT,
    runs         INTEGER NOT NULL,
    runs_sha256  TEXT NOT NULL,
    prev_hash    TEXT NOT NULL,
    hash         TEXT NOT NULL
);

CREATE TRIGGER audit_anchors_are_append_only BEFORE UPDATE ON audit_anchors
BEGIN
    SELECT RAISE(ABORT, 'audit anchors are append-only');
END;
CREATE TRIGGER audit_anchors_are_never_deleted BEFORE DELETE ON audit_anchors
BEGIN
    SELECT RAISE(ABORT, 'audit anchors are append-only');
END;
