//! The API says what it does: schemathesis generates requests from each service's and the
//! gateway's own `/openapi.json` and checks every answer against that document (no 5xx, every status, content type
//! and body documented). Also: every list endpoint pages with a cursor, and paging visits each item
//! exactly once.
//!
//! schemathesis is a Python tool, pinned and installed into `.tools` by `scripts/install-deps.sh`;
//! `SCHEMATHESIS_BIN` overrides where it is looked for. Without it these tests fail, never skip.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use event_toolkit::testing::{eventually, repo_root};
use event_toolkit::Backend;
use saga_e2e::gateway::Gateway;
use saga_e2e::{Service, System, SystemConfig, ADMIN_TOKEN, WAIT};
use serde_json::Value;

use event_toolkit::on_both_backends as on_backends;

on_backends!(
    every_answer_matches_the_openapi_document,
    lists_page_with_a_cursor_visiting_each_item_once,
);

/// Checks run on every answer: all of schemathesis' (no 5xx; status, content type, headers and body
/// as documented; admin routes refuse requests without the token; undocumented methods answer 405;
/// what a 2xx created can be read back), except two that hold a request valid by its schema alone:
/// - `positive_data_acceptance` expects a 2xx for any schema-valid request, but rules the schema
///   does not carry are answered with a documented 4xx: a list cursor is an opaque string and any
///   other string is a 400; `1.0` is a JSON Schema integer but not an amount here (422); a line's
///   SKU or quantity out of range is a 422;
/// - `negative_data_rejection` expects a 4xx for any schema-violating request, but an empty query
///   value (`?status=`, `?limit=`) means "not given", as in an HTML form.
const EXCLUDED_CHECKS: &str = "positive_data_acceptance,negative_data_rejection";

/// Test cases per operation and phase: one service's run takes 15-30 s on an idle 2-core machine.
const MAX_EXAMPLES: &str = "40";

