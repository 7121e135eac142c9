//! The embedded budget counters: [`Counters`] on the SQLite store (the default backend).

use crate::{SqliteStore, counters_error, standing_from_row, to_i64};
use rein_core::budget::{Amount, BoxFuture, Counters, CountersError, Reservation, Scope, Standing};
use sqlx::{QueryBuilder, Row, Sqlite, Transaction};

/// Releases every reservation that expired by `now_ms` (its hold comes off its counter by
/// trigger).
async fn release_expired(
    executor: impl sqlx::Executor<'_, Database = Sqlite>,
    now_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM budget_reservations WHERE expires_ms <= ?")
        .bind(now_ms)
        .execute(executor)
        .await?;
    Ok(())
}

async fn standing_in(
    tx: &mut Transaction<'_, Sqlite>,
    scope: &str,
) -> Result<Standing, sqlx::Error> {
    let row = sqlx::query(
        "SELECT spent_micros, spent_tokens, reserved_micros, reserved_tokens FROM budget_counters WHERE scope = ?",
    )
    .bind(scope)
    .fetch_optional(&mut **tx)
    .await?;
    row.as_ref()
        .map_or(Ok(Standing::default()), standing_from_row)
}

/// Each scope's standing, in the order given, in one read.
async fn standings(
    pool: &sqlx::SqlitePool,
    scopes: &[Scope],
) -> Result<Vec<Standing>, sqlx::Error> {
    let mut query = QueryBuilder::<Sqlite>::new(
        "SELECT scope, spent_micros, spent_tokens, reserved_micros, reserved_tokens FROM budget_counters WHERE scope IN (",
    );
    let mut keys = query.separated(", ");
    for scope in scopes {
        keys.push_bind(&scope.key);
    }
    query.push(")");
    let mut found = std::collections::HashMap::new();
    for row in query.build().fetch_all(pool).await? {
        found.insert(row.try_get::<String, _>("scope")?, standing_from_row(&row)?);
    }
    Ok(scopes
        .iter()
        .map(|s| found.get(&s.key).copied().unwrap_or_default())
        .collect())
}

