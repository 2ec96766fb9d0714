//! Inserts that can wait until their transaction is about to commit, and then go out together: one
//! multi-row `INSERT` per statement shape.
//!
//! The outbox and read-model rows of a consumer batch (one or two per event) are most of a batch's
//! statements; each is a network round trip on Postgres and a parse and a B-tree descent on
//! SQLite. Nothing reads them back inside the transaction, so they may wait.
//!
//! [`Together`] collects writes whose results nobody reads, a handler's statements and its rows.
//!
//! [`insert`] defers a row when it runs inside [`gather`] (the consumer runner gathers each
//! handler's rows and flushes them before its commit) and writes it at once anywhere else, so a
//! handler is written the same either way.

use std::cell::RefCell;
use std::future::Future;

use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, AnyConnection};

/// Bind parameters per flushed statement, below SQLite's (32,766) and Postgres' (65,535) limits.
const MAX_PARAMS: usize = 30_000;

/// Rows per flush up to which the flushed SQL is kept prepared on Postgres; larger ones vary too
/// much to be worth a slot in the connection's statement cache.
const PREPARED_UP_TO_ROWS: usize = 4;

/// Rows per statement on SQLite, largest first. A statement of n rows costs SQLite a parse in
/// proportion to n unless it is kept prepared, and every n is a statement of its own: so n rows
/// go out as statements of these sizes only (37 = 16 + 16 + 4 + 1), each kept prepared, and
/// nothing is parsed twice. On SQLite a statement is a call, not a round trip.
const SQLITE_ROWS: [usize; 4] = [64, 16, 4, 1];

/// How `n` rows (or ids) are cut into SQLite statements, largest first: sizes from a fixed
/// ladder, so each size's SQL stays prepared (see [`SQLITE_ROWS`]); `at_most` bounds a statement
/// (the parameter limit).
pub fn sqlite_chunks(n: usize, at_most: usize) -> impl Iterator<Item = usize> {
    let at_most = at_most.max(1);
    let mut left = n;
    std::iter::from_fn(move || {
        let size = SQLITE_ROWS
            .iter()
            .map(|s| (*s).min(at_most))
            .find(|s| *s <= left)?;
        left -= size;
        Some(size)
    })
}

tokio::task_local! {
    static PENDING: RefCell<Pending>;
}

/// The fixed parts of an insert: `INSERT INTO t (a, b, c)`, its column count, and what follows
/// the values (an `ON CONFLICT` clause, or nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// `INSERT INTO table (columns…)`.
    pub head: &'static str,
    /// Number of columns (values per row).
    pub columns: usize,
    /// After `VALUES (…), (…)`: e.g. ` ON CONFLICT (…) DO NOTHING`, or `""`.
    pub tail: &'static str,
}

/// One bound value of a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// An integer.
    Int(i64),
    /// An integer or NULL.
    OptInt(Option<i64>),
    /// Text.
    Text(String),
    /// Text or NULL.
    OptText(Option<String>),
    /// A blob (on Postgres `bytea`).
    Bytes(Vec<u8>),
    /// The time the row is written (microseconds since the epoch): for a deferred row, when its
    /// batch is flushed just before the commit, not when it was gathered.
    Now,
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<Option<i64>> for Value {
    fn from(v: Option<i64>) -> Self {
        Value::OptInt(v)
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}
impl From<Option<String>> for Value {
    fn from(v: Option<String>) -> Self {
        Value::OptText(v)
    }
}
impl From<Option<&str>> for Value {
    fn from(v: Option<&str>) -> Self {
        Value::OptText(v.map(str::to_owned))
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Bytes(v)
    }
}

fn bind<'q>(q: Query<'q, Any, AnyArguments<'q>>, v: Value) -> Query<'q, Any, AnyArguments<'q>> {
    match v {
        Value::Int(v) => q.bind(v),
        Value::OptInt(v) => q.bind(v),
        Value::Text(v) => q.bind(v),
        Value::OptText(v) => q.bind(v),
        Value::Bytes(v) => q.bind(v),
        Value::Now => q.bind(crate::db::now_micros()),
    }
}

/// Rows waiting for their transaction's commit, by shape in the order each shape first came.
#[derive(Debug, Default)]
#[must_use = "flush the rows before the commit, or drop them on rollback"]
pub struct Pending {
    groups: Vec<(Shape, Vec<Vec<Value>>)>,
}

