//! `GET /orders/{id}/timeline`: every event of a saga from the three services, causes first, with
//! latencies and summaries, served from the order service's own read model — on the happy path,
//! through each compensation and a refund, fast, and 404 for an order nobody knows.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use event_toolkit::Backend;
use saga_e2e::invariants::{check, wait_quiet};
use saga_e2e::{Service, System, SystemConfig, WAIT};
use serde_json::{json, Value};

use event_toolkit::on_both_backends as on_backends;

on_backends!(
    happy_path_in_causal_order_answered_fast_and_404_for_unknown_orders,
    compensations_show_the_rejection_or_the_failure_and_what_it_undid,
    a_cancel_after_the_capture_shows_the_refund,
);

/// What the endpoint must answer within, per call (median of several).
const ANSWER_WITHIN: Duration = Duration::from_millis(50);

async fn system(backend: Backend) -> System {
    let s = System::start(SystemConfig::new(backend)).await;
    s.set_stock("WIDGET", 10).await;
    s.set_stock("GADGET", 2).await;
    s.set_balance("alice", 10_000).await;
    s.set_balance("bob", 100).await;
    s
}

/// The timeline once its order is terminal and it holds each of `types`. All of them: the three
/// streams are read by three durables that catch up independently, so an effect may be in the
/// timeline a moment before its cause.
async fn wait_timeline(s: &System, id: &str, types: &[&str]) -> Value {
    let path = format!("/orders/{id}/timeline");
    saga_e2e::wait_for(
        WAIT,
        &format!("the timeline of {id} to hold {types:?}"),
        || async {
            let t = s.try_get_json(Service::Order, &path).await?;
            let terminal = matches!(t["status"].as_str(), Some("CONFIRMED" | "CANCELLED"));
            let have = type_list(&t);
            (terminal && types.iter().all(|ty| have.contains(ty))).then_some(t)
        },
    )
    .await
}

fn events(t: &Value) -> &[Value] {
    t["events"].as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn type_list(t: &Value) -> Vec<&str> {
    events(t)
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect()
}

fn find<'a>(t: &'a Value, ty: &str) -> &'a Value {
    events(t)
        .iter()
        .find(|e| e["type"] == ty)
        .unwrap_or_else(|| panic!("no {ty} in {t:#}"))
}

fn time(e: &Value) -> DateTime<Utc> {
    e["time"]
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .unwrap_or_else(|| panic!("no RFC 3339 time in {e}"))
        .with_timezone(&Utc)
}

/// Each event's causes come before it, and its latency is the time since its cause (or, without
/// one in the timeline, since the previous step); the first step has none.
fn assert_causal_with_latencies(t: &Value) {
    let evs = events(t);
    assert!(!evs.is_empty(), "{t:#}");
    assert!(evs[0]["latency_ms"].is_null(), "{t:#}");
    for (k, e) in evs.iter().enumerate().skip(1) {
        let cause = evs[..k]
            .iter()
            .find(|c| e["causation_id"].is_string() && c["id"] == e["causation_id"]);
        assert!(
            evs[k..]
                .iter()
                .all(|later| later["id"] != e["causation_id"]),
            "{} comes before its cause: {t:#}",
            e["type"]
        );
        let since = time(cause.unwrap_or(&evs[k - 1]));
        let want = (time(e) - since).num_microseconds().expect("µs") as f64 / 1000.0;
        let got = e["latency_ms"].as_f64().unwrap_or(f64::NAN);
        assert!(
            (got - want).abs() < 0.0015,
            "{}: latency_ms {got}, expected {want}: {t:#}",
            e["type"]
        );
    }
}

