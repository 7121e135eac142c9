//! `flow: graph`: an explicit state graph, every state and transition named in the spec.
//!
//! A free ReAct loop decides its own next step; a graph does not. Each node does one thing (a
//! model answers into declared state fields, a tool is called with arguments taken from the
//! state, a router picks an edge, a person approves, the run ends) and the edges say where the
//! run goes next. Routers decide on the state with plain comparisons, or let a model choose
//! among named edges only. Cycles are allowed only when some node on them has a `max_visits`,
//! so no graph can loop for ever.
//!
//! This module holds the graph's types, its structural checks (run by `rein check`), the
//! deterministic pieces the engine needs (conditions, arguments, the state schema of a node's
//! answer) and its Mermaid drawing. The engine walks it ([`crate::engine`]).

use crate::diagnostic::Diagnostic;
use crate::yaml::Pos;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

/// A validated state graph.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Graph {
    /// JSON Schema of the graph's state: an object whose `properties` are the fields nodes
    /// may read and write.
    pub state: Value,
    /// The first node.
    pub start: String,
    /// The nodes, in document order.
    pub nodes: Vec<GraphNode>,
    /// Edges `(from, to)` of the nodes that have one way out.
    pub edges: Vec<(String, String)>,
}

/// One node of a graph.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GraphNode {
    /// Its name, unique in the graph.
    pub name: String,
    /// What it does.
    pub kind: NodeKind,
    /// How many times the run may enter it; entering it once more ends the run
    /// `loop_detected`. Every cycle needs one node with a bound.
    pub max_visits: Option<u32>,
    /// Where it is declared.
    #[serde(skip)]
    pub pos: Pos,
}

/// What a node does.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NodeKind {
    /// A model step (a small ReAct loop when it has tools) whose answer is a JSON object of
    /// the fields it `writes`, validated against the state schema.
    Llm {
        /// What this step asks of the model (after the agent's own instructions).
        instructions: String,
        /// The agent's tools this step may call (none when empty).
        tools: Vec<String>,
        /// State fields the model is shown (all of them when `None`).
        reads: Option<Vec<String>>,
        /// State fields its answer sets.
        writes: Vec<String>,
    },
    /// One call of an agent tool with arguments taken from the state.
    Tool {
        /// The tool.
        tool: String,
        /// Arguments: literal JSON, where `{pointer: /field...}` is replaced by that state value.
        args: Value,
        /// State fields the result's data sets: the whole data for one field, else the data's
        /// field of each name.
        writes: Vec<String>,
        /// Where the run goes when the call fails; without it the run ends `error`.
        on_error: Option<String>,
        /// Written `kind: subagent`: the tool is a worker agent, run as a child run of its
        /// own (under a budget carved out of this run's).
        subagent: bool,
    },
    /// A branch. Deterministic routes are taken in order, the first whose condition holds;
    /// with `choose`, a model picks one of the routes' targets instead.
    Router {
        /// The routes.
        routes: Vec<Route>,
        /// Instructions of the model that chooses, for a model-chosen branch.
        choose: Option<String>,
    },
    /// A person's approval. Approved, the run follows the node's edge; denied, it goes to
    /// `on_deny`, or ends `approval_denied`.
    Human {
        /// What the person is asked.
        prompt: String,
        /// At most one field, set to the decision `{approved, by, reason}`.
        writes: Vec<String>,
        /// Where a denial leads.
        on_deny: Option<String>,
    },
    /// The end: the run completes with the state (or one field of it) as its output.
    End {
        /// The state field that is the output; the whole state when `None`.
        output: Option<String>,
    },
}

impl NodeKind {
    /// The kind's name, as written in specs and events.
    pub fn name(&self) -> &'static str {
        match self {
            NodeKind::Llm { .. } => "llm",
            NodeKind::Tool { subagent: true, .. } => "subagent",
            NodeKind::Tool { .. } => "tool",
            NodeKind::Router { .. } => "router",
            NodeKind::Human { .. } => "human",
            NodeKind::End { .. } => "end",
        }
    }
}

/// One way out of a router.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Route {
    /// When it is taken; a route without one always is (the default, last).
    pub when: Option<Condition>,
    /// Where it leads.
    pub to: String,
}

/// A comparison of one state value, addressed by a JSON pointer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Condition {
    /// JSON pointer into the state, e.g. `/category` or `/order/total`.
    pub pointer: String,
    /// The comparison.
    pub test: Test,
}

