//! In-process servers for the API tests: `rein_server::Server` over a fresh SQLite store in a
//! temporary directory, on 127.0.0.1 port 0, with a tenant and a key.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rein_app::config::Config;
use rein_core::TenantId;
use rein_providers::{Model, ScriptedModel};
use rein_server::{Parts, Server};
use rein_tools::Builtins;
use serde_json::Value;
use std::sync::Arc;

/// A running server and what a test needs to call it.
pub struct Api {
    pub base: String,
    pub key: String,
    pub client: reqwest::Client,
    _dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub const SPEC: &str = "name: helper
version: 1
model: {primary: openai/gpt-4o-mini, max_output_tokens: 64}
instructions: Answer briefly.
limits: {max_iterations: 3, max_total_tokens: 5000, max_cost_usd: 0.05}
";

/// Serves the API with two workers on 127.0.0.1, port 0, answering every model call from
/// `script`, with the tenant `acme` and a key for it.
pub async fn serve(script: &str) -> Api {
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
    pub async fn call(
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

/// The path in the environment variable `var`, which `scripts/test` sets to a tool it set up;
/// `None` to skip where it is not set up, unless `REIN_TEST_PYTHON_REQUIRED=1` (as
/// `scripts/test` sets) makes its absence a failure.
pub fn set_up_by_scripts_test(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            assert!(
                std::env::var("REIN_TEST_PYTHON_REQUIRED").as_deref() != Ok("1"),
                "REIN_TEST_PYTHON_REQUIRED=1 but {var} is not set: scripts/test sets it up"
            );
            eprintln!("skipped: scripts/test sets up {var}");
            None
        }
    }
}

/// A Python with `openapi-spec-validator` (`REIN_TEST_PYTHON`, which `scripts/test` sets up).
pub fn python_with_openai() -> Option<String> {
    set_up_by_scripts_test("REIN_TEST_PYTHON")
}

/// `GET url` with `key`, as JSON.
pub async fn get_json(http: &reqwest::Client, url: &str, key: &str) -> Value {
    http.get(url)
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Registers `spec` as an agent of `key`'s tenant (201).
pub async fn register(http: &reqwest::Client, base: &str, key: &str, spec: &str) {
    let registered = http
        .post(format!("{base}/v1/agents"))
        .bearer_auth(key)
        .body(spec.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);
}
