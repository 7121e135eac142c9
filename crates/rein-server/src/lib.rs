//! Rein's HTTP server (axum), as a library: the multi-tenant API, the OpenAI-compatible
//! gateway, the dashboard and the metrics endpoint, with the workers that drive queued runs.
//! `rein serve` is this crate plus argument parsing; another program can embed it the same way
//! ([`Server`]).
//!
//! Every `/v1` request authenticates with `Authorization: Bearer <key>`; the key's tenant scopes
//! every query, so another tenant's run or agent is simply not found (404). Runs are queued in
//! the store and driven by this process's own workers (the same claim-and-lease loop as
//! `rein worker`), which also take over, at start-up, every run whose process died. Errors are
//! RFC 9457 `application/problem+json`.
//!
//! Reading order: [`Server`] → `router` (every route, by family) → a handler such as
//! `runs::create_run` → `rein_runtime::Runtime`. Depends on `rein-app` and the runtime; never
//! on the CLI.

mod admin;
mod agents;
mod approvals;
mod audit;
mod auth;
mod background;
mod cache;
mod connections;
mod costs;
mod events;
mod gateway;
mod metrics;
mod openapi;
mod problem;
mod request;
mod runs;
mod ui;

use crate::auth::KeyCache;
use crate::problem::Problem;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use rein_app::config::Config;
use rein_app::views::ProblemView;
use rein_providers::Model;
use rein_runtime::RunOutcome;
use rein_runtime::Runtime;
use rein_store::{Store, StoreError};
use rein_tools::Builtins;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, broadcast};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The longest a `wait: true` run request is held before answering 202 with the run so far.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(300);
/// How often an idle worker or event stream looks for new work without being woken.
pub(crate) const POLL: Duration = Duration::from_millis(250);

/// Everything a handler needs.
pub(crate) struct App {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) runtime: Runtime,
    pub(crate) config: Config,
    pub(crate) builtins: Builtins,
    pub(crate) model: Arc<dyn Model>,
    /// Woken when a run is queued or an event is appended by this process.
    pub(crate) wake: Notify,
    /// Runs this process's workers finished or paused, for `wait: true` requests.
    pub(crate) outcomes: broadcast::Sender<Arc<RunOutcome>>,
    /// The gateway's one-call agent per model, checked once.
    pub(crate) gateway_agents: gateway::Agents,
    /// The admin key's SHA-256; `None`: the admin API is off.
    pub(crate) admin_key_sha256: Option<String>,
    /// The gateway's exact-match response cache.
    pub(crate) gateway_cache: cache::ResponseCache,
    /// Tenants by API-key hash, as recently read from the store.
    pub(crate) keys: KeyCache,
    /// The Prometheus registry runs are measured into; `None` when `[telemetry] metrics` is
    /// off.
    pub(crate) metrics: Option<metrics::Metrics>,
    /// The dashboard's templates.
    pub(crate) ui: ui::Templates,
}

