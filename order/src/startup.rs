//! Wiring: configuration, runtime, consumers, workers and HTTP.

use event_toolkit::http::App;
use event_toolkit::retention::PruneRule;
use event_toolkit::service::{Runtime, StartError};

pub use crate::config::Settings;
use crate::events;
use crate::routes::{router, AppState};

/// Service name.
pub const NAME: &str = "order-service";

/// The order service: [`Application::build`] wires it and returns an [`App`] to run.
pub struct Application;

impl Application {
    /// Connect, provision, start consumers and workers, bind HTTP.
    pub async fn build(settings: Settings) -> Result<App, StartError> {
        let mut runtime =
            Runtime::start(&settings.service, sqlx::migrate!(), &events::streams()).await?;
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
