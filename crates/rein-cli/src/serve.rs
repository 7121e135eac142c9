//! `rein serve`: the multi-tenant HTTP API (axum).
//!
//! Every `/v1` request authenticates with `Authorization: Bearer <key>`; the key's tenant scopes
//! every query, so another tenant's run or agent is simply not found (404). Runs are queued in
//! the store and driven by this process's own workers (the same claim-and-lease loop as
//! `rein worker`), which also take over, at start-up, every run whose process died. Errors are
//! RFC 9457 `application/problem+json`.

pub mod admin;
mod cache;
mod connections;
mod gateway;
mod metrics;
mod openapi;
mod ui;

use crate::config::Config;
use crate::views::{
    AgentVersionView, AgentView, AuditView, CostsView, EventView, OutcomeView, ProblemView,
    RunView, TraceView,
};
use crate::{StoreArgs, exit, parse_agent, render};
use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rein_core::event::sha256_hex;
use rein_core::{RunId, RunStatus, SessionId, TenantId, UserId};
use rein_providers::Model;
use rein_runtime::{RunOutcome, RunRequest, Runtime, now_ms};
use rein_store::{KeyGrant, RunFilter, Store, StoreError};
use rein_tools::Builtins;
use serde::Deserialize;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, broadcast};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The longest a `wait: true` run request is held before answering 202 with the run so far.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// How often an idle worker or event stream looks for new work without being woken.
const POLL: Duration = Duration::from_millis(250);

/// Everything a handler needs.
struct App {
    store: Arc<dyn Store>,
    runtime: Runtime,
    config: Config,
    builtins: Builtins,
    model: Arc<dyn Model>,
    /// Woken when a run is queued or an event is appended by this process.
    wake: Notify,
    /// Runs this process's workers finished or paused, for `wait: true` requests.
    outcomes: broadcast::Sender<Arc<RunOutcome>>,
    /// The gateway's one-call agent per model, checked once.
    gateway_agents: gateway::Agents,
    /// The admin key's SHA-256; `None`: the admin API is off.
    admin_key_sha256: Option<String>,
    /// The gateway's exact-match response cache.
    gateway_cache: cache::ResponseCache,
    /// Tenants by API-key hash, as recently read from the store.
    keys: KeyCache,
    /// The Prometheus registry runs are measured into; `None` when `[telemetry] metrics` is
    /// off.
    metrics: Option<metrics::Metrics>,
    /// The dashboard's templates.
    ui: ui::Templates,
}

/// How long a key's tenant is remembered without asking the store again. A key revoked
/// through this process's admin API stops at once; one revoked by another process (`rein keys
/// revoke`, another server's admin API) within [`KEY_WATCH`], when the server sees the admin
/// log grow, and within this long even if the store cannot be read meanwhile.
const KEY_CACHE_TTL: Duration = Duration::from_secs(10);

/// How often `rein serve` reads the admin log's head, to forget remembered keys when another
/// process has changed them.
const KEY_WATCH: Duration = Duration::from_secs(1);

/// Forgets every remembered key whenever the admin log grows, which every change to tenants
/// and keys does, whichever process makes it. `seen` is the head read before serving began.
fn watch_key_changes(app: Arc<App>, mut seen: Option<u64>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + KEY_WATCH, KEY_WATCH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match app.store.admin_log_head().await {
                Ok(head) if head != seen => {
                    app.keys.forget_all();
                    seen = head;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot read the admin log's head: keys revoked by other processes stop working here when they are forgotten ({} s)",
                    KEY_CACHE_TTL.as_secs()
                ),
            }
        }
    })
}

/// How often `rein serve` removes expired dashboard sessions (signing in removes them too).
const SESSION_SWEEP: Duration = Duration::from_secs(600);

/// Removes expired dashboard sessions every [`SESSION_SWEEP`], so they go even when nobody signs
/// in again.
fn sweep_sessions(app: Arc<App>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SESSION_SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = app.store.sweep_dashboard_sessions(now_ms()).await {
                tracing::warn!(error = %e, "cannot remove expired dashboard sessions; trying again later");
            }
        }
    })
}

/// Tenants by API-key hash, as recently read from the store (for [`KEY_CACHE_TTL`]), with when
/// each key expires, so an expired key stops at once even while remembered. Requests that
/// present the same key while it is not remembered share one store lookup: after an expiry or
/// a restart, a burst of requests with one key reads the store once, not once per request. An
/// unknown key and a failed lookup are not remembered.
pub(crate) struct KeyCache(moka::future::Cache<String, KeyGrant>);

/// Why a key hash named no tenant.
#[derive(Debug)]
enum KeyMiss {
    Unknown,
    Store(StoreError),
}

impl KeyCache {
    fn new() -> Self {
        KeyCache(
            moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(KEY_CACHE_TTL)
                .build(),
        )
    }

    /// The tenant of the key whose SHA-256 is `hash`, if the key is valid at `now_ms`:
    /// remembered, or found by `lookup` (called only on a miss, and shared by every request
    /// waiting for the same hash meanwhile).
    async fn tenant<F>(
        &self,
        hash: &str,
        now_ms: i64,
        lookup: impl FnOnce() -> F,
    ) -> Result<TenantId, Arc<KeyMiss>>
    where
        F: Future<Output = Result<Option<KeyGrant>, StoreError>>,
    {
        // By reference: the hash is copied into the cache only on a miss, not on every request.
        let grant = self
            .0
            .try_get_with_by_ref(hash, async move {
                match lookup().await {
                    Ok(Some(grant)) => Ok(grant),
                    Ok(None) => Err(KeyMiss::Unknown),
                    Err(e) => Err(KeyMiss::Store(e)),
                }
            })
            .await?;
        if grant.valid_at(now_ms) {
            Ok(grant.tenant)
        } else {
            self.0.invalidate(hash).await;
            Err(Arc::new(KeyMiss::Unknown))
        }
    }

    /// Forgets every key (a revocation names a key by id, and keys are remembered by hash).
    pub(crate) fn forget_all(&self) {
        self.0.invalidate_all();
    }
}

