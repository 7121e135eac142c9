//! The queue: runs enqueued for workers, claimed one at a time (`Runtime::work_one`), and runs
//! that cannot be driven (orphaned workers, interrupted gateway calls) ended.

use crate::*;
use rein_core::meter::RunMeter;
use rein_core::{Event, EventKind, PriceTable, RunId, RunStatus, TenantId, TerminationReason};
use rein_providers::Model;

impl Runtime {
    /// Queues a run for a worker (`rein worker`) and returns its id at once: the run is stored
    /// with its first events, `queued` and unleased.
    pub async fn enqueue(&self, request: RunRequest) -> Result<RunId, RuntimeError> {
        self.enqueue_as(Runtime::new_run_id(), request).await
    }

    /// [`Runtime::enqueue`] under an id the caller chose (one derived from a client's
    /// idempotency key, say). Storing it fails if a run with that id exists.
    pub async fn enqueue_as(
        &self,
        run_id: RunId,
        request: RunRequest,
    ) -> Result<RunId, RuntimeError> {
        let (info, kinds) = self.first_events(&run_id, request, None).await?;
        let first = seal_first(&run_id, info.created_ms, kinds);
        let events: Vec<_> = first.iter().map(|(_, s)| s.clone()).collect();
        self.store.create_run(&info, &events, None).await?;
        if self.meters.on() {
            let mut meter = RunMeter::new(info.tenant.as_str(), &info.agent);
            self.meters
                .apply(first.iter().flat_map(|(event, _)| meter.observe(event)));
        }
        Ok(run_id)
    }

    /// Claims one run a worker may drive (queued, or running under an expired lease) and drives
    /// it under a renewed lease; `None` when there is none.
    pub async fn work_one(
        &self,
        prices: &PriceTable,
        model: &dyn Model,
    ) -> Result<Option<RunOutcome>, RuntimeError> {
        let claimed = self
            .store
            .claim(self.fresh_lease(), now_ms(), self.per_tenant)
            .await?;
        let Some((tenant, run_id)) = claimed else {
            return Ok(None);
        };
        match self
            .continue_run(&tenant, &run_id, prices, model, None, now_ms())
            .await
        {
            // A run that can never be driven (its pinned spec no longer checks, its log does
            // not replay) is ended with the reason, instead of being claimed again forever.
            Err(e @ (RuntimeError::PinnedSpec(_) | RuntimeError::Replay(_))) => {
                self.end_unrunnable(&tenant, &run_id, &e.to_string())
                    .await?;
                Err(e)
            }
            other => other.map(Some),
        }
    }

    /// Appends `run_finished` (failed, `error`) to a run that cannot be driven.
    pub(crate) async fn end_unrunnable(
        &self,
        tenant: &TenantId,
        run_id: &RunId,
        why: &str,
    ) -> Result<(), RuntimeError> {
        let orphans = self
            .end_run(
                tenant,
                run_id,
                RunStatus::Failed,
                TerminationReason::Error,
                format!("the run cannot be continued: {why}"),
            )
            .await?;
        self.end_orphaned_workers(tenant, run_id, orphans).await;
        Ok(())
    }

    /// Ends the worker runs `orphans` of `caller`, which ended without continuing them, and
    /// theirs in turn: each is `cancelled`, naming its caller. Best effort: a worker that
    /// cannot be ended now is logged and left as it is.
    pub(crate) async fn end_orphaned_workers(
        &self,
        tenant: &TenantId,
        caller: &RunId,
        orphans: Vec<RunId>,
    ) {
        let mut left: Vec<(RunId, RunId)> =
            orphans.into_iter().map(|o| (caller.clone(), o)).collect();
        while let Some((caller, orphan)) = left.pop() {
            match self.end_orphan(tenant, &caller, &orphan).await {
                Ok(theirs) => left.extend(theirs.into_iter().map(|o| (orphan.clone(), o))),
                Err(e) => tracing::warn!(
                    run_id = %orphan,
                    caller = %caller,
                    error = %e,
                    "a worker's run left running by a crash could not be ended"
                ),
            }
        }
    }

    /// Ends one orphaned worker's run (if its end is not recorded yet); returns its own
    /// unfinished workers. Its caller ended, so its lease is taken whoever held it.
    pub(crate) async fn end_orphan(
        &self,
        tenant: &TenantId,
        caller: &RunId,
        orphan: &RunId,
    ) -> Result<Vec<RunId>, RuntimeError> {
        if !self
            .store
            .acquire(orphan, self.fresh_lease(), i64::MAX)
            .await?
        {
            return Ok(Vec::new());
        }
        let ended = async {
            if self
                .store
                .run(tenant, orphan)
                .await?
                .progress
                .status
                .is_terminal()
            {
                return Ok(Vec::new());
            }
            self.end_run(
                tenant,
                orphan,
                RunStatus::Cancelled,
                TerminationReason::Cancelled,
                format!("its caller, run {caller}, ended without it after a crash interrupted it"),
            )
            .await
        }
        .await;
        let released = self.store.release(orphan, &self.owner).await;
        let theirs = ended?;
        released?;
        Ok(theirs)
    }

    /// Appends `run_finished` to a run this process holds the lease of but does not drive.
    /// Returns the worker runs it started and its log does not see end, which nothing will
    /// continue now (for [`Runtime::end_orphaned_workers`]).
    pub(crate) async fn end_run(
        &self,
        tenant: &TenantId,
        run_id: &RunId,
        status: RunStatus,
        reason: TerminationReason,
        detail: String,
    ) -> Result<Vec<RunId>, RuntimeError> {
        let sealed = self.store.events(tenant, run_id).await?;
        let Some(last) = sealed.last() else {
            return Ok(Vec::new());
        };
        // Read leniently: an event this build cannot decode must not keep a run from ending.
        let events: Vec<Event> = sealed.iter().filter_map(|e| e.decode().ok()).collect();
        let event = Event {
            seq: last.seq + 1,
            ts_ms: now_ms(),
            kind: EventKind::RunFinished {
                status,
                reason,
                detail: Some(detail),
                output: None,
            },
        };
        self.store
            .append(tenant, &event.seal(run_id, &last.hash))
            .await?;
        Ok(rein_core::event::unfinished_workers(&events))
    }
}
