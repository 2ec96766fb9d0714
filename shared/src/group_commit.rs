//! Group commit for SQLite: write transactions that arrive while the single writer connection is
//! busy are committed together, each caller's work in a savepoint of its own.
//!
//! A SQLite commit costs the same whether it holds one row or fifty: `BEGIN`, the write lock, and
//! one WAL frame per page it changed (rows appended to the same tables and indexes share pages).
//! Under load, callers queue for the writer anyway; here the queue is drained into one
//! transaction instead of one transaction each. A caller alone runs at once, without savepoints,
//! so nothing waits to gather a group.
//!
//! Each caller still sees its own transaction: work that fails or asks for a rollback is undone
//! back to its savepoint and the others go on; its answer comes back only once the group's
//! `COMMIT` has landed (or failed, in which case nothing of anyone's was written).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::{AnyConnection, AnyPool};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::deferred::{self, Deferred};

/// Callers taken into one transaction at most, so one group's commit stays short.
const MAX_GROUP: usize = 64;

/// What a caller's work decided about its writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written<T> {
    /// Keep them: the value is returned once they are committed.
    Commit(T),
    /// Undo them; the value is returned as is.
    Rollback(T),
}

/// A caller's transactional work: runs once, on the writer's connection, inside a transaction.
pub type Work<T> = Box<
    dyn for<'c> FnOnce(&'c mut AnyConnection) -> BoxFuture<'c, Result<Written<T>, sqlx::Error>>
        + Send,
>;

/// A job's work with its answer's type erased.
type Run = Box<dyn for<'c> FnOnce(&'c mut AnyConnection) -> BoxFuture<'c, Ran> + Send>;

/// Tells a caller the outcome once the group's is known (`None`: committed).
type Answer = Box<dyn FnOnce(Option<&sqlx::Error>) + Send>;

/// One caller's work.
pub(crate) struct Job {
    run: Run,
}

/// What running a job left: whether its writes stay, and how to answer its caller.
struct Ran {
    keep: bool,
    answer: Answer,
}

/// Wrap `work` so that it answers on `reply`, in the caller's span (its events' trace context and
/// logs belong to the caller, not to the writer task), running its after-commit effects only if
/// it was committed.
pub(crate) fn job<T: Send + 'static>(
    work: Work<T>,
    span: tracing::Span,
    reply: oneshot::Sender<Result<T, sqlx::Error>>,
) -> Job {
    Job {
        run: Box::new(move |conn| {
            Box::pin(async move {
                let (result, effects) = deferred::collect(work(conn)).instrument(span).await;
                answer(result, effects, reply)
            })
        }),
    }
}

fn answer<T: Send + 'static>(
    result: Result<Written<T>, sqlx::Error>,
    effects: Deferred,
    reply: oneshot::Sender<Result<T, sqlx::Error>>,
) -> Ran {
    // A caller that went away (its request dropped) no longer wants the answer; its writes
    // stand or fall with the group all the same.
    match result {
        Ok(Written::Commit(v)) => Ran {
            keep: true,
            answer: Box::new(move |failed| {
                let _ = reply.send(match failed {
                    None => {
                        effects.run();
                        Ok(v)
                    }
                    Some(e) => Err(not_committed(Some(e))),
                });
            }),
        },
        Ok(Written::Rollback(v)) => Ran {
            keep: false,
            answer: Box::new(move |_| {
                let _ = reply.send(Ok(v));
            }),
        },
        Err(e) => Ran {
            keep: false,
            answer: Box::new(move |_| {
                let _ = reply.send(Err(e));
            }),
        },
    }
}

/// The error a caller gets when the group's transaction, not its own work, failed.
pub(crate) fn not_committed(cause: Option<&sqlx::Error>) -> sqlx::Error {
    let cause = cause.map_or_else(|| "the writer stopped".to_owned(), ToString::to_string);
    sqlx::Error::Io(std::io::Error::other(format!(
        "the write transaction was not committed, nothing was written: {cause}"
    )))
}