impl App {
    fn new(
        config: Config,
        store: Arc<dyn Store>,
        runtime: Runtime,
        builtins: Builtins,
        model: Arc<dyn Model>,
        admin_key_sha256: Option<String>,
    ) -> anyhow::Result<Arc<Self>> {
        let (outcomes, _) = broadcast::channel(1024);
        let metrics = config
            .telemetry
            .metrics
            .then(|| {
                metrics::Metrics::new(
                    config.telemetry.metrics_auth == crate::config::MetricsAuth::Admin,
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

/// An RFC 9457 problem: a status and a reason a person can act on.
#[derive(Debug)]
pub struct Problem {
    status: StatusCode,
    detail: String,
    /// For OpenAI clients of the gateway: the `error` member's `type` and `code`.
    openai: Option<(&'static str, &'static str)>,
    /// Seconds to wait before trying again (`Retry-After`).
    retry_after_s: Option<u64>,
    /// Trying again cannot help (`x-should-retry: false`, which OpenAI's SDKs obey).
    no_retry: bool,
}

impl Problem {
    fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Problem {
            status,
            detail: detail.into(),
            openai: None,
            retry_after_s: None,
            no_retry: false,
        }
    }

    /// Adds an OpenAI-style `error` member, so OpenAI clients show the reason.
    fn openai(mut self, kind: &'static str, code: &'static str) -> Self {
        self.openai = Some((kind, code));
        self
    }

    fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }

    fn no_retry(mut self) -> Self {
        self.no_retry = true;
        self
    }

    fn not_found(what: impl std::fmt::Display) -> Self {
        Problem::new(StatusCode::NOT_FOUND, format!("{what} not found"))
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = json!({
            "type": "about:blank",
            "title": self.status.canonical_reason().unwrap_or("Error"),
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Some((kind, code)) = self.openai {
            body["error"] = json!({"message": self.detail, "type": kind, "code": code});
        }
        if let Ok(id) = REQUEST_ID.try_with(Clone::clone) {
            body["request_id"] = json!(id);
        }
        let mut response = (self.status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.retry_after_s {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.no_retry {
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => Problem::not_found(format!("run {id}")),
            other => store_unavailable(&other),
        }
    }
}

/// 503 for a store that failed (the cause goes to the log, not to the caller).
fn store_unavailable(e: &StoreError) -> Problem {
    tracing::error!(error = %e, "store error");
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the store is unavailable; retry later",
    )
}

impl From<rein_runtime::RuntimeError> for Problem {
    fn from(e: rein_runtime::RuntimeError) -> Self {
        use rein_runtime::RuntimeError as E;
        match e {
            E::Store(e) => e.into(),
            E::Busy { .. } => Problem::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()),
            E::Leased(_) => Problem::new(StatusCode::CONFLICT, e.to_string()),
            E::NotAwaitingApproval(_) => Problem::new(StatusCode::CONFLICT, e.to_string()),
            E::Ended(..) | E::WorkerRun { .. } => Problem::new(StatusCode::CONFLICT, e.to_string()),
            other => {
                tracing::error!(error = %other, "request failed");
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string())
            }
        }
    }
}

/// The caller's tenant, from its API key.
struct Caller(TenantId);

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Problem> {
        // OpenAI's clients show the reason of a refused key from their own error member.
        let gateway = parts.uri.path() == "/v1/models" || parts.uri.path().starts_with("/v1/chat/");
        Self::authenticate(parts, app).await.map_err(|p| {
            if gateway && p.status == StatusCode::UNAUTHORIZED {
                p.openai("invalid_request_error", "invalid_api_key")
            } else {
                p
            }
        })
    }
}

impl Caller {
    async fn authenticate(parts: &Parts, app: &App) -> Result<Self, Problem> {
        tenant_of_key(app, bearer(parts)?).await.map(Caller)
    }
}

/// The tenant whose API key `key` is (remembered for [`KEY_CACHE_TTL`]); 401 for any other.
async fn tenant_of_key(app: &App, key: &str) -> Result<TenantId, Problem> {
    let hash = sha256_hex(key.as_bytes());
    let now = now_ms();
    app.keys
        .tenant(&hash, now, || app.store.tenant_by_key(&hash, now))
        .await
        .map_err(|miss| match &*miss {
            KeyMiss::Unknown => Problem::new(StatusCode::UNAUTHORIZED, "unknown API key"),
            KeyMiss::Store(e) => store_unavailable(e),
        })
}

/// The key in `Authorization: Bearer <key>`.
fn bearer(parts: &Parts) -> Result<&str, Problem> {
    let unauthorized = |why: &str| Problem::new(StatusCode::UNAUTHORIZED, why);
    parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing `Authorization: Bearer <key>`"))?
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <key>`"))
}

/// Parses a JSON body strictly: the content type, the size (by the body limit), the syntax,
/// the types and unknown fields each get their own 4xx.
fn json_body<T: for<'de> Deserialize<'de>>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, Problem> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
    if !is_json {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be JSON, sent with `Content-Type: application/json`",
        ));
    }
    let body = body.map_err(|e| connections::unread_body(&e))?;
    if nesting(&body) > MAX_JSON_DEPTH {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            format!("the JSON body is nested deeper than {MAX_JSON_DEPTH} levels"),
        ));
    }
    if escapes_nul(&body) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the body's text contains a NUL character (\\u0000), which Rein does not store; remove it",
        ));
    }
    serde_json::from_slice(&body).map_err(|e| {
        let status = match e.classify() {
            serde_json::error::Category::Data => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        Problem::new(status, format!("invalid JSON body: {e}"))
    })
}

/// Whether JSON text writes a NUL character (`\u0000`, the only way JSON can carry one).
/// PostgreSQL's text cannot hold it, so it is refused on both engines alike, before anything is
/// stored. A `\u0000` after an escaped backslash (`\\u0000`) is text, not a NUL.
fn escapes_nul(json: &[u8]) -> bool {
    let mut backslashes = 0usize;
    for (i, &b) in json.iter().enumerate() {
        if b == b'\\' {
            backslashes += 1;
            continue;
        }
        if backslashes % 2 == 1 && json[i..].starts_with(b"u0000") {
            return true;
        }
        backslashes = 0;
    }
    false
}

/// The caller's W3C `traceparent` header, when it is a valid one (an invalid one is ignored,
/// as the W3C rules ask: the run then starts a trace of its own).
fn trace_parent(headers: &HeaderMap) -> Option<String> {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|t| rein_core::spans::parse_traceparent(t).is_some())
        .map(str::to_string)
}

/// The deepest JSON nesting accepted in a request body.
const MAX_JSON_DEPTH: usize = 32;

/// How deeply `json` nests arrays and objects (strings skipped), without parsing it.
fn nesting(json: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// `rein serve`'s options.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on [default: `[server] listen`, else 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Runs this process drives at once [default: `[server] workers`, else 8]. 0: it drives
    /// none (an API-only server; `rein worker` processes or other servers sharing the store
    /// drive the runs, and `wait`, cancel and approvals still reach them).
    #[arg(long)]
    workers: Option<usize>,
    /// How long a run's lease lasts unless renewed: after a crash, another process (or this
    /// one, restarted) takes the run over once it expires [default: `[server] lease`, else 30s].
    #[arg(long, value_parser = crate::parse_lease)]
    lease: Option<Duration>,
    /// Replay model responses from this script instead of calling providers (offline demos).
    #[arg(long)]
    script: Option<std::path::PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    config: crate::ConfigArgs,
}

/// Runs the server until SIGINT or SIGTERM.
pub async fn serve(args: ServeArgs) -> anyhow::Result<u8> {
    let config = crate::config::load(args.config.config.as_deref())
        .map_err(|e| anyhow::anyhow!(crate::BadInput(format!("{e:#}"))))?;
    crate::telemetry::init_logs(&config.telemetry)?;
    let store = crate::open_store(&args.store).await?;
    let builtins = Builtins::standard();
    let http = crate::http_client()?;
    let model: Arc<dyn Model> = match args.script.as_deref() {
        Some(path) => Arc::new(
            rein_providers::ScriptedModel::parse(
                &path.display().to_string(),
                &crate::read_file(path)?,
            )
            .map_err(|e| anyhow::anyhow!(crate::BadInput(e.to_string())))?,
        ),
        None => Arc::new(rein_providers::ProviderRouter::from_env(http.clone())),
    };
    let admin_key = admin::admin_key_sha256(
        std::env::var(admin::ADMIN_KEY_ENV).ok(),
        config.server.admin_key_sha256.as_deref(),
    )?;
    let listen = args
        .listen
        .or(config.server.listen)
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080)));
    let workers = args.workers.or(config.server.workers).unwrap_or(8);
    let lease = args
        .lease
        .or(config.server.lease)
        .unwrap_or(Duration::from_secs(30));
    let runtime = crate::runtime_for(&config, &store, builtins.clone(), http)
        .await?
        .with_workers(crate::WorkerSpecs::registered_only(
            &config,
            &store,
            builtins.clone(),
        ))
        .with_lease(lease)
        .with_runs_per_tenant(Some(runs_per_tenant(&config, workers)))
        // Its runs came over the API: one whose log predates the recorded author is a tenant's.
        .with_unrecorded_trust(rein_core::Trust::Tenant);
    let app = App::new(config, store.clone(), runtime, builtins, model, admin_key)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let head = store
        .admin_log_head()
        .await
        .context("cannot read the admin log")?;
    let watch = watch_key_changes(app.clone(), head);
    let sweep = sweep_sessions(app.clone());
    let anchoring = app
        .config
        .audit
        .anchor_every
        .map(|every| anchor_now_and_then(app.clone(), every));
    let claimable = (workers > 0).then(|| wake_for_claimable_runs(app.clone()));
    let workers: Vec<_> = (0..workers)
        .map(|_| tokio::spawn(work(app.clone())))
        .collect();
    eprintln!("rein serve: listening on http://{}", listener.local_addr()?);
    if std::env::var(rein_runtime::SECRETS_KEY_ENV).is_err() {
        tracing::warn!(
            "{} is not set: tenants' specs can use none of the secrets stored for them (`rein secrets key` makes one)",
            rein_runtime::SECRETS_KEY_ENV
        );
    }
    let limits = connections::Limits::of(&app.config.server);
    connections::serve(listener, router(app.clone()), limits, shutdown_signal()).await;
    // Every step of an in-flight run is already in its log: stopping the workers loses nothing.
    // Their leases are then given up, so the next start (or another process) takes the runs
    // over at once rather than when the leases expire.
    watch.abort();
    sweep.abort();
    if let Some(anchoring) = anchoring {
        anchoring.abort();
    }
    if let Some(claimable) = claimable {
        claimable.abort();
    }
    let driven = app.runtime.driven();
    for w in &workers {
        w.abort();
    }
    for w in workers {
        let _ = w.await;
    }
    if let Err(e) = app.runtime.release_leases(&driven).await {
        eprintln!(
            "rein serve: the leases of {} run(s) were not released ({e}); they are taken over once they expire",
            driven.len()
        );
    }
    store.close().await;
    eprintln!("rein serve: stopped");
    Ok(exit::OK)
}

/// The most runs of one tenant this server's workers drive at once: `[server]
/// max_runs_per_tenant`, else three quarters of the workers (at least one), so one tenant's
/// backlog always leaves workers for the others' first runs.
fn runs_per_tenant(config: &Config, workers: usize) -> u32 {
    config.server.max_runs_per_tenant.unwrap_or_else(|| {
        u32::try_from(workers.saturating_mul(3) / 4)
            .unwrap_or(u32::MAX)
            .max(1)
    })
}

/// Serves the API on `listener` without workers, until the returned task is aborted: the
/// gateway benchmark's server, in the benchmark's own process.
pub(crate) fn spawn_api(
    config: Config,
    store: Arc<dyn Store>,
    runtime: Runtime,
    model: Arc<dyn Model>,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let app = App::new(config, store, runtime, Builtins::standard(), model, None)?;
    let limits = connections::Limits::of(&app.config.server);
    Ok(tokio::spawn(connections::serve(
        listener,
        router(app),
        limits,
        std::future::pending(),
    )))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Anchors the store every `every` (`[audit] anchor_every`), until aborted: a later audit then
/// finds a run removed or a log cut short before the anchor, which no hash chain shows.
fn anchor_now_and_then(app: Arc<App>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let file = app.config.audit.anchor_file.as_deref();
            let lag = crate::anchors::CUTOFF_LAG;
            match crate::anchors::make(app.store.as_ref(), now_ms(), lag, file).await {
                Ok(Some(anchor)) => tracing::info!(
                    seq = anchor.seq,
                    runs = anchor.runs,
                    "audit anchor recorded"
                ),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "the store could not be anchored; trying again at the next interval")
                }
            }
        }
    })
}

