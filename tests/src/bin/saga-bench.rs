//! Saga benchmark against this machine's own ceilings, measured in the same run.
//!
//! ```sh
//! cargo build --release --bins
//! target/release/saga-bench --profile sqlite|postgres|durable [--seconds 15] [--concurrency 64]
//! ```
//!
//! Starts nats-server, a database and the three release binaries; measures the raw JetStream
//! acked-publish rate and the raw commit rate; drives sagas closed-loop (concurrency C) and then
//! open-loop at half the closed-loop rate; reports throughput, ratios to the ceilings, latency
//! percentiles, relay latency and CPU per saga; checks the invariants; writes
//! `bench-results/<profile>.json` and `bench-results/<profile>-latency.svg`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_toolkit::testing::TestDb;
use event_toolkit::{Backend, DbOptions};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use saga_e2e::invariants::{check, wait_quiet};
use saga_e2e::{Service, System, SystemConfig};
use serde_json::{json, Value};
use sqlx::Row;
use tokio::sync::oneshot;

/// What the run is measured on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Profile {
    /// SQLite `NORMAL`, nats-server's default `sync_interval`.
    Sqlite,
    /// Postgres (a throwaway `fsync=off` cluster, or `TEST_DATABASE_URL`).
    Postgres,
    /// SQLite `FULL` and nats-server `sync_interval: always`.
    Durable,
}

impl Profile {
    fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::Durable => "durable",
        }
    }
    fn backend(self) -> Backend {
        match self {
            Self::Postgres => Backend::Postgres,
            _ => Backend::Sqlite,
        }
    }
}

/// Saga benchmark: this machine's JetStream and database ceilings, then sagas closed-loop and
/// open-loop at half that rate, CPU per saga, and the invariants.
#[derive(Debug, clap::Parser)]
#[command(name = "saga-bench")]
struct Args {
    /// Storage and sync settings.
    #[arg(long, value_enum, default_value = "sqlite")]
    profile: Profile,
    /// Length of each phase.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Customers placing orders at once in the closed loop.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Accounts the orders are charged to, in turn (closed loop: one per concurrent customer,
    /// wrapping). The default, one, makes every payment hold contend for one account row, the
    /// worst case on Postgres.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    accounts: u32,
    /// Open-loop rate (sagas/s) instead of half the closed-loop rate; set, the closed loop is
    /// skipped (for profiling at a fixed load).
    #[arg(long)]
    rate: Option<f64>,
    /// Where the JSON result and the latency plot go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
}

/// Use `NATS_SERVER_BIN` if set; else install (or find) one with the repository's script, as the
/// test script does, so a fresh checkout needs nothing by hand.
fn ensure_nats_server() -> Result<(), String> {
    if std::env::var_os("NATS_SERVER_BIN").is_some() {
        return Ok(());
    }
    let root = event_toolkit::testing::repo_root();
    let script = root.join("scripts/install-deps.sh");
    let out = std::process::Command::new(&script)
        .current_dir(&root)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}; set NATS_SERVER_BIN", script.display()))?;
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned();
    if !out.status.success() || path.is_empty() {
        return Err(format!(
            "{} failed ({}); set NATS_SERVER_BIN to a nats-server >= 2.10",
            script.display(),
            out.status
        ));
    }
    std::env::set_var("NATS_SERVER_BIN", path);
    Ok(())
}

/// Order id → when its terminal event was seen, and who waits for it.
#[derive(Default)]
struct Completions {
    done: HashMap<String, Instant>,
    waiting: HashMap<String, oneshot::Sender<Instant>>,
    /// Every order that got a 202, for the invariant check.
    accepted: Vec<String>,
}

type Shared = Arc<Mutex<Completions>>;

async fn watch_terminal_events(client: async_nats::Client, shared: Shared) {
    let mut subs = Vec::new();
    for s in ["orders.confirmed.v1", "orders.cancelled.v1"] {
        if let Ok(sub) = client.subscribe(s).await {
            subs.push(sub);
        }
    }
    let mut all = futures::stream::select_all(subs);
    while let Some(msg) = all.next().await {
        let now = Instant::now();
        let Ok(e) = serde_json::from_slice::<event_toolkit::Envelope>(&msg.payload) else {
            continue;
        };
        let Some(id) = e.data["order_id"].as_str() else {
            continue;
        };
        let mut c = shared.lock().expect("lock");
        match c.waiting.remove(id) {
            Some(tx) => {
                let _ = tx.send(now);
            }
            None => {
                c.done.insert(id.to_owned(), now);
            }
        }
    }
}

