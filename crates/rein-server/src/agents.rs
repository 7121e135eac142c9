//! `/v1/agents`: a tenant's registered agent specs, versioned.

use crate::App;
use crate::auth::Caller;
use crate::problem::Problem;
use crate::{connections, gateway};
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use rein_app::views::{AgentVersionView, AgentView, ProblemView};
use rein_app::wiring::parse_agent;
use rein_runtime::now_ms;
use std::sync::Arc;

/// Registers an agent spec (YAML, checked like `rein check`) as the next version of its agent.
#[utoipa::path(post, path = "/v1/agents", tag = "agents",
    request_body(content = String, content_type = "application/yaml", description = "The agent spec"),
    responses(
        (status = 201, description = "Registered", body = AgentVersionView),
        (status = 413, description = "The spec is larger than `[server] max_body_bytes`", body = ProblemView, content_type = "application/problem+json"),
        (status = 422, description = "The spec does not check: every problem, by field", body = ProblemView, content_type = "application/problem+json"),
    ))]
pub(crate) async fn register_agent(
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
pub(crate) async fn list_agents(
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
