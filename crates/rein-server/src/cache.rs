//! The gateway's exact-match response cache (`[gateway] cache_ttl`; off by default).
//!
//! A call identical to an earlier one of the same tenant (same model, messages, tools,
//! `max_tokens`, temperature and tool choice) within the TTL is answered with the earlier
//! answer, without calling the provider. It is still a run, governed and recorded like any
//! gateway call (a rate limit or an exhausted budget still refuses it), but its
//! `model_responded` says `cached` and it costs nothing. The key covers the tenant, so one
//! tenant's answers are never served to another. `Cache-Control: no-cache` on a request skips
//! the lookup (the fresh answer is still kept); `no-store` skips both.
//!
//! The cache sits in front of the provider as a [`Model`], so each attempt of each model in the
//! fallback chain is looked up under its own model's name.

use axum::http::{HeaderMap, header};
use rein_app::config::GatewayCache;
use rein_core::event::sha256_hex;
use rein_core::{ModelReply, TenantId, Usage};
use rein_providers::{BoxFuture, Model, ModelError, ModelRequest, TokenSink};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The cached answers, by key; `None` when the cache is off.
pub(super) struct ResponseCache(Option<moka::sync::Cache<String, Arc<ModelReply>>>);

impl ResponseCache {
    pub(super) fn new(config: Option<GatewayCache>) -> Self {
        ResponseCache(config.map(|c| {
            moka::sync::Cache::builder()
                .time_to_live(c.ttl)
                .max_capacity(c.max_bytes)
                .weigher(|key: &String, reply: &Arc<ModelReply>| {
                    let calls: usize = reply
                        .tool_calls
                        .iter()
                        .map(|c| c.name.len() + c.id.len() + c.arguments.len())
                        .sum();
                    let bytes = key.len()
                        + reply.model.len()
                        + reply.content.as_ref().map_or(0, String::len)
                        + calls
                        + 128;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .build()
        }))
    }

    /// Whether the cache is on.
    pub(super) fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// `inner` behind this cache, for one call of `tenant`: `inner` itself, in effect, when the
    /// cache is off or the request said `Cache-Control: no-store`.
    pub(super) fn front<'a>(
        &'a self,
        inner: &'a dyn Model,
        tenant: &'a TenantId,
        directives: Directives,
        hit: &'a AtomicBool,
    ) -> CachedModel<'a> {
        CachedModel {
            inner,
            cache: self.0.as_ref().filter(|_| !directives.no_store),
            tenant,
            read: !directives.no_cache,
            hit,
        }
    }
}

/// What a request's `Cache-Control` allows.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Directives {
    /// `no-cache`: do not answer from the cache.
    no_cache: bool,
    /// `no-store`: neither answer from the cache nor keep the answer.
    no_store: bool,
}

impl Directives {
    pub(super) fn of(headers: &HeaderMap) -> Self {
        let mut directives = Directives::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            for token in value.to_str().unwrap_or("").split(',') {
                match token.trim().to_ascii_lowercase().as_str() {
                    "no-cache" => directives.no_cache = true,
                    "no-store" => directives.no_store = true,
                    _ => {}
                }
            }
        }
        directives
    }
}

/// The provider behind the cache, for one call.
pub(super) struct CachedModel<'a> {
    inner: &'a dyn Model,
    /// `None`: every call goes to `inner`, and nothing is kept.
    cache: Option<&'a moka::sync::Cache<String, Arc<ModelReply>>>,
    tenant: &'a TenantId,
    read: bool,
    /// Set when the answer came from the cache.
    hit: &'a AtomicBool,
}

impl CachedModel<'_> {
    fn lookup(&self, key: &str) -> Option<ModelReply> {
        let cached = self.cache.filter(|_| self.read)?.get(key)?;
        self.hit.store(true, Ordering::Relaxed);
        Some(ModelReply {
            usage: Usage::default(),
            cached: true,
            ..(*cached).clone()
        })
    }

    fn keep(&self, key: String, reply: &Result<ModelReply, ModelError>) {
        if let (Some(cache), Ok(reply)) = (self.cache, reply) {
            cache.insert(key, Arc::new(reply.clone()));
        }
    }
}

/// The cache key: the tenant and everything sent to the model, hashed.
fn key(tenant: &TenantId, request: &ModelRequest<'_>) -> String {
    let canonical = json!({
        "tenant": tenant,
        "model": request.model,
        "messages": request.messages,
        "tools": request.tools,
        "max_output_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "tool_choice": request.tool_choice,
        "output_schema": request.output_schema,
        "endpoint": request.endpoint.map(|e| e.base_url),
    });
    sha256_hex(canonical.to_string().as_bytes())
}

impl Model for CachedModel<'_> {
    fn complete<'a>(
        &'a self,
        request: ModelRequest<'a>,
    ) -> BoxFuture<'a, Result<ModelReply, ModelError>> {
        Box::pin(async move {
            if self.cache.is_none() {
                return self.inner.complete(request).await;
            }
            let key = key(self.tenant, &request);
            if let Some(reply) = self.lookup(&key) {
                return Ok(reply);
            }
            let reply = self.inner.complete(request).await;
            self.keep(key, &reply);
            reply
        })
    }

    fn complete_streaming<'a>(
        &'a self,
        request: ModelRequest<'a>,
        sink: &'a TokenSink,
    ) -> BoxFuture<'a, Result<ModelReply, ModelError>> {
        Box::pin(async move {
            if self.cache.is_none() {
                return self.inner.complete_streaming(request, sink).await;
            }
            let key = key(self.tenant, &request);
            if let Some(reply) = self.lookup(&key) {
                if let Some(text) = &reply.content {
                    sink(text);
                }
                return Ok(reply);
            }
            let reply = self.inner.complete_streaming(request, sink).await;
            self.keep(key, &reply);
            reply
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use rein_core::{Message, Role};

    fn request<'a>(model: &'a str, messages: &'a [Message]) -> ModelRequest<'a> {
        ModelRequest {
            model,
            messages,
            tools: &[],
            max_output_tokens: 100,
            temperature: None,
            output_schema: None,
            tool_choice: None,
            endpoint: None,
        }
    }

    #[test]
    fn the_key_covers_the_tenant_the_model_and_the_conversation() {
        let hi = [Message::text(Role::User, "hi")];
        let ho = [Message::text(Role::User, "ho")];
        let (a, b) = (TenantId::new("a"), TenantId::new("b"));
        let base = key(&a, &request("openai/m", &hi));
        assert_eq!(base, key(&a, &request("openai/m", &hi)));
        assert_ne!(base, key(&b, &request("openai/m", &hi)));
        assert_ne!(base, key(&a, &request("openai/n", &hi)));
        assert_ne!(base, key(&a, &request("openai/m", &ho)));
        let hotter = ModelRequest {
            temperature: Some(0.7),
            ..request("openai/m", &hi)
        };
        assert_ne!(base, key(&a, &hotter));
    }

    #[test]
    fn cache_control_is_read_per_directive() {
        let mut headers = HeaderMap::new();
        assert_eq!(Directives::of(&headers), Directives::default());
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=0, No-Cache"),
        );
        assert_eq!(
            Directives::of(&headers),
            Directives {
                no_cache: true,
                no_store: false
            }
        );
        headers.append(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        assert!(Directives::of(&headers).no_store);
    }
}
