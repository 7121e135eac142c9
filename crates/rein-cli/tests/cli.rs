//! The `rein` binary as a user runs it: exit codes, JSON output, error messages, the demo,
//! and the audit trail catching one altered byte in the SQLite file.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::rein;
use rein_fakes::{FakeOpenAi, FakeResponse};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_issue_example_spec_checks_clean() {
    let dir = tempfile::tempdir().unwrap();
    let spec = repo().join("examples/order-support.yaml");
    let out = rein(dir.path(), &["check", spec.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("ok: order-support v1, 1 tool"), "{stdout}");
}

#[test]
fn check_says_which_tools_the_data_flow_rule_holds() {
    let dir = tempfile::tempdir().unwrap();
    let spec = r#"
name: mailer
version: 1
model: {primary: openai/gpt-4o-mini}
instructions: Mail people.
tools:
  - name: send_email
    description: Sends an email.
    input_schema: {type: object}
    source: {http: {url: "https://mail.example.com/send", method: POST}}
    contract: {side_effects: external}
  - name: lookup
    description: Looks up.
    input_schema: {type: object}
    source: {http: {url: "https://api.example.com/x", method: GET}}
    contract: {side_effects: none}
limits: {max_iterations: 3, max_total_tokens: 1000, max_cost_usd: 0.01}
"#;
    std::fs::write(dir.path().join("a.yaml"), spec).unwrap();
    let out = rein(dir.path(), &["check", "a.yaml"]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("note: once untrusted content")
            && stdout.contains(
                "calls to `send_email` (side_effects: external) wait for a person's approval"
            ),
        "{stdout}"
    );
    assert!(!stdout.contains("`lookup`"), "{stdout}");
    std::fs::write(
        dir.path().join("b.yaml"),
        format!("{spec}guards: {{allow_hosts: [mail.example.com]}}\n"),
    )
    .unwrap();
    let (stdout, _) = text(&rein(dir.path(), &["check", "b.yaml"]));
    assert!(
        !stdout.contains("note:"),
        "an allow-listed host is not held: {stdout}"
    );
}

#[test]
fn a_spec_without_a_cost_cap_is_rejected_by_check_and_run_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let spec = std::fs::read_to_string(repo().join("examples/order-support.yaml")).unwrap();
    let broken = spec.replace("  max_cost_usd: 0.50\n", "");
    assert_ne!(broken, spec);
    std::fs::write(dir.path().join("agent.yaml"), broken).unwrap();

    let out = rein(dir.path(), &["check", "agent.yaml"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "agent.yaml:20:3: limits.max_cost_usd: missing required field `max_cost_usd`"
        ),
        "{stderr}"
    );

    let out = rein(
        dir.path(),
        &[
            "run",
            "agent.yaml",
            "--input",
            "hi",
            "--script",
            "nope.yaml",
        ],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("limits.max_cost_usd"), "{stderr}");
    assert!(
        !dir.path().join("rein.db").exists(),
        "a rejected spec runs nothing and creates nothing"
    );
}

