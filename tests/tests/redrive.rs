//! Dead-letter redrive against the real binaries: a command that could not be applied (its order
//! did not exist yet) is redriven once the order exists and takes effect with its original id;
//! a redrive that still fails keeps the dead letter; a discarded one is never applied; both are
//! recorded and answered once.

use event_toolkit::Backend;
use saga_e2e::invariants::{check, wait_quiet};
use saga_e2e::{Service, System, SystemConfig, WAIT};
use serde_json::{json, Value};

use event_toolkit::on_both_backends as on_backends;

on_backends!(
    a_dead_letter_fixed_by_a_later_change_is_redriven_and_the_saga_completes,
    a_discarded_dead_letter_is_recorded_and_never_applied,
);

/// `POST /admin/dead-letters/{id}/retry` (or `DELETE /admin/dead-letters/{id}`): status, body.
async fn admin(s: &System, method: &str, path: &str) -> (u16, Value) {
    let r = s
        .http
        .request(
            method.parse().expect("method"),
            format!("{}{path}", s.url(Service::Order)),
        )
        .send()
        .await
        .expect("admin call");
    let status = r.status().as_u16();
    if !r.status().is_success() {
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn dead_letter_for(s: &System, subject: &str) -> Value {
    saga_e2e::wait_for(WAIT, &format!("a dead letter on {subject}"), || async {
        s.dead_letters(Service::Order)
            .await
            .into_iter()
            .find(|d| d["subject"] == subject)
    })
    .await
}

async fn a_dead_letter_fixed_by_a_later_change_is_redriven_and_the_saga_completes(b: Backend) {
    let mut s = System::start(SystemConfig::new(b)).await;
    s.set_stock("WIDGET", 10).await;
    s.set_balance("alice", 10_000).await;
    // Payment down: once placed, the order waits RESERVED, so the redriven cancel decides it.
    s.kill(Service::Payment);
    let id = uuid::Uuid::now_v7().to_string();

    // A cancel command for an order that does not exist yet: dead-lettered, with its reason.
    s.nats_pub(
        "cmd.orders.cancel.v1",
        &[("Nats-Msg-Id", "cancel-early-1")],
        json!({ "order_id": id }).to_string().as_bytes(),
    )
    .await;
    let dead = dead_letter_for(&s, "cmd.orders.cancel.v1").await;
    let dl = dead["id"].as_i64().expect("dead letter id");
    assert!(
        dead["reason"].as_str().unwrap_or("").contains("no order"),
        "{dead}"
    );

    // Redriven too early it still fails, and stays a dead letter.
    let (code, problem) = admin(&s, "POST", &format!("/admin/dead-letters/{dl}/retry")).await;
    assert_eq!(code, 422, "{problem}");
    assert!(s
        .dead_letters(Service::Order)
        .await
        .iter()
        .any(|d| d["id"] == dl));

    // The order arrives (placed by command), is reserved, and waits for payment.
    s.nats_pub(
        "cmd.orders.place.v1",
        &[("Nats-Msg-Id", "place-late-1")],
        json!({ "order_id": id, "customer_id": "alice", "currency": "EUR",
            "items": [{ "sku": "WIDGET", "quantity": 2, "unit_price_minor": 100 }] })
        .to_string()
        .as_bytes(),
    )
    .await;
    s.wait_status(&id, &["RESERVED"]).await;
    s.record_accepted(&id);

    // Now the redrive applies it, once.
    let (code, body) = admin(&s, "POST", &format!("/admin/dead-letters/{dl}/retry")).await;
    assert_eq!(
        (code, body["outcome"].as_str()),
        (200, Some("applied")),
        "{body}"
    );
    let o = s.wait_terminal(&id).await;
    assert_eq!(
        (o["status"].as_str(), o["reason"].as_str()),
        (Some("CANCELLED"), Some("customer_cancelled")),
        "{o}"
    );
    let (code, problem) = admin(&s, "POST", &format!("/admin/dead-letters/{dl}/retry")).await;
    assert_eq!(
        code, 409,
        "a resolved dead letter is not redriven twice: {problem}"
    );

    // The compensation runs as for any cancellation: released, never charged.
    s.restart(Service::Payment).await;
    wait_quiet(&s, WAIT).await;
    assert_eq!(s.product("WIDGET").await["available"], 10);
    assert_eq!(s.balance("alice").await, 10_000);
    assert!(s
        .payments(&id)
        .await
        .iter()
        .all(|p| p["status"] != "CAPTURED"));
    check(&s).await.assert_clean();
}

async fn a_discarded_dead_letter_is_recorded_and_never_applied(b: Backend) {
    let s = System::start(SystemConfig::new(b)).await;
    s.set_stock("WIDGET", 10).await;
    s.set_balance("alice", 10_000).await;
    let id = s.place_order("alice", &[("WIDGET", 1, 100)]).await;
    assert_eq!(s.wait_terminal(&id).await["status"], "CONFIRMED");
    s.nats_pub("cmd.orders.place.v1", &[], b"not json").await;
    let dead = dead_letter_for(&s, "cmd.orders.place.v1").await;
    let dl = dead["id"].as_i64().expect("id");

    let (code, _) = admin(&s, "DELETE", &format!("/admin/dead-letters/{dl}")).await;
    assert_eq!(code, 204);
    let (code, problem) = admin(&s, "DELETE", &format!("/admin/dead-letters/{dl}")).await;
    assert_eq!(code, 409, "{problem}");
    let (code, problem) = admin(&s, "POST", &format!("/admin/dead-letters/{dl}/retry")).await;
    assert_eq!(code, 409, "discarded is final: {problem}");
    let (code, _) = admin(&s, "POST", "/admin/dead-letters/999999/retry").await;
    assert_eq!(code, 404);
    // Redrive is an admin route like the others.
    let r = reqwest::Client::new()
        .post(format!(
            "{}/admin/dead-letters/{dl}/retry",
            s.url(Service::Order)
        ))
        .send()
        .await
        .expect("anonymous");
    assert_eq!(r.status(), 401);
    wait_quiet(&s, WAIT).await;
    check(&s).await.assert_clean();
}
