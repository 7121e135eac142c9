//! Cancelling a run: at once when nobody drives it, by flag when this process does, by a
//! request in the store when another process does.

use crate::*;
use rein_core::{RunId, RunStatus, TenantId, TerminationReason};
use std::sync::Arc;

/// A run this process drives, registered for cancellation while the guard lives.
pub(crate) struct Driving<'a> {
    pub(crate) runtime: &'a Runtime,
    pub(crate) run_id: RunId,
    pub(crate) flag: Arc<std::sync::OnceLock<String>>,
}

impl<'a> Driving<'a> {
    /// Registers the run, with `flag` if it has one already (a request to cancel it found in
    /// the store when this process took it up).
    pub(crate) fn register(
        runtime: &'a Runtime,
        run_id: &RunId,
        flag: Option<Arc<std::sync::OnceLock<String>>>,
    ) -> Self {
        let flag = flag.unwrap_or_default();
        if let Ok(mut driving) = runtime.driving.lock() {
            driving.insert(run_id.clone(), flag.clone());
        }
        Driving {
            runtime,
            run_id: run_id.clone(),
            flag,
        }
    }

    /// Who asked to cancel the run, once someone has.
    pub(crate) fn requested(&self) -> Option<String> {
        self.flag.get().cloned()
    }
}

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        if let Ok(mut driving) = self.runtime.driving.lock() {
            driving.remove(&self.run_id);
        }
    }
}

impl Runtime {
    /// Cancels a run: one this process drives stops before its next step; one another live
    /// process drives stops the same way once that process sees the request, which the store
    /// keeps ([`Store::request_cancel`], looked for every [`CANCEL_POLL`]); one nobody drives
    /// (queued, awaiting approval, or left by a dead process) ends at once. Either way its log
    /// ends with `run_finished` (`cancelled`, `by` in the detail). An ended run is
    /// [`RuntimeError::Ended`].
    pub async fn cancel(
        &self,
        tenant: &TenantId,
        run_id: &RunId,
        by: &str,
    ) -> Result<Cancelled, RuntimeError> {
        let record = self.store.run(tenant, run_id).await?;
        if record.progress.status.is_terminal() {
            return Err(RuntimeError::Ended(run_id.clone(), record.progress.status));
        }
        let flag = self
            .driving
            .lock()
            .ok()
            .and_then(|d| d.get(run_id).cloned());
        if let Some(flag) = flag {
            // A second request while the first is pending changes nothing: the first one's
            // author is the one recorded.
            let _ = flag.set(by.to_string());
            return Ok(Cancelled::Requested);
        }
        if !self
            .store
            .acquire(run_id, self.fresh_lease(), now_ms())
            .await?
        {
            // Another live process drives it: the request waits in the store for that process.
            if self.store.request_cancel(tenant, run_id, by).await? {
                return Ok(Cancelled::Requested);
            }
            // It ended meanwhile.
            let status = self.store.run(tenant, run_id).await?.progress.status;
            return Err(RuntimeError::Ended(run_id.clone(), status));
        }
        let ended = self
            .end_run(
                tenant,
                run_id,
                RunStatus::Cancelled,
                TerminationReason::Cancelled,
                format!("cancelled by {by}"),
            )
            .await;
        let released = self.store.release(run_id, &self.owner).await;
        let orphans = ended?;
        released?;
        self.end_orphaned_workers(tenant, run_id, orphans).await;
        Ok(Cancelled::Ended)
    }
}
