//! The six invariants of the saga, checked against the services' own databases, the streams and
//! what the test itself put in (recorded by the [`System`] helpers).
//!
//! 1. Every accepted order (every id that got a 202) exists and ends CONFIRMED or CANCELLED; a
//!    run that accepted none fails unless it asked for [`check_allowing_no_orders`].
//! 2. CONFIRMED ⇒ its stock deducted exactly once and its total captured exactly once.
//! 3. CANCELLED ⇒ net stock change zero and net money zero.
//! 4. Per SKU: available + reserved + sold = the stock the test put in = the service's own `added`;
//!    sold = the quantities of CONFIRMED orders; nothing negative.
//! 5. Per customer: balance + captured = the money the test deposited = the service's own
//!    `deposited`; captured = the totals of CONFIRMED orders; no balance negative.
//! 6. No event lost: each consumed message is in its consumer's inbox or in its dead letters, every
//!    stream is read in full, the durables on the server are exactly [`consumers`], and no outbox
//!    row is left unpublished.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use event_toolkit::envelope::Origin;
use event_toolkit::Envelope;
use futures::TryStreamExt;
use serde_json::Value;
use sqlx::{AnyPool, Row};

use crate::{Service, System};

/// One durable consumer of a service, as its service declares it.
#[derive(Debug, Clone)]
pub struct Consumer {
    /// Whose durable.
    pub service: Service,
    /// Durable name.
    pub durable: &'static str,
    /// Stream it reads.
    pub stream: &'static str,
    /// Event types it handles.
    pub event_types: Vec<&'static str>,
    /// What the server delivers to it (every version of each type, or a wider wildcard).
    pub filters: Vec<String>,
}

impl Consumer {
    /// Whether the server delivers a message on `subject` to this durable.
    pub fn receives(&self, subject: &str) -> bool {
        self.filters.iter().any(|f| subject_matches(f, subject))
    }
}

/// NATS subject matching: `*` is one token, a trailing `>` one or more.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Every durable of the three services, read from each service's own wiring.
pub fn consumers() -> &'static [Consumer] {
    static ALL: std::sync::OnceLock<Vec<Consumer>> = std::sync::OnceLock::new();
    ALL.get_or_init(|| {
        let leak = |s: &str| -> &'static str { Box::leak(s.to_owned().into_boxed_str()) };
        [
            (Service::Order, order_service::wiring()),
            (Service::Inventory, inventory_service::wiring()),
            (Service::Payment, payment_service::wiring()),
        ]
        .into_iter()
        .flat_map(|(service, wiring)| {
            wiring.durables.into_iter().map(move |d| Consumer {
                service,
                durable: leak(&d.name),
                stream: leak(&d.stream),
                event_types: d.event_types,
                filters: d.filter_subjects,
            })
        })
        .collect()
    })
}

/// What a test put in and what the order service accepted, recorded as the test goes.
#[derive(Debug, Default)]
pub struct Recorded {
    /// Per SKU: units the test added (set value minus what was available just before).
    stock: BTreeMap<String, i64>,
    /// Per customer: money the test deposited (set balance minus the balance just before).
    deposits: BTreeMap<String, i64>,
    /// Ids that got a 202 from `POST /orders`.
    accepted: BTreeSet<String>,
}

