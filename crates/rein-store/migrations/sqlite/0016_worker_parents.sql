-- A worker agent's run: the run that called it (NULL for a run of its own). Only its caller
-- continues it after a crash, with the budget the caller gave it, so no worker process claims
-- it on its own.
ALTER TABLE runs ADD COLUMN parent_run_id TEXT;
CREATE TRIGGER runs_parent_is_immutable BEFORE UPDATE OF parent_run_id ON runs
BEGIN
    SELECT RAISE(ABORT, 'a run''s identity is immutable');
END;