/// Wakes one idle worker whenever the store announces a claimable run, until aborted: the runs
/// this process's requests queue, and on PostgreSQL those other processes queue or give up. One
/// worker, not all: every idle worker of every process trying a claim for each run would be that
/// many queries.
fn wake_for_claimable_runs(app: Arc<App>) -> tokio::task::JoinHandle<()> {
    let mut claimable = app.store.follow_claimable();
    tokio::spawn(async move {
        loop {
            claimable.seen();
            if claimable.changed(Duration::from_secs(3600)).await {
                app.wake.notify_one();
            }
        }
    })
}

/// One worker: claims queued runs (and runs whose process died, and runs whose approval timed
/// out) and drives them, until the server stops. Idle, it waits to be woken
/// ([`wake_for_claimable_runs`]), looking anyway every [`POLL`].
async fn work(app: Arc<App>) {
    loop {
        match app
            .runtime
            .work_one(&app.config.prices, app.model.as_ref())
            .await
        {
            Ok(Some(outcome)) => {
                let _ = app.outcomes.send(Arc::new(outcome));
            }
            Ok(None) => {
                let _ = tokio::time::timeout(POLL, app.wake.notified()).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "worker: a run could not be driven");
                tokio::time::sleep(POLL).await;
            }
        }
    }
}

fn router(app: Arc<App>) -> Router {
    let (routes, api) = OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(register_agent, list_agents))
        .routes(routes!(create_run, list_runs))
        .routes(routes!(get_run))
        .routes(routes!(run_events))
        .routes(routes!(run_trace))
        .routes(routes!(decide))
        .routes(routes!(cancel))
        .routes(routes!(costs))
        .routes(routes!(audit_verify))
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
            time_limit,
        ))
        .layer(axum::middleware::from_fn(request_id))
        .with_state(app)
}

/// The header naming a request, for a client to quote and an operator to find in the logs.
const REQUEST_ID_HEADER: &str = "x-request-id";

tokio::task_local! {
    /// The id of the request this task is answering ([`request_id`]), which problem+json
    /// bodies repeat.
    static REQUEST_ID: String;
}

