//! The HTTP API served in this test's own process: `rein_server::Server` over a fresh SQLite
//! store, on a port of its own, driven with a real HTTP client. What needs the `rein` binary
//! itself (signals, crashes, logs on standard error) is tested in `rein-cli`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{SPEC, serve};
use serde_json::json;

#[tokio::test]
async fn a_registered_agent_runs_to_completion_and_its_log_verifies() {
    let api = serve("responses:\n  - text: Hello from the script.\n").await;
    let (status, _, agent) = api
        .call(
            reqwest::Method::POST,
            "/v1/agents",
            Some(("application/yaml", SPEC.into())),
        )
        .await;
    assert_eq!(status, 201, "{agent}");
    assert_eq!(agent["version"], 1, "{agent}");

    let body = json!({"agent": "helper", "input": "Hi", "wait": true}).to_string();
    let (status, _, run) = api
        .call(
            reqwest::Method::POST,
            "/v1/runs",
            Some(("application/json", body)),
        )
        .await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["output"], "Hello from the script.", "{run}");
    let id = run["run_id"].as_str().unwrap();

    let (status, _, shown) = api
        .call(reqwest::Method::GET, &format!("/v1/runs/{id}"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(shown["termination_reason"], "completed", "{shown}");

    let (status, _, audit) = api
        .call(
            reqwest::Method::GET,
            &format!("/v1/audit/verify?run={id}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{audit}");
    assert_eq!(audit["ok"], true, "{audit}");
}

#[tokio::test]
async fn errors_are_problem_json_with_a_reason() {
    let api = serve("responses:\n  - text: unused\n").await;
    // No key: 401, and the client is told how to authenticate.
    let response = api
        .client
        .get(format!("{}/v1/runs", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");

    let (status, content_type, problem) = api.call(reqwest::Method::GET, "/v1/nowhere", None).await;
    assert_eq!(status, 404);
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(problem["status"], 404, "{problem}");

    // Another tenant's run, or none at all: not found, the same either way.
    let (status, _, problem) = api
        .call(
            reqwest::Method::GET,
            "/v1/runs/01a2520e-0000-7000-8000-000000000000",
            None,
        )
        .await;
    assert_eq!(status, 404, "{problem}");

    // A spec that does not check: 422, naming the field.
    let (status, _, problem) = api
        .call(
            reqwest::Method::POST,
            "/v1/agents",
            Some((
                "application/yaml",
                SPEC.replace("max_iterations: 3", "max_iterations: many"),
            )),
        )
        .await;
    assert_eq!(status, 422, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("limits.max_iterations"),
        "{problem}"
    );

    // A run of an agent nobody registered.
    let body = json!({"agent": "ghost", "input": "Hi"}).to_string();
    let (status, _, problem) = api
        .call(
            reqwest::Method::POST,
            "/v1/runs",
            Some(("application/json", body)),
        )
        .await;
    assert_eq!(status, 404, "{problem}");
}
