//! The embedded budget counters: [`Counters`] on the SQLite store (the default backend).

use crate::{SqliteStore, StoreError, to_i64};
use rein_core::Usd;
use rein_core::budget::{Amount, BoxFuture, Counters, CountersError, Reservation, Scope, Standing};
use rusqlite::{Connection, OptionalExtension, ToSql};

/// A store error as the budget counters report it.
fn counters_error(e: StoreError) -> CountersError {
    CountersError(e.to_string())
}

/// Releases every reservation that expired by `now_ms` (its hold comes off its counter by
/// trigger).
fn release_expired(c: &Connection, now_ms: i64) -> rusqlite::Result<()> {
    c.prepare_cached("DELETE FROM budget_reservations WHERE expires_ms <= ?")?
        .execute([now_ms])?;
    Ok(())
}

/// A `budget_counters` row, read as `spent_micros, spent_tokens, reserved_micros,
/// reserved_tokens`.
fn standing_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<Standing> {
    let count = |i: usize| r.get::<_, i64>(i).map(|v| u64::try_from(v).unwrap_or(0));
    Ok(Standing {
        spent: Amount {
            usd: Usd::from_micros(r.get(0)?),
            tokens: count(1)?,
        },
        reserved: Amount {
            usd: Usd::from_micros(r.get(2)?),
            tokens: count(3)?,
        },
    })
}

/// Each scope's standing, in the order given.
fn standings(c: &Connection, scopes: &[Scope]) -> rusqlite::Result<Vec<Standing>> {
    let mut read = c.prepare_cached(
        "SELECT spent_micros, spent_tokens, reserved_micros, reserved_tokens FROM budget_counters WHERE scope = ?",
    )?;
    scopes
        .iter()
        .map(|scope| {
            Ok(read
                .query_row([&scope.key], standing_from)
                .optional()?
                .unwrap_or_default())
        })
        .collect()
}

/// Holds `amount` in every scope, or in none, in one statement: the reservation rows go in
/// only if no scope's counter, checked once before the first row, would pass its cap (the
/// same rule as [`Standing::admits`]); their holds reach the counters by trigger.
fn hold(
    c: &Connection,
    id: &str,
    scopes: &[Scope],
    amount: Amount,
    expires_ms: i64,
) -> rusqlite::Result<bool> {
    let mut sql = String::from("WITH s (scope, cap_micros, cap_tokens) AS (VALUES ");
    for i in 0..scopes.len() {
        sql.push_str(if i == 0 { "(?, ?, ?)" } else { ", (?, ?, ?)" });
    }
    sql.push_str(
        ") INSERT INTO budget_reservations (id, scope, micros, tokens, expires_ms)
           SELECT ?, scope, ?, ?, ? FROM s WHERE NOT EXISTS (
             SELECT 1 FROM s AS t LEFT JOIN budget_counters c ON c.scope = t.scope
             WHERE (t.cap_micros IS NOT NULL AND coalesce(c.spent_micros, 0) + coalesce(c.reserved_micros, 0) + ? > t.cap_micros)
                OR (t.cap_tokens IS NOT NULL AND coalesce(c.spent_tokens, 0) + coalesce(c.reserved_tokens, 0) + ? > t.cap_tokens))",
    );
    let caps: Vec<(Option<i64>, Option<i64>)> = scopes
        .iter()
        .map(|s| (s.cap.usd.map(|c| c.micros()), s.cap.tokens.map(to_i64)))
        .collect();
    let (micros, tokens) = (amount.usd.micros(), to_i64(amount.tokens));
    let mut params: Vec<&dyn ToSql> = Vec::with_capacity(scopes.len() * 3 + 6);
    for (scope, (usd, toks)) in scopes.iter().zip(&caps) {
        params.extend([&scope.key as &dyn ToSql, usd, toks]);
    }
    params.extend([
        &id as &dyn ToSql,
        &micros,
        &tokens,
        &expires_ms,
        &micros,
        &tokens,
    ]);
    let held = c
        .prepare_cached(&sql)?
        .execute(rusqlite::params_from_iter(params))?;
    Ok(held == scopes.len())
}

