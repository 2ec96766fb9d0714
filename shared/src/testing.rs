//! Test harness: real nats-server processes (one, or an N-node cluster) on free loopback ports
//! with temporary JetStream stores, stoppable, killable and restartable on the same ports and
//! stores for fault injection; a throwaway Postgres; and temporary SQLite files.
//!
//! # Configuring it
//!
//! Nothing here depends on the layout of the repository that uses it. What it runs comes from the
//! environment, or from the builders:
//!
//! - **nats-server** (≥ 2.15): [`NatsServerBuilder::binary`] / [`NatsClusterBuilder::binary`],
//!   else `NATS_SERVER_BIN`, else `nats-server` on `PATH`. As a last resort, when this crate is
//!   built inside the toolkit's own repository, the copy its `scripts/install-deps.sh` puts into
//!   `.tools/bin`.
//! - **Postgres**: `TEST_DATABASE_URL`, an admin URL (`postgres://user@host:port/postgres`) of a
//!   server on which each [`TestDb`] creates its own database. Without it the harness starts a
//!   throwaway cluster for the test process with `initdb` and `pg_ctl` from `PG_BIN_DIR`, else
//!   from `PATH`, else from the usual install directories (`/usr/lib/postgresql/<v>/bin`,
//!   `/usr/local/bin`). [`TestDb::on_server`] takes an admin URL directly.
//!
//! Each lookup panics with what to set when it finds nothing.
//!
//! # Servers
//!
//! [`NatsServer::start`] runs a JetStream server with a generated configuration;
//! [`NatsServer::from_config_file`] runs a project's own configuration file unmodified: address,
//! client port, monitoring port and store directory are nats-server's command-line flags
//! (`-a 127.0.0.1 -p <port> -m <port> -sd <dir>`), which take precedence over the file's `listen`
//! and `http_port`. nats-server refuses `-sd` next to a `store_dir` in the file, so such a file
//! must leave the store directory to the command line. [`NatsCluster`] runs N clustered nodes,
//! from a generated configuration plus extra text (accounts, users), or from such a file: node
//! name and routes are flags too (`-n`, `--cluster`, `--routes`, `--cluster_name`).

mod cluster;

pub use cluster::{NatsCluster, NatsClusterBuilder};

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::db::{Backend, Database, DbOptions};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    // Tests of one binary run in parallel and start their servers a moment after asking: never
    // hand out a port twice, or two of them may race for it.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("no free local port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The repository this crate was built in (the parent of its manifest directory). Only the
/// fallback that looks for the toolkit's own installed tools relies on it.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Poll `check` until it returns `Some`, or panic with `what` after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The oldest nats-server the tests run against: they pause consumers (new in 2.11), and the
/// project's `nats.conf` gives people read-only mirrors by durable sourcing across accounts (new
/// in 2.14.5). (The services alone accept [`crate::nats::MIN_SERVER_VERSION`].)
pub const MIN_TEST_SERVER_VERSION: (u64, u64) = (2, 15);

/// How long a nats-server may take to become ready after it is spawned.
const NATS_STARTUP: Duration = Duration::from_secs(30);

/// What `program --version` reports (`nats-server: v2.15.1` → `v2.15.1`), if it runs.
fn reported_version(program: &Path) -> Option<String> {
    let out = Command::new(program).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Some(
        text.trim()
            .trim_start_matches("nats-server:")
            .trim()
            .to_owned(),
    )
}

fn new_enough(version: &str) -> bool {
    crate::nats::server_version_at_least(version, MIN_TEST_SERVER_VERSION)
}

/// The nats-server the harness runs when no builder names one: `NATS_SERVER_BIN` (which must be
/// new enough), else the first of `PATH`'s and the toolkit repository's `.tools/bin` that is ≥
/// [`MIN_TEST_SERVER_VERSION`]. Looked up once per test process; panics with what to set.
pub fn nats_server_binary() -> PathBuf {
    static CHOSEN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CHOSEN.get_or_init(choose_nats_server).clone()
}

fn choose_nats_server() -> PathBuf {
    let (major, minor) = MIN_TEST_SERVER_VERSION;
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        let p = PathBuf::from(p);
        match reported_version(&p) {
            Some(v) if new_enough(&v) => return p,
            found => panic!(
                "NATS_SERVER_BIN={} is {}; set NATS_SERVER_BIN to a nats-server >= {major}.{minor}",
                p.display(),
                found.as_deref().unwrap_or("not runnable")
            ),
        }
    }
    let mut candidates = vec![PathBuf::from("nats-server")];
    // The toolkit's own repository installs one here (scripts/install-deps.sh): one provider
    // among others, used only when that script is present.
    let root = repo_root();
    if root.join("scripts/install-deps.sh").is_file() {
        candidates.push(root.join(".tools/bin/nats-server"));
    }
    let mut seen = Vec::new();
    for candidate in candidates {
        if let Some(v) = reported_version(&candidate) {
            if new_enough(&v) {
                return candidate;
            }
            seen.push(format!("{} is {v}", candidate.display()));
        }
    }
    panic!(
        "no nats-server >= {major}.{minor} found ({}): set NATS_SERVER_BIN to its path, or put one \
         on PATH",
        if seen.is_empty() {
            "none on PATH".to_owned()
        } else {
            seen.join(", ")
        }
    );
}

