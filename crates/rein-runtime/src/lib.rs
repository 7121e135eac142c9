//! Rein's driver: runs the engine against the real world.
//!
//! The loop is: ask the [`Engine`] for its next [`Effect`]; execute it through a provider, a
//! tool or nothing at all, wrapped in policy (per-attempt timeouts, the run's wall-clock
//! deadline, retries with full-jitter backoff only when the failure and the tool's contract
//! say it is safe); append the outcome to the run's hash-chained log; feed it back. Every
//! event is durable before the next effect starts, so a crash loses no recorded step.
//!
//! Limits are decided by the engine, not here: this crate never decides whether a run may
//! spend, only how to carry out what the engine asked for.

mod breakers;
mod cells;
mod meters;
mod retry;
mod secrets;
pub mod workers;

use rein_core::breaker::Admission;
use rein_core::budget::{
    self, Amount, Budgets, Counters, CountersError, Reservation, Scope, Standing, key_part,
};
use rein_core::bulkhead::{BulkheadState, Bulkheads, Entry};
use rein_core::event::ParentLink;
use rein_core::meter::{Measure, RunMeter};
use rein_core::rate::{OverLimit, RateLimits, RateState, Take};

use rein_core::{
    Agent, CheckContext, Effect, Engine, ErrorType, Event, EventKind, JobId, ModelCall, PriceTable,
    ReplayError, RunId, RunStatus, SessionId, TenantId, TerminationReason, ToolInvocation,
    ToolResult, Usage, Usd, UserId,
};
use rein_providers::{Endpoint, Model, ModelError, ModelRequest, TokenSink};
use rein_store::{Hold, RunInfo, Settlement, Store, StoreError};
use rein_tools::{Reach, Secrets, ToolBox};
use retry::{Backoff, with_retries};
pub use secrets::{SECRETS_KEY_ENV, SecretError, SecretKey};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
pub use workers::Workers;

pub use meters::{Recorder, record as record_measures};
pub use retry::Backoff as RetryBackoff;

/// What can stop the driver itself (as opposed to ending a run, which is always an event).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The store failed; the run stays as its log last recorded it and can be resumed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored log could not be replayed.
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// A stored event could not be decoded.
    #[error(transparent)]
    Decode(#[from] rein_core::event::DecodeError),
    /// The budget counters could not be reached: no model call is made without a reservation,
    /// so the run stops where its log ends and can be resumed.
    #[error(transparent)]
    Counters(#[from] CountersError),
    /// The tenant's bulkhead had no slot for the run; nothing was recorded.
    #[error("tenant {tenant} is at its cap of concurrent runs: {why}; try again later")]
    Busy {
        /// The tenant.
        tenant: TenantId,
        /// Why the run could not wait.
        why: String,
    },
    /// The spec a run pinned no longer checks (a price or built-in it needs is gone).
    #[error("{0}")]
    PinnedSpec(rein_core::SpecErrors),
    /// Another process holds a live lease on the run: it is being driven there.
    #[error(
        "run {0} is being driven by another process (it holds the run's lease); try again once that process is done or its lease expires"
    )]
    Leased(RunId),
    /// A decision was given for a run that is not waiting for one.
    #[error("run {0} is not awaiting approval")]
    NotAwaitingApproval(RunId),
    /// The run has already ended, so there is nothing to cancel.
    #[error("run {0} has already ended ({1})")]
    Ended(RunId, RunStatus),
    /// The run is a worker agent's, which only its caller continues (under the budget it gave).
    #[error(
        "run {run} is a worker of run {caller}, which alone continues it: resume run {caller} instead (or cancel run {run})"
    )]
    WorkerRun {
        /// The worker's run.
        run: RunId,
        /// Its caller.
        caller: RunId,
    },
}

/// What cancelling a run did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// The run was not being driven (queued, awaiting approval, or left by a dead process):
    /// it has ended, `cancelled`.
    Ended,
    /// A process is driving the run, this one or another (which finds the request within
    /// [`CANCEL_POLL`]): it ends, `cancelled`, before its next step (the step in flight, a model
    /// or tool call, finishes and is recorded first).
    Requested,
}

/// A person's decision on a run's pending approval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the held action may go ahead.
    pub approved: bool,
    /// Who decided.
    pub by: String,
    /// Why, if they said.
    pub reason: Option<String>,
}

/// A run to start.
#[derive(Clone, Debug)]
pub struct RunRequest {
    /// The checked agent.
    pub agent: Arc<Agent>,
    /// The spec source, pinned with the run.
    pub spec_source: String,
    /// The user's input.
    pub input: String,
    /// Owner.
    pub tenant: TenantId,
    /// Attributed user.
    pub user: UserId,
    /// Session.
    pub session: SessionId,
    /// Optional job.
    pub job: Option<JobId>,
    /// Authorisation scopes the tenant is granted (pinned with the run).
    pub granted_scopes: Vec<String>,
    /// A gateway call: the caller's own conversation, which the run answers with one model
    /// call (the agent's instructions and `input` are then not sent).
    pub chat: Option<rein_core::ChatRequest>,
    /// The W3C `traceparent` the caller sent, if any: the run's trace continues it.
    pub trace_parent: Option<String>,
    /// Who wrote the spec: a tenant's (registered over the API) reaches only the tenant's
    /// secrets and the addresses the egress policy allows.
    pub trust: rein_core::Trust,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct RunOutcome {
    /// Run id.
    pub run_id: RunId,
    /// Status: terminal, or `awaiting_approval` when the run stopped to wait for a person.
    pub status: RunStatus,
    /// The one termination reason, once the run has ended.
    pub reason: Option<TerminationReason>,
    /// The action waiting for a person's decision, when the run is `awaiting_approval`.
    pub awaiting: Option<rein_core::engine::PendingApproval>,
    /// What happened, for a person.
    pub detail: Option<String>,
    /// Model calls made.
    pub iterations: u32,
    /// Tool calls made or refused.
    pub tool_calls: u32,
    /// Tokens used.
    pub usage: Usage,
    /// Money spent.
    pub cost: Usd,
    /// The final answer.
    pub output: Option<Value>,
    /// Each model that answered a step, with how many steps it answered.
    pub models_used: std::collections::BTreeMap<String, u32>,
    /// Events recorded.
    pub events: u64,
    /// Per model or tool step: the driver's and engine's own time (everything but the
    /// provider's and tool's), in nanoseconds. Empty unless [`Runtime::with_step_timings`].
    pub step_overheads_ns: Vec<u64>,
}

/// Shared budgets and the counters that enforce them.
#[derive(Clone)]
pub struct Governor {
    /// The counter backend (the store itself, or Redis shared by several processes).
    pub counters: Arc<dyn Counters>,
    /// Which scopes are capped, per tenant.
    pub budgets: Budgets,
}

/// How long a reservation outlives the end of its run's wall-clock limit before it expires:
/// past that, its holder is certainly gone.
const RESERVATION_GRACE_MS: i64 = 30_000;

/// How long a waiting run keeps its queue place without asking again.
const QUEUE_LEASE_MS: i64 = 2_000;

/// How long a run's slot is held before it expires (its holder is then certainly gone): the
/// run's wall-clock limit plus a grace period.
/// A run's spotlighting boundary: 64 random bits from the operating system, so content from
/// outside cannot guess it and close its fence early. `None` only if the system has no
/// randomness to give (the run is then fenced by the guard's verdicts alone).
fn fence_boundary() -> Option<String> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).ok()?;
    Some(rein_core::event::hex(&bytes))
}

fn run_lease_ms(agent: &Agent) -> i64 {
    i64::try_from(agent.spec.limits.timeout.as_millis()).unwrap_or(i64::MAX / 2)
        + RESERVATION_GRACE_MS
}

/// Executes runs.
#[derive(Clone)]
pub struct Runtime {
    store: Arc<dyn Store>,
    tools: ToolBox,
    governor: Option<Governor>,
    counters: Arc<dyn Counters>,
    breakers: Arc<breakers::Breakers>,
    meters: meters::Meters,
    /// Where the spans of each ended run go, if anywhere.
    spans: Option<Arc<dyn rein_core::spans::SpanSink>>,
    rate_limits: Option<RateLimits>,
    bulkheads: Option<Bulkheads>,
    step_timings: bool,
    /// This process's name as a lease holder.
    owner: String,
    /// How long a lease lasts unless renewed.
    lease_ms: i64,
    /// The runs whose leases this process renews while it drives them.
    leases: Arc<Leases>,
    /// The runs this process is driving, each with who asked to cancel it, once someone has.
    driving: Arc<DrivingMap>,
    /// How worker agents' specs are found, for tools whose source is an agent.
    workers: Option<Arc<dyn Workers>>,
    /// The key tenants' secrets are sealed with; `None`: tenants' specs can name none.
    secret_key: Option<SecretKey>,
    /// Whose spec a run is taken to be when its log does not say (written before it was
    /// recorded).
    unrecorded_trust: rein_core::Trust,
    /// The most runs of one tenant that workers claim to drive at once.
    per_tenant: Option<u32>,
}

