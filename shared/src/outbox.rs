//! Transactional outbox: events are written in the caller's transaction, and a relay publishes them
//! to JetStream afterwards, in id order, with `Nats-Msg-Id` = event id so a re-publish after a crash
//! is dropped by the stream's duplicate window.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::Context;
use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use sqlx::{Any, AnyConnection, Row, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::db::{now_micros, Backend, Database, Kept};
use crate::envelope::{Envelope, CLOUDEVENTS_CONTENT_TYPE};
use crate::group_commit::Written;
use crate::trace::{valid_traceparent, TRACEPARENT, TRACESTATE};
use crate::write_behind::{self, Shape, Value};

/// An outbox row, as [`enqueue`] writes it.
const OUTBOX_ROW: Shape = Shape {
    head: "INSERT INTO outbox (event_id, subject, payload, created_at_us, next_attempt_at_us, \
           traceparent, tracestate)",
    columns: 7,
    tail: "",
};

/// Write `event` to the outbox inside the caller's transaction; it is published only if that
/// transaction commits. Its trace context goes in the same row, for the relay's NATS headers.
/// Inside a consumer batch the row waits for the batch's other rows (see [`crate::write_behind`]).
pub async fn enqueue(
    conn: &mut AnyConnection,
    subject: &str,
    event: &Envelope,
) -> Result<(), sqlx::Error> {
    // Stamped when the row is written, in a consumer batch just before its commit: the relay's
    // latency (`outbox_publish_latency_seconds`) runs from there, not from the handler's turn.
    let row = vec![
        event.id.as_str().into(),
        subject.into(),
        event.to_bytes().into(),
        Value::Now,
        Value::Now,
        event.traceparent.as_deref().into(),
        event.tracestate.as_deref().into(),
    ];
    write_behind::insert(conn, OUTBOX_ROW, row).await?;
    crate::deferred::note_enqueued();
    Ok(())
}

/// Wakes the relay right after a local commit, so an event does not wait for the next poll.
#[derive(Debug, Clone, Default)]
pub struct OutboxWaker(Arc<Notify>);

impl OutboxWaker {
    /// Signal that rows may be waiting. Cheap; coalesces when the relay is busy.
    pub fn wake(&self) {
        self.0.notify_one();
    }

    /// Wait for the next [`OutboxWaker::wake`] (or one that came since the last wait).
    pub async fn woken(&self) {
        self.0.notified().await;
    }

    /// Commit `tx` and wake the relay.
    pub async fn commit(&self, tx: Transaction<'static, Any>) -> Result<(), sqlx::Error> {
        tx.commit().await?;
        self.wake();
        Ok(())
    }
}

/// Mark the rows `ids` published at `now`, in one statement.
async fn mark_published(
    conn: &mut AnyConnection,
    now: i64,
    ids: &[i64],
) -> Result<(), sqlx::Error> {
    if conn.backend_name() == "SQLite" {
        // A few fixed sizes, each kept prepared (see `write_behind::sqlite_chunks`).
        let mut rest = ids;
        for size in crate::write_behind::sqlite_chunks(ids.len(), usize::MAX) {
            let (chunk, after) = rest.split_at(size);
            rest = after;
            let sql = format!(
                "UPDATE outbox SET published_at_us = ? WHERE id IN ({})",
                vec!["?"; size].join(",")
            );
            chunk
                .iter()
                .fold(sqlx::query(&sql).bind(now), |q, id| q.bind(*id))
                .execute(&mut *conn)
                .await?;
        }
        return Ok(());
    }
    let placeholders = (0..ids.len())
        .map(|i| format!("${}", i + 2))
        .collect::<Vec<_>>()
        .join(",");
    let sql = format!("UPDATE outbox SET published_at_us = $1 WHERE id IN ({placeholders})");
    ids.iter()
        .fold(sqlx::query(&sql).bind(now), |q, id| q.bind(*id))
        .execute(conn)
        .await?;
    Ok(())
}

/// Relay tuning.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows claimed per pass.
    pub batch_size: i64,
    /// Publishes in flight before awaiting their acks; must stay below the client's
    /// `max_ack_inflight` (async-nats blocks forever past it).
    pub ack_window: usize,
    /// Safety-net poll for rows committed by another process or left by a crash.
    pub poll_interval: Duration,
    /// Failed attempts after which a row is parked (kept, with its error, out of the way).
    pub max_attempts: i64,
    /// First retry delay of a failing row; doubles per attempt.
    pub retry_base: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 512,
            ack_window: 256,
            poll_interval: Duration::from_millis(500),
            max_attempts: 12,
            retry_base: Duration::from_millis(200),
        }
    }
}

