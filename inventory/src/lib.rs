//! Inventory service: owns products, stock and reservations; reserves, rejects, releases and
//! commits in reaction to order and payment events.

pub mod config;
pub mod domain;
pub mod events;
pub mod handlers;
pub mod routes;
pub mod startup;
pub mod store;

/// How this service is wired to NATS (streams, durables, what it announces), as data.
pub fn wiring() -> event_toolkit::Wiring {
    event_toolkit::Wiring::new(
        startup::NAME,
        "inventory",
        events::streams(),
        &handlers::subscriptions(),
        &events::PUBLISHES,
    )
}
