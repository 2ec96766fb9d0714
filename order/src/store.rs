//! Orders in the database, and the thin shell that applies [`crate::domain::decide`]: load the
//! order (locked), decide, write the new state and enqueue the announcement in the same transaction.

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use event_toolkit::db::{lock_clause, micros_to_datetime, now_micros};
use event_toolkit::write_behind::{self, Together};
use event_toolkit::{emit, Context, Envelope, EventPayload};
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AnyPool, Row};

use crate::domain::{decide, CancelReason, Decision, Happening, Line, NewOrder, OrderStatus};
use crate::events::{OrderCancelled, OrderConfirmed, OrderPlaced};

/// An order as stored and served.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Order {
    /// Order id (UUID), also the saga's correlation id.
    pub id: String,
    /// Who pays.
    pub customer_id: String,
    /// Saga status.
    pub status: OrderStatus,
    /// Why it was cancelled, when it was.
    pub reason: Option<CancelReason>,
    /// Sum of the lines.
    pub total_minor: i64,
    /// Currency.
    pub currency: String,
    /// Lines.
    pub items: Vec<Line>,
    /// When the saga gives up.
    pub deadline_at: DateTime<Utc>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, customer_id, status, reason, total_minor, currency, items, deadline_at_us, created_at_us, updated_at_us";

fn from_row(r: &AnyRow) -> Result<Order, sqlx::Error> {
    let status: String = r.try_get(2)?;
    let reason: Option<String> = r.try_get(3)?;
    let items: String = r.try_get(6)?;
    Ok(Order {
        id: r.try_get(0)?,
        customer_id: r.try_get(1)?,
        status: OrderStatus::parse(&status)
            .ok_or_else(|| sqlx::Error::Decode(format!("bad status {status:?}").into()))?,
        reason: reason.as_deref().and_then(CancelReason::parse),
        total_minor: r.try_get(4)?,
        currency: r.try_get(5)?,
        items: serde_json::from_str(&items).map_err(|e| sqlx::Error::Decode(e.into()))?,
        deadline_at: micros_to_datetime(r.try_get(7)?),
        created_at: micros_to_datetime(r.try_get(8)?),
        updated_at: micros_to_datetime(r.try_get(9)?),
    })
}

/// One order.
pub async fn get(pool: &AnyPool, id: &str) -> Result<Option<Order>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM orders WHERE id = $1");
    sqlx::query(&sql)
        .bind(id)
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// Newest orders first (by creation time, then id), optionally with one status, starting after the
/// order `after` = (its `created_at` in microseconds, its id) if given; at most `limit`.
pub async fn list(
    pool: &AnyPool,
    status: Option<OrderStatus>,
    after: Option<(i64, &str)>,
    limit: i64,
) -> Result<Vec<Order>, sqlx::Error> {
    // Keyset: a page never skips or repeats an order, however many orders come before it.
    // Written without a row-value comparison so the created_at_us index bounds the scan.
    let (created, id) = after.unwrap_or((i64::MAX, ""));
    let keyset = "created_at_us <= $1 AND (created_at_us < $1 OR id < $2)";
    let order = "ORDER BY created_at_us DESC, id DESC";
    let rows = match status {
        Some(s) => {
            let sql = format!(
                "SELECT {COLUMNS} FROM orders WHERE {keyset} AND status = $3 {order} LIMIT $4"
            );
            sqlx::query(&sql)
                .bind(created)
                .bind(id)
                .bind(s.as_str())
                .bind(limit)
                .fetch_all(pool)
                .await?
        }
        None => {
            let sql = format!("SELECT {COLUMNS} FROM orders WHERE {keyset} {order} LIMIT $3");
            sqlx::query(&sql)
                .bind(created)
                .bind(id)
                .bind(limit)
                .fetch_all(pool)
                .await?
        }
    };
    rows.iter().map(from_row).collect()
}

/// One customer's orders, newest first, optionally with one status; the same keyset as [`list`]
/// (`after` = the last order's `created_at` in microseconds and id), at most `limit`.
pub async fn list_by_customer(
    pool: &AnyPool,
    customer_id: &str,
    status: Option<OrderStatus>,
    after: Option<(i64, &str)>,
    limit: i64,
) -> Result<Vec<Order>, sqlx::Error> {
    let (created, id) = after.unwrap_or((i64::MAX, ""));
    // The (customer_id, created_at_us, id) index bounds the scan to the customer's orders, read
    // in page order.
    let status_clause = if status.is_some() {
        "AND status = $5"
    } else {
        ""
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM orders WHERE customer_id = $1 \
         AND created_at_us <= $2 AND (created_at_us < $2 OR id < $3) {status_clause} \
         ORDER BY created_at_us DESC, id DESC LIMIT $4"
    );
    let mut query = sqlx::query(&sql)
        .bind(customer_id)
        .bind(created)
        .bind(id)
        .bind(limit);
    if let Some(s) = status {
        query = query.bind(s.as_str());
    }
    let rows = query.fetch_all(pool).await?;
    rows.iter().map(from_row).collect()
}

