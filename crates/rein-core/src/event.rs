//! Events: the immutable records of a run, and the hash chain that makes the log tamper-evident.
//!
//! Each event's hash covers its header (run, sequence number, time, kind) and the SHA-256 of its
//! payload, plus the previous event's hash. Because the chain covers the payload's *digest*, a
//! payload can later be erased (retention, right to erasure) while the chain still verifies.

use crate::Usd;
use crate::ids::{JobId, RunId, SessionId, TenantId, UserId};
use crate::message::{ToolCall, Usage};
use crate::run::{RunStatus, TerminationReason};
use crate::tool::{ErrorType, ToolResult};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Where a worker's run sits in its tree of agents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentLink {
    /// The run whose tool call started it.
    pub run_id: RunId,
    /// That call's step.
    pub step: u32,
    /// Its depth: 1 for a worker of a top-level run.
    pub depth: u32,
    /// The deepest the tree may grow (the top-level run's `limits.max_depth`, or less).
    pub max_depth: u32,
}

/// A worker's budget, carved out of its caller's, and its place in the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerBudget {
    /// The most it may spend.
    pub max_cost_usd: Usd,
    /// The most tokens it may use.
    pub max_total_tokens: u64,
    /// Its depth in the tree.
    pub depth: u32,
    /// The tree's depth limit.
    pub max_depth: u32,
}