/// Names every request: the client's `X-Request-Id` when it is a plain token (1 to 128 letters,
/// digits, `-`, `_`, `.` or `:`, so it cannot forge a log line), else a new UUIDv7. Every log line
/// written while the request is handled carries it (in its `request` span), and the answer
/// gives it back in `X-Request-Id`, errors included (and a problem+json body as `request_id`).
async fn request_id(mut request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let given = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            (1..=128).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_string);
    let id = given.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let value = HeaderValue::from_str(&id).ok();
    if let Some(value) = &value {
        request
            .headers_mut()
            .insert(REQUEST_ID_HEADER, value.clone());
    }
    let span = tracing::info_span!("request", request_id = %id);
    let answer = tracing::Instrument::instrument(next.run(request), span);
    let mut response = REQUEST_ID.scope(id, answer).await;
    if let Some(value) = value {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// Bounds each request's time (`[server] request_timeout`), so a slow client or a stuck store
/// cannot hold a connection and its task for ever. What waits on a model by design gets its own
/// bound on top: a `wait: true` run its `timeout_ms` (at most [`MAX_WAIT`]), an approval that
/// drives its run on [`MAX_WAIT`], a gateway call `[gateway] timeout`. An event stream is bounded only until it starts: its body is live.
async fn time_limit(
    State(app): State<Arc<App>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let base = app.config.server.request_timeout;
    let path = request.uri().path();
    let limit = match (request.method(), path) {
        (&axum::http::Method::POST, "/v1/runs") => base + MAX_WAIT,
        (&axum::http::Method::POST, "/v1/chat/completions") => base + app.config.gateway.timeout,
        // A decision drives the run to its next stop, model calls included.
        (&axum::http::Method::POST, p)
            if (p.starts_with("/v1/runs/") || p.starts_with("/ui/runs/"))
                && p.ends_with("/approval") =>
        {
            base + MAX_WAIT
        }
        _ => base,
    };
    // PostgreSQL's text cannot hold a NUL: one in the URL (an id, a filter) is refused before it
    // reaches the store, on both engines alike.
    if request
        .uri()
        .path_and_query()
        .is_some_and(|p| p.as_str().contains("%00"))
    {
        return Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the URL contains a NUL character (%00), which Rein does not store; remove it",
        )
        .into_response();
    }
    // The body is due within its own time: a client that declares a body and never sends it
    // is cut off at `body_timeout`, not at the request's (possibly long) limit.
    let request = connections::Deadline::on(request, app.config.server.body_timeout);
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the request took longer than {}s (`[server] request_timeout`) and was stopped; a change it was making may or may not have been saved, so look before retrying",
                limit.as_secs()
            ),
        )
        .into_response(),
    }
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "server", responses((status = 200, description = "The process answers", body = String, example = "ok")))]
async fn health() -> &'static str {
    "ok"
}

/// Readiness: the store answers.
#[utoipa::path(get, path = "/readyz", tag = "server", responses(
    (status = 200, description = "The store answers", body = String, example = "ready"),
    (status = 503, description = "The store does not answer", body = ProblemView, content_type = "application/problem+json"),
))]
async fn ready(State(app): State<Arc<App>>) -> Result<&'static str, Problem> {
    app.store.unfinished().await?;
    Ok("ready")
}

/// Registers an agent spec (YAML, checked like `rein check`) as the next version of its agent.
#[utoipa::path(post, path = "/v1/agents", tag = "agents",
    request_body(content = String, content_type = "application/yaml", description = "The agent spec"),
    responses(
        (status = 201, description = "Registered", body = AgentVersionView),
        (status = 413, description = "The spec is larger than `[server] max_body_bytes`", body = ProblemView, content_type = "application/problem+json"),
        (status = 422, description = "The spec does not check: every problem, by field", body = ProblemView, content_type = "application/problem+json"),
    ))]
async fn register_agent(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, axum::Json<AgentVersionView>), Problem> {
    let body = body.map_err(|e| connections::unread_body(&e))?;
    let source = String::from_utf8(body.to_vec())
        .map_err(|_| Problem::new(StatusCode::BAD_REQUEST, "the spec is not UTF-8 text"))?;
    if source.contains('\0') {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the spec contains a NUL character, which Rein does not store; remove it",
        ));
    }
    let agent = parse_agent("request body", &source, &app.config, &app.builtins)
        .map_err(|e| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}")))?;
    let name = agent.spec.name.clone();
    if name == gateway::AGENT {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "`name: gateway` is reserved for the OpenAI-compatible gateway's calls; name the agent otherwise",
        ));
    }
    app.store
        .create_tenant(&tenant, now_ms(), &format!("api:{}", tenant.as_str()))
        .await?;
    let version = app
        .store
        .register_agent(&tenant, &name, &source, now_ms())
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(AgentVersionView { name, version }),
    ))
}

/// The newest version of each of the tenant's agents.
#[utoipa::path(get, path = "/v1/agents", tag = "agents", responses((status = 200, description = "The agents", body = Vec<AgentView>)))]
async fn list_agents(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
) -> Result<axum::Json<Vec<AgentView>>, Problem> {
    let agents = app.store.agents(&tenant).await?;
    Ok(axum::Json(
        agents
            .into_iter()
            .map(|a| AgentView {
                name: a.name,
                version: a.version,
                created_at: rein_core::time::format_utc(a.created_ms),
            })
            .collect(),
    ))
}

/// A run to queue.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewRun {
    /// The agent's name.
    agent: String,
    /// The run's input (at most 256 KiB).
    input: String,
    /// The agent version to run; the newest when absent.
    #[serde(default)]
    version: Option<u32>,
    /// Who the run is for (costs and budgets are attributed to them); `anonymous` when absent.
    #[serde(default)]
    user: Option<String>,
    /// The conversation the run continues; a new one when absent.
    #[serde(default)]
    session: Option<String>,
    /// A batch job the run belongs to.
    #[serde(default)]
    job: Option<String>,
    /// Answer once the run ends (or waits for a person), up to `timeout_ms`.
    #[serde(default)]
    wait: bool,
    /// How long to wait (default 30 000, at most 300 000).
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// The `{id}` of the `/v1/runs/{id}` paths, for the OpenAPI document.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct RunPath {
    /// The run's id.
    id: String,
}

/// The longest id or name accepted in a request.
const MAX_ID_LEN: usize = 256;
/// The longest run input accepted.
const MAX_INPUT_LEN: usize = 256 * 1024;

