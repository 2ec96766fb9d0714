//! Typed subscriptions, one way to emit, and a service's wiring as data.
//!
//! A durable is declared as the payload types it handles; the filter subjects follow from them:
//!
//! ```ignore
//! Subscription::new("payment-from-orders", "ORDERS")
//!     .on::<OrderCancelled>(saga.clone())
//!     .on::<StockReserved>(saga);
//! ```
//!
//! A handler implements [`On<P>`] for each payload type `P`; whatever it announces goes through
//! [`emit`], which takes the subject from `P`, and source, correlation, causation and trace
//! context from the [`Context`] of the message (or request) being handled.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sqlx::AnyConnection;

use crate::consumer::{ConsumerSpec, Handler, HandlerError};
use crate::envelope::{DecodeError, Envelope, EventPayload};
use crate::nats::StreamSpec;
use crate::outbox::{enqueue, OutboxWaker};

/// Where what a handler emits comes from: the service (`source`) and the message or request
/// being handled (correlation, causation, trace context).
#[derive(Debug, Clone)]
pub struct Context {
    source: Arc<str>,
    correlation: Option<String>,
    causation: Option<String>,
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Context {
    /// Handling `cause` (an event or command that arrived): what is emitted is caused by it, in
    /// its saga and its trace.
    pub fn event(source: impl Into<Arc<str>>, cause: &Envelope) -> Self {
        Self {
            source: source.into(),
            correlation: cause.correlationid.clone(),
            causation: Some(cause.id.clone()),
            traceparent: cause.traceparent.clone(),
            tracestate: cause.tracestate.clone(),
        }
    }

    /// Handling a request that no event caused (an HTTP call, a timer): the trace is the current
    /// span's, the saga is the emitted event's entity unless [`Context::correlated`] says.
    pub fn request(source: impl Into<Arc<str>>) -> Self {
        Self {
            source: source.into(),
            correlation: None,
            causation: None,
            traceparent: None,
            tracestate: None,
        }
    }

    /// Resume work that an earlier event caused, from what was stored when it arrived (a worker
    /// settling later, outside the consumer).
    pub fn resumed(
        source: impl Into<Arc<str>>,
        correlation: Option<String>,
        causation: Option<String>,
        traceparent: Option<String>,
    ) -> Self {
        Self {
            source: source.into(),
            correlation,
            causation,
            traceparent,
            tracestate: None,
        }
    }

    /// Put what is emitted in saga `correlation` (e.g. a new order starts its own saga).
    pub fn correlated(mut self, correlation: impl Into<String>) -> Self {
        self.correlation = Some(correlation.into());
        self
    }

    /// The CloudEvents source of what this service emits.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The id of the event being handled, if an event is.
    pub fn causation(&self) -> Option<&str> {
        self.causation.as_deref()
    }

    /// The trace context to store with work that finishes later (see [`Context::resumed`]): the
    /// current span's, else the cause's.
    pub fn traceparent_to_keep(&self) -> Option<String> {
        crate::trace::TraceContext::current()
            .map(|t| t.traceparent)
            .or_else(|| self.traceparent.clone())
    }

    /// The saga, if known.
    pub fn correlation(&self) -> Option<&str> {
        self.correlation.as_deref()
    }

    /// The envelope [`emit`] writes for `payload`: fresh id, this context's source, correlation
    /// and causation. The trace is the current span's when it continues the cause's trace (the
    /// consumer's span does), else the cause's: a worker's own span must not split the saga's trace.
    pub fn envelope<P: EventPayload>(&self, payload: &P) -> Envelope {
        let mut env = Envelope::new(&self.source, payload, self.correlation.clone());
        env.causationid = self.causation.clone();
        if let Some(stored) = &self.traceparent {
            let continues = env
                .traceparent
                .as_deref()
                .is_some_and(|current| crate::trace::same_trace(current, stored));
            if !continues {
                env.traceparent = Some(stored.clone());
                env.tracestate = self.tracestate.clone();
            }
        }
        if env.correlationid.is_none() {
            env.correlationid = env.subject.clone();
        }
        env
    }
}

/// Announce `payload` in the caller's transaction (the transactional outbox): on `P::SUBJECT`,
/// stamped from `ctx`. Returns the event written.
pub async fn emit<P: EventPayload>(
    conn: &mut AnyConnection,
    ctx: &Context,
    payload: &P,
) -> Result<Envelope, sqlx::Error> {
    let env = ctx.envelope(payload);
    enqueue(conn, P::SUBJECT, &env).await?;
    Ok(env)
}

/// Handles events of payload type `P` inside the consumer's transaction. Return an error to roll
/// this event's effects back: [`HandlerError::Permanent`] dead-letters it, `Transient` retries.
pub trait On<P: EventPayload>: Send + Sync + 'static {
    /// Apply `event`, emitting what it causes with [`emit`] on `conn` and `ctx`.
    fn on(
        &self,
        conn: &mut AnyConnection,
        ctx: &Context,
        event: P,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Handles whole envelopes of the types it is registered for, for read models that keep events
/// as they are (a timeline) rather than act on their payload.
pub trait OnEnvelope: Send + Sync + 'static {
    /// Apply `event`.
    fn on_envelope(
        &self,
        conn: &mut AnyConnection,
        event: &Envelope,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

type Applying<'a> = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>;

/// One registered event type, with its payload type erased.
trait Route: Send + Sync {
    fn apply<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        ctx: Context,
        event: &'a Envelope,
    ) -> Applying<'a>;
}

struct Typed<P, H> {
    handler: H,
    _payload: std::marker::PhantomData<fn() -> P>,
}

impl<P, H> Route for Typed<P, H>
where
    P: EventPayload + Send + 'static,
    H: On<P>,
{
    fn apply<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        ctx: Context,
        event: &'a Envelope,
    ) -> Applying<'a> {
        Box::pin(async move {
            let payload: P = event.payload()?;
            self.handler.on(conn, &ctx, payload).await
        })
    }
}

