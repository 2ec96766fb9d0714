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
