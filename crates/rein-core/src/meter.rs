//! What each event adds to the process's metrics.
//!
//! The counters and histograms `/metrics` shows are folded from the same events the log holds
//! (the log is also the metrics: ARCHITECTURE.md): the runtime hands every event it has made durable to the
//! run's [`RunMeter`] and applies the [`Measure`]s it returns to its metrics recorder. Nothing
//! here does I/O, so what an event is worth is tested without a recorder.

use crate::Usd;
use crate::breaker::BreakerState;
use crate::budget::{Scope, Standing};
use crate::event::{Event, EventKind};
use crate::spec::StepKind;
use crate::tool::ToolStatus;
use std::collections::HashMap;

/// A label's name and value.
pub type Label = (&'static str, String);

/// One change to a metric.
#[derive(Clone, Debug, PartialEq)]
pub enum Measure {
    /// Adds `by` to a counter.
    Count {
        /// Metric name.
        name: &'static str,
        /// Labels.
        labels: Vec<Label>,
        /// Increment.
        by: u64,
    },
    /// Records one observation in a histogram.
    Observe {
        /// Metric name.
        name: &'static str,
        /// Labels.
        labels: Vec<Label>,
        /// The value, in the metric's unit.
        value: f64,
    },
    /// Sets a gauge.
    Set {
        /// Metric name.
        name: &'static str,
        /// Labels.
        labels: Vec<Label>,
        /// The value, in the metric's unit.
        value: f64,
    },
}

/// Every metric a run's events move, with its help text: the one list `/metrics` describes.
pub const METRICS: &[(&str, &str)] = &[
    (
        "rein_runs_started_total",
        "Runs started, by tenant and agent.",
    ),
    (
        "rein_runs_finished_total",
        "Runs ended, by tenant, agent, status and termination reason.",
    ),
    (
        "rein_model_calls_total",
        "Model calls ended, by tenant, agent, model, step kind and outcome (responded or failed).",
    ),
    (
        "rein_model_tokens_total",
        "Tokens of answered model calls, by tenant, agent, model, step kind and type (input, cached_input, output).",
    ),
    (
        "rein_model_cost_micro_usd_total",
        "Cost of answered model calls in millionths of a US dollar, by tenant, agent, model and step kind.",
    ),
    (
        "rein_model_attempt_failures_total",
        "Model call attempts that failed (and were retried or fell back), by model and error type.",
    ),
    (
        "rein_model_fallbacks_total",
        "Model calls passed on to the next model of the chain, by the model given up on.",
    ),
    (
        "rein_model_latency_seconds",
        "Wall time of a model call, attempts and backoff included, by model.",
    ),
    (
        "rein_tool_calls_total",
        "Tool calls ended, by tenant, agent, tool and status (success, or the error type).",
    ),
    (
        "rein_tool_latency_seconds",
        "Wall time of a tool call that was made, attempts included, by tool.",
    ),
    (
        "rein_budget_refusals_total",
        "Model calls refused because a budget scope could not hold their worst case, by tenant.",
    ),
    (
        "rein_budget_warnings_total",
        "Budget scopes that crossed their warning line, by tenant.",
    ),
    (
        "rein_rate_limited_total",
        "Model calls held back by a rate limit, by tenant and whether they waited (delayed) or were rejected.",
    ),
    (
        "rein_egress_refused_total",
        "Connections a tenant's tool or model server asked for that the egress policy refused, by tenant.",
    ),
    (
        "rein_approvals_requested_total",
        "Tool calls that waited for a person's approval, by tenant, agent and tool.",
    ),
    (
        "rein_approvals_decided_total",
        "Approval decisions, by tenant, agent, tool and decision (approved or denied).",
    ),
    (
        "rein_guard_checks_total",
        "Untrusted content the injection guard checked, by tenant, agent, source (user, tool, document) and verdict (allow, flag, fence, block, escalate).",
    ),
    (
        "rein_judge_verdicts_total",
        "Final answers the LLM judge scored, by tenant, agent and outcome (passed or failed).",
    ),
    (
        "rein_worker_runs_total",
        "Worker agents' runs ended, by tenant, calling agent, tool, outcome (accepted, or failed) and the worker's termination reason.",
    ),
    (
        "rein_worker_cost_micro_usd_total",
        "What worker agents' runs spent, in millionths of a US dollar, by tenant, calling agent and tool (also counted in each worker's own model calls).",
    ),
    (
        "rein_graph_node_visits_total",
        "Graph nodes entered, by tenant, agent, node and node kind.",
    ),
    (
        "rein_plan_steps_total",
        "Plan steps ended, by tenant, agent and status (done or failed).",
    ),
    (
        "rein_plan_revisions_total",
        "Plans revised after the first, by tenant and agent.",
    ),
    (
        "rein_output_redactions_total",
        "Things found in final answers by the output sanitiser, by tenant, agent, kind (secret.*, pii.*, internal_url, stack_trace, prompt_leak) and action (redact, block).",
    ),
    ("rein_run_steps", "Model steps per ended run, by agent."),
    (
        "rein_run_duration_seconds",
        "Wall time from start to end of an ended run (waits for approval included), by agent.",
    ),
    (
        "rein_run_cost_usd",
        "Model cost of an ended run in US dollars, by agent.",
    ),
    (
        "rein_budget_utilisation_ratio",
        "Share of a tenant's daily or the global hourly budget spent (settled), by tenant, scope and limit (usd or tokens), as of the latest settlement.",
    ),
    (
        "rein_breaker_open",
        "Whether a circuit breaker is open (1) or not (0), as this process last saw it, by breaker.",
    ),
    (
        "rein_runs",
        "Runs not yet ended, by tenant and status (queued, running, awaiting_approval), read from the store at scrape time.",
    ),
];

/// The histogram buckets of each histogram in [`METRICS`].
pub fn buckets(name: &str) -> &'static [f64] {
    match name {
        "rein_model_latency_seconds" | "rein_tool_latency_seconds" => &[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ],
        "rein_run_duration_seconds" => &[
            0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 86400.0,
        ],
        "rein_run_steps" => &[1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0, 55.0, 100.0],
        "rein_run_cost_usd" => &[
            0.0001, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 50.0,
        ],
        _ => &[],
    }
}