/// Start the writer task; it ends when the last sender is dropped.
pub(crate) fn spawn(writer: AnyPool, transactions: Arc<AtomicU64>) -> mpsc::UnboundedSender<Job> {
    let (send, mut receive) = mpsc::unbounded_channel::<Job>();
    tokio::spawn(async move {
        let mut group = Vec::with_capacity(MAX_GROUP);
        while receive.recv_many(&mut group, MAX_GROUP).await > 0 {
            transactions.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = run_group(&writer, std::mem::take(&mut group)).await {
                tracing::warn!(error = %e, "a group of write transactions failed; nothing of it was written");
            }
        }
    });
    send
}

/// Run `jobs` in one transaction. On an error of the transaction itself (not of a job's work),
/// everything is rolled back: the jobs that ran are answered with it, the others are dropped
/// (their callers see the writer gone: nothing written either way).
async fn run_group(writer: &AnyPool, jobs: Vec<Job>) -> Result<(), sqlx::Error> {
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
    let alone = jobs.len() == 1;
    let mut ran = Vec::with_capacity(jobs.len());
    let mut kept = false;
    for job in jobs {
        // Alone, the transaction is the job's: a rollback below undoes exactly its work.
        if !alone {
            if let Err(e) = sqlx::query("SAVEPOINT grouped").execute(&mut *tx).await {
                return fail(ran, e);
            }
        }
        let r = (job.run)(&mut tx).await;
        if !alone {
            let mut closed = Ok(());
            if !r.keep {
                closed = sqlx::query("ROLLBACK TO grouped")
                    .execute(&mut *tx)
                    .await
                    .map(drop);
            }
            if closed.is_ok() {
                closed = sqlx::query("RELEASE grouped")
                    .execute(&mut *tx)
                    .await
                    .map(drop);
            }
            if let Err(e) = closed {
                ran.push(r);
                return fail(ran, e);
            }
        }
        kept |= r.keep;
        ran.push(r);
    }
    let settled = if kept {
        tx.commit().await
    } else {
        tx.rollback().await
    };
    match settled {
        Ok(()) => {
            for r in ran {
                (r.answer)(None);
            }
            Ok(())
        }
        Err(e) => fail(ran, e),
    }
}

