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
