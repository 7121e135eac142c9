//! Accepting connections: how many may be open at once, and how long each may keep the server
//! waiting.
//!
//! A client that opens connections and sends nothing, or sends a request's head a byte at a
//! time, or declares a body and never sends it, holds memory and a task for as long as the
//! server lets it. So: at most `[server] max_connections` are open (more wait in the kernel's
//! listen queue until one closes); a request's head, and between requests the next one's, must
//! arrive within `header_timeout` (hyper's header-read timer, which also closes idle keep-alive
//! connections); a body must arrive within `body_timeout` ([`Deadline`]). Answers that take
//! long by design (an event stream, a `wait: true` run) are unaffected: they are past their
//! head and body.

use crate::problem::Problem;
use axum::Router;
use axum::body::Body;
use axum::http::StatusCode;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
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

impl Limits {
    /// The limits `[server]` sets.
    pub(crate) fn of(server: &rein_app::config::Server) -> Self {
        Limits {
            max_connections: server.max_connections,
            header_timeout: server.header_timeout,
        }
    }
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
    let mut open = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while open.try_join_next().is_some() {}
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
        open.spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    // Open connections finish what they are answering; those still open after the drain (an
    // event stream never ends on its own) are closed, so nothing answers from this process
    // once its runs are handed over.
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
    open.shutdown().await;
}

/// A request body that must arrive whole by a deadline: past it, reading fails with
/// [`BodyTimedOut`]. The deadline runs from when the request's head arrived, however the body
/// trickles in, and nothing is read until a handler asks (so an unauthenticated request is
/// refused without its body ever being read).
pub(crate) struct Deadline {
    body: Body,
    due: Pin<Box<tokio::time::Sleep>>,
}

impl Deadline {
    /// `request` with its body due within `timeout`.
    pub(crate) fn on(request: axum::extract::Request, timeout: Duration) -> axum::extract::Request {
        request.map(|body| {
            Body::new(Deadline {
                body,
                due: Box::pin(tokio::time::sleep(timeout)),
            })
        })
    }
}

impl axum::body::HttpBody for Deadline {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        // What has arrived is handed on whenever it is read; only waiting for more is bounded.
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Pending if self.due.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut))))
            }
            polled => polled,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A request body that did not arrive by its deadline (`[server] body_timeout`).
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time (`[server] body_timeout`)")]
pub(crate) struct BodyTimedOut;

/// The problem to answer for a body that could not be read: 408 when it came too slowly, else
/// what the rejection says (413 for one too large).
pub(crate) fn unread_body(rejection: &axum::extract::rejection::BytesRejection) -> Problem {
    let mut source = std::error::Error::source(rejection);
    while let Some(e) = source {
        if e.is::<BodyTimedOut>() {
            return Problem::new(StatusCode::REQUEST_TIMEOUT, BodyTimedOut.to_string());
        }
        source = e.source();
    }
    Problem::new(
        rejection.status(),
        format!("the body could not be read: {}", rejection.body_text()),
    )
}
