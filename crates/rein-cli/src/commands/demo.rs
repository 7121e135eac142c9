//! `rein demo`: the bundled example agents, run offline on the embedded defaults.
//!
//! Each scenario shows one guarantee. The specs and scripts live in `examples/demo/` and are
//! compiled in, so the demo needs nothing but the binary. The flaky and order-lookup tools are
//! served by the demo itself on 127.0.0.1.

use crate::exit;
use anyhow::{Context, anyhow};
use rein_app::Error::BadInput;
use rein_app::wiring::{http_client, parse_agent};
use rein_app::{config, render};
use rein_core::budget::{BudgetPolicy, Cap};
use rein_core::{SessionId, TenantId, Usd, UserId};
use rein_fakes::ToolService;
use rein_providers::{Model, ProviderRouter, ScriptedModel};
use rein_runtime::{RunOutcome, RunRequest};
use rein_tools::Builtins;

struct Scenario {
    name: &'static str,
    tenant: &'static str,
    spec: &'static str,
    script: &'static str,
    /// Where the spec and the script are in the repository.
    files: (&'static str, &'static str),
    input: &'static str,
    shows: &'static str,
    /// The termination reason it must end with, or the status when it does not end.
    expect: &'static str,
}

macro_rules! scenario {
    ($name:literal, $input:literal, $shows:literal, $expect:literal) => {
        scenario!($name, "default", $input, $shows, $expect)
    };
    ($name:literal, $tenant:expr, $input:literal, $shows:literal, $expect:literal) => {
        Scenario {
            name: $name,
            tenant: $tenant,
            spec: include_str!(concat!("../../../../examples/demo/", $name, ".yaml")),
            script: include_str!(concat!("../../../../examples/demo/", $name, ".script.yaml")),
            files: (
                concat!("examples/demo/", $name, ".yaml"),
                concat!("examples/demo/", $name, ".script.yaml"),
            ),
            input: $input,
            shows: $shows,
            expect: $expect,
        }
    };
}

/// The demo's own tenant with a small shared daily budget: a new one for each demo, named after
/// the time it starts, so a second demo on the same day shows the refusal again instead of a
/// budget the first one already spent.
const BUDGET_TENANT: &str = "demo-budget";

/// Where the checked-in example specs reach the example tool service (`rein demo --serve-tools`
/// serves it there); the demo itself serves it on a free port and points the specs at that.
const EXAMPLE_TOOLS_URL: &str = "http://127.0.0.1:8089";

/// The example tool service's port, as [`EXAMPLE_TOOLS_URL`] names it.
const EXAMPLE_TOOLS_PORT: u16 = 8089;

const SCENARIOS: &[Scenario] = &[
    scenario!(
        "shared-budget",
        BUDGET_TENANT,
        "Summarise the annual report.",
        "a tenant's shared daily budget refuses the call it cannot cover",
        "budget_exhausted"
    ),
    scenario!(
        "unauthorised-tool",
        "Cancel order 42.",
        "a tool outside the agent's scopes is refused by the runtime, never called",
        "completed"
    ),
    scenario!(
        "runaway-loop",
        "What is our refund policy?",
        "a model that never stops is stopped by max_iterations",
        "max_iterations"
    ),
    scenario!(
        "cost-cap",
        "Summarise the annual report.",
        "the call that could cross max_cost_usd is refused before it is made",
        "max_cost"
    ),
    scenario!(
        "flaky-tool",
        "Where is order 42?",
        "an idempotent tool failing with HTTP 500 twice is retried to success",
        "completed"
    ),
    scenario!(
        "hallucinated-tool",
        "Where is my order? I am ann@example.com, order 42.",
        "an invented tool and bad arguments become errors the model recovers from",
        "completed"
    ),
    scenario!(
        "repeated-call",
        "Tell me when order 7 is delivered.",
        "the same call with the same arguments a third time ends the run",
        "loop_detected"
    ),
    scenario!(
        "approval-gate",
        "Please refund order 42, $129.99.",
        "a refund waits for a person's approval; nothing is paid before `rein approve`",
        "awaiting_approval"
    ),
    scenario!(
        "refund-graph",
        "Please refund order 42, it arrived broken.",
        "a state graph: classify, route, look up, then wait for a person's approval",
        "awaiting_approval"
    ),
    scenario!(
        "order-plan",
        "Order 42 arrived damaged, please sort it out.",
        "plan and execute: a failed step is retried, then the plan is revised",
        "completed"
    ),
    Scenario {
        name: "orchestrator",
        tenant: "default",
        spec: include_str!("../../../../examples/orchestrator/orchestrator.yaml"),
        script: include_str!("../../../../examples/orchestrator/script.yaml"),
        files: (
            "examples/orchestrator/orchestrator.yaml",
            "examples/orchestrator/script.yaml",
        ),
        input: "Brief me on order 42.",
        shows: "three workers share one budget; one times out and its fallback answers",
        expect: "completed",
    },
    scenario!(
        "escalation",
        "Where are my orders 5001, 5002 and 5003?",
        "a tool failing again and again hands the run to a person, with a handoff",
        "escalated"
    ),
    scenario!(
        "slow-tool",
        "Report on the nightly batch.",
        "a hanging tool is cut off at the run's wall-clock limit",
        "timeout"
    ),
];

