//! Settles pending payments outside any database transaction: the provider call can be slow, and
//! must never hold a write lock. A lease keeps one processor per payment; a crashed processor's
//! lease expires and another (or the restarted one) takes over.

use std::sync::Arc;
use std::time::Duration;

use event_toolkit::{Database, OutboxWaker};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::domain::{precheck, settle};
use crate::gateway::{Charge, ResilientGateway, SimulatedGateway};
use crate::store;

/// How long a processor holds a pending payment: longer than the slowest provider call with all
/// its retries.
pub const LEASE: Duration = Duration::from_secs(15);
/// Safety-net poll when nothing wakes the processor.
pub const POLL: Duration = Duration::from_millis(250);

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

impl Processor {
    /// Settle pending payments until `shutdown`; payments in flight are finished first.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let claimed = match store::claim_pending(&self.db, 256, LEASE.as_micros() as i64).await
            {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot claim pending payments; retrying");
                    Vec::new()
                }
            };
            let n = claimed.len();
            let this = &self;
            futures::stream::iter(claimed)
                .for_each_concurrent(self.concurrency.max(1), |order_id| async move {
                    if let Err(e) = this.process(&order_id).await {
                        // The lease expires and the payment is retried.
                        tracing::warn!(%order_id, error = %e, "settling failed; will retry after the lease");
                    }
                })
                .await;
            if shutdown.is_cancelled() {
                return;
            }
            if n == 0 {
                tokio::select! {
                    _ = self.wake.woken() => {}
                    _ = tokio::time::sleep(POLL) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }

    /// Settle one payment: check the account, call the provider, then capture or fail.
    pub async fn process(&self, order_id: &str) -> Result<(), sqlx::Error> {
        let p = store::peek(self.db.pool(), order_id).await?;
        if p.status != crate::domain::PaymentStatus::Pending {
            // Voided (order cancelled) since it was claimed: nothing to ask the provider.
            return Ok(());
        }
        let balance = store::get_account(self.db.pool(), &p.customer_id).await?;
        let pre = precheck(
            balance
                .as_ref()
                .map(|a| (a.balance_minor, a.currency.as_str())),
            p.amount_minor,
            &p.currency,
        );
        // No point asking the provider to charge what the account cannot pay; and a charge the
        // provider was not asked about must never be captured, even if the balance grows meanwhile.
        let answer = match pre {
            Err(reason) => Err(reason),
            Ok(()) => Ok(self
                .gateway
                .charge(&Charge {
                    key: p.order_id.clone(),
                    amount_minor: p.amount_minor,
                    currency: p.currency.clone(),
                })
                .await),
        };
        let mut tx = self.db.begin().await?;
        let settled = store::settle(&mut tx, &self.source, order_id, |balance, p| match answer {
            Err(reason) => Err(reason),
            Ok(provider) => settle(balance, p.amount_minor, &p.currency, provider),
        })
        .await?;
        self.outbox.commit(tx).await?;
        tracing::info!(%order_id, ?settled, "payment settled");
        Ok(())
    }
}
