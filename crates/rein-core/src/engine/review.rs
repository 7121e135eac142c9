//! Content review: untrusted content held until its guard verdict releases it, fenced where the
//! policy says, the judge's progress, and the final answer's sanitisation.

use super::*;
use crate::guard::{self, Source, Verdict};
use crate::message::{Message, Role};
use crate::run::TerminationReason;
use crate::sanitize;
use crate::spec::EscalationTrigger;
use crate::tool::ToolResult;
use serde_json::Value;

impl ContentCheck {
    /// Where the content came from, for a person: `the user's input`, or the tool and step.
    pub(super) fn origin(&self) -> String {
        match &self.call {
            Some((_, tool)) => format!("the result of `{tool}` (step {})", self.step),
            None => "the user's input".into(),
        }
    }
}

impl Engine {
    /// Starts the conversation over: the instructions, `context`, then the user's input.
    pub(super) fn begin_conversation(&mut self, context: impl IntoIterator<Item = Message>) {
        self.forget_messages();
        // A plan's run opens with its planner.
        let mut instructions = self
            .planner_prompt()
            .unwrap_or_else(|| self.agent.spec.instructions.clone());
        if self.review.fence.is_some() {
            instructions.push_str(guard::FENCE_INSTRUCTIONS);
        }
        self.push_message(Message::text(Role::System, instructions));
        for m in context {
            self.push_message(m);
        }
        self.push_message(Message::text(Role::User, self.review.input_message.clone()));
    }

    /// Releases content a guard has judged: to the model as it is, fenced, or not at all.
    pub(super) fn release(&mut self, unchecked: ContentCheck, verdict: Verdict, rules: &[String]) {
        // Spotlighting fences everything tools and documents bring; a `fence` verdict fences
        // (with a warning) whatever it judged, the user's input included.
        let warning = (verdict == Verdict::Fence).then_some(rules);
        let spotlit = self.agent.spec.guards.spotlight && unchecked.source != Source::User;
        let text = match (verdict, &self.review.fence) {
            (Verdict::Block | Verdict::Escalate, _) => format!(
                "[Rein withheld this content: the injection guard found instructions in it ({}).]",
                rules.join(", ")
            ),
            (_, Some(boundary)) if spotlit || warning.is_some() => {
                guard::fence(boundary, unchecked.origin(), &unchecked.text, warning)
            }
            _ => unchecked.text.clone(),
        };
        match &unchecked.call {
            Some((call_id, _)) => self.push_message(Message {
                role: Role::Tool,
                content: Some(text),
                tool_calls: Vec::new(),
                tool_call_id: Some(call_id.clone()),
            }),
            None => {
                // The user's input is the last message of the conversation begun at the start.
                self.review.input_message = text;
                if !self.summarizing
                    && let Some(last) = self.context.messages.pop()
                {
                    if self.context.messages.len() < self.context.counted.get() {
                        self.context.counted.set(self.context.messages.len());
                        self.context.message_tokens.set(
                            self.context
                                .message_tokens
                                .get()
                                .saturating_sub(message_tokens(self.context.counter, &last)),
                        );
                    }
                    self.push_message(Message::text(Role::User, self.review.input_message.clone()));
                }
            }
        }
        if unchecked.source == Source::User {
            if verdict != Verdict::Allow && self.review.tainted.is_none() {
                self.review.tainted =
                    Some("the user's input, which the injection guard flagged".into());
            }
        } else if self.review.tainted.is_none() {
            self.review.tainted = Some(unchecked.origin());
        }
    }

    /// `text` gathered from earlier steps, fenced as untrusted when untrusted content has
    /// entered the run and the run fences: what a tool returned reaches a later model step
    /// through the state or a step's result, and must not arrive there as instructions.
    pub(super) fn spotlit(&self, origin: &str, text: &str) -> String {
        match (&self.review.fence, &self.review.tainted) {
            (Some(boundary), Some(_)) => guard::fence(boundary, origin.to_string(), text, None),
            _ => text.to_string(),
        }
    }

    /// Loop, no-progress and failure-streak detection over tool results.
    pub(super) fn judge_progress(&mut self, tool: &str, result: &ToolResult) {
        let agent = self.agent.clone();
        let limits = &agent.spec.limits;
        if result.is_success() {
            self.loops.consecutive_failures = 0;
            if self
                .loops
                .seen_results
                .insert((tool.to_string(), result.data.to_string()))
            {
                self.loops.steps_without_progress = 0;
            } else {
                self.loops.steps_without_progress += 1;
            }
        } else {
            self.loops.consecutive_failures += 1;
            self.loops.steps_without_progress += 1;
            let message = result.message.clone().unwrap_or_default();
            let repeats = self
                .loops
                .repeated_errors
                .entry((tool.to_string(), message.clone()))
                .or_default();
            *repeats += 1;
            let repeats = *repeats;
            if repeats >= limits.max_repeated_errors {
                let detail =
                    format!("`{tool}` failed with the same error {repeats} times: {message}");
                self.end_or_escalate(
                    TerminationReason::LoopDetected,
                    EscalationTrigger::RepeatedToolFailure,
                    detail,
                );
            }
        }
        if self.loops.consecutive_failures >= limits.max_consecutive_failures {
            let detail = format!(
                "{} tool calls in a row failed, so the run's own circuit breaker opened",
                self.loops.consecutive_failures
            );
            self.end_or_escalate(
                TerminationReason::CircuitOpen,
                EscalationTrigger::RepeatedToolFailure,
                detail,
            );
        }
        if self.loops.steps_without_progress >= limits.max_steps_without_progress {
            let detail = format!(
                "{} tool results in a row brought nothing new (failures or data already seen)",
                self.loops.steps_without_progress
            );
            self.finish_with(TerminationReason::LoopDetected, detail);
        }
    }

    /// What sanitising the final answer about to be returned finds, while it is not yet
    /// recorded; `None` when there is no such answer or nothing to report.
    pub(super) fn answer_findings(&self) -> Option<(Vec<sanitize::Finding>, bool)> {
        let finish = self.finish.as_ref()?;
        if self.review.output_checked
            || self.chat.is_some()
            || finish.reason != TerminationReason::Completed
        {
            return None;
        }
        let (_, findings) = self.sanitized(finish.output.as_ref()?);
        let blocked = findings.iter().any(|f| f.action == sanitize::Action::Block);
        (!findings.is_empty()).then_some((findings, blocked))
    }

    /// An answer (text, or the strings of a JSON answer) sanitised by the spec's policy.
    pub(super) fn sanitized(&self, answer: &Value) -> (Value, Vec<sanitize::Finding>) {
        let policy = &self.agent.spec.guards.output;
        let instructions = &self.agent.spec.instructions;
        let mut findings: Vec<sanitize::Finding> = Vec::new();
        let mut out = answer.clone();
        sanitize::walk_strings(&mut out, &mut |s| {
            let clean = sanitize::sanitize(s, policy, instructions);
            if !clean.findings.is_empty() {
                *s = clean.text;
                sanitize::merge(&mut findings, clean.findings);
            }
        });
        (out, findings)
    }
}
