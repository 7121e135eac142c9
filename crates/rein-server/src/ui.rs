//! The dashboard at `/ui`: runs with filters, a run's trace tree and timeline, the approvals
//! queue with approve and deny, spend by day, agent and model, and budget and breaker status. Server-rendered HTML
//! (minijinja templates compiled into the binary, no script, no external resource), behind the
//! tenant's API key: signing in with it opens a session in the store, the browser keeps only
//! the session's random token (an HttpOnly, SameSite=Strict cookie, never the key), and every
//! page shows only that tenant's data, as the API does.

mod charts;

use crate::App;
use crate::approvals::decide_run;
use crate::problem::{Problem, store_unavailable};
use axum::Form;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use minijinja::{Environment, context};
use rein_app::render;
use rein_core::event::sha256_hex;
use rein_core::{Event, EventKind, RunId, RunStatus, TenantId, TerminationReason, UserId};
use rein_runtime::now_ms;
use rein_store::{CostGroup, RunFilter, RunRecord};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The cookie that carries the session's token.
const COOKIE: &str = "rein_session";
/// How long a dashboard session lasts from signing in (12 hours, in seconds): then the browser
/// forgets the cookie and the store the session.
const SESSION_SECS: i64 = 12 * 60 * 60;
/// The most runs a list shows.
const LIST_LIMIT: u32 = 200;

const STATUSES: [&str; 8] = [
    "queued",
    "running",
    "awaiting_approval",
    "completed",
    "failed",
    "limit_exceeded",
    "cancelled",
    "escalated",
];
const REASONS: [&str; 15] = [
    "completed",
    "max_iterations",
    "max_tokens",
    "max_cost",
    "timeout",
    "max_depth",
    "loop_detected",
    "circuit_open",
    "budget_exhausted",
    "guardrail_blocked",
    "output_invalid",
    "approval_denied",
    "escalated",
    "cancelled",
    "error",
];

/// The dashboard's templates, checked once at start.
pub(super) struct Templates(Environment<'static>);

impl Templates {
    pub(super) fn new() -> Result<Self, crate::ServerError> {
        let mut env = Environment::new();
        for (name, source) in [
            ("base.html", include_str!("ui/base.html")),
            ("login.html", include_str!("ui/login.html")),
            ("runs.html", include_str!("ui/runs.html")),
            ("run.html", include_str!("ui/run.html")),
            ("decide.html", include_str!("ui/decide.html")),
            ("approvals.html", include_str!("ui/approvals.html")),
            ("costs.html", include_str!("ui/costs.html")),
            ("status.html", include_str!("ui/status.html")),
        ] {
            env.add_template(name, source)?;
        }
        Ok(Templates(env))
    }

    fn page(&self, name: &str, ctx: minijinja::Value) -> Response {
        match self.0.get_template(name).and_then(|t| t.render(ctx)) {
            Ok(html) => Html(html).into_response(),
            Err(e) => Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the page could not be rendered: {e}"),
            )
            .into_response(),
        }
    }
}

/// A signed-in dashboard user: the tenant of the session in the cookie. Without a live one
/// (none, expired, signed out, or its key revoked), the page sends the browser to sign in.
pub(super) struct Viewer(TenantId);

impl FromRequestParts<Arc<App>> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Response> {
        let sign_in = || Redirect::to("/ui/login").into_response();
        let token = session_token(&parts.headers).ok_or_else(sign_in)?;
        match app
            .store
            .dashboard_session(&sha256_hex(token.as_bytes()), now_ms())
            .await
        {
            Ok(Some(tenant)) => Ok(Viewer(tenant)),
            Ok(None) => Err(sign_in()),
            Err(e) => Err(store_unavailable(&e).into_response()),
        }
    }
}

