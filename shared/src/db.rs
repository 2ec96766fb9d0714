//! Storage: one code path over SQLite (embedded default) and Postgres (production), chosen by URL.
//!
//! Queries are written once with `$N` placeholders, which both backends accept, and run through
//! sqlx's `Any` layer: Postgres on sqlx's driver, SQLite on [`crate::sqlite`] (statements run on
//! the calling thread; install both with [`install_drivers`]). Only row locking differs per backend, and the toolkit's own DDL (a service
//! whose SQL suits both backends keeps one migrations folder).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{Any, AnyPool, ConnectOptions, Executor, Transaction};
use tokio::sync::{mpsc, oneshot};

use crate::group_commit::{self, Work, Written};

/// Which database engine is behind a [`Database`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite file, WAL, write transactions begun IMMEDIATE.
    Sqlite,
    /// Postgres.
    Postgres,
}

/// Errors opening or migrating a database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL names no supported backend.
    #[error("unsupported DATABASE_URL scheme in {0:?} (expected sqlite:// or postgres://)")]
    UnsupportedUrl(String),
    /// Could not create the directory for a SQLite file.
    #[error("cannot create directory for {path}: {source}")]
    Directory {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Tuning for a [`Database`].
#[derive(Debug, Clone)]
#[cfg_attr(feature = "service", derive(clap::Args))]
pub struct DbOptions {
    /// Pool size.
    #[cfg_attr(feature = "service", arg(skip = 8u32))]
    pub max_connections: u32,
    /// SQLite `synchronous` pragma: NORMAL is durable against process crashes but may lose the
    /// last commits on power loss; FULL is durable against power loss too.
    #[cfg_attr(
        feature = "service",
        arg(
            long = "sqlite-synchronous",
            env = "SQLITE_SYNCHRONOUS",
            default_value = "NORMAL",
            ignore_case = true
        )
    )]
    pub sqlite_synchronous: SqliteSynchronous,
    /// How long a SQLite writer waits for the write lock before failing.
    #[cfg_attr(feature = "service", arg(skip = Duration::from_secs(10)))]
    pub busy_timeout: Duration,
    /// How long to keep retrying the first connection (database still starting).
    #[cfg_attr(feature = "service", arg(skip = Duration::from_secs(60)))]
    pub connect_for: Duration,
}

impl Default for DbOptions {
    fn default() -> Self {
        Self {
            max_connections: 8,
            sqlite_synchronous: SqliteSynchronous::Normal,
            busy_timeout: Duration::from_secs(10),
            connect_for: Duration::from_secs(60),
        }
    }
}

/// Values of SQLite's `synchronous` pragma.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "service", derive(clap::ValueEnum))]
pub enum SqliteSynchronous {
    /// No syncs at all: a power loss may corrupt the database.
    #[cfg_attr(feature = "service", value(name = "OFF"))]
    Off,
    /// Sync at checkpoints (WAL): survives process crashes.
    #[default]
    #[cfg_attr(feature = "service", value(name = "NORMAL"))]
    Normal,
    /// Sync every commit: survives power loss.
    #[cfg_attr(feature = "service", value(name = "FULL"))]
    Full,
    /// FULL, plus the directory after a rollback journal is deleted.
    #[cfg_attr(feature = "service", value(name = "EXTRA"))]
    Extra,
}

impl SqliteSynchronous {
    /// The pragma's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "OFF",
            Self::Normal => "NORMAL",
            Self::Full => "FULL",
            Self::Extra => "EXTRA",
        }
    }
}

/// A connection pool plus the backend it talks to.
#[derive(Debug, Clone)]
pub struct Database {
    /// Reads (and, on Postgres, writes too).
    pool: AnyPool,
    /// Write transactions. On SQLite a pool of one connection: writers queue here, in order and
    /// without sleeping, instead of polling SQLite's single write lock through its busy handler
    /// (whose growing sleeps dominate latency under load). On Postgres the same pool as reads.
    writer: AnyPool,
    backend: Backend,
    /// The SQLite file's URL, for migrations (they run over sqlx's own driver). Not kept for
    /// Postgres, whose URL may hold a password.
    sqlite_url: Option<String>,
    /// Write transactions begun through [`Database::begin`] or [`Database::write`], for
    /// throughput figures.
    transactions: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The task that runs [`Database::write`]'s work on SQLite, started at the first call (and
    /// again should the runtime that ran it have ended).
    group: std::sync::Arc<std::sync::Mutex<Option<mpsc::UnboundedSender<group_commit::Job>>>>,
    /// Connections [`Kept`] may hold out of the pool at once: half of it, so the rest stays for
    /// everyone else.
    keep_slots: std::sync::Arc<tokio::sync::Semaphore>,
    /// Connections kept between [`Database::write`]s on Postgres.
    kept: std::sync::Arc<std::sync::Mutex<Vec<Held>>>,
}