/// How long a run's lease lasts unless its holder renews it (it does, a third of the way in).
pub const DEFAULT_LEASE_MS: i64 = 30_000;

/// How often a process looks in the store for requests to cancel the runs it drives, made in
/// other processes ([`Runtime::cancel`]); its leases' renewals follow their own schedule. A
/// shorter lease's renewal period is used when it is shorter.
pub const CANCEL_POLL: Duration = Duration::from_secs(1);

/// The runs this process is driving, each with who asked to cancel it, once someone has.
type DrivingMap = std::sync::Mutex<HashMap<RunId, Arc<std::sync::OnceLock<String>>>>;

/// The runs whose leases this process holds while it drives them, and the one task that renews
/// them all, a third of the way into each lease (started with the first; stopped when the last
/// clone of the runtime goes). One task for every run rather than one each: a run that ends
/// within a third of its lease, as a gateway call does, costs an insert and a removal here, not
/// a task spawned, a timer set and a task aborted.
#[derive(Default)]
struct Leases {
    held: std::sync::Mutex<std::collections::HashSet<RunId>>,
    renewer: std::sync::OnceLock<Renewer>,
}

/// The renewing task; aborted on drop.
struct Renewer(tokio::task::JoinHandle<()>);

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
struct LeaseKeeper<'a> {
    leases: &'a Leases,
    run: RunId,
}

impl Drop for LeaseKeeper<'_> {
    fn drop(&mut self) {
        self.leases.held().remove(&self.run);
    }
}

/// One log line per stop of a run this process drove: it ended, it waits for a person, or an
/// error stopped it (the run resumes from its log). It carries the run and trace ids, so a log
/// line leads to `rein runs show` and to the trace.
fn log_outcome(
    tenant: &TenantId,
    run_id: &RunId,
    trace: &[u8; 16],
    outcome: &Result<RunOutcome, RuntimeError>,
) {
    let trace_id = rein_core::event::hex(trace);
    match outcome {
        Ok(o) => tracing::info!(
            run_id = run_id.as_str(),
            trace_id,
            tenant = tenant.as_str(),
            status = o.status.as_str(),
            reason = o.reason.map(|r| r.as_str()),
            iterations = o.iterations,
            tool_calls = o.tool_calls,
            input_tokens = o.usage.input_tokens,
            output_tokens = o.usage.output_tokens,
            cost_usd = o.cost.micros() as f64 / 1e6,
            detail = o.detail.as_deref(),
            "{}",
            if o.status.is_terminal() {
                "run ended"
            } else {
                "run waits for a person"
            }
        ),
        Err(e) => tracing::warn!(
            run_id = run_id.as_str(),
            trace_id,
            tenant = tenant.as_str(),
            error = %e,
            "run stopped by an error; it resumes from its log"
        ),
    }
}

/// Seals a new run's first events into the start of its chain.
fn seal_first(
    run_id: &RunId,
    ts_ms: i64,
    kinds: Vec<EventKind>,
) -> Vec<(Event, rein_core::SealedEvent)> {
    let mut prev = rein_core::GENESIS_HASH.to_string();
    kinds
        .into_iter()
        .enumerate()
        .map(|(seq, kind)| {
            let event = Event {
                seq: seq as u64,
                ts_ms,
                kind,
            };
            let sealed = event.seal(run_id, &prev);
            prev = sealed.hash.clone();
            (event, sealed)
        })
        .collect()
}

/// This process's name as a lease holder: `PID@PLACE/UUID`, where PLACE is the machine's boot
/// id and the process id namespace (Linux): with them, a process in the same place can tell
/// that the holder is gone ([`holder_is_gone`]). Containers on one host share the boot id but
/// not the process ids, so the namespace is part of the place.
fn holder_name() -> String {
    format!(
        "{}@{}/{}",
        std::process::id(),
        place().unwrap_or_else(|| "unknown".into()),
        uuid::Uuid::now_v7()
    )
}

