//! SQLite on the calling thread, under sqlx's `Any` layer.
//!
//! sqlx's own SQLite driver gives each connection a thread and sends it every statement over a
//! channel: each statement, `BEGIN` and `COMMIT` included, wakes that thread and then the task
//! waiting for the answer. A saga runs about 140 statements across the three services, and those
//! thread switches were the largest single cost per saga (README "Benchmark"). This driver runs
//! each statement where it is called, with rusqlite on the same libsqlite3 that sqlx links. In
//! WAL mode with `synchronous = NORMAL` a statement takes microseconds and a commit writes the
//! WAL without waiting for the disk, so running them on a tokio worker costs less than the two
//! switches it saves. Queries, pools, `Transaction`s and the `$N` parameters stay sqlx's: the
//! driver plugs in under the `sqlite:` scheme (see [`crate::db::install_drivers`]), and code
//! written against `AnyConnection` does not change.
//!
//! What it does not do: `prepare`/`describe` (the `Any` layer's compile-time checks are not used
//! here) and migrations, which [`crate::db::Database`] runs over sqlx's own SQLite driver.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef as SqlValueRef};
use rusqlite::{Batch, OpenFlags, ToSql};
use sqlx_core::any::{
    Any, AnyArguments, AnyColumn, AnyConnectOptions, AnyConnectionBackend, AnyQueryResult, AnyRow,
    AnyStatement, AnyTypeInfo, AnyTypeInfoKind, AnyValue, AnyValueKind,
};
use sqlx_core::arguments::Arguments;
use sqlx_core::arguments::IntoArguments;
use sqlx_core::column::{Column, ColumnIndex};
use sqlx_core::connection::{ConnectOptions, Connection};
use sqlx_core::database::Database;
use sqlx_core::describe::Describe;
use sqlx_core::encode::Encode;
use sqlx_core::error::{BoxDynError, DatabaseError, Error, ErrorKind};
use sqlx_core::executor::{Execute, Executor};
use sqlx_core::ext::ustr::UStr;
use sqlx_core::from_row::FromRow;
use sqlx_core::query::Query;
use sqlx_core::query_as::QueryAs;
use sqlx_core::query_scalar::QueryScalar;
use sqlx_core::row::Row;
use sqlx_core::statement::Statement;
use sqlx_core::transaction::{Transaction, TransactionManager};
use sqlx_core::types::Type;
use sqlx_core::value::{Value, ValueRef};
use sqlx_core::Either;
use tracing::log::LevelFilter;

/// Statements kept prepared per connection: room for every persistent query of a service.
const STATEMENT_CACHE: usize = 256;

/// The driver for sqlx's `Any` layer. Only reached through `AnyConnection`/`AnyPool`.
pub const DRIVER: sqlx_core::any::driver::AnyDriver =
    sqlx_core::any::driver::AnyDriver::without_migrate::<InlineSqlite>();

/// Route SQLite's own allocations (pages, parsed statements, rows being built) to the process's
/// Rust global allocator, and turn off SQLite's global allocation counters, which take a mutex on
/// every allocation. Under load the C library's `malloc` and that mutex were about 5 % of a
/// service's CPU; a service that picked a faster allocator now gets it for SQLite too.
///
/// SQLite takes this only before its first use in the process; later it refuses (nothing changes,
/// the default allocator stays) — so call it first, as [`crate::db::install_drivers`] does.
pub(crate) fn route_allocations() {
    use rusqlite::ffi;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let methods = ffi::sqlite3_mem_methods {
            xMalloc: Some(memory::malloc),
            xFree: Some(memory::free),
            xRealloc: Some(memory::realloc),
            xSize: Some(memory::size),
            xRoundup: Some(memory::roundup),
            xInit: Some(memory::init),
            xShutdown: Some(memory::shutdown),
            pAppData: std::ptr::null_mut(),
        };
        // SAFETY: both options are documented for `sqlite3_config`, with these argument types;
        // SQLite copies `methods`; after initialisation it returns SQLITE_MISUSE and changes nothing.
        let (counters, allocator) = unsafe {
            (
                ffi::sqlite3_config(ffi::SQLITE_CONFIG_MEMSTATUS, 0 as std::ffi::c_int),
                ffi::sqlite3_config(
                    ffi::SQLITE_CONFIG_MALLOC,
                    &methods as *const ffi::sqlite3_mem_methods,
                ),
            )
        };
        if counters != ffi::SQLITE_OK || allocator != ffi::SQLITE_OK {
            tracing::debug!(
                counters,
                allocator,
                "SQLite was in use already: it keeps its default allocator"
            );
        }
    });
}

/// SQLite's `sqlite3_mem_methods` over Rust's global allocator. Each block starts with a header
/// holding its size, as `free` and `size` are given only the pointer.
mod memory {
    use std::alloc::{self, Layout};
    use std::ffi::{c_int, c_void};

    /// Header size; also the alignment, enough for any type SQLite stores.
    const HEADER: usize = 16;

    fn layout(n: usize) -> Option<Layout> {
        Layout::from_size_align(n.checked_add(HEADER)?, HEADER).ok()
    }