/// The `prev_hash` of a run's first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened. Serialized with a `type` tag; the tag is also the event's `kind`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A run began.
    RunStarted {
        /// Agent name.
        agent: String,
        /// Agent version.
        agent_version: u32,
        /// SHA-256 of the spec source the run pinned, so the chain covers the spec too.
        spec_sha256: String,
        /// The user's input.
        input: String,
        /// Owner.
        tenant: TenantId,
        /// Attributed user.
        user: UserId,
        /// Session.
        session: SessionId,
        /// Optional batch job.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job: Option<JobId>,
        /// Authorisation scopes the tenant was granted when the run started.
        #[serde(default)]
        granted_scopes: Vec<String>,
        /// The W3C `traceparent` the caller sent: the run's trace continues the caller's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace_parent: Option<String>,
        /// The run's random spotlighting boundary: untrusted content reaches the model between
        /// markers carrying it, which text from outside cannot forge.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fence: Option<String>,
        /// For a worker's run: the run that called it, and where in the tree it is.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent: Option<ParentLink>,
        /// Who wrote the spec, and so whose secrets and which addresses it may reach. Absent
        /// in logs written before it was recorded: the process driving the run then assumes
        /// what its runs usually are (`rein serve` and `rein worker`: a tenant's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trust: Option<crate::Trust>,
    },
    /// The conversation this run continues: the earlier turns of its session (recorded with
    /// `run_started`, so a resumed run begins from the same place). With `summarize`, the
    /// session was idle past its TTL: the run's first model call condenses `messages` into a
    /// summary, and the run starts from that summary instead of the raw history.
    SessionContext {
        /// Earlier turns of the session, oldest first.
        messages: Vec<crate::message::Message>,
        /// Whether to summarize them first.
        summarize: bool,
    },
    /// A gateway call (`POST /v1/chat/completions`): the caller's own conversation and tools,
    /// recorded with `run_started`. The run makes this one model call, governed like any other,
    /// and ends with the answer as it is: tool calls are returned to the caller, not made.
    ChatRequest(crate::message::ChatRequest),
    /// A graph run entered a node (`flow: graph`): the node's checkpoint.
    NodeEntered {
        /// The node.
        node: String,
        /// Its kind (`llm`, `tool`, `router`, `human`, `end`).
        node_kind: String,
        /// How many times the run has entered it, this time included.
        visit: u32,
    },
    /// A graph node is done: the state fields it set and where the run goes next.
    NodeFinished {
        /// The node.
        node: String,
        /// The state fields it set, with their new values.
        writes: serde_json::Map<String, Value>,
        /// The next node.
        next: String,
        /// Why that one: the edge, the route's condition, the model's choice, a failure.
        why: String,
    },
    /// A plan (`flow: plan_execute`): the first (revision 0), or a revision of the steps left.
    PlanMade {
        /// 0 for the first plan, then 1, 2, ...
        revision: u32,
        /// The steps still to do, in order.
        steps: Vec<crate::plan::PlanStep>,
        /// Why the plan is what it is (the planner's reason, or what prompted the revision).
        why: String,
    },
    /// A plan step began: its checkpoint.
    PlanStepStarted {
        /// The step's number in the run, from 1 (steps done, skipped or failed count).
        index: u32,
        /// What it does.
        purpose: String,
        /// 1, then 2, ... when a failed step is retried.
        attempt: u32,
    },
    /// A plan step ended, as its executor reported.
    PlanStepFinished {
        /// The step's number.
        index: u32,
        /// Done or failed.
        status: crate::plan::StepStatus,
        /// The result, or what went wrong.
        result: String,
        /// Which attempt this was.
        attempt: u32,
    },
    /// A worker agent's run was started for a tool call, under a budget carved out of this
    /// run's (held against this run's limits until the worker ends).
    WorkerStarted {
        /// The tool call's step.
        step: u32,
        /// The tool call.
        call_id: String,
        /// The worker tool.
        tool: String,
        /// The worker's spec reference.
        spec: String,
        /// The worker's run.
        run_id: RunId,
        /// What it may spend, and where in the tree it is.
        budget: WorkerBudget,
        /// Whether it stands in for a worker that failed.
        fallback: bool,
    },
    /// A worker's run ended: what it spent (now this run's spend too) and whether its answer
    /// was taken.
    WorkerFinished {
        /// The tool call's step.
        step: u32,
        /// The tool call.
        call_id: String,
        /// The worker tool.
        tool: String,
        /// The worker's run.
        run_id: RunId,
        /// The worker's agent.
        agent: String,
        /// How it ended.
        status: RunStatus,
        /// Its termination reason.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<TerminationReason>,
        /// Why it ended so, or why its answer was not taken.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
        /// What it spent.
        cost: Usd,
        /// Tokens it used.
        usage: Usage,
        /// Whether its answer was taken (completed, and within the output schema).
        accepted: bool,
    },
    /// A run was taken up by a process: a queued one's wall clock starts here; for one taken
    /// up again after its process stopped, the time since its last event is not counted
    /// against its wall clock (it was nobody's work).
    RunClaimed {
        /// The worker (process) that took it.
        by: String,
    },
    /// The worst case of the next model call is held in every shared budget scope.
    BudgetReserved {
        /// Step of the model call.
        step: u32,
        /// Reservation id.
        reservation: String,
        /// Scope keys held.
        scopes: Vec<String>,
        /// Amount held.
        amount: crate::budget::Amount,
    },
    /// A shared budget could not cover the next model call: it was not made.
    BudgetRefused {
        /// Step of the model call.
        step: u32,
        /// The scope that could not cover it.
        scope: crate::budget::Scope,
        /// What that scope had used.
        standing: crate::budget::Standing,
        /// What the call needed.
        amount: crate::budget::Amount,
    },
    /// The actual amount of a model call was settled and the rest of its reservation released.
    BudgetSettled {
        /// Step of the model call.
        step: u32,
        /// Reservation id.
        reservation: String,
        /// Amount spent.
        amount: crate::budget::Amount,
    },
    /// A shared budget's spend crossed its warning line (by default 75% of a cap).
    BudgetWarning {
        /// The scope.
        scope: crate::budget::Scope,
        /// Its spend after this run's settlement.
        spent: crate::budget::Amount,
        /// The warning line, in percent of the cap.
        percent: u8,
    },
    /// A model call was over a rate limit: it waited, or was rejected.
    RateLimited {
        /// Step of the model call.
        step: u32,
        /// The limit's counter key.
        scope: String,
        /// How long it had to wait (0 when it could never fit).
        wait_ms: i64,
        /// Whether it waited (true) or was rejected (false, which ends the run).
        delayed: bool,
    },
    /// The egress policy refused a connection a tenant's spec asked for: a tool's or a model
    /// server's address that the operator has not opened. Nothing was sent.
    EgressRefused {
        /// Step of the tool or model call.
        step: u32,
        /// The tool, or the model entry, that would have connected.
        target: String,
        /// The host the URL named.
        host: String,
        /// The closed range the address is in (`a loopback`, `a private`, ...).
        range: String,
    },
    /// A model call passed its pre-flight limit check and is about to be made.
    ModelRequested {
        /// Step number within the run.
        step: u32,
        /// `provider/model`.
        model: String,
        /// Estimated input tokens of this call.
        estimated_input_tokens: u64,
        /// Output token cap of this call.
        max_output_tokens: u32,
        /// Worst-case cost of this call (estimated input + max output, priced).
        worst_case_cost: Usd,
        /// The pre-flight check this call passed: tokens left under `max_total_tokens` before it.
        tokens_remaining: u64,
        /// The pre-flight check this call passed: money left under `max_cost_usd` before it.
        cost_remaining: Usd,
        /// What the call is for (absent in logs written before step kinds were recorded).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step_kind: Option<crate::spec::StepKind>,
        /// Whether `model.routes` chose `model` for this kind of step.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        routed: bool,
    },
    /// A model call answered.
    ModelResponded {
        /// Step number.
        step: u32,
        /// The model that answered.
        model: String,
        /// Text content.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content: Option<String>,
        /// Tool calls requested.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<ToolCall>,
        /// Reported usage.
        usage: Usage,
        /// Cost of the call.
        cost: Usd,
        /// Wall time of the call, in milliseconds, all attempts included.
        latency_ms: u64,
        /// Attempts made.
        attempts: u32,
        /// Why the provider stopped (`stop`, `tool_calls`, `length`, ...), when it said.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        finish_reason: Option<String>,
        /// The answer came from the gateway's response cache (no provider call, no charge).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        cached: bool,
    },
    /// One attempt of a model call failed and the call is retried after `retry_in_ms`.
    ModelAttemptFailed {
        /// Step number.
        step: u32,
        /// `provider/model`.
        model: String,
        /// Which attempt, from 1.
        attempt: u32,
        /// The class of the failure.
        error_type: ErrorType,
        /// What went wrong.
        message: String,
        /// The wait before the next attempt.
        retry_in_ms: u64,
    },
    /// A model of the step's chain was passed over; the step goes to the next one.
    ModelFellBack {
        /// Step number.
        step: u32,
        /// The model passed over.
        model: String,
        /// Why (its breaker is open, or it failed for good).
        reason: String,
    },
    /// A model call failed after its retries.
    ModelFailed {
        /// Step number.
        step: u32,
        /// `provider/model`.
        model: String,
        /// The class of the last failure.
        error_type: ErrorType,
        /// What went wrong (no secrets, no raw bodies).
        message: String,
        /// Wall time, in milliseconds.
        latency_ms: u64,
        /// Attempts made.
        attempts: u32,
        /// Every model of the chain had an open circuit breaker: nothing was called.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        all_circuits_open: bool,
    },
    /// A tool call passed validation and is about to be made.
    ToolRequested {
        /// Step number.
        step: u32,
        /// The model's id for the call.
        call_id: String,
        /// Tool name.
        tool: String,
        /// Validated arguments.
        arguments: Value,
    },
    /// A tool call ended (or was refused before it was made).
    ToolResult {
        /// Step number.
        step: u32,
        /// The model's id for the call.
        call_id: String,
        /// Tool name as the model wrote it.
        tool: String,
        /// The typed result.
        result: ToolResult,
        /// Wall time, in milliseconds (0 when refused).
        latency_ms: u64,
        /// Attempts made (0 when refused).
        attempts: u32,
    },
    /// A guard checked untrusted content (the user's input, or a tool's result) before the
    /// model saw it.
    GuardVerdict {
        /// The step of the tool call whose result was checked; 0 for the user's input.
        step: u32,
        /// Where the content came from.
        source: crate::guard::Source,
        /// The tool call whose result was checked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        call_id: Option<String>,
        /// The tool.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tool: Option<String>,
        /// What the policy made of the detector's finding.
        verdict: crate::guard::Verdict,
        /// The detector's score.
        score: f64,
        /// The rules that matched.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        rules: Vec<String>,
    },
    /// The LLM judge scored the final answer (`guards.judge`).
    JudgeVerdict {
        /// The judge's model call.
        step: u32,
        /// Its score, in `[0, 1]` (0 when its reply was not a verdict).
        score: f64,
        /// The passing score.
        threshold: f64,
        /// Whether the answer passed.
        passed: bool,
        /// The judge's reason.
        reason: String,
    },
    /// The final answer was sanitised before it left Rein: what was found and done.
    OutputSanitized {
        /// What was found, by kind, and what was done with it.
        findings: Vec<crate::sanitize::Finding>,
        /// Whether the answer was withheld (the run ends `guardrail_blocked`).
        blocked: bool,
    },
    /// A tool call waits for a person's approval; the run is `awaiting_approval` until an
    /// `approval_decided` for the same call.
    ApprovalRequested {
        /// The step the call will be made as (its idempotency key).
        step: u32,
        /// The model's id for the call.
        call_id: String,
        /// The tool.
        tool: String,
        /// The arguments, valid against the tool's input schema.
        arguments: Value,
        /// Why approval is needed (the contract's `confirm`, or a magnitude rule).
        reason: String,
        /// When the request times out, in ms since the epoch.
        expires_at_ms: i64,
        /// What a timeout turns into.
        on_timeout: crate::spec::OnTimeout,
        /// For a final answer held for approval (low confidence): the answer. (`tool` is then
        /// `final_answer` and `arguments` the same answer.)
        #[serde(default, skip_serializing_if = "Option::is_none")]
        answer: Option<Value>,
    },
    /// A person (or, on a timeout, the policy) decided a pending approval.
    ApprovalDecided {
        /// The step of the pending call.
        step: u32,
        /// The model's id for the call.
        call_id: String,
        /// Whether the call may be made.
        approved: bool,
        /// Who decided (`policy` for a timeout).
        by: String,
        /// Why, if they said.
        reason: Option<String>,
    },
    /// The run ended.
    RunFinished {
        /// Final status.
        status: RunStatus,
        /// The one termination reason.
        reason: TerminationReason,
        /// What happened, for a person (which limit, what error).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
        /// The final answer (text, or JSON when the spec has an output schema).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<Value>,
    },
}

