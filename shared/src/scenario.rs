//! Given / when / then tests of a service's handlers over a real database, without NATS: the layer
//! between the pure `decide` tests and the running binaries.
//!
//! A [`Scenario`] holds a fresh database (SQLite or Postgres) and the service's
//! [`Subscription`]s. An event is delivered to every subscription whose filter takes its subject,
//! the way the consumer runner applies it: in its own transaction, recorded once in the inbox,
//! rolled back on failure. What the handlers announced is read back from the outbox.
//!
//! ```ignore
//! let mut s = Scenario::new(Backend::Sqlite, inventory_service::handlers::subscriptions()).await;
//! s.db().migrate(sqlite_migrations, postgres_migrations).await?;
//! s.given_state(async |conn| { store::set_available(conn, "apple", 5).await.unwrap(); }).await;
//! let placed = scenario::event(&OrderPlaced { order_id: "o-1".into(), .. });
//! let then = s.when(&placed).await;
//! then.then_emits(&["inventory.reserved.v1"]).then_caused_by_it();
//! let reserved: StockReserved = then.then_emitted_one();
//! assert_eq!(s.scalar::<i64>("SELECT available FROM products WHERE sku = 'apple'").await, 3);
//! s.when_twice(&placed).await.then_emits(&[]); // already applied: the inbox skips it
//! ```

use std::sync::atomic::{AtomicU64, Ordering};

use chrono::Utc;
use sqlx::{Any, AnyConnection, Row};

use crate::consumer::{record_once, Handler, HandlerError};
use crate::db::{Backend, Database};
use crate::deferred::collect;
use crate::envelope::{Envelope, EventPayload, Origin};
use crate::subscription::Subscription;
use crate::testing::TestDb;

/// The source stamped on events built by [`event`] (they come from "another service").
pub const TEST_SOURCE: &str = "/scenario";

/// An event as another service would announce it: a fresh id, in the saga named by the payload's
/// entity (the order id).
pub fn event<P: EventPayload>(payload: &P) -> Envelope {
    Envelope::new(TEST_SOURCE, payload, Some(payload.entity_id()))
}

/// What became of one delivery to one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied and committed.
    Applied,
    /// Already in the inbox: skipped.
    Duplicate,
    /// Refused for good (the runner dead-letters it); nothing committed.
    DeadLettered(String),
    /// Failed for now (the runner redelivers it); nothing committed.
    Retried(String),
}

/// One delivery of the event to one durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The durable it was delivered to.
    pub durable: String,
    /// What came of it.
    pub outcome: Outcome,
}

/// A database, the subscriptions under test and the outbox seen so far.
pub struct Scenario {
    db: Database,
    subscriptions: Vec<Subscription>,
    /// Outbox rows up to this id were written before the current step.
    seen: i64,
    /// Stream sequences for bare bodies (which take their id from the sequence).
    sequence: AtomicU64,
    _testdb: TestDb,
}

impl std::fmt::Debug for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scenario")
            .field("backend", &self.db.backend())
            .field("subscriptions", &self.subscriptions)
            .finish()
    }
}

impl Scenario {
    /// A fresh database on `backend` with the toolkit's tables, feeding `subscriptions`. Run the
    /// service's own migrations on [`Scenario::db`] next.
    pub async fn new(backend: Backend, subscriptions: Vec<Subscription>) -> Self {
        let testdb = TestDb::new(backend).await;
        let db = testdb.connect().await;
        Self {
            db,
            subscriptions,
            seen: 0,
            sequence: AtomicU64::new(0),
            _testdb: testdb,
        }
    }

    /// Stamp what the handlers emit with `source`, as the service's runtime does.
    pub fn with_source(mut self, source: &str) -> Self {
        self.subscriptions = std::mem::take(&mut self.subscriptions)
            .into_iter()
            .map(|s| s.with_source(source))
            .collect();
        self
    }

    /// The database, for migrations, the service's own reads and assertions.
    pub fn db(&self) -> &Database {
        &self.db
    }

