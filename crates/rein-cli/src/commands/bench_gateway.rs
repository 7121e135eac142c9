//! `rein bench --gateway`: the latency the OpenAI-compatible gateway adds to a model call.
//!
//! A zero-latency fake OpenAI server runs on 127.0.0.1, and `rein serve`'s API runs in this
//! process on an SQLite store, with a tenant budget so that every call reserves and settles.
//! `--clients` clients offer `--rate` requests per second in all (each client sends on its own
//! fixed schedule, and a late request goes as soon as the previous one answers), first to the
//! fake directly, then through the gateway, `--requests` each; every request's latency is
//! measured from when it was sent. The gateway's added latency is the difference of the two
//! phases' percentiles. Load generator, gateway and fake share this machine's cores.

use crate::commands::bench::{BenchArgs, percentile};
use anyhow::{Context, anyhow};
use rein_app::config;
use rein_core::TenantId;
use rein_fakes::{FakeOpenAi, FakeResponse};
use rein_providers::{Model, OpenAiClient};
use rein_server::{Parts, Server};
use rein_store::{Durability, SqliteStore, Store};
use rein_tools::Builtins;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Latencies of one phase, in microseconds, sorted.
struct Phase {
    latencies_us: Vec<u64>,
    wall: Duration,
    failures: usize,
    /// CPU time the hypervisor gave to other guests while this machine's vCPUs wanted to run,
    /// during the phase, summed over CPUs (Linux's steal time; `None` where it cannot be read).
    steal: Option<Duration>,
}

impl Phase {
    fn p(&self, pct: f64) -> u64 {
        percentile(&self.latencies_us, pct)
    }

    fn throughput(&self) -> f64 {
        self.latencies_us.len() as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    fn json(&self) -> Value {
        json!({
            "requests": self.latencies_us.len(),
            "failures": self.failures,
            "requests_per_s": self.throughput().round(),
            "p50_us": self.p(50.0),
            "p90_us": self.p(90.0),
            "p99_us": self.p(99.0),
            "max_us": self.latencies_us.last().copied().unwrap_or(0),
            "cpu_steal_ms": self.steal.map(|d| d.as_millis()),
        })
    }
}

/// Sends `total` copies of `body` to `url` from `clients` clients at `rate` per second in all.
async fn phase(
    http: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: &Value,
    clients: usize,
    total: usize,
    rate: u32,
) -> anyhow::Result<Phase> {
    let clients = clients.max(1);
    let interval = Duration::from_secs_f64(clients as f64 / f64::from(rate.max(1)));
    let started = Instant::now();
    let stolen_before = steal_time();
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let n = total / clients + usize::from(c < total % clients);
        let (http, url, body) = (http.clone(), url.to_string(), body.to_string());
        let key = key.map(str::to_string);
        // Clients start spread over one interval, so the offered load is even.
        let offset = interval.mul_f64(c as f64 / clients as f64);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(n);
            let mut failures = 0usize;
            let first = tokio::time::Instant::now() + offset;
            for i in 0..n {
                tokio::time::sleep_until(first + interval.mul_f64(i as f64)).await;
                let mut request = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone());
                if let Some(key) = &key {
                    request = request.bearer_auth(key);
                }
                let sent = Instant::now();
                let ok = match request.send().await {
                    Ok(response) => {
                        let ok = response.status().is_success();
                        ok && response.bytes().await.is_ok()
                    }
                    Err(_) => false,
                };
                if ok {
                    latencies.push(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX));
                } else {
                    failures += 1;
                }
            }
            (latencies, failures)
        }));
    }
    let mut latencies_us = Vec::with_capacity(total);
    let mut failures = 0;
    for task in tasks {
        let (l, f) = task.await.context("a benchmark client failed")?;
        latencies_us.extend(l);
        failures += f;
    }
    latencies_us.sort_unstable();
    Ok(Phase {
        latencies_us,
        wall: started.elapsed(),
        failures,
        steal: stolen_before
            .zip(steal_time())
            .map(|(before, after)| after.saturating_sub(before)),
    })
}

