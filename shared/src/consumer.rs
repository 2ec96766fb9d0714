//! Idempotent consumer: each message is applied at most once in effect, in one transaction with the
//! events it causes, and acknowledged only after that transaction commits.
//!
//! Messages are taken in batches (whatever is ready, up to `batch_size`) and applied in one
//! transaction. When a handler fails, the batch is applied again with each message inside its own
//! savepoint, so one failing message never takes its batch down.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::Message;
use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use sqlx::{AnyConnection, Row};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::db::{now_micros, Database, Kept};
use crate::deferred::{collect, Deferred};
use crate::envelope::{DecodeError, Envelope, Origin};
use crate::outbox::OutboxWaker;
use crate::write_behind;

/// What a handler says about an event it could not apply.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HandlerError {
    /// Might succeed later (database busy, dependency down): the message is redelivered after a delay.
    #[error("transient: {0}")]
    Transient(String),
    /// Can never succeed (invalid payload, unknown type): the message is dead-lettered.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        HandlerError::Transient(e.to_string())
    }
}

impl From<DecodeError> for HandlerError {
    fn from(e: DecodeError) -> Self {
        HandlerError::Permanent(e.to_string())
    }
}

/// Applies one event to the service's state, inside the consumer's transaction. Events it causes
/// are written with [`crate::emit`] on the same connection. Services declare their handlers per
/// payload type with [`crate::Subscription`], which implements this trait.
pub trait Handler: Send + Sync + 'static {
    /// Apply `event`. Return an error to roll this event's effects back.
    fn handle(
        &self,
        conn: &mut AnyConnection,
        event: &Envelope,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A durable pull consumer and how to run it.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// Durable name; also the inbox's consumer key.
    pub durable: String,
    /// Stream the consumer reads.
    pub stream: String,
    /// Subjects it receives.
    pub filter_subjects: Vec<String>,
    /// The event types it handles by name (metric labels); empty: the exact filter subjects.
    pub event_types: Vec<String>,
    /// Deliveries failing transiently before a message is given up and dead-lettered (enforced by
    /// the runner; the server redelivers without limit so nothing is dropped while the database is
    /// unreachable).
    pub max_deliver: i64,
    /// How long the server waits for an ack before redelivering.
    pub ack_wait: Duration,
    /// Messages per transaction at most.
    pub batch_size: usize,
    /// Batches processed at once.
    pub concurrency: usize,
    /// Bodies larger than this are dead-lettered unread.
    pub max_event_bytes: usize,
}

impl ConsumerSpec {
    /// A spec with production defaults.
    pub fn new(durable: &str, stream: &str, filter_subjects: &[&str]) -> Self {
        Self {
            durable: durable.to_owned(),
            stream: stream.to_owned(),
            filter_subjects: filter_subjects.iter().map(|s| (*s).to_owned()).collect(),
            event_types: Vec::new(),
            max_deliver: 10,
            ack_wait: Duration::from_secs(10),
            batch_size: 128,
            concurrency: 1,
            max_event_bytes: 64 * 1024,
        }
    }

    /// How long after its first delivery a message may still be delivered again: every delivery
    /// may wait `ack_wait`, then the longest nak delay, until `max_deliver` gives it up.
    pub fn redelivery_horizon(&self) -> Duration {
        (self.ack_wait + MAX_NAK_DELAY).saturating_mul(self.max_deliver.max(1) as u32)
    }

