//! `GET /metrics` on every service after one confirmed and one compensated saga: the counters
//! moved exactly as the sagas did, and `promtool check metrics` accepts each exposition.

use std::io::Write;
use std::process::{Command, Stdio};

use event_toolkit::Backend;
use saga_e2e::invariants::{check, wait_quiet};
use saga_e2e::{Service, System, SystemConfig, WAIT};

use event_toolkit::on_both_backends as on_backends;

on_backends!(metrics_count_what_the_sagas_did_and_pass_promtool);

/// The value of one series, matched by name and exactly these labels.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, v) = line.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let mut found: Vec<(String, String)> = rest
                .split("\",")
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k.to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect();
            found.sort();
            let mut wanted: Vec<(String, String)> = labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            wanted.sort();
            (found == wanted).then(|| v.parse().ok()).flatten()
        })
}

async fn scrape(s: &System, svc: Service) -> String {
    let r = reqwest::get(format!("{}/metrics", s.url(svc)))
        .await
        .expect("scrape");
    assert_eq!(r.status(), 200, "/metrics needs no token");
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap_or_default()
        .starts_with("text/plain"));
    r.text().await.expect("text")
}

fn promtool() -> String {
    std::env::var("PROMTOOL_BIN").unwrap_or_else(|_| "promtool".to_owned())
}

fn promtool_accepts(text: &str, what: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found: scripts/install-deps.sh installs it (Debian's prometheus)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics refused {what}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn metrics_count_what_the_sagas_did_and_pass_promtool(b: Backend) {
    let s = System::start(SystemConfig::new(b)).await;
    s.set_stock("WIDGET", 10).await;
    s.set_balance("alice", 10_000).await;
    s.set_balance("bob", 100).await;
    let ok = s.place_order("alice", &[("WIDGET", 2, 100)]).await;
    let poor = s.place_order("bob", &[("WIDGET", 1, 500)]).await;
    assert_eq!(s.wait_terminal(&ok).await["status"], "CONFIRMED");
    assert_eq!(s.wait_terminal(&poor).await["reason"], "insufficient_funds");
    wait_quiet(&s, WAIT).await;

    // Counters move after the commit; sampled gauges within a sample interval.
    let order = saga_e2e::wait_for(WAIT, "order metrics", || async {
        let t = scrape(&s, Service::Order).await;
        let done = value(
            &t,
            "sagas_terminal_total",
            &[("status", "CANCELLED"), ("reason", "insufficient_funds")],
        ) == Some(1.0)
            && value(&t, "outbox_pending_rows", &[]) == Some(0.0)
            && value(
                &t,
                "consumer_lag_messages",
                &[("consumer", "order-from-payments")],
            ) == Some(0.0);
        done.then_some(t)
    })
    .await;
    let confirmed = value(
        &order,
        "sagas_terminal_total",
        &[("status", "CONFIRMED"), ("reason", "")],
    );
    assert_eq!(confirmed, Some(1.0), "{order}");
    assert_eq!(
        value(
            &order,
            "saga_duration_seconds_count",
            &[("status", "CANCELLED")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &order,
            "http_requests_total",
            &[("method", "POST"), ("route", "/orders"), ("status", "202")]
        ),
        Some(2.0),
        "{order}"
    );
    assert_eq!(
        value(
            &order,
            "consumer_messages_total",
            &[
                ("consumer", "order-from-payments"),
                ("event_type", "payments.succeeded.v1"),
                ("outcome", "applied")
            ]
        ),
        Some(1.0)
    );
    // placed ×2, confirmed, cancelled.
    assert_eq!(value(&order, "outbox_published_total", &[]), Some(4.0));
    assert_eq!(value(&order, "orders_open_past_deadline", &[]), Some(0.0));
    assert_eq!(value(&order, "dead_letters_stored", &[]), Some(0.0));
    assert!(
        !order.contains(&ok) && !order.contains(&poor),
        "no order id in any label"
    );

    let inventory = scrape(&s, Service::Inventory).await;
    assert_eq!(
        value(
            &inventory,
            "consumer_messages_total",
            &[
                ("consumer", "inventory-from-orders"),
                ("event_type", "orders.placed.v1"),
                ("outcome", "applied")
            ]
        ),
        Some(2.0),
        "{inventory}"
    );
    assert_eq!(
        value(
            &inventory,
            "consumer_messages_total",
            &[
                ("consumer", "inventory-from-payments"),
                ("event_type", "payments.failed.v1"),
                ("outcome", "applied")
            ]
        ),
        Some(1.0)
    );

    let payment = scrape(&s, Service::Payment).await;
    // Insufficient funds is decided by the account, not the provider: one call, approved.
    assert_eq!(
        value(
            &payment,
            "payment_provider_calls_total",
            &[("outcome", "approved")]
        ),
        Some(1.0),
        "{payment}"
    );
    assert_eq!(
        value(&payment, "payment_circuit_breaker_state", &[]),
        Some(0.0)
    );
    assert_eq!(value(&payment, "payment_bulkhead_in_use", &[]), Some(0.0));

    for (svc, text) in [
        (Service::Order, &order),
        (Service::Inventory, &inventory),
        (Service::Payment, &payment),
    ] {
        assert!(
            text.contains("outbox_publish_latency_seconds_bucket"),
            "{}: histograms, not summaries",
            svc.binary()
        );
        promtool_accepts(text, svc.binary());
    }
    check(&s).await.assert_clean();
}