#[test]
fn every_problem_in_a_spec_is_listed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let spec = std::fs::read_to_string(repo().join("examples/order-support.yaml")).unwrap();
    let broken = spec
        .replace("flow: react", "flow: react\nguardrails: []")
        .replace("timeout: 5s", "timeout: soon")
        .replace("pattern: \"^[0-9]+$\"", "pattern: 7")
        .replace("max_iterations: 10", "max_iterations: -1");
    std::fs::write(dir.path().join("agent.yaml"), &broken).unwrap();
    let out = rein(dir.path(), &["check", "agent.yaml"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    for needle in [
        "agent.yaml:8:1: guardrails: unknown field `guardrails`",
        "tools[0].input_schema: invalid JSON Schema",
        "tools[0].contract.timeout: bad duration",
        "limits.max_iterations: -1 is out of range",
    ] {
        assert!(stderr.contains(needle), "missing `{needle}` in:\n{stderr}");
    }
}

#[test]
fn a_scripted_runaway_run_prints_json_and_exits_with_the_limit_code() {
    let dir = tempfile::tempdir().unwrap();
    let demo = repo().join("examples/demo");
    let out = rein(
        dir.path(),
        &[
            "run",
            demo.join("runaway-loop.yaml").to_str().unwrap(),
            "--input",
            "loop",
            "--script",
            demo.join("runaway-loop.script.yaml").to_str().unwrap(),
            "--json",
            "--tenant",
            "acme",
            "--db",
            "runs.db",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["status"], "limit_exceeded");
    assert_eq!(v["termination_reason"], "max_iterations");
    assert_eq!(v["iterations"], 8);
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert!(v["cost_usd"].as_f64().unwrap() > 0.0);
    assert!(v["run_id"].as_str().is_some() && v.get("output").is_some());

    // The run belongs to tenant acme: another tenant does not see it.
    let id = v["run_id"].as_str().unwrap();
    let out = rein(
        dir.path(),
        &["runs", "show", id, "--db", "runs.db", "--tenant", "acme"],
    );
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout.contains("termination: max_iterations") && stdout.contains("#16 tool"),
        "{stdout}"
    );
    let out = rein(dir.path(), &["runs", "show", id, "--db", "runs.db"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "tenant `default` must not see acme's run"
    );
}

#[test]
fn the_openai_client_is_configured_from_the_standard_environment_variables() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt
        .block_on(FakeOpenAi::start(|n, _| match n {
            0 => FakeResponse::tool_call(
                "call_1",
                "get_order_status",
                &json!({"order_id": "42"}),
                100,
                15,
            ),
            _ => FakeResponse::text("Order 42 has shipped.", 150, 8),
        }))
        .unwrap();
    let tools = rt.block_on(rein_fakes::ToolService::start()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = std::fs::read_to_string(repo().join("examples/order-support.yaml"))
        .unwrap()
        .replace("http://127.0.0.1:8089", &tools.url());
    std::fs::write(dir.path().join("agent.yaml"), spec).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rein"))
        .args([
            "run",
            "agent.yaml",
            "--input",
            "Where is order 42?",
            "--json",
        ])
        .current_dir(dir.path())
        .env("OPENAI_BASE_URL", server.base_url())
        .env("OPENAI_API_KEY", "sk-from-env")
        .env_remove("REIN_DB")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["output"], "Order 42 has shipped.");
    assert_eq!(v["models_used"], json!({"openai/gpt-4o-mini": 2}));
    assert_eq!(v["usage"]["total_tokens"], 273);
    assert_eq!(
        server.requests()[0].1.as_deref(),
        Some("Bearer sk-from-env")
    );
    assert_eq!(tools.hits("orders/42"), 1);
    assert!(!stdout.contains("sk-from-env") && !stderr.contains("sk-from-env"));
}

#[test]
fn a_compatible_server_named_in_the_spec_gets_its_own_key_and_never_the_operators() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The spec's own server is down for good (400); the step falls back to OpenAI's
    // configured endpoint, which answers.
    let local = rt
        .block_on(FakeOpenAi::start(|_, _| {
            FakeResponse::error(400, "no such model")
        }))
        .unwrap();
    let operator = rt
        .block_on(FakeOpenAi::start(|_, _| {
            FakeResponse::text("From the operator.", 20, 5)
        }))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = format!(
        r#"name: mixed
version: 1
model:
  primary: {{name: gemma3, provider: openai, base_url: "{}", api_key_env: LOCAL_LLM_KEY}}
  fallbacks: [openai/gpt-4o-mini]
  retry: {{max_attempts: 1}}
instructions: Answer.
limits: {{max_iterations: 3, max_total_tokens: 10000, max_cost_usd: 0.10}}
"#,
        local.base_url()
    );
    std::fs::write(dir.path().join("agent.yaml"), spec).unwrap();
    std::fs::write(
        dir.path().join("rein.toml"),
        "[prices.\"openai/gemma3\"]\ninput = 0\noutput = 0\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rein"))
        .args(["run", "agent.yaml", "--input", "hi", "--json"])
        .current_dir(dir.path())
        .env("OPENAI_BASE_URL", operator.base_url())
        .env("OPENAI_API_KEY", "sk-operator")
        .env("LOCAL_LLM_KEY", "sk-local")
        .env_remove("REIN_DB")
        .env_remove("REIN_CONFIG")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["output"], "From the operator.");
    assert_eq!(v["models_used"], json!({"openai/gpt-4o-mini": 1}));
    let local_requests = local.requests();
    assert_eq!(local_requests.len(), 1);
    assert_eq!(local_requests[0].0["model"], "gemma3");
    assert_eq!(local_requests[0].1.as_deref(), Some("Bearer sk-local"));
    let operator_requests = operator.requests();
    assert_eq!(operator_requests[0].0["model"], "gpt-4o-mini");
    assert_eq!(
        operator_requests[0].1.as_deref(),
        Some("Bearer sk-operator")
    );
}

