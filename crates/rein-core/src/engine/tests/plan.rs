//! `flow: plan_execute` driven through the engine: the plan, its steps, retries, skips,
//! revisions and their bounds, and replay from any cut.

use super::*;
use crate::message::Role;
use crate::plan::{
    ANSWER_INSTRUCTIONS, EXECUTOR_INSTRUCTIONS, PLANNER_INSTRUCTIONS, REPLANNER_INSTRUCTIONS,
};
use crate::spec::StepKind;

fn plan_spec(policy: &str) -> String {
    format!(
        r#"
name: tester
version: 1
model: {{primary: openai/gpt-4o-mini, max_output_tokens: 200}}
instructions: You research orders.
tools:
  - name: lookup
    source: {{builtin: lookup}}
    contract: {{side_effects: none}}
  - name: other
    source: {{builtin: lookup}}
    contract: {{side_effects: none}}
limits:
  max_iterations: 20
  max_total_tokens: 100000
  max_cost_usd: 1.0
  timeout: 10s
guards: {{data_flow: off}}
flow: {{plan_execute: {policy}}}
"#
    )
}

/// Which of the plan's model steps a conversation is.
fn role(engine: &Engine) -> &'static str {
    let system = engine.messages()[0].content.clone().unwrap_or_default();
    if system.contains(PLANNER_INSTRUCTIONS) {
        "planner"
    } else if system.contains(REPLANNER_INSTRUCTIONS) {
        "replanner"
    } else if system.contains(EXECUTOR_INSTRUCTIONS) {
        "executor"
    } else if system.contains(ANSWER_INSTRUCTIONS) {
        "answer"
    } else {
        "?"
    }
}

fn text(v: Value) -> ModelReply {
    reply(Some(&v.to_string()), vec![], 10, 10)
}

fn two_step_plan() -> Value {
    json!({"steps": [
        {"purpose": "look up order a", "tool": "lookup"},
        {"purpose": "look up order b", "tool": "lookup"}
    ], "why": "two orders"})
}

