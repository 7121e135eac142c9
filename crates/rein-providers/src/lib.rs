//! Model providers for Rein, behind one [`Model`] trait.
//!
//! - [`OpenAiClient`]: OpenAI Chat Completions and any compatible server (vLLM, Ollama,
//!   llama.cpp) by base URL.
//! - [`AnthropicClient`]: Anthropic Messages, with prompt caching.
//! - [`PROVIDERS`]: the providers these adapters serve, by name, with their key variables: what
//!   a spec may name, passed to the core's spec check.
//! - [`ScriptedModel`]: replays responses from a YAML file through the same code path, for
//!   deterministic tests and the offline demo.
//!
//! A provider makes exactly one attempt per call and classifies its failure
//! ([`ModelError::kind`]); retries, timeouts and limits belong to the driver and the engine.
//! API keys come from the environment only and never appear in errors or `Debug` output.
//! This crate depends on the core only.

mod anthropic;
mod exchange;
mod openai;
mod scripted;
mod sse;

pub use anthropic::{ANTHROPIC_BASE_URL, AnthropicClient};
pub use openai::{DEFAULT_BASE_URL, OpenAiClient};
pub use scripted::{ScriptError, ScriptedModel};

/// The providers this crate's adapters serve, by the name a spec writes before the slash, each
/// with the variable holding the operator's key ([`ProviderRouter::from_env`] reads them).
pub const PROVIDERS: &[rein_core::spec::ProviderInfo] = &[
    rein_core::spec::ProviderInfo {
        name: "openai",
        key_env: "OPENAI_API_KEY",
    },
    rein_core::spec::ProviderInfo {
        name: "anthropic",
        key_env: "ANTHROPIC_API_KEY",
    },
];

use rein_core::{ErrorType, Message, ModelReply, ToolDefinition};
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One model call.
#[derive(Clone, Copy, Debug)]
pub struct ModelRequest<'a> {
    /// The model as the provider names it (without the `provider/` prefix).
    pub model: &'a str,
    /// The conversation.
    pub messages: &'a [Message],
    /// Tools the model may call.
    pub tools: &'a [ToolDefinition],
    /// Output token cap.
    pub max_output_tokens: u32,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// JSON Schema the final answer must match, if any.
    pub output_schema: Option<&'a Value>,
    /// Whether and which tool the model must call.
    pub tool_choice: Option<&'a rein_core::spec::ToolChoice>,
    /// A compatible server to call instead of the provider's configured endpoint, with its
    /// own key (a spec's map-form model entry).
    pub endpoint: Option<Endpoint<'a>>,
}

/// A compatible server named by a spec.
#[derive(Clone, Copy)]
pub struct Endpoint<'a> {
    /// Base URL (for `openai`, up to and including `/v1`; for `anthropic`, without it).
    pub base_url: &'a str,
    /// The key sent to this URL only: the entry's `api_key_env`, looked up by the driver when
    /// the call is made (in the environment for the operator's specs, in the tenant's secrets
    /// for a tenant's), so a rotated key is picked up without a restart.
    pub api_key: Option<&'a str>,
    /// The client to reach it through: for a tenant's spec, the egress policy's; `None`: the
    /// router's own.
    pub http: Option<&'a reqwest::Client>,
}

impl std::fmt::Debug for Endpoint<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.map(|_| "<redacted>"))
            .field("guarded", &self.http.is_some())
            .finish()
    }
}

/// A failed model call, classified.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ModelError {
    /// Whether trying again can help.
    pub kind: ErrorType,
    /// What went wrong (never a key, never a raw body).
    pub message: String,
    /// How long the provider asked us to wait.
    pub retry_after: Option<Duration>,
    /// The egress policy's refusal, when that is why the call failed (a tenant's model server
    /// at a closed address).
    pub egress: Option<rein_core::egress::EgressRefusal>,
}

impl ModelError {
    /// A classified failure.
    pub fn new(kind: ErrorType, message: impl Into<String>) -> Self {
        ModelError {
            kind,
            message: message.into(),
            retry_after: None,
            egress: None,
        }
    }

    /// A call the egress policy refused: the same call is refused again, so not worth a retry.
    pub fn refused(refusal: rein_core::egress::EgressRefusal) -> Self {
        let mut refused = ModelError::new(
            ErrorType::Permanent,
            format!("the model's server may not be reached: {refusal}"),
        );
        refused.egress = Some(refusal);
        refused
    }