async fn load_locked(conn: &mut AnyConnection, id: &str) -> Result<Option<Order>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM orders WHERE id = $1{}",
        lock_clause(conn)
    );
    sqlx::query(&sql)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// Result of placing an order.
#[derive(Debug)]
pub enum Placed {
    /// A new order; its saga has started.
    Created(Order),
    /// The idempotency key (or order id) was seen before with the same request: that order.
    Existing(Order),
    /// The idempotency key was used before with a different request.
    KeyReused,
}

/// How a placement is identified for idempotency.
#[derive(Debug, Clone)]
pub struct Placement<'a> {
    /// The new order's id.
    pub order_id: &'a str,
    /// `Idempotency-Key` header or command id.
    pub idempotency_key: Option<&'a str>,
    /// Canonical form of the request, compared on key reuse.
    pub fingerprint: &'a str,
    /// How long the saga may take.
    pub deadline: std::time::Duration,
    /// Whether `order_id` was chosen by the client (and may name an existing order).
    pub id_may_exist: bool,
}

/// Insert the order and enqueue `orders.placed.v1`, in the caller's transaction.
pub async fn place(
    conn: &mut AnyConnection,
    ctx: &Context,
    order: &NewOrder,
    placement: Placement<'_>,
) -> Result<Placed, sqlx::Error> {
    if let Some(key) = placement.idempotency_key {
        let found =
            sqlx::query("SELECT id, request_fingerprint FROM orders WHERE idempotency_key = $1")
                .bind(key)
                .fetch_optional(&mut *conn)
                .await?;
        if let Some(row) = found {
            let id: String = row.try_get(0)?;
            let fingerprint: Option<String> = row.try_get(1)?;
            if fingerprint.as_deref() != Some(placement.fingerprint) {
                return Ok(Placed::KeyReused);
            }
            return Ok(match load_locked(conn, &id).await? {
                Some(o) => Placed::Existing(o),
                None => Placed::KeyReused,
            });
        }
    }
    // A client-chosen id (commands) may exist already; a fresh UUID v7 from HTTP cannot.
    if placement.id_may_exist {
        if let Some(existing) = load_locked(conn, placement.order_id).await? {
            return Ok(Placed::Existing(existing));
        }
    }
    let now = now_micros();
    let deadline_at = Utc::now()
        + ChronoDuration::from_std(placement.deadline).unwrap_or(ChronoDuration::seconds(30));
    let items = serde_json::to_string(&order.lines).map_err(|e| sqlx::Error::Encode(e.into()))?;
    let mut writes = Together::default();
    writes.push(
        "INSERT INTO orders (id, customer_id, status, reason, total_minor, currency, items, \
         deadline_at_us, created_at_us, updated_at_us, idempotency_key, request_fingerprint) \
         VALUES ($1, $2, 'PENDING', NULL, $3, $4, $5, $6, $7, $7, $8, $9)",
        vec![
            placement.order_id.into(),
            order.customer_id.as_str().into(),
            order.total_minor.into(),
            order.currency.as_str().into(),
            items.into(),
            deadline_at.timestamp_micros().into(),
            now.into(),
            placement.idempotency_key.into(),
            placement.fingerprint.into(),
        ],
    );
    let payload = OrderPlaced {
        order_id: placement.order_id.to_owned(),
        customer_id: order.customer_id.clone(),
        currency: order.currency.as_str().to_owned(),
        total_minor: order.total_minor,
        items: order.lines.clone(),
        deadline_at,
    };
    // The order id names the saga it starts.
    let ctx = ctx.clone().correlated(placement.order_id);
    let (event, rows) = gather_announcement(&mut *conn, &ctx, &payload).await;
    event?;
    if write_behind::gathering() {
        // In a batch of commands: the order now (a later command may ask for its key), its
        // event and timeline row with the batch's.
        writes.execute(&mut *conn).await?;
        rows.write(conn).await?;
    } else {
        // On Postgres the order, its event and its timeline row in one round trip.
        writes.rows(rows);
        writes.execute(conn).await?;
    }
    let now = micros_to_datetime(now);
    Ok(Placed::Created(Order {
        id: placement.order_id.to_owned(),
        customer_id: order.customer_id.clone(),
        status: OrderStatus::Pending,
        reason: None,
        total_minor: order.total_minor,
        currency: order.currency.as_str().to_owned(),
        items: order.lines.clone(),
        deadline_at: micros_to_datetime(deadline_at.timestamp_micros()),
        created_at: now,
        updated_at: now,
    }))
}

