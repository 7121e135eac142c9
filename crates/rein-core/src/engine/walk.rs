//! How the engine walks a `flow: graph`: entering nodes, deciding their outcomes, and the
//! effects a node needs (its model steps and tool calls go through the engine's ordinary
//! paths, so limits, contracts, guards and approvals apply to them unchanged).
//!
//! A node's life is two recorded events: `node_entered` (its checkpoint: a resumed run
//! re-enters the node it was in) and `node_finished` (the state fields it set and the next
//! node). Everything in between is the node's own model calls, tool calls and approvals.

use super::{Effect, Engine, node_call_id, tool_tokens};
use crate::event::EventKind;
use crate::graph::{Graph, GraphNode, NodeKind, resolve_args};
use crate::guard;
use crate::message::{Message, Role, ToolCall};
use crate::run::TerminationReason;
use crate::tool::ToolResult;
use serde_json::{Map, Value};
use std::sync::Arc;

impl Engine {
    /// The node of `graph` the run is in, once entered, with how many times it was entered.
    /// (`graph` is the agent's; a fold that changes the engine passes its own clone of the
    /// agent's `Arc`, so the node outlives its borrow of `self`.)
    fn entered_node<'g>(&self, graph: &'g Graph) -> Option<(&'g GraphNode, u32)> {
        let g = self.graph.as_ref().filter(|g| g.entered)?;
        let visit = g.visits.get(&g.node).copied().unwrap_or(0);
        Some((graph.node(&g.node)?, visit))
    }

    /// The graph node the run is in, once entered, with its visit.
    fn current_node(&self) -> Option<(&GraphNode, u32)> {
        self.entered_node(self.agent.spec.flow.graph()?)
    }

    /// Whether the run is in a node whose model call answers for the node (an `llm` node, a
    /// model-chosen router).
    pub(super) fn in_model_node(&self) -> bool {
        self.current_node().is_some_and(|(n, _)| {
            matches!(
                n.kind,
                NodeKind::Llm { .. }
                    | NodeKind::Router {
                        choose: Some(_),
                        ..
                    }
            )
        })
    }

    /// What the next model call's answer is, for messages about it: a graph node's, a plan's,
    /// or the run's final answer.
    pub(super) fn answer_name(&self) -> String {
        if let Some(name) = self.plan_answer_name() {
            return name.to_string();
        }
        match self.current_node() {
            Some((node, _)) if self.in_model_node() => {
                format!("the answer of node `{}`", node.name)
            }
            _ => "the final answer".to_string(),
        }
    }

    /// The JSON Schema and validator of the next model call's answer, when it answers for a
    /// plan or a graph node rather than the user.
    fn step_answer(&self) -> Option<&(Value, Arc<jsonschema::Validator>)> {
        if let Some(answer) = self.plan_answer() {
            return Some(answer);
        }
        let (node, _) = self.current_node().filter(|_| self.in_model_node())?;
        self.agent.step_validators.get(&node.name)
    }

    /// The validator of the answer the next model call must give: the node's, in a graph's
    /// model step; else the spec's `output_schema`.
    pub(super) fn answer_validator(&self) -> Option<Arc<jsonschema::Validator>> {
        match self.step_answer() {
            Some((_, v)) => Some(v.clone()),
            None => self.agent.output_validator.clone(),
        }
    }

    /// The JSON Schema the next model call's answer must satisfy, for the provider's
    /// structured-output support: the node's, in a graph's model step; else the spec's.
    pub fn output_schema(&self) -> Option<&Value> {
        match self.step_answer() {
            Some((s, _)) => Some(s),
            None => self.agent.spec.output_schema.as_ref(),
        }
    }

    /// Whether the model is offered tools: the node's, in a graph; else the agent's.
    pub(super) fn offers_tools(&self) -> bool {
        if self.graph.is_some() || self.plan.is_some() {
            !self.context.tool_definitions.is_empty()
        } else {
            !self.agent.spec.tools.is_empty()
        }
    }

    /// Whether the run, where it is, may call `tool`: in a graph, only a tool node's own tool
    /// or one of the `llm` node's tools.
    pub(super) fn may_call(&self, tool: &str) -> bool {
        if self.plan.is_some() {
            return self.context.tool_definitions.iter().any(|d| d.name == tool);
        }
        if self.graph.is_none() {
            return true;
        }
        match self.current_node().map(|(n, _)| &n.kind) {
            Some(NodeKind::Tool { tool: own, .. }) => own == tool,
            Some(NodeKind::Llm { .. }) => {
                self.context.tool_definitions.iter().any(|d| d.name == tool)
            }
            _ => false,
        }
    }

    /// Folds `node_entered`: the run is in `node`, for the `visit`th time.
    pub(super) fn enter_node(&mut self, node: &str, visit: u32) {
        let agent = self.agent.clone();
        let (Some(graph), Some(g)) = (agent.spec.flow.graph(), self.graph.as_mut()) else {
            return;
        };
        g.node = node.to_string();
        g.entered = true;
        g.exit = None;
        g.visits.insert(node.to_string(), visit);
        let state = Value::Object(g.state.clone());
        self.repairs = 0;
        self.repair_pending = false;
        self.pending_tools.clear();
        self.context.tool_definitions.clear();
        let Some(spec_node) = graph.node(node) else {
            self.finish_with(
                TerminationReason::Error,
                format!("the log enters node `{node}`, which the graph does not have"),
            );
            return;
        };
        let schema = agent.step_validators.get(node).map(|(s, _)| s);
        match &spec_node.kind {
            NodeKind::Llm {
                instructions,
                tools,
                reads,
                ..
            } => {
                let shown = match reads {
                    Some(fields) => Value::Object(
                        fields
                            .iter()
                            .filter_map(|f| state.get(f).map(|v| (f.clone(), v.clone())))
                            .collect(),
                    ),
                    None => state,
                };
                self.begin_node_conversation(instructions, schema, &shown, tools);
            }
            NodeKind::Router {
                choose: Some(choose),
                ..
            } => self.begin_node_conversation(choose, schema, &state, &[]),
            NodeKind::Router {
                routes,
                choose: None,
            } => {
                let taken = routes
                    .iter()
                    .find(|r| r.when.as_ref().is_none_or(|c| c.holds(&state)));
                match taken {
                    Some(route) => {
                        let why = route
                            .when
                            .as_ref()
                            .map_or("no condition held: the default route".to_string(), |c| {
                                c.describe()
                            });
                        self.set_exit(Map::new(), route.to.clone(), why);
                    }
                    None => self.node_failed(spec_node, "none of its routes' conditions held"),
                }
            }
            NodeKind::Tool { tool, args, .. } => match resolve_args(args, &state) {
                Ok(arguments) => self.pending_tools.push_back(ToolCall {
                    id: node_call_id(node, visit),
                    name: tool.clone(),
                    arguments: arguments.to_string(),
                }),
                Err(why) => self.node_failed(spec_node, &format!("its arguments: {why}")),
            },
            NodeKind::Human { .. } => {}
            NodeKind::End { output } => {
                let answer = match output {
                    Some(field) => state.get(field).cloned().unwrap_or(Value::Null),
                    None => state,
                };
                let problems: Vec<String> = agent
                    .output_validator
                    .as_ref()
                    .map(|v| {
                        v.iter_errors(&answer)
                            .take(5)
                            .map(|e| super::describe_schema_error(&e))
                            .collect()
                    })
                    .unwrap_or_default();
                if problems.is_empty() {
                    self.complete(answer);
                } else {
                    self.finish_with(
                        TerminationReason::OutputInvalid,
                        format!(
                            "the graph's output (at node `{node}`) fails the output schema: {}",
                            problems.join("; ")
                        ),
                    );
                }
            }
        }
    }

    /// A model step's conversation: the agent's instructions, the node's task and the shape
    /// of its answer; then the user's input and the state the node reads.
    fn begin_node_conversation(
        &mut self,
        task: &str,
        schema: Option<&Value>,
        state: &Value,
        tools: &[String],
    ) {
        self.context.tool_definitions = self
            .agent
            .spec
            .tools
            .iter()
            .filter(|t| tools.contains(&t.name))
            .map(|t| t.definition())
            .collect();
        let schema = schema.map_or(String::new(), Value::to_string);
        self.context.fixed_tokens =
            tool_tokens(self.context.counter, &self.context.tool_definitions)
                + self.context.counter.count(&schema);
        self.forget_messages();
        let mut system = format!("{}\n\n{task}", self.agent.spec.instructions);
        if self.review.fence.is_some() {
            system.push_str(guard::FENCE_INSTRUCTIONS);
        }
        system.push_str(&format!(
            "\n\nWhen you are done, reply with JSON only: an object matching this JSON Schema: {schema}"
        ));
        self.push_message(Message::text(Role::System, system));
        let state = self.spotlit("the workflow's state", &state.to_string());
        self.push_message(Message::text(
            Role::User,
            format!(
                "{}\n\nWhat the workflow knows so far (JSON):\n{state}",
                self.review.input_message
            ),
        ));
    }

    /// Whether an approval's call id is the current human node's (never a model's tool call,
    /// whatever id the model chose).
    pub(super) fn is_node_approval(&self, call_id: &str) -> bool {
        self.current_node().is_some_and(|(node, visit)| {
            matches!(node.kind, NodeKind::Human { .. })
                && call_id == node_call_id(&node.name, visit)
        })
    }

    fn set_exit(&mut self, writes: Map<String, Value>, next: String, why: String) {
        if let Some(g) = self.graph.as_mut() {
            g.exit = Some((writes, next, why));
        }
    }

    /// A node failed: a tool node with `on_error` goes there; anything else ends the run.
    fn node_failed(&mut self, node: &GraphNode, why: &str) {
        match &node.kind {
            NodeKind::Tool {
                on_error: Some(to), ..
            } => self.set_exit(Map::new(), to.clone(), format!("failed: {why}")),
            _ => self.finish_with(
                TerminationReason::Error,
                format!("node `{}` failed: {why}", node.name),
            ),
        }
    }

    /// A model step's validated answer: an `llm` node's fields, or a router's choice. Anywhere
    /// else (a judge asked for a revision of the graph's output) it is the run's answer.
    pub(super) fn node_answered(&mut self, answer: Value) {
        let agent = self.agent.clone();
        let Some((graph, (node, _))) = agent
            .spec
            .flow
            .graph()
            .and_then(|graph| Some((graph, self.entered_node(graph)?)))
        else {
            self.complete(answer);
            return;
        };
        let name = &node.name;
        match &node.kind {
            NodeKind::Llm { writes, .. } => {
                let set: Map<String, Value> = writes
                    .iter()
                    .filter_map(|w| answer.get(w).map(|v| (w.clone(), v.clone())))
                    .collect();
                let next = graph.next(name).unwrap_or_default().to_string();
                self.set_exit(set, next, "the model answered".to_string());
            }
            NodeKind::Router { .. } => {
                let to = answer
                    .get("to")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                self.set_exit(Map::new(), to, "the model chose it".to_string());
            }
            _ => self.complete(answer),
        }
    }

    /// Folds a tool node's result: its data set into the state, or the node failed.
    pub(super) fn tool_node_result(&mut self, call_id: &str, result: &ToolResult) {
        let agent = self.agent.clone();
        let Some(graph) = agent.spec.flow.graph() else {
            return;
        };
        let Some((node, visit)) = self.entered_node(graph) else {
            return;
        };
        let NodeKind::Tool { tool, writes, .. } = &node.kind else {
            return;
        };
        if call_id != node_call_id(&node.name, visit) {
            return;
        }
        if !result.is_success() {
            let message = result.message.clone().unwrap_or_default();
            self.node_failed(node, &format!("`{tool}` failed: {message}"));
            return;
        }
        let set: Map<String, Value> = match &writes[..] {
            [one] => [(one.clone(), result.data.clone())].into_iter().collect(),
            many => many
                .iter()
                .map(|w| {
                    (
                        w.clone(),
                        result.data.get(w).cloned().unwrap_or(Value::Null),
                    )
                })
                .collect(),
        };
        let value = Value::Object(set.clone());
        if let Some((_, validator)) = agent.step_validators.get(&node.name) {
            let problems: Vec<String> = validator
                .iter_errors(&value)
                .take(5)
                .map(|e| super::describe_schema_error(&e))
                .collect();
            if !problems.is_empty() {
                let why = format!(
                    "`{tool}`'s result does not fit the state: {}",
                    problems.join("; ")
                );
                self.node_failed(node, &why);
                return;
            }
        }
        let next = graph.next(&node.name).unwrap_or_default().to_string();
        self.set_exit(set, next, format!("`{tool}` answered"));
    }

    /// Folds a person's decision at a human node.
    pub(super) fn human_decided(&mut self, approved: bool, by: &str, reason: Option<&str>) {
        let agent = self.agent.clone();
        let Some(graph) = agent.spec.flow.graph() else {
            return;
        };
        let Some((node, _)) = self.entered_node(graph) else {
            return;
        };
        let NodeKind::Human {
            prompt,
            writes,
            on_deny,
        } = &node.kind
        else {
            return;
        };
        let decision = serde_json::json!({"approved": approved, "by": by, "reason": reason});
        let set: Map<String, Value> = writes
            .first()
            .map(|w| (w.clone(), decision))
            .into_iter()
            .collect();
        let because = reason.map_or(String::new(), |r| format!(": {r}"));
        match (approved, on_deny) {
            (true, _) => {
                let next = graph.next(&node.name).unwrap_or_default().to_string();
                self.set_exit(set, next, format!("approved by {by}{because}"));
            }
            (false, Some(to)) => self.set_exit(set, to.clone(), format!("denied by {by}{because}")),
            (false, None) => self.finish_with(
                TerminationReason::ApprovalDenied,
                format!("{by} denied `{}` ({prompt}){because}", node.name),
            ),
        }
    }

    /// What the graph needs next, where that is not an ordinary model or tool step: record a
    /// node's outcome, enter the next node (or stop at its `max_visits`), ask a person.
    pub(super) fn graph_effect(&self, now_ms: i64) -> Option<Effect> {
        let graph = self.agent.spec.flow.graph()?;
        let g = self.graph.as_ref()?;
        if let Some((writes, next, why)) = &g.exit {
            return Some(Effect::Record(EventKind::NodeFinished {
                node: g.node.clone(),
                writes: writes.clone(),
                next: next.clone(),
                why: why.clone(),
            }));
        }
        let Some(node) = graph.node(&g.node) else {
            let detail = format!("the graph has no node `{}`", g.node);
            return Some(self.finish_effect(TerminationReason::Error, Some(detail), None));
        };
        let visits = g.visits.get(&node.name).copied().unwrap_or(0);
        if !g.entered {
            if let Some(max) = node.max_visits
                && visits >= max
            {
                let detail = format!(
                    "node `{}` was reached again after {visits} visit(s), its max_visits: the graph was going round a cycle",
                    node.name
                );
                return Some(self.finish_effect(
                    TerminationReason::LoopDetected,
                    Some(detail),
                    None,
                ));
            }
            return Some(Effect::Record(EventKind::NodeEntered {
                node: node.name.clone(),
                node_kind: node.kind.name().to_string(),
                visit: visits + 1,
            }));
        }
        match &node.kind {
            NodeKind::Human { prompt, .. } => Some(self.approval_request(
                self.step + 1,
                (&node_call_id(&node.name, visits), &node.name),
                Value::Object(g.state.clone()),
                prompt.clone(),
                None,
                now_ms,
            )),
            _ => None,
        }
    }
}