    /// Whether the same call may work if made again.
    pub fn is_retryable(&self) -> bool {
        !matches!(self.kind, ErrorType::Permanent)
    }
}

/// Receives the text of an answer piece by piece, as the provider sends it.
pub type TokenSink = dyn Fn(&str) + Send + Sync;

/// A chat model.
pub trait Model: Send + Sync {
    /// Makes one attempt at `request`.
    fn complete<'a>(
        &'a self,
        request: ModelRequest<'a>,
    ) -> BoxFuture<'a, Result<ModelReply, ModelError>>;

    /// Makes one attempt at `request`, handing the answer's text to `sink` as it arrives.
    /// Providers that cannot stream hand it over whole when the answer is complete.
    fn complete_streaming<'a>(
        &'a self,
        request: ModelRequest<'a>,
        sink: &'a TokenSink,
    ) -> BoxFuture<'a, Result<ModelReply, ModelError>> {
        Box::pin(async move {
            let reply = self.complete(request).await?;
            if let Some(text) = &reply.content {
                sink(text);
            }
            Ok(reply)
        })
    }
}

/// Sends each call to the provider its model names (`openai/...`, `anthropic/...`): to the
/// operator's configured endpoint, or to the compatible server a spec's map-form entry names
/// (with that entry's own key, never the operator's).
#[derive(Clone, Debug)]
pub struct ProviderRouter {
    /// For `openai/...` models.
    pub openai: OpenAiClient,
    /// For `anthropic/...` models.
    pub anthropic: AnthropicClient,
}

/// The client one call goes through.
enum Routed<'a> {
    OpenAi(std::borrow::Cow<'a, OpenAiClient>),
    Anthropic(std::borrow::Cow<'a, AnthropicClient>),
    Unsupported(String),
}

impl ProviderRouter {
    /// Both providers configured from the environment, as their official SDKs are.
    pub fn from_env(http: reqwest::Client) -> Self {
        ProviderRouter {
            openai: OpenAiClient::from_env(http.clone()),
            anthropic: AnthropicClient::from_env(http),
        }
    }

    fn route<'a>(&'a self, request: &ModelRequest<'_>) -> Routed<'a> {
        use std::borrow::Cow;
        let provider = request.model.split_once('/').map(|(p, _)| p);
        match (provider, request.endpoint) {
            (Some("anthropic"), None) => Routed::Anthropic(Cow::Borrowed(&self.anthropic)),
            (Some("anthropic"), Some(e)) => Routed::Anthropic(Cow::Owned(AnthropicClient::new(
                e.http.unwrap_or(self.anthropic.http()).clone(),
                e.base_url,
                e.api_key.map(str::to_string),
            ))),
            (Some("openai") | None, None) => Routed::OpenAi(Cow::Borrowed(&self.openai)),
            (Some("openai") | None, Some(e)) => Routed::OpenAi(Cow::Owned(OpenAiClient::new(
                e.http.unwrap_or(self.openai.http()).clone(),
                e.base_url,
                e.api_key.map(str::to_string),
            ))),
            (Some(other), _) => Routed::Unsupported(format!("provider `{other}` is not supported")),
        }
    }
}

impl Model for ProviderRouter {
    fn complete<'a>(
        &'a self,
        request: ModelRequest<'a>,
    ) -> BoxFuture<'a, Result<ModelReply, ModelError>> {
        let routed = self.route(&request);
        Box::pin(async move {
            match routed {
                Routed::OpenAi(c) => c.complete(request).await,
                Routed::Anthropic(c) => c.complete(request).await,
                Routed::Unsupported(message) => Err(ModelError::new(ErrorType::Permanent, message)),
            }
        })
    }

    fn complete_streaming<'a>(
        &'a self,
        request: ModelRequest<'a>,
        sink: &'a TokenSink,
    ) -> BoxFuture<'a, Result<ModelReply, ModelError>> {
        let routed = self.route(&request);
        Box::pin(async move {
            match routed {
                Routed::OpenAi(c) => c.complete_streaming(request, sink).await,
                Routed::Anthropic(c) => c.complete_streaming(request, sink).await,
                Routed::Unsupported(message) => Err(ModelError::new(ErrorType::Permanent, message)),
            }
        })
    }
}
