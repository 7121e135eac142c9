//! Helpers shared by the tests that run the `rein` binary.

#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// `rein` in `dir`, cut off from the caller's provider and store settings.
pub fn rein_command(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rein"));
    command
        .current_dir(dir)
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("REIN_DB")
        .env_remove("REIN_CONFIG");
    command
}

/// Runs `rein args` in `dir` to the end.
pub fn rein(dir: &Path, args: &[&str]) -> Output {
    rein_command(dir).args(args).output().unwrap()
}

/// An agent whose one tool, `pay`, makes a payment at the tool service `url`, which takes
/// `apply_ms` to apply it once per idempotency key. Its receipts come from the operator's own
/// service, so they are `results: trusted` (else the data-flow guard would hold every payment
/// after the first for approval).
pub fn payer_spec(url: &str, apply_ms: u32, max_iterations: u32) -> String {
    format!(
        r#"
name: payer
version: 1
model: {{primary: openai/gpt-4o-mini}}
instructions: Pay.
tools:
  - name: pay
    description: Makes a payment.
    input_schema: {{type: object, properties: {{n: {{type: integer}}}}, required: [n]}}
    source: {{http: {{url: "{url}/apply?ms={apply_ms}", method: POST}}}}
    contract: {{timeout: 5s, side_effects: external, results: trusted}}
limits: {{max_iterations: {max_iterations}, max_total_tokens: 20000, max_cost_usd: 0.10}}
"#
    )
}

/// Runs `rein args` in `dir`, which must succeed; its standard output.
pub fn rein_ok(dir: &Path, args: &[&str]) -> String {
    let out = rein(dir, args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The rein.toml lines that open 127.0.0.1, where the tests' tool services listen, to tenants'
/// specs (closed to them by default: `tests/tenant_safety.rs`).
pub const LOOPBACK_TOOLS: &str = "\n[egress]\nallow = [\"127.0.0.1\"]\n";

/// Adds [`LOOPBACK_TOOLS`] to `dir`'s rein.toml (made if missing), once.
pub fn open_loopback(dir: &Path) {
    let path = dir.join("rein.toml");
    let config = std::fs::read_to_string(&path).unwrap_or_default();
    if !config.contains("[egress]") {
        std::fs::write(&path, format!("{config}{LOOPBACK_TOOLS}")).unwrap();
    }
}

/// `rein serve` as a process, killed on drop.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// What the server has written to standard error after its first line, line by line.
    pub logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Stops the server as an operator does (SIGTERM) and waits until it has exited.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success(), "kill -TERM {pid}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "rein serve did not stop within 20 s of SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Starts `rein serve --listen 127.0.0.1:0 args` in `dir` with `env` set, once it listens.
pub fn serve(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
    let mut command = rein_command(dir);
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let base = first
        .strip_prefix("rein serve: listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {first}"))
        .to_string();
    // Keep draining (and showing, and keeping) what the server says, so it never blocks on a
    // full pipe.
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = logs.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            eprintln!("serve: {line}");
            if let Ok(mut kept) = kept.lock() {
                kept.push(line);
            }
        }
    });
    Server { child, base, logs }
}

/// A new tenant and one API key for it, in `dir`'s `rein.db`.
pub fn tenant_key(dir: &Path, tenant: &str) -> String {
    tenant_key_in(dir, tenant, "rein.db")
}

/// The same, in store `db`.
pub fn tenant_key_in(dir: &Path, tenant: &str, db: &str) -> String {
    rein_ok(dir, &["tenants", "create", tenant, "--db", db]);
    rein_ok(dir, &["keys", "create", "--tenant", tenant, "--db", db])
        .trim()
        .to_string()
}

/// A Python with the official `openai` package and `openapi-spec-validator` (`REIN_TEST_PYTHON`,
/// which `scripts/test` sets up); `None` to skip where it is not required (`REIN_TEST_PYTHON_REQUIRED=1` makes its
/// absence a failure).
pub fn python_with_openai() -> Option<String> {
    set_up_by_scripts_test("REIN_TEST_PYTHON")
}

/// The path in the environment variable `var`, which `scripts/test` sets to a tool it set up
/// (a Python, promtool, Phoenix, the browser); `None` to skip the test where it is not set up,
/// unless `REIN_TEST_PYTHON_REQUIRED=1` (as `scripts/test` sets) makes its absence a failure.
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

/// [`payer_spec`] as the agent `name`, whose payments wait for a person's approval
/// (`confirm: true`).
pub fn held_spec(name: &str, url: &str, apply_ms: u32, max_iterations: u32) -> String {
    payer_spec(url, apply_ms, max_iterations)
        .replace("name: payer", &format!("name: {name}"))
        .replace("results: trusted}", "results: trusted, confirm: true}")
}