/// How a state value is compared.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Test {
    /// Equal to the value.
    Equals(Value),
    /// Not equal to it (a missing value is not equal).
    NotEquals(Value),
    /// Equal to one of them.
    In(Vec<Value>),
    /// Present and not null (`true`), or missing or null (`false`).
    Exists(bool),
    /// A number greater than this.
    Gt(f64),
    /// At least this.
    Gte(f64),
    /// Less than this.
    Lt(f64),
    /// At most this.
    Lte(f64),
}

/// The names of the tests, as written in specs.
pub const TESTS: &[&str] = &[
    "equals",
    "not_equals",
    "in",
    "exists",
    "gt",
    "gte",
    "lt",
    "lte",
];

impl Condition {
    /// Whether the condition holds on `state`.
    pub fn holds(&self, state: &Value) -> bool {
        let value = state.pointer(&self.pointer).filter(|v| !v.is_null());
        let number = value.and_then(Value::as_f64);
        match &self.test {
            Test::Equals(want) => value == Some(want),
            Test::NotEquals(want) => value != Some(want),
            Test::In(set) => value.is_some_and(|v| set.contains(v)),
            Test::Exists(want) => value.is_some() == *want,
            Test::Gt(n) => number.is_some_and(|v| v > *n),
            Test::Gte(n) => number.is_some_and(|v| v >= *n),
            Test::Lt(n) => number.is_some_and(|v| v < *n),
            Test::Lte(n) => number.is_some_and(|v| v <= *n),
        }
    }

    /// The condition as a person reads it: `/category equals "refund"`.
    pub fn describe(&self) -> String {
        let (op, operand) = match &self.test {
            Test::Equals(v) => ("equals", v.to_string()),
            Test::NotEquals(v) => ("not_equals", v.to_string()),
            Test::In(vs) => ("in", Value::Array(vs.clone()).to_string()),
            Test::Exists(b) => ("exists", b.to_string()),
            Test::Gt(n) => ("gt", n.to_string()),
            Test::Gte(n) => ("gte", n.to_string()),
            Test::Lt(n) => ("lt", n.to_string()),
            Test::Lte(n) => ("lte", n.to_string()),
        };
        format!("{} {op} {operand}", self.pointer)
    }
}

/// The state field a JSON pointer starts in (`/order/total` → `order`), unescaped.
pub fn pointer_field(pointer: &str) -> Option<String> {
    let rest = pointer.strip_prefix('/')?;
    let first = rest.split('/').next()?;
    (!first.is_empty()).then(|| first.replace("~1", "/").replace("~0", "~"))
}

/// The `{pointer: ...}` placeholder in a tool node's arguments, if `v` is one.
fn placeholder(v: &Value) -> Option<&str> {
    match v {
        Value::Object(m) if m.len() == 1 => m.get("pointer").and_then(Value::as_str),
        _ => None,
    }
}

/// Every `{pointer: ...}` placeholder in `args`.
pub fn arg_pointers(args: &Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        if let Some(p) = placeholder(v) {
            out.push(p.to_string());
            return;
        }
        match v {
            Value::Object(m) => m.values().for_each(|v| walk(v, out)),
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(args, &mut out);
    out
}

/// A tool node's arguments with each placeholder replaced by its state value; the first
/// pointer the state does not hold is the error.
pub fn resolve_args(args: &Value, state: &Value) -> Result<Value, String> {
    if let Some(p) = placeholder(args) {
        return state
            .pointer(p)
            .filter(|v| !v.is_null())
            .cloned()
            .ok_or_else(|| format!("the state has no value at {p}"));
    }
    Ok(match args {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| Ok((k.clone(), resolve_args(v, state)?)))
                .collect::<Result<Map<String, Value>, String>>()?,
        ),
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|v| resolve_args(v, state))
                .collect::<Result<_, _>>()?,
        ),
        other => other.clone(),
    })
}

impl Graph {
    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&GraphNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The one edge out of `name` (nodes other than routers and ends).
    pub fn next(&self, name: &str) -> Option<&str> {
        self.edges
            .iter()
            .find(|(from, _)| from == name)
            .map(|(_, to)| to.as_str())
    }

