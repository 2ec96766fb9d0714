//! Each recipe of the README's "Drive it with the nats CLI" section, run as the people's NATS user
//! `cli` under the project's `nats.conf`, sent exactly as the nats CLI sends it (`nats pub`: a core
//! message, body, optional headers, no reply subject), with its documented outcome. On SQLite and
//! on Postgres.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy};
use event_toolkit::Backend;
use futures::StreamExt;
use saga_e2e::invariants::{check, wait_quiet};
use saga_e2e::{wait_for, wait_for_mirrors, Service, System, SystemConfig, WAIT};
use serde_json::json;

use event_toolkit::on_backends;

on_backends! {
    sqlite: [
        start_a_saga_by_command_even_while_the_order_service_is_down_and_only_once,
        cancel_by_command,
        a_confirmed_order_is_not_cancelled_by_command,
        a_domain_event_published_by_hand_is_refused,
        watch_the_events_of_a_saga,
        a_bad_command_lands_in_dead_letters_with_its_reason,
        read_the_streams_and_the_durables,
    ],
    postgres: [
        start_a_saga_by_command_even_while_the_order_service_is_down_and_only_once,
        cancel_by_command,
        a_confirmed_order_is_not_cancelled_by_command,
        a_domain_event_published_by_hand_is_refused,
        watch_the_events_of_a_saga,
        a_bad_command_lands_in_dead_letters_with_its_reason,
        read_the_streams_and_the_durables,
    ],
}

/// How long a message that was going to land in a stream has had to land.
const LANDING_TIME: Duration = Duration::from_millis(500);

async fn system(backend: Backend) -> System {
    let mut config = SystemConfig::new(backend);
    config.project_users = true;
    let s = System::start(config).await;
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

/// Messages in one of the services' streams, read through the people's read-only window on them.
async fn messages_in(s: &System, stream: &str) -> u64 {
    s.services_js()
        .get_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("{stream}: {e}"))
        .get_info()
        .await
        .unwrap_or_else(|e| panic!("{stream} info: {e}"))
        .state
        .messages
}

async fn start_a_saga_by_command_even_while_the_order_service_is_down_and_only_once(
    backend: Backend,
) {
    let mut s = system(backend).await;
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
    wait_for(WAIT, "the command in ORDER_COMMANDS", || async {
        (messages_in(&s, "ORDER_COMMANDS").await > 0).then_some(())
    })
    .await;
    tokio::time::sleep(LANDING_TIME).await;
    assert_eq!(
        messages_in(&s, "ORDER_COMMANDS").await,
        1,
        "durable, and deduplicated"
    );
    // nats stream get ORDER_COMMANDS 1: the command as sent, header and all.
    wait_for_mirrors(&s.client).await;
    let kept = s.stream_messages("ORDER_COMMANDS").await;
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].2.as_deref(), Some("cmd-0001"));
    s.record_accepted(ORDER_ID);

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
    let orders = s.get_json(Service::Order, "/orders").await;
    let orders = orders.get("items").unwrap_or(&orders);
    assert_eq!(orders.as_array().map(Vec::len), Some(1), "{orders}");
    assert_eq!(s.product("WIDGET").await["sold"], 1, "one saga");
    assert_eq!(s.balance("alice").await, 100_000 - 1250);
    wait_for_mirrors(&s.client).await;
    check(&s).await.assert_clean();
}

async fn cancel_by_command(backend: Backend) {
    let mut s = system(backend).await;
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
    wait_for(WAIT, "stock released", || async {
        (s.product("WIDGET").await["available"] == 100).then_some(())
    })
    .await;
    // The payment service, back, sees the reservation and the cancellation: no net charge.
    s.restart(Service::Payment).await;
    wait_quiet(&s, WAIT).await;
    assert_eq!(s.product("WIDGET").await["available"], 100);
    assert_eq!(s.balance("alice").await, 100_000);
    wait_for_mirrors(&s.client).await;
    check(&s).await.assert_clean();
}

async fn a_confirmed_order_is_not_cancelled_by_command(backend: Backend) {
    let s = system(backend).await;
    let id = s.place_order("alice", &[("WIDGET", 2, 100)]).await;
    assert_eq!(s.wait_terminal(&id).await["status"], "CONFIRMED");
    let orders_before = messages_in(&s, "ORDERS").await;
    // nats pub cmd.orders.cancel.v1 '{"order_id":"<id>"}'
    s.nats_pub(
        "cmd.orders.cancel.v1",
        &[],
        json!({ "order_id": id }).to_string().as_bytes(),
    )
    .await;
    wait_for(WAIT, "the command to be taken", || async {
        let info = s
            .services_js()
            .get_consumer_from_stream::<pull::Config, _, _>("order-commands", "ORDER_COMMANDS")
            .await
            .ok()?
            .get_info()
            .await
            .ok()?;
        (info.ack_floor.stream_sequence == 1).then_some(())
    })
    .await;
    wait_quiet(&s, WAIT).await;
    // The order service refused it: nothing announced, nothing refunded.
    assert_eq!(s.order(&id).await["status"], "CONFIRMED");
    assert_eq!(messages_in(&s, "ORDERS").await, orders_before);
    assert_eq!(s.balance("alice").await, 100_000 - 200);
    assert_eq!(s.product("WIDGET").await["sold"], 2);
    wait_for_mirrors(&s.client).await;
    check(&s).await.assert_clean();
}

