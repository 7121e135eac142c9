//! What every provider's HTTP exchange shares: reading a bounded body, and classifying what
//! went wrong (the status, the transport, or a failure after a 2xx, which is never retried).

use crate::ModelError;
use rein_core::ErrorType;
use rein_core::tool::parse_retry_after;
use serde_json::Value;

/// Largest response body accepted from a provider.
pub(crate) const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// The classified error of a provider's non-2xx answer, with the wait it advised.
pub(crate) async fn error_from(response: reqwest::Response) -> ModelError {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let bytes = read_limited(response).await.unwrap_or_default();
    let mut error = classify_status(status, &bytes);
    error.retry_after = retry_after;
    error
}

/// A failure after a 2xx. The call has probably been billed by then, so it is never retried:
/// one step can never be paid for several times over.
pub(crate) fn billed(what: impl std::fmt::Display) -> ModelError {
    ModelError::new(
        ErrorType::Permanent,
        format!("{what}; not retried because the call may already have been billed"),
    )
}

pub(crate) fn transport_error(e: reqwest::Error) -> ModelError {
    if let Some(refusal) = rein_core::egress::EgressRefusal::behind(&e) {
        return ModelError::refused(refusal);
    }
    let what = if e.is_timeout() {
        "the provider did not answer in time"
    } else if e.is_connect() {
        "the provider could not be reached"
    } else {
        "the connection to the provider broke off"
    };
    ModelError::new(ErrorType::Transient, what)
}

pub(crate) async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, ModelError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(ModelError::new(
                ErrorType::Transient,
                "the provider's response was too large",
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Classifies an HTTP error from a provider: 429 → rate limit; 408, 409, 5xx and 529
/// (overloaded) → transient; anything else (auth, bad request, context length) → permanent.
pub(crate) fn classify_status(status: u16, body: &[u8]) -> ModelError {
    let detail = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(|s| s.chars().take(300).collect::<String>())
        })
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    let kind = match status {
        429 => ErrorType::RateLimit,
        408 | 409 | 500..=599 => ErrorType::Transient,
        _ => ErrorType::Permanent,
    };
    let what = match status {
        401 | 403 => "the provider refused the API key (check OPENAI_API_KEY)".to_string(),
        429 => "the provider is rate limiting requests".to_string(),
        _ => format!("the provider answered HTTP {status}"),
    };
    ModelError::new(kind, format!("{what}{detail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        assert_eq!(classify_status(429, b"").kind, ErrorType::RateLimit);
        assert_eq!(classify_status(503, b"").kind, ErrorType::Transient);
        assert_eq!(classify_status(529, b"").kind, ErrorType::Transient);
        let e = classify_status(400, br#"{"error":{"message":"context_length_exceeded"}}"#);
        assert_eq!(e.kind, ErrorType::Permanent);
        assert!(e.message.contains("context_length_exceeded"));
    }
}