/// Install the `Any` drivers: [`crate::sqlite`] for `sqlite:` URLs, sqlx's for Postgres. Call it
/// (instead of `sqlx::any::install_default_drivers`) before opening an `AnyPool` yourself;
/// [`Database::connect`] does. Idempotent. Before SQLite is first used, it also routes SQLite's
/// allocations to the Rust global allocator (see [`crate::sqlite`]).
pub fn install_drivers() {
    static DRIVERS: &[sqlx_core::any::driver::AnyDriver] =
        &[crate::sqlite::DRIVER, sqlx::postgres::any::DRIVER];
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        crate::sqlite::route_allocations();
        if let Err(e) = sqlx::any::install_drivers(DRIVERS) {
            // Someone installed sqlx's defaults first: SQLite then runs on sqlx's driver, which
            // behaves the same, one thread hop per statement slower.
            tracing::warn!(error = %e, "sqlx Any drivers were installed elsewhere first");
        }
    });
}

/// A pooled Postgres connection idle this long is pinged before it is handed out.
pub const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// The default URL for a service's SQLite file under `data/`.
pub fn default_sqlite_url(service: &str) -> String {
    format!("sqlite://data/{service}.db")
}

impl Database {
    /// Open (creating a SQLite file if needed) and run the toolkit's migrations, retrying with backoff
    /// while the database is unreachable.
    pub async fn connect(url: &str, options: DbOptions) -> Result<Self, DbError> {
        install_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(DbError::UnsupportedUrl(url.to_owned()));
        };
        let url = match backend {
            Backend::Sqlite => sqlite_url_with_create(url)?,
            Backend::Postgres => url.to_owned(),
        };
        let connect_options = AnyConnectOptions::from_str(&url)
            .map_err(DbError::Connect)?
            .log_statements(tracing::log::LevelFilter::Trace)
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1));
        // Statement and savepoint journals (the original of each page changed under a savepoint
        // or by a multi-row statement) stay in memory: spilled to a temporary file past 64 KiB,
        // they cost more writes than the WAL itself.
        let pragmas = format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {}; PRAGMA busy_timeout = {}; \
             PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;",
            options.sqlite_synchronous.as_str(),
            options.busy_timeout.as_millis()
        );
        let pool_options = AnyPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(Duration::from_secs(30))
            // A ping before each checkout is a round trip per transaction. An open SQLite file
            // does not go away: never. A Postgres connection can (a restart), but one used less
            // than a second ago is as good as pinged (and sqlx pings it on release anyway), so
            // only a connection idle longer is checked.
            .test_before_acquire(false)
            .before_acquire(move |conn, meta| {
                Box::pin(async move {
                    if backend == Backend::Postgres && meta.idle_for >= PING_AFTER_IDLE {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .after_connect(move |conn, _meta| {
                let pragmas = pragmas.clone();
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        conn.execute(sqlx::raw_sql(&pragmas)).await?;
                    }
                    Ok(())
                })
            });
        let open = |max: u32| {
            let options = pool_options.clone().max_connections(max);
            let connect_options = connect_options.clone();
            move || options.clone().connect_with(connect_options.clone())
        };
        let retry = ExponentialBuilder::default()
            .with_jitter()
            .with_max_delay(Duration::from_secs(2))
            .with_total_delay(Some(options.connect_for))
            .without_max_times();
        let pool = open(options.max_connections)
            .retry(retry)
            .notify(|e, d| tracing::warn!(error = %e, retry_in = ?d, "database not reachable yet"))
            .await
            .map_err(DbError::Connect)?;
        let writer = match backend {
            Backend::Sqlite => open(1).retry(retry).await.map_err(DbError::Connect)?,
            Backend::Postgres => pool.clone(),
        };
        let db = Self {
            pool,
            writer,
            backend,
            sqlite_url: (backend == Backend::Sqlite).then(|| url.clone()),
            transactions: Default::default(),
            group: Default::default(),
            keep_slots: std::sync::Arc::new(tokio::sync::Semaphore::new(
                (options.max_connections / 2) as usize,
            )),
            kept: Default::default(),
        };
        // The toolkit's own tables: outbox, inbox, dead letters. Their DDL differs per backend
        // (identity columns, BLOB vs BYTEA, `ADD COLUMN IF NOT EXISTS`).
        db.migrate(match backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite"),
            Backend::Postgres => sqlx::migrate!("./migrations/postgres"),
        })
        .await?;
        Ok(db)
    }

    /// Run a service's migrations, written once for both backends. Migrators share the
    /// `_sqlx_migrations` table, so each set must use version numbers of its own.
    pub async fn migrate(&self, mut migrator: Migrator) -> Result<(), DbError> {
        // Other migrators (toolkit vs service) have applied versions this one does not know about.
        migrator.set_ignore_missing(true);
        match &self.sqlite_url {
            None => migrator.run(&self.writer).await?,
            // The inline driver does not speak sqlx's migration protocol; sqlx's own SQLite
            // driver does, on a connection of its own that lives as long as the migration.
            Some(url) => {
                use sqlx::Connection;
                let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
                    .map_err(DbError::Connect)?
                    .busy_timeout(Duration::from_secs(30))
                    .log_statements(tracing::log::LevelFilter::Trace);
                let mut conn = sqlx::sqlite::SqliteConnection::connect_with(&options)
                    .await
                    .map_err(DbError::Connect)?;
                let result = migrator.run(&mut conn).await;
                let _ = conn.close().await;
                result?
            }
        }
        Ok(())
    }

    /// The pool for reads. Writes go through [`Database::begin`].
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// For one write statement outside any transaction (it commits on its own): on SQLite the
    /// single writer connection, so it queues behind the writers instead of contending for the
    /// file lock; on Postgres the pool. Saves the `BEGIN` and `COMMIT` round trips.
    pub fn writer(&self) -> &AnyPool {
        &self.writer
    }

    /// The backend behind this pool.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Begin a write transaction. On SQLite it is `BEGIN IMMEDIATE`: the write lock is taken up
    /// front, so a read-then-write transaction never fails to upgrade under concurrency.
    pub async fn begin(&self) -> Result<Transaction<'static, Any>, sqlx::Error> {
        self.transactions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.backend {
            Backend::Sqlite => self.writer.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.writer.begin().await,
        }
    }

    /// Run `work` in a write transaction and commit it, unless it returns
    /// [`Written::Rollback`] or an error (then nothing of it is written). On SQLite, work from
    /// concurrent callers waiting for the writer is committed in one transaction, each caller's in
    /// a savepoint ([`crate::group_commit`]); on Postgres each runs in a transaction of its own.
    /// Either way the answer comes after the commit, and effects deferred with
    /// [`crate::deferred::after_commit`] run only if it committed.
    ///
    /// On SQLite the work runs on the writer's task, in the caller's span: once handed over, it
    /// runs and commits even if the caller stops waiting.
    pub async fn write<T: Send + 'static>(&self, work: Work<T>) -> Result<T, sqlx::Error> {
        match self.backend {
            Backend::Postgres => {
                // On a connection kept from an earlier write when there is one (see [`Kept`]).
                let held = self.kept.lock().ok().and_then(|mut k| k.pop());
                let mut kept = Kept {
                    db: self.clone(),
                    held,
                };
                let outcome = async {
                    let mut tx = kept.begin().await?;
                    let (result, effects) = crate::deferred::collect(work(&mut tx)).await;
                    match result? {
                        Written::Commit(v) => {
                            tx.commit().await?;
                            effects.run();
                            Ok(v)
                        }
                        Written::Rollback(v) => {
                            tx.rollback().await?;
                            Ok(v)
                        }
                    }
                }
                .await;
                if outcome.is_ok() {
                    if let (Some(held), Ok(mut stash)) = (kept.held.take(), self.kept.lock()) {
                        // Ones left idle since are given back (a burst of writes is over).
                        stash.retain(|h| h.used_at.elapsed() < PING_AFTER_IDLE);
                        stash.push(held);
                    }
                }
                outcome
            }
            Backend::Sqlite => {
                let (reply, answer) = oneshot::channel();
                let job = group_commit::job(work, tracing::Span::current(), reply);
                self.group_sender()
                    .send(job)
                    .map_err(|_| group_commit::not_committed(None))?;
                answer
                    .await
                    .unwrap_or_else(|_| Err(group_commit::not_committed(None)))
            }
        }
    }

    /// The SQLite writer's task, started on the current runtime if it is not running.
    fn group_sender(&self) -> mpsc::UnboundedSender<group_commit::Job> {
        let mut group = self.group.lock().unwrap_or_else(|p| p.into_inner());
        match group.as_ref() {
            Some(s) if !s.is_closed() => s.clone(),
            _ => group
                .insert(group_commit::spawn(
                    self.writer.clone(),
                    self.transactions.clone(),
                ))
                .clone(),
        }
    }

    /// Start the SQLite writer's task on the current runtime now, so that a caller on another
    /// runtime (the relay's thread) does not start it there. Nothing on Postgres.
    pub fn start_writer(&self) {
        if self.backend == Backend::Sqlite {
            self.group_sender();
        }
    }

    /// A connection kept between the transactions of one worker (see [`Kept`]).
    pub fn keep(&self) -> Kept {
        Kept {
            db: self.clone(),
            held: None,
        }
    }

    /// Write transactions begun so far by this process.
    pub fn transactions(&self) -> u64 {
        self.transactions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Readiness probe: the database answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Close the pools, waiting for connections to be returned.
    pub async fn close(&self) {
        // Kept connections are out of the pool, which waits for them.
        if let Ok(mut kept) = self.kept.lock() {
            kept.clear();
        }
        self.pool.close().await;
        self.writer.close().await;
    }
}

