//! Accounts, payments and known cancellations in the database; the shell applying the domain's
//! decisions and announcing them in the same transaction.

use event_toolkit::db::{lock_clause, lock_entity, micros_to_datetime, now_micros};
use event_toolkit::write_behind::{self, Together, Value};
use event_toolkit::{emit, Backend, Context, Database, EventPayload, Written};
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AnyPool, Row};
use uuid::Uuid;

use crate::domain::{
    follow_up, hold as decide_hold, on_cancelled, on_reserved, FailReason, FollowUp, Hold,
    OnCancelled, OnReserved, PaymentStatus, ProviderAnswer,
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
    let row = lock_entity(
        conn,
        "order_flags",
        "order_id",
        order_id,
        &[("cancelled", "0"), ("at_us", &now_micros().to_string())],
        "cancelled",
    )
    .await?;
    let cancelled: i64 = row.try_get(0)?;
    Ok(cancelled != 0)
}

/// On `inventory.reserved`: start a payment unless the order is known cancelled or already has one.
/// Returns whether a payment was created.
pub async fn on_stock_reserved(
    conn: &mut AnyConnection,
    ctx: &Context,
    reserved: &StockReserved,
) -> Result<bool, sqlx::Error> {
    let cancelled = lock_order(conn, &reserved.order_id).await?;
    if on_reserved(cancelled) == OnReserved::Nothing {
        return Ok(false);
    }
    let now = now_micros();
    // The processor settles later, outside this consumer span: it keeps the span's context so
    // the outcome it announces stays in the saga's trace.
    let traceparent = ctx.traceparent_to_keep();
    let inserted = sqlx::query(
        "INSERT INTO payments (order_id, payment_id, customer_id, amount_minor, currency, status, reason, \
         lease_until_us, correlation_id, cause_event_id, traceparent, created_at_us, updated_at_us) \
         VALUES ($1, $2, $3, $4, $5, 'PENDING', NULL, 0, $6, $7, $8, $9, $9) \
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(&reserved.order_id)
    .bind(Uuid::now_v7().to_string())
    .bind(&reserved.customer_id)
    .bind(reserved.total_minor)
    .bind(&reserved.currency)
    .bind(ctx.correlation())
    .bind(ctx.causation())
    .bind(traceparent.as_deref())
    .bind(now)
    .execute(conn)
    .await?;
    // Never charged twice: an order with a payment already keeps it (one statement where a
    // locked read and then the insert took two).
    Ok(inserted.rows_affected() == 1)
}

/// On `orders.cancelled`: remember it; refund a capture, or void a pending charge.
pub async fn on_order_cancelled(
    conn: &mut AnyConnection,
    ctx: &Context,
    order_id: &str,
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
            // A payment that held money may be with the provider right now: give the money
            // back to the account and void whatever the provider authorized (a void before the
            // charge arrives bars it; the processor voids again when its answer comes).
            let p = load(conn, order_id).await?;
            if p.held {
                release_hold(conn, &p, 0).await?;
                owe(conn, order_id, FollowUp::Void, now).await?;
            }
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
            let refunded = PaymentRefunded {
                order_id: order_id.to_owned(),
                payment_id: p.payment_id,
                amount_minor: p.amount_minor,
                currency: p.currency,
            };
            emit(conn, ctx, &refunded).await?;
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
    /// Its amount is held on the account (and the provider may have been asked).
    pub held: bool,
    correlation_id: Option<String>,
    cause_event_id: Option<String>,
    traceparent: Option<String>,
}

const PENDING_COLUMNS: &str = "order_id, payment_id, customer_id, amount_minor, currency, status, \
     correlation_id, cause_event_id, traceparent, held";

async fn load(conn: &mut AnyConnection, order_id: &str) -> Result<Pending, sqlx::Error> {
    let r = sqlx::query(&format!(
        "SELECT {PENDING_COLUMNS} FROM payments WHERE order_id = $1"
    ))
    .bind(order_id)
    .fetch_one(conn)
    .await?;
    pending(&r)
}

/// The payment, if any, locked for the rest of the transaction: status and fields in one read.
async fn load_locked(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<Option<Pending>, sqlx::Error> {
    let sql = format!(
        "SELECT {PENDING_COLUMNS} FROM payments WHERE order_id = $1{}",
        lock_clause(conn)
    );
    let row = sqlx::query(&sql)
        .bind(order_id)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(pending).transpose()
}

fn pending(r: &sqlx::any::AnyRow) -> Result<Pending, sqlx::Error> {
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
        held: r.try_get::<i64, _>(9)? != 0,
    })
}

