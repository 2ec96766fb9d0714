//! Bad input over every HTTP endpoint of the three services: malformed and truncated JSON, wrong
//! types, boundary and overflowing numbers, huge bodies, unknown ids, wrong methods and content
//! types. Never a 5xx, always `application/problem+json` for a 4xx, and nothing written. On SQLite
//! and on Postgres: a database error from a value SQLite takes but Postgres refuses (or the reverse)
//! would be a 5xx on one backend only.

use event_toolkit::Backend;
use saga_e2e::invariants::{check_allowing_no_orders, wait_quiet};
use saga_e2e::{Service, System, SystemConfig, WAIT};
use serde_json::Value;

/// (service, method, path, a valid body) for every endpoint that takes a body.
const WRITES: &[(Service, &str, &str, &str)] = &[
    (
        Service::Order,
        "POST",
        "/orders",
        r#"{"customer_id":"alice","currency":"EUR","items":[{"sku":"WIDGET","quantity":1,"unit_price_minor":5}]}"#,
    ),
    (
        Service::Inventory,
        "PUT",
        "/products/WIDGET",
        r#"{"available":7}"#,
    ),
    (
        Service::Payment,
        "PUT",
        "/accounts/alice",
        r#"{"balance_minor":7,"currency":"EUR"}"#,
    ),
    (
        Service::Payment,
        "PUT",
        "/admin/gateway",
        r#"{"mode":"decline"}"#,
    ),
];

/// Every read endpoint, with unknown ids and bad query values.
const READS: &[(Service, &str)] = &[
    (Service::Order, "/orders/not-a-uuid"),
    (
        Service::Order,
        "/orders/01a21859-0000-7000-8000-000000000000",
    ),
    (Service::Order, "/orders?status=LOST"),
    (Service::Order, "/orders?limit=0"),
    (Service::Order, "/orders?limit=99999999999999999999999"),
    (Service::Order, "/orders?limit=abc"),
    (Service::Inventory, "/products/NOPE"),
    (Service::Inventory, "/products/bad%20sku"),
    (Service::Inventory, "/reservations"),
    (Service::Inventory, "/reservations?order_id="),
    (Service::Payment, "/accounts/nobody"),
    (Service::Payment, "/payments"),
    (Service::Order, "/admin/dead-letters?limit=x"),
    (Service::Order, "/nothing/here"),
];

/// Bodies that must be refused, derived from a valid one.
fn mutations(valid: &str) -> Vec<(String, String)> {
    let mut out = vec![
        ("empty".to_owned(), String::new()),
        ("truncated".to_owned(), valid[..valid.len() / 2].to_owned()),
        ("not JSON".to_owned(), "{oops".to_owned()),
        ("array".to_owned(), "[]".to_owned()),
        ("null".to_owned(), "null".to_owned()),
        (
            "unknown field".to_owned(),
            valid.replacen('{', r#"{"surprise":1,"#, 1),
        ),
        (
            "huge".to_owned(),
            format!(r#"{{"pad":"{}"}}"#, "x".repeat(100 * 1024)),
        ),
    ];
    // Every value of the valid body replaced by wrong types and extreme numbers.
    let v: Value = serde_json::from_str(valid).expect("valid body");
    let mut paths = Vec::new();
    collect_scalars(&v, String::new(), &mut paths);
    for path in paths {
        for (label, replacement) in [
            ("string", Value::from("x")),
            ("negative", Value::from(-1)),
            ("i64 max", Value::from(i64::MAX)),
            ("float", Value::from(1.5)),
            ("bool", Value::from(true)),
            ("object", serde_json::json!({})),
        ] {
            let original = v.pointer(&path).expect("pointer");
            // Another string in a string field is a different valid request, not bad input.
            if original.is_string() && replacement.is_string() {
                continue;
            }
            let mut m = v.clone();
            *m.pointer_mut(&path).expect("pointer") = replacement;
            if m != v {
                out.push((format!("{path} = {label}"), m.to_string()));
            }
        }
        let overflow = v.to_string().replacen(
            &v.pointer(&path).expect("pointer").to_string(),
            "99999999999999999999999",
            1,
        );
        out.push((format!("{path} overflows"), overflow));
    }
    out
}

fn collect_scalars(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => m
            .iter()
            .for_each(|(k, x)| collect_scalars(x, format!("{at}/{k}"), out)),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| collect_scalars(x, format!("{at}/{i}"), out)),
        _ => out.push(at),
    }
}