    /// # Safety
    /// Called by SQLite only.
    pub unsafe extern "C" fn malloc(n: c_int) -> *mut c_void {
        let Some(layout) = usize::try_from(n).ok().and_then(layout) else {
            return std::ptr::null_mut();
        };
        // SAFETY: the layout's size is at least HEADER, never zero.
        unsafe {
            let base = alloc::alloc(layout);
            if base.is_null() {
                return std::ptr::null_mut();
            }
            base.cast::<usize>().write(layout.size() - HEADER);
            base.add(HEADER).cast()
        }
    }

    /// # Safety
    /// `p` is null or came from [`malloc`]/[`realloc`] and is not used again.
    pub unsafe extern "C" fn free(p: *mut c_void) {
        if p.is_null() {
            return;
        }
        // SAFETY: `p` is HEADER bytes past a block whose header holds its size.
        unsafe {
            let base = p.cast::<u8>().sub(HEADER);
            let n = base.cast::<usize>().read();
            alloc::dealloc(base, Layout::from_size_align_unchecked(n + HEADER, HEADER));
        }
    }

    /// # Safety
    /// `p` is null or came from [`malloc`]/[`realloc`].
    pub unsafe extern "C" fn realloc(p: *mut c_void, n: c_int) -> *mut c_void {
        if p.is_null() {
            // SAFETY: as malloc.
            return unsafe { malloc(n) };
        }
        let Some(new) = usize::try_from(n).ok().and_then(layout) else {
            return std::ptr::null_mut();
        };
        // SAFETY: `p` is HEADER bytes past a block whose header holds its size; on failure the
        // old block is left as it was, as SQLite expects.
        unsafe {
            let base = p.cast::<u8>().sub(HEADER);
            let old = base.cast::<usize>().read();
            let moved = alloc::realloc(
                base,
                Layout::from_size_align_unchecked(old + HEADER, HEADER),
                new.size(),
            );
            if moved.is_null() {
                return std::ptr::null_mut();
            }
            moved.cast::<usize>().write(new.size() - HEADER);
            moved.add(HEADER).cast()
        }
    }

    /// # Safety
    /// `p` is null or came from [`malloc`]/[`realloc`].
    pub unsafe extern "C" fn size(p: *mut c_void) -> c_int {
        if p.is_null() {
            return 0;
        }
        // SAFETY: as free; sizes came from a `c_int`.
        unsafe { p.cast::<u8>().sub(HEADER).cast::<usize>().read() as c_int }
    }

    /// # Safety
    /// Called by SQLite only.
    pub unsafe extern "C" fn roundup(n: c_int) -> c_int {
        n.saturating_add(7) & !7
    }

    /// # Safety
    /// Called by SQLite only.
    pub unsafe extern "C" fn init(_: *mut c_void) -> c_int {
        rusqlite::ffi::SQLITE_OK
    }

    /// # Safety
    /// Called by SQLite only.
    pub unsafe extern "C" fn shutdown(_: *mut c_void) {}
}

/// SQLite run on the calling thread. The typed side exists because sqlx's `Any` layer asks for
/// a `Database`; everything goes through `Any`, so its row, value and statement types are never
/// built.
#[derive(Debug)]
pub struct InlineSqlite;

/// Types of the typed side that are never built (see [`InlineSqlite`]).
#[derive(Debug, Clone)]
pub enum Never {}

impl Database for InlineSqlite {
    type Connection = InlineConnection;
    type TransactionManager = InlineTransactionManager;
    type Row = Never;
    type QueryResult = AnyQueryResult;
    type Column = Never;
    type TypeInfo = AnyTypeInfo;
    type Value = Never;
    type ValueRef<'r> = Never;
    type Arguments<'q> = NoArguments;
    type ArgumentBuffer<'q> = ();
    type Statement<'q> = Never;
    // What sqlx's SQLite driver calls itself: code that asks the backend's name sees SQLite.
    const NAME: &'static str = "SQLite";
    const URL_SCHEMES: &'static [&'static str] = &["sqlite"];
}

/// One SQLite connection.
pub struct InlineConnection {
    conn: rusqlite::Connection,
    /// Open transactions and savepoints, as sqlx counts them.
    depth: usize,
    /// Statements slower than this are logged at warn.
    slow: Option<Duration>,
    /// For each persistent statement, the argument each of its parameters takes: asking SQLite
    /// for a parameter's name searches a list, so a statement with n parameters costs n²/2.
    arguments_of: sqlx_core::HashMap<Box<str>, Arc<[usize]>>,
}

impl fmt::Debug for InlineConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InlineConnection")
            .field("depth", &self.depth)
            .finish_non_exhaustive()
    }
}

/// Where and how to open the file: `sqlite://path?mode=ro|rw|rwc|memory`, as sqlx reads it.
#[derive(Debug, Clone)]
pub struct InlineOptions {
    path: String,
    flags: OpenFlags,
    slow: Option<Duration>,
}