    /// The state's declared fields.
    pub fn fields(&self) -> BTreeSet<String> {
        self.state
            .get("properties")
            .and_then(Value::as_object)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The JSON Schema of an answer that sets `writes`: an object with exactly those fields,
    /// each typed as the state declares it.
    pub fn answer_schema(&self, writes: &[String]) -> Value {
        let declared = self.state.get("properties").and_then(Value::as_object);
        let properties: Map<String, Value> = writes
            .iter()
            .map(|w| {
                let schema = declared.and_then(|p| p.get(w)).cloned();
                (w.clone(), schema.unwrap_or_else(|| serde_json::json!({})))
            })
            .collect();
        serde_json::json!({
            "type": "object",
            "properties": properties,
            "required": writes,
            "additionalProperties": false,
        })
    }

    /// The schema a model-chosen router's answer must satisfy: `{"to": <one of its targets>}`.
    pub fn choice_schema(routes: &[Route]) -> Value {
        let targets: Vec<&str> = routes.iter().map(|r| r.to.as_str()).collect();
        serde_json::json!({
            "type": "object",
            "properties": {"to": {"type": "string", "enum": targets}},
            "required": ["to"],
            "additionalProperties": false,
        })
    }

    /// Every way out of `node`, with what labels it (a condition, `on_error`, ...).
    pub fn exits(&self, node: &GraphNode) -> Vec<(String, Option<String>)> {
        let mut out: Vec<(String, Option<String>)> = match &node.kind {
            NodeKind::Router { routes, choose } => routes
                .iter()
                .map(|r| {
                    let label = match (&r.when, choose) {
                        (Some(c), _) => Some(c.describe()),
                        (None, Some(_)) => Some("chosen".to_string()),
                        (None, None) => Some("otherwise".to_string()),
                    };
                    (r.to.clone(), label)
                })
                .collect(),
            _ => self
                .edges
                .iter()
                .filter(|(from, _)| from == &node.name)
                .map(|(_, to)| (to.clone(), None))
                .collect(),
        };
        match &node.kind {
            NodeKind::Tool {
                on_error: Some(to), ..
            } => out.push((to.clone(), Some("on_error".to_string()))),
            NodeKind::Human {
                on_deny: Some(to), ..
            } => out.push((to.clone(), Some("denied".to_string()))),
            _ => {}
        }
        out
    }

    /// The structural problems of the graph, each at the node or edge it concerns: unknown
    /// targets, nodes with no way out or more than one, unreachable nodes, nodes from which
    /// no `end` can be reached, cycles with no `max_visits`, undeclared state fields.
    /// `tools` are the agent's tools, `workers` those that are worker agents; `edge_pos` the
    /// position of each edge; `at` the graph's.
    pub fn problems(
        &self,
        tools: &[&str],
        workers: &[&str],
        edge_pos: &[Pos],
        at: Pos,
    ) -> Vec<Diagnostic> {
        let out = self.local_problems(tools, workers, edge_pos, at);
        if out.is_empty() {
            self.shape_problems(at)
        } else {
            out
        }
    }

    /// Problems of single nodes and edges: names, fields, tools, ways out.
    fn local_problems(
        &self,
        tools: &[&str],
        workers: &[&str],
        edge_pos: &[Pos],
        at: Pos,
    ) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        let mut problem =
            |pos: Pos, path: String, message: String| out.push(Diagnostic { pos, path, message });
        let names: BTreeSet<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        let fields = self.fields();
        let node_path = |n: &str| format!("flow.graph.nodes.{n}");
        if !names.contains(self.start.as_str()) {
            problem(
                at,
                "flow.graph.start".into(),
                format!("`{}` is not a node of this graph", self.start),
            );
        }
        for (i, (from, to)) in self.edges.iter().enumerate() {
            let pos = edge_pos.get(i).copied().unwrap_or(at);
            for end in [from, to] {
                if !names.contains(end.as_str()) {
                    problem(
                        pos,
                        format!("flow.graph.edges[{i}]"),
                        format!("edge {from} -> {to}: `{end}` is not a node of this graph"),
                    );
                }
            }
            match self.node(from).map(|n| &n.kind) {
                Some(NodeKind::Router { .. }) => problem(
                    pos,
                    format!("flow.graph.edges[{i}]"),
                    format!(
                        "edge {from} -> {to}: `{from}` is a router; its ways out are its `routes`"
                    ),
                ),
                Some(NodeKind::End { .. }) => problem(
                    pos,
                    format!("flow.graph.edges[{i}]"),
                    format!("edge {from} -> {to}: `{from}` is an end node; nothing follows it"),
                ),
                _ => {}
            }
        }
        for node in &self.nodes {
            let path = node_path(&node.name);
            let undeclared = |field: &str| !fields.contains(field);
            let out_edges = self.edges.iter().filter(|(f, _)| f == &node.name).count();
            match &node.kind {
                NodeKind::Router { routes, choose } => {
                    for (i, r) in routes.iter().enumerate() {
                        if !names.contains(r.to.as_str()) {
                            problem(
                                node.pos,
                                format!("{path}.routes[{i}].to"),
                                format!(
                                    "route {} -> {}: `{}` is not a node of this graph",
                                    node.name, r.to, r.to
                                ),
                            );
                        }
                        if let Some(c) = &r.when
                            && let Some(f) = pointer_field(&c.pointer).filter(|f| undeclared(f))
                        {
                            problem(
                                node.pos,
                                format!("{path}.routes[{i}].when.pointer"),
                                format!("`{f}` is not a field of the graph's state"),
                            );
                        }
                    }
                    if choose.is_none() && routes.last().is_some_and(|r| r.when.is_some()) {
                        problem(
                            node.pos,
                            format!("{path}.routes"),
                            format!(
                                "router `{}` has no route for when no condition holds: end its routes with one that has no `when`",
                                node.name
                            ),
                        );
                    }
                }
                NodeKind::End { output } => {
                    if let Some(f) = output.as_deref().filter(|f| undeclared(f)) {
                        problem(
                            node.pos,
                            format!("{path}.output"),
                            format!("`{f}` is not a field of the graph's state"),
                        );
                    }
                }
                kind => {
                    if out_edges == 0 {
                        problem(
                            node.pos,
                            path.clone(),
                            format!(
                                "node `{}` has no edge out: add `[{}, NEXT]` to `edges`",
                                node.name, node.name
                            ),
                        );
                    } else if out_edges > 1 {
                        problem(
                            node.pos,
                            path.clone(),
                            format!(
                                "node `{}` has {out_edges} edges out; only a router may branch",
                                node.name
                            ),
                        );
                    }
                    let (writes, reads) = match kind {
                        NodeKind::Llm { writes, reads, .. } => {
                            (writes.clone(), reads.clone().unwrap_or_default())
                        }
                        NodeKind::Tool { args, writes, .. } => {
                            let reads = arg_pointers(args)
                                .iter()
                                .filter_map(|p| pointer_field(p))
                                .collect();
                            (writes.clone(), reads)
                        }
                        NodeKind::Human { writes, .. } => (writes.clone(), Vec::new()),
                        _ => (Vec::new(), Vec::new()),
                    };
                    for (verb, list) in [("writes", writes), ("reads", reads)] {
                        for f in list.iter().filter(|f| undeclared(f)) {
                            problem(
                                node.pos,
                                format!("{path}.{verb}"),
                                format!(
                                    "`{f}` is not a field of the graph's state: declare it under `flow.graph.state.properties`"
                                ),
                            );
                        }
                    }
                }
            }
            let tool_names: Vec<&String> = match &node.kind {
                NodeKind::Llm { tools: t, .. } => t.iter().collect(),
                NodeKind::Tool { tool, .. } => vec![tool],
                _ => Vec::new(),
            };
            if let NodeKind::Tool {
                tool,
                subagent: true,
                ..
            } = &node.kind
                && tools.contains(&tool.as_str())
                && !workers.contains(&tool.as_str())
            {
                problem(
                    node.pos,
                    format!("{path}.agent"),
                    format!(
                        "`{tool}` is not a worker agent (`source: {{agent: ...}}`); call it from a `tool` node"
                    ),
                );
            }
            for t in tool_names {
                if !tools.contains(&t.as_str()) {
                    problem(
                        node.pos,
                        format!("{path}.tools"),
                        format!("`{t}` is not one of this agent's tools"),
                    );
                }
            }
            for (to, label) in self.exits(node) {
                if label
                    .as_deref()
                    .is_some_and(|l| l == "on_error" || l == "denied")
                    && !names.contains(to.as_str())
                {
                    problem(
                        node.pos,
                        path.clone(),
                        format!("{} -> {to}: `{to}` is not a node of this graph", node.name),
                    );
                }
            }
        }
        out
    }