/// What the services hold, to prove nothing was written.
async fn snapshot(s: &System) -> Vec<Value> {
    vec![
        s.get_json(Service::Order, "/orders?limit=1000").await,
        s.get_json(Service::Inventory, "/products").await,
        s.get_json(Service::Payment, "/accounts/alice").await,
        s.get_json(Service::Payment, "/admin/gateway").await,
    ]
}

macro_rules! on_backends {
    ($($backend:ident),* $(,)?) => {
        $(mod $backend {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn no_bad_input_gets_a_5xx_or_writes_anything() {
                super::no_bad_input_gets_a_5xx_or_writes_anything(on_backends!(@b $backend)).await
            }
        })*
    };
    (@b sqlite) => { event_toolkit::Backend::Sqlite };
    (@b postgres) => { event_toolkit::Backend::Postgres };
}

on_backends!(sqlite, postgres);

async fn no_bad_input_gets_a_5xx_or_writes_anything(backend: Backend) {
    let s = System::start(SystemConfig::new(backend)).await;
    s.set_stock("WIDGET", 10).await;
    s.set_balance("alice", 100).await;
    let before = snapshot(&s).await;
    let mut tried = 0;
    let mut failures = Vec::new();

    for (svc, method, path, valid) in WRITES {
        let url = format!("{}{path}", s.url(*svc));
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        for (label, body) in mutations(valid) {
            for content_type in ["application/json", "text/plain"] {
                let mut request = s
                    .http
                    .request(method.clone(), &url)
                    .header("content-type", content_type)
                    .body(body.clone());
                // A body over the limit is refused unread, and the server then drops the connection:
                // not one to reuse for the next request.
                if body.len() > 64 * 1024 {
                    request = request.header("connection", "close");
                }
                let r = request
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{method} {path} [{label}, {content_type}]: {e:?}"));
                tried += 1;
                let status = r.status().as_u16();
                let ct = r
                    .headers()
                    .get("content-type")
                    .map(|v| v.to_str().unwrap_or("").to_owned());
                // A mutation may still be a valid request (e.g. a boundary value that is allowed);
                // only 5xx or a non-problem error are failures here, writes are checked below.
                if status >= 500
                    || (status >= 400 && ct.as_deref() != Some("application/problem+json"))
                {
                    failures.push(format!(
                        "{method} {path} [{label}, {content_type}] → {status} {ct:?}"
                    ));
                }
                if status < 400 {
                    failures.push(format!(
                        "{method} {path} [{label}, {content_type}] was accepted: {status}"
                    ));
                }
            }
        }
        // Wrong methods on the same path.
        for wrong in ["DELETE", "PATCH"] {
            let r = s
                .http
                .request(reqwest::Method::from_bytes(wrong.as_bytes()).unwrap(), &url)
                .send()
                .await
                .unwrap();
            tried += 1;
            if r.status() != 405 {
                failures.push(format!("{wrong} {path} → {}", r.status()));
            }
        }
    }
    for (svc, path) in READS {
        let r = s
            .http
            .get(format!("{}{path}", s.url(*svc)))
            .send()
            .await
            .expect("request");
        tried += 1;
        let status = r.status().as_u16();
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or("").to_owned());
        if !(400..500).contains(&status) || ct.as_deref() != Some("application/problem+json") {
            failures.push(format!("GET {path} → {status} {ct:?}"));
        }
    }
    for (svc, path) in [
        (
            Service::Order,
            "/orders/01a21859-0000-7000-8000-000000000000/cancel",
        ),
        (Service::Order, "/orders/x/cancel"),
    ] {
        let r = s
            .http
            .post(format!("{}{path}", s.url(svc)))
            .send()
            .await
            .unwrap();
        tried += 1;
        if r.status() != 404 {
            failures.push(format!("POST {path} → {}", r.status()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {tried} requests misbehaved:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(tried > 150, "the generator produced too few cases: {tried}");
    assert_eq!(snapshot(&s).await, before, "nothing was written");
    wait_quiet(&s, WAIT).await;
    check_allowing_no_orders(&s).await.assert_clean();
}
