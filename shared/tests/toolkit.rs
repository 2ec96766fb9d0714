//! The toolkit against a real nats-server and a real database, on SQLite and on Postgres.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream::Stream};
use event_toolkit::consumer::{dead_letters, ConsumerRunner, ConsumerSpec, Handler, HandlerError};
use event_toolkit::nats::{ensure_stream, StreamSpec};
use event_toolkit::outbox::{self, OutboxRelay, RelayConfig};
use event_toolkit::testing::{eventually, NatsServer, TestDb};
use event_toolkit::{Backend, Database, Envelope, EventPayload};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, Row};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Deposited {
    account: String,
    amount: i64,
}
impl EventPayload for Deposited {
    const TYPE: &'static str = "bank.deposited.v1";
    fn entity_id(&self) -> String {
        self.account.clone()
    }
}

struct Fixture {
    nats: NatsServer,
    client: async_nats::Client,
    js: jetstream::Context,
    db: Database,
    _testdb: TestDb,
}

async fn fixture(backend: Backend) -> Fixture {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let nats = NatsServer::start().await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    ensure_stream(&js, &StreamSpec::new("BANK", &["bank.>"]))
        .await
        .unwrap();
    let testdb = TestDb::new(backend).await;
    let db = testdb.connect().await;
    sqlx::raw_sql(
        "CREATE TABLE balances (account TEXT PRIMARY KEY, amount BIGINT NOT NULL); \
         CREATE TABLE applied (event_id TEXT NOT NULL)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    Fixture {
        nats,
        client,
        js,
        db,
        _testdb: testdb,
    }
}

fn deposit(account: &str, amount: i64) -> Envelope {
    Envelope::new(
        "/test",
        &Deposited {
            account: account.into(),
            amount,
        },
        None,
    )
}

async fn enqueue_committed(db: &Database, event: &Envelope) {
    let mut tx = db.begin().await.unwrap();
    outbox::enqueue(&mut tx, Deposited::SUBJECT, event)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// (Nats-Msg-Id, envelope) of every message in the stream, in stream order.
async fn stream_contents(js: &jetstream::Context, name: &str) -> Vec<(String, Envelope)> {
    let stream: Stream = js.get_stream(name).await.unwrap();
    let count = stream.get_info().await.unwrap().state.messages;
    let mut out = Vec::new();
    for seq in 1..=count {
        let Ok(msg) = stream.get_raw_message(seq).await else {
            continue;
        };
        let id = msg
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.to_string())
            .unwrap_or_default();
        out.push((id, serde_json::from_slice(&msg.payload).unwrap()));
    }
    out
}

async fn stream_len(js: &jetstream::Context, name: &str) -> u64 {
    js.get_stream(name)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .state
        .messages
}

fn spawn_relay(f: &Fixture) -> (CancellationToken, tokio::task::JoinHandle<()>, OutboxRelay) {
    let relay = OutboxRelay::new(f.db.clone(), f.client.clone(), RelayConfig::default());
    let stop = CancellationToken::new();
    let handle = tokio::spawn(relay.clone().run(stop.clone()));
    (stop, handle, relay)
}

use event_toolkit::on_both_backends;

on_both_backends!(
    committed_events_are_published_once_in_order_and_rolled_back_ones_never,
    relay_dying_between_publish_and_mark_publishes_nothing_twice,
    relay_survives_a_nats_restart_without_loss_or_duplicates,
    redelivered_and_republished_events_take_effect_once,
    poison_is_dead_lettered_and_the_consumer_keeps_going,
    transient_failures_are_retried_with_delay_and_apply_once,
    bare_json_published_by_hand_is_processed_once,
    a_row_that_can_never_be_published_is_parked_and_blocks_nothing,
    one_failing_message_does_not_take_its_batch_down,
    a_message_that_stops_the_process_every_time_is_given_up,
    a_panicking_handler_dead_letters_its_message_and_the_consumer_goes_on,
);

