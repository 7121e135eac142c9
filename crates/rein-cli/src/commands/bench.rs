//! `rein bench`: the engine's own cost, measured end to end with the durable SQLite log.
//!
//! 1. **Overhead per step.** One long run against a zero-latency fake OpenAI server on
//!    127.0.0.1: every model turn asks for a built-in tool call until `--steps` steps are done.
//!    For each model or tool step the driver records its own time (engine decisions, event
//!    sealing and hashing, the durable SQLite append) minus the time spent waiting on the
//!    provider and the tool; we report its median and 99th percentile.
//! 2. **Memory per in-flight run.** `--runs` runs are started together; each records its
//!    start and its first model request, then waits at a gate in front of the provider. When
//!    all of them are waiting, resident memory is read; the growth over the baseline divided by
//!    the number of runs is the cost of one in-flight run. The gate then opens and every run
//!    completes through a pool of at most 256 concurrent provider connections.

use anyhow::{Context, anyhow};
use clap::Args;
use rein_app::config;
use rein_app::wiring::{http_client, parse_agent};
use rein_core::{Agent, SessionId, TenantId, TerminationReason, UserId};
use rein_fakes::{FakeOpenAi, FakeResponse};
use rein_providers::{BoxFuture, Model, ModelError, ModelRequest, OpenAiClient};
use rein_runtime::{RunRequest, Runtime};
use rein_store::{Durability, SqliteStore, Store};
use rein_tools::{Builtins, HttpTools, ToolBox};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Steps (model calls plus tool calls) in the long run, before the model's final answer.
    #[arg(long, default_value_t = 2000)]
    steps: u32,
    /// Runs held in flight at once for the memory measurement.
    #[arg(long, default_value_t = 10_000)]
    runs: usize,
    /// Directory for the benchmark's SQLite files (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print the results as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// Measure the OpenAI-compatible gateway's added latency instead (see `bench_gateway`).
    #[arg(long)]
    gateway: bool,
    /// Gateway benchmark: concurrent clients.
    #[arg(long, default_value_t = 50)]
    pub(crate) clients: usize,
    /// Gateway benchmark: requests per phase (direct, then through the gateway).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) requests: usize,
    /// Gateway benchmark: offered load, requests per second, spread over the clients.
    #[arg(long, default_value_t = 1000)]
    pub(crate) rate: u32,
}

fn spec(steps: u32) -> String {
    format!(
        r#"name: bench
version: 1
model: {{primary: openai/gpt-4o-mini, max_output_tokens: 64}}
instructions: Echo each item, then say done.
tools:
  - name: echo
    source: {{builtin: echo}}
    contract: {{timeout: 5s, side_effects: none}}
limits:
  max_iterations: {steps}
  max_total_tokens: 1000000000
  max_cost_usd: 100000
  timeout: 30m
  max_tool_calls: {steps}
"#
    )
}

/// Answers with a tool call until the conversation has `turns` assistant turns, then "done".
fn responder(turns: usize) -> impl Fn(usize, &Value) -> FakeResponse + Send + Sync + 'static {
    move |_, body| {
        let done = body["messages"]
            .as_array()
            .map_or(0, |m| m.iter().filter(|m| m["role"] == "assistant").count());
        if done < turns {
            FakeResponse::tool_call(
                &format!("call_{done}"),
                "echo",
                &json!({"text": format!("item {done}")}),
                40,
                12,
            )
        } else {
            FakeResponse::text("done", 40, 2)
        }
    }
}

fn request(agent: &Arc<Agent>, source: &str, n: usize) -> RunRequest {
    RunRequest {
        agent: agent.clone(),
        spec_source: source.to_string(),
        input: format!("bench input {n}"),
        tenant: TenantId::new("bench"),
        user: UserId::new("bench"),
        session: SessionId::new(format!("bench-{n}")),
        job: None,
        granted_scopes: Vec::new(),
        trust: rein_core::Trust::Operator,
        trace_parent: None,
        chat: None,
    }
}

/// Resident and peak resident memory of this process, in KiB (Linux).
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub(crate) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Holds every call at a gate until it opens, then lets at most `permits` through at once.
struct Gated {
    inner: OpenAiClient,
    arrived: AtomicUsize,
    open: watch::Receiver<bool>,
    permits: Semaphore,
}

