//! Parsing `tools`: sources (built-in, HTTP, worker agents) and contracts.

use super::*;
use crate::Usd;
use crate::spec::*;
use crate::yaml::{Node, NodeValue};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

impl Parser<'_> {
    pub(super) fn tools(
        &mut self,
        node: &Node,
    ) -> Option<Vec<(ToolSpec, Arc<jsonschema::Validator>)>> {
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

    pub(super) fn tool(
        &mut self,
        node: &Node,
        path: &str,
    ) -> Option<(ToolSpec, Arc<jsonschema::Validator>)> {
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

    pub(super) fn source(&mut self, node: &Node, path: &str) -> Option<ToolSource> {
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
    pub(super) fn worker(&mut self, node: &Node, path: &str) -> Option<WorkerSource> {
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

    pub(super) fn contract(&mut self, node: &Node, path: &str) -> Option<ToolContract> {
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

    pub(super) fn magnitude_rules(
        &mut self,
        node: &Node,
        path: &str,
    ) -> Option<Vec<MagnitudeRule>> {
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

    pub(super) fn retry(&mut self, node: &Node, path: &str) -> Option<RetryPolicy> {
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
}