/// The worker agents of `examples/orchestrator`, compiled in like the scenarios: the demo
/// reads no file.
const WORKERS: &[(&str, &str)] = &[
    (
        "researcher.yaml",
        include_str!("../../../../examples/orchestrator/researcher.yaml"),
    ),
    (
        "checker.yaml",
        include_str!("../../../../examples/orchestrator/checker.yaml"),
    ),
    (
        "summariser.yaml",
        include_str!("../../../../examples/orchestrator/summariser.yaml"),
    ),
];

/// Finds the demo's worker agents among [`WORKERS`].
struct DemoWorkers {
    prices: rein_core::PriceTable,
    builtins: Builtins,
}

impl rein_runtime::Workers for DemoWorkers {
    fn resolve<'a>(
        &'a self,
        _tenant: &'a TenantId,
        reference: &'a str,
        _trust: rein_core::Trust,
    ) -> rein_runtime::workers::BoxFuture<
        'a,
        Result<(rein_core::Agent, String, rein_core::Trust), String>,
    > {
        Box::pin(async move {
            let (_, source) = WORKERS
                .iter()
                .find(|(name, _)| *name == reference)
                .ok_or_else(|| format!("the demo has no worker `{reference}`"))?;
            let (agent, source) = rein_app::workers::parse_worker(
                &self.prices,
                &self.builtins,
                reference,
                source.to_string(),
            )?;
            // The demo's workers ship with Rein.
            Ok((agent, source, rein_core::Trust::Operator))
        })
    }

    fn pinned(&self, reference: &str, source: String) -> Result<rein_core::Agent, String> {
        rein_app::workers::parse_worker(&self.prices, &self.builtins, reference, source)
            .map(|(a, _)| a)
    }
}

/// The scenario whose trace tree is printed in full.
const TRACED: &str = "hallucinated-tool";

/// `rein demo --serve-tools`: the example tool service alone, on [`EXAMPLE_TOOLS_URL`], until
/// Ctrl-C, so the checked-in examples can be run by hand (`rein run examples/order-support.yaml
/// --script ...`) against tools that answer.
pub async fn serve_tools() -> anyhow::Result<u8> {
    let tools = ToolService::start_on(EXAMPLE_TOOLS_PORT)
        .await
        .with_context(|| format!("cannot serve the example tools on {EXAMPLE_TOOLS_URL}"))?;
    eprintln!(
        "rein demo: the example tools answer on {} (orders 1 to 1000, refunds, tickets); Ctrl-C stops them",
        tools.url()
    );
    tokio::signal::ctrl_c().await?;
    Ok(exit::OK)
}

/// How the user runs `rein`: the installed binary, or `cargo run --release --` from a checkout
/// (a binary under a `target` directory), so the commands the demo suggests run as printed.
fn rein_command() -> &'static str {
    let in_target = std::env::current_exe()
        .ok()
        .is_some_and(|exe| exe.components().any(|c| c.as_os_str() == "target"));
    if in_target {
        "cargo run --release --"
    } else {
        "rein"
    }
}