impl App {
    pub(crate) fn new(parts: crate::Parts) -> Result<Arc<Self>, ServerError> {
        let crate::Parts {
            config,
            store,
            runtime,
            builtins,
            model,
            admin_key_sha256,
        } = parts;
        let (outcomes, _) = broadcast::channel(1024);
        let metrics = config
            .telemetry
            .metrics
            .then(|| {
                metrics::Metrics::new(
                    config.telemetry.metrics_auth == rein_app::config::MetricsAuth::Admin,
                )
            })
            .transpose()?;
        let runtime = match &metrics {
            Some(m) => runtime.with_metrics(m.recorder()),
            None => runtime,
        };
        Ok(Arc::new(App {
            metrics,
            ui: ui::Templates::new()?,
            admin_key_sha256,
            gateway_cache: cache::ResponseCache::new(config.gateway.cache),
            keys: KeyCache::new(),
            store,
            runtime,
            config,
            builtins,
            model,
            wake: Notify::new(),
            outcomes,
            gateway_agents: gateway::Agents::default(),
        }))
    }
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The Prometheus registry could not be set up.
    #[error("cannot set up the metrics registry: {0}")]
    Metrics(String),
    /// The dashboard's templates do not compile (a build defect).
    #[error("the dashboard's templates do not compile: {0}")]
    Templates(#[from] minijinja::Error),
    /// The listener failed.
    #[error("cannot serve: {0}")]
    Io(#[from] std::io::Error),
    /// The store could not be read at start-up.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a server is made of: the caller opens the store and builds the runtime
/// (`rein_app::wiring`), the server serves them.
pub struct Parts {
    /// The configuration (`rein.toml`).
    pub config: Config,
    /// Where runs, tenants and keys live.
    pub store: Arc<dyn Store>,
    /// The runtime that drives runs (its workers resolve registered agents only).
    pub runtime: Runtime,
    /// The built-in tools specs may use.
    pub builtins: Builtins,
    /// The model runs and gateway calls use (providers, or a script).
    pub model: Arc<dyn Model>,
    /// The admin key's SHA-256; `None` turns the admin API off
    /// (`rein_app::admin::admin_key_sha256`).
    pub admin_key_sha256: Option<String>,
}

/// An HTTP server over one store and runtime.
pub struct Server {
    app: Arc<App>,
}

impl Server {
    /// A server for `parts`; nothing is served until [`Server::run`] or [`Server::router`].
    /// Call it within a tokio runtime: with `[telemetry] metrics` on, the metrics registry
    /// starts its upkeep task here.
    pub fn new(parts: Parts) -> Result<Self, ServerError> {
        Ok(Server {
            app: App::new(parts)?,
        })
    }

    /// Every route, with its middleware: for embedding in another axum application, or for a
    /// test that serves it on a port of its own. Nothing drives runs unless
    /// [`Server::run`] does.
    pub fn router(&self) -> Router {
        router(self.app.clone())
    }

    /// Serves `listener` with `workers` driving runs (0: an API-only server) and the background
    /// loops (key changes, session sweeping, audit anchors) until `shutdown` completes; then
    /// stops the workers and gives up their runs' leases, so the next process takes them over
    /// at once. Every step of an in-flight run is already in its log: stopping loses nothing.
    pub async fn run(
        self,
        listener: tokio::net::TcpListener,
        workers: usize,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let app = self.app;
        let background = background::Tasks::start(&app, workers).await?;
        let limits = connections::Limits::of(&app.config.server);
        connections::serve(listener, router(app.clone()), limits, shutdown).await;
        background.stop(&app).await;
        Ok(())
    }

    /// Serves `listener` until `shutdown` completes, without workers or background loops: the
    /// API and the gateway alone, with the same connection limits as [`Server::run`] (the
    /// gateway benchmark's server, in the benchmark's own process).
    pub async fn serve_api(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        let limits = connections::Limits::of(&self.app.config.server);
        connections::serve(listener, router(self.app), limits, shutdown).await;
    }
}

/// The most runs of one tenant this server's workers drive at once: `[server]
/// max_runs_per_tenant`, else three quarters of the workers (at least one), so one tenant's
/// backlog always leaves workers for the others' first runs.
pub fn runs_per_tenant(config: &Config, workers: usize) -> u32 {
    config.server.max_runs_per_tenant.unwrap_or_else(|| {
        u32::try_from(workers.saturating_mul(3) / 4)
            .unwrap_or(u32::MAX)
            .max(1)
    })
}

pub(crate) fn router(app: Arc<App>) -> Router {
    let (routes, api) = OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(agents::register_agent, agents::list_agents))
        .routes(routes!(runs::create_run, runs::list_runs))
        .routes(routes!(runs::get_run))
        .routes(routes!(events::run_events))
        .routes(routes!(runs::run_trace))
        .routes(routes!(approvals::decide))
        .routes(routes!(runs::cancel))
        .routes(routes!(costs::costs))
        .routes(routes!(audit::audit_verify))
        .routes(routes!(gateway::chat_completions))
        .routes(routes!(gateway::models))
        .routes(routes!(admin::tenants, admin::new_tenant))
        .routes(routes!(admin::keys, admin::new_key))
        .routes(routes!(admin::revoke))
        .routes(routes!(admin::log))
        .routes(routes!(metrics::metrics))
        .split_for_parts();
    let document = openapi::finish(api);
    routes
        .route(
            "/openapi.json",
            get(move || openapi::serve(document.clone())),
        )
        .merge(
            Router::new()
                .route("/ui", get(ui::home))
                .route("/ui/login", get(ui::login_page).post(ui::login))
                .route("/ui/logout", post(ui::logout))
                .route("/ui/runs", get(ui::runs))
                .route("/ui/runs/{id}", get(ui::run))
                .route("/ui/runs/{id}/approval", post(ui::decide))
                .route("/ui/runs/{id}/cancel", post(ui::cancel))
                .route("/ui/approvals", get(ui::approvals))
                .route("/ui/costs", get(ui::costs))
                .route("/ui/status", get(ui::status))
                .route_layer(axum::middleware::from_fn(ui::same_origin_forms)),
        )
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(app.config.server.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            request::time_limit,
        ))
        .layer(axum::middleware::from_fn(request::request_id))
        .with_state(app)
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "server", responses((status = 200, description = "The process answers", body = String, example = "ok")))]
pub(crate) async fn health() -> &'static str {
    "ok"
}

/// Readiness: the store answers.
#[utoipa::path(get, path = "/readyz", tag = "server", responses(
    (status = 200, description = "The store answers", body = String, example = "ready"),
    (status = 503, description = "The store does not answer", body = ProblemView, content_type = "application/problem+json"),
))]
pub(crate) async fn ready(State(app): State<Arc<App>>) -> Result<&'static str, Problem> {
    app.store.unfinished().await?;
    Ok("ready")
}