    /// The JetStream consumer configuration for this spec.
    pub fn config(&self) -> pull::Config {
        pull::Config {
            durable_name: Some(self.durable.clone()),
            filter_subjects: self.filter_subjects.clone(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            // Unlimited on the server: a message whose last delivery fails because the database is
            // down would otherwise vanish without a dead letter. The runner enforces `max_deliver`
            // itself, when it can record the dead letter.
            max_deliver: -1,
            max_ack_pending: (self.batch_size * self.concurrency * 8).max(1024) as i64,
            ..Default::default()
        }
    }
}

/// Record that `consumer` applied `event_id`. `false` means it already had: skip the effect.
pub async fn record_once(
    conn: &mut AnyConnection,
    consumer: &str,
    event: &Envelope,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO inbox (consumer, event_id, event_type, received_at_us) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (consumer, event_id) DO NOTHING",
    )
    .bind(consumer)
    .bind(&event.id)
    .bind(&event.event_type)
    .bind(now_micros())
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Record that `consumer` applies each of `events`, in one statement; returns the ids it had not
/// applied before (the others are duplicates: skip their effects).
async fn record_new(
    conn: &mut AnyConnection,
    consumer: &str,
    events: &[&Envelope],
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    if events.is_empty() {
        return Ok(Default::default());
    }
    const HEAD: &str = "INSERT INTO inbox (consumer, event_id, event_type, received_at_us) VALUES ";
    const TAIL: &str = " ON CONFLICT (consumer, event_id) DO NOTHING RETURNING event_id";
    let now = now_micros();
    let mut new = std::collections::HashSet::with_capacity(events.len());
    if conn.backend_name() == "SQLite" {
        // A few fixed sizes, each kept prepared (see `write_behind::sqlite_chunks`).
        let mut rest = events;
        for size in crate::write_behind::sqlite_chunks(events.len(), usize::MAX) {
            let (chunk, after) = rest.split_at(size);
            rest = after;
            let sql = format!("{HEAD}{}{TAIL}", vec!["(?, ?, ?, ?)"; size].join(", "));
            let query = chunk.iter().fold(sqlx::query(&sql), |q, e| {
                q.bind(consumer).bind(&e.id).bind(&e.event_type).bind(now)
            });
            for r in query.fetch_all(&mut *conn).await? {
                new.insert(r.try_get(0)?);
            }
        }
        return Ok(new);
    }
    // Postgres: one statement, one round trip.
    let rows = (0..events.len())
        .map(|i| format!("($1, ${}, ${}, $2)", 2 * i + 3, 2 * i + 4))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!("{HEAD}{rows}{TAIL}");
    let query = events
        .iter()
        .fold(sqlx::query(&sql).bind(consumer).bind(now), |q, e| {
            q.bind(&e.id).bind(&e.event_type)
        });
    for r in query.fetch_all(conn).await? {
        new.insert(r.try_get(0)?);
    }
    Ok(new)
}

/// A message that can never be applied, kept with its payload and the reason.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "service", derive(utoipa::ToSchema))]
pub struct DeadLetter {
    /// Row id.
    pub id: i64,
    /// Consumer that gave up.
    pub consumer: String,
    /// Source stream.
    pub stream: String,
    /// Sequence in the source stream.
    pub stream_sequence: i64,
    /// Subject it was published on.
    pub subject: String,
    /// Headers as JSON (`{"name": ["value", ...]}`).
    pub headers: String,
    /// The body, lossily as UTF-8.
    pub payload: String,
    /// The envelope id, when the body decoded that far.
    pub event_id: Option<String>,
    /// Why it was given up.
    pub reason: String,
    /// Deliveries seen.
    pub delivered: i64,
    /// When it was dead-lettered.
    pub created_at: DateTime<Utc>,
}

/// The most recent dead letters, newest first.
pub async fn dead_letters(db: &Database, limit: i64) -> Result<Vec<DeadLetter>, sqlx::Error> {
    dead_letters_before(db, None, limit).await
}

/// Dead letters newest first, starting below row id `before` (a cursor) if given, at most `limit`.
pub async fn dead_letters_before(
    db: &Database,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<DeadLetter>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, consumer, stream, stream_sequence, subject, headers, payload, event_id, reason, \
         delivered, created_at_us FROM dead_letters WHERE id < $1 ORDER BY id DESC LIMIT $2",
    )
    .bind(before.unwrap_or(i64::MAX))
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|r| {
            let payload: Vec<u8> = r.try_get(6)?;
            let created: i64 = r.try_get(10)?;
            Ok(DeadLetter {
                id: r.try_get(0)?,
                consumer: r.try_get(1)?,
                stream: r.try_get(2)?,
                stream_sequence: r.try_get(3)?,
                subject: r.try_get(4)?,
                headers: r.try_get(5)?,
                payload: String::from_utf8_lossy(&payload).into_owned(),
                event_id: r.try_get(7)?,
                reason: r.try_get(8)?,
                delivered: r.try_get(9)?,
                created_at: DateTime::from_timestamp_micros(created).unwrap_or_default(),
            })
        })
        .collect()
}

/// What became of one message, for `consumer_messages_total{outcome}`.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Applied,
    Duplicate,
    Retried,
    DeadLettered,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Retried => "retried",
            Outcome::DeadLettered => "dead_lettered",
        }
    }
}

/// A message decoded and ready to apply, or refused before any handler sees it.
// Lives for one message, on the stack: boxing the large variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Step {
    Refused {
        event_id: Option<String>,
        reason: String,
    },
    Ready {
        event: Envelope,
        span: tracing::Span,
        attempt: i64,
    },
}

/// What a handler's outcome means for its message.
enum Settle {
    Commit,
    DeadLetter(String),
    Retry(String),
}

/// What to tell the server about one message once the batch's transaction is settled.
#[derive(Debug, Clone, Copy)]
enum Verdict {
    Ack,
    Nak(Duration),
    Term,
}

/// Runs a handler over a durable pull consumer until shutdown.
pub struct ConsumerRunner<H> {
    spec: ConsumerSpec,
    db: Database,
    js: async_nats::jetstream::Context,
    handler: Arc<H>,
    waker: OutboxWaker,
    also_wake: Vec<OutboxWaker>,
    /// Whether the durable is attached, for readiness.
    attached: Option<Arc<AtomicBool>>,
    /// Metric labels, leaked once per consumer (a handful per process) so recording allocates nothing.
    durable_label: &'static str,
    type_labels: Vec<&'static str>,
    /// Connections kept between batches, one per batch in flight (see [`crate::db::Kept`]).
    kept: std::sync::Mutex<Vec<Kept>>,
}

