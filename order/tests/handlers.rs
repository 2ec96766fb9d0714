//! The order service's handlers over a real database: given an order (placed by command) and the
//! saga's earlier events, when a command or another service's outcome arrives, then what the
//! order announces and where its status stands.

use std::time::Duration;

use event_toolkit::scenario::{event, Outcome, Scenario};
use event_toolkit::{on_both_backends, Backend, Envelope, EventPayload};
use order_service::domain::{CancelReason, Line, LineInput, OrderStatus};
use order_service::events::{
    CancelOrder, OrderCancelled, OrderConfirmed, OrderPlaced, PaymentFailed, PaymentSucceeded,
    PlaceOrder, StockRejected, StockReserved,
};
use order_service::store::{self, Order};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);
const ORDER: &str = "0190a5f4-0000-7000-8000-000000000001";

async fn scenario(backend: Backend) -> Scenario {
    let s = Scenario::new(backend, order_service::handlers::subscriptions(DEADLINE))
        .await
        .with_source("/order-service");
    s.db().migrate(sqlx::migrate!()).await.expect("migrate");
    s
}

fn place(order_id: &str) -> Envelope {
    event(&PlaceOrder {
        order_id: Some(order_id.into()),
        customer_id: "alice".into(),
        currency: "EUR".into(),
        items: vec![LineInput {
            sku: "apple".into(),
            quantity: 2,
            unit_price_minor: 150,
        }],
    })
}

/// A scenario with order [`ORDER`] placed by command.
async fn placed(b: Backend) -> Scenario {
    let mut s = scenario(b).await;
    s.given([place(ORDER)]).await;
    s
}

async fn order(s: &Scenario, id: &str) -> Order {
    store::get(s.db().pool(), id)
        .await
        .unwrap()
        .expect("the order exists")
}

fn reserved() -> Envelope {
    event(&StockReserved {
        order_id: ORDER.into(),
    })
}

fn paid() -> Envelope {
    event(&PaymentSucceeded {
        order_id: ORDER.into(),
    })
}

fn customer_cancels() -> Envelope {
    event(&CancelOrder {
        order_id: ORDER.into(),
    })
}

async fn a_place_command_starts_the_saga(b: Backend) {
    let mut s = scenario(b).await;
    // As a person publishes it with `nats pub`: a bare body, no correlation of its own.
    let then = s
        .when_published(
            PlaceOrder::TYPE,
            &json!({
                "order_id": ORDER,
                "customer_id": "alice",
                "currency": "EUR",
                "items": [
                    {"sku": "apple", "quantity": 2, "unit_price_minor": 150},
                    {"sku": "pear", "quantity": 1, "unit_price_minor": 99}
                ]
            }),
        )
        .await;

    then.then_emits(&[OrderPlaced::TYPE]);
    let placed = then.then_emitted_one::<OrderPlaced>();
    assert_eq!(placed.order_id, ORDER);
    assert_eq!(placed.customer_id, "alice");
    assert_eq!(placed.total_minor, 2 * 150 + 99);
    assert_eq!(
        placed.items,
        vec![
            Line {
                sku: "apple".into(),
                quantity: 2,
                unit_price_minor: 150
            },
            Line {
                sku: "pear".into(),
                quantity: 1,
                unit_price_minor: 99
            }
        ]
    );
    let left = placed.deadline_at - chrono::Utc::now();
    assert!(
        left > chrono::Duration::seconds(20) && left <= chrono::Duration::seconds(30),
        "deadline {left} from now"
    );
    let env = then.then_envelope(OrderPlaced::TYPE);
    // The order id names the saga; the command is its cause.
    assert_eq!(env.correlationid.as_deref(), Some(ORDER));
    assert_eq!(env.subject.as_deref(), Some(ORDER));
    assert_eq!(env.causationid, then.cause().map(|c| c.id.clone()));
    assert_eq!(env.source, "/order-service");
    let stored = order(&s, ORDER).await;
    assert_eq!(
        (stored.status, stored.reason, stored.total_minor),
        (OrderStatus::Pending, None, 399)
    );
}