#[test]
fn running_against_openai_without_a_key_is_a_clear_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let spec = repo().join("examples/order-support.yaml");
    let out = rein(
        dir.path(),
        &["run", spec.to_str().unwrap(), "--input", "hi"],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("OPENAI_API_KEY is not set"), "{stderr}");
}

#[test]
fn the_demo_runs_offline_and_audit_verify_catches_one_altered_byte() {
    let dir = tempfile::tempdir().unwrap();
    let out = rein(dir.path(), &["demo"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    for needle in [
        "max_iterations",
        "max_cost",
        "loop_detected",
        "timeout",
        "no tool named",
        "completed",
    ] {
        assert!(
            stdout.contains(needle),
            "the demo output lacks `{needle}`:\n{stdout}"
        );
    }
    assert!(stdout.contains("scripted model"), "{stdout}");

    let out = rein(dir.path(), &["audit", "verify"]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("ok: 15 runs"), "{stdout}");

    // One run, looked up across tenants.
    let out = rein(dir.path(), &["runs", "list", "--json"]);
    let runs: Value = serde_json::from_str(text(&out).0.trim()).unwrap();
    let flaky = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["agent"] == "flaky-tool")
        .unwrap();
    let id = flaky["run_id"].as_str().unwrap();
    let out = rein(dir.path(), &["audit", "verify", id, "--all-tenants"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).0);

    // The run's input is stored twice: in its run_started event and in its run row. An edit to
    // either copy is caught, each in its own way.
    let db = dir.path().join("rein.db");
    let original = std::fs::read(&db).unwrap();
    let needle = b"Where is order 42?";
    let mut verdicts = Vec::new();
    for at in original
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
    {
        let copy = dir.path().join(format!("copy-{at}.db"));
        let mut bytes = original.clone();
        bytes[at] = b'w';
        std::fs::write(&copy, &bytes).unwrap();
        let out = rein(
            dir.path(),
            &["audit", "verify", "--db", copy.to_str().unwrap()],
        );
        verdicts.push((out.status.code(), text(&out).0));
    }
    assert!(
        verdicts.iter().any(|(code, out)| *code == Some(6)
            && out.contains("(run_started): its payload does not match")),
        "{verdicts:?}"
    );
    assert!(
        verdicts.iter().any(|(code, out)| *code == Some(6)
            && out.contains("stored input disagrees with its intact event log")),
        "{verdicts:?}"
    );

    // Change one byte of one event's stored payload, in the SQLite file itself: the flaky
    // tool's answer, recorded only in its tool_result event.
    let mut bytes = original;
    let needle = br#""attempt":3"#;
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the flaky tool's result in the file");
    bytes[at + needle.len() - 1] = b'4';
    std::fs::write(&db, &bytes).unwrap();

    let out = rein(dir.path(), &["audit", "verify"]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(6), "{stdout}");
    assert!(
        stdout.contains("TAMPERED run")
            && stdout.contains("(tool_result): its payload does not match its recorded digest"),
        "{stdout}"
    );
}

#[test]
fn a_run_whose_process_is_killed_mid_tool_call_is_resumed_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let spec = r#"
name: batch-report
version: 1
model: {primary: openai/gpt-4o-mini, max_output_tokens: 100}
instructions: Wait for the batch, then report.
tools:
  - name: wait_for_batch
    source: {builtin: sleep}
    contract: {timeout: 30s, side_effects: none}
limits: {max_iterations: 5, max_total_tokens: 10000, max_cost_usd: 0.05, timeout: 60s}
"#;
    let script = "responses:\n  - tool_calls: [{name: wait_for_batch, arguments: {seconds: 2}}]\n  - text: The batch is done.\n";
    std::fs::write(dir.path().join("agent.yaml"), spec).unwrap();
    std::fs::write(dir.path().join("script.yaml"), script).unwrap();
    // Kill the process once the tool call is recorded as requested.
    let id = common::run_killed_at(dir.path(), "tool_requested");

    let out = rein(dir.path(), &["runs", "list", "--json"]);
    let runs: Value = serde_json::from_str(text(&out).0.trim()).unwrap();
    assert_eq!(
        runs[0]["status"], "running",
        "the killed run was left running"
    );

    // The dead process's lease on the run is still live, but its holder ran on this machine
    // and is gone (its process id and the boot id are in the lease): a plain resume takes the
    // run over at once instead of waiting for the lease to expire.
    let out = rein(
        dir.path(),
        &["runs", "resume", &id, "--script", "script.yaml", "--json"],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stderr.contains("is gone; taking it over"), "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["output"], "The batch is done.");
    assert_eq!(v["iterations"], 2);

    let out = rein(dir.path(), &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).0);
    let out = rein(
        dir.path(),
        &["runs", "resume", &id, "--script", "script.yaml"],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "a finished run cannot be resumed again"
    );
}

