//! Run states and termination reasons, as named throughout Rein (ARCHITECTURE.md).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a run is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Accepted, not started.
    Queued,
    /// Executing.
    Running,
    /// Paused until a person decides.
    AwaitingApproval,
    /// Finished with an answer.
    Completed,
    /// Finished without an answer because something failed.
    Failed,
    /// Stopped by a hard limit.
    LimitExceeded,
    /// Stopped on request.
    Cancelled,
    /// Handed to a person.
    Escalated,
}

impl RunStatus {
    /// The name used in the store, the CLI and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::AwaitingApproval => "awaiting_approval",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::LimitExceeded => "limit_exceeded",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Escalated => "escalated",
        }
    }

    /// Whether the run has ended.
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            RunStatus::Queued | RunStatus::Running | RunStatus::AwaitingApproval
        )
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a finished run ended. Every finished run has exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TerminationReason {
    /// The model gave a final answer.
    Completed,
    /// `limits.max_iterations` model calls were made.
    MaxIterations,
    /// The next call could cross, or usage crossed, `limits.max_total_tokens`.
    MaxTokens,
    /// The next call could cross, or cost crossed, `limits.max_cost_usd`.
    MaxCost,
    /// `limits.timeout` of wall-clock time passed.
    Timeout,
    /// Sub-agent recursion went past `max_depth`.
    MaxDepth,
    /// The same action repeated with no progress.
    LoopDetected,
    /// A circuit breaker was open for every way forward.
    CircuitOpen,
    /// A shared budget (session, user, tenant, global) could not cover the next call.
    BudgetExhausted,
    /// A guardrail refused input, a tool call or output.
    GuardrailBlocked,
    /// The final answer did not satisfy the output schema, even after repair.
    OutputInvalid,
    /// A person denied a required approval.
    ApprovalDenied,
    /// Handed to a person.
    Escalated,
    /// Cancelled on request.
    Cancelled,
    /// An error the run could not survive.
    Error,
}

impl TerminationReason {
    /// The name used in the store, the CLI and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            TerminationReason::Completed => "completed",
            TerminationReason::MaxIterations => "max_iterations",
            TerminationReason::MaxTokens => "max_tokens",
            TerminationReason::MaxCost => "max_cost",
            TerminationReason::Timeout => "timeout",
            TerminationReason::MaxDepth => "max_depth",
            TerminationReason::LoopDetected => "loop_detected",
            TerminationReason::CircuitOpen => "circuit_open",
            TerminationReason::BudgetExhausted => "budget_exhausted",
            TerminationReason::GuardrailBlocked => "guardrail_blocked",
            TerminationReason::OutputInvalid => "output_invalid",
            TerminationReason::ApprovalDenied => "approval_denied",
            TerminationReason::Escalated => "escalated",
            TerminationReason::Cancelled => "cancelled",
            TerminationReason::Error => "error",
        }
    }

    /// The status a run ends in for this reason.
    pub fn status(self) -> RunStatus {
        use TerminationReason::*;
        match self {
            Completed => RunStatus::Completed,
            MaxIterations | MaxTokens | MaxCost | Timeout | MaxDepth | LoopDetected
            | BudgetExhausted => RunStatus::LimitExceeded,
            Cancelled => RunStatus::Cancelled,
            Escalated => RunStatus::Escalated,
            CircuitOpen | GuardrailBlocked | OutputInvalid | ApprovalDenied | Error => {
                RunStatus::Failed
            }
        }
    }
}

impl fmt::Display for TerminationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
