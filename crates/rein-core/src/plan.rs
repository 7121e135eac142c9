//! `flow: plan_execute`: a planner writes a bounded plan, executors carry it out one step at a
//! time, and the plan is revised (a bounded number of times) when a step fails or, on request,
//! after every step.
//!
//! This module holds the policy a spec sets, the plan's shape and the JSON Schemas of the
//! planner's and the executor's answers, and what each of them is told. The engine drives it
//! ([`crate::engine`]); every plan and revision is a `plan_made` event, and every step a
//! `plan_step_started` / `plan_step_finished` pair, so the plan is in the log and the trace.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Default longest plan.
pub const DEFAULT_MAX_STEPS: u32 = 5;
/// Default number of plans after the first.
pub const DEFAULT_MAX_REVISIONS: u32 = 2;

/// What a planner is told, before the spec's instructions' task.
pub const PLANNER_INSTRUCTIONS: &str = "First, plan. Break the user's request into the fewest steps that get it done, in order, each one thing an assistant with the tools below can do. Do not carry the steps out yet.";

/// What a replanner is told.
pub const REPLANNER_INSTRUCTIONS: &str = "You are revising a plan that is being carried out. Given the request, the steps done so far with their results, and the steps left, reply with the steps still to do: the same ones to keep the plan, changed ones if the results call for it, or none if the request is already met.";

/// What an executor is told.
pub const EXECUTOR_INSTRUCTIONS: &str = "You carry out one step of a plan, and only that step. Use the tools if the step needs them. Then report: status `done` with the step's result (the facts a later step or the final answer needs), or status `failed` with what went wrong.";

/// What the final step is told.
pub const ANSWER_INSTRUCTIONS: &str = "The plan has been carried out. Using the results of its steps, give the user the final answer to their request.";

/// A spec's plan-and-execute policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlanPolicy {
    /// The longest plan (and revision) accepted.
    pub max_steps: u32,
    /// How many times the plan may be revised after the first.
    pub max_revisions: u32,
    /// When the plan is reviewed.
    pub replan: Replan,
    /// How many times a failed step is run again before `on_step_failure` applies.
    pub retries: u32,
    /// What a step that failed (and used its retries) leads to.
    pub on_step_failure: OnStepFailure,
}

impl Default for PlanPolicy {
    fn default() -> Self {
        PlanPolicy {
            max_steps: DEFAULT_MAX_STEPS,
            max_revisions: DEFAULT_MAX_REVISIONS,
            replan: Replan::OnFailure,
            retries: 0,
            on_step_failure: OnStepFailure::Replan,
        }
    }
}

/// When the plan is reviewed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Replan {
    /// Only when a step fails (and `on_step_failure` is `replan`).
    OnFailure,
    /// After every step, while revisions are left: a model call per step.
    AfterEachStep,
}

/// What a failed step leads to, once its retries are spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStepFailure {
    /// The plan is revised with the failure in view (while revisions are left; then the run
    /// fails).
    Replan,
    /// The step is left undone and the plan goes on.
    Skip,
    /// The run ends `error`.
    Fail,
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanStep {
    /// What the step does.
    pub purpose: String,
    /// The tool it expects to use: the executor is offered only that one. Without it, every
    /// tool of the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
}

/// How a plan step ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Done, with a result.
    Done,
    /// Failed, with what went wrong.
    Failed,
}

impl StepStatus {
    /// The name used in events.
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Done => "done",
            StepStatus::Failed => "failed",
        }
    }
}

/// The JSON Schema of a plan: `{steps: [{purpose, tool?}], why?}`, at most `max_steps` long,
/// each tool one of `tools`.
pub fn plan_schema(max_steps: u32, tools: &[&str]) -> Value {
    let mut step = json!({
        "type": "object",
        "properties": {"purpose": {"type": "string", "minLength": 1}},
        "required": ["purpose"],
        "additionalProperties": false,
    });
    if !tools.is_empty() {
        step["properties"]["tool"] = json!({"type": "string", "enum": tools});
    }
    json!({
        "type": "object",
        "properties": {
            "steps": {"type": "array", "items": step, "maxItems": max_steps},
            "why": {"type": "string"},
        },
        "required": ["steps"],
        "additionalProperties": false,
    })
}

