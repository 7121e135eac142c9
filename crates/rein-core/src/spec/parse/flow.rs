//! Parsing `flow`: `react`, `plan_execute` and explicit state graphs.

use super::*;
use crate::graph::{Condition, Graph, GraphNode, NodeKind, Route, Test};
use crate::plan::PlanPolicy;
use crate::spec::*;
use crate::yaml::{Node, NodeValue, Pos};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

impl Parser<'_> {
    /// `flow`: `react` (the default), `plan_execute` (not yet), or `{graph: {...}}`.
    pub(super) fn flow(&mut self, node: &Node, tools: &[&str], workers: &[&str]) -> Option<Flow> {
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
    pub(super) fn plan_policy(&mut self, node: &Node) -> Option<PlanPolicy> {
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
    pub(super) fn step_validators(
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

    pub(super) fn graph(&mut self, node: &Node, tools: &[&str], workers: &[&str]) -> Option<Graph> {
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

    pub(super) fn graph_node(&mut self, name: &str, pos: Pos, node: &Node) -> Option<GraphNode> {
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
    pub(super) fn route(&mut self, node: &Node, path: &str, chosen: bool) -> Option<Route> {
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

    pub(super) fn condition(&mut self, node: &Node, path: &str) -> Option<Condition> {
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
}
