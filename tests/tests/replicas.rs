//! Two replicas of each service, side by side on one Postgres database per service and one
//! nats-server: placements alternate between the order replicas, both replicas of a service pull
//! from the same durables and both relays claim outbox rows (`FOR UPDATE SKIP LOCKED`). One replica
//! of each service is SIGKILLed mid-run and restarted. Afterwards every saga has the outcome its
//! kind allows, stock and money are exact, each event was applied once and nothing was
//! dead-lettered.
//!
//! Size: `REPLICA_SAGAS` (default 240), `REPLICA_RATE` sagas per second (default 30).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_toolkit::Backend;
use saga_e2e::invariants::{check, wait_quiet};
use saga_e2e::{wait_for, Service, System, SystemConfig, WAIT};
use serde_json::{json, Value};

/// How long a placement or a cancellation may keep failing (on both order replicas) before the
/// test fails.
const WITHIN: Duration = Duration::from_secs(60);

const SCARCE_SKU: &str = "SCARCE";
const SCARCE_UNITS: i64 = 30;
const SCARCE_QTY: i64 = 3;
const THRIFTY: [&str; 2] = ["thrifty-0", "thrifty-1"];
const THRIFTY_PRICE: i64 = 500;
/// Pays three orders, with something left over that no order fits.
const THRIFTY_BALANCE: i64 = THRIFTY_PRICE * 3 + THRIFTY_PRICE / 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Confirm,
    OutOfStock,
    NoFunds,
    /// Races the others for [`SCARCE_UNITS`].
    ScarceStock,
    /// Races the others for a thrifty customer's balance.
    ScarceFunds,
    /// Cancelled right after the 202, through the other order replica.
    CustomerCancel,
}

fn kind(i: usize) -> Kind {
    match i % 8 {
        0 => Kind::OutOfStock,
        1 => Kind::NoFunds,
        2 => Kind::ScarceStock,
        3 => Kind::ScarceFunds,
        4 => Kind::CustomerCancel,
        _ => Kind::Confirm,
    }
}

/// One accepted saga.
#[derive(Debug)]
struct Placed {
    id: String,
    kind: Kind,
    customer: &'static str,
    /// The order replica that answered 202.
    replica: usize,
    /// The status the cancel request was answered, for CustomerCancel.
    cancel: Option<u16>,
}

/// With the deadline far away, only these outcomes are right. A cancel answered 409 met an order
/// already confirmed; 200, one already cancelled (by this request's earlier attempt whose answer
/// was lost with a killed replica).
fn allowed(p: &Placed) -> &'static [&'static str] {
    match (p.kind, p.cancel) {
        (Kind::Confirm, _) => &["CONFIRMED"],
        (Kind::OutOfStock, _) => &["CANCELLED insufficient_stock"],
        (Kind::NoFunds, _) => &["CANCELLED insufficient_funds"],
        (Kind::ScarceStock, _) => &["CONFIRMED", "CANCELLED insufficient_stock"],
        (Kind::ScarceFunds, _) => &["CONFIRMED", "CANCELLED insufficient_funds"],
        (Kind::CustomerCancel, Some(202 | 200)) => &["CANCELLED customer_cancelled"],
        (Kind::CustomerCancel, Some(409)) => &["CONFIRMED"],
        (Kind::CustomerCancel, _) => &[],
    }
}

