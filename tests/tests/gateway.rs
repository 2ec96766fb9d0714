//! The API gateway in front of the services: customer tokens, ownership, the aggregated view and
//! its partial answers, the breaker, retries only where idempotent, the rate limit, balancing over
//! replicas and routes to other backends.

use saga_e2e::gateway::{Gateway, StandIn, JWT_SECRET};
use saga_e2e::{wait_for, Service, System, SystemConfig, WAIT};
use serde_json::{json, Value};

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn status_and_json(r: reqwest::Response) -> (u16, Option<String>, Value) {
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, ct, r.json().await.unwrap_or(Value::Null))
}

fn order_body() -> Value {
    json!({"currency": "EUR", "items": [{"sku": "WIDGET", "quantity": 1, "unit_price_minor": 500}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_see_only_their_orders_and_the_view_survives_a_dead_payment_service() {
    let mut system = System::start(SystemConfig::new(event_toolkit::Backend::Sqlite)).await;
    system.set_stock("WIDGET", 10).await;
    system.set_balance("alice", 10_000).await;
    let gw = Gateway::start(&[
        ("ORDER_UPSTREAMS", system.url(Service::Order)),
        ("INVENTORY_UPSTREAMS", system.url(Service::Inventory)),
        ("PAYMENT_UPSTREAMS", system.url(Service::Payment)),
        ("GATEWAY_PROBE_INTERVAL_MS", "200".into()),
        ("GATEWAY_PAYMENT_TIMEOUT_MS", "300".into()),
    ])
    .await;
    let (alice, bob) = (Gateway::token("alice"), Gateway::token("bob"));

    // No token, a token signed with another key, an expired one: 401 problems.
    let wrong_key = Gateway::token_with("another-secret-another-secret-0123", "alice", "1h");
    let expired = Gateway::token_with(JWT_SECRET, "alice", "-10m");
    for auth in [
        None,
        Some(wrong_key),
        Some(expired),
        Some("garbage".to_owned()),
    ] {
        let mut req = gw.http.get(gw.url("/api/orders"));
        if let Some(t) = &auth {
            req = req.header("authorization", bearer(t));
        }
        let r = req.send().await.expect("list");
        assert!(r.headers().contains_key("www-authenticate"));
        let (status, ct, body) = status_and_json(r).await;
        assert_eq!(status, 401, "{auth:?}: {body}");
        assert_eq!(ct.as_deref(), Some("application/problem+json"));
        assert_eq!(body["status"], 401);
    }

    // The customer comes from the token; a body naming someone else is refused.
    let r = gw
        .http
        .post(gw.url("/api/orders"))
        .header("authorization", bearer(&alice))
        .json(&{
            let mut b = order_body();
            b["customer_id"] = json!("bob");
            b
        })
        .send()
        .await
        .expect("place");
    let (status, ct, body) = status_and_json(r).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(ct.as_deref(), Some("application/problem+json"));

    let r = gw
        .http
        .post(gw.url("/api/orders"))
        .header("authorization", bearer(&alice))
        .header("idempotency-key", "gw-1")
        .json(&order_body())
        .send()
        .await
        .expect("place");
    let location = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (status, _, order) = status_and_json(r).await;
    assert_eq!(status, 202, "{order}");
    assert_eq!(order["customer_id"], "alice");
    let id = order["id"].as_str().expect("id").to_owned();
    assert_eq!(
        location.as_deref(),
        Some(format!("/api/orders/{id}").as_str())
    );

    // Another customer's order is as absent as one that does not exist.
    let missing = "01900000-0000-7000-8000-000000000000";
    for path in [
        format!("/api/orders/{id}"),
        format!("/api/orders/{missing}"),
    ] {
        let r = gw
            .http
            .get(gw.url(&path))
            .header("authorization", bearer(&bob))
            .send()
            .await
            .expect("get");
        let (status, ct, body) = status_and_json(r).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(ct.as_deref(), Some("application/problem+json"));
        assert_eq!(body["type"], "/problems/not-found");
    }
    let r = gw
        .http
        .post(gw.url(&format!("/api/orders/{id}/cancel")))
        .header("authorization", bearer(&bob))
        .send()
        .await
        .expect("cancel");
    assert_eq!(r.status(), 404);

    // Lists hold the customer's own orders only.
    let list = |token: String| {
        let gw = &gw;
        async move {
            let r = gw
                .http
                .get(gw.url("/api/orders?limit=10"))
                .header("authorization", bearer(&token))
                .send()
                .await
                .expect("list");
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.expect("page")
        }
    };
    let mine = list(alice.clone()).await;
    assert!(mine["items"]
        .as_array()
        .expect("items")
        .iter()
        .any(|o| o["id"] == id.as_str()));
    assert_eq!(list(bob.clone()).await["items"], json!([]));

    // The aggregated view: the order, its reservations, payments and timeline.
    system.wait_terminal(&id).await;
    let view_of = |token: String| {
        let (gw, path) = (&gw, format!("/api/orders/{id}"));
        async move {
            let r = gw
                .http
                .get(gw.url(&path))
                .header("authorization", bearer(&token))
                .send()
                .await
                .expect("view");
            let (status, _, body) = status_and_json(r).await;
            assert_eq!(status, 200, "{body}");
            body
        }
    };
    let view = wait_for(WAIT, "the view to hold the whole saga", || async {
        let v = view_of(alice.clone()).await;
        let whole = v["payments"].as_array().is_some_and(|p| !p.is_empty())
            && v["reservations"].as_array().is_some_and(|r| !r.is_empty())
            && v["timeline"]["events"]
                .as_array()
                .is_some_and(|e| e.len() >= 5);
        whole.then_some(v)
    })
    .await;
    assert_eq!(view["order"]["id"], id.as_str());
    assert_eq!(view["order"]["status"], "CONFIRMED");

    // Payment hanging: after its timeout (all attempts), still 200 with that part unavailable.
    system.signal(Service::Payment, "STOP");
    let started = std::time::Instant::now();
    let view = view_of(alice.clone()).await;
    assert_eq!(view["payments"], json!({"unavailable": true}), "{view}");
    assert!(
        view["reservations"]
            .as_array()
            .is_some_and(|r| !r.is_empty()),
        "{view}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Payment down: still 200, with that part marked unavailable.
    system.kill(Service::Payment);
    let view = view_of(alice.clone()).await;
    assert_eq!(view["payments"], json!({"unavailable": true}), "{view}");
    assert_eq!(view["order"]["id"], id.as_str());
    assert!(
        view["reservations"]
            .as_array()
            .is_some_and(|r| !r.is_empty()),
        "{view}"
    );
    assert!(view["timeline"]["events"].is_array(), "{view}");
    // The polled /readyz takes the dead replica out of the rotation; the gateway stays ready.
    wait_for(
        WAIT,
        "the payment replica to leave the rotation",
        || async {
            let r = gw.readyz().await;
            (r["upstreams"]["payment"]["replicas"][0]["ready"] == false && r["ready"] == true)
                .then_some(())
        },
    )
    .await;
    let view = view_of(alice).await;
    assert_eq!(view["payments"], json!({"unavailable": true}), "{view}");
}

#[tokio::test]
async fn the_breaker_opens_on_a_dead_upstream_and_closes_when_it_returns() {
    let mut legacy = StandIn::start("legacy").await;
    let gw = Gateway::start(&[
        ("GATEWAY_ROUTES", format!("/legacy={}", legacy.url())),
        ("GATEWAY_BREAKER_FAILURES", "3".into()),
        ("GATEWAY_BREAKER_OPEN_MS", "300".into()),
        ("GATEWAY_RETRIES", "0".into()),
    ])
    .await;
    let get = || async {
        let r = gw.http.get(gw.url("/legacy/x")).send().await.expect("get");
        status_and_json(r).await
    };
    assert_eq!(get().await.0, 200);
    assert_eq!(gw.circuit("legacy").await, "closed");

    legacy.stop();
    let (_, ct, problem) = wait_for(WAIT, "the circuit to open", || async {
        let answer = get().await;
        (answer.0 == 503 && answer.2["type"] == "/problems/circuit-open").then_some(answer)
    })
    .await;
    assert_eq!(ct.as_deref(), Some("application/problem+json"), "{problem}");
    assert!(
        gw.metrics()
            .await
            .contains("gateway_circuit_state{upstream=\"legacy\"} 2"),
        "the gauge says open"
    );
    let calls = legacy.calls();

    legacy.restart().await;
    wait_for(WAIT, "a trial call to close the circuit", || async {
        (get().await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(gw.circuit("legacy").await, "closed");
    assert!(legacy.calls() > calls);
    assert!(gw
        .metrics()
        .await
        .contains("gateway_circuit_state{upstream=\"legacy\"} 0"));
}

#[tokio::test]
async fn only_idempotent_requests_are_retried() {
    let backend = StandIn::start("flaky").await;
    backend.answer(503);
    let gw = Gateway::start(&[
        ("GATEWAY_ROUTES", format!("/flaky={}", backend.url())),
        ("GATEWAY_RETRIES", "2".into()),
        ("GATEWAY_RETRY_BASE_MS", "5".into()),
        ("GATEWAY_BREAKER_FAILURES", "1000".into()),
        ("GATEWAY_EJECT_FAILURES", "1000".into()),
    ])
    .await;
    let mut sent = 0;
    let cases: [(&str, Option<&str>, usize); 4] = [
        ("GET", None, 3),
        ("POST", None, 1),
        ("POST", Some("key-1"), 3),
        ("PATCH", None, 1),
    ];
    for (method, key, attempts) in cases {
        let mut req = gw
            .http
            .request(method.parse().expect("method"), gw.url("/flaky/thing"));
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let r = req.body("{}").send().await.expect("send");
        // The last 5xx is passed on as the backend gave it.
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["x-stand-in"], "flaky");
        sent += attempts;
        assert_eq!(
            backend.calls(),
            sent,
            "{method} {key:?}: {attempts} attempt(s)"
        );
    }
    // Once it recovers, one attempt is enough.
    backend.answer(200);
    let r = gw
        .http
        .get(gw.url("/flaky/thing"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    assert_eq!(backend.calls(), sent + 1);
}

/// Status, problem type and time taken of a GET.
async fn timed_get(gw: &Gateway, path: &str) -> (u16, Value, std::time::Duration) {
    let started = std::time::Instant::now();
    let r = gw.http.get(gw.url(path)).send().await.expect("get");
    let (status, _, body) = status_and_json(r).await;
    (status, body["type"].clone(), started.elapsed())
}

#[tokio::test]
async fn a_slow_upstream_times_out_and_its_bulkhead_refuses_the_excess() {
    let slow = StandIn::start("slow").await;
    slow.delay(std::time::Duration::from_millis(600));
    let gw = Gateway::start(&[
        ("GATEWAY_ROUTES", format!("/slow={}", slow.url())),
        ("GATEWAY_BULKHEAD", "2".into()),
        ("GATEWAY_RETRIES", "0".into()),
        ("GATEWAY_BREAKER_FAILURES", "1000".into()),
        ("GATEWAY_SLOW_TIMEOUT_MS", "5000".into()),
    ])
    .await;
    // Two calls fill the bulkhead; the rest are refused at once instead of queueing.
    let answers = futures::future::join_all((0..5).map(|_| timed_get(&gw, "/slow/x"))).await;
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let refused: Vec<_> = answers.iter().filter(|a| a.0 == 503).collect();
    assert_eq!(ok, 2, "{answers:?}");
    assert_eq!(refused.len(), 3, "{answers:?}");
    for (_, kind, took) in refused {
        assert_eq!(kind, "/problems/upstream-busy");
        assert!(*took < std::time::Duration::from_millis(500), "{took:?}");
    }
    drop(gw);

    // Its own timeout, shorter than the backend's delay: 504.
    let gw = Gateway::start(&[
        ("GATEWAY_ROUTES", format!("/slow={}", slow.url())),
        ("GATEWAY_SLOW_TIMEOUT_MS", "100".into()),
        ("GATEWAY_RETRIES", "0".into()),
    ])
    .await;
    let (status, kind, took) = timed_get(&gw, "/slow/x").await;
    assert_eq!((status, kind), (504, json!("/problems/upstream-timeout")));
    assert!(took < std::time::Duration::from_millis(550), "{took:?}");
}

#[tokio::test]
async fn each_customer_is_rate_limited_on_their_own() {
    let orders = StandIn::start("orders").await;
    let gw = Gateway::start(&[
        ("ORDER_UPSTREAMS", orders.url()),
        ("GATEWAY_RATE_PER_SEC", "1".into()),
        ("GATEWAY_RATE_BURST", "3".into()),
    ])
    .await;
    let (alice, bob) = (Gateway::token("alice"), Gateway::token("bob"));
    let list = |token: &str| {
        gw.http
            .get(gw.url("/api/orders"))
            .header("authorization", bearer(token))
            .send()
    };
    for _ in 0..3 {
        assert_eq!(list(&alice).await.expect("list").status(), 200);
    }
    let r = list(&alice).await.expect("list");
    assert_eq!(r.status(), 429);
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let (_, ct, body) = status_and_json(r).await;
    assert_eq!(ct.as_deref(), Some("application/problem+json"));
    assert_eq!(body["type"], "/problems/rate-limited");
    // Bob has his own allowance.
    assert_eq!(list(&bob).await.expect("list").status(), 200);
    assert!(gw.metrics().await.contains("gateway_rate_limited_total 1"));
}

#[tokio::test]
async fn requests_are_balanced_over_replicas_and_a_dead_one_leaves_the_rotation() {
    let a = StandIn::start("a").await;
    let mut b = StandIn::start("b").await;
    let gw = Gateway::start(&[
        ("GATEWAY_ROUTES", format!("/shop={},{}", a.url(), b.url())),
        ("GATEWAY_EJECT_FAILURES", "1".into()),
        ("GATEWAY_EJECT_MS", "60000".into()),
    ])
    .await;
    let get = || async {
        let r = gw
            .http
            .get(gw.url("/shop/items"))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 200);
        r.headers()["x-stand-in"]
            .to_str()
            .expect("ascii")
            .to_owned()
    };
    for _ in 0..10 {
        get().await;
    }
    assert_eq!((a.calls(), b.calls()), (5, 5), "round robin");

    b.stop();
    let before = a.calls();
    // Every request still succeeds: the one that meets the dead replica is sent again to the
    // other, and the dead one is ejected.
    for _ in 0..10 {
        assert_eq!(get().await, "a");
    }
    assert_eq!(a.calls(), before + 10);
    let report = gw.readyz().await;
    assert_eq!(
        report["upstreams"]["shop"]["replicas"][1]["ejected"], true,
        "{report}"
    );
    assert_eq!(
        report["upstreams"]["shop"]["replicas"][0]["ejected"], false,
        "{report}"
    );
    // Not even a POST without a key is lost: nothing reached the dead replica.
    let r = gw
        .http
        .post(gw.url("/shop/items"))
        .body("x")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_prefix_routes_to_another_backend_as_it_is() {
    let legacy = StandIn::start("legacy").await;
    let gw = Gateway::start(&[("GATEWAY_ROUTES", format!("/legacy={}", legacy.url()))]).await;
    let r = gw
        .http
        .put(gw.url("/legacy/catalog/items?page=2"))
        .header("x-custom", "kept")
        .body("{}")
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-stand-in"], "legacy");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["target"], "/catalog/items?page=2");
    assert_eq!(body["method"], "PUT");
    let seen = legacy.received().pop().expect("a request");
    assert_eq!(seen.header("x-custom"), Some("kept"));
    assert_eq!(seen.header("x-forwarded-prefix"), Some("/legacy"));

    // Neither a prefix nor the gateway's own: a 404 problem; a lookalike prefix is not routed.
    for path in ["/nowhere", "/legacyx/a"] {
        let (status, ct, _) =
            status_and_json(gw.http.get(gw.url(path)).send().await.expect("get")).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(ct.as_deref(), Some("application/problem+json"));
    }
    assert_eq!(legacy.calls(), 1);
    // The gateway's own endpoints.
    let doc: Value = gw
        .http
        .get(gw.url("/openapi.json"))
        .send()
        .await
        .expect("doc")
        .json()
        .await
        .expect("json");
    assert!(doc["paths"]["/api/orders/{id}"]["get"].is_object());
    assert!(gw
        .metrics()
        .await
        .contains("gateway_upstream_requests_total{upstream=\"legacy\",outcome=\"ok\"}"));
}

/// Requests a replica served on the routes the aggregated view calls (`/orders/{id}` and its
/// timeline), from its own `http_requests_total`; 0 while it does not answer.
async fn order_reads_served(http: &reqwest::Client, replica: &str) -> u64 {
    let Ok(r) = http.get(format!("{replica}/metrics")).send().await else {
        return 0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.starts_with("http_requests_total{")
                && l.contains("method=\"GET\"")
                && (l.contains("route=\"/orders/{id}\"")
                    || l.contains("route=\"/orders/{id}/timeline\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Two real replicas of each service on Postgres behind the gateway: reads are spread over both
/// order replicas; one SIGKILLed, every request still succeeds (the attempt that meets the dead
/// replica is sent again to the live one, and the replica leaves the rotation: ejected after
/// `GATEWAY_EJECT_FAILURES` failed attempts, and by the next `/readyz` poll); restarted, it is
/// polled ready and gets its share again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_order_replicas_share_the_reads_and_one_killed_costs_no_request() {
    let mut config = SystemConfig::new(event_toolkit::Backend::Postgres);
    config.replicas = 2;
    let mut system = System::start(config).await;
    system.set_stock("WIDGET", 100).await;
    system.set_balance("alice", 100_000).await;
    let both = |svc: Service| {
        format!(
            "{},{}",
            system.replica_url(svc, 0),
            system.replica_url(svc, 1)
        )
    };
    let gw = Gateway::start(&[
        ("ORDER_UPSTREAMS", both(Service::Order)),
        ("INVENTORY_UPSTREAMS", both(Service::Inventory)),
        ("PAYMENT_UPSTREAMS", both(Service::Payment)),
        ("GATEWAY_PROBE_INTERVAL_MS", "200".into()),
        ("GATEWAY_EJECT_MS", "1000".into()),
        ("GATEWAY_RATE_PER_SEC", "10000".into()),
        ("GATEWAY_RATE_BURST", "10000".into()),
    ])
    .await;
    let alice = Gateway::token("alice");
    let r = gw
        .http
        .post(gw.url("/api/orders"))
        .header("authorization", bearer(&alice))
        .json(&order_body())
        .send()
        .await
        .expect("place");
    let (status, _, order) = status_and_json(r).await;
    assert_eq!(status, 202, "{order}");
    let id = order["id"].as_str().expect("id").to_owned();
    system.wait_terminal(&id).await;

    // Every view whole: the order and each part answered.
    let views = |n: usize| {
        let (gw, alice, path) = (&gw, &alice, format!("/api/orders/{id}"));
        async move {
            for i in 0..n {
                let r = gw
                    .http
                    .get(gw.url(&path))
                    .header("authorization", bearer(alice))
                    .send()
                    .await
                    .expect("view");
                let (status, _, view) = status_and_json(r).await;
                assert_eq!(status, 200, "view {i}: {view}");
                for part in ["reservations", "payments"] {
                    assert!(view[part].is_array(), "view {i}: {part}: {view}");
                }
                assert!(view["timeline"]["events"].is_array(), "view {i}: {view}");
            }
        }
    };
    let urls = [
        system.replica_url(Service::Order, 0),
        system.replica_url(Service::Order, 1),
    ];
    let served = || async {
        [
            order_reads_served(&gw.http, &urls[0]).await,
            order_reads_served(&gw.http, &urls[1]).await,
        ]
    };
    // 20 views are 40 order reads, round robin over the two.
    let before = served().await;
    views(20).await;
    let after = served().await;
    let share = [after[0] - before[0], after[1] - before[1]];
    assert_eq!(share[0] + share[1], 40, "{share:?}");
    assert!(
        share.iter().all(|&n| n >= 15),
        "both replicas serve: {share:?}"
    );

    // One replica SIGKILLed: not one view fails, before or after the gateway notices.
    system.kill_replica(Service::Order, 1);
    let before = served().await[0];
    views(20).await;
    assert_eq!(
        served().await[0] - before,
        40,
        "the live replica serves them all"
    );
    wait_for(WAIT, "the dead replica to leave the rotation", || async {
        let r = gw.readyz().await;
        let replica = &r["upstreams"]["order"]["replicas"][1];
        (replica["ready"] == false && r["ready"] == true).then_some(())
    })
    .await;
    views(10).await;
    assert!(
        gw.metrics()
            .await
            .contains("gateway_circuit_state{upstream=\"order\"} 0"),
        "a dead replica is not a dead upstream: the circuit stays closed"
    );

    // Back: polled ready, out of its ejection, and given its share again.
    system.restart_replica(Service::Order, 1).await;
    wait_for(
        WAIT,
        "the restarted replica to rejoin the rotation",
        || async {
            let r = gw.readyz().await;
            let replica = &r["upstreams"]["order"]["replicas"][1];
            (replica["ready"] == true && replica["ejected"] == false).then_some(())
        },
    )
    .await;
    let before = served().await;
    views(20).await;
    let after = served().await;
    let share = [after[0] - before[0], after[1] - before[1]];
    assert_eq!(share[0] + share[1], 40, "{share:?}");
    assert!(
        share[1] >= 15,
        "the restarted replica serves again: {share:?}"
    );
}

/// A customer's list is one call to the order service, filtered there by the token's customer;
/// the caller's paging is passed on and the upstream's page comes back as it is.
#[tokio::test]
async fn a_customers_list_is_one_filtered_call_to_the_order_service() {
    let orders = StandIn::start("orders").await;
    let gw = Gateway::start(&[("ORDER_UPSTREAMS", orders.url())]).await;
    let r = gw
        .http
        .get(gw.url("/api/orders?limit=5&after=cursor-1&status=CONFIRMED"))
        .header("authorization", bearer(&Gateway::token("alice")))
        .send()
        .await
        .expect("list");
    let (status, _, page) = status_and_json(r).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["backend"], "orders");
    let received = orders.received();
    assert_eq!(received.len(), 1, "{received:?}");
    let target = reqwest::Url::parse(&format!("http://x{}", received[0].target)).expect("url");
    assert_eq!(target.path(), "/orders");
    let query: std::collections::BTreeMap<String, String> =
        target.query_pairs().into_owned().collect();
    assert_eq!(
        query,
        [
            ("after", "cursor-1"),
            ("customer_id", "alice"),
            ("limit", "5"),
            ("status", "CONFIRMED"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
    );
    // A customer cannot widen the filter to someone else.
    let r = gw
        .http
        .get(gw.url("/api/orders?customer_id=bob"))
        .header("authorization", bearer(&Gateway::token("alice")))
        .send()
        .await
        .expect("list");
    assert_eq!(r.status(), 200);
    let last = orders.received().pop().expect("a call");
    assert!(last.target.contains("customer_id=alice"), "{}", last.target);
    assert!(!last.target.contains("bob"), "{}", last.target);
}

/// Latency added by the gateway: `cargo test -p saga-e2e --test gateway gateway_overhead -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn gateway_overhead() {
    let system = System::start(SystemConfig::new(event_toolkit::Backend::Sqlite)).await;
    system.set_stock("WIDGET", 10).await;
    system.set_balance("alice", 10_000).await;
    let order = system.url(Service::Order);
    let gw = Gateway::start(&[
        ("ORDER_UPSTREAMS", order.clone()),
        ("INVENTORY_UPSTREAMS", system.url(Service::Inventory)),
        ("PAYMENT_UPSTREAMS", system.url(Service::Payment)),
        ("GATEWAY_ROUTES", format!("/direct={order}")),
        ("GATEWAY_RATE_PER_SEC", "100000".into()),
        ("GATEWAY_RATE_BURST", "100000".into()),
        ("RUST_LOG", "warn".into()),
    ])
    .await;
    let token = Gateway::token("alice");
    let id = system.place_order("alice", &[("WIDGET", 1, 500)]).await;
    system.wait_terminal(&id).await;
    let n = 2000;
    let measure = |url: String, auth: bool| {
        let http = gw.http.clone();
        let token = token.clone();
        async move {
            let mut times = Vec::with_capacity(n);
            for i in 0..n + 100 {
                let mut req = http.get(&url);
                if auth {
                    req = req.header("authorization", bearer(&token));
                }
                let started = std::time::Instant::now();
                let r = req.send().await.expect("get");
                assert_eq!(r.status(), 200);
                r.bytes().await.expect("body");
                // The first 100 warm the pools up.
                if i >= 100 {
                    times.push(started.elapsed().as_secs_f64() * 1e3);
                }
            }
            times.sort_by(f64::total_cmp);
            (times[n / 2], times[n * 99 / 100])
        }
    };
    let direct = measure(format!("{order}/orders/{id}"), false).await;
    let routed = measure(gw.url(&format!("/direct/orders/{id}")), false).await;
    let view = measure(gw.url(&format!("/api/orders/{id}")), true).await;
    println!(
        "GET /orders/{{id}} direct:                  p50 {:.2} ms  p99 {:.2} ms",
        direct.0, direct.1
    );
    println!(
        "same through the gateway (routed prefix): p50 {:.2} ms  p99 {:.2} ms",
        routed.0, routed.1
    );
    println!(
        "GET /api/orders/{{id}} (token + 4 calls):   p50 {:.2} ms  p99 {:.2} ms",
        view.0, view.1
    );
}
