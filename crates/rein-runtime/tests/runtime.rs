//! The driver against real HTTP servers on 127.0.0.1: tools that fail, stall and refuse, and
//! an OpenAI-compatible model server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rein_core::{
    Agent, CheckContext, ErrorType, EventKind, PriceTable, RunStatus, SessionId, TenantId,
    TerminationReason, ToolStatus, UserId,
};
use rein_fakes::{FakeOpenAi, FakeResponse, ToolService};
use rein_providers::{Model, OpenAiClient, ScriptedModel};
use rein_runtime::{RunOutcome, RunRequest, Runtime};
use rein_store::SqliteStore;
use rein_tools::{Builtins, HttpTools, ToolBox};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn spec(tool_url: &str, contract: &str, limits_timeout: &str) -> String {
    format!(
        r#"
name: http-test
version: 1
model: {{primary: openai/gpt-4o-mini, max_output_tokens: 200}}
instructions: Use the tool.
tools:
  - name: fetch
    description: Fetches a resource.
    input_schema: {{type: object, properties: {{}}, additionalProperties: false}}
    source: {{http: {{url: "{tool_url}", method: GET}}}}
    contract: {contract}
  - name: nap
    source: {{builtin: sleep}}
    contract: {{timeout: 30s, side_effects: none}}
limits:
  max_iterations: 5
  max_total_tokens: 50000
  max_cost_usd: 0.10
  timeout: {limits_timeout}
"#
    )
}

struct Harness {
    runtime: Runtime,
    _dir: tempfile::TempDir,
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("rein.db"), Default::default())
        .await
        .unwrap();
    let tools = ToolBox::new(
        Builtins::standard(),
        HttpTools::new(
            reqwest::Client::new(),
            rein_tools::Egress::closed(rein_tools::CONNECT_TIMEOUT).unwrap(),
        ),
    );
    Harness {
        runtime: Runtime::new(std::sync::Arc::new(store), tools),
        _dir: dir,
    }
}

/// A request to run `src` with `input`, as `user` of `tenant` in `session`.
fn request(
    src: &str,
    input: &str,
    tenant: &str,
    user: &str,
    session: &str,
    granted: &[&str],
) -> RunRequest {
    RunRequest {
        agent: agent(src),
        spec_source: src.to_string(),
        input: input.to_string(),
        tenant: TenantId::new(tenant),
        user: UserId::new(user),
        session: SessionId::new(session),
        job: None,
        granted_scopes: granted.iter().map(|s| s.to_string()).collect(),
        trust: rein_core::Trust::Operator,
        trace_parent: None,
        chat: None,
    }
}

fn agent(src: &str) -> Arc<Agent> {
    let prices = PriceTable::default();
    let builtins = Builtins::standard().infos();
    Arc::new(
        Agent::parse(
            "test.yaml",
            src,
            &CheckContext {
                prices: &prices,
                builtin_tools: &builtins,
                providers: rein_providers::PROVIDERS,
            },
        )
        .unwrap(),
    )
}

async fn run(h: &Harness, src: &str, model: &dyn Model) -> RunOutcome {
    let request = request(src, "go", "acme", "ann", "s1", &[]);
    h.runtime.run(request, model).await.unwrap()
}

/// Calls `tool` with `args` once, then answers "done".
fn one_call(tool: &str, args: &str) -> ScriptedModel {
    let script = format!(
        "responses:\n  - tool_calls: [{{name: {tool}, raw_arguments: '{args}'}}]\n  - text: done\n"
    );
    ScriptedModel::parse("script.yaml", &script).unwrap()
}