async fn one_failing_message_does_not_take_its_batch_down(b: Backend) {
    let f = fixture(b).await;
    // Everything is in the stream before the consumer starts, so it arrives as one batch.
    for i in 0..10 {
        let e = deposit("erin", i);
        publish_envelope(&f, &e, &e.id).await;
    }
    f.js.publish(
        "bank.deposited.v1",
        br#"{"account": false}"#.to_vec().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    for i in 10..20 {
        let e = deposit("erin", i);
        publish_envelope(&f, &e, &e.id).await;
    }
    let _stop = start_consumer(&f, Bank::default(), spec()).await;
    eventually(WAIT, "the 20 good deposits applied", || async {
        (balance(&f.db, "erin").await == Some((0..20).sum())).then_some(())
    })
    .await;
    let letters = eventually(WAIT, "the bad one dead-lettered", || async {
        let l = dead_letters(&f.db, 10).await.unwrap();
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].stream_sequence, 11);
    assert_eq!(applied_count(&f.db).await, 20);
}

async fn a_row_that_can_never_be_published_is_parked_and_blocks_nothing(b: Backend) {
    let f = fixture(b).await;
    enqueue_committed(&f.db, &deposit("a", 1)).await;
    let mut huge = deposit("a", 2);
    huge.data =
        serde_json::json!({ "account": "a", "amount": 2, "pad": "x".repeat(2 * 1024 * 1024) });
    enqueue_committed(&f.db, &huge).await;
    enqueue_committed(&f.db, &deposit("a", 3)).await;
    let (stop, handle, _) = spawn_relay(&f);
    eventually(
        WAIT,
        "the two publishable events out, the huge one parked",
        || async {
            let s = outbox::stats(&f.db).await.unwrap();
            (s.published == 2 && s.parked == 1 && s.pending == 0).then_some(())
        },
    )
    .await;
    stop.cancel();
    handle.await.unwrap();
    let amounts: Vec<i64> = stream_contents(&f.js, "BANK")
        .await
        .iter()
        .map(|(_, e)| e.data["amount"].as_i64().unwrap())
        .collect();
    assert_eq!(amounts, vec![1, 3]);
    let error: String = sqlx::query("SELECT last_error FROM outbox WHERE parked_at_us IS NOT NULL")
        .fetch_one(f.db.pool())
        .await
        .unwrap()
        .get(0);
    assert!(error.contains("payload"), "{error}");
}

async fn committed_events_are_published_once_in_order_and_rolled_back_ones_never(b: Backend) {
    let f = fixture(b).await;
    let mut expected = Vec::new();
    for i in 0..120 {
        let e = deposit(&format!("acct-{}", i % 3), i);
        enqueue_committed(&f.db, &e).await;
        expected.push(e.id.clone());
        if i % 40 == 0 {
            let mut tx = f.db.begin().await.unwrap();
            outbox::enqueue(&mut tx, Deposited::SUBJECT, &deposit("ghost", -1))
                .await
                .unwrap();
            tx.rollback().await.unwrap();
        }
    }
    let (stop, handle, _) = spawn_relay(&f);
    eventually(WAIT, "120 events in the stream", || async {
        (stream_len(&f.js, "BANK").await >= 120).then_some(())
    })
    .await;
    stop.cancel();
    handle.await.unwrap();

    let contents = stream_contents(&f.js, "BANK").await;
    let ids: Vec<String> = contents.iter().map(|(_, e)| e.id.clone()).collect();
    assert_eq!(ids, expected, "each committed event once, in commit order");
    for (msg_id, env) in &contents {
        assert_eq!(msg_id, &env.id, "Nats-Msg-Id is the event id");
        assert_ne!(env.subject.as_deref(), Some("ghost"));
    }
    let stats = outbox::stats(&f.db).await.unwrap();
    assert_eq!((stats.pending, stats.published, stats.parked), (0, 120, 0));
}

