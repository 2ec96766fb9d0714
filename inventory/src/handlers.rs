//! Saga event handler: decode, validate, hand over to the store.

use event_toolkit::{DecodeError, Envelope, EventPayload, Handler, HandlerError};
use sqlx::AnyConnection;

use crate::domain::{valid_sku, Happening, MAX_LINES, MAX_QUANTITY};
use crate::events::{OrderCancelled, OrderConfirmed, OrderPlaced, PaymentFailed};
use crate::store;

/// Reacts to order and payment events.
#[derive(Debug, Clone)]
pub struct SagaEvents {
    /// CloudEvents source of what this service announces.
    pub source: String,
}

impl Handler for SagaEvents {
    async fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        let (order_id, happening, placed) = match event.event_type.as_str() {
            OrderPlaced::TYPE => {
                let p: OrderPlaced = event.payload()?;
                validate(&p)?;
                (p.order_id.clone(), Happening::Placed, Some(p))
            }
            OrderConfirmed::TYPE => (
                event.payload::<OrderConfirmed>()?.order_id,
                Happening::Confirmed,
                None,
            ),
            OrderCancelled::TYPE => (
                event.payload::<OrderCancelled>()?.order_id,
                Happening::Cancelled,
                None,
            ),
            PaymentFailed::TYPE => (
                event.payload::<PaymentFailed>()?.order_id,
                Happening::Cancelled,
                None,
            ),
            other => return Err(DecodeError::UnknownType(other.to_owned()).into()),
        };
        if order_id.is_empty() || order_id.len() > 64 {
            return Err(HandlerError::Permanent(
                "order_id must be 1-64 characters".into(),
            ));
        }
        let outcome = store::apply(
            conn,
            &self.source,
            &order_id,
            happening,
            placed.as_ref(),
            event,
        )
        .await?;
        tracing::info!(%order_id, ?outcome, "inventory applied");
        Ok(())
    }
}

fn validate(p: &OrderPlaced) -> Result<(), HandlerError> {
    let bad = |m: &str| {
        Err(HandlerError::Permanent(format!(
            "invalid orders.placed: {m}"
        )))
    };
    if p.items.is_empty() {
        return bad("no items");
    }
    if p.items.iter().any(|l| !valid_sku(&l.sku)) {
        return bad("invalid sku");
    }
    if p.items.len() > MAX_LINES {
        return bad("too many items");
    }
    if p.items
        .iter()
        .any(|l| l.quantity <= 0 || l.quantity > MAX_QUANTITY)
    {
        return bad("quantities must be between 1 and 1000000");
    }
    if p.total_minor < 0 {
        return bad("negative total");
    }
    Ok(())
}
