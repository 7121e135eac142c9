-- The run's status follows its log: `awaiting_approval` from an `approval_requested` event
-- (which also records when that approval times out, so workers can claim the run and apply the
-- timeout policy) until the matching `approval_decided`, and the outcome from `run_finished`.
-- The projection is now two triggers: counters on every append, and status and outcome only on
-- the events that change them. An UPDATE that assigns `status` rewrites its index entry
-- (`runs_claimable`) even to the same value, which cost every append of every step.
ALTER TABLE runs ADD COLUMN approval_expires_ms INTEGER;

DROP TRIGGER events_update_run;

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
            + CASE NEW.kind WHEN 'model_responded' THEN coalesce(NEW.payload ->> '$.cost', 0) ELSE 0 END
    WHERE id = NEW.run_id;
END;

CREATE TRIGGER events_update_run_status AFTER INSERT ON events
WHEN NEW.kind IN ('run_finished', 'approval_requested', 'approval_decided')
BEGIN
    UPDATE runs SET
        status = CASE NEW.kind
            WHEN 'run_finished' THEN NEW.payload ->> '$.status'
            WHEN 'approval_requested' THEN 'awaiting_approval'
            ELSE 'running' END,
        approval_expires_ms = CASE NEW.kind
            WHEN 'approval_requested' THEN NEW.payload ->> '$.expires_at_ms'
            ELSE NULL END,
        termination_reason = CASE NEW.kind WHEN 'run_finished' THEN NEW.payload ->> '$.reason' ELSE termination_reason END,
        detail = CASE NEW.kind WHEN 'run_finished' THEN NEW.payload ->> '$.detail' ELSE detail END,
        output = CASE NEW.kind WHEN 'run_finished' THEN NEW.payload -> '$.output' ELSE output END
    WHERE id = NEW.run_id;
END;