async fn tool_results(h: &Harness, outcome: &RunOutcome) -> Vec<(rein_core::ToolResult, u32, u64)> {
    let events = h
        .runtime
        .store()
        .events(&TenantId::new("acme"), &outcome.run_id)
        .await
        .unwrap();
    events
        .iter()
        .filter_map(|e| match e.decode().unwrap().kind {
            EventKind::ToolResult {
                result,
                attempts,
                latency_ms,
                ..
            } => Some((result, attempts, latency_ms)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn an_http_tool_that_fails_twice_then_succeeds_is_retried_to_success() {
    let service = ToolService::start().await.unwrap();
    let h = harness().await;
    let src = spec(
        &format!("{}/flaky/a?fail=2", service.url()),
        "{timeout: 5s, idempotent: true, retry: {max_attempts: 3, backoff: 10ms}}",
        "60s",
    );
    let outcome = run(&h, &src, &one_call("fetch", "{}")).await;
    assert_eq!(outcome.reason, Some(TerminationReason::Completed));
    let results = tool_results(&h, &outcome).await;
    assert_eq!(results.len(), 1);
    assert_eq!(
        results[0].0.status,
        ToolStatus::Success,
        "{:?}",
        results[0].0
    );
    assert_eq!(
        results[0].1, 3,
        "two failures, then success on the third attempt"
    );
    assert_eq!(service.hits("flaky/a"), 3);
}

#[tokio::test]
async fn a_side_effecting_tool_without_idempotency_is_not_retried() {
    let service = ToolService::start().await.unwrap();
    let h = harness().await;
    let src = spec(
        &format!("{}/flaky/b?fail=2", service.url()),
        "{timeout: 5s, side_effects: write, retry: {max_attempts: 3, backoff: 10ms}}",
        "60s",
    );
    let outcome = run(&h, &src, &one_call("fetch", "{}")).await;
    let results = tool_results(&h, &outcome).await;
    assert_eq!(
        (results[0].0.error_type, results[0].1),
        (Some(ErrorType::Transient), 1)
    );
    assert_eq!(service.hits("flaky/b"), 1);
}

#[tokio::test]
async fn an_http_404_is_permanent_and_not_retried() {
    let service = ToolService::start().await.unwrap();
    let h = harness().await;
    let src = spec(
        &format!("{}/orders/99999", service.url()),
        "{timeout: 5s, idempotent: true, retry: {max_attempts: 3, backoff: 10ms}}",
        "60s",
    );
    let outcome = run(&h, &src, &one_call("fetch", "{}")).await;
    assert_eq!(
        outcome.reason,
        Some(TerminationReason::Completed),
        "the model got the error and answered"
    );
    let results = tool_results(&h, &outcome).await;
    let (result, attempts, _) = &results[0];
    assert_eq!(
        (result.error_type, result.retry_safe, *attempts),
        (Some(ErrorType::Permanent), false, 1)
    );
    assert!(
        result.message.as_deref().unwrap().contains("HTTP 404"),
        "{result:?}"
    );
    assert_eq!(service.hits("orders/99999"), 1);
}

#[tokio::test]
async fn an_http_tool_that_sleeps_past_its_timeout_is_cut_off_at_its_timeout() {
    let service = ToolService::start().await.unwrap();
    let h = harness().await;
    let src = spec(
        &format!("{}/slow?ms=5000", service.url()),
        "{timeout: 300ms, idempotent: true, retry: {max_attempts: 1}}",
        "60s",
    );
    let started = Instant::now();
    let outcome = run(&h, &src, &one_call("fetch", "{}")).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let results = tool_results(&h, &outcome).await;
    let (result, attempts, latency_ms) = &results[0];
    assert_eq!(
        (result.error_type, *attempts),
        (Some(ErrorType::Transient), 1)
    );
    assert!(
        result
            .message
            .as_deref()
            .unwrap()
            .contains("did not answer within 300ms"),
        "{result:?}"
    );
    assert!(
        (300..1500).contains(latency_ms),
        "cut off near 300 ms, took {latency_ms} ms"
    );
}

#[tokio::test]
async fn a_slow_tool_ends_the_run_with_timeout_at_the_wall_clock_limit() {
    let h = harness().await;
    let src = spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "1s");
    let started = Instant::now();
    let outcome = run(&h, &src, &one_call("nap", r#"{"seconds": 20}"#)).await;
    let took = started.elapsed();
    assert_eq!(
        (outcome.status, outcome.reason),
        (RunStatus::LimitExceeded, Some(TerminationReason::Timeout))
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "took {took:?}"
    );
    assert!(outcome.detail.unwrap().contains("`nap` was cut off"));
}

#[tokio::test]
async fn the_openai_client_runs_a_tool_call_then_a_final_answer_over_http() {
    let server = FakeOpenAi::start(|n, _body| match n {
        0 => FakeResponse::tool_call("call_1", "nap", &json!({"seconds": 0}), 120, 20),
        _ => FakeResponse::text("all done", 180, 12),
    })
    .await
    .unwrap();
    let h = harness().await;
    let src = spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "60s");
    let client = OpenAiClient::new(
        reqwest::Client::new(),
        server.base_url(),
        Some("sk-test-key".into()),
    );
    let outcome = run(&h, &src, &client).await;

    assert_eq!(outcome.reason, Some(TerminationReason::Completed));
    assert_eq!(outcome.output, Some(json!("all done")));
    assert_eq!(
        (outcome.usage.input_tokens, outcome.usage.output_tokens),
        (300, 32)
    );
    // gpt-4o-mini: 300 * $0.15/M + 32 * $0.60/M = 45 + 19.2 -> 65 micro-dollars (rounded up per call: 18+12, 27+8)
    assert_eq!(outcome.cost.micros(), 18 + 12 + 27 + 8);

    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    let (first, auth) = &requests[0];
    assert_eq!(auth.as_deref(), Some("Bearer sk-test-key"));
    assert_eq!(first["model"], "gpt-4o-mini");
    assert_eq!(first["max_tokens"], 200);
    assert_eq!(first["tools"][1]["function"]["name"], "nap");
    let (second, _) = &requests[1];
    let tool_message = second["messages"].as_array().unwrap().last().unwrap();
    assert_eq!(tool_message["role"], "tool");
    assert_eq!(tool_message["tool_call_id"], "call_1");

    let run = h
        .runtime
        .store()
        .run(&TenantId::new("acme"), &outcome.run_id)
        .await
        .unwrap();
    assert_eq!(run.progress.cost, outcome.cost);
    assert_eq!(run.progress.usage, outcome.usage);
}

#[tokio::test]
async fn a_provider_that_is_overloaded_then_recovers_is_retried() {
    let server = FakeOpenAi::start(|n, _| match n {
        0 => FakeResponse::error(503, "overloaded"),
        _ => FakeResponse::text("ok", 10, 2),
    })
    .await
    .unwrap();
    let h = harness().await;
    let src = spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "60s");
    let client = OpenAiClient::new(reqwest::Client::new(), server.base_url(), None);
    let outcome = run(&h, &src, &client).await;
    assert_eq!(outcome.reason, Some(TerminationReason::Completed));
    assert_eq!(server.request_count(), 2);
}

#[tokio::test]
async fn a_rejected_api_key_fails_the_run_without_retrying() {
    let server = FakeOpenAi::start(|_, _| FakeResponse::error(401, "Incorrect API key provided"))
        .await
        .unwrap();
    let h = harness().await;
    let src = spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "60s");
    let client = OpenAiClient::new(
        reqwest::Client::new(),
        server.base_url(),
        Some("sk-wrong".into()),
    );
    let outcome = run(&h, &src, &client).await;
    assert_eq!(
        (outcome.status, outcome.reason),
        (RunStatus::Failed, Some(TerminationReason::Error))
    );
    assert_eq!(server.request_count(), 1);
    let detail = outcome.detail.unwrap();
    assert!(
        detail.contains("refused the API key") && !detail.contains("sk-wrong"),
        "{detail}"
    );
}

#[tokio::test]
async fn the_recorded_log_verifies_and_replays_to_the_same_outcome() {
    let h = harness().await;
    let src = spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "60s");
    let outcome = run(&h, &src, &one_call("nap", r#"{"seconds": 0}"#)).await;
    let tenant = TenantId::new("acme");
    let events = h
        .runtime
        .store()
        .events(&tenant, &outcome.run_id)
        .await
        .unwrap();
    let record = h
        .runtime
        .store()
        .run(&tenant, &outcome.run_id)
        .await
        .unwrap();
    rein_core::verify_chain(&events, Some((record.event_count, &record.head_hash))).unwrap();
    assert_eq!(events.len() as u64, outcome.events);
    let decoded: Vec<_> = events.iter().map(|e| e.decode().unwrap()).collect();
    let replayed = rein_core::Engine::replay(agent(&src), &decoded).unwrap();
    assert_eq!(
        replayed.outcome(),
        outcome.reason.map(|r| (outcome.status, r))
    );
    assert_eq!(replayed.usage(), outcome.usage);
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "run_started",
            "guard_verdict",
            "model_requested",
            "model_responded",
            "tool_requested",
            "tool_result",
            "guard_verdict",
            "model_requested",
            "model_responded",
            "run_finished"
        ]
    );
}

/// Starts a run in a task, waits until its tool call to the slow endpoint is recorded as
/// requested and has reached the service, then kills the task as a crash would. Returns the
/// run id.
async fn crash_during_tool_call(h: &Harness, service: &ToolService, src: &str) -> rein_core::RunId {
    let tenant = TenantId::new("acme");
    let runtime = h.runtime.clone();
    let model = Arc::new(one_call("fetch", "{}"));
    let request = request(src, "go", tenant.as_str(), "ann", "s1", &[]);
    let task = tokio::spawn(async move { runtime.run(request, model.as_ref()).await });
    let started = Instant::now();
    loop {
        if let Some(run) = run_ids(h, &tenant, 1).await.pop() {
            let events = h.runtime.store().events(&tenant, &run).await.unwrap();
            if events.last().is_some_and(|e| e.kind == "tool_requested")
                && service.hits("slow") + service.hits("apply") == 1
            {
                task.abort();
                let _ = task.await;
                return run;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the tool call was never requested"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn resume(h: &Harness, id: &rein_core::RunId) -> RunOutcome {
    let model = one_call("fetch", "{}");
    h.runtime
        .resume(&TenantId::new("acme"), id, &PriceTable::default(), &model)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_crash_mid_call_of_a_safe_tool_resumes_with_the_same_idempotency_key() {
    let service = ToolService::start().await.unwrap();
    let h = harness().await;
    let src = spec(
        &format!("{}/slow?ms=300", service.url()),
        "{timeout: 5s, idempotent: true, side_effects: read}",
        "60s",
    );
    let id = crash_during_tool_call(&h, &service, &src).await;
    let outcome = resume(&h, &id).await;

    assert_eq!(outcome.reason, Some(TerminationReason::Completed));
    assert_eq!(outcome.iterations, 2);
    let keys = service.idempotency_keys("slow");
    assert_eq!(
        keys.len(),
        2,
        "called once before the crash and once after: {keys:?}"
    );
    assert_eq!(keys[0], keys[1], "the same step, so the same key");
    let tenant = TenantId::new("acme");
    let events = h.runtime.store().events(&tenant, &id).await.unwrap();
    let record = h.runtime.store().run(&tenant, &id).await.unwrap();
    rein_core::verify_chain(&events, Some((record.event_count, &record.head_hash))).unwrap();
    assert_eq!(record.progress.iterations, 2);
    let results = tool_results(&h, &outcome).await;
    assert_eq!(results.len(), 1);
    assert!(results[0].0.is_success());
}

#[tokio::test]
async fn a_crash_mid_call_of_a_side_effecting_http_tool_repeats_it_under_the_same_key_so_it_lands_once()
 {
    let service = ToolService::start().await.unwrap();
    let h = harness().await;
    let src = spec(
        &format!("{}/apply?ms=300", service.url()),
        "{timeout: 5s, side_effects: external}",
        "60s",
    )
    .replace("method: GET", "method: POST");
    let id = crash_during_tool_call(&h, &service, &src).await;
    let outcome = resume(&h, &id).await;

    assert_eq!(outcome.reason, Some(TerminationReason::Completed));
    let keys = service.idempotency_keys("apply");
    assert_eq!(
        keys.len(),
        2,
        "sent before the crash and again after: {keys:?}"
    );
    assert_eq!(keys[0], keys[1], "the same step, so the same key");
    assert_eq!(keys[0], format!("{id}:2"), "`run_id:step`");
    let applied = service.applied();
    assert_eq!(
        applied.len(),
        1,
        "one logical call, one effect: {applied:?}"
    );
    let results = tool_results(&h, &outcome).await;
    assert!(results[0].0.is_success());
}

#[tokio::test]
async fn a_resumed_run_keeps_the_spec_it_pinned() {
    let service = ToolService::start().await.unwrap();
    let h = harness().await;
    let src = spec(
        &format!("{}/slow?ms=300", service.url()),
        "{timeout: 5s, idempotent: true}",
        "60s",
    );
    let id = crash_during_tool_call(&h, &service, &src).await;
    // Resume with a price table that no longer knows the pinned model: refused, not guessed.
    let model = one_call("fetch", "{}");
    let err = h
        .runtime
        .resume(&TenantId::new("acme"), &id, &PriceTable::empty(), &model)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("no price is known for `openai/gpt-4o-mini`"),
        "{err}"
    );
}

#[tokio::test]
async fn a_failed_unsafe_tool_is_never_reported_to_the_model_as_safe_to_repeat() {
    let service = ToolService::start().await.unwrap();
    let h = harness().await;
    let src = spec(
        &format!("{}/flaky/p?fail=5", service.url()),
        "{timeout: 5s, side_effects: external}",
        "60s",
    );
    let outcome = run(&h, &src, &one_call("fetch", "{}")).await;
    let results = tool_results(&h, &outcome).await;
    assert_eq!(
        (results[0].0.error_type, results[0].0.retry_safe),
        (Some(ErrorType::Transient), false)
    );
}

async fn run_granted(h: &Harness, src: &str, model: &dyn Model, granted: &[&str]) -> RunOutcome {
    let request = request(src, "go", "acme", "ann", "s1", granted);
    h.runtime.run(request, model).await.unwrap()
}

#[tokio::test]
async fn a_tool_outside_the_granted_scopes_is_never_called() {
    let service = ToolService::start().await.unwrap();
    let h = harness().await;
    let base = spec(
        &format!("{}/orders/42", service.url()),
        "{timeout: 5s, auth_scope: orders:read, side_effects: read}",
        "60s",
    );
    let with_scope = base.replace(
        "instructions: Use the tool.",
        "instructions: Use the tool.\nscopes: [orders:read]",
    );

    // The agent holds the scope but the tenant was not granted it; then neither; then both.
    for (src, granted, who) in [
        (&with_scope, vec![], "this agent's tenant is"),
        (&base, vec![], "this agent and its tenant are"),
        (&base, vec!["orders:read"], "this agent is"),
    ] {
        let outcome = run_granted(&h, src, &one_call("fetch", "{}"), &granted).await;
        assert_eq!(outcome.reason, Some(TerminationReason::Completed));
        let results = tool_results(&h, &outcome).await;
        let (result, attempts, _) = &results[0];
        assert_eq!(
            (result.error_type, *attempts),
            (Some(ErrorType::Permanent), 0)
        );
        let message = result.message.as_deref().unwrap();
        assert!(
            message.contains("not authorised") && message.contains(who),
            "{message}"
        );
    }
    assert_eq!(service.hits("orders/42"), 0, "no request reached the tool");

    let outcome = run_granted(&h, &with_scope, &one_call("fetch", "{}"), &["orders:read"]).await;
    assert!(tool_results(&h, &outcome).await[0].0.is_success());
    assert_eq!(service.hits("orders/42"), 1);
}

async fn run_as(h: &Harness, src: &str, tenant: &str) -> RunOutcome {
    let request = request(src, "go", tenant, "ann", "s1", &[]);
    h.runtime
        .run(request, &one_call("fetch", "{}"))
        .await
        .unwrap()
}

async fn first_tool_result(
    h: &Harness,
    outcome: &RunOutcome,
    tenant: &str,
) -> (rein_core::ToolResult, u32) {
    let events = h
        .runtime
        .store()
        .events(&TenantId::new(tenant), &outcome.run_id)
        .await
        .unwrap();
    events
        .iter()
        .find_map(|e| match e.decode().unwrap().kind {
            EventKind::ToolResult {
                result, attempts, ..
            } => Some((result, attempts)),
            _ => None,
        })
        .unwrap()
}

#[tokio::test]
async fn a_failing_tool_opens_its_breaker_and_one_probe_goes_through_after_the_cool_down() {
    let service = ToolService::start().await.unwrap();
    let h = harness().await;
    let contract = "{timeout: 5s, idempotent: true, retry: {max_attempts: 1}, breaker: {failures: 3, window: 60s, cool_down: 400ms}}";
    let src = spec(
        &format!("{}/flaky/b1?fail=3", service.url()),
        contract,
        "60s",
    );

    for n in 1..=3 {
        let outcome = run_as(&h, &src, "acme").await;
        let (result, attempts) = first_tool_result(&h, &outcome, "acme").await;
        assert_eq!(
            (result.error_type, attempts),
            (Some(ErrorType::Transient), 1),
            "call {n}"
        );
    }
    assert_eq!(service.hits("flaky/b1"), 3);

    // Open: refused without reaching the tool, and the model is told not to hammer it.
    let outcome = run_as(&h, &src, "acme").await;
    let (result, attempts) = first_tool_result(&h, &outcome, "acme").await;
    assert_eq!((attempts, result.retry_safe), (0, false));
    assert!(
        result
            .message
            .as_deref()
            .unwrap()
            .contains("circuit breaker is open"),
        "{result:?}"
    );
    assert_eq!(service.hits("flaky/b1"), 3, "no request reached the tool");

    // Another tenant's breaker for the same tool is its own.
    let other = spec(&format!("{}/flaky/b2", service.url()), contract, "60s");
    let outcome = run_as(&h, &other, "globex").await;
    assert!(
        first_tool_result(&h, &outcome, "globex")
            .await
            .0
            .is_success()
    );

    // After the cool-down one probe goes through; it succeeds and closes the breaker.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let outcome = run_as(&h, &src, "acme").await;
    assert!(first_tool_result(&h, &outcome, "acme").await.0.is_success());
    assert_eq!(service.hits("flaky/b1"), 4);
    let outcome = run_as(&h, &src, "acme").await;
    assert!(first_tool_result(&h, &outcome, "acme").await.0.is_success());
    assert_eq!(service.hits("flaky/b1"), 5);
}

/// Starts `runs` runs of `src` at once as tenant acme (a user and session of its own each),
/// and waits for them all.
async fn run_concurrently(
    runtime: &Runtime,
    src: &str,
    model: Arc<dyn Model>,
    runs: usize,
) -> Vec<RunOutcome> {
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..runs {
        let (runtime, model, src) = (runtime.clone(), model.clone(), src.to_string());
        tasks.spawn(async move {
            let request = request(
                &src,
                &format!("q{n}"),
                "acme",
                &format!("u{n}"),
                &format!("s{n}"),
                &[],
            );
            runtime.run(request, model.as_ref()).await.unwrap()
        });
    }
    let mut outcomes = Vec::new();
    while let Some(o) = tasks.join_next().await {
        outcomes.push(o.unwrap());
    }
    outcomes
}

async fn race_rate_limited(
    limits: rein_core::rate::RateLimits,
    runs: usize,
) -> (Harness, Vec<RunOutcome>) {
    let mut h = harness().await;
    h.runtime = h.runtime.clone().with_rate_limits(limits);
    let src = spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "60s");
    let model = Arc::new(ScriptedModel::parse("s.yaml", "responses:\n  - text: done\n").unwrap());
    let outcomes = run_concurrently(&h.runtime, &src, model, runs).await;
    (h, outcomes)
}

async fn rate_events(h: &Harness, outcome: &RunOutcome) -> Vec<(bool, i64)> {
    let events = h
        .runtime
        .store()
        .events(&TenantId::new("acme"), &outcome.run_id)
        .await
        .unwrap();
    events
        .iter()
        .filter_map(|e| match e.decode().unwrap().kind {
            EventKind::RateLimited {
                delayed, wait_ms, ..
            } => Some((delayed, wait_ms)),
            _ => None,
        })
        .collect()
}

fn tenant_requests(
    limit: u64,
    window_ms: i64,
    over_limit: rein_core::rate::OverLimit,
) -> rein_core::rate::RateLimits {
    rein_core::rate::RateLimits {
        defaults: rein_core::rate::RatePolicy {
            tenant_requests: Some(rein_core::rate::RateLimit { limit, window_ms }),
            ..Default::default()
        },
        over_limit,
        ..Default::default()
    }
}

#[tokio::test]
async fn calls_over_a_rate_limit_are_rejected_with_the_time_to_wait() {
    let (h, outcomes) = race_rate_limited(
        tenant_requests(3, 60_000, rein_core::rate::OverLimit::Reject),
        5,
    )
    .await;
    let completed = outcomes
        .iter()
        .filter(|o| o.reason == Some(TerminationReason::Completed))
        .count();
    assert_eq!(completed, 3, "three calls per minute");
    for o in outcomes
        .iter()
        .filter(|o| o.reason != Some(TerminationReason::Completed))
    {
        assert_eq!(o.reason, Some(TerminationReason::Error));
        assert!(
            o.detail
                .as_deref()
                .unwrap()
                .contains("would have to wait 20 s"),
            "{:?}",
            o.detail
        );
        let events = rate_events(&h, o).await;
        assert_eq!(events.len(), 1);
        let (delayed, wait_ms) = events[0];
        assert!(
            !delayed && (19_000..=20_000).contains(&wait_ms),
            "{events:?}"
        );
        assert_eq!(o.iterations, 0, "the rejected call was never made");
    }
}

#[tokio::test]
async fn calls_over_a_rate_limit_wait_their_turn_when_the_policy_delays() {
    let limits = tenant_requests(
        2,
        1_000,
        rein_core::rate::OverLimit::Delay { max_wait_ms: 5_000 },
    );
    let (h, outcomes) = race_rate_limited(limits, 4).await;
    assert!(
        outcomes
            .iter()
            .all(|o| o.reason == Some(TerminationReason::Completed))
    );
    let mut delayed = Vec::new();
    let mut prompt = Vec::new();
    for o in &outcomes {
        let waits = rate_events(&h, o).await;
        let requested = h
            .runtime
            .store()
            .events(&TenantId::new("acme"), &o.run_id)
            .await
            .unwrap()
            .iter()
            .find(|e| e.kind == "model_requested")
            .unwrap()
            .ts_ms;
        if waits.is_empty() {
            prompt.push(requested)
        } else {
            delayed.push((waits, requested))
        }
    }
    assert_eq!(
        (prompt.len(), delayed.len()),
        (2, 2),
        "a burst of two, then two that wait"
    );
    assert!(
        delayed
            .iter()
            .all(|(w, _)| w.iter().all(|(d, ms)| *d && *ms > 0 && *ms <= 1_000))
    );
    let first = prompt.iter().min().unwrap();
    assert!(
        delayed.iter().all(|(_, at)| at > first),
        "the delayed calls were made after the burst"
    );
}

#[tokio::test]
async fn a_tenants_bulkhead_caps_its_concurrent_runs_and_queues_the_rest() {
    use rein_core::bulkhead::{BulkheadPolicy, Bulkheads};
    let mut h = harness().await;
    h.runtime = h.runtime.clone().with_bulkheads(Bulkheads {
        defaults: Some(BulkheadPolicy {
            max_concurrent_runs: 2,
            max_queued: 10,
        }),
        ..Bulkheads::default()
    });
    // Each run naps 150 ms in a tool, so runs overlap unless the bulkhead keeps them apart.
    let src = spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "60s");
    let model = Arc::new(one_call("nap", r#"{"seconds": 0.15}"#));
    let mut spans = Vec::new();
    for o in run_concurrently(&h.runtime, &src, model, 5).await {
        assert_eq!(o.reason, Some(TerminationReason::Completed));
        let events = h
            .runtime
            .store()
            .events(&TenantId::new("acme"), &o.run_id)
            .await
            .unwrap();
        spans.push((events.first().unwrap().ts_ms, events.last().unwrap().ts_ms));
    }
    // At no run's start were two others already executing.
    for (start, _) in &spans {
        let executing = spans.iter().filter(|(s, e)| s < start && e > start).count();
        assert!(
            executing < 2,
            "{executing} runs executing when one started: {spans:?}"
        );
    }
}

#[tokio::test]
async fn a_full_queue_refuses_a_run_before_anything_is_recorded() {
    use rein_core::bulkhead::{BulkheadPolicy, Bulkheads};
    let mut h = harness().await;
    h.runtime = h.runtime.clone().with_bulkheads(Bulkheads {
        defaults: Some(BulkheadPolicy {
            max_concurrent_runs: 1,
            max_queued: 0,
        }),
        ..Bulkheads::default()
    });
    let src = spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "60s");
    let slow = Arc::new(one_call("nap", r#"{"seconds": 0.5}"#));
    let runtime = h.runtime.clone();
    let first = {
        let src = src.clone();
        tokio::spawn(async move {
            let request = request(&src, "first", "acme", "ann", "s", &[]);
            runtime.run(request, slow.as_ref()).await.unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let request = request(&src, "second", "acme", "ann", "s", &[]);
    let err = h
        .runtime
        .run(request, &one_call("nap", r#"{"seconds": 0}"#))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("tenant acme is at its cap of concurrent runs"),
        "{err}"
    );
    assert_eq!(
        first.await.unwrap().reason,
        Some(TerminationReason::Completed)
    );
    let runs = h
        .runtime
        .store()
        .list_runs(&TenantId::new("acme"), &Default::default(), 10)
        .await
        .unwrap();
    assert_eq!(runs.len(), 1, "the refused run left no record");
}

#[tokio::test]
async fn every_failed_model_attempt_is_named_in_the_log() {
    let server = FakeOpenAi::start(|n, _| match n {
        0 => FakeResponse::error(503, "overloaded"),
        1 => FakeResponse::error(429, "slow down"),
        _ => FakeResponse::text("ok", 10, 2),
    })
    .await
    .unwrap();
    let h = harness().await;
    let src = spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "60s").replace(
        "max_output_tokens: 200}",
        "max_output_tokens: 200, retry: {max_attempts: 3, base_delay: 10ms, max_delay: 20ms}, timeout: 5s}",
    );
    let client = OpenAiClient::new(reqwest::Client::new(), server.base_url(), None);
    let outcome = run(&h, &src, &client).await;
    assert_eq!(outcome.reason, Some(TerminationReason::Completed));
    let events = h
        .runtime
        .store()
        .events(&TenantId::new("acme"), &outcome.run_id)
        .await
        .unwrap();
    let attempts: Vec<(u32, ErrorType, u64)> = events
        .iter()
        .filter_map(|e| match e.decode().unwrap().kind {
            EventKind::ModelAttemptFailed {
                attempt,
                error_type,
                retry_in_ms,
                ..
            } => Some((attempt, error_type, retry_in_ms)),
            _ => None,
        })
        .collect();
    assert_eq!(
        attempts.iter().map(|a| (a.0, a.1)).collect::<Vec<_>>(),
        [(1, ErrorType::Transient), (2, ErrorType::RateLimit)]
    );
    assert!(
        attempts.iter().all(|a| a.2 <= 20),
        "delays within max_delay: {attempts:?}"
    );
    let responded = events.iter().find_map(|e| match e.decode().unwrap().kind {
        EventKind::ModelResponded { attempts, .. } => Some(attempts),
        _ => None,
    });
    assert_eq!(responded, Some(3));
}

#[tokio::test]
async fn a_hung_provider_is_cut_off_at_the_model_timeout() {
    let server =
        FakeOpenAi::start(|_, _| FakeResponse::text("late", 1, 1).after(Duration::from_secs(5)))
            .await
            .unwrap();
    let h = harness().await;
    let src = spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "60s").replace(
        "max_output_tokens: 200}",
        "max_output_tokens: 200, retry: {max_attempts: 1}, timeout: 300ms}",
    );
    let client = OpenAiClient::new(reqwest::Client::new(), server.base_url(), None);
    let started = Instant::now();
    let outcome = run(&h, &src, &client).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(outcome.reason, Some(TerminationReason::Error));
    assert!(outcome.detail.unwrap().contains("did not answer in time"));
}

/// The primary (`gpt-4o-mini`) always fails with `status`; `gpt-4o` answers.
async fn primary_fails_with(status: u16) -> FakeOpenAi {
    FakeOpenAi::start(move |_, body| {
        if body["model"] == "gpt-4o-mini" {
            FakeResponse::error(status, "down")
        } else {
            FakeResponse::text("from the fallback", 100, 10)
        }
    })
    .await
    .unwrap()
}

fn with_models(models: &str) -> String {
    spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "60s").replace(
        "model: {primary: openai/gpt-4o-mini, max_output_tokens: 200}",
        &format!("model: {{primary: openai/gpt-4o-mini, {models} max_output_tokens: 200, retry: {{max_attempts: 1}}}}"),
    )
}

fn requests_for(server: &FakeOpenAi, model: &str) -> usize {
    server
        .requests()
        .iter()
        .filter(|(body, _)| body["model"] == model)
        .count()
}

#[tokio::test]
async fn a_dead_primary_falls_back_to_the_next_model_within_one_step() {
    let server = primary_fails_with(401).await;
    let h = harness().await;
    let src = with_models("fallbacks: [openai/gpt-4o],");
    let client = OpenAiClient::new(reqwest::Client::new(), server.base_url(), None);
    let outcome = run(&h, &src, &client).await;
    assert_eq!(
        (outcome.reason, outcome.iterations),
        (Some(TerminationReason::Completed), 1)
    );
    assert_eq!(outcome.output, Some(json!("from the fallback")));
    // gpt-4o's rate: 100 * $2.50/M + 10 * $10/M = 350 micro-dollars.
    assert_eq!(outcome.cost.micros(), 350);
    let events = h
        .runtime
        .store()
        .events(&TenantId::new("acme"), &outcome.run_id)
        .await
        .unwrap();
    let story: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| match e.decode().unwrap().kind {
            EventKind::ModelFellBack { model, reason, .. } => Some((model, reason)),
            EventKind::ModelResponded { model, .. } => Some((model, "answered".into())),
            _ => None,
        })
        .collect();
    assert_eq!(story.len(), 2, "{story:?}");
    assert_eq!(story[0].0, "openai/gpt-4o-mini");
    assert!(
        story[0].1.contains("failed for good after 1 attempt(s)"),
        "{story:?}"
    );
    assert_eq!(
        story[1],
        ("openai/gpt-4o".to_string(), "answered".to_string())
    );
}

#[tokio::test]
async fn a_provider_failing_continuously_opens_its_breaker_and_is_skipped_without_a_request() {
    let server = primary_fails_with(500).await;
    let h = harness().await;
    let src = with_models("fallbacks: [openai/gpt-4o],");
    let client = OpenAiClient::new(reqwest::Client::new(), server.base_url(), None);
    for _ in 0..5 {
        assert_eq!(
            run(&h, &src, &client).await.reason,
            Some(TerminationReason::Completed)
        );
    }
    assert_eq!(
        requests_for(&server, "gpt-4o-mini"),
        5,
        "five failures open the breaker"
    );
    let outcome = run(&h, &src, &client).await;
    assert_eq!(outcome.reason, Some(TerminationReason::Completed));
    assert_eq!(
        requests_for(&server, "gpt-4o-mini"),
        5,
        "the open breaker was skipped without a request"
    );
    let events = h
        .runtime
        .store()
        .events(&TenantId::new("acme"), &outcome.run_id)
        .await
        .unwrap();
    assert!(events.iter().any(|e| matches!(e.decode().unwrap().kind, EventKind::ModelFellBack { reason, .. } if reason.contains("circuit breaker is open"))));
}

#[tokio::test]
async fn when_every_model_of_a_step_is_open_the_run_ends_with_circuit_open() {
    let server = primary_fails_with(503).await;
    let h = harness().await;
    let src = with_models("");
    let client = OpenAiClient::new(reqwest::Client::new(), server.base_url(), None);
    for _ in 0..5 {
        assert_eq!(
            run(&h, &src, &client).await.reason,
            Some(TerminationReason::Error)
        );
    }
    let before = server.request_count();
    let outcome = run(&h, &src, &client).await;
    assert_eq!(
        (outcome.status, outcome.reason),
        (RunStatus::Failed, Some(TerminationReason::CircuitOpen))
    );
    assert_eq!(
        server.request_count(),
        before,
        "no retry storm: nothing was called"
    );
    assert!(outcome.detail.unwrap().contains("open circuit breaker"));
}

#[tokio::test]
async fn a_model_breaker_opens_after_the_failures_its_spec_allows() {
    let server = primary_fails_with(500).await;
    let h = harness().await;
    let src = with_models(
        "fallbacks: [openai/gpt-4o], breaker: {failures: 2, window: 60s, cool_down: 60s},",
    );
    let client = OpenAiClient::new(reqwest::Client::new(), server.base_url(), None);
    for _ in 0..4 {
        assert_eq!(
            run(&h, &src, &client).await.reason,
            Some(TerminationReason::Completed)
        );
    }
    assert_eq!(
        requests_for(&server, "gpt-4o-mini"),
        2,
        "`breaker.failures: 2` opens it after two failures, not the default five"
    );
}

/// A provider failing 30% of its attempts at random, under steady traffic: the retries absorb
/// most failures, and the breaker does not turn the few calls that still fail into failed runs
/// (a count of failures alone opened it after five, and every run after failed for the whole
/// cool-down).
#[tokio::test]
async fn a_modest_error_rate_fails_no_more_runs_than_the_retries_leave() {
    let rng = std::sync::Mutex::new(fastrand::Rng::with_seed(7));
    let server = FakeOpenAi::start(move |_, _| {
        if rng.lock().unwrap().f32() < 0.3 {
            FakeResponse::error(500, "flaky")
        } else {
            FakeResponse::text("fine", 100, 10)
        }
    })
    .await
    .unwrap();
    let h = harness().await;
    let src = with_models("").replace(
        "retry: {max_attempts: 1}",
        "retry: {max_attempts: 3, base_delay: 1ms, max_delay: 5ms}",
    );
    let client: Arc<dyn Model> = Arc::new(OpenAiClient::new(
        reqwest::Client::new(),
        server.base_url(),
        None,
    ));
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        outcomes.extend(run_concurrently(&h.runtime, &src, client.clone(), 100).await);
    }
    let failed = outcomes
        .iter()
        .filter(|o| o.status != RunStatus::Completed)
        .count();
    let open = outcomes
        .iter()
        .filter(|o| o.reason == Some(TerminationReason::CircuitOpen))
        .count();
    // 400 calls, each failing for good with p = 0.3^3 = 2.7%: about 11 expected.
    assert_eq!(open, 0, "{failed} failed, {open} at an open breaker");
    assert!(failed <= 25, "{failed} of 400 runs failed");
}

/// One tenant's spec sets a hair-trigger breaker and makes its calls fail: its breaker opens,
/// and another tenant's calls to the same model go through all the same.
#[tokio::test]
async fn one_tenants_failures_never_open_another_tenants_model_breaker() {
    let server = FakeOpenAi::start(|_, body| {
        if body["messages"].to_string().contains("sabotage") {
            FakeResponse::error(500, "down")
        } else {
            FakeResponse::text("fine", 100, 10)
        }
    })
    .await
    .unwrap();
    let h = harness().await;
    let hair_trigger = with_models("breaker: {failures: 1, window: 60s, cool_down: 3600s},");
    let client = OpenAiClient::new(reqwest::Client::new(), server.base_url(), None);
    for _ in 0..2 {
        let request = request(&hair_trigger, "sabotage", "mallory", "m", "s", &[]);
        let outcome = h.runtime.run(request, &client).await.unwrap();
        assert_eq!(outcome.status, RunStatus::Failed);
    }
    assert_eq!(
        server.request_count(),
        1,
        "mallory's breaker opened after one failure"
    );
    let request = request(&with_models(""), "hello", "acme", "ann", "s", &[]);
    let outcome = h.runtime.run(request, &client).await.unwrap();
    assert_eq!(
        (outcome.reason, outcome.output),
        (Some(TerminationReason::Completed), Some(json!("fine")))
    );
    assert_eq!(server.request_count(), 2);
    let seen: Vec<String> = h
        .runtime
        .breakers_seen(&TenantId::new("acme"))
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    assert!(seen.iter().all(|k| !k.contains("mallory")), "{seen:?}");
}

#[tokio::test]
async fn a_routed_step_calls_its_model_and_falls_back_to_the_primary() {
    // The cheap model routed to `plan` is rejected for good; the primary answers the step.
    let server = FakeOpenAi::start(|_, body| {
        if body["model"] == "gpt-4.1-nano" {
            FakeResponse::error(400, "model not found")
        } else {
            FakeResponse::text("from the primary", 100, 10)
        }
    })
    .await
    .unwrap();
    let h = harness().await;
    let src = with_models("routes: {plan: openai/gpt-4.1-nano, final: openai/gpt-4.1-nano},");
    let client = OpenAiClient::new(reqwest::Client::new(), server.base_url(), None);
    let outcome = run(&h, &src, &client).await;
    assert_eq!(outcome.reason, Some(TerminationReason::Completed));
    assert_eq!(outcome.models_used.get("openai/gpt-4o-mini"), Some(&1));
    assert_eq!(requests_for(&server, "gpt-4.1-nano"), 1);
    let events = h
        .runtime
        .store()
        .events(&TenantId::new("acme"), &outcome.run_id)
        .await
        .unwrap();
    let story: Vec<String> = events
        .iter()
        .filter_map(|e| match e.decode().unwrap().kind {
            EventKind::ModelRequested {
                model,
                step_kind,
                routed,
                ..
            } => Some(format!(
                "requested {model} for {step_kind:?} routed={routed}"
            )),
            EventKind::ModelFellBack { model, .. } => Some(format!("fell back from {model}")),
            EventKind::ModelResponded { model, .. } => Some(format!("answered by {model}")),
            _ => None,
        })
        .collect();
    assert_eq!(
        story,
        [
            "requested openai/gpt-4.1-nano for Some(Plan) routed=true",
            "fell back from openai/gpt-4.1-nano",
            "answered by openai/gpt-4o-mini",
        ]
    );
}

#[tokio::test]
async fn a_streamed_answer_reaches_the_caller_piece_by_piece_with_usage_recorded() {
    let server = FakeOpenAi::start(|n, _| match n {
        0 => FakeResponse::tool_call("call_1", "nap", &json!({"seconds": 0}), 120, 20),
        _ => FakeResponse::text("Order 42 has shipped today.", 180, 12),
    })
    .await
    .unwrap();
    let h = harness().await;
    let src = spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "60s");
    let client = OpenAiClient::new(reqwest::Client::new(), server.base_url(), None);
    let pieces = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let collected = pieces.clone();
    let sink = move |piece: &str| collected.lock().unwrap().push(piece.to_string());
    let outcome = h
        .runtime
        .run_streaming(
            request(&src, "go", "acme", "ann", "s1", &[]),
            &client,
            Some(&sink),
        )
        .await
        .unwrap();

    assert_eq!(outcome.reason, Some(TerminationReason::Completed));
    assert_eq!(outcome.output, Some(json!("Order 42 has shipped today.")));
    let pieces = pieces.lock().unwrap().clone();
    assert!(pieces.len() > 3, "delivered in pieces: {pieces:?}");
    assert_eq!(pieces.concat(), "Order 42 has shipped today.");
    assert_eq!(
        (outcome.usage.input_tokens, outcome.usage.output_tokens),
        (300, 32),
        "usage from the stream's last chunk"
    );
    assert_eq!(
        outcome.tool_calls, 1,
        "the tool call was assembled from its deltas"
    );
    assert!(
        server
            .requests()
            .iter()
            .all(|(body, _)| body["stream"] == true)
    );
}

#[tokio::test]
async fn a_stream_that_breaks_off_ends_the_run_with_an_error_not_a_crash() {
    let server = FakeOpenAi::start(|_, _| {
        FakeResponse::text("This answer never finishes", 10, 5).truncated()
    })
    .await
    .unwrap();
    let h = harness().await;
    let src = spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "60s");
    let client = OpenAiClient::new(reqwest::Client::new(), server.base_url(), None);
    let sink = |_: &str| {};
    let outcome = h
        .runtime
        .run_streaming(
            request(&src, "go", "acme", "ann", "s1", &[]),
            &client,
            Some(&sink),
        )
        .await
        .unwrap();
    assert_eq!(
        (outcome.status, outcome.reason),
        (RunStatus::Failed, Some(TerminationReason::Error))
    );
    assert!(
        outcome
            .detail
            .as_deref()
            .unwrap()
            .contains("ended before it was complete"),
        "{:?}",
        outcome.detail
    );
    assert_eq!(
        server.request_count(),
        1,
        "not retried: the call may already have been billed"
    );
}

#[tokio::test]
async fn an_anthropic_agent_runs_over_the_messages_api_with_its_prefix_cached_and_cache_priced() {
    let server = FakeOpenAi::start(|n, _| match n {
        0 => FakeResponse::anthropic(
            None,
            &[("toolu_1", "nap", json!({"seconds": 0}))],
            [50, 0, 1000, 20],
        ),
        _ => FakeResponse::anthropic(Some("Done napping."), &[], [60, 1000, 0, 10]),
    })
    .await
    .unwrap();
    let h = harness().await;
    let src = spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "60s").replace(
        "primary: openai/gpt-4o-mini",
        "primary: anthropic/claude-haiku-4-5",
    );
    let router = rein_providers::ProviderRouter {
        openai: OpenAiClient::new(reqwest::Client::new(), "http://127.0.0.1:9/v1", None),
        anthropic: rein_providers::AnthropicClient::new(
            reqwest::Client::new(),
            server.url(),
            Some("sk-ant-test".into()),
        ),
    };
    let outcome = run(&h, &src, &router).await;
    assert_eq!(outcome.reason, Some(TerminationReason::Completed));
    assert_eq!(outcome.output, Some(json!("Done napping.")));
    assert_eq!(
        outcome.models_used.get("anthropic/claude-haiku-4-5"),
        Some(&2)
    );

    let requests = server.requests();
    let (first, key) = &requests[0];
    assert_eq!(key.as_deref(), Some("sk-ant-test"), "sent as x-api-key");
    assert_eq!(first["model"], "claude-haiku-4-5");
    let system = first["system"][0]["text"].as_str().unwrap();
    assert!(
        system.starts_with(
            "Use the tool.\n\nSome content in this conversation comes from outside it"
        ),
        "the instructions, then what the run's fence means: {system}"
    );
    assert_eq!(first["system"][0]["cache_control"]["type"], "ephemeral");
    let tools = first["tools"].as_array().unwrap();
    assert!(
        tools.last().unwrap()["cache_control"].is_object()
            && tools[0].get("cache_control").is_none()
    );
    let (second, _) = &requests[1];
    let turns = second["messages"].as_array().unwrap();
    assert_eq!(turns.last().unwrap()["content"][0]["type"], "tool_result");
    assert_eq!(
        turns.last().unwrap()["content"][0]["tool_use_id"],
        "toolu_1"
    );

    // haiku 4.5: $1/M input, $0.10/M cache read, $1.25/M cache write, $5/M output.
    // call 1: 50*1 + 1000*1.25 + 20*5 = 1400 micro-dollars; call 2: 60*1 + 1000*0.1 + 10*5 = 210.
    assert_eq!(outcome.cost.micros(), 1400 + 210);
    assert_eq!(
        (
            outcome.usage.input_tokens,
            outcome.usage.cached_input_tokens,
            outcome.usage.cache_write_tokens
        ),
        (2110, 1000, 1000)
    );
}

#[tokio::test]
async fn an_anthropic_answer_streams_piece_by_piece_with_its_tool_input_and_cache_usage_intact() {
    let server = FakeOpenAi::start(|n, _| match n {
        0 => FakeResponse::anthropic(
            None,
            &[("toolu_1", "nap", json!({"seconds": 0}))],
            [50, 0, 1000, 20],
        ),
        1 => FakeResponse::anthropic(Some("Done napping."), &[], [60, 1000, 0, 10]),
        _ => FakeResponse::anthropic(Some("This answer never finishes"), &[], [1, 0, 0, 1])
            .truncated(),
    })
    .await
    .unwrap();
    let h = harness().await;
    let src = spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "60s").replace(
        "primary: openai/gpt-4o-mini",
        "primary: anthropic/claude-haiku-4-5",
    );
    let router = rein_providers::ProviderRouter {
        openai: OpenAiClient::new(reqwest::Client::new(), "http://127.0.0.1:9/v1", None),
        anthropic: rein_providers::AnthropicClient::new(reqwest::Client::new(), server.url(), None),
    };
    let pieces = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let collected = pieces.clone();
    let sink = move |piece: &str| collected.lock().unwrap().push(piece.to_string());
    let streamed = |session: &'static str| {
        h.runtime.run_streaming(
            request(&src, "go", "acme", "ann", session, &[]),
            &router,
            Some(&sink),
        )
    };
    let outcome = streamed("s1").await.unwrap();
    assert_eq!(outcome.reason, Some(TerminationReason::Completed));
    assert_eq!(outcome.output, Some(json!("Done napping.")));
    assert_eq!(
        outcome.tool_calls, 1,
        "the tool input was joined from partial JSON"
    );
    let pieces = pieces.lock().unwrap().clone();
    assert!(pieces.len() > 2, "delivered in pieces: {pieces:?}");
    assert_eq!(pieces.concat(), "Done napping.");
    // The same usage and price as the whole answers of the non-streaming test.
    assert_eq!(outcome.cost.micros(), 1400 + 210);
    assert_eq!(
        (
            outcome.usage.input_tokens,
            outcome.usage.cached_input_tokens,
            outcome.usage.cache_write_tokens,
            outcome.usage.output_tokens
        ),
        (2110, 1000, 1000, 30)
    );
    assert!(
        server
            .requests()
            .iter()
            .all(|(body, _)| body["stream"] == true)
    );

    let broken = streamed("s2").await.unwrap();
    assert_eq!(broken.reason, Some(TerminationReason::Error));
    let detail = broken.detail.unwrap();
    assert!(detail.contains("ended before it was complete"), "{detail}");
    assert_eq!(
        server.request_count(),
        3,
        "a broken stream may be billed: not retried"
    );
}