/// The JSON Schema of an executor's report.
pub fn step_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["done", "failed"]},
            "result": {"type": "string"},
        },
        "required": ["status", "result"],
        "additionalProperties": false,
    })
}

/// A plan as the models read it: one numbered line per step.
pub fn describe(steps: &[PlanStep], first: usize) -> String {
    steps
        .iter()
        .enumerate()
        .map(|(i, s)| match &s.tool {
            Some(tool) => format!("{}. {} (tool: {tool})", first + i + 1, s.purpose),
            None => format!("{}. {}", first + i + 1, s.purpose),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::price::PriceTable;
    use crate::spec::{Agent, CheckContext, Flow};
    use std::collections::BTreeMap;

    fn parse(flow: &str) -> Result<Agent, String> {
        let src = format!(
            "name: p\nversion: 1\nmodel: {{primary: openai/gpt-4o-mini}}\ninstructions: Help.\nlimits: {{max_iterations: 5, max_total_tokens: 10000, max_cost_usd: 0.1}}\nflow: {flow}\n"
        );
        let prices = PriceTable::default();
        let builtins = BTreeMap::new();
        let ctx = CheckContext {
            prices: &prices,
            builtin_tools: &builtins,
            providers: crate::spec::TEST_PROVIDERS,
        };
        Agent::parse("p.yaml", &src, &ctx).map_err(|e| e.to_string())
    }

    #[test]
    fn plan_execute_takes_its_defaults_or_a_policy() {
        let agent = parse("plan_execute").unwrap();
        assert_eq!(agent.spec.flow, Flow::PlanExecute(PlanPolicy::default()));
        assert!(agent.step_validators.contains_key("plan"));
        let agent = parse(
            "{plan_execute: {max_steps: 3, max_revisions: 0, retries: 2, replan: after_each_step, on_step_failure: skip}}",
        )
        .unwrap();
        assert_eq!(
            agent.spec.flow.plan(),
            Some(&PlanPolicy {
                max_steps: 3,
                max_revisions: 0,
                replan: Replan::AfterEachStep,
                retries: 2,
                on_step_failure: OnStepFailure::Skip,
            })
        );
    }

    #[test]
    fn a_bad_plan_policy_names_the_field() {
        for (flow, expected) in [
            (
                "{plan_execute: {max_steps: 0}}",
                "flow.plan_execute.max_steps: 0 is out of range; expected 1 to 20",
            ),
            (
                "{plan_execute: {replan: sometimes}}",
                "flow.plan_execute.replan: `sometimes` is not one of: on_failure, after_each_step",
            ),
            (
                "{plan_execute: {steps: 3}}",
                "flow.plan_execute.steps: unknown field `steps`",
            ),
            (
                "loop",
                "flow: `loop` is not a flow; use `react`, `plan_execute` or a `graph`",
            ),
        ] {
            let err = parse(flow).unwrap_err();
            assert!(err.contains(expected), "{flow}: {err}");
        }
    }

    #[test]
    fn a_plan_is_bounded_and_names_only_the_agents_tools() {
        let schema = plan_schema(2, &["lookup"]);
        let v = jsonschema::validator_for(&schema).unwrap();
        let step = |tool: &str| json!({"purpose": "x", "tool": tool});
        assert!(v.is_valid(&json!({"steps": [step("lookup"), {"purpose": "y"}]})));
        assert!(!v.is_valid(&json!({"steps": [step("lookup"), step("lookup"), step("lookup")]})));
        assert!(!v.is_valid(&json!({"steps": [step("rm")]})));
        assert!(!v.is_valid(&json!({"steps": [{"purpose": ""}]})));
    }
}
