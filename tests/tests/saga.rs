//! The choreographed saga end to end: three real service binaries, a real nats-server, real
//! databases. Every scenario runs on SQLite and on Postgres, and ends by checking the six
//! invariants and that every message on the wire matches the event catalogue.

use event_toolkit::Backend;
use saga_e2e::catalogue::assert_wire_events_match_catalogue;
use saga_e2e::invariants::{check, check_allowing_no_orders, wait_quiet};
use saga_e2e::{Service, System, SystemConfig, WAIT};
use serde_json::{json, Value};

async fn system(backend: Backend) -> System {
    let s = System::start(SystemConfig::new(backend)).await;
    s.set_stock("WIDGET", 10).await;
    s.set_stock("GADGET", 2).await;
    s.set_balance("alice", 10_000).await;
    s
}

/// Quiet, the six invariants, and the wire against the catalogue.
async fn assert_invariants(s: &System) {
    wait_quiet(s, WAIT).await;
    check(s).await.assert_clean();
    assert!(assert_wire_events_match_catalogue(s).await > 0);
}

use event_toolkit::on_backends;
use saga_e2e::{CancelReason, OrderStatus};

on_backends! {
    sqlite: [
        happy_path_confirms_with_exact_stock_and_money_and_linked_events,
        short_stock_and_unknown_sku_cancel_without_charging,
        insufficient_funds_decline_and_outage_cancel_and_release,
        customer_cancels_while_pending_reserved_and_after_the_charge,
        deadline_passes_while_payment_is_down_and_survives_an_order_restart,
        a_cancellation_published_before_its_placement_reserves_and_charges_nothing,
        every_event_republished_with_a_new_msg_id_takes_effect_once,
        bad_http_input_gets_problems_and_writes_nothing,
        placing_is_idempotent_by_key,
        concurrent_requests_with_one_idempotency_key_make_one_order,
        concurrent_orders_for_the_last_unit_confirm_exactly_one,
        a_balance_for_one_of_several_concurrent_orders_is_captured_once,
    ],
    postgres: [
        happy_path_confirms_with_exact_stock_and_money_and_linked_events,
        short_stock_and_unknown_sku_cancel_without_charging,
        insufficient_funds_decline_and_outage_cancel_and_release,
        customer_cancels_while_pending_reserved_and_after_the_charge,
        deadline_passes_while_payment_is_down_and_survives_an_order_restart,
        a_cancellation_published_before_its_placement_reserves_and_charges_nothing,
        every_event_republished_with_a_new_msg_id_takes_effect_once,
        bad_http_input_gets_problems_and_writes_nothing,
        placing_is_idempotent_by_key,
        concurrent_requests_with_one_idempotency_key_make_one_order,
        concurrent_orders_for_the_last_unit_confirm_exactly_one,
        a_balance_for_one_of_several_concurrent_orders_is_captured_once,
    ],
}

async fn happy_path_confirms_with_exact_stock_and_money_and_linked_events(b: Backend) {
    let s = system(b).await;
    let id = s
        .place_order("alice", &[("WIDGET", 3, 250), ("GADGET", 1, 1000)])
        .await;
    let order = s.wait_terminal_view(&id).await;
    assert_eq!(
        (order.status, order.total_minor, order.reason),
        (OrderStatus::Confirmed, 1750, None),
        "{order:?}"
    );

    wait_quiet(&s, WAIT).await;
    let widget = s.product("WIDGET").await;
    assert_eq!(
        (
            widget["available"].as_i64(),
            widget["reserved"].as_i64(),
            widget["sold"].as_i64()
        ),
        (Some(7), Some(0), Some(3))
    );
    let gadget = s.product("GADGET").await;
    assert_eq!(
        (gadget["available"].as_i64(), gadget["sold"].as_i64()),
        (Some(1), Some(1))
    );
    assert_eq!(s.balance("alice").await, 10_000 - 1750);
    let pays = s.payments(&id).await;
    assert_eq!(pays.len(), 1);
    assert_eq!(
        (pays[0]["status"].as_str(), pays[0]["amount_minor"].as_i64()),
        (Some("CAPTURED"), Some(1750))
    );

    // The saga's events share its correlation id and each names its cause, in causal order.
    let events = s.saga_events(&id).await;
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "orders.placed.v1",
            "inventory.reserved.v1",
            "payments.succeeded.v1",
            "orders.confirmed.v1",
            "inventory.committed.v1"
        ]
    );
    for pair in events.windows(2) {
        assert_eq!(
            pair[1].causationid.as_deref(),
            Some(pair[0].id.as_str()),
            "{} caused by {}",
            pair[1].event_type,
            pair[0].event_type
        );
    }
    assert!(events
        .iter()
        .all(|e| e.subject.as_deref() == Some(id.as_str()) && e.specversion == "1.0"));
    assert_invariants(&s).await;
}

