//! Model providers for Rein, behind one [`Model`] trait.
//!
//! - [`OpenAiClient`]: OpenAI Chat Completions and any compatible server (vLLM, Ollama,
//!   llama.cpp) by base URL.
//! - [`ScriptedModel`]: replays responses from a YAML file through the same code path, for
//!   deterministic tests and the offline demo.
//!
//! A provider makes exactly one attempt per call and classifies its failure
//! ([`ModelError::kind`]); retries, timeouts and limits belong to the driver and the engine.
//! API keys come from the environment only and never appear in errors or `Debug` output.
//! This crate depends on the core only.

mod anthropic;
mod openai;
mod scripted;

pub use anthropic::{ANTHROPIC_BASE_URL, AnthropicClient};
pub use openai::{DEFAULT_BASE_URL, OpenAiClient};
pub use scripted::{ScriptError, ScriptedModel};

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
}

impl ModelError {
    /// A classified failure.
    pub fn new(kind: ErrorType, message: impl Into<String>) -> Self {
        ModelError {
            kind,
            message: message.into(),
            retry_after: None,
        }
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

/// Sends each call to the provider its model names (`openai/...`, `anthropic/...`).
#[derive(Clone, Debug)]
pub struct ProviderRouter {
    /// For `openai/...` models.
    pub openai: OpenAiClient,
    /// For `anthropic/...` models.
    pub anthropic: AnthropicClient,
}

impl Model for ProviderRouter {
    fn complete<'a>(
        &'a self,
        request: ModelRequest<'a>,
    ) -> BoxFuture<'a, Result<ModelReply, ModelError>> {
        match request.model.split_once('/').map(|(p, _)| p) {
            Some("anthropic") => self.anthropic.complete(request),
            Some("openai") | None => self.openai.complete(request),
            Some(other) => {
                let message = format!("provider `{other}` is not supported");
                Box::pin(async move { Err(ModelError::new(ErrorType::Permanent, message)) })
            }
        }
    }

    fn complete_streaming<'a>(
        &'a self,
        request: ModelRequest<'a>,
        sink: &'a TokenSink,
    ) -> BoxFuture<'a, Result<ModelReply, ModelError>> {
        match request.model.split_once('/').map(|(p, _)| p) {
            Some("anthropic") => self.anthropic.complete_streaming(request, sink),
            Some("openai") | None => self.openai.complete_streaming(request, sink),
            Some(_) => self.complete(request),
        }
    }
}
