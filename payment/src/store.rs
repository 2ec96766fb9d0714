//! Accounts, payments and known cancellations in the database; the shell applying the domain's
//! decisions and announcing them in the same transaction.

use event_toolkit::db::{lock_clause, micros_to_datetime, now_micros};
use event_toolkit::outbox::enqueue;
use event_toolkit::{Backend, Database, Envelope, EventPayload};
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AnyPool, Row};
use uuid::Uuid;

use crate::domain::{
    on_cancelled, on_reserved, FailReason, OnCancelled, OnReserved, PaymentStatus,
};
use crate::events::{PaymentFailed, PaymentRefunded, PaymentSucceeded, StockReserved};

/// A customer's account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Account {
    /// Customer.
    pub customer_id: String,
    /// Balance in minor units.
    pub balance_minor: i64,
    /// Currency.
    pub currency: String,
}

/// A payment as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Payment {
    /// Payment id.
    pub payment_id: String,
    /// The order.
    pub order_id: String,
    /// Who pays.
    pub customer_id: String,
    /// Amount.
    pub amount_minor: i64,
    /// Currency.
    pub currency: String,
    /// PENDING, CAPTURED, REFUNDED or FAILED.
    pub status: String,
    /// Why it failed.
    pub reason: Option<String>,
    /// Created.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Last changed.
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// Setting an account failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// An existing account cannot change currency.
    #[error("account {0} holds {1}; its currency cannot change")]
    CurrencyChange(String, String),
    /// Storage.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Set a balance (creating the account), keeping the deposited ledger exact.
pub async fn set_account(
    conn: &mut AnyConnection,
    customer_id: &str,
    balance: i64,
    currency: &str,
) -> Result<Account, AccountError> {
    let sql = format!(
        "SELECT currency FROM accounts WHERE customer_id = $1{}",
        lock_clause(conn)
    );
    if let Some(r) = sqlx::query(&sql)
        .bind(customer_id)
        .fetch_optional(&mut *conn)
        .await?
    {
        let existing: String = r.try_get(0)?;
        if existing != currency {
            return Err(AccountError::CurrencyChange(
                customer_id.to_owned(),
                existing,
            ));
        }
    }
    sqlx::query(
        "INSERT INTO accounts (customer_id, balance_minor, currency, deposited, updated_at_us) VALUES ($1, $2, $3, $2, $4) \
         ON CONFLICT (customer_id) DO UPDATE SET deposited = accounts.deposited + (excluded.balance_minor - accounts.balance_minor), \
         balance_minor = excluded.balance_minor, updated_at_us = excluded.updated_at_us",
    )
    .bind(customer_id)
    .bind(balance)
    .bind(currency)
    .bind(now_micros())
    .execute(&mut *conn)
    .await?;
    Ok(Account {
        customer_id: customer_id.to_owned(),
        balance_minor: balance,
        currency: currency.to_owned(),
    })
}

/// One account.
pub async fn get_account(
    pool: &AnyPool,
    customer_id: &str,
) -> Result<Option<Account>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT customer_id, balance_minor, currency FROM accounts WHERE customer_id = $1",
    )
    .bind(customer_id)
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        Ok(Account {
            customer_id: r.try_get(0)?,
            balance_minor: r.try_get(1)?,
            currency: r.try_get(2)?,
        })
    })
    .transpose()
}

const PAYMENT_COLUMNS: &str =
    "payment_id, order_id, customer_id, amount_minor, currency, status, reason, created_at_us, updated_at_us";

fn payment(r: &AnyRow) -> Result<Payment, sqlx::Error> {
    Ok(Payment {
        payment_id: r.try_get(0)?,
        order_id: r.try_get(1)?,
        customer_id: r.try_get(2)?,
        amount_minor: r.try_get(3)?,
        currency: r.try_get(4)?,
        status: r.try_get(5)?,
        reason: r.try_get(6)?,
        created_at: micros_to_datetime(r.try_get(7)?),
        updated_at: micros_to_datetime(r.try_get(8)?),
    })
}

