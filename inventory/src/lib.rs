//! Inventory service: owns products, stock and reservations; reserves, rejects, releases and
//! commits in reaction to order and payment events.

pub mod config;
pub mod domain;
pub mod events;
pub mod handlers;
pub mod routes;
pub mod startup;
pub mod store;
