//! The effects the engine asks its driver to carry out, as plain values.

use crate::Usd;
use crate::event::EventKind;
use crate::guard::{self, Source, Verdict};
use crate::run::TerminationReason;
use crate::spec::{OnTimeout, StepKind, ToolChoice};
use serde_json::Value;

/// A model call the engine wants made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelCall {
    /// Step number.
    pub step: u32,
    /// `provider/model` of the first model the step tries.
    pub model: String,
    /// What the call is for.
    pub kind: StepKind,
    /// Whether `model.routes` chose the model for this kind of step.
    pub routed: bool,
    /// Whether and which tool the model must call: the spec's choice, except that a `final`
    /// step of an agent with tools is told to call none (a call there would only be refused).
    pub tool_choice: Option<ToolChoice>,
    /// Estimated input tokens (see [`estimate_tokens`]).
    pub estimated_input_tokens: u64,
    /// Output cap of the call.
    pub max_output_tokens: u32,
    /// Worst-case cost: estimated input plus the full output cap, priced.
    pub worst_case_cost: Usd,
    /// Tokens left under the run's cap before this call (at least the worst case).
    pub tokens_remaining: u64,
    /// Money left under the run's cap before this call (at least the worst case).
    pub cost_remaining: Usd,
}

impl ModelCall {
    /// The event that records this call before it is made.
    pub fn requested(&self) -> EventKind {
        EventKind::ModelRequested {
            step: self.step,
            model: self.model.clone(),
            estimated_input_tokens: self.estimated_input_tokens,
            max_output_tokens: self.max_output_tokens,
            worst_case_cost: self.worst_case_cost,
            tokens_remaining: self.tokens_remaining,
            cost_remaining: self.cost_remaining,
            step_kind: Some(self.kind),
            routed: self.routed,
        }
    }
}

/// A validated tool call the engine wants made.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolInvocation {
    /// Step number.
    pub step: u32,
    /// The model's id for the call.
    pub call_id: String,
    /// Tool name (known to the agent).
    pub tool: String,
    /// Arguments, valid against the tool's input schema.
    pub arguments: Value,
    /// For a worker agent: its budget and place in the tree.
    pub budget: Option<crate::event::WorkerBudget>,
}

impl ToolInvocation {
    /// The event that records this call before it is made.
    pub fn requested(&self) -> EventKind {
        EventKind::ToolRequested {
            step: self.step,
            call_id: self.call_id.clone(),
            tool: self.tool.clone(),
            arguments: self.arguments.clone(),
        }
    }
}

/// What the driver must do next.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Record [`ModelCall::requested`], call the model with [`Engine::messages`], record the
    /// outcome (`model_responded` or `model_failed`).
    CallModel(ModelCall),
    /// Record [`ToolInvocation::requested`], call the tool under its contract, record the
    /// `tool_result`.
    CallTool(ToolInvocation),
    /// Record this event as it is: the engine decided it without outside input (a refused tool
    /// call, an approval request, the end of the run).
    Record(EventKind),
    /// Run the guard's check on untrusted content and record its verdict
    /// ([`ContentCheck::verdict`]). The check is pure but costs CPU, so a driver on an async
    /// runtime runs it off its I/O threads.
    CheckContent(ContentCheck),
    /// Nothing can happen until a person decides the pending approval (or it times out): the
    /// driver stops, leaving the run `awaiting_approval`.
    AwaitApproval(PendingApproval),
}

/// Untrusted content (the user's input, a tool's result) to check before the model sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ContentCheck {
    /// The step of the tool call; 0 for the input.
    pub step: u32,
    /// Where the content came from.
    pub source: Source,
    /// The tool call and tool, for a result.
    pub call: Option<(String, String)>,
    /// The text the model would see.
    pub text: String,
}

impl ContentCheck {
    /// The `guard_verdict` to record: `guards`' policy applied to the detector's finding.
    pub fn verdict(&self, guards: &guard::Guards) -> EventKind {
        let (verdict, detection) = guards.check(&self.text, self.source);
        self.verdict_event(verdict, detection.score, detection.rule_names())
    }

    /// A `guard_verdict` on this content.
    pub(super) fn verdict_event(
        &self,
        verdict: Verdict,
        score: f64,
        rules: Vec<String>,
    ) -> EventKind {
        EventKind::GuardVerdict {
            step: self.step,
            source: self.source,
            call_id: self.call.as_ref().map(|(id, _)| id.clone()),
            tool: self.call.as_ref().map(|(_, tool)| tool.clone()),
            verdict,
            score,
            rules,
        }
    }
}

/// A tool call held for a person's decision.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingApproval {
    /// The step the call will be made as.
    pub step: u32,
    /// The model's id for the call.
    pub call_id: String,
    /// The tool.
    pub tool: String,
    /// Its arguments.
    pub arguments: Value,
    /// Why it needs approval.
    pub reason: String,
    /// When the request times out, in ms since the epoch.
    pub expires_at_ms: i64,
    /// What a timeout turns into.
    pub on_timeout: OnTimeout,
    /// For a final answer held for approval: the answer.
    pub answer: Option<Value>,
    pub(super) requested_ms: i64,
}

impl PendingApproval {
    /// The event that records a decision on this call.
    pub fn decided(&self, approved: bool, by: &str, reason: Option<String>) -> EventKind {
        EventKind::ApprovalDecided {
            step: self.step,
            call_id: self.call_id.clone(),
            approved,
            by: by.to_string(),
            reason,
        }
    }
}

/// Where a tool call that needs approval stands.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Approval {
    Pending(PendingApproval),
    Approved,
    /// Approved, and the call was then made (recorded as requested): an approval covers one
    /// call, so a call interrupted by a crash is asked about again.
    Used,
    Denied {
        by: String,
        reason: Option<String>,
    },
}

/// A decided but not yet recorded end of the run.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Finish {
    pub(super) reason: TerminationReason,
    pub(super) detail: Option<String>,
    pub(super) output: Option<Value>,
}

/// A gateway call's own settings (from `chat_request`).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Chat {
    pub(super) max_output_tokens: Option<u32>,
    pub(super) temperature: Option<f64>,
    pub(super) tool_choice: Option<ToolChoice>,
}
