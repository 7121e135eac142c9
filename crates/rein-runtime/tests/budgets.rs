//! Shared budgets under a race: many runs drawing on one tenant's daily budget at once never
//! spend past it, on the embedded counters and on Redis.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rein_core::budget::{BudgetPolicy, Budgets, Cap, Counters};
use rein_core::{
    Agent, CheckContext, PriceTable, SessionId, TenantId, TerminationReason, Usd, UserId,
};
use rein_providers::ScriptedModel;
use rein_runtime::{Governor, RunRequest, Runtime};
use rein_store::prelude::*;
use rein_store::{SqliteStore, Store};
use rein_tools::{Builtins, HttpTools, ToolBox};
use std::sync::Arc;

/// gpt-4o: $10 per million output tokens. Each answer uses its whole 4,000-token output cap and
/// a sliver of input, so each model call costs about $0.04, right at its reserved worst case.
const SPEC: &str = r#"
name: summariser
version: 1
model: {primary: openai/gpt-4o, max_output_tokens: 4000}
instructions: Summarise.
tools:
  - name: fetch
    source: {builtin: echo}
    contract: {side_effects: none}
limits: {max_iterations: 5, max_total_tokens: 100000, max_cost_usd: 1.00}
"#;

const SCRIPT: &str = r#"
responses:
  - tool_calls: [{name: fetch, arguments: {text: "part {n}"}}]
    usage: {input_tokens: 20, output_tokens: 4000}
  - text: Summary.
    usage: {input_tokens: 20, output_tokens: 4000}
"#;

const BUDGET_USD: f64 = 3.0;
const RUNS: usize = 500;

fn budgets() -> Budgets {
    Budgets {
        defaults: BudgetPolicy {
            tenant_daily: Cap {
                usd: Usd::from_dollars(BUDGET_USD),
                tokens: None,
            },
            ..BudgetPolicy::default()
        },
        ..Budgets::default()
    }
}

async fn race(counters: Arc<dyn Counters>, store: Arc<dyn Store>) {
    let runtime = Runtime::new(
        store.clone(),
        ToolBox::new(
            Builtins::standard(),
            HttpTools::new(
                reqwest::Client::new(),
                rein_tools::Egress::closed(rein_tools::CONNECT_TIMEOUT).unwrap(),
            ),
        ),
    )
    .with_governor(Governor {
        counters: counters.clone(),
        budgets: budgets(),
    });
    let prices = PriceTable::default();
    let builtins = Builtins::standard().infos();
    let agent = Arc::new(
        Agent::parse(
            "s.yaml",
            SPEC,
            &CheckContext {
                prices: &prices,
                builtin_tools: &builtins,
                providers: rein_providers::PROVIDERS,
            },
        )
        .unwrap(),
    );
    let model = Arc::new(ScriptedModel::parse("script.yaml", SCRIPT).unwrap());
    let tenant = TenantId::new(format!("acme-{}", uuid::Uuid::now_v7()));

    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..RUNS {
        let (runtime, model, agent, tenant) = (
            runtime.clone(),
            model.clone(),
            agent.clone(),
            tenant.clone(),
        );
        tasks.spawn(async move {
            let request = request(
                agent,
                &format!("document {n}"),
                tenant.as_str(),
                &format!("user-{}", n % 7),
                &format!("s-{n}"),
            );
            runtime.run(request, model.as_ref()).await.unwrap()
        });
    }
    let mut spent = Usd::ZERO;
    let (mut completed, mut refused, mut spenders) = (0, 0, 0);
    while let Some(outcome) = tasks.join_next().await {
        let outcome = outcome.unwrap();
        spent += outcome.cost;
        if outcome.cost > Usd::ZERO {
            spenders += 1;
        }
        match outcome.reason {
            Some(TerminationReason::Completed) => completed += 1,
            Some(TerminationReason::BudgetExhausted) => {
                refused += 1;
                assert!(
                    outcome
                        .detail
                        .as_deref()
                        .unwrap()
                        .contains("could not cover the next model call")
                );
                let events = store.events(&tenant, &outcome.run_id).await.unwrap();
                let last_two: Vec<&str> = events
                    .iter()
                    .rev()
                    .take(2)
                    .map(|e| e.kind.as_str())
                    .collect();
                assert_eq!(
                    last_two,
                    ["run_finished", "budget_refused"],
                    "a refused call is never requested"
                );
            }
            other => panic!("a run ended with {other:?}: {:?}", outcome.detail),
        }
    }
    let budget = Usd::from_dollars(BUDGET_USD).unwrap();
    let day = rein_core::time::format_utc(rein_core_now());
    let standing = counters
        .standing(&format!("tenant:{tenant}:{}", &day[..10]), rein_core_now())
        .await
        .unwrap();
    println!(
        "{RUNS} racing runs, budget {budget}: settled {} ({:.2}% of the budget) by {spenders} runs; {completed} completed, {refused} refused with budget_exhausted",
        standing.spent.usd,
        100.0 * standing.spent.usd.as_dollars() / budget.as_dollars()
    );
    assert!(
        standing.spent.usd <= budget,
        "overspent: {} > {budget}",
        standing.spent.usd
    );
    assert_eq!(
        standing.spent.usd, spent,
        "the counters settled exactly what the runs recorded"
    );
    assert_eq!(
        standing.reserved.usd,
        Usd::ZERO,
        "every reservation was settled"
    );
    assert!(
        refused > 0 && spenders > 0,
        "the budget must bite: {spenders} runs spent, {refused} refused"
    );
    assert!(
        standing.spent.usd.as_dollars() > BUDGET_USD * 0.9,
        "the budget was used, not wasted"
    );
}

