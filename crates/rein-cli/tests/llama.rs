//! A real model, end to end: `rein run` drives an agent with a tool against a real local LLM
//! (Gemma 3 270M) served by llama.cpp's OpenAI-compatible server.
//!
//! `scripts/llama-setup.sh` installs the server and the model and prints `REIN_LLAMA_PYTHON`
//! and `REIN_LLAMA_MODEL`; `scripts/test` exports them with `REIN_LLAMA_REQUIRED=1`, so in CI a
//! missing server fails this test instead of skipping it. It is the base model, so its words are
//! poor: the test asserts what is deterministic (events, usage, cost, the termination reason, a
//! well-formed tool call), not what it says.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{Value, json};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The server process, stopped when the test ends however it ends.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts llama.cpp's server on a free port, or says why it cannot.
fn start_server() -> Option<Server> {
    let (python, model) = match (
        std::env::var("REIN_LLAMA_PYTHON"),
        std::env::var("REIN_LLAMA_MODEL"),
    ) {
        (Ok(p), Ok(m)) if !p.is_empty() && !m.is_empty() => (p, m),
        _ => {
            assert!(
                std::env::var("REIN_LLAMA_REQUIRED").as_deref() != Ok("1"),
                "REIN_LLAMA_REQUIRED=1 but REIN_LLAMA_PYTHON / REIN_LLAMA_MODEL are not set: run scripts/llama-setup.sh"
            );
            eprintln!(
                "skipped: the real-model test needs llama.cpp's server; `scripts/test` sets it up (or eval \"$(scripts/llama-setup.sh)\")"
            );
            return None;
        }
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let log =
        std::fs::File::create(std::env::temp_dir().join(format!("rein-llama-{port}.log"))).unwrap();
    let child = Command::new(python)
        .args(["-m", "llama_cpp.server", "--model", &model])
        .args(["--chat_format", "chatml-function-calling"])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--n_ctx", "4096"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let server = Server { child, port };
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "llama.cpp's server did not listen on 127.0.0.1:{port} within 120 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Some(server)
}

fn rein(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rein"))
        .args(args)
        .current_dir(dir)
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("REIN_DB")
        .env_remove("REIN_CONFIG")
        .output()
        .unwrap()
}

fn spec(port: u16) -> String {
    format!(
        r#"name: local-echo
version: 1
model:
  primary: {{name: gemma3, provider: openai, base_url: "http://127.0.0.1:{port}/v1"}}
  max_output_tokens: 64
  temperature: 0
  # llama.cpp only emits a tool call when the tool is named; once the run's one tool call is
  # spent, the final step is sent `tool_choice: none` and answers in text.
  tool_choice: echo
  retry: {{max_attempts: 2, base_delay: 100ms}}
  timeout: 60s
instructions: Use the echo tool to repeat what the user says.
tools:
  - name: echo
    source: {{builtin: echo}}
    contract: {{timeout: 5s, side_effects: none, idempotent: true}}
limits:
  max_iterations: 4
  max_total_tokens: 20000
  max_cost_usd: 0.01
  max_tool_calls: 1
  timeout: 5m
"#
    )
}

#[test]
fn rein_drives_a_real_local_llm_through_a_tool_call_to_a_recorded_finish() {
    let Some(server) = start_server() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("agent.yaml"), spec(server.port)).unwrap();
    // $1 per million input tokens, $2 per million output: the cost must follow the usage.
    std::fs::write(
        dir.path().join("rein.toml"),
        "[prices.\"openai/gemma3\"]\ninput = 1.0\noutput = 2.0\n",
    )
    .unwrap();

    let out = rein(
        dir.path(),
        &[
            "run",
            "agent.yaml",
            "--input",
            "Echo hello",
            "--json",
            "--db",
            "runs.db",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let run: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["termination_reason"], "completed", "{run}");
    assert_eq!(run["models_used"], json!({"openai/gemma3": 2}), "{run}");
    assert!(run["output"].is_string(), "{run}");
    let input = run["usage"]["input_tokens"].as_u64().unwrap();
    let output = run["usage"]["output_tokens"].as_u64().unwrap();
    assert!(
        input > 100 && output > 0,
        "usage is the server's own count: {run}"
    );
    let micros = run["cost_usd"]
        .as_f64()
        .map(|usd| (usd * 1e6).round() as u64);
    assert_eq!(
        micros,
        Some(input + 2 * output),
        "priced at $1/M input and $2/M output: {run}"
    );

    let id = run["run_id"].as_str().unwrap();
    let out = rein(
        dir.path(),
        &["runs", "show", id, "--json", "--db", "runs.db"],
    );
    assert_eq!(out.status.code(), Some(0));
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    let events = shown["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
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
        ],
        "{shown}"
    );
    // The forced call is well-formed: JSON arguments that passed the tool's input schema (the
    // engine refuses anything else before the tool is reached), and the tool ran.
    let payload = |kind: &str, nth: usize| {
        events
            .iter()
            .filter(|e| e["kind"] == kind)
            .nth(nth)
            .map(|e| e["payload"].clone())
            .unwrap()
    };
    let call = payload("tool_requested", 0);
    assert_eq!(call["tool"], "echo");
    assert!(call["arguments"]["text"].is_string(), "{call}");
    let result = payload("tool_result", 0);
    assert_eq!(result["result"]["status"], "success", "{result}");
    let final_request = payload("model_requested", 1);
    assert_eq!(final_request["step_kind"], "final", "{final_request}");

    let out = rein(dir.path(), &["audit", "verify", "--db", "runs.db"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
