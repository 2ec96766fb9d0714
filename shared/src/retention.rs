//! Retention: the toolkit's tables (and any a service adds) are pruned in the background, in small
//! batches, each its own short transaction, so pruning never holds a lock long enough to slow live
//! traffic.
//!
//! Dedup must survive pruning. A message can be redelivered, or an event re-published, for as long
//! as its stream keeps it (`max_age`) plus the consumer's redelivery horizon; the inbox row that
//! makes it a duplicate must outlive that. So a service refuses to start when `INBOX_RETENTION` is
//! not longer than the stream age plus the horizon. Published outbox rows are not needed for dedup
//! (the consumers' inboxes are), so they go sooner.
//!
//! With several replicas on Postgres one sweeper per rule set runs at a time: each sweep first
//! takes a session advisory lock named after its rules, and a replica that does not get it skips
//! that sweep. On SQLite one process owns the file, so there is nothing to elect.

use std::time::Duration;

use sqlx::{Connection, Row};
use tokio_util::sync::CancellationToken;

use crate::config::duration;
use crate::db::{now_micros, Backend, Database};
use crate::service::StartError;

/// Rows deleted per transaction.
pub const BATCH: i64 = 500;

/// Advisory-lock key of the sweeper of `rules`. Replicas of a service run the same rules and so
/// contend for one key, while a service's own rule set (e.g. idempotency keys) has a key of its
/// own and never waits for the toolkit's. FNV-1a, not the std hasher: replicas of different
/// builds during a rolling deploy must still agree.
pub fn leader_key(rules: &[PruneRule]) -> i64 {
    let names = rules.iter().flat_map(|r| r.what.bytes().chain([0]));
    let hash = b"retention\0"
        .iter()
        .copied()
        .chain(names)
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    hash as i64
}

/// How long each kind of row is kept (durations such as `1d`, `36h`, `90s`).
#[derive(Debug, Clone, clap::Args)]
pub struct RetentionConfig {
    /// How long published outbox rows are kept.
    #[arg(long = "outbox-retention", env = "OUTBOX_RETENTION", default_value = "1d", value_parser = duration)]
    pub outbox: Duration,
    /// How long inbox rows (the dedup record) are kept; must exceed the streams' max_age plus the
    /// redelivery horizon.
    #[arg(long = "inbox-retention", env = "INBOX_RETENTION", default_value = "8d", value_parser = duration)]
    pub inbox: Duration,
    /// How long dead letters are kept.
    #[arg(long = "dead-letter-retention", env = "DEAD_LETTER_RETENTION", default_value = "30d", value_parser = duration)]
    pub dead_letters: Duration,
    /// Pause between retention sweeps.
    #[arg(long = "retention-sweep-interval", env = "RETENTION_SWEEP_INTERVAL", default_value = "60s", value_parser = duration)]
    pub sweep_every: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            outbox: Duration::from_secs(24 * 3600),
            inbox: Duration::from_secs(8 * 24 * 3600),
            dead_letters: Duration::from_secs(30 * 24 * 3600),
            sweep_every: Duration::from_secs(60),
        }
    }
}

impl RetentionConfig {
    /// Refuse an inbox retention that would let a still-deliverable message be applied twice.
    pub fn check_dedup(
        &self,
        stream_max_age: Duration,
        redelivery_horizon: Duration,
    ) -> Result<(), StartError> {
        let needed = stream_max_age + redelivery_horizon;
        if self.inbox <= needed {
            return Err(StartError::Config {
                name: "INBOX_RETENTION".into(),
                reason: format!(
                    "{} must be longer than the streams' max_age ({}) plus the redelivery horizon \
                     ({}), or a redelivered or re-published event could be applied twice",
                    humantime::format_duration(self.inbox),
                    humantime::format_duration(stream_max_age),
                    humantime::format_duration(redelivery_horizon),
                ),
            });
        }
        Ok(())
    }
}

/// One kind of row to prune: a statement deleting (or clearing) at most `$2` rows older than the
/// cutoff `$1` (microseconds since the epoch), and how long rows are kept.
#[derive(Debug, Clone)]
pub struct PruneRule {
    /// For logs and metrics, e.g. `outbox`.
    pub what: &'static str,
    /// The statement, with `$1` = cutoff and `$2` = batch size.
    pub sql: String,
    /// Age after which rows go.
    pub keep: Duration,
}