/// Where a server's configuration comes from.
#[derive(Clone)]
enum ServerConfig {
    /// Written by the harness: `server_name`, a `jetstream` block with these lines, then `extra`.
    Generated { jetstream: String, extra: String },
    /// A file of the caller's, run as is.
    File(PathBuf),
}

/// When a freshly spawned server counts as ready.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Readiness {
    /// An anonymous client gets an answer from the JetStream API.
    JetStreamClient,
    /// The monitoring endpoint `/healthz` answers 200 (with `?js-enabled-only=true`, or the full
    /// check, which in a cluster also waits for the meta leader and caught-up replicas).
    Health { js_enabled_only: bool },
}

/// A nats-server owned by a test. Killed on drop.
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    http_port: u16,
    dir: TempDir,
    config: ServerConfig,
    /// Extra command-line flags (a cluster node's name and routes).
    args: Vec<String>,
    /// Environment of the server process (for `$VAR` references in a configuration).
    env: Vec<(String, String)>,
    readiness: Readiness,
    child: Option<Child>,
}

/// Options for a [`NatsServer`]; [`NatsServer::builder`].
#[derive(Default)]
pub struct NatsServerBuilder {
    binary: Option<PathBuf>,
    jetstream_config: String,
    extra_config: String,
    config_file: Option<PathBuf>,
    env: Vec<(String, String)>,
}

impl NatsServerBuilder {
    /// The nats-server to run, instead of [`nats_server_binary`]'s choice.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Extra top-level configuration (accounts, users...) for the generated configuration.
    pub fn extra_config(mut self, config: &str) -> Self {
        self.extra_config = config.to_owned();
        self
    }

    /// Extra lines inside the generated `jetstream` block (e.g. `sync_interval: always`).
    pub fn jetstream_config(mut self, config: &str) -> Self {
        self.jetstream_config = config.to_owned();
        self
    }

    /// Run this configuration file unmodified instead of a generated one (see the module docs).
    /// Readiness is then the monitoring endpoint's JetStream check, since such a file usually
    /// refuses anonymous clients.
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config_file = Some(path.into());
        self
    }

    /// An environment variable for the server process (for `$VAR` in the configuration).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Start it and wait until it is ready.
    pub async fn start(self) -> NatsServer {
        let (config, readiness) = match self.config_file {
            Some(path) => (
                ServerConfig::File(path),
                Readiness::Health {
                    js_enabled_only: true,
                },
            ),
            None => (
                ServerConfig::Generated {
                    jetstream: self.jetstream_config,
                    extra: self.extra_config,
                },
                Readiness::JetStreamClient,
            ),
        };
        let mut server = NatsServer::new(
            self.binary.unwrap_or_else(nats_server_binary),
            config,
            self.env,
            readiness,
        );
        server.launch().await;
        server
    }
}

impl NatsServer {
    /// Options: binary, configuration, environment.
    pub fn builder() -> NatsServerBuilder {
        NatsServerBuilder::default()
    }

    /// Start a server with JetStream on a free port.
    pub async fn start() -> Self {
        Self::builder().start().await
    }

    /// Start a server with extra configuration appended (accounts, users...).
    pub async fn start_with_config(extra_config: &str) -> Self {
        Self::builder().extra_config(extra_config).start().await
    }

    /// Start with extra top-level configuration and extra lines inside the `jetstream` block
    /// (e.g. `sync_interval: always`).
    pub async fn start_with(extra_config: &str, jetstream_config: &str) -> Self {
        Self::builder()
            .extra_config(extra_config)
            .jetstream_config(jetstream_config)
            .start()
            .await
    }

    /// Run the configuration file at `path` unmodified on free ports and a temporary store, with
    /// `env` for its `$VAR` references (passwords).
    pub async fn from_config_file(path: impl Into<PathBuf>, env: Vec<(String, String)>) -> Self {
        let mut builder = Self::builder().config_file(path);
        builder.env = env;
        builder.start().await
    }

