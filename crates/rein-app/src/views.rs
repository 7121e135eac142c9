//! The JSON that Rein answers with: the HTTP API's bodies and the CLI's `--json` output. They are
//! typed, so `/openapi.json` is generated from the same types that build the answers.

use rein_core::time::format_utc;
use rein_core::{RunStatus, TerminationReason, Usage};
use rein_runtime::RunOutcome;
use rein_store::{CostLine, RunRecord};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Tokens used.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageView {
    pub input_tokens: u64,
    /// Input tokens read from the provider's prompt cache (billed at its cached price).
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
}

impl UsageView {
    pub fn of(u: &Usage) -> Self {
        UsageView {
            input_tokens: u.input_tokens,
            cached_input_tokens: u.cached_input_tokens,
            output_tokens: u.output_tokens,
            total_tokens: u.total(),
        }
    }
}

/// A stored run: what it is and where it stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunView {
    pub run_id: String,
    pub agent: String,
    /// The spec version the run pinned when it started.
    pub agent_version: u32,
    pub tenant: String,
    pub user: String,
    pub session: String,
    pub job: Option<String>,
    /// `queued`, `running`, `awaiting_approval`, `completed`, `failed`, `limit_exceeded`,
    /// `cancelled` or `escalated`.
    #[schema(value_type = String)]
    pub status: RunStatus,
    /// Why it ended (`completed`, `max_iterations`, `max_cost`, `budget_exhausted`,
    /// `cancelled`, ...), once it has.
    #[schema(value_type = Option<String>)]
    pub termination_reason: Option<TerminationReason>,
    pub detail: Option<String>,
    /// Model calls answered.
    pub iterations: u32,
    pub tool_calls: u32,
    pub usage: UsageView,
    pub cost_usd: f64,
    /// The cost in millionths of a dollar: exact, for sums.
    pub cost_micros: i64,
    /// The final answer, once completed: its text, or the JSON its `output_schema` asks for.
    pub output: Option<Value>,
    /// Events in its log.
    pub events: u64,
    /// UTC, RFC 3339.
    pub created: String,
    /// The last event's time, UTC, RFC 3339.
    pub updated: String,
}

impl RunView {
    pub fn of(r: &RunRecord) -> Self {
        let p = &r.progress;
        RunView {
            run_id: r.info.id.to_string(),
            agent: r.info.agent.clone(),
            agent_version: r.info.agent_version,
            tenant: r.info.tenant.to_string(),
            user: r.info.user.to_string(),
            session: r.info.session.to_string(),
            job: r.info.job.as_ref().map(ToString::to_string),
            status: p.status,
            termination_reason: p.reason,
            detail: p.detail.clone(),
            iterations: p.iterations,
            tool_calls: p.tool_calls,
            usage: UsageView::of(&p.usage),
            cost_usd: p.cost.as_dollars(),
            cost_micros: p.cost.micros(),
            output: p.output.clone(),
            events: r.event_count,
            created: format_utc(r.info.created_ms),
            updated: format_utc(r.updated_ms),
        }
    }
}

/// A tool call held for a person's decision.
#[derive(Debug, Serialize, ToSchema)]
pub struct PendingApprovalView {
    pub step: u32,
    pub call_id: String,
    pub tool: String,
    #[schema(value_type = Object)]
    pub arguments: Value,
    pub reason: String,
    /// When the approval times out and its policy applies, UTC.
    pub expires_at: String,
}

/// A run driven to its end, or to a stop where it waits for a person.
#[derive(Debug, Serialize, ToSchema)]
pub struct OutcomeView {
    pub run_id: String,
    #[schema(value_type = String)]
    pub status: RunStatus,
    #[schema(value_type = Option<String>)]
    pub termination_reason: Option<TerminationReason>,
    pub detail: Option<String>,
    pub iterations: u32,
    pub tool_calls: u32,
    pub usage: UsageView,
    pub cost_usd: f64,
    pub cost_micros: i64,
    /// The final answer: its text, or the JSON its `output_schema` asks for.
    pub output: Option<Value>,
    /// Model calls answered, per `provider/model`.
    pub models_used: BTreeMap<String, u32>,
    pub events: u64,
    pub awaiting_approval: Option<PendingApprovalView>,
}

