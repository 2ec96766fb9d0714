//! Dead-letter redrive: an operator re-applies a dead-lettered message through its consumer's
//! handler once the cause is fixed (a later deploy, a missing record created), or discards it.
//!
//! The message is decoded from what was stored — the body, the subject, the `Nats-Msg-Id` header,
//! the stream and sequence — so it keeps its original event id: if it had in fact been applied
//! (or is redriven twice) the inbox still says "duplicate". Both decisions are recorded on the
//! row (`resolution`, `resolved_at_us`), which stays for the record.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use sqlx::{AnyConnection, Row};

use crate::consumer::{record_once, Handler, HandlerError};
use crate::db::{micros_to_datetime, now_micros, Database};
use crate::envelope::{Envelope, Origin};
use crate::http::{ApiPath, Problem};
use crate::outbox::OutboxWaker;

type Applying<'a> = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>;

/// A consumer's handler, type-erased so the HTTP edge can hold one per durable.
trait Replay: Send + Sync {
    fn replay<'a>(&'a self, conn: &'a mut AnyConnection, event: &'a Envelope) -> Applying<'a>;
}

impl<H: Handler> Replay for H {
    fn replay<'a>(&'a self, conn: &'a mut AnyConnection, event: &'a Envelope) -> Applying<'a> {
        Box::pin(self.handle(conn, event))
    }
}

struct Registered {
    handler: Arc<dyn Replay>,
    /// Woken after a redrive commits (the relay, and workers waiting for what handlers write).
    wakers: Vec<OutboxWaker>,
}

/// The handlers of a service's durables, by durable name, and the database they write to.
#[derive(Clone)]
pub struct Redrive {
    db: Database,
    handlers: Arc<RwLock<HashMap<String, Registered>>>,
}

impl std::fmt::Debug for Redrive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .handlers
            .read()
            .map(|h| h.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("Redrive").field("durables", &names).finish()
    }
}

/// What a redrive did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Redriven {
    /// The handler applied it now.
    Applied,
    /// The inbox had it already: nothing applied twice.
    Duplicate,
}

/// Why a redrive or discard did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    /// No such dead letter.
    #[error("no dead letter {0}")]
    NotFound(i64),
    /// Redriven or discarded before.
    #[error("dead letter {0} was already {1}")]
    Resolved(i64, String),
    /// Its consumer is not one of this service's.
    #[error("dead letter {0} belongs to consumer {1:?}, which this service does not run")]
    UnknownConsumer(i64, String),
    /// It still cannot be applied; it stays a dead letter.
    #[error("still cannot be applied: {0}")]
    StillFailing(String),
    /// Might work later (database busy).
    #[error("transient: {0}")]
    Transient(String),
}

impl From<sqlx::Error> for RedriveError {
    fn from(e: sqlx::Error) -> Self {
        RedriveError::Transient(e.to_string())
    }
}

impl From<RedriveError> for Problem {
    fn from(e: RedriveError) -> Self {
        match &e {
            RedriveError::NotFound(_) => Problem::not_found(e.to_string()),
            RedriveError::Resolved(..) => Problem::conflict(e.to_string()),
            RedriveError::UnknownConsumer(..) | RedriveError::StillFailing(_) => {
                Problem::unprocessable(e.to_string())
            }
            RedriveError::Transient(_) => Problem::unavailable(&e),
        }
    }
}

impl Redrive {
    /// An empty registry over `db`.
    pub fn new(db: Database) -> Self {
        Self {
            db,
            handlers: Arc::default(),
        }
    }

    /// Register the handler of `durable`.
    pub fn register<H: Handler>(&self, durable: &str, handler: Arc<H>, wakers: Vec<OutboxWaker>) {
        if let Ok(mut map) = self.handlers.write() {
            map.insert(durable.to_owned(), Registered { handler, wakers });
        }
    }

