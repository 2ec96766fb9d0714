//! Products, reservations and per-order state in the database; the shell that applies
//! [`crate::domain::decide`] and announces the result in the same transaction.

use std::collections::BTreeMap;

use event_toolkit::db::{lock_clause, lock_entity, now_micros};
use event_toolkit::write_behind::Together;
use event_toolkit::{emit, Context};
use serde::Serialize;
use sqlx::{AnyConnection, AnyPool, Row};

use crate::domain::{decide, reserve, Action, Happening, OrderState};
use crate::events::{
    OrderPlaced, StockCommitted, StockLine, StockRejected, StockReleased, StockReserved,
};

/// A product's stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Product {
    /// Stock keeping unit.
    pub sku: String,
    /// Units free to reserve.
    pub available: i64,
    /// Units held for orders in flight.
    pub reserved: i64,
    /// Units sold.
    pub sold: i64,
}

/// One reserved line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Reservation {
    /// The order.
    pub order_id: String,
    /// Stock keeping unit.
    pub sku: String,
    /// Units.
    pub quantity: i64,
    /// RESERVED, RELEASED or COMMITTED.
    pub status: String,
}

/// Set a product's available stock (creating it), keeping the stock-ever-added ledger exact.
pub async fn set_available(
    conn: &mut AnyConnection,
    sku: &str,
    available: i64,
) -> Result<Product, sqlx::Error> {
    let now = now_micros();
    sqlx::query(
        "INSERT INTO products (sku, available, reserved, sold, added, updated_at_us) VALUES ($1, $2, 0, 0, $2, $3) \
         ON CONFLICT (sku) DO UPDATE SET added = products.added + (excluded.available - products.available), \
         available = excluded.available, updated_at_us = excluded.updated_at_us",
    )
    .bind(sku)
    .bind(available)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    let row = sqlx::query("SELECT sku, available, reserved, sold FROM products WHERE sku = $1")
        .bind(sku)
        .fetch_one(&mut *conn)
        .await?;
    product(&row)
}

fn product(r: &sqlx::any::AnyRow) -> Result<Product, sqlx::Error> {
    Ok(Product {
        sku: r.try_get(0)?,
        available: r.try_get(1)?,
        reserved: r.try_get(2)?,
        sold: r.try_get(3)?,
    })
}

/// One product.
pub async fn get_product(pool: &AnyPool, sku: &str) -> Result<Option<Product>, sqlx::Error> {
    sqlx::query("SELECT sku, available, reserved, sold FROM products WHERE sku = $1")
        .bind(sku)
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(product)
        .transpose()
}

/// Products by SKU, after SKU `after` if given; at most `limit`.
pub async fn list_products(
    pool: &AnyPool,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Product>, sqlx::Error> {
    // Every SKU is non-empty, so "" starts before the first one.
    let rows = sqlx::query(
        "SELECT sku, available, reserved, sold FROM products WHERE sku > $1 ORDER BY sku LIMIT $2",
    )
    .bind(after.unwrap_or(""))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(product).collect()
}

/// The lines reserved for an order, by SKU, after SKU `after` if given; at most `limit`.
pub async fn reservations(
    pool: &AnyPool,
    order_id: &str,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Reservation>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT order_id, sku, quantity, status FROM reservations \
         WHERE order_id = $1 AND sku > $2 ORDER BY sku LIMIT $3",
    )
    .bind(order_id)
    .bind(after.unwrap_or(""))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Reservation {
                order_id: r.try_get(0)?,
                sku: r.try_get(1)?,
                quantity: r.try_get(2)?,
                status: r.try_get(3)?,
            })
        })
        .collect()
}

/// The order's state, its row locked (created as `UNSEEN` if new) so that every handler of one
/// order runs one after the other, even across consumers.
async fn order_state(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<Option<OrderState>, sqlx::Error> {
    // The row is created UNSEEN and locked: it serializes every handler of this order.
    let row = lock_entity(
        conn,
        "order_states",
        "order_id",
        order_id,
        &[
            ("state", "'UNSEEN'"),
            ("updated_at_us", &now_micros().to_string()),
        ],
        "state",
    )
    .await?;
    Ok(OrderState::parse(&row.try_get::<String, _>(0)?))
}

async fn set_state(
    conn: &mut AnyConnection,
    order_id: &str,
    state: OrderState,
) -> Result<(), sqlx::Error> {
    let mut writes = Together::default();
    push_state(&mut writes, order_id, state);
    writes.execute(conn).await
}

/// [`set_state`], added to writes sent together.
fn push_state(writes: &mut Together, order_id: &str, state: OrderState) {
    writes.push(
        "INSERT INTO order_states (order_id, state, updated_at_us) VALUES ($1, $2, $3) \
         ON CONFLICT (order_id) DO UPDATE SET state = excluded.state, updated_at_us = excluded.updated_at_us",
        vec![order_id.into(), state.as_str().into(), now_micros().into()],
    );
}

/// What applying a saga event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Reserved and announced.
    Reserved,
    /// Refused and announced.
    Rejected,
    /// Released and announced.
    Released,
    /// Committed and announced.
    Committed,
    /// Cancellation remembered for a placement not seen yet.
    Remembered,
    /// Nothing to do.
    Nothing,
}

