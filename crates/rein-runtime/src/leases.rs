//! Leases: a run is driven only by the process holding its lease, renewed while it drives and
//! given up when it stops; a dead holder's runs are taken over.

use crate::*;
use rein_core::{PriceTable, RunId, TenantId};
use rein_providers::Model;
use rein_store::Store;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How long a run's lease lasts unless its holder renews it (it does, a third of the way in).
pub const DEFAULT_LEASE_MS: i64 = 30_000;

/// How often a process looks in the store for requests to cancel the runs it drives, made in
/// other processes ([`Runtime::cancel`]); its leases' renewals follow their own schedule. A
/// shorter lease's renewal period is used when it is shorter.
pub const CANCEL_POLL: Duration = Duration::from_secs(1);

/// The runs this process is driving, each with who asked to cancel it, once someone has.
pub(crate) type DrivingMap = std::sync::Mutex<HashMap<RunId, Arc<std::sync::OnceLock<String>>>>;

/// The runs whose leases this process holds while it drives them, and the one task that renews
/// them all, a third of the way into each lease (started with the first; stopped when the last
/// clone of the runtime goes). One task for every run rather than one each: a run that ends
/// within a third of its lease, as a gateway call does, costs an insert and a removal here, not
/// a task spawned, a timer set and a task aborted.
#[derive(Default)]
pub(crate) struct Leases {
    held: std::sync::Mutex<std::collections::HashSet<RunId>>,
    renewer: std::sync::OnceLock<Renewer>,
}

/// The renewing task; aborted on drop.
pub(crate) struct Renewer(tokio::task::JoinHandle<()>);

impl Drop for Renewer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Leases {
    fn held(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<RunId>> {
        // The set stays whole whatever panicked while holding it.
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Renews every held lease each third of a lease, and hands the requests to cancel held
    /// runs that other processes stored to their drivers every [`CANCEL_POLL`], until `leases`
    /// is gone.
    fn renew(
        leases: std::sync::Weak<Leases>,
        driving: std::sync::Weak<DrivingMap>,
        store: Arc<dyn Store>,
        owner: String,
        lease_ms: i64,
    ) -> Renewer {
        Renewer(tokio::spawn(async move {
            let every = Duration::from_millis(u64::try_from(lease_ms / 3).unwrap_or(1).max(1));
            let poll = every.min(CANCEL_POLL);
            // Leases are renewed every `renew_every`-th look, a third of a lease or sooner.
            let renew_every = (every.as_millis() / poll.as_millis().max(1)).max(1);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + poll, poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut looks: u128 = 0;
            loop {
                tick.tick().await;
                looks += 1;
                let Some(runs) = leases.upgrade().map(|l| l.held().clone()) else {
                    return;
                };
                if runs.is_empty() {
                    continue;
                }
                let runs: Vec<RunId> = runs.into_iter().collect();
                // A failed look is repeated at the next tick; the requests stay in the store.
                if let Ok(asked) = store.cancel_requests(&runs).await
                    && let Some(driving) = driving.upgrade()
                    && let Ok(driving) = driving.lock()
                {
                    for (run, by) in asked {
                        if let Some(flag) = driving.get(&run) {
                            let _ = flag.set(by);
                        }
                    }
                }
                if !looks.is_multiple_of(renew_every) {
                    continue;
                }
                for run in runs {
                    let lease = rein_store::Lease {
                        owner: &owner,
                        until_ms: now_ms() + lease_ms,
                    };
                    // A lost lease means another worker took the run over (this one was
                    // presumed dead); this one's next append then fails on position and it
                    // stops. A store error is retried at the next tick: the lease is still
                    // this process's.
                    if let Ok(false) = store.renew(&run, lease).await
                        && let Some(leases) = leases.upgrade()
                    {
                        leases.held().remove(&run);
                    }
                }
            }
        }))
    }
}

/// A run's lease, renewed while this lives.
pub(crate) struct LeaseKeeper<'a> {
    leases: &'a Leases,
    run: RunId,
}

impl Drop for LeaseKeeper<'_> {
    fn drop(&mut self) {
        self.leases.held().remove(&self.run);
    }
}

/// This process's name as a lease holder: `PID@PLACE/UUID`, where PLACE is the machine's boot
/// id and the process id namespace (Linux): with them, a process in the same place can tell
/// that the holder is gone ([`holder_is_gone`]). Containers on one host share the boot id but
/// not the process ids, so the namespace is part of the place.
pub(crate) fn holder_name() -> String {
    format!(
        "{}@{}/{}",
        std::process::id(),
        place().unwrap_or_else(|| "unknown".into()),
        uuid::Uuid::now_v7()
    )
}

