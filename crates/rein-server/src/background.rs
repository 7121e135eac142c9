//! The server's background work: the workers that drive runs, and the loops that wake them,
//! anchor the audit trail and sweep expired dashboard sessions.

use crate::ServerError;
use crate::auth::watch_key_changes;
use crate::{App, POLL};
use rein_runtime::now_ms;
use std::sync::Arc;
use std::time::Duration;

/// How often `rein serve` removes expired dashboard sessions (signing in removes them too).
pub(crate) const SESSION_SWEEP: Duration = Duration::from_secs(600);

/// Removes expired dashboard sessions every [`SESSION_SWEEP`], so they go even when nobody signs
/// in again.
pub(crate) fn sweep_sessions(app: Arc<App>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SESSION_SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = app.store.sweep_dashboard_sessions(now_ms()).await {
                tracing::warn!(error = %e, "cannot remove expired dashboard sessions; trying again later");
            }
        }
    })
}

/// Anchors the store every `every` (`[audit] anchor_every`), until aborted: a later audit then
/// finds a run removed or a log cut short before the anchor, which no hash chain shows.
pub(crate) fn anchor_now_and_then(app: Arc<App>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let file = app.config.audit.anchor_file.as_deref();
            let lag = rein_app::anchors::CUTOFF_LAG;
            match rein_app::anchors::make(app.store.as_ref(), now_ms(), lag, file).await {
                Ok(Some(anchor)) => tracing::info!(
                    seq = anchor.seq,
                    runs = anchor.runs,
                    "audit anchor recorded"
                ),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "the store could not be anchored; trying again at the next interval")
                }
            }
        }
    })
}

/// Wakes one idle worker whenever the store announces a claimable run, until aborted: the runs
/// this process's requests queue, and on PostgreSQL those other processes queue or give up. One
/// worker, not all: every idle worker of every process trying a claim for each run would be that
/// many queries.
pub(crate) fn wake_for_claimable_runs(app: Arc<App>) -> tokio::task::JoinHandle<()> {
    let mut claimable = app.store.follow_claimable();
    tokio::spawn(async move {
        loop {
            claimable.seen();
            if claimable.changed(Duration::from_secs(3600)).await {
                app.wake.notify_one();
            }
        }
    })
}

/// One worker: claims queued runs (and runs whose process died, and runs whose approval timed
/// out) and drives them, until the server stops. Idle, it waits to be woken
/// ([`wake_for_claimable_runs`]), looking anyway every [`POLL`].
pub(crate) async fn work(app: Arc<App>) {
    loop {
        match app
            .runtime
            .work_one(&app.config.prices, app.model.as_ref())
            .await
        {
            Ok(Some(outcome)) => {
                let _ = app.outcomes.send(Arc::new(outcome));
            }
            Ok(None) => {
                let _ = tokio::time::timeout(POLL, app.wake.notified()).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "worker: a run could not be driven");
                tokio::time::sleep(POLL).await;
            }
        }
    }
}

/// The server's background tasks, started with it and stopped when it stops.
pub(crate) struct Tasks {
    loops: Vec<tokio::task::JoinHandle<()>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Tasks {
    /// Starts `workers` workers and the loops: key changes, session sweeping, audit anchors
    /// (when `[audit] anchor_every` is set) and, with workers, the claimable-run wake-ups.
    pub(crate) async fn start(app: &Arc<App>, workers: usize) -> Result<Self, ServerError> {
        let head = app.store.admin_log_head().await?;
        let mut loops = vec![
            watch_key_changes(app.clone(), head),
            sweep_sessions(app.clone()),
        ];
        if let Some(every) = app.config.audit.anchor_every {
            loops.push(anchor_now_and_then(app.clone(), every));
        }
        if workers > 0 {
            loops.push(wake_for_claimable_runs(app.clone()));
        }
        let workers = (0..workers)
            .map(|_| tokio::spawn(work(app.clone())))
            .collect();
        Ok(Tasks { loops, workers })
    }

    /// Stops every task, then gives up the leases of the runs the workers were driving, so the
    /// next start (or another process) takes them over at once rather than when the leases
    /// expire.
    pub(crate) async fn stop(self, app: &App) {
        for task in &self.loops {
            task.abort();
        }
        let driven = app.runtime.driven();
        for worker in &self.workers {
            worker.abort();
        }
        for worker in self.workers {
            let _ = worker.await;
        }
        if let Err(e) = app.runtime.release_leases(&driven).await {
            tracing::warn!(
                error = %e,
                runs = driven.len(),
                "the leases of the runs this server drove were not released; they are taken over once they expire"
            );
        }
    }
}
