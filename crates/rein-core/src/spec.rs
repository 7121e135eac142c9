//! Agent specs: the YAML a user writes, parsed once into a typed, validated [`Agent`].
//!
//! Parsing collects *every* problem (unknown fields, wrong types, bad durations, invalid JSON
//! Schemas, duplicate tool names, unpriced models) with its line and field path, so that
//! `rein check` shows a user the whole list at once instead of one error per attempt.

use crate::duration::parse_duration;
use crate::graph::{Condition, Graph, GraphNode, NodeKind, Route, Test};
use crate::plan::PlanPolicy;
use crate::price::{Price, PriceTable};
use crate::yaml::{self, Node, NodeValue, Pos};
use crate::{ToolDefinition, Usd};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

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

/// The model providers this build can call.
pub const PROVIDERS: &[&str] = &["openai", "anthropic"];

/// The operator's provider keys: sent only to the endpoints the operator configured.
pub const OPERATOR_KEY_ENVS: &[&str] = &["OPENAI_API_KEY", "ANTHROPIC_API_KEY"];

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

/// The model policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelSpec {
    /// The model every step starts with unless a route names another.
    pub primary: ModelRef,
    /// Cap on output tokens per call (also the worst case reserved before each call).
    pub max_output_tokens: u32,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// Models to try, in order, when the primary fails for good or its breaker is open.
    pub fallbacks: Vec<ModelRef>,
    /// A model per step kind, so cheap steps use cheap models; the primary and the fallbacks
    /// stay behind it as its fallbacks.
    pub routes: BTreeMap<StepKind, ModelRef>,
    /// Whether and which tool the model must call: `auto`, `required`, `none`, or a tool's name.
    pub tool_choice: Option<ToolChoice>,
    /// Retries of a failed call (transient and rate-limit failures only).
    pub retry: RetryPolicy,
    /// Longest one attempt may take.
    pub timeout: Duration,
    /// When a model's circuit breaker (one per tenant and provider/model, shared by the
    /// tenant's runs) opens.
    pub breaker: crate::breaker::BreakerPolicy,
}

/// One model a step may call: `provider/model`, or a compatible server by base URL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModelRef {
    /// `provider/model`: the name prices, breakers, events and `models_used` go by.
    pub id: String,
    /// A compatible server's base URL (map form), instead of the provider's configured one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// The environment variable whose value is sent as the key to `base_url`, and only there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
}

impl ModelRef {
    /// A model of a provider's configured endpoint, e.g. `ModelRef::named("openai/gpt-4o")`.
    pub fn named(id: impl Into<String>) -> Self {
        ModelRef {
            id: id.into(),
            base_url: None,
            api_key_env: None,
        }
    }

    /// The provider part of the id (`openai`, `anthropic`): the wire format spoken.
    pub fn provider(&self) -> &str {
        self.id.split_once('/').map_or("", |(p, _)| p)
    }

    /// The model as its server names it.
    pub fn name(&self) -> &str {
        self.id.split_once('/').map_or("", |(_, m)| m)
    }

    /// The id, and the server when it is not the provider's configured one: two servers
    /// running the same model fail apart, so each has its own breaker.
    pub fn endpoint_key(&self) -> String {
        match &self.base_url {
            Some(url) => format!("{}@{url}", self.id),
            None => self.id.clone(),
        }
    }
}

impl std::fmt::Display for ModelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.base_url {
            Some(url) => write!(f, "{} at {url}", self.id),
            None => f.write_str(&self.id),
        }
    }
}

/// What a model call is for; `model.routes` picks a model per kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// The first call of a run, which chooses the approach (the planner in `plan_execute`).
    Plan,
    /// A later call while tools may still be called.
    ToolCall,
    /// Condensing a conversation (a session's summary).
    Summarize,
    /// Scoring an answer (an LLM-as-judge guard).
    Judge,
    /// A call that can only answer: an output repair, a run whose tool calls are spent, an
    /// agent without tools or with `tool_choice: none`.
    Final,
}

impl StepKind {
    /// Every kind, in the order the spec documents them.
    pub const ALL: [StepKind; 5] = [
        StepKind::Plan,
        StepKind::ToolCall,
        StepKind::Summarize,
        StepKind::Judge,
        StepKind::Final,
    ];

    /// The name used in specs and events.
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Plan => "plan",
            StepKind::ToolCall => "tool_call",
            StepKind::Summarize => "summarize",
            StepKind::Judge => "judge",
            StepKind::Final => "final",
        }
    }
}

/// Whether and which tool the model must call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    /// The model decides.
    Auto,
    /// The model must call some tool.
    Required,
    /// The model must not call tools.
    None,
    /// The model must call this tool (some local servers only emit tool calls this way).
    Tool(String),
}

/// Default model retry policy: 3 attempts, backoff from 1 s, capped at 8 s, full jitter.
pub const DEFAULT_MODEL_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 3,
    backoff: Duration::from_secs(1),
    max_backoff: Duration::from_secs(8),
};

/// Default longest time one model attempt may take.
pub const DEFAULT_MODEL_TIMEOUT: Duration = Duration::from_secs(120);

/// Default number of times a final answer that fails the output schema is sent back for repair.
pub const DEFAULT_MAX_REPAIRS: u32 = 2;

impl ModelSpec {
    /// The primary, then the fallbacks: the order an unrouted step tries them in.
    pub fn chain(&self) -> impl Iterator<Item = &ModelRef> {
        std::iter::once(&self.primary).chain(self.fallbacks.iter())
    }

    /// The models a step of `kind` tries, in order: its route (if any), then the primary and
    /// the fallbacks, each once.
    pub fn step_chain(&self, kind: StepKind) -> Vec<&ModelRef> {
        let mut out: Vec<&ModelRef> = Vec::new();
        for m in self.routes.get(&kind).into_iter().chain(self.chain()) {
            if !out.contains(&m) {
                out.push(m);
            }
        }
        out
    }

    /// Every model the spec names: the chain and the routes.
    pub fn all(&self) -> impl Iterator<Item = &ModelRef> {
        self.chain().chain(self.routes.values())
    }
}

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

/// A tool as declared in a spec.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ToolSpec {
    /// Name the model calls it by.
    pub name: String,
    /// What it does, for the model.
    pub description: String,
    /// JSON Schema of its arguments (checked before every call).
    pub input_schema: Value,
    /// Where the call goes.
    pub source: ToolSource,
    /// What the runtime enforces around each call.
    pub contract: ToolContract,
}

impl ToolSpec {
    /// Whether each call carries the `Idempotency-Key` (`run_id:step`) the service can apply
    /// its effect once by: HTTP tools send it.
    pub fn sends_idempotency_key(&self) -> bool {
        matches!(self.source, ToolSource::Http(_))
    }

    /// The tool as the model sees it.
    pub fn definition(&self) -> ToolDefinition {
        ToolDefinition {
            name: self.name.clone(),
            description: self.description.clone(),
            parameters: self.input_schema.clone(),
        }
    }
}

/// Where a tool call is executed.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolSource {
    /// A tool compiled into Rein, by name.
    Builtin(String),
    /// An HTTP endpoint.
    Http(HttpSource),
    /// Another agent, run as a worker: a child run of its own under a budget carved out of
    /// the caller's.
    Agent(WorkerSource),
}

/// A worker agent called as a tool.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkerSource {
    /// The worker's spec: a file (`.yaml`/`.yml`, relative to where Rein runs) or the name of
    /// an agent registered with `rein serve` for the caller's tenant.
    pub spec: String,
    /// JSON Schema the worker's answer must satisfy (given to the worker as its output schema
    /// when its spec has none, so it repairs its own answer; checked again when it returns).
    pub output_schema: Option<Value>,
    /// The most the worker may spend; at most what the caller has left, and by default half
    /// of it.
    pub max_cost_usd: Option<Usd>,
    /// The most tokens it may use; likewise.
    pub max_total_tokens: Option<u64>,
    /// What stands in when the worker fails (ends other than `completed`, or answers outside
    /// its output schema).
    pub fallback: Option<WorkerFallback>,
}

/// What stands in for a worker that failed.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerFallback {
    /// Another worker agent (same reference forms), under what is left of the budget.
    Agent(String),
    /// A fixed answer.
    Answer(Value),
    /// The caller's run is handed to a person.
    Escalate,
}

/// An HTTP tool: `{field}` placeholders in the URL are filled from the arguments.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HttpSource {
    /// URL template, e.g. `http://127.0.0.1:8089/orders/{order_id}`.
    pub url: String,
    /// HTTP method; arguments go in a JSON body for methods other than GET and DELETE.
    pub method: HttpMethod,
    /// Extra headers; `${NAME}` is replaced at call time by the environment variable `NAME`
    /// (the operator's and a local user's specs) or by the tenant's secret `NAME` (a spec
    /// registered over the API), so secrets stay out of specs.
    pub headers: BTreeMap<String, String>,
}

/// HTTP methods an HTTP tool may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    /// GET (no body).
    Get,
    /// POST (JSON body).
    Post,
    /// PUT (JSON body).
    Put,
    /// PATCH (JSON body).
    Patch,
    /// DELETE (no body).
    Delete,
}

/// What a tool may do to the world.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SideEffects {
    /// Pure computation.
    None,
    /// Reads data.
    Read,
    /// Writes data Rein's users own.
    Write,
    /// Acts outside (sends email, pays, posts).
    External,
}

/// How a failed tool call may be retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    /// Attempts in all, including the first (1 = never retry).
    pub max_attempts: u32,
    /// Delay before the first retry; doubles each time, with full jitter.
    pub backoff: Duration,
    /// Cap on any one delay.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// The contract the runtime enforces around a tool, never the prompt.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ToolContract {
    /// Per-call timeout (each attempt).
    pub timeout: Duration,
    /// Retry policy for failures that are safe to retry.
    pub retry: RetryPolicy,
    /// Whether repeating a call has no further effect.
    pub idempotent: bool,
    /// What the tool may do to the world (default: `external`, the most cautious).
    pub side_effects: SideEffects,
    /// Scope the caller must hold (enforced by the governor).
    pub auth_scope: Option<String>,
    /// Cap on calls of this tool in one run.
    pub max_calls_per_run: Option<u32>,
    /// Whether each call needs a person's approval.
    pub confirm: bool,
    /// Magnitude rules on arguments, by JSON pointer (e.g. `/rows`), checked before each call.
    pub limits: Vec<MagnitudeRule>,
    /// When this tool's circuit breaker (one per tenant) opens, and for how long.
    pub breaker: crate::breaker::BreakerPolicy,
    /// Whether its results are untrusted (scanned and fenced), documents, or trusted.
    pub results: crate::guard::ResultTrust,
}

/// A bound on the magnitude of one argument: a number's value, an array's length, or a
/// string's length. Stops "clean up duplicates" from deleting 10,000 rows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MagnitudeRule {
    /// JSON pointer into the arguments.
    pub pointer: String,
    /// Smallest allowed magnitude.
    pub min: Option<f64>,
    /// Largest allowed magnitude.
    pub max: Option<f64>,
    /// What a call outside the bounds gets.
    pub action: RuleAction,
}

/// What a magnitude rule does with a call outside its bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    /// Refused before it is made; the model is told why.
    Refuse,
    /// Held until a person approves it.
    Approve,
}

#[cfg(test)]
mod magnitude_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_rule_cannot_be_slipped_past_by_leaving_out_or_reshaping_the_argument() {
        let rule = MagnitudeRule {
            pointer: "/rows".into(),
            min: Some(1.0),
            max: Some(100.0),
            action: RuleAction::Refuse,
        };
        assert!(rule.violation(&json!({})).unwrap().contains("missing"));
        assert!(
            rule.violation(&json!({"rows": {"all": true}}))
                .unwrap()
                .contains("must be a number, a list or a text")
        );
        assert!(rule.violation(&json!({"rows": [1, 2]})).is_none());
        let max_only = MagnitudeRule {
            pointer: "/rows".into(),
            min: None,
            max: Some(100.0),
            action: RuleAction::Refuse,
        };
        assert!(max_only.violation(&json!({})).is_none(), "nothing to bound");
    }
}

