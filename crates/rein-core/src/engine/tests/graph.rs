//! `flow: graph` driven through the engine: every edge of a router, human approval and
//! denial, tool nodes, bounded cycles, the model's constrained choice, replay mid-graph.

use super::*;

/// The issue's example, with a tool node between the router and the approval.
const GRAPH: &str = r#"
name: tester
version: 1
model: {primary: openai/gpt-4o-mini, max_output_tokens: 100}
instructions: You work the support queue.
tools:
  - name: lookup
    source: {builtin: lookup}
limits:
  max_iterations: 10
  max_total_tokens: 100000
  max_cost_usd: 1.0
  timeout: 10s
guards: {data_flow: off}
flow:
  graph:
    state:
      type: object
      properties:
        category: {type: string, enum: [refund, question]}
        order: {type: object}
        decision: {type: object}
        draft: {type: string}
    start: triage
    nodes:
      triage: {kind: llm, instructions: "Classify the request as refund or question.", writes: [category]}
      route:
        kind: router
        routes:
          - {when: {pointer: /category, equals: refund}, to: lookup}
          - {to: answer}
      lookup: {kind: tool, tool: lookup, args: {key: {pointer: /category}}, writes: [order]}
      refund: {kind: human, prompt: "Approve this refund?", writes: [decision], on_deny: answer}
      answer: {kind: llm, instructions: "Answer the customer.", reads: [category, decision], writes: [draft]}
      done: {kind: end, output: draft}
    edges: [[triage, route], [lookup, refund], [refund, answer], [answer, done]]
"#;

/// Answers each node by what its instructions ask.
fn by_node(category: &'static str) -> impl FnMut(u32, &Engine) -> ModelReply {
    move |_, engine| {
        let system = engine.messages()[0].content.clone().unwrap_or_default();
        let answer = if system.contains("Classify") {
            json!({"category": category}).to_string()
        } else {
            let user = engine.messages()[1].content.clone().unwrap_or_default();
            json!({"draft": format!("reply after seeing: {user}")}).to_string()
        };
        reply(Some(&answer), vec![], 10, 10)
    }
}

/// The nodes entered, in order.
fn path(sim: &Sim) -> Vec<String> {
    sim.events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::NodeEntered { node, .. } => Some(node.clone()),
            _ => None,
        })
        .collect()
}