/// A Postgres connection kept out of the pool between one worker's transactions (a consumer's
/// batches, the relay's passes).
///
/// sqlx pings every connection returned to its pool, a round trip per transaction that a worker
/// running one transaction after another does not need: a kept connection goes back only when it
/// has been idle for [`PING_AFTER_IDLE`] (the pool then checks it, as it checks any connection
/// idle that long) or when [`Kept::discard`] says its last transaction failed. At most half the
/// pool is kept at once; past that, and on SQLite (whose writer is one connection for everyone),
/// [`Kept::begin`] is [`Database::begin`].
#[derive(Debug)]
pub struct Kept {
    db: Database,
    held: Option<Held>,
}

#[derive(Debug)]
struct Held {
    conn: sqlx::pool::PoolConnection<Any>,
    used_at: std::time::Instant,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Kept {
    /// Begin a write transaction, on the kept connection when there is one.
    pub async fn begin(&mut self) -> Result<Transaction<'_, Any>, sqlx::Error> {
        if self.db.backend != Backend::Postgres {
            return self.db.begin().await;
        }
        if self
            .held
            .as_ref()
            .is_some_and(|h| h.used_at.elapsed() >= PING_AFTER_IDLE)
        {
            self.held = None;
        }
        if self.held.is_none() {
            let Ok(slot) = self.db.keep_slots.clone().try_acquire_owned() else {
                return self.db.begin().await;
            };
            let conn = self.db.writer.acquire().await?;
            self.held = Some(Held {
                conn,
                used_at: std::time::Instant::now(),
                _slot: slot,
            });
        }
        self.db
            .transactions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let held = self.held.as_mut().expect("a connection was just kept");
        held.used_at = std::time::Instant::now();
        sqlx::Connection::begin(&mut *held.conn).await
    }

