//! The payment service's event catalogue: what it announces (owned here) and its reading of what
//! it consumes (only the fields it needs). Documented in `docs/asyncapi.yaml`.

use event_toolkit::{event_payload, EventPayload, StreamSpec};
use serde::{Deserialize, Serialize};

/// The stream of payment events.
pub const STREAM: &str = "PAYMENTS";

/// The streams this service owns.
pub fn streams() -> Vec<StreamSpec> {
    vec![StreamSpec::new(STREAM, &["payments.>"])]
}

// ---- announced ----

/// The event types this service announces.
pub const PUBLISHES: [&str; 3] = [
    PaymentSucceeded::TYPE,
    PaymentFailed::TYPE,
    PaymentRefunded::TYPE,
];

/// `payments.succeeded.v1`: the order's total was captured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentSucceeded {
    /// The order.
    pub order_id: String,
    /// The payment.
    pub payment_id: String,
    /// Who paid.
    pub customer_id: String,
    /// Amount captured.
    pub amount_minor: i64,
    /// Currency.
    pub currency: String,
}
event_payload!(PaymentSucceeded, "payments.succeeded.v1", order_id);

/// `payments.failed.v1`: nothing captured; inventory releases, the order cancels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentFailed {
    /// The order.
    pub order_id: String,
    /// `insufficient_funds`, `payment_declined` or `payment_unavailable`.
    pub reason: String,
}
event_payload!(PaymentFailed, "payments.failed.v1", order_id);

/// `payments.refunded.v1`: a capture given back (compensation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaymentRefunded {
    /// The order.
    pub order_id: String,
    /// The payment.
    pub payment_id: String,
    /// Amount returned.
    pub amount_minor: i64,
    /// Currency.
    pub currency: String,
}
event_payload!(PaymentRefunded, "payments.refunded.v1", order_id);

// ---- consumed ----

/// `inventory.reserved.v1`, as read here: what to charge.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StockReserved {
    /// The order.
    pub order_id: String,
    /// Who pays.
    pub customer_id: String,
    /// Amount.
    pub total_minor: i64,
    /// Currency.
    pub currency: String,
}
event_payload!(StockReserved, "inventory.reserved.v1", order_id);

/// `orders.cancelled.v1`, as read here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderCancelled {
    /// The order.
    pub order_id: String,
}
event_payload!(OrderCancelled, "orders.cancelled.v1", order_id);
