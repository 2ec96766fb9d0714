//! Each order's saga as one timeline: every event of the saga from all three services, with its
//! cause and how long the step took, served by `GET /orders/{id}/timeline`.
//!
//! A read model of the order service's own, kept in the transactions that already exist: the
//! order's own events are recorded where they are written to the outbox ([`record_own`]), and the
//! durables on INVENTORY and PAYMENTS hand every event they accept to [`Projection`] before
//! applying it — so the timeline costs no durable, inbox row or transaction of its own, and
//! answering reads one indexed table, never the streams.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use event_toolkit::db::micros_to_datetime;
use event_toolkit::http::{ApiPath, Problem, PROBLEM_JSON};
use event_toolkit::write_behind::{self, Shape};
use event_toolkit::{DecodeError, Envelope, HandlerError, OnEnvelope};
use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, AnyPool, Row};
use uuid::Uuid;

use crate::domain::{CancelReason, OrderStatus};
use crate::routes::AppState;
use crate::store;

/// The event types a saga is made of; the projection's durables receive exactly these.
pub const SAGA_EVENT_TYPES: [&str; 10] = [
    "orders.placed.v1",
    "orders.confirmed.v1",
    "orders.cancelled.v1",
    "inventory.reserved.v1",
    "inventory.rejected.v1",
    "inventory.released.v1",
    "inventory.committed.v1",
    "payments.succeeded.v1",
    "payments.failed.v1",
    "payments.refunded.v1",
];

/// Appends each saga event it is given to its order's timeline.
#[derive(Debug, Clone, Default)]
pub struct Projection;

impl OnEnvelope for Projection {
    async fn on_envelope(
        &self,
        conn: &mut AnyConnection,
        event: &Envelope,
    ) -> Result<(), HandlerError> {
        Recorded::of(event)?.insert(conn).await?;
        Ok(())
    }
}

/// Record an event this service itself announces, in the transaction that writes it to the outbox.
pub async fn record_own(conn: &mut AnyConnection, event: &Envelope) -> Result<(), sqlx::Error> {
    match Recorded::of(event) {
        Ok(step) => step.insert(conn).await,
        // Only saga events with a UUID order id have a timeline; nothing else is shown.
        Err(_) => Ok(()),
    }
}

/// A timeline row.
const TIMELINE_ROW: Shape = Shape {
    head: "INSERT INTO timeline_events (order_id, event_id, event_type, source, time_us, \
           causation_id, summary)",
    columns: 7,
    // Inboxes make this once per event; the key keeps it so regardless.
    tail: " ON CONFLICT (order_id, event_id) DO NOTHING",
};

impl Recorded {
    /// Written with the consumer batch's other rows when there is one (see `write_behind`).
    async fn insert(self, conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
        let step = self;
        let row = vec![
            step.order_id.into(),
            step.event_id.into(),
            step.event_type.into(),
            step.source.into(),
            step.time_us.into(),
            step.causation_id.into(),
            step.summary.into(),
        ];
        write_behind::insert(conn, TIMELINE_ROW, row).await
    }
}