impl<H: Handler> ConsumerRunner<H> {
    /// A runner applying `handler` to the messages of `spec`, waking `waker`'s relay after commits.
    pub fn new(
        spec: ConsumerSpec,
        db: Database,
        client: async_nats::Client,
        handler: H,
        waker: OutboxWaker,
    ) -> Self {
        let durable_label: &'static str = Box::leak(spec.durable.clone().into_boxed_str());
        let named = if spec.event_types.is_empty() {
            &spec.filter_subjects
        } else {
            &spec.event_types
        };
        let type_labels = named
            .iter()
            .filter(|s| !s.contains(['*', '>']))
            .map(|s| &*Box::leak(s.clone().into_boxed_str()))
            .collect();
        Self {
            attached: None,
            durable_label,
            type_labels,
            spec,
            db,
            js: async_nats::jetstream::new(client),
            handler: Arc::new(handler),
            waker,
            also_wake: Vec::new(),
            kept: Default::default(),
        }
    }

    /// The handler, shared (dead-letter redrive applies through it).
    pub fn handler(&self) -> Arc<H> {
        self.handler.clone()
    }

    /// Also wake `waker` after each commit (a local worker waiting for what handlers write).
    pub fn also_wake(mut self, waker: OutboxWaker) -> Self {
        self.also_wake.push(waker);
        self
    }

