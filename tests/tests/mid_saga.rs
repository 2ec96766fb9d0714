//! Faults that land while a saga is provably in flight: a service frozen with its step pending and
//! then SIGKILLed, a graceful SIGTERM during a provider call, the payment service killed during a
//! slow provider call, the circuit breaker opening and closing again, transient failures running
//! out of deliveries, and readiness while NATS or the database is down. Nothing waits a fixed
//! time: each step waits for a condition it can observe. Every test runs on SQLite and Postgres
//! and ends with the six invariants and the wire checked against the catalogue.

use event_toolkit::{Backend, ConsumerSpec};
use saga_e2e::catalogue::assert_wire_events_match_catalogue;
use saga_e2e::invariants::{check, wait_quiet};
use saga_e2e::{wait_for, Service, System, SystemConfig, WAIT};
use sqlx::{AnyPool, Row};

use event_toolkit::on_backends;
use saga_e2e::{CancelReason, OrderStatus};

on_backends! {
    sqlite: [
        each_service_killed_while_its_step_is_in_flight_completes,
        sigterm_finishes_the_charge_in_flight_and_publishes_it_before_exiting,
        payment_killed_during_a_slow_provider_call_is_taken_over_and_charged_once,
        the_circuit_closes_again_once_the_provider_recovers,
        transient_failures_past_max_deliver_end_in_a_gave_up_dead_letter,
        readyz_is_not_ready_while_nats_or_the_database_is_down,
    ],
    postgres: [
        each_service_killed_while_its_step_is_in_flight_completes,
        sigterm_finishes_the_charge_in_flight_and_publishes_it_before_exiting,
        payment_killed_during_a_slow_provider_call_is_taken_over_and_charged_once,
        the_circuit_closes_again_once_the_provider_recovers,
        transient_failures_past_max_deliver_end_in_a_gave_up_dead_letter,
        readyz_is_not_ready_while_nats_or_the_database_is_down,
    ],
}

async fn seeded(config: SystemConfig) -> System {
    let s = System::start(config).await;
    s.set_stock("WIDGET", 10).await;
    s.set_balance("alice", 10_000).await;
    s
}

/// Quiet, the six invariants, and the wire against the catalogue.
async fn assert_invariants(s: &System) {
    wait_quiet(s, WAIT).await;
    check(s).await.assert_clean();
    assert!(assert_wire_events_match_catalogue(s).await > 0);
}

/// A pool on a service's own database, to see what it cannot show while it is stopped.
async fn database(s: &System, svc: Service) -> AnyPool {
    event_toolkit::db::install_drivers();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(s.database_url(svc))
        .await
        .expect("open service database")
}

/// An order's status as stored by the order service.
async fn stored_order_status(db: &AnyPool, id: &str) -> String {
    sqlx::query("SELECT status FROM orders WHERE id = $1")
        .bind(id)
        .fetch_one(db)
        .await
        .expect("order row")
        .get(0)
}

/// A payment's status and lease as stored by the payment service.
async fn stored_payment(db: &AnyPool, order_id: &str) -> Option<(String, i64)> {
    sqlx::query("SELECT status, lease_until_us FROM payments WHERE order_id = $1")
        .bind(order_id)
        .fetch_optional(db)
        .await
        .expect("payments")
        .map(|r| (r.get(0), r.get(1)))
}

/// Wait until the processor has claimed the order's pending payment; returns the lease end.
async fn claimed(db: &AnyPool, order_id: &str) -> i64 {
    wait_for(
        WAIT,
        "the payment to be claimed by the processor",
        || async {
            match stored_payment(db, order_id).await {
                Some((status, lease)) if status == "PENDING" && lease > 0 => Some(lease),
                _ => None,
            }
        },
    )
    .await
}