impl MagnitudeRule {
    /// A description of the violation, if `arguments` break this rule.
    ///
    /// An absent argument passes a rule with only `max` (nothing to bound) but fails one with
    /// `min`; a value with no magnitude (object, boolean, null) fails any rule, so a rule can
    /// never be slipped past by sending the argument in another shape.
    pub fn violation(&self, arguments: &Value) -> Option<String> {
        let Some(value) = arguments.pointer(&self.pointer) else {
            return self.min.map(|_| {
                format!(
                    "`{}` is missing, and the contract requires a minimum",
                    self.pointer
                )
            });
        };
        let (magnitude, what) = match value {
            Value::Number(n) => (n.as_f64().unwrap_or(f64::INFINITY), "is"),
            Value::Array(a) => (a.len() as f64, "has this many items:"),
            Value::String(t) => (t.chars().count() as f64, "has this many characters:"),
            _ => {
                return Some(format!(
                    "`{}` must be a number, a list or a text for the contract to bound it",
                    self.pointer
                ));
            }
        };
        let show = |v: f64| {
            if v.fract() == 0.0 {
                format!("{v:.0}")
            } else {
                v.to_string()
            }
        };
        if let Some(max) = self.max.filter(|m| magnitude > *m) {
            return Some(format!(
                "`{}` {what} {}, over the contract's limit of {}",
                self.pointer,
                show(magnitude),
                show(max)
            ));
        }
        if let Some(min) = self.min.filter(|m| magnitude < *m) {
            return Some(format!(
                "`{}` {what} {}, under the contract's minimum of {}",
                self.pointer,
                show(magnitude),
                show(min)
            ));
        }
        None
    }
}

impl Default for ToolContract {
    fn default() -> Self {
        ToolContract {
            timeout: DEFAULT_TOOL_TIMEOUT,
            retry: RetryPolicy::default(),
            idempotent: false,
            side_effects: SideEffects::External,
            auth_scope: None,
            max_calls_per_run: None,
            confirm: false,
            limits: Vec::new(),
            breaker: crate::breaker::BreakerPolicy::default(),
            results: crate::guard::ResultTrust::Untrusted,
        }
    }
}

impl ToolContract {
    /// Whether a failed call may be repeated: only when the failure says it is safe *and*
    /// repeating cannot do the side effect twice.
    pub fn may_retry(&self) -> bool {
        self.retry.max_attempts > 1
            && (self.idempotent
                || matches!(self.side_effects, SideEffects::None | SideEffects::Read))
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

/// What checking a spec needs to know about the world outside the file.
#[derive(Clone, Copy, Debug)]
pub struct CheckContext<'a> {
    /// Known model prices.
    pub prices: &'a PriceTable,
    /// Built-in tools by name.
    pub builtin_tools: &'a BTreeMap<String, BuiltinToolInfo>,
}

/// One problem in a spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where it is.
    pub pos: Pos,
    /// The field, e.g. `limits.max_cost_usd` or `tools[0].contract.timeout`.
    pub path: String,
    /// What is wrong, and what to write instead.
    pub message: String,
}

/// Every problem found in one spec file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct SpecErrors {
    /// The file, as the user named it.
    pub file: String,
    /// The problems, in file order.
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            let field = if d.path.is_empty() {
                "(document)"
            } else {
                &d.path
            };
            write!(
                f,
                "{}:{}:{}: {}: {}",
                self.file, d.pos.line, d.pos.col, field, d.message
            )?;
        }
        Ok(())
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

/// A mapping being read: reports unknown keys once, hands out known ones.
struct Fields<'n> {
    path: String,
    pos: Pos,
    entries: &'n [(String, Pos, Node)],
}

impl<'n> Fields<'n> {
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, _, v)| v)
    }

    fn child(&self, key: &str) -> String {
        join(&self.path, key)
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

struct Parser<'c> {
    diags: Vec<Diagnostic>,
    ctx: &'c CheckContext<'c>,
}

