//! Wiring: configuration, runtime, consumers and HTTP.

use event_toolkit::http::{bind, finish_router, run_until_stopped};
use event_toolkit::service::{Runtime, ServiceConfig, StartError};
use event_toolkit::ConsumerSpec;

use crate::events;
use crate::handlers::SagaEvents;
use crate::routes::router;

/// Service name.
pub const NAME: &str = "inventory-service";

/// A built, not yet running, inventory service.
pub struct Application {
    runtime: Runtime,
    listener: tokio::net::TcpListener,
    app: axum::Router,
}

impl Application {
    /// Connect, provision, start consumers, bind HTTP.
    pub async fn build(config: ServiceConfig) -> Result<Self, StartError> {
        let mut runtime = Runtime::start(
            &config,
            (
                sqlx::migrate!("./migrations/sqlite"),
                sqlx::migrate!("./migrations/postgres"),
            ),
            &events::streams(),
        )
        .await?;
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
        let app = finish_router(router(runtime.db.clone()), runtime.readiness());
        let listener = bind(&config.http_addr).await?;
        Ok(Self {
            runtime,
            listener,
            app,
        })
    }

    /// The bound HTTP port.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serve until SIGTERM/SIGINT, then shut down in order.
    pub async fn run_until_stopped(self) -> Result<(), StartError> {
        run_until_stopped(self.runtime, self.listener, self.app).await
    }
}

/// Build from the environment and run.
pub async fn run_from_env() -> Result<(), StartError> {
    Application::build(ServiceConfig::from_env(NAME, "127.0.0.1:8082"))
        .await?
        .run_until_stopped()
        .await
}
