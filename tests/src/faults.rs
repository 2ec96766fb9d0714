//! Fault injection: sagas at a steady rate against the real system while services are SIGKILLed
//! and restarted, nats-server is stopped and restarted on its store, the payment service stalls
//! past order deadlines, ~5 % of events are re-published with a new `Nats-Msg-Id`, and poison lands
//! on every consumed subject. Afterwards: wait for quiet, check the six invariants, and check that
//! the dead letters are exactly the injected poison.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_toolkit::Backend;
use futures::StreamExt;
use rand::Rng;
use serde_json::{json, Value};
use sqlx::Row;
use tokio::sync::RwLock;

use crate::invariants::{check, wait_quiet, CONSUMERS};
use crate::{Service, System, SystemConfig};

/// Size and pace of a run.
#[derive(Debug, Clone)]
pub struct FaultConfig {
    /// Storage backend.
    pub backend: Backend,
    /// Sagas to start.
    pub sagas: usize,
    /// Sagas started per second.
    pub rate: f64,
    /// Order deadline.
    pub deadline_ms: u64,
    /// Seconds between faults.
    pub fault_every: Duration,
}

impl FaultConfig {
    /// From `FAULT_SAGAS` (default 150), `FAULT_RATE` (default 30/s) and `FAULT_EVERY_MS`
    /// (default 700).
    pub fn from_env(backend: Backend) -> Self {
        let var = |k: &str, d: f64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        Self {
            backend,
            sagas: var("FAULT_SAGAS", 150.0) as usize,
            rate: var("FAULT_RATE", 30.0),
            deadline_ms: 3000,
            fault_every: Duration::from_millis(var("FAULT_EVERY_MS", 700.0) as u64),
        }
    }
}

/// The kinds of saga the driver starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Confirm,
    OutOfStock,
    NoFunds,
    Declined,
    CustomerCancel,
}

fn pick_kind(i: usize) -> Kind {
    match i % 10 {
        0 => Kind::OutOfStock,
        1 => Kind::NoFunds,
        2 => Kind::Declined,
        3 | 4 => Kind::CustomerCancel,
        _ => Kind::Confirm,
    }
}

/// What a run did and found.
#[derive(Debug, Default)]
pub struct FaultReport {
    /// Sagas accepted by the order service.
    pub accepted: usize,
    /// Outcomes: status/reason → count.
    pub outcomes: BTreeMap<String, usize>,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, usize>,
    /// Invariant violations (must be empty).
    pub violations: Vec<String>,
    /// Time from the last fault to quiet.
    pub time_to_quiet: Duration,
    /// Dead letters per service.
    pub dead_letters: BTreeMap<String, usize>,
    /// Poison messages injected (each dead-lettered by every consumer of its subject).
    pub poison: usize,
}

impl std::fmt::Display for FaultReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "sagas accepted: {}", self.accepted)?;
        for (k, v) in &self.outcomes {
            writeln!(f, "  {k:<32} {v}")?;
        }
        writeln!(f, "faults injected:")?;
        for (k, v) in &self.faults {
            writeln!(f, "  {k:<32} {v}")?;
        }
        writeln!(f, "poison messages injected: {}", self.poison)?;
        writeln!(f, "dead letters:")?;
        for (k, v) in &self.dead_letters {
            writeln!(f, "  {k:<32} {v}")?;
        }
        writeln!(
            f,
            "time to quiet after the last fault: {:.1} s",
            self.time_to_quiet.as_secs_f64()
        )?;
        writeln!(f, "invariant violations: {}", self.violations.len())?;
        for v in &self.violations {
            writeln!(f, "  {v}")?;
        }
        Ok(())
    }
}

const DECLINE_OVER: i64 = 100_000;

