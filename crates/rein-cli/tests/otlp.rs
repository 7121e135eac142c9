//! Trace export: `rein run` exports a multi-step run's spans over OTLP/HTTP to a real receiver,
//! Arize Phoenix (from PyPI), and they read back from Phoenix's REST API as one trace with the
//! run's span at the root (under the caller's span, whose trace it continues), a `chat` span per
//! model call and an `execute_tool` span per tool call under it, carrying the GenAI attributes
//! and token counts the event log records; the HTTP tool receives its call's `traceparent`.
//! Over the API, a run started with a `traceparent` header continues that trace (a malformed
//! header is ignored).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use rein_fakes::ToolService;
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The span of the caller that started the run (the `TRACEPARENT` environment carrier for
/// `rein run`, the `traceparent` header for the API).
const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// Phoenix as a process, stopped on drop.
struct Phoenix {
    child: Child,
    base: String,
}

impl Drop for Phoenix {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `phoenix serve` on free ports with its data in `dir`, once it answers.
async fn phoenix(bin: &str, dir: &std::path::Path) -> Phoenix {
    let (port, grpc) = (free_port(), free_port());
    let child = Command::new(bin)
        .arg("serve")
        .env("PHOENIX_WORKING_DIR", dir)
        .env("PHOENIX_HOST", "127.0.0.1")
        .env("PHOENIX_PORT", port.to_string())
        .env("PHOENIX_GRPC_PORT", grpc.to_string())
        .env("PHOENIX_TELEMETRY_ENABLED", "false")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let phoenix = Phoenix {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let up = http
            .get(format!("{}/v1/projects", phoenix.base))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if up {
            return phoenix;
        }
        assert!(
            Instant::now() < deadline,
            "Phoenix did not start within 180 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_spans_reach_a_real_otlp_receiver_as_one_trace() {
    let Some(bin) = common::set_up_by_scripts_test("REIN_TEST_PHOENIX") else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let receiver = phoenix(&bin, data.path()).await;
    let fake = common::paying_provider().await;
    let service = ToolService::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("agent.yaml"),
        common::payer_spec(&service.url(), 5, 4),
    )
    .unwrap();
    let out = common::rein_command(dir.path())
        .args([
            "run",
            "agent.yaml",
            "--input",
            "pay order 1",
            "--db",
            "rein.db",
            "--json",
        ])
        .env("OPENAI_BASE_URL", fake.base_url())
        .env("OPENAI_API_KEY", "sk-test")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.base)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_SERVICE_NAME", "rein-test")
        .env("TRACEPARENT", CALLER)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outcome: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outcome["status"], "completed", "{outcome}");
    let run_id = outcome["run_id"].as_str().unwrap().to_string();
    // The run continues the caller's trace.
    let trace_id = CALLER_TRACE;

    // The spans as Phoenix stored them (it ingests asynchronously: wait for all four).
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let spans: Vec<Value> = loop {
        let page: Value = http
            .get(format!(
                "{}/v1/projects/default/spans?limit=100",
                receiver.base
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ours: Vec<Value> = page["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["context"]["trace_id"] == trace_id)
            .cloned()
            .collect();
        if ours.len() >= 5 {
            break ours;
        }
        assert!(
            Instant::now() < deadline,
            "Phoenix holds {} of the run's 5 spans after 60 s: {page}",
            ours.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // The run, two model calls, the tool call, and the guard's check of the input (the payer's
    // tool returns trusted receipts, which are not checked).
    assert_eq!(spans.len(), 5, "{spans:#?}");
    let named = |prefix: &str| -> Vec<&Value> {
        spans
            .iter()
            .filter(|s| s["name"].as_str().unwrap().starts_with(prefix))
            .collect()
    };
    let root = named("invoke_agent payer");
    assert_eq!(root.len(), 1, "{spans:#?}");
    let root = root[0];
    assert_eq!(root["parent_id"], CALLER_SPAN, "{root}");
    let root_id = root["context"]["span_id"].as_str().unwrap();
    let attr = |span: &Value, key: &str| span["attributes"][key].clone();
    assert_eq!(attr(root, "rein.termination_reason"), "completed", "{root}");
    assert_eq!(attr(root, "rein.run_id"), run_id.as_str());
    assert_eq!(attr(root, "gen_ai.usage.input_tokens"), 100);
    let guard = named("guard user");
    assert_eq!(guard.len(), 1, "{spans:#?}");
    assert_eq!(guard[0]["parent_id"], root_id, "{}", guard[0]);
    assert_eq!(attr(guard[0], "rein.guard.verdict"), "allow");

    // The event log's model calls, step by step.
    let show = common::rein_ok(
        dir.path(),
        &["runs", "show", &run_id, "--json", "--db", "rein.db"],
    );
    let show: Value = serde_json::from_str(&show).unwrap();
    let responded: Vec<&Value> = show["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "model_responded")
        .map(|e| &e["payload"])
        .collect();
    let chats = named("chat ");
    assert_eq!(chats.len(), responded.len());
    for answer in responded {
        let step = answer["step"].as_i64().unwrap();
        let chat = chats
            .iter()
            .find(|s| attr(s, "rein.step") == step)
            .unwrap_or_else(|| panic!("no chat span for step {step}: {chats:#?}"));
        assert_eq!(chat["parent_id"], root_id, "{chat}");
        assert_eq!(chat["name"], "chat openai/gpt-4o-mini");
        assert_eq!(attr(chat, "gen_ai.operation.name"), "chat");
        assert_eq!(attr(chat, "gen_ai.provider.name"), "openai");
        assert_eq!(attr(chat, "gen_ai.request.model"), "openai/gpt-4o-mini");
        assert_eq!(attr(chat, "gen_ai.response.model"), answer["model"]);
        assert_eq!(
            attr(chat, "gen_ai.usage.input_tokens"),
            answer["usage"]["input_tokens"]
        );
        assert_eq!(
            attr(chat, "gen_ai.usage.output_tokens"),
            answer["usage"]["output_tokens"]
        );
    }
    let tools = named("execute_tool pay");
    assert_eq!(tools.len(), 1);
    assert_eq!(tools[0]["parent_id"], root_id);
    assert_eq!(attr(tools[0], "gen_ai.tool.name"), "pay");
    assert_eq!(attr(tools[0], "gen_ai.tool.call.id"), "call_1");
    // The tool service was told its call's span, in the caller's trace.
    assert_eq!(
        service.traceparents("apply"),
        [format!(
            "00-{CALLER_TRACE}-{}-01",
            tools[0]["context"]["span_id"].as_str().unwrap()
        )]
    );
}

/// Rein speaks OTLP over HTTP with protobuf only: any other protocol asked for is refused at
/// start, by name, rather than silently not exported.
#[test]
fn another_otlp_protocol_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("agent.yaml"),
        common::payer_spec("http://127.0.0.1:9", 5, 4),
    )
    .unwrap();
    let out = common::rein_command(dir.path())
        .args(["run", "agent.yaml", "--input", "hi", "--db", "rein.db"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("OPENAI_API_KEY", "sk-test")
        .env("OPENAI_BASE_URL", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc") && stderr.contains("http/protobuf"),
        "{stderr}"
    );
}

/// `POST /v1/runs` and the gateway take the caller's `traceparent`: the run's log keeps it and
/// its tool calls carry the caller's trace on; a malformed one is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_callers_traceparent_is_kept_and_passed_to_tools() {
    let fake = common::paying_provider().await;
    let service = ToolService::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = common::tenant_key(dir.path(), "acme");
    common::open_loopback(dir.path());
    let server = common::serve(
        dir.path(),
        &["--db", "rein.db"],
        &[
            ("OPENAI_BASE_URL", fake.base_url().as_str()),
            ("OPENAI_API_KEY", "sk-test"),
        ],
    );
    let http = reqwest::Client::new();
    common::register(
        &http,
        &server.base,
        &key,
        &common::payer_spec(&service.url(), 5, 4),
    )
    .await;
    let mut started = Vec::new();
    for header in [CALLER, "00-not-a-traceparent"] {
        let run = common::run_waiting(
            &http,
            &server.base,
            &key,
            json!({"agent": "payer", "input": "pay"}),
            &[("traceparent", header)],
        )
        .await;
        assert_eq!(run["status"], "completed", "{run}");
        let id = run["run_id"].as_str().unwrap().to_string();
        let trace =
            common::get_json(&http, &format!("{}/v1/runs/{id}/trace", server.base), &key).await;
        started.push((id, trace["events"][0]["payload"]["trace_parent"].clone()));
    }
    assert_eq!(started[0].1, CALLER);
    assert!(started[1].1.is_null(), "{:?}", started[1]);
    let parents = service.traceparents("apply");
    assert_eq!(parents.len(), 2, "{parents:?}");
    assert!(
        parents[0].starts_with(&format!("00-{CALLER_TRACE}-")),
        "{parents:?}"
    );
    assert!(
        !parents[0].contains(CALLER_SPAN),
        "the tool's parent is its own call's span"
    );
    // Without a caller's trace, the run's own: its id's 128 bits.
    let own: String = started[1].0.chars().filter(|c| *c != '-').collect();
    assert!(parents[1].starts_with(&format!("00-{own}-")), "{parents:?}");
}
