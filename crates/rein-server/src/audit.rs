//! `GET /v1/audit/verify`: a tenant's runs checked against their hash chains.

use crate::App;
use crate::auth::Caller;
use crate::problem::Problem;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use rein_app::views::{AuditView, ProblemView};
use rein_core::{RunId, TenantId};
use serde::Deserialize;
use std::sync::Arc;
use utoipa::IntoParams;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
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
pub(crate) async fn audit_verify(
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
            let more = rein_app::views::cut_page(&mut ids, limit);
            let next = more
                .then(|| ids.last().map(|id| id.as_str().to_string()))
                .flatten();
            (ids, next)
        }
    };
    let runs: Vec<(TenantId, RunId)> = ids.into_iter().map(|id| (tenant.clone(), id)).collect();
    let (events, problems) = rein_app::audit::verify_runs(app.store.as_ref(), &runs).await?;
    Ok(axum::Json(AuditView {
        ok: problems.is_empty(),
        runs: runs.len(),
        events,
        problems,
        next,
    }))
}