/// Payments of an order (at most one), by order id, after `after` if given; at most `limit`.
pub async fn payments_for(
    pool: &AnyPool,
    order_id: &str,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Payment>, sqlx::Error> {
    // One payment per order today; listed like every other list (by key, after a cursor).
    let sql = format!(
        "SELECT {PAYMENT_COLUMNS} FROM payments WHERE order_id = $1 AND order_id > $2 \
         ORDER BY order_id LIMIT $3"
    );
    let rows = sqlx::query(&sql)
        .bind(order_id)
        .bind(after.unwrap_or(""))
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter().map(payment).collect()
}

async fn status_locked(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<Option<PaymentStatus>, sqlx::Error> {
    let sql = format!(
        "SELECT status FROM payments WHERE order_id = $1{}",
        lock_clause(conn)
    );
    let row = sqlx::query(&sql)
        .bind(order_id)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(match row {
        Some(r) => PaymentStatus::parse(&r.try_get::<String, _>(0)?),
        None => None,
    })
}

/// Lock the order's row (creating it), serializing every handler of this order; returns whether
/// the order is known cancelled.
async fn lock_order(conn: &mut AnyConnection, order_id: &str) -> Result<bool, sqlx::Error> {
    sqlx::query("INSERT INTO order_flags (order_id, cancelled, at_us) VALUES ($1, 0, $2) ON CONFLICT (order_id) DO NOTHING")
        .bind(order_id)
        .bind(now_micros())
        .execute(&mut *conn)
        .await?;
    let sql = format!(
        "SELECT cancelled FROM order_flags WHERE order_id = $1{}",
        lock_clause(conn)
    );
    let cancelled: i64 = sqlx::query(&sql)
        .bind(order_id)
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)?;
    Ok(cancelled != 0)
}

/// On `inventory.reserved`: start a payment unless the order is known cancelled or already has one.
/// Returns whether a payment was created.
pub async fn on_stock_reserved(
    conn: &mut AnyConnection,
    reserved: &StockReserved,
    cause: &Envelope,
) -> Result<bool, sqlx::Error> {
    let cancelled = lock_order(conn, &reserved.order_id).await?;
    let existing = status_locked(conn, &reserved.order_id).await?;
    if on_reserved(existing, cancelled) == OnReserved::Nothing {
        return Ok(false);
    }
    let now = now_micros();
    // The processor settles later, outside this consumer span: it keeps the span's context so
    // the outcome it announces stays in the saga's trace.
    let traceparent = event_toolkit::trace::TraceContext::current()
        .map(|t| t.traceparent)
        .or_else(|| cause.traceparent.clone());
    sqlx::query(
        "INSERT INTO payments (order_id, payment_id, customer_id, amount_minor, currency, status, reason, \
         lease_until_us, correlation_id, cause_event_id, traceparent, created_at_us, updated_at_us) \
         VALUES ($1, $2, $3, $4, $5, 'PENDING', NULL, 0, $6, $7, $8, $9, $9)",
    )
    .bind(&reserved.order_id)
    .bind(Uuid::now_v7().to_string())
    .bind(&reserved.customer_id)
    .bind(reserved.total_minor)
    .bind(&reserved.currency)
    .bind(cause.correlationid.as_deref())
    .bind(&cause.id)
    .bind(traceparent.as_deref())
    .bind(now)
    .execute(conn)
    .await?;
    Ok(true)
}

/// On `orders.cancelled`: remember it; refund a capture, or void a pending charge.
pub async fn on_order_cancelled(
    conn: &mut AnyConnection,
    source: &str,
    order_id: &str,
    cause: &Envelope,
) -> Result<OnCancelled, sqlx::Error> {
    let now = now_micros();
    lock_order(conn, order_id).await?;
    sqlx::query("UPDATE order_flags SET cancelled = 1, at_us = $1 WHERE order_id = $2")
        .bind(now)
        .bind(order_id)
        .execute(&mut *conn)
        .await?;
    let decision = on_cancelled(status_locked(conn, order_id).await?);
    match decision {
        OnCancelled::Nothing => {}
        OnCancelled::Void => {
            set_status(
                conn,
                order_id,
                PaymentStatus::Failed,
                Some(FailReason::OrderCancelled),
            )
            .await?;
        }
        OnCancelled::Refund => {
            let p = load(conn, order_id).await?;
            sqlx::query("UPDATE accounts SET balance_minor = balance_minor + $1, updated_at_us = $2 WHERE customer_id = $3")
                .bind(p.amount_minor)
                .bind(now)
                .bind(&p.customer_id)
                .execute(&mut *conn)
                .await?;
            set_status(conn, order_id, PaymentStatus::Refunded, None).await?;
            let e = cause.caused(
                source,
                &PaymentRefunded {
                    order_id: order_id.to_owned(),
                    payment_id: p.payment_id,
                    amount_minor: p.amount_minor,
                    currency: p.currency,
                },
            );
            enqueue(conn, PaymentRefunded::SUBJECT, &e).await?;
        }
    }
    Ok(decision)
}

async fn set_status(
    conn: &mut AnyConnection,
    order_id: &str,
    status: PaymentStatus,
    reason: Option<FailReason>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE payments SET status = $1, reason = $2, updated_at_us = $3 WHERE order_id = $4",
    )
    .bind(status.as_str())
    .bind(reason.map(|r| r.as_str()))
    .bind(now_micros())
    .bind(order_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// A pending payment with what the processor needs.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The order.
    pub order_id: String,
    /// The payment.
    pub payment_id: String,
    /// Who pays.
    pub customer_id: String,
    /// Amount.
    pub amount_minor: i64,
    /// Currency.
    pub currency: String,
    /// Status now.
    pub status: PaymentStatus,
    correlation_id: Option<String>,
    cause_event_id: Option<String>,
    traceparent: Option<String>,
}

async fn load(conn: &mut AnyConnection, order_id: &str) -> Result<Pending, sqlx::Error> {
    let r = sqlx::query(
        "SELECT order_id, payment_id, customer_id, amount_minor, currency, status, correlation_id, cause_event_id, traceparent \
         FROM payments WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_one(conn)
    .await?;
    let status: String = r.try_get(5)?;
    Ok(Pending {
        order_id: r.try_get(0)?,
        payment_id: r.try_get(1)?,
        customer_id: r.try_get(2)?,
        amount_minor: r.try_get(3)?,
        currency: r.try_get(4)?,
        status: PaymentStatus::parse(&status).unwrap_or(PaymentStatus::Failed),
        correlation_id: r.try_get(6)?,
        cause_event_id: r.try_get(7)?,
        traceparent: r.try_get(8)?,
    })
}

/// Read a payment (no lock) before calling the provider.
pub async fn peek(pool: &AnyPool, order_id: &str) -> Result<Pending, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    load(&mut conn, order_id).await
}

/// Balance and currency of an account, locked for the capture.
pub async fn balance_locked(
    conn: &mut AnyConnection,
    customer_id: &str,
) -> Result<Option<(i64, String)>, sqlx::Error> {
    let sql = format!(
        "SELECT balance_minor, currency FROM accounts WHERE customer_id = $1{}",
        lock_clause(conn)
    );
    let row = sqlx::query(&sql)
        .bind(customer_id)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
}

/// Claim up to `limit` pending payments whose lease has expired, leasing them for `lease_us`.
pub async fn claim_pending(
    db: &Database,
    limit: i64,
    lease_us: i64,
) -> Result<Vec<String>, sqlx::Error> {
    let now = now_micros();
    let mut tx = db.begin().await?;
    let skip = if db.backend() == Backend::Postgres {
        " FOR UPDATE SKIP LOCKED"
    } else {
        ""
    };
    let sql = format!(
        "SELECT order_id FROM payments WHERE status = 'PENDING' AND lease_until_us <= $1 ORDER BY created_at_us LIMIT $2{skip}"
    );
    let rows = sqlx::query(&sql)
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
    let ids: Vec<String> = rows
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    for id in &ids {
        sqlx::query("UPDATE payments SET lease_until_us = $1 WHERE order_id = $2")
            .bind(now + lease_us)
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(ids)
}

/// Settle a pending payment in the caller's transaction: capture (balance down, announce success)
/// or fail (announce the reason). A payment no longer pending (voided meanwhile) is left alone.
pub async fn settle(
    conn: &mut AnyConnection,
    source: &str,
    order_id: &str,
    outcome: impl FnOnce(Option<(i64, &str)>, &Pending) -> Result<(), FailReason>,
) -> Result<Option<Result<(), FailReason>>, sqlx::Error> {
    if status_locked(conn, order_id).await? != Some(PaymentStatus::Pending) {
        return Ok(None);
    }
    let p = load(conn, order_id).await?;
    let balance = balance_locked(conn, &p.customer_id).await?;
    let result = outcome(balance.as_ref().map(|(b, c)| (*b, c.as_str())), &p);
    let mut event = match result {
        Ok(()) => {
            sqlx::query("UPDATE accounts SET balance_minor = balance_minor - $1, updated_at_us = $2 WHERE customer_id = $3")
                .bind(p.amount_minor)
                .bind(now_micros())
                .bind(&p.customer_id)
                .execute(&mut *conn)
                .await?;
            set_status(conn, order_id, PaymentStatus::Captured, None).await?;
            (
                PaymentSucceeded::SUBJECT,
                Envelope::new(
                    source,
                    &PaymentSucceeded {
                        order_id: p.order_id.clone(),
                        payment_id: p.payment_id.clone(),
                        customer_id: p.customer_id.clone(),
                        amount_minor: p.amount_minor,
                        currency: p.currency.clone(),
                    },
                    p.correlation_id.clone(),
                ),
            )
        }
        Err(reason) => {
            set_status(conn, order_id, PaymentStatus::Failed, Some(reason)).await?;
            (
                PaymentFailed::SUBJECT,
                Envelope::new(
                    source,
                    &PaymentFailed {
                        order_id: p.order_id.clone(),
                        reason: reason.as_str().to_owned(),
                    },
                    p.correlation_id.clone(),
                ),
            )
        }
    };
    event.1.causationid = p.cause_event_id.clone();
    // The stored context wins over the current one unless that one continues the same trace
    // (a processor span made its child).
    if let Some(stored) = &p.traceparent {
        let continues = event
            .1
            .traceparent
            .as_deref()
            .is_some_and(|current| event_toolkit::trace::same_trace(current, stored));
        if !continues {
            event.1.traceparent = Some(stored.clone());
            event.1.tracestate = None;
        }
    }
    enqueue(conn, event.0, &event.1).await?;
    Ok(Some(result))
}

/// Money conservation: per account, balance + captured (not refunded) = deposited. Accounts that break it.
pub async fn ledger_violations(pool: &AnyPool) -> Result<Vec<String>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT a.customer_id FROM accounts a \
         LEFT JOIN (SELECT customer_id, CAST(SUM(amount_minor) AS BIGINT) AS captured FROM payments WHERE status = 'CAPTURED' GROUP BY customer_id) p \
         ON p.customer_id = a.customer_id \
         WHERE a.balance_minor + COALESCE(p.captured, 0) <> a.deposited OR a.balance_minor < 0",
    )
    .fetch_all(pool)
    .await?;
    rows.iter().map(|r| r.try_get(0)).collect()
}