    fn new(
        binary: PathBuf,
        config: ServerConfig,
        env: Vec<(String, String)>,
        readiness: Readiness,
    ) -> Self {
        Self {
            binary,
            port: free_port(),
            http_port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            config,
            args: Vec::new(),
            env,
            readiness,
            child: None,
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The monitoring (HTTP) port.
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// The JetStream store directory (kept across restarts).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }

    /// Whether the process runs (it was started and has not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn spawn(&mut self) {
        let conf = match &self.config {
            ServerConfig::File(path) => path.clone(),
            ServerConfig::Generated { jetstream, extra } => {
                let conf = self.dir.path().join("nats.conf");
                let text = format!(
                    "server_name: test-{port}\njetstream {{\n  {jetstream}\n}}\n{extra}\n",
                    port = self.port
                );
                std::fs::write(&conf, text).expect("write nats.conf");
                conf
            }
        };
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let child = Command::new(&self.binary)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("-c")
            .arg(&conf)
            // The flags take precedence over the file's `listen` and `http_port`; the store is
            // the flag's alone (see the module docs).
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.http_port.to_string()])
            .arg("-sd")
            .arg(self.store_dir())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "spawn {}: {e} (set NATS_SERVER_BIN to a nats-server)",
                    self.binary.display()
                )
            });
        self.child = Some(child);
    }

    async fn ready(&self) -> bool {
        match self.readiness {
            Readiness::JetStreamClient => {
                let Ok(client) = async_nats::connect(self.url()).await else {
                    return false;
                };
                async_nats::jetstream::new(client)
                    .query_account()
                    .await
                    .is_ok()
            }
            Readiness::Health { js_enabled_only } => {
                let path = if js_enabled_only {
                    "/healthz?js-enabled-only=true"
                } else {
                    "/healthz"
                };
                self.monitor(path).await.is_some()
            }
        }
    }

    /// Wait until the spawned process is ready; panics with its log if it exits or takes longer
    /// than `deadline`.
    async fn wait_ready_within(&mut self, deadline: Duration) {
        let start = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "nats-server exited ({status}) before it was ready; log:\n{}",
                    self.log()
                );
            }
            if self.ready().await {
                return;
            }
            if start.elapsed() > deadline {
                panic!(
                    "nats-server not ready after {deadline:?}; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn launch(&mut self) {
        self.spawn();
        self.wait_ready_within(NATS_STARTUP).await;
    }

    /// GET `path` (e.g. `/jsz?streams=true`) from the monitoring port: the body if the answer is
    /// 200, else `None`.
    pub async fn monitor(&self, path: &str) -> Option<String> {
        let fetch = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.http_port))
                .await
                .ok()?;
            let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await.ok()?;
            let response = String::from_utf8_lossy(&response);
            let (head, body) = response.split_once("\r\n\r\n")?;
            let status = head.split_whitespace().nth(1)?;
            (status == "200").then(|| body.to_owned())
        };
        tokio::time::timeout(Duration::from_secs(5), fetch)
            .await
            .ok()
            .flatten()
    }

    /// Kill the server abruptly (SIGKILL), keeping its store.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stop gracefully (SIGTERM, then SIGKILL after 5 s), keeping its store.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same port and store.
    pub async fn restart(&mut self) {
        self.stop();
        self.launch().await;
    }

    /// Start again after [`NatsServer::stop`] or [`NatsServer::kill`].
    pub async fn start_again(&mut self) {
        if self.child.is_none() {
            self.launch().await;
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// The server's log so far (of every run), for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A throwaway Postgres cluster owned by a test process. Stopped on drop.
pub struct PgCluster {
    dir: TempDir,
    port: u16,
    bin: PathBuf,
    as_postgres_user: bool,
}

/// Where `initdb` and `pg_ctl` are: `PG_BIN_DIR`, else `PATH`, else the usual install directories.
fn pg_bin_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PG_BIN_DIR") {
        let p = PathBuf::from(p);
        if p.join("initdb").is_file() {
            return p;
        }
        panic!(
            "PG_BIN_DIR={} has no initdb; set PG_BIN_DIR to the directory of initdb and pg_ctl, \
             or TEST_DATABASE_URL to a running Postgres",
            p.display()
        );
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    // Newest major first.
    versioned.sort_by_key(|p| {
        std::cmp::Reverse(
            p.parent()
                .and_then(|v| v.file_name())
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0),
        )
    });
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/local/bin")])
        .chain(versioned)
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
        .unwrap_or_else(|| {
            panic!(
                "no Postgres for the tests: set TEST_DATABASE_URL to an admin URL of a running \
                 Postgres (postgres://user@host:port/postgres), or PG_BIN_DIR to the directory of \
                 initdb and pg_ctl so that the harness starts a throwaway one"
            )
        })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgCluster {
    /// `initdb` a cluster in a temp dir and start it on a free port (as the `postgres` user when
    /// running as root, since Postgres refuses to run as root).
    pub fn start() -> Self {
        let bin = pg_bin_dir();
        let dir = tempfile::tempdir().expect("temp dir");
        let as_postgres_user = is_root();
        let cluster = Self {
            port: free_port(),
            dir,
            bin,
            as_postgres_user,
        };
        if as_postgres_user {
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(cluster.dir.path())
                .status();
        }
        let data = cluster.dir.path().join("data");
        cluster.run(
            "initdb",
            &[
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
                &data.display().to_string(),
            ],
        );
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            cluster.port,
            cluster.dir.path().display()
        );
        cluster.run(
            "pg_ctl",
            &[
                "-D",
                &data.display().to_string(),
                "-o",
                &opts,
                "-l",
                &cluster.dir.path().join("pg.log").display().to_string(),
                "-w",
                "start",
            ],
        );
        cluster
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let program = self.bin.join(tool);
        let status = if self.as_postgres_user {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&program)
                .args(args)
                .stdout(Stdio::null())
                .status()
        } else {
            Command::new(&program)
                .args(args)
                .stdout(Stdio::null())
                .status()
        };
        match status {
            Ok(s) if s.success() => {}
            other => panic!("{tool} failed: {other:?}"),
        }
    }

    /// Admin URL (database `postgres`).
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data").display().to_string();
        let program = self.bin.join("pg_ctl");
        let args = ["-D", data.as_str(), "-m", "immediate", "stop"];
        let _ = if self.as_postgres_user {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&program)
                .args(args)
                .stdout(Stdio::null())
                .status()
        } else {
            Command::new(&program)
                .args(args)
                .stdout(Stdio::null())
                .status()
        };
    }
}