/// The fields of any saga event that a timeline shows; the rest is ignored.
#[derive(Debug, Deserialize)]
struct SagaData {
    order_id: String,
    #[serde(default)]
    customer_id: Option<String>,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    total_minor: Option<i64>,
    #[serde(default)]
    amount_minor: Option<i64>,
    #[serde(default)]
    items: Option<Vec<Units>>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    sku: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Units {
    sku: String,
    quantity: i64,
}

/// One row of the read model.
#[derive(Debug, Clone, PartialEq)]
struct Recorded {
    order_id: String,
    event_id: String,
    event_type: String,
    source: String,
    time_us: i64,
    causation_id: Option<String>,
    summary: Option<String>,
}

impl Recorded {
    /// Read a saga event. Not one of the saga's types, a payload without a string `order_id`, or
    /// an `order_id` that is no UUID (no timeline could ever show it) is permanent: dead-lettered.
    fn of(event: &Envelope) -> Result<Self, HandlerError> {
        let event_type = event.event_type.as_str();
        if !SAGA_EVENT_TYPES.contains(&event_type) {
            return Err(DecodeError::UnknownType(event_type.to_owned()).into());
        }
        let data: SagaData = serde_json::from_value(event.data.clone()).map_err(|e| {
            DecodeError::InvalidPayload {
                event_type: event_type.to_owned(),
                reason: e.to_string(),
            }
        })?;
        let order_id = Uuid::parse_str(&data.order_id)
            .map_err(|_| DecodeError::InvalidPayload {
                event_type: event_type.to_owned(),
                reason: format!("order_id {:?} is not a UUID", clean(&data.order_id, 64)),
            })?
            .to_string();
        Ok(Self {
            order_id,
            event_id: clean(&event.id, 200),
            event_type: event_type.to_owned(),
            source: clean(&event.source, 200),
            time_us: event.time.timestamp_micros(),
            causation_id: event.causationid.as_deref().map(|c| clean(c, 200)),
            summary: summary(event_type, &data).map(|s| clean(&s, 500)),
        })
    }
}

/// What a person wants to read about a step, if more than its type.
fn summary(event_type: &str, d: &SagaData) -> Option<String> {
    let items = || {
        d.items.as_ref().map(|lines| {
            lines
                .iter()
                .map(|l| format!("{}×{}", l.sku, l.quantity))
                .collect::<Vec<_>>()
                .join(", ")
        })
    };
    let amount = |minor: Option<i64>| Some(money(minor?, d.currency.as_deref()?));
    let text = match event_type {
        "orders.placed.v1" => {
            let mut s = format!("{} orders", d.customer_id.as_deref().unwrap_or("?"));
            if let Some(items) = items() {
                s.push(' ');
                s.push_str(&items);
            }
            if let Some(total) = amount(d.total_minor) {
                s.push_str(" for ");
                s.push_str(&total);
            }
            Some(s)
        }
        "inventory.reserved.v1" | "inventory.released.v1" | "inventory.committed.v1" => items(),
        "inventory.rejected.v1" => d.reason.as_ref().map(|r| match &d.sku {
            Some(sku) => format!("{r} ({sku})"),
            None => r.clone(),
        }),
        "payments.succeeded.v1" | "payments.refunded.v1" => amount(d.amount_minor),
        "payments.failed.v1" | "orders.cancelled.v1" => d.reason.clone(),
        _ => None,
    };
    text.filter(|t| !t.is_empty())
}

/// Minor units as money: `2500` EUR is `25.00 EUR`, `2500` JPY is `2500 JPY`.
pub fn money(minor: i64, currency: &str) -> String {
    let digits = minor_unit_digits(currency);
    if digits == 0 {
        return format!("{minor} {currency}");
    }
    let scale = 10u64.pow(digits);
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    format!(
        "{sign}{}.{:0width$} {currency}",
        abs / scale,
        abs % scale,
        width = digits as usize
    )
}

/// Decimal places of a currency's minor unit (ISO 4217); two unless listed.
fn minor_unit_digits(currency: &str) -> u32 {
    match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        _ => 2,
    }
}

/// Text safe to store and show: control characters (Postgres refuses NUL) become `?`, and at most
/// `max` characters are kept.
fn clean(text: &str, max: usize) -> String {
    text.chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

// ---- reading ----

/// An order's saga, step by step.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Timeline {
    /// The order (and saga) id.
    pub order_id: String,
    /// The order's status now; `null` when this service has no such order (events naming it
    /// arrived anyway).
    pub status: Option<OrderStatus>,
    /// Why it was cancelled, when it was.
    pub reason: Option<CancelReason>,
    /// Every event of the saga, causes before their effects.
    pub events: Vec<TimelineEvent>,
}

/// One event of a saga.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TimelineEvent {
    /// Versioned event type, e.g. `inventory.reserved.v1`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The producing service (CloudEvents `source`, e.g. `/inventory-service`).
    pub source: String,
    /// When it happened, by its producer's clock.
    pub time: DateTime<Utc>,
    /// Event id.
    pub id: String,
    /// The event that caused it, if any.
    pub causation_id: Option<String>,
    /// Milliseconds since its cause, or, without a cause in this timeline, since the previous
    /// step; `null` for the first step.
    pub latency_ms: Option<f64>,
    /// What happened, for people (money in major units: `25.00 EUR`).
    pub summary: Option<String>,
}

