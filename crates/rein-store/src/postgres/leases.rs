//! PostgreSQL: leases and cancel requests.

use super::*;
use crate::prelude::*;
use crate::{Columns, Lease, StoreError};
use rein_core::budget::BoxFuture;
use rein_core::{RunId, TenantId};

impl Leases for PgStore {
    // The oldest claimable row no other worker has locked; the outer condition is checked again
    // on the locked row.
    fn claim<'a>(
        &'a self,
        lease: Lease<'a>,
        now_ms: i64,
        per_tenant: Option<u32>,
    ) -> BoxFuture<'a, Result<Option<(TenantId, RunId)>, StoreError>> {
        Box::pin(async move {
            // With a cap, claims take turns (an advisory lock held to the commit), so two
            // claims racing, in one process or several, cannot both see a tenant just under it.
            let mut tx = self.pool.begin().await?;
            if per_tenant.is_some() {
                lock_scopes(&mut tx, &["rein:claims"]).await?;
            }
            let row = sqlx::query(concat!(
                "WITH driven AS (SELECT tenant AS driven_tenant, count(*) AS n FROM runs
                                 WHERE status IN ('queued', 'running') AND parent_run_id IS NULL
                                   AND lease_until_ms >= $3
                                 GROUP BY tenant)
                 UPDATE runs SET lease_owner = $1, lease_until_ms = $2
                 WHERE id = (SELECT id FROM runs LEFT JOIN driven ON driven_tenant = tenant WHERE ",
                claimable!(),
                " AND ($4::bigint IS NULL OR coalesce(n, 0) < $4)
                   ORDER BY coalesce(n, 0), created_ms LIMIT 1 FOR UPDATE OF runs SKIP LOCKED) AND ",
                claimable!(),
                " RETURNING tenant, id"
            ))
            .bind(lease.owner)
            .bind(lease.until_ms)
            .bind(now_ms)
            .bind(per_tenant.map(i64::from))
            .fetch_optional(&mut *tx)
            .await?;
            tx.commit().await?;
            row.map(|r| Ok((TenantId::new(r.text("tenant")?), RunId::new(r.text("id")?))))
                .transpose()
        })
    }

    fn acquire<'a>(
        &'a self,
        run: &'a RunId,
        lease: Lease<'a>,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query(
                "UPDATE runs SET lease_owner = $1, lease_until_ms = $2,
                                 status = CASE status WHEN 'queued' THEN 'running' ELSE status END
                 WHERE id = $3 AND (lease_until_ms < $4 OR lease_owner = $1)",
            )
            .bind(lease.owner)
            .bind(lease.until_ms)
            .bind(run.as_str())
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn renew<'a>(
        &'a self,
        run: &'a RunId,
        lease: Lease<'a>,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query(
                "UPDATE runs SET lease_until_ms = $1 WHERE id = $2 AND lease_owner = $3 AND status IN ('running', 'queued', 'awaiting_approval')",
            )
            .bind(lease.until_ms)
            .bind(run.as_str())
            .bind(lease.owner)
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn request_cancel<'a>(
        &'a self,
        tenant: &'a TenantId,
        run: &'a RunId,
        by: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query(
                "UPDATE runs SET cancel_requested_by = coalesce(cancel_requested_by, $1)
                 WHERE tenant = $2 AND id = $3 AND status IN ('running', 'queued', 'awaiting_approval')",
            )
            .bind(by)
            .bind(tenant.as_str())
            .bind(run.as_str())
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn cancel_requests<'a>(
        &'a self,
        runs: &'a [RunId],
    ) -> BoxFuture<'a, Result<Vec<(RunId, String)>, StoreError>> {
        Box::pin(async move {
            let ids: Vec<&str> = runs.iter().map(RunId::as_str).collect();
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT id, cancel_requested_by FROM runs
                 WHERE id = ANY($1) AND cancel_requested_by IS NOT NULL",
            )
            .bind(ids)
            .fetch_all(&self.pool)
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
        Box::pin(async move {
            // A run given up while it runs is claimable now; one awaiting a person, ended, or
            // a worker's (continued by its caller only) is not.
            let claimable: Option<bool> = sqlx::query_scalar(
                "UPDATE runs SET lease_until_ms = 0 WHERE id = $1 AND lease_owner = $2
                 RETURNING status = 'running' AND parent_run_id IS NULL",
            )
            .bind(run.as_str())
            .bind(owner)
            .fetch_optional(&self.pool)
            .await?;
            if claimable == Some(true) {
                self.appends.claimable();
            }
            Ok(())
        })
    }
}
