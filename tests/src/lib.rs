//! End-to-end support: the three real service binaries, a real nats-server and real databases,
//! started per test, with helpers to drive them over HTTP and NATS and to inject faults.

pub mod catalogue;
pub mod faults;
pub mod gateway;
pub mod invariants;

pub use order_service::domain::{CancelReason, OrderStatus};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use event_toolkit::testing::{eventually, free_port, repo_root, NatsCluster, NatsServer, TestDb};
use event_toolkit::{Backend, Envelope};
use serde_json::{json, Value};

pub use event_toolkit::testing::eventually as wait_for;

/// How long any single condition may take to come true in these tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// The `ADMIN_TOKEN` every test system's services get; [`System::http`] sends it on every request,
/// so seeding helpers work, and boundary tests use a client without it.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// One of the three services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// order-service
    Order,
    /// inventory-service
    Inventory,
    /// payment-service
    Payment,
}

impl Service {
    /// All three.
    pub const ALL: [Service; 3] = [Service::Order, Service::Inventory, Service::Payment];

    /// Binary name.
    pub fn binary(self) -> &'static str {
        match self {
            Self::Order => "order-service",
            Self::Inventory => "inventory-service",
            Self::Payment => "payment-service",
        }
    }
}

/// Where the service binaries are: `SAGA_BIN_DIR`, else the profile directory this test binary
/// was built into (`target/debug/deps/<test>` or `target/release/<bin>`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("SAGA_BIN_DIR") {
        return PathBuf::from(d);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let dir = exe.parent()?;
            // Test binaries live in `<profile>/deps`, binaries in `<profile>`.
            Some(if dir.ends_with("deps") {
                dir.parent()?.to_path_buf()
            } else {
                dir.to_path_buf()
            })
        })
        .unwrap_or_else(|| repo_root().join("target/debug"))
}

/// Test password of a `nats.conf` user.
fn password(user: &str) -> String {
    format!("test-{user}-secret")
}

/// The environment `nats.conf` reads its passwords from.
fn user_passwords() -> Vec<(String, String)> {
    ["order", "inventory", "payment", "provision", "cli"]
        .iter()
        .map(|u| (format!("NATS_{}_PASSWORD", u.to_uppercase()), password(u)))
        .collect()
}

/// Where the people's user (account PEOPLE in `nats.conf`) reaches the services' account's
/// read-only JetStream API: stream and consumer info and lists, single messages.
pub const SERVICES_API_PREFIX: &str = "$JS.saga.API";

/// The consumer on each of the services' streams that feeds the people's mirror of it. It belongs
/// to no service.
pub const MIRROR_SOURCE_CONSUMER: &str = "people-mirror";

