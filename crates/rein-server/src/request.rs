//! What every request goes through: strict JSON bodies, length limits, the request id and the
//! time limit.

use crate::connections;
use crate::problem::{Problem, REQUEST_ID};
use crate::{App, MAX_WAIT};
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::sync::Arc;

/// Parses a JSON body strictly: the content type, the size (by the body limit), the syntax,
/// the types and unknown fields each get their own 4xx.
pub(crate) fn json_body<T: for<'de> Deserialize<'de>>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, Problem> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
    if !is_json {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be JSON, sent with `Content-Type: application/json`",
        ));
    }
    let body = body.map_err(|e| connections::unread_body(&e))?;
    if nesting(&body) > MAX_JSON_DEPTH {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            format!("the JSON body is nested deeper than {MAX_JSON_DEPTH} levels"),
        ));
    }
    if escapes_nul(&body) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the body's text contains a NUL character (\\u0000), which Rein does not store; remove it",
        ));
    }
    serde_json::from_slice(&body).map_err(|e| {
        let status = match e.classify() {
            serde_json::error::Category::Data => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        Problem::new(status, format!("invalid JSON body: {e}"))
    })
}

/// Whether JSON text writes a NUL character (`\u0000`, the only way JSON can carry one).
/// PostgreSQL's text cannot hold it, so it is refused on both engines alike, before anything is
/// stored. A `\u0000` after an escaped backslash (`\\u0000`) is text, not a NUL.
pub(crate) fn escapes_nul(json: &[u8]) -> bool {
    let mut backslashes = 0usize;
    for (i, &b) in json.iter().enumerate() {
        if b == b'\\' {
            backslashes += 1;
            continue;
        }
        if backslashes % 2 == 1 && json[i..].starts_with(b"u0000") {
            return true;
        }
        backslashes = 0;
    }
    false
}

/// The caller's W3C `traceparent` header, when it is a valid one (an invalid one is ignored,
/// as the W3C rules ask: the run then starts a trace of its own).
pub(crate) fn trace_parent(headers: &HeaderMap) -> Option<String> {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|t| rein_core::spans::parse_traceparent(t).is_some())
        .map(str::to_string)
}

/// The deepest JSON nesting accepted in a request body.
pub(crate) const MAX_JSON_DEPTH: usize = 32;

/// How deeply `json` nests arrays and objects (strings skipped), without parsing it.
pub(crate) fn nesting(json: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// The header naming a request, for a client to quote and an operator to find in the logs.
pub(crate) const REQUEST_ID_HEADER: &str = "x-request-id";

/// Names every request: the client's `X-Request-Id` when it is a plain token (1 to 128 letters,
/// digits, `-`, `_`, `.` or `:`, so it cannot forge a log line), else a new UUIDv7. Every log line
/// written while the request is handled carries it (in its `request` span), and the answer
/// gives it back in `X-Request-Id`, errors included (and a problem+json body as `request_id`).
pub(crate) async fn request_id(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            (1..=128).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_string);
    let id = given.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let value = HeaderValue::from_str(&id).ok();
    if let Some(value) = &value {
        request
            .headers_mut()
            .insert(REQUEST_ID_HEADER, value.clone());
    }
    let span = tracing::info_span!("request", request_id = %id);
    let answer = tracing::Instrument::instrument(next.run(request), span);
    let mut response = REQUEST_ID.scope(id, answer).await;
    if let Some(value) = value {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// Bounds each request's time (`[server] request_timeout`), so a slow client or a stuck store
/// cannot hold a connection and its task for ever. What waits on a model by design gets its own
/// bound on top: a `wait: true` run its `timeout_ms` (at most [`MAX_WAIT`]), an approval that
/// drives its run on [`MAX_WAIT`], a gateway call `[gateway] timeout`. An event stream is bounded only until it starts: its body is live.
pub(crate) async fn time_limit(
    State(app): State<Arc<App>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let base = app.config.server.request_timeout;
    let path = request.uri().path();
    let limit = match (request.method(), path) {
        (&axum::http::Method::POST, "/v1/runs") => base + MAX_WAIT,
        (&axum::http::Method::POST, "/v1/chat/completions") => base + app.config.gateway.timeout,
        // A decision drives the run to its next stop, model calls included.
        (&axum::http::Method::POST, p)
            if (p.starts_with("/v1/runs/") || p.starts_with("/ui/runs/"))
                && p.ends_with("/approval") =>
        {
            base + MAX_WAIT
        }
        _ => base,
    };
    // PostgreSQL's text cannot hold a NUL: one in the URL (an id, a filter) is refused before it
    // reaches the store, on both engines alike.
    if request
        .uri()
        .path_and_query()
        .is_some_and(|p| p.as_str().contains("%00"))
    {
        return Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the URL contains a NUL character (%00), which Rein does not store; remove it",
        )
        .into_response();
    }
    // The body is due within its own time: a client that declares a body and never sends it
    // is cut off at `body_timeout`, not at the request's (possibly long) limit.
    let request = connections::Deadline::on(request, app.config.server.body_timeout);
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the request took longer than {}s (`[server] request_timeout`) and was stopped; a change it was making may or may not have been saved, so look before retrying",
                limit.as_secs()
            ),
        )
        .into_response(),
    }
}

/// The longest id or name accepted in a request.
pub(crate) const MAX_ID_LEN: usize = 256;
/// The longest run input accepted.
pub(crate) const MAX_INPUT_LEN: usize = 256 * 1024;

pub(crate) fn check_len(field: &str, value: &str, max: usize) -> Result<(), Problem> {
    if value.len() > max {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "`{field}` is {} bytes long; at most {max} are accepted",
                value.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nul_is_found_only_where_json_escapes_one() {
        assert!(escapes_nul(br#"{"input": "a\u0000b"}"#));
        assert!(escapes_nul(br#"{"input": "\\\u0000"}"#));
        assert!(!escapes_nul(br#"{"input": "a\\u0000b"}"#));
        assert!(!escapes_nul(br#"{"input": "a\u0001b u0000"}"#));
    }

    #[test]
    fn nesting_counts_brackets_outside_strings() {
        assert_eq!(nesting(br#"{"a": [1, {"b": "[[[{{"}]}"#), 3);
        assert_eq!(nesting(br#"{"a": "\"[["}"#), 1);
        assert_eq!(nesting(b"7"), 0);
    }
}