/// Relay failures that make it back off as a whole.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The database failed.
    #[error("outbox database error: {0}")]
    Database(#[from] sqlx::Error),
    /// NATS is not connected; nothing was attempted.
    #[error("NATS is not connected")]
    Disconnected,
    /// Publishes failed for reasons that are not the rows' (timeouts, no stream answering).
    #[error("JetStream unavailable; unpublished rows stay due")]
    Outage,
    /// The stream (or the server's store) is full: nothing is published until space is freed.
    #[error("stream full ({0}); unpublished rows stay due until space is freed")]
    StoreFull(String),
}

/// Whether the relay can publish, for readiness: false while its last pass could not (the stream
/// full, missing or not answering).
#[derive(Debug, Clone, Default)]
pub struct RelayHealth(Arc<std::sync::atomic::AtomicBool>);

impl RelayHealth {
    /// The last pass could not publish for reasons that are not the rows'.
    pub fn blocked(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set_blocked(&self, blocked: bool) {
        self.0.store(blocked, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One claimed row.
#[derive(Debug)]
struct Pending {
    id: i64,
    event_id: String,
    subject: String,
    payload: Vec<u8>,
    attempts: i64,
    created_at_us: i64,
    /// W3C trace context; `None` for rows written before it was stored.
    traceparent: Option<String>,
    tracestate: Option<String>,
}

/// What happened to one row of a claimed batch.
#[derive(Debug)]
enum Outcome {
    Published,
    Failed { error: String, class: Failure },
}

/// Whose fault a failed publish was, which decides whether the row is charged an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// NATS or JetStream unavailable (timeout, broken pipe, no stream answering): says nothing about
    /// the row; the relay backs off as a whole.
    Outage,
    /// The server refused this row: retried with its own backoff, parked after `max_attempts`.
    Row,
    /// Can never be published (too large): parked at once.
    Permanent,
    /// The stream or the server's store is full: an outage to wait out until `max_age` or an
    /// operator frees space. Never the row's fault, never a reason to park it.
    StoreFull,
}

/// Whether a refusal says the stream or JetStream store has no room (stream `max_bytes`/`max_msgs`
/// with discard `new`, or the server's `max_file_store`).
fn store_full(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    [
        "maximum bytes exceeded",
        "maximum messages exceeded",
        "insufficient resources",
        "insufficient storage",
        "resources exceeded",
    ]
    .iter()
    .any(|needle| e.contains(needle))
}

fn classify(kind: PublishErrorKind, error: &str) -> Failure {
    if store_full(error) {
        return Failure::StoreFull;
    }
    match kind {
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending
        | PublishErrorKind::StreamNotFound => Failure::Outage,
        PublishErrorKind::MaxPayloadExceeded => Failure::Permanent,
        _ => Failure::Row,
    }
}

/// Rows published (or not) but not yet recorded. Dropping it without [`OutboxRelay::record`] is what
/// a crash between publish and mark looks like: the rows are published again later and deduplicated
/// by the stream.
#[derive(Debug)]
pub struct PublishedBatch<'c> {
    /// Postgres: the transaction holding the claimed rows' locks.
    claim: Option<Transaction<'c, Any>>,
    rows: Vec<(Pending, Outcome)>,
}

impl PublishedBatch<'_> {
    /// Number of rows claimed in this batch.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether nothing was claimed.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Publishes outbox rows to JetStream.
#[derive(Debug, Clone)]
pub struct OutboxRelay {
    db: Database,
    js: Context,
    client: async_nats::Client,
    config: RelayConfig,
    waker: OutboxWaker,
    health: RelayHealth,
    /// SQLite: rows published whose mark is still on its way to the writer. The next pass skips
    /// them instead of waiting for the mark (one process owns a SQLite file, so this is all of
    /// them).
    marking: Arc<std::sync::Mutex<HashSet<i64>>>,
}

impl OutboxRelay {
    /// A relay over `db`'s outbox publishing through `client`.
    pub fn new(db: Database, client: async_nats::Client, config: RelayConfig) -> Self {
        let js = async_nats::jetstream::new(client.clone());
        Self {
            db,
            js,
            client,
            config,
            waker: OutboxWaker::default(),
            health: RelayHealth::default(),
            marking: Arc::default(),
        }
    }

    /// The same relay publishing through `client` instead (a connection of its own).
    pub fn with_client(mut self, client: async_nats::Client) -> Self {
        self.js = async_nats::jetstream::new(client.clone());
        self.client = client;
        self
    }

    /// Whether the relay can publish (for readiness).
    pub fn health(&self) -> RelayHealth {
        self.health.clone()
    }

    /// The waker to call after committing a transaction that enqueued events.
    pub fn waker(&self) -> OutboxWaker {
        self.waker.clone()
    }

    /// Run until `shutdown`, then make one last pass so committed events are not left behind.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = self.backoff();
        let mut marks = tokio::task::JoinSet::new();
        // Postgres: a connection kept from pass to pass (no round trip to return it to the pool).
        let mut kept = self.db.keep();
        loop {
            // A mark that failed left its rows due: back off as any failed pass does, or a
            // writer that keeps failing would have the backlog published again pass after pass.
            let mut failed = None;
            while let Some(done) = marks.try_join_next() {
                if let Ok(Err(e)) = done {
                    failed = Some(e);
                }
            }
            // At most two marks on their way: a slow writer slows the passes down instead of
            // growing the set every pass skips.
            while marks.len() >= 2 {
                if let Some(Ok(Err(e))) = marks.join_next().await {
                    failed = Some(e);
                }
            }
            let result = match failed {
                Some(e) => Err(RelayError::Database(e)),
                None => match self.publish_batch_on(Some(&mut kept)).await {
                    Ok(batch) => self.record_pipelined(batch, &mut marks).await,
                    Err(e) => Err(e),
                },
            };
            // A failed pass may have left its connection broken: the pool checks it.
            if result.is_err() {
                kept.discard();
            }
            match result {
                Ok(n) if n as i64 >= self.config.batch_size => {
                    backoff = self.backoff();
                    if shutdown.is_cancelled() {
                        break;
                    }
                    continue;
                }
                Ok(_) => {
                    backoff = self.backoff();
                    tokio::select! {
                        _ = self.waker.0.notified() => {}
                        _ = tokio::time::sleep(self.config.poll_interval) => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
                Err(e) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    if matches!(e, RelayError::StoreFull(_)) {
                        tracing::error!(error = %e, retry_in = ?delay, "STREAM FULL: events are held in the outbox until space is freed (max_age, or raise STREAM_MAX_BYTES)");
                    } else {
                        tracing::warn!(error = %e, retry_in = ?delay, "outbox relay backing off");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        }
        // Flush what was committed before shutdown, bounded so a dead NATS cannot hang the exit.
        let flush = async {
            while marks.join_next().await.is_some() {}
            while let Ok(n) = self.publish_pending().await {
                if n == 0 {
                    break;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(5), flush)
            .await
            .is_err()
        {
            tracing::warn!("outbox flush at shutdown timed out; rows stay for the next start");
        }
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// One pass: claim due rows, publish them, record the outcome. Returns the number published.
    pub async fn publish_pending(&self) -> Result<usize, RelayError> {
        let batch = self.publish_batch().await?;
        self.record(batch).await
    }

    /// Claim due rows in id order and publish them, pipelined in windows of `ack_window`.
    pub async fn publish_batch(&self) -> Result<PublishedBatch<'static>, RelayError> {
        self.publish_batch_on(None).await
    }

    /// [`publish_batch`](Self::publish_batch), on Postgres in a transaction on `kept`'s connection
    /// when given (the run loop's, kept from pass to pass).
    async fn publish_batch_on<'c>(
        &self,
        kept: Option<&'c mut Kept>,
    ) -> Result<PublishedBatch<'c>, RelayError> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(RelayError::Disconnected);
        }
        let now = now_micros();
        // Several Postgres relays may run: each locks its own rows and skips the others', and
        // holds the claim until the outcome is recorded. One process owns a SQLite file, so no
        // lock is held there while publishing.
        let (mut claim, lock) = match self.db.backend() {
            Backend::Postgres => {
                let tx = match kept {
                    Some(kept) => kept.begin().await?,
                    None => self.db.begin().await?,
                };
                (Some(tx), " FOR UPDATE SKIP LOCKED")
            }
            Backend::Sqlite => (None, ""),
        };
        let sql = format!(
            "SELECT id, event_id, subject, payload, attempts, created_at_us, traceparent, tracestate \
             FROM outbox WHERE published_at_us IS NULL AND parked_at_us IS NULL \
             AND next_attempt_at_us <= $1 ORDER BY id LIMIT $2{lock}"
        );
        let marking = self.marking.lock().map(|m| m.clone()).unwrap_or_default();
        let limit = self.config.batch_size + marking.len() as i64;
        let query = sqlx::query(&sql).bind(now).bind(limit);
        let rows = match claim.as_mut() {
            Some(tx) => query.fetch_all(&mut **tx).await?,
            None => query.fetch_all(self.db.pool()).await?,
        };
        let pending = rows
            .iter()
            .filter(|r| {
                r.try_get::<i64, _>(0)
                    .map_or(true, |id| !marking.contains(&id))
            })
            .take(self.config.batch_size.max(0) as usize)
            .map(|r| -> Result<Pending, sqlx::Error> {
                Ok(Pending {
                    id: r.try_get(0)?,
                    event_id: r.try_get(1)?,
                    subject: r.try_get(2)?,
                    payload: r.try_get(3)?,
                    attempts: r.try_get(4)?,
                    created_at_us: r.try_get(5)?,
                    traceparent: r.try_get(6)?,
                    tracestate: r.try_get(7)?,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let mut out = Vec::with_capacity(pending.len());
        let mut iter = pending.into_iter().peekable();
        while iter.peek().is_some() {
            let window: Vec<Pending> = iter.by_ref().take(self.config.ack_window.max(1)).collect();
            let mut acks = Vec::with_capacity(window.len());
            for row in &window {
                let mut msg = PublishMessage::build()
                    .payload(Bytes::from(row.payload.clone()))
                    .message_id(&row.event_id)
                    .header("Content-Type", CLOUDEVENTS_CONTENT_TYPE);
                // Checked again here: a header value must never carry a line break.
                if let Some(tp) = row.traceparent.as_deref().filter(|t| valid_traceparent(t)) {
                    msg = msg.header(TRACEPARENT, tp);
                    if let Some(ts) = row.tracestate.as_deref() {
                        if !ts.is_empty() && !ts.chars().any(char::is_control) {
                            msg = msg.header(TRACESTATE, ts);
                        }
                    }
                }
                acks.push(self.js.send_publish(row.subject.clone(), msg).await);
            }
            // Awaited together: each ack's timeout starts when it is first polled, so awaiting
            // them one by one would cost a window of lost acks (its stream's leader killed
            // mid-window) the timeout once per row, minutes with the relay stuck and not ready.
            let results = futures::future::join_all(acks.into_iter().map(|ack| async move {
                match ack {
                    Ok(fut) => fut.await.map(|_| ()),
                    Err(e) => Err(e),
                }
            }))
            .await;
            let window_down = results.iter().all(|r| {
                r.as_ref()
                    .is_err_and(|e| classify(e.kind(), &e.to_string()) == Failure::Outage)
            });
            for (row, result) in window.into_iter().zip(results) {
                let outcome = match result {
                    Ok(()) => Outcome::Published,
                    Err(e) => {
                        let error = e.to_string();
                        Outcome::Failed {
                            class: classify(e.kind(), &error),
                            error,
                        }
                    }
                };
                out.push((row, outcome));
            }
            if window_down {
                // JetStream did not answer for any row: the rest of the claim stays due,
                // uncharged, for the pass after the backoff instead of timing out here too.
                break;
            }
        }
        // A timeout while other rows of the same pass were acknowledged is not an outage: the
        // server is answering, just not for this row (e.g. a subject it denies). Charge the row, so
        // it is parked eventually instead of slowing every pass.
        if out.iter().any(|(_, o)| matches!(o, Outcome::Published)) {
            for (_, o) in &mut out {
                if let Outcome::Failed { class, .. } = o {
                    if *class == Failure::Outage {
                        *class = Failure::Row;
                    }
                }
            }
        }
        Ok(PublishedBatch { claim, rows: out })
    }

    /// [`record`](Self::record), except that on SQLite the usual pass (everything published,
    /// nothing held) leaves its mark to a task in `marks` and returns at once: the next pass
    /// claims while the mark waits for the writer, skipping the rows being marked. Should the
    /// mark fail, its rows are due again and published again (the stream drops the copies) after
    /// the run loop's backoff.
    async fn record_pipelined(
        &self,
        batch: PublishedBatch<'_>,
        marks: &mut tokio::task::JoinSet<Result<(), sqlx::Error>>,
    ) -> Result<usize, RelayError> {
        let usual = batch.claim.is_none()
            && !batch.rows.is_empty()
            && batch
                .rows
                .iter()
                .all(|(_, o)| matches!(o, Outcome::Published));
        if !usual {
            return self.record(batch).await;
        }
        let now = now_micros();
        let ids: Vec<i64> = batch.rows.iter().map(|(p, _)| p.id).collect();
        if let Ok(mut m) = self.marking.lock() {
            m.extend(ids.iter().copied());
        }
        let (db, marking) = (self.db.clone(), self.marking.clone());
        marks.spawn(
            async move {
                let marked = db
                    .write(Box::new({
                        let ids = ids.clone();
                        move |conn| {
                            Box::pin(async move {
                                mark_published(conn, now, &ids).await?;
                                Ok(Written::Commit(()))
                            })
                        }
                    }))
                    .await;
                if let Ok(mut m) = marking.lock() {
                    for id in &ids {
                        m.remove(id);
                    }
                }
                marked
            }
            .in_current_span(),
        );
        let published: Vec<&Pending> = batch.rows.iter().map(|(p, _)| p).collect();
        self.recorded(&batch.rows, &published, now)
    }

    /// Mark the published rows in one statement; reschedule or park the failed ones.
    pub async fn record(&self, batch: PublishedBatch<'_>) -> Result<usize, RelayError> {
        let PublishedBatch { claim, rows } = batch;
        if rows.is_empty() {
            if let Some(tx) = claim {
                tx.commit().await?;
            }
            // Nothing waits here (another replica may have published what this one could not):
            // whatever blocked this relay no longer holds anything back.
            self.health.set_blocked(false);
            return Ok(0);
        }
        let now = now_micros();
        let published: Vec<&Pending> = rows
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Published))
            .map(|(p, _)| p)
            .collect();
        let ids: Vec<i64> = published.iter().map(|p| p.id).collect();
        // The usual pass on SQLite: nothing held, everything published. The mark is committed
        // with whatever else waits for the writer (placements, settlements).
        let charged = |o: &Outcome| matches!(o, Outcome::Failed { class, .. } if matches!(class, Failure::Row | Failure::Permanent));
        let mut tx = match claim {
            Some(tx) => tx,
            None if !rows.iter().any(|(_, o)| charged(o)) => {
                if !ids.is_empty() {
                    self.db
                        .write(Box::new(move |conn| {
                            Box::pin(async move {
                                mark_published(conn, now, &ids).await?;
                                Ok(Written::Commit(()))
                            })
                        }))
                        .await?;
                }
                return self.recorded(&rows, &published, now);
            }
            None => self.db.begin().await?,
        };
        if !ids.is_empty() {
            mark_published(&mut tx, now, &ids).await?;
        }
        for (row, outcome) in &rows {
            let Outcome::Failed { error, class } = outcome else {
                continue;
            };
            // A full store or an outage is not the row's fault: it stays due, uncharged, and
            // the relay backs off as a whole (readiness says why nothing moves).
            if !charged(outcome) {
                continue;
            }
            let attempts = row.attempts + 1;
            let park = *class == Failure::Permanent || attempts >= self.config.max_attempts;
            let delay = self
                .config
                .retry_base
                .saturating_mul(1u32 << attempts.clamp(0, 8) as u32)
                .min(Duration::from_secs(30));
            sqlx::query(
                "UPDATE outbox SET attempts = $1, last_error = $2, next_attempt_at_us = $3, \
                 parked_at_us = $4 WHERE id = $5",
            )
            .bind(attempts)
            .bind(error)
            .bind(now + delay.as_micros() as i64)
            .bind(if park { Some(now) } else { None })
            .bind(row.id)
            .execute(&mut *tx)
            .await?;
            if park {
                tracing::error!(event_id = %row.event_id, subject = %row.subject, %error, "outbox row parked");
            } else {
                tracing::warn!(event_id = %row.event_id, subject = %row.subject, %error, attempts, "outbox publish refused; will retry");
            }
        }
        tx.commit().await?;
        self.recorded(&rows, &published, now)
    }

    /// After the outcome is committed: metrics, readiness, and whether the pass was blocked.
    fn recorded(
        &self,
        rows: &[(Pending, Outcome)],
        published: &[&Pending],
        now: i64,
    ) -> Result<usize, RelayError> {
        for p in published {
            let latency = (now - p.created_at_us).max(0) as f64 / 1e6;
            metrics::histogram!("outbox_publish_latency_seconds").record(latency);
        }
        metrics::counter!("outbox_published_total").increment(published.len() as u64);
        let failed = |c: Failure| {
            rows.iter()
                .find(|(_, o)| matches!(o, Outcome::Failed { class, .. } if *class == c))
        };
        let full = failed(Failure::StoreFull);
        let outage = failed(Failure::Outage).is_some();
        self.health.set_blocked(full.is_some() || outage);
        if let Some((_, Outcome::Failed { error, .. })) = full {
            return Err(RelayError::StoreFull(error.clone()));
        }
        if outage {
            return Err(RelayError::Outage);
        }
        Ok(published.len())
    }
}

/// Counts for a service's outbox, for readiness pages and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct OutboxStats {
    /// Rows waiting to be published.
    pub pending: i64,
    /// Rows parked after repeated failures.
    pub parked: i64,
    /// Rows published.
    pub published: i64,
}

/// Outbox counts.
pub async fn stats(db: &Database) -> Result<OutboxStats, sqlx::Error> {
    let row = sqlx::query(
        "SELECT \
           COALESCE(SUM(CASE WHEN published_at_us IS NULL AND parked_at_us IS NULL THEN 1 ELSE 0 END), 0), \
           COALESCE(SUM(CASE WHEN parked_at_us IS NOT NULL THEN 1 ELSE 0 END), 0), \
           COALESCE(SUM(CASE WHEN published_at_us IS NOT NULL THEN 1 ELSE 0 END), 0) \
         FROM outbox",
    )
    .fetch_one(db.pool())
    .await?;
    // SUM over integer literals is BIGINT on Postgres and INTEGER on SQLite: both read as i64.
    Ok(OutboxStats {
        pending: row.try_get(0)?,
        parked: row.try_get(1)?,
        published: row.try_get(2)?,
    })
}

/// How long the relay took from enqueue to recorded publish, per published row (microseconds);
/// used by the relay-latency benchmark.
pub async fn published_latencies_us(db: &Database) -> Result<Vec<i64>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT published_at_us - created_at_us FROM outbox WHERE published_at_us IS NOT NULL ORDER BY id",
    )
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(|r| r.try_get::<i64, _>(0)).collect()
}

/// An outbox row the relay gave up on, waiting for an operator.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ParkedRow {
    /// Row id (what `unpark` takes).
    pub id: i64,
    /// The event id (its `Nats-Msg-Id`).
    pub event_id: String,
    /// Subject it is published on.
    pub subject: String,
    /// Failed attempts.
    pub attempts: i64,
    /// The last refusal.
    pub last_error: Option<String>,
    /// When it was written (microseconds since the epoch).
    pub created_at_us: i64,
    /// When it was parked (microseconds since the epoch).
    pub parked_at_us: i64,
}

/// Parked rows, oldest first, after row id `after` (a cursor), at most `limit`.
pub async fn parked(db: &Database, after: i64, limit: i64) -> Result<Vec<ParkedRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, event_id, subject, attempts, last_error, created_at_us, parked_at_us \
         FROM outbox WHERE parked_at_us IS NOT NULL AND id > $1 ORDER BY id LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ParkedRow {
                id: r.try_get(0)?,
                event_id: r.try_get(1)?,
                subject: r.try_get(2)?,
                attempts: r.try_get(3)?,
                last_error: r.try_get(4)?,
                created_at_us: r.try_get(5)?,
                parked_at_us: r.try_get(6)?,
            })
        })
        .collect()
}