impl Model for Gated {
    fn complete<'a>(
        &'a self,
        request: ModelRequest<'a>,
    ) -> BoxFuture<'a, Result<rein_core::ModelReply, ModelError>> {
        Box::pin(async move {
            self.arrived.fetch_add(1, Ordering::SeqCst);
            let mut open = self.open.clone();
            let _ = open.wait_for(|o| *o).await;
            let _permit = self.permits.acquire().await;
            self.inner.complete(request).await
        })
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<u8> {
    if args.gateway {
        return crate::commands::bench_gateway::run(&args).await;
    }
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = config::load(None)?;
    let builtins = Builtins::standard();
    let http = http_client()?;

    // 1. Overhead per step over one long run.
    let turns = (args.steps / 2).max(1) as usize;
    let fake = FakeOpenAi::start_unrecorded(responder(turns)).await?;
    let source = spec(args.steps + 2);
    let agent = parse_agent("bench.yaml", &source, &config, &builtins)?;
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.join("bench-steps.db"), Durability::Process).await?);
    let runtime = Runtime::new(
        store.clone(),
        ToolBox::new(
            builtins.clone(),
            HttpTools::new(
                http.clone(),
                rein_tools::Egress::closed(rein_tools::CONNECT_TIMEOUT)?,
            ),
        ),
    )
    .with_step_timings(true);
    let model = OpenAiClient::new(http.clone(), fake.base_url(), None);
    // Warm up connections, caches and the allocator.
    let warm = FakeOpenAi::start_unrecorded(responder(20)).await?;
    let warm_model = OpenAiClient::new(http.clone(), warm.base_url(), None);
    runtime
        .run(request(&agent, &source, 0), &warm_model)
        .await?;
    let started = Instant::now();
    let outcome = runtime.run(request(&agent, &source, 1), &model).await?;
    let wall = started.elapsed();
    if outcome.reason != Some(TerminationReason::Completed) {
        return Err(anyhow!(
            "the benchmark run ended with {:?} instead of completing: {:?}",
            outcome.reason,
            outcome.detail
        ));
    }
    let mut overheads = outcome.step_overheads_ns.clone();
    overheads.sort_unstable();
    let steps = overheads.len();
    let p50 = percentile(&overheads, 50.0);
    let p99 = percentile(&overheads, 99.0);
    let mean = overheads.iter().sum::<u64>() / steps.max(1) as u64;
    let own_total: u64 = overheads.iter().sum();
    let outside_per_step = (wall.as_nanos() as u64).saturating_sub(own_total) / steps.max(1) as u64;
    store.close().await;
    drop(fake);
    drop(warm);

    // 2. Memory per in-flight run.
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.join("bench-memory.db"), Durability::Process).await?);
    let runtime = Runtime::new(
        store.clone(),
        ToolBox::new(
            builtins.clone(),
            HttpTools::new(
                http.clone(),
                rein_tools::Egress::closed(rein_tools::CONNECT_TIMEOUT)?,
            ),
        ),
    );
    let fake = FakeOpenAi::start_unrecorded(|_, _| FakeResponse::text("done", 30, 2)).await?;
    let short = spec(4);
    let short_agent = parse_agent("bench.yaml", &short, &config, &builtins)?;
    let (open_tx, open_rx) = watch::channel(false);
    let gated = Arc::new(Gated {
        inner: OpenAiClient::new(http.clone(), fake.base_url(), None),
        arrived: AtomicUsize::new(0),
        open: open_rx,
        permits: Semaphore::new(256),
    });
    let (baseline_kib, _) = memory_kib();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..args.runs {
        let runtime = runtime.clone();
        let gated = gated.clone();
        let req = request(&short_agent, &short, n);
        tasks.spawn(async move { runtime.run(req, gated.as_ref()).await.map(|o| o.reason) });
    }
    let wait_started = Instant::now();
    while gated.arrived.load(Ordering::SeqCst) < args.runs {
        if wait_started.elapsed() > Duration::from_secs(600) {
            return Err(anyhow!(
                "only {} of {} runs reached the gate in 10 minutes",
                gated.arrived.load(Ordering::SeqCst),
                args.runs
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (in_flight_kib, _) = memory_kib();
    let fill_time = wait_started.elapsed();
    let _ = open_tx.send(true);
    let mut completed = 0usize;
    while let Some(result) = tasks.join_next().await {
        if matches!(result, Ok(Ok(Some(TerminationReason::Completed)))) {
            completed += 1;
        }
    }
    let (_, peak_kib) = memory_kib();
    store.close().await;
    let per_run_bytes = in_flight_kib.saturating_sub(baseline_kib) * 1024 / args.runs.max(1) as u64;
    let peak_per_run_bytes = peak_kib.saturating_sub(baseline_kib) * 1024 / args.runs.max(1) as u64;

    let us = |ns: u64| ns as f64 / 1000.0;
    if args.json {
        say!(
            "{}",
            json!({
                "steps": steps,
                "overhead_per_step_us": {"p50": us(p50), "p99": us(p99), "mean": us(mean)},
                "provider_and_tool_per_step_us": us(outside_per_step),
                "runs_in_flight": args.runs,
                "runs_completed": completed,
                "memory_per_in_flight_run_bytes": per_run_bytes,
                "peak_memory_per_run_bytes": peak_per_run_bytes,
                "baseline_rss_kib": baseline_kib,
                "in_flight_rss_kib": in_flight_kib,
                "peak_rss_kib": peak_kib,
            })
        );
    } else {
        say!(
            "Engine overhead per step (durable, hash-chained SQLite log; {steps} steps of one run against a zero-latency fake OpenAI server on 127.0.0.1):"
        );
        say!(
            "  p50 {:.1} µs   p99 {:.1} µs   mean {:.1} µs   (target: p50 ≤ 400 µs)",
            us(p50),
            us(p99),
            us(mean)
        );
        say!(
            "  outside the engine (provider round trip, tool): {:.1} µs per step",
            us(outside_per_step)
        );
        say!(
            "Memory with {} runs in flight (each started and waiting on its first model call):",
            args.runs
        );
        say!(
            "  {:.1} KB per in-flight run (RSS {} → {} KiB, filled in {:.1} s); peak while completing: {:.1} KB per run (target: < 50 KB)",
            per_run_bytes as f64 / 1000.0,
            baseline_kib,
            in_flight_kib,
            fill_time.as_secs_f64(),
            peak_per_run_bytes as f64 / 1000.0
        );
        say!("  {completed} of {} runs completed", args.runs);
    }
    Ok(crate::exit::OK)
}
