//! Durable deadlines: the deadline is a column, so a restart loses none; this sweep cancels
//! unfinished orders whose deadline has passed.

use std::time::Duration;

use event_toolkit::{Context, Database, OutboxWaker};
use tokio_util::sync::CancellationToken;

use crate::domain::Happening;
use crate::store;

/// How often overdue orders are looked for.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(200);

/// Cancel overdue orders until `shutdown`.
pub async fn run(db: Database, waker: OutboxWaker, source: String, shutdown: CancellationToken) {
    let mut sampled = std::time::Instant::now() - event_toolkit::observe::SAMPLE_INTERVAL;
    loop {
        if let Err(e) = sweep(&db, &waker, &source).await {
            tracing::warn!(error = %e, "deadline sweep failed; retrying");
        }
        if sampled.elapsed() >= event_toolkit::observe::SAMPLE_INTERVAL {
            sampled = std::time::Instant::now();
            match store::open_past_deadline(db.pool()).await {
                // Normally 0: the sweep cancels them. Anything else is a stuck saga.
                Ok(n) => metrics::gauge!("orders_open_past_deadline").set(n as f64),
                Err(e) => tracing::debug!(error = %e, "open-past-deadline sample failed"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// One sweep: each overdue order is re-checked under lock, so an outcome that arrived meanwhile wins.
pub async fn sweep(db: &Database, waker: &OutboxWaker, source: &str) -> Result<usize, sqlx::Error> {
    let ids = store::overdue(db.pool(), 200).await?;
    if ids.is_empty() {
        return Ok(0);
    }
    let mut tx = db.begin().await?;
    let (applied, effects) = event_toolkit::deferred::collect(async {
        for id in &ids {
            store::apply(
                &mut tx,
                &Context::request(source),
                id,
                Happening::DeadlinePassed,
            )
            .await?;
        }
        Ok::<_, sqlx::Error>(())
    })
    .await;
    applied?;
    waker.commit(tx).await?;
    effects.run();
    tracing::info!(count = ids.len(), "orders past their deadline cancelled");
    Ok(ids.len())
}
