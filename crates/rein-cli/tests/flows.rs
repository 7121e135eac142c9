//! Explicit control flow through the `rein` binary. `flow: graph`: `rein check` naming the
//! bad node, `rein graph`, the refund example run to a person's approval and on to its end,
//! and a graph run killed inside a node resumed there. `flow: plan_execute`: the order
//! example, whose failed step is retried and whose plan is then revised.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use common::rein;
use serde_json::Value;
use std::process::Output;

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The demo's refund graph, its order lookup pointed at `url`.
fn refund_graph(url: &str) -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/demo/refund-graph.yaml"
    );
    std::fs::read_to_string(path)
        .unwrap()
        .replace("http://127.0.0.1:8089", url)
}

const REFUND_SCRIPT: &str = include_str!("../../../examples/demo/refund-graph.script.yaml");

/// The nodes a run entered, in order, from `rein runs show --json`.
fn path(dir: &std::path::Path, id: &str) -> Vec<String> {
    let shown = rein(dir, &["runs", "show", id, "--json", "--db", "runs.db"]);
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "node_entered")
        .map(|e| e["payload"]["node"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn check_rejects_a_bad_graph_naming_the_node_and_graph_draws_a_good_one() {
    let dir = tempfile::tempdir().unwrap();
    // No order service is needed to check or draw.
    let good = refund_graph("http://127.0.0.1:9");
    std::fs::write(dir.path().join("good.yaml"), &good).unwrap();
    let bad = good
        .replace("[answer, done]]", "[answer, triage]]")
        .replace(
            "on_deny: answer}",
            "on_deny: answer}\n      orphan: {kind: end}",
        );
    std::fs::write(dir.path().join("bad.yaml"), bad).unwrap();

    let out = rein(dir.path(), &["check", "bad.yaml"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    for expected in [
        "flow.graph.nodes.orphan: node `orphan` is unreachable from `triage`",
        "flow.graph.nodes.answer: the cycle answer -> triage",
    ] {
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }

    let out = rein(dir.path(), &["check", "good.yaml"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("a graph of 6 nodes from `triage`"),
        "{stdout}"
    );

    let out = rein(dir.path(), &["graph", "good.yaml"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.starts_with("flowchart TD\n"), "{stdout}");
    assert!(
        stdout.contains("route -->|\"/category equals #quot;refund#quot;\"| lookup"),
        "{stdout}"
    );
    let react = good.replace(&good[good.find("flow:").unwrap()..], "flow: react\n");
    std::fs::write(dir.path().join("react.yaml"), react).unwrap();
    // A spec without a graph is drawn as its loop: the model and each tool it may call.
    let out = rein(dir.path(), &["graph", "react.yaml"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.starts_with("flowchart TD\n"), "{stdout}");
    assert!(
        stdout.contains("model -->|answer| output([output])"),
        "{stdout}"
    );
    assert!(
        stdout.contains("model -->|call| tool0[[\"get_order\"]]"),
        "{stdout}"
    );
}

#[test]
fn the_refund_graph_waits_for_a_person_then_replies() {
    // The order service runs on this runtime while the `rein` processes call it.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tools = rt.block_on(rein_fakes::ToolService::start()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("graph.yaml"), refund_graph(&tools.url())).unwrap();
    std::fs::write(dir.path().join("script.yaml"), REFUND_SCRIPT).unwrap();
    let script = ["--script", "script.yaml", "--json", "--db", "runs.db"];
    let mut run = vec!["run", "graph.yaml", "--input", "Please refund order 42."];
    run.extend_from_slice(&script);

    let out = rein(dir.path(), &run);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(5), "{stdout}{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["status"], "awaiting_approval");
    assert_eq!(v["awaiting_approval"]["tool"], "approve");
    // The person sees the state: the order the tool node looked up.
    assert_eq!(
        v["awaiting_approval"]["arguments"]["order"]["order_id"],
        "42"
    );
    assert_eq!(tools.hits("orders/42"), 1);
    let id = v["run_id"].as_str().unwrap().to_string();
    assert_eq!(
        path(dir.path(), &id),
        ["triage", "route", "lookup", "approve"]
    );

    let mut approve = vec!["approve", id.as_str(), "--by", "ann"];
    approve.extend_from_slice(&script);
    let out = rein(dir.path(), &approve);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["status"], "completed");
    assert_eq!(
        v["output"],
        "Your refund for order 42 has been approved and is on its way."
    );
    assert_eq!(
        path(dir.path(), &id),
        ["triage", "route", "lookup", "approve", "answer", "done"]
    );
    assert_eq!(tools.hits("orders/42"), 1, "the lookup ran once");

    // The trace shows the walk: each node, where it went and why.
    let out = rein(dir.path(), &["runs", "show", &id, "--db", "runs.db"]);
    let (shown, _) = text(&out);
    assert!(
        shown.contains("→ lookup: /category equals \"refund\""),
        "{shown}"
    );
    assert!(
        shown.contains("→ answer: approved by ann; wrote decision"),
        "{shown}"
    );
    let out = rein(dir.path(), &["audit", "verify", "--db", "runs.db"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).0);

    // Denied, the graph takes `on_deny` to the reply; the decision is in the state.
    let out = rein(dir.path(), &run);
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut deny = vec!["approve", id.as_str(), "--deny", "--reason", "not eligible"];
    deny.extend_from_slice(&script);
    let out = rein(dir.path(), &deny);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    let shown = rein(
        dir.path(),
        &["runs", "show", &id, "--json", "--db", "runs.db"],
    );
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    let finished = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "node_finished" && e["payload"]["node"] == "approve")
        .unwrap();
    assert_eq!(finished["payload"]["next"], "answer");
    assert_eq!(
        finished["payload"]["writes"]["decision"]["approved"],
        Value::Bool(false)
    );
}

#[test]
fn a_graph_run_killed_inside_a_node_resumes_there() {
    let dir = tempfile::tempdir().unwrap();
    let spec = r#"
name: batch-graph
version: 1
model: {primary: openai/gpt-4o-mini, max_output_tokens: 100}
instructions: Report on the nightly batch.
tools:
  - name: wait_for_batch
    source: {builtin: sleep}
    contract: {timeout: 30s, side_effects: none}
limits: {max_iterations: 5, max_total_tokens: 10000, max_cost_usd: 0.05, timeout: 60s}
flow:
  graph:
    state: {type: object, properties: {batch: {type: object}, report: {type: string}}}
    start: wait
    nodes:
      wait: {kind: tool, tool: wait_for_batch, args: {seconds: 2}, writes: [batch]}
      report: {kind: llm, instructions: Write the report., writes: [report]}
      done: {kind: end, output: report}
    edges: [[wait, report], [report, done]]
"#;
    let script = "responses:\n  - text: '{\"report\": \"The batch is done.\"}'\n";
    std::fs::write(dir.path().join("agent.yaml"), spec).unwrap();
    std::fs::write(dir.path().join("script.yaml"), script).unwrap();
    // Kill the process once the tool node's call is recorded as requested.
    let id = common::run_killed_at(dir.path(), "tool_requested");

    let out = rein(
        dir.path(),
        &[
            "runs",
            "resume",
            &id,
            "--take-over",
            "--script",
            "script.yaml",
            "--json",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["output"], "The batch is done.");
    let shown = rein(dir.path(), &["runs", "show", &id, "--json"]);
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    let kinds: Vec<String> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            matches!(
                e["kind"].as_str(),
                Some("node_entered" | "node_finished" | "tool_requested" | "tool_result")
            )
        })
        .map(|e| {
            format!(
                "{} {}",
                e["kind"].as_str().unwrap(),
                e["payload"]["node"]
                    .as_str()
                    .or(e["payload"]["tool"].as_str())
                    .unwrap()
            )
        })
        .collect();
    // The node is entered once; its interrupted call is made again as the same step.
    assert_eq!(
        kinds,
        [
            "node_entered wait",
            "tool_requested wait_for_batch",
            "tool_requested wait_for_batch",
            "tool_result wait_for_batch",
            "node_finished wait",
            "node_entered report",
            "node_finished report",
            "node_entered done",
        ],
        "{kinds:?}"
    );
    let out = rein(dir.path(), &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).0);
}

#[test]
fn the_order_plan_retries_its_failed_step_then_revises_the_plan() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tools = rt.block_on(rein_fakes::ToolService::start()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/demo/order-plan.yaml"
    ))
    .unwrap()
    .replace("http://127.0.0.1:8089", &tools.url());
    std::fs::write(dir.path().join("plan.yaml"), spec).unwrap();
    std::fs::write(
        dir.path().join("script.yaml"),
        include_str!("../../../examples/demo/order-plan.script.yaml"),
    )
    .unwrap();
    let out = rein(
        dir.path(),
        &[
            "run",
            "plan.yaml",
            "--input",
            "Order 42 arrived damaged, please sort it out.",
            "--script",
            "script.yaml",
            "--json",
            "--db",
            "runs.db",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(
        v["output"]
            .as_str()
            .unwrap()
            .starts_with("Order 42 has not shipped yet"),
        "{v}"
    );
    // The failed attempt really called the service, for the wrong order; the retry the right one.
    assert_eq!((tools.hits("orders/4200"), tools.hits("orders/42")), (1, 1));
    let id = v["run_id"].as_str().unwrap();
    let shown = rein(
        dir.path(),
        &["runs", "show", id, "--json", "--db", "runs.db"],
    );
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    let story: Vec<String> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            let p = &e["payload"];
            Some(match e["kind"].as_str()? {
                "plan_made" => format!(
                    "plan {} ({} steps)",
                    p["revision"],
                    p["steps"].as_array()?.len()
                ),
                "plan_step_started" => format!("start {}.{}", p["index"], p["attempt"]),
                "plan_step_finished" => {
                    format!("{} {}.{}", p["status"].as_str()?, p["index"], p["attempt"])
                }
                _ => return None,
            })
        })
        .collect();
    assert_eq!(
        story,
        [
            "plan 0 (2 steps)",
            "start 1.1",
            "failed 1.1",
            "start 1.2",
            "done 1.2",
            "plan 1 (1 steps)",
            "start 2.1",
            "done 2.1",
        ]
    );
    let out = rein(dir.path(), &["runs", "show", id, "--db", "runs.db"]);
    let (trace, _) = text(&out);
    for line in [
        "FAILED: the order service has no order 4200",
        "started, attempt 2: Look up order 42",
        "revision 1",
    ] {
        assert!(trace.contains(line), "{line}: {trace}");
    }
    let out = rein(dir.path(), &["audit", "verify", "--db", "runs.db"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).0);
}
