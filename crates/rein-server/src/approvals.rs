//! `POST /v1/runs/{id}/approval`: a person's decision on a paused run.

use crate::App;
use crate::auth::Caller;
use crate::problem::Problem;
use crate::request::{MAX_ID_LEN, check_len, json_body};
use crate::runs::RunPath;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use rein_app::views::{OutcomeView, ProblemView};
use rein_core::{RunId, TenantId};
use rein_runtime::RunOutcome;
use serde::Deserialize;
use std::sync::Arc;
use utoipa::ToSchema;

/// A person's decision on a held tool call.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApprovalBody {
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
pub(crate) async fn decide(
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
pub(crate) async fn decide_run(
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