#[tokio::test]
async fn a_hostile_anthropic_stream_ends_the_run_with_an_error_never_a_panic() {
    let start = r#"data: {"type":"message_start","message":{"model":"m","content":[],"usage":{"input_tokens":5}}}"#;
    let streams: Vec<(&str, String)> = vec![
        ("message is not an object", r#"data: {"type":"message_start","message":5}"#.to_string() + "\n\n"),
        ("delta before message_start", r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"}}"#.to_string() + "\n\n"),
        ("delta to a block never opened", format!("{start}\n\n{}\n\n", r#"data: {"type":"content_block_delta","index":3,"delta":{"type":"text_delta","text":"x"}}"#)),
        ("block that is not an object", format!("{start}\n\n{}\n\n", r#"data: {"type":"content_block_start","index":0,"content_block":7}"#)),
        ("tool input that is not JSON", format!(
            "{start}\n\n{}\n\n{}\n\n{}\n\n",
            r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"t","name":"nap","input":{}}}"#,
            r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"sec"}}"#,
            r#"data: {"type":"content_block_stop","index":0}"#
        )),
        ("usage that is not an object", format!(
            "{}\n\n{}\n\n{}\n\n",
            r#"data: {"type":"message_start","message":{"content":[],"usage":3}}"#,
            r#"data: {"type":"message_delta","delta":{},"usage":{"output_tokens":2}}"#,
            r#"data: {"type":"message_stop"}"#
        )),
        ("an error event", format!("{start}\n\nevent: error\n{}\n\n", r#"data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#)),
        ("not JSON at all", "data: {{{\n\n".to_string()),
    ];
    let h = harness().await;
    let src = spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "60s").replace(
        "primary: openai/gpt-4o-mini",
        "primary: anthropic/claude-haiku-4-5",
    );
    for (name, stream) in streams {
        let server = FakeOpenAi::start(move |_, _| FakeResponse::raw_stream(&stream))
            .await
            .unwrap();
        let router = rein_providers::ProviderRouter {
            openai: OpenAiClient::new(reqwest::Client::new(), "http://127.0.0.1:9/v1", None),
            anthropic: rein_providers::AnthropicClient::new(
                reqwest::Client::new(),
                server.url(),
                None,
            ),
        };
        let sink = |_: &str| {};
        let outcome = h
            .runtime
            .run_streaming(
                request(&src, "go", "acme", "ann", name, &[]),
                &router,
                Some(&sink),
            )
            .await
            .unwrap();
        // A usage that is not an object is survivable: the message itself is complete.
        if name == "usage that is not an object" {
            assert_eq!(outcome.reason, Some(TerminationReason::Completed), "{name}");
            assert_eq!(outcome.usage.output_tokens, 2, "{name}");
        } else {
            assert_eq!(
                outcome.reason,
                Some(TerminationReason::Error),
                "{name}: {outcome:?}"
            );
            assert_eq!(server.request_count(), 1, "{name}: not retried after a 2xx");
        }
    }
}

#[tokio::test]
async fn no_provider_fault_crashes_the_process_or_leaves_a_run_without_a_termination_reason() {
    let h = harness().await;
    let src = spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "60s")
        .replace("max_output_tokens: 200}", "max_output_tokens: 200, retry: {max_attempts: 2, base_delay: 10ms, max_delay: 20ms}, timeout: 300ms}");
    let faults: Vec<(&str, FakeResponse)> = vec![
        ("429 with Retry-After", {
            let mut r = FakeResponse::error(429, "slow down");
            r.retry_after = Some(0);
            r
        }),
        ("500", FakeResponse::error(500, "boom")),
        ("503", FakeResponse::error(503, "overloaded")),
        (
            "hang past the timeout",
            FakeResponse::text("late", 1, 1).after(Duration::from_secs(3)),
        ),
        ("malformed JSON", FakeResponse::malformed()),
        (
            "a tool that does not exist",
            FakeResponse::tool_call("c1", "launch_rockets", &json!({}), 10, 5),
        ),
    ];
    for (name, fault) in faults {
        let server = FakeOpenAi::start(move |_, _| fault.clone()).await.unwrap();
        let client = OpenAiClient::new(reqwest::Client::new(), server.base_url(), None);
        let outcome = run(&h, &src, &client).await;
        assert!(outcome.status.is_terminal(), "{name}: {outcome:?}");
        let record = h
            .runtime
            .store()
            .run(&TenantId::new("acme"), &outcome.run_id)
            .await
            .unwrap();
        assert_eq!(
            record.progress.reason, outcome.reason,
            "{name}: the log records how it ended"
        );
    }
    // A provider that resets every connection: transient, retried, then the run fails cleanly.
    let resetting = rein_fakes::ResettingServer::start().await.unwrap();
    let client = OpenAiClient::new(reqwest::Client::new(), resetting.base_url(), None);
    let outcome = run(&h, &src, &client).await;
    assert_eq!(outcome.reason, Some(TerminationReason::Error));
    assert_eq!(
        resetting.connections(),
        2,
        "reset connections are transient: retried once"
    );
    let detail = outcome.detail.unwrap();
    assert!(
        detail.contains("after 2 attempt(s) (transient)"),
        "{detail}"
    );
}

async fn decide(
    h: &Harness,
    id: &rein_core::RunId,
    approved: bool,
) -> Result<RunOutcome, rein_runtime::RuntimeError> {
    h.runtime
        .decide(
            &TenantId::new("acme"),
            id,
            &PriceTable::default(),
            &one_call("fetch", "{}"),
            rein_runtime::Decision {
                approved,
                by: "ann".into(),
                reason: (!approved).then(|| "not today".to_string()),
            },
        )
        .await
}

#[tokio::test]
async fn a_confirm_tool_is_never_called_before_a_person_approves_it() {
    let service = ToolService::start().await.unwrap();
    let h = harness().await;
    let src = spec(
        &format!("{}/orders/42", service.url()),
        "{timeout: 5s, confirm: true, side_effects: write}",
        "60s",
    );
    let waiting = run(&h, &src, &one_call("fetch", "{}")).await;
    assert_eq!(
        (waiting.status, waiting.reason),
        (RunStatus::AwaitingApproval, None)
    );
    let pending = waiting.awaiting.clone().unwrap();
    assert_eq!(pending.tool, "fetch");
    assert_eq!(service.hits("orders/42"), 0, "held, not called");
    let tenant = TenantId::new("acme");
    let record = h
        .runtime
        .store()
        .run(&tenant, &waiting.run_id)
        .await
        .unwrap();
    assert_eq!(record.progress.status, RunStatus::AwaitingApproval);

    // A resume before anyone decides changes nothing.
    let again = resume(&h, &waiting.run_id).await;
    assert_eq!(again.status, RunStatus::AwaitingApproval);
    assert_eq!(again.events, waiting.events);

    let done = decide(&h, &waiting.run_id, true).await.unwrap();
    assert_eq!(done.reason, Some(TerminationReason::Completed));
    assert_eq!(service.hits("orders/42"), 1, "called once, after approval");
    let events = h
        .runtime
        .store()
        .events(&tenant, &done.run_id)
        .await
        .unwrap();
    let decided: Vec<(String, bool)> = events
        .iter()
        .filter_map(|e| match e.decode().unwrap().kind {
            EventKind::ApprovalDecided { by, approved, .. } => Some((by, approved)),
            _ => None,
        })
        .collect();
    assert_eq!(decided, [("ann".to_string(), true)]);
    let record = h.runtime.store().run(&tenant, &done.run_id).await.unwrap();
    rein_core::verify_chain(&events, Some((record.event_count, &record.head_hash))).unwrap();
    assert!(matches!(
        decide(&h, &done.run_id, true).await,
        Err(rein_runtime::RuntimeError::Ended(_, RunStatus::Completed))
    ));
}

#[tokio::test]
async fn a_denied_call_is_never_made_and_the_model_hears_why() {
    let service = ToolService::start().await.unwrap();
    let h = harness().await;
    let src = spec(
        &format!("{}/orders/42", service.url()),
        "{timeout: 5s, confirm: true, side_effects: write}",
        "60s",
    );
    let waiting = run(&h, &src, &one_call("fetch", "{}")).await;
    let done = decide(&h, &waiting.run_id, false).await.unwrap();
    assert_eq!(done.reason, Some(TerminationReason::Completed));
    assert_eq!(service.hits("orders/42"), 0);
    let results = tool_results(&h, &done).await;
    let message = results[0].0.message.clone().unwrap();
    assert!(
        message.contains("a person (ann) denied this call to `fetch`: not today"),
        "{message}"
    );
}

#[tokio::test]
async fn an_escalated_run_hands_over_its_steps_and_where_its_trace_is() {
    let service = ToolService::start().await.unwrap();
    let h = harness().await;
    // Every lookup is of an order that does not exist: the same error, three times.
    let src = format!(
        r#"
name: lookup
version: 1
model: {{primary: openai/gpt-4o-mini}}
instructions: Look the order up.
tools:
  - name: fetch
    description: Looks an order up.
    input_schema: {{type: object, properties: {{n: {{type: string}}}}, required: [n]}}
    source: {{http: {{url: "{}/orders/0", method: GET}}}}
    contract: {{timeout: 5s, side_effects: read}}
limits: {{max_iterations: 10, max_total_tokens: 50000, max_cost_usd: 0.10}}
escalation: {{on: [repeated_tool_failure]}}
"#,
        service.url()
    );
    let model = ScriptedModel::parse(
        "script.yaml",
        "responses:\n  - tool_calls: [{name: fetch, arguments: {n: \"{n}\"}}]\nrepeat_last: true\n",
    )
    .unwrap();
    let outcome = run(&h, &src, &model).await;
    assert_eq!(
        (outcome.status, outcome.reason),
        (RunStatus::Escalated, Some(TerminationReason::Escalated))
    );
    let handoff = &outcome.output.as_ref().unwrap()["handoff"];
    assert_eq!(handoff["trigger"], "repeated_tool_failure");
    assert_eq!(handoff["asked"], "go");
    assert_eq!(handoff["done"].as_array().unwrap().len(), 3, "{handoff}");
    assert_eq!(handoff["trace"]["run_id"], outcome.run_id.as_str());
    let record = h
        .runtime
        .store()
        .run(&TenantId::new("acme"), &outcome.run_id)
        .await
        .unwrap();
    assert_eq!(record.progress.status, RunStatus::Escalated);
    assert_eq!(record.progress.output.as_ref(), outcome.output.as_ref());
}

#[tokio::test]
async fn a_session_carries_its_conversation_and_an_expired_one_starts_from_a_summary() {
    let server = FakeOpenAi::start(|_, body| {
        let first = body["messages"][0]["content"].as_str().unwrap_or("");
        let last = body["messages"].as_array().unwrap().last().unwrap()["content"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if first == rein_core::engine::SUMMARIZE_INSTRUCTIONS {
            FakeResponse::text("The user is Ann.", 50, 5)
        } else {
            FakeResponse::text(&format!("reply to: {last}"), 20, 5)
        }
    })
    .await
    .unwrap();
    let h = harness().await;
    let src = r#"
name: chat
version: 1
model: {primary: openai/gpt-4o-mini}
instructions: Chat.
tools:
  - name: nap
    source: {builtin: sleep}
    contract: {side_effects: none}
limits: {max_iterations: 4, max_total_tokens: 20000, max_cost_usd: 0.10}
session: {ttl: 400ms}
"#;
    let client = OpenAiClient::new(reqwest::Client::new(), server.base_url(), None);
    let turn = |input: &'static str| {
        let request = request(src, input, "acme", "ann", "conv", &[]);
        let runtime = h.runtime.clone();
        let client = client.clone();
        async move { runtime.run(request, &client).await.unwrap() }
    };
    // Each message's text; the instructions without the fence's explanation (the agent has a
    // tool, so its runs fence what tools bring).
    let contents = |body: &serde_json::Value| -> Vec<String> {
        body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let text = m["content"].as_str().unwrap_or("");
                let own = text.split("\n\nSome content in this conversation comes from outside");
                own.into_iter().next().unwrap_or("").to_string()
            })
            .collect()
    };

    turn("My name is Ann.").await;
    let second = turn("What is my name?").await;
    assert_eq!(second.reason, Some(TerminationReason::Completed));
    let requests = server.requests();
    assert_eq!(
        contents(&requests[1].0),
        [
            "Chat.",
            "My name is Ann.",
            "reply to: My name is Ann.",
            "What is my name?"
        ],
        "within the TTL the run continues the conversation"
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    let third = turn("Anything else?").await;
    assert_eq!(third.reason, Some(TerminationReason::Completed));
    let requests = server.requests();
    let (summary_call, _) = &requests[2];
    assert_eq!(
        contents(summary_call)[0],
        rein_core::engine::SUMMARIZE_INSTRUCTIONS
    );
    assert!(contents(summary_call)[1].contains("User: What is my name?"));
    assert!(
        summary_call.get("tools").is_none(),
        "a summary is asked without tools"
    );
    let (answer_call, _) = &requests[3];
    let sent = contents(answer_call);
    assert_eq!(
        sent,
        [
            "Chat.",
            "(Summary of this session's earlier conversation: The user is Ann.)",
            "Anything else?"
        ],
        "after the TTL the run starts from the summary, not the old messages"
    );
    assert_eq!(
        third.iterations, 2,
        "the summary is one of the run's own, budgeted calls"
    );

    // The next run continues from the summary plus the latest turn.
    turn("Thanks.").await;
    let requests = server.requests();
    assert_eq!(
        contents(&requests[4].0),
        [
            "Chat.",
            "(Summary of this session's earlier conversation: The user is Ann.)",
            "Anything else?",
            "reply to: Anything else?",
            "Thanks."
        ]
    );
}

#[tokio::test]
async fn a_worker_resolves_an_approval_that_timed_out_by_its_policy() {
    let service = ToolService::start().await.unwrap();
    let h = harness().await;
    let src = format!(
        "{}approval: {{timeout: 50ms}}\n",
        spec(
            &format!("{}/orders/42", service.url()),
            "{timeout: 5s, confirm: true, side_effects: write}",
            "60s",
        )
    );
    let waiting = run(&h, &src, &one_call("fetch", "{}")).await;
    assert_eq!(waiting.status, RunStatus::AwaitingApproval);
    let model = one_call("fetch", "{}");
    let prices = PriceTable::default();
    assert!(
        h.runtime.work_one(&prices, &model).await.unwrap().is_none(),
        "not before its timeout"
    );
    tokio::time::sleep(Duration::from_millis(80)).await;
    let done = h.runtime.work_one(&prices, &model).await.unwrap().unwrap();
    assert_eq!(done.run_id, waiting.run_id);
    assert_eq!(done.reason, Some(TerminationReason::Completed));
    assert_eq!(
        service.hits("orders/42"),
        0,
        "denied by policy, never called"
    );
    let results = tool_results(&h, &done).await;
    assert!(results[0].0.message.as_deref().unwrap().contains("denied"));
}

#[tokio::test]
async fn a_session_whose_conversation_outgrows_a_quarter_of_the_token_cap_is_summarized() {
    let server = FakeOpenAi::start(|_, body| {
        if body["messages"][0]["content"] == rein_core::engine::SUMMARIZE_INSTRUCTIONS {
            FakeResponse::text("A long report was pasted.", 50, 5)
        } else {
            FakeResponse::text("noted", 20, 5)
        }
    })
    .await
    .unwrap();
    let h = harness().await;
    // A cap of 8,000 tokens leaves 2,000 for carried conversation; the first turn is ~3,000.
    let src = r#"
name: chat
version: 1
model: {primary: openai/gpt-4o-mini, max_output_tokens: 100}
instructions: Chat.
limits: {max_iterations: 4, max_total_tokens: 8000, max_cost_usd: 0.10}
session: {ttl: 1h}
"#;
    let client = OpenAiClient::new(reqwest::Client::new(), server.base_url(), None);
    let long = "lorem ipsum ".repeat(500);
    let first = h
        .runtime
        .run(request(src, &long, "acme", "ann", "big", &[]), &client)
        .await
        .unwrap();
    assert_eq!(first.reason, Some(TerminationReason::Completed));
    let second = h
        .runtime
        .run(request(src, "And now?", "acme", "ann", "big", &[]), &client)
        .await
        .unwrap();
    assert_eq!(second.reason, Some(TerminationReason::Completed));
    let requests = server.requests();
    assert_eq!(
        requests[1].0["messages"][0]["content"],
        rein_core::engine::SUMMARIZE_INSTRUCTIONS,
        "summarized within the TTL because of its size"
    );
    let sent = requests[2].0["messages"].to_string();
    assert!(
        !sent.contains("lorem ipsum lorem"),
        "the long turn was not carried raw"
    );
}

#[tokio::test]
async fn a_queued_run_whose_spec_no_longer_checks_is_ended_not_claimed_forever() {
    let h = harness().await;
    let src = spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "60s");
    let id = h
        .runtime
        .enqueue(request(&src, "go", "acme", "ann", "s1", &[]))
        .await
        .unwrap();
    // The operator's price table lost the model the run pinned.
    let model = one_call("fetch", "{}");
    let err = h
        .runtime
        .work_one(&PriceTable::empty(), &model)
        .await
        .unwrap_err();
    assert!(
        matches!(err, rein_runtime::RuntimeError::PinnedSpec(_)),
        "{err}"
    );
    let record = h
        .runtime
        .store()
        .run(&TenantId::new("acme"), &id)
        .await
        .unwrap();
    assert_eq!(record.progress.status, RunStatus::Failed);
    assert!(
        record
            .progress
            .detail
            .unwrap()
            .contains("cannot be continued")
    );
    assert!(
        h.runtime
            .work_one(&PriceTable::empty(), &model)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_queued_run_is_cancelled_at_once_and_never_claimed() {
    let h = harness().await;
    let src = spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "60s");
    let id = h
        .runtime
        .enqueue(request(&src, "go", "acme", "ann", "s1", &[]))
        .await
        .unwrap();
    let acme = TenantId::new("acme");
    // Another tenant cannot cancel it: to them it does not exist.
    let other = h
        .runtime
        .cancel(&TenantId::new("rival"), &id, "api:rival")
        .await
        .unwrap_err();
    assert!(
        matches!(
            other,
            rein_runtime::RuntimeError::Store(rein_store::StoreError::NotFound(_))
        ),
        "{other}"
    );
    let done = h.runtime.cancel(&acme, &id, "api:acme").await.unwrap();
    assert_eq!(done, rein_runtime::Cancelled::Ended);
    let record = h.runtime.store().run(&acme, &id).await.unwrap();
    assert_eq!(record.progress.status, RunStatus::Cancelled);
    assert_eq!(
        record.progress.detail.as_deref(),
        Some("cancelled by api:acme")
    );
    // No worker takes it up, and it cannot be cancelled twice.
    let model = one_call("fetch", "{}");
    assert!(
        h.runtime
            .work_one(&PriceTable::default(), &model)
            .await
            .unwrap()
            .is_none()
    );
    let again = h.runtime.cancel(&acme, &id, "api:acme").await.unwrap_err();
    assert!(
        matches!(
            again,
            rein_runtime::RuntimeError::Ended(_, RunStatus::Cancelled)
        ),
        "{again}"
    );
}

/// A model that never answers (the process serving the call is stopped meanwhile), and one
/// that counts the calls made to it.
struct Stalls(std::sync::atomic::AtomicUsize);

impl Model for Stalls {
    fn complete<'a>(
        &'a self,
        _request: rein_providers::ModelRequest<'a>,
    ) -> rein_providers::BoxFuture<'a, Result<rein_core::ModelReply, rein_providers::ModelError>>
    {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(std::future::pending())
    }
}

