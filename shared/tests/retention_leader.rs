//! The retention sweeper among replicas on one Postgres database: one sweeps, the others skip;
//! a leader that dies mid-sweep does not keep the others from sweeping; different rule sets (the
//! toolkit's and a service's own) do not wait for each other. Each "replica" here is a pool of its
//! own on the same database, as two processes would have.

use std::time::Duration;

use event_toolkit::retention::{self, PruneRule, BATCH};
use event_toolkit::testing::{eventually, TestDb};
use event_toolkit::{Backend, Database};
use sqlx::Row;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);
const ROWS: i64 = 5 * BATCH;

/// A database with [`ROWS`] expired rows, a log of which sweeper deleted each, and a record of
/// how many sweeps ran at once.
async fn database() -> (TestDb, [Database; 2]) {
    let testdb = TestDb::new(Backend::Postgres).await;
    let a = testdb.connect().await;
    let b = testdb.connect().await;
    sqlx::raw_sql(&format!(
        "CREATE TABLE expired (id BIGINT PRIMARY KEY, created_at_us BIGINT NOT NULL);
         INSERT INTO expired SELECT g, 0 FROM generate_series(1, {ROWS}) g;
         CREATE TABLE deleted_by (id BIGINT PRIMARY KEY, sweeper TEXT NOT NULL);
         CREATE TABLE sweeping (running BIGINT NOT NULL, peak BIGINT NOT NULL, sweeps BIGINT NOT NULL);
         INSERT INTO sweeping VALUES (0, 0, 0);"
    ))
    .execute(a.pool())
    .await
    .expect("fixture tables");
    (testdb, [a, b])
}

/// Rows a leader's sweep reports beyond the deletions: its enter, pause and leave notes.
const NOTES: u64 = 3;

/// The rules one replica runs: note that a sweep began (and how many run now), pause `pause_s`
/// (so that sweeps of two replicas would overlap in time), delete expired rows in batches noting
/// who deleted them, note that the sweep ended. Each statement takes the cutoff and the batch
/// size, as every rule does.
fn rules(sweeper: &str, pause_s: f64) -> Vec<PruneRule> {
    let keep = Duration::from_secs(1);
    vec![
        PruneRule {
            what: "enter",
            sql: "UPDATE sweeping SET running = running + 1, peak = GREATEST(peak, running + 1), \
                  sweeps = sweeps + 1 WHERE $1 > 0 AND $2 > 0"
                .into(),
            keep,
        },
        PruneRule {
            what: "pause",
            sql: format!(
                "UPDATE sweeping SET running = running FROM (SELECT pg_sleep({pause_s})) s \
                 WHERE $1 > 0 AND $2 > 0"
            ),
            keep,
        },
        PruneRule {
            what: "expired",
            sql: format!(
                "WITH d AS (DELETE FROM expired WHERE id IN (SELECT id FROM expired WHERE \
                 created_at_us < $1 ORDER BY id LIMIT $2) RETURNING id) \
                 INSERT INTO deleted_by SELECT id, '{sweeper}' FROM d"
            ),
            keep,
        },
        PruneRule {
            what: "leave",
            sql: "UPDATE sweeping SET running = running - 1 WHERE $1 > 0 AND $2 > 0".into(),
            keep,
        },
    ]
}

