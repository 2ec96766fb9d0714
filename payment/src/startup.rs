//! Wiring: configuration, runtime, consumers, the payment processor and HTTP.

use std::sync::Arc;
use std::time::Duration;

use event_toolkit::http::App;
use event_toolkit::service::{env_u64, Runtime, ServiceConfig, StartError};
use event_toolkit::OutboxWaker;

use crate::events;
use crate::gateway::{ResilienceConfig, ResilientGateway, SimulatedGateway};
use crate::processor::Processor;
use crate::routes::{router, AppState};

/// Service name.
pub const NAME: &str = "payment-service";

/// Payment-specific settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Shared service settings.
    pub service: ServiceConfig,
    /// `PAYMENT_GATEWAY_LATENCY_MS`: simulated provider latency.
    pub gateway_latency: Duration,
    /// `PAYMENT_GATEWAY_DECLINE_OVER_MINOR`: amounts above it are declined.
    pub decline_over_minor: Option<i64>,
}

impl Settings {
    /// Read the environment.
    pub fn from_env() -> Result<Self, StartError> {
        let decline = match std::env::var("PAYMENT_GATEWAY_DECLINE_OVER_MINOR") {
            Ok(v) if !v.trim().is_empty() => {
                Some(v.trim().parse::<i64>().map_err(|e| StartError::Config {
                    name: "PAYMENT_GATEWAY_DECLINE_OVER_MINOR".into(),
                    reason: format!("{v:?}: {e}"),
                })?)
            }
            _ => None,
        };
        Ok(Self {
            service: ServiceConfig::from_env(NAME, "127.0.0.1:8083")?,
            gateway_latency: Duration::from_millis(env_u64("PAYMENT_GATEWAY_LATENCY_MS", 0)?),
            decline_over_minor: decline,
        })
    }
}

/// The payment service: [`Application::build`] wires it and returns an [`App`] to run.
pub struct Application;

impl Application {
    /// Connect, provision, start consumers and the processor, bind HTTP.
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
        crate::gateway::describe_metrics();
        let simulated =
            SimulatedGateway::new(settings.gateway_latency, settings.decline_over_minor);
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