async fn completion(shared: &Shared, id: &str) -> Option<Instant> {
    let rx = {
        let mut c = shared.lock().expect("lock");
        if let Some(t) = c.done.remove(id) {
            return Some(t);
        }
        let (tx, rx) = oneshot::channel();
        c.waiting.insert(id.to_owned(), tx);
        rx
    };
    tokio::time::timeout(Duration::from_secs(60), rx)
        .await
        .ok()?
        .ok()
}

/// Place one order and wait for its end; latency from 202 Accepted to the terminal event.
async fn one_saga(
    http: &reqwest::Client,
    url: &str,
    shared: &Shared,
    customer: &str,
) -> Option<Duration> {
    let body = json!({ "customer_id": customer, "currency": "EUR",
        "items": [{ "sku": "WIDGET", "quantity": 1, "unit_price_minor": 100 }] });
    let r = http.post(url).json(&body).send().await.ok()?;
    let accepted = Instant::now();
    if r.status() != 202 {
        return None;
    }
    let v: Value = r.json().await.ok()?;
    let id = v["id"].as_str()?;
    shared.lock().ok()?.accepted.push(id.to_owned());
    let end = completion(shared, id).await?;
    Some(end.saturating_duration_since(accepted))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
}

fn latency_json(mut l: Vec<Duration>) -> (Value, Vec<Duration>) {
    l.sort_unstable();
    (
        json!({
            "count": l.len(),
            "p50_ms": percentile(&l, 0.50), "p95_ms": percentile(&l, 0.95),
            "p99_ms": percentile(&l, 0.99), "max_ms": percentile(&l, 1.0),
        }),
        l,
    )
}

