//! A run's trace, as spans made from its event log (the log is also the trace: ARCHITECTURE.md).
//!
//! One trace per run, its id the run's (a UUIDv7 is 128 bits, as a trace id is), so a trace
//! found in any backend leads to `rein runs show` and back. Under the run's span: one span per
//! model call (named and attributed after the OpenTelemetry GenAI semantic conventions), per
//! tool call and per approval, each from the event that opened it to the one that closed it.
//! Span ids are derived from the run and the step, so exporting a run twice yields the same
//! spans. Nothing here does I/O: an exporter turns [`Span`]s into its wire format.

use crate::event::{Event, EventKind};
use crate::tool::ToolStatus;
use crate::{ErrorType, RunId, Usd};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Text.
    Str(String),
    /// An integer.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// A flag.
    Bool(bool),
    /// A list of texts.
    StrList(Vec<String>),
}

/// What a span reports about its outcome.
#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    /// Nothing went wrong.
    Ok,
    /// It failed, and why.
    Error(String),
}

/// Something that happened during a span (a retried attempt, a fallback).
#[derive(Clone, Debug, PartialEq)]
pub struct SpanEvent {
    /// Name.
    pub name: &'static str,
    /// When, in ms since the epoch.
    pub at_ms: i64,
    /// Attributes.
    pub attributes: Vec<(&'static str, Value)>,
}

/// What a span is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Work done inside the run (the run itself, an approval wait).
    Internal,
    /// A call out (a model, a tool).
    Client,
}

/// One span of a run's trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    /// The run's trace.
    pub trace_id: [u8; 16],
    /// This span.
    pub span_id: [u8; 8],
    /// The span it belongs under (`None` for the run's own span, unless its caller sent a
    /// `traceparent`: then the caller's span).
    pub parent: Option<[u8; 8]>,
    /// Whether `parent` is another process's span (the caller's).
    pub remote_parent: bool,
    /// Name (`invoke_agent support`, `chat openai/gpt-4o-mini`, `execute_tool lookup`).
    pub name: String,
    /// What it is.
    pub kind: Kind,
    /// Start, in ms since the epoch.
    pub start_ms: i64,
    /// End, in ms since the epoch.
    pub end_ms: i64,
    /// Attributes (`gen_ai.*` and `rein.*`).
    pub attributes: Vec<(&'static str, Value)>,
    /// Span events.
    pub events: Vec<SpanEvent>,
    /// Outcome.
    pub status: Status,
}

impl Span {
    /// The attribute `key`, if set.
    pub fn attribute(&self, key: &str) -> Option<&Value> {
        self.attributes
            .iter()
            .find_map(|(k, v)| (*k == key).then_some(v))
    }
}

/// Where a run's spans go once it has ended (an OTLP exporter, in the binary).
pub trait SpanSink: Send + Sync {
    /// Takes the spans of one ended run; must not block (exporting happens elsewhere).
    fn export(&self, spans: Vec<Span>);
}

/// The trace id of `run`: its UUID's 128 bits, or (for an id that is not a UUID) the first 16
/// bytes of its SHA-256.
pub fn trace_id(run: &RunId) -> [u8; 16] {
    let hex: String = run.as_str().chars().filter(|c| *c != '-').collect();
    let mut id = [0u8; 16];
    if hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0);
        }
    } else {
        id.copy_from_slice(&Sha256::digest(run.as_str().as_bytes())[..16]);
    }
    id
}

/// The trace and parent span a W3C `traceparent` header names (version 00: `00-<32 hex trace
/// id>-<16 hex span id>-<2 hex flags>`); `None` when it is not one (all-zero ids included), as
/// the W3C rules ask: the run then starts a trace of its own.
pub fn parse_traceparent(header: &str) -> Option<([u8; 16], [u8; 8])> {
    let mut parts = header.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() || flags.len() != 2 {
        return None;
    }
    let bytes = |hex: &str, out: &mut [u8]| {
        hex.len() == out.len() * 2
            && hex
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            && out.iter_mut().enumerate().all(|(i, b)| {
                u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).is_ok_and(|v| {
                    *b = v;
                    true
                })
            })
    };
    let (mut t, mut p) = ([0u8; 16], [0u8; 8]);
    (bytes(trace, &mut t) && bytes(span, &mut p) && u8::from_str_radix(flags, 16).is_ok())
        .then_some(())?;
    (t != [0; 16] && p != [0; 8]).then_some((t, p))
}

