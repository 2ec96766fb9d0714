//! Money at the provider, with the processor driven directly against a database and the simulated
//! provider's ledger: every approval ends captured or voided, and the provider is never asked to
//! approve what the account cannot pay beside the customer's other payments.

use std::sync::Arc;
use std::time::Duration;

use event_toolkit::testing::{eventually, TestDb};
use event_toolkit::{Backend, Context, Database, Envelope, OutboxWaker};
use payment_service::events::StockReserved;
use payment_service::gateway::{
    GatewayMode, ProviderLedger, ResilienceConfig, ResilientGateway, SimulatedGateway,
};
use payment_service::processor::Processor;
use payment_service::store;
use sqlx::Row;
use tokio_util::sync::CancellationToken;

macro_rules! on_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(event_toolkit::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(event_toolkit::Backend::Postgres).await })*
        }
    };
}

on_backends!(
    concurrent_payments_of_one_customer_get_one_approval_when_the_balance_covers_one,
    lost_answers_are_reconciled_by_key_then_captured_or_voided,
    an_authorization_nobody_could_confirm_is_voided_once_the_provider_is_back,
);

const WAIT: Duration = Duration::from_secs(30);

async fn database(backend: Backend) -> (TestDb, Database) {
    let testdb = TestDb::new(backend).await;
    let db = testdb.connect().await;
    db.migrate(sqlx::migrate!()).await.expect("migrate");
    (testdb, db)
}

fn processor(db: &Database, sim: &SimulatedGateway, config: ResilienceConfig) -> Processor {
    Processor {
        db: db.clone(),
        gateway: Arc::new(ResilientGateway::new(sim.clone(), config)),
        outbox: OutboxWaker::default(),
        wake: OutboxWaker::default(),
        source: "/payment-service".into(),
        concurrency: 64,
    }
}

