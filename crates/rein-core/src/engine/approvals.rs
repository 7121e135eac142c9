//! People in the loop: approval requests for held calls and answers, and escalation with a
//! handoff.

use super::*;
use crate::event::EventKind;
use crate::run::TerminationReason;
use crate::spec::EscalationTrigger;
use serde_json::Value;

impl Engine {
    /// What a person taking the run over needs: what was asked, what was done, what is
    /// pending, and why it came to them. (The driver adds where the trace is.)
    pub(super) fn handoff(&self, trigger: &str, why: &str, pending: Value) -> Value {
        serde_json::json!({"handoff": {
            "trigger": trigger,
            "why": why,
            "asked": self.input,
            "done": self.steps_done,
            "pending": pending,
        }})
    }

    /// The action the run was about to take: a held call, or the tool calls not yet made.
    pub(super) fn pending_action(&self) -> Value {
        if let Some((_, answer)) = &self.held_answer {
            return serde_json::json!({"answer": answer});
        }
        if let Some(p) = self.pending_approval() {
            return serde_json::json!({"tool": p.tool, "arguments": p.arguments, "held_because": p.reason});
        }
        let calls: Vec<Value> = self
            .pending_tools
            .iter()
            .map(|c| {
                let arguments = serde_json::from_str::<Value>(&c.arguments)
                    .unwrap_or_else(|_| Value::String(c.arguments.clone()));
                serde_json::json!({"tool": c.name, "arguments": arguments})
            })
            .collect();
        if calls.is_empty() {
            Value::Null
        } else {
            Value::Array(calls)
        }
    }

    /// Ends the run with `reason`, or hands it to a person when the spec escalates on
    /// `trigger`.
    pub(super) fn end_or_escalate(
        &mut self,
        reason: TerminationReason,
        trigger: EscalationTrigger,
        detail: String,
    ) {
        if self.finish.is_some() {
            return;
        }
        if self.agent.spec.escalation.on(trigger) {
            self.finish = Some(self.escalation(trigger.as_str(), &detail, self.pending_action()));
        } else {
            self.finish_with(reason, detail);
        }
    }

    /// The end of a run handed to a person: `escalated`, with the handoff as its output.
    pub(super) fn escalation(&self, trigger: &str, why: &str, pending: Value) -> Finish {
        Finish {
            reason: TerminationReason::Escalated,
            detail: Some(format!("handed to a person ({trigger}): {why}")),
            output: Some(self.handoff(trigger, why, pending)),
        }
    }

    /// A request for a person's approval of `arguments` to the call `(call_id, tool)` at
    /// `step`, timing out per the spec's approval policy.
    pub(super) fn approval_request(
        &self,
        step: u32,
        (call_id, tool): (&str, &str),
        arguments: Value,
        reason: String,
        answer: Option<Value>,
        now_ms: i64,
    ) -> Effect {
        let policy = &self.agent.spec.approval;
        let timeout = i64::try_from(policy.timeout.as_millis()).unwrap_or(i64::MAX);
        Effect::Record(EventKind::ApprovalRequested {
            step,
            call_id: call_id.to_string(),
            tool: tool.to_string(),
            arguments,
            reason,
            expires_at_ms: now_ms.saturating_add(timeout),
            on_timeout: policy.on_timeout,
            answer,
        })
    }
}
