//! `/v1/runs`: starting runs (idempotently), reading them, their traces, and cancelling them.

use crate::auth::Caller;
use crate::problem::Problem;
use crate::request::{MAX_ID_LEN, MAX_INPUT_LEN, check_len, json_body, trace_parent};
use crate::{App, MAX_WAIT};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rein_app::render;
use rein_app::views::{EventView, OutcomeView, ProblemView, RunView, TraceView};
use rein_app::wiring::parse_agent;
use rein_core::{RunId, RunStatus, SessionId, TenantId, UserId};
use rein_runtime::{RunOutcome, RunRequest};
use rein_store::{RunFilter, StoreError};
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use utoipa::{IntoParams, ToSchema};

/// A run to queue.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewRun {
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
pub(crate) struct RunPath {
    /// The run's id.
    id: String,
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
pub(crate) async fn create_run(
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
pub(crate) const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The response header that marks an answer about a run an earlier request made.
pub(crate) const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// The longest idempotency key accepted.
pub(crate) const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The request's `Idempotency-Key`, if it sent one: 1 to 255 visible ASCII characters.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, Problem> {
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
pub(crate) fn idempotent_run_id(tenant: &TenantId, key: &str) -> RunId {
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
pub(crate) async fn keyed_run(
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
pub(crate) fn same_request(new: &NewRun, info: &rein_store::RunInfo) -> bool {
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
pub(crate) async fn answer_run(
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
pub(crate) async fn logged_outcome(
    app: &App,
    record: &rein_store::RunRecord,
) -> Result<OutcomeView, Problem> {
    let sealed = app
        .store
        .events(&record.info.tenant, &record.info.id)
        .await?;
    let events: Vec<rein_core::Event> = sealed.iter().filter_map(|s| s.decode().ok()).collect();
    Ok(OutcomeView::of_log(record, &events))
}

/// The first pause before a waiting request looks at the store for its run.
pub(crate) const WAIT_LOOK_FIRST: Duration = Duration::from_millis(100);

/// The longest pause between a waiting request's looks at the store.
pub(crate) const WAIT_LOOK_MAX: Duration = Duration::from_secs(1);

/// A run.
#[utoipa::path(get, path = "/v1/runs/{id}", tag = "runs", params(RunPath), responses(
    (status = 200, description = "The run", body = RunView),
    (status = 404, description = "No such run for this tenant", body = ProblemView, content_type = "application/problem+json"),
))]
pub(crate) async fn get_run(
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
pub(crate) struct RunQuery {
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
pub(crate) async fn list_runs(
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
    let more = rein_app::views::cut_page(&mut runs, limit);
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

/// The query of the page after the one `query` asked for, which ended with run `last`: the
/// same parameters, as the client wrote them, with `before` moved on.
pub(crate) fn next_page_query(query: Option<&str>, last: &str) -> String {
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
pub(crate) async fn run_trace(
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

/// Ends a run that nobody drives at once (200), or stops one a process drives (this one, or
/// another sharing the store) before its next step (202).
#[utoipa::path(post, path = "/v1/runs/{id}/cancel", tag = "runs", params(RunPath), responses(
    (status = 200, description = "Cancelled", body = RunView),
    (status = 202, description = "The run stops before its next step, in whichever process drives it", body = RunView),
    (status = 404, description = "No such run for this tenant", body = ProblemView, content_type = "application/problem+json"),
    (status = 409, description = "The run has ended", body = ProblemView, content_type = "application/problem+json"),
))]
pub(crate) async fn cancel(
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
}