/// The toolkit's own rules.
pub fn toolkit_rules(config: &RetentionConfig) -> Vec<PruneRule> {
    vec![
        PruneRule {
            what: "outbox",
            // Unpublished and parked rows stay whatever their age: they are not done.
            sql: "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE created_at_us < $1 \
                  AND published_at_us IS NOT NULL ORDER BY created_at_us LIMIT $2)"
                .into(),
            keep: config.outbox,
        },
        PruneRule {
            what: "inbox",
            sql: "DELETE FROM inbox WHERE (consumer, event_id) IN (SELECT consumer, event_id FROM \
                  inbox WHERE received_at_us < $1 ORDER BY received_at_us LIMIT $2)"
                .into(),
            keep: config.inbox,
        },
        PruneRule {
            what: "consumer_attempts",
            sql: "DELETE FROM consumer_attempts WHERE (consumer, stream, stream_sequence) IN \
                  (SELECT consumer, stream, stream_sequence FROM consumer_attempts WHERE \
                  updated_at_us < $1 ORDER BY updated_at_us LIMIT $2)"
                .into(),
            keep: config.inbox,
        },
        PruneRule {
            what: "dead_letters",
            sql: "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters WHERE \
                  created_at_us < $1 ORDER BY created_at_us LIMIT $2)"
                .into(),
            keep: config.dead_letters,
        },
    ]
}

/// Prune by `rules` every `every` until `shutdown`.
pub async fn run(
    db: Database,
    rules: Vec<PruneRule>,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        match sweep(&db, &rules, &shutdown).await {
            Ok(Some(n)) if n > 0 => tracing::info!(rows = n, "retention sweep pruned rows"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention sweep failed; next time"),
        }
    }
}

/// One sweep over every rule; `None` when another replica is sweeping the same rules.
pub async fn sweep(
    db: &Database,
    rules: &[PruneRule],
    shutdown: &CancellationToken,
) -> Result<Option<u64>, sqlx::Error> {
    let key = leader_key(rules);
    // Postgres: the lock is held by a session taken out of the pool for this sweep. Were it a
    // pooled one, a sweep dropped midway (shutdown, a panic) or a failed unlock would hand the
    // lock on to the connection's next user and keep every replica from sweeping again; a
    // detached connection releases it by closing, however the sweep ends.
    let leader = match db.backend() {
        Backend::Postgres => {
            let mut conn = db.pool().acquire().await?.detach();
            let got: bool = sqlx::query("SELECT pg_try_advisory_lock($1)")
                .bind(key)
                .fetch_one(&mut conn)
                .await?
                .try_get(0)?;
            if !got {
                tracing::debug!(key, "another replica is sweeping; skipped");
                let _ = conn.close().await;
                return Ok(None);
            }
            Some(conn)
        }
        Backend::Sqlite => None,
    };
    let result = prune_all(db, rules, shutdown).await;
    if let Some(mut conn) = leader {
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(key)
            .execute(&mut conn)
            .await;
        let _ = conn.close().await;
    }
    result.map(Some)
}

async fn prune_all(
    db: &Database,
    rules: &[PruneRule],
    shutdown: &CancellationToken,
) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    for rule in rules {
        let cutoff = now_micros() - rule.keep.as_micros().min(i64::MAX as u128) as i64;
        loop {
            let mut tx = db.begin().await?;
            let n = sqlx::query(&rule.sql)
                .bind(cutoff)
                .bind(BATCH)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            total += n;
            metrics::counter!("retention_pruned_rows_total", "table" => rule.what).increment(n);
            if (n as i64) < BATCH || shutdown.is_cancelled() {
                break;
            }
            // Let live writers in between batches.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_key_names_the_rule_set() {
        let config = RetentionConfig::default();
        let toolkit = toolkit_rules(&config);
        let own = vec![PruneRule {
            what: "idempotency_keys",
            sql: String::new(),
            keep: config.outbox,
        }];
        // Stable across builds and processes: replicas compute it apart.
        assert_eq!(leader_key(&toolkit), leader_key(&toolkit_rules(&config)));
        assert_ne!(leader_key(&toolkit), leader_key(&own));
    }

    #[test]
    fn inbox_retention_must_outlive_the_stream_and_the_redeliveries() {
        let week = Duration::from_secs(7 * 24 * 3600);
        let horizon = Duration::from_secs(600);
        let mut c = RetentionConfig::default();
        assert!(c.check_dedup(week, horizon).is_ok());
        c.inbox = week;
        let err = c.check_dedup(week, horizon).unwrap_err().to_string();
        assert!(err.contains("INBOX_RETENTION"), "{err}");
        c.inbox = week + horizon + Duration::from_secs(1);
        assert!(c.check_dedup(week, horizon).is_ok());
    }
}
