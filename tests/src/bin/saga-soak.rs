//! Soak: steady open-loop load with retention shortened to minutes, to see whether the services'
//! bookkeeping tables level off instead of growing for as long as the system runs.
//!
//! ```sh
//! cargo build --release -p saga-e2e --bins
//! target/release/saga-soak [--profile sqlite|postgres] [--rate 100] [--minutes 20] [--every 5]
//! ```
//!
//! Starts nats-server, a database and the three release binaries with OUTBOX_RETENTION=2m,
//! IDEMPOTENCY_KEY_RETENTION=2m, DEAD_LETTER_RETENTION=5m, TIMELINE_RETENTION=5m, the shortest
//! INBOX_RETENTION the services accept, and a 30 s sweep; places orders over HTTP at a fixed rate;
//! at the start, every `--every` minutes and at the end counts the rows of each service's
//! bookkeeping tables and measures the database files; checks the invariants; prints a table and
//! writes `bench-results/soak.json`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_toolkit::Backend;
use saga_e2e::invariants::{check, wait_quiet};
use saga_e2e::{Service, System, SystemConfig};
use serde_json::{json, Value};
use sqlx::Row;

/// The streams' fixed max age (`DEFAULT_STREAM_MAX_AGE`, not configurable) plus the default
/// consumer's redelivery horizon, (10 s ack wait + 30 s longest nak delay) × 10 deliveries, plus
/// one second: the shortest inbox retention the start-up check lets through.
const SHORTEST_INBOX_RETENTION: &str = "7d 401s";

const RETENTION: [(&str, &str); 6] = [
    ("OUTBOX_RETENTION", "2m"),
    ("IDEMPOTENCY_KEY_RETENTION", "2m"),
    ("DEAD_LETTER_RETENTION", "5m"),
    ("TIMELINE_RETENTION", "5m"),
    ("INBOX_RETENTION", SHORTEST_INBOX_RETENTION),
    ("RETENTION_SWEEP_INTERVAL", "30s"),
];

/// Orders in flight at most; past it the driver sheds ticks rather than piling up tasks, and
/// counts them.
const MAX_IN_FLIGHT: u64 = 2_000;

