//! Self-healing wiring under load: a deleted durable is created again by its service, a deleted
//! stream by its owner, `/readyz` says not-ready while a durable cannot attach, and sagas resume
//! with the six invariants clean (orders whose events went with the deleted stream end by their
//! deadline, compensated).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_toolkit::Backend;
use saga_e2e::invariants::{check, wait_quiet};
use saga_e2e::{Service, System, SystemConfig, WAIT};

use event_toolkit::on_both_backends as on_backends;

on_backends!(deleted_durables_and_streams_come_back_and_sagas_resume);

async fn ready(s: &System, svc: Service) -> bool {
    reqwest::get(format!("{}/readyz", s.url(svc)))
        .await
        .map(|r| r.status() == 200)
        .unwrap_or(false)
}

async fn durable_exists(s: &System, stream: &str, durable: &str) -> bool {
    let js = async_nats::jetstream::new(s.client.clone());
    let found: Result<async_nats::jetstream::consumer::PullConsumer, _> =
        js.get_consumer_from_stream(durable, stream).await;
    found.is_ok()
}

async fn deleted_durables_and_streams_come_back_and_sagas_resume(b: Backend) {
    let mut config = SystemConfig::new(b);
    config.deadline_ms = 5_000;
    let s = System::start(config).await;
    s.set_stock("WIDGET", 100_000).await;
    s.set_balance("alice", 100_000_000).await;
    let s = Arc::new(s);
    let js = async_nats::jetstream::new(s.client.clone());

    // Load: an order every 50 ms until stopped.
    let stop = tokio_util::sync::CancellationToken::new();
    let placed: Arc<Mutex<Vec<String>>> = Arc::default();
    let load = tokio::spawn({
        let (s, stop, placed) = (s.clone(), stop.clone(), placed.clone());
        async move {
            while !stop.is_cancelled() {
                let id = s.place_order("alice", &[("WIDGET", 1, 10)]).await;
                placed.lock().expect("lock").push(id);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });

    // 1. A durable deleted under load is created again by its service.
    tokio::time::sleep(Duration::from_millis(500)).await;
    js.delete_consumer_from_stream("payment-from-inventory", "INVENTORY")
        .await
        .expect("delete durable");
    saga_e2e::wait_for(WAIT, "payment-from-inventory again", || async {
        durable_exists(&s, "INVENTORY", "payment-from-inventory")
            .await
            .then_some(())
    })
    .await;

    // 2. A stream deleted while its owner is frozen: its readers cannot attach and say so.
    s.signal(Service::Inventory, "STOP");
    js.delete_stream("INVENTORY").await.expect("delete stream");
    saga_e2e::wait_for(WAIT, "order and payment not ready", || async {
        (!ready(&s, Service::Order).await && !ready(&s, Service::Payment).await).then_some(())
    })
    .await;
    // 3. The owner wakes and creates its stream again; the readers re-create their durables.
    s.signal(Service::Inventory, "CONT");
    for svc in Service::ALL {
        s.wait_ready(svc).await;
    }
    for durable in ["order-from-inventory", "payment-from-inventory"] {
        assert!(durable_exists(&s, "INVENTORY", durable).await, "{durable}");
    }
    stop.cancel();
    load.await.expect("load task");

    // New sagas complete normally.
    let mut after = Vec::new();
    for _ in 0..3 {
        after.push(s.place_order("alice", &[("WIDGET", 1, 10)]).await);
    }
    for id in &after {
        assert_eq!(s.wait_terminal(id).await["status"], "CONFIRMED", "{id}");
    }
    // Every order placed under load ended, by its saga or by its deadline.
    let placed = placed.lock().expect("lock").clone();
    assert!(placed.len() > 5, "load ran: {}", placed.len());
    for id in &placed {
        let o = s.wait_terminal(id).await;
        assert!(
            o["status"] == "CONFIRMED" || o["reason"] == "deadline_exceeded",
            "{o}"
        );
    }
    wait_quiet(&s, WAIT).await;
    check(&s).await.assert_clean();
}