impl OutcomeView {
    pub fn of(o: &RunOutcome) -> Self {
        OutcomeView {
            run_id: o.run_id.to_string(),
            status: o.status,
            termination_reason: o.reason,
            detail: o.detail.clone(),
            iterations: o.iterations,
            tool_calls: o.tool_calls,
            usage: UsageView::of(&o.usage),
            cost_usd: o.cost.as_dollars(),
            cost_micros: o.cost.micros(),
            output: o.output.clone(),
            models_used: o.models_used.clone(),
            events: o.events,
            awaiting_approval: o.awaiting.as_ref().map(|p| PendingApprovalView {
                step: p.step,
                call_id: p.call_id.clone(),
                tool: p.tool.clone(),
                arguments: p.arguments.clone(),
                reason: p.reason.clone(),
                expires_at: format_utc(p.expires_at_ms),
            }),
        }
    }
}

impl OutcomeView {
    /// The same answer for a run that stopped where this process did not see it: made from its
    /// stored row and log (`events`, decoded) instead of the driver's outcome.
    pub fn of_log(r: &RunRecord, events: &[rein_core::Event]) -> Self {
        let p = &r.progress;
        let mut models_used = BTreeMap::new();
        let mut pending = None;
        for event in events {
            match &event.kind {
                rein_core::EventKind::ModelResponded { model, .. } => {
                    *models_used.entry(model.clone()).or_default() += 1;
                }
                rein_core::EventKind::ApprovalRequested {
                    step,
                    call_id,
                    tool,
                    arguments,
                    reason,
                    expires_at_ms,
                    ..
                } => {
                    pending = Some(PendingApprovalView {
                        step: *step,
                        call_id: call_id.clone(),
                        tool: tool.clone(),
                        arguments: arguments.clone(),
                        reason: reason.clone(),
                        expires_at: format_utc(*expires_at_ms),
                    });
                }
                rein_core::EventKind::ApprovalDecided { call_id, .. }
                    if pending.as_ref().is_some_and(|p| p.call_id == *call_id) =>
                {
                    pending = None;
                }
                _ => {}
            }
        }
        OutcomeView {
            run_id: r.info.id.to_string(),
            status: p.status,
            termination_reason: p.reason,
            detail: p.detail.clone(),
            iterations: p.iterations,
            tool_calls: p.tool_calls,
            usage: UsageView::of(&p.usage),
            cost_usd: p.cost.as_dollars(),
            cost_micros: p.cost.micros(),
            output: p.output.clone(),
            models_used,
            events: r.event_count,
            awaiting_approval: pending.filter(|_| p.status == RunStatus::AwaitingApproval),
        }
    }
}

/// One event of a run's log.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    /// Its position in the log, from 0 (also its Server-Sent Events id).
    pub seq: u64,
    pub ts: String,
    /// `run_started`, `model_requested`, `model_responded`, `tool_requested`, `tool_result`,
    /// `budget_reserved`, `approval_requested`, `run_finished`, ...
    pub kind: String,
    /// What happened; `null` once erased.
    #[schema(value_type = Option<Object>)]
    pub payload: Option<Value>,
    /// The hash chaining this event to the one before it.
    pub hash: String,
}

/// A recorded payload as it leaves Rein: secrets a model produced on its own (what enters a
/// run is cleared on the way in), card numbers and national ids are redacted from every string.
pub fn served(mut payload: Value) -> Value {
    rein_core::sanitize::redact_for_display(&mut payload);
    payload
}

impl EventView {
    pub fn of(e: &rein_core::SealedEvent) -> Self {
        EventView {
            seq: e.seq,
            ts: format_utc(e.ts_ms),
            kind: e.kind.clone(),
            payload: e
                .payload
                .as_deref()
                .and_then(|p| serde_json::from_str(p).ok())
                .map(served),
            hash: e.hash.clone(),
        }
    }
}