struct Args {
    backend: Backend,
    rate: f64,
    minutes: f64,
    every: f64,
    out: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        backend: Backend::Sqlite,
        rate: 100.0,
        minutes: 20.0,
        every: 5.0,
        out: PathBuf::from("bench-results"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        let number = |v: String| {
            v.parse::<f64>()
                .ok()
                .filter(|n| *n > 0.0)
                .ok_or_else(|| format!("{a}: {v:?} is not a positive number"))
        };
        match a.as_str() {
            "--profile" => {
                args.backend = match value()?.as_str() {
                    "sqlite" => Backend::Sqlite,
                    "postgres" => Backend::Postgres,
                    other => return Err(format!("unknown profile {other:?}")),
                }
            }
            "--rate" => args.rate = number(value()?)?,
            "--minutes" => args.minutes = number(value()?)?,
            "--every" => args.every = number(value()?)?,
            "--out" => args.out = PathBuf::from(value()?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    failed: AtomicU64,
    shed: AtomicU64,
    in_flight: AtomicU64,
}

/// Place one order over HTTP, with an `Idempotency-Key` so the key-retention rule has work.
async fn place(s: &System, url: &str) -> Option<String> {
    let body = json!({ "customer_id": "alice", "currency": "EUR",
        "items": [{ "sku": "WIDGET", "quantity": 1, "unit_price_minor": 100 }] });
    let r = s
        .http
        .post(url)
        .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
        .json(&body)
        .send()
        .await
        .ok()?;
    if r.status() != 202 {
        return None;
    }
    let v: Value = r.json().await.ok()?;
    Some(v["id"].as_str()?.to_owned())
}

/// Place orders at `rate` per second until `until`. The schedule is fixed (open loop): a slow
/// system does not slow the arrivals, it only raises the number in flight.
async fn drive(s: Arc<System>, rate: f64, until: Instant, counters: Arc<Counters>) {
    let url = format!("{}/orders", s.url(Service::Order));
    let start = Instant::now();
    let mut issued = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while Instant::now() < until {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        while issued < due {
            issued += 1;
            if counters.in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
                counters.shed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            counters.in_flight.fetch_add(1, Ordering::Relaxed);
            let (s, url, counters) = (s.clone(), url.clone(), counters.clone());
            tokio::spawn(async move {
                match place(&s, &url).await {
                    Some(id) => {
                        s.record_accepted(&id);
                        counters.accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                counters.in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
}

/// What is counted in every service, then in the order service alone: (label, query).
const COMMON: [(&str, &str); 5] = [
    ("outbox", "SELECT COUNT(*) FROM outbox"),
    (
        "outbox_unpublished",
        "SELECT COUNT(*) FROM outbox WHERE published_at_us IS NULL",
    ),
    ("inbox", "SELECT COUNT(*) FROM inbox"),
    ("dead_letters", "SELECT COUNT(*) FROM dead_letters"),
    (
        "consumer_attempts",
        "SELECT COUNT(*) FROM consumer_attempts",
    ),
];
const ORDER_ONLY: [(&str, &str); 3] = [
    ("timeline_events", "SELECT COUNT(*) FROM timeline_events"),
    (
        "orders_with_key",
        "SELECT COUNT(*) FROM orders WHERE idempotency_key IS NOT NULL",
    ),
    ("orders", "SELECT COUNT(*) FROM orders"),
];

/// Bytes of the SQLite file with its WAL and shared-memory files, or the Postgres database.
async fn database_bytes(pool: &sqlx::AnyPool, url: &str) -> i64 {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let path = path.split('?').next().unwrap_or(path);
        return ["", "-wal", "-shm"]
            .iter()
            .filter_map(|suffix| std::fs::metadata(format!("{path}{suffix}")).ok())
            .map(|m| m.len() as i64)
            .sum();
    }
    sqlx::query("SELECT pg_database_size(current_database())")
        .fetch_one(pool)
        .await
        .map(|r| r.get::<i64, _>(0))
        .unwrap_or(-1)
}

/// One snapshot: `service.table` → rows, `service.db_bytes` → bytes.
async fn snapshot(
    s: &System,
    pools: &BTreeMap<&'static str, sqlx::AnyPool>,
) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for svc in Service::ALL {
        let pool = &pools[svc.binary()];
        let name = svc.binary().trim_end_matches("-service");
        let extra: &[(&str, &str)] = if svc == Service::Order {
            &ORDER_ONLY
        } else {
            &[]
        };
        for (label, sql) in COMMON.iter().chain(extra) {
            let n = sqlx::query(sql)
                .fetch_one(pool)
                .await
                .map(|r| r.get::<i64, _>(0))
                .unwrap_or(-1);
            out.insert(format!("{name}.{label}"), n);
        }
        out.insert(
            format!("{name}.db_bytes"),
            database_bytes(pool, s.database_url(svc)).await,
        );
    }
    out
}

/// Rows: each counted quantity; columns: the snapshots (minutes since the load started).
fn table(snapshots: &[(f64, BTreeMap<String, i64>)]) -> String {
    let mut out = String::from("| | ");
    out += &snapshots
        .iter()
        .map(|(t, _)| format!("{t:.0} min"))
        .collect::<Vec<_>>()
        .join(" | ");
    out += " |\n|---|";
    out += &"---:|".repeat(snapshots.len());
    out += "\n";
    let Some((_, first)) = snapshots.first() else {
        return out;
    };
    for key in first.keys() {
        let cells: Vec<String> = snapshots
            .iter()
            .map(|(_, m)| match m.get(key).copied().unwrap_or(-1) {
                b if key.ends_with("db_bytes") => format!("{:.1} MB", b as f64 / 1e6),
                n => n.to_string(),
            })
            .collect();
        out += &format!("| {key} | {} |\n", cells.join(" | "));
    }
    out
}

async fn run(args: Args) -> Result<Value, String> {
    let mut config = SystemConfig::new(args.backend);
    config.env.push(("RUST_LOG".into(), "warn".into()));
    config
        .env
        .extend(RETENTION.iter().map(|(k, v)| ((*k).into(), (*v).into())));
    eprintln!(
        "starting nats-server and the three services ({:?})",
        args.backend
    );
    let s = Arc::new(System::start(config).await);
    s.set_stock("WIDGET", 1_000_000_000_000).await;
    s.set_balance("alice", 1_000_000_000_000_000).await;

    event_toolkit::db::install_drivers();
    let mut pools = BTreeMap::new();
    for svc in Service::ALL {
        // One connection: the counts must not compete with the service for the SQLite file.
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(s.database_url(svc))
            .await
            .map_err(|e| format!("{}: {e}", svc.binary()))?;
        pools.insert(svc.binary(), pool);
    }

    let load = Duration::from_secs_f64(args.minutes * 60.0);
    let every = Duration::from_secs_f64(args.every * 60.0);
    let counters = Arc::new(Counters::default());
    let mut snapshots = vec![(0.0, snapshot(&s, &pools).await)];
    let start = Instant::now();
    let until = start + load;
    let driver = tokio::spawn(drive(s.clone(), args.rate, until, counters.clone()));
    eprintln!(
        "placing {} orders/s for {} min, counting every {} min",
        args.rate, args.minutes, args.every
    );
    let mut next = start + every;
    while next < until {
        tokio::time::sleep_until(next.into()).await;
        let t = start.elapsed().as_secs_f64() / 60.0;
        snapshots.push((t, snapshot(&s, &pools).await));
        let accepted = counters.accepted.load(Ordering::Relaxed);
        eprintln!(
            "{t:.1} min: {accepted} accepted ({:.1}/s), {} failed, {} shed, {} in flight\n{}",
            accepted as f64 / start.elapsed().as_secs_f64(),
            counters.failed.load(Ordering::Relaxed),
            counters.shed.load(Ordering::Relaxed),
            counters.in_flight.load(Ordering::Relaxed),
            table(&snapshots)
        );
        next += every;
    }
    driver.await.map_err(|e| e.to_string())?;
    let load_seconds = start.elapsed().as_secs_f64();
    // Let the orders already sent get their answers, so the count of accepted ones is final.
    let drain_by = Instant::now() + Duration::from_secs(60);
    while counters.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < drain_by {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    snapshots.push((load_seconds / 60.0, snapshot(&s, &pools).await));
    let accepted = counters.accepted.load(Ordering::Relaxed);
    let achieved = accepted as f64 / load_seconds;
    let printed = table(&snapshots);
    eprintln!("end of load: {accepted} accepted, {achieved:.1}/s\n{printed}");

    eprintln!("checking invariants");
    let quiet_after = wait_quiet(&s, Duration::from_secs(300)).await;
    let report = check(&s).await;
    for p in pools.values() {
        p.close().await;
    }

    let result = json!({
        "profile": match args.backend { Backend::Sqlite => "sqlite", Backend::Postgres => "postgres" },
        "machine": { "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0) },
        "retention": RETENTION.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "load": {
            "target_rate_per_s": args.rate, "minutes": args.minutes, "seconds": load_seconds,
            "accepted": accepted, "achieved_rate_per_s": (achieved * 10.0).round() / 10.0,
            "failed": counters.failed.load(Ordering::Relaxed),
            "shed": counters.shed.load(Ordering::Relaxed),
        },
        "snapshots": snapshots.iter().map(|(t, m)| json!({ "minute": (t * 10.0).round() / 10.0, "counts": m })).collect::<Vec<_>>(),
        "quiet_after_s": quiet_after.as_secs_f64(),
        "invariants": {
            "accepted": report.accepted, "orders_by_status": report.orders_by_status,
            "cancelled_by_reason": report.cancelled_by_reason, "dead_letters": report.dead_letters,
            "violations": report.violations,
        },
    });
    std::fs::create_dir_all(&args.out).map_err(|e| e.to_string())?;
    std::fs::write(
        args.out.join("soak.json"),
        serde_json::to_vec_pretty(&result).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    println!("{printed}");
    Ok(result)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("saga-soak: {e}\nusage: saga-soak [--profile sqlite|postgres] [--rate N] [--minutes M] [--every M] [--out DIR]");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(result) => {
            let violations = result["invariants"]["violations"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if !violations.is_empty() {
                for v in violations.iter().take(20) {
                    eprintln!("  {v}");
                }
                eprintln!("FAILED: {} invariant violations", violations.len());
                return ExitCode::FAILURE;
            }
            eprintln!("invariants hold");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("saga-soak: {e}");
            ExitCode::FAILURE
        }
    }
}
