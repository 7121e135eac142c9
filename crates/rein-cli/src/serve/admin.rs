//! Tenants and their API keys: the `rein tenants` / `rein keys` commands and the admin API
//! (`/v1/admin`), which does the same over HTTP for whoever holds the admin key.
//!
//! Keys are 256 random bits shown once; only their SHA-256 is stored. A key is listed and
//! revoked by its id, the first 16 hex digits of that hash, which cannot be used to sign in.
//! The admin key is never stored: the server holds its SHA-256, from `REIN_ADMIN_KEY` in the
//! environment or `[server] admin_key_sha256` in rein.toml.

use super::{App, Problem, bearer, json_body};
use crate::views::{AdminEntryView, AdminLogView, KeyView, ProblemView, TenantView};
use crate::{BadInput, StoreArgs, exit};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use rein_core::TenantId;
use rein_core::admin_log::{AdminEntry, verify_admin_log};
use rein_core::event::sha256_hex;
use rein_core::time::format_utc;
use rein_runtime::now_ms;
use rein_store::{Store, StoreError};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};

/// The environment variable holding the admin key itself.
pub const ADMIN_KEY_ENV: &str = "REIN_ADMIN_KEY";
/// The shortest admin key accepted from the environment.
const MIN_ADMIN_KEY_LEN: usize = 32;

/// A new API key: 256 random bits, shown once; only its SHA-256 is stored.
pub fn new_api_key() -> anyhow::Result<String> {
    Ok(format!("rein_{}", random_secret()?))
}

/// 256 random bits from the system, in hex: an API key's or a dashboard session's secret.
pub(super) fn random_secret() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no system randomness: {e}"))?;
    Ok(rein_core::event::hex(&bytes))
}

/// The admin key's SHA-256, from `REIN_ADMIN_KEY` (the key) or `[server] admin_key_sha256`
/// (its hash); `None` turns the admin API off. Both at once is refused: one would silently lose.
pub fn admin_key_sha256(
    env_key: Option<String>,
    configured: Option<&str>,
) -> Result<Option<String>, BadInput> {
    match (env_key.filter(|k| !k.is_empty()), configured) {
        (Some(_), Some(_)) => Err(BadInput(format!(
            "the admin key is set twice: {ADMIN_KEY_ENV} in the environment and [server] admin_key_sha256 in rein.toml; keep one"
        ))),
        (Some(key), None) if key.trim().len() < MIN_ADMIN_KEY_LEN => Err(BadInput(format!(
            "{ADMIN_KEY_ENV} is shorter than {MIN_ADMIN_KEY_LEN} characters; use `rein keys create --admin` for a strong one"
        ))),
        (Some(key), None) => Ok(Some(sha256_hex(key.trim().as_bytes()))),
        (None, hash) => Ok(hash.map(str::to_string)),
    }
}

/// The admin log's author of changes made over `/v1/admin` (with the admin key).
const ADMIN_API_ACTOR: &str = "admin_api";

/// The admin log's author of changes made by `rein tenants` and `rein keys`: `cli`, with the
/// operating-system user where the environment names one (`cli:alice`).
pub(crate) fn cli_actor() -> String {
    match std::env::var("USER").or_else(|_| std::env::var("LOGNAME")) {
        Ok(user) if !user.is_empty() => format!("cli:{user}"),
        _ => "cli".to_string(),
    }
}

/// Checks a tenant name: what `rein tenants create` and `POST /v1/admin/tenants` accept.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tenant name {name:?}: use 1 to 64 letters, digits, `-`, `_` or `.`"
        ))
    }
}

/// Creates an API key for `tenant`: the key, to show once, and its id; `None` if there is no
/// such tenant.
async fn add_key(
    store: &dyn Store,
    tenant: &TenantId,
    expires_ms: Option<i64>,
    actor: &str,
) -> anyhow::Result<Option<(String, String)>> {
    let key = new_api_key()?;
    let hash = sha256_hex(key.as_bytes());
    if !store
        .add_api_key(tenant, &hash, now_ms(), expires_ms, actor)
        .await?
    {
        return Ok(None);
    }
    Ok(Some((key, rein_store::api_key_id(&hash).to_string())))
}

/// The longest lifetime a key may be given: ten years.
const MAX_KEY_DAYS: u64 = 3650;