const COSTLY_SPEC: &str = r#"
name: summariser
version: 1
model: {primary: openai/gpt-4o, max_output_tokens: 4000}
instructions: Summarise.
tools:
  - name: fetch
    source: {builtin: echo}
    contract: {side_effects: none}
limits: {max_iterations: 5, max_total_tokens: 100000, max_cost_usd: 1.00}
"#;

/// Each model call spends its whole 4,000-token output cap: about $0.04 on gpt-4o.
const COSTLY_SCRIPT: &str = r#"
responses:
  - tool_calls: [{name: fetch, arguments: {text: "part {n}"}}]
    usage: {input_tokens: 20, output_tokens: 4000}
  - text: Summary.
    usage: {input_tokens: 20, output_tokens: 4000}
"#;

#[test]
fn a_run_refused_by_a_shared_budget_reports_budget_exhausted_with_the_limit_code() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("agent.yaml"), COSTLY_SPEC).unwrap();
    std::fs::write(dir.path().join("script.yaml"), COSTLY_SCRIPT).unwrap();
    std::fs::write(
        dir.path().join("rein.toml"),
        "[budgets]\ntenant_daily_usd = 0.05\n",
    )
    .unwrap();
    let args = [
        "run",
        "agent.yaml",
        "--input",
        "doc",
        "--script",
        "script.yaml",
        "--json",
    ];
    let out = rein(dir.path(), &args);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        (v["status"].as_str(), v["termination_reason"].as_str()),
        (Some("limit_exceeded"), Some("budget_exhausted"))
    );
    assert_eq!(
        v["iterations"], 1,
        "the first call fit the $0.05 day, the second could not"
    );
    // The day's budget is spent: the next run is refused before its first call.
    let out = rein(dir.path(), &args);
    let v: Value = serde_json::from_str(text(&out).0.trim()).unwrap();
    assert_eq!(
        (v["termination_reason"].as_str(), v["iterations"].as_u64()),
        (Some("budget_exhausted"), Some(0))
    );

    std::fs::write(
        dir.path().join("rein.toml"),
        "[budgets]\ntenant_daily_usd = -1\n",
    )
    .unwrap();
    let out = rein(dir.path(), &args);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).1.contains("budgets.tenant_daily_usd"),
        "{}",
        text(&out).1
    );
}

