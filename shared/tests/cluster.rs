//! The harness's N-node cluster on real nats-server processes: a 3-replica stream keeps accepting
//! publishes when its leader's node is SIGKILLed, and the node, restarted, catches up.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use event_toolkit::testing::{eventually, NatsCluster};

/// Bound for a new stream leader to be elected, and for a publish to be acknowledged across it.
const FAILOVER: Duration = Duration::from_secs(30);
/// Bound for a restarted replica to hold everything the stream holds.
const CATCH_UP: Duration = Duration::from_secs(30);

const STREAM: &str = "EVENTS";

/// Publish message `n` with a message id, retrying until it is acknowledged or `FAILOVER` passes.
/// The id makes a retry whose first attempt was stored anyway a duplicate the stream drops, so the
/// stream's count says exactly which publishes landed.
async fn publish(js: &jetstream::Context, n: u64) {
    eventually(FAILOVER, &format!("publish {n} to be acknowledged"), || {
        let message = PublishMessage::build()
            .payload(n.to_string().into())
            .message_id(format!("m-{n}"));
        async move {
            let ack = js.send_publish("events.one", message).await.ok()?;
            ack.await.ok()
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_stream_survives_the_leaders_node_being_killed_and_the_node_catches_up() {
    let mut cluster = NatsCluster::start(3).await;
    assert_eq!(cluster.urls().split(',').count(), 3);

    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(cluster.client_urls())
        .await
        .expect("connect to the cluster");
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client);
    js.create_stream(stream::Config {
        name: STREAM.to_owned(),
        subjects: vec!["events.>".to_owned()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .expect("create an R3 stream");

    for n in 0..50 {
        publish(&js, n).await;
    }
    let leader = eventually(FAILOVER, "the stream to have a leader", || {
        cluster.stream_leader(&js, STREAM)
    })
    .await;
    let info = js
        .get_stream(STREAM)
        .await
        .expect("stream")
        .get_info()
        .await
        .expect("info");
    let cluster_info = info.cluster.expect("cluster info");
    assert_eq!(
        cluster_info.replicas.len(),
        2,
        "a leader and two replicas: {cluster_info:?}"
    );

    cluster.kill(leader);
    let new_leader = eventually(FAILOVER, "another node to lead the stream", || async {
        cluster
            .stream_leader(&js, STREAM)
            .await
            .filter(|&l| l != leader)
    })
    .await;
    assert_ne!(new_leader, leader);
    for n in 50..100 {
        publish(&js, n).await;
    }
    let held = js
        .get_stream(STREAM)
        .await
        .expect("stream")
        .get_info()
        .await
        .expect("info")
        .state
        .messages;
    assert_eq!(
        held, 100,
        "every acknowledged publish, once, with one node down"
    );

    cluster.restart(leader).await;
    eventually(
        CATCH_UP,
        "the restarted node's replica to hold all 100",
        || {
            let cluster = &cluster;
            async move { (cluster.stream_messages_on(leader, STREAM).await? == 100).then_some(()) }
        },
    )
    .await;
    for i in 0..cluster.len() {
        assert_eq!(
            cluster.stream_messages_on(i, STREAM).await,
            Some(100),
            "node {} holds every message",
            cluster.server_name(i)
        );
    }
}

/// Accounts and users with a password from the environment, as a project's configuration has
/// them: the cluster runs them, from extra text or from a file, and JetStream works in the account.
const ACCOUNTS: &str = r#"
accounts {
  APP {
    jetstream: enabled
    users: [{ user: app, password: $APP_PASSWORD }]
  }
}
"#;

async fn r3_stream_as_app_user(cluster: &NatsCluster) {
    let client = async_nats::ConnectOptions::new()
        .user_and_password("app".into(), "app-secret".into())
        .connect(cluster.client_urls())
        .await
        .expect("connect as the configured user");
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: STREAM.to_owned(),
        subjects: vec!["events.>".to_owned()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .expect("create an R3 stream in the account");
    publish(&js, 1).await;
    let leader = eventually(FAILOVER, "the stream to have a leader", || {
        cluster.stream_leader(&js, STREAM)
    })
    .await;
    assert!(leader < cluster.len());
    let anonymous = async_nats::connect(cluster.urls().split(',').next().unwrap_or_default()).await;
    assert!(
        anonymous.is_err(),
        "the configuration refuses anonymous clients"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_runs_extra_configuration_with_accounts() {
    let cluster = NatsCluster::builder(3)
        .extra_config(ACCOUNTS)
        .env("APP_PASSWORD", "app-secret")
        .start()
        .await;
    r3_stream_as_app_user(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_runs_a_configuration_file_unmodified_on_every_node() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("app.conf");
    // A file as a project would write it for one server: its own name, ports and JetStream
    // limits, which the node flags take precedence over.
    std::fs::write(
        &file,
        format!("server_name: app\nlisten: 0.0.0.0:4222\nhttp_port: 8222\njetstream {{\n  max_file_store: 1GB\n}}\n{ACCOUNTS}"),
    )
    .expect("write configuration");
    let cluster = NatsCluster::builder(3)
        .config_file(&file)
        .env("APP_PASSWORD", "app-secret")
        .start()
        .await;
    r3_stream_as_app_user(&cluster).await;
}
