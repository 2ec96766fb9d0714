//! Wiring: configuration, runtime, consumers, workers and HTTP.

use std::time::Duration;

use event_toolkit::http::App;
use event_toolkit::retention::{env_duration, PruneRule};
use event_toolkit::service::{env_u64, Runtime, ServiceConfig, StartError};

use crate::events;
use crate::routes::{router, AppState};

/// Service name.
pub const NAME: &str = "order-service";

/// Order-specific settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Shared service settings.
    pub service: ServiceConfig,
    /// `ORDER_DEADLINE_MS`: how long a saga may take before the order is cancelled.
    pub deadline: Duration,
    /// `IDEMPOTENCY_KEY_RETENTION`: how long a placement's `Idempotency-Key` is remembered.
    pub idempotency_retention: Duration,
    /// `TIMELINE_RETENTION`: how long saga timelines are kept.
    pub timeline_retention: Duration,
}

impl Settings {
    /// Read the environment.
    pub fn from_env() -> Result<Self, StartError> {
        Ok(Self {
            service: ServiceConfig::from_env(NAME, "127.0.0.1:8081")?,
            deadline: Duration::from_millis(env_u64("ORDER_DEADLINE_MS", 30_000)?),
            idempotency_retention: env_duration(
                "IDEMPOTENCY_KEY_RETENTION",
                Duration::from_secs(24 * 3600),
            )?,
            timeline_retention: env_duration(
                "TIMELINE_RETENTION",
                Duration::from_secs(90 * 24 * 3600),
            )?,
        })
    }
}

/// The order service: [`Application::build`] wires it and returns an [`App`] to run.
pub struct Application;

impl Application {
    /// Connect, provision, start consumers and workers, bind HTTP.
    pub async fn build(settings: Settings) -> Result<App, StartError> {
        let mut runtime = Runtime::start(
            &settings.service,
            (
                sqlx::migrate!("./migrations/sqlite"),
                sqlx::migrate!("./migrations/postgres"),
            ),
            &events::streams(),
        )
        .await?;
        describe_metrics();
        // A retry with the same key after this long is a new order.
        runtime.prune_also(
            vec![PruneRule {
                what: "idempotency_keys",
                sql: "UPDATE orders SET idempotency_key = NULL, request_fingerprint = NULL \
                      WHERE id IN (SELECT id FROM orders WHERE idempotency_key IS NOT NULL \
                      AND created_at_us < $1 ORDER BY created_at_us LIMIT $2)"
                    .into(),
                keep: settings.idempotency_retention,
            },
            PruneRule {
                what: "timeline_events",
                sql: "DELETE FROM timeline_events WHERE (order_id, event_id) IN (SELECT order_id, \
                      event_id FROM timeline_events WHERE time_us < $1 ORDER BY time_us LIMIT $2)"
                    .into(),
                keep: settings.timeline_retention,
            }],
            settings.service.retention.sweep_every,
        );
        let source = runtime.source();
        for subscription in crate::handlers::subscriptions(settings.deadline) {
            runtime.subscribe(subscription);
        }
        runtime.spawn_worker(crate::deadline::run(
            runtime.db.clone(),
            runtime.waker.clone(),
            source.clone(),
            runtime.shutdown.clone(),
        ));
        let state = AppState {
            db: runtime.db.clone(),
            waker: runtime.waker.clone(),
            source,
            deadline: settings.deadline,
        };
        App::new(runtime, router(state), &settings.service.http_addr).await
    }
}

/// Build from the environment and run.
pub async fn run_from_env() -> Result<(), StartError> {
    Application::build(Settings::from_env()?)
        .await?
        .run_until_stopped()
        .await
}

/// Help texts of the saga metrics this service records (after the toolkit's recorder exists).
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "sagas_terminal_total",
        "Sagas that ended, by status and (for cancellations) reason"
    );
    describe_histogram!(
        "saga_duration_seconds",
        Unit::Seconds,
        "From order placed to CONFIRMED or CANCELLED"
    );
    describe_gauge!(
        "orders_open_past_deadline",
        "Unfinished orders past their deadline (normally 0: a stuck saga shows here)"
    );
}