async fn short_stock_and_unknown_sku_cancel_without_charging(b: Backend) {
    let s = system(b).await;
    let short = s
        .place_order("alice", &[("WIDGET", 1, 100), ("GADGET", 3, 100)])
        .await;
    let unknown = s
        .place_order("alice", &[("WIDGET", 1, 100), ("NOPE", 1, 100)])
        .await;
    for (id, reason) in [(&short, "insufficient_stock"), (&unknown, "unknown_sku")] {
        let o = s.wait_terminal_view(id).await;
        assert_eq!(
            (o.status.as_str(), o.reason.map(CancelReason::as_str)),
            ("CANCELLED", Some(reason)),
            "{o:?}"
        );
        assert!(s.payments(id).await.is_empty(), "nothing charged");
        assert!(
            s.reservations(id).await.is_empty(),
            "all or nothing: nothing reserved"
        );
    }
    assert_eq!(s.product("WIDGET").await["available"], 10);
    assert_eq!(s.balance("alice").await, 10_000);
    assert_invariants(&s).await;
}

async fn insufficient_funds_decline_and_outage_cancel_and_release(b: Backend) {
    let s = system(b).await;
    s.set_balance("bob", 100).await;
    let poor = s.place_order("bob", &[("WIDGET", 1, 500)]).await;
    let o = s.wait_terminal_view(&poor).await;
    assert_eq!(o.reason, Some(CancelReason::InsufficientFunds), "{o:?}");

    s.set_gateway("decline").await;
    let declined = s.place_order("alice", &[("WIDGET", 2, 100)]).await;
    let o = s.wait_terminal_view(&declined).await;
    assert_eq!(o.reason, Some(CancelReason::PaymentDeclined), "{o:?}");
    assert_eq!(s.gateway().await.circuit, "closed", "declines are answers");

    s.set_gateway("outage").await;
    let down = s.place_order("alice", &[("WIDGET", 1, 100)]).await;
    let o = s.wait_terminal_view(&down).await;
    assert_eq!(o.reason, Some(CancelReason::PaymentUnavailable), "{o:?}");
    // Retries exhausted opened the circuit: a charge while it is open fails fast even with the
    // provider back. Whether the charge below came while it was open is read off the breaker,
    // not assumed from how fast the saga ran.
    assert_eq!(s.gateway().await.circuit, "open");
    s.set_gateway("ok").await;
    let fast_fail = s.place_order("alice", &[("WIDGET", 1, 100)]).await;
    let o = s.wait_terminal_view(&fast_fail).await;
    let fast_fail_paid = match s.gateway().await.circuit.as_str() {
        "open" => {
            assert_eq!(
                o.reason,
                Some(CancelReason::PaymentUnavailable),
                "circuit open: {o:?}"
            );
            false
        }
        // The open window ended first: the charge was the trial call, which closes the circuit.
        _ => {
            assert_eq!(
                o.status,
                OrderStatus::Confirmed,
                "trial call with the provider back: {o:?}"
            );
            assert_eq!(s.gateway().await.circuit, "closed");
            true
        }
    };

    wait_quiet(&s, WAIT).await;
    let mut failed = vec![&poor, &declined, &down];
    if !fast_fail_paid {
        failed.push(&fast_fail);
    }
    for id in failed {
        let lines = s.reservations(id).await;
        assert!(
            !lines.is_empty() && lines.iter().all(|l| l["status"] == "RELEASED"),
            "{lines:?}"
        );
        assert!(s.payments(id).await.iter().all(|p| p["status"] == "FAILED"));
    }
    let sold = i64::from(fast_fail_paid);
    let w = s.product("WIDGET").await;
    assert_eq!(
        (
            w["available"].as_i64(),
            w["reserved"].as_i64(),
            w["sold"].as_i64()
        ),
        (Some(10 - sold), Some(0), Some(sold))
    );
    assert_eq!(s.balance("alice").await, 10_000 - 100 * sold);
    assert_eq!(s.balance("bob").await, 100);
    assert_invariants(&s).await;
}

