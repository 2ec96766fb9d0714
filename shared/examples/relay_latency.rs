//! Relay latency, commit → publish acknowledged, with an idle relay woken on commit.
//!
//! `cargo run --release -p event-toolkit --features testing --example relay_latency [sqlite|postgres] [N]`
//!
//! Starts its own nats-server and database, commits N single-event transactions 2 ms apart, and
//! prints p50/p99/max of (publish ack recorded − enqueue), next to the relay's poll interval.

use std::time::Duration;

use event_toolkit::nats::{ensure_stream, StreamSpec};
use event_toolkit::outbox::{self, OutboxRelay, RelayConfig};
use event_toolkit::testing::{eventually, NatsServer, TestDb};
use event_toolkit::{Backend, Envelope, EventPayload};
use tokio_util::sync::CancellationToken;

#[derive(serde::Serialize, serde::Deserialize)]
struct Tick {
    n: u64,
}
impl EventPayload for Tick {
    const TYPE: &'static str = "bench.tick.v1";
    fn entity_id(&self) -> String {
        self.n.to_string()
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let backend = match args.next().as_deref() {
        Some("postgres") => Backend::Postgres,
        _ => Backend::Sqlite,
    };
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let nats = NatsServer::start().await;
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client.clone());
    ensure_stream(&js, &StreamSpec::new("BENCH", &["bench.>"]))
        .await
        .expect("stream");
    let testdb = TestDb::new(backend).await;
    let db = testdb.connect().await;
    let config = RelayConfig::default();
    let poll = config.poll_interval;
    let relay = OutboxRelay::new(db.clone(), client, config);
    let waker = relay.waker();
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run(stop.clone()));

    for i in 0..n {
        let mut tx = db.begin().await.expect("begin");
        let e = Envelope::new("/bench", &Tick { n: i }, None);
        outbox::enqueue(&mut tx, Tick::SUBJECT, &e)
            .await
            .expect("enqueue");
        waker.commit(tx).await.expect("commit");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    eventually(Duration::from_secs(60), "outbox drained", || async {
        (outbox::stats(&db).await.ok()?.pending == 0).then_some(())
    })
    .await;
    stop.cancel();
    let _ = task.await;

    let mut lat = outbox::published_latencies_us(&db)
        .await
        .expect("latencies");
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0;
    println!(
        "relay latency ({backend:?}, {} events, idle relay, poll every {poll:?}): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
}
