//! The project's `nats.conf` on a real nats-server. Each service's user can do what its service does
//! at start-up and while running, and nothing that belongs to another service. The people's user
//! (`cli`, in account PEOPLE) sends commands and reads everything, through read-only mirrors of the
//! services' streams, and has no way to put a message onto a service's stream: not by publishing,
//! not by a consumer's deliver subject, not by a reply subject, not by a stream that republishes,
//! sources or mirrors, not by a consumer on the services' streams.
//!
//! Each test starts its own server from `nats.conf`, unmodified, on free ports and a temporary store
//! (nats-server's own flags, through the toolkit's harness).
//! A denial is observed twice. The server reports a permissions violation to the client (an error
//! event on the connection), and the state the request would have changed stays the same: for
//! the services' streams, their last sequence as their owners read it.
//!
//! `SAGA_NATS_CONF=<file>` runs the tests against another configuration, e.g. an older one
//! (`git show <rev>:nats.conf > /tmp/old.conf`); the people's mirrors are provisioned only if it
//! has the `provision` user.
//!
//! Needs nats-server >= 2.15 (`NATS_SERVER_BIN`, else PATH's, else `.tools/bin/nats-server` from
//! scripts/install-deps.sh); and python3, for `deploy/nats/provision.py`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, consumer::push, consumer::AckPolicy, stream};
use async_nats::{Client, ConnectOptions, Event, HeaderMap};
use event_toolkit::nats::ensure_stream;
use event_toolkit::testing::{eventually, NatsServer};
use event_toolkit::{ConsumerSpec, StreamSpec, Wiring};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// How long the server may take to start accepting connections.
const STARTUP_DEADLINE: Duration = Duration::from_secs(20);
/// How long a reported violation may take to reach the client.
const VIOLATION_DEADLINE: Duration = Duration::from_secs(5);
/// How long a JetStream request or publish waits for its reply. The server drops denied requests
/// without an answer, so this is also how long a denied call takes to fail.
const API_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound for anything else that happens "soon" (a core-published message being stored, a fetch).
const SETTLE_DEADLINE: Duration = Duration::from_secs(10);
/// How long a message that was going to land somewhere has had to land, before "it did not" is
/// believed. Deliveries and acks on one server take microseconds.
const LANDING_TIME: Duration = Duration::from_millis(500);

/// The users in nats.conf and the environment variables their passwords come from.
const USERS: [(&str, &str); 5] = [
    ("order", "NATS_ORDER_PASSWORD"),
    ("inventory", "NATS_INVENTORY_PASSWORD"),
    ("payment", "NATS_PAYMENT_PASSWORD"),
    ("provision", "NATS_PROVISION_PASSWORD"),
    ("cli", "NATS_CLI_PASSWORD"),
];

/// How each service is wired, from its own library: its NATS user, streams, durables and events.
fn wirings() -> Vec<Wiring> {
    vec![
        order_service::wiring(),
        inventory_service::wiring(),
        payment_service::wiring(),
    ]
}

/// The services' streams, which people read through mirrors of the same names.
fn stream_names() -> Vec<String> {
    wirings()
        .into_iter()
        .flat_map(|w| w.streams.into_iter().map(|s| s.name))
        .collect()
}

/// Every domain event a service announces.
fn events() -> Vec<&'static str> {
    wirings().into_iter().flat_map(|w| w.publishes).collect()
}

/// A stream as its owning service provisions it.
fn stream_spec(name: &str) -> StreamSpec {
    wirings()
        .into_iter()
        .flat_map(|w| w.streams)
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no service provisions {name}"))
}

/// Where people reach the services' account, read-only.
const SAGA_API: &str = "$JS.saga.API";

fn password(user: &str) -> String {
    format!("test-password-{user}")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits inside the repository")
        .to_path_buf()
}

/// A nats-server running the project's nats.conf (or `SAGA_NATS_CONF`) unmodified, with its
/// address, ports and store given as flags by the harness. Killed on drop.
struct ConfiguredServer {
    server: NatsServer,
    config: String,
    /// Holds the copy of an older configuration, if one was needed.
    _copy: Option<tempfile::TempDir>,
}

impl ConfiguredServer {
    async fn start() -> Self {
        let path = std::env::var_os("SAGA_NATS_CONF")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("nats.conf"));
        let original =
            fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        // Older configurations named their own store directory, which nats-server refuses next to
        // the store flag: run those from a copy without that line.
        let (path, copy) = if original
            .lines()
            .any(|l| l.trim_start().starts_with("store_dir:"))
        {
            let dir = tempfile::tempdir().expect("temp dir");
            let copy = dir.path().join("nats.conf");
            let without_store: Vec<&str> = original
                .lines()
                .filter(|l| !l.trim_start().starts_with("store_dir:"))
                .collect();
            fs::write(&copy, without_store.join("\n")).expect("write nats.conf copy");
            (copy, Some(dir))
        } else {
            (path, None)
        };
        let env = USERS
            .iter()
            .map(|(user, variable)| (variable.to_string(), password(user)))
            .collect();
        let server = Self {
            server: NatsServer::from_config_file(path, env).await,
            config: original,
            _copy: copy,
        };
        server.wait_until_ready().await;
        server
    }

    fn url(&self) -> String {
        self.server.url()
    }

    fn log(&self) -> String {
        self.server.log()
    }

    /// Ready means the `order` user can connect and JetStream answers `$JS.API.INFO`.
    async fn wait_until_ready(&self) {
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            let connected = ConnectOptions::new()
                .user_and_password("order".into(), password("order"))
                .connection_timeout(Duration::from_millis(500))
                .connect(self.url())
                .await;
            if let Ok(client) = connected {
                if jetstream_context(client).query_account().await.is_ok() {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "nats-server not ready after {STARTUP_DEADLINE:?}; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `deploy/nats/provision.py`, as the demo script and compose run it: the people's mirrors of
    /// the four streams, which must exist. Skipped for a configuration without the `provision`
    /// user (an older one, under `SAGA_NATS_CONF`).
    async fn provision_views(&self) {
        if !self.config.contains("user: provision") {
            eprintln!("NOTE: this nats.conf has no `provision` user; no mirrors provisioned");
            return;
        }
        let url = self.url();
        tokio::task::spawn_blocking(move || {
            saga_e2e::provision_views(&url, &password("provision"))
        })
        .await
        .expect("provisioning ran");
    }
}

fn jetstream_context(client: Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(API_TIMEOUT)
        .build(client)
}

/// A connection as one user, with the errors the server reported on it.
struct UserConnection {
    user: &'static str,
    client: Client,
    js: jetstream::Context,
    server_errors: mpsc::UnboundedReceiver<String>,
}

async fn connect_as(server: &ConfiguredServer, user: &'static str) -> UserConnection {
    let (tx, server_errors) = mpsc::unbounded_channel();
    let client = ConnectOptions::new()
        .user_and_password(user.into(), password(user))
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let Event::ServerError(error) = event {
                    let _ = tx.send(error.to_string());
                }
            }
        })
        .connect(server.url())
        .await
        .unwrap_or_else(|e| panic!("{user} cannot connect: {e}"));
    let js = jetstream_context(client.clone());
    UserConnection {
        user,
        client,
        js,
        server_errors,
    }
}

