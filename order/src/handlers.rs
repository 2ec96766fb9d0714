//! Event and command handlers: decode, then hand over to the store's `apply`/`place`.

use std::time::Duration;

use event_toolkit::{DecodeError, Envelope, EventPayload, Handler, HandlerError};
use sqlx::AnyConnection;
use uuid::Uuid;

use crate::domain::{CancelReason, Happening, NewOrder};
use crate::events::{
    CancelOrder, PaymentFailed, PaymentSucceeded, PlaceOrder, StockRejected, StockReserved,
};
use crate::store::{self, Applied, Placed, Placement};

/// Reacts to inventory and payment outcomes.
#[derive(Debug, Clone)]
pub struct SagaEvents {
    /// CloudEvents source of what this service announces.
    pub source: String,
}

impl Handler for SagaEvents {
    async fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        let (order_id, happening) = match event.event_type.as_str() {
            StockReserved::TYPE => {
                let e: StockReserved = event.payload()?;
                (e.order_id, Happening::StockReserved)
            }
            StockRejected::TYPE => {
                let e: StockRejected = event.payload()?;
                let r = CancelReason::from_inventory(&e.reason);
                (e.order_id, Happening::StockRejected(r))
            }
            PaymentSucceeded::TYPE => {
                let e: PaymentSucceeded = event.payload()?;
                (e.order_id, Happening::PaymentSucceeded)
            }
            PaymentFailed::TYPE => {
                let e: PaymentFailed = event.payload()?;
                let r = CancelReason::from_payment(&e.reason);
                (e.order_id, Happening::PaymentFailed(r))
            }
            other => return Err(DecodeError::UnknownType(other.to_owned()).into()),
        };
        match store::apply(conn, &self.source, &order_id, happening, Some(event)).await? {
            Applied::NotFound => Err(HandlerError::Permanent(format!(
                "no order {order_id:?} for {}",
                event.event_type
            ))),
            Applied::Decided(decision, order) => {
                tracing::info!(order_id = %order.id, ?decision, status = order.status.as_str(), "order updated");
                Ok(())
            }
        }
    }
}

/// Commands sent by people with the nats CLI.
#[derive(Debug, Clone)]
pub struct Commands {
    /// CloudEvents source of what this service announces.
    pub source: String,
    /// Saga deadline for new orders.
    pub deadline: Duration,
}

impl Handler for Commands {
    async fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        match event.event_type.as_str() {
            PlaceOrder::TYPE => {
                let cmd: PlaceOrder = event.payload()?;
                let order = NewOrder::parse(&cmd.customer_id, &cmd.currency, &cmd.items)
                    .map_err(|e| HandlerError::Permanent(format!("invalid order: {e}")))?;
                let order_id = match &cmd.order_id {
                    Some(id) => Uuid::parse_str(id)
                        .map_err(|e| HandlerError::Permanent(format!("invalid order_id: {e}")))?
                        .to_string(),
                    None => Uuid::now_v7().to_string(),
                };
                let fingerprint = serde_json::to_string(&cmd.items).unwrap_or_default();
                let placement = Placement {
                    order_id: &order_id,
                    idempotency_key: None,
                    fingerprint: &fingerprint,
                    deadline: self.deadline,
                    id_may_exist: true,
                };
                match store::place(conn, &self.source, &order, placement, Some(event)).await? {
                    Placed::Created(o) => {
                        tracing::info!(order_id = %o.id, "order placed by command")
                    }
                    Placed::Existing(o) => tracing::info!(order_id = %o.id, "order already placed"),
                    Placed::KeyReused => {}
                }
                Ok(())
            }
            CancelOrder::TYPE => {
                let cmd: CancelOrder = event.payload()?;
                match store::apply(
                    conn,
                    &self.source,
                    &cmd.order_id,
                    Happening::CustomerCancelled,
                    Some(event),
                )
                .await?
                {
                    Applied::NotFound => Err(HandlerError::Permanent(format!(
                        "no order {:?}",
                        cmd.order_id
                    ))),
                    Applied::Decided(decision, o) => {
                        tracing::info!(order_id = %o.id, ?decision, "cancel command applied");
                        Ok(())
                    }
                }
            }
            other => Err(DecodeError::UnknownType(other.to_owned()).into()),
        }
    }
}