async fn relay_dying_between_publish_and_mark_publishes_nothing_twice(b: Backend) {
    let f = fixture(b).await;
    for i in 0..50 {
        enqueue_committed(&f.db, &deposit("a", i)).await;
    }
    let relay = OutboxRelay::new(f.db.clone(), f.client.clone(), RelayConfig::default());
    // Publish, then "crash": the batch is never recorded.
    let batch = relay.publish_batch().await.unwrap();
    assert_eq!(batch.len(), 50);
    drop(batch);
    assert_eq!(
        outbox::stats(&f.db).await.unwrap().pending,
        50,
        "nothing marked"
    );
    assert_eq!(stream_len(&f.js, "BANK").await, 50);

    // Restart: everything is published again and deduplicated by the stream.
    let published = relay.publish_pending().await.unwrap();
    assert_eq!(published, 50);
    assert_eq!(
        stream_len(&f.js, "BANK").await,
        50,
        "exactly N in the stream"
    );
    assert_eq!(outbox::stats(&f.db).await.unwrap().pending, 0);
}

async fn relay_survives_a_nats_restart_without_loss_or_duplicates(b: Backend) {
    let mut f = fixture(b).await;
    let (stop, handle, relay) = spawn_relay(&f);
    let mut ids = Vec::new();
    for i in 0..40 {
        let e = deposit("a", i);
        let mut tx = f.db.begin().await.unwrap();
        outbox::enqueue(&mut tx, Deposited::SUBJECT, &e)
            .await
            .unwrap();
        relay.waker().commit(tx).await.unwrap();
        ids.push(e.id);
    }
    f.nats.stop();
    // Commits go on while NATS is down; they wait in the outbox.
    for i in 40..80 {
        let e = deposit("a", i);
        let mut tx = f.db.begin().await.unwrap();
        outbox::enqueue(&mut tx, Deposited::SUBJECT, &e)
            .await
            .unwrap();
        relay.waker().commit(tx).await.unwrap();
        ids.push(e.id);
    }
    f.nats.start_again().await;
    eventually(
        Duration::from_secs(30),
        "outbox drained after NATS restart",
        || async { (outbox::stats(&f.db).await.unwrap().pending == 0).then_some(()) },
    )
    .await;
    stop.cancel();
    handle.await.unwrap();
    let mut got: Vec<String> = stream_contents(&f.js, "BANK")
        .await
        .into_iter()
        .map(|(_, e)| e.id)
        .collect();
    assert_eq!(got.len(), 80, "nothing lost, nothing doubled");
    got.sort();
    ids.sort();
    assert_eq!(got, ids);
    assert_eq!(outbox::stats(&f.db).await.unwrap().parked, 0);
}

/// Applies deposits; fails transiently on its first `fail_first` calls; counts and times calls.
#[derive(Clone, Default)]
struct Bank {
    fail_first: usize,
    calls: Arc<AtomicUsize>,
    called_at: Arc<Mutex<Vec<Instant>>>,
}

