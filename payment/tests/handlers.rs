//! The payment service's handlers over a real database: given accounts, payments and earlier saga
//! events, when a reservation or a cancellation arrives, then what is announced and where the
//! payment and the money stand. The provider is asked later by the processor, never by a handler;
//! a capture is set up here through the store functions the processor uses.

use std::time::Duration;

use event_toolkit::scenario::{event, Scenario};
use event_toolkit::{on_both_backends, Backend, Envelope, EventPayload, OutboxWaker};
use payment_service::domain::{FailReason, ProviderAnswer};
use payment_service::events::{OrderCancelled, PaymentRefunded, PaymentSucceeded, StockReserved};
use payment_service::store::{self, HoldStep, Payment};

const SOURCE: &str = "/payment-service";

async fn scenario_waking(backend: Backend, processor: &OutboxWaker) -> Scenario {
    let s = Scenario::new(backend, payment_service::handlers::subscriptions(processor))
        .await
        .with_source(SOURCE);
    s.db().migrate(sqlx::migrate!()).await.expect("migrate");
    s
}

/// A scenario where alice holds 1000 EUR.
async fn scenario(backend: Backend) -> Scenario {
    let mut s = scenario_waking(backend, &OutboxWaker::default()).await;
    s.given_state(async |conn| {
        store::set_account(conn, "alice", 1000, "EUR")
            .await
            .expect("account")
    })
    .await;
    s
}

fn reserved(order_id: &str, total_minor: i64) -> Envelope {
    event(&StockReserved {
        order_id: order_id.into(),
        customer_id: "alice".into(),
        total_minor,
        currency: "EUR".into(),
    })
}

fn cancelled(order_id: &str) -> Envelope {
    event(&OrderCancelled {
        order_id: order_id.into(),
    })
}

async fn payments(s: &Scenario, order_id: &str) -> Vec<Payment> {
    store::payments_for(s.db().pool(), order_id, None, 10)
        .await
        .unwrap()
}

async fn the_payment(s: &Scenario, order_id: &str) -> Payment {
    let mut all = payments(s, order_id).await;
    assert_eq!(all.len(), 1, "payments of {order_id}");
    all.remove(0)
}

/// Alice's balance and the part of it held for payments the provider is asked about.
async fn balance(s: &Scenario) -> (i64, i64) {
    let held = s
        .scalar::<i64>("SELECT held_minor FROM accounts WHERE customer_id = 'alice'")
        .await;
    let balance = store::get_account(s.db().pool(), "alice")
        .await
        .unwrap()
        .expect("account")
        .balance_minor;
    (balance, held)
}

/// What the processor does once the provider approves: hold, then capture.
async fn captured_by_the_processor(s: &mut Scenario, order_id: &str) {
    s.given_state(async |conn| {
        let held = store::hold(conn, SOURCE, order_id, 0).await.unwrap();
        assert!(matches!(held, HoldStep::Held(_)), "{held:?}");
        let settled = store::settle(conn, SOURCE, order_id, ProviderAnswer::Approved, 0)
            .await
            .unwrap();
        assert_eq!(settled.outcome, Some(Ok(())));
    })
    .await;
}

async fn a_reservation_starts_a_pending_payment_and_wakes_the_processor(b: Backend) {
    let processor = OutboxWaker::default();
    let mut s = scenario_waking(b, &processor).await;
    let when = reserved("o-1", 250);

    // Nothing is announced yet: the processor asks the provider after the commit.
    s.when(&when).await.then_emits(&[]);

    let p = the_payment(&s, "o-1").await;
    assert_eq!(
        (
            p.status.as_str(),
            p.customer_id.as_str(),
            p.amount_minor,
            p.currency.as_str(),
            p.reason
        ),
        ("PENDING", "alice", 250, "EUR", None)
    );
    // What the processor needs to announce the outcome in this saga, caused by this reservation.
    let (correlation, cause): (Option<String>, Option<String>) = (
        s.scalar("SELECT correlation_id FROM payments WHERE order_id = 'o-1'")
            .await,
        s.scalar("SELECT cause_event_id FROM payments WHERE order_id = 'o-1'")
            .await,
    );
    assert_eq!(correlation.as_deref(), Some("o-1"));
    assert_eq!(cause, Some(when.id.clone()));
    tokio::time::timeout(Duration::from_secs(5), processor.woken())
        .await
        .expect("the processor is woken after the commit");
}

async fn a_reservation_starts_one_payment(b: Backend) {
    let mut s = scenario(b).await;

    s.when_twice(&reserved("o-1", 250))
        .await
        .then_emits(&[])
        .then_applied_once();
    // Published again under a new id (even with another amount): the order keeps its payment.
    s.when(&reserved("o-1", 999)).await.then_emits(&[]);

    let all = payments(&s, "o-1").await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].amount_minor, 250);
}

async fn a_cancellation_before_the_reservation_bars_the_payment(b: Backend) {
    let mut s = scenario(b).await;
    s.when(&cancelled("o-1")).await.then_emits(&[]);

    s.when(&reserved("o-1", 250)).await.then_emits(&[]);

    assert!(payments(&s, "o-1").await.is_empty());
    assert_eq!(
        s.scalar::<i64>("SELECT cancelled FROM order_flags WHERE order_id = 'o-1'")
            .await,
        1
    );
}

