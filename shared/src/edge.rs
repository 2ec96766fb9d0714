//! Limits that keep the HTTP edge standing under abuse, and the accept loop that enforces them.
//!
//! - A connection must finish sending its request head within `header_read_timeout`, so
//!   half-sent requests (slowloris) are cut off instead of holding sockets forever.
//! - At most `max_connections` connections are open; past that, new ones are closed at once.
//! - At most `max_in_flight` requests are handled at once; the rest are shed with `503` and
//!   `Retry-After` rather than queued. This bounds how many HTTP writers can wait for the
//!   database, so a flood of requests cannot starve the consumers that finish sagas.
//! - A request that takes longer than `request_timeout` is answered `503` and its work dropped.
//!
//! Health probes sit outside the in-flight limit, so an overloaded service still says it is alive.

use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

use crate::config::{positive, positive_millis};
use crate::http::Problem;

/// Limits of the HTTP edge (see the module documentation). Zero is refused for each.
#[derive(Debug, Clone, clap::Args)]
pub struct EdgeLimits {
    /// Milliseconds a client has to send a request head (and an idle connection is kept).
    #[arg(long = "http-header-timeout-ms", env = "HTTP_HEADER_TIMEOUT_MS", default_value = "5000", value_parser = positive_millis)]
    pub header_read_timeout: Duration,
    /// Milliseconds to answer a request before it is answered 503.
    #[arg(long = "http-request-timeout-ms", env = "HTTP_REQUEST_TIMEOUT_MS", default_value = "15000", value_parser = positive_millis)]
    pub request_timeout: Duration,
    /// Requests handled at once; more are answered 503 at once.
    #[arg(long = "http-max-in-flight", env = "HTTP_MAX_IN_FLIGHT", default_value = "128", value_parser = positive::<usize>)]
    pub max_in_flight: usize,
    /// Open connections at most; new ones past it are closed.
    #[arg(long = "http-max-connections", env = "HTTP_MAX_CONNECTIONS", default_value = "4096", value_parser = positive::<usize>)]
    pub max_connections: usize,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            max_in_flight: 128,
            max_connections: 4096,
        }
    }
}

impl EdgeLimits {
    /// `router` with load shedding and the request timeout.
    pub fn limit(&self, router: Router) -> Router {
        router.layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(refusal))
                .load_shed()
                .concurrency_limit(self.max_in_flight)
                .timeout(self.request_timeout),
        )
    }
}

/// What a shed or timed-out request is answered.
async fn refusal(error: tower::BoxError) -> Response {
    let (slug, detail) = if error.is::<tower::load_shed::error::Overloaded>() {
        ("overloaded", "too many requests in flight; retry shortly")
    } else if error.is::<tower::timeout::error::Elapsed>() {
        ("timeout", "the request took too long; retry shortly")
    } else {
        tracing::error!(%error, "request failed at the edge");
        ("unavailable", "the service could not handle the request")
    };
    let mut response = Problem::new(StatusCode::SERVICE_UNAVAILABLE, slug, detail).into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// Serve `app` on `listener` under `limits` until `shutdown`, then let open requests finish
/// (bounded).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: &EdgeLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // Each connection holds a file descriptor: make the process's limit as high as allowed, so
    // `max_connections` is reachable.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::debug!(error = %e, "could not raise the open-files limit");
    }
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::debug!("connection limit reached; closing a new connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.request_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("open HTTP connections did not finish in time; closing them");
    }
    Ok(())
}
