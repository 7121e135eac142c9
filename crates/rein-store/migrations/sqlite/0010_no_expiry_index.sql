-- budget_reservations holds only the reservations of calls in flight (a settlement deletes its
-- rows), so sweeping the expired ones, which happens only when a reservation is refused or a
-- standing is read, scans a few rows. The index on expiry cost a page write in every
-- reservation and every settlement, two for each model call.
DROP INDEX budget_reservations_by_expiry;
