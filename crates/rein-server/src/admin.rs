//! The admin API (`/v1/admin`): tenants, their API keys and the admin log over HTTP, for
//! whoever holds the admin key (`rein_app::admin` holds what it shares with the `rein tenants`
//! and `rein keys` commands). Changes and refusals are logged under the target `rein::admin`.

use crate::App;
use crate::auth::bearer;
use crate::problem::Problem;
use crate::request::json_body;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use rein_app::admin::{
    ADMIN_API_ACTOR, ADMIN_KEY_ENV, add_key, admin_log_page, check_name, key_expiry, keys_json,
    tenant_exists, tenants_json,
};
use rein_app::views::{AdminEntryView, AdminLogView, KeyView, ProblemView, TenantView};
use rein_core::TenantId;
use rein_core::event::sha256_hex;
use rein_core::time::format_utc;
use rein_runtime::now_ms;
use serde::Deserialize;
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};

/// Logs an admin API action that changed who may call Rein (target `rein::admin`, so a log
/// pipeline can keep these lines apart): the tenant and the key's id, never the key. (The
/// `rein tenants` and `rein keys` commands say what they did on their own standard error.)
fn admin_done(action: &str, tenant: &str, key_id: Option<&str>) {
    tracing::info!(target: "rein::admin", tenant, key_id, "{action}");
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct AdminLogQuery {
    /// Start after this position (the `next` of the page before).
    after: Option<u64>,
    /// Entries in this page (default 100, at most 1,000).
    limit: Option<u32>,
}

/// The admin log, a page at a time, oldest first, checked: every tenant created and every API
/// key created or revoked, by whom and when, hash-chained.
#[utoipa::path(get, path = "/v1/admin/log", tag = "admin", params(AdminLogQuery), responses(
    (status = 200, description = "A page of the log, and whether it verifies", body = AdminLogView),
    (status = 400, description = "A malformed query", body = ProblemView, content_type = "application/problem+json"),
    (status = 404, description = "No entry at `after`", body = ProblemView, content_type = "application/problem+json"),
))]
pub(super) async fn log(
    State(app): State<Arc<App>>,
    _: Admin,
    query: Result<Query<AdminLogQuery>, QueryRejection>,
) -> Result<axum::Json<AdminLogView>, Problem> {
    let Query(q) = query.map_err(|e| Problem::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let page = admin_log_page(app.store.as_ref(), q.after, limit)
        .await?
        .ok_or_else(|| Problem::not_found(format!("admin log entry {}", q.after.unwrap_or(0))))?;
    Ok(axum::Json(AdminLogView {
        ok: page.verdict.is_ok(),
        problem: page.verdict.err(),
        entries: page
            .entries
            .into_iter()
            .map(|e| AdminEntryView {
                seq: e.seq,
                at: format_utc(e.ts_ms),
                action: e.action,
                tenant: e.tenant,
                key_id: e.key_id,
                actor: e.actor,
                prev_hash: e.prev_hash,
                hash: e.hash,
            })
            .collect(),
        next: page.next,
    }))
}

/// The admin key's holder. A tenant's key is not an admin key: it gets 401 here.
pub(super) struct Admin;

impl FromRequestParts<Arc<App>> for Admin {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Problem> {
        let Some(expected) = app.admin_key_sha256.as_deref() else {
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                format!(
                    "the admin API is off: start rein serve with {ADMIN_KEY_ENV} or [server] admin_key_sha256"
                ),
            ));
        };
        let refused = |why: &str| {
            tracing::warn!(target: "rein::admin", path = parts.uri.path(), "admin request refused: {why}");
        };
        let key = bearer(parts).inspect_err(|_| refused("no key"))?;
        // Comparing hashes, not keys, leaks nothing about the key through timing.
        if sha256_hex(key.as_bytes()) == expected {
            Ok(Admin)
        } else {
            refused("not the admin key");
            Err(Problem::new(StatusCode::UNAUTHORIZED, "not the admin key"))
        }
    }
}

/// The tenants, with their key counts.
#[utoipa::path(get, path = "/v1/admin/tenants", tag = "admin", responses((status = 200, description = "The tenants", body = Vec<TenantView>)))]
pub(super) async fn tenants(
    State(app): State<Arc<App>>,
    _: Admin,
) -> Result<axum::Json<Vec<TenantView>>, Problem> {
    let tenants = app.store.registered_tenants().await?;
    Ok(axum::Json(tenants_json(&tenants)))
}

/// A tenant to create.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewTenant {
    /// 1 to 64 letters, digits, `-`, `_` or `.`.
    name: String,
}

/// Whether a tenant was created.
#[derive(serde::Serialize, ToSchema)]
pub(super) struct TenantCreated {
    name: String,
    /// `false`: it already existed.
    created: bool,
}

