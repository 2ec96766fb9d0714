//! Fault-injection suite. Small by default (CI); large on demand:
//! `FAULT_SAGAS=5000 FAULT_RATE=100 cargo test --release -p saga-e2e --test faults -- --nocapture`

use event_toolkit::Backend;
use saga_e2e::faults::{run, FaultConfig};

/// One suite at a time: each runs three services and a nats-server flat out, and two at once on a
/// small machine would mostly measure each other (sagas ending by deadline for want of CPU).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn suite(backend: Backend) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let report = run(FaultConfig::from_env(backend)).await;
    println!("==== fault-injection report ({backend:?}) ====\n{report}");
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
    suite(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_invariants_hold_under_crashes_restarts_duplicates_and_poison() {
    suite(Backend::Postgres).await;
}