pub async fn run(store_args: &crate::StoreArgs) -> anyhow::Result<u8> {
    let db = shell_word(&rein_store::redact_url(&store_args.db));
    let rein = rein_command();
    let budget_tenant = format!("{BUDGET_TENANT}-{}", rein_runtime::now_ms() / 1000);
    let live = std::env::var("OPENAI_API_KEY").is_ok_and(|k| !k.is_empty());
    if live {
        say!(
            "OPENAI_API_KEY is set: the demo agents call the real API (OPENAI_BASE_URL if set); results depend on the model.\n"
        );
    } else {
        say!(
            "No OPENAI_API_KEY: model answers are replayed by the scripted model (examples/demo/*.script.yaml)\n\
             through the same driver a real provider uses. Limits, tools, retries and the log are real.\n"
        );
    }
    // On the examples' own port when it is free, so a held run's approval can make its call
    // later against `rein demo --serve-tools`; on any free port otherwise.
    let (tools, on_example_port) = match ToolService::start_on(EXAMPLE_TOOLS_PORT).await {
        Ok(tools) => (tools, true),
        Err(_) => (
            ToolService::start()
                .await
                .context("cannot start the demo's tool service on 127.0.0.1")?,
            false,
        ),
    };
    let mut config = config::load(None)?;
    // The demo's own policies, in this process only: a small daily budget for its budget tenant,
    // and order scopes for the default tenant (the unauthorised-tool agent itself lacks one).
    config.budgets.tenants.insert(
        TenantId::new(&budget_tenant),
        BudgetPolicy {
            tenant_daily: Cap {
                usd: Usd::from_dollars(0.05),
                tokens: None,
            },
            ..BudgetPolicy::default()
        },
    );
    config.tenant_scopes.insert(
        TenantId::new("default"),
        vec!["orders:read".into(), "orders:write".into()],
    );
    let builtins = Builtins::standard();
    let http = http_client()?;
    let store = rein_app::wiring::open_store(&store_args.db).await?;
    let runtime = rein_app::wiring::runtime_for(&config, &store, builtins.clone(), http.clone())
        .await?
        .with_workers(std::sync::Arc::new(DemoWorkers {
            prices: config.prices.clone(),
            builtins: builtins.clone(),
        }));
    let tenant = TenantId::new("default");

    say!("What each agent shows:");
    for scenario in SCENARIOS {
        say!("  {:<18} {}", scenario.name, scenario.shows);
    }
    say!("");
    let mut rows = vec![[
        "AGENT".to_string(),
        "STATUS".into(),
        "TERMINATION".into(),
        "STEPS".into(),
        "TOKENS".into(),
        "COST".into(),
    ]];
    let mut outcomes: Vec<(&Scenario, RunOutcome)> = Vec::new();
    let mut with_workers = Vec::new();
    for scenario in SCENARIOS {
        let file = scenario.files.0;
        let source = scenario.spec.replace(EXAMPLE_TOOLS_URL, &tools.url());
        let tenant_of = |scenario: &Scenario| {
            if scenario.tenant == BUDGET_TENANT {
                budget_tenant.clone()
            } else {
                scenario.tenant.to_string()
            }
        };
        let agent = parse_agent(file, &source, &config, &builtins)?;
        let model: Box<dyn Model> = if live {
            Box::new(ProviderRouter::from_env(http.clone()))
        } else {
            Box::new(
                ScriptedModel::parse(scenario.files.1, scenario.script)
                    .map_err(|e| anyhow!(BadInput(e.to_string())))?,
            )
        };
        let request = RunRequest {
            agent,
            spec_source: source,
            input: scenario.input.to_string(),
            tenant: TenantId::new(tenant_of(scenario)),
            user: UserId::new("demo"),
            session: SessionId::new(format!("demo-{}", scenario.name)),
            job: None,
            granted_scopes: config.granted_scopes(&TenantId::new(tenant_of(scenario))),
            chat: None,
            trust: rein_core::Trust::Operator,
            trace_parent: None,
        };
        let outcome = runtime.run(request, model.as_ref()).await?;
        let ended = outcome
            .reason
            .map_or_else(|| outcome.status.to_string(), |r| r.to_string());
        // The run's own calls, as `rein runs list` and the dashboard count them; what its
        // worker runs spent under its limits is said apart.
        let own = store
            .run(&TenantId::new(tenant_of(scenario)), &outcome.run_id)
            .await?
            .progress;
        if own.usage != outcome.usage {
            with_workers.push(format!(
                "{}: {} tokens, {} with its worker runs (its own calls: {} tokens, {})",
                scenario.name,
                outcome.usage.total(),
                outcome.cost,
                own.usage.total(),
                own.cost
            ));
        }
        rows.push([
            scenario.name.to_string(),
            outcome.status.to_string(),
            ended,
            (own.iterations + own.tool_calls).to_string(),
            own.usage.total().to_string(),
            own.cost.to_string(),
        ]);
        outcomes.push((scenario, outcome));
    }
    say!("{}", render::table(&rows));
    for line in &with_workers {
        say!("{}", wrap(line, 100));
    }
    say!("");

    if let Some((_, traced)) = outcomes.iter().find(|(s, _)| s.name == TRACED) {
        let record = store.run(&tenant, &traced.run_id).await?;
        let events: Vec<_> = store
            .events(&tenant, &traced.run_id)
            .await?
            .iter()
            .filter_map(|e| e.decode().ok())
            .collect();
        say!(
            "The trace of `{TRACED}`:\n{}\n",
            render::trace(&record, &events)
        );
    }
    for (scenario, outcome) in &outcomes {
        if let Some(detail) = &outcome.detail {
            say!("{}", wrap(&format!("{}: {detail}", scenario.name), 100));
        }
        if let Some(pending) = &outcome.awaiting {
            let holds = format!(
                "{}: holds `{}` with {} ({})",
                scenario.name, pending.tool, pending.arguments, pending.reason
            );
            say!(
                "{}\n  decide: {rein} approve {} \\\n            --db {db}{}\n  (add --deny --reason TEXT to refuse)",
                wrap(&holds, 100),
                outcome.run_id,
                script_flag(live, scenario),
            );
        }
    }
    if outcomes.iter().any(|(_, o)| o.awaiting.is_some()) {
        // An approved refund makes its call: the tools must answer where the run expects them.
        if on_example_port {
            say!(
                "Approving makes the held call; start the example tools first:\n  {rein} demo --serve-tools &"
            );
        } else {
            say!(
                "{}",
                wrap(
                    &format!(
                        "Port {EXAMPLE_TOOLS_PORT} was busy, so the demo's tools answered on {}; they stopped with the demo, and an approved call will fail to reach them.",
                        tools.url()
                    ),
                    100
                )
            );
        }
    }
    store.close().await;
    let traced = outcomes
        .iter()
        .find(|(s, _)| s.name == TRACED)
        .map_or_else(|| "RUN_ID".to_string(), |(_, o)| o.run_id.to_string());
    say!(
        "\nThe runs are recorded in {db}. Next:\n  {rein} runs list --db {db}\n  {rein} runs show {traced} --db {db}\n  {rein} costs --db {db}\n  {rein} audit verify --db {db}\nThe shared-budget run has a tenant of its own:\n  {rein} runs list --db {db} --tenant {budget_tenant}"
    );

    let mismatched: Vec<String> = outcomes
        .iter()
        .filter(|(s, o)| {
            o.reason
                .map_or_else(|| o.status.to_string(), |r| r.to_string())
                != s.expect
        })
        .map(|(s, o)| format!("{} ended with {} (expected {})", s.name, o.status, s.expect))
        .collect();
    if !live && !mismatched.is_empty() {
        eprintln!("\ndemo self-check FAILED: {}", mismatched.join("; "));
        return Ok(exit::INTERNAL);
    }
    Ok(exit::OK)
}

