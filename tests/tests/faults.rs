//! Fault-injection suite. Small by default (CI); large on demand:
//! `FAULT_SAGAS=5000 FAULT_RATE=100 cargo test --release -p saga-e2e --test faults -- --nocapture`
//! (the replicas run: `FAULT_REPLICA_SAGAS`, default 300).

use event_toolkit::Backend;
use saga_e2e::faults::{run, FaultConfig};

/// One suite at a time: each runs three services and a nats-server flat out, and two at once on a
/// small machine would mostly measure each other (sagas ending by deadline for want of CPU).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn suite(config: FaultConfig) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (backend, replicas) = (config.backend, config.replicas);
    let report = run(config).await;
    println!("==== fault-injection report ({backend:?}, {replicas} replica(s) per service) ====\n{report}");
    assert_eq!(
        report.accepted, report.planned,
        "every saga must be accepted:\n{report}"
    );
    assert!(report.republished > 0, "nothing re-published:\n{report}");
    assert_eq!(
        report.poison_dead_lettered, report.poison_planned,
        "every poison message dead-lettered:\n{report}"
    );
    // Outcomes per kind, the Confirm share, the contended seeds, every fault kind, the dead letters
    // and the six invariants.
    report.assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_invariants_hold_under_crashes_restarts_duplicates_and_poison() {
    suite(FaultConfig::from_env(Backend::Sqlite)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_invariants_hold_under_crashes_restarts_duplicates_and_poison() {
    suite(FaultConfig::from_env(Backend::Postgres)).await;
}

/// Two replicas of each service; a SIGKILL takes one replica down while the other serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_replicas_each_hold_the_invariants_under_the_same_faults() {
    let mut config = FaultConfig::from_env(Backend::Postgres);
    config.replicas = 2;
    config.sagas = std::env::var("FAULT_REPLICA_SAGAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    suite(config).await;
}
