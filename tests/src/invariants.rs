//! The six invariants of the saga, checked against the services' own databases and the streams.
//!
//! 1. Every accepted order ends CONFIRMED or CANCELLED.
//! 2. CONFIRMED ⇒ its stock deducted exactly once and its total captured exactly once.
//! 3. CANCELLED ⇒ net stock change zero and net money zero.
//! 4. Per SKU: available + reserved + sold = stock ever added; available never negative.
//! 5. Money: balances + captured − refunded is conserved.
//! 6. No event lost: each consumed message is in its consumer's inbox or in its dead letters, and
//!    no outbox row is left unpublished.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::Utc;
use event_toolkit::envelope::Origin;
use event_toolkit::Envelope;
use sqlx::{AnyPool, Row};

use crate::{Service, System};

/// Durable consumers: (service, durable, stream, filter subjects).
pub const CONSUMERS: &[(Service, &str, &str, &[&str])] = &[
    (
        Service::Order,
        "order-from-inventory",
        "INVENTORY",
        &["inventory.reserved.v1", "inventory.rejected.v1"],
    ),
    (
        Service::Order,
        "order-from-payments",
        "PAYMENTS",
        &["payments.succeeded.v1", "payments.failed.v1"],
    ),
    (
        Service::Order,
        "order-commands",
        "ORDER_COMMANDS",
        &["cmd.orders."],
    ),
    (
        Service::Order,
        "order-timeline-orders",
        "ORDERS",
        &[
            "orders.placed.v1",
            "orders.confirmed.v1",
            "orders.cancelled.v1",
        ],
    ),
    (
        Service::Order,
        "order-timeline-inventory",
        "INVENTORY",
        &[
            "inventory.reserved.v1",
            "inventory.rejected.v1",
            "inventory.released.v1",
            "inventory.committed.v1",
        ],
    ),
    (
        Service::Order,
        "order-timeline-payments",
        "PAYMENTS",
        &[
            "payments.succeeded.v1",
            "payments.failed.v1",
            "payments.refunded.v1",
        ],
    ),
    (
        Service::Inventory,
        "inventory-from-orders",
        "ORDERS",
        &[
            "orders.placed.v1",
            "orders.confirmed.v1",
            "orders.cancelled.v1",
        ],
    ),
    (
        Service::Inventory,
        "inventory-from-payments",
        "PAYMENTS",
        &["payments.failed.v1"],
    ),
    (
        Service::Payment,
        "payment-from-inventory",
        "INVENTORY",
        &["inventory.reserved.v1"],
    ),
    (
        Service::Payment,
        "payment-from-orders",
        "ORDERS",
        &["orders.cancelled.v1"],
    ),
];

/// What the check found.
#[derive(Debug, Default)]
pub struct Report {
    /// Broken invariants, one line each.
    pub violations: Vec<String>,
    /// Orders per status.
    pub orders_by_status: BTreeMap<String, usize>,
    /// Cancelled orders per reason.
    pub cancelled_by_reason: BTreeMap<String, usize>,
    /// Dead letters per service.
    pub dead_letters: BTreeMap<String, usize>,
}

impl Report {
    /// Panic with every violation if there is any.
    pub fn assert_clean(&self) {
        assert!(
            self.violations.is_empty(),
            "{} invariant violation(s):\n{}",
            self.violations.len(),
            self.violations.join("\n")
        );
    }
}

async fn pool(url: &str) -> AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .expect("open service database")
}

/// Wait (up to `deadline`) until the system is quiet: every consumer caught up and acked, no
/// outbox row pending, no payment pending, no order unfinished. Returns how long it took.
pub async fn wait_quiet(system: &System, deadline: Duration) -> Duration {
    let started = std::time::Instant::now();
    let pools: HashMap<Service, AnyPool> = {
        let mut m = HashMap::new();
        for s in Service::ALL {
            m.insert(s, pool(system.database_url(s)).await);
        }
        m
    };
    let js = async_nats::jetstream::new(system.client.clone());
    crate::wait_for(deadline, "the system to go quiet", || async {
        for (_, durable, stream, _) in CONSUMERS {
            let mut c: async_nats::jetstream::consumer::PullConsumer =
                js.get_consumer_from_stream(*durable, *stream).await.ok()?;
            let info = c.info().await.ok()?;
            if info.num_pending > 0 || info.num_ack_pending > 0 {
                return None;
            }
        }
        for s in Service::ALL {
            let n: i64 = sqlx::query("SELECT COUNT(*) FROM outbox WHERE published_at_us IS NULL AND parked_at_us IS NULL")
                .fetch_one(&pools[&s])
                .await
                .ok()?
                .get(0);
            if n > 0 {
                return None;
            }
        }
        let pending: i64 = sqlx::query("SELECT COUNT(*) FROM payments WHERE status = 'PENDING'")
            .fetch_one(&pools[&Service::Payment])
            .await
            .ok()?
            .get(0);
        let open: i64 = sqlx::query("SELECT COUNT(*) FROM orders WHERE status IN ('PENDING', 'RESERVED')")
            .fetch_one(&pools[&Service::Order])
            .await
            .ok()?
            .get(0);
        (pending == 0 && open == 0).then_some(())
    })
    .await;
    for p in pools.values() {
        p.close().await;
    }
    started.elapsed()
}

