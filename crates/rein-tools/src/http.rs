//! HTTP tools: a URL template, a method, a JSON body; the answer classified into a ToolResult.
//!
//! 2xx → success; 429 → `rate_limit` with the advised wait; 408, 5xx, timeouts and connection
//! failures → `transient` (safe to retry); any other 4xx → `permanent`.

use crate::{Egress, Reach};
use rein_core::egress::EgressRefusal;
use rein_core::spec::{HttpMethod, HttpSource, url_placeholders};
use rein_core::tool::parse_retry_after;
use rein_core::trust::expand_secrets;
use rein_core::{ErrorType, ToolResult};
use serde_json::Value;
use std::time::Duration;

/// Largest response body accepted from a tool.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Calls HTTP tools: the operator's over one shared connection pool, tenants' through the
/// egress policy's.
#[derive(Clone, Debug)]
pub struct HttpTools {
    client: reqwest::Client,
    egress: Egress,
}

/// An HTTP tool's call, as made: its result, and the egress policy's refusal when that is why
/// it failed.
pub type HttpCall = (ToolResult, Option<EgressRefusal>);

impl HttpTools {
    /// Uses `client` for the operator's tools and `egress` for tenants' (configure connect
    /// timeouts there; per-call timeouts come from the tool's contract and are applied by the
    /// driver).
    pub fn new(client: reqwest::Client, egress: Egress) -> Self {
        HttpTools { client, egress }
    }

    /// The client and policy tenants' calls go through.
    pub fn egress(&self) -> &Egress {
        &self.egress
    }

    /// Calls one HTTP tool once, reaching what `reach` allows.
    pub async fn call(
        &self,
        tool: &str,
        source: &HttpSource,
        args: &Value,
        idempotency_key: &str,
        traceparent: &str,
        reach: Reach<'_>,
    ) -> HttpCall {
        let (url, rest) = fill_url(&source.url, args);
        let method = match source.method {
            HttpMethod::Get => reqwest::Method::GET,
            HttpMethod::Post => reqwest::Method::POST,
            HttpMethod::Put => reqwest::Method::PUT,
            HttpMethod::Patch => reqwest::Method::PATCH,
            HttpMethod::Delete => reqwest::Method::DELETE,
        };
        let with_body = matches!(
            source.method,
            HttpMethod::Post | HttpMethod::Put | HttpMethod::Patch
        );
        let url = if with_body {
            url
        } else {
            with_query(url, &rest)
        };
        let client = match reach {
            Reach::Operator => &self.client,
            Reach::Tenant(_) => {
                if let Err(refusal) = self.egress.check_url(&url) {
                    return refused(tool, refusal);
                }
                self.egress.client()
            }
        };
        let mut request = client
            .request(method, &url)
            .header("Idempotency-Key", idempotency_key)
            .header("traceparent", traceparent)
            .header("Accept", "application/json");
        for (name, template) in &source.headers {
            match expand_secrets(template, |var| reach.secret(var)) {
                Ok(value) => request = request.header(name.as_str(), value),
                Err(var) => {
                    let missing = match reach {
                        Reach::Operator => {
                            format!("the environment variable `{var}`, which is not set")
                        }
                        Reach::Tenant(_) => format!(
                            "the secret `{var}`, which the operator has not set for this tenant"
                        ),
                    };
                    return (
                        ToolResult::error(
                            ErrorType::Permanent,
                            format!(
                                "`{tool}` is not configured: its header `{name}` needs {missing}"
                            ),
                        ),
                        None,
                    );
                }
            }
        }
        if with_body {
            request = request.json(args);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                return match EgressRefusal::behind(&e) {
                    Some(refusal) => refused(tool, refusal),
                    None => (transport_error(tool, &e), None),
                };
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after)
            .map(|wait| u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        let body = match read_limited(response).await {
            Ok(body) => body,
            Err(message) => {
                return (
                    ToolResult::error(ErrorType::Transient, format!("`{tool}`: {message}")),
                    None,
                );
            }
        };
        (
            classify(
                tool,
                status.as_u16(),
                status.canonical_reason(),
                &body,
                retry_after,
            ),
            None,
        )
    }
}

/// A call the egress policy refused: a permanent error the model can read (the same call
/// will be refused again), with the refusal for the log.
fn refused(tool: &str, refusal: EgressRefusal) -> HttpCall {
    (
        ToolResult::error(
            ErrorType::Permanent,
            format!("`{tool}` may not be called: {refusal}."),
        ),
        Some(refusal),
    )
}

fn classify(
    tool: &str,
    status: u16,
    reason: Option<&str>,
    body: &[u8],
    retry_after_ms: Option<u64>,
) -> ToolResult {
    let reason = reason.unwrap_or("");
    if (200..300).contains(&status) {
        let data = serde_json::from_slice(body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
        return ToolResult::success(data);
    }
    let hint = service_message(body)
        .map(|m| format!(" The service said: {m}"))
        .unwrap_or_default();
    match status {
        429 => {
            let mut r = ToolResult::error(
                ErrorType::RateLimit,
                format!("`{tool}` is rate limited (HTTP 429); wait before calling it again.{hint}"),
            );
            r.retry_after_ms = retry_after_ms;
            r
        }
        408 | 500..=599 => ToolResult::error(
            ErrorType::Transient,
            format!(
                "`{tool}` failed on the service's side (HTTP {status} {reason}); the same call may work later.{hint}"
            ),
        ),
        _ => ToolResult::error(
            ErrorType::Permanent,
            format!(
                "`{tool}` refused the request (HTTP {status} {reason}); calling it again with the same arguments will fail the same way.{hint}"
            ),
        ),
    }
}

/// A short, model-safe message from a JSON error body (`error` or `message`), if there is one.
fn service_message(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let text = ["message", "error", "detail"].iter().find_map(|k| {
        value.get(k).and_then(|v| {
            v.as_str()
                .or_else(|| v.get("message").and_then(Value::as_str))
        })
    })?;
    Some(text.chars().take(200).collect())
}

fn transport_error(tool: &str, e: &reqwest::Error) -> ToolResult {
    let what = if e.is_timeout() {
        "did not answer in time"
    } else if e.is_connect() {
        "could not be reached"
    } else {
        "broke off the connection"
    };
    ToolResult::error(
        ErrorType::Transient,
        format!("`{tool}` {what}; the same call may work later."),
    )
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(format!(
                        "the response is larger than {} KiB",
                        MAX_BODY_BYTES / 1024
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(_) => return Err("the response broke off before it was complete".into()),
        }
    }
}

/// Fills `{name}` placeholders with percent-encoded argument values; returns the URL and the
/// arguments not used in it.
fn fill_url(template: &str, args: &Value) -> (String, Vec<(String, String)>) {
    let used = url_placeholders(template);
    let mut url = template.to_string();
    for name in &used {
        let value = args.get(*name).map(scalar_text).unwrap_or_default();
        url = url.replace(&format!("{{{name}}}"), &encode(&value));
    }
    let rest = match args {
        Value::Object(map) => map
            .iter()
            .filter(|(k, _)| !used.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), scalar_text(v)))
            .collect(),
        _ => Vec::new(),
    };
    (url, rest)
}