async fn load(pool: &AnyPool, order_id: &str) -> Result<Vec<Recorded>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT event_id, event_type, source, time_us, causation_id, summary \
         FROM timeline_events WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Recorded {
                order_id: order_id.to_owned(),
                event_id: r.try_get(0)?,
                event_type: r.try_get(1)?,
                source: r.try_get(2)?,
                time_us: r.try_get(3)?,
                causation_id: r.try_get(4)?,
                summary: r.try_get(5)?,
            })
        })
        .collect()
}

/// Causes before their effects; otherwise (siblings, unrelated roots such as a customer's
/// cancellation) by time, then id. Clocks of different hosts may disagree: the causal links win.
fn causal_order(mut steps: Vec<Recorded>) -> Vec<TimelineEvent> {
    steps.sort_by(|a, b| (a.time_us, &a.event_id).cmp(&(b.time_us, &b.event_id)));
    let index: HashMap<&str, usize> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.event_id.as_str(), i))
        .collect();
    let cause_of: Vec<Option<usize>> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let c = *index.get(s.causation_id.as_deref()?)?;
            (c != i).then_some(c)
        })
        .collect();
    let mut effects: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (i, c) in cause_of.iter().enumerate() {
        if let Some(c) = c {
            effects[*c].push(i);
        }
    }
    // Position in `steps` is already (time, id) order, so the smallest ready index is the earliest.
    let mut ready: BinaryHeap<Reverse<usize>> = (0..steps.len())
        .filter(|i| cause_of[*i].is_none())
        .map(Reverse)
        .collect();
    let mut placed = vec![false; steps.len()];
    let mut order = Vec::with_capacity(steps.len());
    loop {
        while let Some(Reverse(i)) = ready.pop() {
            if placed[i] {
                continue;
            }
            placed[i] = true;
            order.push(i);
            ready.extend(effects[i].iter().copied().map(Reverse));
        }
        // Events whose causes form a loop (only forged ones can): after the rest, by time.
        match (0..steps.len()).find(|i| !placed[*i]) {
            Some(i) => ready.push(Reverse(i)),
            None => break,
        }
    }
    let mut at: Vec<Option<usize>> = vec![None; steps.len()];
    for (pos, i) in order.iter().enumerate() {
        at[*i] = Some(pos);
    }
    let mut out = Vec::with_capacity(order.len());
    for (pos, &i) in order.iter().enumerate() {
        let since = match cause_of[i] {
            Some(c) if at[c].is_some_and(|p| p < pos) => Some(steps[c].time_us),
            _ => pos.checked_sub(1).map(|p| steps[order[p]].time_us),
        };
        let s = &steps[i];
        out.push(TimelineEvent {
            event_type: s.event_type.clone(),
            source: s.source.clone(),
            time: micros_to_datetime(s.time_us),
            id: s.event_id.clone(),
            causation_id: s.causation_id.clone(),
            latency_ms: since.map(|t| (s.time_us - t) as f64 / 1000.0),
            summary: s.summary.clone(),
        });
    }
    out
}

/// The saga of one order, every service's events in causal order.
#[utoipa::path(get, path = "/orders/{id}/timeline",
    params(("id" = String, Path, description = "Order id (UUID)")),
    responses(
        (status = 200, description = "The saga's events so far, causes first", body = Timeline),
        (status = 404, description = "No such order, and no event names it", body = Problem, content_type = PROBLEM_JSON),
    ))]
