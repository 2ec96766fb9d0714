//! Settles pending payments outside any database transaction: the provider call can be slow, and
//! must never hold a write lock. A lease keeps one processor per payment; a crashed processor's
//! lease expires and another (or the restarted one) takes over.
//!
//! Per payment: hold its amount on the account (a short transaction; a customer's payments queue
//! behind what the others hold), ask the provider, settle (capture or fail, release the hold,
//! record what the provider is owed), then capture or void at the provider. Captures and voids the
//! provider did not acknowledge are retried by a sweep until it does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use event_toolkit::{Database, OutboxWaker, Written};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::domain::FollowUp;
use crate::gateway::{Charge, GatewayError, ResilientGateway, SimulatedGateway};
use crate::store::{self, HoldStep};

/// How long a processor holds a pending payment: longer than the slowest provider call with all
/// its retries and the status question after them.
pub const LEASE: Duration = Duration::from_secs(15);
/// Safety-net poll when nothing wakes the processor.
pub const POLL: Duration = Duration::from_millis(250);
/// A payment waiting for what the customer's other payments hold is tried again after this (and
/// sooner when one of them settles and wakes the processor).
pub const HOLD_WAIT: Duration = Duration::from_millis(100);
/// How long one try of a capture or void is left to whoever sent it before a sweep may resend it.
pub const FOLLOW_UP_LEASE: Duration = Duration::from_secs(10);
/// Captures and voids the provider did not acknowledge are retried after 1 s, doubling up to this.
pub const FOLLOW_UP_MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Everything the processor needs.
#[derive(Clone)]
pub struct Processor {
    /// Storage.
    pub db: Database,
    /// The provider, with its protections.
    pub gateway: Arc<ResilientGateway<SimulatedGateway>>,
    /// Wakes the outbox relay.
    pub outbox: OutboxWaker,
    /// Woken when a payment is created.
    pub wake: OutboxWaker,
    /// CloudEvents source.
    pub source: String,
    /// Payments settled at once.
    pub concurrency: usize,
}

/// One unit of the processor's work.
enum Work {
    Settle(String),
    FollowUp(store::Owed),
}

