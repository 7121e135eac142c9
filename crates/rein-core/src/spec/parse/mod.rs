//! The spec parser: YAML nodes read field by field into the typed spec, collecting every
//! problem. One file per section: `model`, `tools`, `flow`, `guards`, `escalation`.

mod escalation;
mod flow;
mod guards;
mod model;
mod tools;

use super::*;
use crate::Usd;
use crate::duration::parse_duration;
use crate::price::Price;
use crate::yaml::{Node, NodeValue, Pos};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

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

pub(super) struct Parser<'c> {
    pub(super) diags: Vec<Diagnostic>,
    pub(super) ctx: &'c CheckContext<'c>,
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

    pub(super) fn agent(&mut self, root: &Node) -> Option<Agent> {
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