async fn a_command_without_an_id_gets_a_fresh_order(b: Backend) {
    let mut s = scenario(b).await;
    let then = s
        .when_published(
            PlaceOrder::TYPE,
            &json!({
                "customer_id": "bob",
                "currency": "EUR",
                "items": [{"sku": "apple", "quantity": 1, "unit_price_minor": 5}]
            }),
        )
        .await;

    then.then_emits(&[OrderPlaced::TYPE]);
    let id = then.then_emitted_one::<OrderPlaced>().order_id;
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    assert_eq!(
        then.then_envelope(OrderPlaced::TYPE)
            .correlationid
            .as_deref(),
        Some(id.as_str())
    );
    assert_eq!(order(&s, &id).await.customer_id, "bob");
}

async fn the_same_order_placed_again_is_placed_once(b: Backend) {
    let mut s = scenario(b).await;
    s.when_twice(&place(ORDER))
        .await
        .then_emits(&[OrderPlaced::TYPE])
        .then_applied_once();
    // Published again (a new message): the client-chosen id names the existing order.
    s.when(&place(ORDER)).await.then_emits(&[]);
    assert_eq!(s.count("FROM orders").await, 1);
}

async fn invalid_commands_are_dead_lettered(b: Backend) {
    let mut s = scenario(b).await;
    let mut body = json!({
        "order_id": ORDER,
        "customer_id": "alice",
        "currency": "euro",
        "items": [{"sku": "apple", "quantity": 1, "unit_price_minor": 5}]
    });
    s.when_published(PlaceOrder::TYPE, &body)
        .await
        .then_dead_letters("invalid order: currency must be three capital letters");
    body["currency"] = json!("EUR");
    body["order_id"] = json!("not-a-uuid");
    s.when_published(PlaceOrder::TYPE, &body)
        .await
        .then_dead_letters("invalid order_id");
    body["order_id"] = json!(ORDER);
    body["coupon"] = json!("FREE");
    s.when_published(PlaceOrder::TYPE, &body)
        .await
        .then_dead_letters("unknown field `coupon`");
    // The durable takes every command subject so a mistyped one is seen.
    s.when_published("cmd.orders.plcae.v1", &json!({"order_id": ORDER}))
        .await
        .then_dead_letters("unknown event type \"cmd.orders.plcae.v1\"");

    assert_eq!(s.count("FROM orders").await, 0);
}

async fn reserved_then_paid_confirms(b: Backend) {
    let mut s = placed(b).await;

    let (reserved, paid) = (reserved(), paid());
    s.when(&reserved).await.then_emits(&[]);
    assert_eq!(order(&s, ORDER).await.status, OrderStatus::Reserved);

    let then = s.when(&paid).await;
    then.then_emits(&[OrderConfirmed::TYPE]).then_caused_by_it();
    assert_eq!(
        then.then_emitted_one::<OrderConfirmed>(),
        OrderConfirmed {
            order_id: ORDER.into()
        }
    );
    assert_eq!(
        then.then_envelope(OrderConfirmed::TYPE)
            .correlationid
            .as_deref(),
        Some(ORDER)
    );
    assert_eq!(order(&s, ORDER).await.status, OrderStatus::Confirmed);
    // The order's timeline kept both outcomes, each once.
    assert_eq!(
        s.count(&format!(
            "FROM timeline_events WHERE order_id = '{ORDER}' AND event_id IN ('{}', '{}')",
            reserved.id, paid.id
        ))
        .await,
        2
    );
}

async fn a_stock_rejection_cancels_with_its_reason(b: Backend) {
    let mut s = placed(b).await;
    let rejected = event(&StockRejected {
        order_id: ORDER.into(),
        reason: "unknown_sku".into(),
    });

    let then = s.when(&rejected).await;

    then.then_emits(&[OrderCancelled::TYPE]).then_caused_by_it();
    assert_eq!(
        then.then_emitted_one::<OrderCancelled>(),
        OrderCancelled {
            order_id: ORDER.into(),
            reason: "unknown_sku".into()
        }
    );
    let stored = order(&s, ORDER).await;
    assert_eq!(
        (stored.status, stored.reason),
        (OrderStatus::Cancelled, Some(CancelReason::UnknownSku))
    );

    // News after the end changes nothing; payment compensates on its own.
    s.when(&paid()).await.then_emits(&[]);
    assert_eq!(order(&s, ORDER).await.status, OrderStatus::Cancelled);
}

