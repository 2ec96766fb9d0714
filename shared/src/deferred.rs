//! Effects that must happen only once a transaction has committed (metrics of what it decided).
//!
//! Code deep inside a transaction calls [`after_commit`]; whoever owns the transaction runs it
//! inside [`collect`], and after committing runs what was collected — or drops it on rollback.
//! The consumer runner does this per message, so a message rolled back (and applied again later)
//! is counted once, when it finally commits.

use std::cell::RefCell;
use std::future::Future;

type Effect = Box<dyn FnOnce() + Send>;

tokio::task_local! {
    static DEFERRED: RefCell<Deferred>;
}

/// Effects collected during a piece of transactional work.
#[must_use = "run the effects after the commit, or drop them on rollback"]
#[derive(Default)]
pub struct Deferred {
    effects: Vec<Effect>,
    enqueued: bool,
}

impl Deferred {
    /// Run the effects (call after the commit).
    pub fn run(self) {
        for effect in self.effects {
            effect();
        }
    }

    /// Add one effect.
    pub fn push(&mut self, effect: impl FnOnce() + Send + 'static) {
        self.effects.push(Box::new(effect));
    }

    /// Add `other`'s effects after these.
    pub fn extend(&mut self, other: Deferred) {
        self.effects.extend(other.effects);
        self.enqueued |= other.enqueued;
    }

    /// Whether the work wrote outbox rows: only then is there anything for the relay to do
    /// after the commit.
    pub fn enqueued(&self) -> bool {
        self.enqueued
    }
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Deferred({} effects, enqueued: {})",
            self.effects.len(),
            self.enqueued
        )
    }
}

/// Run `work`, collecting the effects it defers with [`after_commit`].
pub async fn collect<F: Future>(work: F) -> (F::Output, Deferred) {
    DEFERRED
        .scope(RefCell::new(Deferred::default()), async move {
            let out = work.await;
            let collected = DEFERRED.with(|d| d.take());
            (out, collected)
        })
        .await
}

/// Note that the enclosing transaction wrote an outbox row (see [`Deferred::enqueued`]).
/// Outside [`collect`] nobody asks.
pub(crate) fn note_enqueued() {
    let _ = DEFERRED.try_with(|d| d.borrow_mut().enqueued = true);
}

/// Defer `effect` until the enclosing transaction commits. Outside [`collect`] there is no
/// transaction owner to wait for, so it runs at once.
pub fn after_commit(effect: impl FnOnce() + Send + 'static) {
    let mut effect: Option<Effect> = Some(Box::new(effect));
    let _ = DEFERRED.try_with(|d| {
        if let Some(e) = effect.take() {
            d.borrow_mut().effects.push(e);
        }
    });
    if let Some(e) = effect {
        e();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn effects_wait_for_run_and_vanish_when_dropped() {
        let n = Arc::new(AtomicUsize::new(0));
        let bump = |n: &Arc<AtomicUsize>| {
            let n = n.clone();
            move || {
                n.fetch_add(1, Ordering::SeqCst);
            }
        };
        let ((), committed) = collect(async { after_commit(bump(&n)) }).await;
        let ((), rolled_back) = collect(async { after_commit(bump(&n)) }).await;
        assert_eq!(n.load(Ordering::SeqCst), 0, "nothing before the commit");
        committed.run();
        drop(rolled_back);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        after_commit(bump(&n));
        assert_eq!(
            n.load(Ordering::SeqCst),
            2,
            "outside a transaction: at once"
        );
    }
}
