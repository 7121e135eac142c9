-- Runs: one row per run. Its counters and outcome are a projection of the run's event log,
-- maintained by the trigger below from each event's own payload, inside the statement that
-- appends the event: the summary can never disagree with the log. The log is the truth.
CREATE TABLE runs (
    id                  TEXT PRIMARY KEY NOT NULL,
    tenant              TEXT NOT NULL,
    user_id             TEXT NOT NULL,
    session_id          TEXT NOT NULL,
    job_id              TEXT,
    agent               TEXT NOT NULL,
    agent_version       INTEGER NOT NULL,
    spec                TEXT NOT NULL,          -- the spec source the run pinned
    input               TEXT NOT NULL,
    status              TEXT NOT NULL,
    termination_reason  TEXT,
    detail              TEXT,
    output              TEXT,                   -- JSON
    iterations          INTEGER NOT NULL DEFAULT 0,
    tool_calls          INTEGER NOT NULL DEFAULT 0,
    input_tokens        INTEGER NOT NULL DEFAULT 0,
    cached_input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens       INTEGER NOT NULL DEFAULT 0,
    cost_micros         INTEGER NOT NULL DEFAULT 0,
    event_count         INTEGER NOT NULL DEFAULT 0,
    head_hash           TEXT NOT NULL,          -- hash of the last event: catches removal from the end
    created_ms          INTEGER NOT NULL,
    updated_ms          INTEGER NOT NULL
);
CREATE INDEX runs_by_tenant ON runs (tenant, created_ms DESC);

-- Events: append-only. (run_id, seq) is the primary key, so two writers can never both
-- append the same position of one run.
CREATE TABLE events (
    run_id          TEXT NOT NULL REFERENCES runs (id),
    seq             INTEGER NOT NULL,
    ts_ms           INTEGER NOT NULL,
    kind            TEXT NOT NULL,
    payload         TEXT,                       -- JSON; NULL once erased
    payload_sha256  TEXT NOT NULL,
    prev_hash       TEXT NOT NULL,
    hash            TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

-- An event once written is never changed or removed. (Erasure of a payload, for retention and
-- the right to erasure, will come as its own recorded event and mechanism.)
CREATE TRIGGER events_are_append_only BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;
CREATE TRIGGER events_are_never_deleted BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;

-- What a run is never changes, and a run is never removed (its log would be orphaned).
CREATE TRIGGER runs_identity_is_immutable
BEFORE UPDATE OF id, tenant, user_id, session_id, job_id, agent, agent_version, spec, input, created_ms ON runs
BEGIN
    SELECT RAISE(ABORT, 'a run''s identity is immutable');
END;
CREATE TRIGGER runs_are_never_deleted BEFORE DELETE ON runs
BEGIN
    SELECT RAISE(ABORT, 'runs are never deleted');
END;

-- The projection: every appended event updates its run's summary from the event's payload.
-- The JSON paths follow rein_core::EventKind (event format rein-event-v1).
CREATE TRIGGER events_update_run AFTER INSERT ON events
BEGIN
    UPDATE runs SET
        event_count = NEW.seq + 1,
        head_hash = NEW.hash,
        updated_ms = NEW.ts_ms,
        iterations = iterations + (NEW.kind IN ('model_responded', 'model_failed')),
        tool_calls = tool_calls + (NEW.kind = 'tool_result'),
        input_tokens = input_tokens
            + CASE NEW.kind WHEN 'model_responded' THEN coalesce(NEW.payload ->> '$.usage.input_tokens', 0) ELSE 0 END,
        cached_input_tokens = cached_input_tokens
            + CASE NEW.kind WHEN 'model_responded' THEN coalesce(NEW.payload ->> '$.usage.cached_input_tokens', 0) ELSE 0 END,
        output_tokens = output_tokens
            + CASE NEW.kind WHEN 'model_responded' THEN coalesce(NEW.payload ->> '$.usage.output_tokens', 0) ELSE 0 END,
        cost_micros = cost_micros
            + CASE NEW.kind WHEN 'model_responded' THEN coalesce(NEW.payload ->> '$.cost', 0) ELSE 0 END,
        status = CASE NEW.kind WHEN 'run_finished' THEN NEW.payload ->> '$.status' ELSE status END,
        termination_reason = CASE NEW.kind WHEN 'run_finished' THEN NEW.payload ->> '$.reason' ELSE termination_reason END,
        detail = CASE NEW.kind WHEN 'run_finished' THEN NEW.payload ->> '$.detail' ELSE detail END,
        output = CASE NEW.kind WHEN 'run_finished' THEN NEW.payload -> '$.output' ELSE output END
    WHERE id = NEW.run_id;
END;
