-- Budget counters follow the rows that change them, inside the statement that changes them, so
-- a reservation and a settlement are each one statement on the single writer connection (a
-- transaction of several statements holds that connection for as many round trips).
--
-- A reservation row's hold is added to its scope's counter when the row is inserted and taken
-- off when it is deleted (settled, or released once expired). Holds of rows that exist now
-- were added by the code before this migration; they come off the same way.
CREATE TRIGGER budget_reservation_holds AFTER INSERT ON budget_reservations
BEGIN
    INSERT OR IGNORE INTO budget_counters (scope) VALUES (NEW.scope);
    UPDATE budget_counters
    SET reserved_micros = reserved_micros + NEW.micros,
        reserved_tokens = reserved_tokens + NEW.tokens
    WHERE scope = NEW.scope;
END;

CREATE TRIGGER budget_reservation_releases AFTER DELETE ON budget_reservations
BEGIN
    UPDATE budget_counters
    SET reserved_micros = reserved_micros - OLD.micros,
        reserved_tokens = reserved_tokens - OLD.tokens
    WHERE scope = OLD.scope;
END;

-- Settlements per (reservation, scope): inserting one counts the spend in its scope and
-- releases that scope's hold. The key makes settling idempotent: settling again inserts
-- nothing and so counts nothing. (Reservations settled before this migration are in
-- budget_settlements, which a settlement checks too.)
CREATE TABLE budget_settled (
    id      TEXT NOT NULL,
    scope   TEXT NOT NULL,
    micros  INTEGER NOT NULL,
    tokens  INTEGER NOT NULL,
    PRIMARY KEY (id, scope)
) WITHOUT ROWID;

CREATE TRIGGER budget_settled_counts AFTER INSERT ON budget_settled
BEGIN
    INSERT OR IGNORE INTO budget_counters (scope) VALUES (NEW.scope);
    UPDATE budget_counters
    SET spent_micros = spent_micros + NEW.micros,
        spent_tokens = spent_tokens + NEW.tokens
    WHERE scope = NEW.scope;
    DELETE FROM budget_reservations WHERE id = NEW.id AND scope = NEW.scope;
END;
