//! `GET /v1/costs`: a tenant's spend, grouped.

use crate::App;
use crate::auth::Caller;
use crate::problem::Problem;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use rein_app::views::{CostsView, ProblemView};
use serde::Deserialize;
use std::sync::Arc;
use utoipa::IntoParams;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct CostQuery {
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
pub(crate) async fn costs(
    State(app): State<Arc<App>>,
    Caller(tenant): Caller,
    query: Result<Query<CostQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<CostsView>, Problem> {
    let Query(q) = query.map_err(|e| Problem::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let by = match q.by.as_deref() {
        None => rein_store::CostGroup::Model,
        Some(by) => rein_store::CostGroup::named(by).ok_or_else(|| {
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
    let lines = app.store.costs(Some(&tenant), by, since_ms).await?;
    Ok(axum::Json(CostsView::of(by.name(), &lines)))
}
