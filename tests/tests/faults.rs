//! Fault-injection suite. Small by default (CI); large on demand:
//! `FAULT_SAGAS=5000 FAULT_RATE=100 cargo test --release -p saga-e2e --test faults -- --nocapture`

use event_toolkit::Backend;
use saga_e2e::faults::{run, FaultConfig};

async fn suite(backend: Backend) {
    let report = run(FaultConfig::from_env(backend)).await;
    println!("==== fault-injection report ({backend:?}) ====\n{report}");
    assert!(report.accepted > 0, "no saga was accepted");
    assert!(report.violations.is_empty(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_invariants_hold_under_crashes_restarts_duplicates_and_poison() {
    suite(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_invariants_hold_under_crashes_restarts_duplicates_and_poison() {
    suite(Backend::Postgres).await;
}