    /// The shape's problems: reachability, a way to the end, bounded cycles.
    fn shape_problems(&self, at: Pos) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        let mut problem =
            |pos: Pos, path: String, message: String| out.push(Diagnostic { pos, path, message });
        let node_path = |n: &str| format!("flow.graph.nodes.{n}");
        let adjacency: HashMap<&str, Vec<String>> = self
            .nodes
            .iter()
            .map(|n| {
                let exits = self.exits(n).into_iter().map(|(to, _)| to).collect();
                (n.name.as_str(), exits)
            })
            .collect();
        let reached = reach(&adjacency, [self.start.as_str()]);
        for node in self
            .nodes
            .iter()
            .filter(|n| !reached.contains(n.name.as_str()))
        {
            problem(
                node.pos,
                node_path(&node.name),
                format!("node `{}` is unreachable from `{}`", node.name, self.start),
            );
        }
        let mut reverse: HashMap<&str, Vec<String>> = HashMap::new();
        for (from, exits) in &adjacency {
            for to in exits {
                reverse
                    .entry(to.as_str())
                    .or_default()
                    .push((*from).to_string());
            }
        }
        let ends = self
            .nodes
            .iter()
            .filter(|n| matches!(n.kind, NodeKind::End { .. }))
            .map(|n| n.name.as_str());
        let finishing = reach(&reverse, ends);
        for node in self
            .nodes
            .iter()
            .filter(|n| reached.contains(n.name.as_str()) && !finishing.contains(n.name.as_str()))
        {
            problem(
                node.pos,
                node_path(&node.name),
                format!("no path from node `{}` reaches an `end` node", node.name),
            );
        }
        if let Some(cycle) = unbounded_cycle(self) {
            let first = cycle.first().cloned().unwrap_or_default();
            let pos = self.node(&first).map_or(at, |n| n.pos);
            problem(
                pos,
                node_path(&first),
                format!(
                    "the cycle {} -> {first} has no bound: give one of its nodes `max_visits`",
                    cycle.join(" -> ")
                ),
            );
        }
        out
    }

    /// The graph as a Mermaid flowchart.
    pub fn mermaid(&self) -> String {
        let mut out = String::from("flowchart TD\n");
        let id = |name: &str| -> String {
            name.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect::<String>()
        };
        for node in &self.nodes {
            let mut label = format!("{}<br/>{}", node.name, node.kind.name());
            if let Some(n) = node.max_visits {
                let _ = write!(label, " ≤{n}");
            }
            let label = mermaid_label(&label);
            let shape = match node.kind {
                NodeKind::Router { .. } => format!("{{\"{label}\"}}"),
                NodeKind::Human { .. } => format!("[/\"{label}\"/]"),
                NodeKind::End { .. } => format!("([\"{label}\"])"),
                NodeKind::Tool { .. } => format!("[[\"{label}\"]]"),
                NodeKind::Llm { .. } => format!("[\"{label}\"]"),
            };
            let _ = writeln!(out, "    {}{shape}", id(&node.name));
        }
        let _ = writeln!(out, "    start((start)) --> {}", id(&self.start));
        for node in &self.nodes {
            for (to, label) in self.exits(node) {
                let arrow = match label {
                    Some(l) => format!("-->|\"{}\"|", mermaid_label(&l)),
                    None => "-->".to_string(),
                };
                let _ = writeln!(out, "    {} {arrow} {}", id(&node.name), id(&to));
            }
        }
        out
    }
}

