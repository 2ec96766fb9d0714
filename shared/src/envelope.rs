//! CloudEvents 1.0 envelope (structured JSON mode) and decoding of what arrives on the wire.
//!
//! Two shapes arrive on a subject: a structured CloudEvent written by a service's outbox, and a bare
//! JSON body published by a person with `nats pub`. Both decode into the same [`Envelope`], so a
//! handler never cares who sent the event.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The CloudEvents spec version this crate writes and accepts.
pub const SPEC_VERSION: &str = "1.0";
/// Content type of `data`.
pub const JSON_CONTENT_TYPE: &str = "application/json";
/// Content type of a whole structured CloudEvent message.
pub const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json";

/// A typed event payload: it declares the CloudEvents `type` (with its version) and the NATS subject it
/// travels on.
///
/// By convention the subject *is* the type (`orders.placed.v1`), so a bare body published by hand
/// on that subject is typed without any header.
pub trait EventPayload: Serialize + DeserializeOwned {
    /// Versioned CloudEvents type, e.g. `orders.placed.v1`.
    const TYPE: &'static str;
    /// NATS subject the event is published on.
    const SUBJECT: &'static str = Self::TYPE;
    /// The entity this event is about (CloudEvents `subject`), e.g. the order id.
    fn entity_id(&self) -> String;
}

/// Implement [`EventPayload`] for a payload struct whose entity id is a `String` field:
/// `event_payload!(OrderPlaced, "orders.placed.v1", order_id);`
#[macro_export]
macro_rules! event_payload {
    ($payload:ty, $event_type:literal, $id_field:ident) => {
        impl $crate::EventPayload for $payload {
            const TYPE: &'static str = $event_type;
            fn entity_id(&self) -> String {
                self.$id_field.clone()
            }
        }
    };
}

/// A CloudEvents 1.0 event in structured JSON mode, with correlation, causation and trace context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Always `1.0`.
    pub specversion: String,
    /// Unique event id (UUID v7 for events this crate creates); the idempotency key of consumers.
    pub id: String,
    /// Producer of the event, e.g. `/order-service`.
    pub source: String,
    /// Versioned event type, e.g. `orders.placed.v1`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The entity the event is about (the order id in a saga).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// When the event happened.
    pub time: DateTime<Utc>,
    /// Content type of `data`.
    #[serde(default = "default_content_type")]
    pub datacontenttype: String,
    /// The payload.
    #[serde(default)]
    pub data: serde_json::Value,
    /// Extension: the saga (conversation) this event belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlationid: Option<String>,
    /// Extension: the id of the event that caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causationid: Option<String>,
    /// Extension (CloudEvents distributed tracing): W3C `traceparent` of the span that wrote the
    /// event; the span of whoever handles it is its child.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Extension (CloudEvents distributed tracing): W3C `tracestate` going with `traceparent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

fn default_content_type() -> String {
    JSON_CONTENT_TYPE.to_owned()
}

/// Why a message could not be turned into an [`Envelope`] or a typed payload. Never retryable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The body is not JSON at all.
    #[error("body is not JSON: {0}")]
    NotJson(String),
    /// The body is JSON but not a valid structured CloudEvent, nor a JSON object.
    #[error("invalid event envelope: {0}")]
    InvalidEnvelope(String),
    /// The envelope is fine but its `data` does not match the declared type.
    #[error("payload does not match {event_type}: {reason}")]
    InvalidPayload {
        /// The declared type.
        event_type: String,
        /// What serde said.
        reason: String,
    },
    /// The event's type is not one this consumer knows.
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    /// A structured event whose `type` differs from the subject it arrived on. Subject permissions
    /// say who may publish where; a type that disagrees with its subject would bypass them.
    #[error("type does not match subject: type {event_type:?} arrived on {subject:?}")]
    TypeMismatch {
        /// The declared type.
        event_type: String,
        /// The NATS subject.
        subject: String,
    },
}

/// An id or type: 1-200 characters, none of them control characters.
fn valid_token(s: &str) -> bool {
    !s.trim().is_empty() && s.len() <= 200 && !s.chars().any(char::is_control)
}

/// Where a message came from, needed to type and identify a bare body.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// NATS subject the message was published on.
    pub subject: &'a str,
    /// `Nats-Msg-Id` header, if the publisher set one.
    pub msg_id: Option<&'a str>,
    /// Stream that stored the message.
    pub stream: &'a str,
    /// Stream sequence of the message.
    pub stream_sequence: u64,
    /// When the stream stored it.
    pub published: DateTime<Utc>,
}