/// Put parked rows back in line with a fresh attempt budget: one row (`Some(id)`) or all of them.
/// Returns how many were un-parked. The relay publishes them on its next pass, with their
/// original event id, so a row that had in fact reached the stream is still deduplicated.
pub async fn unpark(db: &Database, id: Option<i64>) -> Result<u64, sqlx::Error> {
    let mut tx = db.begin().await?;
    let done = sqlx::query(
        "UPDATE outbox SET parked_at_us = NULL, attempts = 0, next_attempt_at_us = $1 \
         WHERE parked_at_us IS NOT NULL AND ($2 IS NULL OR id = $2)",
    )
    .bind(now_micros())
    .bind(id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}

#[cfg(all(test, feature = "testing"))]
mod trace_header_tests {
    use super::*;
    use crate::nats::{ensure_stream, StreamSpec};
    use crate::testing::{NatsServer, TestDb};

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Thing {
        id: String,
    }
    crate::event_payload!(Thing, "things.made.v1", id);

    async fn relay_sends_the_rows_trace_context_as_headers(backend: Backend) {
        let nats = NatsServer::start().await;
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client.clone());
        ensure_stream(&js, &StreamSpec::new("THINGS", &["things.>"]))
            .await
            .unwrap();
        let testdb = TestDb::new(backend).await;
        let db = testdb.connect().await;
        let thing = Thing { id: "t1".into() };
        let mut traced = Envelope::new("/test", &thing, None);
        traced.traceparent = Some(TP.into());
        traced.tracestate = Some("congo=t61rcWkgMzE".into());
        let mut tx = db.begin().await.unwrap();
        enqueue(&mut tx, "things.made.v1", &traced).await.unwrap();
        // A row as written before trace context was stored: its columns stay NULL.
        let old = Envelope::new("/test", &thing, None);
        sqlx::query(
            "INSERT INTO outbox (event_id, subject, payload, created_at_us, next_attempt_at_us) \
             VALUES ($1, 'things.made.v1', $2, $3, $3)",
        )
        .bind(&old.id)
        .bind(old.to_bytes())
        .bind(now_micros())
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();

        let relay = OutboxRelay::new(db.clone(), client, RelayConfig::default());
        assert_eq!(relay.publish_pending().await.unwrap(), 2);
        let stream = js.get_stream("THINGS").await.unwrap();
        let first = stream.get_raw_message(1).await.unwrap();
        assert_eq!(first.headers.get(TRACEPARENT).map(|v| v.as_str()), Some(TP));
        assert_eq!(
            first.headers.get(TRACESTATE).map(|v| v.as_str()),
            Some("congo=t61rcWkgMzE")
        );
        let body: Envelope = serde_json::from_slice(&first.payload).unwrap();
        assert_eq!(body.traceparent.as_deref(), Some(TP));
        let second = stream.get_raw_message(2).await.unwrap();
        assert_eq!(
            second
                .headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.as_str()),
            Some(old.id.as_str())
        );
        assert!(second.headers.get(TRACEPARENT).is_none());
        assert!(second.headers.get(TRACESTATE).is_none());
    }

    #[tokio::test]
    async fn sqlite_relay_sends_the_rows_trace_context_as_headers() {
        relay_sends_the_rows_trace_context_as_headers(Backend::Sqlite).await
    }

    #[tokio::test]
    async fn postgres_relay_sends_the_rows_trace_context_as_headers() {
        relay_sends_the_rows_trace_context_as_headers(Backend::Postgres).await
    }
}

