//! Money at the provider, end to end, read off the simulated provider's ledger
//! (`GET /admin/provider/ledger`): every approval ends captured or voided, the provider is never
//! asked to approve more of a customer's orders than the balance covers, and an approval whose
//! answer was lost is found by its key instead of being taken for a failure.

use event_toolkit::Backend;
use saga_e2e::invariants::{check, wait_quiet};
use saga_e2e::{wait_for, Service, System, SystemConfig, WAIT};
use saga_e2e::{CancelReason, OrderStatus};
use serde_json::Value;

macro_rules! on_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(event_toolkit::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(event_toolkit::Backend::Postgres).await })*
        }
    };
}

on_backends!(
    concurrent_orders_of_one_customer_get_one_approval_when_the_balance_covers_one,
    lost_answers_are_reconciled_by_key_and_every_approval_is_captured_or_voided,
);

async fn ledger(s: &System) -> Value {
    s.get_json(Service::Payment, "/admin/provider/ledger").await
}

fn count(l: &Value, field: &str) -> u64 {
    l[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {l}"))
}

/// The ledger once no approval is left open (or as it stands after [`WAIT`]); asserts
/// approvals == captures + voids.
async fn settled_ledger(s: &System) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    let l = loop {
        let l = ledger(s).await;
        if count(&l, "outstanding") == 0 || std::time::Instant::now() > deadline {
            break l;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        count(&l, "approvals"),
        count(&l, "captures") + count(&l, "voids"),
        "{l}"
    );
    assert_eq!(count(&l, "refused_follow_ups"), 0, "{l}");
    l
}

async fn concurrent_orders_of_one_customer_get_one_approval_when_the_balance_covers_one(
    b: Backend,
) {
    let mut config = SystemConfig::new(b);
    // Slow enough for the five payments to be with the processor at the same time.
    config.gateway_latency_ms = 1000;
    let s = System::start(config).await;
    s.set_stock("WIDGET", 100).await;
    s.set_balance("carol", 100).await;
    let placing = (0..5).map(|_| s.place_order("carol", &[("WIDGET", 1, 100)]));
    let ids = futures::future::join_all(placing).await;

    let mut outcomes = Vec::new();
    for id in &ids {
        let o = s.wait_terminal_view(id).await;
        outcomes.push((o.status, o.reason));
    }
    outcomes.sort();
    let poor = (
        OrderStatus::Cancelled,
        Some(CancelReason::InsufficientFunds),
    );
    assert_eq!(
        outcomes,
        vec![(OrderStatus::Confirmed, None), poor, poor, poor, poor]
    );
    wait_quiet(&s, WAIT).await;

    let l = settled_ledger(&s).await;
    // The other four were never put to the provider: nothing to void.
    assert_eq!(
        (
            count(&l, "approvals"),
            count(&l, "captures"),
            count(&l, "voids")
        ),
        (1, 1, 0),
        "{l}"
    );
    assert_eq!(s.balance("carol").await, 0);
    check(&s).await.assert_clean();
}

async fn lost_answers_are_reconciled_by_key_and_every_approval_is_captured_or_voided(b: Backend) {
    let mut config = SystemConfig::new(b);
    // The provider approves every charge and no answer ever arrives: each charge times out on
    // every attempt, then is asked about by its key.
    config
        .env
        .push(("PAYMENT_GATEWAY_TIMEOUT_EVERY".into(), "1".into()));
    let s = System::start(config).await;
    s.set_stock("WIDGET", 100).await;
    for customer in ["alice", "bob", "dan"] {
        s.set_balance(customer, 1000).await;
    }
    let paid = s.place_order("alice", &[("WIDGET", 1, 600)]).await;
    let cancelled = s.place_order("bob", &[("WIDGET", 1, 600)]).await;
    let short = s.place_order("dan", &[("WIDGET", 1, 600)]).await;
    wait_for(WAIT, "three approvals at the provider", || async {
        (count(&ledger(&s).await, "approvals") == 3).then_some(())
    })
    .await;
    // While the provider holds the approvals and the service waits for their answers: bob
    // cancels, and dan's balance drops below the amount.
    let (code, _) = s.cancel(&cancelled).await;
    assert_eq!(code, 202);
    s.set_balance("dan", 100).await;

    let o = s.wait_terminal_view(&paid).await;
    assert_eq!(
        o.status,
        OrderStatus::Confirmed,
        "an approval is no failure: {o:?}"
    );
    let o = s.wait_terminal_view(&cancelled).await;
    assert_eq!(o.reason, Some(CancelReason::CustomerCancelled), "{o:?}");
    let o = s.wait_terminal_view(&short).await;
    assert_eq!(o.reason, Some(CancelReason::InsufficientFunds), "{o:?}");
    wait_quiet(&s, WAIT).await;

    let l = settled_ledger(&s).await;
    assert_eq!(
        (
            count(&l, "approvals"),
            count(&l, "captures"),
            count(&l, "voids"),
            count(&l, "lost_answers")
        ),
        (3, 1, 2, 3),
        "{l}"
    );
    // alice's and dan's charges are asked about by key; bob's may be voided without asking when
    // his cancellation lands before the question.
    assert!(count(&l, "status_queries") >= 2, "{l}");
    assert_eq!(s.balance("alice").await, 400);
    assert_eq!(s.balance("bob").await, 1000);
    assert_eq!(s.balance("dan").await, 100);
    check(&s).await.assert_clean();
}
