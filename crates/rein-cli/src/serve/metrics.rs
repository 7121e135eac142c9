//! `GET /metrics`: Prometheus metrics in the text format.
//!
//! The counters and histograms are folded from the events of the runs this process drives (see
//! `rein_core::meter`), so a scrape shows what the logs hold; the `rein_runs` gauges are read
//! from the store at scrape time, so they count every process's runs. Each process exports its
//! own counters: Prometheus sums them across instances.

use super::admin::Admin;
use super::{App, Problem};
use crate::config::MetricsAuth;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics::Recorder as _;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
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

/// The process's Prometheus registry.
pub(super) struct Metrics {
    handle: PrometheusHandle,
    recorder: rein_runtime::Recorder,
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
    /// A registry with every metric described and every histogram given its buckets.
    pub(super) fn new() -> anyhow::Result<Self> {
        let mut builder = PrometheusBuilder::new();
        for (name, _) in METRICS {
            let bounds = buckets(name);
            if !bounds.is_empty() {
                builder =
                    builder.set_buckets_for_metric(Matcher::Full(name.to_string()), bounds)?;
            }
        }
        let recorder = builder.build_recorder();
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
        let handle = recorder.handle();
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
            recorder: Arc::new(recorder),
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
        let mut now = HashSet::new();
        for count in counts {
            if OPEN_STATUSES.contains(&count.status) {
                gauge(
                    count.tenant.as_str(),
                    count.status.as_str(),
                    count.runs as f64,
                );
                now.insert((count.tenant.as_str().to_string(), count.status.as_str()));
            }
        }
        for (tenant, status) in shown.difference(&now) {
            gauge(tenant, status, 0.0);
        }
        shown.extend(now);
    }
}

/// Prometheus metrics (text format 0.0.4): tokens and cost by tenant, agent, model and step
/// kind; runs by outcome; model and tool latencies; tool calls by status; budgets, breakers,
/// and runs not yet ended. Open to anyone who reaches the port unless `[telemetry]
/// metrics_auth = "admin"`.
#[utoipa::path(get, path = "/metrics", tag = "server",
    responses(
        (status = 200, description = "The metrics, in Prometheus's text format", body = String, content_type = "text/plain"),
        (status = 401, description = "`[telemetry] metrics_auth = \"admin\"` and no valid admin key", body = crate::views::ProblemView, content_type = "application/problem+json"),
        (status = 404, description = "Metrics are off (`[telemetry] metrics = false`)", body = crate::views::ProblemView, content_type = "application/problem+json"),
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
