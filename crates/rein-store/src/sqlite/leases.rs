//! SQLite: leases and cancel requests.

use super::*;
use crate::prelude::*;
use crate::{Lease, StoreError};
use rein_core::budget::BoxFuture;
use rein_core::{RunId, TenantId};
use rusqlite::OptionalExtension;

impl Leases for SqliteStore {
    // One statement on the single writer connection, so two workers never claim one run.
    fn claim<'a>(
        &'a self,
        lease: Lease<'a>,
        now_ms: i64,
        per_tenant: Option<u32>,
    ) -> BoxFuture<'a, Result<Option<(TenantId, RunId)>, StoreError>> {
        Box::pin(async move {
            let (owner, until_ms) = (lease.owner.to_string(), lease.until_ms);
            self.write(move |c| {
                let claimed = c
                    .prepare_cached(
                        "WITH driven AS (SELECT tenant, count(*) AS n FROM runs
                                         WHERE status IN ('queued', 'running') AND parent_run_id IS NULL
                                           AND lease_until_ms >= ?3
                                         GROUP BY tenant)
                         UPDATE runs SET lease_owner = ?1, lease_until_ms = ?2
                         WHERE id = (SELECT r.id FROM runs r LEFT JOIN driven d ON d.tenant = r.tenant
                                     WHERE (r.status IN ('queued', 'running') AND r.lease_until_ms < ?3
                                            OR (r.status = 'awaiting_approval' AND r.approval_expires_ms <= ?3 AND r.lease_until_ms < ?3))
                                       AND r.parent_run_id IS NULL
                                       AND (?4 IS NULL OR coalesce(d.n, 0) < ?4)
                                     ORDER BY coalesce(d.n, 0), r.created_ms LIMIT 1)
                           AND (status IN ('queued', 'running') AND lease_until_ms < ?3
                                OR (status = 'awaiting_approval' AND approval_expires_ms <= ?3 AND lease_until_ms < ?3))
                         RETURNING tenant, id",
                    )?
                    .query_row(rusqlite::params![owner, until_ms, now_ms, per_tenant], |r| {
                        Ok((TenantId::new(r.get::<_, String>(0)?), RunId::new(r.get::<_, String>(1)?)))
                    })
                    .optional()?;
                Ok(claimed)
            })
            .await
        })
    }

    fn acquire<'a>(
        &'a self,
        run: &'a RunId,
        lease: Lease<'a>,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (run, owner, until_ms) = (run.clone(), lease.owner.to_string(), lease.until_ms);
        Box::pin(self.write(move |c| {
            let changed = c
                .prepare_cached(
                    "UPDATE runs SET lease_owner = ?1, lease_until_ms = ?2,
                                     status = CASE status WHEN 'queued' THEN 'running' ELSE status END
                     WHERE id = ?3 AND (lease_until_ms < ?4 OR lease_owner = ?1)",
                )?
                .execute(rusqlite::params![owner, until_ms, run.as_str(), now_ms])?;
            Ok(changed == 1)
        }))
    }

    fn renew<'a>(
        &'a self,
        run: &'a RunId,
        lease: Lease<'a>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (run, owner, until_ms) = (run.clone(), lease.owner.to_string(), lease.until_ms);
        Box::pin(self.write(move |c| {
            let changed = c
                .prepare_cached(
                    "UPDATE runs SET lease_until_ms = ? WHERE id = ? AND lease_owner = ? AND status IN ('running', 'queued', 'awaiting_approval')",
                )?
                .execute(rusqlite::params![until_ms, run.as_str(), owner])?;
            Ok(changed == 1)
        }))
    }

    fn request_cancel<'a>(
        &'a self,
        tenant: &'a TenantId,
        run: &'a RunId,
        by: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (tenant, run, by) = (tenant.to_string(), run.clone(), by.to_string());
        Box::pin(self.write(move |c| {
            let changed = c
                .prepare_cached(
                    "UPDATE runs SET cancel_requested_by = coalesce(cancel_requested_by, ?1)
                     WHERE tenant = ?2 AND id = ?3 AND status IN ('running', 'queued', 'awaiting_approval')",
                )?
                .execute(rusqlite::params![by, tenant, run.as_str()])?;
            Ok(changed == 1)
        }))
    }

    fn cancel_requests<'a>(
        &'a self,
        runs: &'a [RunId],
    ) -> BoxFuture<'a, Result<Vec<(RunId, String)>, StoreError>> {
        Box::pin(async move {
            let ids: Vec<&str> = runs.iter().map(RunId::as_str).collect();
            let ids = serde_json::Value::from(ids).to_string();
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT id, cancel_requested_by FROM runs
                 WHERE id IN (SELECT value FROM json_each(?1)) AND cancel_requested_by IS NOT NULL",
            )
            .bind(ids)
            .fetch_all(&self.reader)
            .await?;
            Ok(rows
                .into_iter()
                .map(|(id, by)| (RunId::new(id), by))
                .collect())
        })
    }

    fn release<'a>(
        &'a self,
        run: &'a RunId,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let (run, owner) = (run.clone(), owner.to_string());
        Box::pin(async move {
            // A run given up while it runs is claimable now; one awaiting a person, ended, or
            // a worker's (continued by its caller only) is not.
            let claimable: Option<bool> = self
                .write(move |c| {
                    Ok(c.prepare_cached(
                        "UPDATE runs SET lease_until_ms = 0 WHERE id = ? AND lease_owner = ?
                         RETURNING status = 'running' AND parent_run_id IS NULL",
                    )?
                    .query_row(rusqlite::params![run.as_str(), owner], |r| r.get(0))
                    .optional()?)
                })
                .await?;
            if claimable == Some(true) {
                self.announcer.announce_claimable();
            }
            Ok(())
        })
    }
}
