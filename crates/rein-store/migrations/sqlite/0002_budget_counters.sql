-- Shared budget counters (rein_core::budget). One row per scope key: settled spend and the
-- amount held by live reservations. Every change happens inside one write transaction on the
-- store's single writer connection, so reserve and settle are atomic with respect to each
-- other within this database.
CREATE TABLE budget_counters (
    scope            TEXT PRIMARY KEY NOT NULL,
    spent_micros     INTEGER NOT NULL DEFAULT 0,
    spent_tokens     INTEGER NOT NULL DEFAULT 0,
    reserved_micros  INTEGER NOT NULL DEFAULT 0,
    reserved_tokens  INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Live reservations, one row per (reservation, scope); released on settle or expiry.
CREATE TABLE budget_reservations (
    id          TEXT NOT NULL,
    scope       TEXT NOT NULL,
    micros      INTEGER NOT NULL,
    tokens      INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL,
    PRIMARY KEY (id, scope)
) WITHOUT ROWID;
CREATE INDEX budget_reservations_by_expiry ON budget_reservations (expires_ms);