impl InlineOptions {
    fn parse(url: &str) -> Result<Self, Error> {
        let rest = url
            .strip_prefix("sqlite:")
            .ok_or_else(|| Error::Configuration(format!("not a sqlite URL: {url}").into()))?
            .trim_start_matches("//");
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let path = sqlx_core::percent_encoding::percent_decode_str(path)
            .decode_utf8()
            .map_err(|e| Error::Configuration(e.into()))?
            .into_owned();
        let base = OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_PRIVATE_CACHE;
        let mut flags = base | OpenFlags::SQLITE_OPEN_READ_WRITE;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=').unwrap_or((pair, "")) {
                ("mode", "ro") => flags = base | OpenFlags::SQLITE_OPEN_READ_ONLY,
                ("mode", "rw") => flags = base | OpenFlags::SQLITE_OPEN_READ_WRITE,
                ("mode", "rwc") => {
                    flags = base | OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
                }
                ("mode", "memory") => {
                    flags = base
                        | OpenFlags::SQLITE_OPEN_READ_WRITE
                        | OpenFlags::SQLITE_OPEN_CREATE
                        | OpenFlags::SQLITE_OPEN_MEMORY
                }
                (key, value) => {
                    return Err(Error::Configuration(
                        format!("unsupported sqlite URL parameter {key}={value}").into(),
                    ))
                }
            }
        }
        let path = if path.is_empty() {
            ":memory:".to_owned()
        } else {
            path
        };
        Ok(Self {
            path,
            flags,
            slow: Some(Duration::from_secs(1)),
        })
    }
}

impl FromStr for InlineOptions {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

impl<'a> TryFrom<&'a AnyConnectOptions> for InlineOptions {
    type Error = Error;
    fn try_from(any: &'a AnyConnectOptions) -> Result<Self, Error> {
        let mut options = Self::parse(any.database_url.as_str())?;
        options.slow = (any.log_settings.slow_statements_level != LevelFilter::Off)
            .then_some(any.log_settings.slow_statements_duration);
        Ok(options)
    }
}

impl ConnectOptions for InlineOptions {
    type Connection = InlineConnection;

    fn from_url(url: &sqlx_core::Url) -> Result<Self, Error> {
        Self::parse(url.as_str())
    }

    fn connect(&self) -> BoxFuture<'_, Result<InlineConnection, Error>> {
        async move {
            let conn =
                rusqlite::Connection::open_with_flags(&self.path, self.flags).map_err(sql_error)?;
            conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
            Ok(InlineConnection {
                conn,
                depth: 0,
                slow: self.slow,
                arguments_of: Default::default(),
            })
        }
        .boxed()
    }

    fn log_statements(self, _level: LevelFilter) -> Self {
        self
    }

    fn log_slow_statements(mut self, level: LevelFilter, duration: Duration) -> Self {
        self.slow = (level != LevelFilter::Off).then_some(duration);
        self
    }
}

/// A value bound to a statement parameter.
struct Bound<'a>(&'a AnyValueKind<'a>);

impl ToSql for Bound<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            AnyValueKind::Null(_) => ToSqlOutput::Owned(SqlValue::Null),
            AnyValueKind::Bool(b) => ToSqlOutput::Owned(SqlValue::Integer(i64::from(*b))),
            AnyValueKind::SmallInt(i) => ToSqlOutput::Owned(SqlValue::Integer(i64::from(*i))),
            AnyValueKind::Integer(i) => ToSqlOutput::Owned(SqlValue::Integer(i64::from(*i))),
            AnyValueKind::BigInt(i) => ToSqlOutput::Owned(SqlValue::Integer(*i)),
            AnyValueKind::Real(f) => ToSqlOutput::Owned(SqlValue::Real(f64::from(*f))),
            AnyValueKind::Double(f) => ToSqlOutput::Owned(SqlValue::Real(*f)),
            AnyValueKind::Text(s) => ToSqlOutput::Borrowed(SqlValueRef::Text(s.as_bytes())),
            AnyValueKind::Blob(b) => ToSqlOutput::Borrowed(SqlValueRef::Blob(b)),
            other => {
                return Err(rusqlite::Error::ToSqlConversionFailure(
                    format!("unsupported parameter {other:?}").into(),
                ))
            }
        })
    }
}

/// The 1-based argument a parameter takes: `$N`, `?N` or `:N` by number, a bare `?` the next one.
fn argument_index(name: Option<&str>, anonymous: &mut usize) -> Result<usize, Error> {
    match name {
        None => {
            *anonymous += 1;
            Ok(*anonymous)
        }
        Some(name) => name
            .get(1..)
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                Error::Protocol(format!("unsupported parameter name {name} (use $1, $2, …)"))
            }),
    }
}

