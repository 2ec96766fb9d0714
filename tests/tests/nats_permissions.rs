//! The project's `nats.conf` on a real nats-server. Each service's user can do what its service does
//! at start-up and while running, and nothing that belongs to another service. The `cli` user can
//! send commands and read streams, but can't administer streams or touch the services' durables.
//!
//! Each test starts its own server from `nats.conf`, rendered to free ports and a temporary store.
//! A denial is observed twice. The server reports a permissions violation to the client (an error
//! event on the connection), and the state the request would have changed stays the same.
//!
//! Needs nats-server >= 2.10: `.tools/bin/nats-server` (scripts/install-deps.sh) or `NATS_SERVER_BIN`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, stream};
use async_nats::{Client, ConnectOptions, Event};
use event_toolkit::nats::ensure_stream;
use event_toolkit::testing::{eventually, free_port};
use event_toolkit::{ConsumerSpec, StreamSpec};
use futures::StreamExt;
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

/// The users in nats.conf and the environment variables their passwords come from.
const USERS: [(&str, &str); 4] = [
    ("order", "NATS_ORDER_PASSWORD"),
    ("inventory", "NATS_INVENTORY_PASSWORD"),
    ("payment", "NATS_PAYMENT_PASSWORD"),
    ("cli", "NATS_CLI_PASSWORD"),
];

fn password(user: &str) -> String {
    format!("test-password-{user}")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits inside the repository")
        .to_path_buf()
}

fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let pinned = repo_root().join(".tools/bin/nats-server");
    if pinned.is_file() {
        return pinned;
    }
    panic!(
        "no nats-server: run scripts/install-deps.sh (installs nats-server >= 2.10 into .tools/bin) \
         or set NATS_SERVER_BIN"
    );
}

/// `nats.conf` with its client address, monitoring address and store directory replaced. Panics
/// unless each of those lines appears exactly once, so that a change to the file that would break
/// this rendering (and the demo script's) is noticed here.
fn render_config(original: &str, port: u16, http_port: u16, store_dir: &Path) -> String {
    let mut found = [0usize; 3];
    let mut out = String::with_capacity(original.len() + 64);
    for line in original.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let replaced = if trimmed.starts_with("listen:") {
            found[0] += 1;
            format!("{indent}listen: 127.0.0.1:{port}")
        } else if trimmed.starts_with("http_port:") {
            found[1] += 1;
            format!("{indent}http: \"127.0.0.1:{http_port}\"")
        } else if trimmed.starts_with("store_dir:") {
            found[2] += 1;
            format!("{indent}store_dir: {:?}", store_dir.display().to_string())
        } else {
            line.to_owned()
        };
        out.push_str(&replaced);
        out.push('\n');
    }
    assert_eq!(
        found,
        [1, 1, 1],
        "nats.conf must have exactly one `listen:`, one `http_port:` and one `store_dir:` line \
         (found {found:?}); the tests and the demo script rewrite them"
    );
    out
}

/// A nats-server running the project's nats.conf. Killed on drop.
struct ConfiguredServer {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl ConfiguredServer {
    async fn start() -> Self {
        let original = fs::read_to_string(repo_root().join("nats.conf"))
            .expect("read nats.conf at the repository root");
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let http_port = free_port();
        let conf = dir.path().join("nats.conf");
        fs::write(
            &conf,
            render_config(&original, port, http_port, &dir.path().join("jetstream")),
        )
        .expect("write rendered nats.conf");
        let log = File::create(dir.path().join("nats.log")).expect("create log file");
        let mut command = Command::new(nats_server_binary());
        command
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log);
        for (user, variable) in USERS {
            command.env(variable, password(user));
        }
        let child = command.spawn().expect("spawn nats-server");
        let mut server = Self { child, dir, port };
        server.wait_until_ready().await;
        server
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// Ready means the `order` user can connect and JetStream answers `$JS.API.INFO`.
    async fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "nats-server exited ({status}) before accepting connections; log:\n{}",
                    self.log()
                );
            }
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
}

impl Drop for ConfiguredServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

    /// Core publish (what `nats pub` sends), flushed to the server.
    async fn core_publish(&self, subject: &str, body: &str) {
        self.client
            .publish(subject.to_owned(), body.to_owned().into())
            .await
            .expect("core publish");
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
    js.get_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("stream {stream}: {e}"))
        .get_info()
        .await
        .unwrap_or_else(|e| panic!("stream {stream} info: {e}"))
        .state
        .messages
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
    StreamSpec::new("ORDERS", &["orders.>"])
}

