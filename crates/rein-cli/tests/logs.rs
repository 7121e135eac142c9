//! `rein serve`'s logs: with `REIN_LOG_FORMAT=json` every line is a JSON object, and each run it
//! drives is logged when it stops with its run id and trace id at the top level, so a log search
//! leads to `rein runs show` and to the trace.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use serde_json::{Value, json};
use std::time::{Duration, Instant};

const AGENT: &str = "name: hello\nversion: 1\nmodel: {primary: openai/gpt-4o-mini}\ninstructions: Greet.\nlimits: {max_iterations: 2, max_total_tokens: 10000, max_cost_usd: 0.1}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_run_and_trace_ids_of_each_run() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("script.yaml"),
        "responses:\n  - text: hello\n",
    )
    .unwrap();
    let key = common::tenant_key(dir.path(), "acme");
    let server = common::serve(
        dir.path(),
        &["--script", "script.yaml", "--db", "rein.db"],
        &[("REIN_LOG_FORMAT", "json")],
    );
    let http = reqwest::Client::new();
    common::register(&http, &server.base, &key, AGENT).await;
    let run = common::run_waiting(
        &http,
        &server.base,
        &key,
        json!({"agent": "hello", "input": "hi"}),
        &[],
    )
    .await;
    assert_eq!(run["status"], "completed", "{run}");
    let id = run["run_id"].as_str().unwrap();
    let trace_id: String = id.chars().filter(|c| *c != '-').collect();

    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let logs = server.logs.lock().unwrap().clone();
        // Every line the server wrote since it started listening is one JSON object.
        let parsed: Vec<Value> = logs
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        if let Some(found) = parsed.into_iter().find(|l| l["run_id"] == id) {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "no log line for run {id}: {logs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(line["message"], "run ended", "{line}");
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["trace_id"], trace_id.as_str(), "{line}");
    assert_eq!(line["tenant"], "acme", "{line}");
    assert_eq!(line["status"], "completed", "{line}");
    assert_eq!(line["reason"], "completed", "{line}");
    assert!(line["timestamp"].is_string(), "{line}");
}

/// A log format that is neither `text` nor `json` stops the server at start, by name.
#[test]
fn an_unknown_log_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::rein_command(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--db", "rein.db"])
        .env("REIN_LOG_FORMAT", "yaml")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("REIN_LOG_FORMAT=yaml"), "{stderr}");
}