/// Every node reachable from `from` over `adjacency`.
fn reach<'a>(
    adjacency: &'a HashMap<&str, Vec<String>>,
    from: impl IntoIterator<Item = &'a str>,
) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = from.into_iter().map(str::to_string).collect();
    while let Some(n) = todo.pop() {
        if seen.insert(n.clone())
            && let Some(next) = adjacency.get(n.as_str())
        {
            todo.extend(next.iter().cloned());
        }
    }
    seen
}

/// A cycle none of whose nodes has `max_visits`, as the list of its nodes, if there is one.
fn unbounded_cycle(graph: &Graph) -> Option<Vec<String>> {
    let unbounded: BTreeMap<&str, Vec<String>> = graph
        .nodes
        .iter()
        .filter(|n| n.max_visits.is_none())
        .map(|n| {
            let exits = graph
                .exits(n)
                .into_iter()
                .map(|(to, _)| to)
                .filter(|to| graph.node(to).is_some_and(|t| t.max_visits.is_none()))
                .collect();
            (n.name.as_str(), exits)
        })
        .collect();
    // Depth-first search; a node on the current path seen again closes a cycle.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        OnPath,
        Done,
    }
    let mut marks: HashMap<&str, Mark> = HashMap::new();
    for root in unbounded.keys() {
        if marks.contains_key(root) {
            continue;
        }
        let mut path: Vec<&str> = vec![root];
        let mut cursors: Vec<usize> = vec![0];
        marks.insert(root, Mark::OnPath);
        while let (Some(&node), Some(cursor)) = (path.last(), cursors.last_mut()) {
            let exits = unbounded.get(node).map_or(&[][..], Vec::as_slice);
            if let Some(next) = exits.get(*cursor) {
                *cursor += 1;
                match marks.get(next.as_str()) {
                    Some(Mark::OnPath) => {
                        let start = path.iter().position(|n| n == next).unwrap_or(0);
                        return Some(path[start..].iter().map(|s| s.to_string()).collect());
                    }
                    Some(Mark::Done) => {}
                    None => {
                        let (key, _) = unbounded.get_key_value(next.as_str())?;
                        marks.insert(key, Mark::OnPath);
                        path.push(key);
                        cursors.push(0);
                    }
                }
            } else {
                marks.insert(node, Mark::Done);
                path.pop();
                cursors.pop();
            }
        }
    }
    None
}

