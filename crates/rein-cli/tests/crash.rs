//! kill -9 in the middle: a `rein run` process is killed at chosen and at random points of a
//! multi-step run with side-effecting HTTP tools; `rein runs resume` finishes it. Every
//! recorded step survives, the audit chain verifies, and the tool service applied each
//! logical call's effect exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::rein;
use rein_fakes::ToolService;
use rein_store::prelude::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

const SCRIPT: &str = r#"
responses:
  - tool_calls: [{name: pay, arguments: {n: 1}}]
  - tool_calls: [{name: pay, arguments: {n: 2}}]
  - tool_calls: [{name: pay, arguments: {n: 3}}]
  - text: paid three times
"#;

/// Starts `rein run`, reads the run id it prints first on stderr, and kills it with SIGKILL
/// when `kill_when` says so (or once it has run `kill_after`). Returns the run id.
fn run_and_kill(dir: &Path, kill_after: Duration, kill_when: impl Fn() -> bool) -> String {
    let mut child = common::rein_command(dir)
        .args([
            "run",
            "agent.yaml",
            "--input",
            "pay",
            "--script",
            "script.yaml",
            "--json",
        ])
        .args(["--db", "runs.db"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let started = Instant::now();
    while started.elapsed() < kill_after && !kill_when() {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill(); // SIGKILL: no destructor, no flush, no goodbye
    let _ = child.wait();
    first.trim().to_string()
}

/// Resumes the run until it has finished (a run killed before its first event is started again).
fn finish(dir: &Path, id: &str) -> Value {
    let out = rein(dir, &["runs", "show", id, "--json", "--db", "runs.db"]);
    if out.status.code() == Some(2) {
        return Value::Null; // killed before the run was recorded: nothing to resume
    }
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    if shown["status"] != "completed" {
        let out = rein(
            dir,
            &[
                "runs",
                "resume",
                id,
                "--take-over",
                "--script",
                "script.yaml",
                "--json",
                "--db",
                "runs.db",
            ],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    show(dir, "runs.db", id)
}

/// Each tool step of a finished run and its `tool_result` status.
fn tool_steps(shown: &Value) -> Vec<(u64, String)> {
    shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "tool_result")
        .map(|e| {
            (
                e["payload"]["step"].as_u64().unwrap(),
                e["payload"]["result"]["status"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect()
}

/// `rein runs show ID --json` against `db`.
fn show(dir: &Path, db: &str, id: &str) -> Value {
    let out = rein(dir, &["runs", "show", id, "--json", "--db", db]);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `rein audit verify ID` against `db` passes.
fn assert_verifies(dir: &Path, db: &str, id: &str) {
    let out = rein(dir, &["audit", "verify", id, "--db", db]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_run_killed_mid_call_and_at_random_points_resumes_and_applies_each_effect_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let service = rt.block_on(ToolService::start()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("agent.yaml"),
        common::payer_spec(&service.url(), 400, 8),
    )
    .unwrap();
    std::fs::write(dir.path().join("script.yaml"), SCRIPT).unwrap();

    // Kill points: inside the first payment call (its request reached the service), then at
    // pseudo-random times (the seed is printed so a failure can be replayed).
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    eprintln!("kill-point seed: {seed}");
    let mut state = seed | 1;
    let mut random_ms = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        20 + state % 1500
    };
    let mut finished = Vec::new();
    let before = service.hits("apply");
    let id = run_and_kill(dir.path(), Duration::from_secs(10), || {
        service.hits("apply") > before
    });
    finished.push((id.clone(), finish(dir.path(), &id)));
    for _ in 0..3 {
        let after = Duration::from_millis(random_ms());
        let id = run_and_kill(dir.path(), after, || false);
        finished.push((id.clone(), finish(dir.path(), &id)));
    }

    let applied = service.applied();
    let mut expected_effects = 0;
    for (id, shown) in &finished {
        if shown.is_null() {
            continue;
        }
        assert_eq!(shown["status"], "completed", "{id}: {shown}");
        assert_eq!(shown["output"], "paid three times", "{id}");
        let steps = tool_steps(shown);
        assert_eq!(
            steps.len(),
            3,
            "{id}: every recorded step is there: {steps:?}"
        );
        for (step, status) in &steps {
            assert_eq!(status, "success", "{id} step {step}");
            let key = format!("{id}:{step}");
            assert_eq!(
                applied.get(&key),
                Some(&1),
                "{key} applied once: {applied:?}"
            );
        }
        expected_effects += 3;
        assert_verifies(dir.path(), "runs.db", id);
    }
    assert!(
        expected_effects >= 3,
        "the first run was recorded and killed mid-call"
    );
    assert_eq!(
        applied.len(),
        expected_effects,
        "no effect beyond one per logical call: {applied:?}"
    );
}

/// A caller (`agent.yaml`, "You delegate work.") whose one tool is the worker `payer.yaml`,
/// which makes two payments of 400 ms each, and the script for both.
fn write_worker_tree(dir: &Path, url: &str) {
    std::fs::write(dir.join("payer.yaml"), common::payer_spec(url, 400, 8)).unwrap();
    std::fs::write(
        dir.join("agent.yaml"),
        r#"
name: boss
version: 1
model: {primary: openai/gpt-4o-mini}
instructions: You delegate work.
tools:
  - name: delegate
    description: Has the payer pay.
    input_schema: {type: object, properties: {task: {type: string}}, required: [task]}
    source: {agent: {spec: payer.yaml, max_cost_usd: 0.05}}
    contract: {timeout: 30s, side_effects: none}
limits: {max_iterations: 4, max_total_tokens: 40000, max_cost_usd: 0.10, max_depth: 2}
"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("script.yaml"),
        r#"
responses:
  - {when: You delegate, tool_calls: [{name: delegate, arguments: {task: pay}}]}
  - {when: You delegate, text: delegated}
  - {unless: You delegate, tool_calls: [{name: pay, arguments: {n: 1}}]}
  - {unless: You delegate, tool_calls: [{name: pay, arguments: {n: 2}}]}
  - {unless: You delegate, text: paid twice}
"#,
    )
    .unwrap();
}

/// Writes the worker tree into `dir`, runs its caller, and kills it with SIGKILL once the
/// worker's first payment has reached the service (it takes 400 ms). Returns the caller's id.
fn killed_inside_worker(dir: &Path, service: &ToolService) -> String {
    write_worker_tree(dir, &service.url());
    let before = service.hits("apply");
    run_and_kill(dir, Duration::from_secs(10), || {
        service.hits("apply") > before
    })
}

/// kill -9 while a worker agent is in the middle of a payment: resuming its caller continues
/// that worker's run where its log ends (its interrupted payment made again with the same
/// idempotency key) instead of starting a second worker, so each payment is applied once and
/// the tree holds one worker's run.
#[test]
fn a_caller_killed_inside_its_worker_continues_that_worker_on_resume() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let service = rt.block_on(ToolService::start()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let id = killed_inside_worker(dir.path(), &service);
    let shown = finish(dir.path(), &id);
    assert_eq!(shown["status"], "completed", "{shown}");
    assert_eq!(shown["output"], "delegated");
    let kinds = |shown: &Value, kind: &str| -> Vec<Value> {
        shown["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == kind)
            .map(|e| e["payload"].clone())
            .collect()
    };
    let started = kinds(&shown, "worker_started");
    assert_eq!(started.len(), 1, "one worker, continued: {started:?}");
    let finished = kinds(&shown, "worker_finished");
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(finished[0]["accepted"], true, "{finished:?}");
    let child = started[0]["run_id"].as_str().unwrap().to_string();
    assert_eq!(finished[0]["run_id"], child.as_str());

    let out = rein(dir.path(), &["runs", "list", "--json", "--db", "runs.db"]);
    let runs: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        runs.as_array().unwrap().len(),
        2,
        "the caller and one worker: {runs}"
    );
    let worker = show(dir.path(), "runs.db", &child);
    assert_eq!(worker["status"], "completed", "{worker}");
    assert_eq!(worker["output"], "paid twice");
    let steps = tool_steps(&worker);
    assert_eq!(steps.len(), 2, "{steps:?}");
    let applied = service.applied();
    for (step, status) in &steps {
        assert_eq!(status, "success", "step {step}");
        let key = format!("{child}:{step}");
        assert_eq!(
            applied.get(&key),
            Some(&1),
            "{key} applied once: {applied:?}"
        );
    }
    assert_eq!(
        applied.len(),
        2,
        "no payment beyond the worker's two: {applied:?}"
    );
    for run in [&id, &child] {
        assert_verifies(dir.path(), "runs.db", run);
    }
}

/// A caller killed inside its worker, then cancelled before anyone resumed it: resuming it ends
/// it, and ends the worker's run it did not continue (no one else ever would: a worker's run is
/// not claimed on its own).
#[test]
fn a_caller_cancelled_after_a_crash_ends_the_worker_it_left_running() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let service = rt.block_on(ToolService::start()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let id = killed_inside_worker(dir.path(), &service);
    // Only its caller continues a worker's run.
    let runs = rein(dir.path(), &["runs", "list", "--json", "--db", "runs.db"]);
    let runs: Value = serde_json::from_slice(&runs.stdout).unwrap();
    let child = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["agent"] == "payer")
        .unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = rein(
        dir.path(),
        &[
            "runs",
            "resume",
            &child,
            "--take-over",
            "--script",
            "script.yaml",
            "--db",
            "runs.db",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("run {child} is a worker of run {id}")),
        "{stderr}"
    );
    let out = rein(dir.path(), &["runs", "cancel", &id, "--db", "runs.db"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
            "--db",
            "runs.db",
        ],
    );
    let resumed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(resumed["status"], "cancelled", "{resumed}");

    let out = rein(dir.path(), &["runs", "list", "--json", "--db", "runs.db"]);
    let runs: Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 2, "{runs:?}");
    let worker = runs.iter().find(|r| r["run_id"] == child.as_str()).unwrap();
    assert_eq!(worker["status"], "cancelled", "{worker}");
    let shown = show(dir.path(), "runs.db", &child);
    assert!(
        shown["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("its caller, run {id}, ended without it")),
        "{shown}"
    );
    assert_verifies(dir.path(), "runs.db", &child);
}

/// A finished tree's logs, cut where a crash could have stopped the caller, copied into a
/// fresh database and resumed there: just after the worker's end was recorded (the worker is
/// not run again: its recorded answer is the call's result), and just after the worker was
/// recorded as started but before its own run was stored (it is started as that run, so its
/// payments carry the same idempotency keys and the service applies each once).
#[test]
fn a_caller_cut_around_its_worker_takes_it_up_without_running_it_twice() {
    use rein_store::Store as _;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let service = rt.block_on(ToolService::start()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_worker_tree(dir.path(), &service.url());
    let out = rein(
        dir.path(),
        &[
            "run",
            "agent.yaml",
            "--input",
            "go",
            "--script",
            "script.yaml",
            "--json",
            "--db",
            "whole.db",
        ],
    );
    let whole: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(whole["status"], "completed", "{whole}");
    let caller = rein_core::RunId::new(whole["run_id"].as_str().unwrap());
    let tenant = rein_core::TenantId::new("default");
    let open = |name: &str| {
        let path = dir.path().join(name);
        rt.block_on(rein_store::SqliteStore::open(path, Default::default()))
            .unwrap()
    };
    let source = open("whole.db");
    let (caller_record, caller_log) = rt.block_on(async {
        (
            source.run(&tenant, &caller).await.unwrap(),
            source.events(&tenant, &caller).await.unwrap(),
        )
    });
    let cut_after = |kind: &str| caller_log.iter().position(|e| e.kind == kind).unwrap() + 1;
    let child_event = &caller_log[cut_after("worker_started") - 1];
    let child = match child_event.decode().unwrap().kind {
        rein_core::EventKind::WorkerStarted { run_id, .. } => run_id,
        other => panic!("{other:?}"),
    };
    let (child_record, child_log) = rt.block_on(async {
        (
            source.run(&tenant, &child).await.unwrap(),
            source.events(&tenant, &child).await.unwrap(),
        )
    });
    let applied_before = service.applied();
    assert_eq!(applied_before.len(), 2, "{applied_before:?}");

    for (db, cut, with_child) in [
        ("finished.db", cut_after("worker_finished"), true),
        ("unstored.db", cut_after("worker_started"), false),
    ] {
        let copy = open(db);
        rt.block_on(async {
            copy.create_run(&caller_record.info, &caller_log[..1], None)
                .await
                .unwrap();
            copy.append_all(&tenant, &caller_log[1..cut]).await.unwrap();
            if with_child {
                // A spec that no longer parses: taking the finished worker up must not need it
                // (driving it again would, and would fail the call).
                let info = rein_store::RunInfo {
                    spec: "name: [".into(),
                    ..child_record.info.clone()
                };
                copy.create_run(&info, &child_log[..1], None).await.unwrap();
                copy.append_all(&tenant, &child_log[1..]).await.unwrap();
            }
            copy.close().await;
        });
        let out = rein(
            dir.path(),
            &[
                "runs",
                "resume",
                caller.as_str(),
                "--script",
                "script.yaml",
                "--json",
                "--db",
                db,
            ],
        );
        let resumed: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(resumed["status"], "completed", "{db}: {resumed}");
        assert_eq!(resumed["output"], "delegated", "{db}");
        let shown = show(dir.path(), db, caller.as_str());
        let events = shown["events"].as_array().unwrap();
        let count = |kind: &str| events.iter().filter(|e| e["kind"] == kind).count();
        assert_eq!(
            (count("worker_started"), count("worker_finished")),
            (1, 1),
            "{db}"
        );
        let result = events.iter().find(|e| e["kind"] == "tool_result").unwrap();
        assert_eq!(
            result["payload"]["result"]["status"], "success",
            "{db}: {result}"
        );
        let worker = show(dir.path(), db, child.as_str());
        assert_eq!(worker["status"], "completed", "{db}: {worker}");
        if with_child {
            assert_eq!(
                worker["events"].as_array().unwrap().len(),
                child_log.len(),
                "{db}: the finished worker was not driven again"
            );
        }
        let out = rein(dir.path(), &["runs", "list", "--json", "--db", db]);
        let runs: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(runs.as_array().unwrap().len(), 2, "{db}: {runs}");
        let applied = service.applied();
        assert_eq!(applied.len(), 2, "{db}: the same two payments: {applied:?}");
        assert!(
            applied.values().all(|n| *n == 1),
            "{db}: each applied once: {applied:?}"
        );
    }
}

/// A server driving 200 runs on PostgreSQL is killed with SIGKILL and started again: every
/// accepted run completes, and none ends `timeout` for the time it lay unattended (the dead
/// process's leases expiring, the restart), which is not the run's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_on_postgres_completes_every_accepted_run_on_restart() {
    let schema = rein_store::testing::TestSchema::create().await.unwrap();
    let db = schema.url();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::write(
        dir.join("script.yaml"),
        "responses:\n  - tool_calls: [{name: nap, arguments: {seconds: 0.3}}]\n  - text: done\n",
    )
    .unwrap();
    let key = common::tenant_key_in(dir, "acme", &db);
    let args = [
        "--db",
        db.as_str(),
        "--script",
        "script.yaml",
        "--lease",
        "1s",
        "--workers",
        "8",
    ];
    let server = common::serve(dir, &args, &[]);
    let http = reqwest::Client::new();
    // A wall-clock limit of 2 s: shorter than the time a killed run lies unattended here.
    let spec = "name: napper\nversion: 1\nmodel: {primary: openai/gpt-4o-mini}\ninstructions: Nap.\ntools:\n  - name: nap\n    source: {builtin: sleep}\n    contract: {timeout: 10s, side_effects: none}\nlimits: {max_iterations: 4, max_total_tokens: 20000, max_cost_usd: 0.10, timeout: 2s}\n";
    common::register(&http, &server.base, &key, spec).await;
    for n in 0..200 {
        let queued = http
            .post(format!("{}/v1/runs", server.base))
            .bearer_auth(&key)
            .json(&serde_json::json!({"agent": "napper", "input": format!("run {n}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(queued.status(), 202);
    }
    let ended = |runs: &Value| {
        runs.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["status"] != "queued" && r["status"] != "running")
            .count()
    };
    let list = |base: String| {
        let (http, key) = (http.clone(), key.clone());
        async move { common::get_json(&http, &format!("{base}/v1/runs?limit=1000"), &key).await }
    };
    // Killed mid-way, with runs in flight.
    let started = Instant::now();
    while ended(&list(server.base.clone()).await) < 30 {
        assert!(started.elapsed() < Duration::from_secs(60), "no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(server);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let server = common::serve(dir, &args, &[]);
    let started = Instant::now();
    let runs = loop {
        let runs = list(server.base.clone()).await;
        if ended(&runs) == 200 {
            break runs;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not every run ended: {} of 200",
            ended(&runs)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let not_completed: Vec<&Value> = runs
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] != "completed")
        .collect();
    assert!(not_completed.is_empty(), "{not_completed:?}");
    drop(server);
    schema.drop_schema().await.unwrap();
}