fn check_len(field: &str, value: &str, max: usize) -> Result<(), Problem> {
    if value.len() > max {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "`{field}` is {} bytes long; at most {max} are accepted",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// Queues a run of a registered agent; with `wait`, answers when it ends or waits for a person.
/// With an `Idempotency-Key`, a retry gets the run the first request made instead of a new one.
#[utoipa::path(post, path = "/v1/runs", tag = "runs", request_body = NewRun,
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters naming this request: a retry with the same key and the same request makes no new run and answers about the first one's (marked `Idempotent-Replayed: true`); the same key with a different request is 422")),
    responses(
    (status = 200, description = "With `wait`: the run ended, or waits for a person, whichever process drove it. Without `wait`, a retry (`Idempotent-Replayed: true`) of a run that has stopped: the run, as `GET /v1/runs/{id}` shows it", body = OutcomeView,
        headers(("Location" = String, description = "The run"), ("Idempotent-Replayed" = String, description = "`true` when an earlier request with the same `Idempotency-Key` made the run"))),
    (status = 202, description = "Queued (or still running when `wait` timed out)", body = RunView,
        headers(("Location" = String, description = "The run"), ("Idempotent-Replayed" = String, description = "`true` when an earlier request with the same `Idempotency-Key` made the run"))),
    (status = 404, description = "No such agent or version", body = ProblemView, content_type = "application/problem+json"),
    (status = 415, description = "The body is not `application/json`", body = ProblemView, content_type = "application/problem+json"),
    (status = 422, description = "Wrong types, unknown fields, a field too long, a malformed `Idempotency-Key`, or one first sent with a different request", body = ProblemView, content_type = "application/problem+json"),
    (status = 429, description = "The tenant's queue is full (`[bulkheads]`)", body = ProblemView, content_type = "application/problem+json"),
))]
async fn create_run(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let new: NewRun = json_body(&headers, body)?;
    let key = idempotency_key(&headers)?;
    check_len("agent", &new.agent, MAX_ID_LEN)?;
    check_len("input", &new.input, MAX_INPUT_LEN)?;
    for (field, value) in [
        ("user", &new.user),
        ("session", &new.session),
        ("job", &new.job),
    ] {
        check_len(field, value.as_deref().unwrap_or(""), MAX_ID_LEN)?;
    }
    let wait = new.wait.then(|| {
        new.timeout_ms
            .map_or(Duration::from_secs(30), Duration::from_millis)
            .min(MAX_WAIT)
    });
    // A retry of a request with an idempotency key gets the run the first one made.
    let keyed = key.map(|k| (idempotent_run_id(&tenant, k), k));
    if let Some((id, key)) = &keyed
        && let Some(first) = keyed_run(&app, &tenant, id, &new, key).await?
    {
        let outcomes = app.outcomes.subscribe();
        return answer_run(&app, &tenant, id, wait, outcomes, Some(first)).await;
    }
    let stored = app
        .store
        .agent(&tenant, &new.agent, new.version)
        .await?
        .ok_or_else(|| match new.version {
            Some(v) => Problem::not_found(format!("agent `{}` version {v}", new.agent)),
            None => Problem::not_found(format!(
                "agent `{}` (register it with POST /v1/agents)",
                new.agent
            )),
        })?;
    let agent =
        parse_agent(&stored.name, &stored.spec, &app.config, &app.builtins).map_err(|e| {
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "agent `{}` version {} no longer checks: {e:#}",
                    stored.name, stored.version
                ),
            )
        })?;
    let request = RunRequest {
        agent,
        spec_source: stored.spec,
        input: new.input.clone(),
        granted_scopes: app.config.granted_scopes(&tenant),
        chat: None,
        trust: rein_core::Trust::Tenant,
        trace_parent: trace_parent(&headers),
        tenant: tenant.clone(),
        user: UserId::new(new.user.as_deref().unwrap_or(ANONYMOUS)),
        session: SessionId::new(
            new.session
                .clone()
                .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        ),
        job: new.job.clone().map(rein_core::JobId::new),
    };
    // Listen before queueing, so the outcome cannot be missed.
    let outcomes = app.outcomes.subscribe();
    let run_id = match keyed {
        None => app.runtime.enqueue(request).await?,
        Some((id, key)) => match app.runtime.enqueue_as(id.clone(), request).await {
            Ok(id) => id,
            // A request with the same key stored the run first.
            Err(e) => {
                let Some(first) = keyed_run(&app, &tenant, &id, &new, key).await? else {
                    return Err(e.into());
                };
                return answer_run(&app, &tenant, &id, wait, outcomes, Some(first)).await;
            }
        },
    };
    answer_run(&app, &tenant, &run_id, wait, outcomes, None).await
}

/// The user a run is for when the request names none.
pub(crate) const ANONYMOUS: &str = "anonymous";

/// The request header that makes `POST /v1/runs` safe to retry.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The response header that marks an answer about a run an earlier request made.
const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// The longest idempotency key accepted.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The request's `Idempotency-Key`, if it sent one: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, Problem> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .filter(|k| {
            (1..=MAX_IDEMPOTENCY_KEY_LEN).contains(&k.len())
                && k.bytes().all(|b| b.is_ascii_graphic())
        })
        .map(Some)
        .ok_or_else(|| {
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "the Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters, without spaces"
                ),
            )
        })
}

/// The id of the run that `tenant`'s idempotency key `key` names: the same for every retry,
/// and different for every tenant and key (a UUIDv8 made of their SHA-256). A run made
/// without a key has a UUIDv7, so the two never meet.
fn idempotent_run_id(tenant: &TenantId, key: &str) -> RunId {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("rein-run-key-v1\n{tenant}\n{key}").as_bytes());
    let mut bytes = [0; 16];
    bytes.copy_from_slice(&digest[..16]);
    RunId::new(
        uuid::Builder::from_custom_bytes(bytes)
            .into_uuid()
            .to_string(),
    )
}

/// The run `id` (the one an idempotency key names), if it exists and was made by the same
/// request as `new`; 422 when a different request made it.
async fn keyed_run(
    app: &App,
    tenant: &TenantId,
    id: &RunId,
    new: &NewRun,
    key: &str,
) -> Result<Option<rein_store::RunRecord>, Problem> {
    match app.store.run(tenant, id).await {
        Ok(record) if same_request(new, &record.info) => Ok(Some(record)),
        Ok(_) => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the Idempotency-Key {key:?} was first sent with a different request, which made run {id}; send a new key for a new run"
            ),
        )),
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether `new` asks for the run `info` is: the same agent (and version, when it names one),
/// input, user, session (when it names one) and job. Waiting is not part of the request.
fn same_request(new: &NewRun, info: &rein_store::RunInfo) -> bool {
    new.agent == info.agent
        && new.version.is_none_or(|v| v == info.agent_version)
        // The stored input has its secrets redacted (unless the spec turns that off).
        && (new.input == info.input
            || rein_core::sanitize::redact_secrets(&new.input).0 == info.input)
        && new.user.as_deref().unwrap_or(ANONYMOUS) == info.user.as_str()
        && new
            .session
            .as_deref()
            .is_none_or(|s| s == info.session.as_str())
        && new.job.as_deref() == info.job.as_ref().map(rein_core::JobId::as_str)
}

