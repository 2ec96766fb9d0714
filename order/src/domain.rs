//! The order's rules, free of HTTP, SQL and NATS: what a valid order is, and how its saga status
//! moves when something happens.

use event_toolkit::ids::valid_identifier;
use serde::{Deserialize, Serialize};

/// Largest quantity of one line.
pub const MAX_QUANTITY: i64 = 1_000_000;
/// Most lines in one order.
pub const MAX_LINES: usize = 100;
/// Largest unit price (minor units): 10^12, ten billion in a two-decimal currency.
pub const MAX_UNIT_PRICE_MINOR: i64 = 1_000_000_000_000;

/// Where an order's saga stands.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    /// Placed; waiting for inventory.
    Pending,
    /// Stock reserved; waiting for payment.
    Reserved,
    /// Paid and stock committed: terminal.
    Confirmed,
    /// Cancelled, with a reason: terminal.
    Cancelled,
}

impl OrderStatus {
    /// Stored and displayed form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Reserved => "RESERVED",
            Self::Confirmed => "CONFIRMED",
            Self::Cancelled => "CANCELLED",
        }
    }

    /// Parse the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "PENDING" => Some(Self::Pending),
            "RESERVED" => Some(Self::Reserved),
            "CONFIRMED" => Some(Self::Confirmed),
            "CANCELLED" => Some(Self::Cancelled),
            _ => None,
        }
    }

    /// No further transitions.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Confirmed | Self::Cancelled)
    }
}

/// Why an order was cancelled.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    /// Inventory lacked stock.
    InsufficientStock,
    /// A SKU does not exist.
    UnknownSku,
    /// The customer's balance was too low.
    InsufficientFunds,
    /// The payment provider declined.
    PaymentDeclined,
    /// The payment provider could not be reached.
    PaymentUnavailable,
    /// The customer asked.
    CustomerCancelled,
    /// No outcome before the deadline.
    DeadlineExceeded,
}

impl CancelReason {
    /// Stored and displayed form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InsufficientStock => "insufficient_stock",
            Self::UnknownSku => "unknown_sku",
            Self::InsufficientFunds => "insufficient_funds",
            Self::PaymentDeclined => "payment_declined",
            Self::PaymentUnavailable => "payment_unavailable",
            Self::CustomerCancelled => "customer_cancelled",
            Self::DeadlineExceeded => "deadline_exceeded",
        }
    }

    /// Parse a reason carried by another service's event; unknown ones map to the nearest
    /// family so an order is never left hanging on a new reason string.
    pub fn from_inventory(s: &str) -> Self {
        match s {
            "unknown_sku" => Self::UnknownSku,
            _ => Self::InsufficientStock,
        }
    }

    /// See [`CancelReason::from_inventory`].
    pub fn from_payment(s: &str) -> Self {
        match s {
            "insufficient_funds" => Self::InsufficientFunds,
            "payment_unavailable" => Self::PaymentUnavailable,
            _ => Self::PaymentDeclined,
        }
    }

    /// Parse the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::InsufficientStock,
            Self::UnknownSku,
            Self::InsufficientFunds,
            Self::PaymentDeclined,
            Self::PaymentUnavailable,
            Self::CustomerCancelled,
            Self::DeadlineExceeded,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// Something that happened to an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Happening {
    /// Inventory reserved its stock.
    StockReserved,
    /// Inventory refused.
    StockRejected(CancelReason),
    /// The charge went through.
    PaymentSucceeded,
    /// The charge failed.
    PaymentFailed(CancelReason),
    /// The customer asked to cancel.
    CustomerCancelled,
    /// The deadline passed.
    DeadlinePassed,
}

/// What to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Move to `status`, announcing nothing.
    Advance(OrderStatus),
    /// Confirm and announce it.
    Confirm,
    /// Cancel with a reason and announce it (others compensate).
    Cancel(CancelReason),
    /// Nothing changes (late, duplicate or superseded news).
    Ignore,
    /// A customer asked for something the order's state forbids.
    Refuse,
}

/// The saga's state machine, seen from the order.
///
/// Terminal states never move: news arriving after the end is ignored, and the other services
/// compensate on their own (payment refunds a charge for an order it knows cancelled).
pub fn decide(status: OrderStatus, happening: Happening) -> Decision {
    use Happening as H;
    use OrderStatus as S;
    match (status, happening) {
        (S::Cancelled, H::CustomerCancelled) => Decision::Ignore,
        (S::Confirmed, H::CustomerCancelled) => Decision::Refuse,
        (s, _) if s.is_terminal() => Decision::Ignore,
        (S::Pending, H::StockReserved) => Decision::Advance(S::Reserved),
        (_, H::StockReserved) => Decision::Ignore,
        (_, H::PaymentSucceeded) => Decision::Confirm,
        (_, H::StockRejected(r)) | (_, H::PaymentFailed(r)) => Decision::Cancel(r),
        (_, H::CustomerCancelled) => Decision::Cancel(CancelReason::CustomerCancelled),
        (_, H::DeadlinePassed) => Decision::Cancel(CancelReason::DeadlineExceeded),
    }
}

/// An ISO 4217-shaped currency code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Currency(String);

impl Currency {
    /// Three ASCII capital letters.
    pub fn parse(s: &str) -> Result<Self, String> {
        if event_toolkit::ids::valid_currency(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!("currency must be three capital letters, got {s:?}"))
        }
    }
    /// The code.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One validated order line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Line {
    /// Stock keeping unit.
    pub sku: String,
    /// Positive quantity.
    pub quantity: i64,
    /// Unit price in minor units.
    pub unit_price_minor: i64,
}

