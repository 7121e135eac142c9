//! `GET /metrics`: Prometheus metrics in the text format.
//!
//! The counters and histograms are folded from the events of the runs this process drives (see
//! `rein_core::meter`), so a scrape shows what the logs hold; the `rein_runs` gauges are read
//! from the store at scrape time, so they count every process's runs. Each process exports its
//! own counters: Prometheus sums them across instances.
//!
//! Open to anyone who reaches the port (`metrics_auth = "none"`, the default, as Prometheus
//! scrapes), the metrics name no tenant, agent, tool, graph node or breaker: those labels are left out and the
//! series summed over them, and the per-tenant gauges (budget utilisation, open breakers) are
//! not shown. Behind the admin key (`metrics_auth = "admin"`) every label is there.

use crate::App;
use crate::admin::Admin;
use crate::problem::Problem;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics::Recorder as _;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rein_app::config::MetricsAuth;
use rein_core::RunStatus;
use rein_core::meter::{METRICS, Measure, buckets};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often histogram samples are folded into their buckets between scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The statuses the `rein_runs` gauge counts.
const OPEN_STATUSES: [RunStatus; 3] = [
    RunStatus::Queued,
    RunStatus::Running,
    RunStatus::AwaitingApproval,
];

/// The labels that name a tenant or what belongs to one (its agents', tools' and graph nodes'
/// names are the tenant's own words).
const NAMING: [&str; 6] = ["tenant", "agent", "breaker", "user", "tool", "node"];
/// The gauges that only mean something per tenant.
const PER_TENANT: [&str; 2] = ["rein_budget_utilisation_ratio", "rein_breaker_open"];

/// A recorder for metrics anyone may read: it leaves out the labels that name tenants, so
/// their series add up, and the gauges that only mean something per tenant.
struct Unnamed(metrics_exporter_prometheus::PrometheusRecorder);

impl Unnamed {
    fn key(key: &metrics::Key) -> metrics::Key {
        let labels: Vec<metrics::Label> = key
            .labels()
            .filter(|l| !NAMING.contains(&l.key()))
            .cloned()
            .collect();
        metrics::Key::from_parts(key.name().to_string(), labels)
    }
}

impl metrics::Recorder for Unnamed {
    fn describe_counter(
        &self,
        key: metrics::KeyName,
        unit: Option<metrics::Unit>,
        description: metrics::SharedString,
    ) {
        self.0.describe_counter(key, unit, description);
    }

    fn describe_gauge(
        &self,
        key: metrics::KeyName,
        unit: Option<metrics::Unit>,
        description: metrics::SharedString,
    ) {
        if !PER_TENANT.contains(&key.as_str()) {
            self.0.describe_gauge(key, unit, description);
        }
    }

    fn describe_histogram(
        &self,
        key: metrics::KeyName,
        unit: Option<metrics::Unit>,
        description: metrics::SharedString,
    ) {
        self.0.describe_histogram(key, unit, description);
    }

    fn register_counter(
        &self,
        key: &metrics::Key,
        metadata: &metrics::Metadata<'_>,
    ) -> metrics::Counter {
        self.0.register_counter(&Unnamed::key(key), metadata)
    }

    fn register_gauge(
        &self,
        key: &metrics::Key,
        metadata: &metrics::Metadata<'_>,
    ) -> metrics::Gauge {
        if PER_TENANT.contains(&key.name()) {
            return metrics::Gauge::noop();
        }
        self.0.register_gauge(&Unnamed::key(key), metadata)
    }

    fn register_histogram(
        &self,
        key: &metrics::Key,
        metadata: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        self.0.register_histogram(&Unnamed::key(key), metadata)
    }
}

