-- Reservations already settled: settling is idempotent, so a run resumed after a crash can
-- settle whatever its log does not show as settled without ever counting a spend twice.
CREATE TABLE budget_settlements (
    id  TEXT PRIMARY KEY NOT NULL
) WITHOUT ROWID;
