-- Rein's store on PostgreSQL: the same model as the SQLite schema (migrations/sqlite, as of
-- 0007), for several stateless workers sharing one database.
--
-- Runs: one row per run. Its counters, status and outcome are a projection of the run's event
-- log, maintained by a trigger from each event's own payload inside the statement that appends
-- the event: the summary can never disagree with the log. The log is the truth.
-- Event payloads are kept as the exact text that was hashed (TEXT, not JSONB, which would
-- reorder keys and break the chain); the trigger parses them.
CREATE TABLE runs (
    id                  TEXT PRIMARY KEY,
    tenant              TEXT NOT NULL,
    user_id             TEXT NOT NULL,
    session_id          TEXT NOT NULL,
    job_id              TEXT,
    agent               TEXT NOT NULL,
    agent_version       BIGINT NOT NULL,
    spec                TEXT NOT NULL,          -- the spec source the run pinned
    input               TEXT NOT NULL,
    status              TEXT NOT NULL,
    termination_reason  TEXT,
    detail              TEXT,
    output              TEXT,                   -- JSON
    iterations          BIGINT NOT NULL DEFAULT 0,
    tool_calls          BIGINT NOT NULL DEFAULT 0,
    input_tokens        BIGINT NOT NULL DEFAULT 0,
    cached_input_tokens BIGINT NOT NULL DEFAULT 0,
    output_tokens       BIGINT NOT NULL DEFAULT 0,
    cost_micros         BIGINT NOT NULL DEFAULT 0,
    event_count         BIGINT NOT NULL DEFAULT 0,
    head_hash           TEXT NOT NULL,          -- hash of the last event: catches removal from the end
    created_ms          BIGINT NOT NULL,
    updated_ms          BIGINT NOT NULL,
    -- Workers: whoever holds the lease drives the run (see Store::claim).
    lease_owner         TEXT,
    lease_until_ms      BIGINT NOT NULL DEFAULT 0,
    -- While awaiting approval: when the approval times out, so a worker applies the policy.
    approval_expires_ms BIGINT
);
CREATE INDEX runs_by_tenant ON runs (tenant, created_ms DESC);
CREATE INDEX runs_by_session ON runs (tenant, session_id, created_ms);
CREATE INDEX runs_claimable ON runs (created_ms)
    WHERE status IN ('queued', 'running', 'awaiting_approval');

-- Events: append-only. (run_id, seq) is the primary key, so two writers can never both
-- append the same position of one run.
CREATE TABLE events (
    run_id          TEXT NOT NULL REFERENCES runs (id),
    seq             BIGINT NOT NULL,
    ts_ms           BIGINT NOT NULL,
    kind            TEXT NOT NULL,
    payload         TEXT,                       -- JSON; NULL once erased
    payload_sha256  TEXT NOT NULL,
    prev_hash       TEXT NOT NULL,
    hash            TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE FUNCTION rein_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', TG_ARGV[0];
END
$$;

-- An event once written is never changed or removed; a run is never removed (its log would be
-- orphaned) and what a run is never changes.
CREATE TRIGGER events_are_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION rein_refuse('events are append-only');
CREATE TRIGGER events_are_never_truncated BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION rein_refuse('events are append-only');
CREATE TRIGGER runs_are_never_deleted BEFORE DELETE ON runs
    FOR EACH ROW EXECUTE FUNCTION rein_refuse('runs are never deleted');
CREATE TRIGGER runs_are_never_truncated BEFORE TRUNCATE ON runs
    FOR EACH STATEMENT EXECUTE FUNCTION rein_refuse('runs are never deleted');
CREATE TRIGGER runs_identity_is_immutable
    BEFORE UPDATE OF id, tenant, user_id, session_id, job_id, agent, agent_version, spec, input, created_ms ON runs
    FOR EACH ROW EXECUTE FUNCTION rein_refuse('a run''s identity is immutable');

-- The projection: every appended event updates its run's summary from the event's payload.
-- The JSON paths follow rein_core::EventKind (event format rein-event-v1).
CREATE FUNCTION rein_project_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    p jsonb := NEW.payload::jsonb;
    answered boolean := NEW.kind = 'model_responded';
BEGIN
    UPDATE runs SET
        event_count = NEW.seq + 1,
        head_hash = NEW.hash,
        updated_ms = NEW.ts_ms,
        iterations = iterations + CASE WHEN NEW.kind IN ('model_responded', 'model_failed') THEN 1 ELSE 0 END,
        tool_calls = tool_calls + CASE WHEN NEW.kind = 'tool_result' THEN 1 ELSE 0 END,
        input_tokens = input_tokens
            + CASE WHEN answered THEN coalesce((p #>> '{usage,input_tokens}')::bigint, 0) ELSE 0 END,
        cached_input_tokens = cached_input_tokens
            + CASE WHEN answered THEN coalesce((p #>> '{usage,cached_input_tokens}')::bigint, 0) ELSE 0 END,
        output_tokens = output_tokens
            + CASE WHEN answered THEN coalesce((p #>> '{usage,output_tokens}')::bigint, 0) ELSE 0 END,
        cost_micros = cost_micros
            + CASE WHEN answered THEN coalesce((p ->> 'cost')::bigint, 0) ELSE 0 END,
        status = CASE NEW.kind
            WHEN 'run_finished' THEN p ->> 'status'
            WHEN 'approval_requested' THEN 'awaiting_approval'
            WHEN 'approval_decided' THEN 'running'
            ELSE status END,
        approval_expires_ms = CASE NEW.kind
            WHEN 'approval_requested' THEN (p ->> 'expires_at_ms')::bigint
            WHEN 'approval_decided' THEN NULL
            WHEN 'run_finished' THEN NULL
            ELSE approval_expires_ms END,
        termination_reason = CASE WHEN NEW.kind = 'run_finished' THEN p ->> 'reason' ELSE termination_reason END,
        detail = CASE WHEN NEW.kind = 'run_finished' THEN p ->> 'detail' ELSE detail END,
        output = CASE WHEN NEW.kind = 'run_finished' THEN (p -> 'output')::text ELSE output END
    WHERE id = NEW.run_id;
    RETURN NULL;
END
$$;
CREATE TRIGGER events_update_run AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION rein_project_event();

-- Shared budget counters (rein_core::budget). One row per scope key: settled spend and the
-- amount held by live reservations. Reserve and settle lock the rows of their scopes (in key
-- order, so two transactions never deadlock) for the length of one transaction.
CREATE TABLE budget_counters (
    scope            TEXT PRIMARY KEY,
    spent_micros     BIGINT NOT NULL DEFAULT 0,
    spent_tokens     BIGINT NOT NULL DEFAULT 0,
    reserved_micros  BIGINT NOT NULL DEFAULT 0,
    reserved_tokens  BIGINT NOT NULL DEFAULT 0
);

-- Live reservations, one row per (reservation, scope); released on settle or expiry.
CREATE TABLE budget_reservations (
    id          TEXT NOT NULL,
    scope       TEXT NOT NULL,
    micros      BIGINT NOT NULL,
    tokens      BIGINT NOT NULL,
    expires_ms  BIGINT NOT NULL,
    PRIMARY KEY (id, scope)
);
CREATE INDEX budget_reservations_by_expiry ON budget_reservations (scope, expires_ms);

-- Reservations already settled: settling is idempotent.
CREATE TABLE budget_settlements (
    id  TEXT PRIMARY KEY
);

-- Shared state cells (circuit breakers), updated only by compare-and-swap.
CREATE TABLE counter_cells (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
