//! The order service's event catalogue: what it announces (owned here) and its reading of the
//! events and commands it consumes (only the fields it needs; unknown fields are ignored).
//! The whole catalogue is documented in `docs/asyncapi.yaml`.

use chrono::{DateTime, Utc};
use event_toolkit::{event_payload, EventPayload, StreamSpec};
use serde::{Deserialize, Serialize};

use crate::domain::{Line, LineInput};

/// The stream of order events.
pub const STREAM: &str = "ORDERS";
/// The stream of commands people send with the nats CLI.
pub const COMMAND_STREAM: &str = "ORDER_COMMANDS";

/// The streams this service owns.
pub fn streams() -> Vec<StreamSpec> {
    vec![
        StreamSpec::new(STREAM, &["orders.>"]),
        StreamSpec::new(COMMAND_STREAM, &["cmd.orders.>"]),
    ]
}

/// Saga events the order service receives for its timeline only.
pub const STOCK_RELEASED: &str = "inventory.released.v1";
/// See [`STOCK_RELEASED`].
pub const STOCK_COMMITTED: &str = "inventory.committed.v1";
/// See [`STOCK_RELEASED`].
pub const PAYMENT_REFUNDED: &str = "payments.refunded.v1";

// ---- announced ----

/// The event types this service announces.
pub const PUBLISHES: [&str; 3] = [
    OrderPlaced::TYPE,
    OrderConfirmed::TYPE,
    OrderCancelled::TYPE,
];

/// `orders.placed.v1`: a new saga starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderPlaced {
    /// The order (and saga) id.
    pub order_id: String,
    /// Who pays.
    pub customer_id: String,
    /// Currency of all amounts.
    pub currency: String,
    /// Sum of the lines.
    pub total_minor: i64,
    /// What to reserve.
    pub items: Vec<Line>,
    /// When the order gives up.
    pub deadline_at: DateTime<Utc>,
}
event_payload!(OrderPlaced, "orders.placed.v1", order_id);

/// `orders.confirmed.v1`: paid; inventory commits the reservation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderConfirmed {
    /// The order.
    pub order_id: String,
}
event_payload!(OrderConfirmed, "orders.confirmed.v1", order_id);

/// `orders.cancelled.v1`: inventory releases, payment refunds or never charges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderCancelled {
    /// The order.
    pub order_id: String,
    /// Why (`insufficient_stock`, `customer_cancelled`, `deadline_exceeded`, ...).
    pub reason: String,
}
event_payload!(OrderCancelled, "orders.cancelled.v1", order_id);

// ---- consumed ----

/// `inventory.reserved.v1`, as read here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StockReserved {
    /// The order.
    pub order_id: String,
}
event_payload!(StockReserved, "inventory.reserved.v1", order_id);

/// `inventory.rejected.v1`, as read here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StockRejected {
    /// The order.
    pub order_id: String,
    /// `insufficient_stock` or `unknown_sku`.
    pub reason: String,
}
event_payload!(StockRejected, "inventory.rejected.v1", order_id);

/// `payments.succeeded.v1`, as read here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentSucceeded {
    /// The order.
    pub order_id: String,
}
event_payload!(PaymentSucceeded, "payments.succeeded.v1", order_id);

/// `payments.failed.v1`, as read here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentFailed {
    /// The order.
    pub order_id: String,
    /// `insufficient_funds`, `payment_declined` or `payment_unavailable`.
    pub reason: String,
}
event_payload!(PaymentFailed, "payments.failed.v1", order_id);

/// `cmd.orders.place.v1`: place an order without HTTP. Durable in its stream while the service is
/// down; idempotent by `order_id` when given (and by `Nats-Msg-Id` in the stream's window).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrder {
    /// Optional client-chosen order id (UUID).
    #[serde(default)]
    pub order_id: Option<String>,
    /// Who pays.
    pub customer_id: String,
    /// Currency.
    pub currency: String,
    /// Lines.
    pub items: Vec<LineInput>,
}
impl EventPayload for PlaceOrder {
    const TYPE: &'static str = "cmd.orders.place.v1";
    fn entity_id(&self) -> String {
        self.order_id.clone().unwrap_or_default()
    }
}

/// `cmd.orders.cancel.v1`: the customer cancels, without HTTP.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelOrder {
    /// The order.
    pub order_id: String,
}
event_payload!(CancelOrder, "cmd.orders.cancel.v1", order_id);