pub async fn get_timeline(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Timeline>, Problem> {
    let not_found = || Problem::not_found(format!("no order {id:?}"));
    let order_id = Uuid::parse_str(&id).map_err(|_| not_found())?.to_string();
    let pool = state.db.pool();
    let (order, steps) = tokio::try_join!(store::get(pool, &order_id), load(pool, &order_id))?;
    if order.is_none() && steps.is_empty() {
        return Err(not_found());
    }
    Ok(Json(Timeline {
        status: order.as_ref().map(|o| o.status),
        reason: order.as_ref().and_then(|o| o.reason),
        order_id,
        events: causal_order(steps),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(id: &str, time_us: i64, cause: Option<&str>) -> Recorded {
        Recorded {
            order_id: "o".into(),
            event_id: id.into(),
            event_type: format!("t.{id}"),
            source: "/s".into(),
            time_us,
            causation_id: cause.map(str::to_owned),
            summary: None,
        }
    }

    fn ids(events: &[TimelineEvent]) -> Vec<&str> {
        events.iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn money_is_shown_in_major_units() {
        assert_eq!(money(2500, "EUR"), "25.00 EUR");
        assert_eq!(money(5, "EUR"), "0.05 EUR");
        assert_eq!(money(-1999, "USD"), "-19.99 USD");
        assert_eq!(money(2500, "JPY"), "2500 JPY");
        assert_eq!(money(1234, "KWD"), "1.234 KWD");
    }

    #[test]
    fn causes_come_first_even_against_the_clock() {
        // b was caused by a but stamped earlier (clock skew between hosts).
        let events = causal_order(vec![
            step("c", 30, Some("b")),
            step("b", 5, Some("a")),
            step("a", 10, Some("command")),
        ]);
        assert_eq!(ids(&events), ["a", "b", "c"]);
        assert_eq!(events[0].latency_ms, None);
        assert_eq!(events[1].latency_ms, Some(-0.005));
        assert_eq!(events[2].latency_ms, Some(0.025));
    }

    #[test]
    fn siblings_and_uncaused_steps_go_by_time_with_latency_since_the_previous_step() {
        let events = causal_order(vec![
            step("placed", 0, None),
            step("reserved", 1_000, Some("placed")),
            step("succeeded", 3_000, Some("reserved")),
            step("cancelled", 4_000, None),
            step("refunded", 9_000, Some("cancelled")),
            step("released", 6_000, Some("cancelled")),
        ]);
        assert_eq!(
            ids(&events),
            [
                "placed",
                "reserved",
                "succeeded",
                "cancelled",
                "released",
                "refunded"
            ]
        );
        let latencies: Vec<Option<f64>> = events.iter().map(|e| e.latency_ms).collect();
        assert_eq!(
            latencies,
            [None, Some(1.0), Some(2.0), Some(1.0), Some(2.0), Some(5.0)]
        );
    }

    #[test]
    fn a_loop_of_causes_still_shows_every_step() {
        let events = causal_order(vec![step("x", 2, Some("y")), step("y", 1, Some("x"))]);
        assert_eq!(ids(&events), ["y", "x"]);
    }

    #[test]
    fn poison_is_refused_and_saga_events_are_summarized() {
        let origin = event_toolkit::envelope::Origin {
            subject: "payments.refunded.v1",
            msg_id: None,
            stream: "PAYMENTS",
            stream_sequence: 7,
            published: Utc::now(),
        };
        let bad = Envelope::decode(br#"{"order_id": 12345, "items": "none"}"#, origin).unwrap();
        assert!(matches!(
            Recorded::of(&bad),
            Err(HandlerError::Permanent(_))
        ));
        let not_uuid = Envelope::decode(br#"{"order_id": "42"}"#, origin).unwrap();
        assert!(matches!(
            Recorded::of(&not_uuid),
            Err(HandlerError::Permanent(_))
        ));
        let id = Uuid::now_v7().to_string();
        let body = serde_json::json!({"order_id": id, "payment_id": "p", "amount_minor": 2500, "currency": "EUR"});
        let ok = Envelope::decode(body.to_string().as_bytes(), origin).unwrap();
        let r = Recorded::of(&ok).unwrap();
        assert_eq!(
            (r.order_id.as_str(), r.event_id.as_str()),
            (id.as_str(), "PAYMENTS:7")
        );
        assert_eq!(r.summary.as_deref(), Some("25.00 EUR"));
    }
}