/// Why each node was left, by node.
fn whys(sim: &Sim) -> Vec<(String, String, String)> {
    sim.events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::NodeFinished {
                node, next, why, ..
            } => Some((node.clone(), next.clone(), why.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_refund_goes_through_lookup_and_approval_to_the_reply() {
    let mut sim = Sim::new(GRAPH);
    let pending = sim.advance(by_node("refund")).unwrap_err();
    assert_eq!(path(&sim), ["triage", "route", "lookup", "refund"]);
    assert_eq!(pending.tool, "refund");
    assert_eq!(pending.reason, "Approve this refund?");
    // The person sees the state so far: the category and the looked-up order.
    assert_eq!(
        pending.arguments,
        json!({"category": "refund", "order": {"key": "refund"}})
    );
    assert_eq!(sim.tool_runs.len(), 1);
    assert_eq!(sim.tool_runs[0].arguments, json!({"key": "refund"}));

    sim.record(pending.decided(true, "ann", Some("within policy".into())));
    let outcome = sim.advance(by_node("refund")).unwrap();
    assert_eq!(
        outcome,
        (RunStatus::Completed, TerminationReason::Completed)
    );
    assert_eq!(
        path(&sim),
        ["triage", "route", "lookup", "refund", "answer", "done"]
    );
    let whys = whys(&sim);
    assert_eq!(
        whys[1],
        (
            "route".into(),
            "lookup".into(),
            r#"/category equals "refund""#.into()
        )
    );
    assert_eq!(whys[3].2, "approved by ann: within policy");
    // The answer node read only its declared fields: the decision, not the order.
    let output = sim.engine.output().unwrap().as_str().unwrap().to_string();
    assert!(output.contains(r#""approved":true"#), "{output}");
    assert!(!output.contains(r#""order""#), "{output}");
    // Two model calls (triage, answer): the router and the tool cost none.
    assert_eq!(sim.model_requests(), 2);
}

#[test]
fn a_question_takes_the_routers_default_edge() {
    let mut sim = Sim::new(GRAPH);
    let outcome = sim.run(by_node("question"));
    assert_eq!(outcome.1, TerminationReason::Completed);
    assert_eq!(path(&sim), ["triage", "route", "answer", "done"]);
    assert_eq!(
        whys(&sim)[1],
        (
            "route".into(),
            "answer".into(),
            "no condition held: the default route".into()
        )
    );
    assert!(sim.tool_runs.is_empty());
}

#[test]
fn a_denial_follows_on_deny_or_ends_the_run() {
    let mut sim = Sim::new(GRAPH);
    let pending = sim.advance(by_node("refund")).unwrap_err();
    sim.record(pending.decided(false, "bob", Some("over the limit".into())));
    assert_eq!(sim.run(by_node("refund")).1, TerminationReason::Completed);
    assert_eq!(whys(&sim)[3].2, "denied by bob: over the limit");
    let output = sim.engine.output().unwrap().as_str().unwrap().to_string();
    assert!(output.contains(r#""approved":false"#), "{output}");

    let mut sim = Sim::new(&GRAPH.replace(", on_deny: answer", ""));
    let pending = sim.advance(by_node("refund")).unwrap_err();
    sim.record(pending.decided(false, "bob", None));
    assert_eq!(
        sim.run(by_node("refund")),
        (RunStatus::Failed, TerminationReason::ApprovalDenied)
    );
    assert_eq!(path(&sim).last().map(String::as_str), Some("refund"));
}

#[test]
fn an_answer_that_does_not_fit_the_state_is_repaired() {
    let mut sim = Sim::new(GRAPH);
    let outcome = sim.run(|n, engine| {
        let system = engine.messages()[0].content.clone().unwrap_or_default();
        let answer = match n {
            1 => json!({"category": "complaint"}), // not in the state's enum
            _ if system.contains("Classify") => json!({"category": "question"}),
            _ => json!({"draft": "hello"}),
        };
        reply(Some(&answer.to_string()), vec![], 10, 10)
    });
    assert_eq!(outcome.1, TerminationReason::Completed);
    assert_eq!(path(&sim), ["triage", "route", "answer", "done"]);
    assert_eq!(sim.model_requests(), 3, "one repair of the triage answer");
    assert_eq!(sim.engine.output(), Some(&json!("hello")));
}

#[test]
fn a_node_offers_and_allows_only_its_own_tools() {
    let mut sim = Sim::new(GRAPH);
    let outcome = sim.run(|n, engine| {
        if n == 1 {
            assert!(engine.tool_definitions().is_empty(), "triage has no tools");
            return reply(None, vec![call("c1", "lookup", r#"{"key":"a"}"#)], 10, 10);
        }
        let system = engine.messages()[0].content.clone().unwrap_or_default();
        let answer = if system.contains("Classify") {
            json!({"category": "question"})
        } else {
            json!({"draft": "hello"})
        };
        reply(Some(&answer.to_string()), vec![], 10, 10)
    });
    assert_eq!(outcome.1, TerminationReason::Completed);
    assert!(sim.tool_runs.is_empty(), "the call was refused, not made");
    let refused = sim.events.iter().any(|e| {
        matches!(&e.kind, EventKind::ToolResult { result, attempts: 0, .. }
            if result.message.as_deref().is_some_and(|m| m.contains("no tool named `lookup`")))
    });
    assert!(refused);
}

const CYCLE: &str = r#"
name: tester
version: 1
model: {primary: openai/gpt-4o-mini, max_output_tokens: 100}
instructions: Write and review.
limits: {max_iterations: 20, max_total_tokens: 100000, max_cost_usd: 1.0, timeout: 10s}
flow:
  graph:
    state:
      type: object
      properties: {draft: {type: string}, good: {type: boolean}}
    start: write
    nodes:
      write: {kind: llm, instructions: "Write a draft and judge it.", writes: [draft, good], max_visits: 3}
      review:
        kind: router
        routes: [{when: {pointer: /good, equals: true}, to: done}, {to: write}]
      done: {kind: end}
    edges: [[write, review]]
"#;

#[test]
fn a_bounded_cycle_stops_at_max_visits_with_loop_detected() {
    let mut sim = Sim::new(CYCLE);
    let outcome = sim.run(|_, _| reply(Some(r#"{"draft": "meh", "good": false}"#), vec![], 10, 10));
    assert_eq!(
        outcome,
        (RunStatus::LimitExceeded, TerminationReason::LoopDetected)
    );
    assert_eq!(sim.model_requests(), 3);
    let RunFinished { detail, .. } = finished(&sim) else {
        unreachable!()
    };
    let detail = detail.unwrap_or_default();
    assert!(
        detail.contains("node `write`") && detail.contains("max_visits"),
        "{detail}"
    );

    // A draft judged good on the second visit leaves the cycle; the output is the state.
    let mut sim = Sim::new(CYCLE);
    let outcome = sim.run(|n, _| {
        let good = n == 2;
        reply(
            Some(&json!({"draft": format!("v{n}"), "good": good}).to_string()),
            vec![],
            10,
            10,
        )
    });
    assert_eq!(outcome.1, TerminationReason::Completed);
    assert_eq!(
        sim.engine.output(),
        Some(&json!({"draft": "v2", "good": true}))
    );
}

use EventKind::RunFinished;

fn finished(sim: &Sim) -> EventKind {
    sim.events.last().map(|e| e.kind.clone()).unwrap()
}

const CHOOSE: &str = r#"
name: tester
version: 1
model: {primary: openai/gpt-4o-mini, max_output_tokens: 100}
instructions: Route tickets.
limits: {max_iterations: 10, max_total_tokens: 100000, max_cost_usd: 1.0, timeout: 10s}
tools:
  - name: lookup
    source: {builtin: lookup}
flow:
  graph:
    state: {type: object, properties: {team: {type: string}, order: {type: object}}}
    start: pick
    nodes:
      pick: {kind: router, choose: "Pick the team for this ticket.", routes: [{to: billing}, {to: tech}]}
      billing: {kind: tool, tool: lookup, args: {key: {pointer: /team}}, writes: [order], on_error: tech}
      tech: {kind: end}
    edges: [[billing, tech]]
"#;

#[test]
fn a_model_chosen_router_can_only_take_a_named_edge() {
    let mut sim = Sim::new(CHOOSE);
    let outcome = sim.run(|n, engine| {
        let system = engine.messages()[0].content.clone().unwrap_or_default();
        assert!(system.contains(r#""enum":["billing","tech"]"#), "{system}");
        let to = if n == 1 { "sales" } else { "billing" };
        reply(Some(&json!({"to": to}).to_string()), vec![], 10, 10)
    });
    assert_eq!(outcome.1, TerminationReason::Completed);
    assert_eq!(sim.model_requests(), 2, "`sales` is not an edge: repaired");
    // `billing` reads /team, which nothing wrote: the tool node fails and takes on_error.
    assert_eq!(path(&sim), ["pick", "billing", "tech"]);
    let whys = whys(&sim);
    assert_eq!(whys[0].2, "the model chose it");
    assert_eq!(
        whys[1],
        (
            "billing".into(),
            "tech".into(),
            "failed: its arguments: the state has no value at /team".into()
        )
    );
    assert!(sim.tool_runs.is_empty());
}

#[test]
fn replay_resumes_a_graph_where_it_stopped() {
    let mut sim = Sim::new(GRAPH);
    let pending = sim.advance(by_node("refund")).unwrap_err();
    let replayed = Engine::replay(sim.engine.agent().clone(), &sim.events).unwrap();
    assert_eq!(
        replayed.next_effect(sim.now),
        Some(Effect::AwaitApproval(*pending.clone()))
    );
    // Replayed after the decision, both engines take the same next step.
    sim.record(pending.decided(true, "ann", None));
    let replayed = Engine::replay(sim.engine.agent().clone(), &sim.events).unwrap();
    assert_eq!(
        replayed.next_effect(sim.now),
        sim.engine.next_effect(sim.now)
    );
    assert!(matches!(
        replayed.next_effect(sim.now),
        Some(Effect::Record(EventKind::NodeFinished { ref next, .. })) if next == "answer"
    ));
}

#[test]
fn a_log_cut_anywhere_replays_to_the_same_next_graph_step() {
    // A crash can come after any event: the replayed run decides the same node step next,
    // so no node is entered twice and no write is repeated or lost.
    let mut sim = Sim::new(GRAPH);
    let pending = sim.advance(by_node("refund")).unwrap_err();
    sim.record(pending.decided(true, "ann", None));
    sim.run(by_node("refund"));
    let mut checked = 0;
    for (i, event) in sim.events.iter().enumerate() {
        if !matches!(
            event.kind,
            EventKind::NodeEntered { .. } | EventKind::NodeFinished { .. }
        ) {
            continue;
        }
        let replayed = Engine::replay(sim.engine.agent().clone(), &sim.events[..i]).unwrap();
        assert_eq!(
            replayed.next_effect(event.ts_ms),
            Some(Effect::Record(event.kind.clone())),
            "cut before event {i}"
        );
        checked += 1;
    }
    assert_eq!(checked, 11, "6 nodes entered, 5 finished");
}

#[test]
fn each_node_is_a_span_and_its_steps_are_its_children() {
    let mut sim = Sim::new(GRAPH);
    let pending = sim.advance(by_node("refund")).unwrap_err();
    sim.record(pending.decided(true, "ann", None));
    sim.run(by_node("refund"));
    let run = crate::RunId::new("r1");
    let spans = crate::spans::spans(&run, &sim.events);
    let named = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no span {name}"))
    };
    let root = &spans[0];
    let triage = named("node triage");
    assert_eq!(triage.parent, Some(root.span_id));
    assert_eq!(
        triage.attribute("rein.node.next"),
        Some(&crate::spans::Value::Str("route".into()))
    );
    let lookup = named("node lookup");
    assert_eq!(named("execute_tool lookup").parent, Some(lookup.span_id));
    assert_eq!(
        named("approval refund").parent,
        Some(named("node refund").span_id)
    );
    let models: Vec<_> = spans
        .iter()
        .filter(|s| s.name.starts_with("chat"))
        .collect();
    assert_eq!(models.len(), 2);
    assert_eq!(models[0].parent, Some(triage.span_id));
    assert_eq!(models[1].parent, Some(named("node answer").span_id));
}

#[test]
fn state_that_untrusted_content_reached_is_fenced_for_later_model_steps() {
    // The lookup's result is untrusted: once it is in the state, the answer node sees the
    // state between the run's markers; before it, the triage node sees it as it is.
    let mut sim = Sim::new(GRAPH);
    let mut seen: Vec<(bool, bool)> = Vec::new();
    let mut model = by_node("refund");
    let mut spy = |n: u32, engine: &Engine| {
        let system = engine.messages()[0].content.clone().unwrap_or_default();
        let user = engine.messages()[1].content.clone().unwrap_or_default();
        seen.push((system.contains("Answer the customer"), user.contains(FENCE)));
        model(n, engine)
    };
    let pending = sim.advance(&mut spy).unwrap_err();
    sim.record(pending.decided(true, "ann", None));
    sim.run(&mut spy);
    assert_eq!(seen, [(false, false), (true, true)]);
}
