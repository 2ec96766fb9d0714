//! The running shell every event-driven service shares: configuration from the environment,
//! connections, its own streams, the outbox relay, consumers, background workers, readiness and
//! an orderly shutdown.

use std::future::Future;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::Migrator;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::auth::AdminAuth;
use crate::config::{duration, positive, redact_url, Secret};
use crate::consumer::{ConsumerRunner, ConsumerSpec, Handler};
use crate::db::{Database, DbError, DbOptions};
use crate::edge::EdgeLimits;
use crate::nats::{
    connect, ensure_stream, NatsError, NatsSettings, StreamSpec, DEFAULT_STREAM_MAX_BYTES,
};
use crate::outbox::{OutboxRelay, OutboxWaker, RelayConfig, RelayHealth};
use crate::redrive::Redrive;
use crate::retention::{PruneRule, RetentionConfig};
use crate::subscription::Subscription;

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is malformed.
    #[error("invalid setting {name}: {reason}")]
    Config {
        /// The variable.
        name: String,
        /// Why.
        reason: String,
    },
    /// Database trouble.
    #[error(transparent)]
    Db(#[from] DbError),
    /// NATS trouble.
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    /// The HTTP listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Settings every service reads, flattened into each service's own settings (see
/// [`crate::config::parse`], which also gives `DATABASE_URL` and `HTTP_ADDR` their defaults).
#[derive(Clone, clap::Args)]
pub struct ServiceConfig {
    /// Service name: NATS client name, event `source`, default SQLite file name.
    #[arg(skip)]
    pub name: String,
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsSettings,
    /// Database: sqlite://<file> or postgres://…
    #[arg(long = "database-url", env = "DATABASE_URL")]
    pub database_url: String,
    /// HTTP listen address.
    #[arg(long = "http-addr", env = "HTTP_ADDR")]
    pub http_addr: String,
    /// Database tuning.
    #[command(flatten)]
    pub db: DbOptions,
    /// Bearer token of the admin and seeding routes; unset, they answer 403.
    #[arg(long = "admin-token", env = "ADMIN_TOKEN")]
    pub admin_token: Option<Secret>,
    /// Bytes each stream the service provisions may hold.
    #[arg(
        long = "stream-max-bytes",
        env = "STREAM_MAX_BYTES",
        default_value_t = DEFAULT_STREAM_MAX_BYTES,
        value_parser = positive::<i64>
    )]
    pub stream_max_bytes: i64,
    /// Replicas of each stream the service provisions: 1 on one nats-server, 3 on a three-node
    /// cluster (at most the cluster's size; the server refuses more).
    #[arg(
        long = "stream-replicas",
        env = "STREAM_REPLICAS",
        default_value_t = 1,
        value_parser = positive::<usize>
    )]
    pub stream_replicas: usize,
    /// How long each stream the service provisions keeps a message. Inbox rows must outlive it
    /// (see INBOX_RETENTION), so a shorter age is what lets the inbox be pruned sooner. Lowering
    /// it on a running system drops the stream's older messages.
    #[arg(
        long = "stream-max-age",
        env = "STREAM_MAX_AGE",
        default_value = "7d",
        value_parser = duration
    )]
    pub stream_max_age: Duration,
    /// Limits of the HTTP edge.
    #[command(flatten, next_help_heading = "HTTP edge")]
    pub edge: EdgeLimits,
    /// How long bookkeeping rows are kept.
    #[command(flatten, next_help_heading = "Retention")]
    pub retention: RetentionConfig,
}

impl std::fmt::Debug for ServiceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceConfig")
            .field("name", &self.name)
            .field("nats", &self.nats)
            .field("database_url", &redact_url(&self.database_url))
            .field("http_addr", &self.http_addr)
            .field("db", &self.db)
            .field("admin_token", &self.admin_token)
            .field("stream_max_bytes", &self.stream_max_bytes)
            .field("stream_replicas", &self.stream_replicas)
            .field("stream_max_age", &self.stream_max_age)
            .field("edge", &self.edge)
            .field("retention", &self.retention)
            .finish()
    }
}

impl ServiceConfig {
    /// Name the service (its NATS client too) and check what no single value can: that inbox
    /// rows outlive every possible redelivery.
    pub fn named(&mut self, name: &str) -> Result<(), StartError> {
        self.name = name.to_owned();
        self.nats.name = name.to_owned();
        let horizon = ConsumerSpec::new("", "", &[]).redelivery_horizon();
        self.retention.check_dedup(self.stream_max_age, horizon)
    }