/// CPU seconds (user + system) used so far by a process.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// CPU seconds so far per process: the three services, nats-server and this driver.
fn system_cpu(s: &System) -> Vec<(&'static str, f64)> {
    let mut out: Vec<(&'static str, f64)> = Service::ALL
        .iter()
        .map(|x| (x.binary(), s.pid(*x).map(cpu_seconds).unwrap_or(0.0)))
        .collect();
    out.push(("nats-server", s.nats.pid().map(cpu_seconds).unwrap_or(0.0)));
    out.push(("saga-bench (load driver)", cpu_seconds(std::process::id())));
    out
}

/// CPU seconds the three services and nats-server used between two readings of [`system_cpu`].
fn cpu_delta(now: &[(&'static str, f64)], before: &[(&'static str, f64)]) -> f64 {
    now.iter().zip(before).take(4).map(|(a, b)| a.1 - b.1).sum()
}

async fn service_totals(s: &System) -> (u64, i64) {
    let mut tx = 0;
    let mut published = 0;
    for svc in Service::ALL {
        if let Some(v) = s.try_get_json(svc, "/admin/stats").await {
            tx += v["transactions"].as_u64().unwrap_or(0);
            published += v["outbox"]["published"].as_i64().unwrap_or(0);
        }
    }
    (tx, published)
}

/// Raw JetStream pipelined acked publishes on the same server.
async fn jetstream_ceiling(client: &async_nats::Client) -> f64 {
    let js = async_nats::jetstream::new(client.clone());
    let _ = event_toolkit::nats::ensure_stream(
        &js,
        &event_toolkit::StreamSpec::new("BENCHRAW", &["benchraw.>"]),
    )
    .await;
    let payload = bytes::Bytes::from(vec![b'x'; 600]);
    let n = 50_000;
    let start = Instant::now();
    let mut acks = Vec::with_capacity(1000);
    for i in 0..n {
        if let Ok(a) = js.publish("benchraw.x", payload.clone()).await {
            acks.push(a);
        }
        if acks.len() == 1000 || i == n - 1 {
            for a in acks.drain(..) {
                let _ = a.await;
            }
        }
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let _ = js.delete_stream("BENCHRAW").await;
    rate
}

/// Raw one-row write transactions on the same backend and settings.
async fn database_ceiling(profile: Profile) -> f64 {
    let testdb = TestDb::new(profile.backend()).await;
    let mut options = DbOptions::default();
    if profile == Profile::Durable {
        options.sqlite_synchronous = event_toolkit::SqliteSynchronous::Full;
    }
    let db = event_toolkit::Database::connect(&testdb.url, options)
        .await
        .expect("ceiling db");
    sqlx::query("CREATE TABLE ceiling (id BIGINT PRIMARY KEY, v TEXT NOT NULL)")
        .execute(db.pool())
        .await
        .expect("table");
    let writers = if profile.backend() == Backend::Postgres {
        8
    } else {
        1
    };
    let until = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0i64;
            while Instant::now() < until {
                let mut tx = db.begin().await.expect("begin");
                sqlx::query("INSERT INTO ceiling (id, v) VALUES ($1, $2)")
                    .bind(w * 1_000_000_000 + n)
                    .bind("x")
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
                tx.commit().await.expect("commit");
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    db.close().await;
    total as f64 / 3.0
}

/// Commit-to-acknowledged latency of the outbox rows written since `since_us`: for the whole run,
/// before `split_us` (the closed loop) and from it on (the open loop, and its last sagas finishing
/// after it); each for all services together and for each on its own.
async fn relay_latencies(s: &System, since_us: i64, split_us: i64) -> [Value; 3] {
    let summary = |mut l: Vec<Duration>| {
        l.sort_unstable();
        json!({ "count": l.len(), "p50_ms": percentile(&l, 0.5), "p99_ms": percentile(&l, 0.99) })
    };
    // (written at, latency) per service.
    let mut rows: Vec<(&str, Vec<(i64, Duration)>)> = Vec::new();
    for svc in Service::ALL {
        event_toolkit::db::install_drivers();
        if let Ok(pool) = sqlx::AnyPool::connect(s.database_url(svc)).await {
            let found = sqlx::query(
                "SELECT created_at_us, published_at_us - created_at_us FROM outbox \
                 WHERE published_at_us IS NOT NULL AND created_at_us >= $1",
            )
            .bind(since_us)
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
            let l = found
                .iter()
                .map(|r| {
                    let took = r.get::<i64, _>(1).max(0) as u64;
                    (r.get::<i64, _>(0), Duration::from_micros(took))
                })
                .collect();
            rows.push((svc.binary(), l));
            pool.close().await;
        }
    }
    let phase = |keep: &dyn Fn(i64) -> bool| {
        let mut by_service = serde_json::Map::new();
        let mut all = Vec::new();
        for (svc, l) in &rows {
            let l: Vec<Duration> = l.iter().filter(|(at, _)| keep(*at)).map(|r| r.1).collect();
            all.extend(&l);
            by_service.insert((*svc).to_owned(), summary(l));
        }
        let mut out = summary(all);
        out["by_service"] = Value::Object(by_service);
        out
    };
    [
        phase(&|_| true),
        phase(&|at| at < split_us),
        phase(&|at| at >= split_us),
    ]
}

fn svg(profile: &str, series: &[(&str, &[Duration])]) -> String {
    let (w, h, left, bottom) = (720.0, 420.0, 60.0, 40.0);
    let max_ms = series
        .iter()
        .flat_map(|(_, l)| l.last())
        .map(|d| d.as_secs_f64() * 1000.0)
        .fold(1.0, f64::max);
    let mut out = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\
         <rect width='100%' height='100%' fill='white'/>\
         <text x='{left}' y='20' font-size='14'>saga latency, accepted → terminal ({profile})</text>\
         <line x1='{left}' y1='{y0}' x2='{x1}' y2='{y0}' stroke='black'/><line x1='{left}' y1='30' x2='{left}' y2='{y0}' stroke='black'/>\
         <text x='{xm}' y='{yl}'>percentile</text><text x='5' y='40'>{max_ms:.1} ms</text><text x='5' y='{y0}'>0</text>",
        y0 = h - bottom,
        x1 = w - 20.0,
        xm = w / 2.0,
        yl = h - 8.0,
    );
    for (i, (name, l)) in series.iter().enumerate() {
        let color = ["#1f77b4", "#d62728", "#2ca02c"][i % 3];
        let pts: Vec<String> = (0..=100)
            .map(|p| {
                let v = if l.is_empty() {
                    0.0
                } else {
                    l[((l.len() - 1) * p) / 100].as_secs_f64() * 1000.0
                };
                let x = left + (w - 20.0 - left) * p as f64 / 100.0;
                let y = (h - bottom) - (h - bottom - 30.0) * v / max_ms;
                format!("{x:.1},{y:.1}")
            })
            .collect();
        out += &format!(
            "<polyline fill='none' stroke='{color}' stroke-width='2' points='{}'/><text x='{}' y='{}' fill='{color}'>{name}</text>",
            pts.join(" "),
            left + 10.0,
            50.0 + 16.0 * i as f64
        );
    }
    out + "</svg>"
}

async fn run(args: Args) -> Result<Value, String> {
    let mut config = SystemConfig::new(args.profile.backend());
    config.env.push(("RUST_LOG".into(), "warn".into()));
    if args.profile == Profile::Durable {
        config.jetstream_config = "sync_interval: always".into();
        config
            .env
            .push(("SQLITE_SYNCHRONOUS".into(), "FULL".into()));
    }
    eprintln!(
        "starting nats-server and the three services ({})",
        args.profile.name()
    );
    let s = System::start(config).await;
    s.set_stock("WIDGET", 1_000_000_000_000).await;
    let customers: Arc<Vec<String>> = Arc::new(match args.accounts {
        1 => vec!["alice".to_owned()],
        n => (0..n).map(|k| format!("customer-{k}")).collect(),
    });
    for c in customers.iter() {
        s.set_balance(c, 1_000_000_000_000_000).await;
    }
    let customer = |k: usize| customers[k % customers.len()].clone();

    eprintln!("measuring ceilings");
    let js_ceiling = jetstream_ceiling(&s.client).await;
    let db_ceiling = database_ceiling(args.profile).await;
    eprintln!("  JetStream acked publish: {js_ceiling:.0} msg/s; database: {db_ceiling:.0} tx/s");

    let shared: Shared = Arc::default();
    tokio::spawn(watch_terminal_events(s.client.clone(), shared.clone()));
    s.client.flush().await.map_err(|e| e.to_string())?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("{}/orders", s.url(Service::Order));
    // Warm-up: connections, caches, consumers.
    for k in 0..50 {
        one_saga(&http, &url, &shared, &customer(k)).await;
    }

    // Idle: what the system burns with no sagas at all (polls, sweeps, heartbeats).
    let idle_secs = 5.0;
    let cpu_idle0 = system_cpu(&s);
    tokio::time::sleep(Duration::from_secs_f64(idle_secs)).await;
    let idle_cores = cpu_delta(&system_cpu(&s), &cpu_idle0) / idle_secs;
    eprintln!("  idle: {idle_cores:.3} cores (three services + nats-server)");

    // Closed loop.
    let secs = args.seconds;
    let bar = ProgressBar::new(secs);
    bar.set_style(
        ProgressStyle::with_template("{msg:12} [{bar:40}] {pos}/{len} s")
            .map_err(|e| e.to_string())?,
    );
    bar.set_message("closed loop");
    let since_us = chrono::Utc::now().timestamp_micros();
    let (tx0, pub0) = service_totals(&s).await;
    let cpu0 = system_cpu(&s);
    let start = Instant::now();
    let closed_secs = if args.rate.is_some() { 0 } else { secs };
    let until = start + Duration::from_secs(closed_secs);
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let mut workers = Vec::new();
    for k in 0..args.concurrency {
        let (http, url, shared, latencies, customer) = (
            http.clone(),
            url.clone(),
            shared.clone(),
            latencies.clone(),
            customer(k),
        );
        workers.push(tokio::spawn(async move {
            while Instant::now() < until {
                if let Some(l) = one_saga(&http, &url, &shared, &customer).await {
                    latencies.lock().expect("lock").push(l);
                }
            }
        }));
    }
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        bar.set_position(start.elapsed().as_secs().min(secs));
    }
    for w in workers {
        let _ = w.await;
    }
    bar.finish();
    let elapsed = start.elapsed().as_secs_f64();
    let (tx1, pub1) = service_totals(&s).await;
    let cpu1 = system_cpu(&s);
    let closed: Vec<Duration> = std::mem::take(&mut *latencies.lock().expect("lock"));
    let completed = closed.len();
    let sagas_per_s = completed as f64 / elapsed;
    let events_per_s = (pub1 - pub0) as f64 / elapsed;
    let tx_per_s = (tx1 - tx0) as f64 / elapsed;
    let (closed_json, closed_sorted) = latency_json(closed);

    // Open loop at half the closed-loop rate.
    let rate = args.rate.unwrap_or(sagas_per_s / 2.0).max(1.0);
    let bar = ProgressBar::new(secs);
    bar.set_style(
        ProgressStyle::with_template("{msg:12} [{bar:40}] {pos}/{len} s")
            .map_err(|e| e.to_string())?,
    );
    bar.set_message("open loop");
    let interval = Duration::from_secs_f64(1.0 / rate);
    let open_cpu0 = system_cpu(&s);
    let open_since_us = chrono::Utc::now().timestamp_micros();
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut i = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep_until((start + interval.mul_f64(i as f64)).into()).await;
        i += 1;
        let (http, url, shared, customer) = (
            http.clone(),
            url.clone(),
            shared.clone(),
            customer(i as usize - 1),
        );
        tasks.push(tokio::spawn(async move {
            one_saga(&http, &url, &shared, &customer).await
        }));
        bar.set_position(start.elapsed().as_secs().min(secs));
    }
    let mut open = Vec::new();
    for t in tasks {
        if let Ok(Some(l)) = t.await {
            open.push(l);
        }
    }
    bar.finish();
    let open_cpu = cpu_delta(&system_cpu(&s), &open_cpu0);
    let open_completed = open.len();
    let (open_json, open_sorted) = latency_json(open);

    eprintln!("checking invariants");
    wait_quiet(&s, Duration::from_secs(120)).await;
    let accepted = shared
        .lock()
        .map(|c| c.accepted.clone())
        .unwrap_or_default();
    for id in &accepted {
        s.record_accepted(id);
    }
    let report = check(&s).await;
    let [relay, relay_closed, relay_open] = relay_latencies(&s, since_us, open_since_us).await;

    let result = json!({
        "profile": args.profile.name(),
        "accounts": args.accounts,
        "machine": { "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0) },
        "ceilings": { "jetstream_acked_publish_per_s": js_ceiling.round(), "db_write_tx_per_s": db_ceiling.round() },
        "closed_loop": {
            "concurrency": args.concurrency, "seconds": elapsed, "completed_sagas": completed,
            "sagas_per_s": sagas_per_s.round(), "events_per_s": events_per_s.round(),
            "events_vs_jetstream_ceiling": events_per_s / js_ceiling,
            "db_tx_per_s": tx_per_s.round(), "db_tx_vs_ceiling": tx_per_s / db_ceiling,
            "cpu_seconds_per_saga": cpu_delta(&cpu1, &cpu0) / completed.max(1) as f64,
            "cpu_seconds_by_process": cpu1.iter().zip(&cpu0).map(|(a, b)| (a.0.to_owned(), json!(((a.1 - b.1) * 100.0).round() / 100.0))).collect::<serde_json::Map<_, _>>(),
            "latency": closed_json,
        },
        "open_loop": { "rate_per_s": rate.round(), "seconds": secs, "latency": open_json,
            "cpu_seconds_per_saga": open_cpu / open_completed.max(1) as f64 },
        "idle_cores": idle_cores,
        "relay_latency": relay,
        "relay_latency_closed_loop": relay_closed,
        "relay_latency_open_loop": relay_open,
        "invariant_violations": report.violations,
    });
    std::fs::create_dir_all(&args.out).map_err(|e| e.to_string())?;
    let base = args.out.join(args.profile.name());
    std::fs::write(
        base.with_extension("json"),
        serde_json::to_vec_pretty(&result).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let plot = svg(
        args.profile.name(),
        &[
            ("closed loop", &closed_sorted),
            ("open loop, half rate", &open_sorted),
        ],
    );
    std::fs::write(
        args.out
            .join(format!("{}-latency.svg", args.profile.name())),
        plot,
    )
    .map_err(|e| e.to_string())?;
    Ok(result)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = <Args as clap::Parser>::parse();
    if let Err(e) = ensure_nats_server() {
        eprintln!("saga-bench: {e}");
        return ExitCode::from(2);
    }
    // The harness says what to install or set when it finds no server or database: print that,
    // not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "failed".to_owned());
        eprintln!("saga-bench: {what}");
    }));
    match run(args).await {
        Ok(result) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&result).unwrap_or_default()
            );
            if result["invariant_violations"]
                .as_array()
                .is_some_and(|v| !v.is_empty())
            {
                eprintln!("FAILED: invariants broken");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("saga-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