/// Runs `deploy/nats/provision.py` (as the demo script and compose do) against a server running
/// the project's `nats.conf`: the people's read-only mirrors of the four streams, which must exist.
/// Panics with the script's output if it fails.
pub fn provision_views(nats_url: &str, provision_password: &str) {
    let script = repo_root().join("deploy/nats/provision.py");
    let out = Command::new("python3")
        .arg(&script)
        .env("NATS_URL", nats_url)
        .env("NATS_USER", "provision")
        .env("NATS_PASSWORD", provision_password)
        .env("PROVISION_WAIT_SECONDS", "30")
        .output()
        .unwrap_or_else(|e| panic!("run python3 {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed:\n{}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Wait until each of the people's mirrors holds what its origin holds (same last sequence), as
/// seen by a client of the people's account. Mirrors follow within milliseconds; reads through
/// them right after a publish can lag by that much.
pub async fn wait_for_mirrors(people: &async_nats::Client) {
    let view = async_nats::jetstream::new(people.clone());
    let origin = async_nats::jetstream::with_prefix(people.clone(), SERVICES_API_PREFIX);
    for name in ["ORDERS", "INVENTORY", "PAYMENTS", "ORDER_COMMANDS"] {
        let (view, origin) = (&view, &origin);
        eventually(
            WAIT,
            &format!("the mirror of {name} to catch up"),
            || async move {
                let want = origin
                    .get_stream(name)
                    .await
                    .ok()?
                    .get_info()
                    .await
                    .ok()?
                    .state;
                let have = view
                    .get_stream(name)
                    .await
                    .ok()?
                    .get_info()
                    .await
                    .ok()?
                    .state;
                (have.last_sequence == want.last_sequence).then_some(())
            },
        )
        .await;
    }
}

/// One process of a service: its own HTTP port and log; everything else shared with its sibling
/// replicas.
struct Running {
    child: Option<Child>,
    port: u16,
    env: HashMap<String, String>,
    log: PathBuf,
}

impl Running {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Settings of a [`System`] run.
#[derive(Debug, Clone)]
pub struct SystemConfig {
    /// Storage backend of all three services.
    pub backend: Backend,
    /// Order deadline.
    pub deadline_ms: u64,
    /// Simulated provider latency.
    pub gateway_latency_ms: u64,
    /// Amounts above this are declined.
    pub decline_over_minor: Option<i64>,
    /// Extra lines for nats-server's `jetstream` block (e.g. `sync_interval: always`).
    pub jetstream_config: String,
    /// Extra environment for all three services (e.g. `SQLITE_SYNCHRONOUS=FULL`).
    pub env: Vec<(String, String)>,
    /// Run nats-server with the project's `nats.conf`: each service connects as its own
    /// least-privilege user and the test client as `cli`.
    pub project_users: bool,
    /// Processes per service, all on the service's one database and the one nats-server (each with
    /// its own HTTP port). More than one needs Postgres: a SQLite file belongs to one process.
    pub replicas: usize,
    /// NATS nodes: 1, one nats-server; more, a cluster of that many ([`NatsCluster`]) with every
    /// stream on all of them (`STREAM_REPLICAS`) and the services given every node's URL.
    pub nats_nodes: usize,
}

impl SystemConfig {
    /// Defaults for a backend: 30 s deadline, instant provider.
    pub fn new(backend: Backend) -> Self {
        Self {
            backend,
            deadline_ms: 30_000,
            gateway_latency_ms: 0,
            decline_over_minor: None,
            jetstream_config: String::new(),
            env: Vec::new(),
            project_users: false,
            replicas: 1,
            nats_nodes: 1,
        }
    }
}

/// The NATS the system runs on: one server, or a cluster (shared, so its nodes can be stopped and
/// restarted while the system is in use).
pub enum Nats {
    /// One nats-server.
    Server(NatsServer),
    /// An N-node cluster and its nodes' client URLs (fixed across restarts).
    Cluster(Arc<tokio::sync::Mutex<NatsCluster>>, Vec<String>),
}

impl Nats {
    /// What `NATS_URL` is set to: the server's URL, or every node's, comma-separated.
    pub fn url(&self) -> String {
        self.urls().join(",")
    }

    /// Client URL of each node (one for a single server).
    pub fn urls(&self) -> Vec<String> {
        match self {
            Self::Server(n) => vec![n.url()],
            Self::Cluster(_, urls) => urls.clone(),
        }
    }

    /// The single server's pid (a cluster has several: `None`).
    pub fn pid(&self) -> Option<u32> {
        match self {
            Self::Server(n) => n.pid(),
            Self::Cluster(..) => None,
        }
    }

    /// The cluster, if the system runs on one.
    pub fn cluster(&self) -> Option<Arc<tokio::sync::Mutex<NatsCluster>>> {
        match self {
            Self::Server(_) => None,
            Self::Cluster(c, _) => Some(c.clone()),
        }
    }

    fn server(&mut self) -> &mut NatsServer {
        match self {
            Self::Server(n) => n,
            Self::Cluster(..) => panic!("a cluster's nodes are stopped one by one: Nats::cluster"),
        }
    }

    /// SIGKILL the single server, keeping its store.
    pub fn kill(&mut self) {
        self.server().kill();
    }

    /// Stop the single server gracefully.
    pub fn stop(&mut self) {
        self.server().stop();
    }

    /// Start the single server again on its port and store.
    pub async fn start_again(&mut self) {
        self.server().start_again().await;
    }
}

/// NATS, three databases and the three services.
pub struct System {
    /// The nats-server, or the cluster.
    pub nats: Nats,
    /// A client for tests (publishing by hand, reading streams).
    pub client: async_nats::Client,
    /// HTTP client.
    pub http: reqwest::Client,
    dbs: HashMap<Service, TestDb>,
    /// Each service's replicas, in order; `url(service)` answers with the first one running.
    services: HashMap<Service, Vec<Running>>,
    logs: tempfile::TempDir,
    /// What the test put in and what was accepted, for the invariant check.
    recorded: std::sync::Mutex<invariants::Recorded>,
    /// Started with the project's `nats.conf` (the client is then the people's user).
    project_users: bool,
}

impl System {
    /// Start everything and wait until all three services are ready.
    pub async fn start(config: SystemConfig) -> Self {
        assert!(
            config.replicas >= 1,
            "a system needs at least one replica per service"
        );
        assert!(
            config.replicas == 1 || config.backend == Backend::Postgres,
            "{} replicas per service need Postgres: one process owns a SQLite file",
            config.replicas
        );
        assert!(config.nats_nodes >= 1, "NATS needs at least one node");
        let (nats, client) = if config.nats_nodes > 1 {
            let mut builder =
                NatsCluster::builder(config.nats_nodes).jetstream_config(&config.jetstream_config);
            if config.project_users {
                builder = builder.config_file(repo_root().join("nats.conf"));
                for (k, v) in user_passwords() {
                    builder = builder.env(k, v);
                }
            }
            let cluster = builder.start().await;
            let mut options = async_nats::ConnectOptions::new();
            if config.project_users {
                options = options.user_and_password("cli".into(), password("cli"));
            }
            let urls = cluster.client_urls();
            let client = options.connect(urls.clone()).await.expect("test client");
            (
                Nats::Cluster(Arc::new(tokio::sync::Mutex::new(cluster)), urls),
                client,
            )
        } else if config.project_users {
            let nats =
                NatsServer::from_config_file(repo_root().join("nats.conf"), user_passwords()).await;
            let client = async_nats::ConnectOptions::new()
                .user_and_password("cli".into(), password("cli"))
                .connect(nats.url())
                .await
                .expect("cli client");
            (Nats::Server(nats), client)
        } else {
            let nats = NatsServer::start_with("", &config.jetstream_config).await;
            let client = async_nats::connect(nats.url()).await.expect("test client");
            (Nats::Server(nats), client)
        };
        let mut dbs = HashMap::new();
        for s in Service::ALL {
            dbs.insert(s, TestDb::new(config.backend).await);
        }
        let logs = tempfile::tempdir().expect("log dir");
        let mut system = Self {
            nats,
            client,
            http: reqwest::Client::builder()
                // The services close a connection idle past their header timeout (5 s by default):
                // never reuse one that old, or a request can meet the close.
                .pool_idle_timeout(std::time::Duration::from_secs(2))
                .timeout(Duration::from_secs(20))
                .default_headers(
                    [(
                        reqwest::header::AUTHORIZATION,
                        reqwest::header::HeaderValue::from_str(&format!("Bearer {ADMIN_TOKEN}"))
                            .expect("header value"),
                    )]
                    .into_iter()
                    .collect(),
                )
                .build()
                .expect("http client"),
            dbs,
            services: HashMap::new(),
            logs,
            recorded: Default::default(),
            project_users: config.project_users,
        };
        for s in Service::ALL {
            let mut env = HashMap::new();
            env.insert("NATS_URL".to_owned(), system.nats.url());
            // Every stream on every node: an acknowledged event survives the loss of one.
            env.insert("STREAM_REPLICAS".to_owned(), config.nats_nodes.to_string());
            env.insert("ADMIN_TOKEN".to_owned(), ADMIN_TOKEN.to_owned());
            env.insert("DATABASE_URL".to_owned(), system.dbs[&s].url.clone());
            env.insert(
                "RUST_LOG".to_owned(),
                std::env::var("SERVICE_LOG").unwrap_or_else(|_| "info,sqlx=warn".to_owned()),
            );
            for (k, v) in &config.env {
                env.insert(k.clone(), v.clone());
            }
            if config.project_users {
                let user = s.binary().trim_end_matches("-service");
                env.insert("NATS_USER".to_owned(), user.to_owned());
                env.insert("NATS_PASSWORD".to_owned(), password(user));
            }
            match s {
                Service::Order => {
                    env.insert("ORDER_DEADLINE_MS".into(), config.deadline_ms.to_string());
                }
                Service::Payment => {
                    env.insert(
                        "PAYMENT_GATEWAY_LATENCY_MS".into(),
                        config.gateway_latency_ms.to_string(),
                    );
                    if let Some(d) = config.decline_over_minor {
                        env.insert("PAYMENT_GATEWAY_DECLINE_OVER_MINOR".into(), d.to_string());
                    }
                }
                Service::Inventory => {}
            }
            let replicas = (0..config.replicas)
                .map(|i| {
                    let port = free_port();
                    let mut env = env.clone();
                    env.insert("HTTP_ADDR".to_owned(), format!("127.0.0.1:{port}"));
                    // The first replica's log keeps the name it has in a one-replica system.
                    let name = match i {
                        0 => format!("{}.log", s.binary()),
                        _ => format!("{}-{i}.log", s.binary()),
                    };
                    Running {
                        child: None,
                        port,
                        env,
                        log: system.logs.path().join(name),
                    }
                })
                .collect();
            system.services.insert(s, replicas);
        }
        for s in Service::ALL {
            system.launch(s);
        }
        for s in Service::ALL {
            system.wait_ready(s).await;
        }
        if config.project_users {
            // The people's user reads the streams through mirrors, set up once the services have
            // created the streams.
            let url = system.nats.url();
            tokio::task::spawn_blocking(move || provision_views(&url, &password("provision")))
                .await
                .expect("provision the people's mirrors");
        }
        system
    }

    /// A JetStream context on the services' streams and durables, for reading: the test client's
    /// own, or, under the project's `nats.conf`, the people's read-only window on the services'
    /// account ([`SERVICES_API_PREFIX`]). There the services' streams also carry
    /// [`MIRROR_SOURCE_CONSUMER`].
    pub fn services_js(&self) -> async_nats::jetstream::Context {
        if self.project_users {
            async_nats::jetstream::with_prefix(self.client.clone(), SERVICES_API_PREFIX)
        } else {
            async_nats::jetstream::new(self.client.clone())
        }
    }

    fn launch(&mut self, s: Service) {
        for i in 0..self.replicas() {
            self.launch_replica(s, i);
        }
    }

    fn launch_replica(&mut self, s: Service, i: usize) {
        let r = self.replica_mut(s, i);
        let binary = bin_dir().join(s.binary());
        assert!(
            binary.exists(),
            "{} not found: build the services first (cargo build --bins) or set SAGA_BIN_DIR",
            binary.display()
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&r.log)
            .expect("log file");
        let child = Command::new(binary)
            .envs(&r.env)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn service");
        r.child = Some(child);
    }

    /// Wait until `/readyz` answers 200 on every running replica of a service (on the first one
    /// if none is running, so waiting for a dead service still fails).
    pub async fn wait_ready(&self, s: Service) {
        let running: Vec<usize> = (0..self.replicas())
            .filter(|&i| self.is_replica_running(s, i))
            .collect();
        if running.is_empty() {
            return self.wait_replica_ready(s, 0).await;
        }
        for i in running {
            self.wait_replica_ready(s, i).await;
        }
    }

    /// Wait until `/readyz` answers 200 on one replica of a service. On timeout, the panic says
    /// what the replica last answered (its readiness report names what is missing), whether the
    /// process still runs, and the end of its log.
    pub async fn wait_replica_ready(&self, s: Service, i: usize) {
        let url = format!("{}/readyz", self.replica_url(s, i));
        let what = match self.replicas() {
            1 => format!("{} ready", s.binary()),
            _ => format!("{} replica {i} ready", s.binary()),
        };
        let start = std::time::Instant::now();
        let last = loop {
            let answer = match self.http.get(&url).send().await {
                Ok(r) if r.status() == 200 => return,
                Ok(r) => format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
                Err(e) => format!("no answer: {e}"),
            };
            if start.elapsed() > WAIT {
                break answer;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let process = match self.replica_pid(s, i) {
            None => "not started".to_owned(),
            Some(pid) => std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|st| {
                    st.lines()
                        .find(|l| l.starts_with("State:"))
                        .map(str::to_owned)
                })
                .map(|st| format!("pid {pid}, {st}"))
                .unwrap_or_else(|| format!("pid {pid}, gone")),
        };
        // Warnings say why; the info lines of a busy replica would bury them.
        let log = self.replica_log(s, i);
        let warnings: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        let warnings = &warnings[warnings.len().saturating_sub(40)..];
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(5)..];
        panic!(
            "timed out after {WAIT:?} waiting for: {what}\nlast /readyz answer: {last}\nprocess: {process}\n---- its last warnings ----\n{}\n---- its last lines ----\n{}",
            warnings.join("\n"),
            tail.join("\n")
        );
    }

    /// Process id of a running service (of its first running replica).
    pub fn pid(&self, s: Service) -> Option<u32> {
        self.services[&s]
            .iter()
            .find_map(|r| r.child.as_ref().map(|c| c.id()))
    }

    /// `http://127.0.0.1:<port>` of a service: of its first running replica, or of the first
    /// replica when none is running.
    pub fn url(&self, s: Service) -> String {
        let replicas = &self.services[&s];
        replicas
            .iter()
            .find(|r| r.child.is_some())
            .unwrap_or(&replicas[0])
            .url()
    }

    /// The database URL a service uses.
    pub fn database_url(&self, s: Service) -> &str {
        &self.dbs[&s].url
    }

    /// SIGKILL a service, every replica of it (no shutdown at all).
    pub fn kill(&mut self, s: Service) {
        for i in 0..self.replicas() {
            self.kill_replica(s, i);
        }
    }

    /// Send a signal (e.g. `STOP`, `CONT`, `TERM`) to every process of a service.
    pub fn signal(&self, s: Service, signal: &str) {
        for i in 0..self.replicas() {
            self.signal_replica(s, i, signal);
        }
    }

    /// SIGTERM every replica of a service and wait for clean exits; whether all exited cleanly.
    pub async fn stop(&mut self, s: Service) -> bool {
        let mut clean = true;
        for i in 0..self.replicas() {
            clean &= self.stop_replica(s, i).await;
        }
        clean
    }

    /// Start a stopped or killed service again (same database, same ports) and wait until ready.
    pub async fn restart(&mut self, s: Service) {
        self.kill(s);
        self.launch(s);
        self.wait_ready(s).await;
    }

    /// Start a stopped service without waiting for readiness.
    pub fn launch_again(&mut self, s: Service) {
        self.kill(s);
        self.launch(s);
    }

    // ---- replicas ----

    /// Processes per service ([`SystemConfig::replicas`]).
    pub fn replicas(&self) -> usize {
        self.services[&Service::Order].len()
    }

    fn replica(&self, s: Service, i: usize) -> &Running {
        let replicas = &self.services[&s];
        replicas.get(i).unwrap_or_else(|| {
            panic!(
                "{} has {} replica(s), no replica {i}",
                s.binary(),
                replicas.len()
            )
        })
    }

    fn replica_mut(&mut self, s: Service, i: usize) -> &mut Running {
        let replicas = self.services.get_mut(&s).expect("service");
        let n = replicas.len();
        replicas
            .get_mut(i)
            .unwrap_or_else(|| panic!("{} has {n} replica(s), no replica {i}", s.binary()))
    }

    /// `http://127.0.0.1:<port>` of one replica, running or not.
    pub fn replica_url(&self, s: Service, i: usize) -> String {
        self.replica(s, i).url()
    }

    /// Process id of one replica while it runs.
    pub fn replica_pid(&self, s: Service, i: usize) -> Option<u32> {
        self.replica(s, i).child.as_ref().map(|c| c.id())
    }

    /// Whether one replica was started and not since killed or stopped.
    pub fn is_replica_running(&self, s: Service, i: usize) -> bool {
        self.replica(s, i).child.is_some()
    }

    /// SIGKILL one replica; the others keep running.
    pub fn kill_replica(&mut self, s: Service, i: usize) {
        if let Some(mut c) = self.replica_mut(s, i).child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Send a signal to one replica.
    pub fn signal_replica(&self, s: Service, i: usize, signal: &str) {
        if let Some(c) = self.replica(s, i).child.as_ref() {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(c.id().to_string())
                .status();
        }
    }

    /// SIGTERM one replica and wait for it to exit; whether it exited cleanly.
    pub async fn stop_replica(&mut self, s: Service, i: usize) -> bool {
        self.signal_replica(s, i, "TERM");
        let Some(mut child) = self.replica_mut(s, i).child.take() else {
            return true;
        };
        let status = tokio::task::spawn_blocking(move || child.wait()).await;
        matches!(status, Ok(Ok(st)) if st.success())
    }

    /// Start one replica again (same port), killing it first if it runs, without waiting for
    /// readiness ([`System::wait_replica_ready`]).
    pub fn start_replica(&mut self, s: Service, i: usize) {
        self.kill_replica(s, i);
        self.launch_replica(s, i);
    }

    /// Start one replica again (same port), killing it first if it runs, and wait until ready.
    pub async fn restart_replica(&mut self, s: Service, i: usize) {
        self.kill_replica(s, i);
        self.launch_replica(s, i);
        self.wait_replica_ready(s, i).await;
    }

    /// One replica's log so far.
    pub fn replica_log(&self, s: Service, i: usize) -> String {
        std::fs::read_to_string(&self.replica(s, i).log).unwrap_or_default()
    }

    /// Print the last `lines` of every process's log to stderr (for a failing test).
    pub fn print_log_tails(&self, lines: usize) {
        for s in Service::ALL {
            for i in 0..self.replicas() {
                let log = self.replica_log(s, i);
                let tail: Vec<&str> = log.lines().rev().take(lines).collect();
                match self.replicas() {
                    1 => eprintln!("---- last lines of {} ----", s.binary()),
                    _ => eprintln!("---- last lines of {} replica {i} ----", s.binary()),
                }
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }

    /// A service's log so far; with several replicas, each one's under a heading.
    pub fn log(&self, s: Service) -> String {
        match self.replicas() {
            1 => self.replica_log(s, 0),
            n => (0..n)
                .map(|i| format!("==== replica {i} ====\n{}", self.replica_log(s, i)))
                .collect(),
        }
    }

    // ---- HTTP helpers ----

    /// `PUT /products/{sku}`.
    pub async fn set_stock(&self, sku: &str, available: i64) {
        let before = self.seeding_available_before(sku).await;
        let r = self
            .http
            .put(format!("{}/products/{sku}", self.url(Service::Inventory)))
            .json(&json!({ "available": available }))
            .send()
            .await
            .expect("set stock");
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
        self.record_stock_seeded(sku, available - before);
    }

    /// `GET /products/{sku}` as JSON.
    pub async fn product(&self, sku: &str) -> Value {
        self.get_json(Service::Inventory, &format!("/products/{sku}"))
            .await
    }

    /// `PUT /accounts/{customer}`.
    pub async fn set_balance(&self, customer: &str, balance_minor: i64) {
        let before = self.seeding_balance_before(customer).await;
        let r = self
            .http
            .put(format!(
                "{}/accounts/{customer}",
                self.url(Service::Payment)
            ))
            .json(&json!({ "balance_minor": balance_minor, "currency": "EUR" }))
            .send()
            .await
            .expect("set balance");
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
        self.record_deposit(customer, balance_minor - before);
    }

    /// A customer's balance.
    pub async fn balance(&self, customer: &str) -> i64 {
        self.get_json(Service::Payment, &format!("/accounts/{customer}"))
            .await["balance_minor"]
            .as_i64()
            .expect("balance")
    }

    /// `PUT /admin/gateway`.
    pub async fn set_gateway(&self, mode: &str) {
        let r = self
            .http
            .put(format!("{}/admin/gateway", self.url(Service::Payment)))
            .json(&json!({ "mode": mode }))
            .send()
            .await
            .expect("gateway");
        assert_eq!(r.status(), 200);
    }

    /// `POST /orders` with one line per `(sku, quantity, unit price)`; returns the order id.
    pub async fn place_order(&self, customer: &str, lines: &[(&str, i64, i64)]) -> String {
        let items: Vec<Value> = lines
            .iter()
            .map(|(sku, q, p)| json!({ "sku": sku, "quantity": q, "unit_price_minor": p }))
            .collect();
        let r = self
            .http
            .post(format!("{}/orders", self.url(Service::Order)))
            .json(&json!({ "customer_id": customer, "currency": "EUR", "items": items }))
            .send()
            .await
            .expect("place order");
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
        let body: Value = r.json().await.expect("order json");
        let id = body["id"].as_str().expect("order id").to_owned();
        self.record_accepted(&id);
        id
    }

    /// `GET /orders/{id}`.
    pub async fn order(&self, id: &str) -> Value {
        self.get_json(Service::Order, &format!("/orders/{id}"))
            .await
    }

    /// `POST /orders/{id}/cancel`: status code and body.
    pub async fn cancel(&self, id: &str) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/orders/{id}/cancel", self.url(Service::Order)))
            .send()
            .await
            .expect("cancel");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Wait until the order is CONFIRMED or CANCELLED; returns it.
    pub async fn wait_terminal(&self, id: &str) -> Value {
        self.wait_status(id, &["CONFIRMED", "CANCELLED"]).await
    }

    /// Wait until the order has one of `statuses`; returns it.
    pub async fn wait_status(&self, id: &str, statuses: &[&str]) -> Value {
        let what = format!("order {id} to reach {statuses:?}");
        eventually(WAIT, &what, || async {
            let o = self
                .try_get_json(Service::Order, &format!("/orders/{id}"))
                .await?;
            statuses.contains(&o["status"].as_str()?).then_some(o)
        })
        .await
    }

    /// `GET /payments?order_id=`.
    pub async fn payments(&self, order_id: &str) -> Vec<Value> {
        // Every page (`{"items": [...], "next": cursor or null}`).
        let first = format!("/payments?order_id={order_id}&limit=1000");
        let (mut items, mut path) = (Vec::new(), first.clone());
        loop {
            let page = self.get_json(Service::Payment, &path).await;
            let Some(page_items) = page["items"].as_array() else {
                panic!("GET {path}: no items in {page}");
            };
            items.extend(page_items.iter().cloned());
            match page["next"].as_str() {
                Some(next) => path = format!("{first}&after={next}"),
                None => return items,
            }
        }
    }

    /// `GET /reservations?order_id=`.
    pub async fn reservations(&self, order_id: &str) -> Vec<Value> {
        // Every page (`{"items": [...], "next": cursor or null}`).
        let first = format!("/reservations?order_id={order_id}&limit=1000");
        let (mut items, mut path) = (Vec::new(), first.clone());
        loop {
            let page = self.get_json(Service::Inventory, &path).await;
            let Some(page_items) = page["items"].as_array() else {
                panic!("GET {path}: no items in {page}");
            };
            items.extend(page_items.iter().cloned());
            match page["next"].as_str() {
                Some(next) => path = format!("{first}&after={next}"),
                None => return items,
            }
        }
    }

    /// `GET` a path and parse JSON, panicking on failure.
    pub async fn get_json(&self, s: Service, path: &str) -> Value {
        self.try_get_json(s, path)
            .await
            .unwrap_or_else(|| panic!("GET {path} on {} failed", s.binary()))
    }

    /// `GET` a path and parse JSON if it answered 2xx.
    pub async fn try_get_json(&self, s: Service, path: &str) -> Option<Value> {
        let r = self
            .http
            .get(format!("{}{path}", self.url(s)))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    // ---- NATS helpers ----

    /// Every message of a stream, in order: (sequence, subject, Nats-Msg-Id, body). Panics if the
    /// stream cannot be read in full: a check that reads nothing must not pass.
    pub async fn stream_messages(
        &self,
        stream: &str,
    ) -> Vec<(u64, String, Option<String>, Vec<u8>)> {
        use async_nats::jetstream::stream::RawMessageErrorKind;
        let js = async_nats::jetstream::new(self.client.clone());
        let handle = js
            .get_stream(stream)
            .await
            .unwrap_or_else(|e| panic!("stream {stream}: {e}"));
        let state = handle
            .get_info()
            .await
            .unwrap_or_else(|e| panic!("stream {stream} info: {e}"))
            .state;
        let mut out = Vec::new();
        for seq in state.first_sequence.max(1)..=state.last_sequence {
            let mut attempt = 0;
            let m = loop {
                attempt += 1;
                match handle.get_raw_message(seq).await {
                    Ok(m) => break Some(m),
                    // A deleted sequence; the count below proves only deleted ones were skipped.
                    Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => break None,
                    Err(e) if attempt < 5 => {
                        tracing::warn!(%stream, seq, error = %e, "reading a stream message; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => panic!("stream {stream} #{seq}: {e}"),
                }
            };
            if let Some(m) = m {
                let id = m
                    .headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .map(|v| v.to_string());
                out.push((seq, m.subject.to_string(), id, m.payload.to_vec()));
            }
        }
        let deleted = state.deleted_count.unwrap_or(0);
        let expected = (state.last_sequence + 1)
            .saturating_sub(state.first_sequence.max(1))
            .saturating_sub(deleted);
        assert_eq!(
            out.len() as u64,
            expected,
            "stream {stream}: read {} messages, but it holds sequences {}..={} with {deleted} deleted",
            out.len(),
            state.first_sequence,
            state.last_sequence
        );
        out
    }

    /// Every structured event of the three event streams with this correlation id, in time order.
    pub async fn saga_events(&self, correlation: &str) -> Vec<Envelope> {
        let mut events = Vec::new();
        for stream in ["ORDERS", "INVENTORY", "PAYMENTS"] {
            for (_, _, _, body) in self.stream_messages(stream).await {
                if let Ok(e) = serde_json::from_slice::<Envelope>(&body) {
                    if e.correlationid.as_deref() == Some(correlation) {
                        events.push(e);
                    }
                }
            }
        }
        events.sort_by(|a, b| a.time.cmp(&b.time).then(a.id.cmp(&b.id)));
        events
    }

    /// Publish like `nats pub`: a core message, optional headers, no reply subject.
    pub async fn nats_pub(&self, subject: &str, headers: &[(&str, &str)], body: &[u8]) {
        let subject = subject.to_owned();
        let payload = bytes::Bytes::copy_from_slice(body);
        if headers.is_empty() {
            self.client
                .publish(subject, payload)
                .await
                .expect("publish");
        } else {
            let mut h = async_nats::HeaderMap::new();
            for (k, v) in headers {
                h.insert(*k, *v);
            }
            self.client
                .publish_with_headers(subject, h, payload)
                .await
                .expect("publish");
        }
        self.client.flush().await.expect("flush");
    }

    /// Pause a durable consumer until `resume_consumer` (an operator's `nats consumer pause`;
    /// needs nats-server ≥ 2.11).
    pub async fn pause_consumer(&self, stream: &str, consumer: &str) {
        let until = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
        self.consumer_pause_request(stream, consumer, json!({ "pause_until": until }))
            .await;
    }

    /// Resume a paused consumer.
    pub async fn resume_consumer(&self, stream: &str, consumer: &str) {
        self.consumer_pause_request(stream, consumer, json!({}))
            .await;
    }

    async fn consumer_pause_request(&self, stream: &str, consumer: &str, body: Value) {
        let reply = self
            .client
            .request(
                format!("$JS.API.CONSUMER.PAUSE.{stream}.{consumer}"),
                serde_json::to_vec(&body).expect("json").into(),
            )
            .await
            .expect("pause request");
        let answer: Value = serde_json::from_slice(&reply.payload).expect("pause reply");
        assert!(answer.get("error").is_none(), "pause failed: {answer}");
    }

    /// Dead letters of a service.
    pub async fn dead_letters(&self, s: Service) -> Vec<Value> {
        // Every page, newest first (`{"items": [...], "next": cursor or null}`).
        let first = "/admin/dead-letters?limit=1000";
        let (mut items, mut path) = (Vec::new(), first.to_owned());
        loop {
            let page = self.get_json(s, &path).await;
            let Some(page_items) = page["items"].as_array() else {
                panic!("GET {path}: no items in {page}");
            };
            items.extend(page_items.iter().cloned());
            match page["next"].as_str() {
                Some(next) => path = format!("{first}&after={next}"),
                None => return items,
            }
        }
    }
}

impl Drop for System {
    fn drop(&mut self) {
        for s in Service::ALL {
            self.kill(s);
        }
        if std::thread::panicking() {
            self.print_log_tails(40);
        }
    }
}

/// An order as `GET /orders/{id}` serves it, reduced to what the saga tests compare.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct OrderView {
    /// Order id.
    pub id: String,
    /// Where its saga stands.
    pub status: OrderStatus,
    /// Why it was cancelled.
    pub reason: Option<CancelReason>,
    /// Sum of the lines.
    pub total_minor: i64,
    /// When the saga gives up.
    pub deadline_at: chrono::DateTime<chrono::Utc>,
}

impl OrderView {
    /// CONFIRMED or CANCELLED.
    pub fn is_terminal(&self) -> bool {
        matches!(self.status, OrderStatus::Confirmed | OrderStatus::Cancelled)
    }
}

/// `GET /admin/gateway`: the simulated provider's mode and the circuit breaker in front of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct GatewayView {
    /// ok, decline or outage.
    pub mode: String,
    /// closed, open or half_open.
    pub circuit: String,
}

impl System {
    /// `GET /orders/{id}`, typed.
    pub async fn order_view(&self, id: &str) -> OrderView {
        let v = self.order(id).await;
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("order {v}: {e}"))
    }

    /// Wait until the order is CONFIRMED or CANCELLED; returns it, typed.
    pub async fn wait_terminal_view(&self, id: &str) -> OrderView {
        let v = self.wait_terminal(id).await;
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("order {v}: {e}"))
    }

    /// `GET /admin/gateway`.
    pub async fn gateway(&self) -> GatewayView {
        let v = self.get_json(Service::Payment, "/admin/gateway").await;
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("gateway {v}: {e}"))
    }

    /// Status code of `GET /readyz`; `None` when the service does not answer.
    pub async fn readyz(&self, s: Service) -> Option<u16> {
        let r = self
            .http
            .get(format!("{}/readyz", self.url(s)))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        Some(r.status().as_u16())
    }
}