    /// The guard of the admin routes.
    pub fn admin(&self) -> AdminAuth {
        AdminAuth::new(self.admin_token.clone().map(Secret::into_inner))
    }
}

/// Connections and background tasks of one running service.
pub struct Runtime {
    /// Service name (event `source` is `/<name>`).
    pub name: String,
    /// The database.
    pub db: Database,
    /// The NATS client.
    pub client: async_nats::Client,
    /// Wakes the outbox relay after a commit.
    pub waker: OutboxWaker,
    /// Cancelled when the service should stop taking new work.
    pub shutdown: CancellationToken,
    /// Guard of the admin and seeding routes.
    pub admin: AdminAuth,
    /// Limits of the HTTP edge.
    pub edge: EdgeLimits,
    /// Handlers of this service's durables, for dead-letter redrive.
    pub redrive: Redrive,
    relay_health: RelayHealth,
    relay_stop: CancellationToken,
    relay_task: Option<futures::future::BoxFuture<'static, ()>>,
    tasks: JoinSet<()>,
    /// One flag per durable, with its name: attached to the server right now.
    attached: Vec<(String, Arc<AtomicBool>)>,
}

/// Start the outbox relay; the future ends when it has stopped.
///
/// On SQLite it runs on a thread of its own, with a runtime and a NATS connection of its own: under
/// load the services' tokio workers are busy applying batches, and a relay task (with the
/// client's task that delivers its acks) waits its turn behind them, which is most of the relay's
/// commit → ack tail. A thread that mostly sleeps is run at once by the kernel when woken. On
/// Postgres it stays a task: the pool's connections belong to the runtime that opened them, and
/// a second runtime would own some of them.
fn spawn_relay(
    relay: OutboxRelay,
    db: &Database,
    nats: &NatsSettings,
    stop: CancellationToken,
) -> Result<futures::future::BoxFuture<'static, ()>, StartError> {
    use futures::FutureExt;
    if db.backend() != crate::Backend::Sqlite {
        let task = tokio::spawn(relay.run(stop));
        return Ok(async move {
            let _ = task.await;
        }
        .boxed());
    }
    db.start_writer();
    let mut settings = nats.clone();
    settings.name = format!("{}-relay", settings.name);
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Thread)?;
    std::thread::Builder::new()
        .name("outbox-relay".into())
        .spawn(move || {
            runtime.block_on(async move {
                // Without a connection of its own it still works, through the shared one.
                let relay = match connect(&settings).await {
                    Ok(client) => relay.with_client(client),
                    Err(e) => {
                        tracing::warn!(error = %e, "relay: no NATS connection of its own; sharing the service's");
                        relay
                    }
                };
                relay.run(stop).await;
            });
            let _ = done.send(());
        })
        .map_err(StartError::Thread)?;
    Ok(async move {
        let _ = finished.await;
    }
    .boxed())
}

impl Runtime {
    /// Connect to the database (running the service's migrations) and to NATS, provision the
    /// service's own streams and start its outbox relay.
    pub async fn start(
        config: &ServiceConfig,
        migrations: Migrator,
        streams: &[StreamSpec],
    ) -> Result<Self, StartError> {
        let db = Database::connect(&config.database_url, config.db.clone()).await?;
        db.migrate(migrations).await?;
        let client = connect(&config.nats).await?;
        let js = async_nats::jetstream::new(client.clone());
        let mut owned = Vec::with_capacity(streams.len());
        for spec in streams {
            let mut spec = spec.clone();
            spec.max_bytes = config.stream_max_bytes;
            spec.num_replicas = config.stream_replicas;
            spec.max_age = config.stream_max_age;
            // The server refuses a stream whose message limit exceeds its byte limit.
            spec.max_msg_size = spec
                .max_msg_size
                .min(spec.max_bytes.min(i32::MAX as i64) as i32);
            ensure_stream(&js, &spec).await?;
            owned.push(spec);
        }
        let relay = OutboxRelay::new(db.clone(), client.clone(), RelayConfig::default());
        let waker = relay.waker();
        let relay_health = relay.health();
        let relay_stop = CancellationToken::new();
        let relay_task = spawn_relay(relay, &db, &config.nats, relay_stop.clone())?;
        crate::observe::install();
        let admin = config.admin();
        if !admin.is_configured() {
            tracing::warn!("ADMIN_TOKEN is not set: admin and seeding routes answer 403");
        }
        let mut tasks = JoinSet::new();
        let shutdown = CancellationToken::new();
        let redrive = Redrive::new(db.clone());
        tasks.spawn(watch_streams(js.clone(), owned, shutdown.clone()));
        tasks.spawn(crate::retention::run(
            db.clone(),
            crate::retention::toolkit_rules(&config.retention),
            config.retention.sweep_every,
            shutdown.clone(),
        ));
        tasks.spawn(crate::observe::sample_database(
            db.clone(),
            shutdown.clone(),
        ));
        Ok(Self {
            name: config.name.clone(),
            db,
            client,
            waker,
            shutdown,
            admin,
            edge: config.edge.clone(),
            redrive,
            relay_health,
            relay_stop,
            relay_task: Some(relay_task),
            tasks,
            attached: Vec::new(),
        })
    }