impl UserConnection {
    /// Wait for the server to report a permissions violation naming `subject`.
    async fn expect_violation(&mut self, subject: &str) {
        let deadline = Instant::now() + VIOLATION_DEADLINE;
        let mut others = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.server_errors.recv()).await {
                Ok(Some(error)) => {
                    if error.to_lowercase().contains("permissions violation")
                        && error.contains(&format!("\"{subject}\""))
                    {
                        return;
                    }
                    others.push(error);
                }
                Ok(None) | Err(_) => panic!(
                    "{}: no permissions violation for {subject:?} within {VIOLATION_DEADLINE:?}; \
                     other server errors: {others:?}",
                    self.user
                ),
            }
        }
    }

    /// A core request, answered or not within [`API_TIMEOUT`].
    async fn raw_request(&self, subject: &str, body: &str) -> Option<async_nats::Message> {
        tokio::time::timeout(
            API_TIMEOUT,
            self.client
                .request(subject.to_owned(), body.to_owned().into()),
        )
        .await
        .ok()
        .and_then(Result::ok)
    }

    /// A JetStream API request with a JSON body; its JSON answer, if any came.
    async fn api_request(&self, subject: &str, body: Value) -> Option<Value> {
        let answer = self.raw_request(subject, &body.to_string()).await?;
        serde_json::from_slice(&answer.payload).ok()
    }

    /// Core publish (what `nats pub` sends), flushed to the server.
    async fn core_publish(&self, subject: &str, body: &str) {
        self.client
            .publish(subject.to_owned(), body.to_owned().into())
            .await
            .expect("core publish");
        self.client.flush().await.expect("flush");
    }

    /// Core publish with a reply subject of the sender's choosing (a request nobody waits on).
    async fn publish_with_reply(&self, subject: &str, reply: &str, body: &str) {
        self.client
            .publish_with_reply(subject.to_owned(), reply.to_owned(), body.to_owned().into())
            .await
            .expect("publish with reply");
        self.client.flush().await.expect("flush");
    }

    /// JetStream publish, waiting for the stream's ack.
    async fn publish_acked(&self, subject: &str, body: &str) -> jetstream::publish::PublishAck {
        self.js
            .publish(subject.to_owned(), body.to_owned().into())
            .await
            .unwrap_or_else(|e| panic!("{}: send {subject}: {e}", self.user))
            .await
            .unwrap_or_else(|e| panic!("{}: no ack for {subject}: {e}", self.user))
    }
}

async fn message_count(js: &jetstream::Context, stream: &str) -> u64 {
    stream_state(js, stream).await.messages
}

async fn stream_state(js: &jetstream::Context, stream: &str) -> stream::State {
    js.get_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("stream {stream}: {e}"))
        .get_info()
        .await
        .unwrap_or_else(|e| panic!("stream {stream} info: {e}"))
        .state
}

async fn wait_for_count(js: &jetstream::Context, stream: &str, expected: u64) {
    eventually(
        SETTLE_DEADLINE,
        &format!("{stream} to hold {expected} messages"),
        || async move { (message_count(js, stream).await == expected).then_some(()) },
    )
    .await;
}

/// Fetch exactly `n` messages from `consumer`, within [`SETTLE_DEADLINE`].
async fn fetch(consumer: &jetstream::consumer::PullConsumer, n: usize) -> Vec<jetstream::Message> {
    let mut got = Vec::new();
    let deadline = Instant::now() + SETTLE_DEADLINE;
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "fetched {} of {n} messages before the deadline",
            got.len()
        );
        let mut batch = consumer
            .fetch()
            .max_messages(n - got.len())
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .expect("fetch request");
        while let Some(message) = batch.next().await {
            got.push(message.expect("fetched message"));
        }
    }
    got
}

fn orders_stream() -> StreamSpec {
    stream_spec("ORDERS")
}

fn order_commands_stream() -> StreamSpec {
    stream_spec("ORDER_COMMANDS")
}

fn inventory_stream() -> StreamSpec {
    stream_spec("INVENTORY")
}

fn payments_stream() -> StreamSpec {
    stream_spec("PAYMENTS")
}

/// A durable as its service declares it.
fn durable_spec(name: &str) -> ConsumerSpec {
    let d = wirings()
        .into_iter()
        .flat_map(|w| w.durables)
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("no service declares durable {name}"));
    let filters: Vec<&str> = d.filter_subjects.iter().map(String::as_str).collect();
    ConsumerSpec::new(&d.name, &d.stream, &filters)
}

fn inventory_from_orders() -> ConsumerSpec {
    durable_spec("inventory-from-orders")
}

const BODY: &str = r#"{"order_id":"test"}"#;

/// The services and their streams, as the services create them at start-up, each with one message.
struct Saga {
    order: UserConnection,
    inventory: UserConnection,
    payment: UserConnection,
}