/// Starts `request` with a model that never answers, waits until the model is called, then
/// kills the task as a crash would. Returns the run id.
async fn crash_during_model_call(h: &Harness, request: RunRequest) -> rein_core::RunId {
    let runtime = h.runtime.clone();
    let tenant = request.tenant.clone();
    let stalls = Arc::new(Stalls(Default::default()));
    let model = stalls.clone();
    let task = tokio::spawn(async move { runtime.run(request, model.as_ref()).await });
    let started = Instant::now();
    while stalls.0.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the model was never called"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    task.abort();
    let _ = task.await;
    let mut newest = run_ids(h, &tenant, 1).await;
    newest.pop().expect("the run was recorded")
}

/// The ids of `tenant`'s newest runs, at most `limit`, newest first.
async fn run_ids(h: &Harness, tenant: &TenantId, limit: u32) -> Vec<rein_core::RunId> {
    h.runtime
        .store()
        .list_runs(tenant, &Default::default(), limit)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.info.id)
        .collect()
}

/// A gateway call whose process stopped while the model was answering is ended when the run
/// is taken over, not called again: its caller's connection went with the process, so no one
/// would receive the answer.
#[tokio::test]
async fn a_gateway_call_interrupted_mid_model_call_is_ended_not_called_again() {
    let h = harness().await;
    let tenant = TenantId::new("acme");
    let src = "name: gateway\nversion: 1\nmodel: {primary: openai/gpt-4o-mini, max_output_tokens: 50}\ninstructions: Answer.\nlimits: {max_iterations: 1, max_total_tokens: 5000, max_cost_usd: 0.05, timeout: 60s}\n";
    let mut gateway_call = request(src, "hi", "acme", "ann", "s1", &[]);
    gateway_call.chat = Some(rein_core::ChatRequest {
        messages: vec![rein_core::Message::text(rein_core::Role::User, "hi")],
        tools: Vec::new(),
        max_output_tokens: None,
        temperature: None,
        tool_choice: None,
    });
    let id = crash_during_model_call(&h, gateway_call).await;

    let again = Stalls(Default::default());
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        h.runtime
            .resume(&tenant, &id, &PriceTable::default(), &again),
    )
    .await
    .expect("the resumed call waited on the model")
    .unwrap();
    assert_eq!(again.0.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(outcome.status, RunStatus::Failed);
    assert_eq!(outcome.reason, Some(TerminationReason::Error));
    assert!(
        outcome.detail.as_deref().unwrap().contains("interrupted"),
        "{:?}",
        outcome.detail
    );
    let kinds: Vec<String> = h
        .runtime
        .store()
        .events(&tenant, &id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "model_requested").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(kinds.last().map(String::as_str), Some("run_finished"));

    // A run that is not a gateway call is resumed as before: its model is called again.
    let plain = crash_during_model_call(&h, request(src, "hi", "acme", "ann", "s2", &[])).await;
    let called = Stalls(Default::default());
    let resumed = tokio::time::timeout(
        Duration::from_millis(300),
        h.runtime
            .resume(&tenant, &plain, &PriceTable::default(), &called),
    )
    .await;
    assert!(resumed.is_err(), "the plain run did not wait on its model");
    assert_eq!(called.0.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Runs driven longer than their lease keep it (one task renews every lease this process
/// holds), so no other process can take them over; once their drivers stop, renewal stops and
/// the leases run out.
#[tokio::test]
async fn runs_driven_past_their_lease_keep_it_until_their_drivers_stop() {
    let mut h = harness().await;
    h.runtime = h.runtime.with_lease(Duration::from_millis(300));
    let src = "name: slow\nversion: 1\nmodel: {primary: openai/gpt-4o-mini, max_output_tokens: 50}\ninstructions: Answer.\nlimits: {max_iterations: 1, max_total_tokens: 5000, max_cost_usd: 0.05, timeout: 60s}\n";
    let stalls = Arc::new(Stalls(Default::default()));
    let mut tasks = Vec::new();
    for session in ["s1", "s2"] {
        let (runtime, model) = (h.runtime.clone(), stalls.clone());
        let request = request(src, "hi", "acme", "ann", session, &[]);
        tasks.push(tokio::spawn(async move {
            runtime.run(request, model.as_ref()).await
        }));
    }
    let started = Instant::now();
    while stalls.0.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the runs never called their model"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let runs = run_ids(&h, &TenantId::new("acme"), 10).await;
    assert_eq!(runs.len(), 2);
    let store = h.runtime.store();
    let take_over = |run| async move {
        let lease = rein_store::Lease {
            owner: "another-process",
            until_ms: rein_runtime::now_ms() + 60_000,
        };
        store
            .acquire(run, lease, rein_runtime::now_ms())
            .await
            .unwrap()
    };
    // Three leases' length: each lease would have run out twice over without renewal.
    tokio::time::sleep(Duration::from_millis(900)).await;
    for run in &runs {
        assert!(
            !take_over(run).await,
            "run {run} lost its lease while driven"
        );
    }
    for task in tasks {
        task.abort();
        let _ = task.await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    for run in &runs {
        assert!(
            take_over(run).await,
            "run {run} was still renewed after its driver stopped"
        );
    }
}

/// Naps `seconds` twice, then answers "done".
fn two_naps(seconds: f64) -> ScriptedModel {
    let call =
        format!("  - tool_calls: [{{name: nap, raw_arguments: '{{\"seconds\": {seconds}}}'}}]\n");
    let script = format!("responses:\n{call}{call}  - text: done\n");
    ScriptedModel::parse("script.yaml", &script).unwrap()
}

fn kinds(events: &[rein_core::SealedEvent]) -> Vec<String> {
    events.iter().map(|e| e.kind.clone()).collect()
}

/// Two runtimes that share nothing but the database, as two processes do: `driver`'s runtime
/// drives a run, `other`'s cancels it. The request waits in the store; the driver finds it
/// within `CANCEL_POLL` and ends the run before its next step, so the nap in flight finishes
/// and the second never starts. A run whose driver died with a request pending is ended by the
/// next process to take it up, before anything runs.
async fn cancel_across_processes(
    driver: Arc<dyn rein_store::Store>,
    other: Arc<dyn rein_store::Store>,
) {
    let tools = || {
        ToolBox::new(
            Builtins::standard(),
            HttpTools::new(
                reqwest::Client::new(),
                rein_tools::Egress::closed(rein_tools::CONNECT_TIMEOUT).unwrap(),
            ),
        )
    };
    let a = Runtime::new(driver, tools());
    let b = Runtime::new(other.clone(), tools());
    let acme = TenantId::new("acme");
    let src = spec("http://127.0.0.1:9/unused", "{timeout: 5s}", "60s");
    let driving = tokio::spawn({
        let (a, src) = (a.clone(), src.clone());
        async move {
            a.run(
                request(&src, "go", "acme", "ann", "s1", &[]),
                &two_naps(3.0),
            )
            .await
            .unwrap()
        }
    });
    // Once the first nap is under way in `a`, `b` asks to cancel.
    let deadline = Instant::now() + Duration::from_secs(10);
    let id = loop {
        let runs = other
            .list_runs(&acme, &rein_store::RunFilter::default(), 10)
            .await
            .unwrap();
        if let Some(run) = runs.first() {
            let events = other.events(&acme, &run.info.id).await.unwrap();
            if kinds(&events).iter().any(|k| k == "tool_requested") {
                break run.info.id.clone();
            }
        }
        assert!(Instant::now() < deadline, "the run never reached its nap");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let asked = b.cancel(&acme, &id, "api:acme").await.unwrap();
    assert_eq!(asked, rein_runtime::Cancelled::Requested);
    let outcome = driving.await.unwrap();
    assert_eq!(outcome.status, RunStatus::Cancelled);
    assert_eq!(outcome.reason, Some(TerminationReason::Cancelled));
    assert_eq!(
        outcome.detail.as_deref(),
        Some("cancelled by api:acme while it ran")
    );
    let kinds = kinds(&other.events(&acme, &id).await.unwrap());
    assert_eq!(
        kinds.iter().filter(|k| *k == "tool_result").count(),
        1,
        "the nap in flight finished and no other began: {kinds:?}"
    );
    assert_eq!(kinds.last().map(String::as_str), Some("run_finished"));
    let again = b.cancel(&acme, &id, "api:acme").await.unwrap_err();
    assert!(
        matches!(
            again,
            rein_runtime::RuntimeError::Ended(_, RunStatus::Cancelled)
        ),
        "{again}"
    );

    // A process died driving a run, with a request to cancel it pending: the next process to
    // take it up ends it before any step.
    let queued = b
        .enqueue(request(&src, "go", "acme", "ann", "s2", &[]))
        .await
        .unwrap();
    let ghost = rein_store::Lease {
        owner: "ghost",
        until_ms: rein_runtime::now_ms() + 300,
    };
    assert!(
        other
            .acquire(&queued, ghost, rein_runtime::now_ms())
            .await
            .unwrap()
    );
    let asked = b.cancel(&acme, &queued, "cli:ann").await.unwrap();
    assert_eq!(
        asked,
        rein_runtime::Cancelled::Requested,
        "the ghost holds it"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let outcome = a
        .work_one(&PriceTable::default(), &two_naps(0.0))
        .await
        .unwrap()
        .expect("the ghost's run is claimed once its lease runs out");
    assert_eq!(outcome.run_id, queued);
    assert_eq!(outcome.status, RunStatus::Cancelled);
    assert_eq!(
        outcome.detail.as_deref(),
        Some("cancelled by cli:ann while it ran")
    );
    let kinds = self::kinds(&other.events(&acme, &queued).await.unwrap());
    assert!(
        !kinds.iter().any(|k| k == "model_requested"),
        "nothing ran: {kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_driven_by_another_process_is_cancelled_through_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rein.db");
    let one = SqliteStore::open(&path, Default::default()).await.unwrap();
    let two = SqliteStore::open(&path, Default::default()).await.unwrap();
    cancel_across_processes(Arc::new(one), Arc::new(two)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_driven_by_another_process_is_cancelled_through_postgres() {
    let schema = rein_store::testing::TestSchema::create()
        .await
        .expect("PostgreSQL must be running on 127.0.0.1:5432 (scripts/test starts it)");
    let one = rein_store::PgStore::connect(&schema.url()).await.unwrap();
    let two = rein_store::PgStore::connect(&schema.url()).await.unwrap();
    let (one, two): (Arc<dyn rein_store::Store>, Arc<dyn rein_store::Store>) =
        (Arc::new(one), Arc::new(two));
    cancel_across_processes(one.clone(), two.clone()).await;
    one.close().await;
    two.close().await;
    schema.drop_schema().await.unwrap();
}

/// A process died while a run's worker (and that worker's own worker) ran; once the leases ran
/// out, the caller is cancelled where it lies. Nothing will ever continue the workers (a
/// worker's run is not claimed on its own), so the cancel ends them too, down the tree.
#[tokio::test]
async fn cancelling_a_caller_left_by_a_dead_process_ends_its_workers_down_the_tree() {
    use rein_core::event::{Event, ParentLink, WorkerBudget};
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn rein_store::Store> = Arc::new(
        SqliteStore::open(dir.path().join("rein.db"), Default::default())
            .await
            .unwrap(),
    );
    let tools = ToolBox::new(
        Builtins::standard(),
        HttpTools::new(
            reqwest::Client::new(),
            rein_tools::Egress::closed(rein_tools::CONNECT_TIMEOUT).unwrap(),
        ),
    );
    let runtime = Runtime::new(store.clone(), tools);
    let acme = TenantId::new("acme");
    let ids = ["caller", "worker", "its-worker"].map(rein_core::RunId::new);
    let ghost = rein_store::Lease {
        owner: "ghost",
        until_ms: rein_runtime::now_ms() - 1,
    };
    for (depth, id) in ids.iter().enumerate() {
        let parent = depth.checked_sub(1).map(|up| ParentLink {
            run_id: ids[up].clone(),
            step: 2,
            depth: u32::try_from(depth).unwrap(),
            max_depth: 3,
        });
        let mut kinds = vec![EventKind::RunStarted {
            agent: "a".into(),
            agent_version: 1,
            spec_sha256: "0".repeat(64),
            input: "go".into(),
            tenant: acme.clone(),
            user: UserId::new("ann"),
            session: SessionId::new("s"),
            job: None,
            granted_scopes: Vec::new(),
            trace_parent: None,
            fence: None,
            parent: parent.clone(),
            trust: Some(rein_core::Trust::Operator),
        }];
        if let Some(below) = ids.get(depth + 1) {
            kinds.push(EventKind::WorkerStarted {
                step: 2,
                call_id: "c1".into(),
                tool: "delegate".into(),
                spec: "w.yaml".into(),
                run_id: below.clone(),
                budget: WorkerBudget {
                    max_cost_usd: rein_core::Usd::from_micros(1_000),
                    max_total_tokens: 1_000,
                    depth: u32::try_from(depth + 1).unwrap(),
                    max_depth: 3,
                },
                fallback: false,
            });
        }
        let mut prev = rein_core::GENESIS_HASH.to_string();
        let sealed: Vec<_> = kinds
            .into_iter()
            .enumerate()
            .map(|(seq, kind)| {
                let event = Event {
                    seq: seq as u64,
                    ts_ms: 1,
                    kind,
                }
                .seal(id, &prev);
                prev = event.hash.clone();
                event
            })
            .collect();
        let info = rein_store::RunInfo {
            id: id.clone(),
            tenant: acme.clone(),
            user: UserId::new("ann"),
            session: SessionId::new("s"),
            job: None,
            agent: "a".into(),
            agent_version: 1,
            spec: "name: a".into(),
            input: "go".into(),
            created_ms: 1,
            parent: parent.map(|p| p.run_id),
        };
        store
            .create_run(&info, &sealed[..1], Some(ghost))
            .await
            .unwrap();
        store.append_all(&acme, &sealed[1..]).await.unwrap();
    }
    assert_eq!(
        store
            .claim(ghost, rein_runtime::now_ms(), None)
            .await
            .unwrap()
            .map(|(_, id)| id),
        Some(ids[0].clone()),
        "only the caller is claimable"
    );
    store.release(&ids[0], "ghost").await.unwrap();

    let cancelled = runtime.cancel(&acme, &ids[0], "cli:ann").await.unwrap();
    assert_eq!(cancelled, rein_runtime::Cancelled::Ended);
    for (up, id) in ids.iter().enumerate().skip(1) {
        let record = store.run(&acme, id).await.unwrap();
        assert_eq!(record.progress.status, RunStatus::Cancelled, "{id}");
        assert_eq!(
            record.progress.detail.as_deref(),
            Some(
                format!(
                    "its caller, run {}, ended without it after a crash interrupted it",
                    ids[up - 1]
                )
                .as_str()
            ),
        );
        rein_core::verify_chain(&store.events(&acme, id).await.unwrap(), None).unwrap();
    }
    assert_eq!(store.unfinished().await.unwrap(), 0);
}