impl Pending {
    fn push(&mut self, shape: Shape, row: Vec<Value>) {
        match self.groups.iter_mut().find(|(s, _)| *s == shape) {
            Some((_, rows)) => rows.push(row),
            None => self.groups.push((shape, vec![row])),
        }
    }

    /// Add `other`'s rows after these.
    pub fn extend(&mut self, other: Pending) {
        for (shape, rows) in other.groups {
            for row in rows {
                self.push(shape, row);
            }
        }
    }

    /// Rows waiting.
    pub fn len(&self) -> usize {
        self.groups.iter().map(|(_, rows)| rows.len()).sum()
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Write the rows in `conn` now — or, inside an enclosing [`gather`], leave them to it. For
    /// code that gathers a few rows of its own to send them together wherever it runs.
    pub async fn write(self, conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
        let mut rows = Some(self);
        let _ = PENDING.try_with(|p| {
            if let Some(r) = rows.take() {
                p.borrow_mut().extend(r);
            }
        });
        match rows {
            Some(rows) => rows.flush(conn).await,
            None => Ok(()),
        }
    }

    /// Write the rows in `conn` (the transaction about to commit): multi-row `INSERT`s per shape,
    /// cut as [`split`] says; [`Value::Now`] is the time of this call.
    pub async fn flush(self, conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
        // SQLite looks each `$N` up in a list while parsing, n²/2 for n parameters; bare `?`s are
        // numbered in order for free. Postgres needs `$N`.
        let sqlite = conn.backend_name() == "SQLite";
        let now = Value::Int(crate::db::now_micros());
        let statements: Vec<_> = self.statements(sqlite).collect();
        for (sql, values, persistent) in combined(statements, sqlite) {
            execute(conn, &sql, persistent, stamped(values, &now)).await?;
        }
        Ok(())
    }

    /// One multi-row `INSERT` per shape and split (see [`split`]): its SQL, its values in order,
    /// and whether to keep it prepared. `sqlite`: `?` parameters and the SQLite sizes.
    fn statements(self, sqlite: bool) -> impl Iterator<Item = (String, Vec<Value>, bool)> {
        self.groups.into_iter().flat_map(move |(shape, rows)| {
            split(shape, rows, sqlite).map(move |rows| {
                let sql = insert_sql(shape, rows.len(), sqlite);
                let persistent = sqlite || rows.len() <= PREPARED_UP_TO_ROWS;
                (sql, rows.into_iter().flatten().collect(), persistent)
            })
        })
    }
}

/// `values` with each [`Value::Now`] made `now` (the flush's time).
fn stamped(mut values: Vec<Value>, now: &Value) -> Vec<Value> {
    for v in values.iter_mut().filter(|v| matches!(v, Value::Now)) {
        *v = now.clone();
    }
    values
}

/// `rows` of `shape`, in order, split into one statement's rows each, as [`Pending::flush`] and
/// [`Together::rows`] write them: on Postgres as many as fit under [`MAX_PARAMS`] (at least one),
/// a round trip each; on SQLite the sizes of [`sqlite_chunks`].
fn split(
    shape: Shape,
    rows: Vec<Vec<Value>>,
    sqlite: bool,
) -> impl Iterator<Item = Vec<Vec<Value>>> {
    let per = (MAX_PARAMS / shape.columns.max(1)).max(1);
    let mut sizes = sqlite.then(|| sqlite_chunks(rows.len(), per));
    let mut rows = rows.into_iter().peekable();
    std::iter::from_fn(move || {
        rows.peek()?;
        let take = match sizes.as_mut() {
            Some(sizes) => sizes.next().unwrap_or(per),
            None => per,
        };
        Some(rows.by_ref().take(take).collect())
    })
}

/// `INSERT … VALUES (…), (…) …` for `rows` rows of `shape`: parameters `?` (`anonymous`) or
/// `$1`, `$2`, ….
fn insert_sql(shape: Shape, rows: usize, anonymous: bool) -> String {
    let mut sql = String::with_capacity(shape.head.len() + rows * shape.columns * 5 + 16);
    sql.push_str(shape.head);
    sql.push_str(" VALUES ");
    let mut n = 0;
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..shape.columns {
            n += 1;
            if c > 0 {
                sql.push_str(", ");
            }
            if anonymous {
                sql.push('?');
            } else {
                sql.push('$');
                sql.push_str(&n.to_string());
            }
        }
        sql.push(')');
    }
    sql.push_str(shape.tail);
    sql
}