struct Whole<H>(H);

/// Accepts events and does nothing with them: for a type a durable receives only for what
/// [`Subscription::also`] does with it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ignore;

impl OnEnvelope for Ignore {
    async fn on_envelope(&self, _: &mut AnyConnection, _: &Envelope) -> Result<(), HandlerError> {
        Ok(())
    }
}

impl<H: OnEnvelope> Route for Whole<H> {
    fn apply<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        _ctx: Context,
        event: &'a Envelope,
    ) -> Applying<'a> {
        Box::pin(self.0.on_envelope(conn, event))
    }
}

/// A durable consumer declared by the event types it handles. It is the consumer's [`Handler`]:
/// it dispatches by type and refuses (dead-letters) a type nobody registered — including a newer
/// version of a registered one, which the filter lets in on purpose so it is seen, not ignored.
pub struct Subscription {
    spec: ConsumerSpec,
    source: Arc<str>,
    routes: BTreeMap<&'static str, Box<dyn Route>>,
    widened: Vec<String>,
    also_wake: Option<OutboxWaker>,
    also: Option<Box<dyn Route>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("durable", &self.spec.durable)
            .field("stream", &self.spec.stream)
            .field("event_types", &self.event_types())
            .finish()
    }
}

impl Subscription {
    /// Durable `durable` on `stream`, handling nothing yet.
    pub fn new(durable: &str, stream: &str) -> Self {
        Self {
            spec: ConsumerSpec::new(durable, stream, &[]),
            source: Arc::from(""),
            routes: BTreeMap::new(),
            widened: Vec::new(),
            also_wake: None,
            also: None,
        }
    }