/// When a key made now with the lifetime `text` expires (ms since the epoch): days (`90d`), or
/// a duration as agent specs write it (`12h`, `30m`), from one minute to [`MAX_KEY_DAYS`].
pub(crate) fn key_expiry(text: &str, now_ms: i64) -> Result<i64, String> {
    let text = text.trim();
    let millis = match text.strip_suffix('d') {
        Some(days) => days
            .parse::<u64>()
            .ok()
            .filter(|d| (1..=MAX_KEY_DAYS).contains(d))
            .map(|d| d * 86_400_000)
            .ok_or_else(|| format!("`{text}`: give whole days, from 1d to {MAX_KEY_DAYS}d"))?,
        None => {
            let lifetime = rein_core::parse_duration(text)?;
            if lifetime < std::time::Duration::from_secs(60) {
                return Err(format!("`{text}`: a key lives at least a minute"));
            }
            u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX)
        }
    };
    Ok(now_ms.saturating_add(i64::try_from(millis).unwrap_or(i64::MAX)))
}

fn no_tenant(tenant: &str) -> anyhow::Error {
    anyhow::anyhow!(BadInput(format!(
        "no tenant named {tenant:?}; create it with `rein tenants create {tenant}`"
    )))
}

/// `rein tenants create NAME`.
pub async fn create_tenant(name: &str, store: &StoreArgs) -> anyhow::Result<u8> {
    check_name(name).map_err(|e| anyhow::anyhow!(BadInput(e)))?;
    let store = crate::open_store(store).await?;
    let created = store
        .create_tenant(&TenantId::new(name), now_ms(), &cli_actor())
        .await?;
    store.close().await;
    if created {
        eprintln!("tenant {name} created");
    } else {
        eprintln!("tenant {name} already exists");
    }
    Ok(exit::OK)
}

/// `rein tenants list [--json]`.
pub async fn list_tenants(json: bool, store: &StoreArgs) -> anyhow::Result<u8> {
    let store = crate::open_store(store).await?;
    let tenants = store.registered_tenants().await?;
    store.close().await;
    if json {
        println!("{}", json!(tenants_json(&tenants)));
    } else {
        for t in &tenants {
            println!(
                "{:<24} {:>3} keys  created {}",
                t.name,
                t.keys,
                format_utc(t.created_ms)
            );
        }
    }
    Ok(exit::OK)
}

/// `rein keys create --tenant NAME`: prints the new key alone on stdout (it is not shown
/// again). With `--admin` instead: a new admin key, and on stderr the line that puts its hash in
/// rein.toml.
pub async fn create_key(
    tenant: Option<&str>,
    expires_in: Option<&str>,
    store: &StoreArgs,
) -> anyhow::Result<u8> {
    let Some(tenant) = tenant else {
        let key = new_api_key()?;
        eprintln!(
            "the admin key is below, shown once; give it to rein serve as {ADMIN_KEY_ENV}, or put its hash in rein.toml:\n[server]\nadmin_key_sha256 = \"{}\"",
            sha256_hex(key.as_bytes())
        );
        println!("{key}");
        return Ok(exit::OK);
    };
    let expires_ms = expires_in
        .map(|text| key_expiry(text, now_ms()))
        .transpose()
        .map_err(|e| anyhow::anyhow!(BadInput(format!("--expires-in {e}"))))?;
    let store = crate::open_store(store).await?;
    let added = add_key(
        store.as_ref(),
        &TenantId::new(tenant),
        expires_ms,
        &cli_actor(),
    )
    .await;
    store.close().await;
    let (key, id) = added?.ok_or_else(|| no_tenant(tenant))?;
    let until = expires_ms
        .map(|ms| format!(", valid until {}", format_utc(ms)))
        .unwrap_or_default();
    eprintln!("key {id} created for tenant {tenant}{until}; it is shown once, below");
    println!("{key}");
    Ok(exit::OK)
}

/// `rein keys list --tenant NAME [--json]`: each key's id and creation time.
pub async fn list_keys(tenant: &str, json: bool, store: &StoreArgs) -> anyhow::Result<u8> {
    let store = crate::open_store(store).await?;
    let tenant = TenantId::new(tenant);
    let known = tenant_exists(store.as_ref(), &tenant).await;
    let keys = store.api_keys(&tenant).await;
    store.close().await;
    if !known? {
        return Err(no_tenant(tenant.as_str()));
    }
    let keys = keys?;
    if json {
        println!("{}", json!(keys_json(&keys)));
    } else {
        let now = now_ms();
        for k in &keys {
            let until = k
                .expires_ms
                .map(|ms| {
                    let state = if ms <= now { "expired" } else { "expires" };
                    format!("  {state} {}", format_utc(ms))
                })
                .unwrap_or_default();
            println!("{}  created {}{until}", k.id, format_utc(k.created_ms));
        }
    }
    Ok(exit::OK)
}

