//! How the engine runs `flow: plan_execute`: the planner's call, each step's executor (a small
//! ReAct loop offered the step's tool), the retries, skips and revisions the policy allows,
//! and the final answer from the steps' results.
//!
//! The plan lives in the log: `plan_made` for the first plan and each revision,
//! `plan_step_started` (a step's checkpoint) and `plan_step_finished` (the executor's report).
//! Every model and tool call in between goes through the engine's ordinary paths, so limits,
//! contracts, guards and approvals hold as in any run.

use super::{Effect, Engine, tool_tokens};
use crate::event::EventKind;
use crate::message::{Message, Role};
use crate::plan::{
    self, ANSWER_INSTRUCTIONS, EXECUTOR_INSTRUCTIONS, OnStepFailure, PLANNER_INSTRUCTIONS,
    PlanPolicy, PlanStep, REPLANNER_INSTRUCTIONS, Replan, StepStatus,
};
use crate::run::TerminationReason;
use crate::spec::StepKind;
use serde_json::Value;
use std::sync::Arc;

/// A plan-and-execute run's place in its plan, rebuilt from its events.
#[derive(Clone, Debug)]
pub(super) struct PlanRun {
    /// Steps behind the run, in order: each with how it ended and its result.
    finished: Vec<(PlanStep, StepStatus, String)>,
    /// Steps still to do; the first is the current one.
    left: Vec<PlanStep>,
    /// Plans made after the first.
    revisions: u32,
    phase: Phase,
    /// The current step's attempt (0 before its first).
    attempt: u32,
    /// A plan event decided from a model's answer, not yet recorded.
    pending: Option<EventKind>,
    /// What the replanner is asked to work around.
    failure: Option<String>,
}

