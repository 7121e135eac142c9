//! Worker agents as tools, in the engine: budgets carved out of the caller's, held while the
//! worker runs and settled at its end, the depth guard, and what a failed worker leads to.

use super::*;
use crate::event::{ParentLink, WorkerBudget};
use crate::tool::{ErrorType, ToolResult};

fn orchestrator(worker: &str, limits: &str) -> String {
    format!(
        r#"
name: tester
version: 1
model: {{primary: openai/gpt-4o-mini, max_output_tokens: 100}}
instructions: Delegate.
tools:
  - name: research
    description: Research a question.
    input_schema: {{type: object, properties: {{q: {{type: string}}}}, required: [q]}}
    source: {{agent: {worker}}}
    contract: {{timeout: 5s, side_effects: none}}
limits: {{max_iterations: 6, max_total_tokens: 100000, max_cost_usd: 1.0, timeout: 60s{limits}}}
guards: {{data_flow: off}}
"#
    )
}

/// Calls `research` once, then answers.
fn delegate_once(n: u32, _: &Engine) -> ModelReply {
    if n == 1 {
        reply(None, vec![call("c1", "research", r#"{"q":"why"}"#)], 10, 10)
    } else {
        reply(Some("done"), vec![], 10, 10)
    }
}

/// Drives `sim` until its first tool call, and starts the worker it calls (under the budget
/// the engine gave); returns the call.
fn start_worker(sim: &mut Sim) -> ToolInvocation {
    loop {
        match sim.engine.next_effect(sim.now) {
            Some(Effect::CallTool(inv)) => {
                let budget = inv.budget.expect("a worker call carries a budget");
                sim.record(inv.requested());
                sim.record(EventKind::WorkerStarted {
                    step: inv.step,
                    call_id: inv.call_id.clone(),
                    tool: inv.tool.clone(),
                    spec: "w.yaml".into(),
                    run_id: crate::RunId::new("child"),
                    budget,
                    fallback: false,
                });
                return inv;
            }
            Some(Effect::CallModel(call)) => sim.call_model(call, &mut delegate_once),
            Some(Effect::Record(kind)) => sim.record(kind),
            Some(Effect::CheckContent(check)) => {
                let verdict = check.verdict(&sim.engine.agent().spec.guards);
                sim.record(verdict);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The `worker_finished` of the worker `start_worker` started for `inv`: it spent `cost` (and
/// 600 tokens) and ended `reason`.
fn worker_finished(inv: &ToolInvocation, cost: Usd, reason: TerminationReason) -> EventKind {
    EventKind::WorkerFinished {
        step: inv.step,
        call_id: inv.call_id.clone(),
        tool: inv.tool.clone(),
        run_id: crate::RunId::new("child"),
        agent: "w".into(),
        status: reason.status(),
        reason: Some(reason),
        detail: None,
        cost,
        usage: Usage {
            input_tokens: 500,
            cached_input_tokens: 0,
            cache_write_tokens: 0,
            output_tokens: 100,
        },
        accepted: reason == TerminationReason::Completed,
    }
}

/// Drives `sim` until its first tool call, then plays the worker: started under the budget
/// the engine gave, finished having spent `cost` (ending `reason`), then the call's result.
fn play_worker(
    sim: &mut Sim,
    cost: Usd,
    reason: TerminationReason,
    result: ToolResult,
) -> WorkerBudget {
    let inv = start_worker(sim);
    let budget = inv.budget.expect("a worker call carries a budget");
    sim.record(worker_finished(&inv, cost, reason));
    sim.record(EventKind::ToolResult {
        step: inv.step,
        call_id: inv.call_id,
        tool: inv.tool,
        result,
        latency_ms: 1,
        attempts: 1,
    });
    budget
}

#[test]
fn a_workers_budget_is_carved_out_of_what_the_caller_has_left() {
    // By default half of what is left; an explicit cap is kept when it fits.
    let mut sim = Sim::new(&orchestrator("{spec: w.yaml}", ""));
    let budget = play_worker(
        &mut sim,
        Usd::from_micros(200_000),
        TerminationReason::Completed,
        ToolResult::success(json!("found")),
    );
    assert!(
        budget.max_cost_usd <= Usd::from_micros(500_000),
        "{budget:?}"
    );
    assert!(
        budget.max_cost_usd >= Usd::from_micros(499_000),
        "{budget:?}"
    );
    assert_eq!((budget.depth, budget.max_depth), (1, 3));
    // The worker's spend is the caller's: its cost and tokens count against the caller's caps.
    let before = sim.engine.cost();
    assert!(before >= Usd::from_micros(200_000), "{before}");
    assert!(sim.engine.usage().total() >= 600);
    assert_eq!(sim.run(delegate_once).1, TerminationReason::Completed);

    let mut sim = Sim::new(&orchestrator(
        "{spec: w.yaml, max_cost_usd: 5.0, max_total_tokens: 1000}",
        "",
    ));
    let budget = play_worker(
        &mut sim,
        Usd::ZERO,
        TerminationReason::Completed,
        ToolResult::success(json!("found")),
    );
    assert!(
        budget.max_cost_usd < Usd::from_micros(1_000_000),
        "never more than is left: {budget:?}"
    );
    assert_eq!(budget.max_total_tokens, 1000);
}

#[test]
fn a_worker_still_running_holds_its_budget_against_the_callers_limits() {
    // The worker starts but its end is never recorded (the process died): its whole budget
    // stays held, so the caller cannot spend it again.
    let mut sim = Sim::new(&orchestrator("{spec: w.yaml, max_cost_usd: 0.9999}", ""));
    let inv = start_worker(&mut sim);
    // Resumed: the interrupted call continues that worker under the budget it was given, not
    // a second carve of what the held budget leaves (1.0, less the model call, less 0.9999).
    let replayed = Engine::replay(sim.engine.agent().clone(), &sim.events).unwrap();
    match replayed.next_effect(sim.now) {
        Some(Effect::CallTool(again)) => {
            assert_eq!(again.step, inv.step);
            assert_eq!(again.budget, inv.budget);
            assert_eq!(
                again.budget.unwrap().max_cost_usd,
                Usd::from_micros(999_900)
            );
        }
        other => panic!("{other:?}"),
    }
    // Had it not started, only what the held budget leaves could be given.
    let mut held = replayed.clone();
    held.tree.worker_children.clear();
    let Some(Effect::CallTool(fresh)) = held.next_effect(sim.now) else {
        panic!("expected the call")
    };
    let left = Usd::from_micros(1_000_000)
        .saturating_sub(sim.engine.cost())
        .saturating_sub(Usd::from_micros(999_900));
    assert!(left < Usd::from_micros(100), "{left}");
    assert_eq!(fresh.budget.unwrap().max_cost_usd, left);
}

#[test]
fn the_depth_guard_stops_a_cascade_at_max_depth() {
    let mut sim = Sim::new(&orchestrator("{spec: w.yaml}", ", max_depth: 2"));
    // This run is itself a worker two deep in a tree bounded at 2.
    let mut engine = Engine::new(sim.engine.agent().clone());
    let mut started = sim.events[0].clone();
    if let EventKind::RunStarted { parent, .. } = &mut started.kind {
        *parent = Some(ParentLink {
            run_id: crate::RunId::new("up"),
            step: 1,
            depth: 2,
            max_depth: 2,
        });
    }
    engine.apply(&started).unwrap();
    sim.engine = engine;
    sim.events = vec![started];
    sim.check_guards();
    let outcome = sim.run(delegate_once);
    assert_eq!(
        outcome,
        (RunStatus::LimitExceeded, TerminationReason::MaxDepth)
    );
    let EventKind::RunFinished { detail, .. } = &sim.events.last().unwrap().kind else {
        unreachable!()
    };
    assert!(
        detail
            .as_deref()
            .unwrap()
            .contains("would make the tree of agents 3 deep, past max_depth 2"),
        "{detail:?}"
    );
    assert!(sim.tool_runs.is_empty(), "the worker was never started");

    // A worker that stopped at max_depth stops its caller too.
    let mut sim = Sim::new(&orchestrator("{spec: w.yaml, fallback: {answer: x}}", ""));
    play_worker(
        &mut sim,
        Usd::ZERO,
        TerminationReason::MaxDepth,
        ToolResult::error(ErrorType::Permanent, "the worker ended max_depth"),
    );
    assert_eq!(sim.run(delegate_once).1, TerminationReason::MaxDepth);
}

#[test]
fn a_failed_worker_with_an_escalate_fallback_hands_the_run_to_a_person() {
    let mut sim = Sim::new(&orchestrator("{spec: w.yaml, fallback: escalate}", ""));
    play_worker(
        &mut sim,
        Usd::ZERO,
        TerminationReason::Timeout,
        ToolResult::error(ErrorType::Permanent, "the worker `w.yaml` ended timeout"),
    );
    let outcome = sim.run(delegate_once);
    assert_eq!(
        outcome,
        (RunStatus::Escalated, TerminationReason::Escalated)
    );
    let out = sim.engine.output().unwrap().to_string();
    assert!(
        out.contains("worker_failed") && out.contains("ended timeout"),
        "{out}"
    );
}

#[test]
fn a_subagent_node_runs_its_worker_under_a_carved_budget() {
    let src = orchestrator("{spec: w.yaml, max_cost_usd: 0.25}", "")
        + r#"flow:
  graph:
    state: {type: object, properties: {q: {type: string}, found: {type: string}}}
    start: ask
    nodes:
      ask: {kind: subagent, agent: research, args: {q: why}, writes: [found]}
      done: {kind: end, output: found}
    edges: [[ask, done]]
"#;
    let mut sim = Sim::new(&src);
    let budget = play_worker(
        &mut sim,
        Usd::from_micros(100_000),
        TerminationReason::Completed,
        ToolResult::success(json!("because")),
    );
    assert_eq!(budget.max_cost_usd, Usd::from_micros(250_000));
    assert_eq!(sim.run(delegate_once).1, TerminationReason::Completed);
    assert_eq!(sim.engine.output(), Some(&json!("because")));
    let kinds: Vec<String> = sim
        .events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::NodeEntered { node_kind, .. } => Some(node_kind.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, ["subagent", "end"]);
    assert_eq!(
        sim.engine.cost(),
        Usd::from_micros(100_000),
        "the worker's spend is the run's"
    );
}

#[test]
fn a_worker_call_interrupted_by_a_crash_continues_its_worker_under_the_same_budget() {
    // Side effects external: another tool's interrupted call would wait for a person. A
    // worker's run keeps its own log, so its call is continued instead.
    let src =
        orchestrator("{spec: w.yaml}", "").replace("side_effects: none", "side_effects: external");
    let mut sim = Sim::new(&src);
    let inv = start_worker(&mut sim);
    let given = inv.budget.expect("a budget");
    let resumed = Engine::replay(sim.engine.agent().clone(), &sim.events).unwrap();
    let child = resumed.worker_child(inv.step, &inv.call_id, false).cloned();
    assert_eq!(
        child.map(|c| (c.run_id, c.budget, c.finished)),
        Some((crate::RunId::new("child"), given, false))
    );
    assert_eq!(resumed.worker_child(inv.step, &inv.call_id, true), None);
    let Some(Effect::CallTool(again)) = resumed.next_effect(sim.now) else {
        panic!("expected the call to be continued")
    };
    assert_eq!(again, inv, "the same step, call and budget");

    // Once its end is recorded, the child shows as finished (a crash before the call's result
    // then reports that run rather than starting another).
    sim.record(worker_finished(
        &inv,
        Usd::from_micros(1_000),
        TerminationReason::Completed,
    ));
    let resumed = Engine::replay(sim.engine.agent().clone(), &sim.events).unwrap();
    assert!(
        resumed
            .worker_child(inv.step, &inv.call_id, false)
            .unwrap()
            .finished
    );
    let Some(Effect::CallTool(again)) = resumed.next_effect(sim.now) else {
        panic!("expected the call to be continued")
    };
    assert_eq!(again.budget, Some(given));
}