/// `text` safe inside a Mermaid label's quotes.
pub(crate) fn mermaid_label(text: &str) -> String {
    text.replace('"', "#quot;")
}

#[cfg(test)]
mod tests {
    use crate::price::PriceTable;
    use crate::spec::{Agent, BuiltinToolInfo, CheckContext, SpecErrors};
    use serde_json::json;
    use std::collections::BTreeMap;

    const HEAD: &str = r#"name: g
version: 1
model: {primary: openai/gpt-4o-mini}
instructions: Help.
limits: {max_iterations: 5, max_total_tokens: 10000, max_cost_usd: 0.1}
tools:
  - name: lookup
    source: {builtin: lookup}
flow:
  graph:
    state:
      type: object
      properties: {category: {type: string}, draft: {type: string}}
    start: triage
    nodes:
"#;

    /// The issue's example graph, node by node, so a test can change one line of it.
    const NODES: &str = r#"      triage: {kind: llm, instructions: "Classify the request as refund or question.", writes: [category]}
      route:  {kind: router, routes: [{when: {pointer: /category, equals: refund}, to: refund}, {to: answer}]}
      refund: {kind: human, prompt: "Approve this refund?"}
      answer: {kind: llm, instructions: "Answer the question.", writes: [draft]}
      done:   {kind: end}
    edges: [[triage, route], [refund, answer], [answer, done]]
"#;

    fn parse(src: &str) -> Result<Agent, SpecErrors> {
        let prices = PriceTable::default();
        let mut builtins = BTreeMap::new();
        builtins.insert(
            "lookup".to_string(),
            BuiltinToolInfo {
                description: "Look a key up.".into(),
                input_schema: json!({"type": "object"}),
            },
        );
        let ctx = CheckContext {
            prices: &prices,
            builtin_tools: &builtins,
            providers: crate::spec::TEST_PROVIDERS,
        };
        Agent::parse("g.yaml", src, &ctx)
    }

    /// The problems `rein check` reports for the example with `from` replaced by `to`.
    fn problems(from: &str, to: &str) -> Vec<String> {
        assert!(NODES.contains(from), "{from}");
        let src = format!("{HEAD}{}", NODES.replace(from, to));
        match parse(&src) {
            Ok(_) => Vec::new(),
            Err(e) => e.to_string().lines().map(str::to_string).collect(),
        }
    }

    #[test]
    fn the_issue_example_is_accepted() {
        let agent = parse(&format!("{HEAD}{NODES}")).unwrap();
        let graph = agent.spec.flow.graph().unwrap();
        assert_eq!(graph.nodes.len(), 5);
        assert_eq!(graph.next("triage"), Some("route"));
        assert!(agent.step_validators.contains_key("triage"));
    }

