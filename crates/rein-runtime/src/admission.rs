//! Admission before a run starts or a call is made: tenant bulkheads, and the budget and breaker
//! standings the dashboard shows.

use crate::*;
use rein_core::budget::{Scope, Standing, key_part};
use rein_core::bulkhead::{BulkheadState, Entry};
use rein_core::{SessionId, TenantId, UserId};
use std::sync::Arc;
use std::time::Duration;

impl Runtime {
    /// Whether the budget counters are the store itself: a reservation is then written with the
    /// events before its call, and a settlement with the answer, in one transaction each.
    pub(crate) fn budget_in_store(&self) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.counters), Arc::as_ptr(&self.store))
    }

    /// The circuit breakers `tenant` may see, as this process last saw them: the tenant's own
    /// model and tool breakers.
    pub fn breakers_seen(
        &self,
        tenant: &TenantId,
    ) -> Vec<(String, rein_core::breaker::BreakerState)> {
        self.breakers.seen(&[
            format!("breaker:model:{}:", key_part(tenant.as_str())),
            format!("breaker:tool:{}:", key_part(tenant.as_str())),
        ])
    }

    /// Where `tenant` stands in its daily budget and in the global hourly one (the scopes the
    /// governor caps; user and session scopes are left out), read from the counters now.
    pub async fn budget_standings(
        &self,
        tenant: &TenantId,
    ) -> Result<Vec<(Scope, Standing)>, RuntimeError> {
        let Some(governor) = &self.governor else {
            return Ok(Vec::new());
        };
        let now = now_ms();
        let scopes = governor.budgets.policy(tenant).scopes(
            tenant,
            &UserId::new(""),
            &SessionId::new(""),
            now,
        );
        let mut out = Vec::new();
        for scope in scopes
            .into_iter()
            .filter(|s| s.key.starts_with("tenant:") || s.key.starts_with("global:"))
        {
            let standing = governor.counters.standing(&scope.key, now).await?;
            out.push((scope, standing));
        }
        Ok(out)
    }

    /// Waits for one of `tenant`'s run slots for `id` (FIFO, bounded), if the tenant is capped.
    pub(crate) async fn enter_bulkhead(
        &self,
        tenant: &TenantId,
        id: &str,
        run_lease_ms: i64,
    ) -> Result<(), RuntimeError> {
        let Some(bulkheads) = &self.bulkheads else {
            return Ok(());
        };
        let Some(policy) = bulkheads.policy(tenant).copied() else {
            return Ok(());
        };
        let key = format!("bulkhead:{}", key_part(tenant.as_str()));
        let give_up = now_ms().saturating_add(bulkheads.queue_wait_ms);
        loop {
            let now = now_ms();
            let (entry, _) = cells::update(self.counters.as_ref(), &key, |s: &BulkheadState| {
                s.enter(&policy, id, now, run_lease_ms, QUEUE_LEASE_MS)
            })
            .await?;
            match entry {
                Entry::Admitted => return Ok(()),
                Entry::Full => {
                    return Err(RuntimeError::Busy {
                        tenant: tenant.clone(),
                        why: format!(
                            "{} runs are executing and {} are already queued",
                            policy.max_concurrent_runs, policy.max_queued
                        ),
                    });
                }
                Entry::Queued { .. } if now >= give_up => {
                    self.leave_bulkhead(tenant, id).await?;
                    return Err(RuntimeError::Busy {
                        tenant: tenant.clone(),
                        why: format!(
                            "no run slot freed up within {} s of queueing",
                            bulkheads.queue_wait_ms / 1000
                        ),
                    });
                }
                Entry::Queued { .. } => {
                    tokio::time::sleep(Duration::from_millis(20 + fastrand::u64(0..30))).await
                }
            }
        }
    }

    pub(crate) async fn leave_bulkhead(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<(), RuntimeError> {
        if self
            .bulkheads
            .as_ref()
            .and_then(|b| b.policy(tenant))
            .is_none()
        {
            return Ok(());
        }
        let now = now_ms();
        cells::update(
            self.counters.as_ref(),
            &format!("bulkhead:{}", key_part(tenant.as_str())),
            |s: &BulkheadState| ((), s.leave(id, now)),
        )
        .await?;
        Ok(())
    }
}
