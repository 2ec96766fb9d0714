//! Inventory's handlers over a real database: given stock and earlier saga events, when an event
//! arrives, then what is announced and how stock, reservations and the order's state moved.

use event_toolkit::scenario::{event, Scenario};
use event_toolkit::{on_both_backends, Backend, Envelope, EventPayload};
use inventory_service::events::{
    OrderCancelled, OrderConfirmed, OrderPlaced, PaymentFailed, StockCommitted, StockLine,
    StockRejected, StockReleased, StockReserved,
};
use inventory_service::store::{self, Product};

async fn scenario(backend: Backend) -> Scenario {
    let s = Scenario::new(backend, inventory_service::handlers::subscriptions())
        .await
        .with_source("/inventory-service");
    s.db().migrate(sqlx::migrate!()).await.expect("migrate");
    s
}

/// Set each SKU's available stock, as `PUT /products/{sku}` does.
async fn stock(s: &mut Scenario, levels: &[(&str, i64)]) {
    s.given_state(async |conn| {
        for (sku, n) in levels {
            store::set_available(conn, sku, *n)
                .await
                .expect("set stock");
        }
    })
    .await;
}

async fn product(s: &Scenario, sku: &str) -> (i64, i64, i64) {
    let Product {
        available,
        reserved,
        sold,
        ..
    } = store::get_product(s.db().pool(), sku)
        .await
        .unwrap()
        .expect("product");
    (available, reserved, sold)
}

async fn order_state(s: &Scenario, order_id: &str) -> String {
    s.scalar(&format!(
        "SELECT state FROM order_states WHERE order_id = '{order_id}'"
    ))
    .await
}

fn line(sku: &str, quantity: i64) -> StockLine {
    StockLine {
        sku: sku.into(),
        quantity,
    }
}

fn placed(order_id: &str, items: Vec<StockLine>) -> Envelope {
    event(&OrderPlaced {
        order_id: order_id.into(),
        customer_id: "alice".into(),
        currency: "EUR".into(),
        total_minor: 1250,
        items,
    })
}

fn cancelled(order_id: &str) -> Envelope {
    event(&OrderCancelled {
        order_id: order_id.into(),
    })
}

async fn ledger_holds(s: &Scenario) {
    assert_eq!(
        store::ledger_violations(s.db().pool()).await.unwrap(),
        Vec::<String>::new()
    );
}

async fn a_placement_reserves_every_line(b: Backend) {
    let mut s = scenario(b).await;
    stock(&mut s, &[("apple", 5), ("pear", 2)]).await;
    let when = placed(
        "o-1",
        vec![line("pear", 1), line("apple", 2), line("apple", 1)],
    );

    let then = s.when(&when).await;

    then.then_emits(&[StockReserved::TYPE]).then_caused_by_it();
    assert_eq!(
        then.then_emitted_one::<StockReserved>(),
        StockReserved {
            order_id: "o-1".into(),
            customer_id: "alice".into(),
            total_minor: 1250,
            currency: "EUR".into(),
            // Merged per SKU, in SKU order.
            items: vec![line("apple", 3), line("pear", 1)],
        }
    );
    let reserved = then.then_envelope(StockReserved::TYPE);
    assert_eq!(reserved.correlationid.as_deref(), Some("o-1"));
    assert_eq!(reserved.source, "/inventory-service");
    assert_eq!(product(&s, "apple").await, (2, 3, 0));
    assert_eq!(product(&s, "pear").await, (1, 1, 0));
    assert_eq!(order_state(&s, "o-1").await, "RESERVED");
    assert_eq!(
        s.count("FROM reservations WHERE order_id = 'o-1' AND status = 'RESERVED'")
            .await,
        2
    );
    ledger_holds(&s).await;
}