/// A request to run the summariser with `input`, as `user` of `tenant` in `session`.
fn request(agent: Arc<Agent>, input: &str, tenant: &str, user: &str, session: &str) -> RunRequest {
    RunRequest {
        agent,
        spec_source: SPEC.to_string(),
        input: input.to_string(),
        tenant: TenantId::new(tenant),
        user: UserId::new(user),
        session: SessionId::new(session),
        job: None,
        granted_scopes: Vec::new(),
        trust: rein_core::Trust::Operator,
        trace_parent: None,
        chat: None,
    }
}

fn rein_core_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_runs_never_overspend_a_shared_budget_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("rein.db"), Default::default())
        .await
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    race(store.clone(), store).await;
}

/// Several workers on one PostgreSQL database share their budgets through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_runs_never_overspend_a_shared_budget_on_postgres() {
    let schema = rein_store::testing::TestSchema::create()
        .await
        .expect("PostgreSQL must be running on 127.0.0.1:5432 (scripts/test starts it)");
    let store: Arc<dyn Store> =
        Arc::new(rein_store::PgStore::connect(&schema.url()).await.unwrap());
    race(store.clone(), store.clone()).await;
    store.close().await;
    schema.drop_schema().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_runs_never_overspend_a_shared_budget_on_redis() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("rein.db"), Default::default())
        .await
        .unwrap();
    let prefix = format!("rein-test-{}", uuid::Uuid::now_v7());
    let counters = rein_redis::RedisCounters::connect("redis://127.0.0.1:6379", &prefix)
        .await
        .expect("Redis must be running on 127.0.0.1:6379 (.ci/run starts it)");
    race(Arc::new(counters), Arc::new(store)).await;
}

/// The budget counters in the store itself: the settlement is written with the answer, and the
/// run's end, which must come after the warning, is then left for a commit of its own.
#[tokio::test]
async fn crossing_the_warning_line_records_one_budget_warning() {
    warns_once(true).await;
}

/// Counters apart from the store (as Redis is): settled, then recorded.
#[tokio::test]
async fn crossing_the_warning_line_on_separate_counters_records_one_budget_warning() {
    warns_once(false).await;
}

async fn warns_once(counters_in_store: bool) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("rein.db"), Default::default())
        .await
        .unwrap();
    // $0.10 a day; each call costs about $0.04: the second call crosses 75%.
    let budgets = Budgets {
        defaults: BudgetPolicy {
            tenant_daily: Cap {
                usd: Usd::from_dollars(0.10),
                tokens: None,
            },
            ..BudgetPolicy::default()
        },
        ..Budgets::default()
    };
    let shared = Arc::new(store.clone());
    let counters: Arc<dyn Counters> = if counters_in_store {
        shared.clone()
    } else {
        Arc::new(store.clone())
    };
    let runtime = Runtime::new(
        shared,
        ToolBox::new(
            Builtins::standard(),
            HttpTools::new(
                reqwest::Client::new(),
                rein_tools::Egress::closed(rein_tools::CONNECT_TIMEOUT).unwrap(),
            ),
        ),
    )
    .with_governor(Governor { counters, budgets });
    let prices = PriceTable::default();
    let builtins = Builtins::standard().infos();
    let agent = Arc::new(
        Agent::parse(
            "s.yaml",
            SPEC,
            &CheckContext {
                prices: &prices,
                builtin_tools: &builtins,
                providers: rein_providers::PROVIDERS,
            },
        )
        .unwrap(),
    );
    let model = ScriptedModel::parse("script.yaml", SCRIPT).unwrap();
    let tenant = TenantId::new("warned");
    let request = request(agent, "doc", tenant.as_str(), "u", "s");
    let outcome = runtime.run(request, &model).await.unwrap();
    assert_eq!(outcome.reason, Some(TerminationReason::Completed));
    let events = store.events(&tenant, &outcome.run_id).await.unwrap();
    let warnings: Vec<_> = events
        .iter()
        .filter_map(|e| match e.decode().unwrap().kind {
            rein_core::EventKind::BudgetWarning {
                scope,
                spent,
                percent,
            } => Some((scope.key, spent.usd, percent)),
            _ => None,
        })
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].2, 75);
    assert!(warnings[0].0.starts_with("tenant:warned:"));
    assert!(warnings[0].1 >= Usd::from_dollars(0.075).unwrap());
    let last: Vec<String> = events[events.len() - 4..]
        .iter()
        .map(|e| e.kind.clone())
        .collect();
    assert_eq!(
        last,
        [
            "model_responded",
            "budget_settled",
            "budget_warning",
            "run_finished"
        ],
        "the warning comes before the run's end"
    );
}