fn fail(ran: Vec<Ran>, e: sqlx::Error) -> Result<(), sqlx::Error> {
    for r in ran {
        (r.answer)(Some(&e));
    }
    Err(e)
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::AtomicUsize;

    use sqlx::Row;

    use super::*;
    use crate::db::{Backend, Database};
    use crate::testing::TestDb;

    type Pending<T> = Pin<Box<dyn Future<Output = Result<T, sqlx::Error>>>>;

    async fn db(backend: Backend) -> (TestDb, Database) {
        let testdb = TestDb::new(backend).await;
        let db = testdb.connect().await;
        sqlx::query("CREATE TABLE t (k TEXT PRIMARY KEY)")
            .execute(db.pool())
            .await
            .expect("ddl");
        sqlx::query("INSERT INTO t (k) VALUES ('taken')")
            .execute(db.pool())
            .await
            .expect("row");
        (testdb, db)
    }

    async fn keys(db: &Database) -> Vec<String> {
        sqlx::query("SELECT k FROM t ORDER BY k")
            .fetch_all(db.pool())
            .await
            .expect("keys")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Insert `keys` in order, then say `then`.
    fn insert(db: &Database, keys: &[&str], then: fn(u8) -> Written<u8>) -> Pending<u8> {
        let (db, keys) = (
            db.clone(),
            keys.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        );
        Box::pin(async move {
            db.write(Box::new(move |conn| {
                Box::pin(async move {
                    for k in &keys {
                        sqlx::query("INSERT INTO t (k) VALUES ($1)")
                            .bind(k)
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(then(keys.len() as u8))
                })
            }))
            .await
        })
    }

    async fn each_caller_keeps_its_own_outcome(backend: Backend) {
        let (_testdb, db) = db(backend).await;
        let effects = Arc::new(AtomicUsize::new(0));
        // The writer is busy while the callers arrive, so on SQLite they queue and go together.
        let busy = db.begin().await.expect("begin");
        let begun = db.transactions();
        let counted = {
            let (db, effects) = (db.clone(), effects.clone());
            Box::pin(async move {
                db.write(Box::new(move |conn| {
                    Box::pin(async move {
                        sqlx::query("INSERT INTO t (k) VALUES ('counted')")
                            .execute(&mut *conn)
                            .await?;
                        crate::deferred::after_commit(move || {
                            effects.fetch_add(1, Ordering::SeqCst);
                        });
                        Ok(Written::Commit(0u8))
                    })
                }))
                .await
            }) as Pending<u8>
        };
        let mut callers = vec![
            insert(&db, &["a1", "a2"], Written::Commit),
            insert(&db, &["undone"], Written::Rollback),
            // Its first row is undone with it: all of a caller's work or none.
            insert(&db, &["half", "taken"], Written::Commit),
            insert(&db, &["b"], Written::Commit),
            counted,
            insert(&db, &["c"], Written::Commit),
        ];
        // On SQLite each is handed to the writer task at its first poll, and waits there.
        // (On Postgres each runs on a connection of its own, and may finish at once.)
        if backend == Backend::Sqlite {
            for caller in &mut callers {
                assert!(
                    futures::poll!(caller.as_mut()).is_pending(),
                    "waits for the commit"
                );
            }
            assert_eq!(
                keys(&db).await,
                ["taken"],
                "nothing visible before the commit"
            );
        }
        busy.commit().await.expect("commit");
        let answers = futures::future::join_all(callers).await;
        assert_eq!(answers[0].as_ref().ok(), Some(&2));
        assert_eq!(
            answers[1].as_ref().ok(),
            Some(&1),
            "a rollback still answers"
        );
        match &answers[2] {
            Err(sqlx::Error::Database(e)) => assert!(e.is_unique_violation(), "{e}"),
            other => panic!("expected the duplicate key, got {other:?}"),
        }
        assert_eq!(answers[3].as_ref().ok(), Some(&1));
        assert_eq!(answers[4].as_ref().ok(), Some(&0));
        assert_eq!(answers[5].as_ref().ok(), Some(&1));
        assert_eq!(keys(&db).await, ["a1", "a2", "b", "c", "counted", "taken"]);
        assert_eq!(effects.load(Ordering::SeqCst), 1, "after the commit, once");
        let transactions = db.transactions() - begun;
        match backend {
            Backend::Sqlite => assert_eq!(transactions, 1, "one transaction for the six"),
            Backend::Postgres => assert_eq!(transactions, 6, "a transaction each"),
        }
    }

    #[tokio::test]
    async fn sqlite_each_caller_keeps_its_own_outcome() {
        each_caller_keeps_its_own_outcome(Backend::Sqlite).await
    }
    #[tokio::test]
    async fn postgres_each_caller_keeps_its_own_outcome() {
        each_caller_keeps_its_own_outcome(Backend::Postgres).await
    }

    /// When the group's transaction itself fails, no caller is told its work was written.
    #[tokio::test]
    async fn sqlite_a_failed_group_commits_nobody() {
        let (_testdb, db) = db(Backend::Sqlite).await;
        let busy = db.begin().await.expect("begin");
        let breaker = {
            let db = db.clone();
            Box::pin(async move {
                db.write(Box::new(|conn| {
                    Box::pin(async move {
                        sqlx::query("INSERT INTO t (k) VALUES ('broken')")
                            .execute(&mut *conn)
                            .await?;
                        // Ends the group's transaction under it: its savepoint is gone.
                        sqlx::query("ROLLBACK").execute(&mut *conn).await?;
                        Ok(Written::Commit(0u8))
                    })
                }))
                .await
            }) as Pending<u8>
        };
        let mut callers = vec![insert(&db, &["first"], Written::Commit), breaker];
        for caller in &mut callers {
            assert!(futures::poll!(caller.as_mut()).is_pending());
        }
        busy.commit().await.expect("commit");
        let answers = futures::future::join_all(callers).await;
        for answer in &answers {
            let e = answer.as_ref().expect_err("not committed");
            assert!(e.to_string().contains("not committed"), "{e}");
        }
        assert_eq!(keys(&db).await, ["taken"]);
        // The writer goes on.
        assert_eq!(insert(&db, &["after"], Written::Commit).await.ok(), Some(1));
        assert_eq!(keys(&db).await, ["after", "taken"]);
    }
}
