//! A spec's models: the primary, fallbacks and routes by step kind, their retries and breaker.

use super::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

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

/// Default model retry policy: 3 attempts, backoff from 1 s, capped at 8 s, full jitter.
pub const DEFAULT_MODEL_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 3,
    backoff: Duration::from_secs(1),
    max_backoff: Duration::from_secs(8),
};

/// Default longest time one model attempt may take.
pub const DEFAULT_MODEL_TIMEOUT: Duration = Duration::from_secs(120);

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