impl Processor {
    /// Settle pending payments, and send the provider the captures and voids it is owed, until
    /// `shutdown`; work in flight is finished first.
    ///
    /// Work is taken up as slots free, not in batches: a charge waiting on a slow or silent
    /// provider must not hold back the payments claimed after it.
    pub async fn run(self, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.concurrency.max(1)));
        let mut running = JoinSet::new();
        // When captures and voids owed were last looked for; `None`: look at the next claim.
        let mut owed_claimed_at: Option<Instant> = None;
        loop {
            while let Some(done) = running.try_join_next() {
                if let Err(e) = done {
                    tracing::error!(error = %e, "a payment task ended abnormally");
                }
            }
            let free = slots.available_permits();
            let mut taken = 0;
            if free > 0 {
                // Follow-ups owed are retried seconds apart and are not on any saga's way: one
                // look per poll interval finds them, where one per settled payment (a statement
                // each, nearly always finding none) cost every saga.
                let owed = owed_claimed_at.is_none_or(|t| t.elapsed() >= POLL);
                let (claimed, looked) = self.claim(free, owed).await;
                match looked {
                    // Every slot left went to follow-ups: more may be due, look again.
                    Some(true) => owed_claimed_at = None,
                    Some(false) => owed_claimed_at = Some(Instant::now()),
                    // Payments to settle took every slot: the look is still owed.
                    None => {}
                }
                for work in claimed {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        break;
                    };
                    taken += 1;
                    let this = self.clone();
                    running.spawn(async move {
                        this.work(work).await;
                        drop(slot);
                        // A slot is free, and perhaps a hold released: look for more.
                        this.wake.wake();
                    });
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
            if taken == 0 {
                tokio::select! {
                    _ = self.wake.woken() => {}
                    _ = tokio::time::sleep(POLL) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
        while let Some(done) = running.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "a payment task ended abnormally");
            }
        }
    }

    /// Up to `limit` payments to settle and (if `owed`) captures or voids owed, each under a
    /// lease; and, if it looked for follow-ups, whether they filled what was left (more may be
    /// due). A look that failed counts as done: the next is one poll interval later.
    async fn claim(&self, limit: usize, owed: bool) -> (Vec<Work>, Option<bool>) {
        let limit = limit as i64;
        let mut work: Vec<Work> =
            match store::claim_pending(&self.db, limit, LEASE.as_micros() as i64).await {
                Ok(ids) => ids.into_iter().map(Work::Settle).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot claim pending payments; retrying");
                    Vec::new()
                }
            };
        let left = limit - work.len() as i64;
        if !owed || left <= 0 {
            return (work, None);
        }
        let full = match store::claim_owed(&self.db, left, FOLLOW_UP_LEASE.as_micros() as i64).await
        {
            Ok(owed) => {
                let full = owed.len() as i64 == left;
                work.extend(owed.into_iter().map(Work::FollowUp));
                full
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot claim captures and voids owed; retrying");
                false
            }
        };
        (work, Some(full))
    }

    async fn work(&self, work: Work) {
        match work {
            Work::Settle(order_id) => {
                if let Err(e) = self.process(&order_id).await {
                    // The lease expires and the payment is retried.
                    tracing::warn!(%order_id, error = %e, "settling failed; will retry after the lease");
                }
            }
            Work::FollowUp(owed) => {
                self.follow_up(&owed.order_id, owed.what, owed.attempts)
                    .await
            }
        }
    }

    /// Settle one payment: hold its amount, call the provider, capture or fail, then capture or
    /// void at the provider.
    pub async fn process(&self, order_id: &str) -> Result<(), sqlx::Error> {
        // Holds and settles are short transactions that arrive together (a claimed batch, the
        // provider's answers): each is committed with whatever else waits for the writer.
        let (source, id) = (self.source.clone(), order_id.to_owned());
        let step = self
            .db
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let step =
                        store::hold(conn, &source, &id, HOLD_WAIT.as_micros() as i64).await?;
                    // Voided (order cancelled) since it was claimed: nothing to write.
                    Ok(match step {
                        HoldStep::Gone => Written::Rollback(step),
                        _ => Written::Commit(step),
                    })
                })
            }))
            .await?;
        let p = match step {
            HoldStep::Gone => return Ok(()),
            HoldStep::Waiting => {
                tracing::debug!(%order_id, "waiting for the customer's other payments to settle");
                return Ok(());
            }
            // No point asking the provider to charge what the account cannot pay.
            HoldStep::Refused(reason) => {
                self.outbox.wake();
                tracing::info!(%order_id, ?reason, "payment settled without the provider");
                return Ok(());
            }
            HoldStep::Held(p) => p,
        };
        let answer = self
            .gateway
            .charge(&Charge {
                key: p.order_id.clone(),
                amount_minor: p.amount_minor,
                currency: p.currency.clone(),
            })
            .await;
        let (source, id) = (self.source.clone(), order_id.to_owned());
        let settled = self
            .db
            .write(Box::new(move |conn| {
                Box::pin(async move {
                    let lease = FOLLOW_UP_LEASE.as_micros() as i64;
                    let settled = store::settle(conn, &source, &id, answer, lease).await?;
                    Ok(Written::Commit(settled))
                })
            }))
            .await?;
        self.outbox.wake();
        // The hold is released: the customer's payments waiting on it may go on.
        self.wake.wake();
        tracing::info!(%order_id, ?answer, ?settled, "payment settled");
        if let Some(what) = settled.owed {
            self.follow_up(order_id, what, 0).await;
        }
        Ok(())
    }

    /// Send the provider a capture or void it is owed; on no answer, leave it owed for a later try.
    async fn follow_up(&self, order_id: &str, what: FollowUp, attempts: i64) {
        let recorded = match self.gateway.follow_up(order_id, what).await {
            Ok(()) => store::owed_done(&self.db, order_id, what, what.done()).await,
            Err(GatewayError::Declined) => {
                // Nothing more to do with it, and something to look into.
                tracing::error!(%order_id, ?what, "the provider refused the follow-up");
                store::owed_done(&self.db, order_id, what, "refused").await
            }
            Err(GatewayError::Unavailable(reason)) => {
                let backoff = Duration::from_secs(1)
                    .saturating_mul(1 << attempts.clamp(0, 6))
                    .min(FOLLOW_UP_MAX_BACKOFF);
                tracing::warn!(%order_id, ?what, %reason, retry_in = ?backoff,
                    "the provider did not take the follow-up; will retry");
                store::owed_later(&self.db, order_id, what, backoff.as_micros() as i64).await
            }
        };
        if let Err(e) = recorded {
            // Still owed: a sweep sends it again after its lease, and the provider takes it once.
            tracing::warn!(%order_id, ?what, error = %e, "cannot record the follow-up");
        }
    }
}