impl Envelope {
    /// A new event with a fresh UUID v7 id, starting a new correlation (a new saga) whose id is
    /// `correlation_id`. Its trace context is that of the current span (the request or the
    /// handled event's consumer span), when there is one.
    pub fn new<P: EventPayload>(source: &str, payload: &P, correlation_id: Option<String>) -> Self {
        let trace = crate::trace::TraceContext::current();
        let (traceparent, tracestate) = match trace {
            Some(t) => (Some(t.traceparent), t.tracestate),
            None => (None, None),
        };
        Self {
            specversion: SPEC_VERSION.to_owned(),
            id: Uuid::now_v7().to_string(),
            source: source.to_owned(),
            event_type: P::TYPE.to_owned(),
            subject: Some(payload.entity_id()),
            time: Utc::now(),
            datacontenttype: JSON_CONTENT_TYPE.to_owned(),
            // Serializing a plain data struct to a Value cannot fail (no maps with non-string keys).
            data: serde_json::to_value(payload).unwrap_or(serde_json::Value::Null),
            correlationid: correlation_id,
            causationid: None,
            traceparent,
            tracestate,
        }
    }

    /// Decode the `data` into the payload type `P`, checking that the declared type matches.
    pub fn payload<P: EventPayload>(&self) -> Result<P, DecodeError> {
        if self.event_type != P::TYPE {
            return Err(DecodeError::UnknownType(self.event_type.clone()));
        }
        serde_json::from_value(self.data.clone()).map_err(|e| DecodeError::InvalidPayload {
            event_type: self.event_type.clone(),
            reason: e.to_string(),
        })
    }

    /// The JSON bytes of the structured event.
    pub fn to_bytes(&self) -> Vec<u8> {
        // An Envelope holds only strings, a timestamp and a JSON value: serialization cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decode a message body. A JSON object carrying `specversion` must be a valid structured
    /// CloudEvent whose `type` is the subject it arrived on; any other JSON object is a bare payload published by hand: its type is the
    /// subject and its id the `Nats-Msg-Id`, else `<stream>:<sequence>` (stable across redeliveries).
    pub fn decode(body: &[u8], origin: Origin<'_>) -> Result<Self, DecodeError> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let serde_json::Value::Object(map) = value else {
            return Err(DecodeError::InvalidEnvelope(
                "expected a JSON object (a CloudEvent or a bare event payload)".into(),
            ));
        };
        if map.contains_key("specversion") {
            let mut env: Envelope = serde_json::from_value(serde_json::Value::Object(map))
                .map_err(|e| DecodeError::InvalidEnvelope(e.to_string()))?;
            if env.specversion != SPEC_VERSION {
                return Err(DecodeError::InvalidEnvelope(format!(
                    "unsupported specversion {:?}",
                    env.specversion
                )));
            }
            if !valid_token(&env.id) || !valid_token(&env.event_type) {
                return Err(DecodeError::InvalidEnvelope(
                    "id and type must be 1-200 printable characters".into(),
                ));
            }
            if env.event_type != origin.subject {
                return Err(DecodeError::TypeMismatch {
                    event_type: env.event_type,
                    subject: origin.subject.to_owned(),
                });
            }
            // W3C: an invalid trace context is ignored (a new trace starts), never an error. It
            // also goes into NATS headers, so nothing unchecked is kept.
            if !env
                .traceparent
                .as_deref()
                .is_some_and(crate::trace::valid_traceparent)
            {
                env.traceparent = None;
                env.tracestate = None;
            }
            if !env
                .tracestate
                .as_deref()
                .is_some_and(crate::trace::valid_tracestate)
            {
                env.tracestate = None;
            }
            return Ok(env);
        }
        let id = match origin.msg_id {
            Some(id) if valid_token(id) => id.to_owned(),
            _ => format!("{}:{}", origin.stream, origin.stream_sequence),
        };
        Ok(Self {
            specversion: SPEC_VERSION.to_owned(),
            id,
            source: "nats-pub".to_owned(),
            event_type: origin.subject.to_owned(),
            subject: None,
            time: origin.published,
            datacontenttype: JSON_CONTENT_TYPE.to_owned(),
            data: serde_json::Value::Object(map),
            correlationid: None,
            causationid: None,
            traceparent: None,
            tracestate: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Thing {
        thing_id: String,
        n: u32,
    }
    impl EventPayload for Thing {
        const TYPE: &'static str = "things.made.v1";
        fn entity_id(&self) -> String {
            self.thing_id.clone()
        }
    }

    fn origin<'a>(msg_id: Option<&'a str>) -> Origin<'a> {
        Origin {
            subject: "things.made.v1",
            msg_id,
            stream: "THINGS",
            stream_sequence: 42,
            published: Utc::now(),
        }
    }

    #[test]
    fn structured_event_round_trips() {
        let thing = Thing {
            thing_id: "t1".into(),
            n: 3,
        };
        let env = Envelope::new("/test", &thing, Some("saga-1".into()));
        let back = Envelope::decode(&env.to_bytes(), origin(None)).unwrap();
        assert_eq!(back, env);
        assert_eq!(back.payload::<Thing>().unwrap(), thing);
        assert_eq!(back.subject.as_deref(), Some("t1"));
    }

    #[test]
    fn trace_context_is_kept_when_valid_and_dropped_when_not() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut env = Envelope::new(
            "/test",
            &Thing {
                thing_id: "t1".into(),
                n: 3,
            },
            None,
        );
        env.traceparent = Some(tp.into());
        env.tracestate = Some("congo=t61rcWkgMzE".into());
        let back = Envelope::decode(&env.to_bytes(), origin(None)).unwrap();
        assert_eq!(back.traceparent.as_deref(), Some(tp));
        assert_eq!(back.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        // Without a tracing layer, a caused event stays in its cause's trace.
        let next = crate::Context::event("/b", &back).envelope(&Thing {
            thing_id: "t1".into(),
            n: 4,
        });
        assert_eq!(next.traceparent.as_deref(), Some(tp));
        assert_eq!(next.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));

        env.traceparent = Some("00-xyz\r\nNats-Msg-Id: forged".into());
        let back = Envelope::decode(&env.to_bytes(), origin(None)).unwrap();
        assert_eq!((back.traceparent, back.tracestate), (None, None));
        env.traceparent = Some(tp.into());
        env.tracestate = Some("not a tracestate\n".into());
        let back = Envelope::decode(&env.to_bytes(), origin(None)).unwrap();
        assert_eq!(back.traceparent.as_deref(), Some(tp));
        assert_eq!(back.tracestate, None);
    }