    /// Create or update the durable consumer, retrying (with backoff) until its stream exists.
    pub async fn provision(&self, shutdown: &CancellationToken) -> Option<PullConsumer> {
        let mut backoff = retry_backoff();
        loop {
            let attempt = async {
                let stream = self.js.get_stream(&self.spec.stream).await?;
                let consumer = stream.create_consumer(self.spec.config()).await?;
                Ok::<_, async_nats::Error>(consumer)
            };
            match attempt.await {
                Ok(c) => return Some(c),
                Err(e) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(2));
                    tracing::warn!(consumer = %self.spec.durable, stream = %self.spec.stream, error = %e, retry_in = ?delay, "consumer not provisioned yet");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return None,
                    }
                }
            }
        }
    }

    /// Report whether the durable is attached (for readiness) through `flag`.
    pub fn report_attached(mut self, flag: Arc<AtomicBool>) -> Self {
        self.attached = Some(flag);
        self
    }

    fn set_attached(&self, yes: bool) {
        if let Some(f) = &self.attached {
            f.store(yes, Ordering::SeqCst);
        }
    }

    /// Consume until `shutdown`: stop fetching, finish the batches in flight, return. When the
    /// durable (or its stream) disappears, it is provisioned again and consuming resumes.
    pub async fn run(self, consumer: PullConsumer, shutdown: CancellationToken) {
        let mut backoff = retry_backoff();
        let mut refused = refused_backoff();
        let mut consumer = consumer;
        self.set_attached(true);
        while !shutdown.is_cancelled() {
            let messages = consumer
                .stream()
                .max_messages_per_batch(self.spec.batch_size)
                .heartbeat(PULL_HEARTBEAT)
                .expires(Duration::from_secs(30))
                .messages()
                .await;
            let messages = match messages {
                Ok(m) => m,
                Err(e) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(2));
                    tracing::warn!(consumer = %self.spec.durable, error = %e, retry_in = ?delay, "cannot pull; checking the durable");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    match self.reattach(&shutdown).await {
                        Some(c) => consumer = c,
                        None => break,
                    }
                    continue;
                }
            };
            backoff = retry_backoff();
            let lost = Arc::new(AtomicBool::new(false));
            let received = AtomicBool::new(false);
            let pulled_at = std::time::Instant::now();
            messages
                .take_until(shutdown.cancelled())
                .inspect(|item| {
                    if item.is_ok() {
                        received.store(true, Ordering::Relaxed);
                    }
                })
                // A deleted durable ends the pull; a missed heartbeat may mean the same (or a
                // server restart): either way, stop and check the wiring below.
                .take_while(|item| {
                    let fatal = matches!(item, Err(e) if matches!(
                        e.kind(),
                        MessagesErrorKind::ConsumerDeleted
                            | MessagesErrorKind::MissingHeartbeat
                            | MessagesErrorKind::NoResponders
                    ));
                    if let Err(e) = item {
                        if fatal {
                            tracing::warn!(consumer = %self.spec.durable, error = %e, "pull interrupted; checking the durable");
                            lost.store(true, Ordering::SeqCst);
                        }
                    }
                    std::future::ready(!fatal)
                })
                .ready_chunks(self.spec.batch_size)
                .for_each_concurrent(self.spec.concurrency.max(1), |chunk| async {
                    let mut batch = Vec::with_capacity(chunk.len());
                    for item in chunk {
                        match item {
                            Ok(m) => batch.push(m),
                            Err(e) => {
                                tracing::debug!(consumer = %self.spec.durable, error = %e, "pull stream notice")
                            }
                        }
                    }
                    if !batch.is_empty() {
                        self.process(batch).await;
                    }
                })
                .await;
            if shutdown.is_cancelled() {
                break;
            }
            if received.load(Ordering::Relaxed) || pulled_at.elapsed() > PULL_HEARTBEAT {
                refused = refused_backoff();
            } else if lost.load(Ordering::SeqCst) {
                // Lost at once (no responders while the consumer's leader is being elected):
                // back off, or this loop re-pulls as fast as the server refuses.
                self.set_attached(false);
                let delay = refused.next().unwrap_or(Duration::from_secs(1));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
            // The pull ended: make sure the durable exists (creating it, and waiting for its
            // stream, if someone deleted them) before pulling again.
            match self.reattach(&shutdown).await {
                Some(c) => consumer = c,
                None => break,
            }
        }
        self.set_attached(false);
    }

    /// Provision the durable again; not attached meanwhile.
    async fn reattach(&self, shutdown: &CancellationToken) -> Option<PullConsumer> {
        self.set_attached(false);
        let c = self.provision(shutdown).await?;
        self.set_attached(true);
        Some(c)
    }

    /// Apply a batch in one transaction, then settle each message with the server.
    async fn process(&self, mut batch: Vec<Message>) {
        in_saga_order(&mut batch, |m| &m.payload);
        let mut kept = self
            .kept
            .lock()
            .ok()
            .and_then(|mut k| k.pop())
            .unwrap_or_else(|| self.db.keep());
        let applied = self.apply(&mut kept, &batch).await;
        if applied.is_err() {
            kept.discard();
        }
        if let Ok(mut k) = self.kept.lock() {
            k.push(kept);
        }
        let (verdicts, enqueued) = match applied {
            Ok(v) => v,
            Err(e) => {
                // Nothing was committed: every message comes back later.
                tracing::warn!(consumer = %self.spec.durable, error = %e, "batch transaction failed; redelivering");
                metrics::counter!("consumer_messages_total", "consumer" => self.durable_label, "event_type" => "other", "outcome" => "retried")
                    .increment(batch.len() as u64);
                let verdicts = batch
                    .iter()
                    .map(|m| Verdict::Nak(nak_delay(delivered(m))))
                    .collect();
                (verdicts, false)
            }
        };
        // Anything acked was committed: wake whoever waits for this consumer's commits, and the
        // relay if the commit wrote outbox rows (a pass that finds nothing is not free).
        let mut committed = false;
        for (msg, verdict) in batch.iter().zip(verdicts) {
            let kind = match verdict {
                Verdict::Ack => {
                    committed = true;
                    AckKind::Ack
                }
                Verdict::Nak(d) => AckKind::Nak(Some(d)),
                Verdict::Term => AckKind::Term,
            };
            // A lost ack means a redelivery, which the inbox turns into a no-op.
            if let Err(e) = msg.ack_with(kind).await {
                tracing::debug!(error = %e, "ack not sent; the message will be redelivered");
            }
        }
        if enqueued {
            self.waker.wake();
        }
        if committed {
            for w in &self.also_wake {
                w.wake();
            }
        }
    }

    /// Apply a batch in one transaction. Optimistically without per-message savepoints; if any
    /// handler fails, that attempt is rolled back and the batch is applied again with each message
    /// in its own savepoint, so the failing one is isolated and the others still commit (a batch
    /// of one is settled from its first try). Also says whether anything committed wrote outbox
    /// rows.
    async fn apply(
        &self,
        kept: &mut Kept,
        batch: &[Message],
    ) -> Result<(Vec<Verdict>, bool), sqlx::Error> {
        let attempts = self.count_attempts(batch).await?;
        if let Some(verdicts) = self.apply_optimistic(kept, batch, &attempts).await? {
            return Ok(verdicts);
        }
        self.apply_isolated(kept, batch, &attempts).await
    }

    /// Count the attempts of the batch's redelivered messages, committed before anything is
    /// applied: a message that kills the process while being applied is still counted, and is
    /// given up once it has had `max_deliver` attempts. Deliveries that never reach this point
    /// (database down, server-side `ack_wait` expiries of a stopped process) are not counted, so a
    /// long outage does not exhaust a message. First deliveries cost nothing here.
    async fn count_attempts(&self, batch: &[Message]) -> Result<HashMap<u64, i64>, sqlx::Error> {
        let mut attempts = HashMap::new();
        let redelivered: Vec<MessageMeta> = batch
            .iter()
            .map(MessageMeta::of)
            .filter(|m| m.delivered > 1)
            .collect();
        if redelivered.is_empty() {
            return Ok(attempts);
        }
        let mut tx = self.db.begin().await?;
        for meta in &redelivered {
            let earlier: i64 = sqlx::query(
                "INSERT INTO consumer_attempts (consumer, stream, stream_sequence, attempts, \
                 updated_at_us) VALUES ($1, $2, $3, 1, $4) \
                 ON CONFLICT (consumer, stream, stream_sequence) DO UPDATE \
                 SET attempts = consumer_attempts.attempts + 1, updated_at_us = $4 \
                 RETURNING attempts",
            )
            .bind(&self.spec.durable)
            .bind(&meta.stream)
            .bind(meta.stream_sequence as i64)
            .bind(now_micros())
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
            // The first delivery is not recorded: this one is attempt `earlier + 1`.
            attempts.insert(meta.stream_sequence, earlier + 1);
        }
        tx.commit().await?;
        Ok(attempts)
    }

    /// The handler, with a panic turned into a permanent failure (dead letter) instead of a dead
    /// consumer task.
    async fn guarded(
        &self,
        conn: &mut AnyConnection,
        event: &Envelope,
    ) -> Result<(), HandlerError> {
        match std::panic::AssertUnwindSafe(self.handler.handle(conn, event))
            .catch_unwind()
            .await
        {
            Ok(outcome) => outcome,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".to_owned());
                Err(HandlerError::Permanent(format!("handler panicked: {what}")))
            }
        }
    }

    /// Decode a message and check its attempts: what to apply, or why it never can be.
    fn step(&self, msg: &Message, meta: &MessageMeta, attempts: &HashMap<u64, i64>) -> Step {
        if msg.payload.len() > self.spec.max_event_bytes {
            return Step::Refused {
                event_id: None,
                reason: format!(
                    "body of {} bytes exceeds the {} byte limit",
                    msg.payload.len(),
                    self.spec.max_event_bytes
                ),
            };
        }
        let event = match Envelope::decode(&msg.payload, meta.origin(msg)) {
            Ok(e) => e,
            Err(e) => {
                return Step::Refused {
                    event_id: None,
                    reason: e.to_string(),
                }
            }
        };
        let attempt = attempts.get(&meta.stream_sequence).copied().unwrap_or(1);
        if attempt > self.spec.max_deliver {
            return Step::Refused {
                reason: format!(
                    "gave up after {} attempts: the process did not finish applying it",
                    attempt - 1
                ),
                event_id: Some(event.id),
            };
        }
        let span = self.span(msg, meta, &event);
        Step::Ready {
            event,
            span,
            attempt,
        }
    }

    /// The consumer span, continuing the event's trace: the NATS headers (what the relay sent,
    /// or what a person gave `nats pub`), else the CloudEvent's own extensions.
    fn span(&self, msg: &Message, meta: &MessageMeta, event: &Envelope) -> tracing::Span {
        let span = tracing::info_span!(
            "event",
            otel.name = %format_args!("process {}", event.event_type),
            otel.kind = "consumer",
            consumer = %self.spec.durable,
            event_id = %event.id,
            event_type = %event.event_type,
            correlation_id = event.correlationid.as_deref().unwrap_or(""),
            delivered = meta.delivered,
            trace_id = tracing::field::Empty,
        );
        let header = |name| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str())
        };
        let (traceparent, tracestate) = match header(crate::trace::TRACEPARENT)
            .filter(|t| crate::trace::valid_traceparent(t))
        {
            Some(tp) => (Some(tp), header(crate::trace::TRACESTATE)),
            None => (event.traceparent.as_deref(), event.tracestate.as_deref()),
        };
        if let Some(id) = crate::trace::adopt(&span, traceparent, tracestate) {
            span.record("trace_id", tracing::field::display(id));
        }
        span
    }

    /// Dead-letter a message that can never be applied, in `tx`.
    async fn refuse(
        &self,
        tx: &mut AnyConnection,
        msg: &Message,
        meta: &MessageMeta,
        event_id: Option<&str>,
        reason: &str,
        effects: &mut Deferred,
    ) -> Result<Verdict, sqlx::Error> {
        tracing::warn!(consumer = %self.spec.durable, subject = %msg.subject, %reason, "dead-lettering");
        self.dead_letter(tx, msg, meta, event_id, reason).await?;
        self.count(effects, "other", Outcome::DeadLettered, None);
        Ok(Verdict::Term)
    }

    /// What becomes of a message, given its handler's outcome and its attempt.
    fn verdict(&self, outcome: Result<(), HandlerError>, attempt: i64) -> Settle {
        match outcome {
            Ok(()) => Settle::Commit,
            Err(HandlerError::Permanent(reason)) => Settle::DeadLetter(reason),
            Err(HandlerError::Transient(reason)) if attempt >= self.spec.max_deliver => {
                Settle::DeadLetter(format!("gave up after {attempt} attempts: {reason}"))
            }
            Err(HandlerError::Transient(reason)) => Settle::Retry(reason),
        }
    }

    /// The whole batch in one transaction, no savepoints. `Ok(None)`: a handler failed and
    /// nothing was committed; the batch must be applied isolated.
    async fn apply_optimistic(
        &self,
        kept: &mut Kept,
        batch: &[Message],
        attempts: &HashMap<u64, i64>,
    ) -> Result<Option<(Vec<Verdict>, bool)>, sqlx::Error> {
        let steps: Vec<(MessageMeta, Step)> = batch
            .iter()
            .map(|msg| {
                let meta = MessageMeta::of(msg);
                let step = self.step(msg, &meta, attempts);
                (meta, step)
            })
            .collect();
        let mut tx = kept.begin().await?;
        // The batch's inbox rows in one statement; what comes back is what is new.
        let ready: Vec<&Envelope> = steps
            .iter()
            .filter_map(|(_, step)| match step {
                Step::Ready { event, .. } => Some(event),
                Step::Refused { .. } => None,
            })
            .collect();
        let mut fresh = match record_new(&mut tx, &self.spec.durable, &ready).await {
            Ok(fresh) => fresh,
            Err(_) => {
                tx.rollback().await?;
                return Ok(None);
            }
        };
        let mut verdicts = Vec::with_capacity(batch.len());
        // Metrics and handlers' deferred effects of what commits with this transaction.
        let mut effects = Deferred::default();
        // Rows the handlers wrote through `write_behind`, written just before the commit.
        let mut pending = write_behind::Pending::default();
        for (msg, (meta, step)) in batch.iter().zip(steps) {
            let (event, span, attempt) = match step {
                Step::Refused { event_id, reason } => {
                    let v = self
                        .refuse(
                            &mut tx,
                            msg,
                            &meta,
                            event_id.as_deref(),
                            &reason,
                            &mut effects,
                        )
                        .await?;
                    verdicts.push(v);
                    continue;
                }
                Step::Ready {
                    event,
                    span,
                    attempt,
                } => (event, span, attempt),
            };
            let label = self.type_label(&event.event_type);
            // Taken out, so a second copy of the same event in this batch is a duplicate too.
            if !fresh.remove(event.id.as_str()) {
                self.count(&mut effects, label, Outcome::Duplicate, None);
                verdicts.push(Verdict::Ack);
                continue;
            }
            let started = std::time::Instant::now();
            let ((outcome, deferred), rows) = write_behind::gather(collect(
                self.guarded(&mut tx, &event).instrument(span.clone()),
            ))
            .await;
            if let Err(failure) = outcome {
                tx.rollback().await?;
                if batch.len() > 1 {
                    return Ok(None);
                }
                // Alone in its batch, there is nothing else to save: settle it from this try
                // rather than apply it again.
                let settle = self.verdict(Err(failure), attempt);
                let mut effects = Deferred::default();
                let mut tx = self.db.begin().await?;
                let verdict = self
                    .settle_failed(&mut tx, msg, &meta, &event, settle, &span, &mut effects)
                    .await?;
                tx.commit().await?;
                effects.run();
                return Ok(Some((vec![verdict], false)));
            }
            effects.extend(deferred);
            pending.extend(rows);
            let took = Some(started.elapsed());
            self.count(&mut effects, label, Outcome::Applied, took);
            verdicts.push(Verdict::Ack);
        }
        // The batch's outbox and read-model rows, a statement per table instead of per message.
        // Should one be refused, the batch is applied again isolated, where it is found.
        if let Err(e) = pending.flush(&mut tx).await {
            tracing::debug!(consumer = %self.spec.durable, error = %e, "batch rows refused; isolating");
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        let enqueued = effects.enqueued();
        effects.run();
        Ok(Some((verdicts, enqueued)))
    }

    /// A message whose handler failed and was rolled back: dead-letter it in `conn`, or have it
    /// retried.
    #[allow(clippy::too_many_arguments)]
    async fn settle_failed(
        &self,
        conn: &mut AnyConnection,
        msg: &Message,
        meta: &MessageMeta,
        event: &Envelope,
        settle: Settle,
        span: &tracing::Span,
        effects: &mut Deferred,
    ) -> Result<Verdict, sqlx::Error> {
        let label = self.type_label(&event.event_type);
        Ok(match settle {
            // Not reached: only a failure comes here.
            Settle::Commit => Verdict::Nak(nak_delay(meta.delivered)),
            Settle::DeadLetter(reason) => {
                tracing::warn!(parent: span, %reason, "dead-lettering");
                self.dead_letter(conn, msg, meta, Some(&event.id), &reason)
                    .await?;
                self.count(effects, label, Outcome::DeadLettered, None);
                Verdict::Term
            }
            Settle::Retry(reason) => {
                tracing::info!(parent: span, %reason, "transient failure; will retry");
                self.count(effects, label, Outcome::Retried, None);
                Verdict::Nak(nak_delay(meta.delivered))
            }
        })
    }

    /// Each message in its own savepoint: one that fails is rolled back (and dead-lettered or
    /// retried) while the others commit.
    async fn apply_isolated(
        &self,
        kept: &mut Kept,
        batch: &[Message],
        attempts: &HashMap<u64, i64>,
    ) -> Result<(Vec<Verdict>, bool), sqlx::Error> {
        let mut tx = kept.begin().await?;
        let mut verdicts = Vec::with_capacity(batch.len());
        let mut effects = Deferred::default();
        for msg in batch {
            let meta = MessageMeta::of(msg);
            let (event, span, attempt) = match self.step(msg, &meta, attempts) {
                Step::Refused { event_id, reason } => {
                    let v = self
                        .refuse(
                            &mut tx,
                            msg,
                            &meta,
                            event_id.as_deref(),
                            &reason,
                            &mut effects,
                        )
                        .await?;
                    verdicts.push(v);
                    continue;
                }
                Step::Ready {
                    event,
                    span,
                    attempt,
                } => (event, span, attempt),
            };
            let label = self.type_label(&event.event_type);
            let mut sp = sqlx::Connection::begin(&mut *tx).await?;
            let started = std::time::Instant::now();
            let (outcome, deferred) = match record_once(&mut sp, &self.spec.durable, &event).await {
                Ok(false) => {
                    sp.commit().await?;
                    tracing::debug!(parent: &span, "duplicate; skipped");
                    self.count(&mut effects, label, Outcome::Duplicate, None);
                    verdicts.push(Verdict::Ack);
                    continue;
                }
                Ok(true) => collect(self.guarded(&mut sp, &event).instrument(span.clone())).await,
                Err(e) => (Err(HandlerError::from(e)), Deferred::default()),
            };
            match self.verdict(outcome, attempt) {
                Settle::Commit => {
                    sp.commit().await?;
                    effects.extend(deferred);
                    let took = Some(started.elapsed());
                    self.count(&mut effects, label, Outcome::Applied, took);
                    verdicts.push(Verdict::Ack);
                }
                failed => {
                    sp.rollback().await?;
                    let verdict = self
                        .settle_failed(&mut tx, msg, &meta, &event, failed, &span, &mut effects)
                        .await?;
                    verdicts.push(verdict);
                }
            }
        }
        tx.commit().await?;
        let enqueued = effects.enqueued();
        effects.run();
        Ok((verdicts, enqueued))
    }

    /// The `event_type` label: a type this consumer subscribes to by name, else `other`, so
    /// whatever a publisher makes up cannot grow the label set.
    fn type_label(&self, event_type: &str) -> &'static str {
        self.type_labels
            .iter()
            .find(|t| **t == event_type)
            .copied()
            .unwrap_or("other")
    }

    /// Count one message's outcome once the transaction commits.
    fn count(
        &self,
        effects: &mut Deferred,
        event_type: &'static str,
        outcome: Outcome,
        took: Option<Duration>,
    ) {
        let consumer = self.durable_label;
        effects.push(move || {
            metrics::counter!("consumer_messages_total", "consumer" => consumer, "event_type" => event_type, "outcome" => outcome.as_str())
                .increment(1);
            if let Some(took) = took {
                metrics::histogram!("consumer_handler_duration_seconds", "consumer" => consumer, "event_type" => event_type)
                    .record(took.as_secs_f64());
            }
            if matches!(outcome, Outcome::DeadLettered) {
                metrics::counter!("dead_lettered_total", "consumer" => consumer).increment(1);
            }
        });
    }

    async fn dead_letter(
        &self,
        conn: &mut AnyConnection,
        msg: &Message,
        meta: &MessageMeta,
        event_id: Option<&str>,
        reason: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO dead_letters (consumer, stream, stream_sequence, subject, headers, payload, \
             event_id, reason, delivered, created_at_us) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10) \
             ON CONFLICT (consumer, stream, stream_sequence) DO NOTHING",
        )
        .bind(&self.spec.durable)
        .bind(&meta.stream)
        .bind(meta.stream_sequence as i64)
        .bind(msg.subject.as_str())
        .bind(headers_json(msg))
        .bind(msg.payload.to_vec())
        .bind(event_id.map(printable))
        .bind(printable(reason))
        .bind(meta.delivered)
        .bind(now_micros())
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// Delivery metadata from the message's `$JS.ACK` reply subject.
struct MessageMeta {
    stream: String,
    stream_sequence: u64,
    delivered: i64,
    published: DateTime<Utc>,
}

