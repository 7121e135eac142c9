//! Who is calling: the tenant of an API key (`Authorization: Bearer <key>`), remembered
//! briefly and forgotten whenever the admin log shows keys changed.

use crate::App;
use crate::problem::{Problem, store_unavailable};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use rein_core::TenantId;
use rein_core::event::sha256_hex;
use rein_runtime::now_ms;
use rein_store::{KeyGrant, StoreError};
use std::sync::Arc;
use std::time::Duration;

/// How long a key's tenant is remembered without asking the store again. A key revoked
/// through this process's admin API stops at once; one revoked by another process (`rein keys
/// revoke`, another server's admin API) within [`KEY_WATCH`], when the server sees the admin
/// log grow, and within this long even if the store cannot be read meanwhile.
pub(crate) const KEY_CACHE_TTL: Duration = Duration::from_secs(10);

/// How often `rein serve` reads the admin log's head, to forget remembered keys when another
/// process has changed them.
pub(crate) const KEY_WATCH: Duration = Duration::from_secs(1);

/// Forgets every remembered key whenever the admin log grows, which every change to tenants
/// and keys does, whichever process makes it. `seen` is the head read before serving began.
pub(crate) fn watch_key_changes(
    app: Arc<App>,
    mut seen: Option<u64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + KEY_WATCH, KEY_WATCH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match app.store.admin_log_head().await {
                Ok(head) if head != seen => {
                    app.keys.forget_all();
                    seen = head;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot read the admin log's head: keys revoked by other processes stop working here when they are forgotten ({} s)",
                    KEY_CACHE_TTL.as_secs()
                ),
            }
        }
    })
}

/// Tenants by API-key hash, as recently read from the store (for [`KEY_CACHE_TTL`]), with when
/// each key expires, so an expired key stops at once even while remembered. Requests that
/// present the same key while it is not remembered share one store lookup: after an expiry or
/// a restart, a burst of requests with one key reads the store once, not once per request. An
/// unknown key and a failed lookup are not remembered.
pub(crate) struct KeyCache(moka::future::Cache<String, KeyGrant>);

/// Why a key hash named no tenant.
#[derive(Debug)]
pub(crate) enum KeyMiss {
    Unknown,
    Store(StoreError),
}

impl KeyCache {
    pub(crate) fn new() -> Self {
        KeyCache(
            moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(KEY_CACHE_TTL)
                .build(),
        )
    }

    /// The tenant of the key whose SHA-256 is `hash`, if the key is valid at `now_ms`:
    /// remembered, or found by `lookup` (called only on a miss, and shared by every request
    /// waiting for the same hash meanwhile).
    pub(crate) async fn tenant<F>(
        &self,
        hash: &str,
        now_ms: i64,
        lookup: impl FnOnce() -> F,
    ) -> Result<TenantId, Arc<KeyMiss>>
    where
        F: Future<Output = Result<Option<KeyGrant>, StoreError>>,
    {
        // By reference: the hash is copied into the cache only on a miss, not on every request.
        let grant = self
            .0
            .try_get_with_by_ref(hash, async move {
                match lookup().await {
                    Ok(Some(grant)) => Ok(grant),
                    Ok(None) => Err(KeyMiss::Unknown),
                    Err(e) => Err(KeyMiss::Store(e)),
                }
            })
            .await?;
        if grant.valid_at(now_ms) {
            Ok(grant.tenant)
        } else {
            self.0.invalidate(hash).await;
            Err(Arc::new(KeyMiss::Unknown))
        }
    }

    /// Forgets every key (a revocation names a key by id, and keys are remembered by hash).
    pub(crate) fn forget_all(&self) {
        self.0.invalidate_all();
    }
}

/// The caller's tenant, from its API key.
pub(crate) struct Caller(pub(crate) TenantId);

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Problem> {
        // OpenAI's clients show the reason of a refused key from their own error member.
        let gateway = parts.uri.path() == "/v1/models" || parts.uri.path().starts_with("/v1/chat/");
        Self::authenticate(parts, app).await.map_err(|p| {
            if gateway && p.status == StatusCode::UNAUTHORIZED {
                p.openai("invalid_request_error", "invalid_api_key")
            } else {
                p
            }
        })
    }
}