async fn a_cancellation_after_the_capture_refunds(b: Backend) {
    let mut s = scenario(b).await;
    let reservation = reserved("o-1", 250);
    s.given([reservation.clone()]).await;
    captured_by_the_processor(&mut s, "o-1").await;
    assert_eq!(balance(&s).await, (750, 0));
    // The processor's announcement belongs to the saga and is caused by the reservation.
    let succeeded: Vec<u8> = s
        .scalar("SELECT payload FROM outbox WHERE subject = 'payments.succeeded.v1'")
        .await;
    let succeeded: Envelope = serde_json::from_slice(&succeeded).unwrap();
    assert_eq!(
        succeeded.causationid.as_deref(),
        Some(reservation.id.as_str())
    );
    assert_eq!(succeeded.correlationid.as_deref(), Some("o-1"));
    assert_eq!(
        succeeded
            .payload::<PaymentSucceeded>()
            .unwrap()
            .amount_minor,
        250
    );

    let then = s.when(&cancelled("o-1")).await;

    then.then_emits(&[PaymentRefunded::TYPE])
        .then_caused_by_it();
    let payment = the_payment(&s, "o-1").await;
    assert_eq!(
        then.then_emitted_one::<PaymentRefunded>(),
        PaymentRefunded {
            order_id: "o-1".into(),
            payment_id: payment.payment_id.clone(),
            amount_minor: 250,
            currency: "EUR".into(),
        }
    );
    assert_eq!(payment.status, "REFUNDED");
    assert_eq!(balance(&s).await, (1000, 0));
    assert!(store::ledger_violations(s.db().pool())
        .await
        .unwrap()
        .is_empty());

    // Refunded once: the order's cancellation is not news twice.
    s.when(&cancelled("o-1")).await.then_emits(&[]);
    assert_eq!(balance(&s).await, (1000, 0));
}

async fn a_cancellation_voids_a_pending_payment(b: Backend) {
    let mut s = scenario(b).await;
    s.given([reserved("o-1", 250), reserved("o-2", 100)]).await;
    // o-2's amount is held: the provider may have been asked already.
    s.given_state(async |conn| store::hold(conn, SOURCE, "o-2", 0).await.unwrap())
        .await;
    assert_eq!(balance(&s).await, (1000, 100));

    // Nothing was taken, so nothing is announced; inventory releases on the cancellation itself.
    s.when(&cancelled("o-1")).await.then_emits(&[]);
    s.when(&cancelled("o-2")).await.then_emits(&[]);

    for order in ["o-1", "o-2"] {
        let p = the_payment(&s, order).await;
        assert_eq!(
            (p.status.as_str(), p.reason.as_deref()),
            ("FAILED", Some("order_cancelled")),
            "{order}"
        );
    }
    assert_eq!(balance(&s).await, (1000, 0));
    // Only the held one may be authorized at the provider: it is owed a void.
    let owed: Option<String> = s
        .scalar("SELECT provider_due FROM payments WHERE order_id = 'o-2'")
        .await;
    assert_eq!(owed.as_deref(), Some("void"));
    let not_owed: Option<String> = s
        .scalar("SELECT provider_due FROM payments WHERE order_id = 'o-1'")
        .await;
    assert_eq!(not_owed, None);
}

async fn invalid_reservations_are_dead_lettered(b: Backend) {
    let mut s = scenario(b).await;

    s.when(&reserved("o-1", -5))
        .await
        .then_dead_letters("total_minor must not be negative");
    s.when(&event(&StockReserved {
        order_id: "o-2".into(),
        customer_id: String::new(),
        total_minor: 5,
        currency: "EUR".into(),
    }))
    .await
    .then_dead_letters("order_id and customer_id are required");
    let mut v2 = reserved("o-3", 5);
    v2.event_type = "inventory.reserved.v2".into();
    s.when(&v2)
        .await
        .then_dead_letters("unknown event type \"inventory.reserved.v2\"");
    let mut no_total = reserved("o-4", 5);
    no_total.data.as_object_mut().unwrap().remove("total_minor");
    s.when(&no_total)
        .await
        .then_dead_letters("payload does not match inventory.reserved.v1");

    assert_eq!(s.count("FROM payments").await, 0);
    assert_eq!(s.count("FROM order_flags").await, 0);
}

/// The hold reads the payment and its customer's account together; a customer with no account
/// is refused there (declined, announced), and no account appears.
async fn a_customer_without_an_account_is_declined_at_the_hold(b: Backend) {
    let mut s = scenario(b).await;
    let mut when = reserved("o-1", 250);
    when.data["customer_id"] = "nobody".into();
    s.when(&when).await.then_emits(&[]);

    s.given_state(async |conn| {
        let step = store::hold(conn, SOURCE, "o-1", 0).await.unwrap();
        assert!(
            matches!(step, HoldStep::Refused(FailReason::PaymentDeclined)),
            "{step:?}"
        );
    })
    .await;
    let p = the_payment(&s, "o-1").await;
    assert_eq!(
        (p.status.as_str(), p.reason.as_deref()),
        ("FAILED", Some("payment_declined"))
    );
    assert_eq!(
        s.count("FROM accounts WHERE customer_id = 'nobody'").await,
        0
    );
    assert_eq!(
        s.count("FROM outbox WHERE subject = 'payments.failed.v1'")
            .await,
        1
    );
    assert_eq!(balance(&s).await, (1000, 0), "alice untouched");
}

on_both_backends!(
    a_customer_without_an_account_is_declined_at_the_hold,
    a_reservation_starts_a_pending_payment_and_wakes_the_processor,
    a_reservation_starts_one_payment,
    a_cancellation_before_the_reservation_bars_the_payment,
    a_cancellation_after_the_capture_refunds,
    a_cancellation_voids_a_pending_payment,
    invalid_reservations_are_dead_lettered,
);