impl InlineConnection {
    /// Run `sql` (one statement or several), binding `$N` to the N-th argument across all of them,
    /// and return each statement's rows followed by its result, as sqlx's drivers do.
    fn run(
        &mut self,
        sql: &str,
        persistent: bool,
        arguments: Option<AnyArguments<'_>>,
    ) -> Result<Vec<Either<AnyQueryResult, AnyRow>>, Error> {
        let started = Instant::now();
        let values = arguments.map(|a| a.values.0).unwrap_or_default();
        let mut out = Vec::new();
        let mut anonymous = 0;
        // SQLite needs a `;` between statements, so a string without one inside holds one
        // statement (rusqlite's `prepare` would silently drop any after the first).
        let several = sql.trim_end().trim_end_matches(';').contains(';');
        if several {
            // Prepared one by one, not cached.
            let mut batch = Batch::new(&self.conn, sql);
            while let Some(mut stmt) = batch.next().map_err(sql_error)? {
                let arguments = arguments_of(&stmt, &mut anonymous)?;
                step(&self.conn, &mut stmt, &arguments, &values, &mut out)?;
            }
        } else if persistent {
            let mut stmt = self.conn.prepare_cached(sql).map_err(sql_error)?;
            let arguments = match self.arguments_of.get(sql) {
                Some(known) => known.clone(),
                None => {
                    let found: Arc<[usize]> = arguments_of(&stmt, &mut anonymous)?.into();
                    // Bounded like the statement cache; a miss only costs the lookup again.
                    if self.arguments_of.len() >= STATEMENT_CACHE * 4 {
                        self.arguments_of.clear();
                    }
                    self.arguments_of.insert(sql.into(), found.clone());
                    found
                }
            };
            step(&self.conn, &mut stmt, &arguments, &values, &mut out)?;
        } else {
            let mut stmt = self.conn.prepare(sql).map_err(sql_error)?;
            let arguments = arguments_of(&stmt, &mut anonymous)?;
            step(&self.conn, &mut stmt, &arguments, &values, &mut out)?;
        }
        if let Some(slow) = self.slow {
            let took = started.elapsed();
            if took >= slow {
                let head: String = sql.chars().take(200).collect();
                tracing::warn!(?took, sql = %head, "slow SQLite statement");
            }
        }
        Ok(out)
    }

    /// `BEGIN`, `COMMIT` and savepoints: kept prepared, as they run for every transaction.
    fn execute(&mut self, sql: &str) -> Result<(), Error> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(sql_error)?;
        stmt.raw_execute().map(drop).map_err(sql_error)
    }

    fn begin(&mut self, statement: Option<Cow<'static, str>>) -> Result<(), Error> {
        if self.depth == 0 {
            self.execute(statement.as_deref().unwrap_or("BEGIN"))?;
        } else {
            if statement.is_some() {
                return Err(Error::InvalidSavePointStatement);
            }
            self.execute(&format!("SAVEPOINT _sqlx_savepoint_{}", self.depth))?;
        }
        self.depth += 1;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), Error> {
        if self.depth == 0 {
            return Ok(());
        }
        let result = if self.depth == 1 {
            self.execute("COMMIT")
        } else {
            self.execute(&format!(
                "RELEASE SAVEPOINT _sqlx_savepoint_{}",
                self.depth - 1
            ))
        };
        if result.is_ok() {
            self.depth -= 1;
        }
        self.settle_depth();
        result
    }

    fn rollback(&mut self) -> Result<(), Error> {
        if self.depth == 0 {
            return Ok(());
        }
        let result = if self.depth == 1 {
            self.execute("ROLLBACK")
        } else {
            self.execute(&format!(
                "ROLLBACK TO SAVEPOINT _sqlx_savepoint_{}",
                self.depth - 1
            ))
        };
        self.depth -= 1;
        self.settle_depth();
        result
    }

    /// SQLite ends a transaction by itself on some errors (a full disk, an I/O error): then no
    /// savepoint is left either.
    fn settle_depth(&mut self) {
        if self.conn.is_autocommit() {
            self.depth = 0;
        }
    }
}

/// A statement's column names (for lookup by name) and columns, shared by its rows.
type Columns = (Arc<sqlx_core::HashMap<UStr, usize>>, Vec<AnyColumn>);

fn columns_of(stmt: &rusqlite::Statement<'_>, count: usize) -> Result<Columns, Error> {
    let mut map = sqlx_core::HashMap::with_capacity(count);
    let mut columns = Vec::with_capacity(count);
    for i in 0..count {
        let name = UStr::new(stmt.column_name(i).map_err(sql_error)?);
        map.insert(name.clone(), i);
        columns.push(AnyColumn {
            ordinal: i,
            name,
            type_info: AnyTypeInfo {
                kind: AnyTypeInfoKind::Null,
            },
        });
    }
    Ok((Arc::new(map), columns))
}

/// The 1-based argument each of a statement's parameters takes, in parameter order.
fn arguments_of(
    stmt: &rusqlite::Statement<'_>,
    anonymous: &mut usize,
) -> Result<Vec<usize>, Error> {
    (1..=stmt.parameter_count())
        .map(|i| argument_index(stmt.parameter_name(i), anonymous))
        .collect()
}