fn with_query(mut url: String, params: &[(String, String)]) -> String {
    for (i, (k, v)) in params.iter().enumerate() {
        url.push(if i == 0 && !url.contains('?') {
            '?'
        } else {
            '&'
        });
        url.push_str(&encode(k));
        url.push('=');
        url.push_str(&encode(v));
    }
    url
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so an argument can never
/// add a path segment or a query parameter of its own.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// How long to wait for a TCP connection to a tool's service.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arguments_cannot_escape_their_path_segment() {
        let (url, rest) = fill_url(
            "http://h/orders/{id}",
            &json!({"id": "1/../admin?x=1", "verbose": true}),
        );
        assert_eq!(url, "http://h/orders/1%2F..%2Fadmin%3Fx%3D1");
        assert_eq!(
            with_query(url, &rest),
            "http://h/orders/1%2F..%2Fadmin%3Fx%3D1?verbose=true"
        );
    }

    #[test]
    fn statuses_are_classified() {
        assert!(classify("t", 200, None, br#"{"a":1}"#, None).is_success());
        let r = classify("t", 429, None, b"", Some(2000));
        assert_eq!(
            (r.error_type, r.retry_after_ms, r.retry_safe),
            (Some(ErrorType::RateLimit), Some(2000), true)
        );
        assert_eq!(
            classify("t", 503, None, b"", None).error_type,
            Some(ErrorType::Transient)
        );
        let r = classify(
            "t",
            404,
            Some("Not Found"),
            br#"{"error":"no order 9"}"#,
            None,
        );
        assert_eq!(
            (r.error_type, r.retry_safe),
            (Some(ErrorType::Permanent), false)
        );
        assert!(r.message.unwrap().contains("The service said: no order 9"));
    }
}
