//! The HTTP edge under abuse, against the real order service: half-sent requests are cut off
//! without stopping normal ones, and a burst beyond the in-flight limit is shed with `503` +
//! `Retry-After` while every accepted order still completes by its saga.

use std::time::{Duration, Instant};

use event_toolkit::Backend;
use saga_e2e::invariants::{check, wait_quiet};
use saga_e2e::{Service, System, SystemConfig, WAIT};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use event_toolkit::on_both_backends as on_backends;

on_backends!(
    half_sent_requests_are_cut_off_and_do_not_stop_a_normal_request,
    a_burst_beyond_the_in_flight_limit_is_shed_and_accepted_orders_finish_by_the_saga,
);

const HEADER_TIMEOUT_MS: u64 = 5_000;

async fn half_sent_requests_are_cut_off_and_do_not_stop_a_normal_request(b: Backend) {
    let mut config = SystemConfig::new(b);
    config.env.push((
        "HTTP_HEADER_TIMEOUT_MS".into(),
        HEADER_TIMEOUT_MS.to_string(),
    ));
    let s = System::start(config).await;
    s.set_stock("WIDGET", 10).await;
    s.set_balance("alice", 10_000).await;
    let addr = s
        .url(Service::Order)
        .trim_start_matches("http://")
        .to_owned();

    // 2,000 connections that start a request head and never finish it.
    let mut slow = Vec::with_capacity(2_000);
    for _ in 0..2_000 {
        let mut c = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        c.write_all(b"POST /orders HTTP/1.1\r\nHost: order\r\nContent-Type: appl")
            .await
            .expect("half a request head");
        slow.push(c);
    }
    let attack_started = Instant::now();

    // A normal customer is served meanwhile.
    let id = s.place_order("alice", &[("WIDGET", 1, 100)]).await;
    let served_in = attack_started.elapsed();
    assert!(
        served_in < Duration::from_millis(HEADER_TIMEOUT_MS),
        "served while the half-sent requests were still open ({served_in:?})"
    );
    assert_eq!(s.wait_terminal(&id).await["status"], "CONFIRMED");

    // Each half-sent request is closed by the server once its head is late (an answer, if any,
    // then end of stream) — not held forever.
    let closes = slow.into_iter().map(|mut c| async move {
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut buf))
            .await
            .is_ok()
    });
    let closed = futures::future::join_all(closes)
        .await
        .into_iter()
        .filter(|closed| *closed)
        .count();
    assert_eq!(closed, 2_000, "every half-sent request was cut off");
    assert!(
        attack_started.elapsed() >= Duration::from_millis(HEADER_TIMEOUT_MS),
        "cut off by the header timeout, not at once"
    );
    wait_quiet(&s, WAIT).await;
    check(&s).await.assert_clean();
}

async fn a_burst_beyond_the_in_flight_limit_is_shed_and_accepted_orders_finish_by_the_saga(
    b: Backend,
) {
    let mut config = SystemConfig::new(b);
    config.env.push(("HTTP_MAX_IN_FLIGHT".into(), "16".into()));
    let s = System::start(config).await;
    s.set_stock("WIDGET", 100_000).await;
    s.set_balance("alice", 100_000_000).await;

    // Its own client: one connection per request, all sent at once.
    let burst_client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let url = format!("{}/orders", s.url(Service::Order));
    let body = json!({ "customer_id": "alice", "currency": "EUR",
        "items": [{ "sku": "WIDGET", "quantity": 1, "unit_price_minor": 10 }] });
    let requests = (0..1_000).map(|_| burst_client.post(&url).json(&body).send());
    let mut accepted = Vec::new();
    let mut shed = 0;
    for r in futures::future::join_all(requests).await {
        let r = r.expect("every request is answered");
        match r.status().as_u16() {
            202 => {
                let v: Value = r.json().await.expect("order");
                accepted.push(v["id"].as_str().expect("id").to_owned());
            }
            503 => {
                assert_eq!(r.headers()["retry-after"], "1");
                assert_eq!(r.headers()["content-type"], "application/problem+json");
                shed += 1;
            }
            other => panic!("only 202 or 503 under a burst, got {other}"),
        }
    }
    assert!(shed > 0, "the burst beyond the limit was shed");
    assert!(!accepted.is_empty(), "some orders were accepted");
    for id in &accepted {
        s.record_accepted(id);
    }
    // Accepted orders finish by the saga: confirmed, not cancelled by their deadline.
    for id in &accepted {
        let o = s.wait_terminal(id).await;
        assert_eq!(o["status"], "CONFIRMED", "{o}");
    }
    println!("burst of 1000: {} accepted, {shed} shed", accepted.len());
    wait_quiet(&s, WAIT).await;
    check(&s).await.assert_clean();
}