/// Bind one statement's parameters (the `arguments`-th values), read its rows, then its result.
fn step(
    conn: &rusqlite::Connection,
    stmt: &mut rusqlite::Statement<'_>,
    arguments: &[usize],
    values: &[AnyValueKind<'_>],
    out: &mut Vec<Either<AnyQueryResult, AnyRow>>,
) -> Result<(), Error> {
    for (i, &n) in arguments.iter().enumerate() {
        let value = values.get(n - 1).ok_or_else(|| {
            Error::Protocol(format!(
                "statement uses parameter {n}, {} given",
                values.len()
            ))
        })?;
        stmt.raw_bind_parameter(i + 1, Bound(value))
            .map_err(sql_error)?;
    }
    let count = stmt.column_count();
    // Built at the first row, shared by the rest: a statement that returns none pays nothing.
    let mut names: Option<Columns> = None;
    let mut rows = stmt.raw_query();
    while let Some(row) = rows.next().map_err(sql_error)? {
        let (map, columns) = match &names {
            Some(built) => built,
            None => names.insert(columns_of(row.as_ref(), count)?),
        };
        let mut values = Vec::with_capacity(count);
        for i in 0..count {
            let kind = match row.get_ref(i).map_err(sql_error)? {
                SqlValueRef::Null => AnyValueKind::Null(AnyTypeInfoKind::Null),
                SqlValueRef::Integer(i) => AnyValueKind::BigInt(i),
                SqlValueRef::Real(f) => AnyValueKind::Double(f),
                SqlValueRef::Text(t) => AnyValueKind::Text(Cow::Owned(
                    String::from_utf8(t.to_vec()).map_err(|e| Error::Decode(e.into()))?,
                )),
                SqlValueRef::Blob(b) => AnyValueKind::Blob(Cow::Owned(b.to_vec())),
            };
            values.push(AnyValue { kind });
        }
        out.push(Either::Right(AnyRow {
            column_names: map.clone(),
            columns: columns.clone(),
            values,
        }));
    }
    drop(rows);
    out.push(Either::Left(AnyQueryResult {
        rows_affected: conn.changes(),
        last_insert_id: Some(conn.last_insert_rowid()),
    }));
    Ok(())
}

/// A SQLite error, as sqlx's `DatabaseError` (code = extended result code, as sqlx's driver).
#[derive(Debug)]
pub struct SqliteError {
    code: i32,
    message: String,
}

impl fmt::Display for SqliteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "(code: {}) {}", self.code, self.message)
    }
}

impl std::error::Error for SqliteError {}

impl DatabaseError for SqliteError {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Owned(self.code.to_string()))
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> ErrorKind {
        use rusqlite::ffi;
        match self.code {
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                ErrorKind::UniqueViolation
            }
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => ErrorKind::ForeignKeyViolation,
            ffi::SQLITE_CONSTRAINT_NOTNULL => ErrorKind::NotNullViolation,
            ffi::SQLITE_CONSTRAINT_CHECK => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}

fn sql_error(e: rusqlite::Error) -> Error {
    match e {
        rusqlite::Error::SqliteFailure(failure, message) => {
            Error::Database(Box::new(SqliteError {
                code: failure.extended_code,
                message: message.unwrap_or_else(|| failure.to_string()),
            }))
        }
        other => Error::Protocol(other.to_string()),
    }
}

fn unsupported(what: &str) -> Error {
    Error::Protocol(format!(
        "{what} is not supported by the inline SQLite driver"
    ))
}

impl AnyConnectionBackend for InlineConnection {
    fn name(&self) -> &str {
        InlineSqlite::NAME
    }

    fn close(self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        async move {
            drop(self);
            Ok(())
        }
        .boxed()
    }

    fn close_hard(self: Box<Self>) -> BoxFuture<'static, Result<(), Error>> {
        self.close()
    }

    // An open file does not go away; the pool pings on every release, which must stay free.
    fn ping(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        futures::future::ok(()).boxed()
    }

    fn begin(&mut self, statement: Option<Cow<'static, str>>) -> BoxFuture<'_, Result<(), Error>> {
        futures::future::ready(InlineConnection::begin(self, statement)).boxed()
    }

    fn commit(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        futures::future::ready(InlineConnection::commit(self)).boxed()
    }

    fn rollback(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        futures::future::ready(InlineConnection::rollback(self)).boxed()
    }

    // Called when a transaction is dropped unfinished: nothing is in flight here, so it is rolled
    // back at once rather than on the connection's next use.
    fn start_rollback(&mut self) {
        if let Err(e) = InlineConnection::rollback(self) {
            tracing::warn!(error = %e, "rollback of a dropped transaction failed");
        }
    }

    fn get_transaction_depth(&self) -> usize {
        self.depth
    }

    fn shrink_buffers(&mut self) {}

    fn flush(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        futures::future::ok(()).boxed()
    }

    fn should_flush(&self) -> bool {
        false
    }

    fn fetch_many<'q>(
        &'q mut self,
        query: &'q str,
        persistent: bool,
        arguments: Option<AnyArguments<'q>>,
    ) -> BoxStream<'q, Result<Either<AnyQueryResult, AnyRow>, Error>> {
        // Run when first polled, as a driver's stream would.
        futures::stream::once(async move { self.run(query, persistent, arguments) })
            .flat_map(|result| {
                futures::stream::iter(match result {
                    Ok(items) => items.into_iter().map(Ok).collect::<Vec<_>>(),
                    Err(e) => vec![Err(e)],
                })
            })
            .boxed()
    }

    fn fetch_optional<'q>(
        &'q mut self,
        query: &'q str,
        persistent: bool,
        arguments: Option<AnyArguments<'q>>,
    ) -> BoxFuture<'q, Result<Option<AnyRow>, Error>> {
        async move {
            let items = self.run(query, persistent, arguments)?;
            Ok(items.into_iter().find_map(|item| item.right()))
        }
        .boxed()
    }

    fn prepare_with<'c, 'q: 'c>(
        &'c mut self,
        _sql: &'q str,
        _parameters: &[AnyTypeInfo],
    ) -> BoxFuture<'c, Result<AnyStatement<'q>, Error>> {
        futures::future::err(unsupported("prepare")).boxed()
    }

    fn describe<'q>(&'q mut self, _sql: &'q str) -> BoxFuture<'q, Result<Describe<Any>, Error>> {
        futures::future::err(unsupported("describe")).boxed()
    }
}

