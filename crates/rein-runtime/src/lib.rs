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

mod admission;
mod breakers;
mod builder;
mod cancel;
mod cells;
mod driver;
mod leases;
mod meters;
mod queue;
mod retry;
mod runs;
mod secrets;
mod sessions;
pub mod workers;

use cancel::Driving;
use driver::Driver;
use leases::*;
pub use leases::{CANCEL_POLL, DEFAULT_LEASE_MS, holder_is_gone};
pub use meters::{Recorder, record as record_measures};
use rein_core::budget::{Budgets, Counters, CountersError};
use rein_core::bulkhead::Bulkheads;
use rein_core::rate::RateLimits;
use rein_core::{
    Agent, JobId, ReplayError, RunId, RunStatus, SessionId, TenantId, TerminationReason, Usage,
    Usd, UserId,
};
use rein_store::{Store, StoreError};
use rein_tools::ToolBox;
pub use retry::Backoff as RetryBackoff;
use runs::*;
pub use secrets::{SECRETS_KEY_ENV, SecretError, SecretKey};
use serde_json::Value;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
pub use workers::Workers;

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
pub(crate) fn fence_boundary() -> Option<String> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).ok()?;
    Some(rein_core::event::hex(&bytes))
}

pub(crate) fn run_lease_ms(agent: &Agent) -> i64 {
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

/// The wall clock, ms since the epoch (the driver's one clock).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