/// The process's Prometheus registry.
pub(super) struct Metrics {
    handle: PrometheusHandle,
    recorder: rein_runtime::Recorder,
    /// Whether the metrics name tenants (only behind the admin key).
    named: bool,
    /// The `rein_runs` series shown so far, set to 0 when a scrape no longer finds them.
    shown: Mutex<HashSet<(String, &'static str)>>,
    upkeep: tokio::task::JoinHandle<()>,
}

impl Drop for Metrics {
    fn drop(&mut self) {
        self.upkeep.abort();
    }
}

impl Metrics {
    /// A registry with every metric described and every histogram given its buckets, naming
    /// tenants when `named`.
    pub(super) fn new(named: bool) -> Result<Self, crate::ServerError> {
        let mut builder = PrometheusBuilder::new();
        for (name, _) in METRICS {
            let bounds = buckets(name);
            if !bounds.is_empty() {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full(name.to_string()), bounds)
                    .map_err(|e| crate::ServerError::Metrics(e.to_string()))?;
            }
        }
        let prometheus = builder.build_recorder();
        let handle = prometheus.handle();
        let recorder: rein_runtime::Recorder = if named {
            Arc::new(prometheus)
        } else {
            Arc::new(Unnamed(prometheus))
        };
        for (name, help) in METRICS {
            let (key, help) = ((*name).into(), (*help).into());
            if name.ends_with("_total") {
                recorder.describe_counter(key, None, help);
            } else if buckets(name).is_empty() {
                recorder.describe_gauge(key, None, help);
            } else {
                recorder.describe_histogram(key, None, help);
            }
        }
        let upkeep = {
            let handle = handle.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(UPKEEP_EVERY);
                loop {
                    tick.tick().await;
                    handle.run_upkeep();
                }
            })
        };
        Ok(Metrics {
            handle,
            recorder,
            named,
            shown: Mutex::new(HashSet::new()),
            upkeep,
        })
    }

    /// The recorder the runtime measures runs into.
    pub(super) fn recorder(&self) -> rein_runtime::Recorder {
        self.recorder.clone()
    }

    /// Sets the `rein_runs` gauges from the store's counts.
    fn set_open_runs(&self, counts: Vec<rein_store::RunCount>) {
        let gauge = |tenant: &str, status: &'static str, value: f64| {
            let measure = Measure::Set {
                name: "rein_runs",
                labels: vec![
                    ("tenant", tenant.to_string()),
                    ("status", status.to_string()),
                ],
                value,
            };
            rein_runtime::record_measures(self.recorder.as_ref(), [measure]);
        };
        let Ok(mut shown) = self.shown.lock() else {
            return;
        };
        // Unnamed, one series per status: the tenants' counts summed.
        let mut runs: std::collections::BTreeMap<(String, &'static str), f64> = Default::default();
        for count in counts {
            if OPEN_STATUSES.contains(&count.status) {
                let tenant = if self.named {
                    count.tenant.as_str().to_string()
                } else {
                    String::new()
                };
                *runs.entry((tenant, count.status.as_str())).or_default() += count.runs as f64;
            }
        }
        let mut now = HashSet::new();
        for ((tenant, status), value) in runs {
            gauge(&tenant, status, value);
            now.insert((tenant, status));
        }
        for (tenant, status) in shown.difference(&now) {
            gauge(tenant, status, 0.0);
        }
        shown.extend(now);
    }
}

/// Prometheus metrics (text format 0.0.4): tokens and cost by model and step kind; runs by
/// outcome; model and tool latencies; tool calls by status; budgets, breakers, and runs not yet
/// ended. Open to anyone who reaches the port unless `[telemetry] metrics_auth = "admin"`, and
/// then by tenant and agent too (open, they name no tenant).
#[utoipa::path(get, path = "/metrics", tag = "server",
    responses(
        (status = 200, description = "The metrics, in Prometheus's text format", body = String, content_type = "text/plain"),
        (status = 401, description = "`[telemetry] metrics_auth = \"admin\"` and no valid admin key", body = rein_app::views::ProblemView, content_type = "application/problem+json"),
        (status = 404, description = "Metrics are off (`[telemetry] metrics = false`)", body = rein_app::views::ProblemView, content_type = "application/problem+json"),
    ),
    security((), ("admin_key" = [])))]
pub(super) async fn metrics(State(app): State<Arc<App>>, mut parts: Parts) -> Response {
    let Some(metrics) = &app.metrics else {
        return Problem::new(
            StatusCode::NOT_FOUND,
            "metrics are off on this server (`[telemetry] metrics = false`)",
        )
        .into_response();
    };
    if app.config.telemetry.metrics_auth == MetricsAuth::Admin
        && let Err(refused) = Admin::from_request_parts(&mut parts, &app).await
    {
        return refused.into_response();
    }
    match app.store.open_run_counts().await {
        Ok(counts) => metrics.set_open_runs(counts),
        Err(e) => {
            return Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the store could not be read for the run gauges: {e}"),
            )
            .into_response();
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        metrics.handle.render(),
    )
        .into_response()
}
