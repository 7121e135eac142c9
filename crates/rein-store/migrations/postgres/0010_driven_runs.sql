-- The runs being driven now, by tenant: a claim takes the oldest run of the tenant with the
-- fewest, so no tenant's backlog delays another's first run.
CREATE INDEX runs_driven ON runs (tenant, lease_until_ms)
    WHERE status IN ('queued', 'running') AND parent_run_id IS NULL;
