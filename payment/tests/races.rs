//! Regression: a reservation and a cancellation of the same order, applied by two consumers at
//! the same moment on Postgres, must not leave a chargeable payment behind. (Found by the
//! fault-injection suite: both transactions saw "nothing yet" and a cancelled order was charged.)
//!
//! On Postgres the per-order row in `order_flags` serializes the two: the cancellation blocks on its
//! lock, which the test observes in `pg_stat_activity` before letting the reservation commit. SQLite
//! has one writer, so the race cannot happen there: the cancellation's transaction waits to begin
//! until the reservation's commits. The test runs there too, to hold that serialization to the same
//! outcome; the order_flags lock itself is only exercised on Postgres.

use std::time::Duration;

use event_toolkit::testing::{eventually, TestDb};
use event_toolkit::{Backend, Context, Database, Envelope};
use payment_service::events::{OrderCancelled, StockReserved};
use payment_service::store;
use sqlx::Row;

async fn database(backend: Backend) -> (TestDb, Database) {
    let testdb = TestDb::new(backend).await;
    let db = testdb.connect().await;
    db.migrate(sqlx::migrate!()).await.expect("migrate");
    (testdb, db)
}

async fn reservation_and_cancellation_side_by_side(backend: Backend) {
    let (_keep, db) = database(backend).await;
    let reserved = StockReserved {
        order_id: "o-1".into(),
        customer_id: "alice".into(),
        total_minor: 100,
        currency: "EUR".into(),
    };
    let reserved_event = Envelope::new("/test", &reserved, Some("o-1".into()));
    let cancelled_event = Envelope::new(
        "/test",
        &OrderCancelled {
            order_id: "o-1".into(),
        },
        Some("o-1".into()),
    );

    // The reservation's transaction is open when the cancellation starts.
    let mut first = db.begin().await.unwrap();
    assert!(store::on_stock_reserved(
        &mut first,
        &Context::event("/test", &reserved_event),
        &reserved
    )
    .await
    .unwrap());
    let begun = db.transactions();
    let db2 = db.clone();
    let second = tokio::spawn(async move {
        let mut tx = db2.begin().await.unwrap();
        let decision =
            store::on_order_cancelled(&mut tx, &Context::event("/test", &cancelled_event), "o-1")
                .await
                .unwrap();
        tx.commit().await.unwrap();
        decision
    });
    cancellation_is_waiting(&db, begun).await;
    assert!(
        !second.is_finished(),
        "the cancellation waits for the reservation's transaction"
    );
    first.commit().await.unwrap();
    let decision = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(decision, payment_service::domain::OnCancelled::Void);

    let status: String = sqlx::query("SELECT status FROM payments WHERE order_id = 'o-1'")
        .fetch_one(db.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        status, "FAILED",
        "the pending charge was voided, never to be captured"
    );
}

/// Returns once the cancellation's transaction is seen blocked behind the reservation's (`begun`:
/// write transactions begun before the cancellation's).
async fn cancellation_is_waiting(db: &Database, begun: u64) {
    let deadline = Duration::from_secs(10);
    match db.backend() {
        Backend::Postgres => {
            eventually(
                deadline,
                "a session of this database waiting on a lock (the order_flags row)",
                || async {
                    let waiting: i64 = sqlx::query(
                        "SELECT COUNT(*) FROM pg_stat_activity \
                         WHERE datname = current_database() AND wait_event_type = 'Lock' \
                         AND query LIKE '%order_flags%'",
                    )
                    .fetch_one(db.pool())
                    .await
                    .unwrap()
                    .get(0);
                    (waiting > 0).then_some(())
                },
            )
            .await
        }
        // The second write transaction has been asked for; it cannot begin while the first holds
        // the single writer.
        Backend::Sqlite => {
            eventually(deadline, "a second write transaction requested", || async {
                (db.transactions() > begun).then_some(())
            })
            .await
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cancellation_waits_for_a_concurrent_reservation_and_voids_it() {
    reservation_and_cancellation_side_by_side(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_cancellation_waits_for_a_concurrent_reservation_and_voids_it() {
    reservation_and_cancellation_side_by_side(Backend::Sqlite).await;
}
