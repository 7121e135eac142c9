//! The embedded budget counters: [`Counters`] on the SQLite store (the default backend).

use crate::{SqliteStore, counters_error, standing_from_row, to_i64};
use rein_core::budget::{Amount, BoxFuture, Counters, CountersError, Reservation, Scope, Standing};
use sqlx::{Row, Sqlite, Transaction};

/// Releases every reservation that expired by `now_ms`.
async fn release_expired(tx: &mut Transaction<'_, Sqlite>, now_ms: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE budget_counters SET
             reserved_micros = reserved_micros - (SELECT coalesce(sum(micros), 0) FROM budget_reservations r
                                                  WHERE r.scope = budget_counters.scope AND r.expires_ms <= ?),
             reserved_tokens = reserved_tokens - (SELECT coalesce(sum(tokens), 0) FROM budget_reservations r
                                                  WHERE r.scope = budget_counters.scope AND r.expires_ms <= ?)
         WHERE scope IN (SELECT scope FROM budget_reservations WHERE expires_ms <= ?)",
    )
    .bind(now_ms)
    .bind(now_ms)
    .bind(now_ms)
    .execute(&mut **tx)
    .await?;
    sqlx::query("DELETE FROM budget_reservations WHERE expires_ms <= ?")
        .bind(now_ms)
        .execute(&mut **tx)
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

/// The first scope that cannot cover `amount`, with its standing.
async fn first_refusal<'s>(
    tx: &mut Transaction<'_, Sqlite>,
    scopes: &'s [Scope],
    amount: &Amount,
) -> Result<Option<(&'s Scope, Standing)>, sqlx::Error> {
    for scope in scopes {
        let standing = standing_in(tx, &scope.key).await?;
        if !standing.admits(&scope.cap, amount) {
            return Ok(Some((scope, standing)));
        }
    }
    Ok(None)
}

impl SqliteStore {
    async fn reserve_in_store(
        &self,
        id: &str,
        scopes: &[Scope],
        amount: Amount,
        now_ms: i64,
        expires_ms: i64,
    ) -> Result<Reservation, sqlx::Error> {
        // The store's single writer connection serialises this transaction with every other
        // write in this database: no other reserve can interleave between check and hold.
        let mut tx = self.pool.begin().await?;
        let mut refusal = first_refusal(&mut tx, scopes, &amount).await?;
        if refusal.is_some() {
            // Holds left by a process that died before settling count against the caps until
            // they expire: release the expired ones, then look again. (Only here: on the common
            // path, that sweep would be two more statements on the one writer per call.)
            release_expired(&mut tx, now_ms).await?;
            refusal = first_refusal(&mut tx, scopes, &amount).await?;
        }
        if let Some((scope, standing)) = refusal {
            tx.rollback().await?;
            return Ok(Reservation::Refused {
                scope: scope.clone(),
                standing,
            });
        }
        for scope in scopes {
            sqlx::query(
                "INSERT INTO budget_counters (scope, reserved_micros, reserved_tokens) VALUES (?, ?, ?)
                 ON CONFLICT (scope) DO UPDATE SET reserved_micros = reserved_micros + excluded.reserved_micros,
                                                   reserved_tokens = reserved_tokens + excluded.reserved_tokens",
            )
            .bind(&scope.key)
            .bind(amount.usd.micros())
            .bind(to_i64(amount.tokens))
            .execute(&mut *tx)
            .await?;
            sqlx::query("INSERT INTO budget_reservations (id, scope, micros, tokens, expires_ms) VALUES (?, ?, ?, ?, ?)")
                .bind(id)
                .bind(&scope.key)
                .bind(amount.usd.micros())
                .bind(to_i64(amount.tokens))
                .bind(expires_ms)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Reservation::Granted)
    }

    async fn settle_in_store(
        &self,
        id: &str,
        scopes: &[Scope],
        actual: Amount,
    ) -> Result<Vec<Standing>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let first = sqlx::query(
            "INSERT INTO budget_settlements (id) VALUES (?) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !first {
            // Already settled: report the standings, change nothing.
            let mut after = Vec::with_capacity(scopes.len());
            for scope in scopes {
                after.push(standing_in(&mut tx, &scope.key).await?);
            }
            tx.commit().await?;
            return Ok(after);
        }
        // Each scope's standing comes back from its own update (RETURNING): no second read.
        let mut after = Vec::with_capacity(scopes.len());
        for scope in scopes {
            let row = sqlx::query(
                "INSERT INTO budget_counters (scope, spent_micros, spent_tokens) VALUES (?, ?, ?)
                 ON CONFLICT (scope) DO UPDATE SET
                     spent_micros = spent_micros + excluded.spent_micros,
                     spent_tokens = spent_tokens + excluded.spent_tokens,
                     reserved_micros = reserved_micros - coalesce((SELECT micros FROM budget_reservations WHERE id = ? AND scope = excluded.scope), 0),
                     reserved_tokens = reserved_tokens - coalesce((SELECT tokens FROM budget_reservations WHERE id = ? AND scope = excluded.scope), 0)
                 RETURNING spent_micros, spent_tokens, reserved_micros, reserved_tokens",
            )
            .bind(&scope.key)
            .bind(actual.usd.micros())
            .bind(to_i64(actual.tokens))
            .bind(id)
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            after.push(standing_from_row(&row)?);
        }
        sqlx::query("DELETE FROM budget_reservations WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(after)
    }

    async fn standing_in_store(&self, scope: &str, now_ms: i64) -> Result<Standing, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        release_expired(&mut tx, now_ms).await?;
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