/// A validated order, ready to be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    /// Who orders.
    pub customer_id: String,
    /// Currency of all amounts.
    pub currency: Currency,
    /// Lines, at least one.
    pub lines: Vec<Line>,
    /// Sum of quantity × unit price.
    pub total_minor: i64,
}

/// A line as it arrives from outside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LineInput {
    /// Stock keeping unit.
    pub sku: String,
    /// Quantity (> 0).
    pub quantity: i64,
    /// Unit price in minor units (≥ 0).
    pub unit_price_minor: i64,
}

impl NewOrder {
    /// Parse, don't validate: an invalid order cannot exist past this point.
    pub fn parse(customer_id: &str, currency: &str, items: &[LineInput]) -> Result<Self, String> {
        if !valid_identifier(customer_id) {
            return Err(
                "customer_id must be 1-64 characters of letters, digits, '-', '_', '.', ':' or '@'"
                    .into(),
            );
        }
        let currency = Currency::parse(currency)?;
        if items.is_empty() {
            return Err("items must not be empty".into());
        }
        if items.len() > MAX_LINES {
            return Err(format!("at most {MAX_LINES} items per order"));
        }
        let mut total: i64 = 0;
        let mut lines = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            if !valid_identifier(&item.sku) {
                return Err(format!("items[{i}].sku must be 1-64 characters of letters, digits, '-', '_', '.', ':' or '@'"));
            }
            if item.quantity <= 0 || item.quantity > MAX_QUANTITY {
                return Err(format!(
                    "items[{i}].quantity must be between 1 and {MAX_QUANTITY}"
                ));
            }
            if !(0..=MAX_UNIT_PRICE_MINOR).contains(&item.unit_price_minor) {
                return Err(format!(
                    "items[{i}].unit_price_minor must be between 0 and {MAX_UNIT_PRICE_MINOR}"
                ));
            }
            total = item
                .quantity
                .checked_mul(item.unit_price_minor)
                .and_then(|line| total.checked_add(line))
                .ok_or_else(|| "order total overflows".to_owned())?;
            lines.push(Line {
                sku: item.sku.clone(),
                quantity: item.quantity,
                unit_price_minor: item.unit_price_minor,
            });
        }
        Ok(Self {
            customer_id: customer_id.to_owned(),
            currency,
            lines,
            total_minor: total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CancelReason as R;
    use Happening as H;
    use OrderStatus as S;

    #[test]
    fn happy_path_reserves_then_confirms() {
        assert_eq!(
            decide(S::Pending, H::StockReserved),
            Decision::Advance(S::Reserved)
        );
        assert_eq!(decide(S::Reserved, H::PaymentSucceeded), Decision::Confirm);
    }

    #[test]
    fn payment_news_may_overtake_the_reservation_news() {
        assert_eq!(decide(S::Pending, H::PaymentSucceeded), Decision::Confirm);
        assert_eq!(decide(S::Confirmed, H::StockReserved), Decision::Ignore);
    }

    #[test]
    fn failures_cancel_with_their_reason() {
        assert_eq!(
            decide(S::Pending, H::StockRejected(R::UnknownSku)),
            Decision::Cancel(R::UnknownSku)
        );
        assert_eq!(
            decide(S::Reserved, H::PaymentFailed(R::InsufficientFunds)),
            Decision::Cancel(R::InsufficientFunds)
        );
        assert_eq!(
            decide(S::Reserved, H::DeadlinePassed),
            Decision::Cancel(R::DeadlineExceeded)
        );
    }

    #[test]
    fn terminal_orders_never_move() {
        for h in [
            H::StockReserved,
            H::PaymentSucceeded,
            H::PaymentFailed(R::PaymentDeclined),
            H::DeadlinePassed,
        ] {
            assert_eq!(decide(S::Cancelled, h), Decision::Ignore, "{h:?}");
            assert_eq!(decide(S::Confirmed, h), Decision::Ignore, "{h:?}");
        }
    }

    #[test]
    fn customer_cancel_is_refused_once_confirmed_and_idempotent_once_cancelled() {
        assert_eq!(decide(S::Confirmed, H::CustomerCancelled), Decision::Refuse);
        assert_eq!(decide(S::Cancelled, H::CustomerCancelled), Decision::Ignore);
        assert_eq!(
            decide(S::Reserved, H::CustomerCancelled),
            Decision::Cancel(R::CustomerCancelled)
        );
    }

    fn line(sku: &str, quantity: i64, price: i64) -> LineInput {
        LineInput {
            sku: sku.into(),
            quantity,
            unit_price_minor: price,
        }
    }

    #[test]
    fn a_valid_order_has_its_total() {
        let o = NewOrder::parse("alice", "EUR", &[line("A", 2, 150), line("B", 1, 99)]).unwrap();
        assert_eq!(o.total_minor, 399);
    }

    #[test]
    fn invalid_orders_cannot_be_built() {
        assert!(NewOrder::parse("", "EUR", &[line("A", 1, 1)]).is_err());
        assert!(NewOrder::parse("alice", "eur", &[line("A", 1, 1)]).is_err());
        assert!(NewOrder::parse("alice", "EUR", &[]).is_err());
        assert!(NewOrder::parse("alice", "EUR", &[line("A", 0, 1)]).is_err());
        assert!(NewOrder::parse("alice", "EUR", &[line("A", -3, 1)]).is_err());
        assert!(NewOrder::parse("alice", "EUR", &[line("A", 1, -1)]).is_err());
        assert!(NewOrder::parse("alice", "EUR", &[line("", 1, 1)]).is_err());
        assert!(NewOrder::parse("alice", "EUR", &[line("A", MAX_QUANTITY, i64::MAX)]).is_err());
    }
}