fn schemathesis_bin() -> PathBuf {
    let bin = std::env::var_os("SCHEMATHESIS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".tools/bin/schemathesis"));
    assert!(
        bin.is_file(),
        "schemathesis not found at {} (run scripts/install-deps.sh, or set SCHEMATHESIS_BIN)",
        bin.display()
    );
    bin
}

/// Run schemathesis against `base`'s `/openapi.json`, sending `token` as the bearer and these
/// fixed parameter values (`("path.id", id)`: requests about data that exists); returns its exit
/// status and output.
async fn schemathesis(base: &str, token: &str, fixed: &[(&str, &str)]) -> (bool, String) {
    let bin = schemathesis_bin();
    let (base, token) = (base.to_owned(), token.to_owned());
    let config: String = std::iter::once("[parameters]\n".to_owned())
        .chain(fixed.iter().map(|(k, v)| format!("{k:?} = {v:?}\n")))
        .collect();
    tokio::task::spawn_blocking(move || {
        // Its example database and reports go to a scratch directory, not the working tree.
        let scratch = tempfile::tempdir().expect("scratch dir");
        let config_file = scratch.path().join("schemathesis.toml");
        std::fs::write(&config_file, config).expect("schemathesis.toml");
        // Overridable to explore: another seed, or `SCHEMATHESIS_EXCLUDE_CHECKS=` for every check.
        let seed = std::env::var("SCHEMATHESIS_SEED").unwrap_or_else(|_| "20240917".into());
        let excluded =
            std::env::var("SCHEMATHESIS_EXCLUDE_CHECKS").unwrap_or_else(|_| EXCLUDED_CHECKS.into());
        let out = Command::new(&bin)
            .current_dir(scratch.path())
            .arg("--config-file")
            .arg(&config_file)
            .args(["run", &format!("{base}/openapi.json")])
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args(["--checks", "all"])
            .args(if excluded.is_empty() {
                vec![]
            } else {
                vec!["--exclude-checks", excluded.as_str()]
            })
            .args(["--max-examples", MAX_EXAMPLES])
            .args(["--seed", &seed])
            .args(["--workers", "1"])
            .args(["--request-timeout", "10"])
            .args(["--generation-database", "none"])
            .args(["--no-color", "--output-truncate", "false"])
            .env("NO_COLOR", "1")
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    })
    .await
    .expect("schemathesis task")
}

/// Every document declares the admin bearer scheme, and every admin or seeding route requires it.
async fn assert_admin_routes_are_documented_as_such(s: &System, svc: Service) {
    let doc = s.get_json(svc, "/openapi.json").await;
    let scheme = &doc["components"]["securitySchemes"]["admin_token"];
    assert_eq!(scheme["type"], "http", "{}: {scheme}", svc.binary());
    assert_eq!(scheme["scheme"], "bearer", "{}: {scheme}", svc.binary());
    let admin_routes: &[(&str, &str)] = match svc {
        Service::Order => &[],
        Service::Inventory => &[("/products/{sku}", "put")],
        Service::Payment => &[
            ("/accounts/{customer_id}", "put"),
            ("/admin/gateway", "put"),
            ("/admin/gateway", "get"),
        ],
    };
    let shared = [
        ("/admin/dead-letters", "get"),
        ("/admin/stats", "get"),
        ("/admin/outbox/parked", "get"),
        ("/admin/outbox/parked/retry", "post"),
        ("/admin/outbox/parked/{id}/retry", "post"),
    ];
    for (path, method) in admin_routes.iter().chain(&shared) {
        let op = &doc["paths"][path][method];
        assert_eq!(
            op["security"],
            serde_json::json!([{"admin_token": []}]),
            "{} {method} {path}",
            svc.binary()
        );
        for status in ["401", "403"] {
            assert_eq!(
                op["responses"][status]["content"]["application/problem+json"]["schema"]["$ref"],
                "#/components/schemas/Problem",
                "{} {method} {path} {status}",
                svc.binary()
            );
        }
    }
}

async fn every_answer_matches_the_openapi_document(backend: Backend) {
    let s = System::start(SystemConfig::new(backend)).await;
    for svc in Service::ALL {
        assert_admin_routes_are_documented_as_such(&s, svc).await;
    }
    // A little data, so reads find something and the order lists have pages.
    s.set_stock("WIDGET", 1_000).await;
    s.set_balance("alice", 1_000_000).await;
    let order = s.place_order("alice", &[("WIDGET", 1, 250)]).await;
    s.wait_terminal(&order).await;

    let mut failed = Vec::new();
    for svc in Service::ALL {
        let started = Instant::now();
        let (ok, output) = schemathesis(&s.url(svc), ADMIN_TOKEN, &[]).await;
        let took = started.elapsed();
        eprintln!(
            "---- schemathesis against {} ({backend:?}, {:.1} s) ----\n{output}",
            svc.binary(),
            took.as_secs_f64()
        );
        if !ok {
            failed.push(svc.binary());
        }
    }
    assert!(
        failed.is_empty(),
        "schemathesis found answers the OpenAPI document does not describe on {failed:?} (output above)"
    );
}

/// The gateway against its own document, in front of the real services, as a customer: every
/// answer (its own and those it passes on from the services) is one the document describes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gateway_answer_matches_its_openapi_document() {
    let s = System::start(SystemConfig::new(Backend::Sqlite)).await;
    s.set_stock("WIDGET", 1_000).await;
    s.set_balance("alice", 1_000_000).await;
    let order = s.place_order("alice", &[("WIDGET", 1, 250)]).await;
    s.wait_terminal(&order).await;
    let gw = Gateway::start(&[
        ("ORDER_UPSTREAMS", s.url(Service::Order)),
        ("INVENTORY_UPSTREAMS", s.url(Service::Inventory)),
        ("PAYMENT_UPSTREAMS", s.url(Service::Payment)),
        // Schemathesis sends far more than a customer would; the rate limit has its own test.
        ("GATEWAY_RATE_PER_SEC", "100000".into()),
        ("GATEWAY_RATE_BURST", "100000".into()),
    ])
    .await;
    let started = Instant::now();
    // The customer's own order, so the view and the cancel answer more than 404s.
    let (ok, output) = schemathesis(
        &gw.url(""),
        &Gateway::token("alice"),
        &[("path.id", order.as_str())],
    )
    .await;
    eprintln!(
        "---- schemathesis against api-gateway ({:.1} s) ----\n{output}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        ok,
        "schemathesis found gateway answers its OpenAPI document does not describe (output above)"
    );
}