/// What applying a happening did.
#[derive(Debug)]
pub enum Applied {
    /// No such order.
    NotFound,
    /// The decision taken, and the order after it.
    Decided(Decision, Order),
}

/// Load the order, decide, persist and announce — all in the caller's transaction.
pub async fn apply(
    conn: &mut AnyConnection,
    ctx: &Context,
    order_id: &str,
    happening: Happening,
) -> Result<Applied, sqlx::Error> {
    let Some(order) = load_locked(conn, order_id).await? else {
        return Ok(Applied::NotFound);
    };
    let decision = decide(order.status, happening);
    let (status, reason) = match decision {
        Decision::Advance(s) => (s, None),
        Decision::Confirm => (OrderStatus::Confirmed, None),
        Decision::Cancel(r) => (OrderStatus::Cancelled, Some(r)),
        Decision::Ignore | Decision::Refuse => return Ok(Applied::Decided(decision, order)),
    };
    sqlx::query("UPDATE orders SET status = $1, reason = $2, updated_at_us = $3 WHERE id = $4")
        .bind(status.as_str())
        .bind(reason.map(|r| r.as_str()))
        .bind(now_micros())
        .bind(order_id)
        .execute(&mut *conn)
        .await?;
    let ctx = ctx.clone().correlated(order_id);
    match decision {
        Decision::Confirm => {
            let p = OrderConfirmed {
                order_id: order_id.to_owned(),
            };
            announce(conn, &ctx, &p).await?;
        }
        Decision::Cancel(r) => {
            let p = OrderCancelled {
                order_id: order_id.to_owned(),
                reason: r.as_str().to_owned(),
            };
            announce(conn, &ctx, &p).await?;
        }
        _ => {}
    }
    let updated = Order {
        status,
        reason,
        updated_at: Utc::now(),
        ..order
    };
    if matches!(decision, Decision::Confirm | Decision::Cancel(_)) {
        record_terminal(&updated);
    }
    Ok(Applied::Decided(decision, updated))
}

/// How many unfinished orders are past their deadline by more than a sweep's slack.
pub async fn open_past_deadline(pool: &AnyPool) -> Result<i64, sqlx::Error> {
    let slack = 2 * crate::deadline::SWEEP_INTERVAL.as_micros() as i64;
    sqlx::query(
        "SELECT COUNT(*) FROM orders WHERE status IN ('PENDING', 'RESERVED') AND deadline_at_us <= $1",
    )
    .bind(now_micros() - slack)
    .fetch_one(pool)
    .await?
    .try_get(0)
}

/// Ids of unfinished orders whose deadline has passed, oldest deadline first.
pub async fn overdue(pool: &AnyPool, limit: i64) -> Result<Vec<String>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id FROM orders WHERE status IN ('PENDING', 'RESERVED') AND deadline_at_us <= $1 \
         ORDER BY deadline_at_us LIMIT $2",
    )
    .bind(now_micros())
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(|r| r.try_get(0)).collect()
}

/// Count a saga's end once its transaction commits: `sagas_terminal_total{status, reason}` and
/// `saga_duration_seconds{status}` (placed → terminal).
fn record_terminal(order: &Order) {
    let status = order.status.as_str();
    let reason = order.reason.map_or("", |r| r.as_str());
    let took = (order.updated_at - order.created_at)
        .to_std()
        .unwrap_or_default()
        .as_secs_f64();
    event_toolkit::deferred::after_commit(move || {
        metrics::counter!("sagas_terminal_total", "status" => status, "reason" => reason)
            .increment(1);
        metrics::histogram!("saga_duration_seconds", "status" => status).record(took);
    });
}

/// Emit an order event and put it on the order's timeline: the two rows in one statement, or left
/// to the consumer batch this runs in.
async fn announce<P: EventPayload>(
    conn: &mut AnyConnection,
    ctx: &Context,
    payload: &P,
) -> Result<Envelope, sqlx::Error> {
    let (event, rows) = gather_announcement(&mut *conn, ctx, payload).await;
    let event = event?;
    rows.write(conn).await?;
    Ok(event)
}

/// An order event's outbox row and timeline row, gathered (not yet written).
async fn gather_announcement<P: EventPayload>(
    conn: &mut AnyConnection,
    ctx: &Context,
    payload: &P,
) -> (Result<Envelope, sqlx::Error>, write_behind::Pending) {
    write_behind::gather(async {
        let event = emit(&mut *conn, ctx, payload).await?;
        crate::timeline::record_own(&mut *conn, &event).await?;
        Ok::<_, sqlx::Error>(event)
    })
    .await
}