/// Counters whose first settlement fails, as a Redis blip or a crash right after the model
/// answered would leave it.
struct FirstSettleFails {
    inner: SqliteStore,
    failed: std::sync::atomic::AtomicBool,
}

impl Counters for FirstSettleFails {
    fn reserve<'a>(
        &'a self,
        id: &'a str,
        scopes: &'a [rein_core::budget::Scope],
        amount: rein_core::budget::Amount,
        now_ms: i64,
        expires_ms: i64,
    ) -> rein_core::budget::BoxFuture<
        'a,
        Result<rein_core::budget::Reservation, rein_core::budget::CountersError>,
    > {
        self.inner.reserve(id, scopes, amount, now_ms, expires_ms)
    }
    fn settle<'a>(
        &'a self,
        id: &'a str,
        scopes: &'a [rein_core::budget::Scope],
        actual: rein_core::budget::Amount,
    ) -> rein_core::budget::BoxFuture<
        'a,
        Result<Vec<rein_core::budget::Standing>, rein_core::budget::CountersError>,
    > {
        if !self.failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(async {
                Err(rein_core::budget::CountersError(
                    "redis: connection reset".into(),
                ))
            });
        }
        self.inner.settle(id, scopes, actual)
    }
    fn standing<'a>(
        &'a self,
        key: &'a str,
        now_ms: i64,
    ) -> rein_core::budget::BoxFuture<
        'a,
        Result<rein_core::budget::Standing, rein_core::budget::CountersError>,
    > {
        self.inner.standing(key, now_ms)
    }
    fn cell<'a>(
        &'a self,
        key: &'a str,
    ) -> rein_core::budget::BoxFuture<'a, Result<Option<String>, rein_core::budget::CountersError>>
    {
        self.inner.cell(key)
    }
    fn swap_cell<'a>(
        &'a self,
        key: &'a str,
        expected: Option<&'a str>,
        new: &'a str,
    ) -> rein_core::budget::BoxFuture<'a, Result<bool, rein_core::budget::CountersError>> {
        self.inner.swap_cell(key, expected, new)
    }
}

#[tokio::test]
async fn spend_left_unsettled_by_a_failure_is_settled_exactly_once_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("rein.db"), Default::default())
        .await
        .unwrap();
    let flaky = Arc::new(FirstSettleFails {
        inner: store.clone(),
        failed: Default::default(),
    });
    let runtime = Runtime::new(
        Arc::new(store.clone()),
        ToolBox::new(
            Builtins::standard(),
            HttpTools::new(
                reqwest::Client::new(),
                rein_tools::Egress::closed(rein_tools::CONNECT_TIMEOUT).unwrap(),
            ),
        ),
    )
    .with_governor(Governor {
        counters: flaky,
        budgets: budgets(),
    });
    let prices = PriceTable::default();
    let builtins = Builtins::standard().infos();
    let agent = Arc::new(
        Agent::parse(
            "s.yaml",
            SPEC,
            &CheckContext {
                prices: &prices,
                builtin_tools: &builtins,
                providers: rein_providers::PROVIDERS,
            },
        )
        .unwrap(),
    );
    let model = ScriptedModel::parse("script.yaml", SCRIPT).unwrap();
    let tenant = TenantId::new("resumed");
    let request = request(agent, "doc", tenant.as_str(), "u", "s");
    let err = runtime.run(request, &model).await.unwrap_err();
    assert!(err.to_string().contains("connection reset"), "{err}");
    let run_id = store
        .list_runs(&tenant, &Default::default(), 1)
        .await
        .unwrap()[0]
        .info
        .id
        .clone();
    let key = |t: &TenantId| {
        format!(
            "tenant:{t}:{}",
            &rein_core::time::format_utc(rein_core_now())[..10]
        )
    };
    let before = store
        .standing(&key(&tenant), rein_core_now())
        .await
        .unwrap();
    assert_eq!(
        before.spent.usd,
        Usd::ZERO,
        "the failed settlement counted nothing yet"
    );

    let outcome = runtime
        .resume(&tenant, &run_id, &prices, &model)
        .await
        .unwrap();
    assert_eq!(outcome.reason, Some(TerminationReason::Completed));
    let after = store
        .standing(&key(&tenant), rein_core_now())
        .await
        .unwrap();
    assert_eq!(
        after.spent.usd, outcome.cost,
        "every recorded call's cost is settled, once"
    );
    assert_eq!(after.reserved.usd, Usd::ZERO);
}