impl MessageMeta {
    fn of(msg: &Message) -> Self {
        match msg.info() {
            Ok(info) => Self {
                stream: info.stream.to_owned(),
                stream_sequence: info.stream_sequence,
                delivered: info.delivered,
                published: DateTime::from_timestamp_nanos(
                    info.published.unix_timestamp_nanos() as i64
                ),
            },
            Err(_) => Self {
                stream: String::new(),
                stream_sequence: 0,
                delivered: 1,
                published: Utc::now(),
            },
        }
    }

    fn origin<'a>(&'a self, msg: &'a Message) -> Origin<'a> {
        Origin {
            subject: msg.subject.as_str(),
            msg_id: msg
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                .map(|v| v.as_str()),
            stream: &self.stream,
            stream_sequence: self.stream_sequence,
            published: self.published,
        }
    }
}

fn delivered(msg: &Message) -> i64 {
    msg.info().map(|i| i.delivered).unwrap_or(1)
}

/// Put a batch in order of its events' saga (`correlationid`), keeping the delivery order within
/// a saga (and for events without one, first). Handlers lock their saga's rows (an order, its
/// state) as they go, and one service applies batches of several durables at once: two batches
/// that locked the same two sagas in opposite orders deadlocked on Postgres, stalling both for
/// the server's deadlock timeout (1 s) and redelivering one. In one order, neither waits for the
/// other while holding what it wants.
fn in_saga_order<T>(batch: &mut [T], payload: impl Fn(&T) -> &[u8]) {
    #[derive(serde::Deserialize)]
    struct Saga {
        correlationid: Option<String>,
    }
    if batch.len() > 1 {
        // Stable: a saga's events keep their order. Undecodable ones sort first, and are
        // dead-lettered as before.
        batch.sort_by_cached_key(|m| {
            serde_json::from_slice::<Saga>(payload(m))
                .ok()
                .and_then(|s| s.correlationid)
        });
    }
}

