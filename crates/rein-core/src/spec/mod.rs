//! Agent specs: the YAML a user writes, parsed once into a typed, validated [`Agent`].
//!
//! Parsing collects *every* problem (unknown fields, wrong types, bad durations, invalid JSON
//! Schemas, duplicate tool names, unpriced models) with its line and field path, so that
//! `rein check` shows a user the whole list at once instead of one error per attempt.

mod model;
mod parse;
#[cfg(test)]
mod tests;
mod tool;

use crate::Usd;
pub use crate::diagnostic::{Diagnostic, SpecErrors};
use crate::graph::Graph;
pub use crate::message::ToolChoice;
use crate::plan::PlanPolicy;
use crate::price::{Price, PriceTable};
use crate::yaml::{self};
pub use model::*;
use parse::Parser;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
pub use tool::*;

/// Default wall-clock limit of a run when `limits.timeout` is not set.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// Default cap on tool calls in a run when `limits.max_tool_calls` is not set.
pub const DEFAULT_MAX_TOOL_CALLS: u32 = 50;
/// Default number of identical tool calls (same tool, same arguments) that counts as a loop.
pub const DEFAULT_MAX_REPEATED_TOOL_CALLS: u32 = 3;
/// Default number of times the same tool error may repeat before the run is a loop.
pub const DEFAULT_MAX_REPEATED_ERRORS: u32 = 3;
/// Default number of tool results in a row that bring nothing new before the run is a loop.
pub const DEFAULT_MAX_STEPS_WITHOUT_PROGRESS: u32 = 10;
/// Default number of failed tool calls in a row that opens the run's own circuit breaker.
pub const DEFAULT_MAX_CONSECUTIVE_FAILURES: u32 = 5;
/// Default cap on output tokens per model call when `model.max_output_tokens` is not set.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u32 = 1024;
/// Default depth of a tree of worker agents below a run.
pub const DEFAULT_MAX_DEPTH: u32 = 3;
/// Default per-call timeout of a tool when its contract sets none.
pub const DEFAULT_TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// A model provider a spec may name (`provider/model`, or a map entry's `provider`): its name
/// and the environment variable holding the operator's key for it, which only the operator's
/// configured endpoint may receive. The spec check knows no provider: the program checking a
/// spec passes the ones its adapters serve (`rein_providers::PROVIDERS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProviderInfo {
    /// The name before the slash (`openai`, `anthropic`).
    pub name: &'static str,
    /// The environment variable of the operator's key (`OPENAI_API_KEY`).
    pub key_env: &'static str,
}

/// The providers of Rein's own adapters, for the core's tests, which check specs without them.
#[cfg(test)]
pub(crate) const TEST_PROVIDERS: &[ProviderInfo] = &[
    ProviderInfo {
        name: "openai",
        key_env: "OPENAI_API_KEY",
    },
    ProviderInfo {
        name: "anthropic",
        key_env: "ANTHROPIC_API_KEY",
    },
];

/// A validated agent spec.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AgentSpec {
    /// Agent name (lowercase letters, digits, `-`, `_`).
    pub name: String,
    /// Spec version; a run pins the version it started with.
    pub version: u32,
    /// Which model to call and how.
    pub model: ModelSpec,
    /// The system prompt.
    pub instructions: String,
    /// The control flow.
    pub flow: Flow,
    /// Tools the agent may call.
    pub tools: Vec<ToolSpec>,
    /// Hard limits of every run.
    pub limits: Limits,
    /// JSON Schema the final answer must satisfy, if any.
    pub output_schema: Option<Value>,
    /// How many times a final answer that fails `output_schema` is sent back for repair
    /// before the run ends `output_invalid`.
    pub max_repairs: u32,
    /// Authorisation scopes this agent holds; a tool with an `auth_scope` outside them (or
    /// outside its tenant's grants) is refused.
    pub scopes: Vec<String>,
    /// What happens around a person's approval (of a `confirm: true` tool call, or one a
    /// magnitude rule sends for approval).
    pub approval: ApprovalPolicy,
    /// When the run is handed to a person instead of ending in a failure.
    pub escalation: Escalation,
    /// Multi-turn conversations: runs in one session continue its conversation.
    pub session: Option<SessionPolicy>,
    /// Injection detection, spotlighting and the data-flow rule.
    pub guards: crate::guard::Guards,
}

/// How runs of one session share a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SessionPolicy {
    /// A session idle this long is closed: the next run starts from a summary of it.
    pub ttl: Duration,
}

/// When a run ends `escalated`, with a handoff for a person, instead of failing.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Escalation {
    /// The triggers that escalate.
    pub on: Vec<EscalationTrigger>,
    /// For `low_confidence`: a final answer whose `confidence` field is below this escalates.
    pub min_confidence: Option<f64>,
}

