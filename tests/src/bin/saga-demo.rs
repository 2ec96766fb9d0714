//! Drives a running system the way a user would: seeds products and accounts over HTTP, runs three
//! sample sagas (confirmed, out of stock, payment failure) and prints each saga's events as a
//! timeline read back from the JetStream streams.
//!
//! Settings come from the environment: `ORDER_URL`, `INVENTORY_URL`, `PAYMENT_URL` (defaults
//! 127.0.0.1:8081/8082/8083), `NATS_URL`, `NATS_USER`, `NATS_PASSWORD`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use event_toolkit::Envelope;
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
    nats: async_nats::Client,
}

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

    async fn wait_terminal(&self, id: &str) -> Result<Value, Error> {
        let start = Instant::now();
        loop {
            let o: Value = self
                .http
                .get(format!("{}/orders/{id}", self.order))
                .send()
                .await?
                .json()
                .await?;
            if matches!(o["status"].as_str(), Some("CONFIRMED") | Some("CANCELLED")) {
                return Ok(o);
            }
            if start.elapsed() > Duration::from_secs(60) {
                return Err(format!("order {id} still {} after 60 s", o["status"]).into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The saga's events from the three streams, waiting briefly for the last ones to land.
    async fn timeline(&self, id: &str, expect_last: &str) -> Result<Vec<Envelope>, Error> {
        let js = async_nats::jetstream::new(self.nats.clone());
        let start = Instant::now();
        loop {
            let mut events = Vec::new();
            for name in ["ORDERS", "INVENTORY", "PAYMENTS"] {
                let stream = js.get_stream(name).await?;
                let last = stream.get_info().await?.state.last_sequence;
                for seq in 1..=last {
                    if let Ok(m) = stream.get_raw_message(seq).await {
                        if let Ok(e) = serde_json::from_slice::<Envelope>(&m.payload) {
                            if e.correlationid.as_deref() == Some(id) {
                                events.push(e);
                            }
                        }
                    }
                }
            }
            events.sort_by_key(|e| e.time);
            if events.iter().any(|e| e.event_type == expect_last)
                || start.elapsed() > Duration::from_secs(5)
            {
                return Ok(events);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn summary(e: &Envelope) -> String {
    let d = &e.data;
    let items = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|l| format!("{}×{}", l["sku"].as_str().unwrap_or("?"), l["quantity"]))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    match e.event_type.as_str() {
        "orders.placed.v1" => format!(
            "{} orders {} for {} {}",
            d["customer_id"].as_str().unwrap_or("?"),
            items(&d["items"]),
            d["total_minor"],
            d["currency"].as_str().unwrap_or("")
        ),
        "inventory.reserved.v1" | "inventory.released.v1" | "inventory.committed.v1" => {
            items(&d["items"])
        }
        "inventory.rejected.v1" => format!(
            "{} ({})",
            d["reason"].as_str().unwrap_or("?"),
            d["sku"].as_str().unwrap_or("?")
        ),
        "payments.succeeded.v1" | "payments.refunded.v1" => format!(
            "{} {}",
            d["amount_minor"],
            d["currency"].as_str().unwrap_or("")
        ),
        "payments.failed.v1" | "orders.cancelled.v1" => {
            d["reason"].as_str().unwrap_or("?").to_owned()
        }
        _ => String::new(),
    }
}

async fn saga(
    demo: &Demo,
    title: &str,
    customer: &str,
    items: Value,
    expect_last: &str,
) -> Result<(), Error> {
    let id = demo.place(customer, items).await?;
    let order = demo.wait_terminal(&id).await?;
    let events = demo.timeline(&id, expect_last).await?;
    println!();
    println!("── {title} ── order {id}");
    let t0 = events.first().map(|e| e.time);
    for e in &events {
        let offset = t0
            .map(|t| (e.time - t).num_microseconds().unwrap_or(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        println!(
            "  +{offset:>7.1} ms  {:<24} {:<20} {}",
            e.event_type,
            e.source.trim_start_matches('/'),
            summary(e)
        );
    }
    let reason = order["reason"]
        .as_str()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    println!("  ⇒ {}{reason}", order["status"].as_str().unwrap_or("?"));
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
    let mut options = async_nats::ConnectOptions::new().name("saga-demo");
    if let (Ok(u), Ok(p)) = (std::env::var("NATS_USER"), std::env::var("NATS_PASSWORD")) {
        options = options.user_and_password(u, p);
    }
    let demo = Demo {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .default_headers(admin_headers())
            .build()?,
        order: env("ORDER_URL", "http://127.0.0.1:8081"),
        inventory: env("INVENTORY_URL", "http://127.0.0.1:8082"),
        payment: env("PAYMENT_URL", "http://127.0.0.1:8083"),
        nats: options
            .connect(env("NATS_URL", "nats://127.0.0.1:4222"))
            .await?,
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
        "inventory.committed.v1",
    )
    .await?;
    saga(
        &demo,
        "2. out of stock",
        "alice",
        json!([{ "sku": "GADGET", "quantity": 10, "unit_price_minor": 990 }]),
        "orders.cancelled.v1",
    )
    .await?;
    saga(
        &demo,
        "3. payment failure",
        "bob",
        json!([{ "sku": "WIDGET", "quantity": 1, "unit_price_minor": 1250 }]),
        "inventory.released.v1",
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
