-- A run's row is brought up to date once per append, by the statement that appends the events
-- (an UPDATE in a WITH before the INSERT; rein_store's summary::Appended computes the change from
-- the events), instead of by this trigger once per event. SQLite's store does the same, so the
-- projection is defined once, in Rust.
DROP TRIGGER events_update_run ON events;
DROP FUNCTION rein_project_event();