/// The `traceparent` header naming `span` of `trace` (sampled).
pub fn traceparent(trace: &[u8; 16], span: &[u8; 8]) -> String {
    format!(
        "00-{}-{}-01",
        crate::event::hex(trace),
        crate::event::hex(span)
    )
}

/// The trace of `run` and the caller's span it continues: the caller's trace when it sent a
/// valid `traceparent`, else the run's own ([`trace_id`]).
pub fn run_trace(run: &RunId, caller: Option<&str>) -> ([u8; 16], Option<[u8; 8]>) {
    match caller.and_then(parse_traceparent) {
        Some((trace, parent)) => (trace, Some(parent)),
        None => (trace_id(run), None),
    }
}

/// The trace of the run whose log is `events`: [`run_trace`] of the `traceparent` its
/// `run_started` kept.
pub fn log_trace(run: &RunId, events: &[Event]) -> ([u8; 16], Option<[u8; 8]>) {
    let caller = events.first().and_then(|e| match &e.kind {
        EventKind::RunStarted { trace_parent, .. } => trace_parent.as_deref(),
        _ => None,
    });
    run_trace(run, caller)
}

/// The id of a tool call's span (what the tool receives as the parent in `traceparent`).
pub fn tool_span_id(run: &RunId, step: u32, call_id: &str) -> [u8; 8] {
    span_id(run, &format!("tool:{step}:{call_id}"))
}

/// The id of the span `label` of `run` (stable: the same run gives the same ids).
pub fn span_id(run: &RunId, label: &str) -> [u8; 8] {
    let mut hasher = Sha256::new();
    hasher.update(run.as_str().as_bytes());
    hasher.update(b"\0");
    hasher.update(label.as_bytes());
    let mut id = [0u8; 8];
    id.copy_from_slice(&hasher.finalize()[..8]);
    // An all-zero span id is invalid.
    if id == [0; 8] {
        id[7] = 1;
    }
    id
}

/// `openai` for `openai/gpt-4o-mini`.
fn provider_of(model: &str) -> &str {
    model.split_once('/').map_or(model, |(p, _)| p)
}

fn usd(v: Usd) -> Value {
    Value::Float(v.micros() as f64 / 1e6)
}

fn text(s: impl Into<String>) -> Value {
    Value::Str(s.into())
}

fn int(n: impl TryInto<i64>) -> Value {
    Value::Int(n.try_into().unwrap_or(i64::MAX))
}