async fn account(db: &Database, customer: &str, balance: i64) {
    let mut tx = db.begin().await.unwrap();
    store::set_account(&mut tx, customer, balance, "EUR")
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// A pending payment, as the reservation consumer creates it.
async fn pending(db: &Database, order_id: &str, customer: &str, amount: i64) {
    let reserved = StockReserved {
        order_id: order_id.into(),
        customer_id: customer.into(),
        total_minor: amount,
        currency: "EUR".into(),
    };
    let event = Envelope::new("/inventory-service", &reserved, Some(order_id.into()));
    let mut tx = db.begin().await.unwrap();
    assert!(
        store::on_stock_reserved(&mut tx, &Context::event("/test", &event), &reserved)
            .await
            .unwrap()
    );
    tx.commit().await.unwrap();
}

/// (status, reason, held, provider_due, provider_done) of an order's payment.
async fn payment(
    db: &Database,
    order_id: &str,
) -> (String, Option<String>, i64, Option<String>, Option<String>) {
    let r = sqlx::query(
        "SELECT status, reason, held, provider_due, provider_done FROM payments WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_one(db.pool())
    .await
    .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
}

/// (balance, held) of an account.
async fn balance(db: &Database, customer: &str) -> (i64, i64) {
    let r = sqlx::query("SELECT balance_minor, held_minor FROM accounts WHERE customer_id = $1")
        .bind(customer)
        .fetch_one(db.pool())
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// Run the processor until nothing is pending and nothing is owed to the provider.
async fn drain(p: &Processor) {
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(p.clone().run(shutdown.clone()));
    eventually(
        WAIT,
        "payments settled and the provider paid up",
        || async {
            let open: i64 = sqlx::query(
            "SELECT COUNT(*) FROM payments WHERE status = 'PENDING' OR provider_due IS NOT NULL",
        )
        .fetch_one(p.db.pool())
        .await
        .unwrap()
        .get(0);
            (open == 0).then_some(())
        },
    )
    .await;
    shutdown.cancel();
    run.await.unwrap();
}

fn assert_settled(l: &ProviderLedger) {
    assert_eq!(l.outstanding, 0, "{l:?}");
    assert_eq!(l.approvals, l.captures + l.voids, "{l:?}");
    assert_eq!(l.refused_follow_ups, 0, "{l:?}");
}

async fn concurrent_payments_of_one_customer_get_one_approval_when_the_balance_covers_one(
    b: Backend,
) {
    let (_keep, db) = database(b).await;
    account(&db, "carol", 100).await;
    let ids: Vec<String> = (0..5).map(|i| format!("o-{i}")).collect();
    for id in &ids {
        pending(&db, id, "carol", 100).await;
    }
    // Slow enough that all five are with the processor at once, as a batch of them would be.
    let sim = SimulatedGateway::new(Duration::from_millis(200), None);
    let p = processor(&db, &sim, ResilienceConfig::default());
    let all = futures::future::join_all(ids.iter().map(|id| p.process(id))).await;
    assert!(all.iter().all(Result::is_ok), "{all:?}");
    drain(&p).await;

    let l = sim.ledger();
    assert_eq!((l.approvals, l.captures, l.voids), (1, 1, 0), "{l:?}");
    assert_settled(&l);
    let mut outcomes = Vec::new();
    for id in &ids {
        let (status, reason, held, _, _) = payment(&db, id).await;
        assert_eq!(held, 0, "{id}: hold released");
        outcomes.push((status, reason));
    }
    outcomes.sort();
    let poor = ("FAILED".to_owned(), Some("insufficient_funds".to_owned()));
    assert_eq!(
        outcomes,
        vec![
            ("CAPTURED".to_owned(), None),
            poor.clone(),
            poor.clone(),
            poor.clone(),
            poor
        ]
    );
    assert_eq!(balance(&db, "carol").await, (0, 0));
}

async fn lost_answers_are_reconciled_by_key_then_captured_or_voided(b: Backend) {
    let (_keep, db) = database(b).await;
    account(&db, "alice", 1000).await;
    account(&db, "bob", 1000).await;
    account(&db, "dan", 1000).await;
    // Every approval's answer is lost; the breaker stays out of the way.
    let sim = SimulatedGateway::new(Duration::ZERO, None).losing_every(1);
    let config = ResilienceConfig {
        // Long enough for the test to act while the charges are in flight.
        timeout: Duration::from_millis(1000),
        retries: 1,
        retry_base: Duration::from_millis(1),
        breaker_failures: 1000,
        ..ResilienceConfig::default()
    };
    let p = processor(&db, &sim, config);

    // Approved, no answer: asked by key, then captured.
    pending(&db, "o-alice", "alice", 300).await;
    p.process("o-alice").await.unwrap();
    assert_eq!(
        payment(&db, "o-alice").await,
        ("CAPTURED".into(), None, 0, None, Some("captured".into()))
    );

    // Cancelled while the provider holds the approval whose answer is lost: voided.
    pending(&db, "o-bob", "bob", 300).await;
    // Lowered below the amount while the provider holds the approval: not capturable, voided.
    pending(&db, "o-dan", "dan", 300).await;
    let in_flight = {
        let p = p.clone();
        tokio::spawn(async move {
            let (bob, dan) = tokio::join!(p.process("o-bob"), p.process("o-dan"));
            bob.and(dan)
        })
    };
    eventually(WAIT, "both approved at the provider", || async {
        (sim.ledger().approvals == 3).then_some(())
    })
    .await;
    let cancel = Envelope::new(
        "/order-service",
        &payment_service::events::OrderCancelled {
            order_id: "o-bob".into(),
        },
        Some("o-bob".into()),
    );
    let mut tx = db.begin().await.unwrap();
    store::on_order_cancelled(
        &mut tx,
        &Context::event("/payment-service", &cancel),
        "o-bob",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    account(&db, "dan", 100).await;
    in_flight.await.unwrap().unwrap();
    drain(&p).await;

    let (status, reason, held, due, done) = payment(&db, "o-bob").await;
    assert_eq!(
        (
            status.as_str(),
            reason.as_deref(),
            held,
            due,
            done.as_deref()
        ),
        ("FAILED", Some("order_cancelled"), 0, None, Some("voided"))
    );
    let (status, reason, held, due, done) = payment(&db, "o-dan").await;
    assert_eq!(
        (
            status.as_str(),
            reason.as_deref(),
            held,
            due,
            done.as_deref()
        ),
        (
            "FAILED",
            Some("insufficient_funds"),
            0,
            None,
            Some("voided")
        )
    );
    let l = sim.ledger();
    assert_eq!(
        (l.approvals, l.captures, l.voids, l.lost_answers),
        (3, 1, 2, 3),
        "{l:?}"
    );
    assert!(l.status_queries >= 3, "{l:?}");
    assert_settled(&l);
    assert_eq!(balance(&db, "alice").await, (700, 0));
    assert_eq!(balance(&db, "bob").await, (1000, 0));
    assert_eq!(balance(&db, "dan").await, (100, 0));
}

async fn an_authorization_nobody_could_confirm_is_voided_once_the_provider_is_back(b: Backend) {
    let (_keep, db) = database(b).await;
    account(&db, "alice", 1000).await;
    // The provider approves, then is gone before any answer and before the status question.
    let sim = SimulatedGateway::new(Duration::ZERO, None).losing_every(1);
    let config = ResilienceConfig {
        timeout: Duration::from_millis(1000),
        retries: 0,
        breaker_failures: 1000,
        ..ResilienceConfig::default()
    };
    let p = processor(&db, &sim, config);
    pending(&db, "o-1", "alice", 300).await;
    let in_flight = {
        let p = p.clone();
        tokio::spawn(async move { p.process("o-1").await })
    };
    eventually(WAIT, "approved at the provider", || async {
        (sim.ledger().approvals == 1).then_some(())
    })
    .await;
    sim.set_mode(GatewayMode::Outage);
    in_flight.await.unwrap().unwrap();
    let (status, reason, _, due, _) = payment(&db, "o-1").await;
    assert_eq!(
        (status.as_str(), reason.as_deref(), due.as_deref()),
        ("FAILED", Some("payment_unavailable"), Some("void")),
        "failed, and a void owed until the provider takes it"
    );
    assert_eq!(sim.ledger().outstanding, 1);

    sim.set_mode(GatewayMode::Ok);
    drain(&p).await;
    assert_eq!(
        payment(&db, "o-1").await.4.as_deref(),
        Some("voided"),
        "retried until the provider answered"
    );
    let l = sim.ledger();
    assert_eq!((l.approvals, l.captures, l.voids), (1, 0, 1), "{l:?}");
    assert_settled(&l);
    assert_eq!(balance(&db, "alice").await, (1000, 0));
}
