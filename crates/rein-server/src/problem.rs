//! Errors as RFC 9457 `application/problem+json` answers (with an OpenAI-style `error` member
//! where the gateway's clients read one).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rein_store::StoreError;
use serde_json::json;

tokio::task_local! {
    /// The id of the request this task is answering ([`request_id`]), which problem+json
    /// bodies repeat.
    pub(crate) static REQUEST_ID: String;
}

/// An RFC 9457 problem: a status and a reason a person can act on.
#[derive(Debug)]
pub struct Problem {
    pub(crate) status: StatusCode,
    pub(crate) detail: String,
    /// For OpenAI clients of the gateway: the `error` member's `type` and `code`.
    pub(crate) openai: Option<(&'static str, &'static str)>,
    /// Seconds to wait before trying again (`Retry-After`).
    pub(crate) retry_after_s: Option<u64>,
    /// Trying again cannot help (`x-should-retry: false`, which OpenAI's SDKs obey).
    pub(crate) no_retry: bool,
}

impl Problem {
    pub(crate) fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Problem {
            status,
            detail: detail.into(),
            openai: None,
            retry_after_s: None,
            no_retry: false,
        }
    }

    /// Adds an OpenAI-style `error` member, so OpenAI clients show the reason.
    pub(crate) fn openai(mut self, kind: &'static str, code: &'static str) -> Self {
        self.openai = Some((kind, code));
        self
    }

    pub(crate) fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }

    pub(crate) fn no_retry(mut self) -> Self {
        self.no_retry = true;
        self
    }

    pub(crate) fn not_found(what: impl std::fmt::Display) -> Self {
        Problem::new(StatusCode::NOT_FOUND, format!("{what} not found"))
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = json!({
            "type": "about:blank",
            "title": self.status.canonical_reason().unwrap_or("Error"),
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Some((kind, code)) = self.openai {
            body["error"] = json!({"message": self.detail, "type": kind, "code": code});
        }
        if let Ok(id) = REQUEST_ID.try_with(Clone::clone) {
            body["request_id"] = json!(id);
        }
        let mut response = (self.status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.retry_after_s {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.no_retry {
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => Problem::not_found(format!("run {id}")),
            other => store_unavailable(&other),
        }
    }
}

/// 503 for a store that failed (the cause goes to the log, not to the caller).
pub(crate) fn store_unavailable(e: &StoreError) -> Problem {
    tracing::error!(error = %e, "store error");
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the store is unavailable; retry later",
    )
}

impl From<rein_runtime::RuntimeError> for Problem {
    fn from(e: rein_runtime::RuntimeError) -> Self {
        use rein_runtime::RuntimeError as E;
        match e {
            E::Store(e) => e.into(),
            E::Busy { .. } => Problem::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()),
            E::Leased(_) => Problem::new(StatusCode::CONFLICT, e.to_string()),
            E::NotAwaitingApproval(_) => Problem::new(StatusCode::CONFLICT, e.to_string()),
            E::Ended(..) | E::WorkerRun { .. } => Problem::new(StatusCode::CONFLICT, e.to_string()),
            other => {
                tracing::error!(error = %other, "request failed");
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string())
            }
        }
    }
}