/// Registers the `payer` agent and its held twin `held` for `key`'s tenant, and runs each
/// once (waiting): the ids of the completed `payer` run and of the `held` run waiting for
/// approval.
pub async fn paid_and_held_runs(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    tools_url: &str,
) -> (String, String) {
    register(http, base, key, &payer_spec(tools_url, 5, 4)).await;
    register(http, base, key, &held_spec("held", tools_url, 5, 4)).await;
    let done = run_waiting(
        http,
        base,
        key,
        serde_json::json!({"agent": "payer", "input": "pay 1"}),
        &[],
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    let held = run_waiting(
        http,
        base,
        key,
        serde_json::json!({"agent": "held", "input": "pay 2"}),
        &[],
    )
    .await;
    assert_eq!(held["status"], "awaiting_approval", "{held}");
    let id = |run: &serde_json::Value| run["run_id"].as_str().unwrap().to_string();
    (id(&done), id(&held))
}

/// `GET url` with `key` as the bearer; the JSON answer.
pub async fn get_json(http: &reqwest::Client, url: &str, key: &str) -> serde_json::Value {
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

/// `POST /v1/runs` with `body` and `wait: true`, and any extra `headers`; the answer.
pub async fn run_waiting(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    mut body: serde_json::Value,
    headers: &[(&str, &str)],
) -> serde_json::Value {
    body["wait"] = true.into();
    let mut request = http
        .post(format!("{base}/v1/runs"))
        .bearer_auth(key)
        .json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap().json().await.unwrap()
}

/// A fake provider for the payer agent ([`payer_spec`]): a `pay` tool call (40 tokens in, 20
/// out), then, once the tool's result is in the conversation, the answer (60 in, 10 out).
pub async fn paying_provider() -> rein_fakes::FakeOpenAi {
    rein_fakes::FakeOpenAi::start(|_, body| {
        let answered = body["messages"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["role"] == "tool"));
        if answered {
            rein_fakes::FakeResponse::text("Paid.", 60, 10)
        } else {
            rein_fakes::FakeResponse::tool_call(
                "call_1",
                "pay",
                &serde_json::json!({"n": 1}),
                40,
                20,
            )
        }
    })
    .await
    .unwrap()
}

/// Runs `rein run agent.yaml --input report --script script.yaml` in `dir` and kills the
/// process outright once the run has logged an event of `kind`; the run's id.
pub fn run_killed_at(dir: &Path, kind: &str) -> String {
    let mut child = rein_command(dir)
        .args([
            "run",
            "agent.yaml",
            "--input",
            "report",
            "--script",
            "script.yaml",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drained as it comes, so the child never blocks on a full pipe.
    let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let pipe = child.stderr.take().unwrap();
    let mut drained = Some({
        let said = said.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Ok(mut said) = said.lock() {
                    said.push_str(&line);
                    said.push('\n');
                }
            }
        })
    });
    // A run that ends before it logs `kind` (it failed to start, say) is reported with its
    // error at once, not as a wait that timed out.
    let id = run_once_logged(dir, kind, &mut || {
        let status = child.try_wait().ok()??;
        // The process has ended, so its pipe closes and the thread reads it to the end.
        if let Some(thread) = drained.take() {
            let _ = thread.join();
        }
        let stderr = said.lock().map(|s| s.clone()).unwrap_or_default();
        Some(format!("`rein run` ended ({status}): {stderr}"))
    });
    let _ = child.kill();
    child.wait().unwrap();
    id
}

/// The id of the first run in `dir`'s default store whose log holds an event of `kind`,
/// once one does (within 60 s): for killing a process at a known point of its run. `ended`
/// says why the process that runs it ended, once it has: the event is then looked for once
/// more, and if it is not there the wait fails with that reason.
pub fn run_once_logged(
    dir: &Path,
    kind: &str,
    ended: &mut dyn FnMut() -> Option<String>,
) -> String {
    let started = std::time::Instant::now();
    let mut last_look = None;
    loop {
        if let Some(why) = last_look {
            panic!("no run logged `{kind}`: {why}");
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "no run logged `{kind}` in 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        last_look = ended();
        if !dir.join("rein.db").exists() {
            continue;
        }
        let out = rein(dir, &["runs", "list", "--json"]);
        let Ok(runs) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
            continue;
        };
        let Some(id) = runs
            .as_array()
            .and_then(|r| r.first())
            .and_then(|r| r["run_id"].as_str())
        else {
            continue;
        };
        let shown = rein(dir, &["runs", "show", id, "--json"]);
        let Ok(shown) = serde_json::from_slice::<serde_json::Value>(&shown.stdout) else {
            continue;
        };
        if shown["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["kind"] == kind))
        {
            return id.to_string();
        }
    }
}

/// Signs in to the dashboard; the session cookie.
pub async fn sign_in(base: &str, key: &str) -> String {
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let signed = browser
        .post(format!("{base}/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("key={key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), 303);
    let cookie = signed.headers()["set-cookie"].to_str().unwrap();
    cookie.split(';').next().unwrap().to_string()
}

/// The page at `path` (of the dashboard, or any other GET) as the signed-in `cookie` sees it,
/// which must be 200.
pub async fn page(http: &reqwest::Client, base: &str, path: &str, cookie: &str) -> String {
    let answer = http
        .get(format!("{base}{path}"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "{path}");
    answer.text().await.unwrap()
}
