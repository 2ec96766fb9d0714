//! Wiring: configuration, runtime, consumers and HTTP.

use event_toolkit::http::App;
use event_toolkit::service::{Runtime, ServiceConfig, StartError};

use crate::config::Settings;
use crate::events;
use crate::routes::router;

/// Service name.
pub const NAME: &str = "inventory-service";

/// The inventory service: [`Application::build`] wires it and returns an [`App`] to run.
pub struct Application;

impl Application {
    /// Connect, provision, start consumers, bind HTTP.
    pub async fn build(config: ServiceConfig) -> Result<App, StartError> {
        let mut runtime = Runtime::start(&config, sqlx::migrate!(), &events::streams()).await?;
        for subscription in crate::handlers::subscriptions() {
            runtime.subscribe(subscription);
        }
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