impl PlanRun {
    pub(super) fn new() -> Self {
        PlanRun {
            finished: Vec::new(),
            left: Vec::new(),
            revisions: 0,
            phase: Phase::Planning,
            attempt: 0,
            pending: None,
            failure: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The planner's call.
    Planning,
    /// The next step is to start.
    Between,
    /// A step's executor is at work.
    Step,
    /// The replanner's call.
    Replanning,
    /// The final answer's call.
    Answering,
}

impl Engine {
    /// Starts a plan run: the planner is offered no tools (it plans; executors act).
    pub(super) fn start_plan(&mut self) {
        self.plan = Some(Box::new(PlanRun::new()));
        self.context.tool_definitions.clear();
        self.context.fixed_tokens = self
            .agent
            .step_validators
            .get("plan")
            .map_or(0, |(s, _)| self.context.counter.count(&s.to_string()));
    }

    fn policy(&self) -> Option<&PlanPolicy> {
        self.agent.spec.flow.plan()
    }

    /// Whether the next model call answers for the plan (a plan, or a step's report) rather
    /// than the user.
    pub(super) fn in_plan_step(&self) -> bool {
        self.plan
            .as_ref()
            .is_some_and(|p| matches!(p.phase, Phase::Planning | Phase::Replanning | Phase::Step))
    }

    /// The schema and validator of the plan step's answer, in a structured plan step.
    pub(super) fn plan_answer(&self) -> Option<&(Value, Arc<jsonschema::Validator>)> {
        let p = self.plan.as_ref()?;
        let key = match p.phase {
            Phase::Planning | Phase::Replanning => "plan",
            Phase::Step => "step",
            Phase::Between | Phase::Answering => return None,
        };
        self.agent.step_validators.get(key)
    }

    /// What the next model call's answer is, in a plan's structured steps: for messages.
    pub(super) fn plan_answer_name(&self) -> Option<&'static str> {
        match self.plan.as_ref()?.phase {
            Phase::Planning | Phase::Replanning => Some("the plan"),
            Phase::Step => Some("the step's report"),
            Phase::Between | Phase::Answering => None,
        }
    }

    /// The step kind of the next model call, in a plan: planning and revising are `plan`
    /// (so `model.routes.plan` can send them to a stronger model), the answer is `final`.
    pub(super) fn plan_step_kind(&self) -> Option<StepKind> {
        Some(match self.plan.as_ref()?.phase {
            Phase::Planning | Phase::Replanning => StepKind::Plan,
            Phase::Answering => StepKind::Final,
            Phase::Step | Phase::Between => return None,
        })
    }

    /// The system prompt a plan run's conversation opens with, when it is the planner's.
    pub(super) fn planner_prompt(&self) -> Option<String> {
        self.plan.as_ref().filter(|p| p.phase == Phase::Planning)?;
        let policy = self.policy()?;
        let tools: Vec<String> = self
            .agent
            .spec
            .tools
            .iter()
            .map(|t| format!("- {}: {}", t.name, t.description))
            .collect();
        let tools = if tools.is_empty() {
            "(none)".to_string()
        } else {
            tools.join("\n")
        };
        let schema = self
            .agent
            .step_validators
            .get("plan")
            .map_or(String::new(), |(s, _)| s.to_string());
        Some(format!(
            "{}\n\n{PLANNER_INSTRUCTIONS} Use at most {} steps.\n\nTools:\n{tools}\n\nReply with JSON only: an object matching this JSON Schema: {schema}",
            self.agent.spec.instructions, policy.max_steps
        ))
    }

    /// A conversation for one of the plan's model steps: `task` and the shape of its answer,
    /// then `request`; `tools` offered.
    fn begin_plan_conversation(
        &mut self,
        task: &str,
        schema: Option<String>,
        request: String,
        tools: Vec<crate::ToolDefinition>,
    ) {
        self.context.tool_definitions = tools;
        let schema_tokens = schema
            .as_deref()
            .map_or(0, |s| self.context.counter.count(s));
        self.context.fixed_tokens =
            tool_tokens(self.context.counter, &self.context.tool_definitions) + schema_tokens;
        self.forget_messages();
        let mut system = format!("{}\n\n{task}", self.agent.spec.instructions);
        if self.review.fence.is_some() {
            system.push_str(crate::guard::FENCE_INSTRUCTIONS);
        }
        if let Some(schema) = schema {
            system.push_str(&format!(
                "\n\nReply with JSON only: an object matching this JSON Schema: {schema}"
            ));
        }
        self.push_message(Message::text(Role::System, system));
        self.push_message(Message::text(Role::User, request));
    }

    /// The request, the plan and what is done so far, as the plan's later steps read them.
    fn plan_context(&self) -> String {
        let Some(p) = &self.plan else {
            return String::new();
        };
        let done: Vec<String> = p
            .finished
            .iter()
            .enumerate()
            .map(|(i, (step, status, result))| {
                format!(
                    "{}. {} [{}]: {result}",
                    i + 1,
                    step.purpose,
                    status.as_str()
                )
            })
            .collect();
        let done = if done.is_empty() {
            "(none yet)".to_string()
        } else {
            self.spotlit("the results of the steps done", &done.join("\n"))
        };
        let left = if p.left.is_empty() {
            "(none)".to_string()
        } else {
            plan::describe(&p.left, p.finished.len())
        };
        format!(
            "The request:\n{}\n\nSteps done:\n{done}\n\nSteps left:\n{left}",
            self.review.input_message
        )
    }

    /// Where the plan goes once the current step is behind it: a revision, the next step, or
    /// the answer.
    fn after_step(&mut self) {
        let Some(policy) = self.policy().cloned() else {
            return;
        };
        let Some(p) = self.plan.as_mut() else {
            return;
        };
        p.attempt = 0;
        if p.left.is_empty() {
            self.begin_answer();
        } else if policy.replan == Replan::AfterEachStep && p.revisions < policy.max_revisions {
            self.begin_replan();
        } else {
            p.phase = Phase::Between;
        }
    }

    fn begin_replan(&mut self) {
        let failure = self
            .plan
            .as_ref()
            .and_then(|p| p.failure.clone())
            .map_or(String::new(), |f| format!("\n\nWhat went wrong: {f}"));
        let schema = self
            .agent
            .step_validators
            .get("plan")
            .map(|(s, _)| s.to_string());
        let request = format!("{}{failure}", self.plan_context());
        self.begin_plan_conversation(REPLANNER_INSTRUCTIONS, schema, request, Vec::new());
        if let Some(p) = self.plan.as_mut() {
            p.phase = Phase::Replanning;
        }
    }

    fn begin_answer(&mut self) {
        let request = self.plan_context();
        self.begin_plan_conversation(ANSWER_INSTRUCTIONS, None, request, Vec::new());
        if let Some(p) = self.plan.as_mut() {
            p.phase = Phase::Answering;
        }
    }

    /// A plan step's model answer, valid against its schema: a plan, or a step's report.
    pub(super) fn plan_answered(&mut self, answer: Value) {
        let Some(p) = self.plan.as_ref() else {
            return;
        };
        let index = u32::try_from(p.finished.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        let why = answer
            .get("why")
            .and_then(Value::as_str)
            .map(str::to_string);
        let pending = match p.phase {
            Phase::Planning | Phase::Replanning => {
                let steps: Vec<PlanStep> = answer
                    .get("steps")
                    .cloned()
                    .and_then(|s| serde_json::from_value(s).ok())
                    .unwrap_or_default();
                if p.phase == Phase::Replanning && p.failure.is_none() && steps == p.left {
                    // Reviewed and kept: nothing to record; the next step starts.
                    if let Some(p) = self.plan.as_mut() {
                        p.phase = Phase::Between;
                    }
                    return;
                }
                let (revision, default_why) = if p.phase == Phase::Planning {
                    (0, "the first plan".to_string())
                } else {
                    let after = match &p.failure {
                        Some(f) => format!("revised after a failed step: {f}"),
                        None => format!("revised after step {}", p.finished.len()),
                    };
                    (p.revisions + 1, after)
                };
                EventKind::PlanMade {
                    revision,
                    steps,
                    why: why.unwrap_or(default_why),
                }
            }
            Phase::Step => {
                let status = match answer.get("status").and_then(Value::as_str) {
                    Some("done") => StepStatus::Done,
                    _ => StepStatus::Failed,
                };
                EventKind::PlanStepFinished {
                    index,
                    status,
                    result: answer
                        .get("result")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    attempt: p.attempt,
                }
            }
            Phase::Between | Phase::Answering => return,
        };
        if let Some(p) = self.plan.as_mut() {
            p.pending = Some(pending);
        }
    }

    /// Folds `plan_made`.
    pub(super) fn plan_made(&mut self, revision: u32, steps: &[PlanStep]) {
        let Some(p) = self.plan.as_mut() else {
            return;
        };
        p.pending = None;
        p.left = steps.to_vec();
        p.revisions = p.revisions.max(revision);
        p.failure = None;
        p.attempt = 0;
        if p.left.is_empty() {
            self.begin_answer();
        } else {
            p.phase = Phase::Between;
        }
    }

    /// Folds `plan_step_started`: the executor's conversation for the step.
    pub(super) fn plan_step_started(&mut self, index: u32, attempt: u32) {
        let Some(p) = self.plan.as_mut() else {
            return;
        };
        p.phase = Phase::Step;
        p.attempt = attempt;
        let Some(step) = p.left.first().cloned() else {
            return;
        };
        let tools = self
            .agent
            .spec
            .tools
            .iter()
            .filter(|t| step.tool.as_ref().is_none_or(|only| &t.name == only))
            .map(|t| t.definition())
            .collect();
        let schema = self
            .agent
            .step_validators
            .get("step")
            .map(|(s, _)| s.to_string());
        let retry = if attempt > 1 {
            format!(" This is attempt {attempt}: the step failed before.")
        } else {
            String::new()
        };
        let request = format!(
            "{}\n\nYour step ({index}): {}{retry}",
            self.plan_context(),
            step.purpose
        );
        self.repairs = 0;
        self.begin_plan_conversation(EXECUTOR_INSTRUCTIONS, schema, request, tools);
    }

    /// Folds `plan_step_finished`: the step is behind the run, retried, skipped, replanned
    /// around, or the run fails, per the policy.
    pub(super) fn plan_step_finished(&mut self, index: u32, status: StepStatus, result: &str) {
        let Some(policy) = self.policy().cloned() else {
            return;
        };
        let Some(p) = self.plan.as_mut() else {
            return;
        };
        p.pending = None;
        if status == StepStatus::Done {
            if !p.left.is_empty() {
                let step = p.left.remove(0);
                p.finished.push((step, status, result.to_string()));
            }
            self.after_step();
            return;
        }
        if p.attempt <= policy.retries {
            // The same step again, as attempt + 1.
            p.phase = Phase::Between;
            return;
        }
        let attempts = p.attempt;
        let purpose = p.left.first().map_or(String::new(), |s| s.purpose.clone());
        let why = format!("step {index} ({purpose}) failed after {attempts} attempt(s): {result}");
        match policy.on_step_failure {
            OnStepFailure::Fail => {
                self.finish_with(TerminationReason::Error, why);
            }
            OnStepFailure::Replan if p.revisions >= policy.max_revisions => {
                self.finish_with(
                    TerminationReason::Error,
                    format!(
                        "{why}; no plan revisions are left (max_revisions {})",
                        policy.max_revisions
                    ),
                );
            }
            on_failure => {
                if !p.left.is_empty() {
                    let step = p.left.remove(0);
                    p.finished.push((step, status, result.to_string()));
                }
                if on_failure == OnStepFailure::Replan {
                    p.failure = Some(why);
                    self.begin_replan();
                } else {
                    self.after_step();
                }
            }
        }
    }

    /// What the plan needs next that is not an ordinary model or tool step: record a plan or
    /// a step's report, or start the next step.
    pub(super) fn plan_effect(&self) -> Option<Effect> {
        let p = self.plan.as_ref()?;
        if let Some(pending) = &p.pending {
            return Some(Effect::Record(pending.clone()));
        }
        if p.phase != Phase::Between {
            return None;
        }
        let step = p.left.first()?;
        Some(Effect::Record(EventKind::PlanStepStarted {
            index: u32::try_from(p.finished.len())
                .unwrap_or(u32::MAX)
                .saturating_add(1),
            purpose: step.purpose.clone(),
            attempt: p.attempt + 1,
        }))
    }
}
