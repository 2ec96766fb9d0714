//! Order service: owns orders and their saga status; announces placed, confirmed and cancelled.

pub mod config;
pub mod deadline;
pub mod domain;
pub mod events;
pub mod handlers;
pub mod routes;
pub mod startup;
pub mod store;
pub mod timeline;

/// How this service is wired to NATS (streams, durables, what it announces), as data.
pub fn wiring() -> event_toolkit::Wiring {
    event_toolkit::Wiring::new(
        startup::NAME,
        "order",
        events::streams(),
        &handlers::subscriptions(std::time::Duration::ZERO),
        &events::PUBLISHES,
    )
}