async fn customer_cancels_while_pending_reserved_and_after_the_charge(b: Backend) {
    let mut s = system(b).await;

    // While PENDING: inventory is down, so nothing has been reserved yet.
    s.kill(Service::Inventory);
    let pending = s.place_order("alice", &[("WIDGET", 2, 100)]).await;
    let (code, o) = s.cancel(&pending).await;
    assert_eq!(
        (code, o["status"].as_str(), o["reason"].as_str()),
        (202, Some("CANCELLED"), Some("customer_cancelled"))
    );
    s.restart(Service::Inventory).await;

    // While RESERVED: payment is down, so the order waits after its reservation.
    s.kill(Service::Payment);
    let reserved = s.place_order("alice", &[("WIDGET", 3, 100)]).await;
    s.wait_status(&reserved, &["RESERVED"]).await;
    let (code, _) = s.cancel(&reserved).await;
    assert_eq!(code, 202);
    s.restart(Service::Payment).await;

    // After the charge: the order does not hear of the payment (its consumer is paused by an
    // operator) until the customer has cancelled; payment then refunds.
    s.pause_consumer("PAYMENTS", "order-from-payments").await;
    let charged = s.place_order("alice", &[("WIDGET", 1, 700)]).await;
    saga_e2e::wait_for(WAIT, "the charge to be captured", || async {
        let p = s.payments(&charged).await;
        (p.first()?["status"] == "CAPTURED").then_some(())
    })
    .await;
    assert_eq!(s.order_view(&charged).await.status, OrderStatus::Reserved);
    let (code, _) = s.cancel(&charged).await;
    assert_eq!(code, 202);
    saga_e2e::wait_for(WAIT, "the refund", || async {
        let p = s.payments(&charged).await;
        (p.first()?["status"] == "REFUNDED").then_some(())
    })
    .await;
    s.resume_consumer("PAYMENTS", "order-from-payments").await;

    // Cancelling again is a no-op; cancelling a confirmed order is refused.
    assert_eq!(s.cancel(&charged).await.0, 200);
    let done = s.place_order("alice", &[("WIDGET", 1, 100)]).await;
    assert_eq!(
        s.wait_terminal_view(&done).await.status,
        OrderStatus::Confirmed
    );
    let (code, problem) = s.cancel(&done).await;
    assert_eq!(code, 409, "{problem}");

    wait_quiet(&s, WAIT).await;
    for id in [&pending, &reserved, &charged] {
        let o = s.order_view(id).await;
        assert_eq!(
            (o.status.as_str(), o.reason.map(CancelReason::as_str)),
            ("CANCELLED", Some("customer_cancelled")),
            "{o:?}"
        );
        assert!(s
            .reservations(id)
            .await
            .iter()
            .all(|l| l["status"] == "RELEASED"));
    }
    assert_eq!(
        s.order_view(&charged).await.status,
        OrderStatus::Cancelled,
        "late success did not revive it"
    );
    assert_eq!(
        s.balance("alice").await,
        10_000 - 100,
        "only the confirmed order is paid"
    );
    assert_eq!(s.product("WIDGET").await["available"], 9);
    assert_invariants(&s).await;
}

async fn deadline_passes_while_payment_is_down_and_survives_an_order_restart(b: Backend) {
    let mut config = SystemConfig::new(b);
    config.deadline_ms = 3000;
    let mut s = System::start(config).await;
    s.set_stock("WIDGET", 10).await;
    s.set_balance("alice", 10_000).await;
    s.kill(Service::Payment);
    let id = s.place_order("alice", &[("WIDGET", 4, 100)]).await;
    s.wait_status(&id, &["RESERVED"]).await;
    // The deadline is a column, not a timer: the order service is down when it passes, and the
    // process started afterwards is the one that cancels.
    let before = s.order_view(&id).await;
    assert!(!before.is_terminal(), "{before:?}");
    s.kill(Service::Order);
    saga_e2e::wait_for(WAIT, "the deadline to pass", || async {
        (chrono::Utc::now() > before.deadline_at).then_some(())
    })
    .await;
    s.restart(Service::Order).await;
    let o = s.wait_terminal_view(&id).await;
    assert_eq!(
        (o.status.as_str(), o.reason.map(CancelReason::as_str)),
        ("CANCELLED", Some("deadline_exceeded"))
    );
    saga_e2e::wait_for(WAIT, "stock released", || async {
        (s.product("WIDGET").await["available"] == 10).then_some(())
    })
    .await;
    s.restart(Service::Payment).await;
    wait_quiet(&s, WAIT).await;
    assert_eq!(s.balance("alice").await, 10_000, "net charge zero");
    assert!(s
        .payments(&id)
        .await
        .iter()
        .all(|p| p["status"] != "CAPTURED"));
    assert_invariants(&s).await;
}

