//! An N-node cluster of real nats-server processes on loopback ports, each with its own store and
//! `server_name`, routed to one another, JetStream enabled; any node can be stopped, killed and
//! restarted on the same ports and store. Name and routes are command-line flags, so a project's
//! own configuration file runs on every node unmodified.

use std::path::PathBuf;
use std::time::Duration;

use super::{
    free_port, nats_server_binary, NatsServer, NatsServerBuilder, Readiness, ServerConfig,
};

/// How long a (re)started node may take to be healthy: a restarted node must also catch up.
const NODE_HEALTHY: Duration = Duration::from_secs(60);

/// Options for a [`NatsCluster`]; [`NatsCluster::builder`].
pub struct NatsClusterBuilder {
    nodes: usize,
    /// The same options as one server's, applied to every node.
    node: NatsServerBuilder,
}

impl NatsClusterBuilder {
    /// The nats-server to run, instead of [`nats_server_binary`]'s choice.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.node = self.node.binary(path);
        self
    }

    /// Extra lines inside every node's `jetstream` block (e.g. `sync_interval: always`).
    pub fn jetstream_config(mut self, config: &str) -> Self {
        self.node = self.node.jetstream_config(config);
        self
    }

    /// Extra top-level configuration for every node, e.g. the accounts and users of a project's
    /// configuration (`include "/abs/path/accounts.conf"` works too). Unused with
    /// [`NatsClusterBuilder::config_file`].
    pub fn extra_config(mut self, config: &str) -> Self {
        self.node = self.node.extra_config(config);
        self
    }

    /// Run this configuration file, unmodified, on every node instead of a generated one (e.g. a
    /// project's accounts and users; it must enable JetStream and leave `store_dir` to the flag).
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.node = self.node.config_file(path);
        self
    }

    /// An environment variable for every node (for `$VAR` in the extra configuration).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.node = self.node.env(key, value);
        self
    }

    /// Start all nodes and wait until each is healthy (which includes an elected JetStream meta
    /// leader).
    pub async fn start(self) -> NatsCluster {
        assert!(self.nodes >= 1, "a cluster needs at least one node");
        let node = self.node;
        let binary = node.binary.unwrap_or_else(nats_server_binary);
        let route_ports: Vec<u16> = (0..self.nodes).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let config = match node.config_file {
            Some(path) => ServerConfig::File(path),
            None => ServerConfig::Generated {
                jetstream: node.jetstream_config,
                extra: node.extra_config,
            },
        };
        let mut nodes = Vec::with_capacity(self.nodes);
        for (i, route_port) in route_ports.iter().enumerate() {
            let mut node = NatsServer::new(
                binary.clone(),
                config.clone(),
                node.env.clone(),
                Readiness::Health {
                    js_enabled_only: false,
                },
            );
            // Every node lists every route, itself included: nats-server skips the route to
            // itself, and one list keeps the nodes' flags alike.
            node.args = vec![
                "-n".into(),
                node_name(i),
                "--cluster_name".into(),
                CLUSTER_NAME.into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{route_port}"),
                "--routes".into(),
                routes.clone(),
            ];
            nodes.push(node);
        }
        // All first, then wait: a node is healthy only once a quorum has elected a meta leader.
        for node in &mut nodes {
            node.spawn();
        }
        for node in &mut nodes {
            node.wait_ready_within(NODE_HEALTHY).await;
        }
        NatsCluster { nodes }
    }
}

const CLUSTER_NAME: &str = "test-cluster";

fn node_name(i: usize) -> String {
    format!("n{i}")
}

/// Real nats-server processes clustered on loopback. All killed on drop.
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Options for `nodes` nodes.
    pub fn builder(nodes: usize) -> NatsClusterBuilder {
        NatsClusterBuilder {
            nodes,
            node: NatsServerBuilder::default(),
        }
    }

    /// `nodes` nodes with JetStream and no authentication.
    pub async fn start(nodes: usize) -> Self {
        Self::builder(nodes).start().await
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// Node `i`'s `server_name`, as stream and consumer info report leaders and replicas.
    pub fn server_name(&self, i: usize) -> String {
        node_name(i)
    }

    /// Client URLs of all nodes, for a client that fails over among them.
    pub fn client_urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// Client URLs of all nodes, comma-separated (the form `NATS_URL` takes).
    pub fn urls(&self) -> String {
        self.client_urls().join(",")
    }

    /// SIGKILL node `i`, keeping its store.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Stop node `i` gracefully, keeping its store.
    pub fn stop(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Start node `i` again (after [`NatsCluster::stop`] or [`NatsCluster::kill`]; stopping it
    /// first if it runs) on the same ports and store, and wait until it is healthy, which for a
    /// restarted node includes having caught up with its streams.
    pub async fn restart(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.stop();
        node.spawn();
        node.wait_ready_within(NODE_HEALTHY).await;
    }

    /// The node that leads `stream` (from stream info `cluster.leader`), if there is one now.
    pub async fn stream_leader(
        &self,
        js: &async_nats::jetstream::Context,
        stream: &str,
    ) -> Option<usize> {
        let info = js.get_stream(stream).await.ok()?.get_info().await.ok()?;
        let leader = info.cluster?.leader?;
        (0..self.nodes.len()).find(|&i| node_name(i) == leader)
    }

    /// How many messages node `i`'s own replica of `stream` holds (any account), from its
    /// monitoring endpoint: `None` if the node does not answer or has no such stream.
    pub async fn stream_messages_on(&self, i: usize, stream: &str) -> Option<u64> {
        let body = self.nodes[i]
            .monitor("/jsz?accounts=true&streams=true")
            .await?;
        let jsz: serde_json::Value = serde_json::from_str(&body).ok()?;
        jsz["account_details"]
            .as_array()?
            .iter()
            .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
            .find(|s| s["name"] == stream)?["state"]["messages"]
            .as_u64()
    }
}