    /// Handle `P` with `handler`.
    ///
    /// # Panics
    /// If `P`'s type is registered twice: a wiring mistake, found when the service is built.
    pub fn on<P: EventPayload + Send + 'static>(self, handler: impl On<P>) -> Self {
        self.route(
            P::TYPE,
            P::SUBJECT,
            Box::new(Typed {
                handler,
                _payload: std::marker::PhantomData::<fn() -> P>,
            }),
        )
    }

    /// Hand whole envelopes of `event_type` (which travels on the subject of the same name) to
    /// `handler`.
    ///
    /// # Panics
    /// If the type is registered twice.
    pub fn on_envelope(self, event_type: &'static str, handler: impl OnEnvelope) -> Self {
        self.route(event_type, event_type, Box::new(Whole(handler)))
    }

    fn route(mut self, event_type: &'static str, subject: &str, route: Box<dyn Route>) -> Self {
        assert!(
            self.routes.insert(event_type, route).is_none(),
            "{} registers {event_type} twice",
            self.spec.durable
        );
        self.spec.event_types.push(event_type.to_owned());
        let filter = version_family(subject);
        let covered = self
            .widened
            .iter()
            .any(|w| w.ends_with('>') && filter.starts_with(w.trim_end_matches('>')));
        if !covered && !self.spec.filter_subjects.contains(&filter) {
            self.spec.filter_subjects.push(filter);
        }
        self
    }

    /// Also hand every event this durable accepts to `handler`, before its own handler and in the
    /// same transaction: a read model kept by the consumer that already applies the event costs no
    /// durable, inbox row or transaction of its own.
    pub fn also(mut self, handler: impl OnEnvelope) -> Self {
        self.also = Some(Box::new(Whole(handler)));
        self
    }

    /// Also receive every other subject under `wildcard` (e.g. `cmd.orders.>`), so whatever
    /// arrives there without a registered type — a mistyped command — is dead-lettered, not left
    /// unread. Filters it covers are folded into it (the server refuses overlapping filters).
    pub fn widen(mut self, wildcard: &str) -> Self {
        let prefix = wildcard.trim_end_matches('>');
        self.spec
            .filter_subjects
            .retain(|f| !(wildcard.ends_with('>') && f.starts_with(prefix)));
        self.spec.filter_subjects.push(wildcard.to_owned());
        self.widened.push(wildcard.to_owned());
        self
    }

    /// Tune the consumer (batch size, concurrency, redelivery); its name, stream and filters stay.
    pub fn tune(mut self, tune: impl FnOnce(&mut ConsumerSpec)) -> Self {
        let (durable, stream, filters, types) = (
            self.spec.durable.clone(),
            self.spec.stream.clone(),
            self.spec.filter_subjects.clone(),
            self.spec.event_types.clone(),
        );
        tune(&mut self.spec);
        self.spec.durable = durable;
        self.spec.stream = stream;
        self.spec.filter_subjects = filters;
        self.spec.event_types = types;
        self
    }

    /// Also wake `worker` after each commit (a local worker waiting for what the handlers write).
    pub fn also_wake(mut self, worker: OutboxWaker) -> Self {
        self.also_wake = Some(worker);
        self
    }

    /// The worker to wake after each commit, if any.
    pub fn woken_worker(&self) -> Option<OutboxWaker> {
        self.also_wake.clone()
    }

    /// Stamp what the handlers emit with `source` (the service's CloudEvents source).
    pub fn with_source(mut self, source: &str) -> Self {
        self.source = Arc::from(source);
        self
    }

    /// The consumer this subscription runs.
    pub fn spec(&self) -> &ConsumerSpec {
        &self.spec
    }

    /// The event types it handles, sorted.
    pub fn event_types(&self) -> Vec<&'static str> {
        self.routes.keys().copied().collect()
    }

    /// What it is, as data.
    pub fn durable(&self) -> Durable {
        Durable {
            name: self.spec.durable.clone(),
            stream: self.spec.stream.clone(),
            event_types: self.event_types(),
            filter_subjects: self.spec.filter_subjects.clone(),
        }
    }
}

impl Handler for Subscription {
    async fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        let Some(route) = self.routes.get(event.event_type.as_str()) else {
            return Err(DecodeError::UnknownType(event.event_type.clone()).into());
        };
        if let Some(also) = &self.also {
            also.apply(conn, Context::request(""), event).await?;
        }
        route
            .apply(conn, Context::event(self.source.clone(), event), event)
            .await
    }
}

/// `orders.placed.v1` → `orders.placed.*`: every version of a type reaches its consumer, so one it
/// does not know is dead-lettered where an operator sees it instead of sitting unread in the stream.
/// A subject without a trailing `v<N>` token is kept as is.
pub fn version_family(subject: &str) -> String {
    match subject.rsplit_once('.') {
        Some((family, last))
            if last.len() > 1
                && last.starts_with('v')
                && last[1..].chars().all(|c| c.is_ascii_digit()) =>
        {
            format!("{family}.*")
        }
        _ => subject.to_owned(),
    }
}

