//! What people read: the trace tree of a run, run listings, and JSON summaries.

use rein_core::time::format_utc;
use rein_core::{Event, EventKind, ToolStatus, Usage};
use rein_runtime::RunOutcome;
use rein_store::RunRecord;
use serde_json::{Value, json};
use std::fmt::Write;

fn tokens(u: &Usage) -> String {
    if u.cached_input_tokens > 0 {
        format!(
            "{} in ({} cached) / {} out",
            u.input_tokens, u.cached_input_tokens, u.output_tokens
        )
    } else {
        format!("{} in / {} out", u.input_tokens, u.output_tokens)
    }
}

/// The width a trace tree's lines are cut to: a terminal of 100 columns.
const TRACE_WIDTH: usize = 100;

/// `text` on one line, cut to `max` characters, redacted as every displayed payload is
/// (secrets, card numbers, national ids). Redacted first: a cut can leave a secret's first
/// characters, which no longer match what redaction looks for afterwards.
fn short(text: &str, max: usize) -> String {
    let text = rein_core::sanitize::redacted_for_display(text);
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        format!("{}…", one_line.chars().take(max - 1).collect::<String>())
    }
}

/// The trace tree of one run: each step with kind, name, latency, tokens, cost and status,
/// then totals and the termination reason.
pub fn trace(run: &RunRecord, events: &[Event]) -> String {
    let mut rows: Vec<[String; 6]> = Vec::new();
    let mut finish = None;
    // Worker agents: each run's outcome, and, by tool call, whether a failure was contained.
    let mut workers: Vec<(u32, String, bool, Option<String>)> = Vec::new();
    let mut worker_cost = rein_core::Usd::ZERO;
    let mut contained: Vec<String> = Vec::new();
    for event in events {
        match &event.kind {
            EventKind::ModelResponded {
                step,
                model,
                tool_calls,
                usage,
                cost,
                latency_ms,
                attempts,
                content,
                cached,
                ..
            } => {
                let what = if tool_calls.is_empty() {
                    format!("answer: {}", short(content.as_deref().unwrap_or(""), 90))
                } else {
                    let names: Vec<&str> = tool_calls.iter().map(|c| c.name.as_str()).collect();
                    format!("→ {}", names.join(", "))
                };
                let retries = if *cached {
                    " (cached)".to_string()
                } else if *attempts > 1 {
                    format!(" ({attempts} attempts)")
                } else {
                    String::new()
                };
                rows.push([
                    format!("#{step} model"),
                    model.clone(),
                    format!("{latency_ms} ms"),
                    tokens(usage),
                    cost.to_string(),
                    format!("ok{retries} {what}"),
                ]);
            }
            EventKind::ModelFailed {
                step,
                model,
                error_type,
                message,
                latency_ms,
                attempts,
                ..
            } => {
                let kind = serde_json::to_value(error_type).unwrap_or_default();
                rows.push([
                    format!("#{step} model"),
                    model.clone(),
                    format!("{latency_ms} ms"),
                    "-".into(),
                    "-".into(),
                    format!(
                        "FAILED after {attempts} attempt(s), {}: {}",
                        kind.as_str().unwrap_or("error"),
                        short(message, 90)
                    ),
                ]);
            }
            EventKind::ToolResult {
                step,
                tool,
                result,
                latency_ms,
                attempts,
                ..
            } => {
                let failed_workers: Vec<&(u32, String, bool, Option<String>)> = workers
                    .iter()
                    .filter(|(s, t, accepted, _)| s == step && t == tool && !accepted)
                    .collect();
                if !failed_workers.is_empty() {
                    let stopped = failed_workers
                        .iter()
                        .any(|(_, _, _, r)| r.as_deref() == Some("max_depth"));
                    let how = if stopped {
                        "not contained: a cascade past max_depth stops the whole tree"
                    } else if result.is_success() {
                        "its fallback answered"
                    } else {
                        "the caller's model was told"
                    };
                    let why: Vec<String> = failed_workers
                        .iter()
                        .map(|(_, _, _, r)| r.clone().unwrap_or_else(|| "failed".into()))
                        .collect();
                    contained.push(format!(
                        "`{tool}` (step {step}) {}: {how}",
                        why.join(", then ")
                    ));
                }
                let status = match (result.status, attempts) {
                    (ToolStatus::Success, 1) => "success".to_string(),
                    (ToolStatus::Success, n) => format!("success after {n} attempts"),
                    (ToolStatus::Error, 0) => format!(
                        "refused: {}",
                        short(result.message.as_deref().unwrap_or(""), 90)
                    ),
                    (ToolStatus::Error, n) => {
                        let kind = serde_json::to_value(result.error_type).unwrap_or_default();
                        format!(
                            "error ({}, {n} attempt(s)): {}",
                            kind.as_str().unwrap_or("error"),
                            short(result.message.as_deref().unwrap_or(""), 90)
                        )
                    }
                };
                rows.push([
                    format!("#{step} tool"),
                    tool.clone(),
                    format!("{latency_ms} ms"),
                    "-".into(),
                    "-".into(),
                    status,
                ]);
            }
            EventKind::RunFinished { reason, detail, .. } => {
                finish = Some((*reason, detail.clone()))
            }
            EventKind::ModelAttemptFailed {
                step,
                model,
                attempt,
                error_type,
                message,
                retry_in_ms,
            } => {
                let kind = serde_json::to_value(error_type).unwrap_or_default();
                rows.push([
                    format!("#{step} model"),
                    model.clone(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    format!(
                        "attempt {attempt} failed ({}): {}; retried after {retry_in_ms} ms",
                        kind.as_str().unwrap_or("error"),
                        short(message, 90)
                    ),
                ]);
            }
            EventKind::ModelFellBack {
                step,
                model,
                reason,
            } => rows.push([
                format!("#{step} model"),
                model.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("passed over: {}", short(reason, 90)),
            ]),
            EventKind::ApprovalRequested {
                step, tool, reason, ..
            } => rows.push([
                format!("#{step} approval"),
                tool.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("held: {}", short(reason, 90)),
            ]),
            EventKind::ApprovalDecided {
                step,
                approved,
                by,
                reason,
                ..
            } => rows.push([
                format!("#{step} approval"),
                by.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!(
                    "{}{}",
                    if *approved { "approved" } else { "DENIED" },
                    reason
                        .as_deref()
                        .map_or(String::new(), |r| format!(": {}", short(r, 90)))
                ),
            ]),
            // The governor at work: what a person asks about when a run was slow or stopped.
            EventKind::BudgetRefused {
                step,
                scope,
                amount,
                ..
            } => rows.push([
                format!("#{step} budget"),
                scope.key.clone(),
                "-".into(),
                format!("{} tokens", amount.tokens),
                amount.usd.to_string(),
                format!("REFUSED: {scope} could not cover the call"),
            ]),
            EventKind::BudgetWarning {
                scope,
                spent,
                percent,
            } => rows.push([
                "   budget".into(),
                scope.key.clone(),
                "-".into(),
                "-".into(),
                spent.usd.to_string(),
                format!("warning: past {percent}% of {scope}"),
            ]),
            EventKind::EgressRefused {
                step,
                target,
                host,
                range,
            } => rows.push([
                format!("#{step} egress"),
                target.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("REFUSED: {host} is {range} address"),
            ]),
            EventKind::RateLimited {
                step,
                scope,
                wait_ms,
                delayed,
            } => rows.push([
                format!("#{step} rate"),
                scope.clone(),
                format!("{wait_ms} ms"),
                "-".into(),
                "-".into(),
                if *delayed {
                    "waited its turn".to_string()
                } else {
                    "REJECTED: over the limit".to_string()
                },
            ]),
            // The guards: content they found instructions in, and what answers lost.
            EventKind::GuardVerdict {
                step,
                source,
                tool,
                verdict,
                score,
                rules,
                ..
            } if *verdict != rein_core::guard::Verdict::Allow => rows.push([
                format!("#{step} guard"),
                tool.clone().unwrap_or_else(|| source.as_str().to_string()),
                "-".into(),
                "-".into(),
                "-".into(),
                format!(
                    "{} (score {score}): {}",
                    verdict.as_str().to_uppercase(),
                    short(&rules.join(", "), 90)
                ),
            ]),
            EventKind::JudgeVerdict {
                step,
                score,
                threshold,
                passed,
                reason,
            } => rows.push([
                format!("#{step} judge"),
                "answer".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!(
                    "{} ({score} vs {threshold}): {}",
                    if *passed { "passed" } else { "FAILED" },
                    short(reason, 90)
                ),
            ]),
            // Worker agents: each child run, its budget, what it spent, whether it was taken.
            EventKind::WorkerStarted {
                step,
                tool,
                spec,
                run_id,
                budget,
                fallback,
                ..
            } => rows.push([
                format!("#{step} worker"),
                tool.clone(),
                "-".into(),
                format!("≤{} tokens", budget.max_total_tokens),
                format!("≤{}", budget.max_cost_usd),
                format!(
                    "{}started {spec} as run {run_id} (depth {})",
                    if *fallback { "fallback " } else { "" },
                    budget.depth
                ),
            ]),
            EventKind::WorkerFinished {
                step,
                tool,
                agent,
                status,
                reason,
                detail,
                cost,
                usage,
                accepted,
                ..
            } => {
                worker_cost += *cost;
                let ended = reason.map_or(status.to_string(), |r| r.to_string());
                workers.push((
                    *step,
                    tool.clone(),
                    *accepted,
                    reason.map(|r| r.to_string()),
                ));
                rows.push([
                    format!("#{step} worker"),
                    agent.clone(),
                    "-".into(),
                    tokens(usage),
                    cost.to_string(),
                    if *accepted {
                        format!("{ended}: answer taken")
                    } else {
                        format!(
                            "FAILED ({ended}): {}",
                            short(detail.as_deref().unwrap_or(""), 90)
                        )
                    },
                ]);
            }
            // A plan's life: each plan and revision, each step's start and report.
            EventKind::PlanMade {
                revision,
                steps,
                why,
            } => {
                let purposes: Vec<&str> = steps.iter().map(|s| s.purpose.as_str()).collect();
                rows.push([
                    "   plan".into(),
                    if *revision == 0 {
                        "first".to_string()
                    } else {
                        format!("revision {revision}")
                    },
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    format!(
                        "{} step(s): {} ({})",
                        steps.len(),
                        short(&purposes.join("; "), 90),
                        short(why, 90)
                    ),
                ]);
            }
            EventKind::PlanStepStarted {
                index,
                purpose,
                attempt,
            } => rows.push([
                "   step".into(),
                format!("{index}"),
                "-".into(),
                "-".into(),
                "-".into(),
                if *attempt > 1 {
                    format!("started, attempt {attempt}: {}", short(purpose, 90))
                } else {
                    format!("started: {}", short(purpose, 90))
                },
            ]),
            EventKind::PlanStepFinished {
                index,
                status,
                result,
                ..
            } => rows.push([
                "   step".into(),
                format!("{index}"),
                "-".into(),
                "-".into(),
                "-".into(),
                format!(
                    "{}: {}",
                    match status {
                        rein_core::plan::StepStatus::Done => "done",
                        rein_core::plan::StepStatus::Failed => "FAILED",
                    },
                    short(result, 90)
                ),
            ]),
            // A graph's walk: each node as it is entered and left, with why it went where.
            EventKind::NodeEntered {
                node,
                node_kind,
                visit,
            } => rows.push([
                "   node".into(),
                node.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                if *visit > 1 {
                    format!("entered ({node_kind}), visit {visit}")
                } else {
                    format!("entered ({node_kind})")
                },
            ]),
            EventKind::NodeFinished {
                node,
                writes,
                next,
                why,
            } => {
                let wrote = if writes.is_empty() {
                    String::new()
                } else {
                    let fields: Vec<&str> = writes.keys().map(String::as_str).collect();
                    format!("; wrote {}", fields.join(", "))
                };
                rows.push([
                    "   node".into(),
                    node.clone(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    format!("→ {next}: {}{wrote}", short(why, 90)),
                ]);
            }
            EventKind::OutputSanitized { findings, blocked } => rows.push([
                "   output".into(),
                "answer".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!(
                    "{}: {}",
                    if *blocked { "WITHHELD" } else { "redacted" },
                    short(
                        &findings
                            .iter()
                            .map(|f| format!("{} x{}", f.kind, f.count))
                            .collect::<Vec<_>>()
                            .join(", "),
                        60
                    )
                ),
            ]),
            _ => {}
        }
    }
    let mut out = String::new();
    let p = &run.progress;
    let _ = writeln!(
        out,
        "run {}  {} v{}\ntenant={} user={} session={}{}",
        run.info.id,
        run.info.agent,
        run.info.agent_version,
        run.info.tenant,
        run.info.user,
        run.info.session,
        run.info
            .job
            .as_ref()
            .map(|j| format!(" job={j}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "started {}  input: {}",
        format_utc(run.info.created_ms),
        short(&run.info.input, 60)
    );
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    // Each line fits a 100-column terminal: the outcome column gets what the others leave.
    let room = TRACE_WIDTH
        .saturating_sub(3 + widths.iter().sum::<usize>() + 2 * widths.len())
        .max(24);
    for (i, row) in rows.iter().enumerate() {
        let last = i + 1 == rows.len() && finish.is_none();
        let branch = if last { "└─" } else { "├─" };
        // An outcome too long for the line goes on a line of its own below its step.
        let one_line = short(&row[5], usize::MAX);
        let (outcome_head, more) = if one_line.chars().count() <= room {
            (one_line, None)
        } else {
            (String::new(), Some(one_line))
        };
        let line = format!(
            "{branch} {:<w0$}  {:<w1$}  {:>w2$}  {:<w3$}  {:>w4$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            outcome_head,
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
            w4 = widths[4],
        );
        let _ = writeln!(out, "{}", line.trim_end());
        if let Some(more) = more {
            let rail = if last { "  " } else { "│ " };
            let _ = writeln!(out, "{rail}    {}", short(&more, TRACE_WIDTH - 6));
        }
    }
    match &finish {
        Some((reason, detail)) => {
            let _ = writeln!(
                out,
                "└─ finished: {} ({}){}",
                p.status,
                reason,
                detail
                    .as_ref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            );
        }
        None => {
            let _ = writeln!(out, "└─ {} (no run_finished event yet)", p.status);
        }
    }
    if !workers.is_empty() {
        let taken = workers.iter().filter(|w| w.2).count();
        let _ = writeln!(
            out,
            "workers: {} run(s), {taken} answer(s) taken, {} spent by them (in this run's limits)",
            workers.len(),
            worker_cost
        );
        for c in &contained {
            let _ = writeln!(out, "  failure contained: {c}");
        }
    }
    let wall = (run.updated_ms - run.info.created_ms).max(0);
    let _ = writeln!(
        out,
        "totals: {} model calls, {} tool calls, {} tokens ({}), {}, {}.{:03} s",
        p.iterations,
        p.tool_calls,
        p.usage.total(),
        tokens(&p.usage),
        p.cost,
        wall / 1000,
        wall % 1000
    );
    let _ = write!(
        out,
        "termination: {}",
        p.reason
            .map_or_else(|| "(still running)".to_string(), |r| r.to_string())
    );
    out
}

/// A table of runs, newest first.
pub fn run_table(runs: &[RunRecord]) -> String {
    let mut rows = vec![[
        "RUN".to_string(),
        "AGENT".into(),
        "STATUS".into(),
        "REASON".into(),
        "STEPS".into(),
        "TOKENS".into(),
        "COST".into(),
        "CREATED (UTC)".into(),
    ]];
    for r in runs {
        let p = &r.progress;
        rows.push([
            r.info.id.to_string(),
            format!("{} v{}", r.info.agent, r.info.agent_version),
            p.status.to_string(),
            p.reason.map_or_else(|| "-".to_string(), |x| x.to_string()),
            (p.iterations + p.tool_calls).to_string(),
            p.usage.total().to_string(),
            p.cost.to_string(),
            format_utc(r.info.created_ms),
        ]);
    }
    table(&rows)
}

/// Left-aligned columns separated by two spaces.
pub fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .map(|(i, cell)| {
                    if i + 1 == N {
                        cell.clone()
                    } else {
                        format!("{cell:<w$}", w = widths[i])
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `--json` summary of a finished run.
pub fn outcome_json(o: &RunOutcome) -> Value {
    json!(crate::views::OutcomeView::of(o))
}

/// A stored run as JSON.
pub fn record_json(r: &RunRecord) -> Value {
    json!(crate::views::RunView::of(r))
}

/// Each tool call of a log that failed or was refused, as a line a person reads: the tool, the
/// kind of failure and its message (`get_order_status (permanent): connection refused`).
pub fn failed_tool_calls(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::ToolResult { tool, result, .. } if result.status == ToolStatus::Error => {
                let kind = result
                    .error_type
                    .map_or("error", rein_core::ErrorType::as_str);
                let message = result.message.as_deref().unwrap_or("no message");
                Some(format!("`{tool}` ({kind}): {message}"))
            }
            _ => None,
        })
        .collect()
}