/// Five one-unit orders placed at once; their ids.
async fn place_five(s: &System) -> Vec<String> {
    let placing = (0..5).map(|_| s.place_order("alice", &[("WIDGET", 1, 10)]));
    futures::future::join_all(placing).await
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

async fn each_service_killed_while_its_step_is_in_flight_completes(b: Backend) {
    let mut s = seeded(SystemConfig::new(b)).await;
    s.set_stock("WIDGET", 1000).await;
    s.set_balance("alice", 1_000_000).await;
    let order_db = database(&s, Service::Order).await;
    let mut ids = Vec::new();

    // Inventory: frozen before the placements reach it, so each order waits on it.
    s.signal(Service::Inventory, "STOP");
    let batch = place_five(&s).await;
    for id in &batch {
        assert_eq!(s.order_view(id).await.status, OrderStatus::Pending, "{id}");
    }
    s.kill(Service::Inventory);
    s.restart(Service::Inventory).await;
    ids.extend(batch);

    // Payment: frozen while the reservations reach it.
    s.signal(Service::Payment, "STOP");
    let batch = place_five(&s).await;
    for id in &batch {
        s.wait_status(id, &["RESERVED"]).await;
    }
    s.kill(Service::Payment);
    s.restart(Service::Payment).await;
    ids.extend(batch);

    // Order: frozen while the payment outcomes reach it. Its own database shows each order
    // still unfinished when it is killed.
    s.signal(Service::Payment, "STOP");
    let batch = place_five(&s).await;
    for id in &batch {
        s.wait_status(id, &["RESERVED"]).await;
    }
    s.signal(Service::Order, "STOP");
    s.signal(Service::Payment, "CONT");
    for id in &batch {
        wait_for(WAIT, "the charge to be captured", || async {
            let p = s.payments(id).await;
            (p.first()?["status"] == "CAPTURED").then_some(())
        })
        .await;
        assert_eq!(stored_order_status(&order_db, id).await, "RESERVED");
    }
    s.kill(Service::Order);
    s.restart(Service::Order).await;
    ids.extend(batch);

    for id in &ids {
        let o = s.wait_terminal_view(id).await;
        assert_eq!(o.status, OrderStatus::Confirmed, "{o:?}");
    }
    order_db.close().await;
    wait_quiet(&s, WAIT).await;
    assert_eq!(s.product("WIDGET").await["sold"], 15);
    assert_eq!(s.balance("alice").await, 1_000_000 - 150);
    assert_invariants(&s).await;
}

async fn sigterm_finishes_the_charge_in_flight_and_publishes_it_before_exiting(b: Backend) {
    let mut config = SystemConfig::new(b);
    config.gateway_latency_ms = 1500;
    let mut s = seeded(config).await;
    let payment_db = database(&s, Service::Payment).await;
    let id = s.place_order("alice", &[("WIDGET", 2, 300)]).await;
    claimed(&payment_db, &id).await;
    // Frozen, the service is exactly where the database says: in the provider call. SIGTERM
    // lands there.
    s.signal(Service::Payment, "STOP");
    assert_eq!(
        stored_payment(&payment_db, &id).await.map(|p| p.0),
        Some("PENDING".to_owned())
    );
    s.signal(Service::Payment, "TERM");
    s.signal(Service::Payment, "CONT");
    assert!(s.stop(Service::Payment).await, "clean exit, code 0");

    // With payment gone: the charge was captured and its event published before the exit.
    assert_eq!(
        stored_payment(&payment_db, &id).await.map(|p| p.0),
        Some("CAPTURED".to_owned())
    );
    let unpublished: i64 = sqlx::query("SELECT COUNT(*) FROM outbox WHERE published_at_us IS NULL")
        .fetch_one(&payment_db)
        .await
        .expect("outbox")
        .get(0);
    assert_eq!(unpublished, 0, "outbox flushed");
    let types: Vec<String> = s
        .saga_events(&id)
        .await
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert!(
        types.iter().any(|t| t == "payments.succeeded.v1"),
        "{types:?}"
    );
    assert_eq!(
        s.wait_terminal_view(&id).await.status,
        OrderStatus::Confirmed
    );
    payment_db.close().await;

    s.restart(Service::Payment).await;
    wait_quiet(&s, WAIT).await;
    assert_eq!(s.balance("alice").await, 10_000 - 600);
    assert_invariants(&s).await;
}

async fn payment_killed_during_a_slow_provider_call_is_taken_over_and_charged_once(b: Backend) {
    let mut config = SystemConfig::new(b);
    config.gateway_latency_ms = 1500;
    // Far beyond the lease, so only the takeover decides the outcome.
    config.deadline_ms = 300_000;
    let mut s = seeded(config).await;
    let payment_db = database(&s, Service::Payment).await;
    let id = s.place_order("alice", &[("WIDGET", 2, 300)]).await;
    let first_lease = claimed(&payment_db, &id).await;
    s.signal(Service::Payment, "STOP");
    assert_eq!(
        stored_payment(&payment_db, &id).await,
        Some(("PENDING".to_owned(), first_lease)),
        "killed inside the provider call"
    );
    s.kill(Service::Payment);
    s.restart(Service::Payment).await;

    // The restarted processor cannot know the old one is dead: it leaves the lease alone until it
    // runs out.
    let (status, lease) = stored_payment(&payment_db, &id).await.expect("payment");
    if now_us() < first_lease {
        assert_eq!((status.as_str(), lease), ("PENDING", first_lease));
    }
    let o = s.wait_terminal_view(&id).await;
    assert_eq!(o.status, OrderStatus::Confirmed, "{o:?}");
    let (_, lease) = stored_payment(&payment_db, &id).await.expect("payment");
    assert!(lease > first_lease, "taken over under a new lease");
    payment_db.close().await;

    let pays = s.payments(&id).await;
    assert_eq!(pays.len(), 1, "{pays:?}");
    assert_eq!(
        (pays[0]["status"].as_str(), pays[0]["amount_minor"].as_i64()),
        (Some("CAPTURED"), Some(600))
    );
    wait_quiet(&s, WAIT).await;
    assert_eq!(s.balance("alice").await, 10_000 - 600, "charged once");
    assert_invariants(&s).await;
}

async fn the_circuit_closes_again_once_the_provider_recovers(b: Backend) {
    let s = seeded(SystemConfig::new(b)).await;
    assert_eq!(s.gateway().await.circuit, "closed");
    s.set_gateway("outage").await;
    let down = s.place_order("alice", &[("WIDGET", 1, 100)]).await;
    let o = s.wait_terminal_view(&down).await;
    assert_eq!(o.reason, Some(CancelReason::PaymentUnavailable), "{o:?}");
    assert_eq!(s.gateway().await.circuit, "open");

    s.set_gateway("ok").await;
    wait_for(WAIT, "the circuit to let a trial call through", || async {
        (s.gateway().await.circuit == "half_open").then_some(())
    })
    .await;
    let trial = s.place_order("alice", &[("WIDGET", 1, 100)]).await;
    let o = s.wait_terminal_view(&trial).await;
    assert_eq!(o.status, OrderStatus::Confirmed, "{o:?}");
    assert_eq!(s.gateway().await.circuit, "closed", "the trial closed it");
    let after = s.place_order("alice", &[("WIDGET", 1, 100)]).await;
    assert_eq!(
        s.wait_terminal_view(&after).await.status,
        OrderStatus::Confirmed
    );

    wait_quiet(&s, WAIT).await;
    assert_eq!(s.balance("alice").await, 10_000 - 200);
    assert_invariants(&s).await;
}

async fn transient_failures_past_max_deliver_end_in_a_gave_up_dead_letter(b: Backend) {
    let mut s = seeded(SystemConfig::new(b)).await;
    // What the services' consumers run with.
    let max_deliver = ConsumerSpec::new("any", "ANY", &["any"]).max_deliver;
    s.kill(Service::Inventory);
    let id = s.place_order("alice", &[("WIDGET", 1, 100)]).await;
    let seq = wait_for(WAIT, "the placement on the ORDERS stream", || async {
        s.stream_messages("ORDERS")
            .await
            .into_iter()
            .find(|(_, subject, _, _)| subject == "orders.placed.v1")
            .map(|(seq, ..)| seq)
    })
    .await;

    // The handler fails transiently: the table it needs is gone. The runner counts attempts in
    // its own table; starting that count at all but the last three stands for the earlier
    // failures, so the test sees real retries and the last one without sitting through the
    // whole backoff (about 90 s).
    let inventory_db = database(&s, Service::Inventory).await;
    sqlx::query("ALTER TABLE products RENAME TO products_away")
        .execute(&inventory_db)
        .await
        .expect("rename");
    sqlx::query(
        "INSERT INTO consumer_attempts (consumer, stream, stream_sequence, attempts, updated_at_us) \
         VALUES ('inventory-from-orders', 'ORDERS', $1, $2, $3)",
    )
    .bind(seq as i64)
    .bind(max_deliver - 3)
    .bind(now_us())
    .execute(&inventory_db)
    .await
    .expect("earlier attempts");
    s.restart(Service::Inventory).await;
    let letter = wait_for(WAIT, "inventory to give up on the placement", || async {
        s.dead_letters(Service::Inventory)
            .await
            .into_iter()
            .find(|d| d["consumer"] == "inventory-from-orders")
    })
    .await;
    let reason = letter["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with(&format!("gave up after {max_deliver} attempts"))
            && reason.contains("products"),
        "{letter}"
    );
    assert_eq!(letter["stream_sequence"], seq, "{letter}");
    assert!(
        letter["delivered"].as_i64() >= Some(2),
        "retried before giving up: {letter}"
    );
    sqlx::query("ALTER TABLE products_away RENAME TO products")
        .execute(&inventory_db)
        .await
        .expect("rename back");
    inventory_db.close().await;

    // Nothing was reserved; the order never hears from inventory, so the customer cancels.
    assert_eq!(s.order_view(&id).await.status, OrderStatus::Pending);
    assert!(s.reservations(&id).await.is_empty());
    let (code, _) = s.cancel(&id).await;
    assert_eq!(code, 202);
    let o = s.wait_terminal_view(&id).await;
    assert_eq!(o.reason, Some(CancelReason::CustomerCancelled), "{o:?}");
    wait_quiet(&s, WAIT).await;
    assert_eq!(s.product("WIDGET").await["available"], 10);
    assert_eq!(s.dead_letters(Service::Inventory).await.len(), 1);
    assert_invariants(&s).await;
}

/// Make a Postgres database refuse connections and drop the ones it has (`down`), or let it
/// accept them again.
async fn postgres_database(s: &System, svc: Service, down: bool) {
    let url = s.database_url(svc);
    let (base, name) = url.rsplit_once('/').expect("database url");
    event_toolkit::db::install_drivers();
    let admin = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{base}/postgres"))
        .await
        .expect("admin connection");
    sqlx::query(&format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS {}",
        !down
    ))
    .execute(&admin)
    .await
    .expect("alter database");
    if down {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(name)
        .execute(&admin)
        .await
        .expect("terminate sessions");
    }
    admin.close().await;
}

