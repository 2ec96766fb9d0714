//! The inventory service's event catalogue: what it announces (owned here) and its reading of what
//! it consumes (only the fields it needs). Documented in `docs/asyncapi.yaml`.

use event_toolkit::{EventPayload, StreamSpec};
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
impl EventPayload for StockReserved {
    const TYPE: &'static str = "inventory.reserved.v1";
    fn entity_id(&self) -> String {
        self.order_id.clone()
    }
}

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
impl EventPayload for StockRejected {
    const TYPE: &'static str = "inventory.rejected.v1";
    fn entity_id(&self) -> String {
        self.order_id.clone()
    }
}

/// `inventory.released.v1`: a reservation given back (compensation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockReleased {
    /// The order.
    pub order_id: String,
    /// What was given back.
    pub items: Vec<StockLine>,
}
impl EventPayload for StockReleased {
    const TYPE: &'static str = "inventory.released.v1";
    fn entity_id(&self) -> String {
        self.order_id.clone()
    }
}

/// `inventory.committed.v1`: a reservation sold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockCommitted {
    /// The order.
    pub order_id: String,
    /// What was sold.
    pub items: Vec<StockLine>,
}
impl EventPayload for StockCommitted {
    const TYPE: &'static str = "inventory.committed.v1";
    fn entity_id(&self) -> String {
        self.order_id.clone()
    }
}

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
impl EventPayload for OrderPlaced {
    const TYPE: &'static str = "orders.placed.v1";
    fn entity_id(&self) -> String {
        self.order_id.clone()
    }
}

/// `orders.confirmed.v1`, as read here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderConfirmed {
    /// The order.
    pub order_id: String,
}
impl EventPayload for OrderConfirmed {
    const TYPE: &'static str = "orders.confirmed.v1";
    fn entity_id(&self) -> String {
        self.order_id.clone()
    }
}

/// `orders.cancelled.v1`, as read here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderCancelled {
    /// The order.
    pub order_id: String,
}
impl EventPayload for OrderCancelled {
    const TYPE: &'static str = "orders.cancelled.v1";
    fn entity_id(&self) -> String {
        self.order_id.clone()
    }
}

/// `payments.failed.v1`, as read here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentFailed {
    /// The order.
    pub order_id: String,
}
impl EventPayload for PaymentFailed {
    const TYPE: &'static str = "payments.failed.v1";
    fn entity_id(&self) -> String {
        self.order_id.clone()
    }
}