/// POST `body` to `path` on order replica `first`, falling over to the other while `first` is
/// down, until one answers one of `ok`; the answering replica, status and body.
async fn post_to_replicas(
    http: &reqwest::Client,
    urls: &[String],
    first: usize,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
    ok: &[u16],
) -> (usize, u16, Value) {
    let start = Instant::now();
    let mut last = String::new();
    let mut attempt = 0;
    while start.elapsed() < WITHIN {
        let replica = (first + attempt) % urls.len();
        attempt += 1;
        let mut req = http.post(format!("{}{path}", urls[replica]));
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        match req.send().await {
            Ok(r) if ok.contains(&r.status().as_u16()) => {
                let status = r.status().as_u16();
                return (replica, status, r.json().await.unwrap_or(Value::Null));
            }
            Ok(r) => last = format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("POST {path}: no order replica answered {ok:?} within {WITHIN:?}; last: {last}");
}

async fn drive(http: reqwest::Client, urls: Arc<Vec<String>>, i: usize) -> Placed {
    let kind = kind(i);
    let (customer, sku, qty, price) = match kind {
        Kind::Confirm | Kind::CustomerCancel => ("alice", "WIDGET", 1, 100),
        Kind::OutOfStock => ("alice", "GADGET", 1000, 1),
        Kind::NoFunds => ("pauper", "WIDGET", 1, 100),
        Kind::ScarceStock => ("alice", SCARCE_SKU, SCARCE_QTY, 100),
        Kind::ScarceFunds => (THRIFTY[(i / 8) % THRIFTY.len()], "WIDGET", 1, THRIFTY_PRICE),
    };
    let body = json!({ "customer_id": customer, "currency": "EUR",
        "items": [{ "sku": sku, "quantity": qty, "unit_price_minor": price }] });
    // One key for every attempt: a placement that committed on a replica killed before it
    // answered is found by the other replica, not placed twice.
    let key = uuid::Uuid::new_v4().to_string();
    let (replica, _, answer) = post_to_replicas(
        &http,
        &urls,
        i % 2,
        "/orders",
        Some(&key),
        Some(&body),
        &[202],
    )
    .await;
    let id = answer["id"]
        .as_str()
        .unwrap_or_else(|| panic!("202 without an id: {answer}"))
        .to_owned();
    let mut placed = Placed {
        id,
        kind,
        customer,
        replica,
        cancel: None,
    };
    if kind == Kind::CustomerCancel {
        let path = format!("/orders/{}/cancel", placed.id);
        let (_, status, _) = post_to_replicas(
            &http,
            &urls,
            replica + 1,
            &path,
            None,
            None,
            &[200, 202, 409],
        )
        .await;
        placed.cancel = Some(status);
    }
    placed
}

/// Sum of a Prometheus counter's samples whose labels contain every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// (messages applied by its consumers, outbox rows its relay published) of one replica since it
/// started.
async fn work(system: &System, s: Service, i: usize) -> (f64, f64) {
    let text = system
        .http
        .get(format!("{}/metrics", system.replica_url(s, i)))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    (
        metric(&text, "consumer_messages_total", &["outcome=\"applied\""]),
        metric(&text, "outbox_published_total", &[]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_of_each_service_split_the_work_and_survive_a_sigkill_of_one() {
    let var = |k: &str, d: f64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let sagas = var("REPLICA_SAGAS", 240.0) as usize;
    let rate = var("REPLICA_RATE", 30.0);
    let mut config = SystemConfig::new(Backend::Postgres);
    config.replicas = 2;
    // Far enough that no saga ends by its deadline (a killed replica's unacknowledged messages
    // come back after the consumers' 10 s ack wait): every outcome is then exact.
    config.deadline_ms = 120_000;
    let started = Instant::now();
    let mut system = System::start(config).await;
    system.set_stock("WIDGET", 1_000_000).await;
    system.set_stock("GADGET", 5).await;
    system.set_stock(SCARCE_SKU, SCARCE_UNITS).await;
    system.set_balance("alice", 1_000_000_000).await;
    system.set_balance("pauper", 0).await;
    for c in THRIFTY {
        system.set_balance(c, THRIFTY_BALANCE).await;
    }

    let urls = Arc::new(
        (0..2)
            .map(|i| system.replica_url(Service::Order, i))
            .collect::<Vec<_>>(),
    );
    let accepted = Arc::new(AtomicUsize::new(0));
    let placer = {
        let (http, urls, accepted) = (system.http.clone(), urls.clone(), accepted.clone());
        tokio::spawn(async move {
            let interval = Duration::from_secs_f64(1.0 / rate);
            let begin = Instant::now();
            let mut tasks = Vec::new();
            for i in 0..sagas {
                tokio::time::sleep_until((begin + interval.mul_f64(i as f64)).into()).await;
                let (http, urls, accepted) = (http.clone(), urls.clone(), accepted.clone());
                tasks.push(tokio::spawn(async move {
                    let p = drive(http, urls, i).await;
                    accepted.fetch_add(1, Ordering::SeqCst);
                    p
                }));
            }
            let mut placed = Vec::new();
            for t in tasks {
                placed.push(t.await.expect("saga task"));
            }
            placed
        })
    };

    // A third in, every replica has done some of the work: its consumers applied events and its
    // relay published.
    let third = sagas / 3;
    let progress = |n: usize| {
        let accepted = accepted.clone();
        async move { (accepted.load(Ordering::SeqCst) >= n).then_some(()) }
    };
    wait_for(WAIT, "a third of the sagas accepted", || progress(third)).await;
    for s in Service::ALL {
        for i in 0..2 {
            let system = &system;
            let what = format!("{} replica {i} to apply and publish", s.binary());
            wait_for(WAIT, &what, || async move {
                let (applied, published) = work(system, s, i).await;
                (applied > 0.0 && published > 0.0).then_some(())
            })
            .await;
        }
    }

    // SIGKILL one replica of each service while sagas keep coming; the other carries on alone.
    let victims = [
        (Service::Order, 1),
        (Service::Inventory, 0),
        (Service::Payment, 1),
    ];
    for (s, i) in victims {
        system.kill_replica(s, i);
    }
    wait_for(WAIT, "two thirds of the sagas accepted", || {
        progress(2 * third)
    })
    .await;
    for (s, i) in victims {
        system.start_replica(s, i);
    }
    for (s, i) in victims {
        system.wait_replica_ready(s, i).await;
    }
    let placed = placer.await.expect("placer");
    assert_eq!(placed.len(), sagas, "every saga accepted");
    for p in &placed {
        system.record_accepted(&p.id);
    }
    let by_replica = placed.iter().filter(|p| p.replica == 0).count();
    wait_quiet(&system, Duration::from_secs(180)).await;

    // Outcomes per kind.
    let mut outcomes: BTreeMap<Kind, BTreeMap<String, usize>> = BTreeMap::new();
    let mut wrong = Vec::new();
    let (mut scarce_sold, mut thrifty_paid) = (0, BTreeMap::<&str, i64>::new());
    for p in &placed {
        let o = system.order(&p.id).await;
        let label = match (o["status"].as_str(), o["reason"].as_str()) {
            (Some("CANCELLED"), Some(r)) => format!("CANCELLED {r}"),
            (Some(s), _) => s.to_owned(),
            _ => format!("unreadable {o}"),
        };
        if !allowed(p).contains(&label.as_str()) {
            wrong.push(format!(
                "order {} ({:?}, cancel answered {:?}) ended {label}",
                p.id, p.kind, p.cancel
            ));
        }
        if label == "CONFIRMED" && p.kind == Kind::ScarceStock {
            scarce_sold += SCARCE_QTY;
        }
        if label == "CONFIRMED" && p.kind == Kind::ScarceFunds {
            *thrifty_paid.entry(p.customer).or_default() += THRIFTY_PRICE;
        }
        *outcomes
            .entry(p.kind)
            .or_default()
            .entry(label)
            .or_default() += 1;
    }
    println!(
        "{sagas} sagas ({by_replica} placed through order replica 0) in {:.1} s; outcomes: {outcomes:#?}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        wrong.is_empty(),
        "{} wrong outcome(s):\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(
        by_replica > 0 && by_replica < sagas,
        "placements went through both order replicas ({by_replica} of {sagas} through replica 0)"
    );
    for k in [Kind::Confirm, Kind::ScarceStock, Kind::ScarceFunds] {
        assert!(
            outcomes[&k].get("CONFIRMED").copied().unwrap_or(0) > 0,
            "some {k:?} sagas confirmed: {outcomes:?}"
        );
    }

    // The contended stock and balances: exactly what the confirmed orders took, never more.
    assert!(
        scarce_sold > 0 && scarce_sold <= SCARCE_UNITS,
        "{scarce_sold}"
    );
    let scarce = system.product(SCARCE_SKU).await;
    assert_eq!(
        (
            scarce["available"].as_i64(),
            scarce["reserved"].as_i64(),
            scarce["sold"].as_i64()
        ),
        (Some(SCARCE_UNITS - scarce_sold), Some(0), Some(scarce_sold)),
        "{SCARCE_SKU}: {scarce}"
    );
    for c in THRIFTY {
        let paid = thrifty_paid.get(c).copied().unwrap_or(0);
        assert!(paid <= THRIFTY_BALANCE, "{c} overdrawn: paid {paid}");
        assert!(paid > 0, "{c} paid for some order");
        assert_eq!(system.balance(c).await, THRIFTY_BALANCE - paid, "{c}");
    }

    // The restarted replicas took their share again.
    for (s, i) in victims {
        let what = format!("restarted {} replica {i} to apply events", s.binary());
        let system = &system;
        wait_for(WAIT, &what, || async move {
            (work(system, s, i).await.0 > 0.0).then_some(())
        })
        .await;
    }

    // Every order terminal, stock and money exact, each event applied once, nothing lost, and no
    // dead letter anywhere.
    let report = check(&system).await;
    report.assert_clean();
    assert_eq!(report.accepted, sagas);
    assert!(
        report.dead_letters.values().all(|n| *n == 0),
        "dead letters: {:?}",
        report.dead_letters
    );
    for s in Service::ALL {
        assert_eq!(
            system.dead_letters(s).await,
            Vec::<Value>::new(),
            "{}",
            s.binary()
        );
    }
}

#[tokio::test]
#[should_panic(expected = "2 replicas per service need Postgres: one process owns a SQLite file")]
async fn replicas_on_sqlite_are_refused() {
    let mut config = SystemConfig::new(Backend::Sqlite);
    config.replicas = 2;
    System::start(config).await;
}