async fn a_short_line_rejects_the_whole_order(b: Backend) {
    let mut s = scenario(b).await;
    stock(&mut s, &[("apple", 5), ("pear", 1)]).await;

    let then = s
        .when(&placed("o-1", vec![line("apple", 2), line("pear", 2)]))
        .await;

    then.then_emits(&[StockRejected::TYPE]).then_caused_by_it();
    assert_eq!(
        then.then_emitted_one::<StockRejected>(),
        StockRejected {
            order_id: "o-1".into(),
            reason: "insufficient_stock".into(),
            sku: "pear".into(),
        }
    );
    // All or nothing: the line that fitted holds nothing either.
    assert_eq!(product(&s, "apple").await, (5, 0, 0));
    assert_eq!(product(&s, "pear").await, (1, 0, 0));
    assert_eq!(s.count("FROM reservations").await, 0);
    assert_eq!(order_state(&s, "o-1").await, "REJECTED");

    // Nothing was held, so nothing is released or committed later.
    s.when(&cancelled("o-1")).await.then_emits(&[]);
    s.when(&event(&OrderConfirmed {
        order_id: "o-1".into(),
    }))
    .await
    .then_emits(&[]);
    assert_eq!(product(&s, "apple").await, (5, 0, 0));
}

async fn an_unknown_sku_is_rejected_not_dead_lettered(b: Backend) {
    let mut s = scenario(b).await;
    stock(&mut s, &[("apple", 1)]).await;

    // The unknown SKU is named even though another line is short too.
    let then = s
        .when(&placed("o-1", vec![line("apple", 9), line("ghost", 1)]))
        .await;

    then.then_emits(&[StockRejected::TYPE]);
    let rejected = then.then_emitted_one::<StockRejected>();
    assert_eq!(
        (rejected.reason.as_str(), rejected.sku.as_str()),
        ("unknown_sku", "ghost")
    );
    assert_eq!(product(&s, "apple").await, (1, 0, 0));
}

async fn a_cancellation_before_the_placement_reserves_nothing(b: Backend) {
    let mut s = scenario(b).await;
    stock(&mut s, &[("apple", 5)]).await;
    s.when(&cancelled("o-1")).await.then_emits(&[]);
    assert_eq!(order_state(&s, "o-1").await, "CANCELLED_EARLY");

    s.when(&placed("o-1", vec![line("apple", 2)]))
        .await
        .then_emits(&[]);

    assert_eq!(product(&s, "apple").await, (5, 0, 0));
    assert_eq!(s.count("FROM reservations").await, 0);
    assert_eq!(order_state(&s, "o-1").await, "CANCELLED_EARLY");
}

async fn a_confirmation_commits_the_reservation(b: Backend) {
    let mut s = scenario(b).await;
    stock(&mut s, &[("apple", 5)]).await;
    s.given([placed("o-1", vec![line("apple", 2)])]).await;

    let confirmed = event(&OrderConfirmed {
        order_id: "o-1".into(),
    });
    let then = s.when(&confirmed).await;

    then.then_emits(&[StockCommitted::TYPE]).then_caused_by_it();
    assert_eq!(
        then.then_emitted_one::<StockCommitted>(),
        StockCommitted {
            order_id: "o-1".into(),
            items: vec![line("apple", 2)],
        }
    );
    assert_eq!(product(&s, "apple").await, (3, 0, 2));
    assert_eq!(order_state(&s, "o-1").await, "COMMITTED");
    assert_eq!(
        s.count("FROM reservations WHERE status = 'COMMITTED'")
            .await,
        1
    );

    // Sold stays sold: a late cancellation gives nothing back (payment refunds the money).
    s.when(&cancelled("o-1")).await.then_emits(&[]);
    assert_eq!(product(&s, "apple").await, (3, 0, 2));
    ledger_holds(&s).await;
}