impl Parser<'_> {
    fn error(&mut self, pos: Pos, path: &str, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            pos,
            path: path.to_string(),
            message: message.into(),
        });
    }

    fn fields<'n>(&mut self, node: &'n Node, path: &str, known: &[&str]) -> Option<Fields<'n>> {
        let NodeValue::Map(entries) = &node.value else {
            self.error(
                node.pos,
                path,
                format!("expected a mapping, found {}", node.value.type_name()),
            );
            return None;
        };
        for (key, key_pos, _) in entries {
            if !known.contains(&key.as_str()) {
                self.error(
                    *key_pos,
                    &join(path, key),
                    format!(
                        "unknown field `{key}`; expected one of: {}",
                        known.join(", ")
                    ),
                );
            }
        }
        Some(Fields {
            path: path.to_string(),
            pos: node.pos,
            entries,
        })
    }

    fn required<'n>(&mut self, f: &Fields<'n>, key: &str, why: &str) -> Option<&'n Node> {
        let node = f.get(key);
        if node.is_none() {
            self.error(
                f.pos,
                &f.child(key),
                format!("missing required field `{key}`{why}"),
            );
        }
        node
    }

    fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.value {
            NodeValue::Str(s) if !s.trim().is_empty() => Some(s.clone()),
            NodeValue::Str(_) => {
                self.error(node.pos, path, "must not be empty");
                None
            }
            other => {
                self.error(
                    node.pos,
                    path,
                    format!("expected a string, found {}", other.type_name()),
                );
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, path: &str) -> Option<bool> {
        match &node.value {
            NodeValue::Bool(b) => Some(*b),
            other => {
                self.error(
                    node.pos,
                    path,
                    format!("expected true or false, found {}", other.type_name()),
                );
                None
            }
        }
    }

    fn integer(&mut self, node: &Node, path: &str, min: i64, max: i64) -> Option<i64> {
        match &node.value {
            NodeValue::Int(i) if (min..=max).contains(i) => Some(*i),
            NodeValue::Int(i) => {
                self.error(
                    node.pos,
                    path,
                    format!("{i} is out of range; expected {min} to {max}"),
                );
                None
            }
            other => {
                self.error(
                    node.pos,
                    path,
                    format!("expected an integer, found {}", other.type_name()),
                );
                None
            }
        }
    }

    fn number(&mut self, node: &Node, path: &str) -> Option<f64> {
        match &node.value {
            NodeValue::Int(i) => Some(*i as f64),
            NodeValue::Float(f) => Some(*f),
            other => {
                self.error(
                    node.pos,
                    path,
                    format!("expected a number, found {}", other.type_name()),
                );
                None
            }
        }
    }

    /// A list whose items are each read by `item` (given its path, e.g. `scopes[2]`); every
    /// bad item is reported.
    fn list<T>(
        &mut self,
        node: &Node,
        path: &str,
        expected: &str,
        mut item: impl FnMut(&mut Self, &Node, &str) -> Option<T>,
    ) -> Option<Vec<T>> {
        let NodeValue::Seq(items) = &node.value else {
            self.error(
                node.pos,
                path,
                format!("expected {expected}, found {}", node.value.type_name()),
            );
            return None;
        };
        let read: Vec<Option<T>> = items
            .iter()
            .enumerate()
            .map(|(i, n)| item(self, n, &format!("{path}[{i}]")))
            .collect();
        read.into_iter().collect()
    }

    fn duration(&mut self, node: &Node, path: &str) -> Option<Duration> {
        match &node.value {
            NodeValue::Str(s) => match parse_duration(s) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.error(node.pos, path, format!("bad duration: {e}"));
                    None
                }
            },
            other => {
                self.error(
                    node.pos,
                    path,
                    format!(
                        "expected a duration such as `30s`, found {}",
                        other.type_name()
                    ),
                );
                None
            }
        }
    }

    fn one_of<T: Copy>(&mut self, node: &Node, path: &str, choices: &[(&str, T)]) -> Option<T> {
        let text = self.string(node, path)?;
        let found = choices
            .iter()
            .find(|(name, _)| *name == text)
            .map(|(_, v)| *v);
        if found.is_none() {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            self.error(
                node.pos,
                path,
                format!("`{text}` is not one of: {}", names.join(", ")),
            );
        }
        found
    }

    fn json_schema(&mut self, node: &Node, path: &str) -> Option<(Value, jsonschema::Validator)> {
        let schema = node.to_json();
        if !schema.is_object() {
            self.error(node.pos, path, "a JSON Schema must be a mapping");
            return None;
        }
        match jsonschema::validator_for(&schema) {
            Ok(v) => Some((schema, v)),
            Err(e) => {
                let at = e.instance_path().to_string();
                let location = if at.is_empty() {
                    String::new()
                } else {
                    format!(" at {at}")
                };
                self.error(
                    node.pos,
                    path,
                    format!("invalid JSON Schema{location}: {e}"),
                );
                None
            }
        }
    }

    fn agent(&mut self, root: &Node) -> Option<Agent> {
        const KNOWN: &[&str] = &[
            "name",
            "version",
            "model",
            "instructions",
            "flow",
            "tools",
            "limits",
            "output_schema",
            "max_repairs",
            "scopes",
            "approval",
            "escalation",
            "session",
            "guards",
        ];
        let f = self.fields(root, "", KNOWN)?;

        let name = self.required(&f, "name", "").and_then(|n| {
            let name = self.string(n, "name")?;
            let ok = name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
            if !ok {
                self.error(
                    n.pos,
                    "name",
                    "use at most 64 lowercase letters, digits, `-` and `_`",
                );
            }
            ok.then_some(name)
        });
        let version = self
            .required(&f, "version", "")
            .and_then(|n| self.integer(n, "version", 1, i64::from(u32::MAX)))
            .map(|v| v as u32);
        let model = self.required(&f, "model", "").and_then(|n| self.model(n));
        let prices: Option<BTreeMap<String, Price>> = model.as_ref().map(|m| {
            m.all()
                .filter_map(|entry| {
                    self.ctx
                        .prices
                        .get(&entry.id)
                        .map(|p| (entry.id.clone(), *p))
                })
                .collect()
        });
        let instructions = self
            .required(&f, "instructions", "")
            .and_then(|n| self.string(n, "instructions"));
        let tools = match f.get("tools") {
            None => Some(Vec::new()),
            Some(n) => self.tools(n),
        };
        let flow = match (f.get("flow"), &tools) {
            (None, _) => Some(Flow::React),
            (Some(n), Some(tools)) => {
                let names: Vec<&str> = tools.iter().map(|(t, _)| t.name.as_str()).collect();
                let workers: Vec<&str> = tools
                    .iter()
                    .filter(|(t, _)| matches!(t.source, ToolSource::Agent(_)))
                    .map(|(t, _)| t.name.as_str())
                    .collect();
                self.flow(n, &names, &workers)
            }
            // The tools have their own errors; the flow is checked once they are right.
            (Some(_), None) => None,
        };
        let limits = self
            .required(&f, "limits", "; every agent needs hard limits")
            .and_then(|n| self.limits(n));
        let output = match f.get("output_schema") {
            None => Some(None),
            Some(n) => self.json_schema(n, "output_schema").map(Some),
        };
        let max_repairs = match (f.get("max_repairs"), f.get("output_schema")) {
            (None, _) => Some(DEFAULT_MAX_REPAIRS),
            (Some(n), None) => {
                self.error(
                    n.pos,
                    "max_repairs",
                    "repairs are of answers that fail `output_schema`, and this agent has none",
                );
                None
            }
            (Some(n), Some(_)) => self.integer(n, "max_repairs", 0, 10).map(|v| v as u32),
        };
        let approval = f.get("approval").map_or(Some(DEFAULT_APPROVAL), |n| {
            self.approval(n, f.get("output_schema").is_some())
        });
        let session = match f.get("session") {
            None => Some(None),
            Some(n) => self.fields(n, "session", &["ttl"]).and_then(|sf| {
                let ttl = match sf.get("ttl") {
                    None => Some(Duration::from_secs(30 * 60)),
                    Some(t) => self.duration(t, "session.ttl"),
                };
                ttl.map(|ttl| Some(SessionPolicy { ttl }))
            }),
        };
        let escalation = f
            .get("escalation")
            .map_or(Some(Escalation::default()), |n| {
                self.escalation(n, f.get("output_schema").is_some())
            });
        let guards = f
            .get("guards")
            .map_or(Some(crate::guard::Guards::default()), |n| self.guards(n));
        let scopes = match f.get("scopes") {
            None => Some(Vec::new()),
            Some(n) => self.list(n, "scopes", "a list of scope names", |p, item, path| {
                p.string(item, path)
            }),
        };

        if let (
            Some(ModelSpec {
                tool_choice: Some(ToolChoice::Tool(name)),
                ..
            }),
            Some(tools),
        ) = (&model, &tools)
            && !tools.iter().any(|(t, _)| &t.name == name)
        {
            let pos = f
                .get("model")
                .and_then(|m| m.get("tool_choice"))
                .map_or(f.pos, |n| n.pos);
            self.error(
                pos,
                "model.tool_choice",
                format!("`{name}` is not `auto`, `required`, `none` or one of this agent's tools"),
            );
            return None;
        }
        let (tools, tool_validators): (Vec<_>, Vec<_>) = tools?.into_iter().unzip();
        let (output_schema, output_validator) = match output? {
            Some((schema, validator)) => (Some(schema), Some(Arc::new(validator))),
            None => (None, None),
        };
        let step_validators = match &flow {
            Some(Flow::Graph(graph)) => self.step_validators(graph)?,
            Some(Flow::PlanExecute(policy)) => {
                let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
                let mut out = BTreeMap::new();
                for (key, schema) in [
                    ("plan", crate::plan::plan_schema(policy.max_steps, &names)),
                    ("step", crate::plan::step_schema()),
                ] {
                    let validator = jsonschema::validator_for(&schema).ok()?;
                    out.insert(key.to_string(), (schema, Arc::new(validator)));
                }
                out
            }
            _ => BTreeMap::new(),
        };
        let worker_validators = tools
            .iter()
            .filter_map(|t| match &t.source {
                ToolSource::Agent(WorkerSource {
                    output_schema: Some(schema),
                    ..
                }) => jsonschema::validator_for(schema)
                    .ok()
                    .map(|v| (t.name.clone(), Arc::new(v))),
                _ => None,
            })
            .collect();
        Some(Agent {
            spec: AgentSpec {
                name: name?,
                version: version?,
                model: model?,
                instructions: instructions?,
                flow: flow?,
                tools,
                limits: limits?,
                output_schema,
                max_repairs: max_repairs?,
                scopes: scopes?,
                approval: approval?,
                escalation: escalation?,
                session: session?,
                guards: guards?,
            },
            prices: prices?,
            tool_validators,
            output_validator,
            step_validators,
            worker_validators,
        })
    }

    /// `flow`: `react` (the default), `plan_execute` (not yet), or `{graph: {...}}`.
    fn flow(&mut self, node: &Node, tools: &[&str], workers: &[&str]) -> Option<Flow> {
        if let NodeValue::Map(_) = &node.value {
            let f = self.fields(node, "flow", &["graph", "plan_execute"])?;
            if let Some(p) = f.get("plan_execute") {
                return self.plan_policy(p).map(Flow::PlanExecute);
            }
            let Some(g) = f.get("graph") else {
                self.error(
                    node.pos,
                    "flow",
                    "expected `graph: {...}`, `plan_execute: {...}` or the name of a flow",
                );
                return None;
            };
            return self
                .graph(g, tools, workers)
                .map(|g| Flow::Graph(Box::new(g)));
        }
        let flow = self.string(node, "flow")?;
        match flow.as_str() {
            "react" => Some(Flow::React),
            "graph" => {
                self.error(
                    node.pos,
                    "flow",
                    "a graph flow is a mapping: `flow: {graph: {state, start, nodes, edges}}`",
                );
                None
            }
            "plan_execute" => Some(Flow::PlanExecute(PlanPolicy::default())),
            other => {
                self.error(
                    node.pos,
                    "flow",
                    format!("`{other}` is not a flow; use `react`, `plan_execute` or a `graph`"),
                );
                None
            }
        }
    }

    /// `flow: {plan_execute: {max_steps, max_revisions, replan, retries, on_step_failure}}`.
    fn plan_policy(&mut self, node: &Node) -> Option<PlanPolicy> {
        use crate::plan::{OnStepFailure, Replan};
        let f = self.fields(
            node,
            "flow.plan_execute",
            &[
                "max_steps",
                "max_revisions",
                "replan",
                "retries",
                "on_step_failure",
            ],
        )?;
        let d = PlanPolicy::default();
        let int = |p: &mut Self, key: &str, min: i64, max: i64, default: u32| match f.get(key) {
            None => Some(default),
            Some(n) => p.integer(n, &f.child(key), min, max).map(|v| v as u32),
        };
        let max_steps = int(self, "max_steps", 1, 20, d.max_steps);
        let max_revisions = int(self, "max_revisions", 0, 10, d.max_revisions);
        let retries = int(self, "retries", 0, 5, d.retries);
        let replan = f.get("replan").map_or(Some(d.replan), |n| {
            self.one_of(
                n,
                "flow.plan_execute.replan",
                &[
                    ("on_failure", Replan::OnFailure),
                    ("after_each_step", Replan::AfterEachStep),
                ],
            )
        });
        let on_step_failure = f
            .get("on_step_failure")
            .map_or(Some(d.on_step_failure), |n| {
                self.one_of(
                    n,
                    "flow.plan_execute.on_step_failure",
                    &[
                        ("replan", OnStepFailure::Replan),
                        ("skip", OnStepFailure::Skip),
                        ("fail", OnStepFailure::Fail),
                    ],
                )
            });
        Some(PlanPolicy {
            max_steps: max_steps?,
            max_revisions: max_revisions?,
            replan: replan?,
            retries: retries?,
            on_step_failure: on_step_failure?,
        })
    }

    /// The answer validators of a graph's model steps.
    fn step_validators(
        &mut self,
        graph: &Graph,
    ) -> Option<BTreeMap<String, (Value, Arc<jsonschema::Validator>)>> {
        let mut out = BTreeMap::new();
        for node in &graph.nodes {
            let schema = match &node.kind {
                NodeKind::Llm { writes, .. } => graph.answer_schema(writes),
                NodeKind::Tool { writes, .. } if !writes.is_empty() => graph.answer_schema(writes),
                NodeKind::Router {
                    routes,
                    choose: Some(_),
                } => Graph::choice_schema(routes),
                _ => continue,
            };
            match jsonschema::validator_for(&schema) {
                Ok(v) => {
                    out.insert(node.name.clone(), (schema, Arc::new(v)));
                }
                Err(e) => {
                    self.error(
                        node.pos,
                        &format!("flow.graph.nodes.{}", node.name),
                        format!("the state schema of the fields this node writes is invalid: {e}"),
                    );
                    return None;
                }
            }
        }
        Some(out)
    }

    fn graph(&mut self, node: &Node, tools: &[&str], workers: &[&str]) -> Option<Graph> {
        let f = self.fields(node, "flow.graph", &["state", "start", "nodes", "edges"])?;
        let state = self
            .required(&f, "state", "; a graph's state is a JSON Schema of the fields its nodes read and write")
            .and_then(|n| self.json_schema(n, "flow.graph.state"))
            .and_then(|(schema, _)| {
                let ok = schema.get("type").and_then(Value::as_str) == Some("object")
                    && schema.get("properties").is_some_and(Value::is_object);
                if !ok {
                    self.error(
                        node.pos,
                        "flow.graph.state",
                        "the state must be `type: object` with `properties` (the fields nodes read and write)",
                    );
                }
                ok.then_some(schema)
            });
        let start = self
            .required(&f, "start", "")
            .and_then(|n| self.string(n, "flow.graph.start"));
        let nodes = self.required(&f, "nodes", "").and_then(|n| {
            let NodeValue::Map(entries) = &n.value else {
                self.error(
                    n.pos,
                    "flow.graph.nodes",
                    "expected a mapping of node names to nodes",
                );
                return None;
            };
            let read: Vec<Option<GraphNode>> = entries
                .iter()
                .map(|(name, pos, body)| self.graph_node(name, *pos, body))
                .collect();
            read.into_iter().collect::<Option<Vec<_>>>()
        });
        let edges = match f.get("edges") {
            None => Some(Vec::new()),
            Some(n) => self.list(
                n,
                "flow.graph.edges",
                "a list of [from, to] pairs",
                |p, item, path| {
                    let pair = match &item.value {
                        NodeValue::Seq(ends) if ends.len() == 2 => {
                            let from = p.string(&ends[0], path);
                            let to = p.string(&ends[1], path);
                            from.zip(to)
                        }
                        _ => {
                            p.error(item.pos, path, "an edge is a pair `[from, to]`");
                            None
                        }
                    };
                    pair.map(|pair| (pair, item.pos))
                },
            ),
        };
        let (edges, edge_pos): (Vec<_>, Vec<_>) = edges?.into_iter().unzip();
        let graph = Graph {
            state: state?,
            start: start?,
            nodes: nodes?,
            edges,
        };
        let problems = graph.problems(tools, workers, &edge_pos, node.pos);
        if problems.is_empty() {
            Some(graph)
        } else {
            self.diags.extend(problems);
            None
        }
    }

    fn graph_node(&mut self, name: &str, pos: Pos, node: &Node) -> Option<GraphNode> {
        let path = format!("flow.graph.nodes.{name}");
        let kind_name = match &node.value {
            NodeValue::Map(entries) => {
                entries
                    .iter()
                    .find(|(k, _, _)| k == "kind")
                    .and_then(|(_, _, v)| match &v.value {
                        NodeValue::Str(s) => Some(s.clone()),
                        _ => None,
                    })
            }
            _ => None,
        };
        let known: &[&str] = match kind_name.as_deref() {
            Some("llm") => &[
                "kind",
                "max_visits",
                "instructions",
                "tools",
                "reads",
                "writes",
            ],
            Some("tool") => &["kind", "max_visits", "tool", "args", "writes", "on_error"],
            Some("router") => &["kind", "max_visits", "routes", "choose"],
            Some("human") => &["kind", "max_visits", "prompt", "writes", "on_deny"],
            Some("end") => &["kind", "output"],
            Some("subagent") => &["kind", "max_visits", "agent", "args", "writes", "on_error"],
            Some(other) => {
                self.error(
                    pos,
                    &format!("{path}.kind"),
                    format!("`{other}` is not a node kind; use llm, tool, subagent, router, human or end"),
                );
                return None;
            }
            None => {
                self.error(
                    pos,
                    &format!("{path}.kind"),
                    "missing `kind` (llm, tool, subagent, router, human or end)",
                );
                return None;
            }
        };
        let f = self.fields(node, &path, known)?;
        let names = |p: &mut Self, key: &str| -> Option<Vec<String>> {
            match f.get(key) {
                None => Some(Vec::new()),
                Some(n) => p.list(n, &f.child(key), "a list of names", |p, item, path| {
                    p.string(item, path)
                }),
            }
        };
        let text = |p: &mut Self, key: &str| -> Option<Option<String>> {
            match f.get(key) {
                None => Some(None),
                Some(n) => p.string(n, &f.child(key)).map(Some),
            }
        };
        let max_visits = match f.get("max_visits") {
            None => Some(None),
            Some(n) => self
                .integer(n, &f.child("max_visits"), 1, 1000)
                .map(|v| Some(v as u32)),
        };
        let kind = match kind_name.as_deref() {
            Some("llm") => {
                let instructions = self
                    .required(&f, "instructions", "")
                    .and_then(|n| self.string(n, &f.child("instructions")));
                let reads = match f.get("reads") {
                    None => Some(None),
                    Some(_) => names(self, "reads").map(Some),
                };
                let writes = names(self, "writes");
                if writes.as_ref().is_some_and(Vec::is_empty) {
                    self.error(pos, &f.child("writes"), "an llm node must write at least one state field: its answer is those fields");
                    return None;
                }
                NodeKind::Llm {
                    instructions: instructions?,
                    tools: names(self, "tools")?,
                    reads: reads?,
                    writes: writes?,
                }
            }
            Some(kind @ ("tool" | "subagent")) => {
                // A subagent node names its worker tool as `agent`.
                let key = if kind == "tool" { "tool" } else { "agent" };
                let tool = self
                    .required(&f, key, "")
                    .and_then(|n| self.string(n, &f.child(key)));
                let args = match f.get("args") {
                    None => Some(Value::Object(Map::new())),
                    Some(n) if matches!(n.value, NodeValue::Map(_)) => Some(n.to_json()),
                    Some(n) => {
                        self.error(
                            n.pos,
                            &f.child("args"),
                            "expected a mapping of argument names to values or `{pointer: /field}`",
                        );
                        None
                    }
                };
                NodeKind::Tool {
                    tool: tool?,
                    args: args?,
                    writes: names(self, "writes")?,
                    on_error: text(self, "on_error")?,
                    subagent: kind == "subagent",
                }
            }
            Some("router") => {
                let choose = text(self, "choose")?;
                let routes = self.required(&f, "routes", "").and_then(|n| {
                    self.list(
                        n,
                        &f.child("routes"),
                        "a list of routes",
                        |p, item, path| p.route(item, path, choose.is_some()),
                    )
                });
                let routes = routes?;
                if routes.is_empty() {
                    self.error(pos, &f.child("routes"), "a router needs at least one route");
                    return None;
                }
                NodeKind::Router { routes, choose }
            }
            Some("human") => {
                let prompt = self
                    .required(&f, "prompt", "")
                    .and_then(|n| self.string(n, &f.child("prompt")));
                let writes = names(self, "writes")?;
                if writes.len() > 1 {
                    self.error(
                        pos,
                        &f.child("writes"),
                        "a human node writes at most one field (the decision)",
                    );
                    return None;
                }
                NodeKind::Human {
                    prompt: prompt?,
                    writes,
                    on_deny: text(self, "on_deny")?,
                }
            }
            _ => NodeKind::End {
                output: text(self, "output")?,
            },
        };
        Some(GraphNode {
            name: name.to_string(),
            kind,
            max_visits: max_visits?,
            pos,
        })
    }

    /// One route of a router: `{when: {pointer, <test>: value}, to}`, or `{to}`.
    fn route(&mut self, node: &Node, path: &str, chosen: bool) -> Option<Route> {
        let f = self.fields(node, path, &["when", "to"])?;
        let to = self
            .required(&f, "to", "")
            .and_then(|n| self.string(n, &f.child("to")));
        let when = match f.get("when") {
            None => Some(None),
            Some(n) if chosen => {
                self.error(n.pos, &f.child("when"), "a router that lets a model `choose` has no conditions: its routes name the choices");
                None
            }
            Some(n) => self.condition(n, &f.child("when")).map(Some),
        };
        Some(Route {
            when: when?,
            to: to?,
        })
    }

    fn condition(&mut self, node: &Node, path: &str) -> Option<Condition> {
        let mut known = vec!["pointer"];
        known.extend_from_slice(crate::graph::TESTS);
        let f = self.fields(node, path, &known)?;
        let pointer = self
            .required(&f, "pointer", "")
            .and_then(|n| self.string(n, &f.child("pointer")))
            .and_then(|p| {
                if crate::graph::pointer_field(&p).is_none() {
                    self.error(
                        node.pos,
                        &f.child("pointer"),
                        format!("`{p}` is not a JSON pointer into the state, such as `/category`"),
                    );
                    return None;
                }
                Some(p)
            });
        let tests: Vec<(&str, &Node)> = crate::graph::TESTS
            .iter()
            .filter_map(|t| f.get(t).map(|n| (*t, n)))
            .collect();
        let [(name, value)] = tests[..] else {
            self.error(
                node.pos,
                path,
                format!(
                    "a condition has exactly one test, one of: {}",
                    crate::graph::TESTS.join(", ")
                ),
            );
            return None;
        };
        let at = f.child(name);
        let test = match name {
            "equals" => Some(Test::Equals(value.to_json())),
            "not_equals" => Some(Test::NotEquals(value.to_json())),
            "in" => match value.to_json() {
                Value::Array(items) => Some(Test::In(items)),
                _ => {
                    self.error(value.pos, &at, "expected a list of values");
                    None
                }
            },
            "exists" => self.boolean(value, &at).map(Test::Exists),
            "gt" => self.number(value, &at).map(Test::Gt),
            "gte" => self.number(value, &at).map(Test::Gte),
            "lt" => self.number(value, &at).map(Test::Lt),
            _ => self.number(value, &at).map(Test::Lte),
        };
        Some(Condition {
            pointer: pointer?,
            test: test?,
        })
    }

    fn model(&mut self, node: &Node) -> Option<ModelSpec> {
        let f = self.fields(
            node,
            "model",
            &[
                "primary",
                "fallbacks",
                "routes",
                "tool_choice",
                "max_output_tokens",
                "temperature",
                "retry",
                "timeout",
                "breaker",
            ],
        )?;
        let primary = self
            .required(&f, "primary", "")
            .and_then(|n| self.model_entry(n, "model.primary"));
        let fallbacks = match f.get("fallbacks") {
            None => Some(Vec::new()),
            Some(n) => self.list(
                n,
                "model.fallbacks",
                "a list of model entries",
                |p, item, path| p.model_entry(item, path),
            ),
        };
        let routes = f
            .get("routes")
            .map_or(Some(BTreeMap::new()), |n| self.routes(n));
        let max_output_tokens = match f.get("max_output_tokens") {
            None => Some(DEFAULT_MAX_OUTPUT_TOKENS),
            Some(n) => self
                .integer(n, "model.max_output_tokens", 1, 1_000_000)
                .map(|v| v as u32),
        };
        let temperature = match f.get("temperature") {
            None => Some(None),
            Some(n) => self.number(n, "model.temperature").and_then(|t| {
                if (0.0..=2.0).contains(&t) {
                    Some(Some(t))
                } else {
                    self.error(n.pos, "model.temperature", "must be between 0 and 2");
                    None
                }
            }),
        };
        let tool_choice = match f.get("tool_choice") {
            None => Some(None),
            Some(n) => self.string(n, "model.tool_choice").map(|choice| {
                Some(match choice.as_str() {
                    "auto" => ToolChoice::Auto,
                    "required" => ToolChoice::Required,
                    "none" => ToolChoice::None,
                    _ => ToolChoice::Tool(choice),
                })
            }),
        };
        let retry = f
            .get("retry")
            .map_or(Some(DEFAULT_MODEL_RETRY), |n| self.model_retry(n));
        let timeout = f.get("timeout").map_or(Some(DEFAULT_MODEL_TIMEOUT), |n| {
            self.duration(n, "model.timeout")
        });
        let breaker = f
            .get("breaker")
            .map_or(Some(crate::breaker::BreakerPolicy::default()), |n| {
                self.breaker(n, "model.breaker")
            });
        Some(ModelSpec {
            primary: primary?,
            fallbacks: fallbacks?,
            routes: routes?,
            tool_choice: tool_choice?,
            max_output_tokens: max_output_tokens?,
            temperature: temperature?,
            retry: retry?,
            timeout: timeout?,
            breaker: breaker?,
        })
    }

    /// `escalation: {on: [...], min_confidence}`.
    fn escalation(&mut self, node: &Node, has_schema: bool) -> Option<Escalation> {
        let f = self.fields(node, "escalation", &["on", "min_confidence"])?;
        let triggers = [
            EscalationTrigger::RepeatedToolFailure,
            EscalationTrigger::CircuitOpen,
            EscalationTrigger::LowConfidence,
            EscalationTrigger::BudgetWarning,
        ];
        let choices: Vec<(&str, EscalationTrigger)> =
            triggers.iter().map(|t| (t.as_str(), *t)).collect();
        let on = match f.get("on") {
            None => {
                self.error(
                    node.pos,
                    "escalation.on",
                    "name what escalates: repeated_tool_failure, circuit_open, low_confidence, budget_warning",
                );
                None
            }
            Some(n) => self.list(n, "escalation.on", "a list of triggers", |p, item, path| {
                p.one_of(item, path, &choices)
            }),
        };
        let min_confidence = match f.get("min_confidence") {
            None => Some(None),
            Some(n) => self.number(n, "escalation.min_confidence").and_then(|c| {
                if (0.0..=1.0).contains(&c) {
                    Some(Some(c))
                } else {
                    self.error(
                        n.pos,
                        "escalation.min_confidence",
                        "must be between 0 and 1",
                    );
                    None
                }
            }),
        };
        let (on, min_confidence) = (on?, min_confidence?);
        if on.contains(&EscalationTrigger::LowConfidence)
            && (min_confidence.is_none() || !has_schema)
        {
            self.error(
                node.pos,
                "escalation.on",
                "low_confidence needs `escalation.min_confidence` and an `output_schema` with a numeric `confidence` field",
            );
            return None;
        }
        Some(Escalation { on, min_confidence })
    }

    /// `guards: {input, tool_results, documents, threshold, spotlight, data_flow, allow_hosts}`.
    fn guards(&mut self, node: &Node) -> Option<crate::guard::Guards> {
        use crate::guard::{DataFlow, Guards, Policy};
        let f = self.fields(
            node,
            "guards",
            &[
                "input",
                "tool_results",
                "documents",
                "threshold",
                "spotlight",
                "data_flow",
                "allow_hosts",
                "output",
                "judge",
                "classifier",
            ],
        )?;
        let d = Guards::default();
        let policies: Vec<(&str, Policy)> = Policy::ALL.iter().map(|p| (p.as_str(), *p)).collect();
        let policy = |p: &mut Self, key: &str, default: Policy| {
            f.get(key)
                .map_or(Some(default), |n| p.one_of(n, &f.child(key), &policies))
        };
        let input = policy(self, "input", d.input);
        let tool_results = policy(self, "tool_results", d.tool_results);
        let documents = policy(self, "documents", d.documents);
        let threshold = match f.get("threshold") {
            None => Some(d.threshold),
            Some(n) => self.number(n, "guards.threshold").and_then(|t| {
                if t > 0.0 && t <= 1.0 {
                    Some(t)
                } else {
                    self.error(n.pos, "guards.threshold", "must be above 0 and at most 1");
                    None
                }
            }),
        };
        let spotlight = f
            .get("spotlight")
            .map_or(Some(d.spotlight), |n| self.boolean(n, "guards.spotlight"));
        let data_flow = f.get("data_flow").map_or(Some(d.data_flow), |n| {
            self.one_of(
                n,
                "guards.data_flow",
                &[
                    ("approve", DataFlow::Approve),
                    ("refuse", DataFlow::Refuse),
                    ("off", DataFlow::Off),
                ],
            )
        });
        let allow_hosts = match f.get("allow_hosts") {
            None => Some(Vec::new()),
            Some(n) => self.list(
                n,
                "guards.allow_hosts",
                "a list of host names",
                |p, item, path| {
                    let host = p.string(item, path)?;
                    let canonical = crate::guard::canonical_host(&host);
                    if canonical.is_none() {
                        p.error(
                            item.pos,
                            path,
                            format!(
                                "`{host}` is not a host name; write e.g. `api.example.com`, `10.0.0.7` or `::1`"
                            ),
                        );
                    }
                    canonical
                },
            ),
        };
        let output = f
            .get("output")
            .map_or(Some(d.output.clone()), |n| self.output_policy(n));
        let judge = match f.get("judge") {
            None => Some(None),
            Some(n) => self.judge(n).map(Some),
        };
        let classifier = match f.get("classifier") {
            None => Some(None),
            Some(n) => self
                .fields(n, "guards.classifier", &["min_score"])
                .and_then(|cf| match cf.get("min_score") {
                    None => Some(0.25),
                    Some(m) => self.number(m, "guards.classifier.min_score").and_then(|v| {
                        if (0.0..=1.0).contains(&v) {
                            Some(v)
                        } else {
                            self.error(
                                m.pos,
                                "guards.classifier.min_score",
                                "must be between 0 and 1",
                            );
                            None
                        }
                    }),
                })
                .map(|min_score| Some(crate::guard::Classifier { min_score })),
        };
        Some(Guards {
            classifier: classifier?,
            judge: judge?,
            output: output?,
            input: input?,
            tool_results: tool_results?,
            documents: documents?,
            threshold: threshold?,
            spotlight: spotlight?,
            data_flow: data_flow?,
            allow_hosts: allow_hosts?,
        })
    }

    /// `guards.judge: {rubric, threshold, on_fail, max_repairs}`.
    fn judge(&mut self, node: &Node) -> Option<crate::guard::Judge> {
        use crate::guard::{Judge, OnJudgeFail};
        let f = self.fields(
            node,
            "guards.judge",
            &["rubric", "threshold", "on_fail", "max_repairs"],
        )?;
        let rubric = self
            .required(&f, "rubric", ": say what a good answer is")
            .and_then(|n| self.string(n, "guards.judge.rubric"));
        let threshold = match f.get("threshold") {
            None => Some(0.7),
            Some(n) => self.number(n, "guards.judge.threshold").and_then(|t| {
                if (0.0..=1.0).contains(&t) {
                    Some(t)
                } else {
                    self.error(n.pos, "guards.judge.threshold", "must be between 0 and 1");
                    None
                }
            }),
        };
        let on_fail = f.get("on_fail").map_or(Some(OnJudgeFail::Repair), |n| {
            self.one_of(
                n,
                "guards.judge.on_fail",
                &[
                    ("repair", OnJudgeFail::Repair),
                    ("approve", OnJudgeFail::Approve),
                    ("escalate", OnJudgeFail::Escalate),
                ],
            )
        });
        let max_repairs = f.get("max_repairs").map_or(Some(1), |n| {
            self.integer(n, "guards.judge.max_repairs", 0, 5)
                .map(|v| v as u32)
        });
        Some(Judge {
            rubric: rubric?,
            threshold: threshold?,
            on_fail: on_fail?,
            max_repairs: max_repairs?,
        })
    }

    /// `guards.output: {secrets, pii, pii_action, internal_urls, stack_traces, prompt_leak,
    /// prompt_leak_threshold}`.
    fn output_policy(&mut self, node: &Node) -> Option<crate::sanitize::OutputPolicy> {
        use crate::sanitize::{Action, OutputPolicy, Pii};
        let f = self.fields(
            node,
            "guards.output",
            &[
                "secrets",
                "pii",
                "pii_action",
                "internal_urls",
                "stack_traces",
                "prompt_leak",
                "prompt_leak_threshold",
            ],
        )?;
        let d = OutputPolicy::default();
        let actions = [
            ("off", Action::Off),
            ("redact", Action::Redact),
            ("block", Action::Block),
        ];
        let action = |p: &mut Self, key: &str, default: Action| {
            f.get(key)
                .map_or(Some(default), |n| p.one_of(n, &f.child(key), &actions))
        };
        let secrets = action(self, "secrets", d.secrets);
        let pii_action = action(self, "pii_action", d.pii_action);
        let internal_urls = action(self, "internal_urls", d.internal_urls);
        let stack_traces = action(self, "stack_traces", d.stack_traces);
        let prompt_leak = action(self, "prompt_leak", d.prompt_leak);
        let pii = match f.get("pii") {
            None => Some(d.pii.clone()),
            Some(n) => self
                .list(
                    n,
                    "guards.output.pii",
                    "a list of detectors",
                    |p, item, path| p.one_of(item, path, &Pii::ALL),
                )
                .map(|v| v.into_iter().collect()),
        };
        let prompt_leak_threshold = match f.get("prompt_leak_threshold") {
            None => Some(d.prompt_leak_threshold),
            Some(n) => self
                .number(n, "guards.output.prompt_leak_threshold")
                .and_then(|t| {
                    if t > 0.0 && t <= 1.0 {
                        Some(t)
                    } else {
                        self.error(
                            n.pos,
                            "guards.output.prompt_leak_threshold",
                            "must be above 0 and at most 1",
                        );
                        None
                    }
                }),
        };
        Some(OutputPolicy {
            secrets: secrets?,
            pii: pii?,
            pii_action: pii_action?,
            internal_urls: internal_urls?,
            stack_traces: stack_traces?,
            prompt_leak: prompt_leak?,
            prompt_leak_threshold: prompt_leak_threshold?,
        })
    }

    /// `approval: {timeout, on_timeout, on_deny}`.
    fn approval(&mut self, node: &Node, has_schema: bool) -> Option<ApprovalPolicy> {
        let f = self.fields(
            node,
            "approval",
            &["timeout", "on_timeout", "on_deny", "min_confidence"],
        )?;
        let d = DEFAULT_APPROVAL;
        let min_confidence = match f.get("min_confidence") {
            None => Some(None),
            Some(_) if !has_schema => {
                self.error(
                    node.pos,
                    "approval.min_confidence",
                    "needs an `output_schema` with a numeric `confidence` field",
                );
                None
            }
            Some(n) => self.number(n, "approval.min_confidence").and_then(|c| {
                if (0.0..=1.0).contains(&c) {
                    Some(Some(c))
                } else {
                    self.error(n.pos, "approval.min_confidence", "must be between 0 and 1");
                    None
                }
            }),
        };
        let timeout = f
            .get("timeout")
            .map_or(Some(d.timeout), |n| self.duration(n, "approval.timeout"));
        let on_timeout = f.get("on_timeout").map_or(Some(d.on_timeout), |n| {
            self.one_of(
                n,
                "approval.on_timeout",
                &[("deny", OnTimeout::Deny), ("escalate", OnTimeout::Escalate)],
            )
        });
        let on_deny = f.get("on_deny").map_or(Some(d.on_deny), |n| {
            self.one_of(
                n,
                "approval.on_deny",
                &[("continue", OnDeny::Continue), ("end", OnDeny::End)],
            )
        });
        Some(ApprovalPolicy {
            min_confidence: min_confidence?,
            timeout: timeout?,
            on_timeout: on_timeout?,
            on_deny: on_deny?,
        })
    }

    /// `model.routes: {plan: entry, tool_call: entry, ...}`.
    fn routes(&mut self, node: &Node) -> Option<BTreeMap<StepKind, ModelRef>> {
        let names: Vec<&str> = StepKind::ALL.iter().map(|k| k.as_str()).collect();
        let f = self.fields(node, "model.routes", &names)?;
        let mut routes = BTreeMap::new();
        let mut ok = true;
        for kind in StepKind::ALL {
            if let Some(n) = f.get(kind.as_str()) {
                match self.model_entry(n, &f.child(kind.as_str())) {
                    Some(entry) => {
                        routes.insert(kind, entry);
                    }
                    None => ok = false,
                }
            }
        }
        ok.then_some(routes)
    }

    /// `model.retry: {max_attempts, base_delay, max_delay}`.
    fn model_retry(&mut self, node: &Node) -> Option<RetryPolicy> {
        let f = self.fields(
            node,
            "model.retry",
            &["max_attempts", "base_delay", "max_delay"],
        )?;
        let d = DEFAULT_MODEL_RETRY;
        let max_attempts = f.get("max_attempts").map_or(Some(d.max_attempts), |n| {
            self.integer(n, "model.retry.max_attempts", 1, 10)
                .map(|v| v as u32)
        });
        let backoff = f.get("base_delay").map_or(Some(d.backoff), |n| {
            self.duration(n, "model.retry.base_delay")
        });
        let max_backoff = f.get("max_delay").map_or(Some(d.max_backoff), |n| {
            self.duration(n, "model.retry.max_delay")
        });
        Some(RetryPolicy {
            max_attempts: max_attempts?,
            backoff: backoff?,
            max_backoff: max_backoff?,
        })
    }

    /// A model entry: `provider/model`, or `{name, provider, base_url, api_key_env}` for a
    /// compatible server; either way a supported provider and a known price.
    fn model_entry(&mut self, n: &Node, path: &str) -> Option<ModelRef> {
        let entry = if let NodeValue::Map(_) = &n.value {
            self.model_entry_map(n, path)?
        } else {
            let id = self.string(n, path)?;
            match id.split_once('/') {
                Some((provider, model)) if PROVIDERS.contains(&provider) && !model.is_empty() => {}
                Some((provider, model)) if !model.is_empty() => {
                    self.error(
                        n.pos,
                        path,
                        format!(
                            "provider `{provider}` is not supported; use one of: {} (a compatible server is `{{name, provider: openai, base_url}}`)",
                            PROVIDERS.join(", ")
                        ),
                    );
                    return None;
                }
                _ => {
                    self.error(
                        n.pos,
                        path,
                        format!("`{id}` must be `provider/model`, e.g. `openai/gpt-4o-mini`"),
                    );
                    return None;
                }
            }
            ModelRef::named(id)
        };
        if self.ctx.prices.get(&entry.id).is_none() {
            self.error(
                n.pos,
                path,
                format!(
                    "no price is known for `{id}`: a cost cap on an unpriced model would mean nothing; add it to rein.toml under [prices.\"{id}\"] with input, cached_input and output in USD per million tokens",
                    id = entry.id
                ),
            );
            return None;
        }
        Some(entry)
    }

    /// `{name, provider, base_url, api_key_env}`.
    fn model_entry_map(&mut self, n: &Node, path: &str) -> Option<ModelRef> {
        let f = self.fields(n, path, &["name", "provider", "base_url", "api_key_env"])?;
        let name = self
            .required(&f, "name", "")
            .and_then(|v| self.string(v, &f.child("name")))
            .and_then(|name| {
                if name.trim().is_empty() || name.contains(char::is_whitespace) {
                    self.error(
                        n.pos,
                        &f.child("name"),
                        "must be the model's name as its server knows it, without spaces",
                    );
                    None
                } else {
                    Some(name)
                }
            });
        let provider = self
            .required(&f, "provider", "")
            .and_then(|v| {
                let provider = self.string(v, &f.child("provider"))?;
                if PROVIDERS.contains(&provider.as_str()) {
                    Some(provider)
                } else {
                    self.error(
                        v.pos,
                        &f.child("provider"),
                        format!(
                            "`{provider}` is not a wire format Rein speaks; use one of: {} (vLLM, Ollama and llama.cpp speak `openai`)",
                            PROVIDERS.join(", ")
                        ),
                    );
                    None
                }
            });
        let base_url = self.required(&f, "base_url", "").and_then(|v| {
            let url = self.string(v, &f.child("base_url"))?;
            if url.starts_with("http://") || url.starts_with("https://") {
                Some(url.trim_end_matches('/').to_string())
            } else {
                self.error(
                    v.pos,
                    &f.child("base_url"),
                    "must start with http:// or https://",
                );
                None
            }
        });
        let api_key_env = match f.get("api_key_env") {
            None => Some(None),
            Some(v) => self.string(v, &f.child("api_key_env")).and_then(|var| {
                let well_formed = var.starts_with(|c: char| c.is_ascii_uppercase())
                    && var.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
                if !well_formed {
                    self.error(v.pos, &f.child("api_key_env"), format!("`{var}` is not an environment variable name (upper-case letters, digits and `_`)"));
                    None
                } else if OPERATOR_KEY_ENVS.contains(&var.as_str()) {
                    // The operator's provider keys only ever go to the endpoints the operator
                    // configured (`OPENAI_BASE_URL`, `ANTHROPIC_BASE_URL`), never to a URL a
                    // spec names: otherwise a spec could send them anywhere.
                    self.error(v.pos, &f.child("api_key_env"), format!("`{var}` is only sent to the endpoint the operator configured; name the server's own key variable, or use the `provider/model` form"));
                    None
                } else {
                    Some(Some(var))
                }
            }),
        };
        Some(ModelRef {
            id: format!("{}/{}", provider?, name?),
            base_url: Some(base_url?),
            api_key_env: api_key_env?,
        })
    }

    fn tools(&mut self, node: &Node) -> Option<Vec<(ToolSpec, Arc<jsonschema::Validator>)>> {
        let NodeValue::Seq(items) = &node.value else {
            self.error(
                node.pos,
                "tools",
                format!("expected a list, found {}", node.value.type_name()),
            );
            return None;
        };
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let path = format!("tools[{i}]");
            if let (Some(name_node), Some(name)) = (
                item.get("name"),
                item.get("name").and_then(|n| match &n.value {
                    NodeValue::Str(s) => Some(s.clone()),
                    _ => None,
                }),
            ) {
                if let Some(first_line) = seen.get(&name) {
                    self.error(
                        name_node.pos,
                        &format!("{path}.name"),
                        format!(
                            "duplicate tool name `{name}` (first defined at line {first_line})"
                        ),
                    );
                    ok = false;
                } else {
                    seen.insert(name, name_node.pos.line);
                }
            }
            match self.tool(item, &path) {
                Some(tool) => out.push(tool),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn tool(&mut self, node: &Node, path: &str) -> Option<(ToolSpec, Arc<jsonschema::Validator>)> {
        let f = self.fields(
            node,
            path,
            &["name", "description", "input_schema", "source", "contract"],
        )?;
        let name = self.required(&f, "name", "").and_then(|n| {
            let name = self.string(n, &f.child("name"))?;
            let ok = name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !ok {
                self.error(
                    n.pos,
                    &f.child("name"),
                    "use at most 64 letters, digits, `_` and `-` (what model APIs accept)",
                );
            }
            ok.then_some(name)
        });
        let source = self
            .required(&f, "source", "")
            .and_then(|n| self.source(n, &f.child("source")));
        let builtin = match &source {
            Some(ToolSource::Builtin(b)) => self.ctx.builtin_tools.get(b).cloned(),
            _ => None,
        };

        let description = match (f.get("description"), &builtin) {
            (Some(n), _) => self.string(n, &f.child("description")),
            (None, Some(info)) => Some(info.description.clone()),
            (None, None) => self
                .required(&f, "description", "; the model needs it to choose the tool")
                .and(None),
        };
        let schema = match (f.get("input_schema"), &builtin) {
            (Some(n), _) => {
                self.json_schema(n, &f.child("input_schema"))
                    .and_then(|(schema, v)| {
                        if schema.get("type").and_then(Value::as_str) != Some("object") {
                            self.error(
                                n.pos,
                                &f.child("input_schema"),
                                "a tool's input schema must have `type: object`",
                            );
                            return None;
                        }
                        Some((schema, v))
                    })
            }
            (None, Some(info)) => match jsonschema::validator_for(&info.input_schema) {
                Ok(v) => Some((info.input_schema.clone(), v)),
                Err(e) => {
                    self.error(
                        f.pos,
                        &f.child("input_schema"),
                        format!("built-in schema is invalid: {e}"),
                    );
                    None
                }
            },
            (None, None) => self.required(&f, "input_schema", "").and(None),
        };
        if let (Some(ToolSource::Http(http)), Some((schema, _)), Some(n)) =
            (&source, &schema, f.get("source"))
        {
            for placeholder in url_placeholders(&http.url) {
                let declared = schema
                    .get("properties")
                    .and_then(|p| p.get(placeholder))
                    .is_some();
                if !declared {
                    self.error(
                        n.pos,
                        &f.child("source.http.url"),
                        format!(
                            "placeholder `{{{placeholder}}}` is not a property of input_schema"
                        ),
                    );
                }
            }
        }
        let contract = match f.get("contract") {
            None => Some(ToolContract::default()),
            Some(n) => self.contract(n, &f.child("contract")),
        };
        if let (Some(contract), Some((schema, _)), Some(n)) =
            (&contract, &schema, f.get("contract"))
        {
            for rule in &contract.limits {
                let first = rule
                    .pointer
                    .trim_start_matches('/')
                    .split('/')
                    .next()
                    .unwrap_or("");
                let first = first.replace("~1", "/").replace("~0", "~");
                if schema
                    .get("properties")
                    .and_then(|p| p.get(&first))
                    .is_none()
                {
                    self.error(
                        n.pos,
                        &f.child("contract.limits"),
                        format!("`{}` does not point into an argument of input_schema (no property `{first}`)", rule.pointer),
                    );
                }
            }
        }
        let (input_schema, validator) = schema?;
        Some((
            ToolSpec {
                name: name?,
                description: description?,
                input_schema,
                source: source?,
                contract: contract?,
            },
            Arc::new(validator),
        ))
    }

    fn source(&mut self, node: &Node, path: &str) -> Option<ToolSource> {
        let f = self.fields(node, path, &["builtin", "http", "agent"])?;
        if f.entries.len() != 1 {
            self.error(
                node.pos,
                path,
                "give exactly one source: `builtin`, `http` or `agent`",
            );
            return None;
        }
        if let Some(n) = f.get("agent") {
            return self.worker(n, &f.child("agent")).map(ToolSource::Agent);
        }
        if let Some(n) = f.get("builtin") {
            let name = self.string(n, &f.child("builtin"))?;
            if !self.ctx.builtin_tools.contains_key(&name) {
                let known: Vec<&str> = self.ctx.builtin_tools.keys().map(String::as_str).collect();
                self.error(
                    n.pos,
                    &f.child("builtin"),
                    format!(
                        "no built-in tool `{name}`; built-ins are: {}",
                        known.join(", ")
                    ),
                );
                return None;
            }
            return Some(ToolSource::Builtin(name));
        }
        let n = f.get("http")?;
        let path = f.child("http");
        let h = self.fields(n, &path, &["url", "method", "headers"])?;
        let url = self.required(&h, "url", "").and_then(|u| {
            let url = self.string(u, &h.child("url"))?;
            if url.starts_with("http://") || url.starts_with("https://") {
                Some(url)
            } else {
                self.error(
                    u.pos,
                    &h.child("url"),
                    "must start with http:// or https://",
                );
                None
            }
        });
        let method = match h.get("method") {
            None => Some(HttpMethod::Get),
            Some(m) => self.one_of(
                m,
                &h.child("method"),
                &[
                    ("GET", HttpMethod::Get),
                    ("POST", HttpMethod::Post),
                    ("PUT", HttpMethod::Put),
                    ("PATCH", HttpMethod::Patch),
                    ("DELETE", HttpMethod::Delete),
                ],
            ),
        };
        let headers = match h.get("headers") {
            None => Some(BTreeMap::new()),
            Some(hn) => match &hn.value {
                NodeValue::Map(entries) => {
                    let mut map = BTreeMap::new();
                    for (k, key_pos, v) in entries {
                        let path = join(&h.child("headers"), k);
                        if !is_header_name(k) {
                            self.error(
                                *key_pos,
                                &path,
                                format!("`{k}` is not a valid HTTP header name"),
                            );
                            continue;
                        }
                        if let Some(value) = self.string(v, &path) {
                            if value.chars().any(|c| c.is_control()) {
                                self.error(
                                    v.pos,
                                    &path,
                                    "header values must not contain control characters",
                                );
                                continue;
                            }
                            map.insert(k.clone(), value);
                        }
                    }
                    Some(map)
                }
                other => {
                    self.error(
                        hn.pos,
                        &h.child("headers"),
                        format!("expected a mapping, found {}", other.type_name()),
                    );
                    None
                }
            },
        };
        Some(ToolSource::Http(HttpSource {
            url: url?,
            method: method?,
            headers: headers?,
        }))
    }

    /// `source: {agent: {spec, output_schema, max_cost_usd, max_total_tokens, fallback}}`.
    fn worker(&mut self, node: &Node, path: &str) -> Option<WorkerSource> {
        let f = self.fields(
            node,
            path,
            &[
                "spec",
                "output_schema",
                "max_cost_usd",
                "max_total_tokens",
                "fallback",
            ],
        )?;
        let spec = self
            .required(
                &f,
                "spec",
                "; a spec file (.yaml) or a registered agent's name",
            )
            .and_then(|n| self.string(n, &f.child("spec")));
        let output_schema = match f.get("output_schema") {
            None => Some(None),
            Some(n) => self
                .json_schema(n, &f.child("output_schema"))
                .map(|(s, _)| Some(s)),
        };
        let max_cost_usd = match f.get("max_cost_usd") {
            None => Some(None),
            Some(n) => {
                let dollars = self.number(n, &f.child("max_cost_usd"))?;
                match Usd::from_dollars(dollars) {
                    Some(usd) if usd > Usd::ZERO => Some(Some(usd)),
                    _ => {
                        self.error(
                            n.pos,
                            &f.child("max_cost_usd"),
                            "must be a positive amount of USD with at most 6 decimals",
                        );
                        None
                    }
                }
            }
        };
        let max_total_tokens = match f.get("max_total_tokens") {
            None => Some(None),
            Some(n) => self
                .integer(n, &f.child("max_total_tokens"), 1, i64::MAX)
                .map(|v| Some(v as u64)),
        };
        let fallback = match f.get("fallback") {
            None => Some(None),
            Some(n) if matches!(&n.value, NodeValue::Str(s) if s == "escalate") => {
                Some(Some(WorkerFallback::Escalate))
            }
            Some(n) => {
                let path = f.child("fallback");
                let g = self.fields(n, &path, &["agent", "answer"])?;
                match (g.get("agent"), g.get("answer")) {
                    (Some(a), None) => self
                        .string(a, &g.child("agent"))
                        .map(|a| Some(WorkerFallback::Agent(a))),
                    (None, Some(v)) => Some(Some(WorkerFallback::Answer(v.to_json()))),
                    _ => {
                        self.error(
                            n.pos,
                            &path,
                            "give one fallback: `{agent: SPEC}`, `{answer: VALUE}` or `escalate`",
                        );
                        None
                    }
                }
            }
        };
        Some(WorkerSource {
            spec: spec?,
            output_schema: output_schema?,
            max_cost_usd: max_cost_usd?,
            max_total_tokens: max_total_tokens?,
            fallback: fallback?,
        })
    }

    fn contract(&mut self, node: &Node, path: &str) -> Option<ToolContract> {
        let f = self.fields(
            node,
            path,
            &[
                "timeout",
                "retry",
                "idempotent",
                "side_effects",
                "auth_scope",
                "max_calls_per_run",
                "confirm",
                "limits",
                "breaker",
                "results",
            ],
        )?;
        let d = ToolContract::default();
        let timeout = f
            .get("timeout")
            .map_or(Some(d.timeout), |n| self.duration(n, &f.child("timeout")));
        let retry = f
            .get("retry")
            .map_or(Some(d.retry), |n| self.retry(n, &f.child("retry")));
        let idempotent = f.get("idempotent").map_or(Some(d.idempotent), |n| {
            self.boolean(n, &f.child("idempotent"))
        });
        let side_effects = f.get("side_effects").map_or(Some(d.side_effects), |n| {
            self.one_of(
                n,
                &f.child("side_effects"),
                &[
                    ("none", SideEffects::None),
                    ("read", SideEffects::Read),
                    ("write", SideEffects::Write),
                    ("external", SideEffects::External),
                ],
            )
        });
        let auth_scope = match f.get("auth_scope") {
            None => Some(None),
            Some(n) => self.string(n, &f.child("auth_scope")).map(Some),
        };
        let max_calls_per_run = match f.get("max_calls_per_run") {
            None => Some(None),
            Some(n) => self
                .integer(n, &f.child("max_calls_per_run"), 1, 1_000_000)
                .map(|v| Some(v as u32)),
        };
        let confirm = f
            .get("confirm")
            .map_or(Some(d.confirm), |n| self.boolean(n, &f.child("confirm")));
        let limits = match f.get("limits") {
            None => Some(Vec::new()),
            Some(n) => self.magnitude_rules(n, &f.child("limits")),
        };
        let breaker = f
            .get("breaker")
            .map_or(Some(d.breaker), |n| self.breaker(n, &f.child("breaker")));
        let results = f.get("results").map_or(Some(d.results), |n| {
            use crate::guard::ResultTrust;
            self.one_of(
                n,
                &f.child("results"),
                &[
                    ("untrusted", ResultTrust::Untrusted),
                    ("document", ResultTrust::Document),
                    ("trusted", ResultTrust::Trusted),
                ],
            )
        });
        Some(ToolContract {
            results: results?,
            timeout: timeout?,
            retry: retry?,
            idempotent: idempotent?,
            side_effects: side_effects?,
            auth_scope: auth_scope?,
            max_calls_per_run: max_calls_per_run?,
            confirm: confirm?,
            limits: limits?,
            breaker: breaker?,
        })
    }

    fn breaker(&mut self, node: &Node, path: &str) -> Option<crate::breaker::BreakerPolicy> {
        let f = self.fields(
            node,
            path,
            &["failures", "failure_rate", "window", "cool_down"],
        )?;
        let d = crate::breaker::BreakerPolicy::default();
        let failures = f.get("failures").map_or(Some(d.failures), |n| {
            self.integer(n, &f.child("failures"), 1, 10_000)
                .map(|v| v as u32)
        });
        let failure_rate = f.get("failure_rate").map_or(Some(d.failure_rate), |n| {
            self.integer(n, &f.child("failure_rate"), 1, 100)
                .map(|v| v as u32)
        });
        let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let window = f.get("window").map_or(Some(d.window_ms), |n| {
            self.duration(n, &f.child("window")).map(millis)
        });
        let cool_down = f.get("cool_down").map_or(Some(d.cool_down_ms), |n| {
            self.duration(n, &f.child("cool_down")).map(millis)
        });
        Some(crate::breaker::BreakerPolicy {
            failures: failures?,
            failure_rate: failure_rate?,
            window_ms: window?,
            cool_down_ms: cool_down?,
        })
    }

    fn magnitude_rules(&mut self, node: &Node, path: &str) -> Option<Vec<MagnitudeRule>> {
        let NodeValue::Map(entries) = &node.value else {
            self.error(
                node.pos,
                path,
                format!(
                    "expected a mapping of JSON pointers to rules, found {}",
                    node.value.type_name()
                ),
            );
            return None;
        };
        let mut rules = Vec::new();
        let mut ok = true;
        for (pointer, key_pos, rule) in entries {
            let at = format!("{path}.{pointer}");
            if !pointer.starts_with('/') {
                self.error(
                    *key_pos,
                    &at,
                    format!("`{pointer}` is not a JSON pointer; write e.g. `/rows`"),
                );
                ok = false;
                continue;
            }
            let Some(f) = self.fields(rule, &at, &["min", "max", "action"]) else {
                ok = false;
                continue;
            };
            let action = match f.get("action") {
                None => RuleAction::Refuse,
                Some(n) => match self.one_of(
                    n,
                    &f.child("action"),
                    &[
                        ("refuse", RuleAction::Refuse),
                        ("approve", RuleAction::Approve),
                    ],
                ) {
                    Some(a) => a,
                    None => {
                        ok = false;
                        continue;
                    }
                },
            };
            let min = f.get("min").map(|n| self.number(n, &f.child("min")));
            let max = f.get("max").map(|n| self.number(n, &f.child("max")));
            if matches!(min, Some(None)) || matches!(max, Some(None)) {
                ok = false;
                continue;
            }
            let (min, max) = (min.flatten(), max.flatten());
            if min.is_none() && max.is_none() {
                self.error(rule.pos, &at, "give `max`, `min` or both");
                ok = false;
                continue;
            }
            if let (Some(lo), Some(hi)) = (min, max)
                && lo > hi
            {
                self.error(
                    rule.pos,
                    &at,
                    format!("`min` ({lo}) is above `max` ({hi}): no call could pass"),
                );
                ok = false;
                continue;
            }
            rules.push(MagnitudeRule {
                pointer: pointer.clone(),
                min,
                max,
                action,
            });
        }
        ok.then_some(rules)
    }

    fn retry(&mut self, node: &Node, path: &str) -> Option<RetryPolicy> {
        let f = self.fields(node, path, &["max_attempts", "backoff", "max_backoff"])?;
        let d = RetryPolicy::default();
        let max_attempts = f.get("max_attempts").map_or(Some(d.max_attempts), |n| {
            self.integer(n, &f.child("max_attempts"), 1, 10)
                .map(|v| v as u32)
        });
        let backoff = f
            .get("backoff")
            .map_or(Some(d.backoff), |n| self.duration(n, &f.child("backoff")));
        let max_backoff = f.get("max_backoff").map_or(Some(d.max_backoff), |n| {
            self.duration(n, &f.child("max_backoff"))
        });
        Some(RetryPolicy {
            max_attempts: max_attempts?,
            backoff: backoff?,
            max_backoff: max_backoff?,
        })
    }

    fn limits(&mut self, node: &Node) -> Option<Limits> {
        let f = self.fields(
            node,
            "limits",
            &[
                "max_iterations",
                "max_total_tokens",
                "max_cost_usd",
                "timeout",
                "max_tool_calls",
                "max_repeated_tool_calls",
                "max_repeated_errors",
                "max_steps_without_progress",
                "max_consecutive_failures",
                "max_depth",
            ],
        )?;
        let max_iterations = self
            .required(
                &f,
                "max_iterations",
                "; every agent must cap its model calls",
            )
            .and_then(|n| self.integer(n, "limits.max_iterations", 1, 100_000))
            .map(|v| v as u32);
        let max_total_tokens = self
            .required(&f, "max_total_tokens", "; every agent must cap its tokens")
            .and_then(|n| self.integer(n, "limits.max_total_tokens", 1, i64::MAX))
            .map(|v| v as u64);
        let max_cost_usd = self
            .required(&f, "max_cost_usd", "; every agent must cap its cost in USD")
            .and_then(|n| {
                let dollars = self.number(n, "limits.max_cost_usd")?;
                match Usd::from_dollars(dollars) {
                    Some(usd) if usd > Usd::ZERO => Some(usd),
                    _ => {
                        self.error(
                            n.pos,
                            "limits.max_cost_usd",
                            "must be a positive amount of USD with at most 6 decimals",
                        );
                        None
                    }
                }
            });
        let timeout = f.get("timeout").map_or(Some(DEFAULT_RUN_TIMEOUT), |n| {
            self.duration(n, "limits.timeout")
        });
        let max_tool_calls = f
            .get("max_tool_calls")
            .map_or(Some(DEFAULT_MAX_TOOL_CALLS), |n| {
                self.integer(n, "limits.max_tool_calls", 0, 1_000_000)
                    .map(|v| v as u32)
            });
        let max_repeated_tool_calls =
            f.get("max_repeated_tool_calls")
                .map_or(Some(DEFAULT_MAX_REPEATED_TOOL_CALLS), |n| {
                    self.integer(n, "limits.max_repeated_tool_calls", 2, 1_000)
                        .map(|v| v as u32)
                });
        let mut count = |key: &str, default: u32| {
            f.get(key).map_or(Some(default), |n| {
                self.integer(n, &format!("limits.{key}"), 2, 1_000)
                    .map(|v| v as u32)
            })
        };
        let max_repeated_errors = count("max_repeated_errors", DEFAULT_MAX_REPEATED_ERRORS);
        let max_steps_without_progress = count(
            "max_steps_without_progress",
            DEFAULT_MAX_STEPS_WITHOUT_PROGRESS,
        );
        let max_consecutive_failures =
            count("max_consecutive_failures", DEFAULT_MAX_CONSECUTIVE_FAILURES);
        let max_depth = f.get("max_depth").map_or(Some(DEFAULT_MAX_DEPTH), |n| {
            self.integer(n, "limits.max_depth", 0, 16).map(|v| v as u32)
        });
        Some(Limits {
            max_depth: max_depth?,
            max_repeated_errors: max_repeated_errors?,
            max_steps_without_progress: max_steps_without_progress?,
            max_consecutive_failures: max_consecutive_failures?,
            max_iterations: max_iterations?,
            max_total_tokens: max_total_tokens?,
            max_cost_usd: max_cost_usd?,
            timeout: timeout?,
            max_tool_calls: max_tool_calls?,
            max_repeated_tool_calls: max_repeated_tool_calls?,
        })
    }
}

/// Whether `name` is an HTTP header name (an RFC 9110 token).
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The `{name}` placeholders of a URL template, in order.
pub fn url_placeholders(url: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = url;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end) => {
                out.push(&after[..end]);
                rest = &after[end + 1..];
            }
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = r#"name: order-support
version: 1
model:
  primary: openai/gpt-4o-mini
  max_output_tokens: 512
instructions: You answer questions about orders. Use the tools.
flow: react
tools:
  - name: get_order_status
    description: Look up an order by its numeric id.
    input_schema:
      type: object
      properties: {order_id: {type: string, pattern: "^[0-9]+$"}}
      required: [order_id]
      additionalProperties: false
    source:
      http: {url: "http://127.0.0.1:8089/orders/{order_id}", method: GET}
    contract: {timeout: 5s, idempotent: true, side_effects: none, max_calls_per_run: 3, retry: {max_attempts: 3}}
limits:
  max_iterations: 10
  max_total_tokens: 20000
  max_cost_usd: 0.50
  timeout: 60s
"#;

    fn check(src: &str) -> Result<Agent, SpecErrors> {
        let prices = PriceTable::default();
        let builtins = BTreeMap::new();
        Agent::parse(
            "agent.yaml",
            src,
            &CheckContext {
                prices: &prices,
                builtin_tools: &builtins,
            },
        )
    }

    #[test]
    fn the_issue_example_is_accepted_as_written() {
        let agent = check(EXAMPLE).unwrap();
        let spec = &agent.spec;
        assert_eq!(spec.name, "order-support");
        assert_eq!(spec.model.max_output_tokens, 512);
        assert_eq!(spec.limits.max_cost_usd, Usd::from_micros(500_000));
        assert_eq!(spec.limits.timeout, Duration::from_secs(60));
        assert_eq!(spec.limits.max_tool_calls, DEFAULT_MAX_TOOL_CALLS);
        let tool = &spec.tools[0];
        assert_eq!(tool.contract.timeout, Duration::from_secs(5));
        assert_eq!(tool.contract.max_calls_per_run, Some(3));
        assert!(tool.contract.may_retry());
        assert!(matches!(&tool.source, ToolSource::Http(h) if h.method == HttpMethod::Get));
    }

    #[test]
    fn missing_cost_cap_is_rejected_naming_the_field() {
        let src = EXAMPLE.replace("  max_cost_usd: 0.50\n", "");
        let err = check(&src).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(
                "agent.yaml:20:3: limits.max_cost_usd: missing required field `max_cost_usd`"
            ),
            "{text}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_line_and_field() {
        let src = EXAMPLE
            .replace("flow: react", "flow: react\ncolour: blue")
            .replace("timeout: 5s", "timeout: 5 parsecs")
            .replace("max_iterations: 10", "max_iterations: ten")
            .replace("type: string, pattern", "type: strng, pattern");
        let err = check(&src).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.diagnostics.len(), 4, "{text}");
        assert!(
            text.contains("agent.yaml:8:1: colour: unknown field `colour`"),
            "{text}"
        );
        assert!(
            text.contains("tools[0].input_schema: invalid JSON Schema"),
            "{text}"
        );
        assert!(
            text.contains("tools[0].contract.timeout: bad duration"),
            "{text}"
        );
        assert!(
            text.contains("limits.max_iterations: expected an integer, found a string"),
            "{text}"
        );
    }

    #[test]
    fn duplicate_tool_names_point_at_the_first() {
        let tool = EXAMPLE
            .split("tools:\n")
            .nth(1)
            .unwrap()
            .split("limits:")
            .next()
            .unwrap();
        let src = EXAMPLE.replace("limits:", &format!("{tool}limits:"));
        let text = check(&src).unwrap_err().to_string();
        assert!(
            text.contains("duplicate tool name `get_order_status` (first defined at line 9)"),
            "{text}"
        );
    }

    #[test]
    fn unpriced_models_are_refused() {
        let src = EXAMPLE.replace("gpt-4o-mini", "my-local-llama");
        let text = check(&src).unwrap_err().to_string();
        assert!(
            text.contains("no price is known for `openai/my-local-llama`"),
            "{text}"
        );
    }

    #[test]
    fn every_fallback_must_be_a_priced_supported_model() {
        let src = EXAMPLE.replace(
            "max_output_tokens: 512",
            "max_output_tokens: 512\n  fallbacks: [openai/gpt-4o, openai/my-llama, cohere/command]",
        );
        let text = check(&src).unwrap_err().to_string();
        assert!(
            text.contains("model.fallbacks[1]: no price is known for `openai/my-llama`"),
            "{text}"
        );
        assert!(
            text.contains("model.fallbacks[2]: provider `cohere` is not supported"),
            "{text}"
        );
        let ok = check(&EXAMPLE.replace(
            "max_output_tokens: 512",
            "max_output_tokens: 512\n  fallbacks: [openai/gpt-4o]",
        ))
        .unwrap();
        let chain: Vec<&ModelRef> = ok.spec.model.chain().collect();
        assert_eq!(
            ok.worst_price(&chain).output,
            ok.prices["openai/gpt-4o"].output,
            "pre-flight uses the dearest model of the chain"
        );
    }

    fn check_with_price(src: &str, id: &str) -> Result<Agent, SpecErrors> {
        let mut prices = PriceTable::default();
        prices.set(id, crate::price::Price::default());
        let builtins = BTreeMap::new();
        Agent::parse(
            "agent.yaml",
            src,
            &CheckContext {
                prices: &prices,
                builtin_tools: &builtins,
            },
        )
    }

    #[test]
    fn a_compatible_server_is_a_map_entry_with_its_own_url_and_key_variable() {
        let src = EXAMPLE.replace(
            "primary: openai/gpt-4o-mini",
            "primary: {name: gemma3, provider: openai, base_url: \"http://127.0.0.1:8080/v1/\", api_key_env: LOCAL_LLM_KEY}",
        );
        let agent = check_with_price(&src, "openai/gemma3").unwrap();
        assert_eq!(
            agent.spec.model.primary,
            ModelRef {
                id: "openai/gemma3".into(),
                base_url: Some("http://127.0.0.1:8080/v1".into()),
                api_key_env: Some("LOCAL_LLM_KEY".into()),
            }
        );
        assert_eq!(agent.spec.model.primary.name(), "gemma3");
        assert_eq!(
            agent.spec.model.primary.endpoint_key(),
            "openai/gemma3@http://127.0.0.1:8080/v1"
        );
    }

    #[test]
    fn a_map_entry_may_not_send_the_operators_keys_to_its_url() {
        for var in OPERATOR_KEY_ENVS {
            let src = EXAMPLE.replace(
                "primary: openai/gpt-4o-mini",
                &format!("primary: {{name: gemma3, provider: openai, base_url: \"https://evil.example\", api_key_env: {var}}}"),
            );
            let text = check_with_price(&src, "openai/gemma3")
                .unwrap_err()
                .to_string();
            assert!(
                text.contains(&format!("model.primary.api_key_env: `{var}` is only sent to the endpoint the operator configured")),
                "{text}"
            );
        }
    }

    #[test]
    fn a_bad_map_entry_names_each_field_at_fault() {
        let src = EXAMPLE.replace(
            "primary: openai/gpt-4o-mini",
            "primary: {name: gemma3, provider: ollama, base_url: \"ftp://x\", api_key_env: lower, port: 1}",
        );
        let text = check_with_price(&src, "openai/gemma3")
            .unwrap_err()
            .to_string();
        for expected in [
            "model.primary.port: unknown field",
            "model.primary.provider: `ollama` is not a wire format Rein speaks",
            "model.primary.base_url: must start with http:// or https://",
            "model.primary.api_key_env: `lower` is not an environment variable name",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in {text}");
        }
        let unpriced = EXAMPLE.replace(
            "primary: openai/gpt-4o-mini",
            "primary: {name: qwen, provider: openai, base_url: \"http://127.0.0.1:1/v1\"}",
        );
        let text = check(&unpriced).unwrap_err().to_string();
        assert!(
            text.contains("no price is known for `openai/qwen`"),
            "{text}"
        );
    }

    #[test]
    fn routes_name_known_step_kinds_and_priced_models() {
        let src = EXAMPLE.replace(
            "max_output_tokens: 512",
            "max_output_tokens: 512\n  routes: {plan: openai/gpt-5, final: openai/gpt-4.1-nano}",
        );
        let agent = check(&src).unwrap();
        let ids = |kind| -> Vec<String> {
            agent
                .spec
                .model
                .step_chain(kind)
                .into_iter()
                .map(|m| m.id.clone())
                .collect()
        };
        assert_eq!(ids(StepKind::Plan), ["openai/gpt-5", "openai/gpt-4o-mini"]);
        assert_eq!(ids(StepKind::ToolCall), ["openai/gpt-4o-mini"]);
        let bad = EXAMPLE.replace(
            "max_output_tokens: 512",
            "max_output_tokens: 512\n  routes: {think: openai/gpt-5, final: openai/nope}",
        );
        let text = check(&bad).unwrap_err().to_string();
        assert!(text.contains("model.routes.think: unknown field"), "{text}");
        assert!(
            text.contains("model.routes.final: no price is known for `openai/nope`"),
            "{text}"
        );
    }

    #[test]
    fn max_repairs_needs_an_output_schema_and_a_small_bound() {
        let text = check(&format!("{EXAMPLE}max_repairs: 3\n"))
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("max_repairs: repairs are of answers that fail `output_schema`"),
            "{text}"
        );
        let schema = "output_schema: {type: object}\n";
        assert_eq!(
            check(&format!("{EXAMPLE}{schema}max_repairs: 3\n"))
                .unwrap()
                .spec
                .max_repairs,
            3
        );
        assert_eq!(
            check(&format!("{EXAMPLE}{schema}"))
                .unwrap()
                .spec
                .max_repairs,
            DEFAULT_MAX_REPAIRS
        );
        assert!(check(&format!("{EXAMPLE}{schema}max_repairs: 11\n")).is_err());
    }

    #[test]
    fn approval_policy_and_rule_actions_are_checked() {
        let ok = check(&format!(
            "{EXAMPLE}approval: {{timeout: 2h, on_timeout: escalate, on_deny: end}}\n"
        ))
        .unwrap();
        assert_eq!(
            ok.spec.approval,
            ApprovalPolicy {
                min_confidence: None,
                timeout: Duration::from_secs(7200),
                on_timeout: OnTimeout::Escalate,
                on_deny: OnDeny::End,
            }
        );
        assert_eq!(check(EXAMPLE).unwrap().spec.approval, DEFAULT_APPROVAL);
        let bad = EXAMPLE.replace(
            "max_calls_per_run: 3,",
            "max_calls_per_run: 3, limits: {\"/order_id\": {max: 9, action: ask}},",
        );
        let text = check(&format!("{bad}approval: {{on_timeout: wait}}\n"))
            .unwrap_err()
            .to_string();
        assert!(text.contains("limits./order_id.action"), "{text}");
        assert!(text.contains("approval.on_timeout"), "{text}");
    }

    #[test]
    fn escalation_names_known_triggers_and_low_confidence_needs_its_threshold() {
        let ok = check(&format!(
            "{EXAMPLE}escalation: {{on: [repeated_tool_failure, budget_warning]}}\n"
        ))
        .unwrap();
        assert!(ok.spec.escalation.on(EscalationTrigger::BudgetWarning));
        assert!(!ok.spec.escalation.on(EscalationTrigger::CircuitOpen));
        let text = check(&format!("{EXAMPLE}escalation: {{on: [tired]}}\n"))
            .unwrap_err()
            .to_string();
        assert!(text.contains("escalation.on[0]"), "{text}");
        let text = check(&format!("{EXAMPLE}escalation: {{on: [low_confidence]}}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("low_confidence needs `escalation.min_confidence`"),
            "{text}"
        );
    }

    #[test]
    fn guards_are_read_with_secure_defaults_and_bad_values_are_named() {
        use crate::guard::{DataFlow, Policy, ResultTrust};
        let d = check(EXAMPLE).unwrap();
        assert_eq!(d.spec.guards, crate::guard::Guards::default());
        assert_eq!(d.spec.guards.tool_results, Policy::Fence);
        assert_eq!(d.spec.guards.data_flow, DataFlow::Approve);
        assert!(d.spec.guards.spotlight);
        assert_eq!(d.spec.tools[0].contract.results, ResultTrust::Untrusted);

        let ok = check(&format!(
            "{EXAMPLE}guards: {{input: block, documents: escalate, threshold: 0.7, spotlight: false, data_flow: refuse, allow_hosts: [API.Example.com]}}\n"
        ))
        .unwrap();
        let g = &ok.spec.guards;
        assert_eq!(
            (g.input, g.documents, g.tool_results),
            (Policy::Block, Policy::Escalate, Policy::Fence)
        );
        assert_eq!(
            (g.threshold, g.spotlight, g.data_flow),
            (0.7, false, DataFlow::Refuse)
        );
        assert_eq!(g.allow_hosts, vec!["api.example.com".to_string()]);

        let v6 = check(&format!(
            "{EXAMPLE}guards: {{allow_hosts: [\"::1\", \"[FE80:0:0:0:0:0:0:7]\", 10.0.0.7]}}\n"
        ))
        .unwrap();
        assert_eq!(v6.spec.guards.allow_hosts, ["::1", "fe80::7", "10.0.0.7"]);

        let text = check(&format!(
            "{EXAMPLE}guards: {{input: maybe, threshold: 2, allow_hosts: [\"http://x.example/\", \"x.example:443\", \"[::1\"], sentry: yes}}\n"
        ))
        .unwrap_err()
        .to_string();
        for needle in [
            "guards.input: `maybe` is not one of: off, flag, fence, block, escalate",
            "guards.threshold: must be above 0 and at most 1",
            "guards.allow_hosts[0]: `http://x.example/` is not a host name",
            "guards.allow_hosts[1]: `x.example:443` is not a host name",
            "guards.allow_hosts[2]: `[::1` is not a host name",
            "guards.sentry: unknown field `sentry`",
        ] {
            assert!(text.contains(needle), "missing {needle} in {text}");
        }

        use crate::sanitize::{Action, Pii};
        let out = check(&format!(
            "{EXAMPLE}guards: {{output: {{secrets: block, pii: [email, card], pii_action: block, internal_urls: off, prompt_leak_threshold: 0.8}}}}\n"
        ))
        .unwrap()
        .spec
        .guards
        .output;
        assert_eq!(
            (out.secrets, out.pii_action, out.internal_urls),
            (Action::Block, Action::Block, Action::Off)
        );
        assert_eq!(
            out.pii.into_iter().collect::<Vec<_>>(),
            vec![Pii::Email, Pii::Card]
        );
        assert_eq!(out.prompt_leak_threshold, 0.8);
        let text = check(&format!(
            "{EXAMPLE}guards: {{output: {{pii: [ssn], stack_traces: hide}}}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            text.contains(
                "guards.output.pii[0]: `ssn` is not one of: email, phone, card, national_id"
            ),
            "{text}"
        );
        assert!(
            text.contains("guards.output.stack_traces: `hide` is not one of: off, redact, block"),
            "{text}"
        );

        use crate::guard::OnJudgeFail;
        let judge = check(&format!(
            "{EXAMPLE}guards: {{judge: {{rubric: Cites the order status., on_fail: approve}}}}\n"
        ))
        .unwrap()
        .spec
        .guards
        .judge
        .unwrap();
        assert_eq!(
            (judge.threshold, judge.on_fail, judge.max_repairs),
            (0.7, OnJudgeFail::Approve, 1)
        );
        let text = check(&format!("{EXAMPLE}guards: {{judge: {{threshold: 2}}}}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            text.contains(
                "guards.judge.rubric: missing required field `rubric`: say what a good answer is"
            ),
            "{text}"
        );
        assert!(
            text.contains("guards.judge.threshold: must be between 0 and 1"),
            "{text}"
        );

        let guards = check(&format!("{EXAMPLE}guards: {{classifier: {{}}}}\n"))
            .unwrap()
            .spec
            .guards;
        assert_eq!(guards.classifier.map(|c| c.min_score), Some(0.25));
        let text = check(&format!(
            "{EXAMPLE}guards: {{classifier: {{min_score: -1, model: x}}}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            text.contains("guards.classifier.min_score: must be between 0 and 1"),
            "{text}"
        );
        assert!(
            text.contains("guards.classifier.model: unknown field `model`"),
            "{text}"
        );
    }

    #[test]
    fn the_model_breaker_policy_is_read_from_the_spec() {
        let src = EXAMPLE.replace(
            "max_output_tokens: 512",
            "max_output_tokens: 512\n  breaker: {failures: 2, window: 10s, cool_down: 5s}",
        );
        let policy = check(&src).unwrap().spec.model.breaker;
        assert_eq!(
            (policy.failures, policy.window_ms, policy.cool_down_ms),
            (2, 10_000, 5_000)
        );
        let bad = EXAMPLE.replace(
            "max_output_tokens: 512",
            "max_output_tokens: 512\n  breaker: {failures: 0}",
        );
        let text = check(&bad).unwrap_err().to_string();
        assert!(text.contains("model.breaker.failures"), "{text}");
    }

    #[test]
    fn tool_choice_must_name_a_mode_or_one_of_the_agents_tools() {
        let ok = check(&EXAMPLE.replace(
            "max_output_tokens: 512",
            "max_output_tokens: 512\n  tool_choice: get_order_status",
        ))
        .unwrap();
        assert_eq!(
            ok.spec.model.tool_choice,
            Some(ToolChoice::Tool("get_order_status".into()))
        );
        let text = check(&EXAMPLE.replace(
            "max_output_tokens: 512",
            "max_output_tokens: 512\n  tool_choice: get_weather",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            text.contains("model.tool_choice: `get_weather` is not `auto`, `required`, `none`"),
            "{text}"
        );
    }

    #[test]
    fn url_placeholders_must_be_declared_arguments() {
        let src = EXAMPLE.replace("/orders/{order_id}", "/orders/{id}");
        let text = check(&src).unwrap_err().to_string();
        assert!(
            text.contains("placeholder `{id}` is not a property"),
            "{text}"
        );
    }

    #[test]
    fn magnitude_rules_must_point_at_an_argument_and_be_satisfiable() {
        let src = EXAMPLE.replace(
            "max_calls_per_run: 3,",
            "max_calls_per_run: 3, limits: {\"/order_idd\": {max: 9}},",
        );
        let text = check(&src).unwrap_err().to_string();
        assert!(
            text.contains("`/order_idd` does not point into an argument"),
            "{text}"
        );
        let src = EXAMPLE.replace(
            "max_calls_per_run: 3,",
            "max_calls_per_run: 3, limits: {\"/order_id\": {min: 5, max: 1}},",
        );
        let text = check(&src).unwrap_err().to_string();
        assert!(text.contains("`min` (5) is above `max` (1)"), "{text}");
    }

    #[test]
    fn magnitude_rules_need_a_pointer_and_a_bound() {
        let src = EXAMPLE.replace(
            "max_calls_per_run: 3,",
            "max_calls_per_run: 3, limits: {rows: {max: 1}, \"/n\": {}},",
        );
        let text = check(&src).unwrap_err().to_string();
        assert!(text.contains("`rows` is not a JSON pointer"), "{text}");
        assert!(text.contains("give `max`, `min` or both"), "{text}");
    }

    #[test]
    fn bad_header_names_are_caught_at_check_time() {
        let src = EXAMPLE.replace("method: GET}", "method: GET, headers: {\"X Token\": abc}}");
        let text = check(&src).unwrap_err().to_string();
        assert!(
            text.contains("`X Token` is not a valid HTTP header name"),
            "{text}"
        );
    }

    #[test]
    fn yaml_syntax_errors_have_a_line() {
        let text = check("name: [unclosed\nversion: 1\n")
            .unwrap_err()
            .to_string();
        assert!(text.starts_with("agent.yaml:"), "{text}");
        assert!(text.contains("invalid YAML"), "{text}");
    }
}
