//! Saga event handler: decode, validate, hand over to the store.

use event_toolkit::{DecodeError, Envelope, EventPayload, Handler, HandlerError};
use sqlx::AnyConnection;

use crate::events::{OrderCancelled, StockReserved};
use crate::store;

/// Reacts to reservations (charge) and cancellations (never charge, or refund).
#[derive(Debug, Clone)]
pub struct SagaEvents {
    /// CloudEvents source of what this service announces.
    pub source: String,
}

impl Handler for SagaEvents {
    async fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        match event.event_type.as_str() {
            StockReserved::TYPE => {
                let r: StockReserved = event.payload()?;
                if r.order_id.is_empty() || r.order_id.len() > 64 || r.customer_id.is_empty() {
                    return Err(HandlerError::Permanent(
                        "order_id and customer_id are required".into(),
                    ));
                }
                if r.total_minor < 0 {
                    return Err(HandlerError::Permanent(
                        "total_minor must not be negative".into(),
                    ));
                }
                let created = store::on_stock_reserved(conn, &r, event).await?;
                tracing::info!(order_id = %r.order_id, created, "reservation seen");
                Ok(())
            }
            OrderCancelled::TYPE => {
                let c: OrderCancelled = event.payload()?;
                if c.order_id.is_empty() || c.order_id.len() > 64 {
                    return Err(HandlerError::Permanent(
                        "order_id must be 1-64 characters".into(),
                    ));
                }
                let decision =
                    store::on_order_cancelled(conn, &self.source, &c.order_id, event).await?;
                tracing::info!(order_id = %c.order_id, ?decision, "cancellation seen");
                Ok(())
            }
            other => Err(DecodeError::UnknownType(other.to_owned()).into()),
        }
    }
}