// The typed side, required by sqlx's `Database` but unused: everything goes through `Any`.

impl Connection for InlineConnection {
    type Database = InlineSqlite;
    type Options = InlineOptions;

    fn close(self) -> BoxFuture<'static, Result<(), Error>> {
        AnyConnectionBackend::close(Box::new(self))
    }

    fn close_hard(self) -> BoxFuture<'static, Result<(), Error>> {
        AnyConnectionBackend::close(Box::new(self))
    }

    fn ping(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        AnyConnectionBackend::ping(self)
    }

    fn begin(&mut self) -> BoxFuture<'_, Result<Transaction<'_, InlineSqlite>, Error>> {
        Transaction::begin(self, None)
    }

    fn shrink_buffers(&mut self) {}

    fn flush(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        futures::future::ok(()).boxed()
    }

    fn should_flush(&self) -> bool {
        false
    }
}

/// Transactions of the typed side; the `Any` side calls the same code.
#[derive(Debug)]
pub struct InlineTransactionManager;

impl TransactionManager for InlineTransactionManager {
    type Database = InlineSqlite;

    fn begin<'conn>(
        conn: &'conn mut InlineConnection,
        statement: Option<Cow<'static, str>>,
    ) -> BoxFuture<'conn, Result<(), Error>> {
        futures::future::ready(InlineConnection::begin(conn, statement)).boxed()
    }

    fn commit(conn: &mut InlineConnection) -> BoxFuture<'_, Result<(), Error>> {
        futures::future::ready(InlineConnection::commit(conn)).boxed()
    }

    fn rollback(conn: &mut InlineConnection) -> BoxFuture<'_, Result<(), Error>> {
        futures::future::ready(InlineConnection::rollback(conn)).boxed()
    }

    fn start_rollback(conn: &mut InlineConnection) {
        AnyConnectionBackend::start_rollback(conn)
    }

    fn get_transaction_depth(conn: &InlineConnection) -> usize {
        conn.depth
    }
}

impl<'c> Executor<'c> for &'c mut InlineConnection {
    type Database = InlineSqlite;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        _query: E,
    ) -> BoxStream<'e, Result<Either<AnyQueryResult, Never>, Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, InlineSqlite>,
    {
        futures::stream::once(async { Err(unsupported("the typed executor (use Any)")) }).boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(self, _query: E) -> BoxFuture<'e, Result<Option<Never>, Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, InlineSqlite>,
    {
        futures::future::err(unsupported("the typed executor (use Any)")).boxed()
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        _sql: &'q str,
        _parameters: &'e [AnyTypeInfo],
    ) -> BoxFuture<'e, Result<Never, Error>>
    where
        'c: 'e,
    {
        futures::future::err(unsupported("prepare")).boxed()
    }

    fn describe<'e, 'q: 'e>(
        self,
        _sql: &'q str,
    ) -> BoxFuture<'e, Result<Describe<InlineSqlite>, Error>>
    where
        'c: 'e,
    {
        futures::future::err(unsupported("describe")).boxed()
    }
}

/// Arguments of the typed side; `Any` passes its own.
#[derive(Debug, Default)]
pub struct NoArguments;

impl<'q> Arguments<'q> for NoArguments {
    type Database = InlineSqlite;

    fn reserve(&mut self, _additional: usize, _size: usize) {}

    fn add<T>(&mut self, _value: T) -> Result<(), BoxDynError>
    where
        T: 'q + Encode<'q, InlineSqlite> + Type<InlineSqlite>,
    {
        Err("the inline SQLite driver is used through Any".into())
    }

    fn len(&self) -> usize {
        0
    }
}

impl<'q> IntoArguments<'q, InlineSqlite> for NoArguments {
    fn into_arguments(self) -> NoArguments {
        self
    }
}

impl Row for Never {
    type Database = InlineSqlite;

    fn columns(&self) -> &[Never] {
        match *self {}
    }

    fn try_get_raw<I>(&self, _index: I) -> Result<Never, Error>
    where
        I: ColumnIndex<Self>,
    {
        match *self {}
    }
}

impl ColumnIndex<Never> for usize {
    fn index(&self, container: &Never) -> Result<usize, Error> {
        match *container {}
    }
}

impl ColumnIndex<Never> for &'_ str {
    fn index(&self, container: &Never) -> Result<usize, Error> {
        match *container {}
    }
}

impl Column for Never {
    type Database = InlineSqlite;

    fn ordinal(&self) -> usize {
        match *self {}
    }

    fn name(&self) -> &str {
        match *self {}
    }

    fn type_info(&self) -> &AnyTypeInfo {
        match *self {}
    }
}

impl Value for Never {
    type Database = InlineSqlite;

