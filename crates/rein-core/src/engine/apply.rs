//! `Engine::apply`: how each recorded event changes a run's state. The only way state changes,
//! so replaying a log rebuilds the run.

use super::*;
use crate::Usd;
use crate::event::{Event, EventKind};
use crate::guard::{self, OnJudgeFail, Policy, ResultTrust, Source, Verdict};
use crate::message::{ChatRequest, Message, Role, Usage};
use crate::run::TerminationReason;
use crate::sanitize;
use crate::spec::{EscalationTrigger, OnDeny};
use serde_json::{Map, Value};
use std::collections::HashMap;

impl Engine {
    /// Folds one recorded event into the state. Events must come in log order.
    pub fn apply(&mut self, event: &Event) -> Result<(), ReplayError> {
        let seq = event.seq;
        if self.finished.is_some() {
            return Err(ReplayError::AfterFinish { seq });
        }
        match (&event.kind, self.clock.started_ms) {
            (EventKind::RunStarted { .. }, Some(_)) => return Err(ReplayError::BadStart { seq }),
            (EventKind::RunStarted { .. }, None) => {}
            (_, None) => return Err(ReplayError::BadStart { seq }),
            _ => {}
        }
        let previous_ts = self.clock.last_ts_ms.replace(event.ts_ms);
        if self.review.unchecked.is_some()
            && matches!(
                event.kind,
                EventKind::ModelRequested { .. }
                    | EventKind::BudgetReserved { .. }
                    | EventKind::RateLimited { .. }
                    | EventKind::ToolRequested { .. }
                    | EventKind::ToolResult { .. }
                    | EventKind::ApprovalRequested { .. }
                    | EventKind::RunFinished { .. }
            )
            && let Some(unchecked) = self.review.unchecked.take()
        {
            // A log written before guards checked content: it went to the model unchecked.
            self.release(unchecked, Verdict::Allow, &[]);
        }
        match &event.kind {
            EventKind::RunStarted {
                input,
                granted_scopes,
                fence,
                parent,
                trust,
                ..
            } => {
                self.clock.started_ms = Some(event.ts_ms);
                self.trust = *trust;
                // A worker's tree is bounded by its top run's limit and by its own.
                let own = self.agent.spec.limits.max_depth;
                (self.tree.depth, self.tree.max_depth) = match parent {
                    Some(p) => (p.depth, p.max_depth.min(p.depth.saturating_add(own))),
                    None => (0, own),
                };
                self.granted_scopes = granted_scopes.clone();
                self.input = input.clone();
                self.review.input_message = input.clone();
                let spec = &self.agent.spec;
                self.review.fence = fence.clone().filter(|_| spec.guards.fences(&spec.tools));
                if spec.flow.plan().is_some() {
                    self.start_plan();
                }
                self.begin_conversation([]);
                if let Some(graph) = self.agent.spec.flow.graph() {
                    self.graph = Some(Box::new(GraphRun {
                        state: Map::new(),
                        node: graph.start.clone(),
                        entered: false,
                        visits: HashMap::new(),
                        exit: None,
                    }));
                }
                if self.agent.spec.guards.input != Policy::Off {
                    self.review.unchecked = Some(ContentCheck {
                        source: Source::User,
                        step: 0,
                        call: None,
                        text: input.clone(),
                    });
                }
            }
            EventKind::JudgeVerdict {
                step,
                score,
                threshold,
                passed,
                reason,
            } => {
                let Some((_, answer, ..)) = self.review.judged.take() else {
                    return Ok(());
                };
                if *passed {
                    self.finish = Some(Finish {
                        reason: TerminationReason::Completed,
                        detail: None,
                        output: Some(answer),
                    });
                    return Ok(());
                }
                let why =
                    format!("the judge scored the answer {score}, below {threshold}: {reason}");
                let Some(judge) = self.agent.spec.guards.judge.clone() else {
                    return Ok(());
                };
                match judge.on_fail {
                    OnJudgeFail::Repair if self.review.judge_repairs < judge.max_repairs => {
                        self.review.judge_repairs += 1;
                        self.repair_pending = true;
                        self.push_message(Message::text(
                            Role::User,
                            format!("A reviewer scored that answer {score} out of 1 (it needs {threshold}): {reason}. Revise your answer."),
                        ));
                    }
                    OnJudgeFail::Repair => self.finish_with(
                        TerminationReason::OutputInvalid,
                        format!("{why}; still failing after {} repair(s)", judge.max_repairs),
                    ),
                    OnJudgeFail::Approve => {
                        self.held_answer = Some((*step, answer));
                        self.review.held_reason = Some(why);
                    }
                    OnJudgeFail::Escalate => {
                        if self.finish.is_none() {
                            self.finish = Some(self.escalation(
                                "judge",
                                &why,
                                serde_json::json!({"answer": answer}),
                            ));
                        }
                    }
                }
            }
            EventKind::OutputSanitized { findings, blocked } => {
                self.review.output_checked = true;
                let completed = self
                    .finish
                    .as_ref()
                    .is_some_and(|f| f.reason == TerminationReason::Completed);
                if completed && *blocked {
                    let kinds: Vec<&str> = findings
                        .iter()
                        .filter(|f| f.action == sanitize::Action::Block)
                        .map(|f| f.kind.as_str())
                        .collect();
                    self.finish = Some(Finish {
                        reason: TerminationReason::GuardrailBlocked,
                        detail: Some(format!(
                            "the answer was withheld: it contained {} (guards.output)",
                            kinds.join(", ")
                        )),
                        output: None,
                    });
                } else if completed
                    && let Some(output) = self.finish.as_ref().and_then(|f| f.output.clone())
                {
                    let (clean, _) = self.sanitized(&output);
                    if let Some(finish) = self.finish.as_mut() {
                        finish.output = Some(clean);
                    }
                }
            }
            EventKind::GuardVerdict {
                step,
                call_id,
                verdict,
                score,
                rules,
                ..
            } => {
                let second_opinion = rules.iter().any(|r| r == guard::CLASSIFIER_RULE);
                let held = if second_opinion {
                    self.review.classified.take().map(|(check, ..)| check)
                } else {
                    self.review.unchecked.take()
                };
                let Some(unchecked) = held else {
                    return Ok(());
                };
                if unchecked.step != *step
                    || unchecked.call.as_ref().map(|(id, _)| id) != call_id.as_ref()
                {
                    // A verdict on something else: keep waiting for the held content's own.
                    self.review.unchecked = Some(unchecked);
                    return Ok(());
                }
                if let Some(classifier) = self.agent.spec.guards.classifier
                    && !second_opinion
                    && *verdict == Verdict::Allow
                    && *score >= classifier.min_score
                    && self.agent.spec.guards.policy(unchecked.source) != Policy::Off
                {
                    // Let through by the detector: a model gives a second opinion first.
                    let conversation = self.set_aside(
                        guard::CLASSIFIER_INSTRUCTIONS.to_string(),
                        format!("The text to check:\n<text>\n{}\n</text>", unchecked.text),
                    );
                    self.review.classifying = Some((unchecked, conversation));
                    return Ok(());
                }
                let origin = unchecked.origin();
                self.release(unchecked, *verdict, rules);
                let why = format!(
                    "{origin} carried a prompt injection (score {score}; rules: {})",
                    rules.join(", ")
                );
                match verdict {
                    Verdict::Block => self.finish_with(
                        TerminationReason::GuardrailBlocked,
                        format!("{why}; the guard's policy is to block it"),
                    ),
                    Verdict::Escalate if self.finish.is_none() => {
                        let pending = self.pending_action();
                        self.finish = Some(self.escalation("guardrail", &why, pending));
                    }
                    _ => {}
                }
            }
            EventKind::SessionContext {
                messages,
                summarize,
            } => {
                if *summarize {
                    // The first call is the summary; the run proper starts once it is in.
                    self.summarizing = true;
                    let transcript: Vec<String> = messages
                        .iter()
                        .filter_map(|m| {
                            let who = match m.role {
                                Role::User => "User",
                                Role::Assistant => "Assistant",
                                _ => return None,
                            };
                            m.content.as_ref().map(|c| format!("{who}: {c}"))
                        })
                        .collect();
                    self.forget_messages();
                    self.push_message(Message::text(Role::System, SUMMARIZE_INSTRUCTIONS));
                    self.push_message(Message::text(Role::User, transcript.join("\n\n")));
                } else {
                    self.begin_conversation(messages.iter().cloned());
                }
            }
            EventKind::BudgetReserved { .. }
            | EventKind::ModelAttemptFailed { .. }
            | EventKind::ModelFellBack { .. }
            | EventKind::BudgetSettled { .. } => {}
            EventKind::BudgetWarning { scope, percent, .. } => {
                if self
                    .agent
                    .spec
                    .escalation
                    .on(EscalationTrigger::BudgetWarning)
                {
                    let detail = format!("the shared budget {scope} passed {percent}% of its cap");
                    self.end_or_escalate(
                        TerminationReason::Escalated,
                        EscalationTrigger::BudgetWarning,
                        detail,
                    );
                }
            }
            EventKind::RateLimited { delayed: true, .. } => {}
            // The refused call's own result (or failure) follows and is what the run acts on.
            EventKind::EgressRefused { .. } => {}
            EventKind::RateLimited { scope, wait_ms, .. } => {
                let detail = if *wait_ms > 0 {
                    format!(
                        "rate limit {scope} reached: the next model call would have to wait {} s; try again then",
                        (wait_ms + 999) / 1000
                    )
                } else {
                    format!("rate limit {scope} is smaller than one model call needs")
                };
                self.finish_with(TerminationReason::Error, detail);
            }
            EventKind::BudgetRefused {
                scope,
                standing,
                amount,
                ..
            } => {
                let detail = format!(
                    "the shared budget {scope} could not cover the next model call: {} and {} tokens spent, {} and {} tokens held by other calls, {} and {} tokens needed",
                    standing.spent.usd,
                    standing.spent.tokens,
                    standing.reserved.usd,
                    standing.reserved.tokens,
                    amount.usd,
                    amount.tokens
                );
                self.finish_with(TerminationReason::BudgetExhausted, detail);
            }
            EventKind::ModelRequested { step, .. } => {
                // A call re-requested after a crash (same step, still in flight) is the same
                // iteration, not a new one.
                if !(self.model_in_flight && *step == self.step) {
                    self.spend.iterations += 1;
                }
                self.step = self.step.max(*step);
                self.model_in_flight = true;
            }
            EventKind::ModelResponded {
                content,
                tool_calls,
                usage,
                cost,
                finish_reason,
                ..
            } => {
                self.model_in_flight = false;
                self.repair_pending = false;
                self.spend.usage.add(usage);
                self.spend.cost += *cost;
                if let Some((check, conversation)) = self.review.classifying.take() {
                    // The classifier's reply is a verdict, not a turn of the conversation.
                    self.restore(conversation);
                    let (injection, confidence) =
                        parse_classifier_reply(content.as_deref().unwrap_or(""));
                    self.review.classified = Some((check, injection, confidence));
                    return Ok(());
                }
                if let Some((answer, conversation)) = self.review.judging.take() {
                    // The judge's reply is a verdict, not a turn of the conversation.
                    self.restore(conversation);
                    let (score, reason) = parse_judge_reply(content.as_deref().unwrap_or(""));
                    self.review.judged = Some((self.step, answer, score, reason));
                    return Ok(());
                }
                if self.summarizing {
                    self.summarizing = false;
                    self.summary_calls += 1;
                    let summary = content.clone().unwrap_or_default();
                    self.begin_conversation([session_summary_message(&summary)]);
                    return Ok(());
                }
                self.push_message(Message {
                    role: Role::Assistant,
                    content: content.clone(),
                    tool_calls: tool_calls.clone(),
                    tool_call_id: None,
                });
                if self.chat.is_some() {
                    self.after_chat_reply(content.as_deref(), tool_calls, finish_reason.as_deref());
                    return Ok(());
                }
                self.after_model_reply(content.as_deref(), tool_calls);
            }
            EventKind::ModelFailed {
                error_type,
                message,
                attempts,
                all_circuits_open,
                ..
            } => {
                self.model_in_flight = false;
                if *all_circuits_open {
                    self.end_or_escalate(
                        TerminationReason::CircuitOpen,
                        EscalationTrigger::CircuitOpen,
                        format!("every model this step could use has an open circuit breaker, so none was called: {message}"),
                    );
                }
                if self.past_deadline(event.ts_ms) {
                    self.finish_with(
                        TerminationReason::Timeout,
                        format!(
                            "the model call was cut off at the run's wall-clock limit: {message}"
                        ),
                    );
                }
                let kind = serde_json::to_value(error_type).unwrap_or_default();
                let kind = kind.as_str().unwrap_or("error");
                self.finish_with(
                    TerminationReason::Error,
                    format!(
                        "the model call failed after {attempts} attempt(s) ({kind}): {message}"
                    ),
                );
            }
            EventKind::ToolRequested { step, call_id, .. } => {
                self.step = self.step.max(*step);
                self.tool_in_flight = Some((call_id.clone(), *step));
                if let Some(approval @ Approval::Approved) = self.approvals.get_mut(step) {
                    *approval = Approval::Used;
                }
            }
            EventKind::ChatRequest(ChatRequest {
                messages,
                tools,
                max_output_tokens,
                temperature,
                tool_choice,
            }) => {
                // The caller's conversation replaces the spec's instructions and input: the
                // caller owns it, so it is neither scanned nor fenced here.
                self.review.unchecked = None;
                self.review.fence = None;
                self.context.fixed_tokens = tool_tokens(self.context.counter, tools);
                self.context.tool_definitions = tools.clone();
                self.forget_messages();
                for m in messages {
                    self.push_message(m.clone());
                }
                self.chat = Some(Chat {
                    max_output_tokens: *max_output_tokens,
                    temperature: *temperature,
                    tool_choice: tool_choice.clone(),
                });
            }
            EventKind::NodeEntered { node, visit, .. } => self.enter_node(node, *visit),
            EventKind::WorkerStarted {
                step,
                call_id,
                budget,
                run_id,
                fallback,
                ..
            } => {
                self.worker_started(budget);
                self.tree
                    .worker_children
                    .entry((*step, call_id.clone()))
                    .or_default()
                    .push(WorkerChild {
                        run_id: run_id.clone(),
                        budget: *budget,
                        fallback: *fallback,
                        finished: false,
                        spent: (Usd::ZERO, Usage::default()),
                    });
            }
            EventKind::WorkerFinished {
                step,
                call_id,
                run_id,
                reason,
                detail,
                cost,
                usage,
                ..
            } => {
                let budget = self
                    .tree
                    .worker_children
                    .get_mut(&(*step, call_id.clone()))
                    .and_then(|children| {
                        children
                            .iter_mut()
                            .find(|c| &c.run_id == run_id && !c.finished)
                    })
                    .map(|child| {
                        child.finished = true;
                        child.spent = (*cost, *usage);
                        child.budget
                    });
                self.worker_finished(budget, *reason, detail.as_deref(), *cost, usage);
            }
            EventKind::PlanMade {
                revision, steps, ..
            } => self.plan_made(*revision, steps),
            EventKind::PlanStepStarted { index, attempt, .. } => {
                self.plan_step_started(*index, *attempt);
            }
            EventKind::PlanStepFinished {
                index,
                status,
                result,
                ..
            } => self.plan_step_finished(*index, *status, result),
            EventKind::NodeFinished { writes, next, .. } => {
                if let Some(g) = self.graph.as_mut() {
                    g.state
                        .extend(writes.iter().map(|(k, v)| (k.clone(), v.clone())));
                    g.node = next.clone();
                    g.entered = false;
                    g.exit = None;
                }
            }
            EventKind::RunClaimed { by } => {
                if self.step == 0 && self.spend.iterations == 0 {
                    // A queued run's clock starts when a worker takes it up, not when it was
                    // queued.
                    self.clock.started_ms = Some(event.ts_ms);
                } else if let Some(previous) = previous_ts
                    && self.clock.takeovers < MAX_TAKEOVERS
                {
                    // Taken up again after its process stopped (a crash, a lost database):
                    // the time it lay unattended, lease expiry included, is not its own work.
                    // Only so many times: a run that keeps failing must still time out.
                    self.clock.takeovers += 1;
                    self.clock.paused_ms = self
                        .clock
                        .paused_ms
                        .saturating_add(event.ts_ms.saturating_sub(previous).max(0));
                }
                self.clock.last_claimed_by = Some(by.clone());
            }
            EventKind::ToolResult {
                step,
                call_id,
                tool: tool_name,
                result,
                attempts,
                ..
            } => {
                self.step = self.step.max(*step);
                self.tool_in_flight = None;
                let call = match self.pending_tools.front() {
                    Some(front) if &front.id == call_id => self.pending_tools.pop_front(),
                    _ => None,
                };
                let arguments = call
                    .as_ref()
                    .and_then(|c| serde_json::from_str::<Value>(&c.arguments).ok())
                    .unwrap_or(Value::Null);
                self.steps_done.push(serde_json::json!({
                    "step": step,
                    "tool": tool_name,
                    "arguments": arguments,
                    "status": if result.is_success() { "success" } else { "error" },
                    "message": result.message,
                }));
                if let Some(call) = call {
                    self.spend.tool_calls += 1;
                    *self
                        .spend
                        .calls_per_tool
                        .entry(call.name.clone())
                        .or_default() += 1;
                    *self
                        .loops
                        .repeated_calls
                        .entry(call_signature(&call))
                        .or_default() += 1;
                }
                // A result the tool itself returned (attempts > 0; refusals are Rein's own
                // words) is untrusted unless the contract vouches for it.
                let trust = self
                    .agent
                    .tool(tool_name)
                    .map_or(ResultTrust::Trusted, |(t, _)| t.contract.results);
                let source = match trust {
                    ResultTrust::Document => Some(Source::Document),
                    ResultTrust::Untrusted => Some(Source::Tool),
                    ResultTrust::Trusted => None,
                };
                let unchecked = source.filter(|_| *attempts > 0).map(|source| ContentCheck {
                    source,
                    step: *step,
                    call: Some((call_id.clone(), tool_name.clone())),
                    text: result.to_model_text(),
                });
                match unchecked {
                    Some(u) if self.agent.spec.guards.policy(u.source) != Policy::Off => {
                        self.review.unchecked = Some(u);
                    }
                    Some(u) => self.release(u, Verdict::Allow, &[]),
                    None => self.push_message(Message {
                        role: Role::Tool,
                        content: Some(result.to_model_text()),
                        tool_calls: Vec::new(),
                        tool_call_id: Some(call_id.clone()),
                    }),
                }
                self.judge_progress(tool_name, result);
                self.tool_node_result(call_id, result);
                if !result.is_success() {
                    self.worker_failed(tool_name, result.message.as_deref().unwrap_or_default());
                }
                if !result.is_success() && self.past_deadline(event.ts_ms) {
                    let detail = format!(
                        "the call to `{}` was cut off at the run's wall-clock limit of {:?}",
                        tool_name, self.agent.spec.limits.timeout
                    );
                    self.finish_with(TerminationReason::Timeout, detail);
                }
            }
            EventKind::ApprovalRequested {
                step,
                call_id,
                tool,
                arguments,
                reason,
                expires_at_ms,
                on_timeout,
                answer,
            } => {
                let pending = PendingApproval {
                    answer: answer.clone(),
                    step: *step,
                    call_id: call_id.clone(),
                    tool: tool.clone(),
                    arguments: arguments.clone(),
                    reason: reason.clone(),
                    expires_at_ms: *expires_at_ms,
                    on_timeout: *on_timeout,
                    requested_ms: event.ts_ms,
                };
                if self.is_node_approval(call_id) {
                    // A human node's approval is a step of its own.
                    self.step = self.step.max(*step);
                }
                self.approvals.insert(*step, Approval::Pending(pending));
            }
            EventKind::ApprovalDecided {
                step,
                approved,
                by,
                reason,
                ..
            } => {
                if let Some(Approval::Pending(p)) = self.approvals.get(step) {
                    self.clock.paused_ms = self
                        .clock
                        .paused_ms
                        .saturating_add(event.ts_ms.saturating_sub(p.requested_ms).max(0));
                    let decision = if *approved {
                        Approval::Approved
                    } else {
                        Approval::Denied {
                            by: by.clone(),
                            reason: reason.clone(),
                        }
                    };
                    if self.is_node_approval(&p.call_id) {
                        self.approvals.insert(*step, decision);
                        self.human_decided(*approved, by, reason.as_deref());
                        return Ok(());
                    }
                    let tool = p.tool.clone();
                    if let Some(answer) = p.answer.clone() {
                        // A held answer: approved, it is the run's answer; denied, the model
                        // hears why and tries again (unless the policy ends the run).
                        self.held_answer = None;
                        if *approved {
                            self.finish = Some(Finish {
                                reason: TerminationReason::Completed,
                                detail: None,
                                output: Some(answer),
                            });
                        } else if self.agent.spec.approval.on_deny == OnDeny::Continue {
                            let why = reason
                                .as_deref()
                                .map_or(String::new(), |r| format!(": {r}"));
                            self.push_message(Message::text(
                                Role::User,
                                format!(
                                    "A reviewer ({by}) did not accept that answer{why}. Revise it."
                                ),
                            ));
                        }
                    }
                    self.approvals.insert(*step, decision);
                    if !*approved && self.agent.spec.approval.on_deny == OnDeny::End {
                        let why = reason
                            .as_deref()
                            .map_or(String::new(), |r| format!(": {r}"));
                        self.finish_with(
                            TerminationReason::ApprovalDenied,
                            format!("{by} denied the call to `{tool}`{why}"),
                        );
                    }
                }
            }
            EventKind::RunFinished {
                status,
                reason,
                output,
                ..
            } => {
                self.finished = Some((*status, *reason));
                self.output = output.clone();
                self.finish = None;
            }
        }
        Ok(())
    }
}
