//! A spec's tools: where each comes from (`ToolSource`) and the contract the runtime enforces on
//! it (`ToolContract`).

use super::*;
use crate::{ToolDefinition, Usd};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

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

/// What a spec's guards mean for its tools.
impl crate::guard::Guards {
    /// Whether runs of an agent with `tools` may fence content, and so need a boundary (and
    /// instructions that explain it): the input's policy fences, or a tool whose results are
    /// not trusted is spotlit or its policy fences.
    pub fn fences(&self, tools: &[ToolSpec]) -> bool {
        self.input == crate::guard::Policy::Fence
            || tools.iter().any(|t| {
                let policy = match t.contract.results {
                    crate::guard::ResultTrust::Trusted => return false,
                    crate::guard::ResultTrust::Untrusted => self.tool_results,
                    crate::guard::ResultTrust::Document => self.documents,
                };
                self.spotlight || policy == crate::guard::Policy::Fence
            })
    }

    /// Whether `source` is an HTTP tool whose host is allow-listed.
    pub fn allows_host_of(&self, source: &ToolSource) -> bool {
        let ToolSource::Http(http) = source else {
            return false;
        };
        let rest = http
            .url
            .split_once("://")
            .map_or(http.url.as_str(), |(_, r)| r);
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => host.split(':').next().unwrap_or_default(),
        };
        crate::guard::canonical_host(host).is_some_and(|host| self.allow_hosts.contains(&host))
    }
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
