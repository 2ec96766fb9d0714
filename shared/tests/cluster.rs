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