impl Escalation {
    /// Whether `trigger` escalates.
    pub fn on(&self, trigger: EscalationTrigger) -> bool {
        self.on.contains(&trigger)
    }
}

/// What can escalate a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscalationTrigger {
    /// Tool calls keep failing: the same error repeated, or failures in a row.
    RepeatedToolFailure,
    /// Every model the step could use has an open circuit breaker.
    CircuitOpen,
    /// The final answer's `confidence` is below `min_confidence`.
    LowConfidence,
    /// A shared budget crossed its warning line.
    BudgetWarning,
}

impl EscalationTrigger {
    /// The name used in specs and handoffs.
    pub fn as_str(self) -> &'static str {
        match self {
            EscalationTrigger::RepeatedToolFailure => "repeated_tool_failure",
            EscalationTrigger::CircuitOpen => "circuit_open",
            EscalationTrigger::LowConfidence => "low_confidence",
            EscalationTrigger::BudgetWarning => "budget_warning",
        }
    }
}

/// How approvals are waited for and what a denial or silence means.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ApprovalPolicy {
    /// A final answer whose `confidence` field (in the output schema) is below this waits for
    /// a person's approval before it is returned.
    pub min_confidence: Option<f64>,
    /// How long a request waits for a decision.
    pub timeout: Duration,
    /// What happens when no one decides in time.
    pub on_timeout: OnTimeout,
    /// What a denial does to the run.
    pub on_deny: OnDeny,
}

/// What an approval that waited past its timeout turns into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// A denial (by `policy`), handled as `on_deny` says.
    Deny,
    /// The run ends `escalated`, handing the pending action to a person.
    Escalate,
}

/// What a denied action does to the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDeny {
    /// The model is told the call was refused, and why, and goes on.
    Continue,
    /// The run ends `approval_denied`.
    End,
}

/// Default approval policy: wait a day, then deny; a denial is reported to the model.
pub const DEFAULT_APPROVAL: ApprovalPolicy = ApprovalPolicy {
    min_confidence: None,
    timeout: Duration::from_secs(24 * 3600),
    on_timeout: OnTimeout::Deny,
    on_deny: OnDeny::Continue,
};

/// Default number of times a final answer that fails the output schema is sent back for repair.
pub const DEFAULT_MAX_REPAIRS: u32 = 2;

/// How a run is driven.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Flow {
    /// Reason, act (call tools), observe, repeat until a final answer.
    React,
    /// An explicit state graph ([`crate::graph`]).
    Graph(Box<Graph>),
    /// A planner's plan, carried out step by step and revised ([`crate::plan`]).
    PlanExecute(PlanPolicy),
}

impl Flow {
    /// The plan policy, for `plan_execute`.
    pub fn plan(&self) -> Option<&PlanPolicy> {
        match self {
            Flow::PlanExecute(p) => Some(p),
            _ => None,
        }
    }

    /// The graph, for a graph flow.
    pub fn graph(&self) -> Option<&Graph> {
        match self {
            Flow::Graph(g) => Some(g),
            _ => None,
        }
    }
}

/// The hard limits of a run. The first three are required in every spec.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Limits {
    /// Cap on model calls.
    pub max_iterations: u32,
    /// Cap on input + output tokens over the run.
    pub max_total_tokens: u64,
    /// Cap on cost over the run.
    pub max_cost_usd: Usd,
    /// Wall-clock limit of the run.
    pub timeout: Duration,
    /// Cap on tool calls over the run.
    pub max_tool_calls: u32,
    /// The same tool with the same arguments this many times ends the run as `loop_detected`.
    pub max_repeated_tool_calls: u32,
    /// The same error from the same tool this many times ends the run as `loop_detected`.
    pub max_repeated_errors: u32,
    /// This many tool results in a row with nothing new (failures, or data already seen) end
    /// the run as `loop_detected`.
    pub max_steps_without_progress: u32,
    /// This many failed tool calls in a row end the run as `circuit_open` (the run's own breaker).
    pub max_consecutive_failures: u32,
    /// How deep a tree of worker agents may grow below a run (a worker's workers count too):
    /// the call that would go deeper ends the run `max_depth`.
    pub max_depth: u32,
}

/// What a built-in tool looks like, so specs that use it can be checked.
#[derive(Clone, Debug, PartialEq)]
pub struct BuiltinToolInfo {
    /// Default description.
    pub description: String,
    /// JSON Schema of its arguments.
    pub input_schema: Value,
}