/// `word` as it can be pasted into a shell: quoted when it holds anything but plain path and
/// URL characters (a PostgreSQL URL's `?options=...`, say).
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:@,+=%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// ` --script FILE` for a scripted scenario's follow-up commands (none when the real API answers).
/// The script is the repository's file when `rein` runs in a checkout; otherwise (an installed
/// `rein`) the demo writes its compiled-in copy to `rein-demo-scripts/`, so the printed command
/// runs as written wherever the demo ran.
fn script_flag(live: bool, scenario: &Scenario) -> String {
    if live {
        return String::new();
    }
    let in_checkout = std::path::Path::new(scenario.files.1).exists();
    if in_checkout {
        return format!(" --script {}", scenario.files.1);
    }
    let dir = std::path::Path::new(SCRIPTS_DIR);
    let path = dir.join(format!("{}.script.yaml", scenario.name));
    match std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, scenario.script)) {
        Ok(()) => format!(" --script {}", path.display()),
        // Not writable here: name the repository's file, which a checkout has.
        Err(_) => format!(" --script {}", scenario.files.1),
    }
}

/// Where an installed `rein demo` writes the scripts its follow-up commands name.
const SCRIPTS_DIR: &str = "rein-demo-scripts";

/// `text` broken at spaces into lines of at most `width` characters (a longer word stands
/// alone), the lines after the first indented by two spaces.
fn wrap(text: &str, width: usize) -> String {
    let mut lines: Vec<String> = vec![String::new()];
    for word in text.split_whitespace() {
        let line = lines.last().map_or(0, |l| l.chars().count());
        if line > 0 && line + 1 + word.chars().count() > width {
            lines.push(format!("  {word}"));
        } else if let Some(last) = lines.last_mut() {
            if line > 0 {
                last.push(' ');
            }
            last.push_str(word);
        }
    }
    lines.join("\n")
}
