//! SQLite: registered agents.

use super::*;
use crate::prelude::*;
use crate::{StoreError, StoredAgent, agent_from_row};
use rein_core::TenantId;
use rein_core::budget::BoxFuture;

impl AgentRegistry for SqliteStore {
    fn register_agent<'a>(
        &'a self,
        tenant: &'a TenantId,
        name: &'a str,
        spec: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<u32, StoreError>> {
        Box::pin(async move {
            let (tenant, name, spec) = (tenant.clone(), name.to_string(), spec.to_string());
            let version: i64 = self
                .write(move |c| {
                    Ok(c.prepare_cached(
                        "INSERT INTO agents (tenant, name, version, spec, created_ms) SELECT ?1, ?2, coalesce(max(version), 0) + 1, ?3, ?4 FROM agents WHERE tenant = ?1 AND name = ?2 RETURNING version",
                    )?
                    .query_row(rusqlite::params![tenant.as_str(), name, spec, now_ms], |r| r.get(0))?)
                })
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
                "SELECT name, version, spec, created_ms FROM agents WHERE tenant = ? AND name = ? AND (? IS NULL OR version = ?) ORDER BY version DESC LIMIT 1",
            )
            .bind(tenant.as_str())
            .bind(name)
            .bind(version)
            .bind(version)
            .fetch_optional(&self.reader)
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
                "SELECT a.name, a.version, a.spec, a.created_ms FROM agents a WHERE a.tenant = ? AND a.version = (SELECT max(version) FROM agents b WHERE b.tenant = a.tenant AND b.name = a.name) ORDER BY a.name",
            )
            .bind(tenant.as_str())
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(agent_from_row).collect()
        })
    }
}
