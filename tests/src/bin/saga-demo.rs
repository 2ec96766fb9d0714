//! Drives a running system the way a user would: seeds products and accounts over HTTP, runs three
//! sample sagas (confirmed, out of stock, payment failure) and prints each saga's timeline as the
//! order service serves it (`GET /orders/{id}/timeline`).
//!
//! Settings come from the environment: `ORDER_URL`, `INVENTORY_URL`, `PAYMENT_URL` (defaults
//! 127.0.0.1:8081/8082/8083), `ADMIN_TOKEN` (for seeding).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn env(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Demo {
    http: reqwest::Client,
    order: String,
    inventory: String,
    payment: String,
}

/// How long a sample saga may take to show all its events.
const SAGA_WITHIN: Duration = Duration::from_secs(60);

impl Demo {
    async fn put(&self, url: String, body: Value) -> Result<(), Error> {
        let r = self.http.put(&url).json(&body).send().await?;
        if !r.status().is_success() {
            return Err(format!("PUT {url}: {} {}", r.status(), r.text().await?).into());
        }
        Ok(())
    }

    async fn place(&self, customer: &str, items: Value) -> Result<String, Error> {
        let r = self
            .http
            .post(format!("{}/orders", self.order))
            .json(&json!({ "customer_id": customer, "currency": "EUR", "items": items }))
            .send()
            .await?;
        let status = r.status();
        let body: Value = r.json().await?;
        if status != 202 {
            return Err(format!("POST /orders: {status} {body}").into());
        }
        Ok(body["id"].as_str().unwrap_or_default().to_owned())
    }

    /// The order's timeline once the order is terminal and every event in `expect` is in it. The
    /// three streams are read by separate durables, so an event can show up a moment after the
    /// order's status has moved on.
    async fn timeline(&self, id: &str, expect: &[&str]) -> Result<Value, Error> {
        let start = Instant::now();
        loop {
            let r = self
                .http
                .get(format!("{}/orders/{id}/timeline", self.order))
                .send()
                .await?;
            let status = r.status();
            let t: Value = r.json().await?;
            if status != 200 {
                return Err(format!("GET /orders/{id}/timeline: {status} {t}").into());
            }
            let have: Vec<&str> = t["events"]
                .as_array()
                .map(|a| a.iter().filter_map(|e| e["type"].as_str()).collect())
                .unwrap_or_default();
            let terminal = matches!(t["status"].as_str(), Some("CONFIRMED" | "CANCELLED"));
            if terminal && expect.iter().all(|ty| have.contains(ty)) {
                return Ok(t);
            }
            if start.elapsed() > SAGA_WITHIN {
                return Err(format!(
                    "order {id}: after {SAGA_WITHIN:?} it is {} with {have:?}, expected {expect:?}",
                    t["status"]
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn saga(
    demo: &Demo,
    title: &str,
    customer: &str,
    items: Value,
    expect: &[&str],
) -> Result<(), Error> {
    let id = demo.place(customer, items).await?;
    let t = demo.timeline(&id, expect).await?;
    println!();
    println!("── {title} ── order {id}");
    let events = t["events"].as_array().cloned().unwrap_or_default();
    let time = |e: &Value| {
        e["time"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    };
    let t0 = events.first().and_then(time);
    for e in &events {
        let offset = match (t0, time(e)) {
            (Some(t0), Some(t)) => (t - t0).num_microseconds().unwrap_or(0) as f64 / 1000.0,
            _ => 0.0,
        };
        let step = e["latency_ms"]
            .as_f64()
            .map(|l| format!("Δ{l:>6.1} ms"))
            .unwrap_or_default();
        let line = format!(
            "  +{offset:>7.1} ms  {step:<10}  {:<24} {:<18} {}",
            e["type"].as_str().unwrap_or("?"),
            e["source"].as_str().unwrap_or("?").trim_start_matches('/'),
            e["summary"].as_str().unwrap_or("")
        );
        println!("{}", line.trim_end());
    }
    let reason = t["reason"]
        .as_str()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    println!("  ⇒ {}{reason}", t["status"].as_str().unwrap_or("?"));
    Ok(())
}

/// Seeding goes through admin routes: send `ADMIN_TOKEN` (from the environment) as a bearer token.
fn admin_headers() -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    let token = std::env::var("ADMIN_TOKEN").unwrap_or_default();
    if let Ok(v) = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")) {
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    headers
}

async fn run() -> Result<(), Error> {
    let demo = Demo {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .default_headers(admin_headers())
            .build()?,
        order: env("ORDER_URL", "http://127.0.0.1:8081"),
        inventory: env("INVENTORY_URL", "http://127.0.0.1:8082"),
        payment: env("PAYMENT_URL", "http://127.0.0.1:8083"),
    };
    println!("Seeding: WIDGET 100 in stock, GADGET 5; alice has 1000.00 EUR, bob 5.00 EUR.");
    demo.put(
        format!("{}/products/WIDGET", demo.inventory),
        json!({ "available": 100 }),
    )
    .await?;
    demo.put(
        format!("{}/products/GADGET", demo.inventory),
        json!({ "available": 5 }),
    )
    .await?;
    demo.put(
        format!("{}/accounts/alice", demo.payment),
        json!({ "balance_minor": 100_000, "currency": "EUR" }),
    )
    .await?;
    demo.put(
        format!("{}/accounts/bob", demo.payment),
        json!({ "balance_minor": 500, "currency": "EUR" }),
    )
    .await?;
    demo.put(
        format!("{}/admin/gateway", demo.payment),
        json!({ "mode": "ok" }),
    )
    .await?;

    saga(
        &demo,
        "1. confirmed",
        "alice",
        json!([{ "sku": "WIDGET", "quantity": 2, "unit_price_minor": 1250 }]),
        &[
            "orders.placed.v1",
            "inventory.reserved.v1",
            "payments.succeeded.v1",
            "orders.confirmed.v1",
            "inventory.committed.v1",
        ],
    )
    .await?;
    saga(
        &demo,
        "2. out of stock",
        "alice",
        json!([{ "sku": "GADGET", "quantity": 10, "unit_price_minor": 990 }]),
        &[
            "orders.placed.v1",
            "inventory.rejected.v1",
            "orders.cancelled.v1",
        ],
    )
    .await?;
    saga(
        &demo,
        "3. payment failure",
        "bob",
        json!([{ "sku": "WIDGET", "quantity": 1, "unit_price_minor": 1250 }]),
        &[
            "orders.placed.v1",
            "inventory.reserved.v1",
            "payments.failed.v1",
            "inventory.released.v1",
            "orders.cancelled.v1",
        ],
    )
    .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("saga-demo: {e}");
            ExitCode::FAILURE
        }
    }
}