/// The boot id and process id namespace of this process, where the system tells them (Linux).
fn place() -> Option<String> {
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
fn shown_holder(owner: &str) -> &str {
    owner.rsplit_once('/').map_or(owner, |(_, id)| id)
}

/// The wall clock, ms since the epoch (the driver's one clock).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Runtime {
    /// A runtime over a store and a toolbox.
    pub fn new(store: Arc<dyn Store>, tools: ToolBox) -> Self {
        // The guards' patterns are compiled now, once, not by the first run that needs them.
        rein_core::guard::warm();
        let counters: Arc<dyn Counters> = store.clone();
        Runtime {
            breakers: Arc::new(breakers::Breakers::new(
                counters.clone(),
                meters::Meters::default(),
            )),
            meters: meters::Meters::default(),
            spans: None,
            counters,
            rate_limits: None,
            bulkheads: None,
            store,
            tools,
            governor: None,
            step_timings: false,
            owner: holder_name(),
            lease_ms: DEFAULT_LEASE_MS,
            leases: Arc::default(),
            driving: Arc::default(),
            workers: None,
            secret_key: None,
            unrecorded_trust: rein_core::Trust::Operator,
            per_tenant: None,
        }
    }

    /// Whose spec a run is taken to be when its log does not say, as logs written before the
    /// author was recorded do not: a process that drives runs submitted over the API takes
    /// them as a tenant's (the operator's, by default).
    pub fn with_unrecorded_trust(mut self, trust: rein_core::Trust) -> Self {
        self.unrecorded_trust = trust;
        self
    }

    /// Caps the runs of one tenant that [`Runtime::work_one`] claims while that many are being
    /// driven (by any process on the store), so its backlog leaves workers free for other
    /// tenants. Claims are fair either way: the next run claimed is the oldest of the tenant
    /// with the fewest runs being driven.
    pub fn with_runs_per_tenant(mut self, cap: Option<u32>) -> Self {
        self.per_tenant = cap;
        self
    }

    /// `tenant`'s secrets among `names`, opened for one call. A name the tenant has no secret
    /// of (or whose secret does not open, which is logged for the operator) is left out: the
    /// call then says it is not set. `Err` when the store could not be read.
    async fn open_secrets(&self, tenant: &TenantId, names: &[String]) -> Result<Secrets, ()> {
        if names.is_empty() {
            return Ok(Secrets::default());
        }
        let Some(key) = &self.secret_key else {
            tracing::warn!(
                tenant = tenant.as_str(),
                "a tenant's spec names secrets, but {SECRETS_KEY_ENV} is not set: none can be opened"
            );
            return Ok(Secrets::default());
        };
        let sealed = match self.store.sealed_secrets(tenant, names).await {
            Ok(sealed) => sealed,
            Err(e) => {
                tracing::warn!(tenant = tenant.as_str(), error = %e, "a tenant's secrets could not be read");
                return Err(());
            }
        };
        let mut open = HashMap::with_capacity(sealed.len());
        for (name, sealed) in sealed {
            match key.open(tenant, &name, &sealed) {
                Ok(value) => {
                    open.insert(name, value);
                }
                Err(e) => {
                    tracing::warn!(tenant = tenant.as_str(), error = %e, "a tenant's secret could not be opened")
                }
            }
        }
        Ok(Secrets::new(open))
    }

    /// The key tenants' secrets are sealed with ([`SecretKey::from_env`]): a tenant's spec's
    /// `${NAME}` and `api_key_env: NAME` are opened with it, for the call that sends them.
    pub fn with_secret_key(mut self, key: Option<SecretKey>) -> Self {
        self.secret_key = key;
        self
    }

    /// How this runtime finds the specs of worker agents (tools with `source: {agent: ...}`).
    pub fn with_workers(mut self, workers: Arc<dyn Workers>) -> Self {
        self.workers = Some(workers);
        self
    }

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

    /// Whether the budget counters are the store itself: a reservation is then written with the
    /// events before its call, and a settlement with the answer, in one transaction each.
    fn budget_in_store(&self) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.counters), Arc::as_ptr(&self.store))
    }

    /// This process's lease on a run, from now.
    fn fresh_lease(&self) -> rein_store::Lease<'_> {
        rein_store::Lease {
            owner: &self.owner,
            until_ms: now_ms() + self.lease_ms,
        }
    }

    /// Renews this process's lease on `run_id` until the keeper is dropped.
    fn keep_lease(&self, run_id: &RunId) -> LeaseKeeper<'_> {
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

    /// How long this process's leases on runs last unless renewed.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX).max(30);
        // Leases of another length are renewed on their own schedule.
        self.leases = Arc::default();
        self
    }

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
    async fn end_unrunnable(
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
    async fn end_orphan(
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
    async fn end_run(
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

    /// Enforces shared budgets: every model call reserves its worst case in every capped scope
    /// first, and is not made if any scope cannot cover it.
    ///
    /// The governor's counters also hold the tools' circuit breakers, so processes that share
    /// budgets share breakers too.
    pub fn with_governor(mut self, governor: Governor) -> Self {
        self.breakers = Arc::new(breakers::Breakers::new(
            governor.counters.clone(),
            self.meters.clone(),
        ));
        self.counters = governor.counters.clone();
        self.governor = governor.budgets.any().then_some(governor);
        self
    }

    /// Measures every run this runtime drives into `recorder` (tokens, cost, calls, latencies,
    /// outcomes; see `rein_core::meter`), from the events as they are made durable, plus the
    /// budget and circuit-breaker gauges.
    pub fn with_metrics(mut self, recorder: meters::Recorder) -> Self {
        self.meters = meters::Meters::new(recorder);
        self.breakers = Arc::new(breakers::Breakers::new(
            self.counters.clone(),
            self.meters.clone(),
        ));
        self
    }

    /// Exports the trace of every run this runtime drives to its end to `sink`, made from the
    /// run's whole log (`rein_core::spans`) once `run_finished` is durable.
    pub fn with_spans(mut self, sink: Arc<dyn rein_core::spans::SpanSink>) -> Self {
        self.spans = Some(sink);
        self
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

    /// Hands the trace of `run_id`, which has just ended, to the span sink. A log that cannot be
    /// read is not traced: tracing never fails a run.
    async fn trace_ended(&self, tenant: &TenantId, run_id: &RunId) {
        let Some(sink) = &self.spans else {
            return;
        };
        let Ok(sealed) = self.store.events(tenant, run_id).await else {
            return;
        };
        let Ok(events) = sealed
            .iter()
            .map(|e| e.decode())
            .collect::<Result<Vec<_>, _>>()
        else {
            return;
        };
        sink.export(rein_core::spans::spans(run_id, &events));
    }

    /// Enforces rate limits on model calls (in the governor's counters if one is set, so set
    /// the governor first).
    pub fn with_rate_limits(mut self, limits: RateLimits) -> Self {
        self.rate_limits = limits.any().then_some(limits);
        self
    }

    /// Caps concurrently executing runs per tenant (in the governor's counters if one is set,
    /// so set the governor first).
    pub fn with_bulkheads(mut self, bulkheads: Bulkheads) -> Self {
        self.bulkheads = bulkheads.any().then_some(bulkheads);
        self
    }

    /// Waits for one of `tenant`'s run slots for `id` (FIFO, bounded), if the tenant is capped.
    async fn enter_bulkhead(
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

    async fn leave_bulkhead(&self, tenant: &TenantId, id: &str) -> Result<(), RuntimeError> {
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

    /// Records each step's own overhead in [`RunOutcome::step_overheads_ns`] (benchmarks).
    pub fn with_step_timings(mut self, on: bool) -> Self {
        self.step_timings = on;
        self
    }

    /// The store runs are recorded in.
    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    /// Starts a run and drives it to its end. When the tenant's bulkhead is full the run waits
    /// for a slot in a first-come, first-served queue (or is refused with
    /// [`RuntimeError::Busy`] before anything is recorded).
    pub async fn run(
        &self,
        request: RunRequest,
        model: &dyn Model,
    ) -> Result<RunOutcome, RuntimeError> {
        self.run_streaming(request, model, None).await
    }

    /// [`Runtime::run`], handing the text of every answer to `sink` as the provider streams it.
    /// (Text of an attempt that then fails is not taken back.)
    pub async fn run_streaming(
        &self,
        request: RunRequest,
        model: &dyn Model,
        sink: Option<&TokenSink>,
    ) -> Result<RunOutcome, RuntimeError> {
        self.run_as(Runtime::new_run_id(), request, model, sink)
            .await
    }

    /// A new run id (UUIDv7: time-ordered).
    pub fn new_run_id() -> RunId {
        RunId::new(uuid::Uuid::now_v7().to_string())
    }

    /// [`Runtime::run_streaming`] under an id the caller chose (and may already have shown, so
    /// that a process killed mid-run can be resumed by it). The id must be new.
    pub async fn run_as(
        &self,
        run_id: RunId,
        request: RunRequest,
        model: &dyn Model,
        sink: Option<&TokenSink>,
    ) -> Result<RunOutcome, RuntimeError> {
        let tenant = request.tenant.clone();
        let lease = run_lease_ms(&request.agent);
        self.enter_bulkhead(&tenant, run_id.as_str(), lease).await?;
        let outcome = self
            .run_admitted(run_id.clone(), request, model, sink, None, None)
            .await;
        self.leave_bulkhead(&tenant, run_id.as_str()).await?;
        outcome
    }

    /// A run already admitted by its tenant's bulkhead (a worker's run is admitted with its
    /// caller's: the tree holds one slot, so a full bulkhead cannot deadlock it).
    async fn run_admitted(
        &self,
        run_id: RunId,
        request: RunRequest,
        model: &dyn Model,
        sink: Option<&TokenSink>,
        parent: Option<ParentLink>,
        caller_cancel: Option<Arc<std::sync::OnceLock<String>>>,
    ) -> Result<RunOutcome, RuntimeError> {
        let agent = request.agent.clone();
        let (tenant, user, session) = (
            request.tenant.clone(),
            request.user.clone(),
            request.session.clone(),
        );
        let (trace, _) = rein_core::spans::run_trace(&run_id, request.trace_parent.as_deref());
        let (info, kinds) = self.first_events(&run_id, request, parent).await?;
        let mut driver = Driver {
            runtime: self,
            model,
            sink,
            tenant: tenant.clone(),
            user,
            session,
            run_id: run_id.clone(),
            engine: Engine::new(agent),
            prev_hash: rein_core::GENESIS_HASH.to_string(),
            next_seq: 0,
            overheads: Vec::new(),
            detail: None,
            models_used: Default::default(),
            unsaved: Vec::new(),
            unstored: None,
            meter: None,
            unmeasured: Vec::new(),
            trace,
            cancel: None,
            caller_cancel,
        };
        driver.start(info, kinds)?;
        let keeper = self.keep_lease(&run_id);
        let outcome = driver.drive().await;
        drop(keeper);
        log_outcome(&tenant, &run_id, &driver.trace, &outcome);
        // No worker claims an ended run, so its lease needs no release: one write fewer per
        // run (a gateway call is a whole run).
        if matches!(&outcome, Ok(o) if o.status.is_terminal()) {
            self.trace_ended(&tenant, &run_id).await;
        } else {
            self.store.release(&run_id, &self.owner).await?;
        }
        outcome
    }

    /// A new run's identity and the events its log starts with: `run_started`, and the
    /// session's conversation when the spec continues sessions.
    async fn first_events(
        &self,
        run_id: &RunId,
        request: RunRequest,
        parent: Option<ParentLink>,
    ) -> Result<(RunInfo, Vec<EventKind>), RuntimeError> {
        let spec = &request.agent.spec;
        // A secret pasted into the input is kept out of the store, the log and the model's
        // view alike: the run row and `run_started` hold the same redacted text, so every view
        // shows it and the audit finds them equal.
        let input = if spec.guards.output.secrets == rein_core::sanitize::Action::Off {
            request.input.clone()
        } else {
            rein_core::sanitize::redact_secrets(&request.input).0
        };
        let info = RunInfo {
            id: run_id.clone(),
            tenant: request.tenant.clone(),
            user: request.user.clone(),
            session: request.session.clone(),
            job: request.job.clone(),
            agent: spec.name.clone(),
            agent_version: spec.version,
            spec: request.spec_source.clone(),
            input: input.clone(),
            created_ms: now_ms(),
            parent: parent.as_ref().map(|p| p.run_id.clone()),
        };
        let context = match spec.session {
            Some(policy) => {
                // Context beyond a quarter of the run's token cap is summarized too: a long
                // conversation must not crowd out the run's own work.
                let budget = spec.limits.max_total_tokens / 4;
                self.session_context(&request.tenant, &request.session, policy.ttl, budget)
                    .await?
            }
            None => None,
        };
        let kinds = std::iter::once(EventKind::RunStarted {
            agent: spec.name.clone(),
            agent_version: spec.version,
            spec_sha256: rein_core::event::sha256_hex(request.spec_source.as_bytes()),
            input,
            tenant: request.tenant,
            user: request.user,
            session: request.session,
            job: request.job,
            granted_scopes: request.granted_scopes,
            trace_parent: request.trace_parent,
            fence: spec
                .guards
                .fences(&spec.tools)
                .then(fence_boundary)
                .flatten(),
            parent,
            trust: Some(request.trust),
        })
        .chain(context)
        .chain(request.chat.map(|mut chat| {
            // A gateway call's conversation is its input: its secrets are kept out as well.
            if spec.guards.output.secrets != rein_core::sanitize::Action::Off {
                for message in &mut chat.messages {
                    if let Some(text) = message.content.as_mut() {
                        *text = rein_core::sanitize::redact_secrets(text).0;
                    }
                }
            }
            EventKind::ChatRequest(chat)
        }))
        .collect();
        Ok((info, kinds))
    }

    /// The conversation a new run of `session` continues: the context of the session's latest
    /// run, plus that run's own turn (its input and answer). A session idle past `ttl` is
    /// closed, and a conversation longer than `max_tokens` (estimated) is condensed: either
    /// way the new run starts by summarizing it.
    async fn session_context(
        &self,
        tenant: &TenantId,
        session: &SessionId,
        ttl: Duration,
        max_tokens: u64,
    ) -> Result<Option<EventKind>, RuntimeError> {
        let Some(last) = self.store.latest_in_session(tenant, session).await? else {
            return Ok(None);
        };
        let events = self.store.events(tenant, &last.info.id).await?;
        let mut messages = Vec::new();
        let mut summarized = false;
        for sealed in &events {
            match sealed.decode()?.kind {
                EventKind::SessionContext {
                    messages: earlier,
                    summarize,
                } => {
                    // Kept even when a summary was due: if it never arrived (the call failed,
                    // the run crashed), the raw conversation is still there to carry on.
                    summarized = summarize;
                    messages = earlier;
                }
                // A summarized run's first answer is the summary it continued from.
                EventKind::ModelResponded { content, .. } if summarized => {
                    messages = vec![rein_core::engine::session_summary_message(
                        content.as_deref().unwrap_or_default(),
                    )];
                    summarized = false;
                }
                _ => {}
            }
        }
        if let (RunStatus::Completed, Some(output)) = (last.progress.status, &last.progress.output)
        {
            let answer = match output {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            messages.push(rein_core::Message::text(
                rein_core::Role::User,
                last.info.input.clone(),
            ));
            messages.push(rein_core::Message::text(rein_core::Role::Assistant, answer));
        }
        if messages.is_empty() {
            return Ok(None);
        }
        let idle_ms = now_ms() - last.updated_ms;
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let tokens: u64 = messages
            .iter()
            .map(|m| rein_core::estimate_tokens(m.content.as_deref().unwrap_or_default()))
            .sum();
        Ok(Some(EventKind::SessionContext {
            messages,
            summarize: idle_ms >= ttl_ms || tokens > max_tokens,
        }))
    }

    /// Continues a run from its log (after a crash, or a run left `running`), under the spec
    /// the run pinned when it started: changing a spec file never changes a running run's limits.
    pub async fn resume(
        &self,
        tenant: &TenantId,
        run_id: &RunId,
        prices: &PriceTable,
        model: &dyn Model,
    ) -> Result<RunOutcome, RuntimeError> {
        self.continue_run(tenant, run_id, prices, model, None, now_ms())
            .await
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

    /// Records a person's decision on the run's pending approval, then drives the run on: an
    /// approved call is made, a denied one is reported to the model as refused (or ends the
    /// run, per the spec's `approval.on_deny`). A run not awaiting approval is left untouched.
    pub async fn decide(
        &self,
        tenant: &TenantId,
        run_id: &RunId,
        prices: &PriceTable,
        model: &dyn Model,
        decision: Decision,
    ) -> Result<RunOutcome, RuntimeError> {
        self.continue_run(tenant, run_id, prices, model, Some(decision), now_ms())
            .await
    }

    async fn continue_run(
        &self,
        tenant: &TenantId,
        run_id: &RunId,
        prices: &PriceTable,
        model: &dyn Model,
        decision: Option<Decision>,
        lease_as_of: i64,
    ) -> Result<RunOutcome, RuntimeError> {
        // The lease first: the log read below is then the one this process continues.
        let record = self.store.run(tenant, run_id).await?;
        if let Some(caller) = &record.info.parent {
            return Err(RuntimeError::WorkerRun {
                run: run_id.clone(),
                caller: caller.clone(),
            });
        }
        // An ended run (cancelled while it waited, say) takes no decision: there is nothing
        // left to approve.
        if decision.is_some() && record.progress.status.is_terminal() {
            return Err(RuntimeError::Ended(run_id.clone(), record.progress.status));
        }
        let now = lease_as_of;
        self.leased(
            run_id,
            now,
            self.continue_leased(tenant, run_id, record, prices, model, decision),
        )
        .await
    }

    /// Does `work` under this process's lease on `run_id`, taken as of `now_ms` (`i64::MAX`:
    /// whoever holds it), renewed meanwhile and released after on every path; a failure to
    /// release only delays others by one lease. [`RuntimeError::Leased`] if another process
    /// holds it.
    async fn leased<T>(
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

    async fn continue_leased(
        &self,
        tenant: &TenantId,
        run_id: &RunId,
        record: rein_store::RunRecord,
        prices: &PriceTable,
        model: &dyn Model,
        decision: Option<Decision>,
    ) -> Result<RunOutcome, RuntimeError> {
        let builtins = self.tools.builtins().infos();
        let ctx = CheckContext {
            prices,
            builtin_tools: &builtins,
        };
        let agent = Agent::parse(
            &format!("run {run_id} (pinned spec)"),
            &record.info.spec,
            &ctx,
        )
        .map_err(RuntimeError::PinnedSpec)?;
        self.drive_logged(tenant, run_id, record, agent, model, decision, None, true)
            .await
    }

    /// Continues a worker agent's run that its caller started before a crash, as `agent` (its
    /// pinned spec, fitted to the budget its caller gave it), under the caller's cancellation
    /// and bulkhead slot. The caller's driver holds the whole tree, so it takes the worker's
    /// lease whoever held it: that process is gone with the caller's, and no other process
    /// claims a worker's run.
    pub(crate) async fn continue_worker(
        &self,
        tenant: &TenantId,
        run_id: &RunId,
        record: rein_store::RunRecord,
        agent: Agent,
        model: &dyn Model,
        caller_cancel: Option<Arc<std::sync::OnceLock<String>>>,
    ) -> Result<RunOutcome, RuntimeError> {
        let drive = self.drive_logged(
            tenant,
            run_id,
            record,
            agent,
            model,
            None,
            caller_cancel,
            false,
        );
        self.leased(run_id, i64::MAX, drive).await
    }

    /// Drives a leased run on from its log as `agent`, in a bulkhead slot of its own
    /// (`own_slot`), or in its caller's (a worker's run).
    #[allow(clippy::too_many_arguments)]
    async fn drive_logged(
        &self,
        tenant: &TenantId,
        run_id: &RunId,
        record: rein_store::RunRecord,
        agent: Agent,
        model: &dyn Model,
        decision: Option<Decision>,
        caller_cancel: Option<Arc<std::sync::OnceLock<String>>>,
        own_slot: bool,
    ) -> Result<RunOutcome, RuntimeError> {
        let sealed = self.store.events(tenant, run_id).await?;
        let events = sealed
            .iter()
            .map(|e| e.decode())
            .collect::<Result<Vec<_>, _>>()?;
        let lease = run_lease_ms(&agent);
        let engine = Engine::replay(Arc::new(agent), &events)?;
        let decided = match (&decision, engine.pending_approval()) {
            (None, _) => None,
            (Some(d), Some(pending)) => Some(pending.decided(d.approved, &d.by, d.reason.clone())),
            (Some(_), None) => return Err(RuntimeError::NotAwaitingApproval(run_id.clone())),
        };
        if own_slot {
            self.enter_bulkhead(tenant, run_id.as_str(), lease).await?;
        }
        let mut driver = Driver {
            runtime: self,
            model,
            sink: None,
            tenant: tenant.clone(),
            user: record.info.user.clone(),
            session: record.info.session.clone(),
            run_id: run_id.clone(),
            engine,
            prev_hash: sealed
                .last()
                .map_or_else(|| rein_core::GENESIS_HASH.to_string(), |e| e.hash.clone()),
            next_seq: sealed.len() as u64,
            overheads: Vec::new(),
            detail: None,
            models_used: Default::default(),
            unsaved: Vec::new(),
            unstored: None,
            meter: None,
            unmeasured: Vec::new(),
            trace: rein_core::spans::log_trace(run_id, &events).0,
            // A request to cancel the run made while another process drove it.
            cancel: record
                .cancel_requested_by
                .clone()
                .map(|by| Arc::new(std::sync::OnceLock::from(by))),
            caller_cancel,
        };
        if self.meters.on() {
            // What the log already holds was measured when it was written.
            let mut meter = RunMeter::new(tenant.as_str(), &record.info.agent);
            events.iter().for_each(|e| meter.replay(e));
            driver.meter = Some(meter);
        }
        for event in &events {
            match &event.kind {
                EventKind::ModelResponded { model, .. } => {
                    *driver.models_used.entry(model.clone()).or_default() += 1;
                }
                EventKind::RunFinished { detail, .. } => driver.detail = detail.clone(),
                _ => {}
            }
        }
        let outcome = async {
            // Taken up from the queue, or by another process after the one driving it stopped:
            // the time it waited is not the run's (an approval's wait is counted out by its
            // decision). Taken up again by the process that last took it (after an error of
            // its own), its clock runs on: a run failing over and over still times out.
            let holder = shown_holder(&self.owner);
            let claim = match record.progress.status {
                RunStatus::Queued => true,
                RunStatus::Running => driver.engine.last_claimed_by() != Some(holder),
                _ => false,
            };
            if claim {
                driver
                    .record(EventKind::RunClaimed {
                        by: holder.to_string(),
                    })
                    .await?;
            }
            driver.settle_leftovers(&events).await?;
            if let Some(kind) = decided {
                driver.record(kind).await?;
            }
            if interrupted_gateway_call(&events) {
                // Its caller waited on a connection that the crash closed: no one would receive
                // the answer of a model call made now, so none is made and the run ends.
                driver
                    .record(EventKind::RunFinished {
                        status: RunStatus::Failed,
                        reason: TerminationReason::Error,
                        detail: Some(
                            "the gateway call was interrupted before the model answered (the \
                             process serving it stopped); its caller got no answer, so it is \
                             not called again"
                                .into(),
                        ),
                        output: None,
                    })
                    .await?;
            }
            driver.drive().await
        }
        .await;
        log_outcome(tenant, run_id, &driver.trace, &outcome);
        if matches!(&outcome, Ok(o) if o.status.is_terminal()) {
            self.trace_ended(tenant, run_id).await;
        }
        if own_slot {
            self.leave_bulkhead(tenant, run_id.as_str()).await?;
        }
        outcome
    }
}

/// A run this process drives, registered for cancellation while the guard lives.
struct Driving<'a> {
    runtime: &'a Runtime,
    run_id: RunId,
    flag: Arc<std::sync::OnceLock<String>>,
}

impl<'a> Driving<'a> {
    /// Registers the run, with `flag` if it has one already (a request to cancel it found in
    /// the store when this process took it up).
    fn register(
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
    fn requested(&self) -> Option<String> {
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

/// One run being driven.
struct Driver<'a> {
    runtime: &'a Runtime,
    model: &'a dyn Model,
    sink: Option<&'a TokenSink>,
    tenant: TenantId,
    user: UserId,
    session: SessionId,
    run_id: RunId,
    engine: Engine,
    prev_hash: String,
    next_seq: u64,
    overheads: Vec<u64>,
    detail: Option<String>,
    models_used: std::collections::BTreeMap<String, u32>,
    /// Events sealed and folded into the engine but not yet in the store: they are written
    /// with the next event that must be durable (before any call goes out, and at the end).
    unsaved: Vec<rein_core::SealedEvent>,
    /// A new run not yet in the store: it goes in with the first events written, under a
    /// fresh lease (one write fewer per run; nothing outside the run acts before then).
    unstored: Option<RunInfo>,
    /// The run's meter, when the runtime measures runs.
    meter: Option<RunMeter>,
    /// The run's trace id (its own, or the caller's it continues).
    trace: [u8; 16],
    /// What the staged events add to the metrics, applied once they are durable.
    unmeasured: Vec<Measure>,
    /// Who asked to cancel this run, once someone has (set while it is driven; before, a
    /// request found in the store when this process took the run up).
    cancel: Option<Arc<std::sync::OnceLock<String>>>,
    /// For a worker's run: its caller's cancel flag (a cancelled caller stops its workers).
    caller_cancel: Option<Arc<std::sync::OnceLock<String>>>,
}

impl Driver<'_> {
    /// Who wrote the run's spec: as its log says, else as this runtime assumes.
    fn trust(&self) -> rein_core::Trust {
        self.engine.trust().unwrap_or(self.runtime.unrecorded_trust)
    }

    /// Records a connection the egress policy refused; the address goes to the operator's log
    /// only (the tenant sees the host and the kind of range).
    async fn egress_refused(
        &mut self,
        step: u32,
        target: &str,
        refusal: &rein_core::egress::EgressRefusal,
    ) -> Result<(), RuntimeError> {
        tracing::warn!(
            tenant = self.tenant.as_str(),
            run_id = self.run_id.as_str(),
            target,
            host = refusal.host.as_str(),
            address = %refusal.address,
            "the egress policy refused a tenant's connection"
        );
        self.record(EventKind::EgressRefused {
            step,
            target: target.to_string(),
            host: refusal.host.clone(),
            range: refusal.range.to_string(),
        })
        .await
        .map(|_| ())
    }

    async fn drive(&mut self) -> Result<RunOutcome, RuntimeError> {
        let cancel = Driving::register(self.runtime, &self.run_id, self.cancel.take());
        self.cancel = Some(cancel.flag.clone());
        let mut carried = Duration::ZERO;
        let mut awaiting = None;
        while let Some(effect) = self.engine.next_effect(now_ms()) {
            let by_caller = || {
                let by = self.caller_cancel.as_ref()?.get()?;
                Some(format!("{by} (who cancelled its caller)"))
            };
            if let Some(by) = cancel.requested().or_else(by_caller) {
                self.record(EventKind::RunFinished {
                    status: RunStatus::Cancelled,
                    reason: TerminationReason::Cancelled,
                    detail: Some(format!("cancelled by {by} while it ran")),
                    output: None,
                })
                .await?;
                continue;
            }
            let started = Instant::now();
            let io = match effect {
                Effect::AwaitApproval(pending) => {
                    awaiting = Some(pending);
                    break;
                }
                Effect::Record(kind) => {
                    self.record(kind).await?;
                    carried += started.elapsed();
                    continue;
                }
                Effect::CheckContent(check) => {
                    let agent = self.engine.agent().clone();
                    let off_thread = check.clone();
                    let verdict =
                        tokio::task::spawn_blocking(move || off_thread.verdict(&agent.spec.guards))
                            .await;
                    let kind = match verdict {
                        Ok(kind) => kind,
                        // The blocking pool is gone (shutdown): check here instead.
                        Err(_) => check.verdict(&self.engine.agent().spec.guards),
                    };
                    self.record(kind).await?;
                    carried += started.elapsed();
                    continue;
                }
                Effect::CallModel(call) => self.call_model(call).await?,
                Effect::CallTool(invocation) => self.call_tool(invocation).await?,
            };
            if self.runtime.step_timings {
                let own = started.elapsed().saturating_sub(io) + carried;
                self.overheads
                    .push(u64::try_from(own.as_nanos()).unwrap_or(u64::MAX));
            }
            carried = Duration::ZERO;
        }
        self.save().await?;
        let (status, reason) = match (self.engine.outcome(), &awaiting) {
            (Some((status, reason)), _) => (status, Some(reason)),
            (None, Some(_)) => (RunStatus::AwaitingApproval, None),
            (None, None) => (RunStatus::Failed, Some(TerminationReason::Error)),
        };
        if status.is_terminal() {
            // Workers a crash left running, which this run ended without continuing (it was
            // cancelled, or ran out of time, first): no one else would ever end them.
            let orphans = self.engine.unfinished_workers();
            if !orphans.is_empty() {
                self.runtime
                    .end_orphaned_workers(&self.tenant, &self.run_id, orphans)
                    .await;
            }
        }
        Ok(RunOutcome {
            run_id: self.run_id.clone(),
            status,
            reason,
            awaiting,
            // What the store shows: a run's detail is its `run_finished`'s.
            detail: self.detail.take(),
            iterations: self.engine.iterations(),
            tool_calls: self.engine.tool_calls(),
            usage: self.engine.usage(),
            cost: self.engine.cost(),
            output: self.engine.output().cloned(),
            models_used: std::mem::take(&mut self.models_used),
            events: self.next_seq,
            step_overheads_ns: std::mem::take(&mut self.overheads),
        })
    }

    /// Folds the run's first events (`run_started`, the session's context if any, the
    /// caller's conversation) into the engine and stages them: the run is stored with them
    /// and whatever follows them up to the first event that must be durable.
    fn start(&mut self, info: RunInfo, kinds: Vec<EventKind>) -> Result<(), RuntimeError> {
        for (event, one) in seal_first(&self.run_id, info.created_ms, kinds) {
            self.engine.apply(&event)?;
            self.measure(&event);
            self.unsaved.push(one);
        }
        self.prev_hash = self
            .unsaved
            .last()
            .map_or_else(|| rein_core::GENESIS_HASH.to_string(), |e| e.hash.clone());
        self.next_seq = self.unsaved.len() as u64;
        self.unstored = Some(info);
        Ok(())
    }

    /// Seals `kind` into the chain, folds it into the engine and makes it durable, with any
    /// event staged before it.
    async fn record(&mut self, kind: EventKind) -> Result<(), RuntimeError> {
        self.stage(kind)?;
        self.save().await
    }

    /// Writes the staged events, in one go (with the run itself, the first time).
    async fn save(&mut self) -> Result<(), RuntimeError> {
        let store = &self.runtime.store;
        if let Some((info, lease)) = self.new_run() {
            store.create_run(info, &self.unsaved, lease).await?;
        } else if !self.unsaved.is_empty() {
            store.append_all(&self.tenant, &self.unsaved).await?;
        }
        self.saved();
        Ok(())
    }

    /// The run's end, when recording it is all the engine does next and nobody asked to
    /// cancel the run.
    fn ending(&self) -> Option<EventKind> {
        let cancelled = [&self.cancel, &self.caller_cancel]
            .into_iter()
            .flatten()
            .any(|flag| flag.get().is_some());
        match self.engine.next_effect(now_ms()) {
            Some(Effect::Record(kind @ EventKind::RunFinished { .. })) if !cancelled => Some(kind),
            _ => None,
        }
    }

    /// The new run, if it is not stored yet, with the lease it is stored under.
    fn new_run(&self) -> Option<(&RunInfo, Option<rein_store::Lease<'_>>)> {
        let info = self.unstored.as_ref()?;
        Some((info, Some(self.runtime.fresh_lease())))
    }

    /// What [`Driver::save`] does after the staged events are written.
    fn saved(&mut self) {
        self.unstored = None;
        self.unsaved.clear();
        self.runtime
            .meters
            .apply(std::mem::take(&mut self.unmeasured));
    }

    /// Seals `kind` into the chain and folds it into the engine; it is written with the next
    /// [`Driver::record`] (or [`Driver::save`]). Only for an event that nothing outside the run
    /// acts on before that: a crash in between loses it as if it had not happened, and the
    /// run resumes from the event before it.
    fn stage(&mut self, kind: EventKind) -> Result<(), RuntimeError> {
        let event = self.seal(kind);
        self.fold(&event)
    }

    /// Seals `kind` into the chain and stages it, without folding it into the engine yet.
    fn seal(&mut self, mut kind: EventKind) -> Event {
        // A handoff says where the whole story is: the run's trace.
        if let EventKind::RunFinished {
            reason: TerminationReason::Escalated,
            output: Some(output),
            ..
        } = &mut kind
            && let Some(handoff) = output.get_mut("handoff").and_then(Value::as_object_mut)
        {
            let id = self.run_id.as_str();
            handoff.insert(
                "trace".into(),
                serde_json::json!({
                    "run_id": id,
                    "cli": format!("rein runs show {id}"),
                    "api": format!("/v1/runs/{id}/trace"),
                }),
            );
        }
        if let EventKind::ModelResponded { model, .. } = &kind {
            *self.models_used.entry(model.clone()).or_default() += 1;
        }
        if let EventKind::RunFinished { detail, .. } = &kind {
            self.detail = detail.clone();
        }
        let event = Event {
            seq: self.next_seq,
            ts_ms: now_ms(),
            kind,
        };
        let sealed = event.seal(&self.run_id, &self.prev_hash);
        self.prev_hash = sealed.hash.clone();
        self.next_seq += 1;
        self.unsaved.push(sealed);
        event
    }

    /// Folds a sealed event into the engine and the run's meter.
    fn fold(&mut self, event: &Event) -> Result<(), RuntimeError> {
        self.engine.apply(event)?;
        self.measure(event);
        Ok(())
    }

    /// Takes the events sealed since `mark` (`next_seq` and `prev_hash` then) back out of the
    /// chain; they were neither written nor folded.
    fn unseal(&mut self, (seq, hash): (u64, String)) {
        let sealed = usize::try_from(self.next_seq - seq).unwrap_or(usize::MAX);
        self.unsaved
            .truncate(self.unsaved.len().saturating_sub(sealed));
        self.next_seq = seq;
        self.prev_hash = hash;
    }

    /// Folds a staged event into the run's meter; what it adds is applied once it is durable.
    fn measure(&mut self, event: &Event) {
        if !self.runtime.meters.on() {
            return;
        }
        let meter = self.meter.get_or_insert_with(|| {
            RunMeter::new(self.tenant.as_str(), &self.engine.agent().spec.name)
        });
        self.unmeasured.extend(meter.observe(event));
    }

    /// Time left before the run's wall-clock limit.
    fn remaining(&self) -> Duration {
        let left = self.engine.deadline_ms().map_or(i64::MAX, |d| d - now_ms());
        Duration::from_millis(u64::try_from(left).unwrap_or(0))
    }

    /// Reserves the worst case of `call` in every capped shared scope and records the call as
    /// requested (`model_requested`, with the staged events and `budget_reserved` before it).
    /// Returns the reservation to settle, or `Err(())` inside `Ok` when a scope refused (the
    /// refusal is recorded instead, and the engine ends the run).
    async fn reserve(
        &mut self,
        call: &ModelCall,
    ) -> Result<Result<Option<(String, Vec<Scope>)>, ()>, RuntimeError> {
        let governor = self.runtime.governor.clone();
        let now = now_ms();
        let scopes = governor.as_ref().map_or_else(Vec::new, |g| {
            g.budgets
                .policy(&self.tenant)
                .scopes(&self.tenant, &self.user, &self.session, now)
        });
        let Some(governor) = governor.filter(|_| !scopes.is_empty()) else {
            self.record(call.requested()).await?;
            return Ok(Ok(None));
        };
        let amount = Amount {
            usd: call.worst_case_cost,
            tokens: call.estimated_input_tokens + u64::from(call.max_output_tokens),
        };
        let id = uuid::Uuid::now_v7().to_string();
        let hold = Hold {
            id: &id,
            scopes: &scopes,
            amount,
            now_ms: now,
            expires_ms: self
                .engine
                .deadline_ms()
                .unwrap_or(now)
                .saturating_add(RESERVATION_GRACE_MS),
        };
        let reserved = EventKind::BudgetReserved {
            step: call.step,
            reservation: id.clone(),
            scopes: scopes.iter().map(|s| s.key.clone()).collect(),
            amount,
        };
        let answer = if self.runtime.budget_in_store() {
            // One transaction: the hold, and the events up to the call's `model_requested`
            // (folded into the engine only once they are written).
            let mark = (self.next_seq, self.prev_hash.clone());
            let events = [self.seal(reserved), self.seal(call.requested())];
            let store = &self.runtime.store;
            let answer = store
                .reserve_and_write(&self.tenant, self.new_run(), &self.unsaved, hold)
                .await?;
            if answer == Reservation::Granted {
                for event in &events {
                    self.fold(event)?;
                }
                self.saved();
                return Ok(Ok(Some((id, scopes))));
            }
            self.unseal(mark);
            answer
        } else {
            let answer = governor
                .counters
                .reserve(hold.id, hold.scopes, amount, now, hold.expires_ms)
                .await?;
            if answer == Reservation::Granted {
                // Written with the call's `model_requested`, before the call goes out.
                self.stage(reserved)?;
                self.record(call.requested()).await?;
                return Ok(Ok(Some((id, scopes))));
            }
            answer
        };
        if let Reservation::Refused { scope, standing } = answer {
            self.record(EventKind::BudgetRefused {
                step: call.step,
                scope,
                standing,
                amount,
            })
            .await?;
        }
        Ok(Err(()))
    }

    /// Settles every reservation the log shows as held but not settled (the process stopped,
    /// or the counters failed, in between), with the cost the log recorded for its step, or
    /// nothing if the call was never answered. Settling is idempotent, so a settlement that
    /// landed just before the crash is not counted twice.
    async fn settle_leftovers(&mut self, events: &[Event]) -> Result<(), RuntimeError> {
        let settled: std::collections::HashSet<&str> = events
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::BudgetSettled { reservation, .. } => Some(reservation.as_str()),
                _ => None,
            })
            .collect();
        let open: Vec<(u32, String, Vec<String>)> = events
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::BudgetReserved {
                    step,
                    reservation,
                    scopes,
                    ..
                } if !settled.contains(reservation.as_str()) => {
                    Some((*step, reservation.clone(), scopes.clone()))
                }
                _ => None,
            })
            .collect();
        for (step, id, keys) in open {
            let spent = events
                .iter()
                .rev()
                .find_map(|e| match &e.kind {
                    EventKind::ModelResponded {
                        step: s,
                        usage,
                        cost,
                        ..
                    } if *s == step => Some(Amount {
                        usd: *cost,
                        tokens: usage.total(),
                    }),
                    _ => None,
                })
                .unwrap_or_default();
            let scopes: Vec<Scope> = keys
                .into_iter()
                .map(|key| Scope {
                    key,
                    cap: Default::default(),
                })
                .collect();
            self.runtime.counters.settle(&id, &scopes, spent).await?;
            self.record(EventKind::BudgetSettled {
                step,
                reservation: id,
                amount: spent,
            })
            .await?;
        }
        Ok(())
    }

    /// Records a `budget_warning` for each scope whose warning line this settlement crossed.
    async fn warn_on_crossing(
        &mut self,
        governor: &Governor,
        scopes: Vec<Scope>,
        standings: Vec<Standing>,
        spent: Amount,
    ) -> Result<(), RuntimeError> {
        self.runtime.meters.apply(
            scopes.iter().zip(&standings).flat_map(|(scope, standing)| {
                rein_core::meter::budget_utilisation(scope, standing)
            }),
        );
        let percent = governor.budgets.warn_percent;
        for (scope, after) in budget::warnings(&scopes, &standings, &spent, percent) {
            self.record(EventKind::BudgetWarning {
                scope: scope.clone(),
                spent: after,
                percent,
            })
            .await?;
        }
        Ok(())
    }

    /// Takes `call` from every rate limit it falls under, waiting when the policy allows.
    /// Returns false when it was rejected (recorded; the engine ends the run).
    async fn throttle(&mut self, call: &ModelCall) -> Result<bool, RuntimeError> {
        let Some(limits) = self.runtime.rate_limits.clone() else {
            return Ok(true);
        };
        let tokens = call.estimated_input_tokens + u64::from(call.max_output_tokens);
        for (key, limit, amount) in limits.takes(&self.tenant, &self.user, &self.session, tokens) {
            loop {
                let now = now_ms();
                let counters = self.runtime.counters.clone();
                let (take, _) = cells::update(counters.as_ref(), &key, |s: &RateState| {
                    s.take(&limit, amount, now)
                })
                .await?;
                let wait_ms = match take {
                    Take::Granted => break,
                    Take::Wait { wait_ms } => wait_ms,
                    Take::TooLarge => 0,
                };
                let left = i64::try_from(self.remaining().as_millis()).unwrap_or(i64::MAX);
                let delay = match limits.over_limit {
                    OverLimit::Delay { max_wait_ms } => {
                        wait_ms > 0 && wait_ms <= max_wait_ms && wait_ms < left
                    }
                    OverLimit::Reject => false,
                };
                self.record(EventKind::RateLimited {
                    step: call.step,
                    scope: key.clone(),
                    wait_ms,
                    delayed: delay,
                })
                .await?;
                if !delay {
                    return Ok(false);
                }
                tokio::time::sleep(Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0)))
                    .await;
            }
        }
        Ok(true)
    }

    /// Returns the time spent waiting on the provider (attempts and backoff).
    async fn call_model(&mut self, call: ModelCall) -> Result<Duration, RuntimeError> {
        if !self.throttle(&call).await? {
            return Ok(Duration::ZERO);
        }
        let reservation = match self.reserve(&call).await? {
            Ok(reservation) => reservation,
            Err(()) => return Ok(Duration::ZERO),
        };
        let agent = self.engine.agent().clone();
        let spec = &agent.spec;
        let model = self.model;
        let sink = self.sink;
        let started = Instant::now();
        let chain = spec.model.step_chain(call.kind);
        // A summary and a judge's verdict are asked for without tools or the answer's schema.
        let summary = matches!(
            call.kind,
            rein_core::spec::StepKind::Summarize | rein_core::spec::StepKind::Judge
        );
        let mut answered: Option<(&str, rein_core::ModelReply, u32)> = None;
        let mut last_failure: Option<(&str, ModelError, u32)> = None;
        let mut open_breakers = 0;
        for (index, &model_ref) in chain.iter().enumerate() {
            let entry = model_ref.id.as_str();
            let has_next = index + 1 < chain.len();
            // One breaker per tenant and provider/model (and server), shared by the tenant's
            // runs in every process: a provider that keeps failing is skipped without a network
            // attempt. Per tenant, since its policy (`model.breaker`, `model.timeout`) is the
            // spec's: one tenant's hair trigger must not stop another tenant's calls.
            let breaker = format!(
                "breaker:model:{}:{}",
                key_part(self.tenant.as_str()),
                key_part(&model_ref.endpoint_key())
            );
            let probe_ms = i64::try_from(spec.model.timeout.as_millis()).unwrap_or(i64::MAX);
            let policy = spec.model.breaker;
            let admission = self
                .runtime
                .breakers
                .admit(&breaker, &policy, now_ms(), probe_ms)
                .await
                .unwrap_or(Admission::Allowed);
            if let Admission::Refused { retry_in_ms } = admission {
                open_breakers += 1;
                self.record(EventKind::ModelFellBack {
                    step: call.step,
                    model: entry.to_string(),
                    reason: format!(
                        "its circuit breaker is open (about {} s to the next probe)",
                        (retry_in_ms + 999) / 1000
                    ),
                })
                .await?;
                continue;
            }

            // A map-form entry's own server gets the entry's own key, looked up now: from the
            // environment for the operator's spec, from the tenant's secrets for a tenant's,
            // whose call also goes through the egress policy.
            let runtime = self.runtime;
            let tenant_spec = self.trust() == rein_core::Trust::Tenant;
            let mut endpoint_key = None;
            let mut refusal = None;
            let mut key_unread = false;
            if let Some(base_url) = model_ref.base_url.as_deref() {
                let var = model_ref.api_key_env.as_deref();
                if tenant_spec {
                    refusal = runtime.tools.egress().check_url(base_url).err();
                    if let Some(var) = var {
                        let names = [var.to_string()];
                        match runtime.open_secrets(&self.tenant, &names).await {
                            Ok(secrets) => endpoint_key = secrets.get(var).map(str::to_string),
                            // Not sent without its key: the store will answer again.
                            Err(()) => key_unread = true,
                        }
                    }
                } else {
                    endpoint_key = var
                        .and_then(|v| std::env::var(v).ok())
                        .filter(|k| !k.is_empty());
                }
            }
            let endpoint = model_ref.base_url.as_deref().map(|base_url| Endpoint {
                base_url,
                api_key: endpoint_key.as_deref(),
                http: tenant_spec.then(|| runtime.tools.egress().client()),
            });
            let outcome = {
                let request = ModelRequest {
                    // The full `provider/model`: a router sends it to its provider, which
                    // strips its own prefix.
                    model: entry,
                    messages: self.engine.messages(),
                    tools: if summary {
                        &[]
                    } else {
                        self.engine.tool_definitions()
                    },
                    max_output_tokens: call.max_output_tokens,
                    temperature: self.engine.temperature(),
                    output_schema: self.engine.output_schema().filter(|_| !summary),
                    tool_choice: call.tool_choice.as_ref(),
                    endpoint,
                };
                with_retries(
                    &Backoff {
                        max_attempts: spec.model.retry.max_attempts,
                        base: spec.model.retry.backoff,
                        cap: spec.model.retry.max_backoff,
                    },
                    self.remaining(),
                    spec.model.timeout,
                    || match (&refusal, sink) {
                        (None, _) if key_unread => {
                            let unread = ModelError::new(
                                ErrorType::Transient,
                                "the model's key could not be read; the same call may work later",
                            );
                            Box::pin(std::future::ready(Err(unread)))
                        }
                        (Some(refusal), _) => {
                            // Refused as the client refuses a name, and recorded the same way.
                            let refused = ModelError::refused(refusal.clone());
                            Box::pin(std::future::ready(Err(refused)))
                        }
                        (None, Some(sink)) => model.complete_streaming(request, sink),
                        (None, None) => model.complete(request),
                    },
                    |result: &Result<_, ModelError>| match result {
                        Err(e) if e.is_retryable() => Some(e.retry_after),
                        _ => None,
                    },
                    |by_deadline| {
                        Err(ModelError::new(
                            ErrorType::Transient,
                            if by_deadline {
                                "the run's wall-clock limit was reached while waiting for the model"
                            } else {
                                "the model did not answer in time"
                            },
                        ))
                    },
                )
                .await
            };
            // Every attempt is named in the log: the ones that failed and were retried first.
            for (attempt, (failed, wait)) in outcome.retried.into_iter().enumerate() {
                if let Err(e) = failed {
                    self.record(EventKind::ModelAttemptFailed {
                        step: call.step,
                        model: entry.to_string(),
                        attempt: u32::try_from(attempt + 1).unwrap_or(u32::MAX),
                        error_type: e.kind,
                        message: e.message,
                        retry_in_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    })
                    .await?;
                }
            }
            if let Err(ModelError {
                egress: Some(refusal),
                ..
            }) = &outcome.output
            {
                self.egress_refused(call.step, entry, refusal).await?;
            }
            let provider_failed = matches!(&outcome.output, Err(e) if e.is_retryable());
            let _ = self
                .runtime
                .breakers
                .record(
                    &breaker,
                    &policy,
                    !provider_failed,
                    admission == Admission::Probe,
                    now_ms(),
                )
                .await;
            match outcome.output {
                Ok(reply) => {
                    answered = Some((entry, reply, outcome.attempts));
                    break;
                }
                Err(e) => {
                    if has_next {
                        self.record(EventKind::ModelFellBack {
                            step: call.step,
                            model: entry.to_string(),
                            reason: format!(
                                "it failed for good after {} attempt(s): {}",
                                outcome.attempts, e.message
                            ),
                        })
                        .await?;
                    }
                    last_failure = Some((entry, e, outcome.attempts));
                }
            }
        }
        let waited = started.elapsed();
        let latency_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX);
        let kind = match (answered, last_failure) {
            (Some((entry, reply, attempts)), _) => EventKind::ModelResponded {
                step: call.step,
                cost: agent
                    .prices
                    .get(entry)
                    .copied()
                    .unwrap_or_else(|| agent.worst_price(&chain))
                    .cost(&reply.usage),
                model: entry.to_string(),
                content: reply.content,
                tool_calls: reply.tool_calls,
                usage: reply.usage,
                latency_ms,
                attempts,
                finish_reason: reply.finish_reason,
                cached: reply.cached,
            },
            (None, Some((entry, e, attempts))) => EventKind::ModelFailed {
                step: call.step,
                model: entry.to_string(),
                error_type: e.kind,
                message: e.message,
                latency_ms,
                attempts,
                all_circuits_open: false,
            },
            (None, None) => EventKind::ModelFailed {
                step: call.step,
                model: call.model.clone(),
                error_type: ErrorType::Transient,
                message: format!(
                    "all {open_breakers} model(s) of the chain are failing and were skipped"
                ),
                latency_ms,
                attempts: 0,
                all_circuits_open: true,
            },
        };
        let spent = match &kind {
            EventKind::ModelResponded { usage, cost, .. } => Amount {
                usd: *cost,
                tokens: usage.total(),
            },
            _ => Amount::default(),
        };
        let (Some((id, scopes)), Some(governor)) = (reservation, self.runtime.governor.clone())
        else {
            self.record(kind).await?;
            return Ok(waited);
        };
        let settled = EventKind::BudgetSettled {
            step: call.step,
            reservation: id.clone(),
            amount: spent,
        };
        let standings = if self.runtime.budget_in_store() {
            // One transaction: the answer, the settlement and its record, and the run's end
            // when that is all the engine does next (unless the settlement crosses a warning
            // line: the warning comes first, so the end is then left for the next step).
            self.stage(kind)?;
            self.stage(settled)?;
            let mark = (self.next_seq, self.prev_hash.clone());
            let end = self.ending().map(|kind| self.seal(kind));
            let settlement = Settlement {
                id: &id,
                scopes: &scopes,
                actual: spent,
                warn_percent: governor.budgets.warn_percent,
                end: usize::from(end.is_some()),
            };
            let store = &self.runtime.store;
            let standings = store
                .settle_and_write(&self.tenant, self.new_run(), &self.unsaved, settlement)
                .await?;
            match end {
                Some(_) if settlement.warns(&standings) => self.unseal(mark),
                Some(end) => self.fold(&end)?,
                None => {}
            }
            self.saved();
            standings
        } else {
            self.record(kind).await?;
            let standings = governor.counters.settle(&id, &scopes, spent).await?;
            // Written with the run's next event: lost in a crash, the settlement is made again
            // on resume (`settle_leftovers`), and the counters count it once.
            self.stage(settled)?;
            standings
        };
        self.warn_on_crossing(&governor, scopes, standings, spent)
            .await?;
        Ok(waited)
    }

    /// Returns the time spent waiting on the tool (attempts and backoff).
    async fn call_tool(&mut self, invocation: ToolInvocation) -> Result<Duration, RuntimeError> {
        let agent = self.engine.agent().clone();
        let Some((tool, _)) = agent.tool(&invocation.tool) else {
            // The engine only asks for tools the agent has; this is defence in depth.
            let result = ToolResult::error(
                ErrorType::Permanent,
                format!("there is no tool named `{}`", invocation.tool),
            );
            self.record(EventKind::ToolResult {
                step: invocation.step,
                call_id: invocation.call_id,
                tool: invocation.tool,
                result,
                latency_ms: 0,
                attempts: 0,
            })
            .await?;
            return Ok(Duration::ZERO);
        };
        if let rein_core::ToolSource::Agent(worker) = &tool.source {
            // A worker is a run of its own, with its own breakers on what it calls. (Boxed: its
            // state would otherwise make every run's future, worker or not, kilobytes larger.)
            return Box::pin(self.call_worker(invocation, tool, worker)).await;
        }
        let contract = &tool.contract;
        // One breaker per tenant, agent and tool: a failing dependency of one tenant does not
        // stop the others. Breaker bookkeeping is best effort: an outage of the counters must
        // neither stop tools nor lose what a tool did.
        let breaker = format!(
            "breaker:tool:{}:{}:{}",
            key_part(self.tenant.as_str()),
            key_part(&agent.spec.name),
            key_part(&tool.name)
        );
        let probe_ms = i64::try_from(contract.timeout.as_millis()).unwrap_or(i64::MAX);
        let admission = self
            .runtime
            .breakers
            .admit(&breaker, &contract.breaker, now_ms(), probe_ms)
            .await
            .unwrap_or(Admission::Allowed);
        if let Admission::Refused { retry_in_ms } = admission {
            // Refused before it was requested: the call was never made.
            let mut refused = ToolResult::error(
                ErrorType::Transient,
                format!(
                    "`{}` has been failing, so its circuit breaker is open and it was not called; it will be tried again in about {} s",
                    tool.name,
                    (retry_in_ms + 999) / 1000
                ),
            );
            refused.retry_safe = false;
            refused.retry_after_ms = u64::try_from(retry_in_ms).ok();
            self.record(EventKind::ToolResult {
                step: invocation.step,
                call_id: invocation.call_id,
                tool: invocation.tool,
                result: refused,
                latency_ms: 0,
                attempts: 0,
            })
            .await?;
            return Ok(Duration::ZERO);
        }
        self.record(invocation.requested()).await?;
        let started = Instant::now();
        let backoff = Backoff {
            max_attempts: if contract.may_retry() {
                contract.retry.max_attempts
            } else {
                1
            },
            base: contract.retry.backoff,
            cap: contract.retry.max_backoff,
        };
        // The key is stable across retries and resumes: the same step is the same call.
        let key = format!("{}:{}", self.run_id, invocation.step);
        // The tool's span of the run's trace, as its parent (what `rein_core::spans` exports).
        let traceparent = rein_core::spans::traceparent(
            &self.trace,
            &rein_core::spans::tool_span_id(&self.run_id, invocation.step, &invocation.call_id),
        );
        // The secrets a tenant's tool names are opened for this call only (a rotated one is
        // picked up at the next call) and never kept.
        let opened = match (&tool.source, self.trust()) {
            (rein_core::ToolSource::Http(source), rein_core::Trust::Tenant) => {
                let named: Vec<String> = source
                    .headers
                    .values()
                    .flat_map(|template| rein_core::trust::secret_references(template))
                    .map(str::to_string)
                    .collect();
                self.runtime
                    .open_secrets(&self.tenant, &named)
                    .await
                    .map(Some)
            }
            (_, rein_core::Trust::Tenant) => Ok(Some(Secrets::default())),
            (_, rein_core::Trust::Operator) => Ok(None),
        };
        let tools = &self.runtime.tools;
        let args = &invocation.arguments;
        let timeout = contract.timeout;
        let name = tool.name.as_str();
        let (mut result, refusal, attempts) = match &opened {
            Ok(secrets) => {
                let reach = secrets.as_ref().map_or(Reach::Operator, Reach::Tenant);
                let outcome = with_retries(
                    &backoff,
                    self.remaining(),
                    timeout,
                    || Box::pin(tools.call(tool, args, &key, &traceparent, reach)),
                    |(r, _): &(ToolResult, _)| {
                        (!r.is_success() && r.retry_safe)
                            .then(|| r.retry_after_ms.map(Duration::from_millis))
                    },
                    |by_deadline| {
                        let message = if by_deadline {
                            format!("`{name}` was cut off at the run's wall-clock limit")
                        } else {
                            format!("`{name}` did not answer within {timeout:?}")
                        };
                        (ToolResult::error(ErrorType::Transient, message), None)
                    },
                )
                .await;
                let (result, refusal) = outcome.output;
                (result, refusal, outcome.attempts)
            }
            Err(()) => (
                ToolResult::error(
                    ErrorType::Transient,
                    format!(
                        "`{name}` was not called: its configuration could not be read; the same call may work later"
                    ),
                ),
                None,
                0,
            ),
        };
        // A tenant's secret a service echoes back is never recorded, whatever it looks like.
        if let Ok(Some(secrets)) = &opened {
            secrets.scrub(&mut result);
        }
        if let Some(refusal) = &refusal {
            self.egress_refused(invocation.step, &tool.name, refusal)
                .await?;
        }
        // Secrets a tool returns are removed before anything records or reads them: the model
        // cannot repeat what it never saw, and the log keeps none.
        if self.engine.agent().spec.guards.output.secrets != rein_core::sanitize::Action::Off {
            rein_core::sanitize::redact_secrets_in_result(&mut result);
        }
        // The model must not be told a failed call is safe to repeat when the contract says
        // repeating it could do its side effect twice.
        if !contract.may_retry() {
            result.retry_safe = false;
        }
        // Only the service's own failures count against its breaker: a 4xx or a refused
        // argument says nothing about the dependency's health.
        let failed = matches!(
            result.error_type,
            Some(ErrorType::Transient | ErrorType::RateLimit)
        );
        let waited = started.elapsed();
        self.record(EventKind::ToolResult {
            step: invocation.step,
            call_id: invocation.call_id,
            tool: invocation.tool,
            result,
            latency_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            attempts,
        })
        .await?;
        let _ = self
            .runtime
            .breakers
            .record(
                &breaker,
                &contract.breaker,
                !failed,
                admission == Admission::Probe,
                now_ms(),
            )
            .await;
        Ok(waited)
    }
}

/// Whether `events` are the log of a gateway call stopped before its model answered (or
/// failed): resuming it would call the model for a caller who is no longer there.
fn interrupted_gateway_call(events: &[Event]) -> bool {
    let gateway = events
        .iter()
        .any(|e| matches!(e.kind, EventKind::ChatRequest(_)));
    let answered = events.iter().any(|e| {
        matches!(
            e.kind,
            EventKind::ModelResponded { .. }
                | EventKind::ModelFailed { .. }
                | EventKind::RunFinished { .. }
        )
    });
    gateway && !answered
}
