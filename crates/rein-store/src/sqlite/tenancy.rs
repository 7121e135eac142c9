//! SQLite: tenants, API keys, secrets and the admin log.

use super::*;
use crate::SealedSecret;
use crate::prelude::*;
use crate::{
    API_KEY_ID_LEN, ApiKeyEntry, KeyGrant, SecretEntry, StoreError, TenantEntry,
    admin_entry_from_row, api_key_from_row, api_key_id, key_grant_from_row, secret_entry_from_row,
    tenant_from_row,
};
use rein_core::TenantId;
use rein_core::admin_log::{AdminAction, AdminChange, AdminEntry};
use rein_core::budget::BoxFuture;

impl Tenancy for SqliteStore {
    fn create_tenant<'a>(
        &'a self,
        tenant: &'a TenantId,
        now_ms: i64,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (tenant, actor) = (tenant.clone(), actor.to_string());
        Box::pin(self.write(move |c| {
            let added = c
                .prepare_cached(
                    "INSERT INTO tenants (name, created_ms) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                )?
                .execute(rusqlite::params![tenant.as_str(), now_ms])?;
            if added == 1 {
                let change = AdminChange {
                    action: AdminAction::TenantCreated,
                    tenant: tenant.as_str(),
                    key_id: None,
                    actor: &actor,
                };
                append_admin_entry(c, &change, now_ms)?;
            }
            Ok(added == 1)
        }))
    }

