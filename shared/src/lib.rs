//! Event toolkit for services that coordinate through domain events on NATS JetStream.
//!
//! - [`envelope`]: CloudEvents 1.0 envelope; decoding of structured events and of bare JSON bodies
//!   published by hand.
//! - [`config`]: secrets redacted in logs; with feature `service`, settings read by clap.
//! - [`db`]: one code path over SQLite and Postgres.
//! - [`group_commit`]: concurrent write transactions committed together on SQLite ([`Database::write`]).
//! - [`outbox`]: transactional outbox and the relay that publishes it.
//! - [`consumer`]: idempotent, batching consumer with inbox, dead letters and bounded redelivery.
//! - [`subscription`]: durables declared by the payload types they handle, `emit`, wiring as data.
//! - [`nats`]: connecting (server ≥ 2.10) and provisioning streams.
//! - `auth` (feature `service`): admin routes behind a bearer token.
//! - `service` and `http` (feature `service`): the shell of a running service and its HTTP edge.
//! - [`write_behind`]: a transaction's outbox and read-model rows written together before it commits.
//! - [`trace`]: W3C trace context carried by events, so each saga is one trace.
//! - `testing` (feature `testing`): real nats-server / Postgres / SQLite for tests.

#[cfg(feature = "service")]
pub mod auth;
pub mod config;
pub mod consumer;
pub mod db;
pub mod deferred;
#[cfg(feature = "service")]
pub mod edge;
pub mod envelope;
pub mod group_commit;
#[cfg(feature = "service")]
pub mod http;
pub mod ids;
pub mod nats;
#[cfg(feature = "service")]
pub mod observe;
pub mod outbox;
#[cfg(feature = "service")]
pub mod redrive;
#[cfg(feature = "service")]
pub mod retention;
#[cfg(feature = "testing")]
pub mod scenario;
#[cfg(feature = "service")]
pub mod service;
pub mod sqlite;
pub mod subscription;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trace;
pub mod write_behind;

pub use consumer::{ConsumerRunner, ConsumerSpec, Handler, HandlerError};
pub use db::{Backend, Database, DbOptions, SqliteSynchronous};
pub use envelope::{DecodeError, Envelope, EventPayload};
pub use group_commit::Written;
pub use nats::{NatsSettings, StreamSpec};
pub use outbox::{OutboxRelay, OutboxWaker, RelayConfig};
pub use subscription::{emit, Context, Durable, Ignore, On, OnEnvelope, Subscription, Wiring};