    #[test]
    fn invalid_graphs_are_rejected_naming_the_node_or_edge() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "      done:   {kind: end}\n",
                "      done:   {kind: end}\n      orphan: {kind: end}\n",
                "g.yaml:21:7: flow.graph.nodes.orphan: node `orphan` is unreachable from `triage`",
            ),
            (
                ", [answer, done]]",
                "]",
                "g.yaml:19:7: flow.graph.nodes.answer: node `answer` has no edge out: add `[answer, NEXT]` to `edges`",
            ),
            (
                "[answer, done]]",
                "[answer, nowhere]]",
                "g.yaml:21:48: flow.graph.edges[2]: edge answer -> nowhere: `nowhere` is not a node of this graph",
            ),
            (
                "[refund, answer], [answer, done]]",
                "[refund, answer], [answer, done], [answer, triage]]",
                "g.yaml:19:7: flow.graph.nodes.answer: node `answer` has 2 edges out; only a router may branch",
            ),
            ("{to: answer}]}", "{to: answer}]}\n    # loop back", ""),
            (
                "[answer, done]]",
                "[answer, triage]]",
                "no path from node `triage` reaches an `end` node",
            ),
            (
                "writes: [draft]",
                "writes: [summary]",
                "g.yaml:19:7: flow.graph.nodes.answer.writes: `summary` is not a field of the graph's state: declare it under `flow.graph.state.properties`",
            ),
            (
                "/category, equals",
                "/categry, equals",
                "flow.graph.nodes.route.routes[0].when.pointer: `categry` is not a field of the graph's state",
            ),
            (
                ", {to: answer}]}",
                "]}",
                "flow.graph.nodes.route.routes: router `route` has no route for when no condition holds",
            ),
            (
                "[triage, route],",
                "[triage, route], [route, done],",
                "flow.graph.edges[1]: edge route -> done: `route` is a router; its ways out are its `routes`",
            ),
            (
                "writes: [category]}",
                "writes: [category], tools: [fetch]}",
                "flow.graph.nodes.triage.tools: `fetch` is not one of this agent's tools",
            ),
            (
                "{kind: human,",
                "{kind: subagent,",
                "flow.graph.nodes.refund.agent: missing required field `agent`",
            ),
            (
                "{kind: human, prompt: \"Approve this refund?\"}",
                "{kind: subagent, agent: lookup}",
                "flow.graph.nodes.refund.agent: `lookup` is not a worker agent",
            ),
            (
                "{kind: human,",
                "{kind: person,",
                "flow.graph.nodes.refund.kind: `person` is not a node kind",
            ),
            (
                "equals: refund}",
                "equals: refund, in: [a]}",
                "a condition has exactly one test",
            ),
        ];
        for (from, to, expected) in cases {
            let found = problems(from, to);
            if expected.is_empty() {
                assert!(found.is_empty(), "{to}: {found:?}");
                continue;
            }
            assert!(
                found.iter().any(|p| p.contains(expected)),
                "replacing {from:?} with {to:?}: expected {expected:?}, found {found:?}"
            );
        }
    }

    #[test]
    fn a_cycle_needs_a_bound_on_one_of_its_nodes() {
        let cyclic = "[refund, answer], [answer, triage]]\n";
        let unbounded = NODES
            .replace("[refund, answer], [answer, done]]\n", cyclic)
            .replace("{to: answer}]}", "{to: answer}, ]}")
            .replace(
                "{when: {pointer: /category, equals: refund}, to: refund}",
                "{when: {pointer: /category, equals: refund}, to: refund}, {when: {pointer: /category, equals: done}, to: done}",
            );
        let found = match parse(&format!("{HEAD}{unbounded}")) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        assert!(
            found.contains(
                "g.yaml:19:7: flow.graph.nodes.answer: the cycle answer -> triage -> route -> refund -> answer has no bound: give one of its nodes `max_visits`"
            ),
            "{found}"
        );
        let bounded =
            unbounded.replace("writes: [category]}", "writes: [category], max_visits: 3}");
        parse(&format!("{HEAD}{bounded}")).unwrap();
    }

    #[test]
    fn the_graph_draws_as_mermaid() {
        let agent = parse(&format!("{HEAD}{NODES}")).unwrap();
        let mermaid = agent.spec.flow.graph().unwrap().mermaid();
        for line in [
            "flowchart TD",
            "    route{\"route<br/>router\"}",
            "    refund[/\"refund<br/>human\"/]",
            "    done([\"done<br/>end\"])",
            "    start((start)) --> triage",
            "    route -->|\"/category equals #quot;refund#quot;\"| refund",
            "    route -->|\"otherwise\"| answer",
            "    answer --> done",
        ] {
            assert!(mermaid.lines().any(|l| l == line), "{line}\n{mermaid}");
        }
    }
}