async fn happy_path_in_causal_order_answered_fast_and_404_for_unknown_orders(b: Backend) {
    let s = system(b).await;
    let id = s.place_order("alice", &[("WIDGET", 2, 1250)]).await;
    let t = wait_timeline(
        &s,
        &id,
        &[
            "orders.placed.v1",
            "inventory.reserved.v1",
            "payments.succeeded.v1",
            "orders.confirmed.v1",
            "inventory.committed.v1",
        ],
    )
    .await;

    assert_eq!(t["order_id"], id.as_str());
    assert_eq!(t["status"], "CONFIRMED");
    assert!(t["reason"].is_null(), "{t:#}");
    assert_eq!(
        type_list(&t),
        [
            "orders.placed.v1",
            "inventory.reserved.v1",
            "payments.succeeded.v1",
            "orders.confirmed.v1",
            "inventory.committed.v1"
        ]
    );
    let evs = events(&t);
    for pair in evs.windows(2) {
        assert_eq!(
            pair[1]["causation_id"], pair[0]["id"],
            "{} caused by {}",
            pair[1]["type"], pair[0]["type"]
        );
    }
    let sources: Vec<&str> = evs.iter().filter_map(|e| e["source"].as_str()).collect();
    assert_eq!(
        sources,
        [
            "/order-service",
            "/inventory-service",
            "/payment-service",
            "/order-service",
            "/inventory-service"
        ]
    );
    assert_causal_with_latencies(&t);
    let summaries: Vec<&str> = evs
        .iter()
        .map(|e| e["summary"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        summaries,
        [
            "alice orders WIDGET×2 for 25.00 EUR",
            "WIDGET×2",
            "25.00 EUR",
            "",
            "WIDGET×2"
        ]
    );

    // The read model holds exactly what the streams carried for this saga, ids and times alike
    // (times to the microsecond, as everything here stores them).
    let wire = s.saga_events(&id).await;
    let mut wire_ids: Vec<(String, DateTime<Utc>)> = wire
        .iter()
        .map(|e| {
            let micros = DateTime::from_timestamp_micros(e.time.timestamp_micros()).expect("time");
            (e.id.clone(), micros)
        })
        .collect();
    let mut read_ids: Vec<(String, DateTime<Utc>)> = evs
        .iter()
        .map(|e| (e["id"].as_str().expect("id").to_owned(), time(e)))
        .collect();
    wire_ids.sort();
    read_ids.sort();
    assert_eq!(read_ids, wire_ids);

    // Fast: the median of a few calls once the saga is over.
    let url = format!("{}/orders/{id}/timeline", s.url(Service::Order));
    let mut took = Vec::new();
    for _ in 0..11 {
        let started = Instant::now();
        let r = s.http.get(&url).send().await.expect("timeline");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
        took.push(started.elapsed());
    }
    took.sort();
    let median = took[took.len() / 2];
    eprintln!(
        "timeline ({b:?}): median {:.2} ms, min {:.2} ms, max {:.2} ms over {} calls",
        median.as_secs_f64() * 1e3,
        took[0].as_secs_f64() * 1e3,
        took[took.len() - 1].as_secs_f64() * 1e3,
        took.len()
    );
    assert!(median < ANSWER_WITHIN, "median {median:?} over {took:?}");

    // Unknown orders: a problem, not an empty timeline.
    for unknown in [uuid::Uuid::now_v7().to_string(), "not-an-order".to_owned()] {
        let r = s
            .http
            .get(format!(
                "{}/orders/{unknown}/timeline",
                s.url(Service::Order)
            ))
            .send()
            .await
            .expect("timeline");
        assert_eq!(r.status(), 404, "{unknown}");
        assert_eq!(
            r.headers()["content-type"].to_str().unwrap_or_default(),
            "application/problem+json"
        );
        let problem: Value = r.json().await.expect("problem");
        assert_eq!(problem["status"], 404, "{problem}");
    }

    wait_quiet(&s, WAIT).await;
    check(&s).await.assert_clean();

    // An event naming an order this service never had is kept: its id's timeline is that event.
    let stray = uuid::Uuid::now_v7().to_string();
    s.nats_pub(
        "inventory.released.v1",
        &[("Nats-Msg-Id", "stray-release")],
        json!({ "order_id": stray, "items": [{ "sku": "WIDGET", "quantity": 1 }] })
            .to_string()
            .as_bytes(),
    )
    .await;
    let t = saga_e2e::wait_for(WAIT, "the stray event's timeline", || async {
        s.try_get_json(Service::Order, &format!("/orders/{stray}/timeline"))
            .await
    })
    .await;
    assert!(t["status"].is_null(), "{t:#}");
    assert_eq!(type_list(&t), ["inventory.released.v1"]);
    assert_eq!(events(&t)[0]["id"], "stray-release");
    assert_eq!(events(&t)[0]["summary"], "WIDGET×1");
}

async fn compensations_show_the_rejection_or_the_failure_and_what_it_undid(b: Backend) {
    let s = system(b).await;

    // Short stock: inventory rejects, the order cancels; nothing was held, nothing charged.
    let short = s.place_order("alice", &[("GADGET", 5, 990)]).await;
    let t = wait_timeline(
        &s,
        &short,
        &[
            "orders.placed.v1",
            "inventory.rejected.v1",
            "orders.cancelled.v1",
        ],
    )
    .await;
    assert_eq!(
        (t["status"].as_str(), t["reason"].as_str()),
        (Some("CANCELLED"), Some("insufficient_stock"))
    );
    assert_eq!(
        type_list(&t),
        [
            "orders.placed.v1",
            "inventory.rejected.v1",
            "orders.cancelled.v1"
        ]
    );
    let evs = events(&t);
    assert_eq!(evs[1]["causation_id"], evs[0]["id"]);
    assert_eq!(evs[2]["causation_id"], evs[1]["id"]);
    assert_eq!(evs[0]["summary"], "alice orders GADGET×5 for 49.50 EUR");
    assert_eq!(evs[1]["summary"], "insufficient_stock (GADGET)");
    assert_eq!(evs[2]["summary"], "insufficient_stock");
    assert_causal_with_latencies(&t);

    // Insufficient funds: payment fails; inventory releases and the order cancels, both because
    // of the failure.
    let poor = s.place_order("bob", &[("WIDGET", 1, 500)]).await;
    let t = wait_timeline(
        &s,
        &poor,
        &[
            "orders.placed.v1",
            "inventory.reserved.v1",
            "payments.failed.v1",
            "inventory.released.v1",
            "orders.cancelled.v1",
        ],
    )
    .await;
    assert_eq!(
        (t["status"].as_str(), t["reason"].as_str()),
        (Some("CANCELLED"), Some("insufficient_funds"))
    );
    let types = type_list(&t);
    assert_eq!(types.len(), 5, "{t:#}");
    assert_eq!(
        types[..3],
        [
            "orders.placed.v1",
            "inventory.reserved.v1",
            "payments.failed.v1"
        ]
    );
    let mut undone = types[3..].to_vec();
    undone.sort();
    assert_eq!(undone, ["inventory.released.v1", "orders.cancelled.v1"]);
    let failed = find(&t, "payments.failed.v1");
    assert_eq!(failed["summary"], "insufficient_funds");
    assert_eq!(
        failed["causation_id"],
        find(&t, "inventory.reserved.v1")["id"]
    );
    let cancelled = find(&t, "orders.cancelled.v1");
    assert_eq!(cancelled["causation_id"], failed["id"]);
    // Inventory releases on the failure or on the cancellation it causes, whichever reaches it
    // first (the other finds nothing held): both are the failure's doing.
    let released = find(&t, "inventory.released.v1")["causation_id"].clone();
    assert!(
        released == failed["id"] || released == cancelled["id"],
        "released because of {released}, not the failure or the cancellation: {t:#}"
    );
    assert_eq!(find(&t, "inventory.released.v1")["summary"], "WIDGET×1");
    assert_eq!(find(&t, "payments.failed.v1")["source"], "/payment-service");
    assert_causal_with_latencies(&t);

    wait_quiet(&s, WAIT).await;
    check(&s).await.assert_clean();
}

async fn a_cancel_after_the_capture_shows_the_refund(b: Backend) {
    let s = system(b).await;
    // The order does not hear of the payment (its consumer is paused) until the customer has
    // cancelled, so the capture comes first and payment refunds it.
    s.pause_consumer("PAYMENTS", "order-from-payments").await;
    let id = s.place_order("alice", &[("WIDGET", 1, 700)]).await;
    saga_e2e::wait_for(WAIT, "the charge to be captured", || async {
        let p = s.payments(&id).await;
        (p.first()?["status"] == "CAPTURED").then_some(())
    })
    .await;
    let (code, _) = s.cancel(&id).await;
    assert_eq!(code, 202);
    // The same durable keeps the payment events' timeline rows: they appear once it runs again.
    s.resume_consumer("PAYMENTS", "order-from-payments").await;
    let t = wait_timeline(
        &s,
        &id,
        &[
            "orders.placed.v1",
            "inventory.reserved.v1",
            "payments.succeeded.v1",
            "orders.cancelled.v1",
            "inventory.released.v1",
            "payments.refunded.v1",
        ],
    )
    .await;

    assert_eq!(
        (t["status"].as_str(), t["reason"].as_str()),
        (Some("CANCELLED"), Some("customer_cancelled"))
    );
    let types = type_list(&t);
    assert_eq!(types.len(), 6, "{t:#}");
    assert_eq!(
        types[..4],
        [
            "orders.placed.v1",
            "inventory.reserved.v1",
            "payments.succeeded.v1",
            "orders.cancelled.v1"
        ]
    );
    let mut undone = types[4..].to_vec();
    undone.sort();
    assert_eq!(undone, ["inventory.released.v1", "payments.refunded.v1"]);
    let cancelled = find(&t, "orders.cancelled.v1");
    // Cancelled over HTTP: caused by no event; its latency counts from the capture before it.
    assert!(cancelled["causation_id"].is_null(), "{t:#}");
    assert_eq!(cancelled["summary"], "customer_cancelled");
    let refunded = find(&t, "payments.refunded.v1");
    assert_eq!(refunded["causation_id"], cancelled["id"]);
    assert_eq!(refunded["source"], "/payment-service");
    assert_eq!(refunded["summary"], "7.00 EUR");
    assert_eq!(find(&t, "payments.succeeded.v1")["summary"], "7.00 EUR");
    assert_eq!(
        find(&t, "inventory.released.v1")["causation_id"],
        cancelled["id"]
    );
    assert_causal_with_latencies(&t);

    wait_quiet(&s, WAIT).await;
    check(&s).await.assert_clean();
}
