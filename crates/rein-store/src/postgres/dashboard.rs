//! PostgreSQL: dashboard sessions.

use super::*;
use crate::prelude::*;
use crate::{Columns, StoreError};
use rein_core::TenantId;
use rein_core::budget::BoxFuture;

impl DashboardSessions for PgStore {
    fn open_dashboard_session<'a>(
        &'a self,
        token_sha256: &'a str,
        key_sha256: &'a str,
        now_ms: i64,
        expires_ms: i64,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            sqlx::query("DELETE FROM dashboard_sessions WHERE expires_ms <= $1")
                .bind(now_ms)
                .execute(&self.pool)
                .await?;
            let done = sqlx::query(
                "INSERT INTO dashboard_sessions (token_sha256, key_sha256, expires_ms) SELECT $1, key_sha256, $2 FROM api_keys WHERE key_sha256 = $3 AND (expires_ms IS NULL OR expires_ms > $4)",
            )
            .bind(token_sha256)
            .bind(expires_ms)
            .bind(key_sha256)
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn dashboard_session<'a>(
        &'a self,
        token_sha256: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Option<TenantId>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT k.tenant FROM dashboard_sessions s JOIN api_keys k ON k.key_sha256 = s.key_sha256 WHERE s.token_sha256 = $1 AND s.expires_ms > $2 AND (k.expires_ms IS NULL OR k.expires_ms > $2)",
            )
            .bind(token_sha256)
            .bind(now_ms)
            .fetch_optional(&self.pool)
            .await?;
            row.map(|r| Ok(TenantId::new(r.text("tenant")?)))
                .transpose()
        })
    }

    fn sweep_dashboard_sessions(&self, now_ms: i64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query("DELETE FROM dashboard_sessions WHERE expires_ms <= $1")
                .bind(now_ms)
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected())
        })
    }

    fn close_dashboard_session<'a>(
        &'a self,
        token_sha256: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query("DELETE FROM dashboard_sessions WHERE token_sha256 = $1")
                .bind(token_sha256)
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected() > 0)
        })
    }
}
