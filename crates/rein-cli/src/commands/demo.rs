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
    ($name:literal, $tenant:literal, $input:literal, $shows:literal, $expect:literal) => {
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

/// The demo's own tenant with a small shared daily budget.
const BUDGET_TENANT: &str = "demo-budget";

const SCENARIOS: &[Scenario] = &[
    scenario!(
        "shared-budget",
        "demo-budget",
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
        shows: "three worker agents under one budget: one times out (its fallback answers), one is repaired",
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

pub async fn run(store_args: &crate::StoreArgs) -> anyhow::Result<u8> {
    let db = shell_word(&rein_store::redact_url(&store_args.db));
    let live = std::env::var("OPENAI_API_KEY").is_ok_and(|k| !k.is_empty());
    if live {
        say!(
            "OPENAI_API_KEY is set: the demo agents call the real API (OPENAI_BASE_URL if set); results depend on the model.\n"
        );
    } else {
        say!(
            "No OPENAI_API_KEY: model answers are replayed by the scripted model (examples/demo/*.script.yaml) through the\n\
             same driver a real provider uses. Limits, tools, retries and the hash-chained log are all real.\n"
        );
    }
    let tools = ToolService::start()
        .await
        .context("cannot start the demo's tool service on 127.0.0.1")?;
    let mut config = config::load(None).map_err(|e| anyhow!(BadInput(format!("{e:#}"))))?;
    // The demo's own policies, in this process only: a small daily budget for its budget tenant,
    // and order scopes for the default tenant (the unauthorised-tool agent itself lacks one).
    config.budgets.tenants.insert(
        TenantId::new(BUDGET_TENANT),
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

    let mut rows = vec![[
        "AGENT".to_string(),
        "SHOWS".into(),
        "STATUS".into(),
        "TERMINATION".into(),
        "STEPS".into(),
        "TOKENS".into(),
        "COST".into(),
    ]];
    let mut outcomes: Vec<(&Scenario, RunOutcome)> = Vec::new();
    for scenario in SCENARIOS {
        let file = scenario.files.0;
        let source = scenario.spec.replace("{{tools_url}}", &tools.url());
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
            tenant: TenantId::new(scenario.tenant),
            user: UserId::new("demo"),
            session: SessionId::new(format!("demo-{}", scenario.name)),
            job: None,
            granted_scopes: config.granted_scopes(&TenantId::new(scenario.tenant)),
            chat: None,
            trust: rein_core::Trust::Operator,
            trace_parent: None,
        };
        let outcome = runtime.run(request, model.as_ref()).await?;
        let ended = outcome
            .reason
            .map_or_else(|| outcome.status.to_string(), |r| r.to_string());
        rows.push([
            scenario.name.to_string(),
            scenario.shows.to_string(),
            outcome.status.to_string(),
            ended,
            (outcome.iterations + outcome.tool_calls).to_string(),
            outcome.usage.total().to_string(),
            outcome.cost.to_string(),
        ]);
        outcomes.push((scenario, outcome));
    }
    say!("{}\n", render::table(&rows));

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
            say!("{}: {detail}", scenario.name);
        }
        if let Some(pending) = &outcome.awaiting {
            say!(
                "{}: holds `{}` with {} ({}); decide with `rein approve {} --db {}{}` (add `--deny --reason TEXT` to refuse)",
                scenario.name,
                pending.tool,
                pending.arguments,
                pending.reason,
                outcome.run_id,
                db,
                if live {
                    String::new()
                } else {
                    format!(" --script {}", scenario.files.1)
                }
            );
        }
    }
    store.close().await;
    say!(
        "\nThe runs are recorded in {db}. Next:\n  rein runs list --db {db}\n  rein runs show <RUN> --db {db}\n  rein audit verify --db {db}",
        db = db
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