/// The worker runs a log started (`worker_started`) whose end it does not record
/// (`worker_finished`).
pub fn unfinished_workers(events: &[Event]) -> Vec<RunId> {
    let mut open: Vec<RunId> = Vec::new();
    for event in events {
        match &event.kind {
            EventKind::WorkerStarted { run_id, .. } => open.push(run_id.clone()),
            EventKind::WorkerFinished { run_id, .. } => open.retain(|r| r != run_id),
            _ => {}
        }
    }
    open
}

impl EventKind {
    /// The event's kind name (its `type` tag).
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::RunStarted { .. } => "run_started",
            EventKind::SessionContext { .. } => "session_context",
            EventKind::ChatRequest(_) => "chat_request",
            EventKind::NodeEntered { .. } => "node_entered",
            EventKind::NodeFinished { .. } => "node_finished",
            EventKind::PlanMade { .. } => "plan_made",
            EventKind::PlanStepStarted { .. } => "plan_step_started",
            EventKind::PlanStepFinished { .. } => "plan_step_finished",
            EventKind::WorkerStarted { .. } => "worker_started",
            EventKind::WorkerFinished { .. } => "worker_finished",
            EventKind::RunClaimed { .. } => "run_claimed",
            EventKind::GuardVerdict { .. } => "guard_verdict",
            EventKind::OutputSanitized { .. } => "output_sanitized",
            EventKind::JudgeVerdict { .. } => "judge_verdict",
            EventKind::BudgetReserved { .. } => "budget_reserved",
            EventKind::BudgetRefused { .. } => "budget_refused",
            EventKind::BudgetSettled { .. } => "budget_settled",
            EventKind::BudgetWarning { .. } => "budget_warning",
            EventKind::RateLimited { .. } => "rate_limited",
            EventKind::EgressRefused { .. } => "egress_refused",
            EventKind::ModelRequested { .. } => "model_requested",
            EventKind::ModelResponded { .. } => "model_responded",
            EventKind::ModelAttemptFailed { .. } => "model_attempt_failed",
            EventKind::ModelFellBack { .. } => "model_fell_back",
            EventKind::ModelFailed { .. } => "model_failed",
            EventKind::ToolRequested { .. } => "tool_requested",
            EventKind::ToolResult { .. } => "tool_result",
            EventKind::ApprovalRequested { .. } => "approval_requested",
            EventKind::ApprovalDecided { .. } => "approval_decided",
            EventKind::RunFinished { .. } => "run_finished",
        }
    }
}