impl Handler for Bank {
    async fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        self.called_at.lock().unwrap().push(Instant::now());
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if n < self.fail_first {
            return Err(HandlerError::Transient(format!("simulated outage #{n}")));
        }
        let d: Deposited = event.payload()?;
        sqlx::query(
            "INSERT INTO balances (account, amount) VALUES ($1, $2) \
             ON CONFLICT (account) DO UPDATE SET amount = balances.amount + excluded.amount",
        )
        .bind(&d.account)
        .bind(d.amount)
        .execute(&mut *conn)
        .await?;
        sqlx::query("INSERT INTO applied (event_id) VALUES ($1)")
            .bind(&event.id)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

fn spec() -> ConsumerSpec {
    let mut s = ConsumerSpec::new("bank-test", "BANK", &["bank.deposited.v1"]);
    s.ack_wait = Duration::from_secs(2);
    s.max_deliver = 5;
    s
}

async fn start_consumer(f: &Fixture, handler: Bank, spec: ConsumerSpec) -> CancellationToken {
    let runner = ConsumerRunner::new(
        spec,
        f.db.clone(),
        f.client.clone(),
        handler,
        Default::default(),
    );
    let stop = CancellationToken::new();
    let consumer = runner.provision(&stop).await.unwrap();
    tokio::spawn(runner.run(consumer, stop.clone()));
    stop
}

async fn balance(db: &Database, account: &str) -> Option<i64> {
    sqlx::query("SELECT amount FROM balances WHERE account = $1")
        .bind(account)
        .fetch_optional(db.pool())
        .await
        .unwrap()
        .map(|r| r.get::<i64, _>(0))
}

async fn applied_count(db: &Database) -> i64 {
    sqlx::query("SELECT COUNT(*) FROM applied")
        .fetch_one(db.pool())
        .await
        .unwrap()
        .get::<i64, _>(0)
}

async fn publish_envelope(f: &Fixture, event: &Envelope, msg_id: &str) {
    f.js.send_publish(
        "bank.deposited.v1",
        async_nats::jetstream::message::PublishMessage::build()
            .payload(event.to_bytes().into())
            .message_id(msg_id),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

async fn redelivered_and_republished_events_take_effect_once(b: Backend) {
    let f = fixture(b).await;
    let e = deposit("alice", 100);
    publish_envelope(&f, &e, &e.id).await;
    // Same envelope id, new Nats-Msg-Id: the stream keeps both; the inbox applies one.
    publish_envelope(&f, &e, "another-msg-id").await;
    assert_eq!(stream_len(&f.js, "BANK").await, 2);

    // A first consumer instance pulls but never acks (a crash after commit, before ack, looks the
    // same to the server): the messages come back after ack_wait.
    let stream = f.js.get_stream("BANK").await.unwrap();
    let consumer = stream.create_consumer(spec().config()).await.unwrap();
    let mut batch = consumer.fetch().max_messages(2).messages().await.unwrap();
    let mut pulled = 0;
    while let Some(m) = batch.next().await {
        m.unwrap();
        pulled += 1;
    }
    assert_eq!(pulled, 2);

    let bank = Bank::default();
    let _stop = start_consumer(&f, bank.clone(), spec()).await;
    eventually(WAIT, "both deliveries seen after redelivery", || async {
        let info =
            f.js.get_stream("BANK")
                .await
                .ok()?
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>("bank-test")
                .await
                .ok()?
                .get_info()
                .await
                .ok()?
                .clone();
        (info.ack_floor.stream_sequence == 2 && info.num_ack_pending == 0).then_some(())
    })
    .await;
    assert_eq!(balance(&f.db, "alice").await, Some(100));
    assert_eq!(applied_count(&f.db).await, 1, "effect exactly once");
    assert_eq!(bank.calls.load(Ordering::SeqCst), 1, "handler ran once");
}

async fn poison_is_dead_lettered_and_the_consumer_keeps_going(b: Backend) {
    let f = fixture(b).await;
    let bank = Bank::default();
    let _stop = start_consumer(&f, bank.clone(), spec()).await;
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("not json", b"{oops".to_vec()),
        ("wrong shape", br#"{"account": 5}"#.to_vec()),
        (
            "unknown type",
            serde_json::to_vec(&serde_json::json!({
                "specversion": "1.0", "id": "x-1", "source": "/t", "type": "bank.exploded.v9",
                "time": "2026-01-01T00:00:00Z", "data": {}
            }))
            .unwrap(),
        ),
        ("oversized", vec![b' '; 70 * 1024]),
        (
            "control character in the id",
            br#"{"specversion":"1.0","id":"a\u0000","source":"/t","type":"bank.deposited.v1","time":"2026-01-01T00:00:00Z","data":{"account":"x","amount":1}}"#.to_vec(),
        ),
    ];
    for (_, body) in &poison {
        f.js.publish("bank.deposited.v1", body.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let good = deposit("bob", 7);
    publish_envelope(&f, &good, &good.id).await;

    eventually(WAIT, "good event applied after the poison", || async {
        (balance(&f.db, "bob").await == Some(7)).then_some(())
    })
    .await;
    let letters = eventually(WAIT, "5 dead letters", || async {
        let l = dead_letters(&f.db, 100).await.unwrap();
        (l.len() == poison.len()).then_some(l)
    })
    .await;
    let mut seqs: Vec<i64> = letters.iter().map(|l| l.stream_sequence).collect();
    seqs.sort();
    assert_eq!(
        seqs,
        vec![1, 2, 3, 4, 5],
        "exactly the poison, nothing else"
    );
    let by_seq = |s: i64| letters.iter().find(|l| l.stream_sequence == s).unwrap();
    assert!(
        by_seq(1).reason.contains("not JSON"),
        "{}",
        by_seq(1).reason
    );
    assert_eq!(by_seq(1).payload, "{oops");
    assert!(
        by_seq(2).reason.contains("payload does not match"),
        "{}",
        by_seq(2).reason
    );
    // A structured event typed as nothing this consumer knows, on its subject: its type is not the
    // subject it arrived on.
    assert!(
        by_seq(3).reason.contains("type does not match subject"),
        "{}",
        by_seq(3).reason
    );
    assert!(by_seq(4).reason.contains("exceeds"), "{}", by_seq(4).reason);
    assert!(
        by_seq(5).reason.contains("printable"),
        "{}",
        by_seq(5).reason
    );
    assert!(letters
        .iter()
        .all(|l| l.subject == "bank.deposited.v1" && l.consumer == "bank-test"));
    assert_eq!(applied_count(&f.db).await, 1);
}

async fn transient_failures_are_retried_with_delay_and_apply_once(b: Backend) {
    let f = fixture(b).await;
    let bank = Bank {
        fail_first: 2,
        ..Default::default()
    };
    let _stop = start_consumer(&f, bank.clone(), spec()).await;
    let e = deposit("carol", 5);
    publish_envelope(&f, &e, &e.id).await;
    eventually(
        WAIT,
        "deposit applied after two transient failures",
        || async { (balance(&f.db, "carol").await == Some(5)).then_some(()) },
    )
    .await;
    assert_eq!(
        bank.calls.load(Ordering::SeqCst),
        3,
        "two failures then success"
    );
    assert_eq!(applied_count(&f.db).await, 1);
    // Each nak carried its backoff delay (250 ms, then 500 ms, each -12.5 % at worst from jitter):
    // the server cannot redeliver sooner than that after the failed call, however slow the machine,
    // so only lower bounds are asserted. A nak without delay would redeliver at once.
    let at = bank.called_at.lock().unwrap().clone();
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps.len(), 2, "{gaps:?}");
    for (gap, least) in gaps.iter().zip([218, 437]) {
        assert!(
            *gap >= Duration::from_millis(least),
            "redelivered after {gap:?}, sooner than the {least} ms the nak asked for: {gaps:?}"
        );
    }
    assert!(dead_letters(&f.db, 10).await.unwrap().is_empty());
}

async fn bare_json_published_by_hand_is_processed_once(b: Backend) {
    let f = fixture(b).await;
    let bank = Bank::default();
    let _stop = start_consumer(&f, bank.clone(), spec()).await;
    // Exactly what `nats pub bank.deposited.v1 '{...}'` sends: core publish, no headers, no reply.
    f.client
        .publish(
            "bank.deposited.v1",
            r#"{"account":"dave","amount":12}"#.into(),
        )
        .await
        .unwrap();
    f.client.flush().await.unwrap();
    eventually(WAIT, "hand-published deposit applied", || async {
        (balance(&f.db, "dave").await == Some(12)).then_some(())
    })
    .await;
    let id: String = sqlx::query("SELECT event_id FROM inbox WHERE consumer = 'bank-test'")
        .fetch_one(f.db.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(id, "BANK:1", "identified by stream and sequence");
    // With a Nats-Msg-Id header, that id is the event id, and a repeat is dropped by the stream.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "hand-1");
    for _ in 0..2 {
        f.client
            .publish_with_headers(
                "bank.deposited.v1",
                headers.clone(),
                r#"{"account":"dave","amount":1}"#.into(),
            )
            .await
            .unwrap();
    }
    f.client.flush().await.unwrap();
    eventually(WAIT, "second hand-published deposit applied", || async {
        (balance(&f.db, "dave").await == Some(13)).then_some(())
    })
    .await;
    assert_eq!(stream_len(&f.js, "BANK").await, 2);
    assert_eq!(applied_count(&f.db).await, 2);
}

/// Applies deposits like [`Bank`], but on account `stall` never finishes (as a process that dies
/// while applying it), and on account `boom` panics.
#[derive(Clone, Default)]
struct Treacherous {
    bank: Bank,
    stalls: Arc<AtomicUsize>,
}

impl Handler for Treacherous {
    async fn handle(&self, conn: &mut AnyConnection, event: &Envelope) -> Result<(), HandlerError> {
        let d: Deposited = event.payload()?;
        match d.account.as_str() {
            "stall" => {
                self.stalls.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
                Ok(())
            }
            "boom" => panic!("cannot apply a deposit to boom"),
            _ => self.bank.handle(conn, event).await,
        }
    }
}

fn spawn_runner(
    f: &Fixture,
    handler: Treacherous,
    spec: ConsumerSpec,
) -> tokio::task::JoinHandle<()> {
    let runner = ConsumerRunner::new(
        spec,
        f.db.clone(),
        f.client.clone(),
        handler,
        Default::default(),
    );
    tokio::spawn(async move {
        let stop = CancellationToken::new();
        let consumer = runner.provision(&stop).await.unwrap();
        runner.run(consumer, stop).await;
    })
}

async fn a_message_that_stops_the_process_every_time_is_given_up(b: Backend) {
    let f = fixture(b).await;
    let mut spec = spec();
    spec.ack_wait = Duration::from_secs(1);
    spec.max_deliver = 3;
    let handler = Treacherous::default();
    let killer = deposit("stall", 1);
    publish_envelope(&f, &killer, &killer.id).await;
    // Each time the handler is stuck on it, the "process" dies (its task is aborted: no ack, its
    // transaction rolled back) and a new one starts; the server redelivers after ack_wait.
    for attempt in 1..=3 {
        let task = spawn_runner(&f, handler.clone(), spec.clone());
        eventually(WAIT, &format!("attempt {attempt} to stall"), || async {
            (handler.stalls.load(Ordering::SeqCst) == attempt).then_some(())
        })
        .await;
        task.abort();
        let _ = task.await;
    }
    // The next start gives it up without calling the handler, and goes on with the rest.
    let task = spawn_runner(&f, handler.clone(), spec.clone());
    let next = deposit("dave", 7);
    publish_envelope(&f, &next, &next.id).await;
    let dead = eventually(WAIT, "the killer message dead-lettered", || async {
        dead_letters(&f.db, 10).await.unwrap().into_iter().next()
    })
    .await;
    assert!(
        dead.reason.starts_with("gave up after 3 attempts"),
        "{}",
        dead.reason
    );
    assert_eq!(dead.event_id.as_deref(), Some(killer.id.as_str()));
    eventually(WAIT, "the next deposit applied", || async {
        (balance(&f.db, "dave").await == Some(7)).then_some(())
    })
    .await;
    assert_eq!(
        handler.stalls.load(Ordering::SeqCst),
        3,
        "not applied a fourth time"
    );
    task.abort();
}

async fn a_panicking_handler_dead_letters_its_message_and_the_consumer_goes_on(b: Backend) {
    let f = fixture(b).await;
    let task = spawn_runner(&f, Treacherous::default(), spec());
    let boom = deposit("boom", 1);
    let fine = deposit("erin", 3);
    publish_envelope(&f, &boom, &boom.id).await;
    publish_envelope(&f, &fine, &fine.id).await;
    eventually(WAIT, "the deposit after the panic applied", || async {
        (balance(&f.db, "erin").await == Some(3)).then_some(())
    })
    .await;
    let dead = dead_letters(&f.db, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].reason.contains("handler panicked") && dead[0].reason.contains("boom"),
        "{}",
        dead[0].reason
    );
    task.abort();
}

/// Pooled Postgres connections are pinged only after a second idle (a ping per checkout was a
/// round trip per transaction). Connections the server dropped while they sat in the pool (a
/// restart, an administrator) must still never be handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_dropped_while_idle_are_never_handed_out() {
    use sqlx::Connection;
    let testdb = TestDb::new(Backend::Postgres).await;
    let db = Database::connect(&testdb.url, event_toolkit::DbOptions::default())
        .await
        .unwrap();
    // Four connections open at once, then back in the pool.
    let busy = (0..4).map(|_| {
        let db = db.clone();
        async move {
            let mut tx = db.begin().await.unwrap();
            sqlx::query("SELECT pg_sleep(0.05)")
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
    });
    futures::future::join_all(busy).await;
    // And connections kept out of the pool: a worker's, and one kept between writes.
    let mut kept = db.keep();
    kept.begin().await.unwrap().commit().await.unwrap();
    assert_eq!(select_one_by_write(&db).await.unwrap(), 1);
    let idle_since = Instant::now();
    let mut admin = AnyConnection::connect(&testdb.url).await.unwrap();
    let others = "SELECT COUNT(*) FROM pg_stat_activity \
                  WHERE datname = current_database() AND pid <> pg_backend_pid()";
    let open: i64 = sqlx::query(others)
        .fetch_one(&mut admin)
        .await
        .unwrap()
        .get(0);
    assert!(open >= 4, "the pool holds {open} connections");
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    eventually(WAIT, "the pool's connections are gone", || async {
        let left: i64 = sqlx::query(others)
            .fetch_one(&mut AnyConnection::connect(&testdb.url).await.unwrap())
            .await
            .unwrap()
            .get(0);
        (left <= 1).then_some(()) // `admin`
    })
    .await;
    // Idle past the threshold: each checkout is pinged and a dead connection replaced.
    let wait = event_toolkit::db::PING_AFTER_IDLE.saturating_sub(idle_since.elapsed());
    tokio::time::sleep(wait + Duration::from_millis(100)).await;
    for round in 0..8 {
        let mut tx = db.begin().await.unwrap();
        let n = select_one(&mut tx)
            .await
            .unwrap_or_else(|e| panic!("transaction {round} got a dead connection: {e}"));
        tx.commit().await.unwrap();
        assert_eq!(n, 1);
    }
    let concurrent = (0..4).map(|_| {
        let db = db.clone();
        async move { sqlx::query("SELECT 1").execute(db.pool()).await.is_ok() }
    });
    assert!(futures::future::join_all(concurrent)
        .await
        .into_iter()
        .all(|ok| ok));
    // The kept ones, idle as long, are given back (and checked) instead of used.
    let mut tx = kept.begin().await.unwrap();
    let n = select_one(&mut tx)
        .await
        .unwrap_or_else(|e| panic!("the worker's kept connection was dead: {e}"));
    tx.commit().await.unwrap();
    assert_eq!(n, 1);
    let n = select_one_by_write(&db)
        .await
        .unwrap_or_else(|e| panic!("the connection kept between writes was dead: {e}"));
    assert_eq!(n, 1);
    admin.close().await.unwrap();
}

/// `SELECT 1` on `conn`.
async fn select_one(conn: &mut AnyConnection) -> Result<i64, sqlx::Error> {
    Ok(sqlx::query("SELECT 1::BIGINT")
        .fetch_one(conn)
        .await?
        .get(0))
}

/// `SELECT 1` in a [`Database::write`].
async fn select_one_by_write(db: &Database) -> Result<i64, sqlx::Error> {
    db.write(Box::new(|conn| {
        Box::pin(async move { Ok(event_toolkit::Written::Commit(select_one(conn).await?)) })
    }))
    .await
}

/// Workers keep connections out of the pool between their transactions, but never more than half
/// of it: the rest stays for everyone else (HTTP requests, sweeps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_kept_connections_leave_half_the_pool_to_others() {
    let testdb = TestDb::new(Backend::Postgres).await;
    let options = event_toolkit::DbOptions {
        max_connections: 4,
        ..Default::default()
    };
    let db = Database::connect(&testdb.url, options).await.unwrap();
    // Four workers, each keeping what it can, plus writes at once.
    let mut workers: Vec<_> = (0..4).map(|_| db.keep()).collect();
    for w in &mut workers {
        w.begin().await.unwrap().commit().await.unwrap();
    }
    let writes = (0..4).map(|_| select_one_by_write(&db));
    for n in futures::future::join_all(writes).await {
        assert_eq!(n.unwrap(), 1);
    }
    // Two connections, all at once, for others; the pool would wait 30 s for a free one.
    let others = async {
        let a = db.pool().acquire().await.unwrap();
        let b = db.pool().acquire().await.unwrap();
        (a, b)
    };
    let got = tokio::time::timeout(Duration::from_secs(5), others).await;
    assert!(
        got.is_ok(),
        "kept connections took more than half the pool: nothing left for others"
    );
}
