//! The services under the project's `nats.conf`: each connects as its own least-privilege user
//! (the test client as the people's user `cli`), sagas still complete, confirmed and compensated,
//! and what people try against a running saga to forge an event changes nothing.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::push, consumer::AckPolicy};
use event_toolkit::Backend;
use futures::StreamExt;
use saga_e2e::invariants::{check, wait_quiet};
use saga_e2e::{wait_for_mirrors, Service, System, SystemConfig, WAIT};
use serde_json::json;

use event_toolkit::on_backends;

on_backends! {
    sqlite: [
        each_service_runs_with_only_its_own_nats_user,
        people_cannot_forge_events_into_a_running_saga,
    ],
    postgres: [
        each_service_runs_with_only_its_own_nats_user,
        people_cannot_forge_events_into_a_running_saga,
    ],
}

async fn system(backend: Backend) -> System {
    let mut config = SystemConfig::new(backend);
    config.project_users = true;
    System::start(config).await
}

/// The services' streams' last sequences, read through the people's read-only window.
async fn last_sequences(s: &System) -> Vec<(&'static str, u64)> {
    let js = s.services_js();
    let mut out = Vec::new();
    for name in ["ORDERS", "INVENTORY", "PAYMENTS", "ORDER_COMMANDS"] {
        let info = js
            .get_stream(name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .get_info()
            .await
            .unwrap_or_else(|e| panic!("{name} info: {e}"));
        out.push((name, info.state.last_sequence));
    }
    out
}

async fn each_service_runs_with_only_its_own_nats_user(backend: Backend) {
    let s = system(backend).await;
    s.set_stock("WIDGET", 10).await;
    s.set_balance("alice", 1_000).await;
    s.set_balance("bob", 10).await;
    let ok = s.place_order("alice", &[("WIDGET", 2, 100)]).await;
    let poor = s.place_order("bob", &[("WIDGET", 1, 100)]).await;
    assert_eq!(s.wait_terminal(&ok).await["status"], "CONFIRMED");
    let o = s.wait_terminal(&poor).await;
    assert_eq!(
        (o["status"].as_str(), o["reason"].as_str()),
        (Some("CANCELLED"), Some("insufficient_funds"))
    );
    wait_quiet(&s, WAIT).await;
    wait_for_mirrors(&s.client).await;
    assert_eq!(s.product("WIDGET").await["sold"], 2);
    assert_eq!(s.balance("alice").await, 800);
    check(&s).await.assert_clean();
}

/// The forged-cancellation attack, and its side doors, against a confirmed order: had `orders.cancelled.v1`
/// reached ORDERS, payment would have refunded an order that stays CONFIRMED.
async fn people_cannot_forge_events_into_a_running_saga(backend: Backend) {
    let s = system(backend).await;
    s.set_stock("WIDGET", 10).await;
    s.set_balance("alice", 10_000).await;
    let id = s.place_order("alice", &[("WIDGET", 2, 100)]).await;
    assert_eq!(s.wait_terminal(&id).await["status"], "CONFIRMED");
    wait_quiet(&s, WAIT).await;
    wait_for_mirrors(&s.client).await;
    let before = last_sequences(&s).await;

    // nats pub orders.cancelled.v1 / payments.failed.v1: refused by the server.
    s.nats_pub(
        "orders.cancelled.v1",
        &[],
        json!({ "order_id": id, "reason": "customer_cancelled" })
            .to_string()
            .as_bytes(),
    )
    .await;
    s.nats_pub(
        "payments.failed.v1",
        &[],
        json!({ "order_id": id, "reason": "payment_declined" })
            .to_string()
            .as_bytes(),
    )
    .await;

    // A push consumer on each readable stream, delivering its events (this order's among them)
    // onto a domain subject people may listen to: delivered, but in the people's account.
    let js = jetstream::new(s.client.clone());
    let side_doors = [
        ("ORDERS", "orders.cancelled.v1"),
        ("INVENTORY", "inventory.released.v1"),
        ("PAYMENTS", "payments.failed.v1"),
        ("ORDER_COMMANDS", "orders.cancelled.v1"),
    ];
    let mut delivered = Vec::new();
    for (_, target) in side_doors {
        delivered.push(s.client.subscribe(target).await.expect("subscribe"));
    }
    let mut delivered = futures::stream::select_all(delivered);
    s.client.flush().await.expect("flush");
    for (stream, target) in side_doors {
        let name = format!("side-door-{}", stream.to_lowercase().replace('_', "-"));
        js.get_stream(stream)
            .await
            .unwrap_or_else(|e| panic!("the people's {stream}: {e}"))
            .create_consumer(push::Config {
                durable_name: Some(name),
                deliver_subject: target.to_owned(),
                ack_policy: AckPolicy::None,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("a consumer on the people's {stream}: {e}"));
    }
    tokio::time::timeout(WAIT, delivered.next())
        .await
        .expect("the side doors deliver")
        .expect("a delivery");

    // The manual compensation: a command, which the order service refuses for a confirmed order.
    // Its reply subject is a domain subject, where the command's ack would land were the command
    // a stream import rather than a service.
    s.client
        .publish_with_reply(
            "cmd.orders.cancel.v1",
            "orders.cancelled.v1",
            json!({ "order_id": id }).to_string().into(),
        )
        .await
        .expect("publish");
    s.client.flush().await.expect("flush");

    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_quiet(&s, WAIT).await;
    let mut expected = before.clone();
    expected[3].1 += 1;
    assert_eq!(
        last_sequences(&s).await,
        expected,
        "only the command reached the services' streams"
    );
    let o = s.order(&id).await;
    assert_eq!(o["status"], "CONFIRMED", "{o}");
    assert_eq!(s.balance("alice").await, 10_000 - 200, "no refund");
    let payments = s
        .get_json(Service::Payment, &format!("/payments?order_id={id}"))
        .await;
    // A list, or a page of one.
    let payments = payments.get("items").unwrap_or(&payments);
    assert_eq!(payments.as_array().map(Vec::len), Some(1), "{payments}");
    assert_eq!(payments[0]["status"], "CAPTURED", "{payments}");
    assert_eq!(s.product("WIDGET").await["sold"], 2);
    wait_for_mirrors(&s.client).await;
    check(&s).await.assert_clean();
}
