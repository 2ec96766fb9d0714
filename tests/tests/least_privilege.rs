//! The services under the project's `nats.conf`: each connects as its own least-privilege user
//! (the test client as `cli`), and sagas still complete, confirmed and compensated.

use event_toolkit::Backend;
use saga_e2e::invariants::{check, wait_quiet};
use saga_e2e::{System, SystemConfig, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_runs_with_only_its_own_nats_user() {
    let mut config = SystemConfig::new(Backend::Sqlite);
    config.project_users = true;
    let s = System::start(config).await;
    s.set_stock("WIDGET", 10).await;
    s.set_balance("alice", 1_000).await;
    s.set_balance("bob", 10).await;
    let ok = s.place_order("alice", &[("WIDGET", 2, 100)]).await;
    let poor = s.place_order("bob", &[("WIDGET", 1, 100)]).await;
    assert_eq!(s.wait_terminal(&ok).await["status"], "CONFIRMED");
    let o = s.wait_terminal(&poor).await;
    assert_eq!(
        (o["status"].as_str(), o["reason"].as_str()),
        (Some("CANCELLED"), Some("insufficient_funds"))
    );
    wait_quiet(&s, WAIT).await;
    assert_eq!(s.product("WIDGET").await["sold"], 2);
    assert_eq!(s.balance("alice").await, 800);
    check(&s).await.assert_clean();
}
