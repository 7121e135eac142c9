//! The HTTP API served in this test's own process: `rein_server::Server` over a fresh SQLite
//! store, on a port of its own, driven with a real HTTP client. What needs the `rein` binary
//! itself (signals, crashes, logs on standard error) is tested in `rein-cli`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rein_app::config::Config;
use rein_core::TenantId;
use rein_providers::{Model, ScriptedModel};
use rein_server::{Parts, Server};
use rein_tools::Builtins;
use serde_json::{Value, json};
use std::sync::Arc;

/// A running server and what a test needs to call it.
struct Api {
    base: String,
    key: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.server.abort();
    }
}

const SPEC: &str = "name: helper
version: 1
model: {primary: openai/gpt-4o-mini, max_output_tokens: 64}
instructions: Answer briefly.
limits: {max_iterations: 3, max_total_tokens: 5000, max_cost_usd: 0.05}
";

/// Serves the API with two workers on 127.0.0.1, port 0, answering every model call from
/// `script`, with the tenant `acme` and a key for it.
async fn serve(script: &str) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rein.db");
    let store = rein_app::wiring::open_store(db.to_str().unwrap())
        .await
        .unwrap();
    let config = Config::default();
    let builtins = Builtins::standard();
    let http = rein_app::wiring::http_client().unwrap();
    let runtime = rein_app::wiring::runtime_for(&config, &store, builtins.clone(), http)
        .await
        .unwrap()
        .with_workers(rein_app::workers::WorkerSpecs::registered_only(
            &config,
            &store,
            builtins.clone(),
        ))
        .with_unrecorded_trust(rein_core::Trust::Tenant);
    let tenant = TenantId::new("acme");
    store.create_tenant(&tenant, 0, "test").await.unwrap();
    let (key, _) = rein_app::admin::add_key(store.as_ref(), &tenant, None, "test")
        .await
        .unwrap()
        .unwrap();
    let model: Arc<dyn Model> = Arc::new(ScriptedModel::parse("script.yaml", script).unwrap());
    let server = Server::new(Parts {
        config,
        store,
        runtime,
        builtins,
        model,
        admin_key_sha256: None,
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        server
            .run(listener, 2, std::future::pending())
            .await
            .unwrap();
    });
    Api {
        base,
        key,
        client: reqwest::Client::new(),
        _dir: dir,
        server,
    }
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, String)>,
    ) -> (u16, String, Value) {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some((content_type, body)) = body {
            request = request.header("content-type", content_type).body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let text = response.text().await.unwrap();
        (
            status,
            content_type,
            serde_json::from_str(&text).unwrap_or(Value::Null),
        )
    }
}

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
