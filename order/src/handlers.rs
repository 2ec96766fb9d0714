//! What the order service consumes, declared by payload type: inventory and payment outcomes,
//! commands people send, and every saga event for the timeline.

use std::time::Duration;

use event_toolkit::{Context, HandlerError, Ignore, On, Subscription};
use sqlx::AnyConnection;
use uuid::Uuid;

use crate::domain::{CancelReason, Happening, NewOrder};
use crate::events::{
    CancelOrder, PaymentFailed, PaymentSucceeded, PlaceOrder, StockRejected, StockReserved,
    COMMAND_STREAM, PAYMENT_REFUNDED, STOCK_COMMITTED, STOCK_RELEASED,
};
use crate::store::{self, Applied, Placed, Placement};
use crate::timeline::Projection;

/// The service's durables. `deadline` is given to orders placed by command.
pub fn subscriptions(deadline: Duration) -> Vec<Subscription> {
    vec![
        // Every saga event of the other two services also goes to the timeline; the ones the saga
        // itself does not act on are received for the timeline only.
        Subscription::new("order-from-inventory", "INVENTORY")
            .on::<StockReserved>(Saga)
            .on::<StockRejected>(Saga)
            .on_envelope(STOCK_RELEASED, Ignore)
            .on_envelope(STOCK_COMMITTED, Ignore)
            .also(Projection),
        Subscription::new("order-from-payments", "PAYMENTS")
            .on::<PaymentSucceeded>(Saga)
            .on::<PaymentFailed>(Saga)
            .on_envelope(PAYMENT_REFUNDED, Ignore)
            .also(Projection),
        Subscription::new("order-commands", COMMAND_STREAM)
            .on::<PlaceOrder>(Commands { deadline })
            .on::<CancelOrder>(Commands { deadline })
            // A mistyped command is dead-lettered where an operator sees it.
            .widen("cmd.orders.>"),
    ]
}

/// Reacts to inventory and payment outcomes.
#[derive(Debug, Clone, Copy)]
pub struct Saga;

impl Saga {
    async fn apply(
        conn: &mut AnyConnection,
        ctx: &Context,
        order_id: &str,
        happening: Happening,
    ) -> Result<(), HandlerError> {
        match store::apply(conn, ctx, order_id, happening).await? {
            Applied::NotFound => Err(HandlerError::Permanent(format!(
                "no order {order_id:?} for {happening:?}"
            ))),
            Applied::Decided(decision, order) => {
                tracing::info!(order_id = %order.id, ?decision, status = order.status.as_str(), "order updated");
                Ok(())
            }
        }
    }
}

impl On<StockReserved> for Saga {
    async fn on(
        &self,
        conn: &mut AnyConnection,
        ctx: &Context,
        e: StockReserved,
    ) -> Result<(), HandlerError> {
        Self::apply(conn, ctx, &e.order_id, Happening::StockReserved).await
    }
}

impl On<StockRejected> for Saga {
    async fn on(
        &self,
        conn: &mut AnyConnection,
        ctx: &Context,
        e: StockRejected,
    ) -> Result<(), HandlerError> {
        let reason = CancelReason::from_inventory(&e.reason);
        Self::apply(conn, ctx, &e.order_id, Happening::StockRejected(reason)).await
    }
}

impl On<PaymentSucceeded> for Saga {
    async fn on(
        &self,
        conn: &mut AnyConnection,
        ctx: &Context,
        e: PaymentSucceeded,
    ) -> Result<(), HandlerError> {
        Self::apply(conn, ctx, &e.order_id, Happening::PaymentSucceeded).await
    }
}

impl On<PaymentFailed> for Saga {
    async fn on(
        &self,
        conn: &mut AnyConnection,
        ctx: &Context,
        e: PaymentFailed,
    ) -> Result<(), HandlerError> {
        let reason = CancelReason::from_payment(&e.reason);
        Self::apply(conn, ctx, &e.order_id, Happening::PaymentFailed(reason)).await
    }
}

/// Commands sent by people with the nats CLI.
#[derive(Debug, Clone, Copy)]
pub struct Commands {
    /// Saga deadline for new orders.
    pub deadline: Duration,
}

impl On<PlaceOrder> for Commands {
    async fn on(
        &self,
        conn: &mut AnyConnection,
        ctx: &Context,
        cmd: PlaceOrder,
    ) -> Result<(), HandlerError> {
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
        match store::place(conn, ctx, &order, placement).await? {
            Placed::Created(o) => tracing::info!(order_id = %o.id, "order placed by command"),
            Placed::Existing(o) => tracing::info!(order_id = %o.id, "order already placed"),
            Placed::KeyReused => {}
        }
        Ok(())
    }
}

impl On<CancelOrder> for Commands {
    async fn on(
        &self,
        conn: &mut AnyConnection,
        ctx: &Context,
        cmd: CancelOrder,
    ) -> Result<(), HandlerError> {
        // Spelled as a placement would have stored it (any UUID form names the same order).
        let order_id = Uuid::parse_str(&cmd.order_id)
            .map(|u| u.to_string())
            .unwrap_or(cmd.order_id);
        Saga::apply(conn, ctx, &order_id, Happening::CustomerCancelled).await
    }
}