async fn scalar(db: &Database, sql: &str) -> i64 {
    sqlx::query(sql)
        .fetch_one(db.pool())
        .await
        .expect(sql)
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_replicas_sweeping_at_once_one_deletes_and_the_other_skips() {
    let (_testdb, [a, b]) = database().await;
    let stop = CancellationToken::new();
    let (ra, rb) = (rules("a", 1.0), rules("b", 1.0));
    let (got_a, got_b) = tokio::join!(
        retention::sweep(&a, &ra, &stop),
        retention::sweep(&b, &rb, &stop)
    );
    let (got_a, got_b) = (got_a.expect("sweep a"), got_b.expect("sweep b"));
    let swept = [got_a, got_b];
    assert!(
        swept.contains(&None) && swept.contains(&Some(ROWS as u64 + NOTES)),
        "one sweeps everything, the other skips: {swept:?}"
    );
    let by: Vec<(String, i64)> =
        sqlx::query("SELECT sweeper, COUNT(*) FROM deleted_by GROUP BY sweeper")
            .fetch_all(a.pool())
            .await
            .expect("deleted_by")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    let leader = if got_a.is_some() { "a" } else { "b" };
    assert_eq!(by, vec![(leader.to_owned(), ROWS)]);
    assert_eq!(scalar(&a, "SELECT COUNT(*) FROM expired").await, 0);
    assert_eq!(scalar(&a, "SELECT peak FROM sweeping").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sweeping_on_a_schedule_never_sweep_at_the_same_time() {
    let (_testdb, [a, b]) = database().await;
    let stop = CancellationToken::new();
    let every = Duration::from_millis(5);
    let sweepers = [
        tokio::spawn(retention::run(
            a.clone(),
            rules("a", 0.05),
            every,
            stop.clone(),
        )),
        tokio::spawn(retention::run(
            b.clone(),
            rules("b", 0.05),
            every,
            stop.clone(),
        )),
    ];
    // Enough sweeps that, without the election, two would have overlapped many times over.
    eventually(WAIT, "40 sweeps", || async {
        (scalar(&a, "SELECT sweeps FROM sweeping").await >= 40).then_some(())
    })
    .await;
    stop.cancel();
    for s in sweepers {
        s.await.expect("sweeper");
    }
    assert_eq!(
        scalar(&a, "SELECT peak FROM sweeping").await,
        1,
        "two sweeps ran at once"
    );
    assert_eq!(scalar(&a, "SELECT running FROM sweeping").await, 0);
    assert_eq!(scalar(&a, "SELECT COUNT(*) FROM expired").await, 0);
    assert_eq!(scalar(&a, "SELECT COUNT(*) FROM deleted_by").await, ROWS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_dies_mid_sweep_does_not_keep_the_others_from_sweeping() {
    let (_testdb, [a, b]) = database().await;
    let stop = CancellationToken::new();
    // Replica a leads and is stopped dead inside its sweep, as a crash or a shutdown would.
    let leader = {
        let (a, stop) = (a.clone(), stop.clone());
        tokio::spawn(async move { retention::sweep(&a, &rules("a", 30.0), &stop).await })
    };
    eventually(WAIT, "replica a to lead", || async {
        (scalar(&b, "SELECT running FROM sweeping").await == 1).then_some(())
    })
    .await;
    assert_eq!(
        retention::sweep(&b, &rules("b", 0.0), &stop)
            .await
            .expect("sweep b"),
        None,
        "b skips while a leads"
    );
    leader.abort();
    assert!(leader.await.is_err_and(|e| e.is_cancelled()));
    let swept = eventually(WAIT, "replica b to take over", || async {
        retention::sweep(&b, &rules("b", 0.0), &stop)
            .await
            .expect("sweep b")
    })
    .await;
    assert_eq!(swept, ROWS as u64 + NOTES);
    assert_eq!(scalar(&b, "SELECT COUNT(*) FROM expired").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_services_own_rules_do_not_wait_for_the_toolkits_sweeper() {
    let (_testdb, [a, b]) = database().await;
    let stop = CancellationToken::new();
    let toolkit = retention::toolkit_rules(&Default::default());
    let own = rules("own", 0.0);
    assert_ne!(retention::leader_key(&toolkit), retention::leader_key(&own));
    // While the toolkit's sweep of replica a runs (held here by its lock, as during a long
    // sweep), the service's own rules are swept by replica b all the same.
    let mut holder = a.pool().acquire().await.expect("connection").detach();
    let held: bool = sqlx::query("SELECT pg_try_advisory_lock($1)")
        .bind(retention::leader_key(&toolkit))
        .fetch_one(&mut holder)
        .await
        .expect("lock")
        .get(0);
    assert!(held);
    assert_eq!(
        retention::sweep(&b, &toolkit, &stop)
            .await
            .expect("toolkit"),
        None
    );
    let swept = retention::sweep(&b, &own, &stop).await.expect("own rules");
    assert_eq!(swept, Some(ROWS as u64 + NOTES));
}