    /// Set state up in one committed transaction (the service's store functions or SQL); what it
    /// emits is not part of the next step's outcome.
    pub async fn given_state<R>(&mut self, setup: impl AsyncFnOnce(&mut AnyConnection) -> R) -> R {
        let mut tx = self.db.begin().await.expect("begin");
        let out = setup(&mut *tx).await;
        tx.commit().await.expect("commit the given state");
        self.seen = self.last_outbox_id().await;
        out
    }

    /// Events that happened before: each must apply (or be a duplicate), else the scenario is
    /// wrong and this panics. What they emit is not part of the next step's outcome.
    pub async fn given(&mut self, events: impl IntoIterator<Item = Envelope>) -> &mut Self {
        for event in events {
            let then = self.when(&event).await;
            for d in &then.deliveries {
                assert!(
                    matches!(d.outcome, Outcome::Applied | Outcome::Duplicate),
                    "given {} was not applied by {}: {:?}",
                    event.event_type,
                    d.durable,
                    d.outcome
                );
            }
        }
        self
    }

    /// Deliver `event` (as a structured CloudEvent on the subject of its type) to every
    /// subscription whose filters take it, one transaction each; what they emitted and how each
    /// delivery ended. Panics if no subscription receives it: such an event never reaches the
    /// service.
    pub async fn when(&mut self, event: &Envelope) -> Then {
        let sequence = self.next_sequence();
        self.deliver(&event.event_type, &event.to_bytes(), sequence)
            .await
    }

    /// The same event delivered twice (a redelivery): applied once, the second skipped by the
    /// inbox. The outcome covers both deliveries.
    pub async fn when_twice(&mut self, event: &Envelope) -> Then {
        let mut first = self.when(event).await;
        let second = self.when(event).await;
        first.deliveries.extend(second.deliveries);
        first.emitted.extend(second.emitted);
        first
    }

    /// A bare JSON body published by hand on `subject` (e.g. with `nats pub`), typed by the subject
    /// and identified by its stream sequence.
    pub async fn when_published(&mut self, subject: &str, body: &serde_json::Value) -> Then {
        let sequence = self.next_sequence();
        let bytes = serde_json::to_vec(body).expect("serialize body");
        self.deliver(subject, &bytes, sequence).await
    }

