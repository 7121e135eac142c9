//! `GET /metrics` of `rein serve`, read by the official Prometheus client's text-format parser:
//! a scripted run against the fake provider moves the counters by exactly what its event log
//! records (tokens and cost by model and step kind, calls, tool calls, the run's outcome, steps
//! and latencies), a run waiting for approval shows in the `rein_runs` gauge until it is
//! decided, and the endpoint can be closed to all but the admin key or turned off.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use rein_fakes::ToolService;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

/// $10 per million tokens in and out: 40 + 20 tokens cost $0.0006, 60 + 10 cost $0.0007.
const CONFIG: &str = r#"
[prices."openai/gpt-4o-mini"]
input = 10.0
output = 10.0

[budgets]
tenant_daily_usd = 1.0

[telemetry]
metrics_auth = "admin"

[egress]
allow = ["127.0.0.1"]
"#;

/// The admin key the servers of these tests are given (metrics by tenant are behind it).
const ADMIN: &str = "admin-key-for-the-metrics-tests-000000";

/// One scrape: each sample's value by its name and sorted labels.
struct Scrape {
    types: BTreeMap<String, String>,
    samples: BTreeMap<(String, Vec<(String, String)>), f64>,
}

impl Scrape {
    /// The sum of every sample named `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, v)| v)
            .sum()
    }
}

/// Scrapes `base/metrics` with the admin key and parses it with `prometheus_client`'s parser.
async fn scrape(http: &reqwest::Client, python: &str, base: &str) -> Scrape {
    parse(python, &exposition(http, base, Some(ADMIN)).await)
}

/// `base/metrics`, as text, checked for its content type.
async fn exposition(http: &reqwest::Client, base: &str, key: Option<&str>) -> String {
    let mut request = http.get(format!("{base}/metrics"));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let answer = request.send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert!(
        answer.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        answer.headers()
    );
    answer.text().await.unwrap()
}