async fn readyz_is_not_ready_while_nats_or_the_database_is_down(b: Backend) {
    let mut s = seeded(SystemConfig::new(b)).await;
    for svc in Service::ALL {
        assert_eq!(s.readyz(svc).await, Some(200), "{svc:?}");
    }

    tokio::task::block_in_place(|| s.nats.stop());
    for svc in Service::ALL {
        wait_for(WAIT, "not ready without NATS", || async {
            (s.readyz(svc).await == Some(503)).then_some(())
        })
        .await;
    }
    s.nats.start_again().await;
    for svc in Service::ALL {
        s.wait_ready(svc).await;
    }

    // A SQLite file cannot go away under an open connection; a Postgres server can refuse it.
    if b == Backend::Postgres {
        postgres_database(&s, Service::Payment, true).await;
        wait_for(WAIT, "payment not ready without its database", || async {
            (s.readyz(Service::Payment).await == Some(503)).then_some(())
        })
        .await;
        postgres_database(&s, Service::Payment, false).await;
        s.wait_ready(Service::Payment).await;
    }

    let id = s.place_order("alice", &[("WIDGET", 1, 100)]).await;
    assert_eq!(
        s.wait_terminal_view(&id).await.status,
        OrderStatus::Confirmed
    );
    assert_invariants(&s).await;
}