impl SqliteStore {
    /// Holds `amount` in every scope, or in none, in one statement: the reservation rows go in
    /// only if no scope's counter, checked once before the first row, would pass its cap (the
    /// same rule as [`Standing::admits`]); their holds reach the counters by trigger.
    async fn hold(
        &self,
        id: &str,
        scopes: &[Scope],
        amount: Amount,
        expires_ms: i64,
    ) -> Result<bool, sqlx::Error> {
        let mut query = QueryBuilder::<Sqlite>::new("WITH s (scope, cap_micros, cap_tokens) AS (");
        query.push_values(scopes, |mut row, scope| {
            row.push_bind(&scope.key)
                .push_bind(scope.cap.usd.map(|c| c.micros()))
                .push_bind(scope.cap.tokens.map(to_i64));
        });
        query
            .push(") INSERT INTO budget_reservations (id, scope, micros, tokens, expires_ms) SELECT ")
            .push_bind(id)
            .push(", scope, ")
            .push_bind(amount.usd.micros())
            .push(", ")
            .push_bind(to_i64(amount.tokens))
            .push(", ")
            .push_bind(expires_ms)
            .push(
                " FROM s WHERE NOT EXISTS (SELECT 1 FROM s AS t LEFT JOIN budget_counters c ON c.scope = t.scope
                   WHERE (t.cap_micros IS NOT NULL AND coalesce(c.spent_micros, 0) + coalesce(c.reserved_micros, 0) + ",
            )
            .push_bind(amount.usd.micros())
            .push(
                " > t.cap_micros)
                      OR (t.cap_tokens IS NOT NULL AND coalesce(c.spent_tokens, 0) + coalesce(c.reserved_tokens, 0) + ",
            )
            .push_bind(to_i64(amount.tokens))
            .push(" > t.cap_tokens))");
        let done = query.build().execute(&self.pool).await?;
        Ok(done.rows_affected() == scopes.len() as u64)
    }

    async fn reserve_in_store(
        &self,
        id: &str,
        scopes: &[Scope],
        amount: Amount,
        now_ms: i64,
        expires_ms: i64,
    ) -> Result<Reservation, sqlx::Error> {
        if scopes.is_empty() || self.hold(id, scopes, amount, expires_ms).await? {
            return Ok(Reservation::Granted);
        }
        // Holds left by a process that died before settling count against the caps until they
        // expire: release the expired ones, then try again. (Only here: on the common path, the
        // sweep would be one more statement on the one writer per call.)
        release_expired(&self.pool, now_ms).await?;
        if self.hold(id, scopes, amount, expires_ms).await? {
            return Ok(Reservation::Granted);
        }
        let standings = standings(&self.reader, scopes).await?;
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

    /// Counts `actual` in every scope and releases the reservation's holds, in one statement
    /// (by trigger), once: settling again inserts nothing.
    async fn settle_in_store(
        &self,
        id: &str,
        scopes: &[Scope],
        actual: Amount,
    ) -> Result<Vec<Standing>, sqlx::Error> {
        if !scopes.is_empty() {
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT INTO budget_settled (id, scope, micros, tokens) SELECT ",
            );
            query
                .push_bind(id)
                .push(", column1, ")
                .push_bind(actual.usd.micros())
                .push(", ")
                .push_bind(to_i64(actual.tokens))
                .push(" FROM (");
            query.push_values(scopes, |mut row, scope| {
                row.push_bind(&scope.key);
            });
            query
                .push(") WHERE NOT EXISTS (SELECT 1 FROM budget_settlements WHERE id = ")
                .push_bind(id)
                .push(") ON CONFLICT (id, scope) DO NOTHING");
            query.build().execute(&self.pool).await?;
        }
        // From a reader: the settlement is committed, and the writer is left to writes.
        standings(&self.reader, scopes).await
    }

    async fn standing_in_store(&self, scope: &str, now_ms: i64) -> Result<Standing, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        release_expired(&mut *tx, now_ms).await?;
        let standing = standing_in(&mut tx, scope).await?;
        tx.commit().await?;
        Ok(standing)
    }
}

impl SqliteStore {
    async fn cell_in_store(&self, key: &str) -> Result<Option<String>, sqlx::Error> {
        let row = sqlx::query("SELECT value FROM counter_cells WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("value")).transpose()
    }

    async fn swap_cell_in_store(
        &self,
        key: &str,
        expected: Option<&str>,
        new: &str,
    ) -> Result<bool, sqlx::Error> {
        let done = match expected {
            None => sqlx::query(
                "INSERT INTO counter_cells (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
            )
            .bind(key)
            .bind(new)
            .execute(&self.pool)
            .await?,
            Some(expected) => {
                sqlx::query("UPDATE counter_cells SET value = ? WHERE key = ? AND value = ?")
                    .bind(new)
                    .bind(key)
                    .bind(expected)
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(done.rows_affected() == 1)
    }
}

impl Counters for SqliteStore {
    fn cell<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, CountersError>> {
        Box::pin(async move { self.cell_in_store(key).await.map_err(counters_error) })
    }

    fn swap_cell<'a>(
        &'a self,
        key: &'a str,
        expected: Option<&'a str>,
        new: &'a str,
    ) -> BoxFuture<'a, Result<bool, CountersError>> {
        Box::pin(async move {
            self.swap_cell_in_store(key, expected, new)
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
        Box::pin(async move {
            self.reserve_in_store(id, scopes, amount, now_ms, expires_ms)
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
        Box::pin(async move {
            self.settle_in_store(id, scopes, actual)
                .await
                .map_err(counters_error)
        })
    }

    fn standing<'a>(
        &'a self,
        scope_key: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Standing, CountersError>> {
        Box::pin(async move {
            self.standing_in_store(scope_key, now_ms)
                .await
                .map_err(counters_error)
        })
    }
}
