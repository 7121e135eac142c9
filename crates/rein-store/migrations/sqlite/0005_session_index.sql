-- A new run of a multi-turn session starts from the session's newest run.
CREATE INDEX runs_by_session ON runs (tenant, session_id, created_ms);