impl Saga {
    /// Streams created by their owners; one event on each event stream, one command (from
    /// `cli`, the only sender of commands) on ORDER_COMMANDS; then the people's mirrors.
    async fn start(server: &ConfiguredServer) -> Self {
        let order = connect_as(server, "order").await;
        let inventory = connect_as(server, "inventory").await;
        let payment = connect_as(server, "payment").await;
        for spec in [orders_stream(), order_commands_stream()] {
            ensure_stream(&order.js, &spec).await.expect("order stream");
        }
        ensure_stream(&inventory.js, &inventory_stream())
            .await
            .expect("INVENTORY");
        ensure_stream(&payment.js, &payments_stream())
            .await
            .expect("PAYMENTS");
        order.publish_acked("orders.placed.v1", BODY).await;
        inventory.publish_acked("inventory.reserved.v1", BODY).await;
        payment.publish_acked("payments.succeeded.v1", BODY).await;
        let cli = connect_as(server, "cli").await;
        cli.core_publish("cmd.orders.place.v1", BODY).await;
        wait_for_count(&order.js, "ORDER_COMMANDS", 1).await;
        server.provision_views().await;
        Self {
            order,
            inventory,
            payment,
        }
    }

    /// Each stream's last sequence, read by its owner.
    async fn last_sequences(&self) -> Vec<(&'static str, u64)> {
        let mut out = Vec::new();
        for (stream, owner) in [
            ("ORDERS", &self.order),
            ("INVENTORY", &self.inventory),
            ("PAYMENTS", &self.payment),
            ("ORDER_COMMANDS", &self.order),
        ] {
            out.push((stream, stream_state(&owner.js, stream).await.last_sequence));
        }
        out
    }
}

/// Wait until each people's mirror has its origin's last sequence.
async fn wait_for_mirrors(saga: &Saga, cli: &UserConnection) {
    for (stream, last) in saga.last_sequences().await {
        eventually(
            SETTLE_DEADLINE,
            &format!("the people's {stream} to reach sequence {last}"),
            || async move {
                (stream_state(&cli.js, stream).await.last_sequence == last).then_some(())
            },
        )
        .await;
    }
}

#[tokio::test]
async fn connections_without_valid_credentials_are_refused() {
    let server = ConfiguredServer::start().await;
    let anonymous = tokio::time::timeout(SETTLE_DEADLINE, async_nats::connect(server.url()))
        .await
        .expect("connect attempt finished");
    assert!(
        anonymous.is_err(),
        "a connection without credentials was accepted"
    );
    let wrong = tokio::time::timeout(
        SETTLE_DEADLINE,
        ConnectOptions::new()
            .user_and_password("order".into(), "not-the-password".into())
            .connect(server.url()),
    )
    .await
    .expect("connect attempt finished");
    assert!(
        wrong.is_err(),
        "a connection with a wrong password was accepted"
    );
}

#[tokio::test]
async fn order_user_provisions_its_streams_and_publishes_its_events_with_acks() {
    let server = ConfiguredServer::start().await;
    let order = connect_as(&server, "order").await;

    // The toolkit's start-up path: STREAM.INFO, then STREAM.CREATE.
    ensure_stream(&order.js, &orders_stream())
        .await
        .expect("order creates ORDERS");
    ensure_stream(&order.js, &order_commands_stream())
        .await
        .expect("order creates ORDER_COMMANDS");
    // Idempotent at the next start, and STREAM.UPDATE when the spec changes.
    ensure_stream(&order.js, &orders_stream())
        .await
        .expect("ORDERS again");
    let mut shorter = orders_stream();
    shorter.max_age = Duration::from_secs(24 * 3600);
    ensure_stream(&order.js, &shorter)
        .await
        .expect("order updates ORDERS");
    let info = order
        .js
        .get_stream("ORDERS")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    assert_eq!(info.config.max_age, Duration::from_secs(24 * 3600));

    for subject in [
        "orders.placed.v1",
        "orders.confirmed.v1",
        "orders.cancelled.v1",
    ] {
        let ack = order.publish_acked(subject, BODY).await;
        assert_eq!(ack.stream, "ORDERS");
    }
    assert_eq!(message_count(&order.js, "ORDERS").await, 3);
}

#[tokio::test]
async fn payment_user_cannot_publish_or_subscribe_to_another_services_events() {
    let server = ConfiguredServer::start().await;
    let order = connect_as(&server, "order").await;
    let inventory = connect_as(&server, "inventory").await;
    ensure_stream(&order.js, &orders_stream())
        .await
        .expect("ORDERS");
    ensure_stream(&inventory.js, &inventory_stream())
        .await
        .expect("INVENTORY");
    let mut payment = connect_as(&server, "payment").await;

    // JetStream publish: the server drops it, so no ack ever comes.
    let ack = payment
        .js
        .publish("orders.placed.v1", BODY.into())
        .await
        .expect("the message is sent")
        .await;
    assert!(
        ack.is_err(),
        "payment got an ack for orders.placed.v1: {ack:?}"
    );
    payment.expect_violation("orders.placed.v1").await;

    // Core publish, as `nats pub` sends it: no ack to wait for, only the violation.
    payment.core_publish("inventory.reserved.v1", BODY).await;
    payment.expect_violation("inventory.reserved.v1").await;

    // The violations were reported after the server dropped both messages.
    assert_eq!(message_count(&order.js, "ORDERS").await, 0);
    assert_eq!(message_count(&inventory.js, "INVENTORY").await, 0);

    // No reading other services' events behind JetStream's back either.
    let _subscription = payment
        .client
        .subscribe("orders.>")
        .await
        .expect("SUB sent");
    payment.client.flush().await.expect("flush");
    payment.expect_violation("orders.>").await;

    // Its own stream and events work.
    ensure_stream(&payment.js, &payments_stream())
        .await
        .expect("payment creates PAYMENTS");
    for subject in [
        "payments.succeeded.v1",
        "payments.failed.v1",
        "payments.refunded.v1",
    ] {
        assert_eq!(
            payment.publish_acked(subject, BODY).await.stream,
            "PAYMENTS"
        );
    }
}