impl AgentSpec {
    /// The agent's flow as a Mermaid flowchart: its state graph (`flow: graph`), or else the
    /// model's loop over its tools (`react`), or a plan whose steps each run that loop
    /// (`plan_execute`).
    pub fn mermaid(&self) -> String {
        use std::fmt::Write as _;
        if let Some(graph) = self.flow.graph() {
            return graph.mermaid();
        }
        let label = crate::graph::mermaid_label;
        let mut out = String::from("flowchart TD\n");
        let caller = if self.flow.plan().is_some() {
            out.push_str(
                "    input([input]) --> plan[plan]\n    plan --> step[execute the next step]\n",
            );
            out.push_str("    step -->|step done| step\n    step -->|step failed| plan\n");
            out.push_str(
                "    step -->|every step done| answer[answer]\n    answer --> output([output])\n",
            );
            "step"
        } else {
            let _ = writeln!(
                out,
                "    input([input]) --> model[\"{}\"]",
                label(&self.model.primary.to_string())
            );
            out.push_str("    model -->|answer| output([output])\n");
            "model"
        };
        for (i, tool) in self.tools.iter().enumerate() {
            let _ = writeln!(
                out,
                "    {caller} -->|call| tool{i}[[\"{}\"]]\n    tool{i} --> {caller}",
                label(&tool.name)
            );
        }
        out
    }
}

/// What checking a spec needs to know about the world outside the file.
#[derive(Clone, Copy, Debug)]
pub struct CheckContext<'a> {
    /// Known model prices.
    pub prices: &'a PriceTable,
    /// Built-in tools by name.
    pub builtin_tools: &'a BTreeMap<String, BuiltinToolInfo>,
    /// The model providers a spec may name.
    pub providers: &'a [ProviderInfo],
}

impl CheckContext<'_> {
    /// Whether `name` is a provider's name.
    pub fn is_provider(&self, name: &str) -> bool {
        self.providers.iter().any(|p| p.name == name)
    }

    /// The providers' names, for a message.
    pub fn provider_names(&self) -> String {
        self.providers
            .iter()
            .map(|p| p.name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether `var` holds one of the operator's provider keys.
    pub fn is_operator_key(&self, var: &str) -> bool {
        self.providers.iter().any(|p| p.key_env == var)
    }
}

/// A spec ready to run: the typed spec, its price and its compiled validators.
#[derive(Clone, Debug)]
pub struct Agent {
    /// The spec.
    pub spec: AgentSpec,
    /// Each model's own price (by `provider/model`), to cost what actually answered.
    pub prices: BTreeMap<String, Price>,
    /// Argument validators, index-aligned with `spec.tools`.
    pub tool_validators: Vec<Arc<jsonschema::Validator>>,
    /// Validator of the final answer, if the spec has an output schema.
    pub output_validator: Option<Arc<jsonschema::Validator>>,
    /// The validator of each kind of structured model step's answer, with its schema: for a
    /// graph, by node (an `llm` node's fields, a model-chosen router's choice, a tool node's
    /// result); for `plan_execute`, `plan` (a plan) and `step` (an executor's report).
    pub step_validators: BTreeMap<String, (Value, Arc<jsonschema::Validator>)>,
    /// Validators of the worker tools' output schemas, by tool name.
    pub worker_validators: BTreeMap<String, Arc<jsonschema::Validator>>,
}

impl Agent {
    /// Parses and checks a spec. `file` is only used in error messages.
    pub fn parse(file: &str, source: &str, ctx: &CheckContext<'_>) -> Result<Agent, SpecErrors> {
        let mut p = Parser {
            diags: Vec::new(),
            ctx,
        };
        let agent = match yaml::parse(source) {
            Ok(root) => p.agent(&root),
            Err(e) => {
                p.diags.push(Diagnostic {
                    pos: e.pos,
                    path: String::new(),
                    message: format!("invalid YAML: {}", e.message),
                });
                None
            }
        };
        match agent {
            Some(agent) if p.diags.is_empty() => Ok(agent),
            _ => {
                let mut diagnostics = p.diags;
                diagnostics.sort_by_key(|d| (d.pos.line, d.pos.col));
                Err(SpecErrors {
                    file: file.to_string(),
                    diagnostics,
                })
            }
        }
    }

    /// The worst case of a step's prices (each rate the highest of any model it may call):
    /// what pre-flight checks reserve, so a fallback can never break a cap.
    pub fn worst_price(&self, chain: &[&ModelRef]) -> Price {
        chain
            .iter()
            .filter_map(|m| self.prices.get(&m.id))
            .copied()
            .reduce(|a, b| Price {
                input: a.input.max(b.input),
                cached_input: a.cached_input.max(b.cached_input),
                output: a.output.max(b.output),
                cache_write: a.cache_write.max(b.cache_write),
            })
            .unwrap_or_default()
    }

    /// The tool named `name` and its validator.
    pub fn tool(&self, name: &str) -> Option<(&ToolSpec, &jsonschema::Validator)> {
        self.spec
            .tools
            .iter()
            .zip(&self.tool_validators)
            .find(|(t, _)| t.name == name)
            .map(|(t, v)| (t, v.as_ref()))
    }
}
