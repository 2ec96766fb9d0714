//! The inventory service's settings: the toolkit's common ones.

use event_toolkit::service::{ServiceConfig, StartError};

use crate::startup::NAME;

/// Default `HTTP_ADDR`.
pub const HTTP_ADDR: &str = "127.0.0.1:8082";

/// Inventory settings, from the environment or flags (`inventory-service --help`).
#[derive(Debug, Clone, clap::Parser)]
#[command(about = "The inventory service of the saga: reserves, releases and commits stock")]
pub struct Settings {
    /// Shared service settings.
    #[command(flatten)]
    pub service: ServiceConfig,
}

impl Settings {
    /// Read the command line and the environment. `--help` prints every variable and exits; a bad
    /// value is reported and ends the process with status 2.
    pub fn from_env() -> Result<Self, StartError> {
        let mut settings: Self = event_toolkit::config::parse(NAME, HTTP_ADDR);
        settings.service.named(NAME)?;
        Ok(settings)
    }
}