impl System {
    fn recorded(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.recorded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remember an order id that got a 202 (for placements made without [`System::place_order`]).
    pub fn record_accepted(&self, id: &str) {
        self.recorded().accepted.insert(id.to_owned());
    }

    /// Ids that got a 202 so far.
    pub fn accepted_orders(&self) -> BTreeSet<String> {
        self.recorded().accepted.clone()
    }

    /// Units per SKU the test put in through [`System::set_stock`].
    pub fn seeded_stock(&self) -> BTreeMap<String, i64> {
        self.recorded().stock.clone()
    }

    /// Money per customer the test deposited through [`System::set_balance`].
    pub fn seeded_deposits(&self) -> BTreeMap<String, i64> {
        self.recorded().deposits.clone()
    }

    pub(crate) fn record_stock_seeded(&self, sku: &str, units: i64) {
        *self.recorded().stock.entry(sku.to_owned()).or_default() += units;
    }

    pub(crate) fn record_deposit(&self, customer: &str, minor: i64) {
        *self
            .recorded()
            .deposits
            .entry(customer.to_owned())
            .or_default() += minor;
    }

    /// Available units just before a `PUT /products` (0 for a new product). The delta it seeds
    /// is exact as long as no saga touches the SKU while it is being set.
    pub(crate) async fn seeding_available_before(&self, sku: &str) -> i64 {
        self.number_or_zero(Service::Inventory, &format!("/products/{sku}"), "available")
            .await
    }

    /// Balance just before a `PUT /accounts` (0 for a new account).
    pub(crate) async fn seeding_balance_before(&self, customer: &str) -> i64 {
        self.number_or_zero(
            Service::Payment,
            &format!("/accounts/{customer}"),
            "balance_minor",
        )
        .await
    }

    async fn number_or_zero(&self, s: Service, path: &str, field: &str) -> i64 {
        let r = self
            .http
            .get(format!("{}{path}", self.url(s)))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        match r.status().as_u16() {
            404 => 0,
            200 => {
                let v: Value = r.json().await.expect("json");
                v[field]
                    .as_i64()
                    .unwrap_or_else(|| panic!("GET {path}: no {field} in {v}"))
            }
            other => panic!("GET {path}: {other}"),
        }
    }
}

/// What the check found.
#[derive(Debug, Default)]
pub struct Report {
    /// Broken invariants, one line each.
    pub violations: Vec<String>,
    /// Orders accepted (202) during the test.
    pub accepted: usize,
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

pub(crate) async fn pool(url: &str) -> AnyPool {
    event_toolkit::db::install_drivers();
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
    // What is still busy, so a timeout says why instead of only that it timed out.
    let busy = || async {
        let mut busy = Vec::new();
        for c in consumers() {
            let (durable, stream) = (c.durable, c.stream);
            let info = match js
                .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                    durable, stream,
                )
                .await
            {
                Ok(mut c) => c.info().await.cloned().map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match info {
                Ok(i) if i.num_pending > 0 || i.num_ack_pending > 0 => busy.push(format!(
                    "{durable}: {} pending, {} awaiting ack",
                    i.num_pending, i.num_ack_pending
                )),
                Ok(_) => {}
                Err(e) => busy.push(format!("{durable}: {e}")),
            }
        }
        let count = |s: Service, sql: &'static str| {
            let pool = pools[&s].clone();
            async move {
                sqlx::query(sql)
                    .fetch_one(&pool)
                    .await
                    .map(|r| r.get::<i64, _>(0))
                    .map_err(|e| e.to_string())
            }
        };
        for s in Service::ALL {
            let n = count(
                s,
                "SELECT COUNT(*) FROM outbox WHERE published_at_us IS NULL AND parked_at_us IS NULL",
            )
            .await;
            if n != Ok(0) {
                busy.push(format!("{} outbox rows unpublished: {n:?}", s.binary()));
            }
        }
        let pending = count(
            Service::Payment,
            "SELECT COUNT(*) FROM payments WHERE status = 'PENDING'",
        )
        .await;
        if pending != Ok(0) {
            busy.push(format!("payments PENDING: {pending:?}"));
        }
        let open = count(
            Service::Order,
            "SELECT COUNT(*) FROM orders WHERE status IN ('PENDING', 'RESERVED')",
        )
        .await;
        if open != Ok(0) {
            busy.push(format!("orders unfinished: {open:?}"));
        }
        busy
    };
    // Two clean passes in a row: one pass reads the consumers before the outboxes, so an event
    // published and marked between the two reads would otherwise pass unseen.
    let mut clean = 0;
    loop {
        let now = busy().await;
        if now.is_empty() {
            clean += 1;
            if clean == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        clean = 0;
        if started.elapsed() > deadline {
            panic!(
                "timed out after {deadline:?} waiting for the system to go quiet; still busy:\n{}",
                now.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for p in pools.values() {
        p.close().await;
    }
    started.elapsed()
}

/// Check all six invariants. A test that accepted no order fails: use
/// [`check_allowing_no_orders`] when placing none is the point.
pub async fn check(system: &System) -> Report {
    check_with(system, false).await
}

/// [`check`] for tests that deliberately place no order (bad input, refused requests).
pub async fn check_allowing_no_orders(system: &System) -> Report {
    check_with(system, true).await
}

/// Quantities per SKU of an order's stored `items`.
fn quantities(items: &Value) -> Option<BTreeMap<String, i64>> {
    let mut wanted: BTreeMap<String, i64> = BTreeMap::new();
    for item in items.as_array()? {
        *wanted.entry(item["sku"].as_str()?.to_owned()).or_default() +=
            item["quantity"].as_i64()?;
    }
    Some(wanted)
}

async fn check_with(system: &System, allow_no_orders: bool) -> Report {
    let mut report = Report::default();
    let orders_db = pool(system.database_url(Service::Order)).await;
    let inventory_db = pool(system.database_url(Service::Inventory)).await;
    let payment_db = pool(system.database_url(Service::Payment)).await;
    let v = &mut report.violations;

    // Orders, with the items they asked for.
    let orders =
        sqlx::query("SELECT id, customer_id, status, reason, total_minor, items FROM orders")
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

    // 1. What the test was told was accepted is there, and finished (checked per row below).
    let accepted = system.accepted_orders();
    report.accepted = accepted.len();
    if accepted.is_empty() && !allow_no_orders {
        v.push(
            "1: no order was accepted, so nothing was checked (use check_allowing_no_orders if that is the point)"
                .to_owned(),
        );
    }
    let stored: HashSet<String> = orders.iter().map(|o| o.get::<String, _>(0)).collect();
    for id in accepted.difference(&stored.iter().cloned().collect()) {
        v.push(format!(
            "1: accepted order {id} is missing from the order service"
        ));
    }

    // What CONFIRMED orders bought and paid, per SKU and per customer.
    let mut bought: BTreeMap<String, i64> = BTreeMap::new();
    let mut paid: BTreeMap<String, i64> = BTreeMap::new();
    for o in &orders {
        let id: String = o.get(0);
        let customer: String = o.get(1);
        let status: String = o.get(2);
        let reason: Option<String> = o.get(3);
        let total: i64 = o.get(4);
        let items_text: String = o.get(5);
        let Some(wanted) = serde_json::from_str::<Value>(&items_text)
            .ok()
            .as_ref()
            .and_then(quantities)
        else {
            v.push(format!("order {id}: unreadable items {items_text:?}"));
            continue;
        };
        *report.orders_by_status.entry(status.clone()).or_default() += 1;
        let pays = payments.get(&id).cloned().unwrap_or_default();
        let state = inv_state.get(&id).map(String::as_str);
        let lines = reserved_lines.get(&id).cloned().unwrap_or_default();
        match status.as_str() {
            "CONFIRMED" => {
                for (sku, q) in &wanted {
                    *bought.entry(sku.clone()).or_default() += q;
                }
                *paid.entry(customer).or_default() += total;
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

    // 4. Stock: what the test put in, what was sold, and the service's own ledger.
    let seeded = system.seeded_stock();
    let mut seen_skus = BTreeSet::new();
    for r in sqlx::query("SELECT sku, available, reserved, sold, added FROM products")
        .fetch_all(&inventory_db)
        .await
        .expect("products")
    {
        let (sku, a, res, s, added): (String, i64, i64, i64, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        let put_in = seeded.get(&sku).copied().unwrap_or(0);
        if a + res + s != put_in {
            v.push(format!(
                "4: sku {sku}: available {a} + reserved {res} + sold {s} = {}, but the test put in {put_in}",
                a + res + s
            ));
        }
        if a + res + s != added {
            v.push(format!(
                "4: sku {sku}: available {a} + reserved {res} + sold {s} != the service's added {added}"
            ));
        }
        if a < 0 || res < 0 || s < 0 {
            v.push(format!(
                "4: sku {sku}: negative stock: available {a}, reserved {res}, sold {s}"
            ));
        }
        let confirmed = bought.get(&sku).copied().unwrap_or(0);
        if s != confirmed {
            v.push(format!(
                "4: sku {sku}: sold {s}, but CONFIRMED orders bought {confirmed}"
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
        seen_skus.insert(sku);
    }
    for sku in seeded.keys().chain(bought.keys()) {
        if !seen_skus.contains(sku) {
            v.push(format!(
                "4: sku {sku} is missing from the inventory service"
            ));
        }
    }

    // 5. Money: what the test deposited, what was paid, and the service's own ledger.
    let deposits = system.seeded_deposits();
    let mut captured: BTreeMap<String, i64> = BTreeMap::new();
    for r in sqlx::query("SELECT customer_id, amount_minor FROM payments WHERE status = 'CAPTURED'")
        .fetch_all(&payment_db)
        .await
        .expect("captured")
    {
        *captured.entry(r.get(0)).or_default() += r.get::<i64, _>(1);
    }
    let mut seen_customers = BTreeSet::new();
    for r in sqlx::query("SELECT customer_id, balance_minor, deposited FROM accounts")
        .fetch_all(&payment_db)
        .await
        .expect("accounts")
    {
        let (c, balance, deposited): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
        let cap = captured.get(&c).copied().unwrap_or(0);
        let put_in = deposits.get(&c).copied().unwrap_or(0);
        if balance + cap != put_in {
            v.push(format!(
                "5: account {c}: balance {balance} + captured {cap} = {}, but the test deposited {put_in}",
                balance + cap
            ));
        }
        if balance + cap != deposited {
            v.push(format!(
                "5: account {c}: balance {balance} + captured {cap} != the service's deposited {deposited}"
            ));
        }
        if balance < 0 {
            v.push(format!("5: account {c}: balance {balance} is negative"));
        }
        let owed = paid.get(&c).copied().unwrap_or(0);
        if cap != owed {
            v.push(format!(
                "5: account {c}: captured {cap}, but CONFIRMED orders total {owed}"
            ));
        }
        seen_customers.insert(c);
    }
    for c in deposits.keys().chain(captured.keys()).chain(paid.keys()) {
        if !seen_customers.contains(c) {
            v.push(format!(
                "5: account {c} is missing from the payment service"
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
    v.extend(consumer_table_violations(system).await);
    let mut streams = HashMap::new();
    for c in consumers() {
        if !streams.contains_key(c.stream) {
            streams.insert(c.stream, system.stream_messages(c.stream).await);
        }
    }
    for c in consumers() {
        let (s, durable, stream) = (c.service, c.durable, c.stream);
        let db = dbs
            .iter()
            .find(|(x, _)| *x == s)
            .map(|(_, d)| *d)
            .expect("db");
        let mut inbox = HashSet::new();
        for r in sqlx::query("SELECT event_id FROM inbox WHERE consumer = $1")
            .bind(durable)
            .fetch_all(db)
            .await
            .expect("inbox")
        {
            inbox.insert(r.get::<String, _>(0));
        }
        let mut dead = HashSet::new();
        for r in sqlx::query("SELECT stream_sequence FROM dead_letters WHERE consumer = $1")
            .bind(durable)
            .fetch_all(db)
            .await
            .expect("dl")
        {
            dead.insert(r.get::<i64, _>(0));
        }
        for (seq, subject, msg_id, body) in &streams[stream] {
            if !c.receives(subject) {
                continue;
            }
            if dead.contains(&(*seq as i64)) {
                continue;
            }
            let origin = Origin {
                subject,
                msg_id: msg_id.as_deref(),
                stream,
                stream_sequence: *seq,
                published: Utc::now(),
            };
            match Envelope::decode(body, origin) {
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

/// The durables on the live server must be exactly those of [`consumers`], on the same streams:
/// one the table misses would go unchecked by invariant 6, one the server lacks checks nothing.
async fn consumer_table_violations(system: &System) -> Vec<String> {
    // The services' account (under the project's nats.conf the test client is a person, whose own
    // JetStream holds only mirrors).
    let js = system.services_js();
    let mut on_server: BTreeSet<(String, String)> = BTreeSet::new();
    let mut out = Vec::new();
    let names: Vec<String> = match js.stream_names().try_collect().await {
        Ok(n) => n,
        Err(e) => return vec![format!("6: cannot list streams: {e}")],
    };
    for name in names {
        let stream = match js.get_stream(&name).await {
            Ok(s) => s,
            Err(e) => {
                out.push(format!("6: cannot open stream {name}: {e}"));
                continue;
            }
        };
        let infos: Vec<async_nats::jetstream::consumer::Info> =
            match stream.consumers().try_collect().await {
                Ok(i) => i,
                Err(e) => {
                    out.push(format!("6: cannot list consumers of {name}: {e}"));
                    continue;
                }
            };
        for info in infos {
            // The people's mirrors follow each stream through a durable of their own wiring.
            if let Some(durable) = info
                .config
                .durable_name
                .filter(|d| d != crate::MIRROR_SOURCE_CONSUMER)
            {
                on_server.insert((durable, name.clone()));
            }
        }
    }
    let table: BTreeSet<(String, String)> = consumers()
        .iter()
        .map(|c| (c.durable.to_owned(), c.stream.to_owned()))
        .collect();
    for (d, s) in on_server.difference(&table) {
        out.push(format!(
            "6: durable {d} on stream {s} is on the server but not in the services' wiring, so nothing checks it"
        ));
    }
    for (d, s) in table.difference(&on_server) {
        out.push(format!(
            "6: the services' wiring names durable {d} on stream {s}, but the server has no such consumer"
        ));
    }
    out
}