#[tokio::test]
async fn payment_user_cannot_create_read_or_pull_another_services_durable() {
    let server = ConfiguredServer::start().await;
    let order = connect_as(&server, "order").await;
    ensure_stream(&order.js, &orders_stream())
        .await
        .expect("ORDERS");
    order.publish_acked("orders.placed.v1", BODY).await;
    let inventory = connect_as(&server, "inventory").await;
    let mut payment = connect_as(&server, "payment").await;

    // Creating inventory's durable: denied, and it does not exist afterwards.
    let created = payment
        .js
        .create_consumer_on_stream(inventory_from_orders().config(), "ORDERS")
        .await;
    assert!(created.is_err(), "payment created inventory-from-orders");
    payment
        .expect_violation("$JS.API.CONSUMER.CREATE.ORDERS.inventory-from-orders")
        .await;
    let missing = inventory
        .js
        .get_consumer_from_stream::<pull::Config, _, _>("inventory-from-orders", "ORDERS")
        .await;
    assert!(
        missing.is_err(),
        "inventory-from-orders exists: {missing:?}"
    );

    // Once inventory has created it, payment can neither read it, change it nor pull from it.
    let durable = inventory
        .js
        .get_stream("ORDERS")
        .await
        .expect("inventory reads ORDERS")
        .create_consumer(inventory_from_orders().config())
        .await
        .expect("inventory creates inventory-from-orders");

    let read = payment
        .js
        .get_consumer_from_stream::<pull::Config, _, _>("inventory-from-orders", "ORDERS")
        .await;
    assert!(read.is_err(), "payment read inventory-from-orders");
    payment
        .expect_violation("$JS.API.CONSUMER.INFO.ORDERS.inventory-from-orders")
        .await;

    let updated = payment
        .js
        .create_consumer_on_stream(inventory_from_orders().config(), "ORDERS")
        .await;
    assert!(updated.is_err(), "payment updated inventory-from-orders");
    payment
        .expect_violation("$JS.API.CONSUMER.CREATE.ORDERS.inventory-from-orders")
        .await;

    let pulled = payment
        .raw_request(
            "$JS.API.CONSUMER.MSG.NEXT.ORDERS.inventory-from-orders",
            r#"{"batch":1,"expires":1000000000}"#,
        )
        .await;
    assert!(
        pulled.is_none(),
        "payment pulled from inventory-from-orders: {pulled:?}"
    );
    payment
        .expect_violation("$JS.API.CONSUMER.MSG.NEXT.ORDERS.inventory-from-orders")
        .await;

    let info = durable
        .get_info()
        .await
        .expect("inventory reads its durable");
    assert_eq!(info.delivered.stream_sequence, 0, "nothing was delivered");
    assert_eq!(info.num_pending, 1);

    // Its own durable on the same stream is fine (single filter subject: the CREATE subject ends
    // with the filter).
    let own = payment
        .js
        .create_consumer_on_stream(
            pull::Config {
                durable_name: Some("payment-from-orders".into()),
                filter_subject: "orders.cancelled.v1".into(),
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            },
            "ORDERS",
        )
        .await;
    assert!(
        own.is_ok(),
        "payment cannot create payment-from-orders: {:?}",
        own.err()
    );
}

#[tokio::test]
async fn inventory_user_creates_its_durables_pulls_and_acks() {
    let server = ConfiguredServer::start().await;
    let order = connect_as(&server, "order").await;
    let payment = connect_as(&server, "payment").await;
    ensure_stream(&order.js, &orders_stream())
        .await
        .expect("ORDERS");
    ensure_stream(&payment.js, &payments_stream())
        .await
        .expect("PAYMENTS");
    for subject in [
        "orders.placed.v1",
        "orders.confirmed.v1",
        "orders.cancelled.v1",
    ] {
        order.publish_acked(subject, BODY).await;
    }
    payment.publish_acked("payments.failed.v1", BODY).await;

    let inventory = connect_as(&server, "inventory").await;
    ensure_stream(&inventory.js, &inventory_stream())
        .await
        .expect("inventory creates INVENTORY");

    // The toolkit's path: STREAM.INFO of the consumed stream, then CONSUMER.CREATE with several
    // filter subjects (no filter in the API subject). Running it again, as at every start, works.
    let orders = inventory
        .js
        .get_stream("ORDERS")
        .await
        .expect("inventory reads ORDERS");
    orders
        .create_consumer(inventory_from_orders().config())
        .await
        .expect("inventory creates inventory-from-orders");
    let from_orders = orders
        .create_consumer(inventory_from_orders().config())
        .await
        .expect("inventory re-creates inventory-from-orders");

    // double_ack waits for the server's confirmation, so it proves the $JS.ACK permission.
    for message in fetch(&from_orders, 3).await {
        message
            .double_ack()
            .await
            .expect("ack confirmed by the server");
    }
    let info = from_orders.get_info().await.expect("CONSUMER.INFO");
    assert_eq!(info.ack_floor.stream_sequence, 3);
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_pending, 0);

    // A single filter subject: the client puts it in the API subject,
    // $JS.API.CONSUMER.CREATE.PAYMENTS.inventory-from-payments.payments.failed.v1.
    let from_payments = inventory
        .js
        .create_consumer_on_stream(
            pull::Config {
                durable_name: Some("inventory-from-payments".into()),
                filter_subject: "payments.failed.v1".into(),
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            },
            "PAYMENTS",
        )
        .await
        .expect("inventory creates inventory-from-payments");
    for message in fetch(&from_payments, 1).await {
        assert_eq!(message.subject.as_str(), "payments.failed.v1");
        message
            .double_ack()
            .await
            .expect("ack confirmed by the server");
    }

    for subject in [
        "inventory.reserved.v1",
        "inventory.rejected.v1",
        "inventory.released.v1",
        "inventory.committed.v1",
    ] {
        assert_eq!(
            inventory.publish_acked(subject, BODY).await.stream,
            "INVENTORY"
        );
    }
}