/// Idle heartbeat asked of the server while a pull waits; two missed end the pull. A pull held by
/// a consumer leader whose node died gets no answer at all, so this bounds how long a consumer
/// sits idle after a node loss (4 s; at 5 s it was 10 s, past a saga's deadline). Above a 3.5 s
/// process stall, which then does not cost a re-pull.
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);

/// The longest delay a nak asks for.
const MAX_NAK_DELAY: Duration = Duration::from_secs(30);

/// Exponential redelivery delay: 250 ms, 500 ms, 1 s … capped at 30 s, with jitter.
fn nak_delay(delivered: i64) -> Duration {
    let base =
        Duration::from_millis(250).saturating_mul(1u32 << (delivered - 1).clamp(0, 7) as u32);
    let jitter = rand::random::<f64>() * 0.25 + 0.875;
    base.min(MAX_NAK_DELAY).mul_f64(jitter)
}

/// Between pulls the server refused at once: short, since the refusal (an election) usually is.
fn refused_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(1))
        .with_jitter()
        .without_max_times()
        .build()
}

fn retry_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Text safe to store anywhere: control characters (Postgres refuses NUL in TEXT) become `?`.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '?'
            } else {
                c
            }
        })
        .collect()
}

fn headers_json(msg: &Message) -> String {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if let Some(headers) = &msg.headers {
        for (name, values) in headers.iter() {
            map.insert(
                name.to_string(),
                values.iter().map(|v| v.as_str().to_owned()).collect(),
            );
        }
    }
    serde_json::to_string(&map).unwrap_or_else(|_| "{}".to_owned())
}