    /// Re-apply dead letter `id` through its consumer's handler, with its original id.
    pub async fn retry(&self, id: i64) -> Result<Redriven, RedriveError> {
        let row = sqlx::query(
            "SELECT consumer, stream, stream_sequence, subject, headers, payload, created_at_us, \
             resolution FROM dead_letters WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(self.db.pool())
        .await?
        .ok_or(RedriveError::NotFound(id))?;
        let consumer: String = row.try_get(0)?;
        let stream: String = row.try_get(1)?;
        let sequence: i64 = row.try_get(2)?;
        let subject: String = row.try_get(3)?;
        let headers: String = row.try_get(4)?;
        let payload: Vec<u8> = row.try_get(5)?;
        let created: i64 = row.try_get(6)?;
        if let Some(done) = row.try_get::<Option<String>, _>(7)? {
            return Err(RedriveError::Resolved(id, done));
        }
        let (handler, wakers) = {
            let map = self
                .handlers
                .read()
                .map_err(|_| RedriveError::Transient("registry poisoned".into()))?;
            let r = map
                .get(&consumer)
                .ok_or_else(|| RedriveError::UnknownConsumer(id, consumer.clone()))?;
            (r.handler.clone(), r.wakers.clone())
        };
        let msg_id = msg_id_of(&headers);
        let origin = Origin {
            subject: &subject,
            msg_id: msg_id.as_deref(),
            stream: &stream,
            stream_sequence: sequence as u64,
            published: micros_to_datetime(created),
        };
        let event = Envelope::decode(&payload, origin)
            .map_err(|e| RedriveError::StillFailing(e.to_string()))?;
        let mut tx = self.db.begin().await?;
        let outcome = if record_once(&mut tx, &consumer, &event).await? {
            let (applied, effects) =
                crate::deferred::collect(handler.replay(&mut tx, &event)).await;
            match applied {
                Ok(()) => {
                    resolve(&mut tx, id, "redriven").await?;
                    tx.commit().await?;
                    effects.run();
                    Redriven::Applied
                }
                Err(HandlerError::Permanent(reason)) => {
                    return Err(RedriveError::StillFailing(reason));
                }
                Err(HandlerError::Transient(reason)) => {
                    return Err(RedriveError::Transient(reason));
                }
            }
        } else {
            resolve(&mut tx, id, "duplicate").await?;
            tx.commit().await?;
            Redriven::Duplicate
        };
        for w in &wakers {
            w.wake();
        }
        tracing::info!(dead_letter = id, %consumer, event_id = %event.id, ?outcome, "dead letter redriven by an operator");
        Ok(outcome)
    }

    /// Discard dead letter `id`: it stays on record as discarded and is never redriven.
    pub async fn discard(&self, id: i64) -> Result<(), RedriveError> {
        let mut tx = self.db.begin().await?;
        let row = sqlx::query("SELECT resolution FROM dead_letters WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(RedriveError::NotFound(id))?;
        if let Some(done) = row.try_get::<Option<String>, _>(0)? {
            return Err(RedriveError::Resolved(id, done));
        }
        resolve(&mut tx, id, "discarded").await?;
        tx.commit().await?;
        tracing::info!(dead_letter = id, "dead letter discarded by an operator");
        Ok(())
    }
}

async fn resolve(conn: &mut AnyConnection, id: i64, how: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE dead_letters SET resolution = $1, resolved_at_us = $2 WHERE id = $3 \
         AND resolution IS NULL",
    )
    .bind(how)
    .bind(now_micros())
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

/// The `Nats-Msg-Id` from the stored headers (`{"name": ["value", ...]}`).
fn msg_id_of(headers: &str) -> Option<String> {
    let map: HashMap<String, Vec<String>> = serde_json::from_str(headers).ok()?;
    map.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("Nats-Msg-Id"))
        .and_then(|(_, v)| v.first().cloned())
}

/// `POST /admin/dead-letters/{id}/retry` and `DELETE /admin/dead-letters/{id}` (behind the admin
/// token, added by the caller).
pub fn routes(redrive: Redrive) -> Router {
    Router::new()
        .route("/admin/dead-letters/{id}/retry", post(retry))
        .route("/admin/dead-letters/{id}", axum::routing::delete(discard))
        .with_state(redrive)
}

fn parse_id(id: &str) -> Result<i64, Problem> {
    id.parse()
        .map_err(|_| Problem::not_found(format!("no dead letter {id:?}")))
}

async fn retry(
    State(r): State<Redrive>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, Problem> {
    let outcome = r.retry(parse_id(&id)?).await?;
    Ok(Json(serde_json::json!({ "id": id, "outcome": outcome })))
}

async fn discard(
    State(r): State<Redrive>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, Problem> {
    r.discard(parse_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_original_msg_id_is_found_in_stored_headers() {
        assert_eq!(
            msg_id_of(r#"{"Nats-Msg-Id":["m-1"],"Saga-Test":["x"]}"#).as_deref(),
            Some("m-1")
        );
        assert_eq!(
            msg_id_of(r#"{"nats-msg-id":["m-2"]}"#).as_deref(),
            Some("m-2")
        );
        assert_eq!(msg_id_of("{}"), None);
        assert_eq!(msg_id_of("not json"), None);
    }
}