/// Check all six invariants.
pub async fn check(system: &System) -> Report {
    let mut report = Report::default();
    let orders_db = pool(system.database_url(Service::Order)).await;
    let inventory_db = pool(system.database_url(Service::Inventory)).await;
    let payment_db = pool(system.database_url(Service::Payment)).await;
    let v = &mut report.violations;

    // Orders, with the items they asked for.
    let orders = sqlx::query("SELECT id, status, reason, total_minor, items FROM orders")
        .fetch_all(&orders_db)
        .await
        .expect("orders");
    // Inventory per order.
    let mut inv_state: HashMap<String, String> = HashMap::new();
    for r in sqlx::query("SELECT order_id, state FROM order_states")
        .fetch_all(&inventory_db)
        .await
        .expect("states")
    {
        inv_state.insert(r.get(0), r.get(1));
    }
    let mut reserved_lines: HashMap<String, BTreeMap<String, (i64, String)>> = HashMap::new();
    for r in sqlx::query("SELECT order_id, sku, quantity, status FROM reservations")
        .fetch_all(&inventory_db)
        .await
        .expect("reservations")
    {
        reserved_lines
            .entry(r.get(0))
            .or_default()
            .insert(r.get(1), (r.get(2), r.get(3)));
    }
    // Payments per order.
    let mut payments: HashMap<String, Vec<(i64, String)>> = HashMap::new();
    for r in sqlx::query("SELECT order_id, amount_minor, status FROM payments")
        .fetch_all(&payment_db)
        .await
        .expect("payments")
    {
        payments
            .entry(r.get(0))
            .or_default()
            .push((r.get(1), r.get(2)));
    }

    for o in &orders {
        let id: String = o.get(0);
        let status: String = o.get(1);
        let reason: Option<String> = o.get(2);
        let total: i64 = o.get(3);
        let items: serde_json::Value =
            serde_json::from_str(&o.get::<String, _>(4)).unwrap_or_default();
        *report.orders_by_status.entry(status.clone()).or_default() += 1;
        let pays = payments.get(&id).cloned().unwrap_or_default();
        let state = inv_state.get(&id).map(String::as_str);
        let lines = reserved_lines.get(&id).cloned().unwrap_or_default();
        match status.as_str() {
            "CONFIRMED" => {
                let mut wanted: BTreeMap<String, i64> = BTreeMap::new();
                for item in items.as_array().into_iter().flatten() {
                    *wanted
                        .entry(item["sku"].as_str().unwrap_or_default().to_owned())
                        .or_default() += item["quantity"].as_i64().unwrap_or(0);
                }
                let sold: BTreeMap<String, i64> = lines
                    .iter()
                    .filter(|(_, (_, st))| st == "COMMITTED")
                    .map(|(sku, (q, _))| (sku.clone(), *q))
                    .collect();
                if state != Some("COMMITTED") || sold != wanted {
                    v.push(format!("2: confirmed order {id}: inventory state {state:?}, sold {sold:?}, wanted {wanted:?}"));
                }
                let captured: Vec<_> = pays.iter().filter(|(_, s)| s == "CAPTURED").collect();
                if captured.len() != 1 || captured[0].0 != total || pays.len() != 1 {
                    v.push(format!(
                        "2: confirmed order {id}: payments {pays:?}, total {total}"
                    ));
                }
            }
            "CANCELLED" => {
                *report
                    .cancelled_by_reason
                    .entry(reason.unwrap_or_default())
                    .or_default() += 1;
                if matches!(state, Some("RESERVED") | Some("COMMITTED"))
                    || lines.values().any(|(_, st)| st != "RELEASED")
                {
                    v.push(format!(
                        "3: cancelled order {id}: inventory state {state:?}, lines {lines:?}"
                    ));
                }
                if pays.iter().any(|(_, s)| s == "CAPTURED" || s == "PENDING") {
                    v.push(format!("3: cancelled order {id}: payments {pays:?}"));
                }
            }
            other => v.push(format!("1: order {id} is still {other}")),
        }
    }

    // 4. Stock ledger.
    for r in sqlx::query("SELECT sku, available, reserved, sold, added FROM products")
        .fetch_all(&inventory_db)
        .await
        .expect("products")
    {
        let (sku, a, res, s, added): (String, i64, i64, i64, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        if a + res + s != added || a < 0 || res < 0 || s < 0 {
            v.push(format!(
                "4: sku {sku}: available {a} + reserved {res} + sold {s} != added {added}"
            ));
        }
        let held: i64 = reserved_lines
            .values()
            .flat_map(|m| m.iter())
            .filter(|(k, (_, st))| *k == &sku && st == "RESERVED")
            .map(|(_, (q, _))| q)
            .sum();
        if held != res {
            v.push(format!(
                "4: sku {sku}: reserved column {res} but reservations hold {held}"
            ));
        }
    }

    // 5. Money.
    let mut captured: HashMap<String, i64> = HashMap::new();
    for r in sqlx::query("SELECT customer_id, amount_minor FROM payments WHERE status = 'CAPTURED'")
        .fetch_all(&payment_db)
        .await
        .expect("captured")
    {
        *captured.entry(r.get(0)).or_default() += r.get::<i64, _>(1);
    }
    for r in sqlx::query("SELECT customer_id, balance_minor, deposited FROM accounts")
        .fetch_all(&payment_db)
        .await
        .expect("accounts")
    {
        let (c, balance, deposited): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
        let cap = captured.get(&c).copied().unwrap_or(0);
        if balance + cap != deposited || balance < 0 {
            v.push(format!(
                "5: account {c}: balance {balance} + captured {cap} != deposited {deposited}"
            ));
        }
    }

    // 6. Nothing lost.
    let dbs = [
        (Service::Order, &orders_db),
        (Service::Inventory, &inventory_db),
        (Service::Payment, &payment_db),
    ];
    for (s, db) in dbs {
        let parked: i64 = sqlx::query("SELECT COUNT(*) FROM outbox WHERE published_at_us IS NULL")
            .fetch_one(db)
            .await
            .expect("outbox")
            .get(0);
        if parked > 0 {
            v.push(format!(
                "6: {} has {parked} unpublished outbox rows",
                s.binary()
            ));
        }
        let dl: i64 = sqlx::query("SELECT COUNT(*) FROM dead_letters")
            .fetch_one(db)
            .await
            .expect("dl")
            .get(0);
        report
            .dead_letters
            .insert(s.binary().to_owned(), dl as usize);
    }
    for (s, durable, stream, filters) in CONSUMERS {
        let db = dbs
            .iter()
            .find(|(x, _)| x == s)
            .map(|(_, d)| *d)
            .expect("db");
        let mut inbox = std::collections::HashSet::new();
        for r in sqlx::query("SELECT event_id FROM inbox WHERE consumer = $1")
            .bind(*durable)
            .fetch_all(db)
            .await
            .expect("inbox")
        {
            inbox.insert(r.get::<String, _>(0));
        }
        let mut dead = std::collections::HashSet::new();
        for r in sqlx::query("SELECT stream_sequence FROM dead_letters WHERE consumer = $1")
            .bind(*durable)
            .fetch_all(db)
            .await
            .expect("dl")
        {
            dead.insert(r.get::<i64, _>(0));
        }
        for (seq, subject, msg_id, body) in system.stream_messages(stream).await {
            if !filters.iter().any(|f| subject.starts_with(f)) {
                continue;
            }
            if dead.contains(&(seq as i64)) {
                continue;
            }
            let origin = Origin {
                subject: &subject,
                msg_id: msg_id.as_deref(),
                stream,
                stream_sequence: seq,
                published: Utc::now(),
            };
            match Envelope::decode(&body, origin) {
                Ok(e) if inbox.contains(&e.id) => {}
                _ => v.push(format!(
                    "6: {durable}: {stream}#{seq} ({subject}) neither applied nor dead-lettered"
                )),
            }
        }
    }
    for p in [orders_db, inventory_db, payment_db] {
        p.close().await;
    }
    report
}