/// What `POST /v1/runs` answers about `run_id`. With `wait`, the outcome once the run ends or
/// waits for a person (200): this process's workers announce their runs' outcomes, and the
/// store is looked at too, for a run another process drives: as soon as the run's log grows
/// where the store hears it ([`Store::follow`]), and otherwise after a growing pause
/// ([`WAIT_LOOK_FIRST`] to [`WAIT_LOOK_MAX`]). Otherwise the run as it stands: 202 while it is queued or
/// running. A `replayed` run (the row an earlier request with the same idempotency key made,
/// as just read) that has stopped is answered at once, 200.
async fn answer_run(
    app: &App,
    tenant: &TenantId,
    run_id: &RunId,
    wait: Option<Duration>,
    mut outcomes: broadcast::Receiver<Arc<RunOutcome>>,
    replayed: Option<rein_store::RunRecord>,
) -> Result<Response, Problem> {
    let stopped = |status: RunStatus| status.is_terminal() || status == RunStatus::AwaitingApproval;
    let is_replay = replayed.is_some();
    let located = |mut response: Response| {
        if let Ok(location) = HeaderValue::from_str(&format!("/v1/runs/{run_id}")) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        if is_replay {
            response
                .headers_mut()
                .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        }
        response
    };
    let finish = |view: OutcomeView| located((StatusCode::OK, axum::Json(view)).into_response());
    if let Some(record) = replayed.as_ref().filter(|r| stopped(r.progress.status)) {
        return Ok(match wait {
            Some(_) => finish(logged_outcome(app, record).await?),
            None => located((StatusCode::OK, axum::Json(RunView::of(record))).into_response()),
        });
    }
    if let Some(limit) = wait {
        let deadline = tokio::time::Instant::now() + limit;
        let mut pause = WAIT_LOOK_FIRST;
        let mut look_at = tokio::time::Instant::now() + pause;
        let mut appends = app.store.follow(run_id);
        loop {
            tokio::select! {
                // Its log grew (in this process, or, on PostgreSQL, in another): look now.
                _ = appends.changed(limit) => look_at = tokio::time::Instant::now(),
                heard = outcomes.recv() => match heard {
                    Ok(o) if o.run_id == *run_id => return Ok(finish(OutcomeView::of(&o))),
                    Ok(_) => {}
                    // Missed announcements may have held this run's: look at the store now.
                    Err(broadcast::error::RecvError::Lagged(_)) => look_at = tokio::time::Instant::now(),
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                () = tokio::time::sleep_until(look_at.min(deadline)) => {
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    appends.seen();
                    let record = app.store.run(tenant, run_id).await?;
                    if stopped(record.progress.status) {
                        return Ok(finish(logged_outcome(app, &record).await?));
                    }
                    pause = (pause * 2).min(WAIT_LOOK_MAX);
                    look_at = tokio::time::Instant::now() + pause;
                }
            }
        }
    }
    // Without `wait`, a replayed run stands as just read.
    let record = match replayed.filter(|_| wait.is_none()) {
        Some(record) => record,
        None => app.store.run(tenant, run_id).await?,
    };
    let status = if is_replay && stopped(record.progress.status) {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok(located(
        (status, axum::Json(RunView::of(&record))).into_response(),
    ))
}

/// The answer to `wait` for a run that stopped where this process did not see it: made from
/// its row and its log.
async fn logged_outcome(app: &App, record: &rein_store::RunRecord) -> Result<OutcomeView, Problem> {
    let sealed = app
        .store
        .events(&record.info.tenant, &record.info.id)
        .await?;
    let events: Vec<rein_core::Event> = sealed.iter().filter_map(|s| s.decode().ok()).collect();
    Ok(OutcomeView::of_log(record, &events))
}

/// How often an event stream reads its run's log when it hears of no append, on a store whose
/// followers hear only their own process's appends (SQLite: a run another process drives is
/// followed this way).
const STREAM_RECHECK: Duration = Duration::from_millis(50);

/// The same, on a store whose followers hear every process's appends (PostgreSQL): only for
/// what went unheard while a connection was down.
const STREAM_RECHECK_HEARD: Duration = Duration::from_secs(1);

/// The first pause before a waiting request looks at the store for its run.
const WAIT_LOOK_FIRST: Duration = Duration::from_millis(100);

/// The longest pause between a waiting request's looks at the store.
const WAIT_LOOK_MAX: Duration = Duration::from_secs(1);

/// A run.
#[utoipa::path(get, path = "/v1/runs/{id}", tag = "runs", params(RunPath), responses(
    (status = 200, description = "The run", body = RunView),
    (status = 404, description = "No such run for this tenant", body = ProblemView, content_type = "application/problem+json"),
))]
async fn get_run(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<RunView>, Problem> {
    let record = app.store.run(&tenant, &RunId::new(id)).await?;
    Ok(axum::Json(RunView::of(&record)))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct RunQuery {
    /// Only runs in this status (`queued`, `running`, `awaiting_approval`, `completed`, ...).
    status: Option<String>,
    /// Only runs of this agent.
    agent: Option<String>,
    /// Only runs for this user.
    user: Option<String>,
    /// Only runs of this session.
    session: Option<String>,
    /// At most this many (default 50, at most 1000).
    limit: Option<u32>,
    /// Only runs older than this one: the next page after a page that ended with it, as the
    /// `Link` header of that page names it.
    before: Option<String>,
}

/// The tenant's newest runs, filtered, a page at a time.
#[utoipa::path(get, path = "/v1/runs", tag = "runs", params(RunQuery), responses(
    (status = 200, description = "The runs, newest first. While older runs match, a `Link` header names the next page (`rel=\"next\"`).", body = Vec<RunView>,
        headers(("Link" = String, description = "`<URL>; rel=\"next\"`: the same query, from the run after this page's last"))),
    (status = 400, description = "An unknown status or query parameter", body = ProblemView, content_type = "application/problem+json"),
    (status = 404, description = "`before` is not one of this tenant's runs", body = ProblemView, content_type = "application/problem+json"),
))]
async fn list_runs(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    RawQuery(raw): RawQuery,
    query: Result<Query<RunQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = query.map_err(|e| Problem::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let status = q
        .status
        .map(|s| {
            serde_json::from_value::<RunStatus>(Value::String(s.clone())).map_err(|_| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    format!("`status` {s:?} is not a run status (queued, running, awaiting_approval, completed, failed, limit_exceeded, escalated, ...)"),
                )
            })
        })
        .transpose()?;
    let before = q.before.map(RunId::new);
    if let Some(before) = &before {
        // Another tenant's run, or none: 404, as for the run itself.
        app.store.run(&tenant, before).await?;
    }
    let filter = RunFilter {
        status,
        agent: q.agent,
        user: q.user.map(UserId::new),
        session: q.session.map(SessionId::new),
        before,
        reason: None,
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let mut runs = app.store.list_runs(&tenant, &filter, limit + 1).await?;
    let more = cut_page(&mut runs, limit);
    let mut response = axum::Json(runs.iter().map(RunView::of).collect::<Vec<_>>()).into_response();
    if let Some(last) = runs.last().filter(|_| more) {
        let link = format!(
            "</v1/runs?{}>; rel=\"next\"",
            next_page_query(raw.as_deref(), last.info.id.as_str())
        );
        if let Ok(link) = HeaderValue::from_str(&link) {
            response.headers_mut().insert(header::LINK, link);
        }
    }
    Ok(response)
}

/// Cuts `items`, read as one more than a page of `limit` to learn whether another page
/// follows, to the page; returns whether one does. Every paged answer (runs, audits, the admin
/// log, the dashboard's list) reads its page this way.
pub(crate) fn cut_page<T>(items: &mut Vec<T>, limit: u32) -> bool {
    let limit = limit as usize;
    let more = items.len() > limit;
    items.truncate(limit);
    more
}

/// The query of the page after the one `query` asked for, which ended with run `last`: the
/// same parameters, as the client wrote them, with `before` moved on.
fn next_page_query(query: Option<&str>, last: &str) -> String {
    let cursor = format!(
        "before={}",
        form_urlencoded::byte_serialize(last.as_bytes()).collect::<String>()
    );
    query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty() && pair.split('=').next() != Some("before"))
        .chain(std::iter::once(cursor.as_str()))
        .collect::<Vec<_>>()
        .join("&")
}

