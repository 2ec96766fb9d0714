//! Each recipe of the README's "Drive it with the nats CLI" section, sent exactly as `nats pub`
//! sends it (a core message: body, optional headers, no reply subject), with its documented outcome.

use event_toolkit::Backend;
use futures::StreamExt;
use saga_e2e::invariants::{check, wait_quiet};
use saga_e2e::{wait_for, Service, System, SystemConfig, WAIT};
use serde_json::json;

async fn system() -> System {
    let s = System::start(SystemConfig::new(Backend::Sqlite)).await;
    s.set_stock("WIDGET", 100).await;
    s.set_balance("alice", 100_000).await;
    s
}

const ORDER_ID: &str = "0190a5b2-7c3d-7e4f-8a9b-0c1d2e3f4a5b";

fn place_command() -> String {
    json!({
        "order_id": ORDER_ID, "customer_id": "alice", "currency": "EUR",
        "items": [{ "sku": "WIDGET", "quantity": 1, "unit_price_minor": 1250 }]
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_a_saga_by_command_even_while_the_order_service_is_down_and_only_once() {
    let mut s = system().await;
    s.kill(Service::Order);
    // nats pub cmd.orders.place.v1 -H Nats-Msg-Id:cmd-0001 '{...}'
    s.nats_pub(
        "cmd.orders.place.v1",
        &[("Nats-Msg-Id", "cmd-0001")],
        place_command().as_bytes(),
    )
    .await;
    // The same again: dropped by the stream's duplicate window.
    s.nats_pub(
        "cmd.orders.place.v1",
        &[("Nats-Msg-Id", "cmd-0001")],
        place_command().as_bytes(),
    )
    .await;
    assert_eq!(
        s.stream_messages("ORDER_COMMANDS").await.len(),
        1,
        "durable, and deduplicated"
    );
    s.restart(Service::Order).await;
    assert_eq!(s.wait_terminal(ORDER_ID).await["status"], "CONFIRMED");
    // Re-sent with another message id: the order id makes it a no-op.
    s.nats_pub(
        "cmd.orders.place.v1",
        &[("Nats-Msg-Id", "cmd-0002")],
        place_command().as_bytes(),
    )
    .await;
    wait_quiet(&s, WAIT).await;
    assert_eq!(
        s.get_json(Service::Order, "/orders")
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(s.product("WIDGET").await["sold"], 1, "one saga");
    assert_eq!(s.balance("alice").await, 100_000 - 1250);
    check(&s).await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_by_command() {
    let mut s = system().await;
    s.kill(Service::Payment);
    let id = s.place_order("alice", &[("WIDGET", 2, 100)]).await;
    s.wait_status(&id, &["RESERVED"]).await;
    // nats pub cmd.orders.cancel.v1 '{"order_id":"<id>"}'
    s.nats_pub(
        "cmd.orders.cancel.v1",
        &[],
        json!({ "order_id": id }).to_string().as_bytes(),
    )
    .await;
    let o = s.wait_terminal(&id).await;
    assert_eq!(
        (o["status"].as_str(), o["reason"].as_str()),
        (Some("CANCELLED"), Some("customer_cancelled"))
    );
    s.restart(Service::Payment).await;
    wait_quiet(&s, WAIT).await;
    assert_eq!(s.product("WIDGET").await["available"], 100);
    assert_eq!(s.balance("alice").await, 100_000);
    check(&s).await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inject_a_payment_failure() {
    let mut s = system().await;
    s.kill(Service::Payment);
    let id = s.place_order("alice", &[("WIDGET", 3, 100)]).await;
    s.wait_status(&id, &["RESERVED"]).await;
    // nats pub payments.failed.v1 '{"order_id":"<id>","reason":"payment_declined"}'
    s.nats_pub(
        "payments.failed.v1",
        &[],
        json!({ "order_id": id, "reason": "payment_declined" })
            .to_string()
            .as_bytes(),
    )
    .await;
    let o = s.wait_terminal(&id).await;
    assert_eq!(
        (o["status"].as_str(), o["reason"].as_str()),
        (Some("CANCELLED"), Some("payment_declined"))
    );
    wait_for(WAIT, "stock released", || async {
        (s.product("WIDGET").await["available"] == 100).then_some(())
    })
    .await;
    // The payment service, back, sees the reservation and the cancellation: no net charge.
    s.restart(Service::Payment).await;
    wait_quiet(&s, WAIT).await;
    assert_eq!(s.balance("alice").await, 100_000);
    check(&s).await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_the_events_of_a_saga() {
    let s = system().await;
    // nats sub 'orders.>' (and inventory.>, payments.>)
    let mut subs = Vec::new();
    for subject in ["orders.>", "inventory.>", "payments.>"] {
        subs.push(s.client.subscribe(subject).await.unwrap());
    }
    let mut sub = futures::stream::select_all(subs);
    s.client.flush().await.unwrap();
    let id = s.place_order("alice", &[("WIDGET", 1, 100)]).await;
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !seen.contains(&"inventory.committed.v1".to_owned()) {
        let msg = tokio::time::timeout_at(deadline, sub.next())
            .await
            .expect("events in time")
            .unwrap();
        if let Ok(e) = serde_json::from_slice::<event_toolkit::Envelope>(&msg.payload) {
            if e.correlationid.as_deref() == Some(id.as_str()) {
                assert_eq!(
                    msg.subject.as_str(),
                    e.event_type,
                    "the subject is the type"
                );
                seen.push(e.event_type);
            }
        }
    }
    assert_eq!(
        seen,
        [
            "orders.placed.v1",
            "inventory.reserved.v1",
            "payments.succeeded.v1",
            "orders.confirmed.v1",
            "inventory.committed.v1"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_command_lands_in_dead_letters_with_its_reason() {
    let s = system().await;
    // nats pub cmd.orders.place.v1 'not json'
    s.nats_pub("cmd.orders.place.v1", &[], b"not json").await;
    // nats pub cmd.orders.place.v1 '{"customer_id":"alice","currency":"EUR","items":[]}'
    s.nats_pub(
        "cmd.orders.place.v1",
        &[],
        br#"{"customer_id":"alice","currency":"EUR","items":[]}"#,
    )
    .await;
    // curl localhost:8081/admin/dead-letters
    let letters = wait_for(WAIT, "two dead letters", || async {
        let l = s.dead_letters(Service::Order).await;
        (l.len() == 2).then_some(l)
    })
    .await;
    let reasons: Vec<&str> = letters
        .iter()
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("not JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("items must not be empty")),
        "{reasons:?}"
    );
    assert!(letters.iter().any(|l| l["payload"] == "not json"));
    // The consumer goes on.
    s.nats_pub("cmd.orders.place.v1", &[], place_command().as_bytes())
        .await;
    assert_eq!(s.wait_terminal(ORDER_ID).await["status"], "CONFIRMED");
}