/// Run the suite.
pub async fn run(config: FaultConfig) -> FaultReport {
    let mut sc = SystemConfig::new(config.backend);
    sc.deadline_ms = config.deadline_ms;
    sc.decline_over_minor = Some(DECLINE_OVER);
    let system = System::start(sc).await;
    system.set_stock("WIDGET", 1_000_000_000).await;
    system.set_stock("GADGET", 5).await;
    system.set_balance("alice", 1_000_000_000_000).await;
    system.set_balance("pauper", 0).await;

    // Faults take the write lock; HTTP calls and publishers take the read lock only to read ports.
    let system = Arc::new(RwLock::new(system));
    let faults: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();

    let republished = Arc::new(AtomicUsize::new(0));
    let republisher = tokio::spawn(republish(system.clone(), republished.clone(), stop.clone()));
    let fault_task = tokio::spawn(inject_faults(
        system.clone(),
        config.clone(),
        faults.clone(),
        stop.clone(),
    ));

    // Poison: about 1 % of sagas per consumed subject, at least one of each kind per subject.
    let subjects: BTreeSet<&str> = CONSUMERS
        .iter()
        .flat_map(|(_, _, _, f)| f.iter().copied())
        .map(|f| {
            if f == "cmd.orders." {
                "cmd.orders.place.v1"
            } else {
                f
            }
        })
        .collect();
    let poison_each = (config.sagas / 100).max(4);
    let mut poison_plan: Vec<(usize, &str, usize)> = Vec::new();
    for (si, s) in subjects.iter().enumerate() {
        for k in 0..poison_each {
            let at = (k * config.sagas / poison_each + si) % config.sagas.max(1);
            poison_plan.push((at, s, k % 4));
        }
    }
    let poison_seqs: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();

    let accepted: Arc<Mutex<Vec<(String, Kind)>>> = Arc::default();
    let interval = Duration::from_secs_f64(1.0 / config.rate.max(0.1));
    let mut tasks = Vec::new();
    let started = Instant::now();
    for i in 0..config.sagas {
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        for (_, subject, kind) in poison_plan.iter().filter(|(at, _, _)| *at == i) {
            if let Some(seq) = publish_poison(&system, subject, *kind).await {
                poison_seqs
                    .lock()
                    .expect("lock")
                    .push((subject.to_string(), seq));
            }
        }
        let system = system.clone();
        let accepted = accepted.clone();
        tasks.push(tokio::spawn(async move {
            let kind = pick_kind(i);
            if let Some(id) = drive_saga(&system, kind).await {
                accepted.lock().expect("lock").push((id, kind));
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    stop.cancel();
    let _ = fault_task.await;
    let _ = republisher.await;
    let quiet_from = Instant::now();
    let system = Arc::try_unwrap(system)
        .ok()
        .expect("sole owner")
        .into_inner();
    // Every service back up (a fault may have just restarted one).
    for s in Service::ALL {
        system.wait_ready(s).await;
    }
    wait_quiet(&system, Duration::from_secs(180)).await;
    let time_to_quiet = quiet_from.elapsed();

    let inv = check(&system).await;
    let mut report = FaultReport {
        accepted: accepted.lock().expect("lock").len(),
        violations: inv.violations,
        time_to_quiet,
        dead_letters: inv.dead_letters,
        ..Default::default()
    };
    for (k, v) in inv.orders_by_status {
        if k != "CANCELLED" {
            report.outcomes.insert(k, v);
        }
    }
    for (k, v) in inv.cancelled_by_reason {
        report.outcomes.insert(format!("CANCELLED {k}"), v);
    }
    report.faults = faults.lock().expect("lock").clone();
    report.faults.insert(
        "event re-published (new Nats-Msg-Id)".into(),
        republished.load(Ordering::SeqCst),
    );
    let poison = poison_seqs.lock().expect("lock").clone();
    report.poison = poison.len();
    report.faults.insert("poison message".into(), poison.len());
    report
        .violations
        .extend(check_dead_letters(&system, &poison).await);
    report
}

/// Place (retrying through crashes with one idempotency key), maybe cancel. Returns the order id
/// once the order service accepted it.
async fn drive_saga(system: &RwLock<System>, kind: Kind) -> Option<String> {
    let (customer, sku, qty, price) = match kind {
        Kind::Confirm | Kind::CustomerCancel => ("alice", "WIDGET", 1, 100),
        Kind::OutOfStock => ("alice", "GADGET", 1000, 1),
        Kind::NoFunds => ("pauper", "WIDGET", 1, 100),
        Kind::Declined => ("alice", "WIDGET", 1, DECLINE_OVER + 1),
    };
    let body = json!({ "customer_id": customer, "currency": "EUR",
        "items": [{ "sku": sku, "quantity": qty, "unit_price_minor": price }] });
    let key = uuid::Uuid::new_v4().to_string();
    let start = Instant::now();
    let id = loop {
        if start.elapsed() > Duration::from_secs(60) {
            return None;
        }
        let (http, url) = {
            let s = system.read().await;
            (s.http.clone(), format!("{}/orders", s.url(Service::Order)))
        };
        match http
            .post(&url)
            .header("Idempotency-Key", &key)
            .json(&body)
            .send()
            .await
        {
            Ok(r) if r.status() == 202 => {
                let v: Value = r.json().await.ok()?;
                break v["id"].as_str()?.to_owned();
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    if kind == Kind::CustomerCancel {
        let delay = Duration::from_millis(rand::rng().random_range(0..40));
        tokio::time::sleep(delay).await;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            let (http, url) = {
                let s = system.read().await;
                (
                    s.http.clone(),
                    format!("{}/orders/{id}/cancel", s.url(Service::Order)),
                )
            };
            match http.post(&url).send().await {
                Ok(r) if [200, 202, 409].contains(&r.status().as_u16()) => break,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    Some(id)
}

/// One fault at a time until `stop`.
async fn inject_faults(
    system: Arc<RwLock<System>>,
    config: FaultConfig,
    faults: Arc<Mutex<BTreeMap<String, usize>>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut n = 0usize;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(config.fault_every) => {}
            _ = stop.cancelled() => return,
        }
        // The first five faults cover every kind (kill each service, restart NATS, stall); then random.
        let (choice, victim, pause_ms) = {
            let mut rng = rand::rng();
            match n {
                0..=2 => (0, Service::ALL[n], rng.random_range(0..800u64)),
                3 => (6, Service::Order, rng.random_range(0..800u64)),
                4 => (8, Service::Payment, 0),
                _ => (
                    rng.random_range(0..10u32),
                    Service::ALL[rng.random_range(0..3)],
                    rng.random_range(0..800u64),
                ),
            }
        };
        n += 1;
        let label = match choice {
            0..=5 => {
                let mut s = system.write().await;
                s.kill(victim);
                tokio::time::sleep(Duration::from_millis(pause_ms)).await;
                s.restart(victim).await;
                format!("SIGKILL + restart {}", victim.binary())
            }
            6 | 7 => {
                let mut s = system.write().await;
                if n.is_multiple_of(2) {
                    s.nats.kill();
                } else {
                    s.nats.stop();
                }
                tokio::time::sleep(Duration::from_millis(pause_ms)).await;
                s.nats.start_again().await;
                for svc in Service::ALL {
                    s.wait_ready(svc).await;
                }
                "nats-server stopped + restarted".to_owned()
            }
            _ => {
                // A stall longer than the deadline: orders in flight hit it.
                let s = system.read().await;
                s.signal(Service::Payment, "STOP");
                tokio::time::sleep(Duration::from_millis(config.deadline_ms + 500)).await;
                s.signal(Service::Payment, "CONT");
                "payment-service stalled past deadline".to_owned()
            }
        };
        *faults.lock().expect("lock").entry(label).or_default() += 1;
    }
}

/// Re-publish about 5 % of the events seen, with the same envelope and a new `Nats-Msg-Id`.
async fn republish(
    system: Arc<RwLock<System>>,
    count: Arc<AtomicUsize>,
    stop: tokio_util::sync::CancellationToken,
) {
    // A client of its own that survives nats-server restarts by reconnecting.
    let url = system.read().await.nats.url();
    let Ok(client) = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(url)
        .await
    else {
        return;
    };
    let Ok(mut sub) = client.subscribe(">").await else {
        return;
    };
    let js = async_nats::jetstream::new(client.clone());
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => return },
            _ = stop.cancelled() => return,
        };
        let subject = msg.subject.as_str();
        let is_event = ["orders.", "inventory.", "payments."]
            .iter()
            .any(|p| subject.starts_with(p));
        let tagged = msg
            .headers
            .as_ref()
            .is_some_and(|h| h.get("Saga-Test").is_some());
        if !is_event || tagged || rand::rng().random_range(0..100) >= 5 {
            continue;
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", uuid::Uuid::now_v7().to_string().as_str());
        headers.insert("Saga-Test", "replay");
        if let Ok(ack) = js
            .publish_with_headers(msg.subject.clone(), headers, msg.payload.clone())
            .await
        {
            if ack.await.is_ok() {
                count.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// Publish one poison message; its stream sequence when the stream stored it.
async fn publish_poison(system: &RwLock<System>, subject: &str, kind: usize) -> Option<u64> {
    let client = system.read().await.client.clone();
    let body: Vec<u8> = match kind {
        0 => b"\x00not json at all".to_vec(),
        1 => br#"{"order_id": 12345, "items": "none"}"#.to_vec(),
        2 => serde_json::to_vec(&json!({
            "specversion": "1.0", "id": uuid::Uuid::new_v4().to_string(), "source": "/poison",
            "type": "orders.exploded.v9", "time": "2026-01-01T00:00:00Z", "data": {}
        }))
        .ok()?,
        _ => vec![b' '; 100 * 1024],
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Saga-Test", "poison");
    headers.insert("Nats-Msg-Id", uuid::Uuid::now_v7().to_string().as_str());
    let js = async_nats::jetstream::new(client);
    let ack = tokio::time::timeout(Duration::from_secs(5), async {
        js.publish_with_headers(subject.to_owned(), headers, body.into())
            .await
            .ok()?
            .await
            .ok()
    })
    .await
    .ok()??;
    Some(ack.sequence)
}

/// Dead letters must be exactly the poison: one per (consumer of its subject, sequence).
async fn check_dead_letters(system: &System, poison: &[(String, u64)]) -> Vec<String> {
    let mut expected: BTreeSet<(String, u64)> = BTreeSet::new();
    for (subject, seq) in poison {
        for (_, durable, _, filters) in CONSUMERS {
            if filters.iter().any(|f| subject.starts_with(f)) {
                expected.insert((durable.to_string(), *seq));
            }
        }
    }
    let mut actual: BTreeSet<(String, u64)> = BTreeSet::new();
    let mut reasons = Vec::new();
    for s in Service::ALL {
        sqlx::any::install_default_drivers();
        let Ok(pool) = sqlx::AnyPool::connect(system.database_url(s)).await else {
            reasons.push(format!("cannot open {} database", s.binary()));
            continue;
        };
        let rows = sqlx::query("SELECT consumer, stream_sequence FROM dead_letters")
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
        for r in rows {
            actual.insert((r.get::<String, _>(0), r.get::<i64, _>(1) as u64));
        }
        pool.close().await;
    }
    for missing in expected.difference(&actual) {
        reasons.push(format!("dead letters: poison {missing:?} missing"));
    }
    for extra in actual.difference(&expected) {
        reasons.push(format!("dead letters: {extra:?} is not injected poison"));
    }
    reasons
}