/// A new key, shown in this answer only.
#[derive(serde::Serialize, ToSchema)]
pub(super) struct NewKey {
    tenant: String,
    /// The key's id, to list and revoke it by.
    id: String,
    /// The key itself: only its SHA-256 is kept.
    key: String,
    /// When it stops working; absent: never.
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
}

/// Creates a tenant: 201 when created, 200 when it existed.
#[utoipa::path(post, path = "/v1/admin/tenants", tag = "admin", request_body = NewTenant, responses(
    (status = 201, description = "Created", body = TenantCreated),
    (status = 200, description = "It already existed", body = TenantCreated),
    (status = 422, description = "Not a tenant name", body = ProblemView, content_type = "application/problem+json"),
))]
pub(super) async fn new_tenant(
    State(app): State<Arc<App>>,
    _: Admin,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let NewTenant { name } = json_body(&headers, body)?;
    check_name(&name).map_err(|e| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    let created = app
        .store
        .create_tenant(&TenantId::new(&name), now_ms(), ADMIN_API_ACTOR)
        .await?;
    let status = if created {
        admin_done("tenant created", &name, None);
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(TenantCreated { name, created })).into_response())
}

/// How long a new key lives; no body, or no `expires_in`: for good.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyLifetime {
    /// Days (`90d`) or hours and minutes (`12h`, `30m`), from one minute to ten years.
    expires_in: Option<String>,
}

/// A new API key for the tenant, shown in this answer only.
#[utoipa::path(post, path = "/v1/admin/tenants/{name}/keys", tag = "admin", params(("name" = String, Path, description = "The tenant")),
    request_body(content = Option<KeyLifetime>, description = "Optional: how long the key lives"),
    responses(
    (status = 201, description = "The new key", body = NewKey),
    (status = 404, description = "No such tenant", body = ProblemView, content_type = "application/problem+json"),
    (status = 422, description = "Not a lifetime", body = ProblemView, content_type = "application/problem+json"),
))]
pub(super) async fn new_key(
    State(app): State<Arc<App>>,
    _: Admin,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, axum::Json<NewKey>), Problem> {
    let lifetime: KeyLifetime = match &body {
        Ok(bytes) if bytes.is_empty() => KeyLifetime::default(),
        _ => json_body(&headers, body)?,
    };
    let expires_ms = lifetime
        .expires_in
        .map(|text| key_expiry(&text, now_ms()))
        .transpose()
        .map_err(|e| {
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("`expires_in` {e}"),
            )
        })?;
    let added = add_key(
        app.store.as_ref(),
        &TenantId::new(&tenant),
        expires_ms,
        ADMIN_API_ACTOR,
    )
    .await
    .map_err(|e| {
        tracing::error!(error = format!("{e:#}"), "admin request failed");
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the key could not be stored; retry later",
        )
    })?;
    let (key, id) = added.ok_or_else(|| Problem::not_found(format!("tenant {tenant:?}")))?;
    admin_done("key created", &tenant, Some(&id));
    Ok((
        StatusCode::CREATED,
        axum::Json(NewKey {
            tenant,
            id,
            key,
            expires_at: expires_ms.map(format_utc),
        }),
    ))
}

/// The tenant's keys: each one's id and creation time.
#[utoipa::path(get, path = "/v1/admin/tenants/{name}/keys", tag = "admin", params(("name" = String, Path, description = "The tenant")), responses(
    (status = 200, description = "The keys", body = Vec<KeyView>),
    (status = 404, description = "No such tenant", body = ProblemView, content_type = "application/problem+json"),
))]
pub(super) async fn keys(
    State(app): State<Arc<App>>,
    _: Admin,
    Path(tenant): Path<String>,
) -> Result<axum::Json<Vec<KeyView>>, Problem> {
    let tenant = TenantId::new(tenant);
    if !tenant_exists(app.store.as_ref(), &tenant).await? {
        return Err(Problem::not_found(format!("tenant {:?}", tenant.as_str())));
    }
    Ok(axum::Json(keys_json(&app.store.api_keys(&tenant).await?)))
}

/// Revokes a key: it authenticates no more.
#[utoipa::path(delete, path = "/v1/admin/tenants/{name}/keys/{id}", tag = "admin",
    params(("name" = String, Path, description = "The tenant"), ("id" = String, Path, description = "The key's id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "No such key of this tenant", body = ProblemView, content_type = "application/problem+json"),
    ))]
pub(super) async fn revoke(
    State(app): State<Arc<App>>,
    _: Admin,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    if app
        .store
        .revoke_api_key(&TenantId::new(&tenant), &id, now_ms(), ADMIN_API_ACTOR)
        .await?
    {
        // Remembered keys are by hash, and a revocation names a key by id: forget them all.
        app.keys.forget_all();
        admin_done("key revoked", &tenant, Some(&id));
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Problem::not_found(format!(
            "key {id:?} of tenant {tenant:?}"
        )))
    }
}