#[cfg(all(test, feature = "testing"))]
mod mark_tests {
    use super::*;
    use crate::testing::TestDb;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Thing {
        id: String,
    }
    crate::event_payload!(Thing, "things.made.v1", id);

    /// Marking more rows than one statement takes (several on SQLite) marks exactly those rows.
    async fn marks_exactly_the_rows_given(backend: Backend) {
        let testdb = TestDb::new(backend).await;
        let db = testdb.connect().await;
        let mut tx = db.begin().await.unwrap();
        for i in 0..104 {
            let thing = Thing {
                id: format!("t{i}"),
            };
            enqueue(&mut tx, "things", &Envelope::new("/test", &thing, None))
                .await
                .unwrap();
        }
        let ids: Vec<i64> = sqlx::query("SELECT id FROM outbox ORDER BY id")
            .fetch_all(&mut *tx)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let chosen: Vec<i64> = ids.iter().copied().filter(|id| id % 3 != 0).collect();
        mark_published(&mut tx, 42, &chosen).await.unwrap();
        tx.commit().await.unwrap();
        let marked: Vec<i64> =
            sqlx::query("SELECT id FROM outbox WHERE published_at_us = 42 ORDER BY id")
                .fetch_all(db.pool())
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
        assert_eq!(marked, chosen);
        // 70 rows: on SQLite pieces of 64, 4, 1 and 1.
        assert_eq!(chosen.len(), 70);
    }

