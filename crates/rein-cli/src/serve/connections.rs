//! Accepting connections: how many may be open at once, and how long each may keep the server
//! waiting.
//!
//! A client that opens connections and sends nothing, or sends a request's head a byte at a
//! time, or declares a body and never sends it, holds memory and a task for as long as the
//! server lets it. So: at most `[server] max_connections` are open (more wait in the kernel's
//! listen queue until one closes); a request's head, and between requests the next one's, must
//! arrive within `header_timeout` (hyper's header-read timer, which also closes idle keep-alive
//! connections); a body must arrive within `body_timeout` ([`read_body`]). Answers that take
//! long by design (an event stream, a `wait: true` run) are unaffected: they are past their
//! head and body.

use super::Problem;
use axum::Router;
use axum::body::Body;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How long open connections are given to finish once the server is asked to stop.
const DRAIN: Duration = Duration::from_secs(10);

/// The limits on connections.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// A request's head, and the wait for the next one on a kept-alive connection.
    pub header_timeout: Duration,
}

/// Serves `router` on `listener` within `limits` until `shutdown` completes, then lets open
/// connections finish (for at most [`DRAIN`]).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait for some to close rather than spin.
                    tracing::warn!(error = %e, "a connection could not be accepted");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
}

/// Reads `request`'s body within `timeout` and at most `max_bytes` of it, handing on the request
/// with the body in memory; a body that arrives too slowly is 408, one too large 413.
pub(crate) async fn read_body(
    request: axum::extract::Request,
    timeout: Duration,
    max_bytes: usize,
) -> Result<axum::extract::Request, axum::response::Response> {
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, max_bytes)).await {
        Ok(Ok(bytes)) => Ok(axum::extract::Request::from_parts(parts, Body::from(bytes))),
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            Err(if too_large {
                Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the body is larger than {max_bytes} bytes (`[server] max_body_bytes`)"
                    ),
                )
            } else {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    format!("the body could not be read: {e}"),
                )
            }
            .into_response())
        }
        Err(_) => Err(Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the body did not arrive within {}s (`[server] body_timeout`)",
                timeout.as_secs()
            ),
        )
        .into_response()),
    }
}
