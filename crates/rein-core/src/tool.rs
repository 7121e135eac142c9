//! The typed result every tool returns, whatever its source.
//!
//! Exceptions, tracebacks and raw HTTP errors never reach the model: a tool failure becomes a
//! [`ToolResult`] with a message the model can act on.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;

/// The longest wait Rein accepts from a `Retry-After` header.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Reads an HTTP `Retry-After` value given in seconds (`"2"`, `"1.5"`), capped at
/// [`MAX_RETRY_AFTER`]. The HTTP-date form is not read: callers fall back to their backoff.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(rein_core::tool::parse_retry_after(" 2 "), Some(Duration::from_secs(2)));
/// assert_eq!(rein_core::tool::parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
/// ```
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let seconds: f64 = value.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0)
        .then(|| Duration::from_secs_f64(seconds.min(MAX_RETRY_AFTER.as_secs_f64())))
}

/// Whether a tool call worked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolStatus {
    /// The call worked; `data` holds the answer.
    Success,
    /// The call failed; `error_type` and `message` say how.
    Error,
}

/// The class of a failure, which decides whether trying again can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// Timeouts, resets, 5xx: the same call may work later.
    Transient,
    /// Bad arguments, unknown tool, 4xx: the same call will fail again.
    Permanent,
    /// Throttled: the same call may work after the advised wait.
    RateLimit,
}

impl ErrorType {
    /// The name used in the log, metrics and traces (`transient`, `permanent`, `rate_limit`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::Transient => "transient",
            ErrorType::Permanent => "permanent",
            ErrorType::RateLimit => "rate_limit",
        }
    }
}

/// The outcome of one tool call, as recorded in the event log and shown to the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolResult {
    /// Success or error.
    pub status: ToolStatus,
    /// The tool's answer (null on error).
    #[serde(default)]
    pub data: Value,
    /// For errors: the class of failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<ErrorType>,
    /// For errors: whether repeating the same call is safe and may help.
    #[serde(default)]
    pub retry_safe: bool,
    /// For errors: what went wrong, phrased for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// For rate limits: how long the tool asked us to wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl ToolResult {
    /// A successful result.
    pub fn success(data: Value) -> Self {
        ToolResult {
            status: ToolStatus::Success,
            data,
            error_type: None,
            retry_safe: false,
            message: None,
            retry_after_ms: None,
        }
    }

    /// A failure. `retry_safe` follows the class: transient and rate-limit errors are safe to
    /// repeat, permanent ones are not.
    pub fn error(error_type: ErrorType, message: impl Into<String>) -> Self {
        ToolResult {
            status: ToolStatus::Error,
            data: Value::Null,
            error_type: Some(error_type),
            retry_safe: !matches!(error_type, ErrorType::Permanent),
            message: Some(message.into()),
            retry_after_ms: None,
        }
    }

    /// Whether the call worked.
    pub fn is_success(&self) -> bool {
        self.status == ToolStatus::Success
    }

    /// The result as the model reads it: compact JSON without transport details.
    pub fn to_model_text(&self) -> String {
        let mut out = serde_json::Map::new();
        match self.status {
            ToolStatus::Success => {
                out.insert("status".into(), "success".into());
                out.insert("data".into(), self.data.clone());
            }
            ToolStatus::Error => {
                out.insert("status".into(), "error".into());
                if let Some(kind) = self.error_type {
                    out.insert(
                        "error_type".into(),
                        serde_json::to_value(kind).unwrap_or_default(),
                    );
                }
                out.insert("retry_safe".into(), self.retry_safe.into());
                if let Some(message) = &self.message {
                    out.insert("message".into(), message.clone().into());
                }
            }
        }
        Value::Object(out).to_string()
    }
}