/// Statements run one after another, each `(sql, values, keep prepared)`, as few statements to
/// run with the same effect: on Postgres, where each statement is a round trip, consecutive plain
/// `INSERT`/`UPDATE`/`DELETE`s become one — all but the last as data-modifying `WITH` parts, their
/// `$N`s renumbered — as long as no table is named by two of them. Parts of one statement run on
/// one snapshot, in no set order, and do not see each other's changes; statements naming
/// different tables cannot tell, except by the order they take row locks in: callers combine
/// only writes to rows their transaction locked already, or new rows. On SQLite (a call, not a
/// round trip) nothing changes.
fn combined(
    statements: Vec<(String, Vec<Value>, bool)>,
    sqlite: bool,
) -> Vec<(String, Vec<Value>, bool)> {
    if sqlite || statements.len() < 2 {
        return statements;
    }
    let mut out = Vec::new();
    let mut group: Vec<(String, Vec<Value>, bool)> = Vec::new();
    let mut named: Vec<String> = Vec::new();
    let mut values = 0;
    for statement in statements {
        let Some(tables) = tables(&statement.0) else {
            // Not plain enough to be a part: on its own, between groups.
            if !group.is_empty() {
                out.push(as_one(std::mem::take(&mut group)));
                named.clear();
                values = 0;
            }
            out.push(statement);
            continue;
        };
        let clash = tables.iter().any(|t| named.contains(t));
        if !group.is_empty() && (clash || values + statement.1.len() > MAX_PARAMS) {
            out.push(as_one(std::mem::take(&mut group)));
            named.clear();
            values = 0;
        }
        values += statement.1.len();
        named.extend(tables);
        group.push(statement);
    }
    if !group.is_empty() {
        out.push(as_one(group));
    }
    out
}

/// `statements` as one: `WITH w0 AS (first), w1 AS (second) last`.
fn as_one(mut statements: Vec<(String, Vec<Value>, bool)>) -> (String, Vec<Value>, bool) {
    if statements.len() == 1 {
        return statements.pop().expect("one");
    }
    let last = statements.len() - 1;
    let mut sql = String::from("WITH ");
    let mut values = Vec::new();
    let mut persistent = true;
    for (i, (part, vals, keep)) in statements.into_iter().enumerate() {
        let part = renumber(&part, values.len());
        if i == last {
            sql.push(' ');
            sql.push_str(&part);
        } else {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("w{i} AS ({part})"));
        }
        values.extend(vals);
        persistent &= keep;
    }
    (sql, values, persistent)
}

/// `sql` with each `$N` outside quotes made `$(N + by)`.
fn renumber(sql: &str, by: usize) -> String {
    if by == 0 {
        return sql.to_owned();
    }
    let mut out = String::with_capacity(sql.len() + 16);
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '$') => {
                let mut n = String::new();
                while let Some(d) = chars.next_if(char::is_ascii_digit) {
                    n.push(d);
                }
                match n.parse::<usize>() {
                    Ok(n) => out.push_str(&(n + by).to_string()),
                    Err(_) => out.push_str(&n),
                }
            }
            (None, _) => {}
        }
    }
    out
}