async fn a_cancellation_published_before_its_placement_reserves_and_charges_nothing(b: Backend) {
    let s = system(b).await;
    let id = uuid::Uuid::now_v7().to_string();
    // As a person with the nats CLI would: bare JSON, no headers, cancellation first.
    s.nats_pub(
        "orders.cancelled.v1",
        &[],
        json!({ "order_id": id, "reason": "customer_cancelled" })
            .to_string()
            .as_bytes(),
    )
    .await;
    s.nats_pub(
        "orders.placed.v1",
        &[],
        json!({
            "order_id": id, "customer_id": "alice", "currency": "EUR", "total_minor": 300,
            "items": [{ "sku": "WIDGET", "quantity": 3, "unit_price_minor": 100 }],
            "deadline_at": "2030-01-01T00:00:00Z"
        })
        .to_string()
        .as_bytes(),
    )
    .await;
    wait_quiet(&s, WAIT).await;
    assert!(s.reservations(&id).await.is_empty(), "no reservation");
    assert!(s.payments(&id).await.is_empty(), "no charge");
    assert_eq!(s.product("WIDGET").await["available"], 10);
    assert_eq!(s.balance("alice").await, 10_000);
    for svc in Service::ALL {
        assert!(s.dead_letters(svc).await.is_empty(), "{svc:?}");
    }
    // Published by hand: no order was accepted over HTTP.
    check_allowing_no_orders(&s).await.assert_clean();
    assert!(assert_wire_events_match_catalogue(&s).await >= 2);
}

async fn every_event_republished_with_a_new_msg_id_takes_effect_once(b: Backend) {
    let s = system(b).await;
    let ok = s.place_order("alice", &[("WIDGET", 2, 100)]).await;
    let short = s.place_order("alice", &[("GADGET", 5, 100)]).await;
    s.wait_terminal(&ok).await;
    s.wait_terminal(&short).await;
    wait_quiet(&s, WAIT).await;
    let before = (
        s.product("WIDGET").await,
        s.product("GADGET").await,
        s.balance("alice").await,
    );
    let mut copies = 0;
    for stream in ["ORDERS", "INVENTORY", "PAYMENTS"] {
        for (_, subject, _, body) in s.stream_messages(stream).await {
            let fresh = uuid::Uuid::now_v7().to_string();
            s.nats_pub(&subject, &[("Nats-Msg-Id", &fresh)], &body)
                .await;
            copies += 1;
        }
    }
    assert!(copies >= 8, "{copies}");
    wait_quiet(&s, WAIT).await;
    let after = (
        s.product("WIDGET").await,
        s.product("GADGET").await,
        s.balance("alice").await,
    );
    assert_eq!(before, after, "duplicates changed nothing");
    assert_eq!(s.order_view(&ok).await.status, OrderStatus::Confirmed);
    assert_eq!(s.order_view(&short).await.status, OrderStatus::Cancelled);
    assert_eq!(s.payments(&ok).await.len(), 1);
    assert_invariants(&s).await;
}