/// An event as the engine sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Position in the run's log, from 0.
    pub seq: u64,
    /// When it was recorded, in milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// What happened.
    pub kind: EventKind,
}

/// An event ready to store: its payload serialized and its place in the chain computed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedEvent {
    /// Run.
    pub run_id: RunId,
    /// Position in the log.
    pub seq: u64,
    /// Time, ms since the epoch.
    pub ts_ms: i64,
    /// Kind name.
    pub kind: String,
    /// JSON payload; `None` once erased.
    pub payload: Option<String>,
    /// SHA-256 of the payload, hex.
    pub payload_sha256: String,
    /// Hash of the previous event, hex ([`GENESIS_HASH`] for the first).
    pub prev_hash: String,
    /// This event's hash, hex.
    pub hash: String,
}

/// Lower-case hex of a byte string.
///
/// ```
/// assert_eq!(rein_core::event::hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
/// assert_eq!(
///     rein_core::event::sha256_hex(b"abc"),
///     "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
/// );
/// ```
pub fn hex(bytes: &[u8]) -> String {
    // By table, not `write!`: every event's two digests pass through here on the hot path.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The chain hash over an event header. The layout is fixed and versioned (`rein-event-v1`):
/// changing it would break verification of every stored log.
pub fn chain_hash(
    run_id: &RunId,
    seq: u64,
    ts_ms: i64,
    kind: &str,
    payload_sha256: &str,
    prev_hash: &str,
) -> String {
    let mut h = Sha256::new();
    h.update(b"rein-event-v1\n");
    for part in [
        run_id.as_str(),
        &seq.to_string(),
        &ts_ms.to_string(),
        kind,
        payload_sha256,
        prev_hash,
    ] {
        h.update(part.as_bytes());
        h.update(b"\n");
    }
    hex(&h.finalize())
}

impl Event {
    /// Serializes the event and links it after `prev_hash`.
    pub fn seal(&self, run_id: &RunId, prev_hash: &str) -> SealedEvent {
        // Serializing a derived enum of plain data cannot fail; fall back to null defensively.
        let payload = serde_json::to_string(&self.kind).unwrap_or_else(|_| "null".into());
        let payload_sha256 = sha256_hex(payload.as_bytes());
        let kind = self.kind.name();
        let hash = chain_hash(
            run_id,
            self.seq,
            self.ts_ms,
            kind,
            &payload_sha256,
            prev_hash,
        );
        SealedEvent {
            run_id: run_id.clone(),
            seq: self.seq,
            ts_ms: self.ts_ms,
            kind: kind.to_string(),
            payload: Some(payload),
            payload_sha256,
            prev_hash: prev_hash.to_string(),
            hash,
        }
    }
}

impl SealedEvent {
    /// Decodes the payload back into an [`Event`].
    pub fn decode(&self) -> Result<Event, DecodeError> {
        let payload = self
            .payload
            .as_deref()
            .ok_or(DecodeError::Erased { seq: self.seq })?;
        let kind: EventKind = serde_json::from_str(payload).map_err(|e| DecodeError::Payload {
            seq: self.seq,
            message: e.to_string(),
        })?;
        Ok(Event {
            seq: self.seq,
            ts_ms: self.ts_ms,
            kind,
        })
    }
}

/// Why a stored event could not be read back.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload was erased; the event still verifies but cannot be replayed.
    #[error("event {seq} has an erased payload")]
    Erased {
        /// Sequence number.
        seq: u64,
    },
    /// The payload is not a valid event.
    #[error("event {seq} has an unreadable payload: {message}")]
    Payload {
        /// Sequence number.
        seq: u64,
        /// Parser message.
        message: String,
    },
}