#[tokio::test]
async fn people_user_publishes_no_domain_event() {
    let server = ConfiguredServer::start().await;
    let saga = Saga::start(&server).await;
    let before = saga.last_sequences().await;
    let mut cli = connect_as(&server, "cli").await;

    // `nats pub <event subject> ...`: a core publish of each, the two former compensation
    // recipes (orders.cancelled.v1, payments.failed.v1) included.
    for subject in events() {
        cli.core_publish(subject, BODY).await;
        cli.expect_violation(subject).await;
    }
    // A JetStream publish gets no ack either.
    let ack = cli
        .js
        .publish("orders.cancelled.v1", BODY.into())
        .await
        .expect("the message is sent")
        .await;
    assert!(
        ack.is_err(),
        "cli got an ack for orders.cancelled.v1: {ack:?}"
    );
    cli.expect_violation("orders.cancelled.v1").await;

    tokio::time::sleep(LANDING_TIME).await;
    assert_eq!(saga.last_sequences().await, before);
}

/// A push consumer delivers onto its deliver subject in the account of the stream it reads,
/// whatever its creator may publish. People's consumers read their mirrors, so they deliver in
/// PEOPLE, where no service stream listens.
#[tokio::test]
async fn people_consumers_deliver_only_into_the_people_account() {
    let server = ConfiguredServer::start().await;
    let saga = Saga::start(&server).await;
    let cli = connect_as(&server, "cli").await;
    wait_for_mirrors(&saga, &cli).await;
    let before = saga.last_sequences().await;

    // `nats sub <target>` gives each deliver subject interest.
    let targets = [
        "orders.cancelled.v1",
        "inventory.reserved.v1",
        "payments.failed.v1",
    ];
    let mut subscriptions = Vec::new();
    for target in targets {
        subscriptions.push(cli.client.subscribe(target).await.expect("subscribe"));
    }
    let mut delivered = futures::stream::select_all(subscriptions);
    cli.client.flush().await.expect("flush");

    // `nats consumer add <stream> --deliver <target>` on every stream people can read. Each
    // consumer delivers one message (max_ack_pending 1, never acked), so that deliveries that do
    // land in a stream cannot feed one another without end.
    let mut created = 0;
    for stream in &stream_names() {
        for (i, target) in targets.iter().enumerate() {
            let name = format!("side-door-{}-{i}", stream.to_lowercase().replace('_', "-"));
            let config = push::Config {
                name: Some(name.clone()),
                durable_name: Some(name.clone()),
                deliver_subject: (*target).to_owned(),
                ack_policy: AckPolicy::Explicit,
                max_ack_pending: 1,
                ..Default::default()
            };
            let result = match cli.js.get_stream(stream).await {
                Ok(s) => s
                    .create_consumer(config)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(()) => created += 1,
                Err(e) => eprintln!("{stream} -> {target}: refused: {e}"),
            }
        }
    }
    let mut seen = 0;
    let deadline = Instant::now() + SETTLE_DEADLINE;
    while seen < created {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, delivered.next()).await {
            Ok(Some(_)) => seen += 1,
            _ => panic!("{seen} of {created} side-door consumers delivered to the subscriber"),
        }
    }

    tokio::time::sleep(LANDING_TIME).await;
    assert_eq!(
        saga.last_sequences().await,
        before,
        "a consumer's deliver subject put messages onto the services' streams"
    );
    // The consumers were real: they delivered, to the people's own subjects.
    assert_eq!(
        created,
        stream_names().len() * targets.len(),
        "people may create consumers on every mirror"
    );
}

#[tokio::test]
async fn people_cannot_create_or_change_streams_that_republish_source_or_mirror() {
    let server = ConfiguredServer::start().await;
    let saga = Saga::start(&server).await;
    let mut cli = connect_as(&server, "cli").await;
    wait_for_mirrors(&saga, &cli).await;
    let before = saga.last_sequences().await;
    let mirror_before = cli
        .js
        .get_stream("ORDERS")
        .await
        .expect("the people's ORDERS")
        .get_info()
        .await
        .expect("info")
        .config;

    let republish = json!({"src": ">", "dest": "orders.cancelled.v1"});
    let saga_source = json!({"name": "ORDERS", "external": {"api": SAGA_API}});
    let attempts: Vec<(String, Value)> = vec![
        (
            "$JS.API.STREAM.CREATE.REPUBLISHER".into(),
            json!({"name": "REPUBLISHER", "subjects": ["scratch.>"], "republish": republish}),
        ),
        (
            "$JS.API.STREAM.CREATE.SOURCER".into(),
            json!({"name": "SOURCER", "sources": [saga_source], "republish": {"src": ">", "dest": "inventory.reserved.v1"}}),
        ),
        (
            "$JS.API.STREAM.CREATE.MIRRORER".into(),
            json!({"name": "MIRRORER", "mirror": {"name": "PAYMENTS", "external": {"api": SAGA_API},
                   "consumer": {"name": "people-mirror", "deliver_subject": "people.mirror.PAYMENTS"}}}),
        ),
        (
            "$JS.API.STREAM.UPDATE.ORDERS".into(),
            json!({"name": "ORDERS", "mirror": mirror_before.mirror, "republish": republish}),
        ),
        // The services' own stream API is not reachable from PEOPLE at all.
        (
            format!("{SAGA_API}.STREAM.CREATE.REPUBLISHER"),
            json!({"name": "REPUBLISHER", "subjects": ["scratch.>"], "republish": republish}),
        ),
        (
            format!("{SAGA_API}.STREAM.UPDATE.INVENTORY"),
            json!({"name": "INVENTORY", "subjects": ["inventory.>"], "republish": {"src": ">", "dest": "payments.failed.v1"}}),
        ),
    ];
    for (subject, body) in attempts {
        let answer = cli.api_request(&subject, body).await;
        assert!(answer.is_none(), "{subject} answered: {answer:?}");
        cli.expect_violation(&subject).await;
    }

    let names: BTreeSet<String> = cli
        .js
        .stream_names()
        .map(|n| n.expect("stream name"))
        .collect()
        .await;
    assert_eq!(names, stream_names().into_iter().collect());
    let mirror_after = cli
        .js
        .get_stream("ORDERS")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .config;
    assert_eq!(mirror_after.republish, None);
    assert_eq!(mirror_after.mirror, mirror_before.mirror);
    tokio::time::sleep(LANDING_TIME).await;
    assert_eq!(saga.last_sequences().await, before);
}

