//! `GET /openapi.json` of the server (in this test's process): an OpenAPI 3.1 document that a real
//! validator accepts, that lists every endpoint of the API with its answers, and whose every
//! operation is served (each one, called without a key, is refused as unauthorised rather than
//! missing).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use serde_json::Value;
use std::io::Write;
use std::process::{Command, Stdio};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_every_endpoint_served() {
    let server = common::serve("responses:\n  - text: unused\n").await;
    let http = reqwest::Client::new();
    let answer = http
        .get(format!("{}/openapi.json", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["content-type"], "application/json");
    let text = answer.text().await.unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");

    // The operations and the statuses each documents: a change to the API shows here.
    let mut operations = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let statuses: Vec<&str> = operation["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            operations.push(format!(
                "{} {path} -> {}",
                method.to_uppercase(),
                statuses.join(" ")
            ));
            // Every answer, errors included, names its request.
            for (status, response) in operation["responses"].as_object().unwrap() {
                assert!(
                    response["headers"]["X-Request-Id"]["schema"]["type"] == "string",
                    "{method} {path} {status}: {response}"
                );
            }
            // Every /v1 operation says how it authenticates and what its errors look like.
            if path.starts_with("/v1/") {
                let scheme = if path.starts_with("/v1/admin/") {
                    "admin_key"
                } else {
                    "tenant_key"
                };
                assert!(
                    operation["security"][0][scheme].is_array(),
                    "{method} {path}: {}",
                    operation["security"]
                );
                assert_eq!(
                    operation["responses"]["401"]["content"]["application/problem+json"]["schema"]
                        ["$ref"],
                    "#/components/schemas/ProblemView"
                );
            }
        }
    }
    operations.sort();
    let expected = [
        "DELETE /v1/admin/tenants/{name}/keys/{id} -> 204 401 403 404 default",
        "GET /healthz -> 200",
        "GET /metrics -> 200 401 404",
        "GET /readyz -> 200 503",
        "GET /v1/admin/log -> 200 400 401 403 404 default",
        "GET /v1/admin/tenants -> 200 401 403 default",
        "GET /v1/admin/tenants/{name}/keys -> 200 401 403 404 default",
        "GET /v1/agents -> 200 401 default",
        "GET /v1/audit/verify -> 200 400 401 404 default",
        "GET /v1/costs -> 200 400 401 default",
        "GET /v1/models -> 200 401 default",
        "GET /v1/runs -> 200 400 401 404 default",
        "GET /v1/runs/{id} -> 200 401 404 default",
        "GET /v1/runs/{id}/events -> 200 400 401 404 default",
        "GET /v1/runs/{id}/trace -> 200 401 404 default",
        "POST /v1/admin/tenants -> 200 201 401 403 422 default",
        "POST /v1/admin/tenants/{name}/keys -> 201 401 403 404 422 default",
        "POST /v1/agents -> 201 401 413 422 default",
        "POST /v1/chat/completions -> 200 400 401 404 422 429 502 503 504 default",
        "POST /v1/runs -> 200 202 401 404 415 422 429 default",
        "POST /v1/runs/{id}/approval -> 200 401 404 409 default",
        "POST /v1/runs/{id}/cancel -> 200 202 401 404 409 default",
    ];
    assert_eq!(operations, expected);

    // The answers are typed: a run's fields are in the document.
    let run = &doc["components"]["schemas"]["RunView"]["properties"];
    for field in [
        "run_id",
        "status",
        "termination_reason",
        "usage",
        "cost_micros",
    ] {
        assert!(run[field].is_object(), "RunView.{field}: {run}");
    }
    assert_eq!(
        doc["paths"]["/v1/runs"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/NewRun"
    );

    // Every documented operation is served: without a key, each is 401, never 404 or 405.
    let admin_off = [403];
    for line in &operations {
        let (method, rest) = line.split_once(' ').unwrap();
        let path = rest.split_once(" -> ").unwrap().0;
        if !path.starts_with("/v1/") {
            continue;
        }
        let url = format!(
            "{}{}",
            server.base,
            path.replace("{id}", "x").replace("{name}", "x")
        );
        let status = http
            .request(method.parse().unwrap(), &url)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if path.starts_with("/v1/admin/") {
            assert!(admin_off.contains(&status), "{method} {path}: {status}");
        } else {
            assert_eq!(status, 401, "{method} {path}");
        }
    }

    // A real OpenAPI 3.1 validator accepts it.
    let Some(python) = common::python_with_openai() else {
        return;
    };
    let mut check = Command::new(python)
        .args([
            "-c",
            "import json, sys\nfrom openapi_spec_validator import validate\nvalidate(json.load(sys.stdin))\nprint('valid')",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("valid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The schema `doc` gives the answer of `method path` with `status` (JSON or the event
/// stream), able to resolve the document's own `#/components/...` references.
fn answer_schema(doc: &Value, method: &str, path: &str, status: u16, content: &str) -> Value {
    let mut schema = doc["paths"][path][method]["responses"][status.to_string()]["content"]
        [content]["schema"]
        .clone();
    assert!(
        schema.is_object(),
        "{method} {path} {status} {content}: no schema"
    );
    schema["components"] = doc["components"].clone();
    schema
}

/// Checks `answer` against the schema the document gives it; every disagreement, named.
fn conforms(doc: &Value, (method, path, status, content): (&str, &str, u16, &str), answer: &Value) {
    let schema = answer_schema(doc, method, path, status, content);
    let validator = jsonschema::draft202012::new(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(answer)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {status}: the answer disagrees with the document: {errors:?}\n{answer}"
    );
}

/// Real answers, checked against what the document says of them: a run queued, waited for,
/// replayed, shown and listed; its events as the stream sends them; its trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_answers_match_the_openapi_document() {
    let server = common::serve(
        "responses:\n  - tool_calls: [{name: clock, arguments: {}}]\n  - text: It is late.\n",
    )
    .await;
    let key = server.key.clone();
    let http = reqwest::Client::new();
    let base = &server.base;
    let doc: Value = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let spec = "name: clock\nversion: 1\nmodel: {primary: openai/gpt-4o-mini}\ninstructions: Tell the time.\ntools:\n  - name: clock\n    source: {builtin: current_time}\n    contract: {timeout: 5s, side_effects: none}\nlimits: {max_iterations: 4, max_total_tokens: 20000, max_cost_usd: 0.10}\n";
    common::register(&http, base, &key, spec).await;
    let json = "application/json";
    let post = |body: Value, idempotency: Option<&'static str>| {
        let mut request = http
            .post(format!("{base}/v1/runs"))
            .bearer_auth(&key)
            .json(&body);
        if let Some(k) = idempotency {
            request = request.header("Idempotency-Key", k);
        }
        async move {
            let answer = request.send().await.unwrap();
            let status = answer.status().as_u16();
            (status, answer.json::<Value>().await.unwrap())
        }
    };
    let waited = serde_json::json!({"agent": "clock", "input": "time?", "wait": true});
    let (status, first) = post(waited.clone(), Some("k1")).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["output"], "It is late.");
    conforms(&doc, ("post", "/v1/runs", 200, json), &first);
    let (status, replayed) = post(waited, Some("k1")).await;
    assert_eq!(status, 200, "{replayed}");
    conforms(&doc, ("post", "/v1/runs", 200, json), &replayed);
    let (status, queued) = post(
        serde_json::json!({"agent": "clock", "input": "later"}),
        None,
    )
    .await;
    assert_eq!(status, 202, "{queued}");
    conforms(&doc, ("post", "/v1/runs", 202, json), &queued);

    let id = first["run_id"].as_str().unwrap();
    let shown = common::get_json(&http, &format!("{base}/v1/runs/{id}"), &key).await;
    conforms(&doc, ("get", "/v1/runs/{id}", 200, json), &shown);
    let listed = common::get_json(&http, &format!("{base}/v1/runs"), &key).await;
    conforms(&doc, ("get", "/v1/runs", 200, json), &listed);
    let trace = common::get_json(&http, &format!("{base}/v1/runs/{id}/trace"), &key).await;
    conforms(&doc, ("get", "/v1/runs/{id}/trace", 200, json), &trace);
    let stream = http
        .get(format!("{base}/v1/runs/{id}/events"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut events = 0;
    for data in stream.lines().filter_map(|l| l.strip_prefix("data:")) {
        let event: Value = serde_json::from_str(data.trim()).unwrap();
        conforms(
            &doc,
            ("get", "/v1/runs/{id}/events", 200, "text/event-stream"),
            &event,
        );
        events += 1;
    }
    assert!(events >= 5, "{stream}");
    let missing = http
        .get(format!("{base}/v1/runs/nope"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let problem: Value = missing.json().await.unwrap();
    conforms(
        &doc,
        ("get", "/v1/runs/{id}", 404, "application/problem+json"),
        &problem,
    );
}