#[test]
fn separate_rein_processes_sharing_redis_never_overspend_one_budget() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("agent.yaml"), COSTLY_SPEC).unwrap();
    std::fs::write(dir.path().join("script.yaml"), COSTLY_SCRIPT).unwrap();
    let prefix = format!("rein-test-{}", std::process::id());
    std::fs::write(
        dir.path().join("rein.toml"),
        format!("[budgets]\ntenant_daily_usd = 0.20\n\n[counters]\nurl = \"redis://127.0.0.1:6379\"\nprefix = \"{prefix}-{}\"\n", rand_suffix()),
    )
    .unwrap();
    let children: Vec<_> = (0..12)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_rein"))
                .args([
                    "run",
                    "agent.yaml",
                    "--input",
                    "doc",
                    "--script",
                    "script.yaml",
                    "--json",
                    "--tenant",
                    "shared",
                ])
                .args(["--db", &format!("worker-{i}.db")])
                .current_dir(dir.path())
                .env_remove("REIN_DB")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut total = 0.0;
    let mut refused = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        let (stdout, stderr) = text(&out);
        let v: Value =
            serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("{stdout}{stderr}"));
        total += v["cost_usd"].as_f64().unwrap();
        match v["termination_reason"].as_str() {
            Some("completed") => assert_eq!(out.status.code(), Some(0)),
            Some("budget_exhausted") => {
                assert_eq!(out.status.code(), Some(3));
                refused += 1;
            }
            other => panic!("unexpected ending {other:?}: {stdout}"),
        }
    }
    println!("12 processes, budget $0.20: settled ${total:.6}, {refused} runs refused");
    assert!(total <= 0.20 + 1e-9, "overspent across processes: ${total}");
    assert!(refused > 0 && total > 0.0);
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[test]
fn runs_list_filters_and_pages() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(rein(dir.path(), &["demo"]).status.code(), Some(0));
    let list = |args: &[&str]| -> Vec<Value> {
        let out = rein(dir.path(), &[&["runs", "list", "--json"], args].concat());
        assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
        serde_json::from_str::<Value>(text(&out).0.trim())
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    let ids = |runs: &[Value]| -> Vec<String> {
        runs.iter()
            .map(|r| r["run_id"].as_str().unwrap().to_string())
            .collect()
    };
    let all = list(&["--limit", "100"]);
    assert!(all.len() > 2, "the demo makes several runs");
    let first = list(&["--limit", "2"]);
    let last = ids(&first)[1].clone();
    let rest = list(&["--before", &last, "--limit", "100"]);
    assert_eq!([ids(&first), ids(&rest)].concat(), ids(&all));
    let agent = all[0]["agent"].as_str().unwrap();
    let theirs = list(&["--agent", agent, "--limit", "100"]);
    assert!(!theirs.is_empty());
    assert_eq!(
        theirs.len(),
        all.iter().filter(|r| r["agent"] == agent).count()
    );
    let session = all[0]["session"].as_str().unwrap();
    assert!(
        list(&["--session", session, "--limit", "100"])
            .iter()
            .all(|r| r["session"] == session)
    );
    let out = rein(dir.path(), &["runs", "list", "--before", "no-such-run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("no such run"), "{}", text(&out).1);
}

#[test]
fn costs_totals_equal_the_sum_of_recorded_model_calls() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(rein(dir.path(), &["demo"]).status.code(), Some(0));
    let out = rein(dir.path(), &["runs", "list", "--json", "--limit", "100"]);
    let runs: Value = serde_json::from_str(text(&out).0.trim()).unwrap();
    let expected: i64 = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["cost_micros"].as_i64().unwrap())
        .sum();
    let expected_calls: u64 = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["iterations"].as_u64().unwrap())
        .sum();
    assert!(expected > 0);

    for by in ["agent", "model", "day", "user", "tenant"] {
        let out = rein(dir.path(), &["costs", "--by", by, "--json"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
        let v: Value = serde_json::from_str(text(&out).0.trim()).unwrap();
        let rows = v["rows"].as_array().unwrap();
        let sum: i64 = rows
            .iter()
            .map(|r| r["cost_micros"].as_i64().unwrap())
            .sum();
        let calls: u64 = rows.iter().map(|r| r["calls"].as_u64().unwrap()).sum();
        assert_eq!(
            (sum, v["total_micros"].as_i64().unwrap(), calls),
            (expected, expected, expected_calls),
            "by {by}"
        );
    }
    let out = rein(dir.path(), &["costs", "--by", "agent", "--json"]);
    let v: Value = serde_json::from_str(text(&out).0.trim()).unwrap();
    let cost_cap = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "cost-cap")
        .unwrap();
    let run = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["agent"] == "cost-cap")
        .unwrap();
    assert_eq!(cost_cap["cost_micros"], run["cost_micros"]);

    // Another tenant sees nothing; a day after today nothing either.
    let out = rein(dir.path(), &["costs", "--tenant", "other", "--json"]);
    assert_eq!(
        serde_json::from_str::<Value>(text(&out).0.trim()).unwrap()["total_micros"],
        0
    );
    let out = rein(dir.path(), &["costs", "--since", "2999-01-01", "--json"]);
    assert_eq!(
        serde_json::from_str::<Value>(text(&out).0.trim()).unwrap()["total_micros"],
        0
    );
    let out = rein(dir.path(), &["costs", "--since", "soon"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn tenant_tables_are_read_strictly() {
    let dir = tempfile::tempdir().unwrap();
    let spec = repo().join("examples/order-support.yaml");
    std::fs::write(
        dir.path().join("rein.toml"),
        "scopes = [\"a\"]\n[tenants.acme]\nscopes = [\"b\"]\ntenant_daily_usd = 1.0\n",
    )
    .unwrap();
    let out = rein(dir.path(), &["check", spec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    std::fs::write(
        dir.path().join("rein.toml"),
        "[tenants.acme]\ntenant_dayly_usd = 1.0\n",
    )
    .unwrap();
    let out = rein(dir.path(), &["check", spec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).1.contains("tenants.acme") && text(&out).1.contains("tenant_dayly_usd"),
        "{}",
        text(&out).1
    );
}

#[test]
fn rate_limits_from_the_config_reject_the_call_over_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("script.yaml"),
        "responses:\n  - text: done\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("rein.toml"),
        "[rate_limits]\nmode = \"reject\"\ntenant_requests = 1\n",
    )
    .unwrap();
    let spec = repo().join("examples/order-support.yaml");
    let args = [
        "run",
        spec.to_str().unwrap(),
        "--input",
        "hi",
        "--script",
        "script.yaml",
        "--json",
    ];
    assert_eq!(rein(dir.path(), &args).status.code(), Some(0));
    let out = rein(dir.path(), &args);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(4), "{stdout}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["termination_reason"], "error");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("rate limit rate:tenant:default:requests reached"),
        "{v}"
    );

    std::fs::write(
        dir.path().join("rein.toml"),
        "[rate_limits]\nmode = \"drop\"\n",
    )
    .unwrap();
    let out = rein(dir.path(), &args);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).1.contains("rate_limits.mode"),
        "{}",
        text(&out).1
    );
}