/// The run, its events, and the trace tree as text.
#[utoipa::path(get, path = "/v1/runs/{id}/trace", tag = "runs", params(RunPath), responses(
    (status = 200, description = "The run, its log and its trace tree", body = TraceView),
    (status = 404, description = "No such run for this tenant", body = ProblemView, content_type = "application/problem+json"),
))]
async fn run_trace(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<TraceView>, Problem> {
    let id = RunId::new(id);
    let record = app.store.run(&tenant, &id).await?;
    let sealed = app.store.events(&tenant, &id).await?;
    let events: Vec<rein_core::Event> = sealed.iter().filter_map(|s| s.decode().ok()).collect();
    Ok(axum::Json(TraceView {
        run: RunView::of(&record),
        events: sealed.iter().map(EventView::of).collect(),
        tree: render::trace(&record, &events),
    }))
}

/// Server-Sent Events: the run's log from the start (or after `Last-Event-ID`), then live,
/// until `run_finished`. Each event's `id` is its position, its `event` its kind, its `data`
/// the event.
#[utoipa::path(get, path = "/v1/runs/{id}/events", tag = "runs",
    params(RunPath, ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event")),
    responses(
        (status = 200, description = "A stream of the run's events", body = EventView, content_type = "text/event-stream"),
        (status = 400, description = "`Last-Event-ID` is not a position", body = ProblemView, content_type = "application/problem+json"),
        (status = 404, description = "No such run for this tenant", body = ProblemView, content_type = "application/problem+json"),
    ))]
async fn run_events(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>>, Problem> {
    let id = RunId::new(id);
    app.store.run(&tenant, &id).await?;
    let after: Option<u64> = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| {
                    Problem::new(
                        StatusCode::BAD_REQUEST,
                        "`Last-Event-ID` must be an event's position (a number)",
                    )
                })?,
        ),
    };
    let next = after.map_or(0, |a| a + 1);
    let appends = app.store.follow(&id);
    // Woken by the run's appends; the store is read anyway now and then, for appends not heard
    // (another process's on SQLite, or told while a database connection was down).
    let recheck = if appends.hears_other_processes() {
        STREAM_RECHECK_HEARD
    } else {
        STREAM_RECHECK
    };
    let state = (
        app,
        tenant,
        id,
        next,
        Vec::<rein_core::SealedEvent>::new(),
        false,
        appends,
    );
    let stream = futures_util::stream::unfold(
        state,
        move |(app, tenant, id, next, mut buffer, done, mut appends)| async move {
            if done && buffer.is_empty() {
                return None;
            }
            loop {
                if let Some(event) = (!buffer.is_empty()).then(|| buffer.remove(0)) {
                    let finished = event.kind == "run_finished";
                    let sse = SseEvent::default()
                        .id(event.seq.to_string())
                        .event(event.kind.clone())
                        .data(json!(EventView::of(&event)).to_string());
                    let next = event.seq + 1;
                    let state = (app, tenant, id, next, buffer, finished, appends);
                    return Some((Ok(sse), state));
                }
                if done {
                    return None;
                }
                appends.seen();
                match app.store.events_from(&tenant, &id, next).await {
                    Ok(events) => buffer = events,
                    Err(e) => {
                        tracing::error!(run_id = id.as_str(), error = %e, "event stream failed");
                        return None;
                    }
                }
                if buffer.is_empty() {
                    appends.changed(recheck).await;
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// A person's decision on a held tool call.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ApprovalBody {
    approved: bool,
    /// Why (at most 4 KiB); recorded.
    #[serde(default)]
    reason: Option<String>,
    /// Who decided; `api:<tenant>` when absent.
    #[serde(default)]
    by: Option<String>,
}

/// Decides the run's pending approval and drives the run to its next stop.
#[utoipa::path(post, path = "/v1/runs/{id}/approval", tag = "runs", params(RunPath), request_body = ApprovalBody, responses(
    (status = 200, description = "The run, driven to its next stop", body = OutcomeView),
    (status = 404, description = "No such run for this tenant", body = ProblemView, content_type = "application/problem+json"),
    (status = 409, description = "The run is not awaiting approval, another process drives it, or it is a worker agent's run (which only its caller continues)", body = ProblemView, content_type = "application/problem+json"),
))]
async fn decide(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<OutcomeView>, Problem> {
    let decision: ApprovalBody = json_body(&headers, body)?;
    check_len("reason", decision.reason.as_deref().unwrap_or(""), 4096)?;
    check_len("by", decision.by.as_deref().unwrap_or(""), MAX_ID_LEN)?;
    let id = RunId::new(id);
    let by = decision.by.unwrap_or_else(|| format!("api:{tenant}"));
    let outcome = decide_run(
        &app,
        &tenant,
        &id,
        rein_runtime::Decision {
            approved: decision.approved,
            by,
            reason: decision.reason,
        },
    )
    .await?;
    Ok(axum::Json(OutcomeView::of(&outcome)))
}

/// Records `decision` on `tenant`'s run `id` and drives the run to its next stop (the API's
/// approval and the dashboard's).
async fn decide_run(
    app: &App,
    tenant: &TenantId,
    id: &RunId,
    decision: rein_runtime::Decision,
) -> Result<RunOutcome, Problem> {
    // Another tenant's run is not found, whatever state it is in (the lease check below would
    // otherwise tell a busy run from a missing one).
    app.store.run(tenant, id).await?;
    Ok(app
        .runtime
        .decide(tenant, id, &app.config.prices, app.model.as_ref(), decision)
        .await?)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct CostQuery {
    /// `user`, `agent`, `model` (the default) or `day`.
    by: Option<String>,
    /// From this UTC day on, `YYYY-MM-DD`.
    since: Option<String>,
}

/// The tenant's spend per user, agent, model or day (gateway calls included, as the `gateway`
/// agent), as `rein costs --json` prints it.
#[utoipa::path(get, path = "/v1/costs", tag = "costs", params(CostQuery), responses(
    (status = 200, description = "The spend", body = CostsView),
    (status = 400, description = "An unknown grouping or a malformed day", body = ProblemView, content_type = "application/problem+json"),
))]
async fn costs(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    query: Result<Query<CostQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<CostsView>, Problem> {
    let Query(q) = query.map_err(|e| Problem::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let by = match q.by.as_deref() {
        None => crate::CostBy::Model,
        Some(by) => <crate::CostBy as clap::ValueEnum>::from_str(by, false).map_err(|_| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                format!("`by` {by:?} is not a grouping; use tenant, user, agent, model or day"),
            )
        })?,
    };
    let since_ms = match q.since.as_deref() {
        None => 0,
        Some(day) => rein_core::time::parse_utc_day(day).ok_or_else(|| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                format!("`since` {day:?} is not a UTC day written YYYY-MM-DD"),
            )
        })?,
    };
    let lines = app.store.costs(Some(&tenant), by.group(), since_ms).await?;
    Ok(axum::Json(crate::costs_json(by, &lines)))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// Only this run.
    run: Option<String>,
    /// Start after this run (the `next` of the page before); oldest runs first.
    after: Option<String>,
    /// Runs to check in this page (default 100, at most 1,000).
    limit: Option<u32>,
}

