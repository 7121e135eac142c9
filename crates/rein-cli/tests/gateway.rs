//! The OpenAI-compatible gateway of `rein serve`, driven over HTTP: the official `openai` Python
//! package completes a chat call and a streamed call through it to the fake provider, the
//! tenant's budget drops by each call's cost, and a call the budget cannot cover is a 429 with
//! the reason; tool calls and the caller's own conversation pass through as they are; every
//! call is a one-step run with its own verified log; bad requests change nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use rein_fakes::{FakeOpenAi, FakeResponse};
use serde_json::{Value, json};
use std::process::Command;

/// $100 per million tokens: each answer (40 in, 20 out) costs exactly $0.006, and a call's
/// worst case (Rein's estimate of the input plus `max_tokens: 20`) about $0.004 to $0.006. So a
/// $0.015 daily budget covers two calls and refuses the third before it is made.
const CONFIG: &str = r#"
[prices."openai/fake-model"]
input = 100.0
output = 100.0

[budgets]
tenant_daily_usd = 0.015

[gateway]
max_output_tokens = 64
"#;

const CALL_MICROS: i64 = 6_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_clients_call_through_the_governed_gateway() {
    let fake = FakeOpenAi::start(|_, body| {
        if body["tools"].is_array() {
            FakeResponse::tool_call("call_1", "lookup", &json!({"q": "weather"}), 40, 20)
        } else {
            FakeResponse::text("Hello from the fake.", 40, 20)
        }
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rein.toml"), CONFIG).unwrap();
    let key_a = common::tenant_key(dir.path(), "acme");
    let key_b = common::tenant_key(dir.path(), "rival");
    let server = common::serve(
        dir.path(),
        &["--db", "rein.db", "--config", "rein.toml"],
        &[
            ("OPENAI_BASE_URL", fake.base_url().as_str()),
            ("OPENAI_API_KEY", "sk-operator-test"),
        ],
    );
    let base = server.base.clone();
    let url = |path: &str| format!("{base}{path}");
    let http = reqwest::Client::new();

    // The models a tenant may name.
    let models: Value = common::get_json(&http, &url("/v1/models"), &key_b).await;
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "openai/fake-model"),
        "{models}"
    );

    // A tenant's own agent cannot take the gateway's name.
    let reserved = http
        .post(url("/v1/agents"))
        .bearer_auth(&key_b)
        .body("name: gateway\nversion: 1\nmodel: {primary: openai/fake-model}\ninstructions: x\nlimits: {max_iterations: 1, max_total_tokens: 100, max_cost_usd: 0.1}\n")
        .send()
        .await
        .unwrap();
    assert_eq!(reserved.status(), 422);
    let problem: Value = reserved.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("reserved"),
        "{problem}"
    );

    // Tool calls go back to the caller, and its conversation reaches the provider as it is.
    let tools = json!([{"type": "function", "function": {
        "name": "lookup", "description": "Looks things up.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]);
    let answered = http
        .post(url("/v1/chat/completions"))
        .bearer_auth(&key_b)
        .json(&json!({
            "model": "fake-model",
            "messages": [{"role": "developer", "content": "Use tools."},
                         {"role": "user", "content": [{"type": "text", "text": "Weather?"}]}],
            "tools": tools,
            "tool_choice": "required",
            "max_tokens": 20,
            "user": "u-7",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);
    let run_b = answered.headers()["x-rein-run-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(answered.headers()["x-rein-cost-usd"], "$0.006000");
    let answered: Value = answered.json().await.unwrap();
    assert_eq!(answered["object"], "chat.completion");
    assert_eq!(answered["choices"][0]["finish_reason"], "tool_calls");
    let call = &answered["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["id"], "call_1");
    assert_eq!(call["function"]["name"], "lookup");
    assert_eq!(call["function"]["arguments"], r#"{"q":"weather"}"#);
    assert_eq!(answered["usage"]["total_tokens"], 60);
    let sent = &fake.requests()[0].0;
    assert_eq!(sent["model"], "fake-model");
    assert_eq!(
        sent["messages"],
        json!([{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather?"}])
    );
    assert_eq!(sent["tools"][0]["function"]["name"], "lookup");
    assert_eq!(sent["tool_choice"], "required");
    assert_eq!(sent["max_tokens"], 20);

    // The call is a one-step run of the caller's tenant, with a complete log.
    let run: Value =
        common::get_json(&http, &url(&format!("/v1/runs/{run_b}/trace")), &key_b).await;
    assert_eq!(run["run"]["agent"], "gateway");
    assert_eq!(run["run"]["user"], "u-7");
    assert_eq!(run["run"]["status"], "completed");
    let kinds: Vec<&str> = run["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "run_started",
            "chat_request",
            "budget_reserved",
            "model_requested",
            "model_responded",
            "budget_settled",
            "run_finished"
        ]
    );
    // Another tenant cannot see it.
    let hidden = http
        .get(url(&format!("/v1/runs/{run_b}")))
        .bearer_auth(&key_a)
        .send()
        .await
        .unwrap();
    assert_eq!(hidden.status(), 404);

    // Bad requests: each its own 4xx, in OpenAI's error shape too, and nothing recorded.
    let calls_before = fake.request_count();
    let bad: [(Option<&str>, &str, &str, u16, &str); 6] = [
        (
            Some(&key_b),
            "text/plain",
            r#"{"model":"fake-model","messages":[]}"#,
            415,
            "Content-Type",
        ),
        (
            Some(&key_b),
            "application/json",
            r#"{"model":"fake-model","messages":[{"role":"user","content":"x"}],"stop":["."]}"#,
            422,
            "unknown field `stop`",
        ),
        (
            Some(&key_b),
            "application/json",
            r#"{"model":"no-such-model","messages":[{"role":"user","content":"x"}]}"#,
            404,
            "GET /v1/models",
        ),
        (
            Some(&key_b),
            "application/json",
            r#"{"model":"fake-model","messages":[]}"#,
            422,
            "`messages` is empty",
        ),
        (
            Some(&key_b),
            "application/json",
            r#"{"model":"fake-model","messages":[{"role":"robot","content":"x"}]}"#,
            422,
            "messages[0].role",
        ),
        (
            None,
            "application/json",
            r#"{"model":"fake-model","messages":[{"role":"user","content":"x"}]}"#,
            401,
            "Authorization",
        ),
    ];
    for (key, content_type, body, status, says) in bad {
        let mut request = http
            .post(url("/v1/chat/completions"))
            .header("content-type", content_type)
            .body(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status(), status, "{body}");
        assert_eq!(answer.headers()["content-type"], "application/problem+json");
        let problem: Value = answer.json().await.unwrap();
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(says), "{body}: {detail}");
        assert_eq!(problem["error"]["message"], detail, "{body}");
        if status == 401 {
            assert_eq!(problem["error"]["code"], "invalid_api_key");
        }
    }
    assert_eq!(fake.request_count(), calls_before);
    let runs_b: Value = common::get_json(&http, &url("/v1/runs"), &key_b).await;
    assert_eq!(runs_b.as_array().unwrap().len(), 1, "{runs_b}");

    // The official client: a call, a streamed call, then one the budget cannot cover.
    let Some(python) = common::python_with_openai() else {
        return;
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/gateway_client.py");
    let out = Command::new(python)
        .arg(script)
        .env("REIN_BASE_URL", url("/v1"))
        .env("REIN_KEY", &key_a)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["chat"]["content"], "Hello from the fake.", "{seen}");
    assert_eq!(seen["chat"]["finish_reason"], "stop");
    assert_eq!(seen["chat"]["prompt_tokens"], 40);
    assert_eq!(seen["chat"]["completion_tokens"], 20);
    assert_eq!(seen["stream"]["text"], "Hello from the fake.", "{seen}");
    assert!(seen["stream"]["pieces"].as_u64().unwrap() > 1, "{seen}");
    assert_eq!(seen["stream"]["finish_reason"], "stop");
    assert_eq!(seen["stream"]["total_tokens"], 60);
    let spent = |k: &str| seen[k].as_i64().unwrap();
    assert_eq!(spent("spent_before"), 0);
    assert_eq!(spent("spent_after_chat"), CALL_MICROS);
    assert_eq!(spent("spent_after_stream"), 2 * CALL_MICROS);
    assert_eq!(spent("spent_after_refusal"), 2 * CALL_MICROS);
    let refused = &seen["refused"];
    assert_eq!(refused["status"], 429, "{seen}");
    assert_eq!(refused["should_retry"], "false");
    let message = refused["message"].as_str().unwrap();
    assert!(message.contains("budget tenant"), "{message}");
    // The refused call never reached the provider; the streamed one asked it to stream.
    let requests = fake.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[2].0["stream"], true);

    // Three one-step runs for acme, each log intact.
    let runs_a: Value = common::get_json(&http, &url("/v1/runs?agent=gateway"), &key_a).await;
    let mut statuses: Vec<&str> = runs_a
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        ["completed", "completed", "limit_exceeded"],
        "{runs_a}"
    );
    // The list a page at a time: the `Link` header names the next page, with the same query.
    let page = |path: String| {
        let (http, key) = (http.clone(), key_a.clone());
        async move {
            let answer = http.get(path).bearer_auth(key).send().await.unwrap();
            assert_eq!(answer.status(), 200);
            let next = answer
                .headers()
                .get("link")
                .map(|l| l.to_str().unwrap().to_string());
            (answer.json::<Value>().await.unwrap(), next)
        }
    };
    let ids = |runs: &Value| -> Vec<String> {
        runs.as_array()
            .unwrap()
            .iter()
            .map(|r| r["run_id"].as_str().unwrap().to_string())
            .collect()
    };
    let (first, link) = page(url("/v1/runs?agent=gateway&limit=2")).await;
    let link = link.expect("two of three runs: a next page");
    let next = link
        .strip_prefix('<')
        .and_then(|l| l.strip_suffix(">; rel=\"next\""))
        .unwrap_or_else(|| panic!("{link}"));
    assert!(
        next.starts_with("/v1/runs?agent=gateway&limit=2&before="),
        "{next}"
    );
    let (rest, none) = page(url(next)).await;
    assert_eq!(none, None, "the last page names no next");
    assert_eq!(
        [ids(&first), ids(&rest)].concat(),
        ids(&runs_a),
        "the pages are the list, newest first"
    );
    let b_run = runs_b[0]["run_id"].as_str().unwrap();
    for cursor in [b_run, "no-such-run"] {
        let answer = http
            .get(url(&format!("/v1/runs?before={cursor}")))
            .bearer_auth(&key_a)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 404, "{cursor}");
    }
    let audit: Value = common::get_json(&http, &url("/v1/audit/verify"), &key_a).await;
    assert_eq!(audit["ok"], true, "{audit}");
    assert_eq!(audit["runs"], 3);
    assert!(audit.get("next").is_none(), "{audit}");
    // A page at a time: two runs, then the last one, whose page names no next.
    let first: Value = common::get_json(&http, &url("/v1/audit/verify?limit=2"), &key_a).await;
    assert_eq!(
        (&first["ok"], &first["runs"]),
        (&json!(true), &json!(2)),
        "{first}"
    );
    let next = first["next"].as_str().unwrap();
    let after = url(&format!("/v1/audit/verify?limit=2&after={next}"));
    let rest: Value = common::get_json(&http, &after, &key_a).await;
    assert_eq!(
        (&rest["ok"], &rest["runs"]),
        (&json!(true), &json!(1)),
        "{rest}"
    );
    assert!(rest.get("next").is_none(), "{rest}");
    assert_eq!(
        first["events"].as_u64().unwrap() + rest["events"].as_u64().unwrap(),
        audit["events"].as_u64().unwrap()
    );
    // Another tenant's run as the cursor is 404, as any of its run ids is; `run` and `after`
    // together are 400.
    for (query, status) in [
        (format!("after={b_run}"), 404),
        (format!("run={next}&after={next}"), 400),
    ] {
        let answer = http
            .get(url(&format!("/v1/audit/verify?{query}")))
            .bearer_auth(&key_a)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), status, "{query}");
    }
    let costs: Value = common::get_json(&http, &url("/v1/costs?by=agent"), &key_a).await;
    assert_eq!(costs["rows"][0]["key"], "gateway", "{costs}");
    assert_eq!(costs["rows"][0]["calls"], 2);
    assert_eq!(costs["total_micros"], 2 * CALL_MICROS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_calls_of_one_tenant_are_answered_from_the_cache() {
    let fake = FakeOpenAi::start(|_, _| FakeResponse::text("Cached words.", 40, 20))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rein.toml"),
        "[prices.\"openai/fake-model\"]\ninput = 100.0\noutput = 100.0\n\n[gateway]\nmax_output_tokens = 64\ncache_ttl = \"10m\"\n",
    )
    .unwrap();
    let key_a = common::tenant_key(dir.path(), "acme");
    let key_b = common::tenant_key(dir.path(), "rival");
    let server = common::serve(
        dir.path(),
        &["--db", "rein.db", "--config", "rein.toml"],
        &[
            ("OPENAI_BASE_URL", fake.base_url().as_str()),
            ("OPENAI_API_KEY", "sk-operator-test"),
        ],
    );
    let url = format!("{}/v1/chat/completions", server.base);
    let http = reqwest::Client::new();
    let body = json!({
        "model": "openai/fake-model",
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 20,
    });
    let call = |key: &str, body: &Value, cache_control: Option<&str>| {
        let mut request = http.post(&url).bearer_auth(key).json(body);
        if let Some(value) = cache_control {
            request = request.header("cache-control", value);
        }
        request.send()
    };
    let header =
        |r: &reqwest::Response, name: &str| r.headers()[name].to_str().unwrap().to_string();

    let first = call(&key_a, &body, None).await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-rein-cache"), "miss");
    assert_eq!(header(&first, "x-rein-cost-usd"), "$0.006000");
    let first: Value = first.json().await.unwrap();

    // The same call again: the same answer, no provider call, no charge.
    let again = call(&key_a, &body, None).await.unwrap();
    assert_eq!(header(&again, "x-rein-cache"), "hit");
    assert_eq!(header(&again, "x-rein-cost-usd"), "$0.000000");
    let hit_run = header(&again, "x-rein-run-id");
    let again: Value = again.json().await.unwrap();
    assert_eq!(
        again["choices"][0]["message"]["content"],
        first["choices"][0]["message"]["content"]
    );
    assert_eq!(again["usage"]["total_tokens"], 0);
    assert_eq!(fake.request_count(), 1);

    // Streamed, it is served from the cache too.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let stream = call(&key_a, &streamed, None).await.unwrap();
    assert_eq!(header(&stream, "x-rein-cache"), "hit");
    let text = stream.text().await.unwrap();
    assert!(
        text.contains("Cached words.") && text.contains("[DONE]"),
        "{text}"
    );
    assert_eq!(fake.request_count(), 1);

    // Not for another tenant, nor another temperature, nor when the caller says no-cache.
    let rival = call(&key_b, &body, None).await.unwrap();
    assert_eq!(header(&rival, "x-rein-cache"), "miss");
    assert_eq!(fake.request_count(), 2);
    let mut warmer = body.clone();
    warmer["temperature"] = json!(0.5);
    let warm = call(&key_a, &warmer, None).await.unwrap();
    assert_eq!(header(&warm, "x-rein-cache"), "miss");
    assert_eq!(fake.request_count(), 3);
    let fresh = call(&key_a, &body, Some("no-cache")).await.unwrap();
    assert_eq!(header(&fresh, "x-rein-cache"), "miss");
    assert_eq!(fake.request_count(), 4);
    let unstored = call(&key_a, &warmer, Some("no-store")).await.unwrap();
    assert_eq!(header(&unstored, "x-rein-cache"), "miss");
    assert_eq!(fake.request_count(), 5);

    // The hit is a recorded run whose answer says where it came from.
    let trace: Value = common::get_json(
        &http,
        &format!("{}/v1/runs/{hit_run}/trace", server.base),
        &key_a,
    )
    .await;
    let responded = trace["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "model_responded")
        .unwrap();
    assert_eq!(responded["payload"]["cached"], true, "{responded}");
    assert_eq!(responded["payload"]["cost"], 0);
    assert!(
        trace["tree"].as_str().unwrap().contains("(cached)"),
        "{}",
        trace["tree"]
    );
    // Only the provider calls were charged: the first, the warmer, no-cache and no-store ones.
    let costs: Value = common::get_json(&http, &format!("{}/v1/costs", server.base), &key_a).await;
    assert_eq!(costs["total_micros"], 4 * CALL_MICROS);
    let audit: Value =
        common::get_json(&http, &format!("{}/v1/audit/verify", server.base), &key_a).await;
    assert_eq!(audit["ok"], true, "{audit}");
}

/// `rein audit verify` checks a tenant's runs a page (1,000) at a time: it counts every run of
/// a tenant with more than a page, and finds the last run, on the second page, altered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_checks_every_page_of_runs() {
    const CALLS: usize = 1001;
    let fake = FakeOpenAi::start_unrecorded(|_, _| FakeResponse::text("ok", 4, 1))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = common::tenant_key(dir.path(), "acme");
    let server = common::serve(
        dir.path(),
        &["--db", "rein.db"],
        &[
            ("OPENAI_BASE_URL", fake.base_url().as_str()),
            ("OPENAI_API_KEY", "sk-operator-test"),
        ],
    );
    let url = format!("{}/v1/chat/completions", server.base);
    let http = reqwest::Client::new();
    // Call n says "call n", so a run's log is found by its text.
    let caller_key = key.clone();
    let call = move |n: usize| {
        let (http, url, key) = (http.clone(), url.clone(), caller_key.clone());
        async move {
            let body = json!({
                "model": "openai/gpt-4o-mini",
                "messages": [{"role": "user", "content": format!("call {n:04} of the audit test")}],
            });
            let answer = http
                .post(&url)
                .bearer_auth(&key)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
        }
    };
    // Eight callers at once for all but the last call, which comes after them: the newest run,
    // alone on the second page.
    let callers = (0..8).map(|first| {
        let call = call.clone();
        tokio::spawn(async move {
            for n in (first..CALLS - 1).step_by(8) {
                call(n).await;
            }
        })
    });
    for caller in futures_util::future::join_all(callers).await {
        caller.unwrap();
    }
    call(CALLS - 1).await;

    // The dashboard pages through them too, 200 at a time, newest first, each run once.
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let signed = browser
        .post(format!("{}/ui/login", server.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("key={key}"))
        .send()
        .await
        .unwrap();
    let cookie = signed.headers()["set-cookie"].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_string();
    let (mut seen, mut pages, mut next) = (Vec::new(), 0, Some("/ui/runs".to_string()));
    while let Some(path) = next.take() {
        let html = browser
            .get(format!("{}{path}", server.base))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let rows: Vec<String> = html
            .split("<td><a href=\"/ui/runs/")
            .skip(1)
            .map(|row| row.split('"').next().unwrap().to_string())
            .collect();
        pages += 1;
        assert_eq!(rows.len(), if pages <= 5 { 200 } else { 1 }, "page {pages}");
        seen.extend(rows);
        next = html
            .split("id=\"older\" href=\"")
            .nth(1)
            .map(|rest| rest.split('"').next().unwrap().replace("&amp;", "&"));
    }
    assert_eq!(pages, 6);
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), CALLS, "every run on one page");
    assert!(server.terminate().success());

    let audit = || {
        let out = common::rein(
            dir.path(),
            &["audit", "verify", "--tenant", "acme", "--db", "rein.db"],
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, stdout) = audit();
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.starts_with(&format!("ok: {CALLS} runs,")),
        "{stdout}"
    );

    let db = dir.path().join("rein.db");
    let mut bytes = std::fs::read(&db).unwrap();
    let needle = format!("call {:04} of the audit test", CALLS - 1);
    // Every copy: SQLite may leave stale ones in free space, which no audit reads.
    let copies: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle.as_bytes())
        .map(|(at, _)| at)
        .collect();
    assert!(
        !copies.is_empty(),
        "the last call's conversation in the file"
    );
    for at in copies {
        bytes[at] = b'C';
    }
    std::fs::write(&db, &bytes).unwrap();
    let (code, stdout) = audit();
    assert_eq!(code, Some(6), "{stdout}");
    assert!(
        stdout.contains(&format!("1 problem(s) in {CALLS} runs")),
        "{stdout}"
    );
}