#[test]
fn a_run_refused_by_a_full_bulkhead_exits_with_the_limit_code_and_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("script.yaml"),
        "responses:\n  - tool_calls: [{name: nap, arguments: {seconds: 600}}]\n  - text: done\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("agent.yaml"),
        "name: napper\nversion: 1\nmodel: {primary: openai/gpt-4o-mini}\ninstructions: Nap.\ntools:\n  - {name: nap, source: {builtin: sleep}, contract: {side_effects: none, timeout: 600s}}\nlimits: {max_iterations: 3, max_total_tokens: 10000, max_cost_usd: 0.1, timeout: 600s}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("rein.toml"),
        "[bulkheads]\nmax_concurrent_runs = 1\nmax_queued = 0\n",
    )
    .unwrap();
    let args = [
        "run",
        "agent.yaml",
        "--input",
        "hi",
        "--script",
        "script.yaml",
        "--json",
    ];
    let mut first = Command::new(env!("CARGO_BIN_EXE_rein"))
        .args(args)
        .current_dir(dir.path())
        .env_remove("REIN_DB")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the first run holds its slot (its run exists), then try a second while it
    // naps. (Generous bounds: with the whole suite running on two cores, starting a process and
    // opening the store can take seconds; the nap outlasts any of them, and ends when the
    // first process is stopped below.)
    let started = std::time::Instant::now();
    loop {
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
        std::thread::sleep(std::time::Duration::from_millis(50));
        if dir.path().join("rein.db").exists() {
            let out = rein(dir.path(), &["runs", "list", "--json"]);
            if serde_json::from_str::<Value>(text(&out).0.trim())
                .is_ok_and(|v| v.as_array().is_some_and(|a| !a.is_empty()))
            {
                break;
            }
        }
    }
    let out = rein(dir.path(), &args);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}{}",
        text(&out).0,
        text(&out).1
    );
    assert!(
        text(&out).1.contains("at its cap of concurrent runs"),
        "{}",
        text(&out).1
    );
    // The refused run was never recorded: only the first, still napping, is.
    first.kill().unwrap();
    first.wait().unwrap();
    let out = rein(dir.path(), &["runs", "list", "--json"]);
    assert_eq!(
        serde_json::from_str::<Value>(text(&out).0.trim())
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn rein_run_streams_the_answer_to_a_person_as_it_arrives() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt
        .block_on(FakeOpenAi::start(|_, _| {
            FakeResponse::text("Streaming works, piece by piece.", 20, 8)
        }))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("agent.yaml"),
        "name: streamer\nversion: 1\nmodel: {primary: openai/gpt-4o-mini}\ninstructions: Answer.\nlimits: {max_iterations: 2, max_total_tokens: 10000, max_cost_usd: 0.1}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rein"))
        .args(["run", "agent.yaml", "--input", "hi"])
        .current_dir(dir.path())
        .env("OPENAI_BASE_URL", server.base_url())
        .env("OPENAI_API_KEY", "sk-test")
        .env_remove("REIN_DB")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(
        stdout.matches("Streaming works, piece by piece.").count(),
        1,
        "{stdout}"
    );
    assert!(stdout.contains("completed (completed)"), "{stdout}");
    assert_eq!(server.requests()[0].0["stream"], true);
}

