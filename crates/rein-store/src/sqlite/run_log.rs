//! SQLite: the run log: runs and events written and read.

use super::*;
use crate::prelude::*;
use crate::{
    Appends, Columns, CostGroup, CostLine, Hold, Lease, RunCount, RunFilter, RunInfo, RunRecord,
    Settlement, StoreError, cost_from_row, event_from_row, run_from_row,
};
use rein_core::budget::{BoxFuture, Reservation, Standing};
use rein_core::{RunId, RunStatus, SealedEvent, SessionId, TenantId, TerminationReason, UserId};

impl RunLog for SqliteStore {
    fn follow(&self, id: &RunId) -> Appends {
        self.announcer.follow(id)
    }

    fn follow_claimable(&self) -> Appends {
        self.announcer.claimable()
    }

    fn create_run<'a>(
        &'a self,
        run: &'a RunInfo,
        first: &'a [SealedEvent],
        lease: Option<Lease<'a>>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let queued = lease.is_none();
        let new_run = Some((run, lease));
        Box::pin(async move {
            self.write_after(&run.tenant, new_run, first, |_| Ok(((), usize::MAX)))
                .await?;
            if queued {
                self.announcer.announce_claimable();
            }
            Ok(())
        })
    }

    // One job on the writer: the counters' statements, then the run and its events.
    fn reserve_and_write<'a>(
        &'a self,
        tenant: &'a TenantId,
        new_run: Option<(&'a RunInfo, Option<Lease<'a>>)>,
        events: &'a [SealedEvent],
        hold: Hold<'a>,
    ) -> BoxFuture<'a, Result<Reservation, StoreError>> {
        let (id, scopes) = (hold.id.to_string(), hold.scopes.to_vec());
        Box::pin(self.write_after(tenant, new_run, events, move |c| {
            let answer = super::counters::reserve(
                c,
                &id,
                &scopes,
                hold.amount,
                hold.now_ms,
                hold.expires_ms,
            )?;
            let writes = if answer == Reservation::Granted {
                usize::MAX
            } else {
                0
            };
            Ok((answer, writes))
        }))
    }

    fn settle_and_write<'a>(
        &'a self,
        tenant: &'a TenantId,
        new_run: Option<(&'a RunInfo, Option<Lease<'a>>)>,
        events: &'a [SealedEvent],
        settlement: Settlement<'a>,
    ) -> BoxFuture<'a, Result<Vec<Standing>, StoreError>> {
        let (id, scopes) = (settlement.id.to_string(), settlement.scopes.to_vec());
        let (count, actual, percent, end) = (
            events.len(),
            settlement.actual,
            settlement.warn_percent,
            settlement.end,
        );
        Box::pin(self.write_after(tenant, new_run, events, move |c| {
            let after = super::counters::settle(c, &id, &scopes, actual)?;
            let settlement = Settlement {
                id: &id,
                scopes: &scopes,
                actual,
                warn_percent: percent,
                end,
            };
            let writes = settlement.writes(count, &after);
            Ok((after, writes))
        }))
    }

    // One write, one commit: appends are on every step's critical path. The run's row is
    // brought up to date in the same write (`insert_events`).
    fn append<'a>(
        &'a self,
        tenant: &'a TenantId,
        event: &'a SealedEvent,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.append_all(tenant, std::slice::from_ref(event))
    }

    // One statement for all of them, in the writer's next commit.
    fn append_all<'a>(
        &'a self,
        tenant: &'a TenantId,
        events: &'a [SealedEvent],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if events.is_empty() {
                return Ok(());
            }
            let (tenant, owned) = (tenant.clone(), events.to_vec());
            self.write(move |c| insert_events(c, &tenant, &owned))
                .await?;
            self.announcer.appended(events);
            Ok(())
        })
    }

    fn unfinished(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM runs WHERE status IN ('queued', 'running')",
            )
            .fetch_one(&self.reader)
            .await?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    fn latest_in_session<'a>(
        &'a self,
        tenant: &'a TenantId,
        session: &'a SessionId,
    ) -> BoxFuture<'a, Result<Option<RunRecord>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(select_runs!(
                "WHERE tenant = ? AND session_id = ? ORDER BY created_ms DESC, id DESC LIMIT 1"
            ))
            .bind(tenant.as_str())
            .bind(session.as_str())
            .fetch_optional(&self.reader)
            .await?;
            row.map(|r| run_from_row(&r)).transpose()
        })
    }

    fn run<'a>(
        &'a self,
        tenant: &'a TenantId,
        id: &'a RunId,
    ) -> BoxFuture<'a, Result<RunRecord, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(select_runs!("WHERE tenant = ? AND id = ?"))
                .bind(tenant.as_str())
                .bind(id.as_str())
                .fetch_optional(&self.reader)
                .await?
                .ok_or_else(|| StoreError::NotFound(id.clone()))?;
            run_from_row(&row)
        })
    }

    fn list_runs<'a>(
        &'a self,
        tenant: &'a TenantId,
        filter: &'a RunFilter,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<RunRecord>, StoreError>> {
        Box::pin(async move {
            let status = filter.status.map(RunStatus::as_str);
            let agent = filter.agent.as_deref();
            let user = filter.user.as_ref().map(UserId::as_str);
            let reason = filter.reason.map(TerminationReason::as_str);
            let session = filter.session.as_ref().map(SessionId::as_str);
            let before = filter.before.as_ref().map(RunId::as_str);
            let rows = sqlx::query(select_runs!(
                "WHERE tenant = ?1 AND (?2 IS NULL OR status = ?2) AND (?3 IS NULL OR agent = ?3) AND (?4 IS NULL OR user_id = ?4)
                   AND (?5 IS NULL OR termination_reason = ?5) AND (?6 IS NULL OR session_id = ?6)
                   AND (?7 IS NULL OR (created_ms, id) < (SELECT created_ms, id FROM runs WHERE tenant = ?1 AND id = ?7))
                 ORDER BY created_ms DESC, id DESC LIMIT ?8"
            ))
            .bind(tenant.as_str())
            .bind(status)
            .bind(agent)
            .bind(user)
            .bind(reason)
            .bind(session)
            .bind(before)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(run_from_row).collect()
        })
    }

    fn run_ids<'a>(
        &'a self,
        tenant: &'a TenantId,
        after: Option<&'a RunId>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<RunId>, StoreError>> {
        Box::pin(async move {
            // The page starts after the cursor's (created_ms, id), the order it is read in;
            // a cursor that is not this tenant's run compares with NULL and matches nothing.
            let query = match after {
                None => sqlx::query(
                    "SELECT id FROM runs WHERE tenant = ?1 ORDER BY created_ms, id LIMIT ?2",
                )
                .bind(tenant.as_str())
                .bind(i64::from(limit)),
                Some(after) => sqlx::query(
                    "SELECT id FROM runs WHERE tenant = ?1 AND (created_ms, id) > \
                     (SELECT created_ms, id FROM runs WHERE tenant = ?1 AND id = ?3) \
                     ORDER BY created_ms, id LIMIT ?2",
                )
                .bind(tenant.as_str())
                .bind(i64::from(limit))
                .bind(after.as_str()),
            };
            let rows = query.fetch_all(&self.reader).await?;
            rows.iter().map(|r| Ok(RunId::new(r.text("id")?))).collect()
        })
    }

    fn open_run_counts(&self) -> BoxFuture<'_, Result<Vec<RunCount>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(crate::OPEN_RUN_COUNTS)
                .fetch_all(&self.reader)
                .await?;
            rows.iter().map(crate::open_run_count_from_row).collect()
        })
    }

    fn tenants(&self) -> BoxFuture<'_, Result<Vec<TenantId>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT DISTINCT tenant FROM runs ORDER BY tenant")
                .fetch_all(&self.reader)
                .await?;
            rows.iter()
                .map(|r| Ok(TenantId::new(r.text("tenant")?)))
                .collect()
        })
    }

    fn costs<'a>(
        &'a self,
        tenant: Option<&'a TenantId>,
        group: CostGroup,
        since_ms: i64,
    ) -> BoxFuture<'a, Result<Vec<CostLine>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(cost_sql(group, tenant.is_none()))
                .bind(since_ms)
                .bind(tenant.map(TenantId::as_str))
                .fetch_all(&self.reader)
                .await?;
            rows.iter().map(cost_from_row).collect()
        })
    }

    fn orphaned_logs(&self) -> BoxFuture<'_, Result<Vec<RunId>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT DISTINCT run_id FROM events WHERE run_id NOT IN (SELECT id FROM runs) ORDER BY run_id",
            )
            .fetch_all(&self.reader)
            .await?;
            rows.iter()
                .map(|r| Ok(RunId::new(r.text("run_id")?)))
                .collect()
        })
    }

    fn events_from<'a>(
        &'a self,
        tenant: &'a TenantId,
        id: &'a RunId,
        from: u64,
    ) -> BoxFuture<'a, Result<Vec<SealedEvent>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT e.seq, e.ts_ms, e.kind, e.payload, e.payload_sha256, e.prev_hash, e.hash
                 FROM events e JOIN runs r ON r.id = e.run_id
                 WHERE r.tenant = ? AND e.run_id = ? AND e.seq >= ? ORDER BY e.seq",
            )
            .bind(tenant.as_str())
            .bind(id.as_str())
            .bind(i64::try_from(from).unwrap_or(i64::MAX))
            .fetch_all(&self.reader)
            .await?;
            rows.iter().map(|r| event_from_row(id, r)).collect()
        })
    }
}