    /// The CloudEvents `source` of this service's events.
    pub fn source(&self) -> String {
        format!("/{}", self.name)
    }

    /// Run `subscription` (its handlers emitting as this service) until shutdown.
    pub fn subscribe(&mut self, subscription: Subscription) {
        let subscription = subscription.with_source(&self.source());
        let spec = subscription.spec().clone();
        let worker = subscription.woken_worker();
        self.spawn_consumer_waking(spec, subscription, worker);
    }

    /// Provision (retrying until its stream exists) and run a consumer until shutdown.
    pub fn spawn_consumer<H: Handler>(&mut self, spec: ConsumerSpec, handler: H) {
        self.spawn_consumer_waking(spec, handler, None);
    }

    /// Like [`Runtime::spawn_consumer`], also waking `worker` after each commit.
    pub fn spawn_consumer_waking<H: Handler>(
        &mut self,
        spec: ConsumerSpec,
        handler: H,
        worker: Option<OutboxWaker>,
    ) {
        let attached = Arc::new(AtomicBool::new(false));
        self.attached.push((spec.durable.clone(), attached.clone()));
        let spec_durable = spec.durable.clone();
        let mut runner = ConsumerRunner::new(
            spec,
            self.db.clone(),
            self.client.clone(),
            handler,
            self.waker.clone(),
        );
        let mut wakers = vec![self.waker.clone()];
        if let Some(w) = worker {
            wakers.push(w.clone());
            runner = runner.also_wake(w);
        }
        self.redrive
            .register(&spec_durable, runner.handler(), wakers);
        let shutdown = self.shutdown.clone();
        let runner = runner.report_attached(attached);
        let durable = spec_durable;
        self.tasks.spawn(async move {
            if let Some(consumer) = runner.provision(&shutdown).await {
                tokio::spawn(crate::observe::sample_lag(
                    consumer.clone(),
                    durable,
                    shutdown.clone(),
                ));
                runner.run(consumer, shutdown).await;
            }
        });
    }

    /// Prune a service's own tables as well (e.g. idempotency keys), on the retention schedule.
    pub fn prune_also(&mut self, rules: Vec<PruneRule>, every: Duration) {
        self.tasks.spawn(crate::retention::run(
            self.db.clone(),
            rules,
            every,
            self.shutdown.clone(),
        ));
    }

    /// Run a background worker; it must return soon after `shutdown` is cancelled.
    pub fn spawn_worker<F>(&mut self, worker: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(worker);
    }

    /// A cheap handle answering readiness questions, for HTTP handlers.
    pub fn readiness(&self) -> Readiness {
        Readiness {
            db: self.db.clone(),
            client: self.client.clone(),
            relay: self.relay_health.clone(),
            waker: self.waker.clone(),
            attached: self.attached.clone(),
        }
    }

    /// Stop intake, let consumers and workers finish what they hold, then flush the outbox.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(20), drain)
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not finish within 20 s; aborting them");
            self.tasks.abort_all();
        }
        self.relay_stop.cancel();
        if let Some(relay) = self.relay_task.take() {
            relay.await;
        }
        // Unacked messages are redelivered; make sure acks already sent leave the socket.
        let _ = self.client.flush().await;
        self.db.close().await;
        // Spans still batched go out before the process exits (bounded: the collector may be gone).
        let _ = tokio::time::timeout(Duration::from_secs(5), crate::trace::shutdown()).await;
    }
}

