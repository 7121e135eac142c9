//! `GET /v1/runs/{id}/events`: a run's event log as Server-Sent Events, resumable with
//! `Last-Event-ID`.

use crate::App;
use crate::auth::Caller;
use crate::problem::Problem;
use crate::runs::RunPath;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use rein_app::views::{EventView, ProblemView};
use rein_core::RunId;
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// How often an event stream reads its run's log when it hears of no append, on a store whose
/// followers hear only their own process's appends (SQLite: a run another process drives is
/// followed this way).
pub(crate) const STREAM_RECHECK: Duration = Duration::from_millis(50);

/// The same, on a store whose followers hear every process's appends (PostgreSQL): only for
/// what went unheard while a connection was down.
pub(crate) const STREAM_RECHECK_HEARD: Duration = Duration::from_secs(1);

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
pub(crate) async fn run_events(
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