/// What one run's events are worth to the metrics, folded event by event.
#[derive(Clone, Debug)]
pub struct RunMeter {
    tenant: String,
    agent: String,
    started_ms: Option<i64>,
    /// Each model step's kind, from its `model_requested`.
    kinds: HashMap<u32, StepKind>,
    /// Each approval's tool, by the step it waits on.
    awaiting: HashMap<u32, String>,
    steps: u32,
    cost: Usd,
}

impl RunMeter {
    /// A meter for a run of `agent` for `tenant`.
    pub fn new(tenant: &str, agent: &str) -> Self {
        RunMeter {
            tenant: tenant.to_string(),
            agent: agent.to_string(),
            started_ms: None,
            kinds: HashMap::new(),
            awaiting: HashMap::new(),
            steps: 0,
            cost: Usd::ZERO,
        }
    }

    /// Folds an event that was measured before (a resumed run's log) without measuring it
    /// again.
    pub fn replay(&mut self, event: &Event) {
        let _ = self.observe(event);
    }

    /// Folds `event` and returns what it adds to the metrics.
    pub fn observe(&mut self, event: &Event) -> Vec<Measure> {
        let tenant = || ("tenant", self.tenant.clone());
        let agent = || ("agent", self.agent.clone());
        let count = |name, labels, by| Measure::Count { name, labels, by };
        match &event.kind {
            EventKind::RunStarted { .. } => {
                self.started_ms = Some(event.ts_ms);
                vec![count("rein_runs_started_total", vec![tenant(), agent()], 1)]
            }
            EventKind::ModelRequested {
                step, step_kind, ..
            } => {
                self.steps += 1;
                if let Some(kind) = step_kind {
                    self.kinds.insert(*step, *kind);
                }
                Vec::new()
            }
            EventKind::ModelResponded {
                step,
                model,
                usage,
                cost,
                latency_ms,
                ..
            } => {
                self.cost += *cost;
                let labels = vec![
                    tenant(),
                    agent(),
                    ("model", model.clone()),
                    ("kind", self.kind_of(*step)),
                ];
                let with = |extra: Label| {
                    let mut l = labels.clone();
                    l.push(extra);
                    l
                };
                let mut out = vec![
                    count(
                        "rein_model_calls_total",
                        with(("outcome", "responded".into())),
                        1,
                    ),
                    count(
                        "rein_model_tokens_total",
                        with(("type", "input".into())),
                        usage.input_tokens,
                    ),
                    count(
                        "rein_model_tokens_total",
                        with(("type", "cached_input".into())),
                        usage.cached_input_tokens,
                    ),
                    count(
                        "rein_model_tokens_total",
                        with(("type", "output".into())),
                        usage.output_tokens,
                    ),
                    count(
                        "rein_model_cost_micro_usd_total",
                        labels.clone(),
                        u64::try_from(cost.micros()).unwrap_or(0),
                    ),
                ];
                out.push(latency(
                    "rein_model_latency_seconds",
                    "model",
                    model,
                    *latency_ms,
                ));
                out
            }
            EventKind::ModelFailed {
                step,
                model,
                latency_ms,
                ..
            } => vec![
                count(
                    "rein_model_calls_total",
                    vec![
                        tenant(),
                        agent(),
                        ("model", model.clone()),
                        ("kind", self.kind_of(*step)),
                        ("outcome", "failed".into()),
                    ],
                    1,
                ),
                latency("rein_model_latency_seconds", "model", model, *latency_ms),
            ],
            EventKind::ModelAttemptFailed {
                model, error_type, ..
            } => vec![count(
                "rein_model_attempt_failures_total",
                vec![
                    ("model", model.clone()),
                    ("error_type", error_type.as_str().into()),
                ],
                1,
            )],
            EventKind::ModelFellBack { model, .. } => vec![count(
                "rein_model_fallbacks_total",
                vec![("model", model.clone())],
                1,
            )],
            EventKind::ToolResult {
                tool,
                result,
                latency_ms,
                attempts,
                ..
            } => {
                let status = match (result.status, result.error_type) {
                    (ToolStatus::Success, _) => "success",
                    (ToolStatus::Error, Some(t)) => t.as_str(),
                    (ToolStatus::Error, None) => "error",
                };
                let mut out = vec![count(
                    "rein_tool_calls_total",
                    vec![
                        tenant(),
                        agent(),
                        ("tool", tool.clone()),
                        ("status", status.into()),
                    ],
                    1,
                )];
                if *attempts > 0 {
                    out.push(latency(
                        "rein_tool_latency_seconds",
                        "tool",
                        tool,
                        *latency_ms,
                    ));
                }
                out
            }
            EventKind::BudgetRefused { .. } => {
                vec![count("rein_budget_refusals_total", vec![tenant()], 1)]
            }
            EventKind::BudgetWarning { .. } => {
                vec![count("rein_budget_warnings_total", vec![tenant()], 1)]
            }
            EventKind::RateLimited { delayed, .. } => vec![count(
                "rein_rate_limited_total",
                vec![
                    tenant(),
                    ("delayed", if *delayed { "true" } else { "false" }.into()),
                ],
                1,
            )],
            EventKind::EgressRefused { .. } => {
                vec![count("rein_egress_refused_total", vec![tenant()], 1)]
            }
            EventKind::ApprovalRequested { step, tool, .. } => {
                self.awaiting.insert(*step, tool.clone());
                vec![count(
                    "rein_approvals_requested_total",
                    vec![tenant(), agent(), ("tool", tool.clone())],
                    1,
                )]
            }
            EventKind::ApprovalDecided { step, approved, .. } => {
                let tool = self.awaiting.remove(step).unwrap_or_default();
                vec![count(
                    "rein_approvals_decided_total",
                    vec![
                        tenant(),
                        agent(),
                        ("tool", tool),
                        (
                            "decision",
                            if *approved { "approved" } else { "denied" }.into(),
                        ),
                    ],
                    1,
                )]
            }
            EventKind::RunFinished { status, reason, .. } => {
                let mut out = vec![
                    count(
                        "rein_runs_finished_total",
                        vec![
                            tenant(),
                            agent(),
                            ("status", status.as_str().into()),
                            ("reason", reason.as_str().into()),
                        ],
                        1,
                    ),
                    Measure::Observe {
                        name: "rein_run_steps",
                        labels: vec![agent()],
                        value: f64::from(self.steps),
                    },
                    Measure::Observe {
                        name: "rein_run_cost_usd",
                        labels: vec![agent()],
                        value: self.cost.micros() as f64 / 1e6,
                    },
                ];
                if let Some(started) = self.started_ms {
                    out.push(Measure::Observe {
                        name: "rein_run_duration_seconds",
                        labels: vec![agent()],
                        value: (event.ts_ms - started).max(0) as f64 / 1000.0,
                    });
                }
                out
            }
            EventKind::GuardVerdict {
                source, verdict, ..
            } => vec![count(
                "rein_guard_checks_total",
                vec![
                    tenant(),
                    agent(),
                    ("source", source.as_str().into()),
                    ("verdict", verdict.as_str().into()),
                ],
                1,
            )],
            EventKind::WorkerFinished {
                tool,
                status,
                reason,
                cost,
                accepted,
                ..
            } => {
                let reason = reason.map_or(status.as_str(), |r| r.as_str());
                vec![
                    count(
                        "rein_worker_runs_total",
                        vec![
                            tenant(),
                            agent(),
                            ("tool", tool.clone()),
                            (
                                "outcome",
                                if *accepted { "accepted" } else { "failed" }.into(),
                            ),
                            ("reason", reason.into()),
                        ],
                        1,
                    ),
                    count(
                        "rein_worker_cost_micro_usd_total",
                        vec![tenant(), agent(), ("tool", tool.clone())],
                        u64::try_from(cost.micros()).unwrap_or(0),
                    ),
                ]
            }
            EventKind::NodeEntered {
                node, node_kind, ..
            } => vec![count(
                "rein_graph_node_visits_total",
                vec![
                    tenant(),
                    agent(),
                    ("node", node.clone()),
                    ("kind", node_kind.clone()),
                ],
                1,
            )],
            EventKind::PlanStepFinished { status, .. } => vec![count(
                "rein_plan_steps_total",
                vec![tenant(), agent(), ("status", status.as_str().into())],
                1,
            )],
            EventKind::PlanMade { revision, .. } if *revision > 0 => vec![count(
                "rein_plan_revisions_total",
                vec![tenant(), agent()],
                1,
            )],
            EventKind::JudgeVerdict { passed, .. } => vec![count(
                "rein_judge_verdicts_total",
                vec![
                    tenant(),
                    agent(),
                    ("outcome", if *passed { "passed" } else { "failed" }.into()),
                ],
                1,
            )],
            EventKind::OutputSanitized { findings, .. } => findings
                .iter()
                .map(|f| {
                    count(
                        "rein_output_redactions_total",
                        vec![
                            tenant(),
                            agent(),
                            ("kind", f.kind.clone()),
                            ("action", f.action.as_str().into()),
                        ],
                        u64::from(f.count),
                    )
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    fn kind_of(&self, step: u32) -> String {
        self.kinds
            .get(&step)
            .map_or("unknown", |k| k.as_str())
            .to_string()
    }
}

/// The utilisation gauges of one settled scope: tenant daily and global hourly scopes only (a
/// user's or session's scope would make a series per user or session).
pub fn budget_utilisation(scope: &Scope, standing: &Standing) -> Vec<Measure> {
    let mut parts = scope.key.split(':');
    let (kind, tenant) = match (parts.next(), parts.next()) {
        (Some("tenant"), Some(tenant)) => ("tenant_daily", tenant.to_string()),
        (Some("global"), _) => ("global_hourly", String::new()),
        _ => return Vec::new(),
    };
    let mut out = Vec::new();
    let mut gauge = |limit: &str, used: f64, cap: f64| {
        if cap > 0.0 {
            out.push(Measure::Set {
                name: "rein_budget_utilisation_ratio",
                labels: vec![
                    ("tenant", tenant.clone()),
                    ("scope", kind.to_string()),
                    ("limit", limit.to_string()),
                ],
                value: used / cap,
            });
        }
    };
    if let Some(cap) = scope.cap.usd {
        gauge(
            "usd",
            standing.spent.usd.micros() as f64,
            cap.micros() as f64,
        );
    }
    if let Some(cap) = scope.cap.tokens {
        gauge("tokens", standing.spent.tokens as f64, cap as f64);
    }
    out
}

/// The gauge of the breaker `key` in `state`.
pub fn breaker(key: &str, state: &BreakerState) -> Measure {
    Measure::Set {
        name: "rein_breaker_open",
        labels: vec![("breaker", key.to_string())],
        value: if state.opened_ms.is_some() { 1.0 } else { 0.0 },
    }
}

fn latency(name: &'static str, label: &'static str, value: &str, ms: u64) -> Measure {
    Measure::Observe {
        name,
        labels: vec![(label, value.to_string())],
        value: ms as f64 / 1000.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{Amount, Cap};
    use crate::{
        ErrorType, RunStatus, SessionId, TenantId, TerminationReason, ToolResult, Usage, UserId,
    };

    fn at(ts_ms: i64, kind: EventKind) -> Event {
        Event {
            seq: 0,
            ts_ms,
            kind,
        }
    }

    fn requested(step: u32, kind: StepKind) -> EventKind {
        EventKind::ModelRequested {
            step,
            model: "openai/gpt-4o-mini".into(),
            estimated_input_tokens: 10,
            max_output_tokens: 100,
            worst_case_cost: Usd::from_micros(500),
            tokens_remaining: 1000,
            cost_remaining: Usd::from_micros(10_000),
            step_kind: Some(kind),
            routed: false,
        }
    }

    fn responded(step: u32, input: u64, output: u64, micros: i64) -> EventKind {
        EventKind::ModelResponded {
            step,
            model: "openai/gpt-4o-mini".into(),
            content: None,
            tool_calls: Vec::new(),
            usage: Usage {
                input_tokens: input,
                cached_input_tokens: 2,
                cache_write_tokens: 0,
                output_tokens: output,
            },
            cost: Usd::from_micros(micros),
            latency_ms: 250,
            attempts: 1,
            finish_reason: None,
            cached: false,
        }
    }

    fn run() -> Vec<Event> {
        vec![
            at(
                1_000,
                EventKind::RunStarted {
                    agent: "support".into(),
                    agent_version: 1,
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
            at(1_001, requested(1, StepKind::Plan)),
            at(1_200, responded(1, 30, 7, 120)),
            at(
                1_300,
                EventKind::ToolResult {
                    step: 2,
                    call_id: "c1".into(),
                    tool: "lookup".into(),
                    result: ToolResult::error(ErrorType::Transient, "down"),
                    latency_ms: 40,
                    attempts: 2,
                },
            ),
            at(1_301, requested(3, StepKind::Final)),
            at(1_500, responded(3, 50, 11, 200)),
            at(
                3_500,
                EventKind::RunFinished {
                    status: RunStatus::Completed,
                    reason: TerminationReason::Completed,
                    detail: None,
                    output: None,
                },
            ),
        ]
    }

    fn count_of(measures: &[Measure], name: &str, want: &[(&str, &str)]) -> u64 {
        measures
            .iter()
            .filter_map(|m| match m {
                Measure::Count {
                    name: n,
                    labels,
                    by,
                } if *n == name => {
                    let matches = want
                        .iter()
                        .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v));
                    matches.then_some(*by)
                }
                _ => None,
            })
            .sum()
    }

    fn observed(measures: &[Measure], name: &str) -> Vec<f64> {
        measures
            .iter()
            .filter_map(|m| match m {
                Measure::Observe { name: n, value, .. } if *n == name => Some(*value),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_runs_events_add_up_to_its_tokens_cost_calls_and_outcome() {
        let mut meter = RunMeter::new("acme", "support");
        let measures: Vec<Measure> = run().iter().flat_map(|e| meter.observe(e)).collect();
        let who = [("tenant", "acme"), ("agent", "support")];
        assert_eq!(count_of(&measures, "rein_runs_started_total", &who), 1);
        let tokens = |t: &str, kind: &str| {
            count_of(
                &measures,
                "rein_model_tokens_total",
                &[("type", t), ("kind", kind), ("model", "openai/gpt-4o-mini")],
            )
        };
        assert_eq!(tokens("input", "plan"), 30);
        assert_eq!(tokens("output", "plan"), 7);
        assert_eq!(tokens("input", "final"), 50);
        assert_eq!(tokens("cached_input", "final"), 2);
        assert_eq!(
            count_of(&measures, "rein_model_cost_micro_usd_total", &who),
            320
        );
        assert_eq!(
            count_of(
                &measures,
                "rein_model_calls_total",
                &[("outcome", "responded")]
            ),
            2
        );
        assert_eq!(
            count_of(
                &measures,
                "rein_tool_calls_total",
                &[("tool", "lookup"), ("status", "transient")]
            ),
            1
        );
        assert_eq!(
            count_of(
                &measures,
                "rein_runs_finished_total",
                &[("status", "completed"), ("reason", "completed")]
            ),
            1
        );
        assert_eq!(observed(&measures, "rein_run_steps"), vec![2.0]);
        assert_eq!(observed(&measures, "rein_run_duration_seconds"), vec![2.5]);
        assert_eq!(observed(&measures, "rein_run_cost_usd"), vec![0.00032]);
        assert_eq!(
            observed(&measures, "rein_model_latency_seconds"),
            vec![0.25, 0.25]
        );
        assert_eq!(observed(&measures, "rein_tool_latency_seconds"), vec![0.04]);
    }

    /// A resumed run's meter folds the events measured before the crash without counting
    /// them again, and still ends the run with its whole story (steps, cost, duration).
    #[test]
    fn guard_verdicts_and_output_findings_are_counted_by_source_verdict_and_kind() {
        use crate::guard::{Source, Verdict};
        use crate::sanitize::{Action, Finding};
        let mut meter = RunMeter::new("acme", "support");
        let verdict = |source, verdict| EventKind::GuardVerdict {
            step: 2,
            source,
            call_id: None,
            tool: None,
            verdict,
            score: 0.9,
            rules: vec![],
        };
        let measures: Vec<Measure> = [
            verdict(Source::User, Verdict::Allow),
            verdict(Source::Tool, Verdict::Fence),
            verdict(Source::Tool, Verdict::Fence),
            EventKind::OutputSanitized {
                findings: vec![Finding {
                    kind: "pii.card".into(),
                    count: 2,
                    action: Action::Redact,
                }],
                blocked: false,
            },
        ]
        .into_iter()
        .flat_map(|k| meter.observe(&at(1_000, k)))
        .collect();
        let checks = |source: &str, verdict: &str| {
            count_of(
                &measures,
                "rein_guard_checks_total",
                &[("tenant", "acme"), ("source", source), ("verdict", verdict)],
            )
        };
        assert_eq!((checks("user", "allow"), checks("tool", "fence")), (1, 2));
        assert_eq!(checks("tool", "block"), 0);
        let found = [("kind", "pii.card"), ("action", "redact")];
        assert_eq!(
            count_of(&measures, "rein_output_redactions_total", &found),
            2
        );
    }

    #[test]
    fn workers_graph_nodes_and_plan_steps_are_counted() {
        use crate::plan::{PlanStep, StepStatus};
        let mut meter = RunMeter::new("acme", "boss");
        let measures: Vec<Measure> = [
            EventKind::WorkerFinished {
                step: 2,
                call_id: "c".into(),
                tool: "research".into(),
                run_id: crate::RunId::new("w"),
                agent: "researcher".into(),
                status: crate::RunStatus::LimitExceeded,
                reason: Some(crate::TerminationReason::Timeout),
                detail: None,
                cost: Usd::from_micros(120),
                usage: Usage::default(),
                accepted: false,
            },
            EventKind::NodeEntered {
                node: "triage".into(),
                node_kind: "llm".into(),
                visit: 1,
            },
            EventKind::PlanMade {
                revision: 0,
                steps: vec![PlanStep {
                    purpose: "a".into(),
                    tool: None,
                }],
                why: String::new(),
            },
            EventKind::PlanMade {
                revision: 1,
                steps: Vec::new(),
                why: String::new(),
            },
            EventKind::PlanStepFinished {
                index: 1,
                status: StepStatus::Failed,
                result: String::new(),
                attempt: 1,
            },
        ]
        .into_iter()
        .flat_map(|k| meter.observe(&at(1_000, k)))
        .collect();
        let failed = [
            ("tool", "research"),
            ("outcome", "failed"),
            ("reason", "timeout"),
        ];
        assert_eq!(count_of(&measures, "rein_worker_runs_total", &failed), 1);
        assert_eq!(
            count_of(
                &measures,
                "rein_worker_cost_micro_usd_total",
                &[("agent", "boss")]
            ),
            120
        );
        let node = [("node", "triage"), ("kind", "llm")];
        assert_eq!(
            count_of(&measures, "rein_graph_node_visits_total", &node),
            1
        );
        assert_eq!(count_of(&measures, "rein_plan_revisions_total", &[]), 1);
        let failed = [("status", "failed")];
        assert_eq!(count_of(&measures, "rein_plan_steps_total", &failed), 1);
    }

    #[test]
    fn a_resumed_run_counts_only_what_follows_its_replayed_log() {
        let events = run();
        let mut meter = RunMeter::new("acme", "support");
        for event in &events[..3] {
            meter.replay(event);
        }
        let measures: Vec<Measure> = events[3..].iter().flat_map(|e| meter.observe(e)).collect();
        assert_eq!(count_of(&measures, "rein_runs_started_total", &[]), 0);
        assert_eq!(
            count_of(&measures, "rein_model_tokens_total", &[("type", "input")]),
            50
        );
        assert_eq!(observed(&measures, "rein_run_steps"), vec![2.0]);
        assert_eq!(observed(&measures, "rein_run_cost_usd"), vec![0.00032]);
        assert_eq!(observed(&measures, "rein_run_duration_seconds"), vec![2.5]);
    }

    #[test]
    fn budget_gauges_cover_tenant_and_global_scopes_only() {
        let cap = Cap {
            usd: Some(Usd::from_micros(1_000_000)),
            tokens: Some(1_000),
        };
        let standing = Standing {
            spent: Amount {
                usd: Usd::from_micros(250_000),
                tokens: 100,
            },
            reserved: Amount::default(),
        };
        let scope = |key: &str| Scope {
            key: key.into(),
            cap,
        };
        let tenant = budget_utilisation(&scope("tenant:acme:2026-11-27"), &standing);
        assert_eq!(
            tenant,
            vec![
                Measure::Set {
                    name: "rein_budget_utilisation_ratio",
                    labels: vec![
                        ("tenant", "acme".into()),
                        ("scope", "tenant_daily".into()),
                        ("limit", "usd".into()),
                    ],
                    value: 0.25,
                },
                Measure::Set {
                    name: "rein_budget_utilisation_ratio",
                    labels: vec![
                        ("tenant", "acme".into()),
                        ("scope", "tenant_daily".into()),
                        ("limit", "tokens".into()),
                    ],
                    value: 0.1,
                },
            ]
        );
        assert_eq!(
            budget_utilisation(&scope("global:2026-11-27T10"), &standing).len(),
            2
        );
        assert!(budget_utilisation(&scope("user:acme:bob:2026-11-27"), &standing).is_empty());
        assert!(budget_utilisation(&scope("session:acme:s1"), &standing).is_empty());
    }
}