    fn add_api_key<'a>(
        &'a self,
        tenant: &'a TenantId,
        key_sha256: &'a str,
        now_ms: i64,
        expires_ms: Option<i64>,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (tenant, key, actor) = (tenant.clone(), key_sha256.to_string(), actor.to_string());
        Box::pin(self.write(move |c| {
            let added = c
                .prepare_cached(
                    "INSERT INTO api_keys (key_sha256, tenant, created_ms, expires_ms) SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM tenants WHERE name = ?2)",
                )?
                .execute(rusqlite::params![key, tenant.as_str(), now_ms, expires_ms])?;
            if added == 1 {
                let change = AdminChange {
                    action: AdminAction::KeyCreated,
                    tenant: tenant.as_str(),
                    key_id: Some(api_key_id(&key)),
                    actor: &actor,
                };
                append_admin_entry(c, &change, now_ms)?;
            }
            Ok(added == 1)
        }))
    }

    fn tenant_by_key<'a>(
        &'a self,
        key_sha256: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Option<KeyGrant>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT tenant, expires_ms FROM api_keys WHERE key_sha256 = ? AND (expires_ms IS NULL OR expires_ms > ?)",
            )
            .bind(key_sha256)
            .bind(now_ms)
            .fetch_optional(&self.reader)
            .await?;
            row.as_ref().map(key_grant_from_row).transpose()
        })
    }

    fn registered_tenants(&self) -> BoxFuture<'_, Result<Vec<TenantEntry>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT t.name, t.created_ms, (SELECT COUNT(*) FROM api_keys k WHERE k.tenant = t.name) AS keys FROM tenants t ORDER BY t.name",
            )
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(tenant_from_row).collect()
        })
    }

    fn api_keys<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Vec<ApiKeyEntry>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT key_sha256, created_ms, expires_ms FROM api_keys WHERE tenant = ? ORDER BY created_ms, key_sha256",
            )
            .bind(tenant.as_str())
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(api_key_from_row).collect()
        })
    }

    fn revoke_api_key<'a>(
        &'a self,
        tenant: &'a TenantId,
        key_id: &'a str,
        now_ms: i64,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            if key_id.len() != API_KEY_ID_LEN {
                return Ok(false);
            }
            let (tenant, key_id, actor) = (tenant.clone(), key_id.to_string(), actor.to_string());
            self.write(move |c| {
                let removed = c
                    .prepare_cached(
                        "DELETE FROM api_keys WHERE tenant = ? AND substr(key_sha256, 1, 16) = ?",
                    )?
                    .execute(rusqlite::params![tenant.as_str(), key_id])?;
                if removed > 0 {
                    let change = AdminChange {
                        action: AdminAction::KeyRevoked,
                        tenant: tenant.as_str(),
                        key_id: Some(&key_id),
                        actor: &actor,
                    };
                    append_admin_entry(c, &change, now_ms)?;
                }
                Ok(removed > 0)
            })
            .await
        })
    }

    fn set_secret<'a>(
        &'a self,
        tenant: &'a TenantId,
        name: &'a str,
        sealed: &'a [u8],
        now_ms: i64,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (tenant, name, sealed, actor) = (
            tenant.clone(),
            name.to_string(),
            sealed.to_vec(),
            actor.to_string(),
        );
        Box::pin(self.write(move |c| {
            let set = c
                .prepare_cached(
                    "INSERT INTO tenant_secrets (tenant, name, sealed, updated_ms) SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM tenants WHERE name = ?1) ON CONFLICT (tenant, name) DO UPDATE SET sealed = excluded.sealed, updated_ms = excluded.updated_ms",
                )?
                .execute(rusqlite::params![tenant.as_str(), name, sealed, now_ms])?;
            if set > 0 {
                let change = AdminChange {
                    action: AdminAction::SecretSet,
                    tenant: tenant.as_str(),
                    key_id: Some(&name),
                    actor: &actor,
                };
                append_admin_entry(c, &change, now_ms)?;
            }
            Ok(set > 0)
        }))
    }

    fn delete_secret<'a>(
        &'a self,
        tenant: &'a TenantId,
        name: &'a str,
        now_ms: i64,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (tenant, name, actor) = (tenant.clone(), name.to_string(), actor.to_string());
        Box::pin(self.write(move |c| {
            let removed = c
                .prepare_cached("DELETE FROM tenant_secrets WHERE tenant = ? AND name = ?")?
                .execute(rusqlite::params![tenant.as_str(), name])?;
            if removed > 0 {
                let change = AdminChange {
                    action: AdminAction::SecretDeleted,
                    tenant: tenant.as_str(),
                    key_id: Some(&name),
                    actor: &actor,
                };
                append_admin_entry(c, &change, now_ms)?;
            }
            Ok(removed > 0)
        }))
    }

    fn secret_names<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Vec<SecretEntry>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT name, updated_ms FROM tenant_secrets WHERE tenant = ? ORDER BY name",
            )
            .bind(tenant.as_str())
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(secret_entry_from_row).collect()
        })
    }

    fn sealed_secrets<'a>(
        &'a self,
        tenant: &'a TenantId,
        names: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<SealedSecret>, StoreError>> {
        Box::pin(async move {
            let mut found = Vec::with_capacity(names.len());
            for name in names {
                let sealed: Option<Vec<u8>> = sqlx::query_scalar(
                    "SELECT sealed FROM tenant_secrets WHERE tenant = ? AND name = ?",
                )
                .bind(tenant.as_str())
                .bind(name)
                .fetch_optional(&self.reader)
                .await?;
                if let Some(sealed) = sealed {
                    found.push((name.clone(), sealed));
                }
            }
            Ok(found)
        })
    }

    fn admin_baseline(&self) -> BoxFuture<'_, Result<Vec<crate::BaselineItem>, StoreError>> {
        Box::pin(async move {
            let rows: Vec<crate::BaselineItem> =
                sqlx::query_as("SELECT tenant, key_id FROM admin_baseline ORDER BY tenant, key_id")
                    .fetch_all(&self.reader)
                    .await?;
            Ok(rows)
        })
    }

    fn admin_log(
        &self,
        from: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<AdminEntry>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT seq, ts_ms, action, tenant, key_id, actor, prev_hash, hash FROM admin_log WHERE seq >= ? ORDER BY seq LIMIT ?",
            )
            .bind(i64::try_from(from).unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(admin_entry_from_row).collect()
        })
    }

    fn admin_log_head(&self) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let head: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM admin_log")
                .fetch_one(&self.reader)
                .await?;
            Ok(head.and_then(|h| u64::try_from(h).ok()))
        })
    }
}