/// Read a payment (no lock) before calling the provider.
pub async fn peek(pool: &AnyPool, order_id: &str) -> Result<Pending, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    load(&mut conn, order_id).await
}

/// An account's balance, held amount and currency.
type Balance = (i64, i64, String);

/// The payment, if any, and its customer's account, both locked for the rest of the transaction
/// (the payment's row first, as before): one statement where a payment's account exists, two
/// where it does not (an unknown customer).
async fn load_with_account_locked(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<Option<(Pending, Option<Balance>)>, sqlx::Error> {
    let sql = format!(
        "SELECT p.order_id, p.payment_id, p.customer_id, p.amount_minor, p.currency, p.status, \
         p.correlation_id, p.cause_event_id, p.traceparent, p.held, \
         a.balance_minor, a.held_minor, a.currency \
         FROM payments p JOIN accounts a ON a.customer_id = p.customer_id \
         WHERE p.order_id = $1{}",
        lock_clause(conn)
    );
    let row = sqlx::query(&sql)
        .bind(order_id)
        .fetch_optional(&mut *conn)
        .await?;
    if let Some(r) = row {
        let account = (r.try_get(10)?, r.try_get(11)?, r.try_get(12)?);
        return Ok(Some((pending(&r)?, Some(account))));
    }
    Ok(load_locked(conn, order_id).await?.map(|p| (p, None)))
}

/// Give a payment's held amount back to its account, taking `captured` off the balance.
async fn release_hold(
    conn: &mut AnyConnection,
    p: &Pending,
    captured: i64,
) -> Result<(), sqlx::Error> {
    release_account_hold(conn, p, captured).await?;
    sqlx::query("UPDATE payments SET held = 0 WHERE order_id = $1")
        .bind(&p.order_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The account's side of [`release_hold`].
async fn release_account_hold(
    conn: &mut AnyConnection,
    p: &Pending,
    captured: i64,
) -> Result<(), sqlx::Error> {
    let mut writes = Together::default();
    push_release_account_hold(&mut writes, p, captured);
    writes.execute(conn).await
}

/// [`release_account_hold`], added to writes sent together.
fn push_release_account_hold(writes: &mut Together, p: &Pending, captured: i64) {
    writes.push(
        "UPDATE accounts SET balance_minor = balance_minor - $1, held_minor = held_minor - $2, \
         updated_at_us = $3 WHERE customer_id = $4",
        vec![
            captured.into(),
            (if p.held { p.amount_minor } else { 0 }).into(),
            now_micros().into(),
            p.customer_id.as_str().into(),
        ],
    );
}

/// Record that the provider is owed `what` for this payment, first due at `due_at_us`.
async fn owe(
    conn: &mut AnyConnection,
    order_id: &str,
    what: FollowUp,
    due_at_us: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE payments SET provider_due = $1, provider_attempts = 0, provider_retry_at_us = $2 \
         WHERE order_id = $3",
    )
    .bind(what.as_str())
    .bind(due_at_us)
    .bind(order_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// What the hold step did.
#[derive(Debug)]
pub enum HoldStep {
    /// No longer pending (voided meanwhile): nothing to do.
    Gone,
    /// Held (now or by an earlier processor): ask the provider.
    Held(Pending),
    /// Other payments of the customer hold what it needs: tried again after `wait_us`.
    Waiting,
    /// Failed without asking the provider, and announced.
    Refused(FailReason),
}

/// Before the provider is asked: hold the payment's amount on its account, in the caller's
/// transaction. The account row's lock serializes the holds of one customer, in this process or
/// any other, so the provider is never asked for more than the balance covers.
pub async fn hold(
    conn: &mut AnyConnection,
    source: &str,
    order_id: &str,
    wait_us: i64,
) -> Result<HoldStep, sqlx::Error> {
    let Some((p, account)) = load_with_account_locked(conn, order_id)
        .await?
        .filter(|(p, _)| p.status == PaymentStatus::Pending)
    else {
        return Ok(HoldStep::Gone);
    };
    if p.held {
        return Ok(HoldStep::Held(p));
    }
    let decision = decide_hold(
        account.as_ref().map(|(b, h, c)| (*b, *h, c.as_str())),
        p.amount_minor,
        &p.currency,
    );
    Ok(match decision {
        Hold::Take => {
            let mut writes = Together::default();
            writes.push(
                "UPDATE accounts SET held_minor = held_minor + $1, updated_at_us = $2 WHERE customer_id = $3",
                vec![p.amount_minor.into(), now_micros().into(), p.customer_id.as_str().into()],
            );
            writes.push(
                "UPDATE payments SET held = 1 WHERE order_id = $1",
                vec![order_id.into()],
            );
            writes.execute(conn).await?;
            HoldStep::Held(Pending { held: true, ..p })
        }
        Hold::Wait => {
            sqlx::query("UPDATE payments SET lease_until_us = $1 WHERE order_id = $2")
                .bind(now_micros() + wait_us)
                .bind(order_id)
                .execute(&mut *conn)
                .await?;
            HoldStep::Waiting
        }
        Hold::Refuse(reason) => {
            let mut writes = Together::default();
            finish(conn, &mut writes, source, &p, Err(reason), None).await?;
            writes.execute(conn).await?;
            HoldStep::Refused(reason)
        }
    })
}

/// Claim up to `limit` pending payments whose lease has expired, leasing them for `lease_us`.
pub async fn claim_pending(
    db: &Database,
    limit: i64,
    lease_us: i64,
) -> Result<Vec<String>, sqlx::Error> {
    let now = now_micros();
    // One statement that commits on its own: the processor claims after every payment it
    // settles, so each round trip here is paid per saga.
    let sql = format!(
        "UPDATE payments SET lease_until_us = $1 WHERE order_id IN (\
         SELECT order_id FROM payments WHERE status = 'PENDING' AND lease_until_us <= $2 \
         ORDER BY created_at_us LIMIT $3{}) RETURNING order_id",
        skip_locked(db)
    );
    let rows = sqlx::query(&sql)
        .bind(now + lease_us)
        .bind(now)
        .bind(limit)
        .fetch_all(db.writer())
        .await?;
    rows.iter().map(|r| r.try_get(0)).collect()
}

/// Claims by several processors (replicas on Postgres) pass over each other's rows.
fn skip_locked(db: &Database) -> &'static str {
    if db.backend() == Backend::Postgres {
        " FOR UPDATE SKIP LOCKED"
    } else {
        ""
    }
}

/// How settling went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Captured or failed with a reason; `None` if it was no longer pending.
    pub outcome: Option<Result<(), FailReason>>,
    /// What the provider is owed now (recorded, due at once).
    pub owed: Option<FollowUp>,
}

/// Settle a held payment in the caller's transaction, given the provider's answer: capture
/// (balance down, announce success) or fail (announce the reason); either way its hold is
/// released and the provider is owed a capture or a void if it approved. A payment no longer
/// pending (voided meanwhile) is left as it is, but an authorization the provider gave it is owed
/// a void.
pub async fn settle(
    conn: &mut AnyConnection,
    source: &str,
    order_id: &str,
    answer: ProviderAnswer,
    follow_up_lease_us: i64,
) -> Result<Settled, sqlx::Error> {
    // The account is re-read with the payment: its balance may have been lowered meanwhile.
    let loaded = load_with_account_locked(conn, order_id).await?;
    let status = loaded.as_ref().map(|(p, _)| p.status);
    // The caller calls the provider at once; the lease keeps a sweep from doing it meanwhile.
    let due_at = now_micros() + follow_up_lease_us;
    let Some((p, account)) = loaded.filter(|(p, _)| p.status == PaymentStatus::Pending) else {
        // Captured by another processor that took over: that one owes the capture.
        let owed = match status {
            Some(PaymentStatus::Failed) => follow_up(PaymentStatus::Failed, answer),
            _ => None,
        };
        if let Some(what) = owed {
            owe(conn, order_id, what, due_at).await?;
        }
        return Ok(Settled {
            outcome: None,
            owed,
        });
    };
    let result = crate::domain::settle(
        account.as_ref().map(|(b, _, c)| (*b, c.as_str())),
        p.amount_minor,
        &p.currency,
        answer,
    );
    let captured = if result.is_ok() { p.amount_minor } else { 0 };
    // The account, the payment and the announcement in one call.
    let mut writes = Together::default();
    push_release_account_hold(&mut writes, &p, captured);
    let after = if result.is_ok() {
        PaymentStatus::Captured
    } else {
        PaymentStatus::Failed
    };
    let owed = follow_up(after, answer);
    finish(
        conn,
        &mut writes,
        source,
        &p,
        result,
        owed.map(|what| (what, due_at)),
    )
    .await?;
    writes.execute(conn).await?;
    Ok(Settled {
        outcome: Some(result),
        owed,
    })
}

/// Set the payment's final status (its hold released, and what the provider is owed, due at the
/// given time, if anything) in one statement, and announce it: both added to `writes`.
async fn finish(
    conn: &mut AnyConnection,
    writes: &mut Together,
    source: &str,
    p: &Pending,
    result: Result<(), FailReason>,
    owed: Option<(FollowUp, i64)>,
) -> Result<(), sqlx::Error> {
    let order_id = p.order_id.as_str();
    let (status, reason) = match result {
        Ok(()) => (PaymentStatus::Captured, None),
        Err(reason) => (PaymentStatus::Failed, Some(reason)),
    };
    let owes = if owed.is_some() {
        ", provider_due = $5, provider_attempts = 0, provider_retry_at_us = $6"
    } else {
        ""
    };
    let sql = format!(
        "UPDATE payments SET held = 0, status = $1, reason = $2, updated_at_us = $3{owes} \
         WHERE order_id = $4"
    );
    let mut values: Vec<Value> = vec![
        status.as_str().into(),
        reason.map(|r| r.as_str()).into(),
        now_micros().into(),
        order_id.into(),
    ];
    if let Some((what, due_at)) = owed {
        values.push(what.as_str().into());
        values.push(due_at.into());
    }
    writes.push(sql, values);
    // Settled outside the consumer: what the payment stored when its reservation arrived says
    // which saga and trace the outcome belongs to.
    let ctx = Context::resumed(
        source,
        p.correlation_id.clone(),
        p.cause_event_id.clone(),
        p.traceparent.clone(),
    );
    match result {
        Ok(()) => {
            let succeeded = PaymentSucceeded {
                order_id: p.order_id.clone(),
                payment_id: p.payment_id.clone(),
                customer_id: p.customer_id.clone(),
                amount_minor: p.amount_minor,
                currency: p.currency.clone(),
            };
            announce(conn, writes, &ctx, &succeeded).await?;
        }
        Err(reason) => {
            let failed = PaymentFailed {
                order_id: p.order_id.clone(),
                reason: reason.as_str().to_owned(),
            };
            announce(conn, writes, &ctx, &failed).await?;
        }
    }
    Ok(())
}

/// A capture or void owed to the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owed {
    /// The payment's order (the provider's key).
    pub order_id: String,
    /// Capture or void.
    pub what: FollowUp,
    /// Tries so far.
    pub attempts: i64,
}

/// Claim up to `limit` captures and voids owed to the provider and due, leasing them for
/// `lease_us` so that no other sweep sends them meanwhile.
pub async fn claim_owed(
    db: &Database,
    limit: i64,
    lease_us: i64,
) -> Result<Vec<Owed>, sqlx::Error> {
    let now = now_micros();
    let sql = format!(
        "UPDATE payments SET provider_retry_at_us = $1 WHERE order_id IN (\
         SELECT order_id FROM payments WHERE provider_due IS NOT NULL AND provider_retry_at_us <= $2 \
         ORDER BY provider_retry_at_us LIMIT $3{}) \
         RETURNING order_id, provider_due, provider_attempts",
        skip_locked(db)
    );
    let rows = sqlx::query(&sql)
        .bind(now + lease_us)
        .bind(now)
        .bind(limit)
        .fetch_all(db.writer())
        .await?;
    let mut owed = Vec::with_capacity(rows.len());
    for r in &rows {
        let due: String = r.try_get(1)?;
        let Some(what) = FollowUp::parse(&due) else {
            continue;
        };
        owed.push(Owed {
            order_id: r.try_get(0)?,
            what,
            attempts: r.try_get(2)?,
        });
    }
    Ok(owed)
}

/// The provider answered a capture or void: `done` is what became of it (`captured`, `voided`,
/// `refused`). Leaves the row alone if something else is owed by now.
pub async fn owed_done(
    db: &Database,
    order_id: &str,
    what: FollowUp,
    done: &str,
) -> Result<(), sqlx::Error> {
    match db.backend() {
        // Committed with the holds and settlements waiting for the writer meanwhile.
        Backend::Sqlite => {
            let (done, order_id) = (done.to_owned(), order_id.to_owned());
            db.write(Box::new(move |conn| {
                Box::pin(async move {
                    owed_done_query(&done, &order_id, what)
                        .execute(&mut *conn)
                        .await?;
                    Ok(Written::Commit(()))
                })
            }))
            .await
        }
        // One statement that commits on its own: no transaction's round trips around it.
        Backend::Postgres => {
            owed_done_query(done, order_id, what)
                .execute(db.writer())
                .await?;
            Ok(())
        }
    }
}

fn owed_done_query<'q>(
    done: &'q str,
    order_id: &'q str,
    what: FollowUp,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    sqlx::query(
        "UPDATE payments SET provider_due = NULL, provider_done = $1, provider_retry_at_us = 0 \
         WHERE order_id = $2 AND provider_due = $3",
    )
    .bind(done)
    .bind(order_id)
    .bind(what.as_str())
}

/// The provider did not answer a capture or void: try again after `retry_in_us`.
pub async fn owed_later(
    db: &Database,
    order_id: &str,
    what: FollowUp,
    retry_in_us: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE payments SET provider_attempts = provider_attempts + 1, provider_retry_at_us = $1 \
         WHERE order_id = $2 AND provider_due = $3",
    )
    .bind(now_micros() + retry_in_us)
    .bind(order_id)
    .bind(what.as_str())
    .execute(db.writer())
    .await?;
    Ok(())
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

/// Emit `payload` into `writes`: its outbox row is sent with them.
async fn announce<P: EventPayload>(
    conn: &mut AnyConnection,
    writes: &mut Together,
    ctx: &Context,
    payload: &P,
) -> Result<(), sqlx::Error> {
    // Gathered, the row waits for `writes`: `conn` is not written to here.
    let (emitted, rows) = write_behind::gather(emit(conn, ctx, payload)).await;
    emitted?;
    writes.rows(rows);
    Ok(())
}
