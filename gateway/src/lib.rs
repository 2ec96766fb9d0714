//! The one front door: customers authenticate with a bearer token and reach their own orders
//! (`/api/...`); other prefixes are passed to whatever backend the route table names. Every
//! upstream call goes through [`upstream::Upstream`] (timeout, retry, breaker, bulkhead,
//! balancing).

pub mod api;
pub mod auth;
pub mod config;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use event_toolkit::http::{Problem, MAX_BODY_BYTES};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::config::Config;
use crate::upstream::Upstream;

/// What handlers share.
pub struct Gateway {
    /// Token verification and rate limits.
    pub auth: Auth,
    /// The order service.
    pub order: Arc<Upstream>,
    /// The inventory service.
    pub inventory: Arc<Upstream>,
    /// The payment service.
    pub payment: Arc<Upstream>,
    /// `GATEWAY_ROUTES`, longest prefix first.
    pub routes: Vec<(String, Arc<Upstream>)>,
}

impl Gateway {
    /// Build from settings.
    pub fn new(config: &Config) -> Self {
        let http = reqwest::Client::builder()
            // Upstreams close connections idle past their header timeout (5 s by default): never
            // reuse one that old, or a request can meet the close.
            .pool_idle_timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(2))
            // Upstream redirects are the client's business: pass them on.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("HTTP client");
        let r = &config.resilience;
        let up = |spec| Arc::new(Upstream::new(spec, r, http.clone()));
        Self {
            auth: Auth::new(
                &config.jwt_secret,
                config.jwt_leeway_secs,
                config.rate_per_sec,
                config.rate_burst,
            ),
            order: up(&config.order),
            inventory: up(&config.inventory),
            payment: up(&config.payment),
            routes: config
                .routes
                .iter()
                .map(|(prefix, spec)| (prefix.clone(), up(spec)))
                .collect(),
        }
    }

    fn upstreams(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        [&self.order, &self.inventory, &self.payment]
            .into_iter()
            .chain(self.routes.iter().map(|(_, u)| u))
    }

    /// Background work until `shutdown`: replica probes and limiter upkeep.
    pub fn spawn_background(self: &Arc<Self>, shutdown: CancellationToken) {
        for u in self.upstreams() {
            tokio::spawn(u.clone().probe(shutdown.clone()));
        }
        let gw = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(60)) => gw.auth.forget_idle(),
                    _ = shutdown.cancelled() => return,
                }
            }
        });
    }
}

/// Help texts of the gateway's own metrics.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "gateway_upstream_requests_total",
        "Upstream attempts by upstream and outcome (ok, error_status, timeout, unreachable, circuit_open, bulkhead_full)"
    );
    describe_counter!(
        "gateway_upstream_retries_total",
        "Attempts sent again after a failure"
    );
    describe_histogram!(
        "gateway_upstream_duration_seconds",
        Unit::Seconds,
        "From the first attempt to a good answer, retries included"
    );
    describe_gauge!(
        "gateway_circuit_state",
        "Circuit breaker of each upstream: 0 closed, 1 half-open, 2 open"
    );
    describe_counter!(
        "gateway_replica_ejections_total",
        "Replicas taken out of the rotation after consecutive failures"
    );
    describe_counter!(
        "gateway_rate_limited_total",
        "Requests refused with 429 by the per-customer rate limit"
    );
}

/// `GET /docs`: Swagger UI over `/openapi.json`. The page loads Swagger UI's script and style from
/// a public CDN in the browser; the gateway itself serves only this page.
async fn swagger_ui() -> axum::response::Html<&'static str> {
    axum::response::Html(
        r##"<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Order saga API gateway</title>
  <link rel="stylesheet" href="https://unpkg.com/swagger-ui-dist@5/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="https://unpkg.com/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
  <script>
    window.onload = () => {
      window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui" });
    };
  </script>
</body>
</html>
"##,
    )
}

/// Every route, limits and the access log.
pub fn router(gw: Arc<Gateway>, config: &Config) -> Router {
    let app = Router::new()
        .route("/api/orders", post(api::place).get(api::list))
        .route("/api/orders/{id}", get(api::view))
        .route("/api/orders/{id}/cancel", post(api::cancel))
        .route("/openapi.json", get(api::openapi))
        .route("/docs", get(swagger_ui))
        .fallback(api::proxy)
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "method not allowed on this resource",
            )
        })
        .with_state(gw.clone());
    let probes = Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .with_state(gw);
    // Probes stay outside the in-flight limit: an overloaded gateway is still alive.
    config
        .edge
        .limit(app)
        .merge(probes)
        .route("/metrics", get(event_toolkit::observe::render))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(
            event_toolkit::observe::track_http,
        ))
        .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
        .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(
            tower_http::request_id::MakeRequestUuid,
        ))
}

/// Ready while the order service can be reached: without it no customer route works. The report
/// shows every upstream's circuit and replicas.
async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    let ready = gw.order.usable();
    let upstreams: serde_json::Map<String, serde_json::Value> = gw
        .upstreams()
        .map(|u| (u.name().to_owned(), u.report()))
        .collect();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"ready": ready, "upstreams": upstreams})),
    )
        .into_response()
}