/// `rein keys revoke --tenant NAME ID`.
pub async fn revoke_key(tenant: &str, id: &str, store: &StoreArgs) -> anyhow::Result<u8> {
    let store = crate::open_store(store).await?;
    let revoked = store
        .revoke_api_key(&TenantId::new(tenant), id, now_ms(), &cli_actor())
        .await;
    store.close().await;
    if !revoked? {
        return Err(anyhow::anyhow!(BadInput(format!(
            "tenant {tenant:?} has no key {id:?}; `rein keys list --tenant {tenant}` shows their ids"
        ))));
    }
    eprintln!("key {id} of tenant {tenant} revoked");
    Ok(exit::OK)
}

/// Logs an admin API action that changed who may call Rein (target `rein::admin`, so a log
/// pipeline can keep these lines apart): the tenant and the key's id, never the key. (The
/// `rein tenants` and `rein keys` commands say what they did on their own standard error.)
fn admin_done(action: &str, tenant: &str, key_id: Option<&str>) {
    tracing::info!(target: "rein::admin", tenant, key_id, "{action}");
}

async fn tenant_exists(store: &dyn Store, tenant: &TenantId) -> Result<bool, StoreError> {
    Ok(store
        .registered_tenants()
        .await?
        .iter()
        .any(|t| &t.name == tenant))
}

fn tenants_json(tenants: &[rein_store::TenantEntry]) -> Vec<TenantView> {
    tenants
        .iter()
        .map(|t| TenantView {
            name: t.name.to_string(),
            keys: t.keys,
            created_at: format_utc(t.created_ms),
        })
        .collect()
}

fn keys_json(keys: &[rein_store::ApiKeyEntry]) -> Vec<KeyView> {
    keys.iter()
        .map(|k| KeyView {
            id: k.id.clone(),
            created_at: format_utc(k.created_ms),
            expires_at: k.expires_ms.map(format_utc),
        })
        .collect()
}

/// A page of the admin log, checked: up to `limit` entries after position `after` (from the
/// start when `None`), whether they verify (linked to the entry at `after`), and the `after` of
/// the next page while entries remain. `None` when there is no entry at `after`.
pub(crate) async fn admin_log_page(
    store: &dyn Store,
    after: Option<u64>,
    limit: u32,
) -> Result<Option<AdminLogPage>, StoreError> {
    // The entry at `after` too, to link the page to it, and one more, to know if more follow.
    let (from, extra) = match after {
        Some(after) => (after, 2),
        None => (0, 1),
    };
    let mut entries = store.admin_log(from, limit.saturating_add(extra)).await?;
    let anchor = match after {
        Some(after) if entries.first().map(|e| e.seq) != Some(after) => return Ok(None),
        Some(_) => Some(entries.remove(0)),
        None => None,
    };
    let more = super::cut_page(&mut entries, limit);
    let verdict = verify_admin_log(&entries, anchor.as_ref())
        .map_err(|brk| format!("admin log entry {}: {}", brk.seq, brk.reason));
    let next = entries.last().filter(|_| more).map(|e| e.seq);
    Ok(Some(AdminLogPage {
        entries,
        verdict,
        next,
    }))
}

/// What [`admin_log_page`] found.
pub(crate) struct AdminLogPage {
    pub(crate) entries: Vec<AdminEntry>,
    /// The first problem, if any.
    pub(crate) verdict: Result<(), String>,
    pub(crate) next: Option<u64>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_are_long_random_and_distinct() {
        let (a, b) = (new_api_key().unwrap(), new_api_key().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 5 + 64);
    }

    #[test]
    fn a_key_lifetime_is_days_or_a_duration_between_a_minute_and_ten_years() {
        const DAY: i64 = 86_400_000;
        assert_eq!(key_expiry("90d", 1000), Ok(1000 + 90 * DAY));
        assert_eq!(key_expiry(" 12h ", 0), Ok(12 * 3_600_000));
        assert_eq!(key_expiry("1m", 0), Ok(60_000));
        assert_eq!(key_expiry("3650d", 0), Ok(3650 * DAY));
        for bad in ["0d", "3651d", "1.5d", "d", "59s", "90", "soon", "-1d"] {
            assert!(key_expiry(bad, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_admin_key_comes_from_one_place_and_must_be_strong() {
        let key = "k".repeat(40);
        assert_eq!(
            admin_key_sha256(Some(key.clone()), None).unwrap(),
            Some(sha256_hex(key.as_bytes()))
        );
        assert_eq!(
            admin_key_sha256(None, Some("ab")).unwrap(),
            Some("ab".to_string())
        );
        assert_eq!(admin_key_sha256(Some(String::new()), None).unwrap(), None);
        assert!(admin_key_sha256(Some("short".into()), None).is_err());
        let both = admin_key_sha256(Some(key), Some("ab")).unwrap_err();
        assert!(both.0.contains("set twice"), "{}", both.0);
    }

    #[test]
    fn tenant_names_are_checked() {
        assert!(check_name("acme-1.eu_west").is_ok());
        for bad in ["", "a b", "x/y", &"n".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