fn order_commands_stream() -> StreamSpec {
    StreamSpec::new("ORDER_COMMANDS", &["cmd.orders.>"])
}

fn inventory_stream() -> StreamSpec {
    StreamSpec::new("INVENTORY", &["inventory.>"])
}

fn payments_stream() -> StreamSpec {
    StreamSpec::new("PAYMENTS", &["payments.>"])
}

fn inventory_from_orders() -> ConsumerSpec {
    ConsumerSpec::new(
        "inventory-from-orders",
        "ORDERS",
        &[
            "orders.placed.v1",
            "orders.confirmed.v1",
            "orders.cancelled.v1",
        ],
    )
}

const BODY: &str = r#"{"order_id":"test"}"#;

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
    let cli = connect_as(&server, "cli").await;
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
    let names: Vec<String> = cli
        .js
        .get_stream("ORDERS")
        .await
        .unwrap()
        .consumer_names()
        .map(|n| n.expect("consumer name"))
        .collect()
        .await;
    assert!(names.is_empty(), "consumers on ORDERS: {names:?}");

    // Once inventory has created it, payment can neither read it, change it nor pull from it.
    let inventory = connect_as(&server, "inventory").await;
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
async fn cli_user_sends_commands_and_reads_streams_but_cannot_administer_them() {
    let server = ConfiguredServer::start().await;
    let order = connect_as(&server, "order").await;
    ensure_stream(&order.js, &orders_stream())
        .await
        .expect("ORDERS");
    ensure_stream(&order.js, &order_commands_stream())
        .await
        .expect("ORDER_COMMANDS");
    order.publish_acked("orders.placed.v1", BODY).await;
    let mut cli = connect_as(&server, "cli").await;

    // `nats pub cmd.orders.place.v1 '{...}'` and the manual compensation recipes: core publishes.
    cli.core_publish("cmd.orders.place.v1", BODY).await;
    cli.core_publish("cmd.orders.cancel.v1", BODY).await;
    cli.core_publish("orders.cancelled.v1", BODY).await;
    wait_for_count(&cli.js, "ORDER_COMMANDS", 2).await;
    wait_for_count(&cli.js, "ORDERS", 2).await;

    // `nats stream ls` / `nats stream get`.
    let names: Vec<String> = cli
        .js
        .stream_names()
        .map(|n| n.expect("stream name"))
        .collect()
        .await;
    assert!(
        names.contains(&"ORDERS".to_owned()) && names.contains(&"ORDER_COMMANDS".to_owned()),
        "{names:?}"
    );
    let commands = cli
        .js
        .get_stream("ORDER_COMMANDS")
        .await
        .expect("STREAM.INFO");
    let first = commands.get_raw_message(1).await.expect("STREAM.MSG.GET");
    assert_eq!(first.subject.as_str(), "cmd.orders.place.v1");

    // `nats stream view`: a consumer of its own, pulled, acked, deleted.
    let orders = cli.js.get_stream("ORDERS").await.expect("STREAM.INFO");
    let pager = orders
        .create_consumer(pull::Config {
            durable_name: Some("stream_pager_test".into()),
            ack_policy: AckPolicy::Explicit,
            inactive_threshold: Duration::from_secs(3600),
            ..Default::default()
        })
        .await
        .expect("cli creates a viewer consumer");
    for message in fetch(&pager, 2).await {
        message.double_ack().await.expect("viewer ack confirmed");
    }
    orders
        .delete_consumer("stream_pager_test")
        .await
        .expect("cli deletes its viewer consumer");
    // `nats sub --stream ORDERS`: a named ephemeral consumer with a filter in the API subject.
    let ephemeral = orders
        .create_consumer(pull::Config {
            name: Some("cli_sub_test".into()),
            filter_subject: "orders.cancelled.v1".into(),
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .expect("cli creates an ephemeral consumer");
    assert_eq!(
        fetch(&ephemeral, 1).await[0].subject.as_str(),
        "orders.cancelled.v1"
    );

    // No administration: delete, purge, create.
    assert!(
        cli.js.delete_stream("ORDERS").await.is_err(),
        "cli deleted ORDERS"
    );
    cli.expect_violation("$JS.API.STREAM.DELETE.ORDERS").await;
    assert!(orders.purge().await.is_err(), "cli purged ORDERS");
    cli.expect_violation("$JS.API.STREAM.PURGE.ORDERS").await;
    let created = cli
        .js
        .create_stream(stream::Config {
            name: "CLI_OWN".into(),
            subjects: vec!["cli.>".into()],
            ..Default::default()
        })
        .await;
    assert!(created.is_err(), "cli created a stream");
    cli.expect_violation("$JS.API.STREAM.CREATE.CLI_OWN").await;
    assert_eq!(
        message_count(&order.js, "ORDERS").await,
        2,
        "ORDERS is intact"
    );

    // No impersonating a service.
    cli.core_publish("inventory.reserved.v1", BODY).await;
    cli.expect_violation("inventory.reserved.v1").await;
    cli.core_publish("orders.placed.v1", BODY).await;
    cli.expect_violation("orders.placed.v1").await;
    assert_eq!(message_count(&order.js, "ORDERS").await, 2);
}

#[tokio::test]
async fn cli_user_cannot_pull_ack_change_or_delete_a_services_durable() {
    let server = ConfiguredServer::start().await;
    let order = connect_as(&server, "order").await;
    ensure_stream(&order.js, &orders_stream())
        .await
        .expect("ORDERS");
    order.publish_acked("orders.placed.v1", BODY).await;
    let inventory = connect_as(&server, "inventory").await;
    let durable = inventory
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
    // Reading its info is allowed (`nats consumer info`).
    cli.js
        .get_consumer_from_stream::<pull::Config, _, _>("inventory-from-orders", "ORDERS")
        .await
        .expect("cli reads inventory-from-orders");

    // `nats sub --stream ORDERS --durable inventory-from-orders` would pull and ack.
    let pulled = cli
        .raw_request(
            "$JS.API.CONSUMER.MSG.NEXT.ORDERS.inventory-from-orders",
            r#"{"batch":1,"expires":1000000000}"#,
        )
        .await;
    assert!(
        pulled.is_none(),
        "cli pulled from inventory-from-orders: {pulled:?}"
    );
    cli.expect_violation("$JS.API.CONSUMER.MSG.NEXT.ORDERS.inventory-from-orders")
        .await;
    cli.core_publish(&ack_subject, "+ACK").await;
    cli.expect_violation(&ack_subject).await;

    // Changing it, by name (with and without a filter in the subject) or through the legacy
    // subject that carries the name in the body.
    let mut hijack = inventory_from_orders().config();
    hijack.filter_subjects = vec!["orders.placed.v1".into()];
    assert!(cli
        .js
        .create_consumer_on_stream(hijack, "ORDERS")
        .await
        .is_err());
    cli.expect_violation("$JS.API.CONSUMER.CREATE.ORDERS.inventory-from-orders")
        .await;
    let single = pull::Config {
        durable_name: Some("inventory-from-orders".into()),
        filter_subject: "orders.placed.v1".into(),
        ..Default::default()
    };
    assert!(cli
        .js
        .create_consumer_on_stream(single, "ORDERS")
        .await
        .is_err());
    cli.expect_violation("$JS.API.CONSUMER.CREATE.ORDERS.inventory-from-orders.orders.placed.v1")
        .await;
    let legacy = cli
        .raw_request(
            "$JS.API.CONSUMER.CREATE.ORDERS",
            r#"{"stream_name":"ORDERS","config":{"name":"inventory-from-orders","ack_policy":"explicit","deliver_policy":"all","ack_wait":10000000000,"max_deliver":10,"max_ack_pending":1024,"filter_subjects":["orders.placed.v1"]}}"#,
        )
        .await;
    assert!(
        legacy.is_none(),
        "legacy consumer create answered: {legacy:?}"
    );
    cli.expect_violation("$JS.API.CONSUMER.CREATE.ORDERS").await;

    // Deleting it.
    assert!(cli
        .js
        .delete_consumer_from_stream("inventory-from-orders", "ORDERS")
        .await
        .is_err());
    cli.expect_violation("$JS.API.CONSUMER.DELETE.ORDERS.inventory-from-orders")
        .await;

    // The durable is as inventory left it: same filters, the message still awaiting its ack.
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