/// Every item of a list, following `next` from the first page; checks each page's shape.
async fn all_pages(s: &System, svc: Service, first: &str) -> (Vec<Value>, Vec<usize>) {
    let (mut items, mut sizes, mut path) = (Vec::new(), Vec::new(), first.to_owned());
    loop {
        let page = s.get_json(svc, &path).await;
        let page_items = page["items"]
            .as_array()
            .unwrap_or_else(|| panic!("{path}: {page}"));
        sizes.push(page_items.len());
        items.extend(page_items.iter().cloned());
        match &page["next"] {
            Value::Null => return (items, sizes),
            Value::String(next) => {
                assert!(
                    !page_items.is_empty(),
                    "{path}: a cursor after an empty page"
                );
                let sep = if first.contains('?') { '&' } else { '?' };
                path = format!("{first}{sep}after={next}");
            }
            other => panic!("{path}: next is {other}"),
        }
        assert!(sizes.len() <= 1000, "{first}: paging does not end");
    }
}

/// `GET path` answers a 400 problem.
async fn assert_bad_request(s: &System, svc: Service, path: &str) {
    let r = s
        .http
        .get(format!("{}{path}", s.url(svc)))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 400, "{path}");
    assert_eq!(
        r.headers()["content-type"],
        "application/problem+json",
        "{path}"
    );
}