/// The tables a plain `INSERT`, `UPDATE` or `DELETE` names (after `INTO`, `UPDATE`, `FROM` or
/// `JOIN`), lower-cased; `None` for anything else or anything this reading could get wrong
/// (comments, dollar quotes, quoted identifiers, `ONLY`, `USING`, `LATERAL`, lists of tables, a
/// leading `WITH`, several statements), which then goes out on its own.
fn tables(sql: &str) -> Option<Vec<String>> {
    const NOT_NAMES: [&str; 5] = ["set", "select", "skip", "nowait", "of"];
    const UNSURE: [&str; 3] = ["only", "using", "lateral"];
    if ["--", "/*", "$$", "\"", ";", "\\"]
        .iter()
        .any(|t| sql.contains(t))
    {
        return None;
    }
    // Words and the punctuation that matters here, outside quoted text.
    let mut tokens: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in sql.chars() {
        let in_word = !quoted && (c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if in_word {
            word.push(c.to_ascii_lowercase());
            continue;
        }
        if !word.is_empty() {
            tokens.push(std::mem::take(&mut word));
        }
        if c == '\'' {
            quoted = !quoted;
        } else if !quoted && c == ',' {
            tokens.push(",".to_owned());
        }
    }
    if !word.is_empty() {
        tokens.push(word);
    }
    if !matches!(
        tokens.first().map(String::as_str),
        Some("insert" | "update" | "delete")
    ) || tokens.iter().any(|t| UNSURE.contains(&t.as_str()))
    {
        return None;
    }
    let mut names = Vec::new();
    for (i, pair) in tokens.windows(2).enumerate() {
        if matches!(pair[0].as_str(), "into" | "update" | "from" | "join")
            && !NOT_NAMES.contains(&pair[1].as_str())
        {
            // `FROM a, b` (or `FROM a x, b`): more tables than this reading follows.
            let list = tokens[i + 2..].iter().take(2).any(|t| t == ",");
            if pair[0] == "from" && list {
                return None;
            }
            names.push(pair[1].clone());
        }
    }
    Some(names)
}

/// One statement, its values bound in order.
async fn execute(
    conn: &mut AnyConnection,
    sql: &str,
    persistent: bool,
    values: Vec<Value>,
) -> Result<(), sqlx::Error> {
    let mut q = sqlx::query(sql).persistent(persistent);
    for v in values {
        q = bind(q, v);
    }
    q.execute(conn).await?;
    Ok(())
}

/// Writes whose results nobody reads, collected to run one after another in the order given
/// (statements a handler builds, then the rows it gathered).
#[derive(Debug, Default)]
#[must_use = "execute the statements"]
pub struct Together {
    /// Each statement and its values, or rows to insert (cut into statements by backend).
    items: Vec<Item>,
}

#[derive(Debug)]
enum Item {
    Statement(String, Vec<Value>),
    Rows(Pending),
}

impl Together {
    /// Add a statement and its values.
    pub fn push(&mut self, sql: impl Into<String>, values: Vec<Value>) {
        self.items.push(Item::Statement(sql.into(), values));
    }

    /// Add rows gathered with [`gather`], one multi-row `INSERT` per shape (as
    /// [`Pending::flush`] cuts them), after the statements so far.
    pub fn rows(&mut self, pending: Pending) {
        self.items.push(Item::Rows(pending));
    }

    /// Run the statements in `conn`, with the effect of running them in order: on Postgres as few
    /// statements as [`combined`] allows, so every row they update must be locked already by
    /// this transaction (or be new).
    pub async fn execute(self, conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
        let sqlite = conn.backend_name() == "SQLite";
        if sqlite {
            for item in self.items {
                match item {
                    Item::Statement(sql, values) => execute(&mut *conn, &sql, true, values).await?,
                    Item::Rows(rows) => rows.flush(&mut *conn).await?,
                }
            }
            return Ok(());
        }
        let now = Value::Int(crate::db::now_micros());
        let mut statements = Vec::new();
        for item in self.items {
            match item {
                Item::Statement(sql, values) => statements.push((sql, values, true)),
                Item::Rows(rows) => statements.extend(
                    rows.statements(false)
                        .map(|(sql, values, keep)| (sql, stamped(values, &now), keep)),
                ),
            }
        }
        for (sql, values, persistent) in combined(statements, false) {
            execute(&mut *conn, &sql, persistent, values).await?;
        }
        Ok(())
    }
}

/// Insert `row` (its values in the shape's column order): deferred to the end of the enclosing
/// [`gather`], else now, in `conn`.
pub async fn insert(
    conn: &mut AnyConnection,
    shape: Shape,
    row: Vec<Value>,
) -> Result<(), sqlx::Error> {
    debug_assert_eq!(row.len(), shape.columns, "{}", shape.head);
    let mut row = Some(row);
    let _ = PENDING.try_with(|p| {
        if let Some(r) = row.take() {
            p.borrow_mut().push(shape, r);
        }
    });
    match row {
        Some(row) => {
            let mut pending = Pending::default();
            pending.push(shape, row);
            pending.flush(conn).await
        }
        None => Ok(()),
    }
}

/// Whether this runs inside a [`gather`]: rows [`insert`]ed here wait for its flush.
pub fn gathering() -> bool {
    PENDING.try_with(|_| ()).is_ok()
}

/// Run `work`, gathering the rows it [`insert`]s instead of writing them; the caller flushes them
/// in the same transaction before committing.
pub async fn gather<F: Future>(work: F) -> (F::Output, Pending) {
    PENDING
        .scope(RefCell::new(Pending::default()), async move {
            let out = work.await;
            let pending = PENDING.with(|p| p.take());
            (out, pending)
        })
        .await
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use crate::db::{Backend, Database};
    use crate::testing::TestDb;
    use sqlx::Row;

    const SHAPE: Shape = Shape {
        head: "INSERT INTO t (k, n, s, b)",
        columns: 4,
        tail: " ON CONFLICT (k) DO NOTHING",
    };
    const OTHER: Shape = Shape {
        head: "INSERT INTO u (k)",
        columns: 1,
        tail: "",
    };

    fn row(k: &str, n: i64) -> Vec<Value> {
        vec![
            k.into(),
            Some(n).into(),
            (n % 2 == 0).then(|| format!("s{n}")).into(),
            vec![n as u8].into(),
        ]
    }

    async fn db(backend: Backend) -> (TestDb, Database) {
        let testdb = TestDb::new(backend).await;
        let db = testdb.connect().await;
        let blob = match backend {
            Backend::Sqlite => "BLOB",
            Backend::Postgres => "BYTEA",
        };
        for ddl in [
            format!("CREATE TABLE t (k TEXT PRIMARY KEY, n BIGINT, s TEXT, b {blob})"),
            "CREATE TABLE u (k TEXT NOT NULL)".to_owned(),
        ] {
            sqlx::query(&ddl).execute(db.pool()).await.expect("ddl");
        }
        (testdb, db)
    }

    async fn count(db: &Database, table: &str) -> i64 {
        sqlx::query(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(db.pool())
            .await
            .expect("count")
            .get(0)
    }

    async fn gathered_rows_wait_for_the_flush_and_all_arrive(backend: Backend) {
        let (_testdb, db) = db(backend).await;
        let mut tx = db.begin().await.expect("begin");
        let ((), pending) = gather(async {
            for n in 0..5 {
                insert(&mut tx, SHAPE, row(&format!("k{n}"), n))
                    .await
                    .expect("insert");
                insert(&mut tx, OTHER, vec![format!("u{n}").into()])
                    .await
                    .expect("insert");
            }
            // A conflicting row is dropped by the tail, as it would be one at a time.
            insert(&mut tx, SHAPE, row("k0", 99)).await.expect("insert");
        })
        .await;
        let seen: i64 = sqlx::query("SELECT COUNT(*) FROM t")
            .fetch_one(&mut *tx)
            .await
            .expect("count")
            .get(0);
        assert_eq!(seen, 0, "nothing written before the flush");
        assert_eq!(pending.len(), 11);
        pending.flush(&mut tx).await.expect("flush");
        tx.commit().await.expect("commit");
        let rows = sqlx::query("SELECT k, n, s, b FROM t ORDER BY k")
            .fetch_all(db.pool())
            .await
            .expect("rows");
        assert_eq!(rows.len(), 5);
        assert_eq!(rows[0].get::<String, _>(0), "k0");
        assert_eq!(rows[0].get::<i64, _>(1), 0, "the first k0 wins");
        assert_eq!(rows[0].get::<Option<String>, _>(2).as_deref(), Some("s0"));
        assert_eq!(rows[1].get::<Option<String>, _>(2), None);
        assert_eq!(rows[4].get::<Vec<u8>, _>(3), vec![4u8]);
        assert_eq!(count(&db, "u").await, 5);
    }

    async fn rolled_back_rows_are_never_written(backend: Backend) {
        let (_testdb, db) = db(backend).await;
        let mut tx = db.begin().await.expect("begin");
        let ((), pending) = gather(async {
            insert(&mut tx, OTHER, vec!["gone".into()])
                .await
                .expect("insert");
        })
        .await;
        drop(pending);
        tx.rollback().await.expect("rollback");
        // Outside `gather` a row is written at once.
        let mut conn = db.pool().acquire().await.expect("conn");
        insert(&mut conn, SHAPE, row("a", 1)).await.expect("insert");
        assert_eq!(count(&db, "t").await, 1);
        assert_eq!(count(&db, "u").await, 0);
    }

    async fn rows_written_inside_a_gather_wait_for_it(backend: Backend) {
        let (_testdb, db) = db(backend).await;
        let mut tx = db.begin().await.expect("begin");
        let ((), outer) = gather(async {
            let ((), inner) = gather(async {
                insert(&mut tx, OTHER, vec!["inner".into()])
                    .await
                    .expect("insert");
            })
            .await;
            inner.write(&mut tx).await.expect("write");
        })
        .await;
        assert_eq!(outer.len(), 1, "left to the outer gather");
        outer.write(&mut tx).await.expect("write");
        tx.commit().await.expect("commit");
        assert_eq!(count(&db, "u").await, 1);
    }

    #[test]
    fn gathered_rows_become_statements_under_the_parameter_limit_in_order() {
        let per = MAX_PARAMS / SHAPE.columns;
        let mut pending = Pending::default();
        for n in 0..per + 2 {
            pending.push(SHAPE, row(&format!("k{n}"), n as i64));
        }
        pending.push(OTHER, vec!["u".into()]);
        let statements: Vec<_> = pending.statements(false).collect();
        let shapes: Vec<(usize, &str)> = statements
            .iter()
            .map(|(sql, values, _)| (values.len(), &sql[..sql.find(" VALUES").expect("values")]))
            .collect();
        assert_eq!(
            shapes,
            [(per * 4, SHAPE.head), (2 * 4, SHAPE.head), (1, OTHER.head)]
        );
        assert_eq!(statements[1].0, insert_sql(SHAPE, 2, false));
        assert_eq!(
            statements[1].0,
            "INSERT INTO t (k, n, s, b) VALUES ($1, $2, $3, $4), ($5, $6, $7, $8) \
             ON CONFLICT (k) DO NOTHING"
        );
        assert_eq!(
            statements[1].1[..4],
            row(&format!("k{per}"), per as i64)[..]
        );
        assert_eq!(statements[2].1, vec![Value::from("u")]);
        // Only the first and the small one kept prepared.
        let kept: Vec<bool> = statements.iter().map(|s| s.2).collect();
        assert_eq!(kept, [false, true, true]);
    }

    #[test]
    fn on_sqlite_rows_go_out_in_a_few_fixed_sizes_all_kept_prepared() {
        let sizes = |n, at_most| sqlite_chunks(n, at_most).collect::<Vec<_>>();
        assert_eq!(sizes(0, 100), Vec::<usize>::new());
        assert_eq!(sizes(1, 100), [1]);
        assert_eq!(sizes(37, 100), [16, 16, 4, 1]);
        assert_eq!(sizes(130, 100), [64, 64, 1, 1]);
        // Never more than the parameter limit allows.
        assert_eq!(sizes(20, 10), [10, 10]);
        let mut pending = Pending::default();
        for n in 0..21 {
            pending.push(SHAPE, row(&format!("k{n}"), n));
        }
        pending.push(OTHER, vec!["u".into()]);
        let statements: Vec<_> = pending.statements(true).collect();
        let rows: Vec<usize> = statements.iter().map(|s| s.1.len() / 4).collect();
        assert_eq!(rows, [16, 4, 1, 0]);
        assert!(statements.iter().all(|s| s.2), "all kept prepared");
        assert_eq!(statements[2].0, insert_sql(SHAPE, 1, true));
        assert_eq!(
            statements[2].0,
            "INSERT INTO t (k, n, s, b) VALUES (?, ?, ?, ?) ON CONFLICT (k) DO NOTHING"
        );
        assert_eq!(statements[1].1[..4], row("k16", 16)[..]);
        assert_eq!(statements[3].1, vec![Value::from("u")]);
    }

    async fn statements_together_run_in_order_with_their_own_values(backend: Backend) {
        let (_testdb, db) = db(backend).await;
        let mut tx = db.begin().await.expect("begin");
        let mut together = Together::default();
        together.push(
            "INSERT INTO t (k, n) VALUES ($1, $2)",
            vec!["a".into(), 1i64.into()],
        );
        together.push(
            "UPDATE t SET n = n + $1, s = $2 WHERE k = $3",
            vec![10i64.into(), "ten".into(), "a".into()],
        );
        together.push("INSERT INTO u (k) VALUES ($1)", vec!["b".into()]);
        together.execute(&mut tx).await.expect("together");
        tx.commit().await.expect("commit");
        let row = sqlx::query("SELECT n, s FROM t WHERE k = 'a'")
            .fetch_one(db.pool())
            .await
            .expect("row");
        assert_eq!(row.get::<i64, _>(0), 11);
        assert_eq!(row.get::<String, _>(1), "ten");
        assert_eq!(count(&db, "u").await, 1);
        // A failing statement fails the call.
        let mut tx = db.begin().await.expect("begin");
        let mut together = Together::default();
        together.push("INSERT INTO u (k) VALUES ($1)", vec!["c".into()]);
        together.push(
            "INSERT INTO t (k, n) VALUES ($1, $2)",
            vec!["a".into(), 2i64.into()],
        );
        assert!(together.execute(&mut tx).await.is_err(), "duplicate key");
        tx.rollback().await.expect("rollback");
        assert_eq!(count(&db, "u").await, 1);
        // A statement that reads a table an earlier one wrote sees that write (on Postgres the
        // two are not made one, whose parts would share a snapshot), and rows come after.
        let mut tx = db.begin().await.expect("begin");
        let mut together = Together::default();
        together.push("INSERT INTO u (k) VALUES ($1)", vec!["d".into()]);
        together.push(
            "UPDATE t SET n = (SELECT COUNT(*) FROM u) * $1 WHERE k = $2",
            vec![100i64.into(), "a".into()],
        );
        let ((), rows) = gather(async {
            insert(&mut tx, SHAPE, self::row("e", 5))
                .await
                .expect("insert");
        })
        .await;
        together.rows(rows);
        together.execute(&mut tx).await.expect("together");
        tx.commit().await.expect("commit");
        let n: i64 = sqlx::query("SELECT n FROM t WHERE k = 'a'")
            .fetch_one(db.pool())
            .await
            .expect("row")
            .get(0);
        assert_eq!(n, 200, "the count saw the insert before it");
        assert_eq!(count(&db, "t").await, 2);
    }

    #[test]
    fn on_postgres_statements_naming_other_tables_go_out_as_one() {
        let statements = vec![
            (
                "INSERT INTO t (k, s) VALUES ($1, '$1 stays')".to_owned(),
                vec![Value::from("a")],
                true,
            ),
            (
                "UPDATE u SET k = $1 WHERE k = $2".to_owned(),
                vec![Value::from("b"), Value::from("c")],
                true,
            ),
            (
                "INSERT INTO v (k) VALUES ($1) ON CONFLICT (k) DO UPDATE SET k = excluded.k"
                    .to_owned(),
                vec![Value::from("d")],
                false,
            ),
            (
                "UPDATE t SET n = $1 WHERE k = $2".to_owned(),
                vec![Value::from(1i64), Value::from("a")],
                true,
            ),
        ];
        assert_eq!(combined(statements.clone(), true), statements, "SQLite");
        let out = combined(statements.clone(), false);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(
            out[0].0,
            "WITH w0 AS (INSERT INTO t (k, s) VALUES ($1, '$1 stays')), \
             w1 AS (UPDATE u SET k = $2 WHERE k = $3) \
             INSERT INTO v (k) VALUES ($4) ON CONFLICT (k) DO UPDATE SET k = excluded.k"
        );
        assert_eq!(
            out[0].1,
            vec![
                Value::from("a"),
                Value::from("b"),
                Value::from("c"),
                Value::from("d")
            ]
        );
        assert!(!out[0].2, "kept prepared only if every part was");
        assert_eq!(out[1], statements[3], "t again: a statement of its own");
        let some = |sql: &str| tables(sql).unwrap_or_else(|| panic!("{sql}"));
        assert_eq!(
            some("UPDATE x SET a = 1 WHERE b IN (SELECT c FROM y JOIN z ON true FOR UPDATE SKIP LOCKED)"),
            ["x", "y", "z"]
        );
        assert_eq!(
            some("INSERT INTO v (k) VALUES ('it''s from w') ON CONFLICT (k) DO UPDATE SET k = excluded.k"),
            ["v"]
        );
        assert_eq!(some("DELETE FROM t WHERE k = $1"), ["t"]);
        for unsure in [
            "SELECT a FROM x",
            "WITH a AS (DELETE FROM x) DELETE FROM y",
            "UPDATE ONLY x SET a = 1",
            "DELETE FROM x USING y WHERE x.a = y.a",
            "UPDATE x SET a = 1 FROM y, z",
            "UPDATE x SET a = 1 FROM y q, z",
            "INSERT INTO \"X\" (k) VALUES ($1)",
            "INSERT INTO x (k) VALUES ($1) -- it's",
            "UPDATE x SET a = 1; UPDATE y SET a = 1",
        ] {
            assert_eq!(tables(unsure), None, "{unsure}");
        }
        // Such a statement goes out alone, between the groups around it.
        let alone = vec![
            (
                "UPDATE x SET a = $1".to_owned(),
                vec![Value::from(1i64)],
                true,
            ),
            (
                "UPDATE ONLY y SET a = $1".to_owned(),
                vec![Value::from(2i64)],
                true,
            ),
            (
                "UPDATE z SET a = $1".to_owned(),
                vec![Value::from(3i64)],
                true,
            ),
        ];
        assert_eq!(combined(alone.clone(), false), alone);
    }

    #[tokio::test]
    async fn sqlite_statements_together_run_in_order_with_their_own_values() {
        statements_together_run_in_order_with_their_own_values(Backend::Sqlite).await
    }
    #[tokio::test]
    async fn postgres_statements_together_run_in_order_with_their_own_values() {
        statements_together_run_in_order_with_their_own_values(Backend::Postgres).await
    }

    async fn a_flush_past_the_parameter_limit_is_split(backend: Backend) {
        let (_testdb, db) = db(backend).await;
        let mut tx = db.begin().await.expect("begin");
        let rows = MAX_PARAMS / SHAPE.columns * 2 + 3;
        let ((), pending) = gather(async {
            for n in 0..rows {
                insert(&mut tx, SHAPE, row(&format!("k{n}"), n as i64))
                    .await
                    .expect("insert");
            }
            insert(&mut tx, OTHER, vec!["last".into()])
                .await
                .expect("insert");
        })
        .await;
        pending.flush(&mut tx).await.expect("flush");
        tx.commit().await.expect("commit");
        assert_eq!(count(&db, "t").await as usize, rows);
        assert_eq!(count(&db, "u").await, 1);
    }

    /// A deferred row's `Now` is the flush's time (just before the commit), not the gather's.
    async fn now_is_the_time_of_the_flush(backend: Backend) {
        let (_testdb, db) = db(backend).await;
        let mut tx = db.begin().await.expect("begin");
        let ((), pending) = gather(async {
            let row = vec![
                "late".into(),
                Value::Now,
                None::<String>.into(),
                vec![].into(),
            ];
            insert(&mut tx, SHAPE, row).await.expect("insert");
        })
        .await;
        // The handler's turn ends; other work of the batch takes its time before the flush.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let flushed_after = crate::db::now_micros();
        pending.flush(&mut tx).await.expect("flush");
        tx.commit().await.expect("commit");
        let n: i64 = sqlx::query("SELECT n FROM t WHERE k = 'late'")
            .fetch_one(db.pool())
            .await
            .expect("row")
            .get(0);
        assert!(
            n >= flushed_after,
            "stamped {n}, flushed after {flushed_after}"
        );
    }

    #[tokio::test]
    async fn sqlite_now_is_the_time_of_the_flush() {
        now_is_the_time_of_the_flush(Backend::Sqlite).await
    }
    #[tokio::test]
    async fn postgres_now_is_the_time_of_the_flush() {
        now_is_the_time_of_the_flush(Backend::Postgres).await
    }
    #[tokio::test]
    async fn sqlite_gathered_rows_wait_for_the_flush_and_all_arrive() {
        gathered_rows_wait_for_the_flush_and_all_arrive(Backend::Sqlite).await
    }
    #[tokio::test]
    async fn postgres_gathered_rows_wait_for_the_flush_and_all_arrive() {
        gathered_rows_wait_for_the_flush_and_all_arrive(Backend::Postgres).await
    }
    #[tokio::test]
    async fn sqlite_rolled_back_rows_are_never_written() {
        rolled_back_rows_are_never_written(Backend::Sqlite).await
    }
    #[tokio::test]
    async fn postgres_rolled_back_rows_are_never_written() {
        rolled_back_rows_are_never_written(Backend::Postgres).await
    }
    #[tokio::test]
    async fn sqlite_rows_written_inside_a_gather_wait_for_it() {
        rows_written_inside_a_gather_wait_for_it(Backend::Sqlite).await
    }
    #[tokio::test]
    async fn postgres_rows_written_inside_a_gather_wait_for_it() {
        rows_written_inside_a_gather_wait_for_it(Backend::Postgres).await
    }
    #[tokio::test]
    async fn sqlite_a_flush_past_the_parameter_limit_is_split() {
        a_flush_past_the_parameter_limit_is_split(Backend::Sqlite).await
    }
    #[tokio::test]
    async fn postgres_a_flush_past_the_parameter_limit_is_split() {
        a_flush_past_the_parameter_limit_is_split(Backend::Postgres).await
    }
}