async fn placing_is_idempotent_by_key(b: Backend) {
    let s = system(b).await;
    let url = format!("{}/orders", s.url(Service::Order));
    let body = json!({ "customer_id": "alice", "currency": "EUR", "items": [{ "sku": "WIDGET", "quantity": 1, "unit_price_minor": 5 }] });
    let first: Value = s
        .http
        .post(&url)
        .header("Idempotency-Key", "k-1")
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let again = s
        .http
        .post(&url)
        .header("Idempotency-Key", "k-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 202);
    let again: Value = again.json().await.unwrap();
    assert_eq!(first["id"], again["id"]);
    s.record_accepted(first["id"].as_str().unwrap());
    let mut other = body.clone();
    other["items"][0]["quantity"] = json!(2);
    let conflict = s
        .http
        .post(&url)
        .header("Idempotency-Key", "k-1")
        .json(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(conflict.status(), 422);
    assert_eq!(
        conflict.headers()["content-type"],
        "application/problem+json"
    );
    s.wait_terminal(first["id"].as_str().unwrap()).await;
    // Stock is committed after the confirmation: wait for the saga's last step.
    wait_quiet(&s, WAIT).await;
    let all = s.get_json(Service::Order, "/orders").await["items"].clone();
    assert_eq!(all.as_array().unwrap().len(), 1, "one order, one saga");
    assert_eq!(s.product("WIDGET").await["sold"], 1);
    assert_invariants(&s).await;
}

async fn bad_http_input_gets_problems_and_writes_nothing(b: Backend) {
    let s = system(b).await;
    let order_url = format!("{}/orders", s.url(Service::Order));
    let huge = format!(
        r#"{{"customer_id":"{}","currency":"EUR","items":[]}}"#,
        "x".repeat(200_000)
    );
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        ("malformed", "{\"customer_id\": ".into(), None),
        ("not an object", "[1,2,3]".into(), None),
        ("missing items", r#"{"customer_id":"alice","currency":"EUR"}"#.into(), None),
        ("zero quantity", r#"{"customer_id":"alice","currency":"EUR","items":[{"sku":"WIDGET","quantity":0,"unit_price_minor":1}]}"#.into(), None),
        ("negative quantity", r#"{"customer_id":"alice","currency":"EUR","items":[{"sku":"WIDGET","quantity":-1,"unit_price_minor":1}]}"#.into(), None),
        ("string quantity", r#"{"customer_id":"alice","currency":"EUR","items":[{"sku":"WIDGET","quantity":"1","unit_price_minor":1}]}"#.into(), None),
        ("overflowing number", r#"{"customer_id":"alice","currency":"EUR","items":[{"sku":"WIDGET","quantity":1,"unit_price_minor":99999999999999999999999}]}"#.into(), None),
        ("overflowing total", r#"{"customer_id":"alice","currency":"EUR","items":[{"sku":"WIDGET","quantity":1000000,"unit_price_minor":9223372036854775807}]}"#.into(), None),
        ("bad currency", r#"{"customer_id":"alice","currency":"euro","items":[{"sku":"WIDGET","quantity":1,"unit_price_minor":1}]}"#.into(), None),
        ("huge body", huge, None),
        ("wrong content type", r#"{"customer_id":"alice","currency":"EUR","items":[]}"#.into(), Some("text/plain")),
    ];
    // The server closes a connection whose body it refused unread (the huge one); a connection
    // per case keeps that from failing the next case on a reused socket.
    let unpooled = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("http client");
    for (name, body, content_type) in cases {
        let r = unpooled
            .post(&order_url)
            .header("content-type", content_type.unwrap_or("application/json"))
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let status = r.status().as_u16();
        assert!((400..500).contains(&status), "{name}: {status}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{name}"
        );
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["status"], status, "{name}");
        assert!(
            problem["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{name}: {problem}"
        );
    }
    let not_found = [
        (
            Service::Order,
            "/orders/00000000-0000-0000-0000-000000000000",
        ),
        (Service::Order, "/orders/not-a-uuid"),
        (Service::Inventory, "/products/NOPE"),
        (Service::Payment, "/accounts/nobody"),
        (Service::Order, "/no/such/path"),
    ];
    for (svc, path) in not_found {
        let r = s
            .http
            .get(format!("{}{path}", s.url(svc)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{path}"
        );
    }
    let r = s
        .http
        .post(format!(
            "{}/orders/00000000-0000-0000-0000-000000000000/cancel",
            s.url(Service::Order)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = s
        .http
        .delete(format!("{}/orders", s.url(Service::Order)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    for (svc, path, body) in [
        (
            Service::Inventory,
            "/products/WIDGET",
            json!({ "available": -1 }),
        ),
        (
            Service::Inventory,
            "/products/WIDGET",
            json!({ "available": "ten" }),
        ),
        (
            Service::Payment,
            "/accounts/alice",
            json!({ "balance_minor": -5, "currency": "EUR" }),
        ),
        (
            Service::Payment,
            "/accounts/alice",
            json!({ "balance_minor": 5, "currency": "USD" }),
        ),
        (
            Service::Payment,
            "/admin/gateway",
            json!({ "mode": "sideways" }),
        ),
    ] {
        let r = s
            .http
            .put(format!("{}{path}", s.url(svc)))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_client_error(),
            "{path} {body}: {}",
            r.status()
        );
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    // Nothing was written.
    assert_eq!(
        s.get_json(Service::Order, "/orders").await["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(s.product("WIDGET").await["available"], 10);
    assert_eq!(
        s.get_json(Service::Payment, "/accounts/alice").await["currency"],
        "EUR"
    );
    assert_eq!(s.balance("alice").await, 10_000);
    wait_quiet(&s, WAIT).await;
    check_allowing_no_orders(&s).await.assert_clean();
    assert_eq!(
        assert_wire_events_match_catalogue(&s).await,
        0,
        "no event either"
    );
}

async fn concurrent_requests_with_one_idempotency_key_make_one_order(b: Backend) {
    let s = system(b).await;
    let url = format!("{}/orders", s.url(Service::Order));
    let body = json!({ "customer_id": "alice", "currency": "EUR", "items": [{ "sku": "WIDGET", "quantity": 1, "unit_price_minor": 5 }] });
    let requests = (0..8).map(|_| {
        s.http
            .post(&url)
            .header("Idempotency-Key", "same-key")
            .json(&body)
            .send()
    });
    let mut ids = std::collections::BTreeSet::new();
    for r in futures::future::join_all(requests).await {
        let r = r.unwrap();
        assert_eq!(r.status(), 202);
        let v: Value = r.json().await.unwrap();
        ids.insert(v["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1, "one order for one key: {ids:?}");
    s.record_accepted(ids.first().unwrap());
    s.wait_terminal(ids.first().unwrap()).await;
    assert_eq!(
        s.get_json(Service::Order, "/orders").await["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_invariants(&s).await;
}

async fn concurrent_orders_for_the_last_unit_confirm_exactly_one(b: Backend) {
    let s = system(b).await;
    s.set_stock("LAST", 1).await;
    let placing = (0..8).map(|_| s.place_order("alice", &[("LAST", 1, 300)]));
    let ids = futures::future::join_all(placing).await;
    let mut outcomes = Vec::new();
    for id in &ids {
        let o = s.wait_terminal_view(id).await;
        outcomes.push((o.status, o.reason));
    }
    let confirmed = outcomes
        .iter()
        .filter(|(st, _)| *st == OrderStatus::Confirmed)
        .count();
    let short = outcomes
        .iter()
        .filter(|(st, r)| {
            *st == OrderStatus::Cancelled && *r == Some(CancelReason::InsufficientStock)
        })
        .count();
    assert_eq!((confirmed, short), (1, 7), "{outcomes:?}");
    wait_quiet(&s, WAIT).await;
    let last = s.product("LAST").await;
    assert_eq!(
        (
            last["available"].as_i64(),
            last["reserved"].as_i64(),
            last["sold"].as_i64()
        ),
        (Some(0), Some(0), Some(1)),
        "{last}"
    );
    assert_eq!(
        s.balance("alice").await,
        10_000 - 300,
        "only the winner paid"
    );
    assert_invariants(&s).await;
}

async fn a_balance_for_one_of_several_concurrent_orders_is_captured_once(b: Backend) {
    let s = system(b).await;
    s.set_balance("carol", 150).await;
    let placing = (0..6).map(|_| s.place_order("carol", &[("WIDGET", 1, 100)]));
    let ids = futures::future::join_all(placing).await;
    let mut outcomes = Vec::new();
    let mut captured = 0;
    for id in &ids {
        let o = s.wait_terminal_view(id).await;
        outcomes.push((o.status, o.reason));
        captured += s
            .payments(id)
            .await
            .iter()
            .filter(|p| p["status"] == "CAPTURED")
            .count();
    }
    let confirmed = outcomes
        .iter()
        .filter(|(st, _)| *st == OrderStatus::Confirmed)
        .count();
    let poor = outcomes
        .iter()
        .filter(|(st, r)| {
            *st == OrderStatus::Cancelled && *r == Some(CancelReason::InsufficientFunds)
        })
        .count();
    assert_eq!((confirmed, poor, captured), (1, 5, 1), "{outcomes:?}");
    wait_quiet(&s, WAIT).await;
    assert_eq!(s.balance("carol").await, 50);
    let w = s.product("WIDGET").await;
    assert_eq!(
        (
            w["available"].as_i64(),
            w["reserved"].as_i64(),
            w["sold"].as_i64()
        ),
        (Some(9), Some(0), Some(1)),
        "the losers' stock went back"
    );
    assert_invariants(&s).await;
}
