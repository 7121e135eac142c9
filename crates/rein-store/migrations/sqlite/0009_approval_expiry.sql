-- An approval that waits past its timeout is resolved by the spec's policy when the run is
-- next driven; workers claim such runs, so the policy happens without anyone resuming them.
ALTER TABLE runs ADD COLUMN approval_expires_ms INTEGER;

DROP TRIGGER events_update_run_status;

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