    /// Give the connection back to the pool, which checks it: call it when a transaction on it
    /// failed (the server may have dropped it).
    pub fn discard(&mut self) {
        self.held = None;
    }
}

/// Make sure the SQLite file's directory exists and the file is created if missing.
fn sqlite_url_with_create(url: &str) -> Result<String, DbError> {
    let rest = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if path != ":memory:" && !path.is_empty() {
        if let Some(parent) = Path::new(path).parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|source| DbError::Directory {
                    path: parent.display().to_string(),
                    source,
                })?;
            }
        }
    }
    Ok(match query {
        Some(q) if q.contains("mode=") => url.to_owned(),
        Some(_) => format!("{url}&mode=rwc"),
        None => format!("{url}?mode=rwc"),
    })
}

/// Current time in microseconds since the Unix epoch: the toolkit's timestamp column type.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// `" FOR UPDATE"` on Postgres, nothing on SQLite (whose `BEGIN IMMEDIATE` already serializes
/// writers): append to a `SELECT` that precedes a read-modify-write.
pub fn lock_clause(conn: &sqlx::AnyConnection) -> &'static str {
    if conn.backend_name() == "PostgreSQL" {
        " FOR UPDATE"
    } else {
        ""
    }
}

/// Microseconds since the epoch as a UTC timestamp.
pub fn micros_to_datetime(us: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// Serialize everything that happens to one entity across concurrent transactions (two consumers
/// of different streams handling the same order): make sure the entity's row in `table` exists —
/// created with `defaults`, `(column, SQL literal)` pairs — then read `columns` from it under a
/// row lock held until the caller's transaction ends (Postgres; SQLite's single writer already
/// serializes). Table and column names come from code, never from input.
pub async fn lock_entity(
    conn: &mut sqlx::AnyConnection,
    table: &str,
    key_column: &str,
    key: &str,
    defaults: &[(&str, &str)],
    columns: &str,
) -> Result<sqlx::any::AnyRow, sqlx::Error> {
    let names: String = defaults.iter().map(|(c, _)| format!(", {c}")).collect();
    let values: String = defaults.iter().map(|(_, v)| format!(", {v}")).collect();
    // One statement: an upsert that changes nothing still takes the row lock on Postgres (as
    // `FOR UPDATE` would) and returns the row whether it was just created or not.
    sqlx::query(&format!(
        "INSERT INTO {table} ({key_column}{names}) VALUES ($1{values}) \
         ON CONFLICT ({key_column}) DO UPDATE SET {key_column} = excluded.{key_column} \
         RETURNING {columns}"
    ))
    .bind(key)
    .fetch_one(&mut *conn)
    .await
}
