//! `rein serve` as a process, driven over HTTP: tenants and keys, agent registration, runs
//! (queued and waited for), their events over Server-Sent Events (resumed with
//! `Last-Event-ID`), traces, tenant isolation (404, never 403) and problem+json answers to bad
//! requests that change nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use rein_fakes::ToolService;
use serde_json::{Value, json};
use std::path::Path;

const SCRIPT: &str = r#"
responses:
  - tool_calls: [{name: pay, arguments: {n: 1}}]
  - text: paid
"#;

fn rein(dir: &Path, args: &[&str]) -> String {
    common::rein_ok(dir, args)
}

fn serve(dir: &Path) -> common::Server {
    common::open_loopback(dir);
    common::serve(dir, &["--script", "script.yaml", "--db", "rein.db"], &[])
}

/// SSE frames of a finished stream: (id, event, data).
fn frames(body: &str) -> Vec<(u64, String, Value)> {
    body.split("\n\n")
        .filter_map(|frame| {
            let mut id = None;
            let mut event = None;
            let mut data = None;
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = serde_json::from_str(v.trim()).ok();
                }
            }
            Some((id?, event?, data?))
        })
        .collect()
}

/// Queues a run of the `payer` agent with `input`; its id.
async fn queue_payment(http: &reqwest::Client, base: &str, key: &str, input: &str) -> String {
    let created: Value = http
        .post(format!("{base}/v1/runs"))
        .bearer_auth(key)
        .json(&json!({"agent": "payer", "input": input}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["run_id"].as_str().unwrap().to_string()
}

/// Waits, 10 s at most, until the run's log holds a `tool_requested` event: its payment is
/// being made.
async fn until_paying(http: &reqwest::Client, base: &str, key: &str, id: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let trace = common::get_json(http, &format!("{base}/v1/runs/{id}/trace"), key).await;
        if trace["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "tool_requested")
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the payment never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Waits, 10 s at most, until the run is no longer running (a cancelled run ends after the step
/// in flight), and returns its trace.
async fn until_stopped(http: &reqwest::Client, base: &str, key: &str, id: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let trace = common::get_json(http, &format!("{base}/v1/runs/{id}/trace"), key).await;
        if trace["run"]["status"] != "running" {
            return trace;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run never stopped"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_drives_runs_streams_events_and_keeps_tenants_apart() {
    let service = ToolService::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("script.yaml"), SCRIPT).unwrap();
    rein(
        dir.path(),
        &["tenants", "create", "acme", "--db", "rein.db"],
    );
    rein(
        dir.path(),
        &["tenants", "create", "rival", "--db", "rein.db"],
    );
    let key_a = rein(
        dir.path(),
        &["keys", "create", "--tenant", "acme", "--db", "rein.db"],
    );
    let key_b = rein(
        dir.path(),
        &["keys", "create", "--tenant", "rival", "--db", "rein.db"],
    );
    let (key_a, key_b) = (key_a.trim(), key_b.trim());
    assert!(key_a.starts_with("rein_") && key_a.len() == 69, "{key_a}");
    let server = serve(dir.path());
    let base = server.base.clone();
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{base}{path}");

    // Register the agent, then start a run and stream its events until it finishes.
    let registered = http
        .post(url("/v1/agents"))
        .bearer_auth(key_a)
        .header("content-type", "application/yaml")
        .body(common::payer_spec(&service.url(), 5, 4))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);
    let registered: Value = registered.json().await.unwrap();
    assert_eq!(registered, json!({"name": "payer", "version": 1}));

    let created = http
        .post(url("/v1/runs"))
        .bearer_auth(key_a)
        .json(&json!({"agent": "payer", "input": "pay order 7", "user": "u1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 202);
    let created: Value = created.json().await.unwrap();
    let run_id = created["run_id"].as_str().unwrap().to_string();

    let events = http
        .get(url(&format!("/v1/runs/{run_id}/events")))
        .bearer_auth(key_a)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    assert!(
        events.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let all = frames(&events.text().await.unwrap());
    let ids: Vec<u64> = all.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(
        ids,
        (0..all.len() as u64).collect::<Vec<_>>(),
        "every event, in order"
    );
    assert_eq!(all[0].1, "run_started");
    assert_eq!(all.last().unwrap().1, "run_finished");
    assert_eq!(all.last().unwrap().2["payload"]["status"], "completed");
    assert!(all.iter().any(|(_, kind, _)| kind == "tool_result"));
    assert_eq!(service.applied().get(&format!("{run_id}:2")), Some(&1));

    // Reconnecting after event 2 gets only the rest.
    let resumed = http
        .get(url(&format!("/v1/runs/{run_id}/events")))
        .bearer_auth(key_a)
        .header("last-event-id", "2")
        .send()
        .await
        .unwrap();
    let rest = frames(&resumed.text().await.unwrap());
    assert_eq!(
        rest.iter().map(|(id, _, _)| *id).collect::<Vec<_>>(),
        (3..all.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(rest, all[3..]);

    // The trace holds the same events, and the run its outcome.
    let trace: Value =
        common::get_json(&http, &url(&format!("/v1/runs/{run_id}/trace")), key_a).await;
    assert_eq!(trace["events"].as_array().unwrap().len(), all.len());
    assert_eq!(trace["run"]["status"], "completed");
    assert!(trace["tree"].as_str().unwrap().contains("pay"));

    // A run waited for answers as `rein run --json` prints it.
    let waited = http
        .post(url("/v1/runs"))
        .bearer_auth(key_a)
        .json(&json!({"agent": "payer", "input": "pay order 8", "wait": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(waited.status(), 200);
    let waited: Value = waited.json().await.unwrap();
    assert_eq!(waited["status"], "completed");
    assert_eq!(waited["output"], "paid");
    assert_eq!(waited["tool_calls"], 1);

    let listed: Value =
        common::get_json(&http, &url("/v1/runs?status=completed&user=u1"), key_a).await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["run_id"], run_id.as_str());

    // Another tenant learns nothing: every run endpoint is 404, its listings are empty, and it
    // cannot run the first tenant's agent.
    for path in ["", "/events", "/trace"] {
        let r = http
            .get(url(&format!("/v1/runs/{run_id}{path}")))
            .bearer_auth(key_b)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    let r = http
        .post(url(&format!("/v1/runs/{run_id}/approval")))
        .bearer_auth(key_b)
        .json(&json!({"approved": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .post(url("/v1/runs"))
        .bearer_auth(key_b)
        .json(&json!({"agent": "payer", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    for path in ["/v1/runs", "/v1/agents"] {
        let r: Value = common::get_json(&http, &url(path), key_b).await;
        assert_eq!(r, json!([]), "{path}");
    }

    // No key, or a wrong one: 401.
    let r = http.get(url("/v1/runs")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(url("/v1/runs"))
        .bearer_auth("rein_not-a-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["content-type"], "application/problem+json");

    // Bad requests: each gets its own 4xx as problem+json, and no run is created.
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let huge = json!({"agent": "payer", "input": "x".repeat(2 << 20)}).to_string();
    let cases: Vec<(&str, &str, String, u16)> = vec![
        (
            "invalid JSON",
            "application/json",
            "{\"agent\": ".into(),
            400,
        ),
        (
            "wrong type",
            "application/json",
            json!({"agent": "payer", "input": 7}).to_string(),
            422,
        ),
        (
            "unknown field",
            "application/json",
            json!({"agent": "payer", "input": "x", "budget": 9}).to_string(),
            422,
        ),
        (
            "wrong content type",
            "text/plain",
            json!({"agent": "payer", "input": "x"}).to_string(),
            415,
        ),
        ("huge body", "application/json", huge, 413),
        ("deep nesting", "application/json", deep, 400),
        (
            "unknown agent",
            "application/json",
            json!({"agent": "nobody", "input": "x"}).to_string(),
            404,
        ),
        (
            "oversize id",
            "application/json",
            json!({"agent": "payer", "input": "x", "user": "u".repeat(300)}).to_string(),
            422,
        ),
    ];
    let before: Value = common::get_json(&http, &url("/v1/runs?limit=1000"), key_a).await;
    // A connection per request: after a 413 the server closes the connection it stopped
    // reading, and a pooled client could send the next case down it.
    let unpooled = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for (name, content_type, body, status) in cases {
        let r = unpooled
            .post(url("/v1/runs"))
            .bearer_auth(key_a)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await;
        let r = match r {
            Ok(r) => r,
            // The server answers 413 as soon as the limit is crossed and closes the
            // connection; a client still sending the rest may see the reset instead of the
            // answer. Either way nothing was stored (checked below).
            Err(e) if name == "huge body" && e.is_request() => continue,
            Err(e) => panic!("{name}: {e:?}"),
        };
        assert_eq!(r.status().as_u16(), status, "{name}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{name}"
        );
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["status"], status, "{name}");
        assert!(!problem["detail"].as_str().unwrap().is_empty(), "{name}");
    }
    let after: Value = common::get_json(&http, &url("/v1/runs?limit=1000"), key_a).await;
    assert_eq!(before, after, "bad requests change nothing");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_cancelled_between_steps_and_only_by_its_tenant() {
    let service = ToolService::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("script.yaml"), SCRIPT).unwrap();
    let key_a = common::tenant_key(dir.path(), "acme");
    let key_b = common::tenant_key(dir.path(), "rival");
    let server = serve(dir.path());
    let base = server.base.clone();
    let url = |path: &str| format!("{base}{path}");
    let http = reqwest::Client::new();
    // The payment takes 1.5 s: long enough to cancel the run while it is made.
    common::register(
        &http,
        &base,
        &key_a,
        &common::payer_spec(&service.url(), 1500, 4),
    )
    .await;
    let id = queue_payment(&http, &base, &key_a, "pay order 9").await;
    let kinds = |trace: &Value| -> Vec<String> {
        trace["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_string())
            .collect()
    };
    until_paying(&http, &base, &key_a, &id).await;

    // Another tenant's cancel is a 404, and changes nothing.
    let cancel = |key: String| {
        let (http, url) = (http.clone(), url(&format!("/v1/runs/{id}/cancel")));
        async move { http.post(url).bearer_auth(key).send().await.unwrap() }
    };
    assert_eq!(cancel(key_b.clone()).await.status(), 404);
    let asked = cancel(key_a.clone()).await;
    assert_eq!(asked.status(), 202);

    // The payment in flight finishes and is recorded; the run then ends, cancelled, without
    // another model call.
    let trace_a = until_stopped(&http, &base, &key_a, &id).await;
    assert_eq!(trace_a["run"]["status"], "cancelled", "{trace_a}");
    assert_eq!(trace_a["run"]["termination_reason"], "cancelled");
    assert_eq!(
        trace_a["run"]["detail"], "cancelled by api:acme while it ran",
        "the log says who cancelled it"
    );
    let kinds = kinds(&trace_a);
    let n = kinds.len();
    assert_eq!(kinds[n - 2..], ["tool_result", "run_finished"], "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| *k == "model_requested").count(), 1);
    assert_eq!(service.applied().values().sum::<usize>(), 1);
    // An ended run cannot be cancelled again.
    let again = cancel(key_a.clone()).await;
    assert_eq!(again.status(), 409);
    let problem: Value = again.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("already ended"),
        "{problem}"
    );
    let audit: Value = common::get_json(&http, &url("/v1/audit/verify"), &key_a).await;
    assert_eq!(audit["ok"], true, "{audit}");
}

/// A client that retries `POST /v1/runs` with the same `Idempotency-Key` (its first answer was
/// lost, say) gets the run the first request made, never a second run: one after another or
/// racing. The key is the tenant's own, a different request under it is refused, and a
/// malformed key changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_run_request_with_an_idempotency_key_makes_one_run() {
    let service = ToolService::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("script.yaml"), SCRIPT).unwrap();
    let key_a = common::tenant_key(dir.path(), "acme");
    let key_b = common::tenant_key(dir.path(), "rival");
    let server = serve(dir.path());
    let base = server.base.clone();
    let http = reqwest::Client::new();
    let spec = common::payer_spec(&service.url(), 100, 4);
    common::register(&http, &base, &key_a, &spec).await;
    common::register(&http, &base, &key_b, &spec).await;
    let post = |key: &str, idempotency: &str, body: Value| {
        http.post(format!("{base}/v1/runs"))
            .bearer_auth(key)
            .header("idempotency-key", idempotency)
            .json(&body)
            .send()
    };
    let replayed = |r: &reqwest::Response| {
        r.headers()
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap().to_string())
    };
    let order = json!({"agent": "payer", "input": "pay order 9", "user": "ann", "wait": true});

    let first = post(&key_a, "order-9", order.clone()).await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(replayed(&first), None);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["status"], "completed", "{first}");
    let run = first["run_id"].as_str().unwrap().to_string();
    // Retried, waiting or not: the same run, which has ended, and no new one.
    for wait in [true, false] {
        let mut body = order.clone();
        body["wait"] = json!(wait);
        let again = post(&key_a, "order-9", body).await.unwrap();
        assert_eq!(again.status(), 200);
        assert_eq!(replayed(&again).as_deref(), Some("true"));
        assert_eq!(
            again.headers()["location"],
            format!("/v1/runs/{run}").as_str()
        );
        let again: Value = again.json().await.unwrap();
        assert_eq!(again["run_id"], run.as_str(), "{again}");
        assert_eq!(again["status"], "completed");
        if wait {
            // The first answer's shape, rebuilt from the run's log.
            assert_eq!(again["models_used"], first["models_used"], "{again}");
            assert_eq!(again["cost_micros"], first["cost_micros"]);
        }
    }
    // The same key with another request is refused, naming the run the key made.
    let mut other = order.clone();
    other["input"] = json!("pay order 10");
    let refused = post(&key_a, "order-9", other).await.unwrap();
    assert_eq!(refused.status(), 422);
    let problem: Value = refused.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("different request") && detail.contains(&run),
        "{detail}"
    );
    // Another tenant's key of the same name is its own.
    let theirs: Value = post(&key_b, "order-9", order.clone())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(theirs["run_id"], run.as_str(), "{theirs}");
    assert_eq!(theirs["status"], "completed");

    // Eight retries racing: one run; every answer names it, and only one made it.
    let body = json!({"agent": "payer", "input": "pay order 11"});
    let answers =
        futures_util::future::join_all((0..8).map(|_| post(&key_a, "order-11", body.clone())))
            .await;
    let mut ids = std::collections::BTreeSet::new();
    let mut fresh = 0;
    for answer in answers {
        let answer = answer.unwrap();
        assert!(matches!(answer.status().as_u16(), 200 | 202), "{answer:?}");
        if replayed(&answer).is_none() {
            fresh += 1;
        }
        let answer: Value = answer.json().await.unwrap();
        ids.insert(answer["run_id"].as_str().unwrap().to_string());
    }
    assert_eq!((ids.len(), fresh), (1, 1), "{ids:?}");

    // Malformed keys are refused before anything is stored.
    let before: Value =
        common::get_json(&http, &format!("{base}/v1/runs?limit=1000"), &key_a).await;
    assert_eq!(before.as_array().unwrap().len(), 2, "{before}");
    for bad in ["has spaces", &"k".repeat(256), ""] {
        let answer = post(
            &key_a,
            bad,
            json!({"agent": "payer", "input": "pay order 12"}),
        )
        .await
        .unwrap();
        assert_eq!(answer.status(), 422, "{bad:?}");
        let problem: Value = answer.json().await.unwrap();
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("Idempotency-Key"),
            "{problem}"
        );
    }
    let after: Value = common::get_json(&http, &format!("{base}/v1/runs?limit=1000"), &key_a).await;
    assert_eq!(
        before.as_array().unwrap().len(),
        after.as_array().unwrap().len()
    );
    drop(server);
}

/// A `rein serve` with no workers of its own and a `rein worker` process (killed when dropped),
/// both on store `db` with `script.yaml` as their model.
fn api_only_with_worker(dir: &Path, db: &str) -> (common::Server, Killed) {
    let args = ["--script", "script.yaml", "--db", db, "--workers", "0"];
    common::open_loopback(dir);
    let server = common::serve(dir, &args, &[]);
    let worker = common::rein_command(dir)
        .args(["worker", "--script", "script.yaml", "--db", db])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (server, Killed(worker))
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A server with no workers of its own beside a `rein worker` process on the same store: a
/// `wait` request is answered with the outcome the worker reached, and a cancel through the
/// server stops a run the worker drives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_only_server_answers_and_cancels_runs_a_worker_process_drives() {
    let service = ToolService::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("script.yaml"), SCRIPT).unwrap();
    let key = common::tenant_key(dir.path(), "acme");
    let (server, _worker) = api_only_with_worker(dir.path(), "rein.db");
    let base = server.base.clone();
    let http = reqwest::Client::new();
    common::register(
        &http,
        &base,
        &key,
        &common::payer_spec(&service.url(), 100, 4),
    )
    .await;

    let answer = http
        .post(format!("{base}/v1/runs"))
        .bearer_auth(&key)
        .json(&json!({"agent": "payer", "input": "pay order 9", "wait": true, "timeout_ms": 20000}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "the worker's outcome, not a timeout");
    let outcome: Value = answer.json().await.unwrap();
    assert_eq!(outcome["status"], "completed", "{outcome}");
    assert_eq!(outcome["models_used"]["openai/gpt-4o-mini"], 2, "{outcome}");
    assert_eq!(outcome["tool_calls"], 1);

    // A slow payment, cancelled through the server while the worker makes it.
    common::register(
        &http,
        &base,
        &key,
        &common::payer_spec(&service.url(), 3000, 4),
    )
    .await;
    let id = queue_payment(&http, &base, &key, "pay order 10").await;
    until_paying(&http, &base, &key, &id).await;
    let asked = http
        .post(format!("{base}/v1/runs/{id}/cancel"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(asked.status(), 202);
    let run = until_stopped(&http, &base, &key, &id).await["run"].clone();
    assert_eq!(run["status"], "cancelled", "{run}");
    assert_eq!(run["detail"], "cancelled by api:acme while it ran");
    assert_eq!(run["tool_calls"], 1);
    drop(server);
}

/// On PostgreSQL, an API-only server streams, live, the events of a run that a `rein worker`
/// process drives (it hears the worker's appends through the database), and answers a `wait`
/// request with the worker's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_an_api_only_server_streams_a_run_a_worker_process_drives() {
    let schema = rein_store::testing::TestSchema::create().await.unwrap();
    let db = schema.url();
    let service = ToolService::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("script.yaml"), SCRIPT).unwrap();
    let key = common::tenant_key_in(dir.path(), "acme", &db);
    let (server, worker) = api_only_with_worker(dir.path(), &db);
    let base = server.base.clone();
    let http = reqwest::Client::new();
    // The payment takes a second: the stream is open while the worker makes it.
    common::register(
        &http,
        &base,
        &key,
        &common::payer_spec(&service.url(), 1000, 4),
    )
    .await;

    let id = queue_payment(&http, &base, &key, "pay order 9").await;
    let stream = http
        .get(format!("{base}/v1/runs/{id}/events"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let all = frames(&stream.text().await.unwrap());
    assert_eq!(
        all.iter().map(|(seq, _, _)| *seq).collect::<Vec<_>>(),
        (0..all.len() as u64).collect::<Vec<_>>(),
        "every event, in order"
    );
    assert!(all.iter().any(|(_, kind, _)| kind == "tool_result"));
    assert_eq!(all.last().unwrap().1, "run_finished");
    assert_eq!(all.last().unwrap().2["payload"]["status"], "completed");

    let answer = http
        .post(format!("{base}/v1/runs"))
        .bearer_auth(&key)
        .json(
            &json!({"agent": "payer", "input": "pay order 10", "wait": true, "timeout_ms": 20000}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "the worker's outcome, not a timeout");
    let outcome: Value = answer.json().await.unwrap();
    assert_eq!(outcome["status"], "completed", "{outcome}");
    assert_eq!(service.applied().values().sum::<usize>(), 2, "two payments");
    drop(server);
    drop(worker);
    schema.drop_schema().await.unwrap();
}

/// `rein runs cancel` is another process than the server that drives the run: the request waits
/// in the store, and the server ends the run before its next step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_cancels_a_run_that_the_server_drives() {
    let service = ToolService::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("script.yaml"), SCRIPT).unwrap();
    let key = common::tenant_key(dir.path(), "acme");
    let server = serve(dir.path());
    let base = server.base.clone();
    let http = reqwest::Client::new();
    // The payment takes 3 s: the server looks for requests every second.
    common::register(
        &http,
        &base,
        &key,
        &common::payer_spec(&service.url(), 3000, 4),
    )
    .await;
    let id = queue_payment(&http, &base, &key, "pay order 9").await;
    until_paying(&http, &base, &key, &id).await;
    let cancel = |id: &str, wait: &[&str]| {
        let mut args = vec!["runs", "cancel", id, "--tenant", "acme", "--db", "rein.db"];
        args.extend(wait);
        common::rein(dir.path(), &args)
    };
    // The payment in flight outlasts a one-second wait: the request stays, exit 1.
    let out = cancel(&id, &["--wait=1s"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("run {id}: cancel requested"))
            && said.contains(&format!("run {id}: still running after 1s")),
        "{said}"
    );
    // Asked again, waiting until it ends: the CLI says how.
    let out = cancel(&id, &["--wait"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("run {id}: cancelled: cancelled by cli")),
        "{said}"
    );
    let trace = until_stopped(&http, &base, &key, &id).await;
    assert_eq!(trace["run"]["status"], "cancelled", "{trace}");
    let detail = trace["run"]["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("cancelled by cli") && detail.ends_with("while it ran"),
        "the log says who cancelled it: {detail}"
    );
    let kinds: Vec<&str> = trace["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds[kinds.len() - 2..],
        ["tool_result", "run_finished"],
        "{kinds:?}"
    );
    assert_eq!(
        service.applied().values().sum::<usize>(),
        1,
        "one payment, made once"
    );
    // An ended run, or one of another tenant, is refused with the reason.
    let again = cancel(&id, &[]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already ended"),
        "{again:?}"
    );
    let unknown = common::rein(
        dir.path(),
        &[
            "runs", "cancel", &id, "--tenant", "rival", "--db", "rein.db",
        ],
    );
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("not found for tenant rival"),
        "{unknown:?}"
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_hands_its_runs_over_at_once_on_the_next_start() {
    let service = ToolService::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("script.yaml"), SCRIPT).unwrap();
    let key = common::tenant_key(dir.path(), "acme");
    // Leases of a minute: a run left to its lease would wait that long to be taken over.
    let args = [
        "--script",
        "script.yaml",
        "--db",
        "rein.db",
        "--lease",
        "60s",
    ];
    common::open_loopback(dir.path());
    let server = common::serve(dir.path(), &args, &[]);
    let http = reqwest::Client::new();
    let spec = common::payer_spec(&service.url(), 2000, 4);
    common::register(&http, &server.base, &key, &spec).await;
    let id = queue_payment(&http, &server.base, &key, "pay order 3").await;
    until_paying(&http, &server.base, &key, &id).await;

    // Stopped mid-payment, then started again: the run finishes well inside its old lease.
    assert!(server.terminate().success());
    let stopped = std::time::Instant::now();
    let server = common::serve(dir.path(), &args, &[]);
    let run = loop {
        let run: Value =
            common::get_json(&http, &format!("{}/v1/runs/{id}", server.base), &key).await;
        if run["status"] == "completed" {
            break run;
        }
        assert!(
            stopped.elapsed() < std::time::Duration::from_secs(30),
            "the run was not taken over before its lease expired: {run}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(run["output"], "paid");
    // The payment cut off by the stop was made again with its idempotency key: applied once.
    assert_eq!(service.applied().values().sum::<usize>(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_that_drives_a_slow_step_is_not_cut_off_by_the_request_time_limit() {
    let service = ToolService::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("script.yaml"), SCRIPT).unwrap();
    std::fs::write(
        dir.path().join("rein.toml"),
        "[server]\nrequest_timeout = \"1s\"\n",
    )
    .unwrap();
    let key = common::tenant_key(dir.path(), "acme");
    let server = serve(dir.path());
    let http = reqwest::Client::new();
    // The payment needs a person's approval, then takes 2 s: longer than the request limit.
    let spec = common::held_spec("payer", &service.url(), 2000, 4);
    common::register(&http, &server.base, &key, &spec).await;
    let held: Value = http
        .post(format!("{}/v1/runs", server.base))
        .bearer_auth(&key)
        .json(&json!({"agent": "payer", "input": "pay order 5", "wait": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(held["status"], "awaiting_approval", "{held}");
    let id = held["run_id"].as_str().unwrap();
    let started = std::time::Instant::now();
    let decided = http
        .post(format!("{}/v1/runs/{id}/approval", server.base))
        .bearer_auth(&key)
        .json(&json!({"approved": true, "by": "ops"}))
        .send()
        .await
        .unwrap();
    assert_eq!(decided.status(), 200);
    assert!(started.elapsed() >= std::time::Duration::from_secs(2));
    let decided: Value = decided.json().await.unwrap();
    assert_eq!(decided["status"], "completed", "{decided}");
    assert_eq!(service.applied().values().sum::<usize>(), 1);
}