    /// One value from a query, for state assertions: `scalar::<i64>("SELECT COUNT(*) FROM t")`.
    pub async fn scalar<T>(&self, sql: &str) -> T
    where
        T: for<'r> sqlx::Decode<'r, Any> + sqlx::Type<Any> + Send + Unpin,
    {
        sqlx::query(sql)
            .fetch_one(self.db.pool())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .try_get(0)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The number of rows `sql` (a query without its `SELECT`) selects: `count("FROM t WHERE ..")`.
    pub async fn count(&self, from_where: &str) -> i64 {
        self.scalar::<i64>(&format!("SELECT COUNT(*) {from_where}"))
            .await
    }

    fn next_sequence(&self) -> u64 {
        self.sequence.fetch_add(1, Ordering::Relaxed) + 1
    }

    async fn deliver(&mut self, subject: &str, body: &[u8], sequence: u64) -> Then {
        let origin = Origin {
            subject,
            msg_id: None,
            stream: "SCENARIO",
            stream_sequence: sequence,
            published: Utc::now(),
        };
        let receivers: Vec<&Subscription> = self
            .subscriptions
            .iter()
            .filter(|s| {
                s.spec()
                    .filter_subjects
                    .iter()
                    .any(|f| subject_matches(f, subject))
            })
            .collect();
        assert!(
            !receivers.is_empty(),
            "no subscription receives {subject:?}: {:?}",
            self.subscriptions
                .iter()
                .map(|s| s.durable())
                .collect::<Vec<_>>()
        );
        let decoded = Envelope::decode(body, origin);
        let mut deliveries = Vec::with_capacity(receivers.len());
        for subscription in receivers {
            let durable = subscription.spec().durable.clone();
            let outcome = match &decoded {
                Ok(event) => apply(&self.db, subscription, event).await,
                Err(e) => Outcome::DeadLettered(HandlerError::from(e.clone()).to_string()),
            };
            deliveries.push(Delivery { durable, outcome });
        }
        let seen = self.seen;
        let emitted = self.emitted_after(seen).await;
        self.seen = emitted
            .last()
            .map(|(id, _)| *id)
            .unwrap_or(self.seen)
            .max(self.seen);
        Then {
            cause: decoded.ok(),
            deliveries,
            emitted,
        }
    }

    async fn emitted_after(&self, after: i64) -> Vec<(i64, Envelope)> {
        let rows = sqlx::query("SELECT id, subject, payload FROM outbox WHERE id > $1 ORDER BY id")
            .bind(after)
            .fetch_all(self.db.pool())
            .await
            .expect("read the outbox");
        rows.iter()
            .map(|r| {
                let id: i64 = r.get(0);
                let subject: String = r.get(1);
                let payload: Vec<u8> = r.get(2);
                let env: Envelope = serde_json::from_slice(&payload)
                    .unwrap_or_else(|e| panic!("outbox row {id} is not a CloudEvent: {e}"));
                // Consumers refuse a type that differs from its subject.
                assert_eq!(
                    env.event_type, subject,
                    "outbox row {id}: type and subject differ"
                );
                (id, env)
            })
            .collect()
    }

    async fn last_outbox_id(&self) -> i64 {
        self.scalar::<Option<i64>>("SELECT MAX(id) FROM outbox")
            .await
            .unwrap_or(0)
    }
}

/// Apply `event` as the runner does for one message: inbox record and handler in one
/// transaction, committed only if the handler succeeds. A handler's panic is left to fail the
/// test rather than turned into a dead letter.
async fn apply(db: &Database, subscription: &Subscription, event: &Envelope) -> Outcome {
    let mut tx = db.begin().await.expect("begin");
    let durable = &subscription.spec().durable;
    if !record_once(&mut tx, durable, event)
        .await
        .expect("record in the inbox")
    {
        tx.commit().await.expect("commit");
        return Outcome::Duplicate;
    }
    let (result, effects) = collect(subscription.handle(&mut tx, event)).await;
    match result {
        Ok(()) => {
            tx.commit().await.expect("commit");
            effects.run();
            // As the runner does: a local worker waiting for what the handlers write.
            if let Some(worker) = subscription.woken_worker() {
                worker.wake();
            }
            Outcome::Applied
        }
        Err(e) => {
            tx.rollback().await.expect("rollback");
            match e {
                HandlerError::Permanent(reason) => Outcome::DeadLettered(reason),
                HandlerError::Transient(reason) => Outcome::Retried(reason),
            }
        }
    }
}

/// NATS subject matching: `*` takes one token, a trailing `>` one or more.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for f in filter.split('.') {
        match (f, subject_tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (f, Some(s)) if f == s => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

/// The outcome of one step: how each delivery ended and what was emitted, in order.
#[derive(Debug, Clone)]
pub struct Then {
    cause: Option<Envelope>,
    deliveries: Vec<Delivery>,
    emitted: Vec<(i64, Envelope)>,
}

impl Then {
    /// Each delivery's outcome, in subscription order.
    pub fn deliveries(&self) -> &[Delivery] {
        &self.deliveries
    }

    /// The events emitted, in outbox order.
    pub fn emitted(&self) -> Vec<&Envelope> {
        self.emitted.iter().map(|(_, e)| e).collect()
    }

    /// The event handled (as decoded), if it decoded.
    pub fn cause(&self) -> Option<&Envelope> {
        self.cause.as_ref()
    }

    /// Every delivery applied (or was a duplicate) and exactly these types were emitted, in this
    /// order. `&[]`: applied, nothing announced.
    pub fn then_emits(&self, types: &[&str]) -> &Self {
        self.then_applied();
        let emitted: Vec<&str> = self
            .emitted
            .iter()
            .map(|(_, e)| e.event_type.as_str())
            .collect();
        assert_eq!(emitted, types, "emitted event types");
        self
    }

    /// No delivery failed.
    pub fn then_applied(&self) -> &Self {
        for d in &self.deliveries {
            assert!(
                matches!(d.outcome, Outcome::Applied | Outcome::Duplicate),
                "{} did not apply the event: {:?}",
                d.durable,
                d.outcome
            );
        }
        self
    }

    /// Every durable receiving it refused it for good, with a reason containing `reason`, and
    /// nothing was emitted.
    pub fn then_dead_letters(&self, reason: &str) -> &Self {
        for d in &self.deliveries {
            match &d.outcome {
                Outcome::DeadLettered(r) if r.contains(reason) => {}
                other => panic!(
                    "{} should dead-letter it ({reason:?}), but: {other:?}",
                    d.durable
                ),
            }
        }
        assert!(
            self.emitted.is_empty(),
            "a refused event emitted {:?}",
            self.emitted()
        );
        self
    }

    /// Each delivery was skipped by the inbox except (at most) the first per durable.
    pub fn then_applied_once(&self) -> &Self {
        let mut applied = std::collections::BTreeMap::<&str, usize>::new();
        for d in &self.deliveries {
            if d.outcome == Outcome::Applied {
                *applied.entry(&d.durable).or_default() += 1;
            }
        }
        for (durable, n) in applied {
            assert_eq!(n, 1, "{durable} applied the same event {n} times");
        }
        self
    }

    /// Every emitted event is caused by the handled one (causation = its id) and in its saga
    /// (correlation = its correlation).
    pub fn then_caused_by_it(&self) -> &Self {
        let cause = self
            .cause
            .as_ref()
            .expect("the handled event did not decode");
        for (_, e) in &self.emitted {
            assert_eq!(
                e.causationid.as_deref(),
                Some(cause.id.as_str()),
                "causation of {}",
                e.event_type
            );
            if cause.correlationid.is_some() {
                assert_eq!(
                    e.correlationid, cause.correlationid,
                    "correlation of {}",
                    e.event_type
                );
            }
        }
        self
    }

    /// The payloads of the emitted events of type `P`, in order.
    pub fn then_emitted<P: EventPayload>(&self) -> Vec<P> {
        self.emitted
            .iter()
            .filter(|(_, e)| e.event_type == P::TYPE)
            .map(|(_, e)| {
                e.payload::<P>()
                    .unwrap_or_else(|err| panic!("emitted {}: {err}", P::TYPE))
            })
            .collect()
    }

    /// The one emitted event of type `P`.
    pub fn then_emitted_one<P: EventPayload>(&self) -> P {
        let mut all = self.then_emitted::<P>();
        assert_eq!(all.len(), 1, "{} emitted {} times", P::TYPE, all.len());
        all.remove(0)
    }

    /// The one emitted envelope of type `event_type` (for its id, correlation, causation).
    pub fn then_envelope(&self, event_type: &str) -> &Envelope {
        let found: Vec<&Envelope> = self
            .emitted
            .iter()
            .map(|(_, e)| e)
            .filter(|e| e.event_type == event_type)
            .collect();
        assert_eq!(found.len(), 1, "{event_type} emitted {} times", found.len());
        found[0]
    }
}

#[cfg(test)]
mod tests {
    use super::subject_matches;

    #[test]
    fn subjects_match_like_nats() {
        assert!(subject_matches("orders.placed.*", "orders.placed.v1"));
        assert!(subject_matches("orders.placed.*", "orders.placed.v2"));
        assert!(!subject_matches("orders.placed.*", "orders.placed"));
        assert!(!subject_matches("orders.placed.*", "orders.placed.v1.x"));
        assert!(subject_matches("cmd.orders.>", "cmd.orders.place.v1"));
        assert!(!subject_matches("cmd.orders.>", "cmd.orders"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.c"));
    }
}