#[cfg(all(test, feature = "testing"))]
mod inbox_tests {
    use super::*;
    use crate::db::Backend;
    use crate::testing::TestDb;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Thing {
        id: String,
    }
    crate::event_payload!(Thing, "things.made.v1", id);

    fn thing(i: usize) -> Envelope {
        Envelope::new(
            "/test",
            &Thing {
                id: format!("t{i}"),
            },
            None,
        )
    }

    /// A batch larger than one statement (cut in several on SQLite) still says exactly which
    /// events are new: not those recorded before, and a second copy in the batch only once.
    async fn a_batch_says_which_events_are_new(backend: Backend) {
        let testdb = TestDb::new(backend).await;
        let db = testdb.connect().await;
        let events: Vec<Envelope> = (0..100).map(thing).collect();
        let mut conn = db.pool().acquire().await.unwrap();
        let before: Vec<&Envelope> = events.iter().step_by(10).collect();
        assert_eq!(record_new(&mut conn, "c", &before).await.unwrap().len(), 10);
        // 100 events, 10 seen before, and the 38th twice: 90 new.
        let mut batch: Vec<&Envelope> = events.iter().collect();
        batch.insert(50, &events[37]);
        let new = record_new(&mut conn, "c", &batch).await.unwrap();
        let expected: std::collections::HashSet<String> = events
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 10 != 0)
            .map(|(_, e)| e.id.clone())
            .collect();
        assert_eq!(new, expected);
        // Another consumer has seen none of them.
        assert_eq!(record_new(&mut conn, "d", &batch).await.unwrap().len(), 100);
        let rows: i64 = sqlx::query("SELECT COUNT(*) FROM inbox")
            .fetch_one(&mut *conn)
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(rows, 200);
    }

    #[tokio::test]
    async fn sqlite_a_batch_says_which_events_are_new() {
        a_batch_says_which_events_are_new(Backend::Sqlite).await
    }

    #[tokio::test]
    async fn postgres_a_batch_says_which_events_are_new() {
        a_batch_says_which_events_are_new(Backend::Postgres).await
    }
}

#[cfg(test)]
mod tests {
    use super::in_saga_order;

    #[test]
    fn a_batch_goes_in_saga_order_keeping_each_sagas_own_order() {
        let event = |id: &str, saga: Option<&str>| {
            let mut e = serde_json::json!({"id": id, "type": "t", "source": "/s", "data": {}});
            if let Some(saga) = saga {
                e["correlationid"] = saga.into();
            }
            (id.to_owned(), serde_json::to_vec(&e).unwrap())
        };
        let mut batch = vec![
            event("c1", Some("c")),
            event("a1", Some("a")),
            event("b1", Some("b")),
            event("a2", Some("a")),
            event("x1", None),
            (String::from("junk"), b"not json".to_vec()),
            event("c2", Some("c")),
            event("a3", Some("a")),
        ];
        in_saga_order(&mut batch, |(_, payload)| payload);
        let order: Vec<&str> = batch.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(order, ["x1", "junk", "a1", "a2", "a3", "b1", "c1", "c2"]);
    }
}