async fn a_failed_payment_releases_the_reservation_once(b: Backend) {
    let mut s = scenario(b).await;
    stock(&mut s, &[("apple", 5), ("pear", 3)]).await;
    s.given([placed("o-1", vec![line("apple", 2), line("pear", 3)])])
        .await;
    assert_eq!(product(&s, "pear").await, (0, 3, 0));

    let failed = event(&PaymentFailed {
        order_id: "o-1".into(),
    });
    let then = s.when(&failed).await;

    then.then_emits(&[StockReleased::TYPE]).then_caused_by_it();
    assert_eq!(
        then.then_emitted_one::<StockReleased>().items,
        vec![line("apple", 2), line("pear", 3)]
    );
    assert_eq!(product(&s, "apple").await, (5, 0, 0));
    assert_eq!(product(&s, "pear").await, (3, 0, 0));
    assert_eq!(order_state(&s, "o-1").await, "RELEASED");

    // The order's own cancellation follows the payment's failure: released already.
    s.when(&cancelled("o-1")).await.then_emits(&[]);
    assert_eq!(product(&s, "apple").await, (5, 0, 0));
    ledger_holds(&s).await;
}

async fn a_duplicate_placement_reserves_once(b: Backend) {
    let mut s = scenario(b).await;
    stock(&mut s, &[("apple", 5)]).await;
    let first = placed("o-1", vec![line("apple", 2)]);

    // The same message redelivered: the inbox skips it.
    s.when_twice(&first)
        .await
        .then_emits(&[StockReserved::TYPE])
        .then_applied_once();
    // The same placement under another event id (published again): the order's state skips it.
    s.when(&placed("o-1", vec![line("apple", 2)]))
        .await
        .then_emits(&[]);

    assert_eq!(product(&s, "apple").await, (3, 2, 0));
    assert_eq!(s.count("FROM inbox").await, 2);
}

async fn an_unknown_version_is_dead_lettered(b: Backend) {
    let mut s = scenario(b).await;
    stock(&mut s, &[("apple", 5)]).await;
    let mut v2 = placed("o-1", vec![line("apple", 2)]);
    v2.event_type = "orders.placed.v2".into();

    // The durable's filter takes every version so that this one is seen, not left unread.
    s.when(&v2)
        .await
        .then_dead_letters("unknown event type \"orders.placed.v2\"");

    assert_eq!(product(&s, "apple").await, (5, 0, 0));
    assert_eq!(s.count("FROM inbox").await, 0);
    assert_eq!(s.count("FROM order_states").await, 0);
}

async fn an_invalid_placement_is_dead_lettered_and_changes_nothing(b: Backend) {
    let mut s = scenario(b).await;
    stock(&mut s, &[("apple", 5)]).await;

    s.when(&placed("o-1", vec![line("apple", 0)]))
        .await
        .then_dead_letters("quantities must be between 1 and 1000000");
    s.when(&placed("o-2", vec![]))
        .await
        .then_dead_letters("no items");
    s.when(&placed("o-3", vec![line("not a sku", 1)]))
        .await
        .then_dead_letters("invalid sku");
    s.when(&placed(&"x".repeat(65), vec![line("apple", 1)]))
        .await
        .then_dead_letters("order_id must be 1-64 characters");

    assert_eq!(product(&s, "apple").await, (5, 0, 0));
    assert_eq!(s.count("FROM order_states").await, 0);
}

async fn a_payment_failure_is_read_from_its_own_durable(b: Backend) {
    let mut s = scenario(b).await;
    let then = s
        .when(&event(&PaymentFailed {
            order_id: "o-9".into(),
        }))
        .await;
    then.then_emits(&[]);
    let durables: Vec<&str> = then
        .deliveries()
        .iter()
        .map(|d| d.durable.as_str())
        .collect();
    assert_eq!(durables, ["inventory-from-payments"]);
    // Seen before its placement, the failure is remembered like a cancellation.
    assert_eq!(order_state(&s, "o-9").await, "CANCELLED_EARLY");
}

on_both_backends!(
    a_placement_reserves_every_line,
    a_short_line_rejects_the_whole_order,
    an_unknown_sku_is_rejected_not_dead_lettered,
    a_cancellation_before_the_placement_reserves_nothing,
    a_confirmation_commits_the_reservation,
    a_failed_payment_releases_the_reservation_once,
    a_duplicate_placement_reserves_once,
    an_unknown_version_is_dead_lettered,
    an_invalid_placement_is_dead_lettered_and_changes_nothing,
    a_payment_failure_is_read_from_its_own_durable,
);