#[tokio::test]
async fn people_cannot_create_or_reset_consumers_on_the_services_streams() {
    let server = ConfiguredServer::start().await;
    let saga = Saga::start(&server).await;
    let mut cli = connect_as(&server, "cli").await;
    wait_for_mirrors(&saga, &cli).await;
    let before = saga.last_sequences().await;

    let side_door = json!({"stream_name": "ORDERS", "config": {
        "name": "side-door", "durable_name": "side-door", "deliver_subject": "inventory.reserved.v1",
        "ack_policy": "none", "deliver_policy": "all"}});
    for subject in [
        format!("{SAGA_API}.CONSUMER.CREATE.ORDERS.side-door"),
        format!("{SAGA_API}.CONSUMER.CREATE.ORDERS"),
        format!("{SAGA_API}.CONSUMER.RESET.ORDERS.people-mirror"),
        // The legacy form carries the name in the body, so no deny could match it.
        "$JS.API.CONSUMER.CREATE.ORDERS".to_owned(),
        // The mirrors' own source consumer name, which could feed a mirror.
        "$JS.API.CONSUMER.CREATE.ORDERS.people-mirror".to_owned(),
    ] {
        let answer = cli.api_request(&subject, side_door.clone()).await;
        assert!(answer.is_none(), "{subject} answered: {answer:?}");
        cli.expect_violation(&subject).await;
    }
    // The flow control of a mirror's source consumer is not theirs either.
    cli.core_publish("$JS.FC.ORDERS.people-mirror.x", "").await;
    cli.expect_violation("$JS.FC.ORDERS.people-mirror.x").await;

    // The consumer people may create lands on their mirror, not on the services' stream.
    let viewer = cli
        .js
        .get_stream("ORDERS")
        .await
        .expect("the people's ORDERS")
        .create_consumer(push::Config {
            durable_name: Some("viewer".into()),
            deliver_subject: "inventory.reserved.v1".into(),
            ..Default::default()
        })
        .await;
    assert!(viewer.is_ok(), "{:?}", viewer.err());
    let services = jetstream::with_prefix(cli.client.clone(), SAGA_API);
    let on_saga: BTreeSet<String> = services
        .get_stream("ORDERS")
        .await
        .expect("the services' ORDERS, read-only")
        .consumer_names()
        .map(|n| n.expect("consumer name"))
        .collect()
        .await;
    assert_eq!(on_saga, BTreeSet::from(["people-mirror".to_owned()]));
    tokio::time::sleep(LANDING_TIME).await;
    assert_eq!(saga.last_sequences().await, before);
}

/// Whoever answers a request publishes the answer onto the request's reply subject, which the
/// requester chose. From PEOPLE, every answer stays in PEOPLE.
#[tokio::test]
async fn reply_subjects_lead_back_to_the_people_account() {
    let server = ConfiguredServer::start().await;
    let saga = Saga::start(&server).await;
    let cli = connect_as(&server, "cli").await;
    wait_for_mirrors(&saga, &cli).await;
    let before = saga.last_sequences().await;
    let mut answers = cli
        .client
        .subscribe("orders.cancelled.v1")
        .await
        .expect("sub");
    cli.client.flush().await.expect("flush");

    // ORDER_COMMANDS acks a command onto its reply subject.
    cli.publish_with_reply("cmd.orders.cancel.v1", "orders.cancelled.v1", BODY)
        .await;
    // JetStream's API (the people's own, and the services' read-only one) answers onto it.
    cli.publish_with_reply("$JS.API.STREAM.INFO.ORDERS", "inventory.reserved.v1", "")
        .await;
    cli.publish_with_reply(
        &format!("{SAGA_API}.STREAM.INFO.INVENTORY"),
        "payments.failed.v1",
        "",
    )
    .await;
    // A pull request's messages go to its reply subject.
    let pager = cli
        .js
        .get_stream("ORDERS")
        .await
        .unwrap()
        .create_consumer(pull::Config {
            durable_name: Some("pager".into()),
            ..Default::default()
        })
        .await
        .expect("pager");
    cli.publish_with_reply(
        &format!(
            "$JS.API.CONSUMER.MSG.NEXT.ORDERS.{}",
            pager.cached_info().name
        ),
        "payments.refunded.v1",
        r#"{"batch":1}"#,
    )
    .await;

    // The command's ack came back to PEOPLE's `orders.cancelled.v1`.
    let ack = tokio::time::timeout(SETTLE_DEADLINE, answers.next())
        .await
        .expect("the command's ack")
        .expect("message");
    let ack: Value = serde_json::from_slice(&ack.payload).expect("an ack");
    assert_eq!(ack["stream"], "ORDER_COMMANDS");
    tokio::time::sleep(LANDING_TIME).await;
    let mut expected = before.clone();
    for (stream, last) in &mut expected {
        if *stream == "ORDER_COMMANDS" {
            *last += 1;
        }
    }
    assert_eq!(
        saga.last_sequences().await,
        expected,
        "only the command landed"
    );
}