    fn as_ref(&self) -> Never {
        match *self {}
    }

    fn type_info(&self) -> Cow<'_, AnyTypeInfo> {
        match *self {}
    }

    fn is_null(&self) -> bool {
        match *self {}
    }
}

impl<'r> ValueRef<'r> for Never {
    type Database = InlineSqlite;

    fn to_owned(&self) -> Never {
        match *self {}
    }

    fn type_info(&self) -> Cow<'_, AnyTypeInfo> {
        match *self {}
    }

    fn is_null(&self) -> bool {
        match *self {}
    }
}

impl<'q> Statement<'q> for Never {
    type Database = InlineSqlite;

    fn to_owned(&self) -> Never {
        match *self {}
    }

    fn sql(&self) -> &str {
        match *self {}
    }

    fn parameters(&self) -> Option<Either<&[AnyTypeInfo], usize>> {
        match *self {}
    }

    fn columns(&self) -> &[Never] {
        match *self {}
    }

    fn query(&self) -> Query<'_, InlineSqlite, NoArguments> {
        match *self {}
    }

    fn query_with<'s, A>(&'s self, _arguments: A) -> Query<'s, InlineSqlite, A>
    where
        A: IntoArguments<'s, InlineSqlite>,
    {
        match *self {}
    }

    fn query_as<O>(&self) -> QueryAs<'_, InlineSqlite, O, NoArguments>
    where
        O: for<'r> FromRow<'r, Never>,
    {
        match *self {}
    }

    fn query_as_with<'s, O, A>(&'s self, _arguments: A) -> QueryAs<'s, InlineSqlite, O, A>
    where
        O: for<'r> FromRow<'r, Never>,
        A: IntoArguments<'s, InlineSqlite>,
    {
        match *self {}
    }

    fn query_scalar<O>(&self) -> QueryScalar<'_, InlineSqlite, O, NoArguments>
    where
        (O,): for<'r> FromRow<'r, Never>,
    {
        match *self {}
    }

    fn query_scalar_with<'s, O, A>(&'s self, _arguments: A) -> QueryScalar<'s, InlineSqlite, O, A>
    where
        (O,): for<'r> FromRow<'r, Never>,
        A: IntoArguments<'s, InlineSqlite>,
    {
        match *self {}
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use futures::FutureExt;
    use sqlx::{Connection, Row};

    use crate::db::{Backend, Database};
    use crate::testing::TestDb;

    async fn db() -> (TestDb, Database) {
        let testdb = TestDb::new(Backend::Sqlite).await;
        let db = testdb.connect().await;
        sqlx::raw_sql(
            "CREATE TABLE t (k TEXT PRIMARY KEY, n BIGINT NOT NULL, r DOUBLE PRECISION, b BLOB)",
        )
        .execute(db.writer())
        .await
        .expect("ddl");
        (testdb, db)
    }

    #[tokio::test]
    async fn a_statement_completes_without_waiting_for_another_thread() {
        let (_t, db) = db().await;
        let mut conn = db.writer().acquire().await.expect("acquire");
        // Ready on the first poll: nothing was handed to a connection thread to answer later.
        let row = sqlx::query("SELECT 40 + $1")
            .bind(2i64)
            .fetch_one(&mut *conn)
            .now_or_never()
            .expect("answered on the calling thread")
            .expect("query");
        assert_eq!(row.get::<i64, _>(0), 42);
        let mut tx = conn.begin().now_or_never().expect("inline").expect("begin");
        sqlx::query("INSERT INTO t (k, n) VALUES ('a', 1)")
            .execute(&mut *tx)
            .now_or_never()
            .expect("inline")
            .expect("insert");
        tx.commit().now_or_never().expect("inline").expect("commit");
    }

    #[tokio::test]
    async fn a_kept_statement_binds_the_same_way_every_time() {
        let (_t, db) = db().await;
        let mut conn = db.writer().acquire().await.expect("acquire");
        // Out of order and repeated: the second run binds from the remembered mapping.
        for (a, b) in [(1i64, 2i64), (10, 20)] {
            let row = sqlx::query("SELECT $2, $1, $2 * 100")
                .bind(a)
                .bind(b)
                .fetch_one(&mut *conn)
                .await
                .expect("numbered");
            assert_eq!(
                (
                    row.get::<i64, _>(0),
                    row.get::<i64, _>(1),
                    row.get::<i64, _>(2)
                ),
                (b, a, b * 100)
            );
            let row = sqlx::query("SELECT ?, ?")
                .bind(a)
                .bind(b)
                .fetch_one(&mut *conn)
                .await
                .expect("anonymous");
            assert_eq!((row.get::<i64, _>(0), row.get::<i64, _>(1)), (a, b));
        }
        // Too few arguments for a kept statement is still refused.
        let short = sqlx::query("SELECT $2, $1, $2 * 100")
            .bind(1i64)
            .fetch_one(&mut *conn)
            .await;
        assert!(short.is_err(), "a missing argument must be refused");
    }

    #[tokio::test]
    async fn values_round_trip_with_their_types() {
        let (_t, db) = db().await;
        sqlx::query("INSERT INTO t (k, n, r, b) VALUES ($1, $2, $3, $4), ($5, $6, NULL, NULL)")
            .bind("a")
            .bind(i64::MAX)
            .bind(1.5f64)
            .bind(vec![0u8, 255])
            .bind("b")
            .bind(-7i32)
            .execute(db.writer())
            .await
            .expect("insert");
        let rows = sqlx::query("SELECT k, n, r, b FROM t ORDER BY k")
            .fetch_all(db.pool())
            .await
            .expect("select");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].get::<String, _>("k"), "a");
        assert_eq!(rows[0].get::<i64, _>("n"), i64::MAX);
        assert_eq!(rows[0].get::<f64, _>("r"), 1.5);
        assert_eq!(rows[0].get::<Vec<u8>, _>("b"), vec![0u8, 255]);
        assert_eq!(rows[1].get::<i32, _>(1), -7);
        assert_eq!(rows[1].get::<Option<f64>, _>(2), None);
        assert_eq!(rows[1].get::<Option<Vec<u8>>, _>(3), None);
        // A type the column does not hold is an error, not a wrong value.
        assert!(rows[0].try_get::<String, _>("n").is_err());
    }

    #[tokio::test]
    async fn several_statements_share_the_numbered_parameters() {
        let (_t, db) = db().await;
        let done = sqlx::query(
            "INSERT INTO t (k, n) VALUES ($1, $2); UPDATE t SET n = n + $3 WHERE k = $1; \
             INSERT INTO t (k, n) VALUES ($4, $3);",
        )
        .bind("a")
        .bind(1i64)
        .bind(10i64)
        .bind("b")
        .execute(db.writer())
        .await
        .expect("statements");
        assert_eq!(done.rows_affected(), 3, "each statement's count, summed");
        let rows = sqlx::query("SELECT k, n FROM t ORDER BY k")
            .fetch_all(db.pool())
            .await
            .expect("select");
        let got: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(got, vec![("a".to_owned(), 11), ("b".to_owned(), 10)]);
        // A parameter with no argument is refused before anything runs.
        let err = sqlx::query("INSERT INTO t (k, n) VALUES ($1, $2)")
            .bind("c")
            .execute(db.writer())
            .await
            .expect_err("missing argument");
        assert!(err.to_string().contains("parameter 2"), "{err}");
        assert_eq!(count(&db).await, 2);
    }

    #[tokio::test]
    async fn constraint_errors_keep_their_kind_and_code() {
        let (_t, db) = db().await;
        sqlx::query("INSERT INTO t (k, n) VALUES ('a', 1)")
            .execute(db.writer())
            .await
            .expect("first");
        let err = sqlx::query("INSERT INTO t (k, n) VALUES ('a', 2)")
            .execute(db.writer())
            .await
            .expect_err("duplicate key");
        let db_err = err.as_database_error().expect("a database error");
        assert!(db_err.is_unique_violation());
        assert_eq!(
            db_err.code().as_deref(),
            Some("1555"),
            "SQLITE_CONSTRAINT_PRIMARYKEY"
        );
        let err = sqlx::query("INSERT INTO t (k) VALUES ('z')")
            .execute(db.writer())
            .await
            .expect_err("not null");
        assert_eq!(
            err.as_database_error().map(|e| e.kind()),
            Some(sqlx::error::ErrorKind::NotNullViolation)
        );
    }

    #[tokio::test]
    async fn transactions_savepoints_and_dropped_transactions_roll_back() {
        let (_t, db) = db().await;
        let mut tx = db.begin().await.expect("begin");
        sqlx::query("INSERT INTO t (k, n) VALUES ('kept', 1)")
            .execute(&mut *tx)
            .await
            .expect("insert");
        {
            let mut sp = tx.begin().await.expect("savepoint");
            sqlx::query("INSERT INTO t (k, n) VALUES ('undone', 1)")
                .execute(&mut *sp)
                .await
                .expect("insert in savepoint");
            sp.rollback().await.expect("rollback to savepoint");
        }
        {
            let mut sp = tx.begin().await.expect("savepoint");
            sqlx::query("INSERT INTO t (k, n) VALUES ('released', 1)")
                .execute(&mut *sp)
                .await
                .expect("insert in savepoint");
            sp.commit().await.expect("release");
        }
        tx.commit().await.expect("commit");
        {
            let mut dropped = db.begin().await.expect("begin");
            sqlx::query("INSERT INTO t (k, n) VALUES ('dropped', 1)")
                .execute(&mut *dropped)
                .await
                .expect("insert");
        }
        // The single writer connection is usable again at once: the dropped one was rolled back.
        let mut next = db.begin().await.expect("begin after a dropped transaction");
        sqlx::query("INSERT INTO t (k, n) VALUES ('next', 1)")
            .execute(&mut *next)
            .await
            .expect("insert");
        next.commit().await.expect("commit");
        let keys: Vec<String> = sqlx::query("SELECT k FROM t ORDER BY k")
            .fetch_all(db.pool())
            .await
            .expect("select")
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(keys, vec!["kept", "next", "released"]);
    }

    async fn count(db: &Database) -> i64 {
        sqlx::query("SELECT COUNT(*) FROM t")
            .fetch_one(db.pool())
            .await
            .expect("count")
            .get(0)
    }
}
