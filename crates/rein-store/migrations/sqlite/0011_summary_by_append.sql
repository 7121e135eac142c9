-- A run's row is brought up to date once per append, by a statement the store runs beside the
-- append's insert in the same transaction (rein_store's summary::Appended), instead of by these
-- triggers once per event: a gateway call's seven events rewrote its run's row seven times.
DROP TRIGGER events_update_run;
DROP TRIGGER events_update_run_status;