/// What people do with the nats CLI still works: `nats sub`, `nats pub cmd.…`, `nats stream
/// ls/info/get/view`, `nats consumer info` of a service's durable.
#[tokio::test]
async fn people_read_everything_and_send_commands() {
    let server = ConfiguredServer::start().await;
    let saga = Saga::start(&server).await;
    let cli = connect_as(&server, "cli").await;
    let durable = saga
        .inventory
        .js
        .get_stream("ORDERS")
        .await
        .expect("inventory reads ORDERS")
        .create_consumer(inventory_from_orders().config())
        .await
        .expect("inventory creates inventory-from-orders");

    // `nats sub 'orders.>'` (and inventory, payments): the events live, as published.
    let mut live = Vec::new();
    for subject in ["orders.>", "inventory.>", "payments.>"] {
        live.push(cli.client.subscribe(subject).await.expect("subscribe"));
    }
    let mut live = futures::stream::select_all(live);
    // A round trip on the same connection: the server has the subscriptions before the services
    // publish (a flush only writes them out).
    cli.js.query_account().await.expect("$JS.API.INFO");
    saga.order.publish_acked("orders.confirmed.v1", BODY).await;
    saga.inventory
        .publish_acked("inventory.committed.v1", BODY)
        .await;
    saga.payment
        .publish_acked("payments.refunded.v1", BODY)
        .await;
    let mut subjects = BTreeSet::new();
    while subjects.len() < 3 {
        let m = tokio::time::timeout(SETTLE_DEADLINE, live.next())
            .await
            .expect("live events")
            .expect("message");
        assert_eq!(m.payload.as_ref(), BODY.as_bytes());
        subjects.insert(m.subject.to_string());
    }
    assert_eq!(
        subjects,
        BTreeSet::from([
            "orders.confirmed.v1".to_owned(),
            "inventory.committed.v1".to_owned(),
            "payments.refunded.v1".to_owned()
        ])
    );

    // `nats pub cmd.orders.place.v1 -H Nats-Msg-Id:cmd-7 '…'`, twice: kept once, header and all.
    for _ in 0..2 {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", "cmd-7");
        cli.client
            .publish_with_headers("cmd.orders.place.v1", headers, BODY.into())
            .await
            .expect("publish");
        cli.client.flush().await.expect("flush");
    }
    wait_for_count(&saga.order.js, "ORDER_COMMANDS", 2).await;
    wait_for_mirrors(&saga, &cli).await;
    tokio::time::sleep(LANDING_TIME).await;
    assert_eq!(message_count(&saga.order.js, "ORDER_COMMANDS").await, 2);

    // `nats stream ls`: the four mirrors.
    let names: BTreeSet<String> = cli
        .js
        .stream_names()
        .map(|n| n.expect("stream name"))
        .collect()
        .await;
    assert_eq!(names, stream_names().into_iter().collect());

    // `nats stream info ORDERS`: $JS.API.STREAM.INFO.ORDERS, a mirror of the services' ORDERS,
    // level with it.
    let orders = cli.js.get_stream("ORDERS").await.expect("STREAM.INFO");
    let info = orders.get_info().await.expect("info");
    assert_eq!(
        info.config.mirror.as_ref().map(|m| m.name.as_str()),
        Some("ORDERS")
    );
    assert!(
        info.config.subjects.is_empty(),
        "a mirror listens on no subject"
    );
    assert_eq!(
        info.state.last_sequence,
        stream_state(&saga.order.js, "ORDERS").await.last_sequence
    );

    // `nats stream get ORDER_COMMANDS 2` ($JS.API.STREAM.MSG.GET.ORDER_COMMANDS): the command as
    // sent, at the same sequence as on the services' stream.
    let commands = cli
        .js
        .get_stream("ORDER_COMMANDS")
        .await
        .expect("STREAM.INFO");
    let got = commands.get_raw_message(2).await.expect("STREAM.MSG.GET");
    assert_eq!(got.subject.as_str(), "cmd.orders.place.v1");
    assert_eq!(got.payload.as_ref(), BODY.as_bytes());
    assert_eq!(
        got.headers
            .get("Nats-Msg-Id")
            .map(|v| v.to_string())
            .as_deref(),
        Some("cmd-7")
    );
    let services = jetstream::with_prefix(cli.client.clone(), SAGA_API);
    let origin = services
        .get_stream("ORDER_COMMANDS")
        .await
        .expect("the services' ORDER_COMMANDS, read-only")
        .get_raw_message(2)
        .await
        .expect("MSG.GET through $JS.saga.API");
    assert_eq!(
        (origin.subject.as_str(), origin.payload.as_ref()),
        (got.subject.as_str(), got.payload.as_ref())
    );

    // `nats stream view ORDERS`: jsm.go's pager, a durable pull consumer `stream_pager_<n>` with
    // the filter `>` ($JS.API.CONSUMER.CREATE.ORDERS.stream_pager_<n>.>), pulled without waiting,
    // acked, deleted.
    let pager = orders
        .create_consumer(pull::Config {
            durable_name: Some("stream_pager_4242".into()),
            filter_subject: ">".into(),
            ack_policy: AckPolicy::Explicit,
            inactive_threshold: Duration::from_secs(3600),
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .expect("the pager's consumer");
    let page: Vec<jetstream::Message> = pager
        .fetch()
        .max_messages(25)
        .messages()
        .await
        .expect("CONSUMER.MSG.NEXT")
        .map(|m| m.expect("message"))
        .collect()
        .await;
    assert_eq!(page.len(), 2, "ORDERS holds two events");
    for m in &page {
        m.double_ack().await.expect("ack confirmed");
    }
    orders
        .delete_consumer("stream_pager_4242")
        .await
        .expect("CONSUMER.DELETE");

    // `nats consumer info ORDERS inventory-from-orders`: the services' durable itself.
    let seen = cli
        .js
        .get_consumer_from_stream::<pull::Config, _, _>("inventory-from-orders", "ORDERS")
        .await
        .expect("CONSUMER.INFO of a service's durable")
        .cached_info()
        .clone();
    let actual = durable
        .get_info()
        .await
        .expect("inventory reads its durable");
    assert_eq!(seen.config.filter_subjects, actual.config.filter_subjects);
    assert_eq!(seen.num_pending, actual.num_pending);

    // Provisioning again changes nothing.
    server.provision_views().await;
    wait_for_mirrors(&saga, &cli).await;
}

#[tokio::test]
async fn people_user_cannot_pull_ack_change_or_delete_a_services_durable() {
    let server = ConfiguredServer::start().await;
    let saga = Saga::start(&server).await;
    let durable = saga
        .inventory
        .js
        .get_stream("ORDERS")
        .await
        .unwrap()
        .create_consumer(inventory_from_orders().config())
        .await
        .expect("inventory creates inventory-from-orders");
    // Inventory holds the message without acking it yet.
    let delivered = fetch(&durable, 1).await;
    let ack_subject = delivered[0].reply.clone().expect("ack subject").to_string();
    assert!(
        ack_subject.starts_with("$JS.ACK.ORDERS.inventory-from-orders."),
        "{ack_subject}"
    );
    let mut cli = connect_as(&server, "cli").await;
    wait_for_mirrors(&saga, &cli).await;

    // `nats sub --stream ORDERS --durable inventory-from-orders` would pull and ack: in PEOPLE
    // that names a consumer of the mirror, which does not exist.
    let pulled = cli
        .raw_request(
            "$JS.API.CONSUMER.MSG.NEXT.ORDERS.inventory-from-orders",
            r#"{"batch":1,"expires":1000000000}"#,
        )
        .await;
    assert!(
        pulled.as_ref().is_none_or(|m| m.payload.is_empty()),
        "cli pulled from inventory-from-orders: {pulled:?}"
    );
    cli.core_publish(&ack_subject, "+ACK").await;
    // A reply subject that starts with $JS.ACK crosses an import unchanged; what is published
    // onto it (ORDER_COMMANDS's ack, a JSON object) is not an acknowledgement.
    cli.publish_with_reply("cmd.orders.place.v1", &ack_subject, BODY)
        .await;
    cli.publish_with_reply(
        &format!("{SAGA_API}.STREAM.MSG.GET.ORDERS"),
        &ack_subject,
        r#"{"seq":1}"#,
    )
    .await;

    // Changing it, by name (the people's own mirror gets it) or through the legacy subject.
    let mut hijack = inventory_from_orders().config();
    hijack.filter_subjects = vec!["orders.placed.v1".into()];
    let _ = cli.js.create_consumer_on_stream(hijack, "ORDERS").await;
    let legacy = cli
        .raw_request(
            "$JS.API.CONSUMER.CREATE.ORDERS",
            r#"{"stream_name":"ORDERS","config":{"name":"inventory-from-orders","ack_policy":"explicit","deliver_policy":"all","filter_subjects":["orders.placed.v1"]}}"#,
        )
        .await;
    assert!(
        legacy.is_none(),
        "legacy consumer create answered: {legacy:?}"
    );
    cli.expect_violation("$JS.API.CONSUMER.CREATE.ORDERS").await;
    let _ = cli
        .js
        .delete_consumer_from_stream("inventory-from-orders", "ORDERS")
        .await;

    // The durable is as inventory left it: same filters, the message still awaiting its ack.
    tokio::time::sleep(LANDING_TIME).await;
    let info = durable
        .get_info()
        .await
        .expect("inventory reads its durable");
    assert_eq!(
        info.config.filter_subjects,
        inventory_from_orders().filter_subjects
    );
    assert_eq!(info.num_ack_pending, 1);
    assert_eq!(info.ack_floor.stream_sequence, 0);
    delivered[0].double_ack().await.expect("inventory acks");
}

#[tokio::test]
async fn provision_user_sets_up_the_mirrors_and_nothing_else() {
    let server = ConfiguredServer::start().await;
    let saga = Saga::start(&server).await;
    let before = saga.last_sequences().await;
    let mut provision = connect_as(&server, "provision").await;

    for subject in ["orders.placed.v1", "cmd.orders.place.v1"] {
        provision.core_publish(subject, BODY).await;
        provision.expect_violation(subject).await;
    }
    for subject in [
        "$JS.API.CONSUMER.CREATE.ORDERS.other",
        "$JS.API.CONSUMER.CREATE.ORDERS.people-mirror.orders.placed.v1",
        "$JS.API.CONSUMER.DELETE.ORDERS.inventory-from-orders",
        "$JS.API.STREAM.DELETE.ORDERS",
        "$JS.API.STREAM.UPDATE.ORDERS",
        "$JS.people.API.STREAM.DELETE.ORDERS",
    ] {
        assert!(
            provision.raw_request(subject, "{}").await.is_none(),
            "{subject}"
        );
        provision.expect_violation(subject).await;
    }
    let _sub = provision
        .client
        .subscribe("orders.>")
        .await
        .expect("SUB sent");
    provision.client.flush().await.expect("flush");
    provision.expect_violation("orders.>").await;
    assert_eq!(saga.last_sequences().await, before);
}

/// `nats.conf` against the services' own wiring: each service's user provisions its streams,
/// publishes every event its service announces, creates every durable its service declares (with
/// the same filters), and may publish no event of another service.
#[tokio::test]
async fn each_service_user_may_do_exactly_what_its_wiring_declares() {
    let server = ConfiguredServer::start().await;
    let wirings = wirings();
    let mut users = Vec::new();
    for w in &wirings {
        let user = connect_as(&server, w.nats_user).await;
        for spec in &w.streams {
            ensure_stream(&user.js, spec)
                .await
                .unwrap_or_else(|e| panic!("{} cannot provision {}: {e}", w.nats_user, spec.name));
        }
        users.push(user);
    }
    for (w, user) in wirings.iter().zip(users.iter_mut()) {
        for ty in &w.publishes {
            let ack = user.publish_acked(ty, BODY).await;
            assert!(
                w.streams.iter().any(|s| s.name == ack.stream),
                "{ty} from {} landed in {}, not one of its streams",
                w.service,
                ack.stream
            );
        }
        for d in &w.durables {
            let spec = durable_spec(&d.name);
            let stream = user
                .js
                .get_stream(&d.stream)
                .await
                .unwrap_or_else(|e| panic!("{} cannot read {}: {e}", w.nats_user, d.stream));
            stream
                .create_consumer(spec.config())
                .await
                .unwrap_or_else(|e| panic!("{} cannot create {}: {e}", w.nats_user, d.name));
        }
        for other in wirings.iter().filter(|o| o.service != w.service) {
            for ty in &other.publishes {
                user.core_publish(ty, BODY).await;
                user.expect_violation(ty).await;
            }
        }
    }
}
