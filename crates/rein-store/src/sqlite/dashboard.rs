//! SQLite: dashboard sessions.

use super::*;
use crate::prelude::*;
use crate::{Columns, StoreError};
use rein_core::TenantId;
use rein_core::budget::BoxFuture;

impl DashboardSessions for SqliteStore {
    fn open_dashboard_session<'a>(
        &'a self,
        token_sha256: &'a str,
        key_sha256: &'a str,
        now_ms: i64,
        expires_ms: i64,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (token, key) = (token_sha256.to_string(), key_sha256.to_string());
        Box::pin(self.write(move |c| {
            c.prepare_cached("DELETE FROM dashboard_sessions WHERE expires_ms <= ?")?
                .execute([now_ms])?;
            let opened = c
                .prepare_cached(
                    "INSERT INTO dashboard_sessions (token_sha256, key_sha256, expires_ms) SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM api_keys WHERE key_sha256 = ?2 AND (expires_ms IS NULL OR expires_ms > ?4))",
                )?
                .execute(rusqlite::params![token, key, expires_ms, now_ms])?;
            Ok(opened == 1)
        }))
    }

    fn dashboard_session<'a>(
        &'a self,
        token_sha256: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Option<TenantId>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT k.tenant FROM dashboard_sessions s JOIN api_keys k ON k.key_sha256 = s.key_sha256 WHERE s.token_sha256 = ?1 AND s.expires_ms > ?2 AND (k.expires_ms IS NULL OR k.expires_ms > ?2)",
            )
            .bind(token_sha256)
            .bind(now_ms)
            .fetch_optional(&self.reader)
            .await?;
            row.map(|r| Ok(TenantId::new(r.text("tenant")?)))
                .transpose()
        })
    }

    fn sweep_dashboard_sessions(&self, now_ms: i64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(self.write(move |c| {
            let swept = c
                .prepare_cached("DELETE FROM dashboard_sessions WHERE expires_ms <= ?")?
                .execute([now_ms])?;
            Ok(u64::try_from(swept).unwrap_or(u64::MAX))
        }))
    }

    fn close_dashboard_session<'a>(
        &'a self,
        token_sha256: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let token = token_sha256.to_string();
        Box::pin(self.write(move |c| {
            let closed = c
                .prepare_cached("DELETE FROM dashboard_sessions WHERE token_sha256 = ?")?
                .execute([token])?;
            Ok(closed > 0)
        }))
    }
}