/// Checks the hash chain of each of the tenant's runs (or one), and that each stored run agrees
/// with its log: a page of runs at a time, oldest first; `next` names where the next page
/// starts until every run has been checked.
#[utoipa::path(get, path = "/v1/audit/verify", tag = "audit", params(AuditQuery), responses(
    (status = 200, description = "The verdict", body = AuditView),
    (status = 400, description = "A malformed query, or `run` with `after`", body = ProblemView, content_type = "application/problem+json"),
    (status = 404, description = "No such run for this tenant", body = ProblemView, content_type = "application/problem+json"),
))]
async fn audit_verify(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<AuditView>, Problem> {
    let Query(q) = query.map_err(|e| Problem::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let (ids, next) = match (q.run, q.after) {
        (Some(_), Some(_)) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "`run` checks one run and `after` pages through them all; give one or the other",
            ));
        }
        (Some(id), None) => {
            let id = RunId::new(id);
            app.store.run(&tenant, &id).await?;
            (vec![id], None)
        }
        (None, after) => {
            let after = after.map(RunId::new);
            if let Some(after) = &after {
                // Not this tenant's run: 404, as for any other run id.
                app.store.run(&tenant, after).await?;
            }
            let limit = q.limit.unwrap_or(100).clamp(1, 1000);
            let mut ids = app
                .store
                .run_ids(&tenant, after.as_ref(), limit + 1)
                .await?;
            let more = cut_page(&mut ids, limit);
            let next = more
                .then(|| ids.last().map(|id| id.as_str().to_string()))
                .flatten();
            (ids, next)
        }
    };
    let runs: Vec<(TenantId, RunId)> = ids.into_iter().map(|id| (tenant.clone(), id)).collect();
    let (events, problems) = crate::verify_runs(app.store.as_ref(), &runs).await?;
    Ok(axum::Json(AuditView {
        ok: problems.is_empty(),
        runs: runs.len(),
        events,
        problems,
        next,
    }))
}

/// Ends a run that nobody drives at once (200), or stops one a process drives (this one, or
/// another sharing the store) before its next step (202).
#[utoipa::path(post, path = "/v1/runs/{id}/cancel", tag = "runs", params(RunPath), responses(
    (status = 200, description = "Cancelled", body = RunView),
    (status = 202, description = "The run stops before its next step, in whichever process drives it", body = RunView),
    (status = 404, description = "No such run for this tenant", body = ProblemView, content_type = "application/problem+json"),
    (status = 409, description = "The run has ended", body = ProblemView, content_type = "application/problem+json"),
))]
async fn cancel(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id = RunId::new(id);
    let done = app
        .runtime
        .cancel(&tenant, &id, &format!("api:{tenant}"))
        .await?;
    let record = app.store.run(&tenant, &id).await?;
    let status = match done {
        rein_runtime::Cancelled::Ended => StatusCode::OK,
        rein_runtime::Cancelled::Requested => StatusCode::ACCEPTED,
    };
    Ok((status, axum::Json(RunView::of(&record))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key names the same run id for good (stored runs are found by it on a retry), per
    /// tenant: a UUIDv8 of the SHA-256 of layout, tenant and key.
    #[test]
    fn an_idempotency_key_names_one_run_id_per_tenant_for_good() {
        let acme = idempotent_run_id(&TenantId::new("acme"), "order-9");
        assert_eq!(acme.as_str(), "07de864f-eb4f-8bf9-9503-d91f7bc0fc0c");
        assert_ne!(idempotent_run_id(&TenantId::new("rival"), "order-9"), acme);
        assert_ne!(idempotent_run_id(&TenantId::new("acme"), "order-10"), acme);
    }

    /// A burst of requests with one key the cache does not hold reads the store once; a
    /// remembered key reads it not at all; an unknown key and a failed lookup are never
    /// remembered, so the next request asks again.
    #[tokio::test]
    async fn requests_with_one_unremembered_key_share_one_lookup() {
        let keys = KeyCache::new();
        let lookups = std::sync::atomic::AtomicUsize::new(0);
        let lookup = |answer: Result<Option<KeyGrant>, StoreError>| {
            let lookups = &lookups;
            async move {
                lookups.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                answer
            }
        };
        let count = || lookups.load(std::sync::atomic::Ordering::SeqCst);
        let acme = || {
            Ok(Some(KeyGrant {
                tenant: TenantId::new("acme"),
                expires_ms: None,
            }))
        };
        let burst = (0..50).map(|_| keys.tenant("a", 0, || lookup(acme())));
        for answer in futures_util::future::join_all(burst).await {
            assert_eq!(answer.unwrap(), TenantId::new("acme"));
        }
        assert_eq!(count(), 1, "one lookup for the whole burst");
        assert_eq!(
            keys.tenant("a", 0, || lookup(acme())).await.unwrap(),
            TenantId::new("acme")
        );
        assert_eq!(count(), 1, "remembered");
        for _ in 0..2 {
            let unknown = keys.tenant("b", 0, || lookup(Ok(None))).await;
            assert!(matches!(*unknown.unwrap_err(), KeyMiss::Unknown));
        }
        assert_eq!(count(), 3, "an unknown key is looked up every time");
        let failed = keys
            .tenant("c", 0, || lookup(Err(StoreError::Writer("down".into()))))
            .await;
        assert!(matches!(*failed.unwrap_err(), KeyMiss::Store(_)));
        assert_eq!(
            keys.tenant("c", 0, || lookup(acme())).await.unwrap(),
            TenantId::new("acme")
        );
        assert_eq!(count(), 5, "a failed lookup is not remembered");
        keys.forget_all();
        keys.tenant("a", 0, || lookup(acme())).await.unwrap();
        assert_eq!(count(), 6, "forgotten keys are looked up again");
        // A remembered key that has since expired stops at once, and is forgotten.
        let until_100 = || {
            Ok(Some(KeyGrant {
                tenant: TenantId::new("acme"),
                expires_ms: Some(100),
            }))
        };
        assert!(keys.tenant("d", 99, || lookup(until_100())).await.is_ok());
        let expired = keys.tenant("d", 100, || lookup(until_100())).await;
        assert!(matches!(*expired.unwrap_err(), KeyMiss::Unknown));
        assert_eq!(count(), 7, "remembered until it expired");
        let _ = keys.tenant("d", 100, || lookup(Ok(None))).await;
        assert_eq!(
            count(),
            8,
            "an expired key is forgotten, so the store is asked again"
        );
    }

    #[test]
    fn a_nul_is_found_only_where_json_escapes_one() {
        assert!(escapes_nul(br#"{"input": "a\u0000b"}"#));
        assert!(escapes_nul(br#"{"input": "\\\u0000"}"#));
        assert!(!escapes_nul(br#"{"input": "a\\u0000b"}"#));
        assert!(!escapes_nul(br#"{"input": "a\u0001b u0000"}"#));
    }

    #[test]
    fn nesting_counts_brackets_outside_strings() {
        assert_eq!(nesting(br#"{"a": [1, {"b": "[[[{{"}]}"#), 3);
        assert_eq!(nesting(br#"{"a": "\"[["}"#), 1);
        assert_eq!(nesting(b"7"), 0);
    }
}