/// How often a service checks that the streams it owns still exist.
pub const WIRING_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Re-create the service's own streams if someone deleted them, until `shutdown`. Consumers
/// re-create their durables themselves (see [`ConsumerRunner::run`]) once the streams are back.
async fn watch_streams(
    js: async_nats::jetstream::Context,
    specs: Vec<StreamSpec>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WIRING_CHECK_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
        for spec in &specs {
            let missing = matches!(
                js.get_stream(&spec.name).await.map_err(|e| e.kind()),
                Err(async_nats::jetstream::context::GetStreamErrorKind::JetStream(e))
                    if e.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
            );
            if missing {
                tracing::error!(stream = %spec.name, "own stream is missing; creating it again");
                if let Err(e) = ensure_stream(&js, spec).await {
                    tracing::warn!(stream = %spec.name, error = %e, "cannot create the stream yet");
                }
            }
        }
    }
}

/// Whether the service can do its work: database answers, NATS connected, consumers provisioned.
#[derive(Debug, Clone)]
pub struct Readiness {
    db: Database,
    client: async_nats::Client,
    relay: RelayHealth,
    waker: OutboxWaker,
    attached: Vec<(String, Arc<AtomicBool>)>,
}

/// What readiness found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReadinessReport {
    /// All checks pass.
    pub ready: bool,
    /// The database answered.
    pub database: bool,
    /// NATS is connected.
    pub nats: bool,
    /// The outbox relay can publish (false while its stream is full, missing or not answering).
    pub relay: bool,
    /// Consumers provisioned, of those declared.
    pub consumers_ready: usize,
    /// Consumers declared.
    pub consumers_expected: usize,
    /// The durables not attached right now (what keeps `consumers_ready` short).
    pub consumers_detached: Vec<String>,
}

impl Readiness {
    /// Run the checks.
    pub async fn check(&self) -> ReadinessReport {
        let database = self.db.ping().await;
        let nats = self.client.connection_state() == async_nats::connection::State::Connected;
        let consumers_detached: Vec<String> = self
            .attached
            .iter()
            .filter(|(_, a)| !a.load(Ordering::SeqCst))
            .map(|(name, _)| name.clone())
            .collect();
        let consumers_ready = self.attached.len() - consumers_detached.len();
        let relay = !self.relay.blocked();
        ReadinessReport {
            ready: database && nats && relay && consumers_detached.is_empty(),
            database,
            nats,
            relay,
            consumers_ready,
            consumers_expected: self.attached.len(),
            consumers_detached,
        }
    }

    /// The database, for handlers next to the probe (dead letters).
    pub fn db(&self) -> &Database {
        &self.db
    }

    /// Wakes the outbox relay (after un-parking rows).
    pub fn waker(&self) -> &OutboxWaker {
        &self.waker
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// The whole `main` of a service binary: set up logging, run `service` (typically reading its
/// settings, building and running until a stop signal) and turn its outcome into the exit status.
pub async fn main(name: &str, service: impl Future<Output = Result<(), StartError>>) -> ExitCode {
    init_tracing();
    match service.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "{name} failed");
            ExitCode::FAILURE
        }
    }
}

/// Log to stderr, filtered by `RUST_LOG` (default `info`); `LOG_FORMAT=json` for JSON lines.
/// Spans that declare `otel.kind` also become OpenTelemetry spans, exported over OTLP
/// (http/protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; `OTEL_SERVICE_NAME` defaults to the
/// executable's name (`order-service`, ...). Call inside the tokio runtime, before anything logs.
pub fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if std::env::var("LOG_FORMAT").as_deref() == Ok("json") {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let service_name = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "unknown_service".to_owned());
    let (otel, export) = crate::trace::layer(&service_name);
    // RUST_LOG filters the log lines only: which spans are traced does not depend on it.
    let installed = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(otel)
        .try_init()
        .is_ok();
    match export {
        _ if !installed => {}
        crate::trace::Export::Otlp(endpoint) => {
            tracing::info!(%endpoint, service = %service_name, "exporting spans over OTLP")
        }
        crate::trace::Export::Off => {}
        crate::trace::Export::Failed(error) => {
            tracing::warn!(%error, "OTLP endpoint set but spans cannot be exported")
        }
    }
}