/// Reserves `amount` in every scope (see [`Counters::reserve`]), on the writer.
pub(crate) fn reserve(
    c: &Connection,
    id: &str,
    scopes: &[Scope],
    amount: Amount,
    now_ms: i64,
    expires_ms: i64,
) -> rusqlite::Result<Reservation> {
    if scopes.is_empty() || hold(c, id, scopes, amount, expires_ms)? {
        return Ok(Reservation::Granted);
    }
    // Holds left by a process that died before settling count against the caps until they
    // expire: release the expired ones, then try again. (Only here: on the common path the
    // sweep would be one more statement per call.)
    release_expired(c, now_ms)?;
    if hold(c, id, scopes, amount, expires_ms)? {
        return Ok(Reservation::Granted);
    }
    let standings = standings(c, scopes)?;
    let refused = scopes
        .iter()
        .zip(standings)
        .find(|(scope, standing)| !standing.admits(&scope.cap, &amount))
        .or_else(|| scopes.first().map(|s| (s, Standing::default())));
    Ok(match refused {
        Some((scope, standing)) => Reservation::Refused {
            scope: scope.clone(),
            standing,
        },
        None => Reservation::Granted,
    })
}

/// Counts `actual` in every scope and releases the reservation's holds, in one statement (by
/// trigger), once: settling again inserts nothing. Returns the scopes' standings read in the
/// same transaction, so exactly one settlement is the one that crossed a line.
pub(crate) fn settle(
    c: &Connection,
    id: &str,
    scopes: &[Scope],
    actual: Amount,
) -> rusqlite::Result<Vec<Standing>> {
    if !scopes.is_empty() {
        let mut sql = String::from(
            "INSERT INTO budget_settled (id, scope, micros, tokens) SELECT ?, column1, ?, ? FROM (VALUES ",
        );
        for i in 0..scopes.len() {
            sql.push_str(if i == 0 { "(?)" } else { ", (?)" });
        }
        sql.push_str(
            ") WHERE NOT EXISTS (SELECT 1 FROM budget_settlements WHERE id = ?) ON CONFLICT (id, scope) DO NOTHING",
        );
        let (micros, tokens) = (actual.usd.micros(), to_i64(actual.tokens));
        let mut params: Vec<&dyn ToSql> = vec![&id, &micros, &tokens];
        params.extend(scopes.iter().map(|s| &s.key as &dyn ToSql));
        params.push(&id);
        c.prepare_cached(&sql)?
            .execute(rusqlite::params_from_iter(params))?;
    }
    standings(c, scopes)
}

impl Counters for SqliteStore {
    fn cell<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, CountersError>> {
        let key = key.to_string();
        Box::pin(async move {
            self.write(move |c| {
                Ok(
                    c.prepare_cached("SELECT value FROM counter_cells WHERE key = ?")?
                        .query_row([key], |r| r.get(0))
                        .optional()?,
                )
            })
            .await
            .map_err(counters_error)
        })
    }

    fn swap_cell<'a>(
        &'a self,
        key: &'a str,
        expected: Option<&'a str>,
        new: &'a str,
    ) -> BoxFuture<'a, Result<bool, CountersError>> {
        let (key, expected, new) = (
            key.to_string(),
            expected.map(str::to_string),
            new.to_string(),
        );
        Box::pin(async move {
            self.write(move |c| {
                let swapped = match expected {
                    None => c
                        .prepare_cached(
                            "INSERT INTO counter_cells (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                        )?
                        .execute([key, new])?,
                    Some(expected) => c
                        .prepare_cached(
                            "UPDATE counter_cells SET value = ? WHERE key = ? AND value = ?",
                        )?
                        .execute([new, key, expected])?,
                };
                Ok(swapped == 1)
            })
            .await
            .map_err(counters_error)
        })
    }

    fn reserve<'a>(
        &'a self,
        id: &'a str,
        scopes: &'a [Scope],
        amount: Amount,
        now_ms: i64,
        expires_ms: i64,
    ) -> BoxFuture<'a, Result<Reservation, CountersError>> {
        let (id, scopes) = (id.to_string(), scopes.to_vec());
        Box::pin(async move {
            self.write(move |c| Ok(reserve(c, &id, &scopes, amount, now_ms, expires_ms)?))
                .await
                .map_err(counters_error)
        })
    }

    fn settle<'a>(
        &'a self,
        id: &'a str,
        scopes: &'a [Scope],
        actual: Amount,
    ) -> BoxFuture<'a, Result<Vec<Standing>, CountersError>> {
        let (id, scopes) = (id.to_string(), scopes.to_vec());
        Box::pin(async move {
            self.write(move |c| Ok(settle(c, &id, &scopes, actual)?))
                .await
                .map_err(counters_error)
        })
    }

    fn standing<'a>(
        &'a self,
        scope_key: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Standing, CountersError>> {
        let scope = scope_key.to_string();
        Box::pin(async move {
            self.write(move |c| {
                release_expired(c, now_ms)?;
                let scope = Scope {
                    key: scope,
                    cap: Default::default(),
                };
                Ok(standings(c, &[scope])?.pop().unwrap_or_default())
            })
            .await
            .map_err(counters_error)
        })
    }
}
