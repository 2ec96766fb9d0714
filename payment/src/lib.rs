//! Payment service: owns customer accounts, payments and refunds; charges on reservation, never
//! charges an order known cancelled, refunds one charged and then cancelled.

pub mod config;
pub mod domain;
pub mod events;
pub mod gateway;
pub mod handlers;
pub mod processor;
pub mod routes;
pub mod startup;
pub mod store;

/// How this service is wired to NATS (streams, durables, what it announces), as data.
pub fn wiring() -> event_toolkit::Wiring {
    event_toolkit::Wiring::new(
        startup::NAME,
        "payment",
        events::streams(),
        &handlers::subscriptions(&event_toolkit::OutboxWaker::default()),
        &events::PUBLISHES,
    )
}