/// The step the executor is on, read from its request.
fn current_step(engine: &Engine) -> String {
    let request = engine.messages()[1].content.clone().unwrap_or_default();
    request
        .rsplit("Your step (")
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The plan events, as short strings.
fn plan_events(sim: &Sim) -> Vec<String> {
    sim.events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::PlanMade {
                revision, steps, ..
            } => Some(format!("plan {revision}: {} steps", steps.len())),
            EventKind::PlanStepStarted { index, attempt, .. } => {
                Some(format!("start {index}.{attempt}"))
            }
            EventKind::PlanStepFinished {
                index,
                status,
                attempt,
                ..
            } => Some(format!("{} {index}.{attempt}", status.as_str())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_plan_is_carried_out_step_by_step_then_answered() {
    let mut sim = Sim::new(&plan_spec("{}"));
    let mut seen_tools: Vec<(String, Vec<String>)> = Vec::new();
    let mut kinds = Vec::new();
    let outcome = sim.run(|_, engine| {
        let names = engine
            .tool_definitions()
            .iter()
            .map(|d| d.name.clone())
            .collect();
        seen_tools.push((role(engine).to_string(), names));
        kinds.push(engine.step_kind(engine.iterations()));
        match role(engine) {
            "planner" => text(two_step_plan()),
            "executor" => {
                let last = engine.messages().last().unwrap();
                if last.role == Role::Tool {
                    let result = last.content.clone().unwrap_or_default();
                    text(json!({"status": "done", "result": format!("found {result}")}))
                } else {
                    let key = if current_step(engine).contains("order a") {
                        "a"
                    } else {
                        "b"
                    };
                    reply(
                        None,
                        vec![call("c", "lookup", &json!({"key": key}).to_string())],
                        10,
                        10,
                    )
                }
            }
            "answer" => {
                let request = engine.messages()[1].content.clone().unwrap_or_default();
                assert!(
                    request.contains("1. look up order a [done]: found"),
                    "{request}"
                );
                assert!(
                    request.contains("2. look up order b [done]: found"),
                    "{request}"
                );
                reply(Some("Both orders are fine."), vec![], 10, 10)
            }
            other => panic!("unexpected model step {other}"),
        }
    });
    assert_eq!(
        outcome,
        (RunStatus::Completed, TerminationReason::Completed)
    );
    assert_eq!(sim.engine.output(), Some(&json!("Both orders are fine.")));
    assert_eq!(
        plan_events(&sim),
        [
            "plan 0: 2 steps",
            "start 1.1",
            "done 1.1",
            "start 2.1",
            "done 2.1"
        ]
    );
    // The planner and the answer are offered no tools; each executor only its step's tool.
    assert_eq!(seen_tools[0], ("planner".to_string(), vec![]));
    assert_eq!(
        seen_tools[1],
        ("executor".to_string(), vec!["lookup".to_string()])
    );
    assert_eq!(seen_tools.last().unwrap(), &("answer".to_string(), vec![]));
    assert_eq!(kinds.first(), Some(&StepKind::Plan));
    assert_eq!(kinds.last(), Some(&StepKind::Final));
    assert_eq!(sim.tool_runs.len(), 2);
}

#[test]
fn a_step_that_fails_once_is_retried_then_the_plan_is_revised() {
    let mut sim = Sim::new(&plan_spec(
        "{retries: 1, replan: after_each_step, max_revisions: 1}",
    ));
    let mut attempts = 0;
    let outcome = sim.run(|_, engine| match role(engine) {
        "planner" => text(two_step_plan()),
        "executor" if current_step(engine).starts_with('1') => {
            attempts += 1;
            if attempts == 1 {
                text(json!({"status": "failed", "result": "the order service timed out"}))
            } else {
                text(json!({"status": "done", "result": "order a is lost in transit"}))
            }
        }
        "replanner" => {
            let request = engine.messages()[1].content.clone().unwrap_or_default();
            assert!(request.contains("order a is lost in transit"), "{request}");
            text(json!({"steps": [{"purpose": "open a claim for order a"}], "why": "a is lost: claim it instead of looking up b"}))
        }
        "executor" => {
            assert!(current_step(engine).contains("open a claim"), "{}", current_step(engine));
            assert_eq!(engine.tool_definitions().len(), 2, "a step without a tool gets all");
            text(json!({"status": "done", "result": "claim 7 opened"}))
        }
        "answer" => reply(Some("Order a is lost; claim 7 is open."), vec![], 10, 10),
        other => panic!("unexpected model step {other}"),
    });
    assert_eq!(outcome.1, TerminationReason::Completed);
    assert_eq!(
        plan_events(&sim),
        [
            "plan 0: 2 steps",
            "start 1.1",
            "failed 1.1",
            "start 1.2",
            "done 1.2",
            "plan 1: 1 steps",
            "start 2.1",
            "done 2.1",
        ]
    );
    let why = sim.events.iter().find_map(|e| match &e.kind {
        EventKind::PlanMade {
            revision: 1, why, ..
        } => Some(why.clone()),
        _ => None,
    });
    assert_eq!(
        why.as_deref(),
        Some("a is lost: claim it instead of looking up b")
    );
}

#[test]
fn a_failed_step_is_replanned_around_until_no_revisions_are_left() {
    let mut sim = Sim::new(&plan_spec("{max_revisions: 1}"));
    let outcome = sim.run(|_, engine| match role(engine) {
        "planner" => text(two_step_plan()),
        "replanner" => {
            let request = engine.messages()[1].content.clone().unwrap_or_default();
            assert!(
                request.contains("What went wrong: step 1 (look up order a) failed after 1 attempt(s): no such order"),
                "{request}"
            );
            text(json!({"steps": [{"purpose": "look up order a by email", "tool": "lookup"}]}))
        }
        "executor" => text(json!({"status": "failed", "result": "no such order"})),
        other => panic!("unexpected model step {other}"),
    });
    assert_eq!(outcome, (RunStatus::Failed, TerminationReason::Error));
    assert_eq!(
        plan_events(&sim),
        [
            "plan 0: 2 steps",
            "start 1.1",
            "failed 1.1",
            "plan 1: 1 steps",
            "start 2.1",
            "failed 2.1"
        ]
    );
    let EventKind::RunFinished { detail, .. } = &sim.events.last().unwrap().kind else {
        unreachable!()
    };
    let detail = detail.clone().unwrap_or_default();
    assert!(
        detail.contains("step 2 (look up order a by email) failed after 1 attempt(s): no such order; no plan revisions are left (max_revisions 1)"),
        "{detail}"
    );
}

#[test]
fn skip_leaves_a_failed_step_and_fail_ends_the_run() {
    let executor = |_: u32, engine: &Engine| match role(engine) {
        "planner" => text(two_step_plan()),
        "executor" if current_step(engine).starts_with('1') => {
            text(json!({"status": "failed", "result": "down"}))
        }
        "executor" => text(json!({"status": "done", "result": "b is fine"})),
        "answer" => reply(Some("Only b could be checked."), vec![], 10, 10),
        other => panic!("unexpected model step {other}"),
    };
    let mut sim = Sim::new(&plan_spec("{on_step_failure: skip}"));
    assert_eq!(sim.run(executor).1, TerminationReason::Completed);
    assert_eq!(
        plan_events(&sim),
        [
            "plan 0: 2 steps",
            "start 1.1",
            "failed 1.1",
            "start 2.1",
            "done 2.1"
        ]
    );

    let mut sim = Sim::new(&plan_spec("{on_step_failure: fail, retries: 2}"));
    assert_eq!(sim.run(executor).1, TerminationReason::Error);
    assert_eq!(
        plan_events(&sim),
        [
            "plan 0: 2 steps",
            "start 1.1",
            "failed 1.1",
            "start 1.2",
            "failed 1.2",
            "start 1.3",
            "failed 1.3"
        ]
    );
}

#[test]
fn a_plan_longer_than_max_steps_or_naming_another_tool_is_sent_back() {
    let mut sim = Sim::new(&plan_spec("{max_steps: 2}"));
    let mut plans = 0;
    let outcome = sim.run(|_, engine| match role(engine) {
        "planner" => {
            plans += 1;
            match plans {
                1 => text(json!({"steps": [{"purpose": "a"}, {"purpose": "b"}, {"purpose": "c"}]})),
                2 => text(json!({"steps": [{"purpose": "a", "tool": "delete_everything"}]})),
                _ => text(json!({"steps": []})),
            }
        }
        "answer" => reply(Some("Nothing to do."), vec![], 10, 10),
        other => panic!("unexpected model step {other}"),
    });
    assert_eq!(outcome.1, TerminationReason::Completed);
    assert_eq!(plans, 3);
    assert_eq!(plan_events(&sim), ["plan 0: 0 steps"]);
}

#[test]
fn a_plan_log_cut_anywhere_replays_to_the_same_next_plan_step() {
    let mut sim = Sim::new(&plan_spec("{retries: 1, replan: after_each_step}"));
    let mut attempts = 0;
    sim.run(|_, engine| match role(engine) {
        "planner" => text(two_step_plan()),
        "replanner" => text(json!({"steps": [{"purpose": "look up order b", "tool": "lookup"}]})),
        "executor" => {
            attempts += 1;
            let status = if attempts == 1 { "failed" } else { "done" };
            text(json!({"status": status, "result": "r"}))
        }
        _ => reply(Some("done"), vec![], 10, 10),
    });
    let mut checked = 0;
    for (i, event) in sim.events.iter().enumerate() {
        if !matches!(
            event.kind,
            EventKind::PlanMade { .. }
                | EventKind::PlanStepStarted { .. }
                | EventKind::PlanStepFinished { .. }
                | EventKind::ModelRequested { .. }
        ) {
            continue;
        }
        let replayed = Engine::replay(sim.engine.agent().clone(), &sim.events[..i]).unwrap();
        let next = replayed.next_effect(event.ts_ms);
        let same = match &next {
            Some(Effect::CallModel(call)) => call.requested() == event.kind,
            Some(Effect::Record(kind)) => kind == &event.kind,
            _ => false,
        };
        assert!(
            same,
            "cut before event {i}: {next:?} instead of {:?}",
            event.kind
        );
        checked += 1;
    }
    assert!(checked > 10, "{checked}");
}

#[test]
fn each_plan_step_is_a_span_over_its_executors_calls() {
    let mut sim = Sim::new(&plan_spec("{}"));
    sim.run(|_, engine| match role(engine) {
        "planner" => text(two_step_plan()),
        "executor" => text(json!({"status": "done", "result": "ok"})),
        _ => reply(Some("done"), vec![], 10, 10),
    });
    let spans = crate::spans::spans(&crate::RunId::new("r1"), &sim.events);
    let root = &spans[0];
    let plan = spans.iter().find(|s| s.name == "plan").unwrap();
    assert_eq!(plan.parent, Some(root.span_id));
    let step = spans.iter().find(|s| s.name == "plan_step 1").unwrap();
    assert_eq!(step.parent, Some(root.span_id));
    let models: Vec<_> = spans
        .iter()
        .filter(|s| s.name.starts_with("chat"))
        .collect();
    assert_eq!(models.len(), 4, "planner, two executors, answer");
    assert_eq!(
        models[0].parent,
        Some(root.span_id),
        "the planner is the run's"
    );
    assert_eq!(models[1].parent, Some(step.span_id));
}

#[test]
fn a_plan_that_never_fits_its_schema_ends_output_invalid_naming_the_plan() {
    let mut sim = Sim::new(&plan_spec("{max_steps: 1}"));
    let outcome = sim.run(|_, engine| {
        assert_eq!(role(engine), "planner");
        text(json!({"steps": [{"purpose": "a"}, {"purpose": "b"}]}))
    });
    assert_eq!(outcome.1, TerminationReason::OutputInvalid);
    let EventKind::RunFinished { detail, .. } = &sim.events.last().unwrap().kind else {
        unreachable!()
    };
    let detail = detail.clone().unwrap_or_default();
    assert!(
        detail.starts_with("the plan still failed its schema after 2 repair(s)"),
        "{detail}"
    );
}