    /// A pass skips rows whose mark is still on its way (the run loop's pipelined marks), and
    /// takes them again should the mark never land.
    #[tokio::test]
    async fn a_pass_skips_the_rows_being_marked() {
        use crate::nats::{ensure_stream, StreamSpec};
        let nats = crate::testing::NatsServer::start().await;
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client.clone());
        ensure_stream(&js, &StreamSpec::new("THINGS", &["things.>"]))
            .await
            .unwrap();
        let testdb = TestDb::new(Backend::Sqlite).await;
        let db = testdb.connect().await;
        let mut tx = db.begin().await.unwrap();
        for i in 0..5 {
            let thing = Thing {
                id: format!("t{i}"),
            };
            enqueue(
                &mut tx,
                "things.made",
                &Envelope::new("/test", &thing, None),
            )
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
        let relay = OutboxRelay::new(
            db.clone(),
            client,
            RelayConfig {
                batch_size: 2,
                ..RelayConfig::default()
            },
        );
        relay.marking.lock().unwrap().extend([1, 2]);
        let batch = relay.publish_batch().await.unwrap();
        let ids: Vec<i64> = batch.rows.iter().map(|(p, _)| p.id).collect();
        assert_eq!(
            ids,
            [3, 4],
            "the batch size counts only rows not being marked"
        );
        relay.record(batch).await.unwrap();
        // The marks of 1 and 2 never landed: once they are no longer being marked, they are due.
        relay.marking.lock().unwrap().clear();
        let batch = relay.publish_batch().await.unwrap();
        let ids: Vec<i64> = batch.rows.iter().map(|(p, _)| p.id).collect();
        assert_eq!(ids, [1, 2]);
    }

