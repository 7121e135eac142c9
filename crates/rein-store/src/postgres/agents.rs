//! PostgreSQL: registered agents.

use super::*;
use crate::prelude::*;
use crate::{StoreError, StoredAgent, agent_from_row};
use rein_core::TenantId;
use rein_core::budget::BoxFuture;

impl AgentRegistry for PgStore {
    fn register_agent<'a>(
        &'a self,
        tenant: &'a TenantId,
        name: &'a str,
        spec: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<u32, StoreError>> {
        Box::pin(async move {
            let version: i64 = sqlx::query_scalar(
                "INSERT INTO agents (tenant, name, version, spec, created_ms) SELECT $1, $2, coalesce(max(version), 0) + 1, $3, $4 FROM agents WHERE tenant = $5 AND name = $6 RETURNING version",
            )
            .bind(tenant.as_str())
            .bind(name)
            .bind(spec)
            .bind(now_ms)
            .bind(tenant.as_str())
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
            Ok(u32::try_from(version).unwrap_or(u32::MAX))
        })
    }

    fn agent<'a>(
        &'a self,
        tenant: &'a TenantId,
        name: &'a str,
        version: Option<u32>,
    ) -> BoxFuture<'a, Result<Option<StoredAgent>, StoreError>> {
        Box::pin(async move {
            let version = version.map(i64::from);
            let row = sqlx::query(
                "SELECT name, version, spec, created_ms FROM agents WHERE tenant = $1 AND name = $2 AND ($3::bigint IS NULL OR version = $4) ORDER BY version DESC LIMIT 1",
            )
            .bind(tenant.as_str())
            .bind(name)
            .bind(version)
            .bind(version)
            .fetch_optional(&self.pool)
            .await?;
            row.map(|r| agent_from_row(&r)).transpose()
        })
    }

    fn agents<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Vec<StoredAgent>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT a.name, a.version, a.spec, a.created_ms FROM agents a WHERE a.tenant = $1 AND a.version = (SELECT max(version) FROM agents b WHERE b.tenant = a.tenant AND b.name = a.name) ORDER BY a.name",
            )
            .bind(tenant.as_str())
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(agent_from_row).collect()
        })
    }
}
