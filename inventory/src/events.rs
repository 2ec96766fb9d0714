//! The inventory service's event catalogue: what it announces (owned here) and its reading of what
//! it consumes (only the fields it needs). Documented in `docs/asyncapi.yaml`.

use event_toolkit::{event_payload, EventPayload, StreamSpec};
use serde::{Deserialize, Serialize};

/// The stream of inventory events.
pub const STREAM: &str = "INVENTORY";

/// The streams this service owns.
pub fn streams() -> Vec<StreamSpec> {
    vec![StreamSpec::new(STREAM, &["inventory.>"])]
}

/// A quantity of one SKU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StockLine {
    /// Stock keeping unit.
    pub sku: String,
    /// Units.
    pub quantity: i64,
}

// ---- announced ----

/// The event types this service announces.
pub const PUBLISHES: [&str; 4] = [
    StockReserved::TYPE,
    StockRejected::TYPE,
    StockReleased::TYPE,
    StockCommitted::TYPE,
];

/// `inventory.reserved.v1`: stock held; carries what payment needs to charge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockReserved {
    /// The order.
    pub order_id: String,
    /// Who pays (from the placement).
    pub customer_id: String,
    /// Amount to charge (from the placement).
    pub total_minor: i64,
    /// Currency (from the placement).
    pub currency: String,
    /// What was reserved.
    pub items: Vec<StockLine>,
}
event_payload!(StockReserved, "inventory.reserved.v1", order_id);

/// `inventory.rejected.v1`: nothing reserved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockRejected {
    /// The order.
    pub order_id: String,
    /// `insufficient_stock` or `unknown_sku`.
    pub reason: String,
    /// The SKU at fault.
    pub sku: String,
}
event_payload!(StockRejected, "inventory.rejected.v1", order_id);

/// `inventory.released.v1`: a reservation given back (compensation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockReleased {
    /// The order.
    pub order_id: String,
    /// What was given back.
    pub items: Vec<StockLine>,
}
event_payload!(StockReleased, "inventory.released.v1", order_id);

/// `inventory.committed.v1`: a reservation sold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockCommitted {
    /// The order.
    pub order_id: String,
    /// What was sold.
    pub items: Vec<StockLine>,
}
event_payload!(StockCommitted, "inventory.committed.v1", order_id);

// ---- consumed ----

/// `orders.placed.v1`, as read here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderPlaced {
    /// The order.
    pub order_id: String,
    /// Who pays.
    pub customer_id: String,
    /// Currency.
    pub currency: String,
    /// Amount.
    pub total_minor: i64,
    /// Lines (extra fields such as prices are ignored).
    pub items: Vec<StockLine>,
}
event_payload!(OrderPlaced, "orders.placed.v1", order_id);

/// `orders.confirmed.v1`, as read here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderConfirmed {
    /// The order.
    pub order_id: String,
}
event_payload!(OrderConfirmed, "orders.confirmed.v1", order_id);

/// `orders.cancelled.v1`, as read here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderCancelled {
    /// The order.
    pub order_id: String,
}
event_payload!(OrderCancelled, "orders.cancelled.v1", order_id);

/// `payments.failed.v1`, as read here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentFailed {
    /// The order.
    pub order_id: String,
}
event_payload!(PaymentFailed, "payments.failed.v1", order_id);