const CONFIRM_SPEC: &str = r#"
name: careful
version: 1
model: {primary: openai/gpt-4o-mini}
instructions: Echo, then say done.
tools:
  - name: echo
    source: {builtin: echo}
    contract: {confirm: true, side_effects: write}
limits: {max_iterations: 4, max_total_tokens: 10000, max_cost_usd: 0.05}
"#;

const CONFIRM_SCRIPT: &str = r#"
responses:
  - tool_calls: [{name: echo, arguments: {text: "refund 42"}}]
  - text: done
"#;

#[test]
fn rein_approve_decides_a_held_call_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("agent.yaml"), CONFIRM_SPEC).unwrap();
    std::fs::write(dir.path().join("script.yaml"), CONFIRM_SCRIPT).unwrap();
    let script = ["--script", "script.yaml", "--json", "--db", "runs.db"];
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "agent.yaml", "--input", "refund"];
        args.extend_from_slice(extra);
        rein(dir.path(), &args)
    };

    let out = run(&script);
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(5),
        "needs a person: {stdout}{stderr}"
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["status"], "awaiting_approval");
    assert_eq!(v["termination_reason"], Value::Null);
    assert_eq!(v["awaiting_approval"]["tool"], "echo");
    assert_eq!(
        v["awaiting_approval"]["arguments"],
        json!({"text": "refund 42"})
    );
    let id = v["run_id"].as_str().unwrap().to_string();
    let listed = rein(
        dir.path(),
        &[
            "runs",
            "list",
            "--status",
            "awaiting-approval",
            "--json",
            "--db",
            "runs.db",
        ],
    );
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "the approvals queue: {listed}"
    );
    assert_eq!(listed[0]["run_id"], id.as_str());
    let done = rein(
        dir.path(),
        &[
            "runs",
            "list",
            "--status",
            "completed",
            "--json",
            "--db",
            "runs.db",
        ],
    );
    let done: Value = serde_json::from_slice(&done.stdout).unwrap();
    assert!(done.as_array().unwrap().is_empty());

    let mut approve = vec!["approve", id.as_str(), "--by", "ann"];
    approve.extend_from_slice(&script);
    let out = rein(dir.path(), &approve);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        (v["status"].as_str(), v["output"].as_str()),
        (Some("completed"), Some("done"))
    );

    let shown = rein(
        dir.path(),
        &["runs", "show", &id, "--json", "--db", "runs.db"],
    );
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    let kinds: Vec<&str> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    let at = |kind: &str| kinds.iter().position(|k| *k == kind).unwrap();
    assert!(
        at("approval_requested") < at("approval_decided")
            && at("approval_decided") < at("tool_requested"),
        "{kinds:?}"
    );
    let decided = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "approval_decided")
        .unwrap();
    assert_eq!(
        (
            decided["payload"]["by"].as_str(),
            decided["payload"]["approved"].as_bool()
        ),
        (Some("ann"), Some(true))
    );

    let out = rein(dir.path(), &approve);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("is not awaiting approval"), "{stderr}");
    let out = rein(dir.path(), &["audit", "verify", "--db", "runs.db"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).0);

    // Denied: the call is never made; the model hears why and answers.
    let out = run(&script);
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut deny = vec![
        "approve",
        id.as_str(),
        "--deny",
        "--reason",
        "refunds are paused",
    ];
    deny.extend_from_slice(&script);
    let out = rein(dir.path(), &deny);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let shown = rein(
        dir.path(),
        &["runs", "show", &id, "--json", "--db", "runs.db"],
    );
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    let result = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "tool_result")
        .unwrap();
    assert_eq!(result["payload"]["result"]["status"], "error");
    assert!(
        result["payload"]["result"]["message"]
            .as_str()
            .unwrap()
            .contains("refunds are paused")
    );
}