async fn a_domain_event_published_by_hand_is_refused(backend: Backend) {
    let mut s = system(backend).await;
    s.kill(Service::Payment);
    let id = s.place_order("alice", &[("WIDGET", 3, 100)]).await;
    s.wait_status(&id, &["RESERVED"]).await;
    let before = (
        messages_in(&s, "ORDERS").await,
        messages_in(&s, "PAYMENTS").await,
    );
    // nats pub payments.failed.v1 '{"order_id":"<id>","reason":"payment_declined"}': a
    // permissions violation; only payment-service announces payment outcomes.
    s.nats_pub(
        "payments.failed.v1",
        &[],
        json!({ "order_id": id, "reason": "payment_declined" })
            .to_string()
            .as_bytes(),
    )
    .await;
    s.nats_pub(
        "orders.cancelled.v1",
        &[],
        json!({ "order_id": id, "reason": "customer_cancelled" })
            .to_string()
            .as_bytes(),
    )
    .await;
    tokio::time::sleep(LANDING_TIME).await;
    assert_eq!(
        (
            messages_in(&s, "ORDERS").await,
            messages_in(&s, "PAYMENTS").await
        ),
        before
    );
    assert_eq!(s.order(&id).await["status"], "RESERVED");
    // The saga goes on as if nothing had been sent.
    s.restart(Service::Payment).await;
    assert_eq!(s.wait_terminal(&id).await["status"], "CONFIRMED");
    wait_quiet(&s, WAIT).await;
    assert_eq!(s.balance("alice").await, 100_000 - 300);
    wait_for_mirrors(&s.client).await;
    check(&s).await.assert_clean();
}

async fn watch_the_events_of_a_saga(backend: Backend) {
    let s = system(backend).await;
    // nats sub 'orders.>' (and inventory.>, payments.>)
    let mut subs = Vec::new();
    for subject in ["orders.>", "inventory.>", "payments.>"] {
        subs.push(s.client.subscribe(subject).await.unwrap());
    }
    let mut sub = futures::stream::select_all(subs);
    // A round trip on the same connection: the server has the subscriptions before the saga
    // starts (a flush only writes them out).
    jetstream::new(s.client.clone())
        .query_account()
        .await
        .expect("$JS.API.INFO");
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

async fn a_bad_command_lands_in_dead_letters_with_its_reason(backend: Backend) {
    let s = system(backend).await;
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
        let page = s
            .get_json(Service::Order, "/admin/dead-letters?limit=1000")
            .await;
        // A list, or a page of one.
        let l = page.get("items").unwrap_or(&page).as_array()?.clone();
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

/// `nats stream ls`, `nats stream info ORDERS`, `nats stream get ORDERS 1`, `nats stream view
/// ORDERS`, `nats consumer info INVENTORY order-from-inventory`.
async fn read_the_streams_and_the_durables(backend: Backend) {
    let s = system(backend).await;
    let id = s.place_order("alice", &[("WIDGET", 1, 100)]).await;
    assert_eq!(s.wait_terminal(&id).await["status"], "CONFIRMED");
    wait_quiet(&s, WAIT).await;
    wait_for_mirrors(&s.client).await;
    let js = jetstream::new(s.client.clone());

    // nats stream ls
    let names: BTreeSet<String> = js
        .stream_names()
        .map(|n| n.expect("stream name"))
        .collect()
        .await;
    assert_eq!(
        names,
        BTreeSet::from(["INVENTORY", "ORDERS", "ORDER_COMMANDS", "PAYMENTS"].map(String::from))
    );

    // nats stream info ORDERS: the people's read-only mirror, level with the services' ORDERS.
    let orders = js.get_stream("ORDERS").await.expect("stream info");
    let info = orders.get_info().await.expect("stream info");
    assert_eq!(
        info.config.mirror.as_ref().map(|m| m.name.as_str()),
        Some("ORDERS")
    );
    assert_eq!(info.state.messages, 2, "placed and confirmed");

    // nats stream get ORDERS 1
    let first = orders.get_raw_message(1).await.expect("stream get");
    assert_eq!(first.subject.as_str(), "orders.placed.v1");

    // nats stream view ORDERS: a pager consumer of its own, pulled, acked, deleted.
    let pager = orders
        .create_consumer(pull::Config {
            durable_name: Some("stream_pager_1".into()),
            filter_subject: ">".into(),
            ack_policy: AckPolicy::Explicit,
            inactive_threshold: Duration::from_secs(3600),
            memory_storage: true,
            ..Default::default()
        })
        .await
        .expect("pager");
    let page: Vec<String> = pager
        .fetch()
        .max_messages(25)
        .messages()
        .await
        .expect("page")
        .map(|m| {
            let m = m.expect("message");
            m.subject.to_string()
        })
        .collect()
        .await;
    assert_eq!(page, ["orders.placed.v1", "orders.confirmed.v1"]);
    orders
        .delete_consumer("stream_pager_1")
        .await
        .expect("pager deleted");

    // nats consumer info INVENTORY order-from-inventory: the order service's durable, caught up.
    let durable = js
        .get_consumer_from_stream::<pull::Config, _, _>("order-from-inventory", "INVENTORY")
        .await
        .expect("consumer info")
        .cached_info()
        .clone();
    assert_eq!((durable.num_pending, durable.num_ack_pending), (0, 0));
    check(&s).await.assert_clean();
}
