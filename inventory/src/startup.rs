//! Wiring: configuration, runtime, consumers and HTTP.

use event_toolkit::http::App;
use event_toolkit::service::{Runtime, ServiceConfig, StartError};
use event_toolkit::ConsumerSpec;

use crate::config::Settings;
use crate::events;
use crate::handlers::SagaEvents;
use crate::routes::router;

/// Service name.
pub const NAME: &str = "inventory-service";

/// The inventory service: [`Application::build`] wires it and returns an [`App`] to run.
pub struct Application;

impl Application {
    /// Connect, provision, start consumers, bind HTTP.
    pub async fn build(config: ServiceConfig) -> Result<App, StartError> {
        let mut runtime = Runtime::start(&config, sqlx::migrate!(), &events::streams()).await?;
        let saga = SagaEvents {
            source: runtime.source(),
        };
        runtime.spawn_consumer(
            ConsumerSpec::new(
                "inventory-from-orders",
                "ORDERS",
                &[
                    "orders.placed.v1",
                    "orders.confirmed.v1",
                    "orders.cancelled.v1",
                ],
            ),
            saga.clone(),
        );
        runtime.spawn_consumer(
            ConsumerSpec::new(
                "inventory-from-payments",
                "PAYMENTS",
                &["payments.failed.v1"],
            ),
            saga,
        );
        let routes = router(runtime.db.clone(), &runtime.admin);
        App::new(runtime, routes, &config.http_addr).await
    }
}

/// Build from the environment and run.
pub async fn run_from_env() -> Result<(), StartError> {
    Application::build(Settings::from_env()?.service)
        .await?
        .run_until_stopped()
        .await
}
