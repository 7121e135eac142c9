//! Orchestrator-worker through the `rein` binary, with the example in examples/orchestrator:
//! three worker agents, one timing out (its fallback answers) and one answering outside its
//! schema (repaired), the tree within the orchestrator's caps and trace; and a self-recursive
//! agent stopped at max_depth.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use common::rein;
use serde_json::Value;
use std::path::Path;

fn example_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/orchestrator");
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn runs(dir: &Path, db: &str) -> Vec<Value> {
    let out = rein(dir, &["runs", "list", "--json", "--db", db]);
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn events(dir: &Path, db: &str, id: &str) -> Vec<Value> {
    let out = rein(dir, &["runs", "show", id, "--json", "--db", db]);
    serde_json::from_slice::<Value>(&out.stdout).unwrap()["events"]
        .as_array()
        .unwrap()
        .clone()
}

fn micros(v: &Value) -> i64 {
    (v.as_f64().unwrap() * 1e6).round() as i64
}

#[test]
fn three_workers_one_timed_out_one_repaired_within_the_orchestrators_caps() {
    let dir = example_dir();
    let out = rein(
        dir.path(),
        &[
            "run",
            "orchestrator.yaml",
            "--script",
            "script.yaml",
            "--input",
            "Brief me on order 42.",
            "--json",
            "--db",
            "runs.db",
        ],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["status"], "completed");
    let id = v["run_id"].as_str().unwrap().to_string();

    let all = runs(dir.path(), "runs.db");
    let by_agent = |agent: &str| {
        all.iter()
            .find(|r| r["agent"] == agent)
            .unwrap_or_else(|| panic!("no {agent} run"))
    };
    assert_eq!(all.len(), 4, "the orchestrator and its three workers");
    assert_eq!(by_agent("checker")["termination_reason"], "timeout");
    assert_eq!(by_agent("researcher")["termination_reason"], "completed");
    let summariser = by_agent("summariser");
    assert_eq!(summariser["termination_reason"], "completed");
    assert_eq!(summariser["iterations"], 2, "its first answer was repaired");

    let log = events(dir.path(), "runs.db", &id);
    let of = |kind: &str| -> Vec<&Value> { log.iter().filter(|e| e["kind"] == kind).collect() };
    let started = of("worker_started");
    assert_eq!(started.len(), 3);
    // Each worker's budget (micro-dollars in the log) is carved out of what the orchestrator
    // had left; together they stay within its cap.
    let cap = 10_000;
    let budgets: i64 = started
        .iter()
        .map(|e| e["payload"]["budget"]["max_cost_usd"].as_i64().unwrap())
        .sum();
    assert!(budgets <= cap, "{budgets}");
    let finished = of("worker_finished");
    let accepted: Vec<bool> = finished
        .iter()
        .map(|e| e["payload"]["accepted"].as_bool().unwrap())
        .collect();
    assert_eq!(accepted, [true, false, true]);
    // The timed-out worker's fallback answered the call.
    let results = of("tool_result");
    assert_eq!(
        results[1]["payload"]["result"]["data"]["note"],
        "the warehouse did not answer in time"
    );
    assert_eq!(
        results[2]["payload"]["result"]["data"]["summary"],
        "Kettle 42 arrived dented; replacement wanted."
    );
    // The tree's spend is the orchestrator's: what `rein run` reports is every run's own
    // spend added up, and within the cap.
    let tree: i64 = all.iter().map(|r| micros(&r["cost_usd"])).sum();
    assert_eq!(micros(&v["cost_usd"]), tree);
    assert!(tree <= cap, "{tree}");
    // One trace: each worker's run continues the orchestrator's.
    let trace = id.replace('-', "");
    for worker in ["checker", "researcher", "summariser"] {
        let child = by_agent(worker)["run_id"].as_str().unwrap().to_string();
        let first = &events(dir.path(), "runs.db", &child)[0]["payload"];
        assert!(
            first["trace_parent"]
                .as_str()
                .unwrap()
                .starts_with(&format!("00-{trace}-")),
            "{first}"
        );
        assert_eq!(first["parent"]["run_id"], id.as_str());
        assert_eq!(first["parent"]["depth"], 1);
    }

    let out = rein(dir.path(), &["runs", "show", &id, "--db", "runs.db"]);
    let shown = String::from_utf8_lossy(&out.stdout);
    for line in [
        "workers: 3 run(s), 2 answer(s) taken",
        "failure contained: `check_stock` (step 3) timeout: its fallback answered",
        "completed: answer taken",
    ] {
        assert!(shown.contains(line), "{line}: {shown}");
    }
    let out = rein(dir.path(), &["audit", "verify", "--db", "runs.db"]);
    assert_eq!(out.status.code(), Some(0));

    // With a cap too small for the workers' own caps, each gets only what is left, and the
    // whole tree still stays within the orchestrator's cap, however the run ends.
    let tight = std::fs::read_to_string(dir.path().join("orchestrator.yaml"))
        .unwrap()
        .replace("max_cost_usd: 0.01", "max_cost_usd: 0.0004");
    std::fs::write(dir.path().join("tight.yaml"), tight).unwrap();
    let out = rein(
        dir.path(),
        &[
            "run",
            "tight.yaml",
            "--script",
            "script.yaml",
            "--input",
            "Brief me.",
            "--json",
            "--db",
            "tight.db",
        ],
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tree: i64 = runs(dir.path(), "tight.db")
        .iter()
        .map(|r| micros(&r["cost_usd"]))
        .sum();
    assert!(
        tree <= 400,
        "the tree spent {tree} micro-dollars of a 400 cap: {v}"
    );
    let log = events(dir.path(), "tight.db", v["run_id"].as_str().unwrap());
    let first = log.iter().find(|e| e["kind"] == "worker_started").unwrap();
    assert!(first["payload"]["budget"]["max_cost_usd"].as_i64().unwrap() < 400);
}

#[test]
fn a_self_recursive_agent_stops_at_max_depth() {
    let dir = example_dir();
    let out = rein(
        dir.path(),
        &[
            "run",
            "recursive.yaml",
            "--script",
            "recursive.script.yaml",
            "--input",
            "why?",
            "--json",
            "--db",
            "runs.db",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "a limit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["termination_reason"], "max_depth");
    assert_eq!(
        v["detail"],
        "calling `delegate` (the agent recursive.yaml) would make the tree of agents 3 deep, past max_depth 2"
    );
    let all = runs(dir.path(), "runs.db");
    assert_eq!(all.len(), 3, "depths 0, 1 and 2; depth 3 was never started");
    assert!(all.iter().all(|r| r["termination_reason"] == "max_depth"));
}

#[test]
fn check_follows_the_worker_specs_and_names_a_missing_one() {
    let dir = example_dir();
    let out = rein(dir.path(), &["check", "orchestrator.yaml"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("checker.yaml: ok: worker `check_stock` of orchestrator.yaml"),
        "{stdout}"
    );
    let bad = std::fs::read_to_string(dir.path().join("orchestrator.yaml"))
        .unwrap()
        .replace("spec: summariser.yaml", "spec: missing.yaml");
    std::fs::write(dir.path().join("bad.yaml"), bad).unwrap();
    let out = rein(dir.path(), &["check", "bad.yaml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains(
            "bad.yaml: tools[2].source.agent.spec: cannot read the worker spec missing.yaml"
        ),
        "{stderr}"
    );
}

/// An orchestrator that calls its worker by a registered agent's name.
const BOSS: &str = r#"
name: boss
version: 1
model: {primary: openai/gpt-4o-mini, max_output_tokens: 200}
instructions: You lead a research team.
tools:
  - name: research
    description: Finds the facts about an order.
    input_schema: {type: object, properties: {question: {type: string}}, required: [question]}
    source: {agent: {spec: researcher, fallback: {answer: {facts: [no researcher]}}}}
    contract: {timeout: 20s, side_effects: none}
limits: {max_iterations: 3, max_total_tokens: 20000, max_cost_usd: 0.01}
"#;

const BOSS_SCRIPT: &str = r#"
responses:
  - {when: You lead a research team, tool_calls: [{name: research, arguments: {question: "order 42?"}}]}
  - {when: You lead a research team, text: briefed}
  - {when: You research orders, text: '{"facts": ["order 42 is a kettle"]}'}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_worker_is_one_of_the_callers_own_registered_agents() {
    let dir = example_dir();
    std::fs::write(dir.path().join("boss.script.yaml"), BOSS_SCRIPT).unwrap();
    let acme = common::tenant_key(dir.path(), "acme");
    let bolt = common::tenant_key(dir.path(), "bolt");
    let server = common::serve(
        dir.path(),
        &["--script", "boss.script.yaml", "--db", "rein.db"],
        &[],
    );
    let http = reqwest::Client::new();
    let base = server.base.clone();
    let researcher = std::fs::read_to_string(dir.path().join("researcher.yaml")).unwrap();
    common::register(&http, &base, &acme, &researcher).await;
    common::register(&http, &base, &acme, BOSS).await;
    common::register(&http, &base, &bolt, BOSS).await;
    let ask = serde_json::json!({"agent": "boss", "input": "Brief me on order 42."});

    let run = common::run_waiting(&http, &base, &acme, ask.clone(), &[]).await;
    assert_eq!(run["status"], "completed", "{run}");
    let runs = common::get_json(&http, &format!("{base}/v1/runs"), &acme).await;
    let agents: Vec<&str> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["agent"].as_str().unwrap())
        .collect();
    assert!(agents.contains(&"researcher"), "{agents:?}");

    // Over the API a worker is never a file: a tenant cannot make the server read one.
    let filer = BOSS
        .replace("name: boss", "name: filer")
        .replace("spec: researcher,", "spec: researcher.yaml,");
    common::register(&http, &base, &acme, &filer).await;
    let run = common::run_waiting(
        &http,
        &base,
        &acme,
        serde_json::json!({"agent": "filer", "input": "Brief me."}),
        &[],
    )
    .await;
    assert_eq!(run["status"], "completed", "{run}");
    let runs = common::get_json(&http, &format!("{base}/v1/runs?agent=researcher"), &acme).await;
    assert_eq!(
        runs.as_array().unwrap().len(),
        1,
        "only the first run's worker: {runs}"
    );

    // Another tenant's orchestrator cannot reach acme's researcher: its worker is not found,
    // and the fallback answers.
    let run = common::run_waiting(&http, &base, &bolt, ask, &[]).await;
    assert_eq!(run["status"], "completed", "{run}");
    let runs = common::get_json(&http, &format!("{base}/v1/runs"), &bolt).await;
    assert_eq!(
        runs.as_array().unwrap().len(),
        1,
        "no worker ran for bolt: {runs}"
    );
    drop(server);
    let id = run["run_id"].as_str().unwrap();
    let shown = rein(
        dir.path(),
        &[
            "runs", "show", id, "--tenant", "bolt", "--json", "--db", "rein.db",
        ],
    );
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    let result = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "tool_result")
        .unwrap();
    assert_eq!(
        result["payload"]["result"]["data"]["facts"][0],
        "no researcher"
    );
    let started = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "worker_started");
    assert!(!started, "a worker that cannot be found is never started");
}

const WAITER: &str = r#"
name: waiter
version: 1
model: {primary: openai/gpt-4o-mini, max_output_tokens: 100}
instructions: You wait for the batch.
tools:
  - name: wait_for_batch
    source: {builtin: sleep}
    contract: {timeout: 30s, side_effects: none}
limits: {max_iterations: 3, max_total_tokens: 10000, max_cost_usd: 0.01}
"#;

const WAITING_BOSS: &str = r#"
name: waiting-boss
version: 1
model: {primary: openai/gpt-4o-mini, max_output_tokens: 100}
instructions: You wait on your team.
tools:
  - name: batch
    description: Waits for the batch.
    input_schema: {type: object}
    source: {agent: {spec: waiter}}
    contract: {timeout: 30s, side_effects: none}
limits: {max_iterations: 3, max_total_tokens: 20000, max_cost_usd: 0.01}
"#;

const WAITING_SCRIPT: &str = r#"
responses:
  - {when: You wait on your team, tool_calls: [{name: batch, arguments: {}}]}
  - {when: You wait on your team, text: done}
  - {when: You wait for the batch, tool_calls: [{name: wait_for_batch, arguments: {seconds: 1.5}}]}
  - {when: You wait for the batch, text: batch done}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_caller_cancels_the_worker_it_waits_on() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("script.yaml"), WAITING_SCRIPT).unwrap();
    let key = common::tenant_key(dir.path(), "acme");
    let server = common::serve(
        dir.path(),
        &["--script", "script.yaml", "--db", "rein.db"],
        &[],
    );
    let (http, base) = (reqwest::Client::new(), server.base.clone());
    common::register(&http, &base, &key, WAITER).await;
    common::register(&http, &base, &key, WAITING_BOSS).await;
    let queued: Value = http
        .post(format!("{base}/v1/runs"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"agent": "waiting-boss", "input": "go"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let boss = queued["run_id"].as_str().unwrap().to_string();
    let list = |agent: &'static str| {
        let (http, url, key) = (
            http.clone(),
            format!("{base}/v1/runs?agent={agent}"),
            key.clone(),
        );
        async move { common::get_json(&http, &url, &key).await }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // Once the worker is at its slow tool call, cancel the caller.
    let worker = loop {
        let runs = list("waiter").await;
        if let Some(run) = runs.as_array().and_then(|r| r.first())
            && run["tool_calls"].as_u64() == Some(0)
            && run["iterations"].as_u64() == Some(1)
        {
            break run["run_id"].as_str().unwrap().to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let asked = http
        .post(format!("{base}/v1/runs/{boss}/cancel"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(asked.status(), 202);
    let ended = |id: String| {
        let (http, url, key) = (http.clone(), format!("{base}/v1/runs/{id}"), key.clone());
        async move {
            loop {
                let run = common::get_json(&http, &url, &key).await;
                if run["status"] != "running" {
                    return run;
                }
                assert!(std::time::Instant::now() < deadline, "{run}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    let child = ended(worker.clone()).await;
    assert_eq!(child["status"], "cancelled", "{child}");
    assert_eq!(
        child["detail"],
        "cancelled by api:acme (who cancelled its caller) while it ran"
    );
    assert_eq!(
        child["iterations"], 1,
        "the worker made no model call after the cancel"
    );
    let parent = ended(boss).await;
    assert_eq!(parent["status"], "cancelled", "{parent}");
    assert_eq!(parent["iterations"], 1);
}

#[test]
fn a_worker_that_waits_for_a_person_is_ended_and_its_fallback_answers() {
    let dir = example_dir();
    std::fs::write(
        dir.path().join("held.yaml"),
        r#"
name: held
version: 1
model: {primary: openai/gpt-4o-mini, max_output_tokens: 100}
instructions: You refund orders.
tools:
  - name: refund
    source: {builtin: echo}
    contract: {confirm: true, side_effects: write}
limits: {max_iterations: 3, max_total_tokens: 10000, max_cost_usd: 0.01}
"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("boss.yaml"),
        BOSS.replace("spec: researcher,", "spec: held.yaml,"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("held.script.yaml"),
        r#"
responses:
  - {when: You lead a research team, tool_calls: [{name: research, arguments: {question: "refund 42"}}]}
  - {when: You lead a research team, text: handled}
  - {when: You refund orders, tool_calls: [{name: refund, arguments: {text: "42"}}]}
"#,
    )
    .unwrap();
    let out = rein(
        dir.path(),
        &[
            "run",
            "boss.yaml",
            "--script",
            "held.script.yaml",
            "--input",
            "x",
            "--json",
            "--db",
            "runs.db",
        ],
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "completed", "{v}");
    let all = runs(dir.path(), "runs.db");
    let held = all.iter().find(|r| r["agent"] == "held").unwrap();
    assert_eq!(
        held["status"], "cancelled",
        "not left awaiting approval: {held}"
    );
    let log = events(dir.path(), "runs.db", v["run_id"].as_str().unwrap());
    let result = log.iter().find(|e| e["kind"] == "tool_result").unwrap();
    assert_eq!(
        result["payload"]["result"]["data"]["facts"][0],
        "no researcher"
    );
}