/// Refuses a form sent to the dashboard from a page of another origin (cross-site request
/// forgery), on top of the session cookie's `SameSite=Strict`, which a sibling subdomain still
/// gets. Browsers say where a request comes from in `Sec-Fetch-Site` (only `same-origin`, or
/// `none` for a typed address, pass); older ones in `Origin`, which must name the host the
/// request was sent to (`Host`, or `X-Forwarded-Host` behind a proxy). A client that sends
/// neither is not a browser acting for someone else.
pub(super) async fn same_origin_forms(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let safe = matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    if !safe && !from_this_origin(request.headers()) {
        return Problem::new(
            StatusCode::FORBIDDEN,
            "this form was sent from a page of another site; the dashboard takes forms only from its own pages",
        )
        .into_response();
    }
    next.run(request).await
}

/// Whether a request's headers say it comes from the dashboard's own origin (or do not say).
fn from_this_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return matches!(site.as_bytes(), b"same-origin" | b"none");
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Some((_, origin_host)) = origin.to_str().ok().and_then(|o| o.split_once("://")) else {
        return false;
    };
    // Behind a chain of proxies, `X-Forwarded-Host` lists a host per hop, the browser's first.
    let forwarded = headers
        .get("x-forwarded-host")
        .and_then(|v| v.to_str().ok())
        .and_then(|hosts| hosts.split(',').next());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    [host, forwarded]
        .into_iter()
        .flatten()
        .any(|host| host.trim().eq_ignore_ascii_case(origin_host))
}

/// The session token in the request's cookie, if any.
fn session_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .filter(|t| !t.is_empty())
}

/// `value` as a template value.
fn ser(value: &impl Serialize) -> minijinja::Value {
    minijinja::Value::from(minijinja::value::Serde(value))
}

fn usd(cost: rein_core::Usd) -> String {
    cost.to_string().trim_start_matches('$').to_string()
}

#[derive(Serialize)]
struct RunRow {
    id: String,
    agent: String,
    agent_version: u32,
    user: String,
    session: String,
    status: &'static str,
    reason: Option<&'static str>,
    detail: Option<String>,
    /// Model and tool calls, as `rein runs list` counts them.
    steps: u32,
    tokens: u64,
    cost: String,
    started: String,
}

impl RunRow {
    fn of(r: &RunRecord) -> Self {
        RunRow {
            id: r.info.id.as_str().to_string(),
            agent: r.info.agent.clone(),
            agent_version: r.info.agent_version,
            user: r.info.user.as_str().to_string(),
            session: r.info.session.as_str().to_string(),
            status: r.progress.status.as_str(),
            reason: r.progress.reason.map(|r| r.as_str()),
            detail: r.progress.detail.clone(),
            steps: r.progress.iterations + r.progress.tool_calls,
            tokens: r.progress.usage.total(),
            cost: usd(r.progress.cost),
            started: rein_core::time::format_utc(r.info.created_ms),
        }
    }
}

/// The approval a run waits for, from its log.
#[derive(Serialize)]
struct Pending {
    run_id: String,
    agent: String,
    step: u32,
    tool: String,
    arguments: String,
    reason: String,
    expires: String,
}

fn pending(run: &RunRecord, events: &[Event]) -> Option<Pending> {
    if run.progress.status != RunStatus::AwaitingApproval {
        return None;
    }
    let decided: Vec<u32> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::ApprovalDecided { step, .. } => Some(*step),
            _ => None,
        })
        .collect();
    events.iter().rev().find_map(|e| match &e.kind {
        EventKind::ApprovalRequested {
            step,
            tool,
            arguments,
            reason,
            expires_at_ms,
            ..
        } if !decided.contains(step) => Some(Pending {
            run_id: run.info.id.as_str().to_string(),
            agent: run.info.agent.clone(),
            step: *step,
            tool: tool.clone(),
            arguments: serde_json::to_string_pretty(arguments).unwrap_or_default(),
            reason: reason.clone(),
            expires: rein_core::time::format_utc(*expires_at_ms),
        }),
        _ => None,
    })
}

/// One line of a run's timeline.
#[derive(Serialize)]
struct Line {
    seq: u64,
    at: String,
    offset_ms: i64,
    kind: &'static str,
    summary: String,
    payload: String,
}

