//! The order service's settings: the toolkit's common ones plus its own.

use std::time::Duration;

use event_toolkit::config::{duration, millis};
use event_toolkit::service::{ServiceConfig, StartError};

use crate::startup::NAME;

/// Default `HTTP_ADDR`.
pub const HTTP_ADDR: &str = "127.0.0.1:8081";

/// Order-specific settings, from the environment or flags (`order-service --help`).
#[derive(Debug, Clone, clap::Parser)]
#[command(about = "The order service of the saga: places orders and decides their outcome")]
pub struct Settings {
    /// Shared service settings.
    #[command(flatten)]
    pub service: ServiceConfig,
    /// Milliseconds a saga may take before the order is cancelled.
    #[arg(
        long = "order-deadline-ms",
        env = "ORDER_DEADLINE_MS",
        default_value = "30000",
        value_parser = millis,
        help_heading = "Order"
    )]
    pub deadline: Duration,
    /// How long a placement's Idempotency-Key is remembered.
    #[arg(
        long = "idempotency-key-retention",
        env = "IDEMPOTENCY_KEY_RETENTION",
        default_value = "1d",
        value_parser = duration,
        help_heading = "Order"
    )]
    pub idempotency_retention: Duration,
    /// How long saga timelines are kept.
    #[arg(
        long = "timeline-retention",
        env = "TIMELINE_RETENTION",
        default_value = "90d",
        value_parser = duration,
        help_heading = "Order"
    )]
    pub timeline_retention: Duration,
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