/// Apply a saga event to an order's reservation, in the caller's transaction. `placed` carries the
/// placement's lines when `happening` is [`Happening::Placed`].
pub async fn apply(
    conn: &mut AnyConnection,
    ctx: &Context,
    order_id: &str,
    happening: Happening,
    placed: Option<&OrderPlaced>,
) -> Result<Outcome, sqlx::Error> {
    let state = order_state(conn, order_id).await?;
    match decide(state, happening) {
        Action::Nothing => Ok(Outcome::Nothing),
        Action::RememberCancellation => {
            set_state(conn, order_id, OrderState::CancelledEarly).await?;
            Ok(Outcome::Remembered)
        }
        Action::TryReserve => match placed {
            Some(p) => try_reserve(conn, ctx, p).await,
            None => Ok(Outcome::Nothing),
        },
        Action::Commit => {
            let mut writes = Together::default();
            let lines = move_reserved(conn, &mut writes, order_id, "sold", "COMMITTED").await?;
            push_state(&mut writes, order_id, OrderState::Committed);
            writes.execute(conn).await?;
            let committed = StockCommitted {
                order_id: order_id.to_owned(),
                items: lines,
            };
            emit(conn, ctx, &committed).await?;
            Ok(Outcome::Committed)
        }
        Action::Release => {
            let mut writes = Together::default();
            let lines = move_reserved(conn, &mut writes, order_id, "available", "RELEASED").await?;
            push_state(&mut writes, order_id, OrderState::Released);
            writes.execute(conn).await?;
            let released = StockReleased {
                order_id: order_id.to_owned(),
                items: lines,
            };
            emit(conn, ctx, &released).await?;
            Ok(Outcome::Released)
        }
    }
}

async fn try_reserve(
    conn: &mut AnyConnection,
    ctx: &Context,
    placed: &OrderPlaced,
) -> Result<Outcome, sqlx::Error> {
    let lines: Vec<(String, i64)> = placed
        .items
        .iter()
        .map(|l| (l.sku.clone(), l.quantity))
        .collect();
    // Lock the products in SKU order so concurrent reservations cannot deadlock.
    let mut available = BTreeMap::new();
    for sku in crate::domain::merge(&lines).unwrap_or_default().keys() {
        let sql = format!(
            "SELECT available FROM products WHERE sku = $1{}",
            lock_clause(conn)
        );
        if let Some(r) = sqlx::query(&sql)
            .bind(sku)
            .fetch_optional(&mut *conn)
            .await?
        {
            available.insert(sku.clone(), r.try_get::<i64, _>(0)?);
        }
    }
    match reserve(&lines, &available) {
        Ok(wanted) => {
            let now = now_micros();
            // Products (in SKU order, as they were locked), reservations and state in one call.
            let mut writes = Together::default();
            for (sku, qty) in &wanted {
                writes.push(
                    "UPDATE products SET available = available - $1, reserved = reserved + $1, updated_at_us = $2 WHERE sku = $3",
                    vec![(*qty).into(), now.into(), sku.as_str().into()],
                );
                writes.push(
                    "INSERT INTO reservations (order_id, sku, quantity, status, updated_at_us) VALUES ($1, $2, $3, 'RESERVED', $4)",
                    vec![placed.order_id.as_str().into(), sku.as_str().into(), (*qty).into(), now.into()],
                );
            }
            push_state(&mut writes, &placed.order_id, OrderState::Reserved);
            writes.execute(conn).await?;
            let payload = StockReserved {
                order_id: placed.order_id.clone(),
                customer_id: placed.customer_id.clone(),
                total_minor: placed.total_minor,
                currency: placed.currency.clone(),
                items: wanted
                    .into_iter()
                    .map(|(sku, quantity)| StockLine { sku, quantity })
                    .collect(),
            };
            emit(conn, ctx, &payload).await?;
            Ok(Outcome::Reserved)
        }
        Err(rejection) => {
            set_state(conn, &placed.order_id, OrderState::Rejected).await?;
            let payload = StockRejected {
                order_id: placed.order_id.clone(),
                reason: rejection.reason().to_owned(),
                sku: rejection.sku().to_owned(),
            };
            emit(conn, ctx, &payload).await?;
            Ok(Outcome::Rejected)
        }
    }
}

/// Mark an order's reserved lines `status`, and add to `writes` the move of their units to `to`
/// (`available` or `sold`).
async fn move_reserved(
    conn: &mut AnyConnection,
    writes: &mut Together,
    order_id: &str,
    to: &'static str,
    status: &'static str,
) -> Result<Vec<StockLine>, sqlx::Error> {
    let now = now_micros();
    // Marked and read in one statement.
    let rows = sqlx::query(
        "UPDATE reservations SET status = $1, updated_at_us = $2 \
         WHERE order_id = $3 AND status = 'RESERVED' RETURNING sku, quantity",
    )
    .bind(status)
    .bind(now)
    .bind(order_id)
    .fetch_all(&mut *conn)
    .await?;
    let mut reserved = rows
        .iter()
        .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)?)))
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    // Products in SKU order, as reservations lock them, so the two cannot deadlock.
    reserved.sort();
    let mut lines = Vec::with_capacity(reserved.len());
    for (sku, qty) in reserved {
        let sql = format!(
            "UPDATE products SET reserved = reserved - $1, {to} = {to} + $1, updated_at_us = $2 WHERE sku = $3"
        );
        writes.push(sql, vec![qty.into(), now.into(), sku.as_str().into()]);
        lines.push(StockLine { sku, quantity: qty });
    }
    Ok(lines)
}

/// Per-SKU ledger check (available + reserved + sold = added, available ≥ 0); SKUs that break it.
pub async fn ledger_violations(pool: &AnyPool) -> Result<Vec<String>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT sku FROM products WHERE available + reserved + sold <> added OR available < 0 OR reserved < 0 OR sold < 0",
    )
    .fetch_all(pool)
    .await?;
    rows.iter().map(|r| r.try_get(0)).collect()
}