/// A fresh, empty database for one test, on either backend.
pub struct TestDb {
    /// The URL services and pools should use.
    pub url: String,
    _sqlite_dir: Option<TempDir>,
    _cluster: Option<std::sync::Arc<PgCluster>>,
}

/// Where test databases for Postgres come from: `TEST_DATABASE_URL` (an admin URL) when set, else a
/// cluster started for this process.
static CLUSTER: std::sync::Mutex<Option<std::sync::Weak<PgCluster>>> = std::sync::Mutex::new(None);

fn shared_cluster() -> std::sync::Arc<PgCluster> {
    let mut guard = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = guard.as_ref().and_then(|w| w.upgrade()) {
        return c;
    }
    let c = std::sync::Arc::new(PgCluster::start());
    *guard = Some(std::sync::Arc::downgrade(&c));
    c
}

impl TestDb {
    /// A new empty database on `backend`.
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("test.db").display());
                Self {
                    url,
                    _sqlite_dir: Some(dir),
                    _cluster: None,
                }
            }
            Backend::Postgres => match std::env::var("TEST_DATABASE_URL") {
                Ok(admin) => Self::on_server(&admin).await,
                Err(_) => {
                    let cluster = shared_cluster();
                    let mut db = Self::on_server(&cluster.admin_url()).await;
                    db._cluster = Some(cluster);
                    db
                }
            },
        }
    }

    /// A new empty Postgres database on the server of `admin_url` (a URL whose user may create
    /// databases, e.g. `postgres://postgres@127.0.0.1:5432/postgres`).
    pub async fn on_server(admin_url: &str) -> Self {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        crate::db::install_drivers();
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(admin_url)
            .await
            .unwrap_or_else(|e| {
                panic!("connect to the test Postgres ({e}); check TEST_DATABASE_URL")
            });
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b)
            .unwrap_or(admin_url);
        Self {
            url: format!("{base}/{name}"),
            _sqlite_dir: None,
            _cluster: None,
        }
    }

    /// Open it with the toolkit's tables migrated.
    pub async fn connect(&self) -> Database {
        Database::connect(&self.url, DbOptions::default())
            .await
            .expect("open test database")
    }
}

/// Both backends, for tests that must behave the same on each.
pub const BACKENDS: [Backend; 2] = [Backend::Sqlite, Backend::Postgres];

/// Run each named `async fn(Backend)` as two tests, `sqlite::<name>` and `postgres::<name>`:
/// `on_both_backends!(applies_once, survives_a_restart);` next to
/// `async fn applies_once(b: Backend) { … }`. Needs tokio's test macro in the calling crate.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::Backend::Postgres).await })*
        }
    };
}

/// Like [`on_both_backends!`], with a list per backend, for suites where some scenarios run on one
/// backend only: `on_backends! { sqlite: [a, b], postgres: [a] }`.
#[macro_export]
macro_rules! on_backends {
    ($($backend:ident: [$($name:ident),* $(,)?]),* $(,)?) => {
        $(mod $backend {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name($crate::on_backends!(@b $backend)).await
            })*
        })*
    };
    (@b sqlite) => { $crate::Backend::Sqlite };
    (@b postgres) => { $crate::Backend::Postgres };
}