/// Spend grouped one way.
#[derive(Debug, Serialize, ToSchema)]
pub struct CostsView {
    /// `tenant`, `user`, `agent`, `model` or `day`.
    pub by: String,
    pub rows: Vec<CostRow>,
    pub total_usd: f64,
    pub total_micros: i64,
}

/// The spend of one user, agent, model or day.
#[derive(Debug, Serialize, ToSchema)]
pub struct CostRow {
    pub key: String,
    /// Model calls answered.
    pub calls: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    pub cost_micros: i64,
}

impl CostsView {
    pub fn of(by: &str, lines: &[CostLine]) -> Self {
        let total = lines
            .iter()
            .fold(rein_core::Usd::ZERO, |sum, l| sum + l.cost);
        CostsView {
            by: by.to_string(),
            rows: lines
                .iter()
                .map(|l| CostRow {
                    key: l.key.clone(),
                    calls: l.calls,
                    input_tokens: l.usage.input_tokens,
                    cached_input_tokens: l.usage.cached_input_tokens,
                    output_tokens: l.usage.output_tokens,
                    cost_usd: l.cost.as_dollars(),
                    cost_micros: l.cost.micros(),
                })
                .collect(),
            total_usd: total.as_dollars(),
            total_micros: total.micros(),
        }
    }
}

/// An RFC 9457 problem: every error answer (`application/problem+json`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ProblemView {
    /// Always `about:blank`: the status says what kind of problem it is.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    /// What went wrong and what to do about it.
    pub detail: String,
    /// On gateway answers: OpenAI's error member, `{message, type, code}`, for OpenAI clients.
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
    /// The request's id, as in the `X-Request-Id` header: quote it when asking about the error.
    pub request_id: Option<String>,
}

/// An agent version, as registered.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentVersionView {
    pub name: String,
    pub version: u32,
}

/// The newest version of an agent.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentView {
    pub name: String,
    pub version: u32,
    pub created_at: String,
}

/// A run with its log and its trace tree.
#[derive(Debug, Serialize, ToSchema)]
pub struct TraceView {
    pub run: RunView,
    pub events: Vec<EventView>,
    /// The trace tree `rein runs show` prints.
    pub tree: String,
}

/// The result of checking hash chains.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditView {
    /// No problem found.
    pub ok: bool,
    /// Runs checked.
    pub runs: usize,
    /// Events checked.
    pub events: usize,
    /// Each problem: the run and the first event that does not verify.
    pub problems: Vec<String>,
    /// More runs remain: pass this as `after` for the next page. Absent once the last of the
    /// tenant's runs has been checked (and for a single run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A tenant of `rein serve`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TenantView {
    pub name: String,
    /// API keys it has.
    pub keys: u64,
    pub created_at: String,
}

/// One entry of the admin log: a tenant created, or a key created or revoked.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdminEntryView {
    /// Position in the log: 0, 1, 2, ...
    pub seq: u64,
    pub at: String,
    /// `tenant_created`, `key_created` or `key_revoked`.
    pub action: String,
    pub tenant: String,
    /// The key's id, for key changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Who asked: `admin_api`, `cli` or `cli:<user>`, or `api:<tenant>` (a tenant created by
    /// registering its first agent).
    pub actor: String,
    pub prev_hash: String,
    pub hash: String,
}

/// A page of the admin log, checked.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdminLogView {
    /// The page's chain is intact, and linked to the entry before it.
    pub ok: bool,
    /// The first entry that does not verify, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    pub entries: Vec<AdminEntryView>,
    /// More entries follow: pass this as `after` for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
}

/// One of a tenant's API keys: its id, never the key.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    /// The first 16 hex digits of the key's SHA-256.
    pub id: String,
    pub created_at: String,
    /// When it stops working (past, once expired); absent: never.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// Cuts `items`, read as one more than a page of `limit` to learn whether another page
/// follows, to the page; returns whether one does. Every paged answer (runs, audits, the admin
/// log, the dashboard's list) reads its page this way.
pub fn cut_page<T>(items: &mut Vec<T>, limit: u32) -> bool {
    let limit = limit as usize;
    let more = items.len() > limit;
    items.truncate(limit);
    more
}
