//! What the payment service consumes, declared by payload type: reservations (charge) and
//! cancellations (never charge, or refund).

use event_toolkit::{Context, HandlerError, On, OutboxWaker, Subscription};
use sqlx::AnyConnection;

use crate::events::{OrderCancelled, StockReserved};
use crate::store;

/// The service's durables; a new reservation wakes `processor`.
pub fn subscriptions(processor: &OutboxWaker) -> Vec<Subscription> {
    vec![
        Subscription::new("payment-from-inventory", "INVENTORY")
            .on::<StockReserved>(Saga)
            .also_wake(processor.clone()),
        Subscription::new("payment-from-orders", "ORDERS").on::<OrderCancelled>(Saga),
    ]
}

/// Reacts to reservations and cancellations.
#[derive(Debug, Clone, Copy)]
pub struct Saga;

impl On<StockReserved> for Saga {
    async fn on(
        &self,
        conn: &mut AnyConnection,
        ctx: &Context,
        r: StockReserved,
    ) -> Result<(), HandlerError> {
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
        let created = store::on_stock_reserved(conn, ctx, &r).await?;
        tracing::info!(order_id = %r.order_id, created, "reservation seen");
        Ok(())
    }
}

impl On<OrderCancelled> for Saga {
    async fn on(
        &self,
        conn: &mut AnyConnection,
        ctx: &Context,
        c: OrderCancelled,
    ) -> Result<(), HandlerError> {
        if c.order_id.is_empty() || c.order_id.len() > 64 {
            return Err(HandlerError::Permanent(
                "order_id must be 1-64 characters".into(),
            ));
        }
        let decision = store::on_order_cancelled(conn, ctx, &c.order_id).await?;
        tracing::info!(order_id = %c.order_id, ?decision, "cancellation seen");
        Ok(())
    }
}
