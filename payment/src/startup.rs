//! Wiring: configuration, runtime, consumers, the payment processor and HTTP.

use std::sync::Arc;

use event_toolkit::http::App;
use event_toolkit::service::{Runtime, StartError};
use event_toolkit::OutboxWaker;

pub use crate::config::Settings;
use crate::events;
use crate::gateway::{ResilienceConfig, ResilientGateway, SimulatedGateway};
use crate::processor::Processor;
use crate::routes::{router, AppState};

/// Service name.
pub const NAME: &str = "payment-service";

/// The payment service: [`Application::build`] wires it and returns an [`App`] to run.
pub struct Application;

impl Application {
    /// Connect, provision, start consumers and the processor, bind HTTP.
    pub async fn build(settings: Settings) -> Result<App, StartError> {
        let mut runtime =
            Runtime::start(&settings.service, sqlx::migrate!(), &events::streams()).await?;
        crate::gateway::describe_metrics();
        let simulated =
            SimulatedGateway::new(settings.gateway_latency, settings.decline_over_minor)
                .losing_every(settings.timeout_every);
        let resilience = ResilienceConfig::default();
        let concurrency = resilience.max_concurrent;
        let gateway = Arc::new(ResilientGateway::new(simulated.clone(), resilience));
        let processor_wake = OutboxWaker::default();
        for subscription in crate::handlers::subscriptions(&processor_wake) {
            runtime.subscribe(subscription);
        }
        let processor = Processor {
            db: runtime.db.clone(),
            gateway,
            outbox: runtime.waker.clone(),
            wake: processor_wake,
            source: runtime.source(),
            concurrency,
        };
        runtime.spawn_worker(processor.run(runtime.shutdown.clone()));
        let state = AppState {
            db: runtime.db.clone(),
            gateway: Arc::new(simulated),
        };
        let routes = router(state, &runtime.admin);
        App::new(runtime, routes, &settings.service.http_addr).await
    }
}

/// Build from the environment and run.
pub async fn run_from_env() -> Result<(), StartError> {
    Application::build(Settings::from_env()?)
        .await?
        .run_until_stopped()
        .await
}