/// One durable consumer, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durable {
    /// Durable name.
    pub name: String,
    /// Stream it reads.
    pub stream: String,
    /// Event types it handles.
    pub event_types: Vec<&'static str>,
    /// Its filter subjects (every version of each type).
    pub filter_subjects: Vec<String>,
}

/// How a service is wired to NATS: what it owns, reads and announces. Tests, the invariant
/// checker and documentation checks read this instead of repeating it.
#[derive(Debug, Clone)]
pub struct Wiring {
    /// Service name (also its CloudEvents source, `/<name>`).
    pub service: &'static str,
    /// Its NATS user.
    pub nats_user: &'static str,
    /// Streams it provisions and is the only publisher to.
    pub streams: Vec<StreamSpec>,
    /// Its durable consumers.
    pub durables: Vec<Durable>,
    /// Event types it announces (through its outbox).
    pub publishes: Vec<&'static str>,
}

impl Wiring {
    /// The wiring of a service from its streams, subscriptions and announced types.
    pub fn new(
        service: &'static str,
        nats_user: &'static str,
        streams: Vec<StreamSpec>,
        subscriptions: &[Subscription],
        publishes: &[&'static str],
    ) -> Self {
        Self {
            service,
            nats_user,
            streams,
            durables: subscriptions.iter().map(Subscription::durable).collect(),
            publishes: publishes.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Thing {
        thing_id: String,
    }
    crate::event_payload!(Thing, "things.made.v1", thing_id);

    #[test]
    fn a_versioned_subject_widens_to_every_version() {
        assert_eq!(version_family("orders.placed.v1"), "orders.placed.*");
        assert_eq!(version_family("orders.placed.v12"), "orders.placed.*");
        assert_eq!(version_family("cmd.orders.place"), "cmd.orders.place");
        assert_eq!(version_family("orders.v"), "orders.v");
        assert_eq!(version_family("single"), "single");
    }

    #[test]
    fn an_event_caused_by_another_carries_its_saga_and_trace() {
        let mut cause = Envelope::new(
            "/a",
            &Thing {
                thing_id: "t1".into(),
            },
            Some("saga-1".into()),
        );
        cause.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        let ctx = Context::event("/b", &cause);
        let e = ctx.envelope(&Thing {
            thing_id: "t2".into(),
        });
        assert_eq!(e.source, "/b");
        assert_eq!(e.event_type, "things.made.v1");
        assert_eq!(e.correlationid.as_deref(), Some("saga-1"));
        assert_eq!(e.causationid.as_deref(), Some(cause.id.as_str()));
        assert_eq!(e.traceparent, cause.traceparent);
        assert_ne!(e.id, cause.id);
    }

    #[test]
    fn a_request_correlates_by_the_entity_unless_told() {
        let t = Thing {
            thing_id: "t9".into(),
        };
        let e = Context::request("/a").envelope(&t);
        assert_eq!(e.correlationid.as_deref(), Some("t9"));
        assert_eq!(e.causationid, None);
        let e = Context::request("/a").correlated("saga-9").envelope(&t);
        assert_eq!(e.correlationid.as_deref(), Some("saga-9"));
    }

    #[derive(Clone)]
    struct Nop;
    impl On<Thing> for Nop {
        async fn on(
            &self,
            _: &mut AnyConnection,
            _: &Context,
            _: Thing,
        ) -> Result<(), HandlerError> {
            Ok(())
        }
    }

    #[test]
    fn filters_and_types_follow_the_registered_payloads() {
        let s = Subscription::new("d", "THINGS").on::<Thing>(Nop);
        let d = s.durable();
        assert_eq!(d.event_types, vec!["things.made.v1"]);
        assert_eq!(d.filter_subjects, vec!["things.made.*".to_owned()]);
    }

    #[test]
    fn a_widened_subscription_folds_the_filters_it_covers() {
        let s = Subscription::new("d", "THINGS")
            .on::<Thing>(Nop)
            .widen("things.>");
        assert_eq!(s.spec().filter_subjects, vec!["things.>".to_owned()]);
        assert_eq!(s.event_types(), vec!["things.made.v1"]);
    }

    #[test]
    #[should_panic(expected = "registers things.made.v1 twice")]
    fn a_type_registered_twice_is_a_wiring_error() {
        let _ = Subscription::new("d", "THINGS")
            .on::<Thing>(Nop)
            .on::<Thing>(Nop);
    }
}