    #[tokio::test]
    async fn sqlite_marks_exactly_the_rows_given() {
        marks_exactly_the_rows_given(Backend::Sqlite).await
    }

    #[tokio::test]
    async fn postgres_marks_exactly_the_rows_given() {
        marks_exactly_the_rows_given(Backend::Postgres).await
    }
}

#[cfg(all(test, feature = "testing"))]
mod lost_ack_tests {
    use std::time::Instant;

    use super::*;
    use crate::testing::{NatsServer, TestDb};

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Thing {
        id: String,
    }
    crate::event_payload!(Thing, "things.made.v1", id);

    /// Publishes that reach something but are never acknowledged (as when a stream's leader dies
    /// mid-window) cost a pass one ack timeout, not one per row; the rows stay due, uncharged,
    /// and the relay says it is blocked.
    async fn a_window_of_lost_acks_costs_one_timeout(backend: Backend) {
        const ROWS: usize = 8;
        let nats = NatsServer::start().await;
        let client = async_nats::connect(nats.url()).await.unwrap();
        // A plain subscriber that never answers: the server has a responder, no ack comes back.
        let _silent = client.subscribe("lost.>").await.unwrap();
        client.flush().await.unwrap();
        let testdb = TestDb::new(backend).await;
        let db = testdb.connect().await;
        let mut tx = db.begin().await.unwrap();
        for i in 0..ROWS {
            let thing = Thing {
                id: format!("t{i}"),
            };
            enqueue(
                &mut tx,
                "lost.things",
                &Envelope::new("/test", &thing, None),
            )
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();

        let relay = OutboxRelay::new(db.clone(), client, RelayConfig::default());
        let start = Instant::now();
        let pass = relay.publish_pending().await;
        let took = start.elapsed();
        assert!(matches!(pass, Err(RelayError::Outage)), "{pass:?}");
        // One ack timeout (5 s) and change; awaited one by one it was ROWS of them.
        assert!(
            took < Duration::from_secs(9),
            "a pass of {ROWS} lost acks took {took:?}"
        );
        assert!(relay.health().blocked());
        let rows = sqlx::query(
            "SELECT COUNT(*) FROM outbox WHERE published_at_us IS NULL AND attempts = 0 \
             AND parked_at_us IS NULL",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        assert_eq!(rows.get::<i64, _>(0), ROWS as i64);
    }

    #[tokio::test]
    async fn sqlite_a_window_of_lost_acks_costs_one_timeout() {
        a_window_of_lost_acks_costs_one_timeout(Backend::Sqlite).await
    }

    #[tokio::test]
    async fn postgres_a_window_of_lost_acks_costs_one_timeout() {
        a_window_of_lost_acks_costs_one_timeout(Backend::Postgres).await
    }
}
