//! Tenants and their API keys, as the `rein tenants` / `rein keys` commands and the admin API
//! (`/v1/admin`) both manage them.
//!
//! Keys are 256 random bits shown once; only their SHA-256 is stored. A key is listed and
//! revoked by its id, the first 16 hex digits of that hash, which cannot be used to sign in.
//! The admin key is never stored: the server holds its SHA-256, from `REIN_ADMIN_KEY` in the
//! environment or `[server] admin_key_sha256` in rein.toml.

use crate::error::{Error, Result};
use crate::views::{KeyView, TenantView};
use rein_core::TenantId;
use rein_core::admin_log::{AdminEntry, verify_admin_log};
use rein_core::event::sha256_hex;
use rein_core::time::format_utc;
use rein_runtime::now_ms;
use rein_store::{Store, StoreError};

/// The environment variable holding the admin key itself.
pub const ADMIN_KEY_ENV: &str = "REIN_ADMIN_KEY";
/// The shortest admin key accepted from the environment.
const MIN_ADMIN_KEY_LEN: usize = 32;

/// A new API key: 256 random bits, shown once; only its SHA-256 is stored.
pub fn new_api_key() -> Result<String> {
    Ok(format!("rein_{}", random_secret()?))
}

/// 256 random bits from the system, in hex: an API key's or a dashboard session's secret.
pub fn random_secret() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::unavailable("no system randomness", e.to_string()))?;
    Ok(rein_core::event::hex(&bytes))
}

/// The admin key's SHA-256, from `REIN_ADMIN_KEY` (the key) or `[server] admin_key_sha256`
/// (its hash); `None` turns the admin API off. Both at once is refused: one would silently lose.
pub fn admin_key_sha256(
    env_key: Option<String>,
    configured: Option<&str>,
) -> Result<Option<String>> {
    match (env_key.filter(|k| !k.is_empty()), configured) {
        (Some(_), Some(_)) => Err(Error::BadInput(format!(
            "the admin key is set twice: {ADMIN_KEY_ENV} in the environment and [server] admin_key_sha256 in rein.toml; keep one"
        ))),
        (Some(key), None) if key.trim().len() < MIN_ADMIN_KEY_LEN => Err(Error::BadInput(format!(
            "{ADMIN_KEY_ENV} is shorter than {MIN_ADMIN_KEY_LEN} characters; use `rein keys create --admin` for a strong one"
        ))),
        (Some(key), None) => Ok(Some(sha256_hex(key.trim().as_bytes()))),
        (None, hash) => Ok(hash.map(str::to_string)),
    }
}

/// The admin log's author of changes made over `/v1/admin` (with the admin key).
pub const ADMIN_API_ACTOR: &str = "admin_api";

/// The admin log's author of changes made by `rein tenants` and `rein keys`: `cli`, with the
/// operating-system user where the environment names one (`cli:alice`).
pub fn cli_actor() -> String {
    match std::env::var("USER").or_else(|_| std::env::var("LOGNAME")) {
        Ok(user) if !user.is_empty() => format!("cli:{user}"),
        _ => "cli".to_string(),
    }
}

/// Checks a tenant name: what `rein tenants create` and `POST /v1/admin/tenants` accept.
pub fn check_name(name: &str) -> Result<(), String> {
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
pub async fn add_key(
    store: &dyn Store,
    tenant: &TenantId,
    expires_ms: Option<i64>,
    actor: &str,
) -> Result<Option<(String, String)>> {
    let key = new_api_key()?;
    let hash = sha256_hex(key.as_bytes());
    if !store
        .add_api_key(tenant, &hash, now_ms(), expires_ms, actor)
        .await
        .map_err(|e| Error::unavailable("cannot add the key", e))?
    {
        return Ok(None);
    }
    Ok(Some((key, rein_store::api_key_id(&hash).to_string())))
}

/// The answer to a command naming a tenant that does not exist.
pub fn no_tenant(tenant: &str) -> Error {
    Error::BadInput(format!(
        "no tenant named {tenant:?}; create it with `rein tenants create {tenant}`"
    ))
}

/// The longest lifetime a key may be given: ten years.
const MAX_KEY_DAYS: u64 = 3650;

/// When a key made now with the lifetime `text` expires (ms since the epoch): days (`90d`), or
/// a duration as agent specs write it (`12h`, `30m`), from one minute to [`MAX_KEY_DAYS`].
pub fn key_expiry(text: &str, now_ms: i64) -> Result<i64, String> {
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

pub async fn tenant_exists(store: &dyn Store, tenant: &TenantId) -> Result<bool, StoreError> {
    Ok(store
        .registered_tenants()
        .await?
        .iter()
        .any(|t| &t.name == tenant))
}

pub fn tenants_json(tenants: &[rein_store::TenantEntry]) -> Vec<TenantView> {
    tenants
        .iter()
        .map(|t| TenantView {
            name: t.name.to_string(),
            keys: t.keys,
            created_at: format_utc(t.created_ms),
        })
        .collect()
}

pub fn keys_json(keys: &[rein_store::ApiKeyEntry]) -> Vec<KeyView> {
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
pub async fn admin_log_page(
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
    let more = crate::views::cut_page(&mut entries, limit);
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
pub struct AdminLogPage {
    pub entries: Vec<AdminEntry>,
    /// The first problem, if any.
    pub verdict: Result<(), String>,
    pub next: Option<u64>,
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
        assert!(both.to_string().contains("set twice"), "{both}");
    }

    #[test]
    fn tenant_names_are_checked() {
        assert!(check_name("acme-1.eu_west").is_ok());
        for bad in ["", "a b", "x/y", &"n".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