/// The spans of the run `run` whose log is `events` (from `run_started`). Spans still open at
/// the end of the log (a run paused for approval, or cut off by a crash) end at its last event.
pub fn spans(run: &RunId, events: &[Event]) -> Vec<Span> {
    let Some(first) = events.first() else {
        return Vec::new();
    };
    let (trace, caller_span) = log_trace(run, events);
    let root_id = span_id(run, "run");
    let last_ms = events.last().map_or(first.ts_ms, |e| e.ts_ms);
    let mut root = Span {
        trace_id: trace,
        span_id: root_id,
        parent: caller_span,
        remote_parent: caller_span.is_some(),
        name: "invoke_agent".into(),
        kind: Kind::Internal,
        start_ms: first.ts_ms,
        end_ms: last_ms,
        attributes: vec![
            ("gen_ai.operation.name", text("invoke_agent")),
            ("rein.run_id", text(run.as_str())),
        ],
        events: Vec::new(),
        status: Status::Ok,
    };
    // A step's span is a child of the graph node it ran in, or of the run's.
    let child = |parent: [u8; 8], label: String, name: String, kind: Kind, start_ms: i64| Span {
        trace_id: trace,
        span_id: span_id(run, &label),
        parent: Some(parent),
        remote_parent: false,
        name,
        kind,
        start_ms,
        end_ms: last_ms,
        attributes: Vec::new(),
        events: Vec::new(),
        status: Status::Ok,
    };
    let tool_span = |parent: [u8; 8], step: u32, call_id: &str, tool: &str, start_ms: i64| {
        let mut span = child(
            parent,
            format!("tool:{step}:{call_id}"),
            format!("execute_tool {tool}"),
            Kind::Client,
            start_ms,
        );
        span.attributes.extend([
            ("gen_ai.operation.name", text("execute_tool")),
            ("gen_ai.tool.name", text(tool)),
            ("gen_ai.tool.call.id", text(call_id)),
            ("rein.step", int(step)),
        ]);
        span
    };
    let mut done: Vec<Span> = Vec::new();
    // Open spans by step: model calls, tool calls (by call id), approvals.
    let mut models: HashMap<u32, Span> = HashMap::new();
    let mut tools: HashMap<String, Span> = HashMap::new();
    let mut approvals: HashMap<u32, Span> = HashMap::new();
    // The graph node or plan step the run is in, and the span its calls go under.
    let mut node: Option<Span> = None;
    let mut within = root_id;
    let (mut input, mut output, mut cost) = (0u64, 0u64, Usd::ZERO);
    // A guard check runs between the event that brought the content and its verdict.
    let mut previous_ms = 0;
    for event in events {
        let since = std::mem::replace(&mut previous_ms, event.ts_ms);
        match &event.kind {
            EventKind::RunStarted {
                agent,
                agent_version,
                tenant,
                user,
                session,
                ..
            } => {
                root.name = format!("invoke_agent {agent}");
                root.attributes.extend([
                    ("gen_ai.agent.name", text(agent.as_str())),
                    ("rein.agent_version", int(*agent_version)),
                    ("rein.tenant", text(tenant.as_str())),
                    ("rein.user", text(user.as_str())),
                    ("rein.session", text(session.as_str())),
                ]);
            }
            EventKind::ModelRequested {
                step,
                model,
                max_output_tokens,
                worst_case_cost,
                step_kind,
                ..
            } => {
                let mut span = child(
                    within,
                    format!("model:{step}"),
                    format!("chat {model}"),
                    Kind::Client,
                    event.ts_ms,
                );
                span.attributes.extend([
                    ("gen_ai.operation.name", text("chat")),
                    ("gen_ai.provider.name", text(provider_of(model))),
                    ("gen_ai.request.model", text(model.as_str())),
                    ("gen_ai.request.max_tokens", int(*max_output_tokens)),
                    ("rein.step", int(*step)),
                    ("rein.worst_case_cost_usd", usd(*worst_case_cost)),
                ]);
                if let Some(kind) = step_kind {
                    span.attributes
                        .push(("rein.step_kind", text(kind.as_str())));
                }
                models.insert(*step, span);
            }
            EventKind::ModelAttemptFailed {
                step,
                model,
                attempt,
                error_type,
                message,
                retry_in_ms,
            } => {
                if let Some(span) = models.get_mut(step) {
                    span.events.push(SpanEvent {
                        name: "rein.model_attempt_failed",
                        at_ms: event.ts_ms,
                        attributes: vec![
                            ("gen_ai.request.model", text(model.as_str())),
                            ("rein.attempt", int(*attempt)),
                            ("error.type", text(error_type.as_str())),
                            ("rein.message", text(message.as_str())),
                            ("rein.retry_in_ms", int(*retry_in_ms)),
                            ("rein.retry_safe", Value::Bool(true)),
                        ],
                    });
                }
            }
            EventKind::ModelFellBack {
                step,
                model,
                reason,
            } => {
                if let Some(span) = models.get_mut(step) {
                    let breaker_open = reason.contains("circuit breaker is open");
                    span.events.push(SpanEvent {
                        name: "rein.model_fell_back",
                        at_ms: event.ts_ms,
                        attributes: vec![
                            ("gen_ai.request.model", text(model.as_str())),
                            ("rein.reason", text(reason.as_str())),
                            (
                                "rein.breaker_state",
                                text(if breaker_open { "open" } else { "closed" }),
                            ),
                        ],
                    });
                }
            }
            EventKind::ModelResponded {
                step,
                model,
                usage,
                cost: call_cost,
                attempts,
                finish_reason,
                cached,
                ..
            } => {
                input += usage.input_tokens;
                output += usage.output_tokens;
                cost += *call_cost;
                if let Some(mut span) = models.remove(step) {
                    span.end_ms = event.ts_ms;
                    span.attributes.extend([
                        ("gen_ai.response.model", text(model.as_str())),
                        ("gen_ai.usage.input_tokens", int(usage.input_tokens)),
                        ("gen_ai.usage.output_tokens", int(usage.output_tokens)),
                        (
                            "rein.usage.cached_input_tokens",
                            int(usage.cached_input_tokens),
                        ),
                        ("rein.cost_usd", usd(*call_cost)),
                        ("rein.attempts", int(*attempts)),
                        ("rein.cached", Value::Bool(*cached)),
                        ("rein.breaker_state", text("closed")),
                    ]);
                    if let Some(reason) = finish_reason {
                        span.attributes.push((
                            "gen_ai.response.finish_reasons",
                            Value::StrList(vec![reason.clone()]),
                        ));
                    }
                    done.push(span);
                }
            }
            EventKind::ModelFailed {
                step,
                model,
                error_type,
                message,
                attempts,
                all_circuits_open,
                ..
            } => {
                if let Some(mut span) = models.remove(step) {
                    span.end_ms = event.ts_ms;
                    span.attributes.extend([
                        ("gen_ai.response.model", text(model.as_str())),
                        ("error.type", text(error_type.as_str())),
                        ("rein.attempts", int(*attempts)),
                        (
                            "rein.retry_safe",
                            Value::Bool(*error_type != ErrorType::Permanent),
                        ),
                        (
                            "rein.breaker_state",
                            text(if *all_circuits_open { "open" } else { "closed" }),
                        ),
                    ]);
                    span.status = Status::Error(message.clone());
                    done.push(span);
                }
            }
            EventKind::ToolRequested {
                step,
                call_id,
                tool,
                ..
            } => {
                tools.insert(
                    call_id.clone(),
                    tool_span(within, *step, call_id, tool, event.ts_ms),
                );
            }
            EventKind::ToolResult {
                step,
                call_id,
                tool,
                result,
                attempts,
                ..
            } => {
                // A call refused before it was made has no `tool_requested`: its span is the
                // instant of the refusal.
                let mut span = tools
                    .remove(call_id)
                    .unwrap_or_else(|| tool_span(within, *step, call_id, tool, event.ts_ms));
                span.end_ms = event.ts_ms;
                span.attributes.push(("rein.attempts", int(*attempts)));
                if result.status == ToolStatus::Error {
                    if let Some(t) = result.error_type {
                        span.attributes.push(("error.type", text(t.as_str())));
                    }
                    span.attributes
                        .push(("rein.retry_safe", Value::Bool(result.retry_safe)));
                    span.status =
                        Status::Error(result.message.clone().unwrap_or_else(|| "failed".into()));
                }
                done.push(span);
            }
            EventKind::GuardVerdict {
                step,
                source,
                tool,
                verdict,
                score,
                rules,
                ..
            } => {
                let what = tool.as_deref().unwrap_or(source.as_str());
                let mut span = child(
                    within,
                    format!("guard:{step}:{what}"),
                    format!("guard {what}"),
                    Kind::Internal,
                    since.min(event.ts_ms),
                );
                span.end_ms = event.ts_ms;
                span.attributes.extend([
                    ("rein.step", int(*step)),
                    ("rein.guard.source", text(source.as_str())),
                    ("rein.guard.verdict", text(verdict.as_str())),
                    ("rein.guard.score", Value::Float(*score)),
                    ("rein.guard.rules", Value::StrList(rules.clone())),
                ]);
                if verdict.stops() {
                    span.status = Status::Error(format!("content withheld: {}", rules.join(", ")));
                }
                done.push(span);
            }
            EventKind::ApprovalRequested {
                step, tool, reason, ..
            } => {
                let mut span = child(
                    within,
                    format!("approval:{step}"),
                    format!("approval {tool}"),
                    Kind::Internal,
                    event.ts_ms,
                );
                span.attributes.extend([
                    ("gen_ai.tool.name", text(tool.as_str())),
                    ("rein.step", int(*step)),
                    ("rein.approval.reason", text(reason.as_str())),
                ]);
                approvals.insert(*step, span);
            }
            EventKind::ApprovalDecided {
                step, approved, by, ..
            } => {
                if let Some(mut span) = approvals.remove(step) {
                    span.end_ms = event.ts_ms;
                    span.attributes.extend([
                        ("rein.approval.approved", Value::Bool(*approved)),
                        ("rein.approval.by", text(by.as_str())),
                    ]);
                    done.push(span);
                }
            }
            EventKind::NodeEntered {
                node: name,
                node_kind,
                visit,
            } => {
                let mut span = child(
                    root_id,
                    format!("node:{name}:{visit}"),
                    format!("node {name}"),
                    Kind::Internal,
                    event.ts_ms,
                );
                span.attributes.extend([
                    ("rein.node", text(name.as_str())),
                    ("rein.node.kind", text(node_kind.as_str())),
                    ("rein.node.visit", int(*visit)),
                ]);
                within = span.span_id;
                if let Some(open) = node.replace(span) {
                    done.push(open);
                }
            }
            EventKind::PlanMade {
                revision,
                steps,
                why,
            } => {
                let mut span = child(
                    root_id,
                    format!("plan:{revision}"),
                    "plan".into(),
                    Kind::Internal,
                    event.ts_ms,
                );
                span.end_ms = event.ts_ms;
                span.attributes.extend([
                    ("rein.plan.revision", int(*revision)),
                    (
                        "rein.plan.steps",
                        Value::StrList(steps.iter().map(|s| s.purpose.clone()).collect()),
                    ),
                    ("rein.plan.why", text(why.as_str())),
                ]);
                done.push(span);
            }
            // A plan step is a span over its executor's calls, as a graph node is.
            EventKind::PlanStepStarted {
                index,
                purpose,
                attempt,
            } => {
                let mut span = child(
                    root_id,
                    format!("plan_step:{index}:{attempt}"),
                    format!("plan_step {index}"),
                    Kind::Internal,
                    event.ts_ms,
                );
                span.attributes.extend([
                    ("rein.plan.step", int(*index)),
                    ("rein.plan.purpose", text(purpose.as_str())),
                    ("rein.plan.attempt", int(*attempt)),
                ]);
                within = span.span_id;
                if let Some(open) = node.replace(span) {
                    done.push(open);
                }
            }
            EventKind::PlanStepFinished { status, result, .. } => {
                if let Some(mut span) = node.take() {
                    span.end_ms = event.ts_ms;
                    span.attributes
                        .push(("rein.plan.status", text(status.as_str())));
                    if *status == crate::plan::StepStatus::Failed {
                        span.status = Status::Error(result.clone());
                    }
                    done.push(span);
                }
                within = root_id;
            }
            EventKind::NodeFinished {
                next, why, writes, ..
            } => {
                if let Some(mut span) = node.take() {
                    span.end_ms = event.ts_ms;
                    span.attributes.extend([
                        ("rein.node.next", text(next.as_str())),
                        ("rein.node.why", text(why.as_str())),
                        (
                            "rein.node.writes",
                            Value::StrList(writes.keys().cloned().collect()),
                        ),
                    ]);
                    done.push(span);
                }
                within = root_id;
            }
            EventKind::RunFinished {
                status,
                reason,
                detail,
                ..
            } => {
                root.end_ms = event.ts_ms;
                root.attributes.extend([
                    ("rein.status", text(status.as_str())),
                    ("rein.termination_reason", text(reason.as_str())),
                ]);
                if !matches!(status, crate::RunStatus::Completed) {
                    root.status = Status::Error(
                        detail
                            .clone()
                            .unwrap_or_else(|| format!("ended {}", reason.as_str())),
                    );
                }
            }
            _ => {}
        }
    }
    root.attributes.extend([
        ("gen_ai.usage.input_tokens", int(input)),
        ("gen_ai.usage.output_tokens", int(output)),
        ("rein.cost_usd", usd(cost)),
    ]);
    // Whatever the log leaves open ends with it.
    let mut open: Vec<Span> = models
        .into_values()
        .chain(tools.into_values())
        .chain(approvals.into_values())
        .chain(node)
        .collect();
    open.sort_by_key(|s| s.start_ms);
    done.extend(open);
    let mut all = vec![root];
    all.extend(done);
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::StepKind;
    use crate::{RunStatus, SessionId, TenantId, TerminationReason, ToolResult, Usage, UserId};

    fn at(ts_ms: i64, kind: EventKind) -> Event {
        Event {
            seq: 0,
            ts_ms,
            kind,
        }
    }

    fn log() -> Vec<Event> {
        vec![
            at(
                1_000,
                EventKind::RunStarted {
                    agent: "support".into(),
                    agent_version: 3,
                    spec_sha256: String::new(),
                    input: "hi".into(),
                    tenant: TenantId::new("acme"),
                    user: UserId::new("u"),
                    session: SessionId::new("s"),
                    job: None,
                    granted_scopes: Vec::new(),
                    trace_parent: None,
                    fence: None,
                    parent: None,
                    trust: Some(crate::Trust::Operator),
                },
            ),
            at(
                1_010,
                EventKind::ModelRequested {
                    step: 1,
                    model: "openai/gpt-4o-mini".into(),
                    estimated_input_tokens: 10,
                    max_output_tokens: 100,
                    worst_case_cost: Usd::from_micros(90),
                    tokens_remaining: 1000,
                    cost_remaining: Usd::from_micros(10_000),
                    step_kind: Some(StepKind::Plan),
                    routed: false,
                },
            ),
            at(
                1_050,
                EventKind::ModelAttemptFailed {
                    step: 1,
                    model: "openai/gpt-4o-mini".into(),
                    attempt: 1,
                    error_type: ErrorType::Transient,
                    message: "503".into(),
                    retry_in_ms: 100,
                },
            ),
            at(
                1_300,
                EventKind::ModelResponded {
                    step: 1,
                    model: "openai/gpt-4o-mini".into(),
                    content: None,
                    tool_calls: Vec::new(),
                    usage: Usage {
                        input_tokens: 30,
                        cached_input_tokens: 0,
                        cache_write_tokens: 0,
                        output_tokens: 7,
                    },
                    cost: Usd::from_micros(120),
                    latency_ms: 290,
                    attempts: 2,
                    finish_reason: Some("tool_calls".into()),
                    cached: false,
                },
            ),
            at(
                1_310,
                EventKind::ToolRequested {
                    step: 2,
                    call_id: "c1".into(),
                    tool: "lookup".into(),
                    arguments: serde_json::json!({}),
                },
            ),
            at(
                1_400,
                EventKind::ToolResult {
                    step: 2,
                    call_id: "c1".into(),
                    tool: "lookup".into(),
                    result: ToolResult::error(ErrorType::Permanent, "no such order"),
                    latency_ms: 90,
                    attempts: 1,
                },
            ),
            at(
                2_000,
                EventKind::RunFinished {
                    status: RunStatus::Completed,
                    reason: TerminationReason::Completed,
                    detail: None,
                    output: None,
                },
            ),
        ]
    }

    #[test]
    fn a_run_is_one_trace_with_a_span_per_call_under_the_runs() {
        let run = RunId::new("01a21b07-cfd1-7493-b4d2-9d944ba6fece");
        let spans = spans(&run, &log());
        assert_eq!(spans.len(), 3);
        let trace = trace_id(&run);
        assert_eq!(
            crate::event::hex(&trace),
            "01a21b07cfd17493b4d29d944ba6fece"
        );
        assert!(spans.iter().all(|s| s.trace_id == trace));
        let (root, model, tool) = (&spans[0], &spans[1], &spans[2]);
        assert_eq!(root.name, "invoke_agent support");
        assert_eq!(root.parent, None);
        assert_eq!((root.start_ms, root.end_ms), (1_000, 2_000));
        assert_eq!(
            root.attribute("rein.termination_reason"),
            Some(&text("completed"))
        );
        assert_eq!(
            root.attribute("gen_ai.usage.input_tokens"),
            Some(&Value::Int(30))
        );
        assert_eq!(model.name, "chat openai/gpt-4o-mini");
        assert_eq!(model.parent, Some(root.span_id));
        assert_eq!(model.kind, Kind::Client);
        assert_eq!((model.start_ms, model.end_ms), (1_010, 1_300));
        assert_eq!(
            model.attribute("gen_ai.provider.name"),
            Some(&text("openai"))
        );
        assert_eq!(
            model.attribute("gen_ai.usage.output_tokens"),
            Some(&Value::Int(7))
        );
        assert_eq!(
            model.attribute("gen_ai.response.finish_reasons"),
            Some(&Value::StrList(vec!["tool_calls".into()]))
        );
        assert_eq!(model.attribute("rein.step_kind"), Some(&text("plan")));
        assert_eq!(model.events.len(), 1);
        assert_eq!(model.status, Status::Ok);
        assert_eq!(tool.name, "execute_tool lookup");
        assert_eq!(tool.parent, Some(root.span_id));
        assert_eq!(tool.attribute("rein.retry_safe"), Some(&Value::Bool(false)));
        assert_eq!(tool.status, Status::Error("no such order".into()));
        // Stable ids: the same log gives the same spans.
        assert_eq!(super::spans(&run, &log()), spans);
        let ids: std::collections::HashSet<_> = spans.iter().map(|s| s.span_id).collect();
        assert_eq!(ids.len(), 3);
    }

    #[test]
    fn each_guard_check_is_a_span_from_the_content_to_its_verdict() {
        use crate::guard::{Source, Verdict};
        let run = RunId::new("01a21b07-cfd1-7493-b4d2-9d944ba6fece");
        let mut events = log();
        let tool_result = events
            .iter()
            .position(|e| matches!(e.kind, EventKind::ToolResult { .. }))
            .unwrap();
        let arrived = events[tool_result].ts_ms;
        events.insert(
            tool_result + 1,
            at(
                arrived + 3,
                EventKind::GuardVerdict {
                    step: 2,
                    source: Source::Tool,
                    call_id: Some("c1".into()),
                    tool: Some("lookup".into()),
                    verdict: Verdict::Block,
                    score: 0.8,
                    rules: vec!["override.ignore_previous".into()],
                },
            ),
        );
        let spans = spans(&run, &events);
        let guard = spans.iter().find(|s| s.name == "guard lookup").unwrap();
        assert_eq!(guard.parent, Some(spans[0].span_id));
        assert_eq!((guard.start_ms, guard.end_ms), (arrived, arrived + 3));
        assert_eq!(guard.attribute("rein.guard.verdict"), Some(&text("block")));
        assert_eq!(
            guard.attribute("rein.guard.score"),
            Some(&Value::Float(0.8))
        );
        assert_eq!(
            guard.attribute("rein.guard.rules"),
            Some(&Value::StrList(vec!["override.ignore_previous".into()]))
        );
        assert!(matches!(guard.status, Status::Error(_)));
    }

    /// A caller's `traceparent` makes the run's trace part of the caller's: same trace id, the
    /// run's span under the caller's span; a malformed one is ignored.
    #[test]
    fn a_callers_traceparent_is_continued_and_a_bad_one_ignored() {
        let run = RunId::new("01a21b07-cfd1-7493-b4d2-9d944ba6fece");
        let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut events = log();
        if let EventKind::RunStarted { trace_parent, .. } = &mut events[0].kind {
            *trace_parent = Some(caller.into());
        }
        let spans = spans(&run, &events);
        assert!(
            spans
                .iter()
                .all(|s| crate::event::hex(&s.trace_id) == "4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let root = &spans[0];
        assert_eq!(
            root.parent.map(|p| crate::event::hex(&p)).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert!(root.remote_parent);
        assert!(
            spans[1..]
                .iter()
                .all(|s| s.parent == Some(root.span_id) && !s.remote_parent)
        );
        // What a tool is told: its own span, in the caller's trace.
        let tool = spans
            .iter()
            .find(|s| s.name == "execute_tool lookup")
            .unwrap();
        assert_eq!(tool.span_id, tool_span_id(&run, 2, "c1"));
        assert_eq!(
            traceparent(&tool.trace_id, &tool.span_id),
            format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
                crate::event::hex(&tool.span_id)
            )
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        assert_eq!(run_trace(&run, Some("garbage")), (trace_id(&run), None));
    }

    /// A run paused for approval: the approval span is open, and ends with the log.
    #[test]
    fn spans_left_open_end_with_the_log() {
        let run = RunId::new("not-a-uuid");
        let mut events = log();
        events.truncate(5);
        let spans = spans(&run, &events);
        let tool = spans
            .iter()
            .find(|s| s.name == "execute_tool lookup")
            .unwrap();
        assert_eq!((tool.start_ms, tool.end_ms), (1_310, 1_310));
        assert_eq!(spans[0].end_ms, 1_310);
        assert_eq!(
            crate::event::hex(&spans[0].trace_id),
            crate::event::sha256_hex(b"not-a-uuid")[..32]
        );
    }
}