    #[test]
    fn bare_body_takes_type_from_subject_and_id_from_msg_id() {
        let env = Envelope::decode(br#"{"thing_id":"x","n":1}"#, origin(Some("m-1"))).unwrap();
        assert_eq!(env.event_type, "things.made.v1");
        assert_eq!(env.id, "m-1");
        assert_eq!(env.payload::<Thing>().unwrap().n, 1);
    }

    #[test]
    fn bare_body_without_msg_id_is_identified_by_stream_sequence() {
        let env = Envelope::decode(br#"{"thing_id":"x","n":1}"#, origin(None)).unwrap();
        assert_eq!(env.id, "THINGS:42");
    }

    #[test]
    fn structured_event_on_another_subject_is_refused() {
        let env = Envelope::new(
            "/test",
            &Thing {
                thing_id: "t1".into(),
                n: 3,
            },
            None,
        );
        let mut elsewhere = origin(None);
        elsewhere.subject = "things.destroyed.v1";
        let err = Envelope::decode(&env.to_bytes(), elsewhere).unwrap_err();
        assert!(matches!(err, DecodeError::TypeMismatch { .. }));
        assert!(err.to_string().starts_with("type does not match subject"));
    }

    #[test]
    fn poison_is_classified() {
        assert!(matches!(
            Envelope::decode(b"not json", origin(None)),
            Err(DecodeError::NotJson(_))
        ));
        assert!(matches!(
            Envelope::decode(b"[1,2]", origin(None)),
            Err(DecodeError::InvalidEnvelope(_))
        ));
        assert!(matches!(
            Envelope::decode(br#"{"specversion":"1.0","id":"x"}"#, origin(None)),
            Err(DecodeError::InvalidEnvelope(_))
        ));
        let wrong_shape = Envelope::decode(br#"{"thing_id":5}"#, origin(None)).unwrap();
        assert!(matches!(
            wrong_shape.payload::<Thing>(),
            Err(DecodeError::InvalidPayload { .. })
        ));
    }
}