/// The machine's steal time so far (`/proc/stat`), or `None` off Linux.
fn steal_time() -> Option<Duration> {
    steal_in_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// Clock ticks per second of `/proc/stat`'s counters: the kernel's `USER_HZ`, 100 on every
/// architecture Linux supports today.
const USER_HZ: u64 = 100;

/// The steal time in `/proc/stat`'s text: the eighth counter of its `cpu` line (all CPUs), in
/// `USER_HZ` ticks.
fn steal_in_proc_stat(stat: &str) -> Option<Duration> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: u64 = line.split_whitespace().nth(8)?.parse().ok()?;
    Some(Duration::from_millis(ticks.saturating_mul(1000 / USER_HZ)))
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<u8> {
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let fake = FakeOpenAi::start_unrecorded(|_, _| FakeResponse::text("ok", 20, 5)).await?;
    let http = rein_app::wiring::http_client()?;
    let mut config = config::load(None)?;
    // A cap far above what the benchmark spends, so every call reserves and settles.
    config.budgets.defaults.tenant_daily = rein_core::budget::Cap {
        usd: Some(rein_core::Usd::from_micros(1_000_000_000_000)),
        tokens: None,
    };
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(tmp.path().join("bench-gateway.db"), Durability::Process).await?,
    );
    let tenant = TenantId::new("bench");
    let key = rein_app::admin::new_api_key()?;
    store
        .create_tenant(&tenant, rein_runtime::now_ms(), "bench")
        .await?;
    store
        .add_api_key(
            &tenant,
            &rein_core::event::sha256_hex(key.as_bytes()),
            rein_runtime::now_ms(),
            None,
            "bench",
        )
        .await?;
    let runtime =
        rein_app::wiring::runtime_for(&config, &store, Builtins::standard(), http.clone()).await?;
    let model: Arc<dyn Model> = Arc::new(OpenAiClient::new(http.clone(), fake.base_url(), None));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gateway = format!("http://{}/v1/chat/completions", listener.local_addr()?);
    let server = Server::new(Parts {
        config,
        store: store.clone(),
        runtime,
        builtins: Builtins::standard(),
        model,
        admin_key_sha256: None,
    })?;
    let server = tokio::spawn(server.serve_api(listener, std::future::pending()));
    let direct = format!("{}/chat/completions", fake.base_url());
    let body = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say ok."}],
        "max_tokens": 16,
    });
    let clients = http_client_pool(args.clients)?;
    // Warm both paths (connections, the gateway's checked agent, SQLite's cache).
    let warm = (args.requests / 10).clamp(100, 1000);
    phase(
        &clients,
        &direct,
        None,
        &body,
        args.clients,
        warm,
        args.rate,
    )
    .await?;
    phase(
        &clients,
        &gateway,
        Some(&key),
        &body,
        args.clients,
        warm,
        args.rate,
    )
    .await?;
    let direct_phase = phase(
        &clients,
        &direct,
        None,
        &body,
        args.clients,
        args.requests,
        args.rate,
    )
    .await?;
    let gateway_phase = phase(
        &clients,
        &gateway,
        Some(&key),
        &body,
        args.clients,
        args.requests,
        args.rate,
    )
    .await?;
    server.abort();
    if gateway_phase.failures > 0 || direct_phase.failures > 0 {
        return Err(anyhow!(
            "{} direct and {} gateway requests failed",
            direct_phase.failures,
            gateway_phase.failures
        ));
    }
    let spent = store
        .costs(Some(&tenant), rein_store::CostGroup::Agent, 0)
        .await?;
    let calls: u64 = spent.iter().map(|l| l.calls).sum();
    let added = |p: f64| gateway_phase.p(p).saturating_sub(direct_phase.p(p));
    if args.json {
        say!(
            "{}",
            json!({
                "clients": args.clients,
                "offered_rate": args.rate,
                "direct": direct_phase.json(),
                "gateway": gateway_phase.json(),
                "added_p50_us": added(50.0),
                "added_p99_us": added(99.0),
                "gateway_calls_recorded": calls,
            })
        );
    } else {
        say!(
            "gateway benchmark: {} clients offering {} requests/s, {} requests per phase, zero-latency fake provider",
            args.clients,
            args.rate,
            args.requests
        );
        for (name, p) in [("direct", &direct_phase), ("gateway", &gateway_phase)] {
            say!(
                "  {name:<8} {:>6.0} requests/s   p50 {:>6} us   p90 {:>6} us   p99 {:>6} us",
                p.throughput(),
                p.p(50.0),
                p.p(90.0),
                p.p(99.0)
            );
            if let Some(steal) = p.steal.filter(|s| !s.is_zero()) {
                say!(
                    "           the hypervisor ran other guests for {} ms of this phase's CPU time (steal time): its tail may be the machine's, not Rein's",
                    steal.as_millis()
                );
            }
        }
        say!(
            "  added by the gateway: p50 {} us, p99 {} us ({} calls recorded as runs, each with its budget reservation)",
            added(50.0),
            added(99.0),
            calls
        );
    }
    Ok(crate::exit::OK)
}

/// One HTTP client for the load, with a connection per client kept alive.
fn http_client_pool(clients: usize) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build the benchmark's HTTP client")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_time_is_the_eighth_counter_of_the_cpu_line() {
        let stat = "cpu  370169 33 50920 217488 2165 0 2208 11709 0 0\n\
                    cpu0 185000 10 25000 108000 1000 0 1100 5900 0 0\n\
                    intr 1 2 3\n";
        assert_eq!(
            steal_in_proc_stat(stat),
            Some(Duration::from_millis(117_090))
        );
    }

    #[test]
    fn a_stat_without_steal_time_gives_none() {
        // Kernels before 2.6.11 print seven counters; a per-CPU line alone is not the total.
        assert_eq!(steal_in_proc_stat("cpu  1 2 3 4 5 6 7\n"), None);
        assert_eq!(steal_in_proc_stat("cpu0 1 2 3 4 5 6 7 8 9 10\n"), None);
        assert_eq!(steal_in_proc_stat("cpu  1 2 3 4 5 6 7 x 9 10\n"), None);
        assert_eq!(steal_in_proc_stat(""), None);
    }
}