/// Parses an exposition with `prometheus_client`'s parser.
fn parse(python: &str, text: &str) -> Scrape {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/prom_parse.py");
    let mut parse = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    parse
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = parse.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let types = parsed["types"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let samples = parsed["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let mut labels: Vec<(String, String)> = s[1]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            labels.sort();
            (
                (s[0].as_str().unwrap().to_string(), labels),
                s[2].as_f64().unwrap(),
            )
        })
        .collect();
    Scrape { types, samples }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_run_moves_the_counters_by_what_its_log_records() {
    let Some(python) = common::python_with_openai() else {
        return;
    };
    // A tool call (40 in, 20 out), then the answer (60 in, 10 out).
    let fake = common::paying_provider().await;
    let service = ToolService::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rein.toml"), CONFIG).unwrap();
    let key = common::tenant_key(dir.path(), "acme");
    let server = common::serve(
        dir.path(),
        &["--db", "rein.db", "--config", "rein.toml"],
        &[
            ("OPENAI_BASE_URL", fake.base_url().as_str()),
            ("OPENAI_API_KEY", "sk-operator-test"),
            ("REIN_ADMIN_KEY", ADMIN),
        ],
    );
    let base = server.base.clone();
    let http = reqwest::Client::new();
    common::register(
        &http,
        &base,
        &key,
        &common::payer_spec(&service.url(), 5, 4),
    )
    .await;
    common::register(
        &http,
        &base,
        &key,
        &common::held_spec("held", &service.url(), 5, 4),
    )
    .await;

    let before = scrape(&http, &python, &base).await;

    let run = common::run_waiting(
        &http,
        &base,
        &key,
        json!({"agent": "payer", "input": "pay order 1"}),
        &[],
    )
    .await;
    assert_eq!(run["status"], "completed", "{run}");
    let id = run["run_id"].as_str().unwrap();
    let after = scrape(&http, &python, &base).await;
    assert_eq!(after.types["rein_model_tokens"], "counter");
    assert_eq!(after.types["rein_model_latency_seconds"], "histogram");
    assert_eq!(after.types["rein_budget_utilisation_ratio"], "gauge");
    let moved =
        |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);

    // What the log says, step by step: each answered call's model, kind, tokens and cost.
    let trace = common::get_json(&http, &format!("{base}/v1/runs/{id}/trace"), &key).await;
    let events = trace["events"].as_array().unwrap();
    let kinds: BTreeMap<u64, String> = events
        .iter()
        .filter(|e| e["kind"] == "model_requested")
        .map(|e| {
            let p = &e["payload"];
            (
                p["step"].as_u64().unwrap(),
                p["step_kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let responded: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "model_responded")
        .map(|e| &e["payload"])
        .collect();
    assert_eq!(responded.len(), 2, "{trace}");
    let mut total_micros = 0.0;
    for answer in &responded {
        let kind = &kinds[&answer["step"].as_u64().unwrap()];
        let model = answer["model"].as_str().unwrap();
        let labels = |t: &'static str| {
            [
                ("tenant", "acme"),
                ("agent", "payer"),
                ("model", model),
                ("kind", kind.as_str()),
                ("type", t),
            ]
        };
        for (t, field) in [("input", "input_tokens"), ("output", "output_tokens")] {
            assert_eq!(
                moved("rein_model_tokens_total", &labels(t)),
                answer["usage"][field].as_f64().unwrap(),
                "{t} tokens of the {kind} step"
            );
        }
        total_micros += answer["cost"].as_f64().unwrap();
    }
    let acme = [("tenant", "acme"), ("agent", "payer")];
    // The figures the fake and the prices make: 100 in, 30 out, $0.0013.
    assert_eq!(
        moved(
            "rein_model_tokens_total",
            &[&acme[..], &[("type", "input")]].concat()
        ),
        100.0
    );
    assert_eq!(
        moved(
            "rein_model_tokens_total",
            &[&acme[..], &[("type", "output")]].concat()
        ),
        30.0
    );
    assert_eq!(total_micros, 1_300.0, "{trace}");
    assert_eq!(
        moved("rein_model_cost_micro_usd_total", &acme),
        total_micros
    );
    assert_eq!(
        moved(
            "rein_model_calls_total",
            &[&acme[..], &[("outcome", "responded")]].concat()
        ),
        2.0
    );
    assert_eq!(moved("rein_runs_started_total", &acme), 1.0);
    assert_eq!(
        moved(
            "rein_runs_finished_total",
            &[
                &acme[..],
                &[("status", "completed"), ("reason", "completed")]
            ]
            .concat()
        ),
        1.0
    );
    assert_eq!(
        moved(
            "rein_tool_calls_total",
            &[&acme[..], &[("tool", "pay"), ("status", "success")]].concat()
        ),
        1.0
    );
    assert_eq!(
        moved(
            "rein_model_latency_seconds_count",
            &[("model", "openai/gpt-4o-mini")]
        ),
        2.0
    );
    assert_eq!(
        moved("rein_tool_latency_seconds_count", &[("tool", "pay")]),
        1.0
    );
    assert_eq!(moved("rein_run_steps_count", &[("agent", "payer")]), 1.0);
    assert_eq!(moved("rein_run_steps_sum", &[("agent", "payer")]), 2.0);
    assert_eq!(
        moved("rein_run_cost_usd_sum", &[("agent", "payer")]),
        0.0013
    );
    // $0.0013 of the tenant's $1 daily budget.
    let used = after.sum(
        "rein_budget_utilisation_ratio",
        &[
            ("tenant", "acme"),
            ("scope", "tenant_daily"),
            ("limit", "usd"),
        ],
    );
    assert!((used - 0.0013).abs() < 1e-9, "{used}");

    // A run held for approval is counted as such until it is decided.
    let held = common::run_waiting(
        &http,
        &base,
        &key,
        json!({"agent": "held", "input": "pay order 2"}),
        &[],
    )
    .await;
    assert_eq!(held["status"], "awaiting_approval", "{held}");
    let waiting = scrape(&http, &python, &base).await;
    let gauge = [("tenant", "acme"), ("status", "awaiting_approval")];
    assert_eq!(waiting.sum("rein_runs", &gauge), 1.0);
    assert_eq!(
        waiting.sum(
            "rein_approvals_requested_total",
            &[("agent", "held"), ("tool", "pay")]
        ),
        1.0
    );
    let decided = http
        .post(format!(
            "{base}/v1/runs/{}/approval",
            held["run_id"].as_str().unwrap()
        ))
        .bearer_auth(&key)
        .json(&json!({"approved": true, "by": "ops"}))
        .send()
        .await
        .unwrap();
    assert_eq!(decided.status(), 200);
    let done = scrape(&http, &python, &base).await;
    assert_eq!(done.sum("rein_runs", &gauge), 0.0);
    assert_eq!(
        done.sum(
            "rein_approvals_decided_total",
            &[("agent", "held"), ("decision", "approved")]
        ),
        1.0
    );
    assert_eq!(
        done.sum("rein_runs_finished_total", &[("status", "completed")]),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_closed_to_all_but_the_admin_key_or_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rein.toml"),
        "[telemetry]\nmetrics_auth = \"admin\"\n",
    )
    .unwrap();
    let admin = "a".repeat(40);
    let tenant = common::tenant_key(dir.path(), "acme");
    let server = common::serve(
        dir.path(),
        &["--db", "rein.db", "--config", "rein.toml"],
        &[("REIN_ADMIN_KEY", admin.as_str())],
    );
    let http = reqwest::Client::new();
    let url = format!("{}/metrics", server.base);
    let anonymous = http.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let as_tenant = http.get(&url).bearer_auth(&tenant).send().await.unwrap();
    assert_eq!(as_tenant.status(), 401);
    let as_admin = http.get(&url).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(as_admin.status(), 200);
    assert!(
        as_admin.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    drop(server);

    std::fs::write(
        dir.path().join("rein.toml"),
        "[telemetry]\nmetrics = false\n",
    )
    .unwrap();
    let server = common::serve(
        dir.path(),
        &["--db", "rein.db", "--config", "rein.toml"],
        &[],
    );
    let off = http
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(off.status(), 404);
    let problem: Value = off.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("metrics = false"),
        "{problem}"
    );
    drop(server);

    // A value that is not one of the choices stops the server at start, naming the field.
    std::fs::write(
        dir.path().join("rein.toml"),
        "[telemetry]\nmetrics_auth = \"everyone\"\n",
    )
    .unwrap();
    let refused = common::rein(
        dir.path(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            "rein.db",
            "--config",
            "rein.toml",
        ],
    );
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("metrics_auth") && stderr.contains("everyone"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_open_to_anyone_name_no_tenant() {
    let Some(python) = common::python_with_openai() else {
        return;
    };
    let fake = common::paying_provider().await;
    let service = ToolService::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let open = CONFIG.replace("metrics_auth = \"admin\"", "metrics_auth = \"none\"");
    std::fs::write(dir.path().join("rein.toml"), open).unwrap();
    let key = common::tenant_key(dir.path(), "acme-secretive");
    let server = common::serve(
        dir.path(),
        &["--db", "rein.db", "--config", "rein.toml"],
        &[("OPENAI_BASE_URL", fake.base_url().as_str())],
    );
    let http = reqwest::Client::new();
    let spec =
        common::payer_spec(&service.url(), 5, 4).replace("name: payer", "name: payer-private");
    common::register(&http, &server.base, &key, &spec).await;
    let run = common::run_waiting(
        &http,
        &server.base,
        &key,
        json!({"agent": "payer-private", "input": "pay order 1"}),
        &[],
    )
    .await;
    assert_eq!(run["status"], "completed", "{run}");
    let text = exposition(&http, &server.base, None).await;
    assert!(!text.contains("acme-secretive"), "{text}");
    assert!(!text.contains("payer-private"), "{text}");
    assert!(
        !text.contains("tenant=") && !text.contains("breaker="),
        "{text}"
    );
    assert!(!text.contains("rein_budget_utilisation_ratio{"), "{text}");
    let scrape = parse(&python, &text);
    assert_eq!(scrape.sum("rein_runs_started_total", &[]), 1.0);
    assert_eq!(
        scrape.sum("rein_model_tokens_total", &[("type", "input")]),
        100.0
    );
}