async fn a_payment_failure_cancels_with_the_nearest_reason(b: Backend) {
    let mut s = placed(b).await;
    s.given([reserved()]).await;

    let then = s
        .when(&event(&PaymentFailed {
            order_id: ORDER.into(),
            reason: "card_stolen".into(),
        }))
        .await;

    // A reason this service does not know maps to its family rather than leaving the order open.
    then.then_emits(&[OrderCancelled::TYPE]).then_caused_by_it();
    assert_eq!(
        then.then_emitted_one::<OrderCancelled>().reason,
        "payment_declined"
    );
    assert_eq!(
        order(&s, ORDER).await.reason,
        Some(CancelReason::PaymentDeclined)
    );
}

async fn a_customer_cancels_an_open_order_once(b: Backend) {
    let mut s = placed(b).await;

    let then = s.when(&customer_cancels()).await;
    then.then_emits(&[OrderCancelled::TYPE]).then_caused_by_it();
    assert_eq!(
        then.then_emitted_one::<OrderCancelled>().reason,
        "customer_cancelled"
    );
    // Asking again is no news.
    s.when(&customer_cancels()).await.then_emits(&[]);
    assert_eq!(
        order(&s, ORDER).await.reason,
        Some(CancelReason::CustomerCancelled)
    );
}

async fn a_customer_cannot_cancel_a_confirmed_order(b: Backend) {
    let mut s = placed(b).await;
    s.given([reserved(), paid()]).await;

    s.when(&customer_cancels()).await.then_emits(&[]);

    let stored = order(&s, ORDER).await;
    assert_eq!(
        (stored.status, stored.reason),
        (OrderStatus::Confirmed, None)
    );
}

async fn a_duplicate_outcome_confirms_once(b: Backend) {
    let mut s = placed(b).await;
    s.given([reserved()]).await;

    let then = s.when_twice(&paid()).await;

    then.then_emits(&[OrderConfirmed::TYPE]).then_applied_once();
    // Every durable receiving it applied it, then skipped the redelivery.
    let mut by_durable = std::collections::BTreeMap::<&str, Vec<&Outcome>>::new();
    for d in then.deliveries() {
        by_durable.entry(&d.durable).or_default().push(&d.outcome);
    }
    assert!(by_durable.contains_key("order-from-payments"));
    for (durable, outcomes) in by_durable {
        assert_eq!(
            outcomes,
            [&Outcome::Applied, &Outcome::Duplicate],
            "{durable}"
        );
    }
    assert_eq!(order(&s, ORDER).await.status, OrderStatus::Confirmed);
}

async fn an_outcome_for_an_unknown_order_is_dead_lettered_by_the_saga(b: Backend) {
    let mut s = scenario(b).await;
    let then = s.when(&reserved()).await;

    // The saga cannot apply it; any other durable receiving it (a read model) is not held back.
    let saga = then
        .deliveries()
        .iter()
        .find(|d| d.durable == "order-from-inventory")
        .expect("the saga's durable receives it");
    assert!(
        matches!(&saga.outcome, Outcome::DeadLettered(r) if r.contains("no order")),
        "{:?}",
        saga.outcome
    );
    for d in then.deliveries() {
        if d.durable != saga.durable {
            assert_eq!(d.outcome, Outcome::Applied, "{}", d.durable);
        }
    }
    assert!(then.emitted().is_empty());
    assert_eq!(s.count("FROM orders").await, 0);
}

on_both_backends!(
    a_place_command_starts_the_saga,
    a_command_without_an_id_gets_a_fresh_order,
    the_same_order_placed_again_is_placed_once,
    invalid_commands_are_dead_lettered,
    reserved_then_paid_confirms,
    a_stock_rejection_cancels_with_its_reason,
    a_payment_failure_cancels_with_the_nearest_reason,
    a_customer_cancels_an_open_order_once,
    a_customer_cannot_cancel_a_confirmed_order,
    a_duplicate_outcome_confirms_once,
    an_outcome_for_an_unknown_order_is_dead_lettered_by_the_saga,
);