impl Caller {
    pub(crate) async fn authenticate(parts: &Parts, app: &App) -> Result<Self, Problem> {
        tenant_of_key(app, bearer(parts)?).await.map(Caller)
    }
}

/// The tenant whose API key `key` is (remembered for [`KEY_CACHE_TTL`]); 401 for any other.
pub(crate) async fn tenant_of_key(app: &App, key: &str) -> Result<TenantId, Problem> {
    let hash = sha256_hex(key.as_bytes());
    let now = now_ms();
    app.keys
        .tenant(&hash, now, || app.store.tenant_by_key(&hash, now))
        .await
        .map_err(|miss| match &*miss {
            KeyMiss::Unknown => Problem::new(StatusCode::UNAUTHORIZED, "unknown API key"),
            KeyMiss::Store(e) => store_unavailable(e),
        })
}

/// The key in `Authorization: Bearer <key>`.
pub(crate) fn bearer(parts: &Parts) -> Result<&str, Problem> {
    let unauthorized = |why: &str| Problem::new(StatusCode::UNAUTHORIZED, why);
    parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing `Authorization: Bearer <key>`"))?
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <key>`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of requests with one key the cache does not hold reads the store once; a
    /// remembered key reads it not at all; an unknown key and a failed lookup are never
    /// remembered, so the next request asks again.
    #[tokio::test]
    async fn requests_with_one_unremembered_key_share_one_lookup() {
        let keys = KeyCache::new();
        let lookups = std::sync::atomic::AtomicUsize::new(0);
        let lookup = |answer: Result<Option<KeyGrant>, StoreError>| {
            let lookups = &lookups;
            async move {
                lookups.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                answer
            }
        };
        let count = || lookups.load(std::sync::atomic::Ordering::SeqCst);
        let acme = || {
            Ok(Some(KeyGrant {
                tenant: TenantId::new("acme"),
                expires_ms: None,
            }))
        };
        let burst = (0..50).map(|_| keys.tenant("a", 0, || lookup(acme())));
        for answer in futures_util::future::join_all(burst).await {
            assert_eq!(answer.unwrap(), TenantId::new("acme"));
        }
        assert_eq!(count(), 1, "one lookup for the whole burst");
        assert_eq!(
            keys.tenant("a", 0, || lookup(acme())).await.unwrap(),
            TenantId::new("acme")
        );
        assert_eq!(count(), 1, "remembered");
        for _ in 0..2 {
            let unknown = keys.tenant("b", 0, || lookup(Ok(None))).await;
            assert!(matches!(*unknown.unwrap_err(), KeyMiss::Unknown));
        }
        assert_eq!(count(), 3, "an unknown key is looked up every time");
        let failed = keys
            .tenant("c", 0, || lookup(Err(StoreError::Writer("down".into()))))
            .await;
        assert!(matches!(*failed.unwrap_err(), KeyMiss::Store(_)));
        assert_eq!(
            keys.tenant("c", 0, || lookup(acme())).await.unwrap(),
            TenantId::new("acme")
        );
        assert_eq!(count(), 5, "a failed lookup is not remembered");
        keys.forget_all();
        keys.tenant("a", 0, || lookup(acme())).await.unwrap();
        assert_eq!(count(), 6, "forgotten keys are looked up again");
        // A remembered key that has since expired stops at once, and is forgotten.
        let until_100 = || {
            Ok(Some(KeyGrant {
                tenant: TenantId::new("acme"),
                expires_ms: Some(100),
            }))
        };
        assert!(keys.tenant("d", 99, || lookup(until_100())).await.is_ok());
        let expired = keys.tenant("d", 100, || lookup(until_100())).await;
        assert!(matches!(*expired.unwrap_err(), KeyMiss::Unknown));
        assert_eq!(count(), 7, "remembered until it expired");
        let _ = keys.tenant("d", 100, || lookup(Ok(None))).await;
        assert_eq!(
            count(),
            8,
            "an expired key is forgotten, so the store is asked again"
        );
    }
}
