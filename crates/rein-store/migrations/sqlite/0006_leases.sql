-- Workers: a run is driven by whoever holds its lease. `rein run --detach` queues a run
-- (status `queued`, no lease); a worker claims a queued run, or a running one whose lease
-- expired (its holder died), and renews the lease while it works.
ALTER TABLE runs ADD COLUMN lease_owner TEXT;
ALTER TABLE runs ADD COLUMN lease_until_ms INTEGER NOT NULL DEFAULT 0;
CREATE INDEX runs_claimable ON runs (status, lease_until_ms, created_ms);
