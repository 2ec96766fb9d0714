//! The payment service's settings: the toolkit's common ones plus the simulated provider's.

use std::time::Duration;

use event_toolkit::config::{millis, number};
use event_toolkit::service::{ServiceConfig, StartError};

use crate::startup::NAME;

/// Default `HTTP_ADDR`.
pub const HTTP_ADDR: &str = "127.0.0.1:8083";

/// Payment-specific settings, from the environment or flags (`payment-service --help`).
#[derive(Debug, Clone, clap::Parser)]
#[command(about = "The payment service of the saga: charges, voids and refunds")]
pub struct Settings {
    /// Shared service settings.
    #[command(flatten)]
    pub service: ServiceConfig,
    /// Milliseconds the simulated provider takes to answer.
    #[arg(
        long = "payment-gateway-latency-ms",
        env = "PAYMENT_GATEWAY_LATENCY_MS",
        default_value = "0",
        value_parser = millis,
        help_heading = "Simulated provider"
    )]
    pub gateway_latency: Duration,
    /// Amounts (minor units) above it are declined; unset: none is.
    #[arg(
        long = "payment-gateway-decline-over-minor",
        env = "PAYMENT_GATEWAY_DECLINE_OVER_MINOR",
        value_parser = number::<i64>,
        help_heading = "Simulated provider"
    )]
    pub decline_over_minor: Option<i64>,
    /// The provider loses its answer to every Nth charge it approves (0: never).
    #[arg(
        long = "payment-gateway-timeout-every",
        env = "PAYMENT_GATEWAY_TIMEOUT_EVERY",
        default_value = "0",
        value_parser = number::<u64>,
        help_heading = "Simulated provider"
    )]
    pub timeout_every: u64,
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