/// README's engine benchmark runs end to end (kept small here; figures are not checked, only
/// that every step and every run it counts happened).
#[test]
fn the_engine_benchmark_runs_and_reports_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = rein(
        dir.path(),
        &["bench", "--steps", "20", "--runs", "50", "--json"],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    // Ten turns of a model call and a tool call, then the model's final answer.
    assert_eq!(report["steps"], 21);
    assert_eq!(report["runs_in_flight"], 50);
    assert_eq!(report["runs_completed"], 50);
    assert!(report["overhead_per_step_us"]["p50"].as_f64().unwrap() > 0.0);
}

/// README's gateway benchmark runs end to end: both phases answer every request, every
/// gateway call (the warm-up's 100 included) is recorded as a run, and the report carries the
/// machine's steal time beside the percentiles.
#[test]
fn the_gateway_benchmark_records_every_call_it_times() {
    let dir = tempfile::tempdir().unwrap();
    let out = rein(
        dir.path(),
        &[
            "bench",
            "--gateway",
            "--requests",
            "200",
            "--clients",
            "4",
            "--rate",
            "400",
            "--json",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    for phase in ["direct", "gateway"] {
        assert_eq!(report[phase]["requests"], 200, "{report}");
        assert_eq!(report[phase]["failures"], 0, "{report}");
        assert!(
            report[phase]["p99_us"].as_u64().unwrap() >= report[phase]["p50_us"].as_u64().unwrap()
        );
        if cfg!(target_os = "linux") {
            assert!(report[phase]["cpu_steal_ms"].is_u64(), "{report}");
        }
    }
    assert_eq!(report["gateway_calls_recorded"], 300, "{report}");
    assert!(report["added_p50_us"].is_u64(), "{report}");
}

/// Every spec shipped in `examples/` (the demo's included) checks clean and draws as a
/// flowchart from the repository root, as the README and the demo tell a newcomer to run them.
#[test]
fn every_example_spec_checks_and_draws_from_the_repository_root() {
    let mut specs = Vec::new();
    for dir in ["examples", "examples/demo", "examples/orchestrator"] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".yaml") && !name.contains("script") {
                specs.push(format!("{dir}/{name}"));
            }
        }
    }
    assert!(specs.len() >= 15, "{specs:?}");
    for spec in &specs {
        let text_of = |args: &[&str]| {
            let out = rein(&repo(), args);
            let (stdout, stderr) = text(&out);
            assert_eq!(
                out.status.code(),
                Some(0),
                "rein {args:?}: {stdout}{stderr}"
            );
            stdout
        };
        let checked = text_of(&["check", spec]);
        assert!(checked.contains(": ok: "), "{spec}: {checked}");
        assert!(
            !std::fs::read_to_string(repo().join(spec))
                .unwrap()
                .contains("{{"),
            "{spec}"
        );
        let drawn = text_of(&["graph", spec]);
        assert!(drawn.starts_with("flowchart TD\n"), "{spec}: {drawn}");
    }
}

/// A run that completes after its tool call failed says so on `rein run`'s normal output:
/// the model answered without the tool, and a person reading the summary must not miss it.
#[test]
fn rein_run_names_a_tool_call_that_failed() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on: taken, then given back.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spec = std::fs::read_to_string(repo().join("examples/order-support.yaml"))
        .unwrap()
        .replace("127.0.0.1:8089", &format!("127.0.0.1:{port}"));
    std::fs::write(dir.path().join("spec.yaml"), spec).unwrap();
    let script = repo().join("examples/order-support.script.yaml");
    let args = [
        "run",
        "spec.yaml",
        "--input",
        "Where is order 42?",
        "--script",
        script.to_str().unwrap(),
    ];
    let out = rein(dir.path(), &args);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("completed (completed)"), "{stdout}");
    assert!(
        stdout.contains("tool call failed: `get_order_status` (transient): "),
        "{stdout}"
    );
}

/// A spec's worker agents are files named relative to the spec, wherever `rein` runs from.
#[test]
fn worker_spec_files_are_found_next_to_the_spec_that_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let spec = repo().join("examples/orchestrator/orchestrator.yaml");
    let script = repo().join("examples/orchestrator/script.yaml");
    let args = [
        "run",
        spec.to_str().unwrap(),
        "--input",
        "Brief me on order 42.",
        "--script",
        script.to_str().unwrap(),
        "--json",
    ];
    let out = rein(dir.path(), &args);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let outcome: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(outcome["termination_reason"], "completed", "{outcome}");
    assert_eq!(outcome["tool_calls"], 3, "{outcome}");
}