/// The first place a stored log stops matching its chain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("event {seq}: {reason}")]
pub struct ChainBreak {
    /// Sequence number of the first bad event (or where a missing one should be).
    pub seq: u64,
    /// What does not match.
    pub reason: String,
}

/// Recomputes a run's chain. `head` is the (event count, last hash) the store recorded with the
/// run, which catches events removed from the end of the log.
pub fn verify_chain(events: &[SealedEvent], head: Option<(u64, &str)>) -> Result<(), ChainBreak> {
    let mut prev = GENESIS_HASH.to_string();
    for (index, event) in events.iter().enumerate() {
        let expected_seq = index as u64;
        let fail = |reason: String| {
            Err(ChainBreak {
                seq: event.seq,
                reason,
            })
        };
        if event.seq != expected_seq {
            return Err(ChainBreak {
                seq: expected_seq,
                reason: format!(
                    "expected event {expected_seq} here, found event {} (an event was removed or reordered)",
                    event.seq
                ),
            });
        }
        if event.prev_hash != prev {
            return fail("its link to the previous event does not match (an event was removed, inserted or reordered)".into());
        }
        match &event.payload {
            Some(payload) if sha256_hex(payload.as_bytes()) != event.payload_sha256 => {
                return fail(
                    "its payload does not match its recorded digest (the payload was altered)"
                        .into(),
                );
            }
            Some(_) => {}
            // The chain would still verify without the payload, but no erasure event exists
            // yet: a payload can only be missing because it was removed.
            None => {
                return fail("its payload was removed and no erasure was recorded".into());
            }
        }
        let hash = chain_hash(
            &event.run_id,
            event.seq,
            event.ts_ms,
            &event.kind,
            &event.payload_sha256,
            &event.prev_hash,
        );
        if hash != event.hash {
            return fail(
                "its header does not match its hash (the time, kind or digest was altered)".into(),
            );
        }
        prev = hash;
    }
    if let Some((count, last_hash)) = head {
        let found = events.len() as u64;
        if found > count {
            return Err(ChainBreak {
                seq: count,
                reason: format!(
                    "the run recorded {count} events but {found} are stored (events were added after the recorded head)"
                ),
            });
        }
        if found < count {
            return Err(ChainBreak {
                seq: found,
                reason: format!(
                    "the run recorded {count} events but only {found} are stored (events were removed from the end)"
                ),
            });
        }
        if found == count && count > 0 && prev != last_hash {
            return Err(ChainBreak {
                seq: count - 1,
                reason: "the last event does not match the run's recorded head hash".into(),
            });
        }
    }
    Ok(())
}

