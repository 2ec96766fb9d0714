//! The trust boundary over HTTP and on the bus, tried against the real binaries:
//! - admin and seeding routes need `Authorization: Bearer <ADMIN_TOKEN>` (401 without or with a
//!   wrong one, 403 on a service started without a token), and a refused call changes nothing;
//! - an event whose `type` disagrees with the subject it arrived on is dead-lettered by every
//!   consumer that receives it, never applied.

use event_toolkit::Backend;
use saga_e2e::invariants::{check, wait_quiet};
use saga_e2e::{Service, System, SystemConfig, WAIT};
use serde_json::{json, Value};

use event_toolkit::on_both_backends as on_backends;

on_backends!(
    admin_routes_refuse_missing_and_wrong_tokens_and_change_nothing,
    admin_routes_are_closed_when_no_token_is_configured,
    a_type_that_disagrees_with_its_subject_is_dead_lettered_by_every_service,
    a_full_stream_holds_events_in_the_outbox_until_space_is_freed,
);

/// Every admin or seeding route: (service, method, path, a valid body).
const ADMIN_ROUTES: &[(Service, &str, &str, Option<&str>)] = &[
    (
        Service::Inventory,
        "PUT",
        "/products/WIDGET",
        Some(r#"{"available": 999}"#),
    ),
    (
        Service::Payment,
        "PUT",
        "/accounts/alice",
        Some(r#"{"balance_minor": 999999, "currency": "EUR"}"#),
    ),
    (
        Service::Payment,
        "PUT",
        "/admin/gateway",
        Some(r#"{"mode": "outage"}"#),
    ),
    (Service::Payment, "GET", "/admin/gateway", None),
    (Service::Order, "GET", "/admin/dead-letters", None),
    (Service::Inventory, "GET", "/admin/dead-letters", None),
    (Service::Payment, "GET", "/admin/dead-letters", None),
    (Service::Order, "GET", "/admin/stats", None),
    (Service::Inventory, "GET", "/admin/stats", None),
    (Service::Payment, "GET", "/admin/stats", None),
];

/// Send one admin request with the given `Authorization` header (or none), from a client that
/// carries no credentials of its own.
async fn call(s: &System, route: &(Service, &str, &str, Option<&str>), auth: Option<&str>) -> u16 {
    let (svc, method, path, body) = route;
    let anonymous = reqwest::Client::new();
    let mut req = anonymous.request(
        method.parse().expect("method"),
        format!("{}{path}", s.url(*svc)),
    );
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    if !r.status().is_success() {
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{method} {path}"
        );
        if status == 401 {
            assert_eq!(r.headers()["www-authenticate"], "Bearer", "{method} {path}");
        }
        let problem: Value = r.json().await.expect("problem body");
        assert_eq!(problem["status"], status, "{method} {path}: {problem}");
    }
    status
}

async fn seeded(b: Backend, config: impl FnOnce(&mut SystemConfig)) -> System {
    let mut c = SystemConfig::new(b);
    config(&mut c);
    System::start(c).await
}

async fn admin_routes_refuse_missing_and_wrong_tokens_and_change_nothing(b: Backend) {
    let s = seeded(b, |_| {}).await;
    s.set_stock("WIDGET", 10).await;
    s.set_balance("alice", 10_000).await;
    let good = format!("Bearer {}", saga_e2e::ADMIN_TOKEN);
    let wrong_tokens = [
        None,
        Some("Bearer wrong-token".to_owned()),
        Some(format!("Bearer {}x", saga_e2e::ADMIN_TOKEN)),
        Some(saga_e2e::ADMIN_TOKEN.to_owned()),
        Some(format!("Basic {}", saga_e2e::ADMIN_TOKEN)),
    ];
    for route in ADMIN_ROUTES {
        for auth in &wrong_tokens {
            let status = call(&s, route, auth.as_deref()).await;
            assert_eq!(status, 401, "{} {} with {auth:?}", route.1, route.2);
        }
    }
    // Nothing changed: stock, balance and the provider's mode are as seeded.
    assert_eq!(s.product("WIDGET").await["available"], 10);
    assert_eq!(s.balance("alice").await, 10_000);
    let gateway = s.get_json(Service::Payment, "/admin/gateway").await;
    assert_eq!(gateway["mode"], "ok", "{gateway}");

    // The right token opens every route (writes repeat the seeded values, so the test's own
    // ledger of what it put in stays true).
    for (svc, method, path, body) in ADMIN_ROUTES {
        let body = match *path {
            "/products/WIDGET" => Some(r#"{"available": 10}"#),
            "/accounts/alice" => Some(r#"{"balance_minor": 10000, "currency": "EUR"}"#),
            "/admin/gateway" => body.map(|_| r#"{"mode": "ok"}"#),
            _ => *body,
        };
        let status = call(&s, &(*svc, method, path, body), Some(&good)).await;
        assert_eq!(status, 200, "{method} {path}");
    }

    // Customer routes need no admin token (a gateway authenticates customers in front of them).
    let anonymous = reqwest::Client::new();
    let placed = anonymous
        .post(format!("{}/orders", s.url(Service::Order)))
        .json(&json!({ "customer_id": "alice", "currency": "EUR",
            "items": [{ "sku": "WIDGET", "quantity": 1, "unit_price_minor": 100 }] }))
        .send()
        .await
        .expect("place");
    assert_eq!(placed.status(), 202);
    let id = placed.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    s.record_accepted(&id);
    let o = anonymous
        .get(format!("{}/orders/{id}", s.url(Service::Order)))
        .send()
        .await
        .expect("get");
    assert_eq!(o.status(), 200);
    assert_eq!(s.wait_terminal(&id).await["status"], "CONFIRMED");
    wait_quiet(&s, WAIT).await;
    check(&s).await.assert_clean();
}

async fn admin_routes_are_closed_when_no_token_is_configured(b: Backend) {
    let s = seeded(b, |c| c.env.push(("ADMIN_TOKEN".into(), String::new()))).await;
    let good = format!("Bearer {}", saga_e2e::ADMIN_TOKEN);
    for route in ADMIN_ROUTES {
        for auth in [None, Some(good.as_str())] {
            let status = call(&s, route, auth).await;
            assert_eq!(status, 403, "{} {} with {auth:?}", route.1, route.2);
        }
    }
    for svc in Service::ALL {
        assert!(
            s.log(svc).contains("ADMIN_TOKEN is not set"),
            "{} says why its admin routes are closed",
            svc.binary()
        );
    }
    // Nothing was created.
    let r = reqwest::get(format!("{}/products/WIDGET", s.url(Service::Inventory)))
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
}

/// A structured CloudEvent claiming `claimed_type` for `order_id`.
fn forged(claimed_type: &str, data: Value, order_id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "specversion": "1.0",
        "id": uuid::Uuid::now_v7().to_string(),
        "source": "/forger",
        "type": claimed_type,
        "subject": order_id,
        "time": chrono::Utc::now().to_rfc3339(),
        "datacontenttype": "application/json",
        "data": data,
    }))
    .expect("json")
}

/// Dead letters of `svc` whose reason says the type disagreed with the subject.
async fn mismatch_dead_letters(s: &System, svc: Service) -> Vec<Value> {
    s.dead_letters(svc)
        .await
        .into_iter()
        .filter(|d| {
            d["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("type does not match subject"))
        })
        .collect()
}

async fn a_type_that_disagrees_with_its_subject_is_dead_lettered_by_every_service(b: Backend) {
    let mut s = seeded(b, |_| {}).await;
    s.set_stock("WIDGET", 10).await;
    s.set_balance("alice", 10_000).await;

    // With payment down, the order waits RESERVED: nothing but a forgery could confirm it.
    s.kill(Service::Payment);
    let id = s.place_order("alice", &[("WIDGET", 2, 100)]).await;
    s.wait_status(&id, &["RESERVED"]).await;

    // A "succeeded" on the failed subject (order and inventory consume payments.failed.v1).
    s.nats_pub(
        "payments.failed.v1",
        &[],
        &forged(
            "payments.succeeded.v1",
            json!({ "order_id": id, "payment_id": "p-forged", "amount_minor": 200, "currency": "EUR" }),
            &id,
        ),
    )
    .await;
    // An "inventory reserved" on orders.cancelled.v1 (payment and inventory consume it).
    s.nats_pub(
        "orders.cancelled.v1",
        &[],
        &forged(
            "inventory.reserved.v1",
            json!({ "order_id": id, "customer_id": "alice", "currency": "EUR", "total_minor": 1,
                "items": [{ "sku": "WIDGET", "quantity": 1 }] }),
            &id,
        ),
    )
    .await;
    // An "order confirmed" on the inventory subject order consumes.
    s.nats_pub(
        "inventory.rejected.v1",
        &[],
        &forged("orders.confirmed.v1", json!({ "order_id": id }), &id),
    )
    .await;

    s.restart(Service::Payment).await;
    // Every durable that receives a forged subject refuses it: as many per service as its wiring
    // has durables on those subjects (order 2, inventory 2, payment 1).
    let forged_on = [
        "payments.failed.v1",
        "orders.cancelled.v1",
        "inventory.rejected.v1",
    ];
    let expected = Service::ALL.map(|svc| {
        let n = saga_e2e::invariants::consumers()
            .iter()
            .filter(|c| c.service == svc)
            .map(|c| forged_on.iter().filter(|f| c.receives(f)).count())
            .sum::<usize>();
        (svc, n)
    });
    assert_eq!(
        expected.map(|(_, n)| n),
        [2, 2, 1],
        "order, inventory, payment"
    );
    for (svc, n) in expected {
        saga_e2e::wait_for(WAIT, &format!("{} dead letters", svc.binary()), || async {
            (mismatch_dead_letters(&s, svc).await.len() >= n).then_some(())
        })
        .await;
    }
    // The saga ran as if nothing had been forged: paid once, stock sold once.
    let o = s.wait_terminal(&id).await;
    assert_eq!(o["status"], "CONFIRMED", "{o}");
    wait_quiet(&s, WAIT).await;
    for (svc, n) in expected {
        let dead = mismatch_dead_letters(&s, svc).await;
        assert_eq!(dead.len(), n, "{}: {dead:?}", svc.binary());
    }
    let pays = s.payments(&id).await;
    assert_eq!(pays.len(), 1, "{pays:?}");
    assert_eq!(pays[0]["status"], "CAPTURED");
    assert_eq!(s.balance("alice").await, 10_000 - 200);
    assert_eq!(s.product("WIDGET").await["sold"], 2);
    check(&s).await.assert_clean();
}

async fn a_full_stream_holds_events_in_the_outbox_until_space_is_freed(b: Backend) {
    // Streams of 8 KiB: about a dozen events each.
    let s = seeded(b, |c| {
        c.env.push(("STREAM_MAX_BYTES".into(), "8192".into()));
        c.deadline_ms = 120_000;
    })
    .await;
    s.set_stock("WIDGET", 100).await;
    s.set_balance("alice", 100_000).await;
    let js = async_nats::jetstream::new(s.client.clone());
    for stream in ["ORDERS", "INVENTORY", "PAYMENTS"] {
        let info = js
            .get_stream(stream)
            .await
            .expect("stream")
            .get_info()
            .await
            .expect("info");
        assert_eq!(info.config.max_bytes, 8192, "{stream} is bounded");
        assert_eq!(
            info.config.discard,
            async_nats::jetstream::stream::DiscardPolicy::New,
            "{stream} refuses new messages when full instead of dropping old ones"
        );
    }
    let mut ids = Vec::new();
    for _ in 0..30 {
        ids.push(s.place_order("alice", &[("WIDGET", 1, 100)]).await);
    }
    // Some service's stream fills: its relay stops and says so on /readyz.
    let anonymous = reqwest::Client::new();
    let full = saga_e2e::wait_for(WAIT, "a relay to report its stream full", || async {
        for svc in Service::ALL {
            let r = anonymous
                .get(format!("{}/readyz", s.url(svc)))
                .send()
                .await
                .ok()?;
            if r.status() == 503 {
                let body: Value = r.json().await.ok()?;
                if body["relay"] == false {
                    return Some(svc);
                }
            }
        }
        None
    })
    .await;
    assert!(
        s.log(full).contains("STREAM FULL"),
        "{} logs the outage loudly",
        full.binary()
    );
    let open = ids.len()
        - futures::future::join_all(ids.iter().map(|id| s.order(id)))
            .await
            .iter()
            .filter(|o| o["status"] == "CONFIRMED" || o["status"] == "CANCELLED")
            .count();
    assert!(open > 0, "the full stream holds sagas up");

    // An operator frees space (here: raises the bound); the held events go out on their own.
    for stream in ["ORDERS", "INVENTORY", "PAYMENTS", "ORDER_COMMANDS"] {
        let mut config = js
            .get_stream(stream)
            .await
            .expect("stream")
            .get_info()
            .await
            .expect("info")
            .config;
        config.max_bytes = 64 << 20;
        js.update_stream(config).await.expect("raise max_bytes");
    }
    for id in &ids {
        let o = s.wait_terminal(id).await;
        assert_eq!(o["status"], "CONFIRMED", "completed by the saga: {o}");
    }
    wait_quiet(&s, WAIT).await;
    for svc in Service::ALL {
        s.wait_ready(svc).await;
        let parked = s.get_json(svc, "/admin/outbox/parked").await;
        assert_eq!(
            parked["items"].as_array().map(Vec::len),
            Some(0),
            "{}: nothing parked: {parked}",
            svc.binary()
        );
    }
    assert_eq!(s.product("WIDGET").await["sold"], 30);
    check(&s).await.assert_clean();
}
