//! Test harness: a real nats-server on a free port with a temporary JetStream store (stoppable and
//! restartable on the same port and store, for fault injection), a throwaway Postgres, and a
//! temporary SQLite file.
//!
//! nats-server (≥ 2.11) is `NATS_SERVER_BIN`, else the project's `.tools/bin` where
//! `scripts/install-deps.sh` puts it, else `PATH`'s; Postgres binaries come from `PG_BIN_DIR` or the
//! usual install directories.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::db::{Backend, Database, DbOptions};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free local port")
}

/// The repository root (where `.tools/` lives), found from this crate's manifest dir.
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

/// `NATS_SERVER_BIN` (which must be new enough), else the pinned one in `.tools/bin`, else PATH's,
/// whichever is ≥ [`MIN_TEST_SERVER_VERSION`]. Looked up once per test process.
fn nats_server_binary() -> PathBuf {
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
                "NATS_SERVER_BIN={} is {}; the tests need nats-server >= {major}.{minor} \
                 (scripts/install-deps.sh installs one into .tools/bin)",
                p.display(),
                found.as_deref().unwrap_or("not runnable")
            ),
        }
    }
    let mut seen = Vec::new();
    for candidate in [
        repo_root().join(".tools/bin/nats-server"),
        PathBuf::from("nats-server"),
    ] {
        if let Some(v) = reported_version(&candidate) {
            if new_enough(&v) {
                return candidate;
            }
            seen.push(format!("{} is {v}", candidate.display()));
        }
    }
    panic!(
        "no nats-server >= {major}.{minor} found ({}): run scripts/install-deps.sh (installs one \
         into .tools/bin) or set NATS_SERVER_BIN",
        if seen.is_empty() {
            "none at all".to_owned()
        } else {
            seen.join(", ")
        }
    );
}

/// A nats-server owned by a test. Killed on drop.
pub struct NatsServer {
    port: u16,
    dir: TempDir,
    extra_config: String,
    jetstream_config: String,
    /// A whole configuration with `{PORT}` and `{STORE}` placeholders, instead of the default one.
    template: Option<String>,
    /// Environment of the server process (for `$VAR` references in a configuration).
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl NatsServer {
    /// Start a server with JetStream on a free port.
    pub async fn start() -> Self {
        Self::start_with_config("").await
    }

    /// Start a server with extra configuration appended (accounts, users...).
    pub async fn start_with_config(extra_config: &str) -> Self {
        Self::start_with(extra_config, "").await
    }

    /// Start with extra top-level configuration and extra lines inside the `jetstream` block
    /// (e.g. `sync_interval: always`).
    pub async fn start_with(extra_config: &str, jetstream_config: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = Self {
            port: free_port(),
            dir,
            extra_config: extra_config.to_owned(),
            jetstream_config: jetstream_config.to_owned(),
            template: None,
            env: Vec::new(),
            child: None,
        };
        server.launch().await;
        server
    }

    /// Start from a whole configuration (e.g. the project's `nats.conf`, adapted) in which `{PORT}`
    /// and `{STORE}` stand for the port and the JetStream store directory, with `env` for its
    /// `$VAR` references.
    pub async fn start_from_template(template: &str, env: Vec<(String, String)>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = Self {
            port: free_port(),
            dir,
            extra_config: String::new(),
            jetstream_config: String::new(),
            template: Some(template.to_owned()),
            env,
            child: None,
        };
        server.launch().await;
        server
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (kept across restarts).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }

    async fn launch(&mut self) {
        let conf = self.dir.path().join("nats.conf");
        let config = match &self.template {
            Some(t) => t
                .replace("{PORT}", &self.port.to_string())
                .replace("{STORE}", &self.store_dir().display().to_string()),
            None => format!(
                "listen: 127.0.0.1:{port}\nserver_name: test-{port}\njetstream {{\n  store_dir: {store:?}\n  {js}\n}}\n{extra}\n",
                port = self.port,
                store = self.store_dir().display().to_string(),
                js = self.jetstream_config,
                extra = self.extra_config
            ),
        };
        std::fs::write(&conf, config).expect("write nats.conf");
        let log = std::fs::File::create(self.dir.path().join("nats.log")).expect("log file");
        let child = Command::new(nats_server_binary())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        if self.template.is_some() {
            // A project configuration refuses anonymous clients: wait for the port instead.
            let addr = format!("127.0.0.1:{}", self.port);
            eventually(Duration::from_secs(15), "nats-server to listen", || {
                let addr = addr.clone();
                async move { tokio::net::TcpStream::connect(&addr).await.ok().map(|_| ()) }
            })
            .await;
            return;
        }
        let url = self.url();
        eventually(
            Duration::from_secs(15),
            "nats-server to accept JetStream requests",
            || {
                let url = url.clone();
                async move {
                    let client = async_nats::connect(&url).await.ok()?;
                    let js = async_nats::jetstream::new(client);
                    js.query_account().await.ok().map(|_| ())
                }
            },
        )
        .await;
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

    /// The server's log so far, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
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

fn pg_bin_dir() -> PathBuf {
    if let Ok(p) = std::env::var("PG_BIN_DIR") {
        return PathBuf::from(p);
    }
    for candidate in [
        "/usr/local/bin",
        "/usr/lib/postgresql/17/bin",
        "/usr/lib/postgresql/16/bin",
        "/usr/lib/postgresql/15/bin",
    ] {
        if Path::new(candidate).join("initdb").exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!("no Postgres server binaries (initdb) found: run scripts/install-deps.sh or set PG_BIN_DIR or TEST_DATABASE_URL");
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
            Backend::Postgres => {
                let (admin, cluster) = match std::env::var("TEST_DATABASE_URL") {
                    Ok(url) => (url, None),
                    Err(_) => {
                        let c = shared_cluster();
                        (c.admin_url(), Some(c))
                    }
                };
                let name = format!("t_{}", uuid::Uuid::new_v4().simple());
                sqlx::any::install_default_drivers();
                let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin)
                    .await
                    .expect("connect to test Postgres");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .expect("create test database");
                let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
                Self {
                    url: format!("{base}/{name}"),
                    _sqlite_dir: None,
                    _cluster: cluster,
                }
            }
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