/// What a run's log says about it, folded from its events alone (no agent needed): the
/// reference a stored summary of the run must agree with.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogSummary {
    /// Model calls answered (responded or failed): each model step ends with exactly one,
    /// even when a crash made it be requested twice.
    pub iterations: u32,
    /// Tool results recorded (made or refused).
    pub tool_calls: u32,
    /// Tokens reported by model calls.
    pub usage: Usage,
    /// Cost of model calls.
    pub cost: Usd,
    /// Status and reason from `run_finished`, if present.
    pub finished: Option<(RunStatus, TerminationReason)>,
    /// Output from `run_finished`.
    pub output: Option<Value>,
    /// The `run_started` event, if present.
    pub started: Option<EventKind>,
    /// Approvals requested and not yet decided.
    pub pending_approvals: u32,
}

impl LogSummary {
    /// The run's status as its log shows it.
    pub fn status(&self) -> RunStatus {
        match (self.finished, self.pending_approvals) {
            (Some((status, _)), _) => status,
            (None, 0) => RunStatus::Running,
            (None, _) => RunStatus::AwaitingApproval,
        }
    }
}

impl LogSummary {
    /// Folds a run's events.
    pub fn of<'a>(events: impl IntoIterator<Item = &'a Event>) -> LogSummary {
        let mut s = LogSummary::default();
        for event in events {
            match &event.kind {
                EventKind::ModelResponded { usage, cost, .. } => {
                    s.iterations += 1;
                    s.usage.add(usage);
                    s.cost += *cost;
                }
                EventKind::ModelFailed { .. } => s.iterations += 1,
                EventKind::ToolResult { .. } => s.tool_calls += 1,
                EventKind::ApprovalRequested { .. } => s.pending_approvals += 1,
                EventKind::ApprovalDecided { .. } => {
                    s.pending_approvals = s.pending_approvals.saturating_sub(1)
                }
                EventKind::RunStarted { .. } => s.started = Some(event.kind.clone()),
                EventKind::RunFinished {
                    status,
                    reason,
                    output,
                    ..
                } => {
                    s.finished = Some((*status, *reason));
                    s.output = output.clone();
                }
                _ => {}
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: u64) -> Vec<SealedEvent> {
        let run = RunId::new("run-1");
        let mut prev = GENESIS_HASH.to_string();
        (0..n)
            .map(|seq| {
                let event = Event {
                    seq,
                    ts_ms: 1_700_000_000_000 + seq as i64,
                    kind: EventKind::RunFinished {
                        status: RunStatus::Completed,
                        reason: TerminationReason::Completed,
                        detail: None,
                        output: Some(Value::String(format!("answer {seq}"))),
                    },
                };
                let sealed = event.seal(&run, &prev);
                prev = sealed.hash.clone();
                sealed
            })
            .collect()
    }

    #[test]
    fn an_untouched_log_verifies() {
        let events = log(5);
        let head = events.last().map(|e| (5, e.hash.as_str()));
        assert_eq!(verify_chain(&events, head), Ok(()));
    }

    #[test]
    fn an_altered_payload_is_found() {
        let mut events = log(5);
        let payload = events[2]
            .payload
            .take()
            .unwrap()
            .replace("answer 2", "answer X");
        events[2].payload = Some(payload);
        assert_eq!(verify_chain(&events, None).unwrap_err().seq, 2);
    }

    #[test]
    fn a_removed_payload_is_found_while_no_erasure_is_recorded() {
        let mut events = log(3);
        events[1].payload = None;
        let err = verify_chain(&events, None).unwrap_err();
        assert_eq!(err.seq, 1);
        assert!(err.reason.contains("no erasure was recorded"));
    }

    #[test]
    fn events_beyond_the_recorded_head_are_found() {
        let events = log(5);
        let head = (4, events[3].hash.clone());
        assert_eq!(
            verify_chain(&events, Some((head.0, &head.1)))
                .unwrap_err()
                .seq,
            4
        );
    }

    #[test]
    fn removed_and_reordered_events_are_found() {
        let mut events = log(5);
        events.remove(3);
        assert_eq!(verify_chain(&events, None).unwrap_err().seq, 3);

        let mut events = log(5);
        events.swap(1, 2);
        assert_eq!(verify_chain(&events, None).unwrap_err().seq, 1);

        let events = log(5);
        let head = (5, events[4].hash.clone());
        assert_eq!(
            verify_chain(&events[..4], Some((head.0, &head.1)))
                .unwrap_err()
                .seq,
            4
        );
    }

    #[test]
    fn payloads_round_trip() {
        let events = log(1);
        let decoded = events[0].decode().unwrap();
        assert_eq!(decoded.seq, 0);
        assert!(matches!(decoded.kind, EventKind::RunFinished { .. }));
    }
}
