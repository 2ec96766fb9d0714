//! What the inventory service consumes, declared by payload type: order events (reserve, commit,
//! release) and payment failures (release).

use event_toolkit::{Context, HandlerError, On, Subscription};
use sqlx::AnyConnection;

use crate::domain::{valid_sku, Happening, MAX_LINES, MAX_QUANTITY};
use crate::events::{OrderCancelled, OrderConfirmed, OrderPlaced, PaymentFailed};
use crate::store;

/// The service's durables.
pub fn subscriptions() -> Vec<Subscription> {
    vec![
        Subscription::new("inventory-from-orders", "ORDERS")
            .on::<OrderPlaced>(Saga)
            .on::<OrderConfirmed>(Saga)
            .on::<OrderCancelled>(Saga),
        Subscription::new("inventory-from-payments", "PAYMENTS").on::<PaymentFailed>(Saga),
    ]
}

/// Reacts to order and payment events.
#[derive(Debug, Clone, Copy)]
pub struct Saga;

impl Saga {
    async fn apply(
        conn: &mut AnyConnection,
        ctx: &Context,
        order_id: &str,
        happening: Happening,
        placed: Option<&OrderPlaced>,
    ) -> Result<(), HandlerError> {
        if order_id.is_empty() || order_id.len() > 64 {
            return Err(HandlerError::Permanent(
                "order_id must be 1-64 characters".into(),
            ));
        }
        let outcome = store::apply(conn, ctx, order_id, happening, placed).await?;
        tracing::info!(%order_id, ?outcome, "inventory applied");
        Ok(())
    }
}

impl On<OrderPlaced> for Saga {
    async fn on(
        &self,
        conn: &mut AnyConnection,
        ctx: &Context,
        p: OrderPlaced,
    ) -> Result<(), HandlerError> {
        validate(&p)?;
        Self::apply(conn, ctx, &p.order_id, Happening::Placed, Some(&p)).await
    }
}

impl On<OrderConfirmed> for Saga {
    async fn on(
        &self,
        conn: &mut AnyConnection,
        ctx: &Context,
        e: OrderConfirmed,
    ) -> Result<(), HandlerError> {
        Self::apply(conn, ctx, &e.order_id, Happening::Confirmed, None).await
    }
}

impl On<OrderCancelled> for Saga {
    async fn on(
        &self,
        conn: &mut AnyConnection,
        ctx: &Context,
        e: OrderCancelled,
    ) -> Result<(), HandlerError> {
        Self::apply(conn, ctx, &e.order_id, Happening::Cancelled, None).await
    }
}

impl On<PaymentFailed> for Saga {
    async fn on(
        &self,
        conn: &mut AnyConnection,
        ctx: &Context,
        e: PaymentFailed,
    ) -> Result<(), HandlerError> {
        Self::apply(conn, ctx, &e.order_id, Happening::Cancelled, None).await
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
