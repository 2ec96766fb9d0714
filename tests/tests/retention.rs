//! Retention never breaks dedup: with published outbox rows and idempotency keys pruned after a
//! second, every event re-published (new `Nats-Msg-Id`, same event id) still changes nothing; and a
//! service refuses to start with an inbox retention shorter than its streams keep events.

use std::process::{Command, Stdio};
use std::time::Duration;

use event_toolkit::Backend;
use saga_e2e::invariants::{check, wait_quiet};
use saga_e2e::{bin_dir, Service, System, SystemConfig, WAIT};
use serde_json::json;
use sqlx::Row;

use event_toolkit::on_both_backends as on_backends;

on_backends!(pruned_outbox_rows_and_keys_never_break_dedup);

async fn count(url: &str, sql: &str) -> i64 {
    event_toolkit::db::install_drivers();
    let pool = sqlx::AnyPool::connect(url).await.expect("service database");
    let n: i64 = sqlx::query(sql)
        .fetch_one(&pool)
        .await
        .expect("count")
        .get(0);
    pool.close().await;
    n
}

async fn pruned_outbox_rows_and_keys_never_break_dedup(b: Backend) {
    let mut config = SystemConfig::new(b);
    for (k, v) in [
        ("OUTBOX_RETENTION", "1s"),
        ("IDEMPOTENCY_KEY_RETENTION", "1s"),
        ("RETENTION_SWEEP_INTERVAL", "300ms"),
    ] {
        config.env.push((k.into(), v.into()));
    }
    let s = System::start(config).await;
    s.set_stock("WIDGET", 10).await;
    s.set_balance("alice", 10_000).await;
    let url = format!("{}/orders", s.url(Service::Order));
    let body = json!({ "customer_id": "alice", "currency": "EUR",
        "items": [{ "sku": "WIDGET", "quantity": 2, "unit_price_minor": 100 }] });
    let first: serde_json::Value = s
        .http
        .post(&url)
        .header("Idempotency-Key", "k-retained")
        .json(&body)
        .send()
        .await
        .expect("place")
        .json()
        .await
        .expect("json");
    let first = first["id"].as_str().expect("id").to_owned();
    s.record_accepted(&first);
    let short = s.place_order("alice", &[("WIDGET", 50, 100)]).await;
    assert_eq!(s.wait_terminal(&first).await["status"], "CONFIRMED");
    assert_eq!(
        s.wait_terminal(&short).await["reason"],
        "insufficient_stock"
    );
    wait_quiet(&s, WAIT).await;

    // Every published outbox row and the idempotency key are pruned.
    saga_e2e::wait_for(WAIT, "outbox rows and keys pruned", || async {
        for svc in Service::ALL {
            if count(s.database_url(svc), "SELECT COUNT(*) FROM outbox").await > 0 {
                return None;
            }
        }
        let keys = count(
            s.database_url(Service::Order),
            "SELECT COUNT(*) FROM orders WHERE idempotency_key IS NOT NULL",
        )
        .await;
        (keys == 0).then_some(())
    })
    .await;
    let before = (
        s.product("WIDGET").await,
        s.balance("alice").await,
        s.payments(&first).await,
    );

    // Re-published within the streams' age, each event is still a duplicate at every consumer.
    let mut copies = 0;
    for stream in ["ORDERS", "INVENTORY", "PAYMENTS"] {
        for (_, subject, _, body) in s.stream_messages(stream).await {
            let fresh = uuid::Uuid::now_v7().to_string();
            s.nats_pub(&subject, &[("Nats-Msg-Id", &fresh)], &body)
                .await;
            copies += 1;
        }
    }
    assert!(copies >= 8, "{copies}");
    wait_quiet(&s, WAIT).await;
    let after = (
        s.product("WIDGET").await,
        s.balance("alice").await,
        s.payments(&first).await,
    );
    assert_eq!(before, after, "re-published events changed nothing");

    // The key was forgotten with its retention: the same key now places a new order.
    let again: serde_json::Value = s
        .http
        .post(&url)
        .header("Idempotency-Key", "k-retained")
        .json(&body)
        .send()
        .await
        .expect("place again")
        .json()
        .await
        .expect("json");
    let again = again["id"].as_str().expect("id").to_owned();
    assert_ne!(again, first);
    s.record_accepted(&again);
    assert_eq!(s.wait_terminal(&again).await["status"], "CONFIRMED");
    wait_quiet(&s, WAIT).await;
    check(&s).await.assert_clean();
}

#[test]
fn a_service_refuses_an_inbox_retention_shorter_than_its_streams_keep_events() {
    for binary in ["order-service", "inventory-service", "payment-service"] {
        let mut child = Command::new(bin_dir().join(binary))
            .env("INBOX_RETENTION", "1h")
            .env("NATS_URL", "nats://127.0.0.1:1")
            .env("DATABASE_URL", "sqlite::memory:")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break st;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{binary} did not refuse to start"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = child.wait_with_output().expect("output");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!status.success(), "{binary} exited with {status}");
        assert!(
            log.contains("INBOX_RETENTION") && log.contains("max_age"),
            "{binary} says why: {log}"
        );
    }
}