fn timeline(events: &[Event]) -> Vec<Line> {
    let start = events.first().map_or(0, |e| e.ts_ms);
    events
        .iter()
        .map(|e| {
            let summary = match &e.kind {
                EventKind::ModelRequested { step, model, .. } => {
                    format!("step {step}: {model} called")
                }
                EventKind::ModelResponded {
                    step,
                    model,
                    usage,
                    cost,
                    latency_ms,
                    ..
                } => format!(
                    "step {step}: {model} answered, {} in / {} out tokens, {cost}, {latency_ms} ms",
                    usage.input_tokens, usage.output_tokens
                ),
                EventKind::ModelFailed {
                    step,
                    model,
                    message,
                    ..
                } => format!("step {step}: {model} failed: {message}"),
                EventKind::ToolRequested { step, tool, .. } => {
                    format!("step {step}: {tool} called")
                }
                EventKind::ToolResult {
                    step,
                    tool,
                    result,
                    latency_ms,
                    ..
                } => format!(
                    "step {step}: {tool} {}, {latency_ms} ms",
                    if result.is_success() {
                        "succeeded".to_string()
                    } else {
                        format!(
                            "failed: {}",
                            result.message.as_deref().unwrap_or("no reason given")
                        )
                    }
                ),
                EventKind::ApprovalRequested { tool, reason, .. } => {
                    format!("{tool} waits for a person: {reason}")
                }
                EventKind::ApprovalDecided { approved, by, .. } => {
                    format!("{} by {by}", if *approved { "approved" } else { "denied" })
                }
                EventKind::RunFinished { status, reason, .. } => {
                    format!("{} ({})", status.as_str(), reason.as_str())
                }
                EventKind::GuardVerdict {
                    source,
                    tool,
                    verdict,
                    score,
                    ..
                } => format!(
                    "{} {}: {} (score {score})",
                    source.as_str(),
                    tool.as_deref().unwrap_or(""),
                    verdict.as_str()
                ),
                EventKind::WorkerStarted {
                    tool, spec, run_id, ..
                } => format!("worker {tool}: {spec} started as run {run_id}"),
                EventKind::WorkerFinished {
                    tool,
                    status,
                    accepted,
                    cost,
                    ..
                } => format!(
                    "worker {tool}: {} ({cost}){}",
                    status.as_str(),
                    if *accepted { "" } else { ", answer not taken" }
                ),
                EventKind::PlanMade {
                    revision, steps, ..
                } => format!("plan (revision {revision}): {} step(s)", steps.len()),
                EventKind::PlanStepStarted {
                    index,
                    purpose,
                    attempt,
                } => format!("step {index} started (attempt {attempt}): {purpose}"),
                EventKind::PlanStepFinished {
                    index,
                    status,
                    result,
                    ..
                } => format!("step {index} {}: {result}", status.as_str()),
                EventKind::NodeEntered {
                    node, node_kind, ..
                } => format!("entered {node_kind} node {node}"),
                EventKind::NodeFinished {
                    node, next, why, ..
                } => {
                    format!("{node} → {next}: {why}")
                }
                EventKind::JudgeVerdict { score, passed, .. } => format!(
                    "judge: {} (score {score})",
                    if *passed { "passed" } else { "failed" }
                ),
                EventKind::OutputSanitized { findings, blocked } => format!(
                    "answer {}: {}",
                    if *blocked { "withheld" } else { "redacted" },
                    findings
                        .iter()
                        .map(|f| f.kind.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                _ => String::new(),
            };
            Line {
                seq: e.seq,
                at: rein_core::time::format_utc(e.ts_ms),
                offset_ms: e.ts_ms - start,
                kind: e.kind.name(),
                summary: rein_core::sanitize::redacted_for_display(&summary),
                payload: serde_json::to_value(&e.kind)
                    .map(rein_app::views::served)
                    .and_then(|v| serde_json::to_string_pretty(&v))
                    .unwrap_or_default(),
            }
        })
        .collect()
}

/// `GET /ui`: the runs.
pub(super) async fn home() -> Redirect {
    Redirect::to("/ui/runs")
}

/// `GET /ui/login`.
pub(super) async fn login_page(State(app): State<Arc<App>>) -> Response {
    app.ui.page("login.html", context! {})
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    key: String,
}

/// `POST /ui/login`: opens a session for the key (the store checks that it is a valid key in
/// the same statement), gives the browser the session's token and shows the runs.
pub(super) async fn login(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let key = form.key.trim();
    let not_a_key = || {
        let mut page = app.ui.page(
            "login.html",
            context! { error => "That is not an API key of any tenant." },
        );
        *page.status_mut() = StatusCode::UNAUTHORIZED;
        page
    };
    let token = match rein_app::admin::random_secret() {
        Ok(token) => token,
        Err(e) => {
            return Problem::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
        }
    };
    let now = now_ms();
    match app
        .store
        .open_dashboard_session(
            &sha256_hex(token.as_bytes()),
            &sha256_hex(key.as_bytes()),
            now,
            now + SESSION_SECS * 1000,
        )
        .await
    {
        Ok(true) => with_session_cookie(
            Redirect::to("/ui/runs").into_response(),
            &headers,
            Some(&token),
        ),
        // The store opens a session only for a key it holds and that has not expired.
        Ok(false) => not_a_key(),
        Err(e) => store_unavailable(&e).into_response(),
    }
}

/// `POST /ui/logout`: closes the session in the store, so its token opens nothing even where
/// the cookie was copied, and clears the cookie.
pub(super) async fn logout(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Some(token) = session_token(&headers)
        && let Err(e) = app
            .store
            .close_dashboard_session(&sha256_hex(token.as_bytes()))
            .await
    {
        return store_unavailable(&e).into_response();
    }
    with_session_cookie(Redirect::to("/ui/login").into_response(), &headers, None)
}

/// `response` setting the cookie that carries a session's `token`, or clearing it (`None`):
/// one set of attributes for both, so the clearing cookie always names the one that was set.
fn with_session_cookie(
    mut response: Response,
    headers: &HeaderMap,
    token: Option<&str>,
) -> Response {
    let (value, max_age) = match token {
        Some(token) => (token, SESSION_SECS),
        None => ("", 0),
    };
    let cookie = format!(
        "{COOKIE}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        secure(headers)
    );
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `; Secure` when the browser reached Rein over HTTPS through a proxy that says so
/// (`X-Forwarded-Proto: https`), so the session's cookie is never sent over plain HTTP.
/// Without it (plain HTTP, as on a laptop or an internal address) a Secure cookie would be
/// dropped by the browser, and nobody could sign in.
fn secure(headers: &HeaderMap) -> &'static str {
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"));
    if https { "; Secure" } else { "" }
}

#[derive(Deserialize, Serialize, Default)]
pub(super) struct RunsQuery {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    agent: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    session: Option<String>,
    /// Runs older than this one: the page after one that ended with it.
    #[serde(default)]
    before: Option<String>,
}

/// `GET /ui/runs`: the newest runs, filtered by status, agent, user, session and termination
/// reason, a page at a time.
pub(super) async fn runs(
    State(app): State<Arc<App>>,
    Viewer(tenant): Viewer,
    Query(mut query): Query<RunsQuery>,
) -> Result<Response, Problem> {
    for field in [
        &mut query.status,
        &mut query.agent,
        &mut query.user,
        &mut query.reason,
        &mut query.session,
        &mut query.before,
    ] {
        if field.as_deref().is_some_and(|v| v.trim().is_empty()) {
            *field = None;
        }
    }
    let status = match query.status.as_deref() {
        None => None,
        Some(s) => Some(
            serde_json::from_value::<RunStatus>(serde_json::Value::String(s.into())).map_err(
                |_| Problem::new(StatusCode::BAD_REQUEST, format!("no run status `{s}`")),
            )?,
        ),
    };
    // A reason that is no termination reason matches no run.
    let reason = query.reason.as_deref().map(|r| {
        serde_json::from_value::<TerminationReason>(serde_json::Value::String(r.into())).ok()
    });
    let mut found = match reason {
        Some(None) => Vec::new(),
        Some(Some(_)) | None => {
            let filter = RunFilter {
                status,
                agent: query.agent.clone(),
                user: query.user.clone().map(UserId::new),
                reason: reason.flatten(),
                session: query.session.clone().map(rein_core::SessionId::new),
                before: query.before.clone().map(RunId::new),
            };
            app.store
                .list_runs(&tenant, &filter, LIST_LIMIT + 1)
                .await?
        }
    };
    let limited = rein_app::views::cut_page(&mut found, LIST_LIMIT);
    // The next page's query: these filters, from the run after this page's last.
    let older = found.last().filter(|_| limited).map(|last| {
        let mut next = form_urlencoded::Serializer::new(String::new());
        for (name, value) in [
            ("status", &query.status),
            ("agent", &query.agent),
            ("user", &query.user),
            ("reason", &query.reason),
            ("session", &query.session),
        ] {
            if let Some(value) = value {
                next.append_pair(name, value);
            }
        }
        next.append_pair("before", last.info.id.as_str());
        next.finish()
    });
    let rows: Vec<RunRow> = found.iter().map(RunRow::of).collect();
    Ok(app.ui.page(
        "runs.html",
        context! {
            tenant => tenant.as_str(),
            runs => ser(&rows),
            filter => ser(&query),
            statuses => ser(&STATUSES),
            reasons => ser(&REASONS),
            limited,
            limit => LIST_LIMIT,
            older,
        },
    ))
}

/// `GET /ui/runs/{id}`: the run, its trace tree (as `rein runs show` prints it) and its
/// timeline with every event.
pub(super) async fn run(
    State(app): State<Arc<App>>,
    Viewer(tenant): Viewer,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id = RunId::new(id);
    let record = app.store.run(&tenant, &id).await?;
    let sealed = app.store.events(&tenant, &id).await?;
    let events: Vec<Event> = sealed.iter().filter_map(|s| s.decode().ok()).collect();
    let (trace, _) = rein_core::spans::log_trace(&id, &events);
    let spans = rein_core::spans::spans(&id, &events);
    // What a person reads first: what was asked and what came back (for an escalated run, its
    // handoff), redacted for display as the event payloads below are.
    let output = record.progress.output.clone().map(rein_app::views::served);
    let handoff = record.progress.status == RunStatus::Escalated
        && output.as_ref().is_some_and(|o| o.get("handoff").is_some());
    let output = output.map(|o| match o {
        serde_json::Value::String(text) => text,
        other => serde_json::to_string_pretty(&other).unwrap_or_default(),
    });
    let input = rein_core::sanitize::redacted_for_display(&record.info.input);
    Ok(app.ui.page(
        "run.html",
        context! {
            tenant => tenant.as_str(),
            input,
            output,
            handoff,
            waterfall => ser(&charts::waterfall(&spans)),
            run => ser(&RunRow::of(&record)),
            trace_id => rein_core::event::hex(&trace),
            pending => ser(&pending(&record, &events)),
            tree => render::trace(&record, &events),
            events => ser(&timeline(&events)),
        },
    ))
}

/// `GET /ui/approvals`: every run of the tenant waiting for a person, with approve and deny.
pub(super) async fn approvals(
    State(app): State<Arc<App>>,
    Viewer(tenant): Viewer,
) -> Result<Response, Problem> {
    approvals_page(&app, &tenant, None).await
}

async fn approvals_page(
    app: &App,
    tenant: &TenantId,
    decided: Option<minijinja::Value>,
) -> Result<Response, Problem> {
    let filter = RunFilter {
        status: Some(RunStatus::AwaitingApproval),
        ..RunFilter::default()
    };
    let mut waiting = Vec::new();
    // A worker's run is decided by no one: its caller ends it rather than wait for a person.
    let runs = app.store.list_runs(tenant, &filter, LIST_LIMIT).await?;
    for run in runs.iter().filter(|r| r.info.parent.is_none()) {
        let sealed = app.store.events(tenant, &run.info.id).await?;
        let events: Vec<Event> = sealed.iter().filter_map(|s| s.decode().ok()).collect();
        waiting.extend(pending(run, &events));
    }
    Ok(app.ui.page(
        "approvals.html",
        context! { tenant => tenant.as_str(), pending => ser(&waiting), decided },
    ))
}

#[derive(Deserialize)]
pub(super) struct DecisionForm {
    approved: bool,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /ui/runs/{id}/approval`: records the decision (by `ui:<tenant>`) and drives the run to
/// its next stop, as `POST /v1/runs/{id}/approval` does; then shows the approvals left.
pub(super) async fn decide(
    State(app): State<Arc<App>>,
    Viewer(tenant): Viewer,
    Path(id): Path<String>,
    Form(form): Form<DecisionForm>,
) -> Result<Response, Problem> {
    let id = RunId::new(id);
    let reason = form
        .reason
        .map(|r| r.trim().chars().take(4096).collect::<String>())
        .filter(|r| !r.is_empty());
    let outcome = decide_run(
        &app,
        &tenant,
        &id,
        rein_runtime::Decision {
            approved: form.approved,
            by: format!("ui:{tenant}"),
            reason,
        },
    )
    .await?;
    let decided = context! {
        run_id => id.as_str(),
        approved => form.approved,
        status => outcome.status.as_str(),
    };
    approvals_page(&app, &tenant, Some(decided)).await
}

/// `POST /ui/runs/{id}/cancel`: cancels the run (by `ui:<tenant>`), as `POST
/// /v1/runs/{id}/cancel` does, then shows it (a run another process drives ends before its next
/// step there).
pub(super) async fn cancel(
    State(app): State<Arc<App>>,
    Viewer(tenant): Viewer,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id = RunId::new(id);
    match app
        .runtime
        .cancel(&tenant, &id, &format!("ui:{tenant}"))
        .await
    {
        // Ended already (a second click): the page shows how.
        Ok(_) | Err(rein_runtime::RuntimeError::Ended(..)) => {}
        Err(e) => return Err(e.into()),
    }
    let path: String = form_urlencoded::byte_serialize(id.as_str().as_bytes()).collect();
    Ok(Redirect::to(&format!("/ui/runs/{path}")).into_response())
}

#[derive(Serialize)]
struct CostRow {
    key: String,
    calls: u64,
    input_tokens: u64,
    output_tokens: u64,
    cost: String,
    width: u64,
}

/// How many days of spend the costs page draws.
const CHART_DAYS: usize = 30;

/// `GET /ui/costs`: the tenant's spend by day (a chart of the last [`CHART_DAYS`] days with
/// spend, and a table), agent and model, with bars.
pub(super) async fn costs(
    State(app): State<Arc<App>>,
    Viewer(tenant): Viewer,
) -> Result<Response, Problem> {
    let mut groups = Vec::new();
    let mut chart = Vec::new();
    for (by, group) in [
        ("day", CostGroup::Day),
        ("agent", CostGroup::Agent),
        ("model", CostGroup::Model),
    ] {
        let lines = app.store.costs(Some(&tenant), group, 0).await?;
        if group == CostGroup::Day {
            chart = charts::spend_by_day(&lines, CHART_DAYS);
        }
        let most = lines
            .iter()
            .map(|l| l.cost.micros())
            .max()
            .unwrap_or(0)
            .max(1);
        let rows: Vec<CostRow> = lines
            .iter()
            .map(|l| CostRow {
                key: l.key.clone(),
                calls: l.calls,
                input_tokens: l.usage.input_tokens,
                output_tokens: l.usage.output_tokens,
                cost: usd(l.cost),
                width: u64::try_from(l.cost.micros().max(0) * 300 / most).unwrap_or(0),
            })
            .collect();
        groups.push(context! { by, lines => ser(&rows) });
    }
    Ok(app.ui.page(
        "costs.html",
        context! {
            tenant => tenant.as_str(),
            groups,
            chart => ser(&chart),
            chart_width => charts::CHART_WIDTH,
            chart_height => charts::CHART_HEIGHT,
            chart_days => CHART_DAYS,
        },
    ))
}

#[derive(Serialize)]
struct BudgetRow {
    scope: String,
    limit: &'static str,
    cap: String,
    spent: String,
    reserved: String,
    percent: String,
    width: u64,
}

#[derive(Serialize)]
struct BreakerRow {
    key: String,
    state: &'static str,
    failures: u32,
    opened: Option<String>,
}

/// `GET /ui/status`: the tenant's daily and the global hourly budget (spent, held and cap),
/// and the circuit breakers it may see.
pub(super) async fn status(
    State(app): State<Arc<App>>,
    Viewer(tenant): Viewer,
) -> Result<Response, Problem> {
    let mut budgets = Vec::new();
    for (scope, standing) in app.runtime.budget_standings(&tenant).await? {
        let mut row = |limit, cap: f64, spent: f64, text: &dyn Fn(f64) -> String, reserved: f64| {
            let used = if cap > 0.0 { spent / cap } else { 0.0 };
            budgets.push(BudgetRow {
                scope: scope.key.clone(),
                limit,
                cap: text(cap),
                spent: text(spent),
                reserved: text(reserved),
                percent: format!("{:.1}", used * 100.0),
                width: (used.clamp(0.0, 1.0) * 300.0) as u64,
            });
        };
        let dollars = |micros: f64| format!("{:.6}", micros / 1e6);
        let count = |n: f64| format!("{n:.0}");
        if let Some(cap) = scope.cap.usd {
            row(
                "usd",
                cap.micros() as f64,
                standing.spent.usd.micros() as f64,
                &dollars,
                standing.reserved.usd.micros() as f64,
            );
        }
        if let Some(cap) = scope.cap.tokens {
            row(
                "tokens",
                cap as f64,
                standing.spent.tokens as f64,
                &count,
                standing.reserved.tokens as f64,
            );
        }
    }
    let breakers: Vec<BreakerRow> = app
        .runtime
        .breakers_seen(&tenant)
        .into_iter()
        .map(|(key, state)| BreakerRow {
            state: match (state.opened_ms, state.probe_until_ms) {
                (Some(_), Some(_)) => "probing",
                (Some(_), None) => "open",
                (None, _) => "closed",
            },
            failures: state.failures,
            opened: state.opened_ms.map(rein_core::time::format_utc),
            key,
        })
        .collect();
    Ok(app.ui.page(
        "status.html",
        context! { tenant => tenant.as_str(), budgets => ser(&budgets), breakers => ser(&breakers) },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    axum::http::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn an_origin_is_checked_against_the_host_the_browser_asked_for() {
        let host = ("host", "rein.internal:8080");
        assert!(from_this_origin(&headers(&[host])));
        assert!(from_this_origin(&headers(&[
            host,
            ("origin", "https://rein.internal:8080")
        ])));
        assert!(!from_this_origin(&headers(&[
            host,
            ("origin", "https://evil.test")
        ])));
        // Behind proxies, the first forwarded host is the one the browser named.
        assert!(from_this_origin(&headers(&[
            host,
            ("origin", "https://rein.example.com"),
            ("x-forwarded-host", "rein.example.com, edge.internal")
        ])));
        assert!(!from_this_origin(&headers(&[
            host,
            ("origin", "https://edge.internal"),
            ("x-forwarded-host", "rein.example.com, edge.internal")
        ])));
        // A browser's own verdict wins over the headers beside it.
        assert!(!from_this_origin(&headers(&[
            host,
            ("origin", "https://rein.internal:8080"),
            ("sec-fetch-site", "same-site")
        ])));
    }
}