/// The boot id and process id namespace of this process, where the system tells them (Linux).
pub(crate) fn place() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let namespace = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let namespace = namespace.to_string_lossy();
    let inode = namespace.trim_start_matches("pid:[").trim_end_matches(']');
    let boot = boot.trim();
    (!boot.is_empty() && !inode.is_empty()).then(|| format!("{boot}:{inode}"))
}

/// Whether the process that holds a lease as `owner` is known to be gone: it ran in this place
/// (this machine since its last boot, this process id namespace), and no process has its id
/// now. A holder elsewhere, or one this cannot tell about, is not known to be gone.
pub fn holder_is_gone(owner: &str) -> bool {
    let Some((pid, rest)) = owner.split_once('@') else {
        return false;
    };
    let Some((there, _)) = rest.split_once('/') else {
        return false;
    };
    let (Ok(pid), Some(here)) = (pid.parse::<u32>(), place()) else {
        return false;
    };
    // A `/proc` that hides other processes (`hidepid`) would hide a live holder too: then
    // this process cannot tell, unless it sees process 1.
    let sees_others = std::path::Path::new("/proc/1/stat").exists();
    there == here
        && sees_others
        && pid != std::process::id()
        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The name a run's log shows for a lease holder: its random part alone (where it runs is the
/// operator's business, not the tenant's).
pub(crate) fn shown_holder(owner: &str) -> &str {
    owner.rsplit_once('/').map_or(owner, |(_, id)| id)
}

impl Runtime {
    /// The runs this process is driving now.
    pub fn driven(&self) -> Vec<RunId> {
        self.driving
            .lock()
            .map(|d| d.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Gives up this process's leases on `runs`, once their drivers have stopped (at
    /// shutdown): another process, or this one restarted, takes them over at once instead of
    /// when the leases expire. Every step they took is already in their logs.
    pub async fn release_leases(&self, runs: &[RunId]) -> Result<(), RuntimeError> {
        for run in runs {
            self.store.release(run, &self.owner).await?;
        }
        Ok(())
    }

    /// This process's lease on a run, from now.
    pub(crate) fn fresh_lease(&self) -> rein_store::Lease<'_> {
        rein_store::Lease {
            owner: &self.owner,
            until_ms: now_ms() + self.lease_ms,
        }
    }

    /// Renews this process's lease on `run_id` until the keeper is dropped.
    pub(crate) fn keep_lease(&self, run_id: &RunId) -> LeaseKeeper<'_> {
        self.leases.renewer.get_or_init(|| {
            Leases::renew(
                Arc::downgrade(&self.leases),
                Arc::downgrade(&self.driving),
                self.store.clone(),
                self.owner.clone(),
                self.lease_ms,
            )
        });
        self.leases.held().insert(run_id.clone());
        LeaseKeeper {
            leases: &self.leases,
            run: run_id.clone(),
        }
    }

    /// [`Runtime::resume`] even while another process holds the run's lease: for an operator
    /// who knows that process is gone (`kill -9`) and will not wait for the lease to expire.
    pub async fn take_over(
        &self,
        tenant: &TenantId,
        run_id: &RunId,
        prices: &PriceTable,
        model: &dyn Model,
    ) -> Result<RunOutcome, RuntimeError> {
        self.continue_run(tenant, run_id, prices, model, None, i64::MAX)
            .await
    }

    /// [`Runtime::take_over`] of a lease observed to run until `held_until_ms` by a holder known
    /// to be gone: taken only if nobody has claimed or renewed it since (a restarted server that
    /// took the run up meanwhile keeps it).
    pub async fn take_over_from(
        &self,
        tenant: &TenantId,
        run_id: &RunId,
        prices: &PriceTable,
        model: &dyn Model,
        held_until_ms: i64,
    ) -> Result<RunOutcome, RuntimeError> {
        self.continue_run(
            tenant,
            run_id,
            prices,
            model,
            None,
            held_until_ms.saturating_add(1),
        )
        .await
    }

    /// Does `work` under this process's lease on `run_id`, taken as of `now_ms` (`i64::MAX`:
    /// whoever holds it), renewed meanwhile and released after on every path; a failure to
    /// release only delays others by one lease. [`RuntimeError::Leased`] if another process
    /// holds it.
    pub(crate) async fn leased<T>(
        &self,
        run_id: &RunId,
        now_ms: i64,
        work: impl std::future::Future<Output = Result<T, RuntimeError>>,
    ) -> Result<T, RuntimeError> {
        if !self
            .store
            .acquire(run_id, self.fresh_lease(), now_ms)
            .await?
        {
            return Err(RuntimeError::Leased(run_id.clone()));
        }
        let keeper = self.keep_lease(run_id);
        let outcome = work.await;
        drop(keeper);
        let released = self.store.release(run_id, &self.owner).await;
        let outcome = outcome?;
        released?;
        Ok(outcome)
    }
}
