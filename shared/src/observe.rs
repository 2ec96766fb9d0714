//! Prometheus metrics: the process-wide recorder, `GET /metrics`, per-route HTTP metrics, and the
//! gauges sampled from the database and the server (outbox backlog, dead letters, consumer lag).
//!
//! Label values are bounded: route templates (never a path with an id), consumer names, the event
//! types a consumer subscribes to by name, outcomes. Never an order id.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sqlx::Row;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::db::{now_micros, Database};

/// How often sampled gauges are refreshed.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Histogram buckets (seconds): from a fast handler to a saga near its deadline.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Install the Prometheus recorder once per process (later calls reuse it). `None` if another
/// recorder was installed first (then `/metrics` says so).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .expect("bucket list is not empty");
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .clone()
}

/// Help texts, so `/metrics` says what each series means.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!("outbox_pending_rows", "Outbox rows waiting to be published");
    describe_gauge!(
        "outbox_parked_rows",
        "Outbox rows parked after repeated refusals"
    );
    describe_gauge!(
        "outbox_oldest_pending_age_seconds",
        Unit::Seconds,
        "Age of the oldest outbox row waiting to be published"
    );
    describe_histogram!(
        "outbox_publish_latency_seconds",
        Unit::Seconds,
        "From the outbox row's commit to the stream's acknowledgement"
    );
    describe_counter!("outbox_published_total", "Outbox rows published");
    describe_counter!(
        "consumer_messages_total",
        "Messages handled by a durable consumer, by event type and outcome"
    );
    describe_histogram!(
        "consumer_handler_duration_seconds",
        Unit::Seconds,
        "Time to apply one event inside the consumer's transaction"
    );
    describe_gauge!(
        "consumer_lag_messages",
        "Messages of a durable not yet acknowledged (num_pending + num_ack_pending)"
    );
    describe_gauge!("dead_letters_stored", "Dead letters kept in the database");
    describe_counter!("dead_lettered_total", "Messages dead-lettered");
    describe_counter!(
        "http_requests_total",
        "HTTP requests by method, route template and status"
    );
    describe_histogram!(
        "http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request duration by method and route template"
    );
}

/// `GET /metrics` in the Prometheus text format.
pub async fn render() -> Response {
    match install() {
        Some(handle) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            handle.render(),
        )
            .into_response(),
        None => crate::http::Problem::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "no-metrics",
            "another metrics recorder is installed in this process",
        )
        .into_response(),
    }
}

/// Middleware: one access-log line per request at `info` (method, route, status, latency, request
/// id), a span carrying the request id for every log line of the handler, and the HTTP metrics by
/// method, route template and status.
pub async fn track_http(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let span = tracing::info_span!("http", method, route = %route, request_id = %request_id);
    let response = next.run(req).instrument(span.clone()).await;
    let status = response.status().as_u16();
    let latency_ms = started.elapsed().as_secs_f64() * 1e3;
    // Probes are polled constantly; their lines would drown the rest.
    if !matches!(route.as_str(), "/healthz" | "/readyz" | "/metrics") {
        tracing::info!(parent: &span, status, latency_ms = format_args!("{latency_ms:.1}"), "request");
    }
    let status = status.to_string();
    metrics::counter!("http_requests_total", "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

fn method_label(m: &axum::http::Method) -> &'static str {
    match m.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// Refresh the database gauges every [`SAMPLE_INTERVAL`] until `shutdown`.
pub async fn sample_database(db: Database, shutdown: CancellationToken) {
    loop {
        if let Err(e) = sample_once(&db).await {
            tracing::debug!(error = %e, "metrics sample failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(SAMPLE_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn sample_once(db: &Database) -> Result<(), sqlx::Error> {
    // Each count runs on a partial index, so sampling never scans the published history.
    let count = |sql: &'static str| async move {
        sqlx::query(sql)
            .fetch_one(db.pool())
            .await?
            .try_get::<i64, _>(0)
    };
    let pending =
        count("SELECT COUNT(*) FROM outbox WHERE published_at_us IS NULL AND parked_at_us IS NULL")
            .await?;
    let parked = count("SELECT COUNT(*) FROM outbox WHERE parked_at_us IS NOT NULL").await?;
    metrics::gauge!("outbox_pending_rows").set(pending as f64);
    metrics::gauge!("outbox_parked_rows").set(parked as f64);
    // The partial index on pending rows makes this one lookup.
    let oldest: Option<i64> = sqlx::query(
        "SELECT created_at_us FROM outbox WHERE published_at_us IS NULL AND parked_at_us IS NULL \
         ORDER BY id LIMIT 1",
    )
    .fetch_optional(db.pool())
    .await?
    .map(|r| r.try_get(0))
    .transpose()?;
    let age = oldest.map_or(0.0, |t| (now_micros() - t).max(0) as f64 / 1e6);
    metrics::gauge!("outbox_oldest_pending_age_seconds").set(age);
    let dead: i64 = sqlx::query("SELECT COUNT(*) FROM dead_letters")
        .fetch_one(db.pool())
        .await?
        .try_get(0)?;
    metrics::gauge!("dead_letters_stored").set(dead as f64);
    Ok(())
}

/// Refresh `consumer_lag_messages` for one durable every [`SAMPLE_INTERVAL`] until `shutdown`.
pub async fn sample_lag(
    mut consumer: async_nats::jetstream::consumer::PullConsumer,
    durable: String,
    shutdown: CancellationToken,
) {
    loop {
        if let Ok(info) = consumer.info().await {
            metrics::gauge!("consumer_lag_messages", "consumer" => durable.clone())
                .set((info.num_pending + info.num_ack_pending as u64) as f64);
        }
        tokio::select! {
            _ = tokio::time::sleep(SAMPLE_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