async fn lists_page_with_a_cursor_visiting_each_item_once(backend: Backend) {
    let s = System::start(SystemConfig::new(backend)).await;
    let skus: Vec<String> = (0..25).map(|i| format!("SKU-{i:02}")).collect();
    for sku in &skus {
        s.set_stock(sku, 100).await;
    }
    s.set_balance("alice", 1_000_000).await;
    let mut placed = Vec::new();
    for sku in &skus {
        placed.push(s.place_order("alice", &[(sku, 1, 10)]).await);
    }

    // Orders: newest first, 10 a page, each exactly once, `next` null on the last page.
    let (orders, sizes) = all_pages(&s, Service::Order, "/orders?limit=10").await;
    assert_eq!(sizes, [10, 10, 5]);
    let ids: Vec<&str> = orders.iter().map(|o| o["id"].as_str().unwrap()).collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 25, "{ids:?}");
    assert_eq!(
        ids.iter().copied().collect::<BTreeSet<_>>(),
        placed.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    // Compared as instants: RFC 3339 drops trailing zeros of the fraction (".523Z"), so the
    // strings do not sort as the times do.
    let created: Vec<chrono::DateTime<chrono::FixedOffset>> = orders
        .iter()
        .map(|o| chrono::DateTime::parse_from_rfc3339(o["created_at"].as_str().unwrap()).unwrap())
        .collect();
    assert!(
        created.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {created:?}"
    );
    // A page size that divides the list: the last full page already says there is no next one.
    let (_, sizes) = all_pages(&s, Service::Order, "/orders?limit=5").await;
    assert_eq!(sizes, [5, 5, 5, 5, 5]);

    // With a status filter, once every saga is over.
    for id in &placed {
        s.wait_terminal(id).await;
    }
    let (confirmed, _) = all_pages(&s, Service::Order, "/orders?status=CONFIRMED&limit=7").await;
    assert_eq!(confirmed.len(), 25);
    assert!(confirmed.iter().all(|o| o["status"] == "CONFIRMED"));

    // One customer's orders: only theirs, each once, newest first, with or without a status.
    s.set_balance("bob", 15).await;
    let mut bobs = Vec::new();
    for sku in &skus[..3] {
        bobs.push(s.place_order("bob", &[(sku, 1, 10)]).await);
    }
    for id in &bobs {
        s.wait_terminal(id).await;
    }
    let (alices, sizes) = all_pages(&s, Service::Order, "/orders?customer_id=alice&limit=10").await;
    assert_eq!(sizes, [10, 10, 5]);
    assert_eq!(
        alices
            .iter()
            .map(|o| o["id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ids,
        "the same order as the whole list"
    );
    let (of_bob, sizes) = all_pages(&s, Service::Order, "/orders?customer_id=bob&limit=2").await;
    assert_eq!(sizes, [2, 1]);
    assert!(of_bob.iter().all(|o| o["customer_id"] == "bob"));
    assert_eq!(
        of_bob
            .iter()
            .map(|o| o["id"].as_str().unwrap())
            .collect::<BTreeSet<_>>(),
        bobs.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    // Bob's balance pays one of his three.
    let (bob_confirmed, _) = all_pages(
        &s,
        Service::Order,
        "/orders?customer_id=bob&status=CONFIRMED&limit=1",
    )
    .await;
    assert_eq!(bob_confirmed.len(), 1);
    assert_eq!(bob_confirmed[0]["customer_id"], "bob");
    let (nobodys, sizes) = all_pages(&s, Service::Order, "/orders?customer_id=nobody").await;
    assert_eq!((nobodys.len(), sizes), (0, vec![0]));

    // Products: by SKU.
    let (products, sizes) = all_pages(&s, Service::Inventory, "/products?limit=10").await;
    assert_eq!(sizes, [10, 10, 5]);
    let listed: Vec<&str> = products
        .iter()
        .map(|p| p["sku"].as_str().unwrap())
        .collect();
    assert_eq!(listed, skus.iter().map(String::as_str).collect::<Vec<_>>());

    // An order's reservations and payments answer the same shape.
    let two_lines = s
        .place_order("alice", &[("SKU-01", 1, 10), ("SKU-02", 1, 10)])
        .await;
    s.wait_terminal(&two_lines).await;
    let (reservations, sizes) = all_pages(
        &s,
        Service::Inventory,
        &format!("/reservations?order_id={two_lines}&limit=1"),
    )
    .await;
    assert_eq!(sizes, [1, 1]);
    assert_eq!(reservations[0]["sku"], "SKU-01");
    assert_eq!(reservations[1]["sku"], "SKU-02");
    let (payments, sizes) = all_pages(
        &s,
        Service::Payment,
        &format!("/payments?order_id={two_lines}&limit=1"),
    )
    .await;
    assert_eq!((payments.len(), sizes), (1, vec![1]));

    // Dead letters: newest first.
    for i in 0..5 {
        let id = format!("poison-{i}");
        s.nats_pub("cmd.orders.place.v1", &[("Nats-Msg-Id", &id)], b"not json")
            .await;
    }
    eventually(WAIT, "five dead letters", || async {
        (s.dead_letters(Service::Order).await.len() == 5).then_some(())
    })
    .await;
    let (letters, sizes) = all_pages(&s, Service::Order, "/admin/dead-letters?limit=2").await;
    assert_eq!(sizes, [2, 2, 1]);
    let letter_ids: Vec<i64> = letters.iter().map(|l| l["id"].as_i64().unwrap()).collect();
    assert!(letter_ids.windows(2).all(|w| w[0] > w[1]), "{letter_ids:?}");

    // Bounds and cursors that no page handed out.
    let too_long = "x".repeat(65);
    for (svc, path) in [
        (Service::Order, "/orders?limit=0".to_owned()),
        (Service::Order, "/orders?limit=1001".to_owned()),
        (Service::Order, "/orders?after=not-a-cursor".to_owned()),
        (Service::Order, "/orders?after=12.not-a-uuid".to_owned()),
        (Service::Inventory, "/products?limit=0".to_owned()),
        (Service::Inventory, "/products?after=bad%20sku".to_owned()),
        (
            Service::Inventory,
            format!("/reservations?order_id={two_lines}&after=bad%20sku"),
        ),
        (
            Service::Payment,
            format!("/payments?order_id={two_lines}&after={too_long}"),
        ),
        (Service::Order, "/admin/dead-letters?after=x".to_owned()),
        (Service::Order, "/admin/dead-letters?limit=1001".to_owned()),
        (Service::Order, "/orders?limit=1&limit=2".to_owned()),
        (Service::Order, "/orders?customer_id=bad%20id".to_owned()),
        (Service::Order, format!("/orders?customer_id={too_long}")),
        (
            Service::Order,
            "/orders?customer_id=alice&after=not-a-cursor".to_owned(),
        ),
        (
            Service::Order,
            "/orders?customer_id=alice&status=LOST".to_owned(),
        ),
    ] {
        assert_bad_request(&s, svc, &path).await;
    }
}
