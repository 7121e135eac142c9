//! Parsing `model`: entries, fallbacks, routes, retries and the breaker.

use super::*;
use crate::spec::*;
use crate::yaml::{Node, NodeValue};
use std::collections::BTreeMap;
use std::time::Duration;

impl Parser<'_> {
    pub(super) fn model(&mut self, node: &Node) -> Option<ModelSpec> {
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

    /// `model.routes: {plan: entry, tool_call: entry, ...}`.
    pub(super) fn routes(&mut self, node: &Node) -> Option<BTreeMap<StepKind, ModelRef>> {
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
    pub(super) fn model_retry(&mut self, node: &Node) -> Option<RetryPolicy> {
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
    pub(super) fn model_entry(&mut self, n: &Node, path: &str) -> Option<ModelRef> {
        let entry = if let NodeValue::Map(_) = &n.value {
            self.model_entry_map(n, path)?
        } else {
            let id = self.string(n, path)?;
            match id.split_once('/') {
                Some((provider, model)) if self.ctx.is_provider(provider) && !model.is_empty() => {}
                Some((provider, model)) if !model.is_empty() => {
                    self.error(
                        n.pos,
                        path,
                        format!(
                            "provider `{provider}` is not supported; use one of: {} (a compatible server is `{{name, provider: openai, base_url}}`)",
                            self.ctx.provider_names()
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
    pub(super) fn model_entry_map(&mut self, n: &Node, path: &str) -> Option<ModelRef> {
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
                if self.ctx.is_provider(&provider) {
                    Some(provider)
                } else {
                    self.error(
                        v.pos,
                        &f.child("provider"),
                        format!(
                            "`{provider}` is not a wire format Rein speaks; use one of: {} (vLLM, Ollama and llama.cpp speak `openai`)",
                            self.ctx.provider_names()
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
                } else if self.ctx.is_operator_key(&var) {
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

    pub(super) fn breaker(
        &mut self,
        node: &Node,
        path: &str,
    ) -> Option<crate::breaker::BreakerPolicy> {
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
}
