-- Shared state cells (rein_core::budget::Counters::cell): small values such as circuit
-- breaker states, updated only by compare-and-swap.
CREATE TABLE counter_cells (
    key    TEXT PRIMARY KEY NOT NULL,
    value  TEXT NOT NULL
) WITHOUT ROWID;
